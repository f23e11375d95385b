//! Registry credentials where every OCI client finds them: Docker's `config.json`
//! (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`), as `docker login`, `skopeo
//! login`, `oras login` and `cosign login` write it: `credHelpers` for the host, `auths`
//! (`auth` = base64 `user:password`, or `username`/`password`), then the `credsStore` helper.
//! A helper (`docker-credential-NAME get`) runs bounded: 30 s, 64 KiB of output.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::header::HeaderValue;
use serde::Deserialize;

/// How long a credential helper may take.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);
/// Most output read from a credential helper.
const HELPER_MAX_BYTES: u64 = 64 * 1024;

/// A user name and password (never printed: `Debug` shows the user only).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user.
    pub username: String,
    password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

impl Credentials {
    /// The `Authorization: Basic ...` header, marked sensitive.
    pub fn basic(&self) -> HeaderValue {
        let b64 = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", self.username, self.password));
        let mut v =
            HeaderValue::from_str(&format!("Basic {b64}")).expect("base64 is a valid header value");
        v.set_sensitive(true);
        v
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// Where Docker's configuration is read from.
pub fn config_path() -> Option<PathBuf> {
    match std::env::var_os("DOCKER_CONFIG").filter(|v| !v.is_empty()) {
        Some(d) => Some(PathBuf::from(d).join("config.json")),
        None => std::env::var_os("HOME")
            .filter(|v| !v.is_empty())
            .map(|h| PathBuf::from(h).join(".docker").join("config.json")),
    }
}

/// The credentials for `registry` (`host[:port]`), if any are configured; an error names the
/// file or helper that could not be read (never a secret).
pub fn credentials(registry: &str) -> Result<Option<Credentials>, String> {
    let Some(path) = config_path() else {
        return Ok(None);
    };
    let text = match crate::config::read_text(&path) {
        Ok(t) => t,
        Err(_) if !path.exists() => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let cfg: DockerConfig = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not Docker's config.json: {e}", path.display()))?;
    lookup(&cfg, registry, &path)
}

fn lookup(
    cfg: &DockerConfig,
    registry: &str,
    path: &std::path::Path,
) -> Result<Option<Credentials>, String> {
    if let Some(helper) = cfg.cred_helpers.get(registry) {
        return helper_get(helper, registry);
    }
    let entry = cfg
        .auths
        .iter()
        .find(|(k, _)| normalize(k) == registry)
        .map(|(_, v)| v);
    if let Some(e) = entry {
        if let (Some(u), Some(p)) = (&e.username, &e.password) {
            return Ok(Some(Credentials {
                username: u.clone(),
                password: p.clone(),
            }));
        }
        if let Some(a) = &e.auth {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(a.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    format!(
                        "{}: the `auth` of {registry} is not base64 of user:password",
                        path.display()
                    )
                })?;
            let (u, p) = raw.split_once(':').ok_or_else(|| {
                format!(
                    "{}: the `auth` of {registry} is not base64 of user:password",
                    path.display()
                )
            })?;
            return Ok(Some(Credentials {
                username: u.to_string(),
                password: p.to_string(),
            }));
        }
    }
    match &cfg.creds_store {
        Some(store) => helper_get(store, registry),
        None => Ok(None),
    }
}

/// `https://host:port/v1/` and `host:port` are the same key to Docker.
fn normalize(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

/// Asks `docker-credential-NAME get` for `registry`; "not found" is no credentials.
fn helper_get(name: &str, registry: &str) -> Result<Option<Credentials>, String> {
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(format!(
            "credential helper name {name:?} is not a program name"
        ));
    }
    let program = format!("docker-credential-{name}");
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run the credential helper {program}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(registry.as_bytes());
    }
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = (&mut stdout).take(HELPER_MAX_BYTES).read_to_end(&mut buf);
        buf
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() > HELPER_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the credential helper {program} did not answer within {} s",
                    HELPER_TIMEOUT.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("cannot wait for {program}: {e}")),
        }
    };
    let out = reader.join().unwrap_or_default();
    if !status.success() {
        // Helpers say "credentials not found" with a failure status.
        return Ok(None);
    }
    #[derive(Deserialize)]
    struct Answer {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let a: Answer = serde_json::from_slice(&out).map_err(|_| {
        format!("the credential helper {program} answered something that is not its JSON")
    })?;
    if a.username == "<token>" {
        return Err(format!(
            "the credential helper {program} gives an identity token for {registry}, which cachelock does not use: log in with a user and password or token"
        ));
    }
    Ok(Some(Credentials {
        username: a.username,
        password: a.secret,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auths_in_every_spelling_and_never_printed() {
        let cfg: DockerConfig = serde_json::from_str(
            r#"{"auths":{"https://reg:5000/v1/":{"auth":"dXNlcjpwYTpzcw=="},"other":{"username":"u","password":"p"}}}"#,
        )
        .unwrap();
        let p = std::path::Path::new("config.json");
        let c = lookup(&cfg, "reg:5000", p).unwrap().unwrap();
        assert_eq!(c.username, "user");
        assert_eq!(c.password, "pa:ss");
        assert!(!format!("{c:?}").contains("pa:ss"));
        assert!(c.basic().is_sensitive());
        assert_eq!(lookup(&cfg, "other", p).unwrap().unwrap().username, "u");
        assert_eq!(lookup(&cfg, "reg:5001", p).unwrap(), None);
        let bad: DockerConfig = serde_json::from_str(r#"{"auths":{"reg":{"auth":"!!"}}}"#).unwrap();
        assert!(lookup(&bad, "reg", p).unwrap_err().contains("base64"));
    }
}
