//! Processes killed (SIGKILL) in the middle of transfers: the streams they carried fail cleanly, never
//! with a wrong byte; streams of other nodes go on intact; nothing is left open on the side that
//! survived; and the restarted process takes traffic again.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Ended, Pace, agent, certs, echo_on, eventually, metric, paced_stream, round_trip, server};
use tokio::task::JoinHandle;

/// Streams per node in these tests.
const STREAMS: u64 = 10;

/// 4 MiB in 64 KiB chunks every 20 ms: over a second each, so every stream is mid-transfer at the kill.
const PACE: Pace = Pace { len: 4 << 20, chunk: 64 * 1024, pause: Duration::from_millis(20) };

type Streams = Vec<JoinHandle<(Ended, tokio::time::Instant)>>;

/// [`STREAMS`] paced streams through `uds` to `dest`, seeded from `first`.
fn streams(uds: &std::path::Path, dest: SocketAddr, first: u64, started: &Arc<AtomicUsize>) -> Streams {
    (first..first + STREAMS)
        .map(|seed| tokio::spawn(paced_stream(uds.to_owned(), dest, seed, PACE, started.clone())))
        .collect()
}

/// How each of `streams` ended, within [`common::WAIT`].
async fn ends(streams: Streams) -> Vec<Ended> {
    let mut ends = Vec::new();
    for s in streams {
        let (ended, _) = tokio::time::timeout(common::WAIT, s).await.expect("the stream ends").unwrap();
        ends.push(ended);
    }
    ends
}

/// Node a's agent is killed while both nodes' streams move data: a's streams end early (clients see
/// their streams cut, with only intact bytes before), b's arrive whole, the server forgets a and
/// holds no stream open, and a's restart carries streams again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_transfer_fails_its_streams_only() {
    let certs = certs();
    let srv = server(&certs).run().await;
    let mut node_a = agent(&srv).id("node-a").identifiers("ipv4=127.0.0.1").run().await;
    let node_b = agent(&srv).id("node-b").identifiers("ipv4=127.0.0.2").run().await;
    eventually("both agents", || async {
        metric(srv.admin_addr, "spoke_server_agents_connected").await == 2
    })
    .await;
    let (kubelet_a, kubelet_b) = (echo_on("127.0.0.1").await, echo_on("127.0.0.2").await);
    let started = Arc::new(AtomicUsize::new(0));
    let via_a = streams(&srv.uds, kubelet_a, 0, &started);
    let via_b = streams(&srv.uds, kubelet_b, 100, &started);
    let all = usize::try_from(2 * STREAMS).unwrap();
    eventually("every stream under way", || async { started.load(Ordering::Relaxed) == all }).await;

    node_a.proc.kill().await;
    let via_a = ends(via_a).await;
    assert!(
        via_a.iter().all(|e| matches!(e, Ended::Failed(n) if *n < PACE.len)),
        "streams through the killed agent end early: {via_a:?}"
    );
    assert!(ends(via_b).await.iter().all(|e| *e == Ended::Intact), "node b's streams are untouched");

    eventually("the dead agent forgotten", || async {
        metric(srv.admin_addr, "spoke_server_agents_connected").await == 1
    })
    .await;
    eventually("no stream left open on the server", || async {
        metric(srv.admin_addr, "spoke_server_streams_open").await == 0
    })
    .await;
    assert_eq!(metric(node_b.admin_addr, "spoke_agent_streams_open").await, 0);
    let _restarted = agent(&srv).id("node-a").identifiers("ipv4=127.0.0.1").run().await;
    round_trip(&srv, kubelet_a).await;
}

/// The server is killed while streams move data: every client's stream ends early, the agent closes
/// its side of each (no stream left open, its backends see the end), and once the server is back on
/// its port the agent returns within the fixture's reconnect bound and carries streams again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_transfer_leaves_nothing_open_on_the_agent() {
    let certs = certs();
    let mut srv = server(&certs).run().await;
    let port = srv.agent_addr.port();
    let node = agent(&srv).run().await;
    let kubelet = echo_on("127.0.0.1").await;
    let started = Arc::new(AtomicUsize::new(0));
    let open = streams(&srv.uds, kubelet, 0, &started);
    let all = usize::try_from(STREAMS).unwrap();
    eventually("every stream under way", || async { started.load(Ordering::Relaxed) == all }).await;

    srv.proc.kill().await;
    let killed = tokio::time::Instant::now();
    let ended = ends(open).await;
    assert!(
        ended.iter().all(|e| matches!(e, Ended::Failed(n) if *n < PACE.len)),
        "streams through the killed server end early: {ended:?}"
    );
    eventually("no stream left open on the agent", || async {
        metric(node.admin_addr, "spoke_agent_streams_open").await == 0
    })
    .await;
    eprintln!("the agent closed every stream {:?} after the server was killed", killed.elapsed());

    drop(srv);
    let srv = server(&certs).agent_port(port).run().await;
    let restarted = tokio::time::Instant::now();
    srv.wait_for_agent().await;
    eprintln!("the agent returned {:?} after the server restarted", restarted.elapsed());
    round_trip(&srv, kubelet).await;
}
