//! Shared machinery of the torture tests: a chaos driver that keeps many `cachelock run`
//! processes contending on one lock while SIGKILLing holders and waiters, and an overlap detector
//! that does not trust cachelock.
//!
//! The critical section is the test binary itself, re-executed through its ignored
//! `torture_holder_entry` test with `TORTURE_*` variables (see [`holder_main`]). Each holder
//! claims a sentinel file with `O_CREAT|O_EXCL` (exclusive) or its own `shared.<pid>` file
//! (shared), checks the other kind, and appends one record with its enter/exit times to a log
//! with `O_APPEND`; any conflict is appended to `overlaps.log` at once.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The lock every chaos test contends on.
pub const LOCK: &str = "torture";

/// Seconds a torture test runs: `CACHELOCK_TORTURE_SECS`, else `default`.
pub fn torture_secs(default: u64) -> Duration {
    let s = std::env::var("CACHELOCK_TORTURE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    Duration::from_secs(s)
}

/// Monotonic nanoseconds, comparable across processes on this machine.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A small xorshift generator: the tests need reproducible randomness, not a crate.
pub struct Rng(u64);

impl Rng {
    /// Seeded from `CACHELOCK_TORTURE_SEED`, else the clock; prints the seed for re-runs.
    pub fn from_env(what: &str) -> Self {
        let seed = std::env::var("CACHELOCK_TORTURE_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| mono_ns() | 1);
        eprintln!("{what}: CACHELOCK_TORTURE_SEED={seed}");
        Rng(seed)
    }
    /// Next raw value.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() % 1_000_000) as f64 / 1_000_000.0 < p
    }
}

/// Whether `pid` names a live (not zombie) process.
pub fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            // The state follows the parenthesised command name.
            let state = s
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// Start time of process `pid` (clock ticks since boot), which with the pid names one process:
/// pids are reused (32 768 of them wrap within a chaos run), start times are not.
pub fn start_time(pid: i32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22; the fields after the command name start at field 3.
    s.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// A sentinel's content: who wrote it, as `pid start-time`.
fn identity(pid: i32) -> String {
    format!("{pid} {}", start_time(pid).unwrap_or(0))
}

/// The live process a sentinel names, if it still runs: `Some((pid, what))` with what it runs,
/// for the report. A sentinel left by a SIGKILLed holder names a pid that another process (or
/// thread) may have taken since; that is not an overlap.
fn live_writer(sentinel: &str) -> Option<(i32, String)> {
    let mut f = sentinel.split_whitespace();
    let pid: i32 = f.next()?.parse().ok()?;
    let start: u64 = f.next()?.parse().ok()?;
    if !alive(pid) {
        return None;
    }
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if start_time(pid) != Some(start) {
        // Counted (reused.log beside the sentinels) so that a run shows how often it happens.
        if let Ok(dir) = std::env::var("TORTURE_DIR") {
            append(
                &Path::new(&dir).join("reused.log"),
                &format!("pid {pid} now {}\n", comm.trim()),
            );
        }
        return None;
    }
    Some((pid, comm.trim().to_string()))
}

/// Parent pid of `pid`, if it exists.
pub fn ppid(pid: i32) -> Option<i32> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Live processes whose environment contains `needle` (a `KEY=VALUE` unique to one test).
pub fn processes_with_env(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let me = std::process::id() as i32;
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if pid == me {
                continue;
            }
            if let Ok(env) = fs::read(format!("/proc/{pid}/environ")) {
                if env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()) && alive(pid) {
                    out.push(pid);
                }
            }
        }
    }
    out
}

fn append(path: &Path, line: &str) {
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .expect("open log");
    f.write_all(line.as_bytes()).expect("append");
}

// ---------------------------------------------------------------------------------------------
// The holder (runs inside `cachelock run`).

/// Body of a critical section, when this process was started as a holder (`TORTURE_DIR` set):
/// claim, check, hold, release, record. Returns false when not started as a holder.
pub fn holder_main() -> bool {
    let Ok(dir) = std::env::var("TORTURE_DIR") else {
        return false;
    };
    let dir = PathBuf::from(dir);
    let shared = std::env::var("TORTURE_MODE").as_deref() == Ok("s");
    let hold_us: u64 = std::env::var("TORTURE_HOLD_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let tag = std::env::var("TORTURE_TAG").unwrap_or_default();
    let generation = std::env::var("CACHELOCK_GENERATION").unwrap_or_else(|_| "?".into());
    let pid = std::process::id() as i32;
    let overlaps = dir.join("overlaps.log");
    let excl = dir.join("excl");
    let enter = mono_ns();
    let mine = if shared {
        let p = dir.join(format!("shared.{pid}"));
        fs::write(&p, identity(pid)).expect("write shared sentinel");
        // Claim first, then look: of two overlapping holders at least one sees the other.
        if let Some((o, comm)) = fs::read_to_string(&excl).ok().and_then(|s| live_writer(&s)) {
            append(
                &overlaps,
                &format!("shared {tag} pid {pid} beside exclusive pid {o} ({comm})\n"),
            );
        }
        p
    } else {
        claim_exclusive(&excl, pid, &tag, &overlaps);
        for e in fs::read_dir(&dir).expect("read detector dir").flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("shared.") && name != format!("shared.{pid}") {
                let writer = fs::read_to_string(e.path()).ok();
                if let Some((o, comm)) = writer.as_deref().and_then(live_writer) {
                    append(
                        &overlaps,
                        &format!("exclusive {tag} pid {pid} beside shared pid {o} ({comm})\n"),
                    );
                }
            }
        }
        excl.clone()
    };
    if hold_us > 0 {
        thread::sleep(Duration::from_micros(hold_us));
    }
    if fs::read_to_string(&mine).ok() != Some(identity(pid)) {
        append(
            &overlaps,
            &format!("{tag} pid {pid}: its sentinel was taken while holding\n"),
        );
    } else {
        let _ = fs::remove_file(&mine);
    }
    let exit = mono_ns();
    let mode = if shared { "s" } else { "x" };
    append(
        &dir.join("holds.log"),
        &format!("{tag} {mode} {pid} {generation} {enter} {exit}\n"),
    );
    true
}

/// `O_CREAT|O_EXCL` on the exclusive sentinel; a sentinel left by a dead holder (SIGKILLed
/// mid-section) is taken over, one left by a live holder is an overlap.
fn claim_exclusive(excl: &Path, pid: i32, tag: &str, overlaps: &Path) {
    for _ in 0..3 {
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(excl)
        {
            Ok(mut f) => {
                f.write_all(identity(pid).as_bytes())
                    .expect("write sentinel");
                return;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                match fs::read_to_string(excl) {
                    Ok(owner) => match live_writer(&owner) {
                        Some((o, comm)) => {
                            append(
                                overlaps,
                                &format!(
                                    "exclusive {tag} pid {pid} beside exclusive pid {o} ({comm})\n"
                                ),
                            );
                            return;
                        }
                        // Dead owner (or one killed before writing its pid): stale, take over.
                        None => {
                            let _ = fs::remove_file(excl);
                        }
                    },
                    // It vanished between our create and our read: its owner was inside.
                    Err(_) => {
                        append(
                            overlaps,
                            &format!("exclusive {tag} pid {pid}: sentinel vanished under it\n"),
                        );
                        return;
                    }
                }
            }
            Err(e) => panic!("sentinel: {e}"),
        }
    }
    append(
        overlaps,
        &format!("exclusive {tag} pid {pid}: could not claim the sentinel\n"),
    );
}

// ---------------------------------------------------------------------------------------------
// The chaos driver.

/// What a chaos run does.
#[derive(Clone)]
pub struct Chaos {
    /// Concurrent request loops (processes contending at any time).
    pub workers: usize,
    /// How long new requests are issued.
    pub duration: Duration,
    /// Mean interval between SIGKILLs.
    pub kill_every: Duration,
    /// Fraction of requests that are shared.
    pub shared_ratio: f64,
    /// Random `-p` in `0..priorities` (1: all 0).
    pub priorities: i32,
    /// Extra `cachelock run` options (policy, config...).
    pub extra: Vec<String>,
    /// Upper bound of a random hold, µs.
    pub hold_us_max: u64,
    /// Bound on serving every surviving request after `duration`.
    pub drain: Duration,
}

/// What a chaos run observed.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Completed critical sections (records in the log).
    pub acquisitions: usize,
    /// SIGKILLs sent to a holding cachelock (one whose command was running).
    pub killed_holders: usize,
    /// SIGKILLs sent to other (waiting or starting) cachelock processes.
    pub killed_waiters: usize,
    /// Requests not killed that exited 0.
    pub served: usize,
    /// Lines of the detector's overlap log, and overlaps found in the interval log.
    pub overlaps: Vec<String>,
    /// Requests not killed that did not exit 0, or were not served within the drain bound.
    pub failures: Vec<String>,
    /// Holder processes still alive at the end.
    pub leftovers: Vec<i32>,
    /// Sentinels of killed holders whose pid another process had taken when a holder looked.
    pub reused_pids: usize,
}

struct Registry {
    /// cachelock pid → killed by us.
    running: HashMap<u32, bool>,
}

/// Those of `parents` that have a child process right now.
fn children_of(parents: &HashMap<u32, bool>) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() {
                if let Some(pp) = ppid(pid) {
                    if parents.contains_key(&(pp as u32)) && !out.contains(&(pp as u32)) {
                        out.push(pp as u32);
                    }
                }
            }
        }
    }
    out
}

/// Kills whatever a failed test would leave behind (by the unique environment tag).
pub struct Cleanup(pub String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for pid in processes_with_env(&self.0) {
            // SAFETY: plain kill(2) of processes this test started (they carry its tag).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The test binary, re-executed as a holder through its ignored entry test.
pub fn holder_command(test_exe: &Path) -> Vec<String> {
    vec![
        test_exe.display().to_string(),
        "--ignored".into(),
        "--exact".into(),
        "torture::torture_holder_entry".into(),
        "--quiet".into(),
        "--test-threads=1".into(),
    ]
}

impl Chaos {
    /// Runs the chaos against `bin` with lock dir `lock_dir`; detector state lives in `det`.
    pub fn run(&self, bin: &Path, lock_dir: &Path, det: &Path, rng: &mut Rng) -> Outcome {
        let tag_env = format!("TORTURE_DIR={}", det.display());
        let _cleanup = Cleanup(tag_env.clone());
        let test_exe = std::env::current_exe().unwrap();
        let reg = Arc::new(Mutex::new(Registry {
            running: HashMap::new(),
        }));
        let stop_killing = Arc::new(AtomicBool::new(false));
        let killed_holders = Arc::new(AtomicUsize::new(0));
        let killed_waiters = Arc::new(AtomicUsize::new(0));
        let deadline = Instant::now() + self.duration;
        let hard_deadline = deadline + self.drain;
        let seeds: Vec<u64> = (0..self.workers + 1).map(|_| rng.next() | 1).collect();

        let results: Vec<(usize, Vec<String>)> = thread::scope(|s| {
            // The killer: alternately the current exclusive holder's cachelock and a random one.
            let killer = {
                let reg = reg.clone();
                let stop = stop_killing.clone();
                let (kh, kw) = (killed_holders.clone(), killed_waiters.clone());
                let mut rng = Rng(seeds[self.workers]);
                let every = self.kill_every;
                s.spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let ms = every.as_millis() as u64;
                        thread::sleep(Duration::from_millis(ms / 2 + rng.below(ms + 1)));
                        let mut g = reg.lock().unwrap();
                        let mut target = None;
                        if rng.chance(0.5) {
                            // A holding cachelock is one whose command (a child) is running.
                            let holders: Vec<u32> = children_of(&g.running)
                                .into_iter()
                                .filter(|p| g.running.get(p) == Some(&false))
                                .collect();
                            if !holders.is_empty() {
                                let p = holders[rng.below(holders.len() as u64) as usize];
                                target = Some((p, true));
                            }
                        }
                        if target.is_none() {
                            let live: Vec<u32> = g
                                .running
                                .iter()
                                .filter(|(_, &k)| !k)
                                .map(|(&p, _)| p)
                                .collect();
                            if !live.is_empty() {
                                target = Some((live[rng.below(live.len() as u64) as usize], false));
                            }
                        }
                        if let Some((pid, holder)) = target {
                            // SAFETY: pid is an unreaped child (its worker reaps it only under
                            // this same registry lock), so it cannot have been reused.
                            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                            g.running.insert(pid, true);
                            if holder { &kh } else { &kw }.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
            };
            let workers: Vec<_> = (0..self.workers)
                .map(|w| {
                    let reg = reg.clone();
                    let mut rng = Rng(seeds[w]);
                    let test_exe = test_exe.clone();
                    s.spawn(move || {
                        let mut served = 0;
                        let mut failures = Vec::new();
                        let mut job = 0;
                        while Instant::now() < deadline {
                            job += 1;
                            let shared = rng.chance(self.shared_ratio);
                            let prio = rng.below(self.priorities.max(1) as u64) as i32;
                            let hold = rng.below(self.hold_us_max + 1);
                            let mut cmd = Command::new(bin);
                            cmd.arg("run")
                                .arg("--lock-dir")
                                .arg(lock_dir)
                                .arg("-q")
                                .arg(if shared { "-s" } else { "-x" })
                                .arg("-p")
                                .arg(prio.to_string())
                                .args(&self.extra)
                                .arg(LOCK)
                                .arg("--")
                                .args(holder_command(&test_exe))
                                .env("TORTURE_DIR", det)
                                .env("TORTURE_MODE", if shared { "s" } else { "x" })
                                .env("TORTURE_HOLD_US", hold.to_string())
                                .env("TORTURE_TAG", format!("w{w}j{job}"))
                                .stdin(Stdio::null())
                                .stdout(Stdio::null())
                                .stderr(Stdio::piped());
                            let mut child: Child = {
                                let mut g = reg.lock().unwrap();
                                let c = cmd.spawn().expect("spawn cachelock");
                                g.running.insert(c.id(), false);
                                c
                            };
                            let stderr = child.stderr.take();
                            let err_reader = thread::spawn(move || {
                                let mut s = String::new();
                                if let Some(mut e) = stderr {
                                    use std::io::Read;
                                    let _ = e.read_to_string(&mut s);
                                }
                                s
                            });
                            let (status, killed): (Option<ExitStatus>, bool) = loop {
                                {
                                    let mut g = reg.lock().unwrap();
                                    if let Ok(Some(st)) = child.try_wait() {
                                        let k = g.running.remove(&child.id()).unwrap_or(false);
                                        break (Some(st), k);
                                    }
                                    if Instant::now() > hard_deadline {
                                        let _ = child.kill();
                                        let _ = child.wait();
                                        g.running.remove(&child.id());
                                        break (None, false);
                                    }
                                }
                                thread::sleep(Duration::from_millis(3));
                            };
                            let err = err_reader.join().unwrap_or_default();
                            match (status, killed) {
                                (_, true) => {}
                                (Some(st), false) if st.success() => served += 1,
                                (Some(st), false) => failures.push(format!(
                                    "w{w}j{job} ({}) exited {st}: {}",
                                    if shared { "shared" } else { "exclusive" },
                                    err.trim()
                                )),
                                (None, _) => failures.push(format!(
                                    "w{w}j{job} not served within the drain bound of {:?}",
                                    self.drain
                                )),
                            }
                        }
                        (served, failures)
                    })
                })
                .collect();
            let r = workers.into_iter().map(|h| h.join().unwrap()).collect();
            stop_killing.store(true, Ordering::SeqCst);
            killer.join().unwrap();
            r
        });

        // Orphaned holders (their cachelock was killed) end on their parent-death signal.
        let t = Instant::now();
        let mut leftovers = processes_with_env(&tag_env);
        while !leftovers.is_empty() && t.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(50));
            leftovers = processes_with_env(&tag_env);
        }

        let mut out = Outcome {
            killed_holders: killed_holders.load(Ordering::SeqCst),
            killed_waiters: killed_waiters.load(Ordering::SeqCst),
            leftovers,
            ..Outcome::default()
        };
        for (served, failures) in results {
            out.served += served;
            out.failures.extend(failures);
        }
        if let Ok(t) = fs::read_to_string(det.join("overlaps.log")) {
            out.overlaps.extend(t.lines().map(String::from));
        }
        out.reused_pids = fs::read_to_string(det.join("reused.log"))
            .map(|t| t.lines().count())
            .unwrap_or(0);
        let (n, interval_overlaps) = check_intervals(&det.join("holds.log"));
        out.acquisitions = n;
        out.overlaps.extend(interval_overlaps);
        out
    }
}

/// Completed sections from the log: exclusive ones must overlap nothing, and fencing tokens
/// (`CACHELOCK_GENERATION`) must be unique and grow with exclusive entries.
fn check_intervals(log: &Path) -> (usize, Vec<String>) {
    let text = fs::read_to_string(log).unwrap_or_default();
    // (enter, exit, exclusive, generation, tag)
    let mut v: Vec<(u64, u64, bool, Option<u64>, String)> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.get(4)?.parse().ok()?,
                f.get(5)?.parse().ok()?,
                f.get(1)? == &"x",
                f.get(3)?.parse().ok(),
                f.first()?.to_string(),
            ))
        })
        .collect();
    v.sort();
    let mut problems = Vec::new();
    // Latest exit among all sections and among exclusive ones seen so far (by entry).
    let mut any: Option<(u64, &str)> = None;
    let mut exclusive: Option<(u64, &str)> = None;
    for (enter, exit, excl, _, tag) in &v {
        if let Some((le, ltag)) = exclusive {
            if le > *enter {
                problems.push(format!(
                    "interval overlap: exclusive {ltag} until {le}, {tag} from {enter}"
                ));
            }
        }
        if let Some((le, ltag)) = any {
            if *excl && le > *enter {
                problems.push(format!(
                    "interval overlap: {ltag} until {le}, exclusive {tag} from {enter}"
                ));
            }
        }
        if any.is_none_or(|(le, _)| *exit > le) {
            any = Some((*exit, tag));
        }
        if *excl && exclusive.is_none_or(|(le, _)| *exit > le) {
            exclusive = Some((*exit, tag));
        }
    }
    let mut gens: BTreeMap<u64, String> = BTreeMap::new();
    let mut max_gen = 0;
    for (_, _, excl, g, tag) in &v {
        match g {
            None => problems.push(format!(
                "{tag}: CACHELOCK_GENERATION missing or not a number"
            )),
            Some(g) => {
                if let Some(other) = gens.insert(*g, tag.clone()) {
                    problems.push(format!("generation {g} given to both {other} and {tag}"));
                }
                if *excl && *g <= max_gen {
                    problems.push(format!("{tag}: generation {g} not above earlier {max_gen}"));
                }
                max_gen = max_gen.max(*g);
            }
        }
    }
    (v.len(), problems)
}

// ---------------------------------------------------------------------------------------------
// After the storm: nothing queued, nothing held.

/// Checks that `status --json` lists no holder or waiter, that every ticket left in the queue
/// directory is dead, and that one more request cleans them all up. Returns the problems.
pub fn check_no_tickets(bin: &Path, lock_dir: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let out = Command::new(bin)
        .args(["status", "--json", "--lock-dir"])
        .arg(lock_dir)
        .arg(LOCK)
        .output()
        .expect("run status");
    if !out.status.success() {
        problems.push(format!(
            "status --json exited {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    } else {
        match serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            Ok(v) => {
                let mut nonempty = Vec::new();
                find_nonempty(&v, &["holders", "waiters"], &mut nonempty);
                for (k, n) in nonempty {
                    problems.push(format!("status --json still lists {n} {k}"));
                }
            }
            Err(e) => problems.push(format!("status --json is not JSON: {e}")),
        }
    }
    let queue = lock_dir.join(format!("{LOCK}.lock")).join("queue");
    if !queue.is_dir() {
        problems.push(format!("no queue directory at {}", queue.display()));
        return problems;
    }
    for e in fs::read_dir(&queue).unwrap().flatten() {
        if let Ok(f) = fs::File::open(e.path()) {
            // SAFETY: flock on a descriptor we own; a ticket we can lock has no live owner.
            let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r != 0 {
                problems.push(format!("live ticket left: {}", e.path().display()));
            }
        }
    }
    let st = Command::new(bin)
        .args(["run", "-q", "--lock-dir"])
        .arg(lock_dir)
        .args([LOCK, "--", "true"])
        .status()
        .expect("run");
    if !st.success() {
        problems.push(format!("a final `run {LOCK} -- true` exited {st}"));
    }
    let left: Vec<_> = fs::read_dir(&queue)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    if !left.is_empty() {
        problems.push(format!("tickets left after a final request: {left:?}"));
    }
    problems
}

fn find_nonempty(v: &serde_json::Value, keys: &[&str], out: &mut Vec<(String, usize)>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                if keys.contains(&k.as_str()) {
                    if let Some(a) = x.as_array() {
                        if !a.is_empty() {
                            out.push((k.clone(), a.len()));
                        }
                    }
                }
                find_nonempty(x, keys, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| find_nonempty(x, keys, out)),
        _ => {}
    }
}

/// Asserts a chaos outcome: no overlap, every surviving request served, no holder left, and
/// at least `min_acquisitions` sections and some kills of each kind.
pub fn assert_outcome(o: &Outcome, min_acquisitions: usize) {
    eprintln!(
        "acquisitions {}, served {}, SIGKILLed holders {}, SIGKILLed waiters {}, stale sentinels with a reused pid {}",
        o.acquisitions, o.served, o.killed_holders, o.killed_waiters, o.reused_pids
    );
    assert!(o.overlaps.is_empty(), "overlaps: {:#?}", o.overlaps);
    assert!(
        o.failures.is_empty(),
        "requests not served: {:#?}",
        o.failures
    );
    assert!(
        o.leftovers.is_empty(),
        "holder processes left: {:?}",
        o.leftovers
    );
    assert!(
        o.acquisitions >= min_acquisitions,
        "only {} acquisitions (expected ≥ {min_acquisitions})",
        o.acquisitions
    );
    assert!(o.killed_holders > 0, "no holder was killed");
    assert!(o.killed_waiters > 0, "no waiter was killed");
}

/// Runs `chaos` against the real binary on a fresh lock directory and detector, then checks
/// the outcome (no overlap, survivors served, at least `min_acquisitions`) and that no ticket
/// is left. `test` names the seed stream (`CACHELOCK_TORTURE_SEED` replays it).
pub fn run_chaos_and_check(test: &str, chaos: Chaos, min_acquisitions: usize) {
    // One chaos at a time: each keeps 16 processes busy, and two at once on two cores would
    // measure each other rather than the lock.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let bin = Path::new(env!("CARGO_BIN_EXE_cachelock"));
    let tmp = tempfile::tempdir().unwrap();
    let (locks, det) = (tmp.path().join("locks"), tmp.path().join("detector"));
    std::fs::create_dir_all(&det).unwrap();
    let mut rng = Rng::from_env(test);
    let o = chaos.run(bin, &locks, &det, &mut rng);
    let problems = check_no_tickets(bin, &locks);
    assert_outcome(&o, min_acquisitions);
    assert!(problems.is_empty(), "after the chaos: {problems:#?}");
}
