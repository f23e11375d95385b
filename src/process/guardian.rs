//! The guardian: a tiny process between cachelock and a command that runs under a lease.
//!
//! A lease, unlike a kernel flock, is not inherited: when cachelock is SIGKILLed or frozen, or
//! cannot renew its lease, the lock ends while the command may still run. So the command runs
//! as the child of a guardian — cachelock's own binary re-executed with [`GUARDIAN_ARG`] — which
//! is a child subreaper (orphans of the command's tree are re-parented to it, so it can find all
//! of them) and stops the whole tree, SIGTERM then SIGKILL after the lease's grace, when
//!
//! - the stop deadline cachelock last sent passes without a newer one (a renewal failed, or
//!   cachelock is frozen): it reports `lost`;
//! - its socket to cachelock reaches end-of-file (cachelock died: no one renews the lease):
//!   once the whole tree is gone it releases the lock itself, if the backend left it a way to
//!   ([`crate::lock::Lease::set_orphan_release`]), so that the next waiter is served at once
//!   rather than when the lease expires;
//! - a deadline of 0 arrives (the lease is known to be gone: SIGKILL at once).
//!
//! When the command exits by itself, processes it left behind are stopped the same way (the
//! lock no longer covers them), and the guardian reports `exit N`. The guardian and the command
//! share one process group — the job's, when cachelock runs the command as a job of its own
//! ([`super::Contained::job`]) — so Ctrl-C and terminal input reach the command directly; the
//! guardian forwards to the command only signals *sent* to it (cachelock forwards what reaches
//! it there), never terminal-generated ones, which the command got already.
//!
//! Wire format: cachelock → guardian, 8-byte little-endian `CLOCK_MONOTONIC` nanoseconds, the
//! lease's stop deadline ([`link`]; 0: stop now), after, first, the release token if there is
//! one (`u64::MAX`, a 4-byte little-endian length, the token); guardian → cachelock, one line:
//! `exit N`, `lost`, or `spawn ERRNO` (the command could not be started).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use super::{exit_code, spawn, Origin, Signals};
use crate::error::code;
use crate::lock::Lease;
use crate::sys;

/// The first argument that makes cachelock's binary a guardian (`cachelock __cachelock-guardian
/// FD GRACE_MS -- PROGRAM ARGS...`). A program embedding the library with a lease backend must
/// call [`run_if_invoked`] first thing in `main`.
pub const GUARDIAN_ARG: &str = "__cachelock-guardian";

/// How long a new guardian waits for its first deadline before giving up.
const FIRST_DEADLINE_WAIT: Duration = Duration::from_secs(10);

/// The frame marker of a release token (no deadline is this late).
const TOKEN: u64 = u64::MAX;

/// Longest release token taken.
const MAX_TOKEN: usize = 64 * 1024;

/// If this process was started as a guardian, runs it and exits with its code.
pub fn run_if_invoked() {
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).map(OsString::as_os_str) == Some(OsStr::new(GUARDIAN_ARG)) {
        std::process::exit(main(&args[2..]));
    }
}

/// The command line of a guardian that runs `program` (arguments follow: add them to the
/// returned command), talking on descriptor `fd`.
pub(super) fn command(program: &OsStr, fd: RawFd, grace: Duration) -> Command {
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0("cachelock-guardian")
        .arg(GUARDIAN_ARG)
        .arg(fd.to_string())
        .arg(grace.as_millis().to_string())
        .arg("--")
        .arg(program);
    cmd
}

/// Sends every stop deadline of `lease` to a guardian over `link` (non-blocking: a guardian that
/// is gone is dropped from the lease's watchers).
pub(super) fn link(lease: &Lease, link: UnixStream) {
    if let Some(token) = lease.orphan_release().filter(|t| t.len() <= MAX_TOKEN) {
        // Written before any deadline into an empty socket buffer, far larger than the token.
        let mut frame = TOKEN.to_le_bytes().to_vec();
        frame.extend((token.len() as u32).to_le_bytes());
        frame.extend(token);
        let _ = (&link).write_all(&frame);
    }
    let _ = link.set_nonblocking(true);
    lease.watch(Box::new(move |deadline| {
        let mut w = &link;
        !matches!(w.write(&deadline.to_le_bytes()), Err(e) if e.kind() != io::ErrorKind::WouldBlock)
    }));
}

/// What the guardian reported, read by cachelock once it exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Report {
    Exit(i32),
    Lost,
    Spawn(i32),
    Nothing,
}

/// Reads the guardian's report from cachelock's end of the socket (after the guardian exited).
pub(super) fn read_report(sock: &UnixStream) -> Report {
    let _ = sock.set_nonblocking(true);
    let mut buf = Vec::new();
    let _ = (&mut (&*sock)).take(256).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let line = text.lines().last().unwrap_or("");
    let mut it = line.split_whitespace();
    match (it.next(), it.next().and_then(|n| n.parse().ok())) {
        (Some("exit"), Some(n)) => Report::Exit(n),
        (Some("spawn"), Some(n)) => Report::Spawn(n),
        (Some("lost"), _) => Report::Lost,
        _ => Report::Nothing,
    }
}

/// Why the guardian stops the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The command exited; stop what it left behind.
    Finished,
    /// The deadline passed (or a 0 deadline arrived).
    Lost,
    /// cachelock is gone.
    ParentGone,
}

/// The guardian's `main` (arguments after [`GUARDIAN_ARG`]); returns its exit code.
pub fn main(args: &[OsString]) -> i32 {
    let parsed = (|| {
        let fd: RawFd = args.first()?.to_str()?.parse().ok()?;
        let grace_ms: u64 = args.get(1)?.to_str()?.parse().ok()?;
        if args.get(2).map(OsString::as_os_str) != Some(OsStr::new("--")) {
            return None;
        }
        let program = args.get(3)?.clone();
        Some((fd, Duration::from_millis(grace_ms), program, &args[4..]))
    })();
    let Some((fd, grace, program, rest)) = parsed else {
        eprintln!("cachelock: {GUARDIAN_ARG} is internal to cachelock (usage: FD GRACE_MS -- PROGRAM ARGS...)");
        return code::USAGE;
    };
    // SAFETY: only borrowed for the duration of one fcntl(F_GETFD), which checks it is open.
    if rustix::io::fcntl_getfd(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }).is_err() {
        eprintln!("cachelock: guardian: descriptor {fd} is not open");
        return code::USAGE;
    }
    // SAFETY: the descriptor was checked open above and was passed to us for this purpose.
    let sock = unsafe { UnixStream::from_raw_fd(fd) };
    // Not inherited by the command: only this process may keep cachelock's link open.
    if let Ok(flags) = rustix::io::fcntl_getfd(&sock) {
        let _ = rustix::io::fcntl_setfd(&sock, flags | rustix::io::FdFlags::CLOEXEC);
    }
    let _ = sock.set_nonblocking(true);
    let mut g = Guardian {
        sock,
        grace,
        inbox: Vec::new(),
        stop_at: None,
        eof: false,
        release: None,
    };
    if let Err(e) = sys::set_child_subreaper() {
        eprintln!("cachelock: guardian: cannot become a child subreaper: {e}");
    }
    let signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cachelock: guardian: {e}");
            return code::OSERR;
        }
    };
    // The command starts only under a live deadline.
    let first_by = sys::monotonic_ns() + FIRST_DEADLINE_WAIT.as_nanos() as u64;
    while g.stop_at.is_none() && !g.eof && sys::monotonic_ns() < first_by {
        let left = Duration::from_nanos(first_by.saturating_sub(sys::monotonic_ns()));
        sys::poll_readable(&[g.sock.as_fd()], Some(left));
        g.read_deadlines();
    }
    match g.stop_at {
        Some(at) if at > sys::monotonic_ns() && !g.eof => {}
        _ => {
            g.report("lost");
            return code::TEMPFAIL;
        }
    }
    let mut cmd = Command::new(&program);
    cmd.args(rest);
    // If the guardian itself is SIGKILLed, the command at least goes with it.
    let child = match spawn(&mut cmd, &[], libc::SIGKILL) {
        Ok(c) => c,
        Err(e) => {
            g.report(&format!(
                "spawn {}",
                e.raw_os_error().unwrap_or(libc::ENOENT)
            ));
            return if e.kind() == io::ErrorKind::NotFound {
                code::NOT_FOUND
            } else {
                code::CANNOT_EXECUTE
            };
        }
    };
    let pid = child.id() as i32;
    // Reaped below with waitpid(-1), with the orphans: the handle is not used to wait.
    drop(child);
    let mut status = None;
    let why = loop {
        while let Some((p, st)) = sys::reap_any() {
            if p == pid {
                status = Some(ExitStatus::from_raw(st));
            }
        }
        if status.is_some() {
            break Stop::Finished;
        }
        for (sig, origin) in signals.take() {
            if origin == Origin::Sent {
                let _ = sys::kill(pid, sig);
            }
        }
        g.read_deadlines();
        if g.eof {
            break Stop::ParentGone;
        }
        let now = sys::monotonic_ns();
        let at = g.stop_at.unwrap_or(0);
        if now >= at {
            break Stop::Lost;
        }
        // SIGCHLD and signals wake the poll through the signal pipe.
        sys::poll_readable(
            &[signals.fd(), g.sock.as_fd()],
            Some(Duration::from_nanos(at - now)),
        );
    };
    let now = sys::monotonic_ns();
    let at = g.stop_at.unwrap_or(0);
    let kill_at = match why {
        // The lease is known gone: no grace.
        Stop::Lost if at == 0 => now,
        Stop::Lost => at.saturating_add(g.grace.as_nanos() as u64),
        Stop::Finished | Stop::ParentGone => now
            .saturating_add(g.grace.as_nanos() as u64)
            .min(at.saturating_add(g.grace.as_nanos() as u64)),
    };
    let gone = stop_tree(&signals, kill_at);
    if let (Stop::ParentGone, true, Some(token)) = (why, gone, &g.release) {
        if let Err(e) = crate::lock::release_orphaned(token) {
            eprintln!(
                "cachelock: guardian: cannot release the lock of a cachelock that died ({e}); it is freed when its lease expires"
            );
        }
    }
    match why {
        Stop::Finished => {
            let c = status.map(exit_code).unwrap_or(code::SOFTWARE);
            g.report(&format!("exit {c}"));
            c
        }
        Stop::Lost => {
            g.report("lost");
            code::TEMPFAIL
        }
        Stop::ParentGone => code::TEMPFAIL,
    }
}

struct Guardian {
    sock: UnixStream,
    grace: Duration,
    inbox: Vec<u8>,
    stop_at: Option<u64>,
    eof: bool,
    /// The release token, if cachelock sent one.
    release: Option<Vec<u8>>,
}

impl Guardian {
    /// Reads every pending deadline; the newest wins.
    fn read_deadlines(&mut self) {
        let mut buf = [0u8; 512];
        loop {
            match (&self.sock).read(&mut buf) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => self.inbox.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.eof = true;
                    break;
                }
            }
        }
        while self.inbox.len() >= 8 {
            let v = u64::from_le_bytes(self.inbox[..8].try_into().expect("8 bytes"));
            if v == TOKEN {
                let Some(len) = self.inbox.get(8..12) else {
                    break;
                };
                let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
                if len > MAX_TOKEN {
                    self.eof = true;
                    break;
                }
                if self.inbox.len() < 12 + len {
                    break;
                }
                self.release = Some(self.inbox[12..12 + len].to_vec());
                self.inbox.drain(..12 + len);
                continue;
            }
            self.inbox.drain(..8);
            self.stop_at = Some(v);
        }
    }

    fn report(&self, line: &str) {
        let _ = self.sock.set_nonblocking(false);
        let _ = (&self.sock).write_all(format!("{line}\n").as_bytes());
    }
}

/// Every live descendant of this process (children first), from `/proc/*/stat`.
fn descendants() -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // After the parenthesised command name: state, ppid, ...
            let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                continue;
            };
            let mut f = after.split_whitespace();
            let state = f.next();
            let ppid = f.next().and_then(|p| p.parse::<i32>().ok());
            if let (Some(state), Some(ppid)) = (state, ppid) {
                if state != "X" {
                    children.entry(ppid).or_default().push(pid);
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![me];
    while let Some(p) = todo.pop() {
        if let Some(c) = children.get(&p) {
            out.extend(c);
            todo.extend(c);
        }
    }
    out
}

/// SIGTERM (and SIGCONT, so a stopped process can act on it) to every descendant, then SIGKILL
/// to whatever is left at `kill_at`, until none is left (zombies are reaped on the way);
/// returns whether none is.
fn stop_tree(signals: &Signals, kill_at: u64) -> bool {
    let mut killed = false;
    let mut termed = false;
    let give_up_at = kill_at.saturating_add(30_000_000_000);
    loop {
        while sys::reap_any().is_some() {}
        let pids = descendants();
        if pids.is_empty() {
            return true;
        }
        let now = sys::monotonic_ns();
        if now >= kill_at {
            for &p in &pids {
                let _ = sys::kill(p, libc::SIGKILL);
            }
            killed = true;
        } else if !termed {
            for &p in &pids {
                let _ = sys::kill(p, libc::SIGTERM);
                let _ = sys::kill(p, libc::SIGCONT);
            }
            termed = true;
        }
        if now >= give_up_at {
            eprintln!("cachelock: guardian: processes {pids:?} survived SIGKILL for 30 s");
            return false;
        }
        let _ = signals.take();
        let wait = if killed {
            Duration::from_millis(5)
        } else {
            Duration::from_nanos(kill_at.saturating_sub(now)).min(Duration::from_millis(50))
        };
        signals.wait(wait.as_millis().max(1) as i32);
    }
}
