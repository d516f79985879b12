//! Records no stock TLS stack sends, against Spoke's user-space TLS (rustls's unbuffered connection,
//! `transport/user_tls.rs`): each one fails the connection with a clear error, and where rustls answers
//! with an alert, the alert reaches the peer. The peer here is a stock rustls client whose traffic
//! secrets are taken out after the handshake, so that the test seals whatever records it likes under the
//! right keys.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rustls::crypto::cipher::{
    InboundOpaqueMessage, MessageDecrypter, MessageEncrypter, OutboundChunks, OutboundPlainMessage,
};
use rustls::{ConnectionTrafficSecrets, ContentType, ProtocolVersion};
use rustls_pki_types::ServerName;
use spoke::transport::handshake;
use spoke::transport::secured::Secured;
use spoke::transport::tls::{self, ClientCerts, TlsFiles, Versions};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

type SpokeServer = Secured<rustls::server::ServerConnectionData>;

/// A peer that seals records itself, under the keys a stock rustls client negotiated.
struct Forger {
    tcp: TcpStream,
    tx: Box<dyn MessageEncrypter>,
    tx_seq: u64,
    rx: Box<dyn MessageDecrypter>,
    rx_seq: u64,
}

fn keys(secrets: ConnectionTrafficSecrets) -> (rustls::crypto::cipher::AeadKey, rustls::crypto::cipher::Iv) {
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (key, iv),
        _ => panic!("the test offers AES-128-GCM only"),
    }
}

impl Forger {
    /// A record of inner type `typ` carrying `payload`, sealed under the next sequence number.
    fn seal(&mut self, typ: ContentType, payload: &[u8]) -> Vec<u8> {
        self.seal_at(typ, payload, self.tx_seq)
    }

    fn seal_at(&mut self, typ: ContentType, payload: &[u8], seq: u64) -> Vec<u8> {
        let msg = OutboundPlainMessage {
            typ,
            version: ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(payload),
        };
        self.tx_seq = seq + 1;
        self.tx.encrypt(msg, seq).expect("seal").encode()
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.expect("send");
    }

    /// The first alert the server sent (after its session tickets), as (level, description); `None`
    /// when the server closes or stays quiet for 5 s without one.
    async fn alert(&mut self) -> Option<[u8; 2]> {
        let mut got = Vec::new();
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            // Open every whole record received so far, in order.
            let mut at = 0;
            while got.len() >= at + 5 {
                let len = usize::from(u16::from_be_bytes([got[at + 3], got[at + 4]]));
                if got.len() < at + 5 + len {
                    break;
                }
                let body = &mut got[at + 5..at + 5 + len];
                at += 5 + len;
                let msg =
                    InboundOpaqueMessage::new(ContentType::ApplicationData, ProtocolVersion::TLSv1_2, body);
                let plain = self.rx.decrypt(msg, self.rx_seq).expect("the server's records open");
                self.rx_seq += 1;
                if plain.typ == ContentType::Alert {
                    return Some(plain.payload.try_into().expect("an alert is two bytes"));
                }
            }
            got.drain(..at);
            match tokio::time::timeout_at(until, self.tcp.read_buf(&mut got)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }
}

struct Pki {
    _dir: tempfile::TempDir,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("temporary directory");
    let certs = spoke::devcerts::generate(dir.path(), &[], &[]).expect("development certificates");
    let server = tls::server_config(
        &TlsFiles { ca: certs.cluster_ca.clone(), cert: certs.cluster_cert, key: certs.cluster_key },
        Versions::Tls13,
        ClientCerts::Required,
    )
    .expect("server configuration");
    // AES-128-GCM only, so that the forger knows which AEAD seals.
    let files = TlsFiles { ca: certs.cluster_ca, cert: certs.agent_cert, key: certs.agent_key };
    let client = tls::client_config_offering(&files, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        .expect("client configuration");
    Pki { _dir: dir, server, client }
}

/// Spoke's server end and a stock rustls client connected to it, the handshake done.
async fn stock_pair(pki: &Pki) -> (SpokeServer, tokio_rustls::client::TlsStream<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let deadline = Instant::now() + Duration::from_secs(10);
    let connector = tokio_rustls::TlsConnector::from(pki.client.clone());
    let name = ServerName::try_from("localhost").expect("name");
    let server = async {
        let (tcp, _) = listener.accept().await.expect("accept");
        handshake::accept(pki.server.clone(), tcp, deadline, None).await.expect("handshake").0
    };
    let client = async {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        connector.connect(name, tcp).await.expect("handshake")
    };
    tokio::join!(server, client)
}

/// Spoke's server end and a forger connected to it, the handshake done.
async fn connected(pki: &Pki) -> (SpokeServer, Forger) {
    let (server, client) = stock_pair(pki).await;
    (server, forger(client))
}

/// A forger on a stock client's connection, its keys taken out after the handshake.
fn forger(client: tokio_rustls::client::TlsStream<TcpStream>) -> Forger {
    let (tcp, conn) = client.into_inner();
    let secrets = conn.dangerous_extract_secrets().expect("secrets");
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256.tls13().expect("TLS 1.3 suite");
    let (tx_key, tx_iv) = keys(secrets.tx.1);
    let (rx_key, rx_iv) = keys(secrets.rx.1);
    Forger {
        tcp,
        tx: suite.aead_alg.encrypter(tx_key, tx_iv),
        tx_seq: secrets.tx.0,
        rx: suite.aead_alg.decrypter(rx_key, rx_iv),
        rx_seq: secrets.rx.0,
    }
}

/// Reads Spoke's end until it fails: the bytes before the failure, and the error.
async fn read_error(server: &mut SpokeServer) -> (Vec<u8>, std::io::Error) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(10), server.read(&mut buf));
        match read.await.expect("an answer in time") {
            Ok(0) => panic!("a clean end where an error was due, after {got:?}"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, e),
        }
    }
}

/// Sends the records `forge` makes, then expects Spoke's end to fail with an error that says `says`,
/// for good, and the peer to get the fatal alert `alert` where one is given.
async fn refused(forge: impl FnOnce(&mut Forger) -> Vec<u8>, says: &str, alert: Option<u8>) {
    let pki = pki();
    let (mut server, mut forger) = connected(&pki).await;
    let bytes = forge(&mut forger);
    forger.send(&bytes).await;
    let (_, err) = read_error(&mut server).await;
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    assert!(err.to_string().contains(says), "error {err:?} should say {says:?}");
    assert!(server.write_all(b"x").await.is_err(), "a write after the failure");
    if let Some(description) = alert {
        assert_eq!(forger.alert().await, Some([2, description]), "the alert that reached the peer");
    }
}

const HANDSHAKE_FAILURE: u8 = 40;
const DECODE_ERROR: u8 = 50;
const BAD_RECORD_MAC: u8 = 20;
const RECORD_OVERFLOW: u8 = 22;
const UNEXPECTED_MESSAGE: u8 = 10;
const ILLEGAL_PARAMETER: u8 = 47;

/// A `KeyUpdate` message: type 24, length 1, `request` (0 not requested, 1 requested).
fn key_update(request: u8) -> [u8; 5] {
    [24, 0, 0, 1, request]
}

#[tokio::test]
async fn a_record_whose_outer_type_is_not_application_data_is_refused() {
    let forge = |f: &mut Forger| {
        let mut r = f.seal(ContentType::ApplicationData, b"hello");
        r[0] = 99;
        r
    };
    refused(forge, "", Some(DECODE_ERROR)).await;
}

/// The legacy record version must be 0x03XX (rustls's check; TLS 1.3 senders write 0x0303).
#[tokio::test]
async fn a_record_with_a_foreign_version_is_refused() {
    let forge = |f: &mut Forger| {
        let mut r = f.seal(ContentType::ApplicationData, b"hello");
        r[1..3].copy_from_slice(&[0x09, 0x09]);
        r
    };
    refused(forge, "", Some(DECODE_ERROR)).await;
}

#[tokio::test]
async fn change_cipher_spec_after_the_handshake_is_refused() {
    refused(|_| vec![20, 3, 3, 0, 1, 1], "", Some(UNEXPECTED_MESSAGE)).await;
}

/// A record longer than the 16,640 bytes TLS 1.3 allows: garbage of that length does not open, and a
/// sealed one carries more than 2^14 bytes of plaintext.
#[tokio::test]
async fn a_record_longer_than_16640_bytes_is_refused() {
    let garbage = |_: &mut Forger| {
        let mut r = vec![23, 3, 3];
        r.extend(16_641u16.to_be_bytes());
        r.extend(vec![0u8; 16_641]);
        r
    };
    refused(garbage, "cannot decrypt", Some(BAD_RECORD_MAC)).await;
    // 16,641 bytes of ciphertext: the plaintext, its content type and the 16-byte tag.
    let sealed = |f: &mut Forger| f.seal(ContentType::ApplicationData, &vec![1u8; 16_641 - 17]);
    refused(sealed, "", Some(RECORD_OVERFLOW)).await;
}

#[tokio::test]
async fn plaintext_over_2_to_the_14_is_refused() {
    refused(|f| f.seal(ContentType::ApplicationData, &vec![7u8; 16_385]), "", Some(RECORD_OVERFLOW)).await;
}

/// Empty records, more than 32 in a row (rustls's limit), whatever type they claim.
#[tokio::test]
async fn floods_of_empty_records_are_cut_off() {
    for typ in [ContentType::ApplicationData, ContentType::Handshake] {
        let forge = move |f: &mut Forger| (0..40).flat_map(|_| f.seal(typ, &[])).collect();
        refused(forge, "TooManyEmptyFragments", None).await;
    }
    // An alert cannot be empty: the first one is refused.
    refused(|f| f.seal(ContentType::Alert, &[]), "MissingData", Some(DECODE_ERROR)).await;
}

#[tokio::test]
async fn an_unknown_inner_content_type_is_refused() {
    refused(|f| f.seal(ContentType::Unknown(99), b"what"), "", Some(DECODE_ERROR)).await;
}

#[tokio::test]
async fn a_key_update_not_last_in_its_record_is_refused() {
    let forge = |f: &mut Forger| f.seal(ContentType::Handshake, &[key_update(0), key_update(0)].concat());
    refused(forge, "KeyEpochWithPendingFragment", Some(UNEXPECTED_MESSAGE)).await;
}

#[tokio::test]
async fn a_key_update_with_a_bad_body_is_refused() {
    refused(|f| f.seal(ContentType::Handshake, &key_update(7)), "", Some(ILLEGAL_PARAMETER)).await;
}

/// More than 32 key updates with no application data between them, each under the keys the one
/// before set (a stock rustls peer asked to renew its keys 40 times in a row).
#[tokio::test]
async fn a_flood_of_key_updates_is_cut_off() {
    let pki = pki();
    let (mut server, mut stock) = stock_pair(&pki).await;
    for _ in 0..40 {
        stock.get_mut().1.refresh_traffic_keys().expect("key update");
    }
    stock.flush().await.expect("flush");
    let (_, err) = read_error(&mut server).await;
    assert!(err.to_string().contains("TooManyKeyUpdateRequests"), "{err}");
}

#[tokio::test]
async fn a_session_ticket_sent_to_the_server_is_refused() {
    // NewSessionTicket: lifetime, age_add, an empty nonce, a 4-byte ticket, no extensions.
    let body = [0, 0, 0, 60, 0, 0, 0, 1, 0, 0, 4, 1, 2, 3, 4, 0, 0];
    let mut message = vec![4, 0, 0, u8::try_from(body.len()).expect("short")];
    message.extend(body);
    refused(move |f| f.seal(ContentType::Handshake, &message), "", Some(UNEXPECTED_MESSAGE)).await;
}

#[tokio::test]
async fn an_alert_other_than_close_notify_fails_the_connection() {
    refused(|f| f.seal(ContentType::Alert, &[2, HANDSHAKE_FAILURE]), "HandshakeFailure", None).await;
    // A warning other than close_notify (bad_certificate) ends a TLS 1.3 connection too.
    refused(|f| f.seal(ContentType::Alert, &[1, 42]), "", None).await;
}

#[tokio::test]
async fn a_replayed_reordered_or_dropped_record_is_refused() {
    let replayed = |f: &mut Forger| {
        let first = f.seal(ContentType::ApplicationData, b"one");
        [first.clone(), first].concat()
    };
    refused(replayed, "cannot decrypt", Some(BAD_RECORD_MAC)).await;
    let reordered = |f: &mut Forger| {
        let second = f.seal_at(ContentType::ApplicationData, b"two", 1);
        let first = f.seal_at(ContentType::ApplicationData, b"one", 0);
        [second, first].concat()
    };
    refused(reordered, "cannot decrypt", Some(BAD_RECORD_MAC)).await;
    let dropped = |f: &mut Forger| f.seal_at(ContentType::ApplicationData, b"two", 1);
    refused(dropped, "cannot decrypt", Some(BAD_RECORD_MAC)).await;
}

/// A record cut short by the end of the connection: the bytes before it arrive, then an error, never a
/// clean end.
#[tokio::test]
async fn a_truncated_record_is_an_error_not_an_end() {
    let pki = pki();
    let (mut server, mut forger) = connected(&pki).await;
    let whole = forger.seal(ContentType::ApplicationData, b"whole");
    let cut = forger.seal(ContentType::ApplicationData, b"cut short");
    forger.send(&[&whole[..], &cut[..cut.len() - 3]].concat()).await;
    forger.tcp.shutdown().await.expect("FIN");
    let (got, err) = read_error(&mut server).await;
    assert_eq!(got, b"whole");
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
}

/// p99 of `n` round trips of 64 bytes on `tunnel`, in microseconds.
async fn round_trips_p99(tunnel: &mut tokio::net::UnixStream, n: usize) -> u128 {
    let mut times = Vec::with_capacity(n);
    let mut buf = [0u8; 64];
    for _ in 0..n {
        let start = std::time::Instant::now();
        tunnel.write_all(&[7u8; 64]).await.expect("write");
        tunnel.read_exact(&mut buf).await.expect("echo");
        times.push(start.elapsed().as_micros());
    }
    times.sort_unstable();
    times[n * 99 / 100]
}

/// What a peer sends after its handshake, under keys it took out of rustls.
type Flood = fn(&mut Forger) -> Vec<u8>;

/// Two peers holding a cluster certificate, each connecting again as soon as its last connection ended,
/// sending `flood` after the handshake (nothing: an end at once). The p99 of another stream's round trips
/// meanwhile, and how many of the peers' connections the server ended.
async fn under_peers(
    srv: &common::Server,
    connector: &tokio_rustls::TlsConnector,
    floods: [Flood; 2],
    tunnel: &mut tokio::net::UnixStream,
) -> (u128, u64) {
    const ROUND_TRIPS: usize = 300;
    let stop = Arc::new(AtomicBool::new(false));
    let ended = Arc::new(AtomicU64::new(0));
    let mut peers = Vec::new();
    for flood in floods {
        let (connector, stop, ended, addr) = (connector.clone(), stop.clone(), ended.clone(), srv.agent_addr);
        peers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let tcp = TcpStream::connect(addr).await.expect("connect");
                let name = ServerName::try_from("localhost").expect("name");
                let Ok(client) = connector.connect(name, tcp).await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let mut forger = forger(client);
                let bytes = flood(&mut forger);
                for _ in 0..64 {
                    if bytes.is_empty() || forger.tcp.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                if bytes.is_empty() {
                    let _ = forger.tcp.shutdown().await;
                }
                // The server ends the connection (after its alert, where rustls sends one).
                let mut sink = Vec::new();
                let read = tokio::time::timeout(Duration::from_secs(10), forger.tcp.read_to_end(&mut sink));
                assert!(read.await.is_ok(), "a peer's connection left open");
                ended.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    common::eventually("peers under way", || async { ended.load(Ordering::Relaxed) >= 4 }).await;
    let p99 = round_trips_p99(tunnel, ROUND_TRIPS).await;
    common::eventually("peers' connections ended", || async { ended.load(Ordering::Relaxed) >= 20 }).await;
    stop.store(true, Ordering::Relaxed);
    for peer in peers {
        peer.await.expect("peer");
    }
    (p99, ended.load(Ordering::Relaxed))
}

/// Floods against a live server, from holders of a cluster certificate: one peer packs key updates into
/// full records, another sends only empty records, each on a new connection as soon as the last one is
/// cut. rustls refuses the first at its first record and the second after 32; each connection is cut
/// off, counted (`agent_conn_failures_total{reason="tls_records"}`) and logged, and another agent's
/// stream keeps its round trips meanwhile: within 2x of a run where the same peers only shake hands and
/// leave (on 2 cores, their handshakes, not their records, are what the other stream competes with).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_against_a_live_server_are_cut_off_and_leave_other_streams_alone() {
    let certs = common::certs();
    let srv = common::server(&certs).run().await;
    let echo = common::echo().await;
    let _agent = common::agent(&srv).run().await;
    let mut tunnel = common::tunnel(&srv, echo).await;
    let quiet = round_trips_p99(&mut tunnel, 300).await;

    let f = &certs.files;
    let files = TlsFiles { ca: f.cluster_ca.clone(), cert: f.agent_cert.clone(), key: f.agent_key.clone() };
    let client = tls::client_config_offering(&files, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let connector = tokio_rustls::TlsConnector::from(client.expect("client configuration"));
    let (handshakes, _) = under_peers(&srv, &connector, [|_| Vec::new(), |_| Vec::new()], &mut tunnel).await;
    let before =
        common::metric(srv.admin_addr, "spoke_server_agent_conn_failures_total{reason=\"tls_records\"}")
            .await;
    assert_eq!(before, 0, "peers that only shake hands are no TLS violation");
    let floods: [Flood; 2] = [
        // Key updates packed into one full record.
        |f| f.seal(ContentType::Handshake, &key_update(0).repeat(3_000)),
        // Empty records only.
        |f| (0..64).flat_map(|_| f.seal(ContentType::ApplicationData, &[])).collect(),
    ];
    let (loaded, cut) = under_peers(&srv, &connector, floods, &mut tunnel).await;
    let counted =
        common::metric(srv.admin_addr, "spoke_server_agent_conn_failures_total{reason=\"tls_records\"}")
            .await;
    let (_, metrics) = common::admin_get(srv.admin_addr, "/metrics").await;
    let failures: Vec<&str> = metrics.lines().filter(|l| l.contains("agent_conn_failures_total{")).collect();
    assert!(counted >= cut.saturating_sub(2), "{counted} counted for {cut} cut off: {failures:?}");
    assert!(srv.proc.log().contains("broke TLS's rules"), "the cut is logged");
    eprintln!(
        "round trip p99: {quiet} µs quiet, {handshakes} µs with peers that only shake hands, {loaded} µs \
         under the floods ({cut} flooding connections cut off)"
    );
    // Before, one flood held both workers for seconds. (A floor of 10 ms for a loaded machine.)
    assert!(
        loaded <= (2 * handshakes.max(quiet)).max(10_000),
        "round trip p99 {loaded} µs under the floods, {handshakes} µs with handshakes only, {quiet} µs quiet"
    );
    tunnel.write_all(b"still here").await.expect("write");
    let mut back = [0u8; 10];
    tunnel.read_exact(&mut back).await.expect("echo");
}

/// A read that ends inside a record, then the rest of it, `close_notify` and the end of the connection
/// at once: the reader delivers the record and ends cleanly. The split is put where the bytes inside
/// the record, read as a record header, would announce a record that ends within what follows: a
/// reader that kept its place in the middle of the record (as one did, and kernel TLS peers hit it)
/// took that for a record boundary, went to read the socket with the `close_notify` unprocessed, and
/// reported a truncation.
#[tokio::test]
async fn a_record_received_in_two_parts_then_close_notify_and_the_end_reads_cleanly() {
    let pki = pki();
    let (mut server, mut forger) = connected(&pki).await;
    let record = forger.seal(ContentType::ApplicationData, &[0x42; 16 * 1024]);
    let close = forger.seal(ContentType::Alert, &[1, 0]);
    let total = record.len() + close.len();
    let split = (5..record.len() - 5)
        .find(|&p| {
            let len = usize::from(u16::from_be_bytes([record[p + 3], record[p + 4]]));
            p + 5 + len <= record.len() && p + 5 + len < total
        })
        .expect("a split whose inner bytes look like a short record");
    forger.send(&record[..split]).await;
    let mut buf = vec![0u8; 32 * 1024];
    let early = tokio::time::timeout(Duration::from_millis(300), server.read(&mut buf)).await;
    assert!(early.is_err(), "nothing to read before the record is whole");
    forger.send(&[&record[split..], &close[..]].concat()).await;
    forger.tcp.shutdown().await.expect("FIN");
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), server.read_to_end(&mut got))
        .await
        .expect("no hang")
        .expect("a clean end after close_notify");
    assert_eq!(got, vec![0x42; 16 * 1024]);
}
