//! What the proxy processes cost, read from /proc: CPU time, resident memory, open descriptors.

use std::time::Duration;

/// Clock ticks per second of `/proc/<pid>/stat` times.
fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().map_or(100.0, |t| t as f64)
}

/// Numeric fields of `/proc/<pid>/stat`, numbered as in proc(5) (index 0 is unused).
fn stat_fields(pid: u32) -> Vec<u64> {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return Vec::new() };
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let Some((_, rest)) = stat.rsplit_once(')') else { return Vec::new() };
    // rest starts at field 3 (the state letter, kept as 0 so that indices match proc(5)).
    [0, 0, 0].into_iter().chain(rest.split_whitespace().map(|v| v.parse().unwrap_or(0))).collect()
}

/// `pid` and every live descendant (a forking proxy such as socat serves each connection in a child).
#[must_use]
pub fn tree(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            if let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok())
                && let Some(&ppid) = stat_fields(child).get(4)
            {
                parent_of.push((child, u32::try_from(ppid).unwrap_or(0)));
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

/// CPU time (user and system) of `pid`, its live descendants, and its descendants that exited.
#[must_use]
pub fn cpu_time(pid: u32) -> Duration {
    let ticks: u64 = tree(pid)
        .into_iter()
        .map(|p| {
            let f = stat_fields(p);
            let at = |i: usize| f.get(i).copied().unwrap_or(0);
            // utime, stime; cutime, cstime (children already waited for) counted once, at the root.
            at(14) + at(15) + if p == pid { at(16) + at(17) } else { 0 }
        })
        .sum();
    Duration::from_secs_f64(ticks as f64 / ticks_per_second())
}

/// Resident set size of `pid` and its live descendants, in bytes.
#[must_use]
pub fn rss_bytes(pid: u32) -> u64 {
    tree(pid).into_iter().map(rss_one).sum()
}

fn rss_one(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Open file descriptors of `pid` and its live descendants.
#[must_use]
pub fn open_fds(pid: u32) -> u64 {
    tree(pid)
        .into_iter()
        .map(|p| std::fs::read_dir(format!("/proc/{p}/fd")).map_or(0, |d| d.count() as u64))
        .sum()
}

/// Busy CPU time of the whole machine so far (every state but idle and iowait), for costs that run
/// outside the proxy processes (kernel workers).
#[must_use]
pub fn machine_busy() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else { return Duration::ZERO };
    let Some(line) = stat.lines().next() else { return Duration::ZERO };
    let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal
    let busy = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum::<u64>();
    Duration::from_secs_f64(busy as f64 / ticks_per_second())
}
