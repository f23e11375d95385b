//! What cachelock prints: logging set-up and the escaping of untrusted text here; progress
//! lines and status rendering in their own modules, so that user-facing text is found where it
//! is printed. These modules take plain view structs and know nothing of the engine.

pub mod progress;
pub mod status;

use std::io::IsTerminal;

/// Logs go to stderr. `CACHELOCK_LOG` takes a tracing filter (e.g. `cachelock=debug`);
/// otherwise `-v` raises the level from warnings to debug (`-vv`: trace). Colours only on a
/// terminal, and never with `NO_COLOR` set (CI logs stay plain).
pub fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("CACHELOCK_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| {
            EnvFilter::new(match verbose {
                0 => "warn",
                1 => "cachelock=debug,info",
                _ => "trace",
            })
        });
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .with_target(false)
        .without_time()
        .try_init();
}

/// Text from other users (labels, host names, queue keys) made safe to print on a terminal:
/// control characters (newlines, escape sequences) are shown as `\n`, `\u{1b}` and so on, so
/// that nobody can forge or hide lines of another user's status or progress output.
pub fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// "3 min", "2 h 5 min", "4 d 1 h": an age for people.
pub fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min", s / 60),
        3600..=86_399 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(super::escape("main"), "main");
        assert_eq!(
            super::escape("k=v\n  waiting: nobody\u{1b}[31m"),
            "k=v\\n  waiting: nobody\\u{1b}[31m"
        );
    }

    #[test]
    fn ages() {
        assert_eq!(super::age(59_000), "59 s");
        assert_eq!(super::age(7_500_000), "2 h 5 min");
        assert_eq!(super::age(90_000_000), "1 d 1 h");
    }
}
