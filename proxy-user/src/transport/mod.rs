//! Byte streams Spoke accepts and dials: TCP, Unix sockets, and TLS over TCP, behind [`Stream`].

pub mod buffer;
pub mod tls;

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

/// Idle time before TCP keepalive probes start on long-lived agent connections.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Interval between TCP keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered keepalive probes before the kernel drops the connection.
pub const KEEPALIVE_RETRIES: u32 = 3;

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
}

impl Stream for TcpStream {
    fn reset_on_close(&self, reset: bool) {
        // SO_LINGER 0: close() then sends RST and discards unsent data. Cannot block: the linger time is 0.
        let linger = reset.then_some(Duration::ZERO);
        if let Err(error) = socket2::SockRef::from(self).set_linger(linger) {
            tracing::debug!(%error, "set SO_LINGER");
        }
    }
}

impl Stream for UnixStream {
    fn reset_on_close(&self, _reset: bool) {}
}

impl<S: Stream> Stream for tokio_rustls::server::TlsStream<S> {
    fn reset_on_close(&self, reset: bool) {
        self.get_ref().0.reset_on_close(reset);
    }
}

impl<S: Stream> Stream for tokio_rustls::client::TlsStream<S> {
    fn reset_on_close(&self, reset: bool) {
        self.get_ref().0.reset_on_close(reset);
    }
}

/// Settings for long-lived TCP connections between agent and server: no Nagle delay (frames are small
/// and latency-sensitive) and keepalive so a vanished peer is noticed.
pub fn tune_tunnel_socket(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive)
}

/// An agent ↔ server connection: TLS, or plain TCP where the operator opted out of tunnel encryption
/// (an underlay that is already encrypted). Plain data connections let the kernel splice the stream.
#[derive(Debug)]
pub enum Tunnel<T> {
    /// TLS over TCP.
    Tls(T),
    /// Plain TCP.
    Plain(TcpStream),
}

impl<T: AsyncRead + Unpin> AsyncRead for Tunnel<T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tls(t) => std::pin::Pin::new(t).poll_read(cx, buf),
            Self::Plain(t) => std::pin::Pin::new(t).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tunnel<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tls(t) => std::pin::Pin::new(t).poll_write(cx, buf),
            Self::Plain(t) => std::pin::Pin::new(t).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tls(t) => std::pin::Pin::new(t).poll_flush(cx),
            Self::Plain(t) => std::pin::Pin::new(t).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tls(t) => std::pin::Pin::new(t).poll_shutdown(cx),
            Self::Plain(t) => std::pin::Pin::new(t).poll_shutdown(cx),
        }
    }
}

impl<T: Stream> Stream for Tunnel<T> {
    fn reset_on_close(&self, reset: bool) {
        match self {
            Self::Tls(t) => t.reset_on_close(reset),
            Self::Plain(t) => t.reset_on_close(reset),
        }
    }
}

/// Largest amount of application data rustls may hold unsent per connection (its default is 64 KiB):
/// bulk streams then write more records per system call.
pub const TLS_SEND_BUFFER: usize = 256 * 1024;

/// First byte of a TLS handshake record; Spoke frames start with a length whose first byte is 0.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// A connected pair of TCP sockets on 127.0.0.1, for unit tests.
#[cfg(test)]
pub(crate) async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (client.expect("connect"), accepted.expect("accept").0)
}
