//! The lock directory: where it is, creating it, and opening files in it safely.
//!
//! Every file is opened with `O_NOFOLLOW` so that a symlink planted in a shared lock directory
//! cannot redirect a lock, ticket or metadata write elsewhere.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::config::Loaded;
use crate::error::{Error, Result};

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

/// The lock directory to use: `flag` (`--lock-dir` / `CACHELOCK_LOCK_DIR`), else the config
/// file's `lock_dir` (relative to the file), else [`crate::config::default_lock_dir`].
pub fn resolve_root(flag: Option<&Path>, loaded: &Loaded) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    if let Some(p) = &loaded.config.lock_dir {
        return loaded.resolve_path(p);
    }
    crate::config::default_lock_dir()
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
        if !root.is_dir() || !access_rwx(root) {
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
                    return Err(Error::new(
                        crate::error::Kind::IoErr,
                        format!(
                            "{} is a symbolic link; cachelock refuses to follow links in the lock directory (remove it)",
                            d.display()
                        ),
                    ))
                }
                Ok(m) if m.is_dir() => continue,
                Ok(_) => {
                    return Err(Error::new(
                        crate::error::Kind::IoErr,
                        format!("{} exists and is not a directory (remove it)", d.display()),
                    ))
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

/// Opens `path` read-write with `O_NOFOLLOW | O_CLOEXEC`, creating it with `mode` if `create`.
/// Read-write because NFS emulates flock with POSIX locks, which need a writable descriptor.
pub fn open_nofollow(path: &Path, create: bool, mode: u32) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Opens another process's file for probing or reading: read-write where permitted (NFS needs
/// it for exclusive locks), else read-only (enough for local flock and for reading).
pub fn open_for_probe(path: &Path) -> io::Result<File> {
    match open_nofollow(path, false, 0) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path),
        r => r,
    }
}

/// Like [`open_nofollow`] but turns errors into messages that name the file; a symlink (ELOOP)
/// gets its own explanation.
pub fn open_checked(path: &Path, create: bool, mode: u32) -> Result<File> {
    open_nofollow(path, create, mode).map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            Error::new(
                crate::error::Kind::IoErr,
                format!(
                    "{} is a symbolic link; cachelock opens lock files with O_NOFOLLOW and refuses it (remove the link)",
                    path.display()
                ),
            )
        } else {
            Error::io(format!("cannot open {}", path.display()), e)
        }
    })
}

fn access_rwx(p: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}
