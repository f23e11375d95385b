//! Shared helpers of the `dockerd_*` tests: an isolated environment per test (temp cache root,
//! lock dir, config, a short run dir), the test image built once, and clean-up that kills
//! whatever a failed test left running.
#![allow(dead_code)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_cachelock");

/// Fails the test (never skips) when dockerd or the test rootfs tools are missing.
pub fn require_dockerd() {
    assert!(
        Path::new("/usr/sbin/dockerd").exists(),
        "/usr/sbin/dockerd is missing: these tests need Debian's docker.io (make setup)"
    );
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox is missing: install busybox-static (make setup)"
    );
}

fn rand8() -> String {
    let mut b = [0u8; 4];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .expect("urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One test's world.
pub struct Env {
    /// Temp dir holding everything but the run dir.
    pub dir: tempfile::TempDir,
    /// Short run dir (instance sockets) under /run.
    pub run_dir: PathBuf,
    /// The config file.
    pub config: PathBuf,
    /// Cache root.
    pub cache_root: PathBuf,
    /// Lock dir.
    pub lock_dir: PathBuf,
}

impl Env {
    /// An environment whose config holds `run_dir` plus `dockerd` (lines of the `dockerd:`
    /// mapping, each indented by two spaces).
    pub fn new(dockerd: &str) -> Env {
        Self::with(dockerd, "")
    }

    /// Like [`Env::new`], plus top-level YAML `top`. Unless `dockerd` names them, the
    /// host-wide `/var/log/docker.log` and `/var/run/docker.sock` of the drop-in are turned off
    /// (tests run in parallel; the tests of those paths set them and take [`host_paths`]).
    pub fn with(dockerd: &str, top: &str) -> Env {
        require_dockerd();
        let mut dockerd = dockerd.to_string();
        for key in ["default_socket", "log_file"] {
            if !dockerd.contains(key) {
                dockerd.push_str(&format!("\n  {key}: off"));
            }
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let run_dir = PathBuf::from(format!("/run/clt-{}", rand8()));
        let cache_root = dir.path().join("cache");
        let lock_dir = dir.path().join("locks");
        let config = dir.path().join("config.yaml");
        let yaml = format!(
            "dockerd:\n  run_dir: {}\n{dockerd}\n{top}\n",
            run_dir.display()
        );
        std::fs::write(&config, yaml).unwrap();
        Env {
            dir,
            run_dir,
            config,
            cache_root,
            lock_dir,
        }
    }

    /// `cachelock` with this environment's config, lock dir and cache root.
    pub fn cmd(&self) -> Command {
        // CACHELOCK_TEST_BIN runs the suite against another build (e.g. the previous release).
        let mut c = Command::new(super::util::bin());
        c.env("CACHELOCK_CONFIG", &self.config)
            .env("CACHELOCK_LOCK_DIR", &self.lock_dir)
            .env("CACHELOCK_CACHE_ROOT", &self.cache_root)
            .env_remove("DOCKER_HOST")
            .stdin(Stdio::null());
        c
    }

    /// `cachelock dockerd ARGS -- sh -c SCRIPT`, run to completion.
    pub fn dockerd(&self, args: &[&str], script: &str) -> Output {
        let out = self
            .cmd()
            .arg("dockerd")
            .args(args)
            .args(["--", "sh", "-c", script])
            .output()
            .expect("run cachelock");
        out
    }

    /// Spawns `cachelock dockerd ARGS -- sh -c SCRIPT` with piped output.
    pub fn spawn_dockerd(&self, args: &[&str], script: &str) -> Child {
        self.cmd()
            .arg("dockerd")
            .args(args)
            .args(["--", "sh", "-c", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cachelock")
    }

    /// A path inside the temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Processes belonging to this environment: any whose command line names its temp dir or
    /// run dir (dockerd, containerd and shims all carry the exec root or data root).
    pub fn processes(&self) -> Vec<(i32, String)> {
        let keys = [
            self.dir.path().display().to_string(),
            self.run_dir.display().to_string(),
        ];
        let me = std::process::id() as i32;
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            if keys.iter().any(|k| cmdline.contains(k.as_str())) {
                out.push((pid, cmdline));
            }
        }
        out
    }

    /// dockerd processes whose data root is `root`.
    pub fn dockerds_on(&self, root: &Path) -> Vec<i32> {
        let key = format!("--data-root={}", root.display());
        self.processes()
            .into_iter()
            .filter(|(_, c)| c.split(' ').any(|a| a == key))
            .map(|(p, _)| p)
            .collect()
    }

    /// Waits up to `timeout` for every process of this environment to be gone; returns the
    /// survivors.
    pub fn wait_clean(&self, timeout: Duration) -> Vec<(i32, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = self.processes();
            if left.is_empty() || Instant::now() >= deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Asserts that nothing of this environment runs (after a short grace).
    pub fn assert_clean(&self) {
        let left = self.wait_clean(Duration::from_secs(5));
        assert!(left.is_empty(), "left running: {left:?}");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let d = self.dir.path().display().to_string();
        let r = self.run_dir.display().to_string();
        assert!(
            !mounts.lines().any(|l| l.contains(&d) || l.contains(&r)),
            "mounts left"
        );
    }

    /// Whether `-n` can take lock `name` right now (the lock is released).
    pub fn lock_free(&self, name: &str) -> bool {
        self.cmd()
            .args(["run", "-n", "-q", name, "--", "true"])
            .status()
            .unwrap()
            .success()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for _ in 0..100 {
            let left = self.processes();
            if left.is_empty() {
                break;
            }
            for (pid, _) in left {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let d = self.dir.path().display().to_string();
        let r = self.run_dir.display().to_string();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&d) || m.starts_with(&r))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let c = std::ffi::CString::new(p).unwrap();
            // SAFETY: valid path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

/// Kills a spawned child on drop.
pub struct Killer(pub Option<Child>);

impl Drop for Killer {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A `docker save` tarball of a busybox image tagged `bb:1`, built once (per target dir).
pub fn image_tar() -> PathBuf {
    static TAR: OnceLock<PathBuf> = OnceLock::new();
    TAR.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dockerd-test-bb.tar");
        if out.exists() {
            return out;
        }
        let env = Env::new("  network: none");
        let rootfs = env.path("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        for l in ["sh", "echo", "sleep", "cat", "ls", "true", "date", "touch"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(l)).unwrap();
        }
        let tmp = out.with_extension(format!("tar.{}", std::process::id()));
        let o = env.dockerd(
            &[],
            &format!(
                "tar -C {} -c . | docker import - bb:1 >/dev/null && docker save -o {} bb:1",
                rootfs.display(),
                tmp.display()
            ),
        );
        assert!(o.status.success(), "building the test image: {}", text(&o));
        std::fs::rename(&tmp, &out).unwrap();
        out
    })
    .clone()
}

/// Serialises the tests that use the host-wide `/var/run/docker.sock` and `/var/log/docker.log`.
pub fn host_paths() -> std::sync::MutexGuard<'static, ()> {
    static M: std::sync::Mutex<()> = std::sync::Mutex::new(());
    M.lock().unwrap_or_else(|p| p.into_inner())
}

/// Debian's `docker-registry` serving plain HTTP on a free loopback port with its own storage,
/// started once per test binary ([`super::registry`]); returns `127.0.0.1:PORT`.
pub fn registry() -> String {
    static REGISTRY: OnceLock<super::registry::Registry> = OnceLock::new();
    REGISTRY
        .get_or_init(|| super::registry::Registry::start("images", false, false))
        .addr
        .clone()
}

/// Pushes the test image `bb:1` to the registry as each of `names` (`repo/name:tag`).
pub fn push_to_registry(names: &[&str]) -> String {
    let addr = registry();
    let tar = image_tar();
    let env = Env::new("  network: none");
    let mut script = format!("docker load -q -i {} >/dev/null", tar.display());
    for n in names {
        script.push_str(&format!(
            " && docker tag bb:1 {addr}/{n} && docker push -q {addr}/{n} >/dev/null"
        ));
    }
    let o = env.dockerd(&[], &script);
    assert!(o.status.success(), "pushing {names:?}: {}", text(&o));
    addr
}

/// Single-quotes a string for `/bin/sh` as Earthly's Go side does (`'` → `'"'"'`).
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\"'\"'"))
}

/// `dockerd-wrapper.sh` in the env's directory: a link to the binary, named as Earthly installs
/// it (the name selects the drop-in).
pub fn wrapper_path(env: &Env) -> PathBuf {
    let p = env.path("dockerd-wrapper.sh");
    if !p.exists() {
        std::os::unix::fs::symlink(BIN, &p).unwrap();
    }
    p
}

/// The command line Earthly's `WITH DOCKER` runs: `/bin/sh -c '<VAR="value"...> <wrapper>
/// execute /bin/sh -c '<script>''` (earthfile2llb's makeWithDockerdWrapFun and
/// strWithEnvVarsAndDocker), with `secret_env` passed as environment (Earthly sends
/// `EARTHLY_DOCKER_LOAD_REGISTRY` as a secret-as-env).
pub fn earthly_call(
    env: &Env,
    params: &[(&str, &str)],
    secret_env: &[(&str, &str)],
    script: &str,
) -> Command {
    let vars: Vec<String> = params.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    let line = format!(
        "{} {} execute /bin/sh -c {}",
        vars.join(" "),
        wrapper_path(env).display(),
        sh_quote(script)
    );
    shell_call(env, &line, secret_env)
}

/// The command line EarthBuild's CLI runs: `/bin/sh -c '<wrapper> execute --flag='v'... --
/// /bin/sh -c '<script>''` (dockerdFlag quotes each value).
pub fn earthbuild_call(
    env: &Env,
    flags: &[(&str, Option<&str>)],
    secret_env: &[(&str, &str)],
    script: &str,
) -> Command {
    let flags: Vec<String> = flags
        .iter()
        .map(|(k, v)| match v {
            Some(v) => format!("{k}={}", sh_quote(v)),
            None => k.to_string(),
        })
        .collect();
    let line = format!(
        "{} execute {} -- /bin/sh -c {}",
        wrapper_path(env).display(),
        flags.join(" "),
        sh_quote(script)
    );
    shell_call(env, &line, secret_env)
}

/// `/bin/sh -c LINE` with the env's configuration, a clean environment otherwise.
pub fn shell_call(env: &Env, line: &str, extra: &[(&str, &str)]) -> Command {
    let mut c = Command::new("/bin/sh");
    c.arg("-c")
        .arg(line)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("CACHELOCK_CONFIG", &env.config)
        .stdin(Stdio::null());
    for (k, v) in extra {
        c.env(k, v);
    }
    c
}

/// Waits (60 s at most) until `path` exists: the event a test's command signals with `touch`.
pub fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// stdout + stderr of an output, for messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A fixture script's path.
pub fn fixture(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dockerd")
        .join(name);
    let mut perm = std::fs::metadata(&p).unwrap().permissions();
    perm.set_mode(0o755);
    let _ = std::fs::set_permissions(&p, perm);
    p
}

/// Writes `text` to a new file in the env and returns the path.
pub fn write(env: &Env, name: &str, text: &str) -> PathBuf {
    let p = env.path(name);
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    p
}

/// Now in nanoseconds since the epoch.
pub fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}
