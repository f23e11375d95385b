//! `cachelock doctor`: the host's checks (`cachelock::doctor`) in the order a request meets
//! them — configuration, lock store, policies and their compile cache, dockerd — printed one
//! line each, or as JSON. Exit 1 when any is an error. Nothing is created or changed.

use std::path::PathBuf;

use cachelock::config::{self, DefaultLockDir, Loaded};
use cachelock::doctor::{self, DirFacts, DirRole, Finding, Level, Report};
use cachelock::error::Result;
use cachelock::lock::Store;

use crate::cli::DoctorArgs;

/// Runs `cachelock doctor`; returns the exit code.
pub fn execute(args: DoctorArgs) -> Result<i32> {
    let mut report = Report::default();
    let (finding, loaded) = doctor::config(args.store.config.as_deref());
    report.extend([finding]);
    let parsed = loaded.is_some();
    let loaded = loaded.unwrap_or_else(Loaded::default);
    // The host's shared directory is looked at, never created (nor a private one).
    let system = || {
        Ok(DefaultLockDir {
            path: PathBuf::from(config::SYSTEM_LOCK_DIR),
            private_because: None,
        })
    };
    match crate::request::store_with(
        args.store.backend.as_deref(),
        args.store.lock_dir.as_deref(),
        &loaded,
        system,
    ) {
        Ok((Store::Dir { path, .. }, _)) => {
            let role = if path == std::path::Path::new(config::SYSTEM_LOCK_DIR) {
                DirRole::SystemDefault
            } else {
                DirRole::Configured
            };
            report.extend(doctor::lock_dir(
                &DirFacts::read(&path),
                role,
                loaded.config.wait_mode,
            ));
        }
        Ok((Store::Etcd(s), _)) => report.extend(doctor::etcd(&s)),
        Err(e) => report.extend([Finding::error(
            "lock_dir",
            "store",
            format!("{e}: every request fails (exit {})", e.exit_code()),
        )]),
    }
    if parsed {
        report.extend(doctor::compile_caches(&loaded));
        report.extend(doctor::policies(&loaded));
    }
    let cache_root = args.cache_root.clone().or_else(|| {
        loaded
            .config
            .cache_root
            .as_deref()
            .map(|p| loaded.resolve_path(p))
    });
    report.extend(doctor::dockerd(&loaded, cache_root.as_deref()));
    if args.json {
        print!("{}", report.render_json());
    } else {
        print!("{}", report.render_text());
    }
    Ok(if report.count(Level::Error) > 0 { 1 } else { 0 })
}
