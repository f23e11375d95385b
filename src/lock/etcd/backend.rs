//! The etcd backend's mechanics behind [`Backend`], [`Queued`] and [`Held`]: enqueue and grant
//! transactions, the lease keep-alive, the watch (see the module above for the protocol).

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::client::{lease_gone, Conn, Flow};
use super::EtcdStore;
use crate::error::{Error, Kind, Result};
use crate::lock::backend::{
    Backend, Containment, Departure, Held, Lease, LeaseRule, LockState, Queued, Snapshot,
    StoreNote, TicketData, Unreadable, Wake, Watch,
};
use crate::lock::order::Slots;
use crate::lock::{name, now_ms, Options};
use crate::policy::Mode;
use crate::sys;

/// Most keys one read of a lock returns.
const MAX_KEYS: i64 = 10_000;
/// Keys per page of a read, at first: halved while a page exceeds the client's message limit
/// (4 MiB), so that any value the server accepts (1.5 MiB by default) can be read.
const PAGE: i64 = 256;
/// Longest value read as a ticket (larger ones are not cachelock's and are skipped).
const MAX_VALUE: usize = 64 * 1024;
/// Longest a waiter trusts its watch without hearing from it (a progress request is sent after
/// one request timeout of silence, the stream is replaced after two).
const WATCH_SLEEP_CAP: Duration = Duration::from_secs(2);
/// Attempts at taking a ticket number while other arrivals take them too.
const PUBLISH_ATTEMPTS: u32 = 100;
/// Longest pause between two of them (a random part of 1, 2, 4, ... ms up to this).
const PUBLISH_BACKOFF_MS: u64 = 32;
/// Grant attempts in one `try_acquire` when the holders or generation change under it.
const GRANT_ATTEMPTS: usize = 4;

/// `meta`: ticket numbers and the arrival clock of one lock.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Meta {
    #[serde(default)]
    next_ticket: u64,
    #[serde(default)]
    last_enqueued_at_ms: u64,
}

/// `k/<sha256>`: a remembered arrival of a queue key (attached to a lease whose TTL is the
/// key's grace, so it disappears on its own).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyRecord {
    key: String,
    enqueued_at_ms: u64,
}

/// Key names of one lock.
#[derive(Debug, Clone)]
struct Keys {
    base: String,
    names: String,
}

impl Keys {
    fn new(prefix: &str, lock: &str) -> Keys {
        Keys {
            base: format!("{prefix}/l/{lock}/"),
            names: format!("{prefix}/n/"),
        }
    }
    fn all(&self) -> String {
        self.base.clone()
    }
    fn meta(&self) -> String {
        format!("{}meta", self.base)
    }
    /// Rewritten by every grant: its mod revision, the grant's, is the generation (fencing
    /// token). etcd's revisions only grow and no client can choose one, so whatever a client
    /// writes there the next generation is larger than every earlier one; its value means
    /// nothing.
    fn gen(&self) -> String {
        format!("{}gen", self.base)
    }
    fn ticket(&self, id: &str) -> String {
        format!("{}q/{id}", self.base)
    }
    fn holders(&self) -> String {
        format!("{}h/", self.base)
    }
    fn slot(&self, slot: u32) -> String {
        format!("{}h/{slot:03}/", self.base)
    }
    fn slot_exclusive(&self, slot: u32) -> String {
        format!("{}h/{slot:03}/x/", self.base)
    }
    fn holder(&self, slot: u32, mode: Mode, id: &str) -> String {
        format!("{}h/{slot:03}/{}/{id}", self.base, mode_key(mode))
    }
    /// Grants not yet released: `g/<slot>/<x|s>/<id>`, written (on no lease) with the holder
    /// key and removed with it by the holder's release. A mark whose holder key is gone is a
    /// holder that vanished without releasing (see [`EtcdQueued::grant`]).
    fn marks(&self) -> String {
        format!("{}g/", self.base)
    }
    fn mark(&self, slot: u32, mode: Mode, id: &str) -> String {
        format!("{}g/{slot:03}/{}/{id}", self.base, mode_key(mode))
    }
    /// The record of the latest departure (see `super` and [`depart_txn`]).
    fn last(&self) -> String {
        format!("{}last", self.base)
    }
    fn key_record(&self, key: &str) -> String {
        format!("{}k/{:x}", self.base, Sha256::digest(key.as_bytes()))
    }
    fn name(&self, lock: &str) -> String {
        format!("{}{lock}", self.names)
    }
}

fn mode_key(mode: Mode) -> &'static str {
    if mode == Mode::Exclusive {
        "x"
    } else {
        "s"
    }
}

/// `<slot>/<x|s>/<rest>` of a holder key or grant mark.
fn slot_mode(path: &str) -> Option<(u32, Mode, &str)> {
    let mut parts = path.splitn(3, '/');
    let slot = parts.next()?.parse::<u32>().ok()?;
    let mode = match parts.next()? {
        "x" => Mode::Exclusive,
        "s" => Mode::Shared,
        _ => return None,
    };
    Some((slot, mode, parts.next()?))
}

/// The end of a prefix range: the prefix with its last byte incremented.
fn range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

fn prefix_get(limit: i64) -> GetOptions {
    GetOptions::new().with_prefix().with_limit(limit)
}

/// `meta` and its mod revision (0: not written yet) from a read of it.
fn meta_of(kvs: &[KeyValue]) -> (Meta, i64) {
    kvs.first().map_or((Meta::default(), 0), |kv| {
        (
            serde_json::from_slice(kv.value()).unwrap_or_default(),
            kv.mod_revision(),
        )
    })
}

pub(super) fn ticket_of(kv: &KeyValue) -> Option<TicketData> {
    if kv.value().len() > MAX_VALUE {
        return None;
    }
    serde_json::from_slice(kv.value()).ok()
}

/// A holder key's ticket, its generation the grant's revision (see [`Keys::gen`]), never what
/// the value claims.
pub(super) fn holder_of(kv: &KeyValue) -> Option<TicketData> {
    let mut t = ticket_of(kv)?;
    t.generation = Some(kv.create_revision().max(0) as u64);
    Some(t)
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("encodes")
}

/// A waiting ticket as read, with the lease it lives on.
#[derive(Debug)]
struct Waiting {
    ticket: TicketData,
    lease: i64,
}

/// A holder key as read: its ticket, lease, slot and mode (from the key), and the revision of
/// the grant that created it.
#[derive(Debug)]
struct Holding {
    key: String,
    ticket: TicketData,
    lease: i64,
    slot: u32,
    mode: Mode,
    revision: i64,
}

/// The parsed keys of one lock.
#[derive(Debug, Default)]
struct Read_ {
    /// Any key of the lock was read.
    exists: bool,
    meta: Option<(Meta, i64)>,
    /// The latest grant's generation: `gen`'s mod revision (see [`Keys::gen`]).
    generation: u64,
    gen_rev: i64,
    waiters: Vec<Waiting>,
    holders: Vec<Holding>,
    /// Grant marks: key, slot, mode, and the holder key they stand for.
    marks: Vec<(String, u32, Mode, String)>,
    /// Tickets and holder keys that cannot be used (ignored, shown by `status`).
    unreadable: Vec<Unreadable>,
    revision: i64,
}

fn parse(keys: &Keys, kvs: &[KeyValue], revision: i64) -> Read_ {
    let mut r = Read_ {
        revision,
        exists: !kvs.is_empty(),
        ..Default::default()
    };
    for kv in kvs {
        let Ok(k) = kv.key_str() else { continue };
        let Some(rest) = k.strip_prefix(&keys.base) else {
            continue;
        };
        if rest == "meta" {
            let m = serde_json::from_slice(kv.value()).unwrap_or_default();
            r.meta = Some((m, kv.mod_revision()));
        } else if rest == "gen" {
            r.generation = kv.mod_revision().max(0) as u64;
            r.gen_rev = kv.mod_revision();
        } else if rest.starts_with("q/") {
            match ticket_of(kv) {
                Some(ticket) => r.waiters.push(Waiting {
                    ticket,
                    lease: kv.lease(),
                }),
                None => r.unreadable.push(unreadable(rest, kv.value().len())),
            }
        } else if let Some(g) = rest.strip_prefix("g/") {
            if let Some((slot, mode, id)) = slot_mode(g) {
                r.marks
                    .push((k.to_string(), slot, mode, keys.holder(slot, mode, id)));
            }
        } else if let Some(h) = rest.strip_prefix("h/") {
            match (slot_mode(h), holder_of(kv)) {
                (Some((slot, mode, _)), Some(ticket)) => r.holders.push(Holding {
                    key: k.to_string(),
                    ticket,
                    lease: kv.lease(),
                    slot,
                    mode,
                    revision: kv.create_revision(),
                }),
                _ => r.unreadable.push(unreadable(rest, kv.value().len())),
            }
        }
    }
    r
}

/// A ticket or holder key (`rest`, below the lock's keys) whose value of `len` bytes is no
/// ticket: ignored, and named by `status`.
fn unreadable(rest: &str, len: usize) -> Unreadable {
    Unreadable {
        ticket: rest.to_string(),
        owner_uid: None,
        reason: if len > MAX_VALUE {
            format!("{len} bytes, more than a ticket's {MAX_VALUE}")
        } else {
            "not a cachelock ticket".to_string()
        },
    }
}

/// Whether a read failed on the client's message limit.
fn too_large(e: &etcd_client::Error) -> bool {
    e.to_string().contains("too large")
}

/// Reads the keys under `prefix` at revision `rev` (0: the latest) in pages, at most
/// [`MAX_KEYS`]; returns them, the revision read, and the keys whose value alone exceeds the
/// client's message limit (skipped).
async fn read_range(
    conn: &Conn,
    prefix: &str,
    mut rev: i64,
) -> Result<(Vec<KeyValue>, i64, Vec<String>)> {
    let end = range_end(prefix);
    let mut from = prefix.as_bytes().to_vec();
    let mut page = PAGE;
    let (mut kvs, mut oversized) = (Vec::new(), Vec::new());
    loop {
        let opts = GetOptions::new()
            .with_range(end.clone())
            .with_limit(page)
            .with_revision(rev);
        let resp = conn
            .call("a read of the queue", |mut c| {
                let (from, opts) = (from.clone(), opts.clone());
                async move {
                    match c.get(from, Some(opts)).await {
                        Ok(r) => Ok(Some(r)),
                        Err(e) if too_large(&e) => Ok(None),
                        Err(e) => Err(e),
                    }
                }
            })
            .await?;
        let Some(resp) = resp else {
            if page > 1 {
                page /= 2;
                continue;
            }
            // One value beyond the limit: name it and read on after it.
            let opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(1)
                .with_revision(rev)
                .with_keys_only();
            let k = conn
                .call("a read of the queue", |mut c| {
                    let (from, opts) = (from.clone(), opts.clone());
                    async move { c.get(from, Some(opts)).await }
                })
                .await?;
            let Some(kv) = k.kvs().first() else { break };
            oversized.push(String::from_utf8_lossy(kv.key()).into_owned());
            from = kv.key().to_vec();
            from.push(0);
            continue;
        };
        if rev == 0 {
            rev = resp.header().map_or(0, |h| h.revision());
        }
        if let Some(last) = resp.kvs().last() {
            from = last.key().to_vec();
            from.push(0);
        }
        kvs.extend(resp.kvs().iter().cloned());
        if !resp.more() || resp.kvs().is_empty() || kvs.len() >= MAX_KEYS as usize {
            break;
        }
    }
    Ok((kvs, rev, oversized))
}

/// Lease lookups in flight at once for `status` (etcd 3.4 has no call that answers for many).
const LEASE_LOOKUPS: usize = 64;

/// The time left on each of `leases`, in ms, looked up concurrently (at most
/// [`LEASE_LOOKUPS`] at once), so that `status` of a long queue costs a few round trips rather
/// than one per ticket; a lease that cannot be looked up is left out.
async fn lease_left_ms(conn: &Arc<Conn>, leases: Vec<i64>) -> std::collections::HashMap<i64, u64> {
    let mut left = std::collections::HashMap::new();
    for chunk in leases.chunks(LEASE_LOOKUPS) {
        let mut set = tokio::task::JoinSet::new();
        for &id in chunk {
            let conn = conn.clone();
            set.spawn(async move {
                let ttl = conn
                    .call("a lease lookup", |mut c| async move {
                        c.lease_time_to_live(id, None).await
                    })
                    .await;
                (id, ttl)
            });
        }
        while let Some(r) = set.join_next().await {
            if let Ok((id, Ok(t))) = r {
                left.insert(id, (t.ttl().max(0) as u64) * 1000);
            }
        }
    }
    left
}

/// The etcd store as a backend.
pub struct EtcdBackend {
    conn: Arc<Conn>,
}

impl EtcdBackend {
    /// Prepares the connection (exit 78 for unreadable TLS files); nothing is sent yet.
    pub fn connect(store: &EtcdStore) -> Result<EtcdBackend> {
        Ok(EtcdBackend {
            conn: Conn::new(store)?,
        })
    }

    fn rule(&self) -> LeaseRule {
        LeaseRule::new(self.conn.store.lease_ttl)
    }

    /// Reads every key of one lock.
    async fn read_lock(&self, keys: &Keys) -> Result<Read_> {
        read_lock(&self.conn, keys).await
    }
}

async fn read_lock(conn: &Conn, keys: &Keys) -> Result<Read_> {
    let (kvs, rev, oversized) = read_range(conn, &keys.all(), 0).await?;
    let mut r = parse(keys, &kvs, rev);
    r.exists |= !oversized.is_empty();
    for k in oversized {
        let rest = k.strip_prefix(&keys.base).unwrap_or(&k).to_string();
        r.unreadable.push(Unreadable {
            ticket: rest,
            owner_uid: None,
            reason: "larger than the client's message limit (4 MiB)".to_string(),
        });
    }
    Ok(r)
}

/// Grants a lease of `ttl` seconds.
async fn grant_lease(conn: &Conn, ttl: i64) -> Result<i64> {
    let r = conn
        .call("a lease grant", |mut c| async move {
            c.lease_grant(ttl, None).await
        })
        .await?;
    Ok(r.id())
}

/// A request's departure, one transaction: if `key` (its ticket or its holder key) is still
/// there, delete it (and a holder's grant `mark`) and write `record` to the lock's `last` key, so that a watcher of the store
/// learns how the request ended from the very revision that removed it. A departure whose key
/// is already gone (its lease expired) writes nothing. The lease is left to expire by itself
/// (nothing is attached to it any more): a revoke would be a second round trip on every
/// release. Retried across endpoints until confirmed when `patient` (a retry after a lost
/// answer finds the key gone and writes nothing twice), else one attempt within one request
/// timeout (a drop on an error path must not hang).
async fn depart_txn(
    conn: &Conn,
    key: String,
    mark: Option<String>,
    last: String,
    record: Vec<u8>,
    patient: bool,
) -> Result<()> {
    let mut ops = vec![
        TxnOp::delete(key.clone(), None),
        TxnOp::put(last, record, None),
    ];
    ops.extend(mark.map(|m| TxnOp::delete(m, None)));
    let txn = Txn::new()
        .when([Compare::version(key, CompareOp::Greater, 0)])
        .and_then(ops);
    let send = |mut c: etcd_client::Client| {
        let txn = txn.clone();
        async move { c.txn(txn).await.map(|_| ()) }
    };
    if patient {
        return conn.call("leaving the queue", send).await;
    }
    let once = async {
        match conn.current_client().await {
            Ok((_, c)) => send(c).await.map_err(|e| e.to_string()),
            Err(_) => Err("no endpoint".to_string()),
        }
    };
    match tokio::time::timeout(conn.store.request_timeout, once).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(why)) => Err(conn.unavailable("leaving the queue", &why)),
        Err(_) => Err(conn.unavailable("leaving the queue", "no answer")),
    }
}

/// What the guardian of a holder whose cachelock died needs to release its lock (see
/// [`crate::lock::Lease::set_orphan_release`]): the store (credentials included: the token
/// only travels over the socket to our own child) and the departure transaction.
#[derive(Serialize, Deserialize)]
struct Orphan {
    endpoints: Vec<String>,
    prefix: String,
    ca_file: Option<std::path::PathBuf>,
    cert_file: Option<std::path::PathBuf>,
    key_file: Option<std::path::PathBuf>,
    user: Option<(String, String)>,
    lease_ttl_ms: u64,
    request_timeout_ms: u64,
    unavailable_timeout_ms: u64,
    key: String,
    mark: String,
    last: String,
    record: Vec<u8>,
}

/// Releases the lock a dead holder's guardian was left (see [`Orphan`]): the holder key and
/// its grant mark go with a record, as a release, so the next waiter is served at once.
pub fn release_orphaned(token: &[u8]) -> Result<()> {
    let o: Orphan = serde_json::from_slice(token)
        .map_err(|e| Error::new(Kind::Software, format!("bad release token: {e}")))?;
    let ms = Duration::from_millis;
    let store = EtcdStore {
        endpoints: o.endpoints,
        prefix: o.prefix,
        ca_file: o.ca_file,
        cert_file: o.cert_file,
        key_file: o.key_file,
        user: o.user,
        lease_ttl: ms(o.lease_ttl_ms),
        request_timeout: ms(o.request_timeout_ms),
        unavailable_timeout: ms(o.unavailable_timeout_ms),
    };
    let conn = Conn::new(&store)?;
    conn.block_on(depart_txn(
        &conn,
        o.key,
        Some(o.mark),
        o.last,
        o.record,
        true,
    ))
}

/// The encoded departure record of ticket `id`: `how`, or, without it, an error's.
fn departure_record(id: &str, how: Option<&Departure<'_>>) -> Vec<u8> {
    let error = Departure {
        outcome: crate::lock::Outcome::Error,
        waited: Duration::ZERO,
        held: None,
        policy: "",
        digest: None,
    };
    encode(&how.unwrap_or(&error).record(id))
}

/// Keeps lease `id` alive as `rule` says; each confirmed renewal moves `lease`'s stop deadline
/// (counted from when the renewal was *sent*). A lease found gone is lost at once.
async fn keep_alive(conn: Arc<Conn>, id: i64, rule: LeaseRule, lease: Lease) {
    let period = rule.renew_every();
    let mut stream: Option<(
        usize,
        etcd_client::LeaseKeeper,
        etcd_client::LeaseKeepAliveStream,
    )> = None;
    loop {
        tokio::time::sleep(period).await;
        let sent = sys::monotonic_ns();
        let outcome = tokio::time::timeout(conn.store.request_timeout, async {
            match stream.as_mut() {
                Some((_, keeper, s)) => {
                    keeper.keep_alive().await?;
                    match s.message().await? {
                        Some(r) => Ok(r.ttl()),
                        None => Err(etcd_client::Error::WatchError(
                            "keep-alive stream ended".into(),
                        )),
                    }
                }
                None => {
                    let (i, mut c) = match conn.current_client().await {
                        Ok(x) => x,
                        Err(_) => return Err(etcd_client::Error::WatchError("no endpoint".into())),
                    };
                    // Opening the stream sends a first renewal (and fails if the lease is gone).
                    let (k, s) = c.lease_keep_alive(id).await?;
                    stream = Some((i, k, s));
                    Ok(rule.ttl_secs())
                }
            }
        })
        .await;
        match outcome {
            Ok(Ok(left)) if left > 0 => {
                lease.extend(rule.stop_at(sent, Duration::from_secs(left as u64)));
            }
            Ok(Ok(_)) => {
                tracing::warn!("lease of lock {} expired on the server", lease.lock());
                lease.lose();
                return;
            }
            Ok(Err(e)) if lease_gone(&e) => {
                tracing::warn!("lease of lock {} is gone: {e}", lease.lock());
                lease.lose();
                return;
            }
            other => {
                if let Ok(Err(e)) = &other {
                    tracing::debug!("lease renewal failed: {e}");
                }
                let i = stream
                    .take()
                    .map(|(i, _, _)| i)
                    .unwrap_or_else(|| conn.current_index());
                conn.rotate(i);
                if lease.is_lost() {
                    tracing::warn!(
                        "the lease of lock {} could not be renewed in time",
                        lease.lock()
                    );
                    lease.lose();
                    return;
                }
            }
        }
    }
}

/// What a waiter's watch follows (see [`Watch`]): the head set follows every key of the lock;
/// a waiter behind it only the ticket just ahead, so that a hand-off wakes the next holder
/// and the one behind it instead of every waiter (etcd's own recipe watches the key ahead
/// the same way).
#[derive(Debug, Clone, PartialEq, Eq)]
enum WatchOn {
    /// Every key under this prefix (a lock's keys).
    Lock(String),
    /// One ticket's key: only its deletion (taken the lock, left, or its lease gone) matters.
    Ticket(String),
}

/// Follows `on` from revision `next` and writes `r` (only deletions) or `c` (anything else)
/// to `tx` for each batch that matters, and `c` whenever the stream is replaced.
async fn follow(conn: Arc<Conn>, on: WatchOn, next: i64, tx: UnixStream) {
    let poke = |b: u8| {
        let _ = (&tx).write(&[b]);
    };
    use std::io::Write;
    let (key, prefix) = match &on {
        WatchOn::Lock(p) => (p.as_str(), true),
        WatchOn::Ticket(k) => (k.as_str(), false),
    };
    // A departure's record is written with the removal it describes: it is not a change.
    let last = format!("{key}last");
    let mut base = WatchOptions::new();
    if prefix {
        base = base.with_prefix();
    }
    let on_response = |resp: etcd_client::WatchResponse, _: etcd_client::Client, mut next: i64| {
        let flow = if resp.canceled() {
            // Compacted past our revision (or refused): start from now.
            next = 0;
            poke(b'c');
            Flow::Reopen
        } else {
            let evs = resp.events();
            if let Some(kv) = evs.last().and_then(|e| e.kv()) {
                next = kv.mod_revision() + 1;
            }
            let evs: Vec<_> = evs
                .iter()
                .filter(|e| match prefix {
                    true => e.kv().is_none_or(|kv| kv.key() != last.as_bytes()),
                    // A ticket rewritten in place (its owner joining again) is still waiting
                    // ahead of us.
                    false => e.event_type() == EventType::Delete,
                })
                .collect();
            if !evs.is_empty() {
                let only_deletes = evs.iter().all(|e| e.event_type() == EventType::Delete);
                poke(if only_deletes { b'r' } else { b'c' });
            }
            Flow::Go
        };
        std::future::ready((flow, next))
    };
    conn.follow_watch(key, base, next, on_response, |_| poke(b'c'))
        .await;
}

/// Follows our own holder key from `next`: its deletion by anyone but our release (a client
/// deleting it, our lease revoked) loses the lease at once, so that the guardian stops the
/// command now rather than at the next renewal.
async fn watch_holder(conn: Arc<Conn>, key: String, next: i64, lease: Lease) {
    let gone = |how: &str| {
        tracing::warn!(
            "lock {}: our holder key {key} was {how} by someone else; stopping the command",
            lease.lock()
        );
        lease.lose();
    };
    let on_response = |resp: etcd_client::WatchResponse, mut c: etcd_client::Client, next: i64| {
        let (key, gone) = (key.clone(), &gone);
        async move {
            if resp.canceled() {
                // Compacted past our revision: look at the key itself.
                return match c.get(key, None).await {
                    Ok(g) if g.kvs().is_empty() => {
                        gone("removed");
                        (Flow::Stop, next)
                    }
                    Ok(g) => (Flow::Reopen, g.header().map_or(next, |h| h.revision() + 1)),
                    Err(_) => (Flow::Rotate, next),
                };
            }
            if resp
                .events()
                .iter()
                .any(|e| e.event_type() == EventType::Delete)
            {
                gone("deleted (or its lease revoked)");
                return (Flow::Stop, next);
            }
            let next = resp
                .events()
                .last()
                .and_then(|e| e.kv())
                .map_or(next, |kv| kv.mod_revision() + 1);
            (Flow::Go, next)
        }
    };
    conn.follow_watch(&key, WatchOptions::new(), next, on_response, |_| {})
        .await;
}

impl Backend for EtcdBackend {
    fn enqueue(&self, opts: &Options) -> Result<Box<dyn Queued>> {
        let keys = Keys::new(&self.conn.store.prefix, &opts.name);
        let rule = self.rule();
        let sent = sys::monotonic_ns();
        let lease_id = self
            .conn
            .block_on(grant_lease(&self.conn, rule.ttl_secs()))?;
        let lease = rule.lease(&opts.name, sent);
        let keeper = self
            .conn
            .spawn(keep_alive(self.conn.clone(), lease_id, rule, lease.clone()));
        let mut q = EtcdQueued {
            conn: self.conn.clone(),
            keys,
            slots: opts.slots.max(1),
            lease_id: Some(lease_id),
            lease,
            keeper: Some(keeper),
            data: TicketData {
                // Our own user, for our record; etcd vouches for no local user, so others'
                // tickets carry none (their host and pid are their claims).
                uid: Some(sys::euid()),
                ..TicketData::new(opts, String::new(), 0, sys::hostname(), std::process::id())
            },
            revision: 0,
            watch: None,
            departure: None,
            vanished: std::collections::HashMap::new(),
            fence_until: None,
        };
        let conn = self.conn.clone();
        conn.block_on(q.publish())?;
        Ok(Box::new(q))
    }

    fn lock_names(&self) -> Result<Vec<String>> {
        let names = format!("{}/n/", self.conn.store.prefix);
        let resp = self
            .conn
            .block_on(self.conn.call("a list of locks", |mut c| {
                let names = names.clone();
                async move {
                    c.get(names, Some(prefix_get(MAX_KEYS).with_keys_only()))
                        .await
                }
            }))?;
        let mut v: Vec<String> = resp
            .kvs()
            .iter()
            .filter_map(|kv| kv.key_str().ok())
            .filter_map(|k| k.strip_prefix(&names))
            .filter(|n| name::validate(n).is_ok())
            .map(str::to_string)
            .collect();
        v.sort();
        v.dedup();
        Ok(v)
    }

    fn state(&self, lock: &str) -> Result<LockState> {
        let keys = Keys::new(&self.conn.store.prefix, lock);
        self.conn.block_on(async {
            let r = self.read_lock(&keys).await?;
            let mut leases: Vec<i64> = r
                .waiters
                .iter()
                .map(|w| w.lease)
                .chain(r.holders.iter().map(|h| h.lease))
                .collect();
            leases.sort();
            leases.dedup();
            let left = lease_left_ms(&self.conn, leases).await;
            let mut tickets = Snapshot::default();
            let mut notes = std::collections::HashMap::new();
            for h in r.holders {
                let note = StoreNote {
                    revision: Some(h.revision),
                    lease_left_ms: left.get(&h.lease).copied(),
                };
                notes.insert(h.ticket.id().to_string(), note);
                tickets.holders.push(h.ticket);
            }
            for w in r.waiters {
                let note = StoreNote {
                    revision: None,
                    lease_left_ms: left.get(&w.lease).copied(),
                };
                notes.insert(w.ticket.id().to_string(), note);
                tickets.waiters.push(w.ticket);
            }
            tickets.holders.sort_by(|a, b| a.id().cmp(b.id()));
            Ok(LockState {
                name: lock.to_string(),
                exists: r.exists,
                generation: r.generation,
                tickets,
                unreadable: r.unreadable,
                notes,
            })
        })
    }

    fn describe(&self) -> String {
        self.conn.store.describe()
    }
}

/// A request in an etcd queue.
struct EtcdQueued {
    conn: Arc<Conn>,
    keys: Keys,
    slots: u32,
    /// `None` once the lease is handed to the held lock.
    lease_id: Option<i64>,
    lease: Lease,
    keeper: Option<tokio::task::JoinHandle<()>>,
    data: TicketData,
    /// Store revision of the last read (the watch starts after it).
    revision: i64,
    /// The watch of the last wait, kept while the next wait follows the same thing.
    watch: Option<(UnixStream, tokio::task::JoinHandle<()>, WatchOn)>,
    /// How the request ends (see `Queued::depart`), encoded.
    departure: Option<Vec<u8>>,
    /// Grant marks of vanished holders, by key, with when we first saw each.
    vanished: std::collections::HashMap<String, Instant>,
    /// Until when a vanished holder's command may still run (the grant waits for it).
    fence_until: Option<Instant>,
}

impl EtcdQueued {
    fn lease_id(&self) -> i64 {
        self.lease_id.expect("lease held until handed over")
    }

    /// Takes a ticket number and arrival stamp and publishes the ticket, in one transaction
    /// (compare-and-swap on `meta`). A failed compare answers with the current `meta` (and
    /// whether a ticket of an earlier, unanswered attempt is ours after all), so a retry costs
    /// one round trip and never re-reads the queue; concurrent arrivals back off for a random
    /// while that grows with the attempts, instead of spinning on the key.
    async fn publish(&mut self) -> Result<()> {
        let lease_id = self.lease_id();
        let meta_key = self.keys.meta();
        let remembered = match &self.data.queue_key {
            Some(k) => self.remembered(k).await?,
            None => None,
        };
        let first = self
            .conn
            .call("a read of the queue", |mut c| {
                let k = meta_key.clone();
                async move { c.get(k, None).await }
            })
            .await?;
        let mut meta = meta_of(first.kvs());
        // Ticket keys of earlier attempts: one whose answer was lost may have been written.
        let mut tried: Vec<String> = Vec::new();
        for attempt in 0..PUBLISH_ATTEMPTS {
            let (current, meta_rev) = meta.clone();
            let mut next = current.clone();
            next.next_ticket += 1;
            let at = match remembered {
                Some(at) => at,
                None => {
                    let at = now_ms().max(current.last_enqueued_at_ms + 1);
                    next.last_enqueued_at_ms = at;
                    at
                }
            };
            let mut data = self.data.clone();
            data.ticket.id = format!("{:012}", current.next_ticket);
            data.ticket.request.enqueued_at_ms = at;
            let key = self.keys.ticket(data.id());
            tried.push(key.clone());
            let mut otherwise = vec![TxnOp::get(meta_key.clone(), None)];
            otherwise.extend(tried.iter().map(|k| TxnOp::get(k.clone(), None)));
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    meta_key.clone(),
                    CompareOp::Equal,
                    meta_rev,
                )])
                .and_then([
                    TxnOp::put(meta_key.clone(), encode(&next), None),
                    TxnOp::put(
                        key,
                        encode(&data),
                        Some(PutOptions::new().with_lease(lease_id)),
                    ),
                    TxnOp::put(self.keys.name(&data.request().lock), "", None),
                ])
                .or_else(otherwise);
            let resp = self
                .conn
                .call("joining the queue", |mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await?;
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            if resp.succeeded() {
                self.revision = revision;
                self.data = data;
                return Ok(());
            }
            let mut gets = resp.op_responses().into_iter().filter_map(|r| match r {
                TxnOpResponse::Get(g) => Some(g),
                _ => None,
            });
            if let Some(g) = gets.next() {
                meta = meta_of(g.kvs());
            }
            for g in gets {
                if let Some(kv) = g.kvs().first().filter(|kv| kv.lease() == lease_id) {
                    if let Some(t) = ticket_of(kv) {
                        self.data = t;
                        self.revision = revision;
                        return Ok(());
                    }
                }
            }
            let cap = PUBLISH_BACKOFF_MS.min(1 << attempt.min(6));
            let ms = sys::unpredictable() % (cap + 1);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Err(Error::new(
            Kind::Unavailable,
            format!(
                "could not join the queue of lock {}: too many concurrent arrivals",
                self.data.request().lock
            ),
        ))
    }

    /// The remembered, unexpired arrival of queue key `k`.
    async fn remembered(&self, k: &str) -> Result<Option<u64>> {
        let rec = self.keys.key_record(k);
        let resp = self
            .conn
            .call("a queue key lookup", |mut c| {
                let rec = rec.clone();
                async move { c.get(rec, None).await }
            })
            .await?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice::<KeyRecord>(kv.value()).ok())
            .filter(|r| r.key == k)
            .map(|r| r.enqueued_at_ms))
    }

    /// Our ticket vanished (the lease expired while this process could not renew it, e.g. it
    /// was frozen): join again with a fresh lease, keeping the ticket id and arrival.
    async fn rejoin(&mut self) -> Result<()> {
        tracing::warn!(
            "lock {}: our ticket {} expired with its lease; joining the queue again at the same place",
            self.data.request().lock,
            self.data.id()
        );
        if let Some(k) = self.keeper.take() {
            k.abort();
        }
        let rule = LeaseRule::new(self.conn.store.lease_ttl);
        let sent = sys::monotonic_ns();
        let id = grant_lease(&self.conn, rule.ttl_secs()).await?;
        self.lease = rule.lease(&self.data.request().lock, sent);
        self.lease_id = Some(id);
        self.keeper =
            Some(
                self.conn
                    .spawn(keep_alive(self.conn.clone(), id, rule, self.lease.clone())),
            );
        let key = self.keys.ticket(self.data.id());
        let val = encode(&self.data);
        self.conn
            .call("joining the queue again", |mut c| {
                let (key, val) = (key.clone(), val.clone());
                async move {
                    c.put(key, val, Some(PutOptions::new().with_lease(id)))
                        .await
                }
            })
            .await?;
        Ok(())
    }

    /// One attempt at the grant transaction (see the module doc); `Ok(None)` when no slot is
    /// free for our mode.
    async fn grant(&mut self) -> Result<Option<Box<dyn Held>>> {
        let lease_id = self.lease_id();
        // One exclusive slot (the common case): the first attempt is the grant itself, sent
        // blind, on the condition that nobody holds or vanished from the slot (no holder key,
        // no grant mark at all); the look is its other branch, so a refused attempt costs no
        // more than the look alone, and a hand-off costs one round trip less.
        let mut blind =
            (self.slots == 1 && self.data.request().mode == Mode::Exclusive).then(|| {
                let mut mine = self.data.clone();
                mine.hold(0, 0, now_ms());
                mine.generation = None;
                let (slot, marks) = (self.keys.slot(0), self.keys.marks());
                let when = vec![
                    Compare::create_revision(slot.clone(), CompareOp::Equal, 0)
                        .with_range(range_end(&slot)),
                    Compare::create_revision(marks.clone(), CompareOp::Equal, 0)
                        .with_range(range_end(&marks)),
                    Compare::version(self.keys.ticket(mine.id()), CompareOp::Greater, 0),
                ];
                let ops = self.grant_ops(&mine, 0, lease_id, Vec::new());
                (when, ops, mine)
            });
        for _ in 0..GRANT_ATTEMPTS {
            // Names only (values another client wrote may be large), and the holders' first page.
            let names = || GetOptions::new().with_keys_only();
            let small = [
                TxnOp::get(self.keys.gen(), Some(names())),
                TxnOp::get(self.keys.ticket(self.data.id()), Some(names())),
                TxnOp::get(
                    self.keys.marks(),
                    Some(prefix_get(MAX_KEYS).with_keys_only()),
                ),
            ];
            let mut look = small.to_vec();
            look.push(TxnOp::get(self.keys.holders(), Some(prefix_get(PAGE))));
            let (txn, mine) = match blind.take() {
                Some((when, ops, mine)) => (
                    Txn::new().when(when).and_then(ops).or_else(look),
                    Some(mine),
                ),
                None => (Txn::new().and_then(look), None),
            };
            let resp = self
                .conn
                .call("a read of the holders", |mut c| {
                    let look = txn.clone();
                    async move {
                        match c.txn(look).await {
                            Ok(r) => Ok(Some(r)),
                            Err(e) if too_large(&e) => Ok(None),
                            Err(e) => Err(e),
                        }
                    }
                })
                .await?;
            let (resp, mine) = match resp {
                Some(r) => (r, mine),
                // Only a look's answer can be this large (a grant's is a few puts): refused.
                None => {
                    let r = self
                        .conn
                        .call("a read of the holders", |mut c| {
                            let look = Txn::new().and_then(small.clone());
                            async move { c.txn(look).await }
                        })
                        .await?;
                    (r, None)
                }
            };
            let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
            if let (Some(mut mine), true) = (mine, resp.succeeded()) {
                mine.generation = Some(rev.max(0) as u64);
                return Ok(Some(self.held(mine, rev)));
            }
            let mut kvs = Vec::new();
            let mut ticket_present = false;
            let mut holders_read = false;
            for (i, r) in resp.op_responses().into_iter().enumerate() {
                if let TxnOpResponse::Get(g) = r {
                    if i == 1 {
                        ticket_present = !g.kvs().is_empty();
                    } else if i == 3 && g.more() {
                        continue;
                    } else {
                        holders_read |= i == 3;
                        kvs.extend(g.kvs().iter().cloned());
                    }
                }
            }
            if !holders_read {
                let (more, _, oversized) =
                    read_range(&self.conn, &self.keys.holders(), rev).await?;
                kvs.extend(more);
                for k in oversized {
                    tracing::warn!(
                        "lock {}: ignoring {k}: larger than the client's message limit",
                        self.data.request().lock
                    );
                }
            }
            let read = parse(&self.keys, &kvs, rev);
            // An earlier grant whose answer was lost: the holder key is already ours.
            if let Some(h) = read.holders.iter().find(|h| h.lease == lease_id) {
                let rev = h.revision;
                return Ok(Some(self.held(h.ticket.clone(), rev)));
            }
            if !ticket_present {
                self.rejoin().await?;
                continue;
            }
            let mut slots = Slots::new(self.slots);
            for h in &read.holders {
                slots.hold(h.slot, h.mode);
            }
            let stale = self.fence_vanished(&read, &mut slots);
            let Some(slot) = slots.take(self.data.request().mode) else {
                return Ok(None);
            };
            let mut mine = self.data.clone();
            // The generation is the grant's revision, known from its answer (see `Keys::gen`).
            mine.hold(slot, 0, now_ms());
            mine.generation = None;
            let busy = match self.data.request().mode {
                Mode::Exclusive => self.keys.slot(slot),
                Mode::Shared => self.keys.slot_exclusive(slot),
            };
            let end = range_end(&busy);
            let ops = self.grant_ops(&mine, slot, lease_id, stale);
            let txn = Txn::new()
                .when([
                    // No holder since our read; what the read found there is no holder (junk
                    // another client wrote: see `status`), or `slots` would have refused.
                    Compare::mod_revision(busy, CompareOp::Less, rev + 1).with_range(end),
                    Compare::mod_revision(self.keys.gen(), CompareOp::Equal, read.gen_rev),
                    Compare::version(self.keys.ticket(mine.id()), CompareOp::Greater, 0),
                ])
                .and_then(ops);
            let resp = self
                .conn
                .call("the grant", |mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await?;
            if resp.succeeded() {
                let rev = resp.header().map_or(0, |h| h.revision());
                mine.generation = Some(rev.max(0) as u64);
                return Ok(Some(self.held(mine, rev)));
            }
        }
        Ok(None)
    }

    /// What a grant of `slot` to `mine` writes: the holder key on our lease, the generation,
    /// the grant mark; what it removes: the ticket, a remembered arrival, and the `stale` marks.
    fn grant_ops(
        &self,
        mine: &TicketData,
        slot: u32,
        lease_id: i64,
        stale: Vec<String>,
    ) -> Vec<TxnOp> {
        let mode = self.data.request().mode;
        let mut ops = vec![
            TxnOp::put(
                self.keys.holder(slot, mode, mine.id()),
                encode(mine),
                Some(PutOptions::new().with_lease(lease_id)),
            ),
            TxnOp::put(self.keys.gen(), "", None),
            TxnOp::delete(self.keys.ticket(mine.id()), None),
        ];
        if let Some(k) = &mine.queue_key {
            ops.push(TxnOp::delete(self.keys.key_record(k), None));
        }
        ops.push(TxnOp::put(self.keys.mark(slot, mode, mine.id()), "", None));
        ops.extend(stale.into_iter().map(|k| TxnOp::delete(k, None)));
        ops
    }

    /// Holders that vanished without releasing (a grant mark without its holder key: the key
    /// deleted by a client, or the lease revoked or expired) may still run their command until
    /// their stop window ([`LeaseRule::stop_window`]) has passed since we first saw them gone:
    /// until then they hold their slot in `slots`. Returns the marks whose window has passed,
    /// for the grant to remove.
    fn fence_vanished(&mut self, read: &Read_, slots: &mut Slots) -> Vec<String> {
        let window = LeaseRule::new(self.conn.store.lease_ttl).stop_window();
        let now = Instant::now();
        let seen = std::mem::take(&mut self.vanished);
        self.fence_until = None;
        let mut stale = Vec::new();
        for (mark, slot, mode, holder) in &read.marks {
            if read.holders.iter().any(|h| &h.key == holder) {
                continue;
            }
            let since = seen.get(mark).copied().unwrap_or_else(|| {
                tracing::warn!(
                    "lock {}: holder {holder} vanished without releasing (its key deleted, or its lease revoked or expired); waiting {:.1}s, the time its command may need to stop",
                    self.data.request().lock,
                    window.as_secs_f64()
                );
                now
            });
            self.vanished.insert(mark.clone(), since);
            if now < since + window {
                slots.hold(*slot, *mode);
                let until = since + window;
                self.fence_until = Some(self.fence_until.map_or(until, |f| f.min(until)));
            } else {
                stale.push(mark.clone());
            }
        }
        stale
    }

    /// Hands the lease over to a held lock granted at revision `rev`.
    fn held(&mut self, data: TicketData, rev: i64) -> Box<dyn Held> {
        if let Some((_, task, _)) = self.watch.take() {
            task.abort();
        }
        let key = self
            .keys
            .holder(data.slot.unwrap_or(0), data.request().mode, data.id());
        let s = &self.conn.store;
        let ms = |d: Duration| d.as_millis() as u64;
        let orphan = Orphan {
            endpoints: s.endpoints.clone(),
            prefix: s.prefix.clone(),
            ca_file: s.ca_file.clone(),
            cert_file: s.cert_file.clone(),
            key_file: s.key_file.clone(),
            user: s.user.clone(),
            lease_ttl_ms: ms(s.lease_ttl),
            request_timeout_ms: ms(s.request_timeout),
            unavailable_timeout_ms: ms(s.unavailable_timeout),
            key: key.clone(),
            mark: self
                .keys
                .mark(data.slot.unwrap_or(0), data.request().mode, data.id()),
            last: self.keys.last(),
            record: departure_record(data.id(), None),
        };
        self.lease.set_orphan_release(encode(&orphan));
        let watcher = self.conn.spawn(watch_holder(
            self.conn.clone(),
            key,
            rev,
            self.lease.clone(),
        ));
        Box::new(EtcdHeld {
            watcher: Some(watcher),
            conn: self.conn.clone(),
            keys: self.keys.clone(),
            lease_id: self.lease_id.take(),
            lease: self.lease.clone(),
            keeper: self.keeper.take(),
            data,
            departure: None,
        })
    }

    /// Stops the background tasks; returns the lease, if still ours.
    fn stop(&mut self) -> Option<i64> {
        if let Some((_, task, _)) = self.watch.take() {
            task.abort();
        }
        if let Some(k) = self.keeper.take() {
            k.abort();
        }
        self.lease_id.take()
    }

    /// Leaves the queue: removes the ticket with the departure's record, see [`depart_txn`].
    fn revoke(&mut self, patient: bool) {
        if self.stop().is_some() {
            let record = self
                .departure
                .take()
                .unwrap_or_else(|| departure_record(self.data.id(), None));
            let (key, last) = (self.keys.ticket(self.data.id()), self.keys.last());
            if let Err(e) = self
                .conn
                .block_on(depart_txn(&self.conn, key, None, last, record, patient))
            {
                tracing::warn!(
                    "could not leave the queue of lock {} ({e}); the ticket disappears when its lease expires",
                    self.data.request().lock
                );
            }
        }
    }
}

impl Queued for EtcdQueued {
    fn ticket(&self) -> &TicketData {
        &self.data
    }

    fn scan(&mut self) -> Result<Snapshot> {
        let conn = self.conn.clone();
        let read = conn.block_on(read_lock(&conn, &self.keys))?;
        self.revision = read.revision;
        let lease_id = self.lease_id();
        let mut snap = Snapshot::default();
        let mut mine = false;
        for Waiting {
            ticket: t,
            lease: l,
        } in read.waiters
        {
            if t.id() == self.data.id() && l == lease_id {
                mine = true;
            } else if t.id() != self.data.id() {
                snap.waiters.push(t);
            }
        }
        for h in read.holders {
            snap.holders.push(h.ticket);
        }
        snap.holders.sort_by(|a, b| a.id().cmp(b.id()));
        if !mine {
            conn.block_on(self.rejoin())?;
        }
        Ok(snap)
    }

    fn try_acquire(&mut self) -> Result<Option<Box<dyn Held>>> {
        let conn = self.conn.clone();
        conn.block_on(self.grant())
    }

    fn wait(
        &mut self,
        until: Option<Instant>,
        watch: Watch<'_>,
        signal_fd: BorrowedFd<'_>,
    ) -> Result<Wake> {
        let on = match watch {
            Watch::Lock => WatchOn::Lock(self.keys.all()),
            Watch::Ahead(t) => WatchOn::Ticket(self.keys.ticket(t.id())),
        };
        if self.watch.as_ref().is_none_or(|w| w.2 != on) {
            if let Some((_, task, _)) = self.watch.take() {
                task.abort();
            }
            let (rx, tx) = UnixStream::pair().map_err(|e| {
                Error::new(Kind::OsErr, format!("cannot create a socket pair: {e}"))
            })?;
            let _ = rx.set_nonblocking(true);
            let _ = tx.set_nonblocking(true);
            // From just after the last look: a change since then is not missed.
            let task =
                self.conn
                    .spawn(follow(self.conn.clone(), on.clone(), self.revision + 1, tx));
            self.watch = Some((rx, task, on));
        }
        let rx = &self.watch.as_ref().expect("set above").0;
        // A vanished holder's stop window ends like a release.
        let cap = Instant::now() + WATCH_SLEEP_CAP;
        let cap = self.fence_until.map_or(cap, |f| f.min(cap));
        let wake_at = until.map_or(cap, |u| u.min(cap));
        let timeout = wake_at.saturating_duration_since(Instant::now());
        match sys::poll_readable(&[signal_fd, rx.as_fd()], Some(timeout)) {
            Some(0) => Ok(Wake::Signal),
            Some(_) => {
                let mut buf = [0u8; 256];
                let mut only_removals = true;
                let mut any = false;
                while let Ok(n) = (&*rx).read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    any = true;
                    only_removals &= buf[..n].iter().all(|b| *b == b'r');
                }
                Ok(match (any, only_removals) {
                    (true, true) => Wake::Removed,
                    (true, false) => Wake::Changed,
                    (false, _) => Wake::Timeout,
                })
            }
            // Past the cap without news: look again (the watch may be stuck on a member).
            None if until.is_none_or(|u| Instant::now() < u) => Ok(Wake::Changed),
            None => Ok(Wake::Timeout),
        }
    }

    fn depart(&mut self, how: &Departure<'_>) {
        self.departure = Some(departure_record(self.data.id(), Some(how)));
    }

    fn leave(mut self: Box<Self>, keep_place_for: Option<Duration>) {
        if let (Some(key), Some(grace)) = (self.data.queue_key.clone(), keep_place_for) {
            let rec = KeyRecord {
                key: key.clone(),
                enqueued_at_ms: self.data.request().enqueued_at_ms,
            };
            let k = self.keys.key_record(&key);
            let ttl = grace.as_secs_f64().ceil().max(1.0) as i64;
            let conn = self.conn.clone();
            let r = conn.block_on(async {
                let id = grant_lease(&conn, ttl).await?;
                conn.call("remembering the queue key", |mut c| {
                    let (k, v) = (k.clone(), encode(&rec));
                    async move { c.put(k, v, Some(PutOptions::new().with_lease(id))).await }
                })
                .await
            });
            if let Err(e) = r {
                tracing::warn!("could not remember queue key {key:?}: {e}");
            }
        }
        self.revoke(true);
    }

    fn vanish(mut self: Box<Self>) {
        // Nobody renews the lease: the ticket goes when it expires.
        self.stop();
    }
}

impl Drop for EtcdQueued {
    fn drop(&mut self) {
        self.revoke(false);
    }
}

/// A held etcd lock: the holder key lives on the lease, renewed in the background.
struct EtcdHeld {
    /// Follows our holder key ([`watch_holder`]).
    watcher: Option<tokio::task::JoinHandle<()>>,
    conn: Arc<Conn>,
    keys: Keys,
    lease_id: Option<i64>,
    lease: Lease,
    keeper: Option<tokio::task::JoinHandle<()>>,
    data: TicketData,
    /// How the request ends (see `Held::depart`), encoded.
    departure: Option<Vec<u8>>,
}

impl Held for EtcdHeld {
    fn ticket(&self) -> &TicketData {
        &self.data
    }

    fn containment(&self) -> Containment {
        Containment::Lease(self.lease.clone())
    }

    fn depart(&mut self, how: &Departure<'_>) {
        self.departure = Some(departure_record(self.data.id(), Some(how)));
    }

    fn release(mut self: Box<Self>) {
        self.release_now(true);
    }

    fn vanish(mut self: Box<Self>) {
        self.stop();
        self.lease_id = None;
    }
}

impl EtcdHeld {
    /// Stops renewing and removes the holder key with the departure's record (which wakes the
    /// next waiter), see [`depart_txn`]; unconfirmed, the lease expires by itself within its
    /// TTL.
    /// Stops following the holder key and renewing the lease.
    fn stop(&mut self) {
        for task in [self.watcher.take(), self.keeper.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
    }

    fn release_now(&mut self, patient: bool) {
        self.stop();
        if self.lease_id.take().is_some() {
            let d = &self.data;
            let key = self
                .keys
                .holder(d.slot.unwrap_or(0), d.request().mode, d.id());
            let record = self
                .departure
                .take()
                .unwrap_or_else(|| departure_record(d.id(), None));
            let mark = self
                .keys
                .mark(d.slot.unwrap_or(0), d.request().mode, d.id());
            if let Err(e) = self.conn.block_on(depart_txn(
                &self.conn,
                key,
                Some(mark),
                self.keys.last(),
                record,
                patient,
            )) {
                tracing::warn!(
                    "could not release lock {} ({e}); it is freed when its lease expires (at most {:.0}s)",
                    self.data.request().lock,
                    self.conn.store.lease_ttl.as_secs_f64()
                );
            }
        }
    }
}

impl Drop for EtcdHeld {
    fn drop(&mut self) {
        self.release_now(false);
    }
}
