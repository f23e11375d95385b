//! The etcd backend against real etcd 3.4 clusters (see `support::etcd`), through the real
//! binary. Every check of exclusion uses an independent detector: the critical sections log
//! their own start, end and `CACHELOCK_GENERATION`, and the log is checked for overlaps and for
//! generations that do not increase. Failures are injected into real members (SIGKILL of the
//! leader, SIGSTOP beyond the lease TTL) and real cachelock processes.
//! `cargo test --test it etcd::` runs this area.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::etcd::*;
use crate::support::util::{free_port, wait_for_lines, Env, Proc, Terminal};

/// Runs `workers` loops of `cachelock run -q LOCK -- section` until `stop` is set or each did
/// `rounds` (if given); returns every exit code.
fn workers(
    e: &EtcdEnv,
    lock: &str,
    log: &Path,
    n: usize,
    hold_s: f64,
    rounds: Option<usize>,
    stop: Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<Vec<i32>>> {
    (0..n)
        .map(|i| {
            let mut cmd_args: Vec<String> =
                vec!["run".into(), "-q".into(), lock.into(), "--".into()];
            cmd_args.extend(e.section(log, &format!("w{i}"), hold_s));
            let mut base = e.cmd();
            base.args(&cmd_args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let program = base.get_program().to_owned();
            let envs: Vec<(std::ffi::OsString, Option<std::ffi::OsString>)> = base
                .get_envs()
                .map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned())))
                .collect();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut codes = Vec::new();
                let mut k = 0;
                while !stop.load(Ordering::SeqCst) && rounds.is_none_or(|r| k < r) {
                    let mut c = Command::new(&program);
                    c.args(&cmd_args)
                        .stdout(Stdio::null())
                        .stderr(Stdio::piped());
                    for (key, v) in &envs {
                        match v {
                            Some(v) => c.env(key, v),
                            None => c.env_remove(key),
                        };
                    }
                    let out = c.output().expect("worker");
                    let code = out.status.code().unwrap_or(-1);
                    if code != 0 {
                        eprintln!(
                            "worker {i}: exit {code}: {}",
                            String::from_utf8_lossy(&out.stderr)
                        );
                    }
                    codes.push(code);
                    k += 1;
                }
                codes
            })
        })
        .collect()
}

fn join_all(h: Vec<std::thread::JoinHandle<Vec<i32>>>) -> Vec<i32> {
    h.into_iter().flat_map(|h| h.join().unwrap()).collect()
}

/// Waits until `log` has at least `n` sections (fails after `bound`).
fn wait_sections(log: &Path, n: usize, bound: Duration) -> Vec<GenSection> {
    let t0 = Instant::now();
    loop {
        let v = read_gen_log(log);
        if v.len() >= n {
            return v;
        }
        assert!(
            t0.elapsed() < bound,
            "{}: expected {n} sections within {bound:?}, have {}",
            log.display(),
            v.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn contenders_are_exclusive_and_served_in_turn() {
    let e = EtcdEnv::new(shared(), "fair");
    let log = e.env.path("fair.log");
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = 4;
    let codes = join_all(workers(&e, "fair", &log, 6, 0.1, Some(rounds), stop));
    assert!(codes.iter().all(|c| *c == 0), "exit codes {codes:?}");
    let v = read_gen_log(&log);
    assert_eq!(v.len(), 6 * rounds, "{v:?}");
    check_exclusive(&v);
    // Served in turn: a worker re-queues behind everyone already waiting, so in every prefix of
    // the serving order no worker is more than two turns ahead of another still running.
    let mut turns = std::collections::BTreeMap::<String, usize>::new();
    for s in &v {
        *turns.entry(s.tag.clone()).or_default() += 1;
        let active: Vec<usize> = (0..6)
            .map(|i| turns.get(&format!("w{i}")).copied().unwrap_or(0))
            .filter(|t| *t < rounds)
            .collect();
        let ahead = turns[&s.tag];
        if let Some(min) = active.iter().min() {
            assert!(
                ahead <= min + 2,
                "{} ran turn {ahead} while another had {min}: {v:?}",
                s.tag
            );
        }
    }
    assert!(e.tickets("fair") == 0, "{}", e.status_json(Some("fair")));
}

/// A holder of `lock` that keeps it until `go` exists; waits until it holds.
fn hold_until(e: &EtcdEnv, lock: &str, go: &Path) -> Proc {
    let started = e.env.path(&format!("{lock}.held"));
    let script = format!(
        "echo $$ > {started}; while [ ! -e {go} ]; do read -t 0.02 <> {fifo}; done; exit 0",
        started = started.display(),
        go = go.display(),
        fifo = e.env.path("fifo").display()
    );
    let p = e.spawn(&["run", "-q", lock, "--", "bash", "-c", &script]);
    wait_for_lines(&started, 1);
    p
}

#[test]
fn nonblock_wait_and_conflict_codes() {
    let e = EtcdEnv::new(shared(), "nw");
    let go = e.env.path("go");
    let mut h = hold_until(&e, "nw", &go);
    let out = e.run(&["-n", "nw", "--", "true"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("lock nw is held by"));
    let out = e.run(&["-n", "-E", "3", "nw", "--", "true"]);
    assert_eq!(out.status.code(), Some(3));
    let out = e.run(&["-w", "0.3", "nw", "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("timed out"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A shared request beside an exclusive holder is refused too.
    assert_eq!(
        e.run(&["-s", "-n", "nw", "--", "true"]).status.code(),
        Some(1)
    );
    let held_gen = e.status_json(Some("nw"))["locks"][0]["generation"]
        .as_u64()
        .unwrap();
    std::fs::write(&go, "").unwrap();
    assert_eq!(h.wait(), 0);
    // Free now: -n takes it, with a larger generation (the grant's revision).
    let out = e.run(&["-n", "nw", "--", "sh", "-c", "echo $CACHELOCK_GENERATION"]);
    assert_eq!(out.status.code(), Some(0));
    let gen: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(gen > held_gen, "{gen} after {held_gen}");
    // Shared holders coexist.
    let go2 = e.env.path("go2");
    let script = format!(
        "while [ ! -e {} ]; do read -t 0.02 <> {}; done; exit 0",
        go2.display(),
        e.env.path("fifo").display()
    );
    let mut s1 = e.spawn(&["run", "-q", "-s", "nw", "--", "bash", "-c", &script]);
    e.wait_tickets("nw", 1);
    assert_eq!(
        e.run(&["-s", "-n", "nw", "--", "true"]).status.code(),
        Some(0)
    );
    assert_eq!(e.run(&["-n", "nw", "--", "true"]).status.code(), Some(1));
    std::fs::write(&go2, "").unwrap();
    assert_eq!(s1.wait(), 0);
    assert_eq!(e.tickets("nw"), 0);
}

/// Either backend, for the scenario both must order identically.
enum Store {
    Flock(Env),
    Etcd(EtcdEnv),
}

impl Store {
    fn env(&self) -> &Env {
        match self {
            Store::Flock(e) => e,
            Store::Etcd(e) => &e.env,
        }
    }
    fn spawn(&self, args: &[&str]) -> Proc {
        match self {
            Store::Flock(e) => e.spawn(args),
            Store::Etcd(e) => e.spawn(args),
        }
    }
    fn wait_tickets(&self, lock: &str, n: usize) {
        match self {
            Store::Flock(e) => e.wait_tickets(lock, n),
            Store::Etcd(e) => e.wait_tickets(lock, n),
        }
    }
}

const PRIORITY_POLICY: &str = "locks:\n  - match: '*'\n    policy: team\npolicies:\n  team:\n    module: builtin:priority\n    config: {boost.branch.main: 10}\n";

/// A holder, then waiters queued one by one: `a` (priority 0), `b` (priority 0, branch=main:
/// boosted by 10), `c` (priority 5), `d` (priority 0). Returns the serving order.
fn priority_scenario(s: &Store) -> Vec<String> {
    let env = s.env();
    let go = env.path("go");
    let started = env.path("held");
    let script = format!(
        "echo held > {}; while [ ! -e {} ]; do read -t 0.02 <> {}; done; exit 0",
        started.display(),
        go.display(),
        env.path("fifo").display()
    );
    let mut h = s.spawn(&["run", "-q", "prio", "--", "bash", "-c", &script]);
    wait_for_lines(&started, 1);
    let log = env.path("order.log");
    let mut waiters = Vec::new();
    for (i, (tag, opts)) in [
        ("a", vec!["-p", "0"]),
        ("b", vec!["-p", "0", "-l", "branch=main"]),
        ("c", vec!["-p", "5"]),
        ("d", vec!["-p", "0"]),
    ]
    .into_iter()
    .enumerate()
    {
        let mut args: Vec<String> = vec!["run".into(), "-q".into()];
        args.extend(opts.iter().map(|o| o.to_string()));
        args.extend(["prio".into(), "--".into()]);
        args.extend([
            "bash".into(),
            "-c".into(),
            format!("echo {tag} >> {}", log.display()),
        ]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        waiters.push(s.spawn(&refs));
        s.wait_tickets("prio", i + 2);
    }
    std::fs::write(&go, "").unwrap();
    assert_eq!(h.wait(), 0);
    for mut w in waiters {
        assert_eq!(w.wait(), 0, "{}", w.stderr());
    }
    std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn the_same_policy_orders_waiters_identically_on_both_backends() {
    let flock = priority_scenario(&Store::Flock(Env::with_config(PRIORITY_POLICY)));
    let etcd = priority_scenario(&Store::Etcd(EtcdEnv::with_config(
        shared(),
        "prio",
        &format!("{TEST_CONFIG}{PRIORITY_POLICY}"),
    )));
    assert_eq!(flock, ["b", "c", "a", "d"]);
    assert_eq!(etcd, flock);
}

#[test]
fn status_shows_holders_waiters_ranks_revision_and_lease() {
    let e = EtcdEnv::new(shared(), "st");
    let go = e.env.path("go");
    let mut h = hold_until(&e, "st", &go);
    let mut w = e.spawn(&[
        "run", "-q", "-p", "7", "-l", "job=9", "-k", "K1", "st", "--", "true",
    ]);
    e.wait_tickets("st", 2);
    let st = e.status_json(None);
    let l = st["locks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "st")
        .unwrap_or_else(|| panic!("lock st missing from {st}"));
    let holder = &l["holders"][0];
    // The generation is the grant's revision.
    assert_eq!(l["generation"], holder["revision"], "{l}");
    assert!(holder["revision"].as_i64().unwrap() > 0, "{holder}");
    assert!(holder["lease_left_ms"].as_u64().unwrap() > 0, "{holder}");
    assert_eq!(holder["pid"].as_u64().unwrap() as i32, h.pid());
    let waiter = &l["waiters"][0];
    assert_eq!(
        (waiter["position"].as_u64(), waiter["rank"].as_i64()),
        (Some(1), Some(7))
    );
    assert_eq!(waiter["labels"]["job"], "9");
    assert_eq!(waiter["queue_key"], "K1");
    assert!(waiter["lease_left_ms"].as_u64().is_some(), "{waiter}");
    let text = e.cmd().args(["status", "st"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("revision ") && text.contains("left"),
        "{text}"
    );
    std::fs::write(&go, "").unwrap();
    assert_eq!(h.wait(), 0);
    assert_eq!(w.wait(), 0);
    assert_eq!(e.tickets("st"), 0);
}

/// SIGKILL of a holder's cachelock: its guardian stops the command at once, and the successor
/// (which gets in when the guardian has released the lock) finds the command gone. SIGKILL of a waiter: its
/// ticket goes with its lease. Nothing is left behind.
#[test]
fn sigkilled_holders_and_waiters_leave_no_overlap_and_no_ticket() {
    let e = EtcdEnv::new(shared(), "kill");
    let log = e.env.path("kill.log");
    for round in 0..2 {
        let pidfile = e.env.path(&format!("cmd{round}.pid"));
        let script = format!("echo $$ > {}; exec sleep 60", pidfile.display());
        let mut h = e.spawn(&["run", "-q", "kill", "--", "bash", "-c", &script]);
        let cmd_pid: i32 = wait_for_lines(&pidfile, 1)[0].parse().unwrap();
        // The successor records whether the killed holder's command still lived when it got in.
        let check = format!(
            "if [ -e /proc/{cmd_pid} ] && ! grep -q '^State:.*Z' /proc/{cmd_pid}/status; then echo alive >> {log}; else echo gone >> {log}; fi",
            log = log.display()
        );
        let mut succ = e.spawn(&["run", "-q", "kill", "--", "bash", "-c", &check]);
        let mut doomed = e.spawn(&["run", "-q", "kill", "--", "true"]);
        e.wait_tickets("kill", 3);
        doomed.signal(libc::SIGKILL);
        doomed.wait();
        h.signal(libc::SIGKILL); // cachelock only: its guardian must stop the command
        assert_eq!(succ.wait(), 0, "{}", succ.stderr());
        h.wait();
        assert_eq!(wait_for_lines(&log, round + 1)[round], "gone");
    }
    // The killed waiters' tickets went with their leases.
    e.wait_tickets("kill", 0);
}

#[test]
fn unreachable_endpoints_exit_69_within_the_bound() {
    let env = Env::with_config("etcd:\n  request_timeout: 0.2\n  unavailable_timeout: 1\n");
    let url = format!("etcd://127.0.0.1:{},127.0.0.1:{}", free_port(), free_port());
    let mut c = env.cmd();
    c.env("CACHELOCK_BACKEND", &url)
        .args(["run", "x", "--", "true"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null());
    let mut p = Proc(Some(c.spawn().unwrap()));
    let code = p.wait_timeout(Duration::from_secs(30)).expect("bounded");
    let err = p.stderr();
    assert_eq!(code, 69, "{err}");
    assert!(
        err.contains("no etcd endpoint") && err.contains("answered"),
        "{err}"
    );
    let out = env
        .cmd()
        .args(["status", "--backend", &url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
}

#[test]
fn bad_urls_and_settings_are_usage_or_config_errors() {
    let env = Env::new();
    for (url, says) in [
        ("etcd://", "names no endpoint"),
        ("etcd://host", "no :PORT"),
        ("etcd://h:1/a b", "key prefix"),
        ("zookeeper://h:1", "not a lock store"),
        ("file://", "names no directory"),
    ] {
        let out = env
            .cmd()
            .args(["run", "--backend", url, "x", "--", "true"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{url}: {err}");
        assert!(err.contains(says), "{url}: {err}");
        let out = env
            .cmd()
            .env("CACHELOCK_BACKEND", url)
            .args(["status"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{url}");
    }
    for (yaml, says) in [
        ("backend: etcd://h:0\n", "key `backend`"),
        (
            "backend: etcd://127.0.0.1:1\netcd:\n  ca_file: /nonexistent/ca.pem\n",
            "/nonexistent/ca.pem",
        ),
        (
            "backend: etcd://127.0.0.1:1\netcd:\n  cert_file: /x.pem\n",
            "needs its key",
        ),
        (
            "backend: etcd://127.0.0.1:1\netcd:\n  user: alice\n",
            "no password",
        ),
        ("etcd:\n  lease_ttl: 1\n", "etcd.lease_ttl"),
        ("etcd:\n  leas_ttl: 5\n", "leas_ttl"),
    ] {
        let env = Env::with_config(yaml);
        let out = env
            .cmd()
            .env_remove("CACHELOCK_LOCK_DIR")
            .args(["run", "x", "--", "true"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{yaml}: {err}");
        assert!(err.contains(says), "{yaml}: {err}");
    }
    // file://DIR names the flock backend explicitly.
    let dir = env.path("explicit");
    let out = env
        .cmd()
        .args([
            "run",
            "--backend",
            &format!("file://{}", dir.display()),
            "f",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(dir.join("f.lock").is_dir());
}

#[test]
fn tls_client_certificates_and_authentication() {
    let c = secure();
    let tls = c.tls.clone().unwrap();
    let e = EtcdEnv::new(c, "tls");
    let with = |user: &str| {
        let mut cmd = e.cmd();
        cmd.env("ETCDCTL_CACERT", &tls.ca)
            .env("ETCDCTL_CERT", &tls.cert)
            .env("ETCDCTL_KEY", &tls.key)
            .env("ETCDCTL_USER", user);
        cmd
    };
    let out = with(&format!("root:{ROOT_PASSWORD}"))
        .args(["run", "t", "--", "sh", "-c", "echo $CACHELOCK_GENERATION"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gen: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(gen > 0);
    // Wrong password: a configuration error naming the credentials.
    let out = with("root:wrong")
        .args(["run", "t", "--", "true"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("credentials"), "{err}");
    // The same through the configuration file, password from ETCDCTL_PASSWORD.
    let yaml = format!(
        "{TEST_CONFIG}  ca_file: {}\n  cert_file: {}\n  key_file: {}\n  user: root\n",
        tls.ca.display(),
        tls.cert.display(),
        tls.key.display()
    );
    let e2 = EtcdEnv::with_config(c, "tls2", &yaml);
    let out = e2
        .cmd()
        .env("ETCDCTL_PASSWORD", ROOT_PASSWORD)
        .args(["run", "t", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without a client certificate the members refuse the connection: exit 69, bounded.
    let e3 = EtcdEnv::with_config(
        c,
        "tls3",
        &format!(
            "etcd:\n  request_timeout: 0.3\n  unavailable_timeout: 1\n  ca_file: {}\n",
            tls.ca.display()
        ),
    );
    let out = e3
        .cmd()
        .env("ETCDCTL_USER", format!("root:{ROOT_PASSWORD}"))
        .args(["run", "t", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(69),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Ctrl-C typed at the terminal reaches the command under a lease exactly once (the guardian
/// does not forward a terminal signal), and cachelock exits with the command's code.
#[test]
fn ctrl_c_reaches_the_command_once_under_a_lease() {
    let e = EtcdEnv::new(shared(), "tty");
    let ready = e.env.path("ready");
    let ints = e.env.path("ints");
    let script = format!(
        "trap 'echo int >> {ints}; exit 42' INT; echo ready > {ready}; while :; do read -t 0.05 <> {fifo}; done",
        ints = ints.display(),
        ready = ready.display(),
        fifo = e.env.path("fifo").display()
    );
    let mut term = Terminal::open();
    let mut cmd = e.cmd();
    cmd.args(["run", "-q", "tty", "--", "bash", "-c", &script]);
    let mut p = term.spawn(&mut cmd);
    wait_for_lines(&ready, 1);
    term.type_ctrl_c();
    assert_eq!(p.wait(), 42);
    assert_eq!(std::fs::read_to_string(&ints).unwrap(), "int\n");
    assert_eq!(e.tickets("tty"), 0);
}

/// SIGKILL of the etcd leader while six processes contend: no overlap, generations increase,
/// and every request is served (no exit 69 or 75): acquisitions resume.
#[test]
fn leader_killed_mid_run() {
    let c = disruptive();
    let e = EtcdEnv::new(&c, "leader");
    let log = e.env.path("leader.log");
    let stop = Arc::new(AtomicBool::new(false));
    let hs = workers(&e, "leader", &log, 6, 0.02, None, stop.clone());
    wait_sections(&log, 5, Duration::from_secs(30));
    let leader = c.leader();
    let killed_at = now_s();
    c.kill(leader);
    let before = read_gen_log(&log).len();
    let v = wait_sections(&log, before + 6, Duration::from_secs(30));
    stop.store(true, Ordering::SeqCst);
    let codes = join_all(hs);
    assert!(codes.iter().all(|c| *c == 0), "exit codes {codes:?}");
    let v2 = read_gen_log(&log);
    check_exclusive(&v2);
    let resumed = v
        .iter()
        .find(|s| s.start > killed_at)
        .map(|s| s.start - killed_at);
    eprintln!(
        "leader_killed_mid_run: first acquisition {:?} s after the kill",
        resumed
    );
    c.repair();
}

/// A member frozen (SIGSTOP) for longer than the lease TTL, first in every client's endpoint
/// list: requests fail over, holders keep renewing through the others, no overlap, and work
/// goes on during the freeze.
#[test]
fn member_frozen_beyond_the_lease_ttl() {
    let c = disruptive();
    let frozen = 0;
    let mut e = EtcdEnv::new(&c, "frozen");
    e.url = e.url.replacen(&c.endpoints(), &c.endpoints_from(frozen), 1);
    let log = e.env.path("frozen.log");
    let stop = Arc::new(AtomicBool::new(false));
    let hs = workers(&e, "frozen", &log, 4, 0.05, None, stop.clone());
    wait_sections(&log, 3, Duration::from_secs(30));
    c.signal(frozen, libc::SIGSTOP);
    let frozen_at = now_s();
    let before = read_gen_log(&log).len();
    // Work goes on while the member is frozen...
    wait_sections(&log, before + 4, Duration::from_secs(30));
    // ...for longer than the lease TTL (4 s): any lease that depended on it would be gone.
    while now_s() < frozen_at + 5.0 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let during = read_gen_log(&log).len() - before;
    c.signal(frozen, libc::SIGCONT);
    stop.store(true, Ordering::SeqCst);
    let codes = join_all(hs);
    assert!(codes.iter().all(|c| *c == 0), "exit codes {codes:?}");
    check_exclusive(&read_gen_log(&log));
    eprintln!("member_frozen_beyond_the_lease_ttl: {during} acquisitions during the 5 s freeze");
    c.repair();
}

/// The whole cluster frozen while a command runs: renewals fail, the guardian stops the
/// command's tree before the lease can expire, and cachelock exits 75 saying so.
#[test]
fn lost_lease_stops_the_command_and_exits_75() {
    let c = disruptive();
    let e = EtcdEnv::new(&c, "lost");
    let pidfile = e.env.path("child.pid");
    let script = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
    let mut h = e.spawn(&["run", "-q", "lost", "--", "bash", "-c", &script]);
    let bg: i32 = wait_for_lines(&pidfile, 1)[0].parse().unwrap();
    for i in 0..c.members.len() {
        c.signal(i, libc::SIGSTOP);
    }
    let code = h
        .wait_timeout(Duration::from_secs(30))
        .expect("cachelock ended");
    for i in 0..c.members.len() {
        c.signal(i, libc::SIGCONT);
    }
    let err = h.stderr();
    assert_eq!(code, 75, "{err}");
    assert!(
        err.contains("lock lost was lost while the command ran"),
        "{err}"
    );
    assert!(
        !Path::new(&format!("/proc/{bg}")).exists()
            || std::fs::read_to_string(format!("/proc/{bg}/status"))
                .unwrap_or_default()
                .contains("State:\tZ"),
        "the command's background process {bg} survived"
    );
    c.repair();
}

fn now_s() -> f64 {
    crate::support::util::now_s()
}

/// The store of a 1-member cluster `c` under a fresh prefix, with short deadlines and a retry
/// bound of `unavailable`.
fn library_store(c: &Cluster, unavailable: Duration) -> cachelock::lock::etcd::EtcdStore {
    use std::sync::atomic::AtomicUsize;
    static N: AtomicUsize = AtomicUsize::new(0);
    let prefix = format!(
        "lib{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    let mut store = cachelock::lock::etcd::EtcdStore::from_url(&c.url(&prefix)).unwrap();
    store.lease_ttl = Duration::from_secs(2);
    store.request_timeout = Duration::from_millis(300);
    store.unavailable_timeout = unavailable;
    store
}

/// A library user who takes and drops an etcd lock inside a tokio runtime of their own gets no
/// panic (issue 19, defect 7): the backend's calls run on a thread of their own there.
#[test]
fn a_lock_taken_and_dropped_inside_a_callers_runtime() {
    use cachelock::lock::{self, Acquired, Options};
    let store = library_store(shared(), Duration::from_secs(8));
    let backend = cachelock::lock::etcd::EtcdBackend::connect(&store).unwrap();
    let signals = cachelock::process::Signals::install().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let generation = rt.block_on(async {
        let mut policy = cachelock::policy::native::DefaultPolicy;
        match lock::acquire(&backend, &Options::new("rt"), &mut policy, &signals).unwrap() {
            Acquired::Held(g) => g.generation(),
            Acquired::FellBack { .. } => unreachable!(),
        }
    });
    let state = rt.block_on(async { cachelock::lock::Backend::state(&backend, "rt").unwrap() });
    assert_eq!(state.generation, generation);
    assert!(state.tickets.holders.is_empty() && state.tickets.waiters.is_empty());
}

/// Dropping a request whose cluster is gone does not wait for the whole retry bound (issue 19,
/// defect 7): one attempt, then the lease expires by itself. Here the bound is 10 minutes; a
/// drop that waited for it would hold the test past its 60 s watchdog.
#[test]
fn a_drop_does_not_wait_for_a_cluster_that_is_gone() {
    let c = Cluster::start("drop", 1, false);
    c.wait_healthy();
    let store = library_store(&c, Duration::from_secs(600));
    let backend = cachelock::lock::etcd::EtcdBackend::connect(&store).unwrap();
    let queued =
        cachelock::lock::Backend::enqueue(&backend, &cachelock::lock::Options::new("d")).unwrap();
    c.kill(0);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(queued);
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the drop returned");
}

/// The key prefix of `e`'s store.
fn prefix_of(e: &EtcdEnv) -> String {
    e.url.rsplit('/').next().unwrap().to_string()
}

/// An attacker (an ordinary client of the prefix) takes a held lock away: it deletes the holder
/// key, or revokes the holder's lease (`revoke`), while the holder's cachelock runs or is frozen
/// (`freeze`: it cannot hear of it, and only its guardian's deadline stops the command). The
/// holder's command writes a heartbeat until it is stopped; the waiter's command records when
/// it started and whether the first command was still alive then. No overlap: the first
/// command is gone and its last heartbeat came before the waiter started; the first cachelock
/// exits 75.
fn holder_taken_away(test: &str, revoke: bool, freeze: bool) {
    let c = shared();
    let e = EtcdEnv::new(c, test);
    let (pidfile, beats, log) = (
        e.env.path("cmd.pid"),
        e.env.path("beats"),
        e.env.path("succ"),
    );
    let script = format!(
        "echo $$ > {pid}; while :; do echo $EPOCHREALTIME >> {beats}; read -t 0.01 <> {fifo}; done",
        pid = pidfile.display(),
        beats = beats.display(),
        fifo = e.env.path("fifo").display()
    );
    let mut h = e.spawn(&["run", "-q", test, "--", "bash", "-c", &script]);
    let cmd_pid: i32 = wait_for_lines(&pidfile, 1)[0].parse().unwrap();
    let check = format!(
        "s=$EPOCHREALTIME; if [ -e /proc/{cmd_pid} ] && ! grep -q '^State:.*Z' /proc/{cmd_pid}/status; then echo alive $s >> {log}; else echo gone $s >> {log}; fi",
        log = log.display()
    );
    let mut w = e.spawn(&["run", "-q", test, "--", "bash", "-c", &check]);
    e.wait_tickets(test, 2);
    if freeze {
        h.signal(libc::SIGSTOP);
    }
    let holders = format!("{}/l/{test}/h/", prefix_of(&e));
    let out = if revoke {
        let out = c.etcdctl(&["get", "--prefix", &holders, "-w", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("etcdctl JSON");
        let lease = v["kvs"][0]["lease"]
            .as_i64()
            .expect("a holder key on a lease");
        c.etcdctl(&["lease", "revoke", &format!("{lease:x}")])
    } else {
        c.etcdctl(&["del", "--prefix", &holders])
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(w.wait(), 0, "{}", w.stderr());
    let line = wait_for_lines(&log, 1)[0].clone();
    let (state, start) = line.split_once(' ').unwrap();
    let last_beat: f64 = std::fs::read_to_string(&beats)
        .unwrap()
        .lines()
        .filter_map(|l| l.parse().ok())
        .fold(0.0, f64::max);
    assert_eq!(
        state, "gone",
        "the first command still ran when the waiter got in"
    );
    assert!(
        last_beat < start.parse::<f64>().unwrap(),
        "overlap: the first command's last heartbeat {last_beat} after the second started {start}"
    );
    if freeze {
        h.signal(libc::SIGCONT);
    }
    let code = h.wait();
    let err = h.stderr();
    assert_eq!(code, 75, "{err}");
    assert!(err.contains("was lost while the command ran"), "{err}");
    e.wait_tickets(test, 0);
}

#[test]
fn a_deleted_holder_key_stops_the_holder_before_the_next_one_starts() {
    holder_taken_away("delkey", false, false);
}

#[test]
fn a_revoked_holder_lease_stops_the_holder_before_the_next_one_starts() {
    holder_taken_away("revoke", true, false);
}

#[test]
fn a_frozen_holder_whose_key_is_deleted_is_waited_out() {
    holder_taken_away("delfrozen", false, true);
}

/// A SIGKILLed holder's guardian stops the command's tree, then releases the lock with a
/// record, as a release: the next waiter is served at once — not when the lease expires (60 s
/// here, beyond the 30 s this test waits) nor after a vanished holder's stop window — and only
/// once the first command is gone. Prints the hand-off times (SIGKILL to the next command's
/// start) for the benchmark note.
#[test]
fn a_sigkilled_holders_guardian_releases_for_the_next_waiter() {
    let e = EtcdEnv::with_config(
        shared(),
        "orphan",
        "etcd:\n  lease_ttl: 60\n  request_timeout: 0.5\n  unavailable_timeout: 8\n",
    );
    let log = e.env.path("orphan.log");
    let mut handoffs = Vec::new();
    for round in 0..5 {
        let pidfile = e.env.path(&format!("cmd{round}.pid"));
        let script = format!("echo $$ > {}; exec sleep 600", pidfile.display());
        let mut h = e.spawn(&["run", "-q", "orphan", "--", "bash", "-c", &script]);
        let cmd_pid: i32 = wait_for_lines(&pidfile, 1)[0].parse().unwrap();
        let check = format!(
            "s=$EPOCHREALTIME; if [ -e /proc/{cmd_pid} ] && ! grep -q '^State:.*Z' /proc/{cmd_pid}/status; then echo alive $s >> {log}; else echo gone $s >> {log}; fi",
            log = log.display()
        );
        let mut w = e.spawn(&["run", "-q", "orphan", "--", "bash", "-c", &check]);
        e.wait_tickets("orphan", 2);
        let killed_at = now_s();
        h.signal(libc::SIGKILL); // cachelock only: its guardian stops the command and releases
        assert_eq!(w.wait(), 0, "{}", w.stderr());
        h.wait();
        let line = wait_for_lines(&log, round + 1)[round].clone();
        let (state, start) = line.split_once(' ').unwrap();
        assert_eq!(state, "gone", "the killed holder's command still ran");
        handoffs.push(start.parse::<f64>().unwrap() - killed_at);
    }
    e.wait_tickets("orphan", 0);
    handoffs.sort_by(f64::total_cmp);
    eprintln!(
        "a_sigkilled_holders_guardian_releases_for_the_next_waiter: hand-off {:.3} s median, {handoffs:.3?}",
        handoffs[handoffs.len() / 2]
    );
}

/// An attacker writes 2^64−1, garbage and 0 to a lock's `gen` key between acquisitions: the
/// generations handed to the commands still strictly increase — they are the grants' etcd
/// revisions, which no client chooses — and neither wrap to 0 nor restart at 1; `status`
/// shows at least the latest.
#[test]
fn a_forged_generation_key_cannot_make_a_fencing_token_repeat() {
    let c = shared();
    let e = EtcdEnv::new(c, "forge");
    let log = e.env.path("forge.log");
    let gen_key = format!("{}/l/forge/gen", prefix_of(&e));
    let section = format!("echo $CACHELOCK_GENERATION >> {}", log.display());
    let forged = [
        None,
        Some("18446744073709551615"),
        Some("garbage"),
        Some("0"),
        Some("18446744073709551615"),
    ];
    for v in forged {
        if let Some(v) = v {
            let out = c.etcdctl(&["put", &gen_key, v]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let out = e.run(&["-q", "forge", "--", "bash", "-c", &section]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let gens: Vec<u64> = wait_for_lines(&log, forged.len())
        .iter()
        .map(|l| l.parse().expect("a generation"))
        .collect();
    assert_eq!(gens.len(), forged.len());
    assert!(gens.windows(2).all(|w| w[1] > w[0]), "{gens:?}");
    assert!(gens[0] > 1, "{gens:?}");
    let st = e.status_json(Some("forge"));
    assert!(
        st["locks"][0]["generation"].as_u64().unwrap() >= gens[gens.len() - 1],
        "{st}"
    );
}

/// `etcdctl put KEY` with the value on its standard input (larger than an argument may be).
fn put_large(c: &Cluster, key: &str, value: &[u8]) {
    use std::io::Write;
    let mut p = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", c.endpoints()))
        .args(["put", key])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("etcdctl");
    p.stdin.take().unwrap().write_all(value).unwrap();
    assert!(p.wait().unwrap().success(), "etcdctl put {key}");
}

/// The unreadable entries `status --json` names for `lock`.
fn unreadable(e: &EtcdEnv, lock: &str) -> Vec<String> {
    let st = e.status_json(Some(lock));
    st["locks"][0]["unreadable"]
        .as_array()
        .map(|v| {
            v.iter()
                .map(|u| u["ticket"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// An attacker's junk value under the holder range blocked every grant while the lock looked
/// free: the grant passes over it (it compares that no holder came since its read, not that
/// the range is empty) and `status` names it.
#[test]
fn a_junk_holder_key_blocks_no_grant_and_is_named() {
    let c = shared();
    let e = EtcdEnv::new(c, "junk");
    let key = format!("{}/l/junk/h/000/x/evil", prefix_of(&e));
    let out = c.etcdctl(&["put", &key, "garbage"]);
    assert!(out.status.success());
    let out = e.run(&["-w", "20", "junk", "--", "true"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(unreadable(&e, "junk"), ["h/000/x/evil"]);
}

/// ~6.6 MB of values in one lock's queue (six of 1.1 MB, under etcd's 1.5 MiB request limit)
/// and a garbage ticket made every `run` and `status` fail on the client's 4 MiB message
/// limit: reads are paged, the lock is served, and `status` names each entry it cannot use.
#[test]
fn megabytes_of_junk_in_a_queue_are_paged_over_and_named() {
    let c = shared();
    let e = EtcdEnv::new(c, "big");
    let q = format!("{}/l/big/q/", prefix_of(&e));
    let big = vec![b'x'; 1_100_000];
    for i in 0..6 {
        put_large(c, &format!("{q}big{i}"), &big);
    }
    put_large(c, &format!("{q}garbage"), b"{not json");
    let out = e.run(&["-w", "20", "big", "--", "true"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names = unreadable(&e, "big");
    names.sort();
    let mut want: Vec<String> = (0..6).map(|i| format!("q/big{i}")).collect();
    want.push("q/garbage".into());
    assert_eq!(names, want);
}

/// A hand-off wakes the waiter behind the new holder, not the queue: a waiter behind the head
/// watches only the ticket just ahead of it (as etcd's own lock recipe does), so the reads
/// of the queue the cluster serves per acquisition do not grow with the queue. 16 waiters
/// queue behind a holder on a private member (nothing else reads there); when it releases,
/// they are served one by one, and the reads per acquisition are counted on the member's own
/// `/metrics`. Before, every waiter read the whole queue at every change: 16 waiters took
/// about 9 reads per acquisition.
#[test]
fn a_hand_off_wakes_the_next_waiter_not_the_whole_queue() {
    let c = Cluster::start("w", 1, false);
    let e = EtcdEnv::new(&c, "wake");
    let gate = e.env.path("gate");
    let made = Command::new("mkfifo").arg(&gate).status().unwrap();
    assert!(made.success());
    let mut holder = e.spawn(&[
        "run",
        "-q",
        "wake",
        "--",
        "bash",
        "-c",
        r#"echo held > "$1"; read -r _ < "$0""#,
        gate.to_str().unwrap(),
        e.env.path("held").to_str().unwrap(),
    ]);
    wait_for_lines(&e.env.path("held"), 1);
    let n = 16;
    let mut waiters: Vec<Proc> = (0..n)
        .map(|_| e.spawn(&["run", "-q", "wake", "--", "true"]))
        .collect();
    e.wait_tickets("wake", n + 1);
    let before = c.grpc_received(Some("Range"));
    std::fs::write(&gate, "go\n").unwrap();
    assert_eq!(holder.wait(), 0, "{}", holder.stderr());
    for w in &mut waiters {
        assert_eq!(w.wait(), 0, "{}", w.stderr());
    }
    let reads = c.grpc_received(Some("Range")) - before;
    let per = reads / n as f64;
    eprintln!("a_hand_off_wakes_the_next_waiter_not_the_whole_queue: {reads} reads for {n} acquisitions ({per:.2} each)");
    assert!(
        per <= 4.0,
        "{reads} reads of the queue for {n} acquisitions: hand-offs wake more than the next waiter"
    );
}
