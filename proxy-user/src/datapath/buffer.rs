//! Byte buffers held only while bytes are in flight, from a small per-thread pool.

use std::cell::RefCell;

/// Idle buffers kept per thread for reuse (at most 1 MiB with 256 KiB buffers): enough for the streams
/// a thread moves in bulk at once, little for a process that then holds thousands of idle streams.
pub const POOLED_BUFFERS: usize = 4;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of at least `len` bytes: the smallest pooled one that is large enough, else a new one.
pub(crate) fn take(len: usize) -> Vec<u8> {
    let pooled = POOL.with_borrow_mut(|pool| {
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, b)| b.len() >= len)
            .min_by_key(|(_, b)| b.len())
            .map(|(i, _)| i);
        best.map(|i| pool.swap_remove(i))
    });
    pooled.unwrap_or_else(|| vec![0; len])
}

/// Returns a buffer to the pool, or frees it when the pool is full.
pub(crate) fn give(buf: Vec<u8>) {
    if buf.is_empty() {
        return;
    }
    POOL.with_borrow_mut(|pool| {
        if pool.len() < POOLED_BUFFERS {
            pool.push(buf);
        }
    });
}
