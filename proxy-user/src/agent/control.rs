//! The agent's control channels: one to each distinct server replica. A sync loop dials the configured
//! addresses (load balancers or replicas) until it holds a control session with as many replicas as the
//! servers say there are, dropping a connection that lands on a replica it already holds; each session
//! keeps heartbeats and its own pool of data connections, and when one ends the loop dials again (at
//! once after a `GoAway`, a planned restart; with backoff after a failure).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, error, info, info_span, warn};

use super::config::ServerAddr;
use super::{Agent, ConnectError, pool};
use crate::codec;
use crate::metrics::inc;
use crate::protocol::{self, DataKey, Message, PROTOCOL_VERSION, SessionId};
use crate::transport::DialedLink;
use crate::transport::counted::Ends;

/// A control session as its data connections need it.
#[derive(Debug)]
pub(super) struct Session {
    /// Quoted by every data connection.
    pub(super) id: SessionId,
    /// Proves plain data connections and checks the server's dials on them.
    pub(super) key: DataKey,
    /// Where its data connections go: the replica's advertised address, or the control channel's.
    pub(super) data_addr: ServerAddr,
    /// Its counted stream ends (TLS data connections carry one stream after another).
    pub(super) ends: Arc<Ends>,
    /// Set when the server said a successor took its place (`Moving`): the session serves what it
    /// has until the server ends it, and its pool dials no new connections.
    pub(super) leaving: AtomicBool,
}

/// Control frames buffered between the reader task and the session loop.
const CONTROL_QUEUE: usize = 16;
/// Heartbeat intervals without a frame from the server after which the channel is considered lost.
const MISSED_HEARTBEATS: u32 = 3;
/// Shortest heartbeat interval the agent follows, whatever the server asks.
const MIN_HEARTBEAT: Duration = Duration::from_millis(100);
/// With every replica held, how often the loop looks again anyway.
const SYNC_INTERVAL: Duration = Duration::from_secs(10);
/// Connections in a row that landed on replicas already held, past which the loop backs off (the
/// servers may count more replicas than answer).
const MAX_DUPLICATES: u32 = 8;

/// The replicas held, shared by the sync loop and the sessions.
#[derive(Default)]
struct Held {
    /// Server id → the replica count it last told, and the session holding it (a token from `next`):
    /// a session that moved to a successor process of its server no longer holds the entry.
    replicas: Mutex<HashMap<String, (u16, u64)>>,
    /// Tokens of sessions.
    next: AtomicU64,
    /// Woken when a session ends or a count changes.
    changed: Notify,
    /// Set by a session that ended with `GoAway`: the loop retries at once for a while.
    planned_until: Mutex<Option<Instant>>,
}

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u16, u64)>> {
        self.replicas.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// (held, wanted): the replicas held, and the most any of them says there are (1 with none held).
    fn counts(&self) -> (usize, usize) {
        let replicas = self.lock();
        let wanted = replicas.values().map(|(count, _)| *count).max().map_or(1, usize::from).max(1);
        (replicas.len(), wanted)
    }

    /// Holds `server_id` for a new session; its token.
    fn insert(&self, server_id: String, count: u16) -> u64 {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(server_id, (count, token));
        token
    }

    /// Lets go of `server_id` if the session `token` holds it; wakes the sync loop.
    fn release(&self, server_id: &str, token: u64) {
        let mut replicas = self.lock();
        if replicas.get(server_id).is_some_and(|(_, t)| *t == token) {
            replicas.remove(server_id);
        }
        drop(replicas);
        self.changed.notify_one();
    }

    /// Retries at once for a while: the server restarts (`GoAway`) or moves (`Moving`).
    fn plan_reconnect(&self) {
        *self.planned_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(Instant::now() + RESTART_WINDOW);
    }
}

/// Keeps control sessions with every server replica until `shutdown` is cancelled.
pub(super) async fn run(agent: &Arc<Agent>, shutdown: &CancellationToken) {
    let held = Arc::new(Held::default());
    let mut sessions = tokio::task::JoinSet::new();
    let mut backoff = Backoff::new(agent.config.reconnect);
    let mut next = 0usize;
    let mut duplicates = 0u32;
    let mut last_wanted = 1usize;
    loop {
        let (have, wanted) = held.counts();
        let wanted = if have == 0 { last_wanted } else { wanted };
        last_wanted = wanted;
        agent.metrics.server_count.set(i64::try_from(wanted).unwrap_or(i64::MAX));
        agent.metrics.control_connected.set(i64::try_from(have).unwrap_or(i64::MAX));
        if have >= wanted {
            duplicates = 0;
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = held.changed.notified() => {}
                () = tokio::time::sleep(SYNC_INTERVAL) => {}
                Some(_) = sessions.join_next() => {}
            }
            continue;
        }
        let server = agent.config.servers[next % agent.config.servers.len()].clone();
        next += 1;
        let ids: Vec<String> = held.lock().keys().cloned().collect();
        let opened = tokio::select! {
            () = shutdown.cancelled() => break,
            opened = open(agent, &server, ids) => opened,
        };
        let delay = match opened {
            Ok(Some(opened)) => {
                let token = held.insert(opened.server_id.clone(), opened.server_count);
                agent.metrics.standby.set(0);
                backoff.reset();
                duplicates = 0;
                let (agent, held, shutdown) = (agent.clone(), held.clone(), shutdown.clone());
                sessions.spawn(async move { serve(&agent, opened, &held, token, &shutdown).await });
                continue;
            }
            Ok(None) => {
                // A load balancer sent us to a replica we hold already: try again shortly.
                debug!(via = %server, "reached a replica already held");
                duplicates += 1;
                if duplicates < MAX_DUPLICATES {
                    RETRY_SOON.mul_f64(fastrand::f64())
                } else {
                    backoff.delay()
                }
            }
            Err(ConnectError::IdentityHeld) => {
                // Another live agent holds this node's sessions: stand by, and take over once it
                // drains or goes silent (the server decides, at each try).
                if agent.metrics.standby.get() == 0 {
                    warn!(server = %server, "another live agent holds this node's identity: standing by");
                }
                agent.metrics.standby.set(i64::from(have == 0));
                inc(&agent.metrics.server_conn_failures, "kind", "standby");
                STANDBY_RETRY.mul_f64(0.5 + fastrand::f64())
            }
            Err(e) => {
                agent.metrics.standby.set(0);
                inc(&agent.metrics.server_conn_failures, "kind", "control");
                warn!(error = %e, server = %server, "cannot reach the server");
                let planned = held
                    .planned_until
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .is_some_and(|t| Instant::now() < t);
                // A restarting server comes back within moments: try again soon.
                if planned { RETRY_SOON.mul_f64(fastrand::f64()) } else { backoff.delay() }
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    // Each session sends `Drain` and lets its pool go.
    while sessions.join_next().await.is_some() {}
    agent.metrics.control_connected.set(0);
}

/// A control channel that the server accepted.
struct Opened {
    conn: DialedLink,
    server_id: String,
    server_count: u16,
    heartbeat: Duration,
    session: Session,
    /// Counted-end frames for the control channel.
    end_frames: mpsc::Receiver<Box<Message>>,
}

/// Connects to `server` and says hello, naming the replicas `held` already; the server's answer
/// (`Ok(None)`: a replica among them).
async fn open(
    agent: &Arc<Agent>,
    server: &ServerAddr,
    held: Vec<String>,
) -> Result<Option<Opened>, ConnectError> {
    let token = agent.token().await?;
    let identity = agent.config.identity.clone();
    let hello = Message::Hello { version: PROTOCOL_VERSION, identity, token, held };
    let mut conn = agent.connect(server, &hello, true, false).await?;
    if let crate::transport::Link::Tls(tls) = &mut conn {
        tls.small_reads();
    }
    let ack = tokio::time::timeout(agent.config.connect_timeout, codec::read_message(&mut conn))
        .await
        .map_err(|_| ConnectError::Timeout(server.to_string()))??;
    let (session_id, heartbeat_ms, server_id, server_count, data_addr, data_key) = match ack {
        Message::HelloAck {
            version,
            server_id,
            server_count,
            session_id,
            heartbeat_ms,
            data_addr,
            data_key,
        } if protocol::check_version(version).is_ok() => {
            (session_id, heartbeat_ms, server_id, server_count, data_addr, data_key)
        }
        Message::HelloAck { version, .. } => {
            let reason = protocol::check_version(version).expect_err("the arm above took matching versions");
            return Err(ConnectError::Rejected(reason));
        }
        Message::Reject { reason } if reason == protocol::ALREADY_HELD => return Ok(None),
        Message::Reject { reason } if reason == protocol::IDENTITY_HELD => {
            return Err(ConnectError::IdentityHeld);
        }
        Message::Reject { reason } => return Err(ConnectError::Rejected(reason)),
        other => return Err(ConnectError::Unexpected(other.kind())),
    };
    let data_addr = if data_addr.is_empty() {
        server.clone()
    } else {
        ServerAddr::parse(&data_addr, server.port).map_err(|_| {
            ConnectError::Rejected(format!("the server named a bad data address {data_addr:?}"))
        })?
    };
    let key = DataKey::new(&data_key.0);
    let (ends, end_frames) = Ends::new();
    Ok(Some(Opened {
        conn,
        server_id,
        server_count,
        heartbeat: Duration::from_millis(heartbeat_ms.into()).max(MIN_HEARTBEAT),
        session: Session { id: session_id, key, data_addr, ends, leaving: AtomicBool::new(false) },
        end_frames,
    }))
}

/// Serves one control session (holding its server id with `token`) until it ends: heartbeats, with
/// the session's pool of data connections.
async fn serve(agent: &Arc<Agent>, opened: Opened, held: &Held, token: u64, shutdown: &CancellationToken) {
    let Opened { conn, server_id, server_count, heartbeat, session, end_frames } = opened;
    let span = info_span!("session", id = %session.id.label(), server = %server_id);
    async {
        info!(server_count, heartbeat = ?heartbeat, data = %session.data_addr, "connected to server");
        let pool_stop = CancellationToken::new();
        let session = Arc::new(session);
        let pool = tokio::spawn(pool::run(agent.clone(), session.clone(), pool_stop.clone()));
        let channel = Channel { conn, heartbeat, ends: &session.ends, end_frames };
        let end = heartbeats(agent, channel, shutdown, |told| match told {
            Told::Count(count) => {
                if let Some((c, _)) = held.lock().get_mut(&server_id).filter(|(_, t)| *t == token) {
                    *c = count;
                }
                info!(count, "the servers count changed");
                held.changed.notify_one();
            }
            Told::Moving(reason) => {
                // The successor answers at the same address: a new session there holds this server id
                // while this one serves its streams until the server ends it.
                session.leaving.store(true, Ordering::Release);
                held.plan_reconnect();
                held.release(&server_id, token);
                info!(%reason, "server moving to a successor: opening a session to it");
            }
        })
        .await;
        session.ends.close();
        pool_stop.cancel();
        let _ = pool.await;
        match &end {
            SessionEnd::Shutdown => {}
            SessionEnd::GoAway(reason) if session.leaving.load(Ordering::Acquire) => {
                info!(%reason, "the server that moved went away");
            }
            SessionEnd::GoAway(reason) => {
                held.plan_reconnect();
                info!(%reason, "server going away: reconnecting at once");
            }
            SessionEnd::Lost(reason) => error!(%reason, "control channel lost: reconnecting"),
        }
        held.release(&server_id, token);
    }
    .instrument(span)
    .await;
}

/// After a server's `GoAway`, how long the agent keeps retrying quickly (a restarted server binds its
/// ports again within moments).
const RESTART_WINDOW: Duration = Duration::from_secs(30);
/// During that window, and after landing on a replica already held, the longest pause before the next
/// attempt (each drawn uniformly below it).
const RETRY_SOON: Duration = Duration::from_millis(200);

/// While another live agent holds the identity, the mean pause between tries (drawn from half to one
/// and a half of it): the longest a rollout's new pod leaves the node unserved after the old one drains.
const STANDBY_RETRY: Duration = Duration::from_secs(1);

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

/// What a server told a session, for its holder.
enum Told {
    /// The number of replicas changed.
    Count(u16),
    /// A successor process took the server's place (`Moving`).
    Moving(String),
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

/// A control channel as the session loop runs it.
struct Channel<'a> {
    conn: DialedLink,
    heartbeat: Duration,
    /// The session's counted ends: frames to send, and where the server's go.
    ends: &'a Ends,
    end_frames: mpsc::Receiver<Box<Message>>,
}

/// Heartbeats on a control channel until it ends, with the counted ends of its streams; `on_told`
/// hears the servers' new replica counts and a move to a successor.
async fn heartbeats(
    agent: &Agent,
    channel: Channel<'_>,
    shutdown: &CancellationToken,
    on_told: impl Fn(Told),
) -> SessionEnd {
    let Channel { conn, heartbeat, ends, mut end_frames } = channel;
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
            Some(frame) = end_frames.recv() => {
                if let Err(e) = codec::write_message(&mut wr, &frame).await {
                    break SessionEnd::Lost(e.to_string());
                }
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
                match msg.map(|m| m.map(|m| *m)) {
                    None => break SessionEnd::Lost("reader ended".into()),
                    Some(Err(e)) => break SessionEnd::Lost(e.to_string()),
                    Some(Ok(Message::Pong { .. })) => {}
                    Some(Ok(Message::Ping { nonce })) => {
                        if let Err(e) = codec::write_message(&mut wr, &Message::Pong { nonce }).await {
                            break SessionEnd::Lost(e.to_string());
                        }
                    }
                    Some(Ok(Message::GoAway { reason })) => break SessionEnd::GoAway(reason),
                    Some(Ok(Message::ServerCount { count })) => on_told(Told::Count(count)),
                    Some(Ok(Message::Moving { reason })) => on_told(Told::Moving(reason)),
                    Some(Ok(Message::StreamEnd { stream_id, bytes })) => ends.told_end(stream_id, bytes),
                    Some(Ok(Message::StreamEndRead { stream_id })) => ends.told_read(stream_id),
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
