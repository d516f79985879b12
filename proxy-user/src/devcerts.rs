//! Development certificates: two private CAs and the leaf certificates a local Spoke needs. For
//! `cargo xtask run`, the tests and trying Spoke out; production clusters issue their own.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Why the certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DevCertsError {
    /// rcgen failed.
    #[error("generate certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be written.
    #[error("write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
}

/// Paths of everything [`generate`] wrote.
#[derive(Clone, Debug)]
pub struct DevCerts {
    /// CA of the agent side: signs the server's agent-listener certificate and the agents' certificates.
    pub cluster_ca: PathBuf,
    /// Server certificate for the agent listener (`--cluster-cert`).
    pub cluster_cert: PathBuf,
    /// Its key (`--cluster-key`).
    pub cluster_key: PathBuf,
    /// Agent client certificate (`--agent-cert`).
    pub agent_cert: PathBuf,
    /// Its key (`--agent-key`).
    pub agent_key: PathBuf,
    /// CA of the frontend side: signs the TCP frontend's certificate and the apiserver's client certificate.
    pub frontend_ca: PathBuf,
    /// TCP frontend certificate (`--server-cert`).
    pub frontend_cert: PathBuf,
    /// Its key (`--server-key`).
    pub frontend_key: PathBuf,
    /// Client certificate for CONNECT clients such as kube-apiserver.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// Node certificates, as kubelets hold them, for `--agent-auth node-cert`.
    pub nodes: Vec<NodeCert>,
}

/// A certificate with a kubelet's subject (`CN=system:node:<name>, O=system:nodes`) from the cluster CA.
/// A name given twice to [`generate`] gets a second certificate, as after a rotation.
#[derive(Clone, Debug)]
pub struct NodeCert {
    /// The node's name.
    pub name: String,
    /// The certificate (`node-<name>.pem`).
    pub cert: PathBuf,
    /// Its key (`node-<name>-key.pem`).
    pub key: PathBuf,
}

fn ca(name: &str) -> Result<CertifiedIssuer<'static, KeyPair>, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    CertifiedIssuer::self_signed(params, KeyPair::generate()?)
}

fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    common_name: &str,
    names: &[String],
    usage: ExtendedKeyUsagePurpose,
) -> Result<(String, String), rcgen::Error> {
    leaf_in(issuer, common_name, None, names, usage, None)
}

fn leaf_in(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    common_name: &str,
    organization: Option<&str>,
    names: &[String],
    usage: ExtendedKeyUsagePurpose,
    not_after: Option<std::time::SystemTime>,
) -> Result<(String, String), rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, common_name);
    if let Some(not_after) = not_after {
        params.not_before =
            time::OffsetDateTime::from(std::time::SystemTime::now() - std::time::Duration::from_mins(1));
        params.not_after = time::OffsetDateTime::from(not_after);
    }
    if let Some(organization) = organization {
        params.distinguished_name.push(DnType::OrganizationName, organization);
    }
    for name in names {
        params.subject_alt_names.push(match name.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.clone().try_into()?),
        });
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The common name of the development CONNECT client's certificate (`client.pem`): the name to give
/// `spoke-server --frontend-allowed-names`.
pub const CLIENT_NAME: &str = "kube-apiserver";

/// Writes a fresh set of development certificates into `dir`. Server certificates are valid for
/// `localhost`, `127.0.0.1`, `::1` and `server_names`; a node certificate is made for each of `nodes`.
pub fn generate(dir: &Path, server_names: &[String], nodes: &[String]) -> Result<DevCerts, DevCertsError> {
    generate_until(dir, server_names, nodes, None)
}

/// [`generate`], with node certificates that expire at `nodes_until` (for tests of expiry) where given.
pub fn generate_until(
    dir: &Path,
    server_names: &[String],
    nodes: &[String],
    nodes_until: Option<std::time::SystemTime>,
) -> Result<DevCerts, DevCertsError> {
    let write = |name: &str, text: &str| -> Result<PathBuf, DevCertsError> {
        let path = dir.join(name);
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&path, text))
            .map_err(|source| DevCertsError::Write { path: path.clone(), source })?;
        Ok(path)
    };
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    names.extend(server_names.iter().cloned());

    let cluster_ca = ca("spoke development cluster CA")?;
    let (cluster_cert, cluster_key) =
        leaf(&cluster_ca, "spoke-server", &names, ExtendedKeyUsagePurpose::ServerAuth)?;
    let (agent_cert, agent_key) = leaf(&cluster_ca, "spoke-agent", &[], ExtendedKeyUsagePurpose::ClientAuth)?;
    let frontend_ca = ca("spoke development frontend CA")?;
    let (frontend_cert, frontend_key) =
        leaf(&frontend_ca, "spoke-server", &names, ExtendedKeyUsagePurpose::ServerAuth)?;
    let (client_cert, client_key) =
        leaf(&frontend_ca, CLIENT_NAME, &[], ExtendedKeyUsagePurpose::ClientAuth)?;

    let mut node_certs: Vec<NodeCert> = Vec::new();
    for name in nodes {
        // A name given again gets another certificate (a rotation): `node-<name>.<n>.pem`.
        let again = node_certs.iter().filter(|n| &n.name == name).count();
        let file = if again == 0 { format!("node-{name}") } else { format!("node-{name}.{again}") };
        let common_name = format!("{}{name}", crate::transport::tls::NODE_USER_PREFIX);
        let group = Some(crate::transport::tls::NODES_GROUP);
        let (cert, key) =
            leaf_in(&cluster_ca, &common_name, group, &[], ExtendedKeyUsagePurpose::ClientAuth, nodes_until)?;
        node_certs.push(NodeCert {
            name: name.clone(),
            cert: write(&format!("{file}.pem"), &cert)?,
            key: write(&format!("{file}-key.pem"), &key)?,
        });
    }
    Ok(DevCerts {
        cluster_ca: write("cluster-ca.pem", &cluster_ca.pem())?,
        cluster_cert: write("cluster.pem", &cluster_cert)?,
        cluster_key: write("cluster-key.pem", &cluster_key)?,
        agent_cert: write("agent.pem", &agent_cert)?,
        agent_key: write("agent-key.pem", &agent_key)?,
        frontend_ca: write("frontend-ca.pem", &frontend_ca.pem())?,
        frontend_cert: write("frontend.pem", &frontend_cert)?,
        frontend_key: write("frontend-key.pem", &frontend_key)?,
        client_cert: write("client.pem", &client_cert)?,
        client_key: write("client-key.pem", &client_key)?,
        nodes: node_certs,
    })
}
