//! A run once its data root is chosen and locked (see [`super::job`]): start dockerd, hygiene
//! and loads, compose up, the command, compose down, stop dockerd and remove its instance
//! directory.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use super::daemon::{Daemon, Spec};
use super::hygiene::{Docker, Summary};
use crate::error::{Error, Result};
use crate::policy::Policy;
use crate::process::{self, Signals};

pub use super::earthly::Compose;
use super::earthly::RegistryLoad;

/// One run, fully resolved.
#[derive(Debug, Clone)]
pub struct Plan {
    /// How to start dockerd.
    pub spec: Spec,
    /// The docker CLI binary.
    pub docker_cli: PathBuf,
    /// Hygiene prefix when the root is cached; `None` for a fresh root.
    pub cached_prefix: Option<String>,
    /// Image tarballs to load.
    pub loads: Vec<PathBuf>,
    /// Registry pulls (Earthly's embedded registry).
    pub registry_loads: Vec<RegistryLoad>,
    /// Compose, if requested.
    pub compose: Option<Compose>,
    /// The command.
    pub command: Vec<OsString>,
    /// Extra environment for the command.
    pub env: Vec<(String, String)>,
    /// Caller's cap on the policy's stop grace.
    pub stop_grace_cap: Option<Duration>,
}

/// Runs the plan and returns the command's exit code. dockerd is stopped on every path,
/// including errors and signals.
pub fn run(plan: &Plan, policy: &mut dyn Policy, signals: &Signals) -> Result<i32> {
    let daemon = Daemon::start(plan.spec.clone(), policy, signals)?;
    let docker = Docker {
        cli: plan.docker_cli.clone(),
        host: daemon.docker_host(),
    };
    let driver = docker.storage_driver().unwrap_or_else(|_| "?".into());
    tracing::info!(
        "dockerd {} ready after {} ms (attempt {}), storage driver {driver}, data root {}",
        daemon.pid(),
        daemon.ready_after.as_millis(),
        daemon.attempts,
        plan.spec.data_root.display()
    );
    if driver == "vfs" {
        tracing::warn!("dockerd chose the vfs storage driver (slow, no layer sharing): the cache root is probably on overlayfs; put it on a volume");
    }
    let result = run_ready(plan, &daemon, &docker, signals);
    let grace = policy
        .stop_timeout_ms(plan.spec.cache_id.as_deref())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(30));
    let grace = plan.stop_grace_cap.map_or(grace, |cap| grace.min(cap));
    let inst = daemon.inst_dir().to_path_buf();
    let killed = daemon.stop(grace);
    if killed {
        eprintln!(
            "cachelock: dockerd did not stop within {:.1}s of SIGTERM and was killed",
            grace.as_secs_f64()
        );
    }
    let _ = super::root::wipe(&inst);
    // A lost lease stopped dockerd and the command: that, not what failed after it, is the news.
    match &plan.spec.lease {
        Some(l) if l.is_lost() => Err(process::lock_lost(l)),
        _ => result,
    }
}

fn run_ready(plan: &Plan, daemon: &Daemon, docker: &Docker, signals: &Signals) -> Result<i32> {
    let mut summary = Summary::default();
    if let Some(prefix) = &plan.cached_prefix {
        docker.prepare_cached(prefix, &mut summary)?;
    }
    docker.load_files(&plan.loads)?;
    docker.load_registry(&plan.registry_loads)?;
    if let Some(prefix) = &plan.cached_prefix {
        docker.finish_cached(prefix, &mut summary)?;
        eprintln!(
            "cachelock: cached data root {}: {} leftover container(s) removed, {} image(s) re-tagged {prefix}*, {} kept by the loads, {} removed",
            plan.spec.data_root.display(),
            summary.containers_removed,
            summary.retagged,
            summary.kept,
            summary.removed
        );
    }
    if let Some(sig) = signals.take_terminating() {
        return Ok(128 + sig);
    }
    let compose = match &plan.compose {
        Some(c) => {
            let cli = docker.compose_cli()?;
            let mut args = vec!["up", "-d"];
            args.extend(c.services.iter().map(String::as_str));
            docker.compose(&cli, &c.files, &args)?;
            Some((cli, c))
        }
        None => None,
    };
    let code = run_command(plan, daemon, signals);
    if let Some((cli, c)) = compose {
        if let Err(e) = docker.compose(&cli, &c.files, &["down", "--remove-orphans"]) {
            eprintln!("cachelock: {e}");
        }
    }
    code
}

fn run_command(plan: &Plan, daemon: &Daemon, signals: &Signals) -> Result<i32> {
    let program = &plan.command[0];
    let containment = match &plan.spec.lease {
        Some(l) => crate::lock::Containment::Lease(l.clone()),
        None => crate::lock::Containment::Inherit(Vec::new()),
    };
    let mut contained = process::Contained::new(&containment, program)?;
    contained.job();
    let c = contained.command();
    c.args(&plan.command[1..])
        .env("DOCKER_HOST", daemon.docker_host())
        .env("CACHELOCK_DOCKERD_PID", daemon.pid().to_string())
        .env(
            "CACHELOCK_DOCKERD_READY_MS",
            daemon.ready_after.as_millis().to_string(),
        )
        .env("CACHELOCK_DOCKERD_DATA_ROOT", &plan.spec.data_root);
    for (k, v) in &plan.env {
        c.env(k, v);
    }
    let mut running = contained.spawn(libc::SIGTERM)?;
    let status = running
        .wait(signals)
        .map_err(|e| Error::io("waiting for the command", e))?;
    running.finish(status)
}

/// Builds a short, unique instance id (for `run_dir/<id>` and interface names).
pub fn short_id() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mix = (nanos as u64) ^ ((std::process::id() as u64) << 32) ^ (nanos >> 64) as u64;
    format!(
        "{:08x}",
        (mix ^ (mix >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32
    )
}
