//! Misbehaving policies consulted for real: `cachelock run` waits on a lock held by another
//! `cachelock run` process, so its policy is loaded and called. Each case must end in the
//! documented outcome within its limit, and leave the lock usable with no ticket behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::policy::{isolated_config, test_policy, BIN};

/// A lock directory with a holder process that holds until [`Held::release`] (or until this is
/// dropped): every waiter meets a held lock, however slowly its policy loads.
struct Held {
    dir: tempfile::TempDir,
    holder: Option<Child>,
    /// The holder's command reads one line from this FIFO, then exits.
    release: PathBuf,
}

impl Held {
    fn new() -> Held {
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("ready");
        let release = dir.path().join("release");
        let c = std::ffi::CString::new(release.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Opening the FIFO read-write never blocks and makes it readable before `ready`
        // exists, so a release cannot be lost.
        let holder = Command::new(BIN)
            .args(["run", "-q", "--lock-dir"])
            .arg(dir.path().join("locks"))
            .args(["l", "sh", "-c"])
            .arg(format!(
                "exec 3<>'{}'; touch '{}'; read x <&3",
                release.display(),
                ready.display()
            ))
            .env("XDG_CACHE_HOME", dir.path().join("cache"))
            .env("CACHELOCK_CONFIG", isolated_config(dir.path(), ""))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !ready.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "holder never got the lock"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Held {
            dir,
            holder: Some(holder),
            release,
        }
    }

    /// Lets the holder finish (a no-op once it has).
    fn release(&self) {
        release(&self.release);
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a configuration defining policy `p` with `body` (YAML lines under it).
    fn config(&self, body: &str) -> PathBuf {
        let path = self.path().join("config.yaml");
        std::fs::write(
            &path,
            format!(
                "policy_cache_dir: {}\npolicy_host_cache_dir: {}\npolicies:\n  p:\n{body}",
                self.path().join("cache").display(),
                self.path().join("host-cache").display()
            ),
        )
        .unwrap();
        path
    }

    /// `cachelock run [args] l true` against the held lock (a hang fails after 30 s); the
    /// holder keeps the lock throughout, so an outcome other than a success is the policy's.
    fn waiter(&self, args: &[&str]) -> Output {
        self.waiter_releasing(args, None)
    }

    /// As [`Held::waiter`], releasing the holder once the waiter's stderr shows `release_on`
    /// (the event that proves its policy was consulted).
    fn waiter_releasing(&self, args: &[&str], release_on: Option<&str>) -> Output {
        use std::io::BufRead;
        let start = Instant::now();
        let mut child = Command::new(BIN)
            .args(["run", "--lock-dir"])
            .arg(self.path().join("locks"))
            .args(args)
            .args(["l", "true"])
            .env("XDG_CACHE_HOME", self.path().join("cache"))
            .env("CACHELOCK_CONFIG", isolated_config(self.path(), ""))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (fifo, needle) = (self.release.clone(), release_on.map(str::to_string));
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut lines = std::io::BufReader::new(stderr);
            let mut line = Vec::new();
            while lines.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                if needle
                    .as_deref()
                    .is_some_and(|n| String::from_utf8_lossy(&line).contains(n))
                {
                    release(&fifo);
                }
                all.append(&mut line);
            }
            all
        });
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!("waiter did not finish within 30 s (args {args:?})");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut out = child.wait_with_output().unwrap();
        out.stderr = reader.join().unwrap();
        out
    }

    /// The lock is usable at once after the holder is gone, and no ticket is left behind.
    fn assert_intact(mut self) {
        self.release();
        if let Some(mut h) = self.holder.take() {
            let status = h.wait().unwrap();
            assert!(status.success(), "holder: {status:?}");
        }
        let out = Command::new(BIN)
            .args(["run", "-n", "--lock-dir"])
            .arg(self.path().join("locks"))
            .args(["l", "true"])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let queue = self.path().join("locks/l.lock/queue");
        let left: Vec<_> = std::fs::read_dir(&queue)
            .map(|d| d.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "tickets left behind: {left:?}");
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(mut h) = self.holder.take() {
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(h.id() as i32, libc::SIGTERM) };
            let _ = h.wait();
        }
    }
}

/// Writes the line the holder waits for, if it still reads.
fn release(fifo: &Path) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking: with no reader left (already released) the open fails; nothing to do.
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo)
    {
        let _ = f.write_all(b"\n");
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn module(name: &str) -> String {
    format!("    module: {}\n", test_policy(name).display())
}

#[test]
fn endless_loop_in_rank_runs_out_of_fuel() {
    let held = Held::new();
    let cfg = held.config(&format!(
        "{}    limits: {{fuel: 2000000}}\n",
        module("test-loop")
    ));
    let out = held.waiter(&["--config", cfg.to_str().unwrap(), "--policy", "p"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(70), "{err}");
    // The SDK's default on-wait ranks the queue, so the loop is met in on-wait or in rank.
    assert!(
        err.contains("policy 'p'") && err.contains("ran out of fuel (2000000 per call"),
        "{err}"
    );
    held.assert_intact();
}

#[test]
fn endless_loop_with_on_error_default_falls_back_to_builtin_default() {
    let held = Held::new();
    let cfg = held.config(&format!(
        "{}    limits: {{fuel: 1000000}}\n    on_error: default\n",
        module("test-loop")
    ));
    let out = held.waiter_releasing(
        &["--config", cfg.to_str().unwrap(), "--policy", "p"],
        Some("builtin:default instead"),
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("ran out of fuel") && err.contains("builtin:default instead"),
        "{err}"
    );
    held.assert_intact();
}

#[test]
fn memory_bomb_hits_the_memory_cap() {
    let held = Held::new();
    let cfg = held.config(&format!(
        "{}    limits: {{memory_mib: 16}}\n",
        module("test-membomb")
    ));
    let out = held.waiter(&["--config", cfg.to_str().unwrap(), "--policy", "p"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(70), "{err}");
    assert!(
        err.contains("on-wait") && err.contains("exceeded its memory limit (16 MiB"),
        "{err}"
    );
    held.assert_intact();
}

#[test]
fn trap_in_on_wait_fails_the_request() {
    let held = Held::new();
    let file = test_policy("test-trap");
    let out = held.waiter(&["--policy", file.to_str().unwrap()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(70), "{err}");
    assert!(err.contains("on-wait") && err.contains("trapped"), "{err}");
    // The policy's own log line reached cachelock's log, tagged with its name.
    assert!(err.contains("about to trap"), "{err}");
    held.assert_intact();
}

#[test]
fn configure_error_is_a_configuration_error() {
    let held = Held::new();
    let cfg = held.config(&module("test-configure-error"));
    let out = held.waiter(&["--config", cfg.to_str().unwrap(), "--policy", "p"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("configure refused") && err.contains("refuses every configuration"),
        "{err}"
    );
    held.assert_intact();
}

#[test]
fn absurd_intervals_are_clamped_and_logs_capped() {
    let held = Held::new();
    let cfg = held.config(&format!(
        "{}    limits: {{min_interval_ms: 20, max_interval_ms: 200, log_bytes: 100}}\n",
        module("test-absurd")
    ));
    let out = held.waiter_releasing(
        &["--config", cfg.to_str().unwrap(), "--policy", "p"],
        Some("waiting for lock"),
    );
    let err = stderr(&out);
    // u64::MAX would mean "never look again": clamped to 200 ms, so the waiter is served.
    assert_eq!(out.status.code(), Some(0), "{err}");
    // Megabytes of log per call are cut to the cap.
    assert!(err.len() < 20_000, "{} bytes of stderr", err.len());
    // Its newline and escape sequence are shown escaped, not obeyed.
    assert!(err.contains("\\nFORGED-LINE\\u{1b}[31m"), "{err}");
    assert!(
        !err.lines().any(|l| l.starts_with("FORGED-LINE")) && !err.contains('\u{1b}'),
        "{err}"
    );
    assert!(
        err.contains("dropped") && err.contains("log_bytes"),
        "{err}"
    );
    held.assert_intact();
}

#[test]
fn absurd_give_up_reason_is_truncated() {
    let held = Held::new();
    let cfg = held.config(&format!(
        "{}    config: {{mode: give-up}}\n",
        module("test-absurd")
    ));
    let out = held.waiter(&["--config", cfg.to_str().unwrap(), "--policy", "p"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("more bytes cut") && err.len() < 4000,
        "{} bytes: {}",
        err.len(),
        &err[..err.len().min(300)]
    );
    held.assert_intact();
}

#[test]
fn bad_modules_exit_78_with_a_clear_message() {
    let held = Held::new();
    let junk = held.path().join("junk.wasm");
    std::fs::write(&junk, b"definitely not wasm").unwrap();
    let core = held.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let other = test_policy("test-other-world");
    let missing = held.path().join("missing.wasm");
    for (file, want) in [
        (&junk, "is not WebAssembly"),
        (&core, "core WebAssembly module, not a component"),
        (
            &other,
            "does not implement the cachelock:policy/policy@0.1.0 world",
        ),
        (&missing, "does not exist"),
    ] {
        let out = held.waiter(&["--policy", file.to_str().unwrap()]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(78), "{}: {err}", file.display());
        assert!(err.contains(want), "{}: {err}", file.display());
    }
    held.assert_intact();
}

#[test]
fn sha256_pin_mismatch_is_refused() {
    let held = Held::new();
    let cfg = held.config(&format!(
        "{}    sha256: \"sha256:{}\"\n",
        module("test-aging"),
        "0".repeat(64)
    ));
    let out = held.waiter(&["--config", cfg.to_str().unwrap(), "--policy", "p"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("pins sha256:0000"), "{err}");
    held.assert_intact();
}

#[test]
fn matching_pin_is_accepted_and_uncontended_runs_never_load_the_policy() {
    use sha2::Digest;
    let held = Held::new();
    let file = test_policy("test-aging");
    let sha: String = sha2::Sha256::digest(std::fs::read(&file).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let cfg = held.config(&format!(
        "{}    sha256: \"sha256:{sha}\"\n",
        module("test-aging")
    ));
    let out = held.waiter_releasing(
        &["--config", cfg.to_str().unwrap(), "--policy", "p"],
        Some("waiting for lock"),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    held.assert_intact();
    // Lazy: a module that is not even WebAssembly costs nothing when there is no contention.
    let junk = dir.join("junk.wasm");
    std::fs::write(&junk, b"junk").unwrap();
    let out = Command::new(BIN)
        .args(["run", "--lock-dir"])
        .arg(dir.join("locks"))
        .args(["--policy", junk.to_str().unwrap(), "l", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// `-n` behind a holder alone consults no policy: a module that is not even WebAssembly (or a
/// Python one that would take seconds to compile) costs nothing; the conflict is reported.
#[test]
fn nonblocking_behind_a_holder_never_loads_the_policy() {
    let held = Held::new();
    let junk = held.path().join("junk.wasm");
    std::fs::write(&junk, b"junk").unwrap();
    let out = Command::new(BIN)
        .args(["run", "-n", "--lock-dir"])
        .arg(held.path().join("locks"))
        .args(["--policy", junk.to_str().unwrap(), "l", "true"])
        .env("CACHELOCK_CONFIG", isolated_config(held.path(), ""))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    held.assert_intact();
}
