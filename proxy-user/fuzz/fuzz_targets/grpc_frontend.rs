//! Any bytes as the first bytes of a frontend connection, as a gRPC tunnel packet, and as the HTTP/2
//! frames after the preface: sniffing never panics and is decided once a prefix departs from the
//! HTTP/2 preface (or the preface is complete); decoding and reading a packet never panics, and a dial
//! it accepts names a valid destination; the `:authority` fix never panics, and every header block it
//! hands on decodes, in order, with a fresh HPACK decoder (as hyper's) to fields whose `:authority` is
//! a URI authority.
#![no_main]

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use spoke::frontend::authority::FixAuthority;
use spoke::frontend::konnectivity::{self, Request};
use spoke::frontend::sniff::{self, H2_PREFACE, Protocol};
use spoke::frontend::MAX_HOST_LEN;
use tokio::io::{AsyncRead, ReadBuf};

/// The header list size the fix is given, as the server's.
const MAX_LIST: usize = 16 * 1024;

fuzz_target!(|data: &[u8]| {
    match sniff::classify(data) {
        None => assert!(data.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(data)),
        Some(Protocol::Http2) => assert!(data.starts_with(H2_PREFACE)),
        Some(Protocol::Http1) => assert!(!data.starts_with(H2_PREFACE) && !H2_PREFACE.starts_with(data)),
    }
    if let Ok(packet) = konnectivity::decode_packet(data) {
        if let Ok(Request::Dial { target, .. }) = konnectivity::read_packet(packet) {
            assert!(target.port != 0);
            assert!(!target.host.is_empty() && target.host.len() <= MAX_HOST_LEN);
            assert!(target.early_data.is_empty());
        }
    }
    fix_authority(data);
});

fn fix_authority(frames: &[u8]) {
    let wire = [H2_PREFACE, frames].concat();
    let mut fix = FixAuthority::new(BytesMut::new(), &wire[..], MAX_LIST);
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    let mut chunk = [0u8; 1000];
    // Read to the end, or to the error that ends the connection; what came before is checked.
    loop {
        let mut buf = ReadBuf::new(&mut chunk);
        match Pin::new(&mut fix).poll_read(&mut cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => break,
            Poll::Ready(Ok(())) => out.extend_from_slice(buf.filled()),
            Poll::Ready(Err(_)) => break,
            Poll::Pending => unreachable!("a slice is always ready"),
        }
    }
    assert!(out.starts_with(H2_PREFACE));
    let mut decoder = loona_hpack::Decoder::new();
    let mut rest = &out[H2_PREFACE.len()..];
    let mut block = Vec::new();
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let (kind, flags) = (rest[3], rest[4]);
        let Some(payload) = rest.get(9..9 + len) else { break };
        if kind == 0x1 || kind == 0x9 {
            // What the fix writes: never padded, priority only on HEADERS.
            assert_eq!(flags & 0x8, 0);
            let skip = if kind == 0x1 && flags & 0x20 != 0 { 5 } else { 0 };
            block.extend_from_slice(&payload[skip..]);
            if flags & 0x4 != 0 {
                let fields = decoder.decode(&block).expect("a re-encoded block decodes");
                let list: usize = fields.iter().map(|(n, v)| n.len() + v.len() + 32).sum();
                assert!(list <= MAX_LIST);
                for (name, value) in fields {
                    if name == b":authority" {
                        assert!(http::uri::Authority::try_from(&value[..]).is_ok());
                    }
                }
                block.clear();
            }
        }
        rest = &rest[9 + len..];
    }
}
