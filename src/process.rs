//! Child processes and signals: running a command so that a held lock covers it, the one rule
//! for signals, and turning an exit status into cachelock's exit code.
//!
//! **Containment.** A lock covers its command the way its backend says
//! ([`Containment`]): for flock, the command inherits the locked descriptor (Rust opens
//! everything `O_CLOEXEC`), so a SIGKILLed cachelock cannot free the lock while its command
//! runs; and the command gets a parent-death signal so that it is told to stop when cachelock
//! dies. `PR_SET_PDEATHSIG` fires when the *thread* that forked exits: commands are spawned from
//! the main thread. For a lease (etcd), which a command cannot inherit, the command runs under a
//! [`guardian`] that stops its whole process tree when cachelock dies or the lease's stop
//! deadline passes. [`Contained`] builds either kind of command, for `run` and for the dockerd
//! session alike.
//!
//! **Signals, as under flock(1).** The command runs in cachelock's process group, so a Ctrl-C
//! typed at the terminal, and terminal input, reach it directly. cachelock forwards only what
//! the command would not receive itself: SIGINT, SIGTERM and SIGHUP *sent to cachelock* (by
//! `kill`, a CI runner's timeout...), never the terminal-generated ones, which the command
//! already got (a second SIGINT makes tools such as terraform force-quit).

pub mod guardian;

use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use crate::error::{code, Error, Kind, Result};
use crate::lock::backend::Lease;
use crate::lock::Containment;

/// Signals that end a wait cleanly and are forwarded to a running command when sent to
/// cachelock.
pub const TERMINATING: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Spawns `cmd` with `inherit` descriptors left open across exec and `pdeathsig` delivered to
/// the child if cachelock dies.
pub fn spawn(cmd: &mut Command, inherit: &[RawFd], pdeathsig: i32) -> io::Result<Child> {
    let inherit = inherit.to_vec();
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and only makes raw system calls
    // (fcntl, prctl, getppid, kill) on values captured before the fork.
    unsafe {
        cmd.pre_exec(move || crate::sys::prepare_child(&inherit, pdeathsig, parent));
    }
    let child = cmd.spawn();
    // `spawn` returns once the child has exec'd (or failed to): no child holds the last copy
    // of an inotify instance now.
    crate::sys::close_deferred();
    child
}

/// Runs `cmd` so that the lock behind `containment` covers it, forwarding signals per the
/// module's rule; returns the exit code cachelock reports (the command's, or 128+N). Under a
/// lease, a lost lock is `Kind::LockLost` (exit 75) once the command's tree is gone.
pub fn run_contained(
    cmd: &mut Command,
    containment: &Containment,
    signals: &Signals,
) -> Result<i32> {
    let program = cmd.get_program().to_owned();
    let mut running = match containment {
        Containment::Inherit(fds) => Running {
            child: spawn(cmd, fds, libc::SIGTERM).map_err(|e| spawn_error(&program, e))?,
            program,
            guardian: None,
        },
        Containment::Lease(_) => {
            let mut c = Contained::new(containment, &program)?;
            let inner = c.command();
            inner.args(cmd.get_args());
            for (k, v) in cmd.get_envs() {
                match v {
                    Some(v) => inner.env(k, v),
                    None => inner.env_remove(k),
                };
            }
            if let Some(d) = cmd.get_current_dir() {
                inner.current_dir(d);
            }
            c.spawn(libc::SIGTERM)?
        }
    };
    let status = wait_forwarding(&mut running.child, signals)
        .map_err(|e| Error::new(Kind::OsErr, format!("cannot wait for the command: {e}")))?;
    running.finish(status)
}

/// A command being prepared to run under a held lock: directly with the lock's descriptors
/// inherited (flock), or under a [`guardian`] attached to the lease. Configure it through
/// [`Contained::command`] (arguments, environment, stdio, process group, `pre_exec`) as any
/// command: under a guardian, what applies to the guardian process is inherited by the command.
pub struct Contained {
    cmd: Command,
    program: OsString,
    inherit: Vec<RawFd>,
    link: Option<(Lease, UnixStream, UnixStream)>,
}

impl Contained {
    /// A command that runs `program` under `containment`.
    pub fn new(containment: &Containment, program: impl AsRef<OsStr>) -> Result<Contained> {
        let program = program.as_ref().to_owned();
        match containment {
            Containment::Inherit(fds) => Ok(Contained {
                cmd: Command::new(&program),
                program,
                inherit: fds.clone(),
                link: None,
            }),
            Containment::Lease(lease) => {
                if lease.is_lost() {
                    return Err(lock_lost(lease));
                }
                let (ours, theirs) = UnixStream::pair().map_err(|e| {
                    Error::new(Kind::OsErr, format!("cannot create a socket pair: {e}"))
                })?;
                Ok(Contained {
                    cmd: guardian::command(&program, theirs.as_raw_fd(), lease.grace()),
                    program,
                    inherit: vec![theirs.as_raw_fd()],
                    link: Some((lease.clone(), ours, theirs)),
                })
            }
        }
    }

    /// Another descriptor the command (or its guardian, and through it the command) inherits.
    pub fn inherit(&mut self, fd: RawFd) {
        self.inherit.push(fd);
    }

    /// The command to configure.
    pub fn command(&mut self) -> &mut Command {
        &mut self.cmd
    }

    /// Spawns it (`pdeathsig` for a directly spawned command; a guardian learns of cachelock's
    /// death from its socket instead). A failure to start is 126/127.
    pub fn spawn(mut self, pdeathsig: i32) -> Result<Running> {
        let sig = if self.link.is_some() { 0 } else { pdeathsig };
        let child =
            spawn(&mut self.cmd, &self.inherit, sig).map_err(|e| spawn_error(&self.program, e))?;
        let guardian = match self.link.take() {
            Some((lease, ours, theirs)) => {
                drop(theirs);
                let writer = ours.try_clone().map_err(|e| {
                    Error::new(Kind::OsErr, format!("cannot duplicate a socket: {e}"))
                })?;
                guardian::link(&lease, writer);
                Some((lease, ours))
            }
            None => None,
        };
        Ok(Running {
            child,
            program: self.program,
            guardian,
        })
    }
}

/// A command started by [`Contained::spawn`]. `child` is the command itself, or its guardian
/// (which forwards sent signals to the command and exits with the command's code).
pub struct Running {
    /// The process to wait for and to signal.
    pub child: Child,
    program: OsString,
    guardian: Option<(Lease, UnixStream)>,
}

impl Running {
    /// The exit code cachelock reports for a command that ended with `status`: its own code
    /// (128+N for signal N), 126/127 when it could not be started, `Kind::LockLost` when the
    /// guardian stopped it because the lease was lost.
    pub fn finish(&mut self, status: ExitStatus) -> Result<i32> {
        let Some((lease, sock)) = &self.guardian else {
            return Ok(exit_code(status));
        };
        match guardian::read_report(sock) {
            guardian::Report::Exit(c) => Ok(c),
            guardian::Report::Lost => Err(lock_lost(lease)),
            guardian::Report::Spawn(errno) => Err(spawn_error(
                &self.program,
                io::Error::from_raw_os_error(errno),
            )),
            guardian::Report::Nothing if lease.is_lost() => Err(lock_lost(lease)),
            guardian::Report::Nothing => Ok(exit_code(status)),
        }
    }

    /// Whether the lock behind this command was lost (always false under flock).
    pub fn lock_lost(&self) -> Option<Error> {
        self.guardian
            .as_ref()
            .filter(|(l, _)| l.is_lost())
            .map(|(l, _)| lock_lost(l))
    }
}

/// The error of a lock lost while its command ran (exit 75).
pub fn lock_lost(lease: &Lease) -> Error {
    Error::new(
        Kind::LockLost,
        format!(
            "lock {} was lost while the command ran: its lease could not be renewed in time, so the command's whole process tree was stopped (SIGTERM, then SIGKILL) before the lease could expire; another request may hold the lock now. Check the etcd cluster (etcdctl endpoint health) and run the command again",
            lease.lock()
        ),
    )
}

/// Maps a failure to start the command to 127 (not found) or 126 (cannot execute), as shells do.
pub fn spawn_error(program: &std::ffi::OsStr, err: io::Error) -> Error {
    let name = program.to_string_lossy();
    match err.kind() {
        io::ErrorKind::NotFound => Error::new(Kind::NotFound, format!("{name}: command not found")),
        io::ErrorKind::PermissionDenied => Error::new(
            Kind::CannotExecute,
            format!("{name}: permission denied (is it executable?)"),
        ),
        _ => Error::new(
            Kind::CannotExecute,
            format!("{name}: cannot execute: {err}"),
        ),
    }
}

/// The exit code cachelock reports for a finished command: its code, or 128+N for signal N.
pub fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        (None, None) => code::SOFTWARE,
    }
}

/// Where a caught signal came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Sent by a process (`kill`, `sigqueue`): only cachelock got it.
    Sent,
    /// Generated by the terminal (Ctrl-C, hang-up): the whole foreground process group got it.
    Terminal,
}

const SENT: u8 = 1;
const TERMINAL: u8 = 2;

/// SIGINT/SIGTERM/SIGHUP (and SIGCHLD, to wake a waiting parent) caught with their origin into
/// flags plus a self-pipe, so that a waiting loop can `poll` for them beside other descriptors.
pub struct Signals {
    read: UnixStream,
    flags: Arc<[AtomicU8; TERMINATING.len()]>,
    ids: Vec<signal_hook_registry::SigId>,
}

impl Signals {
    /// Installs the handlers (exit 71 when that fails). Keep the value alive for as long as
    /// signals should be caught.
    pub fn install() -> Result<Self> {
        Self::try_install()
            .map_err(|e| Error::new(Kind::OsErr, format!("cannot install signal handlers: {e}")))
    }

    fn try_install() -> io::Result<Self> {
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        let write = Arc::new(write);
        let flags: Arc<[AtomicU8; TERMINATING.len()]> = Arc::new(Default::default());
        let mut ids = Vec::new();
        for (i, sig) in TERMINATING
            .iter()
            .copied()
            .map(Some)
            .chain([None])
            .enumerate()
        {
            let (flags, write) = (flags.clone(), write.clone());
            let action = move |info: &libc::siginfo_t| {
                if let Some(sig) = sig {
                    // For waits that cannot poll our descriptor (a lock directory's meta.lock).
                    crate::sys::note_terminating_signal(sig);
                    let origin = if info.si_code == libc::SI_KERNEL {
                        TERMINAL
                    } else {
                        SENT
                    };
                    flags[i].fetch_or(origin, Ordering::SeqCst);
                }
                // A raw write(2): async-signal-safe; a full pipe already holds a wake-up.
                let _ = rustix::io::write(write.as_fd(), &[1]);
            };
            let signal = sig.unwrap_or(libc::SIGCHLD);
            // SAFETY: the action only does atomic operations and one write(2), both
            // async-signal-safe, and allocates nothing.
            ids.push(unsafe { signal_hook_registry::register_sigaction(signal, action) }?);
        }
        Ok(Self { read, flags, ids })
    }

    /// A descriptor that becomes readable when a signal arrives (for `poll`).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Empties the wake-up pipe and returns the terminating signals received since the last
    /// call, in [`TERMINATING`] order, with their origin (`Sent` if any copy was sent).
    pub fn take(&self) -> Vec<(i32, Origin)> {
        let mut buf = [0u8; 64];
        while matches!((&self.read).read(&mut buf), Ok(n) if n > 0) {}
        TERMINATING
            .iter()
            .zip(self.flags.iter())
            .filter_map(|(sig, f)| match f.swap(0, Ordering::SeqCst) {
                0 => None,
                bits if bits & SENT != 0 => Some((*sig, Origin::Sent)),
                _ => Some((*sig, Origin::Terminal)),
            })
            .collect()
    }

    /// The first terminating signal received since the last call, whatever its origin (a wait
    /// ends on either).
    pub fn take_terminating(&self) -> Option<i32> {
        self.take().first().map(|(sig, _)| *sig)
    }

    /// Waits until a signal arrives or `timeout_ms` passes (-1: forever).
    pub fn wait(&self, timeout_ms: i32) {
        let timeout =
            (timeout_ms >= 0).then(|| std::time::Duration::from_millis(timeout_ms as u64));
        crate::sys::poll_readable(&[self.fd()], timeout);
    }
}

impl crate::lock::Interrupt for Signals {
    fn fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    fn take(&self) -> Option<i32> {
        self.take_terminating()
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook_registry::unregister(id);
        }
    }
}

/// Waits for `child`, forwarding to it every terminating signal *sent* to cachelock meanwhile
/// (terminal-generated ones already reached it). Returns the child's status.
pub fn wait_forwarding(child: &mut Child, signals: &Signals) -> io::Result<ExitStatus> {
    loop {
        for (sig, origin) in signals.take() {
            if origin == Origin::Sent {
                // A failure (already gone) is harmless.
                let _ = crate::sys::kill(child.id() as i32, sig);
            }
        }
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        // SIGCHLD wakes us; the timeout only guards against a lost wake-up.
        signals.wait(1000);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn exit_codes_and_signals() {
        let s = Command::new("sh").args(["-c", "exit 7"]).status().unwrap();
        assert_eq!(exit_code(s), 7);
        let s = Command::new("sh")
            .args(["-c", "kill -9 $$"])
            .status()
            .unwrap();
        assert_eq!(exit_code(s), 128 + 9);
    }

    #[test]
    fn inherited_fd_stays_open_in_child() {
        let f = tempfile::tempfile().unwrap();
        let fd = f.as_raw_fd();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &format!("test -e /proc/self/fd/{fd}")]);
        let mut child = spawn(&mut cmd, &[fd], libc::SIGTERM).unwrap();
        assert!(child.wait().unwrap().success(), "fd {fd} not inherited");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &format!("test -e /proc/self/fd/{fd}")]);
        let mut child = spawn(&mut cmd, &[], libc::SIGTERM).unwrap();
        assert!(
            !child.wait().unwrap().success(),
            "fd {fd} leaked without asking"
        );
    }

    #[test]
    fn missing_command_is_127() {
        let err = Command::new("/nonexistent/cmd").spawn().unwrap_err();
        assert_eq!(spawn_error("x".as_ref(), err).exit_code(), 127);
    }
}
