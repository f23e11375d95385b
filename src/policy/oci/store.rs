//! Pulled policies in the compile cache's trusted directories (the host cache root writes, the
//! caller's own): content by digest, and one pointer per reference, the last good resolution.
//!
//! - `oci-<hex>.manifest`: a manifest, named by its digest;
//! - `oci-<hex>.sigs`: the cosign signatures found for it (JSON), so that it can be verified
//!   again, offline, against whatever keys the configuration names;
//! - `oci-<hex>.wasm`: a component, named by its digest (the layer's);
//! - `oci-ref-<hex>.json`: for a reference (hashed), the manifest digest it was last resolved
//!   to *and loaded successfully* — written only after verification, compilation and
//!   `configure` succeeded, so a bad new version never replaces the last good one.
//!
//! Files are read through [`TrustedDir`] (owned by the directory's owner, writable by nobody
//! else) and written whole by rename.

use serde::{Deserialize, Serialize};

use super::reference::Reference;
use crate::policy::cache::{entry_mode, sha256_hex};
use crate::policy::compile::MAX_MODULE_BYTES;
use crate::policy::trust::{self, TrustedDir};

/// Largest signature list kept.
const MAX_SIGS_BYTES: usize = 1 << 20;
/// Largest pointer.
const MAX_POINTER_BYTES: usize = 64 * 1024;

/// What a reference was last resolved to and loaded as.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pointer {
    /// The reference as configured.
    pub reference: String,
    /// The manifest digest (`sha256:<hex>`): what registries, `skopeo` and pins name.
    pub digest: String,
    /// The component's own digest (`sha256:<hex>` of the `.wasm`), the compile cache's key.
    pub component: String,
    /// The key that verified it then (`PATH (sha256:…)`), if verification was configured.
    pub verified_by: Option<String>,
    /// When it was resolved and verified (Unix ms).
    pub resolved_at_ms: u64,
}

fn hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// The file of the manifest `digest`.
pub fn manifest_name(digest: &str) -> String {
    format!("oci-{}.manifest", hex(digest))
}

/// The file of the signatures of manifest `digest`.
pub fn sigs_name(digest: &str) -> String {
    format!("oci-{}.sigs", hex(digest))
}

/// The file of the component `digest`.
pub fn blob_name(digest: &str) -> String {
    format!("oci-{}.wasm", hex(digest))
}

fn pointer_name(r: &Reference) -> String {
    format!(
        "oci-ref-{}.json",
        &sha256_hex(r.to_string().as_bytes())[..32]
    )
}

/// The pointer of `r` in `dir`, if any (and readable).
pub fn pointer(dir: &TrustedDir, r: &Reference) -> Option<Pointer> {
    let mut f = dir.open_file(&pointer_name(r)).ok()??;
    let text = trust::read_small(&mut f, MAX_POINTER_BYTES).ok()?;
    serde_json::from_str::<Pointer>(&text)
        .ok()
        .filter(|p| p.reference == r.to_string())
}

/// Records `p` as the last good resolution of `r`.
pub fn set_pointer(dir: &TrustedDir, r: &Reference, p: &Pointer) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(p).expect("a pointer serializes");
    dir.write_atomic(&pointer_name(r), &text, entry_mode(dir))
}

/// The bytes of `name` in `dir`, at most `max`.
pub fn read(dir: &TrustedDir, name: &str, max: usize) -> Option<Vec<u8>> {
    let f = dir.open_file(name).ok()??;
    trust::read_bytes(&f, max).ok()
}

/// A manifest, its signatures and its component, stored by digest (harmless before they are
/// loaded: nothing points at them until [`set_pointer`]).
pub fn put(
    dir: &TrustedDir,
    digest: &str,
    manifest: &[u8],
    sigs: &[super::sign::Found],
    component_digest: &str,
    component: &[u8],
) -> std::io::Result<()> {
    trust::remove_stale_temps(dir);
    let mode = entry_mode(dir);
    let blob = blob_name(component_digest);
    if dir.open_file(&blob).ok().flatten().is_none() {
        dir.write_atomic(&blob, component, mode)?;
    }
    let sigs = serde_json::to_vec(sigs).expect("signatures serialize");
    dir.write_atomic(&sigs_name(digest), &sigs, mode)?;
    dir.write_atomic(&manifest_name(digest), manifest, mode)
}

/// Limits of what is read back.
pub fn max_component() -> usize {
    MAX_MODULE_BYTES as usize
}

/// The signatures stored for `digest` (none if unreadable).
pub fn sigs(dir: &TrustedDir, digest: &str) -> Vec<super::sign::Found> {
    read(dir, &sigs_name(digest), MAX_SIGS_BYTES)
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}
