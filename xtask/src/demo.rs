//! `cargo xtask run`: the whole system on loopback — a demo backend, spoke-server and spoke-agent with
//! development certificates — checked end to end, then left running until Ctrl-C, SIGTERM or SIGHUP (a
//! `timeout`, a closed terminal, a process manager), each of which stops what it started.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Longest wait for a process to start or become ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long server and agent get to stop after a stop signal before they are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The demo agent's node, whose node certificate spoke-certs makes.
const DEMO_NODE: &str = "demo-node";
/// Socket timeouts of the demo's own requests.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A child process killed when dropped.
struct Running {
    name: &'static str,
    child: Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `program` and reads its "started" line: `key=value` pairs with the bound addresses.
fn start(
    name: &'static str,
    program: &Path,
    args: &[String],
) -> anyhow::Result<(Running, Vec<(String, String)>)> {
    let mut child = Command::new(program)
        .args(args)
        // Own process group: Ctrl-C and a hang-up reach only xtask, which then stops the children in order.
        .process_group(0)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("start {}", program.display()))?;
    let pairs = crate::started(&mut child, START_TIMEOUT);
    let running = Running { name, child };
    let pairs = pairs.with_context(|| format!("{name} did not start (see its log above)"))?;
    Ok((running, pairs))
}

/// The demo backend: answers every HTTP request with a greeting.
fn backend() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind demo backend")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
                let mut reader = BufReader::new(&stream);
                let mut line = String::new();
                // Read the request head, then answer.
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let body = "Hello from the demo backend, reached through spoke-server and spoke-agent.\n";
                let _ = (&stream).write_all(
                    format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                        .as_bytes(),
                );
            });
        }
    });
    Ok(addr)
}

/// Does what kube-apiserver does: CONNECT through the Unix socket, then a plain HTTP request.
fn through_tunnel(uds: &Path, dest: SocketAddr) -> anyhow::Result<String> {
    let mut s = UnixStream::connect(uds).with_context(|| format!("connect {}", uds.display()))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(format!("CONNECT {dest} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            bail!("tunnel closed during the CONNECT reply: {}", String::from_utf8_lossy(&head));
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 200 ") {
        bail!("CONNECT refused: {}", String::from_utf8_lossy(&head));
    }
    s.write_all(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    Ok(response.split_once("\r\n\r\n").map_or(response.clone(), |(_, body)| body.to_owned()))
}

/// Whether `datapath` needs plaintext data connections (the kernel tiers cannot see into TLS).
fn plaintext(datapath: &str) -> bool {
    matches!(datapath, "splice" | "sockmap")
}

fn server_args(uds: &Path, datapath: &str, cert: &dyn Fn(&str) -> String) -> Vec<String> {
    let mut args = vec![
        "--uds-name".into(),
        uds.display().to_string(),
        "--frontend-bind".into(),
        "127.0.0.1:0".into(),
        "--server-ca-cert".into(),
        cert("frontend-ca.pem"),
        "--server-cert".into(),
        cert("frontend.pem"),
        "--server-key".into(),
        cert("frontend-key.pem"),
        // The demo agent announces itself as a default route.
        "--default-route-agents".into(),
        DEMO_NODE.into(),
        // There is no apiserver to read Node objects from: the demo agent's claims are taken as they
        // come (the server warns about it).
        "--agent-claims".into(),
        "trusted".into(),
        // The common name of spoke-certs' client.pem (spoke::devcerts::CLIENT_NAME).
        "--frontend-allowed-names".into(),
        "kube-apiserver".into(),
        "--agent-bind".into(),
        "127.0.0.1:0".into(),
        "--cluster-ca-cert".into(),
        cert("cluster-ca.pem"),
        "--cluster-cert".into(),
        cert("cluster.pem"),
        "--cluster-key".into(),
        cert("cluster-key.pem"),
        "--admin-bind".into(),
        "127.0.0.1:0".into(),
        "--graceful-shutdown-timeout".into(),
        "3s".into(),
    ];
    if plaintext(datapath) {
        args.push("--allow-plaintext-tunnel".into());
    }
    args
}

fn agent_args(server_port: u16, datapath: &str, cert: &dyn Fn(&str) -> String) -> Vec<String> {
    let mut args = vec![
        "--proxy-server-host".into(),
        "127.0.0.1".into(),
        "--proxy-server-port".into(),
        server_port.to_string(),
        "--ca-cert".into(),
        cert("cluster-ca.pem"),
        // The node's own certificate, as a kubelet holds it: the server proves the agent is DEMO_NODE.
        "--agent-cert".into(),
        cert(&format!("node-{DEMO_NODE}.pem")),
        "--agent-key".into(),
        cert(&format!("node-{DEMO_NODE}-key.pem")),
        "--node-name".into(),
        DEMO_NODE.into(),
        "--agent-identifiers".into(),
        "ipv4=127.0.0.1&default-route=true".into(),
        // The demo backend lives on loopback, which the default policy denies.
        "--allow".into(),
        "127.0.0.0/8".into(),
        "--admin-bind".into(),
        "127.0.0.1:0".into(),
        "--datapath".into(),
        datapath.into(),
        "--graceful-shutdown-timeout".into(),
        "3s".into(),
    ];
    if plaintext(datapath) {
        args.extend(["--tunnel-tls".into(), "off".into()]);
    }
    args
}

pub fn run(datapath: &str) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // SIGINT, SIGTERM and SIGHUP (ctrlc's `termination` feature) all end the demo the same way.
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)).context("install the signal handler")?;

    if !matches!(datapath, "auto" | "copy" | "splice" | "sockmap") {
        bail!("unknown datapath {datapath:?}: auto, copy, splice or sockmap");
    }
    if plaintext(datapath) {
        eprintln!("[xtask] --datapath {datapath}: data connections are plaintext (loopback only here)");
    }
    let bins = crate::build_binaries()?;
    if stop.load(Ordering::SeqCst) {
        return Ok(());
    }
    let dir = crate::target_dir().join("spoke-dev");
    let certs = dir.join("certs");
    crate::run({
        let mut c = Command::new(bins.join("spoke-certs"));
        c.arg("--out").arg(&certs).args(["--node", DEMO_NODE]).stdout(Stdio::null());
        c
    })?;
    let cert = |name: &str| certs.join(name).display().to_string();
    let uds = dir.join("spoke.sock");
    let backend = backend()?;

    let (server, s) = start("spoke-server", &bins.join("spoke-server"), &server_args(&uds, datapath, &cert))?;
    let agent_addr: SocketAddr = crate::value(&s, "agent")?.parse()?;
    let frontend = crate::value(&s, "frontend")?;
    let server_admin = crate::value(&s, "admin")?;
    let (agent, a) =
        start("spoke-agent", &bins.join("spoke-agent"), &agent_args(agent_addr.port(), datapath, &cert))?;
    let agent_admin: SocketAddr = crate::value(&a, "admin")?.parse()?;
    let deadline = Instant::now() + START_TIMEOUT;
    while crate::http_get(agent_admin, "/readyz", IO_TIMEOUT).map(|(status, _)| status) != Some(200) {
        if stop.load(Ordering::SeqCst) {
            return Ok(()); // the children are stopped when dropped
        }
        if Instant::now() > deadline {
            bail!("the agent did not become ready (see its log above)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let answer = through_tunnel(&uds, backend).context("check the tunnel end to end")?;
    let certs_shown = certs.display();
    println!(
        "\n\
         Spoke is running: a request through the tunnel answered:\n    {answer}\n\
         kube-apiserver would use the Unix socket {uds}.\n\
         Try it yourself through the mutual-TLS TCP frontend:\n\
         \x20   curl -p --proxy https://localhost:{port} --proxy-cacert {certs_shown}/frontend-ca.pem \\\n\
         \x20        --proxy-cert {certs_shown}/client.pem --proxy-key {certs_shown}/client-key.pem http://{backend}/\n\
         Metrics: http://{server_admin}/metrics (server), http://{agent_admin}/metrics (agent)\n\
         Press Ctrl-C to stop (SIGTERM and SIGHUP stop it too).",
        answer = answer.trim(),
        uds = uds.display(),
        port = frontend.rsplit(':').next().unwrap_or_default(),
    );
    let mut children = [agent, server];
    while !stop.load(Ordering::SeqCst) {
        for c in &mut children {
            if let Some(status) = c.child.try_wait()? {
                bail!("{} exited unexpectedly: {status}", c.name);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // After a hang-up stderr may be gone: a failed write must not stop the stopping.
    let _ = writeln!(std::io::stderr(), "[xtask] stopping: SIGTERM to spoke-agent and spoke-server");
    for c in &children {
        let _ = Command::new("kill").arg("-TERM").arg(c.child.id().to_string()).status();
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    for c in &mut children {
        while c.child.try_wait()?.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Whatever still runs is killed when `children` is dropped.
    Ok(())
}
