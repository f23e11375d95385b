//! `cachelock dockerd`: lock the cache id (if any), pick the data root, run the command beside
//! its own dockerd, release.

use std::path::PathBuf;

use crate::cli::DockerdArgs;
use crate::config::{self, Loaded};
use crate::dockerd::{claim, hygiene, root, session, setup, usage};
use crate::error::{Error, Result};
use crate::process::Signals;

/// Runs `cachelock dockerd`; returns the exit code.
pub fn execute(args: DockerdArgs) -> Result<i32> {
    if let Some(id) = &args.cache_id {
        crate::lock::name::validate(id)?;
    }
    if args.lock.shared {
        return Err(Error::usage(
            "--shared makes no sense for `cachelock dockerd`: one dockerd owns a data root; use slots (`locks: [{match: ID, slots: N}]`) for parallel builds",
        ));
    }
    let loaded = Loaded::load(args.lock.config.as_deref())?;
    let resolved = setup::resolve(&loaded, setup::Defaults::DOCKERD)?;
    hygiene::check_loadable(&args.load)?;
    let cache_root = args
        .cache_root
        .clone()
        .or_else(|| loaded.config.cache_root.clone())
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_CACHE_ROOT));
    root::check_cache_root(&cache_root)?;
    resolved.check_run_dir()?;
    let signals = Signals::install().map_err(|e| Error::io("installing signal handlers", e))?;
    let short = session::short_id();
    let lock_name = args.cache_id.clone().unwrap_or_default();
    let settings = loaded.config.lock_settings(&lock_name);
    let mut policy = crate::policy::for_lock(
        &loaded,
        &settings,
        args.lock.policy.as_deref(),
        &args.lock.policy_config,
    )?;

    let taken = match &args.cache_id {
        Some(id) => Some(lock::take(
            &args,
            &loaded,
            id,
            &settings,
            policy.as_mut(),
            &signals,
        )?),
        None => None,
    };
    let (data_root, cached, inherit, slot) = match &taken {
        Some(lock::Taken::Held(h)) => (
            root::cached_root(&cache_root, &lock_name, h.slot(), settings.slots),
            true,
            vec![h.lock_fd()],
            Some(h.slot()),
        ),
        Some(lock::Taken::FellBack(reason)) => {
            eprintln!(
                "cachelock: running on a fresh private data root instead of the cache of {lock_name}: {reason}"
            );
            (
                root::ephemeral_root(&cache_root, &short),
                false,
                Vec::new(),
                None,
            )
        }
        None => (
            root::ephemeral_root(&cache_root, &short),
            false,
            Vec::new(),
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
    let mut inherit = inherit;
    inherit.extend(host.fds());
    let plan = session::Plan {
        spec: resolved.spec(
            data_root,
            &short,
            inherit,
            args.cache_id.clone(),
            host.log_path(),
            host.sockets(),
        ),
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
    if let (Some(cap), Some(lock::Taken::Held(_)), Some(id)) =
        (resolved.cache_max_size, &taken, &args.cache_id)
    {
        // Still holding the cache id: its root is measured, never evicted.
        let lock_root = crate::lock::resolve_root(args.lock.lock_dir.as_deref(), &loaded);
        let layout = usage::Layout::Dockerd {
            lock_dir: crate::lock::LockDir::open_existing(&lock_root),
        };
        usage::report(&cache_root, &layout, cap, id);
    }
    drop(taken);
    drop(host);
    result
}

/// Taking the cache id's lock through the engine.
mod lock {
    use super::*;
    use crate::config::LockSettings;
    use crate::lock::{AcquireOptions, Acquired, Guard, LockDir};
    use crate::policy::Policy;

    /// The outcome of waiting for the cache id.
    pub enum Taken {
        /// One slot held.
        Held(Box<Guard>),
        /// The policy chose to run on a fresh private root.
        FellBack(String),
    }

    /// Joins the cache id's queue (same queue, priorities, labels, bounds and progress as
    /// `cachelock run`) and waits for a slot.
    pub fn take(
        args: &DockerdArgs,
        loaded: &Loaded,
        id: &str,
        settings: &LockSettings,
        policy: &mut dyn Policy,
        signals: &Signals,
    ) -> Result<Taken> {
        let root = crate::lock::resolve_root(args.lock.lock_dir.as_deref(), loaded);
        let dir = LockDir::open(&root, loaded.config.file_mode, loaded.config.dir_mode)?;
        let opts = AcquireOptions::from_args(id, &args.lock, settings, &loaded.config);
        Ok(match crate::lock::acquire(&dir, &opts, policy, signals)? {
            Acquired::Held(g) => Taken::Held(Box::new(g)),
            Acquired::FellBack { reason } => Taken::FellBack(reason),
        })
    }
}
