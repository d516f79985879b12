//! Memory cgroups that clean up after themselves: a limit for the processes started under
//! [`Cgroup::entry`], and what they used at their peak. cgroup v2 where the memory controller is
//! there (`memory.max`, `memory.peak`, `memory.events`), v1 otherwise (`memory.limit_in_bytes`,
//! `memory.max_usage_in_bytes`, `memory.oom_control`), as Linux 6.x names them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A memory cgroup with a limit, removed on drop (once its processes are gone).
pub struct Cgroup {
    dir: PathBuf,
    v2: bool,
}

/// The cgroup v2 hierarchy whose controllers include memory, if any: mounted at /sys/fs/cgroup, or
/// beside the v1 ones (hybrid) at /sys/fs/cgroup/unified.
fn v2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"].into_iter().map(PathBuf::from).find(|root| {
        std::fs::read_to_string(root.join("cgroup.subtree_control"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"))
    })
}

fn write(file: &Path, text: &str) {
    std::fs::write(file, text).unwrap_or_else(|e| panic!("write {text:?} to {}: {e}", file.display()));
}

fn read_u64(file: &Path) -> u64 {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
    text.trim().parse().unwrap_or_else(|e| panic!("{}: {text:?}: {e}", file.display()))
}

/// The `key N` line of a flat-keyed cgroup file.
fn keyed(file: &Path, key: &str) -> u64 {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {}: {text}", file.display()))
}

impl Cgroup {
    /// A new memory cgroup limited to `limit` bytes, swap included (v1 has no swap limit unless
    /// enabled; the machines this runs on have no swap).
    #[must_use]
    pub fn new(limit: u64) -> Self {
        let name = format!("spoke-test-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let (dir, v2) = match v2_root() {
            Some(root) => (root.join(&name), true),
            None => (PathBuf::from("/sys/fs/cgroup/memory").join(&name), false),
        };
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("create cgroup {}: {e}", dir.display()));
        let cgroup = Self { dir, v2 };
        if v2 {
            write(&cgroup.dir.join("memory.max"), &limit.to_string());
            write(&cgroup.dir.join("memory.swap.max"), "0");
        } else {
            write(&cgroup.dir.join("memory.limit_in_bytes"), &limit.to_string());
        }
        cgroup
    }

    /// A command prefix that moves the process into this cgroup, then runs its arguments (so the
    /// process starts inside and reads its own limit).
    #[must_use]
    pub fn entry(&self) -> Vec<String> {
        let procs = self.dir.join("cgroup.procs");
        let script = format!("echo $$ > {} && exec \"$@\"", procs.display());
        vec!["sh".into(), "-c".into(), script, "sh".into()]
    }

    /// The most memory the cgroup's processes used at once (bytes).
    #[must_use]
    pub fn peak(&self) -> u64 {
        read_u64(&self.dir.join(if self.v2 { "memory.peak" } else { "memory.max_usage_in_bytes" }))
    }

    /// What they use now (bytes).
    #[must_use]
    pub fn current(&self) -> u64 {
        read_u64(&self.dir.join(if self.v2 { "memory.current" } else { "memory.usage_in_bytes" }))
    }

    /// How many processes the kernel's OOM killer killed in the cgroup.
    #[must_use]
    pub fn oom_kills(&self) -> u64 {
        if self.v2 {
            keyed(&self.dir.join("memory.events"), "oom_kill")
        } else {
            keyed(&self.dir.join("memory.oom_control"), "oom_kill")
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The processes were killed with their handles; they leave the cgroup once reaped.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
