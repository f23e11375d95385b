//! `cachelock dockerd`: lock the cache id (if any), pick the data root, run the command beside
//! its own dockerd, release.

use std::path::PathBuf;

use cachelock::config::{self, Loaded};
use cachelock::dockerd::{claim, hygiene, root, session, setup, usage};
use cachelock::error::{Error, Result};
use cachelock::lock::{Acquired, Containment, Store};
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
    hygiene::check_loadable(&args.load)?;
    let cache_root = args
        .cache_root
        .clone()
        .or_else(|| loaded.config.cache_root.clone())
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_CACHE_ROOT));
    root::check_cache_root(&cache_root)?;
    resolved.check_run_dir()?;
    let signals = Signals::install()?;
    let short = session::short_id();
    let lock_name = args.cache_id.clone().unwrap_or_default();
    let settings = loaded.config.lock_settings(&lock_name);
    let mut policy = match &req {
        Some(r) => r.policy()?,
        None => cachelock::policy::for_lock(
            &loaded,
            &settings,
            args.lock.policy.as_deref(),
            &args.lock.policy_config,
        )?,
    };

    let acquired = match &req {
        Some(r) => Some(r.acquire(policy.as_mut(), &signals)?),
        None => None,
    };
    let (data_root, cached, containment, slot) = match &acquired {
        Some(Acquired::Held(g)) => (
            root::cached_root(&cache_root, &lock_name, g.slot(), settings.slots),
            true,
            g.containment(),
            Some(g.slot()),
        ),
        Some(Acquired::FellBack { reason }) => {
            eprintln!(
                "cachelock: running on a fresh private data root instead of the cache of {lock_name}: {reason}"
            );
            (
                root::ephemeral_root(&cache_root, &short),
                false,
                Containment::Inherit(Vec::new()),
                None,
            )
        }
        None => (
            root::ephemeral_root(&cache_root, &short),
            false,
            Containment::Inherit(Vec::new()),
            None,
        ),
    };
    if !cached {
        // A fresh root is fresh even if a crashed run with the same id left one.
        let _ = root::wipe(&data_root);
    }
    root::create_dir(&data_root)?;
    let mut env = vec![];
    if let Some(id) = &args.cache_id {
        env.push(("CACHELOCK_CACHE_ID".to_string(), id.clone()));
    }
    if let Some(s) = slot {
        env.push(("CACHELOCK_DOCKERD_SLOT".to_string(), s.to_string()));
    }
    // Shared paths (a log, a default socket) only when configured and free.
    let host = claim::HostPaths::claim(
        resolved.log_file.as_deref(),
        resolved.default_socket.as_deref(),
    );
    let (mut inherit, lease) = match containment {
        Containment::Inherit(fds) => (fds, None),
        Containment::Lease(l) => (Vec::new(), Some(l)),
    };
    inherit.extend(host.fds());
    let mut spec = resolved.spec(
        data_root,
        &short,
        inherit,
        args.cache_id.clone(),
        host.log_path(),
        host.sockets(),
    );
    spec.lease = lease;
    let plan = session::Plan {
        spec,
        docker_cli: resolved.docker_cli.clone(),
        cached_prefix: cached.then(|| resolved.prefix.clone()),
        wipe_after: !cached,
        keep_inst_dir: false,
        loads: args.load.clone(),
        registry_loads: Vec::new(),
        compose: None,
        command: args.command.clone(),
        env,
        stop_grace_cap: resolved.stop_grace_cap,
    };
    let result = session::run(&plan, policy.as_mut(), &signals);
    if let (Some(cap), Some(Acquired::Held(_)), Some(id), Some(r)) =
        (resolved.cache_max_size, &acquired, &args.cache_id, &req)
    {
        // Still holding the cache id: its root is measured, never evicted.
        match &r.store {
            Store::Dir { path, .. } => {
                let layout = usage::Layout::Dockerd {
                    lock_dir: path.clone(),
                };
                usage::report(&cache_root, &layout, cap, id);
            }
            // Eviction takes each unheld root's lock without waiting, which it can only do on
            // the lock files of a lock directory.
            Store::Etcd(e) => eprintln!(
                "cachelock: dockerd.cache_max_size is not applied: eviction needs a lock directory (file://), not {}",
                e.describe()
            ),
        }
    }
    if let Some(Acquired::Held(g)) = acquired {
        g.release();
    }
    drop(host);
    result
}
