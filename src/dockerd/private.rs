//! Private per-run data roots inside a shared directory, and their clean-up after crashes.
//!
//! Earthly gives two builds of one target the same `EARTHLY_DOCKERD_DATA_ROOT`; without caching
//! each run must use a fresh folder of its own *inside* it (Earthly's `mktemp -d`), never wipe
//! the shared folder. A private root `<dir>/cachelock-<8 hex>` is claimed by a flock on its
//! sibling `<dir>/cachelock-<8 hex>.lock`, taken before the folder exists and inherited by
//! dockerd: a folder whose claim nobody holds belongs to a run that died, and the next run in
//! the same directory removes it. The names have one length, so no private root's path is a
//! string prefix of another's (dockerd's mount clean-up matches mounts by string prefix).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use super::root::CacheRoot;
use crate::error::{Error, Result};
use crate::sys::{self, Open};

const PREFIX: &str = "cachelock-";
const LOCK_SUFFIX: &str = ".lock";

/// A claimed private root; [`PrivateRoot::remove`] (or dropping it, on an error path) wipes it
/// and drops the claim.
#[derive(Debug)]
pub struct PrivateRoot {
    /// The data root.
    pub path: PathBuf,
    /// The directory holding it and its claim, open.
    dir: OwnedFd,
    name: String,
    claim: File,
    removed: bool,
}

fn try_lock(f: &File) -> bool {
    sys::try_flock(f, true).unwrap_or(false)
}

fn open_claim(dir: std::os::fd::BorrowedFd<'_>, name: &str) -> std::io::Result<File> {
    sys::open_at(dir, name, Open::Create(0o644))
}

/// Claims and creates a fresh private root in the directory `rel` under the cache root
/// (created if missing), after removing the private roots of dead runs there.
pub fn create(cache: &CacheRoot, rel: &Path, short_id: &str) -> Result<PrivateRoot> {
    let dir = cache.subdir(rel, true)?.expect("created when missing");
    let dir_path = cache.path().join(rel);
    sweep(dir.as_fd(), &dir_path);
    let name = format!("{PREFIX}{short_id}");
    let claim_name = format!("{name}{LOCK_SUFFIX}");
    let claim = open_claim(dir.as_fd(), &claim_name).map_err(|e| {
        Error::io(
            format!("creating {}", dir_path.join(&claim_name).display()),
            e,
        )
    })?;
    if !try_lock(&claim) {
        return Err(Error::software(format!(
            "{} is claimed by another run (instance ids collided); retry",
            dir_path.join(&claim_name).display()
        )));
    }
    let path = dir_path.join(&name);
    // Whatever a dead run of the same id left is not ours to reuse.
    super::root::unmount_under(&path);
    sys::remove_tree_at(dir.as_fd(), &name)
        .and_then(|()| sys::ensure_dir_at(dir.as_fd(), &name, 0o755).map(|_| ()))
        .map_err(|e| {
            Error::cant_create(format!("cannot create data root {}: {e}", path.display()))
        })?;
    Ok(PrivateRoot {
        path,
        dir,
        name,
        claim,
        removed: false,
    })
}

impl PrivateRoot {
    /// The claim's descriptor, for dockerd to inherit (the claim lives as long as dockerd).
    pub fn fd(&self) -> RawFd {
        self.claim.as_raw_fd()
    }

    /// Wipes the root (after detaching mounts) and removes the claim file.
    pub fn remove(mut self) -> std::io::Result<()> {
        self.removed = true;
        self.wipe()
    }

    fn wipe(&self) -> std::io::Result<()> {
        super::root::unmount_under(&self.path);
        sys::remove_tree_at(self.dir.as_fd(), &self.name)?;
        let _ = sys::unlink_at(self.dir.as_fd(), &format!("{}{LOCK_SUFFIX}", self.name));
        Ok(())
    }
}

impl Drop for PrivateRoot {
    fn drop(&mut self) {
        if !self.removed {
            let _ = self.wipe();
        }
    }
}

/// Removes the private roots in `dir` (at `path`) whose claim nobody holds (their run died),
/// and claim files left without a root.
fn sweep(dir: std::os::fd::BorrowedFd<'_>, path: &Path) {
    let Ok(listing) = sys::list_dir_valid(dir, 1024, 64 * 1024, |n| {
        n.strip_prefix(PREFIX)
            .and_then(|n| n.strip_suffix(LOCK_SUFFIX))
            .is_some_and(|id| id.len() == 8 && id.bytes().all(|b| b.is_ascii_hexdigit()))
    }) else {
        return;
    };
    for (claim_name, _) in listing.entries {
        let Ok(claim) = open_claim(dir, &claim_name) else {
            continue;
        };
        if try_lock(&claim) {
            let name = claim_name.strip_suffix(LOCK_SUFFIX).expect("filtered");
            tracing::debug!(
                "removing {} left by a run that died",
                path.join(name).display()
            );
            super::root::unmount_under(&path.join(name));
            if sys::remove_tree_at(dir, name).is_ok() {
                let _ = sys::unlink_at(dir, &claim_name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_runs_root_is_swept_a_live_one_is_not() {
        let t = tempfile::tempdir().unwrap();
        let cache = CacheRoot::open(t.path()).unwrap();
        let here = Path::new("d");
        let live = create(&cache, here, "aaaaaaaa").unwrap();
        std::fs::write(live.path.join("f"), "x").unwrap();
        // What a run that died leaves: its folder and an unlocked claim file.
        let d = t.path().join("d");
        let dead_path = d.join("cachelock-bbbbbbbb");
        std::fs::create_dir_all(dead_path.join("overlay2")).unwrap();
        std::fs::write(d.join("cachelock-bbbbbbbb.lock"), "").unwrap();
        let third = create(&cache, here, "cccccccc").unwrap();
        assert!(!dead_path.exists(), "dead root swept");
        assert!(!d.join("cachelock-bbbbbbbb.lock").exists());
        assert!(live.path.join("f").exists(), "live root kept");
        assert!(
            create(&cache, here, "aaaaaaaa").is_err(),
            "a claimed id is refused"
        );
        let p = live.path.clone();
        live.remove().unwrap();
        // An error path drops the root: removed as well.
        drop(third);
        assert!(!p.exists());
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
    }
}
