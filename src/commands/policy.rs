//! `cachelock policy check|simulate|list|new`.

use crate::cli::PolicyCommand;
use crate::error::{Error, Result};

/// Runs a `cachelock policy` sub-command; returns the exit code.
pub fn execute(_cmd: PolicyCommand) -> Result<i32> {
    Err(Error::software("`cachelock policy` is not built yet"))
}
