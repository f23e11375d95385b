//! Following a store's changes, for `status --watch` (redraw) and `serve` (look again): inotify
//! on a lock directory (its lock directories appearing, and each lock's `queue/`: arrivals,
//! departures, tickets rewritten by new holders), a watch of the key prefix on etcd. Changes
//! come in bursts (a hand-off is a removal, a rewrite and a link); [`StoreWatch::wait`]
//! gathers a burst for [`SETTLE`] before it says so.
//!
//! inotify does not see what other hosts do on a network filesystem: there, and whenever a
//! watch cannot be set up, the caller's own timeout is what brings the next look.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::lock::backend::StoreEvent;
use crate::lock::{name, Store};
use crate::sys::{self, Inotify};

/// How long a burst of changes is gathered before a wait says the store changed.
pub const SETTLE: Duration = Duration::from_millis(10);

/// Why [`StoreWatch::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The store changed (or may have).
    Changed,
    /// One of the caller's descriptors is readable (its index).
    Ready(usize),
    /// The timeout passed.
    Timeout,
}

/// A store's changes.
pub struct StoreWatch {
    kind: Kind,
}

enum Kind {
    Dir(DirWatch),
    #[cfg(feature = "etcd")]
    Etcd(crate::lock::etcd::Follower),
}

/// A lock directory under inotify.
struct DirWatch {
    root: PathBuf,
    ino: Option<Inotify>,
    /// The watches whose changes may mean a new lock (the root's; a new lock's directory
    /// until its queue exists).
    rescan: Vec<i32>,
    /// Each lock's `queue/` watch.
    queues: HashMap<String, i32>,
}

impl StoreWatch {
    /// Starts following `store`. On etcd, the watch starts at the store's current revision;
    /// `follow` asks for [`StoreEvent`]s of what requests do as well (`serve`).
    pub fn new(store: &Store, follow: bool) -> Result<StoreWatch> {
        let _ = follow;
        match store {
            Store::Dir { path, .. } => {
                let mut d = DirWatch {
                    root: path.clone(),
                    ino: Inotify::new()
                        .map_err(|e| tracing::warn!("no inotify ({e}); looking every second"))
                        .ok(),
                    rescan: Vec::new(),
                    queues: HashMap::new(),
                };
                d.rewatch();
                Ok(StoreWatch { kind: Kind::Dir(d) })
            }
            #[cfg(feature = "etcd")]
            Store::Etcd(s) => Ok(StoreWatch {
                kind: Kind::Etcd(crate::lock::etcd::Follower::start(s, follow)?),
            }),
            #[cfg(not(feature = "etcd"))]
            Store::Etcd(s) => Err(crate::error::Error::config(format!(
                "{} names an etcd store, but this cachelock was built without the `etcd` feature",
                s.describe()
            ))),
        }
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.kind {
            Kind::Dir(d) => d.ino.as_ref().map(|i| i.fd()),
            #[cfg(feature = "etcd")]
            Kind::Etcd(f) => Some(f.fd()),
        }
    }

    /// Waits until the store changes, one of `also` is readable, or `timeout` passes.
    pub fn wait(&mut self, timeout: Duration, also: &[BorrowedFd<'_>]) -> Wake {
        let until = Instant::now() + timeout;
        let mut fds: Vec<BorrowedFd<'_>> = also.to_vec();
        let own = self.fd().map(|f| {
            fds.push(f);
            fds.len() - 1
        });
        let ready = sys::poll_readable(&fds, Some(timeout));
        drop(fds);
        match ready {
            Some(i) if Some(i) == own => {}
            Some(i) => return Wake::Ready(i),
            None => {
                // A root that did not exist may have appeared.
                #[cfg_attr(not(feature = "etcd"), allow(irrefutable_let_patterns))]
                if let Kind::Dir(d) = &mut self.kind {
                    if d.rescan.is_empty() {
                        d.rewatch();
                    }
                }
                return Wake::Timeout;
            }
        }
        // A burst: gather it (but never past the caller's timeout).
        let settle = (Instant::now() + SETTLE).min(until);
        loop {
            self.drain();
            let left = settle.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let Some(fd) = self.fd() else { break };
            if sys::poll_readable(&[fd], Some(left)).is_none() {
                break;
            }
        }
        Wake::Changed
    }

    /// Reads what is pending, and follows new locks.
    fn drain(&mut self) {
        match &mut self.kind {
            Kind::Dir(d) => {
                let seen = d.ino.as_ref().map(|i| i.drain()).unwrap_or_default();
                if seen.iter().any(|wd| *wd == -1 || d.rescan.contains(wd)) {
                    d.rewatch();
                }
            }
            #[cfg(feature = "etcd")]
            Kind::Etcd(f) => f.drain(),
        }
    }

    /// What requests did, as the store told (etcd), since the last call.
    pub fn events(&mut self) -> Vec<StoreEvent> {
        match &mut self.kind {
            Kind::Dir(_) => Vec::new(),
            #[cfg(feature = "etcd")]
            Kind::Etcd(f) => f.take_events(),
        }
    }

    /// The store's own count of what it could not follow (etcd: events compacted away before
    /// they were read).
    pub fn missed(&self) -> u64 {
        match &self.kind {
            Kind::Dir(_) => 0,
            #[cfg(feature = "etcd")]
            Kind::Etcd(f) => f.missed(),
        }
    }
}

impl DirWatch {
    /// Watches the root (once it exists) and the queue of every lock in it not watched yet.
    fn rewatch(&mut self) {
        let Some(ino) = &self.ino else { return };
        // The root may not exist yet (then a periodic look finds it).
        if let Ok(wd) = ino.add_dir(&self.root, false) {
            if !self.rescan.contains(&wd) {
                self.rescan.push(wd);
            }
        }
        let Ok(root) = sys::open_dir(&self.root) else {
            return;
        };
        let Ok((entries, _)) = sys::list_dir(root.as_fd(), super::metrics::MAX_LOCKS) else {
            return;
        };
        // Locks removed (their watches went with them).
        self.queues.retain(|lock, _| {
            entries
                .iter()
                .any(|(n, _)| n.strip_suffix(".lock") == Some(lock.as_str()))
        });
        for (n, kind) in entries {
            let Some(lock) = n.strip_suffix(".lock") else {
                continue;
            };
            if kind != sys::EntryKind::Dir
                || name::validate(lock).is_err()
                || self.queues.contains_key(lock)
            {
                continue;
            }
            let base = self.root.join(&n);
            // A lock being created has its directory before its queue: watch the directory
            // until the queue is there.
            match ino.add_dir(&base.join("queue"), true) {
                Ok(wd) => {
                    self.queues.insert(lock.to_string(), wd);
                }
                Err(_) => {
                    if let Ok(wd) = ino.add_dir(&base, false) {
                        if !self.rescan.contains(&wd) {
                            self.rescan.push(wd);
                        }
                    }
                }
            }
        }
    }
}
