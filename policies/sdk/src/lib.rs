//! SDK for cachelock policies: implement [`Policy`] (only the calls you change; the rest follow
//! `builtin:default`) and export it with [`export_policy!`]. Build with
//! `cargo build --release --target wasm32-wasip2`; the `.wasm` file is the policy component.
//!
//! ```ignore
//! use cachelock_policy_sdk::*;
//! struct Newest;
//! impl Policy for Newest {
//!     fn configure(_: &Config) -> Result<Self, String> { Ok(Newest) }
//!     fn rank(&mut self, t: &Ticket, _now_ms: u64) -> i64 { t.request.enqueued_at_ms as i64 }
//! }
//! export_policy!(Newest);
//! ```

/// The bindings generated from `wit/policy.wit` (`cachelock:policy@0.1.0`).
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "policy",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "__export_policy_world",
        default_bindings_module: "cachelock_policy_sdk::bindings",
    });
}

pub use bindings::cachelock::policy::types::{
    Level, Mode, Request, RetryDecision, StartAttempt, StartFailure, Ticket, WaitDecision,
    WaitState,
};

use std::any::Any;
use std::cell::RefCell;

/// The `config` map of the policy file (plus `--policy-config`), with typed getters.
#[derive(Debug, Clone, Default)]
pub struct Config {
    entries: Vec<(String, String)>,
}

impl Config {
    /// Wraps the pairs passed to `configure`.
    pub fn new(entries: Vec<(String, String)>) -> Self {
        Self { entries }
    }
    /// All pairs, in order.
    pub fn entries(&self) -> &[(String, String)] {
        &self.entries
    }
    /// The value of `key` (the last one wins if repeated).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    /// `key` parsed as `T`, `default` when absent; an unparsable value is an error naming the key.
    pub fn parse_or<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T, String> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| format!("config `{key}`: cannot parse {v:?}")),
        }
    }
    /// A duration in milliseconds: `250ms`, `30s`, `5m`, `1h` or a bare number of seconds.
    pub fn duration_ms(&self, key: &str) -> Result<Option<u64>, String> {
        self.get(key)
            .map(|v| parse_duration_ms(v).map_err(|e| format!("config `{key}`: {e}")))
            .transpose()
    }
    /// Fails on any key not in `known`, so that a typo in the policy file is reported.
    pub fn deny_unknown(&self, known: &[&str]) -> Result<(), String> {
        for (k, _) in &self.entries {
            if !known.contains(&k.as_str()) {
                return Err(format!(
                    "unknown config key `{k}` (known: {})",
                    known.join(", ")
                ));
            }
        }
        Ok(())
    }
}

/// Parses `250ms`, `30s`, `5m`, `1h`, or a bare number of seconds (fractions allowed).
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3_600_000.0)
    } else {
        (t, 1000.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 30s, 5m, 250ms"))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("{text:?} must be a non-negative duration"));
    }
    Ok((v * scale) as u64)
}

/// Logs through the host (`host.log`): shows up in cachelock's log tagged with the policy name.
pub fn log(level: Level, message: &str) {
    bindings::cachelock::policy::host::log(level, message);
}

/// `builtin:default`'s rules, for policies that change only part of them.
pub mod defaults {
    use super::*;

    /// The log line after which a dockerd start is retried (Earthly's behaviour).
    pub const CONTAINERD_TIMEOUT_LINE: &str =
        "failed to start containerd: timeout waiting for containerd to start";

    /// Rank = the caller's priority.
    pub fn rank(waiter: &Ticket) -> i64 {
        waiter.request.priority as i64
    }

    /// Re-evaluation interval by queue position: the head looks often, the tail rarely.
    pub fn interval_for_position(position: usize) -> u64 {
        (20 * (position as u64 + 1)).min(1000)
    }

    /// How many of `state.waiters` go before `state.me` under `rank_of`.
    pub fn position(state: &WaitState, mut rank_of: impl FnMut(&Ticket) -> i64) -> usize {
        let mine = (
            std::cmp::Reverse(rank_of(&state.me)),
            state.me.request.enqueued_at_ms,
        );
        state
            .waiters
            .iter()
            .filter(|t| {
                let theirs = (std::cmp::Reverse(rank_of(t)), t.request.enqueued_at_ms);
                theirs < mine || (theirs == mine && t.id < state.me.id)
            })
            .count()
    }

    /// Gives up at the caller's bound (`-w`), else keeps waiting at the position's interval.
    pub fn on_wait(state: &WaitState, rank_of: impl FnMut(&Ticket) -> i64) -> WaitDecision {
        if let Some(limit) = state.me.request.wait_limit_ms {
            if state.waited_ms >= limit {
                return WaitDecision::GiveUp(format!(
                    "waited {:.1}s, the caller's limit",
                    state.waited_ms as f64 / 1000.0
                ));
            }
        }
        WaitDecision::KeepWaiting(interval_for_position(position(state, rank_of)))
    }

    /// 300 s.
    pub fn start_timeout_ms() -> u64 {
        300_000
    }

    /// Retry after 5 s, up to 5 attempts, only on the containerd time-out line.
    pub fn on_start_failure(attempt: &StartAttempt, log_tail: &str) -> RetryDecision {
        if attempt.attempt < 5 && log_tail.contains(CONTAINERD_TIMEOUT_LINE) {
            RetryDecision::RetryAfter(5_000)
        } else if attempt.attempt >= 5 {
            RetryDecision::GiveUp(format!(
                "dockerd did not start after {} attempts",
                attempt.attempt
            ))
        } else {
            RetryDecision::GiveUp("dockerd did not start".to_string())
        }
    }

    /// 30 s.
    pub fn stop_timeout_ms() -> u64 {
        30_000
    }
}

/// A policy. Implement `configure` and whichever decisions you change; the others follow
/// `builtin:default` (with `on_wait` using your `rank` for the queue position).
pub trait Policy: Sized + 'static {
    /// Called once with the policy file's `config` map; an `Err` refuses the configuration.
    fn configure(config: &Config) -> Result<Self, String>;

    /// Ordering key: highest first; ties by `enqueued_at_ms`, then ticket id. Deterministic.
    fn rank(&mut self, waiter: &Ticket, now_ms: u64) -> i64 {
        let _ = now_ms;
        defaults::rank(waiter)
    }

    /// What a waiting request does now.
    fn on_wait(&mut self, state: &WaitState) -> WaitDecision {
        let now = state.now_ms;
        defaults::on_wait(state, |t| self.rank(t, now))
    }

    /// How long to wait for dockerd's `/_ping` on this attempt.
    fn start_timeout_ms(&mut self, attempt: &StartAttempt) -> u64 {
        let _ = attempt;
        defaults::start_timeout_ms()
    }

    /// dockerd did not become ready: retry or give up.
    fn on_start_failure(
        &mut self,
        attempt: &StartAttempt,
        failure: &StartFailure,
        log_tail: &str,
    ) -> RetryDecision {
        let _ = failure;
        defaults::on_start_failure(attempt, log_tail)
    }

    /// SIGTERM grace before dockerd is killed.
    fn stop_timeout_ms(&mut self, cache_id: Option<&str>) -> u64 {
        let _ = cache_id;
        defaults::stop_timeout_ms()
    }
}

thread_local! {
    // The configured policy; a component instance is single-threaded.
    static INSTANCE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

#[doc(hidden)]
pub fn __configure<P: Policy>(config: Vec<(String, String)>) -> Result<(), String> {
    let p = P::configure(&Config::new(config))?;
    INSTANCE.with(|i| *i.borrow_mut() = Some(Box::new(p)));
    Ok(())
}

#[doc(hidden)]
pub fn __with<P: Policy, R>(f: impl FnOnce(&mut P) -> R) -> R {
    INSTANCE.with(|i| {
        let mut slot = i.borrow_mut();
        if slot.is_none() {
            // The host always calls configure first; an empty config is the fallback for
            // hosts that do not.
            let p = P::configure(&Config::default()).expect("configure with an empty config");
            *slot = Some(Box::new(p));
        }
        let p = slot
            .as_mut()
            .and_then(|b| b.downcast_mut::<P>())
            .expect("policy instance of the exported type");
        f(p)
    })
}

/// Exports `$ty` (which implements [`Policy`]) as the component's `cachelock:policy` world.
#[macro_export]
macro_rules! export_policy {
    ($ty:ty) => {
        const _: () = {
            struct __CachelockPolicy;

            impl $crate::bindings::Guest for __CachelockPolicy {
                fn configure(config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>)
                    -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__configure::<$ty>(config)
                }
            }

            impl $crate::bindings::exports::cachelock::policy::lock_policy::Guest for __CachelockPolicy {
                fn rank(waiter: $crate::Ticket, now_ms: u64) -> i64 {
                    $crate::__with::<$ty, _>(|p| $crate::Policy::rank(p, &waiter, now_ms))
                }
                fn on_wait(state: $crate::WaitState) -> $crate::WaitDecision {
                    $crate::__with::<$ty, _>(|p| $crate::Policy::on_wait(p, &state))
                }
            }

            impl $crate::bindings::exports::cachelock::policy::dockerd_policy::Guest for __CachelockPolicy {
                fn start_timeout_ms(attempt: $crate::StartAttempt) -> u64 {
                    $crate::__with::<$ty, _>(|p| $crate::Policy::start_timeout_ms(p, &attempt))
                }
                fn on_start_failure(
                    attempt: $crate::StartAttempt,
                    failure: $crate::StartFailure,
                    log_tail: ::std::string::String,
                ) -> $crate::RetryDecision {
                    $crate::__with::<$ty, _>(|p| {
                        $crate::Policy::on_start_failure(p, &attempt, &failure, &log_tail)
                    })
                }
                fn stop_timeout_ms(cache_id: ::std::option::Option<::std::string::String>) -> u64 {
                    $crate::__with::<$ty, _>(|p| $crate::Policy::stop_timeout_ms(p, cache_id.as_deref()))
                }
            }

            $crate::bindings::__export_policy_world!(__CachelockPolicy with_types_in $crate::bindings);
        };
    };
}
