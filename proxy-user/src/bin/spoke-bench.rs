//! spoke-bench: see `spoke-bench --help`.

use std::process::ExitCode;

use clap::Parser as _;
use spoke::bench::BenchArgs;

fn main() -> ExitCode {
    let args = BenchArgs::parse();
    spoke::telemetry::init_logging(spoke::config::LogFormat::Plain);
    spoke::process::run_main("spoke-bench", 0, spoke::bench::main(args))
}
