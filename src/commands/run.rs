//! `cachelock run`: take the lock, run the command so that the lock covers it, release, exit
//! with the command's code.

use std::io::Write;
use std::process::Command;

use cachelock::error::{Error, Result};
use cachelock::lock::Acquired;
use cachelock::process::{self, Signals};

use crate::cli::RunArgs;
use crate::request::LockRequest;

/// Runs `cachelock run`; returns the exit code.
pub fn execute(args: RunArgs) -> Result<i32> {
    let req = LockRequest::from_flags(&args.name, &args.lock)?;
    let mut policy = req.policy()?;
    let signals = Signals::install()?;
    let (program, rest) = args
        .command
        .split_first()
        .ok_or_else(|| Error::usage("no command given"))?;
    let mut cmd = Command::new(program);
    cmd.args(rest).env("CACHELOCK_LOCK", &args.name);
    let acquired = req.acquire(policy.as_mut(), &signals)?;
    // The policy has decided; a loaded WASM instance would only make the fork and exec of the
    // command slower (its address-space reservations are copied and torn down).
    drop(policy);
    match acquired {
        Acquired::Held(guard) => {
            cmd.env("CACHELOCK_TICKET", guard.ticket())
                .env("CACHELOCK_GENERATION", guard.generation().to_string())
                .env("CACHELOCK_SLOT", guard.slot().to_string());
            let code = process::run_contained(&mut cmd, &guard.containment(), &signals)?;
            guard.release();
            Ok(code)
        }
        Acquired::FellBack { reason } => {
            let _ = writeln!(
                std::io::stderr(),
                "cachelock: running without lock {} (the policy fell back: {reason})",
                args.name
            );
            cmd.env("CACHELOCK_FALLBACK", &reason);
            process::run_contained(
                &mut cmd,
                &cachelock::lock::Containment::Inherit(Vec::new()),
                &signals,
            )
        }
    }
}
