//! The directory backend: kernel flock for mutual exclusion, ticket files for the queue, on a
//! local or shared filesystem.
//!
//! Per lock, `<dir>/<name>.lock/` holds `lock` (`lock.K` for slot K), the kernel locks that
//! alone give exclusion; `queue/` (one ticket per live request, flocked by its owner: alive
//! exactly while locked); `tmp/` (tickets being created, locked before they are renamed into
//! `queue/`); `meta.lock`/`meta.json` (ticket numbers, the arrival clock, the generation); and
//! `keys/` (remembered arrivals of queue keys). One module per concern: [`dir`], [`ticket`],
//! [`meta`], [`wait`].
//!
//! Choices beyond the design note, and why:
//! - **Release closes the lock descriptor** instead of `LOCK_UN`: an unlock would also free the
//!   lock for a background process that inherited the descriptor and still runs; a close
//!   leaves it held until the last holder of the descriptor exits.
//! - **`meta.json` is rewritten in place** under `meta.lock` (readers take it shared) instead of
//!   write-and-rename: ext4 starts a writeback on rename-over, which cost milliseconds on every
//!   handoff.
//! - **inotify is set up only once a request is contended** and closed on a background thread
//!   (closing an inotify instance waits for an RCU grace period, 5-20 ms).
//! - **NFS**: the Linux NFS client emulates flock with POSIX locks, which a close of *any*
//!   descriptor of the file drops; so a process never opens a lock or its own ticket twice.

pub mod dir;
pub mod meta;
pub mod ticket;
pub mod wait;

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use self::dir::{open_checked, LockDir, LockPaths};
use self::ticket::{OwnTicket, Probe};
use self::wait::Watcher;
use super::backend::{Backend, Containment, Held, LockState, Queued, Snapshot, TicketData, Wake};
use super::{name, now_ms, Options};
use crate::error::{Error, Result};
use crate::policy::Mode;
use crate::sys;

/// A lock directory as a backend.
#[derive(Debug, Clone)]
pub struct FlockBackend {
    dir: LockDir,
}

impl FlockBackend {
    /// Opens `root`, creating it if needed (exit 73 when it cannot be created or written).
    pub fn open(root: &Path, file_mode: Option<u32>, dir_mode: Option<u32>) -> Result<Self> {
        Ok(FlockBackend {
            dir: LockDir::open(root, file_mode, dir_mode)?,
        })
    }

    /// A lock directory that is only read (status): nothing is created or checked.
    pub fn existing(root: &Path) -> Self {
        FlockBackend {
            dir: LockDir::open_existing(root),
        }
    }
}

impl Backend for FlockBackend {
    fn enqueue(&self, opts: &Options) -> Result<Box<dyn Queued>> {
        let paths = self.dir.prepare(&opts.name)?;
        let mode = wait::effective_mode(opts.wait_mode, &paths.base);
        ticket::sweep_tmp(&paths);
        let (n, at) = meta::enqueue(&paths, now_ms(), opts.queue_key.as_deref())?;
        let data = TicketData {
            id: ticket::ticket_id(n),
            lock: opts.name.clone(),
            mode: opts.mode,
            priority: opts.priority,
            labels: opts.labels.clone(),
            host: sys::hostname(),
            pid: std::process::id(),
            enqueued_at_ms: at,
            wait_limit_ms: opts.wait_limit_ms,
            queue_key: opts.queue_key.clone(),
            holding: false,
            slot: None,
            acquired_at_ms: None,
            generation: None,
            revision: None,
            lease_left_ms: None,
        };
        let own = OwnTicket::create(&paths, data)?;
        Ok(Box::new(FlockQueued {
            slot_files: (0..opts.slots.max(1)).map(|_| None).collect(),
            paths,
            own: Some(own),
            watcher: Watcher::new(mode),
            seen: Vec::new(),
        }))
    }

    fn lock_names(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = match std::fs::read_dir(self.dir.root()) {
            Ok(rd) => rd
                .flatten()
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_suffix(".lock"))
                        .filter(|n| name::validate(n).is_ok())
                        .map(str::to_string)
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        Ok(names)
    }

    fn state(&self, lock: &str) -> Result<LockState> {
        // Paths only: nothing is created for a lock that does not exist.
        let paths = self.dir.paths(lock);
        let tickets = if paths.queue.is_dir() {
            scan(&paths, None)?
        } else {
            Snapshot::default()
        };
        Ok(LockState {
            name: lock.to_string(),
            generation: meta::read(&paths).generation,
            tickets,
        })
    }

    fn describe(&self) -> String {
        format!("file://{}", self.dir.root().display())
    }
}

/// Lists `queue/`, probing every ticket except `skip` (one's own: probing it would drop one's
/// own lock on NFS). Dead tickets are removed; unreadable live ones are left out.
fn scan(paths: &LockPaths, skip: Option<&str>) -> Result<Snapshot> {
    let mut snap = Snapshot::default();
    let entries = std::fs::read_dir(&paths.queue)
        .map_err(|e| Error::io(format!("cannot read {}", paths.queue.display()), e))?;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if Some(name) == skip {
            continue;
        }
        if let Probe::Alive(Some(d)) = ticket::probe(&e.path()) {
            if d.holding {
                snap.holders.push(d);
            } else {
                snap.waiters.push(d);
            }
        }
    }
    snap.holders.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(snap)
}

/// The names in `queue/`, sorted (no probing: a cheap "did anything change" check).
fn list_names(paths: &LockPaths) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(&paths.queue)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A request in a lock directory's queue.
struct FlockQueued {
    paths: LockPaths,
    own: Option<OwnTicket>,
    /// Each slot file opened once per request: on NFS a second descriptor's close would drop
    /// our lock.
    slot_files: Vec<Option<File>>,
    watcher: Watcher,
    /// Ticket names the last scan found alive (sorted), for cheap change checks when polling.
    seen: Vec<String>,
}

impl FlockQueued {
    fn own(&self) -> &OwnTicket {
        self.own.as_ref().expect("own ticket until held or left")
    }
}

impl Queued for FlockQueued {
    fn ticket(&self) -> &TicketData {
        &self.own().data
    }

    fn scan(&mut self) -> Result<Snapshot> {
        let me = self.own().data.id.clone();
        let snap = scan(&self.paths, Some(&me))?;
        self.seen = snap
            .holders
            .iter()
            .chain(&snap.waiters)
            .map(|t| t.id.clone())
            .chain([me])
            .collect();
        self.seen.sort();
        Ok(snap)
    }

    fn try_acquire(&mut self) -> Result<Option<Box<dyn Held>>> {
        let exclusive = self.own().data.mode == Mode::Exclusive;
        for slot in 0..self.slot_files.len() {
            let path = self.paths.slot_file(slot as u32);
            if self.slot_files[slot].is_none() {
                self.slot_files[slot] = Some(open_checked(&path, true, self.paths.file_mode)?);
            }
            let f = self.slot_files[slot].as_ref().expect("opened above");
            let taken = sys::try_flock(f, exclusive)
                .map_err(|e| Error::io(format!("cannot lock {}", path.display()), e))?;
            if taken {
                let lock = self.slot_files[slot].take().expect("opened above");
                return self.granted(slot as u32, lock).map(Some);
            }
        }
        Ok(None)
    }

    fn wait(
        &mut self,
        until: Option<Instant>,
        _at_head: bool,
        signal_fd: BorrowedFd<'_>,
    ) -> Result<Wake> {
        let wake = self.watcher.wait(&self.paths.queue, signal_fd, until);
        // Polling: a listing of `queue/` (no probes, no policy) tells whether anything arrived
        // or left since the last scan.
        if wake == Wake::Timeout && !self.watcher.notifies() && list_names(&self.paths) != self.seen
        {
            return Ok(Wake::Changed);
        }
        Ok(wake)
    }

    fn leave(mut self: Box<Self>, keep_place_for: Option<Duration>) {
        let Some(own) = self.own.take() else { return };
        if let (Some(key), Some(grace)) = (&own.data.queue_key, keep_place_for) {
            let grace_ms = grace.as_millis() as u64;
            if let Err(e) = meta::remember_key(
                &self.paths,
                key,
                own.data.enqueued_at_ms,
                now_ms(),
                grace_ms,
            ) {
                tracing::warn!("could not remember queue key {key:?}: {e}");
            }
        }
        own.remove();
    }
}

impl FlockQueued {
    /// The kernel granted `slot`: count the acquisition (the generation) and mark the ticket.
    fn granted(&mut self, slot: u32, lock: File) -> Result<Box<dyn Held>> {
        let mut own = self.own.take().expect("own ticket");
        let generation = meta::acquired(&self.paths, own.data.queue_key.as_deref())?;
        own.mark_holding(slot, generation, now_ms())?;
        self.slot_files.clear();
        Ok(Box::new(FlockHeld {
            lock: Some(lock),
            own: Some(own),
        }))
    }
}

impl Drop for FlockQueued {
    fn drop(&mut self) {
        if let Some(own) = self.own.take() {
            own.remove();
        }
    }
}

/// A held slot of a lock directory.
struct FlockHeld {
    lock: Option<File>,
    own: Option<OwnTicket>,
}

impl Held for FlockHeld {
    fn ticket(&self) -> &TicketData {
        &self.own.as_ref().expect("held").data
    }

    fn containment(&self) -> Containment {
        Containment::Inherit(self.lock.iter().map(|f| f.as_raw_fd()).collect())
    }

    fn release(mut self: Box<Self>) -> Result<()> {
        self.release_now();
        Ok(())
    }
}

impl FlockHeld {
    /// Closes the locked descriptor (a command that inherited it and still runs keeps the
    /// lock), then removes the ticket, which wakes the next waiter.
    fn release_now(&mut self) {
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
