//! `cachelock status`: holders and waiters of every lock (or one), waiters in serving order as
//! ranked by each lock's configured policy. Never takes a lock; only dead tickets are removed.
//! A lock whose policy cannot be loaded is still shown, in the fallback order, with a note.

use cachelock::config::Loaded;
use cachelock::error::Result;
use cachelock::lock::{self, LockStatus, Store, TicketData};
use cachelock::output::status::{
    render_json, render_text, HolderStatus, LockStatus as LockView, StatusDoc, TicketStatus,
    UnreadableStatus, WaiterStatus,
};

use crate::cli::StatusArgs;

/// Runs `cachelock status`; returns the exit code.
pub fn execute(args: StatusArgs) -> Result<i32> {
    if let Some(n) = &args.name {
        lock::name::validate(n)?;
    }
    let loaded = Loaded::load(args.config.as_deref())?;
    let (store, private_because) =
        crate::request::store(args.backend.as_deref(), args.lock_dir.as_deref(), &loaded)?;
    let backend = lock::open_existing(&store)?;
    let lock_dir_note = match (&store, private_because) {
        (_, Some(why)) => Some(format!(
            "a private fallback, because {why}: its locks exclude no other user's or root's"
        )),
        (Store::Dir { path, .. }, None) => sharing_note(path),
        (_, None) => None,
    };
    let names = match &args.name {
        Some(n) => vec![n.clone()],
        None => backend.lock_names()?,
    };
    let now = lock::now_ms();
    let mut locks = Vec::new();
    let mut modules = std::collections::BTreeMap::new();
    for name in names {
        let settings = loaded.config.lock_settings(&name);
        let mut policy = cachelock::policy::for_lock(&loaded, &settings, None, &[]);
        let status = match policy.as_mut() {
            Ok(p) => lock::status(backend.as_ref(), &name, p.as_mut()),
            Err(e) => {
                // The binding is broken before loading (e.g. the module file is missing):
                // show the lock anyway, in the fallback order.
                lock::status(
                    backend.as_ref(),
                    &name,
                    &mut cachelock::policy::native::DefaultPolicy,
                )
                .map(|mut s| {
                    s.order_note = Some(format!("{e}; waiters are shown by priority"));
                    s
                })
            }
        };
        let status = match status {
            Ok(s) => s,
            // One lock's state cannot be read (something planted in it): the others are still
            // shown, this one with the reason.
            Err(e) if args.name.is_none() => LockStatus {
                name: name.clone(),
                generation: 0,
                holders: Vec::new(),
                notes: Default::default(),
                waiters: Vec::new(),
                order_note: Some(format!("cannot be read: {e}")),
                unreadable: Vec::new(),
            },
            Err(e) => return Err(e),
        };
        let module = modules
            .entry(settings.policy.clone())
            .or_insert_with(|| cachelock::policy::module_status(&loaded, &settings.policy))
            .clone();
        let mut v = view(status, &settings.policy, now);
        v.policy_module = module;
        locks.push(v);
    }
    let cache = args.cache_root.as_ref().map(|cache_root| {
        cachelock::dockerd::usage::status(cache_root, loaded.config.dockerd.cache_max_size)
    });
    let doc = StatusDoc {
        lock_dir: backend.describe(),
        lock_dir_note,
        locks,
        cache,
        now_ms: now,
    };
    if args.json {
        print!("{}", render_json(&doc));
    } else {
        print!("{}", render_text(&doc));
    }
    Ok(0)
}

/// What `status` says of a lock directory other users cannot write: they cannot lock there
/// (the default directory sends them to private ones).
fn sharing_note(dir: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir).ok()?;
    let mode = m.mode() & 0o7777;
    (mode & 0o002 == 0).then(|| {
        format!(
            "mode {mode:04o}, owner uid {}: only its owner{} can take locks here (other users' default is a private directory)",
            m.uid(),
            if mode & 0o020 != 0 { " and group" } else { "" }
        )
    })
}

fn view(s: LockStatus, policy: &str, now: u64) -> LockView {
    let notes = &s.notes;
    let ticket = |t: TicketData| {
        let note = notes.get(t.id()).copied().unwrap_or_default();
        ticket(t, note.lease_left_ms)
    };
    LockView {
        name: s.name,
        generation: s.generation,
        policy: policy.to_string(),
        policy_module: None,
        note: s.order_note,
        holders: s
            .holders
            .into_iter()
            .map(|t| HolderStatus {
                held_for_ms: t.acquired_at_ms.map(|a| now.saturating_sub(a)).unwrap_or(0),
                slot: t.slot.unwrap_or(0),
                revision: notes.get(t.id()).and_then(|n| n.revision),
                ticket: ticket(t),
            })
            .collect(),
        waiters: s
            .waiters
            .into_iter()
            .enumerate()
            .map(|(i, (t, rank))| WaiterStatus {
                position: i + 1,
                waited_ms: now.saturating_sub(t.request().enqueued_at_ms),
                ticket: ticket(t),
                rank,
            })
            .collect(),
        unreadable: s
            .unreadable
            .into_iter()
            .map(|u| UnreadableStatus {
                ticket: u.ticket,
                owner_uid: u.owner_uid,
                reason: u.reason,
            })
            .collect(),
    }
}

fn ticket(t: TicketData, lease_left_ms: Option<u64>) -> TicketStatus {
    let r = t.ticket.request;
    TicketStatus {
        ticket: t.ticket.id,
        host: r.host,
        pid: r.pid,
        uid: t.uid,
        mode: r.mode,
        priority: r.priority,
        labels: r.labels.into_iter().collect(),
        queue_key: t.queue_key,
        lease_left_ms,
    }
}
