//! sk_skb stream verdict: redirect each skb arriving on a spliced socket to its peer's egress while the
//! direction has credit; pass it to the socket's own receive queue (under TCP flow control, for user
//! space to copy) while it has none.
//!
//! Redirected bytes are uncharged from the source socket at once and wait on the peer's psock queue,
//! which no socket memory accounts for (DESIGN.md §5 f). The credit bounds them: user space keeps
//! `Credit::allow` at the peer's acknowledged bytes plus the in-flight limit. Passing instead of
//! deleting the socket from the map is what makes the pause safe: the socket keeps its program, so no
//! skb ever meets a missing one (DESIGN.md §5 i).

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, sk_action},
    helpers::generated::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::error;
use proxy_ebpf_common::{Credit, Flow, splice};

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
    // SAFETY: user space writes the credit as a whole value into a map that is not preallocated, so
    // this reads one consistent (possibly older, hence smaller) value.
    let credit = unsafe { CREDITS.get(cookie) }.copied().unwrap_or_default();
    // SAFETY: `flow` points into the map value, valid for this program run. Verdicts of one socket run
    // one at a time (under its lock), and only this program writes the value after insertion.
    let flow = unsafe { &mut *flow };
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
