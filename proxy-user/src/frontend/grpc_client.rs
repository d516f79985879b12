//! A client of Konnectivity's gRPC tunnel that behaves as kube-apiserver's (konnectivity-client's
//! single-use tunnel): one HTTP/2 connection and one `Proxy` call per dial, `DIAL_REQ` then a wait for
//! the `DIAL_RSP` with its `random`, `DATA` both ways, `CLOSE_REQ` at the end, never a half-close of
//! the call. For the load generator and the tests; the server never dials out this way.
//!
//! One difference: the apiserver puts the socket path in `:authority`, which an HTTP URI cannot carry;
//! this client sends `localhost`, which is what the server reads a path as (`authority`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream as _;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::PollSender;
use tonic::Streaming;
use tonic::codegen::http;

use super::konnectivity::{self, Packet, Payload, ProxyServiceClient};

/// Packets a client queues ahead of its connection.
const QUEUE: usize = 4;
/// How long a dropped tunnel waits for the server's `CLOSE_RSP` before it closes its connection
/// (konnectivity-client's `CloseTimeout`).
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The HTTP/2 connection failed.
    #[error("HTTP/2: {0}")]
    Http(#[from] hyper::Error),
    /// The call failed.
    #[error("gRPC: {0}")]
    Grpc(#[from] tonic::Status),
    /// The server answered `DIAL_RSP` with this error.
    #[error("dial failed: {0}")]
    Refused(String),
    /// The server closed the pending dial (`DIAL_CLS`).
    #[error("the server closed the dial")]
    DialClosed,
    /// No `DIAL_RSP` within the dial timeout (the client then sends `DIAL_CLS`, as newer clients do).
    #[error("no DIAL_RSP within {0:?}")]
    Timeout(Duration),
    /// The call ended before a `DIAL_RSP`.
    #[error("the call ended before DIAL_RSP")]
    Ended,
}

/// One `Proxy` call on a connection of its own: packets out, packets in.
pub struct Call {
    /// Packets to send.
    pub send: mpsc::Sender<Packet>,
    /// Packets received.
    pub recv: Streaming<Packet>,
    /// Drives the HTTP/2 connection; aborted (the socket closes) when the call is dropped.
    conn: AbortOnDrop,
}

impl Call {
    /// Opens an HTTP/2 connection over `io` and calls `Proxy` on it.
    pub async fn open<S>(io: S) -> Result<Self, TunnelError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut http = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        http.timer(TokioTimer::new());
        let (sender, conn) = http.handshake(TokioIo::new(io)).await?;
        let conn = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let origin = http::Uri::from_static("http://localhost");
        let mut client = ProxyServiceClient::with_origin(H2(sender), origin)
            .max_decoding_message_size(konnectivity::MAX_MESSAGE_BYTES + 64);
        let (send, outgoing) = mpsc::channel(QUEUE);
        let recv = client.proxy(Outgoing(outgoing)).await?.into_inner();
        Ok(Self { send, recv, conn })
    }

    /// Sends one packet.
    pub async fn send(&self, packet: Packet) -> Result<(), TunnelError> {
        self.send.send(packet).await.map_err(|_| TunnelError::Ended)
    }

    /// The next packet; `Ok(None)` when the server ended the call in order.
    pub async fn recv(&mut self) -> Result<Option<Packet>, TunnelError> {
        Ok(self.recv.message().await?)
    }

    /// Dials `address` on this call (`random` tells the reply apart) and waits up to `timeout` for the
    /// `DIAL_RSP`; on timeout, sends `DIAL_CLS`. The connect id on success.
    pub async fn dial(&mut self, random: i64, address: &str, timeout: Duration) -> Result<i64, TunnelError> {
        self.send(konnectivity::dial_request(random, address.to_owned())).await?;
        let reply = async {
            loop {
                match self.recv().await?.and_then(|p| p.payload) {
                    Some(Payload::DialResponse(r)) if r.random == random => {
                        return if r.error.is_empty() {
                            Ok(r.connect_id)
                        } else {
                            Err(TunnelError::Refused(r.error))
                        };
                    }
                    Some(Payload::CloseDial(c)) if c.random == random => return Err(TunnelError::DialClosed),
                    Some(_) => {}
                    None => return Err(TunnelError::Ended),
                }
            }
        };
        if let Ok(result) = tokio::time::timeout(timeout, reply).await {
            result
        } else {
            let _ = self.send(konnectivity::close_dial(random)).await;
            Err(TunnelError::Timeout(timeout))
        }
    }
}

/// Opens one tunnel to `address` over `io`, as kube-apiserver does.
pub async fn dial<S>(io: S, address: &str, timeout: Duration) -> Result<ClientTunnel, TunnelError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut call = Call::open(io).await?;
    let random = fastrand::i64(1..);
    let connect_id = call.dial(random, address, timeout).await?;
    Ok(ClientTunnel::new(call, connect_id))
}

/// An open tunnel as a byte stream: reads end at `CLOSE_RSP`; shutdown sends `CLOSE_REQ`. Dropping it
/// closes it as kube-apiserver closes a tunnel: `CLOSE_REQ` (unless sent already), then, in the
/// background, a wait of up to [`CLOSE_TIMEOUT`] for the `CLOSE_RSP` before the connection closes.
pub struct ClientTunnel {
    connect_id: i64,
    send: PollSender<Packet>,
    /// `None` once dropped.
    recv: Option<Streaming<Packet>>,
    partial: Bytes,
    close_sent: bool,
    /// The server answered `CLOSE_RSP` or ended the call.
    ended: bool,
    conn: Option<AbortOnDrop>,
}

impl ClientTunnel {
    /// The open tunnel `connect_id` of `call`.
    #[must_use]
    pub fn new(call: Call, connect_id: i64) -> Self {
        let Call { send, recv, conn } = call;
        Self {
            connect_id,
            send: PollSender::new(send),
            recv: Some(recv),
            partial: Bytes::new(),
            close_sent: false,
            ended: false,
            conn: Some(conn),
        }
    }

    /// The tunnel's connect id.
    #[must_use]
    pub fn connect_id(&self) -> i64 {
        self.connect_id
    }

    /// Closes the connection at once, without `CLOSE_REQ`: a client that vanished.
    pub fn abandon(mut self) {
        self.ended = true;
    }
}

impl AsyncRead for ClientTunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.partial.is_empty() {
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            let id = self.connect_id;
            let recv = self.recv.as_mut().expect("only a dropped tunnel has no receiver");
            match ready!(Pin::new(recv).poll_next(cx)) {
                Some(Ok(Packet { payload: Some(Payload::Data(d)), .. })) if d.connect_id == id => {
                    self.partial = d.data;
                }
                Some(Ok(Packet { payload: Some(Payload::CloseResponse(c)), .. })) if c.connect_id == id => {
                    self.ended = true;
                    if c.error.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Ready(Err(io::Error::other(format!("tunnel closed: {}", c.error))));
                }
                Some(Ok(_)) => {}
                Some(Err(status)) => {
                    self.ended = true;
                    return Poll::Ready(Err(io::Error::other(status)));
                }
                None => {
                    self.ended = true;
                    return Poll::Ready(Ok(()));
                }
            }
        }
        konnectivity::read_partial(&mut self.partial, buf);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ClientTunnel {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.close_sent {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "CLOSE_REQ sent")));
        }
        let id = self.connect_id;
        konnectivity::poll_queue_data(&mut self.send, cx, id, buf, std::convert::identity)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.close_sent {
            let id = self.connect_id;
            ready!(konnectivity::poll_queue(
                &mut self.send,
                cx,
                || konnectivity::close_request(id),
                std::convert::identity
            ))?;
            self.close_sent = true;
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for ClientTunnel {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let (Some(mut recv), Some(conn)) = (self.recv.take(), self.conn.take()) else { return };
        let Some(send) = self.send.get_ref().cloned() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (id, close_sent) = (self.connect_id, self.close_sent);
        runtime.spawn(async move {
            let _conn = conn;
            let closed = async {
                if !close_sent && send.send(konnectivity::close_request(id)).await.is_err() {
                    return;
                }
                while let Ok(Some(packet)) = recv.message().await {
                    if matches!(packet.payload, Some(Payload::CloseResponse(c)) if c.connect_id == id) {
                        return;
                    }
                }
            };
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, closed).await;
        });
    }
}

/// The packets a client sends, as tonic streams them; the call is never half-closed while the sender
/// lives.
struct Outgoing(mpsc::Receiver<Packet>);

impl futures_util::Stream for Outgoing {
    type Item = Packet;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Packet>> {
        self.0.poll_recv(cx)
    }
}

/// hyper's HTTP/2 client connection as the service tonic's client calls.
#[derive(Clone)]
struct H2(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for H2 {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, hyper::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(request))
    }
}

/// A task aborted when this is dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
