//! `spoke-agent`: wiring, and the connections to the server. Its own concerns live in `control` (the
//! control channel and reconnects), `pool` (parked data connections), `stream` (one stream's node side:
//! policy, dial, reply, relay, record) and [`policy`].

pub mod config;
mod control;
pub mod policy;
mod pool;
mod stream;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::registry::Registry;
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::codec::{self, CodecError};
use crate::datapath::sockmap::{PinDir, Sockmap};
use crate::datapath::{Datapath, Mode};
use crate::metrics::{AgentMetrics, inc};
use crate::protocol::{MAX_TOKEN_LEN, Message, Secret};
use crate::transport::handshake;
use crate::transport::tls::{self, HandshakeError};
use crate::transport::{self, DialedLink, Link};
use config::{AgentConfig, Credential, ServerAddr, TunnelTls};

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
    /// Another live session holds this agent's identity at the server (see [`crate::protocol::IDENTITY_HELD`]).
    #[error("server refused: {}", crate::protocol::IDENTITY_HELD)]
    IdentityHeld,
    /// The server answered with something else than expected.
    #[error("unexpected {0} frame from server")]
    Unexpected(u8),
    /// The TLS server name is not a valid DNS name or IP address.
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    /// The service-account token file could not be read.
    #[error("service-account token {path}: {reason}")]
    Token {
        /// The file.
        path: String,
        /// What was wrong.
        reason: String,
    },
}

/// State shared by every task of an agent.
pub(crate) struct Agent {
    config: AgentConfig,
    /// TLS to the server, rebuilt when the certificate files change (a rotation).
    tls: tls::ClientTls,
    metrics: AgentMetrics,
    datapath: Datapath,
    /// Set at SIGTERM: new dials are refused with `Draining`.
    draining: AtomicBool,
    /// Open streams; waited for at shutdown.
    streams: TaskTracker,
}

impl Agent {
    /// The service-account token to present, read now (the kubelet rewrites the file as it refreshes
    /// the token); empty with a certificate credential.
    async fn token(&self) -> Result<Secret, ConnectError> {
        let Credential::Token { path, .. } = &self.config.credential else { return Ok(Secret::default()) };
        let fail = |reason: String| ConnectError::Token { path: path.display().to_string(), reason };
        let raw = tokio::fs::read(path).await.map_err(|e| fail(e.to_string()))?;
        let token = String::from_utf8(raw).map_err(|_| fail("not UTF-8".into()))?.trim().to_owned();
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(fail(format!("must hold 1 to {MAX_TOKEN_LEN} bytes")));
        }
        Ok(Secret(token))
    }

    /// Whether every data connection proves its session with the data key: when it is plain, or when
    /// the agent has no certificate that would prove it.
    fn proves_data_conns(&self, conn: &DialedLink) -> bool {
        matches!(conn, Link::Plain(_)) || matches!(self.config.credential, Credential::Token { .. })
    }

    /// Opens one link to the server at `server` (TLS unless `tls` is false) and sends `first`, all
    /// within the connect timeout. A data connection (`data`) asks for kernel TLS where the datapath
    /// uses it: it offers only the kernel's cipher suite.
    async fn connect(
        &self,
        server: &ServerAddr,
        first: &Message,
        tls: bool,
        data: bool,
    ) -> Result<DialedLink, ConnectError> {
        let kernel = self.datapath.kernel_tls().filter(|_| data);
        let addr = server.to_string();
        let deadline = Instant::now() + self.config.connect_timeout;
        let name = self.config.tls_server_name.clone().unwrap_or_else(|| server.host.clone());
        let server_name =
            ServerName::try_from(name.clone()).map_err(|_| ConnectError::ServerName(name.clone()))?;
        let setup = async {
            let tcp = TcpStream::connect((server.host.as_str(), server.port))
                .await
                .map_err(|source| ConnectError::Connect { addr: addr.clone(), source })?;
            if let Err(error) = transport::tune_link(&tcp, self.config.tcp_user_timeout) {
                tracing::debug!(%error, "tune server socket");
            }
            let mut conn = if tls {
                let config = self.tls.config(kernel.is_some());
                let (conn, kind) = match handshake::connect(config, server_name, tcp, deadline, kernel).await
                {
                    Ok(connected) => connected,
                    Err(HandshakeError::Timeout) => return Err(ConnectError::Timeout(addr.clone())),
                    Err(HandshakeError::Failed(source)) => {
                        return Err(ConnectError::Connect { addr: addr.clone(), source });
                    }
                };
                let kind = match kind {
                    Some(rustls::HandshakeKind::Resumed) => "resumed",
                    _ => "full",
                };
                inc(&self.metrics.server_handshakes, "kind", kind);
                Link::Tls(Box::new(conn))
            } else {
                Link::Plain(tcp)
            };
            codec::write_message(&mut conn, first).await?;
            Ok(conn)
        };
        tokio::time::timeout_at(deadline, setup).await.map_err(|_| ConnectError::Timeout(addr.clone()))?
    }
}

/// Sets up the datapath: loads the sockmap programs for `--datapath sockmap` (failing the start if they
/// cannot load); `auto` logs the tier it takes.
fn datapath(config: &AgentConfig) -> Result<Datapath, AgentError> {
    let datapath = match config.datapath {
        Mode::Sockmap => {
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
        Mode::Auto if config.tunnel_tls == TunnelTls::Off => {
            info!(
                tier = "splice",
                "datapath auto: plaintext tunnel: splice(2), kernel to kernel; with the server's hop spliced \
                 too it beat the sockmap tier on throughput, CPU and opening rate (docs/benchmarks.md); \
                 --datapath sockmap selects the eBPF tier"
            );
            Datapath::new(Mode::Auto)
        }
        mode => Datapath::new(mode),
    };
    Ok(if config.tunnel_tls == TunnelTls::On { datapath.probe_kernel_tls() } else { datapath })
}

/// Runs the agent until `shutdown` is cancelled, then drains open streams for the grace period.
pub async fn run_agent(
    config: AgentConfig,
    admin: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    if let Some(name) = &config.tls_server_name {
        ServerName::try_from(name.clone()).map_err(|_| AgentError::ServerName(name.clone()))?;
    }
    let tls = match &config.credential {
        Credential::Cert(files) => tls::ClientTls::load(files)?,
        Credential::Token { ca, .. } => tls::ClientTls::anonymous(ca)?,
    };
    config.memory.0.log(config.memory.1.as_ref());
    let mut registry = Registry::default();
    let metrics = AgentMetrics::register(&mut registry);
    let datapath = datapath(&config)?;
    metrics.stream.kernel_tls.set(i64::from(datapath.kernel_tls().is_some()));
    metrics.max_streams.set(i64::try_from(config.max_streams).unwrap_or(i64::MAX));
    if admin.is_some() {
        // Only where it is read (simulated agents share one runtime and have no admin endpoint).
        crate::metrics::follow_runtime_tasks(metrics.runtime_tasks.clone());
    }
    let agent = Arc::new(Agent {
        tls,
        metrics,
        datapath,
        draining: AtomicBool::new(false),
        streams: TaskTracker::new(),
        config,
    });
    let admin_stop = CancellationToken::new();
    if let Some(listener) = admin {
        let a = agent.clone();
        let ready: crate::admin::Readiness = Arc::new(move || {
            if a.metrics.standby.get() == 1 {
                // Another agent of this node holds the sessions (a rollout's old pod): this one is
                // ready to take over as soon as it drains.
                Ok(())
            } else if a.metrics.control_connected.get() == 0 {
                Err("no control channel to a server")
            } else if a.metrics.pool_idle.get() == 0 {
                Err("no data connection parked at the server")
            } else {
                Ok(())
            }
        });
        tokio::spawn(crate::admin::serve(listener, Arc::new(registry), ready, admin_stop.clone()));
    }
    info!(agent = %agent.config.identity.agent_id, servers = %agent.config.servers.iter().map(ToString::to_string).collect::<Vec<_>>().join(","), datapath = ?agent.datapath.mode(), "spoke-agent running");
    if agent.config.tunnel_tls == TunnelTls::Off {
        warn!(
            "--tunnel-tls off: stream bytes cross the network UNENCRYPTED; only for an underlay that is already encrypted"
        );
    }

    control::run(&agent, &shutdown).await;

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
