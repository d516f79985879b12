//! How a stream's bytes move between its two sockets.
//!
//! Tiers: `sockmap` (eBPF redirect, kernel to kernel, no syscall per chunk), `splice` (splice(2)
//! through a pipe, kernel to kernel) and `copy` (user space). A TLS tunnel is encrypted in user space,
//! so its streams take the copy tier; plaintext tunnels (`--tunnel-tls off`) may take splice or
//! sockmap. A stream that cannot be inserted into the sockmap (a socket already received FIN, a map is
//! full) is copied instead, and the fallback is counted by reason.

pub mod copy;
pub mod sockmap;
pub mod splice;
mod tcp;

use std::future::Future;

use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::config::DatapathMode;
use crate::metrics::{AgentMetrics, add, inc};
use crate::transport::{Stream, Tunnel};
use sockmap::stream::Limits;
use sockmap::{PinDir, Sockmap, SockmapError};

/// Runs a stream's two directions, `up` (A → B) and `down` (B → A), each ending with its byte count or
/// a failure whose end is named from `up`'s point of view (`End::A` its source), until both have ended
/// or one fails. A failure comes back with the counts of the directions that had finished.
pub(crate) async fn both_directions<U, D>(
    up: U,
    down: D,
) -> Result<copy::Moved, ((copy::End, std::io::Error), Option<u64>, Option<u64>)>
where
    U: Future<Output = Result<u64, (copy::End, std::io::Error)>>,
    D: Future<Output = Result<u64, (copy::End, std::io::Error)>>,
{
    use copy::End;
    let flip = |(end, e): (End, std::io::Error)| (if end == End::A { End::B } else { End::A }, e);
    let down = async { down.await.map_err(flip) };
    tokio::pin!(up, down);
    let (mut a_to_b, mut b_to_a) = (None, None);
    let failure = loop {
        tokio::select! {
            r = &mut up, if a_to_b.is_none() => match r {
                Ok(n) => a_to_b = Some(n),
                Err(e) => break e,
            },
            r = &mut down, if b_to_a.is_none() => match r {
                Ok(n) => b_to_a = Some(n),
                Err(e) => break e,
            },
        }
        if let (Some(a_to_b), Some(b_to_a)) = (a_to_b, b_to_a) {
            return Ok(copy::Moved { a_to_b, b_to_a });
        }
    };
    Err((failure, a_to_b, b_to_a))
}

/// The datapath tier chosen for a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// Userspace copy.
    Copy,
    /// splice(2) through a pipe.
    Splice,
    /// eBPF sockmap redirect.
    Sockmap,
}

impl Tier {
    /// Metric label.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Copy => "copy",
            Self::Splice => "splice",
            Self::Sockmap => "sockmap",
        }
    }
}

/// The agent's datapath: picks a tier per stream and moves its bytes.
#[derive(Debug)]
pub struct Datapath {
    mode: DatapathMode,
    sockmap: Option<Sockmap>,
    limits: Limits,
}

impl Datapath {
    /// A datapath working in `mode`; `copy`, `splice` and `auto` need nothing set up.
    #[must_use]
    pub fn new(mode: DatapathMode) -> Self {
        Self { mode, sockmap: None, limits: Limits::default() }
    }

    /// The sockmap datapath: loads and attaches the eBPF programs, pinned in `pins`.
    pub fn with_sockmap(pins: Option<PinDir>, limits: Limits) -> Result<Self, SockmapError> {
        Ok(Self { mode: DatapathMode::Sockmap, sockmap: Some(Sockmap::load(pins)?), limits })
    }

    /// The loaded sockmap programs, if this datapath uses them.
    #[must_use]
    pub fn sockmap(&self) -> Option<&Sockmap> {
        self.sockmap.as_ref()
    }

    /// The configured mode.
    #[must_use]
    pub fn mode(&self) -> DatapathMode {
        self.mode
    }

    /// The tier for a stream whose tunnel is plaintext (`plain`) or TLS, and why when it is not the
    /// configured one. `auto` takes the splice tier for plaintext tunnels (with the server's hop spliced
    /// too, it beat the sockmap tier on this kernel: docs/benchmarks.md) and the copy tier, the only one
    /// TLS allows, otherwise.
    #[must_use]
    pub fn tier_for(&self, plain: bool) -> (Tier, Option<&'static str>) {
        match (self.mode, plain) {
            (DatapathMode::Auto | DatapathMode::Splice, true) => (Tier::Splice, None),
            (DatapathMode::Sockmap, true) => (Tier::Sockmap, None),
            (DatapathMode::Auto | DatapathMode::Copy, _) => (Tier::Copy, None),
            (DatapathMode::Splice | DatapathMode::Sockmap, false) => (Tier::Copy, Some("tls_tunnel")),
        }
    }

    /// Relays between `tunnel` (the data connection) and `target` until both directions end.
    pub async fn relay<T: Stream>(
        &self,
        metrics: &AgentMetrics,
        tunnel: &mut Tunnel<T>,
        target: &mut TcpStream,
    ) -> Result<copy::Moved, copy::RelayError> {
        let (mut tier, fallback) = self.tier_for(matches!(tunnel, Tunnel::Plain(_)));
        if let Some(reason) = fallback {
            inc(&metrics.datapath_fallbacks, "reason", reason);
            info!(reason, tier = tier.as_str(), "datapath fallback");
        }
        let result = match (tier, &mut *tunnel, &self.sockmap) {
            (Tier::Sockmap, Tunnel::Plain(tcp), Some(map)) => {
                match sockmap::stream::relay(map, tcp, target, self.limits).await {
                    Ok(spliced) => {
                        if let Some(reason) = spliced.fallback {
                            inc(&metrics.datapath_fallbacks, "reason", reason);
                            debug!(reason, "sockmap half inserted: the stream was copied");
                            tier = Tier::Copy;
                        }
                        if spliced.duplicated > 0 {
                            metrics.sockmap_duplicate_resets.inc();
                            warn!(
                                bytes = spliced.duplicated,
                                "sockmap: the kernel delivered bytes twice; stream reset"
                            );
                        }
                        metrics.sockmap_trimmed_bytes.inc_by(spliced.trimmed);
                        metrics.sockmap_copied_bytes.inc_by(spliced.copied);
                        metrics.sockmap_pauses.inc_by(spliced.pauses);
                        let peak = i64::try_from(spliced.peak_backlog).unwrap_or(i64::MAX);
                        let gauge = &metrics.sockmap_backlog_peak_bytes;
                        gauge.set(gauge.get().max(peak));
                        Some(spliced.result)
                    }
                    Err(e) => {
                        let reason = e.reason();
                        inc(&metrics.datapath_fallbacks, "reason", reason);
                        debug!(error = %e, reason, "sockmap insert failed: copying the stream");
                        tier = Tier::Copy;
                        None
                    }
                }
            }
            (Tier::Splice, Tunnel::Plain(tcp), _) => Some(splice::relay(tcp, target).await),
            _ => None,
        };
        let result = if let Some(r) = result {
            r
        } else {
            tier = Tier::Copy;
            copy::relay(tunnel, target, &[]).await
        };
        inc(&metrics.streams_by_datapath, "tier", tier.as_str());
        let moved = match &result {
            Ok(m) => m.a_to_b + m.b_to_a,
            Err(e) => e.moved.0 + e.moved.1,
        };
        add(&metrics.datapath_bytes, "tier", tier.as_str(), moved);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_choice() {
        let auto = Datapath::new(DatapathMode::Auto);
        assert_eq!(auto.tier_for(true), (Tier::Splice, None));
        assert_eq!(auto.tier_for(false), (Tier::Copy, None));
        let splice = Datapath::new(DatapathMode::Splice);
        assert_eq!(splice.tier_for(true), (Tier::Splice, None));
        assert_eq!(splice.tier_for(false), (Tier::Copy, Some("tls_tunnel")));
        assert_eq!(Datapath::new(DatapathMode::Copy).tier_for(true), (Tier::Copy, None));
        let sockmap = Datapath::new(DatapathMode::Sockmap);
        assert_eq!(sockmap.tier_for(true), (Tier::Sockmap, None));
        assert_eq!(sockmap.tier_for(false), (Tier::Copy, Some("tls_tunnel")));
    }
}
