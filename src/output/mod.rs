//! What cachelock prints: logging set-up and the escaping of untrusted text here; progress
//! lines and status rendering in their own modules, so that user-facing text is found where it
//! is printed. These modules take plain view structs and know nothing of the engine.

pub mod progress;
pub mod status;

use std::io::IsTerminal;

/// Logs go to stderr. `CACHELOCK_LOG` takes a tracing filter (e.g. `cachelock=debug`);
/// otherwise `-v` raises the level from warnings (a long-running service's `info`) to debug
/// (`-vv`: trace). Colours only on a terminal, and never with `NO_COLOR` set (CI logs and
/// journald stay plain).
pub fn init_logging(verbose: u8, service: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("CACHELOCK_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| {
            EnvFilter::new(match verbose {
                0 if service => "cachelock=info,warn",
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

/// Unix milliseconds as an RFC 3339 UTC time with milliseconds (`2025-01-31T12:03:04.567Z`):
/// what status and records show beside durations.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(
            super::rfc3339(1_735_689_599_999),
            "2024-12-31T23:59:59.999Z"
        );
    }

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
