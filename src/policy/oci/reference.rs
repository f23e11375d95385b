//! `oci://HOST[:PORT]/REPO[:TAG][@sha256:DIGEST]`: where a policy component lives in a registry.
//! Parsing is pure (fuzzable) and strict: the host is always explicit (no implicit Docker Hub),
//! the repository and tag follow the OCI distribution spec's grammar, and a digest is sha256.

use std::fmt;

/// The scheme prefix of a policy reference.
pub const SCHEME: &str = "oci://";

/// A parsed reference. Without tag or digest the tag is `latest`, as every OCI client does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `host[:port]`.
    pub registry: String,
    /// The repository path (`team/policy`).
    pub repository: String,
    /// The tag, if given (or `latest` when neither tag nor digest is).
    pub tag: Option<String>,
    /// `sha256:<64 hex>`, if pinned.
    pub digest: Option<String>,
}

impl Reference {
    /// Parses `oci://...`; the error says what is wrong and shows the expected shape.
    pub fn parse(text: &str) -> Result<Reference, String> {
        let shape = "expected oci://HOST[:PORT]/REPOSITORY[:TAG][@sha256:DIGEST]";
        let rest = text
            .strip_prefix(SCHEME)
            .ok_or_else(|| format!("{text:?} does not start with {SCHEME} ({shape})"))?;
        if rest.len() > 1024 {
            return Err(format!("the reference is longer than 1024 bytes ({shape})"));
        }
        let (rest, digest) = match rest.rsplit_once('@') {
            Some((r, d)) => {
                let hex = d.strip_prefix("sha256:").ok_or_else(|| {
                    format!("{text:?}: the digest must be sha256:<64 hex digits>")
                })?;
                if !is_sha256_hex(hex) {
                    return Err(format!(
                        "{text:?}: the digest must be sha256: followed by 64 lowercase hex digits"
                    ));
                }
                (r, Some(d.to_string()))
            }
            None => (rest, None),
        };
        let (registry, path) = rest
            .split_once('/')
            .ok_or_else(|| format!("{text:?} has no repository ({shape})"))?;
        if !valid_registry(registry) {
            return Err(format!(
                "{text:?}: {registry:?} is not a registry host (HOST or HOST:PORT; {shape})"
            ));
        }
        let (repository, tag) = match path.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, Some(t.to_string())),
            _ => (path, None),
        };
        if !valid_repository(repository) {
            return Err(format!(
                "{text:?}: {repository:?} is not a repository name (lowercase letters and digits, \
                 separated by '.', '_', '__', '-' or '/')"
            ));
        }
        if let Some(t) = &tag {
            if !valid_tag(t) {
                return Err(format!(
                    "{text:?}: {t:?} is not a tag (letters, digits, '_', '.', '-'; at most 128, \
                     not starting with '.' or '-')"
                ));
            }
        }
        let tag = match (tag, &digest) {
            (None, None) => Some("latest".to_string()),
            (t, _) => t,
        };
        Ok(Reference {
            registry: registry.to_string(),
            repository: repository.to_string(),
            tag,
            digest,
        })
    }

    /// `host/repository`: cosign's `docker-reference` and what signatures are made for.
    pub fn repository_path(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The tag or digest the registry is asked for (the digest wins: it is what is pinned).
    pub fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The same repository at `digest` (tag kept, for people).
    pub fn at(&self, digest: &str) -> Reference {
        Reference {
            digest: Some(digest.to_string()),
            ..self.clone()
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Whether `hex` is 64 lowercase hex digits.
pub fn is_sha256_hex(hex: &str) -> bool {
    hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn valid_registry(r: &str) -> bool {
    let (host, port) = match r.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (r, None),
    };
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0));
    host_ok && port_ok
}

fn valid_repository(r: &str) -> bool {
    !r.is_empty() && r.len() <= 255 && r.split('/').all(valid_path_component)
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`
fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parses_tags_digests_ports_and_defaults_to_latest() {
        let r = Reference::parse("oci://reg.example:5000/team/lock-policy:v1.2").unwrap();
        assert_eq!(r.registry, "reg.example:5000");
        assert_eq!(r.repository, "team/lock-policy");
        assert_eq!(r.tag.as_deref(), Some("v1.2"));
        assert_eq!(r.manifest_ref(), "v1.2");
        assert_eq!(
            r.to_string(),
            "oci://reg.example:5000/team/lock-policy:v1.2"
        );
        let r = Reference::parse("oci://localhost/p").unwrap();
        assert_eq!(r.tag.as_deref(), Some("latest"));
        let pinned = format!("oci://127.0.0.1:5000/a/b:v1@{D}");
        let r = Reference::parse(&pinned).unwrap();
        assert_eq!(r.manifest_ref(), D);
        assert_eq!(r.to_string(), pinned);
        let r = Reference::parse(&format!("oci://h/a@{D}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.repository_path(), "h/a");
        assert_eq!(r.at(D).to_string(), format!("oci://h/a@{D}"));
    }

    #[test]
    fn refuses_what_no_registry_accepts() {
        for bad in [
            "reg/p:v1",
            "oci://reg",
            "oci:///p",
            "oci://reg:0/p",
            "oci://reg:99999/p",
            "oci://re_g/p",
            "oci://reg/Upper",
            "oci://reg/a//b",
            "oci://reg/a--b-/c",
            "oci://reg/p:.hidden",
            "oci://reg/p:",
            "oci://reg/p@sha512:00",
            "oci://reg/p@sha256:ABC",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
        for good in ["oci://reg/a.b_c__d---e/f", "oci://reg/p:_x-1.Y"] {
            assert!(Reference::parse(good).is_ok(), "{good}");
        }
        assert!(Reference::parse("reg/p")
            .unwrap_err()
            .contains("oci://HOST"));
    }
}
