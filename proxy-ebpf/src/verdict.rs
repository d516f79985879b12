//! sk_skb stream verdict: redirect each skb arriving on a spliced socket to its peer's egress while the
//! direction has credit; pass it to the socket's own receive queue (under TCP flow control, for user
//! space to copy) while it has none.
//!
//! Redirected bytes are uncharged from the source socket at once and wait on the peer's psock queue,
//! which no socket memory accounts for (DESIGN.md §5 f). The credit bounds them: user space keeps
//! `Credit::allow` at the peer's acknowledged bytes plus the in-flight limit. Passing instead of
//! deleting the socket from the map is what makes the pause safe: the socket keeps its program, so no
//! skb ever meets a missing one (DESIGN.md §5 i).
//!
//! The kernel hands the program whole skbs from the receive queue, but TCP queues a retransmitted
//! segment whole when only its tail is new (and a segment the reader had half read before insertion
//! stays whole too). So the program tracks each direction's TCP sequence number and trims bytes it has
//! seen before (DESIGN.md §5 j).

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, sk_action},
    helpers::{bpf_probe_read_kernel, generated::bpf_get_socket_cookie},
    macros::{map, stream_verdict},
    maps::{HashMap, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::error;
use proxy_ebpf_common::{Credit, Flow, KernelOffsets, splice};

/// Set by user space from the kernel's BTF before loading; all zero turns sequence tracking off.
#[unsafe(no_mangle)]
static KERNEL_OFFSETS: KernelOffsets = KernelOffsets { skb_cb: 0, skb_sk: 0, copied_seq: 0, pad: 0 };

/// `bpf_skb_adjust_room` removes at most this many bytes per call on an sk_skb.
const TRIM_STEP: u32 = 4095;
/// Calls allowed for one trim: up to 640 KiB, more than an skb of 17 fragments (`MAX_SKB_FRAGS` here) of
/// 32 KiB (the page fragments TCP sends from) and its head. The retransmits traced here overlapped by 1
/// or 2 segments of 64 KiB; a longer overlap resets the stream.
const TRIM_STEPS: u32 = 160;

#[map]
static SOCKS: SockHash<u64> = SockHash::with_max_entries(splice::MAX_SOCKETS, 0);

#[map]
static FLOWS: HashMap<u64, Flow> = HashMap::with_max_entries(splice::MAX_SOCKETS, 0);

#[map]
static CREDITS: HashMap<u64, Credit> = HashMap::with_max_entries(splice::MAX_SOCKETS, BPF_F_NO_PREALLOC);

const PASS: u32 = sk_action::SK_PASS;
const DROP: u32 = sk_action::SK_DROP;

#[stream_verdict]
pub fn verdict(ctx: SkBuffContext) -> u32 {
    match try_verdict(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

fn try_verdict(ctx: &SkBuffContext) -> Result<u32, u32> {
    let len = u64::from(ctx.len());
    // A zero-length skb carries only a FIN, which the socket state already recorded. Redirected, it
    // would make the peer's backlog worker fail and silently drop the rest of the stream (DESIGN.md §5 a).
    if len == 0 {
        return Err(DROP);
    }
    // SAFETY: the helper only reads the socket the skb belongs to.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // Not (or no longer) paired: deliver to this socket's own receive queue, under TCP flow control.
    let flow = FLOWS.get_ptr_mut(cookie).ok_or(PASS)?;
    // SAFETY: `flow` points into the map value, valid for this program run. Verdicts of one socket run
    // one at a time (under its lock), and only this program writes the value after insertion.
    let flow = unsafe { &mut *flow };
    let len = new_bytes(ctx, flow, len)?;
    // SAFETY: user space writes the credit as a whole value into a map that is not preallocated, so
    // this reads one consistent (possibly older, hence smaller) value.
    let credit = unsafe { CREDITS.get(cookie) }.copied().unwrap_or_default();
    let end = flow.redirected + len;
    if flow.paused != 0 {
        // Resume only once user space has copied every passed byte, so redirected bytes queue behind them.
        if !(end <= credit.allow && flow.passed == credit.written) {
            flow.passed += len;
            return Err(PASS);
        }
        flow.paused = 0;
        flow.resumes += 1;
    } else if end > credit.allow {
        flow.paused = 1;
        flow.pauses += 1;
        flow.passed += len;
        return Err(PASS);
    }
    // The pair must name each other: an entry left over or written for another stream never steers
    // bytes into a socket that is not this one's peer. (Cookies are never reused while the system runs.)
    // SAFETY: a plain read of a map value; only its `peer_cookie`, which never changes after insertion.
    let paired = unsafe { FLOWS.get(flow.peer_cookie) }.is_some_and(|peer| peer.peer_cookie == cookie);
    if !paired {
        flow.failed += 1;
        error!(ctx, "socket {} names {} as its peer, which does not name it back", cookie, flow.peer_cookie);
        return Err(DROP);
    }
    let mut peer_cookie = flow.peer_cookie;
    let action = SOCKS.redirect_skb(ctx, &mut peer_cookie, 0);
    if action == i64::from(PASS) {
        flow.redirected += len;
    } else {
        // Rare, and fatal for the stream: user space resets it when it sees the counter.
        flow.failed += 1;
        error!(ctx, "redirect of {} bytes from socket {} to {} failed", len, cookie, flow.peer_cookie);
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "sk_action values are 0 or 1"
    )]
    Ok(action as u32)
}

/// Reads `T` at `base + offset` in kernel memory.
fn kernel_read<T>(base: u64, offset: u32) -> Option<T> {
    let at = base.checked_add(u64::from(offset))?;
    // SAFETY: the helper copies from kernel memory and fails cleanly on a bad address.
    unsafe { bpf_probe_read_kernel(at as *const T) }.ok()
}

/// How many of this skb's `len` bytes are new: drops an skb made only of bytes seen before, trims
/// such bytes off its head, and resets the stream on a gap (which TCP never delivers in order).
fn new_bytes(ctx: &SkBuffContext, flow: &mut Flow, len: u64) -> Result<u64, u32> {
    // SAFETY: a volatile read of a global, so the compiler cannot fold the loader's value away.
    let offsets = unsafe { core::ptr::read_volatile(&raw const KERNEL_OFFSETS) };
    if offsets.skb_cb == 0 {
        return Ok(len);
    }
    // The context of an sk_skb program is the kernel's `struct sk_buff`; TCP's control block starts
    // with the segment's sequence number.
    let skb = ctx.skb.skb as u64;
    let Some(seq) = kernel_read::<u32>(skb, offsets.skb_cb) else {
        return Ok(len);
    };
    if flow.tracking == 0 {
        // The first skb since insertion: everything before the socket's `copied_seq` was read already.
        let copied =
            kernel_read::<u64>(skb, offsets.skb_sk).and_then(|sk| kernel_read::<u32>(sk, offsets.copied_seq));
        flow.next_seq = copied.unwrap_or(seq);
        flow.tracking = 1;
    }
    #[expect(clippy::cast_possible_truncation, reason = "sequence numbers wrap at 32 bits")]
    let end = seq.wrapping_add(len as u32);
    // Bytes at the head of this skb the direction has seen before; negative is a gap.
    #[expect(clippy::cast_possible_wrap, reason = "sequence space arithmetic: the sign is the order")]
    let seen = flow.next_seq.wrapping_sub(seq) as i32;
    if seen < 0 {
        flow.failed += 1;
        error!(ctx, "{} bytes missing before sequence {}", seen.unsigned_abs(), seq);
        return Err(DROP);
    }
    if seen == 0 {
        flow.next_seq = end;
        return Ok(len);
    }
    #[expect(clippy::cast_sign_loss, reason = "positive here")]
    let old = seen as u32;
    if u64::from(old) >= len {
        flow.trimmed += len;
        return Err(DROP);
    }
    let mut left = old;
    for _ in 0..TRIM_STEPS {
        if left == 0 {
            break;
        }
        let step = left.min(TRIM_STEP);
        #[expect(clippy::cast_possible_wrap, reason = "at most TRIM_STEP")]
        if ctx.adjust_room(-(step as i32), 0, 0).is_err() {
            break;
        }
        left -= step;
    }
    if left != 0 {
        flow.failed += 1;
        error!(ctx, "could not trim {} of {} bytes seen before", left, old);
        return Err(DROP);
    }
    flow.trimmed += u64::from(old);
    flow.next_seq = end;
    Ok(len - u64::from(old))
}
