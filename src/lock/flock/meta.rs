//! Short critical sections under `meta.lock`: ticket numbers, the arrival clock, the
//! generation counter and remembered queue keys.
//!
//! Arrival order comes from `enqueued_at_ms = max(wall clock, last + 1)` assigned here, a hybrid
//! logical clock: strictly increasing in arrival order even when hosts' clocks differ, and close
//! to wall time for aging and for people.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::dir::{open_checked, LockPaths};
use crate::error::{Error, Result};

/// The content of `meta.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MetaData {
    /// Next ticket number.
    #[serde(default)]
    pub next_ticket: u64,
    /// Last arrival stamp handed out.
    #[serde(default)]
    pub last_enqueued_at_ms: u64,
    /// Acquisitions so far (the fencing token of the latest).
    #[serde(default)]
    pub generation: u64,
}

/// A remembered arrival of a queue key (`keys/<sha256 of key>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyRecord {
    key: String,
    enqueued_at_ms: u64,
    expires_at_ms: u64,
}

/// Reads `meta.json` under a shared `meta.lock` (status, progress): a missing file reads as
/// zeros. Nothing is created.
pub fn read(paths: &LockPaths) -> MetaData {
    let Ok(lock) = crate::sys::open_other(&paths.meta_lock()) else {
        return MetaData::default();
    };
    let _ = crate::sys::flock(&lock, false);
    std::fs::read(paths.meta_json())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Runs `f` on the metadata under `meta.lock` and writes it back in place. In place rather
/// than write-and-rename: readers hold `meta.lock` too, and ext4's rename-over heuristics
/// start a writeback that costs milliseconds on every handoff.
fn with_meta<T>(paths: &LockPaths, f: impl FnOnce(&mut MetaData) -> Result<T>) -> Result<T> {
    use std::io::Read;
    use std::os::unix::fs::FileExt as _;
    let lock = open_checked(&paths.meta_lock(), true, paths.file_mode)?;
    crate::sys::flock(&lock, true)
        .map_err(|e| Error::io(format!("cannot lock {}", paths.meta_lock().display()), e))?;
    let mut file = open_checked(&paths.meta_json(), true, paths.file_mode)?;
    let mut old = Vec::new();
    file.read_to_end(&mut old)
        .map_err(|e| Error::io(format!("cannot read {}", paths.meta_json().display()), e))?;
    let mut meta: MetaData = serde_json::from_slice(&old).unwrap_or_default();
    let out = f(&mut meta)?;
    let mut text = serde_json::to_vec(&meta).expect("meta encodes");
    // Trailing spaces keep a shorter document valid JSON without a truncate.
    if text.len() < old.len() {
        text.resize(old.len(), b' ');
    }
    file.write_all_at(&text, 0)
        .map_err(|e| Error::io(format!("cannot update {}", paths.meta_json().display()), e))?;
    drop(file);
    drop(lock);
    Ok(out)
}

fn write_new(path: &std::path::Path, text: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    let _ = std::fs::remove_file(path);
    let mut f = open_checked(path, true, mode)?;
    f.write_all(text)
        .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))
}

fn key_path(paths: &LockPaths, key: &str) -> PathBuf {
    paths
        .keys
        .join(format!("{:x}", Sha256::digest(key.as_bytes())))
}

fn read_key(paths: &LockPaths, key: &str) -> Option<KeyRecord> {
    std::fs::read(key_path(paths, key))
        .ok()
        .and_then(|b| serde_json::from_slice::<KeyRecord>(&b).ok())
        .filter(|r| r.key == key)
}

/// Takes a ticket number and an arrival stamp. With a queue key whose arrival is remembered
/// and unexpired, the stamp is that original arrival ("retries keep their place").
pub fn enqueue(paths: &LockPaths, now_ms: u64, queue_key: Option<&str>) -> Result<(u64, u64)> {
    with_meta(paths, |m| {
        let n = m.next_ticket;
        m.next_ticket += 1;
        let remembered = queue_key
            .and_then(|k| read_key(paths, k))
            .filter(|r| r.expires_at_ms > now_ms)
            .map(|r| r.enqueued_at_ms);
        let at = match remembered {
            Some(at) => at,
            None => {
                let at = now_ms.max(m.last_enqueued_at_ms + 1);
                m.last_enqueued_at_ms = at;
                at
            }
        };
        Ok((n, at))
    })
}

/// Counts an acquisition and returns its generation; forgets the acquiring request's key.
pub fn acquired(paths: &LockPaths, queue_key: Option<&str>) -> Result<u64> {
    with_meta(paths, |m| {
        m.generation += 1;
        if let Some(k) = queue_key {
            let _ = std::fs::remove_file(key_path(paths, k));
        }
        Ok(m.generation)
    })
}

/// Remembers a giving-up request's arrival for its key, for `grace_ms`; prunes expired keys.
pub fn remember_key(
    paths: &LockPaths,
    key: &str,
    enqueued_at_ms: u64,
    now_ms: u64,
    grace_ms: u64,
) -> Result<()> {
    with_meta(paths, |_m| {
        if let Ok(rd) = std::fs::read_dir(&paths.keys) {
            for e in rd.flatten() {
                let expired = std::fs::read(e.path())
                    .ok()
                    .and_then(|b| serde_json::from_slice::<KeyRecord>(&b).ok())
                    .map(|r| r.expires_at_ms <= now_ms)
                    .unwrap_or(false);
                if expired {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let rec = KeyRecord {
            key: key.to_string(),
            enqueued_at_ms,
            expires_at_ms: now_ms.saturating_add(grace_ms),
        };
        let path = key_path(paths, key);
        let tmp = path.with_extension("tmp");
        write_new(
            &tmp,
            &serde_json::to_vec(&rec).expect("key encodes"),
            paths.file_mode,
        )?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| Error::io(format!("cannot record queue key in {}", path.display()), e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::flock::dir::LockDir;

    #[test]
    fn arrival_clock_is_strictly_increasing_and_keys_keep_arrival() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = LockDir::open(tmp.path(), None, None)
            .unwrap()
            .prepare("m")
            .unwrap();
        let (n0, a0) = enqueue(&paths, 1_000, None).unwrap();
        // A host whose clock is behind still arrives later.
        let (n1, a1) = enqueue(&paths, 500, None).unwrap();
        let (_, a2) = enqueue(&paths, 1_000, None).unwrap();
        assert_eq!((n0, n1), (0, 1));
        assert!(a0 < a1 && a1 < a2, "{a0} {a1} {a2}");
        remember_key(&paths, "job", a0, 2_000, 100).unwrap();
        assert_eq!(enqueue(&paths, 2_050, Some("job")).unwrap().1, a0);
        // Expired: a fresh arrival.
        assert!(enqueue(&paths, 2_200, Some("job")).unwrap().1 > a2);
        // Acquiring forgets the key.
        remember_key(&paths, "job", a0, 3_000, 1_000).unwrap();
        assert_eq!(acquired(&paths, Some("job")).unwrap(), 1);
        assert!(enqueue(&paths, 3_100, Some("job")).unwrap().1 > a2);
        assert_eq!(read(&paths).generation, 1);
    }
}
