//! Observability with real parts: `cachelock serve` counting a workload of known shape on a
//! lock directory and on a real etcd cluster, scraped by a real Prometheus and linted by
//! `promtool`; its dashboard in headless Chromium; `status --watch` under tmux; the request
//! log under concurrent writers; and the attacks a shared lock directory invites on the report
//! socket, played by unprivileged users. `cargo test --test it observe::` runs this area.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::etcd::{shared, EtcdEnv};
use crate::support::observe::*;
use crate::support::users::{alice, bob, wait_until, Shared};
use crate::support::util::{bin, Env, Proc};

/// A lock directory that exists (created as `run` creates it: shared, sticky) before serve
/// starts, so that serve's socket is there before the first request.
fn lock_dir(env: &Env) {
    std::fs::create_dir_all(&env.lock_dir).unwrap();
    std::fs::set_permissions(&env.lock_dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
}

/// This host's serve socket in `dir`, once serve has bound it.
fn wait_socket(dir: &Path) -> std::path::PathBuf {
    let mut found = None;
    wait_until("serve binds its report socket", || {
        found = std::fs::read_dir(dir).ok().and_then(|rd| {
            rd.flatten().map(|e| e.path()).find(|p| {
                p.file_name().is_some_and(|n| {
                    let n = n.to_string_lossy();
                    n.starts_with(".serve.") && n.ends_with(".sock")
                })
            })
        });
        found.is_some()
    });
    found.unwrap()
}

#[test]
fn serve_counts_every_request_of_a_lock_directory_and_prometheus_reads_them() {
    let env = Env::new();
    lock_dir(&env);
    let serve = Serve::start(env.cmd(), &env.path("serve.log"));
    wait_socket(&env.lock_dir);
    // Every thread of serve is a batch job (policy 3 in /proc/PID/task/TID/stat): waking to
    // count a report, it never preempts the request that sent it.
    let tasks = std::fs::read_dir(format!("/proc/{}/task", serve.proc.pid())).unwrap();
    for t in tasks.flatten() {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap();
        let policy = stat.rsplit(')').next().unwrap().split_whitespace().nth(38);
        assert_eq!(
            policy,
            Some("3"),
            "scheduling policy of thread {:?}",
            t.file_name()
        );
    }
    let [solo, busy, queue] = workload_locks("w");
    let cmd = || env.cmd();
    workload(&cmd, env.tmp.path(), "w", &mut || {
        // While 4 wait: the gauges say so.
        serve.wait_sample("cachelock_waiters", &format!("lock=\"{queue}\""), 4.0);
        serve.wait_sample("cachelock_holders", &format!("lock=\"{queue}\""), 1.0);
        let m = serve.metrics();
        assert!(
            sample(
                &m,
                "cachelock_oldest_wait_seconds",
                &format!("lock=\"{queue}\"")
            )
            .unwrap()
                >= 0.0
        );
    });
    // Every report was sent before its request exited; the last ones may still be read.
    serve.wait_sample(
        "cachelock_requests_total",
        &format!("lock=\"{queue}\",outcome=\"acquired\""),
        5.0,
    );
    let m = serve.metrics();
    check_workload_counts(&m, "w");
    assert_eq!(
        sample(&m, "cachelock_serve_reports_lost_total", ""),
        Some(0.0)
    );
    assert_eq!(
        sample(&m, "cachelock_serve_reports_refused_total", ""),
        Some(0.0)
    );
    serve.wait_sample("cachelock_waiters", &format!("lock=\"{queue}\""), 0.0);
    serve.wait_sample("cachelock_generation", &format!("lock=\"{solo}\""), 10.0);
    let digest = m
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "cachelock_policy_info{{lock=\"{busy}\",policy=\"default\",digest=\"sha256:"
            ))
        })
        .unwrap_or_else(|| panic!("no policy_info of {busy}:\n{m}"));
    assert!(digest.ends_with("} 1"), "{digest}");
    // Only the contract's label names.
    for l in m.lines().filter(|l| !l.starts_with('#')) {
        if let Some((_, labels)) = l.split_once('{') {
            for pair in labels.split("\",").filter(|p| p.contains('=')) {
                let name = pair.split('=').next().unwrap().trim_start_matches(',');
                assert!(
                    ["lock", "outcome", "policy", "digest", "cache_id", "le"].contains(&name),
                    "label {name} in {l}"
                );
            }
        }
    }
    let (ok, said) = promtool_check(&m);
    assert!(
        ok && said.trim().is_empty(),
        "promtool check metrics: {said}\n{m}"
    );
    // OpenMetrics when asked for.
    let om = get(
        serve.addr,
        "/metrics",
        &[("Accept", "application/openmetrics-text; version=1.0.0")],
    );
    assert!(om
        .header("content-type")
        .unwrap()
        .starts_with("application/openmetrics-text"));
    assert!(om.text().ends_with("# EOF\n"), "{}", om.text());
    assert!(om.text().contains("# TYPE cachelock_requests counter\n"));

    // A real Prometheus scrapes serve (it asks for OpenMetrics first) and reads the same.
    let prom = Prometheus::start(serve.addr);
    for (lock, outcome, n) in [
        (&solo, "acquired", 10.0),
        (&busy, "conflict", 3.0),
        (&busy, "timeout", 2.0),
        (&queue, "acquired", 5.0),
    ] {
        prom.wait_value(
            &format!("cachelock_requests_total{{lock=\"{lock}\",outcome=\"{outcome}\"}}"),
            n,
        );
    }
    prom.wait_value(
        &format!("cachelock_wait_seconds_count{{lock=\"{queue}\"}}"),
        5.0,
    );
    prom.wait_value(
        &format!("histogram_quantile(1, sum by (le) (cachelock_wait_seconds_bucket{{lock=\"{solo}\"}})) <= bool 1"),
        1.0,
    );
    let (health, err) = prom.target();
    assert_eq!((health.as_str(), err.as_str()), ("up", ""));
    // serve logs to stderr, and leaves on SIGTERM removing its socket.
    let mut serve = serve;
    serve.proc.signal(libc::SIGTERM);
    assert_eq!(serve.proc.wait(), 0, "{}", serve.log());
    assert!(!std::fs::read_dir(&env.lock_dir)
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with(".serve.")));
    assert!(
        serve.log().contains("counting requests reported to"),
        "{}",
        serve.log()
    );
}

#[test]
fn serve_counts_every_request_of_an_etcd_fleet() {
    let e = EtcdEnv::new(shared(), "serve");
    let serve = Serve::start(e.cmd(), &e.env.path("serve.log"));
    let cmd = || e.cmd();
    let [_, _, queue] = workload_locks("e");
    workload(&cmd, e.env.tmp.path(), "e", &mut || {
        serve.wait_sample("cachelock_waiters", &format!("lock=\"{queue}\""), 4.0);
    });
    serve.wait_sample(
        "cachelock_requests_total",
        &format!("lock=\"{queue}\",outcome=\"acquired\""),
        5.0,
    );
    let m = serve.metrics();
    check_workload_counts(&m, "e");
    let (ok, said) = promtool_check(&m);
    assert!(ok && said.trim().is_empty(), "promtool: {said}");
    // A holder whose lease expires (its process frozen) is counted as lost.
    let [solo, ..] = workload_locks("e");
    let h = Holder::start(e.cmd(), e.env.tmp.path(), &solo, &[]);
    h.proc.signal_group(libc::SIGSTOP);
    serve.wait_sample(
        "cachelock_requests_total",
        &format!("lock=\"{solo}\",outcome=\"lost\""),
        1.0,
    );
    h.proc.signal_group(libc::SIGKILL);
}

#[test]
fn the_dashboard_shows_a_waiter_come_and_go_without_a_reload() {
    let env = Env::with_config("locks:\n  - match: \"build-*\"\n    policy: priority\n");
    lock_dir(&env);
    let serve = Serve::start(env.cmd(), &env.path("serve.log"));
    wait_socket(&env.lock_dir);
    // Some history for the chart, and a second lock held.
    for i in 0..12 {
        let o = env.run(&["-q", "-l", &format!("job={i}"), "build-cache", "--", "true"]);
        assert!(o.status.success());
    }
    let _other = Holder::start(
        env.cmd(),
        env.tmp.path(),
        "release-cache",
        &["-l", "branch=main"],
    );
    let holder = Holder::start(
        env.cmd(),
        env.tmp.path(),
        "build-cache",
        &["-l", "job=41", "-p", "5"],
    );
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let profile = env.path("chromium-profile");
    let mut py = Command::new("/usr/bin/python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/support/dashboard.py"))
        .arg(format!("http://{}/", serve.addr))
        .arg("build-cache")
        .arg(&shot)
        .arg(&profile)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("/usr/bin/python3 with python3-selenium (make setup)");
    let mut to = py.stdin.take().unwrap();
    let mut from = BufReader::new(py.stdout.take().unwrap());
    let mut answer = || {
        let mut l = String::new();
        from.read_line(&mut l).unwrap();
        l.trim().to_string()
    };
    assert_eq!(answer(), "ready");
    let mut waiter = env.spawn(&[
        "run",
        "-q",
        "-l",
        "job=42",
        "-l",
        "branch=feature",
        "build-cache",
        "--",
        "true",
    ]);
    env.wait_tickets("build-cache", 2);
    let st = env.status_json(Some("build-cache"));
    let ticket = st["locks"][0]["waiters"][0]["ticket"]
        .as_str()
        .unwrap()
        .to_string();
    writeln!(to, "appears {ticket}").unwrap();
    assert_eq!(answer(), "seen");
    writeln!(to, "shot").unwrap();
    assert_eq!(answer(), "saved");
    holder.release();
    assert_eq!(waiter.wait(), 0);
    writeln!(to, "leaves {ticket}").unwrap();
    assert_eq!(answer(), "gone");
    drop(to);
    assert!(py.wait().unwrap().success());
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
}

/// tmux on a private server socket, killed on drop.
struct Tmux {
    socket: std::path::PathBuf,
}

impl Tmux {
    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-S").arg(&self.socket);
        c
    }
    /// A tmux format (`display-message -p`) for the session's pane.
    fn query(&self, format: &str) -> String {
        let o = self
            .cmd()
            .args(["display-message", "-p", "-t", "w", format])
            .output()
            .expect("tmux");
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    fn screen(&self) -> String {
        let o = self
            .cmd()
            .args(["capture-pane", "-p", "-t", "w"])
            .output()
            .expect("tmux");
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
    fn wait_screen(&self, what: &str, cond: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        let t0 = std::time::Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            last = self.screen();
            if cond(&last) {
                return last;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("tmux: {what}; the screen shows:\n{last}");
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").status();
    }
}

#[test]
fn status_watch_shows_a_new_holder_without_a_key_pressed() {
    let env = Env::new();
    let tmux = Tmux {
        socket: env.path("tmux.sock"),
    };
    let watch = format!(
        "CACHELOCK_LOCK_DIR={} CACHELOCK_CONFIG={} {} status --watch deploy",
        env.lock_dir.display(),
        env.config.display(),
        bin()
    );
    let st = tmux
        .cmd()
        .args(["new-session", "-d", "-s", "w", "-x", "160", "-y", "40"])
        .arg(&watch)
        .env("TERM", "xterm-256color")
        .env_remove("NO_COLOR")
        .status()
        .expect("tmux (make setup)");
    assert!(st.success());
    let _ = tmux
        .cmd()
        .args(["set-option", "-t", "w", "remain-on-exit", "on"])
        .status();
    // A lock nobody used yet is shown as such until it appears.
    tmux.wait_screen("no such lock yet", |s| {
        s.contains("lock deploy: no such lock")
    });
    let h = Holder::start(env.cmd(), env.tmp.path(), "deploy", &["-l", "env=prod"]);
    let screen = tmux.wait_screen("the new holder", |s| {
        s.contains("held by: ticket 000000000000")
    });
    assert!(screen.contains("labels env=prod"), "{screen}");
    assert!(
        screen.contains("(since 20"),
        "absolute time beside the duration:\n{screen}"
    );
    h.release();
    tmux.wait_screen("the holder gone", |s| s.contains("held by: nobody"));
    // Ctrl-C ends it cleanly.
    let pid = tmux.query("#{pane_pid}");
    assert!(tmux
        .cmd()
        .args(["send-keys", "-t", "w", "C-c"])
        .status()
        .unwrap()
        .success());
    // How it ended, as `dead|exit status|signal`: from tmux once it has reaped the process;
    // tmux 3.3a sometimes leaves the exited process a zombie for good (pane dead, no status:
    // seen in one run in three here), whose exit code the kernel still shows (field 52 of
    // /proc/PID/stat, in waitpid's encoding).
    let mut dead: String;
    let t0 = std::time::Instant::now();
    while !{
        dead = tmux.query("#{pane_dead}|#{pane_dead_status}|#{pane_dead_signal}");
        if dead == "1||" {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let f: Vec<&str> = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            if let (Some(&"Z"), Some(code)) =
                (f.first(), f.get(49).and_then(|c| c.parse::<i32>().ok()))
            {
                dead = match code & 0x7f {
                    0 => format!("1|{}|", (code >> 8) & 0xff),
                    sig => format!("1||{sig}"),
                };
            }
        }
        dead.starts_with("1|") && dead != "1||"
    } {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "status --watch did not exit within 30 s of Ctrl-C: tmux says {dead:?} (dead|exit status|signal), screen:\n{}",
            tmux.screen()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(dead, "1|0|", "dead|exit status|signal");
}

#[test]
fn status_watch_on_a_pipe_prints_each_new_state_in_plain_lines() {
    let env = Env::new();
    let out = env.path("watch.out");
    let mut w = {
        use std::os::unix::process::CommandExt;
        Proc(Some(
            env.cmd()
                .args(["status", "--watch", "q"])
                .stdout(std::fs::File::create(&out).unwrap())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .unwrap(),
        ))
    };
    let read = || std::fs::read_to_string(&out).unwrap_or_default();
    wait_until("the first state", || read().contains("no such lock"));
    let h = Holder::start(env.cmd(), env.tmp.path(), "q", &[]);
    wait_until("the holder", || read().contains("held by: ticket"));
    h.release();
    wait_until("the release", || read().contains("held by: nobody"));
    let text = read();
    assert!(
        !text.contains('\x1b'),
        "no cursor movement on a pipe: {text:?}"
    );
    w.signal(libc::SIGINT);
    assert_eq!(w.wait(), 0);
}

#[test]
fn status_names_a_lock_nobody_used_and_shows_times_versions_and_mixed_policies() {
    let env = Env::new();
    let o = env.cmd().args(["status", "nosuch"]).output().unwrap();
    assert_eq!(o.status.code(), Some(66));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no lock named nosuch") && err.contains("nobody has used it"),
        "{err}"
    );
    let o = env
        .cmd()
        .args(["status", "--json", "nosuch"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(66));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["locks"][0]["exists"], false);

    // Waiters of one lock running different policies: status says so.
    let h = Holder::start(env.cmd(), env.tmp.path(), "mixed", &[]);
    let _w1 = env.spawn(&[
        "run",
        "-q",
        "--policy",
        "builtin:priority",
        "mixed",
        "--",
        "true",
    ]);
    let _w2 = env.spawn(&[
        "run",
        "-q",
        "--policy",
        "builtin:deadline",
        "mixed",
        "--",
        "true",
    ]);
    env.wait_tickets("mixed", 3);
    let v = env.status_json(Some("mixed"));
    let l = &v["locks"][0];
    assert_eq!(l["mixed_policies"], true, "{l}");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    let holder = &l["holders"][0];
    assert_eq!(holder["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(holder["policy"], "default");
    assert!(holder["policy_digest"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    assert!(holder["acquired_at"].as_str().unwrap().ends_with('Z'));
    assert!(l["waiters"][0]["enqueued_at"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    let policies: Vec<&str> = l["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["policy"].as_str().unwrap())
        .collect();
    assert_eq!(
        policies,
        ["builtin:deadline", "builtin:priority", "default"]
    );
    let text =
        String::from_utf8_lossy(&env.cmd().args(["status", "mixed"]).output().unwrap().stdout)
            .into_owned();
    assert!(
        text.contains("its requests run different policies"),
        "{text}"
    );
    h.release();
}

#[test]
fn the_request_log_takes_every_line_of_many_writers_whole_and_stays_bounded() {
    let env = Env::new();
    let log = env.path("requests.jsonl");
    std::fs::write(&env.config, format!("request_log: {}\n", log.display())).unwrap();
    // 8 writers, 25 requests each, on two locks.
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let cmd = env.cmd();
            let (program, envs) = (
                cmd.get_program().to_owned(),
                cmd.get_envs()
                    .map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned())))
                    .collect::<Vec<_>>(),
            );
            std::thread::spawn(move || {
                for _ in 0..25 {
                    let mut c = Command::new(&program);
                    for (k, v) in &envs {
                        match v {
                            Some(v) => c.env(k, v),
                            None => c.env_remove(k),
                        };
                    }
                    let lock = if i % 2 == 0 { "even" } else { "odd" };
                    let o = c
                        .args([
                            "run",
                            "-q",
                            "-l",
                            &format!("writer={i}"),
                            lock,
                            "--",
                            "true",
                        ])
                        .output()
                        .unwrap();
                    assert!(o.status.success());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert_eq!(lines.len(), 200);
    let mut ids: Vec<(String, String)> = lines
        .iter()
        .map(|v| {
            (
                v["lock"].as_str().unwrap().into(),
                v["ticket"].as_str().unwrap().into(),
            )
        })
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 200, "every request once");
    for v in &lines {
        assert_eq!(v["outcome"], "acquired");
        assert!(v["waited_ms"].is_u64() && v["held_ms"].is_u64(), "{v}");
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(v["policy"], "default");
        assert!(v["digest"].as_str().unwrap().starts_with("sha256:"));
        assert_eq!(v["uid"], 0);
        assert!(v["position_at_arrival"].is_u64());
        assert!(v["labels"]["writer"].is_string());
    }

    // Why a job waited: a timeout's record says how long and what the policy last said.
    let h = Holder::start(env.cmd(), env.tmp.path(), "even", &[]);
    let o = env.run(&["-q", "-w", "0.3", "-l", "job=late", "even", "--", "true"]);
    assert_eq!(o.status.code(), Some(1));
    h.release();
    let text = std::fs::read_to_string(&log).unwrap();
    let late: serde_json::Value = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["labels"]["job"] == "late")
        .unwrap();
    assert_eq!(late["outcome"], "timeout");
    assert!(late["waited_ms"].as_u64().unwrap() >= 300, "{late}");
    assert!(late["held_ms"].is_null());
    assert_eq!(late["position_at_arrival"], 1);
    assert!(late["decisions"].as_u64().unwrap() >= 1, "{late}");
    assert_eq!(late["last_decision"]["decision"], "keep-waiting");
    assert!(late["reason"].as_str().unwrap().contains("timed out"));

    // Bounded: past 4 KiB the file is rotated, two rotated files kept.
    std::fs::write(
        &env.config,
        format!(
            "request_log: {}\nrequest_log_max_size: 4K\nrequest_log_keep: 2\n",
            log.display()
        ),
    )
    .unwrap();
    for _ in 0..40 {
        assert!(env.run(&["-q", "odd", "--", "true"]).status.success());
    }
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let (l1, l2, l3) = (
        log.with_extension("jsonl.1"),
        log.with_extension("jsonl.2"),
        log.with_extension("jsonl.3"),
    );
    assert!(size(&log) < 4096 + 2048, "{}", size(&log));
    assert!(size(&l1) > 0 && size(&l2) > 0 && !l3.exists());
    for p in [&log, &l1, &l2] {
        for l in std::fs::read_to_string(p).unwrap().lines() {
            serde_json::from_str::<serde_json::Value>(l).unwrap();
        }
    }
}

/// A unix datagram socket bound as `user` at `path` by Debian's python3, counting what it
/// receives until its stdin closes; prints the count.
fn decoy(
    user: Option<&crate::support::users::User>,
    path: &Path,
) -> (std::process::Child, std::process::ChildStdin) {
    let script = r#"
import os, select, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o666)
print("bound", flush=True)
n = 0
while True:
    r, _, _ = select.select([s, sys.stdin], [], [])
    if s in r:
        s.recv(65536); n += 1
    if sys.stdin in r and not sys.stdin.readline():
        break
print(n, flush=True)
"#;
    let mut c = match user {
        Some(u) => u.command("/usr/bin/python3"),
        None => Command::new("/usr/bin/python3"),
    };
    let mut child = c
        .args(["-c", script])
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut l = String::new();
    out.read_line(&mut l).unwrap();
    assert_eq!(l.trim(), "bound");
    child.stdout = Some(out.into_inner());
    (child, stdin)
}

fn decoy_count(child: std::process::Child, stdin: std::process::ChildStdin) -> u64 {
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
}

fn host_socket_name() -> String {
    let host = String::from_utf8(Command::new("hostname").output().unwrap().stdout).unwrap();
    format!(".serve.{}.sock", host.trim())
}

#[test]
fn requests_report_only_to_a_socket_of_root_or_their_own_user() {
    let s = Shared::new();
    std::fs::create_dir(&s.lock_dir).unwrap();
    std::fs::set_permissions(&s.lock_dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let name = s.lock_dir.join(host_socket_name());
    // bob binds the serve socket's name himself, to read other users' reports.
    let (bob_sock, bob_in) = decoy(Some(bob()), &name);
    for user in [None, Some(alice())] {
        let o = s.run(user, &["run", "-q", "l", "--", "true"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    // bob's own request does report there (so the decoy would have seen the others').
    assert!(s
        .run(Some(bob()), &["run", "-q", "l", "--", "true"])
        .status
        .success());
    assert_eq!(
        decoy_count(bob_sock, bob_in),
        2,
        "only bob's own acquisition (its arrival folded in) and end"
    );
    std::fs::remove_file(&name).unwrap();

    // bob points the name at a socket of root's (a system logger, say): root's requests do
    // not follow the link.
    let target = s.path("root-owned.sock");
    let (root_sock, root_in) = decoy(None, &target);
    let st = bob()
        .command("ln")
        .arg("-s")
        .arg(&target)
        .arg(&name)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(s
        .run(None, &["run", "-q", "l", "--", "true"])
        .status
        .success());
    assert_eq!(decoy_count(root_sock, root_in), 0);
}

#[test]
fn serve_refuses_forged_and_oversized_reports_and_counts_them() {
    let s = Shared::new();
    std::fs::create_dir(&s.lock_dir).unwrap();
    std::fs::set_permissions(&s.lock_dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let mut cmd = Command::new(bin());
    cmd.env("CACHELOCK_LOCK_DIR", &s.lock_dir)
        .env("CACHELOCK_CONFIG", "/dev/null");
    let serve = Serve::start(cmd, &s.path("serve.log"));
    let sock = wait_socket(&s.lock_dir);
    assert!(s
        .run(Some(alice()), &["run", "-q", "real", "--", "true"])
        .status
        .success());
    serve.wait_sample(
        "cachelock_requests_total",
        "lock=\"real\",outcome=\"acquired\"",
        1.0,
    );
    // bob sends garbage, an oversized datagram, a lock name that escapes the directory, and a
    // well-formed report of a lock that does not exist.
    let fake = r#"{"moment":"finished","lock":"%s","ticket":"000000000001","host":"h","pid":1,"at_ms":1,"outcome":"acquired","waited_ms":1,"held_ms":1}"#;
    let script = format!(
        r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect(sys.argv[1])
for d in [b"garbage", b"x" * 9000, {a:?}.encode(), {b:?}.encode()]:
    s.send(d)
"#,
        a = fake.replace("%s", "../etc"),
        b = fake.replace("%s", "ghost"),
    );
    let st = bob()
        .command("/usr/bin/python3")
        .args(["-c", &script])
        .arg(&sock)
        .status()
        .unwrap();
    assert!(st.success());
    serve.wait_sample("cachelock_serve_reports_refused_total", "", 4.0);
    let m = serve.metrics();
    assert!(!m.contains("ghost") && !m.contains("etc"), "{m}");
    // What bob could have done by running requests himself, he can claim: counted.
    let script = format!(
        "import socket, sys\ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\ns.connect(sys.argv[1])\ns.send({:?}.encode())\n",
        fake.replace("%s", "real")
    );
    assert!(bob()
        .command("/usr/bin/python3")
        .args(["-c", &script])
        .arg(&sock)
        .status()
        .unwrap()
        .success());
    serve.wait_sample(
        "cachelock_requests_total",
        "lock=\"real\",outcome=\"acquired\"",
        2.0,
    );
}

#[test]
fn a_hostile_http_client_blocks_neither_the_watcher_nor_other_clients() {
    let env = Env::new();
    lock_dir(&env);
    let serve = Serve::start(env.cmd(), &env.path("serve.log"));
    wait_socket(&env.lock_dir);
    let a = serve.addr;
    assert_eq!(get(a, "/nope", &[]).status, 404);
    assert_eq!(get(a, "/api/v1/locks/../../etc/passwd", &[]).status, 404);
    assert_eq!(
        raw(
            a,
            b"POST /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
        )
        .status,
        405
    );
    assert_eq!(
        raw(a, b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n").status,
        403
    );
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    assert_eq!(raw(a, huge.as_bytes()).status, 431);
    let locks = get(a, "/api/v1/locks", &[]);
    assert_eq!(locks.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&locks.body).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(get(a, "/", &[]).text().contains("/assets/app.js"));
    assert!(get(a, "/assets/app.js", &[]).text().contains("EventSource"));

    // An event stream that is never read, and every other connection slot held by clients
    // that send nothing: a newcomer is refused at once, and requests are still counted.
    let mut stream = std::net::TcpStream::connect(a).unwrap();
    stream
        .write_all(format!("GET /api/v1/events HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .unwrap();
    let idle: Vec<std::net::TcpStream> = (0..70)
        .map(|_| std::net::TcpStream::connect(a).unwrap())
        .collect();
    for _ in 0..20 {
        assert!(env.run(&["-q", "busy", "--", "true"]).status.success());
    }
    let refused = raw(
        a,
        format!("GET /metrics HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes(),
    );
    assert_eq!(refused.status, 503);
    drop(idle);
    serve.wait_sample(
        "cachelock_requests_total",
        "lock=\"busy\",outcome=\"acquired\"",
        20.0,
    );
    // The event stream got the events (it was written to, not waited for).
    let mut first = [0u8; 15];
    std::io::Read::read_exact(&mut stream, &mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200 OK");
}
