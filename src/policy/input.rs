//! Never feed a policy more than its limits can hold: queue data (tickets, labels, host names)
//! is copied into the policy's memory at every call, so a queue of many waiters with large
//! labels — or one planted ticket with a 70 MB label — would exhaust the memory limit of every
//! waiter's policy. Before a call, the data is measured against
//! [`Effective::input_bytes`](super::limits::Effective::input_bytes) (1/16 of `memory_mib`)
//! and, only when over, cut in steps until it fits:
//!
//! 1. every ticket's strings are cut: at most [`MAX_LABELS`] labels, keys to
//!    [`MAX_KEY_BYTES`], values to [`MAX_VALUE_BYTES`], host and id to [`MAX_KEY_BYTES`];
//! 2. the other tickets lose their labels (the caller's own ticket keeps them);
//! 3. waiters are dropped, the lowest priority and latest arrivals first.

use super::{Ticket, WaitState};

/// Labels kept per ticket when cutting.
pub const MAX_LABELS: usize = 32;
/// Bytes kept of a label key, host name or ticket id when cutting.
pub const MAX_KEY_BYTES: usize = 128;
/// Bytes kept of a label value when cutting.
pub const MAX_VALUE_BYTES: usize = 512;
/// Per-string and per-ticket overhead counted on top of the bytes (canonical ABI records and
/// the guest's own allocations).
const OVERHEAD: usize = 64;

/// Approximate bytes `t` occupies in the guest.
pub fn ticket_bytes(t: &Ticket) -> usize {
    let r = &t.request;
    OVERHEAD * (3 + r.labels.len() * 2)
        + t.id.len()
        + r.lock.len()
        + r.host.len()
        + r.labels
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

fn state_bytes(s: &WaitState) -> usize {
    ticket_bytes(&s.me)
        + s.holders.iter().map(ticket_bytes).sum::<usize>()
        + s.waiters.iter().map(ticket_bytes).sum::<usize>()
}

fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let mut n = max;
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        s.truncate(n);
    }
}

fn cut_ticket(t: &mut Ticket) {
    cut(&mut t.id, MAX_KEY_BYTES);
    cut(&mut t.request.host, MAX_KEY_BYTES);
    cut(&mut t.request.lock, MAX_KEY_BYTES);
    t.request.labels.truncate(MAX_LABELS);
    for (k, v) in &mut t.request.labels {
        cut(k, MAX_KEY_BYTES);
        cut(v, MAX_VALUE_BYTES);
    }
}

/// `t` cut to fit `budget` bytes, or `None` if it fits as it is.
pub fn fit_ticket(t: &Ticket, budget: usize) -> Option<Ticket> {
    if ticket_bytes(t) <= budget {
        return None;
    }
    let mut t = t.clone();
    cut_ticket(&mut t);
    while ticket_bytes(&t) > budget && t.request.labels.pop().is_some() {}
    Some(t)
}

/// `s` cut to fit `budget` bytes, or `None` if it fits as it is.
pub fn fit_state(s: &WaitState, budget: usize) -> Option<WaitState> {
    if state_bytes(s) <= budget {
        return None;
    }
    let mut s = s.clone();
    cut_ticket(&mut s.me);
    for t in s.holders.iter_mut().chain(s.waiters.iter_mut()) {
        cut_ticket(t);
    }
    if state_bytes(&s) > budget {
        for t in s.holders.iter_mut().chain(s.waiters.iter_mut()) {
            t.request.labels.clear();
        }
    }
    if state_bytes(&s) > budget {
        s.waiters.sort_by(|a, b| {
            (
                std::cmp::Reverse(a.request.priority),
                a.request.enqueued_at_ms,
                &a.id,
            )
                .cmp(&(
                    std::cmp::Reverse(b.request.priority),
                    b.request.enqueued_at_ms,
                    &b.id,
                ))
        });
        let mut total = state_bytes(&WaitState {
            waiters: Vec::new(),
            ..s.clone()
        });
        let keep = s
            .waiters
            .iter()
            .take_while(|t| {
                total += ticket_bytes(t);
                total <= budget
            })
            .count();
        s.waiters.truncate(keep);
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Mode, Request};

    fn t(id: &str, prio: i32, label_len: usize) -> Ticket {
        Ticket {
            id: id.into(),
            request: Request {
                lock: "l".into(),
                mode: Mode::Exclusive,
                priority: prio,
                labels: vec![("k".into(), "v".repeat(label_len))],
                host: "h".into(),
                pid: 1,
                enqueued_at_ms: 1,
                wait_limit_ms: None,
            },
        }
    }

    #[test]
    fn small_inputs_pass_untouched_and_big_ones_are_cut_to_fit() {
        let s = WaitState {
            me: t("me", 0, 10),
            holders: vec![t("h", 0, 10)],
            waiters: (0..10).map(|i| t(&format!("w{i}"), i, 10)).collect(),
            waited_ms: 0,
            evaluations: 0,
            now_ms: 0,
        };
        assert!(fit_state(&s, 1 << 20).is_none());
        let mut big = s.clone();
        big.waiters[3] = t("planted", 0, 70 << 20);
        let cut = fit_state(&big, 64 * 1024).unwrap();
        assert!(state_bytes(&cut) <= 64 * 1024);
        assert_eq!(cut.waiters.len(), 10, "cutting labels was enough");
        assert_eq!(cut.me.request.labels[0].1.len(), 10, "own labels kept");
        let many = WaitState {
            waiters: (0..5000).map(|i| t(&format!("w{i}"), i % 7, 100)).collect(),
            ..s.clone()
        };
        let cut = fit_state(&many, 64 * 1024).unwrap();
        assert!(state_bytes(&cut) <= 64 * 1024);
        assert!(cut.waiters.len() < 5000 && !cut.waiters.is_empty());
        assert!(cut.waiters.iter().all(|w| w.request.priority == 6));
        let one = fit_ticket(&t("x", 0, 70 << 20), 64 * 1024).unwrap();
        assert!(ticket_bytes(&one) <= 64 * 1024);
        assert_eq!(one.request.labels[0].1.len(), MAX_VALUE_BYTES);
    }
}
