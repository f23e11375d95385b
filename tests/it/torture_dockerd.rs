//! SIGKILLs of `cachelock dockerd` mid-run, on the real dockerd: two wrappers keep contending
//! for one cache id while one of them is SIGKILLed at a random moment (waiting, starting
//! dockerd, or running the command), `CACHELOCK_TORTURE_DOCKERD_KILLS` times (default 50).
//! A monitor scanning `/proc` every few milliseconds must never see two dockerd on the data
//! root, and once everything ended no dockerd may survive.

use std::collections::HashSet;
use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::torture::*;

/// Live dockerd processes started by this test: by the test's unique environment tag (dockerd
/// inherits the wrapper's environment) or by the data root on their command line.
fn our_dockerds(tag_env: &str, data_root: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() != "dockerd" || !alive(pid) {
            continue;
        }
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let env = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let ours = String::from_utf8_lossy(&cmdline).contains(data_root)
            || env.split(|&b| b == 0).any(|kv| kv == tag_env.as_bytes());
        if ours {
            out.push(pid);
        }
    }
    // A dockerd's own children (Go forks before they exec containerd) are the same instance;
    // one whose parent can no longer be read has exited since the listing.
    let all = out.clone();
    out.retain(|&p| ppid(p).is_some_and(|pp| !all.contains(&pp)));
    out
}

/// `pid (parent PPID): command line`, for failure messages.
fn describe(pid: i32) -> String {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    format!("{pid} (parent {:?}): {}", ppid(pid), cmdline.trim())
}

/// Kills every process carrying the tag (wrappers, dockerd, containerd) if the test fails.
struct KillTagged(String);

impl Drop for KillTagged {
    fn drop(&mut self) {
        for pid in processes_with_env(&self.0) {
            // SAFETY: plain kill(2) of processes started by this test (they carry its tag).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

#[test]
fn sigkilled_dockerd_wrappers_leave_no_dockerd_and_never_two() {
    assert!(
        Path::new("/usr/sbin/dockerd").exists(),
        "this test needs the real dockerd (`make setup` installs Debian's docker.io)"
    );
    let kills_wanted: usize = std::env::var("CACHELOCK_TORTURE_DOCKERD_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let bin = Path::new(env!("CARGO_BIN_EXE_cachelock"));
    let tmp = tempfile::tempdir().unwrap();
    let cache_root = tmp.path().join("dind");
    let cfg = tmp.path().join("config.yaml");
    fs::write(
        &cfg,
        format!(
            "lock_dir: {}\ncache_root: {}\ndockerd:\n  binary: /usr/sbin/dockerd\n  network: none\n",
            tmp.path().join("locks").display(),
            cache_root.display()
        ),
    )
    .unwrap();
    let tag_env = format!("TORTURE_DOCKERD={}", tmp.path().display());
    let _guard = KillTagged(tag_env.clone());
    let data_root = cache_root.join("tt").display().to_string();
    let mut rng = Rng::from_env("sigkilled_dockerd_wrappers");

    // The monitor: never two of our dockerd at once.
    let stop = Arc::new(AtomicBool::new(false));
    let seen_two = Arc::new(Mutex::new(Vec::<Vec<String>>::new()));
    let all_seen = Arc::new(Mutex::new(HashSet::<i32>::new()));
    let monitor = {
        let (stop, seen_two, all_seen) = (stop.clone(), seen_two.clone(), all_seen.clone());
        let (tag_env, data_root) = (tag_env.clone(), data_root.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let d = our_dockerds(&tag_env, &data_root);
                all_seen.lock().unwrap().extend(d.iter().copied());
                if d.len() > 1 {
                    seen_two
                        .lock()
                        .unwrap()
                        .push(d.iter().map(|&p| describe(p)).collect());
                }
                thread::sleep(Duration::from_millis(5));
            }
        })
    };

    let spawn = || -> Child {
        Command::new(bin)
            .arg("dockerd")
            .arg("--config")
            .arg(&cfg)
            .args(["-q", "--cache-id", "tt", "--", "sleep", "1"])
            .env(
                tag_env.split_once('=').unwrap().0,
                tag_env.split_once('=').unwrap().1,
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cachelock dockerd")
    };
    let started = Instant::now();
    let mut slots: Vec<(Child, Instant, u64)> = Vec::new();
    let mut kills = 0;
    let mut completed = 0;
    let mut failures = Vec::new();
    while kills < kills_wanted && started.elapsed() < Duration::from_secs(600) {
        while slots.len() < 2 {
            // Kill somewhere in the first 2.5 s: waiting, starting dockerd, or running `sleep 1`.
            slots.push((spawn(), Instant::now(), rng.below(2500)));
        }
        thread::sleep(Duration::from_millis(10));
        let mut i = 0;
        while i < slots.len() {
            let (child, t0, kill_at) = &mut slots[i];
            if let Ok(Some(st)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                if st.success() {
                    completed += 1;
                } else {
                    failures.push(format!("a wrapper exited {st}: {}", err.trim()));
                }
                slots.remove(i);
                continue;
            }
            if t0.elapsed() >= Duration::from_millis(*kill_at) {
                let _ = child.kill();
                let _ = child.wait();
                kills += 1;
                slots.remove(i);
                continue;
            }
            i += 1;
        }
    }
    for (mut c, _, _) in slots {
        let st = c.wait().unwrap();
        if st.success() {
            completed += 1;
        } else {
            failures.push(format!("a last wrapper exited {st}"));
        }
    }
    // Every dockerd must be gone once its wrapper is (stop timeout plus margin).
    let t = Instant::now();
    let mut left = our_dockerds(&tag_env, &data_root);
    while !left.is_empty() && t.elapsed() < Duration::from_secs(45) {
        thread::sleep(Duration::from_millis(100));
        left = our_dockerds(&tag_env, &data_root);
    }
    stop.store(true, Ordering::SeqCst);
    monitor.join().unwrap();
    let others = processes_with_env(&tag_env);
    eprintln!(
        "{kills} SIGKILLs, {completed} wrappers completed, {} dockerd seen, {:.0} s",
        all_seen.lock().unwrap().len(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(kills, kills_wanted, "the run hit its 10-minute bound");
    assert!(
        seen_two.lock().unwrap().is_empty(),
        "two dockerd on one data root at once: {:?}",
        seen_two.lock().unwrap()
    );
    assert!(left.is_empty(), "dockerd survived its wrapper: {left:?}");
    assert!(
        others.is_empty(),
        "processes of this test survived (containerd? shims?): {others:?}"
    );
    assert!(
        !all_seen.lock().unwrap().is_empty(),
        "no dockerd was ever started"
    );
    assert!(completed > 0, "no wrapper ever completed its command");
    // A wrapper killed while waiting or starting is expected; one that fails on its own is not.
    assert!(failures.is_empty(), "wrappers failed: {failures:#?}");
}
