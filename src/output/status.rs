//! Rendering of `cachelock status`: text for people, a stable JSON document for scripts.
//!
//! JSON: `{"lock_dir","lock_dir_note","version","time","locks":[{"name","exists","generation",
//! "policy","policy_module","note","mixed_policies","policies":[{policy,digest,tickets}],
//! "holders":[{ticket,host,pid,uid,mode,priority,labels,queue_key,version,policy,policy_digest,
//! slot,generation,held_for_ms,acquired_at,acquired_at_ms}],
//! "waiters":[{position,ticket,...,rank,waited_ms,enqueued_at,enqueued_at_ms}],
//! "unreadable":[{ticket,owner_uid,reason}]}]}`; `labels` is an object, waiters are in serving
//! order, `note` is null unless the order is not the policy's (e.g. its module is missing),
//! `lock_dir_note` is null unless other users cannot share the directory (a private fallback).
//! `version` is the reader's cachelock, `time` when the document was made; `*_at` are RFC 3339
//! UTC times beside the `*_ms` Unix milliseconds. `policy` is the policy the *reader's*
//! configuration binds to the lock; `policies` lists what the tickets themselves recorded
//! (their owners' policies and module digests), and `mixed_policies` says they differ. `uid`
//! is the ticket file's owner, the one field a user cannot forge (host and pid are the
//! ticket's own claims).
//! `policy_module` is `{module, digest, sha256, verified_by, resolved_at_ms}`: the module as
//! configured and what a run loads now (for an `oci://` module the manifest digest of its last
//! good resolution, null until pulled). Over etcd, tickets also carry `lease_left_ms` and holders `revision`
//! (the holder key's create revision), and `lock_dir` is the store's URL. Text escapes control
//! characters in everything other users wrote (tickets, labels, hosts, keys, reasons).

use std::collections::BTreeMap;

use serde::Serialize;

use super::escape;
use crate::policy::Mode;

/// The whole document.
#[derive(Debug, Clone, Serialize)]
pub struct StatusDoc {
    /// The lock directory read.
    pub lock_dir: String,
    /// Who can (not) share it: a private fallback, or a mode that keeps other users out.
    pub lock_dir_note: Option<String>,
    /// The reader's cachelock version.
    pub version: &'static str,
    /// When the document was made (RFC 3339, UTC).
    pub time: String,
    /// One entry per lock, by name.
    pub locks: Vec<LockStatus>,
    /// Cached data roots under `--cache-root`, when asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<crate::dockerd::usage::CacheStatus>,
    /// When the document was made (Unix ms), for "last used ... ago".
    #[serde(skip)]
    pub now_ms: u64,
}

/// A live ticket that cannot be read: ignored by waiters, shown so that it cannot hide.
#[derive(Debug, Clone, Serialize)]
pub struct UnreadableStatus {
    /// Its name in the queue.
    pub ticket: String,
    /// The user owning it.
    pub owner_uid: Option<u32>,
    /// What is wrong with it.
    pub reason: String,
}

/// One lock.
#[derive(Debug, Clone, Serialize)]
pub struct LockStatus {
    /// Lock name.
    pub name: String,
    /// Whether the store has the lock at all (somebody used it).
    pub exists: bool,
    /// Acquisitions so far.
    pub generation: u64,
    /// The policy the reader's configuration binds to the lock (it ranks the waiters shown).
    pub policy: String,
    /// Its module and the digest a run loads now (for `oci://`: the manifest digest, the
    /// component's sha256, the key that verified it).
    pub policy_module: Option<crate::policy::ModuleStatus>,
    /// Why the order shown is not the policy's (the policy cannot be loaded or faulted).
    pub note: Option<String>,
    /// Whether the tickets record different policies (or module digests).
    pub mixed_policies: bool,
    /// The policies the tickets record, with how many tickets each.
    pub policies: Vec<PolicyUse>,
    /// Current holders.
    pub holders: Vec<HolderStatus>,
    /// Waiters in the order they will be served.
    pub waiters: Vec<WaiterStatus>,
    /// Live tickets that cannot be read.
    pub unreadable: Vec<UnreadableStatus>,
}

/// A policy some tickets of a lock record.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyUse {
    /// The policy's name in its owners' configuration (none: an older cachelock).
    pub policy: Option<String>,
    /// `sha256:<hex>` of its module, where its owners knew it.
    pub digest: Option<String>,
    /// How many tickets.
    pub tickets: usize,
}

/// What status shows of any ticket, holder or waiter (flattened into both in JSON).
#[derive(Debug, Clone, Serialize)]
pub struct TicketStatus {
    /// Ticket id.
    pub ticket: String,
    /// Owner's host (for people; liveness never depends on it).
    pub host: String,
    /// Owner's pid on that host.
    pub pid: u32,
    /// The user owning the ticket (the file's owner: not the ticket's own claim).
    pub uid: Option<u32>,
    /// Exclusive or shared.
    pub mode: Mode,
    /// `--priority`.
    pub priority: i32,
    /// `--label`s (a repeated key shows its last value).
    pub labels: BTreeMap<String, String>,
    /// `--queue-key`, if any.
    pub queue_key: Option<String>,
    /// Time left on the owner's lease (etcd only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_left_ms: Option<u64>,
    /// The owner's cachelock version (none: before versions were recorded).
    pub version: Option<String>,
    /// The owner's policy.
    pub policy: Option<String>,
    /// Its module's digest, where the owner knew it.
    pub policy_digest: Option<String>,
}

/// A holder.
#[derive(Debug, Clone, Serialize)]
pub struct HolderStatus {
    /// The holder's ticket.
    #[serde(flatten)]
    pub ticket: TicketStatus,
    /// Slot held (0 for a one-slot lock).
    pub slot: u32,
    /// The acquisition's generation (fencing token).
    pub generation: Option<u64>,
    /// Milliseconds since it took the lock.
    pub held_for_ms: u64,
    /// When it took the lock (RFC 3339, UTC).
    pub acquired_at: Option<String>,
    /// The same, in Unix milliseconds.
    pub acquired_at_ms: Option<u64>,
    /// The store's revision of the grant (etcd: the holder key's create revision).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
}

/// A waiter.
#[derive(Debug, Clone, Serialize)]
pub struct WaiterStatus {
    /// 1 = next to be served.
    pub position: usize,
    /// The waiter's ticket.
    #[serde(flatten)]
    pub ticket: TicketStatus,
    /// Rank under the lock's configured policy.
    pub rank: i64,
    /// Milliseconds since its (possibly remembered) arrival.
    pub waited_ms: u64,
    /// Its arrival (RFC 3339, UTC).
    pub enqueued_at: String,
    /// The same, in Unix milliseconds.
    pub enqueued_at_ms: u64,
}

fn mode_str(m: Mode) -> &'static str {
    match m {
        Mode::Exclusive => "exclusive",
        Mode::Shared => "shared",
    }
}

/// `(head, tail)` of a ticket's text line: what goes before and after the role-specific part.
fn ticket_text(t: &TicketStatus) -> (String, String) {
    let uid = t.uid.map(|u| format!(" uid {u}")).unwrap_or_default();
    let head = format!(
        "ticket {}  {}:{}{uid}  {}  priority {}",
        escape(&t.ticket),
        escape(&t.host),
        t.pid,
        mode_str(t.mode),
        t.priority
    );
    let mut tail = String::new();
    if !t.labels.is_empty() {
        let parts: Vec<String> = t
            .labels
            .iter()
            .map(|(k, v)| format!("{}={}", escape(k), escape(v)))
            .collect();
        tail.push_str(&format!("  labels {}", parts.join(",")));
    }
    if let Some(k) = &t.queue_key {
        tail.push_str(&format!("  key {}", escape(k)));
    }
    if let Some(ms) = t.lease_left_ms {
        tail.push_str(&format!("  lease {:.1}s left", ms as f64 / 1000.0));
    }
    (head, tail)
}

/// Text for people.
pub fn render_text(doc: &StatusDoc) -> String {
    let mut out = String::new();
    if let Some(n) = &doc.lock_dir_note {
        out.push_str(&format!(
            "lock directory {}\n  note: {}\n",
            escape(&doc.lock_dir),
            escape(n)
        ));
    }
    if doc.locks.is_empty() {
        out.push_str("no locks\n");
    }
    for l in &doc.locks {
        if !l.exists {
            out.push_str(&format!(
                "lock {}: no such lock in {} (nobody has used it)\n",
                l.name,
                escape(&doc.lock_dir)
            ));
            continue;
        }
        out.push_str(&format!("lock {} (generation {})\n", l.name, l.generation));
        if let Some(n) = &l.note {
            out.push_str(&format!("  note: {}\n", escape(n)));
        }
        if l.mixed_policies {
            let parts: Vec<String> = l
                .policies
                .iter()
                .map(|p| {
                    format!(
                        "{} ({}) x{}",
                        escape(p.policy.as_deref().unwrap_or("unrecorded")),
                        p.digest
                            .as_deref()
                            .map(short_digest)
                            .unwrap_or_else(|| "digest unknown".into()),
                        p.tickets
                    )
                })
                .collect();
            out.push_str(&format!(
                "  note: its requests run different policies: {}; each ranks the queue its own way (which can reorder it, never break exclusion)\n",
                parts.join(", ")
            ));
        }
        if l.holders.is_empty() {
            out.push_str("  held by: nobody\n");
        }
        for h in &l.holders {
            let (head, tail) = ticket_text(&h.ticket);
            let rev = h
                .revision
                .map(|r| format!("  revision {r}"))
                .unwrap_or_default();
            out.push_str(&format!(
                "  held by: {head}  slot {}  for {:.1}s{}{rev}{tail}\n",
                h.slot,
                h.held_for_ms as f64 / 1000.0,
                h.acquired_at
                    .as_deref()
                    .map(|a| format!(" (since {a})"))
                    .unwrap_or_default(),
            ));
        }
        if l.waiters.is_empty() {
            out.push_str("  waiting: nobody\n");
        } else {
            out.push_str("  waiting (in serving order):\n");
        }
        for w in &l.waiters {
            let (head, tail) = ticket_text(&w.ticket);
            out.push_str(&format!(
                "    {}. {head}  rank {}  waited {:.1}s (since {}){tail}\n",
                w.position,
                w.rank,
                w.waited_ms as f64 / 1000.0,
                w.enqueued_at,
            ));
        }
        for u in &l.unreadable {
            let owner = u
                .owner_uid
                .map(|uid| format!(" (owner uid {uid})"))
                .unwrap_or_default();
            // A ticket, or a part of the lock's state that could not be read in full.
            if u.ticket.bytes().all(|b| b.is_ascii_digit()) {
                out.push_str(&format!(
                    "  unreadable ticket {}{owner}: {}; ignored by waiters\n",
                    escape(&u.ticket),
                    escape(&u.reason)
                ));
            } else {
                out.push_str(&format!(
                    "  not read in full: {}{owner}: {}\n",
                    escape(&u.ticket),
                    escape(&u.reason)
                ));
            }
        }
    }
    if let Some(c) = &doc.cache {
        out.push_str(&cache_text(c, doc.now_ms));
    }
    out
}

/// `sha256:0123abcd…`: enough of a digest to tell two apart.
fn short_digest(d: &str) -> String {
    let hex = d.strip_prefix("sha256:").unwrap_or(d);
    format!("sha256:{}", escape(crate::lock::cut(hex, 12)))
}

/// The cache section of the text status.
fn cache_text(c: &crate::dockerd::usage::CacheStatus, now: u64) -> String {
    use crate::dockerd::usage::human;
    let ago = |ms: u64| {
        let min = now.saturating_sub(ms) / 60_000;
        match min {
            0..=119 => format!("{min} min ago"),
            120..=2879 => format!("{} h ago", min / 60),
            _ => format!("{} days ago", min / 1440),
        }
    };
    let mut out = format!(
        "cache root {}: {} cached data root(s), {}{}\n",
        c.root.display(),
        c.roots.len(),
        human(c.total_bytes),
        c.cap_bytes
            .map(|b| format!(" of a {} cap", human(b)))
            .unwrap_or_else(|| ", no cap".to_string())
    );
    for r in &c.roots {
        out.push_str(&format!(
            "  {}  {}  last used {}{}\n",
            r.name,
            human(r.bytes),
            ago(r.last_used_ms),
            if r.held { "  held" } else { "" }
        ));
    }
    for e in &c.evictions {
        out.push_str(&format!(
            "  evicted {} ({}) {} (last used {})\n",
            e.name,
            human(e.bytes),
            ago(e.at_ms),
            ago(e.last_used_ms)
        ));
    }
    out
}

/// The JSON document (pretty-printed, one trailing newline).
pub fn render_json(doc: &StatusDoc) -> String {
    let mut s = serde_json::to_string_pretty(doc).expect("status encodes");
    s.push('\n');
    s
}
