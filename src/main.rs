//! The `cachelock` binary: parse the command line, dispatch to one sub-command, print an error
//! and exit with its code. The only place errors become exit codes.

mod cli;
mod commands;
mod request;

use std::ffi::OsString;
use std::io::Write;
use std::path::Path;

use clap::Parser;

use cachelock::error::code;
use cli::{Cli, Command};

/// The allocator of both builds. musl's own hands freed memory back to the kernel at once, so
/// the static binary faulted the same pages in again and again; mimalloc keeps what it got (see
/// `keep_freed_memory`). It is built without transparent huge pages (feature `no_thp`): a
/// process that needs a few hundred KiB of heap spent a third of its start zeroing 2 MiB pages.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` of mimalloc's C API (a stable option: its number does not change).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// Never return freed memory to the kernel: a `cachelock` process is short-lived or waits with
/// a small, steady heap, and purging at exit cost system calls for nothing.
fn keep_freed_memory() {
    // SAFETY: mimalloc's documented way to set an option; it only stores the value.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

fn main() {
    keep_freed_memory();
    // A command under an etcd lease runs below this binary re-executed as its guardian.
    cachelock::process::guardian::run_if_invoked();
    std::process::exit(run());
}

fn run() -> i32 {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    // Installed as Earthly's `dockerd-wrapper.sh`, the binary is the Earthly drop-in.
    let invoked_as = args.first().and_then(|a| Path::new(a).file_name());
    if invoked_as == Some("dockerd-wrapper.sh".as_ref()) {
        args.insert(1, OsString::from("earthly"));
    }
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                // Usage errors exit 64 (not clap's 2), as flock(1) and sysexits.h do.
                _ => code::USAGE,
            };
        }
    };
    let service = matches!(cli.command, Command::Serve(_));
    cachelock::output::init_logging(cli.verbose, service);
    // What only prints ends quietly when its reader goes (`cachelock status | head`), as cat
    // does; what runs a command under a lock must outlive a closed pipe, to release the lock.
    if matches!(
        cli.command,
        Command::Status(_)
            | Command::Policy(_)
            | Command::Cache(_)
            | Command::Completions { .. }
            | Command::Man
    ) {
        cachelock::sys::default_sigpipe();
    }
    let result = match cli.command {
        Command::Run(a) => commands::run::execute(a),
        Command::Status(a) => commands::status::execute(a),
        Command::Serve(a) => commands::serve::execute(a),
        Command::Policy(p) => commands::policy::execute(p),
        Command::Dockerd(a) => commands::dockerd::execute(a),
        Command::Cache(c) => commands::cache::execute(c),
        Command::Earthly(a) => commands::earthly::execute(a),
        Command::Doctor(a) => commands::doctor::execute(a),
        Command::Completions { shell } => commands::docs::completions(shell),
        Command::Man => commands::docs::man(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // Not eprintln!, which panics when stderr is gone.
            let _ = writeln!(std::io::stderr(), "cachelock: {e}");
            e.exit_code()
        }
    }
}
