//! The etcd v3 backend: locks shared by a fleet through an etcd cluster, with the same queue,
//! policies and fencing tokens as the directory backend.
//!
//! It uses etcd's primitives directly rather than its `Mutex` recipe, which orders waiters by
//! revision and cannot express ranks that change while they wait (aging):
//!
//! - **Tickets** are keys attached to the request's lease (`<prefix>/l/<name>/q/<id>`): a dead
//!   waiter's ticket disappears with its lease, no liveness probing.
//! - **Arrival** is a per-lock stamp `max(wall clock, last + 1)` and a ticket number, taken in
//!   the same transaction that publishes the ticket (compare-and-swap on `meta`), so the order
//!   never depends on hosts' clocks agreeing; a lost compare answers with the current `meta`,
//!   so a retry is one round trip, after a random pause that grows with the attempts; a give-up with a queue key remembers its arrival
//!   in a key attached to a lease whose TTL is the key's grace.
//! - **The grant** is one transaction, sent only by the head set: it compares the slot's holder
//!   range (exclusive: no holder; shared: no exclusive holder — [`crate::lock::order::Slots`]
//!   semantics) and the generation key, and writes the holder key (on the lease) and the
//!   generation key, and removes the ticket. The generation (the fencing token
//!   `CACHELOCK_GENERATION`) is the grant's revision: it only grows, and no client can forge it.
//!   With one exclusive slot the first attempt is sent blind, on the condition that the slot
//!   has no holder key and no grant mark at all, with the read of the holders as its other
//!   branch: a hand-off costs the release and the grant, one round trip each.
//! - **Waiting** is a watch of what decides the waiter's turn, as in etcd's own recipe: the
//!   head set watches the lock's keys (deletions alone mean it may try at once); a waiter
//!   behind it watches only the ticket just ahead of it in the policy's order, so a hand-off
//!   wakes the new holder and the one waiter behind it, not the queue (requests per
//!   acquisition do not grow with the queue). A bounded sleep covers a watch stream that
//!   hangs on a frozen member, and the periodic look (the policy's interval) covers arrivals
//!   that rank ahead.
//! - **Failover**: every request has a short deadline and is retried on the next endpoint; a
//!   bounded total ([`EtcdStore::unavailable_timeout`]) turns into exit 69.
//! - **A held lock can be lost**: the lease is renewed every tenth of its TTL, and each
//!   confirmed renewal moves the command's stop deadline (see [`crate::lock::backend::Lease`]);
//!   the command runs under a guardian that stops its whole tree before the lease can expire
//!   on the server ([`crate::process::guardian`]).
//!
//! - **Departures are recorded**: a request leaves the queue or releases the lock with one
//!   transaction that deletes its key *and* writes the lock's `last` key (`{ticket, outcome,
//!   waited_ms, held_ms, policy, digest, version}`), so that whoever watches the store (`serve`,
//!   [`Follower`]) learns how each request ended from the revision that removed it; a removal
//!   without a record is a lease that expired. The lease is then left to expire (nothing is on
//!   it any more): a release costs one round trip, as the revoke it replaces did.
//!
//! Keys under `<prefix>/` (default `cachelock`): `n/<name>` (lock names, for `status`), and per
//! lock `l/<name>/`: `meta` (next ticket number, last arrival), `gen` (its mod revision is the
//! latest generation), `q/<id>` (waiting tickets), `h/<slot>/<x|s>/<id>` (holders),
//! `g/<slot>/<x|s>/<id>` (grants not yet released: a mark without its holder key is a holder
//! that vanished, whose command may run for the lease's stop window), `k/<sha256 of queue
//! key>` (remembered arrivals), `last` (the latest departure's record, overwritten by the next).

#[cfg(feature = "etcd")]
mod backend;
#[cfg(feature = "etcd")]
mod client;
#[cfg(feature = "etcd")]
mod follow;

#[cfg(feature = "etcd")]
pub use backend::{release_orphaned, EtcdBackend};
#[cfg(feature = "etcd")]
pub use follow::Follower;

use std::path::PathBuf;
use std::time::Duration;

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "cachelock";
/// Default lease TTL.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// Default deadline of one request before it is retried on the next endpoint.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// Default bound on retrying before giving up with exit 69.
pub const DEFAULT_UNAVAILABLE_TIMEOUT: Duration = Duration::from_secs(10);

/// An etcd store: endpoints, key prefix, credentials and timings.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdStore {
    /// `HOST:PORT` of each member, tried in this order.
    pub endpoints: Vec<String>,
    /// Key prefix (no leading or trailing `/`).
    pub prefix: String,
    /// TLS: trusted CA (PEM); TLS is on when any of the three is set.
    pub ca_file: Option<PathBuf>,
    /// TLS client certificate (PEM).
    pub cert_file: Option<PathBuf>,
    /// TLS client key (PEM).
    pub key_file: Option<PathBuf>,
    /// User name and password (etcd authentication).
    pub user: Option<(String, String)>,
    /// Lease TTL of every request (rounded up to whole seconds).
    pub lease_ttl: Duration,
    /// Deadline of one request.
    pub request_timeout: Duration,
    /// Bound on retrying an operation across endpoints (exit 69 after it).
    pub unavailable_timeout: Duration,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            // Never the password.
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("lease_ttl", &self.lease_ttl)
            .field("request_timeout", &self.request_timeout)
            .field("unavailable_timeout", &self.unavailable_timeout)
            .finish()
    }
}

impl EtcdStore {
    /// Parses `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`; the error says what is wrong.
    pub fn from_url(url: &str) -> Result<EtcdStore, String> {
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| format!("{url:?} is not an etcd:// URL"))?;
        let (hosts, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i + 1..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if hosts.is_empty() {
            return Err(format!(
                "{url:?} names no endpoint: write etcd://HOST:PORT[,HOST:PORT...][/PREFIX]"
            ));
        }
        let mut endpoints = Vec::new();
        for ep in hosts.split(',') {
            endpoints.push(check_endpoint(ep).map_err(|why| format!("{url:?}: {why}"))?);
        }
        let prefix = if prefix.is_empty() {
            DEFAULT_PREFIX.to_string()
        } else {
            check_prefix(prefix).map_err(|why| format!("{url:?}: {why}"))?;
            prefix.to_string()
        };
        Ok(EtcdStore {
            endpoints,
            prefix,
            ca_file: None,
            cert_file: None,
            key_file: None,
            user: None,
            lease_ttl: DEFAULT_LEASE_TTL,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            unavailable_timeout: DEFAULT_UNAVAILABLE_TIMEOUT,
        })
    }

    /// Whether requests use TLS.
    pub fn tls(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }

    /// `etcd://HOST:PORT,.../PREFIX`, for messages.
    pub fn describe(&self) -> String {
        format!("etcd://{}/{}", self.endpoints.join(","), self.prefix)
    }
}

fn check_endpoint(ep: &str) -> Result<String, String> {
    let (host, port) = if let Some(v6) = ep.strip_prefix('[') {
        let (h, rest) = v6
            .split_once(']')
            .ok_or_else(|| format!("endpoint {ep:?}: an IPv6 address needs a closing ]"))?;
        let port = rest
            .strip_prefix(':')
            .ok_or_else(|| format!("endpoint {ep:?} has no :PORT"))?;
        h.parse::<std::net::Ipv6Addr>()
            .map_err(|_| format!("endpoint {ep:?}: {h:?} is not an IPv6 address"))?;
        (h, port)
    } else {
        ep.rsplit_once(':')
            .ok_or_else(|| format!("endpoint {ep:?} has no :PORT (e.g. 127.0.0.1:2379)"))?
    };
    let ok_host = !host.is_empty()
        && host.len() <= 253
        && (ep.starts_with('[')
            || host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-'));
    if !ok_host {
        return Err(format!(
            "endpoint {ep:?}: {host:?} is not a host name or address"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(ep.to_string()),
        _ => Err(format!(
            "endpoint {ep:?}: {port:?} is not a port (1 to 65535)"
        )),
    }
}

fn check_prefix(p: &str) -> Result<(), String> {
    let ok = p.len() <= 128
        && p.split('/').all(|seg| {
            !seg.is_empty()
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "key prefix {p:?}: use at most 128 bytes of [A-Za-z0-9._-] in /-separated parts"
        ))
    }
}

/// An endpoint's answer to a probe (`doctor`).
#[derive(Debug, Clone)]
pub struct Answer {
    /// From the start of the connection (TLS, authentication) to the status answer.
    pub first_answer: Duration,
    /// The member's etcd version.
    pub version: String,
}

/// Why an endpoint did not answer a probe.
#[derive(Debug, Clone)]
pub struct ProbeFailure {
    /// What kind of failure.
    pub kind: ProbeFailureKind,
    /// The client's message, causes included.
    pub message: String,
}

impl From<crate::error::Error> for ProbeFailure {
    /// A failure on this side (a thread that cannot start).
    fn from(e: crate::error::Error) -> Self {
        ProbeFailure {
            kind: ProbeFailureKind::Other,
            message: e.message,
        }
    }
}

/// Kinds of [`ProbeFailure`], each with its own fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeFailureKind {
    /// No connection, or no answer in time.
    Unreachable,
    /// The TLS handshake failed (certificate, CA, plain text on one side).
    Tls,
    /// The credentials were refused.
    Auth,
    /// The user may not read the key prefix.
    Permission,
    /// Anything else the member answered.
    Other,
}

/// Probes every endpoint of `store` in turn, without changing anything: connects (TLS and
/// authentication as configured), asks the member's status and reads the key prefix, each
/// within `request_timeout`. Errors only for what stops every probe (unreadable TLS files:
/// exit 78).
#[cfg(feature = "etcd")]
pub fn probe(store: &EtcdStore) -> crate::error::Result<Vec<(String, Probed)>> {
    let conn = client::Conn::new(store)?;
    Ok((0..store.endpoints.len())
        .map(|i| (store.endpoints[i].clone(), conn.probe(i)))
        .collect())
}

/// What one endpoint answered a [`probe`].
pub type Probed = std::result::Result<Answer, ProbeFailure>;

/// A lock name scoped to one host (`<name>.host-<hostname>`), for data that lives on the host
/// (a `dockerd --cache-id` data root on a local disk): two hosts never wait for each other's
/// local caches. Falls back to a hash of the host name when the result would not be a valid
/// lock name.
pub fn host_scoped_name(name: &str, host: &str) -> String {
    let plain = format!("{name}.host-{host}");
    if super::name::validate(&plain).is_ok() {
        return plain;
    }
    use sha2::{Digest, Sha256};
    let h = format!("{:x}", Sha256::digest(host.as_bytes()));
    let short = format!("{name}.host-{}", &h[..16]);
    if super::name::validate(&short).is_ok() {
        short
    } else {
        // An over-long name: the caller's validation reports it.
        plain
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_refuse_clearly() {
        let s = EtcdStore::from_url("etcd://127.0.0.1:2379,h2.example:2380/ci/locks/").unwrap();
        assert_eq!(s.endpoints, ["127.0.0.1:2379", "h2.example:2380"]);
        assert_eq!(s.prefix, "ci/locks");
        assert_eq!(
            s.describe(),
            "etcd://127.0.0.1:2379,h2.example:2380/ci/locks"
        );
        let s = EtcdStore::from_url("etcd://[::1]:2379").unwrap();
        assert_eq!(
            (s.endpoints[0].as_str(), s.prefix.as_str()),
            ("[::1]:2379", "cachelock")
        );
        for (bad, says) in [
            ("etcd://", "names no endpoint"),
            ("etcd:///p", "names no endpoint"),
            ("etcd://host", "no :PORT"),
            ("etcd://host:0", "not a port"),
            ("etcd://host:99999", "not a port"),
            ("etcd://a:1,,b:2", "endpoint \"\" has no :PORT"),
            ("etcd://h_x:1", "not a host"),
            ("etcd://[::1:2379", "closing ]"),
            ("etcd://h:1/a//b", "key prefix"),
            ("etcd://h:1/a b", "key prefix"),
            ("http://h:1", "not an etcd:// URL"),
        ] {
            let e = EtcdStore::from_url(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let mut s = EtcdStore::from_url("etcd://h:1").unwrap();
        s.user = Some(("u".into(), "secret".into()));
        assert!(!format!("{s:?}").contains("secret"));
    }

    #[test]
    fn host_scoped_names_are_valid_lock_names() {
        assert_eq!(host_scoped_name("dind", "ci-7"), "dind.host-ci-7");
        let odd = host_scoped_name("dind", "host_with_underscore");
        assert!(super::super::name::validate(&odd).is_ok(), "{odd}");
        let long = host_scoped_name("dind", &"h".repeat(200));
        assert!(super::super::name::validate(&long).is_ok(), "{long}");
    }
}
