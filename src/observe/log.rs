//! The request log (`request_log: FILE`): one JSON line per finished request, for "why did my
//! job wait" answered with `jq`.
//!
//! A line is appended with one `write(2)` on a descriptor opened `O_APPEND`, which Linux
//! performs whole under the file's lock on local filesystems: lines of many processes never
//! interleave (on NFS appends are not atomic between hosts: give each host its own file). The
//! file is bounded: a writer that finds it at `request_log_max_size` renames it to `FILE.1`
//! (`FILE.1` to `FILE.2`, ... up to `request_log_keep`) under an exclusive `flock` of the file
//! itself, after checking that the name still is the file it found full, so that two writers
//! never rotate twice. The file and its directory are reached without following a symlink in
//! the file's place, regular files only. Every line records who wrote it; like every claim in
//! a file its writers share, it is as good as the permissions of the file.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

use crate::lock::digest_label;
use crate::lock::events::{Event, Now, Observer, Summary};
use crate::policy::WaitDecision;
use crate::sys;

/// Largest line written; a request's record is far smaller (labels are bounded).
const MAX_LINE: usize = 256 * 1024;

/// Where and how big.
#[derive(Debug, Clone)]
pub struct LogSpec {
    /// The file.
    pub path: PathBuf,
    /// Rotated past this size.
    pub max_bytes: u64,
    /// Rotated files kept (`FILE.1` ... `FILE.N`).
    pub keep: u32,
    /// Permission bits of a file created (exact).
    pub file_mode: u32,
}

/// The request log as an observer of requests.
pub struct RequestLog {
    spec: LogSpec,
    dir: PathBuf,
    name: String,
    said: AtomicBool,
}

/// One line.
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    lock: &'a str,
    ticket: &'a str,
    generation: Option<u64>,
    slot: Option<u32>,
    user: Option<String>,
    uid: u32,
    host: &'a str,
    pid: u32,
    mode: crate::policy::Mode,
    priority: i32,
    labels: std::collections::BTreeMap<&'a str, &'a str>,
    queue_key: Option<&'a str>,
    policy: &'a str,
    digest: Option<String>,
    version: &'static str,
    outcome: &'static str,
    reason: Option<&'a str>,
    arrived: String,
    waited_ms: u64,
    held_ms: Option<u64>,
    position_at_arrival: Option<usize>,
    queue_at_arrival: Option<usize>,
    decisions: u32,
    last_decision: Option<Decision<'a>>,
    policy_faults: u32,
}

#[derive(Serialize)]
struct Decision<'a> {
    decision: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

fn decision(d: &WaitDecision) -> Decision<'_> {
    match d {
        WaitDecision::KeepWaiting(ms) => Decision {
            decision: "keep-waiting",
            ms: Some(*ms),
            reason: None,
        },
        WaitDecision::GiveUp(r) => Decision {
            decision: "give-up",
            ms: None,
            reason: Some(r),
        },
        WaitDecision::FallBack(r) => Decision {
            decision: "fall-back",
            ms: None,
            reason: Some(r),
        },
    }
}

/// The line of a finished request at `now`.
fn line(now: Now, s: &Summary<'_>) -> Vec<u8> {
    let t = s.ticket;
    let r = t.request();
    let ms = |d: std::time::Duration| d.as_millis().min(u64::MAX as u128) as u64;
    let uid = sys::euid();
    let l = Line {
        time: crate::output::rfc3339(now.wall_ms),
        lock: &r.lock,
        ticket: t.id(),
        generation: t.generation,
        slot: t.slot,
        user: sys::user_name(uid),
        uid,
        host: &r.host,
        pid: r.pid,
        mode: r.mode,
        priority: r.priority,
        labels: r
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
        queue_key: t.queue_key.as_deref(),
        policy: s.policy,
        digest: s.digest.map(digest_label),
        version: crate::VERSION,
        outcome: s.outcome.as_str(),
        reason: s.reason,
        arrived: crate::output::rfc3339(r.enqueued_at_ms),
        waited_ms: ms(s.waited),
        held_ms: s.held.map(ms),
        position_at_arrival: s.position_at_arrival.map(|p| p.position),
        queue_at_arrival: s.position_at_arrival.map(|p| p.of),
        decisions: s.decisions,
        last_decision: s.last_decision.map(decision),
        policy_faults: s.faults,
    };
    let mut v = serde_json::to_vec(&l).expect("a record encodes");
    v.push(b'\n');
    v
}

impl RequestLog {
    /// The log `spec` describes (nothing is opened yet).
    pub fn new(spec: LogSpec) -> RequestLog {
        let dir = spec
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let name = spec
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        RequestLog {
            spec,
            dir,
            name,
            said: AtomicBool::new(false),
        }
    }

    /// Appends one line (rotating first if the file is full).
    pub fn append(&self, line: &[u8]) -> std::io::Result<()> {
        if line.len() > MAX_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "record too large",
            ));
        }
        let dir = sys::open_dir(&self.dir)?;
        for _ in 0..4 {
            let f = self.open(dir.as_fd())?;
            if f.metadata()?.size() < self.spec.max_bytes {
                let n = (&f).write(line)?;
                if n != line.len() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::WriteZero,
                        "short write",
                    ));
                }
                return Ok(());
            }
            self.rotate(dir.as_fd(), &f)?;
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            "the log keeps filling up while it is rotated",
        ))
    }

    /// Opens the file for appending, creating it (with exactly the file mode) if missing.
    fn open(&self, dir: std::os::fd::BorrowedFd<'_>) -> std::io::Result<File> {
        sys::open_append_at(dir, &self.name, self.spec.file_mode)
    }

    /// Renames the full file `f` away, unless another writer did so already.
    fn rotate(&self, dir: std::os::fd::BorrowedFd<'_>, f: &File) -> std::io::Result<()> {
        sys::flock(f, true)?;
        let still = sys::is_same_file_at(f, dir, &self.name);
        if still && f.metadata()?.size() >= self.spec.max_bytes {
            let numbered = |k: u32| format!("{}.{k}", self.name);
            for k in (1..self.spec.keep.max(1)).rev() {
                match sys::rename_at(dir, &numbered(k), dir, &numbered(k + 1)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            sys::rename_at(dir, &self.name, dir, &numbered(1))?;
        }
        // Closing `f` (the caller's) drops the lock; a writer that opened the old file before
        // the rename appends its line there, in FILE.1: nothing is lost.
        Ok(())
    }
}

impl Observer for RequestLog {
    fn event(&self, now: Now, event: &Event<'_>) {
        let Event::Finished(s) = event else { return };
        if let Err(e) = self.append(&line(now, s)) {
            if !self.said.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "cannot append to the request log {}: {e}",
                    self.spec.path.display()
                );
            }
        }
    }
}
