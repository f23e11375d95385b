//! `cachelock dockerd` against the real dockerd: a container runs, the lock is held by the
//! dockerd tree, signals, SIGKILL of the wrapper, stop grace, start failures and retries, and
//! time-to-ready compared with Earthly's one-second `docker ps` poll.

use std::time::{Duration, Instant};

use crate::support::dockerd::*;

#[test]
fn container_runs_and_exit_code_passes_through() {
    let env = Env::new("");
    let tar = image_tar();
    let o = env.dockerd(
        &["--cache-id", "basic", "--load", tar.to_str().unwrap()],
        r#"docker run --rm bb:1 echo hello-from-container || exit 9
           for fd in /proc/$CACHELOCK_DOCKERD_PID/fd/*; do readlink "$fd"; done | grep -q 'basic.lock/lock' || exit 8
           test "$(docker info --format '{{.DockerRootDir}}')" = "$CACHELOCK_DOCKERD_DATA_ROOT" || exit 7
           exit 42"#,
    );
    assert_eq!(o.status.code(), Some(42), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("hello-from-container"));
    assert!(
        env.cache_root.join("basic/image").is_dir(),
        "data root kept"
    );
    assert!(env.lock_free("basic"), "lock released");
    env.assert_clean();
}

#[test]
fn without_cache_id_root_is_fresh_and_wiped() {
    let env = Env::new("");
    let o = env.dockerd(
        &[],
        "echo $CACHELOCK_DOCKERD_DATA_ROOT; docker info --format '{{.Driver}}'",
    );
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let root = out.lines().next().unwrap().trim().to_string();
    assert!(root.starts_with(env.cache_root.to_str().unwrap()), "{root}");
    assert!(
        !std::path::Path::new(&root).exists(),
        "fresh root {root} not wiped"
    );
    env.assert_clean();
}

#[test]
fn sigterm_is_forwarded_then_dockerd_stops_then_lock_released() {
    let env = Env::new("");
    let flag = env.path("ready");
    let got = env.path("got");
    let child = env.spawn_dockerd(
        &["--cache-id", "sig"],
        &format!(
            "trap 'echo term > {got}; exit 5' TERM; touch {ready}; while :; do sleep 0.1; done",
            got = got.display(),
            ready = flag.display()
        ),
    );
    let mut k = Killer(Some(child));
    let t = Instant::now();
    while !flag.exists() {
        assert!(t.elapsed() < Duration::from_secs(60), "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = k.0.as_ref().unwrap().id() as i32;
    // SAFETY: signalling our child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let o = k.0.take().unwrap().wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(&got).unwrap().trim(), "term");
    // cachelock returned only after dockerd and its processes were gone.
    assert!(env.processes().is_empty(), "{:?}", env.processes());
    assert!(env.lock_free("sig"));
}

#[test]
fn sigkill_of_wrapper_leaves_no_dockerd_and_next_run_starts_cleanly() {
    let env = Env::new("");
    let tar = image_tar();
    let flag = env.path("ready");
    let child = env.spawn_dockerd(
        &["--cache-id", "crash", "--load", tar.to_str().unwrap()],
        &format!(
            "docker run -d --stop-timeout 1 bb:1 sleep 1000 >/dev/null && touch {}; sleep 1000",
            flag.display()
        ),
    );
    let mut k = Killer(Some(child));
    let t = Instant::now();
    while !flag.exists() {
        assert!(t.elapsed() < Duration::from_secs(60), "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let root = env.cache_root.join("crash");
    assert_eq!(env.dockerds_on(&root).len(), 1);
    let _ = k.0.as_mut().unwrap().kill();
    let _ = k.0.as_mut().unwrap().wait();
    let killed = Instant::now();
    // The parent-death signal stops dockerd (and its container) on its own.
    let left = env.wait_clean(Duration::from_secs(30));
    assert!(
        left.is_empty(),
        "still running 30 s after SIGKILL: {left:?}"
    );
    eprintln!("tree gone {:?} after SIGKILL", killed.elapsed());
    let o = env.dockerd(
        &[
            "--cache-id",
            "crash",
            "--load",
            tar.to_str().unwrap(),
            "-w",
            "10",
        ],
        "docker run --rm bb:1 echo second-run-ok",
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("second-run-ok"));
    // The crashed run's instance directory (pidfile, socket, log) was swept by the second.
    let left: Vec<_> = std::fs::read_dir(&env.run_dir).unwrap().flatten().collect();
    assert!(left.is_empty(), "{left:?}");
    env.assert_clean();
}

#[test]
fn stop_grace_then_kill() {
    let env = Env::new(&format!(
        "  binary: {}\n  stop_grace_max: 1.5",
        fixture("hang-on-stop.sh").display()
    ));
    let t = Instant::now();
    let o = env.dockerd(&["--cache-id", "hang"], "date +%s%N");
    let total = t.elapsed();
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("did not stop within 1.5s"), "{err}");
    let cmd_end_ns: u128 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
    let stop = (now_ns() - cmd_end_ns) as f64 / 1e9 - (t.elapsed() - total).as_secs_f64();
    assert!(
        (1.4..6.0).contains(&stop),
        "stop took {stop:.2}s, expected the 1.5 s grace plus the kill"
    );
    assert!(env.processes().is_empty(), "{:?}", env.processes());
    assert!(env.lock_free("hang"));
}

#[test]
fn crash_on_start_shows_log_tail_and_exits_69() {
    let env = Env::new(&format!("  binary: {}", fixture("crash.sh").display()));
    let o = env.dockerd(&["--cache-id", "crashstart"], "echo never");
    assert_eq!(o.status.code(), Some(69), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("dockerd exited with code 3"), "{err}");
    assert!(
        err.contains("error initializing graphdriver: boom"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&o.stdout).contains("never"));
    assert!(env.lock_free("crashstart"));
    env.assert_clean();
}

#[test]
fn containerd_timeout_line_is_retried_per_policy() {
    let env = Env::new(&format!(
        "  binary: {}",
        fixture("containerd-timeout.sh").display()
    ));
    let state = env.path("attempts");
    let t = Instant::now();
    let o = env
        .cmd()
        .env("FAKE_DOCKERD_STATE", &state)
        .args([
            "dockerd",
            "--",
            "sh",
            "-c",
            "docker version --format '{{.Server.Version}}'",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(&state).unwrap().trim(), "2");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("attempt 1 failed"), "{err}");
    // The default policy waits 5 s before the retry.
    assert!(t.elapsed() >= Duration::from_secs(5), "{:?}", t.elapsed());
    env.assert_clean();
}

/// The command starts only once the daemon answers, and learns how long that took. (How that
/// time compares with Earthly's one-second `docker ps` loop is a benchmark figure:
/// `cargo bench --bench compare -- dockerd`.)
#[test]
fn command_starts_once_the_daemon_answers_and_gets_the_ready_time() {
    let env = Env::new("  network: none");
    let o = env.dockerd(
        &[],
        "docker version --format '{{.Server.Version}}' >/dev/null && echo $CACHELOCK_DOCKERD_READY_MS",
    );
    assert!(o.status.success(), "{}", text(&o));
    let ms: f64 = String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("CACHELOCK_DOCKERD_READY_MS: {}", text(&o)));
    assert!(ms > 0.0, "ready after {ms} ms");
    env.assert_clean();
}

#[test]
fn configured_daemon_json_and_args_reach_dockerd() {
    // Arrays concatenate across the user's daemon.json and the configured settings.
    let probe = Env::new("");
    let file = write(&probe, "daemon.json", r#"{"labels": ["layer1=file"]}"#);
    let env = Env::new(&format!(
        "  daemon_json_file: {}\n  daemon_json:\n    labels: [layer2=config]\n  args: [--log-level=warn]",
        file.display()
    ));
    let o = env.dockerd(&[], "docker info --format '{{json .Labels}}'; cat /proc/$CACHELOCK_DOCKERD_PID/cmdline | tr '\\0' ' '");
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("layer1=file") && out.contains("layer2=config"),
        "{out}"
    );
    assert!(out.contains("--log-level=warn"), "{out}");
    env.assert_clean();
    drop(probe);
}
