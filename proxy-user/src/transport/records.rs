//! TLS 1.3 between agent and server, with the records carried by Spoke itself once rustls has
//! negotiated the connection.
//!
//! rustls runs the handshake with its unbuffered API (so that nothing it read stays inside it), then
//! hands over the traffic secrets and a [`KernelConnection`], which follows key updates and keeps the
//! session tickets the server sends. [`Records`] seals and opens the records with rustls's own AEAD
//! implementations. Why: a buffered rustls connection keeps a 4 KiB record buffer and its handshake
//! buffers for as long as it lives, which every idle stream paid twice; a [`Records`] holds a buffer
//! only while bytes move (docs/benchmarks.md). The same hand-over is what kernel TLS needs.
//!
//! What a record may carry after the handshake (RFC 8446): application data; an alert (`close_notify`
//! ends the peer's direction, any other alert fails the connection); a handshake message, of which a
//! `NewSessionTicket` (to a client) is kept for resumption and a `KeyUpdate` switches the receiving
//! keys (and, when the peer asks, the sending ones). Anything else, a record that does not open, or an
//! end of the connection without `close_notify` is an error: a truncated stream never looks complete.
//! The sending keys are renewed before the cipher suite's confidentiality limit.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf as _, BytesMut};
use rustls::client::ClientConnectionData;
use rustls::crypto::cipher::{
    AeadKey, InboundOpaqueMessage, Iv, MessageDecrypter, MessageEncrypter, OutboundChunks,
    OutboundPlainMessage,
};
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{ConnectionTrafficSecrets, ContentType, HandshakeType, ProtocolVersion, SupportedCipherSuite};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::handshake::Leftover;

/// A record's header: type, legacy version, length.
pub(super) const HEADER: usize = 5;
/// Most plaintext bytes in one record.
pub const MAX_PLAINTEXT: usize = 16 * 1024;
/// Most bytes of a record's protected payload (RFC 8446 §5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// Largest record on the wire.
pub(super) const MAX_RECORD: usize = HEADER + MAX_CIPHERTEXT;
/// Records sent under one key at most, below the suite's limit, before the key is renewed.
const KEY_UPDATE_MARGIN: u64 = 1 << 16;
/// Bytes read from the socket at most per read while a stream moves (several records).
const READ_BUF: usize = 16 * MAX_RECORD;
/// Plaintext bytes sealed and sent with one write at most.
const WRITE_BATCH: usize = 16 * MAX_PLAINTEXT;

pub(super) fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

pub(super) fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The side a [`Records`] is on: a client keeps the session tickets it receives; a server gets none.
pub trait Role: Sized + Send + Sync + Unpin + 'static {
    /// Takes a `NewSessionTicket` message's body.
    fn ticket(conn: &mut KernelConnection<Self>, body: &[u8]) -> Result<(), rustls::Error>;
}

impl Role for ClientConnectionData {
    fn ticket(conn: &mut KernelConnection<Self>, body: &[u8]) -> Result<(), rustls::Error> {
        conn.handle_new_session_ticket(body)
    }
}

impl Role for ServerConnectionData {
    fn ticket(_: &mut KernelConnection<Self>, _: &[u8]) -> Result<(), rustls::Error> {
        Err(rustls::Error::General("a client sent a session ticket".into()))
    }
}

/// One direction's keys.
struct Keys<T: ?Sized> {
    aead: Box<T>,
    seq: u64,
}

/// The end of the sending direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sending {
    Open,
    /// `close_notify` queued: flushing it, then the TCP write half is shut.
    Closing,
    Closed,
}

/// A TLS 1.3 connection after its handshake (see the module documentation).
pub struct Records<D: Role> {
    tcp: TcpStream,
    kernel: KernelConnection<D>,
    suite: &'static rustls::Tls13CipherSuite,
    tx: Keys<dyn MessageEncrypter>,
    rx: Keys<dyn MessageDecrypter>,
    /// Bytes received and not yet taken: `rbuf[rstart..]` (records, or the start of one). Empty,
    /// without an allocation, while nothing is in flight.
    rbuf: BytesMut,
    rstart: usize,
    /// Bytes asked of the socket per read: from one record, doubled while reads fill it.
    read_size: usize,
    /// Opened application bytes not yet read: `rbuf[pstart..pend]`, or `early` when non-empty.
    pstart: usize,
    pend: usize,
    early: Vec<u8>,
    /// Sealed bytes not yet written: `wbuf[wpos..]`.
    wbuf: Vec<u8>,
    wpos: usize,
    /// `close_notify` received: the peer's direction ended.
    read_closed: bool,
    sending: Sending,
    /// A `KeyUpdate` answering the peer's request went out since the last application data.
    update_answered: bool,
    /// The node the peer's certificate names (a kubelet's client certificate), read at the handshake.
    peer_node: Option<String>,
    /// A record that did not open (or broke the rules): every later read fails with it.
    broken: Option<(io::ErrorKind, String)>,
}

impl<D: Role> std::fmt::Debug for Records<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Neither keys nor buffers: what identifies the connection.
        f.debug_struct("Records")
            .field("tcp", &self.tcp)
            .field("suite", &self.suite.common.suite)
            .field("peer_node", &self.peer_node)
            .finish_non_exhaustive()
    }
}

/// The key and IV of one direction's traffic secrets.
fn key_iv(secrets: ConnectionTrafficSecrets) -> io::Result<(AeadKey, Iv)> {
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => Ok((key, iv)),
        _ => Err(invalid("unsupported traffic secrets")),
    }
}

/// Sending keys from `suite`'s AEAD and one direction's traffic secrets, from record `seq` on.
fn sending(
    suite: &rustls::Tls13CipherSuite,
    (seq, secrets): (u64, ConnectionTrafficSecrets),
) -> io::Result<Keys<dyn MessageEncrypter>> {
    let (key, iv) = key_iv(secrets)?;
    Ok(Keys { aead: suite.aead_alg.encrypter(key, iv), seq })
}

/// Receiving keys, as [`sending`].
fn receiving(
    suite: &rustls::Tls13CipherSuite,
    (seq, secrets): (u64, ConnectionTrafficSecrets),
) -> io::Result<Keys<dyn MessageDecrypter>> {
    let (key, iv) = key_iv(secrets)?;
    Ok(Keys { aead: suite.aead_alg.decrypter(key, iv), seq })
}

impl<D: Role> Records<D> {
    /// The connection after its handshake ([`super::handshake`]).
    pub(super) fn new(
        tcp: TcpStream,
        kernel: KernelConnection<D>,
        secrets: rustls::ExtractedSecrets,
        leftover: Leftover,
        peer_node: Option<String>,
    ) -> io::Result<Self> {
        let SupportedCipherSuite::Tls13(suite) = kernel.negotiated_cipher_suite() else {
            return Err(invalid("not a TLS 1.3 cipher suite"));
        };
        let (tx, rx) = (sending(suite, secrets.tx)?, receiving(suite, secrets.rx)?);
        let rbuf =
            if leftover.records.is_empty() { BytesMut::new() } else { BytesMut::from(&leftover.records[..]) };
        Ok(Self {
            tcp,
            kernel,
            suite,
            tx,
            rx,
            rbuf,
            rstart: 0,
            read_size: MAX_RECORD,
            pstart: 0,
            pend: 0,
            early: leftover.plaintext,
            wbuf: Vec::new(),
            wpos: 0,
            read_closed: false,
            sending: Sending::Open,
            update_answered: false,
            peer_node,
            broken: None,
        })
    }

    /// The TCP connection underneath.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// The node the peer's certificate names (`CN=system:node:<name>, O=system:nodes`), if it does.
    pub fn peer_node(&self) -> Option<&str> {
        self.peer_node.as_deref()
    }

    /// The negotiated cipher suite.
    pub fn suite(&self) -> rustls::CipherSuite {
        self.suite.common.suite
    }

    /// The length of the record at the start of `rbuf[rstart..]`, once it is all there.
    fn whole_record(&self) -> io::Result<Option<usize>> {
        let have = &self.rbuf[self.rstart..];
        if have.len() < HEADER {
            return Ok(None);
        }
        if have[0] != u8::from(ContentType::ApplicationData) {
            return Err(invalid(format!("record of type {} after the handshake", have[0])));
        }
        let len = usize::from(u16::from_be_bytes([have[3], have[4]]));
        if len > MAX_CIPHERTEXT {
            return Err(invalid("record too long"));
        }
        Ok((have.len() >= HEADER + len).then_some(HEADER + len))
    }

    /// Opens the record of `len` bytes at `rstart` and takes it in.
    fn open_record(&mut self, len: usize) -> io::Result<()> {
        let start = self.rstart;
        self.rstart += len;
        let base = self.rbuf.as_ptr() as usize;
        let payload = &mut self.rbuf[start + HEADER..start + len];
        let msg = InboundOpaqueMessage::new(ContentType::ApplicationData, ProtocolVersion::TLSv1_2, payload);
        let plain = self.rx.aead.decrypt(msg, self.rx.seq).map_err(tls_error)?;
        self.rx.seq += 1;
        let typ = plain.typ;
        let offset = plain.payload.as_ptr() as usize - base;
        let n = plain.payload.len();
        match typ {
            ContentType::ApplicationData => {
                self.pstart = offset;
                self.pend = offset + n;
            }
            ContentType::Alert => {
                let alert = &self.rbuf[offset..offset + n];
                if alert == [1, 0] || alert == [2, 0] {
                    self.read_closed = true;
                } else {
                    return Err(invalid(format!("the peer sent TLS alert {alert:?}")));
                }
            }
            ContentType::Handshake => {
                let messages = self.rbuf[offset..offset + n].to_vec();
                self.handshake(&messages)?;
            }
            other => return Err(invalid(format!("record of inner type {other:?} after the handshake"))),
        }
        Ok(())
    }

    /// Handshake messages after the handshake: session tickets and key updates.
    fn handshake(&mut self, mut messages: &[u8]) -> io::Result<()> {
        while !messages.is_empty() {
            let [typ, a, b, c, rest @ ..] = messages else { return Err(invalid("short handshake message")) };
            let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
            if rest.len() < len {
                return Err(invalid("handshake message split across records"));
            }
            let (body, rest) = rest.split_at(len);
            messages = rest;
            match HandshakeType::from(*typ) {
                HandshakeType::NewSessionTicket => D::ticket(&mut self.kernel, body).map_err(tls_error)?,
                HandshakeType::KeyUpdate => {
                    let requested = match body {
                        [0] => false,
                        [1] => true,
                        _ => return Err(invalid("malformed KeyUpdate")),
                    };
                    self.rx = receiving(self.suite, self.kernel.update_rx_secret().map_err(tls_error)?)?;
                    // Answered once until the next application data, however often the peer asks
                    // (RFC 8446 §4.6.3), so that a peer cannot make a silent side queue answers.
                    if requested && !self.update_answered {
                        self.update_tx_keys(false)?;
                        self.update_answered = true;
                    }
                }
                other => return Err(invalid(format!("handshake message {other:?} after the handshake"))),
            }
        }
        Ok(())
    }

    /// Seals one record of `typ` carrying `payload` onto `wbuf`.
    fn seal(&mut self, typ: ContentType, payload: &[u8]) -> io::Result<()> {
        if typ == ContentType::ApplicationData {
            self.update_answered = false;
        }
        let msg = OutboundPlainMessage {
            typ,
            version: ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(payload),
        };
        let sealed = self.tx.aead.encrypt(msg, self.tx.seq).map_err(tls_error)?.encode();
        self.tx.seq += 1;
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
        }
        if self.wbuf.is_empty() && self.wbuf.capacity() < sealed.len() {
            self.wbuf = sealed;
        } else {
            self.wbuf.extend_from_slice(&sealed);
        }
        Ok(())
    }

    /// Queues a `KeyUpdate` (asking the peer to update too) and switches to new sending keys, as near
    /// the confidentiality limit; sent with the next write or flush (for tests of a peer's handling).
    #[cfg(test)]
    pub(crate) fn force_key_update(&mut self) -> io::Result<()> {
        self.update_tx_keys(true)
    }

    /// Sends a `KeyUpdate` under the current keys and switches to new ones.
    fn update_tx_keys(&mut self, request: bool) -> io::Result<()> {
        self.seal(ContentType::Handshake, &[u8::from(HandshakeType::KeyUpdate), 0, 0, 1, u8::from(request)])?;
        self.tx = sending(self.suite, self.kernel.update_tx_secret().map_err(tls_error)?)?;
        Ok(())
    }

    /// Writes out `wbuf` (kept for the next records: a bulk stream reuses it).
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.wbuf[self.wpos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wpos += n;
        }
        self.wbuf.clear();
        self.wpos = 0;
        Poll::Ready(Ok(()))
    }

    /// Everything written out: the send buffer is freed (an idle stream holds none).
    fn poll_send_all(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send(cx))?;
        self.wbuf = Vec::new();
        Poll::Ready(Ok(()))
    }
}

impl<D: Role> AsyncRead for Records<D> {
    /// Opens as many records as the socket has ready and `buf` can take, so that a bulk stream moves
    /// large chunks per call; holds no buffer once nothing is in flight.
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut progressed = false;
        loop {
            if !this.early.is_empty() {
                let n = this.early.len().min(buf.remaining());
                buf.put_slice(&this.early[..n]);
                this.early.drain(..n);
                if this.early.is_empty() {
                    this.early = Vec::new();
                }
                progressed = true;
            }
            if this.pstart < this.pend {
                let n = (this.pend - this.pstart).min(buf.remaining());
                buf.put_slice(&this.rbuf[this.pstart..this.pstart + n]);
                this.pstart += n;
                progressed = true;
            }
            if buf.remaining() == 0 || !this.early.is_empty() || this.pstart < this.pend {
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                if !progressed {
                    (this.rbuf, this.rstart) = (BytesMut::new(), 0);
                }
                return Poll::Ready(Ok(()));
            }
            if let Some((kind, what)) = &this.broken {
                // Reported once the bytes before the failure were read.
                return if progressed {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Ready(Err(io::Error::new(*kind, what.clone())))
                };
            }
            match this.whole_record().and_then(|len| len.map(|len| this.open_record(len)).transpose()) {
                Ok(Some(())) => continue,
                Ok(None) => {}
                Err(e) => {
                    this.broken = Some((e.kind(), e.to_string()));
                    continue;
                }
            }
            // Need more: drop what was taken (the next record's start stays), then read into the
            // buffer's spare room, which is never zeroed first.
            this.rbuf.advance(this.rstart);
            this.rstart = 0;
            this.rbuf.reserve(this.read_size);
            let room = this.rbuf.capacity() - this.rbuf.len();
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.tcp), cx, &mut this.rbuf) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    if n == room {
                        this.read_size = (this.read_size * 2).min(READ_BUF);
                    }
                }
                // An end or an error is reported by the next call, after the bytes before it.
                Poll::Ready(_) | Poll::Pending if progressed => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(_)) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection ended without close_notify",
                    )));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Idle, nothing half received: hold no buffer.
                    if this.rbuf.is_empty() {
                        (this.rbuf, this.read_size) = (BytesMut::new(), MAX_RECORD);
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl<D: Role> AsyncWrite for Records<D> {
    /// Seals up to [`WRITE_BATCH`] bytes of `buf` into records and sends them with one write.
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.sending != Sending::Open {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        ready!(this.poll_send(cx))?;
        let take = buf.len().min(WRITE_BATCH);
        if take == 0 {
            return Poll::Ready(Ok(0));
        }
        // Each record adds its header, the inner content type and the AEAD tag (22 bytes; 32 to spare).
        this.wbuf.reserve(take + take.div_ceil(MAX_PLAINTEXT) * 32);
        for chunk in buf[..take].chunks(MAX_PLAINTEXT) {
            if this.tx.seq >= this.suite.common.confidentiality_limit.saturating_sub(KEY_UPDATE_MARGIN) {
                this.update_tx_keys(false)?;
            }
            this.seal(ContentType::ApplicationData, chunk)?;
        }
        // Start sending now; what the socket does not take goes out with the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(take))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_all(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.sending == Sending::Open {
            ready!(this.poll_send(cx))?;
            this.seal(ContentType::Alert, &[1, 0])?;
            this.sending = Sending::Closing;
        }
        if this.sending == Sending::Closing {
            ready!(this.poll_send_all(cx))?;
            ready!(Pin::new(&mut this.tcp).poll_shutdown(cx))?;
            this.sending = Sending::Closed;
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use std::sync::Arc;

    use rustls::HandshakeKind;
    use rustls_pki_types::ServerName;
    use tokio::time::Instant;

    use super::*;
    use crate::transport::handshake::{Kind, accept, connect};
    use crate::transport::secured::Secured;
    use crate::transport::tls;

    struct Pki {
        _dir: tempfile::TempDir,
        client: Arc<rustls::ClientConfig>,
        server: Arc<rustls::ServerConfig>,
    }

    fn pki() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let (server, agent) = tls::test_pki(dir.path());
        Pki { _dir: dir, client: tls::client_config(&agent).unwrap(), server }
    }

    async fn pair(pki: &Pki) -> (Records<ClientConnectionData>, Records<ServerConnectionData>, Kind) {
        let (a, b) = crate::transport::tcp_pair().await;
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let name = ServerName::try_from("localhost").unwrap();
        let (client, server) = tokio::join!(
            connect(pki.client.clone(), name, a, deadline, None),
            accept(pki.server.clone(), b, deadline, None)
        );
        let (Secured::User(client), established) = client.unwrap() else { panic!("kernel TLS unasked") };
        let Secured::User(server) = server.unwrap().0 else { panic!("kernel TLS unasked") };
        (client, server, established)
    }

    #[tokio::test]
    async fn bytes_both_ways_then_close_notify_each_way() {
        let pki = pki();
        let (mut client, mut server, _) = pair(&pki).await;
        let big: Vec<u8> = (0..3 * MAX_PLAINTEXT + 17).map(|i| u8::try_from(i % 251).unwrap()).collect();
        let expect = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&big).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, expect);
        server.write_all(b"answer after the client's end").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"answer after the client's end");
        // Idle and done: no buffer held.
        assert_eq!(server.rbuf.capacity() + server.wbuf.capacity(), 0);
    }

    #[tokio::test]
    async fn tickets_resume_the_next_handshake() {
        let pki = pki();
        let (mut client, mut server, first) = pair(&pki).await;
        assert_eq!(first, Some(HandshakeKind::Full));
        // The ticket arrives after the handshake, as records the client reads.
        server.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        client.read_exact(&mut one).await.unwrap();
        let (_c, _s, second) = pair(&pki).await;
        assert_eq!(second, Some(HandshakeKind::Resumed));
    }

    #[tokio::test]
    async fn key_updates_either_way_keep_the_stream() {
        let pki = pki();
        let (mut client, mut server, _) = pair(&pki).await;
        client.write_all(b"before").await.unwrap();
        client.update_tx_keys(true).unwrap(); // and asks the server to update its own
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

        // Asked twice while silent, the server answers once (one record queued: a 5-byte KeyUpdate,
        // its content type and the tag, behind a 5-byte header).
        client.update_tx_keys(true).unwrap();
        client.update_tx_keys(true).unwrap();
        client.write_all(b"z").await.unwrap();
        client.flush().await.unwrap();
        let mut z = [0u8; 1];
        server.read_exact(&mut z).await.unwrap();
        assert_eq!(server.wbuf.len() - server.wpos, 5 + 5 + 1 + 16);
        server.write_all(b"ok").await.unwrap();
        server.flush().await.unwrap();
        let mut ok = [0u8; 2];
        client.read_exact(&mut ok).await.unwrap();
        assert_eq!(&ok, b"ok");
    }

    #[tokio::test]
    async fn a_cut_connection_or_a_tampered_record_is_an_error() {
        let pki = pki();
        let (mut client, mut server, _) = pair(&pki).await;
        client.tcp.shutdown().await.unwrap(); // FIN without close_notify
        let err = server.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);

        let (mut client, mut server, _) = pair(&pki).await;
        client.seal(ContentType::ApplicationData, b"secret").unwrap();
        let last = client.wbuf.len() - 1;
        client.wbuf[last] ^= 1;
        client.flush().await.unwrap();
        let err = server.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
