//! How a stream's bytes move between its two sockets.
//!
//! Tiers, best first: `sockmap` (eBPF redirect, kernel to kernel, no syscall per chunk), `splice`
//! (splice(2) through a pipe, kernel to kernel) and `copy` (user space). A TLS tunnel is encrypted in
//! user space, so its streams take the copy tier; plaintext tunnels (`--tunnel-tls off`) may take
//! splice (`--datapath splice`).
//! The sockmap programs are built, loaded and tested by [`sockmap`]; handing streams to them waits for
//! the close and flow-control procedure (DESIGN §5), so no mode selects them yet.

pub mod copy;
pub mod sockmap;
pub mod splice;

use tokio::net::TcpStream;
use tracing::info;

use crate::config::DatapathMode;
use crate::metrics::{AgentMetrics, add, inc};
use crate::transport::{Stream, Tunnel};

/// The datapath tier chosen for a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// Userspace copy.
    Copy,
    /// splice(2) through a pipe.
    Splice,
}

impl Tier {
    /// Metric label.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Copy => "copy",
            Self::Splice => "splice",
        }
    }
}

/// The agent's datapath: picks a tier per stream and moves its bytes.
#[derive(Debug)]
pub struct Datapath {
    mode: DatapathMode,
}

impl Datapath {
    /// A datapath working in `mode`.
    #[must_use]
    pub fn new(mode: DatapathMode) -> Self {
        Self { mode }
    }

    /// The configured mode.
    #[must_use]
    pub fn mode(&self) -> DatapathMode {
        self.mode
    }

    /// The tier for a stream whose tunnel is plaintext (`plain`) or TLS, and why when it is not the
    /// configured one. `auto` takes the copy tier: on this kernel it measured as fast as splice or
    /// faster, at no more CPU (docs/benchmarks.md), and it is the only tier for TLS tunnels.
    #[must_use]
    pub fn tier_for(&self, plain: bool) -> (Tier, Option<&'static str>) {
        match (self.mode, plain) {
            (DatapathMode::Splice, true) => (Tier::Splice, None),
            (DatapathMode::Auto | DatapathMode::Copy, _) => (Tier::Copy, None),
            (DatapathMode::Splice, false) => (Tier::Copy, Some("tls_tunnel")),
        }
    }

    /// Relays between `tunnel` (the data connection) and `target` until both directions end.
    pub async fn relay<T: Stream>(
        &self,
        metrics: &AgentMetrics,
        tunnel: &mut Tunnel<T>,
        target: &mut TcpStream,
    ) -> Result<copy::Moved, copy::RelayError> {
        let (tier, fallback) = self.tier_for(matches!(tunnel, Tunnel::Plain(_)));
        if let Some(reason) = fallback {
            inc(&metrics.datapath_fallbacks, "reason", reason);
            info!(reason, tier = tier.as_str(), "datapath fallback");
        }
        inc(&metrics.streams_by_datapath, "tier", tier.as_str());
        let result = match (tier, &mut *tunnel) {
            (Tier::Splice, Tunnel::Plain(tcp)) => splice::relay(tcp, target).await,
            _ => copy::relay(tunnel, target, &[]).await,
        };
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
        assert_eq!(auto.tier_for(true), (Tier::Copy, None));
        assert_eq!(auto.tier_for(false), (Tier::Copy, None));
        let splice = Datapath::new(DatapathMode::Splice);
        assert_eq!(splice.tier_for(true), (Tier::Splice, None));
        assert_eq!(splice.tier_for(false), (Tier::Copy, Some("tls_tunnel")));
        assert_eq!(Datapath::new(DatapathMode::Copy).tier_for(true), (Tier::Copy, None));
    }
}
