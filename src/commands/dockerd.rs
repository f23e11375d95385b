//! `cachelock dockerd`: the cache id's lock request (if any) and the run's roots, handed to
//! [`cachelock::dockerd::job`].

use std::path::PathBuf;

use cachelock::config::{self, Loaded};
use cachelock::dockerd::earthly::Trace;
use cachelock::dockerd::job::{self, CacheLock, Job, RootKind};
use cachelock::dockerd::{root, setup};
use cachelock::error::{Error, Result};
use cachelock::lock::Store;
use cachelock::process::Signals;

use crate::cli::DockerdArgs;
use crate::request::LockRequest;

/// Runs `cachelock dockerd`; returns the exit code.
pub fn execute(args: DockerdArgs) -> Result<i32> {
    if args.lock.shared {
        return Err(Error::usage(
            "--shared makes no sense for `cachelock dockerd`: one dockerd owns a data root; use slots (`locks: [{match: ID, slots: N}]`) for parallel builds",
        ));
    }
    // The cache id is the lock: a bad one is refused before anything is touched.
    let mut req = args
        .cache_id
        .as_deref()
        .map(|id| LockRequest::from_flags(id, &args.lock))
        .transpose()?;
    // Over a fleet-wide store, a data root on this host's disk is this host's business: its
    // lock name carries the host, unless the cache root is shared storage.
    if let Some(r) = req.as_mut() {
        if matches!(r.store, Store::Etcd(_)) && !r.loaded.config.dockerd.cache_root_shared {
            r.options.name = cachelock::lock::etcd::host_scoped_name(
                &r.options.name,
                &cachelock::sys::hostname(),
            );
            cachelock::lock::validate(&r.options)?;
        }
    }
    let loaded = match &req {
        Some(r) => r.loaded.clone(),
        None => Loaded::load(args.lock.config.as_deref())?,
    };
    let resolved = setup::resolve(&loaded, setup::Defaults::DOCKERD)?;
    let cache_root = args
        .cache_root
        .clone()
        .or_else(|| loaded.config.cache_root.clone())
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_CACHE_ROOT));
    let signals = Signals::install()?;
    let mut policy = match &req {
        Some(r) => r.policy()?,
        None => cachelock::policy::for_lock(
            &loaded,
            &loaded.config.lock_settings(""),
            args.lock.policy.as_deref(),
            &args.lock.policy_config,
        )?,
    };
    let (root, env) = match (req, &args.cache_id) {
        (Some(r), Some(id)) => (
            RootKind::Locked {
                name: id.clone(),
                lock: Box::new(CacheLock {
                    store: r.store,
                    options: r.options,
                    earthly_flock: false,
                }),
            },
            vec![("CACHELOCK_CACHE_ID".to_string(), id.clone())],
        ),
        _ => (
            RootKind::Fresh {
                dir: PathBuf::from(root::PRIVATE_DIR),
            },
            Vec::new(),
        ),
    };
    let job = Job {
        resolved,
        cache_root,
        root,
        loads: args.load,
        registry_loads: Vec::new(),
        compose: None,
        command: args.command,
        env,
        trace: Trace(false),
    };
    job::run(job, policy.as_mut(), &signals)
}
