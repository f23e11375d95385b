//! acquire / release: join the queue, wait per the policy (bounded by the caller), take the
//! kernel lock when at the head, and leave the queue on every way out.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fs4::{FileExt, TryLockError};

use super::dir::{open_checked, LockDir, LockPaths};
use super::queue;
use super::ticket::{self, OwnTicket, TicketData};
use super::wait::{self, Wake, Watcher};
use super::{meta, name};
use crate::config::WaitMode;
use crate::error::{Error, Kind, Result};
use crate::output::progress::Progress;
use crate::policy::{Mode, Policy, WaitDecision, WaitState};
use crate::process::Signals;

/// In notify mode, how often a waiter re-scans and consults the policy when nothing changes
/// (ranks may age; a waiter ahead may have died). Between these, timer wake-ups cost one flock
/// try at the head and nothing elsewhere.
const FULL_EVAL_PERIOD: Duration = Duration::from_millis(250);
/// Waiters further back than the one after the head set coalesce queue changes for this long
/// before re-scanning: every release and arrival wakes every waiter, and only the front of the
/// queue needs to react at once (the rest re-scan once per burst instead of once per event).
const BACK_OF_QUEUE_DEBOUNCE: Duration = Duration::from_millis(5);
/// Interval used when the policy's decision cannot be honoured (a fall-back not allowed).
const FALLBACK_INTERVAL_MS: u64 = 100;

/// What a request asks for.
#[derive(Debug, Clone)]
pub struct AcquireOptions {
    /// Lock name (validated again by `acquire` before anything is opened).
    pub name: String,
    /// Exclusive or shared.
    pub mode: Mode,
    /// `--priority`.
    pub priority: i32,
    /// `--label`s.
    pub labels: Vec<(String, String)>,
    /// `--queue-key`: a retry with the same key keeps its original arrival.
    pub queue_key: Option<String>,
    /// `-n` → `Some(0)`; `-w S` → `Some(S*1000)`; caps whatever the policy says.
    pub wait_limit_ms: Option<u64>,
    /// notify, poll or auto.
    pub wait_mode: WaitMode,
    /// Number of kernel lock files (≥ 1).
    pub slots: u32,
    /// Whether a policy's fall-back is honoured.
    pub fallback_allowed: bool,
    /// How long a give-up's arrival is remembered for its queue key.
    pub key_grace_ms: u64,
    /// Exit code of conflict, timeout and give-up errors.
    pub conflict_exit_code: i32,
    /// Progress line interval; `None` is quiet.
    pub progress_interval: Option<Duration>,
}

impl AcquireOptions {
    /// Defaults for lock `name`: exclusive, priority 0, wait forever, auto wait mode, one slot,
    /// 10-minute key grace, conflict code 1, quiet.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            mode: Mode::Exclusive,
            priority: 0,
            labels: Vec::new(),
            queue_key: None,
            wait_limit_ms: None,
            wait_mode: WaitMode::Auto,
            slots: 1,
            fallback_allowed: false,
            key_grace_ms: 600_000,
            conflict_exit_code: crate::error::code::CONFLICT_DEFAULT,
            progress_interval: None,
        }
    }

    /// Options from the command line and configuration (shared by `run` and `dockerd`).
    pub fn from_args(
        name: &str,
        args: &crate::cli::LockArgs,
        settings: &crate::config::LockSettings,
        config: &crate::config::Config,
    ) -> Self {
        Self {
            name: name.to_string(),
            mode: if args.shared {
                Mode::Shared
            } else {
                Mode::Exclusive
            },
            priority: args.priority,
            labels: args.labels.clone(),
            queue_key: args.queue_key.clone(),
            wait_limit_ms: args.wait_limit_ms(),
            wait_mode: args.wait_mode.unwrap_or(settings.wait_mode),
            slots: settings.slots.max(1),
            fallback_allowed: settings.fallback,
            key_grace_ms: config.queue_key_grace_ms(),
            conflict_exit_code: args.conflict_exit_code,
            progress_interval: (!args.quiet)
                .then(|| Duration::from_secs_f64(config.progress_interval()))
                .filter(|d| !d.is_zero()),
        }
    }
}

/// The outcome of [`acquire`].
#[derive(Debug)]
pub enum Acquired {
    /// The lock is held until the guard is released or dropped.
    Held(Guard),
    /// The policy chose to fall back (only when allowed); nothing is left queued.
    FellBack {
        /// The policy's reason.
        reason: String,
    },
}

/// A held lock. Releasing closes the kernel-locked descriptor (a command that inherited it and
/// still runs keeps the lock), then removes the ticket, which wakes the next waiter.
#[derive(Debug)]
pub struct Guard {
    lock: Option<File>,
    ticket: Option<Box<OwnTicket>>,
    generation: u64,
    slot: u32,
    waited: Duration,
}

impl Guard {
    /// The kernel-locked descriptor: pass it to `process::spawn`.
    pub fn lock_fd(&self) -> RawFd {
        self.lock.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1)
    }
    /// This request's ticket id.
    pub fn ticket(&self) -> &str {
        self.ticket
            .as_ref()
            .map(|t| t.data.id.as_str())
            .unwrap_or("")
    }
    /// Fencing token: grows by one at every acquisition of this lock.
    pub fn generation(&self) -> u64 {
        self.generation
    }
    /// The slot held (0-based).
    pub fn slot(&self) -> u32 {
        self.slot
    }
    /// How long the request waited.
    pub fn waited(&self) -> Duration {
        self.waited
    }
    /// Releases the lock and leaves the queue.
    pub fn release(mut self) -> Result<()> {
        self.release_inner();
        Ok(())
    }
    fn release_inner(&mut self) {
        drop(self.lock.take());
        if let Some(t) = self.ticket.take() {
            t.remove();
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.release_inner();
    }
}

/// Wall clock in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The host name (for people only).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer and its length are valid.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return "unknown".to_string();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Joins the queue and waits per the policy, bounded by the caller; a SIGINT/SIGTERM/SIGHUP seen
/// on `signals` while waiting removes the ticket and returns `Kind::Signal(sig)`.
pub fn acquire(
    dir: &LockDir,
    opts: &AcquireOptions,
    policy: &mut dyn Policy,
    signals: &Signals,
) -> Result<Acquired> {
    name::validate(&opts.name)?;
    let paths = dir.prepare(&opts.name)?;
    let mode = wait::effective_mode(opts.wait_mode, &paths.base);
    ticket::sweep_tmp(&paths);
    let start = Instant::now();
    let (n, at) = meta::enqueue(&paths, now_ms(), opts.queue_key.as_deref())?;
    let data = TicketData {
        id: ticket::ticket_id(n),
        lock: opts.name.clone(),
        mode: opts.mode,
        priority: opts.priority,
        labels: opts.labels.clone(),
        host: hostname(),
        pid: std::process::id(),
        enqueued_at_ms: at,
        wait_limit_ms: opts.wait_limit_ms,
        queue_key: opts.queue_key.clone(),
        holding: false,
        slot: None,
        acquired_at_ms: None,
        generation: None,
    };
    let own = OwnTicket::create(&paths, data)?;
    let mut w = Waiter {
        opts,
        paths,
        own: Some(own),
        slot_files: (0..opts.slots.max(1)).map(|_| None).collect(),
        start,
        deadline: opts
            .wait_limit_ms
            .map(|ms| start + Duration::from_millis(ms)),
        progress: Progress::new(&opts.name, opts.progress_interval),
        evaluations: 0,
        seen: Vec::new(),
    };
    w.run(policy, signals, mode)
}

struct Waiter<'a> {
    opts: &'a AcquireOptions,
    paths: LockPaths,
    own: Option<OwnTicket>,
    slot_files: Vec<Option<File>>,
    start: Instant,
    deadline: Option<Instant>,
    progress: Progress,
    evaluations: u32,
    /// Ticket names the last scan found alive (sorted), for cheap change checks when polling.
    seen: Vec<String>,
}

/// What one full evaluation decided.
enum Next {
    Done(Acquired),
    Wait {
        in_head: bool,
        /// Whether this waiter is in, or right behind, the head set.
        near_head: bool,
        interval: Duration,
    },
}

impl Waiter<'_> {
    fn run(
        &mut self,
        policy: &mut dyn Policy,
        signals: &Signals,
        mode: WaitMode,
    ) -> Result<Acquired> {
        // Created only once the lock is contended (an uncontended request never pays for
        // inotify), followed by a fresh evaluation so that no change is missed in between.
        let mut watcher: Option<Watcher> = None;
        loop {
            if let Some(&sig) = signals.take().first() {
                return Err(self.interrupted(sig));
            }
            let (in_head, near_head, interval) = match self.evaluate(policy)? {
                Next::Done(a) => return Ok(a),
                Next::Wait {
                    in_head,
                    near_head,
                    interval,
                } => (in_head, near_head, interval),
            };
            let Some(watcher) = watcher.as_ref() else {
                watcher = Some(Watcher::new(&self.paths.queue, mode));
                continue;
            };
            let now = Instant::now();
            let mut eval_at = now + interval.max(FULL_EVAL_PERIOD);
            let mut tick_at = now + interval;
            loop {
                let now = Instant::now();
                let mut wake_at = tick_at.min(eval_at);
                if let Some(d) = self.deadline {
                    wake_at = wake_at.min(d);
                }
                match watcher.wait(signals.fd(), wake_at.saturating_duration_since(now)) {
                    Wake::Signal => {
                        if let Some(&sig) = signals.take().first() {
                            return Err(self.interrupted(sig));
                        }
                    }
                    Wake::Removed if in_head => {
                        // Someone left (typically the holder releasing): try before scanning,
                        // which keeps the scan off the handoff's critical path.
                        if let Some((slot, file)) = self.try_slots()? {
                            return self.acquired(slot, file).map(Acquired::Held);
                        }
                        break;
                    }
                    Wake::Changed | Wake::Removed if near_head => break,
                    Wake::Changed | Wake::Removed => {
                        eval_at = eval_at.min(Instant::now() + BACK_OF_QUEUE_DEBOUNCE);
                    }
                    Wake::Timeout => {
                        let now = Instant::now();
                        if now >= eval_at || self.deadline.is_some_and(|d| now >= d) {
                            break;
                        }
                        if now >= tick_at {
                            // Polling: a listing of `queue/` (no probes, no policy) tells
                            // whether anything arrived or left since the last scan.
                            if !watcher.notifies()
                                && queue::list_names(&self.paths).ok().as_ref() != Some(&self.seen)
                            {
                                break;
                            }
                            // The cheap path: the holder may have died or an orphan exited
                            // without any file changing; one flock try, no scan, no policy.
                            if in_head {
                                if let Some((slot, file)) = self.try_slots()? {
                                    return self.acquired(slot, file).map(Acquired::Held);
                                }
                            }
                            tick_at = now + interval;
                        }
                    }
                }
            }
        }
    }

    fn own(&self) -> &OwnTicket {
        self.own.as_ref().expect("own ticket")
    }

    /// Scan, rank, try if at the head, else ask the policy how long to wait.
    fn evaluate(&mut self, policy: &mut dyn Policy) -> Result<Next> {
        let me = self.own().data.clone();
        let scan = || {
            queue::scan(&self.paths, Some(&me.id))
                .map_err(|e| Error::io(format!("cannot read {}", self.paths.queue.display()), e))
        };
        let mut snap = scan()?;
        // When the policy will be consulted (others to rank, or a holder to wait for), load it
        // first (a bounded wait for a compile); a snapshot taken before that wait is stale and
        // is taken again. An uncontended request, or `-n` behind a holder alone, never loads it.
        let consulted = !snap.waiters.is_empty()
            || (!snap.holders.is_empty() && self.opts.wait_limit_ms != Some(0));
        if consulted && policy.ready()? {
            snap = scan()?;
        }
        let now = now_ms();
        let mut all = snap.waiters.clone();
        all.push(me.clone());
        self.seen = all
            .iter()
            .chain(&snap.holders)
            .map(|t| t.id.clone())
            .collect();
        self.seen.sort();
        let ordered = queue::order(all, policy, now)?;
        let pos = ordered
            .iter()
            .position(|(t, _)| t.id == me.id)
            .expect("own ticket is ranked");
        let head_len = queue::head_len(&ordered, self.opts.slots.max(1));
        let in_head = pos < head_len;
        if in_head {
            if let Some((slot, file)) = self.try_slots()? {
                return self
                    .acquired(slot, file)
                    .map(|g| Next::Done(Acquired::Held(g)));
            }
        }
        let waited = self.start.elapsed();
        if self.opts.wait_limit_ms == Some(0) {
            let why = if in_head {
                format!(
                    "lock {} is {}",
                    self.opts.name,
                    crate::output::progress::describe_holders(&snap.holders, now)
                )
            } else {
                format!(
                    "lock {}: {pos} waiter(s) are ahead in the queue",
                    self.opts.name
                )
            };
            return Err(self.give_up(why));
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(self.give_up(format!(
                "timed out after {:.2}s waiting for lock {} ({})",
                waited.as_secs_f64(),
                self.opts.name,
                crate::output::progress::describe_holders(&snap.holders, now)
            )));
        }
        let state = WaitState {
            me: me.to_ticket(),
            holders: snap.holders.iter().map(|t| t.to_ticket()).collect(),
            waiters: snap.waiters.iter().map(|t| t.to_ticket()).collect(),
            waited_ms: waited.as_millis() as u64,
            evaluations: self.evaluations,
            now_ms: now,
        };
        self.evaluations += 1;
        let ms = match policy.on_wait(&state)? {
            WaitDecision::KeepWaiting(ms) => ms,
            WaitDecision::GiveUp(reason) => {
                return Err(self.give_up(format!(
                    "policy '{}' gave up waiting for lock {}: {reason}",
                    policy.name(),
                    self.opts.name
                )))
            }
            WaitDecision::FallBack(reason) if self.opts.fallback_allowed => {
                self.leave();
                return Ok(Next::Done(Acquired::FellBack { reason }));
            }
            WaitDecision::FallBack(reason) => {
                tracing::warn!(
                    "policy '{}' asked to fall back ({reason}) but lock {} does not allow it (set `fallback: true` in its rule); waiting on",
                    policy.name(),
                    self.opts.name
                );
                FALLBACK_INTERVAL_MS
            }
        };
        let mut interval = Duration::from_millis(ms.max(1));
        if let Some(d) = self.deadline {
            interval = interval.min(d.saturating_duration_since(Instant::now()));
        }
        self.progress
            .waiting(&snap.holders, pos + 1, ordered.len(), now);
        Ok(Next::Wait {
            in_head,
            near_head: pos <= head_len,
            interval: interval.max(Duration::from_millis(1)),
        })
    }

    /// One non-blocking try on every slot (each file opened once per request: on NFS a second
    /// descriptor's close would drop our lock).
    fn try_slots(&mut self) -> Result<Option<(u32, File)>> {
        for slot in 0..self.slot_files.len() {
            if self.slot_files[slot].is_none() {
                let path = self.paths.slot_file(slot as u32);
                self.slot_files[slot] = Some(open_checked(&path, true, self.paths.file_mode)?);
            }
            let f = self.slot_files[slot].as_ref().expect("opened");
            let r = match self.opts.mode {
                Mode::Exclusive => FileExt::try_lock(f),
                Mode::Shared => FileExt::try_lock_shared(f),
            };
            match r {
                Ok(()) => {
                    let f = self.slot_files[slot].take().expect("opened");
                    return Ok(Some((slot as u32, f)));
                }
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Error(e)) => {
                    return Err(Error::io(
                        format!(
                            "cannot lock {}",
                            self.paths.slot_file(slot as u32).display()
                        ),
                        e,
                    ))
                }
            }
        }
        Ok(None)
    }

    fn acquired(&mut self, slot: u32, file: File) -> Result<Guard> {
        let generation = meta::acquired(&self.paths, self.opts.queue_key.as_deref())?;
        let mut own = self.own.take().expect("own ticket");
        own.mark_holding(slot, generation, now_ms())?;
        self.slot_files.clear();
        let waited = self.start.elapsed();
        self.progress.acquired(waited);
        Ok(Guard {
            lock: Some(file),
            ticket: Some(Box::new(own)),
            generation,
            slot,
            waited,
        })
    }

    /// Leaves the queue at once.
    fn leave(&mut self) {
        if let Some(t) = self.own.take() {
            t.remove();
        }
    }

    /// Leaves the queue, remembering the arrival for a queue key, and builds the conflict error.
    fn give_up(&mut self, message: String) -> Error {
        if let (Some(key), Some(own)) = (&self.opts.queue_key, &self.own) {
            if let Err(e) = meta::remember_key(
                &self.paths,
                key,
                own.data.enqueued_at_ms,
                now_ms(),
                self.opts.key_grace_ms,
            ) {
                tracing::warn!("could not remember queue key {key:?}: {e}");
            }
        }
        self.leave();
        Error::conflict(self.opts.conflict_exit_code, message)
    }

    fn interrupted(&mut self, sig: i32) -> Error {
        self.leave();
        Error::new(
            Kind::Signal(sig),
            format!(
                "interrupted by signal {sig} while waiting for lock {}; left the queue",
                self.opts.name
            ),
        )
    }
}
