//! The pool of data connections parked at the server. Each one waits for a single `Dial`; when it is
//! taken, a replacement is dialed at once, so the pool refills ahead of demand and no TLS handshake
//! (resumed, thanks to the shared client session cache) sits on a request's path.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, info_span, warn};

use super::Agent;
use super::control::Session;
use crate::codec::{self, CodecError};
use crate::metrics::inc;
use crate::protocol::{self, Message, Nonces, PROTOCOL_VERSION, UNKNOWN_SESSION};
use crate::transport::counted::Side;
use crate::transport::{DialedLink, Stream as _};

/// Pause after a data connection failed before it is replaced (keeps a broken server from being
/// hammered; the control channel's own backoff handles outages).
const FAILED_CONN_PAUSE: Duration = Duration::from_millis(500);

struct Counts {
    idle: AtomicUsize,
    dialing: AtomicUsize,
    /// Data connections in a row that a load balancer sent to another replica than the session's.
    misrouted: AtomicUsize,
    /// Most connections the server's pool takes from this agent now, as its last refusal showed
    /// (`usize::MAX` until one): the pool stops short of its size there instead of offering
    /// connections the server refuses.
    room: AtomicUsize,
    /// The server's refusals in a row: each waits twice as long before the pool tries for one more.
    refusals: AtomicUsize,
    wake: Notify,
}

impl Default for Counts {
    fn default() -> Self {
        Self {
            idle: AtomicUsize::new(0),
            dialing: AtomicUsize::new(0),
            misrouted: AtomicUsize::new(0),
            room: AtomicUsize::new(usize::MAX),
            refusals: AtomicUsize::new(0),
            wake: Notify::new(),
        }
    }
}

impl Counts {
    /// Connections parked or on their way: what the pool holds.
    fn held(&self) -> usize {
        self.idle.load(Ordering::Acquire) + self.dialing.load(Ordering::Acquire)
    }

    /// Connections the pool keeps: its size, or less where the server's pool is full.
    fn target(&self, pool_size: usize) -> usize {
        pool_size.min(self.room.load(Ordering::Acquire))
    }

    /// A dial took a connection: the server has a place again, and the pool may use it.
    fn taken(&self) {
        self.refusals.store(0, Ordering::Release);
        self.one_more();
    }

    /// The server wants no more connections than the pool holds now (at least one).
    fn keep_held(&self) {
        self.room.store(self.held().max(1), Ordering::Release);
    }

    /// Room for one more connection than before (none is added where no limit was set).
    fn one_more(&self) {
        let _ = self.room.fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_add(1));
    }
}

/// Longest wait, after the server's pool refused connections in a row, before the pool tries again.
const MAX_POOL_FULL_PAUSE: Duration = Duration::from_secs(80);

/// The server refused a connection because its pool is full: the pool keeps what it holds, and tries
/// for one more after [`protocol::POOL_FULL_PAUSE`], doubled for each refusal in a row.
async fn server_pool_full(counts: &Counts, stop: &CancellationToken) {
    counts.keep_held();
    let refusals = counts.refusals.fetch_add(1, Ordering::AcqRel).min(8);
    let pause = (protocol::POOL_FULL_PAUSE * (1 << refusals)).min(MAX_POOL_FULL_PAUSE);
    debug!(held = counts.held(), ?pause, "the server's pool is full: keeping what is parked");
    tokio::select! {
        () = stop.cancelled() => return,
        () = tokio::time::sleep(pause.mul_f64(0.5 + fastrand::f64())) => {}
    }
    counts.one_more();
    counts.wake.notify_one();
}

/// Misrouted data connections in a row replaced at once; past it, with the usual pause.
const MAX_MISROUTED: usize = 16;

/// Keeps `pool_size` data connections parked for `session` until `stop` is cancelled.
pub(super) async fn run(agent: Arc<Agent>, session: Arc<Session>, stop: CancellationToken) {
    let counts = Arc::new(Counts::default());
    loop {
        // A session whose server moved to a successor takes no new connections (its listener is
        // closed); the ones it has serve until it ends.
        while counts.held() < counts.target(agent.config.pool_size)
            && !session.leaving.load(Ordering::Acquire)
        {
            counts.dialing.fetch_add(1, Ordering::AcqRel);
            let slot = Slot {
                agent: agent.clone(),
                counts: counts.clone(),
                session: session.clone(),
                stop: stop.clone(),
            };
            tokio::spawn(data_conn(slot));
        }
        tokio::select! {
            () = counts.wake.notified() => {}
            () = stop.cancelled() => return,
        }
    }
}

async fn pause_then_wake(counts: &Counts, stop: &CancellationToken) {
    let pause = FAILED_CONN_PAUSE.mul_f64(0.5 + fastrand::f64());
    tokio::select! {
        () = stop.cancelled() => {}
        () = tokio::time::sleep(pause) => counts.wake.notify_one(),
    }
}

/// Behind a load balancer without advertised replica addresses, a data connection may reach another
/// replica than its session's: it is replaced at once, up to [`MAX_MISROUTED`] times in a row.
async fn replace_misrouted(counts: &Counts, stop: &CancellationToken) {
    debug!("data connection reached another replica: replacing it");
    if counts.misrouted.fetch_add(1, Ordering::AcqRel) < MAX_MISROUTED {
        counts.wake.notify_one();
    } else {
        pause_then_wake(counts, stop).await;
    }
}

/// Wakes the pool to replace a taken data connection when dropped: by the stream once it has written
/// its `DialReply`, so that the replacement's TCP and TLS handshakes (the costliest work of an open)
/// run after the open they would otherwise compete with for the CPU, not during it. The pool keeps
/// `--pool-size` connections, so other opens meanwhile take the others.
///
/// A TLS connection comes back when its stream ends by count, so it is replaced only once the idle
/// ones run below half the pool: a stream that ends soon costs no handshake at all, and long ones
/// still leave half the pool ready for the next burst.
pub(super) struct Refill {
    counts: Arc<Counts>,
    low_water: usize,
}

impl Refill {
    fn new(counts: &Arc<Counts>, pool_size: usize, comes_back: bool) -> Self {
        let low_water = if comes_back { pool_size.div_ceil(2) } else { usize::MAX };
        Self { counts: counts.clone(), low_water }
    }
}

impl Drop for Refill {
    fn drop(&mut self) {
        if self.counts.held() < self.low_water {
            self.counts.wake.notify_one();
        }
    }
}

/// A pool holds at most this many times its size of idle connections that came back from streams.
pub const MAX_IDLE_FACTOR: usize = 2;

/// Counts a data connection as dialing from its spawn until it parks or fails, so that the pool never
/// sees it in neither count (and dials a replacement for one still on its way).
struct Dialing(Arc<Counts>);

impl Drop for Dialing {
    fn drop(&mut self) {
        self.0.dialing.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a data connection did not prove its session.
enum Unproven {
    /// It reached a replica that does not hold the session.
    Misrouted,
    /// Anything else.
    Failed(CodecError),
}

/// The pool a data connection belongs to.
#[derive(Clone)]
pub(super) struct Slot {
    agent: Arc<Agent>,
    counts: Arc<Counts>,
    session: Arc<Session>,
    stop: CancellationToken,
}

/// One data connection: dial, then [`parked`].
async fn data_conn(slot: Slot) {
    let dialing = Dialing(slot.counts.clone());
    let Slot { agent, session, stop, counts } = &slot;
    let lineage = Lineage { generation: agent.tls.generation(), born: Instant::now() };
    let hello = Message::DataHello { version: PROTOCOL_VERSION, session_id: session.id };
    let connected = tokio::select! {
        () = stop.cancelled() => return,
        c = agent.connect(&session.data_addr, &hello, agent.config.tunnel_tls == super::config::TunnelTls::On, true) => c,
    };
    match connected {
        Ok(conn) => parked(&slot, conn, lineage, Some(dialing)).await,
        Err(error) => {
            drop(dialing);
            inc(&agent.metrics.server_conn_failures, "kind", "data");
            debug!(%error, "data connection failed");
            pause_then_wake(counts, stop).await;
        }
    }
}

/// A data connection that has said `DataHello` (new, or after a stream that ended by count): prove
/// the session where needed, park, wait for a dial, hand over to the stream.
async fn parked(slot: &Slot, mut conn: DialedLink, lineage: Lineage, dialing: Option<Dialing>) {
    let Slot { agent, session, stop, counts } = slot;
    // A data connection without a certificate of the node (plain, or with a token credential)
    // answers the server's challenge with the session's data key.
    let nonces = if agent.proves_data_conns(&conn) {
        match prove(agent, &mut conn, session).await {
            Ok(nonces) => Some(nonces),
            Err(Unproven::Misrouted) => {
                drop(dialing);
                return replace_misrouted(counts, stop).await;
            }
            Err(Unproven::Failed(error)) => {
                drop(dialing);
                inc(&agent.metrics.server_conn_failures, "kind", "data");
                debug!(%error, "data connection not admitted");
                return pause_then_wake(counts, stop).await;
            }
        }
    } else {
        None
    };
    counts.idle.fetch_add(1, Ordering::AcqRel);
    drop(dialing);
    agent.metrics.pool_idle.inc();

    // Reading is not cancel-safe, but a cancelled read drops the connection anyway.
    let first = tokio::select! {
        () = stop.cancelled() => None,
        m = codec::read_message(&mut conn) => Some(m),
    };
    counts.idle.fetch_sub(1, Ordering::AcqRel);
    agent.metrics.pool_idle.dec();
    if matches!(&first, Some(Ok(Message::Reject { reason })) if reason == protocol::PARK_SURPLUS) {
        // Kept to what is still parked (set before the pool wakes); each dial that takes one lets it
        // grow by one.
        counts.keep_held();
    }
    // A taken connection is replaced once its stream has replied (see `Refill`); any other end of an
    // idle one, at once.
    if !matches!(first, Some(Ok(Message::Dial { .. }))) {
        counts.wake.notify_one();
    }
    match first {
        None => {}
        Some(Ok(Message::Dial { stream_id, host, port, timeout_ms, mac }))
            if !session.key.verify_dial(
                &nonces.unwrap_or(Nonces::NONE),
                (stream_id, &host, port, timeout_ms),
                &mac,
            ) =>
        {
            warn!(dest = %format_args!("{host}:{port}"), "a Dial that is not the server's: refused");
            inc(&agent.metrics.server_conn_failures, "kind", "forged_dial");
            conn.abort();
            pause_then_wake(counts, stop).await;
        }
        Some(Ok(Message::Dial { stream_id, host, port, timeout_ms, .. })) => {
            counts.misrouted.store(0, Ordering::Release);
            counts.taken();
            let span = info_span!("stream", id = stream_id, dest = %format_args!("{host}:{port}"));
            // Registered before the reply: the server may announce its end as soon as it has it.
            let counted =
                conn.ends_by_count().then(|| session.ends.register(stream_id, Side::Agent)).flatten();
            let refill = Refill::new(&slot.counts, agent.config.pool_size, counted.is_some());
            let slot = slot.clone();
            let dial = Dial { stream_id, host, port, timeout_ms };
            agent.streams.spawn(
                async move {
                    let reusable = super::stream::serve(&slot.agent, conn, dial, refill, counted).await;
                    if let Some(conn) = reusable {
                        tokio::spawn(repark_boxed(slot, conn, lineage));
                    }
                }
                .instrument(span),
            );
        }
        Some(Ok(Message::Reject { reason })) if reason == UNKNOWN_SESSION => {
            replace_misrouted(counts, stop).await;
        }
        Some(Ok(Message::Reject { reason })) if reason == protocol::PARK_SURPLUS => {
            debug!(held = counts.held(), "the server closed a parked connection its agent did not use");
        }
        Some(Ok(Message::Reject { reason })) if reason == protocol::SERVER_POOL_FULL => {
            server_pool_full(counts, stop).await;
        }
        Some(Ok(Message::Reject { reason })) => {
            warn!(%reason, "server refused a data connection");
            pause_then_wake(counts, stop).await;
        }
        Some(Ok(other)) => {
            warn!(kind = other.kind(), "unexpected frame on an idle data connection");
            pause_then_wake(counts, stop).await;
        }
        Some(Err(CodecError::Closed)) => {
            debug!("server closed an idle data connection");
            pause_then_wake(counts, stop).await;
        }
        Some(Err(error)) => {
            debug!(%error, "idle data connection failed");
            pause_then_wake(counts, stop).await;
        }
    }
}

/// A server's `Dial`, as the stream serves it.
pub(super) struct Dial {
    pub(super) stream_id: u64,
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) timeout_ms: u32,
}

/// [`repark`] as its own task, boxed: a connection's life is a cycle of such tasks, whose types would
/// otherwise contain each other.
fn repark_boxed(slot: Slot, conn: DialedLink, lineage: Lineage) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(repark(slot, conn, lineage))
}

/// Where a data connection came from, to know when it must not carry another stream.
#[derive(Clone, Copy)]
struct Lineage {
    /// The client certificate's generation when it was dialed ([`crate::transport::tls::ClientTls::generation`]).
    generation: u64,
    born: Instant,
}

/// Longest time a data connection carries one stream after another: then it is closed and a new
/// handshake takes up the certificates of both ends as they are now.
pub const MAX_CONN_AGE: Duration = Duration::from_mins(10);

/// A data connection whose stream ended by count both ways, once the server has read all the agent
/// wrote: it says `DataHello` again and waits for the next dial. It is closed instead when the pool
/// already holds [`MAX_IDLE_FACTOR`] times its size, is stopping, or when the connection is older than
/// [`MAX_CONN_AGE`] or presents a certificate that was rotated since.
async fn repark(slot: Slot, mut conn: DialedLink, lineage: Lineage) {
    let Slot { agent, session, stop, counts } = &slot;
    if stop.is_cancelled()
        || agent.draining.load(Ordering::Relaxed)
        || counts.held() >= agent.config.pool_size * MAX_IDLE_FACTOR
        || lineage.born.elapsed() >= MAX_CONN_AGE
        || lineage.generation != agent.tls.generation()
    {
        let _ =
            tokio::time::timeout(agent.config.connect_timeout, tokio::io::AsyncWriteExt::shutdown(&mut conn))
                .await;
        counts.wake.notify_one();
        return;
    }
    let hello = Message::DataHello { version: PROTOCOL_VERSION, session_id: session.id };
    match tokio::time::timeout(agent.config.connect_timeout, codec::write_message(&mut conn, &hello)).await {
        Ok(Ok(())) => {
            agent.metrics.stream.reused.inc();
            parked(&slot, conn, lineage, None).await;
        }
        Ok(Err(error)) => debug!(%error, "data connection failed after its stream"),
        Err(_) => debug!("data connection stalled after its stream"),
    }
}

/// Answers the server's challenge on a data connection; the nonces sign the dial that follows.
async fn prove(agent: &Agent, conn: &mut DialedLink, session: &Session) -> Result<Nonces, Unproven> {
    let exchange = async {
        match codec::read_message(conn).await.map_err(Unproven::Failed)? {
            Message::Challenge { nonce } => {
                // A nonce of our own: a Dial recorded on another connection never verifies on this one.
                let nonces = Nonces { server: nonce, agent: protocol::new_nonce() };
                let proof =
                    Message::DataProof { nonce: nonces.agent, mac: session.key.proof(session.id, &nonces) };
                codec::write_message(conn, &proof).await.map_err(Unproven::Failed)?;
                Ok(nonces)
            }
            Message::Reject { reason } if reason == UNKNOWN_SESSION => Err(Unproven::Misrouted),
            Message::Reject { .. } => Err(Unproven::Failed(CodecError::Invalid("refused by the server"))),
            _ => Err(Unproven::Failed(CodecError::Invalid("challenge"))),
        }
    };
    tokio::time::timeout(agent.config.connect_timeout, exchange)
        .await
        .unwrap_or(Err(Unproven::Failed(CodecError::Io(std::io::ErrorKind::TimedOut.into()))))
}
