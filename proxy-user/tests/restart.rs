//! Restarting spoke-server as a static-pod update does (stop the old process, then start the new one on
//! the same socket and ports) under a steady stream of requests, with idle keep-alive tunnels held open
//! as kube-apiserver holds them: the old server keeps serving while it drains, closes the idle tunnels
//! instead of waiting for them, and exits; the agent comes back to the new one at once.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{agent, certs, echo, eventually, metric, server, tunnel_via};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// What the steady stream of requests saw: when each failure happened, and how many succeeded.
#[derive(Default)]
struct Load {
    ok: u64,
    /// When the last request succeeded.
    last_ok: Option<Instant>,
    failures: Vec<(Instant, String)>,
}

/// One request as the apiserver makes it: CONNECT, a small exchange, close.
async fn request(uds: &std::path::Path, dest: std::net::SocketAddr) -> Result<(), String> {
    let mut s = tokio::net::UnixStream::connect(uds).await.map_err(|e| format!("connect: {e}"))?;
    let (status, head) = common::connect_on(&mut s, &dest.to_string()).await;
    if status != 200 {
        return Err(format!("CONNECT: {head}"));
    }
    s.write_all(b"ping").await.map_err(|e| format!("write: {e}"))?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.map_err(|e| format!("read: {e}"))?;
    if &buf != b"ping" {
        return Err("wrong echo".into());
    }
    Ok(())
}

/// The gap a stop-then-start restart left: from the first request after `since` that found no listener
/// to the first served after it (waited for).
async fn gap(load: &Mutex<Load>, since: Instant) -> Option<Duration> {
    let first = {
        let load = load.lock().unwrap();
        load.failures.iter().find(|(at, e)| *at >= since && e.starts_with("connect:")).map(|(at, _)| *at)
    }?;
    eventually("a request served after the gap", || async {
        load.lock().unwrap().last_ok.is_some_and(|at| at > first)
    })
    .await;
    Some(load.lock().unwrap().last_ok?.duration_since(first))
}

/// A server on a socket of its own name with an agent, and an echo destination.
struct Setup {
    certs: Arc<common::Certs>,
    uds: PathBuf,
    uds_flag: String,
    first: common::Server,
    agent_port: u16,
    echo: std::net::SocketAddr,
    agent: common::Agent,
}

async fn setup(name: &str) -> Setup {
    let certs = certs();
    let uds: PathBuf = certs.dir.path().join(format!("{name}.sock"));
    let uds_flag = uds.display().to_string();
    let first =
        server(&certs).flag("--uds-name", &uds_flag).flag("--drain-idle-timeout", "500ms").run().await;
    let agent_port = first.agent_addr.port();
    let echo = echo().await;
    let agent = agent(&first).run().await;
    Setup { certs, uds, uds_flag, first, agent_port, echo, agent }
}

/// A server taking the place of the one set up: the same socket and agent port.
async fn replacement(certs: &Arc<common::Certs>, uds_flag: &str, agent_port: u16) -> common::Server {
    server(certs)
        .flag("--uds-name", uds_flag)
        .flag("--drain-idle-timeout", "500ms")
        .agent_port(agent_port)
        .run()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_server_fails_no_request_while_it_drains() {
    let Setup { certs, uds, uds_flag, first, agent_port, echo, agent: _agent } = setup("restart").await;

    let load = Arc::new(Mutex::new(Load::default()));
    let stop = tokio_util::sync::CancellationToken::new();
    let generator = {
        let (load, stop, uds) = (load.clone(), stop.clone(), uds.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                record(&load, request(&uds, echo).await);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let mut current = first;
    for round in 0..3 {
        // Idle keep-alive tunnels, as the apiserver keeps to kubelets between requests.
        let mut idle: Vec<tokio::net::UnixStream> = Vec::new();
        for _ in 0..4 {
            idle.push(tunnel_via(&uds, echo).await);
        }
        let before = load.lock().unwrap().ok;
        let drain_started = Instant::now();
        current.proc.terminate();
        current.proc.exited().await;
        let exited = Instant::now();
        // The idle tunnels were ended in order (EOF), not reset.
        for t in &mut idle {
            let mut rest = Vec::new();
            assert_eq!(t.read_to_end(&mut rest).await.map(|_| rest.len()).ok(), Some(0), "orderly end");
        }
        let served_while_draining = load.lock().unwrap().ok - before;
        let next = replacement(&certs, &uds_flag, agent_port).await;
        let started = Instant::now();
        next.wait_for_agent().await;
        let routed = started.elapsed();
        let gap_span = gap(&load, drain_started).await;
        // A request that finds no listener (the file gone, or nobody accepting) falls in the gap between
        // the old process and the new one, which the stop-then-start order makes; any other failure
        // before the old process exited happened while it drained.
        let failures: Vec<(Instant, String)> =
            load.lock().unwrap().failures.iter().filter(|(at, _)| *at >= drain_started).cloned().collect();
        let since_term = |at: &Instant| at.duration_since(drain_started);
        let (mut gap, mut draining, mut routing) = (Vec::new(), Vec::new(), Vec::new());
        for (at, e) in &failures {
            let line = format!("{:?} after SIGTERM: {}", since_term(at), e.lines().next().unwrap_or(""));
            if e.starts_with("connect:") {
                gap.push(line);
            } else if at < &exited {
                draining.push(line);
            } else {
                routing.push(line);
            }
        }
        eprintln!(
            "restart {round}: drained in {:?} serving {served_while_draining} requests; agent back {routed:?} \
             after the new server started; {} requests found no listener, for {:?}; {} requests before \
             the agent was back {routing:?}",
            exited.duration_since(drain_started),
            gap.len(),
            gap_span,
            routing.len(),
        );
        assert!(draining.is_empty(), "requests failed while the server drained: {draining:?}");
        assert!(served_while_draining > 0, "the draining server kept serving");
        assert_eq!(metric(next.admin_addr, "spoke_server_agents_connected").await, 1);
        current = next;
    }
    stop.cancel();
    generator.await.unwrap();
    let load = load.lock().unwrap();
    assert!(load.ok > 100, "{} requests served", load.ok);
}

/// Records the outcome of each request of a load generator.
fn record(load: &Mutex<Load>, result: Result<(), String>) {
    let mut load = load.lock().unwrap();
    match result {
        Ok(()) => {
            load.ok += 1;
            load.last_ok = Some(Instant::now());
        }
        Err(e) => load.failures.push((Instant::now(), e)),
    }
}

/// A stream held for a while, as kubectl logs or exec hold one: a new connection, then an exchange
/// every 50 ms for 300 ms.
async fn held_stream(uds: &std::path::Path, dest: std::net::SocketAddr) -> Result<(), String> {
    let mut s = tokio::net::UnixStream::connect(uds).await.map_err(|e| format!("connect: {e}"))?;
    let (status, head) = common::connect_on(&mut s, &dest.to_string()).await;
    if status != 200 {
        return Err(format!("CONNECT: {head}"));
    }
    for i in 0..6u8 {
        s.write_all(&[i; 16]).await.map_err(|e| format!("write {i}: {e}"))?;
        let mut buf = [0u8; 16];
        s.read_exact(&mut buf).await.map_err(|e| format!("read {i}: {e}"))?;
        if buf != [i; 16] {
            return Err(format!("wrong echo {i}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// One exchange on an open tunnel.
async fn exchange(t: &mut tokio::net::UnixStream, what: &str) {
    t.write_all(what.as_bytes()).await.unwrap_or_else(|e| panic!("{what}: write: {e}"));
    let mut buf = vec![0u8; what.len()];
    t.read_exact(&mut buf).await.unwrap_or_else(|e| panic!("{what}: read: {e}"));
    assert_eq!(buf, what.as_bytes(), "{what}");
}

/// Surge replacements, as a `DaemonSet` with `maxSurge: 1` does them: the new server starts while the
/// old one runs, takes the socket path (renamed over it, never a moment without a listener) and the
/// agents (the old one tells them to move), and only then is the old one stopped. A request every
/// 10 ms and a new stream held for 300 ms every 20 ms see no failure, and a stream open on the old
/// server keeps working until it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn surge_replacements_refuse_no_request() {
    let Setup { certs, uds, uds_flag, first, agent_port, echo, agent: _agent } = setup("surge").await;

    let load = Arc::new(Mutex::new(Load::default()));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut generators = tokio::task::JoinSet::new();
    {
        let (load, stop, uds) = (load.clone(), stop.clone(), uds.clone());
        generators.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            while !stop.is_cancelled() {
                tick.tick().await;
                record(&load, request(&uds, echo).await);
            }
        });
    }
    {
        let (load, stop, uds) = (load.clone(), stop.clone(), uds.clone());
        generators.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut streams = tokio::task::JoinSet::new();
            while !stop.is_cancelled() {
                tick.tick().await;
                let (load, uds) = (load.clone(), uds.clone());
                streams.spawn(async move { record(&load, held_stream(&uds, echo).await) });
            }
            while streams.join_next().await.is_some() {}
        });
    }

    let mut current = first;
    for round in 0..3 {
        let mut old_stream = tunnel_via(&uds, echo).await;
        exchange(&mut old_stream, "before the successor").await;
        let started = Instant::now();
        let next = replacement(&certs, &uds_flag, agent_port).await;
        next.wait_for_agent().await;
        let moved = started.elapsed();
        exchange(&mut old_stream, "after the agent moved").await;
        current.proc.terminate();
        exchange(&mut old_stream, "while the old server drains").await;
        drop(old_stream);
        let stopping = Instant::now();
        current.proc.exited().await;
        eprintln!(
            "surge {round}: agent on the successor {moved:?} after it started; the old server exited \
             {:?} after its last stream ended",
            stopping.elapsed()
        );
        assert_eq!(metric(next.admin_addr, "spoke_server_agents_connected").await, 1);
        current = next;
    }
    stop.cancel();
    while let Some(done) = generators.join_next().await {
        done.unwrap();
    }
    let load = load.lock().unwrap();
    eprintln!("{} requests and streams served across 3 surge replacements", load.ok);
    assert!(load.failures.is_empty(), "failed: {:?}", load.failures);
    assert!(load.ok > 100, "{} requests served", load.ok);
}
