//! Regressions for the failure classes Konnectivity's users reported, each a named test (the list and
//! where each class is covered: docs/operations.md, "Failure classes reported against Konnectivity").
//! Afterwards nothing may be left behind: no stream open or dial pending on either side, and no
//! descriptor beyond the data connections parked for the next streams.

mod common;

use std::time::Duration;

use common::{
    agent, certs, check_pattern, connect_on, echo, eventually, metric, round_trip, send_pattern, server,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;
use tokio::task::JoinSet;

/// Descriptors a process may hold above its baseline once everything settled, beyond its parked data
/// connections: timers, a listener's retry, the odd connection on its way out.
const FD_SLACK: usize = 4;

/// What the server and the agent hold besides their parked data connections: (server, agent) open
/// descriptors minus the data connections each counts as idle.
async fn held(srv: &common::Server, node: &common::Agent) -> (usize, usize) {
    let idle = |n: u64| usize::try_from(n).unwrap();
    let server_idle = idle(metric(srv.admin_addr, "spoke_server_data_conns_idle").await);
    let agent_idle = idle(metric(node.admin_addr, "spoke_agent_pool_idle").await);
    (srv.proc.fds().saturating_sub(server_idle), node.proc.fds().saturating_sub(agent_idle))
}

/// Waits until no stream is open or dial pending on either side, and both hold no more descriptors
/// than `baseline` (from [`held`]) plus [`FD_SLACK`].
async fn nothing_left(srv: &common::Server, node: &common::Agent, baseline: (usize, usize)) {
    for (addr, gauge) in [
        (srv.admin_addr, "spoke_server_streams_open"),
        (srv.admin_addr, "spoke_server_pending_dials"),
        (node.admin_addr, "spoke_agent_streams_open"),
    ] {
        eventually(&format!("{gauge} back to 0"), || async { metric(addr, gauge).await == 0 }).await;
    }
    eventually("descriptors back to the baseline", || async {
        let now = held(srv, node).await;
        now.0 <= baseline.0 + FD_SLACK && now.1 <= baseline.1 + FD_SLACK
    })
    .await;
}

/// A server with `--backend-dial-timeout dial_timeout` and an agent that carried one stream to the
/// echo destination, and what both hold then (see [`held`]).
async fn warmed_up(
    dial_timeout: &str,
) -> (common::Server, common::Agent, std::net::SocketAddr, (usize, usize)) {
    let srv = server(&certs()).flag("--backend-dial-timeout", dial_timeout).run().await;
    let node = agent(&srv).run().await;
    let echo = echo().await;
    round_trip(&srv, echo).await;
    let baseline = held(&srv, &node).await;
    (srv, node, echo, baseline)
}

/// Node-side dials that hang (the destination's accept queue is full, so its SYNs are dropped) must
/// not pile up: fifty of them each get 504 at the dial timeout, a stream to a live destination goes
/// through meanwhile, and afterwards nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_node_side_dials_neither_pile_up_nor_block_other_streams() {
    let (srv, node, echo, baseline) = warmed_up("2s").await;

    let (full, _fillers) = common::full_backlog();
    let mut hung = JoinSet::new();
    for _ in 0..50 {
        let uds = srv.uds.clone();
        hung.spawn(async move {
            let mut s = UnixStream::connect(&uds).await.unwrap();
            connect_on(&mut s, &full.to_string()).await.0
        });
    }
    eventually("fifty dials hanging", || async {
        metric(srv.admin_addr, "spoke_server_pending_dials").await == 50
    })
    .await;
    // While they hang, a stream to a live destination is carried.
    round_trip(&srv, echo).await;
    while let Some(status) = hung.join_next().await {
        assert_eq!(status.unwrap(), 504, "a hung dial ends at the dial timeout");
    }
    nothing_left(&srv, &node, baseline).await;
}

/// Clients that leave, a hundred while their dial hangs and a hundred in the middle of a stream with
/// bytes in flight both ways, leave nothing behind on either side: the agent-side state of a
/// cancelled request goes with it, and no descriptor leaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_requests_leave_no_state_or_descriptors_behind() {
    let (srv, node, echo, baseline) = warmed_up("1s").await;

    let (full, _fillers) = common::full_backlog();
    let mut cancelled = JoinSet::new();
    for i in 0..100u64 {
        let uds = srv.uds.clone();
        // Gone while the dial hangs: the request head is sent, the answer never read.
        cancelled.spawn(async move {
            let mut s = UnixStream::connect(&uds).await.unwrap();
            s.write_all(format!("CONNECT {full} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        });
        // Gone mid-stream: 64 KiB on its way out, some of it back, then the client closes.
        let uds = srv.uds.clone();
        cancelled.spawn(async move {
            let s = common::tunnel_via(&uds, echo).await;
            let (mut r, mut w) = tokio::io::split(s);
            let mut pattern = common::Pattern::new(i);
            let mut out = vec![0u8; 64 * 1024];
            pattern.fill(&mut out);
            w.write_all(&out).await.unwrap();
            let mut back = [0u8; 1024];
            r.read_exact(&mut back).await.unwrap();
            assert_eq!(back, out[..1024], "stream {i}");
        });
    }
    while let Some(done) = cancelled.join_next().await {
        done.unwrap();
    }
    nothing_left(&srv, &node, baseline).await;
    round_trip(&srv, echo).await;
}

/// Large transfers neither hang nor leak: two streams of 256 MiB each way at once arrive intact, then
/// nothing is left, and neither process's resident memory grew by more than [`RSS_SLACK_KIB`] over
/// its size after a first, warming transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfers_neither_hang_nor_leak() {
    const RSS_SLACK_KIB: u64 = 32 * 1024;
    let certs = certs();
    let srv = server(&certs).run().await;
    let node = agent(&srv).run().await;
    let echo = echo().await;
    let transfer = |seeds: [u64; 2], len: u64| {
        let uds = srv.uds.clone();
        async move {
            let mut both = JoinSet::new();
            for seed in seeds {
                let uds = uds.clone();
                both.spawn(async move {
                    let s = common::tunnel_via(&uds, echo).await;
                    let (mut r, mut w) = tokio::io::split(s);
                    let (got, ()) =
                        tokio::join!(check_pattern(&mut r, seed), send_pattern(&mut w, seed, len));
                    assert_eq!(got, len, "stream {seed} whole");
                });
            }
            while let Some(done) = tokio::time::timeout(Duration::from_mins(5), both.join_next())
                .await
                .expect("large transfers end")
            {
                done.unwrap();
            }
        }
    };
    transfer([1, 2], 16 << 20).await;
    nothing_left(&srv, &node, held(&srv, &node).await).await;
    let baseline = held(&srv, &node).await;
    let rss = (srv.proc.rss_kib(), node.proc.rss_kib());
    transfer([3, 4], 256 << 20).await;
    nothing_left(&srv, &node, baseline).await;
    let grown = (srv.proc.rss_kib().saturating_sub(rss.0), node.proc.rss_kib().saturating_sub(rss.1));
    eprintln!("after 2 × 256 MiB each way: server RSS grew {} KiB, agent {} KiB", grown.0, grown.1);
    assert!(grown.0 < RSS_SLACK_KIB && grown.1 < RSS_SLACK_KIB, "resident memory grew {grown:?} KiB");
}
