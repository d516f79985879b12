//! The splice tier: each direction moves bytes socket → pipe → socket with splice(2), so they never
//! enter user space. A full pipe stops reading, which keeps TCP flow control end to end (natural
//! backpressure), and end of stream is exact: splice returns 0 only after every byte before the FIN.
//!
//! Works for any pair of plaintext stream sockets (TCP, Unix), and for TCP sockets with kernel TLS,
//! whose records the kernel seals and opens: there `close_notify` goes out before FIN, a record that
//! is not application data stops the splice and is read with `recvmsg`, and a FIN without
//! `close_notify` fails the stream (it may be truncated). User-space TLS takes the copy tier.

use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};

use super::{Activity, End, Moved, RelayError};
use crate::transport::{Plain, Stream, ktls};

/// Capacity asked for each direction's pipe (`F_SETPIPE_SZ`); 1 MiB moved 2.3–2.4 GB/s here (DESIGN §5 k).
pub const PIPE_SIZE: usize = 1 << 20;

/// A socket splice can read from and write to, with tokio's readiness tracking.
pub trait Spliceable: AsFd + Sync + Sized {
    /// Waits until the socket is ready for `interest`.
    fn ready_for(&self, interest: Interest) -> impl Future<Output = io::Result<()>> + Send;
    /// Runs `f` (a non-blocking syscall); a `WouldBlock` clears the readiness it consumed.
    fn try_with<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
    /// Ends the connection as a failure once dropped ([`Stream::abort`]).
    fn abort(&self);
    /// Ends the direction this socket sends, after `written` bytes: FIN.
    fn end_write(&self, written: u64) -> impl Future<Output = io::Result<()>> + Send {
        let _ = written;
        let done = socket2::SockRef::from(self).shutdown(Shutdown::Write);
        async { done }
    }
    /// Bytes this socket may still give after `taken` as a source: `None` for no limit.
    fn limit(&self, taken: u64) -> io::Result<Option<u64>> {
        let _ = taken;
        Ok(None)
    }
    /// The source gave all it may ([`Spliceable::limit`] reached 0): its direction ended.
    fn counted_end(&self) {}
    /// Waits until the source has something after `taken` bytes: bytes, an end, or (counted ends) its
    /// count, also one that arrived earlier and `taken` has reached.
    fn source_ready(&self, taken: u64) -> impl Future<Output = io::Result<()>> + Send {
        let _ = taken;
        self.ready_for(Interest::READABLE)
    }
    /// A splice from this socket failed with `e`. Where a record that is not application data stopped
    /// it (kernel TLS), reads that record: `Ok(true)` when it ended the peer's direction.
    fn stopped(&self, e: io::Error) -> io::Result<bool> {
        Err(e)
    }
    /// Whether an end of stream is clean only once announced (TLS `close_notify`): a bare FIN then
    /// means a truncated stream.
    fn announces_end(&self) -> bool {
        false
    }
}

impl Spliceable for TcpStream {
    async fn ready_for(&self, interest: Interest) -> io::Result<()> {
        self.ready(interest).await.map(|_| ())
    }
    fn try_with<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        self.try_io(interest, f)
    }
    fn abort(&self) {
        Stream::abort(self);
    }
}

impl Spliceable for UnixStream {
    async fn ready_for(&self, interest: Interest) -> io::Result<()> {
        self.ready(interest).await.map(|_| ())
    }
    fn try_with<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        self.try_io(interest, f)
    }
    fn abort(&self) {
        Stream::abort(self);
    }
}

/// Any plaintext socket; over kernel TLS, `close_notify` before FIN and records that are not
/// application data read through `recvmsg` ([`ktls`]).
impl Spliceable for Plain<'_> {
    async fn ready_for(&self, interest: Interest) -> io::Result<()> {
        match self {
            Plain::Tcp(s) | Plain::Ktls(s) => s.ready_for(interest).await,
            Plain::Unix(s) => s.ready_for(interest).await,
            Plain::Counted(c) => c.socket().ready_for(interest).await,
        }
    }
    fn try_with<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        match self {
            Plain::Tcp(s) | Plain::Ktls(s) => s.try_io(interest, f),
            Plain::Unix(s) => s.try_io(interest, f),
            Plain::Counted(c) => c.socket().try_io(interest, f),
        }
    }
    fn abort(&self) {
        match self {
            Plain::Tcp(s) | Plain::Ktls(s) => Stream::abort(*s),
            Plain::Unix(s) => Stream::abort(*s),
            Plain::Counted(c) => Stream::abort(c.socket()),
        }
    }
    fn limit(&self, taken: u64) -> io::Result<Option<u64>> {
        match self {
            Plain::Counted(c) => c.limit(taken),
            _ => Ok(None),
        }
    }
    fn counted_end(&self) {
        if let Plain::Counted(c) = self {
            c.counted_end();
        }
    }
    async fn source_ready(&self, taken: u64) -> io::Result<()> {
        match self {
            Plain::Counted(c) => c.source_ready(taken).await,
            _ => self.ready_for(Interest::READABLE).await,
        }
    }
    async fn end_write(&self, written: u64) -> io::Result<()> {
        let s = match self {
            Plain::Counted(c) if c.announce(written) => return Ok(()),
            Plain::Counted(c) => Some(c.socket()),
            Plain::Ktls(s) => Some(*s),
            Plain::Tcp(_) | Plain::Unix(_) => None,
        };
        if let Some(s) = s {
            loop {
                s.ready(Interest::WRITABLE).await?;
                match s.try_io(Interest::WRITABLE, || ktls::send_close_notify(s)) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
        socket2::SockRef::from(self).shutdown(Shutdown::Write)
    }
    fn stopped(&self, e: io::Error) -> io::Result<bool> {
        let ktls = match self {
            Plain::Ktls(s) => Some(*s),
            Plain::Counted(c) => Some(c.socket()),
            Plain::Tcp(_) | Plain::Unix(_) => None,
        };
        match (ktls, e.raw_os_error()) {
            (Some(s), Some(nix::libc::EINVAL | nix::libc::EIO)) => ktls::read_control(s),
            (Some(_), Some(nix::libc::EBADMSG)) => {
                Err(io::Error::new(io::ErrorKind::InvalidData, "a TLS record did not open (kernel TLS)"))
            }
            _ => Err(e),
        }
    }
    fn announces_end(&self) -> bool {
        matches!(self, Plain::Ktls(_) | Plain::Counted(_))
    }
}

/// Empty pipes kept for reuse. A stream holds a pipe only while bytes are moving in that direction, so
/// thousands of idle streams cost no descriptors beyond their sockets.
pub const MAX_POOLED_PIPES: usize = 64;

static POOL: std::sync::Mutex<Vec<Pipe>> = std::sync::Mutex::new(Vec::new());

/// A non-blocking pipe sized to [`PIPE_SIZE`] (or whatever the system allows).
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    /// A pooled pipe, or a new one.
    fn take() -> io::Result<Self> {
        if let Some(pipe) = POOL.lock().expect("pipe pool lock poisoned").pop() {
            return Ok(pipe);
        }
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let size = i32::try_from(PIPE_SIZE).expect("pipe size fits in i32");
        // Above /proc/sys/fs/pipe-max-size this fails for unprivileged users: keep the default then.
        let capacity = fcntl(&write, FcntlArg::F_SETPIPE_SZ(size))
            .or_else(|_| fcntl(&write, FcntlArg::F_GETPIPE_SZ))
            .map_or(64 * 1024, |c| usize::try_from(c).unwrap_or(64 * 1024));
        Ok(Self { read, write, capacity })
    }

    /// Returns an empty pipe to the pool (or closes it when the pool is full).
    fn give_back(self) {
        let mut pool = POOL.lock().expect("pipe pool lock poisoned");
        if pool.len() < MAX_POOLED_PIPES {
            pool.push(self);
        }
    }
}

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

/// One direction: `src` → pipe → `dst` until `src` ends, then FIN on `dst`. Errors say which end
/// failed: `End::A` the source, `End::B` the destination. The pipe is held only while it has bytes
/// or `src` has more to give.
async fn pump<S: Spliceable, D: Spliceable>(
    src: &S,
    dst: &D,
    activity: &Activity,
) -> Result<u64, (End, io::Error)> {
    let mut pipe: Option<Pipe> = None;
    let mut in_pipe = 0usize;
    let mut total = 0u64;
    let mut taken = 0u64;
    let mut eof = false;
    loop {
        if pipe.is_none() {
            // Idle: hold no pipe until the source has something (bytes, an end or its count).
            src.source_ready(taken).await.map_err(|e| (End::A, e))?;
            pipe = Some(Pipe::take().map_err(|e| (End::A, e))?);
        }
        let p = pipe.as_ref().expect("a pipe is held from here on");
        let mut progressed = false;
        let mut drained_source = false;
        // What the source may still give (counted ends): never a byte past the announced count.
        let room = match src.limit(taken).map_err(|e| (End::A, e))? {
            Some(left) => usize::try_from(left).unwrap_or(usize::MAX).min(p.capacity - in_pipe),
            None => p.capacity - in_pipe,
        };
        if !eof && room == 0 && in_pipe < p.capacity {
            src.counted_end();
            eof = true;
            progressed = true;
        } else if !eof && room > 0 {
            let fill = || Ok(splice(src, None, &p.write, None, room, FLAGS)?);
            // With bytes in the pipe an EAGAIN may mean a full pipe rather than an empty source (a pipe
            // holds one buffer per page of its capacity, fewer bytes when skbs are small). Only an empty
            // pipe's EAGAIN clears the source's readiness: cleared wrongly, a source whose receive window
            // closed would wake us only on its sender's next window probe, hundreds of ms later.
            let filled = if in_pipe == 0 { src.try_with(Interest::READABLE, fill) } else { fill() };
            match filled {
                Ok(0) if src.announces_end() => {
                    let e = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection ended without close_notify",
                    );
                    return Err((End::A, e));
                }
                Ok(0) => eof = true,
                Ok(n) => {
                    in_pipe += n;
                    taken += n as u64;
                    activity.read(n);
                    progressed = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => drained_source = true,
                Err(e) => match src.stopped(e) {
                    Ok(ended) => {
                        eof = ended;
                        progressed = true;
                    }
                    Err(e) => return Err((End::A, e)),
                },
            }
        }
        if in_pipe > 0 {
            match dst.try_with(Interest::WRITABLE, || Ok(splice(&p.read, None, dst, None, in_pipe, FLAGS)?)) {
                Ok(n) => {
                    in_pipe -= n;
                    total += n as u64;
                    activity.wrote(n);
                    progressed = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err((End::B, e)),
            }
        }
        if in_pipe == 0 && (eof || drained_source) {
            pipe.take().expect("a pipe is held here").give_back();
            if eof {
                dst.end_write(total).await.map_err(|e| (End::B, e))?;
                return Ok(total);
            }
            tokio::task::consume_budget().await;
            continue;
        }
        if progressed {
            // Cooperative: splice syscalls use none of tokio's budget, and a source that never runs dry
            // (a kernel TLS socket sealing slower than its peer sends) would keep this worker thread,
            // and the tasks queued behind it, such as a control channel's heartbeat, for good.
            tokio::task::consume_budget().await;
            continue;
        }
        // Nothing moved. With bytes in the pipe only the destination can make progress (the pipe may be
        // full), and a source that received FIN stays readable for good: waiting on it would spin.
        if in_pipe > 0 {
            dst.ready_for(Interest::WRITABLE).await.map_err(|e| (End::B, e))?;
        } else {
            src.source_ready(taken).await.map_err(|e| (End::A, e))?;
        }
    }
}

/// Splices `a` and `b` in both directions until both have ended; on an error both are aborted.
/// Progress is reported to `activity`.
pub async fn relay<A: Spliceable, B: Spliceable>(
    a: &A,
    b: &B,
    activity: &Activity,
) -> Result<Moved, RelayError> {
    super::both_directions(pump(a, b, activity), pump(b, a, activity)).await.map_err(
        |((end, source), a_to_b, b_to_a)| {
            a.abort();
            b.abort();
            RelayError { end, source, moved: (a_to_b.unwrap_or(0), b_to_a.unwrap_or(0)) }
        },
    )
}

/// [`relay`] for two plaintext sockets of any kind.
pub async fn relay_plain(a: Plain<'_>, b: Plain<'_>, activity: &Activity) -> Result<Moved, RelayError> {
    relay(&a, &b, activity).await
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn carries_bytes_and_half_close_both_ways() {
        let (mut client, a) = crate::transport::tcp_pair().await;
        let (b, mut server) = crate::transport::tcp_pair().await;
        let relay = tokio::spawn(async move { relay(&a, &b, &Activity::default()).await });
        let big: Vec<u8> = (0..(3 * PIPE_SIZE + 7)).map(|i| u8::try_from(i % 251).unwrap()).collect();
        let to_send = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&to_send).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == big, "client → server intact");
        let mut client = writer.await.unwrap();
        // The other direction still flows after the client's FIN.
        server.write_all(b"reply").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"reply");
        let moved = relay.await.unwrap().expect("clean end");
        assert_eq!(moved, Moved { a_to_b: big.len() as u64, b_to_a: 5 });
    }

    #[tokio::test]
    async fn reset_on_one_side_aborts_the_other() {
        let (client, a) = crate::transport::tcp_pair().await;
        let (b, mut server) = crate::transport::tcp_pair().await;
        let relay = tokio::spawn(async move { relay(&a, &b, &Activity::default()).await });
        Stream::abort(&client);
        drop(client);
        let err = relay.await.unwrap().expect_err("reset must surface");
        assert_eq!(err.end, End::A);
        let mut buf = [0u8; 8];
        let res = server.read(&mut buf).await;
        assert!(matches!(&res, Err(e) if e.kind() == io::ErrorKind::ConnectionReset), "got {res:?}");
    }
}
