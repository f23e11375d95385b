//! The wait loop every backend shares: scan, rank, try when in the head set, else ask the
//! policy how long to wait (bounded by the caller), sleep until a change or that interval, and
//! leave the queue on every way out.

use std::time::{Duration, Instant};

use super::backend::{Backend, Held, Queued, Snapshot, TicketData, Wake, Watch};
use super::stall::{self, Stalls};
use super::{now_ms, order, Acquired, Guard, Options};
use crate::error::{Error, Kind, Result};
use crate::output::progress::{HolderView, Progress};
use crate::policy::{Policy, WaitDecision, WaitState};
use crate::process::Signals;

/// The shortest interval between two evaluations of a waiter when nothing it watches changes
/// (ranks may age; the head may stall): a policy asking for less gets timer wake-ups that cost
/// one try at the head (when polling) and nothing elsewhere.
const FULL_EVAL_PERIOD: Duration = Duration::from_millis(250);
/// Waiters further back than the one after the head set coalesce changes for this long before
/// re-scanning: where a backend can only watch the whole queue, every release and arrival wakes
/// every waiter, and only the front of the queue needs to react at once.
const BACK_OF_QUEUE_DEBOUNCE: Duration = Duration::from_millis(5);
/// Interval used when the policy's decision cannot be honoured (a fall-back not allowed).
const FALLBACK_INTERVAL_MS: u64 = 100;

/// Joins the queue and waits; see [`super::acquire`].
pub(super) fn run(
    backend: &dyn Backend,
    opts: &Options,
    policy: &mut dyn Policy,
    signals: &Signals,
) -> Result<Acquired> {
    let start = Instant::now();
    let queued = backend.enqueue(opts)?;
    let mut w = Waiter {
        opts,
        queued: Some(queued),
        start,
        deadline: opts
            .wait_limit_ms
            .and_then(|ms| start.checked_add(Duration::from_millis(ms))),
        progress: Progress::new(&opts.name, opts.progress_interval),
        evaluations: 0,
        scans: 0,
        listed: 0,
        quiet: false,
        stalls: Stalls::default(),
        decided: None,
    };
    w.run(policy, signals)
}

struct Waiter<'a> {
    opts: &'a Options,
    queued: Option<Box<dyn Queued>>,
    start: Instant,
    deadline: Option<Instant>,
    progress: Progress,
    evaluations: u32,
    /// Scans of the queue (for the debug line at acquisition: what waiting cost).
    scans: u32,
    /// Of those, answered from a listing and the previous scan ([`Queued::rescan`]).
    listed: u32,
    /// The next evaluation is a periodic one behind the head set with nothing seen changing:
    /// the backend may answer it from its last scan ([`Queued::rescan`]).
    quiet: bool,
    /// Tickets ahead seen leaving a free lock untaken (a stopped head, a planted ticket).
    stalls: Stalls,
    /// The policy's last `keep-waiting` and what the queue looked like then: the policy is
    /// asked again only when the queue changed or its interval has passed.
    decided: Option<Decided>,
}

/// A `keep-waiting` decision and the queue it was made for.
struct Decided {
    at: Instant,
    interval: Duration,
    queue: u64,
}

/// What one full evaluation decided.
enum Next {
    Done(Acquired),
    Wait {
        in_head: bool,
        /// Whether this waiter is in, or right behind, the head set.
        near_head: bool,
        /// The waiter just before us in the queue's order (none in the head set).
        ahead: Option<Box<TicketData>>,
        interval: Duration,
    },
}

impl Waiter<'_> {
    fn queued(&mut self) -> &mut dyn Queued {
        self.queued.as_deref_mut().expect("queued until done")
    }

    fn run(&mut self, policy: &mut dyn Policy, signals: &Signals) -> Result<Acquired> {
        loop {
            if let Some(sig) = signals.take_terminating() {
                return Err(self.interrupted(sig));
            }
            let (in_head, near_head, ahead, interval) = match self.evaluate(policy)? {
                Next::Done(a) => return Ok(a),
                Next::Wait {
                    in_head,
                    near_head,
                    ahead,
                    interval,
                } => (in_head, near_head, ahead, interval),
            };
            let watch = match &ahead {
                Some(t) if !in_head => Watch::Ahead(t),
                _ => Watch::Lock,
            };
            let now = Instant::now();
            let mut eval_at = now + interval.max(FULL_EVAL_PERIOD);
            let mut tick_at = now + interval;
            let mut changed = false;
            loop {
                let now = Instant::now();
                if now >= eval_at || self.deadline.is_some_and(|d| now >= d) {
                    self.quiet = !near_head && !changed && self.deadline.is_none_or(|d| now < d);
                    break;
                }
                let mut wake_at = tick_at.min(eval_at);
                if let Some(d) = self.deadline {
                    wake_at = wake_at.min(d);
                }
                match self.queued().wait(Some(wake_at), watch, signals.fd())? {
                    Wake::Signal => {
                        if let Some(sig) = signals.take_terminating() {
                            return Err(self.interrupted(sig));
                        }
                    }
                    Wake::Removed if in_head => {
                        // Someone left (typically the holder releasing): try before scanning,
                        // which keeps the scan off the hand-off's critical path.
                        if let Some(held) = self.queued().try_acquire()? {
                            return Ok(Acquired::Held(self.acquired(held)));
                        }
                        break;
                    }
                    Wake::Changed | Wake::Removed if near_head => break,
                    Wake::Changed | Wake::Removed => {
                        changed = true;
                        eval_at = eval_at.min(now + BACK_OF_QUEUE_DEBOUNCE);
                    }
                    Wake::Timeout => {
                        let now = Instant::now();
                        if now >= tick_at && now < eval_at {
                            // The cheap path: the holder may have died, or an orphan exited,
                            // without the queue changing; one try, no scan, no policy.
                            if in_head {
                                if let Some(held) = self.queued().try_acquire()? {
                                    return Ok(Acquired::Held(self.acquired(held)));
                                }
                            }
                            tick_at = now + interval;
                        }
                    }
                }
            }
        }
    }

    /// Scan, rank, try if at the head, else ask the policy how long to wait.
    fn evaluate(&mut self, policy: &mut dyn Policy) -> Result<Next> {
        self.scans += 1;
        let (mut snap, mut listed) = if std::mem::take(&mut self.quiet) {
            self.queued().rescan()?
        } else {
            (self.queued().scan()?, false)
        };
        // When the policy will be consulted (others to rank, or a holder to wait for), load it
        // first (a bounded wait for a compile); a snapshot taken before that wait is stale and
        // is taken again — from a listing, reading only tickets that arrived meanwhile (a place
        // that looks later than it is costs at most one more look). An uncontended request, or
        // `-n` behind a holder alone, never loads it.
        let consulted = !snap.waiters.is_empty()
            || (!snap.holders.is_empty() && self.opts.wait_limit_ms != Some(0));
        if consulted && policy.ready()? {
            (snap, listed) = self.queued().rescan()?;
        }
        if listed {
            self.listed += 1;
        }
        let now = now_ms();
        let me = self.queued().ticket().clone();
        let mut all = snap.waiters.clone();
        all.push(me.clone());
        let ordered = order::order(all, &me.id, policy, now)?;
        // A snapshot from the listing may show a new holder as waiting: it says nothing of
        // whether the lock stays free.
        let ordered = self.skip_stalled(ordered, &me.id, &snap, !listed);
        let pos = ordered
            .iter()
            .position(|(t, _)| t.id == me.id)
            .expect("own ticket is ranked");
        let head_len = order::head_len(&ordered, self.opts.slots.max(1));
        let in_head = pos < head_len;
        if in_head {
            if let Some(held) = self.queued().try_acquire()? {
                return Ok(Next::Done(Acquired::Held(self.acquired(held))));
            }
        }
        let waited = self.start.elapsed();
        let holders = holder_views(&snap, now);
        if self.opts.wait_limit_ms == Some(0) {
            let why = if in_head {
                format!(
                    "lock {} is {}",
                    self.opts.name,
                    crate::output::progress::describe_holders(&holders)
                )
            } else {
                format!(
                    "lock {}: {pos} waiter(s) are ahead in the queue",
                    self.opts.name
                )
            };
            return Err(self.give_up(why));
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            let why = match (in_head, self.untaken_ahead(&ordered[..head_len], &snap)) {
                (false, Some(why)) => why,
                (false, None) => format!(
                    "{}; {pos} waiter(s) ahead in the queue",
                    crate::output::progress::describe_holders(&holders)
                ),
                (true, _) => crate::output::progress::describe_holders(&holders),
            };
            return Err(self.give_up(format!(
                "timed out after {:.2}s waiting for lock {} ({why})",
                waited.as_secs_f64(),
                self.opts.name,
            )));
        }
        // The policy is asked only when the queue changed (who holds, who waits in which
        // order) or its last interval has passed; meanwhile its decision stands.
        let queue = queue_print(&snap.holders, &ordered);
        let reuse = self.decided.as_ref().and_then(|d| {
            let left = (d.at + d.interval).checked_duration_since(Instant::now())?;
            (d.queue == queue && !left.is_zero()).then_some(left)
        });
        let ahead = (!in_head && pos > 0).then(|| Box::new(ordered[pos - 1].0.clone()));
        if let Some(left) = reuse {
            let mut interval = left;
            if let Some(d) = self.deadline {
                interval = interval.min(d.saturating_duration_since(Instant::now()));
            }
            self.progress.waiting(&holders, pos + 1, ordered.len());
            return Ok(Next::Wait {
                in_head,
                near_head: pos <= head_len,
                ahead,
                interval: interval.max(Duration::from_millis(1)),
            });
        }
        let state = WaitState {
            me: me.to_ticket(),
            holders: snap.holders.iter().map(TicketData::to_ticket).collect(),
            waiters: snap.waiters.iter().map(TicketData::to_ticket).collect(),
            waited_ms: waited.as_millis() as u64,
            evaluations: self.evaluations,
            now_ms: now,
        };
        self.evaluations += 1;
        let ms = match policy.on_wait(&state)? {
            WaitDecision::KeepWaiting(ms) => ms,
            WaitDecision::GiveUp(reason) => {
                return Err(self.give_up(format!(
                    "policy '{}' gave up waiting for lock {}: {}",
                    policy.name(),
                    self.opts.name,
                    crate::output::escape(&reason)
                )))
            }
            WaitDecision::FallBack(reason) if self.opts.fallback_allowed => {
                if let Some(q) = self.queued.take() {
                    q.leave(None);
                }
                // Printed and passed on by every caller: a policy may echo other users' labels.
                let reason = crate::output::escape(&reason).into_owned();
                return Ok(Next::Done(Acquired::FellBack { reason }));
            }
            WaitDecision::FallBack(reason) => {
                tracing::warn!(
                    "policy '{}' asked to fall back ({}) but lock {} does not allow it (set `fallback: true` in its rule); waiting on",
                    policy.name(),
                    crate::output::escape(&reason),
                    self.opts.name
                );
                FALLBACK_INTERVAL_MS
            }
        };
        let mut interval = Duration::from_millis(ms.max(1));
        self.decided = Some(Decided {
            at: Instant::now(),
            interval,
            queue,
        });
        if let Some(d) = self.deadline {
            interval = interval.min(d.saturating_duration_since(Instant::now()));
        }
        self.progress.waiting(&holders, pos + 1, ordered.len());
        Ok(Next::Wait {
            in_head,
            near_head: pos <= head_len,
            ahead,
            interval: interval.max(Duration::from_millis(1)),
        })
    }

    /// Records what this evaluation saw of the head set ahead of us and drops from `ordered`
    /// the tickets that have left a free lock untaken for longer than [`stall::GRACE`].
    fn skip_stalled(
        &mut self,
        ordered: Vec<(TicketData, i64)>,
        me: &str,
        snap: &Snapshot,
        observe: bool,
    ) -> Vec<(TicketData, i64)> {
        let slots = self.opts.slots.max(1);
        let free = snap.holders.len() < slots as usize;
        let head_len = order::head_len(&ordered, slots);
        let ahead: Vec<&str> = ordered[..head_len]
            .iter()
            .map(|(t, _)| t.id.as_str())
            .take_while(|id| *id != me)
            .collect();
        let ahead = if ahead.len() == head_len {
            ahead
        } else {
            Vec::new()
        };
        self.stalls.observe(
            ahead,
            free && observe,
            ordered.iter().map(|(t, _)| t.id.as_str()),
            Instant::now(),
        );
        let stalls = &self.stalls;
        ordered
            .into_iter()
            .filter(|(t, _)| t.id == me || !stalls.is_stalled(&t.id))
            .collect()
    }

    /// Why a free lock is not ours: the first of `head` (the head set, ahead of us) seen
    /// leaving it untaken, if the lock looks free.
    fn untaken_ahead(&self, head: &[(TicketData, i64)], snap: &Snapshot) -> Option<String> {
        if snap.holders.len() >= self.opts.slots.max(1) as usize {
            return None;
        }
        let (t, d) = head
            .iter()
            .map(|(t, _)| (t, self.stalls.free_for(&t.id)))
            .find(|(_, d)| !d.is_zero())?;
        Some(format!(
            "it is free, but ticket {} of {}:{}, first in line, has not taken it for {:.1}s (a stopped process, a ticket planted in the lock directory, or a process without a ticket holds the lock); after {}s the next in line tries it",
            crate::output::escape(&t.id),
            crate::output::escape(&t.host),
            t.pid,
            d.as_secs_f64(),
            stall::GRACE.as_secs()
        ))
    }

    fn acquired(&mut self, held: Box<dyn Held>) -> Guard {
        // The queue handle is spent: the held lock owns the ticket now.
        drop(self.queued.take());
        let waited = self.start.elapsed();
        tracing::debug!(
            "lock {}: acquired after {} scan(s) ({} from the listing alone), {} on-wait call(s), {:.1} ms",
            self.opts.name,
            self.scans,
            self.listed,
            self.evaluations,
            waited.as_secs_f64() * 1000.0
        );
        self.progress.acquired(waited);
        Guard {
            held: Some(held),
            waited,
        }
    }

    /// Leaves the queue, remembering the arrival for a queue key, and builds the conflict error.
    fn give_up(&mut self, message: String) -> Error {
        let keep = self
            .opts
            .queue_key
            .as_ref()
            .map(|_| Duration::from_millis(self.opts.key_grace_ms));
        if let Some(q) = self.queued.take() {
            q.leave(keep);
        }
        Error::conflict(self.opts.conflict_exit_code, message)
    }

    fn interrupted(&mut self, sig: i32) -> Error {
        if let Some(q) = self.queued.take() {
            q.leave(None);
        }
        Error::new(
            Kind::Signal(sig),
            format!(
                "interrupted by signal {sig} while waiting for lock {}; left the queue",
                self.opts.name
            ),
        )
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        // An error from the backend or the policy: leave the queue rather than linger in it.
        if let Some(q) = self.queued.take() {
            q.leave(None);
        }
    }
}

/// A fingerprint of the queue as one waiter sees it: the holders and the waiters in order.
fn queue_print(holders: &[TicketData], ordered: &[(TicketData, i64)]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for t in holders {
        t.id.hash(&mut h);
    }
    0xff_u8.hash(&mut h);
    for (t, _) in ordered {
        t.id.hash(&mut h);
    }
    h.finish()
}

/// What progress lines and messages show of the holders.
fn holder_views(snap: &Snapshot, now_ms: u64) -> Vec<HolderView> {
    snap.holders
        .iter()
        .map(|h| HolderView {
            host: h.host.clone(),
            pid: h.pid,
            ticket: h.id.clone(),
            held_for_ms: h.acquired_at_ms.map(|a| now_ms.saturating_sub(a)),
        })
        .collect()
}
