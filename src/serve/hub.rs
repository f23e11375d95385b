//! What `serve` knows, shared by its threads: the counts ([`Tally`]), the requests in flight,
//! each lock's recent waits, the latest look at the store ([`Snapshot`]) and the stream of
//! queue events for `/api/v1/events` ([`Events`]). Writers (the report receiver, the store
//! watcher) hold a lock for microseconds; readers (HTTP) copy what they need out. Everything is
//! bounded: a slow reader loses old events, it never holds anything up.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::lock::backend::StoreEvent;
use crate::lock::events::Outcome;
use crate::observe::metrics::{CacheGauge, Format, LockGauges, Tally};
use crate::observe::report::{Moment, Report};
use crate::output::status::StatusDoc;

/// Events kept for `/api/v1/events` readers that fall behind.
pub const EVENTS_KEPT: usize = 1024;
/// Recent waits kept per lock (the dashboard's chart).
pub const WAITS_KEPT: usize = 120;
/// Requests in flight followed (arrived, not finished); past it the oldest are forgotten.
pub const MAX_IN_FLIGHT: usize = 20_000;
/// Requests in flight one user may claim by datagrams.
pub const MAX_IN_FLIGHT_PER_USER: usize = 2_000;
/// How long a request gone from the store may still report its end before it counts as
/// ended by a signal (its process died: SIGKILL, a crash).
pub const VANISH_GRACE: Duration = Duration::from_secs(5);
/// How long a waiter whose etcd ticket expired may rejoin before it counts as interrupted.
pub const REJOIN_GRACE: Duration = Duration::from_secs(30);

/// The latest look at the store.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The status document.
    pub doc: Option<StatusDoc>,
    /// It, as `/api/v1/locks` serves it.
    pub json: String,
    /// Gauges per lock.
    pub gauges: Vec<LockGauges>,
    /// Cached data roots.
    pub cache: Vec<CacheGauge>,
    /// `cache ls --json`, when a cache root is watched.
    pub cache_json: Option<String>,
}

/// A request that arrived and has not finished.
#[derive(Debug, Clone)]
struct InFlight {
    uid: Option<u32>,
    /// When a look at the store first missed it.
    gone_since: Option<Instant>,
    /// Arrival order, to forget the oldest first.
    seq: u64,
}

#[derive(Default)]
struct State {
    tally: Tally,
    in_flight: HashMap<(String, String), InFlight>,
    /// The requests in flight by arrival (to forget the oldest), and per reporting user.
    arrivals: std::collections::BTreeMap<u64, (String, String)>,
    per_user: HashMap<u32, usize>,
    /// Waiters whose etcd ticket went without a record, until they rejoin or the grace ends.
    expired: HashMap<(String, String), Instant>,
    waits: HashMap<String, VecDeque<(u64, u64)>>,
    seq: u64,
}

/// One queue event of `/api/v1/events`.
#[derive(Debug, Clone, Serialize)]
pub struct QueueEvent {
    /// `arrival`, `acquisition`, `release` or `departure`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Lock.
    pub lock: String,
    /// Ticket.
    pub ticket: String,
    /// Host (the request's claim).
    pub host: String,
    /// Pid there.
    pub pid: u32,
    /// Priority.
    pub priority: i32,
    /// When (RFC 3339, UTC).
    pub time: String,
    /// When (Unix ms).
    pub at_ms: u64,
    /// How it ended (release and departure).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<&'static str>,
    /// Arrival to acquisition or to the end of the wait.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waited_ms: Option<u64>,
    /// Held for (release).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_ms: Option<u64>,
}

impl QueueEvent {
    fn of(r: &Report) -> QueueEvent {
        QueueEvent {
            kind: match (r.moment, r.held_ms) {
                (Moment::Arrived, _) => "arrival",
                (Moment::Acquired, _) => "acquisition",
                (Moment::Finished, Some(_)) => "release",
                (Moment::Finished, None) => "departure",
            },
            lock: r.lock.clone(),
            ticket: r.ticket.clone(),
            host: r.host.clone(),
            pid: r.pid,
            priority: r.priority,
            time: crate::output::rfc3339(r.at_ms),
            at_ms: r.at_ms,
            outcome: r.outcome.map(Outcome::as_str),
            waited_ms: r.waited_ms,
            held_ms: r.held_ms,
        }
    }
}

/// The event stream: a bounded ring that writers append to and readers follow by sequence
/// number.
pub struct Events {
    ring: Mutex<(u64, VecDeque<Arc<str>>)>,
    cond: Condvar,
}

impl Events {
    fn new() -> Events {
        Events {
            ring: Mutex::new((0, VecDeque::new())),
            cond: Condvar::new(),
        }
    }

    /// Appends an event of type `kind` (its `event:` and `data:` lines kept ready to send).
    fn push(&self, kind: &str, data: &str) {
        let mut r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        r.0 += 1;
        r.1.push_back(format!("event: {kind}\ndata: {data}\n").into());
        if r.1.len() > EVENTS_KEPT {
            r.1.pop_front();
        }
        self.cond.notify_all();
    }

    /// The sequence number of the latest event (events are numbered from 1).
    pub fn head(&self) -> u64 {
        self.ring.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// The events after `seq` (waiting up to `timeout` for one), with their numbers, each as
    /// its `event:` and `data:` lines; `Err` with the oldest kept when some after `seq` were
    /// already dropped.
    pub fn after(&self, seq: u64, timeout: Duration) -> Result<Vec<(u64, Arc<str>)>, u64> {
        let r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let (r, _) = self
            .cond
            .wait_timeout_while(r, timeout, |r| r.0 <= seq)
            .unwrap_or_else(|e| e.into_inner());
        let (last, items) = (&r.0, &r.1);
        let first = last + 1 - items.len() as u64;
        if seq + 1 < first {
            return Err(first);
        }
        Ok(items
            .iter()
            .enumerate()
            .map(|(i, e)| (first + i as u64, e.clone()))
            .filter(|(n, _)| *n > seq)
            .collect())
    }
}

/// What `serve` knows.
pub struct Hub {
    state: Mutex<State>,
    snapshot: Mutex<Arc<Snapshot>>,
    /// The cached data roots as last measured (gauges, `/api/v1/cache`'s document).
    cache: Mutex<(Vec<CacheGauge>, Option<String>)>,
    /// The queue events.
    pub events: Events,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            state: Mutex::new(State::default()),
            snapshot: Mutex::new(Arc::new(Snapshot::default())),
            cache: Mutex::new((Vec::new(), None)),
            events: Events::new(),
        }
    }
}

impl State {
    /// Follows a request in flight (bounded per user and in all: the oldest is forgotten).
    fn arrive(&mut self, key: (String, String), uid: Option<u32>) -> bool {
        if let Some(u) = uid {
            if self.per_user.get(&u).copied().unwrap_or(0) >= MAX_IN_FLIGHT_PER_USER {
                return false;
            }
        }
        self.leave(&key);
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            if let Some((_, oldest)) = self.arrivals.pop_first() {
                self.leave(&oldest);
            }
        }
        self.seq += 1;
        self.arrivals.insert(self.seq, key.clone());
        if let Some(u) = uid {
            *self.per_user.entry(u).or_default() += 1;
        }
        self.in_flight.insert(
            key,
            InFlight {
                uid,
                gone_since: None,
                seq: self.seq,
            },
        );
        true
    }

    /// Stops following a request.
    fn leave(&mut self, key: &(String, String)) {
        if let Some(f) = self.in_flight.remove(key) {
            self.arrivals.remove(&f.seq);
            if let Some(u) = f.uid {
                if let Some(n) = self.per_user.get_mut(&u) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.per_user.remove(&u);
                    }
                }
            }
        }
    }
}

impl Hub {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The latest look at the store.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Counts a report refused before it could be read.
    pub fn refused(&self) {
        self.state().tally.reports_refused += 1;
    }

    /// Whether a report of `lock` may be counted (a bound on the locks counted).
    pub fn admits(&self, lock: &str) -> bool {
        self.state().tally.admits(lock)
    }

    /// Counts a report from `uid` (None: from the store itself).
    pub fn ingest(&self, r: Report, uid: Option<u32>) {
        let event = {
            let mut s = self.state();
            if !s.tally.admits(&r.lock) {
                s.tally.reports_refused += 1;
                return;
            }
            let key = (r.lock.clone(), r.ticket.clone());
            // An arrival folded into this report: the same as its own report before it.
            let arrival = (r.arrived && r.moment != Moment::Arrived).then(|| Report {
                moment: Moment::Arrived,
                at_ms: r.enqueued_at_ms,
                outcome: None,
                waited_ms: None,
                held_ms: None,
                arrived: false,
                ..r.clone()
            });
            if arrival.is_some() && !s.arrive(key.clone(), uid) {
                s.tally.reports_refused += 1;
                return;
            }
            if let Some(a) = &arrival {
                let data = serde_json::to_string(&QueueEvent::of(a)).expect("an event encodes");
                self.events.push("arrival", &data);
            }
            match r.moment {
                Moment::Arrived => {
                    if !s.arrive(key, uid) {
                        s.tally.reports_refused += 1;
                        return;
                    }
                }
                Moment::Acquired => {
                    let w = s.waits.entry(r.lock.clone()).or_default();
                    w.push_back((r.at_ms, r.waited_ms.unwrap_or(0)));
                    if w.len() > WAITS_KEPT {
                        w.pop_front();
                    }
                }
                Moment::Finished => s.leave(&key),
            }
            s.tally.count(&r);
            QueueEvent::of(&r)
        };
        let data = serde_json::to_string(&event).expect("an event encodes");
        self.events.push(event.kind, &data);
    }

    /// Counts what an etcd watch saw (see `lock::etcd::Follower`).
    pub fn store_event(&self, e: StoreEvent) {
        match e {
            StoreEvent::Arrived(t) => {
                let key = (t.request().lock.clone(), t.id().to_string());
                // A waiter whose ticket expired (it was frozen) joins again at its old place:
                // the same request, not a new one.
                if self.state().expired.remove(&key).is_some() {
                    return;
                }
                self.ingest(
                    Report::of_ticket(Moment::Arrived, &t, t.request().enqueued_at_ms),
                    None,
                );
            }
            StoreEvent::Acquired(t) => {
                let at = t.acquired_at_ms.unwrap_or_else(crate::lock::now_ms);
                let mut r = Report::of_ticket(Moment::Acquired, &t, at);
                r.waited_ms = Some(at.saturating_sub(t.request().enqueued_at_ms));
                self.ingest(r, None);
            }
            StoreEvent::Left {
                ticket: t,
                record,
                at_ms,
            } => {
                let mut r = Report::of_ticket(Moment::Finished, &t, at_ms);
                match record {
                    Some(rec) => {
                        r.outcome = Some(Outcome::parse(&rec.outcome).unwrap_or(Outcome::Error));
                        r.waited_ms = Some(rec.waited_ms);
                        r.held_ms = rec.held_ms;
                        r.policy = Some(rec.policy).filter(|p| !p.is_empty());
                        r.digest = rec.digest.filter(|d| r.policy.is_some() && !d.is_empty());
                    }
                    None if t.holding => {
                        // A holder key gone with its lease: the lock was lost (a cachelock
                        // from before departures were recorded released it by a revoke).
                        r.outcome = Some(if t.version.is_some() {
                            Outcome::Lost
                        } else {
                            Outcome::Acquired
                        });
                        r.waited_ms = t
                            .acquired_at_ms
                            .map(|a| a.saturating_sub(t.request().enqueued_at_ms));
                        r.held_ms = Some(t.acquired_at_ms.map_or(0, |a| at_ms.saturating_sub(a)));
                    }
                    None => {
                        let key = (t.request().lock.clone(), t.id().to_string());
                        let mut s = self.state();
                        s.leave(&key);
                        s.expired.insert(key, Instant::now());
                        return;
                    }
                }
                self.ingest(r, None);
            }
        }
    }

    /// After a look at the store: requests it no longer shows and that did not report their
    /// end within [`VANISH_GRACE`] count as interrupted (their process died), as do expired
    /// etcd waiters that did not rejoin within [`REJOIN_GRACE`].
    pub fn sweep(&self, doc: &StatusDoc) {
        let now = Instant::now();
        let mut ended = Vec::new();
        {
            let mut s = self.state();
            let live: std::collections::HashSet<(&str, &str)> = doc
                .locks
                .iter()
                .flat_map(|l| {
                    l.holders
                        .iter()
                        .map(|h| h.ticket.ticket.as_str())
                        .chain(l.waiters.iter().map(|w| w.ticket.ticket.as_str()))
                        .map(move |t| (l.name.as_str(), t))
                })
                .collect();
            let mut gone = Vec::new();
            for (k, f) in s.in_flight.iter_mut() {
                if live.contains(&(k.0.as_str(), k.1.as_str())) {
                    f.gone_since = None;
                } else if now.duration_since(*f.gone_since.get_or_insert(now)) >= VANISH_GRACE {
                    gone.push(k.clone());
                }
            }
            for k in gone {
                s.leave(&k);
                s.tally.vanished(&k.0, Outcome::Interrupted);
                ended.push(k);
            }
            let expired: Vec<_> = s
                .expired
                .iter()
                .filter(|(_, at)| now.duration_since(**at) >= REJOIN_GRACE)
                .map(|(k, _)| k.clone())
                .collect();
            for k in expired {
                s.expired.remove(&k);
                s.tally.vanished(&k.0, Outcome::Interrupted);
                ended.push(k);
            }
            for l in doc.locks.iter().filter(|l| l.exists) {
                s.tally.know(&l.name);
                let tickets = l
                    .holders
                    .iter()
                    .map(|h| &h.ticket)
                    .chain(l.waiters.iter().map(|w| &w.ticket));
                for t in tickets {
                    if let Some(p) = &t.policy {
                        s.tally.policy_seen(&l.name, p, t.policy_digest.as_deref());
                    }
                }
            }
        }
        for (lock, ticket) in ended {
            let at = crate::lock::now_ms();
            let e = serde_json::json!({
                "type": "departure", "lock": lock, "ticket": ticket,
                "time": crate::output::rfc3339(at), "at_ms": at, "outcome": "interrupted",
            });
            self.events.push("departure", &e.to_string());
        }
    }

    /// The cached data roots as last measured, for the next snapshot.
    pub fn cache_view(&self) -> (Vec<CacheGauge>, Option<String>) {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Keeps a new measurement of the cached data roots.
    pub fn set_cache_view(&self, gauges: Vec<CacheGauge>, json: Option<String>) {
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = (gauges, json);
    }

    /// Publishes a new look at the store.
    pub fn publish(&self, snap: Snapshot) {
        *self.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(snap);
    }

    /// `/metrics`.
    pub fn metrics(&self, format: Format) -> String {
        let snap = self.snapshot();
        let tally = self.state().tally.clone();
        tally.render(format, &snap.gauges, &snap.cache)
    }

    /// `/api/v1/waits`: each lock's recent waits, `[[unix_ms, waited_ms], ...]`, oldest first.
    pub fn waits_json(&self) -> String {
        let s = self.state();
        let m: std::collections::BTreeMap<&str, Vec<(u64, u64)>> = s
            .waits
            .iter()
            .map(|(k, v)| (k.as_str(), v.iter().copied().collect()))
            .collect();
        serde_json::to_string(&m).expect("encodes")
    }

    /// Counts, for tests and the log: (lock, outcome) → requests.
    pub fn requests(&self, lock: &str, outcome: Outcome) -> u64 {
        self.state().tally.requests(lock, outcome)
    }

    /// Records how many changes of the store could not be followed so far.
    pub fn set_missed(&self, n: u64) {
        self.state().tally.store_missed = n;
    }
}

/// Gauges from a status document.
pub fn gauges(doc: &StatusDoc) -> Vec<LockGauges> {
    doc.locks
        .iter()
        .filter(|l| l.exists)
        .map(|l| LockGauges {
            lock: l.name.clone(),
            waiters: l.waiters.len(),
            holders: l.holders.len(),
            oldest_wait_seconds: l.waiters.iter().map(|w| w.waited_ms).max().unwrap_or(0) as f64
                / 1000.0,
            generation: l.generation,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::{Options, TicketData};

    fn report(moment: Moment, ticket: &str, outcome: Option<Outcome>) -> Report {
        let t = TicketData::new(&Options::new("l"), ticket.into(), 1, "h".into(), 1);
        Report {
            outcome,
            waited_ms: Some(3),
            held_ms: outcome.filter(|o| *o == Outcome::Acquired).map(|_| 5),
            ..Report::of_ticket(moment, &t, 10)
        }
    }

    #[test]
    fn a_reader_that_falls_behind_loses_old_events_and_nothing_else() {
        let e = Events::new();
        for i in 0..EVENTS_KEPT + 10 {
            e.push("arrival", &format!("{{\"n\":{i}}}"));
        }
        // Behind the ring: told where it resumes.
        assert_eq!(e.after(0, Duration::ZERO), Err(11));
        let tail = e.after(e.head() - 2, Duration::ZERO).unwrap();
        assert_eq!(tail.len(), 2);
        assert!(tail[1].1.starts_with("event: arrival\ndata: "));
        // Nothing new: an empty answer after the wait.
        assert!(e
            .after(e.head(), Duration::from_millis(1))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn requests_are_followed_from_arrival_to_end_and_the_dead_counted_once() {
        let hub = Hub::default();
        hub.ingest(report(Moment::Arrived, "000000000001", None), Some(1000));
        hub.ingest(report(Moment::Acquired, "000000000001", None), Some(1000));
        hub.ingest(
            report(Moment::Finished, "000000000001", Some(Outcome::Acquired)),
            Some(1000),
        );
        assert_eq!(hub.requests("l", Outcome::Acquired), 1);
        assert_eq!(hub.events.head(), 3);
        // One that arrived and then died: gone from the store, it never reports its end.
        hub.ingest(report(Moment::Arrived, "000000000002", None), Some(1000));
        let empty = StatusDoc {
            lock_dir: String::new(),
            lock_dir_note: None,
            version: crate::VERSION,
            time: String::new(),
            locks: Vec::new(),
            cache: None,
            now_ms: 0,
        };
        hub.sweep(&empty);
        assert_eq!(hub.requests("l", Outcome::Interrupted), 0);
        hub.state().in_flight.values_mut().for_each(|f| {
            f.gone_since = Some(Instant::now() - VANISH_GRACE);
        });
        hub.sweep(&empty);
        hub.sweep(&empty);
        assert_eq!(hub.requests("l", Outcome::Interrupted), 1);
    }

    #[test]
    fn an_arrival_folded_into_the_next_report_is_an_arrival_event_and_counted_once() {
        let hub = Hub::default();
        let mut acquired = report(Moment::Acquired, "000000000001", None);
        acquired.arrived = true;
        hub.ingest(acquired, Some(1000));
        assert_eq!(hub.state().in_flight.len(), 1);
        hub.ingest(
            report(Moment::Finished, "000000000001", Some(Outcome::Acquired)),
            Some(1000),
        );
        let mut conflict = report(Moment::Finished, "000000000002", Some(Outcome::Conflict));
        conflict.arrived = true;
        hub.ingest(conflict, Some(1000));
        assert_eq!(hub.requests("l", Outcome::Acquired), 1);
        assert_eq!(hub.requests("l", Outcome::Conflict), 1);
        assert!(hub.state().in_flight.is_empty());
        let kinds: Vec<String> = hub
            .events
            .after(0, Duration::ZERO)
            .unwrap()
            .iter()
            .map(|e| e.1.lines().next().unwrap_or_default().to_string())
            .collect();
        assert_eq!(
            kinds,
            [
                "event: arrival",
                "event: acquisition",
                "event: release",
                "event: arrival",
                "event: departure"
            ]
        );
    }

    #[test]
    fn one_user_cannot_fill_the_table_of_requests_in_flight() {
        let hub = Hub::default();
        for i in 0..MAX_IN_FLIGHT_PER_USER + 5 {
            hub.ingest(
                report(Moment::Arrived, &format!("{i:012}"), None),
                Some(1001),
            );
        }
        hub.ingest(report(Moment::Arrived, "999999999999", None), Some(1002));
        let s = hub.state();
        assert_eq!(s.in_flight.len(), MAX_IN_FLIGHT_PER_USER + 1);
        assert_eq!(s.tally.reports_refused, 5);
    }
}
