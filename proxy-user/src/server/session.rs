//! The agent listener's side of each agent connection: its set-up (TLS, or plain for a data connection
//! the server allows), then a control session, or a data connection parked for a dial.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument as _, debug, error, info, info_span, warn};

use super::config::AgentAuth;
use super::registry::{AgentHandle, Credential, ParkError, Parked, Routes};
use super::{Server, trust};
use crate::codec::{self, CodecError};
use crate::metrics::inc;
use crate::protocol::{self, DataKey, Identity, KeyBytes, Message, Nonces, PROTOCOL_VERSION, SessionId};
use crate::transport::accept::Accepted;
use crate::transport::counted::Ends;
use crate::transport::handshake;
use crate::transport::role;
use crate::transport::tls::HandshakeError;
use crate::transport::{self, AcceptedLink, Link};

/// Control frames buffered between the reader task and the session loop.
const CONTROL_QUEUE: usize = 16;
/// Heartbeat intervals without any frame after which an agent is considered gone.
const MISSED_HEARTBEATS: u32 = 3;
/// How long a session whose identity a newer claimant asks for has to answer a `Ping` to keep it.
const IDENTITY_PROBE: std::time::Duration = std::time::Duration::from_secs(2);
/// How often refusals of claimants of one held identity are logged at warn level (each is counted).
const REFUSAL_LOG_EVERY: std::time::Duration = std::time::Duration::from_mins(1);

/// Serves one connection on the agent listener. Its budget permit is held only through the set-up.
pub(super) async fn serve(server: Arc<Server>, acceptor: TlsAcceptor, accepted: Accepted<TcpStream>) {
    let deadline = accepted.at + server.config.limits.handshake_timeout;
    let first = establish(&server, accepted.conn, &acceptor, deadline).await;
    drop(accepted.permit);
    let (mut conn, first) = match first {
        Ok(established) => established,
        Err(reason) => return inc(&server.metrics.agent_conn_failures, "reason", reason),
    };
    let version = match &first {
        Message::Hello { version, .. } | Message::DataHello { version, .. } => *version,
        other => {
            warn!(kind = other.kind(), "agent connection opened with an unexpected frame");
            inc(&server.metrics.agent_conn_failures, "reason", "protocol");
            return reject(&mut conn, "first frame must be Hello or DataHello").await;
        }
    };
    if let Err(reason) = protocol::check_version(version) {
        inc(&server.metrics.agent_conn_failures, "reason", "version");
        return reject(&mut conn, &reason).await;
    }
    match first {
        Message::Hello { .. } if server.superseded.is_cancelled() => {
            inc(&server.metrics.agent_conn_failures, "reason", "superseded");
            reject(&mut conn, protocol::SUPERSEDED).await;
        }
        Message::Hello { held, .. } if held.contains(&server.config.server_id) => {
            // A load balancer sent an agent to a replica it holds already: keep the session it has.
            debug!("agent reached a replica it holds already");
            reject(&mut conn, protocol::ALREADY_HELD).await;
        }
        Message::Hello { .. } if conn.peer_expired(std::time::SystemTime::now()) => {
            refuse_expired(&server, &mut conn).await;
        }
        Message::Hello { identity, token, .. } => {
            match trust::admit(&server, &conn, &identity, &token, deadline).await {
                Ok(admitted) => {
                    let routes = Routes::of(&identity, admitted.facts.as_deref());
                    control(server, conn, identity, routes, admitted.credential).await;
                }
                Err(refusal) => {
                    warn!(agent = %identity.agent_id, node = %identity.node_name, reason = %refusal.message, "agent refused");
                    inc(&server.metrics.agent_conn_failures, "reason", refusal.label);
                    reject(&mut conn, &refusal.message).await;
                }
            }
        }
        Message::DataHello { session_id, .. } => park(&server, conn, session_id, deadline).await,
        _ => unreachable!("other first frames were refused above"),
    }
}

/// TLS handshake (or, where allowed, a plain data connection) and first frame, by `deadline`. A control
/// channel is always TLS.
async fn establish(
    server: &Server,
    stream: TcpStream,
    acceptor: &TlsAcceptor,
    deadline: Instant,
) -> Result<(AcceptedLink, Message), &'static str> {
    let setup = async move {
        if let Err(error) = transport::tune_link(&stream, server.config.limits.tcp_user_timeout) {
            debug!(%error, "tune agent socket");
        }
        let mut first_byte = [0u8; 1];
        if stream.peek(&mut first_byte).await.map_err(|_| "protocol")? == 0 {
            return Err("protocol");
        }
        let mut conn = if first_byte[0] == transport::TLS_HANDSHAKE_RECORD {
            match handshake::accept(acceptor.config().clone(), stream, deadline, server.datapath.kernel_tls())
                .await
            {
                Ok((conn, _)) => Link::Tls(Box::new(conn)),
                Err(HandshakeError::Timeout) => return Err("timeout"),
                // An agent that gave up on the connection (its session was replaced, it is stopping):
                // routine in a reconnect storm, so not worth a warning each.
                Err(HandshakeError::Failed(e)) if peer_left(&e) => {
                    debug!(error = %e, "agent closed its connection during the TLS handshake");
                    return Err("closed_early");
                }
                Err(error) => {
                    warn!(%error, "agent TLS handshake failed");
                    return Err("tls_handshake");
                }
            }
        } else if server.config.allow_plaintext_tunnel {
            Link::Plain(stream)
        } else {
            warn!("plaintext agent connection refused (--allow-plaintext-tunnel is off)");
            return Err("plaintext_refused");
        };
        let first = codec::read_message(&mut conn).await.map_err(|error| match &error {
            CodecError::Io(e) if role::is_tls_violation(e) => {
                warn!(%error, "agent connection broke TLS's rules and was cut off");
                "tls_records"
            }
            CodecError::Closed => {
                debug!("agent closed its connection before its first frame");
                "closed_early"
            }
            CodecError::Io(e) if peer_left(e) => {
                debug!(%error, "agent closed its connection before its first frame");
                "closed_early"
            }
            _ => {
                warn!(%error, "agent sent no valid first frame");
                "protocol"
            }
        })?;
        if matches!((&conn, &first), (Link::Plain(_), Message::Hello { .. })) {
            warn!("control channel refused: it must use TLS");
            reject(&mut conn, "the control channel requires TLS").await;
            return Err("plaintext_refused");
        }
        Ok((conn, first))
    };
    let established = tokio::time::timeout_at(deadline, setup).await.unwrap_or(Err("timeout"));
    if matches!(established, Err("timeout")) {
        warn!("agent connection set-up timed out");
    }
    established
}

/// Refuses a connection whose client certificate expired (TLS resumption carries a certificate past
/// its end, which no handshake checks again).
async fn refuse_expired(server: &Server, conn: &mut AcceptedLink) {
    warn!(
        node = conn.peer_node().unwrap_or("-"),
        "agent connection refused: its client certificate has expired"
    );
    inc(&server.metrics.agent_conn_failures, "reason", "certificate_expired");
    reject(conn, "the client certificate has expired").await;
}

/// Whether `e` says the peer went away (closed or reset the connection), not that it misbehaved.
fn peer_left(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    matches!(e.kind(), UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe)
}

/// Closes a parked data connection its agent's pool no longer needs, telling the agent why.
async fn close_surplus(mut conn: AcceptedLink) {
    let close = async {
        reject(&mut conn, protocol::PARK_SURPLUS).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut conn).await;
    };
    let _ = tokio::time::timeout(SURPLUS_CLOSE_TIMEOUT, close).await;
}

/// How long closing a surplus parked connection may take.
const SURPLUS_CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

async fn reject(conn: &mut AcceptedLink, reason: &str) {
    let _ = codec::write_message(conn, &Message::Reject { reason: reason.to_owned() }).await;
}

/// Parks a data connection that quoted `session_id` (its first frame, or the `DataHello` an agent sends
/// on a connection whose stream ended by count), after its checks, by `deadline`.
pub(super) async fn park(server: &Server, mut conn: AcceptedLink, session_id: SessionId, deadline: Instant) {
    // Checked at every park: a resumed handshake carries the first one's certificate on.
    if conn.peer_expired(std::time::SystemTime::now()) {
        return refuse_expired(server, &mut conn).await;
    }
    let Some(agent) = server.agents.session(session_id) else {
        inc(&server.metrics.agent_conn_failures, "reason", "unknown_session");
        return reject(&mut conn, protocol::UNKNOWN_SESSION).await;
    };
    // With node certificates, a TLS data connection joins only a session of the node it proves to be.
    // (A plain one has no certificate: it is bound by the session id alone.)
    if server.config.agent_auth == AgentAuth::NodeCert
        && matches!(conn, Link::Tls(_))
        && conn.peer_node() != Some(agent.identity.node_name.as_str())
    {
        warn!(session_node = %agent.identity.node_name, "data connection from another node's certificate refused");
        inc(&server.metrics.agent_conn_failures, "reason", "identity_mismatch");
        return reject(&mut conn, "the certificate is not the session's node's").await;
    }
    // A data connection without a node certificate (plain, or with token authentication) proves it
    // holds the session's data key, which never crossed the wire, by answering a fresh challenge.
    let nonces = if matches!(conn, Link::Plain(_)) || server.config.agent_auth == AgentAuth::Token {
        let nonce = protocol::new_nonce();
        let answer = async {
            codec::write_message(&mut conn, &Message::Challenge { nonce }).await?;
            codec::read_message(&mut conn).await
        };
        let proven = match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(Message::DataProof { nonce: agent_nonce, mac })) => {
                let nonces = Nonces { server: nonce, agent: agent_nonce };
                agent.data_key.verify_proof(session_id, &nonces, &mac).then_some(nonces)
            }
            _ => None,
        };
        let Some(nonces) = proven else {
            warn!(agent = %agent.identity.agent_id, "data connection without a valid proof refused");
            inc(&server.metrics.agent_conn_failures, "reason", "bad_proof");
            return reject(&mut conn, "no valid proof of the session's data key").await;
        };
        Some(nonces)
    } else {
        None
    };
    if let Link::Tls(tls) = &mut conn {
        tls.park();
    }
    match agent.park(Parked { conn, nonces }) {
        Ok(()) => {}
        Err((ParkError::Full, _)) => {
            inc(&server.metrics.agent_conn_failures, "reason", "pool_full");
            debug!(agent = %agent.identity.agent_id, "data connection refused: pool full");
        }
        Err((ParkError::ServerFull, mut parked)) => {
            inc(&server.metrics.agent_conn_failures, "reason", "server_pool_full");
            debug!(agent = %agent.identity.agent_id, "data connection refused: the server's pool is full");
            reject(&mut parked.conn, protocol::SERVER_POOL_FULL).await;
        }
        Err((ParkError::Closed, _)) => inc(&server.metrics.agent_conn_failures, "reason", "draining"),
    }
}

async fn control(
    server: Arc<Server>,
    mut conn: AcceptedLink,
    identity: Identity,
    routes: Routes,
    credential: Credential,
) {
    let limits = &server.config.limits;
    if identity.agent_id.is_empty() {
        inc(&server.metrics.agent_conn_failures, "reason", "protocol");
        return reject(&mut conn, "empty agent id").await;
    }
    if server.agents.len() >= limits.max_agents && !server.agents.contains(&identity.agent_id) {
        inc(&server.metrics.agent_conn_failures, "reason", "max_agents");
        return reject(&mut conn, "server is at its agent limit").await;
    }
    let Link::Tls(tls) = &mut conn else {
        inc(&server.metrics.agent_conn_failures, "reason", "protocol");
        return reject(&mut conn, "a control channel must use TLS").await;
    };
    tls.small_reads();
    let session_id = SessionId::random();
    let heartbeat_ms = u32::try_from(limits.heartbeat_interval.as_millis()).unwrap_or(u32::MAX);
    let key = KeyBytes::random();
    let data_key = DataKey::new(&key.0);
    let ack = Message::HelloAck {
        version: PROTOCOL_VERSION,
        server_id: server.config.server_id.clone(),
        server_count: *server.replicas.borrow(),
        session_id,
        heartbeat_ms,
        data_addr: server.config.advertise_address.clone(),
        data_key: key,
    };
    let (ends, end_frames) = Ends::new();
    let agent = Arc::new(
        AgentHandle::new(
            identity,
            session_id,
            data_key,
            limits.max_streams_per_agent,
            server.parking.clone(),
            ends,
        )
        .with_credential(credential),
    );
    // Fencing: a live session keeps its identity; a newer claimant takes over only from one that is
    // gone, draining or silent. Registered before the ack, so that data connections find the session.
    let holder = server.agents.get(&agent.identity.agent_id);
    let live = match &holder {
        Some(old) => {
            old.holds_identity(IDENTITY_PROBE.min(limits.heartbeat_interval)).await.then_some(old.clone())
        }
        None => None,
    };
    let registered = match live {
        Some(old) => Err(old),
        None => server.agents.register(&agent, routes, holder.map(|h| h.session_id)),
    };
    match registered {
        Ok(Some(old)) => {
            info!(agent = %agent.identity.agent_id, "agent reconnected: replacing its earlier session, which was gone, draining or silent");
            old.end("replaced by a newer session");
            old.drop_idle();
        }
        Ok(None) => {}
        Err(holder) => {
            if holder.log_refusal(REFUSAL_LOG_EVERY) {
                warn!(
                    agent = %agent.identity.agent_id,
                    "a second live claimant of this agent's identity refused: the session it holds answers \
                     (two agents with one node's identity, or a rollout's new pod before the old one drains); \
                     counted in agent_conn_failures_total{{reason=\"identity_in_use\"}}, logged once a minute"
                );
            } else {
                debug!(agent = %agent.identity.agent_id, "second live claimant of the identity refused");
            }
            inc(&server.metrics.agent_conn_failures, "reason", "identity_in_use");
            return reject(&mut conn, protocol::IDENTITY_HELD).await;
        }
    }
    if let Err(error) = codec::write_message(&mut conn, &ack).await {
        warn!(%error, "agent left during hello");
        server.agents.unregister(&agent);
        return;
    }
    server.metrics.agents_connected.set(i64::try_from(server.agents.len()).unwrap_or(i64::MAX));
    let span = info_span!("agent", id = %agent.identity.agent_id, session = %session_id.label());
    async {
        info!(node = %agent.identity.node_name, addresses = ?agent.identity.addresses, cidrs = ?agent.identity.cidrs, "agent connected");
        let reason = session(&server, conn, &agent, end_frames).await;
        agent.ends.close();
        server.agents.unregister(&agent);
        agent.gone.cancel();
        agent.drop_idle();
        server.metrics.agents_connected.set(i64::try_from(server.agents.len()).unwrap_or(i64::MAX));
        match reason {
            Ok(why) => info!(why, "agent session ended"),
            Err(e) => error!(error = %e, "agent control channel lost"),
        }
    }
    .instrument(span)
    .await;
}

/// Runs a control session until it ends; `Ok` for an orderly end, `Err` for a lost channel.
async fn session(
    server: &Server,
    conn: AcceptedLink,
    agent: &AgentHandle,
    mut end_frames: tokio::sync::mpsc::Receiver<Box<Message>>,
) -> Result<&'static str, CodecError> {
    // The session ends at its age limit, or when the certificate or token it was opened with expires.
    let mut end = Instant::now() + server.config.limits.max_session_age;
    for expiry in [conn.peer_not_after(), agent.credential.expires].into_iter().flatten() {
        end =
            end.min(Instant::now() + expiry.duration_since(std::time::SystemTime::now()).unwrap_or_default());
    }
    let (rd, mut wr) = tokio::io::split(conn);
    let (reader, mut rx) = codec::spawn_reader(rd, CONTROL_QUEUE);
    let silence = server.config.limits.heartbeat_interval * MISSED_HEARTBEATS;
    let mut count = server.replicas.subscribe();
    let mut moving = false;
    let pool_idle = server.config.limits.idle_pool_timeout;
    let mut pool_check = tokio::time::interval_at(Instant::now() + pool_idle / 4, pool_idle / 4);
    pool_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        let msg = tokio::select! {
            _ = pool_check.tick() => {
                for parked in agent.surplus(pool_idle) {
                    tokio::spawn(close_surplus(parked.conn));
                }
                continue;
            }
            () = server.superseded.cancelled(), if !moving => {
                moving = true;
                let reason = "a successor took this server's place: open a session to it";
                if let Err(e) = codec::write_message(&mut wr, &Message::Moving { reason: reason.into() }).await {
                    break Err(e);
                }
                continue;
            }
            Ok(()) = count.changed() => {
                let count = *count.borrow_and_update();
                if let Err(e) = codec::write_message(&mut wr, &Message::ServerCount { count }).await {
                    break Err(e);
                }
                continue;
            }
            () = server.stop.cancelled() => {
                let _ = codec::write_message(&mut wr, &Message::GoAway { reason: "server shutting down".into() }).await;
                break Ok("server shutting down");
            }
            () = agent.gone.cancelled() => break Ok(agent.end_reason()),
            () = agent.probe_requested() => {
                let nonce = fastrand::u64(..);
                if let Err(e) = codec::write_message(&mut wr, &Message::Ping { nonce }).await {
                    break Err(e);
                }
                continue;
            }
            () = tokio::time::sleep_until(end) => {
                let reason = "session at its age limit or its certificate's or token's end: reconnect with a new handshake";
                let _ = codec::write_message(&mut wr, &Message::GoAway { reason: reason.into() }).await;
                break Ok("session age limit");
            }
            Some(frame) = end_frames.recv() => {
                if let Err(e) = codec::write_message(&mut wr, &frame).await {
                    break Err(e);
                }
                continue;
            }
            r = tokio::time::timeout(silence, rx.recv()) => match r {
                Err(_) => break Err(CodecError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "no heartbeat"))),
                Ok(None) => break Err(CodecError::Closed),
                Ok(Some(Err(CodecError::Closed))) if agent.draining.load(Ordering::Relaxed) => break Ok("agent drained"),
                Ok(Some(Err(e))) => break Err(e),
                Ok(Some(Ok(m))) => *m,
            },
        };
        agent.heard();
        match msg {
            Message::Ping { nonce } => {
                if let Err(e) = codec::write_message(&mut wr, &Message::Pong { nonce }).await {
                    break Err(e);
                }
            }
            Message::Pong { .. } => {}
            Message::StreamEnd { stream_id, bytes } => agent.ends.told_end(stream_id, bytes),
            Message::Drain => {
                info!("agent draining: no new streams");
                agent.draining.store(true, Ordering::Relaxed);
                agent.drop_idle();
            }
            other => {
                warn!(kind = other.kind(), "unexpected control frame");
                break Err(CodecError::Invalid("control frame"));
            }
        }
    };
    reader.abort();
    result
}
