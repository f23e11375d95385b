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
//! **Signals: each exactly once.** The command runs as a job of its own ([`Contained::job`]): in
//! a new process group, which is made the terminal's foreground group when cachelock's is (as
//! a shell runs a job). So a Ctrl-C typed at the terminal, and terminal input, reach the
//! command (and not cachelock), while a signal sent to cachelock — alone, or to its whole
//! process group as a CI runner cancelling a job does (`kill -INT -- -PGID`) — reaches
//! cachelock only, which forwards SIGINT, SIGTERM and SIGHUP to the command once (a second
//! SIGINT makes tools such as terraform force-quit). A job stopped at the terminal (Ctrl-Z)
//! stops cachelock too, and continues with it. When cachelock cannot tell a terminal's signal
//! from a sent one — a command sharing its group — only sent ones are forwarded.

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
use crate::sys::{self, ChildState};

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

/// Runs `cmd` so that the lock behind `containment` covers it, as a job of its own (see the
/// module's signal rule); returns the exit code cachelock reports (the command's, or 128+N).
/// Under a lease, a lost lock is `Kind::LockLost` (exit 75) once the command's tree is gone.
pub fn run_contained(
    cmd: &mut Command,
    containment: &Containment,
    signals: &Signals,
) -> Result<i32> {
    let program = cmd.get_program().to_owned();
    let mut running = match containment {
        Containment::Inherit(fds) => {
            let job = JobPlan::prepare(cmd);
            let child = spawn(cmd, fds, libc::SIGTERM).map_err(|e| spawn_error(&program, e))?;
            Running {
                job: Some(job.started(&child)),
                child,
                program,
                guardian: None,
            }
        }
        Containment::Lease(_) => {
            let mut c = Contained::new(containment, &program)?;
            c.job();
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
    let status = running
        .wait(signals)
        .map_err(|e| Error::new(Kind::OsErr, format!("cannot wait for the command: {e}")))?;
    running.finish(status)
}

/// A job about to start: its own process group, and the terminal if cachelock has it.
struct JobPlan {
    tty: Option<std::os::fd::OwnedFd>,
}

impl JobPlan {
    /// Puts `cmd` in a new process group, made the terminal's foreground group by the child
    /// itself before it execs (so that nothing it reads or is sent at the terminal goes
    /// elsewhere even for an instant) when cachelock is in the foreground.
    fn prepare(cmd: &mut Command) -> JobPlan {
        cmd.process_group(0);
        let tty = sys::foreground_terminal();
        if let Some(t) = &tty {
            let fd = t.as_raw_fd();
            // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
            // calls (signal mask, tcsetpgrp) on a descriptor the parent keeps open.
            unsafe {
                cmd.pre_exec(move || sys::set_foreground(fd, 0));
            }
        }
        JobPlan { tty }
    }

    /// The job of `child` (its process group is its pid).
    fn started(self, child: &Child) -> Job {
        Job {
            pgid: child.id() as i32,
            tty: self.tty,
        }
    }
}

/// A command running as a job of its own; the terminal, if it was given it, is taken back
/// when this ends.
struct Job {
    pgid: i32,
    tty: Option<std::os::fd::OwnedFd>,
}

impl Drop for Job {
    fn drop(&mut self) {
        if let Some(t) = &self.tty {
            let _ = sys::set_foreground(t.as_raw_fd(), sys::process_group());
        }
    }
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
    job: bool,
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
                job: false,
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
                    job: false,
                })
            }
        }
    }

    /// Runs it as a job of its own: a new process group (the guardian's, under a lease, which
    /// the command shares), made the terminal's foreground group when cachelock's is, so that
    /// every signal reaches the command once (see the module's signal rule). For the user's
    /// command; not for a daemon of cachelock's own.
    pub fn job(&mut self) {
        self.job = true;
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
        let job = self.job.then(|| JobPlan::prepare(&mut self.cmd));
        let child =
            spawn(&mut self.cmd, &self.inherit, sig).map_err(|e| spawn_error(&self.program, e))?;
        let job = job.map(|j| j.started(&child));
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
            job,
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
    job: Option<Job>,
}

impl Running {
    /// Waits for the command, forwarding SIGINT, SIGTERM and SIGHUP that reach cachelock meanwhile
    /// (see the module's signal rule); a job stopped at the terminal stops cachelock with it.
    pub fn wait(&mut self, signals: &Signals) -> io::Result<ExitStatus> {
        let pid = self.child.id() as i32;
        loop {
            for (sig, origin) in signals.take() {
                // A job of its own got nothing that reached cachelock (a terminal signals its
                // own foreground group); a command in cachelock's group got the terminal's.
                if self.job.is_some() || origin == Origin::Sent {
                    // A failure (already gone) is harmless.
                    let _ = sys::kill(pid, sig);
                }
            }
            match sys::child_state(pid)? {
                ChildState::Ended(status) => {
                    // The terminal goes back to cachelock's group.
                    self.job = None;
                    return Ok(ExitStatus::from_raw(status));
                }
                ChildState::Stopped(_) => self.suspend(),
                ChildState::Running => {}
            }
            // SIGCHLD wakes us; the timeout only guards against a lost wake-up.
            signals.wait(1000);
        }
    }

    /// The job at the terminal stopped (Ctrl-Z): as a shell's job, cachelock stops too (its
    /// own shell sees the job stopped), then gives the job the terminal again if continued in
    /// the foreground, and continues it.
    fn suspend(&mut self) {
        let Some(Job {
            pgid,
            tty: Some(tty),
        }) = &self.job
        else {
            return;
        };
        let fd = tty.as_raw_fd();
        let _ = sys::set_foreground(fd, sys::process_group());
        let _ = sys::kill(std::process::id() as i32, libc::SIGSTOP);
        if sys::foreground_terminal().is_some() {
            let _ = sys::set_foreground(fd, *pgid);
        }
        let _ = sys::kill(-*pgid, libc::SIGCONT);
    }

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
