//! The directory backend: kernel flock for mutual exclusion, ticket files for the queue, on a
//! local or shared filesystem.
//!
//! Per lock, `<dir>/<name>.lock/` holds `lock` (`lock.K` for slot K), the kernel locks that
//! alone give exclusion; `queue/` (one ticket per live request, flocked by its owner: alive
//! exactly while locked); `tmp/` (tickets being created, locked before they are published in
//! `queue/`); `held/` (the holders, see [`held`]); `meta.lock` with `meta.d/` and `meta.json`
//! (ticket numbers, the arrival clock, the generation, the on-disk format, see [`meta`]); and
//! `keys/` (remembered arrivals of queue keys). One module per concern: [`dir`], [`ticket`],
//! [`held`], [`meta`], [`wait`]. docs/architecture.md has the layout, docs/security.md the
//! threat model.
//!
//! Choices beyond the design note, and why:
//! - **Release closes the lock descriptor** instead of `LOCK_UN`: an unlock would also free the
//!   lock for a background process that inherited the descriptor and still runs; a close
//!   leaves it held until the last holder of the descriptor exits.
//! - **The command inherits the ticket too**, so that a holder whose cachelock was killed still
//!   has a live ticket saying "holding" (for `status`, and for [`held`]'s check) while its
//!   command runs.
//! - **Counters are rewritten in place** under `meta.lock` (readers take it shared) instead of
//!   write-and-rename: ext4 starts a writeback on rename-over, which cost milliseconds on every
//!   handoff.
//! - **inotify is set up only once a request is contended** and closed on a background thread
//!   (closing an inotify instance waits for an RCU grace period, 5-20 ms).
//! - **NFS**: the Linux NFS client emulates flock with POSIX locks, which a close of *any*
//!   descriptor of the file drops; so a process never opens a lock or its own ticket twice.

pub mod dir;
pub mod held;
pub mod meta;
pub mod ticket;
pub mod wait;

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use self::dir::{slot_file, LockDir, LockFiles};
use self::ticket::OwnTicket;
use self::ticket::TicketCache;
use self::wait::{Seen, Watcher};
use super::backend::{
    Backend, Containment, Held, LockState, Queued, Snapshot, TicketData, Wake, Watch,
};
use super::{name, now_ms, Options};
use crate::config::WaitMode;
use crate::error::{Error, Kind, Result};
use crate::policy::Mode;
use crate::sys;

/// A lock directory as a backend.
#[derive(Debug, Clone)]
pub struct FlockBackend {
    dir: LockDir,
    /// When the reads of `status` stop waiting for `meta.lock`s that others hold (set at the
    /// first read): one bound for the whole listing, however many locks are held that way.
    status_until: Arc<std::sync::OnceLock<Instant>>,
    /// Only watched (`serve`, `status --watch`): reading leaves dead tickets in place.
    watch_only: bool,
}

/// How long `status` waits in all for `meta.lock`s that other processes hold, before it
/// reads the remaining locks' counters without them (and says so for each).
const STATUS_PATIENCE: Duration = Duration::from_secs(2);

/// How long one read of a watcher (`serve`, `status --watch`) waits for a `meta.lock`.
const WATCH_PATIENCE: Duration = Duration::from_millis(250);

impl FlockBackend {
    /// Opens `root`, creating it if needed (exit 73 when it cannot be created or written).
    pub fn open(root: &Path, file_mode: Option<u32>, dir_mode: Option<u32>) -> Result<Self> {
        Ok(FlockBackend {
            dir: LockDir::open(root, file_mode, dir_mode)?,
            status_until: Default::default(),
            watch_only: false,
        })
    }

    /// A lock directory that is only read (status): nothing is created or checked.
    pub fn existing(root: &Path) -> Self {
        FlockBackend {
            dir: LockDir::open_existing(root),
            status_until: Default::default(),
            watch_only: false,
        }
    }

    /// A lock directory that is only watched (`serve`, `status --watch`): nothing in it is
    /// created, checked or removed (not even a dead request's ticket).
    pub fn watch_only(root: &Path) -> Self {
        FlockBackend {
            dir: LockDir::open_existing(root),
            status_until: Default::default(),
            watch_only: true,
        }
    }
}

/// How many times a request takes a new ticket number when its number is found taken.
const PUBLISH_ATTEMPTS: u64 = 8;

impl Backend for FlockBackend {
    fn enqueue(&self, opts: &Options) -> Result<Box<dyn Queued>> {
        let files = Arc::new(self.dir.prepare(&opts.name)?);
        // One statfs decides both: how changes are seen, and whether the kernel waits of a
        // local filesystem (open-file-description locks beside flock) may be used.
        let network = sys::is_network_fs_fd(files.base.as_fd());
        let mode = wait::effective_mode(opts.wait_mode, network);
        ticket::sweep_tmp(&files);
        let mut at_least = 0;
        let mut attempts = 0;
        let own = loop {
            let (n, at) = meta::enqueue(&files, now_ms(), opts.queue_key.as_deref(), at_least)?;
            let mut data = TicketData::new(
                opts,
                ticket::ticket_id(n),
                at,
                sys::hostname(),
                std::process::id(),
            );
            data.uid = Some(sys::euid());
            // A taken number means the counters went back (a lowered or lost counters file):
            // never replace that ticket, take a higher number.
            match OwnTicket::create(&files, data, !network)? {
                Some(own) => break own,
                None if attempts < PUBLISH_ATTEMPTS => {
                    attempts += 1;
                    // Past every ticket there, by an unpredictable step: numbers planted
                    // ahead of us cannot make every attempt collide.
                    at_least = highest_id(&files)
                        .max(n)
                        .saturating_add(1 + sys::unpredictable() % 1024);
                }
                None => {
                    return Err(Error::new(
                        Kind::IoErr,
                        format!(
                            "cannot publish a ticket in {}: every number tried is taken",
                            files.path("queue").display()
                        ),
                    ))
                }
            }
        };
        Ok(Box::new(FlockQueued {
            slot_files: (0..opts.slots.max(1)).map(|_| None).collect(),
            files,
            own: Some(own),
            kernel_waits: !network && mode == WaitMode::Notify,
            watcher: Watcher::new(mode),
            seen: Vec::new(),
            cache: TicketCache::default(),
            last: None,
            blocked: None,
            unchained: None,
        }))
    }

    fn lock_names(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = match sys::open_dir(self.dir.root()) {
            Ok(fd) => match sys::list_dir(fd.as_fd(), 64 * dir::MAX_ENTRIES) {
                Ok((entries, _)) => entries
                    .into_iter()
                    .filter(|(_, kind)| *kind == sys::EntryKind::Dir)
                    .filter_map(|(n, _)| {
                        n.strip_suffix(".lock")
                            .filter(|n| name::validate(n).is_ok())
                            .map(str::to_string)
                    })
                    .collect(),
                Err(_) => Vec::new(),
            },
            Err(_) => Vec::new(),
        };
        names.sort();
        Ok(names)
    }

    fn state(&self, lock: &str) -> Result<LockState> {
        // Nothing is created for a lock that does not exist.
        let Some(mut files) = self.dir.existing(lock)? else {
            return Ok(LockState {
                name: lock.to_string(),
                ..Default::default()
            });
        };
        files.remove_dead = !self.watch_only;
        let queue = ticket::scan_queue(&files, None, None)?;
        let mut unreadable = queue.unreadable;
        // A watcher reads again and again: each read has its own, shorter bound.
        let (until, patience) = if self.watch_only {
            (Instant::now() + WATCH_PATIENCE, WATCH_PATIENCE)
        } else {
            let until = self
                .status_until
                .get_or_init(|| Instant::now() + STATUS_PATIENCE);
            (*until, STATUS_PATIENCE)
        };
        let (counters, locked) = meta::read(&files, until);
        if !locked {
            unreadable.push(super::backend::Unreadable {
                ticket: "meta.lock".to_string(),
                owner_uid: sys::info_at(files.base.as_fd(), "meta.lock")
                    .ok()
                    .map(|i| i.uid),
                reason: format!(
                    "held by another process past status's {} ms bound: the counters (generation {}) were read without it and may be a moment old",
                    patience.as_millis(),
                    counters.generation
                ),
            });
        }
        Ok(LockState {
            name: lock.to_string(),
            exists: true,
            generation: counters.generation,
            tickets: snapshot(queue.live),
            unreadable,
            notes: Default::default(),
        })
    }

    fn describe(&self) -> String {
        format!("file://{}", self.dir.root().display())
    }
}

/// Live tickets as holders (by id) and waiters.
fn snapshot(live: Vec<ticket::FileTicket>) -> Snapshot {
    let mut snap = Snapshot::default();
    for t in live {
        if t.data.holding {
            snap.holders.push(t.data);
        } else {
            snap.waiters.push(t.data);
        }
    }
    snap.holders.sort_by(|a, b| a.id().cmp(b.id()));
    snap
}

/// The highest ticket number in `queue/` (to recover from counters that went back), at most
/// [`meta::plausible`].
fn highest_id(files: &LockFiles) -> u64 {
    list_names(files)
        .iter()
        .filter_map(|n| n.parse::<u64>().ok())
        .map(meta::plausible)
        .max()
        .unwrap_or(0)
}

/// The ticket names in `queue/`, sorted (no probing: a cheap "did anything change" check).
fn list_names(files: &LockFiles) -> Vec<String> {
    let mut v: Vec<String> = sys::list_dir_valid(
        files.queue.as_fd(),
        dir::MAX_ENTRIES,
        dir::MAX_SCANNED,
        ticket::is_ticket_id,
    )
    .map(|l| l.entries.into_iter().map(|(n, _)| n).collect())
    .unwrap_or_default();
    v.sort();
    v
}

/// A request in a lock directory's queue.
///
/// **How it waits** (notify mode on a local filesystem): the head set watches `queue/` with
/// inotify (a release removes the holder's ticket; an arrival may rank before us) and tries the
/// lock without blocking — only the kernel's non-blocking grant ever admits a holder. Behind
/// the head set, a helper thread blocks on the *waiting lock* of the ticket just ahead of us
/// (see [`OwnTicket::stop_waiting`]), which its owner drops when it takes the lock, leaves or
/// dies: a hand-off wakes the new holder and the one waiter behind it, whatever the length of
/// the queue, and no inotify instance is needed behind the head. A ticket without a waiting
/// lock (an older cachelock) is watched through the whole queue, as is every ticket in poll
/// mode.
struct FlockQueued {
    files: Arc<LockFiles>,
    own: Option<OwnTicket>,
    /// Each slot file opened once per request: on NFS a second descriptor's close would drop
    /// our lock.
    slot_files: Vec<Option<File>>,
    /// Notify mode on a local filesystem: waits in the kernel (see above).
    kernel_waits: bool,
    watcher: Watcher,
    /// Ticket names the last scan found alive (sorted), for cheap change checks when polling.
    seen: Vec<String>,
    /// Other tickets' content, so that a rescan reads only what changed.
    cache: TicketCache,
    /// What the last scan found (see [`Queued::rescan`]).
    last: Option<Snapshot>,
    /// The wait in the kernel in progress, if any.
    blocked: Option<Blocked>,
    /// The ticket ahead that carries no waiting lock, watched through the queue instead.
    unchained: Option<String>,
}

/// A kernel wait on a helper thread: for the waiting lock of the ticket `ahead` (its owner is
/// just before us in the queue).
struct Blocked {
    ahead: String,
    call: sys::Interruptible,
}

impl FlockQueued {
    fn own(&self) -> &OwnTicket {
        self.own.as_ref().expect("own ticket until held or left")
    }

    /// The descriptor of slot file `slot`, opened (created) if needed.
    fn slot(&mut self, slot: usize) -> Result<&File> {
        if self.slot_files[slot].is_none() {
            let f = self.files.open(
                self.files.base.as_fd(),
                "",
                &slot_file(slot as u32),
                Some(self.files.file_mode),
            )?;
            self.slot_files[slot] = Some(f);
        }
        Ok(self.slot_files[slot].as_ref().expect("opened above"))
    }
}

impl Queued for FlockQueued {
    fn ticket(&self) -> &TicketData {
        &self.own().data
    }

    fn scan(&mut self) -> Result<Snapshot> {
        let me = self.own().data.id().to_string();
        // Never one's own ticket: probing it would drop one's own lock on NFS.
        let snap =
            snapshot(ticket::scan_queue(&self.files, Some(&me), Some(&mut self.cache))?.live);
        self.seen = snap
            .holders
            .iter()
            .chain(&snap.waiters)
            .map(|t| t.id().to_string())
            .chain([me])
            .collect();
        self.seen.sort();
        self.last = Some(snap.clone());
        Ok(snap)
    }

    fn rescan(&mut self) -> Result<(Snapshot, bool)> {
        // One listing, and a probe of new names only, instead of opening and probing every
        // ticket: with hundreds of waiters those probes were most of what a waiter far back
        // spent on each periodic look. Tickets of dead owners stay until someone who scans in
        // full removes them; the waiter behind each one does at once (its waiting lock is
        // dropped at death), and the head set scans in full on every look.
        let Some(last) = self.last.take() else {
            return Ok((self.scan()?, false));
        };
        let names = list_names(&self.files);
        let me = self.own().data.id().to_string();
        let mut known: std::collections::HashMap<String, TicketData> = last
            .holders
            .into_iter()
            .chain(last.waiters)
            .map(|t| (t.id().to_string(), t))
            .collect();
        let mut snap = Snapshot::default();
        for name in &names {
            if *name == me {
                continue;
            }
            let t = match known.remove(name) {
                Some(t) => t,
                None => match ticket::probe_cached(
                    self.files.queue.as_fd(),
                    name,
                    name,
                    &self.files.name,
                    Some(&mut self.cache),
                    true,
                ) {
                    ticket::Probe::Alive(Ok(t)) => t.data,
                    _ => continue,
                },
            };
            if t.holding {
                snap.holders.push(t);
            } else {
                snap.waiters.push(t);
            }
        }
        self.seen = names;
        self.last = Some(snap.clone());
        Ok((snap, true))
    }

    fn try_acquire(&mut self) -> Result<Option<Box<dyn Held>>> {
        // Only the head set tries, and it does not wait behind anyone.
        self.cancel_wait();
        let exclusive = self.own().data.request().mode == Mode::Exclusive;
        for slot in 0..self.slot_files.len() {
            let name = slot_file(slot as u32);
            // Twice: once more if the file we hold a descriptor of was replaced meanwhile.
            for _ in 0..2 {
                let f = self.slot(slot)?;
                let taken = sys::try_flock(f, exclusive).map_err(|e| {
                    Error::io(
                        format!("cannot lock {}", self.files.path(&name).display()),
                        e,
                    )
                })?;
                if !taken {
                    break;
                }
                // The kernel locked the file our descriptor is; if the name no longer is that
                // file, the lock excludes nobody: let it go and take the file there now.
                let lock = self.slot_files[slot].take().expect("opened above");
                if !sys::is_same_file_at(&lock, self.files.base.as_fd(), &name) {
                    continue;
                }
                match self.granted(slot as u32, lock)? {
                    Some(held) => return Ok(Some(held)),
                    None => break,
                }
            }
        }
        Ok(None)
    }

    fn wait(
        &mut self,
        until: Option<Instant>,
        watch: Watch<'_>,
        signal_fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<Wake> {
        if self.kernel_waits {
            match watch {
                Watch::Ahead(t) if self.unchained.as_deref() != Some(t.id()) => {
                    if let Some(wake) = self.wait_behind(t, until, signal_fd)? {
                        return Ok(wake);
                    }
                }
                _ => {}
            }
        }
        self.cancel_wait();
        let wake = self
            .watcher
            .wait(self.files.queue.as_fd(), signal_fd, until);
        // Polling: a listing of `queue/` (no probes, no policy) tells whether anything arrived
        // or left since the last scan.
        if wake == Wake::Timeout && !self.watcher.notifies() && list_names(&self.files) != self.seen
        {
            return Ok(Wake::Changed);
        }
        Ok(wake)
    }

    fn leave(mut self: Box<Self>, keep_place_for: Option<Duration>) {
        self.cancel_wait();
        let Some(own) = self.own.take() else { return };
        if let (Some(key), Some(grace)) = (&own.data.queue_key, keep_place_for) {
            let grace_ms = grace.as_millis() as u64;
            if let Err(e) = meta::remember_key(
                &self.files,
                key,
                own.data.request().enqueued_at_ms,
                now_ms(),
                grace_ms,
            ) {
                tracing::warn!("could not remember queue key {key:?}: {e}");
            }
        }
        own.remove();
    }

    fn vanish(mut self: Box<Self>) {
        self.cancel_wait();
        if let Some(own) = self.own.take() {
            own.abandon();
        }
    }
}

impl FlockQueued {
    /// Behind the head set: waits in the kernel on the waiting lock of `ahead`, the ticket
    /// just before us. `Ok(None)`: that ticket carries none (the caller watches the queue).
    fn wait_behind(
        &mut self,
        ahead: &TicketData,
        until: Option<Instant>,
        signal_fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<Option<Wake>> {
        if self.blocked.as_ref().is_some_and(|b| b.ahead != ahead.id()) {
            self.cancel_wait();
        }
        if self.blocked.is_none() {
            let Ok((file, _)) = sys::open_read_at(self.files.queue.as_fd(), ahead.id()) else {
                // Gone since the scan.
                return Ok(Some(Wake::Changed));
            };
            if !sys::ofd_locked_exclusively(&file).unwrap_or(false) {
                // No waiting lock: it has taken the lock or left since the scan (look again),
                // or it is an older cachelock's (watch the queue instead).
                self.cache.forget(ahead.id());
                let fresh = match ticket::probe(
                    self.files.queue.as_fd(),
                    ahead.id(),
                    ahead.id(),
                    &self.files.name,
                ) {
                    ticket::Probe::Alive(Ok(t)) => !t.data.holding,
                    _ => false,
                };
                if fresh {
                    self.unchained = Some(ahead.id().to_string());
                    return Ok(None);
                }
                return Ok(Some(Wake::Changed));
            }
            let call = sys::Interruptible::start(move || sys::ofd_lock_wait(&file, false))
                .map_err(|e| Error::new(Kind::OsErr, format!("cannot start a thread: {e}")))?;
            self.blocked = Some(Blocked {
                ahead: ahead.id().to_string(),
                call,
            });
        }
        loop {
            let other = self.blocked.as_ref().map(|b| b.call.fd());
            return Ok(Some(match self.watcher.sleep(signal_fd, other, until) {
                Seen::Signal => Wake::Signal,
                Seen::Other => {
                    // Taken, left or died: its content may have changed (holding).
                    self.blocked = None;
                    self.cache.forget(ahead.id());
                    Wake::Changed
                }
                // A queue watch left from an earlier place in the queue: not ours to act on.
                Seen::Queue(_) if until.is_none_or(|u| Instant::now() < u) => continue,
                Seen::Queue(_) | Seen::Timeout => Wake::Timeout,
            }));
        }
    }

    /// Ends the kernel wait in progress, if any (it holds nothing that matters: a shared lock
    /// on another ticket, dropped with the helper's descriptor).
    fn cancel_wait(&mut self) {
        if let Some(b) = self.blocked.take() {
            let _ = b.call.cancel();
        }
    }

    /// The kernel granted `slot` on `lock`. Under `meta.lock`: unless another live holder
    /// holds the slot on another file (the lock file was replaced while held), count the
    /// acquisition, mark our ticket holding and publish it in `held/`. `Ok(None)`: we backed
    /// off (closing `lock` releases the kernel lock).
    fn granted(&mut self, slot: u32, lock: File) -> Result<Option<Box<dyn Held>>> {
        let file_id = sys::info(&lock)
            .map_err(|e| {
                Error::io(
                    format!(
                        "cannot stat {}",
                        self.files.path(&slot_file(slot)).display()
                    ),
                    e,
                )
            })?
            .id();
        let files = self.files.clone();
        let mut own = self.own.take().expect("own ticket");
        let mode = own.data.request().mode;
        let key = own.data.queue_key.clone();
        let mut conflict = None;
        let mut held_name = None;
        let generation = meta::acquired(
            &files,
            key.as_deref(),
            || {
                let holders = held::check(&files, slot, mode, file_id)?;
                conflict = holders.conflict;
                Ok(conflict.is_none().then_some(holders.max_generation))
            },
            |generation| {
                own.mark_holding(slot, generation, now_ms(), file_id)?;
                held_name = Some(held::add(&files, &own, slot)?);
                // The waiter behind us takes our place at the head now, so that it already
                // waits in the kernel when we release.
                own.stop_waiting();
                Ok(())
            },
        );
        let generation = match generation {
            Ok(g) => g,
            Err(e) => {
                self.own = Some(own);
                return Err(e);
            }
        };
        let Some(_) = generation else {
            self.own = Some(own);
            if let Some(other) = conflict {
                warn_replaced(&files, slot, &other);
            }
            return Ok(None);
        };
        self.slot_files.clear();
        Ok(Some(Box::new(FlockHeld {
            lock: Some(lock),
            own: Some(own),
            files,
            held_name: held_name.expect("recorded with the generation"),
        })))
    }
}

/// Says once per process that the kernel granted a lock file that is not the one a live
/// holder holds.
fn warn_replaced(files: &LockFiles, slot: u32, other: &TicketData) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "{} is not the file that ticket {} ({}:{}) holds: the lock file was removed or renamed while held; waiting for that holder to finish",
            files.path(&slot_file(slot)).display(),
            crate::output::escape(other.id()),
            crate::output::escape(&other.request().host),
            other.request().pid
        );
    }
}

impl Drop for FlockQueued {
    fn drop(&mut self) {
        self.cancel_wait();
        if let Some(own) = self.own.take() {
            own.remove();
        }
    }
}

/// A held slot of a lock directory.
struct FlockHeld {
    lock: Option<File>,
    own: Option<OwnTicket>,
    files: Arc<LockFiles>,
    /// Our entry in `held/`.
    held_name: String,
}

impl Held for FlockHeld {
    fn ticket(&self) -> &TicketData {
        &self.own.as_ref().expect("held").data
    }

    fn containment(&self) -> Containment {
        Containment::Inherit(
            self.lock
                .iter()
                .map(|f| f.as_raw_fd())
                .chain(self.own.iter().map(|t| t.fd().as_raw_fd()))
                .collect(),
        )
    }

    fn release(mut self: Box<Self>) {
        self.release_now();
    }

    fn vanish(mut self: Box<Self>) {
        // Descriptors closed, files left: what a SIGKILL leaves (the kernel frees the lock).
        drop(self.lock.take());
        if let Some(own) = self.own.take() {
            own.abandon();
        }
    }
}

impl FlockHeld {
    /// Withdraws from `held/`, closes the locked descriptor (a command that inherited it and
    /// still runs keeps the lock), then removes the ticket, which wakes the next waiter.
    fn release_now(&mut self) {
        if self.own.is_some() {
            held::remove(&self.files, &self.held_name);
        }
        drop(self.lock.take());
        if let Some(own) = self.own.take() {
            own.remove();
        }
    }
}

impl Drop for FlockHeld {
    fn drop(&mut self) {
        self.release_now();
    }
}
