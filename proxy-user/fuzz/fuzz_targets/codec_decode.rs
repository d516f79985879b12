//! Any bytes as a frame body (type byte and payload): decoding never panics, and whatever decodes
//! encodes into a frame that decodes to the same message.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use spoke::codec;

fuzz_target!(|body: &[u8]| {
    let Ok(message) = codec::decode(Bytes::copy_from_slice(body)) else { return };
    let mut frame = BytesMut::new();
    codec::encode(&message, &mut frame).expect("a decoded message fits a frame");
    let again = codec::decode(frame.split_off(4).freeze()).expect("an encoded message decodes");
    assert_eq!(again, message);
});
