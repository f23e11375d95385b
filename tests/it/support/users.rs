//! Several users on one host, for the attack suite: unprivileged test users (created once,
//! idempotently, with `useradd`), commands run as them with `setpriv`, a directory they all
//! share, and a private view of `/var/lib` (a mount namespace) so that tests of the default
//! lock directory never touch the host's `/var/lib/cachelock`. Needs root: the tests fail
//! (they do not skip) without it.
#![allow(dead_code)]

use std::ffi::{CString, OsStr};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::util::{bin, Proc};

/// An unprivileged user of the host.
#[derive(Debug, Clone)]
pub struct User {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

fn id_of(name: &str, flag: &str) -> Option<u32> {
    let o = Command::new("id").args([flag, name]).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .flatten()
}

impl User {
    /// The user `name`, created (system account, no home, no shell) if missing.
    pub fn ensure(name: &str) -> User {
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the attack suite plays other users: run it as root (CI does)"
        );
        if id_of(name, "-u").is_none() {
            let st = Command::new("useradd")
                .args([
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                ])
                .arg(name)
                .status()
                .expect("useradd (package passwd) is needed by the attack suite");
            // 9: created meanwhile by a concurrent run.
            assert!(
                st.success() || st.code() == Some(9),
                "useradd {name} failed: {st}"
            );
        }
        User {
            name: name.to_string(),
            uid: id_of(name, "-u").expect("uid"),
            gid: id_of(name, "-g").expect("gid"),
        }
    }

    /// `program` run as this user through `setpriv` (groups cleared).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--clear-groups")
            .arg("--")
            .arg(program);
        c
    }
}

/// The victim of the attacks.
pub fn alice() -> &'static User {
    static U: OnceLock<User> = OnceLock::new();
    U.get_or_init(|| User::ensure("cl-alice"))
}

/// The attacker: another user of the same lock directory.
pub fn bob() -> &'static User {
    static U: OnceLock<User> = OnceLock::new();
    U.get_or_init(|| User::ensure("cl-bob"))
}

/// A directory shared by root, alice and bob, with a lock directory `locks/` in it (created by
/// whoever runs cachelock first), a world-writable section log and a FIFO for sleeping
/// without forking.
pub struct Shared {
    pub tmp: tempfile::TempDir,
    pub lock_dir: PathBuf,
}

impl Shared {
    pub fn new() -> Shared {
        let tmp = tempfile::tempdir().expect("tempdir");
        // Everyone creates files here (logs, markers); nobody removes another's (sticky).
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        let fifo = tmp.path().join("fifo");
        let c = CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: valid path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
        std::fs::set_permissions(&fifo, std::fs::Permissions::from_mode(0o666)).unwrap();
        let shared = Shared {
            lock_dir: tmp.path().join("locks"),
            tmp,
        };
        for u in [alice(), bob()] {
            // Each user's own cache of compiled policies.
            let cache = shared.path(&format!("cache-{}", u.name));
            std::fs::create_dir(&cache).unwrap();
            std::os::unix::fs::chown(&cache, Some(u.uid), Some(u.gid)).unwrap();
            std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        let sticky = shared.path("tmp");
        std::fs::create_dir(&sticky).unwrap();
        std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
        shared
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// A file everyone may append to.
    pub fn log(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, "").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        p
    }

    /// `program` as `user` (root when `None`) with a clean environment: `PATH`, this
    /// directory's lock directory, no configuration file, the user's own policy cache.
    pub fn as_user(&self, user: Option<&User>, program: impl AsRef<OsStr>) -> Command {
        let mut c = match user {
            Some(u) => u.command(program),
            None => Command::new(program),
        };
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", "/nonexistent")
            .env("CACHELOCK_LOCK_DIR", &self.lock_dir)
            .env("CACHELOCK_CONFIG", "/dev/null")
            .env("TMPDIR", self.path("tmp"));
        if let Some(u) = user {
            c.env("XDG_CACHE_HOME", self.path(&format!("cache-{}", u.name)));
        }
        c
    }

    /// `cachelock ARGS...` as `user`.
    pub fn cl(&self, user: Option<&User>, args: &[&str]) -> Command {
        let mut c = self.as_user(user, bin());
        c.args(args);
        c
    }

    /// `cachelock ARGS...` as `user`, to completion.
    pub fn run(&self, user: Option<&User>, args: &[&str]) -> Output {
        self.cl(user, args)
            .stdin(Stdio::null())
            .output()
            .expect("cachelock")
    }

    /// Spawns `cmd` in its own process group (killed with it on drop), stderr captured.
    pub fn spawn(&self, mut cmd: Command) -> Proc {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("spawn");
        Proc(Some(child))
    }

    /// A bash command holding until `go` exists, logging "TAG START END" to `log`; it writes
    /// `<go>.started` once inside, and ignores SIGTERM (a killed cachelock's parent-death
    /// signal), as a build that must finish would. It also ends when its FIFO is gone (the
    /// test's directory removed: a test that ended without letting it go), so that no holder
    /// outlives its test.
    pub fn section_until(&self, log: &Path, tag: &str, go: &Path) -> Vec<String> {
        vec![
            "bash".into(),
            "-c".into(),
            r#"trap '' TERM; s=$EPOCHREALTIME; echo started > "$3.started"; while [ ! -e "$3" ] && [ -p "$4" ]; do read -t 0.01 <> "$4"; done; e=$EPOCHREALTIME; echo "$2 $s $e" >> "$1""#
                .into(),
            "_".into(),
            log.display().to_string(),
            tag.into(),
            go.display().to_string(),
            self.path("fifo").display().to_string(),
        ]
    }

    /// The ticket files of `lock`.
    pub fn tickets(&self, lock: &str) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(self.lock_dir.join(format!("{lock}.lock/queue")))
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
        v.sort();
        v
    }

    /// Runs `cmd` in a mount namespace of its own where `/var/lib` is this directory's
    /// `varlib/` (so the default lock directory `/var/lib/cachelock` is a test's own, and
    /// persists across the test's commands), then drops to the user `cmd` names.
    pub fn with_private_var_lib(&self, cmd: &mut Command) {
        let varlib = self.path("varlib");
        if !varlib.exists() {
            std::fs::create_dir(&varlib).unwrap();
            std::fs::set_permissions(&varlib, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let src = CString::new(varlib.to_str().unwrap()).unwrap();
        // SAFETY: only async-signal-safe system calls on values prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let check = |r: libc::c_int| {
                    if r == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                };
                check(libc::unshare(libc::CLONE_NEWNS))?;
                check(libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                check(libc::mount(
                    src.as_ptr(),
                    c"/var/lib".as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ))
            });
        }
    }
}

/// Waits until `cond` holds (an event, polled; fails after 30 s).
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "timed out waiting: {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The text of `o`'s stderr.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
