//! A TLS data connection's stream ends by byte count (`transport/counted.rs`): the peer's count comes
//! on the control channel, the stream's bytes unframed on the connection. Any chunking of the bytes,
//! any point at which the count arrives, any read sizes, and any count (the right one, or a wrong one
//! from a buggy or hostile peer): the reader never hands out a byte past the count, never hangs, ends
//! cleanly only when it read exactly the count, and leaves the bytes past it on the connection.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use spoke::transport::counted::{Counted, Ends, Side};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
    })
}

fuzz_target!(|input: &[u8]| {
    // The announced count, then pieces: a length byte and that many bytes of the stream; a length of
    // 0 announces the count at that point. Read sizes cycle through the pieces' lengths.
    let [c0, c1, rest @ ..] = input else { return };
    let count = u64::from(u16::from_be_bytes([*c0, *c1]));
    let mut pieces: Vec<&[u8]> = Vec::new();
    let mut announce_at = None;
    let mut tail = rest;
    while let [len, more @ ..] = tail {
        if *len == 0 {
            announce_at.get_or_insert(pieces.len());
            tail = more;
            continue;
        }
        let n = usize::from(*len).min(more.len());
        if n == 0 {
            break;
        }
        pieces.push(&more[..n]);
        tail = &more[n..];
    }
    let written: Vec<u8> = pieces.concat();
    let read_sizes: Vec<usize> = pieces.iter().map(|p| p.len()).chain([4096]).collect();
    runtime().block_on(async {
        let (mine, mut peer) = UnixStream::pair().expect("socket pair");
        let (ends, _frames) = Ends::new();
        let mut reader = Counted::new(mine, ends.register(1, Side::Agent).expect("registered"));
        let announce = announce_at.unwrap_or(pieces.len());
        let writer = async {
            for (i, piece) in pieces.iter().enumerate() {
                if i == announce {
                    ends.told_end(1, count);
                }
                peer.write_all(piece).await.expect("write");
                tokio::task::yield_now().await;
            }
            if announce >= pieces.len() {
                ends.told_end(1, count);
            }
            // Bytes of a next stream, then the end of the connection.
            peer.write_all(b"next").await.expect("write");
            peer.shutdown().await.expect("shutdown");
        };
        // Reads the stream, then drains the connection (the writer's pieces past the count go on
        // arriving, and a full socket would stall it).
        let consumer = async move {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 4096];
            let mut clean = false;
            for size in read_sizes.iter().cycle() {
                match reader.read(&mut buf[..*size]).await {
                    Ok(0) => {
                        clean = true;
                        break;
                    }
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(_) => break,
                }
            }
            let mut rest = Vec::new();
            let _ = reader.into_inner().read_to_end(&mut rest).await;
            (got, clean, rest)
        };
        let ((), (got, clean, rest)) =
            tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(writer, consumer) })
                .await
                .expect("the counted reader hung");
        let count = usize::try_from(count).expect("16 bits");
        let stream_and_next: Vec<u8> = [&written[..], b"next"].concat();
        // Whatever the count, no byte is handed out twice or out of order.
        assert_eq!(got[..], stream_and_next[..got.len()]);
        if clean {
            // A clean end is the count, exactly, and what lies past it is still on the connection.
            assert_eq!(got.len(), count, "a clean end after {} of {count} bytes", got.len());
            assert_eq!(rest[..], stream_and_next[count..]);
        }
    });
});
