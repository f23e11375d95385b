//! Policies shipped like software: `oci://` references to WebAssembly components in OCI
//! registries, in the CNCF wasm artifact format (config `application/vnd.wasm.config.v0+json`,
//! one `application/wasm` layer: what `wkg`, `oras`, `skopeo` and registry UIs read), signed
//! with cosign-compatible key pairs.
//!
//! What runs is always a digest, and a run never waits on a registry when its policy is cached:
//! [`fetch`] takes the last good resolution of the reference from the trusted store
//! ([`store`]), verifies it again offline (manifest and component digests, the signature
//! against the configured keys) and hands the component to the host. The registry is asked
//! only on a miss, or by `policy pull` / `policy check` (`online`), which resolve tags. A pull
//! is verified before anything is compiled; the pointer to it ([`settle`]) is written only
//! after it compiled and configured, so a bad new version never replaces the last good one.
//! With the registry down, `online` keeps the cached digest with one warning naming its age;
//! with nothing cached, the error names the registry (exit 69).

pub mod auth;
pub mod reference;
pub mod registry;
pub mod sign;
pub mod store;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use reference::Reference;

use crate::error::{Error, Kind};
use crate::policy::cache::{sha256_hex, CacheDirs};
use crate::policy::compile::MAX_MODULE_BYTES;
use crate::policy::trust::{self, TrustedDir};

/// Media type of an OCI image manifest.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// The CNCF wasm artifact's config media type.
pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
/// The CNCF wasm artifact's layer media type.
pub const WASM_LAYER_MEDIA_TYPE: &str = "application/wasm";
/// Config media type of a cosign signature manifest.
const IMAGE_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";

/// An `oci://` policy module and how to reach and trust it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciSource {
    /// The reference as configured.
    pub reference: Reference,
    /// Public keys of which one must have signed it (none: signatures are not required).
    pub keys: Vec<PathBuf>,
    /// How the registry is reached.
    pub registry: registry::Settings,
    /// Resolve the reference with the registry even when a resolution is cached (`policy pull`,
    /// `policy check`: the deploy step); a run never does.
    pub online: bool,
}

/// Where a loaded component came from (shown by `policy check`, `policy list`, `status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The reference at the digest that was loaded.
    pub reference: Reference,
    /// The manifest digest.
    pub digest: String,
    /// The key that verified it, if verification is configured.
    pub verified_by: Option<String>,
    /// When the reference was resolved (Unix ms).
    pub resolved_at_ms: u64,
    /// Taken from the store (no registry asked).
    pub cached: bool,
}

/// A component ready to compile.
pub struct Fetched {
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Their hex sha256 (the layer digest's hex).
    pub sha256: String,
    /// Where it came from.
    pub origin: Origin,
}

/// An OCI image manifest (the fields a policy artifact uses).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u32,
    /// The manifest's media type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The config blob.
    pub config: Descriptor,
    /// The layers.
    pub layers: Vec<Descriptor>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A content descriptor.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Its media type.
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The CNCF wasm config (`application/vnd.wasm.config.v0+json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WasmConfig {
    /// RFC 3339 creation time.
    pub created: String,
    /// Author, if any.
    pub author: Option<String>,
    /// Always `wasm`.
    pub architecture: String,
    /// `wasip2` for a component.
    pub os: String,
    /// The layers' digests, in order.
    pub layer_digests: Vec<String>,
    /// The component's imports and exports.
    pub component: Option<ComponentInfo>,
}

/// `component` of [`WasmConfig`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ComponentInfo {
    /// Exported interfaces.
    pub exports: Vec<String>,
    /// Imported interfaces.
    pub imports: Vec<String>,
    /// The world it targets.
    pub target: Option<String>,
}

/// Parses and checks a policy artifact's manifest: schema 2, the wasm config media type, and
/// a first layer that is an `application/wasm` component of at most the module size bound.
pub fn parse_artifact(bytes: &[u8]) -> Result<(Manifest, Descriptor), String> {
    let m: Manifest = serde_json::from_slice(bytes)
        .map_err(|e| format!("its manifest is not an OCI image manifest: {e}"))?;
    if m.schema_version != 2 {
        return Err(format!(
            "its manifest has schemaVersion {}, not 2",
            m.schema_version
        ));
    }
    if m.config.media_type != WASM_CONFIG_MEDIA_TYPE {
        return Err(format!(
            "it is not a wasm artifact: config media type {:?}, not {WASM_CONFIG_MEDIA_TYPE} (push policies with `cachelock policy push` or `wkg oci push`)",
            m.config.media_type
        ));
    }
    let layer = m
        .layers
        .first()
        .cloned()
        .ok_or_else(|| "its manifest has no layers".to_string())?;
    if layer.media_type != WASM_LAYER_MEDIA_TYPE {
        return Err(format!(
            "its first layer has media type {:?}, not {WASM_LAYER_MEDIA_TYPE}",
            layer.media_type
        ));
    }
    if !layer
        .digest
        .strip_prefix("sha256:")
        .is_some_and(reference::is_sha256_hex)
    {
        return Err(format!(
            "its layer digest {:?} is not sha256",
            crate::output::escape(&layer.digest)
        ));
    }
    if layer.size > MAX_MODULE_BYTES {
        return Err(format!(
            "its component is {} bytes, more than the {} MiB a policy module may have",
            layer.size,
            MAX_MODULE_BYTES >> 20
        ));
    }
    Ok((m, layer))
}

/// The manifest and config of a policy artifact for `component`, whose interfaces are listed.
pub fn build_artifact(
    component: &[u8],
    title: &str,
    exports: &[String],
    imports: &[String],
) -> (Vec<u8>, Vec<u8>) {
    let layer_digest = format!("sha256:{}", sha256_hex(component));
    let created = rfc3339(created_secs());
    let config = WasmConfig {
        created: created.clone(),
        author: None,
        architecture: "wasm".into(),
        os: "wasip2".into(),
        layer_digests: vec![layer_digest.clone()],
        component: Some(ComponentInfo {
            exports: exports.to_vec(),
            imports: imports.to_vec(),
            target: Some(crate::policy::types::WORLD.to_string()),
        }),
    };
    let config = serde_json::to_vec(&config).expect("the config serializes");
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(MANIFEST_MEDIA_TYPE.into()),
        config: Descriptor {
            media_type: WASM_CONFIG_MEDIA_TYPE.into(),
            digest: format!("sha256:{}", sha256_hex(&config)),
            size: config.len() as u64,
            annotations: BTreeMap::new(),
        },
        layers: vec![Descriptor {
            media_type: WASM_LAYER_MEDIA_TYPE.into(),
            digest: layer_digest,
            size: component.len() as u64,
            annotations: BTreeMap::from([(
                "org.opencontainers.image.title".to_string(),
                title.to_string(),
            )]),
        }],
        annotations: BTreeMap::from([("org.opencontainers.image.created".to_string(), created)]),
    };
    (
        serde_json::to_vec(&manifest).expect("the manifest serializes"),
        config,
    )
}

/// `SOURCE_DATE_EPOCH` if set (reproducible artifacts: the same file pushes to the same
/// digest), else now.
fn created_secs() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| crate::sys::now_ms() / 1000)
}

/// `YYYY-MM-DDTHH:MM:SSZ` of Unix seconds (the artifact's `created`: whole seconds, so that
/// `SOURCE_DATE_EPOCH` gives the same bytes).
pub fn rfc3339(secs: u64) -> String {
    let with_ms = crate::output::rfc3339(secs.saturating_mul(1000));
    match with_ms.strip_suffix(".000Z") {
        Some(whole) => format!("{whole}Z"),
        None => with_ms,
    }
}

/// The cache directories holding pulled policies: the host cache, then the caller's own.
fn dirs_readable(dirs: &CacheDirs) -> Vec<TrustedDir> {
    let mut v = Vec::new();
    if let Ok(d) = trust::open_dir(&dirs.host, false, 0o755) {
        v.push(d);
    }
    if let Some(own) = dirs.own.as_ref().filter(|o| **o != dirs.host) {
        if let Ok(d) = trust::open_dir(own, false, 0o700) {
            v.push(d);
        }
    }
    v
}

/// The directory this process stores pulls in (created if need be), if it has one.
fn dir_writable(dirs: &CacheDirs) -> Option<TrustedDir> {
    let own = dirs.own.as_ref()?;
    let mode = if crate::sys::euid() == 0 {
        0o755
    } else {
        0o700
    };
    match trust::open_dir(own, true, mode) {
        Ok(d) if d.writable() => Some(d),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!("not storing pulled policies: {e}");
            None
        }
    }
}

/// The last good resolution of `r` among the cache directories (the most recent), without
/// verifying it: what `policy list` and `status` show. No registry is asked.
pub fn describe(r: &Reference, dirs: &CacheDirs) -> Option<store::Pointer> {
    dirs_readable(dirs)
        .iter()
        .filter_map(|d| store::pointer(d, r))
        .max_by_key(|p| p.resolved_at_ms)
}

fn load_keys(src: &OciSource, who: &str) -> Result<Vec<sign::PublicKey>, Error> {
    src.keys
        .iter()
        .map(|k| sign::load_public(k).map_err(|e| Error::config(format!("{who}: {e}"))))
        .collect()
}

/// Verifies the cached resolution in `dir` again: manifest and component digests, and a
/// signature by one of `keys` (if any). `Err` says why it cannot be used.
fn verify_cached(
    dir: &TrustedDir,
    p: &store::Pointer,
    src: &OciSource,
    keys: &[sign::PublicKey],
) -> Result<Fetched, String> {
    let manifest = store::read(dir, &store::manifest_name(&p.digest), 4 << 20)
        .ok_or("its manifest is not in the store")?;
    if format!("sha256:{}", sha256_hex(&manifest)) != p.digest {
        return Err("its stored manifest does not match its digest".into());
    }
    let (_, layer) = parse_artifact(&manifest)?;
    let bytes = store::read(
        dir,
        &store::blob_name(&layer.digest),
        store::max_component(),
    )
    .ok_or("its component is not in the store")?;
    let sha = sha256_hex(&bytes);
    if format!("sha256:{sha}") != layer.digest {
        return Err("its stored component does not match the layer digest".into());
    }
    let verified_by = if keys.is_empty() {
        None
    } else {
        let found = store::sigs(dir, &p.digest);
        Some(
            sign::verify(keys, &found, &p.digest)
                .map_err(|r| r.describe(keys))?
                .describe(),
        )
    };
    Ok(Fetched {
        bytes,
        sha256: sha,
        origin: Origin {
            reference: src.reference.at(&p.digest),
            digest: p.digest.clone(),
            verified_by,
            resolved_at_ms: p.resolved_at_ms,
            cached: true,
        },
    })
}

/// The cached resolution of `src`, verified, if there is a usable one; else why not.
fn cached(src: &OciSource, dirs: &CacheDirs, keys: &[sign::PublicKey]) -> Result<Fetched, String> {
    let mut found: Vec<(TrustedDir, store::Pointer)> = dirs_readable(dirs)
        .into_iter()
        .filter_map(|d| store::pointer(&d, &src.reference).map(|p| (d, p)))
        .collect();
    found.sort_by_key(|(_, p)| std::cmp::Reverse(p.resolved_at_ms));
    let mut why = String::from("nothing is cached for it");
    for (d, p) in &found {
        match verify_cached(d, p, src, keys) {
            Ok(f) => return Ok(f),
            Err(e) => {
                tracing::debug!(
                    "not using the cached {} of {} in {}: {e}",
                    p.digest,
                    src.reference,
                    d.path.display()
                );
                why = format!("the cached {} cannot be used: {e}", p.digest);
            }
        }
    }
    Err(why)
}

/// The component of `src`: the cached, verified resolution, or (on a miss, or `online`) a pull
/// from the registry, verified before it is returned. `who` names the policy in messages.
pub fn fetch(src: &OciSource, dirs: &CacheDirs, who: &str) -> Result<Fetched, Error> {
    let keys = load_keys(src, who)?;
    let cached = cached(src, dirs, &keys);
    // A pinned digest is what it is: once cached, no registry is ever needed.
    let pinned = src.reference.digest.is_some();
    match cached {
        Ok(f) if !src.online || pinned => return Ok(f),
        _ => {}
    }
    let pulled = pull(src, dirs, &keys, who);
    match (pulled, cached) {
        (Ok(f), _) => Ok(f),
        (Err(e), Ok(f)) if e.kind == Kind::Unavailable => {
            tracing::warn!(
                "{}; keeping the cached {} (resolved and verified {} ago)",
                e.message,
                f.origin.digest,
                crate::output::age(crate::sys::now_ms().saturating_sub(f.origin.resolved_at_ms))
            );
            Ok(f)
        }
        (Err(mut e), Ok(f)) => {
            e.message.push_str(&format!(
                "; the last good one, {}, stays in use",
                f.origin.digest
            ));
            Err(e)
        }
        (Err(mut e), Err(why)) => {
            if e.kind == Kind::Unavailable {
                e.message.push_str(&format!(" ({why})"));
            }
            Err(e)
        }
    }
}

/// A registry error as cachelock's, naming the policy and the registry.
fn registry_error(who: &str, registry: &str, e: registry::Error) -> Error {
    let kind = match &e {
        registry::Error::Unreachable(_) => Kind::Unavailable,
        registry::Error::Denied(_) => Kind::NoPerm,
        registry::Error::NotFound(_) => Kind::NoInput,
        registry::Error::Invalid(_) => Kind::Config,
    };
    let lead = match &e {
        registry::Error::Unreachable(_) => format!("registry {registry} is unreachable"),
        _ => format!("registry {registry}"),
    };
    Error::new(kind, format!("{who}: {lead}: {}", e.message()))
}

/// A client of `r`'s registry and repository.
pub fn client(
    settings: &registry::Settings,
    r: &Reference,
    push: bool,
    who: &str,
) -> Result<registry::Client, Error> {
    let creds = auth::credentials(&r.registry).map_err(|e| Error::config(format!("{who}: {e}")))?;
    registry::Client::new(settings, &r.registry, &r.repository, creds, push)
        .map_err(|e| Error::config(format!("{who}: {e}")))
}

/// The cosign signatures stored for manifest `digest` (tag `sha256-<hex>.sig`).
pub fn signatures(c: &registry::Client, digest: &str) -> Result<Vec<sign::Found>, registry::Error> {
    let tag = signature_tag(digest);
    let manifest = match c.manifest(&tag) {
        Ok((m, _, _)) => m,
        Err(registry::Error::NotFound(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let m: Manifest = serde_json::from_slice(&manifest).map_err(|e| {
        registry::Error::Invalid(format!(
            "the signature manifest {tag} is not a manifest: {e}"
        ))
    })?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut found = Vec::new();
    for l in m.layers.iter().take(64) {
        let Some(sig) = l.annotations.get(sign::SIGNATURE_ANNOTATION) else {
            continue;
        };
        if l.media_type != sign::PAYLOAD_MEDIA_TYPE {
            continue;
        }
        let payload = c.blob(&l.digest, registry::MAX_SMALL_BYTES)?;
        found.push(sign::Found {
            payload: base64::Engine::encode(&b64, payload),
            signature: sig.clone(),
        });
    }
    Ok(found)
}

/// cosign's signature tag for manifest `digest`.
pub fn signature_tag(digest: &str) -> String {
    digest.replacen(':', "-", 1) + ".sig"
}

/// Resolves and downloads `src` from its registry, verifies it, stores it (not yet pointed at).
fn pull(
    src: &OciSource,
    dirs: &CacheDirs,
    keys: &[sign::PublicKey],
    who: &str,
) -> Result<Fetched, Error> {
    let r = &src.reference;
    let c = client(&src.registry, r, false, who)?;
    let reg = |e| registry_error(who, &r.registry, e);
    let (manifest, digest, _) = c.manifest(r.manifest_ref()).map_err(reg)?;
    let refuse = |why: String| {
        Error::config(format!(
            "{who}: refusing {digest} of {r}: {why}; nothing of it was compiled or run"
        ))
    };
    let (_, layer) = parse_artifact(&manifest).map_err(refuse)?;
    let (found, verified_by) = if keys.is_empty() {
        (Vec::new(), None)
    } else {
        let found = signatures(&c, &digest).map_err(reg)?;
        let key = sign::verify(keys, &found, &digest)
            .map_err(|why| refuse(why.describe(keys)))?
            .describe();
        (found, Some(key))
    };
    // The same component pulled before (a tag that did not move, a re-tag) is not downloaded
    // again.
    let stored = dirs_readable(dirs).iter().find_map(|d| {
        store::read(d, &store::blob_name(&layer.digest), store::max_component())
            .filter(|b| format!("sha256:{}", sha256_hex(b)) == layer.digest)
    });
    let bytes = match stored {
        Some(b) => b,
        None => c.blob(&layer.digest, layer.size).map_err(|e| match e {
            registry::Error::Invalid(m) => refuse(m),
            e => reg(e),
        })?,
    };
    let sha = sha256_hex(&bytes);
    if let Some(d) = dir_writable(dirs) {
        if let Err(e) = store::put(&d, &digest, &manifest, &found, &layer.digest, &bytes) {
            tracing::warn!("cannot store {digest} of {r} in {}: {e}", d.path.display());
        }
    }
    Ok(Fetched {
        bytes,
        sha256: sha,
        origin: Origin {
            reference: r.at(&digest),
            digest,
            verified_by,
            resolved_at_ms: crate::sys::now_ms(),
            cached: false,
        },
    })
}

/// Records a fetched component that compiled and configured as the last good resolution of
/// `src` (a cached one already is).
pub fn settle(src: &OciSource, dirs: &CacheDirs, f: &Fetched) {
    if f.origin.cached {
        return;
    }
    let Some(d) = dir_writable(dirs) else {
        return;
    };
    let p = store::Pointer {
        reference: src.reference.to_string(),
        digest: f.origin.digest.clone(),
        component: format!("sha256:{}", f.sha256),
        verified_by: f.origin.verified_by.clone(),
        resolved_at_ms: f.origin.resolved_at_ms,
    };
    if let Err(e) = store::set_pointer(&d, &src.reference, &p) {
        tracing::warn!(
            "cannot record {} as the resolution of {} in {}: {e}",
            p.digest,
            src.reference,
            d.path.display()
        );
    }
}

/// Pushes `component` to `r` as a policy artifact; returns the manifest digest.
pub fn push(
    settings: &registry::Settings,
    r: &Reference,
    component: &[u8],
    title: &str,
    exports: &[String],
    imports: &[String],
) -> Result<String, Error> {
    let who = r.to_string();
    let tag = r.tag.as_deref().ok_or_else(|| {
        Error::usage(format!(
            "{r}: push to a tag (oci://HOST/REPO:TAG), not to a digest"
        ))
    })?;
    let c = client(settings, r, true, &who)?;
    let reg = |e| registry_error(&who, &r.registry, e);
    let (manifest, config) = build_artifact(component, title, exports, imports);
    c.put_blob(&config).map_err(reg)?;
    c.put_blob(component).map_err(reg)?;
    c.put_manifest(tag, MANIFEST_MEDIA_TYPE, &manifest)
        .map_err(reg)
}

/// Signs the manifest `digest` of `r` with `key` and stores the signature as cosign does
/// (adding to the signatures already there).
pub fn sign_remote(
    settings: &registry::Settings,
    r: &Reference,
    digest: &str,
    key: &sign::PrivateKey,
) -> Result<(), Error> {
    let who = r.to_string();
    let c = client(settings, r, true, &who)?;
    let reg = |e| registry_error(&who, &r.registry, e);
    let tag = signature_tag(digest);
    let payload = sign::payload(&r.repository_path(), digest);
    let signature = sign::sign(key, &payload);
    let payload_digest = c.put_blob(&payload).map_err(reg)?;
    let mut layers: Vec<Descriptor> = match c.manifest(&tag) {
        Ok((m, _, _)) => serde_json::from_slice::<Manifest>(&m)
            .map(|m| m.layers)
            .unwrap_or_default(),
        Err(registry::Error::NotFound(_)) => Vec::new(),
        Err(e) => return Err(reg(e)),
    };
    layers.retain(|l| {
        !(l.digest == payload_digest
            && l.annotations.get(sign::SIGNATURE_ANNOTATION) == Some(&signature))
    });
    layers.push(Descriptor {
        media_type: sign::PAYLOAD_MEDIA_TYPE.into(),
        digest: payload_digest,
        size: payload.len() as u64,
        annotations: BTreeMap::from([(sign::SIGNATURE_ANNOTATION.to_string(), signature)]),
    });
    // cosign's config: an image config whose rootfs lists the payloads.
    let config = serde_json::json!({
        "architecture": "",
        "created": "0001-01-01T00:00:00Z",
        "history": [{"created": "0001-01-01T00:00:00Z"}],
        "os": "",
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.digest.clone()).collect::<Vec<_>>()},
        "config": {},
    });
    let config = serde_json::to_vec(&config).expect("json");
    let config_digest = c.put_blob(&config).map_err(reg)?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(MANIFEST_MEDIA_TYPE.into()),
        config: Descriptor {
            media_type: IMAGE_CONFIG_MEDIA_TYPE.into(),
            digest: config_digest,
            size: config.len() as u64,
            annotations: BTreeMap::new(),
        },
        layers,
        annotations: BTreeMap::new(),
    };
    let bytes = serde_json::to_vec(&manifest).expect("json");
    c.put_manifest(&tag, MANIFEST_MEDIA_TYPE, &bytes)
        .map(|_| ())
        .map_err(reg)
}

/// Resolves `r` with its registry: the manifest digest (the registry is asked even for a
/// pinned digest, to check that it is there).
pub fn resolve(settings: &registry::Settings, r: &Reference, who: &str) -> Result<String, Error> {
    let c = client(settings, r, false, who)?;
    let (manifest, digest, _) = c
        .manifest(r.manifest_ref())
        .map_err(|e| registry_error(who, &r.registry, e))?;
    parse_artifact(&manifest)
        .map_err(|why| Error::config(format!("{who}: {digest} of {r}: {why}")))?;
    Ok(digest)
}

/// Verifies the signatures of `r` (at `digest`) in its registry against `keys`: the key that
/// verified, or exit 78 saying why not.
pub fn verify_remote(
    settings: &registry::Settings,
    r: &Reference,
    digest: &str,
    keys: &[sign::PublicKey],
) -> Result<String, Error> {
    let who = r.to_string();
    let c = client(settings, r, false, &who)?;
    let found = signatures(&c, digest).map_err(|e| registry_error(&who, &r.registry, e))?;
    sign::verify(keys, &found, digest)
        .map(sign::PublicKey::describe)
        .map_err(|why| Error::config(format!("{r}: {digest}: {}", why.describe(keys))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn artifacts_round_trip_and_foreign_ones_are_named() {
        let (m, config) = build_artifact(
            b"\0asm\x0d\0\x01\0",
            "p.wasm",
            &["cachelock:policy/lock-policy@0.1.0".into()],
            &[],
        );
        let (parsed, layer) = parse_artifact(&m).unwrap();
        assert_eq!(
            parsed.config.digest,
            format!("sha256:{}", sha256_hex(&config))
        );
        assert_eq!(layer.size, 8);
        let c: serde_json::Value = serde_json::from_slice(&config).unwrap();
        assert_eq!(c["os"], "wasip2");
        assert_eq!(c["layerDigests"][0], layer.digest);
        let image = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:00", "size": 1},
            "layers": []
        }))
        .unwrap();
        assert!(parse_artifact(&image)
            .unwrap_err()
            .contains("not a wasm artifact"));
        assert_eq!(signature_tag("sha256:abc"), "sha256-abc.sig");
    }
}
