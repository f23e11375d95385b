//! `cachelock earthly`.

use crate::cli::EarthlyArgs;
use crate::error::{Error, Result};

/// Runs `cachelock earthly`; returns the exit code.
pub fn execute(_args: EarthlyArgs) -> Result<i32> {
    Err(Error::software("`cachelock earthly` is not built yet"))
}
