//! The WASM host through the library API: built-ins, limits, faults, integrity, laziness.

use crate::support::policy::*;
use cachelock::config::{LockSettings, WaitMode};
use cachelock::error::Error;
use cachelock::policy::{self, Policy, RetryDecision, StartAttempt, StartFailure, WaitDecision};

fn settings(policy: &str) -> LockSettings {
    LockSettings {
        policy: policy.into(),
        slots: 1,
        fallback: false,
        wait_mode: WaitMode::Auto,
    }
}

#[test]
fn builtin_default_matches_native_rules() {
    let dir = tempfile::tempdir().unwrap();
    let l = loaded(dir.path(), "");
    let mut p = policy::for_lock(&l, &settings("default"), None, &[]).unwrap();
    let mut native = policy::native::DefaultPolicy;
    let a = ticket("a", 0, 1000, &[]);
    let b = ticket("b", 5, 2000, &[]);
    let c = ticket("c", 0, 500, &[]);
    for t in [&a, &b, &c] {
        assert_eq!(p.rank(t, 9000).unwrap(), native.rank(t, 9000).unwrap());
    }
    let s = state(a.clone(), vec![b.clone(), c.clone()], 100, 0);
    assert_eq!(p.on_wait(&s).unwrap(), native.on_wait(&s).unwrap());
    assert_eq!(p.on_wait(&s).unwrap(), WaitDecision::KeepWaiting(60));
    let mut limited = a.clone();
    limited.request.wait_limit_ms = Some(50);
    let s = state(limited, vec![], 100, 3);
    assert_eq!(p.on_wait(&s).unwrap(), native.on_wait(&s).unwrap());
    let at = |n| StartAttempt {
        attempt: n,
        cache_id: Some("c".into()),
    };
    let line = "x\nfailed to start containerd: timeout waiting for containerd to start\n";
    for n in 1..=6 {
        for tail in [line, "other"] {
            let f = StartFailure::TimedOut(1);
            assert_eq!(
                p.on_start_failure(&at(n), &f, tail).unwrap(),
                native.on_start_failure(&at(n), &f, tail).unwrap()
            );
        }
    }
    assert_eq!(
        p.on_start_failure(&at(1), &StartFailure::Exited(Some(1)), line)
            .unwrap(),
        RetryDecision::RetryAfter(5000)
    );
    assert_eq!(p.start_timeout_ms(&at(1)).unwrap(), 300_000);
    assert_eq!(p.stop_timeout_ms(None).unwrap(), 30_000);
}

#[test]
fn load_errors_are_configuration_errors() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not wasm at all").unwrap();
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let l = loaded(dir.path(), "");
    let cases = [
        (junk.display().to_string(), "not WebAssembly"),
        (
            core.display().to_string(),
            "core WebAssembly module, not a component",
        ),
        (
            test_policy("test-other-world").display().to_string(),
            "does not implement the cachelock:policy/policy@0.1.0 world",
        ),
        (
            test_policy("test-foreign-import").display().to_string(),
            "it imports `test:net/fetch`, which the policy sandbox does not provide",
        ),
        (
            test_policy("test-configure-error").display().to_string(),
            "configure refused the configuration: test-configure-error refuses",
        ),
    ];
    let missing = dir.path().join("missing.wasm").display().to_string();
    let err = policy::for_lock(&l, &settings("default"), Some(&missing), &[])
        .err()
        .expect("a missing module is refused up front");
    assert_eq!(err.exit_code(), 78);
    assert!(err.message.contains("does not exist"), "{err}");
    for (file, want) in cases {
        let mut p = policy::for_lock(&l, &settings("default"), Some(&file), &[]).unwrap();
        let e = p.rank(&ticket("a", 0, 1, &[]), 2).unwrap_err();
        assert!(e.message.contains(want), "{file}: {e}");
        assert_eq!(e.kind, policy::ErrorKind::Load, "{file}: {e}");
        let err: Error = e.into();
        assert_eq!(err.exit_code(), 78, "{file}: {err}");
    }
}
