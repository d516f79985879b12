//! Stream ends told by byte count over the control channel, so that a TLS data connection outlives its
//! stream and carries the next one without a new handshake (docs/protocol.md, "Reusing a data
//! connection").
//!
//! A side whose source of a direction ends does not close the data connection: it flushes what it
//! wrote, then tells the peer over the control channel how many bytes that was (`StreamEnd`). The
//! peer's reader stops at exactly that count and takes it as the end of the direction; the bytes
//! themselves stay unframed. When both directions ended this way, no stream byte is in flight on the
//! connection and it can be parked again: the agent waits until the server has read all it wrote
//! (`StreamEndRead`), then sends `DataHello` on it, and the server parks it as a new one.
//!
//! Anything else ends the stream as before and the connection is not reused: a session whose control
//! channel is gone (or whose queue is full) gets a real end (TLS `close_notify` and FIN), also late, for
//! an end that was announced but may not have arrived; a connection that ends before the announced
//! count, or carries bytes past it, fails the stream (the relay aborts both sides).

use std::collections::HashMap;
use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker, ready};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::debug;

use super::{Plain, Stream};
use crate::protocol::Message;

/// Control frames of counted ends queued for one session's control channel. When it is full, a stream
/// ends with a real close instead (and its connection is not reused).
pub const ENDS_QUEUE: usize = 1024;

/// Time either side waits, after a stream ended by count, for the other to make the connection ready
/// for the next stream (the agent for `StreamEndRead`, the server for the agent's `DataHello`); then
/// the connection is closed.
pub const REUSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Which side of the tunnel a counted connection is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The server: it tells the agent when it has read everything the agent announced.
    Server,
    /// The agent: it writes on the connection again only after the server said so.
    Agent,
}

/// What a registered stream has heard from the peer.
#[derive(Debug, Default)]
struct Heard {
    /// The peer's announced count, once told.
    count: Option<u64>,
    /// The server read all the agent announced (agent side).
    read: bool,
    /// The stream's task, woken when either arrives.
    waker: Option<Waker>,
}

impl Heard {
    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    fn wait(&mut self, cx: &Context<'_>) {
        match &mut self.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
    }
}

/// One control session's counted ends: the frames its streams send to the peer, and what the peer
/// told each of them. The session loop writes what [`Ends::new`]'s receiver yields and hands every
/// `StreamEnd` and `StreamEndRead` it reads to [`Ends::told_end`] and [`Ends::told_read`]; when the
/// session ends it calls [`Ends::close`]. A registered stream costs one small map entry, no channel.
#[derive(Debug)]
pub struct Ends {
    /// Boxed: a channel allocates its slots in blocks of 32, and a session idles with one.
    tx: mpsc::Sender<Box<Message>>,
    streams: Mutex<HashMap<u64, Heard>>,
    gone: CancellationToken,
}

impl Ends {
    /// Ends for a new session, and the frames to write on its control channel.
    #[must_use]
    pub fn new() -> (Arc<Self>, mpsc::Receiver<Box<Message>>) {
        let (tx, rx) = mpsc::channel(ENDS_QUEUE);
        let ends = Self { tx, streams: Mutex::default(), gone: CancellationToken::new() };
        (Arc::new(ends), rx)
    }

    fn streams(&self) -> MutexGuard<'_, HashMap<u64, Heard>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers stream `stream_id`, before anything on its data connection could make the peer announce
    /// its end. `None` once the session is over.
    #[must_use]
    pub fn register(self: &Arc<Self>, stream_id: u64, side: Side) -> Option<Registration> {
        if self.gone.is_cancelled() {
            return None;
        }
        self.streams().insert(stream_id, Heard::default());
        Some(Registration { ends: self.clone(), stream_id, side })
    }

    /// The peer announced the end of its direction of `stream_id` after `bytes`. A stream that is gone
    /// (it failed, or ended the old way) is not waiting for it any more; a second count is ignored.
    pub fn told_end(&self, stream_id: u64, bytes: u64) {
        match self.streams().get_mut(&stream_id) {
            Some(heard) if heard.count.is_none() => {
                heard.count = Some(bytes);
                heard.wake();
            }
            _ => debug!(stream_id, "end of a stream that is not waiting for one"),
        }
    }

    /// The server read all the agent announced of `stream_id`.
    pub fn told_read(&self, stream_id: u64) {
        if let Some(heard) = self.streams().get_mut(&stream_id) {
            heard.read = true;
            heard.wake();
        }
    }

    /// The session is over: no count will arrive any more, and none can be sent.
    pub fn close(&self) {
        self.gone.cancel();
        for (_, mut heard) in self.streams().drain() {
            heard.wake();
        }
    }

    /// Streams registered now (for tests).
    #[must_use]
    pub fn registered(&self) -> usize {
        self.streams().len()
    }

    /// The peer's count for `stream_id`: `Ready(None)` once none can come (the session is over).
    fn poll_count(&self, stream_id: u64, cx: &Context<'_>) -> Poll<Option<u64>> {
        match self.streams().get_mut(&stream_id) {
            None => Poll::Ready(None),
            Some(Heard { count: Some(n), .. }) => Poll::Ready(Some(*n)),
            Some(heard) => {
                heard.wait(cx);
                Poll::Pending
            }
        }
    }

    /// Whether the server said it read everything: `Ready(false)` once it cannot (the session is over).
    fn poll_read(&self, stream_id: u64, cx: &Context<'_>) -> Poll<bool> {
        match self.streams().get_mut(&stream_id) {
            None => Poll::Ready(false),
            Some(Heard { read: true, .. }) => Poll::Ready(true),
            Some(heard) => {
                heard.wait(cx);
                Poll::Pending
            }
        }
    }
}

/// A stream's place in its session's [`Ends`]; removed when dropped.
#[derive(Debug)]
pub struct Registration {
    ends: Arc<Ends>,
    stream_id: u64,
    side: Side,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.ends.streams().remove(&self.stream_id);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriteEnd {
    /// Bytes may still be written.
    Open,
    /// The end was told over the control channel.
    Announced,
    /// A real end (`close_notify` and FIN) is being sent.
    Closing,
    /// A real end was sent.
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadEnd {
    Open,
    /// Ended at the announced count.
    Counted,
    /// Ended by the connection's own end (the peer closed it the old way).
    Closed,
}

/// A data connection whose two directions end by count (see the module documentation).
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    reg: Registration,
    written: u64,
    read: u64,
    /// The peer's count, once told; `None` before, and for good once the session is gone.
    peer_count: Option<u64>,
    /// No count will come (the session is gone).
    count_lost: bool,
    write: WriteEnd,
    read_end: ReadEnd,
    /// Armed once the end was announced: a session lost before the stream finished gets a late real end,
    /// in case the announcement never arrived.
    session_gone: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// The server could not tell the agent it read everything (queue full, session gone).
    read_untold: bool,
    /// How the splice tier ended the directions, when it carried the stream (kernel TLS).
    spliced: SplicedEnds,
}

/// What the splice tier did with a counted connection's ends ([`CountedSocket`]): set through shared
/// references while both directions run.
#[derive(Debug, Default)]
struct SplicedEnds {
    announced: AtomicBool,
    read_counted: AtomicBool,
    read_untold: AtomicBool,
}

/// A counted connection whose plaintext crosses its socket (kernel TLS), as the splice tier takes it:
/// the socket, and how the stream's two ends are told by count (see the module documentation).
#[derive(Clone, Copy, Debug)]
pub struct CountedSocket<'a> {
    socket: &'a TcpStream,
    reg: &'a Registration,
    state: &'a SplicedEnds,
    /// Bytes read and written through the [`Counted`] before the splice took over (bytes that followed
    /// a request head, written first): the counts go on from there.
    before: (u64, u64),
}

impl<'a> CountedSocket<'a> {
    /// The socket underneath.
    #[must_use]
    pub fn socket(&self) -> &'a TcpStream {
        self.socket
    }

    /// Bytes the source may still give after `taken`: `None` until the peer's count is known (or for
    /// good once the session is gone), an error when the count is below what was read.
    pub fn limit(&self, taken: u64) -> io::Result<Option<u64>> {
        let taken = self.before.0 + taken;
        let count = self.reg.ends.streams().get(&self.reg.stream_id).and_then(|h| h.count);
        match count {
            Some(n) if n < taken => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the peer announced {n} bytes after sending {taken}"),
            )),
            Some(n) => Ok(Some(n - taken)),
            None => Ok(None),
        }
    }

    /// The source reached the announced count: its direction ended. The server tells the agent.
    pub fn counted_end(&self) {
        self.state.read_counted.store(true, Ordering::Release);
        if self.reg.side == Side::Server {
            let told =
                self.reg.ends.tx.try_send(Box::new(Message::StreamEndRead { stream_id: self.reg.stream_id }));
            self.state.read_untold.store(told.is_err(), Ordering::Release);
        }
    }

    /// Waits until the source has something after `taken` bytes: the socket is readable, the peer's
    /// count arrives, or it already arrived and `taken` reached it (the direction ended: the peer sends
    /// nothing more, so the socket may never be readable again).
    pub async fn source_ready(&self, taken: u64) -> io::Result<()> {
        let (ends, id) = (&self.reg.ends, self.reg.stream_id);
        let count = ends.streams().get(&id).and_then(|h| h.count);
        if let Some(n) = count {
            if n <= self.before.0 + taken {
                return Ok(());
            }
            return self.socket.ready(tokio::io::Interest::READABLE).await.map(drop);
        }
        let count = std::future::poll_fn(|cx| ends.poll_count(id, cx));
        tokio::select! {
            ready = self.socket.ready(tokio::io::Interest::READABLE) => ready.map(drop),
            Some(_) = count => Ok(()),
        }
    }

    /// The destination's source ended after `written` bytes: announced by count where the session
    /// takes it (`true`), otherwise the caller sends a real end.
    #[must_use]
    pub fn announce(&self, written: u64) -> bool {
        let ends = &self.reg.ends;
        let end = Message::StreamEnd { stream_id: self.reg.stream_id, bytes: self.before.1 + written };
        let announced = !ends.gone.is_cancelled() && ends.tx.try_send(Box::new(end)).is_ok();
        self.state.announced.store(announced, Ordering::Release);
        announced
    }
}

impl<S: Stream> Counted<S> {
    /// Wraps `inner`, the data connection of the stream `reg` registered.
    pub fn new(inner: S, reg: Registration) -> Self {
        Self {
            inner,
            reg,
            written: 0,
            read: 0,
            peer_count: None,
            count_lost: false,
            write: WriteEnd::Open,
            read_end: ReadEnd::Open,
            session_gone: None,
            read_untold: false,
            spliced: SplicedEnds::default(),
        }
    }

    /// The connection, for a real close outside the relay.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Whether both directions ended by count, with the session still there: no stream byte is in
    /// flight, and the connection can carry another stream once the agent has heard that the server read
    /// everything ([`Counted::read_acknowledged`]).
    #[must_use]
    pub fn reusable(&self) -> bool {
        let spliced = &self.spliced;
        (self.write == WriteEnd::Announced || spliced.announced.load(Ordering::Acquire))
            && (self.read_end == ReadEnd::Counted || spliced.read_counted.load(Ordering::Acquire))
            && !self.read_untold
            && !spliced.read_untold.load(Ordering::Acquire)
            && !self.reg.ends.gone.is_cancelled()
    }

    /// A stream the splice tier ended by count whose connection is not reused: sends the real end too
    /// (`close_notify` and FIN), in case the announcement never reached the peer (its session lost).
    pub async fn finish(&mut self) {
        if self.spliced.announced.load(Ordering::Acquire) {
            let _ = tokio::time::timeout(REUSE_TIMEOUT, self.inner.shutdown()).await;
        }
    }

    /// Agent side: waits until the server has read every byte the agent wrote, or the session ended.
    /// `true` when it did; then the agent may write on the connection again.
    pub async fn read_acknowledged(&mut self) -> bool {
        if self.reg.side == Side::Server {
            return true;
        }
        let (ends, id) = (&self.reg.ends, self.reg.stream_id);
        std::future::poll_fn(|cx| ends.poll_read(id, cx)).await
    }

    /// The connection, once the stream is over.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Learns the peer's count if it arrived (and registers for its arrival if not).
    fn poll_count(&mut self, cx: &Context<'_>) -> io::Result<()> {
        if self.peer_count.is_some() || self.count_lost {
            return Ok(());
        }
        match self.reg.ends.poll_count(self.reg.stream_id, cx) {
            Poll::Ready(Some(n)) if n < self.read => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the peer announced {n} bytes after sending {}", self.read),
                ));
            }
            Poll::Ready(Some(n)) => self.peer_count = Some(n),
            Poll::Ready(None) => self.count_lost = true,
            Poll::Pending => {}
        }
        Ok(())
    }

    /// An end announced, then the session lost: sends the real end too, so that the peer's reader ends
    /// even if the announcement never reached it.
    fn poll_late_end(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(gone) = self.session_gone.as_mut()
            && gone.as_mut().poll(cx).is_ready()
        {
            self.session_gone = None;
            self.write = WriteEnd::Closing;
        }
        if self.write == WriteEnd::Closing {
            ready!(Pin::new(&mut self.inner).poll_shutdown(cx))?;
            self.write = WriteEnd::Closed;
        }
        Poll::Ready(Ok(()))
    }

    /// The read direction reached the announced count.
    fn counted_end(&mut self) {
        self.read_end = ReadEnd::Counted;
        if self.reg.side == Side::Server {
            let told =
                self.reg.ends.tx.try_send(Box::new(Message::StreamEndRead { stream_id: self.reg.stream_id }));
            self.read_untold = told.is_err();
        }
    }
}

impl<S: Stream> AsyncRead for Counted<S> {
    /// Reads the stream's bytes. The peer's count is looked up only when the connection has nothing to
    /// read (no lock on the bulk path); once known, no read goes past it.
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_late_end(cx))?;
        if this.read_end != ReadEnd::Open {
            return Poll::Ready(Ok(()));
        }
        let want = match this.peer_count {
            Some(count) if count == this.read => {
                this.counted_end();
                return Poll::Ready(Ok(()));
            }
            Some(count) => usize::try_from(count - this.read).unwrap_or(usize::MAX).min(buf.remaining()),
            None => buf.remaining(),
        };
        let mut part = ReadBuf::new(buf.initialize_unfilled_to(want));
        match Pin::new(&mut this.inner).poll_read(cx, &mut part) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                // Nothing to read: the count may be what is missing.
                this.poll_count(cx)?;
                if this.peer_count == Some(this.read) {
                    this.counted_end();
                    return Poll::Ready(Ok(()));
                }
                return Poll::Pending;
            }
        }
        let n = part.filled().len();
        if n == 0 && want > 0 {
            this.poll_count(cx)?;
            match this.peer_count {
                Some(count) if count == this.read => this.counted_end(),
                Some(count) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the connection ended after {} of {count} announced bytes", this.read),
                    )));
                }
                None => this.read_end = ReadEnd::Closed,
            }
            return Poll::Ready(Ok(()));
        }
        buf.advance(n);
        this.read += n as u64;
        Poll::Ready(Ok(()))
    }
}

impl<S: Stream> AsyncWrite for Counted<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write != WriteEnd::Open {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.written += n as u64;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write == WriteEnd::Open {
            ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
            let end = Message::StreamEnd { stream_id: this.reg.stream_id, bytes: this.written };
            let ends = &this.reg.ends;
            if !ends.gone.is_cancelled() && ends.tx.try_send(Box::new(end)).is_ok() {
                this.write = WriteEnd::Announced;
                this.session_gone = Some(Box::pin(ends.gone.clone().cancelled_owned()));
                return Poll::Ready(Ok(()));
            }
            this.write = WriteEnd::Closing;
        }
        this.poll_late_end(cx)
    }
}

impl<S: Stream> Stream for Counted<S> {
    fn reset_on_close(&self, reset: bool) {
        self.inner.reset_on_close(reset);
    }

    /// A kernel TLS connection's socket, with its ends counted by the splice tier
    /// ([`CountedSocket`]); no other: their ends are counted in user space.
    fn plain(&self) -> Result<Plain<'_>, &'static str> {
        match self.inner.plain()? {
            Plain::Ktls(socket) => {
                let before = (self.read, self.written);
                Ok(Plain::Counted(CountedSocket { socket, reg: &self.reg, state: &self.spliced, before }))
            }
            _ => Err("counted_ends"),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Two sides of one stream over a TCP pair, their sessions' frames crossed by hand.
    async fn pair() -> (Counted<tokio::net::TcpStream>, Counted<tokio::net::TcpStream>, Channels) {
        let (a, b) = crate::transport::tcp_pair().await;
        let (server_ends, server_rx) = Ends::new();
        let (agent_ends, agent_rx) = Ends::new();
        let server = Counted::new(a, server_ends.register(1, Side::Server).unwrap());
        let agent = Counted::new(b, agent_ends.register(1, Side::Agent).unwrap());
        (server, agent, Channels { server_ends, server_rx, agent_ends, agent_rx })
    }

    struct Channels {
        server_ends: Arc<Ends>,
        server_rx: mpsc::Receiver<Box<Message>>,
        agent_ends: Arc<Ends>,
        agent_rx: mpsc::Receiver<Box<Message>>,
    }

    impl Channels {
        /// Delivers every frame queued on either side to the other.
        fn deliver(&mut self) {
            while let Ok(m) = self.server_rx.try_recv() {
                match *m {
                    Message::StreamEnd { stream_id, bytes } => self.agent_ends.told_end(stream_id, bytes),
                    Message::StreamEndRead { stream_id } => self.agent_ends.told_read(stream_id),
                    other => panic!("unexpected {other:?}"),
                }
            }
            while let Ok(m) = self.agent_rx.try_recv() {
                match *m {
                    Message::StreamEnd { stream_id, bytes } => self.server_ends.told_end(stream_id, bytes),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    }

    #[tokio::test]
    async fn both_directions_end_by_count_and_the_connection_carries_on() {
        let (mut server, mut agent, mut ch) = pair().await;
        server.write_all(b"up bytes").await.unwrap();
        server.shutdown().await.unwrap();
        agent.write_all(b"down").await.unwrap();
        agent.shutdown().await.unwrap();
        ch.deliver();
        let mut up = Vec::new();
        agent.read_to_end(&mut up).await.unwrap();
        assert_eq!(up, b"up bytes");
        let mut down = Vec::new();
        server.read_to_end(&mut down).await.unwrap();
        assert_eq!(down, b"down");
        ch.deliver();
        assert!(server.reusable() && agent.reusable());
        assert!(agent.read_acknowledged().await);
        // The connection itself is still open: the next bytes are the next stream's.
        let (mut s, mut a) = (server.into_inner(), agent.into_inner());
        a.write_all(b"next").await.unwrap();
        let mut next = [0u8; 4];
        s.read_exact(&mut next).await.unwrap();
        assert_eq!(&next, b"next");
        assert_eq!(ch.server_ends.registered() + ch.agent_ends.registered(), 0);
    }

    #[tokio::test]
    async fn a_count_that_arrives_before_the_bytes_ends_the_direction_after_them() {
        let (mut server, mut agent, mut ch) = pair().await;
        server.written = 3; // announced before the three bytes are on their way
        server.shutdown().await.unwrap();
        ch.deliver();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            agent.read_to_end(&mut got).await.map(|_| (got, agent.read_end))
        });
        server.inner.write_all(b"abc").await.unwrap();
        let (got, end) = reader.await.unwrap().unwrap();
        assert_eq!(got, b"abc");
        assert_eq!(end, ReadEnd::Counted);
    }

    /// The splice tier asks for the count, finds none, drains the socket and only then waits: a count
    /// that arrived in between, and which the bytes already taken reached, must end that wait at once.
    /// The peer sends nothing more, so the socket would never become readable (the hang a hundred
    /// parallel kernel TLS streams met now and then on 6.12).
    #[tokio::test]
    async fn a_count_reached_before_the_wait_ends_it_without_a_readable_socket() {
        let (socket, _peer) = crate::transport::tcp_pair().await;
        let (ends, _rx) = Ends::new();
        let reg = ends.register(1, Side::Agent).unwrap();
        let state = SplicedEnds::default();
        // Two bytes went through the Counted before the splice took over.
        let spliced = CountedSocket { socket: &socket, reg: &reg, state: &state, before: (2, 0) };
        let mut cx = Context::from_waker(Waker::noop());

        let mut unknown = std::pin::pin!(spliced.source_ready(3));
        assert!(unknown.as_mut().poll(&mut cx).is_pending(), "no count, nothing to read: wait");
        ends.told_end(1, 5);
        assert!(matches!(unknown.as_mut().poll(&mut cx), Poll::Ready(Ok(()))), "the count arrived");

        let reached = std::pin::pin!(spliced.source_ready(3)).as_mut().poll(&mut cx);
        assert!(matches!(reached, Poll::Ready(Ok(()))), "2 + 3 bytes taken of 5: the direction ended");
        let short = std::pin::pin!(spliced.source_ready(2)).as_mut().poll(&mut cx);
        assert!(short.is_pending(), "a byte still to come: wait for the socket");
        assert_eq!(spliced.limit(2).unwrap(), Some(1));
    }

    #[tokio::test]
    async fn bytes_past_the_count_or_an_end_before_it_fail_the_stream() {
        let (mut server, mut agent, mut ch) = pair().await;
        server.inner.write_all(b"abcdef").await.unwrap();
        let mut first = [0u8; 6];
        agent.read_exact(&mut first).await.unwrap();
        server.written = 2; // announces fewer than it sent
        server.shutdown().await.unwrap();
        ch.deliver();
        let err = agent.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);

        let (mut server, mut agent, mut ch) = pair().await;
        agent.written = 10; // announces more than it sends
        agent.shutdown().await.unwrap();
        agent.inner.shutdown().await.unwrap();
        ch.deliver();
        let err = server.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn without_a_session_the_end_is_a_real_one_and_nothing_is_reused() {
        let (mut server, mut agent, ch) = pair().await;
        ch.server_ends.close();
        ch.agent_ends.close();
        server.write_all(b"last").await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = Vec::new();
        agent.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last");
        assert!(!agent.reusable() && !server.reusable());
    }

    #[tokio::test]
    async fn an_end_announced_before_the_session_was_lost_is_sent_for_real_too() {
        let (mut server, mut agent, ch) = pair().await;
        server.write_all(b"tail").await.unwrap();
        server.shutdown().await.unwrap(); // announced, never delivered
        ch.server_ends.close();
        ch.agent_ends.close();
        // The server's other direction is still read: that is where the late end goes out.
        let reader = tokio::spawn(async move {
            let mut down = Vec::new();
            server.read_to_end(&mut down).await.map(|_| down)
        });
        let mut got = Vec::new();
        agent.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"tail");
        agent.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap().unwrap(), b"");
    }
}
