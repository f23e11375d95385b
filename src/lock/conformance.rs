//! The properties every backend must have, as one suite generic over the backend: a backend is
//! done when it implements [`Backend`], [`super::backend::Queued`] and [`Held`] and passes
//! this suite. It runs on the memory backend as unit tests, and on a lock directory and a real
//! etcd cluster in the integration tests:
//!
//! ```text
//! cachelock::conformance_suite!(memory, cachelock::lock::conformance::MemoryHarness::new());
//! ```
//!
//! Each property drives real requests through the engine ([`super::acquire`]) on threads of one
//! process, each request with its own queue handle, as processes would. Waits are on events
//! (what the store shows, what a thread reports), bounded by a watchdog that fails the test; no
//! property asserts a duration.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::backend::{Backend, TicketData};
use super::{acquire, Acquired, Containment, Guard, Interrupt, Options};
use crate::error::Result;
use crate::policy::native::DefaultPolicy;
use crate::policy::Mode;

/// A store under test.
pub trait Harness: Sync {
    /// The store (every property uses lock names of its own in it).
    fn backend(&self) -> &(dyn Backend + Sync);

    /// Takes a held lock away as the store can (a lease revoked or expired): `false` when the
    /// store cannot lose a held lock (a kernel lock lives as long as its holder).
    fn take_away(&self, held: &TicketData) -> bool;
}

/// The in-memory store as a harness.
#[derive(Default)]
pub struct MemoryHarness(super::memory::MemoryBackend);

impl MemoryHarness {
    /// A fresh store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Harness for MemoryHarness {
    fn backend(&self) -> &(dyn Backend + Sync) {
        &self.0
    }

    fn take_away(&self, held: &TicketData) -> bool {
        self.0.take_away(&held.request().lock, held.id())
    }
}

/// Generates one `#[test]` per property for the harness `make` builds, in a module `name`.
#[macro_export]
macro_rules! conformance_suite {
    ($name:ident, $make:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            use $crate::lock::conformance as c;
            #[test]
            fn mutual_exclusion() {
                c::mutual_exclusion(&$make);
            }
            #[test]
            fn serving_order() {
                c::serving_order(&$make);
            }
            #[test]
            fn shared_and_exclusive() {
                c::shared_and_exclusive(&$make);
            }
            #[test]
            fn slots() {
                c::slots(&$make);
            }
            #[test]
            fn nonblock() {
                c::nonblock(&$make);
            }
            #[test]
            fn wait_limit() {
                c::wait_limit(&$make);
            }
            #[test]
            fn dead_holder() {
                c::dead_holder(&$make);
            }
            #[test]
            fn dead_waiter() {
                c::dead_waiter(&$make);
            }
            #[test]
            fn stalled_heads() {
                c::stalled_heads(&$make);
            }
            #[test]
            fn generation_strictly_increases() {
                c::generation_strictly_increases(&$make);
            }
            #[test]
            fn ticket_cleanup() {
                c::ticket_cleanup(&$make);
            }
            #[test]
            fn lost_lock() {
                c::lost_lock(&$make);
            }
        }
    };
}

/// Nothing interrupts a test's request: a socket nobody writes to (the other end is kept
/// open, else the socket would read as closed, that is readable).
pub(crate) struct Never {
    read: std::os::unix::net::UnixStream,
    _write: std::os::unix::net::UnixStream,
}

impl Never {
    pub(crate) fn new() -> Never {
        let (read, _write) = std::os::unix::net::UnixStream::pair().expect("a socket pair");
        Never { read, _write }
    }
}

impl Interrupt for Never {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.read.as_fd()
    }
    fn take(&self) -> Option<i32> {
        None
    }
}

/// How long any event of a property may take before the test fails (a watchdog, far above
/// any expected wait: a lease TTL or two stall grace periods).
const WATCHDOG: Duration = Duration::from_secs(60);

fn opts(lock: &str) -> Options {
    let mut o = Options::new(lock);
    o.wait_limit_ms = Some(WATCHDOG.as_millis() as u64);
    o
}

fn take(h: &dyn Harness, o: &Options) -> Result<Acquired> {
    acquire(h.backend(), o, &mut DefaultPolicy, &Never::new())
}

fn held(h: &dyn Harness, o: &Options) -> Guard {
    match take(h, o) {
        Ok(Acquired::Held(g)) => g,
        Ok(Acquired::FellBack { reason }) => panic!("{}: fell back: {reason}", o.name),
        Err(e) => panic!("{}: {e}", o.name),
    }
}

/// Waits until `cond` holds (polling the store), failing after [`WATCHDOG`].
fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < WATCHDOG, "waited too long for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Live tickets of `lock`: (holders, waiters).
fn tickets(h: &dyn Harness, lock: &str) -> (Vec<TicketData>, Vec<TicketData>) {
    let s = h.backend().state(lock).expect("state");
    (s.tickets.holders, s.tickets.waiters)
}

fn counts(h: &dyn Harness, lock: &str) -> (usize, usize) {
    let (a, b) = tickets(h, lock);
    (a.len(), b.len())
}

/// No two exclusive holders, and no exclusive holder beside a shared one, under contention.
pub fn mutual_exclusion(h: &dyn Harness) {
    let inside = AtomicUsize::new(0);
    let shared_inside = AtomicUsize::new(0);
    let rounds = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for i in 0..6 {
            let (inside, shared_inside, rounds) = (&inside, &shared_inside, &rounds);
            s.spawn(move || {
                for _ in 0..5 {
                    let mut o = opts("mutex");
                    o.mode = if i % 3 == 0 {
                        Mode::Shared
                    } else {
                        Mode::Exclusive
                    };
                    let g = held(h, &o);
                    match o.mode {
                        Mode::Exclusive => {
                            assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                            assert_eq!(shared_inside.load(Ordering::SeqCst), 0, "beside shared");
                            std::thread::yield_now();
                            inside.fetch_sub(1, Ordering::SeqCst);
                        }
                        Mode::Shared => {
                            shared_inside.fetch_add(1, Ordering::SeqCst);
                            assert_eq!(inside.load(Ordering::SeqCst), 0, "beside exclusive");
                            std::thread::yield_now();
                            shared_inside.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                    rounds.fetch_add(1, Ordering::SeqCst);
                    g.release();
                }
            });
        }
    });
    assert_eq!(rounds.load(Ordering::SeqCst), 30);
    assert_eq!(counts(h, "mutex"), (0, 0));
}

/// Waiters are served by priority, then arrival.
pub fn serving_order(h: &dyn Harness) {
    let holder = held(h, &opts("order"));
    let served = Mutex::new(Vec::new());
    let priorities = [0, 5, 1, 5, -2];
    std::thread::scope(|s| {
        for (i, p) in priorities.iter().enumerate() {
            let served = &served;
            s.spawn(move || {
                let mut o = opts("order");
                o.priority = *p;
                let g = held(h, &o);
                served.lock().unwrap().push(i);
                g.release();
            });
            // Arrivals in this order, one at a time.
            until("the waiter's ticket", || counts(h, "order").1 == i + 1);
        }
        holder.release();
    });
    assert_eq!(*served.lock().unwrap(), [1, 3, 2, 0, 4]);
    assert_eq!(counts(h, "order"), (0, 0));
}

/// Shared holders coexist; an exclusive request waits for them and they for it.
pub fn shared_and_exclusive(h: &dyn Harness) {
    let mut shared = opts("rw");
    shared.mode = Mode::Shared;
    let mut now = shared.clone();
    now.wait_limit_ms = Some(0);
    let a = held(h, &shared);
    let b = held(h, &now);
    let mut x = opts("rw");
    x.wait_limit_ms = Some(0);
    assert!(
        take(h, &x).is_err(),
        "an exclusive request beside shared holders"
    );
    a.release();
    b.release();
    let g = held(h, &x);
    assert!(
        take(h, &now).is_err(),
        "a shared request beside an exclusive holder"
    );
    g.release();
    assert_eq!(counts(h, "rw"), (0, 0));
}

/// With N slots, N exclusive holders at once, each on its own slot.
pub fn slots(h: &dyn Harness) {
    let mut o = opts("slots");
    o.slots = 2;
    o.wait_limit_ms = Some(0);
    let a = held(h, &o);
    let b = held(h, &o);
    let mut got = [a.slot(), b.slot()];
    got.sort();
    assert_eq!(got, [0, 1]);
    assert!(take(h, &o).is_err(), "a third holder on two slots");
    a.release();
    let c = held(h, &o);
    assert_ne!(c.slot(), b.slot());
    drop((b, c));
    assert_eq!(counts(h, "slots"), (0, 0));
}

/// `-n` fails at once on a held lock, with the conflict exit code, and leaves no ticket.
pub fn nonblock(h: &dyn Harness) {
    let g = held(h, &opts("nb"));
    let mut o = opts("nb");
    o.wait_limit_ms = Some(0);
    o.conflict_exit_code = 42;
    let e = take(h, &o).expect_err("-n on a held lock fails");
    assert_eq!(e.exit_code(), 42, "{e}");
    assert!(e.message.contains("held by"), "{e}");
    assert_eq!(counts(h, "nb"), (1, 0));
    g.release();
}

/// `-w` gives up on a held lock with a timeout, and leaves no ticket.
pub fn wait_limit(h: &dyn Harness) {
    let g = held(h, &opts("w"));
    let mut o = opts("w");
    o.wait_limit_ms = Some(200);
    let e = take(h, &o).expect_err("-w on a held lock fails");
    assert_eq!(e.exit_code(), 1, "{e}");
    assert!(e.message.contains("timed out"), "{e}");
    assert_eq!(counts(h, "w"), (1, 0));
    g.release();
}

/// A holder that dies frees the lock: the next request is served and the dead ticket goes.
pub fn dead_holder(h: &dyn Harness) {
    let o = opts("dead-h");
    let Ok(Acquired::Held(mut g)) = take(h, &o) else {
        panic!("not held")
    };
    let dead = g.held.take().expect("held");
    let dead_id = dead.ticket().id().to_string();
    dead.vanish();
    let next = held(h, &o);
    assert_ne!(next.ticket(), dead_id);
    until("the dead holder's ticket to go", || {
        tickets(h, "dead-h").0.iter().all(|t| t.id() != dead_id)
    });
    next.release();
}

/// A waiter that dies does not block the queue, and its ticket goes.
pub fn dead_waiter(h: &dyn Harness) {
    let o = opts("dead-w");
    let g = held(h, &o);
    let dead = h.backend().enqueue(&o).expect("enqueue");
    let dead_id = dead.ticket().id().to_string();
    dead.vanish();
    std::thread::scope(|s| {
        let t = s.spawn(|| held(h, &o).release());
        until("the next waiter", || {
            tickets(h, "dead-w").1.iter().any(|t| t.id() != dead_id)
        });
        g.release();
        t.join().expect("served");
    });
    until("the dead waiter's ticket to go", || {
        let (a, b) = tickets(h, "dead-w");
        a.iter().chain(&b).all(|t| t.id() != dead_id)
    });
}

/// Any number of waiters that never take a free lock (stopped processes, planted tickets) are
/// passed, one head after another.
pub fn stalled_heads(h: &dyn Harness) {
    let o = opts("stall");
    let g = held(h, &o);
    // Queued and never driven: alive and silent, as a SIGSTOPped process.
    let s1 = h.backend().enqueue(&o).expect("enqueue");
    let s2 = h.backend().enqueue(&o).expect("enqueue");
    let stalled = [s1.ticket().id().to_string(), s2.ticket().id().to_string()];
    std::thread::scope(|s| {
        let t = s.spawn(|| {
            let g = held(h, &o);
            let id = g.ticket().to_string();
            g.release();
            id
        });
        until("the third waiter", || counts(h, "stall").1 == 3);
        g.release();
        let id = t.join().expect("served");
        assert!(!stalled.contains(&id));
    });
    // The stalled ones are still there, untouched.
    assert_eq!(counts(h, "stall"), (0, 2));
    s1.leave(None);
    s2.leave(None);
    assert_eq!(counts(h, "stall"), (0, 0));
}

/// Every grant's generation is greater than every earlier one's.
pub fn generation_strictly_increases(h: &dyn Harness) {
    let seen = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..4 {
            let seen = &seen;
            s.spawn(move || {
                for _ in 0..5 {
                    let g = held(h, &opts("gen"));
                    seen.lock().unwrap().push(g.generation());
                    g.release();
                }
            });
        }
    });
    let seen = seen.into_inner().unwrap();
    // Taken under the lock, so pushed in the order granted.
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert_eq!(seen.len(), 20);
    assert!(h.backend().state("gen").expect("state").generation >= seen[19]);
}

/// Every way out leaves no ticket: release, `-n`, `-w`, a drop.
pub fn ticket_cleanup(h: &dyn Harness) {
    let o = opts("clean");
    held(h, &o).release();
    drop(held(h, &o));
    let g = held(h, &o);
    let mut n = o.clone();
    n.wait_limit_ms = Some(0);
    assert!(take(h, &n).is_err());
    n.wait_limit_ms = Some(50);
    assert!(take(h, &n).is_err());
    h.backend().enqueue(&o).expect("enqueue").leave(None);
    drop(h.backend().enqueue(&o).expect("enqueue"));
    assert_eq!(counts(h, "clean"), (1, 0));
    g.release();
    assert_eq!(counts(h, "clean"), (0, 0));
}

/// A held lock the store takes away is known lost to its holder, and the next grant's
/// generation is greater; a store that cannot lose a held lock keeps others out.
pub fn lost_lock(h: &dyn Harness) {
    let o = opts("lost");
    let g = held(h, &o);
    let ticket = g.held.as_ref().expect("held").ticket().clone();
    let mut n = o.clone();
    n.wait_limit_ms = Some(0);
    if !h.take_away(&ticket) {
        assert!(take(h, &n).is_err(), "a second holder beside a kept lock");
        g.release();
        return;
    }
    match g.containment() {
        Containment::Lease(l) => until("the lease to be known lost", || l.is_lost()),
        Containment::Inherit(_) => panic!("a lock taken away must be a lease"),
    }
    let next = held(h, &o);
    assert!(next.generation() > g.generation());
    drop(g);
    next.release();
}

#[cfg(test)]
crate::conformance_suite!(memory, super::MemoryHarness::new());
