//! What the drop-in does beyond Earthly's wrapper, against the real dockerd: several builds on
//! one cache id at once (`CACHELOCK_SLOTS`), a size cap on cached roots with eviction of
//! unheld roots, and the static binary running in a root that holds only busybox.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::support::dockerd::*;
use crate::support::util::static_binary;

fn status_json(env: &Env, args: &[&str]) -> serde_json::Value {
    let o = Command::new(BIN)
        .arg("status")
        .arg("--json")
        .args(args)
        .env("CACHELOCK_CONFIG", &env.config)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Polls `cachelock status` of the root's queue until `ok` holds (60 s at most).
fn queue_until(env: &Env, root: &Path, ok: impl Fn(usize, usize) -> bool) -> serde_json::Value {
    let dir = root.join(".cachelock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let s = status_json(env, &["--lock-dir", dir.to_str().unwrap()]);
        let lock = s["locks"]
            .as_array()
            .and_then(|l| l.first().cloned())
            .unwrap_or_default();
        let n = |k: &str| lock[k].as_array().map(Vec::len).unwrap_or(0);
        if ok(n("holders"), n("waiters")) {
            return lock;
        }
        assert!(std::time::Instant::now() < deadline, "{s:#}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A process's parent, from `/proc/PID/stat`.
fn parent_of(pid: u64) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let (_, rest) = stat.rsplit_once(')').unwrap();
    rest.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn earthly_spawn(
    env: &Env,
    params: &[(&str, &str)],
    extra: &[(&str, &str)],
    script: &str,
) -> Killer {
    Killer(Some(
        earthly_call(env, params, extra, script)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ))
}

fn done(k: &mut Killer) -> std::process::Output {
    k.0.take().unwrap().wait_with_output().unwrap()
}

#[test]
fn slots_two_builds_overlap_a_third_waits_and_the_stock_wrapper_stays_out() {
    let env = Env::new("  network: none");
    let tar = image_tar();
    let root = env.path("dind/cache_par");
    let params = [
        ("EARTHLY_DOCKERD_DATA_ROOT", root.to_str().unwrap()),
        ("EARTHLY_DOCKERD_CACHE_DATA", "true"),
        ("EARTHLY_DOCKER_LOAD_FILES", tar.to_str().unwrap()),
    ];
    // A warm root from before slots were configured (one run, as Earthly's wrapper leaves it).
    let o = earthly_call(&env, &params, &[], "true").output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let slots = [("CACHELOCK_SLOTS", "2")];
    let release = env.path("release");
    let script = |tag: &str| {
        format!(
            "echo slot=$CACHELOCK_DOCKERD_SLOT; touch {in_}; while [ ! -e {rel} ]; do sleep 0.05; done; docker run --rm --network host bb:1 echo ran-{tag}",
            in_ = env.path(&format!("{tag}-in")).display(),
            rel = release.display()
        )
    };
    let mut a = earthly_spawn(&env, &params, &slots, &script("a"));
    let mut b = earthly_spawn(&env, &params, &slots, &script("b"));
    // Both run at once: each signalled it is inside its command.
    wait_for_file(&env.path("a-in"));
    wait_for_file(&env.path("b-in"));
    let mut c = earthly_spawn(&env, &params, &slots, &script("c"));
    let lock = queue_until(&env, &root, |h, w| h == 2 && w == 1);
    // The waiter is C's drop-in (a child of the shell Earthly's command line starts).
    let waiter = lock["waiters"][0]["pid"].as_u64().unwrap();
    assert_eq!(
        parent_of(waiter),
        u64::from(c.0.as_ref().unwrap().id()),
        "{lock:#}"
    );
    assert!(
        !env.path("c-in").exists(),
        "a third build ran beside two slots"
    );
    // Earthly's own wrapper (flock on the root's lock file) is kept out while slots run.
    let stock = Command::new("flock")
        .args(["-n"])
        .arg(root.join(".earthly-docker-lock"))
        .arg("true")
        .status()
        .unwrap();
    assert_eq!(stock.code(), Some(1), "the stock wrapper got the root");
    std::fs::write(&release, "").unwrap();
    let outs = [done(&mut a), done(&mut b), done(&mut c)];
    let mut seen = Vec::new();
    for (o, tag) in outs.iter().zip(["a", "b", "c"]) {
        assert!(o.status.success(), "{}", text(o));
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains(&format!("ran-{tag}")), "{out}");
        let slot = out.lines().next().unwrap().to_string();
        let err = String::from_utf8_lossy(&o.stderr);
        if slot == "slot=0" {
            // The existing warm root is slot 0: its image was there already.
            assert!(err.contains("1 image(s) re-tagged"), "{err}");
        }
        seen.push(slot);
    }
    seen[..2].sort();
    assert_eq!(seen[..2], ["slot=0", "slot=1"], "{seen:?}");
    // Slot 1 has its own root outside the cached root.
    let slot1 = env.path("dind/.cachelock-slots/cache_par/1/root");
    assert!(slot1.join("image").is_dir(), "{}", slot1.display());
    env.assert_clean();
}

#[test]
fn eviction_under_a_small_cap_never_removes_a_held_root() {
    let env = Env::new("  network: none\n  cache_max_size: 1");
    let tar = image_tar();
    let dind = env.path("dind");
    let params = |name: &str| {
        vec![
            (
                "EARTHLY_DOCKERD_DATA_ROOT".to_string(),
                dind.join(name).display().to_string(),
            ),
            ("EARTHLY_DOCKERD_CACHE_DATA".to_string(), "true".to_string()),
            (
                "EARTHLY_DOCKER_LOAD_FILES".to_string(),
                tar.display().to_string(),
            ),
        ]
    };
    let call = |name: &str, script: &str| {
        let p = params(name);
        let p: Vec<(&str, &str)> = p.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        earthly_call(&env, &p, &[], script)
    };
    for name in ["cache_b", "cache_c"] {
        let o = call(name, "true").output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
    }
    // cache_c's run evicted cache_b (least recently used, unheld).
    assert!(!dind.join("cache_b/image").exists());
    assert!(
        dind.join("cache_b/.earthly-docker-lock").exists(),
        "lock files stay"
    );
    // cache_a is held by a running build while cache_d finishes.
    let (a_in, release) = (env.path("a-in"), env.path("release"));
    let mut a = Killer(Some(
        call(
            "cache_a",
            &format!(
                "touch {}; while [ ! -e {} ]; do sleep 0.05; done; docker images -q bb:1",
                a_in.display(),
                release.display()
            ),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap(),
    ));
    wait_for_file(&a_in);
    let o = call("cache_d", "true").output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "evicted cached data root {}",
            dind.join("cache_c").display()
        )),
        "{err}"
    );
    assert!(
        err.contains("held roots cannot be evicted (cache_a)"),
        "{err}"
    );
    assert!(
        dind.join("cache_a/image").is_dir(),
        "a held root was evicted"
    );
    let s = status_json(&env, &["--cache-root", dind.to_str().unwrap()]);
    let cache = &s["cache"];
    assert_eq!(cache["cap_bytes"], 1, "{s:#}");
    let evicted: Vec<&str> = cache["evictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(evicted, ["cache_b", "cache_c"], "{s:#}");
    let root = |n: &str| {
        cache["roots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("{n} missing: {s:#}"))
    };
    assert_eq!(root("cache_a")["held"], true, "{s:#}");
    assert_eq!(root("cache_d")["held"], false, "{s:#}");
    assert!(root("cache_d")["bytes"].as_u64().unwrap() > 0, "{s:#}");
    std::fs::write(&release, "").unwrap();
    let o = done(&mut a);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        !String::from_utf8_lossy(&o.stdout).trim().is_empty(),
        "the held root lost its image: {}",
        text(&o)
    );
    env.assert_clean();
}

#[test]
fn cachelock_dockerd_evicts_unheld_cache_ids_under_a_cap() {
    let env = Env::new("  network: none\n  cache_max_size: 1");
    let tar = image_tar();
    let tar = tar.to_str().unwrap();
    for id in ["one", "two"] {
        let o = env.dockerd(&["--cache-id", id, "--load", tar], "true");
        assert!(o.status.success(), "{}", text(&o));
    }
    assert!(
        !env.cache_root.join("one/image").exists(),
        "one was not evicted"
    );
    assert!(
        env.cache_root.join("two/image").is_dir(),
        "the run's own root was evicted"
    );
    let s = status_json(&env, &["--cache-root", env.cache_root.to_str().unwrap()]);
    assert_eq!(s["cache"]["evictions"][0]["name"], "one", "{s:#}");
    env.assert_clean();
}

/// Whether an ELF file asks for a program interpreter (a dynamic loader): PT_INTERP.
fn has_interpreter(elf: &[u8]) -> bool {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not a 64-bit ELF");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) == 3
    })
}

#[test]
fn static_binary_runs_in_a_busybox_only_root() {
    let bin = static_binary();
    let elf = std::fs::read(&bin).unwrap();
    assert!(
        !has_interpreter(&elf),
        "{} is dynamically linked",
        bin.display()
    );
    assert!(
        has_interpreter(&std::fs::read(BIN).unwrap()),
        "the check sees a dynamic binary"
    );
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    for d in ["bin", "proc", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for l in ["sh", "echo", "cat", "true"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(l)).unwrap();
    }
    std::fs::copy(&bin, root.join("bin/cachelock")).unwrap();
    // Installed under Earthly's name, as packaging/buildkitd/*.Dockerfile do.
    std::fs::copy(&bin, root.join("bin/dockerd-wrapper.sh")).unwrap();
    let no_libc = ["lib", "lib64", "usr"]
        .iter()
        .all(|d| !root.join(d).exists());
    assert!(no_libc, "the root must hold no C library");
    // A private mount namespace: /proc and /dev for the chroot vanish with it.
    let run = |inner: &str| {
        Command::new("unshare")
            .args(["-m", "sh", "-c"])
            .arg(format!(
                "mount -t proc proc {r}/proc && mount --rbind /dev {r}/dev && exec chroot {r} /bin/sh -c '{inner}'",
                r = root.display()
            ))
            .env_clear()
            .env("PATH", "/bin:/usr/bin:/sbin:/usr/sbin")
            .output()
            .unwrap()
    };
    let o = run("/bin/cachelock --version");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("cachelock "),
        "{}",
        text(&o)
    );
    // A real lock with the embedded default policy (wasmtime runs in the static binary).
    let o = run("HOME=/tmp /bin/cachelock run --lock-dir /tmp/locks demo -- /bin/sh -c \"echo held-\\$CACHELOCK_LOCK\"");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("held-demo"),
        "{}",
        text(&o)
    );
    // The drop-in answers to its name; with no dockerd in the root it says so (69).
    let o = run("EARTHLY_DOCKERD_DATA_ROOT=/tmp/d /bin/dockerd-wrapper.sh execute true");
    assert_eq!(o.status.code(), Some(69), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("dockerd"),
        "{}",
        text(&o)
    );
}

#[test]
fn fall_back_runs_a_busy_cached_root_build_at_once_on_a_private_root() {
    let env = Env::with(
        "  network: none",
        "locks:\n  - match: 'cache_*'\n    fallback: true\n    policy: quick\npolicies:\n  quick:\n    module: builtin:deadline\n    config: {fallback_after: 300ms}",
    );
    let root = env.path("dind/cache_fb");
    let params = [
        ("EARTHLY_DOCKERD_DATA_ROOT", root.to_str().unwrap()),
        ("EARTHLY_DOCKERD_CACHE_DATA", "true"),
    ];
    let (held, release) = (env.path("held"), env.path("release"));
    let mut holder = earthly_spawn(
        &env,
        &params,
        &[],
        &format!(
            "touch {}; while [ ! -e {} ]; do sleep 0.05; done",
            held.display(),
            release.display()
        ),
    );
    wait_for_file(&held);
    let o = earthly_call(&env, &params, &[], "docker info -f '{{.DockerRootDir}}'")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let used = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    assert_eq!(
        used.parent(),
        Some(env.path("dind/.cachelock-private").as_path()),
        "{}",
        text(&o)
    );
    assert!(!used.exists(), "the private root was not removed");
    assert!(String::from_utf8_lossy(&o.stderr).contains("fresh private data root"));
    assert!(!release.exists(), "ran only after the holder");
    std::fs::write(&release, "").unwrap();
    let h = done(&mut holder);
    assert!(h.status.success(), "{}", text(&h));
    env.assert_clean();
}
