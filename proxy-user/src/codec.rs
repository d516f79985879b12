//! Framing of [`Message`]s: a 4-byte big-endian length, then the body (type byte and payload).
//!
//! Decoding never panics: every read is bounds-checked, lengths are capped by [`MAX_FRAME_LEN`],
//! [`MAX_STRING_LEN`] and [`MAX_LIST_LEN`], and trailing bytes are an error.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::{
    Identity, KeyBytes, MAX_FRAME_LEN, MAX_LIST_LEN, MAX_STRING_LEN, MAX_TOKEN_LEN, Message, Secret,
    SessionId, kind,
};

/// Why a frame could not be read, written or understood.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The connection failed or closed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection cleanly where a frame was due.
    #[error("connection closed")]
    Closed,
    /// The frame announced more than [`MAX_FRAME_LEN`] bytes (or nothing at all).
    #[error("frame length {0} out of range (1..={MAX_FRAME_LEN})")]
    FrameLength(usize),
    /// The type byte names no message.
    #[error("unknown frame type {0}")]
    UnknownKind(u8),
    /// The payload ended inside a field.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// A field holds a value it may not hold.
    #[error("invalid {0}")]
    Invalid(&'static str),
    /// A string or list is longer than allowed.
    #[error("{0} too long")]
    TooLong(&'static str),
    /// Bytes left over after the last field.
    #[error("{0} trailing bytes")]
    Trailing(usize),
    /// A message to send does not fit the limits.
    #[error("message does not fit: {0}")]
    Oversized(&'static str),
}

/// Result of this module.
pub type Result<T, E = CodecError> = std::result::Result<T, E>;

/// Appends `msg` as one frame to `out`; on error `out` is left as it was.
pub fn encode(msg: &Message, out: &mut BytesMut) -> Result<()> {
    let start = out.len();
    let result = encode_frame(msg, out, start);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn encode_frame(msg: &Message, out: &mut BytesMut, start: usize) -> Result<()> {
    out.put_u32(0);
    out.put_u8(msg.kind());
    match msg {
        Message::Hello { version, identity, token, held } => {
            out.put_u16(*version);
            put_str(out, &identity.agent_id)?;
            put_str(out, &identity.node_name)?;
            put_list(out, &identity.hostnames, |o, s| put_str(o, s))?;
            put_list(out, &identity.addresses, |o, a| {
                put_ip(o, *a);
                Ok(())
            })?;
            put_list(out, &identity.cidrs, |o, n| {
                put_ip(o, n.addr());
                o.put_u8(n.prefix_len());
                Ok(())
            })?;
            out.put_u8(u8::from(identity.default_route));
            put_text(out, token.expose(), MAX_TOKEN_LEN)?;
            put_list(out, held, |o, s| put_str(o, s))?;
        }
        Message::HelloAck {
            version,
            server_id,
            server_count,
            session_id,
            heartbeat_ms,
            data_addr,
            data_key,
        } => {
            out.put_u16(*version);
            put_str(out, server_id)?;
            out.put_u16(*server_count);
            out.put_u128(session_id.0);
            out.put_u32(*heartbeat_ms);
            put_str(out, data_addr)?;
            out.put_slice(&data_key.0);
        }
        Message::ServerCount { count } => out.put_u16(*count),
        Message::Ping { nonce } | Message::Pong { nonce } => out.put_u64(*nonce),
        Message::StreamEnd { stream_id, bytes } => {
            out.put_u64(*stream_id);
            out.put_u64(*bytes);
        }
        Message::StreamEndRead { stream_id } => out.put_u64(*stream_id),
        Message::Drain => {}
        Message::GoAway { reason } | Message::Moving { reason } | Message::Reject { reason } => {
            put_str(out, reason)?;
        }
        Message::DataHello { version, session_id } => {
            out.put_u16(*version);
            out.put_u128(session_id.0);
        }
        Message::Challenge { nonce } => out.put_slice(nonce),
        Message::DataProof { nonce, mac } => {
            out.put_slice(nonce);
            out.put_slice(mac);
        }
        Message::Dial { stream_id, host, port, timeout_ms, mac } => {
            out.put_u64(*stream_id);
            put_str(out, host)?;
            out.put_u16(*port);
            out.put_u32(*timeout_ms);
            out.put_slice(mac);
        }
        Message::DialReply { stream_id, status, message } => {
            out.put_u64(*stream_id);
            out.put_u8(*status as u8);
            put_str(out, message)?;
        }
    }
    let body = out.len() - start - 4;
    if body > MAX_FRAME_LEN {
        return Err(CodecError::Oversized("frame"));
    }
    let len = u32::try_from(body).expect("bounded by MAX_FRAME_LEN");
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Decodes one frame body (type byte and payload, without the length prefix).
pub fn decode(mut body: Bytes) -> Result<Message> {
    let b = &mut body;
    let msg = match get_u8(b, "type")? {
        kind::HELLO => {
            let version = get_u16(b, "version")?;
            let agent_id = get_str(b, "agent id")?;
            let node_name = get_str(b, "node name")?;
            let hostnames = get_list(b, "host names", |b| get_str(b, "host name"))?;
            let addresses = get_list(b, "addresses", get_ip)?;
            let cidrs = get_list(b, "cidrs", |b| {
                let addr = get_ip(b)?;
                let prefix = get_u8(b, "cidr prefix")?;
                IpNet::new(addr, prefix).map_err(|_| CodecError::Invalid("cidr prefix"))
            })?;
            let default_route = get_bool(b, "default route")?;
            let token = Secret(get_text(b, "token", MAX_TOKEN_LEN)?);
            let held = get_list(b, "held servers", |b| get_str(b, "server id"))?;
            Message::Hello {
                version,
                identity: Identity { agent_id, node_name, hostnames, addresses, cidrs, default_route },
                token,
                held,
            }
        }
        kind::HELLO_ACK => Message::HelloAck {
            version: get_u16(b, "version")?,
            server_id: get_str(b, "server id")?,
            server_count: get_u16(b, "server count")?,
            session_id: get_session_id(b)?,
            heartbeat_ms: get_u32(b, "heartbeat")?,
            data_addr: get_str(b, "data address")?,
            data_key: KeyBytes(get_array(b, "data key")?),
        },
        kind::SERVER_COUNT => Message::ServerCount { count: get_u16(b, "server count")? },
        kind::PING => Message::Ping { nonce: get_u64(b, "nonce")? },
        kind::STREAM_END => {
            Message::StreamEnd { stream_id: get_u64(b, "stream id")?, bytes: get_u64(b, "byte count")? }
        }
        kind::STREAM_END_READ => Message::StreamEndRead { stream_id: get_u64(b, "stream id")? },
        kind::PONG => Message::Pong { nonce: get_u64(b, "nonce")? },
        kind::DRAIN => Message::Drain,
        kind::GO_AWAY => Message::GoAway { reason: get_str(b, "reason")? },
        kind::MOVING => Message::Moving { reason: get_str(b, "reason")? },
        kind::REJECT => Message::Reject { reason: get_str(b, "reason")? },
        kind::DATA_HELLO => {
            Message::DataHello { version: get_u16(b, "version")?, session_id: get_session_id(b)? }
        }
        kind::CHALLENGE => Message::Challenge { nonce: get_array(b, "nonce")? },
        kind::DATA_PROOF => Message::DataProof { nonce: get_array(b, "nonce")?, mac: get_array(b, "mac")? },
        kind::DIAL => Message::Dial {
            stream_id: get_u64(b, "stream id")?,
            host: get_str(b, "host")?,
            port: get_u16(b, "port")?,
            timeout_ms: get_u32(b, "timeout")?,
            mac: get_array(b, "mac")?,
        },
        kind::DIAL_REPLY => Message::DialReply {
            stream_id: get_u64(b, "stream id")?,
            status: Message::dial_status(get_u8(b, "status")?).ok_or(CodecError::Invalid("dial status"))?,
            message: get_str(b, "message")?,
        },
        other => return Err(CodecError::UnknownKind(other)),
    };
    if b.has_remaining() {
        return Err(CodecError::Trailing(b.remaining()));
    }
    Ok(msg)
}

/// Reads exactly one frame from `r`, consuming nothing past it (raw stream bytes may follow on a data
/// connection). Not cancel-safe: drive it from one task and do not race it against a timer.
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> Result<Message> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(CodecError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME_LEN {
        return Err(CodecError::FrameLength(len));
    }
    let mut body = BytesMut::zeroed(len);
    r.read_exact(&mut body).await?;
    decode(body.freeze())
}

/// Reads frames from `r` on a task of its own and hands them over a channel of `capacity`, ending after
/// the first error; so that a session loop can wait for frames and timers at once. Frames are boxed: a
/// channel allocates its slots in blocks of 32, and a session idles with one.
pub fn spawn_reader<R>(
    mut r: R,
    capacity: usize,
) -> (tokio::task::JoinHandle<()>, tokio::sync::mpsc::Receiver<Result<Box<Message>>>)
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(capacity);
    let task = tokio::spawn(async move {
        loop {
            let msg = read_message(&mut r).await.map(Box::new);
            let stop = msg.is_err();
            if tx.send(msg).await.is_err() || stop {
                return;
            }
        }
    });
    (task, rx)
}

/// Writes one frame to `w` and flushes it.
pub async fn write_message<W: AsyncWrite + Unpin>(w: &mut W, msg: &Message) -> Result<()> {
    let mut buf = BytesMut::with_capacity(64);
    encode(msg, &mut buf)?;
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

fn put_str(out: &mut BytesMut, s: &str) -> Result<()> {
    put_text(out, s, MAX_STRING_LEN)
}

fn put_text(out: &mut BytesMut, s: &str, max: usize) -> Result<()> {
    if s.len() > max {
        return Err(CodecError::Oversized("string"));
    }
    out.put_u16(u16::try_from(s.len()).map_err(|_| CodecError::Oversized("string"))?);
    out.put_slice(s.as_bytes());
    Ok(())
}

fn put_list<T>(
    out: &mut BytesMut,
    items: &[T],
    mut put: impl FnMut(&mut BytesMut, &T) -> Result<()>,
) -> Result<()> {
    if items.len() > MAX_LIST_LEN {
        return Err(CodecError::Oversized("list"));
    }
    out.put_u16(u16::try_from(items.len()).expect("bounded by MAX_LIST_LEN"));
    items.iter().try_for_each(|item| put(out, item))
}

fn put_ip(out: &mut BytesMut, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            out.put_u8(4);
            out.put_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.put_u8(6);
            out.put_slice(&v6.octets());
        }
    }
}

fn need(b: &Bytes, n: usize, what: &'static str) -> Result<()> {
    if b.remaining() < n { Err(CodecError::Truncated(what)) } else { Ok(()) }
}

fn get_u8(b: &mut Bytes, what: &'static str) -> Result<u8> {
    need(b, 1, what)?;
    Ok(b.get_u8())
}

fn get_u16(b: &mut Bytes, what: &'static str) -> Result<u16> {
    need(b, 2, what)?;
    Ok(b.get_u16())
}

fn get_u32(b: &mut Bytes, what: &'static str) -> Result<u32> {
    need(b, 4, what)?;
    Ok(b.get_u32())
}

fn get_array<const N: usize>(b: &mut Bytes, what: &'static str) -> Result<[u8; N]> {
    need(b, N, what)?;
    let mut out = [0u8; N];
    b.copy_to_slice(&mut out);
    Ok(out)
}

fn get_session_id(b: &mut Bytes) -> Result<SessionId> {
    need(b, 16, "session id")?;
    Ok(SessionId(b.get_u128()))
}

fn get_u64(b: &mut Bytes, what: &'static str) -> Result<u64> {
    need(b, 8, what)?;
    Ok(b.get_u64())
}

fn get_bool(b: &mut Bytes, what: &'static str) -> Result<bool> {
    match get_u8(b, what)? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(CodecError::Invalid(what)),
    }
}

fn get_str(b: &mut Bytes, what: &'static str) -> Result<String> {
    get_text(b, what, MAX_STRING_LEN)
}

fn get_text(b: &mut Bytes, what: &'static str, max: usize) -> Result<String> {
    let len = usize::from(get_u16(b, what)?);
    if len > max {
        return Err(CodecError::TooLong(what));
    }
    need(b, len, what)?;
    let raw = b.split_to(len);
    String::from_utf8(raw.to_vec()).map_err(|_| CodecError::Invalid(what))
}

fn get_list<T>(
    b: &mut Bytes,
    what: &'static str,
    mut get: impl FnMut(&mut Bytes) -> Result<T>,
) -> Result<Vec<T>> {
    let n = usize::from(get_u16(b, what)?);
    if n > MAX_LIST_LEN {
        return Err(CodecError::TooLong(what));
    }
    // Every item takes at least one byte: do not reserve more than the frame could hold.
    let mut items = Vec::with_capacity(n.min(b.remaining()));
    for _ in 0..n {
        items.push(get(b)?);
    }
    Ok(items)
}

fn get_ip(b: &mut Bytes) -> Result<IpAddr> {
    match get_u8(b, "address family")? {
        4 => {
            need(b, 4, "ipv4 address")?;
            let mut o = [0u8; 4];
            b.copy_to_slice(&mut o);
            Ok(IpAddr::V4(Ipv4Addr::from(o)))
        }
        6 => {
            need(b, 16, "ipv6 address")?;
            let mut o = [0u8; 16];
            b.copy_to_slice(&mut o);
            Ok(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => Err(CodecError::Invalid("address family")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{DialStatus, PROTOCOL_VERSION};

    fn identity() -> Identity {
        Identity {
            agent_id: "node-a".into(),
            node_name: "node-a".into(),
            hostnames: vec!["node-a".into(), "node-a.cluster.local".into()],
            addresses: vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
            cidrs: vec!["10.244.1.0/24".parse().unwrap(), "fd00:244::/64".parse().unwrap()],
            default_route: true,
        }
    }

    fn every_message() -> Vec<Message> {
        vec![
            Message::Hello {
                version: PROTOCOL_VERSION,
                identity: identity(),
                token: Secret("header.claims.signature".into()),
                held: vec!["server-1".into()],
            },
            Message::HelloAck {
                version: PROTOCOL_VERSION,
                server_id: "server-0".into(),
                server_count: 3,
                session_id: SessionId(u128::MAX - 7),
                heartbeat_ms: 5000,
                data_addr: "10.0.0.1:8091".into(),
                data_key: KeyBytes([5; 32]),
            },
            Message::ServerCount { count: 4 },
            Message::Ping { nonce: 42 },
            Message::Pong { nonce: 42 },
            Message::StreamEnd { stream_id: 7, bytes: u64::MAX },
            Message::StreamEndRead { stream_id: 7 },
            Message::Drain,
            Message::GoAway { reason: "shutting down".into() },
            Message::Moving { reason: "successor started".into() },
            Message::DataHello { version: PROTOCOL_VERSION, session_id: SessionId(9) },
            Message::Challenge { nonce: [7; 16] },
            Message::DataProof { nonce: [8; 16], mac: [9; 32] },
            Message::Dial {
                stream_id: 1,
                host: "kubelet.example".into(),
                port: 10250,
                timeout_ms: 5000,
                mac: [3; 32],
            },
            Message::DialReply { stream_id: 1, status: DialStatus::Refused, message: "refused".into() },
            Message::DialReply { stream_id: 2, status: DialStatus::Ok, message: String::new() },
            Message::Reject { reason: "unsupported version 7".into() },
        ]
    }

    fn frame(msg: &Message) -> BytesMut {
        let mut buf = BytesMut::new();
        encode(msg, &mut buf).expect("encodes");
        buf
    }

    /// The fuzz target's seeds (`fuzz/seeds/codec_decode`) are frames of the current version: one per
    /// message type, each decoding to a message that encodes back to the same bytes.
    #[test]
    fn every_fuzz_seed_is_a_valid_frame_body() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/codec_decode");
        let mut kinds = std::collections::BTreeSet::new();
        for entry in std::fs::read_dir(&dir).expect("seed directory") {
            let path = entry.expect("seed entry").path();
            let body = Bytes::from(std::fs::read(&path).expect("read seed"));
            let msg = decode(body.clone()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let mut frame = BytesMut::new();
            encode(&msg, &mut frame).unwrap();
            assert_eq!(&frame[4..], &body[..], "{} encodes back to itself", path.display());
            kinds.insert(msg.kind());
        }
        let all: std::collections::BTreeSet<u8> = every_message().iter().map(Message::kind).collect();
        assert_eq!(kinds, all, "a seed for every message type");
    }

    #[test]
    fn every_message_round_trips() {
        for msg in every_message() {
            let buf = frame(&msg);
            let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
            assert_eq!(len, buf.len() - 4, "{msg:?}");
            assert_eq!(decode(buf.freeze().slice(4..)).expect("decodes"), msg);
        }
    }

    #[tokio::test]
    async fn read_message_stops_at_the_frame_end() {
        let mut wire = frame(&Message::Dial {
            stream_id: 3,
            host: "10.0.0.1".into(),
            port: 80,
            timeout_ms: 1,
            mac: [0; 32],
        });
        wire.extend_from_slice(b"raw stream bytes");
        let mut reader = &wire[..];
        let msg = read_message(&mut reader).await.expect("reads");
        assert!(matches!(msg, Message::Dial { stream_id: 3, .. }));
        assert_eq!(reader, b"raw stream bytes");
    }

    #[tokio::test]
    async fn read_message_rejects_bad_lengths_and_eof() {
        let mut zero: &[u8] = &[0, 0, 0, 0];
        assert!(matches!(read_message(&mut zero).await, Err(CodecError::FrameLength(0))));
        let huge = u32::try_from(MAX_FRAME_LEN + 1).unwrap().to_be_bytes();
        assert!(matches!(read_message(&mut &huge[..]).await, Err(CodecError::FrameLength(_))));
        let mut empty: &[u8] = &[];
        assert!(matches!(read_message(&mut empty).await, Err(CodecError::Closed)));
        let mut short: &[u8] = &[0, 0, 0, 9, kind::PING];
        assert!(matches!(read_message(&mut short).await, Err(CodecError::Io(_))));
    }

    #[test]
    fn malformed_bodies_are_errors() {
        let cases: &[(&[u8], &str)] = &[
            (&[], "truncated"),
            (&[200], "unknown"),
            (&[kind::PING, 0, 0], "truncated"),
            (&[kind::DRAIN, 0], "trailing"),
            (&[kind::DIAL_REPLY, 0, 0, 0, 0, 0, 0, 0, 1, 99, 0, 0], "invalid"),
            // a string announcing more bytes than the frame holds
            (&[kind::GO_AWAY, 0, 10, b'a'], "truncated"),
            // a string longer than MAX_STRING_LEN
            (&[kind::GO_AWAY, 0xff, 0xff], "too long"),
            // invalid UTF-8
            (&[kind::REJECT, 0, 2, 0xc3, 0x28], "invalid"),
        ];
        for (body, want) in cases {
            let err = decode(Bytes::copy_from_slice(body)).expect_err("must fail").to_string();
            assert!(err.contains(want), "{body:?}: {err}");
        }
    }

    #[test]
    fn bad_hello_fields_are_errors() {
        let hello = frame(&Message::Hello {
            version: 1,
            identity: identity(),
            token: Secret::default(),
            held: vec![],
        })
        .freeze()
        .slice(4..);
        // Every proper prefix of a valid body is truncated, never a panic.
        for cut in 0..hello.len() {
            assert!(decode(hello.slice(..cut)).is_err(), "prefix of {cut} bytes");
        }
        // A CIDR prefix longer than the address.
        let mut bad = BytesMut::new();
        bad.put_u8(kind::HELLO);
        bad.put_u16(1);
        bad.put_u16(0);
        bad.put_u16(0);
        bad.put_u16(0);
        bad.put_u16(0);
        bad.put_u16(1);
        bad.put_slice(&[4, 10, 0, 0, 0, 33]);
        bad.put_u8(0);
        bad.put_u16(0);
        bad.put_u16(0);
        assert!(matches!(decode(bad.freeze()), Err(CodecError::Invalid("cidr prefix"))));
    }

    #[test]
    fn a_token_never_shows_in_debug_output() {
        let hello = Message::Hello {
            version: 3,
            identity: identity(),
            token: Secret("s3cr3t.t0ken".into()),
            held: vec![],
        };
        let shown = format!("{hello:?}");
        assert!(!shown.contains("s3cr3t") && shown.contains("Secret(12 bytes)"), "{shown}");
        let long = Secret("t".repeat(MAX_TOKEN_LEN + 1));
        let mut buf = BytesMut::new();
        let too_long = Message::Hello { version: 3, identity: identity(), token: long, held: vec![] };
        assert!(matches!(encode(&too_long, &mut buf), Err(CodecError::Oversized(_))));
    }

    #[test]
    fn oversized_messages_are_refused_on_encode() {
        let long = "x".repeat(MAX_STRING_LEN + 1);
        let mut buf = BytesMut::new();
        assert!(encode(&Message::GoAway { reason: long }, &mut buf).is_err());
        let mut id = identity();
        id.hostnames = vec!["h".repeat(MAX_STRING_LEN); 20];
        assert!(matches!(
            encode(
                &Message::Hello { version: 1, identity: id, token: Secret::default(), held: vec![] },
                &mut buf
            ),
            Err(CodecError::Oversized("frame"))
        ));
        assert!(buf.is_empty(), "a refused frame leaves nothing behind");
    }

    /// Cheap fuzzing: random bodies and random mutations of valid frames decode or fail, never panic.
    #[test]
    fn random_and_mutated_bodies_never_panic() {
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        let valid: Vec<Bytes> = every_message().iter().map(|m| frame(m).freeze().slice(4..)).collect();
        for i in 0..50_000 {
            let body = if i % 2 == 0 {
                let len = rng.usize(0..64);
                Bytes::from((0..len).map(|_| rng.u8(..)).collect::<Vec<_>>())
            } else {
                let mut b = valid[rng.usize(..valid.len())].to_vec();
                for _ in 0..rng.usize(1..4) {
                    let at = rng.usize(..b.len());
                    b[at] = rng.u8(..);
                }
                Bytes::from(b)
            };
            if let Ok(msg) = decode(body.clone()) {
                // Whatever decodes re-encodes to the same bytes.
                assert_eq!(frame(&msg).freeze().slice(4..), body);
            }
        }
    }
}
