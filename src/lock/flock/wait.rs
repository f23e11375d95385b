//! How a waiter sleeps: inotify on `queue/` where the directory is local, timed polling where it
//! is on a network filesystem (inotify does not see other clients' changes there).

use std::os::fd::BorrowedFd;
use std::time::Instant;

use crate::config::WaitMode;
use crate::lock::backend::Wake;
use crate::sys::{self, DirChange, DirWatch};

/// Resolves `auto` for the lock state in `dir`: poll on network filesystems, else notify.
pub fn effective_mode(requested: WaitMode, dir: BorrowedFd<'_>) -> WaitMode {
    match requested {
        WaitMode::Auto if sys::is_network_fs_fd(dir) => WaitMode::Poll,
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
        if !self.started {
            self.started = true;
            if self.mode != WaitMode::Poll {
                self.watch = DirWatch::on_fd(queue).ok();
                return Wake::Changed;
            }
        }
        let timeout = until.map(|u| u.saturating_duration_since(Instant::now()));
        let ready = match &self.watch {
            Some(w) => sys::poll_readable(&[signal_fd, w.fd()], timeout),
            None => sys::poll_readable(&[signal_fd], timeout),
        };
        match ready {
            Some(0) => Wake::Signal,
            Some(_) => match self.watch.as_ref().map(DirWatch::drain) {
                Some(DirChange::OnlyRemovals) => Wake::Removed,
                Some(DirChange::None) => Wake::Timeout,
                _ => Wake::Changed,
            },
            None => Wake::Timeout,
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(w) = self.watch.take() {
            w.close_in_background();
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
        assert_eq!(effective_mode(WaitMode::Auto, dir), WaitMode::Notify);
        assert_eq!(effective_mode(WaitMode::Poll, dir), WaitMode::Poll);
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
