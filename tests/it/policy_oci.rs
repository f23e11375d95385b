//! Policies shipped like software, against real registries (Debian's docker-registry 2.8: one
//! over HTTPS with a self-signed CA and htpasswd basic auth, one plain-HTTP "insecure"),
//! checked by independent tools: `skopeo` reads the artifact, `openssl` signs and verifies in
//! cosign's format. Every "host" is a lock directory, a configuration and compile caches of
//! its own.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use base64::Engine as _;

use crate::support::registry::Registry;
use crate::support::util::{read_log, Env, Proc};

/// The HTTPS registry with basic auth, shared by the tests of this module (each uses its own
/// repositories).
fn secure() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| Registry::start("oci-secure", true, true))
}

/// The plain-HTTP registry listed as insecure.
fn plain() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| Registry::start("oci-plain", false, false))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A host: an Env (lock directory, configuration) whose caches are its own, reaching `reg`
/// (credentials in its own DOCKER_CONFIG unless `creds` is false).
struct Host {
    env: Env,
    docker: Option<PathBuf>,
}

impl Host {
    fn new(reg: &Registry, creds: bool, yaml: &str) -> Host {
        let env = Env::new();
        let dir = env.tmp.path();
        let mut cfg = format!(
            "policy_cache_dir: {}\npolicy_host_cache_dir: {}\n",
            dir.join("cache").display(),
            dir.join("host-cache").display()
        );
        match &reg.tls {
            Some(t) => cfg.push_str(&format!("registry:\n  ca_file: {}\n", t.ca.display())),
            None => cfg.push_str(&format!("registry:\n  insecure: [\"{}\"]\n", reg.addr)),
        }
        cfg.push_str(yaml);
        std::fs::write(&env.config, cfg).unwrap();
        let docker = creds.then(|| reg.docker_config(dir));
        Host { env, docker }
    }

    fn cmd(&self) -> Command {
        let mut c = self.env.cmd();
        // A host's credentials are its own (and none when it has none).
        match &self.docker {
            Some(d) => c.env("DOCKER_CONFIG", d),
            None => c.env("DOCKER_CONFIG", self.env.path("no-docker-config")),
        };
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    fn spawn(&self, args: &[&str]) -> Proc {
        Proc(Some(
            self.cmd()
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .process_group(0)
                .spawn()
                .unwrap(),
        ))
    }
}

/// The built-in priority policy's component, as a file to push.
fn priority_wasm(dir: &Path) -> PathBuf {
    crate::support::policy::init();
    let p = dir.join("priority.wasm");
    std::fs::write(
        &p,
        cachelock::policy::builtin::get("priority").unwrap().bytes,
    )
    .unwrap();
    p
}

/// Another component (builtin:deadline): a different artifact for the same tag.
fn deadline_wasm(dir: &Path) -> PathBuf {
    let p = dir.join("deadline.wasm");
    std::fs::write(
        &p,
        cachelock::policy::builtin::get("deadline").unwrap().bytes,
    )
    .unwrap();
    p
}

/// A P-256 key pair made by openssl: (private PKCS#8 PEM, public SPKI PEM).
fn openssl_keys(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    let o = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
        ])
        .arg(&key)
        .output()
        .expect("openssl (make setup)");
    assert!(o.status.success(), "{}", text(&o));
    let o = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(&public)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    (key, public)
}

/// The manifest digest a push printed.
fn pushed_digest(o: &Output) -> String {
    let t = text(o);
    t.lines()
        .find_map(|l| l.strip_prefix("digest:"))
        .unwrap_or_else(|| panic!("no digest in: {t}"))
        .trim()
        .to_string()
}

fn push(host: &Host, file: &Path, reference: &str, extra: &[&str]) -> String {
    let mut args = vec!["policy", "push", file.to_str().unwrap(), reference];
    args.extend_from_slice(extra);
    let o = host.run(&args);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    pushed_digest(&o)
}

/// Holds `lock` until `go` exists; returns once its ticket is queued.
fn hold(host: &Host, lock: &str, go: &Path) -> Proc {
    let script = format!(
        "while [ ! -e {} ]; do read -t 0.01 <> {}; done; exit 0",
        go.display(),
        host.env.path("fifo").display()
    );
    let p = host.spawn(&["run", "-q", lock, "--", "bash", "-c", &script]);
    host.env.wait_tickets(lock, 1);
    p
}

/// Queues a waiter on `lock` with `opts` that logs `tag` when served; returns once queued.
fn waiter(host: &Host, lock: &str, tag: &str, opts: &[&str], n: usize) -> Proc {
    let mut args: Vec<String> = vec!["run".into(), "-q".into()];
    args.extend(opts.iter().map(|s| s.to_string()));
    args.extend([lock.to_string(), "--".into()]);
    args.extend(
        host.env
            .section(&host.env.path(&format!("order-{lock}.log")), tag, 0.01),
    );
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = host.spawn(&refs);
    host.env.wait_tickets(lock, n);
    p
}

/// Two waiters, `dev` first then `main`, behind a holder; the served order.
fn contended_order(host: &Host, lock: &str) -> Vec<String> {
    let go = host.env.path(&format!("go-{lock}"));
    let mut h = hold(host, lock, &go);
    let mut a = waiter(host, lock, "dev", &["-l", "branch=dev"], 2);
    let mut b = waiter(host, lock, "main", &["-l", "branch=main"], 3);
    std::fs::write(&go, "").unwrap();
    assert_eq!(h.wait(), 0);
    assert_eq!(a.wait(), 0, "{}", a.stderr());
    assert_eq!(b.wait(), 0, "{}", b.stderr());
    read_log(&host.env.path(&format!("order-{lock}.log")))
        .into_iter()
        .map(|s| s.tag)
        .collect()
}

#[test]
fn pushed_from_one_host_and_run_by_another_over_https_with_basic_auth() {
    let reg = secure();
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = openssl_keys(keys.path(), "team");
    let a = Host::new(reg, true, "");
    let reference = format!("oci://{}/team/prio:v1", reg.addr);
    let digest = push(
        &a,
        &priority_wasm(a.env.tmp.path()),
        &reference,
        &[
            "--sign-key",
            key.to_str().unwrap(),
            "--policy-config",
            "boost.branch.main=100",
        ],
    );
    // An independent client sees a wasm component.
    let m = reg.skopeo_raw("team/prio:v1");
    assert_eq!(
        m["config"]["mediaType"],
        "application/vnd.wasm.config.v0+json"
    );
    assert_eq!(m["layers"].as_array().unwrap().len(), 1);
    assert_eq!(m["layers"][0]["mediaType"], "application/wasm");
    let sig = reg.skopeo_raw(&format!(
        "team/prio:{}",
        digest.replacen(':', "-", 1) + ".sig"
    ));
    assert_eq!(
        sig["layers"][0]["mediaType"],
        "application/vnd.dev.cosign.simplesigning.v1+json"
    );
    assert!(sig["layers"][0]["annotations"]["dev.cosignproject.cosign/signature"].is_string());

    // Host B has only the reference (and its key and credentials) configured.
    let b = Host::new(
        reg,
        true,
        &format!(
            "verify:\n  keys: [{}]\npolicies:\n  team:\n    module: {reference}\n    config: {{boost.branch.main: 100}}\nlocks:\n  - match: \"build\"\n    policy: team\n",
            public.display()
        ),
    );
    // Nothing pulled yet: list says so, without asking the registry.
    let list = b.run(&["policy", "list"]);
    assert!(
        text(&list).contains("not pulled here yet"),
        "{}",
        text(&list)
    );
    // The first contended run pulls, verifies, compiles, and orders by the pushed policy.
    assert_eq!(contended_order(&b, "build"), ["main", "dev"]);
    let st = b.env.status_json(None);
    let m = &st["locks"][0]["policy_module"];
    assert_eq!(m["module"], reference.as_str());
    assert_eq!(m["digest"], digest.as_str());
    let component = format!(
        "sha256:{}",
        cachelock::policy::builtin::get("priority").unwrap().sha256
    );
    assert_eq!(m["sha256"], component.as_str());
    assert!(
        m["verified_by"]
            .as_str()
            .unwrap()
            .contains("team.pub (sha256:"),
        "{m}"
    );
}

#[test]
fn signatures_are_cosigns_both_ways_with_openssl() {
    let reg = plain();
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = openssl_keys(dir.path(), "k");
    let host = Host::new(reg, false, "");
    let reference = format!("oci://{}/team/signed:v1", reg.addr);
    let digest = push(&host, &priority_wasm(dir.path()), &reference, &[]);

    // openssl signs cosign's payload; the signature manifest is pushed by skopeo.
    let payload = format!(
        r#"{{"critical":{{"identity":{{"docker-reference":"{}/team/signed"}},"image":{{"docker-manifest-digest":"{digest}"}},"type":"cosign container image signature"}},"optional":null}}"#,
        reg.addr
    );
    let layout = dir.path().join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let hex = cachelock::policy::cache::sha256_hex(bytes);
        std::fs::write(blobs.join(&hex), bytes).unwrap();
        (format!("sha256:{hex}"), bytes.len())
    };
    std::fs::write(dir.path().join("payload.json"), &payload).unwrap();
    let o = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(&key)
        .arg("-out")
        .arg(dir.path().join("sig.der"))
        .arg(dir.path().join("payload.json"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let sig_b64 = base64::engine::general_purpose::STANDARD
        .encode(std::fs::read(dir.path().join("sig.der")).unwrap());
    let (pd, ps) = put(payload.as_bytes());
    let (cd, cs) =
        put(br#"{"architecture":"","os":"","rootfs":{"type":"layers","diff_ids":[]},"config":{}}"#);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json", "digest": pd, "size": ps,
                    "annotations": {"dev.cosignproject.cosign/signature": sig_b64}}]
    });
    let (md, ms) = put(manifest.to_string().as_bytes());
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    std::fs::write(
        layout.join("index.json"),
        serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms, "annotations": {"org.opencontainers.image.ref.name": "sig"}}]}).to_string(),
    )
    .unwrap();
    let sig_tag = digest.replacen(':', "-", 1) + ".sig";
    let o = Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--preserve-digests"])
        .args(reg.skopeo_opts("dest"))
        .arg(format!("oci:{}:sig", layout.display()))
        .arg(format!("docker://{}/team/signed:{sig_tag}", reg.addr))
        .output()
        .unwrap();
    assert!(o.status.success(), "skopeo copy: {}", text(&o));
    let o = host.run(&[
        "policy",
        "verify",
        &reference,
        "--key",
        public.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("k.pub (sha256:"), "{}", text(&o));

    // cachelock signs another push; openssl verifies the payload and signature skopeo fetched.
    let reference2 = format!("oci://{}/team/signed2:v1", reg.addr);
    let digest2 = push(&host, &priority_wasm(dir.path()), &reference2, &[]);
    let o = host.run(&[
        "policy",
        "sign",
        &reference2,
        "--key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let sig_tag2 = digest2.replacen(':', "-", 1) + ".sig";
    let out = dir.path().join("fetched");
    let o = Command::new("skopeo")
        .args(["--insecure-policy", "copy"])
        .args(reg.skopeo_opts("src"))
        .arg(format!("docker://{}/team/signed2:{sig_tag2}", reg.addr))
        .arg(format!("dir:{}", out.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "skopeo copy: {}", text(&o));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let layer = &m["layers"][0];
    let payload_file = out.join(
        layer["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:"),
    );
    let payload: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&payload_file).unwrap()).unwrap();
    assert_eq!(
        payload["critical"]["image"]["docker-manifest-digest"],
        digest2.as_str()
    );
    let sig = base64::engine::general_purpose::STANDARD
        .decode(
            layer["annotations"]["dev.cosignproject.cosign/signature"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    std::fs::write(dir.path().join("sig2.der"), sig).unwrap();
    let o = Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(&public)
        .arg("-signature")
        .arg(dir.path().join("sig2.der"))
        .arg(&payload_file)
        .output()
        .unwrap();
    assert!(text(&o).contains("Verified OK"), "{}", text(&o));
}

/// A host configured with `oci://ADDR/REPO:v1` as policy `team` (keys: `keys`).
fn consumer(reg: &Registry, repo: &str, keys: &[&Path], creds: bool) -> Host {
    let verify = if keys.is_empty() {
        String::new()
    } else {
        format!(
            "verify:\n  keys: [{}]\n",
            keys.iter()
                .map(|k| k.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    Host::new(
        reg,
        creds,
        &format!(
            "{verify}policies:\n  team:\n    module: oci://{}/{repo}:v1\n    config: {{boost.branch.main: 100}}\nlocks:\n  - match: \"*\"\n    policy: team\n",
            reg.addr
        ),
    )
}

#[test]
fn every_refusal_names_the_reference_the_digest_and_why() {
    let reg = secure();
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = openssl_keys(dir.path(), "good");
    let (_, other) = openssl_keys(dir.path(), "other");
    let publisher = Host::new(reg, true, "");
    let wasm = priority_wasm(dir.path());
    let signed = push(
        &publisher,
        &wasm,
        &format!("oci://{}/refuse/signed:v1", reg.addr),
        &["--sign-key", key.to_str().unwrap()],
    );
    let unsigned = push(
        &publisher,
        &wasm,
        &format!("oci://{}/refuse/unsigned:v1", reg.addr),
        &[],
    );

    let check = |h: &Host| h.run(&["policy", "check", "team"]);
    // Missing signature.
    let o = check(&consumer(reg, "refuse/unsigned", &[&public], true));
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains(&format!(
            "refusing {unsigned} of oci://{}/refuse/unsigned:v1",
            reg.addr
        )),
        "{t}"
    );
    assert!(t.contains("it is not signed"), "{t}");
    assert!(t.contains("nothing of it was compiled or run"), "{t}");
    // Wrong key.
    let o = check(&consumer(reg, "refuse/signed", &[&other], true));
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    assert!(text(&o).contains(&signed), "{}", text(&o));
    assert!(
        text(&o).contains("none of its 1 signature(s) verifies with the configured key(s)"),
        "{}",
        text(&o)
    );
    // The right key.
    let o = check(&consumer(reg, "refuse/signed", &[&public], true));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("signed, by"), "{}", text(&o));
    // Missing credentials: the registry's 401, named.
    let o = check(&consumer(reg, "refuse/signed", &[&public], false));
    assert_eq!(o.status.code(), Some(77), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("registry {}", reg.addr)),
        "{}",
        text(&o)
    );
    assert!(text(&o).contains("401 Unauthorized"), "{}", text(&o));
    assert!(
        text(&o).contains("asks for credentials and there are none"),
        "{}",
        text(&o)
    );
    assert!(!text(&o).contains(crate::support::registry::PASSWORD));
    // Unknown tag.
    let h = consumer(reg, "refuse/signed", &[], true);
    let o = h.run(&[
        "policy",
        "check",
        &format!("oci://{}/refuse/signed:nope", reg.addr),
    ]);
    assert_eq!(o.status.code(), Some(66), "{}", text(&o));
    assert!(
        text(&o).contains("manifest nope: 404 Not Found (MANIFEST_UNKNOWN"),
        "{}",
        text(&o)
    );
    // TLS failure: the self-signed CA is not configured.
    let h = Host::new(reg, true, "");
    std::fs::write(
        &h.env.config,
        std::fs::read_to_string(&h.env.config)
            .unwrap()
            .replace("ca_file", "# ca_file"),
    )
    .unwrap();
    let o = h.run(&[
        "policy",
        "pull",
        &format!("oci://{}/refuse/signed:v1", reg.addr),
    ]);
    assert_eq!(o.status.code(), Some(69), "{}", text(&o));
    assert!(
        text(&o).to_lowercase().contains("certificate"),
        "{}",
        text(&o)
    );

    // A tampered layer: the registry's stored component is changed under it.
    let layer = cachelock::policy::builtin::get("priority").unwrap().sha256;
    let data = reg.dir.join(format!(
        "data/docker/registry/v2/blobs/sha256/{}/{layer}/data",
        &layer[..2]
    ));
    let mut bytes = std::fs::read(&data).unwrap();
    let original = bytes.clone();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&data, &bytes).unwrap();
    let o = check(&consumer(reg, "refuse/signed", &[&public], true));
    std::fs::write(&data, &original).unwrap();
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("refusing {signed}")),
        "{}",
        text(&o)
    );
    assert!(text(&o).contains("tampered or corrupt"), "{}", text(&o));
}

#[test]
fn a_stopped_registry_keeps_the_last_good_one_and_a_bad_new_version_never_replaces_it() {
    let reg = Registry::start("oci-stop", false, false);
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = openssl_keys(dir.path(), "k");
    let publisher = Host::new(&reg, false, "");
    let reference = format!("oci://{}/team/p:v1", reg.addr);
    let good = push(
        &publisher,
        &priority_wasm(dir.path()),
        &reference,
        &["--sign-key", key.to_str().unwrap()],
    );
    let host = consumer(&reg, "team/p", &[&public], false);
    let o = host.run(&["policy", "pull"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains(&good), "{}", text(&o));

    // A new version that is not signed: refused, and the last good one stays.
    push(&publisher, &deadline_wasm(dir.path()), &reference, &[]);
    let o = host.run(&["policy", "pull", "team"]);
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("the last good one, {good}, stays in use")),
        "{}",
        text(&o)
    );
    let list = host.run(&["policy", "list"]);
    assert!(
        text(&list).contains(&format!("loads {good}")),
        "{}",
        text(&list)
    );
    assert_eq!(contended_order(&host, "after-bad-pull"), ["main", "dev"]);

    // Registry down: the deploy step keeps the cached, verified digest with one warning
    // naming its age; a host with nothing cached gets exit 69 naming the registry.
    reg.stop();
    let o = host.run(&["policy", "check"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let t = text(&o);
    assert_eq!(t.matches(" WARN ").count(), 1, "{t}");
    assert!(
        t.contains(&format!("registry {} is unreachable", reg.addr)),
        "{t}"
    );
    assert!(
        t.contains(&format!("keeping the cached {good} (resolved and verified")),
        "{t}"
    );
    assert!(t.contains(" s ago)"), "{t}");
    let fresh = consumer(&reg, "team/p", &[&public], false);
    let o = fresh.run(&["policy", "check", "team"]);
    assert_eq!(o.status.code(), Some(69), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("registry {} is unreachable", reg.addr)),
        "{}",
        text(&o)
    );
    assert!(
        text(&o).contains("nothing is cached for it"),
        "{}",
        text(&o)
    );
    // A contended run (policies load lazily) with nothing cached fails the same way; with the
    // cache, runs go on.
    let go = fresh.env.path("go-nothing");
    let mut h = hold(&fresh, "nothing", &go);
    let mut w = fresh.spawn(&["run", "-q", "nothing", "--", "true"]);
    assert_eq!(w.wait(), 69);
    let t = w.stderr();
    assert!(
        t.contains(&format!("registry {} is unreachable", reg.addr)),
        "{t}"
    );
    std::fs::write(&go, "").unwrap();
    assert_eq!(h.wait(), 0);
    assert_eq!(contended_order(&host, "registry-down"), ["main", "dev"]);
}

#[test]
fn policy_test_runs_table_driven_cases_and_shows_expected_and_actual() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = crate::support::policy::isolated_config(&dir.path().join("cfg"), "");
    std::fs::write(
        dir.path().join("prio.test.yaml"),
        "policy: builtin:priority\nconfig: {boost.branch.main: 100}\ncases:\n  - name: main first\n    queue:\n      - {ticket: a, priority: 0, labels: {branch: dev}}\n      - {ticket: b, priority: 0, labels: {branch: main}}\n    expect:\n      order: [b, a]\n  - name: wrong on purpose\n    queue:\n      - {ticket: a, labels: {branch: dev}}\n      - {ticket: b, labels: {branch: main}}\n    expect:\n      order: [a, b]\n  - name: typo refused\n    config: {boost.brnch: 1}\n    queue: [{ticket: a}]\n    expect: {error: boost.brnch}\n  - name: waits at a fixed now\n    now_ms: 1000000\n    queue: [{ticket: me, wait_limit_ms: 500, waited_ms: 400}]\n    on_wait: {}\n    expect: {decision: keep-waiting}\n",
    )
    .unwrap();
    let o = Command::new(crate::support::util::bin())
        .args(["policy", "test"])
        .current_dir(dir.path())
        .env("CACHELOCK_CONFIG", &cfg)
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("3 passed, 1 failed"), "{t}");
    assert!(t.contains("FAIL  wrong on purpose"), "{t}");
    assert!(t.contains("expected: order [a, b]"), "{t}");
    assert!(
        t.contains("actual:   order [b, a] (ranks b=100 a=0)"),
        "{t}"
    );
    std::fs::write(
        dir.path().join("bad.test.yaml"),
        "policy: builtin:priority\ncases:\n  - {name: x, queu: []}\n",
    )
    .unwrap();
    let o = Command::new(crate::support::util::bin())
        .args(["policy", "test", "bad.test.yaml"])
        .current_dir(dir.path())
        .env("CACHELOCK_CONFIG", &cfg)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(65), "{}", text(&o));
    assert!(text(&o).contains("bad.test.yaml: line 3"), "{}", text(&o));
}

#[test]
fn check_without_a_name_checks_every_binding_and_catches_a_config_typo() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = crate::support::policy::isolated_config(
        &dir.path().join("cfg"),
        "policies:\n  team:\n    module: builtin:priority\n    config: {aging_per_minut: 2}\nlocks:\n  - match: \"ci-*\"\n    policy: team\n  - match: \"*\"\n    policy: deadline\n",
    );
    let o = Command::new(crate::support::util::bin())
        .args(["policy", "check"])
        .env("CACHELOCK_CONFIG", &cfg)
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(78), "{t}");
    assert!(t.contains("3 policies checked, 1 failed: team"), "{t}");
    assert!(t.contains("aging_per_minut"), "{t}");
}
