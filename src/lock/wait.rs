//! How a waiter sleeps: inotify on `queue/` where the directory is local, timed polling where it
//! is on a network filesystem (inotify does not see other clients' changes there).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use crate::config::WaitMode;

/// statfs `f_type` values of filesystems whose changes other hosts make (or that a userspace
/// server makes) are invisible to inotify: NFS, CIFS/SMB, SMB2, FUSE, Ceph, 9p.
const NETWORK_FS: [i64; 7] = [
    0x6969,     // NFS_SUPER_MAGIC
    0x517B,     // SMB_SUPER_MAGIC
    0xFF534D42, // CIFS_MAGIC_NUMBER
    0xFE534D42, // SMB2_MAGIC_NUMBER
    0x65735546, // FUSE_SUPER_MAGIC
    0x00C36400, // CEPH_SUPER_MAGIC
    0x01021997, // V9FS_MAGIC
];

/// Whether `dir` is on a filesystem where inotify cannot be trusted.
pub fn is_network_fs(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: zeroed statfs is a valid out-parameter; `c` is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    NETWORK_FS.contains(&(st.f_type as i64))
}

/// Resolves `auto` for the lock state under `dir`: poll on network filesystems, else notify.
pub fn effective_mode(requested: WaitMode, dir: &Path) -> WaitMode {
    match requested {
        WaitMode::Auto if is_network_fs(dir) => WaitMode::Poll,
        WaitMode::Auto => WaitMode::Notify,
        m => m,
    }
}

/// Why a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The signal descriptor became readable.
    Signal,
    /// The queue changed (or inotify overflowed: re-evaluate to be safe).
    Changed,
    /// Tickets only left the queue: nobody new can rank before us, so a waiter in the head set
    /// may try the lock before re-scanning.
    Removed,
    /// The timeout passed with nothing seen.
    Timeout,
}

/// Watches `queue/` (notify mode) or nothing (poll mode).
#[derive(Debug)]
pub struct Watcher {
    inotify: Option<OwnedFd>,
}

impl Watcher {
    /// Starts watching `queue` in notify mode; poll mode (or an inotify failure, e.g. too many
    /// watches) gives a watcher that only times out.
    pub fn new(queue: &Path, mode: WaitMode) -> Watcher {
        if mode == WaitMode::Poll {
            return Watcher { inotify: None };
        }
        Watcher {
            inotify: inotify_on(queue).ok(),
        }
    }

    /// Whether changes are seen (notify) rather than polled for.
    pub fn notifies(&self) -> bool {
        self.inotify.is_some()
    }

    /// Sleeps until a change, a signal on `signal_fd`, or `timeout`.
    pub fn wait(&self, signal_fd: RawFd, timeout: Duration) -> Wake {
        let mut fds = [
            libc::pollfd {
                fd: signal_fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.inotify.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // Round sub-millisecond remainders up so a short timeout does not become a busy loop.
        let ms = if ms == 0 && !timeout.is_zero() { 1 } else { ms };
        // SAFETY: two valid pollfd entries (a negative fd is ignored by poll).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if n <= 0 {
            return Wake::Timeout;
        }
        if fds[0].revents != 0 {
            return Wake::Signal;
        }
        if fds[1].revents != 0 {
            return if self.drain_only_removals() {
                Wake::Removed
            } else {
                Wake::Changed
            };
        }
        Wake::Timeout
    }

    /// Reads all pending events; true when every one was a removal.
    fn drain_only_removals(&self) -> bool {
        let Some(fd) = &self.inotify else {
            return false;
        };
        let mut buf = [0u8; 4096];
        let mut only_removals = true;
        let mut any = false;
        loop {
            // SAFETY: reading into a stack buffer of the given length.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            let n = n as usize;
            let head = std::mem::size_of::<libc::inotify_event>();
            let mut off = 0;
            while off + head <= n {
                // SAFETY: the kernel wrote a whole event header at `off`; read it unaligned.
                let ev: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf[off..].as_ptr().cast()) };
                any = true;
                if ev.mask & (libc::IN_DELETE | libc::IN_MOVED_FROM) == 0 {
                    only_removals = false;
                }
                off += head + ev.len as usize;
            }
        }
        any && only_removals
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(fd) = self.inotify.take() {
            close_in_background(fd);
        }
    }
}

/// Closing an inotify instance waits for an RCU grace period (often 5–20 ms): far too long for
/// the path between taking a lock and starting the command. A closer thread does it instead.
fn close_in_background(fd: OwnedFd) {
    use std::sync::mpsc::{channel, Sender};
    use std::sync::{Mutex, OnceLock};
    static CLOSER: OnceLock<Mutex<Sender<OwnedFd>>> = OnceLock::new();
    let tx = CLOSER.get_or_init(|| {
        let (tx, rx) = channel::<OwnedFd>();
        let spawned = std::thread::Builder::new()
            .name("cachelock-inotify-close".into())
            .spawn(move || {
                for fd in rx {
                    drop(fd);
                }
            });
        if spawned.is_err() {
            tracing::debug!("no closer thread; inotify descriptors close inline");
        }
        Mutex::new(tx)
    });
    if let Ok(tx) = tx.lock() {
        // If the thread could not be started the send fails and drops `fd` here.
        let _ = tx.send(fd);
    }
}

fn inotify_on(dir: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mask = libc::IN_CREATE
        | libc::IN_DELETE
        | libc::IN_MOVED_TO
        | libc::IN_MOVED_FROM
        | libc::IN_DONT_FOLLOW
        | libc::IN_ONLYDIR;
    // SAFETY: valid inotify fd and NUL-terminated path.
    if unsafe { libc::inotify_add_watch(fd, c.as_ptr(), mask) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_notify_on_local_disks_and_explicit_modes_win() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(!is_network_fs(tmp.path()));
        assert_eq!(effective_mode(WaitMode::Auto, tmp.path()), WaitMode::Notify);
        assert_eq!(effective_mode(WaitMode::Poll, tmp.path()), WaitMode::Poll);
        let w = Watcher::new(tmp.path(), WaitMode::Notify);
        assert!(w.notifies());
        let (r, _keep) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::AsRawFd;
        std::fs::write(tmp.path().join("x"), "").unwrap();
        assert_eq!(w.wait(r.as_raw_fd(), Duration::from_secs(5)), Wake::Changed);
        assert_eq!(
            w.wait(r.as_raw_fd(), Duration::from_millis(10)),
            Wake::Timeout
        );
        assert!(!Watcher::new(tmp.path(), WaitMode::Poll).notifies());
    }
}
