//! Earthly's and EarthBuild's `dockerd-wrapper.sh` contracts, turned into a plan.
//!
//! Two callers reach the drop-in:
//! - **Earthly** (and EarthBuild CLIs older than its flags): `/bin/sh -c 'EARTHLY_DOCKERD_DATA_ROOT="..."
//!   EARTHLY_DOCKERD_CACHE_DATA="true" ... /var/earthly/dockerd-wrapper.sh execute CMD...'`, the
//!   registry entries in `EARTHLY_DOCKER_LOAD_REGISTRY` (a secret passed as environment).
//! - **EarthBuild**: `.../dockerd-wrapper.sh execute --data-root=DIR [--cache-data]
//!   [--flock-acquired] [--start-compose] [--compose-file=F]... [--compose-service=S]...
//!   [--load-file=F]... [--image-digest=D]... [--] CMD...`, registry entries in
//!   `EARTH_DOCKER_LOAD_REGISTRY`. An unknown option means the CLI and the image differ in version.
//!
//! User-facing variables are read as `EARTH_<NAME>` first, then `EARTHLY_<NAME>` (with a
//! deprecation warning under EarthBuild's flags, silently under Earthly's protocol, whose users
//! have nothing else). Nothing here starts a process or takes a lock: [`parse`] is pure over the
//! arguments and a variable lookup, so both contracts are unit-tested exactly as they are called.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// BuildKit's embedded registry, as Earthly's wrapper hard-codes it.
pub const DEFAULT_REGISTRY: &str = "172.30.0.1:8371";
/// Overrides [`DEFAULT_REGISTRY`] (tests use a local registry; so can an unusual deployment).
pub const REGISTRY_VAR: &str = "CACHELOCK_EARTHLY_REGISTRY";
/// Earthly's lock file inside a cached data root.
pub const LOCK_FILE: &str = ".earthly-docker-lock";
/// cachelock's queue directory inside a cached data root (shared by every host using the root).
pub const QUEUE_DIR: &str = ".cachelock";
/// Lock name when the data root's base name is not a valid lock name.
pub const FALLBACK_LOCK_NAME: &str = "dind";
/// Where fall-back runs of a busy cached root get their private roots, beside the cached roots
/// (never inside one: dockerd's mount clean-up matches its data root as a string prefix).
pub const PRIVATE_DIR: &str = ".cachelock-private";
/// Earthly's hygiene prefix.
pub const PREFIX: &str = "earthly_cached_";
/// Earthly's default pre-script (EarthBuild kept the path).
pub const PRE_SCRIPT: &str = "/usr/share/earthly/dockerd-wrapper-pre-script";
/// Where Earthly's wrapper sends dockerd's output, and where its users look.
pub const DOCKER_LOG: &str = "/var/log/docker.log";
/// The socket Earthly's dockerd listens on and tools hard-code.
pub const DOCKER_SOCK: &str = "/var/run/docker.sock";
/// Environment given to compose and, once compose ran, to the command (as Earthly exports it).
pub const COMPOSE_ENV: [(&str, &str); 2] = [
    ("COMPOSE_PROJECT_NAME", "default"),
    ("COMPOSE_HTTP_TIMEOUT", "600"),
];

/// Which caller's contract an invocation follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contract {
    /// `EARTHLY_*` environment (Earthly, and older EarthBuild CLIs).
    Earthly,
    /// EarthBuild's flags.
    EarthBuild,
}

impl Contract {
    /// Where `get-compose-config` writes the merged configuration.
    pub fn compose_config_path(self) -> &'static str {
        match self {
            Self::Earthly => "/tmp/earthly/compose-config.yml",
            Self::EarthBuild => "/tmp/earthbuild/compose-config.yml",
        }
    }

    /// What this contract adds to daemon.json: the registry as insecure, and for EarthBuild its
    /// mirrors and the classic (non-containerd) image store.
    pub fn daemon_json(self, registry: &str) -> Value {
        match self {
            Self::Earthly => json!({"insecure-registries": [registry]}),
            Self::EarthBuild => json!({
                "insecure-registries": [registry],
                "registry-mirrors": ["https://mirror.gcr.io", "https://public.ecr.aws"],
                "features": {"containerd-snapshotter": false},
            }),
        }
    }
}

/// Compose services to bring up before the command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compose {
    /// `-f` files.
    pub files: Vec<String>,
    /// Services (all when empty).
    pub services: Vec<String>,
}

/// One registry load: pull `pull`, tag it `tag`, remove `pull`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryLoad {
    /// `<registry>/REF`.
    pub pull: String,
    /// The user's tag.
    pub tag: String,
}

/// `execute`, fully parsed.
#[derive(Debug, Clone)]
pub struct Execute {
    /// Which contract the caller used.
    pub contract: Contract,
    /// The data root the caller chose (`/var/earthly/dind/<id>`).
    pub data_root: PathBuf,
    /// Keep the root between runs (lock it).
    pub cached: bool,
    /// The caller already holds `.earthly-docker-lock` (EarthBuild's re-exec under flock(1)):
    /// take no lock, or we would wait for our own parent.
    pub flock_acquired: bool,
    /// Image tarballs.
    pub load_files: Vec<PathBuf>,
    /// Registry pulls.
    pub registry: Vec<RegistryLoad>,
    /// Compose to start, if any.
    pub compose: Option<Compose>,
    /// The command.
    pub command: Vec<OsString>,
    /// Deprecation notes to print.
    pub warnings: Vec<String>,
}

/// `get-compose-config`, parsed.
#[derive(Debug, Clone)]
pub struct ComposeConfig {
    /// Which contract the caller used.
    pub contract: Contract,
    /// Files to merge.
    pub files: Vec<String>,
}

/// What the caller asked for.
#[derive(Debug, Clone)]
pub enum Invocation {
    /// `execute`.
    Execute(Execute),
    /// `get-compose-config`.
    ComposeConfig(ComposeConfig),
    /// The caller speaks a newer contract than this binary: EarthBuild's wrapper exits 1 with
    /// this message, and so does the drop-in.
    VersionMismatch(String),
}

/// Reads user-facing variables: `EARTH_<NAME>`, else `EARTHLY_<NAME>`, empty meaning unset.
pub struct Vars<'a> {
    get: &'a dyn Fn(&str) -> Option<String>,
}

impl<'a> Vars<'a> {
    /// Over a lookup (the process environment, or a test's table).
    pub fn new(get: &'a dyn Fn(&str) -> Option<String>) -> Self {
        Self { get }
    }

    /// A variable exactly as named, empty meaning unset.
    pub fn raw(&self, name: &str) -> Option<String> {
        (self.get)(name).filter(|v| !v.is_empty())
    }

    /// `EARTH_<suffix>`, else `EARTHLY_<suffix>`; the second says so in `warn` when given.
    pub fn user(&self, suffix: &str, warn: Option<&mut Vec<String>>) -> Option<String> {
        if let Some(v) = self.raw(&format!("EARTH_{suffix}")) {
            return Some(v);
        }
        let v = self.raw(&format!("EARTHLY_{suffix}"))?;
        if let Some(w) = warn {
            w.push(format!(
                "EARTHLY_{suffix} is deprecated; use EARTH_{suffix}"
            ));
        }
        Some(v)
    }

    /// `EARTH(LY)_DOCKER_WRAPPER_DEBUG` is on (`1`, as Earthly tests it; `true` too).
    pub fn debug(&self) -> bool {
        matches!(
            self.user("DOCKER_WRAPPER_DEBUG", None).as_deref(),
            Some("1" | "true")
        )
    }

    /// `EARTH(LY)_DOCKER_WRAPPER_DEBUG_CMD`: run it, then exit 1.
    pub fn debug_cmd(&self) -> Option<String> {
        self.user("DOCKER_WRAPPER_DEBUG_CMD", None)
    }

    /// The pre-script path (run when it exists).
    pub fn pre_script(&self) -> String {
        self.user("DOCKER_WRAPPER_PRE_SCRIPT", None)
            .unwrap_or_else(|| PRE_SCRIPT.to_string())
    }

    /// The registry address: [`REGISTRY_VAR`], else [`DEFAULT_REGISTRY`].
    pub fn registry(&self) -> String {
        self.raw(REGISTRY_VAR)
            .unwrap_or_else(|| DEFAULT_REGISTRY.to_string())
    }
}

fn words(v: Option<String>) -> Vec<String> {
    v.map(|v| v.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

/// Parses `SUBCOMMAND ARGS...` as either contract.
pub fn parse(args: &[OsString], vars: &Vars) -> Result<Invocation> {
    let Some(sub) = args.first() else {
        return Err(Error::usage(
            "missing sub-command; use `execute CMD...` or `get-compose-config`",
        ));
    };
    let rest = &args[1..];
    match sub.to_str() {
        Some("execute") => parse_execute(rest, vars),
        Some("get-compose-config") => parse_compose_config(rest, vars),
        _ => Err(Error::usage(format!(
            "unknown sub-command {:?}; use `execute CMD...` or `get-compose-config`",
            sub.to_string_lossy()
        ))),
    }
}

/// EarthBuild's flags, before the command.
#[derive(Debug, Default)]
struct Flags {
    data_root: Option<String>,
    cache_data: bool,
    flock_acquired: bool,
    start_compose: bool,
    compose_files: Vec<String>,
    compose_services: Vec<String>,
    load_files: Vec<String>,
    any: bool,
}

/// Consumes leading flags (as EarthBuild's `parse_args`); returns them and the index of the
/// first argument of the command, or the mismatch message for an unknown option.
fn parse_flags(args: &[OsString]) -> std::result::Result<(Flags, usize), String> {
    let mut f = Flags::default();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        let value = |prefix: &str| a.strip_prefix(prefix).map(String::from);
        if a == "--" {
            return Ok((f, i + 1));
        } else if let Some(v) = value("--data-root=") {
            f.data_root = Some(v);
        } else if a == "--cache-data" {
            f.cache_data = true;
        } else if a == "--flock-acquired" {
            f.flock_acquired = true;
        } else if a == "--start-compose" {
            f.start_compose = true;
        } else if let Some(v) = value("--compose-file=") {
            f.compose_files.push(v);
        } else if let Some(v) = value("--compose-service=") {
            f.compose_services.push(v);
        } else if let Some(v) = value("--load-file=") {
            f.load_files.push(v);
        } else if a.starts_with("--image-digest=") {
            // Only there to bust BuildKit's cache when an image changes.
        } else if a.starts_with('-') {
            return Err(format!(
                "dockerd-wrapper.sh: unrecognized option {a:?}.\nThis usually means the earth CLI and the buildkitd image are different versions."
            ));
        } else {
            return Ok((f, i));
        }
        f.any = true;
        i += 1;
    }
    Ok((f, i))
}

fn parse_execute(args: &[OsString], vars: &Vars) -> Result<Invocation> {
    let (flags, at) = match parse_flags(args) {
        Ok(v) => v,
        Err(m) => return Ok(Invocation::VersionMismatch(m)),
    };
    let command = args[at..].to_vec();
    let mut warnings = Vec::new();
    let (contract, data_root, cached, flock_acquired, load_files, compose) = if let Some(root) =
        flags.data_root.clone()
    {
        let compose = flags.start_compose.then(|| Compose {
            files: flags.compose_files.clone(),
            services: flags.compose_services.clone(),
        });
        (
            Contract::EarthBuild,
            root,
            flags.cache_data,
            flags.flock_acquired,
            flags.load_files.clone(),
            compose,
        )
    } else if flags.any {
        return Err(Error::usage(
                "--data-root=DIR is missing: EarthBuild passes it with the other flags; give it, or use Earthly's EARTHLY_DOCKERD_DATA_ROOT without flags",
            ));
    } else {
        let root = vars.raw("EARTHLY_DOCKERD_DATA_ROOT").ok_or_else(|| {
                Error::usage(
                    "EARTHLY_DOCKERD_DATA_ROOT is not set (and no --data-root flag): Earthly sets it to /var/earthly/dind/<id>; set it when running the wrapper by hand",
                )
            })?;
        let compose =
            (vars.raw("EARTHLY_START_COMPOSE").as_deref() == Some("true")).then(|| Compose {
                files: words(vars.raw("EARTHLY_COMPOSE_FILES")),
                services: words(vars.raw("EARTHLY_COMPOSE_SERVICES")),
            });
        (
            Contract::Earthly,
            root,
            vars.raw("EARTHLY_DOCKERD_CACHE_DATA").as_deref() == Some("true"),
            vars.raw("EARTHLY_FLOCK_AQUIRED").is_some(),
            words(vars.raw("EARTHLY_DOCKER_LOAD_FILES")),
            compose,
        )
    };
    if command.is_empty() {
        return Err(Error::usage("`execute` needs a command to run"));
    }
    let warn = (contract == Contract::EarthBuild).then_some(&mut warnings);
    let registry = registry_entries(
        vars.user("DOCKER_LOAD_REGISTRY", warn)
            .as_deref()
            .unwrap_or(""),
        &vars.registry(),
    )?;
    Ok(Invocation::Execute(Execute {
        contract,
        data_root: PathBuf::from(data_root),
        cached,
        flock_acquired,
        load_files: load_files.into_iter().map(PathBuf::from).collect(),
        registry,
        compose,
        command,
        warnings,
    }))
}

fn parse_compose_config(args: &[OsString], vars: &Vars) -> Result<Invocation> {
    let (flags, _) = match parse_flags(args) {
        Ok(v) => v,
        Err(m) => return Ok(Invocation::VersionMismatch(m)),
    };
    let (contract, files) = if flags.compose_files.is_empty() && !flags.any {
        (Contract::Earthly, words(vars.raw("EARTHLY_COMPOSE_FILES")))
    } else {
        (Contract::EarthBuild, flags.compose_files)
    };
    if files.is_empty() {
        return Err(Error::usage(
            "no compose file to merge: give --compose-file=F (EarthBuild) or EARTHLY_COMPOSE_FILES (Earthly)",
        ));
    }
    Ok(Invocation::ComposeConfig(ComposeConfig { contract, files }))
}

/// Parses the registry variable: space-separated `REF|USER_TAG` entries, or (before Earthly
/// 0.6.21) `REF` alone, whose user tag is the part after the first `/`. Each pulls
/// `<registry>/REF`.
pub fn registry_entries(value: &str, registry: &str) -> Result<Vec<RegistryLoad>> {
    value
        .split_whitespace()
        .map(|entry| {
            let (reference, tag) = match entry.split_once('|') {
                Some((r, t)) => (r, t.to_string()),
                None => (
                    entry,
                    entry.split_once('/').map(|(_, t)| t).unwrap_or("").to_string(),
                ),
            };
            if reference.is_empty() || tag.is_empty() {
                return Err(Error::usage(format!(
                    "EARTH(LY)_DOCKER_LOAD_REGISTRY entry {entry:?} is neither REF|TAG nor REPO/NAME: the CLI and the buildkitd image may be different versions"
                )));
            }
            Ok(RegistryLoad {
                pull: format!("{registry}/{reference}"),
                tag,
            })
        })
        .collect()
}

/// Environment the command runs with, beyond `DOCKER_HOST`: both contracts' markers (each CLI
/// reads its own; the other is harmless), the data root the caller chose, and compose's
/// variables when compose was started.
pub fn command_env(data_root: &Path, compose_started: bool) -> Vec<(String, String)> {
    let mut env = vec![
        ("EARTHLY_WITH_DOCKER".to_string(), "1".to_string()),
        ("EARTH_WITH_DOCKER".to_string(), "1".to_string()),
        (
            "EARTH_DOCKERD_DATA_ROOT".to_string(),
            data_root.display().to_string(),
        ),
    ];
    if compose_started {
        env.extend(
            COMPOSE_ENV
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
    }
    env
}

/// `EARTH(LY)_DOCKER_WRAPPER_DEBUG=1`: a `+ cachelock: ...` line on stderr per step (the
/// wrapper's `set -x`, in words).
#[derive(Debug, Clone, Copy)]
pub struct Trace(pub bool);

impl Trace {
    /// Prints one step when tracing.
    pub fn step(&self, what: std::fmt::Arguments) {
        if self.0 {
            eprintln!("+ cachelock: {what}");
        }
    }
}

/// On cgroup v2 at the root of a container's cgroup namespace, moves every process into a
/// child cgroup `dockerd-wrapper`, so that the root stays a "domain" and nested dockerd or
/// systemd can delegate (as Earthly's wrapper does). Best effort: failures are only logged.
pub fn isolate_cgroup_v2(trace: Trace) {
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
    trace.step(format_args!("moved processes into {}", child.display()));
}

/// On WSL with nf_tables iptables, points `<sbin>/iptables` at `iptables-legacy`, as Earthly's
/// wrapper does (dockerd's networking fails with iptables-nft there). `kernel` is `uname -a`'s
/// text, `iptables_version` the output of `iptables --version`. Returns whether it switched.
pub fn wsl_iptables_legacy(kernel: &str, iptables_version: &str, sbin: &Path) -> Result<bool> {
    if !kernel.contains("microsoft-standard-WSL") || !iptables_version.contains("nf_tables") {
        return Ok(false);
    }
    let link = sbin.join("iptables");
    let tmp = sbin.join(".iptables.cachelock");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(sbin.join("iptables-legacy"), &tmp)
        .and_then(|()| std::fs::rename(&tmp, &link))
        .map_err(|e| Error::io(format!("pointing {} at iptables-legacy", link.display()), e))?;
    Ok(true)
}

/// `uname -a`'s fields (sysname, nodename, release, version, machine), for the WSL check.
pub fn uname() -> String {
    crate::sys::uname_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars_of(table: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let table: Vec<(String, String)> = table
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |n| table.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone())
    }

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    fn execute(a: &[&str], table: &[(&str, &str)]) -> Execute {
        let get = vars_of(table);
        match parse(&args(a), &Vars::new(&get)).unwrap() {
            Invocation::Execute(e) => e,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn earthly_environment_protocol() {
        // As Earthly's makeWithDockerdWrapFun sets it (every variable quoted, some empty).
        let e = execute(
            &["execute", "/bin/sh", "-c", "docker ps"],
            &[
                ("EARTHLY_DOCKERD_DATA_ROOT", "/var/earthly/dind/cache_x"),
                ("EARTHLY_DOCKERD_CACHE_DATA", "true"),
                ("EARTHLY_DOCKER_LOAD_FILES", ""),
                ("EARTHLY_IMAGES_WITH_DIGESTS", "a@sha256:1"),
                ("EARTHLY_START_COMPOSE", "true"),
                ("EARTHLY_COMPOSE_FILES", "a.yml b.yml"),
                ("EARTHLY_COMPOSE_SERVICES", "db"),
                ("EARTHLY_DOCKER_LOAD_REGISTRY", "sess/app:1|app:dev"),
            ],
        );
        assert_eq!(e.contract, Contract::Earthly);
        assert_eq!(e.data_root, Path::new("/var/earthly/dind/cache_x"));
        assert!(e.cached && !e.flock_acquired);
        assert!(e.load_files.is_empty());
        assert_eq!(
            e.compose,
            Some(Compose {
                files: vec!["a.yml".into(), "b.yml".into()],
                services: vec!["db".into()]
            })
        );
        assert_eq!(
            e.registry,
            vec![RegistryLoad {
                pull: "172.30.0.1:8371/sess/app:1".into(),
                tag: "app:dev".into()
            }]
        );
        assert_eq!(e.command, args(&["/bin/sh", "-c", "docker ps"]));
        assert!(e.warnings.is_empty(), "{:?}", e.warnings);
    }

    #[test]
    fn earthbuild_flags() {
        let e = execute(
            &[
                "execute",
                "--data-root=/var/earthbuild/dind/cache_y",
                "--cache-data",
                "--load-file=/tmp/a.tar",
                "--load-file=/tmp/b.tar",
                "--image-digest=x@sha256:2",
                "--start-compose",
                "--compose-file=c.yml",
                "--compose-service=web",
                "--",
                "/bin/sh",
                "-c",
                "--not-a-flag",
            ],
            &[
                ("EARTHLY_DOCKER_LOAD_REGISTRY", "old/img:1"),
                // Flags win over the old protocol's variables.
                ("EARTHLY_DOCKERD_DATA_ROOT", "/elsewhere"),
            ],
        );
        assert_eq!(e.contract, Contract::EarthBuild);
        assert_eq!(e.data_root, Path::new("/var/earthbuild/dind/cache_y"));
        assert!(e.cached);
        assert_eq!(
            e.load_files,
            vec![PathBuf::from("/tmp/a.tar"), PathBuf::from("/tmp/b.tar")]
        );
        assert_eq!(
            e.compose,
            Some(Compose {
                files: vec!["c.yml".into()],
                services: vec!["web".into()]
            })
        );
        // Old registry format: the user tag is what follows the first '/'.
        assert_eq!(e.registry[0].tag, "img:1");
        assert_eq!(e.registry[0].pull, "172.30.0.1:8371/old/img:1");
        assert_eq!(e.command, args(&["/bin/sh", "-c", "--not-a-flag"]));
        assert_eq!(
            e.warnings,
            vec!["EARTHLY_DOCKER_LOAD_REGISTRY is deprecated; use EARTH_DOCKER_LOAD_REGISTRY"]
        );
    }

    #[test]
    fn earth_variables_come_first_and_registry_is_overridable() {
        let e = execute(
            &["execute", "--data-root=/r", "--flock-acquired", "true"],
            &[
                ("EARTH_DOCKER_LOAD_REGISTRY", "a/b:1|b:1 c/d/e:2"),
                ("EARTHLY_DOCKER_LOAD_REGISTRY", "ignored/x:1"),
                (REGISTRY_VAR, "127.0.0.1:5000"),
            ],
        );
        assert!(e.flock_acquired && !e.cached);
        assert_eq!(
            e.registry,
            vec![
                RegistryLoad {
                    pull: "127.0.0.1:5000/a/b:1".into(),
                    tag: "b:1".into()
                },
                RegistryLoad {
                    pull: "127.0.0.1:5000/c/d/e:2".into(),
                    tag: "d/e:2".into()
                }
            ]
        );
        assert!(e.warnings.is_empty());
        assert_eq!(e.command, args(&["true"]));
        let get = vars_of(&[
            ("EARTH_DOCKER_WRAPPER_DEBUG", "1"),
            ("EARTHLY_DOCKER_WRAPPER_DEBUG_CMD", "ls"),
        ]);
        let v = Vars::new(&get);
        assert!(v.debug());
        assert_eq!(v.debug_cmd().as_deref(), Some("ls"));
        assert_eq!(v.pre_script(), PRE_SCRIPT);
    }

    #[test]
    fn unknown_option_is_a_version_mismatch() {
        let get = vars_of(&[]);
        for a in [
            &["execute", "--data-root=/r", "--new-flag", "--", "true"][..],
            &["get-compose-config", "--compose-file=a.yml", "--frob"][..],
        ] {
            match parse(&args(a), &Vars::new(&get)).unwrap() {
                Invocation::VersionMismatch(m) => {
                    assert!(m.contains("different versions"), "{m}")
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn bad_input_is_a_usage_error() {
        let get = vars_of(&[("EARTHLY_DOCKERD_DATA_ROOT", "/r")]);
        let v = Vars::new(&get);
        for (a, needle) in [
            (&["execute"][..], "needs a command"),
            (
                &["execute", "--cache-data", "--", "true"][..],
                "--data-root",
            ),
            (&["frob"][..], "unknown sub-command"),
            (&["get-compose-config"][..], "no compose file"),
        ] {
            let e = parse(&args(a), &v).unwrap_err();
            assert_eq!(e.exit_code(), 64, "{a:?}");
            assert!(e.to_string().contains(needle), "{a:?}: {e}");
        }
        let e = registry_entries("noslash", DEFAULT_REGISTRY).unwrap_err();
        assert!(e.to_string().contains("noslash"), "{e}");
        assert!(registry_entries("a|", DEFAULT_REGISTRY).is_err());
        assert!(registry_entries("  ", DEFAULT_REGISTRY).unwrap().is_empty());
    }

    #[test]
    fn compose_config_both_contracts() {
        let get = vars_of(&[("EARTHLY_COMPOSE_FILES", "x.yml y.yml")]);
        let v = Vars::new(&get);
        match parse(&args(&["get-compose-config"]), &v).unwrap() {
            Invocation::ComposeConfig(c) => {
                assert_eq!(c.contract, Contract::Earthly);
                assert_eq!(c.files, vec!["x.yml", "y.yml"]);
                assert_eq!(
                    c.contract.compose_config_path(),
                    "/tmp/earthly/compose-config.yml"
                );
            }
            other => panic!("{other:?}"),
        }
        let a = args(&[
            "get-compose-config",
            "--start-compose",
            "--compose-file=z.yml",
            "--compose-service=s",
        ]);
        match parse(&a, &v).unwrap() {
            Invocation::ComposeConfig(c) => {
                assert_eq!(c.contract, Contract::EarthBuild);
                assert_eq!(c.files, vec!["z.yml"]);
                assert_eq!(
                    c.contract.compose_config_path(),
                    "/tmp/earthbuild/compose-config.yml"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn daemon_json_and_command_env() {
        let d = Contract::EarthBuild.daemon_json("r:1");
        assert_eq!(d["features"]["containerd-snapshotter"], json!(false));
        assert_eq!(d["insecure-registries"], json!(["r:1"]));
        assert!(Contract::Earthly
            .daemon_json("r:1")
            .get("features")
            .is_none());
        let env = command_env(Path::new("/d"), true);
        for (k, v) in [
            ("EARTHLY_WITH_DOCKER", "1"),
            ("EARTH_WITH_DOCKER", "1"),
            ("EARTH_DOCKERD_DATA_ROOT", "/d"),
            ("COMPOSE_PROJECT_NAME", "default"),
            ("COMPOSE_HTTP_TIMEOUT", "600"),
        ] {
            assert!(env.contains(&(k.to_string(), v.to_string())), "{k}");
        }
        assert!(!command_env(Path::new("/d"), false)
            .iter()
            .any(|(k, _)| k.starts_with("COMPOSE")));
    }

    #[test]
    fn wsl_switches_to_iptables_legacy_only_on_wsl_with_nft() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("iptables"), "nft").unwrap();
        let nft = "iptables v1.8.9 (nf_tables)";
        assert!(!wsl_iptables_legacy("Linux h 6.1.0-18-amd64 #1 SMP", nft, t.path()).unwrap());
        assert!(!wsl_iptables_legacy(
            "Linux h 5.15.146.1-microsoft-standard-WSL2",
            "iptables v1.8.9 (legacy)",
            t.path()
        )
        .unwrap());
        assert!(std::fs::symlink_metadata(t.path().join("iptables"))
            .unwrap()
            .is_file());
        assert!(wsl_iptables_legacy(
            "Linux h 5.15.146.1-microsoft-standard-WSL2 #1 SMP x86_64",
            nft,
            t.path()
        )
        .unwrap());
        assert_eq!(
            std::fs::read_link(t.path().join("iptables")).unwrap(),
            t.path().join("iptables-legacy")
        );
        assert!(!uname().is_empty());
    }
}
