//! One module per sub-command: each builds on a `LockRequest` (or its own arguments), calls the
//! library and returns the exit code.

pub mod cache;
pub mod dockerd;
pub mod docs;
pub mod doctor;
pub mod earthly;
pub mod policy;
#[cfg(feature = "oci")]
pub mod policy_oci;
pub mod policy_test;
pub mod run;
pub mod serve;
pub mod status;
