//! Memory budgets: the most a process holds, from its caps and the named bytes each capped thing may
//! hold, checked against its memory limit (given on the command line or read from its cgroup) before
//! it starts. A process whose caps cannot fit its limit refuses to start rather than be killed under
//! load; a stream cap left to its default is the most streams that fit.

use std::fmt;
use std::path::Path;

/// A process's memory limit and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLimit {
    /// Bytes.
    pub bytes: u64,
    /// `--memory-limit`, or the cgroup file it was read from.
    pub source: String,
}

/// cgroup v1 reports "no limit" as the largest page-aligned `i64`; anything this large is no limit.
const UNLIMITED_V1: u64 = 1 << 62;

/// The memory limit of the cgroup this process runs in (cgroup v2's `memory.max`, or v1's
/// `memory.limit_in_bytes`), or `None` where there is none or it cannot be read.
#[must_use]
pub fn cgroup_limit() -> Option<MemoryLimit> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    limit_in(Path::new("/sys/fs/cgroup"), &membership)
}

/// The memory limit for a process with `/proc/self/cgroup` `membership`, cgroups mounted at `root`.
fn limit_in(root: &Path, membership: &str) -> Option<MemoryLimit> {
    let mut found = None;
    for line in membership.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let path = path.trim_start_matches('/');
        let file = if controllers.is_empty() {
            // v2: the unified hierarchy, mounted at the root or beside v1 controllers (hybrid).
            [root.join(path).join("memory.max"), root.join("unified").join(path).join("memory.max")]
                .into_iter()
                .find(|f| f.exists())
        } else if controllers.split(',').any(|c| c == "memory") {
            Some(root.join("memory").join(path).join("memory.limit_in_bytes"))
        } else {
            None
        };
        let Some(file) = file else { continue };
        let Ok(text) = std::fs::read_to_string(&file) else { continue };
        let text = text.trim();
        if text == "max" {
            continue;
        }
        let Ok(bytes) = text.parse::<u64>() else { continue };
        if bytes < UNLIMITED_V1 {
            // Nested limits (v1 and v2 both set): the lowest holds.
            found = match found {
                Some(f @ MemoryLimit { bytes: lower, .. }) if lower <= bytes => Some(f),
                _ => Some(MemoryLimit { bytes, source: file.display().to_string() }),
            };
        }
    }
    found
}

/// One line of a budget: `count` things of `each` bytes at most.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Term {
    /// What is counted, and the cap that bounds it ("streams (--max-streams)").
    pub what: &'static str,
    /// How many at most.
    pub count: u64,
    /// Bytes each holds at most.
    pub each: u64,
}

impl Term {
    fn bytes(&self) -> u64 {
        self.count.saturating_mul(self.each)
    }
}

/// What a process holds at most: a base (the binary, its runtime, caches) plus its terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Bytes held whatever the load.
    pub base: u64,
    /// The capped things.
    pub terms: Vec<Term>,
}

impl Budget {
    /// Bytes held at most.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.terms.iter().fold(self.base, |sum, t| sum.saturating_add(t.bytes()))
    }

    /// The stream cap: `explicit` if the budget with that many streams (`what`) of `per_stream` bytes
    /// fits `limit`, else an error; without it, the most streams that fit, at most `default`.
    pub fn stream_cap(
        &mut self,
        what: &'static str,
        explicit: Option<usize>,
        default: usize,
        per_stream: u64,
        limit: Option<&MemoryLimit>,
    ) -> Result<usize, String> {
        let streams = |count: usize| Term { what, count: count as u64, each: per_stream };
        let Some(limit) = limit else {
            let cap = explicit.unwrap_or(default);
            self.terms.push(streams(cap));
            return Ok(cap);
        };
        let room = limit.bytes.saturating_sub(self.total());
        let fits = usize::try_from(room / per_stream).unwrap_or(usize::MAX);
        let cap = explicit.unwrap_or(fits.min(default));
        self.terms.push(streams(cap.max(1)));
        if cap == 0 || cap > fits {
            return Err(format!(
                "the memory limit ({} from {}) cannot hold {self}: lower the caps or raise the limit \
                 (at most {fits} streams fit; docs/operations.md, \"Memory budget\")",
                Size(limit.bytes),
                limit.source,
            ));
        }
        Ok(cap)
    }
}

impl Budget {
    /// Logs the budget at start, with the limit it was checked against.
    pub fn log(&self, limit: Option<&MemoryLimit>) {
        if let Some(limit) = limit {
            tracing::info!(limit = limit.bytes, source = %limit.source, budget = %self, "memory budget");
        } else {
            tracing::info!(budget = %self, "memory budget (no memory limit)");
        }
    }
}

impl fmt::Display for Budget {
    /// `32 MiB base + 100 streams (--max-streams) × 2 MiB = 232 MiB`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} base", Size(self.base))?;
        for t in &self.terms {
            write!(f, " + {} {} × {}", t.count, t.what, Size(t.each))?;
        }
        write!(f, " = {}", Size(self.total()))
    }
}

/// Bytes in the largest of GiB, MiB and KiB that divides them (KiB rounded up otherwise).
struct Size(u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (unit, name) = match self.0 {
            b if b > 0 && b % (1 << 30) == 0 => (1 << 30, "GiB"),
            b if b > 0 && b % (1 << 20) == 0 => (1 << 20, "MiB"),
            _ => (1 << 10, "KiB"),
        };
        write!(f, "{} {name}", self.0.div_ceil(unit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const STREAMS: &str = "streams (--max-streams)";

    fn limit(bytes: u64) -> MemoryLimit {
        MemoryLimit { bytes, source: "--memory-limit".into() }
    }

    fn budget() -> Budget {
        Budget { base: 32 * MIB, terms: vec![Term { what: "idle connections", count: 64, each: 16 << 10 }] }
    }

    #[test]
    fn without_a_limit_the_cap_is_the_one_given_or_the_default() {
        assert_eq!(budget().stream_cap(STREAMS, None, 4096, 2 * MIB, None), Ok(4096));
        assert_eq!(budget().stream_cap(STREAMS, Some(10), 4096, 2 * MIB, None), Ok(10));
    }

    #[test]
    fn a_default_cap_is_the_most_streams_that_fit() {
        // 256 MiB - 32 MiB - 1 MiB of idle connections leaves room for 111 streams of 2 MiB.
        let mut b = budget();
        assert_eq!(b.stream_cap(STREAMS, None, 4096, 2 * MIB, Some(&limit(256 * MIB))), Ok(111));
        assert!(b.total() <= 256 * MIB);
        assert_eq!(budget().stream_cap(STREAMS, None, 50, 2 * MIB, Some(&limit(256 * MIB))), Ok(50));
    }

    #[test]
    fn caps_that_cannot_fit_the_limit_are_refused_with_the_formula() {
        let e = budget().stream_cap(STREAMS, Some(112), 4096, 2 * MIB, Some(&limit(256 * MIB))).unwrap_err();
        assert!(e.contains("256 MiB from --memory-limit"), "{e}");
        assert!(
            e.contains(
                "32 MiB base + 64 idle connections × 16 KiB + 112 streams (--max-streams) × 2 MiB = 257 MiB"
            ),
            "{e}"
        );
        assert!(e.contains("at most 111 streams fit"), "{e}");
        assert!(
            budget().stream_cap(STREAMS, None, 4096, 2 * MIB, Some(&limit(33 * MIB))).is_err(),
            "not one stream fits"
        );
    }

    fn cgroup_root(files: &[(&str, &str)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let file = root.path().join(path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, text).unwrap();
        }
        root
    }

    #[test]
    fn the_limit_is_read_from_cgroup_v2_and_v1() {
        let v2 = cgroup_root(&[("kubepods/pod1/c1/memory.max", "268435456\n")]);
        let got = limit_in(v2.path(), "0::/kubepods/pod1/c1\n").unwrap();
        assert_eq!(got.bytes, 256 * MIB);
        assert!(got.source.ends_with("kubepods/pod1/c1/memory.max"), "{}", got.source);

        let hybrid = cgroup_root(&[
            ("memory/job/memory.limit_in_bytes", "104857600\n"),
            ("unified/job/memory.max", "max\n"),
        ]);
        let got = limit_in(hybrid.path(), "9:pids:/job\n4:memory:/job\n0::/job\n").unwrap();
        assert_eq!(got.bytes, 100 * MIB);

        let unlimited = cgroup_root(&[
            ("memory/memory.limit_in_bytes", "9223372036854771712\n"),
            ("memory.max", "max\n"),
        ]);
        assert_eq!(limit_in(unlimited.path(), "4:memory:/\n0::/\n"), None);
        assert_eq!(limit_in(unlimited.path(), "garbage"), None);
    }
}
