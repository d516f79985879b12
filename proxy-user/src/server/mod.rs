//! `spoke-server`: CONNECT frontends, the agent listener, routing, and the relay of each stream.

mod agents;
pub mod registry;
mod tunnel;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, debug_span, info, warn};

use crate::config::ServerConfig;
use crate::metrics::ServerMetrics;
use crate::transport::tls::{self, TlsError, Versions};
use registry::AgentRegistry;

/// Agent TLS handshakes in progress at once; further agent connections wait in the listen backlog.
pub const MAX_AGENT_HANDSHAKES: usize = 1024;
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// The listeners `spoke-server` serves, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// CONNECT over a Unix socket.
    pub uds: Option<UnixListener>,
    /// CONNECT over TCP with mutual TLS.
    pub frontend_tcp: Option<TcpListener>,
    /// Agents' control and data connections.
    pub agent: TcpListener,
    /// /livez, /readyz, /metrics.
    pub admin: Option<TcpListener>,
}

/// State shared by every task of a server.
struct Server {
    config: ServerConfig,
    agents: AgentRegistry,
    metrics: ServerMetrics,
    pending_dials: Semaphore,
    next_stream_id: AtomicU64,
    /// Every connection task; waited for at shutdown.
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

/// Runs the server on `listeners` until `shutdown` is cancelled, then lets open streams finish for the
/// configured grace period.
pub async fn run_server(
    listeners: Listeners,
    config: ServerConfig,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let agent_tls = TlsAcceptor::from(tls::server_config(&config.agent_tls, Versions::Tls13)?);
    let frontend_tls = match &config.frontend {
        Some((_, files)) => Some(TlsAcceptor::from(tls::server_config(files, Versions::Tls12And13)?)),
        None => None,
    };
    let mut registry = Registry::default();
    let metrics = ServerMetrics::register(&mut registry);
    let grace = config.limits.grace_period;
    let server = Arc::new(Server {
        agents: AgentRegistry::new(config.strategies.clone(), config.limits.max_streams_per_agent),
        pending_dials: Semaphore::new(config.limits.max_pending_dials),
        next_stream_id: AtomicU64::new(1),
        metrics,
        config,
        tracker: TaskTracker::new(),
        shutdown: shutdown.clone(),
    });

    let admin_stop = CancellationToken::new();
    if let Some(admin) = listeners.admin {
        let ready: crate::admin::Readiness = Arc::new(|| true);
        tokio::spawn(crate::admin::serve(admin, Arc::new(registry), ready, admin_stop.clone()));
    }
    let frontend_slots = Arc::new(Semaphore::new(server.config.limits.max_frontend_conns));
    let mut loops = tokio::task::JoinSet::new();
    if let Some(uds) = listeners.uds {
        loops.spawn(accept_unix(server.clone(), uds, frontend_slots.clone()));
    }
    if let (Some(tcp), Some(tls)) = (listeners.frontend_tcp, frontend_tls) {
        loops.spawn(accept_tls_frontend(server.clone(), tcp, tls, frontend_slots));
    }
    loops.spawn(agents::accept(server.clone(), listeners.agent, agent_tls));
    info!(server_id = %server.config.server_id, datapath = ?server.config.datapath, "spoke-server running");

    shutdown.cancelled().await;
    info!(grace_period = ?grace, "stopping: no new connections; open streams may finish");
    loops.shutdown().await;
    server.tracker.close();
    if tokio::time::timeout(grace, server.tracker.wait()).await.is_err() {
        warn!(open = server.tracker.len(), "grace period over: closing open streams");
    }
    admin_stop.cancel();
    info!("spoke-server stopped");
    Ok(())
}

/// Waits for a connection slot, or `None` at shutdown.
async fn slot(server: &Server, slots: &Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        () = server.shutdown.cancelled() => None,
        p = slots.clone().acquire_owned() => Some(p.expect("semaphore is never closed")),
    }
}

async fn accept_unix(server: Arc<Server>, listener: UnixListener, slots: Arc<Semaphore>) {
    loop {
        let Some(permit) = slot(&server, &slots).await else { return };
        let stream = tokio::select! {
            () = server.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(error) => {
                    warn!(%error, "accept on the Unix socket failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let s = server.clone();
        server.tracker.spawn(
            async move {
                tunnel::serve(&s, stream).await;
                drop(permit);
            }
            .instrument(debug_span!("conn", client.addr = "uds")),
        );
    }
}

async fn accept_tls_frontend(
    server: Arc<Server>,
    listener: TcpListener,
    tls: TlsAcceptor,
    slots: Arc<Semaphore>,
) {
    loop {
        let Some(permit) = slot(&server, &slots).await else { return };
        let (stream, peer) = tokio::select! {
            () = server.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(error) => {
                    warn!(%error, "accept on the TCP frontend failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let s = server.clone();
        let tls = tls.clone();
        server.tracker.spawn(
            async move {
                let _ = stream.set_nodelay(true);
                let timeout = s.config.limits.handshake_timeout;
                match tokio::time::timeout(timeout, tls.accept(stream)).await {
                    Ok(Ok(mut stream)) => {
                        stream.get_mut().1.set_buffer_limit(Some(crate::transport::TLS_SEND_BUFFER));
                        tunnel::serve(&s, stream).await;
                    }
                    Ok(Err(error)) => {
                        warn!(%error, "frontend TLS handshake failed");
                        crate::metrics::inc(&s.metrics.streams, "result", "tls_handshake");
                    }
                    Err(_) => {
                        warn!("frontend TLS handshake timed out");
                        crate::metrics::inc(&s.metrics.streams, "result", "tls_handshake");
                    }
                }
                drop(permit);
            }
            .instrument(debug_span!("conn", client.addr = %peer)),
        );
    }
}
