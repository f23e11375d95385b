//! Cached-root hygiene with the docker CLI, as Earthly's wrapper does it: before the command,
//! kill and prune leftovers, re-tag every image with a prefix and drop its other tags, load the
//! requested images, then remove the prefixed images the load did not bring back, and dangling
//! ones. The layers of what the build loads stay warm; everything else starts clean.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::earthly::{RegistryLoad, COMPOSE_ENV};
use crate::error::{Error, Kind, Result};
use crate::sys;

/// Registry pulls running at once.
pub const PARALLEL_PULLS: usize = 8;

/// The docker CLI pointed at one dockerd.
#[derive(Debug, Clone)]
pub struct Docker {
    /// The CLI binary.
    pub cli: PathBuf,
    /// `unix://...`.
    pub host: String,
}

/// What hygiene did, reported on stderr and used by tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Containers killed or removed, volumes and networks pruned (pre-command).
    pub containers_removed: usize,
    /// Image ids re-tagged with the prefix.
    pub retagged: usize,
    /// Prefixed images whose id the load brought back (kept).
    pub kept: usize,
    /// Prefixed images removed.
    pub removed: usize,
}

impl Docker {
    /// A `docker` command with `DOCKER_HOST` set.
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.cli);
        c.env("DOCKER_HOST", &self.host).stdin(Stdio::null());
        c
    }

    /// Runs `docker ARGS`, returning stdout; a failure says which call failed and why.
    pub fn run<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let shown = args
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        let out = self.command().args(&args).output().map_err(|e| {
            Error::new(
                Kind::Unavailable,
                format!(
                    "cannot run the docker CLI {}: {e}; install it or set `dockerd.docker_cli`",
                    self.cli.display()
                ),
            )
        })?;
        if !out.status.success() {
            return Err(Error::new(
                Kind::Unavailable,
                format!(
                    "`docker {shown}` failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn lines<I, S>(&self, args: I) -> Result<Vec<String>>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Ok(self
            .run(args)?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    /// `{image id → tags}` of every tagged image (`<none>` tags skipped).
    pub fn images(&self) -> Result<BTreeMap<String, BTreeSet<String>>> {
        let mut map: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for l in self.lines([
            "images",
            "--no-trunc",
            "--format",
            "{{.ID}} {{.Repository}}:{{.Tag}}",
        ])? {
            let Some((id, tag)) = l.split_once(' ') else {
                continue;
            };
            let e = map.entry(id.to_string()).or_default();
            if !tag.contains("<none>") {
                e.insert(tag.to_string());
            }
        }
        Ok(map)
    }

    /// The storage driver dockerd chose.
    pub fn storage_driver(&self) -> Result<String> {
        Ok(self
            .run(["info", "--format", "{{.Driver}}"])?
            .trim()
            .to_string())
    }

    /// Before the command on a cached root: kill and prune containers, volumes and networks;
    /// give every image the tag `<prefix><id>` and remove its other tags. Removals are
    /// `rmi --force` and a failed one is a warning, as in Earthly's wrapper since its issue
    /// #4267: a stale image must not fail the build.
    pub fn prepare_cached(&self, prefix: &str, summary: &mut Summary) -> Result<()> {
        let running = self.lines(["ps", "-q"])?;
        if !running.is_empty() {
            let mut args = vec!["kill".to_string()];
            args.extend(running.iter().cloned());
            let _ = self.run(&args);
        }
        summary.containers_removed = self.lines(["ps", "-aq"])?.len();
        self.run(["container", "prune", "-f"])?;
        self.run(["volume", "prune", "-f"])?;
        self.run(["network", "prune", "-f"])?;
        for (id, tags) in self.images()? {
            let short = id.trim_start_matches("sha256:");
            let short = &short[..short.len().min(12)];
            let cached = format!("{prefix}{short}");
            if !tags.contains(&format!("{cached}:latest")) {
                self.run(["tag", id.as_str(), cached.as_str()])?;
            }
            for t in tags.iter().filter(|t| !t.starts_with(prefix)) {
                self.rmi_tolerant(t);
            }
            summary.retagged += 1;
        }
        Ok(())
    }

    /// `docker rmi --force NAME`; a failure is reported as a warning only.
    fn rmi_tolerant(&self, name: &str) {
        if let Err(e) = self.run(["rmi", "--force", name]) {
            tracing::warn!("could not remove cached image {name} (continuing): {e}");
        }
    }

    /// Loads image tarballs (`docker load`, each opened here as [`open_loadable`] does and
    /// given as its standard input: a file swapped for a FIFO since the check blocks nothing).
    pub fn load_files(&self, files: &[PathBuf]) -> Result<()> {
        for f in files {
            let input = open_loadable(f)?;
            let out = self
                .command()
                .arg("load")
                .stdin(input)
                .output()
                .map_err(|e| {
                    Error::new(
                        Kind::Unavailable,
                        format!("cannot run the docker CLI {}: {e}", self.cli.display()),
                    )
                })?;
            if !out.status.success() {
                return Err(Error::new(
                    Kind::Unavailable,
                    format!(
                        "`docker load` of {} failed: {}",
                        f.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                ));
            }
            tracing::info!(
                "{}: {}",
                f.display(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(())
    }

    /// Earthly's embedded-registry loads: for each entry pull `<registry>/REF`, tag it with the
    /// user's tag and `rmi --force` the pulled name, all entries in parallel (at most
    /// [`PARALLEL_PULLS`] at a time). Any failure fails the whole load, naming every entry that
    /// failed.
    pub fn load_registry(&self, loads: &[RegistryLoad]) -> Result<()> {
        let mut failures = Vec::new();
        for chunk in loads.chunks(PARALLEL_PULLS) {
            let results: Vec<Result<()>> = std::thread::scope(|sc| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|l| {
                        sc.spawn(move || {
                            self.run(["pull", "-q", l.pull.as_str()])?;
                            self.run(["tag", l.pull.as_str(), l.tag.as_str()])?;
                            self.run(["rmi", "--force", l.pull.as_str()])?;
                            tracing::info!("pulled {} as {}", l.pull, l.tag);
                            Ok(())
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(Error::software("a pull thread panicked")))
                    })
                    .collect()
            });
            failures.extend(results.into_iter().filter_map(|r| r.err()));
        }
        if failures.is_empty() {
            return Ok(());
        }
        Err(Error::new(
            Kind::Unavailable,
            format!(
                "loading images from the registry failed ({} of {}): {}",
                failures.len(),
                loads.len(),
                failures
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        ))
    }

    /// After the loads on a cached root: images the load tagged again lose their prefix tag;
    /// prefixed images nobody re-tagged are removed, then dangling images.
    pub fn finish_cached(&self, prefix: &str, summary: &mut Summary) -> Result<()> {
        for (_, tags) in self.images()? {
            let (ours, others): (Vec<_>, Vec<_>) = tags.iter().partition(|t| t.starts_with(prefix));
            if !others.is_empty() {
                summary.kept += ours.len().min(1);
            } else {
                summary.removed += ours.len().min(1);
            }
            for t in ours {
                // Untagging an image that still has other tags keeps its layers; otherwise
                // this deletes it unless it is a parent of a kept one.
                self.rmi_tolerant(t);
            }
        }
        if let Err(e) = self.run(["image", "prune", "-f"]) {
            tracing::warn!("could not prune dangling images (continuing): {e}");
        }
        Ok(())
    }
}

/// Checks that every tarball can be read, before anything is started (exit 66).
pub fn check_loadable(files: &[PathBuf]) -> Result<()> {
    for f in files {
        open_loadable(f)?;
    }
    Ok(())
}

/// Opens image tarball `path` for reading, without blocking: anything but a regular file (a
/// FIFO, which would block the open until a writer came, a device, a directory) is refused
/// (exit 66) saying what it is.
pub fn open_loadable(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let bad = |why: String| {
        Error::new(
            Kind::NoInput,
            format!("cannot read image tarball {}: {why}", path.display()),
        )
    };
    let kind = |t: std::fs::FileType| {
        if t.is_file() {
            return Ok(());
        }
        let what = if t.is_fifo() {
            "a FIFO"
        } else if t.is_dir() {
            "a directory"
        } else if t.is_socket() {
            "a socket"
        } else {
            "a device"
        };
        Err(bad(format!(
            "it is {what}, not a regular file; save the image to a file (`docker save -o FILE`) and give that"
        )))
    };
    // Looked at before it is opened (a FIFO is never opened at all), then opened without
    // blocking and looked at again (it may have been swapped meanwhile).
    kind(
        std::fs::metadata(path)
            .map_err(|e| bad(e.to_string()))?
            .file_type(),
    )?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| bad(e.to_string()))?;
    kind(f.metadata().map_err(|e| bad(e.to_string()))?.file_type())?;
    sys::set_blocking(&f).map_err(|e| bad(e.to_string()))?;
    Ok(f)
}

/// How to run compose: `docker compose` (the plugin) or `docker-compose`.
#[derive(Debug, Clone)]
pub enum ComposeCli {
    /// `docker compose`.
    Plugin,
    /// A `docker-compose` binary.
    Standalone(PathBuf),
}

impl Docker {
    /// Finds a compose implementation as Earthly does: `docker-compose` first, then the
    /// `docker compose` plugin; none is an error naming both (69).
    pub fn compose_cli(&self) -> Result<ComposeCli> {
        if let Some(p) = super::daemon::find_binary(Path::new("docker-compose")) {
            return Ok(ComposeCli::Standalone(p));
        }
        let plugin = self
            .command()
            .args(["compose", "version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if plugin {
            return Ok(ComposeCli::Plugin);
        }
        Err(Error::new(
            Kind::Unavailable,
            "compose was requested but neither `docker-compose` nor `docker compose` is installed; install one (Debian: docker-compose)",
        ))
    }

    /// A compose command with `-f FILE...`, Earthly's compose environment and `DOCKER_HOST`.
    pub fn compose_command(&self, cli: &ComposeCli, files: &[String]) -> Command {
        let mut cmd = match cli {
            ComposeCli::Plugin => {
                let mut c = self.command();
                c.arg("compose");
                c
            }
            ComposeCli::Standalone(p) => {
                let mut c = Command::new(p);
                c.stdin(Stdio::null());
                if !self.host.is_empty() {
                    c.env("DOCKER_HOST", &self.host);
                }
                c
            }
        };
        cmd.envs(COMPOSE_ENV);
        for f in files {
            cmd.arg("-f").arg(f);
        }
        cmd
    }

    /// Runs compose with `-f FILE...` and `args`.
    pub fn compose(&self, cli: &ComposeCli, files: &[String], args: &[&str]) -> Result<()> {
        let status = self
            .compose_command(cli, files)
            .args(args)
            .status()
            .map_err(|e| Error::new(Kind::Unavailable, format!("cannot run compose: {e}")))?;
        if !status.success() {
            return Err(Error::new(
                Kind::Unavailable,
                format!("`compose {}` failed ({status})", args.join(" ")),
            ));
        }
        Ok(())
    }
}
