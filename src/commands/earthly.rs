//! `cachelock earthly` (also argv[0] `dockerd-wrapper.sh`): Earthly's and EarthBuild's
//! `dockerd-wrapper.sh` contracts (parsed by [`crate::dockerd::earthly`]) run on the same
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

use crate::cli::EarthlyArgs;
use crate::config::Loaded;
use crate::dockerd::earthly::{self, ComposeConfig, Execute, Invocation, Trace, Vars};
use crate::dockerd::hygiene::Docker;
use crate::dockerd::{
    claim, daemon_json, flock, hygiene, network, private, root, session, setup, usage,
};
use crate::error::{Error, Kind, Result};
use crate::process::Signals;

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
        .map_err(|e| crate::process::spawn_error("/bin/sh".as_ref(), e))?;
    println!(
        "debug command exited with {}; forcing exit 1 to prevent saving RUN snapshot",
        crate::process::exit_code(status)
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
        .map_err(|e| crate::process::spawn_error(path.as_ref(), e))?;
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
    let queue = take_lock.then(lock::Options::from_env).transpose()?;
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
    let signals = Signals::install().map_err(|e| Error::io("installing signal handlers", e))?;
    let short = session::short_id();

    let lock_name = data_root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| crate::lock::name::validate(n).is_ok())
        .unwrap_or_else(|| earthly::FALLBACK_LOCK_NAME.to_string());
    let settings = loaded.config.lock_settings(&lock_name);
    let mut policy = crate::policy::for_lock(loaded, &settings, None, &[])?;

    let run_root = take_root(
        &e,
        queue.as_ref(),
        &lock_name,
        loaded,
        &settings,
        policy.as_mut(),
        &signals,
        trace,
    )?;
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
#[allow(clippy::too_many_arguments)]
fn take_root(
    e: &Execute,
    queue: Option<&lock::Options>,
    lock_name: &str,
    loaded: &Loaded,
    settings: &crate::config::LockSettings,
    policy: &mut dyn crate::policy::Policy,
    signals: &Signals,
    trace: Trace,
) -> Result<RunRoot> {
    let data_root = &e.data_root;
    let parent = data_root.parent().unwrap_or(Path::new("/"));
    let short = session::short_id();
    Ok(match queue {
        Some(q) => {
            let slots = q.slots.unwrap_or(settings.slots).max(1);
            trace.step(format_args!(
                "locking {}: queue {lock_name} in {}, then {} ({slots} slot(s), priority {})",
                data_root.display(),
                earthly::QUEUE_DIR,
                earthly::LOCK_FILE,
                q.priority
            ));
            match lock::take(
                data_root, lock_name, slots, q, loaded, settings, policy, signals,
            )? {
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
/// function that takes them; everything it needs comes in as arguments.
mod lock {
    use super::*;
    use crate::config::LockSettings;
    use crate::lock::{AcquireOptions, Acquired, Guard, LockDir};
    use crate::policy::Policy;

    /// Queue options from the environment (Earthly passes no flags).
    #[derive(Debug, Clone, Default)]
    pub struct Options {
        /// `CACHELOCK_PRIORITY`.
        pub priority: i32,
        /// `CACHELOCK_WAIT`, in milliseconds.
        pub wait_limit_ms: Option<u64>,
        /// `CACHELOCK_LABELS` (`k=v,k=v`).
        pub labels: Vec<(String, String)>,
        /// `CACHELOCK_QUEUE_KEY`.
        pub queue_key: Option<String>,
        /// `CACHELOCK_SLOTS`: parallel runs on one cached root (else the lock rule's `slots`).
        pub slots: Option<u32>,
    }

    impl Options {
        /// Reads `CACHELOCK_PRIORITY`, `CACHELOCK_WAIT`, `CACHELOCK_LABELS`,
        /// `CACHELOCK_QUEUE_KEY` and `CACHELOCK_SLOTS`; an invalid value is a usage error (64).
        pub fn from_env() -> Result<Options> {
            Self::parse(|n| env(n).filter(|v| !v.is_empty()))
        }

        fn parse(get: impl Fn(&str) -> Option<String>) -> Result<Options> {
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
                    Ok(s) if s.is_finite() && s >= 0.0 => Some((s * 1000.0).round() as u64),
                    _ => {
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
                None => None,
                Some(v) => match v.trim().parse::<u32>() {
                    Ok(n) if (1..=64).contains(&n) => Some(n),
                    _ => {
                        return Err(Error::usage(format!(
                            "CACHELOCK_SLOTS={v:?} is not a number of parallel runs from 1 to 64: set e.g. 2, or unset it for one run at a time"
                        )))
                    }
                },
            };
            Ok(Options {
                priority,
                wait_limit_ms,
                labels,
                queue_key: get("CACHELOCK_QUEUE_KEY"),
                slots,
            })
        }
    }

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
            vec![self.guard.lock_fd(), self.earthly.file.as_raw_fd()]
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

    /// Takes cached root `data_root`: joins lock `name`'s queue in `<data_root>/.cachelock`
    /// with `slots` slots and waits (policy, bounds and progress as `cachelock run`), then
    /// takes `<data_root>/.earthly-docker-lock` within what is left of the bound: exclusively
    /// with one slot (as Earthly's wrapper), shared with several, so that every slot holder
    /// keeps Earthly's own wrapper (which takes it exclusively) off the root.
    #[allow(clippy::too_many_arguments)]
    pub fn take(
        data_root: &Path,
        name: &str,
        slots: u32,
        q: &Options,
        loaded: &Loaded,
        settings: &LockSettings,
        policy: &mut dyn Policy,
        signals: &Signals,
    ) -> Result<Taken> {
        let config = &loaded.config;
        let dir = LockDir::open(
            &data_root.join(earthly::QUEUE_DIR),
            config.file_mode,
            config.dir_mode,
        )?;
        let progress =
            Some(Duration::from_secs_f64(config.progress_interval())).filter(|d| !d.is_zero());
        let opts = AcquireOptions {
            priority: q.priority,
            labels: q.labels.clone(),
            queue_key: q.queue_key.clone(),
            wait_limit_ms: q.wait_limit_ms,
            wait_mode: settings.wait_mode,
            slots,
            fallback_allowed: settings.fallback,
            key_grace_ms: config.queue_key_grace_ms(),
            progress_interval: progress,
            ..AcquireOptions::new(name)
        };
        let guard = match crate::lock::acquire(&dir, &opts, policy, signals)? {
            Acquired::Held(g) => g,
            Acquired::FellBack { reason } => return Ok(Taken::FellBack(reason)),
        };
        let file = data_root.join(earthly::LOCK_FILE);
        let left = q
            .wait_limit_ms
            .map(|ms| Duration::from_millis(ms).saturating_sub(guard.waited()));
        let earthly = flock::acquire_any(
            std::slice::from_ref(&file),
            slots > 1,
            left,
            opts.conflict_exit_code,
            signals,
            progress,
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

    #[cfg(test)]
    mod tests {
        use super::*;

        fn parse(vars: &[(&str, &str)]) -> Result<Options> {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Options::parse(|n| {
                vars.iter()
                    .find(|(k, _)| k == n)
                    .map(|(_, v)| v.clone())
                    .filter(|v| !v.is_empty())
            })
        }

        #[test]
        fn reads_every_variable() {
            let o = parse(&[
                ("CACHELOCK_PRIORITY", "-5"),
                ("CACHELOCK_WAIT", "0.25"),
                ("CACHELOCK_LABELS", "job=12, ref=main,,"),
                ("CACHELOCK_QUEUE_KEY", "pipeline-7"),
                ("CACHELOCK_SLOTS", "3"),
            ])
            .unwrap();
            assert_eq!(o.slots, Some(3));
            assert_eq!(o.priority, -5);
            assert_eq!(o.wait_limit_ms, Some(250));
            assert_eq!(
                o.labels,
                vec![
                    ("job".to_string(), "12".to_string()),
                    ("ref".to_string(), "main".to_string())
                ]
            );
            assert_eq!(o.queue_key.as_deref(), Some("pipeline-7"));
            let d = parse(&[]).unwrap();
            assert_eq!((d.priority, d.wait_limit_ms, d.labels.len()), (0, None, 0));
        }

        #[test]
        fn invalid_values_are_usage_errors() {
            for (k, v) in [
                ("CACHELOCK_PRIORITY", "high"),
                ("CACHELOCK_WAIT", "-1"),
                ("CACHELOCK_WAIT", "soon"),
                ("CACHELOCK_WAIT", "inf"),
                ("CACHELOCK_LABELS", "job"),
                ("CACHELOCK_LABELS", "=x"),
                ("CACHELOCK_SLOTS", "0"),
                ("CACHELOCK_SLOTS", "two"),
            ] {
                let e = parse(&[(k, v)]).unwrap_err();
                assert_eq!(e.exit_code(), 64, "{k}={v}: {e}");
                assert!(e.to_string().contains(k), "{e}");
            }
        }
    }
}
