//! How a stream's bytes move between its two connections, on the server and on the agent alike.
//!
//! Tiers: `sockmap` (eBPF redirect, kernel to kernel, no syscall per chunk), `splice` (splice(2)
//! through a pipe, kernel to kernel) and `copy` (user space). A TLS connection is encrypted in user
//! space, so a stream with one takes the copy tier; a stream whose two connections are plaintext kernel
//! sockets may take splice, or sockmap (TCP on both ends). A stream that cannot be inserted into the
//! sockmap (a socket already received FIN, a map is full) is copied instead, and the fallback is named
//! in its [`Outcome`]. [`Datapath::relay`] is the one entry point: it picks the tier from one [`Mode`],
//! runs both directions and says what happened; the caller records it.

pub(crate) mod buffer;
pub mod copy;
pub mod sockmap;
pub mod splice;
mod tcp;

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::AsyncWriteExt as _;
use tracing::{debug, info, warn};

use crate::transport::ktls::KernelTls;
use crate::transport::{Plain, Stream};
use sockmap::stream::Limits;
use sockmap::{PinDir, Sockmap, SockmapError};

/// How streams are relayed: the `--datapath` of both binaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The fastest tier each stream allows, as measured on the kernels tried (docs/benchmarks.md):
    /// splice where both connections are plaintext kernel sockets, copy otherwise.
    Auto,
    /// The userspace copy (tokio and rustls, adaptive buffers up to 256 KiB), for every stream.
    Copy,
    /// splice(2) through a pipe, kernel to kernel, where both connections are plaintext (streams with a
    /// TLS end fall back to copy).
    Splice,
    /// eBPF sockmap redirect, kernel to kernel with no syscall per chunk, where both connections are
    /// plaintext TCP (the others, and streams whose sockets cannot be inserted, fall back). Needs root
    /// and BPF; agent only.
    Sockmap,
}

/// Bytes one stream's relay holds at most in user space and in the kernel buffers Spoke sizes (pipes,
/// sockmap backlogs; not the sockets' own buffers, which the kernel autotunes), whichever tier `mode`
/// gives it: `tls` where one end may be a TLS data connection, `sockmap_backlog` the sockmap tier's
/// per-direction limit. The terms of the memory budget (docs/operations.md, "Memory budget").
#[must_use]
pub fn stream_memory(mode: Mode, tls: bool, sockmap_backlog: u64) -> u64 {
    let copy = (2 * copy::MAX_BUF + if tls { crate::transport::user_tls::MAX_HELD } else { 0 }) as u64;
    // Splicing streams fall back to copy where an end is TLS in user space: the larger of the two.
    let copy_or_splice = copy.max((2 * splice::PIPE_SIZE) as u64);
    match mode {
        Mode::Copy => copy,
        Mode::Auto | Mode::Splice => copy_or_splice,
        Mode::Sockmap => copy_or_splice.max(2 * sockmap_backlog),
    }
}

/// What a relay reports while it runs, for a caller that closes idle streams (a server draining for a
/// restart): the bytes taken in and passed on, both directions together. Equal counts mean nothing is
/// in flight; equal counts that stay put mean the stream is idle. The sockmap tier moves bytes out of
/// sight, so its streams never look idle.
#[derive(Debug, Default)]
pub struct Activity {
    read: AtomicU64,
    written: AtomicU64,
    opaque: AtomicBool,
}

impl Activity {
    fn read(&self, n: usize) {
        self.read.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn wrote(&self, n: usize) {
        self.written.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The bytes passed on so far, if nothing is in flight now; `None` while bytes are in flight or
    /// where the tier cannot tell. Two equal samples some time apart mean the stream sat idle between.
    #[must_use]
    pub fn settled(&self) -> Option<u64> {
        if self.opaque.load(Ordering::Relaxed) {
            return None;
        }
        let written = self.written.load(Ordering::Acquire);
        (self.read.load(Ordering::Acquire) == written).then_some(written)
    }
}

/// The tier that carried a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// Userspace copy.
    Copy,
    /// splice(2) through a pipe.
    Splice,
    /// eBPF sockmap redirect.
    Sockmap,
    /// splice(2) through a pipe with a kernel TLS end: the kernel seals and opens the tunnel's records.
    Ktls,
}

impl Tier {
    /// Metric label.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Copy => "copy",
            Self::Splice => "splice",
            Self::Sockmap => "sockmap",
            Self::Ktls => "ktls",
        }
    }
}

/// Which end of a relay failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The first connection passed to the relay (the control-plane side).
    A,
    /// The second connection passed to the relay (the node side).
    B,
}

/// A relay ended by an error; both connections were aborted.
#[derive(Debug, thiserror::Error)]
#[error("{end:?} side: {source}")]
pub struct RelayError {
    /// The connection whose read or write failed.
    pub end: End,
    /// The failure.
    #[source]
    pub source: io::Error,
    /// Bytes moved before the failure, A → B and B → A.
    pub moved: (u64, u64),
}

/// Bytes moved by a relay: A → B and B → A.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// Bytes read from A and written to B.
    pub a_to_b: u64,
    /// Bytes read from B and written to A.
    pub b_to_a: u64,
}

/// What the sockmap tier did for one stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockmapStats {
    /// Bytes copied in user space while a direction was paused (the rest moved kernel to kernel).
    pub copied: u64,
    /// Bytes the kernel handed the program a second time, trimmed off (DESIGN.md §5 j).
    pub trimmed: u64,
    /// Bytes forwarded beyond what TCP received: non-zero only when that reset the stream.
    pub duplicated: u64,
    /// Times a direction ran out of credit.
    pub pauses: u64,
    /// Largest backlog of one direction: bytes redirected or copied, not yet acknowledged.
    pub peak_backlog: u64,
}

/// How one stream's relay ended.
#[derive(Debug)]
pub struct Outcome {
    /// The tier that carried it.
    pub tier: Tier,
    /// Why it did not take the tier its mode asked for.
    pub fallback: Option<&'static str>,
    /// Bytes moved each way, up to the end or the failure.
    pub moved: Moved,
    /// Which end failed and how; `None` for a clean end in both directions.
    pub failure: Option<(End, io::Error)>,
    /// What the sockmap tier did, when it carried the stream.
    pub sockmap: Option<SockmapStats>,
}

impl Outcome {
    fn new(tier: Tier, fallback: Option<&'static str>, result: Result<Moved, RelayError>) -> Self {
        let (moved, failure) = match result {
            Ok(moved) => (moved, None),
            Err(e) => (Moved { a_to_b: e.moved.0, b_to_a: e.moved.1 }, Some((e.end, e.source))),
        };
        Self { tier, fallback, moved, failure, sockmap: None }
    }

    /// Logs the end of the stream at debug level; `ends` names A and B for the reader.
    pub fn log(&self, ends: [&str; 2]) {
        let (up, down) = (self.moved.a_to_b, self.moved.b_to_a);
        match &self.failure {
            None => debug!(up, down, tier = self.tier.as_str(), "stream closed"),
            Some((end, error)) => {
                let side = if *end == End::A { ends[0] } else { ends[1] };
                debug!(%error, side, up, down, tier = self.tier.as_str(), "stream aborted");
            }
        }
    }
}

/// Runs a stream's two directions, `up` (A → B) and `down` (B → A), each ending with its byte count or
/// a failure whose end is named from `up`'s point of view (`End::A` its source), until both have ended
/// or one fails. A failure comes back with the counts of the directions that had finished.
pub(crate) async fn both_directions<U, D>(
    up: U,
    down: D,
) -> Result<Moved, ((End, io::Error), Option<u64>, Option<u64>)>
where
    U: Future<Output = Result<u64, (End, io::Error)>>,
    D: Future<Output = Result<u64, (End, io::Error)>>,
{
    let flip = |(end, e): (End, io::Error)| (if end == End::A { End::B } else { End::A }, e);
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
            return Ok(Moved { a_to_b, b_to_a });
        }
    };
    Err((failure, a_to_b, b_to_a))
}

/// Picks a tier per stream and moves its bytes.
#[derive(Debug)]
pub struct Datapath {
    mode: Mode,
    sockmap: Option<Sockmap>,
    limits: Limits,
    kernel_tls: Option<KernelTls>,
}

impl Datapath {
    /// A datapath working in `mode`; `copy`, `splice` and `auto` need nothing set up, and `sockmap`
    /// without [`Datapath::with_sockmap`] copies.
    #[must_use]
    pub fn new(mode: Mode) -> Self {
        Self { mode, sockmap: None, limits: Limits::default(), kernel_tls: None }
    }

    /// Hands TLS data connections of the kernel's cipher suite to kernel TLS ([`crate::transport::ktls`])
    /// where `kernel_tls` says the kernel offers it; a `copy` datapath keeps them in user space.
    #[must_use]
    pub fn with_kernel_tls(self, kernel_tls: Option<KernelTls>) -> Self {
        let kernel_tls = kernel_tls.filter(|_| self.mode != Mode::Copy);
        Self { kernel_tls, ..self }
    }

    /// [`Datapath::with_kernel_tls`] after asking the kernel ([`KernelTls::probe`]), and says once
    /// what came of it: which tier TLS data connections take, and why not the kernel's.
    #[must_use]
    pub fn probe_kernel_tls(self) -> Self {
        if self.mode == Mode::Copy {
            info!("datapath copy: TLS data connections are encrypted in user space");
            return self;
        }
        match KernelTls::probe() {
            Ok(k) => {
                info!(
                    tier = "ktls",
                    "kernel TLS: TLS data connections use ChaCha20-Poly1305 sealed by the kernel, and streams \
                     are spliced kernel to kernel"
                );
                self.with_kernel_tls(Some(k))
            }
            Err(reason) => {
                info!(%reason, tier = "copy", "kernel TLS unavailable: TLS data connections are encrypted in user space");
                self
            }
        }
    }

    /// Kernel TLS, where this datapath uses it.
    #[must_use]
    pub fn kernel_tls(&self) -> Option<KernelTls> {
        self.kernel_tls
    }

    /// The sockmap datapath: loads and attaches the eBPF programs, pinned in `pins`.
    pub fn with_sockmap(pins: Option<PinDir>, limits: Limits) -> Result<Self, SockmapError> {
        Ok(Self { mode: Mode::Sockmap, sockmap: Some(Sockmap::load(pins)?), limits, kernel_tls: None })
    }

    /// The loaded sockmap programs, if this datapath uses them.
    #[must_use]
    pub fn sockmap(&self) -> Option<&Sockmap> {
        self.sockmap.as_ref()
    }

    /// The configured mode.
    #[must_use]
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The tier for a stream whose ends are `a` and `b` (their plaintext sockets, or why they have
    /// none), and why when it is not the one the mode asks for. `auto` takes splice where both ends are
    /// plaintext (with both hops spliced it beat the sockmap tier on this kernel: docs/benchmarks.md)
    /// and copy, the only tier TLS allows, otherwise.
    #[must_use]
    pub fn tier_for(
        &self,
        a: Result<Plain<'_>, &'static str>,
        b: Result<Plain<'_>, &'static str>,
    ) -> (Tier, Option<&'static str>) {
        let both = match (a, b) {
            (Ok(a), Ok(b)) => Ok((a, b)),
            (Err(why), _) | (_, Err(why)) => Err(why),
        };
        let ktls = matches!(
            both,
            Ok((Plain::Ktls(_) | Plain::Counted(_), _) | (_, Plain::Ktls(_) | Plain::Counted(_)))
        );
        match (self.mode, both) {
            (Mode::Copy, _) | (Mode::Auto, Err(_)) => (Tier::Copy, None),
            (Mode::Auto | Mode::Splice, Ok(_)) if ktls => (Tier::Ktls, None),
            (Mode::Sockmap, Ok(_)) if ktls => (Tier::Ktls, Some("kernel_tls")),
            (Mode::Auto | Mode::Splice, Ok(_)) => (Tier::Splice, None),
            (Mode::Sockmap, Ok((Plain::Tcp(_), Plain::Tcp(_)))) => (Tier::Sockmap, None),
            (Mode::Sockmap, Ok(_)) => (Tier::Splice, Some("unix_socket")),
            (Mode::Splice | Mode::Sockmap, Err(why)) => (Tier::Copy, Some(why)),
        }
    }

    /// Relays between `a` (the control-plane side) and `b` (the node side) until both directions end.
    /// `early` (bytes already read from `a`, such as what followed a request head) goes to `b` first.
    /// Until the relay ends cleanly both connections reset when closed, so a stream cut off (by an
    /// error, or by the end of a grace period) never looks complete to either end.
    pub async fn relay<A: Stream, B: Stream>(
        &self,
        a: &mut A,
        b: &mut B,
        early: &[u8],
        activity: &Activity,
    ) -> Outcome {
        a.reset_on_close(true);
        b.reset_on_close(true);
        let (tier, fallback) = self.tier_for(a.plain(), b.plain());
        if let Some(reason) = fallback {
            info!(reason, tier = tier.as_str(), "datapath fallback");
        }
        let outcome = match tier {
            Tier::Copy => Outcome::new(Tier::Copy, fallback, copy::relay(a, b, early, activity).await),
            // The kernel tiers' state sits on the heap only for the streams that take them, so that a
            // copied stream's task stays small (thousands of idle streams are held at once).
            Tier::Splice | Tier::Sockmap | Tier::Ktls => {
                Box::pin(self.in_kernel(tier, fallback, a, b, early, activity)).await
            }
        };
        if outcome.failure.is_none() {
            a.reset_on_close(false);
            b.reset_on_close(false);
        }
        outcome
    }

    /// A kernel tier: `early` is written first, then the sockets are spliced or paired in the sockmap
    /// (copied instead where the pair cannot be inserted).
    async fn in_kernel<A: Stream, B: Stream>(
        &self,
        tier: Tier,
        fallback: Option<&'static str>,
        a: &mut A,
        b: &mut B,
        early: &[u8],
        activity: &Activity,
    ) -> Outcome {
        if let Err(source) = b.write_all(early).await {
            a.abort();
            b.abort();
            return Outcome::new(tier, fallback, Err(RelayError { end: End::B, source, moved: (0, 0) }));
        }
        let early = early.len() as u64;
        let with_early = |r: Result<Moved, RelayError>| match r {
            Ok(m) => Ok(Moved { a_to_b: m.a_to_b + early, ..m }),
            Err(e) => Err(RelayError { moved: (e.moved.0 + early, e.moved.1), ..e }),
        };
        let (Ok(pa), Ok(pb)) = (a.plain(), b.plain()) else {
            unreachable!("a kernel tier is chosen only for plaintext ends")
        };
        if let (Tier::Sockmap, Plain::Tcp(ta), Plain::Tcp(tb), Some(map)) = (tier, pa, pb, &self.sockmap) {
            // Boxed: its state is large, and inline it would enlarge every spliced stream's state too.
            activity.opaque.store(true, Ordering::Relaxed);
            match Box::pin(sockmap::stream::relay(map, ta, tb, self.limits)).await {
                Ok(spliced) => {
                    let stats = SockmapStats {
                        copied: spliced.copied,
                        trimmed: spliced.trimmed,
                        duplicated: spliced.duplicated,
                        pauses: spliced.pauses,
                        peak_backlog: spliced.peak_backlog,
                    };
                    if stats.duplicated > 0 {
                        warn!(
                            bytes = stats.duplicated,
                            "sockmap: the kernel delivered bytes twice; stream reset"
                        );
                    }
                    let (tier, fallback) = match spliced.fallback {
                        Some(reason) => {
                            debug!(reason, "sockmap half inserted: the stream was copied");
                            (Tier::Copy, Some(reason))
                        }
                        None => (Tier::Sockmap, fallback),
                    };
                    return Outcome {
                        sockmap: Some(stats),
                        ..Outcome::new(tier, fallback, with_early(spliced.result))
                    };
                }
                Err(e) => {
                    let reason = e.reason();
                    debug!(error = %e, reason, "sockmap insert failed: copying the stream");
                    let copied = copy::relay(a, b, &[], activity).await;
                    return Outcome::new(Tier::Copy, Some(reason), with_early(copied));
                }
            }
        }
        if tier == Tier::Sockmap {
            // Sockmap asked for but not loaded (a datapath built without it): copied, as before.
            return Outcome::new(Tier::Copy, fallback, with_early(copy::relay(a, b, &[], activity).await));
        }
        Outcome::new(tier, fallback, with_early(splice::relay_plain(pa, pb, activity).await))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tier_choice() {
        // The choice looks only at the kind of each end's socket.
        let (a, _) = crate::transport::tcp_pair().await;
        let tcp = || -> Result<Plain<'_>, &'static str> { Ok(Plain::Tcp(&a)) };
        let tls = Err("tls_tunnel");
        let auto = Datapath::new(Mode::Auto);
        assert_eq!(auto.tier_for(tcp(), tcp()), (Tier::Splice, None));
        assert_eq!(auto.tier_for(tls, tcp()), (Tier::Copy, None));
        let splice = Datapath::new(Mode::Splice);
        assert_eq!(splice.tier_for(tcp(), tcp()), (Tier::Splice, None));
        assert_eq!(splice.tier_for(tls, tcp()), (Tier::Copy, Some("tls_tunnel")));
        assert_eq!(Datapath::new(Mode::Copy).tier_for(tcp(), tcp()), (Tier::Copy, None));
        let sockmap = Datapath::new(Mode::Sockmap);
        assert_eq!(sockmap.tier_for(tcp(), tcp()), (Tier::Sockmap, None));
        assert_eq!(sockmap.tier_for(tls, tcp()), (Tier::Copy, Some("tls_tunnel")));
        assert_eq!(sockmap.tier_for(tcp(), Err("tls")), (Tier::Copy, Some("tls")));
        // A kernel TLS end: spliced, labelled as its own tier; the copy mode copies it.
        let ktls = || -> Result<Plain<'_>, &'static str> { Ok(Plain::Ktls(&a)) };
        assert_eq!(auto.tier_for(ktls(), tcp()), (Tier::Ktls, None));
        assert_eq!(splice.tier_for(tcp(), ktls()), (Tier::Ktls, None));
        assert_eq!(sockmap.tier_for(ktls(), tcp()), (Tier::Ktls, Some("kernel_tls")));
        assert_eq!(Datapath::new(Mode::Copy).tier_for(ktls(), tcp()), (Tier::Copy, None));
    }

    /// Every stream's task holds the relay's state while the stream lives (thousands of idle streams
    /// are held at once): the kernel tiers' large state must stay off it, on the heap of the streams
    /// that take them. A structural guard; memory itself is measured by the benchmark.
    #[tokio::test]
    async fn a_streams_relay_state_stays_small() {
        let datapath = Datapath::new(Mode::Auto);
        let (mut a, mut b) = crate::transport::tcp_pair().await;
        let activity = Activity::default();
        let relay = datapath.relay(&mut a, &mut b, &[], &activity);
        assert!(size_of_val(&relay) <= 512, "relay future of {} bytes", size_of_val(&relay));
    }
}
