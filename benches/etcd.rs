//! etcd backend figures, cachelock next to its anchor `etcdctl lock` (etcd's own lock recipe),
//! measured in the same run over a local 3-member cluster (the test fixture of
//! `tests/it/support/etcd.rs`): uncontended acquire+release (a whole `run L -- true` against
//! `etcdctl lock L true`), and with 4, 16 and 32 looping waiters holding 5 ms: handoff p50/p99,
//! acquisitions, Jain's index of turns, and the requests the cluster served per acquisition
//! (the members' own `/metrics`: how the load on the cluster the fleet shares grows with the
//! queue). Prints a markdown table for docs/benchmarks.md.
//!
//! `cargo bench --bench etcd` (`-- --secs N` per contention run; default 10).

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

/// What `loops` looping clients did in `secs`: handoff gaps (ms) and turns per loop, from
/// the log, and the requests the cluster served meanwhile (from etcd's own `/metrics`).
struct Contended {
    gaps: Vec<f64>,
    turns: Vec<f64>,
    requests: f64,
}

impl Contended {
    fn acquisitions(&self) -> f64 {
        self.turns.iter().sum()
    }

    fn requests_per_acquisition(&self) -> f64 {
        self.requests / self.acquisitions().max(1.0)
    }
}

/// `loops` loops of `make(tag)` for `secs`.
fn contended(
    cluster: &Cluster,
    log: &Path,
    loops: usize,
    secs: f64,
    make: impl Fn(&str) -> Command + Sync,
) -> Contended {
    let _ = std::fs::remove_file(log);
    let before = cluster.grpc_received(None);
    let end = Instant::now() + Duration::from_secs_f64(secs);
    std::thread::scope(|s| {
        for i in 0..loops {
            let make = &make;
            s.spawn(move || {
                while Instant::now() < end {
                    run_quiet(make(&format!("w{i}")));
                }
            });
        }
    });
    let requests = cluster.grpc_received(None) - before;
    let v = read_gen_log(log);
    let gaps: Vec<f64> = v
        .windows(2)
        .map(|w| (w[1].start - w[0].end) * 1000.0)
        .collect();
    let turns: Vec<f64> = (0..loops)
        .map(|i| v.iter().filter(|s| s.tag == format!("w{i}")).count() as f64)
        .collect();
    Contended {
        gaps,
        turns,
        requests,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs: f64 = args
        .iter()
        .position(|a| a == "--secs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(10.0);
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

    // cachelock and `etcdctl lock` take turns at each size, on locks of their own.
    let run = |who: &str, loops: usize, secs: f64| -> Contended {
        let log = e.env.path(&format!("{who}-{loops}.log"));
        let lock = format!("{who}-h{loops}");
        if who == "cachelock" {
            contended(&cluster, &log, loops, secs, |tag| {
                let mut c = e.cmd();
                c.args(["run", "-q", &lock, "--"])
                    .args(e.section(&log, tag, 0.005));
                c
            })
        } else {
            contended(&cluster, &log, loops, secs, |tag| {
                let mut c = etcdctl(&cluster);
                // `--`: etcdctl would read the section's `bash -c` as its own flag.
                c.args(["lock", &format!("{prefix}/{lock}"), "--"])
                    .args(e.section(&log, tag, 0.005))
                    // etcdctl lock sets no generation: log a placeholder.
                    .env("CACHELOCK_GENERATION", "0");
                c
            })
        }
    };
    let sizes = [4usize, 16, 32];
    let mut results = Vec::new();
    for &n in &sizes {
        let c = run("cachelock", n, secs);
        let a = run("etcdctl", n, secs);
        results.push((n, c, a));
    }
    let at = |n: usize| results.iter().find(|r| r.0 == n).expect("measured");

    let row = |name: &str, a: String, b: String, ratio: String| {
        println!("| {name} | {a} | {b} | {ratio} |")
    };
    println!(
        "| figure (local 3-member etcd 3.4, {secs} s per contention run, 5 ms holds) | cachelock | `etcdctl lock` | ratio |"
    );
    println!("|---|---|---|---|");
    let (c50, a50) = (percentile(&cl, 50.0), percentile(&anchor, 50.0));
    row(
        "uncontended `run L -- true`, median / p99 (ms)",
        format!("{c50:.1} / {:.1}", percentile(&cl, 99.0)),
        format!("{a50:.1} / {:.1}", percentile(&anchor, 99.0)),
        format!("{:.2}", c50 / a50),
    );
    for &n in &sizes {
        let (_, c, a) = at(n);
        let (c50, a50) = (percentile(&c.gaps, 50.0), percentile(&a.gaps, 50.0));
        row(
            &format!("{n} waiters: handoff p50 / p99 (ms)"),
            format!("{c50:.1} / {:.1}", percentile(&c.gaps, 99.0)),
            format!("{a50:.1} / {:.1}", percentile(&a.gaps, 99.0)),
            format!("{:.2}", c50 / a50),
        );
        row(
            &format!("{n} waiters: acquisitions (Jain's index of turns)"),
            format!("{} ({:.3})", c.acquisitions(), jain(&c.turns)),
            format!("{} ({:.3})", a.acquisitions(), jain(&a.turns)),
            format!("{:.2}", c.acquisitions() / a.acquisitions().max(1.0)),
        );
        row(
            &format!("{n} waiters: requests the cluster served per acquisition"),
            format!("{:.1}", c.requests_per_acquisition()),
            format!("{:.1}", a.requests_per_acquisition()),
            format!(
                "{:.2}",
                c.requests_per_acquisition() / a.requests_per_acquisition().max(1e-9)
            ),
        );
    }
    let growth = |f: &dyn Fn(&(usize, Contended, Contended)) -> f64| f(at(32)) / f(at(4));
    row(
        "requests per acquisition, 32 waiters ÷ 4 waiters",
        format!("{:.2}", growth(&|r| r.1.requests_per_acquisition())),
        format!("{:.2}", growth(&|r| r.2.requests_per_acquisition())),
        String::new(),
    );
}
