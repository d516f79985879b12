//! The userspace tier: a bidirectional copy in one task, with half-close and abort carried through.
//!
//! Each direction holds a buffer only while bytes are in flight: when its reader has nothing more, the
//! buffer goes back to a small per-thread pool, so an idle stream holds none. The size a direction asks
//! for starts at [`INITIAL_BUF`] and doubles up to [`MAX_BUF`] while reads keep filling it (bulk
//! streams move large chunks per syscall). End of stream
//! on one side becomes a shutdown of the other side's write half, after every byte read before it was
//! written and flushed; the other direction goes on. An error on either side aborts both, so a peer
//! never mistakes a truncated stream for a complete one.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{Activity, End, Moved, RelayError, buffer};
use crate::transport::Stream;

/// First buffer size of each direction.
pub const INITIAL_BUF: usize = 16 * 1024;
/// Largest buffer of each direction.
pub const MAX_BUF: usize = 256 * 1024;

/// One direction's state.
struct Pump {
    /// Empty while the direction is idle (no buffer held).
    buf: Vec<u8>,
    /// Buffer size this direction asks for.
    want: usize,
    /// Bytes of `buf[..filled]` not yet written are `buf[written..filled]`.
    written: usize,
    filled: usize,
    read_done: bool,
    needs_flush: bool,
    done: bool,
    total: u64,
}

impl Pump {
    fn new(initial: &[u8], activity: &Activity) -> Self {
        activity.read(initial.len());
        let buf = if initial.is_empty() {
            Vec::new()
        } else {
            let mut buf = buffer::take(INITIAL_BUF.max(initial.len()));
            buf[..initial.len()].copy_from_slice(initial);
            buf
        };
        Self {
            buf,
            want: INITIAL_BUF,
            written: 0,
            filled: initial.len(),
            read_done: false,
            needs_flush: false,
            done: false,
            total: 0,
        }
    }

    /// Moves bytes from `r` to `w` until `r` ends (then shuts `w` down) or nothing can progress.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
        activity: &Activity,
    ) -> Poll<Result<(), (End, io::Error)>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        // `End::A` here means "the reader", `End::B` "the writer"; the caller maps them to streams.
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.written == self.filled && !self.read_done {
                // Grow when the last read filled the whole buffer: the stream is moving in bulk.
                if self.filled > 0 && self.filled == self.buf.len() && self.want < MAX_BUF {
                    self.want = (self.want * 2).min(MAX_BUF);
                }
                if self.buf.len() < self.want {
                    let held = std::mem::take(&mut self.buf);
                    self.buf = if held.is_empty() { buffer::take(self.want) } else { grow(held, self.want) };
                }
                self.written = 0;
                self.filled = 0;
                let mut rb = ReadBuf::new(&mut self.buf);
                match r.as_mut().poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        self.filled = rb.filled().len();
                        activity.read(self.filled);
                        if self.filled == 0 {
                            self.read_done = true;
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err((End::A, e))),
                    Poll::Pending => {
                        // Idle: hand the (empty) buffer back until bytes arrive again.
                        buffer::give(std::mem::take(&mut self.buf));
                        // Nothing more to read now: push out what the writer buffered (TLS records).
                        if self.needs_flush {
                            ready!(w.as_mut().poll_flush(cx)).map_err(|e| (End::B, e))?;
                            self.needs_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.written < self.filled {
                let n = ready!(w.as_mut().poll_write(cx, &self.buf[self.written..self.filled]))
                    .map_err(|e| (End::B, e))?;
                if n == 0 {
                    return Poll::Ready(Err((End::B, io::ErrorKind::WriteZero.into())));
                }
                self.written += n;
                self.total += n as u64;
                activity.wrote(n);
                self.needs_flush = true;
            }
            if self.read_done {
                buffer::give(std::mem::take(&mut self.buf));
                ready!(w.as_mut().poll_flush(cx)).map_err(|e| (End::B, e))?;
                ready!(w.as_mut().poll_shutdown(cx)).map_err(|e| (End::B, e))?;
                self.done = true;
            }
        }
    }
}

fn grow(mut buf: Vec<u8>, len: usize) -> Vec<u8> {
    buf.resize(len, 0);
    buf
}

/// Copies between `a` and `b` in both directions until both have ended. `a_early` holds bytes already
/// read from `a` (e.g. past a request header) that go to `b` first. On an error both streams are aborted.
/// Progress is reported to `activity`.
pub async fn relay<A: Stream, B: Stream>(
    a: &mut A,
    b: &mut B,
    a_early: &[u8],
    activity: &Activity,
) -> Result<Moved, RelayError> {
    let mut up = Pump::new(a_early, activity);
    let mut down = Pump::new(&[], activity);
    let flip = |(end, e): (End, io::Error)| (if end == End::A { End::B } else { End::A }, e);
    let result = poll_fn(|cx| {
        let up_state = up.poll(cx, Pin::new(&mut *a), Pin::new(&mut *b), activity);
        if let Poll::Ready(Err(e)) = up_state {
            return Poll::Ready(Err(e));
        }
        let down_state = down.poll(cx, Pin::new(&mut *b), Pin::new(&mut *a), activity).map_err(flip);
        if let Poll::Ready(Err(e)) = down_state {
            return Poll::Ready(Err(e));
        }
        if up_state.is_ready() && down_state.is_ready() { Poll::Ready(Ok(())) } else { Poll::Pending }
    })
    .await;
    let moved = Moved { a_to_b: up.total, b_to_a: down.total };
    match result {
        Ok(()) => Ok(moved),
        Err((end, source)) => {
            a.abort();
            b.abort();
            Err(RelayError { end, source, moved: (moved.a_to_b, moved.b_to_a) })
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn carries_bytes_and_half_close_both_ways() {
        // client <-> (a  relay  b) <-> server
        let (mut client, mut a) = crate::transport::tcp_pair().await;
        let (mut b, mut server) = crate::transport::tcp_pair().await;
        let relay = tokio::spawn(async move { relay(&mut a, &mut b, b"early ", &Activity::default()).await });

        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"early hello");
        // The other direction still flows after the client's FIN.
        let big = vec![7u8; 3 * MAX_BUF + 5];
        server.write_all(&big).await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, big);
        let moved = relay.await.unwrap().expect("clean end");
        assert_eq!(moved, Moved { a_to_b: 11, b_to_a: big.len() as u64 });
    }

    #[tokio::test]
    async fn reset_on_one_side_aborts_the_other() {
        let (client, mut a) = crate::transport::tcp_pair().await;
        let (mut b, mut server) = crate::transport::tcp_pair().await;
        let relay = tokio::spawn(async move { relay(&mut a, &mut b, &[], &Activity::default()).await });
        // Unread data at close makes the kernel send RST; set linger 0 to make it explicit.
        client.abort();
        drop(client);
        let err = relay.await.unwrap().expect_err("reset must surface");
        assert_eq!(err.end, End::A);
        let mut buf = [0u8; 16];
        let res = server.read(&mut buf).await;
        assert!(
            matches!(&res, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "server must see a reset, got {res:?}"
        );
    }
}
