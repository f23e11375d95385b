//! Policies: every timeout, retry and priority decision goes through [`Policy`].
//!
//! The implementation that ships is the WASM host in `host`: a component implementing the
//! `cachelock:policy@0.1.0` world (`wit/policy.wit`), sandboxed and resource-limited. The
//! engine and the dockerd wrapper only see this trait. Without the cargo feature `wasm` only
//! [`native`] remains (`builtin:default`, answered natively).

#[cfg(feature = "wasm")]
pub mod builtin;
#[cfg(feature = "wasm")]
pub mod cache;
#[cfg(feature = "wasm")]
pub mod compile;
#[cfg(feature = "wasm")]
pub mod host;
#[cfg(feature = "wasm")]
pub mod input;
#[cfg(feature = "wasm")]
pub mod lazy;
pub mod limits;
pub mod native;
#[cfg(feature = "oci")]
pub mod oci;
pub mod scenario;
pub mod simulate;
#[cfg(feature = "wasm")]
pub mod spec;
#[cfg(feature = "wasm")]
pub mod suite;
pub mod trust;
pub mod types;

pub use types::*;

use std::fmt;

/// Whether a policy could not be loaded or misbehaved once loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Missing or invalid module, wrong world, pin mismatch, over the compile budget,
    /// `configure` refused or failed: a configuration error (exit 78).
    Load,
    /// A loaded policy trapped, ran out of fuel or time, or hit a limit in a decision (exit 70
    /// under `on_error: fail`).
    Fault,
    /// An `oci://` module could not be fetched: a load error that ends as the registry answered
    /// (unreachable with nothing cached: 69; credentials: 77; no such tag: 66).
    Fetch(crate::error::Kind),
}

/// The ticket a `rank` call was ranking when it faulted, so that the owner of that ticket can
/// be told (and a bystander not failed: see `Policy::rank`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketRef {
    /// The ticket id.
    pub id: String,
    /// Its labels.
    pub labels: Vec<(String, String)>,
}

/// A policy that could not be loaded, or a call of a loaded policy that failed.
#[derive(Debug, Clone)]
pub struct PolicyError {
    /// Load (exit 78) or fault (exit 70).
    pub kind: ErrorKind,
    /// The policy's name as configured (e.g. `default`, `team-x`).
    pub policy: String,
    /// What happened: "rank: trapped (...)", "ran out of fuel", "over the compile budget"...
    pub message: String,
    /// The call that faulted (`rank`, `on-wait`, ...), for faults.
    pub call: Option<&'static str>,
    /// For a fault in `rank`: the ticket being ranked.
    pub ticket: Option<TicketRef>,
}

impl PolicyError {
    /// A policy that could not be loaded (the message names the policy already).
    pub fn load(policy: &str, message: impl Into<String>) -> Self {
        PolicyError {
            kind: ErrorKind::Load,
            policy: policy.to_string(),
            message: message.into(),
            call: None,
            ticket: None,
        }
    }

    /// A loaded policy that misbehaved.
    pub fn fault(policy: &str, message: impl Into<String>) -> Self {
        PolicyError {
            kind: ErrorKind::Fault,
            policy: policy.to_string(),
            message: message.into(),
            call: None,
            ticket: None,
        }
    }

    /// Whether this is a load failure (exit 78) rather than a fault of a loaded policy (70).
    pub fn is_load_error(&self) -> bool {
        matches!(self.kind, ErrorKind::Load | ErrorKind::Fetch(_))
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            // The message of a load error already names the policy and its module.
            ErrorKind::Load | ErrorKind::Fetch(_) => write!(f, "{}", self.message)?,
            ErrorKind::Fault => write!(f, "policy '{}': {}", self.policy, self.message)?,
        }
        if let Some(t) = &self.ticket {
            write!(
                f,
                " (while ranking ticket {}",
                limits::truncate(t.id.clone(), 64)
            )?;
            if !t.labels.is_empty() {
                let l: Vec<String> = t.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(f, ", labels {}", limits::truncate(l.join(" "), 256))?;
            }
            write!(f, ")")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyError {}

impl From<PolicyError> for crate::error::Error {
    fn from(e: PolicyError) -> Self {
        match e.kind {
            ErrorKind::Load => crate::error::Error::config(e.to_string()),
            ErrorKind::Fetch(kind) => crate::error::Error::new(kind, e.to_string()),
            ErrorKind::Fault => crate::error::Error::software(e.to_string()),
        }
    }
}

/// What [`Policy::ready`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// It waited (for a compile): snapshots taken before are stale.
    pub waited: bool,
    /// It is loaded (or known not to load): no need to ask again.
    pub loaded: bool,
}

/// The decision seam between the host mechanics and a policy (see `wit/policy.wit` for the
/// meaning of each call). Methods take `&mut self` because a WASM instance's store is mutable.
pub trait Policy {
    /// Name used in messages and logs.
    fn name(&self) -> &str;

    /// Loads the policy if it is not loaded yet, waiting for a compile in progress up to
    /// `until` (the caller's deadline) and at most the documented bound
    /// (`policy_compile.wait_seconds`). The engine calls it once it knows the request is
    /// contended and before it ranks anyone. [`Readiness::waited`]: any queue snapshot taken
    /// before the call is stale and must be taken again (no decision may rest on a snapshot
    /// older than the policy call that ranked it). While it is not [`Readiness::loaded`], the
    /// policy answers by the fallback rules (rank = priority), and says so once. Policies that
    /// are always loaded keep the default.
    fn ready(&mut self, until: Option<std::time::Instant>) -> Result<Readiness, PolicyError> {
        let _ = until;
        Ok(Readiness {
            waited: false,
            loaded: true,
        })
    }

    /// The hex sha256 of the policy's module, once it is loaded (or, for a built-in or a
    /// pinned module, known without loading).
    fn digest(&self) -> Option<&str> {
        None
    }

    /// How many of its decisions faulted so far (trap, fuel, memory, time), whatever
    /// `on_error` made of them.
    fn faults(&self) -> u32 {
        0
    }

    /// Ordering key: among live waiters the highest rank goes next; ties go to the earliest
    /// `enqueued_at_ms`, then the smallest ticket id. Must be a function of its inputs only.
    /// A fault carries the ticket (`PolicyError::ticket`): the caller ranks that ticket by the
    /// fallback (its priority) and only the ticket's owner fails.
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

/// One answer of each decision to a sample request (alone in the queue): what `policy check`
/// shows, and how `doctor` sees that a policy which loads also answers.
#[derive(Debug, Clone)]
pub struct SampleAnswers {
    /// `rank` of a priority-0 request.
    pub rank: i64,
    /// `on-wait` of that request, alone behind no holder.
    pub wait: WaitDecision,
    /// `start-timeout-ms` of a first dockerd start.
    pub start_timeout_ms: u64,
    /// `stop-timeout-ms` of a cached dockerd.
    pub stop_timeout_ms: u64,
}

/// Calls each decision of `p` once on a sample, so that a policy that loads but faults on use
/// is caught before a request meets it.
pub fn sample_answers(p: &mut dyn Policy) -> Result<SampleAnswers, PolicyError> {
    const NOW_MS: u64 = 1_700_000_000_000;
    let sample = Ticket {
        id: "sample".into(),
        request: Request {
            lock: "sample".into(),
            mode: Mode::Exclusive,
            priority: 0,
            labels: Vec::new(),
            host: "check".into(),
            pid: std::process::id(),
            enqueued_at_ms: NOW_MS,
            wait_limit_ms: None,
        },
    };
    let state = WaitState {
        me: sample.clone(),
        holders: Vec::new(),
        waiters: Vec::new(),
        waited_ms: 0,
        evaluations: 0,
        now_ms: NOW_MS,
    };
    let attempt = StartAttempt {
        attempt: 1,
        cache_id: Some("sample".into()),
    };
    Ok(SampleAnswers {
        rank: p.rank(&sample, NOW_MS)?,
        wait: p.on_wait(&state)?,
        start_timeout_ms: p.start_timeout_ms(&attempt)?,
        stop_timeout_ms: p.stop_timeout_ms(Some("sample"))?,
    })
}

/// The policy governing one request: `override_policy` (`--policy NAME|builtin:NAME|FILE.wasm`)
/// if given, else the policy the configuration binds to `settings`; `extra_config`
/// (`--policy-config`) is merged over the configured `config` map. Loading is lazy: an
/// uncontended request never instantiates its policy; a module that cannot be loaded is
/// reported by the first call, as an error converting to exit 78.
///
/// Errors here (exit 78) are the ones found without loading: an unknown policy name, bad limits.
#[cfg(feature = "wasm")]
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

/// Without the WebAssembly host: `builtin:default` (the policy of locks no rule binds) is
/// answered natively; any other policy is a configuration error saying why.
#[cfg(not(feature = "wasm"))]
pub fn for_lock(
    _loaded: &crate::config::Loaded,
    settings: &crate::config::LockSettings,
    override_policy: Option<&str>,
    _extra_config: &[(String, String)],
) -> crate::error::Result<Box<dyn Policy>> {
    let name = override_policy.unwrap_or(&settings.policy);
    if matches!(name, "default" | "builtin:default") {
        return Ok(Box::new(native::DefaultPolicy));
    }
    Err(crate::error::Error::config(format!(
        "policy {name:?} needs the WebAssembly policy host, which this build of cachelock leaves out (cargo feature `wasm`)"
    )))
}

/// What a policy's module is and which digest a run would load now: what `policy list` and
/// `status --json` show per lock. Read from the configuration and the local store only (no
/// registry, no compile).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModuleStatus {
    /// `builtin:NAME`, the `.wasm` file, or the `oci://` reference as configured.
    pub module: String,
    /// For `oci://`: the manifest digest of the last good resolution, what registries, `skopeo`
    /// and pins name (null: never pulled here).
    pub digest: Option<String>,
    /// The component's own `sha256:<hex>` (null: the file is missing, or never pulled).
    pub sha256: Option<String>,
    /// For `oci://`: the key that verified it when it was pulled (null: none configured).
    pub verified_by: Option<String>,
    /// For `oci://`: when the reference was resolved (Unix ms).
    pub resolved_at_ms: Option<u64>,
}

/// The [`ModuleStatus`] of policy `name`; `None` when the name does not resolve.
#[cfg(feature = "wasm")]
pub fn module_status(loaded: &crate::config::Loaded, name: &str) -> Option<ModuleStatus> {
    let spec = spec::resolve(loaded, name, &[]).ok()?;
    let mut st = ModuleStatus {
        module: spec.source.to_string(),
        digest: None,
        sha256: None,
        verified_by: None,
        resolved_at_ms: None,
    };
    match &spec.source {
        spec::Source::Builtin(b) => st.sha256 = Some(format!("sha256:{}", b.sha256)),
        spec::Source::File(p) => {
            st.sha256 = std::fs::File::open(p)
                .ok()
                .and_then(|f| {
                    crate::sys::read_bounded(&f, compile::MAX_MODULE_BYTES as usize)
                        .ok()
                        .flatten()
                })
                .map(|b| format!("sha256:{}", cache::sha256_hex(&b)));
        }
        #[cfg(feature = "oci")]
        spec::Source::Oci(o) => {
            if let Some(p) = oci::describe(&o.reference, &spec.cache) {
                st.digest = Some(p.digest);
                st.sha256 = Some(p.component);
                st.verified_by = p.verified_by;
                st.resolved_at_ms = Some(p.resolved_at_ms);
            }
        }
    }
    Some(st)
}

/// Without the WebAssembly host only `builtin:default` exists (answered natively).
#[cfg(not(feature = "wasm"))]
pub fn module_status(_loaded: &crate::config::Loaded, _name: &str) -> Option<ModuleStatus> {
    None
}

/// Loads `name` (as [`for_lock`] resolves it) at once: for `policy check`/`simulate` and for
/// callers that want load errors up front.
#[cfg(feature = "wasm")]
pub fn load_now(
    loaded: &crate::config::Loaded,
    name: &str,
    extra_config: &[(String, String)],
) -> crate::error::Result<(spec::PolicySpec, host::WasmPolicy)> {
    let spec = spec::resolve(loaded, name, extra_config)?;
    let p = host::WasmPolicy::load(&spec)?;
    Ok((spec, p))
}
