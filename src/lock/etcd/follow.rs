//! [`Follower`]: a watch of a whole key prefix, for `serve` on a fleet and `status --watch`.
//! One watcher sees every host's requests, and with `follow` tells what each did as
//! [`StoreEvent`]s: a ticket created is an arrival, a holder key created an acquisition, and a
//! ticket or holder key deleted a departure, whose outcome is in the lock's `last` record when
//! the same transaction wrote it (see `backend::depart_txn`). A deletion without one is a
//! lease that expired (a process that died or froze) or a cachelock before the record existed.
//!
//! The watch starts at the store's revision when the follower starts, resumes where it left
//! off on another endpoint when a member fails, and counts what etcd compacted away before it
//! was read ([`Follower::missed`]). Events wait in a bounded queue for the caller.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use etcd_client::{EventType, GetOptions, KeyValue, WatchOptions};

use super::backend::{holder_of, ticket_of};
use super::client::{Conn, Flow, Lost};
use super::EtcdStore;
use crate::error::{Error, Kind, Result};
use crate::lock::backend::{DepartureRecord, StoreEvent};
use crate::lock::now_ms;

/// Most events kept for the caller; past it the oldest go (counted as missed).
const MAX_PENDING: usize = 100_000;

/// A watch of an etcd store's locks.
pub struct Follower {
    rx: UnixStream,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    _conn: Arc<Conn>,
}

struct Shared {
    events: Mutex<VecDeque<StoreEvent>>,
    missed: AtomicU64,
}

impl Follower {
    /// Starts watching `store` from its current revision; with `follow`, requests' moments are
    /// kept as [`StoreEvent`]s (else only changes are signalled).
    pub fn start(store: &EtcdStore, follow: bool) -> Result<Follower> {
        let conn = Conn::new(store)?;
        let prefix = format!("{}/l/", store.prefix);
        let p = prefix.clone();
        let head = conn.block_on(conn.call("a read of the store's revision", |mut c| {
            let p = p.clone();
            async move {
                c.get(
                    p,
                    Some(
                        GetOptions::new()
                            .with_prefix()
                            .with_keys_only()
                            .with_limit(1),
                    ),
                )
                .await
            }
        }))?;
        let revision = head.header().map(|h| h.revision()).unwrap_or(0);
        let (rx, tx) = UnixStream::pair()
            .map_err(|e| Error::new(Kind::OsErr, format!("cannot create a socket pair: {e}")))?;
        let _ = rx.set_nonblocking(true);
        let _ = tx.set_nonblocking(true);
        let shared = Arc::new(Shared {
            events: Mutex::new(VecDeque::new()),
            missed: AtomicU64::new(0),
        });
        let task = conn.spawn(run(
            conn.clone(),
            prefix,
            revision + 1,
            tx,
            follow.then(|| shared.clone()),
        ));
        Ok(Follower {
            rx,
            shared,
            task,
            _conn: conn,
        })
    }

    /// Readable when something changed.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.rx.as_fd()
    }

    /// Empties the change signal.
    pub fn drain(&mut self) {
        let mut buf = [0u8; 256];
        while matches!((&self.rx).read(&mut buf), Ok(n) if n > 0) {}
    }

    /// The events seen since the last call.
    pub fn take_events(&mut self) -> Vec<StoreEvent> {
        let mut q = self.shared.events.lock().unwrap_or_else(|e| e.into_inner());
        q.drain(..).collect()
    }

    /// Events that could not be followed: compacted away before the watch read them, or
    /// dropped from a full queue.
    pub fn missed(&self) -> u64 {
        self.shared.missed.load(Ordering::Relaxed)
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where a key is, under `<prefix>/l/`.
#[derive(Clone, Copy)]
enum Place<'a> {
    Ticket(&'a str),
    Holder(&'a str),
    Last(&'a str),
}

fn place<'a>(prefix: &str, key: &'a [u8]) -> Option<Place<'a>> {
    let rest = std::str::from_utf8(key).ok()?.strip_prefix(prefix)?;
    let (lock, rest) = rest.split_once('/')?;
    if rest == "last" {
        return Some(Place::Last(lock));
    }
    if let Some(id) = rest.strip_prefix("q/") {
        return (!id.is_empty()).then_some(Place::Ticket(lock));
    }
    rest.strip_prefix("h/")
        .filter(|h| h.split('/').count() == 3)
        .map(|_| Place::Holder(lock))
}

/// The events of one revision (one transaction).
fn translate(prefix: &str, evs: &[&etcd_client::Event], out: &mut Vec<StoreEvent>) {
    let kv = |e: &&etcd_client::Event| e.kv().cloned();
    let records: Vec<(String, DepartureRecord)> = evs
        .iter()
        .filter(|e| e.event_type() == EventType::Put)
        .filter_map(kv)
        .filter_map(|kv| match place(prefix, kv.key())? {
            Place::Last(lock) => Some((
                lock.to_string(),
                serde_json::from_slice(&kv.value()[..kv.value().len().min(64 * 1024)]).ok()?,
            )),
            _ => None,
        })
        .collect();
    // Tickets that became holders in this revision (a grant deletes the ticket).
    let granted: Vec<String> = evs
        .iter()
        .filter(|e| e.event_type() == EventType::Put)
        .filter_map(kv)
        .filter(|kv| matches!(place(prefix, kv.key()), Some(Place::Holder(_))))
        .filter_map(|kv| ticket_of(&kv))
        .map(|t| t.id().to_string())
        .collect();
    for e in evs {
        let Some(k) = e.kv() else { continue };
        let Some(p) = place(prefix, k.key()) else {
            continue;
        };
        match (e.event_type(), p) {
            (EventType::Put, Place::Ticket(_)) if k.create_revision() == k.mod_revision() => {
                if let Some(t) = ticket_of(k) {
                    out.push(StoreEvent::Arrived(t));
                }
            }
            (EventType::Put, Place::Holder(_)) if k.create_revision() == k.mod_revision() => {
                if let Some(t) = holder_of(k) {
                    out.push(StoreEvent::Acquired(t));
                }
            }
            (EventType::Delete, Place::Ticket(lock) | Place::Holder(lock)) => {
                let read = match p {
                    Place::Holder(_) => holder_of,
                    _ => ticket_of,
                };
                let Some(t) = e.prev_kv().and_then(read) else {
                    continue;
                };
                if !t.holding && granted.iter().any(|g| g == t.id()) {
                    continue;
                }
                let record = records
                    .iter()
                    .find(|(l, r)| l == lock && r.ticket == t.id())
                    .map(|(_, r)| r.clone());
                out.push(StoreEvent::Left {
                    ticket: t,
                    record,
                    at_ms: now_ms(),
                });
            }
            _ => {}
        }
    }
}

/// Follows `prefix` from revision `next`: pokes `tx` at every change (and when the stream
/// breaks), and with `shared` keeps the events.
async fn run(
    conn: Arc<Conn>,
    prefix: String,
    next: i64,
    tx: UnixStream,
    shared: Option<Arc<Shared>>,
) {
    let poke = || {
        let _ = (&tx).write(&[1]);
    };
    let on_response = |resp: etcd_client::WatchResponse, _: etcd_client::Client, mut next: i64| {
        let flow = if resp.canceled() {
            // Compacted past our revision: what happened meanwhile is lost.
            if let Some(sh) = &shared {
                sh.missed.fetch_add(1, Ordering::Relaxed);
            }
            tracing::warn!(
                "the etcd watch was cancelled ({}): requests between revisions {next} and {} are not counted",
                resp.cancel_reason(),
                resp.compact_revision()
            );
            next = resp.compact_revision().max(0);
            poke();
            Flow::Reopen
        } else {
            let evs = resp.events();
            if !evs.is_empty() {
                if let Some(kv) = evs.last().and_then(|e| e.kv()) {
                    next = kv.mod_revision() + 1;
                }
                if let Some(sh) = &shared {
                    keep(sh, &prefix, evs);
                }
                poke();
            }
            Flow::Go
        };
        std::future::ready((flow, next))
    };
    let base = WatchOptions::new().with_prefix().with_prev_key();
    conn.follow_watch(&prefix, base, next, on_response, |why| {
        if why == Lost::Broken {
            poke();
        }
    })
    .await;
}

/// Translates `evs`, one revision at a time, into `sh`'s bounded queue.
fn keep(sh: &Shared, prefix: &str, evs: &[etcd_client::Event]) {
    let mut out = Vec::new();
    let mut start = 0;
    while start < evs.len() {
        let rev = evs[start].kv().map(KeyValue::mod_revision);
        let end = evs[start..]
            .iter()
            .position(|e| e.kv().map(KeyValue::mod_revision) != rev)
            .map_or(evs.len(), |n| start + n);
        let group: Vec<&etcd_client::Event> = evs[start..end].iter().collect();
        translate(prefix, &group, &mut out);
        start = end;
    }
    let mut q = sh.events.lock().unwrap_or_else(|e| e.into_inner());
    for e in out {
        if q.len() >= MAX_PENDING {
            q.pop_front();
            sh.missed.fetch_add(1, Ordering::Relaxed);
        }
        q.push_back(e);
    }
}
