//! Systems under test: how to install, start and reach each one on loopback.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Longest wait for a system to come up.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A started system under test. Its processes are killed when it is dropped.
pub struct System {
    /// Name in the results.
    pub name: String,
    /// `--via` for spoke-bench.
    pub via: String,
    /// Extra spoke-bench arguments (TLS material).
    pub extra: Vec<String>,
    /// Processes whose cost is measured, by role.
    pub procs: Vec<(String, Child)>,
    /// Processes that are part of the set-up but not measured.
    pub helpers: Vec<Child>,
    /// Hold sizes this system cannot take, with the reason.
    pub skip_holds: Option<(usize, &'static str)>,
}

/// How long a system under test gets to stop after SIGTERM (the agent then removes its pinned eBPF
/// maps) before it is killed.
const STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Drop for System {
    fn drop(&mut self) {
        let children: Vec<&mut Child> =
            self.procs.iter_mut().map(|(_, c)| c).chain(self.helpers.iter_mut()).collect();
        for child in &children {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        }
        let deadline = std::time::Instant::now() + STOP_TIMEOUT;
        for child in children {
            while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Files and addresses every set-up shares.
pub struct Env {
    /// spoke-server, spoke-agent, spoke-bench, spoke-certs.
    pub bins: PathBuf,
    /// Scratch directory of this run.
    pub dir: PathBuf,
    /// Development certificates.
    pub certs: PathBuf,
    /// The benchmark backend.
    pub backend: SocketAddr,
}

impl Env {
    fn cert(&self, name: &str) -> String {
        self.certs.join(name).display().to_string()
    }
}

/// A port on 127.0.0.1 free right now (for tools that cannot report the port they bound).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn spawn(program: &str, args: &[String], log: &Path) -> anyhow::Result<Child> {
    let log = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {program}"))
}

/// Polls `ready` until it holds, failing when one of `children` exits or `timeout` passes; `ready`
/// returns `Err` with what it saw last, for the failure message.
fn wait_until(
    timeout: Duration,
    children: &mut [&mut Child],
    mut ready: impl FnMut() -> Result<(), String>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match ready() {
            Ok(()) => return Ok(()),
            Err(last) => last,
        };
        for c in children.iter_mut() {
            if let Some(status) = c.try_wait()? {
                bail!("exited during start-up: {status}");
            }
        }
        if Instant::now() > deadline {
            bail!("{last} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until a tunnel through `port` reaches the backend (echo of one byte).
fn wait_forward(port: u16, children: &mut [&mut Child]) -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};
    let probe = || -> std::io::Result<()> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut h = [0u8; 10];
        h[0] = b'E';
        h[9] = b'x';
        s.write_all(&h)?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        Ok(())
    };
    wait_until(READY_TIMEOUT, children, || {
        probe().map_err(|e| format!("port {port} did not forward to the backend ({e})"))
    })
}

fn forward(
    name: &str,
    port: u16,
    procs: Vec<(String, Child)>,
    helpers: Vec<Child>,
) -> anyhow::Result<System> {
    let mut system = System {
        name: name.into(),
        via: format!("forward:127.0.0.1:{port}"),
        extra: Vec::new(),
        procs,
        helpers,
        skip_holds: None,
    };
    let mut all: Vec<&mut Child> =
        system.procs.iter_mut().map(|(_, c)| c).chain(system.helpers.iter_mut()).collect();
    wait_forward(port, &mut all)?;
    Ok(system)
}

/// Direct TCP to the backend: the limit.
#[expect(clippy::unnecessary_wraps, reason = "same signature as every other system")]
pub fn direct(_env: &Env) -> anyhow::Result<System> {
    Ok(System {
        name: "direct".into(),
        via: "direct".into(),
        extra: Vec::new(),
        procs: Vec::new(),
        helpers: Vec::new(),
        skip_holds: None,
    })
}

fn spoke_proc(
    env: &Env,
    bin: &str,
    args: &[String],
    log: &str,
) -> anyhow::Result<(Child, Vec<(String, String)>)> {
    let log = std::fs::File::create(env.dir.join(log))?;
    let mut child = Command::new(env.bins.join(bin))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {bin}"))?;
    let pairs = crate::started(&mut child, READY_TIMEOUT)?;
    Ok((child, pairs))
}

/// spoke-server with its agent listener on 127.0.0.1; returns the child, the agent address and the
/// admin address.
pub fn spoke_server(
    env: &Env,
    uds: &Path,
    extra: &[&str],
) -> anyhow::Result<(Child, SocketAddr, SocketAddr)> {
    let mut args: Vec<String> = [
        "--uds-name",
        &uds.display().to_string(),
        "--agent-bind",
        "127.0.0.1:0",
        "--admin-bind",
        "127.0.0.1:0",
        // Every benchmark agent (1,000 of them in the scale scenario) shares one certificate: identity
        // is not what the benchmark measures.
        "--agent-auth",
        "shared-cert",
        "--agent-claims",
        "trusted",
        "--cluster-ca-cert",
        &env.cert("cluster-ca.pem"),
        "--cluster-cert",
        &env.cert("cluster.pem"),
        "--cluster-key",
        &env.cert("cluster-key.pem"),
        "--max-streams-per-agent",
        "20000",
        "--max-pending-dials",
        "20000",
        "--max-frontend-conns",
        "30000",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    // A flag `extra` gives replaces the default above.
    for flag in extra.iter().filter(|f| f.starts_with("--")) {
        if let Some(i) = args.iter().position(|a| a == flag) {
            args.drain(i..i + 2);
        }
    }
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let (child, pairs) =
        spoke_proc(env, "spoke-server", &args, &format!("spoke-server-{}.log", fastrand_suffix()))?;
    Ok((child, crate::value(&pairs, "agent")?.parse()?, crate::value(&pairs, "admin")?.parse()?))
}

fn fastrand_suffix() -> u32 {
    // Unique enough for log names within one run.
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos())
}

/// The value of a server metric (whole sample line prefix); 0 when absent or unreachable.
pub fn metric_value(admin: SocketAddr, prefix: &str) -> f64 {
    metric(admin, prefix)
}

/// Waits until a server metric (whole sample line prefix) reaches `at_least`.
pub fn wait_metric(
    admin: SocketAddr,
    prefix: &str,
    at_least: f64,
    children: &mut [&mut Child],
) -> anyhow::Result<()> {
    wait_until(READY_TIMEOUT * 4, children, || {
        let v = metric(admin, prefix);
        if v >= at_least { Ok(()) } else { Err(format!("{prefix} stayed at {v} < {at_least}")) }
    })
}

/// The value of the metric sample whose line starts with `prefix`; 0 when absent or unreachable.
fn metric(admin: SocketAddr, prefix: &str) -> f64 {
    crate::http_get(admin, "/metrics", Duration::from_secs(5))
        .and_then(|(_, body)| {
            body.lines()
                .find(|l| l.starts_with(prefix))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}

/// Spoke: server and agent with a TLS tunnel and the copy datapath; the bench speaks CONNECT over the
/// server's Unix socket, as kube-apiserver does.
pub fn spoke(env: &Env) -> anyhow::Result<System> {
    spoke_with(env, "spoke (TLS tunnel, copy)", true, "copy")
}

/// The TLS copy system reached as kube-apiserver reaches it with `proxyProtocol: GRPC`: Konnectivity's
/// gRPC tunnel on the same socket, one HTTP/2 connection and call per tunnel.
pub fn spoke_grpc(env: &Env) -> anyhow::Result<System> {
    let mut system = spoke_with(env, "spoke (gRPC frontend)", true, "copy")?;
    system.via = format!("grpc+{}", system.via);
    Ok(system)
}

/// Why the kernel TLS system did not start: this kernel has none (expected on most hosts).
pub const NO_KERNEL_TLS: &str = "no kernel TLS here";

/// Spoke with TLS data connections sealed by kernel TLS and spliced on both hops, where the kernel has
/// kernel TLS (both processes' default, `auto`); unavailable elsewhere.
pub fn spoke_ktls(env: &Env) -> anyhow::Result<System> {
    spoke_with(env, "spoke (TLS tunnel, kTLS)", true, "auto")
}

/// Spoke with plaintext data connections, spliced with splice(2) on the agent and the server.
pub fn spoke_plain_splice(env: &Env) -> anyhow::Result<System> {
    spoke_with(env, "spoke (plaintext tunnel, splice)", false, "splice")
}

/// Spoke with plaintext data connections and the userspace copy on both hops: what the kernel tiers are
/// measured against.
pub fn spoke_plain_copy(env: &Env) -> anyhow::Result<System> {
    spoke_with(env, "spoke (plaintext tunnel, copy)", false, "copy")
}

/// Spoke with plaintext data connections spliced by the agent's eBPF sockmap programs; the server's hop
/// takes its default tier.
pub fn spoke_plain_sockmap(env: &Env) -> anyhow::Result<System> {
    spoke_with(env, "spoke (plaintext tunnel, sockmap)", false, "sockmap")
}

fn spoke_with(env: &Env, name: &str, tls: bool, datapath: &str) -> anyhow::Result<System> {
    let uds = env.dir.join(format!("spoke-{datapath}-{tls}.sock"));
    // The copy and splice systems use their tier on both hops; the sockmap one leaves the server's
    // Unix-socket hop to its default (`auto`).
    let server_extra: &[&str] = match (tls, datapath) {
        (true, _) => &[],
        (false, "copy" | "splice") => &["--allow-plaintext-tunnel", "--datapath", datapath],
        (false, _) => &["--allow-plaintext-tunnel"],
    };
    let (mut server, agent_addr, admin) = spoke_server(env, &uds, server_extra)?;
    let args: Vec<String> = [
        "--proxy-server-host",
        "127.0.0.1",
        "--proxy-server-port",
        &agent_addr.port().to_string(),
        "--tls-server-name",
        "localhost",
        "--ca-cert",
        &env.cert("cluster-ca.pem"),
        "--agent-cert",
        &env.cert("agent.pem"),
        "--agent-key",
        &env.cert("agent-key.pem"),
        "--node-name",
        "bench-node",
        "--agent-identifiers",
        "ipv4=127.0.0.1",
        "--allow",
        "127.0.0.0/8",
        "--admin-bind",
        "off",
        "--pool-size",
        "16",
        // The hold scenario keeps up to 10,000 tunnels through this one agent (its default cap, with no
        // memory limit, is 4096).
        "--max-streams",
        "20000",
        // Exits well within the stop timeout, so a sockmap agent removes its pinned maps itself.
        "--graceful-shutdown-timeout",
        "1s",
        "--datapath",
        datapath,
        "--tunnel-tls",
        if tls { "on" } else { "off" },
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let log = format!("spoke-agent-{datapath}-{tls}.log");
    let (mut agent, _) = spoke_proc(env, "spoke-agent", &args, &log)?;
    wait_metric(admin, "spoke_server_data_conns_idle", 1.0, &mut [&mut server, &mut agent])?;
    if tls && datapath == "auto" && metric(admin, "spoke_server_kernel_tls") < 1.0 {
        for mut child in [server, agent] {
            let _ = child.kill();
            let _ = child.wait();
        }
        bail!("{NO_KERNEL_TLS} (spoke_server_kernel_tls is 0; the server log says why)");
    }
    Ok(System {
        name: name.into(),
        via: format!("uds:{}", uds.display()),
        extra: Vec::new(),
        procs: vec![("server".into(), server), ("agent".into(), agent)],
        helpers: Vec::new(),
        skip_holds: None,
    })
}

/// socat: one forked process per connection.
pub fn socat(env: &Env) -> anyhow::Result<System> {
    let port = free_port()?;
    let child = spawn(
        "socat",
        &[
            format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=4096"),
            format!("TCP:{}", env.backend),
        ],
        &env.dir.join("socat.log"),
    )?;
    let mut s = forward("socat", port, vec![("socat".into(), child)], Vec::new())?;
    s.skip_holds = Some((2000, "socat forks a process per connection; 10,000 would take ~20 GiB"));
    Ok(s)
}

/// haproxy in TCP mode.
pub fn haproxy(env: &Env) -> anyhow::Result<System> {
    let port = free_port()?;
    // haproxy refuses to start when its connection limit needs more descriptors than it may open.
    let (fds, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    let maxconn = fds.saturating_sub(100) / 2;
    let cfg = env.dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn {maxconn}\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 10m\n  timeout server 10m\n\
             frontend f\n  bind 127.0.0.1:{port}\n  default_backend b\nbackend b\n  server s {}\n",
            env.backend
        ),
    )?;
    let child = spawn(
        "haproxy",
        &["-db".into(), "-f".into(), cfg.display().to_string()],
        &env.dir.join("haproxy.log"),
    )?;
    forward("haproxy (tcp mode)", port, vec![("haproxy".into(), child)], Vec::new())
}

/// Two stunnel processes: plain → TLS 1.3 → plain.
pub fn stunnel(env: &Env) -> anyhow::Result<System> {
    let (tls_port, port) = (free_port()?, free_port()?);
    let server_cfg = env.dir.join("stunnel-server.conf");
    std::fs::write(
        &server_cfg,
        format!(
            "foreground = yes\npid =\nsslVersionMin = TLSv1.3\n[srv]\naccept = 127.0.0.1:{tls_port}\nconnect = {}\ncert = {}\nkey = {}\n",
            env.backend,
            env.cert("frontend.pem"),
            env.cert("frontend-key.pem")
        ),
    )?;
    let client_cfg = env.dir.join("stunnel-client.conf");
    std::fs::write(
        &client_cfg,
        format!(
            "foreground = yes\npid =\nsslVersionMin = TLSv1.3\n[cli]\nclient = yes\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{tls_port}\n\
             CAfile = {}\nverifyChain = yes\ncheckHost = localhost\n",
            env.cert("frontend-ca.pem")
        ),
    )?;
    let server = spawn("stunnel4", &[server_cfg.display().to_string()], &env.dir.join("stunnel-server.log"))?;
    let client = spawn("stunnel4", &[client_cfg.display().to_string()], &env.dir.join("stunnel-client.log"))?;
    forward(
        "stunnel pair (TLS 1.3)",
        port,
        vec![("stunnel-server".into(), server), ("stunnel-client".into(), client)],
        Vec::new(),
    )
}

/// ssh -L through a private sshd, AES-128-GCM.
pub fn ssh(env: &Env) -> anyhow::Result<System> {
    let dir = env.dir.join("ssh");
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all("/run/sshd").context("create /run/sshd (privilege separation directory)")?;
    for key in ["host_key", "client_key"] {
        let path = dir.join(key);
        if !path.exists() {
            crate::run({
                let mut c = Command::new("ssh-keygen");
                c.args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&path);
                c
            })?;
        }
    }
    std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))?;
    let (sshd_port, port) = (free_port()?, free_port()?);
    let cfg = dir.join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "Port {sshd_port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\nAuthorizedKeysFile {d}/authorized_keys\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n\
             AllowTcpForwarding yes\nMaxSessions 100000\nMaxStartups 10000\nCiphers aes128-gcm@openssh.com\n",
            d = dir.display()
        ),
    )?;
    let sshd = spawn(
        "/usr/sbin/sshd",
        &["-D".into(), "-e".into(), "-f".into(), cfg.display().to_string()],
        &env.dir.join("sshd.log"),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let client = spawn(
        "ssh",
        &[
            "-N",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ExitOnForwardFailure=yes",
            "-c",
            "aes128-gcm@openssh.com",
            "-i",
            &dir.join("client_key").display().to_string(),
            "-p",
            &sshd_port.to_string(),
            "-L",
            &format!("127.0.0.1:{port}:{}", env.backend),
            "root@127.0.0.1",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect::<Vec<_>>(),
        &env.dir.join("ssh.log"),
    )?;
    forward("ssh -L (aes128-gcm)", port, vec![("sshd".into(), sshd), ("ssh".into(), client)], Vec::new())
}

/// rathole over plain TCP: a one-connection-per-stream tunnel in Rust.
pub fn rathole(env: &Env) -> anyhow::Result<System> {
    let (control, port) = (free_port()?, free_port()?);
    let server_cfg = env.dir.join("rathole-server.toml");
    std::fs::write(
        &server_cfg,
        format!(
            "[server]\nbind_addr = \"127.0.0.1:{control}\"\n[server.services.bench]\ntoken = \"spoke-bench\"\nbind_addr = \"127.0.0.1:{port}\"\n"
        ),
    )?;
    let client_cfg = env.dir.join("rathole-client.toml");
    std::fs::write(
        &client_cfg,
        format!(
            "[client]\nremote_addr = \"127.0.0.1:{control}\"\n[client.services.bench]\ntoken = \"spoke-bench\"\nlocal_addr = \"{}\"\n",
            env.backend
        ),
    )?;
    let server = spawn("rathole", &[server_cfg.display().to_string()], &env.dir.join("rathole-server.log"))?;
    let client = spawn("rathole", &[client_cfg.display().to_string()], &env.dir.join("rathole-client.log"))?;
    forward(
        "rathole (tcp)",
        port,
        vec![("rathole-server".into(), server), ("rathole-client".into(), client)],
        Vec::new(),
    )
}

/// Installs what the peers need; returns a note per peer that could not be installed.
pub fn install() -> Vec<(&'static str, String)> {
    let mut missing = Vec::new();
    let packages = [
        ("socat", "socat"),
        ("haproxy", "haproxy"),
        ("stunnel4", "stunnel4"),
        ("ssh", "openssh-client"),
        ("sshd", "openssh-server"),
    ];
    let absent: Vec<&str> = packages
        .iter()
        .filter(|(program, _)| {
            !crate::bootstrap::on_path(program) && !Path::new("/usr/sbin").join(program).exists()
        })
        .map(|(_, package)| *package)
        .collect();
    if !absent.is_empty() {
        eprintln!("[bench] installing Debian packages: {}", absent.join(" "));
        let ok = crate::bootstrap::apt_install(&absent);
        if let Err(e) = ok {
            missing.push(("debian peers", format!("apt-get install {}: {e:#}", absent.join(" "))));
        }
    }
    if !crate::bootstrap::on_path("rathole") {
        eprintln!("[bench] installing rathole from crates.io (about 3 minutes)");
        let locked = crate::run(crate::cmd("cargo", &["install", "rathole", "--locked"]));
        if let Err(e) = locked.or_else(|_| crate::run(crate::cmd("cargo", &["install", "rathole"]))) {
            missing.push(("rathole (tcp)", format!("cargo install rathole: {e:#}")));
        }
    }
    missing
}
