//! Building a workspace of policy components for `wasm32-wasip2` with a nested cargo, shared by
//! the build scripts of cachelock (the embedded built-ins in `policies/`) and of
//! `crates/test-programs/artifacts` (the test policies). Included by path in both.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The target every policy is built for.
pub const WASM_TARGET: &str = "wasm32-wasip2";

/// Builds the workspace at `workspace` (release, `--locked`) into `<top target dir>/<subdir>`,
/// registers its sources for rebuilds, and returns the directory holding the `.wasm` files.
pub fn build_workspace(workspace: &Path, subdir: &str) -> PathBuf {
    rerun_if_changed(&workspace.join("Cargo.toml"));
    rerun_if_changed(&workspace.join("Cargo.lock"));
    for entry in std::fs::read_dir(workspace).expect("workspace directory") {
        let dir = entry.unwrap().path();
        if dir.join("Cargo.toml").is_file() {
            rerun_if_changed(&dir.join("Cargo.toml"));
            rerun_if_changed(&dir.join("src"));
            if dir.join("wit").is_dir() {
                rerun_if_changed(&dir.join("wit"));
            }
        }
    }
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    let target_dir = top_target_dir(&out_dir).join(subdir);
    check_target_installed();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "--release", "--locked", "--target", WASM_TARGET])
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's settings (flags for the host target, its jobserver, profile, target
    // dir...) must not leak into the wasm build.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        // Keep what says where and how to fetch crates (home, offline mode, registries).
        let keep = key == "CARGO_HOME"
            || [
                "CARGO_NET_",
                "CARGO_HTTP_",
                "CARGO_REGISTRIES_",
                "CARGO_REGISTRY_",
            ]
            .iter()
            .any(|p| key.starts_with(p));
        let leaks = (key.starts_with("CARGO_") && !keep)
            || matches!(
                key.as_str(),
                "RUSTFLAGS"
                    | "RUSTDOCFLAGS"
                    | "RUSTC_WORKSPACE_WRAPPER"
                    | "TARGET"
                    | "HOST"
                    | "OPT_LEVEL"
                    | "PROFILE"
                    | "DEBUG"
                    | "OUT_DIR"
                    | "NUM_JOBS"
                    | "RUSTC_LINKER"
            );
        if leaks {
            cmd.env_remove(&key);
        }
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build {}: {e}", workspace.display()));
    if !status.success() {
        panic!(
            "building the policy components in {} for {WASM_TARGET} failed (see above); \
             if the target is missing: rustup target add {WASM_TARGET}",
            workspace.display()
        );
    }
    target_dir.join(WASM_TARGET).join("release")
}

/// Asks cargo to rerun the build script when `p` changes.
pub fn rerun_if_changed(p: &Path) {
    println!("cargo:rerun-if-changed={}", p.display());
}

/// The top-level target directory (the one with CACHEDIR.TAG above OUT_DIR), so the wasm build
/// is reused across profiles and by every build of the crate.
fn top_target_dir(out_dir: &Path) -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        if dir.is_absolute() {
            return dir;
        }
    }
    out_dir
        .ancestors()
        .find(|d| d.join("CACHEDIR.TAG").is_file())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| out_dir.to_path_buf())
}

/// Fails early, with the fix, when the wasm target's standard library is not installed.
fn check_target_installed() {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let Ok(out) = Command::new(rustc).args(["--print", "sysroot"]).output() else {
        return;
    };
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !sysroot.join("lib/rustlib").join(WASM_TARGET).is_dir() {
        panic!(
            "the Rust target {WASM_TARGET} is not installed; policies are compiled for it. \
             Install it with: rustup target add {WASM_TARGET} (`make setup` does)"
        );
    }
}
