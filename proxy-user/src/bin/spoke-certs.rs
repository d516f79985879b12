//! spoke-certs: writes development certificates (two private CAs and every leaf a local Spoke needs).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Writes development certificates for a local or test Spoke. Not for production clusters.
#[derive(Debug, Parser)]
#[command(name = "spoke-certs", version, about)]
struct Args {
    /// Directory to write the PEM files into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Extra names or addresses the server certificates are valid for (besides `localhost`, `127.0.0.1`, `::1`).
    #[arg(long = "server-name")]
    server_names: Vec<String>,
    /// Also a node certificate as kubelets hold (`CN=system:node:NAME, O=system:nodes`), for
    /// `spoke-server --agent-auth node-cert` (repeatable).
    #[arg(long = "node")]
    nodes: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match spoke::devcerts::generate(&args.out, &args.server_names, &args.nodes) {
        Ok(certs) => {
            println!("{certs:#?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("spoke-certs: {e}");
            ExitCode::FAILURE
        }
    }
}
