//! How a waiter sleeps: inotify on `queue/` where the directory is local, timed polling where it
//! is on a network filesystem (inotify does not see other clients' changes there).

use std::os::fd::BorrowedFd;
use std::time::Instant;

use crate::config::WaitMode;
use crate::lock::backend::Wake;
use crate::sys::{self, DirChange, DirWatch};

/// Resolves `auto` for lock state on a network filesystem or not: poll there, else notify.
pub fn effective_mode(requested: WaitMode, network: bool) -> WaitMode {
    match requested {
        WaitMode::Auto if network => WaitMode::Poll,
        WaitMode::Auto => WaitMode::Notify,
        m => m,
    }
}

/// Watches `queue/` once a request is contended (an uncontended request never pays for
/// inotify), or only sleeps in poll mode.
#[derive(Debug)]
pub struct Watcher {
    mode: WaitMode,
    watch: Option<DirWatch>,
    started: bool,
}

impl Watcher {
    /// A watcher that starts watching on its first [`Watcher::wait`].
    pub fn new(mode: WaitMode) -> Watcher {
        Watcher {
            mode,
            watch: None,
            started: false,
        }
    }

    /// Whether changes are seen (notify) rather than polled for.
    pub fn notifies(&self) -> bool {
        self.watch.is_some()
    }

    /// Sleeps until a change in `queue`, a signal on `signal_fd`, or `until`. The first call
    /// sets up inotify (notify mode; a failure such as too many watches falls back to polling)
    /// and returns `Changed` at once, so that nothing since the caller's last scan is missed.
    pub fn wait(
        &mut self,
        queue: BorrowedFd<'_>,
        signal_fd: BorrowedFd<'_>,
        until: Option<Instant>,
    ) -> Wake {
        if self.start(queue) {
            return Wake::Changed;
        }
        match self.sleep(signal_fd, None, until) {
            Seen::Signal => Wake::Signal,
            // No other descriptor was given.
            Seen::Other => Wake::Timeout,
            Seen::Queue(DirChange::OnlyRemovals) => Wake::Removed,
            Seen::Queue(DirChange::None) | Seen::Timeout => Wake::Timeout,
            Seen::Queue(DirChange::Other) => Wake::Changed,
        }
    }

    /// Sets up inotify on `queue` on the first call in notify mode (a failure such as too many
    /// instances falls back to polling); true when it was set up now (changes before this call
    /// were not seen).
    fn start(&mut self, queue: BorrowedFd<'_>) -> bool {
        if self.started {
            return false;
        }
        self.started = true;
        if self.mode == WaitMode::Poll {
            return false;
        }
        self.watch = DirWatch::on_fd(queue).ok();
        true
    }

    /// Sleeps until a signal on `signal_fd`, `other` becomes readable, a change in the queue
    /// (once [`Watcher::start`]ed in notify mode), or `until`.
    pub fn sleep(
        &mut self,
        signal_fd: BorrowedFd<'_>,
        other: Option<BorrowedFd<'_>>,
        until: Option<Instant>,
    ) -> Seen {
        let timeout = until.map(|u| u.saturating_duration_since(Instant::now()));
        let mut fds = vec![signal_fd];
        fds.extend(other);
        fds.extend(self.watch.as_ref().map(DirWatch::fd));
        match sys::poll_readable(&fds, timeout) {
            Some(0) => Seen::Signal,
            Some(1) if other.is_some() => Seen::Other,
            Some(_) => Seen::Queue(
                self.watch
                    .as_ref()
                    .map(DirWatch::drain)
                    .unwrap_or(DirChange::None),
            ),
            None => Seen::Timeout,
        }
    }
}

/// What [`Watcher::sleep`] saw first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The signal descriptor is readable.
    Signal,
    /// The other descriptor is readable.
    Other,
    /// The queue changed (or, `None`, only looked like it).
    Queue(DirChange),
    /// `until` passed.
    Timeout,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(w) = self.watch.take() {
            w.close_later();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::time::Duration;

    #[test]
    fn auto_is_notify_on_local_disks_and_explicit_modes_win() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = sys::open_dir(tmp.path()).unwrap();
        let dir = dir.as_fd();
        let network = sys::is_network_fs_fd(dir);
        assert!(!network);
        assert_eq!(effective_mode(WaitMode::Auto, network), WaitMode::Notify);
        assert_eq!(effective_mode(WaitMode::Auto, true), WaitMode::Poll);
        assert_eq!(effective_mode(WaitMode::Poll, network), WaitMode::Poll);
        let (r, _keep) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut w = Watcher::new(WaitMode::Notify);
        let soon = || Some(Instant::now() + Duration::from_secs(5));
        assert_eq!(w.wait(dir, r.as_fd(), soon()), Wake::Changed);
        assert!(w.notifies());
        std::fs::write(tmp.path().join("x"), "").unwrap();
        assert_eq!(w.wait(dir, r.as_fd(), soon()), Wake::Changed);
        std::fs::remove_file(tmp.path().join("x")).unwrap();
        assert_eq!(w.wait(dir, r.as_fd(), soon()), Wake::Removed);
        let now = Some(Instant::now());
        assert_eq!(w.wait(dir, r.as_fd(), now), Wake::Timeout);
        let mut p = Watcher::new(WaitMode::Poll);
        assert_eq!(p.wait(dir, r.as_fd(), now), Wake::Timeout);
        assert!(!p.notifies());
    }
}
