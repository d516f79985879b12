//! One stream through the sockmap tier.
//!
//! Both sockets go into the maps; from then on the kernel redirects each direction's bytes while it has
//! credit, and a task per direction keeps watch:
//! - Credit: redirected bytes wait on the peer's psock queue, charged to no socket, so nothing else
//!   bounds them (DESIGN.md §5 f). The task keeps `Credit::allow` at the bytes the peer's far end
//!   acknowledged plus [`Limits::backlog`], minus what it copied itself; past it the program passes
//!   skbs to the source's own receive queue, where they are charged and TCP flow control holds the
//!   sender. The peer's send buffer is forced to four times the limit, so the kernel worker that sends
//!   redirected bytes never finds it full: on a full queue it may send part of an skb and retry a jiffy
//!   (4 ms) later, a path that stalls the stream and that the kernel has had to fix for lost and
//!   repeated bytes more than once (DESIGN.md §5 j).
//! - Paused: the task reads the passed bytes and writes them to the peer, each time only after every
//!   redirected byte has entered the peer's send queue and the backlog has room, and publishes what it
//!   wrote. The program resumes redirecting at the first skb that arrives once every passed byte is
//!   written and the credit allows, so order is kept both ways. A sender faster than this copy keeps the
//!   direction copying until it slows down: it is then a userspace relay, as fast as the copy tier.
//! - Duplicates: the program can never see more bytes than TCP received on the source socket
//!   (`tcpi_bytes_received`), yet on 6.18 it sometimes does (whole segments handed to it twice, DESIGN.md
//!   §5 j). Every refresh, and the end point, compares the two; a surplus resets both sides, so such a
//!   stream ends as an error and never as a complete stream.
//! - End: `recv() == 0` with every passed byte read is the end point; the FIN is passed on only after
//!   every redirected or copied byte has entered the peer's send queue (acknowledged + `SIOCOUTQ`),
//!   never earlier (trap e). An error on the peer (`SO_ERROR`), a failed redirect or a wait without
//!   progress for [`Limits::stall`] resets both sides: a truncated stream never ends with a FIN.
//! - Wake-ups: every redirected skb also wakes readers of the source, who then find nothing (the
//!   spurious EAGAIN of trap b). After one, the task waits for its tick instead of readiness, so a busy
//!   stream costs at most one wake-up per tick; an idle one sleeps on readiness and a long tick. Waits
//!   for the kernel (a queue to drain) use a 100 µs tick: tokio's timer rounds up to milliseconds.
//!
//! The pair leaves the maps when both directions have ended (removal discards whatever is queued).

use std::io::{self, Read as _};
use std::time::Duration;

use proxy_ebpf_common::Credit;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{Pair, PairError, Sockmap, SockmapError, tick};
use crate::datapath::splice::Spliceable as _;
use crate::datapath::{End, Moved, RelayError, buffer, tcp};
use crate::transport::Stream;

/// Default of [`Limits::backlog`].
pub const DEFAULT_BACKLOG: u64 = 2 << 20;
/// Default of [`Limits::stall`].
pub const DEFAULT_STALL: Duration = Duration::from_mins(1);
/// Tick of a direction that is moving bytes: how often credit is granted and errors checked.
pub const TICK_BUSY: Duration = Duration::from_millis(1);
/// Longest tick of an idle direction (the tick doubles from [`TICK_BUSY`] while nothing moves). With
/// every byte acknowledged nothing needs watching: an idle tick costs one map lookup and one read
/// attempt. A burst after idling redirects up to the backlog limit on the credit it has; beyond that it
/// pauses, and the passed bytes wake the direction at once (passed bytes, a FIN and an error do wake it;
/// redirected ones do not reliably).
pub const TICK_IDLE: Duration = Duration::from_secs(10);
/// Buffer for bytes copied while a direction is paused (as large as the copy tier's largest).
pub const COPY_BUF: usize = crate::datapath::copy::MAX_BUF;

/// Bounds of one spliced stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes one direction may hold on their way out: redirected or copied to the peer and not yet
    /// acknowledged by its far end. Redirected bytes first wait in a kernel queue that no socket memory
    /// accounts for; this bounds them, and the peer's send queue with them.
    pub backlog: u64,
    /// A wait without progress (for the peer's queue to take the bytes before a FIN, or for passed bytes
    /// to arrive) longer than this resets the stream.
    pub stall: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self { backlog: DEFAULT_BACKLOG, stall: DEFAULT_STALL }
    }
}

/// What a spliced stream did.
#[derive(Debug)]
pub struct Spliced {
    /// Bytes moved each way, or the failure (both sides were reset).
    pub result: Result<Moved, RelayError>,
    /// Why the stream was copied instead: the second socket could not be inserted after the first was.
    pub fallback: Option<&'static str>,
    /// Bytes copied in user space while a direction was paused (the rest was redirected).
    pub copied: u64,
    /// Times a direction ran out of credit.
    pub pauses: u64,
    /// Times a paused direction went back to splicing.
    pub resumes: u64,
    /// Largest backlog seen in one direction: bytes redirected or copied, not yet acknowledged.
    pub peak_backlog: u64,
    /// Bytes the kernel handed to the program a second time, which it trimmed off (DESIGN.md §5 j).
    pub trimmed: u64,
    /// Bytes the program forwarded beyond what TCP received: non-zero only when that reset the stream.
    /// The trim leaves none; this is the check behind it.
    pub duplicated: u64,
}

/// Splices `a` and `b` through `map` until both directions have ended. `Err` means the pair could not
/// be inserted (e.g. a socket already received FIN, DESIGN.md §5 c): nothing moved, and the caller
/// takes another tier.
pub async fn relay(
    map: &Sockmap,
    a: &TcpStream,
    b: &TcpStream,
    limits: Limits,
) -> Result<Spliced, SockmapError> {
    // What each send queue already took and had acknowledged, and what each socket had read, before any
    // redirect can add to them (bytes still queued unread will go through the program).
    let base = |s: &TcpStream| -> Result<Base, SockmapError> {
        Ok(Base {
            sent: tcp::send_progress(s)?,
            read: tcp::bytes_received(s)?.saturating_sub(tcp::receive_queue(s)?),
        })
    };
    let (base_a, base_b) = (base(a)?, base(b)?);
    for s in [a, b] {
        tcp::force_send_buffer(s, 2 * limits.backlog)?;
    }
    let (pair, fallback) = match map.pair(a, b, limits.backlog) {
        Ok(pair) => (pair, None),
        Err(PairError { error, half: None }) => return Err(*error),
        // One socket is in and passes everything: copy the stream, unpair at the end (see PairError).
        Err(PairError { error, half: Some(pair) }) => (pair, Some(error.reason())),
    };
    let guard = Unpair { map, pair };
    let copy_only = fallback.is_some();
    let mut up = Direction::new(map, pair.a, a, b, (base_a.read, base_b), limits, copy_only);
    let mut down = Direction::new(map, pair.b, b, a, (base_b.read, base_a), limits, copy_only);
    let result = run_both(&mut up, &mut down).await;
    if result.is_err() {
        Stream::abort(a);
        Stream::abort(b);
    }
    drop(guard);
    Ok(Spliced {
        result,
        fallback,
        copied: up.copied + down.copied,
        pauses: up.pauses + down.pauses,
        resumes: up.resumes + down.resumes,
        peak_backlog: up.peak_backlog.max(down.peak_backlog),
        trimmed: up.trimmed + down.trimmed,
        duplicated: up.duplicated + down.duplicated,
    })
}

async fn run_both(up: &mut Direction<'_>, down: &mut Direction<'_>) -> Result<Moved, RelayError> {
    let ((end, source), a_to_b, b_to_a) = match crate::datapath::both_directions(up.run(), down.run()).await {
        Ok(moved) => return Ok(moved),
        Err(failure) => failure,
    };
    let moved = (a_to_b.unwrap_or(up.moved()), b_to_a.unwrap_or(down.moved()));
    Err(RelayError { end, source, moved })
}

/// A socket's counters when the pair was inserted.
#[derive(Clone, Copy, Debug)]
struct Base {
    /// How far its sending had got.
    sent: tcp::SendProgress,
    /// Bytes it had received and that had been read (what is still queued goes through the program).
    read: u64,
}

/// Removes the pair from the maps however the relay ends (also when its future is dropped).
struct Unpair<'a> {
    map: &'a Sockmap,
    pair: Pair,
}

impl Drop for Unpair<'_> {
    fn drop(&mut self) {
        self.map.unpair(self.pair);
    }
}

/// A failure and the end it happened on: `End::A` the source, `End::B` the peer.
type Failure = (End, io::Error);

fn lost(what: &str) -> Failure {
    (End::B, io::Error::other(format!("sockmap: {what}")))
}

/// One direction: bytes arriving on `src` leave through `dst`.
struct Direction<'a> {
    map: &'a Sockmap,
    cookie: u64,
    src: &'a TcpStream,
    dst: &'a TcpStream,
    limits: Limits,
    /// How far `dst`'s sending had got when the pair was inserted.
    sent_base: tcp::SendProgress,
    /// Bytes `src` had received and read before the pair was inserted.
    read_base: u64,
    /// Bytes redirected, as of the last refresh.
    redirected: u64,
    /// Passed bytes, as of the last refresh.
    passed: u64,
    /// Bytes this task read from `src` and wrote to `dst`.
    copied: u64,
    /// Bytes that entered `dst`'s send queue since insertion, as of the last refresh.
    entered: u64,
    /// Bytes `dst`'s far end acknowledged since insertion, as of the last refresh.
    acked: u64,
    /// The credit last granted.
    granted: Credit,
    /// Never grant credit: the pair is only half in the map, every byte is copied.
    copy_only: bool,
    tick: Duration,
    pauses: u64,
    resumes: u64,
    peak_backlog: u64,
    /// Bytes the program trimmed off as seen before.
    trimmed: u64,
    /// Bytes the program forwarded beyond what TCP received, when that ended the stream.
    duplicated: u64,
}

impl<'a> Direction<'a> {
    fn new(
        map: &'a Sockmap,
        cookie: u64,
        src: &'a TcpStream,
        dst: &'a TcpStream,
        (read_base, dst_base): (u64, Base),
        limits: Limits,
        copy_only: bool,
    ) -> Self {
        Self {
            map,
            cookie,
            src,
            dst,
            limits,
            sent_base: dst_base.sent,
            read_base,
            redirected: 0,
            passed: 0,
            copied: 0,
            entered: 0,
            acked: 0,
            granted: Credit { allow: if copy_only { 0 } else { limits.backlog }, written: 0 },
            copy_only,
            tick: TICK_BUSY,
            pauses: 0,
            resumes: 0,
            peak_backlog: 0,
            trimmed: 0,
            duplicated: 0,
        }
    }

    fn moved(&self) -> u64 {
        self.redirected + self.copied
    }

    /// Reads the program's counters, checks the peer for errors, and grants credit up to the bytes that
    /// entered the peer's send queue plus the limit. Returns whether bytes were redirected since the last
    /// refresh.
    fn refresh(&mut self) -> Result<bool, Failure> {
        let flow = self.map.flow(self.cookie).ok_or_else(|| lost("flow left the map"))?;
        if flow.failed > 0 {
            return Err(lost(
                "the program could not forward an skb (failed redirect, untrimmable head or gap)",
            ));
        }
        // Idle: nothing new from the program and every byte acknowledged, so the credit stands. (An error
        // on `dst` wakes the other direction, which reads it.) Skipping the socket reads here is what
        // makes thousands of idle streams cheap.
        if (flow.redirected, flow.passed) == (self.redirected, self.passed) && self.backlog() == 0 {
            return Ok(false);
        }
        if let Some(e) = self.dst.take_error().map_err(|e| (End::B, e))? {
            return Err((End::B, e));
        }
        let moved = self.redirected != flow.redirected;
        (self.redirected, self.passed, self.pauses, self.resumes, self.trimmed) =
            (flow.redirected, flow.passed, flow.pauses, flow.resumes, flow.trimmed);
        // The program cannot have forwarded more than TCP received (read after the counters, so a later
        // arrival only adds to the right side). It trims what the kernel hands it twice (DESIGN.md §5 j);
        // should that ever miss, reset rather than deliver a corrupt stream as if it were whole.
        let received = tcp::bytes_received(self.src).map_err(|e| (End::A, e))?.saturating_sub(self.read_base);
        if self.redirected + self.passed > received {
            self.duplicated = self.redirected + self.passed - received;
            return Err(lost(&format!("the kernel delivered {} bytes twice", self.duplicated)));
        }
        self.measure()?;
        self.grant()?;
        Ok(moved)
    }

    /// Reads what entered `dst`'s send queue and what its far end acknowledged; records the backlog.
    fn measure(&mut self) -> Result<(), Failure> {
        let sent = tcp::send_progress(self.dst).map_err(|e| (End::B, e))?;
        self.entered = sent.entered.saturating_sub(self.sent_base.entered);
        // Bytes still in the send queue at insertion (e.g. the agent's reply on the data connection) are
        // acknowledged before any of ours: only acknowledgements beyond them count.
        self.acked = sent.acked.saturating_sub(self.sent_base.entered);
        self.peak_backlog = self.peak_backlog.max(self.backlog());
        Ok(())
    }

    /// Bytes redirected or copied, not yet acknowledged by `dst`'s far end.
    fn backlog(&self) -> u64 {
        (self.redirected + self.copied).saturating_sub(self.acked)
    }

    /// Bytes redirected (or copied) but not yet in `dst`'s send queue: none means that queue holds, in
    /// order, everything sent so far.
    fn queued(&self) -> u64 {
        (self.redirected + self.copied).saturating_sub(self.entered)
    }

    /// Grants credit up to the backlog limit and publishes the bytes copied so far.
    fn grant(&mut self) -> Result<(), Failure> {
        if self.copy_only {
            return Ok(());
        }
        let credit = Credit {
            allow: (self.acked + self.limits.backlog).saturating_sub(self.copied),
            written: self.copied,
        };
        if credit != self.granted {
            self.map.set_credit(self.cookie, credit).map_err(|e| lost(&e.to_string()))?;
            self.granted = credit;
        }
        Ok(())
    }

    /// Reads passed bytes from `src`. Tries the syscall even when tokio believes the socket has nothing,
    /// since a redirect can consume what woke it and a later arrival may not wake it again (trap b).
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self.src.try_read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => (&*socket2::SockRef::from(self.src)).read(buf),
            other => other,
        }
    }

    async fn run(&mut self) -> Result<u64, Failure> {
        let mut buf: Vec<u8> = Vec::new();
        let mut spurious = false;
        let mut waiting_since: Option<Instant> = None;
        let mut copying = false;
        loop {
            // While copying, `copy` keeps the counters and the credit current; go straight to the next read.
            if !copying {
                let moved = self.refresh()?;
                self.tick = if moved { TICK_BUSY } else { (self.tick * 2).min(TICK_IDLE) };
            }
            if buf.is_empty() {
                buf = buffer::take(COPY_BUF);
            }
            match self.read(&mut buf) {
                // End of stream: every verdict before the FIN has run, so the counters read now are final.
                // (A socket outside the map passes nothing: everything read from it was copied.) A
                // reset socket in the map also reads as end of stream: its error tells them apart. Both
                // directions run in this task, so whichever takes a socket's error first ends the relay
                // before the other can act on the missing error.
                Ok(0) if self.refresh().map(|_| self.copied >= self.passed)? => {
                    if let Some(e) = self.src.take_error().map_err(|e| (End::A, e))? {
                        return Err((End::A, e));
                    }
                    break;
                }
                Ok(0) => {
                    // End of stream, but passed bytes queued behind the peer's kernel worker are still on
                    // their way to the receive queue.
                    let since = *waiting_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > self.limits.stall {
                        return Err(lost("passed bytes never arrived after end of stream"));
                    }
                    tick::fine_sleep().await;
                }
                Ok(n) => {
                    waiting_since = None;
                    self.copy(&buf[..n]).await?;
                    self.tick = TICK_BUSY;
                    spurious = false;
                    copying = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    copying = false;
                    buffer::give(std::mem::take(&mut buf));
                    if spurious {
                        tick::fine_sleep().await;
                        spurious = false;
                    } else {
                        // Redirected bytes do not reliably wake `src`'s readers (by the time epoll polls
                        // the socket, the program has taken them), hence the tick.
                        tokio::select! {
                            r = self.src.ready(Interest::READABLE) => {
                                r.map_err(|e| (End::A, e))?;
                                spurious = true;
                            }
                            () = tokio::time::sleep(self.tick) => {}
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err((End::A, e)),
            }
        }
        buffer::give(buf);
        self.drain(0).await?;
        let moved = self.moved();
        self.dst.end_write(moved).await.map_err(|e| (End::B, e))?;
        Ok(moved)
    }

    /// Writes bytes the program passed, after every byte redirected before them, and publishes them.
    async fn copy(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        // Room for the copy and for the next skbs after it, so the program resumes at once.
        self.drain(bytes.len() as u64 + self.limits.backlog / 4).await?;
        let mut rest = bytes;
        let deadline = Instant::now() + self.limits.stall;
        while !rest.is_empty() {
            match self.dst.try_write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let ready = tokio::time::timeout_at(deadline, self.dst.ready(Interest::WRITABLE)).await;
                    ready
                        .map_err(|_| (End::B, io::Error::from(io::ErrorKind::TimedOut)))?
                        .map_err(|e| (End::B, e))?;
                }
                Err(e) => return Err((End::B, e)),
            }
        }
        self.copied += bytes.len() as u64;
        // Publish at once: a paused direction resumes only when `written` catches up with `passed`.
        self.measure()?;
        self.grant()
    }

    /// Waits until every byte redirected or copied so far has entered `dst`'s send queue, where TCP keeps
    /// it through retransmissions and a later FIN or copied byte cannot overtake it. With `room`, also
    /// until the backlog leaves that many bytes of the limit free, so a copy keeps the send queue within
    /// its bound. A paused direction waits here with its sender held by TCP flow control.
    async fn drain(&mut self, room: u64) -> Result<(), Failure> {
        let mut last = 0;
        let mut deadline = Instant::now() + self.limits.stall;
        loop {
            self.refresh()?;
            if self.queued() == 0 && self.backlog() + room <= self.limits.backlog.max(room) {
                return Ok(());
            }
            if self.acked + self.entered != last {
                last = self.acked + self.entered;
                deadline = Instant::now() + self.limits.stall;
            } else if Instant::now() > deadline {
                return Err((End::B, io::Error::new(io::ErrorKind::TimedOut, "sockmap: peer queue stalled")));
            }
            tick::fine_sleep().await;
        }
    }
}
