//! The status document (`cachelock status --json`, `serve`'s `/api/v1/locks`) read from a
//! store: every lock (or the ones named), holders and waiters in serving order as each lock's
//! configured policy ranks them. Never takes a lock; only dead tickets are removed. A lock
//! whose policy cannot be loaded is still shown, in the fallback order, with a note.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::config::Loaded;
use crate::error::Result;
use crate::lock::{self, Backend, LockStatus, Store, TicketData};
use crate::output::rfc3339;
use crate::output::status::{
    HolderStatus, LockStatus as LockView, PolicyUse, StatusDoc, TicketStatus, UnreadableStatus,
    WaiterStatus,
};
use crate::policy::Policy;

/// Reads status documents from one store, again and again (`status --watch`, `serve`):
/// policies are loaded once per policy name and kept.
pub struct StatusReader {
    loaded: Loaded,
    backend: Box<dyn Backend>,
    lock_dir_note: Option<String>,
    policies: HashMap<String, Box<dyn Policy>>,
}

impl StatusReader {
    /// A reader of `store` (opened without creating anything) with the configuration
    /// `loaded`; `private_because` says why a lock directory is a private fallback. A reader
    /// that `watches` leaves even dead requests' tickets in place.
    pub fn new(
        loaded: Loaded,
        store: &Store,
        private_because: Option<String>,
        watches: bool,
    ) -> Result<Self> {
        let backend = if watches {
            lock::open_watch_only(store)?
        } else {
            lock::open_existing(store)?
        };
        let lock_dir_note = match (store, private_because) {
            (_, Some(why)) => Some(format!(
                "a private fallback, because {why}: its locks exclude no other user's or root's"
            )),
            (Store::Dir { path, .. }, None) => sharing_note(path),
            (_, None) => None,
        };
        Ok(StatusReader {
            loaded,
            backend,
            lock_dir_note,
            policies: HashMap::new(),
        })
    }

    /// The store.
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// The configuration.
    pub fn loaded(&self) -> &Loaded {
        &self.loaded
    }

    /// The document of `names` (every lock the store knows when `None`). A lock that cannot be
    /// read is shown with the reason when every lock is asked for; a named one fails.
    pub fn read(&mut self, names: Option<&[String]>) -> Result<StatusDoc> {
        let all = names.is_none();
        let names = match names {
            Some(n) => n.to_vec(),
            None => self.backend.lock_names()?,
        };
        let now = lock::now_ms();
        let mut locks = Vec::new();
        // What each bound policy's module is now (a pull may have changed it since the last
        // read): once per policy name and read.
        let mut modules = HashMap::new();
        for name in &names {
            let s = match self.lock(name) {
                Ok(s) => s,
                // One lock's state cannot be read (something planted in it): the others are
                // still shown, this one with the reason.
                Err(e) if all => LockStatus {
                    name: name.clone(),
                    exists: true,
                    generation: 0,
                    holders: Vec::new(),
                    notes: Default::default(),
                    waiters: Vec::new(),
                    order_note: Some(format!("cannot be read: {e}")),
                    unreadable: Vec::new(),
                },
                Err(e) => return Err(e),
            };
            let policy = self.loaded.config.lock_settings(name).policy;
            let loaded = &self.loaded;
            let module = modules
                .entry(policy.clone())
                .or_insert_with(|| crate::policy::module_status(loaded, &policy))
                .clone();
            let mut v = view(s, &policy, now);
            v.policy_module = module;
            locks.push(v);
        }
        Ok(StatusDoc {
            lock_dir: self.backend.describe(),
            lock_dir_note: self.lock_dir_note.clone(),
            version: crate::VERSION,
            time: rfc3339(now),
            locks,
            cache: None,
            now_ms: now,
        })
    }

    /// One lock, ranked by its configured policy.
    fn lock(&mut self, name: &str) -> Result<LockStatus> {
        let settings = self.loaded.config.lock_settings(name);
        if !self.policies.contains_key(&settings.policy) {
            match crate::policy::for_lock(&self.loaded, &settings, None, &[]) {
                Ok(p) => {
                    self.policies.insert(settings.policy.clone(), p);
                }
                Err(e) => {
                    // The binding is broken before loading (e.g. the module file is missing):
                    // show the lock anyway, in the fallback order.
                    let mut s = lock::status(
                        self.backend.as_ref(),
                        name,
                        &mut crate::policy::native::DefaultPolicy,
                    )?;
                    s.order_note = Some(format!("{e}; waiters are shown by priority"));
                    return Ok(s);
                }
            }
        }
        let p = self
            .policies
            .get_mut(&settings.policy)
            .expect("inserted above");
        lock::status(self.backend.as_ref(), name, p.as_mut())
    }
}

/// What `status` says of a lock directory other users cannot write: they cannot lock there
/// (the default directory sends them to private ones).
fn sharing_note(dir: &Path) -> Option<String> {
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

/// The policies the tickets of a lock record, when they are not all the same.
fn policy_uses<'a>(tickets: impl Iterator<Item = &'a TicketData>) -> Vec<PolicyUse> {
    let mut uses: BTreeMap<(Option<String>, Option<String>), usize> = BTreeMap::new();
    for t in tickets {
        *uses
            .entry((t.policy.clone(), t.policy_digest.clone()))
            .or_default() += 1;
    }
    uses.into_iter()
        .map(|((policy, digest), tickets)| PolicyUse {
            policy,
            digest,
            tickets,
        })
        .collect()
}

fn view(s: LockStatus, policy: &str, now: u64) -> LockView {
    let notes = &s.notes;
    let ticket = |t: TicketData| {
        let note = notes.get(t.id()).copied().unwrap_or_default();
        ticket(t, note.lease_left_ms)
    };
    let policies = policy_uses(s.holders.iter().chain(s.waiters.iter().map(|(t, _)| t)));
    LockView {
        name: s.name,
        exists: s.exists,
        generation: s.generation,
        policy: policy.to_string(),
        policy_module: None,
        note: s.order_note,
        mixed_policies: policies.len() > 1,
        policies,
        holders: s
            .holders
            .into_iter()
            .map(|t| HolderStatus {
                held_for_ms: t.acquired_at_ms.map(|a| now.saturating_sub(a)).unwrap_or(0),
                acquired_at: t.acquired_at_ms.map(rfc3339),
                acquired_at_ms: t.acquired_at_ms,
                slot: t.slot.unwrap_or(0),
                generation: t.generation,
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
                enqueued_at: rfc3339(t.request().enqueued_at_ms),
                enqueued_at_ms: t.request().enqueued_at_ms,
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
        version: t.version,
        policy: t.policy,
        policy_digest: t.policy_digest,
    }
}
