//! The server's memory budget (docs/operations.md, "Memory budget"): what each capped thing may hold,
//! summed over its cap and checked against the memory limit (`--memory-limit`, or the cgroup's) before
//! the server starts. The stream cap left to its default becomes the most streams that fit, and the
//! frontend connection cap left to its default follows it.

use crate::budget::{Budget, MemoryLimit, Term};
use crate::datapath::{self, Mode};
use crate::frontend::konnectivity::MAX_DATA_BYTES;

use super::grpc::{MAX_SEND_BUF, OUTBOUND_QUEUE, STREAM_WINDOW};
use super::registry::PARKED_PER_AGENT;
use super::tunnel::TUNNEL_QUEUE;

/// What the server holds whatever its load: binary, runtime, TLS configurations and session caches,
/// the Node cache. An idle server measured 10 MiB resident, 13 MiB with 5,000 Nodes watched.
pub const BASE_MEMORY: u64 = 32 << 20;
/// What one agent connection holds during its TLS handshake and first frame (`rustls` handshake state
/// and record buffers, the first frame of at most 64 KiB).
pub const HANDSHAKE_MEMORY: u64 = 96 << 10;
/// What one agent's control session holds: its TLS state (about 4 KiB) and buffers (reads of one
/// record, so at most two records read, one opened and one sealed: 67 KiB), the session's tasks and
/// queued frames, the registry entry with routes and claims. An idle session measured 17 KiB
/// (docs/benchmarks.md, "Scale").
pub const AGENT_MEMORY: u64 = 96 << 10;
/// What one parked data connection holds: its TLS state and at most a record not yet whole (buffers are
/// let go when it parks). An idle one measured 4.6 KiB (docs/benchmarks.md, "Scale").
pub const IDLE_CONN_MEMORY: u64 = 24 << 10;
/// What one frontend connection holds besides its streams: the request head (at most 8 KiB) or the
/// HTTP/2 connection's state and header tables (16 KiB lists), the TLS handshake on the TCP frontend.
pub const FRONTEND_CONN_MEMORY: u64 = 64 << 10;
/// What one stream holds besides its buffers: tasks, span, routing and counting state.
pub const STREAM_STATE: u64 = 16 << 10;
/// What the TCP frontend's TLS adds to a stream (`rustls` buffers: records in, plaintext out).
pub const FRONTEND_TLS_MEMORY: u64 = 128 << 10;
/// `--max-frontend-conns` left to its default: this many per stream.
pub const FRONTEND_CONNS_PER_STREAM: usize = 2;
/// `--max-streams` when no memory limit lowers it.
pub const DEFAULT_MAX_STREAMS: usize = 16_384;

/// `--max-agents` when no memory limit lowers it.
pub const DEFAULT_MAX_AGENTS: usize = 10_000;
/// `--max-parked-conns` left to its default: this many per agent.
pub const DEFAULT_PARKED_PER_AGENT: usize = 4;

/// The server's caps, as configured (`None`: left to its default) or as settled by [`budget`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// `--max-agent-handshakes`.
    pub handshakes: usize,
    /// `--max-agents`.
    pub agents: Option<usize>,
    /// `--max-parked-conns`: across all agents, each of which may always park [`PARKED_PER_AGENT`].
    pub parked: Option<usize>,
    /// `--max-frontend-conns`.
    pub frontend_conns: Option<usize>,
    /// `--max-streams`.
    pub streams: Option<usize>,
}

/// How a stream is carried, for what its buffers may hold.
#[derive(Clone, Copy, Debug)]
pub struct Carriage {
    /// `--datapath`.
    pub datapath: Mode,
    /// Whether data connections may be plain (`--allow-plaintext-tunnel`): they may be spliced.
    pub plaintext: bool,
    /// Whether gRPC tunnels are served (`--mode`).
    pub grpc: bool,
    /// Whether the TCP frontend (mutual TLS) is served.
    pub tcp_frontend: bool,
}

/// Bytes one stream may hold: its state, the relay's buffers on the data connection's side, and the
/// frontend's (gRPC windows and queues, TLS buffers), whichever protocol brings it.
#[must_use]
pub fn per_stream(c: Carriage) -> u64 {
    // TLS data connections are always possible; plain ones only where allowed, and only they splice.
    let relay = datapath::stream_memory(Mode::Copy, true, 0).max(if c.plaintext {
        datapath::stream_memory(c.datapath, false, 0)
    } else {
        0
    });
    let grpc =
        u64::from(STREAM_WINDOW) + (MAX_SEND_BUF + (OUTBOUND_QUEUE + TUNNEL_QUEUE) * MAX_DATA_BYTES) as u64;
    STREAM_STATE
        + relay
        + if c.grpc { grpc } else { 0 }
        + if c.tcp_frontend { FRONTEND_TLS_MEMORY } else { 0 }
}

/// Every cap settled, and the budget they make against `limit`. Caps given stay, and must fit. Left to
/// their defaults: without a limit, the defaults; with one, agents (each with
/// [`DEFAULT_PARKED_PER_AGENT`] parked connections) take at most half the room left by the base and the
/// handshakes, streams what remains, and frontend connections follow the streams.
pub fn budget(caps: Caps, carriage: Carriage, limit: Option<&MemoryLimit>) -> Result<(Caps, Budget), String> {
    let mut budget = Budget {
        base: BASE_MEMORY,
        terms: vec![Term {
            what: "agent handshakes (--max-agent-handshakes)",
            count: caps.handshakes as u64,
            each: HANDSHAKE_MEMORY,
        }],
    };
    let per_agent = AGENT_MEMORY + DEFAULT_PARKED_PER_AGENT as u64 * IDLE_CONN_MEMORY;
    let agents = caps.agents.unwrap_or_else(|| match limit {
        None => DEFAULT_MAX_AGENTS,
        Some(limit) => {
            let half = limit.bytes.saturating_sub(budget.total()) / 2;
            usize::try_from(half / per_agent).unwrap_or(usize::MAX).clamp(1, DEFAULT_MAX_AGENTS)
        }
    });
    let parked = caps.parked.unwrap_or(agents * DEFAULT_PARKED_PER_AGENT);
    if parked < agents * PARKED_PER_AGENT {
        return Err(format!(
            "--max-parked-conns {parked} is below {PARKED_PER_AGENT} for each of {agents} agents (--max-agents)"
        ));
    }
    budget.terms.push(Term { what: "agents (--max-agents)", count: agents as u64, each: AGENT_MEMORY });
    budget.terms.push(Term {
        what: "parked data connections (--max-parked-conns)",
        count: parked as u64,
        each: IDLE_CONN_MEMORY,
    });
    let stream = per_stream(carriage);
    let streams = match caps.frontend_conns {
        Some(conns) => {
            budget.terms.push(Term {
                what: "frontend connections (--max-frontend-conns)",
                count: conns as u64,
                each: FRONTEND_CONN_MEMORY,
            });
            budget.stream_cap("streams (--max-streams)", caps.streams, DEFAULT_MAX_STREAMS, stream, limit)?
        }
        // Left to its default, the frontend connection cap follows the stream cap: each stream, or a
        // gRPC connection's first, comes on a connection of its own, and as many more connections may
        // be reading their request or be answered 503 past the stream cap.
        None => budget.stream_cap(
            "streams (--max-streams), each with two frontend connections (--max-frontend-conns)",
            caps.streams,
            DEFAULT_MAX_STREAMS,
            stream + FRONTEND_CONNS_PER_STREAM as u64 * FRONTEND_CONN_MEMORY,
            limit,
        )?,
    };
    let settled = Caps {
        handshakes: caps.handshakes,
        agents: Some(agents),
        parked: Some(parked),
        frontend_conns: Some(caps.frontend_conns.unwrap_or(streams * FRONTEND_CONNS_PER_STREAM)),
        streams: Some(streams),
    };
    Ok((settled, budget))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn caps() -> Caps {
        Caps { handshakes: 1024, agents: None, parked: None, frontend_conns: None, streams: None }
    }

    fn carriage() -> Carriage {
        Carriage { datapath: Mode::Auto, plaintext: false, grpc: true, tcp_frontend: false }
    }

    fn limit(bytes: u64) -> MemoryLimit {
        MemoryLimit { bytes, source: "--memory-limit".into() }
    }

    #[test]
    fn a_stream_counts_its_relay_and_its_frontend() {
        let plain_connect = Carriage { grpc: false, ..carriage() };
        // 2 × 256 KiB copy buffers + the user-space TLS buffers: a TLS data connection is always possible.
        let copy = datapath::stream_memory(Mode::Copy, true, 0);
        assert_eq!(per_stream(plain_connect), STREAM_STATE + copy);
        assert_eq!(per_stream(carriage()), STREAM_STATE + copy + (256 + 64 + 8 * 64) * 1024);
        let tcp = Carriage { tcp_frontend: true, ..plain_connect };
        assert_eq!(per_stream(tcp), per_stream(plain_connect) + FRONTEND_TLS_MEMORY);
        // Plain data connections may splice: two 1 MiB pipes, more than copying.
        let spliced = Carriage { plaintext: true, ..plain_connect };
        assert_eq!(per_stream(spliced), STREAM_STATE + copy.max(2 << 20));
    }

    #[test]
    fn without_a_limit_the_defaults_hold() {
        let (got, budget) = budget(caps(), carriage(), None).unwrap();
        assert_eq!(got.agents, Some(DEFAULT_MAX_AGENTS));
        assert_eq!(got.parked, Some(4 * DEFAULT_MAX_AGENTS));
        assert_eq!(
            (got.streams, got.frontend_conns),
            (Some(DEFAULT_MAX_STREAMS), Some(2 * DEFAULT_MAX_STREAMS))
        );
        assert!(
            budget.to_string().contains("16384 streams (--max-streams), each with two frontend connections")
        );
    }

    #[test]
    fn default_caps_are_what_fits_and_the_sum_fits() {
        let gib = limit(1024 * MIB);
        let (got, b) = budget(caps(), carriage(), Some(&gib)).unwrap();
        let (agents, streams) = (got.agents.unwrap(), got.streams.unwrap());
        assert_eq!(got.frontend_conns, Some(2 * streams), "connections follow the streams");
        assert!(b.total() <= 1024 * MIB, "{b}");
        let one_more = per_stream(carriage()) + 2 * FRONTEND_CONN_MEMORY;
        assert!(b.total() + one_more > 1024 * MIB, "one more fits: {b}");
        // Half of 1 GiB - 32 MiB - 1024 × 96 KiB at 192 KiB an agent; 2,525 KiB a stream (with its two
        // connections) in the rest.
        assert_eq!((agents, streams), (2389, 181), "{b}");
        // Given caps stay, and the streams fill the rest.
        let given = Caps { agents: Some(1000), frontend_conns: Some(1000), ..caps() };
        let (got, b) = budget(given, carriage(), Some(&gib)).unwrap();
        assert_eq!((got.agents, got.parked, got.frontend_conns), (Some(1000), Some(4000), Some(1000)));
        assert!(got.streams.unwrap() > streams, "fewer agents leave room for more streams");
        assert!(b.total() <= 1024 * MIB, "{b}");
    }

    #[test]
    fn caps_that_cannot_fit_are_refused_with_the_sum() {
        let gib = limit(1024 * MIB);
        let e = budget(Caps { streams: Some(4096), ..caps() }, carriage(), Some(&gib)).unwrap_err();
        assert!(
            e.contains("4096 streams (--max-streams)") && e.contains("2389 agents (--max-agents)"),
            "{e}"
        );
        let e = budget(Caps { agents: Some(20_000), ..caps() }, carriage(), Some(&gib)).unwrap_err();
        assert!(e.contains("at most 0 streams fit"), "{e}");
        let e =
            budget(Caps { agents: Some(100), parked: Some(150), ..caps() }, carriage(), None).unwrap_err();
        assert!(e.contains("below 2 for each of 100 agents"), "{e}");
    }
}
