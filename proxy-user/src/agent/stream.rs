//! One stream on the node side: policy, resolve, dial the target, reply, relay, record.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::Agent;
use super::policy::Policy;
use super::pool::{Dial, Refill};
use crate::codec;
use crate::datapath::Activity;
use crate::metrics::inc;
use crate::protocol::{DialStatus, Message};
use crate::transport::counted::{Counted, REUSE_TIMEOUT, Registration};
use crate::transport::{DialedLink, Stream};

/// The relay's ends, as its log names them.
const ENDS: [&str; 2] = ["downstream (server)", "upstream (target)"];

/// A failed dial: the status for the server and a detail.
struct DialFailure {
    status: DialStatus,
    message: String,
}

fn failure(status: DialStatus, message: impl Into<String>) -> DialFailure {
    DialFailure { status, message: message.into() }
}

/// The addresses `host` stands for: an address literal, the node's own addresses for its own names, or
/// what DNS answers.
async fn resolve(agent: &Agent, host: &str, port: u16) -> Result<Vec<IpAddr>, DialFailure> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    let identity = &agent.config.identity;
    let own_name = host == identity.node_name || identity.hostnames.iter().any(|h| h == host);
    if own_name && !identity.addresses.is_empty() {
        return Ok(identity.addresses.clone());
    }
    let found: Vec<IpAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| failure(DialStatus::Unresolved, format!("resolve {host}: {e}")))?
        .map(|a| a.ip())
        .collect();
    if found.is_empty() {
        return Err(failure(DialStatus::Unresolved, format!("{host} has no addresses")));
    }
    Ok(found)
}

/// Keeps the addresses the policy allows; none allowed is a denial.
fn allowed(policy: &Policy, addrs: Vec<IpAddr>, port: u16) -> Result<Vec<IpAddr>, DialFailure> {
    let mut denial = None;
    let ok: Vec<IpAddr> = addrs
        .into_iter()
        .filter(|ip| match policy.check(*ip, port) {
            Ok(()) => true,
            Err(d) => {
                denial.get_or_insert((*ip, d));
                false
            }
        })
        .collect();
    match (ok.is_empty(), denial) {
        (true, Some((ip, d))) => {
            Err(failure(DialStatus::Denied, format!("{ip}:{port} denied: {}", d.describe())))
        }
        _ => Ok(ok),
    }
}

async fn connect(addrs: &[IpAddr], port: u16) -> Result<TcpStream, DialFailure> {
    let mut last = None;
    for ip in addrs {
        match TcpStream::connect(SocketAddr::new(*ip, port)).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some((SocketAddr::new(*ip, port), e)),
        }
    }
    let (addr, e) = last.expect("at least one address was tried");
    let status =
        if e.kind() == io::ErrorKind::ConnectionRefused { DialStatus::Refused } else { DialStatus::Failed };
    Err(failure(status, format!("connect {addr}: {e}")))
}

async fn open(agent: &Agent, host: &str, port: u16, timeout: Duration) -> Result<TcpStream, DialFailure> {
    if agent.draining.load(Ordering::Relaxed) {
        return Err(failure(DialStatus::Draining, "agent is draining"));
    }
    // The stream's own task counts: more than the cap means it is one too many.
    let max = agent.config.max_streams;
    if agent.streams.len() > max {
        return Err(failure(DialStatus::Busy, format!("agent holds --max-streams {max} streams")));
    }
    let attempt = async {
        let addrs = allowed(&agent.config.policy, resolve(agent, host, port).await?, port)?;
        connect(&addrs, port).await
    };
    tokio::time::timeout(timeout, attempt).await.unwrap_or_else(|_| {
        Err(failure(DialStatus::Timeout, format!("no connection to {host}:{port} within {timeout:?}")))
    })
}

/// A dial still unanswered after this long has its connection replaced in the pool at once rather
/// than at its reply: dials that hang (a destination whose SYNs go unanswered) must not take the
/// parked connections other streams need, and a fast dial still keeps its replacement's handshake
/// off its path (see [`Refill`]).
const SLOW_DIAL: Duration = Duration::from_millis(50);

/// [`open`], dropping `refill` if the dial takes longer than [`SLOW_DIAL`]; returns it otherwise.
async fn open_refilling(
    agent: &Agent,
    host: &str,
    port: u16,
    timeout: Duration,
    refill: Refill,
) -> (Result<TcpStream, DialFailure>, Option<Refill>) {
    let opening = open(agent, host, port, timeout);
    tokio::pin!(opening);
    tokio::select! {
        biased;
        opened = &mut opening => (opened, Some(refill)),
        () = tokio::time::sleep(SLOW_DIAL) => {
            drop(refill);
            (opening.await, None)
        }
    }
}

/// Serves one `Dial` that arrived on `conn`; `refill` is dropped once the reply is written, the dial
/// proves slow (see [`SLOW_DIAL`]) or the stream ends before, which wakes the pool to replace `conn`. A TLS connection (`counted`) comes
/// back when its stream ended by count both ways and the server read all the agent wrote: it can
/// carry the next stream.
pub(super) async fn serve(
    agent: &Agent,
    mut conn: DialedLink,
    dial: Dial,
    refill: Refill,
    counted: Option<Registration>,
) -> Option<DialedLink> {
    let Dial { stream_id, host, port, timeout_ms } = dial;
    let host = host.as_str();
    let timeout = Duration::from_millis(timeout_ms.into()).min(agent.config.dial_timeout);
    let started = Instant::now();
    // The dial runs boxed: a task's state is as large as its largest phase and is held for the stream's
    // whole life, which is mostly the relay (thousands of idle streams are held at once).
    let (opened, refill) = Box::pin(open_refilling(agent, host, port, timeout, refill)).await;
    agent.metrics.dial_duration.observe(started.elapsed().as_secs_f64());
    let (status, message, target) = match opened {
        Ok(t) => (DialStatus::Ok, String::new(), Some(t)),
        Err(f) => {
            debug!(status = f.status.as_str(), message = %f.message, "dial failed");
            (f.status, f.message, None)
        }
    };
    inc(&agent.metrics.stream.results, "result", status.as_str());
    let reply = Message::DialReply { stream_id, status, message };
    let written = Box::pin(codec::write_message(&mut conn, &reply)).await;
    drop(refill);
    if let Err(error) = written {
        debug!(%error, "server left before the dial reply");
        return None;
    }
    // A failed dial leaves the connection as it was parked: it takes the next stream (the server
    // expects its `DataHello`; a draining agent closes it instead).
    let Some(mut target) = target else { return Some(conn) };
    let Some(registration) = counted else {
        relay(agent, &mut conn, &mut target).await;
        return None;
    };
    let mut conn = Counted::new(conn, registration);
    if !relay(agent, &mut conn, &mut target).await {
        return None;
    }
    if !conn.reusable() {
        conn.finish().await;
        return None;
    }
    drop(target);
    let heard = tokio::time::timeout(REUSE_TIMEOUT, conn.read_acknowledged()).await;
    matches!(heard, Ok(true)).then(|| conn.into_inner())
}

/// Relays a stream and records it; `true` for a clean end both ways.
async fn relay<C: Stream>(agent: &Agent, conn: &mut C, target: &mut TcpStream) -> bool {
    let outcome = {
        let _open = agent.metrics.stream.opened();
        agent.datapath.relay(conn, target, &[], &Activity::default()).await
    };
    agent.metrics.stream.record(&outcome, ENDS);
    outcome.failure.is_none()
}
