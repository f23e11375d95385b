//! The in-memory backend: the queues of one process, behind the same traits as the directory
//! and etcd backends. Requests on several threads exclude each other as processes do on a lock
//! directory; `policy simulate` drives it in simulated time (its clock is settable and its waits
//! can be asked about without blocking, [`MemoryQueued::pending`]); the property suite of
//! [`super::conformance`] runs on it in seconds.
//!
//! The rules are the other backends': arrival stamps `max(clock, last + 1)`, ticket numbers
//! per lock, the grant rule of [`super::order::Slots`], a generation that grows by one per
//! grant, queue keys remembered for their grace. A request's death ([`Queued::vanish`],
//! [`Held::vanish`]) frees what it held at once, as the kernel frees a dead process's flock,
//! and leaves its ticket to the next scan. A held lock can be taken away
//! ([`MemoryBackend::take_away`]): its lease is lost, as when an etcd lease expires.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::backend::{
    Backend, Containment, Held, Lease, LockState, Queued, Snapshot, TicketData, Wake, Watch,
};
use super::order::Slots;
use super::Options;
use crate::error::{Error, Kind, Result};

/// A store of queues in this process's memory. Clones share the store.
#[derive(Clone)]
pub struct MemoryBackend {
    shared: Arc<Shared>,
}

struct Shared {
    store: Mutex<Store>,
    /// Unix milliseconds: the real clock, or the one a simulation sets.
    clock: Clock,
    host: String,
    pid: u32,
}

enum Clock {
    Real,
    Set(Arc<AtomicU64>),
}

#[derive(Default)]
struct Store {
    locks: BTreeMap<String, LockQueue>,
}

#[derive(Default)]
struct LockQueue {
    next_ticket: u64,
    last_enqueued_at_ms: u64,
    generation: u64,
    /// Live tickets, and dead ones until a scan removes them.
    tickets: BTreeMap<String, Entry>,
    /// Remembered arrivals of queue keys: (arrival, expiry).
    keys: HashMap<String, (u64, u64)>,
    /// Arrivals and ticket changes (holding), and departures, so far: a waiter compares them
    /// with what it last saw.
    changes: Counters,
    /// Waiters sleeping in [`Queued::wait`]: each is sent a byte at every change.
    wakers: Vec<Arc<UnixStream>>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counters {
    changed: u64,
    removed: u64,
}

struct Entry {
    data: TicketData,
    alive: bool,
    lease: Option<Lease>,
}

impl LockQueue {
    fn changed(&mut self, removal: bool) {
        if removal {
            self.changes.removed += 1;
        } else {
            self.changes.changed += 1;
        }
        self.wakers.retain(|w| {
            use std::io::Write;
            !matches!((&**w).write(&[1]), Err(e) if e.kind() != std::io::ErrorKind::WouldBlock)
        });
    }

    fn holders(&self) -> impl Iterator<Item = &Entry> {
        self.tickets.values().filter(|e| e.alive && e.data.holding)
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBackend {
    /// An empty store on the real clock; tickets name this process.
    pub fn new() -> Self {
        Self::build(Clock::Real, crate::sys::hostname(), std::process::id())
    }

    /// An empty store whose clock (Unix milliseconds) is `clock`, set by the caller; tickets
    /// name `host` and `pid` (a simulation's).
    pub fn with_clock(clock: Arc<AtomicU64>, host: &str, pid: u32) -> Self {
        Self::build(Clock::Set(clock), host.to_string(), pid)
    }

    fn build(clock: Clock, host: String, pid: u32) -> Self {
        MemoryBackend {
            shared: Arc::new(Shared {
                store: Mutex::new(Store::default()),
                clock,
                host,
                pid,
            }),
        }
    }

    fn now_ms(&self) -> u64 {
        match &self.shared.clock {
            Clock::Real => super::now_ms(),
            Clock::Set(c) => c.load(Ordering::SeqCst),
        }
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        self.shared.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Joins `opts.name`'s queue with ticket id `id` (a simulation's own names), or the next
    /// number. An id already live in the queue is refused.
    pub fn enqueue_as(&self, opts: &Options, id: Option<&str>) -> Result<MemoryQueued> {
        let now = self.now_ms();
        let mut store = self.store();
        let q = store.locks.entry(opts.name.clone()).or_default();
        q.keys.retain(|_, (_, expires)| *expires > now);
        let id = match id {
            Some(id) if q.tickets.contains_key(id) => {
                return Err(Error::new(
                    Kind::Software,
                    format!("ticket {id} is already in the queue of lock {}", opts.name),
                ))
            }
            Some(id) => id.to_string(),
            None => {
                let n = q.next_ticket;
                q.next_ticket += 1;
                format!("{n:012}")
            }
        };
        let remembered = opts
            .queue_key
            .as_ref()
            .and_then(|k| q.keys.get(k))
            .map(|(at, _)| *at);
        let at = match remembered {
            Some(at) => at,
            None => {
                let at = now.max(q.last_enqueued_at_ms + 1);
                q.last_enqueued_at_ms = at;
                at
            }
        };
        let mut data = TicketData::new(
            opts,
            id.clone(),
            at,
            self.shared.host.clone(),
            self.shared.pid,
        );
        data.uid = Some(crate::sys::euid());
        q.tickets.insert(
            id.clone(),
            Entry {
                data: data.clone(),
                alive: true,
                lease: None,
            },
        );
        q.changed(false);
        let seen = q.changes;
        Ok(MemoryQueued {
            backend: self.clone(),
            data,
            slots: opts.slots.max(1),
            seen,
            reported: None,
            waker: None,
            done: false,
        })
    }

    /// Takes a held lock away from ticket `id` of `lock` (as a store whose lease expired):
    /// its lease is lost and the lock is free for the next. Returns whether it was held.
    pub fn take_away(&self, lock: &str, id: &str) -> bool {
        let mut store = self.store();
        let Some(q) = store.locks.get_mut(lock) else {
            return false;
        };
        let Some(e) = q.tickets.remove(id).filter(|e| e.data.holding) else {
            return false;
        };
        if let Some(l) = &e.lease {
            l.lose();
        }
        q.changed(true);
        true
    }
}

impl Backend for MemoryBackend {
    fn enqueue(&self, opts: &Options) -> Result<Box<dyn Queued>> {
        Ok(Box::new(self.enqueue_as(opts, None)?))
    }

    fn lock_names(&self) -> Result<Vec<String>> {
        Ok(self.store().locks.keys().cloned().collect())
    }

    fn state(&self, lock: &str) -> Result<LockState> {
        let store = self.store();
        let mut state = LockState {
            name: lock.to_string(),
            ..Default::default()
        };
        if let Some(q) = store.locks.get(lock) {
            state.exists = true;
            state.generation = q.generation;
            for e in q.tickets.values().filter(|e| e.alive) {
                if e.data.holding {
                    state.tickets.holders.push(e.data.clone());
                } else {
                    state.tickets.waiters.push(e.data.clone());
                }
            }
        }
        Ok(state)
    }

    fn describe(&self) -> String {
        "memory:".to_string()
    }
}

/// A request in a memory queue.
pub struct MemoryQueued {
    backend: MemoryBackend,
    data: TicketData,
    slots: u32,
    /// The queue's counters when we last looked (scan) or woke.
    seen: Counters,
    /// The ticket ahead last said to have changed.
    reported: Option<String>,
    /// Our end of the wake-up socket, once we have waited.
    waker: Option<(UnixStream, Arc<UnixStream>)>,
    /// Held, left or dead: nothing to clean up.
    done: bool,
}

impl MemoryQueued {
    /// What [`Queued::wait`] would return now without sleeping: `Some` when what `watch`
    /// names has changed since the last look (a simulation's driver asks this).
    pub fn pending(&mut self, watch: Watch<'_>) -> Option<Wake> {
        let store = self.backend.store();
        let q = store.locks.get(&self.data.ticket.request.lock)?;
        match watch {
            Watch::Lock => {
                let now = q.changes;
                let wake = if now.changed != self.seen.changed {
                    Wake::Changed
                } else if now.removed != self.seen.removed {
                    Wake::Removed
                } else {
                    return None;
                };
                self.seen = now;
                Some(wake)
            }
            Watch::Ahead(t) => {
                // Taken the lock, left or died: said once per ticket watched.
                let waiting = q
                    .tickets
                    .get(t.id())
                    .is_some_and(|e| e.alive && !e.data.holding);
                if waiting || self.reported.as_deref() == Some(t.id()) {
                    return None;
                }
                self.reported = Some(t.id().to_string());
                Some(Wake::Changed)
            }
        }
    }

    fn lock_name(&self) -> &str {
        &self.data.ticket.request.lock
    }

    fn finish(&mut self, remove: bool) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let mut store = self.backend.store();
        if let Some(q) = store.locks.get_mut(&self.data.ticket.request.lock) {
            let found = if remove {
                q.tickets.remove(self.data.id()).is_some()
            } else {
                q.tickets
                    .get_mut(self.data.id())
                    .map(|e| e.alive = false)
                    .is_some()
            };
            if found {
                q.changed(true);
            }
            if let Some((_, w)) = &self.waker {
                q.wakers.retain(|o| !Arc::ptr_eq(o, w));
            }
        }
    }
}

impl Queued for MemoryQueued {
    fn ticket(&self) -> &TicketData {
        &self.data
    }

    fn scan(&mut self) -> Result<Snapshot> {
        let mut store = self.backend.store();
        let mut snap = Snapshot::default();
        let Some(q) = store.locks.get_mut(self.lock_name()) else {
            return Ok(snap);
        };
        // Dead tickets are cleaned up by whoever scans.
        let before = q.tickets.len();
        q.tickets.retain(|_, e| e.alive);
        if q.tickets.len() != before {
            q.changed(true);
        }
        for e in q.tickets.values() {
            if e.data.id() == self.data.id() {
                continue;
            }
            if e.data.holding {
                snap.holders.push(e.data.clone());
            } else {
                snap.waiters.push(e.data.clone());
            }
        }
        self.seen = q.changes;
        Ok(snap)
    }

    fn try_acquire(&mut self) -> Result<Option<Box<dyn Held>>> {
        let now = self.backend.now_ms();
        let mut store = self.backend.store();
        let name = self.data.ticket.request.lock.clone();
        let q = store.locks.get_mut(&name).ok_or_else(|| {
            Error::new(Kind::Software, format!("lock {name} vanished from memory"))
        })?;
        let mut slots = Slots::new(self.slots);
        for e in q.holders() {
            slots.hold(e.data.slot.unwrap_or(0), e.data.request().mode);
        }
        let Some(slot) = slots.take(self.data.request().mode) else {
            return Ok(None);
        };
        if !q.tickets.get(self.data.id()).is_some_and(|e| e.alive) {
            return Err(Error::new(
                Kind::Software,
                format!("ticket {} left the queue of lock {name}", self.data.id()),
            ));
        }
        q.generation += 1;
        let generation = q.generation;
        let lease = Lease::new(&name, u64::MAX, Duration::ZERO);
        let e = q.tickets.get_mut(self.data.id()).expect("checked above");
        e.data.hold(slot, generation, now);
        e.lease = Some(lease.clone());
        let data = e.data.clone();
        if let Some(k) = &data.queue_key {
            q.keys.remove(k);
        }
        q.changed(false);
        if let Some((_, w)) = &self.waker {
            q.wakers.retain(|o| !Arc::ptr_eq(o, w));
        }
        self.done = true;
        Ok(Some(Box::new(MemoryHeld {
            backend: self.backend.clone(),
            data,
            lease,
            done: false,
        })))
    }

    fn wait(
        &mut self,
        until: Option<Instant>,
        watch: Watch<'_>,
        signal_fd: BorrowedFd<'_>,
    ) -> Result<Wake> {
        if self.waker.is_none() {
            let (ours, theirs) = UnixStream::pair()
                .and_then(|(a, b)| {
                    a.set_nonblocking(true)?;
                    b.set_nonblocking(true)?;
                    Ok((a, b))
                })
                .map_err(|e| {
                    Error::new(Kind::OsErr, format!("cannot create a socket pair: {e}"))
                })?;
            let theirs = Arc::new(theirs);
            let mut store = self.backend.store();
            if let Some(q) = store.locks.get_mut(self.lock_name()) {
                q.wakers.push(theirs.clone());
            }
            self.waker = Some((ours, theirs));
        }
        loop {
            if let Some(w) = self.pending(watch) {
                return Ok(w);
            }
            let left = until.map(|u| u.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                return Ok(Wake::Timeout);
            }
            let ours = &self.waker.as_ref().expect("set above").0;
            match crate::sys::poll_readable(&[signal_fd, ours.as_fd()], left) {
                Some(0) => return Ok(Wake::Signal),
                Some(_) => {
                    use std::io::Read;
                    let mut buf = [0u8; 64];
                    while matches!((&*ours).read(&mut buf), Ok(n) if n > 0) {}
                }
                None => {}
            }
        }
    }

    fn leave(mut self: Box<Self>, keep_place_for: Option<Duration>) {
        if let (Some(key), Some(grace)) = (&self.data.queue_key, keep_place_for) {
            let now = self.backend.now_ms();
            let mut store = self.backend.store();
            if let Some(q) = store.locks.get_mut(&self.data.ticket.request.lock) {
                let expires = now.saturating_add(grace.as_millis() as u64);
                q.keys
                    .insert(key.clone(), (self.data.request().enqueued_at_ms, expires));
            }
        }
        self.finish(true);
    }

    fn vanish(mut self: Box<Self>) {
        self.finish(false);
    }
}

impl Drop for MemoryQueued {
    fn drop(&mut self) {
        self.finish(true);
    }
}

/// A held lock of the memory store.
struct MemoryHeld {
    backend: MemoryBackend,
    data: TicketData,
    lease: Lease,
    done: bool,
}

impl MemoryHeld {
    fn finish(&mut self, remove: bool) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let mut store = self.backend.store();
        let Some(q) = store.locks.get_mut(&self.data.ticket.request.lock) else {
            return;
        };
        // Taken away meanwhile: nothing of ours is left.
        let ours = q
            .tickets
            .get(self.data.id())
            .is_some_and(|e| e.data.generation == self.data.generation);
        if !ours {
            return;
        }
        if remove {
            q.tickets.remove(self.data.id());
        } else if let Some(e) = q.tickets.get_mut(self.data.id()) {
            e.alive = false;
        }
        q.changed(true);
    }
}

impl Held for MemoryHeld {
    fn ticket(&self) -> &TicketData {
        &self.data
    }

    fn containment(&self) -> Containment {
        Containment::Lease(self.lease.clone())
    }

    fn release(mut self: Box<Self>) {
        self.finish(true);
    }

    fn vanish(mut self: Box<Self>) {
        self.finish(false);
    }
}

impl Drop for MemoryHeld {
    fn drop(&mut self) {
        self.finish(true);
    }
}
