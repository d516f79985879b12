//! `spoke-server`'s flags (with `SPOKE_SERVER_*` environment fallbacks) and the validated configuration
//! built from them. Only [`ServerConfig`] travels past `main`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use clap::builder::{PossibleValuesParser, TypedValueParser as _};
use ipnet::IpNet;

use super::memory::{Caps, Carriage};
use super::registry::Strategy;
use crate::apiserver::Access;
use crate::apiserver::leases::LeaseConfig;
use crate::apiserver::tokens::TokenPolicy;
use crate::budget::{Budget, MemoryLimit};
use crate::config::{
    ConfigError, ServerAddr, err, nonzero_duration, parse_admin_bind, parse_duration, parse_size, positive,
};
use crate::datapath::Mode;
use crate::protocol::MAX_STRING_LEN;
use crate::telemetry::LogFormat;
use crate::transport::tls::{ClientCerts, TlsFiles};

/// The server's `--datapath` values: every mode but sockmap, which only the agent runs.
fn server_mode() -> impl clap::builder::TypedValueParser<Value = Mode> {
    PossibleValuesParser::new(["auto", "copy", "splice"])
        .map(|s| <Mode as clap::ValueEnum>::from_str(&s, false).expect("every possible value is a mode"))
}

/// `spoke-server`: takes kube-apiserver's CONNECT requests and routes each through the agent of the node
/// that serves the destination.
#[derive(Debug, Parser)]
#[command(name = "spoke-server", version, about)]
pub struct ServerArgs {
    /// Unix socket for the apiserver's CONNECT requests (mode 0600), renamed over the path once the
    /// server accepts: a socket there (stale, or a running predecessor's, which hands over) is replaced.
    #[arg(long, env = "SPOKE_SERVER_UDS_NAME")]
    pub uds_name: Option<PathBuf>,
    /// TCP address for CONNECT requests over mutual TLS (needs --server-cert, --server-key, --server-ca-cert).
    #[arg(long, env = "SPOKE_SERVER_FRONTEND_BIND")]
    pub frontend_bind: Option<SocketAddr>,
    /// Protocols the frontends take: `both` (HTTP CONNECT and Konnectivity's gRPC tunnel, told apart by
    /// their first bytes), or only `grpc` or `http-connect`, as Konnectivity's `--mode`.
    #[arg(long, env = "SPOKE_SERVER_MODE", value_enum, default_value_t = FrontendMode::Both)]
    pub mode: FrontendMode,
    /// CA bundle that CONNECT clients' certificates must chain to.
    #[arg(long, env = "SPOKE_SERVER_SERVER_CA_CERT")]
    pub server_ca_cert: Option<PathBuf>,
    /// Certificate of the TCP frontend.
    #[arg(long, env = "SPOKE_SERVER_SERVER_CERT")]
    pub server_cert: Option<PathBuf>,
    /// Private key of the TCP frontend.
    #[arg(long, env = "SPOKE_SERVER_SERVER_KEY")]
    pub server_key: Option<PathBuf>,
    /// Names a TCP-frontend client's certificate must carry one of (its subject's common name or a DNS
    /// subject alternative name): the apiserver's, so that no other holder of a certificate from
    /// --server-ca-cert can open streams. Required with --frontend-bind.
    #[arg(long, env = "SPOKE_SERVER_FRONTEND_ALLOWED_NAMES", value_delimiter = ',')]
    pub frontend_allowed_names: Vec<String>,
    /// Address agents connect to (TLS 1.3, client certificates from the cluster CA).
    #[arg(long, env = "SPOKE_SERVER_AGENT_BIND", default_value = "0.0.0.0:8091")]
    pub agent_bind: SocketAddr,
    /// CA bundle that agents' certificates must chain to.
    #[arg(long, env = "SPOKE_SERVER_CLUSTER_CA_CERT")]
    pub cluster_ca_cert: PathBuf,
    /// Certificate presented to agents.
    #[arg(long, env = "SPOKE_SERVER_CLUSTER_CERT")]
    pub cluster_cert: PathBuf,
    /// Private key of --cluster-cert.
    #[arg(long, env = "SPOKE_SERVER_CLUSTER_KEY")]
    pub cluster_key: PathBuf,
    /// Address of /livez, /readyz and /metrics; "off" disables it.
    #[arg(long, env = "SPOKE_SERVER_ADMIN_BIND", default_value = "127.0.0.1:8095")]
    pub admin_bind: String,
    /// Routing strategies, tried in order: destHost, cidr, defaultRoute, default.
    #[arg(
        long,
        env = "SPOKE_SERVER_PROXY_STRATEGIES",
        default_value = "destHost,cidr,defaultRoute",
        value_delimiter = ','
    )]
    pub proxy_strategies: Vec<Strategy>,
    /// Identifier of this server replica, told to agents.
    #[arg(long, env = "SPOKE_SERVER_SERVER_ID", default_value = "spoke-server-0")]
    pub server_id: String,
    /// Number of server replicas agents should connect to (each agent keeps a control channel to that
    /// many distinct replicas).
    #[arg(long, env = "SPOKE_SERVER_SERVER_COUNT", default_value_t = 1)]
    pub server_count: u16,
    /// Count the server replicas from Leases instead of --server-count: each replica renews a Lease of
    /// its own (named after --server-id) in --lease-namespace with --lease-label, and counts the
    /// labelled Leases not expired; agents are told when the count changes. Needs apiserver access
    /// (--kubeconfig) with get, list, watch, create, patch and delete on leases there.
    #[arg(long, env = "SPOKE_SERVER_ENABLE_LEASE_CONTROLLER")]
    pub enable_lease_controller: bool,
    /// Namespace of the replicas' Leases.
    #[arg(long, env = "SPOKE_SERVER_LEASE_NAMESPACE", default_value = "kube-system")]
    pub lease_namespace: String,
    /// Label (`KEY=VALUE`) of the replicas' Leases.
    #[arg(long, env = "SPOKE_SERVER_LEASE_LABEL", default_value = "app.kubernetes.io/name=spoke-server")]
    pub lease_label: String,
    /// How long a replica's Lease counts after its last renewal.
    #[arg(long, env = "SPOKE_SERVER_LEASE_DURATION", default_value = "30s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// How often a replica renews its Lease and counts the others.
    #[arg(long, env = "SPOKE_SERVER_LEASE_RENEWAL_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub lease_renewal_interval: Duration,
    /// `host:port` where agents reach this replica's agent listener directly, told to them for their
    /// data connections: set it where agents reach the replicas through a load balancer, which would
    /// send a data connection to any replica. Without it, agents dial data connections where their
    /// control channel went.
    #[arg(long, env = "SPOKE_SERVER_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<String>,
    /// Most frontend connections open at once (CONNECT or gRPC: reading, dialing or relaying); further
    /// ones wait in the listen backlog. Default: twice the stream cap, so that requests past it are
    /// answered 503.
    #[arg(long, env = "SPOKE_SERVER_MAX_FRONTEND_CONNS")]
    pub max_frontend_conns: Option<usize>,
    /// Most streams relayed at once (CONNECT streams and gRPC tunnels together); beyond it requests get
    /// 503. Default: as many as fit the memory limit (docs/operations.md, "Memory budget"), at most
    /// 16384; a value that does not fit is refused at start.
    #[arg(long, env = "SPOKE_SERVER_MAX_STREAMS")]
    pub max_streams: Option<usize>,
    /// Memory the server may use (Ki/Mi/Gi suffixes); its caps must fit. Default: its cgroup's limit
    /// (`memory.max`, or `memory.limit_in_bytes` under cgroup v1), if any.
    #[arg(long, env = "SPOKE_SERVER_MEMORY_LIMIT", value_parser = parse_size)]
    pub memory_limit: Option<u64>,
    /// Most streams relayed through one agent at once; beyond it requests get 503.
    #[arg(long, env = "SPOKE_SERVER_MAX_STREAMS_PER_AGENT", default_value_t = 4096)]
    pub max_streams_per_agent: usize,
    /// Most dials waiting for an agent at once; beyond it requests get 503.
    #[arg(long, env = "SPOKE_SERVER_MAX_PENDING_DIALS", default_value_t = 1024)]
    pub max_pending_dials: usize,
    /// Most agents connected at once. Default: 10000, or under a memory limit as many as fit half of it
    /// (docs/operations.md, "Memory budget").
    #[arg(long, env = "SPOKE_SERVER_MAX_AGENTS")]
    pub max_agents: Option<usize>,
    /// Agent connections in set-up (TLS handshake and first frame) at once; further ones wait in the
    /// listen backlog.
    #[arg(long, env = "SPOKE_SERVER_MAX_AGENT_HANDSHAKES", default_value_t = 1024)]
    pub max_agent_handshakes: usize,
    /// Of those, the most one source address may hold, so that idle or garbage connections from one
    /// host cannot keep agents from connecting; past it a connection is closed at once. Agents behind
    /// one NAT address share it.
    #[arg(long, env = "SPOKE_SERVER_MAX_HANDSHAKES_PER_SOURCE", default_value_t = 64)]
    pub max_handshakes_per_source: usize,
    /// Most idle data connections one agent may park.
    #[arg(long, env = "SPOKE_SERVER_MAX_IDLE_PER_AGENT", default_value_t = 256)]
    pub max_idle_per_agent: usize,
    /// Most idle data connections parked across all agents; each agent may always park its first two,
    /// so at least twice --max-agents. Past it, a data connection is refused (`Reject`) and its agent
    /// waits before it tries again. Default: four per agent.
    #[arg(long, env = "SPOKE_SERVER_MAX_PARKED_CONNS")]
    pub max_parked_conns: Option<usize>,
    /// How long an agent's parked data connections may go without a dial before the server closes
    /// those beyond its first two (the agent keeps its pool at what is left, and grows it again with
    /// use), so that idle nodes hold few connections and little memory.
    #[arg(long, env = "SPOKE_SERVER_IDLE_POOL_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_pool_timeout: Duration,
    /// Time a client has to send its whole CONNECT head; then 408.
    #[arg(long, env = "SPOKE_SERVER_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// Time the node side has to connect to the destination; then 504.
    #[arg(long, env = "SPOKE_SERVER_BACKEND_DIAL_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub backend_dial_timeout: Duration,
    /// Time a TLS handshake (and an agent's first frame) may take.
    #[arg(long, env = "SPOKE_SERVER_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
    /// How often agents send heartbeats; an agent silent for three intervals is dropped.
    #[arg(long, env = "SPOKE_SERVER_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// How long data sent to an agent may go unacknowledged before its connection (control channel,
    /// parked data connection or open stream) is given up (`TCP_USER_TIMEOUT`): the bound on finding a
    /// link that went silent with data in flight. 0 leaves the kernel's default (about 15 minutes).
    #[arg(long, env = "SPOKE_SERVER_TCP_USER_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub tcp_user_timeout: Duration,
    /// Longest an agent's control session lives before the server ends it (`GoAway`) and the agent
    /// reconnects with a fresh handshake; a session also ends when its client certificate expires.
    /// Below the kubelet's certificate rotation (months, by default), so that a rotated or revoked
    /// identity does not live on in an old session or its resumption tickets.
    #[arg(long, env = "SPOKE_SERVER_MAX_SESSION_AGE", default_value = "24h", value_parser = parse_duration)]
    pub max_session_age: Duration,
    /// `/readyz` says ready once an agent is connected, or after this long without one (a cluster may
    /// have no nodes yet); never while shutting down.
    #[arg(long, env = "SPOKE_SERVER_READINESS_GRACE", default_value = "60s", value_parser = parse_duration)]
    pub readiness_grace: Duration,
    /// While draining after SIGTERM, a stream that moved no byte for this long (and has none in flight)
    /// is closed with an orderly end: kube-apiserver keeps idle keep-alive tunnels to kubelets open,
    /// and waiting the whole grace period for them would hold a restart up.
    #[arg(long, env = "SPOKE_SERVER_DRAIN_IDLE_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub drain_idle_timeout: Duration,
    /// How long open streams may go on after SIGTERM.
    #[arg(long, env = "SPOKE_SERVER_GRACEFUL_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub graceful_shutdown_timeout: Duration,
    /// Runtime worker threads; 0 means one per CPU.
    #[arg(long, env = "SPOKE_SERVER_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
    /// How agents prove which node they are. `node-cert`: by the kubelet's own client certificate
    /// (`CN=system:node:<name>, O=system:nodes`, from --cluster-ca-cert); the node name, and the agent id,
    /// are the certificate's, and a TLS data connection must carry the same node's certificate as its
    /// session. `shared-cert`: any certificate from --cluster-ca-cert, and the agent names itself (for
    /// development, tests and benchmarks only: logged as a warning at start). `token`: by a projected
    /// service-account token the agent sends (agent --service-account-token-path), checked with the
    /// apiserver's `TokenReview` API; the node is the one the token's pod runs on. No client certificate
    /// is needed then.
    #[arg(long, env = "SPOKE_SERVER_AGENT_AUTH", value_enum, default_value_t = AgentAuth::NodeCert)]
    pub agent_auth: AgentAuth,
    /// What agents may announce. `node-objects`: only their own Node's addresses (`status.addresses`)
    /// and CIDRs inside its `spec.podCIDRs`, read from the apiserver (which needs get, list and watch on
    /// nodes); a session whose Node changes so that its claims no longer hold, or is deleted, is ended.
    /// `trusted`: whatever they announce (for development and clusters without apiserver access:
    /// logged as a warning at start).
    #[arg(long, env = "SPOKE_SERVER_AGENT_CLAIMS", value_enum, default_value_t = AgentClaims::NodeObjects)]
    pub agent_claims: AgentClaims,
    /// The cluster's Service CIDRs (kube-apiserver's --service-cluster-ip-range). Every node reaches
    /// services, so a destination inside them that no agent announced goes to any agent (the less
    /// loaded of two), and with `--agent-claims node-objects` an agent may announce a CIDR inside them.
    #[arg(long, env = "SPOKE_SERVER_SERVICE_CIDRS", value_delimiter = ',')]
    pub service_cidrs: Vec<IpNet>,
    /// The cluster's pod network (kubeadm's --pod-network-cidr), for clusters where the server cannot
    /// read Node objects: a pod address that no agent's own CIDR matches goes to any agent, which
    /// reaches it over the pod network. With Node objects, each node's `spec.podCIDRs` route to its own
    /// agent first.
    #[arg(long, env = "SPOKE_SERVER_POD_NETWORK_CIDRS", value_delimiter = ',')]
    pub pod_network_cidrs: Vec<IpNet>,
    /// Kubeconfig file for the apiserver (Node watch, `TokenReview`); without it, the pod's in-cluster
    /// credentials. Used only with `--agent-claims node-objects` or `--agent-auth token`.
    #[arg(long, env = "SPOKE_SERVER_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// With `--agent-auth token`: the audience agents' tokens must be issued for.
    #[arg(long, env = "SPOKE_SERVER_AUTHENTICATION_AUDIENCE", default_value = "spoke-server")]
    pub authentication_audience: String,
    /// With `--agent-auth token`: the namespace of the agents' service account.
    #[arg(long, env = "SPOKE_SERVER_AGENT_NAMESPACE", default_value = "kube-system")]
    pub agent_namespace: String,
    /// With `--agent-auth token`: the agents' service account.
    #[arg(long, env = "SPOKE_SERVER_AGENT_SERVICE_ACCOUNT", default_value = "spoke-agent")]
    pub agent_service_account: String,
    /// With `--agent-auth token`: token reviews sent to the apiserver per second at most (bursts of up
    /// to one second's worth); agents beyond it are refused and retry with backoff.
    #[arg(long, env = "SPOKE_SERVER_TOKEN_REVIEW_QPS", default_value_t = 50)]
    pub token_review_qps: u32,
    /// With `--agent-auth token`: token reviews in flight at most.
    #[arg(long, env = "SPOKE_SERVER_MAX_TOKEN_REVIEWS_IN_FLIGHT", default_value_t = 16)]
    pub max_token_reviews_in_flight: usize,
    /// With `--agent-auth token`: how long an accepted token's review is reused (never past the token's
    /// expiry, and forgotten at once when the pod it is bound to is deleted); a refused one is
    /// remembered for 10 s.
    #[arg(long, env = "SPOKE_SERVER_TOKEN_REVIEW_CACHE_TTL", default_value = "60s", value_parser = parse_duration)]
    pub token_review_cache_ttl: Duration,
    /// Agents (by id: with `--agent-auth node-cert`, node names) that may announce themselves as a
    /// default route, taking every destination no other strategy matched; `*` for any agent. An agent
    /// not listed that announces it is refused. Empty (the default): none may.
    #[arg(long, env = "SPOKE_SERVER_DEFAULT_ROUTE_AGENTS", value_delimiter = ',')]
    pub default_route_agents: Vec<String>,
    /// Accept data connections without TLS (agents started with `--tunnel-tls off`), for networks whose
    /// underlay is already encrypted (`WireGuard`, `IPsec`). Control channels always use mutual TLS.
    #[arg(long, env = "SPOKE_SERVER_ALLOW_PLAINTEXT_TUNNEL")]
    pub allow_plaintext_tunnel: bool,
    /// How streams from the Unix-socket frontend over plaintext data connections are relayed (TLS ones
    /// are always copied in user space).
    #[arg(long, env = "SPOKE_SERVER_DATAPATH", default_value = "auto", value_parser = server_mode())]
    pub datapath: Mode,
    /// Log format.
    #[arg(long, env = "SPOKE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
    /// Validate the configuration (including TLS files), print every flag's effective value and its
    /// source as one JSON document (format 1, docs/operations.md), and exit 0.
    #[arg(long)]
    pub check_config: bool,
}

/// How agents prove which node they are: `--agent-auth`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AgentAuth {
    /// The kubelet's client certificate names the node.
    NodeCert,
    /// Any certificate from the cluster CA; the agent names itself.
    SharedCert,
    /// A service-account token, reviewed by the apiserver, names the node through its pod.
    Token,
}

/// The frontend protocols served: `--mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FrontendMode {
    /// HTTP CONNECT and the gRPC tunnel, on the same sockets.
    Both,
    /// Only the gRPC tunnel (`proxyProtocol: GRPC`).
    Grpc,
    /// Only HTTP CONNECT (`proxyProtocol: HTTPConnect`).
    HttpConnect,
}

impl FrontendMode {
    /// Whether the gRPC tunnel is served.
    #[must_use]
    pub fn grpc(self) -> bool {
        self != Self::HttpConnect
    }

    /// Whether HTTP CONNECT is served.
    #[must_use]
    pub fn http_connect(self) -> bool {
        self != Self::Grpc
    }
}

/// What agents may announce: `--agent-claims`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AgentClaims {
    /// Only what their Node object states.
    NodeObjects,
    /// Whatever they announce.
    Trusted,
}

/// The CONNECT frontend on TCP with mutual TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpFrontend {
    /// Its address.
    pub bind: SocketAddr,
    /// Its certificate and key, and the CA its clients' certificates chain to.
    pub tls: TlsFiles,
    /// Names a client's certificate must carry one of.
    pub allowed_names: Vec<String>,
}

/// Limits and timeouts of the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// See [`ServerArgs::max_frontend_conns`].
    pub max_frontend_conns: usize,
    /// See [`ServerArgs::max_streams`].
    pub max_streams: usize,
    /// See [`ServerArgs::max_parked_conns`].
    pub max_parked_conns: usize,
    /// See [`ServerArgs::max_streams_per_agent`].
    pub max_streams_per_agent: usize,
    /// See [`ServerArgs::max_pending_dials`].
    pub max_pending_dials: usize,
    /// See [`ServerArgs::max_agents`].
    pub max_agents: usize,
    /// See [`ServerArgs::max_agent_handshakes`].
    pub max_agent_handshakes: usize,
    /// See [`ServerArgs::max_handshakes_per_source`].
    pub max_handshakes_per_source: usize,
    /// See [`ServerArgs::max_idle_per_agent`].
    pub max_idle_per_agent: usize,
    /// See [`ServerArgs::idle_pool_timeout`].
    pub idle_pool_timeout: Duration,
    /// See [`ServerArgs::header_timeout`].
    pub header_timeout: Duration,
    /// See [`ServerArgs::backend_dial_timeout`].
    pub dial_timeout: Duration,
    /// See [`ServerArgs::handshake_timeout`].
    pub handshake_timeout: Duration,
    /// See [`ServerArgs::heartbeat_interval`].
    pub heartbeat_interval: Duration,
    /// See [`ServerArgs::tcp_user_timeout`].
    pub tcp_user_timeout: Duration,
    /// See [`ServerArgs::max_session_age`].
    pub max_session_age: Duration,
    /// See [`ServerArgs::graceful_shutdown_timeout`].
    pub grace_period: Duration,
    /// See [`ServerArgs::readiness_grace`].
    pub readiness_grace: Duration,
    /// See [`ServerArgs::drain_idle_timeout`].
    pub drain_idle_timeout: Duration,
}

/// Validated configuration of `spoke-server`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Unix socket path of the CONNECT frontend.
    pub uds_name: Option<PathBuf>,
    /// The mutual-TLS CONNECT frontend on TCP.
    pub frontend: Option<TcpFrontend>,
    /// The protocols the frontends take.
    pub mode: FrontendMode,
    /// Agent listener address.
    pub agent_bind: SocketAddr,
    /// TLS files of the agent listener.
    pub agent_tls: TlsFiles,
    /// Admin listener address.
    pub admin_bind: Option<SocketAddr>,
    /// Routing strategies in order.
    pub strategies: Vec<Strategy>,
    /// This replica's id.
    pub server_id: String,
    /// Replicas agents should reach.
    pub server_count: u16,
    /// Where agents send this replica's data connections (empty: where the control channel went).
    pub advertise_address: String,
    /// How agents prove which node they are.
    pub agent_auth: AgentAuth,
    /// Agents that may announce a default route (`*`: any).
    pub default_route_agents: Vec<String>,
    /// What agents may announce.
    pub agent_claims: AgentClaims,
    /// Service CIDRs: any agent may announce them, and any agent takes them.
    pub service_cidrs: Vec<IpNet>,
    /// The pod network: any agent takes what no agent's own CIDR matches.
    pub pod_network_cidrs: Vec<IpNet>,
    /// The apiserver, where claims or tokens are checked with it.
    pub apiserver: Option<Access>,
    /// How tokens are checked (`--agent-auth token`).
    pub tokens: Option<TokenPolicy>,
    /// The replica count from Leases (`--enable-lease-controller`).
    pub leases: Option<LeaseConfig>,
    /// Whether data connections may skip TLS.
    pub allow_plaintext_tunnel: bool,
    /// How streams are relayed.
    pub datapath: Mode,
    /// Runtime worker threads (0: one per CPU).
    pub worker_threads: usize,
    /// Limits and timeouts.
    pub limits: ServerLimits,
    /// What the caps may hold, and the memory limit it was checked against (if any).
    pub memory: (Budget, Option<MemoryLimit>),
}

impl ServerConfig {
    /// Whether agents must present a client certificate: not when they authenticate with a token.
    #[must_use]
    pub fn agent_client_certs(&self) -> ClientCerts {
        if self.agent_auth == AgentAuth::Token { ClientCerts::Optional } else { ClientCerts::Required }
    }
}

impl TryFrom<ServerArgs> for ServerConfig {
    type Error = ConfigError;

    fn try_from(a: ServerArgs) -> Result<Self, ConfigError> {
        let tokens = token_policy(&a)?;
        let leases = lease_config(&a)?;
        if a.uds_name.is_none() && a.frontend_bind.is_none() {
            return err("no frontend: give --uds-name, --frontend-bind, or both");
        }
        let (caps, memory) = memory_budget(&a, a.frontend_bind.is_some())?;
        let frontend = match (a.frontend_bind, a.server_ca_cert, a.server_cert, a.server_key) {
            (None, None, None, None) if a.frontend_allowed_names.is_empty() => None,
            (Some(bind), Some(ca), Some(cert), Some(key)) => {
                let allowed_names = a.frontend_allowed_names;
                if allowed_names.is_empty() || allowed_names.iter().any(String::is_empty) {
                    return err(
                        "--frontend-bind needs --frontend-allowed-names: the names of the apiserver's client \
                         certificate (any other certificate from --server-ca-cert is refused)",
                    );
                }
                Some(TcpFrontend { bind, tls: TlsFiles { ca, cert, key }, allowed_names })
            }
            (Some(_), ..) => {
                return err("--frontend-bind needs --server-ca-cert, --server-cert and --server-key (mTLS)");
            }
            (None, ..) => {
                return err(
                    "--server-ca-cert/--server-cert/--server-key/--frontend-allowed-names given without \
                     --frontend-bind",
                );
            }
        };
        if a.proxy_strategies.is_empty() {
            return err("--proxy-strategies is empty");
        }
        if a.server_id.is_empty() || a.server_id.len() > MAX_STRING_LEN {
            return err("--server-id must be 1 to 1024 bytes");
        }
        if a.server_count == 0 {
            return err("--server-count must be at least 1");
        }
        // A port is required (the agents' own default port is not known here): 0 stands for none.
        if let Some(addr) = &a.advertise_address
            && ServerAddr::parse(addr, 0).map_or(true, |parsed| parsed.port == 0)
        {
            return err(format!("--advertise-address {addr:?}: expected HOST:PORT"));
        }
        let apiserver = (a.agent_claims == AgentClaims::NodeObjects || tokens.is_some() || leases.is_some())
            .then(|| a.kubeconfig.map_or(Access::InCluster, Access::Kubeconfig));
        Ok(Self {
            uds_name: a.uds_name,
            frontend,
            mode: a.mode,
            agent_bind: a.agent_bind,
            agent_tls: TlsFiles { ca: a.cluster_ca_cert, cert: a.cluster_cert, key: a.cluster_key },
            admin_bind: parse_admin_bind(&a.admin_bind)?,
            strategies: a.proxy_strategies,
            server_id: a.server_id,
            server_count: a.server_count,
            advertise_address: a.advertise_address.unwrap_or_default(),
            agent_auth: a.agent_auth,
            default_route_agents: a.default_route_agents,
            agent_claims: a.agent_claims,
            service_cidrs: a.service_cidrs.iter().map(IpNet::trunc).collect(),
            pod_network_cidrs: a.pod_network_cidrs.iter().map(IpNet::trunc).collect(),
            apiserver,
            tokens,
            leases,
            allow_plaintext_tunnel: a.allow_plaintext_tunnel,
            datapath: a.datapath,
            worker_threads: a.worker_threads,
            limits: ServerLimits {
                max_frontend_conns: caps.frontend_conns.expect("settled"),
                max_streams: caps.streams.expect("settled"),
                max_parked_conns: caps.parked.expect("settled"),
                max_streams_per_agent: positive("--max-streams-per-agent", a.max_streams_per_agent)?,
                max_pending_dials: positive("--max-pending-dials", a.max_pending_dials)?,
                max_agents: caps.agents.expect("settled"),
                max_agent_handshakes: positive("--max-agent-handshakes", a.max_agent_handshakes)?,
                max_handshakes_per_source: positive(
                    "--max-handshakes-per-source",
                    a.max_handshakes_per_source,
                )?,
                max_idle_per_agent: positive("--max-idle-per-agent", a.max_idle_per_agent)?,
                idle_pool_timeout: nonzero_duration("--idle-pool-timeout", a.idle_pool_timeout)?,
                header_timeout: nonzero_duration("--header-timeout", a.header_timeout)?,
                dial_timeout: nonzero_duration("--backend-dial-timeout", a.backend_dial_timeout)?,
                handshake_timeout: nonzero_duration("--handshake-timeout", a.handshake_timeout)?,
                heartbeat_interval: nonzero_duration("--heartbeat-interval", a.heartbeat_interval)?,
                tcp_user_timeout: a.tcp_user_timeout,
                max_session_age: nonzero_duration("--max-session-age", a.max_session_age)?,
                grace_period: a.graceful_shutdown_timeout,
                readiness_grace: a.readiness_grace,
                drain_idle_timeout: nonzero_duration("--drain-idle-timeout", a.drain_idle_timeout)?,
            },
            memory,
        })
    }
}

impl ServerConfig {
    /// What the server reads from the apiserver, for messages: "Node objects (--agent-claims
    /// node-objects), token reviews (--agent-auth token)".
    #[must_use]
    pub fn apiserver_uses(&self) -> String {
        let mut uses = Vec::new();
        if self.agent_claims == AgentClaims::NodeObjects {
            uses.push("Node objects (--agent-claims node-objects, the default)");
        }
        if self.tokens.is_some() {
            uses.push("token reviews (--agent-auth token)");
        }
        if self.leases.is_some() {
            uses.push("Leases (--enable-lease-controller)");
        }
        uses.join(", ")
    }
}

/// The caps settled against the memory limit (`--memory-limit`, or the cgroup's), and the budget.
fn memory_budget(
    a: &ServerArgs,
    tcp_frontend: bool,
) -> Result<(Caps, (Budget, Option<MemoryLimit>)), ConfigError> {
    for (name, v) in [
        ("--max-frontend-conns", a.max_frontend_conns),
        ("--max-streams", a.max_streams),
        ("--max-agents", a.max_agents),
        ("--max-parked-conns", a.max_parked_conns),
    ] {
        if v == Some(0) {
            return err(format!("{name} must be at least 1"));
        }
    }
    let caps = Caps {
        handshakes: positive("--max-agent-handshakes", a.max_agent_handshakes)?,
        agents: a.max_agents,
        parked: a.max_parked_conns,
        frontend_conns: a.max_frontend_conns,
        streams: a.max_streams,
    };
    let carriage = Carriage {
        datapath: a.datapath,
        plaintext: a.allow_plaintext_tunnel,
        grpc: a.mode.grpc(),
        tcp_frontend,
    };
    let limit = match a.memory_limit {
        Some(bytes) => Some(MemoryLimit { bytes, source: "--memory-limit".into() }),
        None => crate::budget::cgroup_limit(),
    };
    let (caps, budget) = super::memory::budget(caps, carriage, limit.as_ref()).map_err(ConfigError)?;
    Ok((caps, (budget, limit)))
}

/// How tokens are checked, with `--agent-auth token`.
fn token_policy(a: &ServerArgs) -> Result<Option<TokenPolicy>, ConfigError> {
    if a.agent_auth != AgentAuth::Token {
        return Ok(None);
    }
    if [&a.authentication_audience, &a.agent_namespace, &a.agent_service_account].iter().any(|s| s.is_empty())
    {
        return err(
            "--agent-auth token needs --authentication-audience, --agent-namespace and --agent-service-account",
        );
    }
    Ok(Some(TokenPolicy {
        audience: a.authentication_audience.clone(),
        namespace: a.agent_namespace.clone(),
        service_account: a.agent_service_account.clone(),
        cache_ttl: a.token_review_cache_ttl,
        qps: positive("--token-review-qps", a.token_review_qps)?,
        max_in_flight: positive("--max-token-reviews-in-flight", a.max_token_reviews_in_flight)?,
    }))
}

/// How the replica count comes from Leases, with `--enable-lease-controller`.
fn lease_config(a: &ServerArgs) -> Result<Option<LeaseConfig>, ConfigError> {
    if !a.enable_lease_controller {
        return Ok(None);
    }
    let label = match a.lease_label.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => (k.to_owned(), v.to_owned()),
        _ => return err(format!("--lease-label {:?}: expected KEY=VALUE", a.lease_label)),
    };
    if a.lease_namespace.is_empty() {
        return err("--lease-namespace is empty");
    }
    let duration = nonzero_duration("--lease-duration", a.lease_duration)?;
    let renew_every = nonzero_duration("--lease-renewal-interval", a.lease_renewal_interval)?;
    if renew_every >= duration {
        return err("--lease-renewal-interval must be shorter than --lease-duration");
    }
    Ok(Some(LeaseConfig { namespace: a.lease_namespace.clone(), label, duration, renew_every }))
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
