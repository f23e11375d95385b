//! The seam between the engine and a lock store. The scheduler (`schedule.rs`) owns the
//! decisions — who is at the head, when to try, how long to wait, when to give up — and a
//! backend owns the mechanics: publishing a ticket, listing the live ones, granting the lock
//! atomically with its generation, waiting for a change, and saying how a command must run so
//! the lock covers it.
//!
//! Backends: [`super::flock`] (a directory: kernel flock for exclusion, ticket files for the
//! queue), [`super::etcd`] (tickets die with their lease, the grant is one transaction, and a
//! held lock can be lost, which [`Containment`] expresses) and [`super::memory`]. A new backend
//! implements these traits and passes [`super::conformance`].

use std::os::fd::{BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::Options;
use crate::error::Result;
use crate::policy::{Request, Ticket};

/// One live request (waiting or holding), as every backend stores it: the ticket a policy
/// sees (id and request, the WIT's `ticket`) and the store's state of it. Stored as one flat
/// JSON object (a ticket file; an etcd value).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TicketData {
    /// Id and request: what policies rank and see.
    #[serde(flatten)]
    pub ticket: Ticket,
    /// `--queue-key`.
    #[serde(default)]
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
    /// The user owning the ticket, where the store vouches for it (a ticket file's owner):
    /// unlike `host` and `pid`, not the ticket's own claim, so never read from its content.
    #[serde(skip)]
    pub uid: Option<u32>,
    /// The owner's cachelock version (absent in tickets of releases before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The policy the owner ranks the queue with, as its configuration names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The digest of that policy's module (`sha256:<hex>`), where the owner knew it when it
    /// wrote the ticket (see [`super::PolicyRef`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_digest: Option<String>,
}

impl TicketData {
    /// A waiting ticket of the request `opts`, numbered `id` and stamped `enqueued_at_ms` by
    /// the store, owned by process `pid` on `host`.
    pub fn new(opts: &Options, id: String, enqueued_at_ms: u64, host: String, pid: u32) -> Self {
        TicketData {
            ticket: Ticket {
                id,
                request: Request {
                    lock: opts.name.clone(),
                    mode: opts.mode,
                    priority: opts.priority,
                    labels: opts.labels.clone(),
                    host,
                    pid,
                    enqueued_at_ms,
                    wait_limit_ms: opts.wait_limit_ms,
                },
            },
            queue_key: opts.queue_key.clone(),
            holding: false,
            slot: None,
            acquired_at_ms: None,
            generation: None,
            uid: None,
            version: Some(crate::VERSION.to_string()),
            policy: opts.policy.as_ref().map(|p| p.name.clone()),
            policy_digest: opts.policy.as_ref().and_then(|p| p.digest.clone()),
        }
    }

    /// The ticket id: unique per lock; ties in rank and arrival go to the smallest.
    pub fn id(&self) -> &str {
        &self.ticket.id
    }

    /// The request (lock, mode, priority, labels, host, pid, arrival, wait bound).
    pub fn request(&self) -> &Request {
        &self.ticket.request
    }

    /// Marks the ticket holding `slot` as acquisition `generation` at `now_ms`.
    pub fn hold(&mut self, slot: u32, generation: u64, now_ms: u64) {
        self.holding = true;
        self.slot = Some(slot);
        self.generation = Some(generation);
        self.acquired_at_ms = Some(now_ms);
    }
}

impl From<Ticket> for TicketData {
    /// A waiting ticket as a store holds it, of a request as a policy sees it.
    fn from(ticket: Ticket) -> Self {
        TicketData {
            ticket,
            queue_key: None,
            holding: false,
            slot: None,
            acquired_at_ms: None,
            generation: None,
            uid: None,
            version: None,
            policy: None,
            policy_digest: None,
        }
    }
}

/// What a store says of a live ticket beyond its content (`status` shows it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreNote {
    /// The store's revision of a holder's grant (etcd: the holder key's create revision).
    pub revision: Option<i64>,
    /// Time left on the owner's lease (etcd).
    pub lease_left_ms: Option<u64>,
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
    /// Whether the store has the lock at all (somebody used it); a lock that does not exist
    /// reads as empty.
    pub exists: bool,
    /// Acquisitions so far (the latest fencing token).
    pub generation: u64,
    /// Live tickets.
    pub tickets: Snapshot,
    /// Live tickets that cannot be read or break the bounds (the engine ignores them).
    pub unreadable: Vec<Unreadable>,
    /// What the store says of the live tickets beyond their content, by ticket id.
    pub notes: std::collections::HashMap<String, StoreNote>,
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

/// How a request left the queue or gave the lock back: what a store that records every
/// departure beside it (etcd's `last` key, see `super::etcd`) writes in the same transaction,
/// so that a watcher of the store learns every request's outcome.
#[derive(Debug, Clone, Copy)]
pub struct Departure<'a> {
    /// How the request ended.
    pub outcome: super::Outcome,
    /// Arrival to acquisition, or to the end of the wait.
    pub waited: Duration,
    /// How long the lock was held, if it was.
    pub held: Option<Duration>,
    /// The policy's name and the hex sha256 of its module, if known.
    pub policy: &'a str,
    /// See `policy`.
    pub digest: Option<&'a str>,
}

impl Departure<'_> {
    /// The record a store keeps of it, for request `ticket`.
    pub fn record(&self, ticket: &str) -> DepartureRecord {
        let ms = |d: Duration| d.as_millis().min(u64::MAX as u128) as u64;
        DepartureRecord {
            ticket: ticket.to_string(),
            outcome: self.outcome.as_str().to_string(),
            waited_ms: ms(self.waited),
            held_ms: self.held.map(ms),
            policy: super::cut(self.policy, super::PolicyRef::MAX_NAME).to_string(),
            digest: self.digest.map(super::digest_label),
            version: crate::VERSION.to_string(),
        }
    }
}

/// A departure as a store records it (etcd: the value of a lock's `last` key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DepartureRecord {
    /// The request's ticket id.
    pub ticket: String,
    /// How it ended (`super::Outcome::as_str`).
    pub outcome: String,
    /// Arrival to acquisition, or to the end of the wait.
    pub waited_ms: u64,
    /// How long it held the lock, if it did.
    #[serde(default)]
    pub held_ms: Option<u64>,
    /// Its policy.
    #[serde(default)]
    pub policy: String,
    /// `sha256:<hex>` of the policy's module, if known.
    #[serde(default)]
    pub digest: Option<String>,
    /// The cachelock version that wrote it.
    #[serde(default)]
    pub version: String,
}

/// What a watch of a store saw one request do (etcd's follower: `serve` on a fleet).
#[derive(Debug, Clone)]
pub enum StoreEvent {
    /// A ticket joined the queue.
    Arrived(TicketData),
    /// A request took the lock (its ticket, holding).
    Acquired(TicketData),
    /// A ticket left (a holder's when `ticket.holding`), with the record its owner wrote in
    /// the same transaction, if it wrote one (none: its lease expired, or an older cachelock).
    Left {
        /// The ticket as it was.
        ticket: TicketData,
        /// Its owner's record.
        record: Option<DepartureRecord>,
        /// When the store saw it leave (Unix ms, the watcher's clock).
        at_ms: u64,
    },
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
pub trait Queued: Send {
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

    /// Says how the request ends, before [`Queued::leave`] (or a drop): a store that records
    /// departures writes it with the ticket's removal. Without it a departure is an error's.
    fn depart(&mut self, how: &Departure<'_>) {
        let _ = how;
    }

    /// Leaves the queue at once. `keep_place_for`: remember the arrival for the ticket's queue
    /// key this long, so that a retry with the same key keeps its place.
    fn leave(self: Box<Self>, keep_place_for: Option<Duration>);

    /// Ends the request as the death of its process would: nothing is cleaned up, and the
    /// store must find out by its own means (an unlocked ticket, an expired lease). For tests
    /// of what others do about a dead waiter.
    fn vanish(self: Box<Self>);
}

/// A held lock.
pub trait Held: Send {
    /// Our ticket, marked holding, with its slot and generation.
    fn ticket(&self) -> &TicketData;

    /// How a command must run so that the lock covers all of it.
    fn containment(&self) -> Containment;

    /// Says how the request ends (see [`Queued::depart`]), before [`Held::release`].
    fn depart(&mut self, how: &Departure<'_>) {
        let _ = how;
    }

    /// Releases the lock and leaves the queue (which wakes the next waiter). A release the
    /// store does not confirm in time is left to the store (a lease expires by itself).
    fn release(self: Box<Self>);

    /// Ends the hold as the death of its process (and its command) would: nothing is cleaned
    /// up (see [`Queued::vanish`]).
    fn vanish(self: Box<Self>);
}

/// How the lock covers a command.
#[derive(Debug, Clone)]
pub enum Containment {
    /// The kernel keeps the lock while any process holds one of these descriptors: the command
    /// inherits them, so a SIGKILLed cachelock cannot free the lock while its command runs.
    Inherit(Vec<RawFd>),
    /// The lock lasts while a lease is renewed (etcd). The command cannot keep it alive, so it
    /// must run under something that stops its whole process tree when cachelock dies or the
    /// lease's stop deadline passes without a renewal (the binary's guardian).
    Lease(Lease),
}

/// A held lease as the command's guardians see it: a deadline (`CLOCK_MONOTONIC`) by which the
/// command must *start* stopping, which the backend moves forward at each confirmed renewal,
/// and the grace between SIGTERM and SIGKILL. The backend chooses the deadline so that
/// deadline + grace stays before the earliest moment the server may expire the lease
/// ([`LeaseRule`]). Whoever runs a command under the lease [`Lease::watch`]es it to learn
/// each new deadline.
#[derive(Clone)]
pub struct Lease(Arc<LeaseShared>);

/// Told each new stop deadline (0: stop now); returns false once it no longer listens.
pub type DeadlineWatcher = Box<dyn FnMut(u64) -> bool + Send>;

struct LeaseShared {
    lock: String,
    stop_at_ns: AtomicU64,
    grace: Duration,
    lost: AtomicBool,
    watchers: Mutex<Vec<DeadlineWatcher>>,
    orphan_release: Mutex<Option<Vec<u8>>>,
}

/// How a lease of TTL `ttl` is used safely: renewed every tenth of it; after a renewal sent at
/// `t` and confirmed, the command must start stopping by `t` + 3/5 of the TTL and is killed by
/// `t` + 4/5, before the server can expire the lease (no earlier than `t` + TTL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseRule {
    /// The TTL, in whole seconds (what the server grants).
    pub ttl: Duration,
}

impl LeaseRule {
    /// The rule for a configured TTL, rounded up to whole seconds (at least one).
    pub fn new(ttl: Duration) -> LeaseRule {
        LeaseRule {
            ttl: Duration::from_secs(ttl.as_secs_f64().ceil().max(1.0) as u64),
        }
    }

    /// The TTL in seconds, as the server takes it.
    pub fn ttl_secs(&self) -> i64 {
        self.ttl.as_secs() as i64
    }

    /// How often to renew.
    pub fn renew_every(&self) -> Duration {
        (self.ttl / 10).max(Duration::from_millis(100))
    }

    /// The stop deadline after a renewal sent at `sent_ns` that left `left` on the lease.
    pub fn stop_at(&self, sent_ns: u64, left: Duration) -> u64 {
        sent_ns.saturating_add((left * 3 / 5).as_nanos() as u64)
    }

    /// SIGTERM-to-SIGKILL grace: the fifth of the TTL between the stop deadline and 4/5.
    pub fn grace(&self) -> Duration {
        self.ttl / 5
    }

    /// The longest a holder's command may run on after its lease or holder key vanished
    /// without the holder knowing: its stop deadline (3/5 of the TTL after a renewal sent
    /// before the vanishing) plus the grace. A waiter that sees a holder vanish without a
    /// release waits this long before it takes the lock.
    pub fn stop_window(&self) -> Duration {
        self.ttl * 4 / 5
    }

    /// A lease of lock `lock` granted at `granted_ns`, under this rule.
    pub fn lease(&self, lock: &str, granted_ns: u64) -> Lease {
        Lease::new(lock, self.stop_at(granted_ns, self.ttl), self.grace())
    }
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
            watchers: Mutex::new(Vec::new()),
            orphan_release: Mutex::new(None),
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
    /// watcher. Ignored once lost.
    pub fn extend(&self, stop_at_ns: u64) {
        if self.0.lost.load(Ordering::SeqCst) {
            return;
        }
        let old = self.0.stop_at_ns.fetch_max(stop_at_ns, Ordering::SeqCst);
        if stop_at_ns > old {
            self.tell(stop_at_ns);
        }
    }

    /// The lease is gone (expired, revoked, or not renewable in time): every watcher's
    /// command stops now.
    pub fn lose(&self) {
        self.0.lost.store(true, Ordering::SeqCst);
        self.0.stop_at_ns.store(0, Ordering::SeqCst);
        self.tell(0);
    }

    /// How to release the lock if its holder dies while the command runs: a token for
    /// [`super::release_orphaned`], which the guardian uses once it has stopped the command's
    /// whole tree, so that the next waiter is served at once rather than when the lease expires.
    pub fn set_orphan_release(&self, token: Vec<u8>) {
        *self
            .0
            .orphan_release
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(token);
    }

    /// See [`Lease::set_orphan_release`].
    pub fn orphan_release(&self) -> Option<Vec<u8>> {
        self.0
            .orphan_release
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Adds a watcher and tells it the current deadline.
    pub fn watch(&self, mut watcher: DeadlineWatcher) {
        let mut watchers = self.0.watchers.lock().unwrap_or_else(|e| e.into_inner());
        if watcher(self.stop_at_ns()) {
            watchers.push(watcher);
        }
    }

    fn tell(&self, value: u64) {
        let mut watchers = self.0.watchers.lock().unwrap_or_else(|e| e.into_inner());
        watchers.retain_mut(|w| w(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One rule for an etcd lease: whole seconds, renewed ten times per TTL, the command
    /// stopped at 3/5 and killed at 4/5 of the TTL after the last renewal was sent — before the
    /// server can expire the lease.
    #[test]
    fn a_lease_stops_its_command_before_the_server_can_expire_it() {
        for (asked, secs) in [(0.2, 1), (1.0, 1), (2.5, 3), (10.0, 10)] {
            let r = LeaseRule::new(Duration::from_secs_f64(asked));
            assert_eq!(
                (r.ttl, r.ttl_secs()),
                (Duration::from_secs(secs), secs as i64)
            );
            let ttl_ns = r.ttl.as_nanos() as u64;
            let sent = 1_000_000_000;
            let stop = r.stop_at(sent, r.ttl);
            assert_eq!(stop - sent, ttl_ns * 3 / 5);
            let kill = stop + r.grace().as_nanos() as u64;
            assert_eq!(kill - sent, ttl_ns * 4 / 5);
            assert!(kill < sent + ttl_ns);
            assert!(r.renew_every() <= r.ttl / 10 || r.renew_every() == Duration::from_millis(100));
            assert_eq!(r.lease("l", sent).stop_at_ns(), stop);
            assert_eq!(sent + r.stop_window().as_nanos() as u64, kill);
        }
    }
}
