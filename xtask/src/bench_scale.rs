//! The scale scenario of `cargo xtask bench`: one server, many simulated agents, their idle cost and
//! the reconnect storm after the server restarts.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};

use super::{Row, Runner};
use crate::peers::{self, System};

impl Runner<'_> {
    /// The scale scenario: one fresh server, `agents` simulated agents in one process (their default
    /// pool, which an idle server shrinks to two each). Measured: the time for all to connect from
    /// cold, the server's memory, descriptors and CPU per idle agent, dials spread over the agents, and
    /// the reconnect storm after the server is killed and started again on its port.
    pub(super) fn scale(&self, agents: usize) -> anyhow::Result<Vec<Row>> {
        let env = self.env;
        let uds = self.dir.join("spoke-scale.sock");
        // The simulated agents share one source address; real nodes each have their own.
        let flags =
            ["--max-agents", "20000", "--max-handshakes-per-source", "4096", "--idle-pool-timeout", "10s"];
        let (server, agent_addr, admin) = peers::spoke_server(env, &uds, &flags)?;
        let before = ProcSample::of(server.id());
        let started = std::time::Instant::now();
        let sim = Command::new(env.bins.join("spoke-bench"))
            .args(["agents", "--server", &agent_addr.to_string(), "--count", &agents.to_string()])
            .args(["--ca", &env.certs.join("cluster-ca.pem").display().to_string()])
            .args(["--cert", &env.certs.join("agent.pem").display().to_string()])
            .args(["--key", &env.certs.join("agent-key.pem").display().to_string()])
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .spawn()
            .context("start simulated agents")?;
        let mut system = System {
            name: "spoke (TLS tunnel, copy)".into(),
            via: format!("uds:{}", uds.display()),
            extra: Vec::new(),
            procs: vec![("server".into(), server)],
            helpers: vec![sim],
            skip_holds: None,
        };
        let wait = |system: &mut System, metric: &str, at_least: usize| {
            let (procs, helpers) = (&mut system.procs, &mut system.helpers);
            let mut children: Vec<&mut Child> =
                procs.iter_mut().map(|(_, c)| c).chain(helpers.iter_mut()).collect();
            peers::wait_metric(admin, metric, at_least as f64, &mut children)
        };
        wait(&mut system, "spoke_server_agents_connected", agents)?;
        let connected = started.elapsed();
        // Idle: the pools shrink to two each once unused for --idle-pool-timeout.
        let idle_pool = 2 * agents;
        wait(&mut system, "spoke_server_data_conns_idle", idle_pool)?;
        std::thread::sleep(Duration::from_secs(15));
        let idle_from = ProcSample::of(system.procs[0].1.id());
        std::thread::sleep(Duration::from_secs(10));
        let idle = ProcSample::of(system.procs[0].1.id());
        let parked = peers::metric_value(admin, "spoke_server_data_conns_idle");
        let per_agent = |v: f64| v / agents as f64;
        let value = |metric: &str, unit: &str, value: f64| Row {
            system: system.name.clone(),
            scenario: format!("scale_{agents}_agents"),
            metric: metric.into(),
            value,
            unit: unit.into(),
            min: value,
            max: value,
            reps: 1,
        };
        let mut rows = vec![
            value("connect_all", "s", connected.as_secs_f64()),
            value("rss_per_idle_agent", "KiB", per_agent((idle.rss_kib - before.rss_kib) as f64)),
            value("fds_per_idle_agent", "", per_agent(idle.fds as f64)),
            value("parked_per_idle_agent", "", per_agent(parked)),
            value("idle_cpu", "% of a core", 100.0 * (idle.cpu_s - idle_from.cpu_s) / 10.0),
        ];

        let extra = [
            "--scale-agents".to_owned(),
            agents.to_string(),
            "--scale-port".to_owned(),
            env.backend.port().to_string(),
        ];
        let (dials, failed) = self.measure(&system, &["scale"], &extra)?;
        if let Some(why) = failed {
            bail!(why);
        }
        rows.extend(dials.into_iter().map(|r| Row { scenario: format!("scale_{agents}_agents"), ..r }));

        // The reconnect storm: the server killed, and started again where the agents reconnect.
        let old = &mut system.procs[0].1;
        let _ = old.kill();
        let _ = old.wait();
        let bind = agent_addr.to_string();
        let admin_bind = admin.to_string();
        let flags = [&flags[..], &["--agent-bind", &bind, "--admin-bind", &admin_bind]].concat();
        let restarted = std::time::Instant::now();
        let (server, _, _) = peers::spoke_server(env, &uds, &flags)?;
        system.procs[0].1 = server;
        let cpu_from = ProcSample::of(system.procs[0].1.id());
        let mut peak_rss = 0;
        let back = loop {
            peak_rss = peak_rss.max(ProcSample::of(system.procs[0].1.id()).rss_kib);
            if peers::metric_value(admin, "spoke_server_agents_connected") >= (agents * 99 / 100) as f64 {
                break restarted.elapsed();
            }
            if restarted.elapsed() > Duration::from_mins(2) {
                bail!("fewer than 99% of {agents} agents back 120 s after the server restarted");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let storm = ProcSample::of(system.procs[0].1.id());
        rows.extend([
            value("storm_99pct_back", "s", back.as_secs_f64()),
            value("storm_cpu", "% of a core", 100.0 * (storm.cpu_s - cpu_from.cpu_s) / back.as_secs_f64()),
            value("storm_peak_rss", "MiB", peak_rss as f64 / 1024.0),
        ]);
        Ok(rows)
    }
}

/// A process's resident memory, descriptors and CPU time, from /proc.
struct ProcSample {
    rss_kib: u64,
    fds: usize,
    cpu_s: f64,
}

impl ProcSample {
    fn of(pid: u32) -> Self {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th.
        let ticks: u64 = stat.rsplit_once(')').map_or(0, |(_, rest)| {
            rest.split_whitespace().skip(11).take(2).filter_map(|t| t.parse::<u64>().ok()).sum()
        });
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100);
        Self { rss_kib, fds, cpu_s: ticks as f64 / hz as f64 }
    }
}
