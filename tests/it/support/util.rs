//! Shared helpers of the engine's integration tests: a private lock directory, the real binary,
//! children killed on drop, a critical-section script that logs its own start/end times (the
//! independent overlap detector), and fairness statistics.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The binary under test: this build's, or `CACHELOCK_TEST_BIN` (e.g. the previous release,
/// `target/prev-release/cachelock`, to see which attacks of the security suite it falls to).
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("CACHELOCK_TEST_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_cachelock").to_string())
    })
}

/// A private lock directory and configuration for one test.
pub struct Env {
    pub tmp: tempfile::TempDir,
    pub lock_dir: PathBuf,
    pub config: PathBuf,
}

impl Env {
    pub fn new() -> Self {
        Self::with_config("")
    }

    /// With `yaml` as the configuration file.
    pub fn with_config(yaml: &str) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let lock_dir = tmp.path().join("locks");
        let config = tmp.path().join("config.yaml");
        std::fs::write(&config, yaml).unwrap();
        std::fs::write(tmp.path().join("fifo-placeholder"), "").unwrap();
        let fifo = tmp.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: valid path.
        unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        Env {
            tmp,
            lock_dir,
            config,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// `cachelock` with this env's lock dir and config.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(bin());
        c.env("CACHELOCK_LOCK_DIR", &self.lock_dir)
            .env("CACHELOCK_CONFIG", &self.config)
            .env_remove("CACHELOCK_LOG");
        c
    }

    /// `cachelock run ARGS...` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().arg("run").args(args).output().expect("run")
    }

    /// Spawns `cachelock ARGS...` (in its own process group) killed on drop.
    pub fn spawn(&self, args: &[&str]) -> Proc {
        use std::os::unix::process::CommandExt;
        let child = self
            .cmd()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("spawn");
        Proc(Some(child))
    }

    /// Live ticket files of `lock`.
    pub fn tickets(&self, lock: &str) -> Vec<String> {
        let q = self.lock_dir.join(format!("{lock}.lock/queue"));
        let mut v: Vec<String> = std::fs::read_dir(q)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Waits until `lock` has `n` tickets (holders + waiters).
    pub fn wait_tickets(&self, lock: &str, n: usize) {
        let t0 = Instant::now();
        while self.tickets(lock).len() != n {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "lock {lock}: expected {n} tickets, have {:?}",
                self.tickets(lock)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `cachelock status --json` parsed.
    pub fn status_json(&self, lock: Option<&str>) -> serde_json::Value {
        let mut c = self.cmd();
        c.args(["status", "--json"]);
        if let Some(l) = lock {
            c.arg(l);
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// A bash critical section that appends "TAG START END" (µs-resolution wall clock) to
    /// `log`, holding for `hold_s` seconds without forking.
    pub fn section(&self, log: &Path, tag: &str, hold_s: f64) -> Vec<String> {
        vec![
            "bash".into(),
            "-c".into(),
            r#"s=$EPOCHREALTIME; read -t "$3" <> "$4"; e=$EPOCHREALTIME; echo "$2 $s $e" >> "$1""#
                .into(),
            "_".into(),
            log.display().to_string(),
            tag.into(),
            format!("{hold_s}"),
            self.path("fifo").display().to_string(),
        ]
    }
}

/// A child process killed (with its process group) on drop.
pub struct Proc(pub Option<Child>);

impl Proc {
    pub fn pid(&self) -> i32 {
        self.0.as_ref().unwrap().id() as i32
    }
    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid(), sig) };
    }
    pub fn signal_group(&self, sig: i32) {
        // SAFETY: signalling our child's process group.
        unsafe { libc::kill(-self.pid(), sig) };
    }
    /// Waits at most `timeout` for exit; returns the exit code (128+N for a signal).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt;
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.0.as_mut().unwrap().try_wait().unwrap() {
                return Some(s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)));
            }
            if t0.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    pub fn wait(&mut self) -> i32 {
        self.wait_timeout(Duration::from_secs(30))
            .expect("process did not exit in 30 s")
    }
    pub fn stderr(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(e) = self.0.as_mut().unwrap().stderr.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            // SAFETY: killing our own child's group.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One logged critical section.
#[derive(Debug, Clone)]
pub struct Section {
    pub tag: String,
    pub start: f64,
    pub end: f64,
}

/// Reads a section log, sorted by start.
pub fn read_log(log: &Path) -> Vec<Section> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut v: Vec<Section> = text
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some(Section {
                tag: it.next()?.to_string(),
                start: it.next()?.parse().ok()?,
                end: it.next()?.parse().ok()?,
            })
        })
        .collect();
    v.sort_by(|a, b| a.start.partial_cmp(&b.start).unwrap());
    v
}

/// Pairs of sections that overlap in time (should be none for an exclusive lock).
pub fn overlaps(v: &[Section]) -> Vec<(Section, Section)> {
    let mut out = Vec::new();
    let mut max_end: Option<&Section> = None;
    for s in v {
        if let Some(m) = max_end {
            if s.start < m.end {
                out.push((m.clone(), s.clone()));
            }
        }
        if max_end.is_none_or(|m| s.end > m.end) {
            max_end = Some(s);
        }
    }
    out
}

/// Handoff gaps in ms between consecutive sections.
pub fn handoffs_ms(v: &[Section]) -> Vec<f64> {
    v.windows(2)
        .map(|w| (w[1].start - w[0].end) * 1000.0)
        .collect()
}

/// Unix time in seconds (f64), comparable with bash's $EPOCHREALTIME.
pub fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// CPU time (user+system) of `pid` in seconds, from /proc.
pub fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the command name.
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

/// Runs `workers` loops for `dur`, each repeatedly running the command `argv_for(i)` (retrying
/// after `retry_sleep` when it exits with `conflict_code`), and returns the section log.
pub fn contend(
    env: &Env,
    log: &Path,
    dur: Duration,
    workers: Vec<(Vec<String>, Option<Duration>)>,
) -> Vec<Section> {
    let _ = std::fs::remove_file(log);
    let end = Instant::now() + dur;
    let handles: Vec<_> = workers
        .into_iter()
        .map(|(argv, retry_sleep)| {
            let envv: Vec<(String, String)> = vec![
                (
                    "CACHELOCK_LOCK_DIR".into(),
                    env.lock_dir.display().to_string(),
                ),
                ("CACHELOCK_CONFIG".into(), env.config.display().to_string()),
            ];
            std::thread::spawn(move || {
                while Instant::now() < end {
                    let st = Command::new(&argv[0])
                        .args(&argv[1..])
                        .envs(envv.clone())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .expect("worker");
                    if !st.success() {
                        if let Some(d) = retry_sleep {
                            std::thread::sleep(d);
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    read_log(log)
}

/// Turns per tag, in `tags` order.
pub fn turns(v: &[Section], tags: &[String]) -> Vec<f64> {
    tags.iter()
        .map(|t| v.iter().filter(|s| &s.tag == t).count() as f64)
        .collect()
}

/// Waits until `path` has at least `n` lines and returns its first `n` (an event, not a
/// sleep: fails after 10 s).
pub fn wait_for_lines(path: &Path, n: usize) -> Vec<String> {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= n {
            return lines[..n].to_vec();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{}: expected {n} lines, have {lines:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A pseudo-terminal whose slave is the controlling terminal of the process spawned on it,
/// so that typed control characters become signals of its foreground process group, exactly
/// as at a user's terminal.
pub struct Terminal {
    master: std::fs::File,
    slave: PathBuf,
}

impl Terminal {
    /// Opens a new pseudo-terminal pair.
    pub fn open() -> Terminal {
        use std::os::fd::FromRawFd;
        // SAFETY: plain libc calls on a descriptor we own; ptsname_r writes into our buffer.
        unsafe {
            let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
            assert!(fd >= 0, "posix_openpt");
            assert_eq!(libc::grantpt(fd), 0);
            assert_eq!(libc::unlockpt(fd), 0);
            let mut buf = [0 as libc::c_char; 128];
            assert_eq!(libc::ptsname_r(fd, buf.as_mut_ptr(), buf.len()), 0);
            let slave = std::ffi::CStr::from_ptr(buf.as_ptr())
                .to_string_lossy()
                .into_owned();
            Terminal {
                master: std::fs::File::from_raw_fd(fd),
                slave: PathBuf::from(slave),
            }
        }
    }

    /// Spawns `cmd` as the leader of a new session whose controlling terminal (and stdin,
    /// stdout, stderr) is this terminal's slave.
    pub fn spawn(&self, cmd: &mut Command) -> Proc {
        use std::os::unix::process::CommandExt;
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.slave)
            .expect("open pts");
        cmd.stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave);
        // SAFETY: setsid and ioctl are async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Proc(Some(cmd.spawn().expect("spawn on the terminal")))
    }

    /// Types Ctrl-C: the line discipline sends SIGINT to the foreground process group.
    pub fn type_ctrl_c(&mut self) {
        self.type_char(0x03);
    }

    /// Types one character (0x1a, Ctrl-Z: SIGTSTP to the foreground process group).
    pub fn type_char(&mut self, c: u8) {
        use std::io::Write;
        self.master.write_all(&[c]).unwrap();
    }
}

/// The static (musl) binary: `CACHELOCK_STATIC_BIN`, else what `make static-dev` or `make
/// static` built.
pub fn static_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CACHELOCK_STATIC_BIN") {
        return PathBuf::from(p);
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/x86_64-unknown-linux-musl");
    ["debug", "release"]
        .iter()
        .map(|p| target.join(p).join("cachelock"))
        .filter(|p| p.exists())
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .unwrap_or_else(|| {
            panic!(
                "no static binary under {}: build it with `make static-dev` (make test does)",
                target.display()
            )
        })
}

/// A loopback TCP port for a server a test starts (etcd, a registry), never handed out twice:
/// taken below the kernel's ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`), where
/// the kernel never picks a port for another socket; reserved for the life of this process by
/// a lock file that other test processes respect; and checked free by binding it. (Binding
/// port 0 and closing it left the port to whoever came next, this same function included.)
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    use std::sync::Mutex;
    const FIRST: u16 = 20_000;
    const LAST: u16 = 32_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    static HELD: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("cachelock-test-ports");
    std::fs::create_dir_all(&dir).unwrap();
    // Processes start at different places, and each moves on from where it was.
    let _ = NEXT.compare_exchange(
        0,
        FIRST + (std::process::id() % 1000) as u16 * 10,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in FIRST..LAST {
        let mut port = NEXT.fetch_add(1, Ordering::SeqCst);
        if !(FIRST..LAST).contains(&port) {
            let _ = NEXT.compare_exchange(port + 1, FIRST + 1, Ordering::SeqCst, Ordering::SeqCst);
            port = FIRST;
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
            .unwrap();
        // SAFETY: flock(2) on a descriptor we own.
        if unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } != 0
        {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        HELD.lock().unwrap().push(f);
        return port;
    }
    panic!("no free port between {FIRST} and {LAST}");
}

/// Ports are never handed out twice (not even by two test processes), and never from the
/// range the kernel hands to other sockets.
#[test]
fn free_ports_are_never_handed_out_twice() {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let ephemeral: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
    let mine: Vec<u16> = (0..200).map(|_| free_port()).collect();
    let other = Command::new(std::env::current_exe().unwrap())
        .args(["support::util::tests_child_ports", "--exact", "--nocapture"])
        .env("CACHELOCK_PORTS_CHILD", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&other.stdout);
    let theirs: Vec<u16> = text
        .lines()
        .filter_map(|l| l.strip_prefix("port "))
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(theirs.len(), 200, "{text}");
    let mut all: Vec<u16> = mine.iter().chain(&theirs).copied().collect();
    assert!(all.iter().all(|p| *p < ephemeral), "{all:?}");
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 400, "a port handed out twice");
}

/// 200 ports, distinct; also the other test process of [`free_ports_are_never_handed_out_twice`]
/// (then it prints them).
#[test]
fn tests_child_ports() {
    let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
    let mut distinct = ports.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), ports.len());
    if std::env::var_os("CACHELOCK_PORTS_CHILD").is_some() {
        for p in ports {
            println!("port {p}");
        }
    }
}
