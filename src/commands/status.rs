//! `cachelock status`: holders and waiters of every lock (or one), waiters in serving order as
//! ranked by each lock's configured policy. Never takes a lock; only dead tickets are removed.

use std::path::Path;

use crate::cli::StatusArgs;
use crate::config::Loaded;
use crate::error::{Error, Result};
use crate::lock::{self, engine::now_ms, meta, queue};
use crate::output::status::{
    render_json, render_text, HolderStatus, LockStatus, StatusDoc, WaiterStatus,
};

/// Runs `cachelock status`; returns the exit code.
pub fn execute(args: StatusArgs) -> Result<i32> {
    if let Some(n) = &args.name {
        lock::name::validate(n)?;
    }
    let loaded = Loaded::load(args.config.as_deref())?;
    let root = lock::resolve_root(args.lock_dir.as_deref(), &loaded);
    let mut doc = collect(&root, args.name.as_deref(), &loaded)?;
    if let Some(cache_root) = &args.cache_root {
        doc.cache = Some(crate::dockerd::usage::status(
            cache_root,
            loaded.config.dockerd.cache_max_size,
        ));
    }
    if args.json {
        print!("{}", render_json(&doc));
    } else {
        print!("{}", render_text(&doc));
    }
    Ok(0)
}

/// Builds the status document for the locks under `root` (all, or `only`), without creating
/// anything: a missing lock directory has no locks.
pub fn collect(root: &Path, only: Option<&str>, loaded: &Loaded) -> Result<StatusDoc> {
    let mut names: Vec<String> = match only {
        Some(n) => vec![n.to_string()],
        None => match std::fs::read_dir(root) {
            Ok(rd) => rd
                .flatten()
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_suffix(".lock"))
                        .filter(|n| lock::name::validate(n).is_ok())
                        .map(str::to_string)
                })
                .collect(),
            Err(_) => Vec::new(),
        },
    };
    names.sort();
    let mut locks = Vec::new();
    for name in names {
        locks.push(one(root, &name, loaded)?);
    }
    Ok(StatusDoc { locks, cache: None })
}

fn one(root: &Path, name: &str, loaded: &Loaded) -> Result<LockStatus> {
    // Paths only: nothing is created for a lock that does not exist.
    let dir = lock::dir::LockDir::open_existing(root);
    let paths = dir.paths(name);
    let now = now_ms();
    let snap = if paths.queue.is_dir() {
        queue::scan(&paths, None)
            .map_err(|e| Error::io(format!("cannot read {}", paths.queue.display()), e))?
    } else {
        queue::Snapshot::default()
    };
    let settings = loaded.config.lock_settings(name);
    let mut policy = crate::policy::for_lock(loaded, &settings, None, &[])?;
    let ranked = if snap.waiters.is_empty() {
        Vec::new()
    } else {
        queue::rank_all(snap.waiters, policy.as_mut(), now)?
    };
    let holders = snap
        .holders
        .into_iter()
        .map(|t| HolderStatus {
            held_for_ms: t.acquired_at_ms.map(|a| now.saturating_sub(a)).unwrap_or(0),
            slot: t.slot.unwrap_or(0),
            ticket: t.into(),
        })
        .collect();
    let waiters = ranked
        .into_iter()
        .enumerate()
        .map(|(i, (t, rank))| WaiterStatus {
            position: i + 1,
            waited_ms: now.saturating_sub(t.enqueued_at_ms),
            ticket: t.into(),
            rank,
        })
        .collect();
    Ok(LockStatus {
        name: name.to_string(),
        generation: meta::read(&paths).generation,
        holders,
        waiters,
    })
}
