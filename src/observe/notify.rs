//! Telling a running `serve` what a request does: on a lock directory, every request whose
//! directory has a `serve` socket sends it a datagram at its arrival, its acquisition and its
//! end ([`super::Report`]), so that `serve` counts every request — a 1 ms uncontended run
//! included — instead of sampling the queue.
//!
//! A request that takes the lock (or leaves) without waiting folds its arrival into that
//! report ([`Report::arrived`]): an uncontended run sends two datagrams, not three.
//!
//! The cost when nobody serves is one failed `openat`. A request sends only to a socket owned
//! by root or by its own user, found without following links (see `sys::connect_dgram_in`):
//! in a directory every user can write, nobody can point root's datagrams at another socket.
//! A `serve` that does not keep up never holds a request for long: a send waits at most
//! [`SEND_TIMEOUT`], once per request; later sends of that request do not wait. A report not
//! sent is counted, and the request's next report says how many were lost.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::report::Report;
use crate::lock::events::{Event, Now, Observer};
use crate::sys::{self, SendFailure};

/// The longest a request waits for room in `serve`'s queue, once.
pub const SEND_TIMEOUT: Duration = Duration::from_millis(50);

/// The name of this host's `serve` socket in a lock directory: one per host, so that a lock
/// directory shared over NFS can have a `serve` on every host (a unix socket only connects
/// processes of the host that bound it).
pub fn socket_name() -> String {
    let host = sys::hostname();
    let plain = host.len() <= 64
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if plain {
        format!(".serve.{host}.sock")
    } else {
        use sha2::{Digest, Sha256};
        let h = Sha256::digest(host.as_bytes());
        format!(
            ".serve.{:x}.sock",
            &h[..8].iter().fold(0u64, |a, b| a << 8 | *b as u64)
        )
    }
}

/// A request's link to the `serve` of its lock directory.
pub struct ServeLink {
    sock: OwnedFd,
    /// Reports not delivered so far.
    dropped: AtomicU32,
    /// A send timed out: the rest of the request does not wait.
    impatient: AtomicBool,
    /// Nobody receives any more.
    gone: AtomicBool,
    /// The arrival, until the request waits (then it is sent) or its next report carries it.
    arrival: Mutex<Option<Report>>,
}

impl ServeLink {
    /// The link to the `serve` of lock directory `dir`, if one runs there as root or as this
    /// user.
    pub fn connect(dir: &Path) -> Option<ServeLink> {
        let me = sys::euid();
        match sys::connect_dgram_in(
            dir,
            &socket_name(),
            |uid| uid == 0 || uid == me,
            SEND_TIMEOUT,
        ) {
            Ok(Some(sock)) => Some(ServeLink {
                sock,
                dropped: AtomicU32::new(0),
                impatient: AtomicBool::new(false),
                gone: AtomicBool::new(false),
                arrival: Mutex::new(None),
            }),
            Ok(None) => None,
            Err(e) => {
                tracing::debug!("not reporting to serve in {}: {e}", dir.display());
                None
            }
        }
    }

    /// Reports not delivered so far.
    pub fn dropped(&self) -> u32 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn send(&self, mut r: Report) {
        if self.gone.load(Ordering::Relaxed) {
            return;
        }
        r.dropped = self.dropped();
        let wait = !self.impatient.load(Ordering::Relaxed);
        match sys::send_dgram(self.sock.as_fd(), &r.encode(), wait) {
            Ok(()) => {}
            Err(SendFailure::Full) => {
                self.impatient.store(true, Ordering::Relaxed);
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::debug!("serve did not take a report in time ({n} lost so far)");
            }
            Err(SendFailure::Gone) => self.gone.store(true, Ordering::Relaxed),
        }
    }
}

impl Observer for ServeLink {
    fn event(&self, now: Now, event: &Event<'_>) {
        let pending = || {
            self.arrival
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
        };
        match event {
            Event::Arrived { .. } => {
                *self.arrival.lock().unwrap_or_else(|e| e.into_inner()) =
                    Report::from_event(now, event);
            }
            // It waits: `serve` shows it in the queue from now.
            Event::Waits { .. } => {
                if let Some(r) = pending() {
                    self.send(r);
                }
            }
            _ => {
                if let Some(mut r) = Report::from_event(now, event) {
                    r.arrived = pending().is_some();
                    self.send(r);
                }
            }
        }
    }
}
