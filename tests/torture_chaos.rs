//! Chaos: 16 processes contend on one exclusive lock for thousands of acquisitions while
//! holders and waiters are SIGKILLed at random; an independent detector finds no overlap,
//! every surviving request is served, and no ticket is left behind.
//! Longer: `CACHELOCK_TORTURE_SECS=600 cargo test --test torture_chaos -- --nocapture`.

mod torture_support;

use std::time::Duration;
use torture_support::*;

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
    run_chaos_and_check("chaos_exclusive_with_sigkills", chaos, 500);
}
