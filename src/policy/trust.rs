//! Which compile-cache directories and files may be trusted: compiled policies are native code
//! (loaded with wasmtime's unsafe `deserialize`), so a directory or artifact that another user
//! could have written must never be used.
//!
//! The rules: every component of the directory's path is opened with `O_NOFOLLOW` (a symlink
//! anywhere makes it untrusted), each is owned by root or the caller, and none is writable by
//! group or others — except a sticky ancestor like `/tmp`, where nobody can replace another's
//! entry. The cache directory itself must be owned by the caller or root and writable by nobody
//! else. A file in it must be a regular file with one link, owned by the directory's owner and
//! writable by nobody else, and is opened with `O_NOFOLLOW|O_NONBLOCK` relative to the
//! directory's descriptor (no second path lookup). Every system call goes through `crate::sys`.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use crate::sys::{self, EntryKind, Open};

/// A directory that passed the trust rules, held open.
#[derive(Debug)]
pub struct TrustedDir {
    fd: OwnedFd,
    /// Its path (for messages).
    pub path: PathBuf,
    /// Its owner's uid (the caller or root).
    pub owner: u32,
}

/// Most entries [`TrustedDir::names`] lists (a cache holds a few files per policy).
const MAX_NAMES: usize = 65_536;

fn untrusted(path: &Path, why: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("{} is not trusted: {why}", path.display()),
    )
}

/// Opens `path` as a trusted directory, creating the missing components (mode `mode`, owned by
/// the caller) when `create` is set. Errors say which component broke which rule.
pub fn open_dir(path: &Path, create: bool, mode: u32) -> io::Result<TrustedDir> {
    let me = sys::euid();
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    if abs.components().any(|c| c == Component::ParentDir) {
        return Err(untrusted(&abs, "`..` in the path".into()));
    }
    let mut cur = sys::open_dir(Path::new("/"))?;
    let mut walked = PathBuf::from("/");
    let comps: Vec<&str> = abs
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(
                n.to_str()
                    .ok_or_else(|| untrusted(&abs, "a path component is not UTF-8".into())),
            ),
            _ => None,
        })
        .collect::<io::Result<_>>()?;
    for (i, name) in comps.iter().enumerate() {
        let last = i + 1 == comps.len();
        walked.push(name);
        let next = match sys::open_dir_at(cur.as_fd(), name) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                sys::ensure_dir_at(cur.as_fd(), name, mode)?.0
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                return Err(untrusted(
                    &walked,
                    "it is a symlink or not a directory (compile caches are opened without following symlinks)".into(),
                ))
            }
            Err(e) => return Err(e),
        };
        let st = sys::info(&next)?;
        if st.uid != 0 && st.uid != me {
            return Err(untrusted(
                &walked,
                format!("owned by uid {}, neither you (uid {me}) nor root", st.uid),
            ));
        }
        let writable_by_others = st.mode & 0o022 != 0;
        let sticky = st.mode & 0o1000 != 0;
        if writable_by_others && (last || !sticky) {
            return Err(untrusted(
                &walked,
                format!("mode {:04o} lets group or others write into it", st.mode),
            ));
        }
        cur = next;
    }
    let owner = sys::info(&cur)?.uid;
    Ok(TrustedDir {
        fd: cur,
        path: abs,
        owner,
    })
}

impl std::os::fd::AsFd for TrustedDir {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.fd)
    }
}

impl TrustedDir {
    /// Opens `name` in this directory for reading if it passes the file rules; `Ok(None)` when
    /// it does not exist.
    pub fn open_file(&self, name: &str) -> io::Result<Option<File>> {
        let (file, st) = match sys::open_read_at(self.fd.as_fd(), name) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                return Err(untrusted(
                    &self.path.join(name),
                    "not a regular file".into(),
                ))
            }
            Err(e) => return Err(e),
        };
        let path = self.path.join(name);
        if st.kind != EntryKind::File {
            return Err(untrusted(&path, "not a regular file".into()));
        }
        if st.uid != self.owner {
            return Err(untrusted(
                &path,
                format!(
                    "owned by uid {}, not by the directory's owner (uid {})",
                    st.uid, self.owner
                ),
            ));
        }
        if st.mode & 0o022 != 0 {
            return Err(untrusted(
                &path,
                format!("mode {:04o} lets group or others write it", st.mode),
            ));
        }
        if st.nlink != 1 {
            return Err(untrusted(&path, format!("{} hard links", st.nlink)));
        }
        Ok(Some(file))
    }

    /// Whether the caller can write here (it owns the directory).
    pub fn writable(&self) -> bool {
        self.owner == sys::euid()
    }

    /// Creates a new file `name` (must not exist) with exactly `mode`.
    pub fn create_new(&self, name: &str, mode: u32) -> io::Result<File> {
        sys::create_new_at(self.fd.as_fd(), name, mode)
    }

    /// Opens (creating it if need be) the lock file `name`, for `flock`.
    pub fn lock_file(&self, name: &str) -> io::Result<File> {
        sys::open_at(self.fd.as_fd(), name, Open::Create(0o600))
    }

    /// Renames `from` to `to` inside this directory (replacing `to`).
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        sys::rename_at(self.fd.as_fd(), from, self.fd.as_fd(), to)
    }

    /// Removes `name` (errors ignored: best effort).
    pub fn remove(&self, name: &str) {
        let _ = sys::unlink_at(self.fd.as_fd(), name);
    }

    /// Names of the entries (for removing stale temp files, and listing what is stored).
    pub fn names(&self) -> Vec<String> {
        sys::list_dir(self.fd.as_fd(), MAX_NAMES)
            .map(|(v, _)| v.into_iter().map(|(n, _)| n).collect())
            .unwrap_or_default()
    }

    /// Writes `name` whole: to a temp file of this process (mode `mode`), synced, then renamed
    /// over `name`, so that a reader sees the old content or the new, never a part.
    pub fn write_atomic(&self, name: &str, bytes: &[u8], mode: u32) -> io::Result<()> {
        let tmp = temp_name(name, "w");
        let r = (|| {
            let mut f = self.create_new(&tmp, mode)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            self.rename(&tmp, name)
        })();
        if r.is_err() {
            self.remove(&tmp);
        }
        r
    }
}

/// The temp name of this process for `key` (`.KEY.WHAT.PID.tmp`): a process that dies
/// mid-write leaves it, and the next writer removes those of dead processes
/// ([`remove_stale_temps`]).
pub fn temp_name(key: &str, what: &str) -> String {
    format!(".{key}.{what}.{}.tmp", std::process::id())
}

/// Removes the temp files of dead processes in `dir` (cheaply, while we are writing there).
pub fn remove_stale_temps(dir: &TrustedDir) {
    for name in dir.names() {
        let Some(pid) = name
            .strip_suffix(".tmp")
            .and_then(|n| n.rsplit('.').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if !sys::process_exists(pid) {
            dir.remove(&name);
        }
    }
}

/// Reads at most `max` bytes of `f` (small side files: digests, refusal notes, records).
pub fn read_small(f: &mut File, max: usize) -> io::Result<String> {
    let bytes = read_bytes(f, max)?;
    String::from_utf8(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// Reads `f` whole from its start if it holds at most `max` bytes.
pub fn read_bytes(f: &File, max: usize) -> io::Result<Vec<u8>> {
    sys::read_bounded(f, max)?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {max} bytes"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn group_writable_symlinked_and_foreign_files_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("cache");
        let t = open_dir(&d, true, 0o700).unwrap();
        assert!(t.writable());
        assert_eq!(
            std::fs::metadata(&d).unwrap().permissions().mode() & 0o7777,
            0o700
        );
        std::fs::write(d.join("ok"), b"x").unwrap();
        std::fs::set_permissions(d.join("ok"), std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(t.open_file("ok").unwrap().is_some());
        assert!(t.open_file("missing").unwrap().is_none());
        std::fs::set_permissions(d.join("ok"), std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(t
            .open_file("ok")
            .unwrap_err()
            .to_string()
            .contains("mode 0666"));
        std::os::unix::fs::symlink(d.join("ok"), d.join("link")).unwrap();
        assert!(t.open_file("link").is_err());
        std::fs::hard_link(d.join("ok"), d.join("hard")).unwrap();
        std::fs::set_permissions(d.join("ok"), std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(t
            .open_file("hard")
            .unwrap_err()
            .to_string()
            .contains("hard links"));
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o770)).unwrap();
        assert!(open_dir(&d, false, 0o700)
            .unwrap_err()
            .to_string()
            .contains("lets group or others write"));
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        let l = tmp.path().join("l");
        std::os::unix::fs::symlink(&d, &l).unwrap();
        assert!(open_dir(&l, false, 0o700)
            .unwrap_err()
            .to_string()
            .contains("symlink"));
        assert!(open_dir(&l.join("sub"), true, 0o700).is_err());
    }

    #[test]
    fn atomic_writes_have_the_exact_mode_and_leave_no_temp() {
        let tmp = tempfile::tempdir().unwrap();
        let t = open_dir(&tmp.path().join("c"), true, 0o700).unwrap();
        t.write_atomic("rec", b"one", 0o644).unwrap();
        t.write_atomic("rec", b"two", 0o644).unwrap();
        let mut f = t.open_file("rec").unwrap().unwrap();
        assert_eq!(read_small(&mut f, 16).unwrap(), "two");
        assert_eq!(f.metadata().unwrap().permissions().mode() & 0o7777, 0o644);
        assert!(read_small(&mut f, 2).is_err());
        assert_eq!(t.names(), vec!["rec".to_string()]);
    }
}
