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

/// A binary's flags as parsed, and the effective setting of each (for `--check-config`).
pub struct Parsed<A> {
    /// The typed flags.
    pub args: A,
    /// Every flag's effective value and where it came from.
    pub settings: Settings,
}

/// Where a setting's value came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// The command line.
    CommandLine,
    /// The flag's environment variable.
    Env,
    /// The flag's default.
    Default,
}

/// One flag's effective setting.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Setting {
    /// The values as given (one for most flags; a list for repeated or comma-separated ones).
    pub values: Vec<String>,
    /// Where they came from.
    pub source: Source,
    /// The environment variable that sets the flag, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
}

/// Every flag a binary was given or defaulted, keyed by its long name (`--servers`): what
/// `--check-config` prints, in a format that stays stable as the code changes (version 1):
/// `{"format":1,"binary":NAME,"version":VERSION,"settings":{"--flag":{"values":[..],"source":"command-line"|"env"|"default","env":VAR}}}`,
/// with the flags in lexical order. Flags without a value and without a default are left out.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Settings(pub std::collections::BTreeMap<String, Setting>);

impl Settings {
    fn from_matches(command: &clap::Command, matches: &clap::ArgMatches) -> Self {
        let mut settings = std::collections::BTreeMap::new();
        for arg in command.get_arguments() {
            let (Some(long), id) = (arg.get_long(), arg.get_id().as_str()) else { continue };
            if long == "help" || long == "version" {
                continue;
            }
            let source = match matches.value_source(id) {
                Some(clap::parser::ValueSource::CommandLine) => Source::CommandLine,
                Some(clap::parser::ValueSource::EnvVariable) => Source::Env,
                Some(clap::parser::ValueSource::DefaultValue) => Source::Default,
                _ => continue,
            };
            let values = matches
                .get_raw(id)
                .map(|raw| raw.map(|v| v.to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            settings.insert(format!("--{long}"), Setting { values, source, env });
        }
        Self(settings)
    }

    /// The `--check-config` document for `binary`.
    #[must_use]
    pub fn report(&self, binary: &str) -> serde_json::Value {
        serde_json::json!({
            "format": 1,
            "binary": binary,
            "version": env!("CARGO_PKG_VERSION"),
            "settings": self,
        })
    }
}

/// Parses a binary's flags. A value clap rejects ends the process with `EX_USAGE`, like every other
/// configuration error, reported in the log format the command line asks for (`--help` and
/// `--version` end it with success).
pub fn parse_args<A: clap::Parser>(name: &str) -> Result<Parsed<A>, std::process::ExitCode> {
    let command = A::command();
    let parsed = command.clone().try_get_matches().and_then(|matches| {
        let args = A::from_arg_matches(&matches)?;
        Ok(Parsed { args, settings: Settings::from_matches(&command, &matches) })
    });
    parsed.map_err(|e| {
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
/// `EX_USAGE`; with `check` (`--check-config`) the effective settings are printed on stdout as one
/// JSON document (see [`Settings`]) and the process ends with success. Otherwise the configuration
/// comes back to run.
pub fn configure<C>(
    name: &str,
    check: Option<&Settings>,
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
        Ok(config) => match check {
            Some(settings) => {
                println!("{}", settings.report(name));
                Err(std::process::ExitCode::SUCCESS)
            }
            None => Ok(config),
        },
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
