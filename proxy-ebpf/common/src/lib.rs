//! What Spoke's kernel programs and user space agree on: map names, capacities, program names and the
//! `#[repr(C)]` values stored in maps. Every type here is plain old data with explicit padding; all
//! integers are in host byte order.
#![no_std]

/// The stream splice: an `sk_skb` stream-verdict program attached to [`splice::SOCKS`], which redirects
/// every non-empty skb arriving on a socket to the egress of its peer while the stream has credit, and
/// passes it to the socket's own receive queue (for user space to copy) while it has none.
pub mod splice {
    /// `SockHash<u64>`: socket cookie → socket. The verdict program is attached to this map, and it is
    /// also the redirect target.
    pub const SOCKS: &str = "SOCKS";
    /// `HashMap<u64, Flow>`: socket cookie → where its bytes go and what happened to them. Written by
    /// the program after user space inserted it.
    pub const FLOWS: &str = "FLOWS";
    /// `HashMap<u64, Credit>`: socket cookie → how far the program may redirect. Written by user space
    /// only; not preallocated, so the program always reads a whole old or whole new value.
    pub const CREDITS: &str = "CREDITS";
    /// Name of the stream-verdict program.
    pub const VERDICT_PROGRAM: &str = "verdict";
    /// Name of the program's [`super::KernelOffsets`] global.
    pub const KERNEL_OFFSETS: &str = "KERNEL_OFFSETS";
    /// Capacity of every map: sockets spliced at once (two per stream).
    pub const MAX_SOCKETS: u32 = 65_536;
}

/// Value of [`splice::FLOWS`]: one direction of a spliced stream, keyed by its source socket.
///
/// User space writes it once, at insertion; from then on only the program writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Socket cookie of the peer socket (`SO_COOKIE`), whose egress the bytes are redirected to.
    pub peer_cookie: u64,
    /// Payload bytes redirected to the peer (counted only when the redirect helper succeeded).
    pub redirected: u64,
    /// Payload bytes passed to the source socket's own receive queue, for user space to copy.
    pub passed: u64,
    /// Times the direction ran out of credit and started passing.
    pub pauses: u64,
    /// Times it went back to redirecting.
    pub resumes: u64,
    /// Skbs the program could not forward as they are, so the stream is broken and user space resets
    /// it: a failed redirect (the peer was not in the map), a peer whose own flow does not name this
    /// socket back, a head it could not trim, or a sequence gap.
    pub failed: u64,
    /// Bytes the kernel handed to the program a second time, which it dropped or trimmed off. TCP
    /// queues a retransmitted segment whole even when its head was received already, and the kernel's
    /// skb reader gives the program whole skbs: without the trim those bytes would be sent twice.
    pub trimmed: u64,
    /// TCP sequence number of the next new byte of this direction (valid when `tracking` is 1).
    pub next_seq: u32,
    /// 1 once `next_seq` is set: by the first skb after insertion, from the socket's `copied_seq`.
    pub tracking: u32,
    /// 1 while passing (paused), 0 while redirecting.
    pub paused: u32,
    /// Explicit padding.
    pub pad: u32,
}

/// Where the program finds two kernel fields no BPF context exposes, in bytes from the start of the
/// kernel struct. Kernel builds differ, so user space reads them from the kernel's BTF and sets the
/// program's [`splice::KERNEL_OFFSETS`] global before loading it; all zero leaves sequence tracking off.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `struct sk_buff`, member `cb`: the control block, which starts with TCP's `seq`.
    pub skb_cb: u32,
    /// `struct sk_buff`, member `sk`: the owning socket.
    pub skb_sk: u32,
    /// `struct tcp_sock`, member `copied_seq`: the next byte not yet consumed.
    pub copied_seq: u32,
    /// Explicit padding.
    pub pad: u32,
}

/// Value of [`splice::CREDITS`]: user space's side of one direction's flow control.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Credit {
    /// The program redirects an skb only while `Flow::redirected` plus its length stays at or below this.
    /// User space keeps it at (bytes the peer acknowledged + the in-flight limit − bytes it copied).
    pub allow: u64,
    /// Passed bytes user space has read and written to the peer. A paused direction resumes only when
    /// this equals `Flow::passed`, so redirected bytes never overtake copied ones.
    pub written: u64,
}

#[cfg(feature = "user")]
// SAFETY: `Flow` is `#[repr(C)]`, `Copy`, made of integers with explicit padding, valid for any bits.
unsafe impl aya::Pod for Flow {}

#[cfg(feature = "user")]
// SAFETY: `KernelOffsets` is `#[repr(C)]`, `Copy`, made of u32s only (no padding), valid for any bits.
unsafe impl aya::Pod for KernelOffsets {}

#[cfg(feature = "user")]
// SAFETY: `Credit` is `#[repr(C)]`, `Copy`, made of u64s only (no padding), valid for any bit pattern.
unsafe impl aya::Pod for Credit {}
