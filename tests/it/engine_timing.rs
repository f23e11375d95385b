//! Timing-critical properties, run serially in one test so they do not disturb each other:
//! fairness of mixed waiters (with flock(1)'s analogue measured in the same run), handoff
//! latency, the successor of a SIGKILLed holder, SIGKILL of cachelock while its command runs,
//! and the CPU use of an idle waiter. `cargo test --test engine_timing -- --nocapture` shows
//! the figures.

use std::time::{Duration, Instant};

use crate::support::util::*;

const RUN: Duration = Duration::from_secs(4);
const HOLD: f64 = 0.005;

struct Figures {
    label: String,
    turns: Vec<f64>,
    jain: f64,
    p50: f64,
    p99: f64,
    overlaps: usize,
}

fn report(f: &Figures) {
    println!(
        "{:<46} turns {:?}  Jain {:.4}  handoff p50 {:.2} ms  p99 {:.2} ms  overlaps {}",
        f.label, f.turns, f.jain, f.p50, f.p99, f.overlaps
    );
}

fn measure(
    env: &Env,
    label: &str,
    workers: Vec<(String, Vec<String>, Option<Duration>)>,
) -> Figures {
    let log = env.path("sections.log");
    let tags: Vec<String> = workers.iter().map(|w| w.0.clone()).collect();
    let v = contend(
        env,
        &log,
        RUN,
        workers.into_iter().map(|(_, a, r)| (a, r)).collect(),
    );
    let t = turns(&v, &tags);
    let h = handoffs_ms(&v);
    let f = Figures {
        label: label.to_string(),
        jain: jain(&t),
        turns: t,
        p50: percentile(&h, 50.0),
        p99: percentile(&h, 99.0),
        overlaps: overlaps(&v).len(),
    };
    report(&f);
    f
}

fn cl(env: &Env, tag: &str, opts: &[&str]) -> (String, Vec<String>, Option<Duration>) {
    let mut a: Vec<String> = vec![bin().into(), "run".into(), "-q".into()];
    a.extend(opts.iter().map(|s| s.to_string()));
    a.push("fair".into());
    a.push("--".into());
    a.extend(env.section(&env.path("sections.log"), tag, HOLD));
    (tag.to_string(), a, None)
}

fn fl(
    env: &Env,
    tag: &str,
    opts: &[&str],
    retry: Option<Duration>,
) -> (String, Vec<String>, Option<Duration>) {
    let mut a: Vec<String> = vec!["flock".into()];
    a.extend(opts.iter().map(|s| s.to_string()));
    a.push(env.path("flock.lock").display().to_string());
    a.extend(env.section(&env.path("sections.log"), tag, HOLD));
    (tag.to_string(), a, retry)
}

/// Checks a cachelock figure; a Jain index below the bar on this shared, noisy machine is
/// measured twice more and the median of the three runs decides.
fn check(
    failures: &mut Vec<String>,
    f: &Figures,
    min_jain: f64,
    again: &mut dyn FnMut() -> Figures,
) {
    let mut jains = vec![f.jain];
    let mut overlaps = f.overlaps;
    if f.jain < min_jain {
        for _ in 0..2 {
            let g = again();
            jains.push(g.jain);
            overlaps += g.overlaps;
        }
    }
    if overlaps > 0 {
        failures.push(format!(
            "{}: {overlaps} overlapping critical sections",
            f.label
        ));
    }
    let med = percentile(&jains, 50.0);
    if med < min_jain {
        failures.push(format!(
            "{}: Jain {med:.4} (median of {jains:.4?}) < {min_jain}",
            f.label
        ));
    }
}

fn fairness(failures: &mut Vec<String>) {
    let env = Env::new();

    // 4 blocking waiters + 4 that loop on `-w 0.05 -k JOB` (give up, retry at once).
    let retry_mix = || {
        let mut w = Vec::new();
        for i in 0..4 {
            w.push(cl(&env, &format!("block{i}"), &[]));
        }
        for i in 0..4 {
            let key = format!("job{i}");
            w.push(cl(&env, &format!("retry{i}"), &["-w", "0.05", "-k", &key]));
        }
        measure(&env, "cachelock 4 blocking + 4 `-w 0.05 -k` retry", w)
    };
    let f = retry_mix();
    check(failures, &f, 0.98, &mut || retry_mix());
    let mut w = Vec::new();
    for i in 0..4 {
        w.push(fl(&env, &format!("block{i}"), &[], None));
    }
    for i in 0..4 {
        w.push(fl(&env, &format!("retry{i}"), &["-w", "0.05"], None));
    }
    let f = measure(&env, "flock(1) 4 blocking + 4 `-w 0.05` retry", w);
    if f.overlaps > 0 {
        failures.push("flock(1) itself overlapped: the detector is broken".into());
    }

    // 4 notify + 4 poll waiters on one lock.
    let mode_mix = || {
        let mut w = Vec::new();
        for i in 0..4 {
            w.push(cl(&env, &format!("notify{i}"), &["--wait-mode", "notify"]));
        }
        for i in 0..4 {
            w.push(cl(&env, &format!("poll{i}"), &["--wait-mode", "poll"]));
        }
        measure(&env, "cachelock 4 notify + 4 poll", w)
    };
    let f = mode_mix();
    check(failures, &f, 0.98, &mut || mode_mix());
    let mut w = Vec::new();
    for i in 0..4 {
        w.push(fl(&env, &format!("block{i}"), &[], None));
    }
    for i in 0..4 {
        w.push(fl(
            &env,
            &format!("nb{i}"),
            &["-n"],
            Some(Duration::from_millis(50)),
        ));
    }
    measure(&env, "flock(1) 4 blocking + 4 `-n` every 50 ms", w);

    // 8 notify waiters: the handoff cost against plain blocking flock.
    let notify8 = || {
        let w = (0..8).map(|i| cl(&env, &format!("n{i}"), &[])).collect();
        measure(&env, "cachelock 8 blocking (notify)", w)
    };
    let f = notify8();
    check(failures, &f, 0.98, &mut || notify8());
    let w = (0..8)
        .map(|i| fl(&env, &format!("b{i}"), &[], None))
        .collect();
    measure(&env, "flock(1) 8 blocking", w);
}

/// SIGKILL of a holder (cachelock and its command): the successor's command starts within
/// 100 ms (median of 5).
fn killed_holder(failures: &mut Vec<String>) {
    let env = Env::new();
    let mut lat = Vec::new();
    for round in 0..5 {
        let started = env.path(&format!("started{round}"));
        let mut holder = env.spawn(&[
            "run",
            "-q",
            "k",
            "--",
            "bash",
            "-c",
            &format!("echo > {}; exec sleep 30", started.display()),
        ]);
        let t0 = Instant::now();
        while !started.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "holder never started"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let log = env.path(&format!("succ{round}.log"));
        let mut succ_args = vec!["run".to_string(), "-q".into(), "k".into(), "--".into()];
        succ_args.extend(env.section(&log, "succ", 0.0));
        let succ_refs: Vec<&str> = succ_args.iter().map(|s| s.as_str()).collect();
        let mut succ = env.spawn(&succ_refs);
        env.wait_tickets("k", 2);
        std::thread::sleep(Duration::from_millis(100));
        let killed_at = now_s();
        holder.signal_group(libc::SIGKILL);
        assert_eq!(succ.wait(), 0, "successor failed");
        let v = read_log(&log);
        let l = (v[0].start - killed_at) * 1000.0;
        lat.push(l);
        holder.wait();
    }
    let med = percentile(&lat, 50.0);
    println!("SIGKILLed holder -> successor holds: {lat:.1?} ms, median {med:.1} ms");
    if med > 100.0 {
        failures.push(format!(
            "SIGKILLed holder's successor took {med:.1} ms (median) > 100 ms"
        ));
    }
    // The last holder's dead ticket is cleaned up by the next scan (status scans too).
    let st = env.status_json(Some("k"));
    if !st["locks"][0]["holders"].as_array().unwrap().is_empty() {
        failures.push(format!("status still shows a killed holder: {st}"));
    }
    if !env.tickets("k").is_empty() {
        failures.push(format!(
            "tickets left after kill rounds: {:?}",
            env.tickets("k")
        ));
    }
}

/// SIGKILL of cachelock while its command runs: the command (told by SIGTERM, which it traps
/// and outlives for 0.4 s) keeps the lock — the successor must not overlap it — and the
/// successor holds the lock within 100 ms of the command's end.
fn killed_cachelock(failures: &mut Vec<String>) {
    let env = Env::new();
    let mut lat = Vec::new();
    for round in 0..3 {
        let log = env.path(&format!("k{round}.log"));
        let started = env.path(&format!("kstarted{round}"));
        let term = env.path(&format!("term{round}"));
        let script = format!(
            r#"trap 'echo > {term}' TERM; s=$EPOCHREALTIME; echo > {started}
               while [ ! -e {term} ]; do read -t 0.02 <> {fifo}; done
               read -t 0.4 <> {fifo}; e=$EPOCHREALTIME; echo "holder $s $e" >> {log}"#,
            term = term.display(),
            started = started.display(),
            fifo = env.path("fifo").display(),
            log = log.display()
        );
        let mut holder = env.spawn(&["run", "-q", "kc", "--", "bash", "-c", &script]);
        let t0 = Instant::now();
        while !started.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "holder never started"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut succ_args = vec!["run".to_string(), "-q".into(), "kc".into(), "--".into()];
        succ_args.extend(env.section(&log, "succ", 0.0));
        let succ_refs: Vec<&str> = succ_args.iter().map(|s| s.as_str()).collect();
        let mut succ = env.spawn(&succ_refs);
        env.wait_tickets("kc", 2);
        std::thread::sleep(Duration::from_millis(100));
        holder.signal(libc::SIGKILL); // cachelock only, not its command
        assert_eq!(succ.wait(), 0, "successor failed");
        let v = read_log(&log);
        if !term.exists() {
            failures.push("the command did not get its parent-death SIGTERM".into());
        }
        let h = v.iter().find(|s| s.tag == "holder").expect("holder logged");
        let s = v
            .iter()
            .find(|s| s.tag == "succ")
            .expect("successor logged");
        if s.start < h.end {
            failures.push(format!(
                "successor entered {:.1} ms before the orphaned command left",
                (h.end - s.start) * 1000.0
            ));
        }
        lat.push((s.start - h.end) * 1000.0);
        holder.wait();
    }
    let med = percentile(&lat, 50.0);
    println!(
        "SIGKILLed cachelock: command's end -> successor holds: {lat:.1?} ms, median {med:.1} ms"
    );
    if med > 100.0 {
        failures.push(format!(
            "successor after an orphaned command took {med:.1} ms > 100 ms"
        ));
    }
}

/// A waiter behind a long holder uses ~0% CPU (notify and poll).
fn idle_cpu(failures: &mut Vec<String>) {
    let env = Env::new();
    let _holder = env.spawn(&["run", "-q", "idle", "--", "sleep", "5"]);
    env.wait_tickets("idle", 1);
    let w1 = env.spawn(&["run", "-q", "--wait-mode", "notify", "idle", "--", "true"]);
    let w2 = env.spawn(&["run", "-q", "--wait-mode", "poll", "idle", "--", "true"]);
    env.wait_tickets("idle", 3);
    std::thread::sleep(Duration::from_millis(300));
    let (a1, a2) = (cpu_seconds(w1.pid()), cpu_seconds(w2.pid()));
    std::thread::sleep(Duration::from_secs(3));
    let (b1, b2) = (cpu_seconds(w1.pid()), cpu_seconds(w2.pid()));
    let (c1, c2) = ((b1 - a1) / 3.0 * 100.0, (b2 - a2) / 3.0 * 100.0);
    println!("idle waiter CPU over 3 s: notify {c1:.2}%  poll {c2:.2}%");
    for (m, c) in [("notify", c1), ("poll", c2)] {
        if c > 2.0 {
            failures.push(format!("idle {m} waiter used {c:.2}% CPU"));
        }
    }
}

#[test]
fn timing_properties() {
    let mut failures = Vec::new();
    fairness(&mut failures);
    killed_holder(&mut failures);
    killed_cachelock(&mut failures);
    idle_cpu(&mut failures);
    assert!(failures.is_empty(), "failed:\n{}", failures.join("\n"));
}
