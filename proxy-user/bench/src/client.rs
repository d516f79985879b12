//! Opening tunnels the way kube-apiserver does, over a Unix socket or TCP (with an optional TLS client
//! certificate): the exact CONNECT (`proxyProtocol: HTTPConnect`), or Konnectivity's gRPC tunnel with
//! one connection and call per tunnel (`proxyProtocol: GRPC`); or, for port forwarders, a plain
//! connection to the forward port.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;

use spoke::frontend::{ESTABLISHED, grpc_client};

/// How long a gRPC dial may wait for its `DIAL_RSP`: kube-apiserver's own limit.
const GRPC_DIAL_TIMEOUT: Duration = Duration::from_secs(30);

/// A bidirectional byte stream.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One stream opened through the proxy under test (or straight to the backend, for direct TCP).
pub type ProxiedStream = Box<dyn Io>;

/// Where tunnels are opened.
#[derive(Clone)]
pub enum Via {
    /// Connect straight to this address (direct TCP, or a port forwarder leading to the backend).
    Forward(SocketAddr),
    /// A tunnel protocol over this Unix socket.
    Uds(PathBuf),
    /// A tunnel protocol over TCP, optionally with TLS.
    Tcp {
        /// Proxy address.
        addr: SocketAddr,
        /// TLS connector and server name, or plain TCP.
        tls: Option<(TlsConnector, ServerName<'static>)>,
    },
}

/// The tunnel protocol spoken to the proxy (unused for [`Via::Forward`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tunnel {
    /// HTTP CONNECT.
    Connect,
    /// Konnectivity's gRPC tunnel, as kube-apiserver's single-use tunnel.
    Grpc,
}

/// Opens tunnels to one destination.
#[derive(Clone)]
pub struct Opener {
    /// How.
    pub via: Via,
    /// Which protocol.
    pub tunnel: Tunnel,
    /// `host:port` requested.
    pub target: String,
}

/// Sends the apiserver's exact CONNECT and checks the exact reply, reading nothing past it.
async fn connect_handshake<S: Io>(mut s: S, target: &str) -> anyhow::Result<S> {
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).await?;
    let mut head = [0u8; ESTABLISHED.len()];
    s.read_exact(&mut head).await.context("read CONNECT reply")?;
    if head != ESTABLISHED {
        let mut rest = vec![0u8; 256];
        let n = s.read(&mut rest).await.unwrap_or(0);
        bail!(
            "CONNECT {target} refused: {}{}",
            String::from_utf8_lossy(&head),
            String::from_utf8_lossy(&rest[..n])
        );
    }
    Ok(s)
}

impl Opener {
    /// Opens one tunnel.
    pub async fn open(&self) -> anyhow::Result<ProxiedStream> {
        Ok(match &self.via {
            Via::Forward(addr) => {
                let s = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Via::Uds(path) => {
                let s =
                    UnixStream::connect(path).await.with_context(|| format!("connect {}", path.display()))?;
                self.handshake(s).await?
            }
            Via::Tcp { addr, tls } => {
                let s = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
                s.set_nodelay(true)?;
                match tls {
                    None => self.handshake(s).await?,
                    Some((connector, name)) => {
                        let s = connector
                            .connect(name.clone(), s)
                            .await
                            .context("TLS handshake with the proxy")?;
                        self.handshake(s).await?
                    }
                }
            }
        })
    }

    /// Asks the proxy on `s` for the tunnel.
    async fn handshake<S: Io + 'static>(&self, s: S) -> anyhow::Result<ProxiedStream> {
        Ok(match self.tunnel {
            Tunnel::Connect => Box::new(connect_handshake(s, &self.target).await?),
            Tunnel::Grpc => Box::new(
                Box::pin(grpc_client::dial(s, &self.target, GRPC_DIAL_TIMEOUT))
                    .await
                    .with_context(|| format!("gRPC dial {}", self.target))?,
            ),
        })
    }

    /// The same opener for another destination (scale scenario).
    #[must_use]
    pub fn to(&self, target: String) -> Self {
        Self { via: self.via.clone(), tunnel: self.tunnel, target }
    }
}
