//! Which frontend protocol a connection speaks, told from its first bytes, so that one socket serves
//! both: an HTTP/2 client (the gRPC tunnel) opens with the fixed connection preface of RFC 9113 §3.4;
//! anything else is read as an HTTP/1.1 request head (CONNECT).

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt as _};

use super::RequestError;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Most bytes one read takes while sniffing: everything read is handed on to the protocol's parser.
const SNIFF_READ: u64 = 1024;

/// The protocol a frontend connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/2: the gRPC tunnel (`ProxyService`).
    Http2,
    /// Anything else, read as an HTTP/1.1 request head: CONNECT, or an error reply.
    Http1,
}

impl Protocol {
    /// The `frontend_protocol` metric label of the service this protocol carries.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Http2 => "grpc",
            Self::Http1 => "http-connect",
        }
    }
}

/// The protocol of a connection whose first bytes are `first`; `None` while they are still a proper
/// prefix of the HTTP/2 preface (including none at all), so more must be read.
#[must_use]
pub fn classify(first: &[u8]) -> Option<Protocol> {
    let n = first.len().min(H2_PREFACE.len());
    if first[..n] != H2_PREFACE[..n] {
        Some(Protocol::Http1)
    } else if n == H2_PREFACE.len() {
        Some(Protocol::Http2)
    } else {
        None
    }
}

/// Reads from `stream` into `buf` until the protocol is known. Everything read stays in `buf`, for the
/// protocol's own reader ([`FixAuthority`](super::authority::FixAuthority) for HTTP/2, `read_connect`
/// for CONNECT). The caller bounds the
/// time it takes.
pub async fn sniff<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<Protocol, RequestError> {
    loop {
        if let Some(protocol) = classify(buf) {
            return Ok(protocol);
        }
        let n = (&mut *stream)
            .take(SNIFF_READ)
            .read_buf(buf)
            .await
            .map_err(|e| RequestError::Io(e.to_string()))?;
        if n == 0 {
            return Err(RequestError::Closed);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use bytes::Bytes;

    use super::*;

    #[test]
    fn the_preface_is_http2_and_anything_else_http1() {
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(&[H2_PREFACE, b"\0\0\x12\x04"].concat()), Some(Protocol::Http2));
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"PRI * HTTP/2"), None);
        assert_eq!(classify(b"CONNECT 10.0.0.1:80 HTTP/1.1\r\n"), Some(Protocol::Http1));
        // Methods sharing the preface's first letters are told apart as soon as they differ.
        assert_eq!(classify(b"PUT"), Some(Protocol::Http1));
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"\x16\x03\x01"), Some(Protocol::Http1));
    }

    #[tokio::test]
    async fn sniffed_bytes_are_kept() {
        let wire = [H2_PREFACE, b"frames"].concat();
        let mut buf = BytesMut::new();
        // One byte a read: the sniffer waits for the whole preface, and reads no further.
        let mut slow = tokio_test_reader(&wire);
        assert_eq!(sniff(&mut slow, &mut buf).await.unwrap(), Protocol::Http2);
        assert_eq!(&buf[..], H2_PREFACE);
        let mut rest = Vec::new();
        slow.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"frames");

        let mut buf = BytesMut::new();
        assert_eq!(sniff(&mut &b""[..], &mut buf).await, Err(RequestError::Closed));
        assert_eq!(sniff(&mut &b"PRI * HT"[..], &mut buf).await, Err(RequestError::Closed));
    }

    /// A reader handing out one byte a read.
    fn tokio_test_reader(data: &[u8]) -> impl AsyncRead + Unpin {
        let chunks: Vec<io::Result<Vec<u8>>> = data.iter().map(|b| Ok(vec![*b])).collect();
        tokio_util::io::StreamReader::new(futures_util::stream::iter(
            chunks.into_iter().map(|c| c.map(Bytes::from)),
        ))
    }
}
