//! TLS 1.3 records in user space: rustls's unbuffered connection, kept from the handshake on for the
//! link's whole life, seals and opens every record in buffers Spoke owns.
//!
//! rustls enforces what TLS 1.3 asks of records after the handshake: sizes and content types, a
//! `KeyUpdate` last in its record and at most 32 of them between application data records, at most 32
//! empty records in a row, alerts, `close_notify`, session tickets, and renewing its own keys before
//! the cipher suite's confidentiality limit. Spoke adds what a proxy holding thousands of idle links
//! needs around it:
//! - **Buffers only while bytes move.** The read buffer grows from one record while reads fill it and
//!   is freed when the link idles; a peer that stops mid-record keeps only that record's bytes. The
//!   write buffer is freed once written out.
//! - **Bounded work per poll.** rustls processes every record it is handed before it returns, so the
//!   reader hands it at most one new record per step and takes at most [`STEPS_PER_POLL`] steps per
//!   poll, then yields: a peer whose records open but carry no application data (key updates, empty
//!   records) cannot hold a runtime worker, whatever it sends.
//! - **An alert before an error close.** When rustls fails the connection it queues a fatal alert;
//!   it goes out, as far as the socket takes it at once, before the error is reported.
//! - **No truncation.** An end of the connection without `close_notify` is an error.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf as _, BytesMut};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::role::tls_error;
pub use super::role::{Role, is_tls_violation};

/// A record's header: type, legacy version, length.
pub(super) const HEADER: usize = 5;
/// Most plaintext bytes in one record.
pub const MAX_PLAINTEXT: usize = 16 * 1024;
/// Largest record on the wire (RFC 8446 §5.2: a protected payload of at most 2^14 + 256 bytes).
pub(super) const MAX_RECORD: usize = HEADER + MAX_PLAINTEXT + 256;
/// Bytes read from the socket at most per read while a stream moves (several records).
const READ_BUF: usize = 16 * MAX_RECORD;
/// Plaintext bytes sealed and sent with one write at most.
const WRITE_BATCH: usize = 16 * MAX_PLAINTEXT;
/// Bytes a record adds to its plaintext: header, inner content type, AEAD tag (22 with the suites
/// offered; a margin for any other).
const RECORD_OVERHEAD: usize = 32;
/// Bytes one connection's buffers hold at most while a stream moves (freed while it idles): the read
/// buffer (which may hold twice its read size), the opened plaintext waiting for the reader (at most
/// one read's records), and the sealed records waiting for the socket.
pub const MAX_HELD: usize = 2 * READ_BUF + READ_BUF + WRITE_BATCH + 16 * RECORD_OVERHEAD;
/// Steps (each at most one new record handed to rustls) one poll takes before it yields.
pub const STEPS_PER_POLL: usize = 64;

/// The end of the sending direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sending {
    Open,
    /// `close_notify` sealed: flushing it, then the TCP write half is shut.
    Closing,
    Closed,
}

/// What a step asks of rustls once the records it was handed are processed.
enum Want<'a> {
    /// Nothing: only process the records.
    Input,
    /// Seal these application bytes.
    Seal(&'a [u8]),
    /// Seal `close_notify`.
    CloseNotify,
    /// Send a `KeyUpdate` and switch to new sending keys.
    RefreshKeys,
}

/// How a step ended.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// rustls has more to say: step again.
    Again,
    /// Every record handed over was processed; more must be read from the socket.
    NeedInput,
    /// What was wanted is done.
    Done,
}

/// A TLS connection after its handshake, its records sealed and opened by rustls (see the module
/// documentation).
pub struct UserTls<D: Role> {
    tcp: TcpStream,
    conn: D::Conn,
    /// Bytes received and not yet discarded by rustls: records, or the start of one. Empty, without an
    /// allocation, while nothing is in flight.
    rbuf: BytesMut,
    /// The first `handed` bytes of `rbuf`, whole records, were handed to rustls (it may keep some, as
    /// part of a handshake message split across records): every step hands at least these again.
    handed: usize,
    /// Bytes asked of the socket per read: from one record, doubled while reads fill it.
    read_size: usize,
    /// Largest `read_size`: [`READ_BUF`], or one record for a connection that carries frames only.
    max_read: usize,
    /// Opened application bytes the reader has not taken yet: `plain[ppos..]`.
    plain: Vec<u8>,
    ppos: usize,
    /// Sealed bytes not yet written.
    out: Outgoing,
    /// `close_notify` received: the peer's direction ended.
    read_closed: bool,
    sending: Sending,
    /// What the peer's certificate says (a kubelet's client certificate names its node), read at the
    /// handshake.
    peer: super::tls::Peer,
    /// What failed the connection: every later read and write fails with it.
    broken: Option<Broken>,
}

impl<D: Role> std::fmt::Debug for UserTls<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Neither keys nor buffers: what identifies the connection.
        f.debug_struct("UserTls")
            .field("tcp", &self.tcp)
            .field("suite", &self.conn.negotiated_cipher_suite().map(|s| s.suite()))
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// What failed a connection.
#[derive(Clone, Debug)]
enum Broken {
    /// rustls refused what the peer sent ([`is_tls_violation`] tells it from the error).
    Tls(rustls::Error),
    /// The socket failed.
    Io(io::ErrorKind, String),
}

impl Broken {
    fn error(&self) -> io::Error {
        match self {
            Self::Tls(e) => tls_error(e.clone()),
            Self::Io(kind, what) => io::Error::new(*kind, what.clone()),
        }
    }
}

/// Sealed bytes not yet written: `buf[pos..end]`; `buf`'s length is its initialised room, reused by a
/// bulk stream without zeroing it again.
#[derive(Default)]
struct Outgoing {
    buf: Vec<u8>,
    pos: usize,
    end: usize,
}

impl Outgoing {
    /// Room for `more` bytes after what is queued.
    fn room(&mut self, more: usize) -> &mut [u8] {
        if self.pos == self.end {
            (self.pos, self.end) = (0, 0);
        }
        if self.buf.len() < self.end + more {
            self.buf.resize(self.end + more, 0);
        }
        &mut self.buf[self.end..]
    }

    /// Fills room with `fill` (which says how much room it needs when it has too little) and queues
    /// what it wrote.
    fn put<E>(
        &mut self,
        mut room: usize,
        mut fill: impl FnMut(&mut [u8]) -> Result<usize, E>,
        too_small: impl Fn(&E) -> Option<usize>,
    ) -> Result<(), E> {
        loop {
            match fill(self.room(room)) {
                Ok(n) => {
                    self.end += n;
                    return Ok(());
                }
                Err(e) => room = too_small(&e).ok_or(e)?,
            }
        }
    }
}

fn too_small(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => Some(*required_size),
        EncryptError::EncryptExhausted => None,
    }
}

fn encrypt_error(e: &EncryptError) -> rustls::Error {
    rustls::Error::General(e.to_string())
}

/// The end of the first record in `have` that starts at or after `from`, when it is whole; `None` when
/// it is not (or there is none).
fn next_record_end(have: &[u8], from: usize) -> Option<usize> {
    let header = have.get(from..from + HEADER)?;
    let end = from + HEADER + usize::from(u16::from_be_bytes([header[3], header[4]]));
    (end <= have.len()).then_some(end)
}

/// The end of the last whole record in `have` (records from its start).
fn whole_records(have: &[u8]) -> usize {
    let mut at = 0;
    while let Some(end) = next_record_end(have, at) {
        at = end;
    }
    at
}

impl<D: Role> UserTls<D> {
    /// The connection after its handshake ([`super::handshake`]): `received` holds the bytes read past
    /// the handshake, `plaintext` application bytes rustls opened with it.
    pub(super) fn new(
        tcp: TcpStream,
        conn: D::Conn,
        received: &[u8],
        plaintext: Vec<u8>,
        peer: super::tls::Peer,
    ) -> Self {
        let handed = whole_records(received);
        let rbuf = if received.is_empty() { BytesMut::new() } else { BytesMut::from(received) };
        Self {
            tcp,
            conn,
            rbuf,
            handed,
            read_size: MAX_RECORD,
            max_read: READ_BUF,
            plain: plaintext,
            ppos: 0,
            out: Outgoing::default(),
            read_closed: false,
            sending: Sending::Open,
            peer,
            broken: None,
        }
    }

    /// The TCP connection underneath.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// What the peer's certificate says.
    pub fn peer(&self) -> &super::tls::Peer {
        &self.peer
    }

    /// Bytes of buffer this connection holds now (what it read and sealed, and what it opened and the
    /// reader has not taken): none while it idles.
    pub fn held(&self) -> usize {
        self.rbuf.capacity() + self.plain.capacity() + self.out.buf.capacity()
    }

    /// The negotiated cipher suite.
    pub fn suite(&self) -> Option<rustls::CipherSuite> {
        self.conn.negotiated_cipher_suite().map(|s| s.suite())
    }

    /// Hands rustls what it kept plus at most one new whole record, deals with the state it reaches,
    /// and does `want` where the connection may send application data. Opened application bytes go
    /// to `reader` as far as it has room, the rest to `plain`.
    fn step(&mut self, want: &Want<'_>, mut reader: Option<&mut ReadBuf<'_>>) -> Result<Step, rustls::Error> {
        // A record that is not whole yet is handed too (rustls refuses a bad header at once), but
        // `handed` only ever counts whole records: it must stay on a record boundary.
        let next = next_record_end(&self.rbuf, self.handed);
        let (end, whole) = (next.unwrap_or(self.rbuf.len()), next.unwrap_or(self.handed));
        let UnbufferedStatus { mut discard, state } = D::process(&mut self.conn, &mut self.rbuf[..end]);
        let step = match state {
            Err(e) => {
                self.handed = whole.saturating_sub(discard);
                self.rbuf.advance(discard);
                return Err(e);
            }
            Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                while let Some(record) = traffic.next_record() {
                    let record = record?;
                    discard += record.discard;
                    let mut payload = record.payload;
                    if let Some(reader) = reader.as_deref_mut() {
                        let n = payload.len().min(reader.remaining());
                        reader.put_slice(&payload[..n]);
                        payload = &payload[n..];
                    }
                    if !payload.is_empty() {
                        if self.ppos == self.plain.len() {
                            self.plain.clear();
                            self.ppos = 0;
                        }
                        self.plain.extend_from_slice(payload);
                    }
                }
                Step::Again
            }
            Ok(ConnectionState::EncodeTlsData(mut data)) => {
                self.out
                    .put(
                        MAX_RECORD,
                        |room| data.encode(room),
                        |e| match e {
                            EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
                                Some(*required_size)
                            }
                            EncodeError::AlreadyEncoded => None,
                        },
                    )
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
                Step::Again
            }
            // The bytes are in `out`, which `poll_send` writes.
            Ok(ConnectionState::TransmitTlsData(data)) => {
                data.done();
                Step::Again
            }
            Ok(ConnectionState::PeerClosed) => {
                self.read_closed = true;
                Step::Again
            }
            Ok(ConnectionState::Closed) => {
                self.read_closed = true;
                match want {
                    Want::Input => Step::NeedInput,
                    _ => return Err(rustls::Error::General("the connection is closed both ways".into())),
                }
            }
            Ok(ConnectionState::WriteTraffic(mut traffic)) => match want {
                Want::Input => Step::NeedInput,
                Want::Seal(data) => {
                    let room = data.len() + data.len().div_ceil(MAX_PLAINTEXT) * RECORD_OVERHEAD + MAX_RECORD;
                    self.out
                        .put(room, |room| traffic.encrypt(data, room), too_small)
                        .map_err(|e| encrypt_error(&e))?;
                    Step::Done
                }
                Want::CloseNotify => {
                    self.out
                        .put(MAX_RECORD, |room| traffic.queue_close_notify(room), too_small)
                        .map_err(|e| encrypt_error(&e))?;
                    Step::Done
                }
                Want::RefreshKeys => {
                    traffic.refresh_traffic_keys()?;
                    Step::Done
                }
            },
            Ok(ConnectionState::BlockedHandshake) => {
                return Err(rustls::Error::General("handshake state after the handshake".into()));
            }
            Ok(_) => {
                return Err(rustls::Error::General("early data after the handshake".into()));
            }
        };
        // rustls discards whole records only, all of them within `whole`.
        self.handed = whole.saturating_sub(discard);
        self.rbuf.advance(discard);
        // Records past what was handed are whole already: the next step takes them, not a read.
        if step == Step::NeedInput && next_record_end(&self.rbuf, self.handed).is_some() {
            return Ok(Step::Again);
        }
        Ok(step)
    }

    /// A step that failed the connection: remembered, and the alert rustls queued for it encoded. One
    /// step only: rustls hands out what it queued before it processes any record again, and a failed
    /// connection processes none (the record that failed may still be in `rbuf`).
    fn fail(&mut self, e: rustls::Error) -> io::Error {
        if self.broken.is_none() {
            self.broken = Some(Broken::Tls(e.clone()));
            let _ = self.step(&Want::Input, None);
        }
        tls_error(e)
    }

    /// The error that failed the connection.
    fn broken_error(&self) -> Option<io::Error> {
        self.broken.as_ref().map(Broken::error)
    }

    /// Steps until `want` is done.
    fn until_done(&mut self, want: &Want<'_>) -> io::Result<()> {
        if let Some(e) = self.broken_error() {
            return Err(e);
        }
        loop {
            match self.step(want, None) {
                Ok(Step::Done) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(self.fail(e)),
            }
        }
    }

    /// Sends a `KeyUpdate` (asking the peer to update too) and switches to new sending keys, as rustls
    /// does by itself near the confidentiality limit; it goes out with the next write or flush.
    pub fn refresh_traffic_keys(&mut self) -> io::Result<()> {
        self.until_done(&Want::RefreshKeys)?;
        // rustls queues the message; encode it now.
        self.until_done(&Want::Seal(&[]))
    }

    /// Writes out what is sealed (the buffer is kept for the next records: a bulk stream reuses it).
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let out = &mut self.out;
        while out.pos < out.end {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &out.buf[out.pos..out.end]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            out.pos += n;
        }
        (out.pos, out.end) = (0, 0);
        Poll::Ready(Ok(()))
    }

    /// Writes what the socket takes now, without waiting: for the read path, which must not register
    /// for the socket's write readiness (a link split across two tasks would lose its writer's wake-up).
    /// What is left goes out with the next write or flush.
    fn try_send(&mut self) -> io::Result<()> {
        let out = &mut self.out;
        while out.pos < out.end {
            match self.tcp.try_write(&out.buf[out.pos..out.end]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => out.pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        (out.pos, out.end) = (0, 0);
        Ok(())
    }

    /// Everything written out: the send buffer is freed (an idle stream holds none).
    fn poll_send_all(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send(cx))?;
        self.out.buf = Vec::new();
        Poll::Ready(Ok(()))
    }

    /// Hands the reader what is opened and not yet taken.
    fn take_plain(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.ppos == self.plain.len() {
            return false;
        }
        let n = (self.plain.len() - self.ppos).min(buf.remaining());
        buf.put_slice(&self.plain[self.ppos..self.ppos + n]);
        self.ppos += n;
        if self.ppos == self.plain.len() {
            (self.plain, self.ppos) = (Vec::new(), 0);
        }
        n > 0
    }

    /// Reads more records into `rbuf`, into its spare room (never zeroed first).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.rbuf.reserve(self.read_size);
        let room = self.rbuf.capacity() - self.rbuf.len();
        let n = ready!(tokio_util::io::poll_read_buf(Pin::new(&mut self.tcp), cx, &mut self.rbuf))?;
        if n == room {
            self.read_size = (self.read_size * 2).min(self.max_read);
        }
        Poll::Ready(Ok(n))
    }

    /// The connection carries frames, not streams (a control channel): reads stay at one record, so its
    /// read buffer holds at most two (about 33 KiB) however much the peer sends.
    pub fn small_reads(&mut self) {
        self.max_read = MAX_RECORD;
    }

    /// The connection waits unread (parked at the server): it holds no more buffer than the bytes of a
    /// record that is not whole yet, as when a read finds nothing.
    pub fn park(&mut self) {
        self.idle();
    }

    /// Nothing to read now: hold no more buffer than the bytes of a record that is not whole yet.
    fn idle(&mut self) {
        self.read_size = MAX_RECORD;
        if self.rbuf.is_empty() {
            self.rbuf = BytesMut::new();
        } else if self.rbuf.capacity() > 2 * MAX_RECORD {
            self.rbuf = BytesMut::from(&self.rbuf[..]);
        }
    }
}

impl<D: Role> AsyncRead for UserTls<D> {
    /// Opens as many records as the socket has ready and `buf` can take, up to [`STEPS_PER_POLL`]
    /// steps, so that a bulk stream moves large chunks per call; holds no buffer once nothing is in
    /// flight.
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut progressed = this.take_plain(buf);
        let mut steps = 0;
        loop {
            if buf.remaining() == 0 || this.ppos < this.plain.len() {
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = this.broken_error() {
                // Reported once the bytes before the failure were read; the alert goes out first.
                let _ = this.try_send();
                return Poll::Ready(if progressed { Ok(()) } else { Err(e) });
            }
            if this.read_closed {
                if !progressed {
                    (this.rbuf, this.handed) = (BytesMut::new(), 0);
                }
                return Poll::Ready(Ok(()));
            }
            if steps == STEPS_PER_POLL {
                // Bounded work per poll: let the worker run other tasks, then go on.
                if progressed {
                    return Poll::Ready(Ok(()));
                }
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            steps += 1;
            let filled = buf.filled().len();
            match this.step(&Want::Input, Some(buf)) {
                Ok(Step::Again | Step::Done) => {
                    progressed |= buf.filled().len() > filled;
                    // What rustls queued starts out now, as far as the socket takes it.
                    if let Err(e) = this.try_send() {
                        this.broken.get_or_insert(Broken::Io(e.kind(), e.to_string()));
                    }
                    continue;
                }
                Ok(Step::NeedInput) => {}
                Err(e) => {
                    this.fail(e);
                    continue;
                }
            }
            match this.poll_fill(cx) {
                Poll::Ready(Ok(n)) if n > 0 => {}
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
                    this.idle();
                    return Poll::Pending;
                }
            }
        }
    }
}

impl<D: Role> AsyncWrite for UserTls<D> {
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
        this.until_done(&Want::Seal(&buf[..take]))?;
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
            this.until_done(&Want::CloseNotify)?;
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
#[path = "user_tls_tests.rs"]
mod tests;
