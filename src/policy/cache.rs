//! The wasmtime engines and the compile cache: a policy is compiled once
//! (`Engine::precompile_component`) and later loaded with `Component::deserialize_file`, keyed by
//! the module's sha256 plus the engine's compatibility hash (wasmtime version and every setting
//! that affects compiled code). Tiered: a never-seen policy is compiled with Winch (fast to
//! compile) for the first run while Cranelift compiles the optimized code in the background. Files are written to a temp name and renamed into place, so
//! concurrent first runs never see a half-written artifact.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use std::sync::Mutex;
use wasmtime::component::Component;

use wasmtime::{Config, Engine, Strategy};

/// The engine of optimized code (Cranelift, fuel metering on): what a warm process runs.
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| make_engine(Strategy::Cranelift))
}

/// The engine of quickly compiled code (Winch, wasmtime's baseline compiler, ~5× faster to
/// compile, ~1.5× slower to run): used only until the optimized code is in the cache.
pub fn quick_engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| make_engine(Strategy::Winch))
}

fn make_engine(strategy: Strategy) -> Engine {
    let mut c = Config::new();
    c.consume_fuel(true).strategy(strategy);
    Engine::new(&c).expect("wasmtime engine configuration is valid")
}

static BACKGROUND: Mutex<Vec<std::thread::JoinHandle<()>>> = Mutex::new(Vec::new());

/// Waits for background compilations started by [`load`] (tests and benchmarks measure the
/// optimized code; a real process never waits).
pub fn wait_for_background() {
    let handles = std::mem::take(&mut *BACKGROUND.lock().unwrap_or_else(|p| p.into_inner()));
    for h in handles {
        let _ = h.join();
    }
}

/// Where compiled policies go: the configured directory, else `$XDG_CACHE_HOME/cachelock`,
/// else `~/.cache/cachelock`, else `<tmp>/cachelock-cache-<uid>`.
pub fn cache_dir(configured: Option<&Path>) -> PathBuf {
    if let Some(p) = configured {
        return p.to_path_buf();
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("cachelock");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h).join(".cache").join("cachelock");
    }
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    std::env::temp_dir().join(format!("cachelock-cache-{uid}"))
}

/// How a component was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Loaded from the compile cache.
    Cached,
    /// Quickly compiled code from the cache; the optimized code is being compiled in the
    /// background for the next run.
    CachedQuick,
    /// Compiled now with the quick compiler (and written to the cache if it was writable); the
    /// optimized code is being compiled in the background for the next run.
    Compiled,
}

/// The cache file for a module with hex sha256 `sha` under `dir`.
pub fn artifact_path(engine: &Engine, dir: &Path, sha: &str) -> PathBuf {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    dir.join(format!("{sha}-{:016x}.cwasm", h.finish()))
}

/// Loads the component with bytes `bytes` (hex sha256 `sha`) from the cache in `dir`: the
/// optimized code if present, else the quick code (compiled now if need be) while a background
/// thread compiles the optimized code into the cache for the next run. A cache that cannot be
/// read or written only costs compiles.
pub fn load(bytes: &[u8], sha: &str, dir: &Path) -> wasmtime::Result<(Component, Origin)> {
    if let Some(c) = cached(engine(), dir, sha) {
        return Ok((c, Origin::Cached));
    }
    let quick = quick_engine();
    let (component, origin) = match cached(quick, dir, sha) {
        Some(c) => (c, Origin::CachedQuick),
        None => (compile(quick, bytes, sha, dir)?, Origin::Compiled),
    };
    let (bytes, sha, dir) = (bytes.to_vec(), sha.to_string(), dir.to_path_buf());
    let handle = std::thread::spawn(move || {
        if let Err(e) = compile(engine(), &bytes, &sha, &dir) {
            tracing::debug!("background compile of policy {sha} failed: {e:#}");
        }
    });
    BACKGROUND
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(handle);
    Ok((component, origin))
}

fn cached(engine: &Engine, dir: &Path, sha: &str) -> Option<Component> {
    let path = artifact_path(engine, dir, sha);
    if !path.is_file() {
        return None;
    }
    // SAFETY: the file was written by `precompile_component` of an engine with the same
    // compatibility hash (part of the name) into the user's own cache directory;
    // deserialize_file re-checks the header and refuses incompatible artifacts.
    match unsafe { Component::deserialize_file(engine, &path) } {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::debug!("ignoring unusable cached policy {}: {e:#}", path.display());
            None
        }
    }
}

fn compile(engine: &Engine, bytes: &[u8], sha: &str, dir: &Path) -> wasmtime::Result<Component> {
    let path = artifact_path(engine, dir, sha);
    let compiled = engine.precompile_component(bytes)?;
    if let Err(e) = store(dir, &path, &compiled) {
        tracing::debug!("cannot cache compiled policy in {}: {e}", dir.display());
    }
    // SAFETY: `compiled` was produced just now by this engine.
    unsafe { Component::deserialize(engine, &compiled) }
}

fn store(dir: &Path, path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    // A process that exits mid-write (the background compile of a short run) leaves its temp
    // file: remove those of dead processes, cheaply, while we are here.
    remove_stale_temps(dir);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let Some(pid) = name
            .strip_suffix(".tmp")
            .and_then(|n| n.rsplit('.').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
