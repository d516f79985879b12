//! A real Kubernetes control plane on loopback for the end-to-end suite (`cargo xtask e2e`): etcd and
//! kube-apiserver as `cargo xtask e2e` provides them (`SPOKE_KUBE_APISERVER`, `SPOKE_ETCD`,
//! `SPOKE_KUBECTL`), a PKI of the cluster's own, kubeconfigs for its users, and kubectl to drive it.
//!
//! The apiserver runs as a kubeadm cluster's does where Spoke is concerned: Node and RBAC
//! authorization, `NodeRestriction`, the kubelet's serving certificate verified, service-account tokens
//! signed, and its `cluster` egress sent through spoke-server by an `EgressSelectorConfiguration` made
//! from deploy/'s.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject as _;

/// How long the control plane has to come up.
const START_TIMEOUT: Duration = Duration::from_mins(2);

/// A binary `cargo xtask e2e` names in the environment variable `var`; fails the test without it (the
/// suite never skips: it is run by `cargo xtask e2e`, which provides them).
#[must_use]
pub fn binary(var: &str) -> PathBuf {
    let path = std::env::var_os(var).map_or_else(
        || panic!("{var} is not set: the real-apiserver suite runs under `cargo xtask e2e`, which builds and names it"),
        PathBuf::from,
    );
    assert!(path.is_file(), "{var}={} is not a file", path.display());
    path
}

/// A TCP port free on 127.0.0.1 now. etcd and kube-apiserver take a port number, not a listener, and
/// do not report what they bound: this is the one place a port is picked rather than bound as 0.
#[must_use]
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind 127.0.0.1:0").port()
}

/// A certificate and key written as PEM files.
#[derive(Clone, Debug)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The cluster's CA, which signs everything: the apiserver's and kubelets' serving certificates, and
/// the client certificates of the admin, the spoke-server user, the kubelets and the apiserver's
/// kubelet client.
pub struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate.
    pub ca_file: PathBuf,
}

impl Pki {
    /// A new CA in `dir`.
    #[must_use]
    pub fn new(dir: &Path) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, "kubernetes");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).expect("write CA");
        Self { dir: dir.to_owned(), ca, ca_file }
    }

    /// A leaf certificate `name` (files `<name>.pem`, `<name>-key.pem`) for `common_name` in
    /// `organization`, with `sans` (addresses or DNS names) and extended key `usages`.
    #[must_use]
    pub fn issue(
        &self,
        name: &str,
        common_name: &str,
        organization: Option<&str>,
        sans: &[&str],
        usages: &[ExtendedKeyUsagePurpose],
    ) -> Pair {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, common_name);
        if let Some(o) = organization {
            params.distinguished_name.push(DnType::OrganizationName, o);
        }
        for san in sans {
            params.subject_alt_names.push(match san.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*san).to_owned().try_into().expect("DNS name")),
            });
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = usages.to_vec();
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.ca).expect("sign");
        let pair = Pair {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
        };
        std::fs::write(&pair.cert, cert.pem()).expect("write cert");
        std::fs::write(&pair.key, key.serialize_pem()).expect("write key");
        pair
    }

    /// A client certificate for user `common_name` in group `organization`.
    #[must_use]
    pub fn client(&self, name: &str, common_name: &str, organization: Option<&str>) -> Pair {
        self.issue(name, common_name, organization, &[], &[ExtendedKeyUsagePurpose::ClientAuth])
    }

    /// A serving certificate for `sans`.
    #[must_use]
    pub fn serving(&self, name: &str, sans: &[&str]) -> Pair {
        self.issue(name, name, None, sans, &[ExtendedKeyUsagePurpose::ServerAuth])
    }
}

/// A child process killed (and reaped) on drop, its output in a log file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub(crate) name: String,
}

impl Proc {
    /// Starts `program` with `args`, stdout and stderr into `<dir>/<name>.log`.
    #[must_use]
    pub fn spawn(dir: &Path, name: &str, program: &Path, args: &[String]) -> Self {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("create log");
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        Self { child, log, name: name.to_owned() }
    }

    /// The log so far, for assertion messages.
    #[must_use]
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the log if the process has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited ({status}):\n{}", self.name, tail(&self.log_text()));
        }
    }

    /// Sends SIGTERM and waits for the exit, at most `within`.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last lines of a log.
#[must_use]
pub fn tail(text: &str) -> String {
    // kube-apiserver starts by printing each of its flags: not what a failure needs.
    let lines: Vec<&str> = text.lines().filter(|l| !l.contains("flags.go")).collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Where kube-apiserver sends its `cluster` egress.
#[derive(Clone, Debug)]
pub enum Egress {
    /// spoke-server's Unix socket (`transport.uds`).
    Uds(PathBuf),
    /// spoke-server's Unix socket with `proxyProtocol: GRPC`, as Konnectivity's setup guide configures.
    GrpcUds(PathBuf),
    /// spoke-server's TCP frontend with mTLS (`transport.tcp` with `tlsConfig`).
    Mtls {
        /// `https://127.0.0.1:PORT`.
        url: String,
        /// The CA of the frontend's serving certificate.
        ca: PathBuf,
        /// The apiserver's client certificate.
        client: Pair,
    },
}

/// A running etcd and kube-apiserver.
pub struct ControlPlane {
    pub dir: PathBuf,
    pub pki: Pki,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// The admin's kubeconfig (`system:masters`).
    pub admin: PathBuf,
    /// The kubeconfig of the user `spoke-server` (what deploy/'s RBAC grants).
    pub spoke_server: PathBuf,
    pub kubectl: PathBuf,
    pub apiserver: Proc,
    pub etcd: Proc,
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver in `dir`, the apiserver's `cluster` egress through `egress`, and
    /// waits until the apiserver is ready.
    #[must_use]
    pub fn start(dir: &Path, egress: &Egress) -> Self {
        let pki = Pki::new(dir);
        let serving =
            pki.serving("apiserver", &["127.0.0.1", "localhost", "kubernetes", "kubernetes.default"]);
        let kubelet_client =
            pki.client("apiserver-kubelet-client", "kube-apiserver-kubelet-client", Some("system:masters"));
        let admin_pair = pki.client("admin", "kubernetes-admin", Some("system:masters"));
        let spoke_pair = pki.client("spoke-server-user", "spoke-server", None);
        // The service-account token signing key (PKCS#8) and its public key, which verifies tokens.
        let (sa_key, sa_pub) = (dir.join("sa-key.pem"), dir.join("sa-pub.pem"));
        let signing = KeyPair::generate().expect("key");
        std::fs::write(&sa_key, signing.serialize_pem()).expect("write sa key");
        std::fs::write(&sa_pub, signing.public_key_pem()).expect("write sa public key");
        let egress_file = dir.join("egress-selector-configuration.yaml");
        std::fs::write(&egress_file, egress_configuration(egress)).expect("write egress configuration");

        let (client_port, peer_port, secure_port) = (free_port(), free_port(), free_port());
        let etcd_dir = dir.join("etcd");
        let etcd = Proc::spawn(
            dir,
            "etcd",
            &binary("SPOKE_ETCD"),
            &[
                format!("--data-dir={}", etcd_dir.display()),
                "--name=e2e".into(),
                format!("--listen-client-urls=http://127.0.0.1:{client_port}"),
                format!("--advertise-client-urls=http://127.0.0.1:{client_port}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-cluster=e2e=http://127.0.0.1:{peer_port}"),
                "--log-level=warn".into(),
            ],
        );
        let p = |p: &Path| p.display().to_string();
        let apiserver = Proc::spawn(
            dir,
            "kube-apiserver",
            &binary("SPOKE_KUBE_APISERVER"),
            &[
                format!("--etcd-servers=http://127.0.0.1:{client_port}"),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={secure_port}"),
                "--advertise-address=127.0.0.1".into(),
                "--endpoint-reconciler-type=none".into(),
                format!("--tls-cert-file={}", p(&serving.cert)),
                format!("--tls-private-key-file={}", p(&serving.key)),
                format!("--client-ca-file={}", p(&pki.ca_file)),
                format!("--service-account-key-file={}", p(&sa_pub)),
                format!("--service-account-signing-key-file={}", p(&sa_key)),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                "--service-cluster-ip-range=10.96.0.0/16".into(),
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                // No controller-manager makes service-account token secrets here.
                "--disable-admission-plugins=ServiceAccount".into(),
                format!("--kubelet-certificate-authority={}", p(&pki.ca_file)),
                format!("--kubelet-client-certificate={}", p(&kubelet_client.cert)),
                format!("--kubelet-client-key={}", p(&kubelet_client.key)),
                "--kubelet-preferred-address-types=InternalIP".into(),
                format!("--egress-selector-config-file={}", p(&egress_file)),
                "--v=1".into(),
            ],
        );
        let url = format!("https://127.0.0.1:{secure_port}");
        let mut plane = Self {
            admin: kubeconfig(dir, "admin", &url, &pki.ca_file, &admin_pair),
            spoke_server: kubeconfig(dir, "spoke-server", &url, &pki.ca_file, &spoke_pair),
            dir: dir.to_owned(),
            pki,
            url,
            kubectl: binary("SPOKE_KUBECTL"),
            apiserver,
            etcd,
        };
        plane.wait_ready();
        plane
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.etcd.assert_running();
            self.apiserver.assert_running();
            let out = self.kubectl_as(&self.admin.clone(), &["get", "--raw", "/readyz"]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready:\n{}",
                tail(&self.apiserver.log_text())
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// A kubeconfig for a node's kubelet (`system:node:<node>` in `system:nodes`), and its client pair
    /// (the agent's node certificate too).
    #[must_use]
    pub fn kubelet_user(&self, node: &str) -> (PathBuf, Pair) {
        let pair =
            self.pki.client(&format!("kubelet-{node}"), &format!("system:node:{node}"), Some("system:nodes"));
        (kubeconfig(&self.dir, &format!("kubelet-{node}"), &self.url, &self.pki.ca_file, &pair), pair)
    }

    /// kubectl as the admin.
    #[must_use]
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_as(&self.admin, args)
    }

    /// kubectl with `kubeconfig`, bounded to 60 s.
    #[must_use]
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str]) -> Output {
        Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--request-timeout=60s")
            .args(args)
            .output()
            .expect("run kubectl")
    }

    /// kubectl as the admin, failing the test unless it succeeds; its stdout.
    #[allow(clippy::must_use_candidate, reason = "run for its effect; the output is there for who wants it")]
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        ok(&self.kubectl(args), args)
    }

    /// Applies `json` as the user of `kubeconfig`.
    pub fn apply_as(&self, kubeconfig: &Path, json: &serde_json::Value) {
        let file = self.dir.join(format!("object-{}.json", fastrand_name()));
        std::fs::write(&file, json.to_string()).expect("write object");
        ok(
            &self.kubectl_as(kubeconfig, &["apply", "-f", &file.display().to_string()]),
            &["apply", json["kind"].as_str().unwrap_or("")],
        );
    }

    /// Registers Node `name` as its kubelet does (the kubelet's own credentials), with `addresses`
    /// (type, address) and the kubelet's port, and returns the kubelet's kubeconfig and client pair.
    #[must_use]
    pub fn register_node(
        &self,
        name: &str,
        addresses: &[(&str, &str)],
        kubelet_port: u16,
    ) -> (PathBuf, Pair) {
        let (kubeconfig, pair) = self.kubelet_user(name);
        let node = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "status": {
                "addresses": addresses.iter().map(|(t, a)| serde_json::json!({"type": t, "address": a})).collect::<Vec<_>>(),
                "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
            },
        });
        let file = self.dir.join(format!("node-{name}.json"));
        std::fs::write(&file, node.to_string()).expect("write node");
        ok(
            &self.kubectl_as(&kubeconfig, &["create", "-f", &file.display().to_string()]),
            &["create node", name],
        );
        (kubeconfig, pair)
    }

    /// A pod `name` in `namespace` on `node`, as the scheduler leaves it (`spec.nodeName` set), with one
    /// container `c`; returns its uid.
    #[allow(clippy::must_use_candidate, reason = "run for its effect; the output is there for who wants it")]
    pub fn pod_on(&self, namespace: &str, name: &str, node: &str, service_account: Option<&str>) -> String {
        let mut spec = serde_json::json!({"nodeName": node, "containers": [{"name": "c", "image": "e2e"}]});
        if let Some(sa) = service_account {
            spec["serviceAccountName"] = serde_json::json!(sa);
        }
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        });
        self.apply_as(&self.admin, &pod);
        self.kubectl_ok(&["get", "pod", "-n", namespace, name, "-o", "jsonpath={.metadata.uid}"])
    }
}

/// The stdout of a successful kubectl run, or a failed test naming `what`.
#[allow(clippy::must_use_candidate, reason = "run for its effect; the output is there for who wants it")]
pub fn ok(out: &Output, what: &[&str]) -> String {
    assert!(
        out.status.success(),
        "kubectl {what:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fastrand_name() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A kubeconfig `<name>.kubeconfig` for `pair` at `url`.
#[must_use]
pub fn kubeconfig(dir: &Path, name: &str, url: &str, ca: &Path, pair: &Pair) -> PathBuf {
    let path = dir.join(format!("{name}.kubeconfig"));
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {url}\n    certificate-authority: {}\n\
         users:\n- name: {name}\n  user:\n    client-certificate: {}\n    client-key: {}\n\
         contexts:\n- name: e2e\n  context:\n    cluster: e2e\n    user: {name}\ncurrent-context: e2e\n",
        ca.display(),
        pair.cert.display(),
        pair.key.display()
    );
    std::fs::write(&path, text).expect("write kubeconfig");
    path
}

/// deploy/server/egress-selector-configuration.yaml with its socket path replaced, or its `uds`
/// transport replaced by mTLS TCP.
#[must_use]
pub fn egress_configuration(egress: &Egress) -> String {
    let deployed = std::fs::read_to_string(repo().join("deploy/server/egress-selector-configuration.yaml"))
        .expect("read deploy/server/egress-selector-configuration.yaml");
    let uds = "        uds:\n          udsName: /etc/kubernetes/spoke/socket/spoke.sock\n";
    assert!(deployed.contains(uds), "deploy's egress configuration changed shape:\n{deployed}");
    let transport = match egress {
        Egress::Uds(path) => format!("        uds:\n          udsName: {}\n", path.display()),
        Egress::GrpcUds(path) => {
            let http_connect = "      proxyProtocol: HTTPConnect\n";
            assert!(
                deployed.contains(http_connect),
                "deploy's egress configuration changed shape:\n{deployed}"
            );
            let uds = format!("        uds:\n          udsName: {}\n", path.display());
            return deployed
                .replace(http_connect, "      proxyProtocol: GRPC\n")
                .replace("        uds:\n          udsName: /etc/kubernetes/spoke/socket/spoke.sock\n", &uds);
        }
        Egress::Mtls { url, ca, client } => format!(
            "        tcp:\n          url: {url}\n          tlsConfig:\n            caBundle: {}\n            \
             clientKey: {}\n            clientCert: {}\n",
            ca.display(),
            client.key.display(),
            client.cert.display()
        ),
    };
    deployed.replace(uds, &transport)
}

/// The repository's root.
#[must_use]
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the repository").to_owned()
}

/// A loopback address of its own for node `index` (127.0.0.2, 127.0.0.3, …).
#[must_use]
pub fn node_address(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + index)
}

/// Waits until `cond` holds, at most `within`; panics naming `what`.
pub fn eventually(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A socket address on loopback `ip` with a port the kernel picked.
#[must_use]
pub fn loopback(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::from((ip, 0))
}

/// An HTTP/1.1 connection to the apiserver over TLS with a client certificate, kept alive for many
/// requests (as a client of the apiserver does); blocking, each read bounded.
pub struct ApiConn {
    tls: rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
    buf: Vec<u8>,
}

impl ApiConn {
    /// Connects to the apiserver at `url` as the user of `pair`, trusting `ca`.
    #[must_use]
    pub fn connect(url: &str, ca: &Path, pair: &Pair) -> Self {
        let addr: SocketAddr = url.trim_start_matches("https://").parse().expect("apiserver address");
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).expect("CA").flatten() {
            roots.add(cert).expect("CA certificate");
        }
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(&pair.cert)
            .expect("client certificate")
            .collect::<Result<Vec<_>, _>>()
            .expect("client certificate");
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&pair.key).expect("client key");
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .expect("client TLS configuration");
        let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("TLS client");
        let tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .expect("connect to the apiserver");
        tcp.set_read_timeout(Some(Duration::from_mins(1))).expect("read timeout");
        tcp.set_nodelay(true).expect("nodelay");
        Self { tls: rustls::StreamOwned::new(conn, tcp), buf: Vec::new() }
    }

    /// Sends `method path` with `headers` and no body; returns the status and the response head's
    /// headers, leaving the body unread.
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<(u16, Vec<(String, String)>)> {
        self.send_body(method, path, headers, b"")
    }

    /// [`Self::send`] with a request body.
    pub fn send_body(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<(u16, Vec<(String, String)>)> {
        use std::fmt::Write as _;
        use std::io::{Read as _, Write as _};
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
        for (k, v) in headers {
            let _ = write!(req, "{k}: {v}\r\n");
        }
        if !body.is_empty() {
            let _ = write!(req, "Content-Length: {}\r\n", body.len());
        }
        req.push_str("\r\n");
        self.tls.write_all(req.as_bytes())?;
        self.tls.write_all(body)?;
        self.tls.flush()?;
        loop {
            let mut parsed = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut parsed);
            if let Ok(httparse::Status::Complete(len)) = resp.parse(&self.buf) {
                let code = resp.code.unwrap_or(0);
                let headers = resp
                    .headers
                    .iter()
                    .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
                    .collect();
                self.buf.drain(..len);
                return Ok((code, headers));
            }
            let mut chunk = [0u8; 8192];
            let n = self.tls.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// GET `path`: the status and the whole body (`Content-Length` or chunked).
    pub fn get(&mut self, path: &str) -> std::io::Result<(u16, String)> {
        self.request("GET", path, &[], b"")
    }

    /// `method path` with `headers` and `body`: the status and the whole response body.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<(u16, String)> {
        let (code, headers) = self.send_body(method, path, headers, body)?;
        let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let body = if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            self.take(len)?
        } else if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            let mut body = Vec::new();
            loop {
                let line = self.line()?;
                let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
                body.extend(self.take(size)?);
                self.line()?;
                if size == 0 {
                    break;
                }
            }
            body
        } else {
            Vec::new()
        };
        Ok((code, String::from_utf8_lossy(&body).into_owned()))
    }

    /// Writes raw bytes (after an upgrade).
    pub fn write_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write as _;
        self.tls.write_all(bytes)?;
        self.tls.flush()
    }

    /// Reads exactly `n` bytes (what was buffered first).
    pub fn take(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        use std::io::Read as _;
        while self.buf.len() < n {
            let mut chunk = [0u8; 8192];
            let got = self.tls.read(&mut chunk)?;
            if got == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..got]);
        }
        Ok(self.buf.drain(..n).collect())
    }

    fn line(&mut self) -> std::io::Result<String> {
        use std::io::Read as _;
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 2);
                return Ok(line);
            }
            let mut chunk = [0u8; 8192];
            let got = self.tls.read(&mut chunk)?;
            if got == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..got]);
        }
    }
}
