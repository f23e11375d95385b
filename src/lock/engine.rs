//! The engine: the scheduler ([`super::schedule`]) driven against a real store and the real
//! clock. Each action becomes one backend or policy call and its answer the next input; every
//! way out leaves the queue. The decisions are all the scheduler's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::backend::{Backend, Departure, Held, Queued, Snapshot, Wake};
use super::events::{Both, Event, Now, Observer, Outcome};
use super::schedule::{holder_views, Action, Config, End, Input, Scheduler};
use super::{now_ms, Acquired, Guard, Interrupt, Options};
use crate::error::{Error, Kind, Result};
use crate::output::progress::Progress;
use crate::policy::{Policy, Readiness};

/// What an action returned, kept until the next step.
enum Answer {
    Start,
    Scanned(Snapshot, bool),
    Ready(Readiness),
    Tried,
    Woke(Wake),
}

/// Joins the queue and waits; see [`super::acquire`].
pub(super) fn run(
    backend: &dyn Backend,
    opts: &Options,
    policy: &mut dyn Policy,
    interrupt: &dyn Interrupt,
) -> Result<Acquired> {
    let origin = Instant::now();
    let now = || Now {
        at: origin.elapsed(),
        wall_ms: now_ms(),
    };
    let console = Console::new(opts, policy.name());
    let obs = Both(&console, &opts.observers);
    let mut queued = Leaving(Some(backend.enqueue(opts)?));
    let mut sched = Scheduler::new(
        Config::from(opts),
        queued.get().ticket().clone(),
        now(),
        &obs,
    );
    let mut held: Option<Box<dyn Held>> = None;
    let mut answer = Answer::Start;
    loop {
        let input = match answer {
            Answer::Start => Input::Start,
            Answer::Scanned(snapshot, listed) => Input::Scanned { snapshot, listed },
            Answer::Ready(r) => Input::PolicyReady(r),
            Answer::Tried => Input::Tried(held.as_deref().map(|h| h.ticket())),
            Answer::Woke(w) => Input::Woke(w),
        };
        let action = match sched.step(now(), input, policy, &obs) {
            Ok(a) => a,
            Err(e) => {
                let e = Error::from(e);
                sched.end(now(), Outcome::Error, &e.message, policy, &obs);
                queued.depart(Outcome::Error, &sched, policy);
                return Err(e);
            }
        };
        let done = match action {
            Action::Scan { listing } => {
                if let Some(sig) = interrupt.take() {
                    let e = interrupted(&mut sched, sig, opts, policy, &obs, now());
                    queued.depart(Outcome::Interrupted, &sched, policy);
                    return Err(e);
                }
                let q = queued.get();
                let r = if listing {
                    q.rescan()
                } else {
                    q.scan().map(|s| (s, false))
                };
                r.map(|(s, listed)| Answer::Scanned(s, listed))
            }
            Action::LoadPolicy { until } => policy
                .ready(until.map(|u| origin + u))
                .map(Answer::Ready)
                .map_err(Error::from),
            Action::Try => queued.get().try_acquire().map(|h| {
                held = h;
                Answer::Tried
            }),
            Action::Wait { until, watch } => {
                match queued
                    .get()
                    .wait(Some(origin + until), watch, interrupt.fd())
                {
                    Ok(Wake::Signal) => match interrupt.take() {
                        Some(sig) => {
                            let e = interrupted(&mut sched, sig, opts, policy, &obs, now());
                            queued.depart(Outcome::Interrupted, &sched, policy);
                            return Err(e);
                        }
                        None => Ok(Answer::Woke(Wake::Signal)),
                    },
                    r => r.map(Answer::Woke),
                }
            }
            Action::Done(end) => {
                return finish(end, &mut queued, held.take(), &sched, opts, policy, origin)
            }
        };
        answer = match done {
            Ok(a) => a,
            Err(e) => {
                sched.end(now(), Outcome::Error, &e.message, policy, &obs);
                queued.depart(Outcome::Error, &sched, policy);
                return Err(e);
            }
        };
    }
}

/// Carries out the end of a wait.
fn finish(
    end: End,
    queued: &mut Leaving,
    held: Option<Box<dyn Held>>,
    sched: &Scheduler,
    opts: &Options,
    policy: &dyn Policy,
    origin: Instant,
) -> Result<Acquired> {
    match end {
        End::Acquired => {
            // The queue handle is spent: the held lock owns the ticket now.
            drop(queued.0.take());
            let held = held.expect("a granted lock is held");
            let r = sched.record();
            tracing::debug!(
                "lock {}: acquired after {} look(s) at the queue ({} from the listing alone), {} on-wait call(s), {:.1} ms",
                opts.name,
                r.scans.0,
                r.scans.1,
                r.decisions,
                r.waited.as_secs_f64() * 1000.0
            );
            Ok(Acquired::Held(Guard::new(held, r, opts, policy, origin)))
        }
        End::GaveUp { message, outcome } => {
            queued.depart(outcome, sched, policy);
            let keep = opts
                .queue_key
                .as_ref()
                .map(|_| Duration::from_millis(opts.key_grace_ms));
            queued.leave(keep);
            Err(Error::conflict(opts.conflict_exit_code, message))
        }
        End::FellBack { reason } => {
            queued.depart(Outcome::FellBack, sched, policy);
            queued.leave(None);
            Ok(Acquired::FellBack { reason })
        }
    }
}

fn interrupted(
    sched: &mut Scheduler,
    sig: i32,
    opts: &Options,
    policy: &dyn Policy,
    obs: &dyn Observer,
    now: Now,
) -> Error {
    let e = Error::new(
        Kind::Signal(sig),
        format!(
            "interrupted by signal {sig} while waiting for lock {}; left the queue",
            opts.name
        ),
    );
    sched.end(now, Outcome::Interrupted, &e.message, policy, obs);
    e
}

/// The queue handle: left on every way out (an error of the store or the policy included)
/// rather than lingering in the queue.
struct Leaving(Option<Box<dyn Queued>>);

impl Leaving {
    fn get(&mut self) -> &mut dyn Queued {
        self.0.as_deref_mut().expect("queued until done")
    }

    /// Tells the store how the request ends (see `Queued::depart`).
    fn depart(&mut self, outcome: Outcome, sched: &Scheduler, policy: &dyn Policy) {
        if let Some(q) = self.0.as_deref_mut() {
            q.depart(&Departure {
                outcome,
                waited: sched.record().waited,
                held: None,
                policy: policy.name(),
                digest: policy.digest(),
            });
        }
    }

    fn leave(&mut self, keep_place_for: Option<Duration>) {
        if let Some(q) = self.0.take() {
            q.leave(keep_place_for);
        }
    }
}

impl Drop for Leaving {
    fn drop(&mut self) {
        self.leave(None);
    }
}

/// What a waiting request says on stderr: progress lines (unless quiet) and, once, that a
/// fall-back the lock's rule does not allow is not taken.
struct Console {
    lock: String,
    policy: String,
    progress: Option<Mutex<Progress>>,
    said_refused: AtomicBool,
}

impl Console {
    fn new(opts: &Options, policy: &str) -> Console {
        Console {
            lock: opts.name.clone(),
            policy: policy.to_string(),
            progress: opts
                .progress_interval
                .map(|i| Mutex::new(Progress::new(&opts.name, i))),
            said_refused: AtomicBool::new(false),
        }
    }

    fn progress(&self) -> Option<std::sync::MutexGuard<'_, Progress>> {
        self.progress
            .as_ref()
            .map(|p| p.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Observer for Console {
    fn event(&self, now: Now, event: &Event<'_>) {
        match event {
            Event::Waits {
                position, holders, ..
            } => {
                if let Some(mut p) = self.progress() {
                    if p.due(now.at) {
                        p.waiting(
                            now.at,
                            &holder_views(holders, now.wall_ms),
                            position.position,
                            position.of,
                        );
                    }
                }
            }
            Event::Acquired { waited, .. } => {
                if let Some(p) = self.progress() {
                    p.acquired(*waited);
                }
            }
            Event::Decided {
                decision: crate::policy::WaitDecision::FallBack(reason),
                refused: true,
                ..
            } if !self.said_refused.swap(true, Ordering::Relaxed) => {
                tracing::warn!(
                        "policy '{}' asked to fall back ({}) but lock {} does not allow it (set `fallback: true` in its rule); waiting on (said once)",
                        self.policy,
                        crate::output::escape(reason),
                        self.lock
                    );
            }
            _ => {}
        }
    }
}
