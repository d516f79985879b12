//! `spoke-agent`'s flags (with `SPOKE_AGENT_*` environment fallbacks) and the validated configuration
//! built from them. Only [`AgentConfig`] travels past `main`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use ipnet::IpNet;

use super::policy::{AllowRule, Policy};
use crate::budget::{Budget, MemoryLimit, Term};
pub use crate::config::ServerAddr;
use crate::config::{ConfigError, err, nonzero_duration, parse_admin_bind, parse_duration, parse_size};
use crate::datapath::Mode;
use crate::datapath::sockmap::stream::Limits;
use crate::protocol::{Identity, MAX_LIST_LEN, MAX_STRING_LEN};
use crate::telemetry::LogFormat;
use crate::transport::tls::TlsFiles;

/// Whether the agent's data connections use TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TunnelTls {
    /// Mutual TLS 1.3 (the default).
    On,
    /// Plain TCP, for an underlay that is already encrypted; the server must allow it.
    Off,
}

/// How the agent proves which node it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// A client certificate (and the CA of the server's).
    Cert(TlsFiles),
    /// A service-account token file, and the CA of the server's certificate.
    Token {
        /// The CA bundle the server's certificate chains to.
        ca: PathBuf,
        /// The token file.
        path: PathBuf,
    },
}

/// `spoke-agent`: dials out to spoke-server and connects the server's streams to node-local targets.
#[derive(Debug, Parser)]
#[command(name = "spoke-agent", version, about)]
pub struct AgentArgs {
    /// Where spoke-server's agent listeners are: one address (a load balancer in front of the replicas,
    /// or the only server) or several (one per replica, or several balancers), comma-separated, each
    /// `HOST`, `HOST:PORT` or `[IPV6]:PORT`. The agent keeps a control channel to as many distinct
    /// replicas as the servers say there are.
    #[arg(long, env = "SPOKE_AGENT_PROXY_SERVER_HOST", value_delimiter = ',')]
    pub proxy_server_host: Vec<String>,
    /// Port of spoke-server's agent listener, where an address names none.
    #[arg(long, env = "SPOKE_AGENT_PROXY_SERVER_PORT", default_value_t = 8091)]
    pub proxy_server_port: u16,
    /// Name the server's certificate must carry (default: the host of the address dialed).
    #[arg(long, env = "SPOKE_AGENT_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// CA bundle that the server's certificate must chain to.
    #[arg(long, env = "SPOKE_AGENT_CA_CERT")]
    pub ca_cert: PathBuf,
    /// Certificate presented to the server: the kubelet's client certificate (server `--agent-auth
    /// node-cert`), reloaded when it rotates. Not with --service-account-token-path.
    #[arg(long, env = "SPOKE_AGENT_AGENT_CERT")]
    pub agent_cert: Option<PathBuf>,
    /// Private key of --agent-cert.
    #[arg(long, env = "SPOKE_AGENT_AGENT_KEY")]
    pub agent_key: Option<PathBuf>,
    /// A projected service-account token file (server `--agent-auth token`), sent instead of a client
    /// certificate; read again for every control channel, so the kubelet's refreshes are taken up.
    #[arg(long, env = "SPOKE_AGENT_SERVICE_ACCOUNT_TOKEN_PATH")]
    pub service_account_token_path: Option<PathBuf>,
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
    /// Most streams open at once (beyond it a dial is answered `Busy`, which the server gives the client
    /// as 503). Default: as many as fit the memory limit (docs/operations.md, "Memory budget"), at
    /// most 4096; a value that does not fit the limit is refused at start.
    #[arg(long, env = "SPOKE_AGENT_MAX_STREAMS")]
    pub max_streams: Option<usize>,
    /// Memory the agent may use (Ki/Mi/Gi suffixes); its caps must fit. Default: its cgroup's limit
    /// (`memory.max`, or `memory.limit_in_bytes` under cgroup v1), if any.
    #[arg(long, env = "SPOKE_AGENT_MEMORY_LIMIT", value_parser = parse_size)]
    pub memory_limit: Option<u64>,
    /// Longest time a target dial may take (the server's timeout applies when shorter).
    #[arg(long, env = "SPOKE_AGENT_DIAL_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub dial_timeout: Duration,
    /// Time a connection to the server (TCP, TLS and first frame) may take.
    #[arg(long, env = "SPOKE_AGENT_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// How long data sent to the server may go unacknowledged before the connection (control channel,
    /// parked data connection or open stream) is given up (`TCP_USER_TIMEOUT`): the bound on finding a
    /// link that went silent with data in flight. 0 leaves the kernel's default (about 15 minutes).
    #[arg(long, env = "SPOKE_AGENT_TCP_USER_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub tcp_user_timeout: Duration,
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
    #[arg(long, env = "SPOKE_AGENT_DATAPATH", value_enum, default_value_t = Mode::Auto)]
    pub datapath: Mode,
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
    /// Validate the configuration (including TLS files), print every flag's effective value and its
    /// source as one JSON document (format 1, docs/operations.md), and exit 0.
    #[arg(long)]
    pub check_config: bool,
}

/// Validated configuration of `spoke-agent`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// Where the servers are (to dial).
    pub servers: Vec<ServerAddr>,
    /// Name the server certificate must carry (`None`: the host of the address dialed).
    pub tls_server_name: Option<String>,
    /// How the agent proves which node it is.
    pub credential: Credential,
    /// What the agent announces.
    pub identity: Identity,
    /// Which destinations it dials.
    pub policy: Policy,
    /// Idle data connections to keep parked.
    pub pool_size: usize,
    /// Most streams open at once.
    pub max_streams: usize,
    /// The most the agent holds with these caps, and the limit it was checked against.
    pub memory: (Budget, Option<MemoryLimit>),
    /// Longest target dial.
    pub dial_timeout: Duration,
    /// Longest server connection set-up.
    pub connect_timeout: Duration,
    /// `TCP_USER_TIMEOUT` of connections to the server (zero: the kernel's).
    pub tcp_user_timeout: Duration,
    /// Reconnect backoff bounds.
    pub reconnect: (Duration, Duration),
    /// Drain time after SIGTERM.
    pub grace_period: Duration,
    /// Admin listener.
    pub admin_bind: Option<SocketAddr>,
    /// Datapath tier.
    pub datapath: Mode,
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

/// Most idle data connections an agent may keep parked (the server's default per-agent limit).
pub const MAX_POOL_SIZE: usize = 256;

/// `--max-streams` when no memory limit lowers it (the server's default per-agent limit).
pub const DEFAULT_MAX_STREAMS: usize = 4096;

/// What an agent holds whatever its load: binary, runtime, TLS configuration and caches, BPF maps.
/// An idle agent measured 9–12 MiB resident (docs/operations.md, "Memory budget").
pub const BASE_MEMORY: u64 = 24 << 20;
/// What one stream holds besides its relay's buffers: its task, span, and socket bookkeeping.
pub const STREAM_STATE: u64 = 16 << 10;
/// What one parked data connection holds (its TLS state; buffers are freed while it idles).
pub const IDLE_CONN_MEMORY: u64 = 32 << 10;
/// What one control channel holds (a session: TLS state, buffers, claims).
pub const SESSION_MEMORY: u64 = 256 << 10;
/// Server replicas the budget provides for when fewer addresses are given (a load balancer in front
/// of several replicas).
pub const BUDGETED_REPLICAS: usize = 3;

/// The agent's memory budget with everything but its streams, whose cap [`Budget::stream_cap`] adds.
fn budget_without_streams(pool_size: usize, servers: usize) -> Budget {
    let replicas = servers.max(BUDGETED_REPLICAS) as u64;
    let idle = (pool_size * crate::agent::pool::MAX_IDLE_FACTOR) as u64 * replicas;
    Budget {
        base: BASE_MEMORY,
        terms: vec![
            Term { what: "control channels (replicas)", count: replicas, each: SESSION_MEMORY },
            Term {
                what: "parked data connections (--pool-size × 2 × replicas)",
                count: idle,
                each: IDLE_CONN_MEMORY,
            },
        ],
    }
}

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

/// The stream cap and the budget it makes, checked against the memory limit (`--memory-limit`, or
/// the cgroup's).
/// `per_stream` is what one stream's relay may hold ([`crate::datapath::stream_memory`]).
fn memory_budget(
    (max_streams, memory_limit): (Option<usize>, Option<u64>),
    per_stream: u64,
    pool_size: usize,
    servers: usize,
) -> Result<(usize, (Budget, Option<MemoryLimit>)), ConfigError> {
    if max_streams == Some(0) {
        return err("--max-streams must be above 0");
    }
    let per_stream = STREAM_STATE + per_stream;
    let limit = match memory_limit {
        Some(bytes) => Some(MemoryLimit { bytes, source: "--memory-limit".into() }),
        None => crate::budget::cgroup_limit(),
    };
    let mut budget = budget_without_streams(pool_size, servers);
    let cap = budget
        .stream_cap("streams (--max-streams)", max_streams, DEFAULT_MAX_STREAMS, per_stream, limit.as_ref())
        .map_err(ConfigError)?;
    Ok((cap, (budget, limit)))
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
        if a.proxy_server_port == 0 {
            return err("--proxy-server-port must not be 0");
        }
        let mut servers = Vec::new();
        for entry in a.proxy_server_host.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            let addr = ServerAddr::parse(entry, a.proxy_server_port)?;
            if !servers.contains(&addr) {
                servers.push(addr);
            }
        }
        if servers.is_empty() || servers.len() > MAX_LIST_LEN {
            return err(format!("--proxy-server-host: give 1 to {MAX_LIST_LEN} addresses"));
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
        let relay = crate::datapath::stream_memory(
            a.datapath,
            a.tunnel_tls == TunnelTls::On,
            a.sockmap_backlog_limit,
        );
        let (max_streams, memory) =
            memory_budget((a.max_streams, a.memory_limit), relay, a.pool_size, servers.len())?;
        let credential = match (a.agent_cert, a.agent_key, a.service_account_token_path) {
            (Some(cert), Some(key), None) => Credential::Cert(TlsFiles { ca: a.ca_cert, cert, key }),
            (None, None, Some(path)) => Credential::Token { ca: a.ca_cert, path },
            (None, None, None) => {
                return err("give --agent-cert and --agent-key, or --service-account-token-path");
            }
            (_, _, Some(_)) => {
                return err("--service-account-token-path replaces --agent-cert and --agent-key");
            }
            _ => return err("--agent-cert and --agent-key go together"),
        };
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
            tls_server_name: a.tls_server_name,
            servers,
            credential,
            identity,
            policy,
            pool_size: a.pool_size,
            max_streams,
            memory,
            dial_timeout: nonzero_duration("--dial-timeout", a.dial_timeout)?,
            connect_timeout: nonzero_duration("--connect-timeout", a.connect_timeout)?,
            tcp_user_timeout: a.tcp_user_timeout,
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
    fn server_addresses_are_a_list_with_default_ports() {
        let c =
            agent(&["--proxy-server-host", "lb.example, 10.0.0.2:9000,[fd00::1]:7000,fd00::2,lb.example"])
                .unwrap();
        // The base arguments name cp.example first; the flag may repeat.
        let want = [
            ("cp.example", 8091),
            ("lb.example", 8091),
            ("10.0.0.2", 9000),
            ("fd00::1", 7000),
            ("fd00::2", 8091),
        ];
        let got: Vec<(&str, u16)> = c.servers.iter().map(|s| (s.host.as_str(), s.port)).collect();
        assert_eq!(got, want, "duplicates dropped, order kept");
        assert_eq!(c.servers[3].to_string(), "[fd00::1]:7000");
        for bad in ["a:0", "a:x", "[fd00::1", "[fd00::1]x", "a b:1"] {
            assert!(agent(&["--proxy-server-host", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn credential_is_a_certificate_or_a_token() {
        assert!(matches!(agent(&[]).unwrap().credential, Credential::Cert(_)));
        let token = |extra: &[&str]| {
            let base =
                ["spoke-agent", "--proxy-server-host", "cp", "--ca-cert", "ca.pem", "--node-name", "n"];
            let args = AgentArgs::try_parse_from(base.iter().chain(extra)).map_err(|e| e.to_string())?;
            AgentConfig::try_from(args).map_err(|e| e.to_string())
        };
        let ok = token(&["--service-account-token-path", "/var/run/secrets/spoke/token"]).unwrap();
        assert_eq!(
            ok.credential,
            Credential::Token { ca: "ca.pem".into(), path: "/var/run/secrets/spoke/token".into() }
        );
        assert!(token(&[]).unwrap_err().contains("--service-account-token-path"));
        assert!(token(&["--agent-cert", "a.pem"]).unwrap_err().contains("go together"));
        assert!(agent(&["--service-account-token-path", "t"]).unwrap_err().contains("replaces"));
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
        assert_eq!(c.tls_server_name, None);
        assert_eq!(c.servers, [ServerAddr { host: "cp.example".into(), port: 8091 }]);
    }

    #[test]
    fn the_stream_cap_fits_the_memory_limit() {
        // Per stream in the default tiers: the splice tier's two 1 MiB pipes, plus its state.
        let per_stream = STREAM_STATE + 2 * (1 << 20);
        let c = agent(&["--memory-limit", "256Mi"]).unwrap();
        let (budget, limit) = &c.memory;
        assert_eq!(limit.as_ref().unwrap().bytes, 256 << 20);
        assert!(budget.total() <= 256 << 20, "{budget}");
        assert!(budget.total() + per_stream > 256 << 20, "one more stream would fit: {budget}");
        assert_eq!(c.max_streams, 113, "{budget}");
        assert_eq!(agent(&["--memory-limit", "256Mi", "--max-streams", "64"]).unwrap().max_streams, 64);
        let e = agent(&["--memory-limit", "256Mi", "--max-streams", "1000"]).unwrap_err();
        assert!(e.contains("at most 113 streams fit"), "{e}");
        assert!(agent(&["--memory-limit", "16Mi"]).unwrap_err().contains("cannot hold"));
        assert!(agent(&["--max-streams", "0"]).unwrap_err().contains("--max-streams"));
        // Kernel buffers of the sockmap tier count where it may run.
        let c =
            agent(&["--memory-limit", "256Mi", "--datapath", "sockmap", "--sockmap-backlog-limit", "8Mi"]);
        assert_eq!(c.unwrap().max_streams, 14);
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
