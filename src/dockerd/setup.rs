//! Resolving the `dockerd:` configuration into what a run needs, with the checks that must
//! fail before anything is locked or started (exit codes per docs/architecture.md).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::{daemon, daemon_json, network};
use crate::config::Loaded;
use crate::error::{Error, Kind, Result};

/// Default base of instance directories.
pub const DEFAULT_RUN_DIR: &str = "/run/cachelock";
/// Default hygiene prefix of `cachelock dockerd`.
pub const DEFAULT_PREFIX: &str = "cachelock_cached_";

/// What a front end (`cachelock dockerd`, the Earthly drop-in) uses where the configuration
/// says nothing.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    /// `dockerd.network`.
    pub network: network::Mode,
    /// `dockerd.image_prefix`.
    pub prefix: &'static str,
    /// `dockerd.log_file` (`None`: the per-instance log).
    pub log_file: Option<&'static str>,
    /// `dockerd.default_socket` (`None`: only the per-instance socket).
    pub default_socket: Option<&'static str>,
}

impl Defaults {
    /// `cachelock dockerd`: isolated network, nothing host-wide.
    pub const DOCKERD: Defaults = Defaults {
        network: network::Mode::Netns,
        prefix: DEFAULT_PREFIX,
        log_file: None,
        default_socket: None,
    };
}

/// The `dockerd:` section, resolved and checked.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// dockerd binary, found on PATH.
    pub binary: PathBuf,
    /// Extra dockerd arguments.
    pub extra_args: Vec<String>,
    /// The docker CLI.
    pub docker_cli: PathBuf,
    /// daemon.json before the per-run settings: defaults ← user file ← configured.
    pub daemon_json: Value,
    /// Network mode.
    pub network: network::Mode,
    /// Uplink pool.
    pub uplink_pool: (Ipv4Addr, u8),
    /// Base of instance directories.
    pub run_dir: PathBuf,
    /// Hygiene prefix.
    pub prefix: String,
    /// Log lines for failures.
    pub log_tail_lines: usize,
    /// Cap on the stop grace.
    pub stop_grace_cap: Option<Duration>,
    /// A shared log path to claim (`/var/log/docker.log`), if any.
    pub log_file: Option<PathBuf>,
    /// A shared socket path to claim (`/var/run/docker.sock`), if any.
    pub default_socket: Option<PathBuf>,
    /// Cap on the total size of cached data roots.
    pub cache_max_size: Option<u64>,
}

/// `off` (or empty) disables a path setting; anything else is the path.
fn path_setting(v: Option<&str>, default: Option<&str>) -> Option<PathBuf> {
    match v.or(default) {
        None | Some("" | "off") => None,
        Some(p) => Some(PathBuf::from(p)),
    }
}

/// Resolves the configuration; `defaults` apply where it is silent.
pub fn resolve(loaded: &Loaded, defaults: Defaults) -> Result<Resolved> {
    let c = &loaded.config.dockerd;
    let network = match &c.network {
        Some(n) => network::Mode::parse(n)?,
        None => defaults.network,
    };
    let uplink_pool = network::parse_cidr(
        c.uplink_pool
            .as_deref()
            .unwrap_or(network::DEFAULT_UPLINK_POOL),
    )?;
    let user_file = match &c.daemon_json_file {
        Some(p) => Some(daemon_json::read_user_file(&loaded.resolve_path(p))?),
        None if Path::new("/etc/docker/daemon.json").exists() => Some(daemon_json::read_user_file(
            Path::new("/etc/docker/daemon.json"),
        )?),
        None => None,
    };
    if let Some(v) = &c.daemon_json {
        if !v.is_object() {
            return Err(Error::config(
                "`dockerd.daemon_json` must be a mapping of daemon.json settings",
            ));
        }
    }
    // In netns mode the namespace has no host networks to avoid but the uplink's; elsewhere
    // the host's routes (its own docker0 among them) are what must not be shadowed.
    let base = daemon_json::defaults(&daemon_json::host_routes());
    let (mut doc, dropped) = daemon_json::build(base, user_file, c.daemon_json.clone(), json!({}));
    if network == network::Mode::None {
        // dockerd refuses `--bridge=none` together with `bip`.
        if let Value::Object(m) = &mut doc {
            m.remove("bip");
        }
    }
    if !dropped.is_empty() {
        tracing::warn!(
            "daemon.json keys {dropped:?} are ignored: cachelock sets them per instance"
        );
    }
    let binary_name = c.binary.clone().unwrap_or_else(|| PathBuf::from("dockerd"));
    let binary_name = if binary_name.components().count() > 1 {
        loaded.resolve_path(&binary_name)
    } else {
        binary_name
    };
    let binary = daemon::find_binary(&binary_name).ok_or_else(|| {
        Error::new(
            Kind::Unavailable,
            format!(
                "dockerd binary {} not found or not executable; install Docker (Debian: apt-get install docker.io) or set `dockerd.binary` in the configuration",
                binary_name.display()
            ),
        )
    })?;
    let stop_grace_cap = match c.stop_grace_max {
        Some(s) if s.is_finite() && s >= 0.0 => Some(Duration::from_secs_f64(s)),
        Some(_) => {
            return Err(Error::config(
                "`dockerd.stop_grace_max` must be a non-negative number of seconds",
            ))
        }
        None => None,
    };
    Ok(Resolved {
        binary,
        extra_args: c.args.clone(),
        docker_cli: c
            .docker_cli
            .clone()
            .unwrap_or_else(|| PathBuf::from("docker")),
        daemon_json: doc,
        network,
        uplink_pool,
        run_dir: c
            .run_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR)),
        prefix: c
            .image_prefix
            .clone()
            .unwrap_or_else(|| defaults.prefix.to_string()),
        log_tail_lines: c.log_tail_lines.unwrap_or(40),
        stop_grace_cap,
        // CACHELOCK_DOCKERD_LOG (older name of the setting) wins over the file.
        log_file: path_setting(
            std::env::var("CACHELOCK_DOCKERD_LOG")
                .ok()
                .as_deref()
                .or(c.log_file.as_deref()),
            defaults.log_file,
        ),
        default_socket: path_setting(c.default_socket.as_deref(), defaults.default_socket),
        cache_max_size: c.cache_max_size,
    })
}

impl Resolved {
    /// The dockerd spec for one run; `log_file` and `extra_sockets` are what the run claimed
    /// (see [`super::claim`]).
    pub fn spec(
        &self,
        data_root: PathBuf,
        short_id: &str,
        inherit: Vec<std::os::fd::RawFd>,
        cache_id: Option<String>,
        log_file: Option<daemon::LogFile>,
        extra_sockets: Vec<PathBuf>,
    ) -> daemon::Spec {
        daemon::Spec {
            binary: self.binary.clone(),
            extra_args: self.extra_args.clone(),
            data_root,
            inst_dir: self.run_dir.join(short_id),
            daemon_json: self.daemon_json.clone(),
            network: self.network,
            uplink_pool: self.uplink_pool,
            inherit,
            lease: None,
            log_tail_lines: self.log_tail_lines,
            cache_id,
            log_file,
            extra_sockets,
        }
    }

    /// Checks that the run directory can hold instance sockets (path length) and is root's
    /// own ground: dockerd writes its pidfile, sockets and exec root there as root, by path,
    /// so only the caller or root may be able to change it (see
    /// [`super::root::check_trusted_path`]; exit 73 otherwise).
    pub fn check_run_dir(&self) -> Result<()> {
        // <run_dir>/<8 hex>/x/containerd/containerd.sock must fit a unix socket path (107).
        let longest =
            self.run_dir.as_os_str().len() + "/12345678/x/containerd/containerd.sock".len();
        if longest > 107 {
            return Err(Error::config(format!(
                "`dockerd.run_dir` {} is too long: dockerd's sockets under it would exceed the 107-byte unix socket limit; use a short path such as /run/cachelock",
                self.run_dir.display()
            )));
        }
        std::fs::create_dir_all(&self.run_dir).map_err(|e| {
            Error::cant_create(format!("cannot create {}: {e}", self.run_dir.display()))
        })?;
        super::root::check_trusted_path(&self.run_dir).map_err(|why| {
            Error::cant_create(format!(
                "`dockerd.run_dir` {} cannot be used: {why}; root runs dockerd there: give a directory that you or root own and nobody else can write",
                self.run_dir.display()
            ))
        })
    }
}

/// Removes instance directories left by crashed runs: those whose process-tree marker no
/// process holds any more (a live instance's cachelock and dockerd tree keep it open). A
/// killed run's tree may still be exiting: a run on the same cached root sweeps after taking
/// its lock, which that tree held until its last process was gone.
pub fn sweep_run_dir(run_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return;
    };
    for e in entries.flatten() {
        let dir = e.path();
        let marker = dir.join("tree");
        if marker.exists() && super::tree::holders_of_path(&marker).is_empty() {
            tracing::debug!("removing stale instance directory {}", dir.display());
            let _ = super::root::wipe(&dir);
        }
    }
}
