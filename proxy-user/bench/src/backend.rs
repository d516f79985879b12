//! The benchmark backend: one listener serving every scenario. After a tunnel opens, the client sends a
//! 9-byte header, `mode: u8` then `arg: u64` (big-endian), which picks what the backend does:
//!
//! | mode | does |
//! |---|---|
//! | `E` | echo every byte until the client's FIN, then FIN |
//! | `S` | sink: read to the client's FIN, then answer the byte count (`u64`) and close |
//! | `G` | generate: send `arg` bytes, then FIN, then wait for the client's FIN |
//! | `H` | hold: read nothing for `arg` milliseconds (a stalled reader), then close |

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Header length: mode and argument.
pub const HEADER_LEN: usize = 9;
/// Echo.
pub const ECHO: u8 = b'E';
/// Sink and count.
pub const SINK: u8 = b'S';
/// Generate `arg` bytes.
pub const GENERATE: u8 = b'G';
/// Hold without reading for `arg` ms.
pub const HOLD: u8 = b'H';
/// Longest hold a client may ask for.
pub const MAX_HOLD: Duration = Duration::from_mins(10);
/// Chunk size of sink and generate.
const CHUNK: usize = 256 * 1024;

/// Encodes a header.
#[must_use]
pub fn header(mode: u8, arg: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = mode;
    h[1..].copy_from_slice(&arg.to_be_bytes());
    h
}

/// Serves `listener` forever.
pub async fn serve(listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(async move {
                    if let Err(error) = handle(stream).await {
                        tracing::debug!(%error, "backend connection failed");
                    }
                });
            }
            Err(error) => {
                tracing::warn!(%error, "backend accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).await?;
    let arg = u64::from_be_bytes(h[1..].try_into().expect("8 bytes"));
    match h[0] {
        ECHO => {
            let (mut r, mut w) = s.split();
            tokio::io::copy(&mut r, &mut w).await?;
            w.shutdown().await
        }
        SINK => {
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            s.write_all(&total.to_be_bytes()).await?;
            s.shutdown().await
        }
        GENERATE => {
            let buf = vec![0x5a_u8; CHUNK];
            let mut left = arg;
            while left > 0 {
                let n = usize::try_from(left.min(CHUNK as u64)).expect("bounded by CHUNK");
                s.write_all(&buf[..n]).await?;
                left -= n as u64;
            }
            s.shutdown().await?;
            let mut sink = [0u8; 64];
            while s.read(&mut sink).await? > 0 {}
            Ok(())
        }
        HOLD => {
            tokio::time::sleep(Duration::from_millis(arg).min(MAX_HOLD)).await;
            Ok(())
        }
        other => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("unknown mode {other}"))),
    }
}
