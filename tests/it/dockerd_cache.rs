//! Cached data roots against the real dockerd: exclusion on one cache id, hygiene across runs,
//! slots running in parallel (network isolation), fresh roots.

use std::time::Duration;

use crate::support::dockerd::*;

/// Each run records (start, end) of its command, the dockerd processes on the data root seen
/// by the OS at both ends, and dockerd's own start time.
fn interval_script(env: &Env, root: &std::path::Path, name: &str) -> String {
    let _ = root;
    let out = env.path(name);
    // Count dockerd processes on the root from /proc (the OS's view, not cachelock's).
    let count = format!(
        "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | awk '$1 ~ /dockerd$/ && index($0, \"--data-root={} \")' | wc -l",
        root.display()
    );
    format!(
        r#"s=$(date +%s%N)
           n1=$({count})
           docker run --rm bb:1 echo in-{name} >/dev/null || exit 9
           sleep 0.5
           n2=$({count})
           e=$(date +%s%N)
           echo "$s $e $n1 $n2 $CACHELOCK_DOCKERD_PID" > {out}"#,
        out = out.display(),
    )
}

#[test]
fn three_wrappers_on_one_cache_id_never_overlap() {
    let env = Env::new("");
    let tar = image_tar();
    let root = env.cache_root.join("shared");
    let mut kids = Vec::new();
    for i in 0..3 {
        let script = interval_script(&env, &root, &format!("run{i}"));
        kids.push(Killer(Some(env.spawn_dockerd(
            &["--cache-id", "shared", "--load", tar.to_str().unwrap()],
            &script,
        ))));
    }
    for k in &mut kids {
        let o = k.0.take().unwrap().wait_with_output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
    }
    let mut iv: Vec<(u128, u128, u32, u32, String)> = (0..3)
        .map(|i| {
            let t = std::fs::read_to_string(env.path(&format!("run{i}"))).unwrap();
            let f: Vec<&str> = t.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                f[3].parse().unwrap(),
                f[4].to_string(),
            )
        })
        .collect();
    iv.sort();
    for w in iv.windows(2) {
        assert!(w[0].1 <= w[1].0, "runs overlap: {iv:?}");
    }
    for r in &iv {
        assert_eq!(
            (r.2, r.3),
            (1, 1),
            "exactly one dockerd on the data root: {iv:?}"
        );
    }
    let pids: std::collections::BTreeSet<_> = iv.iter().map(|r| r.4.clone()).collect();
    assert_eq!(pids.len(), 3, "three distinct dockerd");
    env.assert_clean();
}

#[test]
fn image_loaded_in_one_run_is_there_retagged_in_the_next() {
    let env = Env::new("");
    let tar = image_tar();
    let tar = tar.to_str().unwrap();
    let o = env.dockerd(
        &["--cache-id", "img", "--load", tar],
        "docker run -d --stop-timeout 1 bb:1 sleep 100 >/dev/null; docker volume create leftover >/dev/null; docker images -q --no-trunc bb:1",
    );
    assert!(o.status.success(), "{}", text(&o));
    let id1 = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(id1.starts_with("sha256:"), "{id1}");
    // Second run: the cached image is re-tagged, the load brings it back under its name, the
    // leftover container and volume are gone.
    let o = env.dockerd(
        &["--cache-id", "img", "--load", tar],
        "docker images -q --no-trunc bb:1; docker ps -aq | wc -l; docker volume ls -q | wc -l; docker images --format '{{.Repository}}' | grep -c cachelock_cached_; true",
    );
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(lines, vec![id1.as_str(), "0", "0", "0"], "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("1 leftover container(s) removed, 1 image(s) re-tagged cachelock_cached_*, 1 kept by the loads, 0 removed"),
        "{err}"
    );
    // Third run without loads: the cached image nobody re-tagged is removed.
    let o = env.dockerd(&["--cache-id", "img"], "docker images -aq | wc -l");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "0");
    assert!(String::from_utf8_lossy(&o.stderr).contains("0 kept by the loads, 1 removed"));
    env.assert_clean();
}

#[test]
fn slots_run_in_parallel_each_on_its_own_root_with_containers() {
    let env = Env::with("", "locks:\n  - match: 'par*'\n    slots: 2");
    let tar = image_tar();
    let mut kids = Vec::new();
    for i in 0..2 {
        let out = env.path(&format!("slot{i}"));
        let script = format!(
            r#"s=$(date +%s%N)
               docker run --rm bb:1 sh -c 'sleep 2; echo ok' | grep -q ok || exit 9
               docker network create n$$ >/dev/null && docker run --rm --network n$$ bb:1 true || exit 8
               e=$(date +%s%N)
               echo "$s $e $CACHELOCK_DOCKERD_SLOT $CACHELOCK_DOCKERD_DATA_ROOT" > {}"#,
            out.display()
        );
        kids.push(Killer(Some(env.spawn_dockerd(
            &["--cache-id", "par", "--load", tar.to_str().unwrap()],
            &script,
        ))));
    }
    for k in &mut kids {
        let o = k.0.take().unwrap().wait_with_output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
    }
    let r: Vec<Vec<String>> = (0..2)
        .map(|i| {
            std::fs::read_to_string(env.path(&format!("slot{i}")))
                .unwrap()
                .split_whitespace()
                .map(String::from)
                .collect()
        })
        .collect();
    let (s0, e0): (u128, u128) = (r[0][0].parse().unwrap(), r[0][1].parse().unwrap());
    let (s1, e1): (u128, u128) = (r[1][0].parse().unwrap(), r[1][1].parse().unwrap());
    assert!(s0 < e1 && s1 < e0, "slots did not overlap: {r:?}");
    let mut slots = vec![r[0][2].clone(), r[1][2].clone()];
    slots.sort();
    assert_eq!(slots, vec!["0", "1"]);
    // Slot 0 is the cached root itself, the others live beside it (never inside).
    for row in &r {
        let want = match row[2].as_str() {
            "0" => env.cache_root.join("par"),
            k => env
                .cache_root
                .join(format!(".cachelock-slots/par/{k}/root")),
        };
        assert_eq!(row[3], want.display().to_string());
    }
    env.assert_clean();
}

#[test]
fn shared_mode_is_refused() {
    let env = Env::new("");
    let o = env.dockerd(&["-s", "--cache-id", "x"], "true");
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("slots"));
}

#[test]
fn nonblock_conflict_while_a_run_holds_the_cache_id() {
    let env = Env::new("");
    let flag = env.path("ready");
    let mut k = Killer(Some(env.spawn_dockerd(
        &["--cache-id", "busy"],
        &format!("touch {}; sleep 3", flag.display()),
    )));
    let t = std::time::Instant::now();
    while !flag.exists() {
        assert!(t.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = env.dockerd(&["-n", "--cache-id", "busy"], "echo never");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("never"));
    let o = k.0.take().unwrap().wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    env.assert_clean();
}

#[test]
fn fall_back_runs_uncached_on_a_fresh_root_while_the_cache_is_busy() {
    let env = Env::with(
        "",
        "locks:\n  - match: 'fb*'\n    fallback: true\n    policy: quick\npolicies:\n  quick:\n    module: builtin:deadline\n    config: {fallback_after: 300ms}",
    );
    let flag = env.path("ready");
    let mut holder = Killer(Some(env.spawn_dockerd(
        &["--cache-id", "fb1"],
        &format!("touch {}; sleep 4; date +%s%N", flag.display()),
    )));
    let t = std::time::Instant::now();
    while !flag.exists() {
        assert!(t.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = env.dockerd(
        &["--cache-id", "fb1"],
        "echo \"$CACHELOCK_DOCKERD_DATA_ROOT ${CACHELOCK_DOCKERD_SLOT:-none}\"; date +%s%N",
    );
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let mut lines = out.lines();
    let first: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let fb_end: u128 = lines.next().unwrap().trim().parse().unwrap();
    let fresh = std::path::Path::new(first[0]);
    assert!(
        fresh.starts_with(env.cache_root.join(".cachelock-private")),
        "{}",
        text(&o)
    );
    assert_eq!(first[1], "none");
    assert!(!fresh.exists(), "fall-back root not wiped");
    assert!(String::from_utf8_lossy(&o.stderr).contains("fresh private data root"));
    let h = holder.0.take().unwrap().wait_with_output().unwrap();
    assert!(h.status.success(), "{}", text(&h));
    let holder_end: u128 = String::from_utf8_lossy(&h.stdout).trim().parse().unwrap();
    assert!(
        fb_end < holder_end,
        "the fall-back run did not run beside the holder"
    );
    env.assert_clean();
}

/// `cache ls` shows a real cached root (size, layout, who holds it), `cache rm` refuses it
/// while a request holds its lock and empties it once nobody does (its lock stays), and
/// `serve --cache-root` exports it as `cachelock_cache_root_*` and `/api/v1/cache`.
#[test]
fn cached_roots_are_listed_refused_while_held_and_removed() {
    use crate::support::observe::{get, sample, Holder, Serve};
    let env = Env::new("");
    let tar = image_tar();
    let o = env.dockerd(
        &["--cache-id", "app", "--load", tar.to_str().unwrap()],
        "docker image inspect bb:1 >/dev/null",
    );
    assert!(o.status.success(), "{}", text(&o));
    let ls = |env: &Env| -> serde_json::Value {
        let o = env.cmd().args(["cache", "ls", "--json"]).output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let app = |v: &serde_json::Value| -> serde_json::Value {
        v["roots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["cache_id"] == "app")
            .cloned()
            .unwrap_or_else(|| panic!("no root app: {v}"))
    };
    let v = ls(&env);
    let r = app(&v);
    assert_eq!(r["layout"], "dockerd");
    assert_eq!(r["slots"], 1);
    assert!(r["size_bytes"].as_u64().unwrap() > 100_000, "{r}");
    assert_eq!(r["held_by"], serde_json::json!([]));
    assert_eq!(r["evictable"], true);
    let table = env.cmd().args(["cache", "ls"]).output().unwrap();
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        table.contains("app") && table.contains("nobody (evictable)"),
        "{table}"
    );

    let serve_log = env.path("serve.log");
    // Its cache root from CACHELOCK_CACHE_ROOT, as every other command's.
    let serve = Serve::start(env.cmd(), &serve_log);
    let bytes = r["size_bytes"].as_u64().unwrap() as f64;
    serve.wait_sample("cachelock_cache_root_bytes", r#"cache_id="app""#, bytes);
    let m = serve.metrics();
    assert!(
        sample(
            &m,
            "cachelock_cache_root_last_used_timestamp_seconds",
            r#"cache_id="app""#
        )
        .is_some_and(|t| t > 1.0e9),
        "{m}"
    );
    let doc: serde_json::Value =
        serde_json::from_slice(&get(serve.addr, "/api/v1/cache", &[]).body).unwrap();
    assert_eq!(app(&doc)["size_bytes"], r["size_bytes"]);
    drop(serve);

    // Held by a request on the same lock: listed with its holder, and not removed.
    let scratch = env.path("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let holder = Holder::start(env.cmd(), &scratch, "app", &[]);
    let r = app(&ls(&env));
    assert_eq!(r["evictable"], false);
    assert!(!r["held_by"].as_array().unwrap().is_empty(), "{r}");
    let o = env.cmd().args(["cache", "rm", "app"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("in use"), "{}", text(&o));
    assert!(
        std::fs::read_dir(env.cache_root.join("app"))
            .unwrap()
            .count()
            > 0
    );
    holder.release();

    let o = env.cmd().args(["cache", "rm", "app"]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::read_dir(env.cache_root.join("app"))
            .unwrap()
            .count(),
        0,
        "the root is emptied"
    );
    assert!(env.lock_dir.join("app.lock").is_dir(), "its lock stays");
    assert!(app(&ls(&env))["size_bytes"].as_u64().unwrap() < 100_000);
    let o = env.cmd().args(["cache", "rm", "nosuch"]).output().unwrap();
    assert_eq!(o.status.code(), Some(66), "{}", text(&o));
    assert!(
        text(&o).contains("no cached data root nosuch"),
        "{}",
        text(&o)
    );
}
