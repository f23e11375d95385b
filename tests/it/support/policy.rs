//! Helpers shared by the policy tests: the built test components, tickets, configs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use cachelock::config::{Config, Loaded};
use cachelock::policy::{Mode, Request, Ticket, WaitState};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_cachelock");

/// componentize-py version `make setup` installs (and `policy new --lang python` names).
pub const COMPONENTIZE_PY: &str = "0.25.1";

/// Library-side loads compile untrusted modules in a child process: the cachelock binary, not
/// this test harness.
pub fn init() {
    cachelock::policy::compile::set_compiler_program(BIN.into());
}

/// A test policy component of crates/test-programs (`test-loop` → `test_loop.wasm`).
pub fn test_policy(name: &str) -> PathBuf {
    init();
    test_programs_artifacts::component(name)
}

/// The Python test policy (crates/test-programs/python/test_policy.py), built with
/// componentize-py once per test run (kept in target/tmp, keyed by the source, the WIT and the
/// componentize-py version, so an unchanged one is not rebuilt). Fails, saying what to
/// install, when componentize-py is missing.
pub fn python_policy() -> PathBuf {
    init();
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            use sha2::Digest;
            let top = Path::new(env!("CARGO_MANIFEST_DIR"));
            let src_dir = top.join("crates/test-programs/python");
            let wit = top.join("wit");
            let version = Command::new("componentize-py")
                .arg("--version")
                .output()
                .unwrap_or_else(|e| {
                    panic!(
                        "componentize-py is needed for the Python policy tests ({e}): run `make setup` \
                         (pip install componentize-py=={COMPONENTIZE_PY})"
                    )
                });
            let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
            assert!(
                version.ends_with(COMPONENTIZE_PY),
                "componentize-py {COMPONENTIZE_PY} is needed, found {version:?}: run `make setup`"
            );
            let mut h = sha2::Sha256::new();
            h.update(std::fs::read(src_dir.join("test_policy.py")).unwrap());
            h.update(std::fs::read(wit.join("policy.wit")).unwrap());
            h.update(version.as_bytes());
            let key: String = h.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect();
            let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-policy");
            std::fs::create_dir_all(&out_dir).unwrap();
            let out = out_dir.join(format!("test_policy-{key}.wasm"));
            if !out.is_file() {
                let tmp = out_dir.join(format!("build-{}.wasm", std::process::id()));
                let build = Command::new("componentize-py")
                    .arg("-d")
                    .arg(&wit)
                    .args(["-w", "policy", "componentize", "test_policy", "-p"])
                    .arg(&src_dir)
                    .arg("-o")
                    .arg(&tmp)
                    .env("PYTHONDONTWRITEBYTECODE", "1")
                    .output()
                    .unwrap();
                assert!(
                    build.status.success(),
                    "componentize-py failed: {}",
                    String::from_utf8_lossy(&build.stderr)
                );
                std::fs::rename(&tmp, &out).unwrap();
            }
            out
        })
        .clone()
}

/// A configuration file in `dir` whose compile caches (own and host) are private to `dir`,
/// followed by `yaml`: what every test that runs the binary passes (`--config` or
/// `CACHELOCK_CONFIG`), so that no test writes the host's `/var/cache/cachelock` as root.
pub fn isolated_config(dir: &Path, yaml: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("cachelock.yaml");
    std::fs::write(
        &path,
        format!(
            "policy_cache_dir: {}\npolicy_host_cache_dir: {}\n{yaml}",
            dir.join("cache").display(),
            dir.join("host-cache").display()
        ),
    )
    .unwrap();
    path
}

/// A configuration parsed from YAML, with its compile caches in `dir`.
pub fn loaded(dir: &Path, yaml: &str) -> Loaded {
    init();
    let text = format!(
        "policy_cache_dir: {}\npolicy_host_cache_dir: {}\n{yaml}",
        dir.join("cache").display(),
        dir.join("host-cache").display()
    );
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("config.yaml");
    std::fs::write(&path, &text).unwrap();
    let config = Config::parse(&text).unwrap();
    Loaded {
        config,
        path: Some(path),
    }
}

/// A ticket with the given id, priority, arrival and labels.
pub fn ticket(id: &str, priority: i32, enqueued_at_ms: u64, labels: &[(&str, &str)]) -> Ticket {
    Ticket {
        id: id.to_string(),
        request: Request {
            lock: "l".into(),
            mode: Mode::Exclusive,
            priority,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            host: "h".into(),
            pid: 1,
            enqueued_at_ms,
            wait_limit_ms: None,
        },
    }
}

/// A wait state of `me` among `waiters`.
pub fn state(me: Ticket, waiters: Vec<Ticket>, waited_ms: u64, evaluations: u32) -> WaitState {
    let now_ms = me.request.enqueued_at_ms + waited_ms;
    WaitState {
        me,
        holders: vec![ticket("holder", 0, 0, &[])],
        waiters,
        waited_ms,
        evaluations,
        now_ms,
    }
}
