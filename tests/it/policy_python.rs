//! A real Python policy (componentize-py, ~18 MB, CPython inside) through every path a user
//! takes: `policy check`, `policy simulate`, contended runs, a compile shared by waiters that
//! keep their rank order, the wall-time bound on a sleeping policy, faults that name the ticket.
//! The component is built once per test run and its optimized code compiled once into a cache
//! shared by these tests ([`warm`]); only the ordering test starts from an empty cache.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use crate::support::policy::*;
use cachelock::policy::{self, ErrorKind, WaitDecision};

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A cache directory holding the Python policy's optimized code, compiled once by
/// `policy check` (the deploy step) for the tests that start warm.
fn warm() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let cfg = isolated_config(dir.path(), "");
        let out = Command::new(BIN)
            .args(["policy", "check", "--config"])
            .arg(&cfg)
            .arg(python_policy())
            .output()
            .unwrap();
        let t = text(&out);
        assert_eq!(out.status.code(), Some(0), "{t}");
        assert!(t.contains("compiled:  now, quickly"), "{t}");
        dir
    })
    .path()
}

/// `cachelock ARGS` with the warm cache's configuration (plus `yaml`).
fn cachelock(dir: &Path, yaml: &str, args: &[&str]) -> Command {
    let cfg = if yaml.is_empty() {
        warm().join("cachelock.yaml")
    } else {
        let p = dir.join("extra.yaml");
        std::fs::write(
            &p,
            format!(
                "{}{yaml}",
                std::fs::read_to_string(warm().join("cachelock.yaml")).unwrap()
            ),
        )
        .unwrap();
        p
    };
    let mut c = Command::new(BIN);
    c.args(args).env("CACHELOCK_CONFIG", cfg).current_dir(dir);
    c
}

#[test]
fn check_and_simulate_a_python_policy() {
    let dir = tempfile::tempdir().unwrap();
    let py = python_policy();
    let out = cachelock(dir.path(), "", &["policy", "check"])
        .arg(&py)
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    // Deployed: the second check (any later run) loads the optimized code from the cache.
    assert!(t.contains("compiled:  taken from the cache"), "{t}");
    assert!(t.contains("rank(priority 0) = 0"), "{t}");
    let scenario = dir.path().join("s.yaml");
    std::fs::write(
        &scenario,
        "holders:\n  - {id: h, release_at_ms: 1000}\narrivals:\n  - {id: a, at_ms: 0, labels: {rank: '1'}}\n  - {id: b, at_ms: 10, labels: {rank: '3'}}\n  - {id: c, at_ms: 20, labels: {branch: main}}\n  - {id: d, at_ms: 30, priority: 2}\n",
    )
    .unwrap();
    let out = cachelock(
        dir.path(),
        "",
        &["policy", "simulate", "--json", "--policy"],
    )
    .arg(&py)
    .arg("--scenario")
    .arg(&scenario)
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["served_order"], serde_json::json!(["c", "b", "d", "a"]));
    // A configuration the policy refuses is a configuration error naming the key.
    let out = cachelock(
        dir.path(),
        "",
        &["policy", "check", "--policy-config", "colour=red"],
    )
    .arg(&py)
    .output()
    .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(78), "{t}");
    assert!(t.contains("unknown config key 'colour'"), "{t}");
}

/// A lock holder that releases when told (a FIFO: no sleeping), writing the release time.
struct Holder {
    dir: PathBuf,
    child: Child,
}

impl Drop for Holder {
    fn drop(&mut self) {
        // A failed test must not leave a holder behind (released ones have exited already).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Holder {
    fn start(dir: &Path, cfg: &Path) -> Holder {
        let fifo = dir.join("release");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let child = Command::new(BIN)
            .args(["run", "-q", "--lock-dir"])
            .arg(dir.join("locks"))
            .args(["l", "sh", "-c"])
            .arg(format!(
                "touch {d}/held; read x < {d}/release; date +%s%N > {d}/released",
                d = dir.display()
            ))
            .env("CACHELOCK_CONFIG", cfg)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(|| dir.join("held").exists(), "the holder to take the lock");
        Holder {
            dir: dir.to_path_buf(),
            child,
        }
    }

    fn release(mut self) {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.dir.join("release"))
            .unwrap();
        writeln!(f, "go").unwrap();
        drop(f);
        assert!(self.child.wait().unwrap().success());
        drop(self);
    }
}

/// Polls `cond` (a file appearing, a queue growing) for up to 60 s.
fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn queued(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("locks/l.lock/queue"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The high-water mark of `pid`'s resident set, KiB (0 once it has exited).
fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn nanos_in(file: &Path) -> u128 {
    std::fs::read_to_string(file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn mtime_nanos(p: &Path) -> u128 {
    std::fs::metadata(p)
        .unwrap()
        .modified()
        .unwrap()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Issue 12.1: with an empty compile cache, five labelled waiters queue behind a holder while
/// the Python policy compiles. They share one compile, wait for it, and are served in rank
/// order; the lock is not left free much past the end of that compile.
#[test]
fn waiters_share_the_first_compile_and_keep_rank_order() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = isolated_config(dir, "");
    let py = python_policy();
    let holder = Holder::start(dir, &cfg);
    // Arrival order w0..w4; rank order w1, w3, w2, w4, w0 (FIFO or priority would differ).
    let ranks = [1, 5, 3, 4, 2];
    let mut waiters: Vec<Child> = Vec::new();
    for (i, r) in ranks.iter().enumerate() {
        let w = Command::new(BIN)
            .args(["run", "-q", "--lock-dir"])
            .arg(dir.join("locks"))
            .arg("--policy")
            .arg(&py)
            .args(["-l", &format!("rank={r}"), "l", "sh", "-c"])
            .arg(format!(
                "date +%s%N >> {d}/acquired; echo w{i} >> {d}/order",
                d = dir.display()
            ))
            .env("CACHELOCK_CONFIG", &cfg)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        waiters.push(w);
        wait_for(|| queued(dir) == i + 2, "the waiter to queue");
    }
    holder.release();
    // Issue 12.2: a waiter does not compile the policy itself (hundreds of MB each): one
    // compile, in a child process of one of them. Each waiter's own high-water mark is read
    // from /proc while it lives.
    let mut peak_kib = vec![0u64; waiters.len()];
    let mut done = vec![false; waiters.len()];
    let start = Instant::now();
    while done.iter().any(|d| !d) {
        for (i, w) in waiters.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            peak_kib[i] = peak_kib[i].max(vm_hwm_kib(w.id()));
            if let Some(status) = w.try_wait().unwrap() {
                use std::io::Read;
                let mut err = String::new();
                w.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                assert!(status.success(), "w{i}: {err}");
                done[i] = true;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(300), "waiters stuck");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        peak_kib.iter().all(|&k| k < 128 * 1024),
        "waiters' peak RSS (KiB): {peak_kib:?}"
    );
    let order = std::fs::read_to_string(dir.join("order")).unwrap();
    assert_eq!(
        order.split_whitespace().collect::<Vec<_>>(),
        ["w1", "w3", "w2", "w4", "w0"]
    );
    // One compile for all: one quick artifact in the cache (and at most the optimized one).
    let artifacts: Vec<PathBuf> = std::fs::read_dir(dir.join("cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .collect();
    assert!(
        !artifacts.is_empty() && artifacts.len() <= 2,
        "{artifacts:?}"
    );
    let compiled = artifacts.iter().map(|p| mtime_nanos(p)).min().unwrap();
    let released = nanos_in(&dir.join("released"));
    let first: u128 = std::fs::read_to_string(dir.join("acquired"))
        .unwrap()
        .lines()
        .map(|l| l.trim().parse::<u128>().unwrap())
        .min()
        .unwrap();
    // Not idle longer than the first compile: taken within a few seconds (load, scan, start
    // of a process on a loaded machine) of the later of the release and the compile's end.
    let bound = released.max(compiled) + 5_000_000_000;
    assert!(
        first <= bound,
        "lock free from release {released} to first acquisition {first} (compile ended {compiled})"
    );
}

#[test]
fn a_python_policy_that_sleeps_is_stopped_at_its_time_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let holder = Holder::start(dir, &warm().join("cachelock.yaml"));
    let py = python_policy();
    let yaml = format!(
        "policies:\n  p:\n    module: {}\n    config: {{sleep_in: on-wait, sleep_ms: 600000}}\n    limits: {{time_ms: 300}}\n",
        py.display()
    );
    let start = Instant::now();
    // -v: a policy's info-level log lines show at -v (warnings and errors always).
    let out = cachelock(
        dir,
        &yaml,
        &["run", "-q", "-v", "--policy", "p", "--lock-dir"],
    )
    .arg(dir.join("locks"))
    .args(["l", "true"])
    .output()
    .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(70), "{t}");
    assert!(
        t.contains("on-wait")
            && t.contains("ran past its time limit (300 ms per call; limits.time_ms)"),
        "{t}"
    );
    assert!(
        t.contains("sleeping in on-wait"),
        "the policy's log line: {t}"
    );
    // Bounded by the limit, not by the 10-minute sleep (generous: a loaded CI machine).
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "{:?}",
        start.elapsed()
    );
    // A sleep in configure is a load error (exit 78).
    let yaml = yaml.replace("on-wait", "configure");
    let out = cachelock(dir, &yaml, &["run", "-q", "--policy", "p", "--lock-dir"])
        .arg(dir.join("locks"))
        .args(["l", "true"])
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(78), "{t}");
    assert!(
        t.contains("configure failed") && t.contains("time limit"),
        "{t}"
    );
    holder.release();
}

/// Library level: a fault in `rank` names the ticket and its labels (for its owner), and queue
/// data larger than the policy's memory can hold is cut before it is passed.
#[test]
fn rank_faults_name_the_ticket_and_big_queues_are_fitted() {
    let l = loaded(warm(), "");
    let settings = l.config.lock_settings("l");
    let py = python_policy().display().to_string();
    let mut p = policy::for_lock(&l, &settings, Some(&py), &[]).unwrap();
    p.ready(None).unwrap();
    let bad = ticket("0000000042", 0, 5, &[("trap", "yes"), ("team", "infra")]);
    let e = p.rank(&bad, 10).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Fault);
    assert_eq!(e.call, Some("rank"));
    assert_eq!(e.ticket.as_ref().unwrap().id, "0000000042");
    let msg = e.to_string();
    assert!(
        msg.contains("while ranking ticket 0000000042, labels trap=yes team=infra"),
        "{msg}"
    );
    assert_eq!(cachelock::error::Error::from(e).exit_code(), 70);
    // The next call gets a fresh instance.
    assert_eq!(p.rank(&ticket("a", 2, 5, &[("rank", "3")]), 10).unwrap(), 5);
    // 40 waiters with 4 MiB labels each (160 MiB) against a 64 MiB policy memory.
    let big = "x".repeat(4 << 20);
    let waiters = (0..40)
        .map(|i| ticket(&format!("w{i}"), i % 3, 100 + i as u64, &[("blob", &big)]))
        .collect();
    let s = state(ticket("me", 5, 50, &[("rank", "1")]), waiters, 1000, 3);
    assert!(matches!(
        p.on_wait(&s).unwrap(),
        WaitDecision::KeepWaiting(_)
    ));
}

/// Past `policy_compile.wait_seconds`, a waiter whose policy is still compiling ranks by the
/// fallback (priority) instead of waiting on, and by the policy once it is compiled.
#[test]
fn past_the_wait_bound_ranks_fall_back_to_priority_until_compiled() {
    let tmp = tempfile::tempdir().unwrap();
    let l = loaded(tmp.path(), "policy_compile: {wait_seconds: 0}\n");
    let settings = l.config.lock_settings("l");
    let py = python_policy().display().to_string();
    let mut p = policy::for_lock(&l, &settings, Some(&py), &[]).unwrap();
    let t = ticket("a", 2, 5, &[("rank", "40")]);
    // An empty cache: the compile takes seconds; the bound is 0 s.
    p.ready(None).unwrap();
    assert_eq!(p.rank(&t, 10).unwrap(), 2, "fallback: rank = priority");
    let start = Instant::now();
    loop {
        p.ready(None).unwrap();
        if p.rank(&t, 10).unwrap() == 42 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "the policy never finished compiling"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `-n` and `-w` hold while the policy compiles (issue 19, defect 1): with an empty cache and
/// a waiter in the queue (so the policy is needed to rank), a `-n` and a `-w 1` request give
/// up (exit 1) before the compile of the Python policy — seconds of CPU — has produced code.
#[test]
fn nonblock_and_wait_limit_hold_while_the_policy_compiles() {
    use sha2::Digest;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = isolated_config(dir, "");
    let py = python_policy();
    let sha = format!("{:x}", sha2::Sha256::digest(std::fs::read(&py).unwrap()));
    let holder = Holder::start(dir, &cfg);
    let mut waiter = Command::new(BIN)
        .args(["run", "-q", "--lock-dir"])
        .arg(dir.join("locks"))
        .args(["--policy", "builtin:default", "l", "true"])
        .env("CACHELOCK_CONFIG", &cfg)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(|| queued(dir) == 2, "the waiter to queue");
    for flags in [&["-n"][..], &["-w", "1"]] {
        let out = Command::new(BIN)
            .args(["run", "-q", "--lock-dir"])
            .arg(dir.join("locks"))
            .args(flags)
            .arg("--policy")
            .arg(&py)
            .args(["l", "true"])
            .env("CACHELOCK_CONFIG", &cfg)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "{flags:?}: {t}");
        let compiled: Vec<String> = std::fs::read_dir(dir.join("cache"))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&sha) && n.ends_with(".cwasm"))
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            compiled.is_empty(),
            "{flags:?} waited for the compile: {compiled:?}"
        );
    }
    holder.release();
    assert!(waiter.wait().unwrap().success());
}
