//! A TLS link after its handshake: records sealed in user space by rustls ([`UserTls`]) or by the
//! kernel ([`Ktls`]), one type for the code that carries streams.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::ktls::Ktls;
use super::role::Role;
use super::user_tls::UserTls;
use super::{Plain, Stream};

/// A TLS connection, its records in user space or in the kernel.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "links hold it boxed (`Link::Tls`): one allocation whichever variant, none saved by boxing rustls's state again"
)]
pub enum Secured<D: Role> {
    /// rustls's records in user space.
    User(UserTls<D>),
    /// Kernel TLS: the connection's plaintext crosses the socket, so the kernel tiers can carry it.
    Kernel(Ktls<D>),
}

impl<D: Role> Secured<D> {
    /// The TCP connection underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Self::User(r) => r.tcp(),
            Self::Kernel(k) => k.tcp(),
        }
    }

    /// The node the peer's certificate names (`CN=system:node:<name>, O=system:nodes`), if it does.
    pub fn peer_node(&self) -> Option<&str> {
        self.peer().node.as_deref()
    }

    /// The connection waits unread for a while: user-space buffers are let go (see [`UserTls::park`]).
    pub fn park(&mut self) {
        if let Self::User(r) = self {
            r.park();
        }
    }

    /// The connection carries frames, not streams (see [`UserTls::small_reads`]).
    pub fn small_reads(&mut self) {
        if let Self::User(r) = self {
            r.small_reads();
        }
    }

    /// What the peer's certificate says.
    pub fn peer(&self) -> &super::tls::Peer {
        match self {
            Self::User(r) => r.peer(),
            Self::Kernel(k) => k.peer(),
        }
    }
}

impl<D: Role> AsyncRead for Secured<D> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::User(r) => Pin::new(r).poll_read(cx, buf),
            Self::Kernel(k) => Pin::new(k).poll_read(cx, buf),
        }
    }
}

impl<D: Role> AsyncWrite for Secured<D> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::User(r) => Pin::new(r).poll_write(cx, buf),
            Self::Kernel(k) => Pin::new(k).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::User(r) => Pin::new(r).poll_flush(cx),
            Self::Kernel(k) => Pin::new(k).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::User(r) => Pin::new(r).poll_shutdown(cx),
            Self::Kernel(k) => Pin::new(k).poll_shutdown(cx),
        }
    }
}

impl<D: Role> Stream for Secured<D> {
    fn reset_on_close(&self, reset: bool) {
        self.tcp().reset_on_close(reset);
    }

    fn plain(&self) -> Result<Plain<'_>, &'static str> {
        match self {
            Self::User(_) => Err("tls"),
            Self::Kernel(k) => Ok(Plain::Ktls(k.tcp())),
        }
    }
}
