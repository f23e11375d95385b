//! Errors and the exit codes they map to (flock(1) and sysexits.h conventions).
//!
//! Every exit code cachelock can return is listed in [`code`] and in the README's table; an
//! error carries the code it ends with, so the place that detects a problem decides how it is
//! reported and nobody downstream has to guess.

use std::fmt;

/// The exit codes, named as in sysexits.h.
pub mod code {
    /// Lock not taken (`-n` conflict, `-w` timeout, a policy's give-up) unless `-E` says otherwise.
    pub const CONFLICT_DEFAULT: i32 = 1;
    /// Bad command line.
    pub const USAGE: i32 = 64;
    /// Bad input data (a scenario file, an argument's content).
    pub const DATAERR: i32 = 65;
    /// An input file does not exist or cannot be read (an image tar).
    pub const NOINPUT: i32 = 66;
    /// A service is unavailable (dockerd missing or never became ready).
    pub const UNAVAILABLE: i32 = 69;
    /// Internal error, or a policy fault under `on_error: fail`.
    pub const SOFTWARE: i32 = 70;
    /// An operating-system error (fork, signals).
    pub const OSERR: i32 = 71;
    /// The lock directory (or a data root) cannot be created.
    pub const CANTCREAT: i32 = 73;
    /// An I/O error on a lock or ticket file.
    pub const IOERR: i32 = 74;
    /// No permission (a cache root that is not writable).
    pub const NOPERM: i32 = 77;
    /// Bad configuration: YAML, policy modules, daemon.json.
    pub const CONFIG: i32 = 78;
    /// The command exists but could not be executed.
    pub const CANNOT_EXECUTE: i32 = 126;
    /// The command was not found.
    pub const NOT_FOUND: i32 = 127;
}

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
