//! `policy simulate` scenarios: a YAML description of holders, arrivals and their timing.
//! [`Scenario::parse`] is pure (no I/O) so that it can be fuzzed.
//!
//! ```yaml
//! lock: build            # lock name seen by the policy (default "sim")
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
    /// Parses and validates YAML; the error names the line and the key.
    pub fn parse(text: &str) -> Result<Scenario, String> {
        if text.trim().is_empty() {
            return Err("the scenario is empty: give at least `arrivals:`".into());
        }
        let de = serde_yaml::Deserializer::from_str(text);
        let s: Scenario = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let at = inner
                .location()
                .map(|l| format!("line {} column {}: ", l.line(), l.column()))
                .unwrap_or_default();
            if key.is_empty() || key == "." {
                format!("{at}{inner}")
            } else {
                format!("{at}key `{key}`: {inner}")
            }
        })?;
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> Result<(), String> {
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
        assert!(Scenario::parse(" \n").unwrap_err().contains("empty"));
    }
}
