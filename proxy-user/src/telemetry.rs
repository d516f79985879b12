//! Logging set-up shared by the binaries, and its `--log-format`.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The format a command line asks for (`--log-format json`, `--log-format=json`, or the
    /// `SPOKE_LOG_FORMAT` environment variable), read without the rest of the flags: for reporting
    /// flags that do not parse.
    #[must_use]
    pub fn asked_for(args: impl IntoIterator<Item = String>) -> Self {
        let args: Vec<String> = args.into_iter().collect();
        let flag = args.iter().enumerate().find_map(|(i, a)| match a.strip_prefix("--log-format") {
            Some("") => args.get(i + 1).cloned(),
            Some(rest) => rest.strip_prefix('=').map(str::to_owned),
            None => None,
        });
        match flag.or_else(|| std::env::var("SPOKE_LOG_FORMAT").ok()).as_deref() {
            Some("json") => Self::Json,
            _ => Self::Plain,
        }
    }
}

/// Lets a repeated log line through at most once per interval and counts the occurrences in between,
/// so that a flood of refusals is reported without flooding the log. Lock-free.
#[derive(Debug)]
pub struct Limiter {
    epoch: std::time::Instant,
    interval_ms: u64,
    /// Milliseconds since `epoch` of the last line let through (0: none yet).
    last_ms: std::sync::atomic::AtomicU64,
    unsaid: std::sync::atomic::AtomicU64,
}

impl Limiter {
    /// A limiter letting one line through per `interval`.
    #[must_use]
    pub fn new(interval: std::time::Duration) -> Self {
        Self {
            epoch: std::time::Instant::now(),
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            last_ms: std::sync::atomic::AtomicU64::new(0),
            unsaid: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Records an occurrence; `Some(n)` when a line is due, `n` occurrences since the last one (this
    /// one included).
    pub fn note(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let unsaid = self.unsaid.fetch_add(1, Relaxed) + 1;
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX).max(1);
        let last = self.last_ms.load(Relaxed);
        if last != 0 && now - last < self.interval_ms {
            return None;
        }
        if self.last_ms.compare_exchange(last, now, Relaxed, Relaxed).is_err() {
            return None;
        }
        self.unsaid.fetch_sub(unsaid, Relaxed);
        Some(unsaid)
    }
}

static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the logs are JSON lines (as [`init_logging`] set them up).
#[must_use]
pub fn json_logs() -> bool {
    JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Installs the global subscriber: `RUST_LOG` filter (default `info`), plain or JSON lines on stderr.
/// Records of the `log` crate (aya, aya-log) are forwarded.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    JSON_LOGS.store(format == LogFormat::Json, std::sync::atomic::Ordering::Relaxed);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_format_is_read_from_raw_arguments() {
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(LogFormat::asked_for(args(&["x", "--log-format", "json", "--bad"])), LogFormat::Json);
        assert_eq!(LogFormat::asked_for(args(&["x", "--log-format=json"])), LogFormat::Json);
        assert_eq!(LogFormat::asked_for(args(&["x", "--log-format", "plain"])), LogFormat::Plain);
    }
}
