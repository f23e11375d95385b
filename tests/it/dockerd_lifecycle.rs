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

/// The descriptors of `pid` open on files whose paths end with each of `ends`, duplicated
/// into this process (`pidfd_getfd`: as root), in that order.
fn steal_fds(pid: i32, ends: &[&str]) -> Vec<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain system calls on integers; results are checked.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    let mut out = Vec::new();
    for end in ends {
        let fd = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .find(|e| {
                std::fs::read_link(e.path())
                    .map(|t| t.to_string_lossy().ends_with(end))
                    .unwrap_or(false)
            })
            .unwrap_or_else(|| panic!("dockerd {pid} has no descriptor on *{end}"))
            .file_name()
            .to_string_lossy()
            .parse::<i32>()
            .unwrap();
        // SAFETY: as above.
        let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) } as i32;
        assert!(dup >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor of ours.
        out.push(unsafe { std::os::fd::OwnedFd::from_raw_fd(dup) });
    }
    // SAFETY: ours.
    unsafe { libc::close(pidfd) };
    out
}

/// A SIGKILLed wrapper's dockerd stops by itself (parent-death signal), and the next run on
/// the same cache id starts cleanly and sweeps the dead run's instance directory. That sweep
/// used to run before the next run took the cache id's lock, so a straggler of the killed tree
/// still exiting (holding the tree marker, and the lock) made it keep the directory (a
/// fresh-clone CI failure). Here the straggler is played deterministically: this test holds
/// copies of the dead dockerd's lock and marker descriptors until the next run waits in the
/// queue; the next run may only sweep, and run, once they are gone.
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
    let dockerd = env.dockerds_on(&root);
    assert_eq!(dockerd.len(), 1);
    let straggler = steal_fds(dockerd[0], &["/tree", "crash.lock/lock"]);
    let _ = k.0.as_mut().unwrap().kill();
    let _ = k.0.as_mut().unwrap().wait();
    // The parent-death signal stops dockerd (and its container) on its own.
    let left = env.wait_clean(Duration::from_secs(30));
    assert!(
        left.is_empty(),
        "still running 30 s after SIGKILL: {left:?}"
    );
    let mut second = Killer(Some(env.spawn_dockerd(
        &[
            "--cache-id",
            "crash",
            "--load",
            tar.to_str().unwrap(),
            "-w",
            "60",
        ],
        "docker run --rm bb:1 echo second-run-ok",
    )));
    // The second run waits in the queue (its live ticket: the killed run's is still there).
    let second_pid = second.0.as_ref().unwrap().id() as u64;
    let t = Instant::now();
    loop {
        let o = env
            .cmd()
            .args(["status", "--json", "crash"])
            .output()
            .unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        let waiting = doc["locks"][0]["waiters"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w["pid"].as_u64() == Some(second_pid)));
        if waiting {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the second run never queued"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The straggler exits.
    drop(straggler);
    let o = second.0.take().unwrap().wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("second-run-ok"));
    // The crashed run's instance directory (pidfile, socket, log) was swept by the second.
    let left: Vec<_> = std::fs::read_dir(&env.run_dir).unwrap().flatten().collect();
    assert!(left.is_empty(), "{left:?}");
    env.assert_clean();
}

/// The stop grace is honoured: a dockerd that takes its time to stop after SIGTERM is waited
/// for (here until the test lets it go), not killed.
#[test]
fn stop_grace_is_waited_out() {
    let env = Env::new(&format!(
        "  binary: {}\n  stop_grace_max: 600",
        fixture("stop-on-release.sh").display()
    ));
    let state = env.path("state");
    let release = env.path("state.release");
    let c = std::ffi::CString::new(release.to_str().unwrap()).unwrap();
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut k = Killer(Some(
        env.cmd()
            .env("FAKE_DOCKERD_STATE", &state)
            .args(["dockerd", "--cache-id", "grace", "--", "true"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let term = env.path("state.term");
    let t = Instant::now();
    while !term.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no SIGTERM to dockerd"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        k.0.as_mut().unwrap().try_wait().unwrap().is_none(),
        "cachelock returned while dockerd was stopping"
    );
    assert!(
        !env.lock_free("grace"),
        "the lock was released while dockerd was stopping"
    );
    // Opening the FIFO for writing meets the fixture's read: dockerd may stop now.
    std::fs::write(&release, "go\n").unwrap();
    let o = k.0.take().unwrap().wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("did not stop"),
        "{}",
        text(&o)
    );
    assert!(env.lock_free("grace"));
    env.assert_clean();
}

/// Past the grace, the whole tree is killed and the lock released.
#[test]
fn stop_grace_then_kill() {
    let env = Env::new(&format!(
        "  binary: {}\n  stop_grace_max: 0.2",
        fixture("hang-on-stop.sh").display()
    ));
    let o = env.dockerd(&["--cache-id", "hang"], "true");
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("did not stop within 0.2s"), "{err}");
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
    // The default policy waits 5 s before the retry.
    assert!(
        err.contains("attempt 1 failed") && err.contains("retrying in 5000 ms"),
        "{err}"
    );
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
