//! etcd backend figures, cachelock next to its anchor `etcdctl lock` (etcd's own lock recipe),
//! measured in the same run over a local 3-member cluster (the test fixture of
//! `tests/it/support/etcd.rs`): uncontended acquire+release (a whole `run L -- true` against
//! `etcdctl lock L true`), and handoff p50/p99, turns and Jain's index with 8 looping waiters
//! holding 5 ms. Prints a markdown table for docs/benchmarks.md.
//!
//! `cargo bench --bench etcd` (`-- --secs N` for longer contention runs; default 6).

// The test fixtures, as modules at the crate root (`etcd` refers to `super::util`).
#[path = "../tests/it/support/etcd.rs"]
mod etcd;
#[path = "../tests/it/support/stats.rs"]
mod stats;
#[path = "../tests/it/support/util.rs"]
mod util;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use etcd::{read_gen_log, Cluster, EtcdEnv, TEST_CONFIG};
use stats::{jain, percentile};

fn run_quiet(mut c: Command) -> bool {
    c.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn etcdctl(cluster: &Cluster) -> Command {
    let mut c = Command::new("etcdctl");
    c.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", cluster.endpoints()));
    c
}

/// Milliseconds of `n` sequential runs of `make()`.
fn uncontended(n: usize, make: impl Fn() -> Command) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            assert!(run_quiet(make()), "uncontended run failed");
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect()
}

/// 8 loops of `make(tag)` for `secs`; handoff gaps (ms) and turns per loop, from the log.
fn contended(log: &Path, secs: f64, make: impl Fn(&str) -> Command + Sync) -> (Vec<f64>, Vec<f64>) {
    let _ = std::fs::remove_file(log);
    let end = Instant::now() + Duration::from_secs_f64(secs);
    std::thread::scope(|s| {
        for i in 0..8 {
            let make = &make;
            s.spawn(move || {
                while Instant::now() < end {
                    run_quiet(make(&format!("w{i}")));
                }
            });
        }
    });
    let v = read_gen_log(log);
    let gaps: Vec<f64> = v
        .windows(2)
        .map(|w| (w[1].start - w[0].end) * 1000.0)
        .collect();
    let turns: Vec<f64> = (0..8)
        .map(|i| v.iter().filter(|s| s.tag == format!("w{i}")).count() as f64)
        .collect();
    (gaps, turns)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs: f64 = args
        .iter()
        .position(|a| a == "--secs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(6.0);
    let cluster = Cluster::start("b", 3, false);
    let e = EtcdEnv::with_config(&cluster, "bench", TEST_CONFIG);
    let prefix = e.url.rsplit('/').next().unwrap().to_string();

    // Warm both (first connections, page cache).
    let _ = uncontended(3, || {
        let mut c = e.cmd();
        c.args(["run", "-q", "u", "--", "true"]);
        c
    });
    let cl = uncontended(40, || {
        let mut c = e.cmd();
        c.args(["run", "-q", "u", "--", "true"]);
        c
    });
    let anchor = uncontended(40, || {
        let mut c = etcdctl(&cluster);
        c.args(["lock", &format!("{prefix}/anchor-u"), "true"]);
        c
    });

    let log = e.env.path("cachelock.log");
    let (cl_gaps, cl_turns) = contended(&log, secs, |tag| {
        let mut c = e.cmd();
        c.args(["run", "-q", "h", "--"])
            .args(e.section(&log, tag, 0.005));
        c
    });
    let alog = e.env.path("anchor.log");
    let (an_gaps, an_turns) = contended(&alog, secs, |tag| {
        let mut c = etcdctl(&cluster);
        c.args(["lock", &format!("{prefix}/anchor-h")])
            .args(e.section(&alog, tag, 0.005))
            // etcdctl lock sets no generation: log a placeholder.
            .env("CACHELOCK_GENERATION", "0");
        c
    });

    let row = |name: &str, a: String, b: String| println!("| {name} | {a} | {b} |");
    println!(
        "| figure (local 3-member etcd 3.4, {secs} s contention) | cachelock | `etcdctl lock` |"
    );
    println!("|---|---|---|");
    row(
        "uncontended `run L -- true`, median / p99 (ms)",
        format!(
            "{:.1} / {:.1}",
            percentile(&cl, 50.0),
            percentile(&cl, 99.0)
        ),
        format!(
            "{:.1} / {:.1}",
            percentile(&anchor, 50.0),
            percentile(&anchor, 99.0)
        ),
    );
    row(
        "handoff p50 / p99, 8 waiters, 5 ms holds (ms)",
        format!(
            "{:.1} / {:.1}",
            percentile(&cl_gaps, 50.0),
            percentile(&cl_gaps, 99.0)
        ),
        format!(
            "{:.1} / {:.1}",
            percentile(&an_gaps, 50.0),
            percentile(&an_gaps, 99.0)
        ),
    );
    row(
        "acquisitions",
        format!("{}", cl_turns.iter().sum::<f64>()),
        format!("{}", an_turns.iter().sum::<f64>()),
    );
    row(
        "Jain's index of turns (8 loops)",
        format!("{:.3}", jain(&cl_turns)),
        format!("{:.3}", jain(&an_turns)),
    );
}
