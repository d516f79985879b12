//! Rebuild the eBPF object when bpf-linker changes (the linker's version decides the object).
use which::which;

fn main() {
    // Building this crate for the host (its empty library) needs no linker; only record it when present.
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
