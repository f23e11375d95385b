//! The Earthly drop-in (`dockerd-wrapper.sh execute ...`) against the real dockerd: Earthly's
//! environment contract, the `.earthly-docker-lock` exclusion, cached and uncached roots,
//! compose requested without compose installed.

mod dockerd_support;

use std::path::PathBuf;
use std::process::{Command, Output};

use dockerd_support::*;

/// `dockerd-wrapper.sh` as a symlink to the binary, as installed in place of Earthly's.
fn wrapper(env: &Env) -> PathBuf {
    let p = env.path("dockerd-wrapper.sh");
    if !p.exists() {
        std::os::unix::fs::symlink(BIN, &p).unwrap();
    }
    p
}

fn earthly(env: &Env, vars: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = Command::new(wrapper(env));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("CACHELOCK_CONFIG", &env.config)
        .stdin(std::process::Stdio::null());
    for (k, v) in vars {
        c.env(k, v);
    }
    c.args(args).output().unwrap()
}

#[test]
fn execute_with_cached_root_loads_images_and_keeps_the_root() {
    // The drop-in runs inside Earthly's build container; here several tests share a host, so
    // networking is `none` (the container's own `default` would collide across tests).
    let env = Env::new("  network: none");
    let tar = image_tar();
    let root = env.path("dind/cache_abc");
    let vars = [
        ("EARTHLY_DOCKERD_DATA_ROOT", root.to_str().unwrap()),
        ("EARTHLY_DOCKERD_CACHE_DATA", "true"),
        ("EARTHLY_DOCKER_LOAD_FILES", tar.to_str().unwrap()),
        ("EARTHLY_DOCKER_WRAPPER_DEBUG", "1"),
    ];
    let o = earthly(
        &env,
        &vars,
        &[
            "execute",
            "sh",
            "-c",
            "echo W=$EARTHLY_WITH_DOCKER; docker run --rm --network host bb:1 echo in-container; exit 3",
        ],
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("W=1") && out.contains("in-container"), "{out}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("+ cachelock: locking"), "debug trace: {err}");
    assert!(err.contains("earthly_cached_"), "{err}");
    assert!(root.join(".earthly-docker-lock").exists());
    assert!(root.join("image").is_dir(), "cached root kept");
    // Second run: the image is still there (re-tagged, brought back by the load).
    let o = earthly(&env, &vars, &["execute", "docker", "images", "-q", "bb:1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).trim().is_empty());
    assert!(String::from_utf8_lossy(&o.stderr).contains("1 kept by the loads"));
    env.assert_clean();
}

#[test]
fn earthly_lock_file_excludes_a_second_wrapper() {
    let env = Env::new("  network: none");
    let root = env.path("dind/cache_lock");
    std::fs::create_dir_all(&root).unwrap();
    // Hold the lock the way Earthly's own wrapper does: flock(1) on .earthly-docker-lock.
    let lockf = root.join(".earthly-docker-lock");
    let mut holder = Killer(Some(
        Command::new("flock")
            .arg(&lockf)
            .args(["sleep", "2"])
            .spawn()
            .unwrap(),
    ));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let t = std::time::Instant::now();
    let o = earthly(
        &env,
        &[
            ("EARTHLY_DOCKERD_DATA_ROOT", root.to_str().unwrap()),
            ("EARTHLY_DOCKERD_CACHE_DATA", "true"),
        ],
        &["execute", "true"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(1500),
        "did not wait for the other holder: {:?}",
        t.elapsed()
    );
    let _ = holder.0.as_mut().unwrap().wait();
    holder.0 = None;
    env.assert_clean();
}

#[test]
fn uncached_root_is_wiped() {
    let env = Env::new("  network: none");
    let root = env.path("dind/tmp1");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("stale"), "x").unwrap();
    let o = earthly(
        &env,
        &[("EARTHLY_DOCKERD_DATA_ROOT", root.to_str().unwrap())],
        &[
            "execute",
            "sh",
            "-c",
            "test ! -e $EARTHLY_DOCKERD_DATA_ROOT/stale && docker info -f '{{.DockerRootDir}}'",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        root.to_str().unwrap()
    );
    assert!(
        std::fs::read_dir(&root).unwrap().next().is_none(),
        "root not wiped"
    );
    env.assert_clean();
}

#[test]
fn missing_data_root_variable_is_64() {
    let env = Env::new("  network: none");
    let o = earthly(&env, &[], &["execute", "true"]);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("EARTHLY_DOCKERD_DATA_ROOT"));
}

#[test]
fn compose_requested_without_compose_is_69_before_anything_starts() {
    let env = Env::new("  network: none");
    let root = env.path("dind/cmp");
    let has_compose = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
        || Command::new("sh")
            .args(["-c", "command -v docker-compose"])
            .status()
            .unwrap()
            .success();
    let o = earthly(
        &env,
        &[
            ("EARTHLY_DOCKERD_DATA_ROOT", root.to_str().unwrap()),
            ("EARTHLY_START_COMPOSE", "true"),
            ("EARTHLY_COMPOSE_FILES", "docker-compose.yml"),
        ],
        &["execute", "echo", "RAN"],
    );
    if has_compose {
        // With compose installed the missing compose file is compose's error.
        assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    } else {
        assert_eq!(o.status.code(), Some(69), "{}", text(&o));
        assert!(String::from_utf8_lossy(&o.stderr).contains("docker compose"));
        assert!(!String::from_utf8_lossy(&o.stdout).contains("RAN"));
        let o = earthly(
            &env,
            &[("EARTHLY_COMPOSE_FILES", "docker-compose.yml")],
            &["get-compose-config"],
        );
        assert_eq!(o.status.code(), Some(69), "{}", text(&o));
    }
    env.assert_clean();
}

#[test]
fn unknown_subcommand_is_64() {
    let env = Env::new("");
    let o = earthly(&env, &[], &["frobnicate"]);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    let o = Command::new(BIN)
        .args(["earthly", "execute"])
        .env("EARTHLY_DOCKERD_DATA_ROOT", env.path("x"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
}
