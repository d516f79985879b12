//! spoke-server: see `spoke-server --help`.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context as _;
use spoke::server::Listeners;
use spoke::server::config::{ServerArgs, ServerConfig};
use spoke::transport::accept::SocketFile;
use spoke::transport::tls::{self, ClientCerts, Versions};
use tokio::net::TcpListener;

/// Connections each TCP listener's kernel queue holds before they are accepted.
const LISTEN_BACKLOG: i32 = 1024;

/// Binds a TCP listener with `SO_REUSEPORT`, so that a replacement server can bind the same ports
/// while this one still drains (both accept until this one stops).
fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

fn bind(config: &ServerConfig) -> anyhow::Result<Listeners> {
    let frontend_tcp = match &config.frontend {
        Some(f) => Some(bind_tcp(f.bind).with_context(|| format!("bind frontend {}", f.bind))?),
        None => None,
    };
    let agent =
        bind_tcp(config.agent_bind).with_context(|| format!("bind agent listener {}", config.agent_bind))?;
    let admin = match config.admin_bind {
        Some(addr) => Some(bind_tcp(addr).with_context(|| format!("bind admin {addr}"))?),
        None => None,
    };
    // Bound under a name of its own, mode 0600; the server renames it over the path once it accepts
    // (a predecessor's socket there serves until then), so the path never lacks a listener.
    let uds = match &config.uds_name {
        Some(path) => {
            Some(SocketFile::bind(path, 0o600).with_context(|| format!("bind {}", path.display()))?)
        }
        None => None,
    };
    Ok(Listeners { uds, frontend_tcp, agent, admin })
}

/// Checks that every TLS file loads, so that `--check-config` and start-up catch bad certificates.
fn check_tls(config: &ServerConfig) -> anyhow::Result<()> {
    tls::server_config(&config.agent_tls, Versions::Tls13, config.agent_client_certs())
        .context("agent listener TLS")?;
    if let Some(frontend) = &config.frontend {
        tls::server_config(&frontend.tls, Versions::Tls12And13, ClientCerts::Required)
            .context("frontend TLS")?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let spoke::process::Parsed::<ServerArgs> { args, settings } =
        match spoke::process::parse_args("spoke-server") {
            Ok(parsed) => parsed,
            Err(exit) => return exit,
        };
    spoke::telemetry::init_logging(args.log_format);
    let check = args.check_config.then_some(&settings);
    let config = spoke::process::configure("spoke-server", check, || {
        let config = ServerConfig::try_from(args)?;
        check_tls(&config)?;
        Ok(config)
    });
    let config = match config {
        Ok(config) => config,
        Err(exit) => return exit,
    };
    spoke::process::run_main("spoke-server", config.worker_threads, serve(config))
}

async fn serve(config: ServerConfig) -> anyhow::Result<()> {
    if let Some(access) = &config.apiserver {
        access.check(&config.apiserver_uses()).map_err(anyhow::Error::msg)?;
    }
    let listeners = bind(&config)?;
    let addr = |l: &Option<TcpListener>| {
        l.as_ref().and_then(|l| l.local_addr().ok()).map_or("off".into(), |a| a.to_string())
    };
    // One line on stdout with every bound address once they accept, for scripts and tests (ports may
    // have been 0).
    let line = format!(
        "spoke-server started agent={} frontend={} admin={} uds={}",
        listeners.agent.local_addr().context("agent listener address")?,
        addr(&listeners.frontend_tcp),
        addr(&listeners.admin),
        config.uds_name.as_ref().map_or("off".into(), |p| p.display().to_string()),
    );
    let shutdown = spoke::shutdown::on_signals().context("install signal handlers")?;
    spoke::run_server(listeners, config, shutdown, || println!("{line}")).await?;
    Ok(())
}
