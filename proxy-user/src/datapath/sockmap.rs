//! Sole owner of the eBPF programs and maps: load, attach, pair and unpair sockets.
//!
//! A pair of TCP sockets inserted here has every non-empty skb arriving on one socket redirected by the
//! kernel to the other's egress. This module provides the mechanism only; the close procedure, flow
//! control and fallback decisions that make it a safe datapath tier (DESIGN.md §5) are not built yet,
//! so the agent does not splice streams through it.

use std::os::fd::AsRawFd as _;
use std::sync::Mutex;

use aya::Ebpf;
use aya::maps::{HashMap, MapData, SockHash};
use aya::programs::SkSkb;
use proxy_ebpf_common::{Peer, splice};
use tokio::net::TcpStream;

/// The eBPF object built by `build.rs` from `proxy-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// Why the sockmap datapath is unavailable or an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SockmapError {
    /// Loading the object or creating its maps failed (no BPF, no privileges, old kernel).
    #[error("load eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program failed to load or attach.
    #[error("program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// The failure.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map is missing from the object.
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    /// A map operation failed (e.g. EOPNOTSUPP: the socket is no longer established).
    #[error("map {map}: {source}")]
    Map {
        /// Map name.
        map: &'static str,
        /// The failure.
        #[source]
        source: aya::maps::MapError,
    },
    /// A socket option could not be read.
    #[error("socket: {0}")]
    Socket(#[from] std::io::Error),
}

/// Loaded programs and their maps. Dropping it detaches the programs and frees the maps.
pub struct Sockmap {
    socks: Mutex<SockHash<MapData, u64>>,
    peers: Mutex<HashMap<MapData, u64, Peer>>,
    _ebpf: Ebpf,
}

impl std::fmt::Debug for Sockmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sockmap").finish_non_exhaustive()
    }
}

/// Two sockets spliced to each other, identified by their cookies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pair {
    /// Cookie of the first socket.
    pub a: u64,
    /// Cookie of the second socket.
    pub b: u64,
}

impl Sockmap {
    /// Loads the embedded object and attaches the stream verdict to the socket map.
    pub fn load() -> Result<Self, SockmapError> {
        let mut ebpf = Ebpf::load(OBJECT)?;
        let socks: SockHash<MapData, u64> = ebpf
            .take_map(splice::SOCKS)
            .ok_or(SockmapError::MissingMap(splice::SOCKS))?
            .try_into()
            .map_err(|source| SockmapError::Map { map: splice::SOCKS, source })?;
        let peers: HashMap<MapData, u64, Peer> = ebpf
            .take_map(splice::PEERS)
            .ok_or(SockmapError::MissingMap(splice::PEERS))?
            .try_into()
            .map_err(|source| SockmapError::Map { map: splice::PEERS, source })?;
        let name = splice::VERDICT_PROGRAM;
        let program: &mut SkSkb = ebpf
            .program_mut(name)
            .ok_or(SockmapError::Program { name, source: aya::programs::ProgramError::NotLoaded })?
            .try_into()
            .map_err(|source| SockmapError::Program { name, source })?;
        program.load().map_err(|source| SockmapError::Program { name, source })?;
        program.attach(socks.fd()).map_err(|source| SockmapError::Program { name, source })?;
        Ok(Self { socks: Mutex::new(socks), peers: Mutex::new(peers), _ebpf: ebpf })
    }

    /// Splices `a` and `b`: from now on bytes arriving on either are sent out of the other by the kernel.
    /// On failure nothing stays inserted.
    pub fn pair(&self, a: &TcpStream, b: &TcpStream) -> Result<Pair, SockmapError> {
        let pair = Pair { a: socket2::SockRef::from(a).cookie()?, b: socket2::SockRef::from(b).cookie()? };
        let mut peers = self.peers.lock().expect("peers lock poisoned");
        let mut socks = self.socks.lock().expect("socks lock poisoned");
        let inserted = peers
            .insert(pair.a, Peer { peer_cookie: pair.b, ..Peer::default() }, 0)
            .and_then(|()| peers.insert(pair.b, Peer { peer_cookie: pair.a, ..Peer::default() }, 0))
            .map_err(|source| SockmapError::Map { map: splice::PEERS, source })
            .and_then(|()| {
                socks
                    .insert(pair.a, a.as_raw_fd(), 0)
                    .and_then(|()| socks.insert(pair.b, b.as_raw_fd(), 0))
                    .map_err(|source| SockmapError::Map { map: splice::SOCKS, source })
            });
        if let Err(e) = inserted {
            for cookie in [pair.a, pair.b] {
                let _ = socks.remove(&cookie);
                let _ = peers.remove(&cookie);
            }
            return Err(e);
        }
        Ok(pair)
    }

    /// Bytes redirected out of each socket of `pair` so far: (a → b, b → a).
    pub fn redirected(&self, pair: Pair) -> (u64, u64) {
        let peers = self.peers.lock().expect("peers lock poisoned");
        let count = |c: u64| peers.get(&c, 0).map_or(0, |p| p.redirected);
        (count(pair.a), count(pair.b))
    }

    /// Removes `pair` from the maps; bytes still queued for redirection are discarded by the kernel.
    pub fn unpair(&self, pair: Pair) {
        let mut socks = self.socks.lock().expect("socks lock poisoned");
        let mut peers = self.peers.lock().expect("peers lock poisoned");
        for cookie in [pair.a, pair.b] {
            let _ = socks.remove(&cookie);
            let _ = peers.remove(&cookie);
        }
    }
}
