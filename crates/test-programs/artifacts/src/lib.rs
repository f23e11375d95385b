//! Where the test policies of `crates/test-programs` were built.

use std::path::{Path, PathBuf};

/// The component of test program crate `name` (`test-loop` → `test_loop.wasm`); panics, naming
/// the file, when it was not built.
pub fn component(name: &str) -> PathBuf {
    let p = Path::new(env!("TEST_PROGRAMS_DIR")).join(format!("{}.wasm", name.replace('-', "_")));
    assert!(p.is_file(), "{} was not built", p.display());
    p
}
