//! Test policy: `on-wait` traps (a panic under panic=abort is a wasm `unreachable`).
use cachelock_policy_sdk::*;

struct Trap;

impl Policy for Trap {
    fn configure(_: &Config) -> Result<Self, String> {
        Ok(Trap)
    }
    fn on_wait(&mut self, state: &WaitState) -> WaitDecision {
        log(Level::Warn, "about to trap");
        panic!(
            "test-trap: on-wait traps on purpose ({} ms waited)",
            state.waited_ms
        )
    }
}

export_policy!(Trap);
