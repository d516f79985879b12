//! Builds the eBPF programs in `proxy-ebpf` for `bpfel-unknown-none` (nightly, rust-src, bpf-linker) and
//! leaves the object in `OUT_DIR` for `include_bytes_aligned!`. `AYA_BUILD_SKIP=1` skips it.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    // aya-build forwards every stderr line of the inner cargo as a `cargo:warning`, which cargo then
    // replays on every build. A quiet inner cargo prints only real warnings and errors.
    // SAFETY: nothing else runs in this process yet; the variable is read by the child cargo only.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../proxy-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package { name: "proxy-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
    .context(
        "build the eBPF programs (run `cargo xtask test` or `cargo xtask run` once to install the toolchain)",
    )
}
