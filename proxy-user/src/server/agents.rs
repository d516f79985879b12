//! The agent listener: control sessions and parked data connections.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument as _, debug, error, info, info_span, warn};

use super::registry::{AgentHandle, DataConn, ParkError};
use super::{ACCEPT_ERROR_PAUSE, MAX_AGENT_HANDSHAKES, Server};
use crate::codec::{self, CodecError};
use crate::metrics::inc;
use crate::protocol::{Identity, Message, PROTOCOL_VERSION};
use crate::transport::{self, Tunnel};

/// Control frames buffered between the reader task and the session loop.
const CONTROL_QUEUE: usize = 16;
/// Heartbeat intervals without any frame after which an agent is considered gone.
const MISSED_HEARTBEATS: u32 = 3;

pub(super) async fn accept(server: Arc<Server>, listener: TcpListener, tls: TlsAcceptor) {
    let handshakes = Arc::new(Semaphore::new(MAX_AGENT_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            () = server.shutdown.cancelled() => return,
            p = handshakes.clone().acquire_owned() => p.expect("semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            () = server.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(error) => {
                    warn!(%error, "accept on the agent listener failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let s = server.clone();
        let tls = tls.clone();
        server.tracker.spawn(
            async move {
                let first = establish(&s, stream, tls).await;
                drop(permit);
                match first {
                    Ok((conn, Message::Hello { version, identity })) => {
                        control(s, conn, version, identity).await;
                    }
                    Ok((conn, Message::DataHello { version, session_id })) => {
                        park(&s, conn, version, session_id).await;
                    }
                    Ok((mut conn, other)) => {
                        warn!(kind = other.kind(), "agent connection opened with an unexpected frame");
                        inc(&s.metrics.agent_conn_failures, "reason", "protocol");
                        reject(&mut conn, "first frame must be Hello or DataHello").await;
                    }
                    Err(reason) => inc(&s.metrics.agent_conn_failures, "reason", reason),
                }
            }
            .instrument(info_span!("agent_conn", peer = %peer)),
        );
    }
}

/// TLS handshake (or, where allowed, a plain data connection) and first frame, within the handshake
/// timeout. A control channel is always TLS.
async fn establish(
    server: &Server,
    stream: TcpStream,
    tls: TlsAcceptor,
) -> Result<(DataConn, Message), &'static str> {
    let timeout = server.config.limits.handshake_timeout;
    let setup = async {
        if let Err(error) = transport::tune_tunnel_socket(&stream) {
            debug!(%error, "tune agent socket");
        }
        let mut first_byte = [0u8; 1];
        if stream.peek(&mut first_byte).await.map_err(|_| "protocol")? == 0 {
            return Err("protocol");
        }
        let mut conn = if first_byte[0] == transport::TLS_HANDSHAKE_RECORD {
            let mut conn = tls.accept(stream).await.map_err(|error| {
                warn!(%error, "agent TLS handshake failed");
                "tls_handshake"
            })?;
            conn.get_mut().1.set_buffer_limit(Some(transport::TLS_SEND_BUFFER));
            Tunnel::Tls(conn)
        } else if server.config.allow_plaintext_tunnel {
            Tunnel::Plain(stream)
        } else {
            warn!("plaintext agent connection refused (--allow-plaintext-tunnel is off)");
            return Err("plaintext_refused");
        };
        let first = codec::read_message(&mut conn).await.map_err(|error| {
            warn!(%error, "agent sent no valid first frame");
            "protocol"
        })?;
        if matches!((&conn, &first), (Tunnel::Plain(_), Message::Hello { .. })) {
            warn!("control channel refused: it must use TLS");
            reject(&mut conn, "the control channel requires TLS").await;
            return Err("plaintext_refused");
        }
        Ok((conn, first))
    };
    tokio::time::timeout(timeout, setup).await.unwrap_or_else(|_| {
        warn!("agent connection set-up timed out");
        Err("timeout")
    })
}

async fn reject(conn: &mut DataConn, reason: &str) {
    let _ = codec::write_message(conn, &Message::Reject { reason: reason.to_owned() }).await;
}

async fn park(server: &Server, mut conn: DataConn, version: u16, session_id: u64) {
    if version != PROTOCOL_VERSION {
        inc(&server.metrics.agent_conn_failures, "reason", "version");
        return reject(
            &mut conn,
            &format!("unsupported protocol version {version}; server speaks {PROTOCOL_VERSION}"),
        )
        .await;
    }
    let Some(agent) = server.agents.session(session_id) else {
        inc(&server.metrics.agent_conn_failures, "reason", "unknown_session");
        return reject(&mut conn, "unknown or expired session").await;
    };
    match agent.park(conn) {
        Ok(()) => {}
        Err(ParkError::Full) => {
            inc(&server.metrics.agent_conn_failures, "reason", "pool_full");
            debug!(agent = %agent.identity.agent_id, "data connection refused: pool full");
        }
        Err(ParkError::Closed) => inc(&server.metrics.agent_conn_failures, "reason", "draining"),
    }
}

async fn control(server: Arc<Server>, mut conn: DataConn, version: u16, identity: Identity) {
    let limits = &server.config.limits;
    if version != PROTOCOL_VERSION {
        inc(&server.metrics.agent_conn_failures, "reason", "version");
        return reject(
            &mut conn,
            &format!("unsupported protocol version {version}; server speaks {PROTOCOL_VERSION}"),
        )
        .await;
    }
    if identity.agent_id.is_empty() {
        inc(&server.metrics.agent_conn_failures, "reason", "protocol");
        return reject(&mut conn, "empty agent id").await;
    }
    if server.agents.len() >= limits.max_agents && !server.agents.contains(&identity.agent_id) {
        inc(&server.metrics.agent_conn_failures, "reason", "max_agents");
        return reject(&mut conn, "server is at its agent limit").await;
    }
    let session_id = fastrand::u64(1..);
    let heartbeat_ms = u32::try_from(limits.heartbeat_interval.as_millis()).unwrap_or(u32::MAX);
    let ack = Message::HelloAck {
        version: PROTOCOL_VERSION,
        server_id: server.config.server_id.clone(),
        server_count: server.config.server_count,
        session_id,
        heartbeat_ms,
    };
    let agent = Arc::new(AgentHandle::new(
        identity,
        session_id,
        limits.max_streams_per_agent,
        limits.max_idle_per_agent,
        server.metrics.data_conns_idle.clone(),
    ));
    // Registered before the ack, so that data connections quoting the session find it.
    if let Some(old) = server.agents.register(&agent) {
        info!(agent = %agent.identity.agent_id, "agent reconnected: replacing its earlier session");
        old.gone.cancel();
        old.drop_idle();
    }
    if let Err(error) = codec::write_message(&mut conn, &ack).await {
        warn!(%error, "agent left during hello");
        server.agents.unregister(&agent);
        return;
    }
    server.metrics.agents_connected.set(i64::try_from(server.agents.len()).unwrap_or(i64::MAX));
    let span = info_span!("agent", id = %agent.identity.agent_id, session = session_id);
    async {
        info!(node = %agent.identity.node_name, addresses = ?agent.identity.addresses, cidrs = ?agent.identity.cidrs, "agent connected");
        let reason = session(&server, conn, &agent).await;
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
async fn session(server: &Server, conn: DataConn, agent: &AgentHandle) -> Result<&'static str, CodecError> {
    let (rd, mut wr) = tokio::io::split(conn);
    let (reader, mut rx) = codec::spawn_reader(rd, CONTROL_QUEUE);
    let silence = server.config.limits.heartbeat_interval * MISSED_HEARTBEATS;
    let result = loop {
        let msg = tokio::select! {
            () = server.shutdown.cancelled() => {
                let _ = codec::write_message(&mut wr, &Message::GoAway { reason: "server shutting down".into() }).await;
                break Ok("server shutting down");
            }
            () = agent.gone.cancelled() => break Ok("replaced by a newer session"),
            r = tokio::time::timeout(silence, rx.recv()) => match r {
                Err(_) => break Err(CodecError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "no heartbeat"))),
                Ok(None) => break Err(CodecError::Closed),
                Ok(Some(Err(CodecError::Closed))) if agent.draining.load(Ordering::Relaxed) => break Ok("agent drained"),
                Ok(Some(Err(e))) => break Err(e),
                Ok(Some(Ok(m))) => m,
            },
        };
        match msg {
            Message::Ping { nonce } => {
                if let Err(e) = codec::write_message(&mut wr, &Message::Pong { nonce }).await {
                    break Err(e);
                }
            }
            Message::Pong { .. } => {}
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
