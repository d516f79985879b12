//! The pool of data connections parked at the server. Each one waits for a single `Dial`; when it is
//! taken, a replacement is dialed at once, so the pool refills ahead of demand and no TLS handshake
//! (resumed, thanks to the shared client session cache) sits on a request's path.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, info_span, warn};

use super::Agent;
use super::control::Session;
use crate::codec::{self, CodecError};
use crate::metrics::inc;
use crate::protocol::{Message, NONCE_LEN, PROTOCOL_VERSION, UNKNOWN_SESSION};
use crate::transport::{DialedLink, Stream as _};

/// Pause after a data connection failed before it is replaced (keeps a broken server from being
/// hammered; the control channel's own backoff handles outages).
const FAILED_CONN_PAUSE: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Counts {
    idle: AtomicUsize,
    dialing: AtomicUsize,
    /// Data connections in a row that a load balancer sent to another replica than the session's.
    misrouted: AtomicUsize,
    wake: Notify,
}

/// Misrouted data connections in a row replaced at once; past it, with the usual pause.
const MAX_MISROUTED: usize = 16;

/// Keeps `pool_size` data connections parked for `session` until `stop` is cancelled.
pub(super) async fn run(agent: Arc<Agent>, session: Arc<Session>, stop: CancellationToken) {
    let counts = Arc::new(Counts::default());
    loop {
        while counts.idle.load(Ordering::Acquire) + counts.dialing.load(Ordering::Acquire)
            < agent.config.pool_size
        {
            counts.dialing.fetch_add(1, Ordering::AcqRel);
            tokio::spawn(data_conn(agent.clone(), counts.clone(), session.clone(), stop.clone()));
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
pub(super) struct Refill(Arc<Counts>);

impl Drop for Refill {
    fn drop(&mut self) {
        self.0.wake.notify_one();
    }
}

/// Counts a data connection as dialing from its spawn until it parks or fails, so that the pool never
/// sees it in neither count (and dials a replacement for one still on its way).
struct Dialing<'a>(&'a Counts);

impl Drop for Dialing<'_> {
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

/// One data connection: dial, park, wait for a dial, hand over to the stream.
async fn data_conn(agent: Arc<Agent>, counts: Arc<Counts>, session: Arc<Session>, stop: CancellationToken) {
    let dialing = Dialing(&counts);
    let hello = Message::DataHello { version: PROTOCOL_VERSION, session_id: session.id };
    let connected = tokio::select! {
        () = stop.cancelled() => return,
        c = agent.connect(&session.data_addr, &hello, agent.config.tunnel_tls == super::config::TunnelTls::On) => c,
    };
    let mut conn = match connected {
        Ok(conn) => conn,
        Err(error) => {
            drop(dialing);
            inc(&agent.metrics.server_conn_failures, "kind", "data");
            debug!(%error, "data connection failed");
            return pause_then_wake(&counts, &stop).await;
        }
    };
    // A data connection without a certificate of the node (plain, or with a token credential)
    // answers the server's challenge with the session's data key.
    let nonce = if agent.proves_data_conns(&conn) {
        match prove(&agent, &mut conn, &session).await {
            Ok(nonce) => Some(nonce),
            Err(Unproven::Misrouted) => {
                drop(dialing);
                return replace_misrouted(&counts, &stop).await;
            }
            Err(Unproven::Failed(error)) => {
                drop(dialing);
                inc(&agent.metrics.server_conn_failures, "kind", "data");
                debug!(%error, "data connection not admitted");
                return pause_then_wake(&counts, &stop).await;
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
    // A taken connection is replaced once its stream has replied (see `Refill`); any other end of an
    // idle one, at once.
    if !matches!(first, Some(Ok(Message::Dial { .. }))) {
        counts.wake.notify_one();
    }
    match first {
        None => {}
        Some(Ok(Message::Dial { stream_id, host, port, timeout_ms, mac }))
            if nonce.is_some_and(|n| {
                !session.key.verify_dial(&n, (stream_id, &host, port, timeout_ms), &mac)
            }) =>
        {
            warn!(dest = %format_args!("{host}:{port}"), "a Dial that is not the server's: refused");
            inc(&agent.metrics.server_conn_failures, "kind", "forged_dial");
            conn.abort();
            pause_then_wake(&counts, &stop).await;
        }
        Some(Ok(Message::Dial { stream_id, host, port, timeout_ms, .. })) => {
            counts.misrouted.store(0, Ordering::Release);
            let span = info_span!("stream", id = stream_id, dest = %format_args!("{host}:{port}"));
            let a = agent.clone();
            let refill = Refill(counts.clone());
            agent.streams.spawn(
                async move { super::stream::serve(&a, conn, stream_id, &host, port, timeout_ms, refill).await }
                    .instrument(span),
            );
        }
        Some(Ok(Message::Reject { reason })) if reason == UNKNOWN_SESSION => {
            replace_misrouted(&counts, &stop).await;
        }
        Some(Ok(Message::Reject { reason })) => {
            warn!(%reason, "server refused a data connection");
            pause_then_wake(&counts, &stop).await;
        }
        Some(Ok(other)) => {
            warn!(kind = other.kind(), "unexpected frame on an idle data connection");
            pause_then_wake(&counts, &stop).await;
        }
        Some(Err(CodecError::Closed)) => {
            debug!("server closed an idle data connection");
            pause_then_wake(&counts, &stop).await;
        }
        Some(Err(error)) => {
            debug!(%error, "idle data connection failed");
            pause_then_wake(&counts, &stop).await;
        }
    }
}

/// Answers the server's challenge on a data connection; the nonce signs the dial that follows.
async fn prove(agent: &Agent, conn: &mut DialedLink, session: &Session) -> Result<[u8; NONCE_LEN], Unproven> {
    let exchange = async {
        match codec::read_message(conn).await.map_err(Unproven::Failed)? {
            Message::Challenge { nonce } => {
                let proof = Message::DataProof { mac: session.key.proof(session.id, &nonce) };
                codec::write_message(conn, &proof).await.map_err(Unproven::Failed)?;
                Ok(nonce)
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
