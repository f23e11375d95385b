//! The WASM host: one `bindgen!` over the `policy` world, the sandboxed store state, the linker,
//! and [`WasmPolicy`], which loads a component, runs `configure` and serves [`Policy`] calls
//! under the policy's limits.
//!
//! The sandbox: WASI p2 with no preopened directories, no environment, no arguments, no
//! sockets or name lookup, stdin closed; stdout, stderr and `host.log` go to tracing, tagged with
//! the policy name, capped per call, and bounded per process ([`Shown`]): a policy is another
//! team's code, and a waiter calls it again and again.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, Func, Linker, Resource, ResourceTable, TypedFunc};
use wasmtime::{Store, StoreContextMut, Trap};
use wasmtime_wasi::p2::{DynPollable, OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::cache::{self, Origin};
use super::compile::CompileError;
use super::limits::{self, Effective, Limiter};
use super::spec::{PolicySpec, Source};
use super::*;
use crate::error::Error;

mod bindings {
    wasmtime::component::bindgen!({
        world: "policy",
        path: "wit",
    });
}

use bindings::cachelock::policy::types as wit;

pub use super::types::WORLD;

/// The exported interface of the queue decisions.
const LOCK_POLICY: &str = "cachelock:policy/lock-policy@0.1.0";

/// Store data: the WASI context, the limiter and the log capture of one policy instance.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
    policy: Arc<str>,
    log_budget: u64,
    log_left: u64,
    log_dropped: u64,
    stdout: CappedSink,
    stderr: CappedSink,
    /// What of this policy's output has been shown (shared by its successive instances).
    shown: Arc<Mutex<Shown>>,
    /// When the current call must end (epoch interruption in wasm code, a timeout in WASI
    /// waits: a sleeping policy is woken and stopped).
    deadline: Instant,
    /// The current call hit `deadline` in a WASI wait.
    timed_out: bool,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wit::Host for HostState {}

impl bindings::cachelock::policy::host::Host for HostState {
    fn log(&mut self, level: wit::Level, message: String) {
        let len = message.len() as u64;
        if self.log_left == 0 {
            self.log_dropped += len;
            return;
        }
        let text = if len > self.log_left {
            self.log_dropped += len - self.log_left;
            limits::truncate(message, self.log_left as usize)
        } else {
            message
        };
        self.log_left = self.log_left.saturating_sub(len);
        let level = lock(&self.shown).level_for(&self.policy, level.into(), &text, false);
        emit(&self.policy, level, "log", &text);
    }
}

fn lock(m: &Mutex<Shown>) -> std::sync::MutexGuard<'_, Shown> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Most bytes of a policy's output shown per process at its own level; the rest goes to the
/// debug log (`-v`). A waiter asks its policy again at every look at the queue, so a policy
/// printing on every call would otherwise write without bound, `-q` or not.
const SHOWN_BYTES: usize = 16 * 1024;
/// Distinct lines remembered to show each only once.
const SHOWN_LINES: usize = 4096;

/// What of one policy's output this process has shown: each distinct line once, at most
/// [`SHOWN_BYTES`] in all, and what a faulting call printed (a panic message) only for the
/// first faulting call — cachelock's own warning about the fault is given once too. The rest
/// is logged at debug level.
#[derive(Debug, Default)]
struct Shown {
    bytes: usize,
    lines: std::collections::HashSet<u64>,
    faulted: bool,
    said_full: bool,
    said_dropped: bool,
}

impl Shown {
    /// The level `text` is logged at: its own, or debug when it was shown already, the budget
    /// is spent, or it comes from a call that faulted again (`repeat_fault`).
    fn level_for(&mut self, policy: &str, level: Level, text: &str, repeat_fault: bool) -> Level {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        if repeat_fault {
            return Level::Debug;
        }
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(text);
        if self.lines.contains(&h) {
            return Level::Debug;
        }
        if self.lines.len() < SHOWN_LINES {
            self.lines.insert(h);
        }
        if self.bytes + text.len() > SHOWN_BYTES {
            if !std::mem::replace(&mut self.said_full, true) {
                tracing::warn!(
                    policy,
                    "this policy has printed more than {} KiB; the rest of its output is logged at debug level (-v)",
                    SHOWN_BYTES / 1024
                );
            }
            return Level::Debug;
        }
        self.bytes += text.len();
        level
    }
}

fn emit(policy: &str, level: Level, stream: &str, text: &str) {
    // A policy is another team's code: its text cannot start lines of its own or send
    // terminal escapes (newlines and control characters are shown escaped).
    let text = crate::output::escape(text);
    match level {
        Level::Trace => tracing::trace!(policy, stream, "{text}"),
        Level::Debug => tracing::debug!(policy, stream, "{text}"),
        Level::Info => tracing::info!(policy, stream, "{text}"),
        Level::Warn => tracing::warn!(policy, stream, "{text}"),
        Level::Error => tracing::error!(policy, stream, "{text}"),
    }
}

impl HostState {
    fn new(policy: Arc<str>, limits: &Effective, shown: Arc<Mutex<Shown>>) -> Self {
        let stdout = CappedSink::new(limits.log_bytes as usize);
        let stderr = CappedSink::new(limits.log_bytes as usize);
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        HostState {
            wasi,
            table: ResourceTable::new(),
            limiter: limits.limiter(),
            policy,
            log_budget: limits.log_bytes,
            log_left: limits.log_bytes,
            log_dropped: 0,
            stdout,
            stderr,
            shown,
            deadline: Instant::now(),
            timed_out: false,
        }
    }

    /// Sends what the call printed to tracing (see [`Shown`]; `faulted`: the call faulted) and
    /// resets the per-call budgets.
    fn flush_logs(&mut self, faulted: bool) {
        let mut shown = lock(&self.shown);
        let repeat_fault = faulted && shown.faulted;
        shown.faulted |= faulted;
        for (sink, stream, level) in [
            (&self.stdout, "stdout", Level::Info),
            (&self.stderr, "stderr", Level::Warn),
        ] {
            let (text, dropped) = sink.take();
            if !text.is_empty() {
                for line in String::from_utf8_lossy(&text).lines() {
                    let level = shown.level_for(&self.policy, level, line, repeat_fault);
                    emit(&self.policy, level, stream, line);
                }
            }
            self.log_dropped += dropped;
        }
        if self.log_dropped > 0 {
            let first = !std::mem::replace(&mut shown.said_dropped, true);
            let text = format!(
                "dropped {} bytes of policy output (limits.log_bytes = {} per call{})",
                self.log_dropped,
                self.log_budget,
                if first {
                    "; later drops are logged at debug level"
                } else {
                    ""
                }
            );
            emit(
                &self.policy,
                if first { Level::Warn } else { Level::Debug },
                "host",
                &text,
            );
        }
        self.log_dropped = 0;
        self.log_left = self.log_budget;
        self.limiter.memory_hit = false;
        self.limiter.table_hit = false;
        self.timed_out = false;
    }
}

/// A policy's stdout or stderr: keeps the first `cap` bytes of each call, counts the rest.
/// Writes always succeed, so a chatty policy is cut short, never failed.
#[derive(Clone)]
struct CappedSink(Arc<Mutex<(Vec<u8>, usize, u64)>>);

impl CappedSink {
    fn new(cap: usize) -> Self {
        CappedSink(Arc::new(Mutex::new((Vec::new(), cap, 0))))
    }
    fn take(&self) -> (Vec<u8>, u64) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let dropped = std::mem::take(&mut g.2);
        (std::mem::take(&mut g.0), dropped)
    }
}

impl OutputStream for CappedSink {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let room = g.1.saturating_sub(g.0.len());
        let keep = room.min(bytes.len());
        g.0.extend_from_slice(&bytes[..keep]);
        g.2 += (bytes.len() - keep) as u64;
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CappedSink {
    async fn ready(&mut self) {}
}

impl wasmtime_wasi::cli::IsTerminal for CappedSink {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for CappedSink {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        // Only WASI p3 uses this and p3 is not linked; a zero-capacity pipe keeps it inert.
        Box::new(wasmtime_wasi::p2::pipe::MemoryOutputPipe::new(0))
    }
}

/// The WASI version whose `poll` and `pollable.block` are replaced by bounded ones.
const WASI_IO_POLL: &str = "wasi:io/poll@0.2.12";

/// The linker of every policy store: WASI p2 (sandboxed by the context) plus `host`, with the
/// two ways a policy can wait (`poll`, `pollable.block`) bounded by the call's deadline. The
/// clocks stay (CPython and SpiderMonkey read them); only waiting past the deadline is cut.
fn linker(engine: &wasmtime::Engine) -> &'static Linker<HostState> {
    static OPTIMIZED: OnceLock<Linker<HostState>> = OnceLock::new();
    static QUICK: OnceLock<Linker<HostState>> = OnceLock::new();
    let cell = if wasmtime::Engine::same(engine, super::compile::engine()) {
        &OPTIMIZED
    } else {
        &QUICK
    };
    cell.get_or_init(|| {
        let mut l = Linker::new(engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut l).expect("WASI p2 links");
        bindings::Policy::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut l, |s| s)
            .expect("policy host interface links");
        l.allow_shadowing(true);
        let mut poll = l.instance(WASI_IO_POLL).expect("wasi:io/poll is linked");
        poll.func_wrap(
            "poll",
            |mut store: StoreContextMut<'_, HostState>, (list,): (Vec<Resource<DynPollable>>,)| {
                use wasmtime_wasi::p2::bindings::io::poll::Host;
                let rem = store
                    .data()
                    .deadline
                    .saturating_duration_since(Instant::now());
                let table = &mut store.data_mut().table;
                let r = wasmtime_wasi::runtime::in_tokio(async {
                    tokio::time::timeout(rem, Host::poll(table, list)).await
                });
                match r {
                    Ok(v) => v.map(|v| (v,)),
                    Err(_) => {
                        store.data_mut().timed_out = true;
                        Err(wasmtime::format_err!(
                            "the call's time limit passed while it waited"
                        ))
                    }
                }
            },
        )
        .expect("poll shadows");
        poll.func_wrap(
            "[method]pollable.block",
            |mut store: StoreContextMut<'_, HostState>, (p,): (Resource<DynPollable>,)| {
                use wasmtime_wasi::p2::bindings::io::poll::HostPollable;
                let rem = store
                    .data()
                    .deadline
                    .saturating_duration_since(Instant::now());
                let table = &mut store.data_mut().table;
                let r = wasmtime_wasi::runtime::in_tokio(async {
                    tokio::time::timeout(rem, HostPollable::block(table, p)).await
                });
                match r {
                    Ok(v) => v,
                    Err(_) => {
                        store.data_mut().timed_out = true;
                        Err(wasmtime::format_err!(
                            "the call's time limit passed while it waited"
                        ))
                    }
                }
            },
        )
        .expect("pollable.block shadows");
        l
    })
}

/// Epoch ticks: every engine's epoch advances this often while a call runs, and a call's
/// deadline is a number of ticks (wasm code checks it at loop headers and function entries).
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Calls in progress, and whether the ticker is parked. The ticker parks while there are none,
/// so that a waiting process holding a loaded policy does not wake up a hundred times a second
/// for nothing; a call wakes it only if it is parked (a wake-up is a system call, and a look at
/// the queue makes one call per waiter).
struct Calls {
    running: usize,
    parked: bool,
}

static CALLS: (std::sync::Mutex<Calls>, std::sync::Condvar) = (
    std::sync::Mutex::new(Calls {
        running: 0,
        parked: false,
    }),
    std::sync::Condvar::new(),
);

/// Keeps the epoch ticking while it lives (one per call into the guest).
struct Ticking;

impl Ticking {
    fn start() -> Result<Ticking, String> {
        start_epoch_ticker()?;
        let (calls, cv) = &CALLS;
        let mut c = calls.lock().unwrap_or_else(|p| p.into_inner());
        c.running += 1;
        if c.parked {
            c.parked = false;
            cv.notify_one();
        }
        Ok(Ticking)
    }
}

impl Drop for Ticking {
    fn drop(&mut self) {
        CALLS.0.lock().unwrap_or_else(|p| p.into_inner()).running -= 1;
    }
}

/// Starts the thread that advances the epochs (once per process); without it no call could be
/// bounded in time, so a failure to start it fails the call.
fn start_epoch_ticker() -> Result<(), String> {
    static TICKER: OnceLock<Result<(), String>> = OnceLock::new();
    TICKER
        .get_or_init(|| {
            std::thread::Builder::new()
                .name("cachelock-policy-epoch".into())
                .spawn(|| loop {
                    {
                        let (calls, cv) = &CALLS;
                        let mut c = calls.lock().unwrap_or_else(|p| p.into_inner());
                        while c.running == 0 {
                            c.parked = true;
                            c = cv.wait(c).unwrap_or_else(|p| p.into_inner());
                        }
                        c.parked = false;
                    }
                    std::thread::sleep(EPOCH_TICK);
                    for engine in super::compile::engines() {
                        engine.increment_epoch();
                    }
                })
                .map(drop)
                .map_err(|e| {
                    format!("cannot start the thread that bounds policy calls in time: {e}")
                })
        })
        .clone()
}

/// Arms the per-call bounds: fuel, and a wall-clock deadline `time_ms` from now.
fn arm(store: &mut Store<HostState>, fuel: u64, time_ms: u64) -> wasmtime::Result<()> {
    store.set_fuel(fuel)?;
    store.data_mut().deadline = Instant::now() + Duration::from_millis(time_ms);
    store.data_mut().timed_out = false;
    // One extra tick: the first may come at once.
    store.set_epoch_deadline(time_ms.div_ceil(EPOCH_TICK.as_millis() as u64) + 1);
    Ok(())
}

/// The import of `component` that the sandbox does not provide, if that is why it cannot be
/// instantiated (wasmtime names it in its message).
fn unsatisfied_import(e: &wasmtime::Error) -> Option<String> {
    let text = format!("{e:#}");
    let rest = &text[text.find("component imports ")?..];
    let start = rest.find('`')? + 1;
    let len = rest[start..].find('`')?;
    let name = &rest[start..start + len];
    rest.contains("a matching implementation was not found")
        .then(|| name.to_string())
}

/// What was loaded, for `policy check` and measurements.
#[derive(Debug, Clone)]
pub struct LoadInfo {
    /// Hex sha256 of the module.
    pub sha256: String,
    /// Size of the module in bytes.
    pub size: usize,
    /// Compiled now or taken from the cache.
    pub origin: Origin,
    /// The component's exports (names).
    pub exports: Vec<String>,
    /// The component's imports (names).
    pub imports: Vec<String>,
    /// For an `oci://` module: the manifest digest loaded, the key that verified it.
    #[cfg(feature = "oci")]
    pub oci: Option<super::oci::Origin>,
}

/// An instantiated policy: its store and its exports.
struct Live {
    store: Store<HostState>,
    policy: bindings::Policy,
    queue: QueueExports,
}

/// `rank` and `on-wait`, called with the engine's own [`Ticket`] and [`WaitState`] (whose
/// canonical-ABI shape is derived in `types.rs`): the generated bindings take owned copies of
/// every string, which a look at N waiters paid N times over on the host before wasmtime copied
/// the same strings into the guest.
struct QueueExports {
    rank: Func,
    on_wait: Func,
}

type RankFn<'a> = TypedFunc<(&'a Ticket, u64), (i64,)>;
type OnWaitFn<'a> = TypedFunc<(&'a WaitState,), (WaitDecision,)>;

impl QueueExports {
    /// Finds both exports and checks their types against the host's (field names and types, as
    /// for any typed call); a component built against another WIT fails here.
    fn new(
        store: &mut Store<HostState>,
        instance: &wasmtime::component::Instance,
    ) -> wasmtime::Result<Self> {
        let mut func = |name: &str| -> wasmtime::Result<Func> {
            let iface = instance
                .get_export_index(&mut *store, None, LOCK_POLICY)
                .ok_or_else(|| wasmtime::format_err!("no export `{LOCK_POLICY}`"))?;
            let index = instance
                .get_export_index(&mut *store, Some(&iface), name)
                .ok_or_else(|| wasmtime::format_err!("no export `{LOCK_POLICY}#{name}`"))?;
            instance
                .get_func(&mut *store, index)
                .ok_or_else(|| wasmtime::format_err!("`{LOCK_POLICY}#{name}` is not a function"))
        };
        let exports = QueueExports {
            rank: func("rank")?,
            on_wait: func("on-wait")?,
        };
        exports.rank.typed::<(&Ticket, u64), (i64,)>(&*store)?;
        exports
            .on_wait
            .typed::<(&WaitState,), (WaitDecision,)>(&*store)?;
        Ok(exports)
    }

    fn rank(&self, store: &mut Store<HostState>, t: &Ticket, now_ms: u64) -> wasmtime::Result<i64> {
        // SAFETY: the function's type was checked against these types in `new` (a lifetime does
        // not change a canonical-ABI type); bindgen's generated calls do the same.
        let f = unsafe { RankFn::new_unchecked(self.rank) };
        Ok(f.call(store, (t, now_ms))?.0)
    }

    fn on_wait(
        &self,
        store: &mut Store<HostState>,
        state: &WaitState,
    ) -> wasmtime::Result<WaitDecision> {
        // SAFETY: as in `rank`.
        let f = unsafe { OnWaitFn::new_unchecked(self.on_wait) };
        Ok(f.call(store, (state,))?.0)
    }
}

/// A loaded, configured policy instance.
pub struct WasmPolicy {
    name: Arc<str>,
    component: Component,
    config: Vec<(String, String)>,
    limits: Effective,
    instance: Option<Live>,
    info: LoadInfo,
    cut_said: bool,
    shown: Arc<Mutex<Shown>>,
}

impl WasmPolicy {
    /// Loads, validates and configures `spec`'s module. Every failure is a configuration error
    /// (exit 78) naming the policy and saying what to fix.
    pub fn load(spec: &PolicySpec) -> Result<Self, Error> {
        let name: Arc<str> = Arc::from(spec.name.as_str());
        // "policy 'team-x' (/etc/cachelock/x.wasm): ..." or, for a path or builtin:NAME given
        // directly, "policy x.wasm: ...".
        let who = if spec.name == spec.source.to_string() {
            format!("policy {}", spec.name)
        } else {
            format!("policy '{}' ({})", spec.name, spec.source)
        };
        let bad = |m: String| Error::config(format!("{who}: {m}"));
        #[cfg(feature = "oci")]
        let mut fetched = None;
        let (bytes, sha): (std::borrow::Cow<'static, [u8]>, String) = match &spec.source {
            Source::Builtin(b) => (b.bytes.into(), b.sha256.to_string()),
            // Verified before anything is compiled (`oci::fetch`).
            #[cfg(feature = "oci")]
            Source::Oci(o) => {
                let mut f = super::oci::fetch(o, &spec.cache, &who)?;
                let bytes = std::mem::take(&mut f.bytes);
                let sha = f.sha256.clone();
                fetched = Some(f);
                (bytes.into(), sha)
            }
            Source::File(p) => {
                let bytes = read_module(p).map_err(|e| {
                    bad(format!(
                        "cannot read module {}: {e} (check `module:` in the policy file or the --policy path)",
                        p.display()
                    ))
                })?;
                let sha = cache::sha256_hex(&bytes);
                (bytes.into(), sha)
            }
        };
        if let Some(pin) = &spec.sha256 {
            let want = pin
                .strip_prefix("sha256:")
                .unwrap_or(pin)
                .to_ascii_lowercase();
            if want != sha {
                return Err(bad(format!(
                    "the module has sha256:{sha} but the policy file pins sha256:{want}; refusing it \
                     (update the pin if the new module is intended)"
                )));
            }
        }
        check_header(&bytes).map_err(|m| bad(format!("the module {m}")))?;
        let module = cache::Module {
            bytes: &bytes,
            sha: &sha,
            trusted: matches!(spec.source, Source::Builtin(_)),
        };
        let (component, origin) =
            cache::load(&module, &spec.cache, &spec.budget).map_err(|e| match e.0 {
                CompileError::Invalid(m) => bad(format!(
                    "the module is not a valid WebAssembly component: {m}"
                )),
                CompileError::OverBudget(m) => bad(m),
                CompileError::Io(m) => bad(format!("cannot compile it: {m}")),
            })?;
        let ty = component.component_type();
        let exports = ty
            .exports(component.engine())
            .map(|(n, _)| n.to_string())
            .collect();
        let imports = ty
            .imports(component.engine())
            .map(|(n, _)| n.to_string())
            .collect();
        let mut p = WasmPolicy {
            name,
            component,
            config: spec.config.clone(),
            limits: spec.limits.clone(),
            instance: None,
            info: LoadInfo {
                sha256: sha,
                size: bytes.len(),
                origin,
                exports,
                imports,
                #[cfg(feature = "oci")]
                oci: None,
            },
            cut_said: false,
            shown: Default::default(),
        };
        p.instantiate().map_err(bad)?;
        // Compiled and configured: now it may become the last good resolution.
        #[cfg(feature = "oci")]
        if let (Source::Oci(o), Some(f)) = (&spec.source, fetched) {
            super::oci::settle(o, &spec.cache, &f);
            p.info.oci = Some(f.origin);
        }
        Ok(p)
    }

    /// Says once per policy and process that queue data was cut to fit the policy's memory.
    fn said_cut(&mut self) {
        if !self.cut_said {
            self.cut_said = true;
            tracing::warn!(
                policy = &*self.name,
                "the queue data is larger than 1/{} of this policy's memory (limits.memory_mib): \
                 labels and, if need be, waiters are cut before they are passed to it",
                limits::INPUT_MEMORY_DIVISOR
            );
        }
    }

    /// What was loaded.
    pub fn info(&self) -> &LoadInfo {
        &self.info
    }

    /// The limits in force.
    pub fn limits(&self) -> &Effective {
        &self.limits
    }

    /// A fresh instance, configured. Used at load and after a fault (a trapped instance cannot
    /// be entered again).
    fn instantiate(&mut self) -> Result<(), String> {
        let _ticking = Ticking::start()?;
        let engine = self.component.engine().clone();
        let mut store = Store::new(
            &engine,
            HostState::new(self.name.clone(), &self.limits, self.shown.clone()),
        );
        store.limiter(|s| &mut s.limiter);
        arm(
            &mut store,
            self.limits
                .fuel
                .saturating_mul(limits::CONFIGURE_FUEL_FACTOR),
            self.limits
                .time_ms
                .saturating_mul(limits::CONFIGURE_FUEL_FACTOR),
        )
        .map_err(|e| e.to_string())?;
        let exports = linker(&engine)
            .instantiate(&mut store, &self.component)
            .and_then(|instance| {
                let policy = bindings::Policy::new(&mut store, &instance)?;
                let queue = QueueExports::new(&mut store, &instance)?;
                Ok((policy, queue))
            });
        let (policy, queue) = exports.map_err(|e| {
                if store.data().limiter.memory_hit || store.data().limiter.table_hit {
                    format!("needs more memory or table space than its limits allow at start-up: {e:#}")
                } else if let Some(import) = unsatisfied_import(&e).filter(|i| !i.starts_with("cachelock:policy/")) {
                    format!(
                        "it imports `{import}`, which the policy sandbox does not provide (a policy gets \
                         WASI clocks, random and stdout/stderr, and cachelock:policy/host; no network, \
                         files or environment): build it without that import — for componentize-js, \
                         `--disable http fetch-event` (or `disableFeatures: [\"http\", \"fetch-event\"]`); for Rust, drop the \
                         dependency that pulls it in (`wasm-tools component wit FILE.wasm` lists the imports)"
                    )
                } else {
                    format!("the module does not implement the {WORLD} world (is it built against wit/policy.wit?): {e:#}")
                }
            })?;
        let r = policy.call_configure(&mut store, &self.config);
        // Described before the logs are flushed (that resets what the call hit).
        let r = r.map_err(|e| describe_fault(&store, &self.limits, &e));
        store.data_mut().flush_logs(r.is_err());
        match r {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => {
                return Err(format!(
                    "configure refused the configuration: {}",
                    limits::truncate(msg, limits::MAX_REASON_BYTES)
                ))
            }
            Err(fault) => return Err(format!("configure failed: {fault}")),
        }
        self.instance = Some(Live {
            store,
            policy,
            queue,
        });
        Ok(())
    }

    /// Runs one export under the per-call fuel; a fault drops the instance (the next call gets
    /// a fresh one) and becomes a [`PolicyError`].
    fn call<R>(
        &mut self,
        what: &'static str,
        f: impl FnOnce(&mut Live) -> wasmtime::Result<R>,
    ) -> Result<R, PolicyError> {
        if self.instance.is_none() {
            self.instantiate().map_err(|m| {
                let mut e = PolicyError::fault(&self.name, m);
                e.call = Some(what);
                e
            })?;
        }
        let live = self.instance.as_mut().expect("instantiated above");
        arm(&mut live.store, self.limits.fuel, self.limits.time_ms)
            .map_err(|e| PolicyError::fault(&self.name, e.to_string()))?;
        let ticking = Ticking::start().map_err(|m| PolicyError::fault(&self.name, m))?;
        let r = f(live);
        drop(ticking);
        let store = &mut live.store;
        let result = match r {
            Ok(v) => Ok(v),
            Err(e) => {
                let mut err = PolicyError::fault(
                    &self.name,
                    format!("{what}: {}", describe_fault(store, &self.limits, &e)),
                );
                err.call = Some(what);
                Err(err)
            }
        };
        store.data_mut().flush_logs(result.is_err());
        if result.is_err() {
            self.instance = None;
        }
        result
    }
}

/// One sentence saying what the policy did.
fn describe_fault(store: &Store<HostState>, limits: &Effective, e: &wasmtime::Error) -> String {
    let lim = &store.data().limiter;
    if lim.memory_hit {
        return format!(
            "exceeded its memory limit ({} MiB; limits.memory_mib)",
            limits.memory_bytes >> 20
        );
    }
    if lim.table_hit {
        return format!(
            "exceeded its table limit ({} elements; limits.table_elements)",
            limits.table_elements
        );
    }
    if store.data().timed_out {
        return format!(
            "ran past its time limit ({} ms per call; limits.time_ms) while waiting (a sleep?)",
            limits.time_ms
        );
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => format!(
            "ran past its time limit ({} ms per call; limits.time_ms)",
            limits.time_ms
        ),
        Some(Trap::OutOfFuel) => format!(
            "ran out of fuel ({} per call; limits.fuel): an endless loop or far too much work",
            limits.fuel
        ),
        Some(Trap::UnreachableCodeReached) => {
            "trapped (wasm `unreachable`: a panic or abort in the policy)".to_string()
        }
        Some(t) => format!("trapped ({t})"),
        None => format!("failed: {e}"),
    }
}

/// Reads a module file, refusing one larger than [`compile::MAX_MODULE_BYTES`] (without reading
/// it whole) or one that is not a regular file (a FIFO would block).
fn read_module(p: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(p)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let max = super::compile::MAX_MODULE_BYTES;
    let mut bytes = Vec::new();
    f.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::other(format!(
            "larger than {} MiB, the largest policy module accepted",
            max >> 20
        )));
    }
    Ok(bytes)
}

/// Tells a core module or a non-wasm file from a component, with what to do about it.
fn check_header(bytes: &[u8]) -> Result<(), String> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err("is not WebAssembly (no \\0asm header): a policy is a WebAssembly component (build it with `cargo build --release --target wasm32-wasip2`)".into());
    }
    match &bytes[4..8] {
        [1, 0, 0, 0] => Err("is a core WebAssembly module, not a component: build it for wasm32-wasip2 (or wrap it with `wasm-tools component new`)".into()),
        [_, _, 1, 0] => Ok(()),
        _ => Err("has an unknown WebAssembly version/layer".into()),
    }
}

impl Policy for WasmPolicy {
    fn name(&self) -> &str {
        &self.name
    }

    fn rank(&mut self, waiter: &Ticket, now_ms: u64) -> Result<i64, PolicyError> {
        let fitted = input::fit_ticket(waiter, self.limits.input_bytes());
        if fitted.is_some() {
            self.said_cut();
        }
        let t = fitted.as_ref().unwrap_or(waiter);
        self.call("rank", |l| l.queue.rank(&mut l.store, t, now_ms))
            .map_err(|mut e| {
                e.ticket = Some(TicketRef {
                    id: waiter.id.clone(),
                    labels: waiter.request.labels.clone(),
                });
                e
            })
    }

    fn on_wait(&mut self, state: &WaitState) -> Result<WaitDecision, PolicyError> {
        let fitted = input::fit_state(state, self.limits.input_bytes());
        if fitted.is_some() {
            self.said_cut();
        }
        let state = fitted.as_ref().unwrap_or(state);
        let d = self.call("on-wait", |l| l.queue.on_wait(&mut l.store, state))?;
        Ok(self.limits.sanitize_wait(d))
    }

    fn start_timeout_ms(&mut self, attempt: &StartAttempt) -> Result<u64, PolicyError> {
        let a = to_wit_attempt(attempt);
        let ms = self.call("start-timeout-ms", |l| {
            l.policy
                .cachelock_policy_dockerd_policy()
                .call_start_timeout_ms(&mut l.store, &a)
        })?;
        Ok(limits::sanitize_start_timeout(ms))
    }

    fn on_start_failure(
        &mut self,
        attempt: &StartAttempt,
        failure: &StartFailure,
        log_tail: &str,
    ) -> Result<RetryDecision, PolicyError> {
        let a = to_wit_attempt(attempt);
        let f = match failure {
            StartFailure::TimedOut(ms) => wit::StartFailure::TimedOut(*ms),
            StartFailure::Exited(c) => wit::StartFailure::Exited(*c),
        };
        // The tail's end is what matters (the last lines of the log): keep that part.
        let max = self.limits.input_bytes();
        let mut cut = log_tail.len().saturating_sub(max);
        while !log_tail.is_char_boundary(cut) {
            cut += 1;
        }
        let log_tail = &log_tail[cut..];
        let d = self.call("on-start-failure", |l| {
            l.policy
                .cachelock_policy_dockerd_policy()
                .call_on_start_failure(&mut l.store, &a, f, log_tail)
        })?;
        Ok(limits::sanitize_retry(match d {
            wit::RetryDecision::RetryAfter(ms) => RetryDecision::RetryAfter(ms),
            wit::RetryDecision::GiveUp(r) => RetryDecision::GiveUp(r),
        }))
    }

    fn stop_timeout_ms(&mut self, cache_id: Option<&str>) -> Result<u64, PolicyError> {
        let ms = self.call("stop-timeout-ms", |l| {
            l.policy
                .cachelock_policy_dockerd_policy()
                .call_stop_timeout_ms(&mut l.store, cache_id)
        })?;
        Ok(limits::sanitize_stop_timeout(ms))
    }
}

impl From<wit::Level> for Level {
    fn from(l: wit::Level) -> Self {
        match l {
            wit::Level::Trace => Level::Trace,
            wit::Level::Debug => Level::Debug,
            wit::Level::Info => Level::Info,
            wit::Level::Warn => Level::Warn,
            wit::Level::Error => Level::Error,
        }
    }
}

fn to_wit_attempt(a: &StartAttempt) -> wit::StartAttempt {
    wit::StartAttempt {
        attempt: a.attempt,
        cache_id: a.cache_id.clone(),
    }
}
