//! Empty host-side library, so that `proxy-user` can depend on this package and cargo rebuilds the
//! eBPF object whenever these sources change. The programs live in `main.rs`, built for BPF only.
#![no_std]
