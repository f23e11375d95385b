//! The backend property suite (`cachelock::lock::conformance`) on a lock directory and on a real
//! 3-member etcd cluster. The memory backend runs the same suite as unit tests.

use std::time::Duration;

use cachelock::lock::conformance::Harness;
use cachelock::lock::etcd::{EtcdBackend, EtcdStore};
use cachelock::lock::flock::FlockBackend;
use cachelock::lock::{Backend, TicketData};

use crate::support::etcd::{shared, Cluster};

/// A fresh lock directory.
struct Dir {
    tmp: tempfile::TempDir,
    backend: FlockBackend,
}

impl Dir {
    fn new() -> Dir {
        let tmp = tempfile::tempdir().unwrap();
        let backend = FlockBackend::open(&tmp.path().join("locks"), None, None).unwrap();
        Dir { tmp, backend }
    }
}

impl Harness for Dir {
    fn backend(&self) -> &(dyn Backend + Sync) {
        &self.backend
    }

    /// A kernel lock cannot be taken from its holder; what comes closest, removing the lock
    /// file while it is held, must not let a second holder in.
    fn take_away(&self, held: &TicketData) -> bool {
        let file = self
            .tmp
            .path()
            .join(format!("locks/{}.lock/lock", held.request().lock));
        std::fs::remove_file(&file).unwrap();
        false
    }
}

cachelock::conformance_suite!(flock, Dir::new());

/// A key prefix of its own on the shared cluster, with a short lease.
struct Etcd {
    cluster: &'static Cluster,
    prefix: String,
    backend: EtcdBackend,
}

impl Etcd {
    fn new() -> Etcd {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let cluster = shared();
        let prefix = format!(
            "conf{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let mut store = EtcdStore::from_url(&cluster.url(&prefix)).unwrap();
        store.lease_ttl = Duration::from_secs(2);
        store.request_timeout = Duration::from_millis(500);
        store.unavailable_timeout = Duration::from_secs(8);
        Etcd {
            cluster,
            prefix,
            backend: EtcdBackend::connect(&store).unwrap(),
        }
    }
}

impl Harness for Etcd {
    fn backend(&self) -> &(dyn Backend + Sync) {
        &self.backend
    }

    /// Revokes the holder key's lease, as an ordinary client of the prefix can.
    fn take_away(&self, held: &TicketData) -> bool {
        let key = format!("{}/l/{}/h/", self.prefix, held.request().lock);
        let out = self
            .cluster
            .etcdctl(&["get", "--prefix", &key, "--write-out=json"]);
        assert!(out.status.success(), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let kvs = v["kvs"].as_array().expect("a holder key");
        assert_eq!(kvs.len(), 1, "{v}");
        let lease = kvs[0]["lease"].as_i64().expect("on a lease");
        let out = self
            .cluster
            .etcdctl(&["lease", "revoke", &format!("{lease:x}")]);
        assert!(out.status.success(), "{out:?}");
        true
    }
}

cachelock::conformance_suite!(etcd, Etcd::new());
