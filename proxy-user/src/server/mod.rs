//! `spoke-server`: wiring of the frontends, the agent listener and the admin endpoint. Its own concerns
//! live in [`registry`] (agents and routing), `session` (an agent's control channel and parked data
//! connections), `trust` (who an agent is and what it may claim), `stream` (a frontend connection's
//! protocol, and one CONNECT stream: read, route, dial, relay, record) and `grpc` with `tunnel`
//! (Konnectivity's gRPC tunnel: calls, dials and their tunnels, over the same routing and relay).

pub mod config;
mod grpc;
mod handover;
mod memory;
pub mod registry;
mod session;
mod stream;
mod trust;
mod tunnel;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::apiserver::nodes::Nodes;
use crate::apiserver::tokens::Reviewer;
use crate::apiserver::{self, AccessError};
use crate::datapath::Datapath;
use crate::metrics::{ServerMetrics, inc};
use crate::transport::accept::{self, Accepted, Budget, Refused, SocketFile};
use crate::transport::tls::{self, ClientCerts, TlsError, Versions};
use config::{AgentAuth, AgentClaims, ServerConfig};
use registry::AgentRegistry;

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The apiserver client could not be made.
    #[error(transparent)]
    Apiserver(#[from] AccessError),
    /// The Unix socket could not be renamed over its path.
    #[error("publish the socket at {path}: {source}")]
    Socket {
        /// The socket's path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The listeners `spoke-server` serves, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// CONNECT over a Unix socket, and its file (removed as the drain ends, if still this server's).
    pub uds: Option<(UnixListener, SocketFile)>,
    /// CONNECT over TCP with mutual TLS.
    pub frontend_tcp: Option<TcpListener>,
    /// Agents' control channels and data connections.
    pub agent: TcpListener,
    /// /livez, /readyz, /metrics.
    pub admin: Option<TcpListener>,
}

/// How often the drain looks whether streams are still open.
const DRAIN_CHECK: Duration = Duration::from_millis(50);
/// How long the frontends go on accepting after the socket file is gone: a client that looked the path
/// up just before may still complete its connect, and would otherwise land in the backlog of a listener
/// about to close (and be reset).
const LAST_CALL: Duration = Duration::from_millis(100);
/// How long the server waits, at its end, for its agents' sessions to be told to go away.
const AGENTS_TOLD: Duration = Duration::from_secs(1);

/// State shared by every task of a server.
struct Server {
    config: ServerConfig,
    agents: AgentRegistry,
    metrics: ServerMetrics,
    datapath: Datapath,
    /// The Node facts claims are checked against (`--agent-claims node-objects`).
    nodes: Option<Nodes>,
    /// Token reviews (`--agent-auth token`).
    reviewer: Option<Reviewer>,
    pending_dials: Semaphore,
    /// Where agents' data connections park (the server's shared pool).
    parking: registry::Parking,
    /// Places under the stream cap (`--max-streams`), CONNECT and gRPC together.
    streams: Arc<Semaphore>,
    next_stream_id: AtomicU64,
    /// Frontend connection tasks (CONNECT streams); the drain waits for them.
    frontend: TaskTracker,
    /// Agent connection tasks (control sessions, parked data connections).
    tracker: TaskTracker,
    /// How many replicas agents should reach (`--server-count`, or counted from Leases); agents are told
    /// when it changes.
    replicas: tokio::sync::watch::Sender<u16>,
    /// Refused requests' log lines, rate-limited.
    refusal_log: crate::telemetry::Limiter,
    /// When the server started (requests wait for agents for a moment after it).
    started: tokio::time::Instant,
    /// Cancelled at SIGTERM: the drain starts (not ready; idle streams close; still serving).
    draining: CancellationToken,
    /// Cancelled when no stream is open any more: the frontends stop accepting.
    frontend_stop: CancellationToken,
    /// Cancelled once the frontends' last streams ended: the agent listener closes, agents are told to
    /// go away (not before: those streams still need their agents).
    stop: CancellationToken,
    /// Cancelled when a successor process took the socket path: agents are told to move to it, and
    /// the agent and TCP frontend listeners close (see [`handover`]).
    superseded: CancellationToken,
}

/// Runs the server on `listeners` until `shutdown` is cancelled, then drains: it reports itself not
/// ready and keeps accepting and serving, closes streams that sit idle, and returns once no stream is
/// open (at most the grace period later), telling its agents to go away as it stops.
/// `started` runs once every listener accepts and the Unix socket is at its path.
pub async fn run_server(
    listeners: Listeners,
    config: ServerConfig,
    shutdown: CancellationToken,
    started: impl FnOnce(),
) -> Result<(), ServerError> {
    let (agent_tls, frontend_tls) = acceptors(&config)?;
    let (client, nodes, reviewer) = apiserver_parts(&config, &shutdown).await?;
    let mut registry = Registry::default();
    let metrics = ServerMetrics::register(&mut registry);
    config.memory.0.log(config.memory.1.as_ref());
    metrics.max_streams.set(i64::try_from(config.limits.max_streams).unwrap_or(i64::MAX));
    let datapath = Datapath::new(config.datapath).probe_kernel_tls();
    metrics.stream.kernel_tls.set(i64::from(datapath.kernel_tls().is_some()));
    crate::metrics::follow_runtime_tasks(metrics.runtime_tasks.clone());
    let grace = config.limits.grace_period;
    let replicas = config.server_count;
    let server = Arc::new(Server {
        agents: AgentRegistry::new(
            config.strategies.clone(),
            config.service_cidrs.iter().chain(&config.pod_network_cidrs).copied().collect(),
            config.limits.max_streams_per_agent,
        ),
        pending_dials: Semaphore::new(config.limits.max_pending_dials),
        streams: Arc::new(Semaphore::new(config.limits.max_streams)),
        parking: registry::Parking::new(
            config.limits.max_idle_per_agent,
            config.limits.max_parked_conns,
            config.limits.max_agents,
            metrics.data_conns_idle.clone(),
        ),
        next_stream_id: AtomicU64::new(1),
        datapath,
        nodes,
        reviewer,
        metrics,
        config,
        frontend: TaskTracker::new(),
        tracker: TaskTracker::new(),
        started: tokio::time::Instant::now(),
        refusal_log: crate::telemetry::Limiter::new(stream::REFUSAL_LOG_INTERVAL),
        replicas: tokio::sync::watch::Sender::new(replicas),
        draining: shutdown.clone(),
        frontend_stop: CancellationToken::new(),
        stop: CancellationToken::new(),
        superseded: CancellationToken::new(),
    });

    let admin_stop = CancellationToken::new();
    if let Some(admin) = listeners.admin {
        let ready = readiness(server.clone());
        tokio::spawn(crate::admin::serve(admin, Arc::new(registry), ready, admin_stop.clone()));
    }
    let limits = &server.config.limits;
    // Each listener has its own budget: a flood on one never starves another.
    let frontend = |name| frontend_budget(name, limits.max_frontend_conns);
    let mut loops = tokio::task::JoinSet::new();
    let uds_file = listeners.uds.as_ref().map(|(_, file)| file.clone());
    if let Some((uds, _)) = listeners.uds {
        // The header timeout bounds a silent client, with a 408 the apiserver can report.
        let s = server.clone();
        loops.spawn(accept::serve(
            uds,
            frontend("uds"),
            server.frontend_stop.clone(),
            server.frontend.clone(),
            move |c| stream::serve_unix(s.clone(), c),
        ));
    }
    if let (Some(tcp), Some(acceptor)) = (listeners.frontend_tcp, frontend_tls) {
        let s = server.clone();
        let on_refused = Arc::new(move |_, _| inc(&s.metrics.stream.results, "result", "tls_handshake"));
        let budget = Budget {
            first_byte: Some(limits.handshake_timeout),
            on_refused: Some(on_refused),
            ..frontend("frontend")
        };
        let s = server.clone();
        loops.spawn(accept::serve(
            tcp,
            budget,
            handover::either(&server.frontend_stop, &server.superseded),
            server.frontend.clone(),
            move |c| stream::serve_tls(s.clone(), acceptor.clone(), c),
        ));
    }
    loops.spawn(serve_agents(&server, listeners.agent, agent_tls));
    spawn_watchers(&server, client);
    if let Some(file) = &uds_file {
        handover::publish_and_watch(file, server.superseded.clone(), server.stop.clone())
            .map_err(|source| ServerError::Socket { path: file.path().display().to_string(), source })?;
    }
    log_start(&server.config);
    started();

    shutdown.cancelled().await;
    drain(&server, grace, uds_file.as_ref()).await;
    loops.shutdown().await;
    server.tracker.close();
    // Control sessions end as they tell their agents to go away; parked data connections close.
    if tokio::time::timeout(AGENTS_TOLD, server.tracker.wait()).await.is_err() {
        debug!(open = server.tracker.len(), "agent connections still closing");
    }
    admin_stop.cancel();
    info!("spoke-server stopped");
    Ok(())
}

/// The agent listener's accept loop, until the server stops or a successor takes its place.
fn serve_agents(
    server: &Arc<Server>,
    listener: TcpListener,
    tls: TlsAcceptor,
) -> impl std::future::Future<Output = ()> + use<> {
    let limits = &server.config.limits;
    let s = server.clone();
    let on_refused =
        Arc::new(move |_, why: Refused| inc(&s.metrics.agent_conn_failures, "reason", why.as_str()));
    let budget = Budget {
        name: "agent",
        max_conns: limits.max_agent_handshakes,
        first_byte: Some(limits.handshake_timeout),
        per_source: Some(limits.max_handshakes_per_source),
        on_refused: Some(on_refused),
        peer_in_logs: true,
    };
    let s = server.clone();
    accept::serve(
        listener,
        budget,
        handover::either(&server.stop, &server.superseded),
        server.tracker.clone(),
        move |c: Accepted<_>| session::serve(s.clone(), tls.clone(), c),
    )
}

/// After SIGTERM: keeps serving (new requests too: the apiserver has no other server until this one
/// exits), while idle streams close (`stream::serve`); once no frontend connection is open, or the
/// grace period is over, stops accepting and tells agents to go away.
async fn drain(server: &Server, grace: Duration, uds_file: Option<&SocketFile>) {
    let deadline = tokio::time::Instant::now() + grace;
    info!(
        grace_period = ?grace,
        idle_after = ?server.config.limits.drain_idle_timeout,
        open = server.frontend.len(),
        "draining: not ready, still serving; idle streams close; stopping when no stream is open"
    );
    let quiet = async {
        while !server.frontend.is_empty() {
            tokio::time::sleep(DRAIN_CHECK).await;
        }
    };
    let _ = tokio::time::timeout_at(deadline, quiet).await;
    // No new connection can reach the socket once its file is gone; after a last call for connects
    // already under way, the frontends stop, serving what the kernel had already queued. Those are served to their end, within the grace period, and
    // only then are the agents told to go away.
    // A successor's socket at the path takes every new connection already: no last call then.
    if let Some(file) = uds_file.filter(|f| f.is_own()) {
        file.remove_if_own();
        let _ = tokio::time::timeout_at(deadline, tokio::time::sleep(LAST_CALL)).await;
    }
    server.frontend_stop.cancel();
    server.frontend.close();
    if tokio::time::timeout_at(deadline, server.frontend.wait()).await.is_err() {
        warn!(open = server.frontend.len(), "grace period over: closing open streams");
    }
    server.stop.cancel();
}
/// Starts what follows the apiserver: agents' claims re-checked as Nodes change, token sessions ended
/// as their pods go, and the replica count from Leases.
fn spawn_watchers(server: &Arc<Server>, client: Option<kube::Client>) {
    tokio::spawn(trust::recheck_on_node_changes(server.clone()));
    if let (Some(client), Some(reviewer)) = (&client, &server.reviewer) {
        let (namespace, service_account) = reviewer.service_account();
        let pods =
            crate::apiserver::pods::watch(client.clone(), namespace, service_account, server.stop.clone());
        tokio::spawn(trust::revoke_on_pod_changes(server.clone(), pods));
    }
    if let (Some(client), Some(leases)) = (client, server.config.leases.clone()) {
        // Stopped at SIGTERM: the Lease goes, so the other replicas count this one out at once.
        let (id, replicas) = (server.config.server_id.clone(), server.replicas.clone());
        let tokens = (server.draining.clone(), server.superseded.clone());
        tokio::spawn(crate::apiserver::leases::run(client, leases, id, replicas, tokens));
    }
}

/// The apiserver client, its Node watch and its token reviewer, where the configuration uses them.
async fn apiserver_parts(
    config: &ServerConfig,
    shutdown: &CancellationToken,
) -> Result<(Option<kube::Client>, Option<Nodes>, Option<Reviewer>), AccessError> {
    let Some(access) = &config.apiserver else { return Ok((None, None, None)) };
    let client = apiserver::client(access).await?;
    let nodes = (config.agent_claims == AgentClaims::NodeObjects)
        .then(|| Nodes::watch(client.clone(), shutdown.clone()));
    let reviewer = config.tokens.clone().map(|policy| Reviewer::new(client.clone(), policy));
    Ok((Some(client), nodes, reviewer))
}

/// A frontend listener's budget. Its connections log under their stream's span (request and
/// destination), not their own.
fn frontend_budget(name: &'static str, max_conns: usize) -> Budget {
    Budget { name, max_conns, first_byte: None, per_source: None, on_refused: None, peer_in_logs: false }
}

/// `/readyz`: ready once an agent is connected, or after the readiness grace without one; never while
/// draining.
fn readiness(server: Arc<Server>) -> crate::admin::Readiness {
    let started = tokio::time::Instant::now();
    Arc::new(move || {
        if server.draining.is_cancelled() {
            Err("shutting down")
        } else if server.superseded.is_cancelled() {
            Err("a successor took the socket")
        } else if server.agents.is_empty() && started.elapsed() < server.config.limits.readiness_grace {
            Err("no agent connected yet")
        } else {
            Ok(())
        }
    })
}

/// The agent listener's TLS acceptor, and the TCP frontend's.
fn acceptors(config: &ServerConfig) -> Result<(TlsAcceptor, Option<TlsAcceptor>), TlsError> {
    let agent = tls::server_config(&config.agent_tls, Versions::Tls13, config.agent_client_certs())?;
    let frontend = match &config.frontend {
        Some(f) => {
            let tls = tls::server_config(&f.tls, Versions::Tls12And13, ClientCerts::Required)?;
            // ALPN as the protocols served (gRPC clients insist on `h2`); a client that offers none is
            // told apart by its first bytes all the same.
            let mut tls = Arc::unwrap_or_clone(tls);
            if config.mode.grpc() {
                tls.alpn_protocols.push(b"h2".to_vec());
            }
            if config.mode.http_connect() {
                tls.alpn_protocols.push(b"http/1.1".to_vec());
            }
            Some(TlsAcceptor::from(Arc::new(tls)))
        }
        None => None,
    };
    Ok((TlsAcceptor::from(agent), frontend))
}

/// Says the server runs, and warns about each check the configuration gives up.
fn log_start(config: &ServerConfig) {
    info!(
        server_id = %config.server_id,
        datapath = ?config.datapath,
        agent_auth = ?config.agent_auth,
        agent_claims = ?config.agent_claims,
        "spoke-server running"
    );
    if config.agent_auth == AgentAuth::SharedCert {
        warn!(
            "--agent-auth shared-cert: agents are NOT authenticated as nodes: any holder of a certificate from \
             --cluster-ca-cert can claim any node and take its traffic; use --agent-auth node-cert outside development"
        );
    }
    if config.agent_claims == AgentClaims::Trusted {
        warn!(
            "--agent-claims trusted: agents' addresses and CIDRs are NOT checked against their Node objects: an \
             agent can announce another node's addresses or a /32 and take its traffic; use --agent-claims \
             node-objects outside development"
        );
    }
}
