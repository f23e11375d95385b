//! The queue's rules, shared by every backend, by `status` and by `policy simulate`: the order
//! of waiters (rank from the policy, then arrival, then ticket id), the head set that may try
//! the lock, and the grant rule of slots (what flock's kernel lock, or a store's grant
//! transaction, lets in).

use std::cmp::Reverse;
use std::sync::atomic::{AtomicBool, Ordering};

use super::backend::TicketData;
use crate::policy::{Mode, Policy, PolicyError};

/// The rank a ticket gets when the policy cannot rank it (documented: its priority, so the
/// order is that of `builtin:default`).
pub fn fallback_rank(t: &TicketData) -> i64 {
    t.request().priority as i64
}

/// Sorts ranked waiters into serving order: rank descending, then arrival, then ticket id.
pub fn sort(ranked: &mut [(TicketData, i64)]) {
    ranked.sort_by(|(a, ra), (b, rb)| {
        (Reverse(*ra), a.request().enqueued_at_ms, &a.id()).cmp(&(
            Reverse(*rb),
            b.request().enqueued_at_ms,
            &b.id(),
        ))
    });
}

/// Orders `waiters` (ours, `me`, among them) for a waiting request. A lone waiter is not
/// ranked at all, so an uncontended request never calls the policy. A fault while ranking
/// *another* ticket must not fail us: that ticket is ranked by [`fallback_rank`] (and the
/// first such fault is logged); its owner, who ranks its own ticket too, gets the error.
/// A fault ranking our own ticket, or a policy that cannot be loaded, is returned.
pub fn order(
    waiters: Vec<TicketData>,
    me: &str,
    policy: &mut dyn Policy,
    now_ms: u64,
) -> Result<Vec<(TicketData, i64)>, PolicyError> {
    if waiters.len() <= 1 {
        return Ok(waiters.into_iter().map(|t| (t, 0)).collect());
    }
    let mut ranked = Vec::with_capacity(waiters.len());
    for t in waiters {
        let r = match policy.rank(&t.ticket, now_ms) {
            Ok(r) => r,
            Err(e) if t.id() != me && !e.is_load_error() => {
                static SAID: AtomicBool = AtomicBool::new(false);
                if !SAID.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "{e} (ranking ticket {} of {}:{}, labels {}); that ticket is ranked by its priority instead — its owner gets the error",
                        crate::output::escape(t.id()),
                        crate::output::escape(&t.request().host),
                        t.request().pid,
                        labels_text(&t.request().labels)
                    );
                }
                fallback_rank(&t)
            }
            Err(e) => return Err(e),
        };
        ranked.push((t, r));
    }
    sort(&mut ranked);
    Ok(ranked)
}

/// Ranks every waiter and sorts them into serving order; any fault is returned (`policy
/// simulate` reports it rather than hiding it).
pub fn rank_all(
    waiters: Vec<TicketData>,
    policy: &mut dyn Policy,
    now_ms: u64,
) -> Result<Vec<(TicketData, i64)>, PolicyError> {
    let mut ranked = Vec::with_capacity(waiters.len());
    for t in waiters {
        let r = policy.rank(&t.ticket, now_ms)?;
        ranked.push((t, r));
    }
    sort(&mut ranked);
    Ok(ranked)
}

/// Orders every waiter for `status` (each is ranked, so the ranks can be shown). When the
/// policy cannot be loaded or faults, the affected tickets are ranked by [`fallback_rank`]
/// and the note says why.
pub fn rank_for_status(
    waiters: Vec<TicketData>,
    policy: &mut dyn Policy,
    now_ms: u64,
) -> (Vec<(TicketData, i64)>, Option<String>) {
    let mut note = None;
    let mut ranked = Vec::with_capacity(waiters.len());
    for t in waiters {
        let r = if note.as_ref().is_some_and(|(load, _)| *load) {
            fallback_rank(&t)
        } else {
            match policy.rank(&t.ticket, now_ms) {
                Ok(r) => r,
                Err(e) => {
                    note.get_or_insert((e.is_load_error(), e.to_string()));
                    fallback_rank(&t)
                }
            }
        };
        ranked.push((t, r));
    }
    sort(&mut ranked);
    let note = note.map(|(_, m)| format!("{m}; affected waiters are shown by priority"));
    (ranked, note)
}

/// `k=v,k=v` for messages (control characters escaped: labels are other users' text).
pub fn labels_text(labels: &[(String, String)]) -> String {
    if labels.is_empty() {
        return "none".to_string();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{}={}", crate::output::escape(k), crate::output::escape(v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// How many of the ordered waiters form the head set, the ones that may try the lock: the
/// first `slots` waiters, extended over every shared waiter up to the first exclusive one when
/// the queue starts with shared ones.
pub fn head_len(ordered: &[(TicketData, i64)], slots: u32) -> usize {
    let mut n = 0;
    let mut all_shared = true;
    for (t, _) in ordered {
        let shared = t.request().mode == Mode::Shared;
        if n < slots as usize || (all_shared && shared) {
            n += 1;
            all_shared &= shared;
        } else {
            break;
        }
    }
    n
}

/// The grant rule of a lock with `slots` slots, as flock's kernel lock applies it to the slot
/// files and a store's grant transaction must: a request takes the first slot it is compatible
/// with — exclusive: a slot nobody holds; shared: a slot no exclusive request holds.
#[derive(Debug, Clone)]
pub struct Slots {
    held: Vec<Vec<Mode>>,
}

impl Slots {
    /// `slots` free slots (at least one).
    pub fn new(slots: u32) -> Self {
        Slots {
            held: vec![Vec::new(); slots.max(1) as usize],
        }
    }

    /// Takes the first compatible slot for `mode`, if any.
    pub fn take(&mut self, mode: Mode) -> Option<u32> {
        let slot = self.held.iter().position(|h| match mode {
            Mode::Exclusive => h.is_empty(),
            Mode::Shared => !h.contains(&Mode::Exclusive),
        })?;
        self.held[slot].push(mode);
        Some(slot as u32)
    }

    /// Records an existing hold of `mode` on `slot` (a store's current holders).
    pub fn hold(&mut self, slot: u32, mode: Mode) {
        if let Some(h) = self.held.get_mut(slot as usize) {
            h.push(mode);
        }
    }

    /// Gives back one hold of `mode` on `slot`.
    pub fn release(&mut self, slot: u32, mode: Mode) {
        if let Some(h) = self.held.get_mut(slot as usize) {
            if let Some(i) = h.iter().position(|m| *m == mode) {
                h.remove(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::native::DefaultPolicy;

    pub(crate) fn t(id: &str, mode: Mode, priority: i32, at: u64) -> TicketData {
        let mut o = crate::lock::Options::new("l");
        o.mode = mode;
        o.priority = priority;
        TicketData::new(&o, id.into(), at, "h".into(), 1)
    }

    #[test]
    fn order_is_rank_then_arrival_then_id() {
        let w = vec![
            t("3", Mode::Exclusive, 0, 10),
            t("1", Mode::Exclusive, 0, 20),
            t("2", Mode::Exclusive, 5, 30),
            t("0", Mode::Exclusive, 0, 10),
        ];
        let o = order(w, "1", &mut DefaultPolicy, 0).unwrap();
        let ids: Vec<&str> = o.iter().map(|(t, _)| t.id()).collect();
        assert_eq!(ids, ["2", "0", "3", "1"]);
    }

    #[test]
    fn head_set_extends_over_leading_shared_waiters() {
        let s = |id| (t(id, Mode::Shared, 0, 0), 0);
        let x = |id| (t(id, Mode::Exclusive, 0, 0), 0);
        assert_eq!(head_len(&[x("a"), x("b")], 1), 1);
        assert_eq!(head_len(&[s("a"), s("b"), x("c"), s("d")], 1), 2);
        assert_eq!(head_len(&[x("a"), s("b"), s("c")], 1), 1);
        assert_eq!(head_len(&[x("a"), x("b"), x("c")], 2), 2);
        assert_eq!(head_len(&[], 1), 0);
    }

    #[test]
    fn slots_grant_like_flock_on_each_slot_file() {
        let mut s = Slots::new(2);
        assert_eq!(s.take(Mode::Exclusive), Some(0));
        // A shared request takes the second slot beside an exclusive holder of the first.
        assert_eq!(s.take(Mode::Shared), Some(1));
        assert_eq!(s.take(Mode::Shared), Some(1));
        assert_eq!(s.take(Mode::Exclusive), None);
        s.release(0, Mode::Exclusive);
        assert_eq!(s.take(Mode::Shared), Some(0));
        assert_eq!(s.take(Mode::Exclusive), None);
    }
}
