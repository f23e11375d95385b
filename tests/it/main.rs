//! The integration tests: one binary (wasmtime links once), one module per area, real parts
//! throughout — real processes on real lock files, real WebAssembly components, a real dockerd.
//! `cargo test --test it MODULE::` runs one area, e.g. `cargo test --test it engine_cli::`.

mod support;

mod buildkitd_image;
mod conformance;
mod deb;
mod dockerd_bad_input;
mod dockerd_beyond;
mod dockerd_cache;
mod dockerd_earthly;
mod dockerd_lifecycle;
mod doctor;
mod engine_cli;
mod engine_kill;
mod engine_queue;
mod etcd;
mod observe;
mod policy_commands;
mod policy_faults;
mod policy_oci;
mod policy_python;
mod policy_runtime;
mod policy_security;
mod security;
mod torture;
mod torture_dockerd;
