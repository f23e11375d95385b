//! Child processes: spawning with inherited lock descriptors and a parent-death signal,
//! forwarding SIGINT/SIGTERM, and turning an exit status into cachelock's exit code.
//!
//! Why inherit: a SIGKILLed cachelock must not free a lock while its command still runs, so the
//! locked descriptor is passed to the command (Rust opens everything `O_CLOEXEC`). Why a
//! parent-death signal: the command is then told to stop when cachelock dies, so the lock is not
//! held by an orphan for long. `PR_SET_PDEATHSIG` fires when the *thread* that forked exits:
//! spawn from the main thread (or one that lives as long as the process).

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::{code, Error, Kind};

/// Signals cachelock forwards to its command (and that end a wait cleanly).
pub const FORWARDED: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Spawns `cmd` with `inherit` descriptors left open across exec and `pdeathsig` delivered to
/// the child if cachelock dies.
pub fn spawn(cmd: &mut Command, inherit: &[RawFd], pdeathsig: i32) -> io::Result<Child> {
    let inherit = inherit.to_vec();
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
    // (fcntl, prctl, getppid, kill, getpid) on values captured before the fork.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &inherit {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, pdeathsig as libc::c_ulong, 0, 0, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody will signal us.
            if libc::getppid() != parent {
                libc::kill(libc::getpid(), pdeathsig);
            }
            Ok(())
        });
    }
    cmd.spawn()
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

/// SIGINT/SIGTERM/SIGHUP (and SIGCHLD, to wake a waiting parent) caught into flags plus a
/// self-pipe, so that a waiting loop can `poll` for them alongside other descriptors.
pub struct Signals {
    flags: Vec<(i32, Arc<AtomicBool>)>,
    read: UnixStream,
    ids: Vec<signal_hook::SigId>,
}

impl Signals {
    /// Installs the handlers. Keep the value alive for as long as signals should be caught.
    pub fn install() -> io::Result<Self> {
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        let mut flags = Vec::new();
        let mut ids = Vec::new();
        for sig in FORWARDED.iter().copied().chain([libc::SIGCHLD]) {
            let flag = Arc::new(AtomicBool::new(false));
            ids.push(signal_hook::flag::register(sig, flag.clone())?);
            ids.push(signal_hook::low_level::pipe::register(
                sig,
                write.try_clone()?,
            )?);
            flags.push((sig, flag));
        }
        Ok(Self { flags, read, ids })
    }

    /// A descriptor that becomes readable when a signal arrives (for `poll`).
    pub fn fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// Empties the wake-up pipe and returns the terminating signals (not SIGCHLD) received since
    /// the last call, in FORWARDED order.
    pub fn take(&self) -> Vec<i32> {
        let mut buf = [0u8; 64];
        while matches!((&self.read).read(&mut buf), Ok(n) if n > 0) {}
        self.flags
            .iter()
            .filter(|(sig, _)| *sig != libc::SIGCHLD)
            .filter(|(_, f)| f.swap(false, Ordering::SeqCst))
            .map(|(sig, _)| *sig)
            .collect()
    }

    /// Waits until the fd is readable or `timeout_ms` passes (-1: forever).
    pub fn wait(&self, timeout_ms: i32) {
        let mut pfd = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

/// Waits for `child`, forwarding every terminating signal cachelock receives meanwhile.
/// Returns the child's status.
pub fn wait_forwarding(child: &mut Child, signals: &Signals) -> io::Result<ExitStatus> {
    loop {
        for sig in signals.take() {
            // SAFETY: kill with the child's pid; a failure (already gone) is harmless.
            unsafe { libc::kill(child.id() as libc::pid_t, sig) };
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
