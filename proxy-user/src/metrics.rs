//! Prometheus metrics: one set per component, each registered under its own prefix.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// One label: `[(name, value)]`.
pub type Label = [(&'static str, &'static str); 1];
/// Counters split by one label.
pub type Counters = Family<Label, Counter>;

/// Buckets of dial-latency histograms: 100 µs to about 13 s.
fn dial_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// Metrics of `spoke-server` (prefix `spoke_server_`).
#[derive(Debug)]
pub struct ServerMetrics {
    /// Streams being relayed now.
    pub streams_open: Gauge,
    /// CONNECT requests by `result` (ok, or the reason they failed).
    pub streams: Counters,
    /// Stream payload bytes by `direction` (up: apiserver → node, down: node → apiserver).
    pub bytes: Counters,
    /// Streams by the `tier` that relays them (copy, splice).
    pub streams_by_datapath: Counters,
    /// Time from a routed request to the agent's dial reply.
    pub dial_duration: Histogram,
    /// Dials waiting for a data connection or a reply.
    pub pending_dials: Gauge,
    /// Agents with a live control channel.
    pub agents_connected: Gauge,
    /// Data connections parked by agents, ready for a dial.
    pub data_conns_idle: Gauge,
    /// Agent connections refused or failed before they were established, by `reason`.
    pub agent_conn_failures: Counters,
}

impl ServerMetrics {
    /// Creates the metrics and registers them in `registry` under `spoke_server_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            streams_open: Gauge::default(),
            streams: Counters::default(),
            bytes: Counters::default(),
            streams_by_datapath: Counters::default(),
            dial_duration: dial_buckets(),
            pending_dials: Gauge::default(),
            agents_connected: Gauge::default(),
            data_conns_idle: Gauge::default(),
            agent_conn_failures: Counters::default(),
        };
        let r = registry.sub_registry_with_prefix("spoke_server");
        r.register("streams_open", "Streams being relayed now", m.streams_open.clone());
        r.register("streams", "CONNECT requests by result", m.streams.clone());
        r.register("bytes", "Stream payload bytes by direction", m.bytes.clone());
        r.register("datapath_streams", "Streams by datapath tier", m.streams_by_datapath.clone());
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

/// Metrics of `spoke-agent` (prefix `spoke_agent_`).
#[derive(Debug)]
pub struct AgentMetrics {
    /// Streams being relayed now.
    pub streams_open: Gauge,
    /// Dials by `result` (ok, denied, refused, timeout, ...).
    pub streams: Counters,
    /// Streams by the datapath `tier` that carried them.
    pub streams_by_datapath: Counters,
    /// Stream payload bytes (both directions) by datapath `tier`.
    pub datapath_bytes: Counters,
    /// Streams that could not take the configured tier, by `reason`.
    pub datapath_fallbacks: Counters,
    /// Bytes of sockmap-tier streams that user space copied while a direction was paused (the rest of
    /// `datapath_bytes{tier="sockmap"}` moved kernel to kernel).
    pub sockmap_copied_bytes: Counter,
    /// Bytes the kernel handed the sockmap program a second time, which it trimmed off (DESIGN.md §5 j).
    pub sockmap_trimmed_bytes: Counter,
    /// Sockmap-tier streams reset because the program forwarded more than TCP received (the check
    /// behind the trim; it should stay 0).
    pub sockmap_duplicate_resets: Counter,
    /// Times a sockmap-tier direction reached its backlog limit and paused.
    pub sockmap_pauses: Counter,
    /// Largest backlog (bytes redirected but not yet in the receiving socket's send queue, memory no
    /// socket accounts for) seen in one direction of any sockmap-tier stream since start.
    pub sockmap_backlog_peak_bytes: Gauge,
    /// Stream payload bytes by `direction` (up: server → target, down: target → server).
    pub bytes: Counters,
    /// Time to connect to a target.
    pub dial_duration: Histogram,
    /// Idle data connections parked at the server.
    pub pool_idle: Gauge,
    /// 1 while the control channel is up.
    pub control_connected: Gauge,
    /// Failed connections to the server, by `kind` (control, data).
    pub server_conn_failures: Counters,
    /// TLS handshakes with the server by `kind`: `full` or `resumed` (session tickets).
    pub server_handshakes: Counters,
}

impl AgentMetrics {
    /// Creates the metrics and registers them in `registry` under `spoke_agent_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            streams_open: Gauge::default(),
            streams: Counters::default(),
            streams_by_datapath: Counters::default(),
            datapath_bytes: Counters::default(),
            datapath_fallbacks: Counters::default(),
            sockmap_copied_bytes: Counter::default(),
            sockmap_trimmed_bytes: Counter::default(),
            sockmap_duplicate_resets: Counter::default(),
            sockmap_pauses: Counter::default(),
            sockmap_backlog_peak_bytes: Gauge::default(),
            bytes: Counters::default(),
            dial_duration: dial_buckets(),
            pool_idle: Gauge::default(),
            control_connected: Gauge::default(),
            server_conn_failures: Counters::default(),
            server_handshakes: Counters::default(),
        };
        let r = registry.sub_registry_with_prefix("spoke_agent");
        r.register("streams_open", "Streams being relayed now", m.streams_open.clone());
        r.register("streams", "Dials by result", m.streams.clone());
        r.register("datapath_streams", "Streams by datapath tier", m.streams_by_datapath.clone());
        r.register("datapath_bytes", "Stream payload bytes by datapath tier", m.datapath_bytes.clone());
        r.register(
            "datapath_fallbacks",
            "Streams that fell back from the configured tier, by reason",
            m.datapath_fallbacks.clone(),
        );
        r.register(
            "sockmap_copied_bytes",
            "Bytes of sockmap-tier streams copied in user space while paused",
            m.sockmap_copied_bytes.clone(),
        );
        r.register(
            "sockmap_trimmed_bytes",
            "Bytes the kernel handed the sockmap program twice, trimmed off",
            m.sockmap_trimmed_bytes.clone(),
        );
        r.register(
            "sockmap_duplicate_resets",
            "Sockmap-tier streams reset because more was forwarded than TCP received",
            m.sockmap_duplicate_resets.clone(),
        );
        r.register(
            "sockmap_pauses",
            "Sockmap-tier directions that reached the backlog limit",
            m.sockmap_pauses.clone(),
        );
        r.register(
            "sockmap_backlog_peak_bytes",
            "Largest unaccounted backlog of one sockmap-tier direction since start",
            m.sockmap_backlog_peak_bytes.clone(),
        );
        r.register("bytes", "Stream payload bytes by direction", m.bytes.clone());
        r.register("dial_duration_seconds", "Time to connect to a target", m.dial_duration.clone());
        r.register("pool_idle", "Idle data connections parked at the server", m.pool_idle.clone());
        r.register("control_connected", "1 while the control channel is up", m.control_connected.clone());
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

/// Adds one to the counter of `family` labelled `name=value`.
pub fn inc(family: &Counters, name: &'static str, value: &'static str) {
    family.get_or_create(&[(name, value)]).inc();
}

/// Adds `n` to the counter of `family` labelled `name=value`.
pub fn add(family: &Counters, name: &'static str, value: &'static str, n: u64) {
    family.get_or_create(&[(name, value)]).inc_by(n);
}
