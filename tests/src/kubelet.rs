//! A kubelet stand-in for the real-apiserver suite: HTTPS on a node's loopback address with a serving
//! certificate for it, answering what kube-apiserver asks a kubelet (Kubernetes v1.20's paths):
//! - `GET /healthz` → `ok`, and `GET /whoami` → the node's name (to tell which kubelet answered a
//!   node-proxy request), then the connection closes, so that each such request is a stream of its own
//!   through Spoke (routed afresh);
//! - `GET /containerLogs/{namespace}/{pod}/{container}` → three log lines naming them and the node;
//! - `/exec/{namespace}/{pod}/{container}?command=…` upgraded to a WebSocket with the
//!   `v5.channel.k8s.io` (or `v4.channel.k8s.io`) subprotocol, as `kubectl exec` asks from v1.30: the
//!   command's words echoed on stdout (channel 1), then a `Success` status on the error channel (3);
//! - the same path upgraded to `SPDY/3.1` (`X-Stream-Protocol-Version: v4.channel.k8s.io`): after the
//!   101 the stand-in echoes raw bytes back, which shows the upgraded bytes crossing both ways (it does
//!   not speak SPDY's framing).
//!
//! Connections are kept alive for many requests, as the apiserver keeps them, with `TCP_NODELAY` (a
//! kubelet stand-in without it waits ~48 ms per response on delayed ACKs, DESIGN.md §10).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use rustls_pki_types::pem::PemObject as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::kube::Pair;

/// The WebSocket handshake's GUID (RFC 6455 §1.3).
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Largest request head read.
const MAX_HEAD: usize = 64 * 1024;

/// A running kubelet stand-in.
pub struct Kubelet {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Requests answered.
    pub requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Kubelet {
    /// Serves node `node` on `addr` (port 0 for any) with the serving certificate `serving`.
    pub async fn start(node: &str, addr: SocketAddr, serving: &Pair) -> Self {
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(&serving.cert)
            .expect("kubelet serving certificate")
            .collect::<Result<Vec<_>, _>>()
            .expect("kubelet serving certificate");
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&serving.key).expect("kubelet serving key");
        let config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .expect("kubelet TLS configuration");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(addr).await.expect("bind the kubelet stand-in");
        let addr = listener.local_addr().expect("kubelet address");
        let requests = Arc::new(AtomicU64::new(0));
        let (node, counted) = (node.to_owned(), requests.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let (acceptor, node, counted) = (acceptor.clone(), node.clone(), counted.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        Box::pin(serve(tls, &node, &counted)).await;
                    }
                });
            }
        });
        Self { addr, requests, task }
    }
}

/// One request's head.
struct Head {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Reads one request head (the stand-in's requests carry no body); `None` at the end of the connection.
async fn read_head<S: AsyncRead + Unpin>(conn: &mut S, buf: &mut Vec<u8>) -> Option<Head> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(len)) = req.parse(buf) {
            let head = Head {
                method: req.method?.to_owned(),
                path: req.path?.to_owned(),
                headers: req
                    .headers
                    .iter()
                    .map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).into_owned()))
                    .collect(),
            };
            buf.drain(..len);
            return Some(head);
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        let mut chunk = [0u8; 4096];
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut conn: S, node: &str, counted: &AtomicU64) {
    let mut buf = Vec::new();
    while let Some(head) = read_head(&mut conn, &mut buf).await {
        counted.fetch_add(1, Ordering::Relaxed);
        let path = head.path.split('?').next().unwrap_or("").to_owned();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let upgrade = head.header("upgrade").map(str::to_ascii_lowercase);
        match (head.method.as_str(), segments.as_slice(), upgrade.as_deref()) {
            (_, ["exec", ..], Some("websocket")) => return websocket_exec(conn, &head).await,
            (_, ["exec", ..], Some(spdy)) if spdy.starts_with("spdy/") => {
                return spdy_echo(conn, &head, buf).await;
            }
            ("GET", ["healthz"], None) => respond(&mut conn, 200, "ok").await,
            ("GET", ["whoami"], None) => {
                respond_closing(&mut conn, node).await;
                return;
            }
            ("GET", ["containerLogs", ns, pod, container], None) => {
                let line = |i: u8| format!("log line {i} of {ns}/{pod}/{container} on {node}\n");
                let body = [line(1), line(2), line(3)].concat();
                respond(&mut conn, 200, &body).await;
            }
            _ => respond(&mut conn, 404, "404 page not found\n").await,
        }
    }
}

async fn respond<S: AsyncWrite + Unpin>(conn: &mut S, code: u16, body: &str) {
    let reason = if code == 200 { "OK" } else { "Not Found" };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(head.as_bytes()).await;
    let _ = conn.write_all(body.as_bytes()).await;
    let _ = conn.flush().await;
}

/// A 200 answer that closes the connection after it.
async fn respond_closing<S: AsyncWrite + Unpin>(conn: &mut S, body: &str) {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(head.as_bytes()).await;
    let _ = conn.write_all(body.as_bytes()).await;
    let _ = conn.shutdown().await;
}

/// The words of an exec request's `command` parameters, decoded.
fn command(path: &str) -> Vec<String> {
    let query = path.split_once('?').map_or("", |(_, q)| q);
    query
        .split('&')
        .filter_map(|kv| kv.strip_prefix("command="))
        .map(|v| {
            let v = v.replace('+', " ");
            let mut out = Vec::new();
            let bytes = v.as_bytes();
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i] == b'%'
                    && i + 2 < bytes.len()
                    && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                        .ok()
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    out.push(b);
                    i += 3;
                    continue;
                }
                out.push(bytes[i]);
                i += 1;
            }
            String::from_utf8_lossy(&out).into_owned()
        })
        .collect()
}

/// A WebSocket frame from the server (unmasked, RFC 6455 §5.2).
fn ws_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => frame.push(u8::try_from(n).expect("below 126")),
        n if u16::try_from(n).is_ok() => {
            frame.push(126);
            frame.extend_from_slice(&u16::try_from(n).expect("fits").to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    frame
}

async fn websocket_exec<S: AsyncRead + AsyncWrite + Unpin>(mut conn: S, head: &Head) {
    let offered = head.header("sec-websocket-protocol").unwrap_or("");
    let Some(protocol) = ["v5.channel.k8s.io", "v4.channel.k8s.io"]
        .into_iter()
        .find(|p| offered.split(',').any(|o| o.trim() == *p))
    else {
        return respond(&mut conn, 404, "no supported exec subprotocol\n").await;
    };
    let key = head.header("sec-websocket-key").unwrap_or("");
    let digest =
        ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, format!("{key}{WS_GUID}").as_bytes());
    let accept = base64::engine::general_purpose::STANDARD.encode(digest.as_ref());
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n"
    );
    let mut stdout = vec![1u8];
    stdout.extend_from_slice(format!("{}\n", command(&head.path).join(" ")).as_bytes());
    let mut status = vec![3u8];
    status.extend_from_slice(br#"{"metadata":{},"status":"Success"}"#);
    let mut out = answer.into_bytes();
    out.extend(ws_frame(0x2, &stdout));
    out.extend(ws_frame(0x2, &status));
    out.extend(ws_frame(0x8, &1000u16.to_be_bytes()));
    if conn.write_all(&out).await.is_err() || conn.flush().await.is_err() {
        return;
    }
    // Wait for the client's close (or its end), bounded.
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while matches!(conn.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

async fn spdy_echo<S: AsyncRead + AsyncWrite + Unpin>(mut conn: S, head: &Head, early: Vec<u8>) {
    let version = head.header("x-stream-protocol-version").unwrap_or("v4.channel.k8s.io");
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
         X-Stream-Protocol-Version: {version}\r\n\r\n"
    );
    if conn.write_all(answer.as_bytes()).await.is_err() || conn.write_all(&early).await.is_err() {
        return;
    }
    let _ = conn.flush().await;
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if conn.write_all(&chunk[..n]).await.is_err() || conn.flush().await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = conn.shutdown().await;
}
