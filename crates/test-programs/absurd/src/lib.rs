//! Test policy: absurd outputs. `mode` (config) picks which: `intervals` (default: keep-waiting
//! alternates u64::MAX and 0, with 2 MiB of log and stdout per call), `chatty` (keeps waiting
//! 20 ms at a time, printing 1 MiB of text that differs at every call to the log, stdout and
//! stderr), `give-up` (a 4 MiB reason), `fall-back` (a 4 MiB reason). dockerd calls answer
//! u64::MAX and a 4 MiB give-up.
use cachelock_policy_sdk::*;

struct Absurd {
    mode: String,
}

fn huge(c: char) -> String {
    c.to_string().repeat(4 << 20)
}

impl Policy for Absurd {
    fn configure(config: &Config) -> Result<Self, String> {
        Ok(Absurd {
            mode: config.get("mode").unwrap_or("intervals").to_string(),
        })
    }
    fn rank(&mut self, _: &Ticket, _: u64) -> i64 {
        i64::MAX
    }
    fn on_wait(&mut self, state: &WaitState) -> WaitDecision {
        match self.mode.as_str() {
            "give-up" => WaitDecision::GiveUp(huge('g')),
            "fall-back" => WaitDecision::FallBack(huge('f')),
            "chatty" => {
                // Text no two calls share, so that no line is ever a repeat.
                let line = format!("{} ", state.evaluations).repeat(1 << 18);
                log(Level::Error, &line);
                println!("{line}");
                eprintln!("{line}");
                WaitDecision::KeepWaiting(20)
            }
            _ => {
                // A line of its own and a terminal escape, which must reach the log escaped.
                log(Level::Error, "x\nFORGED-LINE\u{1b}[31m");
                let line = "x".repeat(1 << 20);
                log(Level::Error, &line);
                log(Level::Error, &line);
                println!("{line}");
                eprintln!("{line}");
                if state.evaluations.is_multiple_of(2) {
                    WaitDecision::KeepWaiting(u64::MAX)
                } else {
                    WaitDecision::KeepWaiting(0)
                }
            }
        }
    }
    fn start_timeout_ms(&mut self, _: &StartAttempt) -> u64 {
        u64::MAX
    }
    fn on_start_failure(&mut self, _: &StartAttempt, _: &StartFailure, _: &str) -> RetryDecision {
        RetryDecision::GiveUp(huge('r'))
    }
    fn stop_timeout_ms(&mut self, _: Option<&str>) -> u64 {
        u64::MAX
    }
}

export_policy!(Absurd);
