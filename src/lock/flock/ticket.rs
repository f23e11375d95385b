//! Ticket files: one per live request in `queue/`, flocked by its owner for as long as it lives.
//!
//! Liveness never uses PIDs: a ticket is alive exactly while some process holds a flock on it.
//! A ticket is created in `tmp/`, locked, written and only then renamed into `queue/`, so a
//! scanner can never find a live ticket unlocked and delete it.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use super::dir::{open_checked, LockPaths};
use crate::error::{Error, Result};
use crate::lock::backend::TicketData;
use crate::sys;

/// Formats ticket number `n` as an id.
pub fn ticket_id(n: u64) -> String {
    format!("{n:012}")
}

/// The caller's own ticket: the file stays open and flocked until [`OwnTicket::remove`] or drop.
#[derive(Debug)]
pub struct OwnTicket {
    file: Option<File>,
    path: PathBuf,
    /// What the ticket says.
    pub data: TicketData,
    written: usize,
}

impl OwnTicket {
    /// Creates, locks, writes and publishes a ticket in `queue/`.
    pub fn create(paths: &LockPaths, data: TicketData) -> Result<OwnTicket> {
        let tmp = paths
            .tmp
            .join(format!("{}.{}", data.id, std::process::id()));
        let file = open_checked(&tmp, true, paths.file_mode)?;
        match sys::try_flock(&file, true) {
            Ok(true) => {}
            Ok(false) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(Error::io(
                    format!("cannot lock new ticket {}", tmp.display()),
                    io::Error::from(io::ErrorKind::WouldBlock),
                ));
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(Error::io(
                    format!("cannot lock new ticket {}", tmp.display()),
                    e,
                ));
            }
        }
        let mut t = OwnTicket {
            file: Some(file),
            path: tmp.clone(),
            data,
            written: 0,
        };
        t.write()?;
        let path = paths.queue.join(&t.data.id);
        std::fs::rename(&tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(format!("cannot publish ticket {}", path.display()), e)
        })?;
        t.path = path;
        Ok(t)
    }

    /// Rewrites the file in place through the locked descriptor (a second open would drop the
    /// lock on NFS). Padding with spaces up to the previous length instead of truncating keeps
    /// every read a complete JSON document.
    pub fn write(&mut self) -> Result<()> {
        let mut text = serde_json::to_vec(&self.data)
            .map_err(|e| Error::software(format!("cannot encode ticket: {e}")))?;
        if text.len() < self.written {
            text.resize(self.written, b' ');
        }
        let file = self.file.as_ref().expect("ticket file open");
        file.write_all_at(&text, 0)
            .map_err(|e| Error::io(format!("cannot write ticket {}", self.path.display()), e))?;
        self.written = text.len();
        Ok(())
    }

    /// Records that the lock is held.
    pub fn mark_holding(&mut self, slot: u32, generation: u64, now_ms: u64) -> Result<()> {
        self.data.holding = true;
        self.data.slot = Some(slot);
        self.data.generation = Some(generation);
        self.data.acquired_at_ms = Some(now_ms);
        self.write()
    }

    /// Leaves the queue: unlink while still locked (so no prober can mistake it for dead and
    /// race us), then close.
    pub fn remove(mut self) {
        self.remove_inner();
    }

    fn remove_inner(&mut self) {
        if let Some(f) = self.file.take() {
            let _ = std::fs::remove_file(&self.path);
            drop(f);
        }
    }
}

impl Drop for OwnTicket {
    fn drop(&mut self) {
        self.remove_inner();
    }
}

/// What probing another ticket found.
#[derive(Debug)]
// Short-lived, one per probe: boxing the ticket would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Probe {
    /// Alive, with its content (`None` if it could not be parsed, e.g. a torn write).
    Alive(Option<TicketData>),
    /// Its owner is dead; the file was removed.
    Dead,
    /// It vanished meanwhile.
    Gone,
}

/// Reads another process's ticket and tests its liveness with a non-blocking exclusive flock
/// (never call this on one's own ticket: on NFS the close would drop one's own lock). A dead
/// ticket is unlinked while the probe lock is held, after checking the path still names the
/// same file.
pub fn probe(path: &Path) -> Probe {
    let mut file = match sys::open_other(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Probe::Gone,
        Err(_) => return Probe::Alive(None),
    };
    match sys::try_flock(&file, true) {
        Ok(true) => {
            if sys::is_same_file(&file, path) {
                let _ = std::fs::remove_file(path);
            }
            Probe::Dead
        }
        _ => Probe::Alive(read_data(&mut file)),
    }
}

fn read_data(file: &mut File) -> Option<TicketData> {
    for _ in 0..3 {
        let mut buf = Vec::with_capacity(1024);
        let _ = file.read_to_end(&mut buf);
        if let Ok(d) = serde_json::from_slice::<TicketData>(&buf) {
            return Some(d);
        }
        // A torn read of an in-place rewrite: read again from the start.
        let _ = std::io::Seek::rewind(file);
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    None
}

/// Removes leftovers in `tmp/` whose creator died before publishing them. Only old files are
/// probed: a fresh one may be between its creator's `open` and `flock`.
pub fn sweep_tmp(paths: &LockPaths) {
    let Ok(rd) = std::fs::read_dir(&paths.tmp) else {
        return;
    };
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
    for e in rd.flatten() {
        let stale = e
            .metadata()
            .and_then(|m| m.modified())
            .map(|t| t < old)
            .unwrap_or(false);
        if stale {
            let _ = probe(&e.path());
        }
    }
}
