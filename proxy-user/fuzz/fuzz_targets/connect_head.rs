//! Any bytes as what a CONNECT client sent: parsing never panics, a request it accepts names a valid
//! destination, and that destination written back as a CONNECT parses to the same one.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use spoke::frontend::{self, MAX_HOST_LEN};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let Ok(Some(req)) = frontend::parse_connect(&mut buf) else { return };
    assert!(req.port != 0);
    assert!(!req.host.is_empty() && req.host.len() <= MAX_HOST_LEN);
    assert!(data.ends_with(&req.early_data), "early data is what followed the head");
    let mut again = BytesMut::from(format!("CONNECT {req} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes());
    let parsed = frontend::parse_connect(&mut again).expect("a written-back request parses").expect("complete");
    assert_eq!((parsed.host, parsed.port), (req.host, req.port));
});
