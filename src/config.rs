//! The one configuration file (YAML): lock directory, per-lock rules, policies, dockerd.
//!
//! Every struct denies unknown fields so that a typo is an error naming the file, line and key
//! rather than a silently ignored setting. With no file, [`Config::default`] is the built-in
//! behaviour. Resolution order for the file: `--config` / `CACHELOCK_CONFIG` (must exist), else
//! [`SYSTEM_CONFIG`] if it exists, else the defaults.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use crate::error::{Error, Result};

/// Read when no `--config` / `CACHELOCK_CONFIG` is given and the file exists.
pub const SYSTEM_CONFIG: &str = "/etc/cachelock/config.yaml";
/// The default lock directory, shared by every user of the host (see [`default_lock_dir`]).
pub const SYSTEM_LOCK_DIR: &str = "/var/lib/cachelock";
/// Default dockerd cache root: root's own directory, outside the world-writable lock directory
/// (where another user could create it first; see `dockerd::root`).
pub const DEFAULT_CACHE_ROOT: &str = "/var/lib/cachelock-dind";
/// Most slots a lock may have (each is a lock file, or a data root for dockerd).
pub const MAX_SLOTS: u32 = 256;
/// Name of the policy used by locks that no rule binds.
pub const DEFAULT_POLICY: &str = "default";
/// Largest configuration (or scenario) file read; larger is refused, never read to the end.
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// Most flow collections (`[` or `{` characters, wherever they are) a YAML file may contain:
/// the YAML parser's time grows with the square of their nesting, which this bounds
/// (4096 nested levels parse in about 0.1 s; 100 000 took 50 s).
pub const MAX_FLOW_COLLECTIONS: usize = 4096;

/// How a waiter learns that the queue changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WaitMode {
    /// `notify` on local filesystems, `poll` on network filesystems (detected with statfs).
    #[default]
    Auto,
    /// inotify on the queue directory, with a timed fallback.
    Notify,
    /// Re-evaluate at the interval the policy returns (the head polls faster).
    Poll,
}

impl std::str::FromStr for WaitMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(WaitMode::Auto),
            "notify" => Ok(WaitMode::Notify),
            "poll" => Ok(WaitMode::Poll),
            _ => Err(format!(
                "{s:?} is not a wait mode: use auto, notify or poll"
            )),
        }
    }
}

/// What a policy fault (trap, fuel, memory, deadline, configure error) does to the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// The request fails with a message naming the policy and what it did (exit 70).
    #[default]
    Fail,
    /// That decision is taken by `builtin:default` instead, with a warning.
    Default,
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where lock state lives (`<lock_dir>/<name>.lock/`). Also `--lock-dir`, `CACHELOCK_LOCK_DIR`.
    pub lock_dir: Option<PathBuf>,
    /// The lock store as a URL: `file://DIR` (the lock directory) or
    /// `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`. Also `--backend`, `CACHELOCK_BACKEND`.
    pub backend: Option<String>,
    /// Credentials and timings of the etcd backend.
    #[serde(default)]
    pub etcd: EtcdConfig,
    /// Permission bits of files created in the lock directory, octal string (default "0666",
    /// so that users sharing a lock directory can all lock), set exactly: the umask does not
    /// apply. Tickets and per-user counters get these bits without group/other write.
    #[serde(default, deserialize_with = "de_octal")]
    pub file_mode: Option<u32>,
    /// Permission bits of directories created in the lock directory (default "1777"), set
    /// exactly; a group- or world-writable mode always gets the sticky bit.
    #[serde(default, deserialize_with = "de_octal")]
    pub dir_mode: Option<u32>,
    /// Default wait mode for every lock.
    pub wait_mode: Option<WaitMode>,
    /// Seconds between progress lines of a waiting request (default 5).
    pub progress_interval: Option<f64>,
    /// Seconds a queue key remembers its arrival after a give-up (default 600).
    pub queue_key_grace: Option<f64>,
    /// Where this user's compiled policies are cached (default `$XDG_CACHE_HOME/cachelock` or
    /// `~/.cache/cachelock`; for root, `policy_host_cache_dir`). Only a directory owned by the
    /// caller or root and writable by nobody else is used.
    pub policy_cache_dir: Option<PathBuf>,
    /// The host's compile cache, written by root (e.g. `cachelock policy check` at deploy time)
    /// and read by every user (default `/var/cache/cachelock`).
    pub policy_host_cache_dir: Option<PathBuf>,
    /// The compile budget of a policy module that is not built in (see `policy::compile`).
    #[serde(default)]
    pub policy_compile: CompileBudget,
    /// Policy of locks that no rule binds (default `default`, i.e. `builtin:default`).
    pub default_policy: Option<String>,
    /// Per-lock rules; the first whose `match` glob matches the lock name applies.
    #[serde(default)]
    pub locks: Vec<LockRule>,
    /// How OCI registries are reached (`oci://` policy modules).
    #[serde(default)]
    pub registry: RegistryConfig,
    /// Signature verification of `oci://` policy modules, for every policy that does not say
    /// otherwise.
    pub verify: Option<VerifyConfig>,
    /// Policy definitions by name. `default`, `priority` and `deadline` exist without being
    /// defined (as `builtin:NAME`); defining them here overrides that.
    #[serde(default)]
    pub policies: BTreeMap<String, PolicyDef>,
    /// The request log: every finished request appends one JSON line here (relative paths are
    /// relative to this file). Unset: no log.
    pub request_log: Option<PathBuf>,
    /// Size past which the request log is rotated to `FILE.1` (bytes, or K, M, G, T; default
    /// 64M).
    #[serde(default, deserialize_with = "de_size")]
    pub request_log_max_size: Option<u64>,
    /// Rotated request logs kept (`FILE.1` ... `FILE.N`; default 3).
    pub request_log_keep: Option<u32>,
    /// Root of dockerd data roots (`cachelock dockerd`). Also `--cache-root`, `CACHELOCK_CACHE_ROOT`.
    pub cache_root: Option<PathBuf>,
    /// How `cachelock dockerd` starts dockerd.
    #[serde(default)]
    pub dockerd: DockerdConfig,
}

/// A rule binding locks (by glob on the name) to a policy and options.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockRule {
    /// Glob on the lock name (`*`, `?`, `[...]`), e.g. `ci-*`.
    #[serde(rename = "match")]
    pub pattern: String,
    /// Policy name (a key of `policies`, or a built-in name).
    pub policy: Option<String>,
    /// How many holders may hold the lock at once, each on its own slot (dockerd: its own
    /// data root `<id>/slot-K`). Default 1.
    pub slots: Option<u32>,
    /// Whether a policy's `fall-back` decision is honoured (run without the shared lock).
    #[serde(default)]
    pub fallback: bool,
    /// Wait mode for these locks.
    pub wait_mode: Option<WaitMode>,
}

/// How OCI registries are reached.
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// PEM file of CA certificates trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// `HOST[:PORT]` of registries reached over plain HTTP.
    #[serde(default)]
    pub insecure: Vec<String>,
    /// Bound of one registry request, its body included (default 60).
    pub timeout_seconds: Option<u64>,
}

/// Which keys must have signed an `oci://` policy module.
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VerifyConfig {
    /// Public keys (SPKI `PUBLIC KEY` PEM files, as `cosign.pub`); one of them must have
    /// signed the module's manifest. Empty: no signature is required.
    #[serde(default)]
    pub keys: Vec<PathBuf>,
}

/// A policy definition.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDef {
    /// `builtin:NAME`, a path to a `.wasm` component (relative paths are relative to the
    /// configuration file), or `oci://HOST[:PORT]/REPO[:TAG][@sha256:DIGEST]`.
    pub module: String,
    /// Optional pin, `sha256:<hex>`; a module that does not match is refused.
    pub sha256: Option<String>,
    /// Passed to the policy's `configure` (values of any YAML scalar type, as strings).
    #[serde(default, deserialize_with = "de_string_map")]
    pub config: BTreeMap<String, String>,
    /// Sandbox limits.
    #[serde(default)]
    pub limits: Limits,
    /// What a policy fault does.
    #[serde(default)]
    pub on_error: OnError,
    /// Keys verifying an `oci://` module (replaces the file's `verify:` for this policy).
    pub verify: Option<VerifyConfig>,
}

/// Per-policy sandbox limits; unset fields take the defaults in `policy::limits`.
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Fuel (roughly: wasm instructions) per call.
    pub fuel: Option<u64>,
    /// Linear memory cap in MiB.
    pub memory_mib: Option<u64>,
    /// Table elements cap.
    pub table_elements: Option<u32>,
    /// Instances cap (core instances inside the component).
    pub instances: Option<u32>,
    /// Smallest `keep-waiting` interval accepted, ms (smaller values are raised).
    pub min_interval_ms: Option<u64>,
    /// Largest `keep-waiting` interval accepted, ms (larger values are lowered).
    pub max_interval_ms: Option<u64>,
    /// Bytes of log output (stdout, stderr, `host.log`) kept per call.
    pub log_bytes: Option<u64>,
    /// Wall-clock milliseconds per call, sleeps included (`configure` gets 10×).
    pub time_ms: Option<u64>,
}

/// The compile budget of untrusted policy modules; unset fields take the defaults in
/// `policy::compile`.
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CompileBudget {
    /// Address space of the compiling process, MiB (default 1024).
    pub memory_mib: Option<u64>,
    /// CPU seconds of the compiling process (default 30).
    pub cpu_seconds: Option<u64>,
    /// Seconds a waiter waits for a policy being compiled before it orders the queue by the
    /// fallback order (priority) until the compile ends (default 60).
    pub wait_seconds: Option<u64>,
}

/// The etcd backend's settings (`etcd:`). The `ETCDCTL_*` variables override the credentials.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// CA certificate (PEM) that signed the members' certificates; enables TLS. Also
    /// `ETCDCTL_CACERT`.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM). Also `ETCDCTL_CERT`.
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM). Also `ETCDCTL_KEY`.
    pub key_file: Option<PathBuf>,
    /// User name, or `user:password`. Also `ETCDCTL_USER`.
    pub user: Option<String>,
    /// Password. Also `ETCDCTL_PASSWORD`.
    pub password: Option<String>,
    /// A file holding the password (its first line).
    pub password_file: Option<PathBuf>,
    /// Seconds of lease TTL (default 10): how long a dead request's ticket or lock survives
    /// it; a holder whose lease cannot be renewed stops its command within 3/5 of it.
    pub lease_ttl: Option<f64>,
    /// Seconds one request may take before it is retried on the next endpoint (default 1).
    pub request_timeout: Option<f64>,
    /// Seconds an operation is retried across endpoints before exit 69 (default 10).
    pub unavailable_timeout: Option<f64>,
}

/// How dockerd is started by `cachelock dockerd`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DockerdConfig {
    /// dockerd binary (default `dockerd`, looked up on PATH).
    pub binary: Option<PathBuf>,
    /// Extra arguments appended to dockerd's command line.
    #[serde(default)]
    pub args: Vec<String>,
    /// The docker CLI used for hygiene and image loads (default `docker`).
    pub docker_cli: Option<PathBuf>,
    /// The user's daemon.json to merge (default `/etc/docker/daemon.json` when it exists).
    pub daemon_json_file: Option<PathBuf>,
    /// Settings merged over the defaults and the user's daemon.json (objects merged, arrays
    /// concatenated).
    pub daemon_json: Option<serde_json::Value>,
    /// Networking of each dockerd (see docs/dockerd.md): `netns` (own network namespace with a
    /// NAT uplink; the default of `cachelock dockerd`), `none` (no bridge, no iptables:
    /// containers get loopback or `--network host`), `default` (dockerd's own networking in the
    /// caller's namespace; the default of the Earthly drop-in, one instance per namespace).
    pub network: Option<String>,
    /// Pool of /30 uplink networks for `network: netns` (default `10.199.0.0/16`).
    pub uplink_pool: Option<String>,
    /// Upper bound in seconds on the policy's SIGTERM grace before dockerd is killed.
    pub stop_grace_max: Option<f64>,
    /// Base directory of exec roots and sockets (short: unix socket paths are limited to 107
    /// bytes). Default `/run/cachelock`.
    pub run_dir: Option<PathBuf>,
    /// Prefix used when re-tagging cached images (default `cachelock_cached_`).
    pub image_prefix: Option<String>,
    /// Lines of dockerd's log passed to `on-start-failure` and shown on failure (default 40).
    pub log_tail_lines: Option<usize>,
    /// dockerd's log when free (claimed per daemon), or `off` for the per-instance log. Default:
    /// `/var/log/docker.log` for the Earthly drop-in, `off` for `cachelock dockerd`.
    pub log_file: Option<String>,
    /// A unix socket dockerd also listens on when free (claimed per daemon), or `off`. Default:
    /// `/var/run/docker.sock` for the Earthly drop-in, `off` for `cachelock dockerd`.
    pub default_socket: Option<String>,
    /// Cap on the total size of the cached data roots under a cache root (bytes, or with a
    /// suffix K, M, G, T in powers of 1024); least recently used roots that nobody holds are
    /// evicted after a cached run. Unset: no cap.
    #[serde(default, deserialize_with = "de_size")]
    pub cache_max_size: Option<u64>,
    /// With a fleet-wide backend (etcd): the cache root is on storage every host sees, so a
    /// cache id is locked fleet-wide. Default false: each host locks its own local data roots
    /// (the lock name gets `.host-<hostname>`), and hosts never wait for each other's caches.
    #[serde(default)]
    pub cache_root_shared: bool,
}

/// What the configuration says about one lock, after rules and defaults are applied.
#[derive(Debug, Clone)]
pub struct LockSettings {
    /// Name of the policy governing the lock.
    pub policy: String,
    /// Number of slots (1 for an ordinary lock).
    pub slots: u32,
    /// Whether `fall-back` decisions are honoured.
    pub fallback: bool,
    /// Wait mode from the rule, else the file, else `auto`.
    pub wait_mode: WaitMode,
}

/// A loaded configuration and where it came from (for relative paths and messages).
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// The parsed file, or the defaults.
    pub config: Config,
    /// The file it was read from, if any.
    pub path: Option<PathBuf>,
}

impl Loaded {
    /// Loads `explicit` (which must exist), else [`SYSTEM_CONFIG`] if present, else defaults.
    pub fn load(explicit: Option<&Path>) -> Result<Self> {
        match explicit {
            Some(p) => Self::from_file(p),
            None if Path::new(SYSTEM_CONFIG).exists() => Self::from_file(Path::new(SYSTEM_CONFIG)),
            None => Ok(Self::default()),
        }
    }

    /// Reads and validates one file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = read_text(path).map_err(|e| {
            Error::config(format!(
                "cannot read configuration file {}: {e}",
                path.display()
            ))
        })?;
        let config = Config::parse(&text)
            .map_err(|m| Error::config(format!("configuration file {}: {m}", path.display())))?;
        Ok(Self {
            config,
            path: Some(path.to_path_buf()),
        })
    }

    /// Resolves a path written in the file: relative paths are relative to the file's directory.
    pub fn resolve_path(&self, p: &Path) -> PathBuf {
        match (&self.path, p.is_relative()) {
            (Some(file), true) => file.parent().unwrap_or(Path::new(".")).join(p),
            _ => p.to_path_buf(),
        }
    }
}

impl Config {
    /// Parses YAML text; the error names the line, column and key path.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        // Nothing but comments (the packaged example until it is edited) is the defaults.
        let blank = |l: &str| {
            let l = l.trim();
            l.is_empty() || l.starts_with('#') || l == "---"
        };
        if text.lines().all(blank) {
            return Ok(Self::default());
        }
        let config: Config = parse_yaml(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: globs, references to policies, ranges.
    fn validate(&self) -> std::result::Result<(), String> {
        for (i, rule) in self.locks.iter().enumerate() {
            glob::Pattern::new(&rule.pattern)
                .map_err(|e| format!("key `locks[{i}].match`: bad glob {:?}: {e}", rule.pattern))?;
            if let Some(p) = &rule.policy {
                if !self.has_policy(p) {
                    return Err(format!(
                        "key `locks[{i}].policy`: no policy named {p:?} (define it under `policies:` or use default, priority, deadline)"
                    ));
                }
            }
            if let Some(n) = rule.slots {
                if !(1..=MAX_SLOTS).contains(&n) {
                    return Err(format!(
                        "key `locks[{i}].slots`: must be from 1 to {MAX_SLOTS}"
                    ));
                }
            }
        }
        if let Some(p) = &self.default_policy {
            if !self.has_policy(p) {
                return Err(format!("key `default_policy`: no policy named {p:?}"));
            }
        }
        for (name, def) in &self.policies {
            if def.module.starts_with("oci://") {
                #[cfg(feature = "oci")]
                crate::policy::oci::reference::Reference::parse(&def.module)
                    .map_err(|e| format!("key `policies.{name}.module`: {e}"))?;
            } else if def.verify.is_some() {
                return Err(format!(
                    "key `policies.{name}.verify`: only an oci:// module is verified by signature (pin a file with `sha256:`)"
                ));
            }
            if let Some(pin) = &def.sha256 {
                let hex = pin.strip_prefix("sha256:").unwrap_or(pin);
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(format!(
                        "key `policies.{name}.sha256`: expected `sha256:` followed by 64 hex digits"
                    ));
                }
            }
        }
        for (key, v, max) in [
            ("progress_interval", self.progress_interval, 86_400.0),
            ("queue_key_grace", self.queue_key_grace, 31_536_000.0),
            ("etcd.request_timeout", self.etcd.request_timeout, 60.0),
            (
                "etcd.unavailable_timeout",
                self.etcd.unavailable_timeout,
                3_600.0,
            ),
            ("etcd.lease_ttl", self.etcd.lease_ttl, 86_400.0),
            (
                "dockerd.stop_grace_max",
                self.dockerd.stop_grace_max,
                86_400.0,
            ),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && (0.0..=max).contains(&v)) {
                    return Err(format!(
                        "key `{key}`: must be a number of seconds from 0 to {max}"
                    ));
                }
            }
        }
        for (i, h) in self.registry.insecure.iter().enumerate() {
            if h.is_empty() || h.contains('/') || h.contains("://") {
                return Err(format!(
                    "key `registry.insecure[{i}]`: {h:?} is not HOST or HOST:PORT"
                ));
            }
        }
        if let Some(t) = self.registry.timeout_seconds {
            if !(1..=3600).contains(&t) {
                return Err("key `registry.timeout_seconds`: must be from 1 to 3600".into());
            }
        }
        if let Some(t) = self.etcd.lease_ttl {
            if t < 2.0 {
                return Err("key `etcd.lease_ttl`: must be at least 2 seconds".into());
            }
        }
        if self.etcd.request_timeout == Some(0.0) {
            return Err("key `etcd.request_timeout`: must be more than 0 seconds".into());
        }
        if self
            .dockerd
            .log_tail_lines
            .is_some_and(|n| n > MAX_LOG_TAIL_LINES)
        {
            return Err(format!(
                "key `dockerd.log_tail_lines`: must be at most {MAX_LOG_TAIL_LINES}"
            ));
        }
        Ok(())
    }

    /// Whether `name` is a defined or built-in policy.
    pub fn has_policy(&self, name: &str) -> bool {
        self.policies.contains_key(name) || builtin_policy(name).is_some()
    }

    /// The definition of policy `name`: from `policies`, else the built-in of that name.
    pub fn policy_def(&self, name: &str) -> Option<PolicyDef> {
        self.policies.get(name).cloned().or_else(|| {
            builtin_policy(name).map(|module| PolicyDef {
                module: module.to_string(),
                sha256: None,
                config: BTreeMap::new(),
                limits: Limits::default(),
                on_error: OnError::Fail,
                verify: None,
            })
        })
    }

    /// The first rule matching `lock`, if any.
    pub fn rule_for(&self, lock: &str) -> Option<&LockRule> {
        self.locks.iter().find(|r| {
            glob::Pattern::new(&r.pattern)
                .map(|p| p.matches(lock))
                .unwrap_or(false)
        })
    }

    /// Settings for `lock` after rules and defaults.
    pub fn lock_settings(&self, lock: &str) -> LockSettings {
        let rule = self.rule_for(lock);
        LockSettings {
            policy: rule
                .and_then(|r| r.policy.clone())
                .or_else(|| self.default_policy.clone())
                .unwrap_or_else(|| DEFAULT_POLICY.to_string()),
            slots: rule.and_then(|r| r.slots).unwrap_or(1),
            fallback: rule.map(|r| r.fallback).unwrap_or(false),
            wait_mode: rule
                .and_then(|r| r.wait_mode)
                .or(self.wait_mode)
                .unwrap_or_default(),
        }
    }

    /// Progress interval (seconds).
    pub fn progress_interval(&self) -> f64 {
        self.progress_interval.unwrap_or(5.0)
    }

    /// Queue-key grace in milliseconds.
    pub fn queue_key_grace_ms(&self) -> u64 {
        (self.queue_key_grace.unwrap_or(600.0) * 1000.0) as u64
    }
}

/// Deserializes YAML into `T`; the error names the line, column and key path (e.g.
/// ``line 5 column 5: key `policies.p`: unknown field `limts` ``), so that every file cachelock
/// reads reports mistakes the same way.
pub fn parse_yaml<T: serde::de::DeserializeOwned>(text: &str) -> std::result::Result<T, String> {
    let flow = text.bytes().filter(|b| matches!(b, b'[' | b'{')).count();
    if flow > MAX_FLOW_COLLECTIONS {
        return Err(format!(
            "{flow} flow collections (`[` or `{{` characters); at most {MAX_FLOW_COLLECTIONS} are accepted (nesting them deeply makes YAML parsing slow): write lists and maps in block style"
        ));
    }
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let at = inner
            .location()
            .map(|l| format!("line {} column {}: ", l.line(), l.column()))
            .unwrap_or_default();
        if key.is_empty() || key == "." {
            format!("{at}{inner}")
        } else {
            format!("{at}key `{key}`: {inner}")
        }
    })
}

/// `builtin:NAME` for the built-in policy names, else `None`.
pub fn builtin_policy(name: &str) -> Option<&'static str> {
    match name {
        "default" => Some("builtin:default"),
        "priority" => Some("builtin:priority"),
        "deadline" => Some("builtin:deadline"),
        _ => None,
    }
}

/// Largest `dockerd.log_tail_lines`.
pub const MAX_LOG_TAIL_LINES: usize = 100_000;

/// Reads a YAML file cachelock was pointed at: at most [`MAX_FILE_BYTES`] (`/dev/zero` or a
/// huge file is refused, not read until memory runs out), never blocking in `open` (a FIFO),
/// UTF-8 only. The error says what was wrong (the caller names the file).
pub fn read_text(path: &Path) -> std::result::Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if meta.is_dir() {
        return Err("it is a directory".to_string());
    }
    if !meta.is_file() {
        // A pipe (`--config <(...)`) is read as its writer writes.
        crate::sys::set_blocking(&file).map_err(|e| e.to_string())?;
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() > MAX_FILE_BYTES {
        return Err(format!(
            "it is larger than {} MiB, the most cachelock reads",
            MAX_FILE_BYTES >> 20
        ));
    }
    String::from_utf8(bytes).map_err(|_| "it is not UTF-8 text".to_string())
}

/// The lock directory used when neither flag, environment nor file names one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultLockDir {
    /// The directory.
    pub path: PathBuf,
    /// Why this is a private directory rather than the host's shared [`SYSTEM_LOCK_DIR`]: its
    /// locks exclude nobody else's (every run says so).
    pub private_because: Option<String>,
}

/// The lock directory when neither flag, environment nor file names one: [`SYSTEM_LOCK_DIR`],
/// which every user of the host shares — root creates it on its first run with mode 1777
/// (sticky, like `/tmp`). When the caller cannot use it, a private directory
/// (`$XDG_RUNTIME_DIR/cachelock`, else `<tmp>/cachelock-<uid>`) with the reason; that
/// directory must be the caller's own (not a symlink, owned by the caller, not writable by
/// others), else exit 73: another user could have planted it.
pub fn default_lock_dir() -> Result<DefaultLockDir> {
    let system = Path::new(SYSTEM_LOCK_DIR);
    let uid = crate::sys::euid();
    let install = format!("`install -d -m 1777 {SYSTEM_LOCK_DIR}` as root");
    let reason = match std::fs::metadata(system) {
        Ok(m) if m.is_dir() && crate::sys::can_write_dir(system) => {
            return Ok(DefaultLockDir {
                path: system.to_path_buf(),
                private_because: None,
            })
        }
        Ok(m) if m.is_dir() => {
            use std::os::unix::fs::MetadataExt;
            format!(
                "{SYSTEM_LOCK_DIR} is not writable by uid {uid} (owner uid {}, mode {:04o}); share it with `chmod 1777 {SYSTEM_LOCK_DIR}` as root",
                m.uid(),
                m.mode() & 0o7777
            )
        }
        Ok(_) => format!("{SYSTEM_LOCK_DIR} is not a directory"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match create_shared(system) {
            Ok(()) => {
                return Ok(DefaultLockDir {
                    path: system.to_path_buf(),
                    private_because: None,
                })
            }
            Err(e) => format!(
                "{SYSTEM_LOCK_DIR} does not exist and uid {uid} cannot create it ({e}); root creates it on its first run, or run {install}"
            ),
        },
        Err(e) => format!("{SYSTEM_LOCK_DIR}: {e}"),
    };
    let path = match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(run) => PathBuf::from(run).join("cachelock"),
        None => std::env::temp_dir().join(format!("cachelock-{uid}")),
    };
    ensure_private(&path)?;
    Ok(DefaultLockDir {
        path,
        private_because: Some(reason),
    })
}

/// Creates the host's shared lock directory: sticky and writable by everyone, like `/tmp`.
fn create_shared(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Makes sure `dir` is the caller's private directory (creating it with mode 0700): not a
/// symlink, owned by the caller, not writable by others — else exit 73.
fn ensure_private(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let refuse = |why: String| {
        Error::cant_create(format!(
            "the private lock directory {} {why}; cachelock does not trust it (another user may have planted it): remove it, or choose a lock directory with --lock-dir or CACHELOCK_LOCK_DIR",
            dir.display()
        ))
    };
    if std::fs::symlink_metadata(dir).is_err() {
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(refuse(format!("cannot be created ({e})"))),
        }
    }
    let m = std::fs::symlink_metadata(dir).map_err(|e| refuse(format!("cannot be read ({e})")))?;
    let uid = crate::sys::euid();
    if m.file_type().is_symlink() {
        Err(refuse("is a symbolic link".to_string()))
    } else if !m.is_dir() {
        Err(refuse("is not a directory".to_string()))
    } else if m.uid() != uid {
        Err(refuse(format!(
            "is owned by uid {}, not by uid {uid}",
            m.uid()
        )))
    } else if m.mode() & 0o022 != 0 {
        Err(refuse(format!(
            "is writable by other users (mode {:04o})",
            m.mode() & 0o7777
        )))
    } else {
        Ok(())
    }
}

/// An octal mode, written `"0640"`, `0640` or `0o640` (all mean rw-r-----). Read as the
/// scalar's text: YAML itself would read `0o640` as the integer 416 and `0640` as 640.
fn de_octal<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u32>, D::Error> {
    let Some(text) = Option::<String>::deserialize(d)? else {
        return Ok(None);
    };
    let digits = text.trim();
    let digits = digits
        .strip_prefix("0o")
        .or_else(|| digits.strip_prefix("0O"))
        .unwrap_or(digits);
    let mode = u32::from_str_radix(digits, 8)
        .ok()
        .filter(|_| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{text:?} is not an octal mode such as \"0664\" (also 0664 or 0o664)"
            ))
        })?;
    if mode > 0o7777 {
        return Err(serde::de::Error::custom(format!(
            "mode {text:?} is out of range (at most 07777)"
        )));
    }
    Ok(Some(mode))
}

/// Parses a size: bytes, or a number with K, M, G or T (powers of 1024; `KiB`, `MB`... too).
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 500M or 20G"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("{text:?} has an unknown unit; use K, M, G or T")),
    };
    let bytes = n * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{text:?} is too large"));
    }
    Ok(bytes as u64)
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u64>, D::Error> {
    let v: Option<serde_yaml::Value> = Option::deserialize(d)?;
    match v {
        None => Ok(None),
        Some(serde_yaml::Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom("a size must be a non-negative integer")),
        Some(serde_yaml::Value::String(s)) => {
            parse_size(&s).map(Some).map_err(serde::de::Error::custom)
        }
        Some(_) => Err(serde::de::Error::custom(
            "expected a size such as 500M or 20G",
        )),
    }
}

fn de_string_map<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<BTreeMap<String, String>, D::Error> {
    let raw: BTreeMap<String, serde_yaml::Value> = BTreeMap::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| {
            let s = match v {
                serde_yaml::Value::String(s) => s,
                serde_yaml::Value::Number(n) => n.to_string(),
                serde_yaml::Value::Bool(b) => b.to_string(),
                _ => {
                    return Err(serde::de::Error::custom(format!(
                        "config value of {k:?} must be a string, number or boolean"
                    )))
                }
            };
            Ok((k, s))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_names_line_and_key() {
        let err = Config::parse(
            "lock_dir: /tmp/x\npolicies:\n  p:\n    module: builtin:default\n    limts: {}\n",
        )
        .unwrap_err();
        assert!(err.contains("line 5"), "{err}");
        assert!(err.contains("limts"), "{err}");
        assert!(err.contains("policies.p"), "{err}");
    }

    #[test]
    fn rules_bind_first_match_and_defaults_apply() {
        let c = Config::parse(
            "locks:\n  - match: 'ci-*'\n    policy: priority\n    slots: 3\n    fallback: true\n  - match: '*'\n    policy: deadline\n",
        )
        .unwrap();
        let s = c.lock_settings("ci-main");
        assert_eq!(
            (s.policy.as_str(), s.slots, s.fallback),
            ("priority", 3, true)
        );
        let s = c.lock_settings("other");
        assert_eq!(
            (s.policy.as_str(), s.slots, s.fallback),
            ("deadline", 1, false)
        );
        assert_eq!(Config::default().lock_settings("x").policy, "default");
    }

    #[test]
    fn undefined_policy_and_bad_pin_are_refused() {
        let err = Config::parse("locks:\n  - match: x\n    policy: nope\n").unwrap_err();
        assert!(err.contains("nope"), "{err}");
        let err =
            Config::parse("policies:\n  p:\n    module: a.wasm\n    sha256: abc\n").unwrap_err();
        assert!(err.contains("sha256"), "{err}");
    }

    #[cfg(feature = "wasm")]
    #[test]
    fn the_packaged_example_changes_nothing_and_its_defaults_are_the_defaults() {
        let example =
            include_str!("../packaging/config.yaml").replace("@CACHE_ROOT@", DEFAULT_CACHE_ROOT);
        assert_eq!(
            format!("{:?}", Config::parse(&example).unwrap()),
            format!("{:?}", Config::default()),
            "every line of the example must be a comment"
        );
        // Its first part, uncommented, states each default as cachelock applies it.
        let defaults: String = example
            .split("# Examples")
            .next()
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .filter(|l| !l.is_empty() && !l.starts_with(' '))
            .map(|l| format!("{l}\n"))
            .collect();
        let c = Config::parse(&defaults).unwrap();
        assert_eq!(c.lock_dir.as_deref(), Some(Path::new(SYSTEM_LOCK_DIR)));
        assert_eq!((c.file_mode, c.dir_mode), (Some(0o666), Some(0o1777)));
        assert_eq!(c.wait_mode, Some(WaitMode::default()));
        assert_eq!(c.progress_interval(), Config::default().progress_interval());
        assert_eq!(
            c.queue_key_grace_ms(),
            Config::default().queue_key_grace_ms()
        );
        assert_eq!(
            c.policy_host_cache_dir.as_deref(),
            Some(Path::new(crate::policy::cache::DEFAULT_HOST_CACHE_DIR))
        );
        assert_eq!(c.default_policy.as_deref(), Some(DEFAULT_POLICY));
        assert_eq!(c.cache_root.as_deref(), Some(Path::new(DEFAULT_CACHE_ROOT)));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1").unwrap(), 1);
        assert_eq!(parse_size("2K").unwrap(), 2048);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("20 G").unwrap(), 20 << 30);
        assert!(parse_size("20X").is_err());
        assert!(parse_size("-1").is_err());
        let c = Config::parse("dockerd:\n  cache_max_size: 10M\n").unwrap();
        assert_eq!(c.dockerd.cache_max_size, Some(10 << 20));
        let e = Config::parse("dockerd:\n  cache_max_size: lots\n").unwrap_err();
        assert!(e.contains("cache_max_size"), "{e}");
    }

    #[test]
    fn modes_and_config_values() {
        let c = Config::parse(
            "file_mode: \"0640\"\npolicies:\n  p:\n    module: builtin:priority\n    config: {aging_per_minute: 5, boost: true, label: main}\n",
        )
        .unwrap();
        assert_eq!(c.file_mode, Some(0o640));
        for same in [
            "file_mode: 0o640\n",
            "file_mode: 0640\n",
            "file_mode: '0640'\n",
        ] {
            assert_eq!(
                Config::parse(same).unwrap().file_mode,
                Some(0o640),
                "{same}"
            );
        }
        for bad in [
            "file_mode: rw\n",
            "file_mode: 0o\n",
            "file_mode: 0o17777\n",
            "file_mode: -1\n",
        ] {
            let e = Config::parse(bad).unwrap_err();
            assert!(e.contains("file_mode"), "{bad}: {e}");
        }
        let p = c.policy_def("p").unwrap();
        assert_eq!(p.config["aging_per_minute"], "5");
        assert_eq!(p.config["boost"], "true");
        assert!(Config::parse("file_mode: \"0999\"\n").is_err());
    }
}
