//! [`LockRequest`]: the command line, the configuration and the environment turned into
//! validated lock options, once. `run`, `dockerd` and the Earthly drop-in all take their lock
//! through it, so the sequence (configuration → store → policy → engine) exists in one place.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cachelock::config::{Loaded, LockSettings};
use cachelock::error::{Error, Result};
use cachelock::lock::etcd::EtcdStore;
use cachelock::lock::{self, Acquired, Store};
use cachelock::policy::{Mode, Policy};
use cachelock::process::Signals;

use crate::cli::{LockArgs, StoreArgs};

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
            observers: lock::Observers::new(),
            policy: None,
        };
        lock::validate(&options)?;
        let (store, private_because) =
            store(args.backend.as_deref(), args.lock_dir.as_deref(), &loaded)?;
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
            observers: lock::Observers::new(),
            policy: None,
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

    /// Opens the store and waits in the queue (see [`lock::acquire`]), observed by the
    /// lock directory's `serve` and the request log, where there are (`observe::for_request`).
    pub fn acquire(&self, policy: &mut dyn Policy, signals: &Signals) -> Result<Acquired> {
        let backend = lock::open(&self.store)?;
        let mut opts = self.options.clone();
        cachelock::observe::attach(&mut opts.observers, &self.store, &self.loaded);
        opts.policy = Some(lock::PolicyRef::of(policy));
        lock::acquire(backend.as_ref(), &opts, policy, signals)
    }
}

/// The store: `--backend` / `CACHELOCK_BACKEND` (`backend`), else `--lock-dir` /
/// `CACHELOCK_LOCK_DIR` (`lock_dir`), else the configuration's `backend`, else its `lock_dir`
/// (relative to the file), else the default lock directory — with, for a private fallback of
/// the default, why it is not the host's shared one (exit 73 if that private directory is not
/// safely the caller's own). A bad URL is a usage error (64) on the command line and a
/// configuration error (78) in the file. An etcd store takes its credentials from `ETCDCTL_*`
/// variables, else the file's `etcd:` section.
pub fn store(
    backend: Option<&str>,
    lock_dir: Option<&Path>,
    loaded: &Loaded,
) -> Result<(Store, Option<String>)> {
    store_with(
        backend,
        lock_dir,
        loaded,
        cachelock::config::default_lock_dir,
    )
}

/// The configuration `--config` names and the store of `--backend` / `--lock-dir` in it
/// (`status`, `serve`): see [`store`].
pub fn configured_store(args: &StoreArgs) -> Result<(Loaded, Store, Option<String>)> {
    let loaded = Loaded::load(args.config.as_deref())?;
    let (store, private_because) =
        store(args.backend.as_deref(), args.lock_dir.as_deref(), &loaded)?;
    Ok((loaded, store, private_because))
}

/// [`store`], with `default_dir` choosing the lock directory when nothing names one (`doctor`
/// looks at the host's shared directory without creating anything).
pub fn store_with(
    backend: Option<&str>,
    lock_dir: Option<&Path>,
    loaded: &Loaded,
    default_dir: impl FnOnce() -> Result<cachelock::config::DefaultLockDir>,
) -> Result<(Store, Option<String>)> {
    let dir = |path: PathBuf| Store::Dir {
        path,
        file_mode: loaded.config.file_mode,
        dir_mode: loaded.config.dir_mode,
    };
    let mut private_because = None;
    let store = match (backend, lock_dir, &loaded.config.backend) {
        (Some(url), _, _) => parse_backend(url, |p| p.to_path_buf(), dir)
            .map_err(|m| Error::usage(format!("--backend / CACHELOCK_BACKEND: {m}")))?,
        (None, Some(p), _) => dir(p.to_path_buf()),
        (None, None, Some(url)) => {
            parse_backend(url, |p| loaded.resolve_path(p), dir).map_err(|m| {
                Error::config(format!(
                    "configuration file {}: key `backend`: {m}",
                    loaded.path.as_deref().unwrap_or(Path::new("?")).display()
                ))
            })?
        }
        (None, None, None) => dir(match &loaded.config.lock_dir {
            Some(p) => loaded.resolve_path(p),
            None => {
                let d = default_dir()?;
                private_because = d.private_because;
                d.path
            }
        }),
    };
    let store = match store {
        Store::Etcd(s) => Store::Etcd(etcd_settings(s, loaded, |k| {
            std::env::var(k).ok().filter(|v| !v.is_empty())
        })?),
        other => other,
    };
    Ok((store, private_because))
}

/// Every run that falls back to a private lock directory says so: its locks exclude no other
/// user's (root's included), which must never happen silently.
fn warn_private(store: &Store, why: &str) {
    if let Store::Dir { path, .. } = store {
        eprintln!(
            "cachelock: warning: using the private lock directory {} because {why}. Locks taken there do not exclude other users' or root's; set --lock-dir or CACHELOCK_LOCK_DIR to a directory you share.",
            path.display()
        );
    }
}

fn parse_backend(
    url: &str,
    resolve: impl Fn(&Path) -> PathBuf,
    dir: impl Fn(PathBuf) -> Store,
) -> std::result::Result<Store, String> {
    if let Some(path) = url.strip_prefix("file://") {
        if path.is_empty() {
            return Err(format!(
                "{url:?} names no directory: write file:///var/lib/cachelock"
            ));
        }
        return Ok(dir(resolve(Path::new(path))));
    }
    if url.starts_with("etcd://") {
        return EtcdStore::from_url(url).map(Store::Etcd);
    }
    Err(format!(
        "{:?} is not a lock store: use file://DIR or etcd://HOST:PORT[,HOST:PORT...][/PREFIX]",
        url.chars().take(200).collect::<String>()
    ))
}

/// Applies the credentials (`ETCDCTL_CACERT`, `ETCDCTL_CERT`, `ETCDCTL_KEY`, `ETCDCTL_USER`
/// as `user[:password]`, `ETCDCTL_PASSWORD`, read through `env`; else the file's `etcd:`
/// section) and timings to an etcd store.
fn etcd_settings(
    mut s: EtcdStore,
    loaded: &Loaded,
    env: impl Fn(&str) -> Option<String>,
) -> Result<EtcdStore> {
    let c = &loaded.config.etcd;
    let file = |var: &str, key: &Option<PathBuf>| {
        env(var)
            .map(PathBuf::from)
            .or_else(|| key.as_deref().map(|p| loaded.resolve_path(p)))
    };
    s.ca_file = file("ETCDCTL_CACERT", &c.ca_file);
    s.cert_file = file("ETCDCTL_CERT", &c.cert_file);
    s.key_file = file("ETCDCTL_KEY", &c.key_file);
    if let Some(user) = env("ETCDCTL_USER").or_else(|| c.user.clone()) {
        let (name, inline) = match user.split_once(':') {
            Some((n, p)) => (n.to_string(), Some(p.to_string())),
            None => (user.clone(), None),
        };
        let password = match inline
            .or_else(|| env("ETCDCTL_PASSWORD"))
            .or_else(|| c.password.clone())
        {
            Some(p) => p,
            None => match &c.password_file {
                Some(f) => {
                    let f = loaded.resolve_path(f);
                    let text = std::fs::read_to_string(&f).map_err(|e| {
                        Error::config(format!(
                            "cannot read the etcd password file {} (etcd.password_file): {e}",
                            f.display()
                        ))
                    })?;
                    text.lines().next().unwrap_or("").to_string()
                }
                None => {
                    return Err(Error::config(format!(
                        "etcd user {name:?} has no password: set ETCDCTL_USER=user:password or ETCDCTL_PASSWORD, or `etcd.password` / `etcd.password_file` in the configuration"
                    )))
                }
            },
        };
        if name.is_empty() {
            return Err(Error::config(
                "the etcd user name is empty (ETCDCTL_USER or `etcd.user`)",
            ));
        }
        s.user = Some((name, password));
    }
    let secs = |v: Option<f64>, d: Duration| v.map(Duration::from_secs_f64).unwrap_or(d);
    s.lease_ttl = secs(c.lease_ttl, s.lease_ttl);
    s.request_timeout = secs(c.request_timeout, s.request_timeout);
    s.unavailable_timeout = secs(c.unavailable_timeout, s.unavailable_timeout);
    Ok(s)
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
