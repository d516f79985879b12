//! The soak: streams of mixed sizes churn through a server and an agent for `SPOKE_SOAK_MINUTES`
//! (2 by default; `cargo xtask soak --minutes N` for longer), while the agent's certificate rotates,
//! the agent is replaced (the new one stands by until the old one drains) and the server is replaced
//! as a surge does it. Where the sockmap tier can run (root: CI is root, and must run it), a second
//! node's agent carries its streams in that tier over plaintext data connections, and the entries of
//! its pinned eBPF maps are measured too. Every stream's bytes are checked. The run fails if a
//! process's resident memory, descriptors, runtime tasks, parked data connections, metric series or
//! map entries grow after its warm-up by more than their named slack, or if anything is left open (or
//! in a map) at the end.

#[path = "../../proxy-user/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{
    Certs, admin_get, agent, certs, check_pattern, connect_on, echo, echo_on, eventually, metric,
    send_pattern, server,
};
use spoke::datapath::sockmap::{DEFAULT_BPF_ROOT, PinDir, pinned_entries};
use spoke_tests::{RemovePins, privileged};
use tokio::net::UnixStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Streams open at once through node-a's agent (TLS data connections).
const WORKERS: u64 = 6;
/// Streams open at once through node-b's agent (sockmap tier), where it runs.
const SPLICED_WORKERS: u64 = 2;
/// Stream sizes, drawn uniformly: a kubelet request, a log tail, a copied file.
const SIZES: [u64; 5] = [4 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20];
/// How often each process is measured.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// How often the progress line is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// What each measure of a process may grow after its warm-up. The map entries (sockets, flows and
/// credits of the sockmap agent's pinned maps together) are at most 12 with two streams at once.
const SLACK: [(&str, u64); 6] =
    [("rss_kib", 24 << 10), ("fds", 32), ("tasks", 64), ("parked", 16), ("series", 8), ("map_entries", 12)];

/// The run's length, from `SPOKE_SOAK_MINUTES`.
fn run_length() -> Duration {
    let minutes =
        std::env::var("SPOKE_SOAK_MINUTES").map_or(2.0, |m| m.parse::<f64>().expect("SPOKE_SOAK_MINUTES"));
    Duration::from_secs_f64(minutes * 60.0)
}

/// One measurement of a process.
#[derive(Clone, Debug)]
struct Sample {
    at: Duration,
    values: [u64; 6],
}

/// One process's life: which side, its pid, when it started, its samples.
struct Life {
    side: &'static str,
    pid: u32,
    started: Duration,
    samples: Vec<Sample>,
}

/// The entries of the maps pinned in `pins`, all three together.
fn map_entries(pins: &Path) -> u64 {
    let (socks, flows, credits) = pinned_entries(pins).expect("read the pinned maps");
    (socks + flows + credits) as u64
}

async fn sample(
    side: &'static str,
    proc: &common::Proc,
    admin: std::net::SocketAddr,
    pins: Option<&Path>,
    at: Duration,
) -> Sample {
    let (_, text) = admin_get(admin, "/metrics").await;
    let series = text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).count() as u64;
    let (tasks, parked) = match side {
        "server" => (
            metric(admin, "spoke_server_runtime_tasks").await,
            metric(admin, "spoke_server_data_conns_idle").await,
        ),
        _ => (metric(admin, "spoke_agent_runtime_tasks").await, metric(admin, "spoke_agent_pool_idle").await),
    };
    let entries = pins.map_or(0, map_entries);
    Sample { at, values: [proc.rss_kib(), proc.fds() as u64, tasks, parked, series, entries] }
}

/// What the churn saw.
#[derive(Default)]
struct Churn {
    streams: AtomicU64,
    bytes: AtomicU64,
    refused: AtomicU64,
    broken: AtomicU64,
}

/// One worker: streams of random sizes through `uds` to `echo`, each checked, until `stop`. An open
/// that is refused (an agent handing over) is counted and tried again; a stream that breaks is counted.
async fn worker(
    uds: std::path::PathBuf,
    echo: std::net::SocketAddr,
    seed: u64,
    churn: Arc<Churn>,
    stop: CancellationToken,
) {
    let mut n = seed * 1_000_000;
    while !stop.is_cancelled() {
        n += 1;
        let len = SIZES[fastrand::usize(..SIZES.len())];
        let Ok(mut s) = UnixStream::connect(&uds).await else {
            churn.refused.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let (status, _) = connect_on(&mut s, &echo.to_string()).await;
        if status != 200 {
            churn.refused.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        // In a task of its own: a stream that breaks panics there (its check or its write), and is
        // counted.
        let exchange = tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(s);
            tokio::join!(check_pattern(&mut r, n), send_pattern(&mut w, n, len)).0
        });
        match exchange.await {
            Ok(got) if got == len => {
                churn.streams.fetch_add(1, Ordering::Relaxed);
                churn.bytes.fetch_add(len, Ordering::Relaxed);
            }
            _ => {
                churn.broken.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Writes node-a's certificate pair `which` (of the two the fixture made) where the agent reads it,
/// as the kubelet rotates: written aside, then renamed over.
fn rotate(certs: &Certs, which: usize, (cert, key): &(PathBuf, PathBuf)) {
    let pair = &certs.files.nodes[[0, 2][which % 2]];
    for (from, to) in [(&pair.key, key), (&pair.cert, cert)] {
        let aside = to.with_extension("new");
        std::fs::copy(from, &aside).unwrap();
        std::fs::rename(&aside, to).unwrap();
    }
}

/// The processes under test, and their lives so far.
struct Cluster {
    certs: Arc<Certs>,
    uds_flag: String,
    /// node-a's certificate and key, as the kubelet keeps them.
    files: (PathBuf, PathBuf),
    rotations: usize,
    srv: common::Server,
    node: common::Agent,
    spliced: Option<Spliced>,
    lives: Vec<Life>,
}

/// node-b's agent, which carries its streams in the sockmap tier, with its pins and echo backend.
struct Spliced {
    agent: common::Agent,
    pins: PathBuf,
    echo: std::net::SocketAddr,
    _cleanup: RemovePins,
}

impl Spliced {
    /// Starts node-b's agent, where the sockmap tier can run.
    async fn start(certs: &Certs, srv: &common::Server) -> Option<Self> {
        if !privileged("the soak's sockmap-tier agent") {
            return None;
        }
        let pins = PinDir::new(Path::new(DEFAULT_BPF_ROOT), "node-b").path().to_owned();
        let pair = &certs.files.nodes[1];
        let agent = agent(srv)
            .id("node-b")
            .identifiers("ipv4=127.0.0.2")
            .cert(&pair.cert, &pair.key)
            .plaintext("sockmap")
            .run()
            .await;
        Some(Self { agent, _cleanup: RemovePins(pins.clone()), pins, echo: echo_on("127.0.0.2").await })
    }
}

impl Cluster {
    async fn start() -> Self {
        let certs = certs();
        let uds_flag = certs.dir.path().join("soak.sock").display().to_string();
        let srv = start_server(&certs, &uds_flag, 0).await;
        let files = (certs.dir.path().join("current.pem"), certs.dir.path().join("current-key.pem"));
        rotate(&certs, 0, &files);
        let node = agent(&srv).id("node-a").cert(&files.0, &files.1).run().await;
        let spliced = Spliced::start(&certs, &srv).await;
        let mut lives = vec![
            Life::of("server", &srv.proc, Duration::ZERO),
            Life::of("agent", &node.proc, Duration::ZERO),
        ];
        lives.extend(spliced.as_ref().map(|s| Life::of("spliced", &s.agent.proc, Duration::ZERO)));
        Self { certs, uds_flag, files, rotations: 0, srv, node, spliced, lives }
    }

    /// The agents connected when all are.
    fn agents(&self) -> u64 {
        1 + u64::from(self.spliced.is_some())
    }

    /// A certificate rotation, an agent replacement or a server replacement, `at` into the run.
    async fn event(&mut self, what: &str, at: Duration) {
        match what {
            "rotate" => {
                self.rotations += 1;
                rotate(&self.certs, self.rotations, &self.files);
            }
            "agent" => {
                // The new agent stands by while the old one holds the node; it takes over as the old
                // one drains.
                let next = agent(&self.srv).id("node-a").cert(&self.files.0, &self.files.1).spawn().await;
                self.node.proc.terminate();
                self.node.proc.exited().await;
                next.ready().await;
                self.node = next;
                self.lives.push(Life::of("agent", &self.node.proc, at));
            }
            _ => {
                // A surge: the successor takes the socket and the agent, then the old server stops.
                let next = start_server(&self.certs, &self.uds_flag, self.srv.agent_addr.port()).await;
                let agents = self.agents();
                eventually("every agent at the successor", || async {
                    metric(next.admin_addr, "spoke_server_agents_connected").await == agents
                })
                .await;
                next.wait_for_agent().await;
                self.srv.proc.terminate();
                self.srv.proc.exited().await;
                self.srv = next;
                self.lives.push(Life::of("server", &self.srv.proc, at));
            }
        }
    }

    /// Measures the running server and agents.
    async fn sample(&mut self, at: Duration) {
        let mut running = vec![
            ("server", &self.srv.proc, self.srv.admin_addr, None),
            ("agent", &self.node.proc, self.node.admin_addr, None),
        ];
        if let Some(s) = &self.spliced {
            running.push(("spliced", &s.agent.proc, s.agent.admin_addr, Some(s.pins.as_path())));
        }
        for (side, proc, admin, pins) in running {
            let measured = sample(side, proc, admin, pins, at).await;
            if let Some(life) = self.lives.iter_mut().find(|l| l.side == side && l.pid == proc.pid()) {
                life.samples.push(measured);
            }
        }
    }
}

async fn start_server(certs: &Arc<Certs>, uds_flag: &str, port: u16) -> common::Server {
    server(certs)
        .flag("--uds-name", uds_flag)
        .flag("--agent-auth", "node-cert")
        .flag("--drain-idle-timeout", "500ms")
        // For node-b's plaintext data connections, which the sockmap tier splices.
        .allow_plaintext_tunnel()
        .agent_port(port)
        .run()
        .await
}

impl Life {
    fn of(side: &'static str, proc: &common::Proc, started: Duration) -> Self {
        Self { side, pid: proc.pid(), started, samples: Vec::new() }
    }
}

/// Prints each process's measures when warm (`warm_up` into its life) and their peak after; the
/// growths beyond [`SLACK`].
fn judge(lives: &[Life], warm_up: Duration) -> Vec<String> {
    let mut grown = Vec::new();
    eprintln!(
        "{:<8} {:>8} {:>9}  {:<44} peak after",
        "process", "pid", "life", "when warm (rss KiB, fds, tasks, parked, series, map entries)"
    );
    for life in lives {
        let end = life.samples.last().map_or(life.started, |s| s.at);
        let span = end.saturating_sub(life.started);
        let warm = life.samples.iter().find(|s| s.at >= life.started + warm_up);
        let Some(warm) = warm.filter(|w| end >= w.at + warm_up) else {
            eprintln!("{:<8} {:>8} {:>9.0?}  too short to judge", life.side, life.pid, span);
            continue;
        };
        let mut peak = warm.values;
        for s in life.samples.iter().filter(|s| s.at > warm.at) {
            for (p, v) in peak.iter_mut().zip(s.values) {
                *p = (*p).max(v);
            }
        }
        eprintln!(
            "{:<8} {:>8} {:>9.0?}  {:<44} {:?}",
            life.side,
            life.pid,
            span,
            format!("{:?}", warm.values),
            peak
        );
        for ((name, slack), (w, p)) in SLACK.iter().zip(warm.values.iter().zip(peak)) {
            if p > w + slack {
                grown.push(format!("{} {}: {name} {w} → {p} (slack {slack})", life.side, life.pid));
            }
        }
    }
    grown
}

impl Churn {
    fn line(&self) -> String {
        format!(
            "{} streams ({} MiB) intact, {} opens refused, {} broken",
            self.streams.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed) >> 20,
            self.refused.load(Ordering::Relaxed),
            self.broken.load(Ordering::Relaxed),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak() {
    let length = run_length();
    let warm_up = (length / 5).max(Duration::from_secs(10));
    let mut cluster = Cluster::start().await;
    let uds = PathBuf::from(&cluster.uds_flag);
    let echo = echo().await;
    let churn = Arc::new(Churn::default());
    let stop = CancellationToken::new();
    let mut workers = tokio::task::JoinSet::new();
    for seed in 0..WORKERS {
        workers.spawn(worker(uds.clone(), echo, seed, churn.clone(), stop.clone()));
    }
    if let Some(spliced) = &cluster.spliced {
        for seed in WORKERS..WORKERS + SPLICED_WORKERS {
            workers.spawn(worker(uds.clone(), spliced.echo, seed, churn.clone(), stop.clone()));
        }
    }

    // Events at fractions of the run: rotations, one agent replacement, one server replacement.
    let mut events = vec![
        (0.15, "rotate"),
        (0.25, "agent"),
        (0.35, "rotate"),
        (0.45, "server"),
        (0.6, "rotate"),
        (0.85, "rotate"),
    ]
    .into_iter()
    .peekable();
    let begun = Instant::now();
    let (mut next_sample, mut next_progress) = (Duration::ZERO, PROGRESS_EVERY);
    while begun.elapsed() < length {
        let now = begun.elapsed();
        if let Some((_, what)) = events.next_if(|(at, _)| now >= length.mul_f64(*at)) {
            cluster.event(what, now).await;
            eprintln!("[soak {:>4.0?}] {what} done", begun.elapsed());
        }
        if now >= next_sample {
            next_sample = now + SAMPLE_EVERY;
            cluster.sample(now).await;
        }
        if now >= next_progress {
            next_progress = now + PROGRESS_EVERY;
            let spliced = cluster.spliced.as_ref().map_or(String::new(), |s| {
                format!(
                    ", sockmap agent {} KiB and {} map entries",
                    s.agent.proc.rss_kib(),
                    map_entries(&s.pins)
                )
            });
            eprintln!(
                "[soak {now:>4.0?}/{length:.0?}] {}; server {} KiB, agent {} KiB{spliced}",
                churn.line(),
                cluster.srv.proc.rss_kib(),
                cluster.node.proc.rss_kib(),
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    while let Some(done) = workers.join_next().await {
        done.unwrap();
    }
    let (srv, node) = (&cluster.srv, &cluster.node);
    let mut gauges = vec![
        (srv.admin_addr, "spoke_server_streams_open"),
        (srv.admin_addr, "spoke_server_pending_dials"),
        (node.admin_addr, "spoke_agent_streams_open"),
    ];
    if let Some(s) = &cluster.spliced {
        gauges.push((s.agent.admin_addr, "spoke_agent_streams_open"));
        eventually("no entries left in the sockmap agent's maps", || async { map_entries(&s.pins) == 0 })
            .await;
        let spliced =
            metric(s.agent.admin_addr, "spoke_agent_datapath_streams_total{tier=\"sockmap\"}").await;
        eprintln!("the sockmap agent spliced {spliced} streams");
        assert!(spliced > 0, "streams took the sockmap tier");
    }
    for (addr, gauge) in gauges {
        eventually(&format!("{gauge} back to 0"), || async { metric(addr, gauge).await == 0 }).await;
    }
    eprintln!("\nsoak over {length:?}: {}", churn.line());
    let grown = judge(&cluster.lives, warm_up);
    assert_eq!(churn.broken.load(Ordering::Relaxed), 0, "streams broke");
    assert!(churn.streams.load(Ordering::Relaxed) > 100, "the churn ran");
    assert!(grown.is_empty(), "grew after warm-up beyond the slack: {grown:#?}");
}
