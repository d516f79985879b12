//! How a stream's bytes move between its two sockets.
//!
//! Tiers, best first: `sockmap` (eBPF redirect, kernel to kernel), `splice` (splice(2) through a pipe)
//! and `copy` (userspace). Today every tunnel is TLS terminated in userspace, so streams use the copy
//! tier; the sockmap programs are built and loaded by [`sockmap`] for the plaintext tiers to come.

pub mod copy;
pub mod sockmap;

use crate::config::DatapathMode;
use crate::metrics::{AgentMetrics, inc};
use crate::transport::Stream;

/// The datapath tier chosen for a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// Userspace copy.
    Copy,
}

impl Tier {
    /// Metric label.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Copy => "copy",
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

    /// The tier for a stream between `tunnel` and `target`. TLS tunnels need userspace for the
    /// encryption, so every mode resolves to the copy tier for them.
    #[must_use]
    pub fn tier_for(&self) -> Tier {
        match self.mode {
            DatapathMode::Auto | DatapathMode::Copy => Tier::Copy,
        }
    }

    /// Relays between `tunnel` (the data connection) and `target` until both directions end.
    pub async fn splice<A: Stream, B: Stream>(
        &self,
        metrics: &AgentMetrics,
        tunnel: &mut A,
        target: &mut B,
    ) -> Result<copy::Moved, copy::RelayError> {
        let tier = self.tier_for();
        inc(&metrics.streams_by_datapath, "tier", tier.as_str());
        match tier {
            Tier::Copy => copy::relay(tunnel, target, &[]).await,
        }
    }
}
