//! Which module, configuration and limits a policy name (or `--policy` value) stands for.

use std::fmt;
use std::path::PathBuf;

use super::builtin::{self, Builtin};
use super::cache::CacheDirs;
use super::compile::Budget;
use super::limits::Effective;
use crate::config::{Loaded, OnError};
use crate::error::{Error, Result};

/// Where a policy's module comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Embedded in the binary.
    Builtin(Builtin),
    /// A `.wasm` component file.
    File(PathBuf),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Builtin(b) => write!(f, "builtin:{}", b.name),
            Source::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Everything needed to load one policy.
#[derive(Debug, Clone)]
pub struct PolicySpec {
    /// Name used in messages: the configured name, `builtin:NAME`, or the file path.
    pub name: String,
    /// The module.
    pub source: Source,
    /// Optional pin (`sha256:<hex>`).
    pub sha256: Option<String>,
    /// Passed to `configure`, sorted by key (the policy file's map with overrides applied).
    pub config: Vec<(String, String)>,
    /// Sandbox limits.
    pub limits: Effective,
    /// What a fault does.
    pub on_error: OnError,
    /// Compile cache directories.
    pub cache: CacheDirs,
    /// The compile budget (modules that are not built in).
    pub budget: Budget,
}

/// Whether a `--policy` value names a file rather than a configured policy.
pub fn looks_like_file(v: &str) -> bool {
    v.ends_with(".wasm") || v.contains('/')
}

/// Resolves `name` — a configured policy, `builtin:NAME`, a built-in name, or a `.wasm` path
/// (relative to the working directory) — with `extra` merged over its config.
pub fn resolve(loaded: &Loaded, name: &str, extra: &[(String, String)]) -> Result<PolicySpec> {
    let cfg = &loaded.config;
    let cache = cache_dirs(loaded);
    let budget = Budget::from_config(&cfg.policy_compile).map_err(Error::config)?;
    let mut spec = if let Some(b) = name.strip_prefix("builtin:") {
        PolicySpec {
            name: name.to_string(),
            source: Source::Builtin(builtin_named(b)?),
            sha256: None,
            config: Vec::new(),
            limits: Effective::default(),
            on_error: OnError::Fail,
            cache: cache.clone(),
            budget: budget.clone(),
        }
    } else if let Some(def) = cfg.policy_def(name) {
        let source = match def.module.strip_prefix("builtin:") {
            Some(b) => Source::Builtin(
                builtin_named(b)
                    .map_err(|e| Error::config(format!("policy '{name}': {}", e.message)))?,
            ),
            None => Source::File(loaded.resolve_path(std::path::Path::new(&def.module))),
        };
        PolicySpec {
            name: name.to_string(),
            source,
            sha256: def.sha256.clone(),
            config: def.config.into_iter().collect(),
            limits: Effective::from_config(&def.limits)
                .map_err(|m| Error::config(format!("policy '{name}': {m}")))?,
            on_error: def.on_error,
            cache: cache.clone(),
            budget: budget.clone(),
        }
    } else if looks_like_file(name) {
        PolicySpec {
            name: name.to_string(),
            source: Source::File(PathBuf::from(name)),
            sha256: None,
            config: Vec::new(),
            limits: Effective::default(),
            on_error: OnError::Fail,
            cache: cache.clone(),
            budget: budget.clone(),
        }
    } else {
        let mut known: Vec<String> = cfg.policies.keys().cloned().collect();
        known.extend(builtin::names().map(String::from));
        known.sort();
        known.dedup();
        return Err(Error::config(format!(
            "no policy named {name:?}: use one of {} (defined under `policies:` or built in), \
             builtin:NAME, or a path to a .wasm component",
            known.join(", ")
        )));
    };
    for (k, v) in extra {
        match spec.config.iter_mut().find(|(key, _)| key == k) {
            Some(slot) => slot.1 = v.clone(),
            None => spec.config.push((k.clone(), v.clone())),
        }
    }
    spec.config.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(spec)
}

/// The compile cache directories of this caller, per the configuration.
pub fn cache_dirs(loaded: &Loaded) -> CacheDirs {
    let cfg = &loaded.config;
    CacheDirs::resolve(
        cfg.policy_cache_dir
            .as_deref()
            .map(|p| loaded.resolve_path(p))
            .as_deref(),
        cfg.policy_host_cache_dir
            .as_deref()
            .map(|p| loaded.resolve_path(p))
            .as_deref(),
    )
}

fn builtin_named(name: &str) -> Result<Builtin> {
    builtin::get(name).ok_or_else(|| {
        Error::config(format!(
            "no built-in policy builtin:{name} (built-ins: {})",
            builtin::names()
                .map(|n| format!("builtin:{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}
