//! cachelock: fair, priority-aware locks for shared build caches.
//!
//! A lock request flows from the binary's `LockRequest` (command line + [`config`] +
//! environment) → [`lock`] (the engine: a ticket queue for order, a [`lock::backend::Backend`]
//! for exclusion) → [`policy`] (every timeout, retry and priority decision, made by a sandboxed
//! WebAssembly component). [`dockerd`] runs one Docker daemon per locked data root;
//! [`process`] runs a command so that the lock covers it; [`output`] renders what people read;
//! [`sys`] is the one system-call layer. The library knows nothing of the command line.

/// This build's version, recorded in tickets and request records.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub mod config;
pub mod dockerd;
pub mod doctor;
pub mod error;
pub mod lock;
pub mod observe;
pub mod output;
pub mod policy;
pub mod process;
pub mod serve;
pub mod sys;
