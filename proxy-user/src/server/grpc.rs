//! Konnectivity's gRPC tunnel (`proxyProtocol: GRPC`) on the frontends: one HTTP/2 connection served by
//! hyper with the `ProxyService` tonic generates. Each `Proxy` call runs as a task of its own ([`call`])
//! that reads the client's packets; each dial runs as another ([`tunnel`]), routed, dialled, relayed and
//! recorded exactly as a CONNECT stream is (`stream::open`, `stream::relay_opened`), its client end a
//! [`Tunnel`].
//!
//! kube-apiserver opens one connection and one call per dial and never half-closes; other clients carry
//! several dials on one call, told apart by `random` and `connectID` (the server's stream id).

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument as _, debug, info_span};

use super::Server;
use super::stream::{self, CLOSE_TIMEOUT, GRPC};
use super::tunnel::{Outbound, TUNNEL_QUEUE, Tunnel};
use crate::frontend::ConnectRequest;
use crate::frontend::authority::FixAuthority;
use crate::frontend::konnectivity::{
    self, MAX_MESSAGE_BYTES, Packet, PacketError, ProxyService, ProxyServiceServer, Request as Asked,
};
use crate::metrics::inc;
use crate::transport::Stream;

/// HTTP/2 receive window of one call: what a client may send ahead of the relay.
pub const STREAM_WINDOW: u32 = 256 * 1024;
/// HTTP/2 receive window of one connection, all its calls together.
pub const CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Most bytes hyper buffers for sending on one call, beyond the client's window.
pub const MAX_SEND_BUF: usize = 64 * 1024;
/// Packets a call queues for its client (all its tunnels together).
pub const OUTBOUND_QUEUE: usize = 4;
/// Most `Proxy` calls open at once on one connection (HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`).
pub const MAX_CALLS_PER_CONN: u32 = 128;
/// Most dials pending or tunnels open at once on one call.
pub const MAX_TUNNELS_PER_CALL: usize = 256;
/// Largest request header block accepted.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;
/// HTTP/2 PING interval and the time its answer may take, so a vanished client is noticed.
pub const KEEPALIVE: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(20));
/// Tunnels whose end a call remembers, so that `DATA` racing a close is not taken for bad input.
const RECENTLY_CLOSED: usize = 64;
/// Protobuf bytes around a `DATA` payload: the `Packet` and `Data` framing.
const PACKET_OVERHEAD: usize = 64;

/// Serves one HTTP/2 connection, whose first bytes `first` were read already, until it closes. It closes
/// when the client closes it, after `--header-timeout` without any call open, or (GOAWAY, calls finish)
/// when the server drains.
pub(super) async fn serve<S: Stream>(server: &Arc<Server>, first: BytesMut, client: S) {
    let io = FixAuthority::new(first, client, MAX_HEADER_LIST as usize);
    let bad_headers = io.failure();
    let calls = Arc::new(watch::Sender::new(0usize));
    let service = ProxyServiceServer::new(Frontend { server: server.clone(), calls: calls.clone() })
        .max_decoding_message_size(MAX_MESSAGE_BYTES + PACKET_OVERHEAD)
        .max_encoding_message_size(MAX_MESSAGE_BYTES + PACKET_OVERHEAD);
    let mut http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http.timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buf_size(MAX_SEND_BUF)
        .max_concurrent_streams(MAX_CALLS_PER_CONN)
        .max_header_list_size(MAX_HEADER_LIST)
        .keep_alive_interval(KEEPALIVE.0)
        .keep_alive_timeout(KEEPALIVE.1);
    let conn = http.serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
    let mut conn = std::pin::pin!(conn);
    let mut idle = std::pin::pin!(idle(calls.subscribe(), server.config.limits.header_timeout));
    let mut closing = false;
    // An idle connection's graceful close waits for the client's PING answer; one that never answers is
    // dropped after CLOSE_TIMEOUT.
    let mut idle_deadline = None;
    loop {
        let force = async {
            match idle_deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = force => {
                debug!("idle gRPC connection did not close in order: dropped");
                return;
            }
            result = conn.as_mut() => {
                if let Err(error) = result {
                    if let Some(bad) = bad_headers.get() {
                        refused(server, "bad_headers", bad);
                    } else {
                        debug!(%error, "gRPC connection ended");
                    }
                }
                return;
            }
            () = server.draining.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            () = &mut idle, if !closing => {
                debug!("gRPC connection idle: closing it");
                conn.as_mut().graceful_shutdown();
                closing = true;
                idle_deadline = Some(Instant::now() + CLOSE_TIMEOUT);
            }
        }
    }
}

/// Returns once no call has been open for `limit`.
async fn idle(mut calls: watch::Receiver<usize>, limit: Duration) {
    loop {
        if calls.wait_for(|n| *n == 0).await.is_err() {
            return;
        }
        if tokio::time::timeout(limit, calls.wait_for(|n| *n > 0)).await.is_err() {
            return;
        }
    }
}

/// The service of one connection.
struct Frontend {
    server: Arc<Server>,
    /// Calls open on the connection.
    calls: Arc<watch::Sender<usize>>,
}

#[tonic::async_trait]
impl ProxyService for Frontend {
    type ProxyStream = Replies;

    async fn proxy(&self, request: Request<Streaming<Packet>>) -> Result<Response<Replies>, Status> {
        let (out, replies) = mpsc::channel(OUTBOUND_QUEUE);
        let open = CallOpen::new(&self.server, self.calls.clone());
        let server = self.server.clone();
        self.server.frontend.spawn(call(server, request.into_inner(), out, open));
        Ok(Response::new(Replies(replies)))
    }
}

/// The packets a call sends, as tonic streams them.
pub struct Replies(mpsc::Receiver<Result<Packet, Status>>);

impl futures_util::Stream for Replies {
    type Item = Result<Packet, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// Counts a call as open (on its connection and in the gauge) until dropped.
struct CallOpen {
    server: Arc<Server>,
    calls: Arc<watch::Sender<usize>>,
}

impl CallOpen {
    fn new(server: &Arc<Server>, calls: Arc<watch::Sender<usize>>) -> Self {
        calls.send_modify(|n| *n += 1);
        server.metrics.grpc_calls_open.inc();
        Self { server: server.clone(), calls }
    }
}

impl Drop for CallOpen {
    fn drop(&mut self) {
        self.calls.send_modify(|n| *n -= 1);
        self.server.metrics.grpc_calls_open.dec();
    }
}

/// What a call's dial and tunnel tasks tell it.
enum Event {
    /// The dial succeeded: `DIAL_RSP` goes out next, so the tunnel takes `DATA` from now on.
    Dialed { random: i64, connect_id: i64, data: mpsc::Sender<Bytes> },
    /// The dial failed (its `DIAL_RSP` error went out) or was abandoned.
    DialEnded { random: i64 },
    /// The tunnel ended (its `CLOSE_RSP` went out).
    Closed { connect_id: i64 },
}

/// A dial or tunnel task, as its call holds it.
struct Task {
    /// Cancelled when the client gives up the dial (`DIAL_CLS`) or is gone.
    gone: CancellationToken,
    /// Cancelled at `CLOSE_REQ`: the tunnel gets [`CLOSE_TIMEOUT`] to end.
    close: CancellationToken,
    /// Feeds the tunnel the client's `DATA`; `None` before the dial succeeds and after `CLOSE_REQ`.
    data: Option<mpsc::Sender<Bytes>>,
}

/// A call's dials and tunnels.
#[derive(Default)]
struct Tunnels {
    pending: HashMap<i64, Task>,
    open: HashMap<i64, Task>,
    recently_closed: VecDeque<i64>,
}

impl Tunnels {
    fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.open.is_empty()
    }

    /// Everything ends: the client is gone.
    fn release(&mut self) {
        for task in self.pending.values().chain(self.open.values()) {
            task.gone.cancel();
        }
        self.pending.clear();
        self.open.clear();
    }
}

/// How a call ends: in order, or with a status for its client.
type End = Option<Status>;

/// One `Proxy` call: reads the client's packets until the client goes, a packet no client sends
/// arrives, no `DIAL_REQ` comes within `--header-timeout`, or (as for kube-apiserver's single-use
/// tunnels) a dial fails and nothing else is open on the call, so no failed dial leaves a connection
/// behind.
async fn call(server: Arc<Server>, mut inbound: Streaming<Packet>, out: Outbound, open: CallOpen) {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut tunnels = Tunnels::default();
    let first_dial = Instant::now() + server.config.limits.header_timeout;
    let mut dialled = false;
    let end: End = loop {
        tokio::select! {
            // Events first: a tunnel is registered before its DIAL_RSP, so before any DATA for it.
            biased;
            Some(event) = events.recv() => {
                if on_event(&server, &mut tunnels, event) {
                    break None;
                }
            }
            message = inbound.message() => match message {
                Ok(Some(packet)) => {
                    dialled = true;
                    if let Err(end) = on_packet(&server, &mut tunnels, packet, &out, &events_tx).await {
                        break end;
                    }
                }
                Ok(None) => break None,
                Err(status) => {
                    // tonic reports a message over the limit as OUT_OF_RANGE; gRPC names it RESOURCE_EXHAUSTED.
                    if matches!(status.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted) {
                        refused(&server, "oversized", &status.message());
                        break Some(Status::resource_exhausted(status.message().to_owned()));
                    }
                    debug!(error = %status, "gRPC client gone");
                    break None;
                }
            },
            () = tokio::time::sleep_until(first_dial), if !dialled => {
                refused(&server, "no_dial", &"no DIAL_REQ within --header-timeout");
                break Some(Status::deadline_exceeded("no DIAL_REQ within the header timeout"));
            }
            () = server.draining.cancelled(), if tunnels.is_empty() && dialled => break None,
        }
    };
    tunnels.release();
    if let Some(status) = end {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, out.send(Err(status))).await;
    }
    drop(open);
}

/// Counts and logs refused input.
fn refused(server: &Server, reason: &'static str, error: &dyn std::fmt::Display) {
    inc(&server.metrics.grpc_refused, "reason", reason);
    stream::log_refusal(server, reason, error);
}

/// Takes a task's news; `true` when the call should end (a failed dial left nothing open).
fn on_event(server: &Server, tunnels: &mut Tunnels, event: Event) -> bool {
    match event {
        Event::Dialed { random, connect_id, data } => {
            if let Some(mut task) = tunnels.pending.remove(&random) {
                task.data = Some(data);
                tunnels.open.insert(connect_id, task);
            }
            false
        }
        Event::DialEnded { random } => {
            tunnels.pending.remove(&random);
            tunnels.is_empty()
        }
        Event::Closed { connect_id } => {
            tunnels.open.remove(&connect_id);
            if tunnels.recently_closed.len() == RECENTLY_CLOSED {
                tunnels.recently_closed.pop_front();
            }
            tunnels.recently_closed.push_back(connect_id);
            tunnels.is_empty() && server.draining.is_cancelled()
        }
    }
}

/// Acts on one client packet; `Err` ends the call.
async fn on_packet(
    server: &Arc<Server>,
    tunnels: &mut Tunnels,
    packet: Packet,
    out: &Outbound,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<(), End> {
    let asked = konnectivity::read_packet(packet).map_err(|e: PacketError| {
        refused(server, e.reason(), &e);
        Some(Status::invalid_argument(e.to_string()))
    })?;
    match asked {
        Asked::Dial { random, target } => {
            if tunnels.pending.contains_key(&random) {
                refused(server, "duplicate_random", &format!("duplicate DIAL_REQ random {random}"));
                return Err(Some(Status::invalid_argument(format!("duplicate DIAL_REQ random {random}"))));
            }
            if tunnels.pending.len() + tunnels.open.len() >= MAX_TUNNELS_PER_CALL {
                refused(server, "too_many_tunnels", &"too many tunnels on one call");
                let error = format!("too many tunnels on one gRPC stream (at most {MAX_TUNNELS_PER_CALL})");
                send(out, konnectivity::dial_response(random, 0, error)).await;
                return Ok(());
            }
            let task = Task { gone: CancellationToken::new(), close: CancellationToken::new(), data: None };
            let (gone, close) = (task.gone.clone(), task.close.clone());
            tunnels.pending.insert(random, task);
            let dial = Dial {
                server: server.clone(),
                random,
                out: out.clone(),
                events: events.clone(),
                gone,
                close,
            };
            server.frontend.spawn(tunnel(dial, target));
        }
        Asked::BadDial { random, error } => {
            server.metrics.request(GRPC, error.reason());
            stream::log_refusal(server, error.reason(), &error);
            send(out, konnectivity::dial_response(random, 0, error.to_string())).await;
            if tunnels.is_empty() {
                return Err(None);
            }
        }
        Asked::Data { connect_id, data } => match tunnels.open.get(&connect_id) {
            // A full queue holds this call's reading, and so (HTTP/2 flow control) its client.
            Some(Task { data: Some(feed), .. }) => {
                if !data.is_empty() {
                    let _ = feed.send(data).await;
                }
            }
            Some(_) => debug!(connect_id, "DATA after CLOSE_REQ: dropped"),
            None => unknown_tunnel(server, tunnels, out, connect_id, "DATA").await,
        },
        Asked::Close { connect_id } => match tunnels.open.get_mut(&connect_id) {
            Some(task) => {
                task.data = None;
                task.close.cancel();
            }
            None => unknown_tunnel(server, tunnels, out, connect_id, "CLOSE_REQ").await,
        },
        Asked::CloseDial { random } => {
            if let Some(task) = tunnels.pending.remove(&random) {
                task.gone.cancel();
            } else {
                debug!(random, "DIAL_CLS for no pending dial");
            }
        }
    }
    Ok(())
}

/// A packet for a tunnel this call does not have. After a recent close it is a race: `DATA` is dropped,
/// and `CLOSE_REQ` answered with `CLOSE_RSP` (the client waits for one also when the node side closed
/// first). Otherwise it is counted, and answered with `CLOSE_RSP` and an error, as Konnectivity's
/// server does.
async fn unknown_tunnel(server: &Server, tunnels: &Tunnels, out: &Outbound, connect_id: i64, kind: &str) {
    if tunnels.recently_closed.contains(&connect_id) {
        debug!(connect_id, kind, "packet for a tunnel just closed");
        if kind == "CLOSE_REQ" {
            send(out, konnectivity::close_response(connect_id, String::new())).await;
        }
        return;
    }
    refused(server, "unknown_connect_id", &format!("{kind} for unknown connectID {connect_id}"));
    send(out, konnectivity::close_response(connect_id, format!("unknown connectID {connect_id}"))).await;
}

/// Sends a packet unless the client is gone.
async fn send(out: &Outbound, packet: Packet) {
    let _ = out.send(Ok(packet)).await;
}

/// What a dial task needs of its call.
struct Dial {
    server: Arc<Server>,
    random: i64,
    out: Outbound,
    events: mpsc::UnboundedSender<Event>,
    gone: CancellationToken,
    close: CancellationToken,
}

/// One dial and, if it succeeds, its tunnel to the end.
async fn tunnel(dial: Dial, target: ConnectRequest) {
    let Dial { server, random, out, events, gone, close } = dial;
    let stream_id = server.next_stream_id.fetch_add(1, Ordering::Relaxed);
    let span = info_span!("stream", id = stream_id, dest = %target, frontend = GRPC);
    async move {
        let started = Instant::now();
        let opened = tokio::select! {
            opened = Box::pin(stream::open(&server, &target, stream_id)) => opened,
            () = gone.cancelled() => {
                debug!("dial abandoned by the client");
                server.metrics.request(GRPC, "dial_cancelled");
                let _ = events.send(Event::DialEnded { random });
                return;
            }
        };
        let (data, agent, slot) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                stream::log_refusal(&server, e.reason(), &e);
                server.metrics.request(GRPC, e.reason());
                send(&out, konnectivity::dial_response(random, 0, e.to_string())).await;
                let _ = events.send(Event::DialEnded { random });
                return;
            }
        };
        server.metrics.dial_duration.observe(started.elapsed().as_secs_f64());
        let connect_id = i64::try_from(stream_id).unwrap_or(i64::MAX);
        let (feed, inbound) = mpsc::channel(TUNNEL_QUEUE);
        let _ = events.send(Event::Dialed { random, connect_id, data: feed });
        if out.send(Ok(konnectivity::dial_response(random, connect_id, String::new()))).await.is_err() {
            debug!("client left before the tunnel opened");
            server.metrics.request(GRPC, "client_closed");
            let mut data = data;
            data.get_mut().abort();
            let _ = events.send(Event::Closed { connect_id });
            return;
        }
        server.metrics.request(GRPC, "ok");
        debug!(agent = %agent.identity.agent_id, connect_id, "tunnel open");
        let mut client = Tunnel::new(connect_id, inbound, out, gone.clone(), close.clone());
        // A CLOSE_REQ ends the client's input, so the relay ends once the node side does; one that does
        // not within CLOSE_TIMEOUT is cut, as is every tunnel once the client is gone.
        let cut = async {
            tokio::select! {
                () = close.cancelled() => {}
                () = gone.cancelled() => {}
            }
            tokio::time::sleep(CLOSE_TIMEOUT).await;
        };
        let reusable = tokio::select! {
            reusable = stream::relay_opened(&server, &mut client, data, &[]) => reusable,
            () = cut => {
                debug!("the node side did not end in time after the client closed: cut");
                None
            }
        };
        client.close(String::new()).await;
        let _ = events.send(Event::Closed { connect_id });
        drop(slot);
        if let Some(conn) = reusable {
            tokio::spawn(stream::reuse(server.clone(), agent, conn));
        }
    }
    .instrument(span)
    .await;
}
