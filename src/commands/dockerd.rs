//! `cachelock dockerd`.

use crate::cli::DockerdArgs;
use crate::error::{Error, Result};

/// Runs `cachelock dockerd`; returns the exit code.
pub fn execute(_args: DockerdArgs) -> Result<i32> {
    Err(Error::software("`cachelock dockerd` is not built yet"))
}
