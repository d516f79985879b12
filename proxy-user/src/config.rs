//! Command-line flags (with `SPOKE_SERVER_*` / `SPOKE_AGENT_*` environment fallbacks) and the validated
//! configurations built from them. Only the validated `*Config` values travel past `main`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use ipnet::IpNet;

use crate::agent::policy::{AllowRule, Policy};
use crate::datapath::sockmap::stream::Limits;
use crate::protocol::{Identity, MAX_LIST_LEN, MAX_STRING_LEN};
use crate::transport::tls::TlsFiles;

/// A flag or combination of flags that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// Parses `500ms`, `5s`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit() && c != '.').map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?} (examples: 500ms, 5s, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration unit in {s:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("duration {s:?} out of range"))
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// How the server picks the agent for a destination; tried in the configured order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// An agent whose node name, host names or addresses equal the destination host.
    DestHost,
    /// The agent announcing the longest CIDR prefix that contains the destination address.
    Cidr,
    /// An agent that announced itself as a default route.
    DefaultRoute,
    /// Any connected agent.
    Default,
}

impl FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "destHost" => Ok(Self::DestHost),
            "cidr" => Ok(Self::Cidr),
            "defaultRoute" => Ok(Self::DefaultRoute),
            "default" => Ok(Self::Default),
            _ => Err(format!("unknown proxy strategy {s:?} (destHost, cidr, defaultRoute, default)")),
        }
    }
}

/// `spoke-server`: takes kube-apiserver's CONNECT requests and routes each through the agent of the node
/// that serves the destination.
#[derive(Debug, Parser)]
#[command(name = "spoke-server", version, about)]
pub struct ServerArgs {
    /// Unix socket for the apiserver's CONNECT requests (created 0600; a stale file is replaced).
    #[arg(long, env = "SPOKE_SERVER_UDS_NAME")]
    pub uds_name: Option<PathBuf>,
    /// TCP address for CONNECT requests over mutual TLS (needs --server-cert, --server-key, --server-ca-cert).
    #[arg(long, env = "SPOKE_SERVER_FRONTEND_BIND")]
    pub frontend_bind: Option<SocketAddr>,
    /// CA bundle that CONNECT clients' certificates must chain to.
    #[arg(long, env = "SPOKE_SERVER_SERVER_CA_CERT")]
    pub server_ca_cert: Option<PathBuf>,
    /// Certificate of the TCP frontend.
    #[arg(long, env = "SPOKE_SERVER_SERVER_CERT")]
    pub server_cert: Option<PathBuf>,
    /// Private key of the TCP frontend.
    #[arg(long, env = "SPOKE_SERVER_SERVER_KEY")]
    pub server_key: Option<PathBuf>,
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
    /// Number of server replicas agents should connect to.
    #[arg(long, env = "SPOKE_SERVER_SERVER_COUNT", default_value_t = 1)]
    pub server_count: u16,
    /// Most CONNECT connections open at once (reading, dialing or relaying).
    #[arg(long, env = "SPOKE_SERVER_MAX_FRONTEND_CONNS", default_value_t = 16_384)]
    pub max_frontend_conns: usize,
    /// Most streams relayed through one agent at once; beyond it requests get 503.
    #[arg(long, env = "SPOKE_SERVER_MAX_STREAMS_PER_AGENT", default_value_t = 4096)]
    pub max_streams_per_agent: usize,
    /// Most dials waiting for an agent at once; beyond it requests get 503.
    #[arg(long, env = "SPOKE_SERVER_MAX_PENDING_DIALS", default_value_t = 1024)]
    pub max_pending_dials: usize,
    /// Most agents connected at once.
    #[arg(long, env = "SPOKE_SERVER_MAX_AGENTS", default_value_t = 10_000)]
    pub max_agents: usize,
    /// Most idle data connections one agent may park.
    #[arg(long, env = "SPOKE_SERVER_MAX_IDLE_PER_AGENT", default_value_t = 256)]
    pub max_idle_per_agent: usize,
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
    /// How long open streams may go on after SIGTERM.
    #[arg(long, env = "SPOKE_SERVER_GRACEFUL_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub graceful_shutdown_timeout: Duration,
    /// Runtime worker threads; 0 means one per CPU.
    #[arg(long, env = "SPOKE_SERVER_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
    /// Accept data connections without TLS (agents started with `--tunnel-tls off`), for networks whose
    /// underlay is already encrypted (`WireGuard`, `IPsec`). Control channels always use mutual TLS.
    #[arg(long, env = "SPOKE_SERVER_ALLOW_PLAINTEXT_TUNNEL")]
    pub allow_plaintext_tunnel: bool,
    /// How streams from the Unix-socket frontend over plaintext data connections are relayed (TLS ones
    /// are always copied in user space).
    #[arg(long, env = "SPOKE_SERVER_DATAPATH", value_enum, default_value_t = ServerDatapath::Auto)]
    pub datapath: ServerDatapath,
    /// Log format.
    #[arg(long, env = "SPOKE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
    /// Validate the configuration (including TLS files), print it, and exit 0.
    #[arg(long)]
    pub check_config: bool,
}

/// How the server moves a stream's bytes between the frontend connection and the data connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ServerDatapath {
    /// The best tier the stream allows: splice where both sockets carry plaintext in the kernel (a
    /// Unix-socket client over a plaintext data connection), copy otherwise.
    Auto,
    /// The userspace copy, for every stream.
    Copy,
    /// splice(2) through a pipe where both sockets carry plaintext; the other streams are copied.
    Splice,
}

/// Limits and timeouts of the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// See [`ServerArgs::max_frontend_conns`].
    pub max_frontend_conns: usize,
    /// See [`ServerArgs::max_streams_per_agent`].
    pub max_streams_per_agent: usize,
    /// See [`ServerArgs::max_pending_dials`].
    pub max_pending_dials: usize,
    /// See [`ServerArgs::max_agents`].
    pub max_agents: usize,
    /// See [`ServerArgs::max_idle_per_agent`].
    pub max_idle_per_agent: usize,
    /// See [`ServerArgs::header_timeout`].
    pub header_timeout: Duration,
    /// See [`ServerArgs::backend_dial_timeout`].
    pub dial_timeout: Duration,
    /// See [`ServerArgs::handshake_timeout`].
    pub handshake_timeout: Duration,
    /// See [`ServerArgs::heartbeat_interval`].
    pub heartbeat_interval: Duration,
    /// See [`ServerArgs::graceful_shutdown_timeout`].
    pub grace_period: Duration,
}

/// Validated configuration of `spoke-server`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Unix socket path of the CONNECT frontend.
    pub uds_name: Option<PathBuf>,
    /// TCP address of the mTLS CONNECT frontend, with its TLS files.
    pub frontend: Option<(SocketAddr, TlsFiles)>,
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
    /// Whether data connections may skip TLS.
    pub allow_plaintext_tunnel: bool,
    /// How streams are relayed.
    pub datapath: ServerDatapath,
    /// Runtime worker threads (0: one per CPU).
    pub worker_threads: usize,
    /// Limits and timeouts.
    pub limits: ServerLimits,
}

fn parse_admin_bind(s: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if s == "off" {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| ConfigError(format!("--admin-bind {s:?}: expected ADDRESS:PORT or off")))
}

fn positive(name: &str, v: usize) -> Result<usize, ConfigError> {
    if v == 0 { err(format!("{name} must be at least 1")) } else { Ok(v) }
}

fn nonzero_duration(name: &str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() { err(format!("{name} must be longer than 0")) } else { Ok(d) }
}

impl TryFrom<ServerArgs> for ServerConfig {
    type Error = ConfigError;

    fn try_from(a: ServerArgs) -> Result<Self, ConfigError> {
        if a.uds_name.is_none() && a.frontend_bind.is_none() {
            return err("no frontend: give --uds-name, --frontend-bind, or both");
        }
        let frontend = match (a.frontend_bind, a.server_ca_cert, a.server_cert, a.server_key) {
            (None, None, None, None) => None,
            (Some(addr), Some(ca), Some(cert), Some(key)) => Some((addr, TlsFiles { ca, cert, key })),
            (Some(_), ..) => {
                return err("--frontend-bind needs --server-ca-cert, --server-cert and --server-key (mTLS)");
            }
            (None, ..) => {
                return err("--server-ca-cert/--server-cert/--server-key given without --frontend-bind");
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
        Ok(Self {
            uds_name: a.uds_name,
            frontend,
            agent_bind: a.agent_bind,
            agent_tls: TlsFiles { ca: a.cluster_ca_cert, cert: a.cluster_cert, key: a.cluster_key },
            admin_bind: parse_admin_bind(&a.admin_bind)?,
            strategies: a.proxy_strategies,
            server_id: a.server_id,
            server_count: a.server_count,
            allow_plaintext_tunnel: a.allow_plaintext_tunnel,
            datapath: a.datapath,
            worker_threads: a.worker_threads,
            limits: ServerLimits {
                max_frontend_conns: positive("--max-frontend-conns", a.max_frontend_conns)?,
                max_streams_per_agent: positive("--max-streams-per-agent", a.max_streams_per_agent)?,
                max_pending_dials: positive("--max-pending-dials", a.max_pending_dials)?,
                max_agents: positive("--max-agents", a.max_agents)?,
                max_idle_per_agent: positive("--max-idle-per-agent", a.max_idle_per_agent)?,
                header_timeout: nonzero_duration("--header-timeout", a.header_timeout)?,
                dial_timeout: nonzero_duration("--backend-dial-timeout", a.backend_dial_timeout)?,
                handshake_timeout: nonzero_duration("--handshake-timeout", a.handshake_timeout)?,
                heartbeat_interval: nonzero_duration("--heartbeat-interval", a.heartbeat_interval)?,
                grace_period: a.graceful_shutdown_timeout,
            },
        })
    }
}

/// How the agent moves a stream's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DatapathMode {
    /// The fastest tier the stream allows, as measured on the kernels tried (docs/benchmarks.md): splice
    /// for plaintext tunnels, copy for TLS ones; the choice and the reason are logged at start.
    Auto,
    /// The userspace copy (tokio and rustls, adaptive buffers up to 256 KiB).
    Copy,
    /// splice(2) through a pipe, kernel to kernel; plaintext tunnels only (TLS ones fall back to copy).
    Splice,
    /// eBPF sockmap redirect, kernel to kernel with no syscall per chunk; plaintext tunnels only (TLS
    /// ones, and streams whose sockets cannot be inserted, fall back to copy). Needs root and BPF.
    Sockmap,
}

/// Whether the agent's data connections use TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TunnelTls {
    /// Mutual TLS 1.3 (the default).
    On,
    /// Plain TCP, for an underlay that is already encrypted; the server must allow it.
    Off,
}

/// `spoke-agent`: dials out to spoke-server and connects the server's streams to node-local targets.
#[derive(Debug, Parser)]
#[command(name = "spoke-agent", version, about)]
pub struct AgentArgs {
    /// Host name or address of spoke-server's agent listener.
    #[arg(long, env = "SPOKE_AGENT_PROXY_SERVER_HOST")]
    pub proxy_server_host: String,
    /// Port of spoke-server's agent listener.
    #[arg(long, env = "SPOKE_AGENT_PROXY_SERVER_PORT", default_value_t = 8091)]
    pub proxy_server_port: u16,
    /// Name the server's certificate must carry (default: --proxy-server-host).
    #[arg(long, env = "SPOKE_AGENT_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// CA bundle that the server's certificate must chain to.
    #[arg(long, env = "SPOKE_AGENT_CA_CERT")]
    pub ca_cert: PathBuf,
    /// Certificate presented to the server.
    #[arg(long, env = "SPOKE_AGENT_AGENT_CERT")]
    pub agent_cert: PathBuf,
    /// Private key of --agent-cert.
    #[arg(long, env = "SPOKE_AGENT_AGENT_KEY")]
    pub agent_key: PathBuf,
    /// Unique agent name (default: --node-name).
    #[arg(long, env = "SPOKE_AGENT_AGENT_ID")]
    pub agent_id: Option<String>,
    /// Kubernetes node name (default: this machine's host name).
    #[arg(long, env = "SPOKE_AGENT_NODE_NAME")]
    pub node_name: Option<String>,
    /// What this agent serves, as `host=NAME&ipv4=ADDR&ipv6=ADDR&cidr=NET&default-route=true` (each key
    /// may repeat). ipv4/ipv6 are the node's addresses (kubelet), cidr the pod CIDR(s).
    #[arg(long, env = "SPOKE_AGENT_AGENT_IDENTIFIERS", default_value = "")]
    pub agent_identifiers: String,
    /// Service CIDR(s) this agent may dial into (any port); announced for cidr routing.
    #[arg(long, env = "SPOKE_AGENT_SERVICE_CIDR", value_delimiter = ',')]
    pub service_cidr: Vec<IpNet>,
    /// Port of the kubelet on the node's own addresses.
    #[arg(long, env = "SPOKE_AGENT_KUBELET_PORT", default_value_t = 10250)]
    pub kubelet_port: u16,
    /// Extra allowed destinations, `NET` or `NET@PORT` or `NET@LOW-HIGH` (comma-separated or repeated).
    /// The only way to reach loopback or link-local addresses.
    #[arg(long, env = "SPOKE_AGENT_ALLOW", value_delimiter = ',')]
    pub allow: Vec<AllowRule>,
    /// Idle data connections kept parked at the server, ready for dials.
    #[arg(long, env = "SPOKE_AGENT_POOL_SIZE", default_value_t = 8)]
    pub pool_size: usize,
    /// Longest time a target dial may take (the server's timeout applies when shorter).
    #[arg(long, env = "SPOKE_AGENT_DIAL_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub dial_timeout: Duration,
    /// Time a connection to the server (TCP, TLS and first frame) may take.
    #[arg(long, env = "SPOKE_AGENT_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// First reconnect delay; doubles up to --reconnect-max, with jitter.
    #[arg(long, env = "SPOKE_AGENT_RECONNECT_MIN", default_value = "200ms", value_parser = parse_duration)]
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    #[arg(long, env = "SPOKE_AGENT_RECONNECT_MAX", default_value = "30s", value_parser = parse_duration)]
    pub reconnect_max: Duration,
    /// How long open streams may go on after SIGTERM.
    #[arg(long, env = "SPOKE_AGENT_GRACEFUL_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub graceful_shutdown_timeout: Duration,
    /// Address of /livez, /readyz and /metrics; "off" disables it.
    #[arg(long, env = "SPOKE_AGENT_ADMIN_BIND", default_value = "127.0.0.1:8094")]
    pub admin_bind: String,
    /// Datapath tier for streams.
    #[arg(long, env = "SPOKE_AGENT_DATAPATH", value_enum, default_value_t = DatapathMode::Auto)]
    pub datapath: DatapathMode,
    /// Sockmap tier: bytes one direction of a stream may hold in the kernel on their way out (redirected
    /// or copied, not yet acknowledged by the receiver); beyond it the direction pauses, holding its
    /// sender through TCP flow control. Spliced sockets get a send buffer of four times this.
    /// Ki/Mi/Gi suffixes.
    #[arg(long, env = "SPOKE_AGENT_SOCKMAP_BACKLOG_LIMIT", default_value = "2Mi", value_parser = parse_size)]
    pub sockmap_backlog_limit: u64,
    /// Sockmap tier: a stream whose receiver takes no bytes for this long while the agent waits to pass
    /// on its end is reset.
    #[arg(long, env = "SPOKE_AGENT_SOCKMAP_STALL_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub sockmap_stall_timeout: Duration,
    /// Sockmap tier: the BPF filesystem (mounted there if needed); maps and programs are pinned in
    /// `<bpf-root>/spoke/<agent id>`, and pins left there by a killed agent are removed at start.
    #[arg(long, env = "SPOKE_AGENT_BPF_ROOT", default_value = crate::datapath::sockmap::DEFAULT_BPF_ROOT)]
    pub bpf_root: PathBuf,
    /// Runtime worker threads; 0 means one per CPU.
    #[arg(long, env = "SPOKE_AGENT_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
    /// TLS on data connections. `off` sends stream bytes unencrypted between node and control plane:
    /// only for networks whose underlay is already encrypted. The control channel always uses TLS.
    #[arg(long, env = "SPOKE_AGENT_TUNNEL_TLS", value_enum, default_value_t = TunnelTls::On)]
    pub tunnel_tls: TunnelTls,
    /// Log format.
    #[arg(long, env = "SPOKE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
    /// Validate the configuration (including TLS files), print it, and exit 0.
    #[arg(long)]
    pub check_config: bool,
}

/// Validated configuration of `spoke-agent`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// Server host (to dial).
    pub server_host: String,
    /// Server port.
    pub server_port: u16,
    /// Name the server certificate must carry.
    pub tls_server_name: String,
    /// TLS files.
    pub tls: TlsFiles,
    /// What the agent announces.
    pub identity: Identity,
    /// Which destinations it dials.
    pub policy: Policy,
    /// Idle data connections to keep parked.
    pub pool_size: usize,
    /// Longest target dial.
    pub dial_timeout: Duration,
    /// Longest server connection set-up.
    pub connect_timeout: Duration,
    /// Reconnect backoff bounds.
    pub reconnect: (Duration, Duration),
    /// Drain time after SIGTERM.
    pub grace_period: Duration,
    /// Admin listener.
    pub admin_bind: Option<SocketAddr>,
    /// Datapath tier.
    pub datapath: DatapathMode,
    /// Bounds of streams in the sockmap tier.
    pub sockmap_limits: Limits,
    /// BPF filesystem for the sockmap tier's pins.
    pub bpf_root: PathBuf,
    /// TLS on data connections.
    pub tunnel_tls: TunnelTls,
    /// Runtime worker threads (0: one per CPU).
    pub worker_threads: usize,
}

/// Smallest `--sockmap-backlog-limit`: one full-sized skb must fit.
pub const MIN_SOCKMAP_BACKLOG: u64 = 64 * 1024;
/// Largest `--sockmap-backlog-limit` (spliced sockets get four times this as send buffer).
pub const MAX_SOCKMAP_BACKLOG: u64 = 64 << 20;

/// Parses a byte count with an optional `Ki`, `Mi` or `Gi` suffix.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let shift = match unit {
        "" => 0,
        "Ki" => 10,
        "Mi" => 20,
        "Gi" => 30,
        _ => return Err(format!("{s:?}: expected a byte count such as 65536, 512Ki, 4Mi or 1Gi")),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?}: expected a byte count such as 4Mi"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("{s:?}: too large"))
}

/// Most idle data connections an agent may keep parked (the server's default per-agent limit).
pub const MAX_POOL_SIZE: usize = 256;

fn parse_identifiers(s: &str, identity: &mut Identity) -> Result<(), ConfigError> {
    for pair in s.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| ConfigError(format!("--agent-identifiers: {pair:?} is not key=value")))?;
        let bad = |what: &str| ConfigError(format!("--agent-identifiers: {key}={value:?} is not {what}"));
        match key {
            "host" => {
                if value.is_empty() || value.len() > MAX_STRING_LEN {
                    return Err(bad("a host name"));
                }
                identity.hostnames.push(value.to_ascii_lowercase());
            }
            "ipv4" => identity.addresses.push(IpAddr::V4(value.parse().map_err(|_| bad("an IPv4 address"))?)),
            "ipv6" => identity.addresses.push(IpAddr::V6(value.parse().map_err(|_| bad("an IPv6 address"))?)),
            "cidr" => identity.cidrs.push(value.parse::<IpNet>().map_err(|_| bad("a CIDR"))?.trunc()),
            "default-route" => identity.default_route = value.parse().map_err(|_| bad("true or false"))?,
            _ => {
                return err(format!(
                    "--agent-identifiers: unknown key {key:?} (host, ipv4, ipv6, cidr, default-route)"
                ));
            }
        }
    }
    Ok(())
}

fn machine_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

impl TryFrom<AgentArgs> for AgentConfig {
    type Error = ConfigError;

    fn try_from(a: AgentArgs) -> Result<Self, ConfigError> {
        let node_name = match a.node_name.or_else(machine_hostname) {
            Some(n) if !n.is_empty() && n.len() <= MAX_STRING_LEN => n.to_ascii_lowercase(),
            _ => return err("--node-name is missing (and the host name could not be read)"),
        };
        let agent_id = a.agent_id.unwrap_or_else(|| node_name.clone());
        if agent_id.is_empty() || agent_id.len() > MAX_STRING_LEN {
            return err("--agent-id must be 1 to 1024 bytes");
        }
        let mut identity = Identity {
            agent_id,
            node_name,
            hostnames: Vec::new(),
            addresses: Vec::new(),
            cidrs: Vec::new(),
            default_route: false,
        };
        parse_identifiers(&a.agent_identifiers, &mut identity)?;
        let pod_cidrs = identity.cidrs.clone();
        identity.cidrs.extend(a.service_cidr.iter().map(IpNet::trunc));
        if identity.hostnames.len() > MAX_LIST_LEN
            || identity.addresses.len() > MAX_LIST_LEN
            || identity.cidrs.len() > MAX_LIST_LEN
        {
            return err(format!("--agent-identifiers: at most {MAX_LIST_LEN} of each kind"));
        }
        if a.proxy_server_host.is_empty() {
            return err("--proxy-server-host is empty");
        }
        if a.proxy_server_port == 0 {
            return err("--proxy-server-port must not be 0");
        }
        if a.pool_size == 0 || a.pool_size > MAX_POOL_SIZE {
            return err(format!("--pool-size must be 1 to {MAX_POOL_SIZE}"));
        }
        if a.reconnect_min.is_zero() || a.reconnect_min > a.reconnect_max {
            return err("--reconnect-min must be above 0 and at most --reconnect-max");
        }
        if !(MIN_SOCKMAP_BACKLOG..=MAX_SOCKMAP_BACKLOG).contains(&a.sockmap_backlog_limit) {
            return err(format!(
                "--sockmap-backlog-limit must be {MIN_SOCKMAP_BACKLOG} to {MAX_SOCKMAP_BACKLOG} bytes"
            ));
        }
        let sockmap_limits = Limits {
            backlog: a.sockmap_backlog_limit,
            stall: nonzero_duration("--sockmap-stall-timeout", a.sockmap_stall_timeout)?,
        };
        let policy = Policy {
            allow: a.allow,
            node_addresses: identity.addresses.clone(),
            kubelet_port: a.kubelet_port,
            served: pod_cidrs.into_iter().chain(a.service_cidr.iter().map(IpNet::trunc)).collect(),
        };
        Ok(Self {
            tls_server_name: a.tls_server_name.unwrap_or_else(|| a.proxy_server_host.clone()),
            server_host: a.proxy_server_host,
            server_port: a.proxy_server_port,
            tls: TlsFiles { ca: a.ca_cert, cert: a.agent_cert, key: a.agent_key },
            identity,
            policy,
            pool_size: a.pool_size,
            dial_timeout: nonzero_duration("--dial-timeout", a.dial_timeout)?,
            connect_timeout: nonzero_duration("--connect-timeout", a.connect_timeout)?,
            reconnect: (a.reconnect_min, a.reconnect_max),
            grace_period: a.graceful_shutdown_timeout,
            admin_bind: parse_admin_bind(&a.admin_bind)?,
            datapath: a.datapath,
            sockmap_limits,
            bpf_root: a.bpf_root,
            tunnel_tls: a.tunnel_tls,
            worker_threads: a.worker_threads,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(extra: &[&str]) -> Result<ServerConfig, String> {
        let base = [
            "spoke-server",
            "--cluster-ca-cert",
            "ca.pem",
            "--cluster-cert",
            "c.pem",
            "--cluster-key",
            "k.pem",
        ];
        let args = ServerArgs::try_parse_from(base.iter().chain(extra)).map_err(|e| e.to_string())?;
        ServerConfig::try_from(args).map_err(|e| e.to_string())
    }

    fn agent(extra: &[&str]) -> Result<AgentConfig, String> {
        let base = [
            "spoke-agent",
            "--proxy-server-host",
            "cp.example",
            "--ca-cert",
            "ca.pem",
            "--agent-cert",
            "a.pem",
            "--agent-key",
            "k.pem",
            "--node-name",
            "Node-A",
        ];
        let args = AgentArgs::try_parse_from(base.iter().chain(extra)).map_err(|e| e.to_string())?;
        AgentConfig::try_from(args).map_err(|e| e.to_string())
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("512Ki"), Ok(512 << 10));
        assert_eq!(parse_size("2Mi"), Ok(2 << 20));
        assert_eq!(parse_size("1Gi"), Ok(1 << 30));
        for bad in ["", "Mi", "2MB", "-1", "2 Mi", "99999999999999999999Gi"] {
            assert!(parse_size(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_mins(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn server_needs_a_frontend_and_complete_tls() {
        assert!(server(&[]).unwrap_err().contains("no frontend"));
        let ok = server(&["--uds-name", "/run/spoke.sock"]).unwrap();
        assert_eq!(ok.strategies, vec![Strategy::DestHost, Strategy::Cidr, Strategy::DefaultRoute]);
        assert_eq!(ok.limits.dial_timeout, Duration::from_secs(5));
        assert!(server(&["--frontend-bind", "127.0.0.1:8090"]).unwrap_err().contains("mTLS"));
        let tcp = server(&[
            "--frontend-bind",
            "127.0.0.1:8090",
            "--server-ca-cert",
            "a",
            "--server-cert",
            "b",
            "--server-key",
            "c",
        ])
        .unwrap();
        assert!(tcp.frontend.is_some());
        assert!(
            server(&["--uds-name", "s", "--server-cert", "b"])
                .unwrap_err()
                .contains("without --frontend-bind")
        );
    }

    #[test]
    fn server_rejects_bad_values() {
        assert!(
            server(&["--uds-name", "s", "--proxy-strategies", "destHost,nearest"])
                .unwrap_err()
                .contains("nearest")
        );
        assert!(server(&["--uds-name", "s", "--max-pending-dials", "0"]).unwrap_err().contains("at least 1"));
        assert!(
            server(&["--uds-name", "s", "--backend-dial-timeout", "0s"])
                .unwrap_err()
                .contains("longer than 0")
        );
        assert!(server(&["--uds-name", "s", "--admin-bind", "nowhere"]).unwrap_err().contains("admin-bind"));
        assert_eq!(server(&["--uds-name", "s", "--admin-bind", "off"]).unwrap().admin_bind, None);
    }

    #[test]
    fn agent_identifiers_and_policy() {
        let c = agent(&[
            "--agent-identifiers",
            "host=node-a.example&ipv4=10.0.0.5&ipv6=fd00::5&cidr=10.244.1.7/24&default-route=true",
            "--service-cidr",
            "10.96.0.0/12",
            "--allow",
            "127.0.0.0/8,169.254.0.0/16@80-81",
        ])
        .unwrap();
        assert_eq!(c.identity.node_name, "node-a");
        assert_eq!(c.identity.agent_id, "node-a");
        assert_eq!(c.identity.hostnames, vec!["node-a.example"]);
        assert_eq!(c.identity.addresses.len(), 2);
        let cidrs: Vec<String> = c.identity.cidrs.iter().map(ToString::to_string).collect();
        assert_eq!(cidrs, vec!["10.244.1.0/24", "10.96.0.0/12"]);
        assert!(c.identity.default_route);
        assert_eq!(c.policy.allow.len(), 2);
        assert_eq!(c.tls_server_name, "cp.example");
    }

    #[test]
    fn agent_rejects_bad_values() {
        assert!(agent(&["--agent-identifiers", "ipv4=fd00::1"]).unwrap_err().contains("IPv4"));
        assert!(agent(&["--agent-identifiers", "zone=a"]).unwrap_err().contains("unknown key"));
        assert!(agent(&["--agent-identifiers", "cidr"]).unwrap_err().contains("key=value"));
        assert!(agent(&["--pool-size", "0"]).unwrap_err().contains("--pool-size"));
        assert!(agent(&["--allow", "10.0.0.0/8@0-5"]).is_err());
        assert!(
            agent(&["--reconnect-min", "1m", "--reconnect-max", "1s"]).unwrap_err().contains("reconnect")
        );
    }
}
