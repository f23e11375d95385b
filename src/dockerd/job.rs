//! One run of a command beside a dockerd of its own, from the checks to the release: the
//! sequence `cachelock dockerd` and the Earthly drop-in share. A front end says what the run
//! is ([`Job`]: the cached root or a fresh one, how it is locked, what to load, the command);
//! [`run`] does the rest, in this order:
//!
//! 1. everything that can fail before anything is locked or started: image tarballs (not a
//!    FIFO), compose, the run directory, the cache root ([`CacheRoot`]);
//! 2. the data root ([`take`]): a cached root's lock — its queue, then Earthly's flock for the
//!    drop-in — and its slot's root; on the policy's fall-back, or without a cache, a fresh
//!    private root;
//! 3. instance directories of dead runs are swept (after the lock: a killed run's dockerd tree
//!    holds the lock until its last process is gone);
//! 4. the host-wide paths it may claim, dockerd, hygiene and loads, compose, the command,
//!    dockerd stopped ([`super::session`]);
//! 5. a fresh root is removed; a cached one is accounted against the cap (still locked);
//! 6. the locks are released.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::earthly::{Compose, RegistryLoad, Trace};
use super::hygiene::{self, Docker};
use super::private::{self, PrivateRoot};
use super::root::{self, CacheRoot};
use super::setup::Resolved;
use super::{claim, flock, session, usage};
use crate::error::Result;
use crate::lock::{self, Acquired, Containment, Guard, Options, Store};
use crate::policy::Policy;
use crate::process::Signals;

/// One run, as a front end resolved it.
#[derive(Debug)]
pub struct Job {
    /// The `dockerd:` configuration.
    pub resolved: Resolved,
    /// Where data roots live (created if missing; see [`CacheRoot`]).
    pub cache_root: PathBuf,
    /// What the run's data root is.
    pub root: RootKind,
    /// Image tarballs to load.
    pub loads: Vec<PathBuf>,
    /// Registry pulls (Earthly's embedded registry).
    pub registry_loads: Vec<RegistryLoad>,
    /// Compose, if requested.
    pub compose: Option<Compose>,
    /// The command.
    pub command: Vec<OsString>,
    /// Extra environment for the command (the run adds `CACHELOCK_DOCKERD_SLOT`).
    pub env: Vec<(String, String)>,
    /// The drop-in's step trace.
    pub trace: Trace,
}

/// What the run's data root is.
#[derive(Debug)]
pub enum RootKind {
    /// A fresh root of this run only, in the directory `dir` (relative to the cache root),
    /// removed afterwards.
    Fresh {
        /// Where it is made.
        dir: PathBuf,
    },
    /// The cached root `<cache root>/<name>`, used as it is: the caller holds its lock
    /// (Earthly's `--flock-acquired`).
    Unlocked {
        /// Its name under the cache root.
        name: String,
    },
    /// The cached root `<cache root>/<name>` (slot 0) or one of its slots, taken through
    /// `lock`.
    Locked {
        /// Its name under the cache root.
        name: String,
        /// How.
        lock: Box<CacheLock>,
    },
}

/// How a cached root is locked.
#[derive(Debug)]
pub struct CacheLock {
    /// The lock store.
    pub store: Store,
    /// The request (its name, slots, bounds, fall-back).
    pub options: Options,
    /// Also take Earthly's flock on `<root>/.earthly-docker-lock` (the drop-in), so that
    /// Earthly's own wrapper and cachelock exclude each other.
    pub earthly_flock: bool,
}

/// A data root taken for a run, and what keeps it.
#[derive(Debug)]
pub enum Taken {
    /// A cached root (the slot's root, relative to the cache root), with its locks when it was
    /// locked here.
    Cached {
        /// The slot's root, relative to the cache root.
        rel: PathBuf,
        /// The slot (0: the cached root itself).
        slot: u32,
        /// The locks, released when dropped.
        locks: Option<Locks>,
    },
    /// A fresh private root, removed afterwards.
    Fresh(PrivateRoot),
}

/// The locks of a cached root: cachelock's queue, and Earthly's flock for the drop-in.
#[derive(Debug)]
pub struct Locks {
    guard: Guard,
    earthly: Option<flock::Held>,
}

impl Locks {
    /// The kernel-locked descriptors (flock store) dockerd inherits, so that the locks stay
    /// held as long as any dockerd process lives; the lease (etcd) that must contain it.
    fn containment(&self) -> (Vec<RawFd>, Option<lock::Lease>) {
        let (mut fds, lease) = match self.guard.containment() {
            Containment::Inherit(fds) => (fds, None),
            Containment::Lease(l) => (Vec::new(), Some(l)),
        };
        fds.extend(self.earthly.iter().map(|h| h.file.as_raw_fd()));
        (fds, lease)
    }

    /// Releases the flock, then the queue.
    fn release(self) {
        drop(self.earthly);
        self.guard.release();
    }
}

/// Chooses and takes the run's data root: waits for a cached root's lock (and slot), falls
/// back to a fresh private root when the policy says so, or makes a fresh one. A cached root of
/// the layout of earlier releases is adopted into the slot's place.
pub fn take(
    cache: &CacheRoot,
    kind: &RootKind,
    policy: &mut dyn Policy,
    signals: &Signals,
    trace: Trace,
) -> Result<Taken> {
    let short = session::short_id();
    let (name, lock) = match kind {
        RootKind::Fresh { dir } => return Ok(Taken::Fresh(private::create(cache, dir, &short)?)),
        RootKind::Unlocked { name } => {
            cache.subdir(Path::new(name), true)?;
            return Ok(Taken::Cached {
                rel: root::slot_root(name, 0),
                slot: 0,
                locks: None,
            });
        }
        RootKind::Locked { name, lock } => (name, lock),
    };
    // Checked (and created) before its lock, which may live in it (the drop-in's queue).
    cache.subdir(Path::new(name), true)?;
    let opts = &lock.options;
    trace.step(format_args!(
        "locking {}: queue {} in {}{} ({} slot(s), priority {})",
        cache.path().join(name).display(),
        opts.name,
        lock_place(&lock.store),
        if lock.earthly_flock {
            format!(", then {}", super::earthly::LOCK_FILE)
        } else {
            String::new()
        },
        opts.slots,
        opts.priority
    ));
    let backend = lock::open(&lock.store)?;
    let guard = match lock::acquire(backend.as_ref(), opts, policy, signals)? {
        Acquired::Held(g) => g,
        Acquired::FellBack { reason } => {
            eprintln!(
                "cachelock: running on a fresh private data root instead of the cache {}: {reason}",
                cache.path().join(name).display()
            );
            return Ok(Taken::Fresh(private::create(
                cache,
                Path::new(root::PRIVATE_DIR),
                &short,
            )?));
        }
    };
    let earthly = if lock.earthly_flock {
        // Earthly's lock file is in the cached root itself (slot 0's), where its wrapper
        // looks: exclusive with one slot, as Earthly takes it; shared with several, so that
        // every slot holder keeps Earthly's own wrapper (which takes it exclusively) out.
        let file = cache.path().join(name).join(super::earthly::LOCK_FILE);
        let left = opts
            .wait_limit_ms
            .map(|ms| Duration::from_millis(ms).saturating_sub(guard.waited()));
        Some(flock::acquire_any(
            std::slice::from_ref(&file),
            opts.slots > 1,
            left,
            opts.conflict_exit_code,
            signals,
            opts.progress_interval,
            &format!(
                "{} (held outside cachelock, e.g. by Earthly's own wrapper)",
                file.display()
            ),
        )?)
    } else {
        None
    };
    let slot = guard.slot();
    root::adopt_old_slot(cache, name, slot)?;
    let rel = root::slot_root(name, slot);
    trace.step(format_args!(
        "slot {slot} of {}: {}",
        opts.slots,
        cache.path().join(&rel).display()
    ));
    Ok(Taken::Cached {
        rel,
        slot,
        locks: Some(Locks { guard, earthly }),
    })
}

fn lock_place(store: &Store) -> String {
    match store {
        Store::Dir { path, .. } => path.display().to_string(),
        Store::Etcd(e) => e.describe(),
    }
}

/// Runs `job` (see the module comment); returns the command's exit code.
pub fn run(job: Job, policy: &mut dyn Policy, signals: &Signals) -> Result<i32> {
    let Job {
        resolved,
        cache_root,
        root: kind,
        loads,
        registry_loads,
        compose,
        command,
        mut env,
        trace,
    } = job;
    hygiene::check_loadable(&loads)?;
    if compose.is_some() {
        Docker {
            cli: resolved.docker_cli.clone(),
            host: String::new(),
        }
        .compose_cli()?;
    }
    resolved.check_run_dir()?;
    let cache = CacheRoot::open(&cache_root)?;
    let taken = take(&cache, &kind, policy, signals, trace)?;
    super::setup::sweep_run_dir(&resolved.run_dir);

    let (data_root, cached, mut inherit, lease) = match &taken {
        Taken::Cached { rel, slot, locks } => {
            cache.subdir(rel, true)?;
            env.push(("CACHELOCK_DOCKERD_SLOT".to_string(), slot.to_string()));
            let (fds, lease) = locks.as_ref().map(Locks::containment).unwrap_or_default();
            (cache.path().join(rel), true, fds, lease)
        }
        Taken::Fresh(p) => (p.path.clone(), false, vec![p.fd()], None),
    };
    // Host-wide paths (Earthly's log and socket) when configured and free.
    let host = claim::HostPaths::claim(
        resolved.log_file.as_deref(),
        resolved.default_socket.as_deref(),
    );
    for (want, got) in [
        (&resolved.log_file, host.log().map(|l| l.path)),
        (&resolved.default_socket, host.sockets().pop()),
    ] {
        match (want, got) {
            (Some(w), None) => trace.step(format_args!(
                "{} is in use by another daemon; this dockerd keeps its own",
                w.display()
            )),
            (_, Some(g)) => trace.step(format_args!("dockerd uses {}", g.display())),
            _ => {}
        }
    }
    inherit.extend(host.fds());
    let cache_id = match (&kind, cached) {
        (RootKind::Locked { lock, .. }, true) => Some(lock.options.name.clone()),
        (RootKind::Unlocked { name }, _) => Some(name.clone()),
        _ => None,
    };
    let mut spec = resolved.spec(
        data_root.clone(),
        &session::short_id(),
        inherit,
        cache_id,
        host.log(),
        host.sockets(),
    );
    spec.lease = lease;
    let plan = session::Plan {
        spec,
        docker_cli: resolved.docker_cli.clone(),
        cached_prefix: cached.then(|| resolved.prefix.clone()),
        loads,
        registry_loads,
        compose,
        command,
        env,
        stop_grace_cap: resolved.stop_grace_cap,
    };
    trace.step(format_args!("starting dockerd on {}", data_root.display()));
    let result = session::run(&plan, policy, signals);

    match taken {
        Taken::Fresh(p) => {
            let path = p.path.clone();
            if let Err(err) = p.remove() {
                eprintln!("cachelock: could not remove {}: {err}", path.display());
            }
        }
        Taken::Cached { locks, .. } => {
            if let (Some(cap), RootKind::Locked { name, lock }) = (resolved.cache_max_size, &kind) {
                // Still holding the root: it is measured, never evicted.
                match (&lock.store, lock.earthly_flock) {
                    (_, true) => usage::report(&cache, &usage::Layout::Earthly, cap, name),
                    (Store::Dir { path, .. }, false) => usage::report(
                        &cache,
                        &usage::Layout::Dockerd {
                            lock_dir: path.clone(),
                        },
                        cap,
                        name,
                    ),
                    // Eviction takes each unheld root's lock without waiting, which it can
                    // only do on the lock files of a lock directory.
                    (Store::Etcd(e), false) => eprintln!(
                        "cachelock: dockerd.cache_max_size is not applied: eviction needs a lock directory (file://), not {}",
                        e.describe()
                    ),
                }
            }
            if let Some(l) = locks {
                l.release();
            }
        }
    }
    drop(host);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::native::DefaultPolicy;

    fn cached(opts: Options, dir: &Path, earthly_flock: bool) -> RootKind {
        RootKind::Locked {
            name: opts.name.clone(),
            lock: Box::new(CacheLock {
                store: Store::Dir {
                    path: dir.join("locks"),
                    file_mode: None,
                    dir_mode: None,
                },
                options: opts,
                earthly_flock,
            }),
        }
    }

    fn rel(t: &Taken) -> (PathBuf, u32) {
        match t {
            Taken::Cached { rel, slot, .. } => (rel.clone(), *slot),
            Taken::Fresh(p) => (p.path.clone(), u32::MAX),
        }
    }

    /// Issue 19, defect 8: turning slots on keeps the warm root as slot 0 (it used to become
    /// `<id>/slot-0`, inside the old root, which went cold); the other slots' roots are outside
    /// it; a root laid out by an earlier release is adopted.
    #[test]
    fn slots_keep_the_warm_root_first_and_no_root_is_inside_another() {
        let t = tempfile::tempdir().unwrap();
        let cache = CacheRoot::open(&t.path().join("cache")).unwrap();
        let signals = Signals::install().unwrap();
        let trace = Trace(false);
        let mut one = Options::new("ci");
        one.wait_limit_ms = Some(0);
        let a = take(
            &cache,
            &cached(one, t.path(), false),
            &mut DefaultPolicy,
            &signals,
            trace,
        )
        .unwrap();
        assert_eq!(rel(&a), (PathBuf::from("ci"), 0));
        std::fs::write(t.path().join("cache/ci/warm"), "").unwrap();
        drop(a);

        let mut three = Options::new("ci");
        three.slots = 3;
        three.wait_limit_ms = Some(0);
        let held: Vec<Taken> = (0..3)
            .map(|_| {
                take(
                    &cache,
                    &cached(three.clone(), t.path(), true),
                    &mut DefaultPolicy,
                    &signals,
                    trace,
                )
                .unwrap()
            })
            .collect();
        let roots: Vec<(PathBuf, u32)> = held.iter().map(rel).collect();
        assert_eq!(roots[0], (PathBuf::from("ci"), 0), "{roots:?}");
        assert!(
            t.path().join("cache/ci/warm").exists(),
            "the warm root stays slot 0"
        );
        for (r, _) in &roots[1..] {
            assert!(r.starts_with(root::SLOTS_DIR), "{r:?}");
        }
        // A fourth waits (here: gives up at once), whichever slot it asks for.
        let e = take(
            &cache,
            &cached(three.clone(), t.path(), true),
            &mut DefaultPolicy,
            &signals,
            trace,
        )
        .unwrap_err();
        assert_eq!(e.exit_code(), 1, "{e}");
        drop(held);

        // The layout of earlier releases: <id>/slot-K.
        std::fs::create_dir_all(t.path().join("cache/old/slot-0/image")).unwrap();
        let mut old = Options::new("old");
        old.slots = 2;
        let o = take(
            &cache,
            &cached(old, t.path(), false),
            &mut DefaultPolicy,
            &signals,
            trace,
        )
        .unwrap();
        assert_eq!(rel(&o), (PathBuf::from("old"), 0));
        assert!(t.path().join("cache/old/image").is_dir());
        assert!(!t.path().join("cache/old/slot-0").exists());
    }

    #[test]
    fn fresh_roots_are_private_and_removed() {
        let t = tempfile::tempdir().unwrap();
        let cache = CacheRoot::open(t.path()).unwrap();
        let signals = Signals::install().unwrap();
        let kind = RootKind::Fresh {
            dir: PathBuf::from(root::PRIVATE_DIR),
        };
        let f = take(&cache, &kind, &mut DefaultPolicy, &signals, Trace(false)).unwrap();
        let Taken::Fresh(p) = f else { panic!("fresh") };
        assert!(p.path.starts_with(t.path().join(root::PRIVATE_DIR)));
        let path = p.path.clone();
        p.remove().unwrap();
        assert!(!path.exists());
    }
}
