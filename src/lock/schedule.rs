//! The wait loop's decisions, as a state machine that does no I/O: when to look at the queue,
//! when to load the policy, when to try the lock, what to watch and until when, when to give
//! up, fall back or pass a stalled head, and when the policy must be asked again.
//!
//! A driver feeds it [`Input`]s — what a backend call returned, with the time ([`Now`]) — and
//! carries out the [`Action`] it answers: the engine (`engine.rs`) against a real store and the
//! real clock, `policy simulate` against the in-memory store in simulated time. Both run this
//! code, so what a simulation shows is what the engine does. The scheduler calls the policy
//! (a sandboxed function of its inputs) and emits [`Event`]s to an [`Observer`].
//!
//! ```text
//! Start ──► Scan ──► Scanned ──► [LoadPolicy ──► PolicyReady] ──► rank, pass stalled heads
//!                                                                  │
//!            ┌── in the head set: Try ──► Tried ──► held: Done(Acquired)
//!            ▼                                 │
//!   -n / -w / the policy (or its standing decision) ──► Done(GaveUp | FellBack)
//!            │
//!            └──► Wait(until, watch) ──► Woke ──► Try (at the head) | Scan | Wait
//! ```

use std::time::Duration;

use super::backend::{Snapshot, TicketData, Wake, Watch};
use super::events::{Event, Now, Observer, Outcome, Position, Summary};
use super::order;
use super::stall::{self, Stalls};
use super::Options;
use crate::output::progress::{describe_holders, HolderView};
use crate::policy::{Policy, PolicyError, Readiness, WaitDecision, WaitState};

/// The shortest interval between two looks at the queue when nothing a waiter watches changes
/// (ranks may age; the head may stall): a policy asking for less gets timer wake-ups that cost
/// one try at the head (when polling) and nothing elsewhere.
pub const FULL_EVAL_PERIOD: Duration = Duration::from_millis(250);
/// Waiters further back than the one after the head set coalesce changes for this long before
/// looking again: where a backend can only watch the whole queue, every release and arrival
/// wakes every waiter, and only the front of the queue needs to react at once.
pub const BACK_OF_QUEUE_DEBOUNCE: Duration = Duration::from_millis(5);
/// When a fall-back the lock's rule does not allow is asked about again.
pub const REFUSED_FALLBACK_INTERVAL: Duration = Duration::from_millis(100);

/// What the scheduler needs of a request.
#[derive(Debug, Clone)]
pub struct Config {
    /// Holders at once, each on its own slot (≥ 1).
    pub slots: u32,
    /// The caller's bound on waiting: zero is `-n`; caps whatever the policy says.
    pub wait_limit: Option<Duration>,
    /// Whether a policy's fall-back is honoured.
    pub fallback_allowed: bool,
}

impl From<&Options> for Config {
    fn from(o: &Options) -> Self {
        Config {
            slots: o.slots.max(1),
            wait_limit: o.wait_limit_ms.map(Duration::from_millis),
            fallback_allowed: o.fallback_allowed,
        }
    }
}

/// What a driver tells the scheduler.
#[derive(Debug)]
pub enum Input<'a> {
    /// The ticket is in the queue: begin.
    Start,
    /// The answer to [`Action::Scan`]: the other live tickets.
    Scanned {
        /// Holders and waiters, our own ticket excluded.
        snapshot: Snapshot,
        /// Whether the backend answered from a listing (see `Queued::rescan`).
        listed: bool,
    },
    /// The answer to [`Action::LoadPolicy`].
    PolicyReady(Readiness),
    /// The answer to [`Action::Try`]: our ticket, holding, if the lock was granted.
    Tried(Option<&'a TicketData>),
    /// The answer to [`Action::Wait`] (a terminating signal is the driver's to handle:
    /// [`Wake::Signal`] here means nothing came of it).
    Woke(Wake),
}

/// What the scheduler asks a driver to do next.
#[derive(Debug)]
pub enum Action<'a> {
    /// Read the other live tickets (`Queued::rescan` when `listing`, else `Queued::scan`).
    Scan {
        /// Whether the backend may answer from a listing.
        listing: bool,
    },
    /// Load the policy, waiting for a compile in progress until `until` at the latest (the
    /// caller's deadline; `None`: the policy's own bound).
    LoadPolicy {
        /// On the driver's clock.
        until: Option<Duration>,
    },
    /// Try to take the lock now (`Queued::try_acquire`).
    Try,
    /// Sleep until `watch` changes or `until` (`Queued::wait`).
    Wait {
        /// On the driver's clock.
        until: Duration,
        /// What can make us act.
        watch: Watch<'a>,
    },
    /// The request is over.
    Done(End),
}

/// How a wait ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The lock is ours (the driver holds it).
    Acquired,
    /// Not taken: leave the queue (remembering the arrival for a queue key) and fail with
    /// `message` (the conflict exit code).
    GaveUp {
        /// Conflict (`-n`), timeout (`-w`) or the policy's give-up.
        outcome: Outcome,
        /// For the caller.
        message: String,
    },
    /// The policy fell back where the lock's rule allows it: leave the queue, run without it.
    FellBack {
        /// The policy's reason, control characters escaped.
        reason: String,
    },
}

/// What a held request's final record needs from its wait.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// The place at the first look.
    pub position_at_arrival: Option<Position>,
    /// `on-wait` calls.
    pub decisions: u32,
    /// The last answer.
    pub last_decision: Option<WaitDecision>,
    /// Time from arrival to acquisition.
    pub waited: Duration,
    /// Looks at the queue, and of those answered from a listing.
    pub scans: (u32, u32),
}

/// The last look's result.
#[derive(Debug, Default)]
struct Evaluation {
    /// Waiters in serving order, us included, passed ones excluded.
    ordered: Vec<(TicketData, i64)>,
    /// Our index in `ordered`.
    pos: usize,
    head_len: usize,
    in_head: bool,
}

/// A wait in progress.
#[derive(Debug, Clone, Copy)]
struct Plan {
    in_head: bool,
    /// In, or right behind, the head set.
    near_head: bool,
    /// The policy's interval (capped by the deadline).
    interval: Duration,
    /// The next full look.
    eval_at: Duration,
    /// The next cheap try (at the head).
    tick_at: Duration,
    /// A change was seen (behind the head set: looked at after the debounce).
    changed: bool,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Start,
    Scanning,
    Loading,
    /// A try from a look: on failure the look goes on to the decision.
    Trying,
    /// A try from a wake-up: on failure, look again (`removed`) or sleep on.
    TryingFast {
        removed: bool,
        plan: Plan,
    },
    Waiting(Plan),
    Done,
}

/// A `keep-waiting` decision and the queue it was made for.
#[derive(Debug, Clone, Copy)]
struct Decided {
    at: Duration,
    interval: Duration,
    queue: u64,
}

/// One request's wait.
#[derive(Debug)]
pub struct Scheduler {
    cfg: Config,
    me: TicketData,
    start: Duration,
    deadline: Option<Duration>,
    phase: Phase,
    snap: Snapshot,
    listed: bool,
    eval: Evaluation,
    policy_loaded: bool,
    stalls: Stalls,
    decided: Option<Decided>,
    record: Record,
}

impl Scheduler {
    /// The wait of `me` (our published ticket), which arrived at `now`.
    pub fn new(cfg: Config, me: TicketData, now: Now, obs: &dyn Observer) -> Scheduler {
        obs.event(now, &Event::Arrived { ticket: &me });
        let deadline = cfg.wait_limit.map(|l| now.at.saturating_add(l));
        Scheduler {
            cfg,
            me,
            start: now.at,
            deadline,
            phase: Phase::Start,
            snap: Snapshot::default(),
            listed: false,
            eval: Evaluation::default(),
            policy_loaded: false,
            stalls: Stalls::default(),
            decided: None,
            record: Record::default(),
        }
    }

    /// What the wait amounted to (for the record of a held request).
    pub fn record(&self) -> &Record {
        &self.record
    }

    /// The next action, given what the last one returned.
    pub fn step(
        &mut self,
        now: Now,
        input: Input<'_>,
        policy: &mut dyn Policy,
        obs: &dyn Observer,
    ) -> Result<Action<'_>, PolicyError> {
        match (self.phase, input) {
            (Phase::Start, Input::Start) => Ok(self.scan(false)),
            (Phase::Scanning, Input::Scanned { snapshot, listed }) => {
                self.record.scans.0 += 1;
                self.record.scans.1 += listed as u32;
                self.snap = snapshot;
                self.listed = listed;
                let contended = !self.snap.waiters.is_empty()
                    || (!self.snap.holders.is_empty() && !self.nonblocking());
                if contended && !self.policy_loaded {
                    self.phase = Phase::Loading;
                    return Ok(Action::LoadPolicy {
                        until: self.deadline,
                    });
                }
                self.look(now, policy, obs)
            }
            (Phase::Loading, Input::PolicyReady(r)) => {
                self.policy_loaded = r.loaded;
                if r.waited {
                    // No decision may rest on a snapshot older than the policy that ranks it:
                    // look again, from a listing (a place that looks later than it is costs
                    // at most one more look).
                    return Ok(self.scan(true));
                }
                self.look(now, policy, obs)
            }
            (Phase::Trying, Input::Tried(granted)) => {
                obs.event(
                    now,
                    &Event::Tried {
                        granted: granted.is_some(),
                    },
                );
                match granted {
                    Some(t) => Ok(self.acquired(now, t, obs)),
                    None => self.decide(now, policy, obs),
                }
            }
            (Phase::TryingFast { removed, mut plan }, Input::Tried(granted)) => {
                obs.event(
                    now,
                    &Event::Tried {
                        granted: granted.is_some(),
                    },
                );
                if let Some(t) = granted {
                    return Ok(self.acquired(now, t, obs));
                }
                if removed {
                    return Ok(self.scan(false));
                }
                plan.tick_at = now.at + plan.interval;
                self.phase = Phase::Waiting(plan);
                Ok(self.next_wait(now))
            }
            (Phase::Waiting(plan), Input::Woke(w)) => Ok(self.woke(now, plan, w)),
            (phase, input) => {
                debug_assert!(false, "{input:?} in {phase:?}");
                Ok(self.scan(false))
            }
        }
    }

    /// Ends the wait by a terminating signal or a failure of the store or the policy (the
    /// driver leaves the queue and reports `reason`).
    pub fn end(
        &mut self,
        now: Now,
        outcome: Outcome,
        reason: &str,
        policy: &dyn Policy,
        obs: &dyn Observer,
    ) {
        if matches!(self.phase, Phase::Done) {
            return;
        }
        self.finish(now, outcome, reason, policy, obs);
    }

    fn nonblocking(&self) -> bool {
        self.cfg.wait_limit == Some(Duration::ZERO)
    }

    fn deadline_passed(&self, now: Now) -> bool {
        self.deadline.is_some_and(|d| now.at >= d)
    }

    fn scan(&mut self, listing: bool) -> Action<'static> {
        self.phase = Phase::Scanning;
        Action::Scan { listing }
    }

    /// Ranks the queue, passes stalled heads, and tries when in the head set.
    fn look(
        &mut self,
        now: Now,
        policy: &mut dyn Policy,
        obs: &dyn Observer,
    ) -> Result<Action<'_>, PolicyError> {
        let mut all = Vec::with_capacity(self.snap.waiters.len() + 1);
        all.extend(self.snap.waiters.iter().cloned());
        all.push(self.me.clone());
        let ordered = order::order(all, self.me.id(), policy, now.wall_ms)?;
        let ordered = self.pass_stalled(ordered, now, obs);
        let pos = ordered
            .iter()
            .position(|(t, _)| t.id() == self.me.id())
            .expect("own ticket is ranked");
        let head_len = order::head_len(&ordered, self.cfg.slots);
        let in_head = pos < head_len;
        let position = Position {
            position: pos + 1,
            of: ordered.len(),
        };
        self.record.position_at_arrival.get_or_insert(position);
        obs.event(
            now,
            &Event::Ranked {
                position,
                in_head,
                holders: &self.snap.holders,
                order: &ordered,
                listed: self.listed,
            },
        );
        self.eval = Evaluation {
            ordered,
            pos,
            head_len,
            in_head,
        };
        if in_head {
            self.phase = Phase::Trying;
            return Ok(Action::Try);
        }
        self.decide(now, policy, obs)
    }

    /// Drops passed tickets from `ordered` and, on a full look, passes the head set ahead of
    /// us when it has left the lock free too long (see [`stall`]).
    fn pass_stalled(
        &mut self,
        ordered: Vec<(TicketData, i64)>,
        now: Now,
        obs: &dyn Observer,
    ) -> Vec<(TicketData, i64)> {
        let me = self.me.id();
        self.stalls.forget_gone(ordered.iter().map(|(t, _)| t.id()));
        let mut ordered: Vec<_> = ordered
            .into_iter()
            .filter(|(t, _)| t.id() == me || !self.stalls.is_passed(t.id()))
            .collect();
        // A listing may show a new holder as waiting: it says nothing of a free lock.
        if self.listed {
            return ordered;
        }
        let free = self.snap.holders.len() < self.cfg.slots as usize;
        loop {
            let head_len = order::head_len(&ordered, self.cfg.slots);
            let pos = ordered
                .iter()
                .position(|(t, _)| t.id() == me)
                .expect("own ticket is ranked");
            let head_ahead = if pos >= head_len {
                &ordered[..head_len]
            } else {
                &[][..]
            };
            let free_for = self.stalls.free_for(now.at);
            if !self
                .stalls
                .observe(now.at, head_ahead.iter().map(|(t, _)| t.id()), free, pos)
            {
                return ordered;
            }
            let passed: Vec<TicketData> = head_ahead.iter().map(|(t, _)| t.clone()).collect();
            obs.event(
                now,
                &Event::Passed {
                    tickets: &passed,
                    free_for,
                },
            );
            ordered.retain(|(t, _)| t.id() == me || !self.stalls.is_passed(t.id()));
        }
    }

    /// Not holding after a look: the caller's bounds, then the policy (or its standing
    /// decision), then a wait.
    fn decide(
        &mut self,
        now: Now,
        policy: &mut dyn Policy,
        obs: &dyn Observer,
    ) -> Result<Action<'_>, PolicyError> {
        let lock = self.me.request().lock.clone();
        let waited = now.at.saturating_sub(self.start);
        let (pos, in_head) = (self.eval.pos, self.eval.in_head);
        if self.nonblocking() {
            let why = if in_head {
                format!(
                    "lock {lock} is {}",
                    describe_holders(&self.holder_views(now))
                )
            } else {
                format!("lock {lock}: {pos} waiter(s) are ahead in the queue")
            };
            return Ok(self.give_up(now, Outcome::Conflict, why, policy, obs));
        }
        if self.deadline_passed(now) {
            let holders = describe_holders(&self.holder_views(now));
            let why = match (in_head, self.untaken_ahead(now)) {
                (false, Some(why)) => why,
                (false, None) => format!("{holders}; {pos} waiter(s) ahead in the queue"),
                (true, _) => holders,
            };
            let message = format!(
                "timed out after {:.2}s waiting for lock {lock} ({why})",
                waited.as_secs_f64()
            );
            return Ok(self.give_up(now, Outcome::Timeout, message, policy, obs));
        }
        // The policy is asked only when the queue changed (who holds, who waits in which
        // order) or its last interval has passed; meanwhile its decision stands.
        let queue = queue_print(&self.snap.holders, &self.eval.ordered);
        if let Some(d) = self.decided {
            let end = d.at + d.interval;
            if d.queue == queue && end > now.at {
                return Ok(self.plan(now, end - now.at, obs));
            }
        }
        let state = WaitState {
            me: self.me.ticket.clone(),
            holders: self.snap.holders.iter().map(|t| t.ticket.clone()).collect(),
            waiters: self.snap.waiters.iter().map(|t| t.ticket.clone()).collect(),
            waited_ms: waited.as_millis() as u64,
            evaluations: self.record.decisions,
            now_ms: now.wall_ms,
        };
        let decision = policy.on_wait(&state)?;
        let evaluations = self.record.decisions;
        self.record.decisions += 1;
        let refused = matches!(decision, WaitDecision::FallBack(_)) && !self.cfg.fallback_allowed;
        obs.event(
            now,
            &Event::Decided {
                decision: &decision,
                refused,
                evaluations,
            },
        );
        self.record.last_decision = Some(decision.clone());
        let interval = match decision {
            WaitDecision::KeepWaiting(ms) => Duration::from_millis(ms.max(1)),
            WaitDecision::GiveUp(reason) => {
                let message = format!(
                    "policy '{}' gave up waiting for lock {lock}: {}",
                    policy.name(),
                    crate::output::escape(&reason)
                );
                return Ok(self.give_up(now, Outcome::GaveUp, message, policy, obs));
            }
            WaitDecision::FallBack(reason) if !refused => {
                // Printed and passed on by every caller: a policy may echo other users' labels.
                let reason = crate::output::escape(&reason).into_owned();
                self.finish(now, Outcome::FellBack, &reason, policy, obs);
                return Ok(Action::Done(End::FellBack { reason }));
            }
            WaitDecision::FallBack(_) => REFUSED_FALLBACK_INTERVAL,
        };
        self.decided = Some(Decided {
            at: now.at,
            interval,
            queue,
        });
        Ok(self.plan(now, interval, obs))
    }

    /// Starts a wait of at most `interval` (capped by the deadline).
    fn plan(&mut self, now: Now, interval: Duration, obs: &dyn Observer) -> Action<'_> {
        let mut interval = interval;
        if let Some(d) = self.deadline {
            interval = interval.min(d.saturating_sub(now.at));
        }
        let interval = interval.max(Duration::from_millis(1));
        let plan = Plan {
            in_head: self.eval.in_head,
            near_head: self.eval.pos <= self.eval.head_len,
            interval,
            eval_at: now.at + interval.max(FULL_EVAL_PERIOD),
            tick_at: now.at + interval,
            changed: false,
        };
        obs.event(
            now,
            &Event::Waits {
                position: Position {
                    position: self.eval.pos + 1,
                    of: self.eval.ordered.len(),
                },
                holders: &self.snap.holders,
                until: self.deadline.map_or(plan.eval_at, |d| d.min(plan.eval_at)),
            },
        );
        self.phase = Phase::Waiting(plan);
        self.next_wait(now)
    }

    /// Within a wait: sleep on, or look again when the look is due.
    fn next_wait(&mut self, now: Now) -> Action<'_> {
        let Phase::Waiting(plan) = self.phase else {
            return self.scan(false);
        };
        let deadline_passed = self.deadline_passed(now);
        if now.at >= plan.eval_at || deadline_passed {
            // A periodic look behind the head set with nothing seen changing may be answered
            // from a listing — unless the lock looked free: then the head set ahead must be
            // timed (see `stall`), which only a full look can.
            let free = self.snap.holders.len() < self.cfg.slots as usize;
            let listing = !plan.near_head && !plan.changed && !deadline_passed && !free;
            return self.scan(listing);
        }
        let mut until = plan.tick_at.min(plan.eval_at);
        if let Some(d) = self.deadline {
            until = until.min(d);
        }
        let watch = match self.eval.pos {
            p if !plan.in_head && p > 0 => Watch::Ahead(&self.eval.ordered[p - 1].0),
            _ => Watch::Lock,
        };
        Action::Wait { until, watch }
    }

    fn woke(&mut self, now: Now, mut plan: Plan, wake: Wake) -> Action<'_> {
        match wake {
            Wake::Signal => {}
            // Someone left (typically the holder releasing): try before looking, which keeps
            // the look off the hand-off's critical path.
            Wake::Removed if plan.in_head => {
                self.phase = Phase::TryingFast {
                    removed: true,
                    plan,
                };
                return Action::Try;
            }
            Wake::Changed | Wake::Removed if plan.near_head => return self.scan(false),
            Wake::Changed | Wake::Removed => {
                plan.changed = true;
                plan.eval_at = plan.eval_at.min(now.at + BACK_OF_QUEUE_DEBOUNCE);
            }
            Wake::Timeout => {
                if now.at >= plan.tick_at && now.at < plan.eval_at {
                    // The cheap path: the holder may have died, or an orphan exited, without
                    // the queue changing; one try, no look, no policy.
                    if plan.in_head {
                        self.phase = Phase::TryingFast {
                            removed: false,
                            plan,
                        };
                        return Action::Try;
                    }
                    plan.tick_at = now.at + plan.interval;
                }
            }
        }
        self.phase = Phase::Waiting(plan);
        self.next_wait(now)
    }

    fn acquired(&mut self, now: Now, held: &TicketData, obs: &dyn Observer) -> Action<'static> {
        let waited = now.at.saturating_sub(self.start);
        self.record.waited = waited;
        self.me = held.clone();
        obs.event(
            now,
            &Event::Acquired {
                ticket: held,
                waited,
            },
        );
        self.phase = Phase::Done;
        Action::Done(End::Acquired)
    }

    fn give_up(
        &mut self,
        now: Now,
        outcome: Outcome,
        message: String,
        policy: &dyn Policy,
        obs: &dyn Observer,
    ) -> Action<'static> {
        self.finish(now, outcome, &message, policy, obs);
        Action::Done(End::GaveUp { outcome, message })
    }

    /// The final event of a request that did not hold the lock.
    fn finish(
        &mut self,
        now: Now,
        outcome: Outcome,
        reason: &str,
        policy: &dyn Policy,
        obs: &dyn Observer,
    ) {
        self.phase = Phase::Done;
        self.record.waited = now.at.saturating_sub(self.start);
        obs.event(
            now,
            &Event::Finished(Summary {
                ticket: &self.me,
                policy: policy.name(),
                digest: policy.digest(),
                faults: policy.faults(),
                outcome,
                reason: Some(reason),
                waited: self.record.waited,
                held: None,
                position_at_arrival: self.record.position_at_arrival,
                decisions: self.record.decisions,
                last_decision: self.record.last_decision.as_ref(),
            }),
        );
    }

    /// Why a free lock is not ours: the head set ahead of us has left it untaken, if so.
    fn untaken_ahead(&self, now: Now) -> Option<String> {
        if self.snap.holders.len() >= self.cfg.slots as usize {
            return None;
        }
        let d = self.stalls.free_for(now.at);
        let (t, _) = self.eval.ordered.first().filter(|_| !d.is_zero())?;
        let r = t.request();
        Some(format!(
            "it is free, but ticket {} of {}:{}, first in line, has not taken it for {:.1}s (a stopped process, a ticket planted in the lock directory, or a process without a ticket holds the lock); after {}s the next in line tries it",
            crate::output::escape(t.id()),
            crate::output::escape(&r.host),
            r.pid,
            d.as_secs_f64(),
            stall::GRACE.as_secs()
        ))
    }

    fn holder_views(&self, now: Now) -> Vec<HolderView> {
        holder_views(&self.snap.holders, now.wall_ms)
    }
}

/// What progress lines and messages show of the holders.
pub fn holder_views(holders: &[TicketData], now_ms: u64) -> Vec<HolderView> {
    holders
        .iter()
        .map(|h| HolderView {
            host: h.request().host.clone(),
            pid: h.request().pid,
            ticket: h.id().to_string(),
            held_for_ms: h.acquired_at_ms.map(|a| now_ms.saturating_sub(a)),
        })
        .collect()
}

/// A fingerprint of the queue as one waiter sees it: the holders and the waiters in order.
fn queue_print(holders: &[TicketData], ordered: &[(TicketData, i64)]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for t in holders {
        t.id().hash(&mut h);
    }
    0xff_u8.hash(&mut h);
    for (t, _) in ordered {
        t.id().hash(&mut h);
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::events::Event;
    use crate::policy::native::DefaultPolicy;
    use crate::policy::{RetryDecision, StartAttempt, StartFailure, Ticket};
    use std::sync::Mutex;

    /// Ranks by priority; `on-wait` answers `decide`; counts calls.
    struct Scripted<F: FnMut(&WaitState) -> WaitDecision> {
        decide: F,
        ranks: u32,
        waits: u32,
    }

    fn scripted<F: FnMut(&WaitState) -> WaitDecision>(decide: F) -> Scripted<F> {
        Scripted {
            decide,
            ranks: 0,
            waits: 0,
        }
    }

    impl<F: FnMut(&WaitState) -> WaitDecision> Policy for Scripted<F> {
        fn name(&self) -> &str {
            "scripted"
        }
        fn rank(&mut self, t: &Ticket, _: u64) -> Result<i64, PolicyError> {
            self.ranks += 1;
            Ok(t.request.priority as i64)
        }
        fn on_wait(&mut self, s: &WaitState) -> Result<WaitDecision, PolicyError> {
            self.waits += 1;
            Ok((self.decide)(s))
        }
        fn start_timeout_ms(&mut self, _: &StartAttempt) -> Result<u64, PolicyError> {
            unreachable!()
        }
        fn on_start_failure(
            &mut self,
            _: &StartAttempt,
            _: &StartFailure,
            _: &str,
        ) -> Result<RetryDecision, PolicyError> {
            unreachable!()
        }
        fn stop_timeout_ms(&mut self, _: Option<&str>) -> Result<u64, PolicyError> {
            unreachable!()
        }
    }

    /// The events seen, as short strings.
    #[derive(Default)]
    struct Seen(Mutex<Vec<(Duration, String)>>);

    impl Observer for Seen {
        fn event(&self, now: Now, e: &Event<'_>) {
            let s = match e {
                Event::Arrived { .. } => "arrived".to_string(),
                Event::Ranked { position, .. } => format!("ranked {}", position.position),
                Event::Passed { tickets, .. } => {
                    let ids: Vec<&str> = tickets.iter().map(|t| t.id()).collect();
                    format!("passed {}", ids.join(","))
                }
                Event::Tried { granted } => format!("tried {granted}"),
                Event::Decided { refused, .. } => format!("decided refused={refused}"),
                Event::Waits { .. } => "waits".to_string(),
                Event::Acquired { .. } => "acquired".to_string(),
                Event::Finished(s) => format!("finished {}", s.outcome.as_str()),
            };
            self.0.lock().unwrap().push((now.at, s));
        }
    }

    impl Seen {
        fn has(&self, what: &str) -> Vec<Duration> {
            let v = self.0.lock().unwrap();
            v.iter()
                .filter(|(_, s)| s == what)
                .map(|(t, _)| *t)
                .collect()
        }
    }

    fn at(ms: u64) -> Now {
        Now {
            at: Duration::from_millis(ms),
            wall_ms: 1_000_000 + ms,
        }
    }

    fn ticket(id: &str, at_ms: u64, opts: &Options) -> TicketData {
        TicketData::new(opts, id.into(), at_ms, "h".into(), 1)
    }

    fn snap(holders: &[TicketData], waiters: &[TicketData]) -> Snapshot {
        Snapshot {
            holders: holders.to_vec(),
            waiters: waiters.to_vec(),
        }
    }

    /// A request `me` (arrived at 0) and what it asks for first.
    fn start(opts: &Options, obs: &Seen) -> Scheduler {
        Scheduler::new(
            Config::from(opts),
            ticket("me", 1_000_100, opts),
            at(0),
            obs,
        )
    }

    fn held(opts: &Options) -> TicketData {
        let mut t = ticket("me", 1_000_100, opts);
        t.hold(0, 1, 1_000_000);
        t
    }

    #[test]
    fn an_uncontended_request_never_calls_the_policy() {
        let opts = Options::new("l");
        let obs = Seen::default();
        let mut s = start(&opts, &obs);
        let mut p = scripted(|_| unreachable!());
        assert!(matches!(
            s.step(at(0), Input::Start, &mut p, &obs).unwrap(),
            Action::Scan { listing: false }
        ));
        let a = s.step(
            at(0),
            Input::Scanned {
                snapshot: snap(&[], &[]),
                listed: false,
            },
            &mut p,
            &obs,
        );
        assert!(matches!(a.unwrap(), Action::Try));
        let me = held(&opts);
        let a = s
            .step(at(1), Input::Tried(Some(&me)), &mut p, &obs)
            .unwrap();
        assert!(matches!(a, Action::Done(End::Acquired)));
        assert_eq!((p.ranks, p.waits), (0, 0));
    }

    #[test]
    fn nonblock_behind_a_holder_tries_once_and_loads_nothing() {
        let mut opts = Options::new("l");
        opts.wait_limit_ms = Some(0);
        let obs = Seen::default();
        let mut s = start(&opts, &obs);
        let mut p = scripted(|_| unreachable!());
        s.step(at(0), Input::Start, &mut p, &obs).unwrap();
        let h = ticket("h", 1_000_000, &opts);
        let a = s
            .step(
                at(0),
                Input::Scanned {
                    snapshot: snap(&[h], &[]),
                    listed: false,
                },
                &mut p,
                &obs,
            )
            .unwrap();
        assert!(matches!(a, Action::Try));
        match s.step(at(0), Input::Tried(None), &mut p, &obs).unwrap() {
            Action::Done(End::GaveUp {
                outcome: Outcome::Conflict,
                message,
            }) => {
                assert!(message.contains("held by h:1"), "{message}")
            }
            a => panic!("{a:?}"),
        }
        assert_eq!(obs.has("finished conflict").len(), 1);
    }

    #[test]
    fn a_compiling_policy_is_waited_for_no_longer_than_the_callers_bound() {
        for (limit, until) in [(Some(0), Some(0)), (Some(1000), Some(1000)), (None, None)] {
            let mut opts = Options::new("l");
            opts.wait_limit_ms = limit;
            let obs = Seen::default();
            let mut s = start(&opts, &obs);
            let mut p = DefaultPolicy;
            s.step(at(0), Input::Start, &mut p, &obs).unwrap();
            let w = ticket("w", 1_000_000, &opts);
            let a = s
                .step(
                    at(0),
                    Input::Scanned {
                        snapshot: snap(&[], &[w]),
                        listed: false,
                    },
                    &mut p,
                    &obs,
                )
                .unwrap();
            match a {
                Action::LoadPolicy { until: u } => {
                    assert_eq!(u, until.map(Duration::from_millis), "{limit:?}")
                }
                a => panic!("{a:?}"),
            }
        }
    }

    /// Walks a waiting request through timer wake-ups until `stop` is seen, answering each
    /// look with `snapshot`; returns the time reached.
    fn run_until(
        s: &mut Scheduler,
        p: &mut dyn Policy,
        obs: &Seen,
        snapshot: &Snapshot,
        mut t: u64,
        stop: impl Fn(&Action<'_>) -> bool,
    ) -> u64 {
        let mut input = Input::Scanned {
            snapshot: snapshot.clone(),
            listed: false,
        };
        for _ in 0..10_000 {
            let a = s.step(at(t), input, p, obs).unwrap();
            if stop(&a) {
                return t;
            }
            input = match a {
                Action::Scan { .. } => Input::Scanned {
                    snapshot: snapshot.clone(),
                    listed: false,
                },
                Action::LoadPolicy { .. } => Input::PolicyReady(Readiness {
                    waited: false,
                    loaded: true,
                }),
                Action::Try => Input::Tried(None),
                Action::Wait { until, .. } => {
                    t = until.as_millis() as u64;
                    Input::Woke(Wake::Timeout)
                }
                Action::Done(e) => panic!("done: {e:?}"),
            };
        }
        panic!("no end")
    }

    #[test]
    fn any_number_of_stalled_heads_is_passed_one_after_another() {
        let opts = Options::new("l");
        let obs = Seen::default();
        let mut s = start(&opts, &obs);
        let mut p = DefaultPolicy;
        s.step(at(0), Input::Start, &mut p, &obs).unwrap();
        let stalled = snap(
            &[],
            &[
                ticket("s1", 1_000_000, &opts),
                ticket("s2", 1_000_050, &opts),
            ],
        );
        let t = run_until(&mut s, &mut p, &obs, &stalled, 0, |a| {
            matches!(a, Action::Try)
        });
        let p1 = obs.has("passed s1");
        let p2 = obs.has("passed s2");
        assert_eq!((p1.len(), p2.len()), (1, 1));
        // Each head gets the grace as the head; then we are first and try.
        assert!(
            p1[0] >= stall::GRACE && p2[0] >= p1[0] + stall::GRACE,
            "{p1:?} {p2:?}"
        );
        assert_eq!(Duration::from_millis(t), p2[0]);
    }

    #[test]
    fn decisions_stand_until_the_queue_changes_or_their_interval_passes() {
        let opts = Options::new("l");
        let obs = Seen::default();
        let mut s = start(&opts, &obs);
        let mut p = scripted(|_| WaitDecision::KeepWaiting(1000));
        s.step(at(0), Input::Start, &mut p, &obs).unwrap();
        let h = ticket("h", 1_000_000, &opts);
        let q = snap(std::slice::from_ref(&h), &[]);
        let look = |s: &mut Scheduler, p: &mut dyn Policy, t, q: &Snapshot| {
            let a = s
                .step(
                    at(t),
                    Input::Scanned {
                        snapshot: q.clone(),
                        listed: false,
                    },
                    p,
                    &obs,
                )
                .unwrap();
            let a = match a {
                Action::LoadPolicy { .. } => s
                    .step(
                        at(t),
                        Input::PolicyReady(Readiness {
                            waited: false,
                            loaded: true,
                        }),
                        p,
                        &obs,
                    )
                    .unwrap(),
                a => a,
            };
            assert!(matches!(a, Action::Try), "{a:?}");
            match s.step(at(t), Input::Tried(None), p, &obs).unwrap() {
                Action::Wait { until, .. } => until,
                a => panic!("{a:?}"),
            }
        };
        assert_eq!(look(&mut s, &mut p, 0, &q), Duration::from_millis(1000));
        assert_eq!(p.waits, 1);
        // Woken by a change that changed nothing we rank: the decision stands.
        assert!(matches!(
            s.step(at(300), Input::Woke(Wake::Changed), &mut p, &obs)
                .unwrap(),
            Action::Scan { listing: false }
        ));
        assert_eq!(look(&mut s, &mut p, 300, &q), Duration::from_millis(1000));
        assert_eq!(p.waits, 1);
        // A new waiter: asked again.
        let w = ticket("w", 1_000_200, &opts);
        assert!(matches!(
            s.step(at(400), Input::Woke(Wake::Changed), &mut p, &obs)
                .unwrap(),
            Action::Scan { .. }
        ));
        look(&mut s, &mut p, 400, &snap(&[h], &[w]));
        assert_eq!(p.waits, 2);
    }

    #[test]
    fn a_release_at_the_head_is_tried_before_looking() {
        let opts = Options::new("l");
        let obs = Seen::default();
        let mut s = start(&opts, &obs);
        let mut p = DefaultPolicy;
        s.step(at(0), Input::Start, &mut p, &obs).unwrap();
        let q = snap(&[ticket("h", 1_000_000, &opts)], &[]);
        run_until(&mut s, &mut p, &obs, &q, 0, |a| {
            matches!(a, Action::Wait { .. })
        });
        assert!(matches!(
            s.step(at(5), Input::Woke(Wake::Removed), &mut p, &obs)
                .unwrap(),
            Action::Try
        ));
        let me = held(&opts);
        assert!(matches!(
            s.step(at(5), Input::Tried(Some(&me)), &mut p, &obs)
                .unwrap(),
            Action::Done(End::Acquired)
        ));
    }

    #[test]
    fn a_refused_fall_back_is_asked_again_and_the_deadline_still_holds() {
        let mut opts = Options::new("l");
        opts.wait_limit_ms = Some(1000);
        let obs = Seen::default();
        let mut s = start(&opts, &obs);
        let mut p = scripted(|_| WaitDecision::FallBack("no".into()));
        s.step(at(0), Input::Start, &mut p, &obs).unwrap();
        let q = snap(&[ticket("h", 1_000_000, &opts)], &[]);
        let t = run_until(&mut s, &mut p, &obs, &q, 0, |a| {
            matches!(
                a,
                Action::Done(End::GaveUp {
                    outcome: Outcome::Timeout,
                    ..
                })
            )
        });
        assert_eq!(t, 1000);
        let refused = obs.has("decided refused=true");
        assert!(refused.len() >= 4, "{refused:?}");
        assert_eq!(obs.has("finished timeout").len(), 1);
    }
}
