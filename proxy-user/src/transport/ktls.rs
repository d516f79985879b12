//! Kernel TLS: after rustls's handshake the traffic keys go to the kernel (`TCP_ULP` "tls", then
//! `SOL_TLS` `TLS_TX` and `TLS_RX`), which seals and opens every record from then on. The connection's
//! plaintext crosses the socket API, so the splice tier moves a TLS stream kernel to kernel.
//!
//! What this follows (Linux `Documentation/networking/tls.rst`; DESIGN.md §8 for what was measured on
//! Debian's 6.1 and 6.12 kernels):
//! - The keys go in at a record boundary both ways: the handshake reads record by record
//!   ([`super::handshake`]), so nothing past it was read, and the record sequence numbers are the ones
//!   rustls hands over.
//! - A record that is not application data (an alert, a handshake message) comes only through
//!   `recvmsg` with a control buffer (`TLS_GET_RECORD_TYPE`), one record type per call and possibly in
//!   pieces; `read` fails on it with `EIO`, `splice` with `EINVAL`. `close_notify` goes out through
//!   `sendmsg` with `TLS_SET_RECORD_TYPE` 21.
//! - Kernels up to 6.12 cannot change keys (a `KeyUpdate` breaks the receiving side for good). So
//!   Spoke hands the kernel only `TLS_CHACHA20_POLY1305_SHA256` keys: unlike AES-GCM's, whose keys must
//!   be renewed after 2^24.5 records, they have no usage limit a 64-bit record sequence can reach
//!   (RFC 8446 §5.5). A stream on such a connection never needs a key update, however long it lives.
//!
//! Not the `ktls` crate: it configures tokio-rustls's buffered streams (draining them first), while
//! Spoke's handshake already ends on a record boundary with rustls's unbuffered API and its own record
//! layer; what is left is three socket options (nix's `TcpUlp`, `TcpTlsTx`, `TcpTlsRx`) and the control
//! records below.

use std::io::{self, IoSlice, IoSliceMut, Write as _};
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, TlsGetRecordType, recvmsg, setsockopt, sockopt};
use rustls::kernel::KernelConnection;
use rustls::{CipherSuite, ConnectionTrafficSecrets, ExtractedSecrets, HandshakeType};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use super::role::{Role, invalid, tls_error};

/// The one cipher suite Spoke hands to the kernel (see the module documentation).
pub const KERNEL_SUITE: CipherSuite = CipherSuite::TLS13_CHACHA20_POLY1305_SHA256;

/// Record content types (RFC 8446 §5.1).
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;

/// The `close_notify` alert: level warning, description 0.
const CLOSE_NOTIFY: [u8; 2] = [1, 0];

/// Largest handshake message accepted after the handshake (a session ticket is a few hundred bytes).
const MAX_CONTROL: usize = 16 * 1024;

/// Kernel TLS as this kernel offers it: the `tls` module and ChaCha20-Poly1305 keys, checked once on
/// a loopback pair by [`KernelTls::probe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelTls(());

/// Set once the kernel refused a connection's keys after the probe had passed: later connections stay
/// in user space (a connection whose secrets left rustls cannot).
static REFUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl KernelTls {
    /// Whether connections still go to the kernel (none has been refused since the probe).
    pub fn usable(self) -> bool {
        !REFUSED.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The kernel refused a connection's keys: say so once, and keep later connections in user space.
    pub(super) fn refused(error: &io::Error) {
        if !REFUSED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(%error, "kernel TLS refused a connection's keys: from now on TLS records stay in user space");
        }
    }

    /// Checks that this kernel seals and opens records with a ChaCha20-Poly1305 key on TCP sockets,
    /// and tells their type through `recvmsg`; why not, as an operator would fix it, otherwise. (Setting
    /// the upper layer loads the `tls` module where the process has `CAP_NET_ADMIN`.)
    pub fn probe() -> Result<Self, String> {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("probe socket: {e}"))?;
        let addr = listener.local_addr().map_err(|e| format!("probe socket: {e}"))?;
        let sender = std::net::TcpStream::connect(addr).map_err(|e| format!("probe connect: {e}"))?;
        let (receiver, _) = listener.accept().map_err(|e| format!("probe accept: {e}"))?;
        let info = crypto_info(0, &[7; 32], &[9; 12]);
        for socket in [&sender, &receiver] {
            setsockopt(socket, sockopt::TcpUlp::default(), &&b"tls"[..]).map_err(|e| match e {
                nix::errno::Errno::ENOENT => {
                    "the kernel has no TLS upper layer (CONFIG_TLS: load the tls module)".to_owned()
                }
                e => format!("setsockopt(TCP_ULP, \"tls\"): {e}"),
            })?;
        }
        let refused =
            |e| format!("kernel TLS takes no ChaCha20-Poly1305 key ({e}; load the chacha20poly1305 module)");
        setsockopt(&sender, sockopt::TcpTlsTx, &info).map_err(refused)?;
        setsockopt(&receiver, sockopt::TcpTlsRx, &info).map_err(refused)?;
        (&sender).write_all(b"spoke").map_err(|e| format!("kernel TLS send: {e}"))?;
        receiver
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .map_err(|e| format!("probe socket: {e}"))?;
        let mut got = [0u8; 8];
        let (n, typ) =
            recv(&receiver, &mut got, MsgFlags::empty()).map_err(|e| format!("kernel TLS receive: {e}"))?;
        if (&got[..n], typ) != (&b"spoke"[..], APPLICATION_DATA) {
            return Err(format!("kernel TLS opened {:02x?} of type {typ}, not what was sealed", &got[..n]));
        }
        Ok(Self(()))
    }
}

/// A ChaCha20-Poly1305 key for `TLS_TX` or `TLS_RX`, from record `seq` on.
fn crypto_info(seq: u64, key: &[u8; 32], iv: &[u8; 12]) -> sockopt::TlsCryptoInfo {
    sockopt::TlsCryptoInfo::Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305 {
        info: libc::tls_crypto_info {
            version: libc::TLS_1_3_VERSION,
            cipher_type: libc::TLS_CIPHER_CHACHA20_POLY1305,
        },
        iv: *iv,
        key: *key,
        salt: [],
        rec_seq: seq.to_be_bytes(),
    })
}

/// One direction's key from rustls's secrets.
fn kernel_key((seq, secrets): &(u64, ConnectionTrafficSecrets)) -> io::Result<Wiped> {
    let ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } = secrets else {
        return Err(invalid("kernel TLS is used with ChaCha20-Poly1305 only"));
    };
    let key: &[u8; 32] = key.as_ref().try_into().map_err(|_| invalid("ChaCha20 key of the wrong length"))?;
    let iv: &[u8; 12] = iv.as_ref().try_into().map_err(|_| invalid("ChaCha20 IV of the wrong length"))?;
    Ok(Wiped(crypto_info(*seq, key, iv)))
}

/// Why keys could not go to the kernel, and whether the socket is still usable in user space.
#[derive(Debug)]
pub(super) enum InstallError {
    /// Nothing was changed: the connection can go on with user-space records.
    Untouched(io::Error),
    /// The kernel took one direction's key: the connection is lost.
    Broken(io::Error),
}

/// Hands both directions' keys to the kernel.
pub(super) fn install(tcp: &TcpStream, secrets: &ExtractedSecrets) -> Result<(), InstallError> {
    let (tx, rx) = match (kernel_key(&secrets.tx), kernel_key(&secrets.rx)) {
        (Ok(tx), Ok(rx)) => (tx, rx),
        (Err(e), _) | (_, Err(e)) => return Err(InstallError::Untouched(e)),
    };
    // Without keys the TLS upper layer passes bytes through: a failure up to here leaves TCP as it was.
    setsockopt(tcp, sockopt::TcpUlp::default(), &&b"tls"[..])
        .map_err(|e| InstallError::Untouched(io::Error::from(e)))?;
    setsockopt(tcp, sockopt::TcpTlsTx, &tx.0).map_err(|e| InstallError::Untouched(io::Error::from(e)))?;
    setsockopt(tcp, sockopt::TcpTlsRx, &rx.0).map_err(|e| InstallError::Broken(io::Error::from(e)))
}

/// A key for the kernel, wiped once it was handed over (or not).
struct Wiped(sockopt::TlsCryptoInfo);

impl Drop for Wiped {
    fn drop(&mut self) {
        self.wipe();
    }
}

impl Wiped {
    /// Overwrites key, IV and salt with zeros (what dropping does).
    fn wipe(&mut self) {
        use zeroize::Zeroize as _;
        match &mut self.0 {
            sockopt::TlsCryptoInfo::Chacha20Poly1305(info) => {
                info.key.zeroize();
                info.iv.zeroize();
            }
            sockopt::TlsCryptoInfo::Aes128Gcm(info) => {
                info.key.zeroize();
                info.iv.zeroize();
                info.salt.zeroize();
            }
            sockopt::TlsCryptoInfo::Aes256Gcm(info) => {
                info.key.zeroize();
                info.iv.zeroize();
                info.salt.zeroize();
            }
        }
    }
}

/// What a record that is not application data meant.
#[derive(Debug, PartialEq, Eq)]
pub enum Control {
    /// `close_notify`: the peer's direction ended.
    CloseNotify,
    /// A `NewSessionTicket` message's body.
    Ticket(Vec<u8>),
}

/// The bytes of records that are not application data, gathered until they make whole messages (the
/// kernel may hand a record over in pieces).
#[derive(Debug, Default)]
pub struct ControlRecords {
    typ: u8,
    bytes: Vec<u8>,
}

impl ControlRecords {
    /// Whether a message is half received.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Takes `bytes` of a record of type `typ`; returns the messages they complete.
    pub fn take(&mut self, typ: u8, bytes: &[u8]) -> io::Result<Vec<Control>> {
        if !self.bytes.is_empty() && typ != self.typ {
            return Err(invalid("a TLS message split across records of different types"));
        }
        self.typ = typ;
        self.bytes.extend_from_slice(bytes);
        let mut done = Vec::new();
        match typ {
            ALERT => {
                if self.bytes.len() >= 2 {
                    let alert = [self.bytes[0], self.bytes[1]];
                    if alert[1] != 0 || self.bytes.len() > 2 {
                        return Err(invalid(format!("the peer sent TLS alert {:?}", &self.bytes)));
                    }
                    self.bytes.clear();
                    done.push(Control::CloseNotify);
                }
            }
            HANDSHAKE => {
                while let [kind, a, b, c, rest @ ..] = &self.bytes[..] {
                    let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
                    if len > MAX_CONTROL {
                        return Err(invalid("handshake message too long"));
                    }
                    if rest.len() < len {
                        break;
                    }
                    match HandshakeType::from(*kind) {
                        HandshakeType::NewSessionTicket => done.push(Control::Ticket(rest[..len].to_vec())),
                        HandshakeType::KeyUpdate => {
                            return Err(invalid(
                                "the peer updated its TLS keys, which kernel TLS cannot follow",
                            ));
                        }
                        other => {
                            return Err(invalid(format!("handshake message {other:?} after the handshake")));
                        }
                    }
                    self.bytes.drain(..4 + len);
                }
            }
            other => return Err(invalid(format!("TLS record of type {other} after the handshake"))),
        }
        Ok(done)
    }
}

/// Reads into `buf` (`MSG_DONTWAIT` in `flags` for what the socket has now): the byte count and the
/// record type.
pub(crate) fn recv(tcp: &impl AsFd, buf: &mut [u8], flags: MsgFlags) -> io::Result<(usize, u8)> {
    let mut cmsg = nix::cmsg_space!(u8);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(tcp.as_fd().as_raw_fd(), &mut iov, Some(&mut cmsg), flags)?;
    let mut typ = APPLICATION_DATA;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::TlsGetRecordType(t) = c {
            typ = match t {
                TlsGetRecordType::ChangeCipherSpec => 20,
                TlsGetRecordType::Alert => ALERT,
                TlsGetRecordType::Handshake => HANDSHAKE,
                TlsGetRecordType::ApplicationData => APPLICATION_DATA,
                TlsGetRecordType::Unknown(t) => t,
                _ => 0,
            };
        }
    }
    Ok((msg.bytes, typ))
}

/// Reads the record that stopped a splice (one that is not application data) through `recvmsg`:
/// `true` for `close_notify`. Session tickets are dropped: a stream that moves in the kernel keeps no
/// TLS state (the agent's next connection makes a full handshake instead of a resumed one).
pub(crate) fn read_control(tcp: &TcpStream) -> io::Result<bool> {
    let mut records = ControlRecords::default();
    let mut buf = [0u8; 512];
    loop {
        let (n, typ) = tcp.try_io(Interest::READABLE, || recv(tcp, &mut buf, MsgFlags::MSG_DONTWAIT))?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection ended inside a TLS record",
            ));
        }
        if typ == APPLICATION_DATA {
            return Err(invalid("splice stopped before application data"));
        }
        for control in records.take(typ, &buf[..n])? {
            match control {
                Control::CloseNotify => return Ok(true),
                Control::Ticket(_) => tracing::debug!("session ticket on a spliced stream: dropped"),
            }
        }
        if records.is_empty() {
            return Ok(false);
        }
    }
}

/// Sends `close_notify` (non-blocking): `sendmsg` with the record type as ancillary data.
pub(crate) fn send_close_notify(tcp: &impl AsFd) -> io::Result<()> {
    // struct cmsghdr { size_t cmsg_len; int cmsg_level; int cmsg_type; } then the type byte, padded.
    let mut control = [0u8; 32];
    let header = size_of::<libc::cmsghdr>();
    let (len, space) = (header + 1, (header + 1).next_multiple_of(size_of::<usize>()));
    control[..8].copy_from_slice(&len.to_ne_bytes());
    control[8..12].copy_from_slice(&libc::SOL_TLS.to_ne_bytes());
    control[12..16].copy_from_slice(&libc::TLS_SET_RECORD_TYPE.to_ne_bytes());
    control[16] = ALERT;
    let payload = [IoSlice::new(&CLOSE_NOTIFY)];
    let msg = socket2::MsgHdr::new().with_buffers(&payload).with_control(&control[..space]);
    let sent = socket2::SockRef::from(tcp).sendmsg(&msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)?;
    if sent == CLOSE_NOTIFY.len() { Ok(()) } else { Err(io::ErrorKind::WriteZero.into()) }
}

/// The end of the sending direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sending {
    Open,
    /// `close_notify` sent; FIN next.
    Notified,
    Closed,
}

/// A TLS 1.3 connection whose records the kernel seals and opens (see the module documentation).
pub struct Ktls<D: Role> {
    tcp: TcpStream,
    /// rustls's state after the handshake: session tickets go to the client's resumption cache.
    kernel: KernelConnection<D>,
    /// What the peer's certificate says (a kubelet's client certificate names its node), read at the
    /// handshake.
    peer: super::tls::Peer,
    control: ControlRecords,
    read_closed: bool,
    sending: Sending,
}

impl<D: Role> std::fmt::Debug for Ktls<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ktls").field("tcp", &self.tcp).field("peer", &self.peer).finish_non_exhaustive()
    }
}

impl<D: Role> Ktls<D> {
    /// A connection whose keys [`install`] handed to the kernel.
    pub(super) fn new(tcp: TcpStream, kernel: KernelConnection<D>, peer: super::tls::Peer) -> Self {
        Self {
            tcp,
            kernel,
            peer,
            control: ControlRecords::default(),
            read_closed: false,
            sending: Sending::Open,
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

    fn take_control(&mut self, typ: u8, bytes: &[u8]) -> io::Result<()> {
        for control in self.control.take(typ, bytes)? {
            match control {
                Control::CloseNotify => self.read_closed = true,
                Control::Ticket(body) => D::ticket(&mut self.kernel, &body).map_err(tls_error)?,
            }
        }
        Ok(())
    }
}

/// A failed `recvmsg` as the reader should see it: a record that did not open is bad data.
fn read_error(e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(libc::EBADMSG) => invalid("a TLS record did not open (kernel TLS)"),
        _ => e,
    }
}

impl<D: Role> AsyncRead for Ktls<D> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.read_closed || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            ready!(this.tcp.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let got =
                this.tcp.try_io(Interest::READABLE, || recv(&this.tcp, unfilled, MsgFlags::MSG_DONTWAIT));
            match got {
                Ok((0, _)) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection ended without close_notify",
                    )));
                }
                Ok((n, APPLICATION_DATA)) => {
                    if !this.control.is_empty() {
                        return Poll::Ready(Err(invalid("a TLS message cut short by application data")));
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok((n, typ)) => {
                    let bytes = unfilled[..n].to_vec();
                    this.take_control(typ, &bytes)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(read_error(e))),
            }
        }
    }
}

impl<D: Role> AsyncWrite for Ktls<D> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.sending != Sending::Open {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut this.tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// `close_notify`, then FIN.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.sending == Sending::Open {
            ready!(this.tcp.poll_write_ready(cx))?;
            match this.tcp.try_io(Interest::WRITABLE, || send_close_notify(&this.tcp)) {
                Ok(()) => this.sending = Sending::Notified,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        if this.sending == Sending::Notified {
            ready!(Pin::new(&mut this.tcp).poll_shutdown(cx))?;
            this.sending = Sending::Closed;
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
#[path = "ktls_tests.rs"]
mod tests;
