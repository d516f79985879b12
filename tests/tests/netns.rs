//! The tunnel across network namespaces: the agent on a "node" reached only through a veth link,
//! dialing its kubelet under the default policy; and a host on that link attacking plaintext data
//! connections.

#[path = "../../proxy-user/tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use common::{agent, certs, check_pattern, connect_status, eventually, metric, send_pattern, server};
use spoke_tests::{Netns, privileged};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_in_a_namespace_reaches_its_kubelet_with_the_default_policy() {
    if !privileged("network namespace test") {
        return;
    }
    let ns = Netns::new();
    let certs = certs();
    let srv = server(&certs).flag("--agent-bind", &format!("{}:0", ns.host_addr)).run().await;
    // A "kubelet" inside the node's namespace, on the node's address.
    let kubelet_addr = echo_kubelet(&ns);
    let _agent = agent(&srv)
        .netns(&ns.name)
        .id("node-1")
        .identifiers(&format!("ipv4={}", ns.ns_addr))
        .flag("--kubelet-port", &kubelet_addr.port().to_string())
        // The development certificate names localhost; the agent dials the server by address.
        .flag("--tls-server-name", "localhost")
        .spawn()
        .await;
    srv.wait_for_agent().await;

    // The kubelet port on the node's address is allowed by default.
    let mut s = common::tunnel(&srv, kubelet_addr).await;
    let (mut r, mut w) = tokio::io::split(&mut s);
    let len = 16 << 20;
    let (got, ()) = tokio::join!(check_pattern(&mut r, 3), send_pattern(&mut w, 3, len));
    assert_eq!(got, len);
    // Another port on the node's address is not.
    let (status, text) = connect_status(&srv, &format!("{}:{}", ns.ns_addr, kubelet_addr.port() + 1)).await;
    assert_eq!(status, 403, "{text}");
    // An address no agent claims (and no default route): 503.
    let (status, text) = connect_status(&srv, "198.19.0.1:80").await;
    assert_eq!(status, 503, "{text}");
}

/// Where an on-path host's relay stands between the agent and the server.
struct OnPath {
    /// Dials the server forged so far.
    forged: AtomicU32,
    /// The attacker's own data connections the server refused.
    injected: AtomicU32,
}

/// An attacker's host on the path of a node's plaintext data connections: it relays every connection
/// (as a router or NAT between node and control plane could), reads the plaintext frames, rewrites the
/// destination of the first `Dial` it sees to `target`, and opens a data connection of its own on the
/// session it observed, answering the server's challenge with a proof it recorded from the agent.
async fn on_path_relay(
    listener: tokio::net::TcpListener,
    server: SocketAddr,
    target: SocketAddr,
    state: Arc<OnPath>,
) {
    use spoke::codec::{read_message, write_message};
    use spoke::protocol::Message;
    while let Ok((mut agent, _)) = listener.accept().await {
        let state = state.clone();
        tokio::spawn(async move {
            let Ok(mut upstream) = TcpStream::connect(server).await else { return };
            let mut first = [0u8; 1];
            if agent.peek(&mut first).await.unwrap_or(0) == 0 || first[0] == 0x16 {
                // TLS (the control channel): opaque to the relay.
                let _ = tokio::io::copy_bidirectional(&mut agent, &mut upstream).await;
                return;
            }
            // DataHello →, ← Challenge, DataProof →: all in clear.
            let Ok(hello @ Message::DataHello { session_id, version }) = read_message(&mut agent).await
            else {
                return;
            };
            write_message(&mut upstream, &hello).await.unwrap();
            let Ok(challenge) = read_message(&mut upstream).await else { return };
            write_message(&mut agent, &challenge).await.unwrap();
            let Ok(proof) = read_message(&mut agent).await else { return };
            write_message(&mut upstream, &proof).await.unwrap();
            // Its own connection on the observed session, with the recorded proof: the server's new
            // challenge makes it worthless.
            if let Ok(mut own) = TcpStream::connect(server).await {
                write_message(&mut own, &Message::DataHello { version, session_id }).await.unwrap();
                if let Ok(Message::Challenge { .. }) = read_message(&mut own).await {
                    write_message(&mut own, &proof).await.unwrap();
                    if let Ok(Message::Reject { .. }) = read_message(&mut own).await {
                        state.injected.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            let Ok(dial) = read_message(&mut upstream).await else { return };
            let dial = match dial {
                Message::Dial { stream_id, timeout_ms, mac, .. }
                    if state.forged.fetch_add(1, Ordering::Relaxed) == 0 =>
                {
                    Message::Dial {
                        stream_id,
                        host: target.ip().to_string(),
                        port: target.port(),
                        timeout_ms,
                        mac,
                    }
                }
                other => other,
            };
            write_message(&mut agent, &dial).await.unwrap();
            let _ = tokio::io::copy_bidirectional(&mut agent, &mut upstream).await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_on_the_path_can_neither_forge_dials_nor_join_sessions() {
    if !privileged("network namespace test") {
        return;
    }
    let ns = Netns::new();
    let certs = certs();
    let srv = server(&certs).allow_plaintext_tunnel().run().await;
    let echo_in_ns = |listener: std::net::TcpListener, hits: Arc<AtomicU32>| {
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                hits.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
    };
    // The node's kubelet, and a service of the node the attacker would like to reach instead.
    let kubelet = ns.bind(SocketAddr::new(ns.ns_addr.into(), 0));
    let kubelet_addr = kubelet.local_addr().unwrap();
    let prize = ns.bind(SocketAddr::new(ns.ns_addr.into(), 0));
    let prize_addr = prize.local_addr().unwrap();
    let prize_hits = Arc::new(AtomicU32::new(0));
    echo_in_ns(kubelet, Arc::new(AtomicU32::new(0)));
    echo_in_ns(prize, prize_hits.clone());
    // The node reaches the control plane only through the attacker's relay.
    let relay = tokio::net::TcpListener::bind((ns.host_addr, 0)).await.unwrap();
    let relay_port = relay.local_addr().unwrap().port();
    let state = Arc::new(OnPath { forged: AtomicU32::new(0), injected: AtomicU32::new(0) });
    tokio::spawn(on_path_relay(relay, srv.agent_addr, prize_addr, state.clone()));
    let node = agent(&srv)
        .netns(&ns.name)
        .id("node-1")
        .identifiers(&format!("ipv4={}", ns.ns_addr))
        .plaintext("splice")
        // Its policy would let the forged dial through: only the dial's signature stops it.
        .allow(&format!("{}/32", ns.ns_addr))
        .flag("--proxy-server-host", &ns.host_addr.to_string())
        .flag("--proxy-server-port", &relay_port.to_string())
        .flag("--tls-server-name", "localhost")
        .flag("--admin-bind", &format!("{}:0", ns.ns_addr))
        .spawn()
        .await;
    srv.wait_for_agent().await;

    // Streams to the kubelet succeed (the one whose dial was forged is retried on another data
    // connection), and every byte arrives.
    for _ in 0..3 {
        let mut s = common::tunnel(&srv, kubelet_addr).await;
        let (mut r, mut w) = tokio::io::split(&mut s);
        let len = 1 << 20;
        let (got, ()) = tokio::join!(check_pattern(&mut r, 5), send_pattern(&mut w, 5, len));
        assert_eq!(got, len);
    }
    assert!(state.forged.load(Ordering::Relaxed) >= 1, "the relay saw a dial to forge");
    assert_eq!(prize_hits.load(Ordering::Relaxed), 0, "the forged dial reached nothing");
    let forged = "spoke_agent_server_conn_failures_total{kind=\"forged_dial\"}";
    assert_eq!(metric(node.admin_addr, forged).await, 1, "the agent refused the forged dial");
    // The attacker's own data connections never joined the session.
    eventually("the injected connections refused", || async {
        metric(srv.admin_addr, "spoke_server_agent_conn_failures_total{reason=\"bad_proof\"}").await
            >= u64::from(state.injected.load(Ordering::Relaxed))
            && state.injected.load(Ordering::Relaxed) >= 1
    })
    .await;
}

/// An echo "kubelet" inside `ns`, on its address.
fn echo_kubelet(ns: &Netns) -> SocketAddr {
    let kubelet = ns.bind(SocketAddr::new(ns.ns_addr.into(), 0));
    let addr = kubelet.local_addr().unwrap();
    kubelet.set_nonblocking(true).unwrap();
    let kubelet = tokio::net::TcpListener::from_std(kubelet).unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = kubelet.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
            });
        }
    });
    addr
}

/// The node's link goes silent (every packet dropped, no RST) with a stream moving data both ways.
/// Keepalive never probes a connection with unacknowledged data, and TCP would retransmit into the
/// void for about 15 minutes; `--tcp-user-timeout` (3 s here, on both sides) ends the stream within
/// its bound instead, though heartbeats here would notice nothing for 3 minutes. Once the link is
/// back, the agent returns and streams work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_gone_silent_with_data_in_flight_fails_within_the_user_timeout() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    if !privileged("network namespace test") {
        return;
    }
    let ns = Netns::new();
    let certs = certs();
    let srv = server(&certs)
        .flag("--agent-bind", &format!("{}:0", ns.host_addr))
        .flag("--heartbeat-interval", "60s")
        .flag("--tcp-user-timeout", "3s")
        .run()
        .await;
    let kubelet = echo_kubelet(&ns);
    let _agent = agent(&srv)
        .netns(&ns.name)
        .id("node-1")
        .identifiers(&format!("ipv4={}", ns.ns_addr))
        .flag("--kubelet-port", &kubelet.port().to_string())
        .flag("--tls-server-name", "localhost")
        .flag("--tcp-user-timeout", "3s")
        .spawn()
        .await;
    srv.wait_for_agent().await;
    let s = common::tunnel(&srv, kubelet).await;
    let (mut r, mut w) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        while w.write_all(&chunk).await.is_ok() {}
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut echoed = 0usize;
    while echoed < 4 << 20 {
        echoed += r.read(&mut buf).await.expect("echo before the link goes silent");
    }
    ns.silence();
    let silenced = std::time::Instant::now();
    let ended = tokio::time::timeout(common::WAIT, async {
        while matches!(r.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    assert!(ended.is_ok(), "the stream over a silent link was still open after {:?}", common::WAIT);
    eprintln!("a stream over a silent link ended {:?} after the silence began", silenced.elapsed());
    writer.abort();
    ns.restore();
    // The agent's control channel died with the link (its pings went unacknowledged); it returns.
    eventually("a stream through the returned agent", || async {
        let Ok(mut s) = tokio::net::UnixStream::connect(&srv.uds).await else { return false };
        if common::connect_on(&mut s, &kubelet.to_string()).await.0 != 200 {
            return false;
        }
        s.write_all(b"back").await.is_ok() && {
            let mut got = [0u8; 4];
            s.read_exact(&mut got).await.is_ok() && &got == b"back"
        }
    })
    .await;
}

/// The node's link goes silent with the control channel idle: the server finds the agent gone by its
/// heartbeats, and new requests for the node are answered 503 at once rather than left hanging; when
/// the link returns, so does the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_idle_link_is_found_by_heartbeats_and_requests_meanwhile_get_503() {
    if !privileged("network namespace test") {
        return;
    }
    let ns = Netns::new();
    let certs = certs();
    // The fixture's heartbeat is 500 ms: an agent silent for 1.5 s is dropped.
    let srv = server(&certs).flag("--agent-bind", &format!("{}:0", ns.host_addr)).run().await;
    let kubelet = echo_kubelet(&ns);
    let _agent = agent(&srv)
        .netns(&ns.name)
        .id("node-1")
        .identifiers(&format!("ipv4={}", ns.ns_addr))
        .flag("--kubelet-port", &kubelet.port().to_string())
        .flag("--tls-server-name", "localhost")
        .spawn()
        .await;
    srv.wait_for_agent().await;
    ns.silence();
    eventually("the silent agent dropped", || async {
        metric(srv.admin_addr, "spoke_server_agents_connected").await == 0
    })
    .await;
    let asked = std::time::Instant::now();
    let (status, text) = tokio::time::timeout(common::WAIT, connect_status(&srv, &kubelet.to_string()))
        .await
        .expect("a request for a node whose agent is gone is answered, not left hanging");
    assert_eq!(status, 503, "{text}");
    eprintln!("a request for the silent node was answered 503 in {:?}", asked.elapsed());
    ns.restore();
    srv.wait_for_agent().await;
    let mut s = common::tunnel(&srv, kubelet).await;
    let (mut r, mut w) = tokio::io::split(&mut s);
    let (got, ()) = tokio::join!(check_pattern(&mut r, 5), send_pattern(&mut w, 5, 1 << 20));
    assert_eq!(got, 1 << 20);
}
