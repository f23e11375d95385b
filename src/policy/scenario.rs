//! `policy simulate` scenarios: a YAML description of holders, arrivals and their timing.
//! [`Scenario::parse`] is pure (no I/O) so that it can be fuzzed.
//!
//! ```yaml
//! lock: build            # lock name seen by the policy (default "sim")
//! start: 2024-06-08T10:00:00Z   # wall clock at t=0 (RFC 3339 or Unix ms; default 2023-11-14T22:13:20Z)
//! slots: 1               # exclusive holders at once (default 1)
//! fallback: true         # whether fall-back decisions are honoured (default false)
//! until_ms: 600000       # stop the simulation here (default 3600000)
//! step_ms: 100           # optional: advance time in steps of this size (default: event to event)
//! holders:               # holding the lock at t=0
//!   - {id: h1, release_at_ms: 5000}
//! arrivals:
//!   - {id: pr-1, at_ms: 0, priority: 0, labels: {branch: feature}, hold_ms: 1000}
//!   - {id: main, at_ms: 100, labels: {branch: main}, mode: exclusive, wait_limit_ms: 30000}
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;

use super::Mode;

/// A whole scenario.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Lock name passed to the policy.
    #[serde(default = "default_lock")]
    pub lock: String,
    /// The wall clock at t=0 (what policies see as `now-ms` and arrivals' `enqueued-at-ms`):
    /// an RFC 3339 time or Unix milliseconds.
    #[serde(default)]
    pub start: Option<Start>,
    /// How many exclusive holders at once.
    #[serde(default = "one")]
    pub slots: u32,
    /// Whether `fall-back` is honoured (else it is logged and the request keeps waiting).
    #[serde(default)]
    pub fallback: bool,
    /// End of the simulation, ms.
    #[serde(default = "default_until")]
    pub until_ms: u64,
    /// Optional time step: the clock advances in multiples of this (like a host that only
    /// looks every `step_ms`); absent or 0 = from event to event, exactly.
    #[serde(default)]
    pub step_ms: u64,
    /// Holding the lock at t=0.
    #[serde(default)]
    pub holders: Vec<Holder>,
    /// Requests joining the queue.
    #[serde(default)]
    pub arrivals: Vec<Arrival>,
}

/// A scenario's start: an RFC 3339 time (`2024-06-08T10:00:00Z`, `2024-06-08T12:00:00+02:00`)
/// or Unix milliseconds.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Start {
    /// Unix milliseconds.
    Ms(u64),
    /// RFC 3339.
    Time(String),
}

/// The start of a scenario that names none: 2023-11-14T22:13:20Z (any fixed value keeps runs
/// reproducible).
pub const DEFAULT_START_MS: u64 = 1_700_000_000_000;

/// A request holding the lock when the simulation starts.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Holder {
    /// Ticket id.
    pub id: String,
    /// When it releases the lock (ms); never if absent.
    pub release_at_ms: Option<u64>,
    /// Exclusive (default) or shared.
    #[serde(default)]
    pub mode: Mode,
    /// Priority.
    #[serde(default)]
    pub priority: i32,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A request joining the queue.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Arrival {
    /// Ticket id (unique in the scenario).
    pub id: String,
    /// When it joins (ms).
    #[serde(default)]
    pub at_ms: u64,
    /// `--priority`.
    #[serde(default)]
    pub priority: i32,
    /// `--label`s.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Exclusive (default) or shared.
    #[serde(default)]
    pub mode: Mode,
    /// The caller's `-w` bound (ms); `0` is `-n`.
    pub wait_limit_ms: Option<u64>,
    /// How long it holds the lock once served (default 1000 ms).
    #[serde(default = "default_hold")]
    pub hold_ms: u64,
}

fn default_lock() -> String {
    "sim".to_string()
}
fn one() -> u32 {
    1
}
fn default_until() -> u64 {
    3_600_000
}
fn default_hold() -> u64 {
    1000
}

/// Scenarios larger than this are refused (a simulation is for people to read).
pub const MAX_REQUESTS: usize = 10_000;

impl Scenario {
    /// The wall clock at t=0, Unix milliseconds.
    pub fn start_ms(&self) -> u64 {
        match &self.start {
            None => DEFAULT_START_MS,
            Some(Start::Ms(ms)) => *ms,
            Some(Start::Time(t)) => rfc3339_ms(t).unwrap_or(DEFAULT_START_MS),
        }
    }

    /// Parses and validates YAML; the error names the line and the key.
    pub fn parse(text: &str) -> Result<Scenario, String> {
        if text.trim().is_empty() {
            return Err("the scenario is empty: give at least `arrivals:`".into());
        }
        let s: Scenario = crate::config::parse_yaml(text)?;
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> Result<(), String> {
        if let Some(Start::Time(t)) = &self.start {
            if rfc3339_ms(t).is_none() {
                return Err(format!(
                    "key `start`: {:?} is not an RFC 3339 time after 1970 (e.g. 2024-06-08T10:00:00Z or 2024-06-08T12:00:00+02:00) nor Unix milliseconds",
                    t.chars().take(64).collect::<String>()
                ));
            }
        }
        if self.slots == 0 {
            return Err("key `slots`: must be at least 1".into());
        }
        if self.holders.len() + self.arrivals.len() > MAX_REQUESTS {
            return Err(format!(
                "too many holders and arrivals (at most {MAX_REQUESTS})"
            ));
        }
        let mut seen = std::collections::HashSet::new();
        let ids = self
            .holders
            .iter()
            .map(|h| &h.id)
            .chain(self.arrivals.iter().map(|a| &a.id));
        for id in ids {
            if id.is_empty() {
                return Err("every holder and arrival needs a non-empty `id`".into());
            }
            if !seen.insert(id) {
                return Err(format!("id {id:?} is used twice"));
            }
        }
        let exclusive_holders = self
            .holders
            .iter()
            .filter(|h| h.mode == Mode::Exclusive)
            .count();
        if exclusive_holders > self.slots as usize
            || (exclusive_holders > 0 && exclusive_holders < self.holders.len())
        {
            return Err(format!(
                "key `holders`: {} holders cannot hold a lock with {} slot(s) at once \
                 (exclusive holders: at most `slots`, never beside shared ones)",
                self.holders.len(),
                self.slots
            ));
        }
        Ok(())
    }
}

/// Unix milliseconds of an RFC 3339 time: `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`, at or after
/// 1970; `None` if it is not one.
pub fn rfc3339_ms(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let d = b.get(from..from + len)?;
        d.iter()
            .all(u8::is_ascii_digit)
            .then(|| d.iter().fold(0i64, |n, c| n * 10 + (c - b'0') as i64))
    };
    let sep = |at: usize, ok: &[u8]| b.get(at).is_some_and(|c| ok.contains(c));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (y, mo, d) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (h, mi, sec) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&mo) || d < 1 || d > month_days[(mo - 1) as usize] {
        return None;
    }
    if h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_ms = 0i64;
    if sep(i, b".") {
        i += 1;
        let digits = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        for k in 0..3 {
            frac_ms = frac_ms * 10
                + b.get(i + k)
                    .filter(|_| k < digits)
                    .map_or(0, |c| (c - b'0') as i64);
        }
        i += digits;
    }
    let offset_min = match b.get(i) {
        Some(b'Z' | b'z') if b.len() == i + 1 => 0,
        Some(c @ (b'+' | b'-')) if b.len() == i + 6 && sep(i + 3, b":") => {
            let (oh, om) = (num(i + 1, 2)?, num(i + 4, 2)?);
            if oh > 23 || om > 59 {
                return None;
            }
            (oh * 60 + om) * if *c == b'-' { -1 } else { 1 }
        }
        _ => return None,
    };
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
    let (y, m) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = ((days * 24 + h) * 60 + mi) * 60 + sec - offset_min * 60;
    u64::try_from(secs * 1000 + frac_ms).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_reports_lines() {
        let s = Scenario::parse(
            "holders:\n  - {id: h, release_at_ms: 10}\narrivals:\n  - {id: a, at_ms: 1, labels: {branch: main}}\n",
        )
        .unwrap();
        assert_eq!(s.arrivals[0].labels["branch"], "main");
        assert_eq!(s.arrivals[0].hold_ms, 1000);
        let e = Scenario::parse("arrivals:\n  - id: a\n    at_ms: soon\n").unwrap_err();
        assert!(e.contains("line 3") && e.contains("at_ms"), "{e}");
        let e = Scenario::parse("arrivals:\n  - {id: a}\n  - {id: a}\n").unwrap_err();
        assert!(e.contains("twice"), "{e}");
        assert!(Scenario::parse("bogus: 1\n").unwrap_err().contains("bogus"));
        let e = Scenario::parse("start: next saturday\narrivals: []\n").unwrap_err();
        assert!(e.contains("start") && e.contains("RFC 3339"), "{e}");
        assert!(Scenario::parse(" \n").unwrap_err().contains("empty"));
    }

    #[test]
    fn start_times() {
        assert_eq!(rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(rfc3339_ms("2023-11-14T22:13:20Z"), Some(DEFAULT_START_MS));
        assert_eq!(
            rfc3339_ms("2024-06-08T10:00:00.25Z"),
            Some(1_717_840_800_250)
        );
        assert_eq!(
            rfc3339_ms("2024-06-08T12:00:00+02:00"),
            Some(1_717_840_800_000)
        );
        assert_eq!(rfc3339_ms("2024-02-29T00:00:00Z"), Some(1_709_164_800_000));
        for bad in [
            "2023-02-29T00:00:00Z",
            "2024-06-08",
            "2024-06-08T10:00:00",
            "1969-12-31T23:59:59Z",
            "2024-13-01T00:00:00Z",
            "2024-06-08T10:00:00+2:00",
        ] {
            assert_eq!(rfc3339_ms(bad), None, "{bad}");
        }
        let s = Scenario::parse("start: 2024-06-08T10:00:00Z\narrivals: []\n").unwrap();
        assert_eq!(s.start_ms(), 1_717_840_800_000);
        let s = Scenario::parse("start: 1000\narrivals: []\n").unwrap();
        assert_eq!(s.start_ms(), 1000);
        assert_eq!(
            Scenario::parse("arrivals: []\n").unwrap().start_ms(),
            DEFAULT_START_MS
        );
    }
}
