//! The wasmtime engines and the compile cache.
//!
//! A policy is compiled once and later loaded with `Component::deserialize_file`, keyed by the
//! module's sha256 plus the engine's compatibility hash (wasmtime version and every setting that
//! affects compiled code). Tiered: a never-seen policy is compiled with Winch (fast to compile)
//! for the first run while Cranelift compiles the optimized code in the background.
//!
//! Once per host, or per user: the cache directories are the host cache (written by root, read
//! by everyone) and the caller's own. A compile holds a lock on its cache entry
//! (`<key>.lock`, flock), so concurrent first runs wait for one compile instead of each
//! compiling (they block in the loader thread; see `lazy`). Modules that are not built in are
//! compiled in a child process under the compile budget ([`super::compile`]).
//!
//! Trust: an artifact is native code, so it is only loaded from a directory that passes
//! [`super::trust`] (owned by the caller or root, writable by nobody else, no symlinks), from a
//! file owned by the directory's owner, and only if its sha256 matches the digest file written
//! beside it (`<key>.sha256`, in the same trusted directory). Anything else is ignored and
//! recompiled. Artifacts and digests are written to temp names and renamed into place.

use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use wasmtime::component::Component;
use wasmtime::Engine;

use super::compile::{self, engine, quick_engine, Budget, CompileError, Tier};
use super::trust::{self, TrustedDir};

/// Default host cache (root-owned; written at deploy time by `cachelock policy check` as root).
pub const DEFAULT_HOST_CACHE_DIR: &str = "/var/cache/cachelock";

static BACKGROUND: Mutex<Vec<std::thread::JoinHandle<()>>> = Mutex::new(Vec::new());

/// Waits for background compilations started by [`load`] (`policy check` waits so that the
/// next run finds the optimized code; a waiting process never does).
pub fn wait_for_background() {
    let handles = std::mem::take(&mut *BACKGROUND.lock().unwrap_or_else(|p| p.into_inner()));
    for h in handles {
        let _ = h.join();
    }
}

/// Where compiled policies are looked up and written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheDirs {
    /// The host cache (root's), read by everyone.
    pub host: PathBuf,
    /// Where this process writes: the configured `policy_cache_dir`; else, for root, the host
    /// cache; else `$XDG_CACHE_HOME/cachelock` or `~/.cache/cachelock`. `None`: nowhere (every
    /// process compiles).
    pub own: Option<PathBuf>,
    /// Whether loading may create, compile into or record in these directories; `false`
    /// (`doctor`: [`CacheDirs::read_only`]) only reads them and compiles in memory.
    pub write: bool,
}

impl CacheDirs {
    /// The directories for this caller, per the configuration.
    pub fn resolve(configured: Option<&Path>, host: Option<&Path>) -> Self {
        let host = host
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_HOST_CACHE_DIR));
        let own = if let Some(p) = configured {
            Some(p.to_path_buf())
        } else if crate::sys::euid() == 0 {
            Some(host.clone())
        } else if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
            Some(PathBuf::from(x).join("cachelock"))
        } else {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache").join("cachelock"))
        };
        CacheDirs {
            host,
            own,
            write: true,
        }
    }

    /// The same directories, only read: a load creates, compiles into and records nothing
    /// there (what it must compile is compiled in memory).
    pub fn read_only(self) -> Self {
        CacheDirs {
            write: false,
            ..self
        }
    }

    /// The directory shown to people: where this process writes, else the host cache.
    pub fn display(&self) -> String {
        match &self.own {
            Some(o) if *o != self.host => {
                format!("{} (host cache {})", o.display(), self.host.display())
            }
            Some(o) => o.display().to_string(),
            None => format!("{} (read only; no cache of your own)", self.host.display()),
        }
    }
}

/// How a component was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Optimized code from the compile cache.
    Cached,
    /// Quickly compiled code from the cache; the optimized code is being compiled in the
    /// background for the next run.
    CachedQuick,
    /// Compiled now with the quick compiler; the optimized code is being compiled in the
    /// background for the next run.
    Compiled,
}

/// Why a module could not be loaded.
#[derive(Debug)]
pub struct LoadError(pub CompileError);

/// The file name stem of the artifact of module `sha` compiled by `engine`.
pub fn artifact_key(engine: &Engine, sha: &str) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    format!("{sha}-{:016x}", h.finish())
}

/// One module to load.
pub struct Module<'a> {
    /// The component's bytes.
    pub bytes: &'a [u8],
    /// Their hex sha256.
    pub sha: &'a str,
    /// Built into cachelock: compiled in this process (no budget); else in a budgeted child.
    pub trusted: bool,
}

/// Loads `m`: the optimized code if a trusted cache has it, else the quick code (compiled now,
/// once per cache entry, if need be) while a background thread compiles the optimized code into
/// the cache for the next run. A cache that cannot be used only costs compiles.
pub fn load(
    m: &Module,
    dirs: &CacheDirs,
    budget: &Budget,
) -> Result<(Component, Origin), LoadError> {
    // Created only when something must be written (a user served by the host cache gets no
    // directory of their own).
    let mut own = dirs.own.as_ref().and_then(|o| open_trusted(o, false));
    let host = if dirs.own.as_ref() == Some(&dirs.host) {
        None
    } else {
        open_trusted(&dirs.host, false)
    };
    let readable: Vec<&TrustedDir> = host.iter().chain(own.iter()).collect();
    let opt_key = artifact_key(engine(), m.sha);
    if let Some(c) = readable
        .iter()
        .find_map(|d| cached(engine(), d, &opt_key, dirs.write))
    {
        return Ok((c, Origin::Cached));
    }
    // Only now: creating the quick engine is work a warm process does not need.
    let quick_key = artifact_key(quick_engine(), m.sha);
    let cached_quick = readable
        .iter()
        .find_map(|d| cached(quick_engine(), d, &quick_key, dirs.write));
    drop(readable);
    if own.is_none() && dirs.write {
        own = dirs.own.as_ref().and_then(|o| open_trusted(o, true));
    }
    let writable = own.as_ref().filter(|d| dirs.write && d.writable());
    let quick = match cached_quick {
        Some(c) => (c, Origin::CachedQuick),
        None => {
            let c = match writable {
                Some(d) => compile_into(d, m, Tier::Quick, &quick_key, budget),
                None => compile_anonymous(m, Tier::Quick, budget, dirs.write),
            };
            match c {
                Ok(c) => (c, Origin::Compiled),
                // Winch does not support every feature: the optimized compiler is the answer.
                Err(LoadError(CompileError::Invalid(_))) => {
                    let c = match writable {
                        Some(d) => compile_into(d, m, Tier::Optimized, &opt_key, budget)?,
                        None => compile_anonymous(m, Tier::Optimized, budget, dirs.write)?,
                    };
                    return Ok((c, Origin::Compiled));
                }
                Err(e) => return Err(e),
            }
        }
    };
    if let Some(d) = dirs.own.clone().filter(|_| writable.is_some()) {
        let (bytes, sha, trusted, budget) = (
            m.bytes.to_vec(),
            m.sha.to_string(),
            m.trusted,
            budget.clone(),
        );
        let handle = std::thread::spawn(move || {
            let Some(dir) = open_trusted(&d, true) else {
                return;
            };
            let m = Module {
                bytes: &bytes,
                sha: &sha,
                trusted,
            };
            let key = artifact_key(engine(), &sha);
            // One process compiles; the others go on with the quick code.
            if let Err(e) = compile_if_free(&dir, &m, &key, &budget) {
                tracing::debug!(
                    "background compile of policy {sha} failed: {}",
                    e.0.message()
                );
            }
        });
        BACKGROUND
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(handle);
    }
    Ok(quick)
}

/// Opens `dir` if it passes the trust rules (creating it when it is ours to write); says why
/// not once per directory and process.
fn open_trusted(dir: &Path, create: bool) -> Option<TrustedDir> {
    let mode = if crate::sys::euid() == 0 {
        0o755
    } else {
        0o700
    };
    match trust::open_dir(dir, create, mode) {
        Ok(d) => Some(d),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            static SAID: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
            let mut said = SAID.lock().unwrap_or_else(|p| p.into_inner());
            if !said.iter().any(|p| p == dir) {
                said.push(dir.to_path_buf());
                tracing::warn!("not using the policy compile cache: {e}");
            }
            None
        }
    }
}

/// The verified artifact `key` in `dir`, deserialized; `None` (with a debug line) for anything
/// missing, untrusted, corrupt or incompatible. With `record`, an owner who had to hash it
/// records its stamp for the next loads.
fn cached(engine: &Engine, dir: &TrustedDir, key: &str, record: bool) -> Option<Component> {
    let name = format!("{key}.cwasm");
    let file = match dir.open_file(&name) {
        Ok(Some(f)) => f,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!("ignoring cached policy: {e}");
            return None;
        }
    };
    let sidecar = match dir.open_file(&format!("{key}.sha256")) {
        Ok(Some(mut f)) => trust::read_small(&mut f, 256).ok()?,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!("ignoring cached policy: {e}");
            return None;
        }
    };
    let mut lines = sidecar.lines();
    let want = lines.next().unwrap_or_default();
    let now = stamp(&file);
    if lines.next().is_some_and(|s| Some(s) == now.as_deref()) {
        // Unchanged since its digest was checked when it was stored: hashing it again is what
        // every waiting process paid (a quarter of loading a policy).
        return deserialize_checked(engine, dir, &name, &file);
    }
    let got = match digest_file(&file) {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(
                "cannot read cached policy {}: {e}",
                dir.path.join(&name).display()
            );
            return None;
        }
    };
    if got != want.trim() {
        tracing::warn!(
            "ignoring cached policy {}: its sha256 does not match {key}.sha256 (recompiling)",
            dir.path.join(&name).display()
        );
        return None;
    }
    // Stored by an older release, or before it was in place: its owner records it now.
    if let (Some(st), true) = (now, record && dir.writable()) {
        let _ = write_digest(dir, key, &got, Some(&st));
    }
    deserialize_checked(engine, dir, &name, &file)
}

/// Identity and change time of `file` (`device:inode:size:ctime`): any write, truncation,
/// rename or replacement changes it (the kernel keeps change times fine-grained once they
/// have been read — multigrain timestamps, Linux 6.13; before that a rewrite by the owner
/// within the same clock tick, ~4 ms, could keep it). Stored beside an artifact's digest once
/// the artifact is in place.
fn stamp(file: &File) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata().ok()?;
    Some(format!(
        "{}:{}:{}:{}.{:09}",
        m.dev(),
        m.ino(),
        m.size(),
        m.ctime(),
        m.ctime_nsec()
    ))
}

/// [`deserialize_open`], `None` (with a debug line) for an artifact wasmtime refuses.
fn deserialize_checked(
    engine: &Engine,
    dir: &TrustedDir,
    name: &str,
    file: &File,
) -> Option<Component> {
    deserialize_open(engine, file)
        .map_err(|e| {
            tracing::debug!(
                "ignoring unusable cached policy {}: {e:#}",
                dir.path.join(name).display()
            )
        })
        .ok()
}

/// Deserializes the artifact in the open file `file` (the very file that was checked: it is
/// reopened through /proc/self/fd, not by its path).
fn deserialize_open(engine: &Engine, file: &File) -> wasmtime::Result<Component> {
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    // SAFETY: the file was written by `precompile_component` of an engine with the same
    // compatibility hash (part of its name) into a directory only its owner (the caller or
    // root) can write, and its digest matched the one written beside it; deserialize_file
    // re-checks the header and refuses incompatible artifacts.
    unsafe { Component::deserialize_file(engine, path) }
}

/// Hex sha256 of a file's contents, read in chunks (a waiting process stays small).
fn digest_file(mut f: &File) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    f.rewind()?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    f.rewind()?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Compiles `m` for `tier` into the entry `key` of `dir`, unless another process did while we
/// waited for the entry's lock.
fn compile_into(
    dir: &TrustedDir,
    m: &Module,
    tier: Tier,
    key: &str,
    budget: &Budget,
) -> Result<Component, LoadError> {
    let io = |what: String, e: std::io::Error| LoadError(CompileError::Io(format!("{what}: {e}")));
    let lock = dir
        .lock_file(&format!("{key}.lock"))
        .map_err(|e| io(format!("cannot lock {}", dir.path.join(key).display()), e))?;
    // Concurrent first runs wait here for the one compile (the loader thread blocks; the
    // waiter's bound is kept by `lazy`).
    crate::sys::flock(&lock, true).map_err(|e| io("cannot lock the cache entry".into(), e))?;
    if let Some(c) = cached(tier.engine(), dir, key, true) {
        return Ok(c);
    }
    refused_before(dir, key, budget)?;
    compile_locked(dir, m, tier, key, budget)
}

/// The background optimized compile: only if no other process is already doing it.
fn compile_if_free(
    dir: &TrustedDir,
    m: &Module,
    key: &str,
    budget: &Budget,
) -> Result<(), LoadError> {
    let io = |e: std::io::Error| LoadError(CompileError::Io(e.to_string()));
    let lock = dir.lock_file(&format!("{key}.lock")).map_err(io)?;
    if !crate::sys::try_flock(&lock, true).unwrap_or(false) {
        return Ok(());
    }
    if dir
        .open_file(&format!("{key}.cwasm"))
        .ok()
        .flatten()
        .is_some()
    {
        return Ok(());
    }
    refused_before(dir, key, budget)?;
    compile_locked(dir, m, Tier::Optimized, key, budget).map(|_| ())
}

/// A refusal remembered in `dir` for a budget at least as large as ours holds for us too.
fn refused_before(dir: &TrustedDir, key: &str, budget: &Budget) -> Result<(), LoadError> {
    let Ok(Some(mut f)) = dir.open_file(&format!("{key}.refused")) else {
        return Ok(());
    };
    let Ok(text) = trust::read_small(&mut f, 4096) else {
        return Ok(());
    };
    let mut lines = text.splitn(3, '\n');
    let (mem, cpu) = (lines.next(), lines.next());
    let then = Budget {
        memory_bytes: mem.and_then(|s| s.parse().ok()).unwrap_or(0),
        cpu_seconds: cpu.and_then(|s| s.parse().ok()).unwrap_or(0),
        wait: budget.wait,
    };
    if budget.within(&then) {
        return Err(LoadError(CompileError::OverBudget(format!(
            "{} (remembered from an earlier compile)",
            lines.next().unwrap_or("over the compile budget")
        ))));
    }
    Ok(())
}

/// Compiles with the entry lock held, then writes the artifact and its digest.
fn compile_locked(
    dir: &TrustedDir,
    m: &Module,
    tier: Tier,
    key: &str,
    budget: &Budget,
) -> Result<Component, LoadError> {
    let io = |what: &str, e: std::io::Error| {
        LoadError(CompileError::Io(format!(
            "{what} in {}: {e}",
            dir.path.display()
        )))
    };
    trust::remove_stale_temps(dir);
    let mode = entry_mode(dir);
    let tmp = trust::temp_name(key, "cwasm");
    let mut out = dir
        .create_new(&tmp, mode)
        .map_err(|e| io("cannot create a temp file", e))?;
    let result = (|| {
        produce(m, tier, budget, &mut out).inspect_err(|e| {
            if let CompileError::OverBudget(msg) = &e.0 {
                remember_refusal(dir, key, budget, msg);
            }
        })?;
        out.sync_all()
            .map_err(|e| io("cannot write the compiled policy", e))?;
        let digest = digest_file(&out).map_err(|e| io("cannot read the compiled policy", e))?;
        write_digest(dir, key, &digest, None).map_err(|e| io("cannot write the digest", e))?;
        dir.rename(&tmp, &format!("{key}.cwasm"))
            .map_err(|e| io("cannot store the compiled policy", e))?;
        // Now that it is in place (a rename changes the change time), record what it looks
        // like, so that loaders need not hash it again while it stays so. The digest alone,
        // written first, covers the moment between.
        if let Some(st) = stamp(&out) {
            let _ = write_digest(dir, key, &digest, Some(&st));
        }
        deserialize_open(tier.engine(), &out)
            .map_err(|e| LoadError(CompileError::Invalid(format!("{e:#}"))))
    })();
    if result.is_err() {
        dir.remove(&tmp);
    }
    result
}

/// Compiles into memory only (no trusted cache of our own, or `warn` unset: a read-only
/// look that was meant not to write).
fn compile_anonymous(
    m: &Module,
    tier: Tier,
    budget: &Budget,
    warn: bool,
) -> Result<Component, LoadError> {
    static SAID: OnceLock<()> = OnceLock::new();
    if warn {
        SAID.get_or_init(|| {
            tracing::warn!(
                "no policy compile cache of your own (set policy_cache_dir, or HOME): every process compiles its policy"
            )
        });
    }
    let mut out = compile::anonymous_output().map_err(|e| {
        LoadError(CompileError::Io(format!(
            "cannot create a memory file: {e}"
        )))
    })?;
    produce(m, tier, budget, &mut out)?;
    deserialize_open(tier.engine(), &out)
        .map_err(|e| LoadError(CompileError::Invalid(format!("{e:#}"))))
}

/// Writes the artifact of `m` to `out`: in this process for a built-in, else in a budgeted
/// child.
fn produce(m: &Module, tier: Tier, budget: &Budget, out: &mut File) -> Result<(), LoadError> {
    if m.trusted {
        let compiled = tier
            .engine()
            .precompile_component(m.bytes)
            .map_err(|e| LoadError(CompileError::Invalid(format!("{e:#}"))))?;
        out.write_all(&compiled).map_err(|e| {
            LoadError(CompileError::Io(format!(
                "cannot write the compiled policy: {e}"
            )))
        })?;
        return Ok(());
    }
    compile::in_child(m.bytes, tier, budget, out).map_err(LoadError)?;
    Ok(())
}

/// Mode of the files of a cache entry: readable by every user in root's host cache, by the
/// owner only in a user's own.
pub fn entry_mode(dir: &TrustedDir) -> u32 {
    if dir.owner == 0 {
        0o644
    } else {
        0o600
    }
}

/// Writes `<key>.sha256`: the artifact's digest and, once it is in place, its [`stamp`].
fn write_digest(
    dir: &TrustedDir,
    key: &str,
    digest: &str,
    stamp: Option<&str>,
) -> std::io::Result<()> {
    let text = match stamp {
        Some(st) => format!("{digest}\n{st}"),
        None => digest.to_string(),
    };
    dir.write_atomic(&format!("{key}.sha256"), text.as_bytes(), entry_mode(dir))
}

fn remember_refusal(dir: &TrustedDir, key: &str, budget: &Budget, msg: &str) {
    let mode = entry_mode(dir);
    let text = format!("{}\n{}\n{msg}", budget.memory_bytes, budget.cpu_seconds);
    if let Err(e) = dir.write_atomic(&format!("{key}.refused"), text.as_bytes(), mode) {
        tracing::debug!("cannot remember the refusal in {}: {e}", dir.path.display());
    }
}

/// Hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_changes_with_any_rewrite_even_of_the_same_size() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("a.cwasm");
        std::fs::write(&p, b"0123456789").unwrap();
        let first = stamp(&File::open(&p).unwrap()).unwrap();
        assert_eq!(stamp(&File::open(&p).unwrap()).unwrap(), first);
        // Same size, one byte changed in place: the change time moves (nanoseconds).
        let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all(b"x").unwrap();
        drop(f);
        assert_ne!(stamp(&File::open(&p).unwrap()).unwrap(), first);
        // Replaced by another file: another inode.
        let q = tmp.path().join("b");
        std::fs::write(&q, b"0123456789").unwrap();
        let before = stamp(&File::open(&p).unwrap()).unwrap();
        std::fs::rename(&q, &p).unwrap();
        assert_ne!(stamp(&File::open(&p).unwrap()).unwrap(), before);
    }
}
