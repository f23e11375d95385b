//! `cachelock policy check|simulate|list|new`.

use std::path::{Path, PathBuf};

use crate::cli::{PolicyCommand, PolicyLang};
use cachelock::config::{Loaded, OnError};
use cachelock::error::{Error, Kind, Result};
use cachelock::policy::{self, scenario::Scenario, simulate, Policy};

#[cfg(feature = "oci")]
use super::policy_oci as oci;

/// Runs a `cachelock policy` sub-command; returns the exit code.
pub fn execute(cmd: PolicyCommand) -> Result<i32> {
    match cmd {
        PolicyCommand::Check {
            policy,
            policy_config,
            config,
        } => {
            let loaded = Loaded::load(config.as_deref())?;
            match policy {
                Some(p) => check(&loaded, &p, &policy_config),
                None => check_all(&loaded, &policy_config),
            }
        }
        PolicyCommand::Simulate {
            policy,
            scenario,
            policy_config,
            json,
            config,
        } => simulate(
            &Loaded::load(config.as_deref())?,
            &policy,
            &scenario,
            &policy_config,
            json,
        ),
        #[cfg(not(feature = "oci"))]
        PolicyCommand::Push { .. }
        | PolicyCommand::Pull { .. }
        | PolicyCommand::Sign { .. }
        | PolicyCommand::Verify { .. } => Err(Error::config(
            "oci:// policies need the OCI client, which this build of cachelock leaves out (cargo feature `oci`)",
        )),
        #[cfg(feature = "oci")]
        PolicyCommand::Push {
            file,
            reference,
            sign_key,
            policy_config,
            config,
        } => oci::push(
            &Loaded::load(config.as_deref())?,
            &file,
            &reference,
            sign_key.as_deref(),
            &policy_config,
        ),
        #[cfg(feature = "oci")]
        PolicyCommand::Pull { policy, config } => {
            oci::pull(&Loaded::load(config.as_deref())?, policy.as_deref())
        }
        #[cfg(feature = "oci")]
        PolicyCommand::Sign {
            reference,
            key,
            config,
        } => oci::sign(&Loaded::load(config.as_deref())?, &reference, &key),
        #[cfg(feature = "oci")]
        PolicyCommand::Verify {
            reference,
            key,
            config,
        } => oci::verify(&Loaded::load(config.as_deref())?, &reference, &key),
        PolicyCommand::Test { paths, config } => {
            super::policy_test::run(&Loaded::load(config.as_deref())?, &paths)
        }
        PolicyCommand::List { config } => list(&Loaded::load(config.as_deref())?),
        PolicyCommand::New { name, dir, lang } => new(&name, dir.as_deref(), lang),
        PolicyCommand::CompileChild {
            tier,
            max_code_bytes,
        } => {
            let tier = policy::compile::Tier::parse(&tier)
                .ok_or_else(|| Error::usage(format!("unknown tier {tier:?}")))?;
            Ok(policy::compile::child_main(tier, max_code_bytes))
        }
    }
}

/// The policies a configuration uses: those its lock rules and `default_policy` bind, then
/// the others it defines.
fn bindings(loaded: &Loaded) -> Vec<String> {
    let c = &loaded.config;
    let default = c
        .default_policy
        .clone()
        .unwrap_or_else(|| cachelock::config::DEFAULT_POLICY.to_string());
    let mut names: Vec<String> = c
        .locks
        .iter()
        .map(|r| r.policy.clone().unwrap_or_else(|| default.clone()))
        .collect();
    names.push(default);
    names.extend(c.policies.keys().cloned());
    let mut seen = std::collections::BTreeSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// `policy check` without a name: every binding, as the deploy step. Each is loaded, verified,
/// compiled and configured; the exit code is the first failure's.
fn check_all(loaded: &Loaded, extra: &[(String, String)]) -> Result<i32> {
    let names = bindings(loaded);
    let mut failed = Vec::new();
    let mut first_code = 0;
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            println!();
        }
        if let Err(e) = check(loaded, name, extra) {
            eprintln!("cachelock: {e}");
            println!("policy:    {name}: FAILED (exit {})", e.exit_code());
            if first_code == 0 {
                first_code = e.exit_code();
            }
            failed.push(name.clone());
        }
    }
    println!(
        "\n{} policies checked, {} failed{}",
        names.len(),
        failed.len(),
        if failed.is_empty() {
            String::new()
        } else {
            format!(": {}", failed.join(", "))
        }
    );
    Ok(first_code)
}

/// Loads `name` as `check` and `pull` do: an oci:// module is resolved with its registry
/// (the deploy step), not taken from the cache as a run would.
fn load_for_deploy(
    loaded: &Loaded,
    name: &str,
    extra: &[(String, String)],
) -> Result<(policy::spec::PolicySpec, policy::host::WasmPolicy)> {
    #[allow(unused_mut)]
    let mut spec = policy::spec::resolve(loaded, name, extra)?;
    #[cfg(feature = "oci")]
    if let policy::spec::Source::Oci(o) = &mut spec.source {
        o.online = true;
    }
    let p = policy::host::WasmPolicy::load(&spec)?;
    Ok((spec, p))
}

fn check(loaded: &Loaded, name: &str, extra: &[(String, String)]) -> Result<i32> {
    let (spec, mut p) = load_for_deploy(loaded, name, extra)?;
    let info = p.info().clone();
    let l = p.limits().clone();
    println!("policy:    {}", spec.name);
    println!(
        "module:    {} ({} bytes, sha256:{}){}",
        spec.source,
        info.size,
        info.sha256,
        if spec.sha256.is_some() {
            ", pin matches"
        } else {
            ""
        }
    );
    #[cfg(feature = "oci")]
    if let Some(o) = &info.oci {
        oci::print_origin(o);
    }
    println!(
        "compiled:  {}",
        match info.origin {
            policy::cache::Origin::Cached => "taken from the cache",
            policy::cache::Origin::CachedQuick =>
                "quick code from the cache (optimized code compiling for next time)",
            policy::cache::Origin::Compiled =>
                "now, quickly (optimized code compiling in the background for next time)",
        }
    );
    println!("cache:     {}", spec.cache.display());
    println!(
        "budget:    compile within {} (policy_compile), waiters wait {} s for a compile",
        spec.budget.describe(),
        spec.budget.wait.as_secs()
    );
    println!("world:     {} (ok)", policy::host::WORLD);
    println!("exports:   {}", info.exports.join(", "));
    if spec.config.is_empty() {
        println!("configure: ok (empty config)");
    } else {
        let kv: Vec<String> = spec
            .config
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("configure: ok ({})", kv.join(", "));
    }
    println!(
        "limits:    fuel {} per call, time {} ms per call, memory {} MiB, table elements {}, \
         instances {}, keep-waiting clamped to [{}, {}] ms, log {} bytes per call",
        l.fuel,
        l.time_ms,
        l.memory_bytes >> 20,
        l.table_elements,
        l.instances,
        l.min_interval_ms,
        l.max_interval_ms,
        l.log_bytes
    );
    println!(
        "on_error:  {}",
        match spec.on_error {
            OnError::Fail => "fail (a fault fails the request, exit 70)",
            OnError::Default => "default (a faulted decision is taken by builtin:default)",
        }
    );
    // One call of each decision on a sample, so that a policy that loads but faults on use is
    // caught here rather than in production.
    let sample = policy::sample_answers(&mut p)?;
    // Deploy step: let the background compile finish so that the next run finds the optimized
    // code (in the host cache when run as root).
    policy::cache::wait_for_background();
    println!(
        "sample:    rank(priority 0) = {}; on-wait(alone) = {:?}; \
         start-timeout = {} ms; stop-timeout = {} ms",
        sample.rank, sample.wait, sample.start_timeout_ms, sample.stop_timeout_ms
    );
    Ok(0)
}

fn simulate(
    loaded: &Loaded,
    name: &str,
    scenario: &Path,
    extra: &[(String, String)],
    json: bool,
) -> Result<i32> {
    // Bounded, and never blocking in open: a scenario is a YAML file like the configuration.
    let text = cachelock::config::read_text(scenario).map_err(|e| {
        Error::new(
            Kind::NoInput,
            format!("cannot read scenario {}: {e}", scenario.display()),
        )
    })?;
    let sc = Scenario::parse(&text).map_err(|m| {
        Error::new(
            Kind::DataErr,
            format!("scenario {}: {m}", scenario.display()),
        )
    })?;
    let (_, mut p) = policy::load_now(loaded, name, extra)?;
    let outcome = simulate::run(&mut p as &mut dyn Policy, &sc)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&outcome).expect("outcome serializes")
        );
    } else {
        print!("{}", simulate::render(&outcome));
    }
    Ok(0)
}

fn list(loaded: &Loaded) -> Result<i32> {
    let c = &loaded.config;
    match &loaded.path {
        Some(p) => println!("configuration: {}", p.display()),
        None => println!("configuration: none (built-in defaults)"),
    }
    let describe = |name: &str| -> String {
        match c.policy_def(name) {
            Some(d) => {
                let mut s = format!("{name} = {}", d.module);
                if let Some(pin) = &d.sha256 {
                    s.push_str(&format!(" (pinned {pin})"));
                }
                if !d.config.is_empty() {
                    let kv: Vec<String> =
                        d.config.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    s.push_str(&format!(" config {{{}}}", kv.join(", ")));
                }
                if d.on_error == OnError::Default {
                    s.push_str(" on_error=default");
                }
                s
            }
            None => format!("{name} (undefined)"),
        }
    };
    println!("\nlocks:");
    if c.locks.is_empty() {
        println!("  (no rules)");
    }
    for r in &c.locks {
        let s = r
            .policy
            .clone()
            .or_else(|| c.default_policy.clone())
            .unwrap_or_else(|| cachelock::config::DEFAULT_POLICY.to_string());
        println!(
            "  {:<24} policy {:<40} slots {}  fallback {}",
            r.pattern,
            describe(&s),
            r.slots.unwrap_or(1),
            if r.fallback { "yes" } else { "no" }
        );
    }
    let default = c
        .default_policy
        .clone()
        .unwrap_or_else(|| cachelock::config::DEFAULT_POLICY.to_string());
    println!("  {:<24} policy {}", "(any other lock)", describe(&default));
    println!("\npolicies:");
    let mut names: Vec<String> = c.policies.keys().cloned().collect();
    for b in policy::builtin::names() {
        if !c.policies.contains_key(b) {
            names.push(b.to_string());
        }
    }
    for n in names {
        println!("  {}", describe(&n));
        if let Some(m) = policy::module_status(loaded, &n) {
            println!("      {}", loads(&m));
        }
    }
    Ok(0)
}

/// What a run of a policy loads now, in words (`policy list`).
fn loads(m: &policy::ModuleStatus) -> String {
    let sha = m
        .sha256
        .as_deref()
        .unwrap_or("unknown (the file cannot be read)");
    if !m.module.starts_with("oci://") {
        return format!("loads {} (component {sha})", m.module);
    }
    match (&m.digest, m.resolved_at_ms) {
        (Some(d), Some(at)) => format!(
            "loads {d} (component {sha}), {}, resolved {} ago",
            m.verified_by.as_deref().map_or_else(
                || "not verified (no verify.keys)".to_string(),
                |k| format!("verified by {k}")
            ),
            cachelock::output::age(cachelock::lock::now_ms().saturating_sub(at))
        ),
        _ => "not pulled here yet: the first contended run pulls it (or `cachelock policy pull`)"
            .to_string(),
    }
}

const SDK_SOURCE: &str = include_str!("../../policies/sdk/src/lib.rs");
const WIT: &str = include_str!("../../wit/policy.wit");

/// componentize-py version the Python scaffold and `make setup` use.
pub const COMPONENTIZE_PY: &str = "0.25.1";
/// componentize-js version the JavaScript scaffold pins.
pub const COMPONENTIZE_JS: &str = "0.23.0";

const PY_APP: &str = include_str!("../../policies/templates/python/app.py");
const PY_README: &str = include_str!("../../policies/templates/python/README.md");
const JS_POLICY: &str = include_str!("../../policies/templates/js/policy.js");
const JS_PACKAGE: &str = include_str!("../../policies/templates/js/package.json");
const JS_README: &str = include_str!("../../policies/templates/js/README.md");
const TESTS: &str = include_str!("../../policies/templates/policy.test.yaml");
const SCENARIO: &str = r#"# cachelock policy simulate --policy <the .wasm> --scenario scenario.yaml
holders:
  - {id: nightly, release_at_ms: 5000}
arrivals:
  - {id: pr-1, at_ms: 0, labels: {branch: feature}}
  - {id: pr-2, at_ms: 100, labels: {branch: feature}}
  - {id: main, at_ms: 200, labels: {branch: main}}
"#;

fn new(name: &str, dir: Option<&Path>, lang: PolicyLang) -> Result<i32> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name.len() <= 64;
    if !valid {
        return Err(Error::usage(format!(
            "{name:?} is not a valid policy name: use a letter, then letters, digits, - or _"
        )));
    }
    let root: PathBuf = dir.map(Path::to_path_buf).unwrap_or_else(|| name.into());
    if root.exists()
        && std::fs::read_dir(&root)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(Error::cant_create(format!(
            "{} already exists and is not empty; choose another NAME or --dir",
            root.display()
        )));
    }
    let files = match lang {
        PolicyLang::Rust => scaffold(name),
        PolicyLang::Python => scaffold_python(name),
        PolicyLang::Js => scaffold_js(name),
    };
    for (rel, content) in &files {
        let path = root.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| {
                Error::cant_create(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        std::fs::write(&path, content)
            .map_err(|e| Error::cant_create(format!("cannot write {}: {e}", path.display())))?;
    }
    let (build, wasm) = match lang {
        PolicyLang::Rust => (
            "cargo test && cargo build --release --target wasm32-wasip2   # needs: rustup target add wasm32-wasip2".to_string(),
            format!(
                "target/wasm32-wasip2/release/{}.wasm",
                name.replace('-', "_")
            ),
        ),
        PolicyLang::Python => (
            format!(
                "componentize-py -d wit -w policy componentize app -o {name}.wasm   # pip install componentize-py=={COMPONENTIZE_PY}"
            ),
            format!("{name}.wasm"),
        ),
        PolicyLang::Js => (
            "npm install && npm run build".to_string(),
            format!("{name}.wasm"),
        ),
    };
    println!(
        "created policy {} ({} files; README.md says how to build and deploy it)",
        root.display(),
        files.len()
    );
    println!("next:");
    println!("  cd {}", root.display());
    println!("  {build}");
    println!("  cachelock policy test                 # policy.test.yaml against {wasm}");
    println!("  cachelock policy simulate --policy {wasm} --scenario scenario.yaml");
    println!("  cachelock policy push {wasm} oci://REGISTRY/{name}:v1 --sign-key KEY");
    Ok(0)
}

/// The scaffold's `policy.test.yaml`, testing the component at `wasm`.
fn tests(wasm: &str) -> String {
    TESTS.replace("{{wasm}}", wasm)
}

fn fill(template: &str, name: &str) -> String {
    template
        .replace("{{name}}", name)
        .replace("{{componentize_py}}", COMPONENTIZE_PY)
        .replace("{{componentize_js}}", COMPONENTIZE_JS)
}

/// The files of a new Python policy: `app.py`, the WIT, a scenario, a README.
pub fn scaffold_python(name: &str) -> Vec<(String, String)> {
    vec![
        ("app.py".into(), fill(PY_APP, name)),
        ("wit/policy.wit".into(), WIT.into()),
        ("scenario.yaml".into(), SCENARIO.into()),
        ("policy.test.yaml".into(), tests(&format!("{name}.wasm"))),
        ("README.md".into(), fill(PY_README, name)),
        (".gitignore".into(), "*.wasm\n__pycache__/\n".into()),
    ]
}

/// The files of a new JavaScript policy: `policy.js`, `package.json`, the WIT, a scenario, a
/// README.
pub fn scaffold_js(name: &str) -> Vec<(String, String)> {
    vec![
        ("policy.js".into(), fill(JS_POLICY, name)),
        ("package.json".into(), fill(JS_PACKAGE, name)),
        ("wit/policy.wit".into(), WIT.into()),
        ("scenario.yaml".into(), SCENARIO.into()),
        ("policy.test.yaml".into(), tests(&format!("{name}.wasm"))),
        ("README.md".into(), fill(JS_README, name)),
        (".gitignore".into(), "*.wasm\nnode_modules/\n".into()),
    ]
}

/// The files of a new policy crate: the policy, and a private copy of the SDK and the WIT so
/// the crate builds on its own, wherever it is.
pub fn scaffold(name: &str) -> Vec<(String, String)> {
    let crate_ident = name.replace('-', "_");
    let sdk_lib = SDK_SOURCE.replace("path: \"../../wit\"", "path: \"wit\"");
    vec![
        (
            "Cargo.toml".into(),
            format!(
                r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
cachelock-policy-sdk = {{ path = "sdk" }}

# A standalone workspace: this crate builds wherever it is copied.
[workspace]
members = [".", "sdk"]

# Small modules compile fast when cachelock first loads them.
[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
strip = true
panic = "abort"
debug = false
"#
            ),
        ),
        ("policy.test.yaml".into(), tests(&format!("target/wasm32-wasip2/release/{crate_ident}.wasm"))),
        (".gitignore".into(), "/target\n".into()),
        (
            "sdk/Cargo.toml".into(),
            r#"[package]
name = "cachelock-policy-sdk"
description = "Write cachelock policies (WIT world cachelock:policy@0.1.0) by implementing only what you change."
version = "0.1.0"
edition = "2021"
publish = false

[dependencies]
wit-bindgen = { version = "0.61", default-features = false, features = ["macros", "realloc", "std"] }
"#
            .into(),
        ),
        ("sdk/src/lib.rs".into(), sdk_lib),
        ("sdk/wit/policy.wit".into(), WIT.into()),
        (
            "src/lib.rs".into(),
            format!(
                r#"//! The `{name}` cachelock policy. Implement only the decisions you change; the others
//! follow `builtin:default` (see the `Policy` trait in sdk/src/lib.rs and sdk/wit/policy.wit).
use cachelock_policy_sdk::*;

struct {ty} {{
    /// Points added to requests labelled `branch=main` (config key `main_boost`).
    main_boost: i64,
}}

impl Policy for {ty} {{
    fn configure(config: &Config) -> Result<Self, String> {{
        config.deny_unknown(&["main_boost"])?;
        Ok({ty} {{
            main_boost: config.parse_or("main_boost", 100)?,
        }})
    }}

    /// Priority first, and `branch=main` ahead of everything else of the same priority.
    fn rank(&mut self, waiter: &Ticket, _now_ms: u64) -> i64 {{
        let main = waiter
            .request
            .labels
            .iter()
            .any(|(k, v)| k == "branch" && v == "main");
        waiter.request.priority as i64 + if main {{ self.main_boost }} else {{ 0 }}
    }}
}}

export_policy!({ty});

/// `cargo test` runs these natively (the decisions are plain Rust); `cachelock policy test`
/// runs policy.test.yaml against the built component.
#[cfg(test)]
mod tests {{
    use super::*;

    fn ticket(id: &str, priority: i32, branch: &str) -> Ticket {{
        Ticket {{
            id: id.into(),
            request: Request {{
                lock: "build".into(),
                mode: Mode::Exclusive,
                priority,
                labels: vec![("branch".into(), branch.into())],
                host: "ci-1".into(),
                pid: 1,
                enqueued_at_ms: 0,
                wait_limit_ms: None,
            }},
        }}
    }}

    #[test]
    fn main_is_boosted_and_priority_still_counts() {{
        let mut p = {ty}::configure(&Config::new(vec![("main_boost".into(), "100".into())])).unwrap();
        assert_eq!(p.rank(&ticket("m", 0, "main"), 0), 100);
        assert_eq!(p.rank(&ticket("f", 0, "feature"), 0), 0);
        assert_eq!(p.rank(&ticket("u", 200, "feature"), 0), 200);
    }}

    #[test]
    fn unknown_config_keys_are_refused() {{
        let e = {ty}::configure(&Config::new(vec![("main_bost".into(), "1".into())])).err().unwrap();
        assert!(e.contains("main_bost"), "{{e}}");
    }}
}}
"#,
                ty = camel(&crate_ident)
            ),
        ),
        (
            "scenario.yaml".into(),
            r#"# cachelock policy simulate --policy target/wasm32-wasip2/release/<name>.wasm --scenario scenario.yaml
holders:
  - {id: nightly, release_at_ms: 5000}
arrivals:
  - {id: pr-1, at_ms: 0, labels: {branch: feature}}
  - {id: pr-2, at_ms: 100, labels: {branch: feature}}
  - {id: main, at_ms: 200, labels: {branch: main}}
"#
            .into(),
        ),
        (
            "README.md".into(),
            format!(
                "# {name}: a cachelock policy\n\n\
                 ```sh\n\
                 cargo test                                  # unit tests of the decisions (native)\n\
                 cargo build --release --target wasm32-wasip2   # -> target/wasm32-wasip2/release/{crate_ident}.wasm\n\
                 cachelock policy test                       # policy.test.yaml against the component\n\
                 cachelock policy simulate --policy target/wasm32-wasip2/release/{crate_ident}.wasm --scenario scenario.yaml\n\
                 cachelock policy push target/wasm32-wasip2/release/{crate_ident}.wasm oci://REGISTRY/{name}:v1 --sign-key cosign.key\n\
                 ```\n\n\
                 Deploy: bind the pushed reference in the cachelock configuration, then run\n\
                 `cachelock policy check` (as root: it pulls, verifies and compiles every policy into the\n\
                 host's cache):\n\n\
                 ```yaml\npolicies:\n  {name}:\n    module: oci://REGISTRY/{name}:v1\n    config: {{main_boost: 100}}\nverify:\n  keys: [cosign.pub]\nlocks:\n  - match: \"*\"\n    policy: {name}\n```\n"
            ),
        ),
    ]
}

fn camel(ident: &str) -> String {
    let mut out = String::new();
    let mut up = true;
    for c in ident.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    // Never clash with the SDK's names (Policy, Config, Ticket...).
    if out == "Policy" {
        "MyPolicy".to_string()
    } else if out.ends_with("Policy") {
        out
    } else {
        out + "Policy"
    }
}
