//! Records that are not application data, as kernel TLS hands them over (`recvmsg`, a record type and
//! possibly part of a record at a time): any types and pieces never panic, every message returned is
//! whole and bounded, and a refused input stays refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spoke::transport::ktls::{Control, ControlRecords};

/// The longest message `ControlRecords` assembles (its `MAX_CONTROL`).
const MAX_CONTROL: usize = 16 * 1024;

fuzz_target!(|input: &[u8]| {
    let mut records = ControlRecords::default();
    let mut rest = input;
    // Each piece: a record type, a length byte, then that many bytes (fewer at the end).
    while let [typ, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (piece, more) = tail.split_at(n);
        match records.take(*typ, piece) {
            Ok(done) => {
                for control in done {
                    if let Control::Ticket(body) = control {
                        assert!(body.len() <= MAX_CONTROL, "a ticket of {} bytes", body.len());
                    }
                }
            }
            Err(_) => return,
        }
        rest = more;
    }
});
