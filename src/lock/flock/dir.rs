//! The lock directory: creating it, opening one lock's state, and the permission model of a
//! directory that several users share.
//!
//! **Permission model** (docs/security.md says what it defends and what it cannot):
//! - Directories are created with exactly `dir_mode` (default `01777`: everyone may create
//!   entries, only an entry's owner may remove or rename it — the sticky bit, as on `/tmp`). A
//!   group- or world-writable mode always gets the sticky bit. The umask does not apply: one
//!   user's umask 022 must not make a lock unusable for the next user.
//! - Kernel lock files and `meta.lock`/`meta.json` are created with exactly `file_mode`
//!   (default `0666`: everyone can lock them). Tickets, per-user counters and key records get
//!   `file_mode` without group/other write: everyone reads them, only their owner writes them.
//! - Each directory of a lock is opened once without following a symlink in its place, and
//!   every file in it is reached relative to that descriptor ([`sys::open_at`]:
//!   `O_NOFOLLOW|O_NONBLOCK`, regular files only), so that a planted symlink or FIFO can neither
//!   redirect a write or a removal elsewhere nor block an open.

use std::fs::{DirBuilder, File};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Kind, Result};
use crate::sys::{self, Open};

/// Default permission bits of created files (exact: the umask does not apply): everyone who
/// shares a lock directory must be able to lock its files.
pub const DEFAULT_FILE_MODE: u32 = 0o666;
/// Default permission bits of created directories (exact): shared and sticky, like `/tmp`.
pub const DEFAULT_DIR_MODE: u32 = 0o1777;

/// Most entries read from one of a lock's directories at a time. A lock with more live
/// requests than this is not a build cache's; past it, a scan of the queue ignores the rest
/// (with a warning, and `status` says so), while the indexes that prove who holds what or
/// what the counters are (`held/`, `meta.d/`) refuse rather than act on part of them.
pub const MAX_ENTRIES: usize = 1024;

/// Most names looked at in one listing of a lock's directory. Names that cannot be a valid
/// entry cost only the directory read up to this bound, so planted junk cannot push a valid
/// entry out of [`MAX_ENTRIES`].
pub const MAX_SCANNED: usize = 64 * 1024;

/// The sticky bit.
const STICKY: u32 = 0o1000;

/// `mode` as created: the sticky bit added to a group- or world-writable directory mode.
pub fn effective_dir_mode(mode: u32) -> u32 {
    if mode & 0o022 != 0 {
        mode | STICKY
    } else {
        mode
    }
}

/// The mode of files only their owner writes (tickets, counters, key records).
pub fn owner_only(file_mode: u32) -> u32 {
    (file_mode & !0o022) | 0o600
}

/// An opened (existing, created if needed) lock directory.
#[derive(Debug, Clone)]
pub struct LockDir {
    root: PathBuf,
    file_mode: u32,
    dir_mode: u32,
}

/// Where one lock's state is, by path only (see [`LockDir::paths`]).
#[derive(Debug, Clone)]
pub struct LockPaths {
    /// `<root>/<name>.lock`.
    pub base: PathBuf,
}

impl LockPaths {
    /// The kernel lock file of `slot`.
    pub fn slot_file(&self, slot: u32) -> PathBuf {
        self.base.join(slot_file(slot))
    }
}

/// One lock's state, `<root>/<name>.lock/`, its directories opened.
#[derive(Debug)]
pub struct LockFiles {
    /// The lock's name.
    pub name: String,
    /// `<root>/<name>.lock`, for messages.
    pub base_path: PathBuf,
    /// `<name>.lock/`: the kernel lock files, `meta.lock`, `meta.json`.
    pub base: OwnedFd,
    /// `queue/`: live tickets.
    pub queue: OwnedFd,
    /// `tmp/`: tickets being created (locked before they are published in `queue/`).
    pub tmp: Option<OwnedFd>,
    /// `keys/`: remembered arrivals of queue keys.
    pub keys: Option<OwnedFd>,
    /// `held/`: a hard link of each holder's ticket (format 2).
    pub held: Option<OwnedFd>,
    /// `meta.d/`: per-user counters (format 2).
    pub meta_d: Option<OwnedFd>,
    /// Permission bits of created shared files.
    pub file_mode: u32,
    /// Whether a scan removes the tickets of dead requests (not when only watching).
    pub remove_dead: bool,
}

impl LockFiles {
    /// A path under the lock's directory, for messages.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.base_path.join(rel)
    }

    /// A sub-directory that a request needs (always there after [`LockDir::prepare`]).
    pub fn need<'a>(&'a self, dir: &'a Option<OwnedFd>, name: &str) -> Result<BorrowedFd<'a>> {
        dir.as_ref().map(|d| d.as_fd()).ok_or_else(|| {
            Error::new(
                Kind::IoErr,
                format!("{} is missing", self.path(name).display()),
            )
        })
    }

    /// Opens `name` in `dir` (a directory of this lock named `dir_name`), created with `mode`
    /// when `create`; errors name the file, and its owner when that explains the refusal.
    pub fn open(
        &self,
        dir: BorrowedFd<'_>,
        dir_name: &str,
        name: &str,
        create: Option<u32>,
    ) -> Result<File> {
        let how = create.map(Open::Create).unwrap_or(Open::Existing);
        let rel = if dir_name.is_empty() {
            name.to_string()
        } else {
            format!("{dir_name}/{name}")
        };
        sys::open_at(dir, name, how).map_err(|e| open_error(&self.path(&rel), dir, name, e))
    }
}

/// The error for a file of a lock directory that cannot be opened: a symlink or a non-regular
/// file gets its own explanation, a permission problem names the owner (exit 74).
pub fn open_error(path: &Path, dir: BorrowedFd<'_>, name: &str, e: io::Error) -> Error {
    let owner = sys::info_at(dir, name)
        .map(|i| format!(" (owned by uid {}, mode {:04o})", i.uid, i.mode))
        .unwrap_or_default();
    let message = if e.raw_os_error() == Some(libc::ELOOP) {
        format!(
            "{} is a symbolic link{owner}; cachelock opens lock files with O_NOFOLLOW and refuses it (remove the link)",
            path.display()
        )
    } else if e.kind() == io::ErrorKind::InvalidInput {
        format!(
            "{} is not a regular file{owner} (a FIFO, device or directory planted there?); remove it",
            path.display()
        )
    } else if e.kind() == io::ErrorKind::PermissionDenied {
        format!(
            "cannot open {}{owner}: {e}; its owner or root can make it usable by everyone sharing the lock directory (chmod 0666)",
            path.display()
        )
    } else {
        format!("cannot open {}: {e}", path.display())
    };
    Error::new(Kind::IoErr, message)
}

impl LockDir {
    /// Opens `root`, creating it with `dir_mode` if needed (exit 73 when it cannot be created
    /// or written). A root that others may write without the sticky bit is used with a warning:
    /// any of them could rename a lock's state away.
    pub fn open(root: &Path, file_mode: Option<u32>, dir_mode: Option<u32>) -> Result<LockDir> {
        let dir_mode = effective_dir_mode(dir_mode.unwrap_or(DEFAULT_DIR_MODE));
        let existed = std::fs::symlink_metadata(root).is_ok();
        if let Err(e) = DirBuilder::new().recursive(true).mode(0o755).create(root) {
            return Err(Error::cant_create(format!(
                "cannot create the lock directory {}: {e}; choose another with --lock-dir or CACHELOCK_LOCK_DIR",
                root.display()
            )));
        }
        if !existed {
            // Exactly the configured mode, whatever the umask.
            if let Ok(fd) = sys::open_dir(root) {
                let _ = sys::set_mode(&fd, dir_mode);
            }
        }
        if !root.is_dir() || !sys::can_write_dir(root) {
            return Err(Error::cant_create(format!(
                "the lock directory {} is not a writable directory{}; choose another with --lock-dir or CACHELOCK_LOCK_DIR",
                root.display(),
                sys::open_dir(root)
                    .and_then(sys::info)
                    .map(|i| format!(" (owned by uid {}, mode {:04o})", i.uid, i.mode))
                    .unwrap_or_default()
            )));
        }
        if let Ok(i) = sys::open_dir(root).and_then(sys::info) {
            if i.mode & 0o022 != 0 && i.mode & STICKY == 0 {
                tracing::warn!(
                    "the lock directory {} (mode {:04o}) is writable by other users without the sticky bit: any of them can rename a lock's state away and break its exclusion; its owner should `chmod +t` it",
                    root.display(),
                    i.mode
                );
            }
        }
        Ok(LockDir {
            root: root.to_path_buf(),
            file_mode: file_mode.unwrap_or(DEFAULT_FILE_MODE),
            dir_mode,
        })
    }

    /// A lock directory that is only read (status): nothing is created or checked.
    pub fn open_existing(root: &Path) -> LockDir {
        LockDir {
            root: root.to_path_buf(),
            file_mode: DEFAULT_FILE_MODE,
            dir_mode: DEFAULT_DIR_MODE,
        }
    }

    /// The directory's path.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The paths of lock `name`'s state, for other components that look at a lock directory
    /// from outside (the cache eviction of `cachelock dockerd`); nothing is opened.
    pub fn paths(&self, name: &str) -> LockPaths {
        LockPaths {
            base: self.root.join(format!("{name}.lock")),
        }
    }

    /// Opens lock `name`'s state (name already validated), creating what is missing; a
    /// symlink or a non-directory in place of one of its directories is refused (exit 73).
    pub fn prepare(&self, name: &str) -> Result<LockFiles> {
        let root = sys::open_dir(&self.root).map_err(|e| {
            Error::cant_create(format!(
                "cannot open the lock directory {}: {e}",
                self.root.display()
            ))
        })?;
        let base_name = format!("{name}.lock");
        let base_path = self.root.join(&base_name);
        let base = self.ensure(root.as_fd(), &base_name, &base_path)?;
        let sub = |n: &str| self.ensure(base.as_fd(), n, &base_path.join(n));
        let (queue, tmp, keys, held, meta_d) = (
            sub("queue")?,
            sub("tmp")?,
            sub("keys")?,
            sub("held")?,
            sub("meta.d")?,
        );
        Ok(LockFiles {
            name: name.to_string(),
            base_path,
            base,
            queue,
            tmp: Some(tmp),
            keys: Some(keys),
            held: Some(held),
            meta_d: Some(meta_d),
            file_mode: self.file_mode,
            remove_dead: true,
        })
    }

    /// Opens lock `name`'s existing state for reading (status); `None` when the lock has no
    /// state yet. Nothing is created; directories an older cachelock did not make are `None`.
    pub fn existing(&self, name: &str) -> Result<Option<LockFiles>> {
        let Ok(root) = sys::open_dir(&self.root) else {
            return Ok(None);
        };
        let base_name = format!("{name}.lock");
        let base_path = self.root.join(&base_name);
        let base = match sys::open_dir_at(root.as_fd(), &base_name) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(dir_error(root.as_fd(), &base_name, &base_path, e)),
        };
        let sub = |n: &str| match sys::open_dir_at(base.as_fd(), n) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(dir_error(base.as_fd(), n, &base_path.join(n), e)),
        };
        let Some(queue) = sub("queue")? else {
            return Ok(None);
        };
        let (tmp, keys, held, meta_d) = (sub("tmp")?, sub("keys")?, sub("held")?, sub("meta.d")?);
        Ok(Some(LockFiles {
            name: name.to_string(),
            base_path,
            base,
            queue,
            tmp,
            keys,
            held,
            meta_d,
            file_mode: self.file_mode,
            remove_dead: true,
        }))
    }

    /// Opens directory `name` of `parent`, creating it with the directory mode if missing.
    /// A directory of ours that others may write without the sticky bit (made by an older
    /// cachelock) gets the sticky bit.
    fn ensure(&self, parent: BorrowedFd<'_>, name: &str, path: &Path) -> Result<OwnedFd> {
        let (fd, created) = sys::ensure_dir_at(parent, name, self.dir_mode).map_err(|e| {
            let owner = sys::info(parent)
                .map(|i| format!(" (its parent is owned by uid {}, mode {:04o})", i.uid, i.mode))
                .unwrap_or_default();
            match e.raw_os_error() {
                Some(libc::EACCES) | Some(libc::EPERM) => Error::cant_create(format!(
                    "cannot create {}: {e}{owner}; the owner of the parent or root can share it with `chmod 1777`",
                    path.display()
                )),
                _ => dir_error(parent, name, path, e),
            }
        })?;
        if !created {
            if let Ok(i) = sys::info(&fd) {
                if i.uid == sys::euid() && i.mode & 0o022 != 0 && i.mode & STICKY == 0 {
                    let _ = sys::set_mode(&fd, i.mode | STICKY);
                }
            }
        }
        Ok(fd)
    }
}

/// The error for a directory of a lock's state that cannot be opened (exit 73): a symlink or
/// something else planted in its place is named as such.
fn dir_error(parent: BorrowedFd<'_>, name: &str, path: &Path, e: io::Error) -> Error {
    let planted = sys::info_at(parent, name).ok().and_then(|i| {
        let what = match i.kind {
            sys::EntryKind::Dir => return None,
            sys::EntryKind::Symlink => "a symbolic link",
            _ => "not a directory",
        };
        Some((what, i.uid))
    });
    Error::cant_create(match planted {
        Some((what, uid)) => format!(
            "{} is {what} (owned by uid {uid}); cachelock refuses to follow links or use anything but a directory there (remove it)",
            path.display()
        ),
        None => format!("cannot open {}: {e}", path.display()),
    })
}

/// The kernel lock file name of `slot` (`lock`, `lock.1`, ...): unchanged since format 1, so
/// that every version of cachelock locks the same files.
pub fn slot_file(slot: u32) -> String {
    if slot == 0 {
        "lock".to_string()
    } else {
        format!("lock.{slot}")
    }
}
