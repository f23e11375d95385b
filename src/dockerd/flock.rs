//! A plain kernel flock on one of several files, waited for with signals and a caller's bound.
//!
//! The Earthly drop-in locks `<data-root>/.earthly-docker-lock` exactly as Earthly's wrapper
//! does (so an Earthly wrapper and cachelock sharing a directory exclude each other), or shared
//! when several slots of one root run at once (each holder keeps the stock wrapper, which takes
//! it exclusively, out). That lock is held by processes outside cachelock's queue, which send
//! no notification when they release it: it is polled (every 50 ms), interruptibly.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Kind, Result};
use crate::process::Signals;
use crate::sys::{self, Open};

/// A held flock; released when dropped (and when every process that inherited it exits).
#[derive(Debug)]
pub struct Held {
    /// The locked file.
    pub file: File,
    /// Which of the candidate paths it is.
    pub index: usize,
    /// How long it took to get.
    pub waited: Duration,
}

fn open(path: &Path) -> Result<File> {
    sys::open_in_shared_dir(path, Open::Create(0o666))
        .map_err(|e| Error::io(format!("opening lock file {}", path.display()), e))
}

/// Takes a flock (shared when `shared`) on any one of `paths`, polling every 50 ms; gives up after
/// `limit` (exit `conflict_code`) and returns `Kind::Signal` on SIGINT/SIGTERM/SIGHUP. While
/// waiting, prints `who` every `progress` (None: quiet).
pub fn acquire_any(
    paths: &[PathBuf],
    shared: bool,
    limit: Option<Duration>,
    conflict_code: i32,
    signals: &Signals,
    progress: Option<Duration>,
    who: &str,
) -> Result<Held> {
    let files: Vec<File> = paths.iter().map(|p| open(p)).collect::<Result<_>>()?;
    let started = Instant::now();
    let mut last_note = Instant::now();
    loop {
        for (index, f) in files.iter().enumerate() {
            let taken = sys::try_flock(f, !shared)
                .map_err(|e| Error::io(format!("locking {}", paths[index].display()), e))?;
            if taken {
                let file = f.try_clone().map_err(|e| Error::io("lock file", e))?;
                return Ok(Held {
                    file,
                    index,
                    waited: started.elapsed(),
                });
            }
        }
        if let Some(sig) = signals.take_terminating() {
            return Err(Error::new(
                Kind::Signal(sig),
                format!("interrupted while waiting for {who}"),
            ));
        }
        if let Some(limit) = limit {
            if started.elapsed() >= limit {
                return Err(Error::conflict(
                    conflict_code,
                    format!(
                        "{who} is busy; gave up after {:.1}s",
                        started.elapsed().as_secs_f64()
                    ),
                ));
            }
        }
        if let Some(every) = progress {
            if last_note.elapsed() >= every {
                eprintln!(
                    "cachelock: waiting for {who} ({:.0}s so far)",
                    started.elapsed().as_secs_f64()
                );
                last_note = Instant::now();
            }
        }
        signals.wait(50);
    }
}
