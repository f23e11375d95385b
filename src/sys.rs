//! The one system-call layer: every direct request to the kernel that the standard library does
//! not make (flock, inotify, poll, statfs, access, parent-death signals, descriptor flags,
//! signals to other processes). Built on rustix, so call sites stay safe; the few calls rustix
//! does not cover go through `libc` here and nowhere else.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
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

/// Takes an open-file-description lock (`F_OFD_SETLK`, whole file) on `fd`: shared or
/// exclusive, without waiting. `Ok(false)` when another description holds a conflicting one.
/// On local filesystems these locks are independent of `flock(2)` locks on the same file.
/// Never on a network filesystem: NFS emulates `flock` with the same byte-range locks, so an
/// unlock would drop the emulated `flock` too.
pub fn try_ofd_lock(fd: impl AsFd, exclusive: bool) -> io::Result<bool> {
    match ofd_fcntl(fd.as_fd(), libc::F_OFD_SETLK, ofd_type(exclusive)) {
        Ok(_) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Waits for an open-file-description lock on `fd` (shared or exclusive), for as long as
/// another description holds a conflicting one. A signal whose handler does not restart system
/// calls (see [`Interruptible`]) ends the wait with `Interrupted`.
pub fn ofd_lock_wait(fd: impl AsFd, exclusive: bool) -> io::Result<()> {
    ofd_fcntl(fd.as_fd(), libc::F_OFD_SETLKW, ofd_type(exclusive)).map(|_| ())
}

/// Drops this description's open-file-description lock on `fd`.
pub fn ofd_unlock(fd: impl AsFd) -> io::Result<()> {
    ofd_fcntl(
        fd.as_fd(),
        libc::F_OFD_SETLK,
        libc::F_UNLCK as libc::c_short,
    )
    .map(|_| ())
}

/// Whether another description holds an exclusive open-file-description lock on `fd`
/// (`F_OFD_GETLK` for a shared lock).
pub fn ofd_locked_exclusively(fd: impl AsFd) -> io::Result<bool> {
    let ty = ofd_fcntl(
        fd.as_fd(),
        libc::F_OFD_GETLK,
        libc::F_RDLCK as libc::c_short,
    )?;
    Ok(ty != libc::F_UNLCK as libc::c_short)
}

fn ofd_type(exclusive: bool) -> libc::c_short {
    if exclusive {
        libc::F_WRLCK as libc::c_short
    } else {
        libc::F_RDLCK as libc::c_short
    }
}

/// One `fcntl` lock command on the whole file; returns the lock type the kernel left in the
/// structure (what `F_OFD_GETLK` reports).
fn ofd_fcntl(fd: BorrowedFd<'_>, cmd: libc::c_int, ty: libc::c_short) -> io::Result<libc::c_short> {
    use std::os::fd::AsRawFd;
    // SAFETY: an all-zero `flock` is valid; the fields that matter are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0;
    // l_pid must be 0 for the OFD commands.
    fl.l_pid = 0;
    // SAFETY: fcntl with a lock command reads and writes the `flock` we pass.
    if unsafe { libc::fcntl(fd.as_raw_fd(), cmd, &mut fl) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type)
}

// ---- Blocking calls that another thread can interrupt ----

/// The signal that interrupts an [`Interruptible`] call. Its default action is to be ignored,
/// so a handler that does nothing changes nothing for anyone who sends it to cachelock, and
/// commands get the default back at `exec`.
const INTERRUPT_SIGNAL: libc::c_int = libc::SIGURG;

/// Installs the do-nothing handler of [`INTERRUPT_SIGNAL`], without `SA_RESTART`, so that a
/// blocking `flock`/`fcntl` it hits returns `EINTR`.
fn install_interrupt_handler() -> io::Result<()> {
    use std::sync::OnceLock;
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    extern "C" fn nothing(_: libc::c_int) {}
    (*INSTALLED.get_or_init(|| {
        // SAFETY: an all-zero sigaction is valid; the handler only returns.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = nothing as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = 0;
        // SAFETY: sigemptyset initialises the mask we own; sigaction installs a handler
        // that is async-signal-safe (it does nothing).
        unsafe {
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(INTERRUPT_SIGNAL, &sa, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
        }
        Ok(())
    }))
    .map_err(io::Error::from_raw_os_error)
}

/// A blocking system call (waiting for another ticket's waiting lock) made on a helper thread,
/// so that the caller keeps polling other descriptors (signals, queue changes) and can cancel
/// it: the kernel wakes the helper directly when the lock is dropped.
/// [`Interruptible::fd`] becomes readable when the call has returned.
pub struct Interruptible {
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
    shared: std::sync::Arc<InterruptShared>,
}

struct InterruptShared {
    cancel: std::sync::atomic::AtomicBool,
    done: std::sync::atomic::AtomicBool,
    ready: OwnedFd,
}

impl std::fmt::Debug for Interruptible {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interruptible")
            .field("finished", &self.finished())
            .finish()
    }
}

impl Interruptible {
    /// Runs `call` on a helper thread, again after each interruption that was not a
    /// cancellation, until it returns.
    pub fn start(mut call: impl FnMut() -> io::Result<()> + Send + 'static) -> io::Result<Self> {
        use rustix::event::{eventfd, EventfdFlags};
        use std::sync::atomic::Ordering;
        install_interrupt_handler()?;
        let shared = std::sync::Arc::new(InterruptShared {
            cancel: Default::default(),
            done: Default::default(),
            ready: eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?,
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("cachelock-wait".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                let r = loop {
                    if s.cancel.load(Ordering::SeqCst) {
                        break Err(io::ErrorKind::Interrupted.into());
                    }
                    match call() {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        r => break r,
                    }
                };
                s.done.store(true, Ordering::SeqCst);
                let _ = rustix::io::write(&s.ready, &1u64.to_ne_bytes());
                r
            })?;
        Ok(Interruptible {
            thread: Some(thread),
            shared,
        })
    }

    /// Readable once the call has returned.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.shared.ready.as_fd()
    }

    /// Whether the call has returned.
    pub fn finished(&self) -> bool {
        self.shared.done.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The call's result once [`Interruptible::finished`]; `None` while it still blocks.
    pub fn try_result(&mut self) -> Option<io::Result<()>> {
        if !self.finished() {
            return None;
        }
        Some(self.join())
    }

    /// Interrupts the call (unless it has returned) and waits for the helper: `Ok(())` means the
    /// call completed before it could be interrupted (a lock taken is then the caller's),
    /// `Interrupted` that it was cancelled.
    pub fn cancel(mut self) -> io::Result<()> {
        self.cancel_inner()
    }

    fn cancel_inner(&mut self) -> io::Result<()> {
        use std::os::unix::thread::JoinHandleExt;
        use std::sync::atomic::Ordering;
        let Some(thread) = self.thread.as_ref() else {
            return Err(io::ErrorKind::Interrupted.into());
        };
        self.shared.cancel.store(true, Ordering::SeqCst);
        // std's handle is an integer; libc's `pthread_t` is one on glibc, a pointer on musl.
        let pthread = thread.as_pthread_t() as usize as libc::pthread_t;
        // A signal that lands just before the helper enters the call is lost: send it again
        // until the helper says it has returned.
        while !self.finished() {
            // SAFETY: the thread is not joined yet, so its pthread_t is valid.
            unsafe { libc::pthread_kill(pthread, INTERRUPT_SIGNAL) };
            poll_readable(&[self.fd()], Some(Duration::from_millis(1)));
        }
        self.join()
    }

    fn join(&mut self) -> io::Result<()> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the wait thread panicked"))),
            None => Err(io::ErrorKind::Interrupted.into()),
        }
    }
}

impl Drop for Interruptible {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.cancel_inner();
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

// ---- A lock directory shared with other users: everything relative to opened directories ----
//
// A lock's state lives in directories that other users may write. Each directory is opened once
// without following a symlink in its place, and every file inside is then reached relative to
// that descriptor (`openat`, `unlinkat`, `linkat`): a directory renamed, or replaced by a symlink
// after the open, can never redirect a later open, removal or rename into someone else's files.

/// What kind of entry a directory listing found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// Anything else (FIFO, device, socket) or unknown.
    Other,
}

/// Opens the directory at `path`, following symlinks (the caller chose the path).
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    Ok(rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens directory `name` inside `dir`, refusing a symlink (ELOOP) or anything else
/// (ENOTDIR) in its place.
pub fn open_dir_at(dir: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    Ok(rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens directory `name` inside `dir`, creating it first with exactly `mode` (the umask does
/// not apply) if it is missing. Returns the descriptor and whether it was created here.
pub fn ensure_dir_at(dir: BorrowedFd<'_>, name: &str, mode: u32) -> io::Result<(OwnedFd, bool)> {
    use rustix::fs::Mode;
    // Created private, then set to `mode`: never briefly more open than asked.
    let created = match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700)) {
        Ok(()) => true,
        Err(rustix::io::Errno::EXIST) => false,
        Err(e) => return Err(e.into()),
    };
    let fd = open_dir_at(dir, name)?;
    if created {
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
    }
    Ok((fd, created))
}

/// Opens `name` inside `dir` for locking or reading: `O_NOFOLLOW` (a planted symlink is refused
/// with ELOOP), `O_NONBLOCK` (a planted FIFO cannot block the open), `O_CLOEXEC`, regular files
/// only (InvalidInput otherwise). Read-write where permitted (NFS emulates flock with POSIX
/// locks, which need a writable descriptor for exclusive locks), else read-only (enough for a
/// local flock and for reading). `Open::Create(mode)` creates a missing file with exactly `mode`
/// (`O_EXCL`, so an existing file is never opened with `O_CREAT`, which `protected_regular`
/// refuses for other users' files in sticky directories).
pub fn open_at(dir: BorrowedFd<'_>, name: &str, how: Open) -> io::Result<File> {
    use rustix::fs::{Mode, OFlags};
    let base = OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    for _ in 0..4 {
        let existing = match rustix::fs::openat(dir, name, base | OFlags::RDWR, Mode::empty()) {
            Err(rustix::io::Errno::ACCESS | rustix::io::Errno::ROFS | rustix::io::Errno::PERM) => {
                rustix::fs::openat(dir, name, base | OFlags::RDONLY, Mode::empty())
            }
            r => r,
        };
        match (existing, how) {
            (Ok(fd), _) => return regular(File::from(fd)),
            (Err(rustix::io::Errno::NOENT), Open::Create(mode)) => {
                let flags = base | OFlags::RDWR | OFlags::CREATE | OFlags::EXCL;
                match rustix::fs::openat(dir, name, flags, Mode::from_raw_mode(0o600)) {
                    Ok(fd) => {
                        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
                        return Ok(File::from(fd));
                    }
                    // Someone else created it meanwhile: open theirs.
                    Err(rustix::io::Errno::EXIST) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            (Err(e), _) => return Err(e.into()),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::WouldBlock,
        "the file keeps appearing and disappearing",
    ))
}

/// Opens `name` inside `dir` read-only, as [`open_at`] does (`O_NOFOLLOW|O_NONBLOCK`, regular
/// files only), and returns what `fstat` says of it: enough to probe another process's ticket
/// (a shared `flock`) and read it.
pub fn open_read_at(dir: BorrowedFd<'_>, name: &str) -> io::Result<(File, FileInfo)> {
    use rustix::fs::{Mode, OFlags};
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let file = File::from(rustix::fs::openat(dir, name, flags, Mode::empty())?);
    let info = info(&file)?;
    if info.kind != EntryKind::File {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok((file, info))
}

/// Creates `name` inside `dir` with exactly `mode`; fails with AlreadyExists if anything is
/// there (never opens someone else's file).
pub fn create_new_at(dir: BorrowedFd<'_>, name: &str, mode: u32) -> io::Result<File> {
    use rustix::fs::{Mode, OFlags};
    let flags = OFlags::RDWR
        | OFlags::CREATE
        | OFlags::EXCL
        | OFlags::NOFOLLOW
        | OFlags::NONBLOCK
        | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(dir, name, flags, Mode::from_raw_mode(0o600))?;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
    Ok(File::from(fd))
}

/// The entries of `dir` (without `.` and `..`), at most `max` of them; the flag says whether
/// more were left unread. Names that are not UTF-8 are skipped (cachelock never makes them).
pub fn list_dir(dir: BorrowedFd<'_>, max: usize) -> io::Result<(Vec<(String, EntryKind)>, bool)> {
    let l = list_dir_valid(dir, max, max, |_| true)?;
    Ok((l.entries, l.overflow))
}

/// What a bounded listing of a directory that other users can fill found.
#[derive(Debug, Default)]
pub struct Listing {
    /// Entries whose names passed the caller's test, in directory order.
    pub entries: Vec<(String, EntryKind)>,
    /// Names looked at and passed over (not UTF-8, or not a name the caller can use).
    pub passed_over: usize,
    /// The listing stopped at a bound: more than `max` usable names, or more than `scan_max`
    /// names in all. The caller must not act as if it had seen everything.
    pub overflow: bool,
}

/// Lists `dir`, keeping the entries whose names `usable` accepts (at most `max`), and looking at
/// no more than `scan_max` names in all: names that cannot be valid cost one directory read and
/// nothing else, so a flood of them cannot hide a valid one within the bound, and beyond the
/// bound the caller is told (`overflow`) instead of seeing part of the directory as the whole.
pub fn list_dir_valid(
    dir: BorrowedFd<'_>,
    max: usize,
    scan_max: usize,
    usable: impl Fn(&str) -> bool,
) -> io::Result<Listing> {
    use rustix::fs::FileType;
    let mut d = rustix::fs::Dir::read_from(dir)?;
    let mut out = Listing::default();
    let mut seen = 0usize;
    while let Some(e) = d.read() {
        let e = e?;
        let raw = e.file_name().to_bytes();
        if raw == b"." || raw == b".." {
            continue;
        }
        if seen == scan_max {
            out.overflow = true;
            break;
        }
        seen += 1;
        let name = match std::str::from_utf8(raw) {
            Ok(n) if usable(n) => n,
            _ => {
                out.passed_over += 1;
                continue;
            }
        };
        if out.entries.len() == max {
            out.overflow = true;
            break;
        }
        let kind = match e.file_type() {
            FileType::RegularFile => EntryKind::File,
            FileType::Directory => EntryKind::Dir,
            FileType::Symlink => EntryKind::Symlink,
            _ => EntryKind::Other,
        };
        out.entries.push((name.to_string(), kind));
    }
    Ok(out)
}

/// Removes the entry `name` of `dir` and, if it is a directory, everything below it, never
/// following a symbolic link (a link is removed as a link) and never entering another
/// filesystem (a mount point left inside fails the removal with `ResourceBusy`). Every step is
/// relative to an open directory descriptor, so renaming a directory or swapping it for a link
/// while the walk runs cannot send it anywhere else. A missing entry is not an error.
pub fn remove_tree_at(dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    use rustix::fs::{AtFlags, Dir, Mode, OFlags};
    use std::ffi::{CStr, CString};
    let flags =
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    // Opens `child` of `parent` as a directory, or removes it as the entry it is (a file, a
    // link, a FIFO...): `Ok(None)` then.
    let open_or_unlink = |parent: BorrowedFd<'_>, child: &CStr| -> io::Result<Option<OwnedFd>> {
        match rustix::fs::openat(parent, child, flags, Mode::empty()) {
            Ok(fd) => Ok(Some(fd)),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP) => {
                match rustix::fs::unlinkat(parent, child, AtFlags::empty()) {
                    Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(None),
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    };
    let top_name = CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    let Some(top) = open_or_unlink(dir, &top_name)? else {
        return Ok(());
    };
    let dev = rustix::fs::fstat(&top)?.st_dev;
    // Depth first, one open directory per level (as deep as the tree, like `rm -r`), each with
    // the name it has in the level above.
    let mut stack: Vec<(Dir, CString)> = vec![(Dir::new(top)?, top_name)];
    while let Some((mut level, level_name)) = stack.pop() {
        let mut descend = None;
        while let Some(e) = level.read() {
            let e = e?;
            let child = e.file_name();
            if child.to_bytes() == b"." || child.to_bytes() == b".." {
                continue;
            }
            if let Some(sub) = open_or_unlink(level.fd()?, child)? {
                if rustix::fs::fstat(&sub)?.st_dev != dev {
                    return Err(io::Error::new(
                        io::ErrorKind::ResourceBusy,
                        format!(
                            "{} is a mount point",
                            String::from_utf8_lossy(child.to_bytes())
                        ),
                    ));
                }
                descend = Some((Dir::new(sub)?, child.to_owned()));
                break;
            }
        }
        match descend {
            Some(child) => {
                // Back to this level once the child is gone: what is left is read again.
                level.rewind();
                stack.push((level, level_name));
                stack.push(child);
            }
            None => {
                // Empty: removed from the level above (from `dir` at the top).
                let removed = match stack.last() {
                    Some((parent, _)) => {
                        rustix::fs::unlinkat(parent.fd()?, &level_name, AtFlags::REMOVEDIR)
                    }
                    None => rustix::fs::unlinkat(dir, &level_name, AtFlags::REMOVEDIR),
                };
                match removed {
                    Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(())
}

/// Disk usage of the entry `name` of `dir` (allocated blocks; each hard-linked inode once),
/// walked relative to directory descriptors without following links or entering other
/// filesystems, looking at no more than `max_entries` entries (the count stops there).
// The stat field types differ between targets.
#[allow(clippy::unnecessary_cast)]
pub fn disk_usage_at(dir: BorrowedFd<'_>, name: &str, max_entries: usize) -> u64 {
    use rustix::fs::{AtFlags, Mode, OFlags};
    let Ok(top) = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) else {
        return 0;
    };
    let mut total = top.st_blocks as u64 * 512;
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let Ok(fd) = rustix::fs::openat(dir, name, flags, Mode::empty()) else {
        return total;
    };
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![fd];
    let mut budget = max_entries;
    while let Some(d) = stack.pop() {
        let Ok(mut entries) = rustix::fs::Dir::read_from(&d) else {
            continue;
        };
        while let Some(Ok(e)) = entries.read() {
            let n = e.file_name();
            if n.to_bytes() == b"." || n.to_bytes() == b".." {
                continue;
            }
            if budget == 0 {
                return total;
            }
            budget -= 1;
            let Ok(st) = rustix::fs::statat(&d, n, AtFlags::SYMLINK_NOFOLLOW) else {
                continue;
            };
            if st.st_dev != top.st_dev {
                continue;
            }
            let is_dir = rustix::fs::FileType::from_raw_mode(st.st_mode).is_dir();
            if st.st_nlink > 1 && !is_dir && !seen.insert(st.st_ino as u64) {
                continue;
            }
            total += st.st_blocks as u64 * 512;
            if is_dir {
                if let Ok(sub) = rustix::fs::openat(&d, n, flags, Mode::empty()) {
                    stack.push(sub);
                }
            }
        }
    }
    total
}

/// Removes the entry `name` of `dir` (not a directory).
pub fn unlink_at(dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    Ok(rustix::fs::unlinkat(
        dir,
        name,
        rustix::fs::AtFlags::empty(),
    )?)
}

/// Gives the file `from_name` of `from` a second name `to_name` in `to`; AlreadyExists if that
/// name is taken (a hard link never replaces anything, unlike a rename).
pub fn link_at(
    from: BorrowedFd<'_>,
    from_name: &str,
    to: BorrowedFd<'_>,
    to_name: &str,
) -> io::Result<()> {
    Ok(rustix::fs::linkat(
        from,
        from_name,
        to,
        to_name,
        rustix::fs::AtFlags::empty(),
    )?)
}

/// Renames `from_name` of `from` to `to_name` of `to` (replacing it).
pub fn rename_at(
    from: BorrowedFd<'_>,
    from_name: &str,
    to: BorrowedFd<'_>,
    to_name: &str,
) -> io::Result<()> {
    Ok(rustix::fs::renameat(from, from_name, to, to_name)?)
}

/// Identity and ownership of a file, for checks and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileInfo {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Owner.
    pub uid: u32,
    /// Permission bits (with set-id and sticky bits).
    pub mode: u32,
    /// Kind.
    pub kind: EntryKind,
    /// Size in bytes.
    pub size: u64,
    /// Last modification, Unix seconds.
    pub mtime: i64,
    /// Nanoseconds of the last modification.
    pub mtime_nsec: i64,
    /// Hard links.
    pub nlink: u64,
}

impl FileInfo {
    // The stat field types differ between targets.
    #[allow(clippy::unnecessary_cast)]
    fn from_stat(st: &rustix::fs::Stat) -> FileInfo {
        use rustix::fs::FileType;
        FileInfo {
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            uid: st.st_uid,
            mode: st.st_mode & 0o7777,
            kind: match FileType::from_raw_mode(st.st_mode) {
                FileType::RegularFile => EntryKind::File,
                FileType::Directory => EntryKind::Dir,
                FileType::Symlink => EntryKind::Symlink,
                _ => EntryKind::Other,
            },
            size: st.st_size as u64,
            mtime: st.st_mtime as i64,
            mtime_nsec: st.st_mtime_nsec as i64,
            nlink: st.st_nlink as u64,
        }
    }

    /// Device and inode: what identifies a file.
    pub fn id(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    /// Identity, size and modification time: what changes when a file is replaced or
    /// rewritten (a cache of its content is valid while this stays the same).
    pub fn version(&self) -> FileVersion {
        FileVersion {
            id: self.id(),
            size: self.size,
            mtime: (self.mtime, self.mtime_nsec),
        }
    }
}

/// What changes when a file is replaced or rewritten ([`FileInfo::version`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileVersion {
    /// Device and inode.
    pub id: (u64, u64),
    /// Size in bytes.
    pub size: u64,
    /// Modification time: seconds and nanoseconds.
    pub mtime: (i64, i64),
}

/// [`FileInfo`] of an open file or directory.
pub fn info(fd: impl AsFd) -> io::Result<FileInfo> {
    Ok(FileInfo::from_stat(&rustix::fs::fstat(fd)?))
}

/// [`FileInfo`] of the entry `name` of `dir` itself (a symlink is not followed).
pub fn info_at(dir: BorrowedFd<'_>, name: &str) -> io::Result<FileInfo> {
    Ok(FileInfo::from_stat(&rustix::fs::statat(
        dir,
        name,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )?))
}

/// [`FileInfo`] of `path` itself (a symlink is not followed).
pub fn info_path(path: &Path) -> io::Result<FileInfo> {
    Ok(FileInfo::from_stat(&rustix::fs::lstat(path)?))
}

/// Whether `f` is still the file named `name` in `dir` (same device and inode).
pub fn is_same_file_at(f: impl AsFd, dir: BorrowedFd<'_>, name: &str) -> bool {
    match (info(f), info_at(dir, name)) {
        (Ok(a), Ok(b)) => a.id() == b.id(),
        _ => false,
    }
}

/// Sets the permission bits of an open file or directory exactly (it must be ours).
pub fn set_mode(fd: impl AsFd, mode: u32) -> io::Result<()> {
    Ok(rustix::fs::fchmod(
        fd,
        rustix::fs::Mode::from_raw_mode(mode),
    )?)
}

/// Reads `f` from its start, at most `max` bytes: `Ok(None)` when it holds more (callers
/// treat an oversized file as corrupt; a sparse multi-gigabyte file costs one `fstat`).
pub fn read_bounded(f: &File, max: usize) -> io::Result<Option<Vec<u8>>> {
    use std::os::unix::fs::FileExt as _;
    if f.metadata()?.len() > max as u64 {
        return Ok(None);
    }
    let mut buf = vec![0u8; max.min(64 * 1024) + 1];
    let mut len = 0;
    loop {
        if len == buf.len() {
            if len > max {
                return Ok(None);
            }
            buf.resize((len * 2).min(max + 1), 0);
        }
        match f.read_at(&mut buf[len..], len as u64) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        if len > max {
            return Ok(None);
        }
    }
    buf.truncate(len);
    Ok(Some(buf))
}

/// Clears `O_NONBLOCK` on `fd` (a pipe opened without blocking, then read).
pub fn set_blocking(fd: impl AsFd) -> io::Result<()> {
    use rustix::fs::OFlags;
    let flags = rustix::fs::fcntl_getfl(&fd)?;
    Ok(rustix::fs::fcntl_setfl(&fd, flags - OFlags::NONBLOCK)?)
}

/// Whether the filesystem holding `fd` is one where inotify cannot be trusted.
pub fn is_network_fs_fd(fd: impl AsFd) -> bool {
    rustix::fs::fstatfs(fd)
        .map(|st| is_network_magic(st.f_type as u64))
        .unwrap_or(false)
}

// ---- Terminating signals seen, for waits that cannot poll the signal descriptor ----

static SIGNALS_SEEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static LAST_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Counts a terminating signal; called from [`crate::process::Signals`]' handler, so only
/// atomic stores (async-signal-safe).
pub fn note_terminating_signal(sig: i32) {
    use std::sync::atomic::Ordering;
    LAST_SIGNAL.store(sig, Ordering::SeqCst);
    SIGNALS_SEEN.fetch_add(1, Ordering::SeqCst);
}

/// A mark for [`signal_since`].
pub fn signal_mark() -> u64 {
    SIGNALS_SEEN.load(std::sync::atomic::Ordering::SeqCst)
}

/// The terminating signal received since `mark`, if any.
pub fn signal_since(mark: u64) -> Option<i32> {
    use std::sync::atomic::Ordering;
    (SIGNALS_SEEN.load(Ordering::SeqCst) != mark).then(|| LAST_SIGNAL.load(Ordering::SeqCst))
}

/// How a bounded wait for a flock ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockWait {
    /// The lock is ours.
    Taken,
    /// A terminating signal (this one) arrived first.
    Interrupted(i32),
    /// It was still held after the patience ran out.
    TimedOut,
}

/// Takes `flock(2)` on `fd`, waiting at most `patience` and giving up at once when a
/// terminating signal arrives (a blocking flock would be restarted after the handler, so a
/// process holding the lock for ever could make cachelock ignore SIGTERM). Short back-off
/// sleeps: this is for locks held for microseconds (`meta.lock`).
pub fn flock_patiently(fd: impl AsFd, exclusive: bool, patience: Duration) -> io::Result<LockWait> {
    let mark = signal_mark();
    let start = std::time::Instant::now();
    let mut pause = Duration::from_micros(20);
    loop {
        if try_flock(fd.as_fd(), exclusive)? {
            return Ok(LockWait::Taken);
        }
        if let Some(sig) = signal_since(mark) {
            return Ok(LockWait::Interrupted(sig));
        }
        if start.elapsed() >= patience {
            return Ok(LockWait::TimedOut);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(5));
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

    /// Watches the directory open on `dir` (through `/proc/self/fd`, so the watch is on that
    /// very directory, whatever its path names now).
    pub fn on_fd(dir: BorrowedFd<'_>) -> io::Result<DirWatch> {
        use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
        use std::os::fd::AsRawFd;
        let fd = inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC)?;
        inotify::add_watch(
            &fd,
            format!("/proc/self/fd/{}", dir.as_raw_fd()),
            WatchFlags::CREATE
                | WatchFlags::DELETE
                | WatchFlags::MOVED_TO
                | WatchFlags::MOVED_FROM
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

    /// Closes the instance later, off the hand-off's path: closing the last descriptor of an
    /// inotify instance waits for an RCU grace period (often 5–20 ms). It is kept open until
    /// [`close_deferred`] (called once a command has been spawned): a command forked while the
    /// instance is still ours inherits a close-on-exec copy, and if our copy were closed first,
    /// the child's `execve` would close the last one and wait out the grace period before the
    /// command starts (measured: 10–29 ms for one exec in ten under 16 waiters).
    pub fn close_later(self) {
        deferred().push(self.fd);
    }
}

fn deferred() -> std::sync::MutexGuard<'static, Vec<OwnedFd>> {
    static DEFERRED: std::sync::Mutex<Vec<OwnedFd>> = std::sync::Mutex::new(Vec::new());
    DEFERRED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Closes on a background thread the descriptors [`DirWatch::close_later`] kept (call it after
/// a spawned command has exec'd, so that no child holds their last copy).
pub fn close_deferred() {
    use std::sync::mpsc::{channel, Sender};
    use std::sync::{Mutex, OnceLock};
    let fds = std::mem::take(&mut *deferred());
    if fds.is_empty() {
        return;
    }
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
        for fd in fds {
            // If the thread could not be started the send fails and drops the fd here.
            let _ = tx.send(fd);
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
        .map(|st| is_network_magic(st.f_type as u64))
        .unwrap_or(false)
}

/// Whether a statfs `f_type` is one of the filesystems where inotify cannot be trusted (NFS,
/// SMB, FUSE, Ceph, 9p).
pub fn is_network_magic(magic: u64) -> bool {
    NETWORK_FS.contains(&magic)
}

/// The filesystem holding a path, as `doctor` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsInfo {
    /// statfs `f_type`.
    pub magic: u64,
    /// Its type as mounted (`ext4`, `nfs4`, `fuse.bindfs`: `/proc/self/mountinfo`), else the
    /// magic number.
    pub name: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// Largest `/proc/self/mountinfo` read (a host with thousands of mounts is cut, not read
/// without bound).
const MAX_MOUNTINFO: u64 = 4 << 20;

/// The filesystem holding `path` (followed if it is a symlink).
#[allow(clippy::unnecessary_cast)]
pub fn fs_info(path: &Path) -> io::Result<FsInfo> {
    use std::io::Read;
    let magic = rustix::fs::statfs(path)?.f_type as u64;
    let read_only = rustix::fs::statvfs(path)?
        .f_flag
        .contains(rustix::fs::StatVfsMountFlags::RDONLY);
    let dev = rustix::fs::stat(path)?.st_dev as u64;
    let mut text = String::new();
    let _ = File::open("/proc/self/mountinfo")
        .and_then(|f| f.take(MAX_MOUNTINFO).read_to_string(&mut text));
    let name = mount_type(
        &text,
        rustix::fs::major(dev as _),
        rustix::fs::minor(dev as _),
    )
    .unwrap_or_else(|| format!("filesystem type {magic:#x}"));
    Ok(FsInfo {
        magic,
        name,
        read_only,
    })
}

/// The type of the mount of device `major:minor` in mountinfo `text` (the last such mount:
/// later mounts shadow earlier ones).
fn mount_type(text: &str, major: u32, minor: u32) -> Option<String> {
    let want = format!("{major}:{minor}");
    text.lines()
        .rev()
        .filter(|l| l.split(' ').nth(2) == Some(want.as_str()))
        .find_map(|l| l.split_once(" - ")?.1.split(' ').next())
        .map(str::to_string)
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

/// The effective user id: the owner of the files this process creates.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
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

/// The controlling terminal, opened, when this process's group is its foreground group (a
/// shell's foreground job): what a job of our own may be given. `None` without a terminal, or
/// in the background.
pub fn foreground_terminal() -> Option<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    let tty = rustix::fs::open(
        "/dev/tty",
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    )
    .ok()?;
    // SAFETY: tcgetpgrp(3) on a descriptor we own; no memory preconditions.
    let fg = unsafe { libc::tcgetpgrp(std::os::fd::AsRawFd::as_raw_fd(&tty)) };
    (fg > 0 && fg == process_group()).then_some(tty)
}

/// An anonymous in-memory file (close-on-exec), named `name` for `/proc/PID/fd` readers.
pub fn memfd(name: &std::ffi::CStr) -> io::Result<File> {
    use rustix::fs::MemfdFlags;
    Ok(File::from(rustix::fs::memfd_create(
        name,
        MemfdFlags::CLOEXEC,
    )?))
}

/// An in-memory file holding `bytes`, positioned at its start, and sealed: nobody holding it
/// (or a copy of its descriptor) can write, grow or shrink it, or remove the seals.
pub fn sealed_memfd(name: &std::ffi::CStr, bytes: &[u8]) -> io::Result<File> {
    use rustix::fs::{MemfdFlags, SealFlags};
    use std::io::{Seek, Write};
    let mut f = File::from(rustix::fs::memfd_create(
        name,
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?);
    f.write_all(bytes)?;
    f.seek(std::io::SeekFrom::Start(0))?;
    rustix::fs::fcntl_add_seals(
        &f,
        SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL,
    )?;
    Ok(f)
}

/// Wall clock in Unix milliseconds (0 before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Restores SIGPIPE's default action (the Rust runtime ignores it): a write to a pipe nobody
/// reads then ends the process quietly instead of failing.
pub fn default_sigpipe() {
    // SAFETY: signal(2) with a standard disposition; no handler runs in our address space.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// This process's group.
pub fn process_group() -> i32 {
    // SAFETY: getpgrp(2) cannot fail and has no preconditions.
    unsafe { libc::getpgrp() }
}

/// Makes `pgid` (0: the caller's own process) the foreground group of terminal `tty`, with
/// SIGTTOU blocked meanwhile so that a process outside the foreground may do it, as a shell
/// does. Async-signal-safe: also for a child between fork and exec.
pub fn set_foreground(tty: RawFd, pgid: i32) -> io::Result<()> {
    // SAFETY: signal-set and mask calls on local sigset_t values, tcsetpgrp(3) on a descriptor
    // the caller keeps open; all async-signal-safe, none keeps a pointer.
    unsafe {
        let pgid = if pgid == 0 { libc::getpid() } else { pgid };
        let mut block: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut block);
        libc::sigaddset(&mut block, libc::SIGTTOU);
        libc::pthread_sigmask(libc::SIG_BLOCK, &block, &mut old);
        let r = libc::tcsetpgrp(tty, pgid);
        let e = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        if r == 0 {
            Ok(())
        } else {
            Err(e)
        }
    }
}

/// What became of a child, without reaping one that still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildState {
    /// It ended; the raw wait status (`ExitStatus::from_raw`).
    Ended(i32),
    /// A signal stopped it (SIGTSTP, SIGSTOP, SIGTTIN, SIGTTOU).
    Stopped(i32),
    /// It runs.
    Running,
}

/// Looks at child `pid`: reaps it if it ended, reports it if it stopped.
pub fn child_state(pid: i32) -> io::Result<ChildState> {
    let mut status = 0;
    // SAFETY: waitpid writes the status into our integer.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::WUNTRACED) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(ChildState::Running)
        } else {
            Err(e)
        };
    }
    Ok(match r {
        0 => ChildState::Running,
        _ if libc::WIFSTOPPED(status) => ChildState::Stopped(libc::WSTOPSIG(status)),
        _ => ChildState::Ended(status),
    })
}

/// For a forked child before exec: moves it into a new network namespace.
pub fn new_network_namespace() -> io::Result<()> {
    // SAFETY: only NEWNET is unshared (the hazard of unshare is FILES, unused here).
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
        .map_err(Into::into)
}

/// Detaches the mount at `path` (`umount2(MNT_DETACH|UMOUNT_NOFOLLOW)`: a symbolic link in
/// its place is not followed to another mount).
pub fn detach_mount(path: &Path) -> io::Result<()> {
    use rustix::mount::UnmountFlags;
    rustix::mount::unmount(path, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW).map_err(Into::into)
}

/// 64 unpredictable bits (from the operating system's random source, through std's hash
/// keys), for names another user must not be able to guess and plant in advance.
pub fn unpredictable() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(monotonic_ns());
    h.finish()
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
    fn a_sealed_memfd_cannot_change() {
        use std::io::{Read, Write};
        let mut f = sealed_memfd(c"test", b"module").unwrap();
        let mut text = String::new();
        f.read_to_string(&mut text).unwrap();
        assert_eq!(text, "module");
        assert!(f.write_all(b"x").is_err());
        assert!(f.set_len(0).is_err());
        let seals = rustix::fs::fcntl_get_seals(&f).unwrap();
        assert!(seals.contains(rustix::fs::SealFlags::SEAL));
    }

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

    /// The waiting lock: independent of flock on the same file, waited for on a helper thread
    /// that a cancellation interrupts, and granted when its holder drops it.
    #[test]
    fn waiting_locks_wait_in_the_kernel_and_can_be_cancelled() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("t");
        let a = open_in_shared_dir(&p, Open::Create(0o644)).unwrap();
        let b = open_in_shared_dir(&p, Open::Existing).unwrap();
        assert!(try_flock(&a, true).unwrap());
        assert!(try_ofd_lock(&a, true).unwrap(), "independent of a's flock");
        assert!(ofd_locked_exclusively(&b).unwrap());
        assert!(!try_ofd_lock(&b, false).unwrap());
        // Blocked, then cancelled: the helper returns Interrupted and holds nothing.
        let b2 = b.try_clone().unwrap();
        let call = Interruptible::start(move || ofd_lock_wait(&b2, false)).unwrap();
        assert!(poll_readable(&[call.fd()], Some(Duration::from_millis(50))).is_none());
        assert!(!call.finished());
        assert_eq!(
            call.cancel().unwrap_err().kind(),
            io::ErrorKind::Interrupted
        );
        // Blocked, then granted when the holder drops its waiting lock.
        let b3 = b.try_clone().unwrap();
        let mut call = Interruptible::start(move || ofd_lock_wait(&b3, false)).unwrap();
        ofd_unlock(&a).unwrap();
        assert_eq!(
            poll_readable(&[call.fd()], Some(Duration::from_secs(10))),
            Some(0)
        );
        call.try_result().unwrap().unwrap();
        // b now holds a shared waiting lock; a's flock is untouched by any of it.
        assert!(!try_ofd_lock(&a, true).unwrap());
        assert!(!try_flock(&b, false).unwrap());
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
    fn tree_removal_follows_no_link_and_listings_are_bounded_not_blind() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), "x").unwrap();
        let t = tmp.path().join("t");
        std::fs::create_dir_all(t.join("a/b/c")).unwrap();
        std::fs::write(t.join("a/b/c/f"), "x").unwrap();
        std::fs::write(t.join("a/g"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, t.join("a/b/link")).unwrap();
        std::os::unix::fs::symlink(&outside, t.join("link")).unwrap();
        let c = std::ffi::CString::new(t.join("a/fifo").to_str().unwrap()).unwrap();
        // SAFETY: valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let root = open_dir(tmp.path()).unwrap();
        assert!(disk_usage_at(root.as_fd(), "t", 1 << 20) > 0);
        remove_tree_at(root.as_fd(), "t").unwrap();
        assert!(!t.exists());
        assert!(outside.join("keep").exists(), "a link was followed");
        // A link in place of the tree itself is removed as a link.
        std::os::unix::fs::symlink(&outside, tmp.path().join("l")).unwrap();
        remove_tree_at(root.as_fd(), "l").unwrap();
        assert!(outside.join("keep").exists());
        remove_tree_at(root.as_fd(), "missing").unwrap();

        // Junk names cost nothing but the read; past a bound the caller is told.
        for i in 0..50 {
            std::fs::write(outside.join(format!("junk{i}")), "").unwrap();
        }
        std::fs::write(outside.join("000000000001"), "").unwrap();
        let d = open_dir(&outside).unwrap();
        let digits = |n: &str| n.bytes().all(|b| b.is_ascii_digit());
        let l = list_dir_valid(d.as_fd(), 1, 100, digits).unwrap();
        assert_eq!(l.entries.len(), 1);
        assert_eq!((l.passed_over, l.overflow), (51, false));
        assert!(list_dir_valid(d.as_fd(), 1, 10, digits).unwrap().overflow);
        assert!(list_dir_valid(d.as_fd(), 0, 100, digits).unwrap().overflow);
        assert_ne!(unpredictable(), unpredictable());
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

    #[test]
    fn filesystems_are_named_from_mountinfo_and_classified_by_magic() {
        let text = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                    40 22 0:52 / /mnt/locks rw,relatime - nfs4 srv:/export rw,vers=4.2\n\
                    41 22 0:53 / /mnt/fuse rw - fuse.bindfs /src rw,user_id=0\n\
                    42 40 0:52 / /mnt/again rw - nfs4 srv:/export rw\n";
        assert_eq!(mount_type(text, 8, 1).as_deref(), Some("ext4"));
        assert_eq!(mount_type(text, 0, 53).as_deref(), Some("fuse.bindfs"));
        assert_eq!(mount_type(text, 0, 52).as_deref(), Some("nfs4"));
        assert_eq!(mount_type(text, 9, 9), None);
        // NFS, SMB, CIFS, FUSE, Ceph and 9p are where inotify misses other hosts' changes.
        for magic in [
            0x6969, 0x517B, 0xFF534D42, 0xFE534D42, 0x65735546, 0xC36400, 0x01021997,
        ] {
            assert!(is_network_magic(magic), "{magic:#x}");
        }
        for local in [
            0xEF53,     /* ext4 */
            0x01021994, /* tmpfs */
            0x794C7630, /* overlay */
        ] {
            assert!(!is_network_magic(local), "{local:#x}");
        }
        let tmp = tempfile::tempdir().unwrap();
        let fs = fs_info(tmp.path()).unwrap();
        assert!(!fs.read_only && !is_network_magic(fs.magic), "{fs:?}");
        assert!(!fs.name.is_empty() && !fs.name.contains(' '), "{fs:?}");
    }
}

/// Connects a datagram socket to the unix socket `name` in directory `dir`, if one is there
/// whose owner `owner_ok` accepts. The name is opened `O_PATH|O_NOFOLLOW` relative to the
/// directory's descriptor (a symlink is refused), checked with `fstat` (a socket, its owner),
/// and connected to through `/proc/self/fd`, so that the socket connected to is the one
/// checked: nobody who can write the directory can point the datagrams at another socket
/// (journald's, syslog's). Sends wait at most `timeout`. `Ok(None)`: nothing acceptable there.
pub fn connect_dgram_in(
    dir: &Path,
    name: &str,
    owner_ok: impl Fn(u32) -> bool,
    timeout: Duration,
) -> io::Result<Option<OwnedFd>> {
    use rustix::fs::{FileType, Mode, OFlags};
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    use std::os::fd::AsRawFd;
    let path = OFlags::PATH | OFlags::CLOEXEC;
    let d = rustix::fs::open(dir, path | OFlags::DIRECTORY, Mode::empty())?;
    let s = match rustix::fs::openat(&d, name, path | OFlags::NOFOLLOW, Mode::empty()) {
        Ok(s) => s,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let st = rustix::fs::fstat(&s)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Socket || !owner_ok(st.st_uid) {
        return Ok(None);
    }
    let sock = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::sockopt::set_socket_timeout(
        &sock,
        rustix::net::sockopt::Timeout::Send,
        Some(timeout.max(Duration::from_millis(1))),
    )?;
    let addr = SocketAddrUnix::new(format!("/proc/self/fd/{}", s.as_raw_fd()))?;
    rustix::net::connect(&sock, &addr)?;
    Ok(Some(sock))
}

/// Why a datagram was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendFailure {
    /// The receiver's queue stayed full for the send timeout (or at once, when not waiting).
    Full,
    /// Nobody receives on the socket any more.
    Gone,
}

/// Sends one datagram on a connected socket, waiting (up to its send timeout) for room when
/// `wait`.
pub fn send_dgram(sock: BorrowedFd<'_>, bytes: &[u8], wait: bool) -> Result<(), SendFailure> {
    use rustix::io::Errno;
    use rustix::net::SendFlags;
    let flags = if wait {
        SendFlags::NOSIGNAL
    } else {
        SendFlags::NOSIGNAL | SendFlags::DONTWAIT
    };
    loop {
        return match rustix::net::send(sock, bytes, flags) {
            Ok(_) => Ok(()),
            Err(Errno::INTR) => continue,
            Err(Errno::AGAIN | Errno::NOBUFS | Errno::TIMEDOUT) => Err(SendFailure::Full),
            Err(_) => Err(SendFailure::Gone),
        };
    }
}

/// A bound unix datagram socket that learns each sender's uid (`SO_PASSCRED`).
#[derive(Debug)]
pub struct DgramServer {
    sock: OwnedFd,
}

/// One datagram received.
#[derive(Debug, Clone, Copy)]
pub struct Datagram {
    /// Its length (larger than the buffer when it was cut).
    pub len: usize,
    /// The sender's user and process, as the kernel says (not the sender's claim).
    pub uid: Option<u32>,
    /// See `uid`.
    pub pid: Option<i32>,
}

impl DgramServer {
    /// Binds a socket as `name` in directory `dir` with permission bits `mode` (the name must
    /// not exist). Bound through `/proc/self/fd` (the directory as opened, and a short path).
    pub fn bind_in(dir: BorrowedFd<'_>, name: &str, mode: u32) -> io::Result<DgramServer> {
        use rustix::fs::{Mode, OFlags};
        use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
        use std::os::fd::AsRawFd;
        let sock = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        )?;
        rustix::net::sockopt::set_socket_passcred(&sock, true)?;
        // Room for bursts (the queue length is capped by net.unix.max_dgram_qlen anyway);
        // beyond the default only with CAP_NET_ADMIN.
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size_force(&sock, 4 << 20)
            .or_else(|_| rustix::net::sockopt::set_socket_recv_buffer_size(&sock, 4 << 20));
        let addr = SocketAddrUnix::new(format!("/proc/self/fd/{}/{name}", dir.as_raw_fd()))?;
        rustix::net::bind(&sock, &addr)?;
        // The name is ours now (in a sticky directory nobody else can replace it); its bits
        // are set through a descriptor of that very inode.
        let p = rustix::fs::openat(
            dir,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        rustix::fs::chmod(
            format!("/proc/self/fd/{}", p.as_raw_fd()),
            Mode::from_raw_mode(mode),
        )?;
        Ok(DgramServer { sock })
    }

    /// The descriptor to poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Receives one datagram into `buf` without waiting (`Ok(None)`: nothing pending).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<Datagram>> {
        use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmCredentials(1))];
        let mut anc = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [io::IoSliceMut::new(buf)];
        let r = match rustix::net::recvmsg(
            &self.sock,
            &mut iov,
            &mut anc,
            RecvFlags::DONTWAIT | RecvFlags::TRUNC | RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(r) => r,
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut d = Datagram {
            len: r.bytes,
            uid: None,
            pid: None,
        };
        for m in anc.drain() {
            if let RecvAncillaryMessage::ScmCredentials(c) = m {
                d.uid = Some(c.uid.as_raw());
                d.pid = Some(c.pid.as_raw_nonzero().get());
            }
        }
        Ok(Some(d))
    }
}

/// The name of user `uid` in the user database, if it has one.
pub fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: an all-zero passwd is a valid value for getpwuid_r to fill.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: the buffers outlive the call; `out` is null or points at `pw`, whose strings
    // point into `buf`, read before either is dropped.
    let r = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    if r != 0 || out.is_null() || pw.pw_name.is_null() {
        return None;
    }
    // SAFETY: getpwuid_r succeeded: pw_name is a NUL-terminated string inside `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(pw.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

/// Opens `name` in `dir` for appending (`O_APPEND`), creating it with exactly `mode` if it is
/// missing; never follows a symlink in its place, never opens anything but a regular file,
/// never blocks on a FIFO.
pub fn open_append_at(dir: BorrowedFd<'_>, name: &str, mode: u32) -> io::Result<File> {
    use rustix::fs::{Mode, OFlags};
    let base =
        OFlags::WRONLY | OFlags::APPEND | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    for _ in 0..4 {
        match rustix::fs::openat(dir, name, base, Mode::empty()) {
            Ok(fd) => return regular(File::from(fd)),
            Err(rustix::io::Errno::NOENT) => {
                match rustix::fs::openat(
                    dir,
                    name,
                    base | OFlags::CREATE | OFlags::EXCL,
                    Mode::from_raw_mode(0o600),
                ) {
                    Ok(fd) => {
                        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
                        return Ok(File::from(fd));
                    }
                    Err(rustix::io::Errno::EXIST) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::WouldBlock,
        "the file keeps appearing and disappearing",
    ))
}

/// An inotify instance watching any number of directories for entries created, removed,
/// renamed or written (what a lock directory's changes are made of).
#[derive(Debug)]
pub struct Inotify {
    fd: OwnedFd,
}

impl Inotify {
    /// A new instance, watching nothing.
    pub fn new() -> io::Result<Inotify> {
        use rustix::fs::inotify::{self, CreateFlags};
        Ok(Inotify {
            fd: inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC)?,
        })
    }

    /// Watches directory `dir` (not following a symlink in its place); `writes`: also files in
    /// it written to. Returns the watch's number.
    pub fn add_dir(&self, dir: &Path, writes: bool) -> io::Result<i32> {
        use rustix::fs::inotify::{self, WatchFlags};
        let mut flags = WatchFlags::CREATE
            | WatchFlags::DELETE
            | WatchFlags::MOVED_TO
            | WatchFlags::MOVED_FROM
            | WatchFlags::DELETE_SELF
            | WatchFlags::DONT_FOLLOW
            | WatchFlags::ONLYDIR;
        if writes {
            flags |= WatchFlags::CLOSE_WRITE | WatchFlags::MODIFY;
        }
        Ok(inotify::add_watch(&self.fd, dir, flags)?)
    }

    /// The descriptor to poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Reads every pending event; returns the watches that saw something (`-1` for an
    /// overflow: anything may have changed).
    pub fn drain(&self) -> Vec<i32> {
        use rustix::fs::inotify::{ReadFlags, Reader};
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut seen = Vec::new();
        let mut reader = Reader::new(&self.fd, &mut buf);
        while let Ok(ev) = reader.next() {
            let wd = if ev.events().contains(ReadFlags::QUEUE_OVERFLOW) {
                -1
            } else {
                ev.wd()
            };
            if !seen.contains(&wd) {
                seen.push(wd);
            }
        }
        seen
    }
}

/// Makes the calling thread, and every thread it starts from now on, a batch job for the
/// kernel's scheduler (`SCHED_BATCH`): when it wakes it does not preempt the running task, so
/// a background observer never delays the requests it observes. The raw system call, because
/// musl's `sched_setscheduler` is a stub.
pub fn schedule_as_batch() -> io::Result<()> {
    // SAFETY: a C struct of integers (musl's has more fields than glibc's): all zeros is
    // priority 0, the only one SCHED_BATCH takes.
    let param: libc::sched_param = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel only reads the `sched_param` we pass, for the calling thread (0).
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_setscheduler,
            0,
            libc::SCHED_BATCH,
            &param as *const libc::sched_param,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
