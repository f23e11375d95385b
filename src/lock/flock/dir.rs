//! The lock directory: creating it, the paths of one lock's state, and opening files in it.
//!
//! Every file is opened through [`sys::open_in_shared_dir`] (`O_NOFOLLOW|O_NONBLOCK`, regular
//! files only) so that a symlink or FIFO planted in a shared lock directory can neither redirect
//! a lock, ticket or metadata write elsewhere nor block an open.

use std::fs::{DirBuilder, File};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::sys::{self, Open};

/// Default permission bits of created files (the umask still applies): everyone who shares a
/// lock directory must be able to lock its files.
pub const DEFAULT_FILE_MODE: u32 = 0o666;
/// Default permission bits of created directories (the umask still applies).
pub const DEFAULT_DIR_MODE: u32 = 0o777;

/// An opened (existing, created if needed) lock directory.
#[derive(Debug, Clone)]
pub struct LockDir {
    root: PathBuf,
    file_mode: u32,
    dir_mode: u32,
}

/// Paths of one lock's state: `<root>/<name>.lock/...`.
#[derive(Debug, Clone)]
pub struct LockPaths {
    /// The lock's name.
    pub name: String,
    /// `<root>/<name>.lock`.
    pub base: PathBuf,
    /// `queue/`: live tickets.
    pub queue: PathBuf,
    /// `tmp/`: tickets being created (locked before they are renamed into `queue/`).
    pub tmp: PathBuf,
    /// `keys/`: remembered arrivals of queue keys.
    pub keys: PathBuf,
    /// Permission bits for created files.
    pub file_mode: u32,
}

impl LockPaths {
    /// The kernel lock file of `slot` (`lock`, `lock.1`, ...).
    pub fn slot_file(&self, slot: u32) -> PathBuf {
        if slot == 0 {
            self.base.join("lock")
        } else {
            self.base.join(format!("lock.{slot}"))
        }
    }
    /// `meta.lock`.
    pub fn meta_lock(&self) -> PathBuf {
        self.base.join("meta.lock")
    }
    /// `meta.json`.
    pub fn meta_json(&self) -> PathBuf {
        self.base.join("meta.json")
    }
}

impl LockDir {
    /// Opens `root`, creating it if needed (exit 73 when it cannot be created or written).
    pub fn open(root: &Path, file_mode: Option<u32>, dir_mode: Option<u32>) -> Result<LockDir> {
        let dir_mode = dir_mode.unwrap_or(DEFAULT_DIR_MODE);
        if let Err(e) = DirBuilder::new()
            .recursive(true)
            .mode(dir_mode)
            .create(root)
        {
            return Err(Error::cant_create(format!(
                "cannot create the lock directory {}: {e}; choose another with --lock-dir or CACHELOCK_LOCK_DIR",
                root.display()
            )));
        }
        if !root.is_dir() || !sys::can_write_dir(root) {
            return Err(Error::cant_create(format!(
                "the lock directory {} is not a writable directory; choose another with --lock-dir or CACHELOCK_LOCK_DIR",
                root.display()
            )));
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

    /// Paths of lock `name` (already validated) without creating anything.
    pub fn paths(&self, name: &str) -> LockPaths {
        let base = self.root.join(format!("{name}.lock"));
        LockPaths {
            name: name.to_string(),
            queue: base.join("queue"),
            tmp: base.join("tmp"),
            keys: base.join("keys"),
            base,
            file_mode: self.file_mode,
        }
    }

    /// Paths of lock `name`, creating its directories (refusing symlinks in their place).
    pub fn prepare(&self, name: &str) -> Result<LockPaths> {
        let p = self.paths(name);
        for d in [&p.base, &p.queue, &p.tmp, &p.keys] {
            match std::fs::symlink_metadata(d) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(Error::cant_create(format!(
                        "{} is a symbolic link; cachelock refuses to follow links in the lock directory (remove it)",
                        d.display()
                    )))
                }
                Ok(m) if m.is_dir() => continue,
                Ok(_) => {
                    return Err(Error::cant_create(format!(
                        "{} exists and is not a directory (remove it)",
                        d.display()
                    )))
                }
                Err(_) => {}
            }
            match DirBuilder::new().mode(self.dir_mode).create(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(Error::cant_create(format!(
                        "cannot create {}: {e}",
                        d.display()
                    )))
                }
            }
        }
        Ok(p)
    }
}

/// Opens a lock, ticket or metadata file (created with `mode` if `create`), with errors that
/// name the file; a symlink (ELOOP) or a non-regular file gets its own explanation (exit 74).
pub fn open_checked(path: &Path, create: bool, mode: u32) -> Result<File> {
    let how = if create {
        Open::Create(mode)
    } else {
        Open::Existing
    };
    sys::open_in_shared_dir(path, how).map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            Error::new(
                crate::error::Kind::IoErr,
                format!(
                    "{} is a symbolic link; cachelock opens lock files with O_NOFOLLOW and refuses it (remove the link)",
                    path.display()
                ),
            )
        } else if e.kind() == io::ErrorKind::InvalidInput {
            Error::new(
                crate::error::Kind::IoErr,
                format!(
                    "{} is not a regular file (a FIFO, device or directory planted there?); remove it",
                    path.display()
                ),
            )
        } else {
            Error::io(format!("cannot open {}", path.display()), e)
        }
    })
}
