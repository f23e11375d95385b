//! Chaos: 16 processes contend on one lock for thousands of acquisitions while holders and
//! waiters are SIGKILLed at random; an independent detector finds no overlap, every surviving
//! request is served, and no ticket is left behind. Three mixes: exclusive only; shared and
//! exclusive; a policy whose ranks change while requests wait (`builtin:priority` with fast
//! aging, so the head changes under the waiters: no livelock).
//! Longer: `CACHELOCK_TORTURE_SECS=600 cargo test --test it torture:: -- --nocapture`.

use crate::support::torture::*;
use std::time::Duration;

/// A sanity floor on the work each chaos does (not a figure: ~1100-1560 are seen on an idle
/// machine, far fewer while the machine builds), so that a chaos that served almost nothing
/// cannot pass.
const MIN_ACQUISITIONS: usize = 100;

/// Entry point of the critical section (the test binary re-executes itself through it).
#[test]
#[ignore = "helper entry point: the torture tests run it inside `cachelock run`"]
fn torture_holder_entry() {
    assert!(
        holder_main(),
        "run only by the torture tests, with TORTURE_DIR set"
    );
}

#[test]
fn chaos_exclusive_with_sigkills() {
    let chaos = Chaos {
        workers: 16,
        duration: torture_secs(25),
        kill_every: Duration::from_millis(150),
        shared_ratio: 0.0,
        priorities: 1,
        extra: vec![],
        hold_us_max: 2000,
        drain: Duration::from_secs(30),
    };
    run_chaos_and_check("chaos_exclusive_with_sigkills", chaos, MIN_ACQUISITIONS);
}

#[test]
fn chaos_shared_exclusive_mix_with_sigkills() {
    let chaos = Chaos {
        workers: 16,
        duration: torture_secs(20),
        kill_every: Duration::from_millis(150),
        shared_ratio: 0.6,
        priorities: 1,
        extra: vec![],
        hold_us_max: 3000,
        drain: Duration::from_secs(30),
    };
    run_chaos_and_check(
        "chaos_shared_exclusive_mix_with_sigkills",
        chaos,
        MIN_ACQUISITIONS,
    );
}

#[test]
fn chaos_with_aging_priorities_and_sigkills() {
    let chaos = Chaos {
        workers: 16,
        duration: torture_secs(20),
        kill_every: Duration::from_millis(150),
        shared_ratio: 0.25,
        // Priorities 0..=4 with 10 points of aging per second: ranks cross within a second,
        // so the head changes while requests wait.
        priorities: 5,
        extra: vec![
            "--policy".into(),
            "builtin:priority".into(),
            "--policy-config".into(),
            "aging_per_minute=600".into(),
        ],
        hold_us_max: 2000,
        drain: Duration::from_secs(30),
    };
    run_chaos_and_check(
        "chaos_with_aging_priorities_and_sigkills",
        chaos,
        MIN_ACQUISITIONS,
    );
}
