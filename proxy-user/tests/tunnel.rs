//! End to end through real spoke-server and spoke-agent processes on 127.0.0.1: data integrity,
//! concurrency, half-close, abort, and isolation between streams.

mod common;

use std::time::Duration;

use common::{agent, certs, check_pattern, echo, send_pattern, server, tunnel};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const GIB: u64 = 1 << 30;
/// Bound of a 1 GiB transfer each way, about 20 times what it takes here: a relay that stalls (e.g. waits
/// for a wake-up that only a TCP window probe brings) fails instead of crawling.
const TRANSFER_BOUND: Duration = Duration::from_mins(1);

/// How the agent's data connections and datapath are set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// TLS data connections: userspace copy, or kernel TLS spliced where the kernel offers it.
    Tls,
    /// Plain data connections, splice(2) on both hops.
    PlainSplice,
}

/// A server (with the mTLS TCP frontend) and one connected agent in `mode`.
async fn system(mode: Mode) -> (common::Server, common::Agent) {
    let certs = certs();
    let mut srv = server(&certs).tcp_frontend();
    if mode == Mode::PlainSplice {
        srv = srv.allow_plaintext_tunnel().flag("--datapath", "splice");
    }
    let srv = srv.run().await;
    let mut a = agent(&srv);
    if mode == Mode::PlainSplice {
        a = a.plaintext("splice");
    }
    let a = a.run().await;
    (srv, a)
}

/// Server and agent carried `streams` streams on the tier `mode` should choose. (The agent counts a
/// stream once both of its ends are done, which can be just after the client saw the end.)
async fn assert_tier(srv: &common::Server, agent: &common::Agent, mode: Mode, streams: u64) {
    let tier = if mode == Mode::Tls { common::tls_tier() } else { "splice" };
    for (admin, who) in [(srv.admin_addr, "server"), (agent.admin_addr, "agent")] {
        let line = format!("spoke_{who}_datapath_streams_total{{tier=\"{tier}\"}}");
        assert_eq!(common::counted(admin, &line, streams).await, streams, "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_arrives_intact() {
    one_gib_each_way(Mode::Tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_arrives_intact_spliced() {
    one_gib_each_way(Mode::PlainSplice).await;
}

async fn one_gib_each_way(mode: Mode) {
    let (srv, agent) = system(mode).await;
    // The backend checks what the client sends and sends its own pattern back, both at once.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = listener.local_addr().unwrap();
    let backend = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let (mut r, mut w) = s.into_split();
        let (got, ()) = tokio::join!(check_pattern(&mut r, 1), send_pattern(&mut w, 2, GIB));
        got
    });
    let client = tunnel(&srv, backend_addr).await;
    let (mut r, mut w) = tokio::io::split(client);
    let both = async { tokio::join!(check_pattern(&mut r, 2), send_pattern(&mut w, 1, GIB)).0 };
    let got = tokio::time::timeout(TRANSFER_BOUND, both).await.expect("1 GiB each way within the bound");
    assert_eq!(got, GIB, "node → apiserver bytes");
    assert_eq!(backend.await.unwrap(), GIB, "apiserver → node bytes");
    assert_tier(&srv, &agent, mode, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_streams_all_verified() {
    two_hundred_concurrent_streams(Mode::Tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_streams_all_verified_spliced() {
    two_hundred_concurrent_streams(Mode::PlainSplice).await;
}

async fn two_hundred_concurrent_streams(mode: Mode) {
    let (srv, agent) = system(mode).await;
    let echo = echo().await;
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let uds = srv.uds.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = tokio::net::UnixStream::connect(&uds).await.unwrap();
            let (status, head) = common::connect_on(&mut s, &echo.to_string()).await;
            assert_eq!(status, 200, "stream {i}: {head}");
            let len = 64 * 1024 + i * 13;
            let (mut r, mut w) = s.into_split();
            let (got, ()) = tokio::join!(check_pattern(&mut r, i), send_pattern(&mut w, i, len));
            assert_eq!(got, len, "stream {i}");
        }));
    }
    for t in tasks {
        t.await.expect("stream task");
    }
    let ok = "spoke_server_streams_total{result=\"ok\"}";
    assert_eq!(common::counted(srv.admin_addr, ok, 200).await, 200, "{ok}");
    assert_tier(&srv, &agent, mode, 200).await;
    if mode != Mode::Tls {
        return;
    }
    // Refills of the pool resume TLS sessions instead of repeating full handshakes.
    let resumed =
        common::metric(agent.admin_addr, "spoke_agent_server_handshakes_total{kind=\"resumed\"}").await;
    let full = common::metric(agent.admin_addr, "spoke_agent_server_handshakes_total{kind=\"full\"}").await;
    assert!(
        resumed > full,
        "resumed {resumed} vs full {full} handshakes\n{}",
        common::admin_get(agent.admin_addr, "/metrics").await.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_from_the_client_side() {
    half_close_client(Mode::Tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_from_the_client_side_spliced() {
    half_close_client(Mode::PlainSplice).await;
}

async fn half_close_client(mode: Mode) {
    let (srv, _agent) = system(mode).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let backend = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        // Reads the whole request to EOF first, then answers: the answer must still get through.
        let mut req = Vec::new();
        s.read_to_end(&mut req).await.unwrap();
        let mut reply = b"got ".to_vec();
        reply.extend_from_slice(&req);
        reply.resize(3 << 20, b'r');
        s.write_all(&reply).await.unwrap();
        s.shutdown().await.unwrap();
        reply
    });
    let mut client = tunnel(&srv, addr).await;
    client.write_all(b"request").await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(common::WAIT, client.read_to_end(&mut got)).await;
    read.expect("the reply and its end arrive").unwrap();
    assert_eq!(got, backend.await.unwrap());
    assert!(got.starts_with(b"got request"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_from_the_backend_side() {
    half_close_backend(Mode::Tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_from_the_backend_side_spliced() {
    half_close_backend(Mode::PlainSplice).await;
}

async fn half_close_backend(mode: Mode) {
    let (srv, _agent) = system(mode).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let backend = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        // Speaks first and closes its side, then keeps reading.
        s.write_all(b"banner").await.unwrap();
        s.shutdown().await.unwrap();
        check_pattern(&mut s, 7).await
    });
    let mut client = tunnel(&srv, addr).await;
    let mut banner = Vec::new();
    client.read_to_end(&mut banner).await.unwrap();
    assert_eq!(banner, b"banner");
    // The client → backend direction still flows after the backend's FIN.
    send_pattern(&mut client, 7, 8 << 20).await;
    assert_eq!(backend.await.unwrap(), 8 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reset_reaches_the_client_as_an_abort() {
    backend_reset(Mode::Tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reset_reaches_the_client_as_an_abort_spliced() {
    backend_reset(Mode::PlainSplice).await;
}

async fn backend_reset(mode: Mode) {
    let (srv, _agent) = system(mode).await;
    common::backend_reset_reaches_the_client_as_an_abort(&srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_does_not_block_another_stream() {
    let certs = certs();
    let srv = server(&certs).run().await;
    let _agent = agent(&srv).run().await;
    // Stream 1: a backend that accepts and never reads.
    let stalled = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stalled_addr = stalled.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let (s, _) = stalled.accept().await.unwrap();
        tokio::time::sleep(Duration::from_hours(1)).await;
        drop(s);
    });
    let mut blocked = tunnel(&srv, stalled_addr).await;
    let (written_tx, mut written_rx) = tokio::sync::watch::channel(0u64);
    let pusher = tokio::spawn(async move {
        let chunk = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        while blocked.write_all(&chunk).await.is_ok() {
            total += chunk.len() as u64;
            let _ = written_tx.send(total);
        }
    });
    // Wait until the pusher is stuck: every buffer on the path is full.
    let mut last = 0;
    loop {
        match tokio::time::timeout(Duration::from_millis(500), written_rx.changed()).await {
            Ok(Ok(())) => last = *written_rx.borrow(),
            Ok(Err(_)) => panic!("pusher ended"),
            Err(_) => break,
        }
    }
    assert!(last > 0, "the stalled stream took some bytes before blocking");
    // Stream 2 through the same agent: 1,000 round trips all complete.
    let echo = echo().await;
    let mut s = tunnel(&srv, echo).await;
    let mut buf = [0u8; 64];
    let rounds = tokio::time::timeout(common::WAIT, async {
        for i in 0..1000u32 {
            let msg = [u8::try_from(i % 251).unwrap(); 64];
            s.write_all(&msg).await.unwrap();
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, msg);
        }
    })
    .await;
    assert!(rounds.is_ok(), "round trips stalled behind the blocked stream");
    assert!(!pusher.is_finished(), "the stalled stream is still blocked, not failed");
    pusher.abort();
    hold.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_data_after_the_connect_head_is_forwarded() {
    early_data(Mode::Tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_data_after_the_connect_head_is_forwarded_spliced() {
    early_data(Mode::PlainSplice).await;
}

async fn early_data(mode: Mode) {
    let (srv, agent) = system(mode).await;
    let echo = echo().await;
    let mut s = tokio::net::UnixStream::connect(&srv.uds).await.unwrap();
    // Request head and first payload bytes in one write.
    s.write_all(format!("CONNECT {echo} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nhello").as_bytes()).await.unwrap();
    let (status, _) = common::read_head(&mut s).await;
    assert_eq!(status, 200);
    // Then the rest of the stream, and its end.
    s.write_all(b", world").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"hello, world");
    assert_tier(&srv, &agent, mode, 1).await;
    let up = "spoke_server_bytes_total{direction=\"up\"}";
    assert_eq!(common::counted(srv.admin_addr, up, 12).await, 12, "{up} counts the early bytes");
}

/// A TLS data connection whose stream ended both ways carries the next stream, without a new TLS
/// handshake: every stream's bytes and ends arrive intact whether the client or the backend ends first,
/// and both sides count the reuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_data_connections_carry_one_stream_after_another() {
    const STREAMS: u64 = 40;
    let certs = certs();
    let srv = server(&certs).run().await;
    let agent = agent(&srv).flag("--pool-size", "2").run().await;
    let handshakes = |admin| async move {
        common::metric(admin, "spoke_agent_server_handshakes_total{kind=\"full\"}").await
            + common::metric(admin, "spoke_agent_server_handshakes_total{kind=\"resumed\"}").await
    };
    let before = handshakes(agent.admin_addr).await;
    // A backend that speaks first and ends its side, then reads the client's bytes to their end.
    let banner = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let banner_addr = banner.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = banner.accept().await {
            tokio::spawn(async move {
                s.write_all(b"banner").await.unwrap();
                s.shutdown().await.unwrap();
                check_pattern(&mut s, 3).await
            });
        }
    });
    let echo = echo().await;
    for i in 0..STREAMS {
        let len = 1 + i * 7919;
        if i % 2 == 0 {
            // The client ends first; the echo ends after it.
            let mut s = tunnel(&srv, echo).await;
            let (mut r, mut w) = s.split();
            let ((), got) = tokio::join!(send_pattern(&mut w, i, len), check_pattern(&mut r, i));
            assert_eq!(got, len, "stream {i}");
        } else {
            // The backend ends first; the client's bytes still flow after it.
            let mut s = tunnel(&srv, banner_addr).await;
            let mut head = Vec::new();
            s.read_to_end(&mut head).await.unwrap();
            assert_eq!(head, b"banner", "stream {i}");
            send_pattern(&mut s, 3, len).await;
        }
    }
    let reused = common::metric(agent.admin_addr, "spoke_agent_data_conns_reused_total").await;
    assert!(reused >= STREAMS / 2, "only {reused} of {STREAMS} streams left their connection reusable");
    let made = handshakes(agent.admin_addr).await - before;
    assert!(made < STREAMS / 2, "{made} handshakes for {STREAMS} streams");
    let line = "spoke_server_data_conns_reused_total";
    assert!(common::counted(srv.admin_addr, line, reused).await >= reused);
}

/// A dial the agent refuses or that fails leaves its data connection as it was parked: it takes the
/// next stream, TLS or plain, without a new handshake or challenge being needed first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_dials_leave_their_data_connection_for_the_next_stream() {
    for mode in [Mode::Tls, Mode::PlainSplice] {
        let (srv, agent) = system(mode).await;
        // A port with nothing listening: each dial is refused (502).
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        for _ in 0..10 {
            assert_eq!(common::connect_status(&srv, &closed.to_string()).await.0, 502, "{mode:?}");
        }
        let reused = "spoke_agent_data_conns_reused_total";
        assert_eq!(common::counted(agent.admin_addr, reused, 10).await, 10, "{mode:?}");
        assert_eq!(common::counted(srv.admin_addr, "spoke_server_data_conns_reused_total", 10).await, 10);
        let echo = echo().await;
        common::round_trip(&srv, echo).await;
    }
}
