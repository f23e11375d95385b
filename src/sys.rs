//! The one system-call layer: every direct request to the kernel that the standard library does
//! not make (flock, inotify, poll, statfs, access, parent-death signals, descriptor flags,
//! signals to other processes). Built on rustix, so call sites stay safe; the few calls rustix
//! does not cover go through `libc` here and nowhere else.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use rustix::fs::FlockOperation;

/// Takes `flock(2)` on `fd` without blocking: `Ok(true)` when taken, `Ok(false)` when another
/// open file description holds a conflicting lock.
pub fn try_flock(fd: impl AsFd, exclusive: bool) -> io::Result<bool> {
    let op = if exclusive {
        FlockOperation::NonBlockingLockExclusive
    } else {
        FlockOperation::NonBlockingLockShared
    };
    match rustix::fs::flock(fd, op) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Takes `flock(2)` on `fd`, blocking until it is granted (signals that interrupt the wait are
/// retried: callers that must stay interruptible use [`try_flock`]).
pub fn flock(fd: impl AsFd, exclusive: bool) -> io::Result<()> {
    let op = if exclusive {
        FlockOperation::LockExclusive
    } else {
        FlockOperation::LockShared
    };
    loop {
        match rustix::fs::flock(fd.as_fd(), op) {
            Err(rustix::io::Errno::INTR) => continue,
            r => return r.map_err(Into::into),
        }
    }
}

/// How a file in a directory that other users may write is opened.
#[derive(Debug, Clone, Copy)]
pub enum Open {
    /// Read-write, created with this mode if missing (the umask applies).
    Create(u32),
    /// Read-write if it exists.
    Existing,
}

/// Opens `path` for locking or reading in a directory that other users may write:
/// `O_NOFOLLOW` (a planted symlink is refused with ELOOP), `O_NONBLOCK` (a planted FIFO cannot
/// block the open), `O_CLOEXEC`, and only regular files are accepted. Read-write because NFS
/// emulates flock with POSIX locks, which need a writable descriptor for exclusive locks.
pub fn open_in_shared_dir(path: &Path, how: Open) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if let Open::Create(mode) = how {
        o.create(true).mode(mode);
    }
    o.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC);
    regular(o.open(path)?)
}

/// Like [`open_in_shared_dir`] for another process's file: read-write where permitted, else
/// read-only (enough for a local flock probe and for reading).
pub fn open_other(path: &Path) -> io::Result<File> {
    match open_in_shared_dir(path, Open::Existing) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => regular(
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(path)?,
        ),
        r => r,
    }
}

fn regular(f: File) -> io::Result<File> {
    if f.metadata()?.file_type().is_file() {
        Ok(f)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ))
    }
}

/// Whether `f` is still the file at `path` (same device and inode, the path not a symlink).
pub fn is_same_file(f: &File, path: &Path) -> bool {
    match (f.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// An inotify instance watching one directory for entries created, removed or renamed.
#[derive(Debug)]
pub struct DirWatch {
    fd: OwnedFd,
}

/// What a drained [`DirWatch`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirChange {
    /// Nothing was pending.
    None,
    /// Only removals (entries deleted or renamed away).
    OnlyRemovals,
    /// Anything else, or an overflow (then anything may have happened).
    Other,
}

impl DirWatch {
    /// Watches `dir` (not following a symlink in its place).
    pub fn new(dir: &Path) -> io::Result<DirWatch> {
        use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
        let fd = inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC)?;
        inotify::add_watch(
            &fd,
            dir,
            WatchFlags::CREATE
                | WatchFlags::DELETE
                | WatchFlags::MOVED_TO
                | WatchFlags::MOVED_FROM
                | WatchFlags::DONT_FOLLOW
                | WatchFlags::ONLYDIR,
        )?;
        Ok(DirWatch { fd })
    }

    /// The descriptor to poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Reads every pending event.
    pub fn drain(&self) -> DirChange {
        use rustix::fs::inotify::{ReadFlags, Reader};
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut reader = Reader::new(&self.fd, &mut buf);
        let mut seen = DirChange::None;
        while let Ok(ev) = reader.next() {
            let removal = ev
                .events()
                .intersects(ReadFlags::DELETE | ReadFlags::MOVED_FROM)
                && !ev.events().contains(ReadFlags::QUEUE_OVERFLOW);
            seen = match (seen, removal) {
                (DirChange::Other, _) | (_, false) => DirChange::Other,
                _ => DirChange::OnlyRemovals,
            };
        }
        seen
    }

    /// Hands the descriptor to a closer thread: closing an inotify instance waits for an RCU
    /// grace period (often 5–20 ms), far too long for the path between taking a lock and
    /// starting the command.
    pub fn close_in_background(self) {
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
            // If the thread could not be started the send fails and drops the fd here.
            let _ = tx.send(self.fd);
        }
    }
}

/// Waits until one of `fds` is readable or `timeout` passes; returns the index of the first
/// readable one. A sub-millisecond remainder is rounded up so a short timeout never spins.
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout: Option<Duration>) -> Option<usize> {
    use rustix::event::{PollFd, PollFlags};
    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::from_borrowed_fd(*fd, PollFlags::IN))
        .collect();
    let ts = timeout.map(|t| {
        let t = if t.is_zero() || t >= Duration::from_millis(1) {
            t
        } else {
            Duration::from_millis(1)
        };
        rustix::time::Timespec {
            tv_sec: t.as_secs().min(i64::MAX as u64) as i64,
            tv_nsec: t.subsec_nanos() as _,
        }
    });
    match rustix::event::poll(&mut pfds, ts.as_ref()) {
        Ok(n) if n > 0 => pfds.iter().position(|p| !p.revents().is_empty()),
        _ => None,
    }
}

/// statfs `f_type` values of filesystems whose changes other hosts make (or that a userspace
/// server makes) are invisible to inotify: NFS, CIFS/SMB, SMB2, FUSE, Ceph, 9p.
const NETWORK_FS: [u64; 7] = [
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
    rustix::fs::statfs(dir)
        .map(|st| NETWORK_FS.contains(&(st.f_type as u64)))
        .unwrap_or(false)
}

/// Whether this process may create and remove entries in `dir` (`access(W_OK|X_OK)`, which
/// also honours read-only mounts).
pub fn can_write_dir(dir: &Path) -> bool {
    use rustix::fs::Access;
    rustix::fs::access(dir, Access::WRITE_OK | Access::EXEC_OK).is_ok()
}

/// The host name (for people only: liveness never depends on it).
pub fn hostname() -> String {
    let u = rustix::system::uname();
    let name = u.nodename().to_string_lossy();
    if name.is_empty() {
        "unknown".to_string()
    } else {
        name.into_owned()
    }
}

/// `uname -a`'s fields: sysname, nodename, release, version, machine.
pub fn uname_all() -> String {
    let u = rustix::system::uname();
    [
        u.sysname(),
        u.nodename(),
        u.release(),
        u.version(),
        u.machine(),
    ]
    .iter()
    .map(|f| f.to_string_lossy())
    .collect::<Vec<_>>()
    .join(" ")
}

/// The real user id of this process.
pub fn uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// Sends `sig` to process `pid` (a negative `pid` names a process group); errors (already gone,
/// not permitted) are returned for callers that care.
pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether process `pid` exists (it may belong to another user).
pub fn process_exists(pid: i32) -> bool {
    match kill(pid, 0) {
        Ok(()) => true,
        Err(e) => e.raw_os_error() == Some(libc::EPERM),
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: one clock for every process on this machine (lease
/// deadlines shared between cachelock and its guardians).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Makes this process a child subreaper: orphaned descendants are re-parented to it rather
/// than to init, so that it can find and stop all of them.
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes an integer flag and has no memory preconditions.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reaps one exited child, if any, without blocking: `(pid, raw wait status)`.
pub fn reap_any() -> Option<(i32, i32)> {
    let mut status = 0;
    // SAFETY: waitpid writes the status into our integer.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    (pid > 0).then_some((pid, status))
}

/// For a forked child before exec: moves it into a new network namespace.
pub fn new_network_namespace() -> io::Result<()> {
    // SAFETY: only NEWNET is unshared (the hazard of unshare is FILES, unused here).
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
        .map_err(Into::into)
}

/// Detaches the mount at `path` (`umount2(MNT_DETACH)`).
pub fn detach_mount(path: &Path) -> io::Result<()> {
    rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH).map_err(Into::into)
}

/// For a forked child before exec: keeps `fds` open across exec, asks for `sig` when the
/// parent dies, and sends it at once if the parent is already gone (not `parent`); `sig` 0
/// asks for nothing. Only raw system calls, so it is safe between fork and exec.
pub fn prepare_child(fds: &[RawFd], sig: i32, parent: u32) -> io::Result<()> {
    use rustix::io::{fcntl_getfd, fcntl_setfd, FdFlags};
    for &fd in fds {
        // SAFETY: the caller passes descriptors it keeps open across the fork.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let flags = fcntl_getfd(fd)?;
        fcntl_setfd(fd, flags - FdFlags::CLOEXEC)?;
    }
    if sig == 0 {
        return Ok(());
    }
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and has no memory preconditions.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32) != Some(parent) {
        // SAFETY: signalling ourselves.
        unsafe { libc::kill(libc::getpid(), sig) };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flock_conflicts_between_descriptions() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("l");
        let a = open_in_shared_dir(&p, Open::Create(0o644)).unwrap();
        let b = open_in_shared_dir(&p, Open::Existing).unwrap();
        assert!(try_flock(&a, true).unwrap());
        assert!(!try_flock(&b, false).unwrap());
        drop(a);
        assert!(try_flock(&b, false).unwrap());
    }

    #[test]
    fn fifos_and_symlinks_are_refused_without_blocking() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
        assert!(open_in_shared_dir(&fifo, Open::Existing).is_err());
        assert!(open_other(&fifo).is_err());
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(tmp.path().join("target"), &link).unwrap();
        let e = open_in_shared_dir(&link, Open::Create(0o644)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        assert!(!tmp.path().join("target").exists());
    }

    #[test]
    fn dir_watch_tells_removals_from_other_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let w = DirWatch::new(tmp.path()).unwrap();
        assert_eq!(w.drain(), DirChange::None);
        std::fs::write(tmp.path().join("x"), "").unwrap();
        assert_eq!(
            poll_readable(&[w.fd()], Some(Duration::from_secs(5))),
            Some(0)
        );
        assert_eq!(w.drain(), DirChange::Other);
        std::fs::remove_file(tmp.path().join("x")).unwrap();
        assert_eq!(
            poll_readable(&[w.fd()], Some(Duration::from_secs(5))),
            Some(0)
        );
        assert_eq!(w.drain(), DirChange::OnlyRemovals);
        assert_eq!(poll_readable(&[w.fd()], Some(Duration::ZERO)), None);
        assert!(!is_network_fs(tmp.path()));
        assert!(can_write_dir(tmp.path()));
    }
}
