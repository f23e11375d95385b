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
//!
//! **Nor can one user's files stop the others.** A counter is taken as at most one increment
//! per microsecond since 1970 ([`plausible`]): a planted 2^64-1 no longer exhausts everyone's
//! counters, and the counters still only grow. Only a file named after its owner's uid counts
//! (a file planted under another user's name is passed over, and that user takes another
//! name), at most [`PER_USER`] files per user are read (more fail only their owner), and names
//! that cannot be counters files cost nothing but the directory read.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt as _;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::dir::{owner_only, LockFiles, MAX_SCANNED};
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

/// Most counters files of one user read (its own names: `<uid>.json`, `<uid>.1.json` ...
/// `<uid>.7.json`, and one with an unpredictable suffix when all of those are taken).
pub const PER_USER: usize = 8;

/// The most a counter can be now: one increment per microsecond since 1970, more than any
/// lock ever counts. A larger value (planted) is taken as this bound, so that it can neither
/// exhaust the counters of everyone who reads it nor make them go back: every count after it
/// is still larger, because a grant takes more than a microsecond and the bound grows by one
/// each microsecond. (Hosts whose clocks disagree by more than the time between two grants
/// can, after such a plant, see a generation again: the warning names it.)
pub fn plausible(v: u64) -> u64 {
    let bound = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    if v > bound {
        warn_once_implausible(v);
    }
    v.min(bound)
}

fn warn_once_implausible(v: u64) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "a lock's counters hold {v}, more than one per microsecond since 1970 (planted?); counting from that bound instead"
        );
    }
}

/// The uid a counters file's name says it belongs to: `<uid>.json` or `<uid>.<suffix>.json`.
fn counters_uid(name: &str) -> Option<u32> {
    let stem = name.strip_suffix(".json")?;
    let (uid, suffix) = match stem.split_once('.') {
        Some((u, s)) => (u, Some(s)),
        None => (stem, None),
    };
    let ok_suffix = suffix
        .is_none_or(|s| (1..=16).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit()));
    ok_suffix.then(|| uid.parse().ok()).flatten()
}

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
    /// Takes in another source: every counter is the maximum seen (each at most
    /// [`plausible`]), except an arrival stamp too far in the future, which is ignored.
    fn merge(&mut self, other: &MetaData, now_ms: u64) {
        self.next_ticket = self.next_ticket.max(plausible(other.next_ticket));
        self.generation = self.generation.max(plausible(other.generation));
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

/// What [`gather`] read.
struct Gathered {
    /// The counters: the maximum of each over every source.
    meta: MetaData,
    /// `meta.json` and its current length (to rewrite it in place); `None` if it is missing or
    /// unusable.
    legacy: Option<(File, u64)>,
    /// This user's own counters file, if there is one.
    own: Option<String>,
}

/// The counters as every readable source says. `meta.d/` is read whole or not at all: past
/// [`MAX_SCANNED`] names a generation could be missed, so the request is refused (naming the
/// owners of the flood); a user with more than [`PER_USER`] files of its own refuses only
/// itself.
fn gather(files: &LockFiles, now_ms: u64) -> Result<Gathered> {
    let mut m = MetaData::default();
    let legacy = sys::open_at(files.base.as_fd(), "meta.json", Open::Existing).ok();
    let legacy = legacy.and_then(|f| {
        let len = f.metadata().ok()?.len();
        if let Some(d) = read_meta_file(&f) {
            m.merge(&d, now_ms);
        }
        Some((f, len))
    });
    let mut own = None;
    if let Some(dir) = files.meta_d.as_ref() {
        let listing = sys::list_dir_valid(dir.as_fd(), MAX_SCANNED, MAX_SCANNED, |n| {
            counters_uid(n).is_some()
        })
        .map_err(|e| Error::io(format!("cannot read {}", files.path("meta.d").display()), e))?;
        if listing.overflow {
            // Skipping some could miss the highest counter: refuse rather than risk a repeat.
            return Err(Error::new(
                Kind::IoErr,
                format!(
                    "{} holds more than {MAX_SCANNED} files ({}); cachelock cannot be sure of the lock's counters: remove the extra files (as their owners or root)",
                    files.path("meta.d").display(),
                    super::ticket::owners_sample(dir.as_fd())
                ),
            ));
        }
        let me = sys::euid();
        let mut per_user = std::collections::HashMap::<u32, usize>::new();
        for (name, kind) in listing.entries {
            let Some(uid) = counters_uid(&name) else {
                continue;
            };
            // A file planted under another user's name is not that user's counters.
            if kind != EntryKind::File
                || !sys::info_at(dir.as_fd(), &name).is_ok_and(|i| i.uid == uid)
            {
                continue;
            }
            let n = per_user.entry(uid).or_default();
            *n += 1;
            if *n > PER_USER {
                if uid == me {
                    return Err(Error::new(
                        Kind::IoErr,
                        format!(
                            "{} holds more than {PER_USER} counters files of yours (uid {me}); remove the extra ones",
                            files.path("meta.d").display()
                        ),
                    ));
                }
                warn_once_over(files, uid);
                continue;
            }
            if let Ok(f) = sys::open_at(dir.as_fd(), &name, Open::Existing) {
                if sys::info(&f).is_ok_and(|i| i.uid == uid) {
                    if let Some(d) = read_meta_file(&f) {
                        m.merge(&d, now_ms);
                    }
                    if uid == me && own.is_none() {
                        own = Some(name);
                    }
                }
            }
        }
    }
    Ok(Gathered {
        meta: m,
        legacy,
        own,
    })
}

fn warn_once_over(files: &LockFiles, uid: u32) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "{} holds more than {PER_USER} counters files of uid {uid}; only {PER_USER} are read (that user's own counters may be incomplete)",
            files.path("meta.d").display()
        );
    }
}

/// Reads the counters under a shared `meta.lock` taken by `until` at the latest (status,
/// progress), else without it; nothing is created. The flag says whether the lock was had:
/// without it a file being rewritten may be read half old, half new (and then ignored).
pub fn read(files: &LockFiles, until: Instant) -> (MetaData, bool) {
    let lock = sys::open_at(files.base.as_fd(), "meta.lock", Open::Existing).ok();
    let locked = match &lock {
        Some(l) => matches!(
            sys::flock_patiently(l, false, until.saturating_duration_since(Instant::now())),
            Ok(LockWait::Taken)
        ),
        // No meta.lock: nothing was ever counted.
        None => true,
    };
    let meta = gather(files, crate::lock::now_ms())
        .map(|g| g.meta)
        .unwrap_or_default();
    (meta, locked)
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

/// This user's counters file in `meta.d/`: `known` (found by [`gather`]), else created under
/// the first of its names that nobody took: `<uid>.json`, `<uid>.1.json` ... then names with an
/// unpredictable suffix, which nobody can plant in advance.
fn own_file(files: &LockFiles, known: Option<&str>) -> Result<File> {
    let dir = files.need(&files.meta_d, "meta.d")?;
    let uid = sys::euid();
    let names = known
        .map(str::to_string)
        .into_iter()
        .chain((0..PER_USER + 4).map(|k| match k {
            0 => format!("{uid}.json"),
            k if k < PER_USER => format!("{uid}.{k}.json"),
            _ => format!("{uid}.{:016x}.json", sys::unpredictable()),
        }));
    let mut last = None;
    for name in names {
        match sys::open_at(dir, &name, Open::Create(owner_only(files.file_mode))) {
            Ok(f) if sys::info(&f).is_ok_and(|i| i.uid == uid) => return Ok(f),
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => continue,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => continue,
            Err(e) => last = Some((name, e)),
        }
    }
    Err(match last {
        Some((name, e)) => Error::io(
            format!("cannot open {}", files.path("meta.d").join(&name).display()),
            e,
        ),
        None => Error::new(
            Kind::IoErr,
            format!(
                "{}: every name tried for uid {uid}'s counters is taken by another user's file; remove them (as their owners or root)",
                files.path("meta.d").display()
            ),
        ),
    })
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
    let Gathered {
        mut meta,
        legacy,
        own,
    } = gather(files, now)?;
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
    let own = own_file(files, own.as_deref())?;
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

/// The name of this user's record of `key`: `<uid>.<sha256 of key>` (with `.<16 hex>` after
/// it when another user's file took that name first: it is predictable).
fn key_name(key: &str) -> String {
    format!("{}.{:x}", sys::euid(), Sha256::digest(key.as_bytes()))
}

/// This user's key records in `keys/` (of `key` only, when given), with their content where
/// readable. Only files this user owns are looked at: a record planted by someone else is
/// never honoured, and never in the way.
fn own_records(files: &LockFiles, key: Option<&str>) -> Vec<(String, Option<KeyRecord>)> {
    let Some(dir) = files.keys.as_ref() else {
        return Vec::new();
    };
    let me = sys::euid();
    let prefix = match key {
        Some(k) => key_name(k),
        None => format!("{me}."),
    };
    let ours = |n: &str| {
        n.strip_prefix(&prefix).is_some_and(|rest| {
            key.is_none()
                || rest.is_empty()
                || rest
                    .strip_prefix('.')
                    .is_some_and(|s| s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        })
    };
    let Ok(listing) = sys::list_dir_valid(dir.as_fd(), MAX_SCANNED, MAX_SCANNED, ours) else {
        return Vec::new();
    };
    listing
        .entries
        .into_iter()
        .filter(|(n, _)| sys::info_at(dir.as_fd(), n).is_ok_and(|i| i.uid == me))
        .map(|(n, _)| {
            let rec = sys::open_at(dir.as_fd(), &n, Open::Existing)
                .ok()
                .filter(|f| sys::info(f).is_ok_and(|i| i.uid == me))
                .and_then(|f| sys::read_bounded(&f, MAX_META_BYTES).ok().flatten())
                .and_then(|b| serde_json::from_slice::<KeyRecord>(&b).ok());
            (n, rec)
        })
        .collect()
}

/// A remembered arrival for `key`: only from a record this user wrote.
fn read_key(files: &LockFiles, key: &str, now_ms: u64) -> Option<u64> {
    own_records(files, Some(key))
        .into_iter()
        .filter_map(|(_, r)| r)
        .filter(|r| r.key == key && r.expires_at_ms > now_ms)
        .map(|r| r.enqueued_at_ms)
        .min()
}

/// Removes this user's records of `key` (it was acquired).
fn forget_key(files: &LockFiles, key: &str) {
    if let Some(dir) = files.keys.as_ref() {
        for (name, _) in own_records(files, Some(key)) {
            let _ = sys::unlink_at(dir.as_fd(), &name);
        }
    }
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
        let remembered = queue_key.and_then(|k| read_key(files, k, now_ms));
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
        if let Some(k) = queue_key {
            forget_key(files, k);
        }
        Ok(Some(m.generation))
    })
}

/// Remembers a giving-up request's arrival for its key, for `grace_ms`; prunes this user's
/// expired keys. The record is written under a fresh unpredictable name and renamed into
/// place; if another user's file holds the record's name, it goes beside it (see
/// [`key_name`]).
pub fn remember_key(
    files: &LockFiles,
    key: &str,
    enqueued_at_ms: u64,
    now_ms: u64,
    grace_ms: u64,
) -> Result<()> {
    let dir = files.need(&files.keys, "keys")?;
    with_meta(files, |_m| {
        for (name, rec) in own_records(files, None) {
            if rec.is_none_or(|r| r.expires_at_ms <= now_ms) {
                let _ = sys::unlink_at(dir, &name);
            }
        }
        let rec = KeyRecord {
            key: key.to_string(),
            enqueued_at_ms,
            expires_at_ms: now_ms.saturating_add(grace_ms),
        };
        let fail = |e: io::Error| {
            Error::io(
                format!(
                    "cannot record queue key in {}",
                    files.path("keys").display()
                ),
                e,
            )
        };
        let name = key_name(key);
        let mut tmp = None;
        for _ in 0..4 {
            let t = format!("{name}.{:016x}.tmp", sys::unpredictable());
            match sys::create_new_at(dir, &t, owner_only(files.file_mode)) {
                Ok(f) => {
                    tmp = Some((t, f));
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(fail(e)),
            }
        }
        let (tmp, f) = tmp.ok_or_else(|| fail(io::ErrorKind::AlreadyExists.into()))?;
        let written = f
            .write_all_at(&serde_json::to_vec(&rec).expect("key encodes"), 0)
            .map_err(fail)
            .and_then(|()| {
                match sys::rename_at(dir, &tmp, dir, &name) {
                    // The name is another user's file (or directory): beside it.
                    Err(_) if sys::info_at(dir, &name).is_ok_and(|i| i.uid != sys::euid()) => {
                        let beside = format!("{name}.{:016x}", sys::unpredictable());
                        sys::rename_at(dir, &tmp, dir, &beside).map_err(fail)
                    }
                    r => r.map_err(fail),
                }
            });
        if written.is_err() {
            let _ = sys::unlink_at(dir, &tmp);
        }
        written
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
        assert_eq!(read(&files, Instant::now()).0.generation, 1);
        // A refused grant counts nothing.
        assert_eq!(
            acquired(&files, None, || Ok(None), |_| Ok(())).unwrap(),
            None
        );
        assert_eq!(read(&files, Instant::now()).0.generation, 1);
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
        let g = read(&files, Instant::now()).0.generation;
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
    fn a_counter_at_its_maximum_exhausts_nobody_and_counters_still_grow() {
        let tmp = tempfile::tempdir().unwrap();
        let files = files(tmp.path());
        let json = tmp.path().join("m.lock/meta.json");
        std::fs::write(
            &json,
            format!(
                "{{\"generation\": {}, \"next_ticket\": {}}}",
                u64::MAX,
                u64::MAX
            ),
        )
        .unwrap();
        let now = crate::lock::now_ms();
        let (n, _) = enqueue(&files, now, None, 0).unwrap();
        let g1 = granted(&files, None);
        let g2 = granted(&files, None);
        assert!(n < u64::MAX / 2 && g1 < u64::MAX / 2, "{n} {g1}");
        assert!(g2 > g1);
        assert_eq!(counters_uid("1001.json"), Some(1001));
        assert_eq!(counters_uid("1001.7.json"), Some(1001));
        assert_eq!(counters_uid("1001.00ff00ff00ff00ff.json"), Some(1001));
        for bad in ["x.json", "1001", "1001..json", "1001.tmp.json", ".json"] {
            assert_eq!(counters_uid(bad), None, "{bad}");
        }
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
