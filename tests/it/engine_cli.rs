//! `cachelock run` and `cachelock status` through the real binary: exit codes, environment,
//! -n/-w/-E, signals, progress lines, status text/JSON and every bad input.

use std::time::{Duration, Instant};

use crate::support::util::*;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Spawns a holder of `lock` that keeps it until `go` exists.
fn hold_until(env: &Env, lock: &str, go: &str, extra: &[&str]) -> Proc {
    let script = format!(
        "while [ ! -e {go} ]; do read -t 0.01 <> {fifo}; done; exit 0",
        go = env.path(go).display(),
        fifo = env.path("fifo").display()
    );
    let mut args = vec!["run", "-q"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[lock, "--", "bash", "-c", &script]);
    let p = env.spawn(&args);
    env.wait_tickets(lock, 1);
    p
}

#[test]
fn exit_codes_and_environment() {
    let env = Env::new();
    assert_eq!(
        env.run(&["e", "--", "sh", "-c", "exit 7"]).status.code(),
        Some(7)
    );
    assert_eq!(
        env.run(&["e", "--", "sh", "-c", "kill -9 $$"])
            .status
            .code(),
        Some(128 + 9)
    );
    let o = env.run(&["e", "--", "/nonexistent/command"]);
    assert_eq!(o.status.code(), Some(127), "{}", stderr(&o));
    assert!(stderr(&o).contains("not found"), "{}", stderr(&o));
    let noexec = env.path("noexec.sh");
    std::fs::write(&noexec, "#!/bin/sh\necho hi\n").unwrap();
    let o = env.run(&["e", "--", noexec.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(126), "{}", stderr(&o));

    let show = "echo \"$CACHELOCK_LOCK|$CACHELOCK_TICKET|$CACHELOCK_GENERATION|$CACHELOCK_SLOT\"";
    let a = env.run(&["env-lock", "--", "sh", "-c", show]);
    let b = env.run(&["env-lock", "--", "sh", "-c", show]);
    let parse = |o: &std::process::Output| -> Vec<String> {
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .split('|')
            .map(str::to_string)
            .collect()
    };
    let (a, b) = (parse(&a), parse(&b));
    assert_eq!(a[0], "env-lock");
    assert!(!a[1].is_empty() && a[1] != b[1], "tickets {a:?} {b:?}");
    let (ga, gb): (u64, u64) = (a[2].parse().unwrap(), b[2].parse().unwrap());
    assert_eq!(gb, ga + 1, "generation is a counter per acquisition");
    assert_eq!(a[3], "0");
    assert!(env.tickets("env-lock").is_empty());
    assert!(env.tickets("e").is_empty());
}

#[test]
fn nonblock_wait_and_conflict_code() {
    let env = Env::new();
    // The holder keeps the lock until `go`, written below: a request that waited for it would
    // never end.
    let mut holder = hold_until(&env, "nb", "go", &[]);
    let o = env.run(&["-n", "nb", "--", "touch", env.path("ran").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("held by"), "{}", stderr(&o));
    let o = env.run(&["-n", "-E", "42", "nb", "--", "true"]);
    assert_eq!(o.status.code(), Some(42));
    let o = env.run(&["-w", "0.3", "-q", "nb", "--", "true"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    // It gave up by its bound, not before.
    let waited: f64 = stderr(&o)
        .split("timed out after ")
        .nth(1)
        .and_then(|r| r.split('s').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{}", stderr(&o)));
    assert!(waited >= 0.3, "{}", stderr(&o));
    assert!(!env.path("ran").exists());
    assert_eq!(
        env.tickets("nb").len(),
        1,
        "only the holder's ticket remains"
    );
    std::fs::write(env.path("go"), "").unwrap();
    assert_eq!(holder.wait(), 0);
    let o = env.run(&["-n", "nb", "--", "true"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(env.tickets("nb").is_empty());
}

#[test]
fn bad_lock_names_touch_nothing() {
    let env = Env::new();
    let huge = "a".repeat(129);
    for name in ["../x", "/", "", "a/b", ".x", "sp ace", huge.as_str()] {
        let o = env.run(&[name, "--", "true"]);
        assert_eq!(o.status.code(), Some(64), "{name:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("invalid lock name"), "{}", stderr(&o));
        assert!(
            !env.lock_dir.exists(),
            "{name:?} created the lock directory"
        );
    }
    // Usage errors from the command line are 64 as well.
    for args in [
        &["-l", "novalue", "x", "--", "true"][..],
        &["-w", "abc", "x", "--", "true"],
        &["-w", "-1", "x", "--", "true"],
        &["x"],
    ] {
        let o = env.run(args);
        assert_eq!(o.status.code(), Some(64), "{args:?}: {}", stderr(&o));
    }
    let o = env.cmd().args(["status", "../x"]).output().unwrap();
    assert_eq!(o.status.code(), Some(64));
    assert!(!env.lock_dir.exists());
}

#[test]
fn yaml_error_names_file_line_and_key() {
    let env = Env::with_config("lock_dir: /tmp/x\nlocks:\n  - match: '*'\n    polcy: default\n");
    let o = env.run(&["y", "--", "true"]);
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains(env.config.to_str().unwrap()), "{e}");
    assert!(e.contains("line 4"), "{e}");
    assert!(e.contains("polcy"), "{e}");
    let o = env
        .cmd()
        .args(["run", "--config", "/nonexistent.yaml", "y", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
}

#[test]
fn uncreatable_lock_dir_is_73() {
    let env = Env::new();
    let file = env.path("plainfile");
    std::fs::write(&file, "").unwrap();
    let o = env
        .cmd()
        .env("CACHELOCK_LOCK_DIR", file.join("locks"))
        .args(["run", "x", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(73), "{}", stderr(&o));
    assert!(stderr(&o).contains("lock directory"), "{}", stderr(&o));
    // --lock-dir wins over the environment.
    let o = env
        .cmd()
        .env("CACHELOCK_LOCK_DIR", file.join("locks"))
        .args([
            "run",
            "--lock-dir",
            env.path("ok").to_str().unwrap(),
            "x",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn symlinked_lock_file_is_refused() {
    let env = Env::new();
    let base = env.lock_dir.join("sym.lock");
    std::fs::create_dir_all(&base).unwrap();
    let target = env.path("target");
    std::fs::write(&target, "precious").unwrap();
    std::os::unix::fs::symlink(&target, base.join("lock")).unwrap();
    let marker = env.path("ran");
    let o = env.run(&["sym", "--", "touch", marker.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(74), "{}", stderr(&o));
    assert!(stderr(&o).contains("symbolic link"), "{}", stderr(&o));
    assert!(!marker.exists(), "the command ran without the lock");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
    assert!(
        env.tickets("sym").is_empty(),
        "a failed request left its ticket"
    );
    // A symlinked lock state directory is refused too.
    std::fs::create_dir_all(env.path("elsewhere")).unwrap();
    std::os::unix::fs::symlink(env.path("elsewhere"), env.lock_dir.join("sym2.lock")).unwrap();
    let o = env.run(&["sym2", "--", "true"]);
    assert_eq!(
        o.status.code(),
        Some(73),
        "a symlinked lock directory cannot be created (73, as documented): {}",
        stderr(&o)
    );
}

#[test]
fn signals_reach_the_command_and_leave_no_ticket() {
    let env = Env::new();
    let started = env.path("started");
    let got = env.path("got");
    let script = format!(
        "trap 'echo > {got}; exit 5' TERM INT; echo > {started}; while :; do read -t 0.02 <> {fifo}; done",
        got = got.display(),
        started = started.display(),
        fifo = env.path("fifo").display()
    );
    for (sig, name) in [(libc::SIGTERM, "TERM"), (libc::SIGINT, "INT")] {
        let _ = std::fs::remove_file(&started);
        let _ = std::fs::remove_file(&got);
        let mut p = env.spawn(&["run", "-q", "sig", "--", "bash", "-c", &script]);
        let t0 = Instant::now();
        while !started.exists() {
            assert!(t0.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(5));
        }
        p.signal(sig);
        assert_eq!(
            p.wait(),
            5,
            "SIG{name}: cachelock exits with the command's code"
        );
        assert!(got.exists(), "SIG{name} did not reach the command");
        assert!(env.tickets("sig").is_empty(), "SIG{name} left a ticket");
    }
    // While waiting: the ticket is removed and the exit code is 128+N.
    let mut holder = hold_until(&env, "sigw", "go", &[]);
    for (sig, code) in [
        (libc::SIGINT, 130),
        (libc::SIGTERM, 143),
        (libc::SIGHUP, 129),
    ] {
        let marker = env.path("waiter-ran");
        let mut w = env.spawn(&["run", "-q", "sigw", "--", "touch", marker.to_str().unwrap()]);
        env.wait_tickets("sigw", 2);
        w.signal(sig);
        assert_eq!(w.wait(), code);
        assert!(!marker.exists());
        assert_eq!(env.tickets("sigw").len(), 1, "the waiter's ticket is gone");
    }
    std::fs::write(env.path("go"), "").unwrap();
    assert_eq!(holder.wait(), 0);
}

/// Ctrl-C at a terminal reaches the command once, as under flock(1): the terminal signals the
/// whole foreground process group, so cachelock must not forward it again (terraform and
/// others force-quit on a second SIGINT). A SIGTERM sent to cachelock alone is forwarded.
#[test]
fn ctrl_c_reaches_the_command_once() {
    let env = Env::new();
    let log = env.path("signals.log");
    let script = format!(
        "trap 'echo INT >> {log}' INT; trap 'echo TERM >> {log}; exit 3' TERM; \
         echo ready >> {log}; while :; do read -t 0.02 <> {fifo}; done",
        log = log.display(),
        fifo = env.path("fifo").display()
    );
    let mut term = Terminal::open();
    let mut p = term.spawn(
        env.cmd()
            .args(["run", "-q", "ctrlc", "--", "bash", "-c", &script]),
    );
    let lines = |n: usize| wait_for_lines(&log, n);
    assert_eq!(lines(1), ["ready"]);
    term.type_ctrl_c();
    assert_eq!(lines(2), ["ready", "INT"]);
    // Any forwarded copy of the SIGINT would be delivered before this SIGTERM, which cachelock
    // receives after the command has handled the terminal's SIGINT.
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait(), 3, "cachelock exits with the command's code");
    assert_eq!(
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .collect::<Vec<_>>(),
        ["ready", "INT", "TERM"],
        "the command got the terminal's SIGINT once and the forwarded SIGTERM"
    );
    assert!(env.tickets("ctrlc").is_empty());
}

/// A signal sent to cachelock's whole process group — what a CI runner does to cancel a job
/// (`kill -INT -- -PGID`) — reaches the command exactly once (issue 19, defect 10): the command
/// runs in a process group of its own, so only cachelock gets it, and forwards it once. Six
/// times over: a second copy used to arrive in about half the runs.
#[test]
fn a_signal_to_the_whole_process_group_reaches_the_command_once() {
    let env = Env::new();
    for i in 0..6 {
        let log = env.path(&format!("group{i}.log"));
        let script = format!(
            "trap 'echo INT >> {log}' INT; trap 'echo TERM >> {log}; exit 3' TERM; \
             echo ready >> {log}; while :; do read -t 0.02 <> {fifo}; done",
            log = log.display(),
            fifo = env.path("fifo").display()
        );
        // In a process group of its own, as a CI runner starts a job.
        let mut p = env.spawn(&["run", "-q", "grp", "--", "bash", "-c", &script]);
        assert_eq!(wait_for_lines(&log, 1), ["ready"]);
        p.signal_group(libc::SIGINT);
        assert_eq!(wait_for_lines(&log, 2), ["ready", "INT"]);
        // A forwarded second copy of the SIGINT would come before this SIGTERM's.
        p.signal(libc::SIGTERM);
        assert_eq!(p.wait(), 3);
        assert_eq!(
            std::fs::read_to_string(&log)
                .unwrap()
                .lines()
                .collect::<Vec<_>>(),
            ["ready", "INT", "TERM"],
            "run {i}: the group's SIGINT once, then the forwarded SIGTERM"
        );
    }
    assert!(env.tickets("grp").is_empty());
}

/// The state letter of process `pid` (`T` when stopped).
fn proc_state(pid: i32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
        .unwrap_or('?')
}

/// Ctrl-Z at a terminal stops the command and cachelock with it, as a shell's job; continued,
/// the command has the terminal again (a Ctrl-C reaches it) and cachelock ends with its code.
#[test]
fn ctrl_z_stops_the_job_and_a_continue_gives_it_the_terminal_again() {
    let env = Env::new();
    let log = env.path("tstp.log");
    let script = format!(
        "trap 'echo INT >> {log}; exit 4' INT; echo $$ >> {log}; \
         while :; do read -t 0.02 <> {fifo}; done",
        log = log.display(),
        fifo = env.path("fifo").display()
    );
    let mut term = Terminal::open();
    let mut p = term.spawn(
        env.cmd()
            .args(["run", "-q", "tstp", "--", "bash", "-c", &script]),
    );
    let command: i32 = wait_for_lines(&log, 1)[0].parse().unwrap();
    term.type_char(0x1a);
    let stopped = |pid: i32| {
        let t0 = std::time::Instant::now();
        while proc_state(pid) != 'T' {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{pid} never stopped"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    stopped(command);
    stopped(p.pid());
    // What a shell's `fg` sends.
    p.signal_group(libc::SIGCONT);
    let t0 = std::time::Instant::now();
    while proc_state(command) == 'T' {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the command was not continued"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    term.type_ctrl_c();
    assert_eq!(p.wait(), 4);
    assert_eq!(wait_for_lines(&log, 2)[1], "INT");
    assert!(env.tickets("tstp").is_empty());
}

#[test]
fn progress_lines_name_holder_and_position() {
    let env = Env::with_config("progress_interval: 0.2\n");
    let mut holder = hold_until(&env, "prog", "go", &[]);
    let err = env.path("waiter.err");
    let mut w = Proc(Some(
        env.cmd()
            .args(["run", "prog", "--", "true"])
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap(),
    ));
    env.wait_tickets("prog", 2);
    let mut q = env.spawn(&["run", "-q", "prog", "--", "true"]);
    env.wait_tickets("prog", 3);
    // The start line and at least one repeat (every 0.2 s) before the lock is freed.
    let lines = wait_for_lines(&err, 2);
    std::fs::write(env.path("go"), "").unwrap();
    assert_eq!(holder.wait(), 0);
    assert_eq!(w.wait(), 0);
    assert_eq!(q.wait(), 0);
    let e = std::fs::read_to_string(&err).unwrap();
    assert!(
        lines.iter().all(|l| l.contains("waiting for lock prog")),
        "{e}"
    );
    let hp = format!(":{} (ticket ", holder.pid());
    assert!(
        lines[0].contains(&hp),
        "names the holder host:pid and ticket: {e}"
    );
    assert!(lines[0].contains("position 1 of"), "{e}");
    assert!(e.contains("acquired lock prog after waiting"), "{e}");
    assert!(q.stderr().is_empty(), "-q prints nothing");
    // No wait, no line.
    let o = env.run(&["prog", "--", "true"]);
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
}

#[test]
fn status_text_and_json() {
    let env = Env::new();
    let o = env.cmd().args(["status"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "no locks");
    assert!(!env.lock_dir.exists(), "status creates nothing");

    let mut holder = hold_until(&env, "st", "go", &["-l", "team=a", "-k", "job1", "-p", "3"]);
    let mut w0 = env.spawn(&["run", "-q", "-p", "0", "st", "--", "true"]);
    env.wait_tickets("st", 2);
    let mut w5 = env.spawn(&[
        "run", "-q", "-p", "5", "-s", "-l", "x=y", "st", "--", "true",
    ]);
    env.wait_tickets("st", 3);
    let doc = env.status_json(None);
    let locks = doc["locks"].as_array().unwrap();
    assert_eq!(locks.len(), 1);
    let l = &locks[0];
    assert_eq!(l["name"], "st");
    assert!(l["generation"].as_u64().unwrap() >= 1);
    let h = &l["holders"][0];
    assert_eq!(h["pid"].as_i64().unwrap(), holder.pid() as i64);
    assert_eq!(h["mode"], "exclusive");
    assert_eq!(h["priority"], 3);
    assert_eq!(h["labels"]["team"], "a");
    assert_eq!(h["queue_key"], "job1");
    assert_eq!(h["slot"], 0);
    assert!(h["held_for_ms"].as_u64().is_some());
    assert!(h["host"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(h["ticket"].as_str().is_some());
    let w = l["waiters"].as_array().unwrap();
    assert_eq!(w.len(), 2);
    assert_eq!(w[0]["position"], 1);
    assert_eq!(w[0]["pid"].as_i64().unwrap(), w5.pid() as i64);
    assert_eq!(w[0]["mode"], "shared");
    assert_eq!(w[0]["rank"], 5);
    assert_eq!(w[0]["labels"]["x"], "y");
    assert_eq!(w[1]["position"], 2);
    assert_eq!(w[1]["pid"].as_i64().unwrap(), w0.pid() as i64);
    assert_eq!(w[1]["rank"], 0);
    assert!(w[1]["waited_ms"].as_u64().is_some());
    assert!(w[1]["queue_key"].is_null());

    let o = env.cmd().args(["status", "st"]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("lock st (generation"), "{text}");
    assert!(text.contains(&format!(":{}", holder.pid())), "{text}");
    assert!(text.contains("labels team=a"), "{text}");
    let p5 = text.find(&format!(":{}", w5.pid())).unwrap();
    let p0 = text.find(&format!(":{}", w0.pid())).unwrap();
    assert!(p5 < p0, "waiters in serving order: {text}");
    // Status took nothing: everyone still waits, the holder still holds.
    assert_eq!(env.tickets("st").len(), 3);
    std::fs::write(env.path("go"), "").unwrap();
    assert_eq!(holder.wait(), 0);
    assert_eq!(w5.wait(), 0);
    assert_eq!(w0.wait(), 0);
    let doc = env.status_json(Some("st"));
    assert!(doc["locks"][0]["holders"].as_array().unwrap().is_empty());
    assert!(doc["locks"][0]["waiters"].as_array().unwrap().is_empty());
}

/// Every command that prints ends quietly when its reader is gone (`cachelock ... | head`):
/// killed by SIGPIPE or done, never a panic or an error message (issue 19, defect 9).
#[test]
fn every_printing_command_ends_quietly_on_a_closed_pipe() {
    use std::os::unix::process::ExitStatusExt;
    let env = Env::new();
    assert!(env.run(&["quiet", "--", "true"]).status.success());
    let scenario = env.path("s.yaml");
    let mut text = String::from("arrivals:\n");
    for i in 0..50 {
        text.push_str(&format!("  - {{id: a{i}, at_ms: {i}, hold_ms: 10}}\n"));
    }
    std::fs::write(&scenario, text).unwrap();
    let scenario = scenario.display().to_string();
    let commands: [&[&str]; 8] = [
        &["status"],
        &["status", "--json"],
        &["policy", "list"],
        &["policy", "check", "builtin:default"],
        &[
            "policy",
            "simulate",
            "--policy",
            "builtin:default",
            "--scenario",
            &scenario,
        ],
        &[
            "policy",
            "simulate",
            "--json",
            "--policy",
            "builtin:default",
            "--scenario",
            &scenario,
        ],
        &["completions", "bash"],
        &["man"],
    ];
    for args in commands {
        let mut child = env
            .cmd()
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The reader is gone before anything is written.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let quiet = out.status.success() || out.status.signal() == Some(libc::SIGPIPE);
        assert!(
            quiet && out.stderr.is_empty(),
            "{args:?}: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
