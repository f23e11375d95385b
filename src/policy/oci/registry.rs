//! A client of the OCI distribution API, as much as policies need: manifests and blobs by
//! digest or tag, monolithic blob upload, manifest upload. On reqwest (rustls with ring, on
//! the tokio already in the tree), one current-thread runtime per client, blocking API.
//!
//! Reached as every OCI client reaches a registry: HTTPS with the system roots plus an optional
//! CA file, plain HTTP only for registries configured as insecure; credentials from Docker's
//! `config.json` ([`super::auth`]), Basic or Bearer (the token endpoint the registry's
//! `WWW-Authenticate` challenge names). Bounded: every request, body included, ends within the
//! configured timeout; every body read is capped (manifests 4 MiB, tokens and error bodies
//! 1 MiB, blobs their declared size); redirects stay on the registry's host, except a blob
//! download handed to a storage host over HTTPS (its content is checked against its digest,
//! and reqwest drops the credentials on a cross-host redirect). Credentials and tokens are
//! never printed: URLs in messages lose their query, headers are marked sensitive.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use reqwest::header::{
    HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE,
};
use reqwest::{Method, StatusCode, Url};

use super::auth::Credentials;

/// Largest manifest read (the distribution spec's registries refuse larger ones).
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Largest token, error or other small JSON body read.
pub const MAX_SMALL_BYTES: u64 = 1 << 20;
/// Most redirects followed for one request.
const MAX_REDIRECTS: usize = 5;
/// Default bound of one request, body included (`registry.timeout_seconds`).
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 60;
/// The bound on connecting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Manifest media types a policy manifest may have.
pub const ACCEPT_MANIFESTS: &str =
    "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// How registries are reached (the configuration's `registry:`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// A PEM file of CA certificates trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// `HOST[:PORT]`s reached over plain HTTP.
    pub insecure: Vec<String>,
    /// Bound of every request, body included.
    pub timeout: Duration,
}

/// What went wrong talking to a registry; the caller adds the reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Not reached: connection refused, name lookup, TLS, timeout, a 5xx answer (exit 69).
    Unreachable(String),
    /// 401 or 403: no credentials, or refused (exit 77).
    Denied(String),
    /// 404: no such repository, tag, manifest or blob (exit 66).
    NotFound(String),
    /// An answer that cannot be right: too large, wrong digest, unexpected status (exit 69 if
    /// from the registry's side, 78 when it is content).
    Invalid(String),
}

impl Error {
    /// The message.
    pub fn message(&self) -> &str {
        match self {
            Error::Unreachable(m) | Error::Denied(m) | Error::NotFound(m) | Error::Invalid(m) => m,
        }
    }
}

type Result<T> = std::result::Result<T, Error>;

/// A client of one registry and repository.
pub struct Client {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    /// `host[:port]`.
    registry: String,
    base: String,
    repository: String,
    creds: Option<Credentials>,
    /// The `Authorization` that worked (Basic, or a Bearer token for this repository).
    auth: Mutex<Option<HeaderValue>>,
    push: bool,
}

impl Client {
    /// A client of `repository` on `registry`, for pulling (or pushing too when `push`).
    pub fn new(
        settings: &Settings,
        registry: &str,
        repository: &str,
        creds: Option<Credentials>,
        push: bool,
    ) -> std::result::Result<Client, String> {
        // reqwest's rustls without a built-in provider: the ring one already in the tree.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let insecure = settings.insecure.iter().any(|h| h == registry);
        let mut b = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("cachelock/", env!("CARGO_PKG_VERSION")))
            .https_only(!insecure)
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                let verdict = redirect_verdict(attempt.previous(), attempt.url());
                match verdict {
                    Ok(()) => attempt.follow(),
                    Err(why) => attempt.error(why),
                }
            }));
        if let Some(ca) = &settings.ca_file {
            let pem = crate::config::read_text(ca)
                .map_err(|e| format!("cannot read registry.ca_file {}: {e}", ca.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(|e| {
                format!(
                    "registry.ca_file {} holds no PEM certificates: {e}",
                    ca.display()
                )
            })?;
            if certs.is_empty() {
                return Err(format!(
                    "registry.ca_file {} holds no PEM certificates",
                    ca.display()
                ));
            }
            b = b.tls_certs_merge(certs);
        }
        let http = b
            .build()
            .map_err(|e| format!("cannot set up the registry client: {}", chain(&e)))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the registry client: {e}"))?;
        Ok(Client {
            rt,
            http,
            registry: registry.to_string(),
            base: format!("{}://{registry}", if insecure { "http" } else { "https" }),
            repository: repository.to_string(),
            creds,
            auth: Mutex::new(None),
            push,
        })
    }

    fn url(&self, tail: &str) -> String {
        format!("{}/v2/{}/{tail}", self.base, self.repository)
    }

    /// The manifest `reference` (tag or digest): its bytes, its digest (`sha256:<hex>` of the
    /// bytes) and its media type. A digest asked for is checked against the bytes.
    pub fn manifest(&self, reference: &str) -> Result<(Vec<u8>, String, String)> {
        let url = self.url(&format!("manifests/{reference}"));
        self.rt.block_on(async {
            let resp = self
                .send(Method::GET, &url, Some(ACCEPT_MANIFESTS), None)
                .await?;
            let resp = expect(resp, &[StatusCode::OK], "manifest", reference).await?;
            let media = resp
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            let body = read_body(resp, MAX_MANIFEST_BYTES, "manifest").await?;
            let digest = format!("sha256:{}", crate::policy::cache::sha256_hex(&body));
            if reference.starts_with("sha256:") && digest != reference {
                return Err(Error::Invalid(format!(
                    "the registry answered manifest {reference} with content whose digest is {digest} (tampered or corrupt)"
                )));
            }
            Ok((body, digest, media))
        })
    }

    /// The blob `digest`, at most `max` bytes, checked against its digest.
    pub fn blob(&self, digest: &str, max: u64) -> Result<Vec<u8>> {
        let url = self.url(&format!("blobs/{digest}"));
        self.rt.block_on(async {
            let resp = self.send(Method::GET, &url, None, None).await?;
            let resp = expect(resp, &[StatusCode::OK], "blob", digest).await?;
            let body = read_body(resp, max, "blob").await?;
            let got = format!("sha256:{}", crate::policy::cache::sha256_hex(&body));
            if got != digest {
                return Err(Error::Invalid(format!(
                    "blob {digest} arrived with digest {got} (tampered or corrupt)"
                )));
            }
            Ok(body)
        })
    }

    /// Uploads `bytes` as a blob (one PUT), unless the registry has it already.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<String> {
        let digest = format!("sha256:{}", crate::policy::cache::sha256_hex(bytes));
        let url = self.url(&format!("blobs/{digest}"));
        let uploads = self.url("blobs/uploads/");
        let body = bytes::Bytes::copy_from_slice(bytes);
        self.rt.block_on(async {
            let head = self.send(Method::HEAD, &url, None, None).await?;
            if head.status() == StatusCode::OK {
                return Ok(digest.clone());
            }
            let resp = self.send(Method::POST, &uploads, None, None).await?;
            let resp = expect(resp, &[StatusCode::ACCEPTED], "upload of blob", &digest).await?;
            let location = resp
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    Error::Invalid("the registry started an upload without a Location".into())
                })?;
            let mut put = Url::parse(&self.base)
                .and_then(|b| b.join(location))
                .map_err(|_| Error::Invalid("the upload Location is not a URL".into()))?;
            put.query_pairs_mut().append_pair("digest", &digest);
            let resp = self
                .send(
                    Method::PUT,
                    put.as_str(),
                    None,
                    Some(("application/octet-stream", body)),
                )
                .await?;
            expect(resp, &[StatusCode::CREATED], "upload of blob", &digest).await?;
            Ok(digest.clone())
        })
    }

    /// Uploads a manifest under `reference` (a tag); returns its digest.
    pub fn put_manifest(&self, reference: &str, media_type: &str, bytes: &[u8]) -> Result<String> {
        let url = self.url(&format!("manifests/{reference}"));
        let digest = format!("sha256:{}", crate::policy::cache::sha256_hex(bytes));
        let body = bytes::Bytes::copy_from_slice(bytes);
        self.rt.block_on(async {
            let resp = self
                .send(Method::PUT, &url, None, Some((media_type, body)))
                .await?;
            expect(
                resp,
                &[StatusCode::CREATED],
                "upload of manifest",
                reference,
            )
            .await?;
            Ok(digest)
        })
    }

    /// Sends one request, answering an authentication challenge once.
    async fn send(
        &self,
        method: Method,
        url: &str,
        accept: Option<&str>,
        body: Option<(&str, bytes::Bytes)>,
    ) -> Result<reqwest::Response> {
        let mut challenged = false;
        loop {
            let mut req = self.http.request(method.clone(), url);
            if let Some(a) = accept {
                req = req.header(ACCEPT, a);
            }
            if let Some((ct, b)) = &body {
                req = req.header(CONTENT_TYPE, *ct).body(b.clone());
            }
            let auth = self.auth.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(a) = auth {
                req = req.header(AUTHORIZATION, a);
            }
            let resp = req.send().await.map_err(|e| transport(e, url))?;
            if resp.status() != StatusCode::UNAUTHORIZED || challenged {
                return Ok(resp);
            }
            challenged = true;
            let challenge = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let header = self.authenticate(&challenge).await?;
            *self.auth.lock().unwrap_or_else(|p| p.into_inner()) = Some(header);
        }
    }

    /// The `Authorization` answering `challenge` (`WWW-Authenticate`).
    async fn authenticate(&self, challenge: &str) -> Result<HeaderValue> {
        let challenges = http_auth::parse_challenges(challenge).map_err(|_| {
            Error::Denied(format!(
                "401 Unauthorized with a challenge cachelock cannot read ({})",
                crate::output::escape(&truncate(challenge, 200))
            ))
        })?;
        let find = |scheme: &str| {
            challenges
                .iter()
                .find(|c| c.scheme.eq_ignore_ascii_case(scheme))
        };
        let no_creds = || {
            Error::Denied(format!(
                "401 Unauthorized: the registry asks for credentials and there are none for {} \
                 (DOCKER_CONFIG or ~/.docker/config.json; `docker login {}` writes them)",
                self.registry, self.registry
            ))
        };
        if let Some(c) = find("bearer") {
            let param = |k: &str| {
                c.params
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(k))
                    .map(|(_, v)| v.to_unescaped())
            };
            let realm = param("realm").ok_or_else(|| {
                Error::Denied("401 Unauthorized: a Bearer challenge without a realm".into())
            })?;
            let scope = param("scope").unwrap_or_else(|| {
                format!(
                    "repository:{}:{}",
                    self.repository,
                    if self.push { "pull,push" } else { "pull" }
                )
            });
            let mut pairs = vec![("scope", scope)];
            if let Some(s) = param("service") {
                pairs.push(("service", s));
            }
            let url = Url::parse_with_params(&realm, &pairs).map_err(|_| {
                Error::Denied(format!(
                    "401 Unauthorized: the token realm {:?} is not a URL",
                    crate::output::escape(&truncate(&realm, 200))
                ))
            })?;
            let mut req = self.http.get(url.clone());
            if let Some(c) = &self.creds {
                req = req.header(AUTHORIZATION, c.basic());
            }
            let resp = req.send().await.map_err(|e| transport(e, url.as_str()))?;
            let what = format!("token from {}", strip_query(url.as_str()));
            let status = resp.status();
            if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
                return Err(if self.creds.is_none() {
                    no_creds()
                } else {
                    Error::Denied(format!(
                        "{status}: the token endpoint refused the credentials for {}",
                        self.registry
                    ))
                });
            }
            let resp = expect(resp, &[StatusCode::OK], &what, "").await?;
            let body = read_body(resp, MAX_SMALL_BYTES, "token").await?;
            #[derive(serde::Deserialize)]
            struct Token {
                token: Option<String>,
                access_token: Option<String>,
            }
            let t: Token = serde_json::from_slice(&body)
                .map_err(|e| Error::Invalid(format!("the {what} is not JSON: {e}")))?;
            let token = t
                .token
                .or(t.access_token)
                .ok_or_else(|| Error::Invalid(format!("the {what} holds no token")))?;
            let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| Error::Invalid(format!("the {what} is not a header value")))?;
            v.set_sensitive(true);
            return Ok(v);
        }
        if find("basic").is_some() {
            return self
                .creds
                .as_ref()
                .map(Credentials::basic)
                .ok_or_else(no_creds);
        }
        Err(Error::Denied(format!(
            "401 Unauthorized with no Basic or Bearer challenge ({})",
            crate::output::escape(&truncate(challenge, 200))
        )))
    }
}

/// Whether a redirect from the chain `previous` (the first is the request's URL) to `next` is
/// followed: on the same scheme, host and port; or, for a blob download over HTTPS, to a
/// storage host (the content is checked against its digest; reqwest sends no credentials
/// there). Never from HTTPS to HTTP, never more than [`MAX_REDIRECTS`].
pub fn redirect_verdict(previous: &[Url], next: &Url) -> std::result::Result<(), String> {
    let Some(first) = previous.first() else {
        return Ok(());
    };
    if previous.len() > MAX_REDIRECTS {
        return Err(format!("more than {MAX_REDIRECTS} redirects"));
    }
    let last = previous.last().unwrap_or(first);
    if last.scheme() == "https" && next.scheme() != "https" {
        return Err(format!(
            "a redirect from HTTPS to {} is refused",
            strip_query(next.as_str())
        ));
    }
    let same = |a: &Url| {
        a.scheme() == next.scheme()
            && a.host_str() == next.host_str()
            && a.port_or_known_default() == next.port_or_known_default()
    };
    if same(first) {
        return Ok(());
    }
    let blob_download = first.path().contains("/blobs/sha256:");
    if blob_download && next.scheme() == "https" {
        return Ok(());
    }
    Err(format!(
        "a redirect to another host ({}) is refused: only blob downloads may go to a storage host",
        next.host_str().unwrap_or("?")
    ))
}

/// `url` without its query (storage URLs carry signatures there).
pub fn strip_query(url: &str) -> String {
    url.split('?').next().unwrap_or(url).to_string()
}

fn truncate(s: &str, n: usize) -> String {
    crate::policy::limits::truncate(s.to_string(), n)
}

/// An error and its causes, without URLs (they are named by the caller, without query).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        cur = s.source();
    }
    parts.join(": ")
}

fn transport(e: reqwest::Error, url: &str) -> Error {
    let (timeout, redirect) = (e.is_timeout(), e.is_redirect());
    let what = if timeout {
        "timed out (registry.timeout_seconds)".to_string()
    } else {
        chain(&e.without_url())
    };
    let msg = format!("{}: {what}", strip_query(url));
    if redirect {
        Error::Invalid(msg)
    } else {
        Error::Unreachable(msg)
    }
}

/// `resp` if its status is one of `ok`, else the error its status and body say.
async fn expect(
    resp: reqwest::Response,
    ok: &[StatusCode],
    what: &str,
    reference: &str,
) -> Result<reqwest::Response> {
    let status = resp.status();
    if ok.contains(&status) {
        return Ok(resp);
    }
    let body = read_body(resp, MAX_SMALL_BYTES, "error")
        .await
        .unwrap_or_default();
    let detail = registry_errors(&body);
    let subject = if reference.is_empty() {
        what.to_string()
    } else {
        format!("{what} {reference}")
    };
    let msg = format!(
        "{subject}: {status}{}",
        if detail.is_empty() {
            String::new()
        } else {
            format!(" ({detail})")
        }
    );
    Err(match status {
        StatusCode::NOT_FOUND => Error::NotFound(msg),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Error::Denied(msg),
        s if s.is_server_error() => Error::Unreachable(msg),
        _ => Error::Invalid(msg),
    })
}

/// `code: message` of the distribution spec's error document, escaped and bounded.
fn registry_errors(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Doc {
        errors: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        code: Option<String>,
        message: Option<String>,
    }
    let Ok(doc) = serde_json::from_slice::<Doc>(body) else {
        return String::new();
    };
    let text = doc
        .errors
        .iter()
        .take(4)
        .map(|e| {
            format!(
                "{}: {}",
                e.code.as_deref().unwrap_or("?"),
                e.message.as_deref().unwrap_or("")
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    crate::output::escape(&truncate(&text, 400)).into_owned()
}

/// The body of `resp`, refused past `max` bytes (declared or read).
async fn read_body(mut resp: reqwest::Response, max: u64, what: &str) -> Result<Vec<u8>> {
    let too_large = || {
        Error::Invalid(format!(
            "the registry's {what} is larger than {max} bytes, the most cachelock reads"
        ))
    };
    if resp.content_length().is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let mut buf = Vec::with_capacity(resp.content_length().unwrap_or(0).min(1 << 20) as usize);
    while let Some(chunk) = resp.chunk().await.map_err(|e| {
        Error::Unreachable(format!("reading the {what}: {}", chain(&e.without_url())))
    })? {
        if buf.len() as u64 + chunk.len() as u64 > max {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn redirects_stay_on_the_registry_but_blob_downloads_may_go_to_storage() {
        let manifest = u("https://reg:5000/v2/team/p/manifests/v1");
        let blob = u("https://reg:5000/v2/team/p/blobs/sha256:00aa");
        assert!(
            redirect_verdict(std::slice::from_ref(&manifest), &u("https://reg:5000/v2/x")).is_ok()
        );
        assert!(
            redirect_verdict(std::slice::from_ref(&manifest), &u("https://evil/v2/x"))
                .unwrap_err()
                .contains("another host (evil)")
        );
        assert!(
            redirect_verdict(std::slice::from_ref(&manifest), &u("https://reg:5001/v2/x")).is_err()
        );
        assert!(redirect_verdict(
            std::slice::from_ref(&blob),
            &u("https://s3.example/b?X-Sig=1")
        )
        .is_ok());
        assert!(
            redirect_verdict(std::slice::from_ref(&blob), &u("http://s3.example/b"))
                .unwrap_err()
                .contains("HTTPS to http://s3.example/b")
        );
        let plain = u("http://reg:5000/v2/team/p/blobs/sha256:00aa");
        assert!(
            redirect_verdict(std::slice::from_ref(&plain), &u("http://reg:5000/other")).is_ok()
        );
        assert!(redirect_verdict(&[plain], &u("http://storage/b")).is_err());
        let upload = u("https://reg/v2/p/blobs/uploads/abc");
        assert!(redirect_verdict(&[upload], &u("https://elsewhere/u")).is_err());
        let many = vec![blob; 6];
        assert!(redirect_verdict(&many, &u("https://s3/b"))
            .unwrap_err()
            .contains("more than 5"));
        assert_eq!(strip_query("https://s/b?sig=secret"), "https://s/b");
    }

    #[test]
    fn registry_error_documents_are_shown_escaped() {
        let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown\u001b[31m","detail":{}}]}"#;
        let s = registry_errors(body);
        assert!(s.starts_with("MANIFEST_UNKNOWN: manifest unknown"), "{s}");
        assert!(!s.contains('\u{1b}'), "{s}");
        assert_eq!(registry_errors(b"<html>"), "");
    }
}
