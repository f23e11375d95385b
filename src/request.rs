//! [`LockRequest`]: the command line, the configuration and the environment turned into
//! validated lock options, once. `run`, `dockerd` and the Earthly drop-in all take their lock
//! through it, so the sequence (configuration → store → policy → engine) exists in one place.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cachelock::config::{Loaded, LockSettings};
use cachelock::error::{Error, Result};
use cachelock::lock::{self, Acquired, Store};
use cachelock::policy::{Mode, Policy};
use cachelock::process::Signals;

use crate::cli::LockArgs;

/// Most parallel runs on one Earthly cache id (`CACHELOCK_SLOTS`): each is a warm data root.
const MAX_EARTHLY_SLOTS: u32 = 64;
/// Longest accepted wait bound (`-w`, `CACHELOCK_WAIT`): ten years, far beyond any build.
const MAX_WAIT_S: f64 = 315_360_000.0;

/// One lock request, validated.
pub struct LockRequest {
    /// The configuration it was built with.
    pub loaded: Loaded,
    /// What the configuration says about this lock (policy, slots, fall-back, wait mode).
    pub settings: LockSettings,
    /// The engine's options.
    pub options: lock::Options,
    /// Where the lock lives.
    pub store: Store,
    policy_override: Option<String>,
    policy_config: Vec<(String, String)>,
}

impl LockRequest {
    /// From the lock options of `run` and `dockerd`, for lock `name`.
    pub fn from_flags(name: &str, args: &LockArgs) -> Result<Self> {
        // Refuse a bad name before anything (configuration, directories) is touched.
        lock::name::validate(name)?;
        let loaded = Loaded::load(args.config.as_deref())?;
        let settings = loaded.config.lock_settings(name);
        let wait_limit_ms = if args.nonblock {
            Some(0)
        } else {
            args.wait.map(|s| wait_ms("-w", s)).transpose()?
        };
        let options = lock::Options {
            name: name.to_string(),
            mode: if args.shared {
                Mode::Shared
            } else {
                Mode::Exclusive
            },
            priority: args.priority,
            labels: args.labels.clone(),
            queue_key: args.queue_key.clone(),
            wait_limit_ms,
            wait_mode: args.wait_mode.unwrap_or(settings.wait_mode),
            slots: settings.slots.max(1),
            fallback_allowed: settings.fallback,
            key_grace_ms: loaded.config.queue_key_grace_ms(),
            conflict_exit_code: args.conflict_exit_code,
            progress_interval: (!args.quiet).then(|| progress_interval(&loaded)).flatten(),
        };
        lock::validate(&options)?;
        let (store, private_because) = store(args.lock_dir.as_deref(), &loaded)?;
        if let Some(why) = private_because {
            warn_private(&store, &why);
        }
        Ok(LockRequest {
            loaded,
            settings,
            options,
            store,
            policy_override: args.policy.clone(),
            policy_config: args.policy_config.clone(),
        })
    }

    /// For the Earthly drop-in, which Earthly calls without flags: lock `name` in `lock_dir`,
    /// with `CACHELOCK_PRIORITY`, `CACHELOCK_WAIT`, `CACHELOCK_LABELS` (`k=v,k=v`),
    /// `CACHELOCK_QUEUE_KEY` and `CACHELOCK_SLOTS` (else the lock rule's `slots`) read through
    /// `get` (an invalid value is a usage error, exit 64).
    pub fn from_env(
        name: &str,
        loaded: Loaded,
        lock_dir: PathBuf,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        lock::name::validate(name)?;
        let settings = loaded.config.lock_settings(name);
        let priority = match get("CACHELOCK_PRIORITY") {
            None => 0,
            Some(v) => v.trim().parse().map_err(|_| {
                Error::usage(format!(
                    "CACHELOCK_PRIORITY={v:?} is not an integer: set a priority such as 10 or -5, or unset it"
                ))
            })?,
        };
        let wait_limit_ms = match get("CACHELOCK_WAIT") {
            None => None,
            Some(v) => match v.trim().parse::<f64>() {
                Ok(s) => Some(wait_ms("CACHELOCK_WAIT", s)?),
                Err(_) => {
                    return Err(Error::usage(format!(
                        "CACHELOCK_WAIT={v:?} is not a non-negative number of seconds: set e.g. 600 or 0.5, or unset it to wait without bound"
                    )))
                }
            },
        };
        let labels = match get("CACHELOCK_LABELS") {
            None => Vec::new(),
            Some(v) => v
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((k, val)) if !k.trim().is_empty() => {
                        Ok((k.trim().to_string(), val.trim().to_string()))
                    }
                    _ => Err(Error::usage(format!(
                        "CACHELOCK_LABELS entry {p:?} is not KEY=VALUE: write labels as KEY=VALUE,KEY=VALUE"
                    ))),
                })
                .collect::<Result<_>>()?,
        };
        let slots = match get("CACHELOCK_SLOTS") {
            None => settings.slots,
            Some(v) => match v.trim().parse::<u32>() {
                Ok(n) if (1..=MAX_EARTHLY_SLOTS).contains(&n) => n,
                _ => {
                    return Err(Error::usage(format!(
                        "CACHELOCK_SLOTS={v:?} is not a number of parallel runs from 1 to {MAX_EARTHLY_SLOTS}: set e.g. 2, or unset it for one run at a time"
                    )))
                }
            },
        };
        let options = lock::Options {
            name: name.to_string(),
            mode: Mode::Exclusive,
            priority,
            labels,
            queue_key: get("CACHELOCK_QUEUE_KEY"),
            wait_limit_ms,
            wait_mode: settings.wait_mode,
            slots,
            fallback_allowed: settings.fallback,
            key_grace_ms: loaded.config.queue_key_grace_ms(),
            conflict_exit_code: cachelock::error::code::CONFLICT_DEFAULT,
            progress_interval: progress_interval(&loaded),
        };
        lock::validate(&options)?;
        let store = Store::Dir {
            path: lock_dir,
            file_mode: loaded.config.file_mode,
            dir_mode: loaded.config.dir_mode,
        };
        Ok(LockRequest {
            loaded,
            settings,
            options,
            store,
            policy_override: None,
            policy_config: Vec::new(),
        })
    }

    /// The policy deciding this request (`--policy` if given, else the configured one), loaded
    /// lazily: an uncontended request never instantiates it.
    pub fn policy(&self) -> Result<Box<dyn Policy>> {
        cachelock::policy::for_lock(
            &self.loaded,
            &self.settings,
            self.policy_override.as_deref(),
            &self.policy_config,
        )
    }

    /// Opens the store and waits in the queue (see [`lock::acquire`]).
    pub fn acquire(&self, policy: &mut dyn Policy, signals: &Signals) -> Result<Acquired> {
        let backend = lock::open(&self.store)?;
        lock::acquire(backend.as_ref(), &self.options, policy, signals)
    }
}

/// The store named by `--lock-dir` / `CACHELOCK_LOCK_DIR` (`flag`), else the configuration's
/// `lock_dir` (relative to the file), else the default lock directory — with, for a private
/// fallback of the default, why it is not the host's shared one (exit 73 if that private
/// directory is not safely the caller's own).
pub fn store(flag: Option<&Path>, loaded: &Loaded) -> Result<(Store, Option<String>)> {
    let (path, private_because) = match (flag, &loaded.config.lock_dir) {
        (Some(p), _) => (p.to_path_buf(), None),
        (None, Some(p)) => (loaded.resolve_path(p), None),
        (None, None) => {
            let d = cachelock::config::default_lock_dir()?;
            (d.path, d.private_because)
        }
    };
    let store = Store::Dir {
        path,
        file_mode: loaded.config.file_mode,
        dir_mode: loaded.config.dir_mode,
    };
    Ok((store, private_because))
}

/// Every run that falls back to a private lock directory says so: its locks exclude no other
/// user's (root's included), which must never happen silently.
fn warn_private(store: &Store, why: &str) {
    let Store::Dir { path, .. } = store;
    eprintln!(
        "cachelock: warning: using the private lock directory {} because {why}. Locks taken there do not exclude other users' or root's; set --lock-dir or CACHELOCK_LOCK_DIR to a directory you share.",
        path.display()
    );
}

fn wait_ms(what: &str, seconds: f64) -> Result<u64> {
    if !(seconds.is_finite() && (0.0..=MAX_WAIT_S).contains(&seconds)) {
        return Err(Error::usage(format!(
            "{what} {seconds}: the wait must be between 0 and {MAX_WAIT_S} seconds"
        )));
    }
    Ok((seconds * 1000.0).round() as u64)
}

fn progress_interval(loaded: &Loaded) -> Option<Duration> {
    Some(Duration::from_secs_f64(loaded.config.progress_interval())).filter(|d| !d.is_zero())
}
