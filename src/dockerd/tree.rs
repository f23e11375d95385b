//! Finding every process one dockerd instance started, however it was re-parented.
//!
//! dockerd starts containerd in its own session and containerd's shims re-parent to init, so
//! neither a process group nor the parent chain finds them all. What they do share is every
//! descriptor inherited without `O_CLOEXEC`: each instance is given an open "marker" file, and
//! the instance's tree is the set of processes that have it open (`/proc/PID/fd`). The same
//! property keeps the data root's lock held while any of them lives.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// An open marker file inherited by an instance's processes.
pub struct Marker {
    file: File,
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Marker {
    /// Creates (or opens) the marker at `path`.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)?;
        let md = file.metadata()?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            dev: md.dev(),
            ino: md.ino(),
        })
    }

    /// The descriptor to pass to `process::spawn`.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The marker's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Processes other than this one holding the marker open.
    pub fn holders(&self) -> Vec<i32> {
        holders_of(self.dev, self.ino)
    }
}

/// Processes other than this one with an open descriptor on the file `(dev, ino)`.
pub fn holders_of(dev: u64, ino: u64) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let hit = fds.flatten().any(|fd| {
            std::fs::metadata(fd.path())
                .map(|m| m.dev() == dev && m.ino() == ino)
                .unwrap_or(false)
        });
        if hit {
            out.push(pid);
        }
    }
    out
}

/// Processes holding the file at `path` open (none if it does not exist).
pub fn holders_of_path(path: &Path) -> Vec<i32> {
    match std::fs::metadata(path) {
        Ok(m) => holders_of(m.dev(), m.ino()),
        Err(_) => Vec::new(),
    }
}

/// Sends `sig` to each pid (errors ignored: a process may be gone already).
pub fn signal_all(pids: &[i32], sig: i32) {
    for &pid in pids {
        let _ = crate::sys::kill(pid, sig);
    }
}

/// Waits until no process but this one holds the marker (zombies hold no descriptors); returns whether that happened within `timeout`.
pub fn wait_gone(marker: &Marker, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if marker.holders().is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills every holder of the marker with SIGKILL until none is left (bounded by `timeout`).
pub fn kill_all(marker: &Marker, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let pids = marker.holders();
        if pids.is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        signal_all(&pids, libc::SIGKILL);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Direct children of the given processes (from `/proc/*/stat`).
pub fn children_of(parents: &[i32]) -> Vec<i32> {
    if parents.is_empty() {
        return Vec::new();
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The field after the parenthesised command name (which may hold spaces) is the
            // state, then the parent pid.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok())
                .is_some_and(|ppid| parents.contains(&ppid))
        })
        .collect()
}
