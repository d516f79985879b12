//! What Spoke's kernel programs and user space agree on: map names, capacities, program names and the
//! `#[repr(C)]` values stored in maps. Every type here is plain old data with explicit padding; all
//! integers are in host byte order.
#![no_std]

/// The stream splice: an `sk_skb` stream-verdict program attached to [`splice::SOCKS`], which redirects
/// every non-empty skb arriving on a socket to the egress of its peer.
pub mod splice {
    /// `SockHash<u64>`: socket cookie → socket. The verdict program is attached to this map, and it is
    /// also the redirect target.
    pub const SOCKS: &str = "SOCKS";
    /// `HashMap<u64, Peer>`: socket cookie → the peer it is spliced to, with byte counters.
    pub const PEERS: &str = "PEERS";
    /// Name of the stream-verdict program.
    pub const VERDICT_PROGRAM: &str = "verdict";
    /// Capacity of both maps: sockets spliced at once (two per stream).
    pub const MAX_SOCKETS: u32 = 65_536;
}

/// Value of [`splice::PEERS`]: where the bytes arriving on a socket go, and what happened to them.
///
/// The program updates the counters; user space writes `peer_cookie` once, when it inserts the pair.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// Socket cookie of the peer socket (`SO_COOKIE`).
    pub peer_cookie: u64,
    /// Payload bytes redirected to the peer (counted only when the redirect helper succeeded).
    pub redirected: u64,
    /// Non-empty skbs whose redirect failed (the peer was not in the map).
    pub failed: u64,
}

#[cfg(feature = "user")]
// SAFETY: `Peer` is `#[repr(C)]`, `Copy`, made of u64s only (no padding), valid for any bit pattern.
unsafe impl aya::Pod for Peer {}
