//! The sockmap tier. This module is the sole owner of the eBPF programs and maps: it loads and attaches
//! them, pins them under a per-instance directory in the BPF filesystem, and pairs and unpairs sockets.
//! [`stream`] runs one stream through them: flow control, the copy path while paused, and the close
//! procedure that keeps every byte (DESIGN.md §5).

mod btf;
pub mod stream;
mod tick;

use std::io;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::Ebpf;
use aya::maps::{HashMap, MapData, SockHash};
use aya::programs::SkSkb;
use proxy_ebpf_common::{Credit, Flow, KernelOffsets, splice};
use tokio::net::TcpStream;
use tracing::{info, warn};

/// The eBPF object built by `build.rs` from `proxy-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// Where the BPF filesystem is mounted on a usual host, and the root of the pin directories.
pub const DEFAULT_BPF_ROOT: &str = "/sys/fs/bpf";

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
    /// The pin directory could not be prepared, reclaimed or written.
    #[error("pin directory {path}: {source}")]
    Pin {
        /// The directory or file.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// A socket option could not be read.
    #[error("socket: {0}")]
    Socket(#[from] io::Error),
}

impl SockmapError {
    /// A short label for metrics and logs: why a stream could not be inserted.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        let errno = match self {
            Self::Map { source: aya::maps::MapError::SyscallError(e), .. } => e.io_error.raw_os_error(),
            _ => None,
        };
        match errno {
            // The socket already received FIN (no longer ESTABLISHED): DESIGN.md §5 c.
            Some(libc::EOPNOTSUPP) => "not_established",
            Some(libc::ENOSPC | libc::E2BIG | libc::ENOMEM) => "map_full",
            _ => "insert_failed",
        }
    }
}

/// Where the maps and the program are pinned: `<bpf root>/spoke/<instance>`.
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
    dir: PathBuf,
}

impl PinDir {
    /// The pin directory of `instance` under the BPF filesystem at `root`. Characters other than ASCII
    /// letters, digits, `.`, `-` and `_` in `instance` become `_`.
    #[must_use]
    pub fn new(root: &Path, instance: &str) -> Self {
        let name: String = instance
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') { c } else { '_' })
            .collect();
        let name = if name.is_empty() || name.chars().all(|c| c == '.') { "agent".to_owned() } else { name };
        Self { root: root.to_owned(), dir: root.join("spoke").join(name) }
    }

    /// The directory holding this instance's pins.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Mounts the BPF filesystem at the root if nothing is mounted there, then removes whatever a
    /// previous instance of the same name left (a killed agent cannot clean up): the kernel frees those
    /// maps and programs once their pins are gone. Returns how many pins were reclaimed.
    fn prepare(&self) -> Result<usize, SockmapError> {
        let err = |path: &Path| {
            let path = path.to_owned();
            move |source| SockmapError::Pin { path, source }
        };
        let on_bpffs = |p: &Path| {
            nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
        };
        if !on_bpffs(&self.root) {
            std::fs::create_dir_all(&self.root).map_err(err(&self.root))?;
            nix::mount::mount(
                Some("bpf"),
                &self.root,
                Some("bpf"),
                nix::mount::MsFlags::MS_NOSUID
                    | nix::mount::MsFlags::MS_NODEV
                    | nix::mount::MsFlags::MS_NOEXEC,
                None::<&str>,
            )
            .map_err(|e| SockmapError::Pin { path: self.root.clone(), source: e.into() })?;
            info!(path = %self.root.display(), "mounted the BPF filesystem");
        }
        let mut reclaimed = 0;
        match std::fs::read_dir(&self.dir) {
            Ok(entries) => {
                for entry in entries {
                    let path = entry.map_err(err(&self.dir))?.path();
                    std::fs::remove_file(&path).map_err(err(&path))?;
                    reclaimed += 1;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(&self.dir)(e)),
        }
        std::fs::create_dir_all(&self.dir).map_err(err(&self.dir))?;
        Ok(reclaimed)
    }

    /// Removes the pins and the directory.
    fn remove(&self) -> io::Result<()> {
        match std::fs::read_dir(&self.dir) {
            Ok(entries) => {
                for entry in entries {
                    std::fs::remove_file(entry?.path())?;
                }
                std::fs::remove_dir(&self.dir)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Loaded programs and their maps. Dropping it removes the pins, detaches the programs and frees the
/// maps (the kernel discards whatever is still queued in them: unpair streams first).
pub struct Sockmap {
    socks: Mutex<SockHash<MapData, u64>>,
    flows: Mutex<HashMap<MapData, u64, Flow>>,
    credits: Mutex<HashMap<MapData, u64, Credit>>,
    pins: Option<PinDir>,
    /// Whether the program found the kernel offsets it needs to trim bytes handed to it twice.
    trims: bool,
    /// Forwards the programs' log records (aya-log) to `tracing` while the maps live.
    logs: Option<tokio::task::AbortHandle>,
    _ebpf: Ebpf,
}

impl std::fmt::Debug for Sockmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sockmap").field("pins", &self.pins).finish_non_exhaustive()
    }
}

/// Why [`Sockmap::pair`] failed, and what it left in the maps.
#[derive(Debug)]
pub struct PairError {
    /// The failure.
    pub error: Box<SockmapError>,
    /// `Some` when a socket is left in the map: its arriving bytes are passed to its own receive queue
    /// (no credit), where user space reads them like any socket's. Removing it now would discard what
    /// it passed, so the caller copies the stream and unpairs it once both directions have ended (no
    /// byte can arrive any more). `None`: nothing was inserted, nothing was intercepted.
    pub half: Option<Pair>,
}

/// Two sockets spliced to each other, identified by their cookies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pair {
    /// Cookie of the first socket.
    pub a: u64,
    /// Cookie of the second socket.
    pub b: u64,
}

/// The kernel struct offsets the verdict program needs to find each skb's sequence number, read from
/// the kernel's BTF. Without them the program cannot trim bytes the kernel hands it twice; user space
/// still detects those and resets the stream, so this is logged, not fatal.
fn kernel_offsets() -> KernelOffsets {
    let read = || -> Result<KernelOffsets, String> {
        let blob = btf::Slurped::read(btf::VMLINUX, btf::MAX_VMLINUX)
            .map_err(|e| format!("{}: {e}", btf::VMLINUX))?;
        let btf = btf::Btf::parse(blob.bytes()).map_err(|e| e.to_string())?;
        let find =
            |ty, member| btf.member_offset(ty, member).ok_or(format!("no {ty}::{member} in the kernel BTF"));
        Ok(KernelOffsets {
            skb_cb: find("sk_buff", "cb")?,
            skb_sk: find("sk_buff", "sk")?,
            copied_seq: find("tcp_sock", "copied_seq")?,
            pad: 0,
        })
    };
    read().unwrap_or_else(|reason| {
        warn!(
            %reason,
            "no kernel struct offsets: bytes the kernel hands the program twice reset the stream instead of \
             being trimmed"
        );
        KernelOffsets::default()
    })
}

/// The object with its maps created and its verdict program loaded (not attached), the program's
/// [`KernelOffsets`] global set to `offsets`.
fn load_object(offsets: KernelOffsets) -> Result<Ebpf, SockmapError> {
    // No CO-RE relocations here: skipping the kernel BTF keeps aya from parsing several MiB of it (which
    // left the agent's RSS 16 MiB higher); the offsets the program needs come from our own small reader.
    let mut ebpf = aya::EbpfLoader::new()
        .btf(None)
        .override_global(splice::KERNEL_OFFSETS, &offsets, true)
        .load(OBJECT)?;
    let name = splice::VERDICT_PROGRAM;
    verdict(&mut ebpf)?.load().map_err(|source| SockmapError::Program { name, source })?;
    Ok(ebpf)
}

fn verdict(ebpf: &mut Ebpf) -> Result<&mut SkSkb, SockmapError> {
    let name = splice::VERDICT_PROGRAM;
    ebpf.program_mut(name)
        .ok_or(SockmapError::Program { name, source: aya::programs::ProgramError::NotLoaded })?
        .try_into()
        .map_err(|source| SockmapError::Program { name, source })
}

fn take_map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, SockmapError> {
    ebpf.take_map(name)
        .ok_or(SockmapError::MissingMap(name))?
        .try_into()
        .map_err(|source| SockmapError::Map { map: name, source })
}

impl Sockmap {
    /// Loads the embedded object and attaches the stream verdict to the socket map. With `pins`, first
    /// reclaims what a previous instance left there, then pins the maps and the program in it.
    pub fn load(pins: Option<PinDir>) -> Result<Self, SockmapError> {
        if let Some(p) = &pins {
            let reclaimed = p.prepare()?;
            if reclaimed > 0 {
                warn!(reclaimed, dir = %p.path().display(), "removed pins left by a previous agent");
            }
        }
        let offsets = kernel_offsets();
        let (mut ebpf, trims) = match load_object(offsets) {
            Ok(ebpf) => (ebpf, offsets != KernelOffsets::default()),
            // The trim reads kernel memory (bpf_probe_read_kernel), which needs CAP_PERFMON and a kernel
            // not locked down; with zero offsets the verifier never reaches that call.
            Err(error) if offsets != KernelOffsets::default() => {
                warn!(
                    %error,
                    "the verdict program did not load with sequence tracking; loading it without: bytes \
                     the kernel hands it twice reset the stream instead of being trimmed"
                );
                (load_object(KernelOffsets::default())?, false)
            }
            Err(error) => return Err(error),
        };
        let name = splice::VERDICT_PROGRAM;
        let perr = |source| SockmapError::Program { name, source };
        if let Some(p) = &pins {
            for map in [splice::SOCKS, splice::FLOWS, splice::CREDITS] {
                let path = p.path().join(map);
                ebpf.map(map)
                    .ok_or(SockmapError::MissingMap(map))?
                    .pin(&path)
                    .map_err(|e| SockmapError::Pin { path: path.clone(), source: io::Error::other(e) })?;
            }
        }
        let socks: SockHash<MapData, u64> = take_map(&mut ebpf, splice::SOCKS)?;
        let flows = take_map(&mut ebpf, splice::FLOWS)?;
        let credits = take_map(&mut ebpf, splice::CREDITS)?;
        let program = verdict(&mut ebpf)?;
        program.attach(socks.fd()).map_err(perr)?;
        if let Some(p) = &pins {
            let path = p.path().join(name);
            program
                .pin(&path)
                .map_err(|e| SockmapError::Pin { path: path.clone(), source: io::Error::other(e) })?;
        }
        let logs = forward_logs(&mut ebpf);
        Ok(Self {
            socks: Mutex::new(socks),
            flows: Mutex::new(flows),
            credits: Mutex::new(credits),
            pins,
            trims,
            logs,
            _ebpf: ebpf,
        })
    }

    /// Whether the program trims bytes the kernel hands it twice (it found the kernel's struct offsets).
    /// Without the trim such a stream is reset instead of delivered (DESIGN.md §5 j).
    #[must_use]
    pub fn trims(&self) -> bool {
        self.trims
    }

    /// The pin directory, if the maps are pinned.
    #[must_use]
    pub fn pins(&self) -> Option<&Path> {
        self.pins.as_ref().map(PinDir::path)
    }

    /// Splices `a` and `b`: from now on bytes arriving on either are sent out of the other by the kernel,
    /// while each direction has credit; `credit` bytes may be redirected before user space grants more.
    ///
    /// Both directions start with no credit, so whatever the kernel delivers while only one socket is in
    /// the map is passed to user space rather than redirected to a socket that is not there yet (which
    /// would drop it); the credit is granted once both are in. If `b` cannot go in after `a` did (it
    /// received FIN meanwhile), `a` stays in, passing everything: see [`PairError::half`].
    pub fn pair(&self, a: &TcpStream, b: &TcpStream, credit: u64) -> Result<Pair, PairError> {
        let nothing = |error| PairError { error: Box::new(error), half: None };
        let pair = Pair {
            a: socket2::SockRef::from(a).cookie().map_err(|e| nothing(e.into()))?,
            b: socket2::SockRef::from(b).cookie().map_err(|e| nothing(e.into()))?,
        };
        let prepared = (|| {
            let mut flows = self.flows.lock().expect("flows lock poisoned");
            let mut credits = self.credits.lock().expect("credits lock poisoned");
            for (src, dst) in [(pair.a, pair.b), (pair.b, pair.a)] {
                flows
                    .insert(src, Flow { peer_cookie: dst, ..Flow::default() }, 0)
                    .map_err(|source| SockmapError::Map { map: splice::FLOWS, source })?;
                credits
                    .insert(src, Credit::default(), 0)
                    .map_err(|source| SockmapError::Map { map: splice::CREDITS, source })?;
            }
            Ok(())
        })();
        let insert = |cookie: u64, fd| {
            self.socks
                .lock()
                .expect("socks lock poisoned")
                .insert(cookie, fd, 0)
                .map_err(|source| SockmapError::Map { map: splice::SOCKS, source })
        };
        if let Err(error) = prepared.and_then(|()| insert(pair.a, a.as_raw_fd())) {
            // Nothing was intercepted yet: removing the entries loses nothing.
            self.unpair(pair);
            return Err(nothing(error));
        }
        if let Err(error) = insert(pair.b, b.as_raw_fd()) {
            return Err(PairError { error: Box::new(error), half: Some(pair) });
        }
        for cookie in [pair.a, pair.b] {
            if let Err(error) = self.set_credit(cookie, Credit { allow: credit, written: 0 }) {
                // Both are in and pass everything: the caller copies the stream, as for a half pair.
                return Err(PairError { error: Box::new(error), half: Some(pair) });
            }
        }
        Ok(pair)
    }

    /// The state of the direction whose source socket is `cookie`, if it is paired.
    #[must_use]
    pub fn flow(&self, cookie: u64) -> Option<Flow> {
        self.flows.lock().expect("flows lock poisoned").get(&cookie, 0).ok()
    }

    /// The credit last granted to the direction whose source is `cookie`, if it is paired.
    #[must_use]
    pub fn credit(&self, cookie: u64) -> Option<Credit> {
        self.credits.lock().expect("credits lock poisoned").get(&cookie, 0).ok()
    }

    /// Grants the direction whose source is `cookie` a new credit.
    pub fn set_credit(&self, cookie: u64, credit: Credit) -> Result<(), SockmapError> {
        self.credits
            .lock()
            .expect("credits lock poisoned")
            .insert(cookie, credit, 0)
            .map_err(|source| SockmapError::Map { map: splice::CREDITS, source })
    }

    /// Bytes redirected out of each socket of `pair` so far: (a → b, b → a).
    #[must_use]
    pub fn redirected(&self, pair: Pair) -> (u64, u64) {
        let count = |c: u64| self.flow(c).map_or(0, |f| f.redirected);
        (count(pair.a), count(pair.b))
    }

    /// Removes `pair` from the maps; bytes still queued for redirection or not yet read are discarded by
    /// the kernel, so callers unpair only streams that ended in both directions (or are being aborted).
    pub fn unpair(&self, pair: Pair) {
        let mut socks = self.socks.lock().expect("socks lock poisoned");
        for cookie in [pair.a, pair.b] {
            let _ = socks.remove(&cookie);
        }
        drop(socks);
        let mut flows = self.flows.lock().expect("flows lock poisoned");
        let mut credits = self.credits.lock().expect("credits lock poisoned");
        for cookie in [pair.a, pair.b] {
            let _ = flows.remove(&cookie);
            let _ = credits.remove(&cookie);
        }
    }

    /// Entries in each map: (sockets, flows, credits). Every one should be 0 with no stream spliced.
    #[must_use]
    pub fn entries(&self) -> (usize, usize, usize) {
        let socks = self.socks.lock().expect("socks lock poisoned").keys().count();
        let flows = self.flows.lock().expect("flows lock poisoned").keys().count();
        let credits = self.credits.lock().expect("credits lock poisoned").keys().count();
        (socks, flows, credits)
    }
}

/// Starts forwarding the programs' aya-log records to the `log` facade (which the tracing subscriber
/// bridges), on the current tokio runtime; `None` without one or without the log map.
fn forward_logs(ebpf: &mut Ebpf) -> Option<tokio::task::AbortHandle> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(error) => {
            warn!(%error, "eBPF log records will not be shown");
            return None;
        }
    };
    // SAFETY: the logger owns its ring buffer's descriptor and never closes or replaces it while the
    // AsyncFd holds it.
    #[expect(unsafe_code, reason = "tokio requires the caller to vouch for the descriptor's lifetime")]
    let registered =
        unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut logger = match registered {
        Ok(fd) => fd,
        Err(error) => {
            warn!(%error, "eBPF log records will not be shown");
            return None;
        }
    };
    let task = runtime.spawn(async move {
        while let Ok(mut ready) = logger.readable_mut().await {
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    });
    Some(task.abort_handle())
}

impl Drop for Sockmap {
    fn drop(&mut self) {
        if let Some(logs) = &self.logs {
            logs.abort();
        }
        if let Some(p) = &self.pins
            && let Err(error) = p.remove()
        {
            warn!(%error, dir = %p.path().display(), "could not remove the pinned maps");
        }
    }
}

/// Entries in the maps pinned in `dir` by another process (for operators and tests): (sockets, flows,
/// credits).
pub fn pinned_entries(dir: &Path) -> Result<(usize, usize, usize), SockmapError> {
    fn open<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
        dir: &Path,
        name: &'static str,
    ) -> Result<T, SockmapError> {
        let err = |source| SockmapError::Map { map: name, source };
        let data = MapData::from_pin(dir.join(name)).map_err(err)?;
        aya::maps::Map::from_map_data(data).map_err(err)?.try_into().map_err(err)
    }
    let socks: SockHash<MapData, u64> = open(dir, splice::SOCKS)?;
    let flows: HashMap<MapData, u64, Flow> = open(dir, splice::FLOWS)?;
    let credits: HashMap<MapData, u64, Credit> = open(dir, splice::CREDITS)?;
    Ok((socks.keys().count(), flows.keys().count(), credits.keys().count()))
}
