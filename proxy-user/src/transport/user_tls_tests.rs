//! [`UserTls`] against itself and against a stock buffered rustls peer (tokio-rustls), in both roles
//! and with every TLS 1.3 suite ring offers. Malformed records, which no stock peer sends, are tried in
//! `proxy-user/tests/tls_records.rs`.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::ClientConnectionData;
use rustls::crypto::CryptoProvider;
use rustls::server::ServerConnectionData;
use rustls::{CipherSuite, HandshakeKind, SupportedCipherSuite};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::*;
use crate::transport::handshake::{Kind, accept, connect};
use crate::transport::role::Role;
use crate::transport::secured::Secured;
use crate::transport::tls;

const SUITES: [CipherSuite; 3] = [
    CipherSuite::TLS13_AES_128_GCM_SHA256,
    CipherSuite::TLS13_AES_256_GCM_SHA384,
    CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
];

/// ring's provider with `suite` only.
fn only(suite: CipherSuite) -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.retain(|s| s.suite() == suite);
    provider
}

/// ring's provider whose one suite, AES-128-GCM, must renew its keys after `limit` records: the
/// confidentiality limit reached in a test instead of after 2^24 records.
fn renewing_after(limit: u64) -> CryptoProvider {
    let SupportedCipherSuite::Tls13(aes) = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
    else {
        unreachable!("a TLS 1.3 suite")
    };
    let suite: &'static rustls::Tls13CipherSuite = Box::leak(Box::new(rustls::Tls13CipherSuite {
        common: rustls::CipherSuiteCommon { confidentiality_limit: limit, ..aes.common },
        hkdf_provider: aes.hkdf_provider,
        aead_alg: aes.aead_alg,
        quic: aes.quic,
    }));
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![SupportedCipherSuite::Tls13(suite)];
    provider
}

struct Pki {
    _dir: tempfile::TempDir,
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

fn pki(provider: CryptoProvider) -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let (server, client) = tls::test_configs(dir.path(), provider);
    Pki { _dir: dir, client, server }
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

fn name() -> ServerName<'static> {
    ServerName::try_from("localhost").unwrap()
}

fn user<D: Role>(secured: Secured<D>) -> UserTls<D> {
    let Secured::User(tls) = secured else { panic!("kernel TLS unasked") };
    tls
}

/// Spoke on both ends.
async fn pair(pki: &Pki) -> (UserTls<ClientConnectionData>, UserTls<ServerConnectionData>, Kind) {
    let (a, b) = crate::transport::tcp_pair().await;
    let (client, server) = tokio::join!(
        connect(pki.client.clone(), name(), a, deadline(), None),
        accept(pki.server.clone(), b, deadline(), None)
    );
    let (client, kind) = client.unwrap();
    (user(client), user(server.unwrap().0), kind)
}

/// Spoke's client against a stock rustls server.
async fn spoke_client(
    pki: &Pki,
) -> (UserTls<ClientConnectionData>, tokio_rustls::server::TlsStream<TcpStream>, Kind) {
    let (a, b) = crate::transport::tcp_pair().await;
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server.clone());
    let (client, server) =
        tokio::join!(connect(pki.client.clone(), name(), a, deadline(), None), acceptor.accept(b));
    let (client, kind) = client.unwrap();
    (user(client), server.unwrap(), kind)
}

/// A stock rustls client against Spoke's server.
async fn spoke_server(
    pki: &Pki,
) -> (tokio_rustls::client::TlsStream<TcpStream>, UserTls<ServerConnectionData>) {
    let (a, b) = crate::transport::tcp_pair().await;
    let connector = tokio_rustls::TlsConnector::from(pki.client.clone());
    let (client, server) =
        tokio::join!(connector.connect(name(), a), accept(pki.server.clone(), b, deadline(), None));
    (client.unwrap(), user(server.unwrap().0))
}

/// `n` bytes of a pattern that a shifted or repeated chunk would not match.
fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| u8::try_from((i * 7 + i / 251) % 256).unwrap() ^ seed).collect()
}

/// Both ends send their own bytes at once, then end their direction; each checks what it received
/// (all of it, in order) and that the other's end came as a clean end of stream.
async fn exchange<A, B>(mut a: A, mut b: B, n: usize) -> (A, B)
where
    A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn run<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, send: Vec<u8>, expect: Vec<u8>) {
        let (mut r, mut w) = tokio::io::split(s);
        let write = async {
            w.write_all(&send).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let read = async {
            let mut got = Vec::with_capacity(expect.len());
            r.read_to_end(&mut got).await.unwrap();
            assert!(
                got == expect,
                "{} bytes received, {} sent; first difference at {:?}",
                got.len(),
                expect.len(),
                got.iter().zip(&expect).position(|(x, y)| x != y)
            );
        };
        tokio::join!(write, read);
    }
    let (to_b, to_a) = (pattern(n, 1), pattern(n / 2 + 3, 2));
    tokio::join!(run(&mut a, to_b.clone(), to_a.clone()), run(&mut b, to_a, to_b));
    (a, b)
}

#[tokio::test]
async fn bulk_both_ways_then_close_notify_against_stock_rustls_in_both_roles_with_every_suite() {
    for suite in SUITES {
        let pki = pki(only(suite));
        let (client, server, _) = spoke_client(&pki).await;
        assert_eq!(client.suite(), Some(suite));
        let (client, _) = exchange(client, server, 4 << 20).await;
        // Idle and done: no buffer held.
        assert_eq!(client.held(), 0, "{suite:?}");
        let (client, server) = spoke_server(&pki).await;
        let (_, server) = exchange(client, server, 4 << 20).await;
        assert_eq!(server.held(), 0, "{suite:?}");
        let (client, server, _) = pair(&pki).await;
        exchange(client, server, 1 << 20).await;
    }
}

/// One side ends its direction and keeps reading: the other's answer after that end arrives whole.
#[tokio::test]
async fn half_close_either_way_against_stock_rustls() {
    let pki = pki(only(CipherSuite::TLS13_AES_128_GCM_SHA256));
    let (mut spoke, mut stock, _) = spoke_client(&pki).await;
    spoke.write_all(b"request").await.unwrap();
    spoke.shutdown().await.unwrap();
    let mut got = Vec::new();
    stock.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"request");
    stock.write_all(b"answer after the end").await.unwrap();
    stock.shutdown().await.unwrap();
    let mut back = Vec::new();
    spoke.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"answer after the end");

    let (mut stock, mut spoke) = spoke_server(&pki).await;
    stock.write_all(b"request").await.unwrap();
    stock.shutdown().await.unwrap();
    let mut got = Vec::new();
    spoke.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"request");
    spoke.write_all(b"answer after the end").await.unwrap();
    spoke.shutdown().await.unwrap();
    let mut back = Vec::new();
    stock.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"answer after the end");
}

#[tokio::test]
async fn tickets_resume_the_next_handshake_with_either_peer() {
    let pki = pki(rustls::crypto::ring::default_provider());
    // From a stock server: the ticket arrives after the handshake, as records Spoke's client reads.
    let (mut client, mut server, first) = spoke_client(&pki).await;
    assert_eq!(first, Some(HandshakeKind::Full));
    server.write_all(b"x").await.unwrap();
    server.flush().await.unwrap();
    client.read_exact(&mut [0u8; 1]).await.unwrap();
    let (_c, _s, second) = spoke_client(&pki).await;
    assert_eq!(second, Some(HandshakeKind::Resumed));

    // From Spoke's server to a stock client.
    let pki = self::pki(rustls::crypto::ring::default_provider());
    let (mut client, mut server) = spoke_server(&pki).await;
    server.write_all(b"x").await.unwrap();
    server.flush().await.unwrap();
    client.read_exact(&mut [0u8; 1]).await.unwrap();
    let (client, _server) = spoke_server(&pki).await;
    assert_eq!(client.get_ref().1.handshake_kind(), Some(HandshakeKind::Resumed));
}

/// A peer that updates its keys before every record, 200 times: Spoke follows each, answers the
/// requests, and the stream is whole both ways.
#[tokio::test]
async fn many_key_updates_from_a_stock_peer_keep_the_stream_in_both_roles() {
    const UPDATES: usize = 200;
    async fn updates<S, E, D: Role>(
        stock: &mut S,
        conn: impl Fn(&mut S) -> &mut rustls::ConnectionCommon<E>,
        spoke: &mut UserTls<D>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        for i in 0..UPDATES {
            conn(stock).refresh_traffic_keys().unwrap();
            stock.write_all(&[u8::try_from(i % 256).unwrap()]).await.unwrap();
        }
        stock.flush().await.unwrap();
        let mut got = vec![0u8; UPDATES];
        spoke.read_exact(&mut got).await.unwrap();
        assert!(got.iter().enumerate().all(|(i, b)| usize::from(*b) == i % 256));
        // Spoke answered the requests under new keys; the stock peer reads on.
        spoke.write_all(b"still here").await.unwrap();
        spoke.flush().await.unwrap();
        let mut back = [0u8; 10];
        stock.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"still here");
    }
    let pki = pki(only(CipherSuite::TLS13_AES_256_GCM_SHA384));
    let (mut spoke, mut stock, _) = spoke_client(&pki).await;
    updates(&mut stock, |s| &mut **s.get_mut().1, &mut spoke).await;
    let (mut stock, mut spoke) = spoke_server(&pki).await;
    updates(&mut stock, |s| &mut **s.get_mut().1, &mut spoke).await;
}

/// Spoke's own key updates, asked for and answered, either way.
#[tokio::test]
async fn key_updates_from_spoke_reach_a_stock_peer_and_itself() {
    let pki = pki(only(CipherSuite::TLS13_AES_128_GCM_SHA256));
    let (mut spoke, mut stock, _) = spoke_client(&pki).await;
    for _ in 0..50 {
        spoke.write_all(b"a").await.unwrap();
        spoke.refresh_traffic_keys().unwrap();
    }
    spoke.flush().await.unwrap();
    let mut got = [0u8; 50];
    stock.read_exact(&mut got).await.unwrap();
    stock.write_all(b"ok").await.unwrap();
    stock.flush().await.unwrap();
    let mut ok = [0u8; 2];
    spoke.read_exact(&mut ok).await.unwrap();
    assert_eq!(&ok, b"ok");

    let (mut client, mut server, _) = pair(&pki).await;
    client.write_all(b"before").await.unwrap();
    client.refresh_traffic_keys().unwrap();
    client.write_all(b"after").await.unwrap();
    client.flush().await.unwrap();
    let mut got = [0u8; 11];
    server.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"beforeafter");
    server.write_all(b"reply").await.unwrap();
    server.flush().await.unwrap();
    let mut reply = [0u8; 5];
    client.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"reply");
}

/// At the suite's confidentiality limit rustls renews the sending keys by itself, on Spoke's side and
/// the stock peer's alike: with a limit of 40 records, 4 MiB (256 full records) each way renew them
/// several times, and every byte arrives.
#[tokio::test]
async fn keys_renew_by_themselves_at_the_confidentiality_limit() {
    let pki = pki(renewing_after(40));
    let (client, server, _) = spoke_client(&pki).await;
    exchange(client, server, 4 << 20).await;
    let (client, server) = spoke_server(&pki).await;
    exchange(client, server, 4 << 20).await;
    let (client, server, _) = pair(&pki).await;
    exchange(client, server, 4 << 20).await;
}

#[tokio::test]
async fn a_cut_connection_or_a_tampered_record_is_an_error_and_the_tamperer_gets_an_alert() {
    let pki = pki(only(CipherSuite::TLS13_AES_128_GCM_SHA256));
    let (mut client, mut server, _) = pair(&pki).await;
    client.tcp.shutdown().await.unwrap(); // FIN without close_notify
    let err = server.read(&mut [0u8; 8]).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);

    let (mut stock, mut spoke) = spoke_server(&pki).await;
    // A record under no key either side holds.
    let mut record = vec![23, 3, 3, 0, 40];
    record.extend([0x5a; 40]);
    stock.get_mut().0.write_all(&record).await.unwrap();
    let err = spoke.read(&mut [0u8; 8]).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    // rustls's alert went out with the failed read.
    let err =
        tokio::time::timeout(Duration::from_secs(5), stock.read(&mut [0u8; 1])).await.unwrap().unwrap_err();
    assert!(err.to_string().contains("BadRecordMac"), "{err}");
    // The failure stays: a later read or write says the same.
    let again = spoke.read(&mut [0u8; 8]).await.unwrap_err();
    assert_eq!(again.to_string(), err_text(&spoke));
    assert!(spoke.write_all(b"x").await.is_err());
}

fn err_text<D: Role>(tls: &UserTls<D>) -> String {
    tls.broken_error().map(|e| e.to_string()).unwrap_or_default()
}

/// A peer that stops in the middle of a record keeps only that record's bytes on this side, however
/// far the read buffer grew before.
#[tokio::test]
async fn a_peer_that_stops_mid_record_pins_no_grown_buffer() {
    let pki = pki(only(CipherSuite::TLS13_AES_128_GCM_SHA256));
    let (mut stock, mut spoke) = spoke_server(&pki).await;
    let bulk = pattern(8 << 20, 3);
    let send = bulk.clone();
    let writer = tokio::spawn(async move {
        stock.write_all(&send).await.unwrap();
        stock.flush().await.unwrap();
        stock
    });
    let mut got = vec![0u8; bulk.len()];
    spoke.read_exact(&mut got).await.unwrap();
    assert!(got == bulk);
    let mut stock = writer.await.unwrap();
    // Half a record: a header announcing 16 KiB and 1 KiB of it.
    let mut half = vec![23, 3, 3, 0x40, 0x11];
    half.extend([0u8; 1024]);
    stock.get_mut().0.write_all(&half).await.unwrap();
    let read = tokio::time::timeout(Duration::from_millis(300), spoke.read(&mut [0u8; 64])).await;
    assert!(read.is_err(), "nothing to read yet");
    assert!(spoke.held() <= 2 * MAX_RECORD, "{} bytes held for half a record", spoke.held());
}

/// TLS resumption presents no certificate: a session resumed after the client's certificate expired
/// carries it on. Spoke reads its end at the handshake, and the server refuses such a connection at
/// Hello and at every park (`server::session`).
#[tokio::test]
async fn a_resumed_session_still_shows_its_expired_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let until = std::time::SystemTime::now() + Duration::from_secs(2);
    let certs = crate::devcerts::generate_until(dir.path(), &[], &["n1".to_owned()], Some(until)).unwrap();
    let server = tls::server_config(
        &tls::TlsFiles {
            ca: certs.cluster_ca.clone(),
            cert: certs.cluster_cert.clone(),
            key: certs.cluster_key.clone(),
        },
        tls::Versions::Tls13,
        tls::ClientCerts::Required,
    )
    .unwrap();
    let node = &certs.nodes[0];
    let client = tls::client_config(&tls::TlsFiles {
        ca: certs.cluster_ca.clone(),
        cert: node.cert.clone(),
        key: node.key.clone(),
    })
    .unwrap();
    let pki = Pki { _dir: dir, client, server };
    let (mut client, mut server, first) = pair(&pki).await;
    assert_eq!(first, Some(HandshakeKind::Full));
    assert_eq!(server.peer().node.as_deref(), Some("n1"));
    assert!(!server.peer().expired(std::time::SystemTime::now()));
    server.write_all(b"x").await.unwrap();
    server.flush().await.unwrap();
    client.read_exact(&mut [0u8; 1]).await.unwrap();

    tokio::time::sleep_until(Instant::now() + Duration::from_millis(2500)).await;
    let now = std::time::SystemTime::now();
    assert!(now > until);
    let (_client, server, second) = pair(&pki).await;
    assert_eq!(second, Some(HandshakeKind::Resumed), "rustls resumed a session of an expired certificate");
    assert_eq!(server.peer().node.as_deref(), Some("n1"));
    assert!(server.peer().expired(now), "the resumed connection shows its certificate's end");
}

/// A link read by one task and written by another (as a control channel is: `tokio::io::split` and a
/// spawned reader), bulk both ways: the read path never takes the writer's wake-up (it only tries to
/// write), so neither side stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_split_across_two_tasks_moves_bulk_both_ways() {
    const N: usize = 32 << 20;
    let pki = pki(only(CipherSuite::TLS13_AES_128_GCM_SHA256));
    for _ in 0..3 {
        let (client, server, _) = pair(&pki).await;
        let (mut client_rd, mut client_wr) = tokio::io::split(client);
        let (mut server_rd, mut server_wr) = tokio::io::split(server);
        let tasks = [
            tokio::spawn(async move {
                client_wr.write_all(&pattern(N, 1)).await.unwrap();
                client_wr.shutdown().await.unwrap();
            }),
            tokio::spawn(async move {
                server_wr.write_all(&pattern(N, 2)).await.unwrap();
                server_wr.shutdown().await.unwrap();
            }),
            tokio::spawn(async move {
                let mut got = Vec::new();
                client_rd.read_to_end(&mut got).await.unwrap();
                assert!(got == pattern(N, 2));
            }),
            tokio::spawn(async move {
                let mut got = Vec::new();
                server_rd.read_to_end(&mut got).await.unwrap();
                assert!(got == pattern(N, 1));
            }),
        ];
        let all = futures_util::future::join_all(tasks);
        for task in tokio::time::timeout(Duration::from_mins(1), all).await.expect("no stall") {
            task.unwrap();
        }
    }
}
