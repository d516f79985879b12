//! Prometheus metrics: the stream metrics both sides share ([`StreamMetrics`], into which each side
//! records every stream's [`Outcome`]), and each side's own, registered under `spoke_server_` or
//! `spoke_agent_`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::datapath::Outcome;

/// One label: `[(name, value)]`.
pub type Label = [(&'static str, &'static str); 1];
/// Counters split by one label.
pub type Counters = Family<Label, Counter>;
/// Counters split by two labels.
pub type Counters2 = Family<[(&'static str, &'static str); 2], Counter>;

/// Buckets of dial-latency histograms: 100 µs to about 13 s.
fn dial_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// Adds one to the counter of `family` labelled `name=value`.
pub fn inc(family: &Counters, name: &'static str, value: &'static str) {
    family.get_or_create(&[(name, value)]).inc();
}

/// Adds `n` to the counter of `family` labelled `name=value`.
pub fn add(family: &Counters, name: &'static str, value: &'static str, n: u64) {
    family.get_or_create(&[(name, value)]).inc_by(n);
}

/// Counters of the sockmap tier (registered only where it can run: the agent).
#[derive(Debug, Default)]
pub struct SockmapMetrics {
    /// Bytes of sockmap-tier streams that user space copied while a direction was paused (the rest of
    /// `datapath_bytes{tier="sockmap"}` moved kernel to kernel).
    pub copied_bytes: Counter,
    /// Bytes the kernel handed the sockmap program a second time, which it trimmed off (DESIGN.md §5 j).
    pub trimmed_bytes: Counter,
    /// Sockmap-tier streams reset because the program forwarded more than TCP received (the check
    /// behind the trim; it should stay 0).
    pub duplicate_resets: Counter,
    /// Times a sockmap-tier direction reached its backlog limit and paused.
    pub pauses: Counter,
    /// Largest backlog (bytes redirected but not yet in the receiving socket's send queue, memory no
    /// socket accounts for) seen in one direction of any sockmap-tier stream since start.
    pub backlog_peak_bytes: Gauge,
}

/// The metrics of streams, the same on both sides.
#[derive(Debug, Default)]
pub struct StreamMetrics {
    /// Streams by `result`: ok, or the reason they failed (each side has its own reasons).
    pub results: Counters,
    /// Streams being relayed now.
    pub open: Gauge,
    /// Stream payload bytes by `direction` (up: apiserver → node, down: node → apiserver).
    pub bytes: Counters,
    /// Streams by the datapath `tier` that carried them.
    pub by_tier: Counters,
    /// Stream payload bytes (both directions) by datapath `tier`.
    pub tier_bytes: Counters,
    /// Streams that could not take the configured tier, by `reason`.
    pub fallbacks: Counters,
    /// The sockmap tier's counters.
    pub sockmap: SockmapMetrics,
    /// TLS data connections parked again after their stream ended by count, for the next stream.
    pub reused: Counter,
    /// 1 where TLS data connections of the kernel's cipher suite are handed to kernel TLS, else 0.
    pub kernel_tls: Gauge,
}

/// Counts a stream as open until dropped.
#[derive(Debug)]
pub struct OpenStream<'a>(&'a Gauge);

impl Drop for OpenStream<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl StreamMetrics {
    /// Creates the metrics and registers them in `r` (already prefixed); the sockmap counters only with
    /// `sockmap`.
    fn register(r: &mut Registry, sockmap: bool) -> Self {
        let m = Self::default();
        r.register("streams", "Streams by result", m.results.clone());
        r.register("streams_open", "Streams being relayed now", m.open.clone());
        r.register("bytes", "Stream payload bytes by direction", m.bytes.clone());
        r.register("datapath_streams", "Streams by datapath tier", m.by_tier.clone());
        r.register("datapath_bytes", "Stream payload bytes by datapath tier", m.tier_bytes.clone());
        r.register(
            "kernel_tls",
            "1 where TLS data connections are handed to kernel TLS (the kernel offers it and the datapath is not copy)",
            m.kernel_tls.clone(),
        );
        r.register(
            "data_conns_reused",
            "Data connections parked again for another stream after theirs ended by count",
            m.reused.clone(),
        );
        r.register(
            "datapath_fallbacks",
            "Streams that fell back from the configured tier, by reason",
            m.fallbacks.clone(),
        );
        if sockmap {
            let s = &m.sockmap;
            r.register(
                "sockmap_copied_bytes",
                "Bytes of sockmap-tier streams copied in user space while paused",
                s.copied_bytes.clone(),
            );
            r.register(
                "sockmap_trimmed_bytes",
                "Bytes the kernel handed the sockmap program twice, trimmed off",
                s.trimmed_bytes.clone(),
            );
            r.register(
                "sockmap_duplicate_resets",
                "Sockmap-tier streams reset because more was forwarded than TCP received",
                s.duplicate_resets.clone(),
            );
            r.register(
                "sockmap_pauses",
                "Sockmap-tier directions that reached the backlog limit",
                s.pauses.clone(),
            );
            r.register(
                "sockmap_backlog_peak_bytes",
                "Largest unaccounted backlog of one sockmap-tier direction since start",
                s.backlog_peak_bytes.clone(),
            );
        }
        m
    }

    /// Counts a stream as open until the returned guard is dropped.
    #[must_use]
    pub fn opened(&self) -> OpenStream<'_> {
        self.open.inc();
        OpenStream(&self.open)
    }

    /// Records how a relayed stream ended, and logs it at debug level; `ends` names the relay's two
    /// connections (A, B) in that log.
    pub fn record(&self, outcome: &Outcome, ends: [&str; 2]) {
        let tier = outcome.tier.as_str();
        let moved = outcome.moved;
        inc(&self.by_tier, "tier", tier);
        add(&self.tier_bytes, "tier", tier, moved.a_to_b + moved.b_to_a);
        add(&self.bytes, "direction", "up", moved.a_to_b);
        add(&self.bytes, "direction", "down", moved.b_to_a);
        if let Some(reason) = outcome.fallback {
            inc(&self.fallbacks, "reason", reason);
        }
        if let Some(stats) = &outcome.sockmap {
            let s = &self.sockmap;
            s.copied_bytes.inc_by(stats.copied);
            s.trimmed_bytes.inc_by(stats.trimmed);
            s.pauses.inc_by(stats.pauses);
            if stats.duplicated > 0 {
                s.duplicate_resets.inc();
            }
            let peak = i64::try_from(stats.peak_backlog).unwrap_or(i64::MAX);
            s.backlog_peak_bytes.set(s.backlog_peak_bytes.get().max(peak));
        }
        outcome.log(ends);
    }
}

/// Metrics of `spoke-server` (prefix `spoke_server_`).
#[derive(Debug)]
pub struct ServerMetrics {
    /// Streams: CONNECT requests by result, bytes, tiers.
    pub stream: StreamMetrics,
    /// Time from a routed request to the agent's dial reply.
    pub dial_duration: Histogram,
    /// Dials waiting for a data connection or a reply.
    pub pending_dials: Gauge,
    /// Agents with a live control channel.
    pub agents_connected: Gauge,
    /// Data connections parked by agents, ready for a dial.
    pub data_conns_idle: Gauge,
    /// Tasks alive in the runtime (see [`follow_runtime_tasks`]).
    pub runtime_tasks: Gauge,
    /// Agent connections refused or failed before they were established, by `reason`.
    pub agent_conn_failures: Counters,
    /// Streams closed while the server drained because they sat idle.
    pub drain_closed_idle: Counter,
    /// Items (addresses, host names, pod CIDRs) a Node lists now that another Node listed first: left
    /// out of its routes and claims. Alert on a value above 0.
    pub node_claim_conflicts: Gauge,
    /// Such conflicts that arose since the server started.
    pub node_claim_conflicts_total: Counter,
    /// Requests (CONNECT streams, gRPC dials) by `frontend_protocol` and `result` (`streams` counts the
    /// same results without the protocol).
    pub frontend_requests: Counters2,
    /// Frontend connections by the `frontend_protocol` their first bytes showed.
    pub frontend_conns: Counters,
    /// gRPC tunnel input refused (bad packets, oversized messages, calls without a dial), by `reason`.
    pub grpc_refused: Counters,
    /// gRPC `Proxy` calls open now.
    pub grpc_calls_open: Gauge,
    /// `--max-streams` in effect (given, or what fits the memory limit).
    pub max_streams: Gauge,
}

impl ServerMetrics {
    /// Creates the metrics and registers them in `registry` under `spoke_server_`.
    pub fn register(registry: &mut Registry) -> Self {
        let r = registry.sub_registry_with_prefix("spoke_server");
        let m = Self {
            stream: StreamMetrics::register(r, false),
            dial_duration: dial_buckets(),
            pending_dials: Gauge::default(),
            agents_connected: Gauge::default(),
            data_conns_idle: Gauge::default(),
            runtime_tasks: Gauge::default(),
            agent_conn_failures: Counters::default(),
            drain_closed_idle: Counter::default(),
            node_claim_conflicts: Gauge::default(),
            node_claim_conflicts_total: Counter::default(),
            frontend_requests: Counters2::default(),
            frontend_conns: Counters::default(),
            grpc_refused: Counters::default(),
            grpc_calls_open: Gauge::default(),
            max_streams: Gauge::default(),
        };
        r.register(
            "max_streams",
            "Most streams relayed at once (--max-streams, or what fits the memory limit)",
            m.max_streams.clone(),
        );

        r.register(
            "runtime_tasks",
            "Tasks alive in the runtime, sampled every second",
            m.runtime_tasks.clone(),
        );
        r.register(
            "frontend_requests",
            "Requests by frontend protocol (http-connect, grpc) and result",
            m.frontend_requests.clone(),
        );
        r.register(
            "frontend_conns",
            "Frontend connections by the protocol their first bytes showed",
            m.frontend_conns.clone(),
        );
        r.register("grpc_refused", "gRPC tunnel input refused, by reason", m.grpc_refused.clone());
        r.register("grpc_calls_open", "gRPC Proxy calls open now", m.grpc_calls_open.clone());
        r.register(
            "node_claim_conflicts",
            "Addresses, host names and pod CIDRs a Node lists that another Node listed first (left out of its routes)",
            m.node_claim_conflicts.clone(),
        );
        r.register(
            "node_claim_conflicts_seen",
            "Conflicts between Nodes' listed addresses, host names and pod CIDRs since the start",
            m.node_claim_conflicts_total.clone(),
        );
        r.register(
            "drain_closed_idle",
            "Streams closed while the server drained because they sat idle",
            m.drain_closed_idle.clone(),
        );
        r.register(
            "dial_duration_seconds",
            "Time from routing to the agent's dial reply",
            m.dial_duration.clone(),
        );
        r.register("pending_dials", "Dials waiting for a data connection or reply", m.pending_dials.clone());
        r.register("agents_connected", "Agents with a live control channel", m.agents_connected.clone());
        r.register("data_conns_idle", "Idle data connections parked by agents", m.data_conns_idle.clone());
        r.register(
            "agent_conn_failures",
            "Agent connections that failed before use, by reason",
            m.agent_conn_failures.clone(),
        );
        m
    }
}

impl ServerMetrics {
    /// Counts a request's `result`, in `streams` and by `frontend_protocol`.
    pub fn request(&self, frontend_protocol: &'static str, result: &'static str) {
        inc(&self.stream.results, "result", result);
        self.frontend_requests
            .get_or_create(&[("frontend_protocol", frontend_protocol), ("result", result)])
            .inc();
    }
}

/// Metrics of `spoke-agent` (prefix `spoke_agent_`).
#[derive(Debug)]
pub struct AgentMetrics {
    /// Streams: dials by result, bytes, tiers, the sockmap tier's counters.
    pub stream: StreamMetrics,
    /// Time to connect to a target.
    pub dial_duration: Histogram,
    /// Idle data connections parked at the server.
    pub pool_idle: Gauge,
    /// Control channels up (one per server replica reached).
    pub control_connected: Gauge,
    /// Server replicas the agent should reach, as the servers say.
    pub server_count: Gauge,
    /// 1 while servers refuse this agent because another live session holds its identity.
    pub standby: Gauge,
    /// `--max-streams` in effect (given, or what fits the memory limit).
    pub max_streams: Gauge,
    /// Tasks alive in the runtime (see [`follow_runtime_tasks`]).
    pub runtime_tasks: Gauge,
    /// Failed connections to the server, by `kind` (control, data).
    pub server_conn_failures: Counters,
    /// TLS handshakes with the server by `kind`: `full` or `resumed` (session tickets).
    pub server_handshakes: Counters,
}

impl AgentMetrics {
    /// Creates the metrics and registers them in `registry` under `spoke_agent_`.
    pub fn register(registry: &mut Registry) -> Self {
        let r = registry.sub_registry_with_prefix("spoke_agent");
        let m = Self {
            stream: StreamMetrics::register(r, true),
            dial_duration: dial_buckets(),
            pool_idle: Gauge::default(),
            control_connected: Gauge::default(),
            server_count: Gauge::default(),
            standby: Gauge::default(),
            max_streams: Gauge::default(),
            runtime_tasks: Gauge::default(),
            server_conn_failures: Counters::default(),
            server_handshakes: Counters::default(),
        };
        r.register(
            "runtime_tasks",
            "Tasks alive in the runtime, sampled every second",
            m.runtime_tasks.clone(),
        );
        r.register(
            "max_streams",
            "Most streams open at once (--max-streams, or what fits the memory limit)",
            m.max_streams.clone(),
        );
        r.register("dial_duration_seconds", "Time to connect to a target", m.dial_duration.clone());
        r.register("pool_idle", "Idle data connections parked at the server", m.pool_idle.clone());
        r.register(
            "control_connected",
            "Control channels up, one per server replica",
            m.control_connected.clone(),
        );
        r.register("server_count", "Server replicas the agent should reach", m.server_count.clone());
        r.register(
            "standby",
            "1 while servers refuse the agent because another live session holds its identity",
            m.standby.clone(),
        );
        r.register(
            "server_conn_failures",
            "Failed connections to the server, by kind",
            m.server_conn_failures.clone(),
        );
        r.register(
            "server_handshakes",
            "TLS handshakes with the server, full or resumed",
            m.server_handshakes.clone(),
        );
        m
    }
}

/// How often [`follow_runtime_tasks`] samples.
pub const RUNTIME_SAMPLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Keeps `gauge` at the number of tasks alive in the current runtime (a leak of tasks shows as its
/// growth), sampled every [`RUNTIME_SAMPLE`] for the process's life.
pub fn follow_runtime_tasks(gauge: Gauge) {
    let runtime = tokio::runtime::Handle::current();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RUNTIME_SAMPLE);
        loop {
            tick.tick().await;
            gauge.set(i64::try_from(runtime.metrics().num_alive_tasks()).unwrap_or(i64::MAX));
        }
    });
}
