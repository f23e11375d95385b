//! Lock names: `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`, checked before any file is opened.

use crate::error::{Error, Result};

/// Longest accepted lock name.
pub const MAX_LEN: usize = 128;

/// Returns `Ok(())` when `name` is a valid lock name, else a usage error that says why.
pub fn validate(name: &str) -> Result<()> {
    let shown: String = name.chars().take(40).collect();
    let shown = if name.chars().count() > 40 {
        format!("{shown:?}...")
    } else {
        format!("{shown:?}")
    };
    let bytes = name.as_bytes();
    let problem = if bytes.is_empty() {
        Some("it is empty".to_string())
    } else if bytes.len() > MAX_LEN {
        Some(format!(
            "it is {} bytes long (at most {MAX_LEN})",
            bytes.len()
        ))
    } else if !bytes[0].is_ascii_alphanumeric() {
        Some("it must start with a letter or digit".to_string())
    } else {
        bytes
            .iter()
            .find(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')))
            .map(|b| format!("it contains {:?}", *b as char))
    };
    match problem {
        None => Ok(()),
        Some(why) => Err(Error::usage(format!(
            "invalid lock name {shown}: {why}; lock names match [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::validate;

    #[test]
    fn accepts_and_refuses() {
        for ok in ["a", "A0", "build-cache_1.x", &"a".repeat(128)] {
            assert!(validate(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "/",
            "a/b",
            ".hidden",
            "-x",
            "a\0b",
            "sp ace",
            &"a".repeat(129),
            "é",
        ] {
            assert!(validate(bad).is_err(), "{bad:?}");
        }
    }
}
