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
    /// A component in an OCI registry (`oci://...`), fetched from the trusted store or pulled.
    #[cfg(feature = "oci")]
    Oci(super::oci::OciSource),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Builtin(b) => write!(f, "builtin:{}", b.name),
            Source::File(p) => write!(f, "{}", p.display()),
            #[cfg(feature = "oci")]
            Source::Oci(o) => write!(f, "{}", o.reference),
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
    !is_oci(v) && (v.ends_with(".wasm") || v.contains('/'))
}

/// Whether a module or `--policy` value is an `oci://` reference.
pub fn is_oci(v: &str) -> bool {
    v.starts_with("oci://")
}

/// The module `oci://...` with the configuration's registry settings and `keys` (the policy's
/// `verify.keys`, else the file's).
#[cfg(feature = "oci")]
fn oci_source(
    loaded: &Loaded,
    module: &str,
    verify: Option<&crate::config::VerifyConfig>,
) -> std::result::Result<super::oci::OciSource, String> {
    let cfg = &loaded.config;
    let reference = super::oci::Reference::parse(module)?;
    let keys = verify
        .or(cfg.verify.as_ref())
        .map(|v| v.keys.iter().map(|k| loaded.resolve_path(k)).collect())
        .unwrap_or_default();
    Ok(super::oci::OciSource {
        reference,
        keys,
        registry: registry_settings(loaded),
        online: false,
    })
}

/// How the configuration says registries are reached.
#[cfg(feature = "oci")]
pub fn registry_settings(loaded: &Loaded) -> super::oci::registry::Settings {
    let r = &loaded.config.registry;
    super::oci::registry::Settings {
        ca_file: r.ca_file.as_deref().map(|p| loaded.resolve_path(p)),
        insecure: r.insecure.clone(),
        timeout: std::time::Duration::from_secs(
            r.timeout_seconds
                .unwrap_or(super::oci::registry::DEFAULT_TIMEOUT_SECONDS),
        ),
    }
}

/// The `Source` of module `module` of a configured policy.
fn module_source(loaded: &Loaded, name: &str, def: &crate::config::PolicyDef) -> Result<Source> {
    if let Some(b) = def.module.strip_prefix("builtin:") {
        return builtin_named(b)
            .map(Source::Builtin)
            .map_err(|e| Error::config(format!("policy '{name}': {}", e.message)));
    }
    if is_oci(&def.module) {
        #[cfg(feature = "oci")]
        return oci_source(loaded, &def.module, def.verify.as_ref())
            .map(Source::Oci)
            .map_err(|e| Error::config(format!("policy '{name}': {e}")));
        #[cfg(not(feature = "oci"))]
        return Err(no_oci(name));
    }
    Ok(Source::File(
        loaded.resolve_path(std::path::Path::new(&def.module)),
    ))
}

/// The `Source` of an `oci://` reference given as the policy (`--policy oci://...`).
#[cfg_attr(not(feature = "oci"), allow(unused_variables))]
fn oci_reference_source(loaded: &Loaded, reference: &str) -> Result<Source> {
    #[cfg(feature = "oci")]
    return oci_source(loaded, reference, None)
        .map(Source::Oci)
        .map_err(Error::config);
    #[cfg(not(feature = "oci"))]
    return Err(no_oci(reference));
}

#[cfg(not(feature = "oci"))]
fn no_oci(name: &str) -> Error {
    Error::config(format!(
        "policy '{name}': oci:// modules need the OCI client, which this build of cachelock leaves out (cargo feature `oci`)"
    ))
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
        let source = module_source(loaded, name, &def)?;
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
    } else if is_oci(name) {
        PolicySpec {
            name: name.to_string(),
            source: oci_reference_source(loaded, name)?,
            sha256: None,
            config: Vec::new(),
            limits: Effective::default(),
            on_error: OnError::Fail,
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
             builtin:NAME, a path to a .wasm component, or oci://HOST/REPO:TAG",
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
