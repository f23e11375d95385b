//! Builds the test policies in `crates/test-programs` for wasm32-wasip2 and exports their
//! directory as `TEST_PROGRAMS_DIR`.

#[path = "../../../build-support/wasm.rs"]
mod wasm;

use std::path::PathBuf;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let top = manifest_dir.join("../../..");
    wasm::rerun_if_changed(&top.join("wit"));
    wasm::rerun_if_changed(&top.join("policies/sdk"));
    wasm::rerun_if_changed(&top.join("build-support"));
    let dir = wasm::build_workspace(&manifest_dir.join(".."), "test-programs");
    println!("cargo:rustc-env=TEST_PROGRAMS_DIR={}", dir.display());
}
