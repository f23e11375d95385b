//! `cachelock run`: take the lock, run the command with the lock descriptor inherited, release,
//! exit with the command's code.

use std::process::Command;

use crate::cli::RunArgs;
use crate::config::Loaded;
use crate::error::{Error, Kind, Result};
use crate::lock::{self, AcquireOptions, Acquired, LockDir};
use crate::process::{self, Signals};

/// Runs `cachelock run`; returns the exit code.
pub fn execute(args: RunArgs) -> Result<i32> {
    // Refuse a bad name before anything (configuration, directories) is touched.
    lock::name::validate(&args.name)?;
    let loaded = Loaded::load(args.lock.config.as_deref())?;
    let root = lock::resolve_root(args.lock.lock_dir.as_deref(), &loaded);
    let dir = LockDir::open(&root, loaded.config.file_mode, loaded.config.dir_mode)?;
    let settings = loaded.config.lock_settings(&args.name);
    let mut policy = crate::policy::for_lock(
        &loaded,
        &settings,
        args.lock.policy.as_deref(),
        &args.lock.policy_config,
    )?;
    let signals = Signals::install()
        .map_err(|e| Error::new(Kind::OsErr, format!("cannot install signal handlers: {e}")))?;
    let opts = AcquireOptions::from_args(&args.name, &args.lock, &settings, &loaded.config);
    let (program, rest) = args
        .command
        .split_first()
        .ok_or_else(|| Error::usage("no command given"))?;
    let mut cmd = Command::new(program);
    cmd.args(rest).env("CACHELOCK_LOCK", &args.name);
    let acquired = lock::acquire(&dir, &opts, policy.as_mut(), &signals)?;
    // The policy has decided; a loaded WASM instance would only make the fork and exec of the
    // command slower (its address-space reservations are copied and torn down).
    drop(policy);
    match acquired {
        Acquired::Held(guard) => {
            cmd.env("CACHELOCK_TICKET", guard.ticket())
                .env("CACHELOCK_GENERATION", guard.generation().to_string())
                .env("CACHELOCK_SLOT", guard.slot().to_string());
            // Spawned from the main thread, which lives as long as cachelock: the parent-death
            // signal follows the forking thread.
            let mut child = process::spawn(&mut cmd, &[guard.lock_fd()], libc::SIGTERM)
                .map_err(|e| process::spawn_error(program, e))?;
            let status = process::wait_forwarding(&mut child, &signals).map_err(|e| {
                Error::new(Kind::OsErr, format!("cannot wait for the command: {e}"))
            })?;
            guard.release()?;
            Ok(process::exit_code(status))
        }
        Acquired::FellBack { reason } => {
            eprintln!(
                "cachelock: running without lock {} (the policy fell back: {reason})",
                args.name
            );
            cmd.env("CACHELOCK_FALLBACK", &reason);
            let mut child = process::spawn(&mut cmd, &[], libc::SIGTERM)
                .map_err(|e| process::spawn_error(program, e))?;
            let status = process::wait_forwarding(&mut child, &signals).map_err(|e| {
                Error::new(Kind::OsErr, format!("cannot wait for the command: {e}"))
            })?;
            Ok(process::exit_code(status))
        }
    }
}
