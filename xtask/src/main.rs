//! Spoke's developer commands: `cargo xtask run`, `cargo xtask test`, `cargo xtask bootstrap`.
//!
//! xtask installs tools and runs things; it never builds the eBPF object itself (proxy-user's build.rs
//! does, through aya-build).
#![forbid(unsafe_code)]

mod bench;
mod bootstrap;
mod demo;
mod image;
mod kube;
mod manifests;
mod peers;
mod vm;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Set up, run and test Spoke")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install what builds and tests need (nightly rust-src, bpf-linker, cargo-fuzz, Debian packages).
    Bootstrap,
    /// Run server, agent and a demo backend locally with development certificates, until Ctrl-C (or
    /// SIGTERM, SIGHUP).
    Run {
        /// Datapath of the agent: auto, copy, splice or sockmap (the last two with plaintext data
        /// connections; sockmap needs root).
        #[arg(long, default_value = "auto")]
        datapath: String,
    },
    /// Benchmark Spoke against direct TCP and peers on loopback; results under results/.
    Bench(bench::BenchOpts),
    /// Build the container image from source as an OCI archive (target/image/spoke-oci.tar), checked
    /// with skopeo; push it with `skopeo copy oci-archive:target/image/spoke-oci.tar docker://REGISTRY/spoke:TAG`.
    Image,
    /// The end-to-end suite against a real kube-apiserver and etcd on loopback (part of `test`); the
    /// first run builds kube-apiserver from Debian's source package (about 11 minutes, cached).
    E2e,
    /// Check deploy/ against the binaries and the Kubernetes API: render it, validate every object,
    /// and pass every container's flags through --check-config (part of `test`).
    Manifests,
    /// Run every check and test: formatting, clippy, unit, end-to-end and privileged tests, deploy/'s
    /// manifests, and each fuzz target for a bounded time.
    Test {
        /// Only run tests whose name contains this filter (skips formatting and clippy).
        filter: Option<String>,
    },
    /// Churn streams of mixed sizes through a server and an agent while the agent's certificate
    /// rotates and both are replaced; fails if memory, descriptors, tasks, parked connections or metric
    /// series grow after warm-up (tests/tests/soak.rs; `test` runs it for 2 minutes).
    Soak {
        /// How long to run, in minutes.
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
    },
    /// Boot a Debian kernel (6.1 or 6.12, which have kernel TLS) under qemu software emulation and run a
    /// command in it, with this machine's root read-only and only loopback networking.
    Vm(vm::VmOpts),
}

/// The workspace root.
pub(crate) fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// The cargo target directory.
pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// A command run from the workspace root.
pub(crate) fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args).current_dir(root());
    c
}

/// Runs `c` to completion, failing unless it succeeds.
pub(crate) fn run(mut c: Command) -> anyhow::Result<()> {
    let shown = format!("{c:?}");
    eprintln!("[xtask] {shown}");
    let status = c.status().with_context(|| format!("start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

/// `key=value` pairs of a Spoke binary's "started" line.
pub(crate) fn pairs(line: &str) -> Vec<(String, String)> {
    line.split_whitespace().filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect()
}

/// The value of `key` in [`pairs`].
pub(crate) fn value(pairs: &[(String, String)], key: &str) -> anyhow::Result<String> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .with_context(|| format!("no {key}= in {pairs:?}"))
}

/// Waits at most `timeout` for the first stdout line of `child` (a Spoke binary's "started" line with its
/// bound addresses) and returns its [`pairs`]. The rest of stdout is drained so the child never blocks.
pub(crate) fn started(
    child: &mut std::process::Child,
    timeout: std::time::Duration,
) -> anyhow::Result<Vec<(String, String)>> {
    use std::io::BufRead as _;
    let stdout = child.stdout.take().context("stdout is not piped")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = std::io::BufReader::new(stdout).lines();
        let _ = tx.send(lines.next());
        for _ in lines {}
    });
    let Ok(Some(Ok(line))) = rx.recv_timeout(timeout) else { bail!("no started line within {timeout:?}") };
    Ok(pairs(&line))
}

/// GET `path` from `addr` over plain HTTP/1.1, each step bounded by `timeout`: the status and the whole
/// response, or `None` when the endpoint cannot be reached or answers nonsense.
pub(crate) fn http_get(
    addr: std::net::SocketAddr,
    path: &str,
    timeout: std::time::Duration,
) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some((text.split_whitespace().nth(1)?.parse().ok()?, text))
}

/// Cargo arguments that select every package with a Spoke binary (the product and the load generator).
pub(crate) const BIN_PACKAGES: [&str; 4] = ["--package", "proxy-user", "--package", "proxy-bench"];

/// Builds the binaries (dev profile) and returns the directory holding them.
pub(crate) fn build_binaries() -> anyhow::Result<PathBuf> {
    let mut c = cmd("cargo", &["build", "--bins"]);
    c.args(BIN_PACKAGES);
    run(c)?;
    Ok(target_dir().join("debug"))
}

fn test(filter: Option<&str>) -> anyhow::Result<()> {
    bootstrap::for_tests()?;
    if filter.is_none() {
        run(cmd("cargo", &["fmt", "--all", "--", "--check"]))?;
        // With the real-apiserver suite, which plain builds leave out.
        run(cmd(
            "cargo",
            &["clippy", "--all-targets", "--features", "spoke-tests/kube-e2e", "--", "-D", "warnings"],
        ))?;
        // The kernel programs build only for BPF, so the line above never sees them.
        let ebpf_target = target_dir().join("ebpf-clippy");
        let mut c = cmd(
            "cargo",
            &[
                "+nightly",
                "clippy",
                "--package",
                "proxy-ebpf",
                "--bin",
                "proxy-ebpf",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--target-dir",
            ],
        );
        c.arg(&ebpf_target)
            .args(["--", "-D", "warnings"])
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER");
        run(c)?;
    }
    let mut t = cmd("cargo", &["test", "--"]);
    if let Some(f) = filter {
        t.arg(f);
    }
    // `cargo test` builds the binaries for proxy-user's own end-to-end tests before running anything;
    // the privileged tests crate finds the same ones here.
    let bins = target_dir().join("debug");
    t.env("SPOKE_SERVER_BIN", bins.join("spoke-server")).env("SPOKE_AGENT_BIN", bins.join("spoke-agent"));
    run(t)?;
    if filter.is_none_or(|f| "ktls".contains(f) || f.contains("ktls")) {
        vm_tests(&bins)?;
    }
    e2e(filter)?;
    if filter.is_none() {
        manifests::check(&bins)?;
        fuzz()?;
    }
    Ok(())
}

/// The suite against a real kube-apiserver (`tests/tests/kube_e2e.rs`): builds or finds the control
/// plane's binaries ([`kube::ensure`]) and Spoke's, then runs it one cluster at a time.
fn e2e(filter: Option<&str>) -> anyhow::Result<()> {
    let plane = kube::ensure()?;
    let bins = build_binaries()?;
    let mut t = cmd(
        "cargo",
        &[
            "test",
            "--package",
            "spoke-tests",
            "--features",
            "kube-e2e",
            "--test",
            "kube_e2e",
            "--",
            "--test-threads",
            "1",
        ],
    );
    t.args(filter);
    t.env("SPOKE_KUBE_APISERVER", &plane.kube_apiserver)
        .env("SPOKE_ETCD", &plane.etcd)
        .env("SPOKE_KUBECTL", &plane.kubectl)
        .env("SPOKE_SERVER_BIN", bins.join("spoke-server"))
        .env("SPOKE_AGENT_BIN", bins.join("spoke-agent"));
    eprintln!(
        "[e2e] kube-apiserver {} ({}), etcd, kubectl {}",
        plane.version,
        plane.kube_apiserver.display(),
        plane.kubectl.display()
    );
    run(t)
}

/// The path of the test executable `cargo test --no-run` builds for `selection`.
fn test_executable(selection: &[&str]) -> anyhow::Result<PathBuf> {
    let mut c = cmd("cargo", &["test", "--no-run", "--message-format=json"]);
    c.args(selection);
    let out = c.output().context("cargo test --no-run")?;
    anyhow::ensure!(out.status.success(), "cargo test --no-run {selection:?} failed");
    String::from_utf8(out.stdout)?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        // The test harness only: `--test` builds the package's binaries too, which come as artifacts.
        .filter(|v| v.pointer("/profile/test").and_then(serde_json::Value::as_bool) == Some(true))
        .filter_map(|v| v.get("executable")?.as_str().map(PathBuf::from))
        .next_back()
        .with_context(|| format!("no test executable for {selection:?}"))
}

/// The tests that need kernel TLS, in each of [`vm::KERNELS`] under emulation: the transport's unit
/// tests (kernel TLS and the user-space TLS it falls back to) and the end-to-end ones
/// (`proxy-user/tests/ktls.rs`); in 6.12 also the whole tunnel suite, whose TLS streams then take the
/// kernel TLS tier (all but its 1 GiB transfer, whose bound is for hardware: `ktls.rs` moves 256 MiB);
/// then the end-to-end ones again in a guest without the tls module, for the fallback. The 6.12 guest
/// with kernel TLS also runs the fault test that needs netem ([`NETEM_TEST`]).
fn vm_tests(bins: &std::path::Path) -> anyhow::Result<()> {
    let unit = test_executable(&["--package", "proxy-user", "--lib"])?;
    let e2e = test_executable(&["--package", "proxy-user", "--test", "ktls"])?;
    let tunnel = test_executable(&["--package", "proxy-user", "--test", "tunnel"])?;
    let faults = test_executable(&["--package", "spoke-tests", "--test", "faults"])?;
    let env = |expect: &str| {
        vec![
            ("SPOKE_EXPECT_KTLS".to_owned(), expect.to_owned()),
            ("SPOKE_SERVER_BIN".to_owned(), bins.join("spoke-server").display().to_string()),
            ("SPOKE_AGENT_BIN".to_owned(), bins.join("spoke-agent").display().to_string()),
        ]
    };
    let sh = |script: String| vec!["/bin/sh".to_owned(), "-c".to_owned(), script];
    let (unit, e2e, tunnel, faults) = (unit.display(), e2e.display(), tunnel.display(), faults.display());
    let runs = [
        (vm::KERNELS[0], true, sh(format!("{unit} transport:: && {e2e} --test-threads 1"))),
        (
            vm::KERNELS[1],
            true,
            sh(format!(
                "{unit} transport:: && {e2e} --test-threads 1 && \
                 {tunnel} --test-threads 1 --skip one_gib_each_way_arrives_intact && \
                 {faults} --ignored --exact {NETEM_TEST} --nocapture"
            )),
        ),
        (vm::KERNELS[1], false, sh(format!("{e2e} --test-threads 1"))),
    ];
    for (kernel, with_tls, command) in runs {
        let guest = vm::prepare(kernel, with_tls)?;
        let (code, _) = guest.run(&root(), &command, &env(if with_tls { "1" } else { "0" }), vm::TIMEOUT)?;
        let module = if with_tls { "with" } else { "without" };
        anyhow::ensure!(
            code == 0,
            "kernel TLS tests failed in {} {module} the tls module (exit {code})",
            guest.release
        );
    }
    Ok(())
}

/// The fault test whose link delays, reorders and drops packets with netem (`tests/tests/faults.rs`),
/// ignored by plain `cargo test` because this machine's kernel has no netem.
const NETEM_TEST: &str = "a_delaying_reordering_lossy_link_carries_bulk_and_short_streams_intact";

/// The fuzz targets (`proxy-user/fuzz`): what Spoke parses from the network.
const FUZZ_TARGETS: &[&str] =
    &["codec_decode", "connect_head", "grpc_frontend", "tls_records", "ktls_control", "counted_reuse"];
/// How long `cargo xtask test` fuzzes each target.
const FUZZ_SECONDS: u32 = 30;

/// Runs every fuzz target for [`FUZZ_SECONDS`], from the seeds in the repository plus what earlier runs
/// on this machine found (kept under the target directory, never written into the repository).
fn fuzz() -> anyhow::Result<()> {
    let fuzz_dir = root().join("proxy-user/fuzz");
    for target in FUZZ_TARGETS {
        let found = target_dir().join("fuzz-corpus").join(target);
        std::fs::create_dir_all(&found).with_context(|| format!("create {}", found.display()))?;
        let mut c = cmd("cargo", &["+nightly", "fuzz", "run", "--fuzz-dir"]);
        c.arg(&fuzz_dir)
            .args(["--target-dir"])
            .arg(target_dir().join("fuzz"))
            .arg(target)
            .arg(&found)
            .arg(fuzz_dir.join("seeds").join(target))
            .arg("--")
            .arg(format!("-max_total_time={FUZZ_SECONDS}"))
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER");
        run(c)?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Bootstrap => bootstrap::for_tests(),
        Cmd::Run { datapath } => {
            bootstrap::all()?;
            demo::run(&datapath)
        }
        Cmd::Test { filter } => test(filter.as_deref()),
        Cmd::Manifests => manifests::check(&build_binaries()?),
        Cmd::E2e => e2e(None),
        Cmd::Image => image::build().map(drop),
        Cmd::Bench(opts) => bench::run(&opts),
        Cmd::Vm(opts) => vm::main(&opts),
        Cmd::Soak { minutes } => {
            bootstrap::for_tests()?;
            let bins = build_binaries()?;
            let mut c =
                cmd("cargo", &["test", "--package", "spoke-tests", "--test", "soak", "--", "--nocapture"]);
            c.env("SPOKE_SOAK_MINUTES", minutes.to_string())
                .env("SPOKE_SERVER_BIN", bins.join("spoke-server"))
                .env("SPOKE_AGENT_BIN", bins.join("spoke-agent"));
            run(c)
        }
    }
}
