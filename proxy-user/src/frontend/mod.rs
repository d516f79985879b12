//! The frontends spoken by kube-apiserver's egress selector: HTTP CONNECT (`proxyProtocol: HTTPConnect`,
//! here) and Konnectivity's gRPC tunnel (`proxyProtocol: GRPC`, [`konnectivity`]), told apart on one
//! socket by their first bytes ([`sniff`]).
//!
//! The apiserver sends exactly `CONNECT host:port HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`, needs a `200`
//! back, and fails if any byte follows the response head; so the success reply is the bare status line
//! and blank line, written only once the node side is connected. Every other well-formed CONNECT is
//! accepted as well; anything else gets an error status with a short plain-text reason.

use std::fmt;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub mod authority;
pub mod grpc_client;
pub mod konnectivity;
pub mod sniff;

/// Largest request head accepted (request line and headers); beyond it the answer is 431.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most header fields accepted in one request; beyond it the answer is 431.
pub const MAX_HEADERS: usize = 32;
/// Longest destination host name accepted (DNS's limit).
pub const MAX_HOST_LEN: usize = 253;

/// The exact success reply. Nothing else may be written before the stream's own bytes.
pub const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection Established\r\n\r\n";

/// A parsed CONNECT request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectRequest {
    /// Destination host: an IP address (IPv6 without brackets) or a host name.
    pub host: String,
    /// Destination port.
    pub port: u16,
    /// Bytes the client sent after the request head; they belong to the stream.
    pub early_data: Bytes,
}

impl fmt::Display for ConnectRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Why a request was refused before any dial; each maps to an HTTP status.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// Not HTTP, or a CONNECT whose target is not `host:port`.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// A method other than CONNECT.
    #[error("method {0} not allowed, only CONNECT")]
    Method(String),
    /// The head exceeded [`MAX_HEAD_BYTES`] or [`MAX_HEADERS`].
    #[error("request header fields too large")]
    TooLarge,
    /// The client closed the connection before finishing the head.
    #[error("client closed before the request was complete")]
    Closed,
    /// Reading failed.
    #[error("read request: {0}")]
    Io(String),
}

impl RequestError {
    /// HTTP status answering this error; `None` when the client is gone and nothing can be answered.
    #[must_use]
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Malformed(_) => Some(400),
            Self::Method(_) => Some(405),
            Self::TooLarge => Some(431),
            Self::Closed | Self::Io(_) => None,
        }
    }

    /// Metric label of this error.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::Method(_) => "method",
            Self::TooLarge => "header_too_large",
            Self::Closed => "client_closed",
            Self::Io(_) => "client_error",
        }
    }
}

/// Reads one request head from `stream`, after the bytes already read into `buf`, and parses it as
/// CONNECT. The caller bounds the time it takes.
pub async fn read_connect<S: AsyncRead + Unpin>(
    stream: &mut S,
    mut buf: BytesMut,
) -> Result<ConnectRequest, RequestError> {
    if !buf.is_empty()
        && let Some(req) = parse_connect(&mut buf)?
    {
        return Ok(req);
    }
    loop {
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(RequestError::TooLarge);
        }
        // Never read past the head limit, so one read cannot grow the buffer beyond it.
        let room = MAX_HEAD_BYTES - buf.len();
        let n = (&mut *stream)
            .take(room as u64)
            .read_buf(&mut buf)
            .await
            .map_err(|e| RequestError::Io(e.to_string()))?;
        if n == 0 {
            return Err(RequestError::Closed);
        }
        if let Some(req) = parse_connect(&mut buf)? {
            return Ok(req);
        }
    }
}

/// Parses a complete head from `buf`; `Ok(None)` when more bytes are needed.
pub fn parse_connect(buf: &mut BytesMut) -> Result<Option<ConnectRequest>, RequestError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(RequestError::TooLarge),
        Err(e) => return Err(RequestError::Malformed(e.to_string())),
    };
    let method = req.method.expect("complete request has a method");
    if method != "CONNECT" {
        return Err(RequestError::Method(method.chars().take(16).collect()));
    }
    let (host, port) = parse_authority(req.path.expect("complete request has a path"))?;
    // A copy, not a view: a view would keep the whole read buffer alive for the stream's life (a
    // thousand bytes per held stream), and there is rarely anything after the head.
    let early_data = Bytes::copy_from_slice(&buf[head_len..]);
    Ok(Some(ConnectRequest { host, port, early_data }))
}

/// Splits a CONNECT target (`host:port`, `[v6]:port`) and checks both parts; the host comes back in
/// lower case.
pub fn parse_authority(target: &str) -> Result<(String, u16), RequestError> {
    let bad = |why: &str| RequestError::Malformed(format!("CONNECT target {target:?}: {why}"));
    let (host, port) = if let Some(rest) = target.strip_prefix('[') {
        let (v6, port) = rest.split_once("]:").ok_or_else(|| bad("expected [address]:port"))?;
        v6.parse::<std::net::Ipv6Addr>().map_err(|_| bad("invalid IPv6 address"))?;
        (v6, port)
    } else {
        target.rsplit_once(':').ok_or_else(|| bad("expected host:port"))?
    };
    let port: u16 = port.parse().map_err(|_| bad("invalid port"))?;
    if port == 0 {
        return Err(bad("port 0"));
    }
    if host.is_empty() || host.len() > MAX_HOST_LEN {
        return Err(bad("host length"));
    }
    let valid_name = host.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-' || c == b'_');
    if !valid_name && host.parse::<std::net::IpAddr>().is_err() {
        return Err(bad("invalid host"));
    }
    Ok((host.to_ascii_lowercase(), port))
}

/// Writes an error reply with a short plain-text body, then flushes. The connection closes after it.
pub async fn write_error<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    reason: &str,
) -> std::io::Result<()> {
    let phrase = reason_phrase(status);
    let body = format!("{reason}\n");
    let head = format!(
        "HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.flush().await
}

/// Standard reason phrase of the statuses Spoke sends.
#[must_use]
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "Connection Established",
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<ConnectRequest>, RequestError> {
        parse_connect(&mut BytesMut::from(raw))
    }

    #[test]
    fn accepts_what_the_apiserver_sends() {
        let req = parse(b"CONNECT 127.0.0.2:10250 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap().unwrap();
        assert_eq!((req.host.as_str(), req.port), ("127.0.0.2", 10250));
        assert!(req.early_data.is_empty());
    }

    #[test]
    fn accepts_other_well_formed_connects() {
        let req = parse(b"CONNECT [fd00::1]:443 HTTP/1.1\r\n\r\nearly").unwrap().unwrap();
        assert_eq!((req.host.as_str(), req.port, &req.early_data[..]), ("fd00::1", 443, &b"early"[..]));
        assert_eq!(req.to_string(), "[fd00::1]:443");
        let req = parse(
            b"CONNECT Node-A.example:10250 HTTP/1.0\r\nUser-Agent: x\r\nProxy-Authorization: y\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(req.host, "node-a.example");
    }

    #[test]
    fn partial_heads_wait_for_more() {
        assert_eq!(parse(b"CONNECT 10.0.0.1:80 HTTP/1.1\r\nHost: x\r\n"), Ok(None));
    }

    #[test]
    fn refuses_bad_requests_with_the_right_status() {
        let cases: &[(&[u8], u16)] = &[
            (b"GET / HTTP/1.1\r\n\r\n", 405),
            (b"CONNECT 10.0.0.1 HTTP/1.1\r\n\r\n", 400),
            (b"CONNECT 10.0.0.1:0 HTTP/1.1\r\n\r\n", 400),
            (b"CONNECT 10.0.0.1:99999 HTTP/1.1\r\n\r\n", 400),
            (b"CONNECT :80 HTTP/1.1\r\n\r\n", 400),
            (b"CONNECT [zz::1]:80 HTTP/1.1\r\n\r\n", 400),
            (b"CONNECT a/b:80 HTTP/1.1\r\n\r\n", 400),
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
        ];
        for (raw, status) in cases {
            let err = parse(raw).expect_err(&String::from_utf8_lossy(raw));
            assert_eq!(err.status(), Some(*status), "{}: {err}", String::from_utf8_lossy(raw));
        }
        let mut many = b"CONNECT 10.0.0.1:80 HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse(&many), Err(RequestError::TooLarge));
    }

    #[tokio::test]
    async fn oversized_and_truncated_heads() {
        let mut huge = b"CONNECT 10.0.0.1:80 HTTP/1.1\r\nX-Big: ".to_vec();
        huge.resize(MAX_HEAD_BYTES + 100, b'a');
        assert_eq!(read_connect(&mut &huge[..], BytesMut::new()).await, Err(RequestError::TooLarge));
        assert_eq!(
            read_connect(&mut &b"CONNECT 10.0.0.1:80 HTTP/1.1\r\n"[..], BytesMut::new()).await,
            Err(RequestError::Closed)
        );
        let ok = read_connect(&mut &b"CONNECT 10.0.0.1:80 HTTP/1.1\r\n\r\nxyz"[..], BytesMut::new())
            .await
            .unwrap();
        assert_eq!(&ok.early_data[..], b"xyz");
        // The bytes the protocol sniffer read count, whether they hold the whole head or part of it.
        let whole = BytesMut::from(&b"CONNECT 10.0.0.1:80 HTTP/1.1\r\n\r\n"[..]);
        assert_eq!(read_connect(&mut &b""[..], whole).await.unwrap().port, 80);
        let part = BytesMut::from(&b"CONN"[..]);
        assert_eq!(read_connect(&mut &b"ECT 10.0.0.1:81 HTTP/1.1\r\n\r\n"[..], part).await.unwrap().port, 81);
    }

    #[tokio::test]
    async fn error_replies_are_complete_http_responses() {
        let mut out = Vec::new();
        write_error(&mut out, 503, "no agent serves 10.0.0.9").await.unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nno agent serves 10.0.0.9\n"), "{text}");
        assert!(text.contains("Content-Length: 25\r\n"), "{text}");
    }
}
