//! `cachelock policy push|pull|sign|verify`: policies in OCI registries.

use std::path::{Path, PathBuf};

use cachelock::config::Loaded;
use cachelock::error::{Error, Kind, Result};
use cachelock::policy::oci::{self, sign, Origin, Reference};
use cachelock::policy::{self, spec};

fn reference(text: &str) -> Result<Reference> {
    Reference::parse(text).map_err(Error::usage)
}

/// The lines `policy check` and `policy pull` print about where an oci:// module came from.
pub fn print_origin(o: &Origin) {
    println!("digest:    {} ({})", o.digest, o.reference);
    println!(
        "verified:  {}",
        o.verified_by.as_deref().map_or_else(
            || "not required (no verify.keys for this policy)".to_string(),
            |k| format!("signed, by {k}")
        )
    );
    println!(
        "resolved:  {}",
        if o.cached {
            format!(
                "from the cache, {} ago (no registry asked)",
                cachelock::output::age(cachelock::lock::now_ms().saturating_sub(o.resolved_at_ms))
            )
        } else {
            "now, with the registry".to_string()
        }
    );
}

/// `policy push FILE REF [--sign-key KEY]`: checks the component as `policy check` does,
/// publishes it, and signs it.
pub fn push(
    loaded: &Loaded,
    file: &Path,
    reference_text: &str,
    sign_key: Option<&Path>,
    extra: &[(String, String)],
) -> Result<i32> {
    let r = reference(reference_text)?;
    if r.digest.is_some() {
        return Err(Error::usage(format!(
            "{r}: push to a tag (oci://HOST/REPO:TAG), not to a digest"
        )));
    }
    // The key is read before anything is published.
    let key = sign_key
        .map(|k| sign::load_private(k).map_err(Error::config))
        .transpose()?;
    let path: PathBuf = if spec::looks_like_file(&file.to_string_lossy()) {
        file.to_path_buf()
    } else {
        Path::new(".").join(file)
    };
    let (_, p) = policy::load_now(loaded, &path.to_string_lossy(), extra)?;
    let bytes = std::fs::read(&path).map_err(|e| {
        Error::new(
            Kind::NoInput,
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let info = p.info();
    let title = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "policy.wasm".into());
    let settings = spec::registry_settings(loaded);
    let digest = oci::push(&settings, &r, &bytes, &title, &info.exports, &info.imports)?;
    println!(
        "pushed:    {r} ({} bytes, component sha256:{})",
        bytes.len(),
        info.sha256
    );
    println!("digest:    {digest}");
    println!("pin:       {}", r.at(&digest));
    if let Some(k) = key {
        oci::sign_remote(&settings, &r, &digest, &k)?;
        println!(
            "signed:    {} by {}",
            oci::signature_tag(&digest),
            k.public().describe()
        );
    }
    Ok(0)
}

/// `policy pull [NAME|REF]`: resolves, verifies, fetches and compiles into the compile cache
/// (as root: the host cache); without a name every oci:// policy of the configuration.
pub fn pull(loaded: &Loaded, name: Option<&str>) -> Result<i32> {
    let names: Vec<String> = match name {
        Some(n) => vec![n.to_string()],
        None => loaded
            .config
            .policies
            .iter()
            .filter(|(_, d)| spec::is_oci(&d.module))
            .map(|(n, _)| n.clone())
            .collect(),
    };
    if names.is_empty() {
        return Err(Error::usage(
            "the configuration has no oci:// policies: name one (NAME or oci://...)",
        ));
    }
    for (i, n) in names.iter().enumerate() {
        let mut s = spec::resolve(loaded, n, &[])?;
        let spec::Source::Oci(o) = &mut s.source else {
            return Err(Error::usage(format!(
                "policy {n:?} is not an oci:// module ({}): nothing to pull",
                s.source
            )));
        };
        o.online = true;
        let p = policy::host::WasmPolicy::load(&s)?;
        policy::cache::wait_for_background();
        if i > 0 {
            println!();
        }
        println!("policy:    {}", s.name);
        println!(
            "component: sha256:{} ({} bytes)",
            p.info().sha256,
            p.info().size
        );
        if let Some(o) = &p.info().oci {
            print_origin(o);
        }
        println!("cache:     {}", s.cache.display());
    }
    Ok(0)
}

/// The manifest digest `r` names: its own, or its tag's now.
fn digest_of(loaded: &Loaded, r: &Reference) -> Result<String> {
    match &r.digest {
        Some(d) => Ok(d.clone()),
        None => oci::resolve(&spec::registry_settings(loaded), r, &r.to_string()),
    }
}

/// `policy sign REF --key KEY`.
pub fn sign(loaded: &Loaded, reference_text: &str, key: &Path) -> Result<i32> {
    let r = reference(reference_text)?;
    let key = sign::load_private(key).map_err(Error::config)?;
    let digest = digest_of(loaded, &r)?;
    oci::sign_remote(&spec::registry_settings(loaded), &r, &digest, &key)?;
    println!("signed:    {} ({digest})", r);
    println!("signature: {}", oci::signature_tag(&digest));
    println!("key:       {}", key.public().describe());
    Ok(0)
}

/// `policy verify REF [--key PUB]...`: exit 78 naming why when no key verifies.
pub fn verify(loaded: &Loaded, reference_text: &str, keys: &[PathBuf]) -> Result<i32> {
    let r = reference(reference_text)?;
    let paths: Vec<PathBuf> = if keys.is_empty() {
        loaded
            .config
            .verify
            .as_ref()
            .map(|v| v.keys.iter().map(|k| loaded.resolve_path(k)).collect())
            .unwrap_or_default()
    } else {
        keys.to_vec()
    };
    if paths.is_empty() {
        return Err(Error::usage(
            "no public key to verify with: give --key PUB (or verify.keys in the configuration)",
        ));
    }
    let keys = paths
        .iter()
        .map(|k| sign::load_public(k).map_err(Error::config))
        .collect::<Result<Vec<_>>>()?;
    let digest = digest_of(loaded, &r)?;
    let by = oci::verify_remote(&spec::registry_settings(loaded), &r, &digest, &keys)?;
    println!("verified:  {r} ({digest})");
    println!("key:       {by}");
    Ok(0)
}
