//! [`LazyPolicy`]: what `for_lock` returns. Nothing is loaded until the first call (an
//! uncontended request never pays for a policy); `on_error: default` routes a faulted decision
//! to `builtin:default` (WASM too) with a warning.

use super::host::WasmPolicy;
use super::spec::{PolicySpec, Source};
use super::*;
use crate::config::OnError;

/// A policy loaded on first use.
pub struct LazyPolicy {
    spec: PolicySpec,
    state: State,
    fallback: Option<WasmPolicy>,
}

enum State {
    Unloaded,
    Ready(Box<WasmPolicy>),
    /// Loading failed; every call reports it (as a configuration error, exit 78).
    Failed(PolicyError),
}

impl LazyPolicy {
    /// Wraps `spec`; loads nothing.
    pub fn new(spec: PolicySpec) -> Self {
        LazyPolicy {
            spec,
            state: State::Unloaded,
            fallback: None,
        }
    }

    /// Whether the module has been loaded (for tests of laziness).
    pub fn is_loaded(&self) -> bool {
        !matches!(self.state, State::Unloaded)
    }

    fn policy(&mut self) -> Result<&mut WasmPolicy, PolicyError> {
        if let State::Unloaded = self.state {
            self.state = match WasmPolicy::load(&self.spec) {
                Ok(p) => State::Ready(Box::new(p)),
                Err(e) => State::Failed(PolicyError::load(&self.spec.name, e.message)),
            };
        }
        match &mut self.state {
            State::Ready(p) => Ok(p),
            State::Failed(e) => Err(e.clone()),
            State::Unloaded => unreachable!("loaded above"),
        }
    }

    /// Runs `f` on the policy; under `on_error: default` a fault (not a load error) is answered
    /// by `builtin:default` instead.
    fn decide<R>(
        &mut self,
        f: impl Fn(&mut dyn Policy) -> Result<R, PolicyError>,
    ) -> Result<R, PolicyError> {
        let err = match f(self.policy()?) {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if self.spec.on_error != OnError::Default {
            return Err(err);
        }
        tracing::warn!(
            "{err}; this decision is taken by builtin:default instead (on_error: default)"
        );
        if self.fallback.is_none() {
            let spec = PolicySpec {
                name: format!("builtin:default (fallback for '{}')", self.spec.name),
                source: Source::Builtin(builtin::get("default").expect("embedded")),
                sha256: None,
                config: Vec::new(),
                limits: self.spec.limits.clone(),
                on_error: OnError::Fail,
                cache_dir: self.spec.cache_dir.clone(),
            };
            let p = WasmPolicy::load(&spec).map_err(|e| PolicyError {
                policy: spec.name.clone(),
                message: e.message,
            })?;
            self.fallback = Some(p);
        }
        f(self.fallback.as_mut().expect("loaded above"))
    }
}

impl Policy for LazyPolicy {
    fn name(&self) -> &str {
        &self.spec.name
    }

    fn rank(&mut self, waiter: &Ticket, now_ms: u64) -> Result<i64, PolicyError> {
        self.decide(|p| p.rank(waiter, now_ms))
    }

    fn on_wait(&mut self, state: &WaitState) -> Result<WaitDecision, PolicyError> {
        self.decide(|p| p.on_wait(state))
    }

    fn start_timeout_ms(&mut self, attempt: &StartAttempt) -> Result<u64, PolicyError> {
        self.decide(|p| p.start_timeout_ms(attempt))
    }

    fn on_start_failure(
        &mut self,
        attempt: &StartAttempt,
        failure: &StartFailure,
        log_tail: &str,
    ) -> Result<RetryDecision, PolicyError> {
        self.decide(|p| p.on_start_failure(attempt, failure, log_tail))
    }

    fn stop_timeout_ms(&mut self, cache_id: Option<&str>) -> Result<u64, PolicyError> {
        self.decide(|p| p.stop_timeout_ms(cache_id))
    }
}
