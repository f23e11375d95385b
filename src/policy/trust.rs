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
//! directory's descriptor (no second path lookup).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// A directory that passed the trust rules, held open.
#[derive(Debug)]
pub struct TrustedDir {
    fd: OwnedFd,
    /// Its path (for messages).
    pub path: PathBuf,
    /// Its owner's uid (the caller or root).
    pub owner: u32,
}

/// The caller's effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

fn cstr(name: &std::ffi::OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn openat(dir: i32, name: &std::ffi::OsStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    // SAFETY: a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::openat(dir, c.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: i32) -> io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid out-buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and buffer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn untrusted(path: &Path, why: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("{} is not trusted: {why}", path.display()),
    )
}

/// Opens `path` as a trusted directory, creating the missing components (mode `mode`, owned by
/// the caller) when `create` is set. Errors say which component broke which rule.
pub fn open_dir(path: &Path, create: bool, mode: u32) -> io::Result<TrustedDir> {
    let me = euid();
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    let mut cur = openat(
        libc::AT_FDCWD,
        std::ffi::OsStr::new("/"),
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
    )?;
    let mut walked = PathBuf::from("/");
    let comps: Vec<_> = abs
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            _ => None,
        })
        .collect();
    if abs.components().any(|c| c == Component::ParentDir) {
        return Err(untrusted(&abs, "`..` in the path".into()));
    }
    for (i, name) in comps.iter().enumerate() {
        let last = i + 1 == comps.len();
        walked.push(name);
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
        let next = match openat(cur.as_raw_fd(), name, flags, 0) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create => {
                let c = cstr(name)?;
                // SAFETY: valid descriptor and name.
                if unsafe { libc::mkdirat(cur.as_raw_fd(), c.as_ptr(), mode) } != 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        return Err(e);
                    }
                }
                openat(cur.as_raw_fd(), name, flags, 0)?
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) || e.raw_os_error() == Some(libc::ENOTDIR) => {
                return Err(untrusted(
                    &walked,
                    "it is a symlink or not a directory (compile caches are opened without following symlinks)".into(),
                ))
            }
            Err(e) => return Err(e),
        };
        let st = fstat(next.as_raw_fd())?;
        if st.st_uid != 0 && st.st_uid != me {
            return Err(untrusted(
                &walked,
                format!(
                    "owned by uid {}, neither you (uid {me}) nor root",
                    st.st_uid
                ),
            ));
        }
        let writable_by_others = st.st_mode & 0o022 != 0;
        let sticky = st.st_mode & libc::S_ISVTX != 0;
        if writable_by_others && (last || !sticky) {
            return Err(untrusted(
                &walked,
                format!(
                    "mode {:04o} lets group or others write into it",
                    st.st_mode & 0o7777
                ),
            ));
        }
        cur = next;
    }
    let st = fstat(cur.as_raw_fd())?;
    Ok(TrustedDir {
        fd: cur,
        path: abs,
        owner: st.st_uid,
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
        let fd = match openat(
            self.fd.as_raw_fd(),
            std::ffi::OsStr::new(name),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
            0,
        ) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        };
        let st = fstat(fd.as_raw_fd())?;
        let path = self.path.join(name);
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(untrusted(&path, "not a regular file".into()));
        }
        if st.st_uid != self.owner {
            return Err(untrusted(
                &path,
                format!(
                    "owned by uid {}, not by the directory's owner (uid {})",
                    st.st_uid, self.owner
                ),
            ));
        }
        if st.st_mode & 0o022 != 0 {
            return Err(untrusted(
                &path,
                format!(
                    "mode {:04o} lets group or others write it",
                    st.st_mode & 0o7777
                ),
            ));
        }
        if st.st_nlink != 1 {
            return Err(untrusted(&path, format!("{} hard links", st.st_nlink)));
        }
        Ok(Some(File::from(fd)))
    }

    /// Whether the caller can write here (it owns the directory).
    pub fn writable(&self) -> bool {
        self.owner == euid()
    }

    /// Creates a new file `name` (must not exist) with `mode`.
    pub fn create_new(&self, name: &str, mode: u32) -> io::Result<File> {
        let fd = openat(
            self.fd.as_raw_fd(),
            std::ffi::OsStr::new(name),
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            mode,
        )?;
        // The umask may have taken bits away; set exactly what was asked.
        // SAFETY: valid descriptor.
        unsafe { libc::fchmod(fd.as_raw_fd(), mode) };
        Ok(File::from(fd))
    }

    /// Opens (creating it if need be) the lock file `name`, for `flock`.
    pub fn lock_file(&self, name: &str) -> io::Result<File> {
        let fd = openat(
            self.fd.as_raw_fd(),
            std::ffi::OsStr::new(name),
            libc::O_RDWR | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_NONBLOCK,
            0o600,
        )?;
        Ok(File::from(fd))
    }

    /// Renames `from` to `to` inside this directory.
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (f, t) = (cstr(from.as_ref())?, cstr(to.as_ref())?);
        let d = self.fd.as_raw_fd();
        // SAFETY: valid descriptors and names.
        if unsafe { libc::renameat(d, f.as_ptr(), d, t.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Removes `name` (errors ignored: best effort).
    pub fn remove(&self, name: &str) {
        if let Ok(c) = cstr(name.as_ref()) {
            // SAFETY: valid descriptor and name.
            unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) };
        }
    }

    /// Names of the entries (for removing stale temp files).
    pub fn names(&self) -> Vec<String> {
        // Reading through /proc/self/fd keeps us on the descriptor we checked.
        let p = format!("/proc/self/fd/{}", self.fd.as_raw_fd());
        std::fs::read_dir(p)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Reads at most `max` bytes of `f` (small side files: digests, refusal notes).
pub fn read_small(f: &mut File, max: usize) -> io::Result<String> {
    use std::io::Read;
    let mut buf = Vec::new();
    f.take(max as u64 + 1).read_to_end(&mut buf)?;
    if buf.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {max} bytes"),
        ));
    }
    String::from_utf8(buf).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
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
}
