//! Policies: every timeout, retry and priority decision goes through [`Policy`].
//!
//! The implementation that ships is the WASM host in [`host`]: a component implementing the
//! `cachelock:policy@0.1.0` world (`wit/policy.wit`), sandboxed and resource-limited. The
//! engine and the dockerd wrapper only see this trait.

pub mod native;
pub mod types;

pub use types::*;

use std::fmt;

/// A policy call that failed and, under the policy's `on_error: fail`, fails the request.
#[derive(Debug, Clone)]
pub struct PolicyError {
    /// The policy's name as configured (e.g. `default`, `team-x`).
    pub policy: String,
    /// What the policy did: trapped, ran out of fuel, exceeded its memory, returned an error...
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "policy '{}': {}", self.policy, self.message)
    }
}

impl std::error::Error for PolicyError {}

impl From<PolicyError> for crate::error::Error {
    fn from(e: PolicyError) -> Self {
        crate::error::Error::software(e.to_string())
    }
}

/// The decision seam between the host mechanics and a policy (see `wit/policy.wit` for the
/// meaning of each call). Methods take `&mut self` because a WASM instance's store is mutable.
pub trait Policy {
    /// Name used in messages and logs.
    fn name(&self) -> &str;

    /// Ordering key: among live waiters the highest rank goes next; ties go to the earliest
    /// `enqueued_at_ms`, then the smallest ticket id. Must be a function of its inputs only.
    fn rank(&mut self, waiter: &Ticket, now_ms: u64) -> Result<i64, PolicyError>;

    /// Called when a request cannot take the lock at once, and at each re-evaluation.
    fn on_wait(&mut self, state: &WaitState) -> Result<WaitDecision, PolicyError>;

    /// How long to wait for dockerd to answer `/_ping` on this attempt.
    fn start_timeout_ms(&mut self, attempt: &StartAttempt) -> Result<u64, PolicyError>;

    /// dockerd did not become ready; `log_tail` holds the last lines of its log.
    fn on_start_failure(
        &mut self,
        attempt: &StartAttempt,
        failure: &StartFailure,
        log_tail: &str,
    ) -> Result<RetryDecision, PolicyError>;

    /// How long dockerd may take to exit after SIGTERM before it is killed.
    fn stop_timeout_ms(&mut self, cache_id: Option<&str>) -> Result<u64, PolicyError>;
}

/// The policy governing one request: `override_policy` (`--policy NAME|builtin:NAME|FILE.wasm`)
/// if given, else the policy the configuration binds to `settings`; `extra_config`
/// (`--policy-config`) is merged over the configured `config` map. Loading is lazy: an
/// uncontended request never instantiates its policy.
///
/// Until the WASM host lands this returns the native default policy.
pub fn for_lock(
    _loaded: &crate::config::Loaded,
    _settings: &crate::config::LockSettings,
    _override_policy: Option<&str>,
    _extra_config: &[(String, String)],
) -> crate::error::Result<Box<dyn Policy>> {
    Ok(Box::new(native::DefaultPolicy))
}
