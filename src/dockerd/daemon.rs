//! One dockerd: start (with the policy's timeout and retry decisions), readiness over the unix
//! socket, and stop (SIGTERM, grace, SIGKILL of the whole tree, wait until every process is gone).

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::network::{self, Uplink};
use super::tree::{self, Marker};
use crate::error::{Error, Kind, Result};
use crate::policy::{Policy, RetryDecision, StartAttempt, StartFailure};
use crate::process::Signals;

/// Interval between `/_ping` probes (the issue asks for ≤ 50 ms).
pub const PING_INTERVAL: Duration = Duration::from_millis(20);

/// Everything needed to start one dockerd.
#[derive(Debug, Clone)]
pub struct Spec {
    /// dockerd binary (a name looked up on PATH, or a path).
    pub binary: PathBuf,
    /// Extra arguments from `dockerd.args`.
    pub extra_args: Vec<String>,
    /// `--data-root`.
    pub data_root: PathBuf,
    /// Per-instance directory (exec root, socket, pidfile, log, marker); short, see `run_dir`.
    pub inst_dir: PathBuf,
    /// The merged daemon.json.
    pub daemon_json: Value,
    /// Network isolation.
    pub network: network::Mode,
    /// Pool of uplink networks (netns mode).
    pub uplink_pool: (Ipv4Addr, u8),
    /// Descriptors dockerd inherits (the data root's lock).
    pub inherit: Vec<RawFd>,
    /// The lease holding the data root's lock (etcd): dockerd, and the command, then run
    /// under guardians that stop them when the lease is lost or cachelock dies.
    pub lease: Option<crate::lock::Lease>,
    /// Log lines passed to `on_start_failure` and shown on failure.
    pub log_tail_lines: usize,
    /// The cache id (for the policy).
    pub cache_id: Option<String>,
    /// Where dockerd's output goes (default `<inst_dir>/dockerd.log`); a shared path such as
    /// `/var/log/docker.log` only once claimed (see [`super::claim`]).
    pub log_file: Option<LogFile>,
    /// More unix sockets to listen on (the claimed `/var/run/docker.sock` of the drop-in).
    pub extra_sockets: Vec<PathBuf>,
}

/// A claimed log file: written through the descriptor the claim opened (without following a
/// link), never reopened by path.
#[derive(Debug, Clone)]
pub struct LogFile {
    /// Its path (for messages and reading it back).
    pub path: PathBuf,
    /// The open file.
    pub file: std::sync::Arc<std::fs::File>,
}

impl Spec {
    /// The unix socket dockerd listens on.
    pub fn socket(&self) -> PathBuf {
        self.inst_dir.join("docker.sock")
    }
    /// dockerd's log file.
    pub fn log(&self) -> PathBuf {
        self.log_file
            .as_ref()
            .map(|l| l.path.clone())
            .unwrap_or_else(|| self.inst_dir.join("dockerd.log"))
    }
    fn exec_root(&self) -> PathBuf {
        self.inst_dir.join("x")
    }
    fn pidfile(&self) -> PathBuf {
        self.inst_dir.join("dockerd.pid")
    }
    fn config_file(&self) -> PathBuf {
        self.inst_dir.join("daemon.json")
    }
}

/// A running, ready dockerd.
pub struct Daemon {
    child: Child,
    marker: Marker,
    uplink: Option<Uplink>,
    spec: Spec,
    /// How long the successful attempt took to answer `/_ping`.
    pub ready_after: Duration,
    /// Attempts made (1 when the first one succeeded).
    pub attempts: u32,
}

/// Sends `GET /_ping` over the socket; true when dockerd answers `OK`.
pub fn ping(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
    if s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.take(4096).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    text.starts_with("HTTP/1.") && text.contains(" 200 ") && text.ends_with("OK")
}

/// How much of dockerd's log a start failure shows (the whole log when it is smaller).
pub const LOG_EXCERPT_BYTES: u64 = 64 * 1024;

/// The end of a file, at most `max` bytes, starting at a line boundary when cut.
pub fn log_excerpt(path: &Path, max: u64) -> String {
    use std::io::{Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::with_capacity(len.min(max) as usize);
    let _ = f.take(max).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    match (start > 0, text.find('\n')) {
        (true, Some(i)) => text[i + 1..].to_string(),
        _ => text.into_owned(),
    }
}

/// The last `n` lines of a file (read from its last [`LOG_EXCERPT_BYTES`] only).
pub fn tail(path: &Path, n: usize) -> String {
    let text = log_excerpt(path, LOG_EXCERPT_BYTES);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Whether a program name resolves to an executable (on PATH for a bare name).
pub fn find_binary(binary: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let is_exec = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if binary.components().count() > 1 {
        return is_exec(binary).then(|| binary.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into(), "/sbin".into()])
        .map(|d| d.join(binary))
        .find(|p| is_exec(p))
}

/// How one start attempt ended.
enum Outcome {
    Ready(Box<Daemon>),
    Failed(StartFailure, Child, Marker, Option<Uplink>),
}

impl Daemon {
    /// Starts dockerd, asking `policy` for each attempt's timeout and what to do after a failure.
    /// A SIGINT/SIGTERM/SIGHUP seen on `signals` stops everything and returns `Kind::Signal`.
    pub fn start(spec: Spec, policy: &mut dyn Policy, signals: &Signals) -> Result<Daemon> {
        let Some(binary) = find_binary(&spec.binary) else {
            return Err(Error::new(
                Kind::Unavailable,
                format!(
                    "dockerd binary {:?} not found or not executable; install Docker (Debian: apt-get install docker.io) or set `dockerd.binary` in the configuration",
                    spec.binary.display().to_string()
                ),
            ));
        };
        let mut attempt = 1u32;
        loop {
            let info = StartAttempt {
                attempt,
                cache_id: spec.cache_id.clone(),
            };
            let timeout = policy.start_timeout_ms(&info)?;
            match Self::attempt(&spec, &binary, Duration::from_millis(timeout), signals)? {
                Outcome::Ready(mut d) => {
                    d.attempts = attempt;
                    return Ok(*d);
                }
                Outcome::Failed(failure, child, marker, uplink) => {
                    kill_tree(child, &marker, uplink);
                    let log_tail = tail(&spec.log(), spec.log_tail_lines);
                    match policy.on_start_failure(&info, &failure, &log_tail)? {
                        RetryDecision::RetryAfter(ms) => {
                            tracing::warn!(
                                "dockerd attempt {attempt} failed ({}); retrying in {ms} ms",
                                describe(&failure)
                            );
                            let until = Instant::now() + Duration::from_millis(ms);
                            while Instant::now() < until {
                                if let Some(sig) = signals.take_terminating() {
                                    return Err(Error::new(
                                        Kind::Signal(sig),
                                        "interrupted while waiting to restart dockerd",
                                    ));
                                }
                                let left = until.saturating_duration_since(Instant::now());
                                signals.wait(left.as_millis().min(100) as i32);
                            }
                            attempt += 1;
                        }
                        RetryDecision::GiveUp(reason) => {
                            let log = spec.log();
                            let whole = log_excerpt(&log, LOG_EXCERPT_BYTES);
                            return Err(Error::new(
                                Kind::Unavailable,
                                format!(
                                    "dockerd did not become ready ({}; attempt {attempt}): {reason}; its log is {}\n--- dockerd log {} (last {} KiB at most) ---\n{}\n--- end of dockerd log ---",
                                    describe(&failure),
                                    log.display(),
                                    log.display(),
                                    LOG_EXCERPT_BYTES / 1024,
                                    whole.trim_end()
                                ),
                            ));
                        }
                    }
                }
            }
        }
    }

    fn attempt(
        spec: &Spec,
        binary: &Path,
        timeout: Duration,
        signals: &Signals,
    ) -> Result<Outcome> {
        // A fresh instance directory per attempt: no stale pidfile or socket can block dockerd.
        let _ = super::root::wipe(&spec.inst_dir);
        std::fs::create_dir_all(spec.exec_root()).map_err(|e| {
            Error::cant_create(format!("cannot create {}: {e}", spec.inst_dir.display()))
        })?;
        std::fs::write(
            spec.config_file(),
            serde_json::to_vec_pretty(&spec.daemon_json).unwrap_or_default(),
        )
        .map_err(|e| Error::io(format!("writing {}", spec.config_file().display()), e))?;
        let log = match &spec.log_file {
            Some(l) => l.file.try_clone(),
            None => std::fs::File::create(spec.log()),
        }
        .map_err(|e| Error::io(format!("creating {}", spec.log().display()), e))?;
        let log2 = log.try_clone().map_err(|e| Error::io("dockerd log", e))?;
        let marker = Marker::create(&spec.inst_dir.join("tree"))
            .map_err(|e| Error::io("creating the process-tree marker", e))?;
        let containment = match &spec.lease {
            Some(l) => crate::lock::Containment::Lease(l.clone()),
            None => crate::lock::Containment::Inherit(spec.inherit.clone()),
        };
        let mut contained = crate::process::Contained::new(&containment, binary)?;
        contained.inherit(marker.fd());
        let cmd = contained.command();
        cmd.arg(format!("--config-file={}", spec.config_file().display()))
            .arg(format!("--data-root={}", spec.data_root.display()))
            .arg(format!("--exec-root={}", spec.exec_root().display()))
            .arg(format!("--pidfile={}", spec.pidfile().display()))
            .arg(format!("--host=unix://{}", spec.socket().display()))
            .args(
                spec.extra_sockets
                    .iter()
                    .map(|s| format!("--host=unix://{}", s.display())),
            )
            .args(spec.network.dockerd_args())
            .args(&spec.extra_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // Its own process group: a SIGINT typed at the terminal reaches cachelock (which stops
        // dockerd in order) but not dockerd directly.
        cmd.process_group(0);
        spec.network.prepare(cmd);
        let started = Instant::now();
        let child = contained
            .spawn(libc::SIGTERM)
            .map_err(|e| {
                Error::new(
                    Kind::Unavailable,
                    format!("cannot start dockerd {}: {e}", binary.display()),
                )
            })?
            .child;
        let mut uplink = None;
        if spec.network == network::Mode::Netns {
            match Uplink::setup(child.id(), spec.uplink_pool) {
                Ok(u) => uplink = Some(u),
                Err(e) => tracing::warn!(
                    "dockerd runs in its own network namespace without an uplink (containers and pulls cannot reach the outside): {e}"
                ),
            }
        }
        let mut child = child;
        loop {
            if let Some(sig) = signals.take_terminating() {
                kill_tree(child, &marker, uplink);
                return Err(Error::new(
                    Kind::Signal(sig),
                    "interrupted while dockerd was starting; it was stopped",
                ));
            }
            match child.try_wait() {
                Ok(Some(status)) => {
                    return Ok(Outcome::Failed(
                        StartFailure::Exited(status.code()),
                        child,
                        marker,
                        uplink,
                    ))
                }
                Ok(None) => {}
                Err(e) => return Err(Error::io("waiting for dockerd", e)),
            }
            if ping(&spec.socket()) {
                return Ok(Outcome::Ready(Box::new(Daemon {
                    child,
                    marker,
                    uplink,
                    spec: spec.clone(),
                    ready_after: started.elapsed(),
                    attempts: 1,
                })));
            }
            if started.elapsed() >= timeout {
                return Ok(Outcome::Failed(
                    StartFailure::TimedOut(started.elapsed().as_millis() as u64),
                    child,
                    marker,
                    uplink,
                ));
            }
            std::thread::sleep(PING_INTERVAL);
        }
    }

    /// `unix://<socket>`, for `DOCKER_HOST`.
    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.spec.socket().display())
    }

    /// dockerd's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// dockerd's log file.
    pub fn log(&self) -> PathBuf {
        self.spec.log()
    }

    /// Processes of this instance (dockerd, containerd, shims), found by the marker.
    pub fn processes(&self) -> Vec<i32> {
        self.marker.holders()
    }

    /// Stops dockerd: SIGTERM, up to `grace` for the whole tree to exit, then SIGKILL to every
    /// process of the instance and their children (containers); returns once all are gone, the
    /// uplink is removed and no mount of the instance is left. Returns whether SIGKILL was needed.
    pub fn stop(mut self, grace: Duration) -> bool {
        let _ = crate::sys::kill(self.child.id() as i32, libc::SIGTERM);
        let deadline = Instant::now() + grace;
        let mut clean = false;
        while Instant::now() < deadline {
            let _ = self.child.try_wait();
            if self.marker.holders().is_empty() {
                clean = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !clean {
            tracing::warn!(
                "dockerd did not stop within {:.1}s of SIGTERM; killing it and its processes",
                grace.as_secs_f64()
            );
        }
        let Daemon {
            child,
            marker,
            uplink,
            spec,
            ..
        } = self;
        kill_tree(child, &marker, uplink);
        super::root::unmount_under(&spec.exec_root());
        super::root::unmount_under(&spec.data_root);
        !clean
    }

    /// The instance directory (removed by the caller once the log is no longer needed).
    pub fn inst_dir(&self) -> &Path {
        &self.spec.inst_dir
    }
}

/// SIGKILLs every process of an instance and the children of each (container processes
/// re-parented away from their shim would otherwise survive), reaps dockerd, removes the uplink.
fn kill_tree(mut child: Child, marker: &Marker, uplink: Option<Uplink>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let child_done = child.try_wait().map(|s| s.is_some()).unwrap_or(true);
        let mut pids = marker.holders();
        pids.extend(tree::children_of(&pids));
        if pids.is_empty() && child_done {
            break;
        }
        if !child_done {
            pids.push(child.id() as i32);
        }
        if Instant::now() >= deadline {
            tracing::warn!("processes {pids:?} of dockerd survived SIGKILL for 10 s");
            break;
        }
        tree::signal_all(&pids, libc::SIGKILL);
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.try_wait();
    drop(uplink);
}

fn describe(f: &StartFailure) -> String {
    match f {
        StartFailure::TimedOut(ms) => format!("no answer to /_ping within {} ms", ms),
        StartFailure::Exited(Some(c)) => format!("dockerd exited with code {c}"),
        StartFailure::Exited(None) => "dockerd was killed by a signal".to_string(),
    }
}
