//! `cargo xtask bench`: every system under test, every scenario, one run; a markdown table with ratios
//! against direct TCP, an SVG chart and a JSON file under `results/<time>/`.
#![expect(clippy::cast_precision_loss, reason = "counts and sizes stay far below 2^52")]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::peers::{self, Env, System};

#[path = "bench_scale.rs"]
mod scale;

/// A result row, as spoke-bench writes it.
#[derive(Clone, Debug, Deserialize, Serialize)]
struct Row {
    system: String,
    scenario: String,
    metric: String,
    value: f64,
    unit: String,
    min: f64,
    max: f64,
    reps: usize,
}

/// Options of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct BenchOpts {
    /// Every scenario at small sizes, once (what CI runs so the benchmark never rots).
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Only these systems: names as in the table, matched by prefix, separated by commas not followed by
    /// a space (names themselves hold ", "), or by repeating the option.
    #[arg(long)]
    systems: Vec<String>,
    /// Repetitions of each scenario (default 3; 1 with --quick).
    #[arg(long)]
    reps: Option<usize>,
    /// Agents of the scale scenario (default 1000; 50 with --quick; 10 in a VM).
    #[arg(long)]
    agents: Option<usize>,
    /// Run inside this Debian kernel (6.1, 6.12: they have kernel TLS) under qemu software emulation
    /// (`cargo xtask vm`): Spoke's TLS tiers and plaintext splice against direct TCP. Emulation is
    /// many times slower than hardware, so only ratios within one run mean anything. Results under
    /// results/<time>-vm-<kernel>/.
    #[arg(long, value_name = "KERNEL")]
    vm: Option<String>,
    /// Inside a guest: the binaries, already built (nothing is built or installed).
    #[arg(long, hide = true)]
    bins: Option<PathBuf>,
    /// Inside a guest: where results go.
    #[arg(long, hide = true)]
    out: Option<PathBuf>,
}

/// The systems `--vm` measures: what the kernel tiers are compared with.
const VM_SYSTEMS: &str =
    "direct,spoke (TLS tunnel, copy),spoke (TLS tunnel, kTLS),spoke (plaintext tunnel, splice)";
/// Lines around the results a guest prints, for the host to take them from its console.
const RESULTS_BEGIN: &str = "@@SPOKE_BENCH_RESULTS@@";
const RESULTS_END: &str = "@@SPOKE_BENCH_RESULTS_END@@";

type Start = fn(&Env) -> anyhow::Result<System>;

/// Splits a `--systems` value at the commas not followed by a space: `direct,spoke (plaintext tunnel,
/// sockmap)` names two systems.
fn system_prefixes(value: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    for (i, _) in value.match_indices(',') {
        if !value[i + 1..].starts_with(' ') {
            parts.push(&value[start..i]);
            start = i + 1;
        }
    }
    parts.push(&value[start..]);
    parts.into_iter().filter(|p| !p.is_empty()).collect()
}

const SYSTEMS: &[(&str, Start)] = &[
    ("direct", peers::direct),
    ("spoke (TLS tunnel, copy)", peers::spoke),
    ("spoke (gRPC frontend)", peers::spoke_grpc),
    ("spoke (TLS tunnel, kTLS)", peers::spoke_ktls),
    ("spoke (plaintext tunnel, splice)", peers::spoke_plain_splice),
    ("spoke (plaintext tunnel, copy)", peers::spoke_plain_copy),
    ("spoke (plaintext tunnel, sockmap)", peers::spoke_plain_sockmap),
    ("haproxy (tcp mode)", peers::haproxy),
    ("socat", peers::socat),
    ("stunnel pair (TLS 1.3)", peers::stunnel),
    ("ssh -L (aes128-gcm)", peers::ssh),
    ("rathole (tcp)", peers::rathole),
];

fn output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn machine() -> BTreeMap<&'static str, String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem =
        meminfo.lines().next().unwrap_or_default().split_whitespace().nth(1).unwrap_or_default().to_owned();
    BTreeMap::from([
        ("date", output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])),
        ("kernel", output("uname", &["-r"])),
        ("cpus", output("nproc", &[])),
        ("cpu_model", model.unwrap_or_default()),
        ("memory_kib", mem),
        (
            "commit",
            output("git", &["-C", &crate::root().display().to_string(), "rev-parse", "--short", "HEAD"]),
        ),
    ])
}

/// Starts the benchmark backend; returns it and its address.
fn backend(bins: &Path) -> anyhow::Result<(Child, std::net::SocketAddr)> {
    let mut child = Command::new(bins.join("spoke-bench"))
        .args(["backend", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start spoke-bench backend")?;
    let pairs = crate::started(&mut child, Duration::from_secs(30)).context("spoke-bench backend")?;
    Ok((child, crate::value(&pairs, "addr")?.parse()?))
}

struct Runner<'a> {
    env: &'a Env,
    quick: bool,
    reps: usize,
    dir: PathBuf,
}

impl Runner<'_> {
    /// Runs spoke-bench against `system`; returns its rows.
    /// Rows measured, and the failure of spoke-bench if it failed (after writing what it measured).
    fn measure(
        &self,
        system: &System,
        scenarios: &[&str],
        extra: &[String],
    ) -> anyhow::Result<(Vec<Row>, Option<String>)> {
        let slug: String =
            system.name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
        let out = self.dir.join(format!("{slug}-{}.json", scenarios.join("-")));
        let mut c = Command::new(self.env.bins.join("spoke-bench"));
        c.args([
            "run",
            "--system",
            &system.name,
            "--target",
            &self.env.backend.to_string(),
            "--via",
            &system.via,
        ]);
        c.args(["--reps", &self.reps.to_string(), "--json", &out.display().to_string()]);
        if self.quick {
            c.arg("--quick");
        }
        if !scenarios.is_empty() {
            c.arg("--scenarios").arg(scenarios.join(","));
        }
        for (role, child) in &system.procs {
            c.arg("--proxy-pid").arg(format!("{role}={}", child.id()));
        }
        c.args(&system.extra).args(extra);
        // A failed scenario still leaves the others' rows in the file.
        let status = crate::run(c);
        let text = std::fs::read_to_string(&out).with_context(|| format!("read {}", out.display()));
        let rows = match (text, &status) {
            (Ok(text), _) => serde_json::from_str(&text)?,
            (Err(e), Ok(())) => return Err(e),
            (Err(_), Err(_)) => Vec::new(),
        };
        Ok((rows, status.err().map(|e| format!("{e:#}"))))
    }

    /// Every wanted system in turn, with the hold sizes it can take.
    fn systems(
        &self,
        wanted: &dyn Fn(&str) -> bool,
        full_holds: &[usize],
        unavailable: &mut Vec<(String, String)>,
    ) -> Vec<Row> {
        let mut rows = Vec::new();
        for (name, start) in SYSTEMS.iter().filter(|(n, _)| wanted(n)) {
            if unavailable.iter().any(|(n, _)| n == name) {
                continue;
            }
            eprintln!("[bench] starting {name}");
            let system = match start(self.env) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("[bench] {name} unavailable: {e:#}");
                    unavailable.push(((*name).to_owned(), format!("{e:#}")));
                    continue;
                }
            };
            let holds: Vec<String> = full_holds
                .iter()
                .filter(|n| system.skip_holds.is_none_or(|(max, _)| **n <= max))
                .map(ToString::to_string)
                .collect();
            if let Some((max, why)) = system.skip_holds
                && full_holds.iter().any(|n| *n > max)
            {
                unavailable.push((format!("{name}: hold above {max}"), why.to_owned()));
            }
            let extra = ["--holds".to_owned(), holds.join(",")];
            match self.measure(&system, &[], &extra) {
                Ok((r, failed)) => {
                    rows.extend(r);
                    if let Some(why) = failed {
                        unavailable.push(((*name).to_owned(), why));
                    }
                }
                Err(e) => unavailable.push(((*name).to_owned(), format!("{e:#}"))),
            }
        }
        rows
    }
}

/// Raises this process's open-file limits (inherited by every system under test): holding thousands of
/// tunnels takes two or three descriptors each in a proxy. Returns the limit in force.
fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let ceiling: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    if setrlimit(Resource::RLIMIT_NOFILE, ceiling, ceiling).is_ok() {
        return ceiling;
    }
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    hard
}

/// Largest hold that fits `fd_limit` in a proxy holding two sockets per tunnel (plus its own).
fn max_hold(fd_limit: u64) -> usize {
    usize::try_from(fd_limit.saturating_sub(500) / 2).unwrap_or(usize::MAX)
}

pub fn run(opts: &BenchOpts) -> anyhow::Result<()> {
    if let Some(kernel) = &opts.vm {
        return in_vm(opts, kernel);
    }
    let in_guest = opts.bins.is_some();
    if !in_guest {
        crate::bootstrap::all()?;
    }
    let fd_limit = raise_fd_limit();
    let mut unavailable: Vec<(String, String)> = if in_guest {
        Vec::new()
    } else {
        peers::install().into_iter().map(|(name, why)| (name.to_owned(), why)).collect()
    };
    let bins = if let Some(bins) = &opts.bins {
        bins.clone()
    } else if opts.quick {
        crate::build_binaries()?
    } else {
        let mut c = crate::cmd("cargo", &["build", "--release", "--bins"]);
        c.args(crate::BIN_PACKAGES);
        crate::run(c)?;
        crate::target_dir().join("release")
    };
    let stamp = output("date", &["-u", "+%Y%m%dT%H%M%SZ"]);
    let dir = opts.out.clone().unwrap_or_else(|| {
        crate::root().join("results").join(if opts.quick { format!("{stamp}-quick") } else { stamp })
    });
    let certs = dir.join("certs");
    std::fs::create_dir_all(&dir)?;
    crate::run({
        let mut c = Command::new(bins.join("spoke-certs"));
        c.arg("--out").arg(&certs).stdout(Stdio::null());
        c
    })?;
    let (mut backend_child, backend) = backend(&bins)?;
    let env = Env { bins, dir: dir.clone(), certs, backend };
    let runner = Runner {
        env: &env,
        quick: opts.quick,
        reps: opts.reps.unwrap_or(if opts.quick { 1 } else { 3 }),
        dir: dir.clone(),
    };
    let mut full_holds = if opts.quick { vec![100] } else { vec![1000, 10_000] };
    let fits = max_hold(fd_limit);
    if full_holds.iter().any(|n| *n > fits) {
        let why = format!(
            "the open-file limit here is {fd_limit} and cannot be raised, so a proxy with two sockets per tunnel \
             holds at most {fits}; held {fits} instead"
        );
        eprintln!("[bench] {why}");
        full_holds = full_holds.into_iter().map(|n| n.min(fits)).collect();
        full_holds.dedup();
        unavailable.push(("hold 10000".into(), why));
    }

    let prefixes: Vec<&str> = opts.systems.iter().flat_map(|v| system_prefixes(v)).collect();
    let wanted = |name: &str| prefixes.is_empty() || prefixes.iter().any(|p| name.starts_with(p));
    let mut rows = runner.systems(&wanted, &full_holds, &mut unavailable);
    if SYSTEMS.iter().any(|(n, _)| n.starts_with("spoke") && wanted(n)) {
        let agents = opts.agents.unwrap_or(if opts.quick { 50 } else { 1000 });
        eprintln!("[bench] scale: {agents} simulated agents");
        match runner.scale(agents) {
            Ok(r) => rows.extend(r),
            Err(e) => unavailable.push((format!("scale ({agents} agents)"), format!("{e:#}"))),
        }
    }
    let _ = backend_child.kill();
    let _ = backend_child.wait();

    let machine = machine();
    let report = Report {
        machine: &machine,
        rows: &rows,
        unavailable: &unavailable,
        quick: opts.quick,
        kernel_tls_expected: in_guest,
    };
    let markdown = report.markdown();
    std::fs::write(dir.join("results.md"), &markdown)?;
    std::fs::write(dir.join("throughput.svg"), report.svg())?;
    let json = serde_json::to_string_pretty(
        &serde_json::json!({ "machine": machine, "results": rows, "unavailable": unavailable }),
    )?;
    std::fs::write(dir.join("results.json"), &json)?;
    if let Some(path) = &opts.json {
        std::fs::write(path, &json).with_context(|| format!("write {}", path.display()))?;
    }
    if in_guest {
        println!("{RESULTS_BEGIN}\n{markdown}\n{RESULTS_END}");
    } else {
        println!("{markdown}");
    }
    eprintln!("[bench] results in {}", dir.display());
    report.check_complete()
}

/// `--vm`: builds the binaries here, then runs this benchmark inside the guest on them and keeps the
/// table it prints.
fn in_vm(opts: &BenchOpts, kernel: &str) -> anyhow::Result<()> {
    let (profile, bins) = if opts.quick {
        ("dev", crate::build_binaries()?)
    } else {
        let mut c = crate::cmd("cargo", &["build", "--release", "--bins"]);
        c.args(crate::BIN_PACKAGES);
        crate::run(c)?;
        ("release", crate::target_dir().join("release"))
    };
    let guest = crate::vm::prepare(kernel, true)?;
    let xtask = std::env::current_exe()?.display().to_string();
    let mut command = vec![xtask, "bench".into(), "--bins".into(), bins.display().to_string()];
    command.extend(["--out".into(), "/tmp/bench".into(), "--agents".into()]);
    command.push(opts.agents.unwrap_or(10).to_string());
    let systems = if opts.systems.is_empty() { VM_SYSTEMS.to_owned() } else { opts.systems.join(",") };
    command.extend(["--systems".into(), systems]);
    if opts.quick {
        command.push("--quick".into());
    }
    if let Some(reps) = opts.reps {
        command.extend(["--reps".into(), reps.to_string()]);
    }
    eprintln!("[bench] in {} under emulation, {profile} binaries", guest.release);
    let (code, console) = guest.run(&crate::root(), &command, &[], crate::vm::TIMEOUT * 3)?;
    let start = console.iter().position(|l| l == RESULTS_BEGIN);
    let end = console.iter().position(|l| l == RESULTS_END);
    let (Some(start), Some(end)) = (start, end) else { bail!("the guest printed no results (exit {code})") };
    let stamp = output("date", &["-u", "+%Y%m%dT%H%M%SZ"]);
    let dir = crate::root().join("results").join(format!("{stamp}-vm-{}", guest.release));
    std::fs::create_dir_all(&dir)?;
    let note = format!(
        "Measured inside Linux {} under qemu software emulation (TCG, 2 vCPUs), {profile} binaries: \
         only ratios within this table mean anything.\n\n",
        guest.release
    );
    std::fs::write(dir.join("results.md"), note + &console[start + 1..end].join("\n"))?;
    eprintln!("[bench] results in {}", dir.display());
    anyhow::ensure!(code == 0, "the benchmark in the guest failed (exit {code})");
    Ok(())
}

struct Report<'a> {
    machine: &'a BTreeMap<&'static str, String>,
    rows: &'a [Row],
    unavailable: &'a [(String, String)],
    quick: bool,
    /// Inside a `--vm` guest, whose kernel has kernel TLS: the kernel TLS system must run. Elsewhere a
    /// kernel without it leaves that system out, which is no failure.
    kernel_tls_expected: bool,
}

/// Formats a number with about three significant digits.
fn num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

impl Report<'_> {
    fn systems(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for r in self.rows {
            if !out.contains(&r.system.as_str()) {
                out.push(&r.system);
            }
        }
        out
    }

    fn find(&self, system: &str, scenario: &str, metric: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.system == system && r.scenario == scenario && r.metric == metric)
    }

    fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Spoke benchmark{}\n",
            if self.quick { " (quick: small sizes, one repetition)" } else { "" }
        );
        let _ = writeln!(
            s,
            "Machine: {}\n",
            self.machine.iter().map(|(k, v)| format!("{k} `{v}`")).collect::<Vec<_>>().join(", ")
        );
        let _ = writeln!(
            s,
            "Each cell: median of the repetitions, ×ratio to direct TCP in the same run, (min–max). \
             CPU-s/GiB: `proxy_cpu` is the proxy processes' own CPU, `machine_cpu` the whole machine's busy time \
             (load generator and backend included).\n"
        );
        let systems = self.systems();
        let _ = writeln!(s, "| scenario | metric | {} |", systems.join(" | "));
        let _ = writeln!(s, "|---|---|{}", "---|".repeat(systems.len()));
        let mut keys: Vec<(&str, &str, &str)> = Vec::new();
        for r in self.rows {
            let key = (r.scenario.as_str(), r.metric.as_str(), r.unit.as_str());
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        for (scenario, metric, unit) in keys {
            let direct = self.find("direct", scenario, metric).map(|r| r.value);
            let cells: Vec<String> = systems
                .iter()
                .map(|sys| match self.find(sys, scenario, metric) {
                    None => "–".into(),
                    Some(r) => {
                        let ratio = match direct {
                            Some(d) if d > 0.0 && *sys != "direct" => format!(" ×{}", num(r.value / d)),
                            _ => String::new(),
                        };
                        let spread = if r.reps > 1 {
                            format!(" ({}–{})", num(r.min), num(r.max))
                        } else {
                            String::new()
                        };
                        format!("{}{ratio}{spread}", num(r.value))
                    }
                })
                .collect();
            let _ = writeln!(s, "| {scenario} | {metric} ({unit}) | {} |", cells.join(" | "));
        }
        if !self.unavailable.is_empty() {
            let _ = writeln!(s, "\nNot measured:\n");
            for (name, why) in self.unavailable {
                let _ = writeln!(s, "- {name}: {}", why.lines().next().unwrap_or_default());
            }
        }
        s
    }

    /// Horizontal bars: single-stream and parallel throughput per system.
    fn svg(&self) -> String {
        let systems = self.systems();
        let scenarios = ["bulk_up", "bulk_down", "bulk_parallel"];
        let colors = ["#4e79a7", "#f28e2b", "#59a14f"];
        let max = self.rows.iter().filter(|r| r.metric == "throughput").map(|r| r.value).fold(1.0, f64::max);
        let (label_w, bar_w, row_h) = (230.0, 560.0, 16.0);
        let height = 40.0 + systems.len() as f64 * (row_h * 3.0 + 12.0);
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <text x=\"10\" y=\"20\" font-size=\"14\">Throughput, MB/s (blue: 1 stream up, orange: 1 stream down, green: 16 streams down)</text>\n",
            label_w + bar_w + 90.0
        );
        let mut y = 36.0;
        for sys in &systems {
            let _ = writeln!(s, "<text x=\"10\" y=\"{}\">{}</text>", y + row_h * 1.5 + 4.0, xml(sys));
            for (scenario, color) in scenarios.iter().zip(colors) {
                if let Some(r) = self.find(sys, scenario, "throughput") {
                    let w = r.value / max * bar_w;
                    let _ = writeln!(
                        s,
                        "<rect x=\"{label_w}\" y=\"{y}\" width=\"{w:.1}\" height=\"{}\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{}\">{}</text>",
                        row_h - 2.0,
                        label_w + w + 4.0,
                        y + row_h - 4.0,
                        num(r.value)
                    );
                }
                y += row_h;
            }
            y += 12.0;
        }
        s.push_str("</svg>\n");
        s
    }

    /// Every available system produced numbers for every scenario it ran.
    fn check_complete(&self) -> anyhow::Result<()> {
        let expected = [
            "bulk_up",
            "bulk_down",
            "bulk_parallel",
            "round_trip",
            "open_sequential",
            "open_parallel",
            "head_of_line",
        ];
        let mut gaps = Vec::new();
        for sys in self.systems() {
            // The scale scenario runs its own Spoke server and files its rows under the TLS system,
            // also when `--systems` left that system out: such a system is not expected to have more.
            if self.rows.iter().filter(|r| r.system == sys).all(|r| r.scenario.starts_with("scale_")) {
                continue;
            }
            for sc in expected {
                if !self.rows.iter().any(|r| r.system == sys && r.scenario == sc && r.value.is_finite()) {
                    gaps.push(format!("{sys}: {sc}"));
                }
            }
            if !self.rows.iter().any(|r| r.system == sys && r.scenario.starts_with("hold_")) {
                gaps.push(format!("{sys}: hold"));
            }
        }
        if !self.rows.iter().any(|r| r.scenario.starts_with("scale_"))
            && self.systems().iter().any(|s| s.starts_with("spoke"))
        {
            gaps.push("spoke: scale".into());
        }
        let failed: Vec<&(String, String)> = self
            .unavailable
            .iter()
            .filter(|(n, _)| n.starts_with("spoke") || n.starts_with("scale") || n == "direct")
            .filter(|(_, why)| self.kernel_tls_expected || !why.starts_with(peers::NO_KERNEL_TLS))
            .collect();
        if !gaps.is_empty() || !failed.is_empty() {
            bail!("the benchmark is incomplete: missing {gaps:?}; failed {failed:?}");
        }
        Ok(())
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::system_prefixes;

    #[test]
    fn system_names_keep_their_own_commas() {
        assert_eq!(
            system_prefixes("direct,spoke (plaintext tunnel, sockmap"),
            ["direct", "spoke (plaintext tunnel, sockmap"]
        );
        assert_eq!(system_prefixes("socat"), ["socat"]);
        assert_eq!(system_prefixes("a,,b,"), ["a", "b"]);
    }
}
