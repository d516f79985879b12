//! The scenarios: what each measures is in the function's comment. Every scenario returns samples; the
//! caller repeats it and reports median, min and max.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::backend::{ECHO, GENERATE, HOLD, SINK, header};
use super::client::{Opener, ProxiedStream};
use super::procstat;

/// One measured figure.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Metric name, e.g. `throughput`.
    pub metric: String,
    /// Value.
    pub value: f64,
    /// Unit, e.g. `MB/s`.
    pub unit: &'static str,
}

fn sample(metric: impl Into<String>, value: f64, unit: &'static str) -> Sample {
    Sample { metric: metric.into(), value, unit }
}

/// Sizes of a run.
#[derive(Clone, Debug)]
pub struct Sizes {
    /// Bytes of a single-stream bulk transfer.
    pub bulk: u64,
    /// Streams of the parallel bulk transfer (sharing `bulk` bytes).
    pub parallel: usize,
    /// Round trips measured.
    pub rounds: usize,
    /// Tunnels opened by the open-rate scenarios.
    pub opens: usize,
    /// Concurrent openers.
    pub openers: usize,
    /// Tunnels held open at once by the hold scenarios.
    pub holds: Vec<usize>,
    /// Bytes pushed at a stalled reader.
    pub hol_push: u64,
    /// Dials of the scale scenario.
    pub scale_dials: usize,
}

impl Sizes {
    /// Full sizes (the figures).
    #[must_use]
    pub fn full() -> Self {
        Self {
            bulk: 1 << 30,
            parallel: 16,
            rounds: 20_000,
            opens: 1000,
            openers: 16,
            holds: vec![1000, 10_000],
            hol_push: 200 << 20,
            scale_dials: 2000,
        }
    }

    /// Small sizes: every scenario, in well under two minutes for all systems.
    #[must_use]
    pub fn quick() -> Self {
        Self {
            bulk: 32 << 20,
            parallel: 16,
            rounds: 1000,
            opens: 100,
            openers: 16,
            holds: vec![100],
            hol_push: 16 << 20,
            scale_dials: 100,
        }
    }
}

/// What a scenario needs.
pub struct Ctx {
    /// Opens tunnels to the backend.
    pub opener: Opener,
    /// Proxy processes to account: (name, pid).
    pub procs: Vec<(String, u32)>,
    /// RSS of each proxy process when the run started, before any traffic (same order as `procs`).
    pub fresh_rss: Vec<u64>,
    /// Sizes.
    pub sizes: Sizes,
    /// For `scale`: the agents' names are `agent-0` … `agent-{n-1}`, reached on this port.
    pub scale: Option<(usize, u16)>,
}

const CHUNK: usize = 256 * 1024;
const GIB: f64 = (1u64 << 30) as f64;
/// Longest any single wait in a scenario may take.
const STEP_TIMEOUT: Duration = Duration::from_mins(5);

async fn bounded<T>(what: &str, f: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::time::timeout(STEP_TIMEOUT, f).await.with_context(|| format!("{what} timed out"))?
}

/// CPU of the proxy processes and of the whole machine, between two points.
struct Cpu {
    procs: Duration,
    machine: Duration,
}

fn cpu(ctx: &Ctx) -> Cpu {
    Cpu {
        procs: ctx.procs.iter().map(|(_, pid)| procstat::cpu_time(*pid)).sum(),
        machine: procstat::machine_busy(),
    }
}

fn bulk_samples(ctx: &Ctx, before: &Cpu, bytes: u64, elapsed: Duration) -> Vec<Sample> {
    let after = cpu(ctx);
    let gib = bytes as f64 / GIB;
    let mut out = vec![sample("throughput", bytes as f64 / elapsed.as_secs_f64() / 1e6, "MB/s")];
    if !ctx.procs.is_empty() {
        out.push(sample(
            "proxy_cpu",
            after.procs.saturating_sub(before.procs).as_secs_f64() / gib,
            "CPU-s/GiB",
        ));
    }
    out.push(sample(
        "machine_cpu",
        (after.machine.saturating_sub(before.machine)).as_secs_f64() / gib,
        "CPU-s/GiB",
    ));
    out
}

/// Memory and descriptors of each proxy process before any traffic (fresh processes, pools warm).
#[must_use]
pub fn idle(ctx: &Ctx) -> Vec<Sample> {
    let mut out = Vec::new();
    for (name, pid) in &ctx.procs {
        out.push(sample(
            format!("rss.{name}"),
            procstat::rss_bytes(*pid) as f64 / f64::from(1u32 << 20),
            "MiB",
        ));
        out.push(sample(format!("fds.{name}"), procstat::open_fds(*pid) as f64, "fds"));
    }
    out
}

/// One stream, client → backend: `bulk` bytes, timed until the backend has counted them all.
pub async fn bulk_up(ctx: &Ctx) -> anyhow::Result<Vec<Sample>> {
    let mut t = ctx.opener.open().await?;
    t.write_all(&header(SINK, 0)).await?;
    let buf = vec![0xa5_u8; CHUNK];
    let before = cpu(ctx);
    let start = Instant::now();
    let got = bounded("bulk up", async {
        let mut left = ctx.sizes.bulk;
        while left > 0 {
            let n = usize::try_from(left.min(CHUNK as u64)).expect("bounded by CHUNK");
            t.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        t.shutdown().await?;
        Ok(t.read_u64().await?)
    })
    .await?;
    let elapsed = start.elapsed();
    if got != ctx.sizes.bulk {
        bail!("backend counted {got} bytes of {}", ctx.sizes.bulk);
    }
    Ok(bulk_samples(ctx, &before, got, elapsed))
}

async fn receive(t: &mut ProxiedStream) -> anyhow::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = t.read(&mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

async fn download(opener: &Opener, bytes: u64) -> anyhow::Result<u64> {
    let mut t = opener.open().await?;
    t.write_all(&header(GENERATE, bytes)).await?;
    let got = receive(&mut t).await?;
    t.shutdown().await?;
    if got != bytes {
        bail!("received {got} bytes of {bytes}");
    }
    Ok(got)
}

/// One stream, backend → client: `bulk` bytes, timed until the client has read them all.
pub async fn bulk_down(ctx: &Ctx) -> anyhow::Result<Vec<Sample>> {
    let before = cpu(ctx);
    let start = Instant::now();
    let got = bounded("bulk down", download(&ctx.opener, ctx.sizes.bulk)).await?;
    Ok(bulk_samples(ctx, &before, got, start.elapsed()))
}

/// `parallel` streams at once, backend → client, sharing `bulk` bytes.
pub async fn bulk_parallel(ctx: &Ctx) -> anyhow::Result<Vec<Sample>> {
    let each = ctx.sizes.bulk / ctx.sizes.parallel as u64;
    let before = cpu(ctx);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..ctx.sizes.parallel {
        let opener = ctx.opener.clone();
        tasks.spawn(async move { download(&opener, each).await });
    }
    let mut total = 0;
    while let Some(r) = tasks.join_next().await {
        total += bounded("parallel stream", async { r? }).await?;
    }
    Ok(bulk_samples(ctx, &before, total, start.elapsed()))
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1));
}

fn micros(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1e3
}

async fn round_trips(t: &mut ProxiedStream, rounds: usize) -> anyhow::Result<Histogram<u64>> {
    let msg = [0x42_u8; 64];
    let mut back = [0u8; 64];
    let mut h = histogram();
    for _ in 0..rounds {
        let start = Instant::now();
        t.write_all(&msg).await?;
        t.read_exact(&mut back).await?;
        record(&mut h, start.elapsed());
    }
    Ok(h)
}

/// 64-byte request and response on one stream: p50, p99, p99.9.
pub async fn round_trip(ctx: &Ctx) -> anyhow::Result<Vec<Sample>> {
    let mut t = ctx.opener.open().await?;
    t.write_all(&header(ECHO, 0)).await?;
    bounded("warm-up", async { round_trips(&mut t, 100).await }).await?;
    let h = bounded("round trips", round_trips(&mut t, ctx.sizes.rounds)).await?;
    Ok(vec![
        sample("rtt_p50", micros(&h, 0.5), "µs"),
        sample("rtt_p99", micros(&h, 0.99), "µs"),
        sample("rtt_p999", micros(&h, 0.999), "µs"),
    ])
}

/// Opens a tunnel and checks it with a 1-byte echo.
async fn open_checked(opener: &Opener) -> anyhow::Result<ProxiedStream> {
    let mut t = opener.open().await?;
    t.write_all(&header(ECHO, 0)).await?;
    t.write_all(b"x").await?;
    let mut b = [0u8; 1];
    t.read_exact(&mut b).await?;
    Ok(t)
}

async fn open_rate(opener: &Opener, total: usize, openers: usize) -> anyhow::Result<Vec<Sample>> {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..openers {
        let opener = opener.clone();
        let n = total / openers + usize::from(i < total % openers);
        tasks.spawn(async move {
            let mut h = histogram();
            for _ in 0..n {
                let t0 = Instant::now();
                drop(open_checked(&opener).await?);
                record(&mut h, t0.elapsed());
            }
            anyhow::Ok(h)
        });
    }
    let mut all = histogram();
    while let Some(r) = tasks.join_next().await {
        all.add(bounded("openers", async { r? }).await?).expect("same histogram bounds");
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(vec![
        sample("tunnels_per_s", total as f64 / elapsed, "1/s"),
        sample("open_p50", micros(&all, 0.5) / 1e3, "ms"),
        sample("open_p99", micros(&all, 0.99) / 1e3, "ms"),
    ])
}

/// Tunnels opened one at a time, each checked with a 1-byte echo.
pub async fn open_sequential(ctx: &Ctx) -> anyhow::Result<Vec<Sample>> {
    open_rate(&ctx.opener, ctx.sizes.opens, 1).await
}

/// Tunnels opened by `openers` concurrent openers.
pub async fn open_parallel(ctx: &Ctx) -> anyhow::Result<Vec<Sample>> {
    open_rate(&ctx.opener, ctx.sizes.opens, ctx.sizes.openers).await
}

/// Tunnels opened at once while `hold` are kept open and idle: memory and descriptors of each proxy
/// process before and while holding them.
pub async fn hold(ctx: &Ctx, count: usize) -> anyhow::Result<Vec<Sample>> {
    /// Tunnels being opened at once.
    const OPENING: usize = 64;
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    let fds_before: Vec<u64> = ctx.procs.iter().map(|(_, pid)| procstat::open_fds(*pid)).collect();
    let mut held: Vec<ProxiedStream> = Vec::with_capacity(count);
    let opening = Arc::new(tokio::sync::Semaphore::new(OPENING));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        let permit = opening.clone().acquire_owned().await.expect("never closed");
        let opener = ctx.opener.clone();
        tasks.spawn(async move {
            let t = open_checked(&opener).await;
            drop(permit);
            t
        });
        while let Some(r) = tasks.try_join_next() {
            held.push(r??);
        }
    }
    while let Some(r) = tasks.join_next().await {
        held.push(bounded("hold open", async { r? }).await?);
    }
    let mut out = vec![sample("tunnels_held", held.len() as f64, "tunnels")];
    // Growth over the fresh process: memory an allocator kept from earlier scenarios is not charged
    // to these tunnels only because it was already there.
    let mut grown = 0u64;
    for ((name, pid), fresh) in ctx.procs.iter().zip(&ctx.fresh_rss) {
        let rss = procstat::rss_bytes(*pid);
        grown += rss.saturating_sub(*fresh);
        out.push(sample(format!("rss_held.{name}"), mib(rss), "MiB"));
        out.push(sample(format!("fds_held.{name}"), procstat::open_fds(*pid) as f64, "fds"));
    }
    if !ctx.procs.is_empty() {
        out.push(sample("kib_per_tunnel", grown as f64 / 1024.0 / count as f64, "KiB"));
    }
    drop(held);
    // The next repetition starts once the proxies have let go of these tunnels (a gRPC tunnel closes
    // with a CLOSE_REQ/CLOSE_RSP exchange, after the drop); a proxy that keeps them is a leak.
    let settled = async {
        loop {
            let now = ctx.procs.iter().map(|(_, pid)| procstat::open_fds(*pid));
            if now.zip(&fds_before).all(|(now, before)| now <= before + HOLD_FD_SLACK) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(STEP_TIMEOUT, settled)
        .await
        .map_err(|_| anyhow::anyhow!("the proxies kept descriptors of {count} closed tunnels"))?;
    Ok(out)
}

/// Descriptors a proxy may hold beyond its count before a hold (pooled connections refilled meanwhile).
const HOLD_FD_SLACK: u64 = 64;

/// Head-of-line: round trips on one stream before and while another stream's reader is stalled with
/// `hol_push` bytes pushed at it.
pub async fn head_of_line(ctx: &Ctx) -> anyhow::Result<Vec<Sample>> {
    let rounds = (ctx.sizes.rounds / 4).max(200);
    let mut probe = ctx.opener.open().await?;
    probe.write_all(&header(ECHO, 0)).await?;
    bounded("warm-up", round_trips(&mut probe, 100)).await?;
    let unloaded = bounded("unloaded round trips", round_trips(&mut probe, rounds)).await?;
    let mut stalled = ctx.opener.open().await?;
    let hold_ms = u64::try_from(STEP_TIMEOUT.as_millis()).unwrap_or(u64::MAX);
    stalled.write_all(&header(HOLD, hold_ms)).await?;
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0u64);
    let push = ctx.sizes.hol_push;
    let pusher = tokio::spawn(async move {
        let chunk = vec![0u8; 64 * 1024];
        let mut sent = 0u64;
        while sent < push && stalled.write_all(&chunk).await.is_ok() {
            sent += chunk.len() as u64;
            let _ = progress_tx.send(sent);
        }
        stalled
    });
    // Wait until the pusher stalls: every buffer between it and the reader is full.
    while let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(300), progress.changed()).await {}
    let loaded = bounded("loaded round trips", round_trips(&mut probe, rounds)).await?;
    pusher.abort();
    let (p_unloaded, p_loaded) = (micros(&unloaded, 0.99), micros(&loaded, 0.99));
    Ok(vec![
        sample("rtt_p99_unloaded", p_unloaded, "µs"),
        sample("rtt_p99_loaded", p_loaded, "µs"),
        sample("p99_ratio", p_loaded / p_unloaded, "x"),
    ])
}

/// Dials spread over many agents (`agent-0` … `agent-{n-1}`), 16 at a time: dial latency and the
/// proxy processes' memory.
pub async fn scale(ctx: &Ctx) -> anyhow::Result<Vec<Sample>> {
    let Some((agents, port)) = ctx.scale else { bail!("scale needs --scale-agents and --scale-port") };
    let dials = ctx.sizes.scale_dials;
    let openers = ctx.sizes.openers;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..openers {
        let opener = ctx.opener.clone();
        tasks.spawn(async move {
            let mut h = histogram();
            for k in (i..dials).step_by(openers) {
                let to = opener.to(format!("agent-{}:{port}", k % agents));
                let t0 = Instant::now();
                drop(open_checked(&to).await?);
                record(&mut h, t0.elapsed());
            }
            anyhow::Ok(h)
        });
    }
    let mut all = histogram();
    while let Some(r) = tasks.join_next().await {
        all.add(bounded("scale dials", async { r? }).await?).expect("same histogram bounds");
    }
    let mut out = vec![
        sample("dial_p50", micros(&all, 0.5) / 1e3, "ms"),
        sample("dial_p99", micros(&all, 0.99) / 1e3, "ms"),
    ];
    for (name, pid) in &ctx.procs {
        out.push(sample(
            format!("rss.{name}"),
            procstat::rss_bytes(*pid) as f64 / f64::from(1u32 << 20),
            "MiB",
        ));
    }
    Ok(out)
}
