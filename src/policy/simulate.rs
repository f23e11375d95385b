//! `policy simulate`: runs a [`Scenario`] in simulated time through the engine's own scheduler
//! (`lock::schedule`) over the in-memory store (`lock::memory`), one scheduler per request, and
//! records who is served when and every decision. What a simulation shows is what the engine
//! does: the same looks at the queue, tries, decision reuse, stall passing and bounds. Time
//! jumps to the next arrival, release or wake-up any scheduler asked for, so the result does
//! not depend on a step size (unless the scenario sets one).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use super::scenario::Scenario;
use super::*;
use crate::lock::backend::{Held, Queued, TicketData, Wake, Watch};
use crate::lock::events::{Event as LockEvent, Now, Observer, Outcome as Ending};
use crate::lock::memory::{MemoryBackend, MemoryQueued};
use crate::lock::schedule::{Action, Config, End, Input, Scheduler};
use crate::lock::Options;

/// Bound on policy calls, so that a scenario cannot run for ever. Every waiter ranks the whole
/// queue at each look, as in the engine: 300 waiters through 300 holds of a second take about
/// 11 million calls.
pub const MAX_DECISIONS: usize = 20_000_000;
/// Bound on scheduler steps at one moment (a scheduler that never waits would be a bug).
const MAX_STEPS_AT_ONE_MOMENT: usize = 1_000_000;

/// One thing that happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Milliseconds since the start.
    pub t_ms: u64,
    /// Ticket id.
    pub id: String,
    /// `arrive`, `wait`, `pass`, `serve`, `release`, `give-up`, `fall-back`.
    pub kind: String,
    /// Details: the decision, the rank, the reason.
    pub detail: String,
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fate {
    /// Took the lock after waiting this long.
    Served { at_ms: u64, waited_ms: u64 },
    /// Gave up (policy or caller's bound).
    GaveUp { at_ms: u64, reason: String },
    /// Ran without the lock.
    FellBack { at_ms: u64, reason: String },
    /// Still waiting when the simulation ended.
    Waiting,
}

/// The result of a simulation.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Every event in time order.
    pub events: Vec<Event>,
    /// Ids in the order they took the lock.
    pub served_order: Vec<String>,
    /// Each arrival's fate, in scenario order.
    pub fates: Vec<(String, Fate)>,
    /// Number of policy calls made.
    pub decisions: usize,
}

/// What a request is doing between moments.
enum State {
    Waiting {
        until: Duration,
        watch: Watched,
    },
    Holding {
        held: Box<dyn Held>,
        until: Option<Duration>,
    },
    Over,
}

/// A `Watch` that outlives the step that asked for it.
enum Watched {
    Lock,
    Ahead(Box<TicketData>),
}

impl Watched {
    fn of(w: Watch<'_>) -> Watched {
        match w {
            Watch::Lock => Watched::Lock,
            Watch::Ahead(t) => Watched::Ahead(Box::new(t.clone())),
        }
    }

    fn get(&self) -> Watch<'_> {
        match self {
            Watched::Lock => Watch::Lock,
            Watched::Ahead(t) => Watch::Ahead(t),
        }
    }
}

/// One request of the scenario.
struct Request {
    /// Index in `scenario.arrivals`.
    idx: usize,
    queued: Option<MemoryQueued>,
    sched: Scheduler,
    state: State,
}

/// The policy, counting calls against [`MAX_DECISIONS`]. A rank is a function of the ticket
/// and the time only (the policy contract), so the requests that rank the queue at one moment
/// share each ticket's rank, as if each had computed it.
struct Counted<'a> {
    policy: &'a mut dyn Policy,
    calls: usize,
    ranks_at: u64,
    ranks: std::collections::HashMap<String, i64>,
}

impl Counted<'_> {
    /// The error once the simulation made too many calls.
    fn over_budget(&self) -> Result<(), PolicyError> {
        if self.calls <= MAX_DECISIONS {
            return Ok(());
        }
        Err(PolicyError::fault(
            self.policy.name(),
            format!("the simulation made more than {MAX_DECISIONS} decisions; shorten `until_ms`"),
        ))
    }
}

impl Policy for Counted<'_> {
    fn name(&self) -> &str {
        self.policy.name()
    }
    fn rank(&mut self, waiter: &Ticket, now_ms: u64) -> Result<i64, PolicyError> {
        if now_ms != self.ranks_at {
            self.ranks.clear();
            self.ranks_at = now_ms;
        }
        if let Some(r) = self.ranks.get(&waiter.id) {
            return Ok(*r);
        }
        self.calls += 1;
        let r = self.policy.rank(waiter, now_ms)?;
        self.ranks.insert(waiter.id.clone(), r);
        Ok(r)
    }
    fn on_wait(&mut self, state: &WaitState) -> Result<WaitDecision, PolicyError> {
        self.calls += 1;
        self.policy.on_wait(state)
    }
    fn start_timeout_ms(&mut self, attempt: &StartAttempt) -> Result<u64, PolicyError> {
        self.policy.start_timeout_ms(attempt)
    }
    fn on_start_failure(
        &mut self,
        attempt: &StartAttempt,
        failure: &StartFailure,
        log_tail: &str,
    ) -> Result<RetryDecision, PolicyError> {
        self.policy.on_start_failure(attempt, failure, log_tail)
    }
    fn stop_timeout_ms(&mut self, cache_id: Option<&str>) -> Result<u64, PolicyError> {
        self.policy.stop_timeout_ms(cache_id)
    }
}

/// What the schedulers' events become in the simulation's record.
struct Recorder {
    events: Mutex<Vec<Event>>,
    /// Each ticket's last rank, for the `serve` line.
    ranks: Mutex<std::collections::HashMap<String, i64>>,
    /// Whose scheduler is stepping (events of a wait carry no ticket of their own).
    current: Mutex<String>,
}

impl Recorder {
    fn push(&self, now: Now, id: &str, kind: &str, detail: String) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Event {
                t_ms: now.at.as_millis() as u64,
                id: id.to_string(),
                kind: kind.to_string(),
                detail,
            });
    }
}

impl Observer for Recorder {
    fn event(&self, now: Now, event: &LockEvent<'_>) {
        let current = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match event {
            LockEvent::Arrived { ticket } => {
                let r = ticket.request();
                let detail = format!("priority {}, {:?}", r.priority, r.mode).to_lowercase();
                self.push(now, ticket.id(), "arrive", detail);
            }
            LockEvent::Ranked { order, .. } => {
                let mut ranks = self.ranks.lock().unwrap_or_else(|e| e.into_inner());
                for (t, r) in order.iter() {
                    ranks.insert(t.id().to_string(), *r);
                }
            }
            LockEvent::Passed { tickets, free_for } => {
                let ids: Vec<&str> = tickets.iter().map(|t| t.id()).collect();
                let detail = format!(
                    "passes {} (the lock was free for {:.3}s without them taking it)",
                    ids.join(", "),
                    free_for.as_secs_f64()
                );
                self.push(now, &current, "pass", detail);
            }
            LockEvent::Decided {
                decision, refused, ..
            } => {
                let detail = match decision {
                    WaitDecision::KeepWaiting(ms) => format!("keep-waiting {ms} ms"),
                    WaitDecision::FallBack(reason) if *refused => format!(
                        "fall-back refused (the lock does not allow it; `fallback: true` in the scenario): {reason}"
                    ),
                    // The end of the request records these.
                    _ => return,
                };
                self.push(now, &current, "wait", detail);
            }
            LockEvent::Acquired { ticket, waited } => {
                let rank = self
                    .ranks
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(ticket.id())
                    .copied()
                    .unwrap_or(0);
                let detail = format!("rank {rank}, waited {} ms", waited.as_millis());
                self.push(now, ticket.id(), "serve", detail);
            }
            LockEvent::Finished(s) => {
                let kind = match s.outcome {
                    Ending::FellBack => "fall-back",
                    Ending::Conflict | Ending::Timeout | Ending::GaveUp => "give-up",
                    _ => return,
                };
                let detail = s.reason.unwrap_or_default().to_string();
                self.push(now, s.ticket.id(), kind, detail);
            }
            LockEvent::Tried { .. } | LockEvent::Waits { .. } => {}
        }
    }
}

/// The engine's options of one simulated request.
fn options(scenario: &Scenario, a: &super::scenario::Arrival) -> Options {
    let mut o = Options::new(&scenario.lock);
    o.mode = a.mode;
    o.priority = a.priority;
    o.labels = labels(&a.labels);
    o.wait_limit_ms = a.wait_limit_ms;
    o.slots = scenario.slots;
    o.fallback_allowed = scenario.fallback;
    o
}

fn labels(m: &std::collections::BTreeMap<String, String>) -> Vec<(String, String)> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Runs `scenario` through `policy`.
pub fn run(policy: &mut dyn Policy, scenario: &Scenario) -> Result<Outcome, PolicyError> {
    let start_ms = scenario.start_ms();
    let clock = Arc::new(AtomicU64::new(start_ms));
    let store = MemoryBackend::with_clock(clock.clone(), "simulated", 0);
    let name = policy.name().to_string();
    let fault = |e: crate::error::Error| PolicyError::fault(&name, e.message);
    let mut policy = Counted {
        policy,
        calls: 0,
        ranks_at: 0,
        ranks: Default::default(),
    };
    let rec = Recorder {
        events: Mutex::new(Vec::new()),
        ranks: Mutex::new(Default::default()),
        current: Mutex::new(String::new()),
    };
    // Holders at t=0 take their slots directly (the grant rule decides whether they can).
    let mut holders: Vec<(Box<dyn Held>, Option<Duration>)> = Vec::new();
    for h in &scenario.holders {
        let mut o = Options::new(&scenario.lock);
        o.mode = h.mode;
        o.priority = h.priority;
        o.labels = labels(&h.labels);
        o.slots = scenario.slots;
        let mut q = store.enqueue_as(&o, Some(&h.id)).map_err(fault)?;
        let held = q.try_acquire().map_err(fault)?.ok_or_else(|| {
            PolicyError::fault(
                policy.name(),
                format!(
                    "holder {:?} cannot hold the lock beside the other holders",
                    h.id
                ),
            )
        })?;
        holders.push((held, h.release_at_ms.map(Duration::from_millis)));
    }
    let mut pending: Vec<usize> = (0..scenario.arrivals.len()).collect();
    pending.sort_by_key(|&i| std::cmp::Reverse((scenario.arrivals[i].at_ms, i)));
    let mut requests: Vec<Request> = Vec::new();
    let mut fates: Vec<(String, Fate)> = scenario
        .arrivals
        .iter()
        .map(|a| (a.id.clone(), Fate::Waiting))
        .collect();
    let mut served_order = Vec::new();
    let until = Duration::from_millis(scenario.until_ms);
    let mut t = Duration::ZERO;
    loop {
        clock.store(start_ms + ms(t), Ordering::SeqCst);
        let now = Now {
            at: t,
            wall_ms: start_ms + ms(t),
        };
        // Releases due now.
        let mut i = 0;
        while i < holders.len() {
            if holders[i].1.is_some_and(|r| r <= t) {
                let (held, _) = holders.remove(i);
                rec.push(now, held.ticket().id(), "release", String::new());
                held.release();
            } else {
                i += 1;
            }
        }
        for r in &mut requests {
            if let State::Holding { until: Some(u), .. } = &r.state {
                if *u <= t {
                    let State::Holding { held, .. } = std::mem::replace(&mut r.state, State::Over)
                    else {
                        unreachable!("matched above")
                    };
                    rec.push(now, held.ticket().id(), "release", String::new());
                    held.release();
                }
            }
        }
        // Arrivals due now.
        while let Some(&i) = pending.last() {
            let a = &scenario.arrivals[i];
            if a.at_ms > ms(t) {
                break;
            }
            pending.pop();
            let q = store
                .enqueue_as(&options(scenario, a), Some(&a.id))
                .map_err(fault)?;
            *rec.current.lock().unwrap_or_else(|e| e.into_inner()) = a.id.clone();
            let sched = Scheduler::new(
                Config::from(&options(scenario, a)),
                q.ticket().clone(),
                now,
                &rec,
            );
            requests.push(Request {
                idx: i,
                queued: Some(q),
                sched,
                state: State::Over,
            });
            let r = requests.last_mut().expect("pushed above");
            drive(
                r,
                Input::Start,
                now,
                &mut policy,
                &rec,
                scenario,
                &mut fates,
                &mut served_order,
            )?;
        }
        // Every request woken by a change or by its timer, until none is.
        let mut steps = 0;
        loop {
            let mut any = false;
            for r in &mut requests {
                let wake = match &r.state {
                    State::Waiting { until, watch } => {
                        let q = r.queued.as_mut().expect("queued while waiting");
                        match q.pending(watch.get()) {
                            Some(w) => Some(w),
                            None if *until <= t => Some(Wake::Timeout),
                            None => None,
                        }
                    }
                    _ => None,
                };
                if let Some(w) = wake {
                    any = true;
                    drive(
                        r,
                        Input::Woke(w),
                        now,
                        &mut policy,
                        &rec,
                        scenario,
                        &mut fates,
                        &mut served_order,
                    )?;
                }
            }
            steps += 1;
            policy.over_budget()?;
            if !any {
                break;
            }
            if steps > MAX_STEPS_AT_ONE_MOMENT {
                return Err(PolicyError::fault(
                    policy.name(),
                    format!("the simulation made no progress at {} ms", ms(t)),
                ));
            }
        }
        // The next moment something happens.
        let next = pending
            .last()
            .map(|&i| Duration::from_millis(scenario.arrivals[i].at_ms))
            .into_iter()
            .chain(holders.iter().filter_map(|(_, r)| *r))
            .chain(requests.iter().filter_map(|r| match &r.state {
                State::Waiting { until, .. } => Some(*until),
                State::Holding { until, .. } => *until,
                State::Over => None,
            }))
            .filter(|n| *n > t)
            .min()
            .map(|n| match scenario.step_ms {
                0 => n,
                step => Duration::from_millis(ms(n).div_ceil(step).saturating_mul(step)),
            });
        match next {
            Some(n) if n <= until => t = n,
            _ => break,
        }
    }
    let mut events = rec.events.into_inner().unwrap_or_else(|e| e.into_inner());
    events.sort_by_key(|e| e.t_ms);
    Ok(Outcome {
        events,
        served_order,
        fates,
        decisions: policy.calls,
    })
}

/// Carries out one request's actions at `now` until it waits or is over.
#[allow(clippy::too_many_arguments)]
fn drive(
    r: &mut Request,
    input: Input<'static>,
    now: Now,
    policy: &mut dyn Policy,
    rec: &Recorder,
    scenario: &Scenario,
    fates: &mut [(String, Fate)],
    served_order: &mut Vec<String>,
) -> Result<(), PolicyError> {
    let a = &scenario.arrivals[r.idx];
    *rec.current.lock().unwrap_or_else(|e| e.into_inner()) = a.id.clone();
    let name = policy.name().to_string();
    let fault = |e: crate::error::Error| PolicyError::fault(&name, e.message);
    let mut held: Option<Box<dyn Held>> = None;
    let mut answer = Answer::First(input);
    loop {
        let input = match answer {
            Answer::First(i) => i,
            Answer::Scanned(snapshot, listed) => Input::Scanned { snapshot, listed },
            Answer::Ready(r) => Input::PolicyReady(r),
            Answer::Tried => Input::Tried(held.as_deref().map(|h| h.ticket())),
        };
        let action = r.sched.step(now, input, policy, rec)?;
        let q = r.queued.as_mut().expect("queued while scheduling");
        answer = match action {
            Action::Scan { listing } => {
                let (snapshot, listed) = if listing {
                    q.rescan()
                } else {
                    q.scan().map(|s| (s, false))
                }
                .map_err(fault)?;
                Answer::Scanned(snapshot, listed)
            }
            // The policy was loaded before the simulation began.
            Action::LoadPolicy { .. } => Answer::Ready(policy.ready(None)?),
            Action::Try => {
                held = q.try_acquire().map_err(fault)?;
                Answer::Tried
            }
            Action::Wait { until, watch } => {
                r.state = State::Waiting {
                    until,
                    watch: Watched::of(watch),
                };
                return Ok(());
            }
            Action::Done(end) => {
                let at_ms = ms(now.at);
                match end {
                    End::Acquired => {
                        let held = held.take().expect("a granted lock is held");
                        served_order.push(a.id.clone());
                        fates[r.idx].1 = Fate::Served {
                            at_ms,
                            waited_ms: at_ms.saturating_sub(a.at_ms),
                        };
                        // The held lock owns the ticket now.
                        drop(r.queued.take());
                        r.state = State::Holding {
                            held,
                            until: Some(now.at + Duration::from_millis(a.hold_ms)),
                        };
                    }
                    End::GaveUp { message, .. } => {
                        fates[r.idx].1 = Fate::GaveUp {
                            at_ms,
                            reason: message,
                        };
                        if let Some(q) = r.queued.take() {
                            Box::new(q).leave(None);
                        }
                        r.state = State::Over;
                    }
                    End::FellBack { reason } => {
                        fates[r.idx].1 = Fate::FellBack { at_ms, reason };
                        if let Some(q) = r.queued.take() {
                            Box::new(q).leave(None);
                        }
                        r.state = State::Over;
                    }
                }
                return Ok(());
            }
        };
    }
}

/// What an action returned, kept until the next step.
enum Answer<'a> {
    First(Input<'a>),
    Scanned(crate::lock::backend::Snapshot, bool),
    Ready(Readiness),
    Tried,
}

/// Human-readable rendering: one line per event, then the order served and each fate.
pub fn render(o: &Outcome) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    // A waiter re-evaluated at the same interval many times would drown the output: show a
    // `wait` line only when the decision changes.
    let mut last_wait: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
    for e in &o.events {
        if e.kind == "wait" {
            if last_wait.get(e.id.as_str()) == Some(&e.detail.as_str()) {
                continue;
            }
            last_wait.insert(&e.id, &e.detail);
        }
        let _ = writeln!(
            s,
            "{:>10.3}s  {:<16} {:<9} {}",
            e.t_ms as f64 / 1000.0,
            e.id,
            e.kind,
            e.detail
        );
    }
    let _ = writeln!(s, "\nserved in order: {}", o.served_order.join(", "));
    for (id, fate) in &o.fates {
        let f = match fate {
            Fate::Served { at_ms, waited_ms } => {
                format!(
                    "served at {:.3}s after waiting {:.3}s",
                    *at_ms as f64 / 1000.0,
                    *waited_ms as f64 / 1000.0
                )
            }
            Fate::GaveUp { at_ms, reason } => {
                format!("gave up at {:.3}s: {reason}", *at_ms as f64 / 1000.0)
            }
            Fate::FellBack { at_ms, reason } => {
                format!("fell back at {:.3}s: {reason}", *at_ms as f64 / 1000.0)
            }
            Fate::Waiting => "still waiting at the end".to_string(),
        };
        let _ = writeln!(s, "  {id}: {f}");
    }
    let _ = writeln!(s, "{} policy calls", o.decisions);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::native::DefaultPolicy;

    #[test]
    fn exact_and_stepped_time() {
        let text = "holders:\n  - {id: h, release_at_ms: 1005}\narrivals:\n  - {id: a, at_ms: 3, hold_ms: 10}\n  - {id: b, at_ms: 7, hold_ms: 10}\n";
        let o = run(&mut DefaultPolicy, &Scenario::parse(text).unwrap()).unwrap();
        assert_eq!(o.served_order, ["a", "b"]);
        assert_eq!(
            o.fates[0].1,
            Fate::Served {
                at_ms: 1005,
                waited_ms: 1002
            }
        );
        assert_eq!(
            o.fates[1].1,
            Fate::Served {
                at_ms: 1015,
                waited_ms: 1008
            }
        );
        let stepped = format!("step_ms: 100\n{text}");
        let o = run(&mut DefaultPolicy, &Scenario::parse(&stepped).unwrap()).unwrap();
        assert_eq!(
            o.fates[0].1,
            Fate::Served {
                at_ms: 1100,
                waited_ms: 1097
            }
        );
        assert!(o.events.iter().all(|e| e.t_ms % 100 == 0), "{:?}", o.events);
    }
}
