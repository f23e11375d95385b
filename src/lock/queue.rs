//! Reading the queue: live tickets (dead ones are cleaned up on the way), their order, and the
//! head set that may try the kernel lock.

use std::cmp::Reverse;

use super::dir::LockPaths;
use super::ticket::{probe, Probe, TicketData};
use crate::policy::{Mode, Policy, PolicyError};

/// The live tickets of a lock, as one scan saw them.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Tickets whose owners hold the lock.
    pub holders: Vec<TicketData>,
    /// Tickets still waiting, in directory order.
    pub waiters: Vec<TicketData>,
}

/// Lists `queue/`, probing every ticket except `skip` (one's own: probing it would drop one's
/// own lock on NFS). Dead tickets are removed; unreadable live ones are left out.
pub fn scan(paths: &LockPaths, skip: Option<&str>) -> std::io::Result<Snapshot> {
    let mut snap = Snapshot::default();
    for e in std::fs::read_dir(&paths.queue)? {
        let e = e?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if Some(name) == skip {
            continue;
        }
        if let Probe::Alive(Some(d)) = probe(&e.path()) {
            if d.holding {
                snap.holders.push(d);
            } else {
                snap.waiters.push(d);
            }
        }
    }
    snap.holders.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(snap)
}

/// The names in `queue/`, sorted (no probing: a cheap "did anything change" check).
pub fn list_names(paths: &LockPaths) -> std::io::Result<Vec<String>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(&paths.queue)? {
        if let Some(n) = e?.file_name().to_str() {
            v.push(n.to_string());
        }
    }
    v.sort();
    Ok(v)
}

/// Orders `waiters` by (rank desc, arrival asc, id asc) and returns them with their ranks.
/// A lone waiter is not ranked at all, so an uncontended request never calls the policy.
pub fn order(
    waiters: Vec<TicketData>,
    policy: &mut dyn Policy,
    now_ms: u64,
) -> Result<Vec<(TicketData, i64)>, PolicyError> {
    if waiters.len() <= 1 {
        return Ok(waiters.into_iter().map(|t| (t, 0)).collect());
    }
    rank_all(waiters, policy, now_ms)
}

/// Like [`order`] but always asks the policy (status shows the ranks).
pub fn rank_all(
    waiters: Vec<TicketData>,
    policy: &mut dyn Policy,
    now_ms: u64,
) -> Result<Vec<(TicketData, i64)>, PolicyError> {
    let mut ranked = Vec::with_capacity(waiters.len());
    for t in waiters {
        let r = policy.rank(&t.to_ticket(), now_ms)?;
        ranked.push((t, r));
    }
    ranked.sort_by(|(a, ra), (b, rb)| {
        (Reverse(*ra), a.enqueued_at_ms, &a.id).cmp(&(Reverse(*rb), b.enqueued_at_ms, &b.id))
    });
    Ok(ranked)
}

/// How many of the ordered waiters form the head set: the first `slots` waiters, extended by
/// every shared waiter up to the first exclusive one when the queue starts with shared ones.
pub fn head_len(ordered: &[(TicketData, i64)], slots: u32) -> usize {
    let mut n = 0;
    let mut all_shared = true;
    for (t, _) in ordered {
        let shared = t.mode == Mode::Shared;
        if n < slots as usize || (all_shared && shared) {
            n += 1;
            all_shared &= shared;
        } else {
            break;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::native::DefaultPolicy;

    fn t(id: &str, mode: Mode, priority: i32, at: u64) -> TicketData {
        TicketData {
            id: id.into(),
            lock: "l".into(),
            mode,
            priority,
            labels: vec![],
            host: "h".into(),
            pid: 1,
            enqueued_at_ms: at,
            wait_limit_ms: None,
            queue_key: None,
            holding: false,
            slot: None,
            acquired_at_ms: None,
            generation: None,
        }
    }

    #[test]
    fn order_is_rank_then_arrival_then_id() {
        let w = vec![
            t("3", Mode::Exclusive, 0, 10),
            t("1", Mode::Exclusive, 0, 20),
            t("2", Mode::Exclusive, 5, 30),
            t("0", Mode::Exclusive, 0, 10),
        ];
        let o = order(w, &mut DefaultPolicy, 0).unwrap();
        let ids: Vec<&str> = o.iter().map(|(t, _)| t.id.as_str()).collect();
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
}
