//! Installs what building and testing Spoke needs on a fresh machine, idempotently, saying what it does:
//! the nightly toolchain's `rust-src` (for `-Z build-std=core`) and `clippy` (for the eBPF crate's lint),
//! `bpf-linker` built against the nightly toolchain's own LLVM (DESIGN.md §6), `cargo-fuzz` for the
//! fuzz targets, and the Debian packages the tests use.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{cmd, run};

/// bpf-linker release known to work with aya 0.14 and the nightly toolchain's LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// cargo-fuzz release the fuzz targets are run with.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Debian packages the tests and `run` need: `ip` (network namespaces), `nft` (links made silent in the
/// fault tests) and `curl` (the demo command).
const DEBIAN_PACKAGES: &[(&str, &str)] = &[("iproute2", "ip"), ("nftables", "nft"), ("curl", "curl")];

fn say(msg: &str) {
    eprintln!("[bootstrap] {msg}");
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program).args(args).output().is_ok_and(|o| o.status.success())
}

pub(crate) fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("run {program}"))?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

fn home() -> anyhow::Result<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from).context("HOME is not set")
}

/// Components the nightly toolchain needs beyond its minimal profile.
const NIGHTLY_COMPONENTS: &[&str] = &["rust-src", "clippy"];

/// What building and running Spoke needs, in order.
pub fn all() -> anyhow::Result<()> {
    nightly_components()?;
    bpf_linker()?;
    debian_packages()?;
    Ok(())
}

/// What testing needs: [`all`], and `cargo-fuzz`.
pub fn for_tests() -> anyhow::Result<()> {
    all()?;
    cargo_fuzz()
}

fn cargo_fuzz() -> anyhow::Result<()> {
    if succeeds("cargo", &["fuzz", "--version"]) {
        return Ok(());
    }
    say(&format!("installing cargo-fuzz {CARGO_FUZZ_VERSION} from crates.io; about a minute"));
    run(cmd("cargo", &["install", "cargo-fuzz", "--version", CARGO_FUZZ_VERSION, "--locked"]))
}

fn nightly_components() -> anyhow::Result<()> {
    if !succeeds("rustc", &["+nightly", "--version"]) {
        say("installing the nightly toolchain (minimal profile)");
        run(cmd("rustup", &["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let installed = output("rustup", &["component", "list", "--toolchain", "nightly", "--installed"])?;
    for component in NIGHTLY_COMPONENTS {
        if !installed.lines().any(|l| l.starts_with(component)) {
            say(&format!("adding {component} to the nightly toolchain"));
            run(cmd("rustup", &["component", "add", component, "--toolchain", "nightly"]))?;
        }
    }
    Ok(())
}

/// The nightly toolchain's LLVM library and its major version.
fn nightly_llvm() -> anyhow::Result<(PathBuf, u32)> {
    let sysroot = PathBuf::from(output("rustc", &["+nightly", "--print", "sysroot"])?);
    let lib = sysroot.join("lib");
    for entry in std::fs::read_dir(&lib).with_context(|| format!("read {}", lib.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        // libLLVM.so.22.1-rust-1.97.0-nightly
        if let Some(rest) = name.strip_prefix("libLLVM.so.")
            && name.contains("-rust-")
            && let Some(major) = rest.split('.').next().and_then(|m| m.parse().ok())
        {
            return Ok((lib.join(&name), major));
        }
    }
    bail!("no libLLVM.so.*-rust-* in {}", lib.display())
}

fn bpf_linker() -> anyhow::Result<()> {
    if succeeds("bpf-linker", &["--version"]) {
        return Ok(());
    }
    let (llvm, major) = nightly_llvm()?;
    // bpf-linker keeps an rpath to this directory: it must outlive `cargo clean`.
    let prefix = home()?.join(".local/share/spoke/llvm");
    let lib_dir = prefix.join("lib");
    std::fs::create_dir_all(&lib_dir).with_context(|| format!("create {}", lib_dir.display()))?;
    // `libLLVM.so` for the build; the library's own file name for the loader, which looks up the
    // soname through bpf-linker's rpath when it runs outside rustup's environment.
    let soname = llvm.file_name().context("LLVM library file name")?;
    for name in [std::ffi::OsStr::new("libLLVM.so"), soname] {
        let link = lib_dir.join(name);
        if std::fs::symlink_metadata(&link).is_ok() {
            std::fs::remove_file(&link).with_context(|| format!("replace {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&llvm, &link).with_context(|| format!("link {}", link.display()))?;
    }
    if succeeds("bpf-linker", &["--version"]) {
        say("bpf-linker runs again now that its LLVM library is linked");
        return Ok(());
    }
    say(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against the nightly toolchain's LLVM {major} ({}); about a minute",
        llvm.display()
    ));
    let mut install = cmd(
        "cargo",
        &[
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ],
    );
    install.env("LLVM_PREFIX", &prefix);
    run(install)?;
    if !succeeds("bpf-linker", &["--version"]) {
        bail!("bpf-linker was installed but does not run; is ~/.cargo/bin on PATH?");
    }
    Ok(())
}

fn debian_packages() -> anyhow::Result<()> {
    ensure_packages(DEBIAN_PACKAGES)
}

/// Installs the Debian `(package, program)` pairs whose program is not on the PATH.
pub(crate) fn ensure_packages(packages: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> =
        packages.iter().filter(|(_, program)| !on_path(program)).map(|(package, _)| *package).collect();
    if missing.is_empty() {
        return Ok(());
    }
    say(&format!("installing Debian packages: {}", missing.join(" ")));
    apt_install(&missing)
}

/// `apt-get update` then `apt-get install` of `packages`, non-interactively.
pub(crate) fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    let mut update = cmd("apt-get", &["update", "-q"]);
    update.env("DEBIAN_FRONTEND", "noninteractive");
    run(update)?;
    let mut install = cmd("apt-get", &["install", "-y", "-q", "--no-install-recommends"]);
    install.args(packages).env("DEBIAN_FRONTEND", "noninteractive");
    run(install)
}

/// Whether `program` is an executable on PATH.
pub(crate) fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| is_executable(&dir.join(program))))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
