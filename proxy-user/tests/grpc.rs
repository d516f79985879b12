//! Konnectivity's gRPC tunnel (`proxyProtocol: GRPC`) end to end through server and agent, with a client
//! that behaves as kube-apiserver's (`spoke::frontend::grpc_client`: one connection and call per dial,
//! as konnectivity-client's single-use tunnel), and raw calls for what other clients and attackers send.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{agent, certs, check_pattern, closed_port, echo, eventually, metric, send_pattern, server};
use spoke::frontend::grpc_client::{self, Call, ClientTunnel, TunnelError};
use spoke::frontend::konnectivity::{self, Packet, Payload};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UnixStream};

/// How long a test client waits for a `DIAL_RSP`, as kube-apiserver does.
const DIAL_WAIT: Duration = Duration::from_secs(30);

async fn call(srv: &common::Server) -> Call {
    Call::open(UnixStream::connect(&srv.uds).await.unwrap()).await.expect("open a Proxy call")
}

async fn dial(srv: &common::Server, dest: &str) -> Result<ClientTunnel, TunnelError> {
    grpc_client::dial(UnixStream::connect(&srv.uds).await.unwrap(), dest, DIAL_WAIT).await
}

async fn tunnel(srv: &common::Server, dest: SocketAddr) -> ClientTunnel {
    dial(srv, &dest.to_string()).await.expect("gRPC dial")
}

/// The next packet of a raw call, within the test's patience.
async fn next(call: &mut Call) -> Option<Packet> {
    tokio::time::timeout(common::WAIT, call.recv()).await.expect("a packet in time").expect("call alive")
}

/// The status that ended a raw call (`what` names the case).
async fn ended_with(call: &mut Call, what: &str) -> tonic::Status {
    loop {
        match tokio::time::timeout(common::WAIT, call.recv()).await.expect("the call ends in time") {
            Ok(Some(_)) => {}
            Ok(None) => panic!("{what}: the call ended in order"),
            Err(TunnelError::Grpc(status)) => return status,
            Err(other) => panic!("{other}"),
        }
    }
}

fn grpc_result(result: &str) -> String {
    format!("spoke_server_frontend_requests_total{{frontend_protocol=\"grpc\",result=\"{result}\"}}")
}

fn refused(reason: &str) -> String {
    format!("spoke_server_grpc_refused_total{{reason=\"{reason}\"}}")
}

async fn echo_round(t: &mut ClientTunnel, msg: &[u8]) {
    t.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(common::WAIT, t.read_exact(&mut back)).await.expect("echo in time").unwrap();
    assert_eq!(back, msg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dial_failure_says_what_happened_and_ends_the_call() {
    let certs = certs();
    let srv =
        server(&certs).flag("--backend-dial-timeout", "1s").flag("--max-streams-per-agent", "1").run().await;
    let _agent = agent(&srv).allow("127.0.0.1/32").run().await;
    let echo = echo().await;
    let refused_port = closed_port().await;
    let (full, _fillers) = common::full_backlog();
    let cases = [
        ("127.0.0.3:80".to_owned(), "denied", "denied"),
        (refused_port.to_string(), "refused", "refused"),
        (full.to_string(), "timeout", "timeout"),
        ("not-an-address".to_owned(), "malformed", "malformed"),
    ];
    for (dest, text, result) in &cases {
        let mut call = call(&srv).await;
        match call.dial(fastrand::i64(1..), dest, DIAL_WAIT).await {
            Err(TunnelError::Refused(error)) => assert!(error.contains(text), "{dest}: {error}"),
            other => panic!("{dest}: {:?}", other.map(|_| ())),
        }
        // A failed dial ends the call (older clients would otherwise keep the connection open).
        assert!(next(&mut call).await.is_none(), "{dest}: the call goes on after a failed dial");
        assert_eq!(metric(srv.admin_addr, &grpc_result(result)).await, 1, "{result}");
    }
    // The agent's one stream slot is taken: the next dial is refused as busy.
    let mut held = tunnel(&srv, echo).await;
    echo_round(&mut held, b"held").await;
    match dial(&srv, &echo.to_string()).await {
        Err(TunnelError::Refused(error)) => assert!(error.contains("stream limit"), "{error}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert_eq!(metric(srv.admin_addr, &grpc_result("agent_busy")).await, 1);
    assert_eq!(metric(srv.admin_addr, &grpc_result("ok")).await, 1);
    // The same results, without the protocol, in streams_total.
    assert_eq!(metric(srv.admin_addr, "spoke_server_streams_total{result=\"denied\"}").await, 1);
    // No agent at all.
    let alone = server(&certs).run().await;
    let mut call = call(&alone).await;
    match call.dial(1, "10.9.9.9:10250", DIAL_WAIT).await {
        Err(TunnelError::Refused(error)) => {
            assert!(error.contains("no agent serves 10.9.9.9:10250"), "{error}");
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert!(next(&mut call).await.is_none());
    assert_eq!(metric(alone.admin_addr, &grpc_result("no_agent")).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_both_ways_arrives_intact_over_the_socket_and_mtls() {
    const LEN: u64 = 48 << 20;
    let certs = certs();
    let srv = server(&certs).tcp_frontend().run().await;
    let _agent = agent(&srv).run().await;
    let echo = echo().await;
    let over_uds = tunnel(&srv, echo).await;
    let f = &srv.certs.files;
    let connector = common::frontend_connector(&f.frontend_ca, Some((&f.client_cert, &f.client_key)));
    let tcp = TcpStream::connect(srv.frontend_addr.unwrap()).await.unwrap();
    let tls = connector.connect("localhost".try_into().unwrap(), tcp).await.unwrap();
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        None,
        "no ALPN offered, none chosen: told apart by its bytes"
    );
    let over_tls = grpc_client::dial(tls, &echo.to_string(), DIAL_WAIT).await.expect("dial over mTLS");
    for (seed, t) in [(1, over_uds), (2, over_tls)] {
        let (mut r, mut w) = tokio::io::split(t);
        let writer = tokio::spawn(async move { send_pattern(&mut w, seed, LEN).await });
        assert_eq!(check_pattern(&mut r, seed).await, LEN);
        writer.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn either_side_may_close_first() {
    let certs = certs();
    let srv = server(&certs).run().await;
    let _agent = agent(&srv).run().await;
    // The node side closes first: the client reads to the end (CLOSE_RSP), then sends CLOSE_REQ and
    // is answered with CLOSE_RSP again, as kube-apiserver waits for.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bye = listener.local_addr().unwrap();
    let (seen_tx, seen) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"bye").await.unwrap();
        drop(s);
        // The second connection: read until the client's end reaches it.
        let (mut s, _) = listener.accept().await.unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        let _ = seen_tx.send(rest);
    });
    let mut call = call(&srv).await;
    let id = call.dial(1, &bye.to_string(), DIAL_WAIT).await.unwrap();
    let mut got = Vec::new();
    loop {
        match next(&mut call).await.and_then(|p| p.payload) {
            Some(Payload::Data(d)) => got.extend_from_slice(&d.data),
            Some(Payload::CloseResponse(c)) => {
                assert_eq!((c.connect_id, c.error.as_str()), (id, ""));
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, b"bye");
    call.send(konnectivity::close_request(id)).await.unwrap();
    let Some(Payload::CloseResponse(c)) = next(&mut call).await.and_then(|p| p.payload) else { panic!() };
    assert_eq!((c.connect_id, c.error.as_str()), (id, ""));

    // The client closes first: the node side sees its end at once, the client gets CLOSE_RSP.
    let mut t = tunnel(&srv, bye).await;
    t.write_all(b"last words").await.unwrap();
    t.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(common::WAIT, t.read_to_end(&mut rest)).await.expect("CLOSE_RSP in time").unwrap();
    let seen = tokio::time::timeout(common::WAIT, seen).await.expect("the node side ended").unwrap();
    assert_eq!(seen, b"last words");

    // A dropped tunnel is closed as kube-apiserver closes one (CLOSE_REQ, then CLOSE_RSP), so the node
    // side ends in order and its data connection carries the next stream.
    let echo = echo().await;
    let reused = "spoke_server_data_conns_reused_total";
    let before = metric(srv.admin_addr, reused).await;
    for _ in 0..3 {
        let mut t = tunnel(&srv, echo).await;
        echo_round(&mut t, b"x").await;
        drop(t);
    }
    eventually("dropped tunnels' data connections reused", || async {
        metric(srv.admin_addr, reused).await >= before + 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_cls_releases_a_slow_dial_at_once() {
    let certs = certs();
    let srv = server(&certs).flag("--backend-dial-timeout", "20s").run().await;
    let _agent = agent(&srv).run().await;
    let (full, _fillers) = common::full_backlog();
    let mut call = call(&srv).await;
    let started = std::time::Instant::now();
    let result = call.dial(5, &full.to_string(), Duration::from_millis(300)).await;
    assert!(matches!(result, Err(TunnelError::Timeout(_))), "{:?}", result.map(|_| ()));
    // DIAL_CLS sent: the dial is given up long before its 20 s timeout, and the call ends.
    assert!(next(&mut call).await.is_none());
    eventually("the dial released", || async {
        metric(srv.admin_addr, "spoke_server_pending_dials").await == 0
            && metric(srv.admin_addr, &grpc_result("dial_cancelled")).await == 1
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_dials_share_one_call() {
    const N: i64 = 20;
    let certs = certs();
    let srv = server(&certs).run().await;
    let _agent = agent(&srv).run().await;
    let echo = echo().await;
    let mut call = call(&srv).await;
    for random in 1..=N {
        call.send(konnectivity::dial_request(random, echo.to_string())).await.unwrap();
    }
    let mut ids = std::collections::HashMap::new();
    while ids.len() < usize::try_from(N).unwrap() {
        let Some(Payload::DialResponse(r)) = next(&mut call).await.and_then(|p| p.payload) else { panic!() };
        assert!(r.error.is_empty(), "{}", r.error);
        ids.insert(r.connect_id, r.random);
    }
    for (id, random) in &ids {
        call.send(konnectivity::data(*id, format!("tunnel {random}").into())).await.unwrap();
    }
    let mut echoed = std::collections::HashMap::<i64, Vec<u8>>::new();
    while echoed.values().map(Vec::len).sum::<usize>()
        < ids.values().map(|r| format!("tunnel {r}").len()).sum()
    {
        let Some(Payload::Data(d)) = next(&mut call).await.and_then(|p| p.payload) else { panic!() };
        echoed.entry(d.connect_id).or_default().extend_from_slice(&d.data);
    }
    for (id, random) in &ids {
        assert_eq!(echoed[id], format!("tunnel {random}").as_bytes());
        call.send(konnectivity::close_request(*id)).await.unwrap();
    }
    let mut closed = 0;
    while closed < N {
        if let Some(Payload::CloseResponse(c)) = next(&mut call).await.and_then(|p| p.payload) {
            assert!(ids.contains_key(&c.connect_id) && c.error.is_empty());
            closed += 1;
        }
    }
    eventually("every stream ended", || async {
        metric(srv.admin_addr, "spoke_server_streams_open").await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_stalls_neither_another_tunnel_nor_the_servers_memory() {
    let certs = certs();
    let srv = server(&certs).run().await;
    let _agent = agent(&srv).run().await;
    let echo = echo().await;
    // A backend that sends without end to a client that never reads.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let firehose = listener.local_addr().unwrap();
    let (sent_tx, mut sent) = tokio::sync::watch::channel(0u64);
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let chunk = vec![7u8; 64 * 1024];
        let mut total = 0;
        while s.write_all(&chunk).await.is_ok() {
            total += chunk.len() as u64;
            sent_tx.send_replace(total);
        }
    });
    let rss_before = srv.proc.rss_kib();
    let _stalled = tunnel(&srv, firehose).await;
    // The backend stops once every window and buffer on the way is full.
    let mut last = 0;
    while let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(500), sent.changed()).await {
        last = *sent.borrow();
    }
    let mut other = tunnel(&srv, echo).await;
    for i in 0..50 {
        echo_round(&mut other, format!("round {i}").as_bytes()).await;
    }
    let grown = srv.proc.rss_kib().saturating_sub(rss_before);
    assert!(last < 64 << 20, "the stalled tunnel took {last} bytes from its backend");
    assert!(grown < 24 * 1024, "the server grew {grown} KiB behind one stalled tunnel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_serves_open_tunnels_and_closes_idle_ones_in_order() {
    let certs = certs();
    let srv = server(&certs)
        .flag("--drain-idle-timeout", "1s")
        .flag("--graceful-shutdown-timeout", "20s")
        .run()
        .await;
    let _agent = agent(&srv).run().await;
    let echo = echo().await;
    let mut t = tunnel(&srv, echo).await;
    echo_round(&mut t, b"before").await;
    srv.proc.terminate();
    // Kept busy, the tunnel keeps working while the server drains...
    for i in 0..10 {
        echo_round(&mut t, format!("draining {i}").as_bytes()).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ...and once idle it is closed in order: CLOSE_RSP, an end the client sees between requests.
    let mut rest = Vec::new();
    tokio::time::timeout(common::WAIT, t.read_to_end(&mut rest)).await.expect("closed while idle").unwrap();
    assert!(rest.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_grpc_clients_share_one_socket() {
    let certs = certs();
    let srv = server(&certs).run().await;
    let _agent = agent(&srv).run().await;
    let echo = echo().await;
    let uds = srv.uds.clone();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40u32 {
        let uds = uds.clone();
        tasks.spawn(async move {
            let msg = format!("client {i}");
            if i % 2 == 0 {
                let io = UnixStream::connect(&uds).await.unwrap();
                let mut t = grpc_client::dial(io, &echo.to_string(), DIAL_WAIT).await.unwrap();
                echo_round(&mut t, msg.as_bytes()).await;
            } else {
                let mut s = common::tunnel_via(&uds, echo).await;
                s.write_all(msg.as_bytes()).await.unwrap();
                let mut back = vec![0u8; msg.len()];
                s.read_exact(&mut back).await.unwrap();
                assert_eq!(back, msg.as_bytes());
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    assert_eq!(
        metric(srv.admin_addr, "spoke_server_frontend_conns_total{frontend_protocol=\"grpc\"}").await,
        20
    );
    assert_eq!(
        metric(srv.admin_addr, "spoke_server_frontend_conns_total{frontend_protocol=\"http-connect\"}").await,
        20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_counted_and_leaves_nothing_behind() {
    let certs = certs();
    let srv = server(&certs).flag("--header-timeout", "1s").run().await;
    let _agent = agent(&srv).run().await;
    let echo = echo().await;
    let baseline = srv.proc.fds();

    // DATA for a tunnel that never existed: CLOSE_RSP with an error.
    let mut c = call(&srv).await;
    c.send(konnectivity::data(424_242, "x".into())).await.unwrap();
    let Some(Payload::CloseResponse(r)) = next(&mut c).await.and_then(|p| p.payload) else { panic!() };
    assert_eq!(r.connect_id, 424_242);
    assert!(r.error.contains("unknown connectID"), "{}", r.error);
    assert_eq!(metric(srv.admin_addr, &refused("unknown_connect_id")).await, 1);
    drop(c);

    // A duplicate random while the first dial is pending ends the call.
    let (full, _fillers) = common::full_backlog();
    let mut c = call(&srv).await;
    c.send(konnectivity::dial_request(9, full.to_string())).await.unwrap();
    c.send(konnectivity::dial_request(9, full.to_string())).await.unwrap();
    assert_eq!(ended_with(&mut c, "duplicate").await.code(), tonic::Code::InvalidArgument);
    assert_eq!(metric(srv.admin_addr, &refused("duplicate_random")).await, 1);

    // A packet without a payload; one whose type names another payload; one only servers send.
    for (packet, reason) in [
        (Packet { r#type: 4, payload: None }, "no_payload"),
        (Packet { r#type: 4, ..konnectivity::close_request(1) }, "type_mismatch"),
        (konnectivity::close_response(1, String::new()), "server_only_packet"),
    ] {
        let mut c = call(&srv).await;
        c.send(packet).await.unwrap();
        assert_eq!(ended_with(&mut c, reason).await.code(), tonic::Code::InvalidArgument, "{reason}");
        assert_eq!(metric(srv.admin_addr, &refused(reason)).await, 1, "{reason}");
    }

    // An oversized message.
    let mut t = tunnel(&srv, echo).await;
    echo_round(&mut t, b"ok").await;
    let mut c = call(&srv).await;
    let id = c.dial(3, &echo.to_string(), DIAL_WAIT).await.unwrap();
    c.send(konnectivity::data(id, vec![0u8; 2 << 20].into())).await.unwrap();
    assert_eq!(ended_with(&mut c, "oversized").await.code(), tonic::Code::ResourceExhausted);
    assert_eq!(metric(srv.admin_addr, &refused("oversized")).await, 1);

    // A call that never dials, and a connection that never calls, are closed after --header-timeout.
    let mut c = call(&srv).await;
    assert_eq!(ended_with(&mut c, "no dial").await.code(), tonic::Code::DeadlineExceeded);
    assert_eq!(metric(srv.admin_addr, &refused("no_dial")).await, 1);
    let mut silent = UnixStream::connect(&srv.uds).await.unwrap();
    silent.write_all(spoke::frontend::sniff::H2_PREFACE).await.unwrap();
    silent.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap(); // empty SETTINGS
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(common::WAIT, silent.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "a connection without calls stays open");

    // A CONTINUATION frame with no header block before it ends the connection at once.
    let mut stray = UnixStream::connect(&srv.uds).await.unwrap();
    stray.write_all(spoke::frontend::sniff::H2_PREFACE).await.unwrap();
    stray.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    stray.write_all(&[0, 0, 1, 9, 4, 0, 0, 0, 1, 0x82]).await.unwrap(); // CONTINUATION, stream 1
    let closed = tokio::time::timeout(common::WAIT, stray.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "a connection with a broken header block stays open");
    assert_eq!(metric(srv.admin_addr, &refused("bad_headers")).await, 1);

    // Clients gone mid-dial, mid-stream and right after a dial: nothing stays behind.
    for _ in 0..20 {
        let c = call(&srv).await;
        c.send(konnectivity::dial_request(1, full.to_string())).await.unwrap();
        drop(c);
        let mut t = tunnel(&srv, echo).await;
        echo_round(&mut t, b"x").await;
        t.abandon();
        dial(&srv, &echo.to_string()).await.unwrap().abandon();
    }
    t.abandon();
    drop(silent);
    eventually("every call, stream, dial and fd released", || async {
        metric(srv.admin_addr, "spoke_server_grpc_calls_open").await == 0
            && metric(srv.admin_addr, "spoke_server_streams_open").await == 0
            && metric(srv.admin_addr, "spoke_server_pending_dials").await == 0
            && srv.proc.fds() <= baseline + 8
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_restricts_the_socket_to_one_protocol() {
    let certs = certs();
    let echo = echo().await;
    let grpc_only = server(&certs).flag("--mode", "grpc").run().await;
    let _a = agent(&grpc_only).run().await;
    let (status, text) = common::connect_status(&grpc_only, &echo.to_string()).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("--mode grpc"), "{text}");
    echo_round(&mut tunnel(&grpc_only, echo).await, b"grpc").await;

    let connect_only = server(&certs).flag("--mode", "http-connect").run().await;
    let _b = agent(&connect_only).run().await;
    assert!(dial(&connect_only, &echo.to_string()).await.is_err());
    common::round_trip(&connect_only, echo).await;
    assert_eq!(
        metric(
            connect_only.admin_addr,
            "spoke_server_frontend_requests_total{frontend_protocol=\"grpc\",result=\"protocol_not_served\"}"
        )
        .await,
        1
    );
}
