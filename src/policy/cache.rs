//! The wasmtime engine and the compile cache: a policy is compiled once
//! (`Engine::precompile_component`) and later loaded with `Component::deserialize_file`, keyed by
//! the module's sha256 plus the engine's compatibility hash (wasmtime version and every setting
//! that affects compiled code). Files are written to a temp name and renamed into place, so
//! concurrent first runs never see a half-written artifact.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use wasmtime::component::Component;
use wasmtime::{Config, Engine};

/// The one engine of the process (fuel metering on; everything else wasmtime's defaults).
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut c = Config::new();
        c.consume_fuel(true);
        Engine::new(&c).expect("wasmtime engine configuration is valid")
    })
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
    /// Compiled now (and written to the cache if it was writable).
    Compiled,
}

/// The cache file for a module with hex sha256 `sha` under `dir`.
pub fn artifact_path(dir: &Path, sha: &str) -> PathBuf {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine().precompile_compatibility_hash().hash(&mut h);
    dir.join(format!("{sha}-{:016x}.cwasm", h.finish()))
}

/// Loads the component with bytes `bytes` (hex sha256 `sha`) from the cache in `dir`, or
/// compiles and caches it. A cache that cannot be read or written only costs a compile.
pub fn load(bytes: &[u8], sha: &str, dir: &Path) -> wasmtime::Result<(Component, Origin)> {
    let engine = engine();
    let path = artifact_path(dir, sha);
    if path.is_file() {
        // SAFETY: the file was written by `precompile_component` of an engine with the same
        // compatibility hash (part of the name) into the user's own cache directory;
        // deserialize_file re-checks the header and refuses incompatible artifacts.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(c) => return Ok((c, Origin::Cached)),
            Err(e) => tracing::debug!("ignoring unusable cached policy {}: {e:#}", path.display()),
        }
    }
    let compiled = engine.precompile_component(bytes)?;
    if let Err(e) = store(dir, &path, &compiled) {
        tracing::debug!("cannot cache compiled policy in {}: {e}", dir.display());
    }
    // SAFETY: `compiled` was produced just now by this engine.
    let component = unsafe { Component::deserialize(engine, &compiled)? };
    Ok((component, Origin::Compiled))
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
