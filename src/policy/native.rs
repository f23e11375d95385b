//! A native implementation of `builtin:default`, for programs that embed the engine without a
//! WASM runtime and for the engine's own tests. The CLI never uses it: what ships decides
//! through the WASM built-ins in `policies/`, which implement the same rules.

use super::*;

/// The line after which Earthly (and the default policy) retries a dockerd start.
pub const CONTAINERD_TIMEOUT_LINE: &str =
    "failed to start containerd: timeout waiting for containerd to start";

/// `builtin:default`: rank = priority, FIFO among equals, wait until the caller's bound;
/// dockerd: 300 s start timeout, 5 attempts 5 s apart on the containerd timeout line, 30 s stop.
#[derive(Debug, Default, Clone)]
pub struct DefaultPolicy;

/// Re-evaluation interval by queue position: the next in line looks often, the tail rarely.
pub fn interval_for_position(position: usize) -> u64 {
    (20 * (position as u64 + 1)).min(1000)
}

/// How many of `state.waiters` go before `state.me` under rank `rank_of`.
pub fn position(state: &WaitState, mut rank_of: impl FnMut(&Ticket) -> i64) -> usize {
    let key = |t: &Ticket, r: i64| (std::cmp::Reverse(r), t.request.enqueued_at_ms, t.id.clone());
    let mine = key(&state.me, rank_of(&state.me));
    state
        .waiters
        .iter()
        .filter(|t| key(t, rank_of(t)) < mine)
        .count()
}

impl Policy for DefaultPolicy {
    fn name(&self) -> &str {
        "native-default"
    }

    fn rank(&mut self, waiter: &Ticket, _now_ms: u64) -> Result<i64, PolicyError> {
        Ok(waiter.request.priority as i64)
    }

    fn on_wait(&mut self, state: &WaitState) -> Result<WaitDecision, PolicyError> {
        if let Some(limit) = state.me.request.wait_limit_ms {
            if state.waited_ms >= limit {
                return Ok(WaitDecision::GiveUp(format!(
                    "waited {:.1}s, the caller's limit",
                    state.waited_ms as f64 / 1000.0
                )));
            }
        }
        let pos = position(state, |t| t.request.priority as i64);
        Ok(WaitDecision::KeepWaiting(interval_for_position(pos)))
    }

    fn start_timeout_ms(&mut self, _attempt: &StartAttempt) -> Result<u64, PolicyError> {
        Ok(300_000)
    }

    fn on_start_failure(
        &mut self,
        attempt: &StartAttempt,
        _failure: &StartFailure,
        log_tail: &str,
    ) -> Result<RetryDecision, PolicyError> {
        if attempt.attempt < 5 && log_tail.contains(CONTAINERD_TIMEOUT_LINE) {
            Ok(RetryDecision::RetryAfter(5_000))
        } else if attempt.attempt >= 5 {
            Ok(RetryDecision::GiveUp(format!(
                "dockerd did not start after {} attempts",
                attempt.attempt
            )))
        } else {
            Ok(RetryDecision::GiveUp("dockerd did not start".to_string()))
        }
    }

    fn stop_timeout_ms(&mut self, _cache_id: Option<&str>) -> Result<u64, PolicyError> {
        Ok(30_000)
    }
}
