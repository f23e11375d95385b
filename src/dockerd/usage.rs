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
//! `cachelock status --cache-root DIR` shows with who holds what.
//!
//! Two layouts share the code: `cachelock dockerd` (`<cache root>/<id>` and `<id>/slot-K`, locked
//! by the lock directory's `<id>.lock/lock[.K]`) and the Earthly drop-in (`<parent>/<dind id>`
//! with `.earthly-docker-lock`, plus slot roots under `<parent>/.cachelock-slots/<dind id>/`).

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lock::flock::dir::LockDir;
use crate::lock::now_ms;
use crate::sys::{self, Open};

/// The accounting file under a cache root.
pub const STATE_FILE: &str = ".cachelock-usage.json";
const STATE_LOCK: &str = ".cachelock-usage.lock";
/// Where the drop-in keeps the extra slot roots of a cached root (outside it: see
/// [`earthly_slot_root`]).
pub const SLOTS_DIR: &str = ".cachelock-slots";
/// Evictions remembered in the state file.
const EVICTIONS_KEPT: usize = 20;

/// How cached roots are laid out and locked under a cache root.
#[derive(Debug, Clone)]
pub enum Layout {
    /// `cachelock dockerd`: `<cache root>/<id>[/slot-K]`, locks in this lock directory.
    Dockerd {
        /// The lock directory the runs use.
        lock_dir: PathBuf,
    },
    /// The drop-in: `<parent>/<dind id>` with `.earthly-docker-lock` in it.
    Earthly,
}

/// The data root of slot `k` of an Earthly cached root: slot 0 is the root itself (the warm
/// root Earthly's own wrapper uses); slot K is `<parent>/.cachelock-slots/<name>/<K>/root`. Not
/// inside the root and not a sibling sharing its name as a prefix: dockerd's mount clean-up
/// unmounts `overlay2/<id>/merged` under any path that *starts with* its data root's text.
pub fn earthly_slot_root(data_root: &Path, k: u32) -> PathBuf {
    if k == 0 {
        return data_root.to_path_buf();
    }
    let parent = data_root.parent().unwrap_or(Path::new("/"));
    let name = data_root.file_name().unwrap_or_default();
    parent
        .join(SLOTS_DIR)
        .join(name)
        .join(k.to_string())
        .join("root")
}

/// What to empty when a unit is evicted.
#[derive(Debug, Clone)]
enum Target {
    /// Remove the directory's entries except these names.
    Contents(PathBuf, Vec<String>),
    /// Remove the directory.
    Whole(PathBuf),
}

/// One cached root with its slots: what is measured, locked and emptied together.
#[derive(Debug, Clone)]
struct Unit {
    name: String,
    /// Data roots (for the last-use signals).
    roots: Vec<PathBuf>,
    /// Lock files that must all be free.
    locks: Vec<PathBuf>,
    targets: Vec<Target>,
}

fn subdirs(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .filter_map(|e| Some((e.file_name().to_str()?.to_string(), e.path())))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn units(cache_root: &Path, layout: &Layout) -> Vec<Unit> {
    let mut out = Vec::new();
    for (name, dir) in subdirs(cache_root) {
        if name.starts_with('.') {
            continue;
        }
        match layout {
            Layout::Earthly => {
                let lock = dir.join(super::earthly::LOCK_FILE);
                if !lock.is_file() {
                    // Not a cached root (an uncached root holds only per-run private roots).
                    continue;
                }
                let slots = cache_root.join(SLOTS_DIR).join(&name);
                let mut roots = vec![dir.clone()];
                roots.extend(subdirs(&slots).into_iter().map(|(_, d)| d.join("root")));
                out.push(Unit {
                    name,
                    roots,
                    locks: vec![lock],
                    targets: vec![
                        Target::Contents(
                            dir,
                            vec![
                                super::earthly::LOCK_FILE.to_string(),
                                super::earthly::QUEUE_DIR.to_string(),
                            ],
                        ),
                        Target::Whole(slots),
                    ],
                });
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
                let slot_dirs: Vec<(u32, PathBuf)> = subdirs(&dir)
                    .into_iter()
                    .filter_map(|(n, d)| Some((n.strip_prefix("slot-")?.parse().ok()?, d)))
                    .filter(|(k, _)| *k > 0)
                    .collect();
                let mut roots = vec![dir.clone(), dir.join("slot-0")];
                let mut locks = vec![paths.slot_file(0)];
                let mut targets = vec![Target::Contents(
                    dir.clone(),
                    slot_dirs.iter().map(|(k, _)| format!("slot-{k}")).collect(),
                )];
                for (k, d) in slot_dirs {
                    roots.push(d.clone());
                    locks.push(paths.slot_file(k));
                    targets.push(Target::Whole(d));
                }
                out.push(Unit {
                    name,
                    roots,
                    locks,
                    targets,
                });
            }
        }
    }
    out
}

fn mtime_ms(p: &Path) -> u64 {
    std::fs::metadata(p)
        .map(|m| (m.mtime().max(0) as u64) * 1000 + (m.mtime_nsec().max(0) as u64) / 1_000_000)
        .unwrap_or(0)
}

/// When a root was last used, from what dockerd rewrites during any run (cachelock's or
/// Earthly's own wrapper's): the image store's `repositories.json` (hygiene re-tags every run),
/// `containers/`, `volumes/`, the root itself.
fn last_used_signal(roots: &[PathBuf]) -> u64 {
    let mut best = 0;
    for r in roots {
        best = best
            .max(mtime_ms(r))
            .max(mtime_ms(&r.join("containers")))
            .max(mtime_ms(&r.join("volumes")));
        for (_, d) in subdirs(&r.join("image")) {
            best = best.max(mtime_ms(&d.join("repositories.json")));
        }
    }
    best
}

/// Disk usage of `path` (allocated blocks; each hard-linked inode once; other filesystems not
/// entered).
pub fn disk_usage(path: &Path) -> u64 {
    let Ok(top) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let dev = top.dev();
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut total = top.blocks() * 512;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.dev() != dev {
                continue;
            }
            if m.nlink() > 1 && !m.is_dir() && !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            total += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
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

/// Reads the state (a missing or unreadable file is an empty state); reads at most 1 MiB.
pub fn read_state(cache_root: &Path) -> State {
    use std::io::Read;
    let mut text = String::new();
    if let Ok(f) = File::open(cache_root.join(STATE_FILE)) {
        let _ = f.take(1 << 20).read_to_string(&mut text);
    }
    serde_json::from_str(&text).unwrap_or_default()
}

fn write_state(cache_root: &Path, state: &State) -> Result<()> {
    let tmp = cache_root.join(format!("{STATE_FILE}.{}", std::process::id()));
    let path = cache_root.join(STATE_FILE);
    std::fs::write(&tmp, serde_json::to_vec_pretty(state).unwrap_or_default())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

fn open_lock(path: &Path, create: bool) -> Option<File> {
    let how = if create {
        Open::Create(0o666)
    } else {
        Open::Existing
    };
    sys::open_in_shared_dir(path, how).ok()
}

/// Takes every lock of a unit without waiting; `None` if any is held (or cannot be opened).
fn take_all(unit: &Unit) -> Option<Vec<File>> {
    let mut held = Vec::new();
    for (i, p) in unit.locks.iter().enumerate() {
        // A slot lock file that does not exist yet is created, so that a run starting on that
        // slot meanwhile waits for it (the first lock of a unit always exists).
        let f = open_lock(p, i > 0)?;
        if !sys::try_flock(&f, true).unwrap_or(false) {
            return None;
        }
        held.push(f);
    }
    Some(held)
}

fn empty(targets: &[Target]) -> std::io::Result<()> {
    for t in targets {
        match t {
            Target::Contents(d, keep) => {
                let keep: Vec<&str> = keep.iter().map(String::as_str).collect();
                super::root::wipe_contents(d, &keep)?
            }
            Target::Whole(d) => super::root::wipe(d)?,
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

/// Measures `own` (the caller holds it), accounts every cached root under `cache_root`, and
/// evicts unheld roots, least recently used first, while the total exceeds `cap`. Serialised
/// with other accountings by a flock on `<cache root>/.cachelock-usage.lock`.
pub fn account_and_evict(
    cache_root: &Path,
    layout: &Layout,
    cap: u64,
    own: &str,
) -> Result<Report> {
    let lock_path = cache_root.join(STATE_LOCK);
    let guard = open_lock(&lock_path, true).ok_or_else(|| {
        Error::io(
            format!("opening {}", lock_path.display()),
            std::io::Error::last_os_error(),
        )
    })?;
    sys::flock(&guard, true)
        .map_err(|e| Error::io(format!("locking {}", lock_path.display()), e))?;
    let mut state = read_state(cache_root);
    let now = now_ms();
    let units = units(cache_root, layout);
    let mut records = BTreeMap::new();
    for u in &units {
        let signal = last_used_signal(&u.roots);
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
            let bytes = u
                .roots
                .iter()
                .filter(|r| u.roots.iter().all(|o| o == *r || !r.starts_with(o)))
                .map(|r| disk_usage(r))
                .sum();
            RootRecord {
                bytes,
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
            let Some(held) = take_all(unit) else {
                report.held_over_cap.push(name);
                continue;
            };
            let rec = records[&name].clone();
            let result = empty(&unit.targets);
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
    write_state(cache_root, &state)?;
    drop(guard);
    Ok(report)
}

/// Accounts the cached roots under `cache_root` against `cap` and evicts; prints what it
/// evicted and whether held roots keep the total over the cap. Failures are warnings: the
/// command's result stands.
pub fn report(cache_root: &Path, layout: &Layout, cap: u64, own: &str) {
    match account_and_evict(cache_root, layout, cap, own) {
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
    let text = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; blocked requests ("-> ...")
            // carry one more field before the type and are not holders.
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.get(1) == Some(&"->") {
                return None;
            }
            let mut id = f.get(5)?.split(':');
            let maj = u32::from_str_radix(id.next()?, 16).ok()?;
            let min = u32::from_str_radix(id.next()?, 16).ok()?;
            let ino = id.next()?.parse().ok()?;
            Some((maj, min, ino))
        })
        .collect()
}

/// Whether any of `locks` is locked by a process on this host (from `/proc/locks`: a look,
/// not a lock, so `status` never gets in a run's way; holders on other hosts are not seen).
pub fn held(locks: &[PathBuf], locked: &HashSet<(u32, u32, u64)>) -> bool {
    locks.iter().any(|p| {
        std::fs::metadata(p)
            .map(|m| {
                let dev = m.dev();
                locked.contains(&(libc::major(dev), libc::minor(dev), m.ino()))
            })
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

/// The accounting of `cache_root` as last written, with who holds what now.
pub fn status(cache_root: &Path, configured_cap: Option<u64>) -> CacheStatus {
    let state = read_state(cache_root);
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
    fn slot_roots_are_never_prefixed_by_another_root() {
        let r = Path::new("/var/earthly/dind/cache_x");
        assert_eq!(earthly_slot_root(r, 0), r);
        let s1 = earthly_slot_root(r, 1);
        let s10 = earthly_slot_root(r, 10);
        assert_eq!(
            s1,
            Path::new("/var/earthly/dind/.cachelock-slots/cache_x/1/root")
        );
        for (a, b) in [(r, &s1), (&s1, &s10), (&s10, &s1)] {
            assert!(
                !b.to_str().unwrap().starts_with(a.to_str().unwrap()),
                "{a:?} prefixes {b:?}"
            );
        }
    }

    #[test]
    fn disk_usage_counts_blocks_and_hard_links_once() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("a/b")).unwrap();
        std::fs::write(t.path().join("a/b/f"), vec![1u8; 64 * 1024]).unwrap();
        std::fs::hard_link(t.path().join("a/b/f"), t.path().join("a/g")).unwrap();
        let n = disk_usage(t.path());
        assert!((64 * 1024..2 * 64 * 1024).contains(&n), "{n}");
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
        let r = account_and_evict(t.path(), &Layout::Earthly, 1, "cache_own").unwrap();
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
        let s = status(t.path(), None);
        assert_eq!(s.cap_bytes, Some(1));
        assert_eq!(s.evictions.len(), 1);
        assert!(s.roots.iter().find(|r| r.name == "cache_a").unwrap().held);
        assert!(!s.roots.iter().find(|r| r.name == "cache_b").unwrap().held);
    }
}
