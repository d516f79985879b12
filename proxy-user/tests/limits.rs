//! The server's global caps: streams past `--max-streams` get 503 (CONNECT and gRPC tunnels counted
//! together), a full shared pool of parked data connections (`--max-parked-conns`) leaves every agent
//! its own two and makes agents hold back instead of offering connections again and again, and caps
//! that cannot fit the memory limit stop the start. An idle agent's pool shrinks to two (the server
//! closes the rest after `--idle-pool-timeout`) and grows again with use. A connection its agent
//! abandons mid-handshake (routine in a reconnect storm) is counted apart from TLS failures.

mod common;

use std::time::Duration;

use common::{agent, certs, connect_status, echo, eventually, metric, round_trip, server, tunnel};
use spoke::frontend::grpc_client;
use tokio::net::UnixStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_servers_cap_get_503_whichever_protocol_brings_them() {
    let certs = certs();
    let srv = server(&certs).flag("--max-streams", "2").run().await;
    let _node = agent(&srv).run().await;
    let echo = echo().await;
    assert_eq!(metric(srv.admin_addr, "spoke_server_max_streams").await, 2);
    let first = tunnel(&srv, echo).await;
    let over_grpc =
        grpc_client::dial(UnixStream::connect(&srv.uds).await.unwrap(), &echo.to_string(), common::WAIT)
            .await
            .expect("a gRPC tunnel takes the second place");

    let (status, text) = connect_status(&srv, &echo.to_string()).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("--max-streams"), "the reply names the cap: {text}");
    let refused =
        grpc_client::dial(UnixStream::connect(&srv.uds).await.unwrap(), &echo.to_string(), common::WAIT)
            .await;
    let error = refused.err().expect("a third tunnel is refused");
    assert!(error.to_string().contains("--max-streams"), "{error}");
    assert_eq!(metric(srv.admin_addr, "spoke_server_streams_total{result=\"server_busy\"}").await, 2);

    // A place that frees is taken again.
    drop((first, over_grpc));
    eventually("the places are free", || async {
        metric(srv.admin_addr, "spoke_server_streams_open").await == 0
    })
    .await;
    round_trip(&srv, echo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_pool_leaves_each_agent_its_own_and_the_agents_hold_back() {
    let certs = certs();
    // Two agents may always park two each; one more place is shared.
    let srv = server(&certs).flag("--max-agents", "2").flag("--max-parked-conns", "5").run().await;
    let a = agent(&srv).id("node-a").flag("--pool-size", "8").run().await;
    let b = agent(&srv).id("node-b").flag("--pool-size", "8").run().await;
    let full = "spoke_server_agent_conn_failures_total{reason=\"server_pool_full\"}";
    eventually("the pool filled and refused the rest", || async {
        metric(srv.admin_addr, "spoke_server_data_conns_idle").await == 5
            && metric(srv.admin_addr, full).await > 0
    })
    .await;
    for node in [&a, &b] {
        eventually("each agent holds its own two", || async {
            metric(node.admin_addr, "spoke_agent_pool_idle").await >= 2
        })
        .await;
    }
    // Refused agents wait (5 s, doubling) before they offer one more each: no storm of handshakes.
    let refused = metric(srv.admin_addr, full).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = metric(srv.admin_addr, full).await;
    assert!(later <= refused + 2, "agents kept offering connections: {refused} then {later} refusals in 2 s");
    assert_eq!(metric(srv.admin_addr, "spoke_server_data_conns_idle").await, 5);
    // Streams go on: each takes a parked connection, and its agent refills.
    let echo = echo().await;
    for _ in 0..6 {
        round_trip(&srv, echo).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agents_pool_shrinks_to_two_and_grows_again_with_use() {
    let certs = certs();
    let srv = server(&certs).flag("--idle-pool-timeout", "2s").run().await;
    let node = agent(&srv).flag("--pool-size", "8").run().await;
    let parked = |admin| async move { metric(admin, "spoke_agent_pool_idle").await };
    eventually("the pool filled", || async { parked(node.admin_addr).await == 8 }).await;
    eventually("the idle pool shrank to two", || async {
        metric(srv.admin_addr, "spoke_server_data_conns_idle").await == 2
            && parked(node.admin_addr).await == 2
    })
    .await;
    // The agent keeps it there: no connection offered again and again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(parked(node.admin_addr).await, 2, "the agent refilled a pool the server shrank");

    // Use grows it again: each stream taken leaves room for one more.
    let echo = echo().await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tunnel(&srv, echo).await);
    }
    eventually("the pool grew with use", || async { parked(node.admin_addr).await >= 4 }).await;
    drop(held);
    round_trip(&srv, echo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_abandoned_mid_handshake_is_counted_apart_and_not_warned_about() {
    let certs = certs();
    let srv = server(&certs).run().await;
    // The start of a ClientHello record, then the connection closes.
    let mut tcp = tokio::net::TcpStream::connect(srv.agent_addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, &[0x16, 0x03, 0x01, 0x00, 0x40, 0x01, 0x00]).await.unwrap();
    drop(tcp);
    let early = "spoke_server_agent_conn_failures_total{reason=\"closed_early\"}";
    eventually("the abandoned handshake counted", || async { metric(srv.admin_addr, early).await == 1 })
        .await;
    let failed = "spoke_server_agent_conn_failures_total{reason=\"tls_handshake\"}";
    assert_eq!(metric(srv.admin_addr, failed).await, 0);
    assert!(!srv.proc.log().contains("agent TLS handshake failed"), "{}", srv.proc.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_that_cannot_fit_the_memory_limit_stop_the_start() {
    let certs = certs();
    let (status, log) =
        server(&certs).flag("--memory-limit", "128Mi").flag("--max-streams", "100").run_to_exit().await;
    assert_eq!(status.code(), Some(i32::from(spoke::EXIT_CONFIG)), "{log}");
    assert!(log.contains("128 MiB from --memory-limit") && log.contains("cannot hold"), "{log}");
    assert!(log.contains("100 streams (--max-streams)"), "{log}");
    let (status, log) =
        server(&certs).flag("--max-agents", "100").flag("--max-parked-conns", "150").run_to_exit().await;
    assert_eq!(status.code(), Some(i32::from(spoke::EXIT_CONFIG)), "{log}");
    assert!(log.contains("below 2 for each of 100 agents"), "{log}");

    // Left to their defaults, the caps are what fits.
    let srv = server(&certs).flag("--memory-limit", "256Mi").run().await;
    let streams = metric(srv.admin_addr, "spoke_server_max_streams").await;
    assert!((10..100).contains(&streams), "{streams} streams under 256 MiB");
    assert!(srv.proc.log().contains("memory budget"), "the budget is logged");
}
