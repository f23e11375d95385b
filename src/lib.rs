//! cachelock: fair, priority-aware flock locks for shared build caches.
//!
//! A lock request flows [`cli`] → [`config`] → [`lock`] (the engine: kernel flock for safety,
//! a ticket queue for order) → [`policy`] (every timeout, retry and priority decision, made by a
//! sandboxed WebAssembly component). [`dockerd`] runs one Docker daemon per locked data root.

pub mod cli;
pub mod commands;
pub mod config;
pub mod dockerd;
pub mod error;
pub mod lock;
pub mod output;
pub mod policy;
pub mod process;
