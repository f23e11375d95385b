//! Debian's `docker-registry` (Distribution 2.8) on free loopback ports, with its own storage:
//! plain HTTP (the Earthly drop-in's tests and the insecure-registry tests), or HTTPS with a
//! CA and certificate made by the openssl CLI (as the secure etcd member's) and `htpasswd`
//! basic auth (apache2-utils). Spawned through the etcd fixtures' long-lived spawner thread
//! with a parent-death signal, so registries end with the test binary; ready when the registry
//! logs that it listens (an event, not a poll of the port). A registry can be stopped and
//! started again on the same port and storage.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::etcd::{make_certs, spawn_kept, Tls};
use super::util::free_port;

/// User and password of the registries started with basic auth.
pub const USER: &str = "ci-bot";
/// Its password.
pub const PASSWORD: &str = "s3cret-registry-pw";

/// A running (or stopped) registry.
pub struct Registry {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// Its directory: config, storage (`data/`), log, certificates.
    pub dir: PathBuf,
    /// The CA that signed its certificate, when it serves HTTPS.
    pub tls: Option<Tls>,
    /// Whether it asks for `USER`/`PASSWORD`.
    pub auth: bool,
    child: Mutex<Option<Child>>,
}

impl Registry {
    /// Starts a registry: HTTPS when `tls`, basic auth when `auth`.
    pub fn start(tag: &str, tls: bool, auth: bool) -> Registry {
        let bin = Path::new("/usr/bin/docker-registry");
        assert!(
            bin.exists(),
            "/usr/bin/docker-registry is missing: install Debian's docker-registry (make setup)"
        );
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("registry-{tag}-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let tls = tls.then(|| make_certs(&dir));
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            dir.join("data").display()
        );
        if let Some(t) = &tls {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                t.cert.display(),
                t.key.display()
            ));
        }
        if auth {
            let out = Command::new("htpasswd")
                .args(["-Bbn", USER, PASSWORD])
                .output()
                .expect("cannot run htpasswd: install apache2-utils (make setup)");
            assert!(out.status.success(), "htpasswd failed");
            std::fs::write(dir.join("htpasswd"), &out.stdout).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: cachelock-test\n    path: {}\n",
                dir.join("htpasswd").display()
            ));
        }
        std::fs::write(dir.join("config.yml"), config).unwrap();
        let r = Registry {
            addr,
            dir,
            tls,
            auth,
            child: Mutex::new(None),
        };
        r.resume();
        r
    }

    /// Starts it (again): same port, same storage.
    pub fn resume(&self) {
        let log_path = self.dir.join("registry.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = Command::new("/usr/bin/docker-registry");
        cmd.arg("serve")
            .arg(self.dir.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        *self.child.lock().unwrap() = Some(spawn_kept(cmd));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if text.contains("listening on") {
                break;
            }
            let exited = self
                .child
                .lock()
                .unwrap()
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            assert!(
                !exited && Instant::now() < deadline,
                "docker-registry did not start on {}: {text}",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops it (SIGKILL, waited for): nothing answers on its port.
    pub fn stop(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A Docker `config.json` directory (for `DOCKER_CONFIG`) with this registry's credentials.
    pub fn docker_config(&self, dir: &Path) -> PathBuf {
        use base64::Engine as _;
        let d = dir.join("docker");
        std::fs::create_dir_all(&d).unwrap();
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
        let mut f = std::fs::File::create(d.join("config.json")).unwrap();
        write!(f, r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, self.addr).unwrap();
        d
    }

    /// `skopeo inspect --raw` of `repo:tag`: the manifest as an independent client reads it.
    pub fn skopeo_raw(&self, repo_tag: &str) -> serde_json::Value {
        let out = Command::new("skopeo")
            .args(["inspect", "--raw"])
            .args(self.skopeo_opts(""))
            .arg(format!("docker://{}/{repo_tag}", self.addr))
            .output()
            .expect("cannot run skopeo: install it (make setup)");
        assert!(
            out.status.success(),
            "skopeo inspect: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("a manifest")
    }

    /// The options `skopeo inspect|copy` needs for this registry (`--creds`, `--cert-dir` or
    /// `--tls-verify=false`), for a source (`src`) or destination (`dest`) or neither (`""`).
    pub fn skopeo_opts(&self, side: &str) -> Vec<String> {
        let pre = if side.is_empty() {
            String::new()
        } else {
            format!("{side}-")
        };
        let mut v = Vec::new();
        if self.auth {
            v.push(format!("--{pre}creds={USER}:{PASSWORD}"));
        }
        match &self.tls {
            Some(t) => {
                let certs = self.dir.join("skopeo-certs");
                std::fs::create_dir_all(&certs).unwrap();
                std::fs::copy(&t.ca, certs.join("ca.crt")).unwrap();
                v.push(format!("--{pre}cert-dir={}", certs.display()));
            }
            None => v.push(format!("--{pre}tls-verify=false")),
        }
        v
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}
