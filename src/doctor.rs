//! `cachelock doctor`: checks a host and says what to fix, one [`Finding`] per line.
//!
//! Every check only looks: nothing is created, locked, compiled into a cache or written
//! (policies are compiled in memory, see [`CacheDirs::read_only`](crate::policy::cache::CacheDirs::read_only)).
//! What would make a request fail or be unsafe is an [`Level::Error`] (the command exits 1);
//! what only costs time — a cold compile cache, a lock directory where waiters poll, dockerd
//! missing on a host with no cache root — is a [`Level::Warning`].
//!
//! Facts are gathered apart from the judgement ([`DirFacts`] then [`lock_dir`], [`cache_root`]):
//! the judgements are functions of what was read, tested without root or real mounts.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{Loaded, WaitMode};
use crate::sys::{self, EntryKind, FsInfo};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// As it should be.
    Ok,
    /// Works, but costs time (or works only for some users).
    Warning,
    /// A request would fail, or be unsafe.
    Error,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// Which check: `lock_dir`, `config`, `policy`, `compile_cache`, `dockerd`, `cache_root`,
    /// `network`, `etcd`.
    pub check: &'static str,
    /// How bad.
    pub level: Level,
    /// What was checked: a path, a policy name, an endpoint.
    pub subject: String,
    /// What was found, and what it means.
    pub message: String,
    /// What to do about it, for warnings and errors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    /// A finding of `check` about `subject`.
    pub fn new(
        check: &'static str,
        level: Level,
        subject: impl Into<String>,
        message: String,
    ) -> Self {
        Finding {
            check,
            level,
            subject: subject.into(),
            message,
            fix: None,
        }
    }

    /// An [`Level::Ok`] finding.
    pub fn ok(check: &'static str, subject: impl Into<String>, message: String) -> Self {
        Self::new(check, Level::Ok, subject, message)
    }

    /// A [`Level::Warning`].
    pub fn warn(check: &'static str, subject: impl Into<String>, message: String) -> Self {
        Self::new(check, Level::Warning, subject, message)
    }

    /// An [`Level::Error`].
    pub fn error(check: &'static str, subject: impl Into<String>, message: String) -> Self {
        Self::new(check, Level::Error, subject, message)
    }

    /// With what to do about it.
    pub fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }

    /// The line people read: `error   lock directory /x: ... (fix: ...)`.
    pub fn line(&self) -> String {
        let level = match self.level {
            Level::Ok => "ok",
            Level::Warning => "warning",
            Level::Error => "error",
        };
        let what = match self.check {
            "lock_dir" => "lock directory",
            "config" => "configuration",
            "compile_cache" => "compile cache",
            "cache_root" => "cache root",
            other => other,
        };
        let text = format!("{what} {}: {}", self.subject, self.message);
        let text = crate::output::escape(&text);
        match &self.fix {
            Some(f) => format!("{level:<8}{text} (fix: {})", crate::output::escape(f)),
            None => format!("{level:<8}{text}"),
        }
    }
}

/// Every finding of one run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// In the order checked.
    pub checks: Vec<Finding>,
}

impl Report {
    /// Adds findings.
    pub fn extend(&mut self, f: impl IntoIterator<Item = Finding>) {
        self.checks.extend(f);
    }

    /// How many findings have `level`.
    pub fn count(&self, level: Level) -> usize {
        self.checks.iter().filter(|f| f.level == level).count()
    }

    /// One line per finding, then a summary line.
    pub fn render_text(&self) -> String {
        let mut s: String = self.checks.iter().map(|f| f.line() + "\n").collect();
        s.push_str(&format!(
            "{} error(s), {} warning(s)\n",
            self.count(Level::Error),
            self.count(Level::Warning)
        ));
        s
    }

    /// `{"ok": bool, "errors": N, "warnings": N, "checks": [{check, level, subject, message,
    /// fix?}]}`.
    pub fn render_json(&self) -> String {
        let doc = serde_json::json!({
            "ok": self.count(Level::Error) == 0,
            "errors": self.count(Level::Error),
            "warnings": self.count(Level::Warning),
            "checks": self.checks,
        });
        serde_json::to_string_pretty(&doc).expect("the report serializes") + "\n"
    }
}

/// What is at a directory's path, read without changing anything.
#[derive(Debug, Clone)]
pub struct DirFacts {
    /// The path.
    pub path: PathBuf,
    /// What is there (a symlink is followed: `link_target` says it was one).
    pub entry: Entry,
    /// The target, when the path itself is a symbolic link.
    pub link_target: Option<PathBuf>,
    /// Whether the caller may create and remove entries in it.
    pub writable: bool,
    /// Its filesystem (of the nearest existing ancestor when it is missing).
    pub fs: Option<FsInfo>,
    /// Whether the caller could create it (its nearest existing ancestor is writable).
    pub creatable: bool,
    /// The caller's effective uid.
    pub caller: u32,
}

/// What a path holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Nothing.
    Missing,
    /// Something that is not a directory.
    NotDir,
    /// A directory with this owner and these permission bits.
    Dir {
        /// Owner.
        uid: u32,
        /// Permission bits, sticky bit included.
        mode: u32,
    },
}

impl DirFacts {
    /// Reads what is at `path`.
    pub fn read(path: &Path) -> DirFacts {
        let link_target = sys::info_path(path)
            .ok()
            .filter(|i| i.kind == EntryKind::Symlink)
            .and_then(|_| std::fs::read_link(path).ok());
        let entry = match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => {
                use std::os::unix::fs::MetadataExt;
                Entry::Dir {
                    uid: m.uid(),
                    mode: m.mode() & 0o7777,
                }
            }
            Ok(_) => Entry::NotDir,
            Err(_) => Entry::Missing,
        };
        let existing = path
            .ancestors()
            .find(|a| a.exists())
            .unwrap_or(Path::new("/"));
        DirFacts {
            path: path.to_path_buf(),
            entry,
            link_target,
            writable: entry != Entry::Missing && sys::can_write_dir(path),
            fs: sys::fs_info(existing).ok(),
            creatable: sys::can_write_dir(existing),
            caller: sys::euid(),
        }
    }
}

/// Whose lock directory it is: the host's shared default, or one the configuration names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirRole {
    /// `/var/lib/cachelock`, shared by every user (mode 1777, root's).
    SystemDefault,
    /// `--lock-dir`, `CACHELOCK_LOCK_DIR`, `lock_dir:` or a `file://` backend.
    Configured,
}

const STICKY: u32 = 0o1000;

/// Judges a lock directory: existence, owner, mode and sticky bit, who can use it, and its
/// filesystem (where waiters must poll, and what that costs). `wait_mode` is the configured
/// one, if any.
pub fn lock_dir(f: &DirFacts, role: DirRole, wait_mode: Option<WaitMode>) -> Vec<Finding> {
    const C: &str = "lock_dir";
    let p = f.path.display().to_string();
    let mut out = Vec::new();
    if let Some(t) = &f.link_target {
        out.push(Finding::ok(
            C,
            &p,
            format!(
                "is a symbolic link to {}; the checks below are of its target",
                t.display()
            ),
        ));
    }
    let private = "your runs would use a private lock directory, whose locks exclude nobody else's";
    match (f.entry, role) {
        (Entry::NotDir, _) => out.push(
            Finding::error(C, &p, "exists and is not a directory: every run fails (exit 73)".into())
                .fix("remove it, or choose another lock directory (--lock-dir, `lock_dir:`)"),
        ),
        (Entry::Missing, DirRole::SystemDefault) if f.caller == 0 => out.push(
            Finding::warn(
                C,
                &p,
                "does not exist yet: root's first run creates it (mode 1777); until then other users' runs fall back to private lock directories that exclude nobody else's".into(),
            )
            .fix(format!("install -d -m 1777 {p}, as the Debian package does at install and boot")),
        ),
        (Entry::Missing, DirRole::SystemDefault) => out.push(
            Finding::error(C, &p, format!("does not exist and uid {} cannot create it: {private}", f.caller))
                .fix(format!("as root: install -d -m 1777 {p}")),
        ),
        (Entry::Missing, DirRole::Configured) if f.creatable => out.push(Finding::warn(
            C,
            &p,
            "does not exist yet: the first run creates it".into(),
        )),
        (Entry::Missing, DirRole::Configured) => out.push(
            Finding::error(
                C,
                &p,
                format!("does not exist and uid {} cannot create it: every run fails (exit 73)", f.caller),
            )
            .fix("create it (mode 1777 to share it between users), or choose another"),
        ),
        (Entry::Dir { uid, mode }, role) => out.extend(judge_dir(f, role, uid, mode)),
    }
    if let Some(fs) = &f.fs {
        out.push(filesystem(f, fs, wait_mode));
    }
    out
}

fn judge_dir(f: &DirFacts, role: DirRole, uid: u32, mode: u32) -> Vec<Finding> {
    const C: &str = "lock_dir";
    let p = f.path.display().to_string();
    let mut out = Vec::new();
    let others_write = mode & 0o022 != 0;
    let foreign_owner = match role {
        DirRole::SystemDefault => uid != 0,
        DirRole::Configured => uid != 0 && uid != f.caller,
    };
    if foreign_owner && others_write {
        out.push(
            Finding::error(
                C,
                &p,
                format!("is owned by uid {uid}, who can change its mode or remove every other user's lock files and tickets in it, whatever the sticky bit"),
            )
            .fix(format!("chown root:root {p}")),
        );
    }
    if others_write && mode & STICKY == 0 {
        out.push(
            Finding::error(
                C,
                &p,
                format!("mode {mode:04o} lets other users write into it without the sticky bit: any of them can remove or rename another user's lock files and tickets, and break the lock's exclusion"),
            )
            .fix(format!("chmod +t {p}")),
        );
    }
    if !f.writable {
        let message = match role {
            DirRole::SystemDefault => format!(
                "uid {} cannot create entries in it (owner uid {uid}, mode {mode:04o}): {}",
                f.caller,
                "your runs would use a private lock directory, whose locks exclude nobody else's"
            ),
            DirRole::Configured => format!(
                "uid {} cannot create entries in it (owner uid {uid}, mode {mode:04o}): every run fails (exit 73)",
                f.caller
            ),
        };
        out.push(Finding::error(C, &p, message).fix(format!(
            "as root: chmod 1777 {p} to share it with every user (or 3770 and a group)"
        )));
    } else if role == DirRole::SystemDefault && mode & 0o002 == 0 {
        out.push(
            Finding::warn(
                C,
                &p,
                format!("mode {mode:04o}: only its owner{} can take locks here; other users' runs fall back to private lock directories that exclude nobody else's", if mode & 0o020 != 0 { " and group" } else { "" }),
            )
            .fix(format!("chmod 1777 {p} if other users run cachelock on this host")),
        );
    }
    if out.is_empty() {
        let sharing = if mode & 0o002 != 0 {
            "shared by every user, sticky"
        } else if mode & 0o020 != 0 {
            "shared by its group, sticky"
        } else {
            "its owner's only"
        };
        out.push(Finding::ok(
            C,
            &p,
            format!(
                "owner uid {uid}, mode {mode:04o} ({sharing}), writable by uid {}",
                f.caller
            ),
        ));
    }
    out
}

/// The filesystem line: read-only is an error; a network (or userspace) filesystem costs
/// hand-off time, which the line quantifies.
fn filesystem(f: &DirFacts, fs: &FsInfo, wait_mode: Option<WaitMode>) -> Finding {
    const C: &str = "lock_dir";
    let p = f.path.display().to_string();
    if fs.read_only {
        return Finding::error(
            C,
            &p,
            format!(
                "is on a read-only {} filesystem: every run fails (exit 73)",
                fs.name
            ),
        )
        .fix("choose a lock directory on a writable filesystem");
    }
    if !sys::is_network_magic(fs.magic) {
        return match wait_mode {
            Some(WaitMode::Poll) => Finding::warn(
                C,
                &p,
                format!("{}: a local filesystem, but `wait_mode: poll` makes waiters poll at the policy's interval instead of being woken at each release", fs.name),
            )
            .fix("remove `wait_mode: poll` (auto polls only where it must)"),
            _ => Finding::ok(C, &p, format!("{}: a local filesystem; waiters are woken by inotify at each release", fs.name)),
        };
    }
    let nfs = if fs.name.starts_with("nfs") {
        "; the NFS client emulates flock with POSIX locks (cachelock allows for it)"
    } else {
        ""
    };
    let meaning = format!(
        "{} is a network (or userspace) filesystem: inotify does not see changes made by other hosts, so waiters poll at the policy's interval (builtin:default: 20 ms per place in the queue, at most 1 s) and a hand-off can take that long{nfs}; arrivals from other hosts are seen only as fast as attribute caching allows",
        fs.name
    );
    match wait_mode {
        Some(WaitMode::Notify) => Finding::warn(
            C,
            &p,
            format!("{meaning}; `wait_mode: notify` waits for inotify events that other hosts' releases never send, so waiters wake only at the timed fallback"),
        )
        .fix("use `wait_mode: auto` (or poll) for this directory; mount it with short attribute caching (NFS: actimeo=1)"),
        _ => Finding::warn(C, &p, meaning).fix("mount it with short attribute caching (NFS: actimeo=1), or use a local directory if no other host shares it"),
    }
}

/// Loads the configuration as every command would: the finding, and the configuration when
/// it parses.
pub fn config(explicit: Option<&Path>) -> (Finding, Option<Loaded>) {
    const C: &str = "config";
    let named = explicit
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(crate::config::SYSTEM_CONFIG));
    match Loaded::load(explicit) {
        Ok(l) => {
            let f = match &l.path {
                Some(p) => Finding::ok(
                    C,
                    p.display().to_string(),
                    format!(
                        "parses: {} lock rule(s), {} policy definition(s){}",
                        l.config.locks.len(),
                        l.config.policies.len(),
                        if l.config.cache_root.is_some() {
                            ", a cache root"
                        } else {
                            ""
                        }
                    ),
                ),
                None => Finding::ok(
                    C,
                    named.display().to_string(),
                    "does not exist: every command runs on the built-in defaults".into(),
                ),
            };
            (f, Some(l))
        }
        Err(e) => (
            Finding::error(
                C,
                named.display().to_string(),
                format!("{e}: every command that reads it fails (exit 78)"),
            )
            .fix("correct what the message names"),
            None,
        ),
    }
}

/// The policy names the configuration uses, each once: `default_policy` (or `default`), each
/// rule's, then those defined under `policies:` that nothing binds; each with what it binds
/// (`binds locks ci-*`).
pub fn bindings(c: &crate::config::Config) -> Vec<(String, String)> {
    let fallback = c
        .default_policy
        .clone()
        .unwrap_or_else(|| crate::config::DEFAULT_POLICY.to_string());
    let mut out: Vec<(String, Vec<String>)> = vec![(fallback.clone(), Vec::new())];
    for r in &c.locks {
        let name = r.policy.clone().unwrap_or_else(|| fallback.clone());
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, pats)) => pats.push(r.pattern.clone()),
            None => out.push((name, vec![r.pattern.clone()])),
        }
    }
    for name in c.policies.keys() {
        if !out.iter().any(|(n, _)| n == name) {
            out.push((name.clone(), Vec::new()));
        }
    }
    out.into_iter()
        .map(|(name, pats)| {
            let mut what = Vec::new();
            if !pats.is_empty() {
                what.push(format!("locks {}", pats.join(", ")));
            }
            if name == fallback {
                what.push("locks no rule matches".to_string());
            }
            let bound = if what.is_empty() {
                "is bound by no rule: only requests that name it with --policy use it".to_string()
            } else {
                format!("binds {}", what.join(" and "))
            };
            (name, bound)
        })
        .collect()
}

/// What a policy binding turned out to be once loaded and verified.
#[cfg(feature = "wasm")]
#[derive(Debug, Clone)]
pub struct Binding {
    /// The module (`builtin:NAME` or a file).
    pub module: String,
    /// Hex sha256 of the module.
    pub sha256: String,
    /// Its size in bytes.
    pub size: usize,
    /// Whether the configuration pins the digest (and it matched).
    pub pinned: bool,
    /// Whether its compiled code came from a cache, and which tier.
    pub origin: crate::policy::cache::Origin,
    /// How long loading took (compiling included, when the cache was cold).
    pub load_time: std::time::Duration,
}

/// Checks one binding: the module is read, its pin verified, its world checked, it is
/// configured, and each decision is called once — compiling in memory, writing no cache.
/// `doctor`'s one way of checking a policy. Unlike `policy check` (the deploy step, which asks
/// the registry), an `oci://` module is judged as a run would load it: from what was pulled.
#[cfg(feature = "wasm")]
pub fn check_binding(loaded: &Loaded, name: &str) -> crate::error::Result<Binding> {
    let started = std::time::Instant::now();
    let mut spec = crate::policy::spec::resolve(loaded, name, &[])?;
    spec.cache = spec.cache.read_only();
    let mut p = crate::policy::host::WasmPolicy::load(&spec)?;
    crate::policy::sample_answers(&mut p)?;
    let info = p.info();
    Ok(Binding {
        module: spec.source.to_string(),
        sha256: info.sha256.clone(),
        size: info.size,
        pinned: spec.sha256.is_some(),
        origin: info.origin,
        load_time: started.elapsed(),
    })
}

/// Every policy binding (see [`bindings`]), loaded and verified, and whether its compiled
/// code is waiting in a compile cache.
#[cfg(feature = "wasm")]
pub fn policies(loaded: &Loaded) -> Vec<Finding> {
    use crate::policy::cache::Origin;
    let mut out = Vec::new();
    for (name, bound) in bindings(&loaded.config) {
        let b = match check_binding(loaded, &name) {
            Ok(b) => b,
            Err(e) => {
                out.push(
                    Finding::error(
                        "policy",
                        &name,
                        format!("{e}; it {bound}: contended requests that use it fail (exit 78)"),
                    )
                    .fix(format!(
                        "correct the policy, then `cachelock policy check {name}`"
                    )),
                );
                continue;
            }
        };
        out.push(Finding::ok(
            "policy",
            &name,
            format!(
                "{} ({} bytes, sha256:{}{}) loads, configures and answers each decision; it {bound}",
                b.module,
                b.size,
                b.sha256,
                if b.pinned { ", pin matches" } else { "" }
            ),
        ));
        let deploy = format!("as root at deploy: cachelock policy check {name}");
        out.push(match b.origin {
            Origin::Cached => Finding::ok(
                "compile_cache",
                &name,
                "warm: its optimized code is in a trusted compile cache".into(),
            ),
            Origin::CachedQuick => Finding::warn(
                "compile_cache",
                &name,
                "only its quickly compiled code is cached: the next contended run compiles the optimized code in the background".into(),
            )
            .fix(deploy),
            Origin::Compiled => Finding::warn(
                "compile_cache",
                &name,
                format!(
                    "cold: nothing is compiled yet, so each user's first contended run compiles it ({:.2} s here, and again in the background)",
                    b.load_time.as_secs_f64()
                ),
            )
            .fix(deploy),
        });
    }
    out
}

/// The compile caches this caller reads: the host's (root writes it, everyone reads it) and
/// the caller's own. A cache that fails the trust rules is ignored by every load.
#[cfg(feature = "wasm")]
pub fn compile_caches(loaded: &Loaded) -> Vec<Finding> {
    const C: &str = "compile_cache";
    let dirs = crate::policy::spec::cache_dirs(loaded);
    let mut out = Vec::new();
    let mut look = |dir: &Path, host: bool| {
        let p = dir.display().to_string();
        let role = if host {
            "the host's cache, read by every user"
        } else {
            "your own cache"
        };
        out.push(match crate::policy::trust::open_dir(dir, false, 0) {
            Ok(d) => Finding::ok(
                C,
                &p,
                format!("trusted ({role}): owner uid {}, writable by nobody else", d.owner),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && host => Finding::warn(
                C,
                &p,
                "does not exist: no policy is compiled for every user, so each user compiles them into their own cache on a first contended run".into(),
            )
            .fix("as root at deploy: cachelock policy check NAME, for each policy (creates it)"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Finding::ok(
                C,
                &p,
                format!("does not exist yet ({role}): created by the first compile"),
            ),
            Err(e) => Finding::error(
                C,
                &p,
                format!("{e}: cachelock ignores it ({role}), so every process compiles its policies (up to the compile budget each), and another user may be able to put native code where root's deploy step writes"),
            )
            .fix(format!("make it and every directory above it owned by root (or you) and not writable by group or others: chown root:root {p}; chmod go-w {p}")),
        });
    };
    look(&dirs.host, true);
    if let Some(own) = dirs.own.as_deref().filter(|o| *o != dirs.host) {
        look(own, false);
    }
    out
}

/// A directory's owner and mode are someone else's business: anyone but root or the caller,
/// or group and others, may write there.
fn foreign(f: &DirFacts, uid: u32, mode: u32) -> Option<String> {
    if uid != 0 && uid != f.caller {
        Some(format!("is owned by uid {uid}"))
    } else if mode & 0o022 != 0 {
        Some(format!(
            "mode {mode:04o} lets group or others write into it"
        ))
    } else {
        None
    }
}

/// statfs magic of overlayfs: dockerd's overlay2 driver cannot stack on it.
const OVERLAY_MAGIC: u64 = 0x794C_7630;

/// Judges a cache root (the parent of dockerd data roots, written by root): it must be root's
/// (or the caller's) alone — another user who can write there can plant links where root
/// writes and removes — writable, and on a filesystem dockerd's overlay2 driver can use.
pub fn cache_root(f: &DirFacts) -> Vec<Finding> {
    const C: &str = "cache_root";
    let p = f.path.display().to_string();
    let mut out = Vec::new();
    if f.link_target.is_some() {
        out.push(
            Finding::error(C, &p, "is a symbolic link: runs refuse it (exit 73)".into()).fix(
                "give the real directory (--cache-root, CACHELOCK_CACHE_ROOT or `cache_root`)",
            ),
        );
    }
    match f.entry {
        Entry::NotDir => out.push(
            Finding::error(
                C,
                &p,
                "exists and is not a directory: runs fail (exit 73)".into(),
            )
            .fix("remove it, or choose another cache root"),
        ),
        Entry::Missing if f.creatable => out.push(Finding::warn(
            C,
            &p,
            "does not exist yet: the first run creates it".into(),
        )),
        Entry::Missing => out.push(
            Finding::error(
                C,
                &p,
                format!(
                    "does not exist and uid {} cannot create it: runs fail (exit 73)",
                    f.caller
                ),
            )
            .fix(format!("as root: install -d -m 0755 {p}")),
        ),
        Entry::Dir { uid, mode } => {
            if let Some(why) = foreign(f, uid, mode) {
                out.push(
                    Finding::error(
                        C,
                        &p,
                        format!("{why}: another user could plant links where root's runs write and remove data roots"),
                    )
                    .fix(format!("chown root:root {p}; chmod 0755 {p}")),
                );
            }
            if !f.writable {
                out.push(
                    Finding::error(
                        C,
                        &p,
                        format!("is not writable by uid {} (owner uid {uid}, mode {mode:04o}): runs fail (exit 77)", f.caller),
                    )
                    .fix("run as root, or choose a cache root you own"),
                );
            }
            if out.is_empty() {
                out.push(Finding::ok(
                    C,
                    &p,
                    format!("owner uid {uid}, mode {mode:04o}, writable by nobody else"),
                ));
            }
        }
    }
    if let Some(fs) = &f.fs {
        out.push(if fs.read_only {
            Finding::error(C, &p, format!("is on a read-only {} filesystem: runs fail", fs.name))
                .fix("choose a cache root on a writable local filesystem")
        } else if fs.magic == OVERLAY_MAGIC || sys::is_network_magic(fs.magic) {
            Finding::warn(
                C,
                &p,
                format!("{}: dockerd's overlay2 storage driver cannot use it and falls back to vfs, which copies every layer in full (slow and large)", fs.name),
            )
            .fix("put the cache root on a local filesystem such as ext4 or xfs (in a container: a volume)")
        } else {
            Finding::ok(C, &p, format!("{}: overlay2 can use it", fs.name))
        });
    }
    out
}

/// The dockerd prerequisites. With a cache root configured (`cache_root`, `--cache-root`),
/// this host runs dockerd: every missing part is an error. Without one, dockerd missing is
/// only a warning (nothing else needs it).
pub fn dockerd(loaded: &Loaded, cache_root_configured: Option<&Path>) -> Vec<Finding> {
    use crate::dockerd::{daemon::find_binary, daemon_json, network, setup};
    const C: &str = "dockerd";
    let c = &loaded.config.dockerd;
    let binary = match &c.binary {
        Some(b) if b.components().count() > 1 => loaded.resolve_path(b),
        Some(b) => b.clone(),
        None => PathBuf::from("dockerd"),
    };
    let Some(root) = cache_root_configured else {
        return vec![match find_binary(&binary) {
            Some(p) => Finding::ok(
                C,
                p.display().to_string(),
                "installed (no cache root configured: the dockerd checks stop here)".into(),
            ),
            None => Finding::warn(
                C,
                binary.display().to_string(),
                "not installed: `cachelock dockerd` and the Earthly drop-in cannot run on this host (nothing else needs it)".into(),
            )
            .fix("apt-get install docker.io, if this host is to run them"),
        }];
    };
    let mut out = Vec::new();
    let mut need = |name: &Path, why: &str, fix: &str| {
        out.push(match find_binary(name) {
            Some(p) => Finding::ok(C, p.display().to_string(), format!("found ({why})")),
            None => Finding::error(
                C,
                name.display().to_string(),
                format!("not found, or not executable ({why}): cached runs fail (exit 69)"),
            )
            .fix(fix),
        });
    };
    need(
        &binary,
        "the daemon",
        "apt-get install docker.io, or set `dockerd.binary`",
    );
    need(
        Path::new("containerd"),
        "dockerd starts it",
        "apt-get install containerd (docker.io depends on it)",
    );
    let cli = c
        .docker_cli
        .clone()
        .unwrap_or_else(|| PathBuf::from("docker"));
    need(
        &cli,
        "the docker CLI: loads and cache hygiene",
        "apt-get install docker.io (or docker-cli), or set `dockerd.docker_cli`",
    );
    let mode = match c.network.as_deref().map(network::Mode::parse) {
        None => Some(setup::Defaults::DOCKERD.network),
        Some(Ok(m)) => Some(m),
        Some(Err(e)) => {
            out.push(Finding::error(
                "network",
                "dockerd.network",
                format!("{e}: runs fail (exit 78)"),
            ));
            None
        }
    };
    if let Some(mode) = mode {
        out.extend(network_needs(loaded, mode));
    }
    let run_dir = c
        .run_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(setup::DEFAULT_RUN_DIR));
    let longest = run_dir.as_os_str().len() + "/12345678/x/containerd/containerd.sock".len();
    if longest > 107 {
        out.push(
            Finding::error(
                C,
                run_dir.display().to_string(),
                "`dockerd.run_dir` is too long: dockerd's sockets under it would exceed the 107-byte unix socket limit; runs fail (exit 78)".into(),
            )
            .fix("use a short path such as /run/cachelock"),
        );
    }
    let daemon_json = c
        .daemon_json_file
        .as_deref()
        .map(|p| loaded.resolve_path(p))
        .or_else(|| Some(PathBuf::from("/etc/docker/daemon.json")).filter(|p| p.exists()));
    if let Some(p) = daemon_json {
        out.push(match daemon_json::read_user_file(&p) {
            Ok(_) => Finding::ok(
                C,
                p.display().to_string(),
                "daemon.json parses; merged into every instance's".into(),
            ),
            Err(e) => Finding::error(
                C,
                p.display().to_string(),
                format!("{e}: runs fail (exit 78)"),
            ),
        });
    }
    if sys::euid() != 0 {
        out.push(Finding::warn(
            C,
            "privileges",
            format!("doctor runs as uid {}: dockerd runs as root, so some of these checks may differ for root", sys::euid()),
        ).fix("run `cachelock doctor` as root on hosts that run dockerd"));
    }
    out.extend(cache_root(&DirFacts::read(root)));
    out
}

/// What a network mode needs of the host (see `dockerd::network`).
fn network_needs(loaded: &Loaded, mode: crate::dockerd::network::Mode) -> Vec<Finding> {
    use crate::dockerd::{daemon::find_binary, network};
    const C: &str = "network";
    let mut out = Vec::new();
    let tools: &[(&str, &str)] = match mode {
        network::Mode::Netns => &[
            ("ip", "netns mode: each instance's veth uplink (apt-get install iproute2)"),
            ("iptables", "netns mode: the uplink's NAT rule, and dockerd's own networking inside the namespace (apt-get install iptables)"),
        ],
        network::Mode::Default => &[(
            "iptables",
            "default mode: dockerd's own networking (apt-get install iptables)",
        )],
        network::Mode::None => &[],
    };
    for (tool, why) in tools {
        out.push(match find_binary(Path::new(tool)) {
            Some(p) => Finding::ok(
                C,
                p.display().to_string(),
                format!("found ({})", why.split(" (apt").next().unwrap_or(why)),
            ),
            None => {
                let (why, fix) = why.split_once(" (").unwrap_or((why, ""));
                Finding::error(
                    C,
                    *tool,
                    format!("not found, or not executable ({why}): runs fail"),
                )
                .fix(fix.trim_end_matches(')').to_string())
            }
        });
    }
    if mode == network::Mode::Netns {
        let pool = loaded
            .config
            .dockerd
            .uplink_pool
            .clone()
            .unwrap_or_else(|| network::DEFAULT_UPLINK_POOL.to_string());
        if let Err(e) = network::parse_cidr(&pool) {
            out.push(Finding::error(
                C,
                "dockerd.uplink_pool",
                format!("{e}: runs fail (exit 78)"),
            ));
        }
    }
    if mode == network::Mode::Default {
        out.push(Finding::ok(
            C,
            "dockerd.network",
            "default: one dockerd per network namespace (right inside a build container; on a host, runs take turns)".into(),
        ));
    }
    out
}

/// Probes each etcd endpoint: reachable, TLS, authentication, permission on the prefix, time
/// to the first answer. One endpoint down is a warning (requests fail over); none answering,
/// or TLS or credentials refused, is an error.
#[cfg(feature = "etcd")]
pub fn etcd(store: &crate::lock::etcd::EtcdStore) -> Vec<Finding> {
    use crate::lock::etcd::ProbeFailureKind as K;
    const C: &str = "etcd";
    let probed = match crate::lock::etcd::probe(store) {
        Ok(p) => p,
        Err(e) => {
            return vec![Finding::error(
                C,
                store.describe(),
                format!("{e}: every request fails (exit 78)"),
            )]
        }
    };
    let answered = probed.iter().filter(|(_, r)| r.is_ok()).count();
    let security = match (store.tls(), &store.user) {
        (true, Some((u, _))) => format!(", over TLS as user {u}"),
        (true, None) => ", over TLS".to_string(),
        (false, Some((u, _))) => {
            format!(", as user {u} (no TLS: the password crosses the network in clear)")
        }
        (false, None) => ", no TLS, no authentication".to_string(),
    };
    probed
        .into_iter()
        .map(|(ep, r)| match r {
            Ok(a) => Finding::ok(
                C,
                &ep,
                format!(
                    "etcd {} answered in {:.1} ms{security}; key prefix {}/ readable",
                    a.version,
                    a.first_answer.as_secs_f64() * 1000.0,
                    store.prefix
                ),
            ),
            Err(f) => {
                let (level, message, fix) = match f.kind {
                    K::Unreachable | K::Other if answered > 0 => (
                        Level::Warning,
                        format!("does not answer ({}): requests fail over to the other endpoints, after `etcd.request_timeout` each", f.message),
                        "check that this member is up and reachable (etcdctl endpoint health)".to_string(),
                    ),
                    K::Unreachable | K::Other => (
                        Level::Error,
                        format!("does not answer ({}), nor does any other endpoint: every request fails after `etcd.unavailable_timeout` (exit 69)", f.message),
                        "check that the cluster is up and reachable from this host (etcdctl endpoint health)".to_string(),
                    ),
                    K::Tls => (
                        Level::Error,
                        format!("the TLS handshake failed ({}): every request fails", f.message),
                        "check `etcd.ca_file`, `cert_file`, `key_file` (ETCDCTL_CACERT, ETCDCTL_CERT, ETCDCTL_KEY) and that the cluster serves TLS".to_string(),
                    ),
                    K::Auth => (
                        Level::Error,
                        format!("refused the credentials ({}): every request fails (exit 78)", f.message),
                        "check `etcd.user` and `etcd.password` or `password_file` (ETCDCTL_USER, ETCDCTL_PASSWORD)".to_string(),
                    ),
                    K::Permission => (
                        Level::Error,
                        format!("the user may not read the key prefix {}/ ({}): every request fails (exit 77)", store.prefix, f.message),
                        format!("etcdctl role grant-permission --prefix=true ROLE readwrite {}/", store.prefix),
                    ),
                };
                Finding::new(C, level, &ep, message).fix(fix)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXT4: u64 = 0xEF53;
    const NFS: u64 = 0x6969;

    fn facts(entry: Entry, caller: u32, writable: bool, fs: (u64, &str)) -> DirFacts {
        DirFacts {
            path: PathBuf::from("/var/lib/cachelock"),
            entry,
            link_target: None,
            writable,
            fs: Some(FsInfo {
                magic: fs.0,
                name: fs.1.to_string(),
                read_only: false,
            }),
            creatable: caller == 0,
            caller,
        }
    }

    fn dir(uid: u32, mode: u32) -> Entry {
        Entry::Dir { uid, mode }
    }

    /// (level, message) of each finding, for asserts.
    fn levels(f: &[Finding]) -> Vec<(Level, String)> {
        f.iter().map(|f| (f.level, f.line())).collect()
    }

    fn has(f: &[Finding], level: Level, text: &str) -> bool {
        f.iter()
            .any(|f| f.level == level && f.line().contains(text))
    }

    #[test]
    fn a_shared_lock_directory_needs_root_as_owner_and_the_sticky_bit() {
        let ok = lock_dir(
            &facts(dir(0, 0o1777), 1000, true, (EXT4, "ext4")),
            DirRole::SystemDefault,
            None,
        );
        assert!(ok.iter().all(|f| f.level == Level::Ok), "{:?}", levels(&ok));
        assert!(has(
            &ok,
            Level::Ok,
            "mode 1777 (shared by every user, sticky)"
        ));
        assert!(has(
            &ok,
            Level::Ok,
            "ext4: a local filesystem; waiters are woken by inotify"
        ));

        let f = lock_dir(
            &facts(dir(0, 0o777), 1000, true, (EXT4, "ext4")),
            DirRole::SystemDefault,
            None,
        );
        assert!(
            has(&f, Level::Error, "without the sticky bit"),
            "{:?}",
            levels(&f)
        );
        assert!(has(&f, Level::Error, "fix: chmod +t /var/lib/cachelock"));

        let f = lock_dir(
            &facts(dir(1001, 0o1777), 1000, true, (EXT4, "ext4")),
            DirRole::SystemDefault,
            None,
        );
        assert!(
            has(&f, Level::Error, "owned by uid 1001"),
            "{:?}",
            levels(&f)
        );
        assert!(has(&f, Level::Error, "fix: chown root:root"));
        // A directory of one's own is fine where the configuration names it...
        let f = lock_dir(
            &facts(dir(1000, 0o1777), 1000, true, (EXT4, "ext4")),
            DirRole::Configured,
            None,
        );
        assert!(f.iter().all(|f| f.level == Level::Ok), "{:?}", levels(&f));
        // ...but not as the host's shared one.
        let f = lock_dir(
            &facts(dir(1000, 0o1777), 1000, true, (EXT4, "ext4")),
            DirRole::SystemDefault,
            None,
        );
        assert!(
            has(&f, Level::Error, "owned by uid 1000"),
            "{:?}",
            levels(&f)
        );
    }

    #[test]
    fn who_cannot_use_the_shared_directory_is_told_what_that_costs() {
        // Root alone can write: a warning for root, an error for a user (private fallback).
        let f = lock_dir(
            &facts(dir(0, 0o755), 0, true, (EXT4, "ext4")),
            DirRole::SystemDefault,
            None,
        );
        assert!(
            has(&f, Level::Warning, "only its owner can take locks here"),
            "{:?}",
            levels(&f)
        );
        let f = lock_dir(
            &facts(dir(0, 0o755), 1000, false, (EXT4, "ext4")),
            DirRole::SystemDefault,
            None,
        );
        assert!(
            has(&f, Level::Error, "uid 1000 cannot create entries in it"),
            "{:?}",
            levels(&f)
        );
        assert!(has(&f, Level::Error, "private lock directory"));
        let f = lock_dir(
            &facts(dir(0, 0o755), 1000, false, (EXT4, "ext4")),
            DirRole::Configured,
            None,
        );
        assert!(
            has(&f, Level::Error, "every run fails (exit 73)"),
            "{:?}",
            levels(&f)
        );
        // Missing: root's first run creates it; a user's cannot.
        let f = lock_dir(
            &facts(Entry::Missing, 0, false, (EXT4, "ext4")),
            DirRole::SystemDefault,
            None,
        );
        assert!(
            has(&f, Level::Warning, "does not exist yet"),
            "{:?}",
            levels(&f)
        );
        let f = lock_dir(
            &facts(Entry::Missing, 1000, false, (EXT4, "ext4")),
            DirRole::SystemDefault,
            None,
        );
        assert!(
            has(&f, Level::Error, "uid 1000 cannot create it"),
            "{:?}",
            levels(&f)
        );
        let f = lock_dir(
            &facts(Entry::NotDir, 0, false, (EXT4, "ext4")),
            DirRole::Configured,
            None,
        );
        assert!(has(&f, Level::Error, "not a directory"), "{:?}", levels(&f));
    }

    #[test]
    fn a_network_filesystem_is_named_with_what_it_means_for_waiting() {
        let on_nfs = facts(dir(0, 0o1777), 0, true, (NFS, "nfs4"));
        let f = lock_dir(&on_nfs, DirRole::SystemDefault, None);
        assert!(
            has(
                &f,
                Level::Warning,
                "nfs4 is a network (or userspace) filesystem"
            ),
            "{:?}",
            levels(&f)
        );
        assert!(has(&f, Level::Warning, "waiters poll"));
        assert!(has(&f, Level::Warning, "actimeo=1"));
        assert!(has(&f, Level::Warning, "the NFS client emulates flock"));
        let on_fuse = facts(dir(0, 0o1777), 0, true, (0x65735546, "fuse.sshfs"));
        let f = lock_dir(&on_fuse, DirRole::SystemDefault, None);
        assert!(
            has(&f, Level::Warning, "fuse.sshfs is a network"),
            "{:?}",
            levels(&f)
        );
        assert!(!has(&f, Level::Warning, "NFS client"));
        assert!(
            !f.iter().any(|f| f.level == Level::Error),
            "only costs time"
        );
        let f = lock_dir(&on_nfs, DirRole::SystemDefault, Some(WaitMode::Notify));
        assert!(
            has(
                &f,
                Level::Warning,
                "`wait_mode: notify` waits for inotify events"
            ),
            "{:?}",
            levels(&f)
        );
        let f = lock_dir(
            &facts(dir(0, 0o1777), 0, true, (EXT4, "ext4")),
            DirRole::SystemDefault,
            Some(WaitMode::Poll),
        );
        assert!(
            has(&f, Level::Warning, "`wait_mode: poll`"),
            "{:?}",
            levels(&f)
        );
        let mut ro = facts(dir(0, 0o1777), 0, true, (EXT4, "ext4"));
        ro.fs.as_mut().unwrap().read_only = true;
        let f = lock_dir(&ro, DirRole::SystemDefault, None);
        assert!(has(&f, Level::Error, "read-only ext4"), "{:?}", levels(&f));
    }

    #[test]
    fn a_cache_root_is_roots_alone_and_on_a_filesystem_overlay2_can_use() {
        let f = cache_root(&facts(dir(0, 0o755), 0, true, (EXT4, "ext4")));
        assert!(f.iter().all(|f| f.level == Level::Ok), "{:?}", levels(&f));
        let f = cache_root(&facts(dir(0, 0o777), 0, true, (EXT4, "ext4")));
        assert!(
            has(&f, Level::Error, "mode 0777 lets group or others write"),
            "{:?}",
            levels(&f)
        );
        let f = cache_root(&facts(dir(1001, 0o755), 0, true, (EXT4, "ext4")));
        assert!(
            has(&f, Level::Error, "owned by uid 1001"),
            "{:?}",
            levels(&f)
        );
        let f = cache_root(&facts(dir(0, 0o755), 1000, false, (EXT4, "ext4")));
        assert!(has(&f, Level::Error, "exit 77"), "{:?}", levels(&f));
        let f = cache_root(&facts(dir(0, 0o755), 0, true, (OVERLAY_MAGIC, "overlay")));
        assert!(
            has(&f, Level::Warning, "falls back to vfs"),
            "{:?}",
            levels(&f)
        );
        let mut link = facts(dir(0, 0o755), 0, true, (EXT4, "ext4"));
        link.link_target = Some(PathBuf::from("/elsewhere"));
        assert!(has(&cache_root(&link), Level::Error, "symbolic link"));
    }

    #[test]
    fn bindings_name_each_policy_once_with_what_it_binds() {
        let c = crate::config::Config::parse(
            "locks:\n  - match: 'ci-*'\n    policy: team\n  - match: 'rel-*'\n    policy: team\n  - match: 'x'\npolicies:\n  team:\n    module: builtin:priority\n  spare:\n    module: builtin:deadline\n",
        )
        .unwrap();
        assert_eq!(
            bindings(&c),
            vec![
                (
                    "default".to_string(),
                    "binds locks x and locks no rule matches".to_string()
                ),
                ("team".to_string(), "binds locks ci-*, rel-*".to_string()),
                (
                    "spare".to_string(),
                    "is bound by no rule: only requests that name it with --policy use it"
                        .to_string()
                ),
            ]
        );
    }

    #[test]
    fn the_report_counts_and_its_json_says_whether_the_host_is_ok() {
        let mut r = Report::default();
        r.extend([
            Finding::ok("config", "/etc/cachelock/config.yaml", "parses".into()),
            Finding::warn("compile_cache", "default", "cold".into()).fix("policy check"),
        ]);
        let v: serde_json::Value = serde_json::from_str(&r.render_json()).unwrap();
        assert_eq!(
            (v["ok"].as_bool(), v["warnings"].as_u64()),
            (Some(true), Some(1))
        );
        assert_eq!(v["checks"][1]["level"], "warning");
        assert_eq!(v["checks"][1]["fix"], "policy check");
        assert!(v["checks"][0].get("fix").is_none());
        r.extend([Finding::error("lock_dir", "/x", "line\nforged".into())]);
        let text = r.render_text();
        assert!(
            text.contains("error   lock directory /x: line\\nforged"),
            "{text}"
        );
        assert!(text.ends_with("1 error(s), 1 warning(s)\n"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&r.render_json()).unwrap();
        assert_eq!(v["ok"], false);
    }
}
