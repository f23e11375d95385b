//! `cachelock serve`: a long-running, read-only view of one store for people (a dashboard that
//! updates itself) and for Prometheus (`/metrics`).
//!
//! Three kinds of threads share a [`hub::Hub`]:
//! - **the watcher** (the caller's thread) follows the store ([`crate::observe::watch`]) and
//!   reads the status document again after every change and at least every second; on etcd it
//!   also turns what the store's watch saw into reports (one `serve` sees the whole fleet);
//! - **the report receiver** (lock directories) reads the datagrams requests send to the
//!   directory's `serve` socket ([`crate::observe::notify`]), so that every request is counted
//!   — a 1 ms uncontended run included — not sampled. A datagram is a claim of whoever sent it:
//!   bounded, checked, counted only for a lock that exists, at most so many in flight per user
//!   (the sender's uid comes from the kernel, `SO_PASSCRED`); a user can forge only what they
//!   could do by running requests;
//! - **the HTTP server** ([`http`]), bounded in connections, time and memory, which only copies
//!   out what the hub has.
//!
//! `serve` never changes the store (not even a dead ticket is removed). It starts on an empty
//! or missing store and counts from its own start. It logs to stderr and ends cleanly on
//! SIGTERM, SIGINT or SIGHUP, removing its socket.

pub mod http;
pub mod hub;

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Loaded;
use crate::error::{Error, Kind, Result};
use crate::lock::Store;
use crate::observe::notify;
use crate::observe::report::{Report, MAX_REPORT_BYTES};
use crate::observe::status::StatusReader;
use crate::observe::watch::{StoreWatch, Wake};
use crate::output::status::render_json;
use crate::process::Signals;
use crate::sys::{self, DgramServer};
use hub::{Hub, Snapshot};

/// The longest the view goes without a fresh look at the store.
pub const REFRESH: Duration = Duration::from_secs(1);
/// The shortest time between two looks: a busy lock changes every few milliseconds, and a look
/// at every change would compete with the requests themselves for the lock's files and the
/// CPU. Counts do not depend on looks (every request reports itself); gauges and the page are
/// at most this late.
pub const LOOK_INTERVAL: Duration = Duration::from_millis(100);

/// What `serve` serves.
pub struct Settings {
    /// Where it listens.
    pub listen: SocketAddr,
    /// The store it watches.
    pub store: Store,
    /// The configuration (policies rank the waiters shown, as `status` does).
    pub loaded: Loaded,
    /// Why a lock directory is a private fallback, if it is.
    pub private_because: Option<String>,
    /// A cache root whose data roots are measured and exported.
    pub cache_root: Option<std::path::PathBuf>,
}

/// How often the cached data roots are looked at (a root is walked again only after a use).
pub const CACHE_REFRESH: Duration = Duration::from_secs(30);

/// The report socket in a lock directory, while it is ours.
struct Socket {
    dir: OwnedFd,
    name: String,
    id: (u64, u64),
}

impl Drop for Socket {
    fn drop(&mut self) {
        // Only the socket this serve bound (a successor may have replaced it).
        if sys::info_at(self.dir.as_fd(), &self.name).is_ok_and(|i| i.id() == self.id) {
            let _ = sys::unlink_at(self.dir.as_fd(), &self.name);
        }
    }
}

/// Runs until a terminating signal arrives on `signals`.
pub fn run(settings: Settings, signals: &Signals) -> Result<()> {
    // Every thread started below inherits it: a report or a change wakes serve without
    // taking the CPU from the request that caused it (measured: an uncontended run with serve
    // watching cost 3.5% more than without, 2% with this).
    if let Err(e) = sys::schedule_as_batch() {
        tracing::debug!("cannot run as a batch job: {e}");
    }
    let listener = TcpListener::bind(settings.listen).map_err(|e| {
        Error::new(
            Kind::OsErr,
            format!("cannot listen on {}: {e}", settings.listen),
        )
    })?;
    let addr = listener.local_addr().unwrap_or(settings.listen);
    if !addr.ip().is_loopback() {
        tracing::warn!(
            "listening on {addr}, beyond this machine: the dashboard, the metrics and the lock status (hosts, labels, queue keys) are readable by anyone who can reach it, without authentication"
        );
    }
    let hub = Arc::new(Hub::default());
    let mut reader = StatusReader::new(
        settings.loaded,
        &settings.store,
        settings.private_because,
        true,
    )?;
    let mut watch = StoreWatch::new(&settings.store, true)?;
    let root = match &settings.store {
        Store::Dir { path, .. } => Some(path.clone()),
        Store::Etcd(_) => None,
    };
    let mut socket = match &root {
        Some(root) => listen_for_reports(root, &hub)?,
        None => None,
    };
    if let Some(cache_root) = settings.cache_root.clone() {
        let hub = hub.clone();
        let lock_dir = root.clone();
        let cap = reader.loaded().config.dockerd.cache_max_size;
        // Measuring walks directories: never on the watcher's thread.
        std::thread::Builder::new()
            .name("cachelock-cache-measure".into())
            .spawn(move || measure_caches(&cache_root, lock_dir.as_deref(), cap, &hub))
            .map_err(|e| Error::new(Kind::OsErr, format!("cannot start a thread: {e}")))?;
    }
    // Something to serve from the first request on.
    look(&mut reader, &hub);
    let mut last_look = Instant::now();
    {
        let hub = hub.clone();
        std::thread::Builder::new()
            .name("cachelock-http-accept".into())
            .spawn(move || http::serve(listener, hub))
            .map_err(|e| Error::new(Kind::OsErr, format!("cannot start a thread: {e}")))?;
    }
    tracing::info!(
        "serving {} on http://{addr}/ (metrics: /metrics)",
        reader.backend().describe()
    );
    // A change seen and not looked at yet.
    let mut pending = false;
    loop {
        if let (Some(root), None) = (&root, &socket) {
            socket = listen_for_reports(root, &hub)?;
        }
        for e in watch.events() {
            hub.store_event(e);
        }
        hub.set_missed(watch.missed());
        let since = last_look.elapsed();
        if (pending && since >= LOOK_INTERVAL) || since >= REFRESH {
            look(&mut reader, &hub);
            last_look = Instant::now();
            pending = false;
        }
        if pending {
            // The look is due soon and will see whatever changes meanwhile: sleep until then
            // instead of waking at every change of a busy lock.
            let left = LOOK_INTERVAL.saturating_sub(last_look.elapsed());
            if sys::poll_readable(&[signals.fd()], Some(left)).is_some() {
                if let Some(sig) = signals.take_terminating() {
                    tracing::info!("signal {sig}: stopping");
                    return Ok(());
                }
            }
            continue;
        }
        let left = REFRESH.saturating_sub(last_look.elapsed());
        match watch.wait(left, &[signals.fd()]) {
            Wake::Ready(_) => {
                if let Some(sig) = signals.take_terminating() {
                    tracing::info!("signal {sig}: stopping");
                    return Ok(());
                }
            }
            Wake::Changed => pending = true,
            Wake::Timeout => {}
        }
    }
}

/// Reads the status document and publishes it.
fn look(reader: &mut StatusReader, hub: &Hub) {
    let doc = match reader.read(None) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!("cannot read {}: {e}", reader.backend().describe());
            return;
        }
    };
    hub.sweep(&doc);
    let (cache, cache_json) = hub.cache_view();
    hub.publish(Snapshot {
        json: render_json(&doc),
        gauges: hub::gauges(&doc),
        doc: Some(doc),
        cache,
        cache_json,
    });
}

/// Measures the cached data roots under `cache_root` every [`CACHE_REFRESH`], keeping what was
/// measured so that an unchanged root is not walked again, and hands the result to the hub.
fn measure_caches(cache_root: &Path, lock_dir: Option<&Path>, cap: Option<u64>, hub: &Hub) {
    use crate::dockerd::root::CacheRoot;
    use crate::dockerd::usage;
    use crate::observe::metrics::CacheGauge;
    let mut known = std::collections::BTreeMap::new();
    loop {
        match CacheRoot::open_existing(cache_root) {
            Ok(Some(cache)) => {
                let list = usage::list(&cache, lock_dir, cap, &mut known);
                let gauges = list
                    .roots
                    .iter()
                    .map(|r| CacheGauge {
                        cache_id: r.cache_id.clone(),
                        bytes: r.size_bytes,
                        last_used_ms: r.last_used_ms,
                    })
                    .collect();
                hub.set_cache_view(gauges, serde_json::to_string(&list).ok());
            }
            Ok(None) => hub.set_cache_view(Vec::new(), None),
            Err(e) => tracing::warn!("{}", e.message),
        }
        std::thread::sleep(CACHE_REFRESH);
    }
}

/// Binds this host's report socket in lock directory `root` and starts receiving on it;
/// `Ok(None)` while the directory does not exist (the first request creates it).
fn listen_for_reports(root: &Path, hub: &Arc<Hub>) -> Result<Option<Socket>> {
    let dir = match sys::open_dir(root) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::cant_create(format!(
                "cannot open the lock directory {}: {e}",
                root.display()
            )))
        }
    };
    let name = notify::socket_name();
    let path = root.join(&name);
    let cannot = |e: &dyn std::fmt::Display| {
        Error::cant_create(format!(
            "cannot bind the report socket {}: {e}",
            path.display()
        ))
    };
    let me = sys::euid();
    for _ in 0..4 {
        match DgramServer::bind_in(dir.as_fd(), &name, 0o666) {
            Ok(server) => {
                let id = sys::info_at(dir.as_fd(), &name)
                    .map_err(|e| cannot(&e))?
                    .id();
                let own = sys::open_dir(root).map_err(|e| cannot(&e))?;
                let hub = hub.clone();
                let root = root.to_path_buf();
                std::thread::Builder::new()
                    .name("cachelock-reports".into())
                    .spawn(move || receive(server, own, &root, &hub))
                    .map_err(|e| cannot(&e))?;
                tracing::info!("counting requests reported to {}", path.display());
                return Ok(Some(Socket { dir, name, id }));
            }
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
                let Ok(info) = sys::info_at(dir.as_fd(), &name) else {
                    continue;
                };
                let live = sys::connect_dgram_in(root, &name, |_| true, Duration::from_millis(1))
                    .is_ok_and(|s| s.is_some());
                // Another serve of ours (or root's) answers there: two would split the counts.
                if live && (info.uid == me || info.uid == 0) {
                    return Err(Error::cant_create(format!(
                        "another cachelock serve receives reports on {} (owner uid {}); stop it first",
                        path.display(),
                        info.uid
                    )));
                }
                // A stale socket, or anything another user put in the name's place (as root,
                // whose requests would not send to it anyway): removed, then bound again.
                if info.uid != me && me != 0 {
                    return Err(cannot(&format!(
                        "it exists and belongs to uid {}; its owner or root must remove it",
                        info.uid
                    )));
                }
                sys::unlink_at(dir.as_fd(), &name).map_err(|e| cannot(&e))?;
            }
            Err(e) => return Err(cannot(&e)),
        }
    }
    Err(cannot(&"the name keeps being taken"))
}

/// The report receiver: counts every datagram that passes the checks.
fn receive(server: DgramServer, dir: OwnedFd, root: &Path, hub: &Hub) {
    let mut buf = vec![0u8; MAX_REPORT_BYTES + 1];
    let mut known: HashSet<String> = HashSet::new();
    loop {
        sys::poll_readable(&[server.fd()], None);
        loop {
            let d = match server.recv(&mut buf) {
                Ok(Some(d)) => d,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("report socket in {}: {e}", root.display());
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            };
            if d.len > MAX_REPORT_BYTES {
                hub.refused();
                continue;
            }
            let r = match Report::decode(&buf[..d.len]) {
                Ok(r) => r,
                Err(why) => {
                    tracing::debug!("refused a report from uid {:?}: {why}", d.uid);
                    hub.refused();
                    continue;
                }
            };
            // Only locks that exist (every request creates its lock's directory first): a
            // datagram cannot make up lock names.
            if !known.contains(&r.lock) {
                let exists = sys::info_at(dir.as_fd(), &format!("{}.lock", r.lock))
                    .is_ok_and(|i| i.kind == sys::EntryKind::Dir);
                if !exists || !hub.admits(&r.lock) {
                    hub.refused();
                    continue;
                }
                known.insert(r.lock.clone());
            }
            hub.ingest(r, d.uid);
        }
    }
}
