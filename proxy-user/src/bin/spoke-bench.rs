//! spoke-bench: see `spoke-bench --help`.

use std::process::ExitCode;

use clap::Parser as _;
use spoke::bench::BenchArgs;

fn main() -> ExitCode {
    let args = BenchArgs::parse();
    spoke::telemetry::init_logging(spoke::config::LogFormat::Plain);
    let fd_limit = spoke::process::raise_fd_limit();
    tracing::debug!(fd_limit, "open-file limit");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("spoke-bench: start runtime: {e}");
            return ExitCode::from(spoke::EXIT_FAILURE);
        }
    };
    match runtime.block_on(spoke::bench::main(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spoke-bench: {e:#}");
            ExitCode::from(spoke::EXIT_FAILURE)
        }
    }
}
