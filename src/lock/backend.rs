//! The seam between the engine and a lock store. The engine (`engine.rs`) owns the decisions —
//! who is at the head, when to try, how long to wait, when to give up — and a backend owns the
//! mechanics: publishing a ticket, listing the live ones, granting the lock atomically with its
//! generation, waiting for a change, and saying how a command must run so the lock covers it.
//!
//! Backends: [`super::flock`] (a directory: kernel flock for exclusion, ticket files for the
//! queue). A lease-based store (etcd) plugs in here too: its tickets die with their lease, its
//! grant is one transaction, and its held lock can be lost, which [`Containment`] expresses.

use std::os::fd::{BorrowedFd, RawFd};
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

    /// Tries to take the lock now in our mode on any free slot. The generation is assigned
    /// atomically with the grant and our ticket is marked holding. `Ok(None)`: not free.
    fn try_acquire(&mut self) -> Result<Option<Box<dyn Held>>>;

    /// Sleeps until the queue changes, `signal_fd` becomes readable, or `until` (never when
    /// `None`). `at_head`: we are in the head set. The first call may set up change
    /// notification and return [`Wake::Changed`] at once, so that nothing between the last
    /// scan and the set-up is missed.
    fn wait(
        &mut self,
        until: Option<Instant>,
        at_head: bool,
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
}
