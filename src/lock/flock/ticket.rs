//! Ticket files: one per live request in `queue/`, flocked by its owner for as long as it lives.
//!
//! Liveness never uses PIDs: a ticket is alive exactly while some process holds a flock on it.
//! A ticket is created in `tmp/` (a fresh name, `O_EXCL`), locked, written and only then
//! published in `queue/` with a hard link, so a scanner can never find a live ticket unlocked
//! and delete it, and publishing never replaces another ticket (a rename would).
//!
//! Other users' tickets are untrusted input: every read is bounded ([`MAX_TICKET_BYTES`]) and
//! checked against the bounds a request is held to at enqueue ([`crate::lock::validate`]); a
//! live ticket that fails is *unreadable* — the engine ignores it, `status` shows it.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt as _;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::dir::{owner_only, LockFiles, MAX_ENTRIES, MAX_SCANNED};
use crate::error::{Error, Kind, Result};
use crate::lock::backend::{TicketData, Unreadable};
use crate::lock::{MAX_LABELS, MAX_LABEL_KEY, MAX_LABEL_VALUE, MAX_QUEUE_KEY};
use crate::sys::{self, EntryKind, Open};

/// Longest host name a ticket may carry (Linux allows 64; DNS names 253).
pub const MAX_HOST: usize = 255;

/// Longest version a ticket may carry.
pub const MAX_VERSION: usize = 64;
/// Longest policy digest a ticket may carry (`sha256:` and 64 hex digits, with room).
pub const MAX_DIGEST: usize = 80;

/// Largest ticket file read: the largest ticket a valid request can write — every label,
/// the queue key, the host and the policy at their bounds, each byte escaped by JSON as
/// `\u00XX` (6 bytes) — plus 1 KiB for the fixed fields. About 68 KB; anything larger is
/// corrupt.
pub const MAX_TICKET_BYTES: usize = 1024
    + 6 * (MAX_LABELS * (MAX_LABEL_KEY + MAX_LABEL_VALUE + 6)
        + MAX_QUEUE_KEY
        + MAX_HOST
        + crate::lock::name::MAX_LEN
        + crate::lock::PolicyRef::MAX_NAME
        + MAX_DIGEST
        + MAX_VERSION);

/// Formats ticket number `n` as an id.
pub fn ticket_id(n: u64) -> String {
    format!("{n:012}")
}

/// Whether `name` can be a ticket id ([`ticket_id`] of some number): 12 to 20 digits.
pub fn is_ticket_id(name: &str) -> bool {
    (12..=20).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_digit())
}

/// Who owns the entries of `dir` (from the first 256), for a message about a flood:
/// `uid 1001: 250, uid 0: 6`.
pub fn owners_sample(dir: BorrowedFd<'_>) -> String {
    let mut counts = std::collections::BTreeMap::<u32, usize>::new();
    if let Ok((entries, _)) = sys::list_dir(dir, 256) {
        for (name, _) in entries {
            if let Ok(i) = sys::info_at(dir, &name) {
                *counts.entry(i.uid).or_default() += 1;
            }
        }
    }
    let mut v: Vec<(u32, usize)> = counts.into_iter().collect();
    v.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    let text: Vec<String> = v.iter().map(|(u, n)| format!("uid {u}: {n}")).collect();
    format!("owners of the first 256: {}", text.join(", "))
}

/// A ticket file's content: the backend-independent ticket, plus the kernel lock file its
/// owner holds (format 2; format 1 tickets lack it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileTicket {
    /// The request.
    #[serde(flatten)]
    pub data: TicketData,
    /// Device and inode of the slot file held, once holding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_file: Option<[u64; 2]>,
}

#[derive(Serialize)]
struct FileTicketRef<'a> {
    #[serde(flatten)]
    data: &'a TicketData,
    #[serde(skip_serializing_if = "Option::is_none")]
    lock_file: Option<[u64; 2]>,
}

/// The caller's own ticket: the file stays open and flocked until [`OwnTicket::remove`] or drop.
#[derive(Debug)]
pub struct OwnTicket {
    file: Option<File>,
    files: Arc<LockFiles>,
    /// What the ticket says.
    pub data: TicketData,
    /// The slot file held (device, inode), once holding.
    pub lock_file: Option<(u64, u64)>,
    written: usize,
    /// Whether the file carries the *waiting* lock: an exclusive open-file-description lock
    /// held from creation until the lock is taken (or the request leaves or dies), on which the
    /// waiter behind waits in the kernel ([`crate::sys::ofd_lock_wait`]). Local filesystems
    /// only: there these locks are independent of `flock`.
    waiting: bool,
}

impl OwnTicket {
    /// Creates, locks, writes and publishes a ticket in `queue/` under `data.id`, with the
    /// waiting lock if `waiting_lock` (see [`OwnTicket::stop_waiting`]). `Ok(None)`: that id is
    /// taken (the counters were lowered or lost); the caller takes another number.
    pub fn create(
        files: &Arc<LockFiles>,
        data: TicketData,
        waiting_lock: bool,
    ) -> Result<Option<OwnTicket>> {
        let tmp_dir = files.need(&files.tmp, "tmp")?;
        let (name, file) = new_tmp_file(files, tmp_dir, data.id())?;
        let cleanup = || {
            let _ = sys::unlink_at(tmp_dir, &name);
        };
        match sys::try_flock(&file, true) {
            Ok(true) => {}
            r => {
                cleanup();
                let e = r.err().unwrap_or_else(|| io::ErrorKind::WouldBlock.into());
                return Err(Error::io(
                    format!(
                        "cannot lock new ticket {}",
                        files.path("tmp").join(&name).display()
                    ),
                    e,
                ));
            }
        }
        // Taken before the ticket is published, so that nobody can see it waiting without it.
        let waiting = waiting_lock && matches!(sys::try_ofd_lock(&file, true), Ok(true));
        let mut t = OwnTicket {
            file: Some(file),
            files: files.clone(),
            data,
            lock_file: None,
            written: 0,
            waiting,
        };
        if let Err(e) = t.write() {
            cleanup();
            t.file = None;
            return Err(e);
        }
        let published = sys::link_at(tmp_dir, &name, files.queue.as_fd(), t.data.id());
        cleanup();
        match published {
            Ok(()) => Ok(Some(t)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                t.file = None;
                Ok(None)
            }
            Err(e) => {
                t.file = None;
                Err(Error::io(
                    format!(
                        "cannot publish ticket {}",
                        files.path("queue").join(t.data.id()).display()
                    ),
                    e,
                ))
            }
        }
    }

    /// The locked descriptor (inherited by a held lock's command, so that the ticket says
    /// "holding" for as long as the command runs, even if cachelock is killed).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_ref().expect("ticket file open").as_fd()
    }

    /// Rewrites the file in place through the locked descriptor (a second open would drop the
    /// lock on NFS). Padding with spaces up to the previous length instead of truncating keeps
    /// every read a complete JSON document.
    pub fn write(&mut self) -> Result<()> {
        let mut text = serde_json::to_vec(&FileTicketRef {
            data: &self.data,
            lock_file: self.lock_file.map(|(d, i)| [d, i]),
        })
        .map_err(|e| Error::software(format!("cannot encode ticket: {e}")))?;
        if text.len() < self.written {
            text.resize(self.written, b' ');
        }
        let file = self.file.as_ref().expect("ticket file open");
        file.write_all_at(&text, 0).map_err(|e| {
            Error::io(
                format!(
                    "cannot write ticket {}",
                    self.files.path("queue").join(self.data.id()).display()
                ),
                e,
            )
        })?;
        self.written = text.len();
        Ok(())
    }

    /// Records that the lock is held: the slot, its generation and the slot file's identity.
    pub fn mark_holding(
        &mut self,
        slot: u32,
        generation: u64,
        now_ms: u64,
        lock_file: (u64, u64),
    ) -> Result<()> {
        self.data.holding = true;
        self.data.slot = Some(slot);
        self.data.generation = Some(generation);
        self.data.acquired_at_ms = Some(now_ms);
        self.lock_file = Some(lock_file);
        self.write()
    }

    /// Drops the waiting lock (the lock is ours: the waiter behind wakes and takes our place
    /// at the head, so that it already waits in the kernel when we release).
    pub fn stop_waiting(&mut self) {
        if std::mem::take(&mut self.waiting) {
            if let Some(f) = self.file.as_ref() {
                let _ = sys::ofd_unlock(f);
            }
        }
    }

    /// Leaves the queue: unlink while still locked (so no prober can mistake it for dead and
    /// race us), then close.
    pub fn remove(mut self) {
        self.remove_inner();
    }

    /// Closes the ticket without removing it, as its owner's death would: it stays in
    /// `queue/`, unlocked, until a scan removes it.
    pub fn abandon(mut self) {
        drop(self.file.take());
    }

    fn remove_inner(&mut self) {
        if let Some(f) = self.file.take() {
            let _ = sys::unlink_at(self.files.queue.as_fd(), self.data.id());
            drop(f);
        }
    }
}

impl Drop for OwnTicket {
    fn drop(&mut self) {
        self.remove_inner();
    }
}

/// A fresh file in `tmp/` for ticket `id`: `<id>.<pid>.<n>`, created with `O_EXCL` (a name
/// someone planted is skipped, never opened).
fn new_tmp_file(files: &LockFiles, tmp: BorrowedFd<'_>, id: &str) -> Result<(String, File)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut last = None;
    for _ in 0..16 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{id}.{}.{nanos:x}{n}", std::process::id());
        match sys::create_new_at(tmp, &name, owner_only(files.file_mode)) {
            Ok(f) => return Ok((name, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => {
                return Err(Error::io(
                    format!("cannot create a ticket in {}", files.path("tmp").display()),
                    e,
                ))
            }
        }
    }
    Err(Error::io(
        format!("cannot create a ticket in {}", files.path("tmp").display()),
        last.unwrap_or_else(|| io::ErrorKind::AlreadyExists.into()),
    ))
}

/// What probing another ticket found.
#[derive(Debug)]
// Short-lived, one per probe: boxing the ticket would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Probe {
    /// Alive, with its content, or why that cannot be used (shown by `status`).
    Alive(std::result::Result<Box<FileTicket>, String>),
    /// Its owner is dead; the file was removed (if we may: in a sticky directory only its
    /// owner or root can).
    Dead,
    /// It vanished meanwhile.
    Gone,
}

/// Reads another process's ticket `name` in `dir` and tests its liveness with a non-blocking
/// *shared* flock (the owner holds it exclusively; a shared probe works on a read-only
/// descriptor, which is all another user's ticket allows, on NFS too). Never call this on one's
/// own ticket: on NFS the close would drop one's own lock. A dead ticket is unlinked while the
/// probe lock is held, after checking the name still names the same file.
/// `id` is the ticket id the name stands for (the name itself in `queue/`).
pub fn probe(dir: BorrowedFd<'_>, name: &str, id: &str, lock: &str) -> Probe {
    probe_cached(dir, name, id, lock, None, true)
}

/// Parsed tickets of other requests by name, each valid while its file's version (identity,
/// size, modification time) stays the same: a waiter's rescan probes every ticket but reads
/// and parses only the ones that changed (a ticket is rewritten once, when its owner takes the
/// lock, and the rewrite only grows it).
#[derive(Debug, Default)]
pub struct TicketCache {
    entries: HashMap<String, Cached>,
}

#[derive(Debug)]
struct Cached {
    version: sys::FileVersion,
    content: std::result::Result<Box<FileTicket>, String>,
    /// Seen by the latest scan (entries that were not are dropped after it).
    seen: bool,
}

impl TicketCache {
    /// Forgets `name` (its next probe reads it again).
    pub fn forget(&mut self, name: &str) {
        self.entries.remove(name);
    }

    fn start_scan(&mut self) {
        for c in self.entries.values_mut() {
            c.seen = false;
        }
    }

    fn end_scan(&mut self) {
        self.entries.retain(|_, c| c.seen);
    }
}

/// [`probe`], reading the content from `cache` when the file has not changed since it was
/// cached; a dead ticket is left in place unless `remove_dead`.
pub fn probe_cached(
    dir: BorrowedFd<'_>,
    name: &str,
    id: &str,
    lock: &str,
    cache: Option<&mut TicketCache>,
    remove_dead: bool,
) -> Probe {
    let (file, info) = match sys::open_read_at(dir, name) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Probe::Gone,
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
            return Probe::Alive(Err("not a regular file".to_string()))
        }
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Probe::Alive(Err("a symbolic link".to_string()))
        }
        Err(e) => return Probe::Alive(Err(format!("cannot open it: {e}"))),
    };
    match sys::try_flock(&file, false) {
        Ok(true) => {
            if remove_dead && sys::info_at(dir, name).is_ok_and(|i| i.id() == info.id()) {
                let _ = sys::unlink_at(dir, name);
            }
            Probe::Dead
        }
        _ => {
            let version = info.version();
            let read = || {
                read_ticket(&file, id, lock).map(|mut t| {
                    t.data.uid = Some(info.uid);
                    t
                })
            };
            let Some(cache) = cache else {
                return Probe::Alive(read());
            };
            match cache.entries.get_mut(name) {
                Some(c) if c.version == version => {
                    c.seen = true;
                    Probe::Alive(c.content.clone())
                }
                _ => {
                    let content = read();
                    cache.entries.insert(
                        name.to_string(),
                        Cached {
                            version,
                            content: content.clone(),
                            seen: true,
                        },
                    );
                    Probe::Alive(content)
                }
            }
        }
    }
}

/// Reads and checks a live ticket (bounded; one immediate re-read for a torn read of an
/// in-place rewrite).
fn read_ticket(file: &File, id: &str, lock: &str) -> std::result::Result<Box<FileTicket>, String> {
    let mut last = String::new();
    for _ in 0..2 {
        let bytes = match sys::read_bounded(file, MAX_TICKET_BYTES) {
            Ok(Some(b)) => b,
            Ok(None) => {
                return Err(format!(
                    "larger than {MAX_TICKET_BYTES} bytes, the most a ticket can hold"
                ))
            }
            Err(e) => return Err(format!("cannot read it: {e}")),
        };
        match serde_json::from_slice::<FileTicket>(&bytes) {
            Ok(t) => return check(t, id, lock).map(Box::new),
            Err(e) => last = format!("not a ticket ({e})"),
        }
    }
    Err(last)
}

/// Holds a ticket read from disk to the bounds of a request ([`crate::lock::validate`]) and
/// to its own name, so that nobody downstream (ranking, policies, status) sees more.
pub fn check(t: FileTicket, name: &str, lock: &str) -> std::result::Result<FileTicket, String> {
    let d = &t.data;
    if d.id() != name {
        return Err(format!("its id {:?} is not its file name", cut(d.id())));
    }
    if d.request().lock != lock {
        return Err(format!(
            "it names another lock, {:?}",
            cut(&d.request().lock)
        ));
    }
    if d.request().labels.len() > MAX_LABELS {
        return Err(format!(
            "{} labels (at most {MAX_LABELS})",
            d.request().labels.len()
        ));
    }
    if d.request()
        .labels
        .iter()
        .any(|(k, v)| k.is_empty() || k.len() > MAX_LABEL_KEY || v.len() > MAX_LABEL_VALUE)
    {
        return Err(format!(
            "a label outside the bounds (keys 1 to {MAX_LABEL_KEY} bytes, values at most {MAX_LABEL_VALUE})"
        ));
    }
    if d.queue_key
        .as_ref()
        .is_some_and(|k| k.len() > MAX_QUEUE_KEY)
    {
        return Err(format!("a queue key longer than {MAX_QUEUE_KEY} bytes"));
    }
    if d.request().host.len() > MAX_HOST {
        return Err(format!("a host name longer than {MAX_HOST} bytes"));
    }
    let longer = |v: &Option<String>, max: usize| v.as_ref().is_some_and(|v| v.len() > max);
    if longer(&d.version, MAX_VERSION)
        || longer(&d.policy, crate::lock::PolicyRef::MAX_NAME)
        || longer(&d.policy_digest, MAX_DIGEST)
    {
        return Err(format!(
            "a version, policy or digest longer than {MAX_VERSION}, {} or {MAX_DIGEST} bytes",
            crate::lock::PolicyRef::MAX_NAME
        ));
    }
    Ok(t)
}

fn cut(s: &str) -> String {
    s.chars().take(40).collect()
}

/// What one scan of `queue/` found alive.
#[derive(Debug, Default)]
pub struct Queue {
    /// Live tickets that can be read.
    pub live: Vec<FileTicket>,
    /// Live tickets that cannot (shown by `status`, ignored by waiters).
    pub unreadable: Vec<Unreadable>,
}

/// The live tickets of `queue/`, probed, except `skip` (one's own); dead ones are removed
/// where permitted (and `files.remove_dead`). Unreadable live ones are returned apart.
pub fn scan_queue(
    files: &LockFiles,
    skip: Option<&str>,
    mut cache: Option<&mut TicketCache>,
) -> Result<Queue> {
    let dir = files.queue.as_fd();
    let listing =
        sys::list_dir_valid(dir, MAX_ENTRIES, MAX_SCANNED, is_ticket_id).map_err(|e| {
            Error::new(
                Kind::IoErr,
                format!("cannot read {}: {e}", files.path("queue").display()),
            )
        })?;
    let mut live = Vec::new();
    let mut unreadable = Vec::new();
    if listing.overflow {
        warn_flood(files, "queue");
        // Shown by `status`: the order it shows is not the whole queue's.
        unreadable.push(Unreadable {
            ticket: "queue/".to_string(),
            owner_uid: None,
            reason: format!(
                "more than {MAX_ENTRIES} tickets or {MAX_SCANNED} names ({}); those past the bound are not read, so the order is not the whole queue's",
                owners_sample(dir)
            ),
        });
    }
    let entries = listing.entries;
    if let Some(c) = cache.as_deref_mut() {
        c.start_scan();
    }
    for (name, kind) in entries {
        if Some(name.as_str()) == skip {
            continue;
        }
        if kind == EntryKind::Dir {
            continue;
        }
        match probe_cached(
            dir,
            &name,
            &name,
            &files.name,
            cache.as_deref_mut(),
            files.remove_dead,
        ) {
            Probe::Alive(Ok(t)) => live.push(*t),
            Probe::Alive(Err(reason)) => unreadable.push(Unreadable {
                owner_uid: sys::info_at(dir, &name).ok().map(|i| i.uid),
                ticket: name,
                reason,
            }),
            Probe::Dead | Probe::Gone => {}
        }
    }
    if let Some(c) = cache {
        c.end_scan();
    }
    Ok(Queue { live, unreadable })
}

/// Says once per process that a directory of a lock holds more entries than are read.
fn warn_flood(files: &LockFiles, dir_name: &str) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "{} holds more than {MAX_ENTRIES} tickets (or {MAX_SCANNED} names); only those within the bound are read, so the queue's order is not the whole queue's (a flood of planted files? remove them as their owner or root)",
            files.path(dir_name).display()
        );
    }
}

/// Removes leftovers in `tmp/` whose creator died before publishing them. Only old files are
/// probed: a fresh one may be between its creator's `open` and `flock`.
pub fn sweep_tmp(files: &LockFiles) {
    let Some(tmp) = files.tmp.as_ref() else {
        return;
    };
    let Ok((entries, _)) = sys::list_dir(tmp.as_fd(), MAX_ENTRIES) else {
        return;
    };
    let old = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64 - 60)
        .unwrap_or(0);
    let me = sys::euid();
    for (name, kind) in entries {
        if kind != EntryKind::File {
            continue;
        }
        // Only files we could remove (ours, or anyone's as root) are worth a probe.
        let stale = sys::info_at(tmp.as_fd(), &name)
            .map(|i| i.mtime < old && (i.uid == me || me == 0))
            .unwrap_or(false);
        if stale {
            if let Ok(f) = sys::open_at(tmp.as_fd(), &name, Open::Existing) {
                if matches!(sys::try_flock(&f, false), Ok(true))
                    && sys::is_same_file_at(&f, tmp.as_fd(), &name)
                {
                    let _ = sys::unlink_at(tmp.as_fd(), &name);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ticket file format (2, as format 1 wrote it) is one flat JSON object.
    #[test]
    fn a_ticket_file_is_one_flat_object() {
        let mut o = crate::lock::Options::new("l");
        o.labels = vec![("k".into(), "v".into())];
        o.queue_key = Some("job".into());
        let mut data = TicketData::new(&o, ticket_id(7), 1000, "h".into(), 42);
        data.hold(1, 9, 2000);
        let text = serde_json::to_value(FileTicketRef {
            data: &data,
            lock_file: Some([3, 4]),
        })
        .unwrap();
        let want = serde_json::json!({
            "id": "000000000007", "lock": "l", "mode": "exclusive", "priority": 0,
            "labels": [["k", "v"]], "host": "h", "pid": 42, "enqueued_at_ms": 1000,
            "wait_limit_ms": null, "queue_key": "job", "holding": true, "slot": 1,
            "acquired_at_ms": 2000, "generation": 9, "lock_file": [3, 4],
            "version": crate::VERSION
        });
        assert_eq!(text, want);
        let back: FileTicket = serde_json::from_value(want).unwrap();
        assert_eq!(back.data, data);
    }

    #[test]
    fn the_largest_valid_ticket_fits_the_read_bound() {
        let control = "\u{1}";
        let mut o = crate::lock::Options::new(&"l".repeat(crate::lock::name::MAX_LEN));
        o.priority = i32::MIN;
        o.labels = (0..MAX_LABELS)
            .map(|_| {
                (
                    control.repeat(MAX_LABEL_KEY),
                    control.repeat(MAX_LABEL_VALUE),
                )
            })
            .collect();
        o.wait_limit_ms = Some(u64::MAX);
        o.queue_key = Some(control.repeat(MAX_QUEUE_KEY));
        o.policy = Some(crate::lock::PolicyRef {
            name: control.repeat(crate::lock::PolicyRef::MAX_NAME),
            digest: Some(control.repeat(MAX_DIGEST)),
        });
        let mut data = TicketData::new(
            &o,
            ticket_id(u64::MAX),
            u64::MAX,
            control.repeat(MAX_HOST),
            u32::MAX,
        );
        data.version = Some(control.repeat(MAX_VERSION));
        data.hold(u32::MAX, u64::MAX, u64::MAX);
        let text = serde_json::to_vec(&FileTicketRef {
            data: &data,
            lock_file: Some([u64::MAX, u64::MAX]),
        })
        .unwrap();
        assert!(
            text.len() <= MAX_TICKET_BYTES,
            "{} > {MAX_TICKET_BYTES}",
            text.len()
        );
        let back: FileTicket = serde_json::from_slice(&text).unwrap();
        assert!(check(back, data.id(), &data.request().lock).is_ok());
    }
}
