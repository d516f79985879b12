//! The sockmap tier in the real agent (`--datapath sockmap`, plaintext tunnel): many streams at once,
//! churn with the pinned maps counted from outside, and pins left by a killed agent reclaimed.

#[path = "../../proxy-user/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    Server, agent, certs, check_pattern, counted, echo, eventually, metric, send_pattern, server, tunnel,
};
use spoke::datapath::sockmap::{DEFAULT_BPF_ROOT, PinDir, pinned_entries};
use spoke_tests::{RemovePins, privileged};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest any one test step may take.
const STEP: Duration = Duration::from_mins(2);

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, f).await.unwrap_or_else(|_| panic!("{what}: no progress within {STEP:?}"))
}

/// A node name no other test (or earlier run) uses, so pin directories do not collide.
fn node(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

fn pins(node: &str) -> PathBuf {
    PinDir::new(Path::new(DEFAULT_BPF_ROOT), node).path().to_owned()
}

async fn plaintext_server() -> Server {
    server(&certs()).allow_plaintext_tunnel().run().await
}

/// One stream through the tunnel to an echo backend: sends `msg`, half-closes, expects it back.
async fn echo_once(srv: &Server, backend: std::net::SocketAddr, msg: &[u8]) {
    let mut t = tunnel(srv, backend).await;
    t.write_all(msg).await.unwrap();
    t.shutdown().await.unwrap();
    let mut back = Vec::new();
    t.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, msg);
}

/// The agent's counter of streams carried by a datapath tier.
fn tier_line(tier: &str) -> String {
    format!("spoke_agent_datapath_streams_total{{tier=\"{tier}\"}}")
}

/// Streams the agent counted for a datapath tier.
async fn streams_in(admin: std::net::SocketAddr, tier: &str) -> u64 {
    metric(admin, &tier_line(tier)).await
}

/// Streams spliced at once by [`agent_splices_a_thousand_parallel_streams`], and bytes each way in each.
const STREAMS: u64 = 1000;
const LEN: u64 = 256 << 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_splices_a_thousand_parallel_streams() {
    if !privileged("sockmap agent test") {
        return;
    }
    let srv = plaintext_server().await;
    let node = node("sockmap-1000");
    let _cleanup = RemovePins(pins(&node));
    let ag = agent(&srv).id(&node).plaintext("sockmap").flag("--pool-size", "64").run().await;
    let backend = echo().await;
    // Open all of them first, so they are all spliced at once.
    let mut open = Vec::new();
    for _ in 0..STREAMS {
        open.push(bounded("open a tunnel", tunnel(&srv, backend)).await);
    }
    // (The agent counts a stream as open just after its reply went out: wait for the last one.)
    eventually("all streams open at once", || async {
        metric(ag.admin_addr, "spoke_agent_streams_open").await == STREAMS
    })
    .await;
    let mut set = tokio::task::JoinSet::new();
    for (i, t) in open.into_iter().enumerate() {
        let seed = i as u64 + 1;
        set.spawn(async move {
            let (mut r, mut w) = tokio::io::split(t);
            let ((), got) = tokio::join!(send_pattern(&mut w, seed, LEN), check_pattern(&mut r, seed));
            got
        });
    }
    let got = bounded("1,000 verified streams", set.join_all()).await;
    assert!(got.iter().all(|n| *n == LEN), "every stream carried all its bytes");
    let spliced = counted(ag.admin_addr, &tier_line("sockmap"), STREAMS).await;
    assert_eq!(spliced, STREAMS, "every stream took the sockmap tier\n{}", ag.proc.log());
    eventually("no map entries left", || async { pinned_entries(&pins(&node)).ok() == Some((0, 0, 0)) })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_through_the_agent_leaves_no_entries_or_descriptors() {
    if !privileged("sockmap agent test") {
        return;
    }
    let srv = plaintext_server().await;
    let node = node("sockmap-churn");
    let _cleanup = RemovePins(pins(&node));
    let ag = agent(&srv).id(&node).plaintext("sockmap").run().await;
    let backend = echo().await;
    for _ in 0..100 {
        bounded("warm-up stream", echo_once(&srv, backend, b"ping")).await;
    }
    let before = ag.proc.fds();
    for _ in 0..2000 {
        bounded("churn stream", echo_once(&srv, backend, b"ping")).await;
    }
    eventually("no map entries left", || async { pinned_entries(&pins(&node)).ok() == Some((0, 0, 0)) })
        .await;
    eventually("descriptors back to the baseline", || async { ag.proc.fds() <= before + 2 }).await;
    // A FIN that reaches the agent before the pair is inserted sends that stream to the copy tier. (The
    // agent counts a stream after its client saw the end: wait for the last one.)
    let total = async || streams_in(ag.admin_addr, "sockmap").await + streams_in(ag.admin_addr, "copy").await;
    eventually("every stream counted", || async { total().await >= 2100 }).await;
    let spliced = streams_in(ag.admin_addr, "sockmap").await;
    let copied = streams_in(ag.admin_addr, "copy").await;
    let early_fin =
        metric(ag.admin_addr, "spoke_agent_datapath_fallbacks_total{reason=\"not_established\"}").await;
    eprintln!("{spliced} streams spliced, {copied} copied after an early FIN");
    assert_eq!(spliced + copied, 2100, "every stream counted once\n{}", ag.proc.log());
    assert_eq!(copied, early_fin, "only early FINs fell back");
    assert!(spliced > 0, "streams took the sockmap tier");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_of_a_killed_agent_are_reclaimed_and_a_stopped_one_removes_its_own() {
    if !privileged("sockmap agent test") {
        return;
    }
    let srv = plaintext_server().await;
    let node = node("sockmap-pins");
    let dir = pins(&node);
    let _cleanup = RemovePins(dir.clone());
    let mut first = agent(&srv).id(&node).plaintext("sockmap").run().await;
    assert!(dir.join("SOCKS").exists(), "maps pinned in {}", dir.display());
    first.proc.kill().await;
    assert!(dir.join("SOCKS").exists(), "a killed agent cannot remove its pins");
    let second = agent(&srv).id(&node).plaintext("sockmap").run().await;
    assert!(second.proc.log().contains("removed pins left by a previous agent"), "{}", second.proc.log());
    // The new agent's maps work: a stream through it.
    let backend = echo().await;
    bounded("echo", echo_once(&srv, backend, b"after restart")).await;
    second.proc.terminate();
    eventually("pins removed on a clean stop", || async { !dir.exists() }).await;
}

/// `--datapath auto` takes the splice tier for a plaintext tunnel (on this kernel it beat sockmap once
/// the server's hop is spliced too, docs/benchmarks.md) and the copy tier for a TLS tunnel; neither loads
/// the eBPF programs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_splices_plaintext_tunnels_and_loads_no_programs() {
    if !privileged("sockmap agent test") {
        return;
    }
    let srv = plaintext_server().await;
    let plain = node("sockmap-auto");
    let dir = pins(&plain);
    let _cleanup = RemovePins(dir.clone());
    let ag = agent(&srv).id(&plain).plaintext("auto").run().await;
    let backend = echo().await;
    let msg = vec![7u8; 1 << 20];
    bounded("echo", echo_once(&srv, backend, &msg)).await;
    assert_eq!(counted(ag.admin_addr, &tier_line("splice"), 1).await, 1, "the stream was spliced");
    assert!(ag.proc.log().contains("tier=\"splice\""), "the choice is logged\n{}", ag.proc.log());
    assert!(!dir.exists(), "nothing loaded for auto");

    let srv = server(&certs()).run().await;
    let tls = node("sockmap-auto-tls");
    let ag = agent(&srv).id(&tls).flag("--datapath", "auto").run().await;
    bounded("echo over TLS", echo_once(&srv, backend, &msg)).await;
    // Kernel TLS where this kernel offers it (and the log says so), the copy tier otherwise (and why).
    let (tier, said) = match spoke::transport::ktls::KernelTls::probe() {
        Ok(_) => ("ktls", "kernel TLS: TLS data connections use ChaCha20-Poly1305"),
        Err(_) => ("copy", "kernel TLS unavailable"),
    };
    assert_eq!(counted(ag.admin_addr, &tier_line(tier), 1).await, 1, "the TLS stream took {tier}");
    assert!(ag.proc.log().contains(said), "{}", ag.proc.log());
    assert!(!pins(&tls).exists(), "nothing loaded for TLS tunnels");
}

/// Without `CAP_PERFMON` the verifier refuses the program's kernel-memory reads: the agent loads it without
/// sequence tracking (a duplicate then resets the stream instead of being trimmed) and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_perfmon_the_program_loads_without_the_trim() {
    if !privileged("sockmap agent test") {
        return;
    }
    let caps = "-perfmon,-sys_admin";
    let msg = vec![9u8; 100_000];
    let srv = plaintext_server().await;
    let backend = echo().await;
    let forced = node("sockmap-noperfmon");
    let _cleanup = RemovePins(pins(&forced));
    let ag = agent(&srv).id(&forced).plaintext("sockmap").without_caps(caps).run().await;
    let log = ag.proc.log();
    assert!(log.contains("did not load with sequence tracking") && log.contains("trims=false"), "{log}");
    bounded("echo", echo_once(&srv, backend, &msg)).await;
    assert_eq!(counted(ag.admin_addr, &tier_line("sockmap"), 1).await, 1, "the stream was spliced");
}
