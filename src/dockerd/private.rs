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
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const PREFIX: &str = "cachelock-";
const LOCK_SUFFIX: &str = ".lock";

/// A claimed private root; [`PrivateRoot::remove`] (or dropping it, on an error path) wipes it
/// and drops the claim.
#[derive(Debug)]
pub struct PrivateRoot {
    /// The data root.
    pub path: PathBuf,
    claim: File,
    claim_path: PathBuf,
    removed: bool,
}

fn try_lock(f: &File) -> bool {
    crate::sys::try_flock(f, true).unwrap_or(false)
}

fn open_claim(path: &Path) -> std::io::Result<File> {
    crate::sys::open_in_shared_dir(path, crate::sys::Open::Create(0o644))
}

/// Claims and creates a fresh private root in `dir` (created if missing), after removing the
/// private roots of dead runs there.
pub fn create(dir: &Path, short_id: &str) -> Result<PrivateRoot> {
    super::root::create_dir(dir)?;
    sweep(dir);
    let path = dir.join(format!("{PREFIX}{short_id}"));
    let claim_path = dir.join(format!("{PREFIX}{short_id}{LOCK_SUFFIX}"));
    let claim = open_claim(&claim_path)
        .map_err(|e| Error::io(format!("creating {}", claim_path.display()), e))?;
    if !try_lock(&claim) {
        return Err(Error::software(format!(
            "{} is claimed by another run (instance ids collided); retry",
            claim_path.display()
        )));
    }
    // Whatever a dead run of the same id left is not ours to reuse.
    let _ = super::root::wipe(&path);
    super::root::create_dir(&path)?;
    Ok(PrivateRoot {
        path,
        claim,
        claim_path,
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
        let r = super::root::wipe(&self.path);
        let _ = std::fs::remove_file(&self.claim_path);
        r
    }
}

impl Drop for PrivateRoot {
    fn drop(&mut self) {
        if !self.removed && super::root::wipe(&self.path).is_ok() {
            let _ = std::fs::remove_file(&self.claim_path);
        }
    }
}

/// Removes private roots in `dir` whose claim nobody holds (their run died), and claim files
/// left without a root.
pub fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(id) = name
            .strip_prefix(PREFIX)
            .and_then(|n| n.strip_suffix(LOCK_SUFFIX))
        else {
            continue;
        };
        let claim_path = e.path();
        let Ok(claim) = open_claim(&claim_path) else {
            continue;
        };
        if try_lock(&claim) {
            let root = dir.join(format!("{PREFIX}{id}"));
            tracing::debug!("removing {} left by a run that died", root.display());
            if super::root::wipe(&root).is_ok() {
                let _ = std::fs::remove_file(&claim_path);
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
        let live = create(t.path(), "aaaaaaaa").unwrap();
        std::fs::write(live.path.join("f"), "x").unwrap();
        // What a run that died leaves: its folder and an unlocked claim file.
        let dead_path = t.path().join("cachelock-bbbbbbbb");
        std::fs::create_dir_all(dead_path.join("overlay2")).unwrap();
        std::fs::write(t.path().join("cachelock-bbbbbbbb.lock"), "").unwrap();
        let third = create(t.path(), "cccccccc").unwrap();
        assert!(!dead_path.exists(), "dead root swept");
        assert!(!t.path().join("cachelock-bbbbbbbb.lock").exists());
        assert!(live.path.join("f").exists(), "live root kept");
        assert!(
            create(t.path(), "aaaaaaaa").is_err(),
            "a claimed id is refused"
        );
        let p = live.path.clone();
        live.remove().unwrap();
        // An error path drops the root: removed as well.
        drop(third);
        assert!(!p.exists());
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
    }
}
