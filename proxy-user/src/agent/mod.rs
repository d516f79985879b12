//! `spoke-agent`: the control channel to the server, the pool of parked data connections, and the dial
//! of each stream's target.

mod dial;
pub mod policy;
mod pool;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::registry::Registry;
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, error, info, info_span, warn};

use crate::codec::{self, CodecError};
use crate::config::{AgentConfig, DatapathMode, TunnelTls};
use crate::datapath::Datapath;
use crate::datapath::sockmap::{PinDir, Sockmap};
use crate::metrics::{AgentMetrics, inc};
use crate::protocol::{Message, PROTOCOL_VERSION};
use crate::transport::{self, Tunnel, tls};

/// Control frames buffered between the reader task and the session loop.
const CONTROL_QUEUE: usize = 16;
/// Heartbeat intervals without a frame from the server after which the channel is considered lost.
const MISSED_HEARTBEATS: u32 = 3;
/// Shortest heartbeat interval the agent follows, whatever the server asks.
const MIN_HEARTBEAT: Duration = Duration::from_millis(100);

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// `--tls-server-name` is not a valid DNS name or address.
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
    /// `--datapath sockmap` was asked for and the eBPF programs could not be set up.
    #[error("sockmap datapath: {0}")]
    Datapath(#[from] crate::datapath::sockmap::SockmapError),
}

/// Why a connection to the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP connect or TLS handshake failed.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// `host:port` of the server.
        addr: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The server did not answer in time.
    #[error("connect to {0}: timed out")]
    Timeout(String),
    /// A frame could not be exchanged.
    #[error("handshake: {0}")]
    Codec(#[from] CodecError),
    /// The server refused us.
    #[error("server refused: {0}")]
    Rejected(String),
    /// The server answered with something else than expected.
    #[error("unexpected {0} frame from server")]
    Unexpected(u8),
}

/// State shared by every task of an agent.
pub(crate) struct Agent {
    config: AgentConfig,
    connector: TlsConnector,
    server_name: ServerName<'static>,
    metrics: AgentMetrics,
    datapath: Datapath,
    /// Set at SIGTERM: new dials are refused with `Draining`.
    draining: AtomicBool,
    /// Open streams; waited for at shutdown.
    streams: TaskTracker,
}

impl Agent {
    fn server_addr(&self) -> String {
        format!("{}:{}", self.config.server_host, self.config.server_port)
    }

    /// Opens one connection to the server (TLS unless `tls` is false) and sends `first`; within the
    /// connect timeout.
    async fn connect(&self, first: &Message, tls: bool) -> Result<ServerConn, ConnectError> {
        let addr = self.server_addr();
        let setup = async {
            let tcp = TcpStream::connect((self.config.server_host.as_str(), self.config.server_port))
                .await
                .map_err(|source| ConnectError::Connect { addr: addr.clone(), source })?;
            if let Err(error) = transport::tune_tunnel_socket(&tcp) {
                tracing::debug!(%error, "tune server socket");
            }
            let mut conn = if tls {
                let mut conn = self
                    .connector
                    .connect(self.server_name.clone(), tcp)
                    .await
                    .map_err(|source| ConnectError::Connect { addr: addr.clone(), source })?;
                conn.get_mut().1.set_buffer_limit(Some(transport::TLS_SEND_BUFFER));
                let kind = match conn.get_ref().1.handshake_kind() {
                    Some(rustls::HandshakeKind::Resumed) => "resumed",
                    _ => "full",
                };
                inc(&self.metrics.server_handshakes, "kind", kind);
                Tunnel::Tls(conn)
            } else {
                Tunnel::Plain(tcp)
            };
            codec::write_message(&mut conn, first).await?;
            Ok(conn)
        };
        tokio::time::timeout(self.config.connect_timeout, setup)
            .await
            .map_err(|_| ConnectError::Timeout(addr.clone()))?
    }
}

/// A connection to the server: TLS, or plain TCP for data connections with `--tunnel-tls off`.
pub(crate) type ServerConn = Tunnel<TlsStream<TcpStream>>;

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

    /// The delay before the next attempt: uniform in [next/2, next], then next doubles up to max.
    fn delay(&mut self) -> Duration {
        let d = self.next.mul_f64(0.5 + fastrand::f64() / 2.0);
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

/// Sets up the datapath: loads the sockmap programs for `--datapath sockmap` (failing the start if they
/// cannot load); `auto` logs the tier it takes.
fn datapath(config: &AgentConfig) -> Result<Datapath, AgentError> {
    Ok(match config.datapath {
        DatapathMode::Sockmap => {
            let pins = PinDir::new(&config.bpf_root, &config.identity.agent_id);
            let datapath = Datapath::with_sockmap(Some(pins), config.sockmap_limits)?;
            let map = datapath.sockmap();
            let dir = map.and_then(Sockmap::pins).map(|p| p.display().to_string());
            info!(
                pins = dir.as_deref().unwrap_or("none"),
                backlog_limit = config.sockmap_limits.backlog,
                trims = map.is_some_and(Sockmap::trims),
                "sockmap datapath attached"
            );
            datapath
        }
        DatapathMode::Auto if config.tunnel_tls == TunnelTls::Off => {
            info!(
                tier = "splice",
                "datapath auto: plaintext tunnel: splice(2), kernel to kernel; with the server's hop spliced \
                 too it beat the sockmap tier on throughput, CPU and opening rate (docs/benchmarks.md); \
                 --datapath sockmap selects the eBPF tier"
            );
            Datapath::new(DatapathMode::Auto)
        }
        DatapathMode::Auto => {
            info!(tier = "copy", "datapath auto: TLS tunnel, which only the copy tier can carry");
            Datapath::new(DatapathMode::Auto)
        }
        mode => Datapath::new(mode),
    })
}

/// Runs the agent until `shutdown` is cancelled, then drains open streams for the grace period.
pub async fn run_agent(
    config: AgentConfig,
    admin: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let server_name = ServerName::try_from(config.tls_server_name.clone())
        .map_err(|_| AgentError::ServerName(config.tls_server_name.clone()))?;
    let connector = TlsConnector::from(tls::client_config(&config.tls)?);
    let mut registry = Registry::default();
    let metrics = AgentMetrics::register(&mut registry);
    let datapath = datapath(&config)?;
    let agent = Arc::new(Agent {
        connector,
        server_name,
        metrics,
        datapath,
        draining: AtomicBool::new(false),
        streams: TaskTracker::new(),
        config,
    });
    let admin_stop = CancellationToken::new();
    if let Some(listener) = admin {
        let a = agent.clone();
        let ready: crate::admin::Readiness =
            Arc::new(move || a.metrics.control_connected.get() == 1 && a.metrics.pool_idle.get() > 0);
        tokio::spawn(crate::admin::serve(listener, Arc::new(registry), ready, admin_stop.clone()));
    }
    info!(agent = %agent.config.identity.agent_id, server = %agent.server_addr(), datapath = ?agent.datapath.mode(), "spoke-agent running");
    if agent.config.tunnel_tls == TunnelTls::Off {
        warn!(
            "--tunnel-tls off: stream bytes cross the network UNENCRYPTED; only for an underlay that is already encrypted"
        );
    }

    let mut backoff = Backoff::new(agent.config.reconnect);
    while !shutdown.is_cancelled() {
        let end = session(&agent, &shutdown).await;
        match end {
            Ok(SessionEnd::Shutdown) => break,
            Ok(SessionEnd::GoAway(reason)) => {
                backoff.reset();
                warn!(%reason, "server going away: reconnecting");
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
        let delay = backoff.delay();
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }

    agent.draining.store(true, Ordering::Relaxed);
    agent.streams.close();
    let grace = agent.config.grace_period;
    info!(open = agent.streams.len(), grace_period = ?grace, "draining open streams");
    if tokio::time::timeout(grace, agent.streams.wait()).await.is_err() {
        warn!(open = agent.streams.len(), "grace period over: closing open streams");
    }
    admin_stop.cancel();
    info!("spoke-agent stopped");
    Ok(())
}

/// One control session: hello, then heartbeats until it ends. The data-connection pool lives as long
/// as the session.
async fn session(agent: &Arc<Agent>, shutdown: &CancellationToken) -> Result<SessionEnd, ConnectError> {
    let hello = Message::Hello { version: PROTOCOL_VERSION, identity: agent.config.identity.clone() };
    let mut conn = tokio::select! {
        () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        c = agent.connect(&hello, true) => c?,
    };
    let ack = tokio::time::timeout(agent.config.connect_timeout, codec::read_message(&mut conn))
        .await
        .map_err(|_| ConnectError::Timeout(agent.server_addr()))??;
    let (session_id, heartbeat, server_id, server_count) = match ack {
        Message::HelloAck { version, server_id, server_count, session_id, heartbeat_ms }
            if version == PROTOCOL_VERSION =>
        {
            (
                session_id,
                Duration::from_millis(heartbeat_ms.into()).max(MIN_HEARTBEAT),
                server_id,
                server_count,
            )
        }
        Message::HelloAck { version, .. } => {
            return Err(ConnectError::Rejected(format!("server speaks protocol version {version}")));
        }
        Message::Reject { reason } => return Err(ConnectError::Rejected(reason)),
        other => return Err(ConnectError::Unexpected(other.kind())),
    };
    let span = info_span!("session", id = session_id, server = %server_id);
    async move {
        info!(server_count, heartbeat = ?heartbeat, "connected to server");
        agent.metrics.control_connected.set(1);
        let pool_stop = CancellationToken::new();
        let pool = tokio::spawn(pool::run(agent.clone(), session_id, pool_stop.clone()));
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
    conn: ServerConn,
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
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new((Duration::from_millis(100), Duration::from_secs(1)));
        let delays: Vec<Duration> = (0..8).map(|_| b.delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[3] >= Duration::from_millis(400) && delays[3] <= Duration::from_millis(800));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)));
        assert!(delays[7] >= Duration::from_millis(500), "capped, not shrinking");
        b.reset();
        assert!(b.delay() <= Duration::from_millis(100));
    }
}
