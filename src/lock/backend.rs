//! The seam between the engine and a lock store. The engine (`engine.rs`) owns the decisions —
//! who is at the head, when to try, how long to wait, when to give up — and a backend owns the
//! mechanics: publishing a ticket, listing the live ones, granting the lock atomically with its
//! generation, waiting for a change, and saying how a command must run so the lock covers it.
//!
//! Backends: [`super::flock`] (a directory: kernel flock for exclusion, ticket files for the
//! queue). A lease-based store (etcd) plugs in here too: its tickets die with their lease, its
//! grant is one transaction, and its held lock can be lost, which [`Containment`] expresses.

use std::io::Write;
use std::os::fd::{BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::Options;
use crate::error::Result;
use crate::policy::{Mode, Request, Ticket};

/// One live request (waiting or holding), as every backend stores it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TicketData {
    /// Ticket id: unique per lock; ties in rank and arrival go to the smallest.
    pub id: String,
    /// Lock name.
    pub lock: String,
    /// Exclusive or shared.
    pub mode: Mode,
    /// `--priority`.
    pub priority: i32,
    /// `--label`s in the order given.
    pub labels: Vec<(String, String)>,
    /// Host of the owner (for people only).
    pub host: String,
    /// PID of the owner (for people only).
    pub pid: u32,
    /// Arrival stamp (hybrid logical clock, strictly increasing per lock).
    pub enqueued_at_ms: u64,
    /// The caller's wait bound.
    pub wait_limit_ms: Option<u64>,
    /// `--queue-key`.
    pub queue_key: Option<String>,
    /// Whether the owner holds the lock now.
    #[serde(default)]
    pub holding: bool,
    /// The slot held.
    #[serde(default)]
    pub slot: Option<u32>,
    /// Wall clock when the lock was taken.
    #[serde(default)]
    pub acquired_at_ms: Option<u64>,
    /// Generation (fencing token) of this acquisition.
    #[serde(default)]
    pub generation: Option<u64>,
    /// A store's revision of the holder's grant (etcd: the holder key's create revision), as
    /// read; never written into the ticket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
    /// Time left on the owner's lease (etcd), as `status` read it; never written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_left_ms: Option<u64>,
    /// The user owning the ticket, where the store vouches for it (a ticket file's owner):
    /// unlike `host` and `pid`, not the ticket's own claim, so never read from its content.
    #[serde(skip)]
    pub uid: Option<u32>,
}

impl TicketData {
    /// The policy's view of this ticket.
    pub fn to_ticket(&self) -> Ticket {
        Ticket {
            id: self.id.clone(),
            request: Request {
                lock: self.lock.clone(),
                mode: self.mode,
                priority: self.priority,
                labels: self.labels.clone(),
                host: self.host.clone(),
                pid: self.pid,
                enqueued_at_ms: self.enqueued_at_ms,
                wait_limit_ms: self.wait_limit_ms,
            },
        }
    }
}

/// The live tickets of one lock as one scan saw them (one's own ticket excluded).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Tickets whose owners hold the lock, by id.
    pub holders: Vec<TicketData>,
    /// Tickets still waiting, in no particular order.
    pub waiters: Vec<TicketData>,
}

/// Everything `status` shows of one lock, read without joining its queue.
#[derive(Debug, Clone, Default)]
pub struct LockState {
    /// Lock name.
    pub name: String,
    /// Acquisitions so far (the latest fencing token).
    pub generation: u64,
    /// Live tickets.
    pub tickets: Snapshot,
    /// Live tickets that cannot be read or break the bounds (the engine ignores them).
    pub unreadable: Vec<Unreadable>,
}

/// A live ticket whose content cannot be used (garbage, oversized, not a regular file...):
/// ignored by the engine, shown by `status` so that it cannot hide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    /// The ticket's name in the queue.
    pub ticket: String,
    /// Who owns it, where the store knows (a file's owner).
    pub owner_uid: Option<u32>,
    /// What is wrong with it.
    pub reason: String,
}

/// Why [`Queued::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The signal descriptor became readable.
    Signal,
    /// The queue changed (or may have: an overflow): evaluate again.
    Changed,
    /// Tickets only left the queue: nobody new can rank ahead, so a waiter in the head set may
    /// try the lock before scanning again.
    Removed,
    /// The deadline passed with nothing seen.
    Timeout,
}

/// What a waiter sleeps on, from its place in the queue (the engine's last evaluation). Each
/// waiter watches only what can make it act, so that a hand-off wakes the next holder and the
/// one behind it, not the whole queue.
#[derive(Debug, Clone, Copy)]
pub enum Watch<'a> {
    /// In the head set: the lock itself (releases), and arrivals that may rank before us.
    Lock,
    /// Behind the head set: the waiter just ahead in the queue's order, whose taking the lock,
    /// leaving or dying may put us in the head set ([`Wake::Changed`]). A backend that cannot
    /// watch one waiter watches the whole queue.
    Ahead(&'a TicketData),
}

/// A lock store.
pub trait Backend {
    /// Joins `opts.name`'s queue: assigns the ticket id and arrival stamp (an unexpired queue
    /// key keeps its remembered arrival) and publishes the ticket.
    fn enqueue(&self, opts: &Options) -> Result<Box<dyn Queued>>;

    /// Names of the locks this store knows, sorted.
    fn lock_names(&self) -> Result<Vec<String>>;

    /// One lock's generation and live tickets, read without joining the queue (dead tickets
    /// found on the way may be cleaned up). A lock that does not exist reads as empty.
    fn state(&self, lock: &str) -> Result<LockState>;

    /// Where the locks live, for messages (`file:///var/lib/cachelock`).
    fn describe(&self) -> String;
}

/// A request in a queue: its ticket is published and kept alive until it is left or held.
pub trait Queued {
    /// Our own ticket.
    fn ticket(&self) -> &TicketData;

    /// The other live tickets.
    fn scan(&mut self) -> Result<Snapshot>;

    /// The other live tickets, for a caller that is behind the head set: a backend may reuse
    /// its last scan for the tickets that are still there and read only new ones
    /// (`Ok((snapshot, true))`). Changes inside tickets already seen may then be missed; the
    /// only such change is a waiter taking the lock, which makes the caller's place look later
    /// than it is, never earlier.
    fn rescan(&mut self) -> Result<(Snapshot, bool)> {
        Ok((self.scan()?, false))
    }

    /// Tries to take the lock now in our mode on any free slot. The generation is assigned
    /// atomically with the grant and our ticket is marked holding. `Ok(None)`: not free.
    fn try_acquire(&mut self) -> Result<Option<Box<dyn Held>>>;

    /// Sleeps until what `watch` names changes, `signal_fd` becomes readable, or `until` (never
    /// when `None`). The first call may set up change notification and return
    /// [`Wake::Changed`] at once, so that nothing between the last scan and the set-up is
    /// missed.
    fn wait(
        &mut self,
        until: Option<Instant>,
        watch: Watch<'_>,
        signal_fd: BorrowedFd<'_>,
    ) -> Result<Wake>;

    /// Leaves the queue at once. `keep_place_for`: remember the arrival for the ticket's queue
    /// key this long, so that a retry with the same key keeps its place.
    fn leave(self: Box<Self>, keep_place_for: Option<Duration>);
}

/// A held lock.
pub trait Held {
    /// Our ticket, marked holding, with its slot and generation.
    fn ticket(&self) -> &TicketData;

    /// How a command must run so that the lock covers all of it.
    fn containment(&self) -> Containment;

    /// Releases the lock and leaves the queue (which wakes the next waiter).
    fn release(self: Box<Self>) -> Result<()>;
}

/// How the lock covers a command.
#[derive(Debug, Clone)]
pub enum Containment {
    /// The kernel keeps the lock while any process holds one of these descriptors: the command
    /// inherits them, so a SIGKILLed cachelock cannot free the lock while its command runs.
    Inherit(Vec<RawFd>),
    /// The lock lasts while a lease is renewed (etcd). The command cannot keep it alive, so it
    /// runs under a guardian ([`crate::process`]) that stops its whole process tree when
    /// cachelock dies or the lease's stop deadline passes without a renewal.
    Lease(Lease),
}

/// A held lease as the command's guardians see it: a deadline (`CLOCK_MONOTONIC`) by which the
/// command must *start* stopping, which the backend moves forward at each confirmed renewal,
/// and the grace between SIGTERM and SIGKILL. The backend chooses the deadline so that
/// deadline + grace stays before the earliest moment the server may expire the lease.
///
/// Every guardian attached to the lease is sent each new deadline as 8 bytes (little-endian
/// nanoseconds of `CLOCK_MONOTONIC`; 0: stop now) on its socket.
#[derive(Clone)]
pub struct Lease(Arc<LeaseShared>);

struct LeaseShared {
    lock: String,
    stop_at_ns: AtomicU64,
    grace: Duration,
    lost: AtomicBool,
    links: Mutex<Vec<UnixStream>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("lock", &self.0.lock)
            .field("stop_at_ns", &self.stop_at_ns())
            .field("grace", &self.0.grace)
            .field("lost", &self.0.lost.load(Ordering::SeqCst))
            .finish()
    }
}

impl Lease {
    /// A lease of lock `lock` whose command must start stopping at `stop_at_ns`
    /// (`CLOCK_MONOTONIC`) unless renewed, and be killed `grace` later.
    pub fn new(lock: &str, stop_at_ns: u64, grace: Duration) -> Lease {
        Lease(Arc::new(LeaseShared {
            lock: lock.to_string(),
            stop_at_ns: AtomicU64::new(stop_at_ns),
            grace,
            lost: AtomicBool::new(false),
            links: Mutex::new(Vec::new()),
        }))
    }

    /// The lock this lease holds.
    pub fn lock(&self) -> &str {
        &self.0.lock
    }

    /// SIGTERM-to-SIGKILL grace.
    pub fn grace(&self) -> Duration {
        self.0.grace
    }

    /// The current stop deadline (0 once lost).
    pub fn stop_at_ns(&self) -> u64 {
        self.0.stop_at_ns.load(Ordering::SeqCst)
    }

    /// Whether the lease was lost (or its stop deadline passed without a renewal).
    pub fn is_lost(&self) -> bool {
        self.0.lost.load(Ordering::SeqCst) || crate::sys::monotonic_ns() >= self.stop_at_ns()
    }

    /// A renewal was confirmed: moves the deadline forward (never back) and tells every
    /// guardian. Ignored once lost.
    pub fn extend(&self, stop_at_ns: u64) {
        if self.0.lost.load(Ordering::SeqCst) {
            return;
        }
        let old = self.0.stop_at_ns.fetch_max(stop_at_ns, Ordering::SeqCst);
        if stop_at_ns > old {
            self.broadcast(stop_at_ns);
        }
    }

    /// The lease is gone (expired, revoked, or not renewable in time): every guardian stops
    /// its command now.
    pub fn lose(&self) {
        self.0.lost.store(true, Ordering::SeqCst);
        self.0.stop_at_ns.store(0, Ordering::SeqCst);
        self.broadcast(0);
    }

    /// Attaches a guardian's socket and sends it the current deadline.
    pub fn attach(&self, link: UnixStream) {
        let _ = link.set_nonblocking(true);
        let now = self.stop_at_ns();
        let mut links = self.0.links.lock().unwrap_or_else(|e| e.into_inner());
        let _ = (&link).write_all(&now.to_le_bytes());
        links.push(link);
    }

    fn broadcast(&self, value: u64) {
        let mut links = self.0.links.lock().unwrap_or_else(|e| e.into_inner());
        // A guardian that is gone (EPIPE) is dropped from the list.
        links.retain(|l| {
            let mut w = l;
            !matches!(w.write(&value.to_le_bytes()), Err(e) if e.kind() != std::io::ErrorKind::WouldBlock)
        });
    }
}
