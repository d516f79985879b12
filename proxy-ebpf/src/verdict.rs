//! sk_skb stream verdict: redirect each skb arriving on a spliced socket to its peer's egress.

use aya_ebpf::{
    bindings::sk_action,
    helpers::generated::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, SockHash},
    programs::SkBuffContext,
};
use proxy_ebpf_common::{Peer, splice};

#[map]
static SOCKS: SockHash<u64> = SockHash::with_max_entries(splice::MAX_SOCKETS, 0);

#[map]
static PEERS: HashMap<u64, Peer> = HashMap::with_max_entries(splice::MAX_SOCKETS, 0);

#[stream_verdict]
pub fn verdict(ctx: SkBuffContext) -> u32 {
    match try_verdict(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

fn try_verdict(ctx: &SkBuffContext) -> Result<u32, u32> {
    let len = ctx.len();
    // A zero-length skb carries only a FIN, which the socket state already recorded. Redirected, it
    // would make the peer's backlog worker fail and silently drop the rest of the stream (DESIGN.md §5 a).
    if len == 0 {
        return Err(sk_action::SK_DROP);
    }
    // SAFETY: the helper only reads the socket the skb belongs to.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // Not (or no longer) paired: deliver to this socket's own receive queue, under TCP flow control.
    let peer = PEERS.get_ptr_mut(&cookie).ok_or(sk_action::SK_PASS)?;
    // SAFETY: `peer` points into the map value, valid for the duration of this program run.
    let mut peer_cookie = unsafe { (*peer).peer_cookie };
    let action = SOCKS.redirect_skb(ctx, &mut peer_cookie, 0);
    // SAFETY: as above; the counters are only written by this program, per socket, in softirq order.
    unsafe {
        if action == i64::from(sk_action::SK_PASS) {
            (*peer).redirected += u64::from(len);
        } else {
            (*peer).failed += 1;
        }
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "sk_action values are 0 or 1"
    )]
    Ok(action as u32)
}
