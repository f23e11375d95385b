//! The Earthly drop-in (`dockerd-wrapper.sh execute ...`) against the real dockerd, called the
//! way Earthly's and EarthBuild's CLIs call it: the environment and flag contracts, registry
//! loads from a real registry, compose, private uncached roots, the default socket and log,
//! cachelock's queue in `<data-root>/.cachelock` followed by the `.earthly-docker-lock`
//! exclusion.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::dockerd::*;

fn earthly_cmd(env: &Env, vars: &[(&str, &str)], args: &[&str]) -> Command {
    let mut c = Command::new(wrapper_path(env));
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
        let c = earthly(
            &env,
            &with(&[("CACHELOCK_WAIT", "0.2")]),
            &["execute", "echo", "RAN-C"],
        );
        assert_eq!(c.status.code(), Some(1), "{}", text(&c));
        assert!(!String::from_utf8_lossy(&c.stdout).contains("RAN-C"));
        assert!(
            String::from_utf8_lossy(&c.stderr).contains("timed out"),
            "{}",
            text(&c)
        );
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
    // Hold the lock the way Earthly's own wrapper does: flock(1) on .earthly-docker-lock,
    // until the test says so.
    let lockf = root.join(".earthly-docker-lock");
    let (held, release) = (env.path("held"), env.path("release"));
    let mut holder = Killer(Some(
        Command::new("flock")
            .arg(&lockf)
            .args(["sh", "-c"])
            .arg(format!(
                "touch {}; while [ ! -e {} ]; do sleep 0.05; done",
                held.display(),
                release.display()
            ))
            .spawn()
            .unwrap(),
    ));
    wait_for_file(&held);
    // CACHELOCK_WAIT bounds the flock too: exit 1, nothing run, no ticket left.
    let mut bounded = vars.to_vec();
    bounded.push(("CACHELOCK_WAIT", "0.2"));
    let o = earthly(&env, &bounded, &["execute", "echo", "RAN"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("RAN"));
    assert!(String::from_utf8_lossy(&o.stderr).contains(".earthly-docker-lock"));
    assert_eq!(ticket_files(&root), 0);

    // The command proves it ran only after the other holder let go.
    let ran = env.path("ran");
    let script = format!("test -e {} && touch {}", release.display(), ran.display());
    let mut waiter = spawn_earthly(&env, &vars, &["execute", "sh", "-c", &script]);
    // It passed cachelock's queue (holds it) and waits on Earthly's file.
    let s = status_until(&env, &root, "the drop-in holding the queue", |s| {
        len(&s["holders"]) == 1
    });
    assert_eq!(s["holders"][0]["pid"], pid(&waiter), "{s:#}");
    // Its progress line names Earthly's file: proof that it is waiting there.
    let stderr = waiter.0.as_mut().unwrap().stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let progress = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains("waiting for") && l.contains(".earthly-docker-lock"))
        .expect("a progress line naming Earthly's lock file");
    assert!(
        !ran.exists(),
        "ran while Earthly's lock was held: {progress}"
    );
    std::fs::write(&release, "").unwrap();
    let o = finish(&mut waiter);
    assert!(o.status.success(), "{}", text(&o));
    assert!(ran.exists(), "the command did not run after the release");
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
        ("CACHELOCK_WAIT", "soon"),
        ("CACHELOCK_WAIT", "inf"),
        ("CACHELOCK_LABELS", "job"),
        ("CACHELOCK_LABELS", "=x"),
        ("CACHELOCK_SLOTS", "0"),
        ("CACHELOCK_SLOTS", "two"),
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
fn uncached_run_uses_a_private_folder_inside_the_root() {
    let env = Env::new("  network: none");
    let root = env.path("dind/tmp1");
    std::fs::create_dir_all(&root).unwrap();
    // Another run's files: never touched.
    std::fs::write(root.join("other"), "x").unwrap();
    let o = earthly(
        &env,
        &[("EARTHLY_DOCKERD_DATA_ROOT", root.to_str().unwrap())],
        &[
            "execute",
            "sh",
            "-c",
            "test -e $EARTHLY_DOCKERD_DATA_ROOT/other && echo $EARTH_DOCKERD_DATA_ROOT && docker info -f '{{.DockerRootDir}}'",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], root.to_str().unwrap(), "{out}");
    let private = Path::new(lines[1]);
    assert_eq!(private.parent(), Some(root.as_path()), "{out}");
    assert!(!private.exists(), "private folder not removed");
    let left: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("other")]);
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
    // A PATH with the docker CLI (Debian's has no compose plugin) but no docker-compose.
    let bin = env.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink("/usr/bin/docker", bin.join("docker")).unwrap();
    let run = |vars: &[(&str, &str)], args: &[&str]| {
        earthly_cmd(&env, vars, args)
            .env("PATH", &bin)
            .output()
            .unwrap()
    };
    let o = run(
        &[
            ("EARTHLY_DOCKERD_DATA_ROOT", root.to_str().unwrap()),
            ("EARTHLY_START_COMPOSE", "true"),
            ("EARTHLY_COMPOSE_FILES", "docker-compose.yml"),
        ],
        &["execute", "echo", "RAN"],
    );
    assert_eq!(o.status.code(), Some(69), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("docker-compose"));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("RAN"));
    assert!(!root.exists(), "created before failing");
    let o = run(
        &[("EARTHLY_COMPOSE_FILES", "docker-compose.yml")],
        &["get-compose-config"],
    );
    assert_eq!(o.status.code(), Some(69), "{}", text(&o));
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

/// `docker images` of the run as sorted `repo:tag` lines.
const LIST_IMAGES: &str = "docker images --format '{{.Repository}}:{{.Tag}}' | sort";

#[test]
fn earthly_call_loads_registry_images_in_both_formats() {
    let addr = push_to_registry(&["sess-1/app:1", "sess-1/tool:2"]);
    let env = Env::new("  network: none");
    let root = env.path("dind/cache_reg");
    let root_s = root.to_str().unwrap();
    let o = earthly_call(
        &env,
        &[
            ("EARTHLY_DOCKERD_DATA_ROOT", root_s),
            ("EARTHLY_DOCKERD_CACHE_DATA", "true"),
            ("EARTHLY_DOCKER_LOAD_FILES", ""),
            ("EARTHLY_IMAGES_WITH_DIGESTS", "app@sha256:0"),
            ("EARTHLY_START_COMPOSE", "false"),
            ("EARTHLY_COMPOSE_FILES", ""),
            ("EARTHLY_COMPOSE_SERVICES", ""),
        ],
        &[
            // Current format (REF|TAG) and the old one (REF: the tag follows the first '/').
            (
                "EARTHLY_DOCKER_LOAD_REGISTRY",
                "sess-1/app:1|myapp:dev sess-1/tool:2",
            ),
            ("CACHELOCK_EARTHLY_REGISTRY", addr.as_str()),
        ],
        &format!("echo W=$EARTHLY_WITH_DOCKER R=$EARTH_DOCKERD_DATA_ROOT; {LIST_IMAGES}; docker info -f '{{{{json .RegistryConfig.IndexConfigs}}}}'"),
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], format!("W=1 R={root_s}"), "{out}");
    // Tagged as the user asked, the pulled names removed (`rmi --force`).
    assert_eq!(lines[1..3], ["myapp:dev", "tool:2"], "{out}");
    assert!(
        lines[3].contains(&format!("\"{addr}\"")),
        "insecure registry: {out}"
    );
    assert!(!out.contains(&format!("{addr}/sess-1")), "{out}");
    env.assert_clean();
}

#[test]
fn registry_pull_failure_stops_dockerd_and_fails_the_run() {
    let addr = push_to_registry(&["sess-2/ok:1"]);
    let env = Env::new("  network: none");
    let root = env.path("dind/x");
    let o = earthly_call(
        &env,
        &[("EARTHLY_DOCKERD_DATA_ROOT", root.to_str().unwrap())],
        &[
            (
                "EARTHLY_DOCKER_LOAD_REGISTRY",
                "sess-2/ok:1|ok:1 sess-2/missing:1|missing:1",
            ),
            ("CACHELOCK_EARTHLY_REGISTRY", addr.as_str()),
        ],
        "echo RAN",
    )
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(69), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("sess-2/missing:1") && err.contains("1 of 2"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&o.stdout).contains("RAN"));
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        0,
        "the private root was not removed"
    );
    env.assert_clean();
}

#[test]
fn earthbuild_call_with_flags_and_earth_variables() {
    let addr = push_to_registry(&["sess-3/svc:1"]);
    let env = Env::new("  network: none");
    let tar = image_tar();
    let root = env.path("dind/cache_eb");
    let root_s = root.to_str().unwrap();
    let flags = [
        ("--data-root", Some(root_s)),
        ("--cache-data", None),
        ("--load-file", Some(tar.to_str().unwrap())),
        ("--image-digest", Some("svc@sha256:0")),
    ];
    let o = earthbuild_call(
        &env,
        &flags,
        &[
            ("EARTH_DOCKER_LOAD_REGISTRY", "sess-3/svc:1|svc:test"),
            ("CACHELOCK_EARTHLY_REGISTRY", addr.as_str()),
            ("EARTH_DOCKER_WRAPPER_DEBUG", "1"),
        ],
        &format!("echo W=$EARTH_WITH_DOCKER R=$EARTH_DOCKERD_DATA_ROOT; {LIST_IMAGES}; docker info -f '{{{{json .RegistryConfig.Mirrors}}}}'"),
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], format!("W=1 R={root_s}"), "{out}");
    assert_eq!(lines[1..3], ["bb:1", "svc:test"], "{out}");
    assert!(
        lines[3].contains("mirror.gcr.io"),
        "EarthBuild's daemon.json: {out}"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("contract: EarthBuild"), "{err}");
    assert!(
        root.join(".earthly-docker-lock").exists(),
        "cached and locked"
    );

    // The old variable still works, with a deprecation warning.
    let o = earthbuild_call(
        &env,
        &flags[..1],
        &[
            ("EARTHLY_DOCKER_LOAD_REGISTRY", "sess-3/svc:1|svc:old"),
            ("CACHELOCK_EARTHLY_REGISTRY", addr.as_str()),
        ],
        LIST_IMAGES,
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "svc:old");
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains("EARTHLY_DOCKER_LOAD_REGISTRY is deprecated; use EARTH_DOCKER_LOAD_REGISTRY"));

    // A flag this binary does not know: the CLI is newer than the image.
    let o = earthbuild_call(
        &env,
        &[("--data-root", Some(root_s)), ("--from-the-future", None)],
        &[],
        "echo RAN",
    )
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("different versions"));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("RAN"));
    env.assert_clean();
}

#[test]
fn compose_up_and_down_with_earthlys_environment() {
    let env = Env::new("  network: none");
    let tar = image_tar();
    let root = env.path("dind/cache_compose");
    let file = write(
        &env,
        "docker-compose.yml",
        "version: '3'\nservices:\n  svc:\n    image: bb:1\n    command: sleep 1000\n    network_mode: host\n",
    );
    let pre = env.path("pre-ran");
    let pre_script = write(
        &env,
        "pre.sh",
        &format!("#!/bin/sh\necho x >> {}\n", pre.display()),
    );
    std::fs::set_permissions(
        &pre_script,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let params = [
        ("EARTHLY_DOCKERD_DATA_ROOT", root.to_str().unwrap()),
        ("EARTHLY_DOCKERD_CACHE_DATA", "true"),
        ("EARTHLY_DOCKER_LOAD_FILES", tar.to_str().unwrap()),
        ("EARTHLY_START_COMPOSE", "true"),
        ("EARTHLY_COMPOSE_FILES", file.to_str().unwrap()),
        ("EARTHLY_COMPOSE_SERVICES", "svc"),
    ];
    let pre_env = [(
        "EARTHLY_DOCKER_WRAPPER_PRE_SCRIPT",
        pre_script.to_str().unwrap(),
    )];
    let o = earthly_call(
        &env,
        &params,
        &pre_env,
        "echo P=$COMPOSE_PROJECT_NAME T=$COMPOSE_HTTP_TIMEOUT; docker ps --format '{{.Names}}'",
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("P=default T=600"), "{out}");
    assert!(out.lines().any(|l| l == "default_svc_1"), "{out}");
    // Compose's `down --remove-orphans` ran: the next run on the cached root finds no
    // leftover container.
    let o = earthly_call(
        &env,
        &params[..2],
        &[],
        "echo P=${COMPOSE_PROJECT_NAME:-unset}",
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("P=unset"));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("0 leftover container(s) removed"),
        "{}",
        text(&o)
    );

    // get-compose-config, both contracts, after the pre-script.
    for (line, out_file) in [
        (
            format!("EARTHLY_START_COMPOSE=\"true\" EARTHLY_COMPOSE_FILES=\"{}\" EARTHLY_COMPOSE_SERVICES=\"svc\" {} get-compose-config", file.display(), wrapper_path(&env).display()),
            "/tmp/earthly/compose-config.yml",
        ),
        (
            format!("{} get-compose-config --start-compose --compose-file={} --compose-service='svc'", wrapper_path(&env).display(), sh_quote(file.to_str().unwrap())),
            "/tmp/earthbuild/compose-config.yml",
        ),
    ] {
        let _ = std::fs::remove_file(out_file);
        let o = shell_call(&env, &line, &pre_env).output().unwrap();
        assert!(o.status.success(), "{line}: {}", text(&o));
        let merged = std::fs::read_to_string(out_file).unwrap();
        assert!(merged.contains("sleep 1000"), "{merged}");
    }
    let pre_runs = std::fs::read_to_string(&pre).unwrap().lines().count();
    assert_eq!(pre_runs, 3, "the pre-script runs for both sub-commands");
    env.assert_clean();
}

#[test]
fn two_concurrent_uncached_runs_on_one_root_both_succeed() {
    let env = Env::new("  network: none");
    let tar = image_tar();
    let root = env.path("dind/target-hash");
    let script = |me: &str, other: &str| {
        format!(
            "touch {me}; while [ ! -e {other} ]; do sleep 0.05; done; docker run --rm --network host bb:1 echo ok-$EARTHLY_WITH_DOCKER; docker info -f '{{{{.DockerRootDir}}}}'",
            me = env.path(me).display(),
            other = env.path(other).display()
        )
    };
    let params = [
        ("EARTHLY_DOCKERD_DATA_ROOT", root.to_str().unwrap()),
        ("EARTHLY_DOCKERD_CACHE_DATA", "false"),
        ("EARTHLY_DOCKER_LOAD_FILES", tar.to_str().unwrap()),
    ];
    let spawn = |s: String| {
        Killer(Some(
            earthly_call(&env, &params, &[], &s)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        ))
    };
    // Each waits until the other runs: they overlap by construction.
    let mut a = spawn(script("a-in", "b-in"));
    let mut b = spawn(script("b-in", "a-in"));
    let (oa, ob) = (finish(&mut a), finish(&mut b));
    assert!(oa.status.success(), "{}", text(&oa));
    assert!(ob.status.success(), "{}", text(&ob));
    let dirs: Vec<String> = [&oa, &ob]
        .iter()
        .map(|o| {
            let out = String::from_utf8_lossy(&o.stdout).into_owned();
            assert!(out.contains("ok-1"), "{out}");
            out.lines().last().unwrap().to_string()
        })
        .collect();
    assert_ne!(dirs[0], dirs[1], "each run had its own data root");
    for d in &dirs {
        assert_eq!(Path::new(d).parent(), Some(root.as_path()));
        assert!(!Path::new(d).exists(), "{d} not removed");
    }
    assert!(root.is_dir(), "the shared root itself stays");
    env.assert_clean();
}

#[test]
fn tools_reach_dockerd_on_var_run_docker_sock_and_the_log_is_var_log_docker_log() {
    let _host = host_paths();
    // The drop-in's defaults: /var/run/docker.sock when free, /var/log/docker.log.
    let env = Env::new(
        "  network: none\n  default_socket: /var/run/docker.sock\n  log_file: /var/log/docker.log",
    );
    let sock = Path::new("/var/run/docker.sock");
    assert!(
        std::os::unix::net::UnixStream::connect(sock).is_err(),
        "/var/run/docker.sock already answers: another Docker runs on this host"
    );
    let root = env.path("dind/sock");
    let o = earthly_call(
        &env,
        &[("EARTHLY_DOCKERD_DATA_ROOT", root.to_str().unwrap())],
        &[],
        // A tool that hard-codes the socket, and DOCKER_HOST kept for the rest.
        "docker -H unix:///var/run/docker.sock info -f '{{.DockerRootDir}}'; echo $DOCKER_HOST; curl -s --unix-socket /var/run/docker.sock http://d/_ping; echo",
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(Path::new(lines[0]).parent(), Some(root.as_path()), "{out}");
    assert!(
        lines[1].starts_with("unix://") && lines[1] != "unix:///var/run/docker.sock",
        "{out}"
    );
    assert_eq!(lines[2], "OK", "{out}");
    let log = std::fs::read_to_string("/var/log/docker.log").unwrap();
    assert!(log.contains("/var/run/docker.sock"), "dockerd's log: {log}");
    assert!(
        std::os::unix::net::UnixStream::connect(sock).is_err(),
        "nothing answers on the socket after the run"
    );
    env.assert_clean();

    // Taken by another daemon: the drop-in keeps its own socket and says nothing breaks.
    let busy = std::os::unix::net::UnixListener::bind(env.path("busy.sock")).unwrap();
    let env2 = Env::new(&format!(
        "  network: none\n  default_socket: {}\n  log_file: off",
        env.path("busy.sock").display()
    ));
    let o = earthly_call(
        &env2,
        &[(
            "EARTHLY_DOCKERD_DATA_ROOT",
            env2.path("r").to_str().unwrap(),
        )],
        &[],
        "docker info -f '{{.DockerRootDir}}'",
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    drop(busy);
    env2.assert_clean();
}

#[test]
fn start_failure_prints_the_whole_log_bounded() {
    let env0 = Env::new("");
    // A dockerd that writes ~100 KiB of log, then fails.
    let fake = write(
        &env0,
        "dockerd",
        "#!/bin/sh\necho FIRST-LINE\ni=0\nwhile [ $i -lt 2000 ]; do echo \"line $i ........................................\"; i=$((i+1)); done\necho 'error initializing graphdriver: boom'\nexit 3\n",
    );
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let log = env0.path("docker.log");
    let env = Env::new(&format!(
        "  network: none\n  binary: {}\n  log_file: {}",
        fake.display(),
        log.display()
    ));
    let o = earthly(
        &env,
        &[("EARTHLY_DOCKERD_DATA_ROOT", env.path("d").to_str().unwrap())],
        &["execute", "echo", "RAN"],
    );
    assert_eq!(o.status.code(), Some(69), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    let first = err.lines().next().unwrap();
    assert!(
        first.contains(&format!("its log is {}", log.display())),
        "{first}"
    );
    assert!(
        err.contains("error initializing graphdriver: boom"),
        "{err}"
    );
    assert!(err.contains("line 1999"), "{err}");
    assert!(!err.contains("FIRST-LINE"), "more than 64 KiB shown");
    assert!(err.len() < 70 * 1024, "{} bytes", err.len());
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("FIRST-LINE"));
    env.assert_clean();
}

#[test]
fn debug_cmd_runs_then_exits_1() {
    let env = Env::new("");
    let o = earthly(
        &env,
        &[
            ("EARTHLY_DOCKER_WRAPPER_DEBUG_CMD", "echo in-debug; exit 3"),
            ("EARTHLY_DOCKERD_DATA_ROOT", env.path("d").to_str().unwrap()),
        ],
        &["execute", "echo", "RAN"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("Running debug command: echo in-debug; exit 3"),
        "{out}"
    );
    assert!(out.contains("in-debug"), "{out}");
    assert!(
        out.contains("debug command exited with 3; forcing exit 1"),
        "{out}"
    );
    assert!(
        !out.contains("RAN") && !env.path("d").exists(),
        "nothing else ran"
    );
}

#[test]
fn a_failed_removal_of_a_cached_image_is_a_warning_not_a_failure() {
    // The fault a real daemon shows only on a damaged root (Earthly's issue #4267): `docker rmi`
    // refusing. A docker CLI that refuses every `rmi` and passes everything else to the real one.
    let env0 = Env::new("");
    let cli = write(
        &env0,
        "docker",
        "#!/bin/sh\nif [ \"$1\" = rmi ]; then echo 'Error response from daemon: conflict: unable to remove repository reference' >&2; exit 1; fi\nexec /usr/bin/docker \"$@\"\n",
    );
    std::fs::set_permissions(&cli, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let env = Env::new(&format!("  network: none\n  docker_cli: {}", cli.display()));
    let tar = image_tar();
    let root = env.path("dind/cache_stale");
    let vars = [
        ("EARTHLY_DOCKERD_DATA_ROOT", root.to_str().unwrap()),
        ("EARTHLY_DOCKERD_CACHE_DATA", "true"),
        ("EARTHLY_DOCKER_LOAD_FILES", tar.to_str().unwrap()),
    ];
    for run in 0..2 {
        let o = earthly(&env, &vars, &["execute", "docker", "images", "-q", "bb:1"]);
        assert!(o.status.success(), "run {run}: {}", text(&o));
        assert!(!String::from_utf8_lossy(&o.stdout).trim().is_empty());
        if run == 1 {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                err.contains("could not remove cached image") && err.contains("continuing"),
                "{err}"
            );
        }
    }
    env.assert_clean();
}
