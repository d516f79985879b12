//! Restarting spoke-server as a static-pod update does (stop the old process, then start the new one on
//! the same socket and ports) under a steady stream of requests, with idle keep-alive tunnels held open
//! as kube-apiserver holds them: the old server keeps serving while it drains, closes the idle tunnels
//! instead of waiting for them, and exits; the agent comes back to the new one at once.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{agent, certs, echo, metric, server, tunnel_via};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// What the steady stream of requests saw: when each failure happened, and how many succeeded.
#[derive(Default)]
struct Load {
    ok: u64,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_server_fails_no_request_while_it_drains() {
    let certs = certs();
    let uds: PathBuf = certs.dir.path().join("restart.sock");
    let uds_flag = uds.display().to_string();
    let first =
        server(&certs).flag("--uds-name", &uds_flag).flag("--drain-idle-timeout", "500ms").run().await;
    let agent_port = first.agent_addr.port();
    let echo = echo().await;
    let _agent = agent(&first).run().await;

    let load = Arc::new(Mutex::new(Load::default()));
    let stop = tokio_util::sync::CancellationToken::new();
    let generator = {
        let (load, stop, uds) = (load.clone(), stop.clone(), uds.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let result = request(&uds, echo).await;
                {
                    let mut load = load.lock().unwrap();
                    match result {
                        Ok(()) => load.ok += 1,
                        Err(e) => load.failures.push((Instant::now(), e)),
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let mut current = first;
    for round in 0..3 {
        // Idle keep-alive tunnels, as the apiserver keeps to kubelets between requests.
        let mut idle = Vec::new();
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
        let next = server(&certs)
            .flag("--uds-name", &uds_flag)
            .flag("--drain-idle-timeout", "500ms")
            .agent_port(agent_port)
            .run()
            .await;
        let started = Instant::now();
        next.wait_for_agent().await;
        let routed = started.elapsed();
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
             after the new server started; no listener for {} requests {gap:?}; {} requests before the \
             agent was back {routing:?}",
            exited.duration_since(drain_started),
            gap.len(),
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
