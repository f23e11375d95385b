//! `cachelock doctor` on hosts set up wrong, one way each: its line and its exit code (1 on an
//! error, 0 when only warnings). Real parts throughout: real users (`setpriv`), a real FUSE
//! mount (bindfs) for a filesystem inotify cannot watch, real compile caches, the real etcd
//! clusters of the etcd tests. And it changes nothing.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::etcd::{secure, shared, ROOT_PASSWORD};
use crate::support::policy::{isolated_config, test_policy, BIN};
use crate::support::users::{alice, Shared};

/// A test's world: a directory other users may enter, a configuration with private compile
/// caches (`cache`, `host-cache`), a lock directory (`locks`, root's, 1777).
struct Host {
    tmp: tempfile::TempDir,
    config: PathBuf,
}

impl Host {
    fn new(yaml: &str) -> Host {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let config = isolated_config(tmp.path(), yaml);
        let h = Host { tmp, config };
        h.dir("locks", 0o1777);
        h
    }

    /// Replaces the configuration (still with private compile caches).
    fn configure(&self, yaml: &str) {
        isolated_config(self.tmp.path(), yaml);
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// Creates directory `rel` with exactly `mode`.
    fn dir(&self, rel: &str, mode: u32) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    /// `cachelock doctor` with this configuration and lock directory.
    fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        c.arg("doctor")
            .env("CACHELOCK_CONFIG", &self.config)
            .env("CACHELOCK_LOCK_DIR", self.path("locks"))
            .env_remove("CACHELOCK_BACKEND")
            .env_remove("CACHELOCK_CACHE_ROOT")
            .env_remove("CACHELOCK_LOG");
        c
    }

    fn doctor(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n{}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The one line of `level` that holds every piece of `parts`; fails showing the report.
fn line(o: &Output, level: &str, parts: &[&str]) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    out.lines()
        .find(|l| l.starts_with(level) && parts.iter().all(|p| l.contains(p)))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no {level} line with {parts:?} in:\n{}", text(o)))
}

/// What is under `dir`: each path with its kind and mode (to see that nothing changed).
fn tree(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = e.metadata().unwrap();
            out.push((e.path(), std::os::unix::fs::MetadataExt::mode(&m)));
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_healthy_host_passes_a_cold_compile_cache_warns_and_nothing_is_changed() {
    // The configuration names a cache root of root's own; dockerd is installed (make setup).
    let h = Host::new("");
    let dind = h.dir("dind", 0o755);
    h.configure(&format!("cache_root: {}\n", dind.display()));
    let before = tree(h.tmp.path());
    let o = h.doctor(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    line(
        &o,
        "ok",
        &["lock directory", "mode 1777 (shared by every user, sticky)"],
    );
    line(
        &o,
        "ok",
        &[
            "policy default: builtin:default",
            "sha256:",
            "loads, configures and answers",
        ],
    );
    let cold = line(
        &o,
        "warning",
        &[
            "compile cache default: cold",
            "cachelock policy check default",
        ],
    );
    line(&o, "warning", &["host-cache", "does not exist"]);
    line(&o, "ok", &["dockerd /usr/sbin/dockerd: found"]);
    line(&o, "ok", &["containerd: found"]);
    line(&o, "ok", &["cache root", "owner uid 0, mode 0755"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).ends_with("0 error(s), 2 warning(s)\n"),
        "{}",
        text(&o)
    );
    assert_eq!(tree(h.tmp.path()), before, "doctor changed something");
    assert!(!h.path("host-cache").exists() && !h.path("cache").exists());
    // The deploy step the line names warms it (root writes the host cache): now ok.
    let check = Command::new(BIN)
        .args(["policy", "check", "default"])
        .env("CACHELOCK_CONFIG", &h.config)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    let o = h.doctor(&["--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["ok"].as_bool(), v["errors"].as_u64()),
        (Some(true), Some(0)),
        "{v:#}"
    );
    let warm = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "compile_cache" && c["subject"] == "default")
        .unwrap_or_else(|| panic!("{v:#}"));
    assert_eq!(warm["level"], "ok", "{v:#} (was: {cold})");
    assert!(
        warm["message"].as_str().unwrap().starts_with("warm"),
        "{v:#}"
    );
}

#[test]
fn a_lock_directory_without_the_sticky_bit_is_an_error() {
    let h = Host::new("");
    h.dir("locks", 0o777);
    let o = h.doctor(&[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let l = line(
        &o,
        "error",
        &["lock directory", "mode 0777", "without the sticky bit"],
    );
    assert!(
        l.ends_with(&format!("(fix: chmod +t {})", h.path("locks").display())),
        "{l}"
    );
}

#[test]
fn a_lock_directory_owned_by_another_user_is_an_error_and_a_user_who_cannot_write_it_is_told() {
    let h = Host::new("");
    let a = alice();
    std::os::unix::fs::chown(h.path("locks"), Some(a.uid), Some(a.gid)).unwrap();
    let o = h.doctor(&[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    line(
        &o,
        "error",
        &[
            "lock directory",
            &format!("owned by uid {}", a.uid),
            "chown root:root",
        ],
    );
    // Root's own 0755 directory, looked at by alice: her runs would fail there.
    std::os::unix::fs::chown(h.path("locks"), Some(0), Some(0)).unwrap();
    h.dir("locks", 0o755);
    let mut c = a.command(BIN);
    c.arg("doctor")
        .env("CACHELOCK_CONFIG", &h.config)
        .env("CACHELOCK_LOCK_DIR", h.path("locks"))
        .env("HOME", h.path("home-of-alice"));
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    line(
        &o,
        "error",
        &[
            &format!("uid {} cannot create entries in it", a.uid),
            "exit 73",
        ],
    );
}

#[test]
fn the_shared_default_directory_missing_is_a_warning_for_root_and_an_error_for_a_user() {
    let s = Shared::new();
    let config = isolated_config(&s.path("conf"), "");
    std::fs::set_permissions(s.path("conf"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = |user| {
        let mut c = s.as_user(user, BIN);
        c.arg("doctor")
            .env("CACHELOCK_CONFIG", &config)
            .env_remove("CACHELOCK_LOCK_DIR");
        s.with_private_var_lib(&mut c);
        c.output().unwrap()
    };
    let o = run(None);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    line(
        &o,
        "warning",
        &[
            "/var/lib/cachelock: does not exist yet",
            "install -d -m 1777",
        ],
    );
    let o = run(Some(alice()));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    line(
        &o,
        "error",
        &[
            "/var/lib/cachelock: does not exist and uid",
            "private lock directory",
        ],
    );
    assert!(!s.path("varlib/cachelock").exists(), "doctor created it");
}

/// A FUSE mount (bindfs) is what the kernel here can mount of the filesystems inotify cannot
/// watch (it cannot mount NFS; the NFS magic number is classified in `sys`'s unit test).
#[test]
fn a_lock_directory_on_a_fuse_mount_warns_that_waiters_poll() {
    let h = Host::new("");
    let src = h.dir("src", 0o1777);
    let mnt = h.dir("mnt", 0o755);
    let o = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(r#"bindfs "$1" "$2" || exit 99; "$3" doctor --lock-dir "$2"; rc=$?; umount "$2"; exit $rc"#)
        .args(["sh", src.to_str().unwrap(), mnt.to_str().unwrap(), BIN])
        .env("CACHELOCK_CONFIG", &h.config)
        .env_remove("CACHELOCK_LOCK_DIR")
        .output()
        .unwrap();
    assert_ne!(
        o.status.code(),
        Some(99),
        "bindfs (make setup) could not mount: {}",
        text(&o)
    );
    assert_eq!(o.status.code(), Some(0), "only costs time: {}", text(&o));
    line(
        &o,
        "warning",
        &[
            "lock directory",
            "fuse",
            "network (or userspace) filesystem",
            "waiters poll",
            "actimeo=1",
        ],
    );
}

#[test]
fn a_bad_policy_binding_is_an_error_naming_the_policy_and_what_it_binds() {
    let wasm = test_policy("test-aging");
    let h = Host::new(&format!(
        "locks:\n  - match: 'ci-*'\n    policy: team\n  - match: 'rel-*'\n    policy: pinned\npolicies:\n  team:\n    module: {}\n  pinned:\n    module: {}\n    sha256: \"sha256:{}\"\n",
        "/nonexistent/team.wasm",
        wasm.display(),
        "0".repeat(64)
    ));
    let o = h.doctor(&[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    line(
        &o,
        "error",
        &[
            "policy team",
            "cannot read module",
            "binds locks ci-*",
            "exit 78",
        ],
    );
    line(
        &o,
        "error",
        &["policy pinned", "pins sha256:0000", "binds locks rel-*"],
    );
    line(&o, "ok", &["policy default", "binds locks no rule matches"]);
    // A configuration that does not parse: its line, and no policy is checked.
    h.configure("locks:\n  - match: x\n    polcy: team\n");
    let o = h.doctor(&[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    line(
        &o,
        "error",
        &["configuration", "line 5", "polcy", "exit 78"],
    );
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("policy default"),
        "{}",
        text(&o)
    );
}

#[test]
fn an_untrusted_compile_cache_is_an_error() {
    let h = Host::new("");
    h.dir("host-cache", 0o777);
    let o = h.doctor(&[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    line(
        &o,
        "error",
        &[
            "compile cache",
            "host-cache is not trusted",
            "mode 0777",
            "chmod go-w",
        ],
    );
}

#[test]
fn a_cache_root_without_dockerd_is_an_error_and_without_a_cache_root_a_warning() {
    let h = Host::new("dockerd:\n  binary: /nonexistent/dockerd\n");
    let o = h.doctor(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    line(
        &o,
        "warning",
        &[
            "dockerd /nonexistent/dockerd: not installed",
            "apt-get install docker.io",
        ],
    );
    let dind = h.dir("dind", 0o755);
    let o = h.doctor(&["--cache-root", dind.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    line(
        &o,
        "error",
        &["dockerd /nonexistent/dockerd: not found", "exit 69"],
    );
    // A cache root others can write into: root's runs could be led to write elsewhere.
    let open = h.dir("open", 0o777);
    let o = h.doctor(&["--cache-root", open.to_str().unwrap()]);
    line(
        &o,
        "error",
        &[
            "cache root",
            "mode 0777 lets group or others write",
            "chmod 0755",
        ],
    );
}

#[test]
fn an_unreachable_etcd_is_an_error_and_a_reachable_one_answers_in_time() {
    let h = Host::new("etcd:\n  request_timeout: 0.5\n");
    let port = crate::support::util::free_port();
    let o = h.doctor(&["--backend", &format!("etcd://127.0.0.1:{port}/doc")]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    line(
        &o,
        "error",
        &[
            &format!("etcd 127.0.0.1:{port}: does not answer"),
            "exit 69",
        ],
    );
    // One member down of two endpoints: requests fail over, a warning.
    let c = shared();
    let url = format!("etcd://{},127.0.0.1:{port}/doc", c.endpoints());
    let o = h.doctor(&["--backend", &url]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    line(
        &o,
        "ok",
        &[
            "answered in",
            " ms",
            "no TLS, no authentication",
            "key prefix doc/ readable",
        ],
    );
    line(
        &o,
        "warning",
        &[&format!("127.0.0.1:{port}: does not answer"), "fail over"],
    );
}

#[test]
fn etcd_tls_and_credentials_are_checked() {
    let c = secure();
    let tls = c.tls.clone().unwrap();
    let h = Host::new("");
    let doctor = |user: &str, ca: &Path| {
        h.cmd()
            .args(["--backend", &c.url("doc")])
            .env("ETCDCTL_CACERT", ca)
            .env("ETCDCTL_CERT", &tls.cert)
            .env("ETCDCTL_KEY", &tls.key)
            .env("ETCDCTL_USER", user)
            .output()
            .unwrap()
    };
    let o = doctor(&format!("root:{ROOT_PASSWORD}"), &tls.ca);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    line(&o, "ok", &["answered in", "over TLS as user root"]);
    let o = doctor("root:wrong", &tls.ca);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    line(
        &o,
        "error",
        &["refused the credentials", "ETCDCTL_PASSWORD"],
    );
    // A CA that did not sign the members' certificates.
    let other = h.path("other-ca.pem");
    let gen = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=other",
        ])
        .arg("-keyout")
        .arg(h.path("other-ca.key"))
        .arg("-out")
        .arg(&other)
        .output()
        .unwrap();
    assert!(gen.status.success(), "{}", text(&gen));
    let o = doctor(&format!("root:{ROOT_PASSWORD}"), &other);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    line(&o, "error", &["TLS handshake failed", "etcd.ca_file"]);
}
