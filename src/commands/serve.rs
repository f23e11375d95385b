//! `cachelock serve`: the store from `--backend` / `--lock-dir` / the configuration, as
//! `status` finds it, served until SIGTERM (see `cachelock::serve`).

use cachelock::config::Loaded;
use cachelock::error::Result;
use cachelock::process::Signals;
use cachelock::serve::{self, Settings};

use crate::cli::ServeArgs;

/// Runs `cachelock serve`; returns the exit code.
pub fn execute(args: ServeArgs) -> Result<i32> {
    let loaded = Loaded::load(args.store.config.as_deref())?;
    let (store, private_because) = crate::request::store(
        args.store.backend.as_deref(),
        args.store.lock_dir.as_deref(),
        &loaded,
    )?;
    let signals = Signals::install()?;
    serve::run(
        Settings {
            listen: args.listen,
            store,
            loaded,
            private_because,
            cache_root: args.cache_root,
        },
        &signals,
    )?;
    Ok(0)
}
