//! The Earthly drop-in (`dockerd-wrapper.sh execute ...`) against the real dockerd: Earthly's
//! environment contract, cachelock's queue in `<data-root>/.cachelock` followed by the
//! `.earthly-docker-lock` exclusion, cached and uncached roots, compose requested without
//! compose installed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::dockerd::*;

/// `dockerd-wrapper.sh` as a symlink to the binary, as installed in place of Earthly's.
fn wrapper(env: &Env) -> PathBuf {
    let p = env.path("dockerd-wrapper.sh");
    if !p.exists() {
        std::os::unix::fs::symlink(BIN, &p).unwrap();
    }
    p
}

fn earthly_cmd(env: &Env, vars: &[(&str, &str)], args: &[&str]) -> Command {
    let mut c = Command::new(wrapper(env));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("CACHELOCK_CONFIG", &env.config)
        .stdin(Stdio::null());
    for (k, v) in vars {
        c.env(k, v);
    }
    c.args(args);
    c
}

fn earthly(env: &Env, vars: &[(&str, &str)], args: &[&str]) -> Output {
    earthly_cmd(env, vars, args).output().unwrap()
}

/// Starts the drop-in in the background with piped output, killed if the test fails.
fn spawn_earthly(env: &Env, vars: &[(&str, &str)], args: &[&str]) -> Killer {
    Killer(Some(
        earthly_cmd(env, vars, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ))
}

fn finish(k: &mut Killer) -> Output {
    k.0.take().unwrap().wait_with_output().unwrap()
}

fn pid(k: &Killer) -> u64 {
    u64::from(k.0.as_ref().map(Child::id).unwrap())
}

/// `cachelock status --json --lock-dir <root>/.cachelock`: the lock named after the root.
fn status(env: &Env, root: &Path) -> serde_json::Value {
    let o = Command::new(BIN)
        .args(["status", "--json", "--lock-dir"])
        .arg(root.join(".cachelock"))
        .env("CACHELOCK_CONFIG", &env.config)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let name = root.file_name().unwrap().to_str().unwrap();
    doc["locks"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["name"] == name).cloned())
        .unwrap_or(serde_json::json!({"holders": [], "waiters": []}))
}

/// Polls the status of `root` until `ok` holds (30 s at most); returns that status.
fn status_until(
    env: &Env,
    root: &Path,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(env, root);
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "never saw {what}: {s:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn len(v: &serde_json::Value) -> usize {
    v.as_array().map(Vec::len).unwrap_or(0)
}

/// Tickets present in the root's queue directory (live or not).
fn ticket_files(root: &Path) -> usize {
    let name = root.file_name().unwrap().to_str().unwrap();
    std::fs::read_dir(root.join(format!(".cachelock/{name}.lock/queue")))
        .map(|d| d.count())
        .unwrap_or(0)
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
fn two_drop_ins_on_one_cached_root_queue_and_never_overlap() {
    let env = Env::new("  network: none");
    let root = env.path("dind/cache_q");
    let log = env.path("runs.log");
    let root_s = root.to_str().unwrap();
    let script = |tag: &str, secs: &str| {
        format!(
            "echo {tag} start $(date +%s%N) >> {l}; sleep {secs}; echo {tag} end $(date +%s%N) >> {l}",
            l = log.display()
        )
    };
    let base = [
        ("EARTHLY_DOCKERD_DATA_ROOT", root_s),
        ("EARTHLY_DOCKERD_CACHE_DATA", "true"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        v
    };
    // Independently of any lock: how many dockerd instances ever ran on the root at once.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (max_dockerds, out_a, out_b, a_pid) = std::thread::scope(|sc| {
        let sampler = sc.spawn(|| {
            let mut max = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                max = max.max(instances_on(&env, &root).len());
                std::thread::sleep(Duration::from_millis(20));
            }
            max
        });
        let a_script = script("A", "2");
        let mut a = spawn_earthly(
            &env,
            &with(&[("CACHELOCK_LABELS", "job=a")]),
            &["execute", "sh", "-c", &a_script],
        );
        let s = status_until(&env, &root, "A holding", |s| {
            len(&s["holders"]) == 1 && s["holders"][0]["labels"]["job"] == "a"
        });
        assert_eq!(s["holders"][0]["pid"], pid(&a), "{s:#}");
        let b_script = script("B", "0.5");
        let mut b = spawn_earthly(
            &env,
            &with(&[
                ("CACHELOCK_PRIORITY", "3"),
                ("CACHELOCK_LABELS", "job=b,ci=yes"),
            ]),
            &["execute", "sh", "-c", &b_script],
        );
        let s = status_until(&env, &root, "B queued behind A", |s| {
            len(&s["waiters"]) == 1
        });
        let w = &s["waiters"][0];
        assert_eq!(
            (
                &w["pid"],
                &w["position"],
                &w["priority"],
                &w["labels"]["ci"]
            ),
            (
                &serde_json::json!(pid(&b)),
                &serde_json::json!(1),
                &serde_json::json!(3),
                &serde_json::json!("yes")
            ),
            "{s:#}"
        );
        assert_eq!(s["holders"][0]["pid"], pid(&a), "A still holds: {s:#}");

        // A third request bounded by CACHELOCK_WAIT gives up and leaves no ticket behind.
        let t = Instant::now();
        let c = earthly(
            &env,
            &with(&[("CACHELOCK_WAIT", "0.2")]),
            &["execute", "echo", "RAN-C"],
        );
        let c_took = t.elapsed();
        assert_eq!(c.status.code(), Some(1), "{}", text(&c));
        assert!(!String::from_utf8_lossy(&c.stdout).contains("RAN-C"));
        assert!(
            String::from_utf8_lossy(&c.stderr).contains("timed out"),
            "{}",
            text(&c)
        );
        assert!(c_took < Duration::from_secs(3), "gave up after {c_took:?}");
        let s = status(&env, &root);
        assert_eq!((len(&s["holders"]), len(&s["waiters"])), (1, 1), "{s:#}");
        assert_eq!(s["waiters"][0]["pid"], pid(&b), "{s:#}");
        assert_eq!(ticket_files(&root), 2, "C left a ticket: {s:#}");

        let a_pid = pid(&a);
        let out_a = finish(&mut a);
        let out_b = finish(&mut b);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (sampler.join().unwrap(), out_a, out_b, a_pid)
    });
    assert!(out_a.status.success(), "{}", text(&out_a));
    assert!(out_b.status.success(), "{}", text(&out_b));
    let err_b = String::from_utf8_lossy(&out_b.stderr);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert!(
        err_b.contains(&format!(
            "cachelock: waiting for lock cache_q: held by {}:{a_pid} ",
            host.trim()
        )),
        "B's progress line names A: {err_b}"
    );
    assert!(err_b.contains("position 1 of"), "{err_b}");
    assert!(
        err_b.contains("acquired lock cache_q after waiting"),
        "{err_b}"
    );

    // The commands' own clocks: B started after A ended.
    let runs = std::fs::read_to_string(&log).unwrap();
    let at = |tag: &str, ev: &str| -> u128 {
        runs.lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                (f[0] == tag && f[1] == ev).then(|| f[2].parse().unwrap())
            })
            .unwrap_or_else(|| panic!("no {tag} {ev} in {runs}"))
    };
    assert!(at("A", "end") < at("B", "start"), "overlap: {runs}");
    assert_eq!(max_dockerds, 1, "dockerd instances on the root at once");
    assert!(
        instances_on(&env, &root).is_empty(),
        "a dockerd outlived its drop-in"
    );
    assert_eq!(ticket_files(&root), 0, "tickets left");
    env.assert_clean();
}

/// The distinct dockerd instances (by their own `--pidfile`) running on data root `root`: a
/// dockerd's short-lived forks carry its command line too, but not another instance's pidfile.
fn instances_on(env: &Env, root: &Path) -> std::collections::BTreeSet<String> {
    let key = format!("--data-root={}", root.display());
    env.processes()
        .into_iter()
        .filter(|(_, c)| c.split(' ').any(|a| a == key))
        .filter_map(|(_, c)| {
            c.split(' ')
                .find_map(|a| a.strip_prefix("--pidfile=").map(String::from))
        })
        .collect()
}

#[test]
fn earthly_lock_file_still_excludes_the_drop_in() {
    let env = Env::with("  network: none", "progress_interval: 0.5");
    let root = env.path("dind/cache_lock");
    std::fs::create_dir_all(&root).unwrap();
    let vars = [
        ("EARTHLY_DOCKERD_DATA_ROOT", root.to_str().unwrap()),
        ("EARTHLY_DOCKERD_CACHE_DATA", "true"),
    ];
    // Hold the lock the way Earthly's own wrapper does: flock(1) on .earthly-docker-lock.
    let lockf = root.join(".earthly-docker-lock");
    let mut holder = Killer(Some(
        Command::new("flock")
            .arg(&lockf)
            .args(["sleep", "3"])
            .spawn()
            .unwrap(),
    ));
    std::thread::sleep(Duration::from_millis(300));
    // CACHELOCK_WAIT bounds the flock too: exit 1, nothing run, no ticket left.
    let mut bounded = vars.to_vec();
    bounded.push(("CACHELOCK_WAIT", "0.2"));
    let t = Instant::now();
    let o = earthly(&env, &bounded, &["execute", "echo", "RAN"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    assert!(!String::from_utf8_lossy(&o.stdout).contains("RAN"));
    assert!(String::from_utf8_lossy(&o.stderr).contains(".earthly-docker-lock"));
    assert_eq!(ticket_files(&root), 0);

    let t = Instant::now();
    let mut waiter = spawn_earthly(&env, &vars, &["execute", "true"]);
    // It passed cachelock's queue (holds it) and waits on Earthly's file.
    let s = status_until(&env, &root, "the drop-in holding the queue", |s| {
        len(&s["holders"]) == 1
    });
    assert_eq!(s["holders"][0]["pid"], pid(&waiter), "{s:#}");
    let o = finish(&mut waiter);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        t.elapsed() >= Duration::from_millis(2000),
        "did not wait for the other holder: {:?}",
        t.elapsed()
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("waiting for") && err.contains(".earthly-docker-lock"),
        "progress names Earthly's lock file: {err}"
    );
    let _ = holder.0.as_mut().unwrap().wait();
    holder.0 = None;
    assert_eq!(ticket_files(&root), 0);
    env.assert_clean();
}

#[test]
fn invalid_queue_variables_are_64_before_anything_starts() {
    let env = Env::new("  network: none");
    let root = env.path("dind/cache_bad");
    for (k, v) in [
        ("CACHELOCK_PRIORITY", "high"),
        ("CACHELOCK_WAIT", "-3"),
        ("CACHELOCK_LABELS", "job"),
    ] {
        let o = earthly(
            &env,
            &[
                ("EARTHLY_DOCKERD_DATA_ROOT", root.to_str().unwrap()),
                ("EARTHLY_DOCKERD_CACHE_DATA", "true"),
                (k, v),
            ],
            &["execute", "echo", "RAN"],
        );
        assert_eq!(o.status.code(), Some(64), "{k}={v}: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(k),
            "{}",
            text(&o)
        );
        assert!(!String::from_utf8_lossy(&o.stdout).contains("RAN"));
        assert!(!root.exists(), "{k}={v}: the data root was created");
    }
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
