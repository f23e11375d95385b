//! Chaos with a shared/exclusive mix: never an exclusive holder beside any other, under
//! random SIGKILLs of holders and waiters; every surviving request served, no ticket left.
//! Longer: `CACHELOCK_TORTURE_SECS=600 cargo test --test torture_shared -- --nocapture`.

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
    run_chaos_and_check("chaos_shared_exclusive_mix_with_sigkills", chaos, 500);
}
