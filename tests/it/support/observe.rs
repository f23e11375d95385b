//! Real parts for the observability tests: a running `cachelock serve` ([`Serve`]), a real
//! Prometheus server scraping it and answering queries through its HTTP API ([`Prometheus`],
//! Debian's `prometheus`), `promtool check metrics`, a plain HTTP client on a TCP socket, holders
//! that hold until the test lets them go ([`Holder`]), and the workload of known shape whose
//! counts the tests check on every store ([`workload`]).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::users::wait_until;
use super::util::free_port;
use super::util::{wait_for_lines, Proc};

/// A response: status, head (lower-cased header names) and body.
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// Sends `request` (a whole HTTP/1.1 request) to `addr` and reads the response to the end.
pub fn raw(addr: SocketAddr, request: &[u8]) -> Response {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request).unwrap();
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status");
    Response {
        status,
        head,
        body: all[split + 4..].to_vec(),
    }
}

/// `GET path` with `headers`.
pub fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Response {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    raw(addr, req.as_bytes())
}

/// Percent-encodes a query parameter.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of sample `name{labels}` in a text exposition (labels written as in the
/// exposition, e.g. `lock="a",outcome="acquired"`).
pub fn sample(exposition: &str, name: &str, labels: &str) -> Option<f64> {
    let want = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{labels}}} ")
    };
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(&want))
        .and_then(|v| v.trim().parse().ok())
}

/// A running `cachelock serve`, killed on drop.
pub struct Serve {
    pub addr: SocketAddr,
    pub proc: Proc,
    pub log: PathBuf,
}

impl Serve {
    /// Starts `cmd serve --listen 127.0.0.1:PORT` (the store is `cmd`'s) and waits until it
    /// answers; `log` gets its stderr.
    pub fn start(mut cmd: Command, log: &Path) -> Serve {
        use std::os::unix::process::CommandExt;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = cmd
            .args(["serve", "--listen", &addr.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .process_group(0)
            .spawn()
            .expect("spawn serve");
        let serve = Serve {
            addr,
            proc: Proc(Some(child)),
            log: log.to_path_buf(),
        };
        wait_until("serve answers", || {
            TcpStream::connect(addr).is_ok_and(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = s
                    .write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes());
                let mut b = [0u8; 12];
                s.read_exact(&mut b).is_ok() && b.starts_with(b"HTTP/1.1 200")
            })
        });
        serve
    }

    /// `/metrics` in the text format.
    pub fn metrics(&self) -> String {
        let r = get(self.addr, "/metrics", &[]);
        assert_eq!(r.status, 200);
        r.text()
    }

    /// Waits until sample `name{labels}` is `want` in `/metrics`.
    pub fn wait_sample(&self, name: &str, labels: &str, want: f64) {
        let t0 = Instant::now();
        loop {
            let m = self.metrics();
            if sample(&m, name, labels) == Some(want) {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "{name}{{{labels}}} is {:?}, not {want}:\n{m}",
                sample(&m, name, labels)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What serve logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A real Prometheus scraping `target` every second, killed on drop.
pub struct Prometheus {
    pub addr: SocketAddr,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts it and waits until it is ready.
    pub fn start(target: SocketAddr) -> Prometheus {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: cachelock\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
            .process_group(0)
            .spawn()
            .expect("cannot start prometheus: install Debian's prometheus (make setup)");
        let p = Prometheus {
            addr,
            _proc: Proc(Some(child)),
            _dir: dir,
        };
        wait_until("prometheus is ready", || {
            TcpStream::connect(addr).is_ok() && get(addr, "/-/ready", &[]).status == 200
        });
        p
    }

    /// An instant query's result: each series' labels and value.
    pub fn query(&self, q: &str) -> Vec<(serde_json::Value, f64)> {
        let r = get(
            self.addr,
            &format!("/api/v1/query?query={}", encode(q)),
            &[],
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        v["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["metric"].clone(),
                    s["value"][1].as_str().unwrap().parse().unwrap(),
                )
            })
            .collect()
    }

    /// Waits until query `q` has one series of value `want` (after the next scrapes).
    pub fn wait_value(&self, q: &str, want: f64) {
        let t0 = Instant::now();
        loop {
            let got = self.query(q);
            if got.len() == 1 && got[0].1 == want {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "prometheus: {q} is {got:?}, not {want}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The scrape target's health and last error, as Prometheus reports them.
    pub fn target(&self) -> (String, String) {
        let r = get(self.addr, "/api/v1/targets", &[]);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let t = &v["data"]["activeTargets"][0];
        (
            t["health"].as_str().unwrap_or("").to_string(),
            t["lastError"].as_str().unwrap_or("").to_string(),
        )
    }
}

/// `promtool check metrics` on `exposition`: its exit status and what it said.
pub fn promtool_check(exposition: &str) -> (bool, String) {
    let mut c = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run promtool: install Debian's prometheus (make setup)");
    c.stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = c.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A request holding a lock until the test lets it go.
pub struct Holder {
    pub proc: Proc,
    fifo: PathBuf,
}

impl Holder {
    /// `cmd run -q ARGS LOCK -- ...` holding until [`Holder::release`]; returns once it holds.
    pub fn start(mut cmd: Command, scratch: &Path, lock: &str, args: &[&str]) -> Holder {
        use std::os::unix::process::CommandExt;
        let n = std::fs::read_dir(scratch).map(|r| r.count()).unwrap_or(0);
        let fifo = scratch.join(format!("hold-{lock}-{n}"));
        let ready = scratch.join(format!("hold-{lock}-{n}.ready"));
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let child = cmd
            .args(["run", "-q"])
            .args(args)
            .args([
                lock,
                "--",
                "sh",
                "-c",
                r#"echo held > "$1"; exec cat "$2" > /dev/null"#,
                "_",
            ])
            .arg(&ready)
            .arg(&fifo)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("spawn a holder");
        wait_for_lines(&ready, 1);
        Holder {
            proc: Proc(Some(child)),
            fifo,
        }
    }

    /// Lets the command end (its FIFO reaches end-of-file) and waits for cachelock's exit.
    pub fn release(mut self) {
        drop(
            std::fs::OpenOptions::new()
                .write(true)
                .open(&self.fifo)
                .unwrap(),
        );
        assert_eq!(self.proc.wait(), 0, "{}", self.proc.stderr());
    }
}

/// The locks of [`workload`] under `prefix`: (uncontended, conflicts, queue).
pub fn workload_locks(prefix: &str) -> [String; 3] {
    [
        format!("{prefix}-solo"),
        format!("{prefix}-busy"),
        format!("{prefix}-queue"),
    ]
}

/// The workload of known shape, through `cmd()` (the binary with its store): 10 uncontended
/// runs of `solo`; `busy` held while 3 `-n` requests conflict and 2 `-w 0.2` time out; `queue`
/// held while 4 waiters queue behind it, then released so each runs in turn. `queued` is
/// called while the 4 wait.
pub fn workload(cmd: &dyn Fn() -> Command, scratch: &Path, prefix: &str, queued: &mut dyn FnMut()) {
    let [solo, busy, queue] = workload_locks(prefix);
    for _ in 0..10 {
        let o = cmd()
            .args(["run", "-q", &solo, "--", "true"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let h = Holder::start(cmd(), scratch, &busy, &[]);
    for args in [
        ["-n", ""],
        ["-n", ""],
        ["-n", ""],
        ["-w", "0.2"],
        ["-w", "0.2"],
    ] {
        let mut c = cmd();
        c.args(["run", "-q"]).arg(args[0]);
        if !args[1].is_empty() {
            c.arg(args[1]);
        }
        let o = c.args([&busy, "--", "true"]).output().unwrap();
        assert_eq!(
            o.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    h.release();
    let h = Holder::start(cmd(), scratch, &queue, &[]);
    let mut waiters: Vec<Proc> = (0..4)
        .map(|_| {
            use std::os::unix::process::CommandExt;
            Proc(Some(
                cmd()
                    .args(["run", "-q", &queue, "--", "true"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .process_group(0)
                    .spawn()
                    .unwrap(),
            ))
        })
        .collect();
    wait_until("4 waiters queue", || {
        let o = cmd().args(["status", "--json", &queue]).output().unwrap();
        serde_json::from_slice::<serde_json::Value>(&o.stdout).is_ok_and(|v| {
            v["locks"][0]["waiters"]
                .as_array()
                .is_some_and(|w| w.len() == 4)
        })
    });
    queued();
    h.release();
    for w in &mut waiters {
        assert_eq!(w.wait(), 0, "{}", w.stderr());
    }
}

/// Checks the counts of [`workload`] in a text exposition.
pub fn check_workload_counts(m: &str, prefix: &str) {
    let [solo, busy, queue] = workload_locks(prefix);
    let want = [
        (&solo, "acquired", 10.0),
        (&solo, "conflict", 0.0),
        (&busy, "acquired", 1.0),
        (&busy, "conflict", 3.0),
        (&busy, "timeout", 2.0),
        (&busy, "gave_up", 0.0),
        (&queue, "acquired", 5.0),
        (&queue, "interrupted", 0.0),
        (&queue, "lost", 0.0),
        (&queue, "error", 0.0),
    ];
    for (lock, outcome, n) in want {
        assert_eq!(
            sample(
                m,
                "cachelock_requests_total",
                &format!("lock=\"{lock}\",outcome=\"{outcome}\"")
            ),
            Some(n),
            "requests of {lock} that ended {outcome}:\n{m}"
        );
    }
    for (lock, acquisitions) in [(&solo, 10.0), (&busy, 1.0), (&queue, 5.0)] {
        let l = format!("lock=\"{lock}\"");
        assert_eq!(
            sample(m, "cachelock_wait_seconds_count", &l),
            Some(acquisitions),
            "{m}"
        );
        assert_eq!(
            sample(m, "cachelock_hold_seconds_count", &l),
            Some(acquisitions),
            "{m}"
        );
        let le = format!("lock=\"{lock}\",le=\"+Inf\"");
        assert_eq!(
            sample(m, "cachelock_wait_seconds_bucket", &le),
            Some(acquisitions),
            "{m}"
        );
    }
    // The uncontended runs waited at most a second each.
    assert_eq!(
        sample(
            m,
            "cachelock_wait_seconds_bucket",
            &format!("lock=\"{solo}\",le=\"1.0\"")
        ),
        Some(10.0),
        "{m}"
    );
}
