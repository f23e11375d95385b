//! The built-in policies (`builtin:default`, `builtin:priority`, `builtin:deadline`): compiled
//! from `policies/` for wasm32-wasip2 by `build.rs` and embedded in the binary.

include!(concat!(env!("OUT_DIR"), "/builtins.rs"));

/// An embedded policy module.
#[derive(Debug, Clone, Copy)]
pub struct Builtin {
    /// Name after `builtin:`.
    pub name: &'static str,
    /// The component's bytes.
    pub bytes: &'static [u8],
    /// Hex sha256 of `bytes`, computed at build time (the compile-cache key).
    pub sha256: &'static str,
}

/// The built-in called `name` (without the `builtin:` prefix).
pub fn get(name: &str) -> Option<Builtin> {
    BUILTINS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|&(name, bytes, sha256)| Builtin {
            name,
            bytes,
            sha256,
        })
}

/// Names of all built-ins.
pub fn names() -> impl Iterator<Item = &'static str> {
    BUILTINS.iter().map(|(n, _, _)| *n)
}
