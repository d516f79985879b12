//! kube-apiserver's gRPC client names the Unix socket's path as the request's `:authority` (grpc-go
//! dialing a passthrough target), and the h2 crate refuses such a request as a malformed URI authority
//! (hyperium/h2#442) before any service sees it; Konnectivity's own server (grpc-go) ignores the value.
//!
//! [`FixAuthority`] sits between a gRPC client's bytes and hyper. Every frame passes unchanged except
//! header blocks (a HEADERS frame and its CONTINUATIONs): those are decoded with the connection's HPACK
//! context (RFC 7541), an `:authority` that is not a URI authority becomes [`PLACEHOLDER_AUTHORITY`],
//! and the fields are encoded again, with an encoder whose dynamic table mirrors hyper's decoder. Bytes
//! from the server to the client pass untouched. The HPACK codec is the `loona-hpack` crate's (h2's
//! own is private). Its cost is measured: it builds a Huffman table for every Huffman-coded string, about
//! a quarter of the server's CPU per gRPC tunnel (docs/benchmarks.md); `httlib-hpack`, table-driven and
//! faster, was tried and dropped because the `grpc_frontend` fuzz target made its integer decoder
//! panic on overflow within seconds (seed `authority-hpack-integer-overflow`).

use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use loona_hpack::{Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::debug;

use super::sniff::H2_PREFACE;

/// What an invalid `:authority` is replaced with.
pub const PLACEHOLDER_AUTHORITY: &[u8] = b"localhost";
/// Largest compressed header block taken (a HEADERS frame and its CONTINUATIONs together).
pub const MAX_BLOCK_BYTES: usize = 32 * 1024;
/// HTTP/2 frame header length (RFC 9113 §4.1).
const FRAME_HEADER: usize = 9;
/// Largest frame payload written: the initial `SETTINGS_MAX_FRAME_SIZE`, which every peer accepts.
const MAX_FRAME_PAYLOAD: usize = 16 * 1024;
/// The HPACK dynamic table's size: the protocol default, which hyper's server does not change, so the
/// client's encoder may use up to this much.
const HEADER_TABLE_SIZE: usize = 4096;
/// Most bytes one read of the client takes while looking for the next frame header; payload beyond it
/// is read straight into hyper's buffer.
const READ_CHUNK: usize = 4 * 1024;

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Priority fields of a HEADERS frame with the PRIORITY flag: stream dependency and weight.
const PRIORITY_FIELDS: usize = 5;
/// Per-field overhead of the header list size (RFC 9113 §6.5.2).
const FIELD_OVERHEAD: usize = 32;

/// A header block that cannot be passed on; the connection ends with it (an HTTP/2 connection error).
#[derive(Debug, thiserror::Error)]
pub enum HeaderBlockError {
    /// The compressed block is over [`MAX_BLOCK_BYTES`].
    #[error("header block over {MAX_BLOCK_BYTES} bytes")]
    TooLarge,
    /// The decoded header list is over the size the server accepts.
    #[error("header list over {0} bytes")]
    ListTooLarge(usize),
    /// Another frame came between a HEADERS frame and its last CONTINUATION.
    #[error("frame of type {0:#x} inside a header block")]
    Interrupted(u8),
    /// A CONTINUATION frame outside a header block.
    #[error("CONTINUATION frame without a header block")]
    StrayContinuation,
    /// The HEADERS frame's padding or priority fields do not fit its payload.
    #[error("HEADERS frame too short for its padding or priority fields")]
    Malformed,
    /// The block is not valid HPACK.
    #[error("HPACK: {0:?}")]
    Hpack(loona_hpack::decoder::DecoderError),
}

/// The header block being gathered: its HEADERS frame's fields and the fragments so far.
struct Block {
    stream: [u8; 4],
    flags: u8,
    priority: Option<[u8; PRIORITY_FIELDS]>,
    fragments: BytesMut,
}

/// A gRPC client connection as hyper should read it: see the module documentation.
pub struct FixAuthority<S> {
    inner: S,
    /// Client bytes read and not yet looked at.
    pending: BytesMut,
    /// Bytes looked at, for hyper.
    ready: Bytes,
    /// Bytes of the current frame still to pass unchanged (first the connection preface).
    pass: usize,
    block: Option<Block>,
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
    max_list: usize,
    /// Whether an `:authority` was replaced yet (it is logged once).
    replaced: bool,
    /// Why the connection was ended, for its owner: the HTTP/2 stack keeps only an io error's text.
    failure: Arc<OnceLock<HeaderBlockError>>,
    eof: bool,
}

impl<S> FixAuthority<S> {
    /// `inner`, whose first bytes `first` (beginning with the HTTP/2 preface) were already read.
    /// `max_list` is the header list size the server accepts (`SETTINGS_MAX_HEADER_LIST_SIZE`).
    pub fn new(first: BytesMut, inner: S, max_list: usize) -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Self {
            inner,
            pending: first,
            ready: Bytes::new(),
            pass: H2_PREFACE.len(),
            block: None,
            decoder,
            encoder: Encoder::new(),
            max_list,
            replaced: false,
            failure: Arc::default(),
            eof: false,
        }
    }

    /// Where the header block error that ends the connection, if one does, is left.
    pub fn failure(&self) -> Arc<OnceLock<HeaderBlockError>> {
        self.failure.clone()
    }

    /// Looks at the frame at the start of `pending`: queues it in `ready` (or starts passing it), or
    /// gathers it into the header block. `false` when more bytes are needed first.
    fn next_frame(&mut self) -> Result<bool, HeaderBlockError> {
        let Some(head) = self.pending.get(..FRAME_HEADER) else {
            return Ok(false);
        };
        let len = payload_len(head);
        let (kind, flags) = (head[3], head[4]);
        let stream: [u8; 4] = head[5..9].try_into().expect("four bytes");
        let in_block = self.block.as_ref().map(|b| b.stream);
        match (kind, in_block) {
            (HEADERS, None) | (CONTINUATION, Some(_)) => {
                if len > MAX_BLOCK_BYTES {
                    return Err(HeaderBlockError::TooLarge);
                }
                if self.pending.len() < FRAME_HEADER + len {
                    self.pending.reserve(FRAME_HEADER + len - self.pending.len());
                    return Ok(false);
                }
                let frame = self.pending.split_to(FRAME_HEADER + len).freeze();
                self.gather(kind, flags, stream, frame.slice(FRAME_HEADER..))?;
            }
            (CONTINUATION, None) => return Err(HeaderBlockError::StrayContinuation),
            (_, Some(_)) => return Err(HeaderBlockError::Interrupted(kind)),
            (_, None) => {
                let have = (self.pending.len() - FRAME_HEADER).min(len);
                self.ready = self.pending.split_to(FRAME_HEADER + have).freeze();
                self.pass = len - have;
            }
        }
        Ok(true)
    }

    /// Adds one HEADERS or CONTINUATION frame's fragment to the block, and passes the block on once
    /// it is whole.
    fn gather(
        &mut self,
        kind: u8,
        flags: u8,
        stream: [u8; 4],
        mut payload: Bytes,
    ) -> Result<(), HeaderBlockError> {
        if kind == HEADERS {
            let mut padding = 0;
            if flags & PADDED != 0 {
                padding = usize::from(*payload.first().ok_or(HeaderBlockError::Malformed)?);
                payload.advance(1);
            }
            let priority = if flags & PRIORITY == 0 {
                None
            } else {
                let fields = payload.get(..PRIORITY_FIELDS).ok_or(HeaderBlockError::Malformed)?;
                let fields = fields.try_into().expect("PRIORITY_FIELDS bytes");
                payload.advance(PRIORITY_FIELDS);
                Some(fields)
            };
            let fragment = payload.len().checked_sub(padding).ok_or(HeaderBlockError::Malformed)?;
            payload.truncate(fragment);
            self.block = Some(Block { stream, flags, priority, fragments: BytesMut::new() });
        } else if self.block.as_ref().is_some_and(|b| b.stream != stream) {
            return Err(HeaderBlockError::Interrupted(kind));
        }
        let block = self.block.as_mut().expect("a block is being gathered");
        if block.fragments.len() + payload.len() > MAX_BLOCK_BYTES {
            return Err(HeaderBlockError::TooLarge);
        }
        block.fragments.extend_from_slice(&payload);
        if flags & END_HEADERS != 0 {
            let block = self.block.take().expect("a block is being gathered");
            self.ready = self.reencode(&block)?;
        }
        Ok(())
    }

    /// The whole block as frames for hyper: decoded, `:authority` fixed, encoded again.
    fn reencode(&mut self, block: &Block) -> Result<Bytes, HeaderBlockError> {
        let Self { decoder, encoder, max_list, replaced, .. } = self;
        let mut fields = Vec::with_capacity(block.fragments.len());
        let mut list = 0usize;
        decoder
            .decode_with_cb(&block.fragments, |name, value| {
                list += name.len() + value.len() + FIELD_OVERHEAD;
                if list > *max_list {
                    return;
                }
                let value = if &*name == b":authority" && http::uri::Authority::try_from(&*value).is_err() {
                    if !*replaced {
                        *replaced = true;
                        let seen = String::from_utf8_lossy(&value);
                        debug!(authority = %seen, "request :authority is no URI authority: read as localhost");
                    }
                    Cow::Borrowed(PLACEHOLDER_AUTHORITY)
                } else {
                    value
                };
                encoder
                    .encode_header_into((&name, &value), &mut fields)
                    .expect("writing to a Vec cannot fail");
            })
            .map_err(HeaderBlockError::Hpack)?;
        if list > *max_list {
            return Err(HeaderBlockError::ListTooLarge(*max_list));
        }
        Ok(frames(block, &fields))
    }
}

/// The payload length a frame header announces (24 bits, network order).
fn payload_len(head: &[u8]) -> usize {
    usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2])
}

/// `fields` (an encoded header block) as a HEADERS frame, and CONTINUATIONs where it does not fit one.
fn frames(block: &Block, fields: &[u8]) -> Bytes {
    let priority = block.priority.as_ref().map_or(&[][..], |p| &p[..]);
    let frames = (fields.len() + priority.len()).div_ceil(MAX_FRAME_PAYLOAD).max(1);
    let mut out = BytesMut::with_capacity(fields.len() + priority.len() + frames * FRAME_HEADER);
    let first = fields.len().min(MAX_FRAME_PAYLOAD - priority.len());
    let (mut chunk, mut rest) = fields.split_at(first);
    let mut kind = HEADERS;
    let mut flags = block.flags & (END_STREAM | PRIORITY);
    loop {
        let last = rest.is_empty();
        let payload = if kind == HEADERS { priority.len() } else { 0 } + chunk.len();
        out.put_uint(payload as u64, 3);
        out.put_u8(kind);
        out.put_u8(flags | if last { END_HEADERS } else { 0 });
        out.put_slice(&block.stream);
        if kind == HEADERS {
            out.put_slice(priority);
        }
        out.put_slice(chunk);
        if last {
            return out.freeze();
        }
        (chunk, rest) = rest.split_at(rest.len().min(MAX_FRAME_PAYLOAD));
        kind = CONTINUATION;
        flags = 0;
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FixAuthority<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.pass > 0 {
                if !this.pending.is_empty() {
                    let n = this.pass.min(this.pending.len()).min(buf.remaining());
                    buf.put_slice(&this.pending.split_to(n));
                    this.pass -= n;
                    return Poll::Ready(Ok(()));
                }
                // The rest of a frame that passes unchanged goes straight into the reader's buffer.
                let n = this.pass.min(buf.remaining());
                let mut direct = ReadBuf::new(buf.initialize_unfilled_to(n));
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut direct))?;
                let got = direct.filled().len();
                buf.advance(got);
                this.pass -= got;
                return Poll::Ready(Ok(()));
            }
            match this.next_frame() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    let error = io::Error::new(io::ErrorKind::InvalidData, e.to_string());
                    let _ = this.failure.set(e);
                    return Poll::Ready(Err(error));
                }
            }
            if this.eof {
                // A truncated frame: hyper is handed what there is and sees the end.
                this.ready = this.pending.split().freeze();
                if this.ready.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.pending.reserve(READ_CHUNK);
            let read = tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.pending);
            match read {
                Poll::Ready(Ok(0)) => this.eof = true,
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    if this.pending.is_empty() {
                        // Nothing held while the client is quiet.
                        this.pending = BytesMut::new();
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FixAuthority<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

    use super::*;

    /// kube-apiserver v1.20's request head, as grpc-go writes it for a Unix socket target.
    const SOCKET: &[u8] = b"/tmp/spoke-test/spoke.sock";
    const SETTINGS: u8 = 0x4;
    const RST_STREAM: u8 = 0x3;
    const PING: u8 = 0x6;
    const DATA: u8 = 0x0;
    const ACK: u8 = 0x1;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        out.put_uint(payload.len() as u64, 3);
        out.put_u8(kind);
        out.put_u8(flags);
        out.put_u32(stream);
        out.put_slice(payload);
        out.to_vec()
    }

    fn request_fields(authority: &[u8]) -> Vec<(&[u8], &[u8])> {
        vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/ProxyService/Proxy"),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
            (b"user-agent", b"grpc-go/1.26.0"),
            (b"te", b"trailers"),
        ]
    }

    /// How a request's header block is laid out in frames.
    #[derive(Clone, Copy)]
    enum Shape {
        Plain,
        /// PADDED and PRIORITY flags on the HEADERS frame.
        PaddedWithPriority,
        /// HEADERS and two CONTINUATIONs.
        Continued,
    }

    fn headers(stream: u32, block: &[u8], shape: Shape) -> Vec<u8> {
        let end = END_STREAM | END_HEADERS;
        match shape {
            Shape::Plain => frame(HEADERS, end, stream, block),
            Shape::PaddedWithPriority => {
                let payload = [&[3][..], &[0, 0, 0, 0, 16], block, &[0, 0, 0]].concat();
                frame(HEADERS, end | PADDED | PRIORITY, stream, &payload)
            }
            Shape::Continued => {
                let (a, rest) = block.split_at(block.len() / 3);
                let (b, c) = rest.split_at(rest.len() / 2);
                [
                    frame(HEADERS, END_STREAM, stream, a),
                    frame(CONTINUATION, 0, stream, b),
                    frame(CONTINUATION, END_HEADERS, stream, c),
                ]
                .concat()
            }
        }
    }

    #[derive(Debug, PartialEq)]
    enum Reply {
        Headers(Vec<(String, String)>),
        Reset,
    }

    /// An HTTP/2 client written frame by frame, so that it can send what h2's client would refuse to.
    struct RawClient {
        io: DuplexStream,
        encoder: Encoder<'static>,
        decoder: Decoder<'static>,
    }

    impl RawClient {
        async fn start(mut io: DuplexStream) -> Self {
            io.write_all(&[H2_PREFACE, &frame(SETTINGS, 0, 0, &[])].concat()).await.unwrap();
            Self { io, encoder: Encoder::new(), decoder: Decoder::new() }
        }

        async fn request(&mut self, stream: u32, authority: &[u8], shape: Shape) -> Reply {
            let block = self.encoder.encode(request_fields(authority));
            self.io.write_all(&headers(stream, &block, shape)).await.unwrap();
            loop {
                let mut head = [0; FRAME_HEADER];
                self.io.read_exact(&mut head).await.unwrap();
                let len = payload_len(&head);
                let mut payload = vec![0; len];
                self.io.read_exact(&mut payload).await.unwrap();
                let on = u32::from_be_bytes(head[5..9].try_into().unwrap());
                match head[3] {
                    SETTINGS if head[4] & ACK == 0 => {
                        self.io.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();
                    }
                    HEADERS if on == stream => {
                        let fields = self.decoder.decode(&payload).unwrap();
                        let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
                        return Reply::Headers(fields.into_iter().map(|(n, v)| (text(n), text(v))).collect());
                    }
                    RST_STREAM if on == stream => return Reply::Reset,
                    _ => {}
                }
            }
        }
    }

    /// hyper's HTTP/2 server on one end of a pipe, answering with the authority it was given.
    fn server(fix: bool) -> DuplexStream {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let service = service_fn(|request: hyper::Request<hyper::body::Incoming>| async move {
            let seen = request.uri().authority().map_or("none".to_owned(), ToString::to_string);
            Ok::<_, Infallible>(
                hyper::Response::builder().header("x-authority", seen).body(String::new()).unwrap(),
            )
        });
        let http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        tokio::spawn(async move {
            if fix {
                let io = FixAuthority::new(BytesMut::new(), server, 16 * 1024);
                http.serve_connection(TokioIo::new(io), service).await
            } else {
                http.serve_connection(TokioIo::new(server), service).await
            }
        });
        client
    }

    fn answered(authority: &str) -> Reply {
        Reply::Headers(vec![
            (":status".into(), "200".into()),
            ("x-authority".into(), authority.into()),
            ("date".into(), String::new()),
        ])
    }

    /// The reply with the `date` header's value blanked.
    fn dateless(reply: Reply) -> Reply {
        match reply {
            Reply::Headers(fields) => Reply::Headers(
                fields
                    .into_iter()
                    .map(|(n, v)| if n == "date" { (n, String::new()) } else { (n, v) })
                    .collect(),
            ),
            Reply::Reset => Reply::Reset,
        }
    }

    #[tokio::test]
    async fn h2_refuses_a_socket_path_as_authority() {
        // Why this module exists: without it, hyper resets the apiserver's request.
        let mut client = RawClient::start(server(false)).await;
        assert_eq!(client.request(1, SOCKET, Shape::Plain).await, Reply::Reset);
    }

    #[tokio::test]
    async fn a_socket_path_is_served_as_localhost_and_the_hpack_contexts_stay_in_step() {
        let mut client = RawClient::start(server(true)).await;
        // The first request adds its fields to the client's dynamic table; the later ones refer to
        // them by index, so hyper's decoder must have been fed the same table updates.
        for (stream, shape) in [(1, Shape::Plain), (3, Shape::PaddedWithPriority), (5, Shape::Continued)] {
            let reply = client.request(stream, SOCKET, shape).await;
            assert_eq!(dateless(reply), answered("localhost"), "stream {stream}");
        }
        // A valid authority is passed on as it is.
        let reply = client.request(7, b"10.0.0.1:10250", Shape::Plain).await;
        assert_eq!(dateless(reply), answered("10.0.0.1:10250"));
        let reply = client.request(9, SOCKET, Shape::Plain).await;
        assert_eq!(dateless(reply), answered("localhost"));
    }

    /// Everything `FixAuthority` hands on for `wire`, read one byte a read from the client.
    async fn through(wire: &[u8]) -> io::Result<Vec<u8>> {
        through_with_limit(wire, 16 * 1024).await
    }

    async fn through_with_limit(wire: &[u8], max_list: usize) -> io::Result<Vec<u8>> {
        let chunks: Vec<io::Result<Bytes>> = wire.iter().map(|b| Ok(Bytes::copy_from_slice(&[*b]))).collect();
        let slow = tokio_util::io::StreamReader::new(futures_util::stream::iter(chunks));
        let mut fix = FixAuthority::new(BytesMut::new(), slow, max_list);
        let failure = fix.failure();
        let mut out = Vec::new();
        match fix.read_to_end(&mut out).await {
            Ok(_) => Ok(out),
            Err(error) => {
                assert_eq!(error.kind(), io::ErrorKind::InvalidData);
                let failure = failure.get().expect("the failure is left for the owner");
                assert_eq!(error.to_string(), failure.to_string());
                Err(error)
            }
        }
    }

    fn refusal(result: io::Result<Vec<u8>>) -> String {
        result.unwrap_err().to_string()
    }

    #[tokio::test]
    async fn other_frames_pass_byte_for_byte() {
        let wire = [
            H2_PREFACE,
            &frame(SETTINGS, 0, 0, &[0, 4, 0, 1, 0, 0]),
            &frame(DATA, 0, 1, &vec![7; 40_000]),
            &frame(PING, 0, 0, &[1; 8]),
            &frame(DATA, END_STREAM, 1, &[]),
        ]
        .concat();
        assert_eq!(through(&wire).await.unwrap(), wire);
        // A truncated frame is handed on as it is, for hyper to see the connection end mid-frame.
        let cut = &wire[..wire.len() - 20];
        assert_eq!(through(cut).await.unwrap(), cut);
    }

    #[tokio::test]
    async fn a_rewritten_block_decodes_to_the_same_fields_but_the_authority() {
        let block = Encoder::new().encode(request_fields(SOCKET));
        let wire = [H2_PREFACE, &headers(1, &block, Shape::Continued), &frame(DATA, 0, 1, b"x")].concat();
        let out = through(&wire).await.unwrap();
        let (preface, rest) = out.split_at(H2_PREFACE.len());
        assert_eq!(preface, H2_PREFACE);
        assert_eq!(rest[3], HEADERS);
        assert_eq!(rest[4], END_STREAM | END_HEADERS, "one frame, END_STREAM kept");
        let len = payload_len(rest);
        let fields = Decoder::new().decode(&rest[FRAME_HEADER..FRAME_HEADER + len]).unwrap();
        let expected: Vec<_> = request_fields(PLACEHOLDER_AUTHORITY)
            .into_iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect();
        assert_eq!(fields, expected);
        assert_eq!(&rest[FRAME_HEADER + len..], frame(DATA, 0, 1, b"x"));
    }

    #[tokio::test]
    async fn a_block_over_a_frame_is_split_into_continuations() {
        let long = vec![b'v'; 3 * MAX_FRAME_PAYLOAD / 2];
        let mut fields = request_fields(SOCKET);
        fields.push((b"x-long", &long));
        let block = Encoder::new().encode(fields);
        let wire = [H2_PREFACE, &headers(1, &block, Shape::Continued)].concat();
        let out = through_with_limit(&wire, 2 * MAX_FRAME_PAYLOAD).await.unwrap();
        let rest = &out[H2_PREFACE.len()..];
        let first = payload_len(rest);
        assert_eq!((first, rest[3], rest[4]), (MAX_FRAME_PAYLOAD, HEADERS, END_STREAM));
        let second = &rest[FRAME_HEADER + first..];
        assert_eq!((second[3], second[4]), (CONTINUATION, END_HEADERS));
        let mut block = rest[FRAME_HEADER..FRAME_HEADER + first].to_vec();
        block.extend_from_slice(&second[FRAME_HEADER..]);
        let decoded = Decoder::new().decode(&block).unwrap();
        assert_eq!(decoded.last().unwrap().1, long);
    }

    #[tokio::test]
    async fn bad_header_blocks_end_the_connection() {
        let block = Encoder::new().encode(request_fields(SOCKET));
        let open = frame(HEADERS, 0, 1, &block);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (frame(CONTINUATION, END_HEADERS, 1, &block), "CONTINUATION frame without"),
            ([&open[..], &frame(PING, 0, 0, &[0; 8])].concat(), "frame of type 0x6 inside"),
            ([&open[..], &frame(CONTINUATION, END_HEADERS, 3, &[])].concat(), "frame of type 0x9 inside"),
            (frame(HEADERS, END_HEADERS, 1, &vec![0; MAX_BLOCK_BYTES + 1]), "header block over"),
            (
                [&open[..], &frame(CONTINUATION, 0, 1, &vec![0; MAX_BLOCK_BYTES - 10])].concat(),
                "header block over",
            ),
            (frame(HEADERS, END_HEADERS | PADDED, 1, &[200, 1, 2]), "too short"),
            (frame(HEADERS, END_HEADERS | PRIORITY, 1, &[0, 0]), "too short"),
            // Index 70 (an indexed field) is past the static table, and the dynamic one is empty.
            (frame(HEADERS, END_HEADERS, 1, &[0x80 | 0x46]), "HPACK"),
            // A dynamic table size update over the size the server allows.
            (frame(HEADERS, END_HEADERS, 1, &[0x3f, 0xe1, 0x3f, 0x82]), "HPACK"),
        ];
        for (frames, expected) in cases {
            let result = through(&[H2_PREFACE, &frames].concat()).await;
            let refusal = refusal(result);
            assert!(refusal.contains(expected), "{refusal:?} should say {expected:?}");
        }
    }

    #[tokio::test]
    async fn a_header_list_over_the_limit_is_refused_however_well_it_compresses() {
        // One 4 KiB field in the dynamic table, then referred to by one byte each time: the block
        // is small, the list it decodes to is not.
        let big = vec![b'a'; 4000];
        let mut encoder = Encoder::new();
        let mut block = encoder.encode([(&b"x-big"[..], &big[..])]);
        // Index 62: the newest dynamic table entry.
        block.extend(std::iter::repeat_n(0x80 | 0x3e, 10));
        let refusal = refusal(through(&[H2_PREFACE, &frame(HEADERS, END_HEADERS, 1, &block)].concat()).await);
        assert!(refusal.contains("header list over 16384 bytes"), "{refusal}");
    }
}
