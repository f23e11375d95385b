//! One module per sub-command: each turns parsed arguments into calls on the library and
//! returns the process exit code.

pub mod dockerd;
pub mod earthly;
pub mod policy;
pub mod run;
pub mod status;
