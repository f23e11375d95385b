//! `cachelock earthly` (also argv[0] `dockerd-wrapper.sh`): Earthly's and EarthBuild's
//! `dockerd-wrapper.sh` contracts (parsed by `cachelock::dockerd::earthly`) run by
//! [`cachelock::dockerd::job`], as `cachelock dockerd` is.
//!
//! The cache root is the data root's parent. A cached root is locked in two steps by the job:
//! cachelock's fair queue in `<data-root>/.cachelock` (priorities, labels, bounds, slots,
//! fall-back, progress and `status` as `cachelock run`, options from `CACHELOCK_*` variables
//! since Earthly passes no flags), then a flock on `<data-root>/.earthly-docker-lock`, the file
//! Earthly's own wrapper locks, so both exclude each other on a shared directory. An uncached
//! run gets a private folder inside the data root, removed afterwards.

use std::path::{Path, PathBuf};

use cachelock::config::Loaded;
use cachelock::dockerd::earthly::{self, ComposeConfig, Execute, Invocation, Trace, Vars};
use cachelock::dockerd::hygiene::Docker;
use cachelock::dockerd::job::{self, CacheLock, Job, RootKind};
use cachelock::dockerd::{daemon_json, network, root, setup};
use cachelock::error::{Error, Kind, Result};
use cachelock::process::Signals;

use crate::cli::EarthlyArgs;
use crate::request::LockRequest;

/// What the drop-in uses where the configuration is silent: Earthly's own choices.
const DEFAULTS: setup::Defaults = setup::Defaults {
    network: network::Mode::Default,
    prefix: earthly::PREFIX,
    log_file: Some(earthly::DOCKER_LOG),
    default_socket: Some(earthly::DOCKER_SOCK),
};

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Runs `cachelock earthly`; returns the exit code.
pub fn execute(args: EarthlyArgs) -> Result<i32> {
    let vars = Vars::new(&env);
    let trace = Trace(vars.debug());
    if let Some(cmd) = vars.debug_cmd() {
        return run_debug_cmd(&cmd);
    }
    run_pre_script(&vars.pre_script(), trace)?;
    let loaded = Loaded::load(
        env("CACHELOCK_CONFIG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .as_deref(),
    )?;
    match earthly::parse(&args.args, &vars)? {
        Invocation::VersionMismatch(message) => {
            eprintln!("{message}");
            Ok(1)
        }
        Invocation::ComposeConfig(c) => compose_config(&loaded, &c),
        Invocation::Execute(e) => execute_cmd(&loaded, e, &vars, trace),
    }
}

/// `EARTH(LY)_DOCKER_WRAPPER_DEBUG_CMD`: runs it with `/bin/sh -c`, then exits 1 whatever it
/// returned (Earthly's hook to inspect a build container without saving the RUN's snapshot).
fn run_debug_cmd(cmd: &str) -> Result<i32> {
    println!("Running debug command: {cmd}");
    let status = std::process::Command::new("/bin/sh")
        .args(["-c", cmd])
        .status()
        .map_err(|e| cachelock::process::spawn_error("/bin/sh".as_ref(), e))?;
    println!(
        "debug command exited with {}; forcing exit 1 to prevent saving RUN snapshot",
        cachelock::process::exit_code(status)
    );
    Ok(1)
}

/// Runs the pre-script when it exists (before either sub-command, as Earthly does).
fn run_pre_script(path: &str, trace: Trace) -> Result<()> {
    if !Path::new(path).is_file() {
        return Ok(());
    }
    trace.step(format_args!("running pre-script {path}"));
    let status = std::process::Command::new(path)
        .status()
        .map_err(|e| cachelock::process::spawn_error(path.as_ref(), e))?;
    if !status.success() {
        return Err(Error::new(
            Kind::Software,
            format!("pre-script {path} failed ({status}); fix it or unset EARTHLY_DOCKER_WRAPPER_PRE_SCRIPT"),
        ));
    }
    Ok(())
}

fn compose_config(loaded: &Loaded, c: &ComposeConfig) -> Result<i32> {
    let docker = Docker {
        cli: loaded
            .config
            .dockerd
            .docker_cli
            .clone()
            .unwrap_or_else(|| PathBuf::from("docker")),
        host: env("DOCKER_HOST").unwrap_or_default(),
    };
    let cli = docker.compose_cli()?;
    let out = docker
        .compose_command(&cli, &c.files)
        .arg("config")
        .output()
        .map_err(|e| Error::new(Kind::Unavailable, format!("cannot run compose: {e}")))?;
    if !out.status.success() {
        return Err(Error::new(
            Kind::DataErr,
            format!(
                "compose config failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    // A fixed path under /tmp: written only into a directory of our own, never through a link.
    root::write_in_own_dir(Path::new(c.contract.compose_config_path()), &out.stdout)?;
    Ok(0)
}

fn execute_cmd(loaded: &Loaded, e: Execute, vars: &Vars, trace: Trace) -> Result<i32> {
    for w in &e.warnings {
        eprintln!("WARNING: {w}");
    }
    // Bad queue options fail before anything is created or started. A caller that already
    // holds Earthly's flock (EarthBuild's re-exec under flock(1)) is trusted: taking our queue
    // then waiting for its flock could deadlock with another drop-in.
    let take_lock = e.cached && !e.flock_acquired;
    let name = e
        .data_root
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .map(str::to_string)
        .ok_or_else(|| {
            Error::usage(format!(
                "the data root {} has no name of its own; give a directory such as /var/earthly/dind/cache_x",
                e.data_root.display()
            ))
        })?;
    let lock_name = Some(name.clone())
        .filter(|n| cachelock::lock::name::validate(n).is_ok())
        .unwrap_or_else(|| earthly::FALLBACK_LOCK_NAME.to_string());
    let request = take_lock
        .then(|| {
            LockRequest::from_env(
                &lock_name,
                loaded.clone(),
                e.data_root.join(earthly::QUEUE_DIR),
                |n| env(n).filter(|v| !v.is_empty()),
            )
        })
        .transpose()?;
    let mut resolved = setup::resolve(loaded, DEFAULTS)?;
    daemon_json::merge(
        &mut resolved.daemon_json,
        e.contract.daemon_json(&vars.registry()),
    );
    daemon_json::dedup_arrays(&mut resolved.daemon_json);
    trace.step(format_args!(
        "data root {} (cached: {}, contract: {:?})",
        e.data_root.display(),
        e.cached,
        e.contract
    ));
    if !e.flock_acquired {
        earthly::isolate_cgroup_v2(trace);
    }
    wsl_iptables(trace);
    let signals = Signals::install()?;
    let mut policy = match &request {
        Some(r) => r.policy()?,
        None => cachelock::policy::for_lock(
            loaded,
            &loaded.config.lock_settings(&lock_name),
            None,
            &[],
        )?,
    };
    let root = match request {
        Some(r) => RootKind::Locked {
            name: name.clone(),
            lock: Box::new(CacheLock {
                store: r.store,
                options: r.options,
                earthly_flock: true,
            }),
        },
        None if e.cached => RootKind::Unlocked { name: name.clone() },
        // Earthly's `mktemp -d` inside the root: two runs of one target share the root.
        None => RootKind::Fresh {
            dir: PathBuf::from(&name),
        },
    };
    let job = Job {
        resolved,
        cache_root: e.data_root.parent().unwrap_or(Path::new("/")).to_path_buf(),
        root,
        loads: e.load_files,
        registry_loads: e.registry,
        compose: e.compose.clone(),
        command: e.command,
        env: earthly::command_env(&e.data_root, e.compose.is_some()),
        trace,
    };
    job::run(job, policy.as_mut(), &signals)
}

/// Earthly's WSL switch to iptables-legacy (networking fails with iptables-nft there).
fn wsl_iptables(trace: Trace) {
    let kernel = earthly::uname();
    if !kernel.contains("microsoft-standard-WSL") {
        return;
    }
    let version = std::process::Command::new("iptables")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    match earthly::wsl_iptables_legacy(&kernel, &version, Path::new("/sbin")) {
        Ok(true) => eprintln!(
            "WARNING: WSL and iptables-nft may not work; switched /sbin/iptables to iptables-legacy"
        ),
        Ok(false) => trace.step(format_args!("WSL with {}", version.trim())),
        Err(e) => tracing::warn!("{e}"),
    }
}
