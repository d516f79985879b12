//! Process-wide settings a proxy needs.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Raises the open-file limit as far as allowed: both limits to the kernel's `fs.nr_open` when the
/// process may (root), else the soft limit to the hard one. Every relayed stream holds two or three
/// descriptors, so the usual 1024 soft limit would cap a proxy at a few hundred streams. Returns the
/// soft limit in force afterwards.
#[must_use]
pub fn raise_fd_limit() -> u64 {
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return 0 };
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(hard);
    if ceiling > hard && setrlimit(Resource::RLIMIT_NOFILE, ceiling, ceiling).is_ok() {
        return ceiling;
    }
    if hard > soft && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// A multi-threaded tokio runtime with `worker_threads` workers (0: one per CPU).
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if worker_threads > 0 {
        builder.worker_threads(worker_threads);
    }
    builder.enable_all().build()
}

/// Parses a binary's flags. A value clap rejects ends the process with `EX_USAGE`, like every other
/// configuration error, reported in the log format the command line asks for (`--help` and
/// `--version` end it with success).
pub fn parse_args<A: clap::Parser>(name: &str) -> Result<A, std::process::ExitCode> {
    A::try_parse().map_err(|e| {
        if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion) {
            let _ = e.print();
            return std::process::ExitCode::SUCCESS;
        }
        let json =
            crate::telemetry::LogFormat::asked_for(std::env::args()) == crate::telemetry::LogFormat::Json;
        if json {
            crate::telemetry::init_logging(crate::telemetry::LogFormat::Json);
            tracing::error!(error = %e.render().to_string().trim_end(), "{name}: configuration");
        } else {
            let _ = e.print();
        }
        std::process::ExitCode::from(crate::EXIT_CONFIG)
    })
}

/// A binary's configuration, checked by `validate` (the flags, then the files they name, such as TLS
/// material). A failure is printed as `NAME: configuration: ERROR` and ends the process with
/// `EX_USAGE`; with `check_only` (`--check-config`) the configuration is printed on stdout and the
/// process ends with success. Otherwise the configuration comes back to run.
pub fn configure<C: std::fmt::Debug>(
    name: &str,
    check_only: bool,
    validate: impl FnOnce() -> anyhow::Result<C>,
) -> Result<C, std::process::ExitCode> {
    match validate() {
        Err(e) => {
            // With JSON logs the error is one JSON line like every other record; else a plain line.
            if crate::telemetry::json_logs() {
                tracing::error!(error = %format!("{e:#}"), "{name}: configuration");
            } else {
                eprintln!("{name}: configuration: {e:#}");
            }
            Err(std::process::ExitCode::from(crate::EXIT_CONFIG))
        }
        Ok(config) if check_only => {
            println!("{config:#?}");
            Err(std::process::ExitCode::SUCCESS)
        }
        Ok(config) => Ok(config),
    }
}

/// Runs `main` to completion on a runtime of `worker_threads` workers (0: one per CPU), after raising
/// the open-file limit; reports a failure on stderr and in the exit status.
pub fn run_main<F>(name: &str, worker_threads: usize, main: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let fd_limit = raise_fd_limit();
    tracing::debug!(fd_limit, "open-file limit");
    let runtime = match runtime(worker_threads) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: start runtime: {e}");
            return std::process::ExitCode::from(crate::EXIT_FAILURE);
        }
    };
    match runtime.block_on(main) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("{name}: {e:#}");
            std::process::ExitCode::from(crate::EXIT_FAILURE)
        }
    }
}
