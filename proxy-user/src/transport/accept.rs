//! The accept loop every listener of Spoke runs (the server's Unix-socket and TCP frontends, its agent
//! listener, both admin endpoints).
//!
//! - A permit from the listener's own budget is taken **before** `accept()`, so a listener at its limit
//!   leaves connections in the kernel's backlog instead of taking them on; each listener has its own
//!   budget, so a flood on one never starves another. The handler gets the permit and holds it for as
//!   long as the connection counts against the budget (its whole life, or only its handshake).
//! - A failed accept (out of descriptors, for example) is logged and retried after a pause that
//!   doubles while failures repeat, so the loop never spins.
//! - Where the listener sets one, a peer that sends nothing within the first-byte deadline is dropped
//!   before any handler state (a TLS session, a request buffer) exists for it.
//! - Where the listener sets one, a source address may hold only so many of its permits at once: a
//!   flood of idle or garbage connections from one host (or one NAT) cannot take every permit from the
//!   others. Connections past it are closed at once.
//! - Refusals are counted through the listener's hook and warned about at most once per
//!   [`WARN_INTERVAL`], with the number left unsaid, so that a flood cannot flood the log too.
//! - Every connection runs in its own task, tracked for the shutdown, inside a span naming the listener
//!   and the peer.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, debug_span, info_span, warn};

use crate::telemetry::Limiter;

/// First pause after a failed accept.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Longest pause after repeated failed accepts.
pub const MAX_ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);
/// Shortest time between two warnings about refused peers of one listener.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Where a connection came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// A TCP peer.
    Tcp(std::net::SocketAddr),
    /// A peer on a Unix socket (unnamed; its credentials are the socket file's permissions).
    Unix,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => addr.fmt(f),
            Self::Unix => f.write_str("uds"),
        }
    }
}

/// A listening socket the loop can accept from.
pub trait Listener: Send + Sync + 'static {
    /// The accepted connection.
    type Conn: Send + 'static;
    /// Accepts one connection.
    fn accept_conn(&self) -> impl Future<Output = io::Result<(Self::Conn, Peer)>> + Send;
    /// Accepts a connection the kernel already completed, without waiting (`WouldBlock` if none). Asks
    /// the kernel itself: the runtime's readiness may not know of it yet.
    fn accept_pending(&self) -> io::Result<(Self::Conn, Peer)>;
    /// Waits until `conn` has a byte to read (or has ended), leaving the byte unread. (Readiness alone
    /// will not do: tokio presets an accepted socket as readable.)
    fn first_byte(conn: &Self::Conn) -> impl Future<Output = io::Result<()>> + Send;
}

impl Listener for TcpListener {
    type Conn = TcpStream;

    async fn accept_conn(&self) -> io::Result<(TcpStream, Peer)> {
        self.accept().await.map(|(conn, addr)| (conn, Peer::Tcp(addr)))
    }

    fn accept_pending(&self) -> io::Result<(TcpStream, Peer)> {
        let (socket, addr) = socket2::SockRef::from(self).accept()?;
        socket.set_nonblocking(true)?;
        let addr = addr.as_socket().ok_or_else(|| io::Error::other("not an IP peer"))?;
        Ok((TcpStream::from_std(socket.into())?, Peer::Tcp(addr)))
    }

    async fn first_byte(conn: &TcpStream) -> io::Result<()> {
        conn.peek(&mut [0u8; 1]).await.map(drop)
    }
}

impl Listener for UnixListener {
    type Conn = UnixStream;

    async fn accept_conn(&self) -> io::Result<(UnixStream, Peer)> {
        self.accept().await.map(|(conn, _)| (conn, Peer::Unix))
    }

    fn accept_pending(&self) -> io::Result<(UnixStream, Peer)> {
        let (socket, _) = socket2::SockRef::from(self).accept()?;
        socket.set_nonblocking(true)?;
        Ok((UnixStream::from_std(socket.into())?, Peer::Unix))
    }

    async fn first_byte(conn: &UnixStream) -> io::Result<()> {
        let mut byte = [std::mem::MaybeUninit::uninit()];
        loop {
            conn.readable().await?;
            let peek = || socket2::SockRef::from(conn).peek(&mut byte);
            match conn.try_io(tokio::io::Interest::READABLE, peek) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A Unix socket's file, as this process bound it: bound under a name of its own beside `path`, then
/// [`published`](Self::publish) by renaming it over `path`, so that the path always names a listening
/// socket (a predecessor's until the rename, this one's after). Removed only while it is still that
/// file: a successor may have published its own at the same path meanwhile, which
/// [`is_own`](Self::is_own) tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketFile {
    path: std::path::PathBuf,
    bound: std::path::PathBuf,
    id: (u64, u64),
}

fn file_id(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt as _;
    (meta.dev(), meta.ino())
}

/// Fails unless `path` is a socket file or nothing: never replace another kind of file.
fn socket_or_nothing(path: &std::path::Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => Ok(()),
        Ok(_) => {
            Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} is not a socket", path.display())))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

impl SocketFile {
    /// Binds a listener for `path` under a name of its own beside it (`.<name>.<pid>.<random>`: two
    /// containers' processes may share a pid), with `mode`;
    /// nobody can connect to it until it is published.
    pub fn bind(path: &std::path::Path, mode: u32) -> io::Result<(UnixListener, Self)> {
        use std::os::unix::fs::PermissionsExt as _;
        socket_or_nothing(path)?;
        let name = path.file_name().ok_or_else(|| io::Error::other("the socket path names no file"))?;
        let bound = path.with_file_name(format!(
            ".{}.{}.{:08x}",
            name.to_string_lossy(),
            std::process::id(),
            fastrand::u32(..)
        ));
        let listener = UnixListener::bind(&bound)?;
        // Created with the process umask, then narrowed before anyone can reach it.
        let meta = std::fs::set_permissions(&bound, std::fs::Permissions::from_mode(mode))
            .and_then(|()| std::fs::symlink_metadata(&bound))
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&bound);
            })?;
        Ok((listener, Self { path: path.to_owned(), id: file_id(&meta), bound }))
    }

    /// Renames the socket over its path: from now on connections to the path come here. A
    /// predecessor's socket there keeps the connections it has.
    pub fn publish(&self) -> io::Result<()> {
        socket_or_nothing(&self.path)?;
        std::fs::rename(&self.bound, &self.path)
    }

    /// Whether the path still names this socket (`false` once a successor published its own there).
    #[must_use]
    pub fn is_own(&self) -> bool {
        std::fs::symlink_metadata(&self.path).is_ok_and(|m| file_id(&m) == self.id)
    }

    /// The socket's path.
    #[must_use]
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Removes the file if it is still this one (published or not).
    pub fn remove_if_own(&self) {
        for path in [&self.path, &self.bound] {
            if std::fs::symlink_metadata(path).is_ok_and(|m| file_id(&m) == self.id)
                && let Err(error) = std::fs::remove_file(path)
            {
                warn!(%error, path = %path.display(), "remove the socket file");
            }
        }
    }
}

/// Why the loop closed a connection before its handler saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The peer sent nothing by the first-byte deadline.
    Silent,
    /// Its source address already held all the permits one source may hold.
    SourceBusy,
}

impl Refused {
    /// Metric label.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Silent => "timeout",
            Self::SourceBusy => "source_busy",
        }
    }
}

/// Told of each connection the loop refused (to count it).
pub type OnRefused = Arc<dyn Fn(Peer, Refused) + Send + Sync>;

/// The budget and deadlines of one listener.
#[derive(Clone)]
pub struct Budget {
    /// The listener's name in logs and spans (`uds`, `frontend`, `agent`, `admin`).
    pub name: &'static str,
    /// Connections that may hold a permit at once.
    pub max_conns: usize,
    /// Time a new peer has to send its first byte; `None` leaves it to the handler.
    pub first_byte: Option<Duration>,
    /// Permits one source address may hold at once; `None` for no such limit (and for Unix sockets,
    /// whose peers have no address).
    pub per_source: Option<usize>,
    /// Told of each connection the loop refused.
    pub on_refused: Option<OnRefused>,
    /// Whether the connection's span is at the default level (`info`), so that its warnings name the
    /// listener and the peer; otherwise `debug` (an enabled span costs memory for the connection's
    /// life, which matters for listeners holding thousands of streams).
    pub peer_in_logs: bool,
}

impl fmt::Debug for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Budget")
            .field("name", &self.name)
            .field("max_conns", &self.max_conns)
            .field("first_byte", &self.first_byte)
            .field("per_source", &self.per_source)
            .field("peer_in_logs", &self.peer_in_logs)
            .finish_non_exhaustive()
    }
}

/// A connection handed to a handler.
#[derive(Debug)]
pub struct Accepted<C> {
    /// The connection.
    pub conn: C,
    /// Where it came from.
    pub peer: Peer,
    /// When it was accepted: handshake and request deadlines count from here.
    pub at: Instant,
    /// Its place in the listener's budget; dropping it frees the place.
    pub permit: Permit,
}

/// A connection's place in its listener's budget, and in its source address's share of it.
#[derive(Debug)]
pub struct Permit {
    _slot: OwnedSemaphorePermit,
    _source: Option<SourceSlot>,
}

/// One permit held by a source address; given back when dropped.
#[derive(Debug)]
struct SourceSlot {
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut held = self.held.lock().expect("source table lock poisoned");
        if let Some(n) = held.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

/// Takes one of `max` places for `ip`, or `None` when it holds them all.
fn take_source_slot(held: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr, max: usize) -> Option<SourceSlot> {
    let mut table = held.lock().expect("source table lock poisoned");
    let n = table.entry(ip).or_default();
    if *n >= max {
        return None;
    }
    *n += 1;
    Some(SourceSlot { held: held.clone(), ip })
}

/// Counts a refused connection and warns about it when a warning is due.
fn refuse(budget: &Budget, refusals: &Limiter, peer: Peer, why: Refused) {
    if let Some(on_refused) = &budget.on_refused {
        on_refused(peer, why);
    }
    if let Some(count) = refusals.note() {
        match why {
            Refused::Silent => {
                warn!(listener = budget.name, %peer, count, deadline = ?budget.first_byte, "peers sent nothing by the first-byte deadline: closed");
            }
            Refused::SourceBusy => {
                warn!(listener = budget.name, %peer, count, per_source = ?budget.per_source, "peers over their source address's share: closed");
            }
        }
    }
}

/// Accepts from `listener` until `stop` is cancelled, running `handler` for each connection in a task
/// of `tracker`.
pub async fn serve<L, H, F>(
    listener: L,
    budget: Budget,
    stop: CancellationToken,
    tracker: TaskTracker,
    handler: H,
) where
    L: Listener,
    H: Fn(Accepted<L::Conn>) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(budget.max_conns));
    let sources = Arc::new(Mutex::new(HashMap::new()));
    let refusals = Arc::new(Limiter::new(WARN_INTERVAL));
    let budget = Arc::new(budget);
    let handler = Arc::new(handler);
    let dispatch = |conn: L::Conn, peer: Peer, permit: OwnedSemaphorePermit| {
        let source = match (budget.per_source, peer) {
            (Some(max), Peer::Tcp(addr)) => {
                let Some(slot) = take_source_slot(&sources, addr.ip(), max) else {
                    refuse(&budget, &refusals, peer, Refused::SourceBusy);
                    return;
                };
                Some(slot)
            }
            _ => None,
        };
        let permit = Permit { _slot: permit, _source: source };
        let accepted = Accepted { conn, peer, at: Instant::now(), permit };
        let span = if budget.peer_in_logs {
            info_span!("conn", listener = budget.name, peer = %peer)
        } else {
            debug_span!("conn", listener = budget.name, peer = %peer)
        };
        let (handler, budget, refusals) = (handler.clone(), budget.clone(), refusals.clone());
        tracker.spawn(
            async move {
                if let Some(deadline) = budget.first_byte
                    && tokio::time::timeout(deadline, L::first_byte(&accepted.conn)).await.is_err()
                {
                    refuse(&budget, &refusals, accepted.peer, Refused::Silent);
                    return;
                }
                handler(accepted).await;
            }
            .instrument(span),
        );
    };
    let mut pause = ACCEPT_ERROR_PAUSE;
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => break,
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let (conn, peer) = tokio::select! {
            () = stop.cancelled() => break,
            r = listener.accept_conn() => match r {
                Ok(c) => c,
                Err(error) => {
                    warn!(%error, listener = budget.name, "accept failed");
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(MAX_ACCEPT_ERROR_PAUSE);
                    continue;
                }
            },
        };
        pause = ACCEPT_ERROR_PAUSE;
        dispatch(conn, peer, permit);
    }
    // Connections the kernel completed before the stop are served, not reset with the listener.
    while let Ok(permit) = slots.clone().try_acquire_owned() {
        match listener.accept_pending() {
            Ok((conn, peer)) => dispatch(conn, peer, permit),
            Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

    use super::*;

    fn budget(max_conns: usize, first_byte: Option<Duration>, silent: &Arc<AtomicUsize>) -> Budget {
        let silent = silent.clone();
        Budget {
            name: "test",
            max_conns,
            first_byte,
            per_source: None,
            peer_in_logs: true,
            on_refused: Some(Arc::new(move |_, why| {
                assert_eq!(why, Refused::Silent);
                silent.fetch_add(1, Ordering::SeqCst);
            })),
        }
    }

    /// Echoes one read back, holding its permit until the peer closes.
    async fn echo_once(mut a: Accepted<TcpStream>) {
        let mut buf = [0u8; 16];
        if let Ok(n) = a.conn.read(&mut buf).await {
            let _ = a.conn.write_all(&buf[..n]).await;
            let _ = a.conn.read(&mut buf).await;
        }
    }

    #[tokio::test]
    async fn the_budget_holds_further_peers_in_the_backlog() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let silent = Arc::new(AtomicUsize::new(0));
        tokio::spawn(serve(listener, budget(1, None, &silent), stop.clone(), TaskTracker::new(), echo_once));
        let mut first = TcpStream::connect(addr).await.unwrap();
        first.write_all(b"1").await.unwrap();
        let mut buf = [0u8; 1];
        first.read_exact(&mut buf).await.unwrap();
        // The second peer connects (the kernel's backlog) but is not served while the first holds the
        // only permit.
        let mut second = TcpStream::connect(addr).await.unwrap();
        second.write_all(b"2").await.unwrap();
        let early = tokio::time::timeout(Duration::from_millis(200), second.read_exact(&mut buf)).await;
        assert!(early.is_err(), "served beyond the budget");
        drop(first);
        tokio::time::timeout(Duration::from_secs(10), second.read_exact(&mut buf))
            .await
            .expect("served once the permit is free")
            .unwrap();
        assert_eq!(&buf, b"2");
        stop.cancel();
    }

    /// A peer that says nothing is closed at the first-byte deadline and counted; the next one, which
    /// speaks at once, is served with its first byte still unread.
    async fn silent_peers_are_dropped<L, C, F>(listener: L, connect: impl Fn() -> F)
    where
        L: Listener,
        L::Conn: AsyncRead + AsyncWrite + Unpin,
        C: AsyncRead + AsyncWrite + Unpin,
        F: Future<Output = C>,
    {
        let stop = CancellationToken::new();
        let silent = Arc::new(AtomicUsize::new(0));
        let deadline = Some(Duration::from_millis(100));
        let echo = |mut a: Accepted<L::Conn>| async move {
            let mut buf = [0u8; 1];
            if a.conn.read_exact(&mut buf).await.is_ok() {
                let _ = a.conn.write_all(&buf).await;
            }
        };
        tokio::spawn(serve(listener, budget(4, deadline, &silent), stop.clone(), TaskTracker::new(), echo));
        let mut quiet = connect().await;
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), quiet.read(&mut buf))
            .await
            .expect("closed by the server")
            .unwrap_or(0);
        assert_eq!(n, 0, "a silent peer gets nothing and is closed");
        assert_eq!(silent.load(Ordering::SeqCst), 1);
        let mut talker = connect().await;
        talker.write_all(b"y").await.unwrap();
        talker.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"y", "the peeked byte is still there for the handler");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_silent_tcp_peer_is_dropped_at_the_first_byte_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        silent_peers_are_dropped(listener, || async move { TcpStream::connect(addr).await.unwrap() }).await;
    }

    #[tokio::test]
    async fn a_silent_unix_socket_peer_is_dropped_at_the_first_byte_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let connect = || {
            let path = path.clone();
            async move { UnixStream::connect(path).await.unwrap() }
        };
        silent_peers_are_dropped(listener, connect).await;
    }

    #[tokio::test]
    async fn one_source_cannot_take_every_permit() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let busy = Arc::new(AtomicUsize::new(0));
        let counted = busy.clone();
        let budget = Budget {
            name: "test",
            max_conns: 8,
            first_byte: None,
            per_source: Some(2),
            peer_in_logs: true,
            on_refused: Some(Arc::new(move |peer, why| {
                assert_eq!(why, Refused::SourceBusy);
                assert!(matches!(peer, Peer::Tcp(a) if a.ip().to_string() == "127.0.0.2"));
                counted.fetch_add(1, Ordering::SeqCst);
            })),
        };
        tokio::spawn(serve(listener, budget, stop.clone(), TaskTracker::new(), echo_once));
        // Six idle connections from 127.0.0.2: two hold their places, four are closed at once.
        let mut flood = Vec::new();
        for _ in 0..6 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            flood.push(socket.connect(addr).await.unwrap());
        }
        let mut closed = 0;
        for conn in &mut flood {
            let mut buf = [0u8; 1];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(500), conn.read(&mut buf)).await
            {
                closed += 1;
            }
        }
        assert_eq!(closed, 4, "only the source's share is held");
        assert_eq!(busy.load(Ordering::SeqCst), 4);
        // Another source is served while the flood still holds its two places.
        let mut good = TcpStream::connect(addr).await.unwrap();
        good.write_all(b"g").await.unwrap();
        let mut buf = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(10), good.read_exact(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf, b"g");
        // A place the source gives back can be taken again.
        drop(flood);
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut again = socket.connect(addr).await.unwrap();
        again.write_all(b"a").await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), again.read_exact(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf, b"a");
        stop.cancel();
    }
}
