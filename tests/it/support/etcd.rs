//! Real etcd clusters for the etcd backend's tests: Debian's `etcd` 3.4 members on loopback
//! ports chosen free, with their own data directories (in `/dev/shm` when it exists), started
//! once per test binary and shared. Members are spawned by one long-lived thread with a
//! parent-death signal, so they die with the test binary; data directories of dead test
//! binaries are removed at the next start.
//!
//! - [`shared`]: a 3-member cluster for tests that do not disturb it (each test uses its own
//!   key prefix);
//! - [`disruptive`]: a second 3-member cluster, one test at a time (the guard is a mutex), for
//!   tests that kill, freeze or restart members; it is healthy again when the guard is taken;
//! - [`secure`]: one member with TLS (self-signed CA and certificates made with the openssl
//!   CLI, client certificates required) and authentication (user `root`, password below).
//!
//! A missing `etcd`, `etcdctl` or `openssl` fails the test (`make setup` installs them).
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use super::util::{bin, free_port, Env};

/// Password of `root` on the [`secure`] cluster.
pub const ROOT_PASSWORD: &str = "cachelock-test-pw";

/// One member.
pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    args: Vec<String>,
    child: Mutex<Option<Child>>,
}

/// TLS material of the secure cluster.
#[derive(Debug, Clone)]
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A running cluster.
pub struct Cluster {
    pub members: Vec<Member>,
    pub dir: PathBuf,
    pub tls: Option<Tls>,
}

/// A cluster of one test (the shared ones are never dropped) ends with it: members killed,
/// data removed.
impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A request to the spawner thread: the command, and where to send the child.
type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static S: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    S.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        // Parent-death signals fire when the spawning *thread* ends: this one never does.
        std::thread::spawn(move || {
            for (mut cmd, reply) in rx {
                let _ = reply.send(cmd.spawn());
            }
            loop {
                std::thread::park();
            }
        });
        Mutex::new(tx)
    })
}

/// Spawns `cmd` from the long-lived spawner thread with a parent-death signal: it dies with
/// the test binary.
pub fn spawn_kept(mut cmd: Command) -> Child {
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            );
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    spawner().lock().unwrap().send((cmd, tx)).unwrap();
    rx.recv()
        .unwrap()
        .expect("cannot start a test service (etcd, docker-registry): make setup installs them")
}

fn base_dir() -> PathBuf {
    let root = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    // Leftovers of test binaries that died.
    if let Ok(rd) = std::fs::read_dir(&root) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if let Some(pid) = n
                .strip_prefix("cachelock-etcd-")
                .and_then(|p| p.split('-').next())
                .and_then(|p| p.parse::<i32>().ok())
            {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    root
}

impl Cluster {
    /// Starts `n` members (TLS and authentication when `secure`) and waits until healthy.
    pub fn start(tag: &str, n: usize, secure: bool) -> Cluster {
        let dir = base_dir().join(format!("cachelock-etcd-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let tls = secure.then(|| make_certs(&dir));
        let scheme = if secure { "https" } else { "http" };
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("{tag}{i}={scheme}://127.0.0.1:{p}"))
            .collect();
        let mut members = Vec::new();
        for (i, (cp, pp)) in ports.iter().enumerate() {
            let name = format!("{tag}{i}");
            let mut args = vec![
                format!("--name={name}"),
                format!("--data-dir={}", dir.join(&name).display()),
                format!("--listen-client-urls={scheme}://127.0.0.1:{cp}"),
                format!("--advertise-client-urls={scheme}://127.0.0.1:{cp}"),
                format!("--listen-peer-urls={scheme}://127.0.0.1:{pp}"),
                format!("--initial-advertise-peer-urls={scheme}://127.0.0.1:{pp}"),
                format!("--initial-cluster={}", initial.join(",")),
                "--initial-cluster-state=new".into(),
                format!(
                    "--initial-cluster-token=cachelock-{}-{tag}",
                    std::process::id()
                ),
                "--heartbeat-interval=50".into(),
                "--election-timeout=500".into(),
                "--logger=zap".into(),
                "--log-outputs=stderr".into(),
            ];
            if let Some(t) = &tls {
                args.extend([
                    format!("--cert-file={}", t.cert.display()),
                    format!("--key-file={}", t.key.display()),
                    format!("--trusted-ca-file={}", t.ca.display()),
                    "--client-cert-auth".into(),
                    format!("--peer-cert-file={}", t.cert.display()),
                    format!("--peer-key-file={}", t.key.display()),
                    format!("--peer-trusted-ca-file={}", t.ca.display()),
                ]);
            }
            members.push(Member {
                name,
                client_port: *cp,
                peer_port: *pp,
                args,
                child: Mutex::new(None),
            });
        }
        let c = Cluster { members, dir, tls };
        for i in 0..n {
            c.start_member(i);
        }
        c.wait_healthy();
        if secure {
            let ok = |out: Output| {
                assert!(
                    out.status.success(),
                    "etcdctl: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            };
            ok(c.etcdctl(&["user", "add", &format!("root:{ROOT_PASSWORD}")]));
            ok(c.etcdctl(&["auth", "enable"]));
        }
        c
    }

    fn start_member(&self, i: usize) {
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", m.name)))
            .unwrap();
        let mut cmd = Command::new("etcd");
        cmd.args(&m.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // The package's own settings must not leak in.
        for (k, _) in std::env::vars() {
            if k.starts_with("ETCD") {
                cmd.env_remove(k);
            }
        }
        *m.child.lock().unwrap() = Some(spawn_kept(cmd));
    }

    /// gRPC messages the members received (each unary call, and each message on a watch or
    /// keep-alive stream), of `method` (e.g. `Range`) or of all, summed over every member's own
    /// `/metrics`.
    pub fn grpc_received(&self, method: Option<&str>) -> f64 {
        use std::io::{Read, Write};
        assert!(self.tls.is_none(), "metrics of a plain cluster only");
        let filter = method.map(|m| format!("grpc_method=\"{m}\""));
        let mut total = 0.0;
        for m in &self.members {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", m.client_port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).unwrap();
            total += body
                .lines()
                .filter(|l| l.starts_with("grpc_server_msg_received_total{"))
                .filter(|l| filter.as_ref().is_none_or(|f| l.contains(f.as_str())))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
        }
        total
    }

    /// `HOST:PORT,...` of the members, in order.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `HOST:PORT,...` starting with member `first`.
    pub fn endpoints_from(&self, first: usize) -> String {
        let n = self.members.len();
        (0..n)
            .map(|k| format!("127.0.0.1:{}", self.members[(first + k) % n].client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `etcd://...` with key prefix `prefix`.
    pub fn url(&self, prefix: &str) -> String {
        format!("etcd://{}/{prefix}", self.endpoints())
    }

    /// `etcdctl ARGS` against the whole cluster (TLS and root credentials when secure).
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints()))
            .arg("--dial-timeout=1s")
            .arg("--command-timeout=2s");
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cacert={}", t.ca.display()))
                .arg(format!("--cert={}", t.cert.display()))
                .arg(format!("--key={}", t.key.display()));
        }
        let out = cmd
            .args(args)
            .output()
            .expect("cannot run etcdctl: install Debian's etcd-client (make setup)");
        out
    }

    /// Waits until every running member answers and agrees on a leader (fails after 30 s).
    pub fn wait_healthy(&self) {
        let t0 = Instant::now();
        loop {
            let out = self.etcdctl(&["endpoint", "status", "-w", "json"]);
            let running = self
                .members
                .iter()
                .filter(|m| m.child.lock().unwrap().is_some())
                .count();
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                let arr = v.as_array().cloned().unwrap_or_default();
                let leaders: Vec<u64> = arr
                    .iter()
                    .filter_map(|s| s["Status"]["leader"].as_u64())
                    .collect();
                if arr.len() == running
                    && !leaders.is_empty()
                    && leaders.iter().all(|l| *l == leaders[0] && *l != 0)
                {
                    return;
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "etcd cluster in {} not healthy after 30 s: {}{}",
                self.dir.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Index of the current leader.
    pub fn leader(&self) -> usize {
        let out = self.etcdctl(&["endpoint", "status", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
        for s in v.as_array().unwrap() {
            let (id, leader) = (
                s["Status"]["header"]["member_id"].as_u64(),
                s["Status"]["leader"].as_u64(),
            );
            if id.is_some() && id == leader {
                let ep = s["Endpoint"].as_str().unwrap();
                return self
                    .members
                    .iter()
                    .position(|m| ep.ends_with(&format!(":{}", m.client_port)))
                    .unwrap();
            }
        }
        panic!("no leader in {v}");
    }

    /// SIGKILLs member `i` and reaps it.
    pub fn kill(&self, i: usize) {
        if let Some(mut c) = self.members[i].child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data directory.
    pub fn restart(&self, i: usize) {
        self.kill(i);
        self.start_member(i);
    }

    /// Sends `sig` to member `i` (SIGSTOP / SIGCONT).
    pub fn signal(&self, i: usize, sig: i32) {
        if let Some(c) = self.members[i].child.lock().unwrap().as_ref() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// Makes every member run again (restarted if killed, continued if stopped) and healthy.
    pub fn repair(&self) {
        for i in 0..self.members.len() {
            self.signal(i, libc::SIGCONT);
            if self.members[i].child.lock().unwrap().is_none() {
                self.start_member(i);
            }
        }
        self.wait_healthy();
    }
}

/// A CA and a certificate it signed for 127.0.0.1 and localhost (server and client use),
/// made with the openssl CLI in `dir`.
pub fn make_certs(dir: &Path) -> Tls {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("cannot run openssl (make setup installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=cachelock test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    run(&[
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=root", "-keyout", "node.key", "-out",
        "node.csr",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "node.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "node.pem",
    ]);
    Tls {
        ca: dir.join("ca.pem"),
        cert: dir.join("node.pem"),
        key: dir.join("node.key"),
    }
}

/// The shared 3-member cluster.
pub fn shared() -> &'static Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    C.get_or_init(|| Cluster::start("s", 3, false))
}

/// The 3-member cluster that tests may disturb, one test at a time; healthy when returned.
pub fn disruptive() -> MutexGuard<'static, Cluster> {
    static C: OnceLock<Mutex<Cluster>> = OnceLock::new();
    let g = C
        .get_or_init(|| Mutex::new(Cluster::start("d", 3, false)))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    g.repair();
    g
}

/// The TLS + authentication cluster (one member).
pub fn secure() -> &'static Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    C.get_or_init(|| Cluster::start("t", 1, true))
}

/// Settings every etcd test uses: a short lease (dead requests vanish quickly) and short
/// deadlines (failover within a second).
pub const TEST_CONFIG: &str =
    "etcd:\n  lease_ttl: 4\n  request_timeout: 0.5\n  unavailable_timeout: 8\n";

/// A private environment whose `cachelock` commands use `url` as their store.
pub struct EtcdEnv {
    pub env: Env,
    pub url: String,
}

impl EtcdEnv {
    /// On `cluster`, under a key prefix unique to this test.
    pub fn new(cluster: &Cluster, test: &str) -> EtcdEnv {
        Self::with_config(cluster, test, TEST_CONFIG)
    }

    /// With `yaml` as the configuration.
    pub fn with_config(cluster: &Cluster, test: &str, yaml: &str) -> EtcdEnv {
        let env = Env::with_config(yaml);
        let prefix = format!("t{}-{}-{test}", std::process::id(), unique());
        EtcdEnv {
            url: cluster.url(&prefix),
            env,
        }
    }

    /// `cachelock` with this store.
    pub fn cmd(&self) -> Command {
        let mut c = self.env.cmd();
        c.env("CACHELOCK_BACKEND", &self.url);
        for k in [
            "ETCDCTL_CACERT",
            "ETCDCTL_CERT",
            "ETCDCTL_KEY",
            "ETCDCTL_USER",
            "ETCDCTL_PASSWORD",
        ] {
            c.env_remove(k);
        }
        c
    }

    /// `cachelock run ARGS...` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().arg("run").args(args).output().expect("run")
    }

    /// Spawns `cachelock ARGS...` in its own process group, killed on drop.
    pub fn spawn(&self, args: &[&str]) -> super::util::Proc {
        let child = self
            .cmd()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("spawn");
        super::util::Proc(Some(child))
    }

    /// `cachelock status --json [LOCK]`.
    pub fn status_json(&self, lock: Option<&str>) -> serde_json::Value {
        let mut c = self.cmd();
        c.args(["status", "--json"]);
        if let Some(l) = lock {
            c.arg(l);
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// Holders + waiters of `lock`, as status shows them.
    pub fn tickets(&self, lock: &str) -> usize {
        let st = self.status_json(Some(lock));
        let l = &st["locks"][0];
        l["holders"].as_array().map_or(0, Vec::len) + l["waiters"].as_array().map_or(0, Vec::len)
    }

    /// Waits until `lock` has `n` tickets (fails after 20 s).
    pub fn wait_tickets(&self, lock: &str, n: usize) {
        let t0 = Instant::now();
        loop {
            let have = self.tickets(lock);
            if have == n {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "lock {lock}: expected {n} tickets, have {have}: {}",
                self.status_json(Some(lock))
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A critical section that appends `TAG START END GENERATION` to `log` (start and end from
    /// bash's `$EPOCHREALTIME`), holding for `hold_s` seconds.
    pub fn section(&self, log: &Path, tag: &str, hold_s: f64) -> Vec<String> {
        vec![
            "bash".into(),
            "-c".into(),
            r#"s=$EPOCHREALTIME; read -t "$3" <> "$4"; e=$EPOCHREALTIME; echo "$2 $s $e $CACHELOCK_GENERATION" >> "$1""#
                .into(),
            "_".into(),
            log.display().to_string(),
            tag.into(),
            format!("{hold_s}"),
            self.env.path("fifo").display().to_string(),
        ]
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

/// One logged section with its generation.
#[derive(Debug, Clone)]
pub struct GenSection {
    pub tag: String,
    pub start: f64,
    pub end: f64,
    pub generation: u64,
}

/// Reads a `TAG START END GENERATION` log, sorted by start.
pub fn read_gen_log(log: &Path) -> Vec<GenSection> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut v: Vec<GenSection> = text
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some(GenSection {
                tag: it.next()?.to_string(),
                start: it.next()?.parse().ok()?,
                end: it.next()?.parse().ok()?,
                generation: it.next()?.parse().ok()?,
            })
        })
        .collect();
    v.sort_by(|a, b| a.start.partial_cmp(&b.start).unwrap());
    v
}

/// The independent checks of an exclusive lock's log: no two sections overlap in time, and
/// generations are unique and increase in the order the sections started.
pub fn check_exclusive(v: &[GenSection]) {
    for w in v.windows(2) {
        assert!(w[1].start >= w[0].end, "overlap: {:?} and {:?}", w[0], w[1]);
        assert!(
            w[1].generation > w[0].generation,
            "generations do not increase: {:?} then {:?}",
            w[0],
            w[1]
        );
    }
}

/// `cachelock` (for tests that build their own command).
pub fn cachelock() -> &'static str {
    bin()
}
