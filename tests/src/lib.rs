//! Helpers of the privileged tests: who may run them, and network namespaces that clean up after
//! themselves.
#![forbid(unsafe_code)]

use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Whether this process runs as root (effective uid 0).
#[must_use]
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2))
                .map(|e| e == "0")
        })
        .unwrap_or(false)
}

/// Whether a privileged test can run here. Outside CI a test without root is skipped with a note on
/// stderr; under `CI=true` (CI runs as root) it fails instead, so nothing is silently skipped there.
#[must_use]
pub fn privileged(what: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{what} needs root, and CI must run it");
    eprintln!("skipping {what}: needs root (CAP_BPF, CAP_NET_ADMIN); run `sudo cargo xtask test`");
    false
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip (package iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Runs `tc args`, inside `netns` when given.
fn tc(netns: Option<&str>, args: &[&str]) {
    let mut c = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "tc"]);
            c
        }
        None => Command::new("tc"),
    };
    let out = c.args(args).output().expect("run tc (package iproute2)");
    assert!(out.status.success(), "tc {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// The nftables table of a namespace's link faults ([`Netns::silence`], [`Netns::lossy`]).
const FAULTS: &str = "spoke_faults";

/// Distinguishes namespaces, links and subnets of tests running at once.
static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace linked to the caller's by a veth pair: `host_addr` on this side, `ns_addr`
/// inside, in a /30 of the benchmarking range 198.18.0.0/15, which stays inside this machine. Deleted
/// (with the veth pair) on drop.
pub struct Netns {
    /// Namespace name (for `ip netns exec`).
    pub name: String,
    /// Address of the veth end in the caller's namespace.
    pub host_addr: std::net::Ipv4Addr,
    /// Address of the veth end inside the namespace.
    pub ns_addr: std::net::Ipv4Addr,
    /// The veth end inside the namespace.
    ns_if: String,
    /// The veth end in the caller's namespace.
    host_if: String,
}

impl Netns {
    /// Creates the namespace, the veth pair and their addresses, and brings every link up.
    #[must_use]
    pub fn new() -> Self {
        let n = (std::process::id() % 64) * 64 + NEXT.fetch_add(1, Ordering::Relaxed) % 64;
        let name = format!("spoke-test-{}-{n}", std::process::id());
        let (third, fourth) =
            (u8::try_from(n / 64).expect("< 64"), u8::try_from((n % 64) * 4).expect("< 256"));
        let host_addr = std::net::Ipv4Addr::new(198, 18, third, fourth + 1);
        let ns_addr = std::net::Ipv4Addr::new(198, 18, third, fourth + 2);
        let (host_if, ns_if) = (format!("spk{n}h"), format!("spk{n}n"));
        ip(&["netns", "add", &name]);
        let ns = Self { name, host_addr, ns_addr, ns_if: ns_if.clone(), host_if: host_if.clone() };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &ns_if, "netns", &ns.name]);
        ip(&["addr", "add", &format!("{host_addr}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&["-n", &ns.name, "addr", "add", &format!("{ns_addr}/30"), "dev", &ns_if]);
        ip(&["-n", &ns.name, "link", "set", &ns_if, "up"]);
        ns
    }

    /// Binds a TCP listener inside the namespace (a socket stays in the namespace it was made in, so
    /// the caller can serve it from anywhere).
    #[must_use]
    pub fn bind(&self, addr: SocketAddr) -> TcpListener {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).expect("open the namespace");
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("enter the namespace");
                TcpListener::bind(addr).expect("bind inside the namespace")
            })
            .join()
            .expect("bind thread")
        })
    }
}

impl Netns {
    /// Makes the link silent: every packet in or out of the namespace's veth end is dropped, with no
    /// RST or ICMP, as a cut cable or a black-holing middlebox does (nftables, since this kernel has
    /// no netem). [`Netns::restore`] ends it.
    pub fn silence(&self) {
        self.drop_packets("drop");
    }

    /// Makes the link lossy: each packet in or out of the namespace's veth end is dropped with
    /// probability `percent`/100, independently (nftables' `numgen random`; this kernel has no netem, so
    /// neither delay nor reordering). [`Netns::restore`] ends it.
    pub fn lossy(&self, percent: u8) {
        assert!(percent < 100, "a loss rate below 100 %");
        self.drop_packets(&format!("numgen random mod 100 < {percent} drop"));
    }

    /// Puts one TCP segment in each packet on the link (`gso_max_segs 1` on both ends) as a physical
    /// link carries them, so that a dropped packet costs one segment, not a 64 KiB offload burst. Takes
    /// effect for connections made afterwards.
    pub fn wire_sized_packets(&self) {
        ip(&["link", "set", "dev", &self.host_if, "gso_max_segs", "1"]);
        ip(&["-n", &self.name, "link", "set", "dev", &self.ns_if, "gso_max_segs", "1"]);
    }

    /// Applies `verdict` to every packet in and out of the namespace's veth end.
    fn drop_packets(&self, verdict: &str) {
        let rules = format!(
            "table inet {FAULTS} {{\n chain in {{ type filter hook input priority 0; iifname \"{0}\" {verdict}; }}\n \
             chain out {{ type filter hook output priority 0; oifname \"{0}\" {verdict}; }}\n}}\n",
            self.ns_if
        );
        let path = std::env::temp_dir().join(format!("{}-faults.nft", self.name));
        std::fs::write(&path, rules).expect("write the nftables rules");
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f"])
            .arg(&path)
            .output()
            .expect("run nft (package nftables)");
        let _ = std::fs::remove_file(&path);
        assert!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Takes the link down (as a pulled cable or a failed switch port): the veth end on this side goes
    /// down, so both ends lose carrier and their subnet route until [`Netns::link_up`].
    pub fn link_down(&self) {
        ip(&["link", "set", &self.host_if, "down"]);
    }

    /// Brings the link back after [`Netns::link_down`].
    pub fn link_up(&self) {
        ip(&["link", "set", &self.host_if, "up"]);
    }

    /// TCP segments retransmitted by sockets inside the namespace (`RetransSegs` of its
    /// `/proc/net/snmp`): proof that a fault on the link was felt.
    #[must_use]
    pub fn tcp_retransmits(&self) -> u64 {
        self.counter("/proc/net/snmp", "Tcp:", "RetransSegs")
    }

    /// A TCP extension counter of the namespace (`TcpExt` of its `/proc/net/netstat`), such as
    /// `TCPOFOQueue` (segments that arrived out of order and waited for a gap to fill).
    #[must_use]
    pub fn tcp_ext(&self, name: &str) -> u64 {
        self.counter("/proc/net/netstat", "TcpExt:", name)
    }

    /// The counter `name` of the `prefix` table in `file` (a header line of names, then a line of
    /// values), as the namespace sees it.
    fn counter(&self, file: &str, prefix: &str, name: &str) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "cat", file])
            .output()
            .expect("run ip netns exec");
        assert!(out.status.success(), "read {file}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        let mut table = text.lines().filter(|l| l.starts_with(prefix)).map(|l| l.split_whitespace());
        let (names, values) = (table.next().expect("header line"), table.next().expect("values line"));
        names
            .zip(values)
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {file}"))
    }

    /// Puts netem on the link, `spec` as tc-netem(8) takes it (`delay 50ms 20ms loss 5%`), on both
    /// veth ends, so each direction gets it once. Delay with jitter reorders packets (netem sends each
    /// at its own drawn time). Needs a kernel with `sch_netem`: this machine's has none, so `cargo
    /// xtask test` runs the tests that use it in a Debian guest kernel. [`Netns::netem_clear`] ends it.
    pub fn netem(&self, spec: &str) {
        let spec: Vec<&str> = spec.split_whitespace().collect();
        for (netns, dev) in [(None, &self.host_if), (Some(self.name.as_str()), &self.ns_if)] {
            tc(netns, &[&["qdisc", "replace", "dev", dev, "root", "netem"], &spec[..]].concat());
        }
    }

    /// Takes netem off both ends of the link.
    pub fn netem_clear(&self) {
        for (netns, dev) in [(None, &self.host_if), (Some(self.name.as_str()), &self.ns_if)] {
            tc(netns, &["qdisc", "del", "dev", dev, "root"]);
        }
    }

    /// Lets packets through the link again.
    pub fn restore(&self) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "delete", "table", "inet", FAULTS])
            .output()
            .expect("run nft (package nftables)");
        assert!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Removes an agent's pin directory (its pinned eBPF maps) when dropped, however the test ends: the
/// fixtures kill agents, and a killed agent leaves its pins behind (the next agent of that node name
/// would reclaim them).
pub struct RemovePins(pub std::path::PathBuf);

impl Drop for RemovePins {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.0) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
            let _ = std::fs::remove_dir(&self.0);
        }
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, which deletes the pair.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

pub mod cgroup;
pub mod kube;
pub mod kubelet;
pub mod spoke;
