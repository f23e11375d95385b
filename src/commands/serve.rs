//! `cachelock serve`: the store from `--backend` / `--lock-dir` / the configuration, as
//! `status` finds it, served until SIGTERM (see `cachelock::serve`).

use cachelock::error::Result;
use cachelock::process::Signals;
use cachelock::serve::{self, Settings};

use crate::cli::ServeArgs;

/// Runs `cachelock serve`; returns the exit code.
pub fn execute(args: ServeArgs) -> Result<i32> {
    let (loaded, store, private_because) = crate::request::configured_store(&args.store)?;
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
