//! Any bytes as the first bytes of a frontend connection and as a gRPC tunnel packet: sniffing never
//! panics and is decided once a prefix departs from the HTTP/2 preface (or the preface is complete);
//! decoding and reading a packet never panics, and a dial it accepts names a valid destination.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spoke::frontend::konnectivity::{self, Request};
use spoke::frontend::sniff::{self, H2_PREFACE, Protocol};
use spoke::frontend::MAX_HOST_LEN;

fuzz_target!(|data: &[u8]| {
    match sniff::classify(data) {
        None => assert!(data.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(data)),
        Some(Protocol::Http2) => assert!(data.starts_with(H2_PREFACE)),
        Some(Protocol::Http1) => assert!(!data.starts_with(H2_PREFACE) && !H2_PREFACE.starts_with(data)),
    }
    let Ok(packet) = konnectivity::decode_packet(data) else { return };
    if let Ok(Request::Dial { target, .. }) = konnectivity::read_packet(packet) {
        assert!(target.port != 0);
        assert!(!target.host.is_empty() && target.host.len() <= MAX_HOST_LEN);
        assert!(target.early_data.is_empty());
    }
});
