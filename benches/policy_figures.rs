//! Figures of issue 12 (policies at organization scale), measured side by side in one run with
//! their anchors: a Python policy (componentize-py, the test policy of the suite) against the
//! built-in Rust policies, cold and warm.
//!
//! - first contended run with a never-seen policy (empty cache): the waiter's wall time, and how
//!   long the lock stayed free after the holder released (goal ≤ 2 s for Python);
//! - the same after the deploy step `policy check` compiled it (goal ≤ 0.3 s);
//! - the cold compile of the component: CPU and peak memory of the compiling child;
//! - warm decision cost (`rank`, `on-wait` with 8 other waiters), median per call;
//! - peak RSS of a waiting process (goals: Python ≤ 64 MiB, Rust ≤ 25 MiB), with an uncontended
//!   `cachelock run true` as the anchor.
//!
//! `cargo bench --bench policy_figures` (needs componentize-py, as the tests do). Prints a
//! Markdown table; docs/policies.md quotes it.

#[path = "../tests/it/support/policy.rs"]
mod policy_support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cachelock::policy::{self as pol, Policy};
use policy_support::*;

fn median<T: Ord + Copy>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// One contended run: a holder that releases as soon as the waiter is queued. Returns (the
/// waiter's wall time, lock idle from release to the waiter's acquisition, the waiter's peak
/// RSS in KiB sampled while it waited, whether it had to wait for the release).
fn contended(dir: &Path, cfg: &Path, policy: &str, hold_ms: u64) -> (Duration, Duration, u64) {
    let _ = std::fs::remove_dir_all(dir.join("locks"));
    for f in ["held", "released", "acquired", "release"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let fifo = dir.join("release");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut holder = Command::new(BIN)
        .args(["run", "-q", "--lock-dir"])
        .arg(dir.join("locks"))
        .args(["l", "sh", "-c"])
        .arg(format!(
            "touch {d}/held; read x < {d}/release; date +%s%N > {d}/released",
            d = dir.display()
        ))
        .env("CACHELOCK_CONFIG", cfg)
        .spawn()
        .unwrap();
    while !dir.join("held").exists() {
        std::thread::sleep(Duration::from_millis(2));
    }
    let start = Instant::now();
    let mut waiter = Command::new(BIN)
        .args(["run", "-q", "--lock-dir"])
        .arg(dir.join("locks"))
        .args(["--policy", policy, "l", "sh", "-c"])
        .arg(format!("date +%s%N > {}/acquired", dir.display()))
        .env("CACHELOCK_CONFIG", cfg)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let queue = dir.join("locks/l.lock/queue");
    while std::fs::read_dir(&queue).map(|d| d.count()).unwrap_or(0) < 2 {
        std::thread::sleep(Duration::from_millis(1));
    }
    // Let it wait (and load its policy) for `hold_ms`, sampling its peak RSS.
    let mut rss = 0;
    let until = Instant::now() + Duration::from_millis(hold_ms);
    while Instant::now() < until {
        rss = rss.max(vm_hwm(waiter.id()));
        std::thread::sleep(Duration::from_millis(20));
    }
    rss = rss.max(vm_hwm(waiter.id()));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .unwrap()
        .write_all(b"go\n")
        .unwrap();
    assert!(holder.wait().unwrap().success());
    assert!(waiter.wait().unwrap().success());
    let wall = start.elapsed();
    let read = |f: &str| -> u128 {
        std::fs::read_to_string(dir.join(f))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let idle = Duration::from_nanos(read("acquired").saturating_sub(read("released")) as u64);
    (wall, idle, rss)
}

fn vm_hwm(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Reaps `pid` and returns its peak RSS in KiB.
fn wait_rss(pid: u32) -> u64 {
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid out-buffer.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: our own child; valid out-pointers.
    unsafe { libc::wait4(pid as i32, &mut status, 0, &mut ru) };
    assert_eq!(status, 0, "exit status {status}");
    ru.ru_maxrss as u64
}

fn children_usage() -> (Duration, u64) {
    // SAFETY: an all-zero rusage is a valid out-buffer.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let cpu = Duration::new(ru.ru_utime.tv_sec as u64, ru.ru_utime.tv_usec as u32 * 1000)
        + Duration::new(ru.ru_stime.tv_sec as u64, ru.ru_stime.tv_usec as u32 * 1000);
    (cpu, ru.ru_maxrss as u64)
}

/// Warm decisions per call: (rank, on-wait with 8 others), medians.
fn decisions(cache: &Path, policy: &str) -> (Duration, Duration) {
    let l = loaded(cache, "");
    let (_, mut p) = pol::load_now(&l, policy, &[]).unwrap();
    let waiters: Vec<_> = (0..8)
        .map(|i| ticket(&format!("w{i}"), i % 3, 100 + i as u64, &[("branch", "x")]))
        .collect();
    let me = ticket("me", 1, 50, &[("branch", "main")]);
    let s = state(me.clone(), waiters, 1000, 3);
    let n = 500u32;
    let (mut r, mut w) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(p.rank(&me, 5000).unwrap());
        }
        r.push(t.elapsed() / n);
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(p.on_wait(&s).unwrap());
        }
        w.push(t.elapsed() / n);
    }
    (median(r), median(w))
}

fn main() {
    // `cargo bench` passes --bench; nothing to filter.
    init();
    let py = python_policy();
    let py = py.to_str().unwrap();
    let runs = std::env::var("CACHELOCK_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3usize);
    let tmp = tempfile::tempdir().unwrap();
    let mut rows: Vec<(String, String)> = Vec::new();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("policy_figures: {runs} runs per cold figure; load {load}");

    // Cold: a never-seen policy, an empty cache each time.
    for (name, policy) in [
        ("Python", py),
        ("Rust (builtin:priority)", "builtin:priority"),
    ] {
        let (mut walls, mut idles) = (Vec::new(), Vec::new());
        for i in 0..runs {
            let d = tmp.path().join(format!("cold-{}-{i}", name.len()));
            std::fs::create_dir_all(&d).unwrap();
            let cfg = isolated_config(&d, "");
            let (wall, idle, _) = contended(&d, &cfg, policy, 0);
            walls.push(wall);
            idles.push(idle);
        }
        rows.push((
            format!("first contended run, never-seen {name} policy: waiter wall / lock free after release"),
            format!("{} / {}", ms(median(walls)), ms(median(idles))),
        ));
    }

    // The deploy step: `policy check` compiles (quick and optimized) into a cache; its child
    // processes' CPU and peak memory are the cold compile's.
    let warm = tmp.path().join("warm");
    let cfg = isolated_config(&warm, "");
    let before = children_usage();
    let t = Instant::now();
    let out = Command::new(BIN)
        .args(["policy", "check", "--config"])
        .arg(&cfg)
        .arg(py)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = children_usage();
    rows.push((
        "deploy: `policy check` of the Python policy (quick + optimized compile): wall / CPU / peak RSS of a compiler".into(),
        format!(
            "{} / {} / {} MiB",
            ms(t.elapsed()),
            ms(after.0 - before.0),
            after.1 / 1024
        ),
    ));
    let out = Command::new(BIN)
        .args(["policy", "check", "--config"])
        .arg(&cfg)
        .arg("builtin:priority")
        .output()
        .unwrap();
    assert!(out.status.success());

    // Warm: after the deploy step.
    for (name, policy) in [
        ("Python", py),
        ("Rust (builtin:priority)", "builtin:priority"),
    ] {
        let (mut walls, mut idles, mut rss) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs.max(5) {
            let (wall, idle, r) = contended(&warm, &cfg, policy, 300);
            walls.push(wall.saturating_sub(Duration::from_millis(300)));
            idles.push(idle);
            rss.push(r);
        }
        rows.push((
            format!("contended run after `policy check`, {name}: waiter wall (minus the 300 ms hold) / lock free after release"),
            format!("{} / {}", ms(median(walls)), ms(median(idles))),
        ));
        rows.push((
            format!("peak RSS of a waiting process, warm {name} policy"),
            format!("{:.1} MiB", median(rss) as f64 / 1024.0),
        ));
    }
    // Anchor: an uncontended run loads no policy.
    let mut rss = Vec::new();
    for _ in 0..5 {
        // Reaped by wait4 in `wait_rss` (std's wait gives no rusage).
        #[allow(clippy::zombie_processes)]
        let child = Command::new(BIN)
            .args(["run", "-q", "--lock-dir"])
            .arg(warm.join("anchor-locks"))
            .args(["a", "true"])
            .env("CACHELOCK_CONFIG", &cfg)
            .spawn()
            .unwrap();
        rss.push(wait_rss(child.id()));
    }
    rows.push((
        "anchor: peak RSS of an uncontended `cachelock run true` (loads no policy)".into(),
        format!("{:.1} MiB", median(rss) as f64 / 1024.0),
    ));

    for (name, policy) in [
        ("Python", py),
        ("Rust (builtin:priority)", "builtin:priority"),
    ] {
        let (r, w) = decisions(&warm, policy);
        rows.push((
            format!("warm decision, {name}: rank / on-wait with 8 other waiters"),
            format!(
                "{:.1} µs / {:.1} µs",
                r.as_secs_f64() * 1e6,
                w.as_secs_f64() * 1e6
            ),
        ));
    }

    println!("| figure | measured (median) |\n|---|---|");
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
}
