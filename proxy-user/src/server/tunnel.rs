//! One gRPC tunnel's client end as a byte stream, so the relay carries it as it carries a CONNECT
//! client: bytes the client sends in `DATA` packets are read from it; bytes written to it go out as
//! `DATA` packets, and its shutdown sends `CLOSE_RSP`.
//!
//! Memory is bounded on both sides: the call hands in at most [`TUNNEL_QUEUE`] packets ahead of the
//! relay (behind them HTTP/2 flow control holds the client back), and writes wait for room in the
//! call's outbound queue (behind it, the client's HTTP/2 window).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, PollSender};
use tonic::Status;

use crate::frontend::konnectivity::{self, Packet};
use crate::transport::{Plain, Stream};

/// Client `DATA` packets queued for one tunnel ahead of its relay.
pub const TUNNEL_QUEUE: usize = 4;

/// What a `Proxy` call sends its client.
pub type Outbound = mpsc::Sender<Result<Packet, Status>>;

/// The client end of one tunnel.
pub struct Tunnel {
    connect_id: i64,
    /// `DATA` payloads from the client; closed at `CLOSE_REQ` or when the call ends.
    inbound: mpsc::Receiver<Bytes>,
    /// The rest of a payload the relay has not read yet.
    partial: Bytes,
    out: PollSender<Result<Packet, Status>>,
    /// Cancelled when the client is gone: an end of input is then a failure, not a close.
    gone: CancellationToken,
    /// Cancelled when the client sent `CLOSE_REQ`.
    close_requested: CancellationToken,
    /// Whether `CLOSE_RSP` went out.
    closed: bool,
    /// Whether it went out after `CLOSE_REQ`, so answering it.
    answered: bool,
}

impl Tunnel {
    /// Tunnel `connect_id`, fed by `inbound`, answering through `out`; `gone` and `close_requested` are
    /// cancelled by its call.
    pub fn new(
        connect_id: i64,
        inbound: mpsc::Receiver<Bytes>,
        out: Outbound,
        gone: CancellationToken,
        close_requested: CancellationToken,
    ) -> Self {
        Self {
            connect_id,
            inbound,
            partial: Bytes::new(),
            out: PollSender::new(out),
            gone,
            close_requested,
            closed: false,
            answered: false,
        }
    }

    /// At the tunnel's end: sends `CLOSE_RSP`, with `error` (empty for a clean end), unless one went out
    /// already, and again if the client's `CLOSE_REQ` came after it (the client waits for an answer).
    pub async fn close(&mut self, error: String) {
        let unanswered = self.close_requested.is_cancelled() && !self.answered;
        if self.closed && !unanswered {
            return;
        }
        self.closed = true;
        self.answered = self.close_requested.is_cancelled();
        if let Some(out) = self.out.get_ref() {
            let _ = out.send(Ok(konnectivity::close_response(self.connect_id, error))).await;
        }
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.partial.is_empty() {
            match ready!(self.inbound.poll_recv(cx)) {
                Some(data) => self.partial = data,
                // The client asked to close (CLOSE_REQ), or is gone: after our own close that is the
                // end the client saw too; before it, a stream cut short.
                None if self.gone.is_cancelled() && !self.closed => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the gRPC client went away with the tunnel open",
                    )));
                }
                None => return Poll::Ready(Ok(())),
            }
        }
        konnectivity::read_partial(&mut self.partial, buf);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.closed {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "tunnel closed")));
        }
        let id = self.connect_id;
        konnectivity::poll_queue_data(&mut self.out, cx, id, buf, Ok)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// The node side ended: `CLOSE_RSP` (the protocol has no half-close; the client ends the tunnel).
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.closed {
            let id = self.connect_id;
            ready!(konnectivity::poll_queue(
                &mut self.out,
                cx,
                || konnectivity::close_response(id, String::new()),
                Ok
            ))?;
            self.closed = true;
            self.answered = self.close_requested.is_cancelled();
        }
        Poll::Ready(Ok(()))
    }
}

impl Stream for Tunnel {
    fn reset_on_close(&self, _reset: bool) {}

    fn plain(&self) -> Result<Plain<'_>, &'static str> {
        Err("grpc")
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::frontend::konnectivity::{MAX_DATA_BYTES, Payload};

    #[tokio::test]
    async fn bytes_cross_as_data_packets_and_shutdown_closes() {
        let (to_tunnel, inbound) = mpsc::channel(TUNNEL_QUEUE);
        let (out, mut sent) = mpsc::channel(8);
        let gone = CancellationToken::new();
        let mut tunnel = Tunnel::new(7, inbound, out, gone.clone(), CancellationToken::new());
        to_tunnel.send(Bytes::from_static(b"hello ")).await.unwrap();
        to_tunnel.send(Bytes::from_static(b"world")).await.unwrap();
        drop(to_tunnel);
        let mut read = String::new();
        tunnel.read_to_string(&mut read).await.unwrap();
        assert_eq!(read, "hello world");

        let big = vec![9u8; MAX_DATA_BYTES + 10];
        tunnel.write_all(&big).await.unwrap();
        tunnel.shutdown().await.unwrap();
        let mut sizes = Vec::new();
        while let Ok(Ok(packet)) = sent.try_recv() {
            match packet.payload {
                Some(Payload::Data(d)) if d.connect_id == 7 => sizes.push(d.data.len()),
                Some(Payload::CloseResponse(c)) if c.connect_id == 7 && c.error.is_empty() => sizes.push(0),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(sizes, [MAX_DATA_BYTES, 10, 0]);
        assert!(tunnel.write_all(b"late").await.is_err(), "no DATA after CLOSE_RSP");
    }

    #[tokio::test]
    async fn a_client_gone_mid_stream_is_a_failure_and_writes_fail() {
        let (to_tunnel, inbound) = mpsc::channel(TUNNEL_QUEUE);
        let (out, sent) = mpsc::channel(8);
        let gone = CancellationToken::new();
        let mut tunnel = Tunnel::new(1, inbound, out, gone.clone(), CancellationToken::new());
        gone.cancel();
        drop(to_tunnel);
        let err = tunnel.read(&mut [0; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        drop(sent);
        assert_eq!(tunnel.write(b"x").await.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }
}
