//! Host-side mirror of the types in `wit/policy.wit` (`cachelock:policy@0.1.0`).
//!
//! The engine, the dockerd wrapper and `policy simulate` speak these types; the WASM host
//! converts them to and from the generated bindings at the component boundary, so nothing
//! outside `src/policy/` depends on wasmtime. The queue types of the hot calls (`rank`,
//! `on-wait`) are lowered into the guest as they are (their canonical-ABI shape is derived here
//! and checked against the component's when it is instantiated): a look at a queue of N waiters
//! copies each string once, into the guest, and allocates nothing on the host.

use serde::{Deserialize, Serialize};

/// The world every policy must implement.
pub const WORLD: &str = "cachelock:policy/policy@0.1.0";

/// How a lock is requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(
    feature = "wasm",
    derive(wasmtime::component::ComponentType, wasmtime::component::Lower),
    component(enum)
)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Mode {
    /// One holder at a time (flock `LOCK_EX`).
    #[default]
    #[cfg_attr(feature = "wasm", component(name = "exclusive"))]
    Exclusive,
    /// Any number of shared holders, never beside an exclusive one (flock `LOCK_SH`).
    #[cfg_attr(feature = "wasm", component(name = "shared"))]
    Shared,
}

/// A request to take a lock, as recorded when it joined the queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(
    feature = "wasm",
    derive(wasmtime::component::ComponentType, wasmtime::component::Lower),
    component(record)
)]
pub struct Request {
    /// Lock name; in dockerd mode, the cache id.
    pub lock: String,
    /// Exclusive or shared.
    pub mode: Mode,
    /// `--priority`, default 0.
    pub priority: i32,
    /// `--label key=value`, in the order given.
    pub labels: Vec<(String, String)>,
    /// Host name of the requester (for people, never for liveness).
    pub host: String,
    /// Process id of the requester (for people, never for liveness).
    pub pid: u32,
    /// Unix milliseconds at which the request joined the queue. The engine keeps this strictly
    /// increasing in arrival order per lock (a hybrid logical clock), so ordering by it is
    /// ordering by arrival even across hosts whose clocks differ.
    #[cfg_attr(feature = "wasm", component(name = "enqueued-at-ms"))]
    pub enqueued_at_ms: u64,
    /// The caller's bound on waiting (`-w`); `-n` gives `Some(0)`.
    #[cfg_attr(feature = "wasm", component(name = "wait-limit-ms"))]
    pub wait_limit_ms: Option<u64>,
}

/// One process holding or waiting for a lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(
    feature = "wasm",
    derive(wasmtime::component::ComponentType, wasmtime::component::Lower),
    component(record)
)]
pub struct Ticket {
    /// Ticket id, unique per lock; ties in rank and arrival go to the smallest.
    pub id: String,
    /// The request behind it (its fields sit beside `id` when serialized: a store's ticket is
    /// one flat object).
    #[serde(flatten)]
    pub request: Request,
}

/// What a waiting request sees each time it is evaluated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(
    feature = "wasm",
    derive(wasmtime::component::ComponentType, wasmtime::component::Lower),
    component(record)
)]
pub struct WaitState {
    /// The waiting request.
    pub me: Ticket,
    /// Tickets holding the lock now.
    pub holders: Vec<Ticket>,
    /// Live waiters other than `me`, in no particular order.
    pub waiters: Vec<Ticket>,
    /// Milliseconds waited so far.
    #[cfg_attr(feature = "wasm", component(name = "waited-ms"))]
    pub waited_ms: u64,
    /// How many times `on_wait` was called for this request before.
    pub evaluations: u32,
    /// Host wall clock, Unix milliseconds.
    #[cfg_attr(feature = "wasm", component(name = "now-ms"))]
    pub now_ms: u64,
}

/// What to do while the lock is not ours.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(
    feature = "wasm",
    derive(wasmtime::component::ComponentType, wasmtime::component::Lift),
    component(variant)
)]
#[serde(rename_all = "kebab-case")]
pub enum WaitDecision {
    /// Keep waiting; evaluate again after at most this many milliseconds.
    #[cfg_attr(feature = "wasm", component(name = "keep-waiting"))]
    KeepWaiting(u64),
    /// Stop waiting and fail with this reason.
    #[cfg_attr(feature = "wasm", component(name = "give-up"))]
    GiveUp(String),
    /// Stop waiting and run without the shared lock, where the lock's rule allows it.
    #[cfg_attr(feature = "wasm", component(name = "fall-back"))]
    FallBack(String),
}

/// One attempt to start dockerd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartAttempt {
    /// 1 for the first attempt.
    pub attempt: u32,
    /// The cache id, or `None` for an ephemeral data root.
    pub cache_id: Option<String>,
}

/// Why dockerd did not become ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StartFailure {
    /// No answer to `/_ping` within the start timeout (milliseconds waited).
    TimedOut(u64),
    /// dockerd exited during start-up with this code (`None` if a signal ended it).
    Exited(Option<i32>),
}

/// What to do after a failed start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryDecision {
    /// Start dockerd again after this many milliseconds.
    RetryAfter(u64),
    /// Stop trying and fail with this reason.
    GiveUp(String),
}

/// Log level of a policy's `host.log` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}
