//! spoke-agent: see `spoke-agent --help`.

use std::process::ExitCode;

use anyhow::Context as _;
use spoke::agent::config::{AgentArgs, AgentConfig, Credential};
use spoke::transport::tls;
use tokio::net::TcpListener;

fn main() -> ExitCode {
    let spoke::process::Parsed::<AgentArgs> { args, settings } =
        match spoke::process::parse_args("spoke-agent") {
            Ok(parsed) => parsed,
            Err(exit) => return exit,
        };
    spoke::telemetry::init_logging(args.log_format);
    let check = args.check_config.then_some(&settings);
    let config = spoke::process::configure("spoke-agent", check, || {
        let config = AgentConfig::try_from(args)?;
        match &config.credential {
            Credential::Cert(files) => drop(tls::client_config(files).context("TLS")?),
            Credential::Token { ca, path } => {
                drop(tls::anonymous_client_config(ca).context("TLS")?);
                std::fs::metadata(path)
                    .with_context(|| format!("--service-account-token-path {}", path.display()))?;
            }
        }
        Ok(config)
    });
    let config = match config {
        Ok(config) => config,
        Err(exit) => return exit,
    };
    spoke::process::run_main("spoke-agent", config.worker_threads, serve(config))
}

async fn serve(config: AgentConfig) -> anyhow::Result<()> {
    let admin = match config.admin_bind {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("bind admin {addr}"))?),
        None => None,
    };
    let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok()).map_or("off".into(), |a| a.to_string());
    println!("spoke-agent started admin={admin_addr}");
    let shutdown = spoke::shutdown::on_signals().context("install signal handlers")?;
    spoke::run_agent(config, admin, shutdown).await?;
    Ok(())
}
