//! Generates the Konnectivity gRPC service and messages from `proto/konnectivity.proto` (with protox, a
//! protobuf compiler in Rust, so no system `protoc` is needed), and builds the eBPF programs in `proxy-ebpf` for `bpfel-unknown-none` (nightly, rust-src, bpf-linker) and
//! leaves the object in `OUT_DIR` for `include_bytes_aligned!`. `AYA_BUILD_SKIP=1` skips it.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    konnectivity_proto()?;
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

/// `ProxyService` (server and client) and `Packet` into `OUT_DIR/_.rs` (the proto has no package).
fn konnectivity_proto() -> anyhow::Result<()> {
    let proto = "proto/konnectivity.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"]).context("compile proto/konnectivity.proto")?;
    tonic_prost_build::configure()
        .build_transport(false)
        // DATA payloads as `Bytes`: decoded without a copy out of the receive buffer.
        .bytes(".")
        .compile_fds(fds)
        .context("generate the Konnectivity gRPC code")
}
