//! Talking to the cluster: one small tokio runtime, one client per endpoint, and [`Conn::call`]:
//! every request gets a short deadline and is retried on the next endpoint, for a bounded
//! total time after which the operation fails with exit 69.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};

use super::{EtcdStore, Probed};
use crate::error::{Error, Kind, Result};

/// How a followed watch goes on after a response (see [`Conn::follow_watch`]).
pub(super) enum Flow {
    /// Keep reading this stream.
    Go,
    /// Open a new stream on the same endpoint.
    Reopen,
    /// Open a new stream on the next endpoint.
    Rotate,
    /// Stop following.
    Stop,
}

/// Why a followed watch lost its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lost {
    /// None could be opened on the endpoint in use.
    Unopened,
    /// The stream ended or erred.
    Broken,
    /// Nothing came for two request timeouts.
    Silent,
}

/// A failed request: worth another endpoint, or final.
pub(super) enum Failure {
    Retry(String),
    Final(Error),
}

/// How an etcd error is treated.
pub(super) fn classify(what: &str, e: etcd_client::Error) -> Failure {
    use etcd_client::Error as E;
    use tonic::Code;
    match &e {
        E::GRpcStatus(s) => match s.code() {
            Code::PermissionDenied => Failure::Final(Error::new(
                Kind::NoPerm,
                format!("etcd refused {what}: {} (grant the user read-write access to the key prefix)", s.message()),
            )),
            Code::Unauthenticated if !s.message().contains("invalid auth token") => {
                Failure::Final(Error::config(format!(
                    "etcd refused the credentials ({}); check `etcd.user`/`etcd.password` or ETCDCTL_USER/ETCDCTL_PASSWORD",
                    s.message()
                )))
            }
            Code::InvalidArgument if s.message().contains("authentication failed") => {
                Failure::Final(Error::config(format!(
                    "etcd refused the credentials ({}); check `etcd.user`/`etcd.password` or ETCDCTL_USER/ETCDCTL_PASSWORD",
                    s.message()
                )))
            }
            Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::AlreadyExists
            | Code::NotFound
            | Code::ResourceExhausted => Failure::Final(Error::new(
                Kind::Software,
                format!("etcd refused {what}: {}", s.message()),
            )),
            _ => Failure::Retry(s.message().to_string()),
        },
        E::InvalidArgs(_) | E::InvalidUri(_) => Failure::Final(Error::config(format!(
            "cannot use the etcd endpoints: {e}"
        ))),
        _ => Failure::Retry(e.to_string()),
    }
}

/// Whether an error says the lease is gone.
pub(super) fn lease_gone(e: &etcd_client::Error) -> bool {
    let text = e.to_string();
    text.contains("requested lease not found") || text.contains("lease not found")
}

/// The cluster connection shared by a backend, its requests, their keep-alives and watches.
pub(super) struct Conn {
    rt: tokio::runtime::Runtime,
    pub(super) store: EtcdStore,
    options: ConnectOptions,
    clients: Mutex<Vec<Option<Client>>>,
    current: AtomicUsize,
}

impl Conn {
    /// Prepares the connection (reading TLS files: exit 78 when they cannot be read); nothing
    /// is sent yet.
    pub(super) fn new(store: &EtcdStore) -> Result<Arc<Conn>> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("cachelock-etcd")
            .enable_all()
            .build()
            .map_err(|e| Error::new(Kind::OsErr, format!("cannot start the etcd client: {e}")))?;
        let mut options = ConnectOptions::new()
            .with_timeout(store.request_timeout)
            .with_connect_timeout(store.request_timeout)
            .with_keep_alive(store.request_timeout, store.request_timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true)
            .with_auto_token_refresh(true);
        if let Some((u, p)) = &store.user {
            options = options.with_user(u, p);
        }
        if store.tls() {
            options = options.with_tls(tls_options(store)?);
        }
        Ok(Arc::new(Conn {
            rt,
            options,
            clients: Mutex::new(vec![None; store.endpoints.len()]),
            current: AtomicUsize::new(0),
            store: store.clone(),
        }))
    }

    /// Runs `f` to completion on the runtime. Called from inside a runtime of the caller's own
    /// (a library user dropping a guard in async code), which must not be blocked on from
    /// its own thread, it runs on a thread of its own meanwhile.
    pub(super) fn block_on<T, E, F>(&self, f: F) -> std::result::Result<T, E>
    where
        T: Send,
        E: Send + From<Error>,
        F: Future<Output = std::result::Result<T, E>> + Send,
    {
        if tokio::runtime::Handle::try_current().is_err() {
            return self.rt.block_on(f);
        }
        std::thread::scope(|s| {
            let t = std::thread::Builder::new()
                .name("cachelock-etcd-call".into())
                .spawn_scoped(s, || self.rt.block_on(f))
                .map_err(|e| Error::new(Kind::OsErr, format!("cannot start a thread: {e}")))
                .map_err(E::from)?;
            t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Spawns a background task (keep-alives, watches).
    pub(super) fn spawn<F>(&self, f: F) -> tokio::task::JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.rt.spawn(f)
    }

    /// The client of endpoint `i`, connecting (and authenticating) it if needed.
    async fn client(&self, i: usize) -> std::result::Result<Client, etcd_client::Error> {
        if let Some(c) = self.clients.lock().unwrap_or_else(|e| e.into_inner())[i].clone() {
            return Ok(c);
        }
        let c = Client::connect(
            [self.store.endpoints[i].as_str()],
            Some(self.options.clone()),
        )
        .await?;
        self.clients.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(c.clone());
        Ok(c)
    }

    /// The endpoint now in use and its client (for streams: watches, keep-alives).
    pub(super) async fn current_client(&self) -> std::result::Result<(usize, Client), Failure> {
        let i = self.current.load(Ordering::SeqCst) % self.store.endpoints.len();
        match tokio::time::timeout(self.store.request_timeout, self.client(i)).await {
            Ok(Ok(c)) => Ok((i, c)),
            Ok(Err(e)) => Err(classify("the connection", e)),
            Err(_) => Err(Failure::Retry("no answer to connect".into())),
        }
    }

    /// A watch of `key` with `opts` on the endpoint now in use, opened within the request
    /// deadline, with its client; `None`, after moving on to the next endpoint and a 100 ms
    /// pause, when that endpoint cannot (the caller's loop then tries again).
    pub(super) async fn open_watch(
        &self,
        key: &str,
        opts: etcd_client::WatchOptions,
    ) -> Option<(usize, Client, etcd_client::WatchStream)> {
        let (i, mut c) = match self.current_client().await {
            Ok(x) => x,
            Err(_) => {
                self.rotate(self.current_index());
                tokio::time::sleep(Duration::from_millis(100)).await;
                return None;
            }
        };
        match tokio::time::timeout(self.store.request_timeout, c.watch(key, Some(opts))).await {
            Ok(Ok(s)) => Some((i, c, s)),
            _ => {
                self.rotate(i);
                tokio::time::sleep(Duration::from_millis(100)).await;
                None
            }
        }
    }

    /// Follows a watch of `key` (`base` options, from revision `next`; 0: from now) for as long
    /// as `on` says so, on the endpoint in use: `on` gets each response (with the stream's
    /// client, for a look at the key) and the revision to resume from, and answers how to go
    /// on and from which revision. A stream that cannot be opened, errs, or stays silent for
    /// two request timeouts (a progress request is sent after one: a frozen member) is
    /// replaced on the next endpoint, resuming where it left off; `lost` hears why.
    pub(super) async fn follow_watch<H, Fut>(
        &self,
        key: &str,
        base: etcd_client::WatchOptions,
        mut next: i64,
        mut on: H,
        lost: impl Fn(Lost),
    ) where
        H: FnMut(etcd_client::WatchResponse, Client, i64) -> Fut,
        Fut: Future<Output = (Flow, i64)>,
    {
        let timeout = self.store.request_timeout;
        loop {
            let mut opts = base.clone().with_progress_notify();
            if next > 0 {
                opts = opts.with_start_revision(next);
            }
            let Some((i, c, mut s)) = self.open_watch(key, opts).await else {
                lost(Lost::Unopened);
                continue;
            };
            let mut heard = Instant::now();
            loop {
                tokio::select! {
                    m = s.message() => match m {
                        Ok(Some(resp)) => {
                            heard = Instant::now();
                            let (flow, n) = on(resp, c.clone(), next).await;
                            next = n;
                            match flow {
                                Flow::Go => {}
                                Flow::Reopen => break,
                                Flow::Rotate => {
                                    self.rotate(i);
                                    break;
                                }
                                Flow::Stop => return,
                            }
                        }
                        _ => {
                            self.rotate(i);
                            lost(Lost::Broken);
                            break;
                        }
                    },
                    _ = tokio::time::sleep(timeout) => {
                        if heard.elapsed() >= timeout * 2 {
                            self.rotate(i);
                            lost(Lost::Silent);
                            break;
                        }
                        let _ = s.request_progress().await;
                    }
                }
            }
        }
    }

    /// The index of the endpoint now in use.
    pub(super) fn current_index(&self) -> usize {
        self.current.load(Ordering::SeqCst) % self.store.endpoints.len()
    }

    /// Moves on from endpoint `i` (unless another request already did), forgetting its client.
    pub(super) fn rotate(&self, i: usize) {
        let n = self.store.endpoints.len();
        if self
            .current
            .compare_exchange(i, (i + 1) % n, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            tracing::debug!(
                "etcd endpoint {} did not answer; trying the next",
                self.store.endpoints[i]
            );
        }
        self.clients.lock().unwrap_or_else(|e| e.into_inner())[i] = None;
    }

    /// Runs one request, `f(client)`, with the request deadline; on a retryable failure moves to
    /// the next endpoint and tries again, until `unavailable_timeout` has passed since the first
    /// attempt (then exit 69, naming every endpoint and the last error).
    pub(super) async fn call<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let give_up = Instant::now() + self.store.unavailable_timeout;
        let n = self.store.endpoints.len();
        let mut failures = 0usize;
        loop {
            let i = self.current.load(Ordering::SeqCst) % n;
            let why = match self.current_client().await {
                Ok((_, c)) => match tokio::time::timeout(self.store.request_timeout, f(c)).await {
                    Ok(Ok(v)) => return Ok(v),
                    Ok(Err(e)) => match classify(what, e) {
                        Failure::Final(e) => return Err(e),
                        Failure::Retry(m) => m,
                    },
                    Err(_) => format!(
                        "no answer within {:.1}s",
                        self.store.request_timeout.as_secs_f64()
                    ),
                },
                Err(Failure::Final(e)) => return Err(e),
                Err(Failure::Retry(m)) => m,
            };
            self.rotate(i);
            failures += 1;
            if Instant::now() >= give_up {
                return Err(self.unavailable(what, &why));
            }
            // After a full round of endpoints, a short pause (an election takes a moment).
            if failures.is_multiple_of(n) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tracing::debug!("etcd {what}: {} ({why}); retrying", self.store.endpoints[i]);
        }
    }

    /// The exit-69 error of an operation that no endpoint answered.
    pub(super) fn unavailable(&self, what: &str, last: &str) -> Error {
        Error::new(
            Kind::Unavailable,
            format!(
                "no etcd endpoint of {} answered {what} within {:.0}s (last error: {last}); check that the cluster is up and reachable (etcdctl endpoint health), or raise `etcd.unavailable_timeout`",
                self.store.endpoints.join(","),
                self.store.unavailable_timeout.as_secs_f64()
            ),
        )
    }
}

fn tls_options(store: &EtcdStore) -> Result<etcd_client::TlsOptions> {
    use etcd_client::{Certificate, Identity, TlsOptions};
    let read = |p: &std::path::Path, what: &str| {
        std::fs::read(p)
            .map_err(|e| Error::config(format!("cannot read the etcd {what} {}: {e}", p.display())))
    };
    let mut tls = TlsOptions::new();
    if let Some(ca) = &store.ca_file {
        tls = tls.ca_certificate(Certificate::from_pem(read(
            ca,
            "CA certificate (etcd.ca_file, ETCDCTL_CACERT)",
        )?));
    }
    match (&store.cert_file, &store.key_file) {
        (Some(c), Some(k)) => {
            tls = tls.identity(Identity::from_pem(
                read(c, "client certificate (etcd.cert_file, ETCDCTL_CERT)")?,
                read(k, "client key (etcd.key_file, ETCDCTL_KEY)")?,
            ));
        }
        (None, None) => {}
        _ => {
            return Err(Error::config(
                "an etcd client certificate needs its key and a key needs its certificate: set both `etcd.cert_file` and `etcd.key_file` (or ETCDCTL_CERT and ETCDCTL_KEY)",
            ))
        }
    }
    Ok(tls)
}

impl Conn {
    /// Connects to endpoint `i` alone (TLS and authentication as configured), asks its status
    /// and reads the prefix's lock names (the read every `status` makes), each within the
    /// request deadline; times the status answer from the start of the connection.
    pub(super) fn probe(&self, i: usize) -> Probed {
        use super::{ProbeFailure, ProbeFailureKind as K};
        let deadline = self.store.request_timeout;
        let late = |what: &str| ProbeFailure {
            kind: K::Unreachable,
            message: format!("no answer to {what} within {:.1}s", deadline.as_secs_f64()),
        };
        self.block_on(async {
            let start = Instant::now();
            let connect = Client::connect(
                [self.store.endpoints[i].as_str()],
                Some(self.options.clone()),
            );
            let mut c = match tokio::time::timeout(deadline, connect).await {
                Err(_) => return Err(late("connect")),
                Ok(Err(e)) => return Err(probe_failure(&e)),
                Ok(Ok(c)) => c,
            };
            let status = match tokio::time::timeout(deadline, c.status()).await {
                Err(_) => return Err(late("a status request")),
                Ok(Err(e)) => return Err(probe_failure(&e)),
                Ok(Ok(s)) => s,
            };
            let first_answer = start.elapsed();
            let names = format!("{}/n/", self.store.prefix);
            let opts = etcd_client::GetOptions::new()
                .with_prefix()
                .with_count_only();
            match tokio::time::timeout(deadline, c.get(names, Some(opts))).await {
                Err(_) => return Err(late("a read of the key prefix")),
                Ok(Err(e)) => return Err(probe_failure(&e)),
                Ok(Ok(_)) => {}
            }
            Ok(super::Answer {
                first_answer,
                version: status.version().to_string(),
            })
        })
    }
}

/// Names what kind of failure an error is, from its whole chain of causes (a TLS failure
/// is only named in the transport error's source).
fn probe_failure(e: &etcd_client::Error) -> super::ProbeFailure {
    use super::ProbeFailureKind as K;
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let s = c.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cause = c.source();
    }
    let lower = text.to_ascii_lowercase();
    let code = match e {
        etcd_client::Error::GRpcStatus(s) => Some(s.code()),
        _ => None,
    };
    // A failed handshake comes back as a transport error, or as a status "unavailable"
    // carrying the transport error.
    let tls = ["certificate", "tls", "handshake", "ssl"]
        .iter()
        .any(|w| lower.contains(w));
    let kind = match code {
        Some(tonic::Code::PermissionDenied) => K::Permission,
        Some(tonic::Code::Unauthenticated) => K::Auth,
        Some(tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition)
            if lower.contains("auth") =>
        {
            K::Auth
        }
        _ if tls => K::Tls,
        Some(tonic::Code::Unavailable) | None => K::Unreachable,
        Some(_) => K::Other,
    };
    super::ProbeFailure {
        kind,
        message: text,
    }
}
