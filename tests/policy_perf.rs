//! The speed targets, measured robustly (medians of several runs, serially in one
//! test): first run of a never-seen policy ≤ 150 ms, warm load ≤ 1 ms, decision ≤ 5 µs.

mod policy_support;

use std::time::{Duration, Instant};

use cachelock::policy::{self, Policy};
use policy_support::*;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn speed_targets() {
    let dir = tempfile::tempdir().unwrap();
    // First run of a never-seen policy: an empty cache each time (compile + cache + instantiate
    // + configure + one decision).
    let mut first = Vec::new();
    for i in 0..5 {
        let l = loaded(&dir.path().join(format!("cold{i}")), "");
        let t = Instant::now();
        let (_, mut p) = policy::load_now(&l, "builtin:priority", &[]).unwrap();
        p.rank(&ticket("a", 0, 1, &[]), 2).unwrap();
        first.push(t.elapsed());
    }
    // Warm: the cache holds the compiled policy (load + instantiate + configure + one call).
    let l = loaded(&dir.path().join("warm"), "");
    policy::load_now(&l, "builtin:priority", &[]).unwrap();
    let mut warm = Vec::new();
    for _ in 0..21 {
        let t = Instant::now();
        let (_, mut p) = policy::load_now(&l, "builtin:priority", &[]).unwrap();
        p.rank(&ticket("a", 0, 1, &[]), 2).unwrap();
        warm.push(t.elapsed());
    }
    // Decision cost: on-wait with 8 other waiters, and rank, on a warm instance.
    let (_, mut p) = policy::load_now(&l, "builtin:priority", &[]).unwrap();
    let waiters: Vec<_> = (0..8)
        .map(|i| ticket(&format!("w{i}"), i % 3, 100 + i as u64, &[("branch", "x")]))
        .collect();
    let s = state(ticket("me", 1, 50, &[("branch", "main")]), waiters, 1000, 3);
    let me = ticket("me", 1, 50, &[("branch", "main")]);
    let n = 2000;
    let mut on_wait = Vec::new();
    let mut rank = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(p.on_wait(&s).unwrap());
        }
        on_wait.push(t.elapsed() / n);
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(p.rank(&me, 5000).unwrap());
        }
        rank.push(t.elapsed() / n);
    }
    let (first, warm, on_wait, rank) = (median(first), median(warm), median(on_wait), median(rank));
    eprintln!(
        "first run {first:?}, warm load {warm:?}, on-wait (8 waiters) {on_wait:?}, rank {rank:?}"
    );
    assert!(rank <= Duration::from_micros(5), "rank costs {rank:?}");
    assert!(warm <= Duration::from_millis(1), "warm load costs {warm:?}");
    assert!(
        first <= Duration::from_millis(150),
        "first run costs {first:?}"
    );
}
