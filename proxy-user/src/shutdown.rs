//! Signals → cancellation: the first SIGTERM or SIGINT starts a graceful shutdown, a second one ends the
//! process at once.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Spawns the signal watcher; returns the root token it cancels.
pub fn on_signals() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down gracefully"),
            _ = int.recv() => info!("SIGINT: shutting down gracefully"),
        }
        cancel.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        error!("second signal: exiting now");
        std::process::exit(1);
    });
    Ok(token)
}
