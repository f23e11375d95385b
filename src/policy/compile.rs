//! The compile budget: a policy module that is not built in is untrusted input to a compiler,
//! and a small module can ask for gigabytes and minutes (a "compile bomb"). It is therefore
//! compiled in a child process (`cachelock policy compile-child`, hidden) with rlimits:
//!
//! - `RLIMIT_AS` = `policy_compile.memory_mib` (default 1024 MiB),
//! - `RLIMIT_CPU` = `policy_compile.cpu_seconds` (default 30 s of CPU, all threads together),
//! - compiled code at most [`CODE_SLACK_BYTES`] + [`CODE_RATIO`] × the module's size (also
//!   `RLIMIT_FSIZE`), and a wall-clock bound of [`WALL_FACTOR`] × the CPU budget;
//!
//! and it dies with its parent (`PR_SET_PDEATHSIG`). A module over budget is refused (exit 78)
//! with a message naming the budget key; the refusal is remembered in the cache so that other
//! processes with the same budget do not pay for it again.
//!
//! The child reads the module from stdin (a sealed memfd the parent filled after checking the
//! module's hash and pin) and writes the artifact to stdout (a file the parent created).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use wasmtime::{Config, Engine, Strategy};

use crate::config::CompileBudget;

/// Default address-space budget of a compile, MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 1024;
/// Default CPU budget of a compile, seconds.
pub const DEFAULT_CPU_SECONDS: u64 = 30;
/// Default time a waiter waits for a compile before using the fallback order, seconds.
pub const DEFAULT_WAIT_SECONDS: u64 = 60;
/// Compiled code may be at most this many times the module's size...
pub const CODE_RATIO: u64 = 16;
/// ...plus this much.
pub const CODE_SLACK_BYTES: u64 = 16 << 20;
/// The compile is killed after this many times its CPU budget of wall time (a loaded host).
pub const WALL_FACTOR: u64 = 4;
/// Largest policy module accepted (the Python and JavaScript components are 12–20 MB).
pub const MAX_MODULE_BYTES: u64 = 128 << 20;

/// Exit code of the child when the module is not a valid component.
const CHILD_INVALID: i32 = 65;
/// Exit code of the child when the compiled code is over the size bound.
const CHILD_TOO_LARGE: i32 = 78;

/// The compile budget in force.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Budget {
    /// Address space of the compiling process, bytes.
    pub memory_bytes: u64,
    /// CPU seconds of the compiling process.
    pub cpu_seconds: u64,
    /// How long a waiter waits for a compile before it uses the fallback order.
    pub wait: Duration,
}

impl Default for Budget {
    fn default() -> Self {
        Self::from_config(&CompileBudget::default()).expect("defaults are valid")
    }
}

impl Budget {
    /// Applies the defaults to `policy_compile:`; refuses values out of range.
    pub fn from_config(c: &CompileBudget) -> Result<Self, String> {
        let mem = c.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
        if !(128..=1 << 20).contains(&mem) {
            return Err(format!(
                "policy_compile.memory_mib must be between 128 and 1048576 (got {mem})"
            ));
        }
        let cpu = c.cpu_seconds.unwrap_or(DEFAULT_CPU_SECONDS);
        if !(1..=3600).contains(&cpu) {
            return Err(format!(
                "policy_compile.cpu_seconds must be between 1 and 3600 (got {cpu})"
            ));
        }
        let wait = c.wait_seconds.unwrap_or(DEFAULT_WAIT_SECONDS);
        if wait > 3600 {
            return Err(format!(
                "policy_compile.wait_seconds must be at most 3600 (got {wait})"
            ));
        }
        Ok(Budget {
            memory_bytes: mem << 20,
            cpu_seconds: cpu,
            wait: Duration::from_secs(wait),
        })
    }

    /// One line for messages and the refusal note: "1024 MiB, 30 s CPU".
    pub fn describe(&self) -> String {
        format!(
            "{} MiB, {} s CPU",
            self.memory_bytes >> 20,
            self.cpu_seconds
        )
    }

    /// Whether this budget is at most `other` in every dimension (a refusal under `other`
    /// also holds under this one).
    pub fn within(&self, other: &Budget) -> bool {
        self.memory_bytes <= other.memory_bytes && self.cpu_seconds <= other.cpu_seconds
    }
}

/// Which compiler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Winch, wasmtime's baseline compiler: ~5× faster to compile.
    Quick,
    /// Cranelift: the optimized code a warm process runs.
    Optimized,
}

impl Tier {
    fn arg(self) -> &'static str {
        match self {
            Tier::Quick => "quick",
            Tier::Optimized => "optimized",
        }
    }

    /// Parses the child's `--tier` argument.
    pub fn parse(s: &str) -> Option<Tier> {
        match s {
            "quick" => Some(Tier::Quick),
            "optimized" => Some(Tier::Optimized),
            _ => None,
        }
    }

    /// The engine of this tier.
    pub fn engine(self) -> &'static Engine {
        match self {
            Tier::Quick => quick_engine(),
            Tier::Optimized => engine(),
        }
    }
}

/// The engine of optimized code (Cranelift, fuel metering and epoch interruption on): what a
/// warm process runs.
pub fn engine() -> &'static Engine {
    OPTIMIZED.get_or_init(|| make_engine(Strategy::Cranelift))
}

static OPTIMIZED: OnceLock<Engine> = OnceLock::new();
static QUICK: OnceLock<Engine> = OnceLock::new();

/// The engines created so far (a warm process never creates the quick one).
pub fn engines() -> impl Iterator<Item = &'static Engine> {
    [OPTIMIZED.get(), QUICK.get()].into_iter().flatten()
}

/// The engine of quickly compiled code (Winch, wasmtime's baseline compiler, ~5× faster to
/// compile, ~1.5× slower to run): used only until the optimized code is in the cache.
pub fn quick_engine() -> &'static Engine {
    QUICK.get_or_init(|| make_engine(Strategy::Winch))
}

fn make_engine(strategy: Strategy) -> Engine {
    let mut c = Config::new();
    c.consume_fuel(true)
        .epoch_interruption(true)
        // No unwind tables for the system unwinder: wasmtime walks wasm frames itself and stops
        // a host panic at the boundary, so only a debugger or profiler would read them, while
        // every process that loads a policy registered them — on musl one libunwind call per
        // function, and as many again, each a scan of all the others, when it dropped them
        // (9% of a contended run's instructions with `builtin:priority`).
        .native_unwind_info(false)
        .strategy(strategy);
    Engine::new(&c).expect("wasmtime engine configuration is valid")
}

/// Why a compile produced nothing.
#[derive(Debug)]
pub enum CompileError {
    /// Over budget: refused (exit 78) and remembered in the cache.
    OverBudget(String),
    /// The module is not a valid component (the compiler's message).
    Invalid(String),
    /// Could not run the compile at all (spawn, pipes, files).
    Io(String),
}

impl CompileError {
    /// The message.
    pub fn message(&self) -> &str {
        match self {
            CompileError::OverBudget(m) | CompileError::Invalid(m) | CompileError::Io(m) => m,
        }
    }
}

static COMPILER: OnceLock<PathBuf> = OnceLock::new();

/// Sets the cachelock binary that compiles in a child process. The CLI needs no call (it runs
/// itself, `/proc/self/exe`); a program embedding the library (a test harness) must name the
/// cachelock binary before the first untrusted compile.
pub fn set_compiler_program(path: PathBuf) {
    let _ = COMPILER.set(path);
}

fn compiler_program() -> PathBuf {
    COMPILER
        .get()
        .cloned()
        .unwrap_or_else(|| PathBuf::from("/proc/self/exe"))
}

/// The bound on compiled code for a module of `module_len` bytes.
pub fn max_code_bytes(module_len: usize) -> u64 {
    CODE_SLACK_BYTES.saturating_add(CODE_RATIO.saturating_mul(module_len as u64))
}

/// Compiles `bytes` with `tier` in a child process under `budget`, writing the artifact to
/// `out` (from its start). Returns the artifact's length.
pub fn in_child(
    bytes: &[u8],
    tier: Tier,
    budget: &Budget,
    out: &File,
) -> Result<u64, CompileError> {
    let io = |what: &str, e: io::Error| CompileError::Io(format!("{what}: {e}"));
    let input = memfd(bytes).map_err(|e| io("cannot pass the module to the compiler", e))?;
    let stdout = out
        .try_clone()
        .map_err(|e| io("cannot pass the output file to the compiler", e))?;
    let max_code = max_code_bytes(bytes.len());
    let (mem, cpu) = (budget.memory_bytes, budget.cpu_seconds);
    let mut cmd = Command::new(compiler_program());
    cmd.args([
        "policy",
        "compile-child",
        "--tier",
        tier.arg(),
        "--max-code-bytes",
        &max_code.to_string(),
    ])
    .env_clear()
    .stdin(Stdio::from(input))
    .stdout(Stdio::from(stdout))
    .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls (prctl, setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            let set = |res, soft: u64, hard: u64| {
                let l = libc::rlimit {
                    rlim_cur: soft as libc::rlim_t,
                    rlim_max: hard as libc::rlim_t,
                };
                libc::setrlimit(res, &l)
            };
            set(libc::RLIMIT_AS, mem, mem);
            // SIGXCPU at the budget, SIGKILL a second later if it is ignored.
            set(libc::RLIMIT_CPU, cpu, cpu + 1);
            // The artifact is written once, whole: a larger one is cut by SIGXFSZ.
            set(libc::RLIMIT_FSIZE, max_code + 4096, max_code + 4096);
            set(libc::RLIMIT_CORE, 0, 0);
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| {
        io(
            &format!(
                "cannot start the policy compiler {}",
                compiler_program().display()
            ),
            e,
        )
    })?;
    let mut stderr = child.stderr.take().expect("piped");
    // The child's messages are short; read them on a thread so a chatty child cannot block.
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = (&mut stderr).take(16 * 1024).read_to_end(&mut buf);
        // Drain the rest so the child never blocks on a full pipe.
        let _ = io::copy(&mut stderr, &mut io::sink());
        String::from_utf8_lossy(&buf).into_owned()
    });
    let wall = Duration::from_secs(cpu.saturating_mul(WALL_FACTOR).max(10));
    let mut killed_for_wall = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) => {}
            Err(e) => return Err(io("cannot wait for the policy compiler", e)),
        }
        if start.elapsed() > wall && !killed_for_wall {
            let _ = child.kill();
            killed_for_wall = true;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let msg = reader.join().unwrap_or_default();
    let msg = msg.trim();
    let budget_key = |what: &str| {
        CompileError::OverBudget(format!(
            "compiling it needs more than the compile budget allows ({what}; the budget is {}, \
             set by policy_compile.memory_mib / policy_compile.cpu_seconds): refusing it as a \
             compile bomb",
            budget.describe()
        ))
    };
    if killed_for_wall {
        return Err(budget_key(&format!(
            "still compiling after {} s of wall time",
            wall.as_secs()
        )));
    }
    if status.success() {
        let len = out
            .metadata()
            .map_err(|e| io("cannot read the compiled policy", e))?
            .len();
        return Ok(len);
    }
    match (status.code(), status.signal()) {
        (Some(CHILD_INVALID), _) => Err(CompileError::Invalid(msg.to_string())),
        (Some(CHILD_TOO_LARGE), _) => Err(budget_key(msg)),
        (_, Some(libc::SIGXCPU)) | (_, Some(libc::SIGKILL)) => {
            Err(budget_key(&format!("more than {cpu} s of CPU")))
        }
        (_, Some(libc::SIGXFSZ)) => Err(budget_key(&format!(
            "compiled code larger than {} MiB",
            max_code >> 20
        ))),
        (_, Some(libc::SIGABRT)) | (_, Some(libc::SIGSEGV)) | (_, Some(libc::SIGBUS))
            if msg.contains("memory allocation")
                || msg.contains("out of memory")
                || msg.is_empty() =>
        {
            Err(budget_key(&format!(
                "more than {} MiB of memory",
                mem >> 20
            )))
        }
        (code, sig) => Err(CompileError::Io(format!(
            "the policy compiler failed ({}){}",
            match (code, sig) {
                (Some(c), _) => format!("exit {c}"),
                (_, Some(s)) => format!("signal {s}"),
                _ => "unknown status".into(),
            },
            if msg.is_empty() {
                String::new()
            } else {
                format!(": {msg}")
            }
        ))),
    }
}

/// An in-memory file holding `bytes` and sealed (no write, grow or shrink can change it): the
/// child's stdin is exactly the module that was checked.
fn memfd(bytes: &[u8]) -> io::Result<File> {
    crate::sys::sealed_memfd(c"cachelock-policy-module", bytes)
}

/// An anonymous in-memory file for an artifact that is not cached (no trusted writable cache).
pub fn anonymous_output() -> io::Result<File> {
    crate::sys::memfd(c"cachelock-policy-code")
}

/// The child's side (`cachelock policy compile-child`): module on stdin, artifact on stdout.
/// Returns the exit code.
pub fn child_main(tier: Tier, max_code_bytes: u64) -> i32 {
    let mut bytes = Vec::new();
    if let Err(e) = io::stdin()
        .lock()
        .take(MAX_MODULE_BYTES + 1)
        .read_to_end(&mut bytes)
    {
        eprintln!("cannot read the module: {e}");
        return 74;
    }
    if bytes.len() as u64 > MAX_MODULE_BYTES {
        eprintln!("the module is larger than {} MiB", MAX_MODULE_BYTES >> 20);
        return CHILD_INVALID;
    }
    let compiled = match tier.engine().precompile_component(&bytes) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e:#}");
            return CHILD_INVALID;
        }
    };
    drop(bytes);
    if compiled.len() as u64 > max_code_bytes {
        eprintln!(
            "compiled code of {} MiB, over the bound of {} MiB for this module \
             ({} × its size + {} MiB)",
            compiled.len() >> 20,
            max_code_bytes >> 20,
            CODE_RATIO,
            CODE_SLACK_BYTES >> 20
        );
        return CHILD_TOO_LARGE;
    }
    let mut out = io::stdout().lock();
    if let Err(e) = out.write_all(&compiled).and_then(|_| out.flush()) {
        eprintln!("cannot write the compiled policy: {e}");
        return 74;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_defaults_and_ranges() {
        let b = Budget::default();
        assert_eq!(b.memory_bytes, 1 << 30);
        assert_eq!(b.cpu_seconds, 30);
        assert_eq!(b.describe(), "1024 MiB, 30 s CPU");
        let bad = CompileBudget {
            cpu_seconds: Some(0),
            ..Default::default()
        };
        assert!(Budget::from_config(&bad)
            .unwrap_err()
            .contains("cpu_seconds"));
        let bad = CompileBudget {
            memory_mib: Some(1),
            ..Default::default()
        };
        assert!(Budget::from_config(&bad)
            .unwrap_err()
            .contains("memory_mib"));
        assert_eq!(max_code_bytes(1 << 20), (16 << 20) + (16 << 20));
    }
}
