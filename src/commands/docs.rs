//! `cachelock completions SHELL` and `cachelock man`: generated from the clap definitions, so
//! they never drift from the real options.

use clap::CommandFactory;

use crate::cli::Cli;
use cachelock::error::{Error, Result};

/// Prints the completion script for `shell`.
pub fn completions(shell: clap_complete::Shell) -> Result<i32> {
    clap_complete::generate(
        shell,
        &mut Cli::command(),
        "cachelock",
        &mut std::io::stdout(),
    );
    Ok(0)
}

/// Prints the man page (roff).
pub fn man() -> Result<i32> {
    clap_mangen::Man::new(Cli::command())
        .render(&mut std::io::stdout())
        .map_err(|e| Error::io("writing the man page", e))?;
    Ok(0)
}
