//! Short critical sections under `meta.lock`: ticket numbers, the arrival clock, the
//! generation counter, remembered queue keys, and the on-disk format.
//!
//! Arrival order comes from `enqueued_at_ms = max(wall clock, last + 1)` assigned here, a hybrid
//! logical clock: strictly increasing in arrival order even when hosts' clocks differ, and close
//! to wall time for aging and for people. A remembered `last` further than
//! [`MAX_CLOCK_LEAD_MS`] ahead of the wall clock is ignored, so a planted far-future value
//! cannot stop aging.
//!
//! **Counters that never go back.** Each user keeps the counters in a file only they can
//! write, `meta.d/<uid>.json`; their value is the maximum over every such file and the
//! world-writable `meta.json` (which format 1 used alone, and which is still kept up to date
//! for it). A corrupt, oversized, planted or lowered file of one user therefore cannot make a
//! generation repeat, or a ticket number be reused, for anyone else. Ticket ids are published
//! with a hard link, which never replaces a live ticket even if a number is reused.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::dir::{owner_only, LockFiles, MAX_ENTRIES};
use crate::error::{Error, Kind, Result};
use crate::sys::{self, EntryKind, LockWait, Open};

/// The on-disk format this cachelock writes and understands. Format 1 (no `held/`, no
/// `meta.d/`) locks the same kernel lock files, so both exclude each other; a lock directory
/// written by a newer format is refused (see docs/architecture.md).
pub const FORMAT: u32 = 2;

/// Largest `meta.json`, `meta.d/*` or key record read; larger is corrupt (and ignored).
pub const MAX_META_BYTES: usize = 4096;

/// How far ahead of this host's clock a remembered arrival may be before it is ignored.
pub const MAX_CLOCK_LEAD_MS: u64 = 10 * 60 * 1000;

/// How long a request waits for `meta.lock` (held for microseconds normally) before it fails,
/// saying who may be holding it.
const META_LOCK_PATIENCE: Duration = Duration::from_secs(30);
/// How long `status` waits for `meta.lock` before reading without it.
const STATUS_PATIENCE: Duration = Duration::from_secs(2);

/// The counters (the content of `meta.json` and of each `meta.d/<uid>.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
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
    /// On-disk format of the writer (absent in format 1).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub format: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl MetaData {
    /// Takes in another source: every counter is the maximum seen, except an arrival stamp too
    /// far in the future, which is ignored.
    fn merge(&mut self, other: &MetaData, now_ms: u64) {
        self.next_ticket = self.next_ticket.max(other.next_ticket);
        self.generation = self.generation.max(other.generation);
        self.format = self.format.max(other.format);
        if other.last_enqueued_at_ms <= now_ms.saturating_add(MAX_CLOCK_LEAD_MS) {
            self.last_enqueued_at_ms = self.last_enqueued_at_ms.max(other.last_enqueued_at_ms);
        } else {
            warn_once_future(other.last_enqueued_at_ms, now_ms);
        }
    }
}

fn warn_once_future(at: u64, now: u64) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "a lock's counters say the last arrival was {:.0} s in the future (more than {} s ahead of this host's clock); ignoring it",
            (at - now) as f64 / 1000.0,
            MAX_CLOCK_LEAD_MS / 1000
        );
    }
}

/// A remembered arrival of a queue key (`keys/<uid>.<sha256 of key>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyRecord {
    key: String,
    enqueued_at_ms: u64,
    expires_at_ms: u64,
}

/// Parses one counters file (bounded); `None` if it is not one.
fn read_meta_file(f: &File) -> Option<MetaData> {
    let bytes = sys::read_bounded(f, MAX_META_BYTES).ok()??;
    serde_json::from_slice(&bytes).ok()
}

/// The counters as every readable source says (the maximum of each), with `meta.json`'s
/// current length (to rewrite it in place), `None` if it is missing or unusable.
fn gather(files: &LockFiles, now_ms: u64) -> Result<(MetaData, Option<(File, u64)>)> {
    let mut m = MetaData::default();
    let legacy = sys::open_at(files.base.as_fd(), "meta.json", Open::Existing).ok();
    let legacy = legacy.and_then(|f| {
        let len = f.metadata().ok()?.len();
        if let Some(d) = read_meta_file(&f) {
            m.merge(&d, now_ms);
        }
        Some((f, len))
    });
    if let Some(dir) = files.meta_d.as_ref() {
        let (entries, more) = sys::list_dir(dir.as_fd(), MAX_ENTRIES)
            .map_err(|e| Error::io(format!("cannot read {}", files.path("meta.d").display()), e))?;
        if more {
            // Skipping some could miss the highest counter: refuse rather than risk a repeat.
            return Err(Error::new(
                Kind::IoErr,
                format!(
                    "{} holds more than {MAX_ENTRIES} files (a flood?); cachelock cannot be sure of the lock's counters: remove the extra files (as their owners or root)",
                    files.path("meta.d").display()
                ),
            ));
        }
        for (name, kind) in entries {
            if kind != EntryKind::File {
                continue;
            }
            if let Ok(f) = sys::open_at(dir.as_fd(), &name, Open::Existing) {
                if let Some(d) = read_meta_file(&f) {
                    m.merge(&d, now_ms);
                }
            }
        }
    }
    Ok((m, legacy))
}

/// Reads the counters under a shared `meta.lock` (status, progress), or without it if it
/// stays taken; nothing is created.
pub fn read(files: &LockFiles) -> MetaData {
    let lock = sys::open_at(files.base.as_fd(), "meta.lock", Open::Existing).ok();
    if let Some(l) = &lock {
        let _ = sys::flock_patiently(l, false, STATUS_PATIENCE);
    }
    gather(files, crate::lock::now_ms())
        .map(|(m, _)| m)
        .unwrap_or_default()
}

/// Takes `meta.lock` (bounded, interruptible by SIGINT/SIGTERM/SIGHUP), checking that the
/// descriptor is still the file at that name (a replaced `meta.lock` would serialize nothing).
fn lock_meta(files: &LockFiles) -> Result<File> {
    for _ in 0..4 {
        let lock = files.open(files.base.as_fd(), "", "meta.lock", Some(files.file_mode))?;
        match sys::flock_patiently(&lock, true, META_LOCK_PATIENCE)
            .map_err(|e| Error::io(format!("cannot lock {}", files.path("meta.lock").display()), e))?
        {
            LockWait::Taken => {}
            LockWait::Interrupted(sig) => {
                return Err(Error::new(
                    Kind::Signal(sig),
                    format!(
                        "interrupted by signal {sig} while waiting for {}; left the queue",
                        files.path("meta.lock").display()
                    ),
                ))
            }
            LockWait::TimedOut => {
                return Err(Error::new(
                    Kind::IoErr,
                    format!(
                        "{} has been held by another process for {} s (it is held for microseconds normally): a stopped or hostile process of a user sharing the lock directory? `fuser -v` names it",
                        files.path("meta.lock").display(),
                        META_LOCK_PATIENCE.as_secs()
                    ),
                ))
            }
        }
        if sys::is_same_file_at(&lock, files.base.as_fd(), "meta.lock") {
            return Ok(lock);
        }
    }
    Err(Error::new(
        Kind::IoErr,
        format!(
            "{} keeps being replaced while cachelock locks it",
            files.path("meta.lock").display()
        ),
    ))
}

/// This user's counters file in `meta.d/`, created if needed. A file of that name planted by
/// someone else is skipped for the next name.
fn own_file(files: &LockFiles) -> Result<File> {
    let dir = files.need(&files.meta_d, "meta.d")?;
    let uid = sys::euid();
    for k in 0..8 {
        let name = if k == 0 {
            format!("{uid}.json")
        } else {
            format!("{uid}.{k}.json")
        };
        match sys::open_at(dir, &name, Open::Create(owner_only(files.file_mode))) {
            Ok(f) if sys::info(&f).is_ok_and(|i| i.uid == uid) => return Ok(f),
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => continue,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => continue,
            Err(e) => {
                return Err(Error::io(
                    format!("cannot open {}", files.path("meta.d").join(&name).display()),
                    e,
                ))
            }
        }
    }
    Err(Error::new(
        Kind::IoErr,
        format!(
            "{}: every name for uid {uid}'s counters is taken by another user's file; remove them (as their owners or root)",
            files.path("meta.d").display()
        ),
    ))
}

/// Writes `text` over `f` in place, padded with spaces to `old_len` (no truncation: ext4
/// flushes a file truncated and rewritten, which would cost milliseconds per handoff).
fn write_padded(f: &File, text: &[u8], old_len: u64) -> io::Result<()> {
    let mut text = text.to_vec();
    if (text.len() as u64) < old_len {
        if old_len > MAX_META_BYTES as u64 {
            f.set_len(0)?;
        } else {
            text.resize(old_len as usize, b' ');
        }
    }
    f.write_all_at(&text, 0)
}

/// Runs `f` on the counters under `meta.lock` and writes them back: to this user's file
/// (which must work) and to `meta.json` for format-1 processes (best effort).
fn with_meta<T>(files: &LockFiles, f: impl FnOnce(&mut MetaData) -> Result<T>) -> Result<T> {
    let lock = lock_meta(files)?;
    let now = crate::lock::now_ms();
    let (mut meta, legacy) = gather(files, now)?;
    if meta.format > FORMAT {
        return Err(Error::new(
            Kind::IoErr,
            format!(
                "lock {} was used by a newer cachelock (on-disk format {}; this one knows format {FORMAT} and older): upgrade cachelock on every host that shares {}",
                files.name,
                meta.format,
                files.base_path.parent().unwrap_or(&files.base_path).display()
            ),
        ));
    }
    let out = f(&mut meta)?;
    meta.format = FORMAT;
    let text = serde_json::to_vec(&meta).expect("meta encodes");
    let own = own_file(files)?;
    let own_len = own.metadata().map(|m| m.len()).unwrap_or(0);
    write_padded(&own, &text, own_len).map_err(|e| {
        Error::io(
            format!("cannot update {}", files.path("meta.d").display()),
            e,
        )
    })?;
    match legacy {
        Some((file, len)) => {
            let _ = write_padded(&file, &text, len);
        }
        None => {
            if let Ok(file) = sys::open_at(
                files.base.as_fd(),
                "meta.json",
                Open::Create(files.file_mode),
            ) {
                let len = file.metadata().map(|m| m.len()).unwrap_or(0);
                let _ = write_padded(&file, &text, len);
            }
        }
    }
    drop(lock);
    Ok(out)
}

fn key_name(key: &str) -> String {
    format!("{}.{:x}", sys::euid(), Sha256::digest(key.as_bytes()))
}

/// A remembered arrival for `key`: only from a record this user wrote (a record planted by
/// someone else is not honoured).
fn read_key(files: &LockFiles, key: &str) -> Option<KeyRecord> {
    let dir = files.keys.as_ref()?;
    let f = sys::open_at(dir.as_fd(), &key_name(key), Open::Existing).ok()?;
    if sys::info(&f).ok()?.uid != sys::euid() {
        return None;
    }
    let bytes = sys::read_bounded(&f, MAX_META_BYTES).ok()??;
    serde_json::from_slice::<KeyRecord>(&bytes)
        .ok()
        .filter(|r| r.key == key)
}

/// Takes a ticket number (at least `at_least`) and an arrival stamp. With a queue key whose
/// arrival is remembered and unexpired, the stamp is that original arrival ("retries keep
/// their place").
pub fn enqueue(
    files: &LockFiles,
    now_ms: u64,
    queue_key: Option<&str>,
    at_least: u64,
) -> Result<(u64, u64)> {
    with_meta(files, |m| {
        let n = m.next_ticket.max(at_least);
        m.next_ticket = n.checked_add(1).ok_or_else(|| exhausted(files, "ticket"))?;
        let remembered = queue_key
            .and_then(|k| read_key(files, k))
            .filter(|r| r.expires_at_ms > now_ms)
            .map(|r| r.enqueued_at_ms);
        let at = match remembered {
            Some(at) => at,
            None => {
                let at = now_ms.max(m.last_enqueued_at_ms.saturating_add(1));
                m.last_enqueued_at_ms = at;
                at
            }
        };
        Ok((n, at))
    })
}

fn exhausted(files: &LockFiles, what: &str) -> Error {
    Error::new(
        Kind::IoErr,
        format!(
            "the {what} counter of lock {} is exhausted (a counters file in {} says 2^64-1); remove that file (as its owner or root)",
            files.name,
            files.path("meta.d").display()
        ),
    )
}

/// Under `meta.lock`: `check` decides whether the grant stands (`Ok(None)`: someone else
/// holds the slot, nothing is counted; `Ok(Some(floor))`: it stands, and the generation must
/// exceed `floor`, the highest a live holder has); if it does, counts the acquisition, runs
/// `record` with its generation (so that marking the ticket holding is atomic with the
/// count), and forgets the acquiring request's key. `Ok(None)`: the grant did not stand.
pub fn acquired(
    files: &LockFiles,
    queue_key: Option<&str>,
    check: impl FnOnce() -> Result<Option<u64>>,
    record: impl FnOnce(u64) -> Result<()>,
) -> Result<Option<u64>> {
    with_meta(files, |m| {
        let Some(floor) = check()? else {
            return Ok(None);
        };
        m.generation = m
            .generation
            .max(floor)
            .checked_add(1)
            .ok_or_else(|| exhausted(files, "generation"))?;
        record(m.generation)?;
        if let (Some(k), Some(dir)) = (queue_key, files.keys.as_ref()) {
            let _ = sys::unlink_at(dir.as_fd(), &key_name(k));
        }
        Ok(Some(m.generation))
    })
}

/// Remembers a giving-up request's arrival for its key, for `grace_ms`; prunes this user's
/// expired keys.
pub fn remember_key(
    files: &LockFiles,
    key: &str,
    enqueued_at_ms: u64,
    now_ms: u64,
    grace_ms: u64,
) -> Result<()> {
    let dir = files.need(&files.keys, "keys")?;
    with_meta(files, |_m| {
        let mine = format!("{}.", sys::euid());
        if let Ok((entries, _)) = sys::list_dir(dir, MAX_ENTRIES) {
            for (name, _) in entries.iter().filter(|(n, _)| n.starts_with(&mine)) {
                let expired = sys::open_at(dir, name, Open::Existing)
                    .ok()
                    .and_then(|f| sys::read_bounded(&f, MAX_META_BYTES).ok().flatten())
                    .and_then(|b| serde_json::from_slice::<KeyRecord>(&b).ok())
                    .map(|r| r.expires_at_ms <= now_ms)
                    .unwrap_or(true);
                if expired {
                    let _ = sys::unlink_at(dir, name);
                }
            }
        }
        let rec = KeyRecord {
            key: key.to_string(),
            enqueued_at_ms,
            expires_at_ms: now_ms.saturating_add(grace_ms),
        };
        let name = key_name(key);
        let tmp = format!("{name}.{}.tmp", std::process::id());
        let _ = sys::unlink_at(dir, &tmp);
        let f = sys::create_new_at(dir, &tmp, owner_only(files.file_mode)).map_err(|e| {
            Error::io(
                format!(
                    "cannot record queue key in {}",
                    files.path("keys").display()
                ),
                e,
            )
        })?;
        f.write_all_at(&serde_json::to_vec(&rec).expect("key encodes"), 0)
            .map_err(|e| Error::io(format!("cannot write {}", files.path("keys").display()), e))?;
        sys::rename_at(dir, &tmp, dir, &name).map_err(|e| {
            let _ = sys::unlink_at(dir, &tmp);
            Error::io(
                format!(
                    "cannot record queue key in {}",
                    files.path("keys").display()
                ),
                e,
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::flock::dir::LockDir;

    fn files(dir: &std::path::Path) -> LockFiles {
        LockDir::open(dir, None, None)
            .unwrap()
            .prepare("m")
            .unwrap()
    }

    fn granted(files: &LockFiles, key: Option<&str>) -> u64 {
        acquired(files, key, || Ok(Some(0)), |_| Ok(()))
            .unwrap()
            .unwrap()
    }

    #[test]
    fn arrival_clock_is_strictly_increasing_and_keys_keep_arrival() {
        let tmp = tempfile::tempdir().unwrap();
        let files = files(tmp.path());
        let now = crate::lock::now_ms();
        let (n0, a0) = enqueue(&files, now, None, 0).unwrap();
        // A host whose clock is behind still arrives later.
        let (n1, a1) = enqueue(&files, now - 500, None, 0).unwrap();
        let (_, a2) = enqueue(&files, now, None, 0).unwrap();
        assert_eq!((n0, n1), (0, 1));
        assert!(a0 < a1 && a1 < a2, "{a0} {a1} {a2}");
        remember_key(&files, "job", a0, now + 1_000, 100).unwrap();
        assert_eq!(enqueue(&files, now + 1_050, Some("job"), 0).unwrap().1, a0);
        // Expired: a fresh arrival.
        assert!(enqueue(&files, now + 1_200, Some("job"), 0).unwrap().1 > a2);
        // Acquiring forgets the key.
        remember_key(&files, "job", a0, now + 2_000, 1_000).unwrap();
        assert_eq!(granted(&files, Some("job")), 1);
        assert!(enqueue(&files, now + 2_100, Some("job"), 0).unwrap().1 > a2);
        assert_eq!(read(&files).generation, 1);
        // A refused grant counts nothing.
        assert_eq!(
            acquired(&files, None, || Ok(None), |_| Ok(())).unwrap(),
            None
        );
        assert_eq!(read(&files).generation, 1);
        // A live holder's generation is a floor even when the counters were lost.
        assert_eq!(
            acquired(&files, None, || Ok(Some(41)), |_| Ok(())).unwrap(),
            Some(42)
        );
    }

    #[test]
    fn counters_survive_a_corrupt_or_lowered_meta_json() {
        let tmp = tempfile::tempdir().unwrap();
        let files = files(tmp.path());
        let now = crate::lock::now_ms();
        for _ in 0..3 {
            enqueue(&files, now, None, 0).unwrap();
            granted(&files, None);
        }
        let json = tmp.path().join("m.lock/meta.json");
        let garbage: [&[u8]; 3] = [
            b"{\"generation\": 0, \"next_ticket\": 0}",
            b"\x00garbage",
            b"",
        ];
        for (i, g) in garbage.iter().enumerate() {
            std::fs::write(&json, g).unwrap();
            assert_eq!(granted(&files, None), 4 + i as u64);
        }
        let g = read(&files).generation;
        assert_eq!(g, 6, "never repeats, never goes back");
        assert_eq!(enqueue(&files, now, None, 0).unwrap().0, 3);
        // A sparse 2 GiB meta.json is ignored without being read.
        let f = std::fs::OpenOptions::new().write(true).open(&json).unwrap();
        f.set_len(2 << 30).unwrap();
        assert_eq!(granted(&files, None), 7);
        assert!(
            std::fs::metadata(&json).unwrap().len() < 4096,
            "rewritten small"
        );
    }

    #[test]
    fn a_far_future_arrival_is_ignored_and_newer_formats_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let files = files(tmp.path());
        let now = crate::lock::now_ms();
        let json = tmp.path().join("m.lock/meta.json");
        std::fs::write(
            &json,
            format!("{{\"last_enqueued_at_ms\": {}}}", now + 100 * 86_400_000),
        )
        .unwrap();
        let (_, at) = enqueue(&files, now, None, 0).unwrap();
        assert!(at >= now && at < now + MAX_CLOCK_LEAD_MS, "{at} vs {now}");
        std::fs::write(&json, "{\"format\": 99}").unwrap();
        let e = enqueue(&files, now, None, 0).unwrap_err();
        assert_eq!(e.exit_code(), 74);
        assert!(e.message.contains("newer cachelock"), "{e}");
    }
}
