//! The agent's control channel: connect and say hello, keep the session with heartbeats (its pool of
//! data connections lives as long as it does), and reconnect with backoff when it ends.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, error, info, info_span, warn};

use super::{Agent, ConnectError, pool};
use crate::codec;
use crate::metrics::inc;
use crate::protocol::{self, DataKey, Message, PROTOCOL_VERSION, SessionId};
use crate::transport::{DialedLink, Link};

/// A control session as its data connections need it.
#[derive(Debug)]
pub(super) struct Session {
    /// Quoted by every data connection.
    pub(super) id: SessionId,
    /// Proves plain data connections and checks the server's dials on them.
    pub(super) key: DataKey,
}

/// Control frames buffered between the reader task and the session loop.
const CONTROL_QUEUE: usize = 16;
/// Heartbeat intervals without a frame from the server after which the channel is considered lost.
const MISSED_HEARTBEATS: u32 = 3;
/// Shortest heartbeat interval the agent follows, whatever the server asks.
const MIN_HEARTBEAT: Duration = Duration::from_millis(100);

/// Keeps a control session with the server until `shutdown` is cancelled, reconnecting with backoff;
/// after a server said it goes away (a planned restart), quickly, without the backoff.
pub(super) async fn run(agent: &Arc<Agent>, shutdown: &CancellationToken) {
    let mut backoff = Backoff::new(agent.config.reconnect);
    let mut planned_until: Option<Instant> = None;
    while !shutdown.is_cancelled() {
        let end = session(agent, shutdown).await;
        match end {
            Ok(SessionEnd::Shutdown) => break,
            Ok(SessionEnd::GoAway(reason)) => {
                backoff.reset();
                planned_until = Some(Instant::now() + RESTART_WINDOW);
                info!(%reason, "server going away: reconnecting at once");
            }
            Ok(SessionEnd::Lost(reason)) => {
                backoff.reset();
                error!(%reason, "control channel lost: reconnecting");
            }
            Err(e) => {
                inc(&agent.metrics.server_conn_failures, "kind", "control");
                warn!(error = %e, "cannot reach the server");
            }
        }
        let delay = match planned_until {
            // A restarting server comes back within moments: try again soon, spread over a short window.
            Some(until) if Instant::now() < until => RESTART_RETRY.mul_f64(fastrand::f64()),
            _ => backoff.delay(),
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// After a server's `GoAway`, how long the agent keeps retrying quickly (a restarted server binds its
/// ports again within moments).
const RESTART_WINDOW: Duration = Duration::from_secs(30);
/// During that window, the longest pause between attempts (each drawn uniformly below it).
const RESTART_RETRY: Duration = Duration::from_millis(200);

/// Capped exponential backoff with full jitter.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new((min, max): (Duration, Duration)) -> Self {
        Self { min, max, next: min }
    }

    fn reset(&mut self) {
        self.next = self.min;
    }

    /// The delay before the next attempt: uniform in [0, next] (full jitter, so that agents that lost
    /// their server together do not return in step), then next doubles up to max.
    fn delay(&mut self) -> Duration {
        let d = self.next.mul_f64(fastrand::f64());
        self.next = (self.next * 2).min(self.max);
        d
    }
}

/// How a control session ended.
enum SessionEnd {
    /// SIGTERM: the agent drains.
    Shutdown,
    /// The server is going away.
    GoAway(String),
    /// The channel failed.
    Lost(String),
}

/// One control session: hello, then heartbeats until it ends. The data-connection pool lives as long
/// as the session.
async fn session(agent: &Arc<Agent>, shutdown: &CancellationToken) -> Result<SessionEnd, ConnectError> {
    let token = agent.token().await?;
    let hello = Message::Hello { version: PROTOCOL_VERSION, identity: agent.config.identity.clone(), token };
    let mut conn = tokio::select! {
        () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        c = agent.connect(&hello, true) => c?,
    };
    let ack = tokio::time::timeout(agent.config.connect_timeout, codec::read_message(&mut conn))
        .await
        .map_err(|_| ConnectError::Timeout(agent.server_addr()))??;
    let (session_id, heartbeat, server_id, server_count) = match ack {
        Message::HelloAck { version, server_id, server_count, session_id, heartbeat_ms }
            if protocol::check_version(version).is_ok() =>
        {
            (
                session_id,
                Duration::from_millis(heartbeat_ms.into()).max(MIN_HEARTBEAT),
                server_id,
                server_count,
            )
        }
        Message::HelloAck { version, .. } => {
            let reason = protocol::check_version(version).expect_err("the arm above took matching versions");
            return Err(ConnectError::Rejected(reason));
        }
        Message::Reject { reason } => return Err(ConnectError::Rejected(reason)),
        other => return Err(ConnectError::Unexpected(other.kind())),
    };
    let Link::Tls(tls) = &conn else { unreachable!("the control channel is always TLS") };
    let key = crate::transport::tls::data_key(tls.get_ref().1, session_id).map_err(ConnectError::DataKey)?;
    let session = Session { id: session_id, key };
    let span = info_span!("session", id = %session_id.label(), server = %server_id);
    async move {
        info!(server_count, heartbeat = ?heartbeat, "connected to server");
        agent.metrics.control_connected.set(1);
        let pool_stop = CancellationToken::new();
        let pool = tokio::spawn(pool::run(agent.clone(), Arc::new(session), pool_stop.clone()));
        let end = heartbeats(agent, conn, heartbeat, shutdown).await;
        agent.metrics.control_connected.set(0);
        pool_stop.cancel();
        let _ = pool.await;
        Ok(end)
    }
    .instrument(span)
    .await
}

async fn heartbeats(
    agent: &Agent,
    conn: DialedLink,
    heartbeat: Duration,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let (rd, mut wr) = tokio::io::split(conn);
    let (reader, mut rx) = codec::spawn_reader(rd, CONTROL_QUEUE);
    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut nonce = 0u64;
    let end = loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                agent.draining.store(true, Ordering::Relaxed);
                let _ = codec::write_message(&mut wr, &Message::Drain).await;
                break SessionEnd::Shutdown;
            }
            _ = ticker.tick() => {
                if last_heard.elapsed() > heartbeat * MISSED_HEARTBEATS {
                    break SessionEnd::Lost(format!("no answer from the server for {:?}", last_heard.elapsed()));
                }
                nonce += 1;
                if let Err(e) = codec::write_message(&mut wr, &Message::Ping { nonce }).await {
                    break SessionEnd::Lost(e.to_string());
                }
            }
            msg = rx.recv() => {
                last_heard = Instant::now();
                match msg {
                    None => break SessionEnd::Lost("reader ended".into()),
                    Some(Err(e)) => break SessionEnd::Lost(e.to_string()),
                    Some(Ok(Message::Pong { .. })) => {}
                    Some(Ok(Message::Ping { nonce })) => {
                        if let Err(e) = codec::write_message(&mut wr, &Message::Pong { nonce }).await {
                            break SessionEnd::Lost(e.to_string());
                        }
                    }
                    Some(Ok(Message::GoAway { reason })) => break SessionEnd::GoAway(reason),
                    Some(Ok(Message::Reject { reason })) => break SessionEnd::Lost(format!("server refused: {reason}")),
                    Some(Ok(other)) => break SessionEnd::Lost(format!("unexpected control frame {}", other.kind())),
                }
            }
        }
    };
    reader.abort();
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_full_jitter_up_to_the_cap() {
        let mut b = Backoff::new((Duration::from_millis(100), Duration::from_secs(1)));
        // Each attempt's delay is uniform below its cap: 100, 200, 400, 800 ms, then 1 s for good.
        let caps = [100, 200, 400, 800, 1000, 1000, 1000, 1000].map(Duration::from_millis);
        for cap in caps {
            assert!(b.delay() <= cap);
        }
        // Spread over the whole range, not bunched at its top (1,000 agents must not return in step).
        let samples: Vec<Duration> = (0..1000).map(|_| b.delay()).collect();
        let low = samples.iter().filter(|d| **d < Duration::from_millis(250)).count();
        assert!((150..350).contains(&low), "{low} of 1000 below a quarter of the cap");
        b.reset();
        assert!(b.delay() <= Duration::from_millis(100));
    }
}
