//! `spoke-bench`: a load generator that behaves like kube-apiserver, and the backend it talks to.
//! Its own crate, so that the product library carries no benchmark-only dependencies.
//!
//! It measures any HTTP-CONNECT proxy (a Unix socket or TCP, optionally with a TLS client certificate)
//! or any port forwarder, so an operator can measure what they run today before switching. `cargo xtask
//! bench` drives it against direct TCP, Spoke and peers in one run.
#![expect(
    clippy::cast_precision_loss,
    reason = "measurements are reported as f64; counts stay far below 2^52"
)]

mod backend;
mod client;
mod procstat;
mod scenarios;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use rustls_pki_types::ServerName;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use client::{Opener, Tunnel, Via};
use scenarios::{Ctx, Sample, Sizes};
use spoke::agent::config::{AgentConfig, Credential, ServerAddr, TunnelTls};
use spoke::agent::policy::{AllowRule, Policy};
use spoke::datapath::{self, Mode};
use spoke::protocol::Identity;
use spoke::transport::tls::TlsFiles;

/// Every scenario, in run order.
const SCENARIOS: &[&str] = &[
    "bulk_up",
    "bulk_down",
    "bulk_parallel",
    "round_trip",
    "open_sequential",
    "open_parallel",
    "hold",
    "head_of_line",
    "scale",
];

/// Command line of `spoke-bench`.
#[derive(Debug, Parser)]
#[command(name = "spoke-bench", version, about = "Load generator and benchmark for HTTP-CONNECT proxies")]
struct BenchArgs {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the benchmark backend (echo, sink, generate, hold) until killed.
    Backend {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Run scenarios through a proxy and print (or write) the results as JSON.
    Run(RunArgs),
    /// Run many simulated agents in this process (for the `scale` scenario) until killed.
    Agents(AgentsArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Name of the system under test, copied into every result row.
    #[arg(long)]
    system: String,
    /// Backend address, as the proxy's far side reaches it (the CONNECT target).
    #[arg(long)]
    target: String,
    /// How tunnels are opened: `direct` (to --target), `forward:ADDR` (a port forwarder),
    /// `uds:PATH` or `tcp:ADDR` (HTTP CONNECT), `grpc+uds:PATH` or `grpc+tcp:ADDR` (Konnectivity's gRPC
    /// tunnel, one connection per tunnel as kube-apiserver opens them).
    #[arg(long, default_value = "direct")]
    via: String,
    /// CA that the TCP proxy's certificate must chain to (enables TLS to the proxy).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Client certificate for the TCP proxy.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// Key of --tls-cert.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Name the proxy's certificate must carry.
    #[arg(long, default_value = "localhost")]
    tls_name: String,
    /// A proxy process whose CPU, memory and descriptors are measured, as NAME=PID (repeatable).
    #[arg(long = "proxy-pid", value_parser = parse_proc)]
    procs: Vec<(String, u32)>,
    /// Scenarios to run (comma-separated; default all but scale).
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Small sizes: every scenario in seconds.
    #[arg(long)]
    quick: bool,
    /// Tunnel counts of the hold scenario (default 1000,10000; quick 100).
    #[arg(long, value_delimiter = ',')]
    holds: Vec<usize>,
    /// Repetitions of each scenario (the reported value is their median).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// For `scale`: number of agents named agent-0 … and the backend port they reach.
    #[arg(long)]
    scale_agents: Option<usize>,
    /// For `scale`: the backend's port on 127.0.0.1.
    #[arg(long)]
    scale_port: Option<u16>,
    /// Write the JSON rows here instead of stdout.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn parse_proc(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s.split_once('=').ok_or("expected NAME=PID")?;
    Ok((name.to_owned(), pid.parse().map_err(|_| format!("bad pid in {s:?}"))?))
}

#[derive(Debug, clap::Args)]
struct AgentsArgs {
    /// spoke-server's agent listener.
    #[arg(long)]
    server: SocketAddr,
    /// How many agents.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Cluster CA (--ca-cert of the agents).
    #[arg(long)]
    ca: PathBuf,
    /// Agent certificate.
    #[arg(long)]
    cert: PathBuf,
    /// Agent key.
    #[arg(long)]
    key: PathBuf,
    /// Name the server certificate must carry.
    #[arg(long, default_value = "localhost")]
    tls_name: String,
    /// Data connections each agent keeps parked (the agent's `--pool-size`; its default is 8).
    #[arg(long, default_value_t = 8)]
    pool_size: usize,
}

/// One result row of the JSON output.
#[derive(Debug, Serialize)]
struct Row {
    /// System under test.
    system: String,
    /// Scenario.
    scenario: String,
    /// Metric.
    metric: String,
    /// Median over the repetitions.
    value: f64,
    /// Unit.
    unit: String,
    /// Smallest repetition.
    min: f64,
    /// Largest repetition.
    max: f64,
    /// Repetitions.
    reps: usize,
}

fn summarize(system: &str, scenario: &str, runs: Vec<Vec<Sample>>) -> Vec<Row> {
    let mut by_metric: BTreeMap<String, (&'static str, Vec<f64>)> = BTreeMap::new();
    let mut order = Vec::new();
    for s in runs.into_iter().flatten() {
        let entry = by_metric.entry(s.metric.clone()).or_insert_with(|| {
            order.push(s.metric.clone());
            (s.unit, Vec::new())
        });
        entry.1.push(s.value);
    }
    order
        .into_iter()
        .map(|metric| {
            let (unit, mut values) = by_metric.remove(&metric).expect("every ordered metric has values");
            values.sort_by(f64::total_cmp);
            Row {
                system: system.into(),
                scenario: scenario.into(),
                value: values[values.len() / 2],
                min: values[0],
                max: values[values.len() - 1],
                reps: values.len(),
                unit: unit.into(),
                metric,
            }
        })
        .collect()
}

fn opener(a: &RunArgs) -> anyhow::Result<Opener> {
    let (tunnel, via) = match a.via.strip_prefix("grpc+") {
        Some(via) => (Tunnel::Grpc, via),
        None => (Tunnel::Connect, a.via.as_str()),
    };
    let via = match via.split_once(':') {
        None if via == "direct" && tunnel == Tunnel::Connect => {
            Via::Forward(a.target.parse().context("--target must be ADDRESS:PORT for direct")?)
        }
        Some(("forward", addr)) if tunnel == Tunnel::Connect => {
            Via::Forward(addr.parse().context("forward:ADDR")?)
        }
        Some(("uds", path)) => Via::Uds(path.into()),
        Some(("tcp", addr)) => {
            let tls = match (&a.tls_ca, &a.tls_cert, &a.tls_key) {
                (None, None, None) => None,
                (Some(ca), Some(cert), Some(key)) => {
                    let files = TlsFiles { ca: ca.clone(), cert: cert.clone(), key: key.clone() };
                    let config = spoke::transport::tls::client_config(&files)?;
                    let name = ServerName::try_from(a.tls_name.clone()).context("--tls-name")?;
                    Some((tokio_rustls::TlsConnector::from(config), name))
                }
                _ => bail!("--tls-ca, --tls-cert and --tls-key go together"),
            };
            Via::Tcp { addr: addr.parse().context("tcp:ADDR")?, tls }
        }
        _ => bail!("--via must be direct, forward:ADDR, uds:PATH, tcp:ADDR, grpc+uds:PATH or grpc+tcp:ADDR"),
    };
    Ok(Opener { via, tunnel, target: a.target.clone() })
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    let mut sizes = if a.quick { Sizes::quick() } else { Sizes::full() };
    if !a.holds.is_empty() {
        sizes.holds.clone_from(&a.holds);
    }
    let ctx = Ctx {
        opener: opener(&a)?,
        fresh_rss: a.procs.iter().map(|(_, pid)| procstat::rss_bytes(*pid)).collect(),
        procs: a.procs.clone(),
        sizes,
        scale: a.scale_agents.zip(a.scale_port),
    };
    let chosen: Vec<String> = if a.scenarios.is_empty() {
        SCENARIOS.iter().filter(|s| **s != "scale").map(|s| (*s).to_owned()).collect()
    } else {
        a.scenarios.clone()
    };
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    if !ctx.procs.is_empty() && !chosen.iter().any(|s| s == "scale") {
        rows.extend(summarize(&a.system, "idle", vec![scenarios::idle(&ctx)]));
    }
    for name in &chosen {
        let variants: Vec<(String, Option<usize>)> = if name == "hold" {
            ctx.sizes.holds.iter().map(|n| (format!("hold_{n}"), Some(*n))).collect()
        } else {
            vec![(name.clone(), None)]
        };
        for (label, count) in variants {
            let mut runs = Vec::new();
            for rep in 1..=a.reps.max(1) {
                eprint!("\r[{}] {label} {rep}/{} ...        ", a.system, a.reps.max(1));
                let samples = match (name.as_str(), count) {
                    ("bulk_up", _) => scenarios::bulk_up(&ctx).await,
                    ("bulk_down", _) => scenarios::bulk_down(&ctx).await,
                    ("bulk_parallel", _) => scenarios::bulk_parallel(&ctx).await,
                    ("round_trip", _) => scenarios::round_trip(&ctx).await,
                    ("open_sequential", _) => scenarios::open_sequential(&ctx).await,
                    ("open_parallel", _) => scenarios::open_parallel(&ctx).await,
                    ("hold", Some(n)) => scenarios::hold(&ctx, n).await,
                    ("head_of_line", _) => scenarios::head_of_line(&ctx).await,
                    ("scale", _) => scenarios::scale(&ctx).await,
                    _ => bail!("unknown scenario {name:?} (known: {})", SCENARIOS.join(", ")),
                };
                match samples {
                    Ok(s) => runs.push(s),
                    Err(e) => {
                        eprintln!("\n[{}] {label} failed: {e:#}", a.system);
                        failures.push(format!("{label}: {e:#}"));
                        break;
                    }
                }
            }
            rows.extend(summarize(&a.system, &label, runs));
        }
    }
    eprintln!("\r[{}] done{:20}", a.system, "");
    let json = serde_json::to_string_pretty(&rows)?;
    match &a.json {
        Some(path) => std::fs::write(path, json).with_context(|| format!("write {}", path.display()))?,
        None => println!("{json}"),
    }
    if !failures.is_empty() {
        bail!("{} scenario(s) failed: {}", failures.len(), failures.join("; "));
    }
    Ok(())
}

async fn agents(a: AgentsArgs) -> anyhow::Result<()> {
    let shutdown = spoke::shutdown::on_signals()?;
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..a.count {
        let name = format!("agent-{i}");
        let config = AgentConfig {
            servers: vec![ServerAddr { host: a.server.ip().to_string(), port: a.server.port() }],
            tls_server_name: Some(a.tls_name.clone()),
            credential: Credential::Cert(TlsFiles {
                ca: a.ca.clone(),
                cert: a.cert.clone(),
                key: a.key.clone(),
            }),
            identity: Identity {
                agent_id: name.clone(),
                node_name: name.clone(),
                hostnames: Vec::new(),
                addresses: vec!["127.0.0.1".parse().expect("literal address")],
                cidrs: Vec::new(),
                default_route: false,
            },
            policy: Policy {
                allow: vec!["127.0.0.0/8".parse::<AllowRule>().map_err(anyhow::Error::msg)?],
                node_addresses: Vec::new(),
                kubelet_port: 10250,
                served: Vec::new(),
            },
            pool_size: a.pool_size,
            // Simulated agents share one process: no budget of their own.
            max_streams: spoke::agent::config::DEFAULT_MAX_STREAMS,
            memory: (spoke::budget::Budget { base: 0, terms: Vec::new() }, None),
            dial_timeout: std::time::Duration::from_secs(5),
            connect_timeout: std::time::Duration::from_secs(30),
            tcp_user_timeout: std::time::Duration::from_secs(30),
            reconnect: (std::time::Duration::from_millis(200), std::time::Duration::from_secs(5)),
            grace_period: std::time::Duration::from_secs(1),
            admin_bind: None,
            datapath: Mode::Copy,
            sockmap_limits: datapath::sockmap::stream::Limits::default(),
            bpf_root: datapath::sockmap::DEFAULT_BPF_ROOT.into(),
            tunnel_tls: TunnelTls::On,
            worker_threads: 0,
        };
        tasks.spawn(spoke::run_agent(config, None, stop.child_token()));
    }
    println!("spoke-bench agents started count={}", a.count);
    shutdown.cancelled().await;
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    Ok(())
}

fn main() -> ExitCode {
    let args = BenchArgs::parse();
    spoke::telemetry::init_logging(spoke::telemetry::LogFormat::Plain);
    spoke::process::run_main("spoke-bench", 0, serve(args))
}

async fn serve(args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        Command::Backend { listen } => {
            let listener =
                tokio::net::TcpListener::bind(listen).await.with_context(|| format!("bind {listen}"))?;
            println!("spoke-bench backend started addr={}", listener.local_addr()?);
            backend::serve(listener).await;
            Ok(())
        }
        Command::Run(a) => run(a).await,
        Command::Agents(a) => agents(a).await,
    }
}
