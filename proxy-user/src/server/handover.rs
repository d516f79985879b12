//! Handing over to a successor process without refusing a request (a surge replacement: the new
//! process starts while this one still runs). The Unix socket is bound under a name of its own and
//! renamed over its path once the server accepts, so the path always names a listening socket. Each
//! server watches its path: once a successor's socket replaced its own there, it is superseded. It
//! then stops accepting agents and TCP frontend connections (the successor, bound to the same ports
//! with `SO_REUSEPORT`, takes them all), tells its agents to move (`Moving`), and serves what it has
//! with the sessions it holds, which agents keep until its drain ends with `GoAway`.

use std::io;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::transport::accept::SocketFile;

/// How often a server looks whether a successor replaced its socket.
pub const SUCCESSOR_CHECK: Duration = Duration::from_millis(50);

/// Renames the socket over its path, then watches the path until `stop`: once it names another
/// socket (a successor's), cancels `superseded`.
pub(super) fn publish_and_watch(
    file: &SocketFile,
    superseded: CancellationToken,
    stop: CancellationToken,
) -> io::Result<()> {
    file.publish()?;
    let file = file.clone();
    tokio::spawn(async move {
        let mut check = tokio::time::interval(SUCCESSOR_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = check.tick() => {}
            }
            if !file.is_own() {
                info!(
                    path = %file.path().display(),
                    "a successor took the socket: agents told to move to it, no new agent or TCP frontend connections"
                );
                superseded.cancel();
                return;
            }
        }
    });
    Ok(())
}

/// A token cancelled once either `a` or `b` is.
pub(super) fn either(a: &CancellationToken, b: &CancellationToken) -> CancellationToken {
    let both = CancellationToken::new();
    let (a, b, done) = (a.clone(), b.clone(), both.clone());
    tokio::spawn(async move {
        tokio::select! {
            () = a.cancelled() => {}
            () = b.cancelled() => {}
            () = done.cancelled() => {}
        }
        done.cancel();
    });
    both
}
