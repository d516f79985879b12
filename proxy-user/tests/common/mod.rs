//! Fixtures for end-to-end tests: real `spoke-server` and `spoke-agent` processes on 127.0.0.1, backends,
//! and an HTTP CONNECT client that speaks exactly like kube-apiserver.
#![allow(dead_code, reason = "each test binary uses a different subset of the fixtures")]

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use spoke::devcerts::{self, DevCerts};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::process::{Child, Command};

/// Path of a Spoke binary: cargo's own for proxy-user's tests, else `env_name` (set by `cargo xtask
/// test` for the privileged tests crate).
fn bin(built: Option<&'static str>, env_name: &str) -> String {
    built
        .map(str::to_owned)
        .or_else(|| std::env::var(env_name).ok())
        .unwrap_or_else(|| panic!("{env_name} is not set: run these tests through `cargo xtask test`"))
}

/// Longest wait for anything a test awaits (a process start, readiness, a reconnect).
pub const WAIT: Duration = Duration::from_secs(20);

/// Nodes that get a node certificate (`--agent-auth node-cert`) in [`certs`]; node-a twice, the second
/// as after a rotation.
pub const NODES: [&str; 3] = ["node-a", "node-b", "node-a"];

/// Development certificates in a temporary directory.
pub struct Certs {
    pub dir: tempfile::TempDir,
    pub files: DevCerts,
}

pub fn certs() -> Arc<Certs> {
    let dir = tempfile::tempdir().expect("temp dir");
    let nodes = NODES.map(String::from);
    let files = devcerts::generate(dir.path(), &[], &nodes).expect("generate dev certs");
    Arc::new(Certs { dir, files })
}

/// A child process whose stderr goes to a file, printed if the test fails.
pub struct Proc {
    pub child: Child,
    log: PathBuf,
    name: &'static str,
}

impl Proc {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the process runs")
    }

    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = self.child.id().expect("process still running");
        let status =
            std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().expect("run kill");
        assert!(status.success());
    }

    /// The process's open file descriptors.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map_or(0, Iterator::count)
    }

    /// The process's resident memory (KiB).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"));
        line.and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap_or(0)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (at most [`WAIT`]) for the process to exit; its exit status.
    pub async fn exited(&mut self) -> std::process::ExitStatus {
        let waited = tokio::time::timeout(WAIT, self.child.wait()).await;
        let Ok(status) = waited else { panic!("{} did not exit in time\n{}", self.name, self.log()) };
        status.expect("wait for the process")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = writeln!(std::io::stderr(), "----- {} log -----\n{}", self.name, self.log());
        }
    }
}

/// Spawns `bin` with `args`, waits for its "started" line on stdout, returns it split in key=value pairs.
/// With a `prefix` (e.g. `ip netns exec NS`), the process runs under that command.
async fn spawn(
    name: &'static str,
    bin: &str,
    args: &[String],
    log_dir: &Path,
    prefix: &[String],
) -> (Proc, Vec<(String, String)>) {
    let log = log_dir.join(format!("{name}-{}.log", fastrand::u32(..)));
    let log_file = std::fs::File::create(&log).expect("create log file");
    let mut command = match prefix.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let mut child = command
        .args(args)
        .env("RUST_LOG", std::env::var("SPOKE_TEST_LOG").unwrap_or_else(|_| "info".into()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line()).await;
    let proc = Proc { child, log, name };
    let line = match line {
        Ok(Ok(Some(line))) => line,
        other => panic!("{name} did not start: {other:?}\n{}", proc.log()),
    };
    // Keep draining stdout so the child never blocks on it.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let pairs = line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    (proc, pairs)
}

fn get(pairs: &[(String, String)], key: &str) -> String {
    pairs.iter().find(|(k, _)| k == key).map_or_else(|| panic!("no {key} in {pairs:?}"), |(_, v)| v.clone())
}

pub struct ServerBuilder {
    certs: Arc<Certs>,
    agent_port: u16,
    tcp_frontend: bool,
    args: Vec<String>,
    switches: Vec<&'static str>,
    /// Command the server runs under (a cgroup's entry).
    prefix: Vec<String>,
}

pub fn server(certs: &Arc<Certs>) -> ServerBuilder {
    ServerBuilder {
        certs: certs.clone(),
        agent_port: 0,
        tcp_frontend: false,
        args: Vec::new(),
        switches: Vec::new(),
        prefix: Vec::new(),
    }
}

pub struct Server {
    pub proc: Proc,
    pub agent_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub frontend_addr: Option<SocketAddr>,
    pub uds: PathBuf,
    pub certs: Arc<Certs>,
}

impl ServerBuilder {
    /// Binds the agent listener to this port (to restart a server where agents expect it).
    pub fn agent_port(mut self, port: u16) -> Self {
        self.agent_port = port;
        self
    }

    pub fn tcp_frontend(mut self) -> Self {
        self.tcp_frontend = true;
        self
    }

    /// Accepts plain (non-TLS) data connections.
    pub fn allow_plaintext_tunnel(mut self) -> Self {
        self.switches.push("--allow-plaintext-tunnel");
        self
    }

    /// Sets `--name value`, replacing the fixture's default for that flag.
    pub fn flag(mut self, name: &str, value: &str) -> Self {
        self.args.push(name.to_owned());
        self.args.push(value.to_owned());
        self
    }

    /// Sets a flag that takes no value.
    pub fn switch(mut self, name: &'static str) -> Self {
        self.switches.push(name);
        self
    }

    /// Runs the server under this command (which ends by running its arguments).
    pub fn under(mut self, command: &[String]) -> Self {
        self.prefix.extend_from_slice(command);
        self
    }

    /// The server's arguments, and the socket path they name.
    fn command_line(&self) -> (Vec<String>, PathBuf) {
        let f = &self.certs.files;
        let uds = self.certs.dir.path().join(format!("spoke-{}.sock", fastrand::u32(..)));
        let p = |p: &Path| p.display().to_string();
        let mut args: Vec<String> = vec![
            "--uds-name".into(),
            p(&uds),
            "--agent-bind".into(),
            format!("127.0.0.1:{}", self.agent_port),
            "--admin-bind".into(),
            "127.0.0.1:0".into(),
            // The fixture's agents share the development certificate unless a test gives them node
            // certificates and sets `--agent-auth node-cert`.
            "--agent-auth".into(),
            "shared-cert".into(),
            // The fixture's agents announce a default route.
            "--default-route-agents".into(),
            "*".into(),
            // There is no apiserver unless a test starts its stand-in (tests/common/apiserver.rs).
            "--agent-claims".into(),
            "trusted".into(),
            "--cluster-ca-cert".into(),
            p(&f.cluster_ca),
            "--cluster-cert".into(),
            p(&f.cluster_cert),
            "--cluster-key".into(),
            p(&f.cluster_key),
            "--heartbeat-interval".into(),
            "500ms".into(),
            "--graceful-shutdown-timeout".into(),
            "5s".into(),
        ];
        if self.tcp_frontend {
            args.extend([
                "--frontend-bind".into(),
                "127.0.0.1:0".into(),
                "--server-ca-cert".into(),
                p(&f.frontend_ca),
                "--server-cert".into(),
                p(&f.frontend_cert),
                "--server-key".into(),
                p(&f.frontend_key),
                "--frontend-allowed-names".into(),
                devcerts::CLIENT_NAME.into(),
            ]);
        }
        override_flags(&mut args, &self.args);
        args.extend(self.switches.iter().map(|s| (*s).to_owned()));
        (args, uds)
    }

    /// Runs the server to its end (one that exits at once: a refused configuration), within [`WAIT`];
    /// its exit status and standard error.
    pub async fn run_to_exit(self) -> (std::process::ExitStatus, String) {
        let (args, _) = self.command_line();
        let mut line = self.prefix.clone();
        line.push(bin(option_env!("CARGO_BIN_EXE_spoke-server"), "SPOKE_SERVER_BIN"));
        line.extend(args);
        let out = Command::new(&line[0]).args(&line[1..]).stdin(Stdio::null()).kill_on_drop(true).output();
        let out = tokio::time::timeout(WAIT, out).await.expect("the server exits").expect("run the server");
        (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
    }

    pub async fn run(self) -> Server {
        let (args, uds) = self.command_line();
        let (proc, pairs) = spawn(
            "spoke-server",
            &bin(option_env!("CARGO_BIN_EXE_spoke-server"), "SPOKE_SERVER_BIN"),
            &args,
            self.certs.dir.path(),
            &self.prefix,
        )
        .await;
        let frontend = get(&pairs, "frontend");
        Server {
            proc,
            agent_addr: get(&pairs, "agent").parse().expect("agent address"),
            admin_addr: get(&pairs, "admin").parse().expect("admin address"),
            frontend_addr: (frontend != "off").then(|| frontend.parse().expect("frontend address")),
            uds,
            certs: self.certs,
        }
    }
}

/// Applies `--flag value` pairs to `args`: replaces the value of a flag already there, else appends.
fn override_flags(args: &mut Vec<String>, overrides: &[String]) {
    for pair in overrides.chunks(2) {
        match args.iter().position(|a| *a == pair[0]) {
            Some(i) => args[i + 1].clone_from(&pair[1]),
            None => args.extend_from_slice(pair),
        }
    }
}

pub struct AgentBuilder {
    certs: Arc<Certs>,
    server: SocketAddr,
    id: String,
    identifiers: String,
    args: Vec<String>,
    /// Flags of the fixture's defaults to leave out.
    without: Vec<&'static str>,
    /// Command the agent runs under (a network namespace, fewer capabilities).
    prefix: Vec<String>,
}

/// An agent for node `id` (address 127.0.0.1 unless `identifiers` says otherwise), allowed to dial
/// loopback addresses.
pub fn agent(server: &Server) -> AgentBuilder {
    AgentBuilder {
        certs: server.certs.clone(),
        server: server.agent_addr,
        id: "node-a".into(),
        identifiers: "ipv4=127.0.0.1&default-route=true".into(),
        args: Vec::new(),
        without: Vec::new(),
        prefix: Vec::new(),
    }
}

pub struct Agent {
    pub proc: Proc,
    pub admin_addr: SocketAddr,
}

impl AgentBuilder {
    pub fn id(mut self, id: &str) -> Self {
        id.clone_into(&mut self.id);
        self
    }

    pub fn identifiers(mut self, ids: &str) -> Self {
        ids.clone_into(&mut self.identifiers);
        self
    }

    /// Replaces the default `--allow 127.0.0.0/8`.
    pub fn allow(self, rule: &str) -> Self {
        self.flag("--allow", rule)
    }

    /// Sets `--name value`, replacing the fixture's default for that flag.
    pub fn flag(mut self, name: &str, value: &str) -> Self {
        self.args.push(name.to_owned());
        self.args.push(value.to_owned());
        self
    }

    /// Plain TCP data connections (the server must allow them) with this datapath.
    pub fn plaintext(self, datapath: &str) -> Self {
        self.flag("--tunnel-tls", "off").flag("--datapath", datapath)
    }

    /// Runs the agent inside this network namespace.
    pub fn netns(mut self, name: &str) -> Self {
        self.prefix.extend(["ip", "netns", "exec", name].map(String::from));
        self
    }

    /// Runs the agent under this command (which ends by running its arguments).
    pub fn under(mut self, command: &[String]) -> Self {
        self.prefix.extend_from_slice(command);
        self
    }

    /// Runs the agent without these capabilities (`setpriv` syntax, e.g. `-perfmon,-sys_admin`).
    pub fn without_caps(mut self, caps: &str) -> Self {
        self.prefix.extend(["setpriv", "--bounding-set", caps, "--inh-caps", caps].map(String::from));
        self
    }

    pub fn cert(self, cert: &Path, key: &Path) -> Self {
        self.flag("--agent-cert", &cert.display().to_string()).flag("--agent-key", &key.display().to_string())
    }

    /// Authenticates with the service-account token in `path` instead of a client certificate.
    pub fn token(mut self, path: &Path) -> Self {
        self.without.extend(["--agent-cert", "--agent-key"]);
        self.flag("--service-account-token-path", &path.display().to_string())
    }

    /// The agent's command line: its prefix, binary and flags.
    fn command_line(&self) -> Vec<String> {
        let f = &self.certs.files;
        let p = |p: &Path| p.display().to_string();
        let mut args: Vec<String> = vec![
            "--proxy-server-host".into(),
            self.server.ip().to_string(),
            "--proxy-server-port".into(),
            self.server.port().to_string(),
            "--ca-cert".into(),
            p(&f.cluster_ca),
            "--agent-cert".into(),
            p(&f.agent_cert),
            "--agent-key".into(),
            p(&f.agent_key),
            "--node-name".into(),
            self.id.clone(),
            "--agent-identifiers".into(),
            self.identifiers.clone(),
            "--admin-bind".into(),
            "127.0.0.1:0".into(),
            "--reconnect-max".into(),
            "1s".into(),
            "--allow".into(),
            "127.0.0.0/8".into(),
            "--graceful-shutdown-timeout".into(),
            "5s".into(),
        ];
        for flag in &self.without {
            if let Some(i) = args.iter().position(|a| a == flag) {
                args.drain(i..i + 2);
            }
        }
        override_flags(&mut args, &self.args);
        let mut line = self.prefix.clone();
        line.push(bin(option_env!("CARGO_BIN_EXE_spoke-agent"), "SPOKE_AGENT_BIN"));
        line.extend(args);
        line
    }

    /// Runs the agent to its end (one that exits at once: a refused configuration, `--check-config`),
    /// within [`WAIT`]; its exit status and standard error.
    pub async fn run_to_exit(self) -> (std::process::ExitStatus, String) {
        let line = self.command_line();
        let out = Command::new(&line[0]).args(&line[1..]).stdin(Stdio::null()).kill_on_drop(true).output();
        let out = tokio::time::timeout(WAIT, out).await.expect("the agent exits").expect("run the agent");
        (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// Starts the agent without waiting for it to connect.
    pub async fn spawn(self) -> Agent {
        let line = self.command_line();
        let (proc, pairs) = spawn("spoke-agent", &line[0], &line[1..], self.certs.dir.path(), &[]).await;
        Agent { proc, admin_addr: get(&pairs, "admin").parse().expect("admin address") }
    }

    /// Starts the agent and waits until it is connected with a parked data connection.
    pub async fn run(self) -> Agent {
        let agent = self.spawn().await;
        agent.ready().await;
        agent
    }
}

impl Agent {
    pub async fn ready(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while admin_get(self.admin_addr, "/readyz").await.0 != 200 {
            assert!(tokio::time::Instant::now() < deadline, "agent not ready in time\n{}", self.proc.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Server {
    /// Waits until at least one agent is connected and has parked a data connection (for agents whose
    /// own admin endpoint the test cannot reach).
    pub async fn wait_for_agent(&self) {
        eventually("an agent with a parked data connection", || async {
            metric(self.admin_addr, "spoke_server_agents_connected").await >= 1
                && metric(self.admin_addr, "spoke_server_data_conns_idle").await >= 1
        })
        .await;
    }
}

/// One small exchange through a stream to the echo server `echo`.
pub async fn round_trip(srv: &Server, echo: SocketAddr) {
    round_trip_via(&srv.uds, echo).await;
}

/// [`round_trip`] through the server's Unix socket `uds` (for tasks that cannot borrow the server).
pub async fn round_trip_via(uds: &Path, echo: SocketAddr) {
    let mut s = tunnel_via(uds, echo).await;
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
}

/// GET `path` from an admin endpoint: (status, body). Status 0 when unreachable.
pub async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr).await else { return (0, String::new()) };
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut text = String::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_string(&mut text)).await;
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// Value of the integer metric sample whose line starts with `prefix` (name and labels), or 0.
pub async fn metric(addr: SocketAddr, prefix: &str) -> u64 {
    let (_, body) = admin_get(addr, "/metrics").await;
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The counter at `prefix` once it has reached `want` (panics after [`WAIT`]). For counters a process
/// bumps when a stream ends, which may be just after the client saw that end; the caller asserts the
/// exact value, so an overshoot still fails.
pub async fn counted(addr: SocketAddr, prefix: &str, want: u64) -> u64 {
    eventually(&format!("{prefix} to reach {want}"), || async { metric(addr, prefix).await >= want }).await;
    metric(addr, prefix).await
}

/// Waits until `cond` holds, polling; panics with `what` after [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends kube-apiserver's exact CONNECT and reads the response head byte by byte (never past it).
/// Returns the status and the whole head.
pub async fn connect_on<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, dest: &str) -> (u16, String) {
    let req = format!("CONNECT {dest} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send CONNECT");
    read_head(s).await
}

pub async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> (u16, String) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(WAIT, s.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            other => panic!("response head incomplete ({other:?}): {:?}", String::from_utf8_lossy(&head)),
        }
    }
    let head = String::from_utf8(head).expect("ASCII head");
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status code");
    (status, head)
}

/// Opens a tunnel through the server's Unix socket; panics unless the answer is 200.
pub async fn tunnel(server: &Server, dest: SocketAddr) -> UnixStream {
    tunnel_via(&server.uds, dest).await
}

/// [`tunnel`] through the server's Unix socket `uds` (for tasks that cannot borrow the server).
pub async fn tunnel_via(uds: &Path, dest: SocketAddr) -> UnixStream {
    let mut s = UnixStream::connect(uds).await.expect("connect to the Unix socket");
    let (status, head) = connect_on(&mut s, &dest.to_string()).await;
    assert_eq!(status, 200, "CONNECT {dest}: {head}");
    assert_eq!(head, "HTTP/1.1 200 Connection Established\r\n\r\n");
    s
}

/// CONNECT status for `dest` through the Unix socket, with the error body when there is one.
pub async fn connect_status(server: &Server, dest: &str) -> (u16, String) {
    let mut s = UnixStream::connect(&server.uds).await.expect("connect to the Unix socket");
    let (status, head) = connect_on(&mut s, dest).await;
    let mut body = String::new();
    if status != 200 {
        let _ = tokio::time::timeout(WAIT, s.read_to_string(&mut body)).await;
    }
    (status, format!("{head}{body}"))
}

/// An echo backend: every connection gets its bytes back, and a FIN after the client's FIN.
pub async fn echo() -> SocketAddr {
    echo_on("127.0.0.1").await
}

/// An echo server on loopback address `ip` (any of 127.0.0.0/8), port 0.
pub async fn echo_on(ip: &str) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.expect("bind echo");
    let addr = listener.local_addr().expect("echo address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A port on 127.0.0.1 where nothing listens.
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("address")
}

/// Deterministic pseudo-random bytes (xorshift64*), so both ends can produce and check a stream
/// without holding it: any lost, duplicated or reordered byte changes what follows.
pub struct Pattern {
    state: u64,
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Self { state: seed | 1 }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let v = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Writes `len` pattern bytes (seed `seed`) to `w`, then shuts down the write side.
pub async fn send_pattern<W: AsyncWrite + Unpin>(w: &mut W, seed: u64, len: u64) {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64)).expect("fits");
        p.fill(&mut buf[..n]);
        w.write_all(&buf[..n]).await.expect("write pattern");
        left -= n as u64;
    }
    w.shutdown().await.expect("shutdown after pattern");
}

/// Checks bytes as they arrive against the pattern of a seed, in any chunking: whole 8-byte words are
/// compared at once, a remainder waits for the next chunk (or the end).
pub struct PatternCheck {
    pattern: Pattern,
    want: Vec<u8>,
    carry: Vec<u8>,
    total: u64,
}

impl PatternCheck {
    pub fn new(seed: u64) -> Self {
        Self { pattern: Pattern::new(seed), want: Vec::new(), carry: Vec::new(), total: 0 }
    }

    /// Takes the next received bytes; `Err(offset)`: the bytes from about `offset` on are wrong (lost,
    /// duplicated or reordered before them).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), u64> {
        self.carry.extend_from_slice(bytes);
        let whole = self.carry.len() - self.carry.len() % 8;
        self.want.resize(whole, 0);
        self.pattern.fill(&mut self.want);
        if self.carry[..whole] != self.want[..] {
            return Err(self.total);
        }
        self.carry.drain(..whole);
        self.total += whole as u64;
        Ok(())
    }

    /// Bytes checked so far (whole 8-byte words).
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Checks the tail at the end of the stream; `Ok`: the bytes received in all.
    pub fn finish(mut self) -> Result<u64, u64> {
        let mut tail = vec![0u8; self.carry.len()];
        self.pattern.fill(&mut tail);
        if self.carry != tail {
            return Err(self.total);
        }
        Ok(self.total + self.carry.len() as u64)
    }
}

/// Reads to EOF from `r`, checking every byte against the pattern; returns the byte count.
pub async fn check_pattern<R: AsyncRead + Unpin>(r: &mut R, seed: u64) -> u64 {
    let mut check = PatternCheck::new(seed);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = r.read(&mut buf).await.expect("read pattern");
        if n == 0 {
            break;
        }
        if let Err(at) = check.feed(&buf[..n]) {
            panic!("stream corrupted after byte {at}");
        }
    }
    check.finish().unwrap_or_else(|at| panic!("stream tail corrupted after byte {at}"))
}

/// How a stream under a fault ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Every byte came back, in order.
    Intact,
    /// The stream ended early (an error, or the end of a Unix socket whose stream was aborted) after
    /// this many intact bytes.
    Failed(u64),
}

/// How a [`paced_stream`] writes: `len` bytes in chunks of `chunk`, with `pause` between them.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    pub len: u64,
    pub chunk: usize,
    pub pause: Duration,
}

/// One stream through the Unix socket `uds` to the echo at `dest`, written at `pace` with the pattern
/// of `seed` and checked as it comes back; how and when it ended. `started` counts the streams whose
/// first bytes returned. Panics on a corrupted byte: a fault may end a stream, never change it.
pub async fn paced_stream(
    uds: PathBuf,
    dest: SocketAddr,
    seed: u64,
    pace: Pace,
    started: Arc<std::sync::atomic::AtomicUsize>,
) -> (Ended, tokio::time::Instant) {
    let Pace { len, chunk, pause } = pace;
    let s = tunnel_via(&uds, dest).await;
    let (mut r, mut w) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        let mut pattern = Pattern::new(seed);
        let mut buf = vec![0u8; chunk];
        let mut left = len;
        while left > 0 {
            let n = usize::try_from(left.min(chunk as u64)).expect("fits");
            pattern.fill(&mut buf[..n]);
            if w.write_all(&buf[..n]).await.is_err() {
                return;
            }
            left -= n as u64;
            tokio::time::sleep(pause).await;
        }
        let _ = w.shutdown().await;
    });
    let mut check = PatternCheck::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut counted = false;
    let ended = loop {
        match r.read(&mut buf).await {
            Ok(0) => break check.finish(),
            Ok(n) => {
                if let Err(at) = check.feed(&buf[..n]) {
                    break Err(at);
                }
                if !counted {
                    counted = true;
                    started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            Err(_) => break Ok(check.total()),
        }
    };
    writer.abort();
    let ended = match ended {
        Ok(n) if n == len => Ended::Intact,
        Ok(n) => Ended::Failed(n),
        Err(at) => panic!("stream {seed} corrupted after byte {at}"),
    };
    (ended, tokio::time::Instant::now())
}

/// A TLS connector for the TCP frontend presenting `cert`/`key` (none: no client certificate), trusting `ca`.
pub fn frontend_connector(ca: &Path, client: Option<(&Path, &Path)>) -> tokio_rustls::TlsConnector {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read CA") {
        roots.add(cert.expect("CA cert")).expect("add CA");
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert).expect("read cert").map(|c| c.expect("cert")).collect(),
                PrivateKeyDer::from_pem_file(key).expect("read key"),
            )
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Opens a tunnel through the server's mTLS TCP frontend with the development client certificate.
pub async fn tls_tunnel(server: &Server, dest: SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
    let f = &server.certs.files;
    let connector = frontend_connector(&f.frontend_ca, Some((&f.client_cert, &f.client_key)));
    let tcp = TcpStream::connect(server.frontend_addr.expect("server has a TCP frontend"))
        .await
        .expect("connect frontend");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("server name");
    let mut s = connector.connect(name, tcp).await.expect("TLS handshake with the frontend");
    let (status, head) = connect_on(&mut s, &dest.to_string()).await;
    assert_eq!(status, 200, "CONNECT {dest}: {head}");
    s
}

/// Whether the processes under test should carry TLS streams in kernel TLS: `SPOKE_EXPECT_KTLS` (`1` or
/// `0`, set by `cargo xtask test` in its virtual machines), or else what this kernel offers.
pub fn expect_kernel_tls() -> bool {
    match std::env::var("SPOKE_EXPECT_KTLS").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => spoke::transport::ktls::KernelTls::probe().is_ok(),
    }
}

/// The tier a TLS stream takes with the default datapath: `ktls` where the kernel offers kernel TLS,
/// `copy` otherwise.
pub fn tls_tier() -> &'static str {
    if expect_kernel_tls() { "ktls" } else { "copy" }
}

/// A backend that sends a few bytes and resets: the client, through the TCP frontend (a Unix socket
/// cannot carry a reset), sees its stream aborted after at most those bytes, never a clean end.
pub async fn backend_reset_reaches_the_client_as_an_abort(srv: &Server) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        // Wait for the client's first byte: the tunnel is open end to end.
        let mut go = [0u8; 2];
        s.read_exact(&mut go).await.unwrap();
        s.write_all(b"partial").await.unwrap();
        // SO_LINGER 0 then close: the kernel sends RST.
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
        drop(s);
    });
    let mut client = tls_tunnel(srv, addr).await;
    client.write_all(b"go").await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    let end = tokio::time::timeout(WAIT, async {
        loop {
            match client.read(&mut buf).await {
                Ok(0) => break Ok(()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => break Err(e),
            }
        }
    })
    .await
    .expect("the reset must end the client's stream");
    assert!(end.is_err(), "an aborted stream must not end cleanly");
    assert!(b"partial".starts_with(&got), "only bytes sent before the reset: {got:?}");
}

/// A listener with backlog 0 whose queue is already filled by connections nobody accepts.
pub fn full_backlog() -> (SocketAddr, Vec<std::net::TcpStream>) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    // The first connections complete into the queue; stop once one no longer completes quickly.
    for _ in 0..8 {
        match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(300)) {
            Ok(s) => fillers.push(s),
            Err(_) => break,
        }
    }
    // Keep the listening socket open for the test's life by leaking it into the fillers' lifetime.
    std::mem::forget(socket);
    (addr, fillers)
}
