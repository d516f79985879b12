//! One CONNECT stream on the server: read the request, route it, have the agent dial, reply, relay,
//! record.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument as _, debug, info_span, warn};

use super::registry::{AgentHandle, DataConn};
use super::{Server, session};
use crate::codec::{self, CodecError};
use crate::datapath::Activity;
use crate::frontend::sniff::{self, Protocol};
use crate::frontend::{self, ConnectRequest, ESTABLISHED, RequestError};
use crate::metrics::inc;
use crate::protocol::{self, DialStatus, Message, Nonces};
use crate::transport::Stream;
use crate::transport::accept::Accepted;
use crate::transport::counted::{Counted, REUSE_TIMEOUT, Side};
use crate::transport::tls::{self, HandshakeError};

/// `frontend_protocol` of CONNECT requests.
pub(super) const HTTP_CONNECT: &str = "http-connect";
/// `frontend_protocol` of the gRPC tunnel's dials.
pub(super) const GRPC: &str = "grpc";

/// The relay's ends, as its log names them.
const ENDS: [&str; 2] = ["downstream (client)", "upstream (agent)"];

/// Data connections tried for one request before giving up (a parked connection may have died).
pub const MAX_DIAL_ATTEMPTS: usize = 3;
/// Time the agent gets beyond the dial timeout to send its reply.
pub const REPLY_MARGIN: Duration = Duration::from_secs(1);

/// After an error reply, how long unread request bytes are drained so the reply is not lost to a reset.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(1);
/// Most unread request bytes drained after an error reply.
pub const LINGER_MAX_BYTES: u64 = 64 * 1024;
/// After start, how long requests for which no agent is connected wait for agents to (re)connect...
pub const STARTUP_WINDOW: Duration = Duration::from_secs(10);
/// ...each for at most this long (agents told `GoAway` retry within 200 ms).
pub const STARTUP_WAIT: Duration = Duration::from_secs(1);
/// Refused requests are logged at most this often.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// While draining, how often each stream looks whether it sits idle.
const IDLE_CHECK: Duration = Duration::from_millis(250);
/// Time an idle stream's orderly close may take before it is reset.
pub(super) const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Writes an error reply, closes our side, and drains what the client still sends for a moment
/// ("lingering close"): closing a socket with unread input resets it, which can destroy the reply
/// before the client reads it.
async fn refuse<S: Stream>(client: &mut S, status: u16, reason: &str) {
    if frontend::write_error(client, status, reason).await.is_err() || client.shutdown().await.is_err() {
        return;
    }
    let mut rest = (&mut *client).take(LINGER_MAX_BYTES);
    let mut sink = tokio::io::sink();
    let _ = tokio::time::timeout(LINGER_TIMEOUT, tokio::io::copy(&mut rest, &mut sink)).await;
}

/// Why a request got no stream; each maps to an HTTP status and a metric label.
#[derive(Debug, thiserror::Error)]
pub(super) enum DialError {
    #[error("no agent serves {0}")]
    NoAgent(String),
    #[error("too many dials pending; try again")]
    Overloaded,
    #[error("agent {0} is at its stream limit")]
    AgentBusy(String),
    #[error("the server is at its stream limit (--max-streams)")]
    ServerBusy,
    #[error("agent {0} offered no data connection within the dial timeout")]
    NoDataConn(String),
    #[error("agent {agent}: {status}: {message}", status = status.as_str())]
    Agent { agent: String, status: DialStatus, message: String },
    #[error("agent {agent} did not reply within the dial timeout")]
    ReplyTimeout { agent: String },
    #[error("agent {agent} connection failed: {source}")]
    AgentConn { agent: String, source: CodecError },
}

impl DialError {
    pub(super) fn status(&self) -> u16 {
        match self {
            Self::NoAgent(_) | Self::Overloaded | Self::AgentBusy(_) | Self::ServerBusy => 503,
            Self::NoDataConn(_) | Self::ReplyTimeout { .. } => 504,
            Self::AgentConn { .. } => 502,
            Self::Agent { status, .. } => match status {
                DialStatus::Denied => 403,
                DialStatus::Timeout => 504,
                DialStatus::Draining | DialStatus::Busy => 503,
                DialStatus::Ok | DialStatus::Refused | DialStatus::Failed | DialStatus::Unresolved => 502,
            },
        }
    }

    pub(super) fn reason(&self) -> &'static str {
        match self {
            Self::NoAgent(_) => "no_agent",
            Self::Overloaded => "overloaded",
            Self::AgentBusy(_) => "agent_busy",
            Self::ServerBusy => "server_busy",
            Self::NoDataConn(_) => "no_data_conn",
            Self::ReplyTimeout { .. } => "timeout",
            Self::AgentConn { .. } => "agent_error",
            Self::Agent { status, .. } => status.as_str(),
        }
    }
}

/// Serves a connection from the Unix-socket frontend; its budget permit is held to the end.
pub(super) async fn serve_unix(server: Arc<Server>, accepted: Accepted<UnixStream>) {
    serve(&server, accepted.conn).await;
    drop(accepted.permit);
}

/// Serves a connection from the TCP frontend: the TLS handshake (client certificate required), then the
/// stream. Its budget permit is held to the end.
pub(super) async fn serve_tls(server: Arc<Server>, acceptor: TlsAcceptor, accepted: Accepted<TcpStream>) {
    let _ = accepted.conn.set_nodelay(true);
    let deadline = accepted.at + server.config.limits.handshake_timeout;
    match tls::accept(&acceptor, accepted.conn, deadline).await {
        Ok(mut client) => {
            let names = tls::peer_names(client.get_ref().1);
            let allowed = server.config.frontend.as_ref().map_or(&[][..], |f| &f.allowed_names[..]);
            if names.iter().any(|n| allowed.contains(n)) {
                serve(&server, client).await;
            } else {
                warn!(?names, "frontend client certificate carries no allowed name: refused");
                // Before the first byte: no frontend protocol yet.
                inc(&server.metrics.stream.results, "result", "client_not_allowed");
                let reason = "client certificate not allowed (see --frontend-allowed-names)";
                Box::pin(refuse(&mut client, 403, reason)).await;
            }
        }
        Err(error) => {
            if matches!(error, HandshakeError::Timeout) {
                warn!("frontend TLS handshake timed out");
            } else {
                warn!(%error, "frontend TLS handshake failed");
            }
            inc(&server.metrics.stream.results, "result", "tls_handshake");
        }
    }
    drop(accepted.permit);
}

/// Serves one frontend connection to its end: its first bytes tell the protocol, then CONNECT or the
/// gRPC tunnel (as `--mode` allows) takes it. One deadline covers sniffing and the request head.
async fn serve<S: Stream>(server: &Arc<Server>, mut client: S) {
    let deadline = Instant::now() + server.config.limits.header_timeout;
    let mut first = BytesMut::new();
    let sniffed = Box::pin(tokio::time::timeout_at(deadline, sniff::sniff(&mut client, &mut first))).await;
    let protocol = match sniffed {
        Ok(Ok(protocol)) => protocol,
        Ok(Err(e)) => return refuse_head(server, &mut client, HTTP_CONNECT, &e).await,
        Err(_) => return head_timeout(server, &mut client).await,
    };
    inc(&server.metrics.frontend_conns, "frontend_protocol", protocol.label());
    let mode = server.config.mode;
    match protocol {
        Protocol::Http2 if mode.grpc() => {
            super::grpc::serve(server, first, client).await;
        }
        Protocol::Http1 if mode.http_connect() => connect(server, client, first, deadline).await,
        Protocol::Http2 => {
            // An HTTP/2 client cannot read an HTTP/1.1 reply: the connection just closes.
            log_refusal(server, "protocol_not_served", &"gRPC tunnel refused: --mode http-connect");
            server.metrics.request(GRPC, "protocol_not_served");
        }
        Protocol::Http1 => {
            log_refusal(server, "protocol_not_served", &"CONNECT refused: --mode grpc");
            server.metrics.request(HTTP_CONNECT, "protocol_not_served");
            let reason = "this server takes only Konnectivity's gRPC tunnel (--mode grpc), not HTTP CONNECT";
            Box::pin(refuse(&mut client, 400, reason)).await;
        }
    }
}

/// A request head that could not be read: counted, logged, and answered where the client is still there.
async fn refuse_head<S: Stream>(server: &Server, client: &mut S, protocol: &'static str, e: &RequestError) {
    log_refusal(server, e.reason(), e);
    server.metrics.request(protocol, e.reason());
    if let Some(status) = e.status() {
        Box::pin(refuse(client, status, &e.to_string())).await;
    }
}

/// A request head that did not arrive within the header timeout.
async fn head_timeout<S: Stream>(server: &Server, client: &mut S) {
    log_refusal(server, "header_timeout", &"the request head did not arrive in time");
    server.metrics.request(HTTP_CONNECT, "header_timeout");
    Box::pin(refuse(client, 408, "request head not received in time")).await;
}

/// One CONNECT stream, after the bytes already read into `first`.
async fn connect<S: Stream>(server: &Arc<Server>, mut client: S, first: BytesMut, deadline: Instant) {
    // The phases before the relay run boxed: a task's state is as large as its largest phase and is held
    // for the stream's whole life, which is mostly the relay (thousands of idle streams are held at once).
    let head = Box::pin(tokio::time::timeout_at(deadline, frontend::read_connect(&mut client, first)));
    let req = match head.await {
        Ok(Ok(req)) => req,
        Ok(Err(e)) => return refuse_head(server, &mut client, HTTP_CONNECT, &e).await,
        Err(_) => return head_timeout(server, &mut client).await,
    };
    let stream_id = server.next_stream_id.fetch_add(1, Ordering::Relaxed);
    let span = info_span!("stream", id = stream_id, dest = %req);
    async move {
        let started = Instant::now();
        let (data, agent, slot) = match Box::pin(open(server, &req, stream_id)).await {
            Ok(opened) => opened,
            Err(e) => {
                log_refusal(server, e.reason(), &e);
                server.metrics.request(HTTP_CONNECT, e.reason());
                Box::pin(refuse(&mut client, e.status(), &e.to_string())).await;
                return;
            }
        };
        server.metrics.dial_duration.observe(started.elapsed().as_secs_f64());
        if let Err(error) = client.write_all(ESTABLISHED).await.and(client.flush().await) {
            debug!(%error, "client left before the stream opened");
            server.metrics.request(HTTP_CONNECT, "client_closed");
            let mut data = data;
            data.get_mut().abort();
            return;
        }
        server.metrics.request(HTTP_CONNECT, "ok");
        debug!(agent = %agent.identity.agent_id, "stream open");
        let reusable = relay_opened(server, &mut client, data, &req.early_data).await;
        drop((client, slot));
        if let Some(conn) = reusable {
            tokio::spawn(reuse(server.clone(), agent, conn));
        }
    }
    .instrument(span)
    .await;
}

/// Relays a stream over its opened data connection ([`carry`]); the connection back when it can carry
/// another stream.
pub(super) async fn relay_opened<S: Stream>(
    server: &Server,
    client: &mut S,
    data: Opened,
    early: &[u8],
) -> Option<DataConn> {
    match data {
        Opened::Counted(mut data) => carry(server, client, &mut data, early).await.then(|| data.into_inner()),
        Opened::Plain(mut data) => {
            carry(server, client, &mut data, early).await;
            None
        }
    }
}

/// Relays a stream until it ends, or until it sits idle while the server drains (then it is closed in
/// order); records it. `true` when its data connection can carry another stream.
async fn carry<S: Stream, D: DataSide>(server: &Server, client: &mut S, data: &mut D, early: &[u8]) -> bool {
    let activity = Activity::default();
    let outcome = {
        let _open = server.metrics.stream.opened();
        tokio::select! {
            outcome = server.datapath.relay(client, data, early, &activity) => Some(outcome),
            () = idle_while_draining(server, &activity) => None,
        }
    };
    if let Some(outcome) = outcome {
        server.metrics.stream.record(&outcome, ENDS);
        if outcome.failure.is_some() {
            return false;
        }
        if !data.reusable() {
            data.finish().await;
            return false;
        }
        true
    } else {
        debug!("idle while the server drains: closing the stream");
        server.metrics.drain_closed_idle.inc();
        close_orderly(client, data.conn()).await;
        false
    }
}

/// A stream's data connection as the relay takes it.
trait DataSide: Stream {
    /// The connection itself, for a real close.
    fn conn(&mut self) -> &mut DataConn;
    /// Whether it can carry another stream now.
    fn reusable(&self) -> bool;
    /// A clean stream whose connection is not reused: the real end, where only a count told it.
    async fn finish(&mut self) {}
}

impl DataSide for DataConn {
    fn conn(&mut self) -> &mut DataConn {
        self
    }

    fn reusable(&self) -> bool {
        false
    }
}

impl DataSide for Counted<DataConn> {
    fn conn(&mut self) -> &mut DataConn {
        self.get_mut()
    }

    fn reusable(&self) -> bool {
        Counted::reusable(self)
    }

    async fn finish(&mut self) {
        Counted::finish(self).await;
    }
}

/// A data connection ready for a stream: TLS ones end their stream by count and may carry the next.
pub(super) enum Opened {
    Counted(Counted<DataConn>),
    Plain(DataConn),
}

impl Opened {
    pub(super) fn get_mut(&mut self) -> &mut DataConn {
        match self {
            Self::Counted(c) => c.get_mut(),
            Self::Plain(c) => c,
        }
    }
}

/// A data connection that carried a stream to its end by count both ways, or a dial that failed: once
/// the agent sends `DataHello` on it (after a stream, when it has heard that the server read all it
/// wrote; after a failed dial, at once), it is parked again. A draining server lets it go.
pub(super) async fn reuse(server: Arc<Server>, agent: Arc<AgentHandle>, mut conn: DataConn) {
    if server.draining.is_cancelled() {
        return;
    }
    let deadline = Instant::now() + REUSE_TIMEOUT;
    match tokio::time::timeout_at(deadline, codec::read_message(&mut conn)).await {
        Ok(Ok(Message::DataHello { version, session_id }))
            if protocol::check_version(version).is_ok() && session_id == agent.session_id =>
        {
            server.metrics.stream.reused.inc();
            session::park(&server, conn, session_id, deadline).await;
        }
        Ok(Err(CodecError::Closed)) => debug!("the agent closed the data connection after its stream"),
        Ok(Ok(other)) => {
            warn!(agent = %agent.identity.agent_id, kind = other.kind(), "unexpected frame after a stream");
        }
        Ok(Err(error)) => debug!(%error, "data connection failed after its stream"),
        Err(_) => debug!("no DataHello after the stream: data connection closed"),
    }
}

/// Logs a refused or failed request at the default level (the apiserver shows its user only the status),
/// at most once per [`REFUSAL_LOG_INTERVAL`]; `count` says how many there were since the last line,
/// and `streams_total{result}` counts every one.
pub(super) fn log_refusal(server: &Server, reason: &'static str, error: &dyn std::fmt::Display) {
    if let Some(count) = server.refusal_log.note() {
        warn!(reason, %error, count, "request refused");
    }
}

/// The agent for `req`. A server that started moments ago (a restart) has not heard from every agent
/// yet: within [`STARTUP_WINDOW`] of its start it waits up to [`STARTUP_WAIT`] (and `deadline`) for
/// agents to connect before answering that none serves the destination. Later, the answer is immediate.
async fn route(
    server: &Server,
    req: &ConnectRequest,
    deadline: Instant,
) -> Result<Arc<AgentHandle>, DialError> {
    let now = Instant::now();
    let hold_until =
        if now < server.started + STARTUP_WINDOW { deadline.min(now + STARTUP_WAIT) } else { now };
    loop {
        let mut registrations = server.agents.registrations();
        if let Some(agent) = server.agents.route(&req.host) {
            return Ok(agent);
        }
        if Instant::now() >= hold_until
            || tokio::time::timeout_at(hold_until, registrations.changed()).await.is_err()
        {
            return Err(DialError::NoAgent(req.to_string()));
        }
    }
}

/// Returns once the server drains and the stream has sat idle, nothing in flight, for the drain's idle
/// timeout; never otherwise.
async fn idle_while_draining(server: &Server, activity: &Activity) {
    server.draining.cancelled().await;
    let idle_for = server.config.limits.drain_idle_timeout;
    let mut seen = activity.settled();
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(IDLE_CHECK.min(idle_for)).await;
        let now = activity.settled();
        if now.is_none() || now != seen {
            (seen, since) = (now, Instant::now());
        } else if since.elapsed() >= idle_for {
            return;
        }
    }
}

/// Ends an idle stream in order, both ways (FIN or TLS `close_notify`), as a server closing a kept-alive
/// connection does: the client sees an end between requests, not a reset.
pub(super) async fn close_orderly<S: Stream>(client: &mut S, data: &mut DataConn) {
    client.reset_on_close(false);
    data.reset_on_close(false);
    let both = async { tokio::join!(client.shutdown(), data.shutdown()) };
    if tokio::time::timeout(CLOSE_TIMEOUT, both).await.is_err() {
        client.abort();
        data.abort();
    }
}

/// Routes `req`, has an agent dial it, and returns the data connection ready for raw bytes, with the
/// agent and the stream slot held for the stream's life.
pub(super) async fn open(
    server: &Arc<Server>,
    req: &ConnectRequest,
    stream_id: u64,
) -> Result<(Opened, Arc<AgentHandle>, Slots), DialError> {
    let _pending = server.pending_dials.try_acquire().map_err(|_| DialError::Overloaded)?;
    // A guard, not a decrement after the dial: a gRPC client may abandon the dial (DIAL_CLS).
    let _counted = Pending::count(&server.metrics.pending_dials);
    dial(server, req, stream_id).await
}

/// What a stream holds for its life: a place under the server's stream cap and under its agent's.
pub(super) struct Slots {
    _server: OwnedSemaphorePermit,
    _agent: OwnedSemaphorePermit,
}

/// Counts a dial as pending until dropped.
struct Pending<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> Pending<'a> {
    fn count(gauge: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn dial(
    server: &Arc<Server>,
    req: &ConnectRequest,
    stream_id: u64,
) -> Result<(Opened, Arc<AgentHandle>, Slots), DialError> {
    let limits = &server.config.limits;
    let deadline = Instant::now() + limits.dial_timeout;
    let timeout_ms = u32::try_from(limits.dial_timeout.as_millis()).unwrap_or(u32::MAX);

    let server_slot = server.streams.clone().try_acquire_owned().map_err(|_| DialError::ServerBusy)?;
    let mut last_error = None;
    for _ in 0..MAX_DIAL_ATTEMPTS {
        let agent = route(server, req, deadline).await?;
        let agent_id = || agent.identity.agent_id.clone();
        let slot =
            agent.stream_slots.clone().try_acquire_owned().map_err(|_| DialError::AgentBusy(agent_id()))?;
        let parked = agent.take(deadline).await.ok_or_else(|| DialError::NoDataConn(agent_id()))?;
        let mut conn = parked.conn;
        // Every dial is signed: on a plain data connection no host on the path can forge or replay one,
        // and on any connection no stream bytes can pass for one.
        let nonces = parked.nonces.unwrap_or(Nonces::NONE);
        let mac = agent.data_key.dial_mac(&nonces, stream_id, &req.host, req.port, timeout_ms);
        let dial = Message::Dial { stream_id, host: req.host.clone(), port: req.port, timeout_ms, mac };
        // Registered before the dial: the agent may announce its end as soon as it has replied.
        let counted = conn.ends_by_count().then(|| agent.ends.register(stream_id, Side::Server)).flatten();
        let exchange = async {
            codec::write_message(&mut conn, &dial).await?;
            codec::read_message(&mut conn).await
        };
        match tokio::time::timeout_at(deadline + REPLY_MARGIN, exchange).await {
            Err(_) => {
                conn.abort();
                return Err(DialError::ReplyTimeout { agent: agent_id() });
            }
            Ok(Ok(Message::DialReply { stream_id: id, status: DialStatus::Ok, .. })) if id == stream_id => {
                let opened = match counted {
                    Some(registration) => Opened::Counted(Counted::new(conn, registration)),
                    None => Opened::Plain(conn),
                };
                return Ok((opened, agent, Slots { _server: server_slot, _agent: slot }));
            }
            Ok(Ok(Message::DialReply { stream_id: id, status: DialStatus::Draining, message }))
                if id == stream_id =>
            {
                // The agent started draining while this connection was parked: try another route.
                agent.draining.store(true, Ordering::Relaxed);
                agent.drop_idle();
                last_error =
                    Some(DialError::Agent { agent: agent_id(), status: DialStatus::Draining, message });
            }
            Ok(Ok(Message::DialReply { stream_id: id, status, message })) if id == stream_id => {
                // Nothing reached the destination: the agent parks the connection again at once.
                let agent_id = agent_id();
                tokio::spawn(reuse(server.clone(), agent, conn));
                return Err(DialError::Agent { agent: agent_id, status, message });
            }
            Ok(Ok(other)) => {
                warn!(agent = %agent_id(), kind = other.kind(), "unexpected frame on a data connection");
                conn.abort();
                last_error =
                    Some(DialError::AgentConn { agent: agent_id(), source: CodecError::Invalid("reply") });
            }
            // A parked connection that died: nothing reached the destination yet, so retrying is safe.
            Ok(Err(source)) => {
                debug!(agent = %agent_id(), error = %source, "data connection failed; trying another");
                last_error = Some(DialError::AgentConn { agent: agent_id(), source });
            }
        }
    }
    Err(last_error.expect("the loop ran at least once"))
}
