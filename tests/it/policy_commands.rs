//! `cachelock policy simulate|check|list|new` as a user runs them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::policy::{isolated_config, test_policy, BIN};

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .env("CACHELOCK_CONFIG", isolated_config(&dir.join("cfg"), ""))
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `policy simulate --json`: (served order, fates by id).
fn simulate(dir: &Path, policy: &str, scenario: &str, extra: &[&str]) -> serde_json::Value {
    let file = dir.join(format!("scenario-{}.yaml", scenario.len()));
    std::fs::write(&file, scenario).unwrap();
    let mut args = vec![
        "policy",
        "simulate",
        "--json",
        "--policy",
        policy,
        "--scenario",
    ];
    args.push(file.to_str().unwrap());
    args.extend_from_slice(extra);
    let out = run(dir, &args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn served(v: &serde_json::Value) -> Vec<String> {
    v["served_order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn fate<'a>(v: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    v["fates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f[0] == id)
        .map(|f| &f[1])
        .unwrap_or_else(|| panic!("no fate for {id}"))
}

#[test]
fn simulate_default_is_fifo_among_equals_and_priority_first() {
    let dir = tempfile::tempdir().unwrap();
    let v = simulate(
        dir.path(),
        "builtin:default",
        "holders:\n  - {id: h, release_at_ms: 1000}\narrivals:\n  - {id: a, at_ms: 0, hold_ms: 100}\n  - {id: b, at_ms: 10, hold_ms: 100}\n  - {id: c, at_ms: 20, hold_ms: 100}\n  - {id: d, at_ms: 30, hold_ms: 100}\n",
        &[],
    );
    assert_eq!(served(&v), ["a", "b", "c", "d"]);
    assert_eq!(fate(&v, "a")["served"]["at_ms"], 1000);
    assert_eq!(fate(&v, "d")["served"]["at_ms"], 1300);
    let v = simulate(
        dir.path(),
        "default",
        "holders:\n  - {id: h, release_at_ms: 1000}\narrivals:\n  - {id: a, at_ms: 0}\n  - {id: b, at_ms: 10}\n  - {id: urgent, at_ms: 500, priority: 10}\n",
        &[],
    );
    assert_eq!(served(&v), ["urgent", "a", "b"]);
}

#[test]
fn simulate_priority_with_boosts_and_aging() {
    let dir = tempfile::tempdir().unwrap();
    // old waits from t=0 at priority 0; vip arrives at 10 s with priority 5; main (boosted)
    // arrives at 15 s. At 20 s, with one point per second of aging, old (20) beats vip (5+10).
    let scenario = "holders:\n  - {id: h, release_at_ms: 20000}\narrivals:\n  - {id: old, at_ms: 0, hold_ms: 10}\n  - {id: vip, at_ms: 10000, priority: 5, hold_ms: 10}\n  - {id: main, at_ms: 15000, labels: {branch: main}, hold_ms: 10}\n";
    let aging = simulate(
        dir.path(),
        "builtin:priority",
        scenario,
        &[
            "--policy-config",
            "aging_per_minute=60",
            "--policy-config",
            "boost.branch.main=100",
        ],
    );
    assert_eq!(served(&aging), ["main", "old", "vip"]);
    let no_aging = simulate(
        dir.path(),
        "builtin:priority",
        scenario,
        &[
            "--policy-config",
            "aging_per_minute=0",
            "--policy-config",
            "boost.branch.main=100",
        ],
    );
    assert_eq!(served(&no_aging), ["main", "vip", "old"]);
}

#[test]
fn simulate_deadline_gives_up_and_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = "fallback: true\nholders:\n  - {id: h, release_at_ms: 10000}\narrivals:\n  - {id: a, at_ms: 0}\n  - {id: b, at_ms: 500}\n";
    let v = simulate(
        dir.path(),
        "builtin:deadline",
        scenario,
        &["--policy-config", "max_wait=2s"],
    );
    for (id, at) in [("a", 2000), ("b", 2500)] {
        let f = &fate(&v, id)["gave-up"];
        assert_eq!(f["at_ms"], at, "{v}");
        assert!(f["reason"].as_str().unwrap().contains("max_wait"), "{v}");
    }
    let v = simulate(
        dir.path(),
        "builtin:deadline",
        scenario,
        &[
            "--policy-config",
            "fallback_after=1s",
            "--policy-config",
            "max_wait=5s",
        ],
    );
    assert_eq!(fate(&v, "a")["fell-back"]["at_ms"], 1000, "{v}");
    assert_eq!(fate(&v, "b")["fell-back"]["at_ms"], 1500, "{v}");
    // Where the lock does not allow a fallback, the request keeps waiting until max_wait.
    let v = simulate(
        dir.path(),
        "builtin:deadline",
        &scenario.replace("fallback: true", "fallback: false"),
        &[
            "--policy-config",
            "fallback_after=1s",
            "--policy-config",
            "max_wait=5s",
        ],
    );
    assert_eq!(fate(&v, "a")["gave-up"]["at_ms"], 5000, "{v}");
    // Backoff: re-evaluations of a waiter behind the head get sparser.
    let waits: Vec<u64> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["id"] == "b" && e["kind"] == "wait")
        .filter_map(|e| {
            e["detail"]
                .as_str()
                .unwrap()
                .strip_prefix("keep-waiting ")?
                .strip_suffix(" ms")?
                .parse()
                .ok()
        })
        .collect();
    assert!(waits.len() >= 3 && waits[2] > waits[0], "{waits:?}");
}

#[test]
fn simulate_text_output_and_bad_scenarios() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.yaml");
    std::fs::write(
        &file,
        "holders:\n  - {id: h, release_at_ms: 100}\narrivals:\n  - {id: a}\n",
    )
    .unwrap();
    let out = run(
        dir.path(),
        &[
            "policy",
            "simulate",
            "--policy",
            "default",
            "--scenario",
            file.to_str().unwrap(),
        ],
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains("served in order: a") && t.contains("a: served at 0.100s"),
        "{t}"
    );
    std::fs::write(&file, "arrivals:\n  - id: a\n    at_ms: later\n").unwrap();
    let out = run(
        dir.path(),
        &[
            "policy",
            "simulate",
            "--policy",
            "default",
            "--scenario",
            file.to_str().unwrap(),
        ],
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(65), "{t}");
    assert!(t.contains("line 3") && t.contains("at_ms"), "{t}");
    let out = run(
        dir.path(),
        &[
            "policy",
            "simulate",
            "--policy",
            "default",
            "--scenario",
            "/nonexistent.yaml",
        ],
    );
    assert_eq!(out.status.code(), Some(66), "{}", text(&out));
}

#[test]
fn check_prints_exports_and_limits_and_refuses_bad_modules() {
    let dir = tempfile::tempdir().unwrap();
    for b in ["builtin:default", "priority", "deadline"] {
        let out = run(dir.path(), &["policy", "check", b]);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(0), "{t}");
        assert!(
            t.contains("cachelock:policy/lock-policy@0.1.0")
                && t.contains("fuel 10000000 per call"),
            "{t}"
        );
    }
    let other = test_policy("test-other-world");
    let out = run(dir.path(), &["policy", "check", other.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    let out = run(
        dir.path(),
        &[
            "policy",
            "check",
            "builtin:deadline",
            "--policy-config",
            "max_wait=soon",
        ],
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(78), "{t}");
    assert!(t.contains("max_wait"), "{t}");
    let out = run(dir.path(), &["policy", "check", "nonesuch"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(78), "{t}");
    assert!(t.contains("no policy named \"nonesuch\""), "{t}");
}

#[test]
fn list_shows_bindings() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "default_policy: priority\nlocks:\n  - match: 'ci-*'\n    policy: team\n    slots: 2\n    fallback: true\npolicies:\n  team:\n    module: {}\n    config: {{ms_per_point: 50}}\n    on_error: default\n",
            test_policy("test-aging").display()
        ),
    )
    .unwrap();
    let out = run(
        dir.path(),
        &["policy", "list", "--config", cfg.to_str().unwrap()],
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    let ci = t
        .lines()
        .find(|l| l.contains("ci-*"))
        .unwrap_or_else(|| panic!("{t}"));
    assert!(
        ci.contains("team = ")
            && ci.contains("test_aging.wasm")
            && ci.contains("slots 2")
            && ci.contains("fallback yes"),
        "{ci}"
    );
    let other = t.lines().find(|l| l.contains("(any other lock)")).unwrap();
    assert!(other.contains("priority = builtin:priority"), "{other}");
    assert!(
        t.contains("ms_per_point=50") && t.contains("on_error=default"),
        "{t}"
    );
}

/// The scaffold builds for wasm32-wasip2 on its own and passes `policy check` and `simulate`.
#[test]
fn new_scaffolds_a_buildable_policy() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(dir.path(), &["policy", "new", "team-policy"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let krate = dir.path().join("team-policy");
    let again = run(dir.path(), &["policy", "new", "team-policy"]);
    assert_eq!(again.status.code(), Some(73), "{}", text(&again));
    let bad = run(dir.path(), &["policy", "new", "9lives"]);
    assert_eq!(bad.status.code(), Some(64), "{}", text(&bad));
    // Share the test programs' target directory so the SDK's dependencies are not rebuilt.
    let wasm = test_policy("test-loop");
    let target: PathBuf = wasm.ancestors().nth(3).unwrap().to_path_buf();
    let cargo = || {
        let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            if k.starts_with("CARGO_") && k != "CARGO_HOME" || k == "RUSTFLAGS" {
                c.env_remove(k);
            }
        }
        c
    };
    // The crate's own `target` is the shared one, so its test file finds the component where
    // the README's build puts it.
    std::os::unix::fs::symlink(&target, krate.join("target")).unwrap();
    // `cargo test` works as generated: the decisions' unit tests run natively.
    let unit = cargo()
        .args(["test", "--quiet"])
        .current_dir(&krate)
        .output()
        .unwrap();
    assert!(unit.status.success(), "{}", text(&unit));
    assert!(text(&unit).contains("2 passed"), "{}", text(&unit));
    let build = cargo()
        .args(["build", "--release", "--quiet", "--target", "wasm32-wasip2"])
        .current_dir(&krate)
        .output()
        .unwrap();
    assert!(build.status.success(), "{}", text(&build));
    let wasm = target.join("wasm32-wasip2/release/team_policy.wasm");
    let out = run(dir.path(), &["policy", "check", wasm.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // The scaffold's table-driven tests pass against the component.
    let tests = run(&krate, &["policy", "test"]);
    assert_eq!(tests.status.code(), Some(0), "{}", text(&tests));
    assert!(
        text(&tests).contains("7 passed, 0 failed"),
        "{}",
        text(&tests)
    );
    let scenario = krate.join("scenario.yaml");
    let v = simulate_file(dir.path(), wasm.to_str().unwrap(), &scenario);
    assert_eq!(served(&v), ["main", "pr-1", "pr-2"]);
}

fn simulate_file(dir: &Path, policy: &str, scenario: &Path) -> serde_json::Value {
    let out = run(
        dir,
        &[
            "policy",
            "simulate",
            "--json",
            "--policy",
            policy,
            "--scenario",
            scenario.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `policy new --lang python|js` scaffolds policies that componentize-py and componentize-js
/// (both installed by `make setup`) build and that pass `policy simulate`.
#[test]
fn new_scaffolds_python_and_js_policies() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        dir.path(),
        &["policy", "new", "py-team", "--lang", "python"],
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains("componentize-py -d wit -w policy componentize app -o py-team.wasm"),
        "{t}"
    );
    let root = dir.path().join("py-team");
    for f in [
        "app.py",
        "wit/policy.wit",
        "scenario.yaml",
        "policy.test.yaml",
        "README.md",
    ] {
        assert!(root.join(f).is_file(), "{f} missing");
    }
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(readme.contains("componentize-py==0.25.1"), "{readme}");
    crate::support::policy::python_policy(); // fails, saying what to install, without it
    let build = Command::new("componentize-py")
        .args([
            "-d",
            "wit",
            "-w",
            "policy",
            "componentize",
            "app",
            "-o",
            "py-team.wasm",
        ])
        .current_dir(&root)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap();
    assert!(build.status.success(), "{}", text(&build));
    let v = simulate_file(
        dir.path(),
        root.join("py-team.wasm").to_str().unwrap(),
        &root.join("scenario.yaml"),
    );
    assert_eq!(served(&v), ["main", "pr-1", "pr-2"]);
    let tests = run(&root, &["policy", "test"]);
    assert_eq!(tests.status.code(), Some(0), "{}", text(&tests));
    assert!(
        text(&tests).contains("7 passed, 0 failed"),
        "{}",
        text(&tests)
    );

    let out = run(dir.path(), &["policy", "new", "js-team", "--lang", "js"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let root = dir.path().join("js-team");
    let pkg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("package.json")).unwrap()).unwrap();
    assert_eq!(pkg["name"], "js-team");
    assert!(pkg["scripts"]["build"]
        .as_str()
        .unwrap()
        .contains("--disable http fetch-event --out js-team.wasm"));
    assert_eq!(
        pkg["devDependencies"]["@bytecodealliance/componentize-js"],
        "0.23.0"
    );
    assert!(root.join("wit/policy.wit").is_file());
    // The package's build script, run with the componentize-js `make setup` installed.
    let version = Command::new("componentize-js")
        .arg("--version")
        .output()
        .expect("componentize-js is needed: run `make setup` (npm install -g @bytecodealliance/componentize-js@0.23.0)");
    assert_eq!(String::from_utf8_lossy(&version.stdout).trim(), "0.23.0");
    let script = pkg["scripts"]["build"].as_str().unwrap();
    let build = Command::new("sh")
        .args(["-c", script])
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(build.status.success(), "{}", text(&build));
    let v = simulate_file(
        dir.path(),
        root.join("js-team.wasm").to_str().unwrap(),
        &root.join("scenario.yaml"),
    );
    assert_eq!(served(&v), ["main", "pr-1", "pr-2"]);
    let tests = run(&root, &["policy", "test"]);
    assert_eq!(tests.status.code(), Some(0), "{}", text(&tests));
    assert!(
        text(&tests).contains("7 passed, 0 failed"),
        "{}",
        text(&tests)
    );
    let bad = run(dir.path(), &["policy", "new", "x", "--lang", "cobol"]);
    assert_eq!(bad.status.code(), Some(64), "{}", text(&bad));
}
