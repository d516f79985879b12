//! The TLS input path of an agent link: after a real handshake, a peer holding the connection's keys
//! sends records of any type and content, sealed under the right keys or not, in any pieces. Spoke's
//! server end (rustls's unbuffered connection in Spoke's buffers) never panics, never hangs, ends every
//! such input with bytes, a clean end or an error, and holds bounded buffers.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use rustls::crypto::cipher::{OutboundChunks, OutboundPlainMessage};
use rustls::{ConnectionTrafficSecrets, ContentType, ProtocolVersion};
use spoke::transport::handshake;
use spoke::transport::secured::Secured;
use spoke::transport::tls::{self, ClientCerts, TlsFiles, Versions};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

struct Setup {
    runtime: tokio::runtime::Runtime,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    _dir: tempfile::TempDir,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary directory");
        let certs = spoke::devcerts::generate(dir.path(), &[], &[]).expect("development certificates");
        let server = tls::server_config(
            &TlsFiles { ca: certs.cluster_ca.clone(), cert: certs.cluster_cert, key: certs.cluster_key },
            Versions::Tls13,
            ClientCerts::Required,
        )
        .expect("server configuration");
        // The agent's certificate, AES-128-GCM only so that the test knows which AEAD seals.
        let files = TlsFiles { ca: certs.cluster_ca, cert: certs.agent_cert, key: certs.agent_key };
        let client = tls::client_config_offering(&files, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
            .expect("client configuration");
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        Setup { runtime, server, client, _dir: dir }
    })
}

fuzz_target!(|input: &[u8]| {
    let setup = setup();
    setup.runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let connector = tokio_rustls::TlsConnector::from(setup.client.clone());
        let accept = async {
            let (tcp, _) = listener.accept().await.expect("accept");
            handshake::accept(setup.server.clone(), tcp, deadline, None).await.expect("handshake").0
        };
        let connect = async {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
            connector.connect(name, tcp).await.expect("handshake")
        };
        let (mut server, client) = tokio::join!(accept, connect);
        let (mut tcp, conn) = client.into_inner();
        let secrets = conn.dangerous_extract_secrets().expect("secrets");
        let ConnectionTrafficSecrets::Aes128Gcm { key, iv } = secrets.tx.1 else { panic!("AES-128-GCM") };
        let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256.tls13().expect("TLS 1.3");
        let mut sealer = suite.aead_alg.encrypter(key, iv);
        let mut seq = secrets.tx.0;

        // The input as pieces: a tag byte, a length byte, then that many bytes (128 times as many with
        // tag bit 6). Tag bit 7 set: raw bytes on the wire; else a record sealed under the right keys,
        // of inner type `tag & 0x3f`.
        let mut wire = Vec::new();
        let mut rest = input;
        while let [tag, len, tail @ ..] = rest {
            let scale = if tag & 0x40 != 0 { 128 } else { 1 };
            let n = (usize::from(*len) * scale).min(tail.len());
            let (piece, more) = tail.split_at(n);
            if tag & 0x80 != 0 {
                wire.extend_from_slice(piece);
            } else {
                let msg = OutboundPlainMessage {
                    typ: ContentType::from(tag & 0x3f),
                    version: ProtocolVersion::TLSv1_2,
                    payload: OutboundChunks::Single(piece),
                };
                wire.extend(sealer.encrypt(msg, seq).expect("seal").encode());
                seq += 1;
            }
            rest = more;
        }
        let writer = tokio::spawn(async move {
            let _ = tcp.write_all(&wire).await;
            let _ = tcp.shutdown().await;
            // Keep reading what the server sends (an alert) until it closes.
            let mut sink = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut sink)).await;
        });
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let read = tokio::time::timeout(Duration::from_secs(10), server.read(&mut buf)).await;
            match read.expect("the server's end hung on what the peer sent") {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if let Secured::User(user) = &server {
                assert!(user.held() <= 2 << 20, "{} bytes held", user.held());
            }
        }
        drop(server);
        writer.await.expect("writer");
    });
});
