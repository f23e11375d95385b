//! Bad input to `cachelock dockerd` (issue 4 §5): each a clear message and its sysexits code,
//! with the lock released and nothing left running.

use crate::support::dockerd::*;

fn check(env: &Env, o: &std::process::Output, code: i32, needle: &str) {
    assert_eq!(o.status.code(), Some(code), "{}", text(o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("RAN"),
        "the command ran"
    );
    env.assert_clean();
}

#[test]
fn invalid_cache_id_is_64() {
    let env = Env::new("");
    let o = env.dockerd(&["--cache-id", "../etc"], "echo RAN");
    check(&env, &o, 64, "invalid lock name");
}

#[test]
fn symlinked_cache_root_is_73() {
    let env = Env::new("");
    let real = env.path("real");
    std::fs::create_dir_all(&real).unwrap();
    let link = env.path("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let o = env.dockerd(
        &["--cache-root", link.to_str().unwrap(), "--cache-id", "a"],
        "echo RAN",
    );
    check(&env, &o, 73, "symbolic link");
    assert!(std::fs::read_dir(&real).unwrap().next().is_none());
}

#[test]
fn read_only_cache_root_is_77() {
    let env = Env::new("");
    let ro = env.path("ro");
    std::fs::create_dir_all(&ro).unwrap();
    let st = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "ro,size=1m",
            "tmpfs",
            ro.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(
        st.success(),
        "mounting a read-only tmpfs (tests run as root)"
    );
    let o = env.dockerd(
        &["--cache-root", ro.to_str().unwrap(), "--cache-id", "a"],
        "echo RAN",
    );
    let c = std::ffi::CString::new(ro.to_str().unwrap()).unwrap();
    // SAFETY: valid path.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    check(&env, &o, 77, "not writable");
}

#[test]
fn missing_dockerd_binary_is_69() {
    let env = Env::new("  binary: /nonexistent/dockerd");
    let o = env.dockerd(&["--cache-id", "a"], "echo RAN");
    check(&env, &o, 69, "/nonexistent/dockerd");
    assert!(env.lock_free("a"));
}

#[test]
fn unreadable_image_tar_is_66() {
    let env = Env::new("");
    let o = env.dockerd(
        &["--cache-id", "a", "--load", "/nonexistent/image.tar"],
        "echo RAN",
    );
    check(&env, &o, 66, "/nonexistent/image.tar");
    assert!(env.lock_free("a"));
}

#[test]
fn daemon_json_that_is_not_json_is_78() {
    let env = Env::new("");
    let bad = write(&env, "daemon.json", "{ \"bip\": ");
    let env2 = Env::new(&format!("  daemon_json_file: {}", bad.display()));
    let o = env2.dockerd(&["--cache-id", "a"], "echo RAN");
    check(&env2, &o, 78, "not valid JSON");
    drop(env);
}

#[test]
fn daemon_json_dockerd_refuses_is_69_with_its_log() {
    // Valid JSON that dockerd itself rejects: the failure is dockerd's, reported with its log.
    let env = Env::new("  daemon_json:\n    no-such-option: 1");
    let o = env.dockerd(&["--cache-id", "a"], "echo RAN");
    check(&env, &o, 69, "no-such-option");
    assert!(env.lock_free("a"));
}

#[test]
fn unknown_network_mode_is_78() {
    let env = Env::new("  network: bridgy");
    let o = env.dockerd(&[], "echo RAN");
    check(&env, &o, 78, "netns, none or default");
}

#[test]
fn missing_command_is_127_and_dockerd_is_stopped() {
    let env = Env::new("");
    let o = env
        .cmd()
        .args(["dockerd", "--cache-id", "a", "--", "/nonexistent/cmd"])
        .output()
        .unwrap();
    check(&env, &o, 127, "command not found");
    assert!(env.lock_free("a"));
}
