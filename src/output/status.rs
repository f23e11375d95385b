//! Rendering of `cachelock status`: text for people, a stable JSON document for scripts.
//!
//! JSON: `{"locks":[{"name","generation","holders":[{ticket,host,pid,mode,priority,labels,
//! queue_key,slot,held_for_ms}],"waiters":[{position,ticket,host,pid,mode,priority,labels,
//! queue_key,rank,waited_ms}]}]}`; `labels` is an object, waiters are in serving order.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::policy::Mode;

/// The whole document.
#[derive(Debug, Clone, Serialize)]
pub struct StatusDoc {
    /// One entry per lock, by name.
    pub locks: Vec<LockStatus>,
}

/// One lock.
#[derive(Debug, Clone, Serialize)]
pub struct LockStatus {
    /// Lock name.
    pub name: String,
    /// Acquisitions so far.
    pub generation: u64,
    /// Current holders.
    pub holders: Vec<HolderStatus>,
    /// Waiters in the order they will be served.
    pub waiters: Vec<WaiterStatus>,
}

/// A holder.
#[derive(Debug, Clone, Serialize)]
pub struct HolderStatus {
    pub ticket: String,
    pub host: String,
    pub pid: u32,
    pub mode: Mode,
    pub priority: i32,
    pub labels: BTreeMap<String, String>,
    pub queue_key: Option<String>,
    pub slot: u32,
    pub held_for_ms: u64,
}

/// A waiter.
#[derive(Debug, Clone, Serialize)]
pub struct WaiterStatus {
    /// 1 = next to be served.
    pub position: usize,
    pub ticket: String,
    pub host: String,
    pub pid: u32,
    pub mode: Mode,
    pub priority: i32,
    pub labels: BTreeMap<String, String>,
    pub queue_key: Option<String>,
    pub rank: i64,
    pub waited_ms: u64,
}

fn mode_str(m: Mode) -> &'static str {
    match m {
        Mode::Exclusive => "exclusive",
        Mode::Shared => "shared",
    }
}

fn labels_str(l: &BTreeMap<String, String>) -> String {
    if l.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("  labels {}", parts.join(","))
}

fn key_str(k: &Option<String>) -> String {
    k.as_ref().map(|k| format!("  key {k}")).unwrap_or_default()
}

/// Text for people.
pub fn render_text(doc: &StatusDoc) -> String {
    let mut out = String::new();
    if doc.locks.is_empty() {
        out.push_str("no locks\n");
    }
    for l in &doc.locks {
        out.push_str(&format!("lock {} (generation {})\n", l.name, l.generation));
        if l.holders.is_empty() {
            out.push_str("  held by: nobody\n");
        }
        for h in &l.holders {
            out.push_str(&format!(
                "  held by: ticket {}  {}:{}  {}  priority {}  slot {}  for {:.1}s{}{}\n",
                h.ticket,
                h.host,
                h.pid,
                mode_str(h.mode),
                h.priority,
                h.slot,
                h.held_for_ms as f64 / 1000.0,
                labels_str(&h.labels),
                key_str(&h.queue_key)
            ));
        }
        if l.waiters.is_empty() {
            out.push_str("  waiting: nobody\n");
        } else {
            out.push_str("  waiting (in serving order):\n");
        }
        for w in &l.waiters {
            out.push_str(&format!(
                "    {}. ticket {}  {}:{}  {}  priority {}  rank {}  waited {:.1}s{}{}\n",
                w.position,
                w.ticket,
                w.host,
                w.pid,
                mode_str(w.mode),
                w.priority,
                w.rank,
                w.waited_ms as f64 / 1000.0,
                labels_str(&w.labels),
                key_str(&w.queue_key)
            ));
        }
    }
    out
}

/// The JSON document (pretty-printed, one trailing newline).
pub fn render_json(doc: &StatusDoc) -> String {
    let mut s = serde_json::to_string_pretty(doc).expect("status encodes");
    s.push('\n');
    s
}
