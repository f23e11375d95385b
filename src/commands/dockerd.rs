//! `cachelock dockerd`: lock the cache id (if any), pick the data root, run the command beside
//! its own dockerd, release.

use std::path::PathBuf;
use std::time::Duration;

use crate::cli::DockerdArgs;
use crate::config::{self, Loaded};
use crate::dockerd::{hygiene, network, root, session, setup};
use crate::error::{Error, Result};
use crate::process::Signals;

/// Runs `cachelock dockerd`; returns the exit code.
pub fn execute(args: DockerdArgs) -> Result<i32> {
    if let Some(id) = &args.cache_id {
        crate::lock::name::validate(id)?;
    }
    let loaded = Loaded::load(args.lock.config.as_deref())?;
    let resolved = setup::resolve(&loaded, network::Mode::Netns, setup::DEFAULT_PREFIX)?;
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
            vec![h.fd()],
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
    let plan = session::Plan {
        spec: resolved.spec(data_root, &short, inherit, args.cache_id.clone()),
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
    drop(taken);
    result
}

/// Taking the cache id's lock.
mod lock {
    use super::*;
    use crate::config::LockSettings;
    use crate::dockerd::flock;
    use crate::policy::Policy;

    /// The outcome of waiting for the cache id.
    pub enum Taken {
        /// One slot held.
        Held(Holder),
        /// The policy chose to run on a fresh private root.
        FellBack(String),
    }

    /// A held slot.
    pub struct Holder {
        held: flock::Held,
    }

    impl Holder {
        pub fn fd(&self) -> std::os::fd::RawFd {
            use std::os::fd::AsRawFd;
            self.held.file.as_raw_fd()
        }
        pub fn slot(&self) -> u32 {
            self.held.index as u32
        }
    }

    /// Kernel locks on the engine's slot files `<lock_dir>/<id>.lock/lock[.K]`, so that this
    /// excludes (and is excluded by) every other holder of the same lock.
    pub fn take(
        args: &DockerdArgs,
        loaded: &Loaded,
        id: &str,
        settings: &LockSettings,
        _policy: &mut dyn Policy,
        signals: &Signals,
    ) -> Result<Taken> {
        let lock_dir = args
            .lock
            .lock_dir
            .clone()
            .or_else(|| loaded.config.lock_dir.clone())
            .unwrap_or_else(config::default_lock_dir);
        let dir = lock_dir.join(format!("{id}.lock"));
        std::fs::create_dir_all(&dir).map_err(|e| {
            Error::cant_create(format!(
                "cannot create lock directory {}: {e}",
                dir.display()
            ))
        })?;
        let paths: Vec<PathBuf> = (0..settings.slots.max(1))
            .map(|k| {
                if k == 0 {
                    dir.join("lock")
                } else {
                    dir.join(format!("lock.{k}"))
                }
            })
            .collect();
        let progress = (!args.lock.quiet)
            .then(|| Duration::from_secs_f64(loaded.config.progress_interval().max(0.1)));
        let held = flock::acquire_any(
            &paths,
            args.lock.wait_limit_ms().map(Duration::from_millis),
            args.lock.conflict_exit_code,
            signals,
            progress,
            &format!("cache id {id}"),
        )?;
        Ok(Taken::Held(Holder { held }))
    }
}
