//! A cap on the total size of the cached data roots under one cache root, with
//! least-recently-used eviction of roots that nobody holds (Earthly #2933: cached roots grow
//! without bound).
//!
//! After a cached run (dockerd stopped, its own root still locked) the run measures its root,
//! adds the recorded sizes of the others, and while the total is over the cap empties the least
//! recently used root whose locks it can take *without waiting*: a root somebody holds or waits
//! on the kernel lock of is never touched. Lock files and queue directories stay (a waiter may
//! have them open); the next run of an evicted root starts cold. The accounting lives in
//! `<cache root>/.cachelock-usage.json` (sizes, last use, the last evictions), which
//! `cachelock status --cache-root DIR` shows with who holds what. Everything is reached
//! relative to the cache root's descriptor, following no link (see [`super::root`]).
//!
//! Both front ends lay roots out alike ([`super::root::slot_root`]) and differ in their locks:
//! `cachelock dockerd` locks `<id>` in a lock directory (`<id>.lock/lock[.K]`), the Earthly
//! drop-in `<dind id>/.earthly-docker-lock` (which every slot holder takes shared).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::root::{CacheRoot, SLOTS_DIR};
use crate::error::{Error, Result};
use crate::lock::flock::dir::LockDir;
use crate::lock::now_ms;
use crate::sys::{self, EntryKind, Open};

/// The accounting file under a cache root.
pub const STATE_FILE: &str = ".cachelock-usage.json";
const STATE_LOCK: &str = ".cachelock-usage.lock";
/// Largest accounting file read.
const MAX_STATE_BYTES: usize = 1 << 20;
/// Evictions remembered in the state file.
const EVICTIONS_KEPT: usize = 20;
/// Most cached roots accounted under one cache root.
const MAX_ROOTS: usize = 4096;

/// How cached roots are locked under a cache root.
#[derive(Debug, Clone)]
pub enum Layout {
    /// `cachelock dockerd`: locks in this lock directory.
    Dockerd {
        /// The lock directory the runs use.
        lock_dir: PathBuf,
    },
    /// The drop-in: `<dind id>/.earthly-docker-lock`.
    Earthly,
}

/// What to empty when a unit is evicted (relative to the cache root).
#[derive(Debug, Clone)]
enum Target {
    /// Remove the directory's entries except these names.
    Contents(PathBuf, Vec<&'static str>),
    /// Remove the directory.
    Whole(PathBuf),
}

/// One cached root with its slots: what is measured, locked and emptied together.
#[derive(Debug, Clone)]
struct Unit {
    name: String,
    /// Data roots, relative to the cache root (for the last-use signals and the size).
    roots: Vec<PathBuf>,
    /// Lock files that must all be free (absolute: the lock directory's may be elsewhere).
    locks: Vec<PathBuf>,
    targets: Vec<Target>,
}

/// The sub-directories of `rel` under the cache root (not following links), sorted.
fn subdirs(cache: &CacheRoot, rel: &Path) -> Vec<String> {
    let Ok(Some(dir)) = cache.subdir(rel, false) else {
        return Vec::new();
    };
    let Ok(listing) = sys::list_dir_valid(dir.as_fd(), MAX_ROOTS, 64 * 1024, |_| true) else {
        return Vec::new();
    };
    let mut out: Vec<String> = listing
        .entries
        .into_iter()
        .filter(|(_, k)| *k == EntryKind::Dir)
        .map(|(n, _)| n)
        .collect();
    out.sort();
    out
}

fn units(cache: &CacheRoot, layout: &Layout) -> Vec<Unit> {
    let mut out = Vec::new();
    for name in subdirs(cache, Path::new("")) {
        if name.starts_with('.') {
            continue;
        }
        let slot_dirs: Vec<(u32, PathBuf)> = subdirs(cache, &Path::new(SLOTS_DIR).join(&name))
            .into_iter()
            .filter_map(|k| Some((k.parse::<u32>().ok().filter(|k| *k > 0)?, k)))
            .map(|(k, d)| (k, Path::new(SLOTS_DIR).join(&name).join(d).join("root")))
            .collect();
        let mut roots = vec![PathBuf::from(&name)];
        roots.extend(slot_dirs.iter().map(|(_, d)| d.clone()));
        let whole_slots = Target::Whole(Path::new(SLOTS_DIR).join(&name));
        let unit = match layout {
            Layout::Earthly => {
                let lock = Path::new(&name).join(super::earthly::LOCK_FILE);
                let is_file = info(cache, &lock).is_some_and(|i| i.kind == EntryKind::File);
                if !is_file {
                    // Not a cached root (an uncached root holds only per-run private roots).
                    continue;
                }
                Unit {
                    roots,
                    locks: vec![cache.path().join(lock)],
                    targets: vec![
                        Target::Contents(
                            PathBuf::from(&name),
                            vec![super::earthly::LOCK_FILE, super::earthly::QUEUE_DIR],
                        ),
                        whole_slots,
                    ],
                    name,
                }
            }
            Layout::Dockerd { lock_dir } => {
                if crate::lock::name::validate(&name).is_err() {
                    continue;
                }
                let paths = LockDir::open_existing(lock_dir).paths(&name);
                if !paths.base.is_dir() {
                    // Never locked through this lock directory: not ours to judge.
                    continue;
                }
                let mut locks = vec![paths.slot_file(0)];
                locks.extend(slot_dirs.iter().map(|(k, _)| paths.slot_file(*k)));
                Unit {
                    roots,
                    locks,
                    targets: vec![
                        Target::Contents(PathBuf::from(&name), Vec::new()),
                        whole_slots,
                    ],
                    name,
                }
            }
        };
        out.push(unit);
    }
    out
}

/// What `rel` below the cache root is, reached without following a link anywhere.
fn info(cache: &CacheRoot, rel: &Path) -> Option<sys::FileInfo> {
    let (parent, name) = (rel.parent()?, rel.file_name()?.to_str()?);
    let dir = cache.subdir(parent, false).ok()??;
    sys::info_at(dir.as_fd(), name).ok()
}

/// Modification time (ms) of `rel` below the cache root; 0 if missing.
fn mtime_ms(cache: &CacheRoot, rel: &Path) -> u64 {
    info(cache, rel)
        .map(|i| (i.mtime.max(0) as u64) * 1000 + (i.mtime_nsec.max(0) as u64) / 1_000_000)
        .unwrap_or(0)
}

/// When a root was last used, from what dockerd rewrites during any run (cachelock's or
/// Earthly's own wrapper's): the image store's `repositories.json` (hygiene re-tags every run),
/// `containers/`, `volumes/`, the root itself.
fn last_used_signal(cache: &CacheRoot, roots: &[PathBuf]) -> u64 {
    let mut best = 0;
    for r in roots {
        best = best
            .max(mtime_ms(cache, r))
            .max(mtime_ms(cache, &r.join("containers")))
            .max(mtime_ms(cache, &r.join("volumes")));
        for d in subdirs(cache, &r.join("image")) {
            best = best.max(mtime_ms(
                cache,
                &r.join("image").join(d).join("repositories.json"),
            ));
        }
    }
    best
}

/// One root's accounting.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RootRecord {
    /// Bytes used when measured.
    pub bytes: u64,
    /// When measured (Unix ms).
    pub measured_ms: u64,
    /// Last use seen (Unix ms).
    pub last_used_ms: u64,
    /// Its lock files (for `status`).
    #[serde(default)]
    pub locks: Vec<PathBuf>,
}

/// One eviction.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Eviction {
    /// When (Unix ms).
    pub at_ms: u64,
    /// The root's name.
    pub name: String,
    /// Bytes freed.
    pub bytes: u64,
    /// Its last use (Unix ms).
    pub last_used_ms: u64,
}

/// `<cache root>/.cachelock-usage.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    /// The cap in force at the last accounting.
    pub cap_bytes: Option<u64>,
    /// Roots by name.
    #[serde(default)]
    pub roots: BTreeMap<String, RootRecord>,
    /// The last evictions, oldest first.
    #[serde(default)]
    pub evictions: Vec<Eviction>,
}

/// Reads the state from the cache root open on `dir` (a missing, unreadable or oversized file
/// is an empty state): not following a link, not blocking on a FIFO, at most 1 MiB.
fn read_state_at(dir: BorrowedFd<'_>) -> State {
    sys::open_read_at(dir, STATE_FILE)
        .ok()
        .and_then(|(f, _)| sys::read_bounded(&f, MAX_STATE_BYTES).ok().flatten())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Writes the state: a fresh file with an unpredictable name (`O_EXCL`), renamed over the old
/// one, both relative to the cache root's descriptor.
fn write_state(cache: &CacheRoot, state: &State) -> Result<()> {
    use std::io::Write;
    let path = cache.path().join(STATE_FILE);
    let fail = |e| Error::io(format!("writing {}", path.display()), e);
    let tmp = format!("{STATE_FILE}.{:016x}", sys::unpredictable());
    let mut f = sys::create_new_at(cache.fd(), &tmp, 0o644).map_err(fail)?;
    let written = f
        .write_all(&serde_json::to_vec_pretty(state).unwrap_or_default())
        .and_then(|()| sys::rename_at(cache.fd(), &tmp, cache.fd(), STATE_FILE));
    if written.is_err() {
        let _ = sys::unlink_at(cache.fd(), &tmp);
    }
    written.map_err(fail)
}

/// Takes `<cache root>/.cachelock-usage.lock`, which serialises the writers of the accounting.
fn lock_state(cache: &CacheRoot) -> Result<File> {
    let lock_path = cache.path().join(STATE_LOCK);
    let guard = sys::open_at(cache.fd(), STATE_LOCK, Open::Create(0o644))
        .map_err(|e| Error::io(format!("opening {}", lock_path.display()), e))?;
    sys::flock(&guard, true)
        .map_err(|e| Error::io(format!("locking {}", lock_path.display()), e))?;
    Ok(guard)
}

/// Opens a root's lock file to try it: one under the cache root relative to its descriptor,
/// one in a lock directory as every lock file there is opened (`O_NOFOLLOW|O_NONBLOCK`).
fn open_lock(cache: &CacheRoot, path: &Path, create: bool) -> Option<File> {
    let how = if create {
        Open::Create(0o666)
    } else {
        Open::Existing
    };
    match path.strip_prefix(cache.path()) {
        Ok(rel) => {
            let (parent, name) = (rel.parent()?, rel.file_name()?.to_str()?);
            let dir = cache.subdir(parent, false).ok()??;
            sys::open_at(dir.as_fd(), name, how).ok()
        }
        Err(_) => sys::open_in_shared_dir(path, how).ok(),
    }
}

/// Takes every lock of a unit without waiting; `None` if any is held (or cannot be opened).
fn take_all(cache: &CacheRoot, unit: &Unit) -> Option<Vec<File>> {
    let mut held = Vec::new();
    for (i, p) in unit.locks.iter().enumerate() {
        // A slot lock file that does not exist yet is created, so that a run starting on that
        // slot meanwhile waits for it (the first lock of a unit always exists).
        let f = open_lock(cache, p, i > 0)?;
        if !sys::try_flock(&f, true).unwrap_or(false) {
            return None;
        }
        held.push(f);
    }
    Some(held)
}

fn empty(cache: &CacheRoot, targets: &[Target]) -> Result<()> {
    for t in targets {
        match t {
            Target::Contents(d, keep) => cache.empty(d, keep)?,
            Target::Whole(d) => cache.remove(d)?,
        }
    }
    Ok(())
}

/// What one accounting did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Cached roots counted.
    pub roots: usize,
    /// Total before eviction.
    pub total_before: u64,
    /// Total after eviction.
    pub total_after: u64,
    /// Evicted roots.
    pub evicted: Vec<Eviction>,
    /// Roots over the cap that could not be evicted because they are held.
    pub held_over_cap: Vec<String>,
}

/// Which roots to evict, least recently used first, until `total` fits `cap`: `(name, bytes,
/// last_used_ms, evictable)` candidates; `own` is never chosen.
pub fn choose(
    mut candidates: Vec<(String, u64, u64, bool)>,
    total: u64,
    cap: u64,
    own: &str,
) -> Vec<String> {
    candidates.sort_by_key(|c| (c.2, c.0.clone()));
    let mut total = total;
    let mut out = Vec::new();
    for (name, bytes, _, evictable) in candidates {
        if total <= cap {
            break;
        }
        if name == own || !evictable || bytes == 0 {
            continue;
        }
        total = total.saturating_sub(bytes);
        out.push(name);
    }
    out
}

/// Measures `own` (the caller holds it), accounts every cached root under the cache root, and
/// evicts unheld roots, least recently used first, while the total exceeds `cap`. Serialised
/// with other accountings by a flock on `<cache root>/.cachelock-usage.lock`.
pub fn account_and_evict(
    cache: &CacheRoot,
    layout: &Layout,
    cap: u64,
    own: &str,
) -> Result<Report> {
    let guard = lock_state(cache)?;
    let mut state = read_state_at(cache.fd());
    let now = now_ms();
    let units = units(cache, layout);
    let mut records = BTreeMap::new();
    for u in &units {
        let signal = last_used_signal(cache, &u.roots);
        let old = state.roots.get(&u.name).cloned().unwrap_or_default();
        let last_used = if u.name == own {
            now
        } else {
            signal.max(old.last_used_ms)
        };
        // Re-measure what changed since it was measured (our own root always has).
        let rec = if u.name != own && old.measured_ms > 0 && old.measured_ms >= signal {
            RootRecord {
                last_used_ms: last_used,
                locks: u.locks.clone(),
                ..old
            }
        } else {
            RootRecord {
                bytes: u.roots.iter().map(|r| cache.usage(r)).sum(),
                measured_ms: now,
                last_used_ms: last_used,
                locks: u.locks.clone(),
            }
        };
        records.insert(u.name.clone(), rec);
    }
    let total: u64 = records.values().map(|r| r.bytes).sum();
    let mut report = Report {
        roots: units.len(),
        total_before: total,
        total_after: total,
        ..Report::default()
    };
    if total > cap {
        let candidates = units
            .iter()
            .map(|u| {
                let r = &records[&u.name];
                (u.name.clone(), r.bytes, r.last_used_ms, true)
            })
            .collect();
        let mut left = total;
        for name in choose(candidates, total, cap, own) {
            if left <= cap {
                break;
            }
            let unit = units.iter().find(|u| u.name == name).expect("unit");
            let Some(held) = take_all(cache, unit) else {
                report.held_over_cap.push(name);
                continue;
            };
            let rec = records[&name].clone();
            let result = empty(cache, &unit.targets);
            drop(held);
            if let Err(e) = result {
                tracing::warn!("could not evict cached data root {name}: {e}");
                continue;
            }
            left = left.saturating_sub(rec.bytes);
            let ev = Eviction {
                at_ms: now_ms(),
                name: name.clone(),
                bytes: rec.bytes,
                last_used_ms: rec.last_used_ms,
            };
            records.insert(
                name,
                RootRecord {
                    bytes: 0,
                    measured_ms: now_ms(),
                    ..rec
                },
            );
            report.evicted.push(ev);
        }
        report.total_after = left;
    }
    state.cap_bytes = Some(cap);
    state.roots = records;
    state.evictions.extend(report.evicted.iter().cloned());
    let excess = state.evictions.len().saturating_sub(EVICTIONS_KEPT);
    state.evictions.drain(..excess);
    write_state(cache, &state)?;
    drop(guard);
    Ok(report)
}

/// Accounts the cached roots under the cache root against `cap` and evicts; prints what it
/// evicted and whether held roots keep the total over the cap. Failures are warnings: the
/// command's result stands.
pub fn report(cache: &CacheRoot, layout: &Layout, cap: u64, own: &str) {
    let cache_root = cache.path();
    match account_and_evict(cache, layout, cap, own) {
        Ok(r) => {
            for ev in &r.evicted {
                eprintln!(
                    "cachelock: evicted cached data root {} ({}, last used {:.0} min ago) to keep {} under its cap of {}",
                    cache_root.join(&ev.name).display(),
                    human(ev.bytes),
                    now_ms().saturating_sub(ev.last_used_ms) as f64 / 60_000.0,
                    cache_root.display(),
                    human(cap)
                );
            }
            if r.total_after > cap {
                eprintln!(
                    "cachelock: cached data roots under {} use {} of a {} cap; held roots cannot be evicted ({})",
                    cache_root.display(),
                    human(r.total_after),
                    human(cap),
                    if r.held_over_cap.is_empty() { "only the current run's".to_string() } else { r.held_over_cap.join(", ") }
                );
            }
            tracing::info!(
                "cached data roots under {}: {} root(s), {} (cap {})",
                cache_root.display(),
                r.roots,
                human(r.total_after),
                human(cap)
            );
        }
        Err(e) => tracing::warn!("could not account cached data roots: {e}"),
    }
}

/// Human-readable bytes (KiB, MiB, GiB).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// The (device, inode) pairs `/proc/locks` lists as locked on this host.
fn locked_inodes() -> HashSet<(u32, u32, u64)> {
    lock_holders().into_keys().collect()
}

/// The (device, inode) pairs `/proc/locks` lists as locked on this host, with the pids that
/// took those locks (as this process's pid namespace numbers them).
fn lock_holders() -> HashMap<(u32, u32, u64), Vec<u32>> {
    let text = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let mut out: HashMap<(u32, u32, u64), Vec<u32>> = HashMap::new();
    for l in text.lines() {
        // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; blocked requests ("-> ...")
        // carry one more field before the type and are not holders.
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.get(1) == Some(&"->") {
            continue;
        }
        let parsed = (|| {
            let pid = f.get(4)?.parse::<u32>().ok()?;
            let mut id = f.get(5)?.split(':');
            let maj = u32::from_str_radix(id.next()?, 16).ok()?;
            let min = u32::from_str_radix(id.next()?, 16).ok()?;
            let ino = id.next()?.parse().ok()?;
            Some(((maj, min, ino), pid))
        })();
        if let Some((key, pid)) = parsed {
            let pids = out.entry(key).or_default();
            if !pids.contains(&pid) {
                pids.push(pid);
            }
        }
    }
    out
}

/// The pids on this host that hold any of `locks` (from `/proc/locks`, a look, not a lock).
fn holders_of(locks: &[PathBuf], holders: &HashMap<(u32, u32, u64), Vec<u32>>) -> Vec<u32> {
    let mut pids: Vec<u32> = locks
        .iter()
        .filter_map(|p| sys::info_path(p).ok())
        .filter_map(|i| holders.get(&(libc::major(i.dev), libc::minor(i.dev), i.ino)))
        .flatten()
        .copied()
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Whether any of `locks` is locked by a process on this host (from `/proc/locks`: a look,
/// not a lock, so `status` never gets in a run's way; holders on other hosts are not seen).
pub fn held(locks: &[PathBuf], locked: &HashSet<(u32, u32, u64)>) -> bool {
    locks.iter().any(|p| {
        sys::info_path(p)
            .map(|i| locked.contains(&(libc::major(i.dev), libc::minor(i.dev), i.ino)))
            .unwrap_or(false)
    })
}

/// One root as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RootStatus {
    /// Its name under the cache root.
    pub name: String,
    /// Bytes at the last accounting.
    pub bytes: u64,
    /// Last use (Unix ms).
    pub last_used_ms: u64,
    /// Held by a process on this host now.
    pub held: bool,
}

/// A cache root as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct CacheStatus {
    /// The cache root.
    pub root: PathBuf,
    /// The cap at the last accounting (or configured now).
    pub cap_bytes: Option<u64>,
    /// Sum of the roots' bytes.
    pub total_bytes: u64,
    /// Roots, most recently used first.
    pub roots: Vec<RootStatus>,
    /// The last evictions, oldest first.
    pub evictions: Vec<Eviction>,
}

/// The accounting of `cache_root` as last written, with who holds what now (read without
/// following a link or blocking; nothing is created).
pub fn status(cache_root: &Path, configured_cap: Option<u64>) -> CacheStatus {
    let state = CacheRoot::open_to_read(cache_root)
        .map(|d| read_state_at(d.as_fd()))
        .unwrap_or_default();
    let locked = locked_inodes();
    let mut roots: Vec<RootStatus> = state
        .roots
        .iter()
        .map(|(name, r)| RootStatus {
            name: name.clone(),
            bytes: r.bytes,
            last_used_ms: r.last_used_ms,
            held: held(&r.locks, &locked),
        })
        .collect();
    roots.sort_by_key(|r| std::cmp::Reverse(r.last_used_ms));
    CacheStatus {
        root: cache_root.to_path_buf(),
        cap_bytes: configured_cap.or(state.cap_bytes),
        total_bytes: roots.iter().map(|r| r.bytes).sum(),
        roots,
        evictions: state.evictions,
    }
}

/// One cached data root as `cache ls` and `serve` show it.
#[derive(Debug, Clone, Serialize)]
pub struct CachedRoot {
    /// Its cache id (its name under the cache root).
    pub cache_id: String,
    /// Whose locks guard it: `dockerd` (`cachelock dockerd`, locks in the lock directory) or
    /// `earthly` (the drop-in, `<id>/.earthly-docker-lock`).
    pub layout: &'static str,
    /// Its data roots: slot 0 (the root itself) and the slots beside it.
    pub slots: usize,
    /// Bytes on disk, every slot included, as last measured.
    pub size_bytes: u64,
    /// When that measurement was made (Unix ms).
    pub measured_at_ms: u64,
    /// Its last use (Unix ms), from what dockerd rewrites during a run.
    pub last_used_ms: u64,
    /// Processes on this host that hold one of its locks now (holders on other hosts of a
    /// shared cache root are not seen).
    pub held_by: Vec<u32>,
    /// Whether eviction (and `cache rm`) may take it now: nobody on this host holds it.
    pub evictable: bool,
}

/// Every cached data root under a cache root, most recently used first.
#[derive(Debug, Clone, Serialize)]
pub struct CacheList {
    /// The cache root.
    pub root: PathBuf,
    /// The cap (`dockerd.cache_max_size`) configured, or in force at the last accounting.
    pub cap_bytes: Option<u64>,
    /// Sum of the roots' sizes.
    pub total_bytes: u64,
    /// The roots.
    pub roots: Vec<CachedRoot>,
}

/// The units of both layouts (a root with the drop-in's lock file is the drop-in's).
fn all_units(cache: &CacheRoot, lock_dir: Option<&Path>) -> Vec<(Unit, &'static str)> {
    let mut out: Vec<(Unit, &'static str)> = units(cache, &Layout::Earthly)
        .into_iter()
        .map(|u| (u, "earthly"))
        .collect();
    if let Some(dir) = lock_dir {
        let seen: HashSet<String> = out.iter().map(|(u, _)| u.name.clone()).collect();
        let layout = Layout::Dockerd {
            lock_dir: dir.to_path_buf(),
        };
        out.extend(
            units(cache, &layout)
                .into_iter()
                .filter(|u| !seen.contains(&u.name))
                .map(|u| (u, "dockerd")),
        );
    }
    out
}

/// Lists the cached data roots under `cache` (those of `cachelock dockerd` only when its lock
/// directory `lock_dir` is given). A root is measured again only when it was used after its
/// last measurement in `known` (the accounting file's records, or an earlier list's), which
/// is updated: a walk of a large root is paid once per change, not per look. Changes nothing
/// on disk.
pub fn list(
    cache: &CacheRoot,
    lock_dir: Option<&Path>,
    cap: Option<u64>,
    known: &mut BTreeMap<String, RootRecord>,
) -> CacheList {
    let state = read_state_at(cache.fd());
    for (name, rec) in &state.roots {
        let newer = known
            .get(name)
            .is_none_or(|k| k.measured_ms < rec.measured_ms);
        if newer {
            known.insert(name.clone(), rec.clone());
        }
    }
    let holders = lock_holders();
    let mut roots = Vec::new();
    for (u, layout) in all_units(cache, lock_dir) {
        let signal = last_used_signal(cache, &u.roots);
        let rec = match known.get(&u.name) {
            Some(k) if k.measured_ms > 0 && k.measured_ms >= signal => RootRecord {
                last_used_ms: k.last_used_ms.max(signal),
                ..k.clone()
            },
            _ => RootRecord {
                bytes: u.roots.iter().map(|r| cache.usage(r)).sum(),
                measured_ms: now_ms(),
                last_used_ms: signal.max(known.get(&u.name).map_or(0, |k| k.last_used_ms)),
                locks: u.locks.clone(),
            },
        };
        let held_by = holders_of(&u.locks, &holders);
        roots.push(CachedRoot {
            cache_id: u.name.clone(),
            layout,
            slots: u.roots.len(),
            size_bytes: rec.bytes,
            measured_at_ms: rec.measured_ms,
            last_used_ms: rec.last_used_ms,
            evictable: held_by.is_empty(),
            held_by,
        });
        known.insert(u.name, rec);
    }
    roots.sort_by_key(|r| (std::cmp::Reverse(r.last_used_ms), r.cache_id.clone()));
    CacheList {
        root: cache.path().to_path_buf(),
        cap_bytes: cap.or(state.cap_bytes),
        total_bytes: roots.iter().map(|r| r.size_bytes).sum(),
        roots,
    }
}

/// Removes the cached data root `id` (its data and its slots; lock files and queues stay, so
/// that a waiter keeps its place and the next run starts cold), under its locks taken without
/// waiting: a root anybody holds or waits on the kernel lock of is refused (exit 1). Returns
/// the bytes it held at its last measurement.
pub fn remove(cache: &CacheRoot, lock_dir: Option<&Path>, id: &str) -> Result<u64> {
    let Some((unit, _)) = all_units(cache, lock_dir)
        .into_iter()
        .find(|(u, _)| u.name == id)
    else {
        return Err(Error::new(
            crate::error::Kind::NoInput,
            format!(
                "no cached data root {id} under {}{} (see `cachelock cache ls`)",
                cache.path().display(),
                if lock_dir.is_none() {
                    " of the Earthly drop-in (give --lock-dir for those of `cachelock dockerd`)"
                } else {
                    ""
                }
            ),
        ));
    };
    let Some(held) = take_all(cache, &unit) else {
        let pids = holders_of(&unit.locks, &lock_holders());
        return Err(Error::new(
            crate::error::Kind::Conflict(1),
            format!(
                "cached data root {} is in use{}: not removed (a root is removed only while nobody holds it)",
                cache.path().join(id).display(),
                if pids.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (held by pid {})",
                        pids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
                    )
                }
            ),
        ));
    };
    let result = empty(cache, &unit.targets);
    drop(held);
    result?;
    // The record says 0 bytes, unless an accounting is running: then the next one measures the
    // root again (it changed since it was measured), and `rm` waits on nobody.
    let before = read_state_at(cache.fd())
        .roots
        .get(id)
        .map_or(0, |r| r.bytes);
    if let Ok(guard) = sys::open_at(cache.fd(), STATE_LOCK, Open::Create(0o644)) {
        if sys::try_flock(&guard, true).unwrap_or(false) {
            let mut state = read_state_at(cache.fd());
            if let Some(r) = state.roots.get_mut(id) {
                r.bytes = 0;
                r.measured_ms = now_ms();
                write_state(cache, &state)?;
            }
        }
    }
    Ok(before)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_first_never_own_or_held() {
        let c = |n: &str, b, t, e| (n.to_string(), b, t, e);
        let cands = vec![
            c("new", 100, 30, true),
            c("old", 100, 10, true),
            c("held", 100, 5, false),
            c("own", 100, 1, true),
            c("mid", 100, 20, true),
        ];
        assert_eq!(choose(cands.clone(), 500, 400, "own"), vec!["old"]);
        assert_eq!(choose(cands.clone(), 500, 300, "own"), vec!["old", "mid"]);
        assert_eq!(
            choose(cands.clone(), 500, 0, "own"),
            vec!["old", "mid", "new"]
        );
        assert!(choose(cands, 500, 500, "own").is_empty());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(3 << 20), "3.0 MiB");
        assert_eq!(human(12), "12 B");
    }

    #[test]
    fn earthly_layout_evicts_unheld_and_keeps_lock_files() {
        let t = tempfile::tempdir().unwrap();
        let mk = |name: &str, kib: usize| {
            let d = t.path().join(name);
            std::fs::create_dir_all(d.join("image/overlay2")).unwrap();
            std::fs::write(d.join(super::super::earthly::LOCK_FILE), "").unwrap();
            std::fs::write(d.join("blob"), vec![0u8; kib * 1024]).unwrap();
            d
        };
        let a = mk("cache_a", 64);
        let b = mk("cache_b", 64);
        let own = mk("cache_own", 64);
        // Not a cached root: never counted.
        std::fs::create_dir_all(t.path().join("uncached/cachelock-12345678")).unwrap();
        let held = File::open(a.join(super::super::earthly::LOCK_FILE)).unwrap();
        assert!(crate::sys::try_flock(&held, false).unwrap());
        // A slot root of cache_b: evicted with it.
        let slot = t.path().join(".cachelock-slots/cache_b/1/root");
        std::fs::create_dir_all(&slot).unwrap();
        std::fs::write(slot.join("blob"), vec![0u8; 64 * 1024]).unwrap();
        // A link planted where a root's entry is: removed as a link, never followed.
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("precious"), "x").unwrap();
        std::os::unix::fs::symlink(outside.path(), b.join("link")).unwrap();
        let cache = CacheRoot::open(t.path()).unwrap();
        let r = account_and_evict(&cache, &Layout::Earthly, 1, "cache_own").unwrap();
        assert_eq!(r.roots, 3);
        assert_eq!(
            r.evicted
                .iter()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>(),
            vec!["cache_b"]
        );
        assert_eq!(r.held_over_cap, vec!["cache_a"]);
        assert!(a.join("blob").exists() && own.join("blob").exists());
        assert!(!b.join("blob").exists());
        assert!(b.join(super::super::earthly::LOCK_FILE).exists());
        assert!(!t.path().join(".cachelock-slots/cache_b").exists());
        assert!(outside.path().join("precious").exists());
        let s = status(t.path(), None);
        assert_eq!(s.cap_bytes, Some(1));
        assert_eq!(s.evictions.len(), 1);
        assert!(s.roots.iter().find(|r| r.name == "cache_a").unwrap().held);
        assert!(!s.roots.iter().find(|r| r.name == "cache_b").unwrap().held);
    }

    #[test]
    fn list_shows_who_holds_what_and_remove_takes_only_unheld_roots() {
        let t = tempfile::tempdir().unwrap();
        let mk = |name: &str| {
            let d = t.path().join(name);
            std::fs::create_dir_all(d.join("image/overlay2")).unwrap();
            std::fs::write(d.join(super::super::earthly::LOCK_FILE), "").unwrap();
            std::fs::write(d.join("blob"), vec![0u8; 64 * 1024]).unwrap();
            d
        };
        let busy = mk("cache_busy");
        let idle = mk("cache_idle");
        let held = File::open(busy.join(super::super::earthly::LOCK_FILE)).unwrap();
        assert!(crate::sys::try_flock(&held, true).unwrap());
        let cache = CacheRoot::open_existing(t.path()).unwrap().unwrap();
        let mut known = BTreeMap::new();
        let l = list(&cache, None, Some(1 << 30), &mut known);
        assert_eq!(l.cap_bytes, Some(1 << 30));
        let by = |l: &CacheList, id: &str| l.roots.iter().find(|r| r.cache_id == id).cloned();
        let b = by(&l, "cache_busy").unwrap();
        assert_eq!(b.layout, "earthly");
        assert_eq!(b.held_by, vec![std::process::id()]);
        assert!(!b.evictable);
        let i = by(&l, "cache_idle").unwrap();
        assert!(i.held_by.is_empty() && i.evictable);
        assert!(i.size_bytes >= 64 * 1024, "{i:?}");
        assert_eq!(l.total_bytes, b.size_bytes + i.size_bytes);
        // Unchanged since measured: the next list reuses the measurement.
        let again = list(&cache, None, None, &mut known);
        assert_eq!(
            by(&again, "cache_idle").unwrap().measured_at_ms,
            i.measured_at_ms
        );

        let e = remove(&cache, None, "cache_busy").unwrap_err();
        assert_eq!(e.kind, crate::error::Kind::Conflict(1));
        assert!(e.message.contains(&std::process::id().to_string()), "{e}");
        assert!(busy.join("blob").exists());
        let e = remove(&cache, None, "nosuch").unwrap_err();
        assert_eq!(e.kind, crate::error::Kind::NoInput);

        remove(&cache, None, "cache_idle").unwrap();
        assert!(!idle.join("blob").exists());
        assert!(idle.join(super::super::earthly::LOCK_FILE).exists());
    }
}
