//! The command line: clap definitions only. Flags become validated options in
//! `request.rs`; nothing in the library sees these types.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use cachelock::config::WaitMode;
use cachelock::error::code;

/// Fair, priority-aware locks for shared build caches, with policies in WebAssembly.
#[derive(Debug, Parser)]
#[command(name = "cachelock", version, about, max_term_width = 100)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace). CACHELOCK_LOG takes a tracing filter instead.
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// The sub-command.
    #[command(subcommand)]
    pub command: Command,
}

/// Sub-commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Take a lock, run a command, release the lock; exit with the command's code.
    Run(RunArgs),
    /// Show holders and waiters of every lock (or of one), in the order they will be served.
    Status(StatusArgs),
    /// Serve a live dashboard, Prometheus metrics and the status as JSON, read-only.
    Serve(ServeArgs),
    /// Check, simulate, list and scaffold policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Run a command beside its own dockerd, on a (locked, cached) data root.
    Dockerd(DockerdArgs),
    /// List the cached data roots of dockerd runs, or remove one nobody holds.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Earthly's dockerd-wrapper.sh contract (`execute CMD...`, `get-compose-config`).
    Earthly(EarthlyArgs),
    /// Check this host and say what to fix, one line each; exit 1 when a request would fail
    /// or be unsafe (warnings, which only cost time, exit 0). Changes nothing.
    Doctor(DoctorArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `cachelock man > /usr/local/share/man/man1/cachelock.1`.
    Man,
}

/// Options shared by everything that takes a lock (`run`, `dockerd`).
#[derive(Debug, Clone, Args)]
pub struct LockArgs {
    /// Exclusive lock (the default).
    #[arg(short = 'x', long = "exclusive", conflicts_with = "shared")]
    pub exclusive: bool,
    /// Shared lock: any number of shared holders, never beside an exclusive one.
    #[arg(short = 's', long = "shared")]
    pub shared: bool,
    /// Fail at once if the lock cannot be taken now (same as -w 0).
    #[arg(short = 'n', long = "nonblock", conflicts_with = "wait")]
    pub nonblock: bool,
    /// Give up after this many seconds (fractional).
    #[arg(short = 'w', long = "wait", alias = "timeout", value_name = "SECONDS", value_parser = parse_seconds)]
    pub wait: Option<f64>,
    /// Exit code when the lock is not taken (conflict, timeout, policy give-up).
    #[arg(short = 'E', long = "conflict-exit-code", value_name = "N", default_value_t = code::CONFLICT_DEFAULT, value_parser = clap::value_parser!(i32).range(0..=255))]
    pub conflict_exit_code: i32,
    /// Priority of this request (higher goes first under the default policy).
    #[arg(
        short = 'p',
        long = "priority",
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub priority: i32,
    /// A label KEY=VALUE for policies and status (repeatable).
    #[arg(short = 'l', long = "label", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub labels: Vec<(String, String)>,
    /// Names the job behind this request: a retry with the same key keeps its place in the queue.
    #[arg(short = 'k', long = "queue-key", value_name = "KEY")]
    pub queue_key: Option<String>,
    /// How to wait: notify (inotify), poll, or auto (poll on network filesystems).
    #[arg(long = "wait-mode", value_name = "auto|notify|poll", value_parser = parse_wait_mode)]
    pub wait_mode: Option<WaitMode>,
    /// No progress lines while waiting.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Use this policy (a configured name, builtin:NAME or FILE.wasm) for this invocation.
    #[arg(long = "policy", value_name = "NAME|FILE.wasm")]
    pub policy: Option<String>,
    /// A KEY=VALUE passed to the policy's configure (repeatable; overrides the policy file's).
    #[arg(long = "policy-config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub policy_config: Vec<(String, String)>,
    /// Lock directory.
    #[arg(long = "lock-dir", env = "CACHELOCK_LOCK_DIR", value_name = "DIR")]
    pub lock_dir: Option<PathBuf>,
    /// Lock store: file://DIR, or etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (wins over --lock-dir).
    #[arg(long = "backend", env = "CACHELOCK_BACKEND", value_name = "URL")]
    pub backend: Option<String>,
    /// Configuration file (YAML).
    #[arg(long = "config", env = "CACHELOCK_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// `cachelock run`.
#[derive(Debug, Args)]
#[command(after_long_help = exit_codes_help())]
pub struct RunArgs {
    /// Lock options.
    #[command(flatten)]
    pub lock: LockArgs,
    /// Lock name: [A-Za-z0-9][A-Za-z0-9._-]{0,127}.
    #[arg(value_name = "LOCK")]
    pub name: String,
    /// The command and its arguments.
    #[arg(
        value_name = "COMMAND",
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub command: Vec<OsString>,
}

/// `cachelock status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only this lock.
    #[arg(value_name = "LOCK")]
    pub name: Option<String>,
    /// A JSON document for scripts instead of text.
    #[arg(long)]
    pub json: bool,
    /// Redraw whenever the queue changes (and every second for the clocks) until Ctrl-C; on a
    /// pipe or with NO_COLOR / TERM=dumb, print each new state after the last.
    #[arg(long)]
    pub watch: bool,
    /// The store and the configuration.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Also show the cached data roots under this cache root: sizes, last use, holders, the
    /// cap (`dockerd.cache_max_size`) and recent evictions.
    #[arg(long = "cache-root", value_name = "DIR")]
    pub cache_root: Option<PathBuf>,
}

/// Where the locks are, and the configuration: what `status`, `serve` and `doctor` read.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// Lock directory.
    #[arg(long = "lock-dir", env = "CACHELOCK_LOCK_DIR", value_name = "DIR")]
    pub lock_dir: Option<PathBuf>,
    /// Lock store: file://DIR, or etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (wins over --lock-dir).
    #[arg(long = "backend", env = "CACHELOCK_BACKEND", value_name = "URL")]
    pub backend: Option<String>,
    /// Configuration file (YAML).
    #[arg(long = "config", env = "CACHELOCK_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// `cachelock doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// A JSON document for scripts instead of lines.
    #[arg(long)]
    pub json: bool,
    /// The store and the configuration.
    #[command(flatten)]
    pub store: StoreArgs,
    /// The dockerd cache root to check (else the configuration's `cache_root`; with neither,
    /// the dockerd prerequisites are not this host's business).
    #[arg(long = "cache-root", env = "CACHELOCK_CACHE_ROOT", value_name = "DIR")]
    pub cache_root: Option<PathBuf>,
}

/// `cachelock serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (loopback by default; another address exposes the view, without
    /// authentication, to whoever can reach it).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9731")]
    pub listen: std::net::SocketAddr,
    /// Also measure the cached data roots under this cache root (every 30 s, a root again only
    /// after it was used): `cachelock_cache_root_*` metrics and `/api/v1/cache`.
    #[arg(long = "cache-root", env = "CACHELOCK_CACHE_ROOT", value_name = "DIR")]
    pub cache_root: Option<std::path::PathBuf>,
    /// The store and the configuration.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `cachelock policy ...`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Load a policy (an oci:// one resolved with its registry and verified), validate its
    /// world, run configure, print its exports and limits; without a name, every binding of
    /// the configuration (the deploy step).
    Check {
        /// A configured policy name, builtin:NAME, a .wasm file or an oci:// reference.
        #[arg(value_name = "NAME|FILE|REF")]
        policy: Option<String>,
        /// A KEY=VALUE for configure (repeatable).
        #[arg(long = "policy-config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        policy_config: Vec<(String, String)>,
        /// Configuration file (YAML).
        #[arg(long = "config", env = "CACHELOCK_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Feed a YAML scenario through a policy and print who is served when, and each decision.
    Simulate {
        /// A configured policy name, builtin:NAME, or a .wasm file.
        #[arg(long, value_name = "NAME|FILE.wasm")]
        policy: String,
        /// The scenario file (YAML).
        #[arg(long, value_name = "FILE")]
        scenario: PathBuf,
        /// A KEY=VALUE for configure (repeatable).
        #[arg(long = "policy-config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        policy_config: Vec<(String, String)>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Configuration file (YAML).
        #[arg(long = "config", env = "CACHELOCK_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Check a component and publish it as a wasm OCI artifact (signed with --sign-key).
    Push {
        /// The component (.wasm).
        #[arg(value_name = "FILE.wasm")]
        file: PathBuf,
        /// Where: oci://HOST[:PORT]/REPOSITORY:TAG.
        #[arg(value_name = "REF")]
        reference: String,
        /// Sign the pushed manifest with this private key (PEM; cosign-compatible).
        #[arg(long = "sign-key", value_name = "KEY")]
        sign_key: Option<PathBuf>,
        /// A KEY=VALUE for the configure call that checks the component (repeatable).
        #[arg(long = "policy-config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        policy_config: Vec<(String, String)>,
        /// Configuration file (YAML).
        #[arg(long = "config", env = "CACHELOCK_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Resolve, verify, fetch and compile oci:// policies into the compile cache (as root: the
    /// host cache every user loads); without a name, every oci:// policy of the configuration.
    Pull {
        /// A configured policy name or an oci:// reference.
        #[arg(value_name = "NAME|REF")]
        policy: Option<String>,
        /// Configuration file (YAML).
        #[arg(long = "config", env = "CACHELOCK_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Sign a pushed policy (cosign-compatible: the signature goes to tag sha256-<hex>.sig).
    Sign {
        /// oci://HOST[:PORT]/REPOSITORY:TAG (or @sha256:DIGEST).
        #[arg(value_name = "REF")]
        reference: String,
        /// The private key (PEM: PKCS#8 or SEC1, unencrypted).
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
        /// Configuration file (YAML).
        #[arg(long = "config", env = "CACHELOCK_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Verify a pushed policy's signature against public keys (default: the configuration's
    /// verify.keys).
    Verify {
        /// oci://HOST[:PORT]/REPOSITORY:TAG (or @sha256:DIGEST).
        #[arg(value_name = "REF")]
        reference: String,
        /// A public key (SPKI PEM, as cosign.pub); repeatable.
        #[arg(long, value_name = "PUB")]
        key: Vec<PathBuf>,
        /// Configuration file (YAML).
        #[arg(long = "config", env = "CACHELOCK_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Run a policy's table-driven tests (*.test.yaml) and print `N passed, N failed`.
    Test {
        /// Test files, or directories searched for *.test.yaml (default: the current one).
        #[arg(value_name = "FILE|DIR")]
        paths: Vec<PathBuf>,
        /// Configuration file (YAML).
        #[arg(long = "config", env = "CACHELOCK_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Show which policy governs which locks, per the configuration, and what each loads.
    List {
        /// Configuration file (YAML).
        #[arg(long = "config", env = "CACHELOCK_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Scaffold a buildable policy in ./NAME (or --dir), with a README of its build command.
    New {
        /// Policy name.
        #[arg(value_name = "NAME")]
        name: String,
        /// Directory to create (default ./NAME).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Language of the policy.
        #[arg(long, value_enum, default_value_t = PolicyLang::Rust)]
        lang: PolicyLang,
    },
    /// Internal: compile a policy module (stdin) to native code (stdout) under rlimits set by
    /// the parent cachelock.
    #[command(hide = true)]
    CompileChild {
        /// quick (Winch) or optimized (Cranelift).
        #[arg(long)]
        tier: String,
        /// Largest artifact written.
        #[arg(long = "max-code-bytes")]
        max_code_bytes: u64,
    },
}

/// Languages `cachelock policy new` scaffolds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyLang {
    /// A Rust crate on the SDK (cargo, wasm32-wasip2).
    Rust,
    /// Python, built with componentize-py.
    Python,
    /// JavaScript, built with componentize-js (jco).
    Js,
}

/// `cachelock dockerd`.
#[derive(Debug, Args)]
pub struct DockerdArgs {
    /// Lock options (the lock is the cache id).
    #[command(flatten)]
    pub lock: LockArgs,
    /// Keep and lock the data root `<cache-root>/<ID>`; without it the data root is fresh and
    /// wiped afterwards.
    #[arg(long = "cache-id", value_name = "ID")]
    pub cache_id: Option<String>,
    /// Root of data roots.
    #[arg(long = "cache-root", env = "CACHELOCK_CACHE_ROOT", value_name = "DIR")]
    pub cache_root: Option<PathBuf>,
    /// An image tarball to `docker load` before the command (repeatable).
    #[arg(long = "load", value_name = "FILE.tar")]
    pub load: Vec<PathBuf>,
    /// The command and its arguments (after `--`).
    #[arg(value_name = "COMMAND", required = true, last = true)]
    pub command: Vec<OsString>,
}

/// `cachelock cache ...`.
#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Every cached data root: cache id, slots, size on disk, last use, who holds it, whether
    /// eviction may take it. Changes nothing.
    Ls {
        /// Where the roots are.
        #[command(flatten)]
        at: CacheAt,
        /// A JSON document for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a cached data root nobody holds (its data and slots; its lock files stay, and
    /// its next run starts cold). Refused (exit 1) while anybody holds it.
    Rm {
        /// Its cache id.
        #[arg(value_name = "ID")]
        id: String,
        /// Where the roots are.
        #[command(flatten)]
        at: CacheAt,
    },
}

/// Where `cachelock cache` finds cached data roots and their locks.
#[derive(Debug, Args)]
pub struct CacheAt {
    /// Root of data roots (else the configuration's `cache_root`, else the default).
    #[arg(long = "cache-root", env = "CACHELOCK_CACHE_ROOT", value_name = "DIR")]
    pub cache_root: Option<PathBuf>,
    /// The lock directory of `cachelock dockerd`'s runs (the Earthly drop-in's locks are in
    /// the roots themselves).
    #[arg(long = "lock-dir", env = "CACHELOCK_LOCK_DIR", value_name = "DIR")]
    pub lock_dir: Option<PathBuf>,
    /// Configuration file (YAML).
    #[arg(long = "config", env = "CACHELOCK_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// `cachelock earthly` (also when invoked as `dockerd-wrapper.sh`).
#[derive(Debug, Args)]
pub struct EarthlyArgs {
    /// `execute CMD...` or `get-compose-config`.
    #[arg(
        value_name = "SUBCOMMAND",
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub args: Vec<OsString>,
}

fn parse_wait_mode(s: &str) -> Result<WaitMode, String> {
    s.parse()
}

/// The exit code table, for `run --help` (the same table as the README's).
fn exit_codes_help() -> String {
    let mut s = String::from("Exit codes:\n");
    for (c, meaning) in cachelock::error::EXIT_CODES {
        s.push_str(&format!("  {c:<14} {}\n", meaning.replace('`', "")));
    }
    s
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s:?} must be a non-negative number of seconds"));
    }
    Ok(v)
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}
