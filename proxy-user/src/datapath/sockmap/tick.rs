//! A fine tick for directions waiting on the kernel (a backlog to drain, passed bytes to arrive): no
//! readiness event says when those are done, and tokio's timer wheel rounds sleeps up to whole
//! milliseconds, while a backlog of a few MiB drains in about 2 ms. One thread wakes every
//! [`FINE_TICK`] while any direction waits, and sleeps on a condition variable otherwise.

use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;

/// Interval of the fine tick.
pub const FINE_TICK: Duration = Duration::from_micros(100);

#[derive(Default)]
struct Waiters {
    list: Mutex<Vec<Arc<Notify>>>,
    wake: Condvar,
}

fn waiters() -> &'static Waiters {
    static WAITERS: OnceLock<&'static Waiters> = OnceLock::new();
    WAITERS.get_or_init(|| {
        let w: &'static Waiters = Box::leak(Box::default());
        std::thread::Builder::new()
            .name("spoke-fine-tick".into())
            .spawn(move || {
                loop {
                    let due = {
                        let mut list = w.list.lock().expect("fine tick lock poisoned");
                        while list.is_empty() {
                            list = w.wake.wait(list).expect("fine tick lock poisoned");
                        }
                        std::mem::take(&mut *list)
                    };
                    std::thread::sleep(FINE_TICK);
                    for n in due {
                        n.notify_one();
                    }
                }
            })
            .expect("spawn the fine tick thread");
        w
    })
}

/// Sleeps for about one [`FINE_TICK`] (at least that long, usually within twice it).
pub async fn fine_sleep() {
    let notify = Arc::new(Notify::new());
    let w = waiters();
    w.list.lock().expect("fine tick lock poisoned").push(notify.clone());
    w.wake.notify_one();
    notify.notified().await;
}
