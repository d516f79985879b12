//! Processes dying, restarting and shutting down; certificates that must be refused.

mod common;

use common::{agent, certs, connect_status, echo, eventually, metric, round_trip, server, tunnel};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Opens a control session's first frame by hand: a `Hello` with `identity`, no token, no replica held.
async fn send_hello<S: tokio::io::AsyncWrite + Unpin>(conn: &mut S, identity: spoke::protocol::Identity) {
    let hello = spoke::protocol::Message::Hello {
        version: spoke::protocol::PROTOCOL_VERSION,
        identity,
        token: spoke::protocol::Secret::default(),
        held: vec![],
    };
    spoke::codec::write_message(conn, &hello).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_is_replaced_by_its_restart() {
    let certs = certs();
    let srv = server(&certs).run().await;
    let echo = echo().await;
    let mut first = agent(&srv).run().await;
    round_trip(&srv, echo).await;
    first.proc.kill().await;
    // The server notices the lost control channel and stops routing to the dead agent.
    eventually("dead agent removed", || async {
        metric(srv.admin_addr, "spoke_server_agents_connected").await == 0
    })
    .await;
    assert_eq!(connect_status(&srv, &echo.to_string()).await.0, 503);
    let _second = agent(&srv).run().await;
    round_trip(&srv, echo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_come_back_after_a_server_restart() {
    let certs = certs();
    let mut srv = server(&certs).run().await;
    let port = srv.agent_addr.port();
    let echo = echo().await;
    let agent = agent(&srv).run().await;
    round_trip(&srv, echo).await;
    srv.proc.kill().await;
    drop(srv);
    let srv = server(&certs).agent_port(port).run().await;
    // The agent reconnects on its own (backoff capped at 1 s in the fixture).
    eventually("agent reconnected", || async {
        metric(srv.admin_addr, "spoke_server_data_conns_idle").await > 0
    })
    .await;
    agent.ready().await;
    round_trip(&srv, echo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_agent_without_cutting_open_streams() {
    let certs = certs();
    let srv = server(&certs).run().await;
    let echo = echo().await;
    let agent = agent(&srv).run().await;
    let mut open = tunnel(&srv, echo).await;
    open.write_all(b"before").await.unwrap();
    agent.proc.terminate();
    // New streams are refused once the agent drains...
    eventually("agent drained", || async { connect_status(&srv, &echo.to_string()).await.0 == 503 }).await;
    // ...while the open one still carries bytes both ways.
    open.write_all(b" after").await.unwrap();
    open.shutdown().await.unwrap();
    let mut got = Vec::new();
    open.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"before after");
    let mut agent = agent;
    let status =
        tokio::time::timeout(common::WAIT, agent.proc.child.wait()).await.expect("agent exits").unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_with_a_certificate_from_another_ca_is_refused() {
    let certs = certs();
    let srv = server(&certs).run().await;
    let other = common::certs();
    let rogue = agent(&srv).cert(&other.files.agent_cert, &other.files.agent_key).spawn().await;
    eventually("handshake refused", || async {
        metric(srv.admin_addr, "spoke_server_agent_conn_failures_total{reason=\"tls_handshake\"}").await >= 1
    })
    .await;
    assert_eq!(metric(srv.admin_addr, "spoke_server_agents_connected").await, 0);
    assert_eq!(common::admin_get(rogue.admin_addr, "/readyz").await.0, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontend_requires_a_client_certificate_from_its_ca() {
    let certs = certs();
    let srv = server(&certs).tcp_frontend().run().await;
    let _agent = agent(&srv).run().await;
    let echo = echo().await;
    let f = &certs.files;
    let name = || rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let addr = srv.frontend_addr.unwrap();

    // The right client certificate works.
    let mut ok = common::tls_tunnel(&srv, echo).await;
    ok.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    ok.read_exact(&mut b).await.unwrap();

    // No client certificate, and one from another CA: refused during or right after the handshake.
    let other = common::certs();
    let cases = [
        ("no certificate", common::frontend_connector(&f.frontend_ca, None)),
        (
            "wrong CA",
            common::frontend_connector(
                &f.frontend_ca,
                Some((&other.files.client_cert, &other.files.client_key)),
            ),
        ),
    ];
    for (what, connector) in cases {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let refused = match connector.connect(name(), tcp).await {
            Err(_) => true,
            // TLS 1.3: the server's verdict on the client certificate arrives after the client's handshake.
            Ok(mut s) => {
                let _ = s
                    .write_all(format!("CONNECT {echo} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
                    .await;
                let mut buf = [0u8; 64];
                !matches!(tokio::time::timeout(common::WAIT, s.read(&mut buf)).await, Ok(Ok(n)) if n > 0)
            }
        };
        assert!(refused, "{what}: the frontend must refuse the client");
    }
    // A client that does not trust the server's CA refuses it.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let distrusting =
        common::frontend_connector(&other.files.frontend_ca, Some((&f.client_cert, &f.client_key)));
    assert!(distrusting.connect(name(), tcp).await.is_err());
    eventually("failed handshakes counted", || async {
        metric(srv.admin_addr, "spoke_server_streams_total{result=\"tls_handshake\"}").await >= 3
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_data_connections_need_the_servers_consent() {
    let certs = certs();
    let srv = server(&certs).flag("--backend-dial-timeout", "1s").run().await;
    let _agent = agent(&srv).plaintext("splice").spawn().await;
    eventually("plaintext refused", || async {
        metric(srv.admin_addr, "spoke_server_agent_conn_failures_total{reason=\"plaintext_refused\"}").await
            >= 1
    })
    .await;
    // The control channel (TLS) is up, but no data connection is ever parked: dials time out.
    let echo = echo().await;
    let (status, text) = connect_status(&srv, &echo.to_string()).await;
    assert_eq!(status, 504, "{text}");
    assert_eq!(metric(srv.admin_addr, "spoke_server_data_conns_idle").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_channel_without_tls_is_refused_even_when_plaintext_is_allowed() {
    use spoke::protocol::{Identity, Message};
    let certs = certs();
    let srv = server(&certs).allow_plaintext_tunnel().run().await;
    let mut s = TcpStream::connect(srv.agent_addr).await.unwrap();
    let identity = Identity {
        agent_id: "intruder".into(),
        node_name: "intruder".into(),
        hostnames: vec![],
        addresses: vec![],
        cidrs: vec![],
        default_route: true,
    };
    send_hello(&mut s, identity).await;
    let reply =
        tokio::time::timeout(common::WAIT, spoke::codec::read_message(&mut s)).await.expect("reply in time");
    assert!(matches!(reply, Ok(Message::Reject { .. })), "{reply:?}");
    assert_eq!(metric(srv.admin_addr, "spoke_server_agents_connected").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_from_one_host_does_not_keep_agents_out() {
    let certs = certs();
    // Few set-up places and a long handshake timeout: without the per-source share, the flood below
    // would hold every place for a minute.
    let srv = server(&certs)
        .flag("--max-agent-handshakes", "64")
        .flag("--max-handshakes-per-source", "8")
        .flag("--handshake-timeout", "60s")
        .run()
        .await;
    let mut flood = Vec::new();
    for _ in 0..200 {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind("127.0.0.2:0".parse().unwrap()).expect("bind 127.0.0.2");
        flood.push(socket.connect(srv.agent_addr).await.expect("connect"));
    }
    eventually("connections past the share refused", || async {
        metric(srv.admin_addr, "spoke_server_agent_conn_failures_total{reason=\"source_busy\"}").await >= 150
    })
    .await;
    // An agent from another address connects and serves while the flood still holds its share.
    let echo = echo().await;
    let _agent = agent(&srv).run().await;
    round_trip(&srv, echo).await;
    drop(flood);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_connection_with_a_guessed_session_id_is_refused() {
    use spoke::protocol::{Message, PROTOCOL_VERSION, SessionId};
    use spoke::transport::tls::{TlsFiles, client_config};
    let certs = certs();
    let srv = server(&certs).run().await;
    let echo = echo().await;
    let _victim = agent(&srv).run().await;
    // A holder of a certificate from the cluster CA, guessing session ids: 128 random bits each.
    let f = &certs.files;
    let files = TlsFiles { ca: f.cluster_ca.clone(), cert: f.agent_cert.clone(), key: f.agent_key.clone() };
    let connector = tokio_rustls::TlsConnector::from(client_config(&files).expect("client config"));
    for _ in 0..20 {
        let tcp = TcpStream::connect(srv.agent_addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut s = connector.connect(name, tcp).await.expect("TLS with a CA certificate");
        let guess =
            Message::DataHello { version: PROTOCOL_VERSION, session_id: SessionId(fastrand::u128(..)) };
        spoke::codec::write_message(&mut s, &guess).await.unwrap();
        let reply = tokio::time::timeout(common::WAIT, spoke::codec::read_message(&mut s))
            .await
            .expect("reply in time");
        assert!(matches!(&reply, Ok(Message::Reject { reason }) if reason.contains("session")), "{reply:?}");
    }
    assert_eq!(
        metric(srv.admin_addr, "spoke_server_agent_conn_failures_total{reason=\"unknown_session\"}").await,
        20
    );
    // The victim's streams are untouched.
    round_trip(&srv, echo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontend_admits_only_client_certificates_with_an_allowed_name() {
    let certs = certs();
    // The development client certificate is from the frontend CA, but its name is not on the list.
    let srv = server(&certs).tcp_frontend().flag("--frontend-allowed-names", "apiserver.example").run().await;
    let _agent = agent(&srv).run().await;
    let echo = echo().await;
    let f = &certs.files;
    let connector = common::frontend_connector(&f.frontend_ca, Some((&f.client_cert, &f.client_key)));
    let tcp = TcpStream::connect(srv.frontend_addr.unwrap()).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = connector.connect(name, tcp).await.expect("the handshake itself succeeds");
    s.write_all(format!("CONNECT {echo} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(common::WAIT, s.read_to_string(&mut reply)).await.expect("reply in time").ok();
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    assert!(reply.contains("not allowed"), "{reply}");
    assert_eq!(metric(srv.admin_addr, "spoke_server_streams_total{result=\"client_not_allowed\"}").await, 1);
    assert_eq!(metric(srv.admin_addr, "spoke_server_streams_total{result=\"ok\"}").await, 0);
}

/// A TLS link to the agent listener presenting `cert` and `key` (from the cluster CA).
async fn link_as(
    srv: &common::Server,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    use spoke::transport::tls::{TlsFiles, client_config};
    let files = TlsFiles { ca: srv.certs.files.cluster_ca.clone(), cert: cert.into(), key: key.into() };
    let connector = tokio_rustls::TlsConnector::from(client_config(&files).expect("client config"));
    let tcp = TcpStream::connect(srv.agent_addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.expect("TLS with a cluster CA certificate")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_node_certificates_an_agent_is_the_node_its_certificate_names() {
    use spoke::protocol::{Message, PROTOCOL_VERSION};
    let certs = certs();
    let srv = server(&certs).flag("--agent-auth", "node-cert").run().await;
    let echo = echo().await;
    let [a, b] = [&certs.files.nodes[0], &certs.files.nodes[1]];
    assert_eq!((a.name.as_str(), b.name.as_str()), ("node-a", "node-b"));
    let _node_a = agent(&srv).id("node-a").cert(&a.cert, &a.key).run().await;
    round_trip(&srv, echo).await;

    // Node a's certificate claiming node b, and the shared development certificate claiming node b.
    let mismatch = "spoke_server_agent_conn_failures_total{reason=\"identity_mismatch\"}";
    // (Each is stopped once refused: it would go on retrying, and counting.)
    let mut forger = agent(&srv).id("node-b").cert(&a.cert, &a.key).spawn().await;
    eventually("node a's certificate refused as node b", || async {
        metric(srv.admin_addr, mismatch).await >= 1
    })
    .await;
    forger.proc.kill().await;
    let f = &certs.files;
    let before = metric(srv.admin_addr, mismatch).await;
    let mut shared = agent(&srv).id("node-b").cert(&f.agent_cert, &f.agent_key).spawn().await;
    eventually("the shared certificate refused", || async {
        metric(srv.admin_addr, mismatch).await > before
    })
    .await;
    shared.proc.kill().await;
    assert_eq!(metric(srv.admin_addr, "spoke_server_agents_connected").await, 1);
    let before = metric(srv.admin_addr, mismatch).await;

    // Node b's own control channel; a data connection with node a's certificate cannot join it.
    let (session_id, _control) = control_session(&srv, (&b.cert, &b.key), "node-b").await;
    let hello = Message::DataHello { version: PROTOCOL_VERSION, session_id };
    let mut foreign = link_as(&srv, &a.cert, &a.key).await;
    spoke::codec::write_message(&mut foreign, &hello).await.unwrap();
    let reply = tokio::time::timeout(common::WAIT, spoke::codec::read_message(&mut foreign)).await.unwrap();
    assert!(matches!(&reply, Ok(Message::Reject { .. })), "{reply:?}");
    assert_eq!(metric(srv.admin_addr, mismatch).await, before + 1);
    // Node b's own data connection joins.
    let idle = metric(srv.admin_addr, "spoke_server_data_conns_idle").await;
    let mut own = link_as(&srv, &b.cert, &b.key).await;
    spoke::codec::write_message(&mut own, &hello).await.unwrap();
    eventually("node b's data connection parked", || async {
        metric(srv.admin_addr, "spoke_server_data_conns_idle").await == idle + 1
    })
    .await;
    // Node a's streams were never disturbed.
    round_trip(&srv, echo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_node_certificate_is_taken_up_without_a_restart_or_a_dropped_stream() {
    let certs = certs();
    let srv = server(&certs).flag("--agent-auth", "node-cert").run().await;
    let echo = echo().await;
    let [first, _, second] = [&certs.files.nodes[0], &certs.files.nodes[1], &certs.files.nodes[2]];
    assert_eq!((first.name.as_str(), second.name.as_str()), ("node-a", "node-a"));
    // The files the agent reads, as the kubelet's kubelet-client-current.pem.
    let (cert, key) = (certs.dir.path().join("current.pem"), certs.dir.path().join("current-key.pem"));
    std::fs::copy(&first.cert, &cert).unwrap();
    std::fs::copy(&first.key, &key).unwrap();
    let node_a = agent(&srv).id("node-a").cert(&cert, &key).run().await;
    let mut held = tunnel(&srv, echo).await;
    let full = "spoke_agent_server_handshakes_total{kind=\"full\"}";
    let full_before = metric(node_a.admin_addr, full).await;

    // Rotation: the new pair replaces the files (written aside, then renamed over them).
    for (from, to) in [(&second.key, &key), (&second.cert, &cert)] {
        let aside = to.with_extension("new");
        std::fs::copy(from, &aside).unwrap();
        std::fs::rename(&aside, to).unwrap();
    }
    // Streams take pooled data connections; their replacements are dialed with the new certificate.
    eventually("the agent reloaded its certificate", || async {
        round_trip(&srv, echo).await;
        node_a.proc.log().contains("client certificate reloaded")
    })
    .await;
    round_trip(&srv, echo).await;
    // The new certificate was presented: a full handshake, since resuming a session of the old one
    // would carry the old identity on.
    assert!(metric(node_a.admin_addr, full).await > full_before, "no full handshake after the rotation");
    // The stream opened before the rotation still flows both ways.
    held.write_all(b"held").await.unwrap();
    let mut buf = [0u8; 4];
    held.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"held");
    let mismatch = "spoke_server_agent_conn_failures_total{reason=\"identity_mismatch\"}";
    assert_eq!(metric(srv.admin_addr, mismatch).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_agents_the_server_names_may_be_a_default_route() {
    let certs = certs();
    let srv = server(&certs).flag("--default-route-agents", "node-a").run().await;
    let refused = "spoke_server_agent_conn_failures_total{reason=\"claim_refused\"}";
    let _b = agent(&srv).id("node-b").identifiers("ipv4=127.0.0.2&default-route=true").spawn().await;
    eventually("node b's default-route claim refused", || async {
        metric(srv.admin_addr, refused).await >= 1
    })
    .await;
    assert_eq!(metric(srv.admin_addr, "spoke_server_agents_connected").await, 0);
    // Nobody claims 127.0.0.9: with node a as the default route the request reaches a node (which finds
    // nothing listening) instead of getting 503.
    assert_eq!(connect_status(&srv, "127.0.0.9:9").await.0, 503);
    let _a = agent(&srv).id("node-a").run().await;
    assert_eq!(connect_status(&srv, "127.0.0.9:9").await.0, 502);
}

/// Opens a control session as agent and node `name` with `cert` and `key`, and returns its id (and the
/// channel, which must stay open for the session to live).
async fn control_session(
    srv: &common::Server,
    (cert, key): (&std::path::Path, &std::path::Path),
    name: &str,
) -> (spoke::protocol::SessionId, impl Sized) {
    use spoke::protocol::{Identity, Message};
    let mut control = link_as(srv, cert, key).await;
    let identity = Identity {
        agent_id: name.into(),
        node_name: name.into(),
        hostnames: vec![],
        addresses: vec![],
        cidrs: vec![],
        default_route: false,
    };
    send_hello(&mut control, identity).await;
    let ack = tokio::time::timeout(common::WAIT, spoke::codec::read_message(&mut control)).await.unwrap();
    let Ok(Message::HelloAck { session_id, .. }) = ack else { panic!("control session refused: {ack:?}") };
    (session_id, control)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_data_connection_must_prove_the_sessions_key() {
    use spoke::protocol::{Message, PROTOCOL_VERSION};
    let certs = certs();
    let srv = server(&certs).allow_plaintext_tunnel().run().await;
    // Someone who learned the session id (it crosses the wire in clear on plain data connections).
    let f = &srv.certs.files;
    let (session_id, _control) = control_session(&srv, (&f.agent_cert, &f.agent_key), "node-z").await;
    let mut s = TcpStream::connect(srv.agent_addr).await.unwrap();
    spoke::codec::write_message(&mut s, &Message::DataHello { version: PROTOCOL_VERSION, session_id })
        .await
        .unwrap();
    let challenge = tokio::time::timeout(common::WAIT, spoke::codec::read_message(&mut s)).await.unwrap();
    assert!(matches!(challenge, Ok(Message::Challenge { .. })), "{challenge:?}");
    spoke::codec::write_message(&mut s, &Message::DataProof { nonce: [0; 16], mac: [0; 32] }).await.unwrap();
    let reply = tokio::time::timeout(common::WAIT, spoke::codec::read_message(&mut s)).await.unwrap();
    assert!(matches!(&reply, Ok(Message::Reject { .. })), "{reply:?}");
    assert_eq!(
        metric(srv.admin_addr, "spoke_server_agent_conn_failures_total{reason=\"bad_proof\"}").await,
        1
    );
    assert_eq!(metric(srv.admin_addr, "spoke_server_data_conns_idle").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_forged_on_the_path_of_a_plain_data_connection_is_refused() {
    use spoke::protocol::Message;
    let certs = certs();
    let srv = server(&certs).allow_plaintext_tunnel().run().await;
    // A target the forged dial points at: it must never be connected to.
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    // A host on the path between agent and server: it passes TLS through, and on plain data connections
    // it passes the challenge and the proof, then writes its own Dial.
    let path = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let path_port = path.local_addr().unwrap().port();
    let upstream = srv.agent_addr;
    tokio::spawn(async move {
        while let Ok((mut agent_side, _)) = path.accept().await {
            tokio::spawn(async move {
                let mut server_side = TcpStream::connect(upstream).await.unwrap();
                let mut first = [0u8; 1];
                if agent_side.peek(&mut first).await.unwrap_or(0) == 0 || first[0] == 0x16 {
                    let _ = tokio::io::copy_bidirectional(&mut agent_side, &mut server_side).await;
                    return;
                }
                let (mut agent_rd, mut agent_wr) = agent_side.into_split();
                let (mut server_rd, mut server_wr) = server_side.split();
                let up = tokio::io::copy(&mut agent_rd, &mut server_wr);
                let forge = async {
                    let challenge = spoke::codec::read_message(&mut server_rd).await?;
                    spoke::codec::write_message(&mut agent_wr, &challenge).await?;
                    let forged = Message::Dial {
                        stream_id: 99,
                        host: "127.0.0.1".into(),
                        port: target_addr.port(),
                        timeout_ms: 5000,
                        mac: [0x5a; 32],
                    };
                    spoke::codec::write_message(&mut agent_wr, &forged).await?;
                    Ok::<_, spoke::codec::CodecError>(agent_wr)
                };
                let _ = tokio::join!(up, forge);
            });
        }
    });
    let agent =
        agent(&srv).plaintext("copy").flag("--proxy-server-port", &path_port.to_string()).spawn().await;
    let forged = "spoke_agent_server_conn_failures_total{kind=\"forged_dial\"}";
    eventually("forged dials refused", || async { metric(agent.admin_addr, forged).await >= 3 }).await;
    let accepted = tokio::time::timeout(std::time::Duration::from_millis(500), target.accept()).await;
    assert!(accepted.is_err(), "the agent dialed a destination the server never asked for");
}

/// A host on the path of plain data connections records one connection's `Challenge` and the server's
/// genuine `Dial` with its MAC, then replays both on later connections. The agent answers every
/// challenge with a fresh nonce of its own that the dial's MAC must cover, so the replayed dial never
/// verifies and the destination is dialed once, by the genuine request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenge_and_dial_replayed_on_another_plain_data_connection_are_refused() {
    use spoke::protocol::Message;
    type Recorded = std::sync::Arc<std::sync::Mutex<Option<(Message, Message)>>>;
    let certs = certs();
    let srv = server(&certs).allow_plaintext_tunnel().run().await;
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let path = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let path_port = path.local_addr().unwrap().port();
    let upstream = srv.agent_addr;
    let recorded: Recorded = Recorded::default();
    let rec = recorded.clone();
    tokio::spawn(async move {
        while let Ok((mut agent_side, _)) = path.accept().await {
            let rec = rec.clone();
            tokio::spawn(async move {
                let mut server_side = TcpStream::connect(upstream).await.unwrap();
                let mut first = [0u8; 1];
                if agent_side.peek(&mut first).await.unwrap_or(0) == 0 || first[0] == 0x16 {
                    let _ = tokio::io::copy_bidirectional(&mut agent_side, &mut server_side).await;
                    return;
                }
                let (mut agent_rd, mut agent_wr) = agent_side.into_split();
                let (mut server_rd, mut server_wr) = server_side.split();
                let up = tokio::io::copy(&mut agent_rd, &mut server_wr);
                let down = async {
                    let challenge = spoke::codec::read_message(&mut server_rd).await?;
                    let replay = rec.lock().unwrap().clone();
                    if let Some((old_challenge, old_dial)) = replay {
                        spoke::codec::write_message(&mut agent_wr, &old_challenge).await?;
                        spoke::codec::write_message(&mut agent_wr, &old_dial).await?;
                        return Ok(());
                    }
                    spoke::codec::write_message(&mut agent_wr, &challenge).await?;
                    let dial = spoke::codec::read_message(&mut server_rd).await?;
                    spoke::codec::write_message(&mut agent_wr, &dial).await?;
                    if matches!(dial, Message::Dial { .. }) {
                        rec.lock().unwrap().get_or_insert((challenge, dial));
                    }
                    tokio::io::copy(&mut server_rd, &mut agent_wr).await?;
                    Ok::<_, spoke::codec::CodecError>(())
                };
                let _ = tokio::join!(up, down);
            });
        }
    });
    let agent = agent(&srv).plaintext("copy").flag("--proxy-server-port", &path_port.to_string()).run().await;
    // The genuine request, recorded on its way.
    let mut tunnel = common::tunnel(&srv, target_addr).await;
    let (mut genuine, _) = target.accept().await.unwrap();
    tunnel.write_all(b"genuine").await.unwrap();
    let mut got = [0u8; 7];
    genuine.read_exact(&mut got).await.unwrap();
    assert!(recorded.lock().unwrap().is_some(), "the path host recorded the dial");
    // Every data connection made from now on meets the replay.
    let forged = "spoke_agent_server_conn_failures_total{kind=\"forged_dial\"}";
    eventually("replayed dials refused", || async { metric(agent.admin_addr, forged).await >= 2 }).await;
    let again = tokio::time::timeout(std::time::Duration::from_millis(500), target.accept()).await;
    assert!(again.is_err(), "the agent dialed the recorded destination again");
}

/// A control session ends at `--max-session-age` with `GoAway`, and the agent comes back with a new
/// handshake: no session outlives the bound its certificate was checked under.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_at_its_age_limit_and_the_agent_returns() {
    let certs = certs();
    let srv = server(&certs).flag("--max-session-age", "1s").run().await;
    let echo = echo().await;
    let _agent = agent(&srv).run().await;
    round_trip(&srv, echo).await;
    eventually("two sessions ended at their age limit", || async {
        srv.proc.log().matches("session age limit").count() >= 2
    })
    .await;
    srv.wait_for_agent().await;
    round_trip(&srv, echo).await;
}

/// A node certificate that expires while its agent is connected: the server ends the session at the
/// certificate's end, and the agent's next connections, whose resumed TLS sessions still carry that
/// certificate, are refused at `Hello` and at park, so no route to the node is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_certificate_expires_can_no_longer_park_or_resume() {
    let dir = tempfile::tempdir().expect("temp dir");
    let until = std::time::SystemTime::now() + std::time::Duration::from_secs(4);
    let files =
        spoke::devcerts::generate_until(dir.path(), &[], &["node-a".into()], Some(until)).expect("certs");
    let certs = std::sync::Arc::new(common::Certs { dir, files });
    let srv = server(&certs).flag("--agent-auth", "node-cert").run().await;
    let echo = echo().await;
    let a = &certs.files.nodes[0];
    let _agent = agent(&srv).id("node-a").cert(&a.cert, &a.key).run().await;
    round_trip(&srv, echo).await;
    let expired = "spoke_server_agent_conn_failures_total{reason=\"certificate_expired\"}";
    eventually("connections with the expired certificate refused", || async {
        metric(srv.admin_addr, expired).await >= 1
    })
    .await;
    assert!(srv.proc.log().contains("session age limit"), "the session ended at the certificate's end");
    assert_eq!(metric(srv.admin_addr, "spoke_server_agents_connected").await, 0);
    assert_eq!(connect_status(&srv, &echo.to_string()).await.0, 503);
}

/// Two live agents with one node's identity (a duplicated certificate, or a `DaemonSet` rollout with
/// `maxSurge`: the old and the new pod on one node for a while). The session that holds the identity
/// keeps it while its agent answers; the second is refused, counted, and stands by (ready, so that a
/// rollout goes on); once the first drains, the second takes over, and no request fails throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_live_agent_of_one_node_stands_by_and_takes_over_when_the_first_drains() {
    let certs = certs();
    let srv = server(&certs).run().await;
    let echo = echo().await;
    let old = agent(&srv).run().await;
    let new = agent(&srv).spawn().await;
    eventually("the second agent stands by", || async {
        metric(new.admin_addr, "spoke_agent_standby").await == 1
    })
    .await;
    new.ready().await;
    let refused = "spoke_server_agent_conn_failures_total{reason=\"identity_in_use\"}";
    let before = metric(srv.admin_addr, refused).await;
    assert!(before >= 1, "the refusal is counted");
    // Requests flow while the second one keeps trying: none fails, and the first keeps its session.
    let mut failed = 0;
    for _ in 0..200 {
        if connect_status(&srv, &echo.to_string()).await.0 != 200 {
            failed += 1;
        }
    }
    assert_eq!(failed, 0, "requests failed while two agents claimed one identity");
    eventually("the second agent tries again and is refused again", || async {
        metric(srv.admin_addr, refused).await > before
    })
    .await;
    assert!(
        !srv.proc.log().contains("replacing its earlier session"),
        "sessions flapped:\n{}",
        srv.proc.log()
    );
    assert_eq!(metric(old.admin_addr, "spoke_agent_control_connected").await, 1);
    assert_eq!(metric(new.admin_addr, "spoke_agent_control_connected").await, 0);
    // The rollout deletes the old pod: it drains, and the one standing by takes over.
    old.proc.terminate();
    eventually("the second agent took over", || async {
        metric(new.admin_addr, "spoke_agent_control_connected").await == 1
            && metric(new.admin_addr, "spoke_agent_standby").await == 0
    })
    .await;
    new.ready().await;
    round_trip(&srv, echo).await;
}

/// An agent whose control channel broke on its own side only (the server's end still looks open)
/// comes back at once: the old session answers no probe, so the new one replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_answers_no_probe_is_replaced_at_once() {
    let certs = certs();
    let srv = server(&certs).flag("--heartbeat-interval", "30s").run().await;
    let echo = echo().await;
    let stopped = agent(&srv).run().await;
    // SIGSTOP: the process holds its sockets open but answers nothing, like a link gone silent.
    let pid = stopped.proc.child.id().expect("agent pid");
    assert!(std::process::Command::new("kill").args(["-STOP", &pid.to_string()]).status().unwrap().success());
    let second = agent(&srv).run().await;
    round_trip(&srv, echo).await;
    // Replaced because it answered no probe, not dropped after three silent 30 s heartbeats.
    let log = srv.proc.log();
    assert!(log.contains("replacing its earlier session"), "{log}");
    assert!(!log.contains("no heartbeat"), "{log}");
    assert_eq!(metric(second.admin_addr, "spoke_agent_standby").await, 0);
    let _ = std::process::Command::new("kill").args(["-CONT", &pid.to_string()]).status();
}
