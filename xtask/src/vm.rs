//! `cargo xtask vm`: one of Debian's own kernels booted under qemu software emulation, running a
//! command with this machine's root file system read-only, the workspace visible at its own path and
//! only loopback networking. Kernel TLS is tested here: the development and CI machines run a kernel
//! without it, and without KVM.
//!
//! The kernel comes from its Debian package (`apt-get download`, never installed): the newest
//! `linux-image-6.1.0-N-amd64` (Debian 12's kernel) or `linux-image-6.12.N+deb12-amd64`. A small
//! busybox initramfs loads the modules the guest needs, mounts the host root over virtio-9p and runs
//! the command in a chroot of it; PID 1 stays in the initramfs so that the kernel's own module requests
//! find busybox's modprobe. Kernel, initramfs and package are cached under `target/vm/`.
//! ../shared/experiments/ktls-vm-probe is where the recipe was first tried (DESIGN.md §8).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

use crate::{bootstrap, run, target_dir};

/// The kernels `cargo xtask test` boots: Debian 12's own and its 6.12 backport.
pub const KERNELS: &[&str] = &["6.1", "6.12"];

/// Debian packages the harness runs, as `(package, program)`.
const PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "qemu-system-x86_64"),
    ("busybox-static", "busybox"),
    ("cpio", "cpio"),
    ("xz-utils", "xz"),
];

/// Modules the guest needs, loaded at boot after their dependencies: virtio-9p for the host root, and
/// veth pairs and netem for the fault tests whose links delay and reorder (this machine's kernel has
/// no netem).
const BASE_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "veth", "sch_netem"];
/// Kernel TLS with the cipher Spoke hands it (ChaCha20-Poly1305), preloaded because the kernel's own
/// requests for crypto modules are best effort here. Names a kernel builds in, or lacks, are skipped.
const TLS_MODULES: &[&str] =
    &["tls", "chacha20poly1305", "chacha_x86_64", "chacha_generic", "poly1305_x86_64", "poly1305_generic"];

/// How long `cargo xtask test` lets one guest run.
pub const TIMEOUT: Duration = Duration::from_mins(20);

/// The marker the guest prints with the command's exit status.
const EXIT_MARKER: &str = "@@SPOKE_VM_EXIT=";

/// `cargo xtask vm` options.
#[derive(Debug, clap::Args)]
pub struct VmOpts {
    /// Kernel: a series (6.1, 6.12) for the newest Debian package of it, or a release (6.1.0-57-amd64).
    #[arg(long, default_value = "6.12")]
    pub kernel: String,
    /// Leave the tls module out of the guest, as on a node whose kernel lacks it.
    #[arg(long)]
    pub without_tls: bool,
    /// Seconds before the guest is stopped.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// Names of environment variables passed into the guest.
    #[arg(long = "env", value_name = "NAME")]
    pub env: Vec<String>,
    /// The command, run in the current directory.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// A kernel and its initramfs, ready to boot.
#[derive(Debug)]
pub struct Guest {
    /// The kernel release (`uname -r` inside).
    pub release: String,
    vmlinuz: PathBuf,
    initrd: PathBuf,
}

fn say(msg: &str) {
    eprintln!("[xtask vm] {msg}");
}

fn cache() -> PathBuf {
    target_dir().join("vm")
}

/// `cargo xtask vm`.
pub fn main(opts: &VmOpts) -> anyhow::Result<()> {
    let guest = prepare(&opts.kernel, !opts.without_tls)?;
    let env: Vec<(String, String)> =
        opts.env.iter().filter_map(|n| std::env::var(n).ok().map(|v| (n.clone(), v))).collect();
    let cwd = std::env::current_dir()?;
    let (code, _) = guest.run(&cwd, &opts.command, &env, Duration::from_secs(opts.timeout))?;
    std::process::exit(code);
}

/// Finds (downloading once) the kernel package and builds (once) its initramfs.
pub fn prepare(kernel: &str, with_tls: bool) -> anyhow::Result<Guest> {
    bootstrap::ensure_packages(PACKAGES)?;
    let deb = package(kernel)?;
    let release = release_of(&deb)?;
    let dir = cache().join("kernels").join(&release);
    let modules: Vec<&str> =
        BASE_MODULES.iter().chain(if with_tls { TLS_MODULES } else { &[] }).copied().collect();
    let initrd = dir.join(format!("initramfs-{}.cpio.gz", key(&modules)));
    let vmlinuz = dir.join("vmlinuz");
    if !initrd.is_file() || !vmlinuz.is_file() {
        say(&format!("building kernel {release} and an initramfs from {} (once)", deb.display()));
        build(&deb, &release, &dir, &modules, &initrd)?;
    }
    Ok(Guest { release, vmlinuz, initrd })
}

/// A name for an initramfs of `modules` with this init script.
fn key(modules: &[&str]) -> String {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::hash::DefaultHasher::new();
    (INIT, modules).hash(&mut h);
    format!("{:016x}", h.finish())
}

/// The newest package of `kernel` (a series or a release): cached, or downloaded with apt-get.
fn package(kernel: &str) -> anyhow::Result<PathBuf> {
    let debs = cache().join("debs");
    std::fs::create_dir_all(&debs)?;
    let cached = newest(
        kernel,
        std::fs::read_dir(&debs)?.filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            Some(name.split('_').next()?.to_owned())
        }),
    );
    let name = if let Some(name) = cached {
        name
    } else {
        let known = || -> anyhow::Result<Option<String>> {
            let out = bootstrap::output("apt-cache", &["search", "--names-only", "^linux-image-6"])?;
            Ok(newest(kernel, out.lines().filter_map(|l| l.split(' ').next().map(str::to_owned))))
        };
        let name = if let Some(n) = known()? {
            n
        } else {
            let mut update = Command::new("apt-get");
            update.args(["update", "-q"]);
            run(update)?;
            known()?.with_context(|| format!("no Debian package of kernel {kernel}"))?
        };
        say(&format!("downloading {name} (apt-get download, not installed)"));
        let mut c = Command::new("apt-get");
        c.args(["download", "-q", &name]).current_dir(&debs);
        run(c)?;
        name
    };
    let prefix = format!("{name}_");
    let found = std::fs::read_dir(&debs)?.filter_map(|e| e.ok().map(|e| e.path())).find(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&prefix) && Path::new(n).extension().is_some_and(|e| e == "deb"))
    });
    found.with_context(|| format!("{name}: no .deb in {}", debs.display()))
}

/// The newest of `names` that is a plain amd64 kernel image of `kernel`.
fn newest(kernel: &str, names: impl Iterator<Item = String>) -> Option<String> {
    let number = |name: &str| -> Option<u32> {
        let release = name.strip_prefix("linux-image-")?;
        if release == kernel {
            return Some(u32::MAX);
        }
        let middle = match kernel {
            "6.1" => release.strip_prefix("6.1.0-")?.strip_suffix("-amd64")?,
            "6.12" => release.strip_prefix("6.12.")?.strip_suffix("+deb12-amd64")?,
            _ => return None,
        };
        middle.parse().ok()
    };
    names.filter_map(|n| number(&n).map(|k| (k, n))).max().map(|(_, n)| n)
}

/// The kernel release a package holds: its name without `linux-image-`.
fn release_of(deb: &Path) -> anyhow::Result<String> {
    let out = Command::new("dpkg-deb").args(["-f"]).arg(deb).arg("Package").output()?;
    ensure!(out.status.success(), "{} is not a readable .deb", deb.display());
    let name = String::from_utf8(out.stdout)?.trim().to_owned();
    name.strip_prefix("linux-image-")
        .map(str::to_owned)
        .with_context(|| format!("{name} is not a kernel image"))
}

/// PID 1 of the guest. Stays in the initramfs (so the kernel's module requests find busybox's
/// modprobe) and runs the command in a chroot of the host root.
const INIT: &str = r#"#!/bin/sh
export PATH=/bin:/sbin
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
fail() { echo "spoke-vm: $*"; echo "@@SPOKE_VM_EXIT=125@@"; poweroff -f; }
while read -r m; do
    [ -d "/sys/module/$m" ] && continue
    insmod "/lib/modules/$(uname -r)/extra/$m.ko" || echo "spoke-vm: insmod $m failed"
done < /etc/spoke-vm/modules
ip link set lo up || fail "ip link set lo up"
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose host /mnt || fail "host root over 9p"
mount -t proc proc /mnt/proc && mount -t sysfs sysfs /mnt/sys && mount -t devtmpfs devtmpfs /mnt/dev || fail "proc, sys, dev"
mkdir -p /mnt/dev/pts /mnt/dev/shm; mount -t devpts devpts /mnt/dev/pts; mount -t tmpfs tmpfs /mnt/dev/shm
mount -t tmpfs -o mode=1777 tmpfs /mnt/tmp && mount -t tmpfs -o mode=755 tmpfs /mnt/run || fail "tmpfs"
work=$(cat /etc/spoke-vm/work)
case $work in /tmp/*|/run/*)
    mkdir -p "/mnt$work" && mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose work "/mnt$work" ||
        fail "workspace over 9p" ;;
esac
echo "spoke-vm: kernel $(uname -r), command at $(cut -d' ' -f1 /proc/uptime)s"
chroot /mnt /bin/sh -c "$(cat /etc/spoke-vm/cmd)"
rc=$?
echo "spoke-vm: command exited $rc at $(cut -d' ' -f1 /proc/uptime)s"
echo "@@SPOKE_VM_EXIT=$rc@@"
poweroff -f
"#;

/// Extracts the package, gathers `modules` with their dependencies, and packs busybox, the modules and
/// [`INIT`] into `initrd`.
fn build(deb: &Path, release: &str, dir: &Path, modules: &[&str], initrd: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let work = dir.join("build");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("deb"))?;
    let mut extract = Command::new("dpkg-deb");
    extract.arg("-x").arg(deb).arg(work.join("deb"));
    run(extract)?;
    let boot = work.join("deb/boot");
    let mut mdir = work.join("deb/lib/modules").join(release);
    if !mdir.is_dir() {
        mdir = work.join("deb/usr/lib/modules").join(release);
    }
    ensure!(mdir.is_dir(), "{}: no modules for {release}", deb.display());
    let mut files = BTreeMap::new();
    walk(&mdir, &mut |p| {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if let Some(stem) = name.split(".ko").next().filter(|_| name.contains(".ko")) {
            files.insert(stem.replace('-', "_"), p.to_path_buf());
        }
    })?;
    let builtin: BTreeSet<String> = std::fs::read_to_string(mdir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next()?.split(".ko").next().map(|n| n.replace('-', "_")))
        .collect();

    let ir = work.join("ir");
    let extra = ir.join("lib/modules").join(release).join("extra");
    for d in ["bin", "sbin", "dev", "proc", "sys", "mnt", "etc/spoke-vm"] {
        std::fs::create_dir_all(ir.join(d))?;
    }
    std::fs::create_dir_all(&extra)?;
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for m in modules {
        let required = BASE_MODULES.contains(m) || *m == "tls";
        gather(m, required, &files, &builtin, &extra, &mut seen, &mut order)?;
    }
    say(&format!("{release}: modules loaded at boot: {}", order.join(" ")));
    std::fs::write(ir.join("etc/spoke-vm/modules"), order.join("\n") + "\n")?;

    let busybox = which("busybox")?;
    std::fs::copy(&busybox, ir.join("bin/busybox"))?;
    let applets = Command::new(&busybox).arg("--list").output()?;
    for a in String::from_utf8(applets.stdout)?.lines().filter(|a| *a != "busybox") {
        let _ = std::os::unix::fs::symlink("busybox", ir.join("bin").join(a));
    }
    for a in ["modprobe", "insmod", "depmod", "poweroff", "ip", "chroot"] {
        let _ = std::os::unix::fs::symlink("../bin/busybox", ir.join("sbin").join(a));
    }
    // So that the kernel's own module requests (busybox modprobe) find what is here.
    let mut depmod = Command::new(&busybox);
    depmod.arg("depmod").arg("-b").arg(&ir).arg(release);
    let _ = depmod.status();
    std::fs::write(ir.join("init"), INIT)?;
    std::fs::set_permissions(ir.join("init"), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let packed = work.join("initrd");
    pack(&ir, &packed)?;
    std::fs::copy(boot.join(format!("vmlinuz-{release}")), dir.join("vmlinuz"))
        .with_context(|| format!("{}: no boot/vmlinuz-{release}", deb.display()))?;
    std::fs::rename(&packed, initrd)?;
    std::fs::remove_dir_all(&work)?;
    Ok(())
}

/// Copies module `name` (decompressed) and, first, what it depends on.
fn gather(
    name: &str,
    required: bool,
    files: &BTreeMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    extra: &Path,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<String>,
) -> anyhow::Result<()> {
    let name = name.replace('-', "_");
    if !seen.insert(name.clone()) || builtin.contains(&name) {
        return Ok(());
    }
    let Some(file) = files.get(&name) else {
        ensure!(!required, "module {name} is neither built in nor shipped");
        return Ok(());
    };
    let program = match file.extension().and_then(|e| e.to_str()) {
        Some("xz") => Some(("xz", "-dc")),
        Some("zst") => Some(("zstd", "-qdc")),
        Some("gz") => Some(("gzip", "-dc")),
        _ => None,
    };
    let bytes = match program {
        Some((p, flag)) => {
            let out = Command::new(p)
                .arg(flag)
                .arg(file)
                .output()
                .with_context(|| format!("{p} {}", file.display()))?;
            ensure!(out.status.success(), "{p} {} failed", file.display());
            out.stdout
        }
        None => std::fs::read(file)?,
    };
    let depends = bytes
        .windows(8)
        .position(|w| w == b"depends=")
        .map(|i| {
            let rest = &bytes[i + 8..];
            String::from_utf8_lossy(&rest[..rest.iter().position(|b| *b == 0).unwrap_or(0)]).into_owned()
        })
        .unwrap_or_default();
    std::fs::write(extra.join(format!("{name}.ko")), &bytes)?;
    for d in depends.split(',').filter(|d| !d.is_empty()) {
        gather(d, true, files, builtin, extra, seen, order)?;
    }
    order.push(name);
    Ok(())
}

fn walk(dir: &Path, f: &mut impl FnMut(&Path)) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() { walk(&path, f)? } else { f(&path) }
    }
    Ok(())
}

fn which(program: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program} not on PATH"))
}

/// A gzipped newc cpio archive of `dir`, owned by root.
fn pack(dir: &Path, out: &Path) -> anyhow::Result<()> {
    let script = "find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -1";
    let file = std::fs::File::create(out)?;
    let status = Command::new("sh").args(["-c", script]).current_dir(dir).stdout(file).status()?;
    ensure!(status.success(), "packing {} failed", dir.display());
    Ok(())
}

/// POSIX shell single quoting.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Guest {
    /// Boots the guest and runs `command` in `cwd` with `env`: its exit status, and what it printed
    /// (also shown as it comes).
    pub fn run(
        &self,
        cwd: &Path,
        command: &[String],
        env: &[(String, String)],
        timeout: Duration,
    ) -> anyhow::Result<(i32, Vec<String>)> {
        let scratch = tempfile::tempdir()?;
        let etc = scratch.path().join("ir/etc/spoke-vm");
        std::fs::create_dir_all(&etc)?;
        let mut script = String::from(
            "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8\n",
        );
        for (k, v) in env {
            let _ = writeln!(script, "export {k}={}", quote(v));
        }
        let _ = write!(script, "cd {} || exit 125\nexec", quote(&cwd.to_string_lossy()));
        for a in command {
            let _ = write!(script, " {}", quote(a));
        }
        script.push('\n');
        std::fs::write(etc.join("cmd"), script)?;
        let work = crate::root();
        std::fs::write(etc.join("work"), work.to_string_lossy().as_bytes())?;
        let cmd_cpio = scratch.path().join("cmd.cpio.gz");
        pack(&scratch.path().join("ir"), &cmd_cpio)?;
        // The kernel unpacks concatenated archives in turn.
        let initrd = scratch.path().join("initrd");
        let mut joined = std::fs::read(&self.initrd)?;
        joined.extend(std::fs::read(&cmd_cpio)?);
        std::fs::write(&initrd, joined)?;

        say(&format!("booting {} (qemu, software emulation) to run: {}", self.release, command.join(" ")));
        let started = Instant::now();
        let share = |path: &Path, tag: &str| {
            format!(
                "local,path={},mount_tag={tag},security_model=none,readonly=on,multidevs=remap",
                path.display()
            )
        };
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-nodefaults", "-no-user-config", "-no-reboot", "-accel", "tcg", "-cpu", "max"])
            .args(["-m", "2G", "-smp", "2", "-display", "none", "-vga", "none", "-serial", "stdio"])
            .arg("-kernel")
            .arg(&self.vmlinuz)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=3"])
            .args(["-virtfs", &share(Path::new("/"), "host"), "-virtfs", &share(&work, "work")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("start qemu-system-x86_64")?;
        let out = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        let console = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let line = line.trim_end_matches('\r').to_owned();
                if let Some(code) = line.strip_prefix(EXIT_MARKER).and_then(|r| r.strip_suffix("@@")) {
                    let _ = tx.send(code.parse::<i32>().unwrap_or(125));
                } else {
                    eprintln!("  | {line}");
                    lines.push(line);
                }
            }
            lines
        });
        let code = rx.recv_timeout(timeout);
        let _ = child.kill();
        let _ = child.wait();
        let console = console.join().unwrap_or_default();
        let secs = started.elapsed().as_secs_f64();
        match code {
            Ok(code) => {
                say(&format!("{}: exited {code} after {secs:.1} s", self.release));
                Ok((code, console))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("{}: no exit within {timeout:?}; guest stopped", self.release)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!(
                    "{}: the guest ended without an exit status after {secs:.1} s (boot failure?)",
                    self.release
                )
            }
        }
    }
}
