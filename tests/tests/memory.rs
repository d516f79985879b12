//! Memory budgets under a cgroup limit: an agent and a server whose streams all stall, half with a
//! destination that never reads and half with a client that never reads, holds no more than its caps
//! allow and stays under its limit; caps that cannot fit the limit keep it from starting.

#[path = "../../proxy-user/tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{agent, certs, connect_on, metric, server};
use spoke_tests::cgroup::Cgroup;
use spoke_tests::privileged;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, UnixStream};
use tokio::time::Instant;

const MIB: u64 = 1 << 20;

/// The agent's limit in these tests.
const LIMIT: u64 = 96 * MIB;

/// Streams asked for beyond the cap; each must be refused.
const OVER_CAP: usize = 16;

/// A destination that accepts and never reads (`reads == false`), or one that writes without end and
/// never reads.
async fn stalling_destination(writes: bool) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = l.accept().await {
            if writes {
                tokio::spawn(async move {
                    let chunk = vec![0x5a_u8; 64 * 1024];
                    while s.write_all(&chunk).await.is_ok() {}
                });
            } else {
                held.push(s);
            }
        }
    });
    addr
}

/// Waits until `sample` changes by less than `within` over a second: every buffer that can fill has.
async fn settled(what: &str, within: u64, sample: impl Fn() -> u64) {
    let deadline = Instant::now() + Duration::from_mins(1);
    let mut last = sample();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = sample();
        if now.abs_diff(last) < within {
            return;
        }
        assert!(Instant::now() < deadline, "{what} still changing after 60 s: {last} then {now}");
        last = now;
    }
}

/// Opens streams through `uds` until the cap plus [`OVER_CAP`]: the first `cap` alternate between a
/// destination that never reads (its client writes without end) and one that never stops writing
/// (its client never reads). Returns the streams held and how many were refused with 503.
async fn stall_streams(uds: &Path, cap: usize, written: &Arc<AtomicU64>) -> (Vec<UnixStream>, usize) {
    let sink = stalling_destination(false).await;
    let source = stalling_destination(true).await;
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..cap + OVER_CAP {
        let mut s = UnixStream::connect(uds).await.unwrap();
        let dest = if i % 2 == 0 { sink } else { source };
        match connect_on(&mut s, &dest.to_string()).await {
            (200, _) if i % 2 == 0 => {
                let written = written.clone();
                tokio::spawn(async move {
                    let chunk = vec![0xa5_u8; 64 * 1024];
                    while s.write_all(&chunk).await.is_ok() {
                        written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    }
                });
            }
            (200, _) => held.push(s),
            (503, _) => refused += 1,
            (status, reply) => panic!("stream {i}: {status} {reply}"),
        }
    }
    (held, refused)
}

/// Stalls streams through `uds` up to the cap of the process `what` (in `cgroup`, limited to `limit`;
/// its metrics at `admin` under `prefix`) and beyond, and checks that the ones past the cap are refused
/// and that the process stays under its limit once every buffer that can fill has.
async fn fill_to_the_cap(
    what: &str,
    cgroup: &Cgroup,
    limit: u64,
    (uds, admin, prefix): (&Path, SocketAddr, &str),
) {
    let cap = usize::try_from(metric(admin, &format!("{prefix}_max_streams")).await).unwrap();
    assert!((8..100).contains(&cap), "the cap fits the cgroup's {limit} bytes: {cap}");
    let idle = cgroup.current();

    let written = Arc::new(AtomicU64::new(0));
    let (_held, refused) = stall_streams(uds, cap, &written).await;
    assert_eq!(refused, OVER_CAP, "every stream past the cap refused");
    assert_eq!(metric(admin, &format!("{prefix}_streams_open")).await, cap as u64);
    settled("bytes the clients wrote", 64 * 1024, || written.load(Ordering::Relaxed)).await;
    settled("the process's memory", MIB, || cgroup.current()).await;

    let peak = cgroup.peak();
    eprintln!(
        "{what}: cap {cap} streams under {} MiB; idle {} KiB, peak {} KiB with every stream stalled ({} KiB \
         a stream); clients wrote {} MiB",
        limit / MIB,
        idle >> 10,
        peak >> 10,
        ((peak - idle) / cap as u64) >> 10,
        written.load(Ordering::Relaxed) / MIB,
    );
    assert_eq!(cgroup.oom_kills(), 0, "the {what} was not OOM-killed");
    assert!(peak < limit - 8 * MIB, "the {what} came within 8 MiB of its limit: peak {peak}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_under_a_memory_limit_caps_its_streams_and_stays_under_it() {
    if privileged("memory cgroups") {
        agent_under_a_limit(false).await;
    }
}

/// The same with plain data connections, spliced: the pipes are kernel memory, charged to the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_splicing_agent_under_a_memory_limit_caps_its_streams_and_stays_under_it() {
    if privileged("memory cgroups") {
        agent_under_a_limit(true).await;
    }
}

async fn agent_under_a_limit(plaintext: bool) {
    let cgroup = Cgroup::new(LIMIT);
    let certs = certs();
    let srv = if plaintext { server(&certs).allow_plaintext_tunnel() } else { server(&certs) }.run().await;
    let node = agent(&srv).under(&cgroup.entry());
    let node = if plaintext { node.plaintext("splice") } else { node }.run().await;
    let what = if plaintext { "agent (plain, spliced)" } else { "agent (TLS)" };
    fill_to_the_cap(what, &cgroup, LIMIT, (&srv.uds, node.admin_addr, "spoke_agent")).await;
    assert!(node.proc.log().contains("memory budget"), "the budget is logged");
}

/// The server's limit in these tests.
const SERVER_LIMIT: u64 = 128 * MIB;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_under_a_memory_limit_caps_its_streams_and_stays_under_it() {
    if !privileged("memory cgroups") {
        return;
    }
    let cgroup = Cgroup::new(SERVER_LIMIT);
    let certs = certs();
    // Few agents and handshakes, so that most of the limit is left for streams.
    let srv = server(&certs)
        .flag("--max-agents", "4")
        .flag("--max-agent-handshakes", "16")
        .under(&cgroup.entry())
        .run()
        .await;
    let _node = agent(&srv).run().await;
    fill_to_the_cap("server", &cgroup, SERVER_LIMIT, (&srv.uds, srv.admin_addr, "spoke_server")).await;
    assert!(srv.proc.log().contains("memory budget"), "the budget is logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_caps_cannot_fit_its_cgroup_refuses_to_start() {
    if !privileged("memory cgroups") {
        return;
    }
    let cgroup = Cgroup::new(LIMIT);
    let certs = certs();
    let srv = server(&certs).run().await;
    let (status, log) = agent(&srv).flag("--max-streams", "4096").under(&cgroup.entry()).run_to_exit().await;
    assert_eq!(status.code(), Some(i32::from(spoke::EXIT_CONFIG)), "{log}");
    assert!(log.contains("cannot hold") && log.contains("4096 streams (--max-streams)"), "{log}");
    assert!(log.contains("memory.limit_in_bytes") || log.contains("memory.max"), "names its cgroup: {log}");
}
