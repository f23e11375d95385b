//! `builtin:priority`: rank = caller priority + label boosts + aging, so that nobody starves.
//!
//! Config: `aging_per_minute` (points per minute waited, fractional, default 1);
//! `boost.LABEL.VALUE: POINTS` (e.g. `boost.branch.main: 100`; VALUE `*` matches any value of
//! that label). Boosts of every matching entry add up.
use cachelock_policy_sdk::*;

struct Priority {
    aging_per_minute: f64,
    boosts: Vec<(String, String, i64)>,
}

impl Policy for Priority {
    fn configure(config: &Config) -> Result<Self, String> {
        let aging_per_minute: f64 = config.parse_or("aging_per_minute", 1.0)?;
        if !(aging_per_minute.is_finite() && aging_per_minute >= 0.0) {
            return Err("config `aging_per_minute`: must be a non-negative number".into());
        }
        let mut boosts = Vec::new();
        for (k, v) in config.entries() {
            if k == "aging_per_minute" {
                continue;
            }
            let Some(rest) = k.strip_prefix("boost.") else {
                return Err(format!(
                    "unknown config key `{k}` (known: aging_per_minute, boost.LABEL.VALUE)"
                ));
            };
            let Some((label, value)) = rest.split_once('.') else {
                return Err(format!("config `{k}`: expected boost.LABEL.VALUE"));
            };
            let points: i64 = v
                .trim()
                .parse()
                .map_err(|_| format!("config `{k}`: {v:?} is not a whole number of points"))?;
            boosts.push((label.to_string(), value.to_string(), points));
        }
        Ok(Priority {
            aging_per_minute,
            boosts,
        })
    }

    fn rank(&mut self, t: &Ticket, now_ms: u64) -> i64 {
        let waited = now_ms.saturating_sub(t.request.enqueued_at_ms);
        let aging = (waited as f64 * self.aging_per_minute / 60_000.0) as i64;
        let boost: i64 = self
            .boosts
            .iter()
            .filter(|(label, value, _)| {
                t.request
                    .labels
                    .iter()
                    .any(|(k, v)| k == label && (value == "*" || v == value))
            })
            .map(|(_, _, p)| *p)
            .fold(0i64, |a, b| a.saturating_add(b));
        (t.request.priority as i64)
            .saturating_add(boost)
            .saturating_add(aging)
    }
}

export_policy!(Priority);
