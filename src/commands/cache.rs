//! `cachelock cache ls|rm`: the cached data roots under a cache root (those of `cachelock
//! dockerd`, whose locks are in the lock directory, and those of the Earthly drop-in, whose
//! locks are in the roots), and the removal of one that nobody holds.

use std::collections::BTreeMap;
use std::path::PathBuf;

use cachelock::config::{self, Loaded};
use cachelock::dockerd::root::CacheRoot;
use cachelock::dockerd::usage::{self, CacheList};
use cachelock::error::{Error, Kind, Result};
use cachelock::lock::Store;
use cachelock::output::{escape, rfc3339};

use crate::cli::{CacheAt, CacheCommand};

/// Runs `cachelock cache ...`; returns the exit code.
pub fn execute(cmd: CacheCommand) -> Result<i32> {
    match cmd {
        CacheCommand::Ls { at, json } => {
            let (root, lock_dir, cap) = resolve(&at)?;
            let Some(cache) = CacheRoot::open_existing(&root)? else {
                eprintln!(
                    "cachelock: no cache root at {}: no cached data roots",
                    root.display()
                );
                return Ok(0);
            };
            let list = usage::list(&cache, lock_dir.as_deref(), cap, &mut BTreeMap::new());
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).unwrap_or_default()
                );
            } else {
                print!("{}", render(&list));
            }
            Ok(0)
        }
        CacheCommand::Rm { id, at } => {
            let (root, lock_dir, _) = resolve(&at)?;
            let cache = CacheRoot::open_existing(&root)?.ok_or_else(|| {
                Error::new(
                    Kind::NoInput,
                    format!("no cache root at {}: nothing to remove", root.display()),
                )
            })?;
            let bytes = usage::remove(&cache, lock_dir.as_deref(), &id)?;
            println!(
                "removed cached data root {} ({} at its last measurement); its next run starts cold",
                cache.path().join(&id).display(),
                usage::human(bytes)
            );
            Ok(0)
        }
    }
}

/// The cache root (as `cachelock dockerd` resolves it), the lock directory of its runs (none
/// on etcd: those roots' locks are not files here) and the configured cap.
fn resolve(at: &CacheAt) -> Result<(PathBuf, Option<PathBuf>, Option<u64>)> {
    let loaded = Loaded::load(at.config.as_deref())?;
    let root = at
        .cache_root
        .clone()
        .or_else(|| loaded.config.cache_root.clone())
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_CACHE_ROOT));
    let (store, _) = crate::request::store(None, at.lock_dir.as_deref(), &loaded)?;
    let lock_dir = match store {
        Store::Dir { path, .. } => Some(path),
        Store::Etcd(_) => None,
    };
    Ok((root, lock_dir, loaded.config.dockerd.cache_max_size))
}

/// The table for people.
fn render(list: &CacheList) -> String {
    let mut out = format!(
        "cache root {}: {} root(s), {}{}\n",
        escape(&list.root.display().to_string()),
        list.roots.len(),
        usage::human(list.total_bytes),
        list.cap_bytes
            .map(|c| format!(" of a {} cap", usage::human(c)))
            .unwrap_or_default()
    );
    if list.roots.is_empty() {
        return out;
    }
    out.push_str(&format!(
        "{:<28} {:<8} {:>5} {:>10}  {:<24} {}\n",
        "CACHE ID", "LAYOUT", "SLOTS", "SIZE", "LAST USED", "HELD BY"
    ));
    for r in &list.roots {
        let held = if r.held_by.is_empty() {
            "nobody (evictable)".to_string()
        } else {
            format!(
                "pid {}",
                r.held_by
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        out.push_str(&format!(
            "{:<28} {:<8} {:>5} {:>10}  {:<24} {}\n",
            escape(&r.cache_id),
            r.layout,
            r.slots,
            usage::human(r.size_bytes),
            if r.last_used_ms == 0 {
                "never".to_string()
            } else {
                rfc3339(r.last_used_ms)
            },
            held
        ));
    }
    out
}
