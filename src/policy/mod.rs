//! Policies: every timeout, retry and priority decision goes through [`Policy`].
//!
//! The implementation that ships is the WASM host in [`host`]: a component implementing the
//! `cachelock:policy@0.1.0` world (`wit/policy.wit`), sandboxed and resource-limited. The
//! engine and the dockerd wrapper only see this trait.

pub mod builtin;
pub mod cache;
pub mod host;
pub mod lazy;
pub mod limits;
pub mod native;
pub mod scenario;
pub mod simulate;
pub mod spec;
pub mod types;

pub use types::*;

use std::collections::HashSet;
use std::fmt;
use std::sync::Mutex;

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

/// Load failures (missing module, not a component, wrong world, sha256 mismatch, configure
/// error) that surfaced on a lazy policy's first call. Kept on the side rather than in a new
/// field so that `PolicyError { policy, message }` literals elsewhere keep compiling.
static LOAD_ERRORS: Mutex<Option<HashSet<(String, String)>>> = Mutex::new(None);

impl PolicyError {
    /// A policy that could not be loaded: converts to a configuration error (exit 78).
    pub fn load(policy: &str, message: String) -> Self {
        let e = PolicyError {
            policy: policy.to_string(),
            message,
        };
        LOAD_ERRORS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(HashSet::new)
            .insert((e.policy.clone(), e.message.clone()));
        e
    }

    /// Whether this is a load failure (exit 78) rather than a fault of a loaded policy (70).
    pub fn is_load_error(&self) -> bool {
        LOAD_ERRORS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|s| s.contains(&(self.policy.clone(), self.message.clone())))
    }
}

impl From<PolicyError> for crate::error::Error {
    fn from(e: PolicyError) -> Self {
        if e.is_load_error() {
            // The message of a load error already names the policy.
            crate::error::Error::config(e.message)
        } else {
            crate::error::Error::software(e.to_string())
        }
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
/// uncontended request never instantiates its policy; a module that cannot be loaded is
/// reported by the first call, as an error converting to exit 78.
///
/// Errors here (exit 78) are the ones found without loading: an unknown policy name, bad limits.
pub fn for_lock(
    loaded: &crate::config::Loaded,
    settings: &crate::config::LockSettings,
    override_policy: Option<&str>,
    extra_config: &[(String, String)],
) -> crate::error::Result<Box<dyn Policy>> {
    let name = override_policy.unwrap_or(&settings.policy);
    let spec = spec::resolve(loaded, name, extra_config)?;
    // A stat is cheap enough even for an uncontended request, and a missing module is better
    // found on the first run than on the first contended one.
    if let spec::Source::File(p) = &spec.source {
        if !p.is_file() {
            return Err(crate::error::Error::config(format!(
                "policy '{}': module {} does not exist (check `module:` in the policy file or the --policy path)",
                spec.name,
                p.display()
            )));
        }
    }
    Ok(Box::new(lazy::LazyPolicy::new(spec)))
}

/// Loads `name` (as [`for_lock`] resolves it) at once: for `policy check`/`simulate` and for
/// callers that want load errors up front.
pub fn load_now(
    loaded: &crate::config::Loaded,
    name: &str,
    extra_config: &[(String, String)],
) -> crate::error::Result<(spec::PolicySpec, host::WasmPolicy)> {
    let spec = spec::resolve(loaded, name, extra_config)?;
    let p = host::WasmPolicy::load(&spec)?;
    Ok((spec, p))
}
