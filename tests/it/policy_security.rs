//! Attacks on the policy compile cache and the compiler, played as an attacker would (issue 9,
//! items 2 and 10). The multi-user cases need root: as root they create two unprivileged users
//! and run cachelock as each with `setpriv`; without root they fail (never skip).
//!
//! The planted artifact is real native code: the compiled `test-trap` policy (its `on-wait`
//! logs "about to trap" and traps), renamed to the cache key of `builtin:default` with a
//! matching digest file. `policy check builtin:default` calls `on-wait`, so if the planted code
//! ran, the check would fail with "about to trap"; the control case shows that it does, for the
//! user who owns it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use crate::support::policy::{isolated_config, test_policy, BIN};

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// (uid, gid) of a test user, created once (`useradd`, no home, no login).
fn user(name: &str) -> (u32, u32) {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the multi-user attack tests run as root (CI does): they create users"
    );
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap();
    let id = |flag: &str| -> Option<u32> {
        let o = Command::new("id").args([flag, name]).output().ok()?;
        String::from_utf8_lossy(&o.stdout).trim().parse().ok()
    };
    if id("-u").is_none() {
        let o = Command::new("useradd")
            .args(["--no-create-home", "--shell", "/usr/sbin/nologin", name])
            .output()
            .expect("useradd (package passwd) is needed");
        // 9: created meanwhile by another test binary.
        assert!(
            o.status.success() || o.status.code() == Some(9),
            "useradd {name}: {}",
            text(&o)
        );
    }
    (id("-u").unwrap(), id("-g").unwrap())
}

/// `cachelock ARGS` as `uid`, with a clean environment and `home` as HOME.
fn as_user(who: (u32, u32), home: &Path, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid",
            &who.0.to_string(),
            "--regid",
            &who.1.to_string(),
            "--clear-groups",
            "--",
            BIN,
        ])
        .args(args)
        .env_clear()
        .env("HOME", home)
        .env("PATH", "/usr/bin:/bin")
        .current_dir(home)
        .output()
        .expect("setpriv (util-linux) is needed")
}

/// A directory tree the test users can reach: mode 0755 (tempdir makes 0700).
fn shared_root() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    t
}

fn mkdir_owned(p: &Path, who: (u32, u32), mode: u32) {
    std::fs::create_dir_all(p).unwrap();
    std::os::unix::fs::chown(p, Some(who.0), Some(who.1)).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn write_config(path: &Path, own: &Path, host: &Path, who: (u32, u32)) -> PathBuf {
    std::fs::write(
        path,
        format!(
            "policy_cache_dir: {}\npolicy_host_cache_dir: {}\n",
            own.display(),
            host.display()
        ),
    )
    .unwrap();
    std::os::unix::fs::chown(path, Some(who.0), Some(who.1)).unwrap();
    path.to_path_buf()
}

/// As `attacker`, compiles `builtin:default` and `test-trap` into `stage`, then plants the
/// trap's code under builtin:default's keys (with matching digests) in `plant`.
fn plant(attacker: (u32, u32), home: &Path, stage: &Path, plant: &Path) {
    let cfg = write_config(
        &home.join("stage.yaml"),
        stage,
        &home.join("none"),
        attacker,
    );
    let trap = home.join("trap.wasm");
    std::fs::copy(test_policy("test-trap"), &trap).unwrap();
    std::fs::set_permissions(&trap, std::fs::Permissions::from_mode(0o644)).unwrap();
    for p in ["builtin:default", trap.to_str().unwrap()] {
        let out = as_user(
            attacker,
            home,
            &["policy", "check", "--config", cfg.to_str().unwrap(), p],
        );
        // The trap policy's check fails in on-wait; it is compiled all the same.
        assert!(
            out.status.success() || text(&out).contains("about to trap"),
            "{}",
            text(&out)
        );
    }
    let default_sha = cachelock::policy::builtin::get("default").unwrap().sha256;
    let trap_sha = cachelock::policy::cache::sha256_hex(&std::fs::read(&trap).unwrap());
    // The attacker's own shell does the planting.
    let script = format!(
        "set -e; mkdir -p {plant}; cd {stage}; for f in {trap_sha}-*.cwasm; do \
           k=${{f#{trap_sha}-}}; k=${{k%.cwasm}}; cp $f {plant}/{default_sha}-$k.cwasm; \
           sha256sum {plant}/{default_sha}-$k.cwasm | cut -d' ' -f1 | tr -d '\\n' > {plant}/{default_sha}-$k.sha256; \
         done; chmod 755 {plant}; ls {plant} | grep -c cwasm",
        plant = plant.display(),
        stage = stage.display()
    );
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            &attacker.0.to_string(),
            "--regid",
            &attacker.1.to_string(),
            "--clear-groups",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    assert!(out.status.success(), "planting failed: {}", text(&out));
    // The quick tier at least (the trap's check ends before its optimized compile).
    let planted: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(planted >= 1, "nothing planted");
}

fn users() -> ((u32, u32), (u32, u32)) {
    static U: OnceLock<((u32, u32), (u32, u32))> = OnceLock::new();
    *U.get_or_init(|| (user("cl-victim"), user("cl-attacker")))
}

#[test]
fn planted_compile_caches_never_run_as_another_user() {
    let (victim, attacker) = users();
    let root = shared_root();
    let r = root.path();
    // A /tmp-like shared directory, and each user's home.
    let shared = r.join("shared");
    mkdir_owned(&shared, (0, 0), 0o1777);
    let (vhome, ahome) = (r.join("victim"), r.join("attacker"));
    mkdir_owned(&vhome, victim, 0o700);
    mkdir_owned(&ahome, attacker, 0o700);
    let planted = shared.join("cache");
    plant(attacker, &ahome, &ahome.join("stage"), &planted);

    // Control: the planted code is live — its owner, trusting their own cache, runs it.
    let cfg = write_config(&ahome.join("own.yaml"), &planted, &r.join("none"), attacker);
    let out = as_user(
        attacker,
        &ahome,
        &[
            "policy",
            "check",
            "--config",
            cfg.to_str().unwrap(),
            "builtin:default",
        ],
    );
    assert!(
        out.status.code() == Some(70) && text(&out).contains("about to trap"),
        "the planted artifact must be effective for the test to mean anything: {}",
        text(&out)
    );

    // The attacks, each as a configuration the victim might have.
    let link = shared.join("link");
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            &attacker.0.to_string(),
            "--regid",
            &attacker.1.to_string(),
            "--clear-groups",
            "--",
            "ln",
            "-s",
        ])
        .arg(&planted)
        .arg(&link)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // The victim's own cache, carelessly made world-writable, with the attacker's files in it.
    let careless = vhome.join("careless");
    mkdir_owned(&careless, victim, 0o777);
    for e in std::fs::read_dir(&planted).unwrap() {
        let e = e.unwrap();
        let dst = careless.join(e.file_name());
        std::fs::copy(e.path(), &dst).unwrap();
        std::os::unix::fs::chown(&dst, Some(attacker.0), Some(attacker.1)).unwrap();
    }
    let none = vhome.join("none");
    let cases: [(&str, &Path, &Path, &str); 4] = [
        (
            "own cache planted by another user",
            &planted,
            &none,
            "owned by uid",
        ),
        (
            "own cache is a symlink planted by another user",
            &link,
            &none,
            "symlink",
        ),
        (
            "host cache owned by another user",
            &vhome.join("own"),
            &planted,
            "owned by uid",
        ),
        (
            "own cache writable by others",
            &careless,
            &none,
            "lets group or others write",
        ),
    ];
    for (i, (what, own, host, why)) in cases.iter().enumerate() {
        let cfg = write_config(&vhome.join(format!("c{i}.yaml")), own, host, victim);
        let out = as_user(
            victim,
            &vhome,
            &[
                "policy",
                "check",
                "--config",
                cfg.to_str().unwrap(),
                "builtin:default",
            ],
        );
        let t = text(&out);
        assert_eq!(out.status.code(), Some(0), "{what}: {t}");
        assert!(
            !t.contains("about to trap"),
            "{what}: the planted code ran: {t}"
        );
        assert!(
            t.contains("is not trusted") && t.contains(why),
            "{what}: {t}"
        );
    }
    // The issue's repro: the attacker plants the old fallback /tmp/cachelock-cache-<uid> of the
    // victim; the victim runs with no HOME and no configured cache. It is never read.
    let old = PathBuf::from(format!("/tmp/cachelock-cache-{}", victim.0));
    let _ = std::fs::remove_dir_all(&old);
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            &attacker.0.to_string(),
            "--regid",
            &attacker.1.to_string(),
            "--clear-groups",
            "--",
            "cp",
            "-r",
        ])
        .arg(&planted)
        .arg(&old)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let nohome = vhome.join("nohome.yaml");
    std::fs::write(
        &nohome,
        format!("policy_host_cache_dir: {}\n", none.display()),
    )
    .unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            &victim.0.to_string(),
            "--regid",
            &victim.1.to_string(),
            "--clear-groups",
            "--",
            BIN,
            "policy",
            "check",
            "builtin:default",
        ])
        .env_clear()
        .env("CACHELOCK_CONFIG", &nohome)
        .current_dir(&vhome)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&old);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(!t.contains("about to trap"), "the planted code ran: {t}");
    assert!(t.contains("no policy compile cache of your own"), "{t}");
}

#[test]
fn a_root_owned_host_cache_serves_every_user_and_tampering_is_detected() {
    let (victim, attacker) = users();
    let root = shared_root();
    let r = root.path();
    let host = r.join("host-cache");
    // Deploy: root checks the policy; its cache is the host cache.
    let cfg = isolated_config(&r.join("root"), "");
    std::fs::write(&cfg, format!("policy_host_cache_dir: {}\n", host.display())).unwrap();
    std::fs::set_permissions(r.join("root"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(BIN)
        .args([
            "policy",
            "check",
            "--config",
            cfg.to_str().unwrap(),
            "builtin:priority",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        std::fs::metadata(&host).unwrap().permissions().mode() & 0o777,
        0o755
    );
    for who in [victim, attacker] {
        let home = r.join(format!("home-{}", who.0));
        mkdir_owned(&home, who, 0o700);
        let out = as_user(
            who,
            &home,
            &[
                "policy",
                "check",
                "--config",
                cfg.to_str().unwrap(),
                "builtin:priority",
            ],
        );
        let t = text(&out);
        assert_eq!(out.status.code(), Some(0), "{t}");
        assert!(t.contains("compiled:  taken from the cache"), "{t}");
        // Nothing of their own was needed.
        assert!(!home.join(".cache/cachelock").exists());
    }
    // Root's artifacts corrupted (disk, an editor, a bad copy): the digest catches it and the
    // policy is recompiled rather than loaded. Every artifact: `policy check` leaves the quick
    // and the optimized code, and the directory's order does not say which is which.
    let arts: Vec<_> = std::fs::read_dir(&host)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .collect();
    assert!(!arts.is_empty(), "no artifact in {}", host.display());
    for art in arts {
        let mut bytes = std::fs::read(&art).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 0xff;
        std::fs::write(&art, &bytes).unwrap();
    }
    let out = Command::new(BIN)
        .args([
            "policy",
            "check",
            "--config",
            cfg.to_str().unwrap(),
            "builtin:priority",
        ])
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("does not match"), "{t}");
}

/// A core module of `funcs` functions with `locals` i32 locals each, wrapped in a component.
fn bomb(funcs: u32, locals: u32) -> Vec<u8> {
    fn leb(mut n: u64, out: &mut Vec<u8>) {
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    fn section(id: u8, body: &[u8], out: &mut Vec<u8>) {
        out.push(id);
        leb(body.len() as u64, out);
        out.extend_from_slice(body);
    }
    let mut core = b"\0asm\x01\0\0\0".to_vec();
    section(1, &[1, 0x60, 0, 0], &mut core);
    let mut funcs_sec = Vec::new();
    leb(funcs as u64, &mut funcs_sec);
    funcs_sec.extend(std::iter::repeat_n(0u8, funcs as usize));
    section(3, &funcs_sec, &mut core);
    let mut body = vec![1];
    leb(locals as u64, &mut body);
    body.extend_from_slice(&[0x7f, 0x0b]);
    let mut code = Vec::new();
    leb(funcs as u64, &mut code);
    for _ in 0..funcs {
        leb(body.len() as u64, &mut code);
        code.extend_from_slice(&body);
    }
    section(10, &code, &mut core);
    let mut comp = b"\0asm\x0d\0\x01\0".to_vec();
    section(1, &core, &mut comp);
    comp
}

/// Issue 9.10: compile bombs are refused (exit 78) within the compile budget, naming it, and
/// the refusal is remembered for the next process. (The Python policy tests show an 18 MB
/// componentize-py component passing the default budget.)
#[test]
fn compile_bombs_are_refused_within_the_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = isolated_config(
        tmp.path(),
        "policy_compile: {memory_mib: 512, cpu_seconds: 10}\n",
    );
    for (funcs, name) in [(1000, "b13.wasm"), (10_000, "b130.wasm")] {
        let file = tmp.path().join(name);
        std::fs::write(&file, bomb(funcs, 50_000)).unwrap();
        let check = || {
            Command::new(BIN)
                .args(["policy", "check", "--config"])
                .arg(&cfg)
                .arg(&file)
                .output()
                .unwrap()
        };
        let out = check();
        let t = text(&out);
        assert_eq!(out.status.code(), Some(78), "{name}: {t}");
        assert!(
            t.contains("compile budget")
                && t.contains("512 MiB, 10 s CPU")
                && t.contains("policy_compile"),
            "{name}: {t}"
        );
        let out = check();
        let t = text(&out);
        assert_eq!(out.status.code(), Some(78), "{name}: {t}");
        assert!(
            t.contains("remembered from an earlier compile"),
            "{name}: {t}"
        );
        // No oversized artifact or temp file is left behind.
        let left: u64 = std::fs::read_dir(tmp.path().join("cache"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(left < 64 * 1024, "{left} bytes left in the cache");
    }
}
