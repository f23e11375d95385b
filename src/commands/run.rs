//! `cachelock run`.

use crate::cli::RunArgs;
use crate::error::{Error, Result};

/// Runs `cachelock run`; returns the exit code.
pub fn execute(_args: RunArgs) -> Result<i32> {
    Err(Error::software("`cachelock run` is not built yet"))
}
