//! `policy simulate`: runs a [`Scenario`] through a policy in simulated time and records who
//! is served when and every decision. Event-driven: time jumps to the next arrival, release or
//! re-evaluation, so the result does not depend on a step size. The queue's rules are the
//! engine's own (`lock::order`: order, head set, slot grants), not a copy.

use serde::Serialize;

use super::scenario::Scenario;
use super::*;
use crate::lock::order::{self, Slots};
use crate::lock::TicketData;

/// Simulated Unix time of t=0 (any fixed value: policies see `now-ms` and `enqueued-at-ms`).
pub const EPOCH_MS: u64 = 1_700_000_000_000;
/// When a refused fall-back is evaluated again.
pub const REFUSED_FALLBACK_RETRY_MS: u64 = 100;
/// Bound on decisions, so that a scenario cannot run for ever.
pub const MAX_DECISIONS: usize = 200_000;

/// One thing that happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Milliseconds since the start.
    pub t_ms: u64,
    /// Ticket id.
    pub id: String,
    /// `arrive`, `wait`, `serve`, `release`, `give-up`, `fall-back`.
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

struct Waiter {
    idx: usize,
    ticket: Ticket,
    next_eval: u64,
    evaluations: u32,
}

struct Holding {
    ticket: Ticket,
    slot: u32,
    release_at: Option<u64>,
}

/// The engine's view of a simulated ticket (the simulation has no hosts or pids).
pub(crate) fn ticket_data(t: &Ticket) -> TicketData {
    TicketData {
        id: t.id.clone(),
        lock: t.request.lock.clone(),
        mode: t.request.mode,
        priority: t.request.priority,
        labels: t.request.labels.clone(),
        host: t.request.host.clone(),
        pid: t.request.pid,
        enqueued_at_ms: t.request.enqueued_at_ms,
        wait_limit_ms: t.request.wait_limit_ms,
        queue_key: None,
        holding: false,
        slot: None,
        acquired_at_ms: None,
        generation: None,
        revision: None,
        lease_left_ms: None,
        uid: None,
    }
}

fn labels(m: &std::collections::BTreeMap<String, String>) -> Vec<(String, String)> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Runs `scenario` through `policy`.
pub fn run(policy: &mut dyn Policy, scenario: &Scenario) -> Result<Outcome, PolicyError> {
    let mk = |id: &str, mode, priority, labels, at: u64, wait_limit_ms| Ticket {
        id: id.to_string(),
        request: Request {
            lock: scenario.lock.clone(),
            mode,
            priority,
            labels,
            host: "simulated".into(),
            pid: 0,
            enqueued_at_ms: EPOCH_MS + at,
            wait_limit_ms,
        },
    };
    let mut slots = Slots::new(scenario.slots);
    let mut holders: Vec<Holding> = Vec::new();
    for h in &scenario.holders {
        let slot = slots.take(h.mode).ok_or_else(|| {
            PolicyError::fault(
                policy.name(),
                format!(
                    "holder {:?} cannot hold the lock beside the other holders",
                    h.id
                ),
            )
        })?;
        holders.push(Holding {
            ticket: mk(&h.id, h.mode, h.priority, labels(&h.labels), 0, None),
            slot,
            release_at: h.release_at_ms,
        });
    }
    let mut pending: Vec<usize> = (0..scenario.arrivals.len()).collect();
    pending.sort_by_key(|&i| (scenario.arrivals[i].at_ms, i));
    pending.reverse(); // pop() takes the earliest
    let mut waiting: Vec<Waiter> = Vec::new();
    let mut fates: Vec<(String, Fate)> = scenario
        .arrivals
        .iter()
        .map(|a| (a.id.clone(), Fate::Waiting))
        .collect();
    let mut out = Outcome {
        events: Vec::new(),
        served_order: Vec::new(),
        fates: Vec::new(),
        decisions: 0,
    };
    let ev = |out: &mut Outcome, t: u64, id: &str, kind: &str, detail: String| {
        out.events.push(Event {
            t_ms: t,
            id: id.to_string(),
            kind: kind.to_string(),
            detail,
        })
    };
    let mut t = 0u64;
    loop {
        // Releases due now.
        holders.retain(|h| match h.release_at {
            Some(r) if r <= t => {
                ev(&mut out, t, &h.ticket.id, "release", String::new());
                slots.release(h.slot, h.ticket.request.mode);
                false
            }
            _ => true,
        });
        // Arrivals due now.
        while let Some(&i) = pending.last() {
            let a = &scenario.arrivals[i];
            if a.at_ms > t {
                break;
            }
            pending.pop();
            let ticket = mk(
                &a.id,
                a.mode,
                a.priority,
                labels(&a.labels),
                a.at_ms,
                a.wait_limit_ms,
            );
            ev(
                &mut out,
                t,
                &a.id,
                "arrive",
                format!("priority {}, {:?}", a.priority, a.mode).to_lowercase(),
            );
            waiting.push(Waiter {
                idx: i,
                ticket,
                next_eval: t,
                evaluations: 0,
            });
        }
        // The head set tries, as in the engine: each member takes the first slot the grant
        // rule allows; whoever is served leaves the queue, which changes the head set.
        loop {
            let now = EPOCH_MS + t;
            let tickets: Vec<TicketData> = waiting.iter().map(|w| ticket_data(&w.ticket)).collect();
            out.decisions += tickets.len();
            let ordered = order::rank_all(tickets, policy, now)?;
            let head = order::head_len(&ordered, scenario.slots);
            let mut served_any = false;
            for (t_data, rank) in &ordered[..head] {
                let Some(slot) = slots.take(t_data.mode) else {
                    continue;
                };
                let pos = waiting
                    .iter()
                    .position(|w| w.ticket.id == t_data.id)
                    .expect("ranked tickets are waiting");
                let w = waiting.remove(pos);
                let a = &scenario.arrivals[w.idx];
                let waited = t - a.at_ms;
                ev(
                    &mut out,
                    t,
                    &w.ticket.id,
                    "serve",
                    format!("rank {rank}, waited {waited} ms"),
                );
                out.served_order.push(w.ticket.id.clone());
                fates[w.idx].1 = Fate::Served {
                    at_ms: t,
                    waited_ms: waited,
                };
                holders.push(Holding {
                    ticket: w.ticket,
                    slot,
                    release_at: Some(t + a.hold_ms),
                });
                served_any = true;
            }
            if !served_any || waiting.is_empty() {
                break;
            }
        }
        // Evaluations due now (every new arrival that could not take the lock at once, and
        // every waiter whose interval ran out).
        let mut i = 0;
        while i < waiting.len() {
            if waiting[i].next_eval > t {
                i += 1;
                continue;
            }
            let w = &waiting[i];
            let a = &scenario.arrivals[w.idx];
            let waited = t - a.at_ms;
            let others: Vec<Ticket> = waiting
                .iter()
                .filter(|o| o.ticket.id != w.ticket.id)
                .map(|o| o.ticket.clone())
                .collect();
            let state = WaitState {
                me: w.ticket.clone(),
                holders: holders.iter().map(|h| h.ticket.clone()).collect(),
                waiters: others,
                waited_ms: waited,
                evaluations: w.evaluations,
                now_ms: EPOCH_MS + t,
            };
            out.decisions += 1;
            if out.decisions > MAX_DECISIONS {
                return Err(PolicyError::fault(
                    policy.name(),
                    format!("the simulation made more than {MAX_DECISIONS} decisions; shorten `until_ms`"),
                ));
            }
            let decision = policy.on_wait(&state)?;
            let id = w.ticket.id.clone();
            // The caller's bound caps whatever the policy says (as the engine does).
            let over_limit = a.wait_limit_ms.is_some_and(|l| waited >= l);
            match decision {
                WaitDecision::KeepWaiting(_) | WaitDecision::FallBack(_) if over_limit => {
                    let reason = format!("waited {waited} ms, the caller's limit");
                    ev(&mut out, t, &id, "give-up", reason.clone());
                    fates[w.idx].1 = Fate::GaveUp { at_ms: t, reason };
                    waiting.remove(i);
                    continue;
                }
                WaitDecision::KeepWaiting(ms) => {
                    let mut next = t + ms.max(1);
                    if let Some(l) = a.wait_limit_ms {
                        next = next.min(a.at_ms + l);
                    }
                    ev(&mut out, t, &id, "wait", format!("keep-waiting {ms} ms"));
                    let w = &mut waiting[i];
                    w.next_eval = next;
                    w.evaluations += 1;
                }
                WaitDecision::GiveUp(reason) => {
                    ev(&mut out, t, &id, "give-up", reason.clone());
                    fates[w.idx].1 = Fate::GaveUp { at_ms: t, reason };
                    waiting.remove(i);
                    continue;
                }
                WaitDecision::FallBack(reason) if scenario.fallback => {
                    ev(&mut out, t, &id, "fall-back", reason.clone());
                    fates[w.idx].1 = Fate::FellBack { at_ms: t, reason };
                    waiting.remove(i);
                    continue;
                }
                WaitDecision::FallBack(reason) => {
                    ev(&mut out, t, &id, "wait", format!("fall-back refused (the lock does not allow it; `fallback: true` in the scenario): {reason}"));
                    let w = &mut waiting[i];
                    w.next_eval = t + REFUSED_FALLBACK_RETRY_MS;
                    w.evaluations += 1;
                }
            }
            i += 1;
        }
        // Next moment something happens.
        let next = [
            pending.last().map(|&i| scenario.arrivals[i].at_ms),
            holders.iter().filter_map(|h| h.release_at).min(),
            waiting.iter().map(|w| w.next_eval).min(),
        ]
        .into_iter()
        .flatten()
        .filter(|&n| n > t)
        .min()
        .map(|n| match scenario.step_ms {
            0 => n,
            step => n.div_ceil(step).saturating_mul(step),
        });
        match next {
            Some(n) if n <= scenario.until_ms => t = n,
            _ => break,
        }
    }
    out.fates = fates;
    Ok(out)
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
