//! Kernel TLS against rustls in user space (`user_tls`) and itself. Tests that need the kernel's TLS run where
//! it is offered: in the virtual machines of `cargo xtask vm`, which set `SPOKE_EXPECT_KTLS` so that
//! they fail rather than pass vacuously; on a kernel without it they say so and check nothing.

use std::sync::Arc;

use rustls::HandshakeKind;
use rustls::client::ClientConnectionData;
use rustls::server::ServerConnectionData;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::Instant;

use super::*;
use crate::datapath::{Activity, End, Moved, splice};
use crate::transport::counted::{Counted, Ends, Side};
use crate::transport::handshake::{Kind, accept, connect};
use crate::transport::secured::Secured;
use crate::transport::tls::{self, ClientTls};
use crate::transport::{Plain, Stream as _};

/// Kernel TLS here, or `None` (with a note) where the kernel lacks it and no test run expects it.
fn kernel() -> Option<KernelTls> {
    match KernelTls::probe() {
        Ok(k) => Some(k),
        Err(why) if std::env::var_os("SPOKE_EXPECT_KTLS").is_some() => {
            panic!("SPOKE_EXPECT_KTLS is set, but {why}")
        }
        Err(why) => {
            eprintln!("kernel TLS unavailable ({why}): this test runs in `cargo xtask vm`");
            None
        }
    }
}

struct Pki {
    _dir: tempfile::TempDir,
    client: ClientTls,
    server: Arc<rustls::ServerConfig>,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let (server, agent) = tls::test_pki(dir.path());
    Pki { _dir: dir, client: ClientTls::load(&agent).unwrap(), server }
}

type Pair = (Secured<ClientConnectionData>, Secured<ServerConnectionData>, Kind);

/// A handshake offering the kernel's suite only, each side in the kernel where given `Some`.
async fn pair(pki: &Pki, client: Option<KernelTls>, server: Option<KernelTls>) -> Pair {
    let (a, b) = crate::transport::tcp_pair().await;
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    let name = ServerName::try_from("localhost").unwrap();
    let (c, s) = tokio::join!(
        connect(pki.client.config(true), name, a, deadline, client),
        accept(pki.server.clone(), b, deadline, server)
    );
    let (c, kind) = c.unwrap();
    let s = s.unwrap().0;
    assert_eq!(matches!(c, Secured::Kernel(_)), client.is_some(), "client side in the kernel iff asked");
    assert_eq!(matches!(s, Secured::Kernel(_)), server.is_some(), "server side in the kernel iff asked");
    (c, s, kind)
}

fn pattern(n: usize, salt: usize) -> Vec<u8> {
    (0..n).map(|i| u8::try_from((i * 7 + salt) % 251).unwrap()).collect()
}

/// `n` bytes from the client, then its `close_notify`; an answer from the server after that, then its
/// own: both read to a clean end.
async fn both_ways<C, S>(mut client: C, mut server: S, n: usize)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let up = pattern(n, 1);
    let expect = up.clone();
    let writer = tokio::spawn(async move {
        client.write_all(&up).await.unwrap();
        client.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        back
    });
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.unwrap();
    assert!(got == expect, "client → server: {} of {} bytes, intact: {}", got.len(), n, got == expect);
    let down = pattern(n / 2 + 3, 2);
    server.write_all(&down).await.unwrap();
    server.shutdown().await.unwrap();
    assert!(writer.await.unwrap() == down, "server → client intact");
}

#[test]
fn control_records_make_whole_messages_from_pieces() {
    let mut c = ControlRecords::default();
    assert_eq!(c.take(HANDSHAKE, &[4, 0]).unwrap(), vec![]);
    assert_eq!(c.take(HANDSHAKE, &[0, 3, 9]).unwrap(), vec![]);
    assert!(!c.is_empty());
    assert_eq!(
        c.take(HANDSHAKE, &[8, 7, 4, 0, 0, 0]).unwrap(),
        vec![Control::Ticket(vec![9, 8, 7]), Control::Ticket(vec![])]
    );
    assert!(c.is_empty());
    assert_eq!(c.take(ALERT, &[1]).unwrap(), vec![]);
    assert_eq!(c.take(ALERT, &[0]).unwrap(), vec![Control::CloseNotify]);
    let err = |typ, bytes: &[u8]| ControlRecords::default().take(typ, bytes).unwrap_err().to_string();
    assert!(err(ALERT, &[2, 40]).contains("alert"), "a fatal alert fails the connection");
    assert!(err(HANDSHAKE, &[24, 0, 0, 1, 0]).contains("cannot follow"), "a key update fails it");
    assert!(err(HANDSHAKE, &[20, 0, 0, 0]).contains("after the handshake"));
    assert!(err(20, &[1]).contains("type 20"));
    let mut mixed = ControlRecords::default();
    mixed.take(HANDSHAKE, &[4, 0]).unwrap();
    assert!(mixed.take(ALERT, &[1, 0]).is_err(), "a message cut short by another type");
}

#[tokio::test]
async fn both_ends_in_the_kernel_carry_bytes_close_notify_and_tickets() {
    let Some(k) = kernel() else { return };
    let pki = pki();
    let (client, server, first) = pair(&pki, Some(k), Some(k)).await;
    assert_eq!(first, Some(HandshakeKind::Full));
    both_ways(client, server, (1 << 20) + 4099).await;
    // The server's session ticket reached the client through recvmsg: the next handshake resumes.
    let (_, _, second) = pair(&pki, Some(k), Some(k)).await;
    assert_eq!(second, Some(HandshakeKind::Resumed));
}

#[tokio::test]
async fn a_kernel_end_talks_to_a_user_space_end_either_way() {
    let Some(k) = kernel() else { return };
    let pki = pki();
    let (client, server, _) = pair(&pki, Some(k), None).await;
    both_ways(client, server, 300_001).await;
    let (client, server, _) = pair(&pki, None, Some(k)).await;
    both_ways(client, server, 300_001).await;
}

#[tokio::test]
async fn a_fin_without_close_notify_or_a_forged_record_is_an_error() {
    let Some(k) = kernel() else { return };
    let pki = pki();
    let (mut client, server, _) = pair(&pki, Some(k), None).await;
    socket2::SockRef::from(server.tcp()).shutdown(std::net::Shutdown::Write).unwrap();
    let mut buf = [0u8; 64];
    let err = client.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");

    let (mut client, server, _) = pair(&pki, Some(k), None).await;
    // An application data record under no key both sides hold.
    let mut forged = vec![APPLICATION_DATA, 3, 3, 0, 40];
    forged.extend([0x5a; 40]);
    server.tcp().writable().await.unwrap();
    assert_eq!(server.tcp().try_write(&forged).unwrap(), forged.len());
    let err = client.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
}

/// Spoke never hands the kernel keys that need renewing, but a peer may still send a `KeyUpdate`: the
/// kernel (6.1, 6.12) cannot follow it, and the stream fails with a clear error, never garbled bytes.
#[tokio::test]
async fn a_key_update_the_kernel_cannot_follow_fails_the_stream_cleanly() {
    let Some(k) = kernel() else { return };
    let pki = pki();
    let (mut client, server, _) = pair(&pki, Some(k), None).await;
    let Secured::User(mut server) = server else { unreachable!("asked for user space") };
    server.write_all(b"before").await.unwrap();
    server.refresh_traffic_keys().unwrap();
    server.write_all(b"after").await.unwrap();
    server.flush().await.unwrap();
    let mut got = [0u8; 6];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"before");
    let err = client.read(&mut got).await.unwrap_err();
    assert!(err.to_string().contains("cannot follow"), "{err}");
}

#[tokio::test]
async fn splice_carries_a_kernel_tls_end_and_its_close_notify() {
    let Some(k) = kernel() else { return };
    let pki = pki();
    // client (user-space records) ⇄ [server end in the kernel] ⇄ splice ⇄ target.
    let (client, server, _) = pair(&pki, None, Some(k)).await;
    let (b, target) = crate::transport::tcp_pair().await;
    let relay = tokio::spawn(async move {
        let moved = splice::relay_plain(server.plain().unwrap(), Plain::Tcp(&b), &Activity::default()).await;
        drop((server, b));
        moved
    });
    let n = 3 * splice::PIPE_SIZE + 11;
    both_ways(client, target, n).await;
    let moved = relay.await.unwrap().expect("a clean end both ways");
    assert_eq!(moved, Moved { a_to_b: n as u64, b_to_a: (n / 2 + 3) as u64 });
}

/// Forwards one session's end frames to the other side's [`Ends`], as the control channels would.
fn cross(mut rx: tokio::sync::mpsc::Receiver<Box<crate::protocol::Message>>, to: Arc<Ends>) {
    use crate::protocol::Message;
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            match *m {
                Message::StreamEnd { stream_id, bytes } => to.told_end(stream_id, bytes),
                Message::StreamEndRead { stream_id } => to.told_read(stream_id),
                other => panic!("unexpected {other:?}"),
            }
        }
    });
}

/// A kernel TLS data connection whose stream is spliced ends both directions by count, as a user-space
/// peer does, and carries the next stream without a handshake.
#[tokio::test]
async fn splice_ends_a_kernel_tls_stream_by_count_and_the_connection_carries_on() {
    let Some(k) = kernel() else { return };
    let pki = pki();
    let (client, server, _) = pair(&pki, None, Some(k)).await;
    let (server_ends, server_rx) = Ends::new();
    let (agent_ends, agent_rx) = Ends::new();
    cross(server_rx, agent_ends.clone());
    cross(agent_rx, server_ends.clone());
    // The agent's side in user space, the server's in the kernel, spliced to a target.
    let mut agent = Counted::new(client, agent_ends.register(1, Side::Agent).unwrap());
    let server = Counted::new(server, server_ends.register(1, Side::Server).unwrap());
    let (b, mut target) = crate::transport::tcp_pair().await;
    let relay = tokio::spawn(async move {
        let moved = splice::relay_plain(server.plain().unwrap(), Plain::Tcp(&b), &Activity::default()).await;
        (moved, server)
    });
    let up = pattern(2 * splice::PIPE_SIZE + 3, 5);
    agent.write_all(&up).await.unwrap();
    agent.shutdown().await.unwrap();
    let mut got = Vec::new();
    target.read_to_end(&mut got).await.unwrap();
    assert!(got == up, "agent → target intact, then an end");
    target.write_all(b"response").await.unwrap();
    target.shutdown().await.unwrap();
    let mut back = Vec::new();
    agent.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"response");
    let (moved, server) = relay.await.unwrap();
    assert_eq!(moved.expect("a clean end"), Moved { a_to_b: up.len() as u64, b_to_a: 8 });
    assert!(server.reusable(), "the server's side ended both ways by count");
    assert!(agent.reusable() && agent.read_acknowledged().await, "the agent heard the server read all");
    // The same connection, no handshake: the next stream's bytes, both ways.
    let (mut agent, mut server) = (agent.into_inner(), server.into_inner());
    agent.write_all(b"next stream").await.unwrap();
    agent.flush().await.unwrap();
    let mut next = [0u8; 11];
    server.read_exact(&mut next).await.unwrap();
    assert_eq!(&next, b"next stream");
    server.write_all(b"ok").await.unwrap();
    agent.read_exact(&mut next[..2]).await.unwrap();
    assert_eq!(&next[..2], b"ok");
}

#[tokio::test]
async fn splice_fails_a_kernel_tls_stream_cut_without_close_notify() {
    let Some(k) = kernel() else { return };
    let pki = pki();
    let (mut client, server, _) = pair(&pki, None, Some(k)).await;
    let (b, mut target) = crate::transport::tcp_pair().await;
    let relay = tokio::spawn(async move {
        splice::relay_plain(server.plain().unwrap(), Plain::Tcp(&b), &Activity::default()).await
    });
    client.write_all(b"half a request").await.unwrap();
    client.flush().await.unwrap();
    let mut got = [0u8; 14];
    target.read_exact(&mut got).await.unwrap();
    socket2::SockRef::from(client.tcp()).shutdown(std::net::Shutdown::Write).unwrap();
    let err = relay.await.unwrap().expect_err("a truncated stream is no clean end");
    assert_eq!(err.end, End::A);
    assert_eq!(err.source.kind(), io::ErrorKind::UnexpectedEof, "{}", err.source);
    let mut rest = [0u8; 8];
    let cut = target.read(&mut rest).await;
    assert!(
        matches!(&cut, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
        "the target sees a reset: {cut:?}"
    );
}

/// The key handed to the kernel is wiped from user memory when dropped: key and IV zeroed (the record
/// sequence number, not a secret, stays).
#[test]
fn the_key_for_the_kernel_is_wiped() {
    use rustls::crypto::cipher::{AeadKey, Iv};
    let secrets = (
        7,
        ConnectionTrafficSecrets::Chacha20Poly1305 {
            key: AeadKey::from([0xAB; 32]),
            iv: Iv::new([0xCD; 12]),
        },
    );
    let mut key = kernel_key(&secrets).expect("a ChaCha20-Poly1305 key");
    let sockopt::TlsCryptoInfo::Chacha20Poly1305(info) = &key.0 else { panic!("ChaCha20-Poly1305") };
    assert_eq!((info.key, info.iv), ([0xAB; 32], [0xCD; 12]));
    key.wipe();
    let sockopt::TlsCryptoInfo::Chacha20Poly1305(info) = &key.0 else { panic!("ChaCha20-Poly1305") };
    assert_eq!((info.key, info.iv), ([0; 32], [0; 12]));
}
