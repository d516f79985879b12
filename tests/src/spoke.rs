//! Spoke's own processes for the real-apiserver suite: spoke-server and spoke-agent as deployed
//! (`SPOKE_SERVER_BIN`, `SPOKE_AGENT_BIN`), their "started" lines read for the bound addresses, and
//! their admin endpoints asked for readiness and metrics.

use std::io::{BufRead as _, Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::kube::{Proc, binary, tail};

/// How long a Spoke process has to print its "started" line.
const STARTED_TIMEOUT: Duration = Duration::from_secs(30);

/// A Spoke process with the addresses its "started" line named.
pub struct Running {
    pub proc: Proc,
    /// `key=value` pairs of the "started" line.
    pub started: Vec<(String, String)>,
}

impl Running {
    /// Starts `bin` (`SPOKE_SERVER_BIN` or `SPOKE_AGENT_BIN`) with `args`, logging to `<dir>/<name>.log`,
    /// and waits for its "started" line on stdout.
    #[must_use]
    pub fn start(dir: &Path, name: &str, bin_var: &str, args: &[String]) -> Self {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("create log");
        let mut child = Command::new(binary(bin_var))
            .args(args)
            .env("RUST_LOG", std::env::var("SPOKE_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(file)
            .spawn()
            .expect("start a Spoke binary");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        let proc = Proc { child, log, name: name.to_owned() };
        let Ok(Some(Ok(line))) = rx.recv_timeout(STARTED_TIMEOUT) else {
            panic!("{name} printed no started line:\n{}", tail(&proc.log_text()));
        };
        let started = line
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Self { proc, started }
    }

    /// The value of `key` in the "started" line.
    #[must_use]
    pub fn get(&self, key: &str) -> String {
        self.started
            .iter()
            .find(|(k, _)| k == key)
            .map_or_else(|| panic!("no {key}= in {:?}", self.started), |(_, v)| v.clone())
    }

    /// The admin endpoint.
    #[must_use]
    pub fn admin(&self) -> SocketAddr {
        self.get("admin").parse().expect("admin address")
    }

    /// The sum of the metric lines starting with `prefix` (every label of a counter).
    #[must_use]
    pub fn metric_sum(&self, prefix: &str) -> u64 {
        let body = http_get(self.admin(), "/metrics").map(|(_, b)| b).unwrap_or_default();
        body.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// The value of the first metric line starting with `prefix` (0 if none).
    #[must_use]
    pub fn metric(&self, prefix: &str) -> u64 {
        let body = http_get(self.admin(), "/metrics").map(|(_, b)| b).unwrap_or_default();
        body.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Whether `/readyz` answers 200.
    #[must_use]
    pub fn ready(&self) -> bool {
        http_get(self.admin(), "/readyz").is_some_and(|(code, _)| code == 200)
    }

    /// Waits until `/readyz` answers 200, at most `within`.
    pub fn wait_ready(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.ready() {
            self.proc.assert_running();
            assert!(
                Instant::now() < deadline,
                "{} not ready:\n{}",
                self.proc.log.display(),
                tail(&self.proc.log_text())
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// GET `path` from `addr` over plain HTTP/1.1, bounded: the status and the body.
#[must_use]
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let timeout = Duration::from_secs(5);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_owned());
    Some((code, body))
}

/// spoke-server's arguments as deploy/server/spoke-server.yaml runs it, for this test's files: agents
/// on 127.0.0.1, the admin endpoint on 127.0.0.1, the default `--agent-auth node-cert` and
/// `--agent-claims node-objects`.
#[must_use]
pub fn server_args(uds: &Path, kubeconfig: &Path, ca: &Path, serving: &crate::kube::Pair) -> Vec<String> {
    let p = |p: &Path| p.display().to_string();
    vec![
        "--uds-name".into(),
        p(uds),
        "--kubeconfig".into(),
        p(kubeconfig),
        "--cluster-ca-cert".into(),
        p(ca),
        "--cluster-cert".into(),
        p(&serving.cert),
        "--cluster-key".into(),
        p(&serving.key),
        "--agent-bind".into(),
        "127.0.0.1:0".into(),
        "--admin-bind".into(),
        "127.0.0.1:0".into(),
        "--heartbeat-interval".into(),
        "1s".into(),
        "--graceful-shutdown-timeout".into(),
        "5s".into(),
    ]
}

/// spoke-agent's arguments for node `node` with its kubelet's client certificate, announcing
/// `address` and allowed to dial only its kubelet there.
#[must_use]
pub fn agent_args(
    server: SocketAddr,
    ca: &Path,
    node: &str,
    pair: &crate::kube::Pair,
    address: &str,
    kubelet_port: u16,
) -> Vec<String> {
    let p = |p: &Path| p.display().to_string();
    vec![
        "--proxy-server-host".into(),
        server.ip().to_string(),
        "--proxy-server-port".into(),
        server.port().to_string(),
        "--ca-cert".into(),
        p(ca),
        "--agent-cert".into(),
        p(&pair.cert),
        "--agent-key".into(),
        p(&pair.key),
        "--node-name".into(),
        node.into(),
        "--agent-identifiers".into(),
        format!("ipv4={address}"),
        "--kubelet-port".into(),
        kubelet_port.to_string(),
        // Loopback addresses are reached only where allowed by name.
        "--allow".into(),
        format!("{address}@{kubelet_port}"),
        "--admin-bind".into(),
        "127.0.0.1:0".into(),
        "--reconnect-max".into(),
        "1s".into(),
        "--graceful-shutdown-timeout".into(),
        "5s".into(),
    ]
}

/// A path for a Unix socket under `dir` (short enough for `sun_path`).
#[must_use]
pub fn socket_path(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    assert!(path.as_os_str().len() < 100, "socket path too long: {}", path.display());
    path
}
