//! Data roots: the cache root that holds them, where each cached root and slot lives, and
//! removing a root (after detaching any mount a killed dockerd left inside it).
//!
//! **A cache root is root's own ground.** cachelock (often as root) creates, measures, empties
//! and removes directories under it, and dockerd writes there as root. So a cache root must be
//! owned by the caller or root and writable by nobody else, and so must every directory on its
//! path (a sticky one like `/tmp` aside: nobody can replace another's entry there), with no
//! symbolic link anywhere in it — the rules of the policy compile cache
//! ([`crate::policy::trust`]). It is then held open, and everything below it is reached
//! relative to its descriptor without following links ([`CacheRoot`]): nobody else can plant
//! a link where a write or a removal goes, or swap a directory between a listing and a
//! removal. A cache root that breaks the rules is refused with what to fix (exit 73).
//!
//! **Layout** (`cachelock dockerd` and the Earthly drop-in alike): the cached root of `NAME`
//! is `<cache root>/NAME`, and it is also slot 0 when slots are on, so turning slots on keeps
//! the warm root in use; slot K ≥ 1 is `<cache root>/.cachelock-slots/NAME/K/root`. No root is
//! inside another, and none is a string prefix of another's path: dockerd's mount clean-up
//! treats every path that *starts with* its data root's text as its own. Fresh (private) roots
//! are `<cache root>/.cachelock-private/cachelock-<8 hex>` (see [`super::private`]).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::error::{Error, Kind, Result};
use crate::sys;

/// Directory under the cache root holding the extra slots' roots.
pub const SLOTS_DIR: &str = ".cachelock-slots";
/// Directory under the cache root holding fresh roots (uncached runs, fall-backs).
pub const PRIVATE_DIR: &str = ".cachelock-private";
/// Mode of the directories cachelock creates under a cache root.
const DIR_MODE: u32 = 0o755;
/// Most entries a measurement looks at (the count stops there).
const MEASURE_MAX_ENTRIES: usize = 50_000_000;

/// A cache root that passed the rules above, held open.
#[derive(Debug)]
pub struct CacheRoot {
    dir: crate::policy::trust::TrustedDir,
}

impl CacheRoot {
    /// Opens (creating it and its missing parents, mode 0755) the cache root at `path`.
    /// Refused: a symbolic link anywhere on the path, a directory on it that another user
    /// owns or may write (exit 73); not writable by the caller (exit 77).
    pub fn open(path: &Path) -> Result<CacheRoot> {
        let how = "give one that you or root own and nobody else can write (--cache-root, CACHELOCK_CACHE_ROOT or `cache_root`)";
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(Error::cant_create(format!(
                "cache root {} is a symbolic link; {how}",
                path.display()
            )));
        }
        if path.is_dir() && !sys::can_write_dir(path) {
            return Err(Error::new(
                Kind::NoPerm,
                format!(
                    "cache root {} is not writable by this user; choose another with --cache-root or fix its permissions",
                    path.display()
                ),
            ));
        }
        match crate::policy::trust::open_dir(path, true, DIR_MODE) {
            Ok(dir) => Ok(CacheRoot { dir }),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied && e.raw_os_error().is_none() => {
                Err(Error::cant_create(format!(
                    "cache root {} cannot be used: {e}; root runs dockerd and removes directories there, so {how}",
                    path.display()
                )))
            }
            Err(e) if e.raw_os_error() == Some(libc::EACCES) || e.raw_os_error() == Some(libc::EROFS) => {
                Err(Error::new(
                    Kind::NoPerm,
                    format!(
                        "cache root {} is not writable by this user ({e}); choose another with --cache-root or fix its permissions",
                        path.display()
                    ),
                ))
            }
            Err(e) => Err(Error::cant_create(format!(
                "cannot create cache root {}: {e}",
                path.display()
            ))),
        }
    }

    /// Opens an existing cache root under the same rules without creating anything or asking
    /// to write it (`cache ls`, `serve`): `None` if there is none.
    pub fn open_existing(path: &Path) -> Result<Option<CacheRoot>> {
        match crate::policy::trust::open_dir(path, false, DIR_MODE) {
            Ok(dir) => Ok(Some(CacheRoot { dir })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::cant_create(format!(
                "cache root {} cannot be read safely: {e}; give one that you or root own and nobody else can write",
                path.display()
            ))),
        }
    }

    /// Opens an existing cache root only to read it (`status`): `None` if it cannot be opened
    /// as a directory. Reads below are relative to it, without following links or blocking.
    pub fn open_to_read(path: &Path) -> Option<OwnedFd> {
        sys::open_dir(path).ok()
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.dir.path
    }

    /// Its descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// Opens the directory `rel` below the cache root (one or more components), each opened
    /// without following a link and owned by the caller or root and writable by nobody else
    /// (exit 73 otherwise: another user's directory there is not ours to fill or empty);
    /// missing ones are created (mode 0755) when `create`. `Ok(None)`: missing.
    pub fn subdir(&self, rel: &Path, create: bool) -> Result<Option<OwnedFd>> {
        let me = sys::euid();
        let mut cur = self
            .fd()
            .try_clone_to_owned()
            .map_err(|e| self.error(rel, e))?;
        let mut walked = self.path().to_path_buf();
        for c in rel.iter() {
            let name = c
                .to_str()
                .filter(|n| !n.is_empty() && *n != "." && *n != "..");
            let Some(name) = name else {
                return Err(Error::software(format!(
                    "bad path below the cache root: {}",
                    rel.display()
                )));
            };
            walked.push(name);
            let next = match sys::open_dir_at(cur.as_fd(), name) {
                Ok(fd) => fd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                    sys::ensure_dir_at(cur.as_fd(), name, DIR_MODE)
                        .map_err(|e| self.error(&walked, e))?
                        .0
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(self.error(&walked, e)),
            };
            let i = sys::info(&next).map_err(|e| self.error(&walked, e))?;
            if (i.uid != 0 && i.uid != me) || i.mode & 0o022 != 0 {
                return Err(Error::cant_create(format!(
                    "{} is owned by uid {} with mode {:04o}: under a cache root every directory cachelock uses must be yours or root's and writable by nobody else (remove it, or `chmod go-w` it)",
                    walked.display(),
                    i.uid,
                    i.mode
                )));
            }
            cur = next;
        }
        Ok(Some(cur))
    }

    fn error(&self, path: &Path, e: std::io::Error) -> Error {
        let why = match e.raw_os_error() {
            Some(libc::ELOOP) => {
                "a symbolic link (never followed under a cache root): remove it".to_string()
            }
            Some(libc::ENOTDIR) => "not a directory: remove it".to_string(),
            _ => e.to_string(),
        };
        Error::cant_create(format!("cannot use {}: {why}", path.display()))
    }

    /// Removes `rel` and everything below it (after detaching the mounts a killed dockerd left
    /// there), relative to its parent's descriptor, following no link. Missing: fine.
    pub fn remove(&self, rel: &Path) -> Result<()> {
        let (parent, name) = split(rel)?;
        unmount_under(&self.path().join(rel));
        let Some(dir) = self.subdir(parent, false)? else {
            return Ok(());
        };
        sys::remove_tree_at(dir.as_fd(), name)
            .map_err(|e| Error::io(format!("removing {}", self.path().join(rel).display()), e))
    }

    /// Removes every entry of the directory `rel` except those named in `keep` (a root's lock
    /// file and queue), as [`CacheRoot::remove`] does.
    pub fn empty(&self, rel: &Path, keep: &[&str]) -> Result<()> {
        unmount_under(&self.path().join(rel));
        let Some(dir) = self.subdir(rel, false)? else {
            return Ok(());
        };
        let (entries, _) = sys::list_dir(dir.as_fd(), usize::MAX)
            .map_err(|e| Error::io(format!("reading {}", self.path().join(rel).display()), e))?;
        for (name, _) in entries {
            if keep.contains(&name.as_str()) {
                continue;
            }
            sys::remove_tree_at(dir.as_fd(), &name).map_err(|e| {
                Error::io(
                    format!("removing {}", self.path().join(rel).join(&name).display()),
                    e,
                )
            })?;
        }
        Ok(())
    }

    /// Disk usage of `rel` (see [`sys::disk_usage_at`]); 0 if missing.
    pub fn usage(&self, rel: &Path) -> u64 {
        let Ok((parent, name)) = split(rel) else {
            return 0;
        };
        match self.subdir(parent, false) {
            Ok(Some(dir)) => sys::disk_usage_at(dir.as_fd(), name, MEASURE_MAX_ENTRIES),
            _ => 0,
        }
    }
}

/// `rel`'s parent (possibly empty) and last component.
fn split(rel: &Path) -> Result<(&Path, &str)> {
    match (rel.parent(), rel.file_name().and_then(|n| n.to_str())) {
        (Some(p), Some(n)) => Ok((p, n)),
        _ => Err(Error::software(format!(
            "bad path below the cache root: {}",
            rel.display()
        ))),
    }
}

/// Where slot `slot` of the cached root `name` lives, relative to the cache root: the root
/// itself for slot 0, `.cachelock-slots/<name>/<slot>/root` for the others (see the module
/// comment).
pub fn slot_root(name: &str, slot: u32) -> PathBuf {
    if slot == 0 {
        PathBuf::from(name)
    } else {
        Path::new(SLOTS_DIR)
            .join(name)
            .join(slot.to_string())
            .join("root")
    }
}

/// Moves a slot root of the layout of earlier releases of `cachelock dockerd`
/// (`<name>/slot-K`, which put slot 0 *inside* the warm root) to where slot `slot` lives now,
/// when the new place is still empty: slot K's directory is renamed, slot 0's entries are moved
/// up into `<name>`. Call while holding slot `slot`.
pub fn adopt_old_slot(cache: &CacheRoot, name: &str, slot: u32) -> Result<()> {
    let old_name = format!("slot-{slot}");
    let Some(base) = cache.subdir(Path::new(name), false)? else {
        return Ok(());
    };
    let Ok(old) = sys::open_dir_at(base.as_fd(), &old_name) else {
        return Ok(());
    };
    if slot == 0 {
        let (entries, _) = sys::list_dir(old.as_fd(), usize::MAX)
            .map_err(|e| Error::io(format!("reading {}/{}", name, old_name), e))?;
        for (entry, _) in entries {
            // A name already in the new root stays where it is (and goes with the old root).
            if sys::info_at(base.as_fd(), &entry).is_err() {
                let _ = sys::rename_at(old.as_fd(), &entry, base.as_fd(), &entry);
            }
        }
        drop(old);
        return cache.remove(&Path::new(name).join(old_name));
    }
    let new = slot_root(name, slot);
    let (parent, leaf) = split(&new)?;
    let dir = cache.subdir(parent, true)?.expect("created when missing");
    if sys::info_at(dir.as_fd(), leaf).is_ok() {
        return Ok(());
    }
    sys::rename_at(base.as_fd(), &old_name, dir.as_fd(), leaf).map_err(|e| {
        Error::io(
            format!(
                "moving {} to {}",
                cache.path().join(name).join(&old_name).display(),
                cache.path().join(&new).display()
            ),
            e,
        )
    })
}

/// Checks that only the caller or root can change what `dir` names: every directory on the
/// path owned by one of them and writable by nobody else (a sticky one such as `/tmp` before
/// the last component aside: nobody can replace another's entry there), every symbolic link on
/// it owned by one of them and leading to such a directory (`/var/run` → `/run`). For paths
/// root hands to dockerd or writes through (run directory, shared socket and log).
pub fn check_trusted_path(dir: &Path) -> std::result::Result<(), String> {
    let me = sys::euid();
    if !dir.is_absolute()
        || dir
            .components()
            .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(format!(
            "{} is not an absolute path without `..`",
            dir.display()
        ));
    }
    let comps: Vec<_> = dir.iter().skip(1).collect();
    let mut prefix = PathBuf::from("/");
    for i in 0..=comps.len() {
        if i > 0 {
            prefix.push(comps[i - 1]);
        }
        let last = i == comps.len();
        let info = sys::info_path(&prefix).map_err(|e| format!("{}: {e}", prefix.display()))?;
        if info.uid != 0 && info.uid != me {
            return Err(format!(
                "{} is owned by uid {}, neither you (uid {me}) nor root",
                prefix.display(),
                info.uid
            ));
        }
        match info.kind {
            sys::EntryKind::Symlink => {
                let real = std::fs::canonicalize(&prefix)
                    .map_err(|e| format!("{}: {e}", prefix.display()))?;
                crate::policy::trust::open_dir(&real, false, 0).map_err(|e| {
                    format!("{} leads to {}: {e}", prefix.display(), real.display())
                })?;
            }
            sys::EntryKind::Dir => {
                let sticky = info.mode & 0o1000 != 0;
                if info.mode & 0o022 != 0 && (last || !sticky) {
                    return Err(format!(
                        "{} (mode {:04o}) lets group or others write into it",
                        prefix.display(),
                        info.mode
                    ));
                }
            }
            _ => return Err(format!("{} is not a directory", prefix.display())),
        }
    }
    Ok(())
}

/// Writes `bytes` to the file `path` in a directory that only the caller (or root) can change
/// (created, mode 0755, if missing): through a fresh file with an unpredictable name
/// (`O_EXCL`) renamed over the old one, relative to the directory's descriptor, so a link
/// planted at `path` is replaced, never followed. A directory another user took, or one others
/// may write, is refused (exit 73) saying so: for fixed paths in shared places (Earthly's
/// `/tmp/earthly/compose-config.yml`).
pub fn write_in_own_dir(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Err(Error::software(format!("bad file path {}", path.display())));
    };
    let refuse = |why: String| {
        Error::cant_create(format!(
            "cannot write {}: {why}; it is written only into a directory that you or root own and nobody else can write: remove it (as its owner or root)",
            path.display()
        ))
    };
    if let (Some(up), Some(leaf)) = (dir.parent(), dir.file_name().and_then(|n| n.to_str())) {
        if sys::info_path(dir).is_err() {
            // Whoever creates it first owns it: the check below says whether that was us.
            let up = sys::open_dir(up).map_err(|e| refuse(e.to_string()))?;
            sys::ensure_dir_at(up.as_fd(), leaf, 0o755).map_err(|e| refuse(e.to_string()))?;
        }
    }
    check_trusted_path(dir).map_err(refuse)?;
    let d = sys::open_dir(dir).map_err(|e| refuse(e.to_string()))?;
    let fail = |e: std::io::Error| Error::io(format!("writing {}", path.display()), e);
    let tmp = format!(".{name}.{:016x}", sys::unpredictable());
    let mut f = sys::create_new_at(d.as_fd(), &tmp, 0o644).map_err(fail)?;
    let written = f
        .write_all(bytes)
        .and_then(|()| sys::rename_at(d.as_fd(), &tmp, d.as_fd(), name));
    if written.is_err() {
        let _ = sys::unlink_at(d.as_fd(), &tmp);
    }
    written.map_err(fail)
}

/// Mount points at or below `dir`, deepest first (from `/proc/self/mountinfo`).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mount(m)))
        .filter(|m| m.starts_with(dir))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    out
}

fn unescape_mount(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Detaches every mount at or below `dir` (a killed dockerd leaves overlay and shm mounts).
pub fn unmount_under(dir: &Path) {
    for m in mounts_under(dir) {
        // MNT_DETACH cannot leave anything half-done; a mount already gone is fine.
        let _ = sys::detach_mount(&m);
    }
}

/// Removes the directory at `dir` and everything in it, after detaching mounts below it: its
/// parent is opened by path (callers pass a path they own: an instance directory under the run
/// directory), everything below relative to descriptors, following no link. A missing
/// directory is not an error.
pub fn wipe(dir: &Path) -> std::io::Result<()> {
    unmount_under(dir);
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name().and_then(|n| n.to_str()))
    else {
        return Err(std::io::ErrorKind::InvalidInput.into());
    };
    match sys::open_dir(parent) {
        Ok(p) => sys::remove_tree_at(p.as_fd(), name),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn slot_roots_never_nest_nor_prefix_each_other() {
        assert_eq!(slot_root("x", 0), Path::new("x"));
        assert_eq!(slot_root("x", 2), Path::new(".cachelock-slots/x/2/root"));
        let roots: Vec<PathBuf> = (0..12)
            .map(|k| Path::new("/c").join(slot_root("x", k)))
            .collect();
        for a in &roots {
            for b in &roots {
                if a != b {
                    assert!(
                        !b.to_str().unwrap().starts_with(a.to_str().unwrap()),
                        "{a:?} prefixes {b:?}"
                    );
                }
            }
        }
        assert_eq!(unescape_mount("/a\\040b"), "/a b");
    }

    #[test]
    fn cache_roots_others_may_write_or_links_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let link = t.path().join("l");
        std::os::unix::fs::symlink(t.path(), &link).unwrap();
        assert_eq!(CacheRoot::open(&link).unwrap_err().exit_code(), 73);
        // A symbolic link further up the path is refused too.
        assert_eq!(
            CacheRoot::open(&link.join("sub")).unwrap_err().exit_code(),
            73
        );
        let open = t.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = CacheRoot::open(&open).unwrap_err();
        assert_eq!(e.exit_code(), 73, "{e}");
        assert!(e.message.contains("nobody else can write"), "{e}");
        let c = CacheRoot::open(&t.path().join("new/cache")).unwrap();
        // Below it: created, and a link in place of a directory is refused, never followed.
        assert!(c.subdir(Path::new("a/b"), true).unwrap().is_some());
        std::os::unix::fs::symlink(&open, t.path().join("new/cache/x")).unwrap();
        assert_eq!(
            c.subdir(Path::new("x/y"), true).unwrap_err().exit_code(),
            73
        );
        assert!(!open.join("y").exists());
        std::fs::write(open.join("keep"), "").unwrap();
        c.remove(Path::new("x")).unwrap();
        assert!(open.join("keep").exists());
        std::fs::write(t.path().join("new/cache/a/b/f"), "").unwrap();
        c.empty(Path::new("a"), &["b"]).unwrap();
        assert!(t.path().join("new/cache/a/b/f").exists());
        c.remove(Path::new("a")).unwrap();
        assert!(!t.path().join("new/cache/a").exists());
    }

    #[test]
    fn old_slot_roots_are_adopted_where_slots_live_now() {
        let t = tempfile::tempdir().unwrap();
        let c = CacheRoot::open(t.path()).unwrap();
        std::fs::create_dir_all(t.path().join("id/slot-0/image")).unwrap();
        std::fs::create_dir_all(t.path().join("id/slot-1/image")).unwrap();
        adopt_old_slot(&c, "id", 0).unwrap();
        assert!(t.path().join("id/image").is_dir());
        assert!(!t.path().join("id/slot-0").exists());
        adopt_old_slot(&c, "id", 1).unwrap();
        assert!(t.path().join(".cachelock-slots/id/1/root/image").is_dir());
        assert!(!t.path().join("id/slot-1").exists());
        // Nothing to adopt: nothing happens.
        adopt_old_slot(&c, "id", 1).unwrap();
        adopt_old_slot(&c, "other", 0).unwrap();
    }
}
