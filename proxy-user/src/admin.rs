//! The admin endpoint: `/livez`, `/readyz` and Prometheus `/metrics` over plain HTTP/1.1.
//!
//! Deliberately small: one request per connection, GET only, bounded in size, time and concurrency.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::transport::accept::{self, Accepted, Budget};

/// Admin connections served at once.
pub const MAX_ADMIN_CONNS: usize = 64;
/// Time allowed to send a request and read the response.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head read.
const MAX_REQUEST: usize = 4096;

/// Answers whether the process is ready for traffic.
pub type Readiness = Arc<dyn Fn() -> Result<(), &'static str> + Send + Sync>;

/// Serves the admin endpoints on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    ready: Readiness,
    shutdown: CancellationToken,
) {
    let budget = Budget {
        name: "admin",
        max_conns: MAX_ADMIN_CONNS,
        first_byte: Some(ADMIN_TIMEOUT),
        per_source: None,
        on_refused: None,
        peer_in_logs: false,
    };
    // Admin requests are not waited for at shutdown: nobody holds the tracker.
    accept::serve(listener, budget, shutdown, TaskTracker::new(), move |a: Accepted<TcpStream>| {
        let (registry, ready) = (registry.clone(), ready.clone());
        async move {
            let deadline = a.at + ADMIN_TIMEOUT;
            match tokio::time::timeout_at(deadline, answer(a.conn, &registry, &ready)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => debug!(%error, "admin request failed"),
                Err(_) => debug!("admin request timed out"),
            }
        }
    })
    .await;
}

async fn answer(mut stream: TcpStream, registry: &Registry, ready: &Readiness) -> std::io::Result<()> {
    let mut buf = BytesMut::with_capacity(512);
    let path = loop {
        if buf.len() >= MAX_REQUEST || stream.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) if req.method == Some("GET") => {
                break req.path.unwrap_or("/").split('?').next().unwrap_or("/").to_owned();
            }
            Ok(httparse::Status::Complete(_)) => {
                return respond(&mut stream, 405, "text/plain", b"GET only\n").await;
            }
            Ok(httparse::Status::Partial) => {}
            Err(_) => return respond(&mut stream, 400, "text/plain", b"bad request\n").await,
        }
    };
    match path.as_str() {
        "/livez" => respond(&mut stream, 200, "text/plain", b"ok\n").await,
        "/readyz" => match ready() {
            Ok(()) => respond(&mut stream, 200, "text/plain", b"ready\n").await,
            Err(why) => {
                respond(&mut stream, 503, "text/plain", format!("not ready: {why}\n").as_bytes()).await
            }
        },
        "/metrics" => {
            let mut text = String::new();
            if prometheus_client::encoding::text::encode(&mut text, registry).is_err() {
                return respond(&mut stream, 500, "text/plain", b"encode metrics\n").await;
            }
            respond(
                &mut stream,
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text.as_bytes(),
            )
            .await
        }
        _ => respond(&mut stream, 404, "text/plain", b"not found\n").await,
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let phrase = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {phrase}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.shutdown().await
}
