//! `cachelock earthly` (also argv[0] `dockerd-wrapper.sh`): Earthly's and EarthBuild's
//! `dockerd-wrapper.sh` contracts (parsed by `cachelock::dockerd::earthly`) run on the same
//! machinery as `cachelock dockerd`.
//!
//! A cached root is locked in two steps by [`lock::take`] (the one place that takes locks):
//! cachelock's fair queue in `<data-root>/.cachelock` (priorities, labels, bounds, slots,
//! fall-back, progress and `status` as `cachelock run`, options from `CACHELOCK_*` variables
//! since Earthly passes no flags), then a flock on `<data-root>/.earthly-docker-lock`, the file
//! Earthly's own wrapper locks, so both exclude each other on a shared directory. An uncached
//! run gets a private folder inside the data root, removed afterwards.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cachelock::config::Loaded;
use cachelock::dockerd::earthly::{self, ComposeConfig, Execute, Invocation, Trace, Vars};
use cachelock::dockerd::hygiene::Docker;
use cachelock::dockerd::{
    claim, daemon_json, flock, hygiene, network, private, root, session, setup, usage,
};
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
    let out_path = Path::new(c.contract.compose_config_path());
    let dir = out_path.parent().unwrap_or(Path::new("/tmp"));
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::cant_create(format!("cannot create {}: {e}", dir.display())))?;
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
    std::fs::write(out_path, &out.stdout)
        .map_err(|e| Error::io(format!("writing {}", out_path.display()), e))?;
    Ok(0)
}

/// Where a run's dockerd puts its data, and what keeps it.
enum RunRoot {
    /// The cached root (slot 0) or one of its slot roots, locked.
    Cached(PathBuf, Option<lock::Held>),
    /// A private root (uncached run, or a fall-back), removed afterwards.
    Private(private::PrivateRoot),
}

fn execute_cmd(loaded: &Loaded, e: Execute, vars: &Vars, trace: Trace) -> Result<i32> {
    for w in &e.warnings {
        eprintln!("WARNING: {w}");
    }
    // Bad queue options fail before anything is created or started. A caller that already
    // holds Earthly's flock (EarthBuild's re-exec under flock(1)) is trusted: taking our queue
    // then waiting for its flock could deadlock with another drop-in.
    let take_lock = e.cached && !e.flock_acquired;
    let lock_name = e
        .data_root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
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
    hygiene::check_loadable(&e.load_files)?;
    if e.compose.is_some() {
        // Fail before anything is locked or started.
        Docker {
            cli: resolved.docker_cli.clone(),
            host: String::new(),
        }
        .compose_cli()?;
    }
    resolved.check_run_dir()?;
    let data_root = e.data_root.clone();
    let parent = data_root.parent().unwrap_or(Path::new("/")).to_path_buf();
    if std::fs::symlink_metadata(&data_root).is_err() {
        root::check_cache_root(&parent)?;
    }
    root::create_dir(&data_root)?;
    trace.step(format_args!(
        "data root {} (cached: {}, contract: {:?})",
        data_root.display(),
        e.cached,
        e.contract
    ));
    if !e.flock_acquired {
        earthly::isolate_cgroup_v2(trace);
    }
    wsl_iptables(trace);
    let signals = Signals::install()?;
    let short = session::short_id();

    let settings = loaded.config.lock_settings(&lock_name);
    let mut policy = match &request {
        Some(r) => r.policy()?,
        None => cachelock::policy::for_lock(loaded, &settings, None, &[])?,
    };

    let run_root = take_root(&e, request.as_ref(), policy.as_mut(), &signals, trace)?;
    let (dockerd_root, cached, mut inherit, slot) = match &run_root {
        RunRoot::Cached(r, h) => (
            r.clone(),
            true,
            h.as_ref().map(lock::Held::fds).unwrap_or_default(),
            h.as_ref().map(|h| h.slot),
        ),
        RunRoot::Private(p) => (p.path.clone(), false, vec![p.fd()], None),
    };
    root::create_dir(&dockerd_root)?;

    // Earthly's log and socket paths, when no other daemon on this host has them.
    let host = claim::HostPaths::claim(
        resolved.log_file.as_deref(),
        resolved.default_socket.as_deref(),
    );
    inherit.extend(host.fds());
    for (want, got) in [
        (&resolved.log_file, host.log_path()),
        (&resolved.default_socket, host.sockets().pop()),
    ] {
        match (want, got) {
            (Some(w), None) => trace.step(format_args!(
                "{} is in use by another daemon; this dockerd keeps its own",
                w.display()
            )),
            (_, Some(g)) => trace.step(format_args!("dockerd uses {}", g.display())),
            _ => {}
        }
    }
    let spec = resolved.spec(
        dockerd_root.clone(),
        &short,
        inherit,
        cached.then(|| lock_name.clone()),
        host.log_path(),
        host.sockets(),
    );
    let mut env = earthly::command_env(&data_root, e.compose.is_some());
    if let Some(s) = slot {
        env.push(("CACHELOCK_DOCKERD_SLOT".to_string(), s.to_string()));
    }
    let plan = session::Plan {
        spec,
        docker_cli: resolved.docker_cli.clone(),
        cached_prefix: cached.then(|| resolved.prefix.clone()),
        wipe_after: false,
        keep_inst_dir: false,
        loads: e.load_files,
        registry_loads: e.registry,
        compose: e.compose,
        command: e.command,
        env,
        stop_grace_cap: resolved.stop_grace_cap,
    };
    trace.step(format_args!(
        "starting dockerd on {}",
        dockerd_root.display()
    ));
    let result = session::run(&plan, policy.as_mut(), &signals);
    match run_root {
        RunRoot::Private(p) => {
            let path = p.path.clone();
            if let Err(err) = p.remove() {
                eprintln!("cachelock: could not remove {}: {err}", path.display());
            }
        }
        RunRoot::Cached(_, held) => {
            if let Some(cap) = resolved.cache_max_size {
                // Still holding the root: it is measured, never evicted.
                usage::report(
                    &parent,
                    &usage::Layout::Earthly,
                    cap,
                    data_root
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                        .as_str(),
                );
            }
            drop(held);
        }
    }
    drop(host);
    result
}

/// Chooses and takes the run's data root: a slot of the cached root through [`lock::take`], a
/// private root beside the cached roots on fall-back, the cached root as is when the caller
/// holds Earthly's lock, or a private folder inside an uncached root.
fn take_root(
    e: &Execute,
    request: Option<&LockRequest>,
    policy: &mut dyn cachelock::policy::Policy,
    signals: &Signals,
    trace: Trace,
) -> Result<RunRoot> {
    let data_root = &e.data_root;
    let parent = data_root.parent().unwrap_or(Path::new("/"));
    let short = session::short_id();
    Ok(match request {
        Some(r) => {
            let slots = r.options.slots;
            trace.step(format_args!(
                "locking {}: queue {} in {}, then {} ({slots} slot(s), priority {})",
                data_root.display(),
                r.options.name,
                earthly::QUEUE_DIR,
                earthly::LOCK_FILE,
                r.options.priority
            ));
            match lock::take(data_root, r, policy, signals)? {
                lock::Taken::Held(h) => {
                    let root = usage::earthly_slot_root(data_root, h.slot);
                    trace.step(format_args!(
                        "slot {} of {slots}: {}",
                        h.slot,
                        root.display()
                    ));
                    RunRoot::Cached(root, Some(h))
                }
                lock::Taken::FellBack(reason) => {
                    eprintln!(
                        "cachelock: running on a fresh private data root instead of the cache {}: {reason}",
                        data_root.display()
                    );
                    RunRoot::Private(private::create(&parent.join(earthly::PRIVATE_DIR), &short)?)
                }
            }
        }
        None if e.cached => RunRoot::Cached(data_root.clone(), None),
        // Earthly's `mktemp -d` inside the root: two runs of one target share the root.
        None => RunRoot::Private(private::create(data_root, &short)?),
    })
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

/// The cached root's two locks: cachelock's queue, then Earthly's flock. [`take`] is the one
/// function that takes them.
mod lock {
    use super::*;
    use cachelock::lock::{Acquired, Containment, Guard};
    use cachelock::policy::Policy;

    /// Both locks of a cached root; released when dropped (the flock first, then the queue).
    #[derive(Debug)]
    pub struct Held {
        /// The slot held (0: the cached root itself).
        pub slot: u32,
        earthly: flock::Held,
        guard: Guard,
    }

    impl Held {
        /// The kernel-locked descriptors dockerd inherits, so that both locks stay held as long
        /// as any dockerd on the root lives.
        pub fn fds(&self) -> Vec<std::os::fd::RawFd> {
            use std::os::fd::AsRawFd;
            let Containment::Inherit(mut fds) = self.guard.containment();
            fds.push(self.earthly.file.as_raw_fd());
            fds
        }
    }

    /// The outcome of waiting for a cached root.
    #[derive(Debug)]
    pub enum Taken {
        /// A slot of the root, locked.
        Held(Held),
        /// The lock rule allows fall-back and the policy chose it: run on a private root.
        FellBack(String),
    }

    /// Takes cached root `data_root` for `request` (its queue lives in
    /// `<data_root>/.cachelock`): waits in the queue (policy, bounds, slots and progress as
    /// `cachelock run`), then takes `<data_root>/.earthly-docker-lock` within what is left of
    /// the bound: exclusively with one slot (as Earthly's wrapper), shared with several, so
    /// that every slot holder keeps Earthly's own wrapper (which takes it exclusively) off the
    /// root.
    pub fn take(
        data_root: &Path,
        request: &LockRequest,
        policy: &mut dyn Policy,
        signals: &Signals,
    ) -> Result<Taken> {
        let guard = match request.acquire(policy, signals)? {
            Acquired::Held(g) => g,
            Acquired::FellBack { reason } => return Ok(Taken::FellBack(reason)),
        };
        let opts = &request.options;
        let file = data_root.join(earthly::LOCK_FILE);
        let left = opts
            .wait_limit_ms
            .map(|ms| Duration::from_millis(ms).saturating_sub(guard.waited()));
        let earthly = flock::acquire_any(
            std::slice::from_ref(&file),
            opts.slots > 1,
            left,
            opts.conflict_exit_code,
            signals,
            opts.progress_interval,
            &format!(
                "{} (held outside cachelock, e.g. by Earthly's own wrapper)",
                file.display()
            ),
        )?;
        Ok(Taken::Held(Held {
            slot: guard.slot(),
            earthly,
            guard,
        }))
    }
}
