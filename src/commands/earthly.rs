//! `cachelock earthly` (also argv[0] `dockerd-wrapper.sh`): Earthly's dockerd-wrapper.sh
//! contract mapped onto the same machinery as `cachelock dockerd`.
//!
//! Earthly runs `WITH DOCKER` as `dockerd-wrapper.sh execute CMD...` inside the build container
//! with `EARTHLY_*` variables describing the data root, the images to load and compose. A
//! cached root is locked in two steps: first cachelock's fair queue in `<data-root>/.cachelock`
//! (priorities, labels, bounds, progress and `status` as `cachelock run`, options from
//! `CACHELOCK_*` variables since Earthly passes no flags), then a flock on
//! `<data-root>/.earthly-docker-lock`, the file Earthly's own wrapper locks, so both exclude
//! each other on a shared directory.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cachelock::config::Loaded;
use cachelock::dockerd::hygiene::Docker;
use cachelock::dockerd::{flock, hygiene, network, root, session, setup};
use cachelock::error::{Error, Kind, Result};
use cachelock::process::Signals;

use crate::cli::EarthlyArgs;
use crate::request::LockRequest;

/// Earthly's lock file inside the data root.
pub const LOCK_FILE: &str = ".earthly-docker-lock";
/// cachelock's lock directory inside a cached data root (shared by every host using the root).
pub const LOCK_DIR: &str = ".cachelock";
/// Lock name when the data root's base name is not a valid lock name.
pub const FALLBACK_LOCK_NAME: &str = "dind";
/// Earthly's hygiene prefix.
pub const PREFIX: &str = "earthly_cached_";
/// Where `get-compose-config` writes.
pub const COMPOSE_CONFIG: &str = "/tmp/earthly/compose-config.yml";
/// Earthly's default pre-script.
pub const PRE_SCRIPT: &str = "/usr/share/earthly/dockerd-wrapper-pre-script";

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn words(name: &str) -> Vec<String> {
    env(name)
        .map(|v| v.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

fn debug_on() -> bool {
    matches!(env("EARTHLY_DOCKER_WRAPPER_DEBUG").as_deref(), Some(v) if v != "0" && v != "false")
}

macro_rules! step {
    ($($t:tt)*) => {
        if debug_on() {
            eprintln!("+ cachelock: {}", format!($($t)*));
        }
    };
}

/// Runs `cachelock earthly`; returns the exit code.
pub fn execute(args: EarthlyArgs) -> Result<i32> {
    let sub = args.args[0].to_string_lossy().into_owned();
    let rest: Vec<OsString> = args.args[1..].to_vec();
    let loaded = Loaded::load(
        std::env::var_os("CACHELOCK_CONFIG")
            .map(PathBuf::from)
            .as_deref(),
    )?;
    match sub.as_str() {
        "execute" => execute_cmd(&loaded, rest),
        "get-compose-config" => compose_config(&loaded),
        other => Err(Error::usage(format!(
            "unknown sub-command {other:?}; use `execute CMD...` or `get-compose-config`"
        ))),
    }
}

fn compose_files() -> Vec<String> {
    words("EARTHLY_COMPOSE_FILES")
}

fn compose_config(loaded: &Loaded) -> Result<i32> {
    let cli = loaded
        .config
        .dockerd
        .docker_cli
        .clone()
        .unwrap_or_else(|| PathBuf::from("docker"));
    let docker = Docker {
        cli,
        host: std::env::var("DOCKER_HOST").unwrap_or_default(),
    };
    let compose = docker.compose_cli()?;
    let files = compose_files();
    if files.is_empty() {
        return Err(Error::usage(
            "EARTHLY_COMPOSE_FILES is empty: nothing to merge",
        ));
    }
    let out_path = Path::new(COMPOSE_CONFIG);
    std::fs::create_dir_all(out_path.parent().unwrap_or(Path::new("/tmp")))
        .map_err(|e| Error::cant_create(format!("cannot create /tmp/earthly: {e}")))?;
    let mut cmd = match &compose {
        hygiene::ComposeCli::Plugin => {
            let mut c = docker.command();
            c.arg("compose");
            c
        }
        hygiene::ComposeCli::Standalone(p) => std::process::Command::new(p),
    };
    for f in &files {
        cmd.arg("-f").arg(f);
    }
    let out = cmd
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
        .map_err(|e| Error::io(format!("writing {COMPOSE_CONFIG}"), e))?;
    Ok(0)
}

fn execute_cmd(loaded: &Loaded, command: Vec<OsString>) -> Result<i32> {
    if command.is_empty() {
        return Err(Error::usage("`execute` needs a command to run"));
    }
    let data_root = PathBuf::from(env("EARTHLY_DOCKERD_DATA_ROOT").ok_or_else(|| {
        Error::usage(
            "EARTHLY_DOCKERD_DATA_ROOT is not set: Earthly sets it to /var/earthly/dind/<id>; set it when running the wrapper by hand",
        )
    })?);
    let cached = env("EARTHLY_DOCKERD_CACHE_DATA").as_deref() == Some("true");
    let lock_name = data_root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| cachelock::lock::name::validate(n).is_ok())
        .unwrap_or_else(|| FALLBACK_LOCK_NAME.to_string());
    // Bad queue options fail before anything is created or started.
    let request = cached
        .then(|| LockRequest::from_env(&lock_name, loaded.clone(), data_root.join(LOCK_DIR), env))
        .transpose()?;
    let loads: Vec<PathBuf> = words("EARTHLY_DOCKER_LOAD_FILES")
        .into_iter()
        .map(PathBuf::from)
        .collect();
    let registry_loads = words("EARTHLY_DOCKER_LOAD_REGISTRY")
        .into_iter()
        .map(|pair| match pair.split_once('|') {
            Some((r, t)) if !r.is_empty() && !t.is_empty() => Ok((r.to_string(), t.to_string())),
            _ => Err(Error::usage(format!(
                "EARTHLY_DOCKER_LOAD_REGISTRY entry {pair:?} is not REFERENCE|TAG"
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    let compose =
        (env("EARTHLY_START_COMPOSE").as_deref() == Some("true")).then(|| session::Compose {
            files: compose_files(),
            services: words("EARTHLY_COMPOSE_SERVICES"),
        });
    let resolved = setup::resolve(loaded, network::Mode::Default, PREFIX)?;
    hygiene::check_loadable(&loads)?;
    if compose.is_some() {
        // Fail before anything is locked or started.
        Docker {
            cli: resolved.docker_cli.clone(),
            host: String::new(),
        }
        .compose_cli()?;
    }
    resolved.check_run_dir()?;
    if let Some(parent) = data_root.parent() {
        if std::fs::symlink_metadata(&data_root).is_err() {
            root::check_cache_root(parent)?;
        }
    }
    root::create_dir(&data_root)?;
    step!("data root {} (cached: {cached})", data_root.display());
    run_pre_script()?;
    isolate_cgroup_v2();
    let signals = Signals::install()?;

    let settings = loaded.config.lock_settings(&lock_name);
    let mut policy = cachelock::policy::for_lock(loaded, &settings, None, &[])?;

    let held = match &request {
        Some(r) => Some(queue::take(r, &data_root, policy.as_mut(), &signals)?),
        None => {
            // Earthly wipes an uncached root before use.
            root::wipe_contents(&data_root, &[])
                .map_err(|e| Error::io(format!("wiping {}", data_root.display()), e))?;
            None
        }
    };
    let short = session::short_id();
    let inherit = held.as_ref().map(queue::Held::fds).unwrap_or_default();
    let spec = resolved.spec(
        data_root.clone(),
        &short,
        inherit,
        cached.then(|| lock_name.clone()),
    );
    let plan = session::Plan {
        spec,
        docker_cli: resolved.docker_cli.clone(),
        cached_prefix: cached.then(|| resolved.prefix.clone()),
        wipe_after: false,
        keep_inst_dir: false,
        loads,
        registry_loads,
        compose,
        command,
        env: vec![("EARTHLY_WITH_DOCKER".to_string(), "1".to_string())],
        stop_grace_cap: resolved.stop_grace_cap,
    };
    let result = session::run(&plan, policy.as_mut(), &signals);
    if !cached {
        if let Err(e) = root::wipe_contents(&data_root, &[]) {
            eprintln!("cachelock: could not wipe {}: {e}", data_root.display());
        }
    }
    drop(held);
    result
}

/// Runs `EARTHLY_DOCKER_WRAPPER_PRE_SCRIPT` (default [`PRE_SCRIPT`]) when it exists.
fn run_pre_script() -> Result<()> {
    let path = env("EARTHLY_DOCKER_WRAPPER_PRE_SCRIPT").unwrap_or_else(|| PRE_SCRIPT.to_string());
    if !Path::new(&path).exists() {
        return Ok(());
    }
    step!("running pre-script {path}");
    let status = std::process::Command::new(&path)
        .status()
        .map_err(|e| cachelock::process::spawn_error(path.as_ref(), e))?;
    if !status.success() {
        return Err(Error::new(
            Kind::Software,
            format!("pre-script {path} failed ({status})"),
        ));
    }
    Ok(())
}

/// On cgroup v2 at the root of a container's cgroup namespace, move every process into a
/// child cgroup so that the root stays a "domain" and nested dockerd/systemd can delegate (as
/// Earthly's wrapper does). Best effort: failures are only logged.
fn isolate_cgroup_v2() {
    let root = Path::new("/sys/fs/cgroup");
    if !root.join("cgroup.controllers").exists() {
        return;
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    if own.trim() != "0::/" {
        return;
    }
    let child = root.join("dockerd-wrapper");
    let _ = std::fs::create_dir_all(&child);
    let procs = std::fs::read_to_string(root.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines() {
        let _ = std::fs::write(child.join("cgroup.procs"), pid);
    }
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let enable: String = controllers
        .split_whitespace()
        .map(|c| format!("+{c} "))
        .collect();
    if let Err(e) = std::fs::write(root.join("cgroup.subtree_control"), enable.trim()) {
        tracing::debug!("cgroup v2 delegation not enabled: {e}");
    }
    step!("moved processes into {}", child.display());
}

/// The cached root's two locks: cachelock's queue, then Earthly's flock.
mod queue {
    use super::*;
    use cachelock::lock::{Acquired, Containment, Guard};
    use cachelock::policy::Policy;

    /// Both locks of a cached root; released when dropped (the flock first, then the queue).
    #[derive(Debug)]
    pub struct Held {
        earthly: flock::Held,
        guard: Guard,
    }

    impl Held {
        /// The kernel-locked descriptors dockerd inherits, so that both locks stay held as long
        /// as any dockerd on the root lives.
        pub fn fds(&self) -> Vec<std::os::fd::RawFd> {
            use std::os::fd::AsRawFd;
            // The drop-in's lock store is always a lock directory (flock).
            let mut fds = match self.guard.containment() {
                Containment::Inherit(fds) => fds,
                Containment::Lease(_) => Vec::new(),
            };
            fds.push(self.earthly.file.as_raw_fd());
            fds
        }
    }

    /// Joins the request's queue in `<data_root>/.cachelock` and waits (policy, bounds and
    /// progress as `cachelock run`), then takes Earthly's flock within what is left of the
    /// bound.
    pub fn take(
        request: &LockRequest,
        data_root: &Path,
        policy: &mut dyn Policy,
        signals: &Signals,
    ) -> Result<Held> {
        let name = &request.options.name;
        step!(
            "queueing for lock {name} in {} (priority {})",
            data_root.join(LOCK_DIR).display(),
            request.options.priority
        );
        let guard = match request.acquire(policy, signals)? {
            Acquired::Held(g) => g,
            Acquired::FellBack { reason } => {
                return Err(Error::new(
                    Kind::Software,
                    format!("unexpected fall-back for lock {name}: {reason}"),
                ))
            }
        };
        step!("locking {}", data_root.join(LOCK_FILE).display());
        let left = request
            .options
            .wait_limit_ms
            .map(|ms| Duration::from_millis(ms).saturating_sub(guard.waited()));
        let earthly = flock::acquire_any(
            &[data_root.join(LOCK_FILE)],
            left,
            request.options.conflict_exit_code,
            signals,
            request.options.progress_interval,
            &format!(
                "{} (held outside cachelock, e.g. by Earthly's own wrapper)",
                data_root.join(LOCK_FILE).display()
            ),
        )?;
        step!(
            "locked after {:.1}s",
            (guard.waited() + earthly.waited).as_secs_f64()
        );
        Ok(Held { earthly, guard })
    }
}
