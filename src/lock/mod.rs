//! The lock engine: a fair ticket queue deciding who *tries*, a backend deciding who *holds*.
//!
//! A request flows [`acquire`] → the engine (`engine.rs`: a driver of the [`schedule`]r, which
//! takes every decision — join, rank through [`order`], try when in the head set, otherwise ask
//! the policy how long to wait — as a state machine without I/O) → [`backend::Backend`] (the
//! mechanics of one store) → [`Guard`]. What a request does is told as [`events`], which
//! progress lines and any other observer consume. [`status`] reads the same queue in the same
//! order without joining it. The engine knows nothing of the command line: callers build
//! [`Options`] (the binary's `LockRequest` does, once, from flags, configuration and
//! environment).
//!
//! Backends: [`flock`] (a lock directory, local or shared; the default), [`etcd`] (an etcd v3
//! cluster, for fleets without a shared filesystem; cargo feature `etcd`) and [`memory`] (one
//! process's memory: tests and `policy simulate`). Each passes the property suite of
//! [`conformance`]. Safety always comes from the backend's grant — the kernel's flock, or one
//! store transaction — never from the queue or the policy.

pub mod backend;
pub mod conformance;
mod engine;
pub mod etcd;
pub mod events;
pub mod flock;
pub mod memory;
pub mod name;
pub mod order;
pub mod schedule;
mod stall;

use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Wall clock in Unix milliseconds (arrival stamps, ages).
pub use crate::sys::now_ms;
pub use backend::{
    Backend, Containment, Departure, Lease, LockState, StoreNote, TicketData, Unreadable,
};
pub use events::{Event, Now, Observer, Observers, Outcome};

use crate::config::WaitMode;
use crate::error::{Error, Result};
use crate::policy::{Mode, Policy};

/// What a request asks for. Built by the caller; the engine validates the name again before
/// anything is opened.
#[derive(Debug, Clone)]
pub struct Options {
    /// Lock name (`[A-Za-z0-9][A-Za-z0-9._-]{0,127}`).
    pub name: String,
    /// Exclusive or shared.
    pub mode: Mode,
    /// Priority (higher goes first under the default policy).
    pub priority: i32,
    /// Labels for policies and status.
    pub labels: Vec<(String, String)>,
    /// The job behind the request: a retry with the same key keeps its original arrival.
    pub queue_key: Option<String>,
    /// The caller's bound on waiting: `Some(0)` is `-n`; caps whatever the policy says.
    pub wait_limit_ms: Option<u64>,
    /// How waiters learn of changes (a flock-backend setting).
    pub wait_mode: WaitMode,
    /// Number of holders at once, each on its own slot (≥ 1).
    pub slots: u32,
    /// Whether a policy's fall-back decision is honoured.
    pub fallback_allowed: bool,
    /// How long a give-up's arrival is remembered for its queue key.
    pub key_grace_ms: u64,
    /// Exit code of conflict, timeout and give-up errors.
    pub conflict_exit_code: i32,
    /// Progress line interval; `None` is quiet.
    pub progress_interval: Option<Duration>,
    /// Who else watches the request (see [`events`]).
    pub observers: Observers,
    /// The policy the ticket records (set by [`acquire`] from the policy it is given).
    pub policy: Option<PolicyRef>,
}

/// The policy a request ranks with, as its ticket records it: `status` says when the waiters
/// of one lock disagree, and metrics label requests with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRef {
    /// As configured (a path for a `.wasm` given on the command line), at most
    /// [`PolicyRef::MAX_NAME`] bytes.
    pub name: String,
    /// `sha256:<hex>` of its module, when known without loading it (see `Policy::digest`).
    pub digest: Option<String>,
}

impl PolicyRef {
    /// Longest policy name a ticket records (longer ones, paths, are cut).
    pub const MAX_NAME: usize = 256;

    /// What `policy` is.
    pub fn of(policy: &dyn Policy) -> PolicyRef {
        PolicyRef {
            name: cut(policy.name(), Self::MAX_NAME).to_string(),
            digest: policy.digest().map(digest_label),
        }
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
pub fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A module digest as records and labels show it: `sha256:<hex>`.
pub fn digest_label(hex: &str) -> String {
    if hex.starts_with("sha256:") {
        hex.to_string()
    } else {
        format!("sha256:{hex}")
    }
}

impl Options {
    /// Defaults for lock `name`: exclusive, priority 0, wait forever, auto wait mode, one slot,
    /// 10-minute key grace, conflict code 1, quiet.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            mode: Mode::Exclusive,
            priority: 0,
            labels: Vec::new(),
            queue_key: None,
            wait_limit_ms: None,
            wait_mode: WaitMode::Auto,
            slots: 1,
            fallback_allowed: false,
            key_grace_ms: 600_000,
            conflict_exit_code: crate::error::code::CONFLICT_DEFAULT,
            progress_interval: None,
            observers: Observers::new(),
            policy: None,
        }
    }
}

/// Most labels one request may carry (every waiter's labels are read by every other waiter
/// and passed to its policy, so they are bounded).
pub const MAX_LABELS: usize = 32;
/// Longest label key, in bytes.
pub const MAX_LABEL_KEY: usize = 64;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE: usize = 256;
/// Longest queue key, in bytes.
pub const MAX_QUEUE_KEY: usize = 256;

/// Checks what a request may publish in a shared queue: the name, and labels and queue key
/// within their bounds (a usage error, exit 64, saying which bound).
pub fn validate(opts: &Options) -> Result<()> {
    name::validate(&opts.name)?;
    if opts.labels.len() > MAX_LABELS {
        return Err(Error::usage(format!(
            "{} labels given; at most {MAX_LABELS} are allowed",
            opts.labels.len()
        )));
    }
    for (k, v) in &opts.labels {
        if k.is_empty() || k.len() > MAX_LABEL_KEY || v.len() > MAX_LABEL_VALUE {
            return Err(Error::usage(format!(
                "label {:?}: keys must be 1 to {MAX_LABEL_KEY} bytes and values at most {MAX_LABEL_VALUE} bytes",
                crate::output::escape(&format!("{k}={v}").chars().take(80).collect::<String>())
            )));
        }
    }
    if let Some(k) = &opts.queue_key {
        if k.is_empty() || k.len() > MAX_QUEUE_KEY {
            return Err(Error::usage(format!(
                "the queue key must be 1 to {MAX_QUEUE_KEY} bytes (it is {})",
                k.len()
            )));
        }
    }
    Ok(())
}

/// Where locks live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Store {
    /// A lock directory (`file://DIR`), with the permission bits of what is created in it.
    Dir {
        /// The directory.
        path: PathBuf,
        /// Mode of created files (default 0666; the umask applies).
        file_mode: Option<u32>,
        /// Mode of created directories (default 0777; the umask applies).
        dir_mode: Option<u32>,
    },
    /// An etcd v3 cluster (`etcd://HOST:PORT,.../PREFIX`).
    Etcd(etcd::EtcdStore),
}

/// Opens the store for requests (creating a lock directory if needed).
pub fn open(store: &Store) -> Result<Box<dyn Backend>> {
    match store {
        Store::Dir {
            path,
            file_mode,
            dir_mode,
        } => Ok(Box::new(flock::FlockBackend::open(
            path, *file_mode, *dir_mode,
        )?)),
        Store::Etcd(s) => open_etcd(s),
    }
}

#[cfg(feature = "etcd")]
fn open_etcd(s: &etcd::EtcdStore) -> Result<Box<dyn Backend>> {
    Ok(Box::new(etcd::EtcdBackend::connect(s)?))
}

#[cfg(not(feature = "etcd"))]
fn open_etcd(s: &etcd::EtcdStore) -> Result<Box<dyn Backend>> {
    Err(Error::config(format!(
        "{} names an etcd store, but this cachelock was built without the `etcd` feature",
        s.describe()
    )))
}

/// Releases a held lock whose holder died, with the token its backend left on the lease
/// ([`Lease::set_orphan_release`]); for the command's guardian, once the whole tree is gone.
#[cfg(feature = "etcd")]
pub fn release_orphaned(token: &[u8]) -> Result<()> {
    etcd::release_orphaned(token)
}

/// See the `etcd` feature's version: no other backend leaves a token.
#[cfg(not(feature = "etcd"))]
pub fn release_orphaned(_token: &[u8]) -> Result<()> {
    Err(Error::config(
        "no backend of this cachelock releases for a guardian",
    ))
}

/// Opens the store for reading only (`status`): nothing is created.
pub fn open_existing(store: &Store) -> Result<Box<dyn Backend>> {
    match store {
        Store::Dir { path, .. } => Ok(Box::new(flock::FlockBackend::existing(path))),
        Store::Etcd(s) => open_etcd(s),
    }
}

/// Opens the store for watching only (`serve`, `status --watch`): nothing is created, and a
/// lock directory's dead tickets are left for the requests to remove.
pub fn open_watch_only(store: &Store) -> Result<Box<dyn Backend>> {
    match store {
        Store::Dir { path, .. } => Ok(Box::new(flock::FlockBackend::watch_only(path))),
        Store::Etcd(s) => open_etcd(s),
    }
}

/// The outcome of [`acquire`].
#[derive(Debug)]
pub enum Acquired {
    /// The lock is held until the guard is released or dropped.
    Held(Guard),
    /// The policy chose to fall back (only when allowed); nothing is left queued.
    FellBack {
        /// The policy's reason.
        reason: String,
    },
}

/// A held lock; released by [`Guard::release`] or on drop.
pub struct Guard {
    held: Option<Box<dyn backend::Held>>,
    waited: Duration,
    /// What the release tells the store and the observers.
    record: Box<Record>,
}

/// A held request's record, kept for its departure and its final event.
struct Record {
    observers: Observers,
    policy: String,
    digest: Option<String>,
    faults: u32,
    wait: schedule::Record,
    origin: Instant,
    acquired_at: Instant,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("ticket", &self.ticket())
            .field("generation", &self.generation())
            .field("slot", &self.slot())
            .finish()
    }
}

impl Guard {
    fn new(
        held: Box<dyn backend::Held>,
        wait: &schedule::Record,
        opts: &Options,
        policy: &dyn Policy,
        origin: Instant,
    ) -> Guard {
        Guard {
            held: Some(held),
            waited: wait.waited,
            record: Box::new(Record {
                observers: opts.observers.clone(),
                policy: policy.name().to_string(),
                digest: policy.digest().map(str::to_string),
                faults: policy.faults(),
                wait: wait.clone(),
                origin,
                acquired_at: Instant::now(),
            }),
        }
    }

    fn data(&self) -> &TicketData {
        self.held.as_ref().expect("held until released").ticket()
    }
    /// This request's ticket id.
    pub fn ticket(&self) -> &str {
        self.data().id()
    }
    /// Fencing token: grows at every acquisition of this lock.
    pub fn generation(&self) -> u64 {
        self.data().generation.unwrap_or(0)
    }
    /// The slot held (0-based).
    pub fn slot(&self) -> u32 {
        self.data().slot.unwrap_or(0)
    }
    /// How long the request waited.
    pub fn waited(&self) -> Duration {
        self.waited
    }
    /// How a command must run so the lock covers it.
    pub fn containment(&self) -> Containment {
        self.held
            .as_ref()
            .expect("held until released")
            .containment()
    }
    /// Releases the lock and leaves the queue.
    pub fn release(mut self) {
        self.release_now();
    }

    fn release_now(&mut self) {
        let Some(mut held) = self.held.take() else {
            return;
        };
        let r = &self.record;
        let lost = match held.containment() {
            Containment::Lease(l) => l.is_lost(),
            Containment::Inherit(_) => false,
        };
        let outcome = if lost {
            Outcome::Lost
        } else {
            Outcome::Acquired
        };
        let now = Instant::now();
        let held_for = now.saturating_duration_since(r.acquired_at);
        if !r.observers.is_empty() {
            let at = Now {
                at: now.saturating_duration_since(r.origin),
                wall_ms: now_ms(),
            };
            r.observers.event(
                at,
                &Event::Finished(events::Summary {
                    ticket: held.ticket(),
                    policy: &r.policy,
                    digest: r.digest.as_deref(),
                    faults: r.faults,
                    outcome,
                    reason: None,
                    waited: r.wait.waited,
                    held: Some(held_for),
                    position_at_arrival: r.wait.position_at_arrival,
                    decisions: r.wait.decisions,
                    last_decision: r.wait.last_decision.as_ref(),
                }),
            );
        }
        held.depart(&backend::Departure {
            outcome,
            waited: r.wait.waited,
            held: Some(held_for),
            policy: &r.policy,
            digest: r.digest.as_deref(),
        });
        held.release();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.release_now();
    }
}

/// What ends a wait from outside: a terminating signal (the binary's signal handlers), or a
/// test's cancellation.
pub trait Interrupt {
    /// A descriptor that becomes readable when something may have arrived.
    fn fd(&self) -> BorrowedFd<'_>;
    /// The terminating signal received since the last call, if any (consumed).
    fn take(&self) -> Option<i32>;
}

/// Joins the queue of `opts.name` in `backend` and waits per `policy`, bounded by the caller.
/// A signal seen on `interrupt` while waiting leaves the queue and returns `Kind::Signal(sig)`.
pub fn acquire(
    backend: &dyn Backend,
    opts: &Options,
    policy: &mut dyn Policy,
    interrupt: &dyn Interrupt,
) -> Result<Acquired> {
    validate(opts)?;
    if opts.policy.is_none() {
        let opts = Options {
            policy: Some(PolicyRef::of(policy)),
            ..opts.clone()
        };
        return engine::run(backend, &opts, policy, interrupt);
    }
    engine::run(backend, opts, policy, interrupt)
}

/// One lock as `status` shows it: holders, and waiters in serving order with their ranks.
#[derive(Debug, Clone)]
pub struct LockStatus {
    /// Lock name.
    pub name: String,
    /// Whether the store has the lock at all.
    pub exists: bool,
    /// Acquisitions so far.
    pub generation: u64,
    /// Current holders, by ticket id.
    pub holders: Vec<TicketData>,
    /// What the store says of tickets beyond their content, by ticket id.
    pub notes: std::collections::HashMap<String, StoreNote>,
    /// Waiters in the order they will be served, with their ranks.
    pub waiters: Vec<(TicketData, i64)>,
    /// Why the order is the fallback order (rank = priority) rather than the policy's, if so.
    pub order_note: Option<String>,
    /// Live tickets that cannot be read (not ranked, not waited for, but shown).
    pub unreadable: Vec<Unreadable>,
}

/// The status of lock `name`, its waiters ranked by `policy` (every waiter is ranked, so the
/// ranks can be shown; a policy that cannot rank gives the fallback order and a note).
pub fn status(backend: &dyn Backend, name: &str, policy: &mut dyn Policy) -> Result<LockStatus> {
    name::validate(name)?;
    let state = backend.state(name)?;
    let (waiters, order_note) = order::rank_for_status(state.tickets.waiters, policy, now_ms());
    Ok(LockStatus {
        name: state.name,
        exists: state.exists,
        generation: state.generation,
        holders: state.tickets.holders,
        notes: state.notes,
        waiters,
        order_note,
        unreadable: state.unreadable,
    })
}
