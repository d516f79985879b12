//! Byte buffers held only while bytes are in flight, from a small per-thread pool; and a read buffer
//! under TLS, because rustls reads its socket at most 4 KiB at a time.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Stream;

/// Idle buffers kept per thread for reuse (at most 4 MiB with 256 KiB buffers).
pub const POOLED_BUFFERS: usize = 16;
/// Bytes read from the socket at once under a TLS connection.
pub const TLS_READ_BUF: usize = 256 * 1024;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of at least `len` bytes, from the pool when one is there.
pub(crate) fn take(len: usize) -> Vec<u8> {
    let mut buf = POOL.with_borrow_mut(Vec::pop).unwrap_or_default();
    if buf.len() < len {
        buf.resize(len, 0);
    }
    buf
}

/// Returns a buffer to the pool, or frees it when the pool is full.
pub(crate) fn give(buf: Vec<u8>) {
    if buf.is_empty() {
        return;
    }
    POOL.with_borrow_mut(|pool| {
        if pool.len() < POOLED_BUFFERS {
            pool.push(buf);
        }
    });
}

/// Reads the inner stream [`TLS_READ_BUF`] bytes at a time and serves smaller reads from that buffer;
/// writes pass straight through. The buffer is held only while it has unread bytes. Put under a TLS
/// stream, it turns rustls's 4 KiB reads into one system call per socket's worth of records.
#[derive(Debug)]
pub struct ReadBuffered<S> {
    inner: S,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
}

impl<S> ReadBuffered<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner, buf: Vec::new(), pos: 0, len: 0 }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadBuffered<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos == this.len {
            // A read at least as large as ours gains nothing from the copy: pass it through.
            if out.remaining() >= TLS_READ_BUF {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            if this.buf.is_empty() {
                this.buf = take(TLS_READ_BUF);
            }
            let mut rb = ReadBuf::new(&mut this.buf);
            let polled = Pin::new(&mut this.inner).poll_read(cx, &mut rb);
            let filled = rb.filled().len();
            if !matches!(polled, Poll::Ready(Ok(()))) {
                give(std::mem::take(&mut this.buf));
            }
            ready!(polled)?;
            this.len = filled;
            this.pos = 0;
            if this.len == 0 {
                give(std::mem::take(&mut this.buf));
                return Poll::Ready(Ok(()));
            }
        }
        let n = out.remaining().min(this.len - this.pos);
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        if this.pos == this.len {
            this.pos = 0;
            this.len = 0;
            give(std::mem::take(&mut this.buf));
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadBuffered<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: Stream> Stream for ReadBuffered<S> {
    fn abort(&self) {
        self.inner.abort();
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn small_reads_are_served_from_one_large_read() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let data: Vec<u8> = (0..300_000u32).map(|i| u8::try_from(i % 253).unwrap()).collect();
        a.write_all(&data).await.unwrap();
        drop(a);
        let mut r = ReadBuffered::new(b);
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = r.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        assert!(got == data);
        assert!(r.buf.is_empty(), "no buffer held once drained");
    }
}
