//! Errors and the exit codes they map to (flock(1) and sysexits.h conventions).
//!
//! Every exit code cachelock can return is named in [`code`] and described once, in
//! [`EXIT_CODES`] (printed by `cachelock run --help`; the README's table is checked against it by
//! a test). An error carries the kind it ends with, so the place that detects a problem decides
//! how it is reported and nobody downstream has to guess.

use std::fmt;

/// The exit codes, named as in sysexits.h.
pub mod code {
    /// Lock not taken (`-n` conflict, `-w` timeout, a policy's give-up) unless `-E` says otherwise.
    pub const CONFLICT_DEFAULT: i32 = 1;
    /// Bad command line.
    pub const USAGE: i32 = 64;
    /// Bad input data (a scenario file, an argument's content).
    pub const DATAERR: i32 = 65;
    /// An input file does not exist or cannot be read (an image tar); a named lock nobody used.
    pub const NOINPUT: i32 = 66;
    /// A service is unavailable (dockerd missing or never became ready; no etcd endpoint
    /// answered within the bounded time).
    pub const UNAVAILABLE: i32 = 69;
    /// Internal error, or a policy fault under `on_error: fail`.
    pub const SOFTWARE: i32 = 70;
    /// An operating-system error (signal set-up, waiting for a child).
    pub const OSERR: i32 = 71;
    /// Something cannot be created: the lock directory, a cache root, a data root, a
    /// `policy new` folder (or one is a symlink or exists already).
    pub const CANTCREAT: i32 = 73;
    /// An I/O error on a lock or ticket file.
    pub const IOERR: i32 = 74;
    /// The lock was lost while the command ran (a lease not renewed in time): the command's
    /// process tree was stopped.
    pub const TEMPFAIL: i32 = 75;
    /// No permission (a cache root that is not writable).
    pub const NOPERM: i32 = 77;
    /// Bad configuration: YAML, policy modules, daemon.json.
    pub const CONFIG: i32 = 78;
    /// The command exists but could not be executed.
    pub const CANNOT_EXECUTE: i32 = 126;
    /// The command was not found.
    pub const NOT_FOUND: i32 = 127;
}

/// Every exit code and what it means, in the README's words (`code`, `meaning`).
pub const EXIT_CODES: &[(&str, &str)] = &[
    ("the command's", "the command ran; 128+N if signal N ended it"),
    ("1 (or `-E N`)", "lock not taken: `-n` conflict, `-w` timeout, the policy's `give-up`; Earthly drop-in: an EarthBuild flag this version does not know, or `EARTH(LY)_DOCKER_WRAPPER_DEBUG_CMD` ran (as Earthly's wrapper); `doctor`: a check found an error (a request would fail or be unsafe); `cache rm` of a root somebody holds"),
    ("64", "usage: bad option, bad lock name (`[A-Za-z0-9][A-Za-z0-9._-]{0,127}`), bad `KEY=VALUE`, bad `CACHELOCK_*` variable"),
    ("65", "bad data: a `policy simulate` scenario, a `policy test` file"),
    ("66", "an input file is missing, unreadable or not a regular file (`--load` tarball, never opened if it is a FIFO; scenario, no `*.test.yaml` for `policy test`); `status LOCK` of a lock nobody ever used; `cache rm ID` of a cache id with no root; a registry has no such `oci://` tag or manifest (404)"),
    ("69", "dockerd missing or never became ready (its whole log shown, 64 KiB at most); docker CLI or compose missing; a registry pull of the Earthly drop-in failed; no etcd endpoint answered within `etcd.unavailable_timeout` (default 10 s); the registry of an `oci://` policy is unreachable (connection, TLS, timeout, 5xx) and nothing verified is cached"),
    ("70", "a policy fault under `on_error: fail` (trap, fuel, memory, time limit), or an internal error"),
    ("71", "an operating-system error: signal handlers cannot be installed, the command cannot be waited for, `serve` cannot listen on its address"),
    ("73", "cannot create the lock directory, cache root, a data root or a `policy new` folder (or it is a symlink, or the folder exists); a private lock directory that is not the caller's own; a cache root, data root, `dockerd.run_dir` or `get-compose-config` directory that another user owns or can write (or that sits on a path another user can change); `serve` cannot bind its report socket (another `serve` receives there)"),
    ("74", "I/O error on a lock, ticket or metadata file (also: a symlink or FIFO planted in their place, `meta.lock` held for 30 s, a lock used by a newer on-disk format)"),
    ("75", "the lock was lost while the command ran (etcd: its lease could not be renewed in time); the command's whole process tree was stopped (SIGTERM, then SIGKILL) before the lease could expire"),
    ("77", "no permission (cache root not writable); a registry refused, or asked for, credentials (401/403)"),
    ("78", "bad configuration: YAML (file, line and key are named), policy module (missing, not a component, another world, an import the sandbox does not provide, sha256 mismatch, over the compile budget, `configure` error or time limit; an `oci://` artifact that is not a wasm component, unsigned, wrongly signed or tampered), daemon.json"),
    ("126 / 127", "the command cannot be executed / was not found"),
    ("128+N", "cachelock was ended by signal N while waiting (its ticket is removed)"),
];

/// What went wrong, and therefore which exit code it ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The lock was not taken; the code is the caller's `-E` value.
    Conflict(i32),
    Usage,
    DataErr,
    NoInput,
    Unavailable,
    Software,
    OsErr,
    CantCreate,
    IoErr,
    /// The lock was lost while the command ran (exit 75).
    LockLost,
    NoPerm,
    Config,
    CannotExecute,
    NotFound,
    /// Ended by this signal while waiting (exit 128+N); nothing is left queued or held.
    Signal(i32),
}

/// An error with a message meant for the user and the exit code it ends with.
#[derive(Debug, Clone)]
pub struct Error {
    /// Category, which fixes the exit code.
    pub kind: Kind,
    /// Complete sentence(s) for the user: what was wrong and, where possible, what to do.
    pub message: String,
}

/// Result type used throughout cachelock.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with `message`.
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
    /// Lock not taken; exits with the caller's conflict code.
    pub fn conflict(code: i32, message: impl Into<String>) -> Self {
        Self::new(Kind::Conflict(code), message)
    }
    /// Bad command line (64).
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(Kind::Usage, message)
    }
    /// Bad configuration (78).
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(Kind::Config, message)
    }
    /// Internal error or policy failure (70).
    pub fn software(message: impl Into<String>) -> Self {
        Self::new(Kind::Software, message)
    }
    /// I/O error (74).
    pub fn io(context: impl fmt::Display, err: std::io::Error) -> Self {
        Self::new(Kind::IoErr, format!("{context}: {err}"))
    }
    /// Cannot create a directory (73).
    pub fn cant_create(message: impl Into<String>) -> Self {
        Self::new(Kind::CantCreate, message)
    }

    /// The process exit code this error ends with.
    pub fn exit_code(&self) -> i32 {
        match self.kind {
            Kind::Conflict(c) => c,
            Kind::Usage => code::USAGE,
            Kind::DataErr => code::DATAERR,
            Kind::NoInput => code::NOINPUT,
            Kind::Unavailable => code::UNAVAILABLE,
            Kind::Software => code::SOFTWARE,
            Kind::OsErr => code::OSERR,
            Kind::CantCreate => code::CANTCREAT,
            Kind::IoErr => code::IOERR,
            Kind::LockLost => code::TEMPFAIL,
            Kind::NoPerm => code::NOPERM,
            Kind::Config => code::CONFIG,
            Kind::CannotExecute => code::CANNOT_EXECUTE,
            Kind::NotFound => code::NOT_FOUND,
            Kind::Signal(sig) => 128 + sig,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The row of [`EXIT_CODES`] that documents `code`.
    fn documented(code: i32) -> Option<&'static str> {
        EXIT_CODES.iter().map(|(c, _)| *c).find(|c| match code {
            1 => c.starts_with("1 "),
            126 | 127 => *c == "126 / 127",
            n if n > 128 => *c == "128+N",
            n => *c == n.to_string(),
        })
    }

    #[test]
    fn every_kind_is_documented() {
        let kinds = [
            Kind::Conflict(1),
            Kind::Usage,
            Kind::DataErr,
            Kind::NoInput,
            Kind::Unavailable,
            Kind::Software,
            Kind::OsErr,
            Kind::CantCreate,
            Kind::IoErr,
            Kind::LockLost,
            Kind::NoPerm,
            Kind::Config,
            Kind::CannotExecute,
            Kind::NotFound,
            Kind::Signal(15),
        ];
        for k in kinds {
            let c = Error::new(k, "").exit_code();
            assert!(
                documented(c).is_some(),
                "{k:?} exits {c}, which EXIT_CODES does not describe"
            );
        }
    }

    #[test]
    fn readme_table_is_exit_codes() {
        let readme = include_str!("../README.md");
        let table: Vec<(String, String)> = readme
            .split("### Exit codes")
            .nth(1)
            .expect("README has an `### Exit codes` section")
            .lines()
            .skip_while(|l| !l.starts_with("| code"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| {
                let cells: Vec<&str> = l.trim_matches('|').split(" | ").map(str::trim).collect();
                (cells[0].to_string(), cells[1..].join(" | "))
            })
            .collect();
        let want: Vec<(String, String)> = EXIT_CODES
            .iter()
            .map(|(c, m)| (c.to_string(), m.to_string()))
            .collect();
        assert_eq!(
            table, want,
            "README's exit code table differs from error::EXIT_CODES"
        );
    }
}
