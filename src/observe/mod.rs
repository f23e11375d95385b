//! Observability: what requests tell, and what is made of it.
//!
//! - Requests are observed through the engine's one seam, [`crate::lock::events`]:
//!   [`notify::ServeLink`] sends a running `serve` a [`report::Report`] at each arrival,
//!   acquisition and end (lock directories; over etcd `serve` learns the same from the store's
//!   watch), and [`log::RequestLog`] appends one JSON line per finished request
//!   (`request_log:`). [`attach`] gives a request its observers.
//! - [`status::StatusReader`] reads the status document (`status`, `status --watch`, `serve`).
//! - [`metrics`] is the metric contract and its exposition; [`watch`] follows a store's changes
//!   (`status --watch`, `serve`).
//!
//! An uncontended request pays one failed `openat` when nobody serves and nothing is logged.

pub mod log;
pub mod metrics;
pub mod notify;
pub mod report;
pub mod status;
pub mod watch;

use std::sync::Arc;

pub use report::{Moment, Report};

use crate::config::Loaded;
use crate::lock::{Observers, Store};

/// Adds the observers of a request on `store` under configuration `loaded` to `o`: the
/// `serve` of its lock directory, if one runs there, and the request log, if one is configured.
pub fn attach(o: &mut Observers, store: &Store, loaded: &Loaded) {
    if let Store::Dir { path, .. } = store {
        if let Some(link) = notify::ServeLink::connect(path) {
            o.push(Arc::new(link));
        }
    }
    if let Some(spec) = log_spec(loaded) {
        o.push(Arc::new(log::RequestLog::new(spec)));
    }
}

/// The request log the configuration asks for, if any.
pub fn log_spec(loaded: &Loaded) -> Option<log::LogSpec> {
    let c = &loaded.config;
    let path = c.request_log.as_deref()?;
    Some(log::LogSpec {
        path: loaded.resolve_path(path),
        max_bytes: c.request_log_max_size.unwrap_or(64 << 20),
        keep: c.request_log_keep.unwrap_or(3),
        file_mode: c
            .file_mode
            .unwrap_or(crate::lock::flock::dir::DEFAULT_FILE_MODE),
    })
}
