//! TLS: rustls configurations built from PEM files (mutual TLS everywhere Spoke speaks TLS), and the
//! handshakes on both sides with their deadline and the settings every TLS connection gets.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::{TlsAcceptor, server};

/// Largest amount of application data rustls may hold unsent per connection (its default is 64 KiB):
/// bulk streams then write more records per system call.
pub const TLS_SEND_BUFFER: usize = 256 * 1024;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("read {kind} from {path}: {source}")]
    Pem {
        /// What the file should hold.
        kind: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The file holds no certificate.
    #[error("no certificate in {0}")]
    NoCertificate(PathBuf),
    /// rustls refused the certificates or key.
    #[error("{context}: {source}")]
    Rustls {
        /// Which configuration.
        context: &'static str,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// The client-certificate verifier could not be built (e.g. an unusable CA).
    #[error("client certificate verifier from {path}: {source}")]
    Verifier {
        /// The CA bundle.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
}

/// Result of this module.
pub type Result<T, E = TlsError> = std::result::Result<T, E>;

/// Paths of one side's TLS material: its certificate chain, its key, and the CA that signs its peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM CA bundle that peers' certificates must chain to.
    pub ca: PathBuf,
    /// PEM certificate chain presented to peers.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
}

/// ring's cipher suites with AES-128-GCM/SHA-256 first. Every data connection runs a (resumed)
/// handshake on the open path's refill, and the TLS 1.3 key schedule is a dozen HKDF steps: with
/// SHA-256 they run on the CPU's SHA extensions, where ring computes SHA-384 in plain code (the
/// profile of a 16-way open showed SHA-512 blocks as the largest user-space cost after X25519).
/// AES-128-GCM also moves bulk bytes faster, at a security level well above what the tunnel needs.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    // A stable sort: the others keep ring's order.
    provider.cipher_suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// ring's provider with `suite` only.
fn provider_offering(suite: rustls::CipherSuite) -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.retain(|s| s.suite() == suite);
    Arc::new(provider)
}

/// ring's provider with [`super::ktls::KERNEL_SUITE`] only: what an agent offers on a data connection
/// it wants carried by kernel TLS, which the server can only accept with that suite.
fn kernel_provider() -> Arc<rustls::crypto::CryptoProvider> {
    provider_offering(super::ktls::KERNEL_SUITE)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|source| TlsError::Pem { kind: "certificates", path: path.into(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.into()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Pem {
        kind: "private key",
        path: path.into(),
        source,
    })
}

fn read_roots(path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|source| TlsError::Rustls { context: "add CA certificate", source })?;
    }
    Ok(roots)
}

/// Which TLS versions a listener accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Versions {
    /// TLS 1.3 only (Spoke's own agents).
    Tls13,
    /// TLS 1.2 and 1.3 (kube-apiserver and other HTTP-CONNECT clients).
    Tls12And13,
}

/// A server configuration that verifies client certificates against `files.ca` (requiring one unless
/// `clients` says otherwise), and issues TLS 1.3
/// session tickets so that clients resume instead of repeating the full handshake.
pub fn server_config(
    files: &TlsFiles,
    versions: Versions,
    clients: ClientCerts,
) -> Result<Arc<rustls::ServerConfig>> {
    server_config_with(files, versions, clients, provider())
}

fn server_config_with(
    files: &TlsFiles,
    versions: Versions,
    clients: ClientCerts,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<rustls::ServerConfig>> {
    let builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(read_roots(&files.ca)?), provider.clone());
    let builder = match clients {
        ClientCerts::Required => builder,
        ClientCerts::Optional => builder.allow_unauthenticated(),
    };
    let verifier = builder.build().map_err(|source| TlsError::Verifier { path: files.ca.clone(), source })?;
    let protocols: &[&rustls::SupportedProtocolVersion] = match versions {
        Versions::Tls13 => &[&rustls::version::TLS13],
        Versions::Tls12And13 => &[&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(protocols)
        .map_err(|source| TlsError::Rustls { context: "server protocol versions", source })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(read_certs(&files.cert)?, read_key(&files.key)?)
        .map_err(|source| TlsError::Rustls { context: "server certificate", source })?;
    config.ticketer = rustls::crypto::ring::Ticketer::new()
        .map_err(|source| TlsError::Rustls { context: "session ticketer", source })?;
    // Kernel TLS takes a link's traffic secrets after the handshake (`ktls`).
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// Whether a server requires its clients' certificates. A certificate that is presented is always
/// verified against the CA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientCerts {
    /// Every client presents one.
    Required,
    /// Clients may present none (they authenticate otherwise, as agents with a token do).
    Optional,
}

/// A TLS 1.3 client configuration presenting `files.cert`, trusting only `files.ca`. One instance is
/// shared by every connection to a server so its session cache makes refills resume.
pub fn client_config(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>> {
    client_config_with(files, provider())
}

/// [`client_config`] offering only `suite` (as an agent that wants kernel TLS offers only the kernel's;
/// tests and fuzz targets that seal records themselves must know the AEAD).
pub fn client_config_offering(
    files: &TlsFiles,
    suite: rustls::CipherSuite,
) -> Result<Arc<rustls::ClientConfig>> {
    client_config_with(files, provider_offering(suite))
}

fn client_config_with(
    files: &TlsFiles,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<rustls::ClientConfig>> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls { context: "client protocol versions", source })?
        .with_root_certificates(read_roots(&files.ca)?)
        .with_client_auth_cert(read_certs(&files.cert)?, read_key(&files.key)?)
        .map_err(|source| TlsError::Rustls { context: "client certificate", source })?;
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// A TLS 1.3 client configuration that presents no certificate (the client proves itself otherwise),
/// trusting only `ca`.
pub fn anonymous_client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>> {
    anonymous_client_config_with(ca, provider())
}

fn anonymous_client_config_with(
    ca: &Path,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<rustls::ClientConfig>> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls { context: "client protocol versions", source })?
        .with_root_certificates(read_roots(ca)?)
        .with_no_client_auth();
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// How often at most [`ClientTls`] checks whether its files changed.
pub const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The modification time and size of the certificate and key files (following symbolic links, as the
/// kubelet's `kubelet-client-current.pem` is one): a change means they were rewritten.
type Stamp = [(Option<std::time::SystemTime>, u64); 2];

fn stamp(files: &TlsFiles) -> Stamp {
    [&files.cert, &files.key].map(|path| match std::fs::metadata(path) {
        Ok(meta) => (meta.modified().ok(), meta.len()),
        Err(_) => (None, 0),
    })
}

/// A client configuration rebuilt from its files when they change, so that a certificate the kubelet
/// rotates is taken up without a restart; connections already open keep theirs. The check runs at most
/// once per [`CERT_CHECK_INTERVAL`], when a connection is about to be made.
///
/// The whole configuration is rebuilt, session cache included: TLS 1.3 resumption presents no
/// certificate, and tickets from sessions of the old certificate would carry its identity on, each
/// resumed connection receiving fresh ones. A pair that does not load (a rotation caught halfway, whose
/// key does not match its certificate) leaves the last good configuration in use, with a warning.
#[derive(Debug)]
pub struct ClientTls {
    /// `None` for a client that presents no certificate (nothing to reload).
    files: Option<TlsFiles>,
    state: std::sync::Mutex<ClientState>,
    /// Bumped at every reload, so that connections made before can be told apart.
    generation: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct ClientState {
    config: Arc<rustls::ClientConfig>,
    /// The same, offering only the kernel's cipher suite.
    kernel: Arc<rustls::ClientConfig>,
    stamp: Stamp,
    checked: std::time::Instant,
}

impl ClientTls {
    /// Reads the files now; a failure here is a configuration error.
    pub fn load(files: &TlsFiles) -> Result<Self> {
        let stamp = stamp(files);
        let (config, kernel) = (client_config(files)?, client_config_with(files, kernel_provider())?);
        let state = ClientState { config, kernel, stamp, checked: std::time::Instant::now() };
        Ok(Self { files: Some(files.clone()), state: std::sync::Mutex::new(state), generation: 0.into() })
    }

    /// A client that presents no certificate, trusting `ca`.
    pub fn anonymous(ca: &Path) -> Result<Self> {
        let (config, kernel) =
            (anonymous_client_config(ca)?, anonymous_client_config_with(ca, kernel_provider())?);
        let state =
            ClientState { config, kernel, stamp: Stamp::default(), checked: std::time::Instant::now() };
        Ok(Self { files: None, state: std::sync::Mutex::new(state), generation: 0.into() })
    }

    /// How many times the certificate was reloaded, after looking whether the files changed: a connection
    /// made at another generation presents another certificate than the next one would.
    pub fn generation(&self) -> u64 {
        drop(self.config(false));
        self.generation.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The configuration for the next connection, offering only the kernel's cipher suite with
    /// `kernel_suite`: rebuilt first if the files changed.
    pub fn config(&self, kernel_suite: bool) -> Arc<rustls::ClientConfig> {
        let mut state = self.state.lock().expect("client TLS lock poisoned");
        let pick =
            |state: &ClientState| if kernel_suite { state.kernel.clone() } else { state.config.clone() };
        let Some(files) = &self.files else { return pick(&state) };
        if state.checked.elapsed() < CERT_CHECK_INTERVAL {
            return pick(&state);
        }
        state.checked = std::time::Instant::now();
        let now = stamp(files);
        if now == state.stamp {
            return pick(&state);
        }
        // Stamped either way: a pair caught halfway is read again once the other file changes too.
        state.stamp = now;
        match client_config(files).and_then(|c| Ok((c, client_config_with(files, kernel_provider())?))) {
            Ok((config, kernel)) => {
                tracing::info!(cert = %files.cert.display(), "client certificate reloaded");
                (state.config, state.kernel) = (config, kernel);
                self.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(error) => {
                tracing::warn!(%error, "client certificate changed but does not load: keeping the last good one");
            }
        }
        pick(&state)
    }
}

/// For tests of agent links: development certificates in `dir`, the server's configuration (TLS 1.3,
/// client certificates required) and the agent's certificate files.
#[cfg(test)]
pub(crate) fn test_pki(dir: &Path) -> (Arc<rustls::ServerConfig>, TlsFiles) {
    let certs = crate::devcerts::generate(dir, &[], &[]).expect("development certificates");
    let server = server_config(
        &TlsFiles { ca: certs.cluster_ca.clone(), cert: certs.cluster_cert, key: certs.cluster_key },
        Versions::Tls13,
        ClientCerts::Required,
    )
    .expect("server configuration");
    (server, TlsFiles { ca: certs.cluster_ca, cert: certs.agent_cert, key: certs.agent_key })
}

/// For tests of agent links against other TLS stacks: [`test_pki`]'s server and agent configurations,
/// both with only the cipher suites of `provider`.
#[cfg(test)]
pub(crate) fn test_configs(
    dir: &Path,
    provider: rustls::crypto::CryptoProvider,
) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let certs = crate::devcerts::generate(dir, &[], &[]).expect("development certificates");
    let provider = Arc::new(provider);
    let server = server_config_with(
        &TlsFiles { ca: certs.cluster_ca.clone(), cert: certs.cluster_cert, key: certs.cluster_key },
        Versions::Tls13,
        ClientCerts::Required,
        provider.clone(),
    )
    .expect("server configuration");
    let agent = TlsFiles { ca: certs.cluster_ca, cert: certs.agent_cert, key: certs.agent_key };
    (server, client_config_with(&agent, provider).expect("client configuration"))
}

/// Why a TLS handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The peer did not finish the handshake by the deadline.
    #[error("TLS handshake timed out")]
    Timeout,
    /// The handshake failed (bad certificate, protocol error, connection lost).
    #[error("TLS handshake: {0}")]
    Failed(#[source] io::Error),
}

/// Accepts a TLS handshake on `tcp` by `deadline`.
pub async fn accept(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    deadline: Instant,
) -> Result<server::TlsStream<TcpStream>, HandshakeError> {
    let mut conn = tokio::time::timeout_at(deadline, acceptor.accept(tcp))
        .await
        .map_err(|_| HandshakeError::Timeout)?
        .map_err(HandshakeError::Failed)?;
    conn.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER));
    Ok(conn)
}

/// The names a peer's certificate carries: the subject's common names, then its DNS subject alternative
/// names. Empty when the peer sent no certificate or one that does not parse (rustls verified the
/// chain already; this only reads the names).
#[must_use]
pub fn peer_names(conn: &rustls::CommonState) -> Vec<String> {
    let Some(cert) = conn.peer_certificates().and_then(<[_]>::first) else { return Vec::new() };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(cert.as_ref()) else { return Vec::new() };
    let common = cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok().map(str::to_owned));
    let mut names: Vec<String> = common.collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push((*dns).to_owned());
            }
        }
    }
    names
}

/// The Kubernetes node a peer's certificate names: subject `CN=system:node:<name>` with
/// `O=system:nodes`, as kubelets' client certificates carry. `None` for any other certificate.
#[must_use]
pub fn peer_node(chain: &[CertificateDer<'_>]) -> Option<String> {
    let cert = chain.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let subject = cert.subject();
    if !subject.iter_organization().any(|o| o.as_str() == Ok(NODES_GROUP)) {
        return None;
    }
    let mut names =
        subject.iter_common_name().filter_map(|cn| cn.as_str().ok()?.strip_prefix(NODE_USER_PREFIX));
    match (names.next(), names.next()) {
        (Some(name), None) if !name.is_empty() => Some(name.to_owned()),
        _ => None,
    }
}

/// What a peer's certificate says that outlives the handshake, read once there.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// The node it names ([`peer_node`]).
    pub node: Option<String>,
    /// The end of its validity (`notAfter`). A resumed handshake presents no certificate and carries
    /// the first one's on, so this is checked again whenever the connection is put to a new use.
    pub not_after: Option<std::time::SystemTime>,
}

impl Peer {
    /// The facts of `chain` (the peer's first certificate).
    #[must_use]
    pub fn of(chain: Option<&[CertificateDer<'_>]>) -> Self {
        let Some(chain) = chain else { return Self::default() };
        let not_after = chain.first().and_then(|cert| {
            let (_, cert) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
            let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
            Some(std::time::UNIX_EPOCH + Duration::from_secs(secs))
        });
        Self { node: peer_node(chain), not_after }
    }

    /// Whether the certificate has expired by `now` (a peer without one never has).
    #[must_use]
    pub fn expired(&self, now: std::time::SystemTime) -> bool {
        self.not_after.is_some_and(|end| end < now)
    }
}

/// The organization of kubelets' client certificates.
pub const NODES_GROUP: &str = "system:nodes";
/// The common-name prefix of kubelets' client certificates, before the node's name.
pub const NODE_USER_PREFIX: &str = "system:node:";

#[cfg(test)]
mod tests {
    #[test]
    fn aes_128_gcm_sha256_is_preferred_and_the_other_suites_stay() {
        let suites: Vec<_> =
            super::provider().cipher_suites.iter().map(rustls::SupportedCipherSuite::suite).collect();
        assert_eq!(suites[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(suites.len(), rustls::crypto::ring::ALL_CIPHER_SUITES.len());
    }
}
