//! Data roots: checking the cache root, choosing `<cache_root>/<id>[/slot-K]` or a fresh private
//! root, and wiping a root (after detaching any mount a killed dockerd left inside it).

use std::path::{Path, PathBuf};

use crate::error::{Error, Kind, Result};

/// Directory under the cache root holding fresh (uncached and fall-back) data roots.
pub const EPHEMERAL_DIR: &str = ".ephemeral";

/// Checks that `root` is usable as a cache root: not a symlink (a symlink lets whoever controls
/// it redirect where dockerd writes as root), a directory (created if missing), writable.
pub fn check_cache_root(root: &Path) -> Result<()> {
    if let Ok(md) = std::fs::symlink_metadata(root) {
        if md.file_type().is_symlink() {
            return Err(Error::cant_create(format!(
                "cache root {} is a symbolic link; give the real directory (--cache-root, CACHELOCK_CACHE_ROOT or `cache_root`)",
                root.display()
            )));
        }
        if !md.is_dir() {
            return Err(Error::cant_create(format!(
                "cache root {} exists and is not a directory",
                root.display()
            )));
        }
    } else {
        std::fs::create_dir_all(root).map_err(|e| {
            Error::cant_create(format!("cannot create cache root {}: {e}", root.display()))
        })?;
    }
    if !writable(root) {
        return Err(Error::new(
            Kind::NoPerm,
            format!(
                "cache root {} is not writable by this user; choose another with --cache-root or fix its permissions",
                root.display()
            ),
        ));
    }
    Ok(())
}

fn writable(p: &Path) -> bool {
    crate::sys::can_write_dir(p)
}

/// The cached data root of `id` for `slot` (0-based) out of `slots`.
pub fn cached_root(cache_root: &Path, id: &str, slot: u32, slots: u32) -> PathBuf {
    if slots <= 1 {
        cache_root.join(id)
    } else {
        cache_root.join(id).join(format!("slot-{slot}"))
    }
}

/// A fresh private data root under the cache root.
pub fn ephemeral_root(cache_root: &Path, short_id: &str) -> PathBuf {
    cache_root.join(EPHEMERAL_DIR).join(short_id)
}

/// Creates `dir` (and parents), refusing a symlink at its place.
pub fn create_dir(dir: &Path) -> Result<()> {
    if std::fs::symlink_metadata(dir)
        .map(|m| m.file_type().is_symlink())
        .unwrap_or(false)
    {
        return Err(Error::cant_create(format!(
            "data root {} is a symbolic link; remove it",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::cant_create(format!("cannot create data root {}: {e}", dir.display())))
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
        let _ = crate::sys::detach_mount(&m);
    }
}

/// Removes `dir` and everything in it, after detaching mounts below it. A missing directory is
/// not an error.
pub fn wipe(dir: &Path) -> std::io::Result<()> {
    unmount_under(dir);
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Empties `dir` but keeps the directory and the entries named in `keep` (a lock file inside it).
pub fn wipe_contents(dir: &Path, keep: &[&str]) -> std::io::Result<()> {
    unmount_under(dir);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        if keep.iter().any(|k| e.file_name() == *k) {
            continue;
        }
        let p = e.path();
        let r = if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        if let Err(err) = r {
            if err.kind() != std::io::ErrorKind::NotFound {
                return Err(err);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let r = Path::new("/c");
        assert_eq!(cached_root(r, "x", 0, 1), Path::new("/c/x"));
        assert_eq!(cached_root(r, "x", 2, 3), Path::new("/c/x/slot-2"));
        assert_eq!(unescape_mount("/a\\040b"), "/a b");
    }

    #[test]
    fn symlink_cache_root_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let link = t.path().join("l");
        std::os::unix::fs::symlink(t.path(), &link).unwrap();
        assert_eq!(check_cache_root(&link).unwrap_err().exit_code(), 73);
        assert!(check_cache_root(&t.path().join("new")).is_ok());
    }
}
