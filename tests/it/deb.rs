//! The Debian package (`packaging/deb/build`, what `make deb` runs), built here from the static
//! binary in two versions and tried in a clean Debian root: installed, used by root and by a
//! user, upgraded, removed and purged, with nothing left but what the user made; `lintian`
//! reports no error.
//!
//! The clean root is made once from Debian's packages by mmdebstrap (the essential set plus
//! systemd-standalone-tmpfiles, which runs the package's tmpfiles.d entries; no image is
//! pulled) and kept as a tarball under target/tmp, so later runs only unpack it; each test
//! unpacks its own copy. The packages are gzip-compressed here (`DEB_COMPRESSION`): xz, what
//! `make deb` uses, took 16 s of CPU for a 30 MB binary here and tests nothing more.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Instant;

use crate::support::util::static_binary;

/// What the build script names as the default cache root must be the binary's.
const CACHE_ROOT: &str = cachelock::config::DEFAULT_CACHE_ROOT;

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn tmp_dir() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
}

/// The host's Debian release (the clean root's), from /etc/os-release.
fn codename() -> String {
    let os = std::fs::read_to_string("/etc/os-release").unwrap();
    os.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .expect("VERSION_CODENAME in /etc/os-release")
}

/// The clean root's tarball: made by mmdebstrap on first use (the time it took is printed),
/// then reused.
fn clean_root_tar() -> PathBuf {
    static TAR: OnceLock<PathBuf> = OnceLock::new();
    TAR.get_or_init(|| {
        let suite = codename();
        let out = tmp_dir().join(format!("debian-{suite}-essential-tmpfiles.tar"));
        if out.is_file() {
            return out;
        }
        assert!(
            Path::new("/usr/bin/mmdebstrap").exists(),
            "mmdebstrap is missing: install it (make setup)"
        );
        // mmdebstrap writes a tarball for a name ending in .tar (else a directory).
        let part = tmp_dir().join(format!("debian-{suite}-{}.tar", std::process::id()));
        let started = Instant::now();
        // The host's apt sources: Debian's packages only.
        let o = Command::new("mmdebstrap")
            .args([
                "--quiet",
                "--mode=root",
                "--variant=essential",
                "--include=systemd-standalone-tmpfiles",
            ])
            .arg(&suite)
            .arg(&part)
            .output()
            .unwrap();
        assert!(o.status.success(), "mmdebstrap: {}", text(&o));
        std::fs::rename(&part, &out).unwrap();
        eprintln!(
            "clean Debian root ({suite}, essential + systemd-standalone-tmpfiles): made by mmdebstrap in {:.1} s, {} MB",
            started.elapsed().as_secs_f64(),
            std::fs::metadata(&out).unwrap().len() >> 20
        );
        out
    })
    .clone()
}

/// Version `n` of the package (two versions, for the upgrade).
fn version(n: u32) -> String {
    format!("{}+test{n}", env!("CARGO_PKG_VERSION"))
}

/// The two packages, built once per run from the static binary.
fn packages() -> &'static [PathBuf; 2] {
    static DEBS: OnceLock<[PathBuf; 2]> = OnceLock::new();
    DEBS.get_or_init(|| {
        let out = tmp_dir().join(format!("deb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let build = |n: u32| {
            let started = Instant::now();
            let o = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/deb/build"))
                .arg(static_binary())
                .arg(version(n))
                .arg(&out)
                .env("DEB_COMPRESSION", "gzip")
                .output()
                .unwrap();
            assert!(o.status.success(), "packaging/deb/build: {}", text(&o));
            let deb = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
            eprintln!(
                "{}: {} MB, built in {:.1} s",
                deb.display(),
                std::fs::metadata(&deb).unwrap().len() >> 20,
                started.elapsed().as_secs_f64()
            );
            deb
        };
        [build(1), build(2)]
    })
}

/// One test's copy of the clean root.
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn new() -> Root {
        let tar = clean_root_tar();
        let dir = tempfile::tempdir().unwrap();
        let o = Command::new("tar")
            .args(["-xf"])
            .arg(&tar)
            .arg("-C")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "unpacking the clean root: {}", text(&o));
        Root { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel.trim_start_matches('/'))
    }

    /// Copies `deb` into the root's /tmp; returns its path there.
    fn put(&self, deb: &Path) -> String {
        let name = deb.file_name().unwrap().to_str().unwrap();
        std::fs::copy(deb, self.path("tmp").join(name)).unwrap();
        format!("/tmp/{name}")
    }

    /// `/bin/sh -c SCRIPT` inside the root (a chroot in a mount namespace of its own, with
    /// /proc and /dev), as root.
    fn sh(&self, script: &str) -> Output {
        Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount -t proc proc "$1/proc" && mount --rbind /dev "$1/dev" && exec chroot "$1" /bin/sh -c "$2""#)
            .arg("sh")
            .arg(self.dir.path())
            .arg(script)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LC_ALL", "C")
            .output()
            .unwrap()
    }

    /// Like [`Root::sh`], and it must succeed.
    fn ok(&self, script: &str) -> Output {
        let o = self.sh(script);
        assert!(o.status.success(), "{script}: {}", text(&o));
        o
    }

    /// Every path of the root but the kernel's, dpkg's database and logs: (owner, mode).
    fn tree(&self) -> BTreeMap<String, (u32, u32)> {
        let skip = ["proc", "dev", "tmp", "run", "var/lib/dpkg", "var/log"];
        let mut out = BTreeMap::new();
        let mut stack = vec![self.dir.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let rel = e
                    .path()
                    .strip_prefix(self.dir.path())
                    .unwrap()
                    .display()
                    .to_string();
                if skip.contains(&rel.as_str()) {
                    continue;
                }
                let m = e.path().symlink_metadata().unwrap();
                if m.is_dir() {
                    stack.push(e.path());
                }
                out.insert(rel, (m.uid(), m.mode()));
            }
        }
        out
    }

    /// Owner and permission bits of a path in the root.
    fn owner_mode(&self, rel: &str) -> (u32, u32) {
        let m = std::fs::symlink_metadata(self.path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        (m.uid(), m.mode() & 0o7777)
    }
}

/// The paths present in `after` and not in `before`, and those gone.
fn diff(
    before: &BTreeMap<String, (u32, u32)>,
    after: &BTreeMap<String, (u32, u32)>,
) -> (Vec<String>, Vec<String>) {
    let added = after
        .keys()
        .filter(|k| !before.contains_key(*k))
        .cloned()
        .collect();
    let gone = before
        .keys()
        .filter(|k| !after.contains_key(*k))
        .cloned()
        .collect();
    (added, gone)
}

#[test]
fn lintian_reports_no_error_and_the_package_holds_what_it_should() {
    let deb = &packages()[0];
    assert!(
        Path::new("/usr/bin/lintian").exists(),
        "lintian is missing: install it (make setup)"
    );
    let o = Command::new("lintian")
        .args(["--fail-on", "error", "--no-tag-display-limit"])
        .arg(deb)
        .output()
        .unwrap();
    eprintln!("lintian: {}", String::from_utf8_lossy(&o.stdout));
    assert!(o.status.success(), "lintian: {}", text(&o));
    assert!(
        !String::from_utf8_lossy(&o.stdout)
            .lines()
            .any(|l| l.starts_with("E:")),
        "{}",
        text(&o)
    );
    let list = Command::new("dpkg-deb")
        .arg("-c")
        .arg(deb)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    for path in [
        "./usr/bin/cachelock",
        "./usr/share/man/man1/cachelock.1.gz",
        "./usr/share/bash-completion/completions/cachelock",
        "./usr/share/zsh/vendor-completions/_cachelock",
        "./usr/share/fish/vendor_completions.d/cachelock.fish",
        "./etc/cachelock/config.yaml",
        "./usr/lib/tmpfiles.d/cachelock.conf",
        "./usr/lib/systemd/system/cachelock.service",
        "./usr/share/doc/cachelock/copyright",
        "./usr/share/doc/cachelock/changelog.gz",
    ] {
        assert!(
            list.lines().any(|l| l.ends_with(path)),
            "{path} missing:\n{list}"
        );
    }
    let x = tempfile::tempdir().unwrap();
    let o = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(x.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // Stripped and static: no symbol table, no debug sections, no program interpreter.
    let bin = x.path().join("usr/bin/cachelock");
    let sections = Command::new("readelf")
        .args(["-S", "-W"])
        .arg(&bin)
        .output()
        .unwrap();
    let sections = String::from_utf8_lossy(&sections.stdout).into_owned();
    assert!(sections.contains(".text"), "{sections}");
    assert!(
        [".symtab", ".debug_info", ".debug_line"]
            .iter()
            .all(|s| !sections.contains(s)),
        "{sections}"
    );
    let headers = Command::new("readelf")
        .args(["-l", "-W"])
        .arg(&bin)
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&headers.stdout).contains("program interpreter"));
    eprintln!(
        "packaged binary: {} bytes stripped (from {} bytes)",
        std::fs::metadata(&bin).unwrap().len(),
        std::fs::metadata(static_binary()).unwrap().len()
    );
    // The default cache root is the binary's.
    let tmpfiles =
        std::fs::read_to_string(x.path().join("usr/lib/tmpfiles.d/cachelock.conf")).unwrap();
    assert!(
        tmpfiles.contains(&format!("\nd {CACHE_ROOT} 0755 root root -\n")),
        "{tmpfiles}"
    );
    // The conffile changes nothing: it parses to the defaults.
    let conf = std::fs::read_to_string(x.path().join("etc/cachelock/config.yaml")).unwrap();
    assert!(conf.contains(CACHE_ROOT), "{conf}");
    let parsed = cachelock::config::Config::parse(&conf).unwrap();
    assert_eq!(
        format!("{parsed:?}"),
        format!("{:?}", cachelock::config::Config::default())
    );
}

#[test]
fn installs_upgrades_removes_and_purges_leaving_only_what_the_user_made() {
    let [v1, v2] = packages();
    let root = Root::new();
    let fresh = root.tree();
    let (d1, d2) = (root.put(v1), root.put(v2));

    // Install: the directories exist at once (tmpfiles.d), with their modes and owners.
    root.ok(&format!("dpkg -i {d1}"));
    let o = root.ok("dpkg-query -W -f '${Version} ${Status}' cachelock");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("{} install ok installed", version(1))
    );
    assert_eq!(root.owner_mode("/var/lib/cachelock"), (0, 0o1777));
    assert_eq!(root.owner_mode("/var/cache/cachelock"), (0, 0o755));
    assert_eq!(root.owner_mode(CACHE_ROOT), (0, 0o755));
    root.ok("dpkg -V cachelock");
    // The service is shipped, not enabled.
    assert!(root
        .path("/usr/lib/systemd/system/cachelock.service")
        .is_file());
    assert!(!root
        .path("/etc/systemd/system/multi-user.target.wants/cachelock.service")
        .exists());
    // The installed host passes doctor: the example configuration parses to the defaults, the
    // lock directory is shared and sticky (warnings only: a cold compile cache, no dockerd).
    let o = root.sh("cachelock doctor");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let report = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        report.contains("configuration /etc/cachelock/config.yaml: parses: 0 lock rule(s)"),
        "{report}"
    );
    assert!(
        report.contains("lock directory /var/lib/cachelock: owner uid 0, mode 1777"),
        "{report}"
    );

    // Used: root and a user take locks, root warms the compile cache at deploy, the user
    // leaves a cached data root of theirs, the administrator edits the configuration.
    root.ok("cachelock run build -- true && cachelock policy check default >/dev/null");
    root.ok("setpriv --reuid=4242 --regid=4242 --clear-groups env HOME=/tmp cachelock run -q mine -- true");
    root.ok(&format!(
        "mkdir -p {CACHE_ROOT}/cache_app && echo layers > {CACHE_ROOT}/cache_app/data && echo '# edited by the administrator' >> /etc/cachelock/config.yaml"
    ));
    assert!(root.path("/var/lib/cachelock/build.lock").is_dir());
    assert!(root.path("/var/lib/cachelock/mine.lock").is_dir());
    assert!(
        std::fs::read_dir(root.path("/var/cache/cachelock"))
            .unwrap()
            .count()
            > 0
    );

    // Upgrade: the new version, the edited conffile kept without a question, state kept.
    root.ok(&format!("dpkg -i {d2} </dev/null"));
    let o = root.ok("dpkg-query -W -f '${Version}' cachelock");
    assert_eq!(String::from_utf8_lossy(&o.stdout), version(2));
    let conf = std::fs::read_to_string(root.path("/etc/cachelock/config.yaml")).unwrap();
    assert!(conf.ends_with("# edited by the administrator\n"), "{conf}");
    root.ok("cachelock run build -- true");

    // Remove: the program goes; the configuration and the state stay.
    root.ok("dpkg -r cachelock");
    let o = root.ok("dpkg-query -W -f '${Status}' cachelock");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "deinstall ok config-files"
    );
    for gone in [
        "/usr/bin/cachelock",
        "/usr/share/man/man1/cachelock.1.gz",
        "/usr/lib/tmpfiles.d/cachelock.conf",
        "/usr/lib/systemd/system/cachelock.service",
    ] {
        assert!(!root.path(gone).exists(), "{gone} left after dpkg -r");
    }
    assert!(root.path("/etc/cachelock/config.yaml").exists());
    assert!(root.path("/var/lib/cachelock/build.lock").is_dir());

    // Purge: what cachelock made goes; what the user made stays, and the purge says so.
    let o = root.ok("dpkg -P cachelock");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&format!("kept {CACHE_ROOT}")),
        "{}",
        text(&o)
    );
    let o = root.sh("dpkg-query -W cachelock");
    assert_ne!(
        o.status.code(),
        Some(0),
        "dpkg still knows the package: {}",
        text(&o)
    );
    // The cache root's ancestors stay with it (what purge must not touch), whatever they are.
    let ancestors = std::path::Path::new(CACHE_ROOT)
        .ancestors()
        .skip(1)
        .map(|p| p.to_string_lossy().trim_start_matches('/').to_string())
        .filter(|p| !p.is_empty());
    let user_made: Vec<String> = ancestors
        .chain([
            CACHE_ROOT.trim_start_matches('/').to_string(),
            format!("{}/cache_app", CACHE_ROOT.trim_start_matches('/')),
            format!("{}/cache_app/data", CACHE_ROOT.trim_start_matches('/')),
        ])
        .filter(|p| !fresh.contains_key(p))
        .collect();
    let mut want = user_made.clone();
    want.sort();
    let (added, gone) = diff(&fresh, &root.tree());
    assert_eq!(
        gone,
        Vec::<String>::new(),
        "purge removed what was there before"
    );
    assert_eq!(
        added, want,
        "left after purge beyond the user's cached data root"
    );
}

#[test]
fn a_purge_right_after_installing_leaves_the_root_as_it_was() {
    let root = Root::new();
    let fresh = root.tree();
    let d1 = root.put(&packages()[0]);
    root.ok(&format!(
        "dpkg -i {d1} && cachelock run x -- true && dpkg -P cachelock"
    ));
    let (added, gone) = diff(&fresh, &root.tree());
    assert_eq!((added, gone), (Vec::new(), Vec::new()));
}
