//! [`LazyPolicy`]: what `for_lock` returns. Nothing is loaded until the request is contended
//! (an uncontended request never pays for a policy). Loading runs on a thread, so that a waiter
//! whose policy is still compiling after the bound (`policy_compile.wait_seconds`) can go on by
//! the fallback rules — `builtin:default`'s: rank = priority, FIFO among equals, wait until the
//! caller's `-w` — until the compile ends, saying so once. `on_error: default` routes a faulted
//! decision to `builtin:default` (WASM), with one warning per policy and process, then a count.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::host::WasmPolicy;
use super::native::DefaultPolicy;
use super::spec::{PolicySpec, Source};
use super::*;
use crate::config::OnError;

/// A policy loaded on first use.
pub struct LazyPolicy {
    spec: PolicySpec,
    state: State,
    fallback: Option<WasmPolicy>,
    /// Faults answered by `builtin:default` under `on_error: default` (reported once, then
    /// counted; the count is logged when the policy is dropped).
    defaulted: u64,
    /// Whether the "still compiling" notice was given.
    said_compiling: bool,
    /// Faults of the loaded policy so far (decisions that trapped, ran out of fuel or time).
    faults: u32,
}

enum State {
    Unloaded,
    /// The loader thread is compiling; `since` is when it started.
    Loading {
        rx: Receiver<Result<WasmPolicy, crate::error::Error>>,
        since: Instant,
    },
    Ready(Box<WasmPolicy>),
    /// Loading failed; every call reports it (as a configuration error, exit 78).
    Failed(PolicyError),
}

/// How often a wait for the loader looks for a terminating signal.
const SIGNAL_SLICE: Duration = Duration::from_millis(50);

impl LazyPolicy {
    /// Wraps `spec`; loads nothing.
    pub fn new(spec: PolicySpec) -> Self {
        LazyPolicy {
            spec,
            state: State::Unloaded,
            fallback: None,
            defaulted: 0,
            said_compiling: false,
            faults: 0,
        }
    }

    /// Whether loading has started (for tests of laziness).
    pub fn is_loaded(&self) -> bool {
        !matches!(self.state, State::Unloaded)
    }

    fn start(&mut self) -> Result<(), PolicyError> {
        if let State::Unloaded = self.state {
            let (tx, rx) = mpsc::channel();
            let spec = self.spec.clone();
            std::thread::Builder::new()
                .name("cachelock-policy-load".into())
                .spawn(move || {
                    let _ = tx.send(WasmPolicy::load(&spec));
                })
                .map_err(|e| {
                    PolicyError::fault(
                        &self.spec.name,
                        format!("cannot start a thread to load it: {e}"),
                    )
                })?;
            self.state = State::Loading {
                rx,
                since: Instant::now(),
            };
        }
        Ok(())
    }

    /// Waits for the loader until `until` (or a terminating signal); returns whether it is done.
    fn wait_until(&mut self, until: Option<Instant>) -> bool {
        let State::Loading { rx, .. } = &self.state else {
            return true;
        };
        let r = if until.is_some_and(|u| u <= Instant::now()) {
            // A look, not a wait.
            match rx.try_recv() {
                Ok(r) => Some(r),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => {
                    Some(Err(crate::error::Error::config(format!(
                        "policy '{}': the loader stopped without a result",
                        self.spec.name
                    ))))
                }
            }
        } else {
            self.wait_loader(until)
        };
        self.settle(r)
    }

    fn wait_loader(
        &self,
        until: Option<Instant>,
    ) -> Option<Result<WasmPolicy, crate::error::Error>> {
        let State::Loading { rx, .. } = &self.state else {
            return None;
        };
        // A bounded wait (from `ready`) also ends on a terminating signal.
        let interrupted = until.map(|_| signal_watch());
        loop {
            let slice = match until {
                Some(u) => u
                    .saturating_duration_since(Instant::now())
                    .min(SIGNAL_SLICE),
                None => SIGNAL_SLICE,
            };
            match rx.recv_timeout(slice) {
                Ok(r) => return Some(r),
                Err(RecvTimeoutError::Disconnected) => {
                    return Some(Err(crate::error::Error::config(format!(
                        "policy '{}': the loader stopped without a result",
                        self.spec.name
                    ))))
                }
                Err(RecvTimeoutError::Timeout) => {
                    if until.is_some_and(|u| Instant::now() >= u)
                        || interrupted.as_ref().is_some_and(SignalWatch::seen)
                    {
                        return None;
                    }
                }
            }
        }
    }

    fn settle(&mut self, r: Option<Result<WasmPolicy, crate::error::Error>>) -> bool {
        match r {
            Some(Ok(p)) => {
                if self.said_compiling {
                    tracing::info!(
                        "policy '{}' is compiled: it orders the queue from now on",
                        self.spec.name
                    );
                }
                self.state = State::Ready(Box::new(p));
                true
            }
            Some(Err(e)) => {
                let mut pe = PolicyError::load(&self.spec.name, e.message);
                if e.kind != crate::error::Kind::Config {
                    pe.kind = ErrorKind::Fetch(e.kind);
                }
                self.state = State::Failed(pe);
                true
            }
            None => false,
        }
    }

    /// The loaded policy, waiting for the loader without bound (a decision that has no
    /// fallback); `Ok(None)` while loading after the bound (the fallback rules answer).
    fn policy(&mut self) -> Result<Option<&mut WasmPolicy>, PolicyError> {
        match self.state {
            State::Unloaded => {
                self.start()?;
                self.wait_until(None);
            }
            State::Loading { .. } => {
                // Only `ready` waits (bounded); a decision asked meanwhile takes the fallback.
                self.wait_until(Some(Instant::now()));
            }
            _ => {}
        }
        match &mut self.state {
            State::Ready(p) => Ok(Some(p)),
            State::Failed(e) => Err(e.clone()),
            State::Loading { .. } => Ok(None),
            State::Unloaded => unreachable!("started above"),
        }
    }

    /// Runs `f` on the policy (or, while it compiles past the bound, on the fallback rules);
    /// under `on_error: default` a fault (not a load error) is answered by `builtin:default`.
    fn decide<R>(
        &mut self,
        f: impl Fn(&mut dyn Policy) -> Result<R, PolicyError>,
    ) -> Result<R, PolicyError> {
        let err = match self.policy()? {
            Some(p) => match f(p) {
                Ok(v) => return Ok(v),
                Err(e) => e,
            },
            None => return f(&mut DefaultPolicy),
        };
        if err.kind == ErrorKind::Fault {
            self.faults = self.faults.saturating_add(1);
        }
        if self.spec.on_error != OnError::Default {
            return Err(err);
        }
        self.defaulted += 1;
        if self.defaulted == 1 {
            tracing::warn!(
                "{err}; this and later faulted decisions of this policy are taken by \
                 builtin:default instead (on_error: default; the count is logged at exit)"
            );
        }
        if self.fallback.is_none() {
            let spec = PolicySpec {
                name: format!("builtin:default (fallback for '{}')", self.spec.name),
                source: Source::Builtin(builtin::get("default").expect("embedded")),
                sha256: None,
                config: Vec::new(),
                limits: self.spec.limits.clone(),
                on_error: OnError::Fail,
                cache: self.spec.cache.clone(),
                budget: self.spec.budget.clone(),
            };
            let p =
                WasmPolicy::load(&spec).map_err(|e| PolicyError::fault(&spec.name, e.message))?;
            self.fallback = Some(p);
        }
        f(self.fallback.as_mut().expect("loaded above"))
    }
}

impl Drop for LazyPolicy {
    fn drop(&mut self) {
        if self.defaulted > 1 {
            tracing::warn!(
                "policy '{}' faulted {} times; builtin:default decided instead (on_error: default)",
                self.spec.name,
                self.defaulted
            );
        }
    }
}

impl Policy for LazyPolicy {
    fn name(&self) -> &str {
        &self.spec.name
    }

    fn ready(&mut self, until: Option<Instant>) -> Result<Readiness, PolicyError> {
        let waited = match self.state {
            State::Unloaded => {
                self.start()?;
                true
            }
            State::Loading { .. } => false,
            State::Ready(_) => {
                return Ok(Readiness {
                    waited: false,
                    loaded: true,
                })
            }
            State::Failed(ref e) => return Err(e.clone()),
        };
        let State::Loading { since, .. } = self.state else {
            unreachable!("started above")
        };
        // The caller's deadline cuts the wait short: `-n` and `-w` hold while a policy
        // compiles (the request is then decided by the fallback rules).
        let own = since + self.spec.budget.wait;
        let bound = until.map_or(own, |u| u.min(own));
        let before = Instant::now();
        let done = self.wait_until(Some(bound));
        if !done && !self.said_compiling && Instant::now() >= own {
            self.said_compiling = true;
            tracing::warn!(
                "policy '{}' is still compiling after {} s (policy_compile.wait_seconds): \
                 the queue is ordered by priority (builtin:default's rules) until it is ready",
                self.spec.name,
                self.spec.budget.wait.as_secs()
            );
        }
        if let State::Failed(e) = &self.state {
            return Err(e.clone());
        }
        Ok(Readiness {
            waited: waited || before.elapsed() >= Duration::from_millis(1),
            loaded: done,
        })
    }

    fn digest(&self) -> Option<&str> {
        match (&self.state, &self.spec.source) {
            (State::Ready(p), _) => Some(&p.info().sha256),
            // Known without loading (an uncontended request never loads): what a built-in or a
            // pinned module must hash to, or it is not loaded at all.
            (_, Source::Builtin(b)) => Some(b.sha256),
            (_, Source::File(_) | Source::Oci(_)) => self
                .spec
                .sha256
                .as_deref()
                .map(|s| s.strip_prefix("sha256:").unwrap_or(s)),
        }
    }

    fn faults(&self) -> u32 {
        self.faults
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

/// Notices SIGINT/SIGTERM/SIGHUP while a waiter waits for a compile, without consuming them
/// (the engine's own handlers see them too). Registered only for the wait: `ready` is called by
/// the engine, which always has its handlers installed, so the default action is never lost.
struct SignalWatch {
    flag: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ids: Vec<signal_hook_registry::SigId>,
}

fn signal_watch() -> SignalWatch {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ids = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP]
        .into_iter()
        .filter_map(|s| {
            let flag = flag.clone();
            // SAFETY: the action only stores to an atomic: async-signal-safe, no allocation.
            unsafe {
                signal_hook_registry::register_sigaction(s, move |_| {
                    flag.store(true, std::sync::atomic::Ordering::SeqCst)
                })
            }
            .ok()
        })
        .collect();
    SignalWatch { flag, ids }
}

impl SignalWatch {
    fn seen(&self) -> bool {
        self.flag.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for SignalWatch {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook_registry::unregister(id);
        }
    }
}
