//! Connections: how Spoke accepts them ([`accept`], the only accept loop), secures them ([`tls`]), and
//! the connection types both sides use.
//!
//! Names used throughout: a **link** is one agent ↔ server TCP connection, TLS or (for data connections
//! where the operator opted out) plain; the **control channel** is the link that carries an agent's
//! session; a **data connection** is a link that carries one stream; a **stream** is one CONNECT request
//! relayed end to end.

pub mod accept;
pub mod counted;
pub mod handshake;
pub mod ktls;
pub mod role;
pub mod secured;
pub mod tls;
pub mod user_tls;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// Idle time before TCP keepalive probes start on long-lived links.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Interval between TCP keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered keepalive probes before the kernel drops the connection.
pub const KEEPALIVE_RETRIES: u32 = 3;

/// First byte of a TLS handshake record; Spoke frames start with a length whose first byte is 0.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The kernel socket under a connection whose bytes cross it unencrypted: the kernel tiers can move
/// them without user space.
#[derive(Clone, Copy, Debug)]
pub enum Plain<'a> {
    /// A TCP socket.
    Tcp(&'a TcpStream),
    /// A Unix stream socket.
    Unix(&'a UnixStream),
    /// A TCP socket with kernel TLS ([`ktls`]): plaintext at the socket, records on the wire.
    Ktls(&'a TcpStream),
    /// A kernel TLS socket whose stream's ends are told by count ([`counted`]).
    Counted(counted::CountedSocket<'a>),
}

impl std::os::fd::AsFd for Plain<'_> {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Self::Tcp(s) | Self::Ktls(s) => s.as_fd(),
            Self::Unix(s) => s.as_fd(),
            Self::Counted(c) => c.socket().as_fd(),
        }
    }
}

/// A connected byte stream that a relay can carry.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Whether closing the connection resets it: with `true` the peer sees a reset rather than a clean
    /// end of stream, so a truncated stream never looks complete. Where the transport has no reset (Unix
    /// sockets) this does nothing and the connection is simply closed when dropped.
    fn reset_on_close(&self, reset: bool);

    /// Ends the connection as a failure once dropped: [`Stream::reset_on_close`] with `true`.
    fn abort(&self) {
        self.reset_on_close(true);
    }

    /// The kernel socket, where the stream's bytes cross it in plaintext; otherwise why not (a metric
    /// label, such as `tls_tunnel`).
    fn plain(&self) -> Result<Plain<'_>, &'static str>;
}

impl Stream for TcpStream {
    fn reset_on_close(&self, reset: bool) {
        // SO_LINGER 0: close() then sends RST and discards unsent data. Cannot block: the linger time is 0.
        let linger = reset.then_some(Duration::ZERO);
        if let Err(error) = socket2::SockRef::from(self).set_linger(linger) {
            tracing::debug!(%error, "set SO_LINGER");
        }
    }

    fn plain(&self) -> Result<Plain<'_>, &'static str> {
        Ok(Plain::Tcp(self))
    }
}

impl Stream for UnixStream {
    fn reset_on_close(&self, _reset: bool) {}

    fn plain(&self) -> Result<Plain<'_>, &'static str> {
        Ok(Plain::Unix(self))
    }
}

impl<S: Stream> Stream for tokio_rustls::server::TlsStream<S> {
    fn reset_on_close(&self, reset: bool) {
        self.get_ref().0.reset_on_close(reset);
    }

    fn plain(&self) -> Result<Plain<'_>, &'static str> {
        Err("tls")
    }
}

/// Socket options of a link between agent and server: no Nagle delay (frames are small and
/// latency-sensitive); keepalive, so that a vanished peer of an idle link is noticed; and
/// `TCP_USER_TIMEOUT` (`user_timeout`, none if zero), so that a link gone silent with data in flight,
/// which keepalive never probes and TCP would retransmit into for about 15 minutes, fails within it
/// (tcp(7): it also bounds the keepalive probes).
pub fn tune_link(stream: &TcpStream, user_timeout: Duration) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    let socket = socket2::SockRef::from(stream);
    socket.set_tcp_keepalive(&keepalive)?;
    if !user_timeout.is_zero() {
        socket.set_tcp_user_timeout(Some(user_timeout))?;
    }
    Ok(())
}

/// A link: TLS, or plain TCP where the operator opted out of encrypting data connections (an underlay
/// that is already encrypted). Plain data connections let the kernel tiers carry the stream.
#[derive(Debug)]
pub enum Link<T> {
    /// TLS over TCP. Boxed: a TLS session's state is over 1 KiB, and a plain link, held by every
    /// stream of a plaintext tunnel, should not carry room for it.
    Tls(Box<T>),
    /// Plain TCP.
    Plain(TcpStream),
}

/// A link as the server holds it (it accepted the TLS handshake).
pub type AcceptedLink = Link<secured::Secured<rustls::server::ServerConnectionData>>;
/// A link as the agent holds it (it dialed the server).
pub type DialedLink = Link<secured::Secured<rustls::client::ClientConnectionData>>;

impl<D: role::Role> Link<secured::Secured<D>> {
    /// What the peer's certificate says, over TLS (a plain link has no certificate).
    #[must_use]
    pub fn peer(&self) -> Option<&tls::Peer> {
        match self {
            Self::Tls(t) => Some(t.peer()),
            Self::Plain(_) => None,
        }
    }

    /// The node the peer's certificate names, over TLS ([`tls::Peer::node`]).
    #[must_use]
    pub fn peer_node(&self) -> Option<&str> {
        self.peer().and_then(|p| p.node.as_deref())
    }

    /// Whether the peer's certificate has expired by `now` (a plain link has none).
    #[must_use]
    pub fn peer_expired(&self, now: std::time::SystemTime) -> bool {
        self.peer().is_some_and(|p| p.expired(now))
    }

    /// The end of the peer's certificate, over TLS.
    #[must_use]
    pub fn peer_not_after(&self) -> Option<std::time::SystemTime> {
        self.peer().and_then(|p| p.not_after)
    }

    /// Whether its streams end by count ([`counted`]): over TLS, where records carry the bytes
    /// unframed; never on a plain link.
    #[must_use]
    pub fn ends_by_count(&self) -> bool {
        matches!(self, Self::Tls(_))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Link<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tls(t) => Pin::new(t).poll_read(cx, buf),
            Self::Plain(t) => Pin::new(t).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Link<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tls(t) => Pin::new(t).poll_write(cx, buf),
            Self::Plain(t) => Pin::new(t).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tls(t) => Pin::new(t).poll_flush(cx),
            Self::Plain(t) => Pin::new(t).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tls(t) => Pin::new(t).poll_shutdown(cx),
            Self::Plain(t) => Pin::new(t).poll_shutdown(cx),
        }
    }
}

impl<T: Stream> Stream for Link<T> {
    fn reset_on_close(&self, reset: bool) {
        match self {
            Self::Tls(t) => t.reset_on_close(reset),
            Self::Plain(t) => t.reset_on_close(reset),
        }
    }

    fn plain(&self) -> Result<Plain<'_>, &'static str> {
        match self {
            Self::Tls(t) => t.plain().map_err(|_| "tls_tunnel"),
            Self::Plain(t) => Ok(Plain::Tcp(t)),
        }
    }
}

/// A connected pair of TCP sockets on 127.0.0.1, for unit tests.
#[cfg(test)]
pub(crate) async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (client.expect("connect"), accepted.expect("accept").0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every stream holds a link for its life; a plain one must not carry room for a TLS session. A
    /// structural guard; memory itself is measured by the benchmark.
    #[test]
    fn a_link_is_small_whatever_it_carries() {
        assert!(size_of::<AcceptedLink>() <= 64, "{} bytes", size_of::<AcceptedLink>());
        assert!(size_of::<DialedLink>() <= 64, "{} bytes", size_of::<DialedLink>());
    }
}
