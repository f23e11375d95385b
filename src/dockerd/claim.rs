//! Host-wide paths one dockerd at a time may use: Earthly's default socket
//! (`/var/run/docker.sock`) and log (`/var/log/docker.log`).
//!
//! Inside Earthly's build container there is one dockerd and these paths are simply its own. On
//! a host running several drop-ins, the first to claim a path gets it and the others keep their
//! per-instance socket and log: dockerd unlinks an existing socket path before listening, so
//! two daemons on one path would silently steal it from each other. A claim is a flock (taken
//! without waiting) on a file that dockerd inherits, so it lasts exactly as long as the daemon.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// A claimed path; released when dropped and when every process that inherited it exits.
#[derive(Debug)]
pub struct Claim {
    /// The claimed path.
    pub path: PathBuf,
    file: File,
}

impl Claim {
    /// The descriptor dockerd inherits.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The claimed file itself, when the claim is on the file (the log).
    pub fn file(&self) -> &File {
        &self.file
    }
}

fn open(path: &Path) -> std::io::Result<File> {
    crate::sys::open_in_shared_dir(path, crate::sys::Open::Create(0o644))
}

/// Creates `dir` if missing and checks that nobody but the caller or root can change it:
/// dockerd creates, chowns and chmods its socket there, by path.
fn trusted_dir(dir: &Path) -> bool {
    let _ = std::fs::create_dir_all(dir);
    match super::root::check_trusted_path(dir) {
        Ok(()) => true,
        Err(why) => {
            tracing::warn!(
                "{} is not used for dockerd's shared paths: {why}",
                dir.display()
            );
            false
        }
    }
}

fn try_lock(f: &File) -> bool {
    crate::sys::try_flock(f, true).unwrap_or(false)
}

/// Claims the unix socket path `sock` when it is free: no other wrapper holds its claim file
/// (`<dir>/.<name>.cachelock`) and no daemon answers on it (a stale socket file left by a
/// killed dockerd is free). `None` when it is in use or cannot be claimed.
pub fn socket(sock: &Path) -> Option<Claim> {
    let dir = sock.parent()?;
    let name = sock.file_name()?.to_string_lossy();
    if !trusted_dir(dir) {
        return None;
    }
    let file = open(&dir.join(format!(".{name}.cachelock"))).ok()?;
    if !try_lock(&file) {
        return None;
    }
    // Someone else's daemon (the host's own Docker, another wrapper without cachelock).
    if UnixStream::connect(sock).is_ok() {
        return None;
    }
    match std::fs::symlink_metadata(sock) {
        // Only a socket may be replaced: never let dockerd unlink a regular file or a link.
        Ok(m) if !std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => None,
        _ => Some(Claim {
            path: sock.to_path_buf(),
            file,
        }),
    }
}

/// Claims the log file `path` (opened, not truncated) when no other wrapper writes to it; the
/// caller truncates it once claimed. `None` when it is in use or cannot be opened.
pub fn log(path: &Path) -> Option<Claim> {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    // Opened without following a link and written only through this descriptor; a file that
    // another user put there (or a hard link of another file) is not ours to write or truncate.
    let file = open(path).ok()?;
    let me = crate::sys::euid();
    match crate::sys::info(&file) {
        Ok(i) if (i.uid == 0 || i.uid == me) && i.nlink == 1 => {}
        _ => {
            tracing::warn!(
                "{} is not used as dockerd's log: it is another user's file or has other names",
                path.display()
            );
            return None;
        }
    }
    try_lock(&file).then(|| Claim {
        path: path.to_path_buf(),
        file,
    })
}

/// The shared paths one run claimed: dockerd logs to `log` and also listens on `socket`.
#[derive(Debug, Default)]
pub struct HostPaths {
    /// The claimed log file (truncated for this run).
    pub log: Option<Claim>,
    /// The claimed socket path.
    pub socket: Option<Claim>,
}

impl HostPaths {
    /// Claims what is configured and free; the log is truncated once claimed.
    pub fn claim(log_path: Option<&Path>, socket_path: Option<&Path>) -> HostPaths {
        let log = log_path.and_then(log);
        if let Some(c) = &log {
            let _ = c.file().set_len(0);
        }
        HostPaths {
            log,
            socket: socket_path.and_then(socket),
        }
    }

    /// Descriptors dockerd inherits (each claim lasts as long as the daemon).
    pub fn fds(&self) -> Vec<RawFd> {
        self.log.iter().chain(&self.socket).map(Claim::fd).collect()
    }

    /// The claimed log for the dockerd spec: its path, and the open file dockerd writes to
    /// (never opened again by path).
    pub fn log(&self) -> Option<super::daemon::LogFile> {
        let c = self.log.as_ref()?;
        Some(super::daemon::LogFile {
            path: c.path.clone(),
            file: std::sync::Arc::new(c.file.try_clone().ok()?),
        })
    }

    /// The extra sockets for the dockerd spec.
    pub fn sockets(&self) -> Vec<PathBuf> {
        self.socket.iter().map(|c| c.path.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_claims_exclude_each_other_and_live_daemons() {
        let t = tempfile::tempdir().unwrap();
        let sock = t.path().join("run/docker.sock");
        let first = socket(&sock).expect("free path");
        assert!(socket(&sock).is_none(), "claimed twice");
        drop(first);
        // A listener that answers: someone else's daemon.
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert!(socket(&sock).is_none(), "a live socket is not free");
        drop(l);
        // The listener is gone, its file stays: stale, hence free.
        assert!(sock.exists());
        assert!(socket(&sock).is_some());
        let file = t.path().join("run/regular");
        std::fs::write(&file, "x").unwrap();
        assert!(socket(&file).is_none(), "never replace a regular file");
    }

    #[test]
    fn log_claims_exclude_each_other() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("log/docker.log");
        let c = log(&p).unwrap();
        assert!(log(&p).is_none());
        drop(c);
        assert!(log(&p).is_some());
        // Another name of the file (a hard link), or a link: not claimed.
        let other = t.path().join("log/other");
        std::fs::hard_link(&p, &other).unwrap();
        assert!(log(&p).is_none());
        std::fs::remove_file(&other).unwrap();
        let link = t.path().join("log/link.log");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(log(&link).is_none());
        assert!(log(&p).is_some());
    }
}
