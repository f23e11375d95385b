//! `cachelock status`.

use crate::cli::StatusArgs;
use crate::error::{Error, Result};

/// Runs `cachelock status`; returns the exit code.
pub fn execute(_args: StatusArgs) -> Result<i32> {
    Err(Error::software("`cachelock status` is not built yet"))
}
