//! The metric contract of `cachelock serve` (`GET /metrics`) and its exposition, in the
//! Prometheus text format 0.0.4 and in OpenMetrics 1.0.0.
//!
//! Counters and histograms count [`Report`]s — what every request did while `serve` ran —;
//! gauges are read from the latest look at the store. Label names are only `lock`, `outcome`,
//! `policy`, `digest`, `cache_id` and `le`; their values are bounded in number (see
//! [`MAX_LOCKS`], [`MAX_POLICIES_PER_LOCK`]): never a ticket, a pid, a job key or a label's
//! free text. The README lists every metric.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::report::{Moment, Report};
use crate::lock::events::Outcome;

/// Histogram buckets (seconds): from a millisecond (an uncontended run) to two hours (a
/// queue of long builds), about three per decade.
pub const BUCKETS: [f64; 22] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
];

/// Most locks counted: reports for further lock names are refused (and counted as refused).
pub const MAX_LOCKS: usize = 2000;
/// Most (policy, digest) pairs kept per lock (the oldest goes).
pub const MAX_POLICIES_PER_LOCK: usize = 8;
/// Most policy names counted in `cachelock_policy_faults_total`.
const MAX_FAULT_POLICIES: usize = 256;

/// Which exposition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`.
    Text,
    /// `application/openmetrics-text; version=1.0.0`.
    OpenMetrics,
}

impl Format {
    /// The format a scraper asks for in its `Accept` header.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    /// The response's `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// A cumulative histogram over [`BUCKETS`].
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    /// Observations at or below each bound (not cumulative here; summed when written).
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    /// Adds one observation.
    pub fn observe(&mut self, seconds: f64) {
        let s = seconds.max(0.0);
        if let Some(i) = BUCKETS.iter().position(|b| s <= *b) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum += s;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count
    }
}

/// What is counted of one lock.
#[derive(Debug, Clone, Default)]
struct LockCounts {
    requests: [u64; Outcome::ALL.len()],
    wait: Histogram,
    hold: Histogram,
    /// (policy, digest) pairs seen, oldest first.
    policies: Vec<(String, String)>,
}

/// One lock's gauges, from a look at the store.
#[derive(Debug, Clone, Default)]
pub struct LockGauges {
    /// Lock name.
    pub lock: String,
    /// Live waiters.
    pub waiters: usize,
    /// Live holders.
    pub holders: usize,
    /// Seconds the longest waiter has waited (0 when nobody waits).
    pub oldest_wait_seconds: f64,
    /// The latest generation.
    pub generation: u64,
}

/// One cached data root.
#[derive(Debug, Clone)]
pub struct CacheGauge {
    /// The cache id.
    pub cache_id: String,
    /// Its size on disk.
    pub bytes: u64,
    /// Its last use (Unix ms).
    pub last_used_ms: u64,
}

/// The counts `serve` keeps.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    locks: BTreeMap<String, LockCounts>,
    faults: BTreeMap<String, u64>,
    /// Reports that requests could not deliver (as their later reports said).
    pub reports_lost: u64,
    /// Reports refused: malformed, oversized, over a bound, or of a lock that does not exist.
    pub reports_refused: u64,
    /// Reports counted.
    pub reports: u64,
    /// Changes of the store its watch could not follow (etcd: compacted before they were read).
    pub store_missed: u64,
}

impl Tally {
    /// Whether `lock` is counted already, or may be.
    pub fn admits(&self, lock: &str) -> bool {
        self.locks.contains_key(lock) || self.locks.len() < MAX_LOCKS
    }

    fn lock(&mut self, lock: &str) -> &mut LockCounts {
        self.locks.entry(lock.to_string()).or_default()
    }

    /// Notes that requests of `lock` run `policy` (module `digest`, if known).
    pub fn policy_seen(&mut self, lock: &str, policy: &str, digest: Option<&str>) {
        if !self.admits(lock) {
            return;
        }
        let l = self.lock(lock);
        let pair = (policy.to_string(), digest.unwrap_or_default().to_string());
        if let Some(i) = l.policies.iter().position(|x| *x == pair) {
            let p = l.policies.remove(i);
            l.policies.push(p);
        } else {
            if l.policies.len() >= MAX_POLICIES_PER_LOCK {
                l.policies.remove(0);
            }
            l.policies.push(pair);
        }
    }

    /// Counts one report (the caller checked [`Tally::admits`]).
    pub fn count(&mut self, r: &Report) {
        self.reports += 1;
        self.reports_lost += r.dropped as u64;
        if let Some(p) = &r.policy {
            self.policy_seen(&r.lock, p, r.digest.as_deref());
        }
        let l = self.lock(&r.lock);
        match r.moment {
            Moment::Arrived => {}
            Moment::Acquired => l.wait.observe(r.waited_ms.unwrap_or(0) as f64 / 1000.0),
            Moment::Finished => {
                if let Some(o) = r.outcome {
                    let i = Outcome::ALL.iter().position(|x| *x == o).expect("listed");
                    l.requests[i] += 1;
                }
                if let Some(h) = r.held_ms {
                    l.hold.observe(h as f64 / 1000.0);
                }
                if r.faults > 0 {
                    if let Some(p) = &r.policy {
                        if self.faults.contains_key(p) || self.faults.len() < MAX_FAULT_POLICIES {
                            *self.faults.entry(p.clone()).or_default() += r.faults as u64;
                        }
                    }
                }
            }
        }
    }

    /// Counts a request that ended without saying how (its process died; its lease expired).
    pub fn vanished(&mut self, lock: &str, outcome: Outcome) {
        let i = Outcome::ALL
            .iter()
            .position(|x| *x == outcome)
            .expect("listed");
        self.lock(lock).requests[i] += 1;
    }

    /// Requests of `lock` that ended as `outcome` (tests, the dashboard).
    pub fn requests(&self, lock: &str, outcome: Outcome) -> u64 {
        let i = Outcome::ALL
            .iter()
            .position(|x| *x == outcome)
            .expect("listed");
        self.locks.get(lock).map_or(0, |l| l.requests[i])
    }

    /// Acquisitions of `lock` whose wait was observed.
    pub fn acquisitions(&self, lock: &str) -> u64 {
        self.locks.get(lock).map_or(0, |l| l.wait.count())
    }

    /// Makes `lock` known (with every count at zero), e.g. when the store shows it.
    pub fn know(&mut self, lock: &str) {
        if self.admits(lock) {
            self.lock(lock);
        }
    }

    /// Writes the whole exposition: counts, `gauges` (from the store), `cache`, and `serve`'s
    /// own counts.
    pub fn render(&self, format: Format, gauges: &[LockGauges], cache: &[CacheGauge]) -> String {
        let mut w = Writer {
            out: String::with_capacity(4096 + self.locks.len() * 4096),
            format,
        };
        w.family(
            "cachelock_requests_total",
            "counter",
            "Requests that ended while serve ran, by how they ended (acquired: held and released the lock).",
        );
        for (lock, c) in &self.locks {
            for (i, o) in Outcome::ALL.iter().enumerate() {
                w.sample(
                    "cachelock_requests_total",
                    &[("lock", lock), ("outcome", o.as_str())],
                    c.requests[i] as f64,
                );
            }
        }
        for (name, help, pick) in [
            (
                "cachelock_wait_seconds",
                "Time from arrival in the queue to taking the lock.",
                (|c: &LockCounts| &c.wait) as fn(&LockCounts) -> &Histogram,
            ),
            (
                "cachelock_hold_seconds",
                "Time from taking the lock to releasing it.",
                |c: &LockCounts| &c.hold,
            ),
        ] {
            w.family(name, "histogram", help);
            for (lock, c) in &self.locks {
                w.histogram(name, lock, pick(c));
            }
        }
        let gauge_families: [GaugeFamily; 4] = [
            (
                "cachelock_waiters",
                "Requests waiting in the queue now.",
                |g| g.waiters as f64,
            ),
            ("cachelock_holders", "Requests holding the lock now.", |g| {
                g.holders as f64
            }),
            (
                "cachelock_oldest_wait_seconds",
                "How long the longest waiter has waited (0 when nobody waits).",
                |g| g.oldest_wait_seconds,
            ),
            (
                "cachelock_generation",
                "Acquisitions of the lock so far (the latest fencing token).",
                |g| g.generation as f64,
            ),
        ];
        for (name, help, value) in gauge_families {
            w.family(name, "gauge", help);
            for g in gauges {
                w.sample(name, &[("lock", &g.lock)], value(g));
            }
        }
        w.family(
            "cachelock_policy_info",
            "info",
            "The policies (and the sha256 of their modules) requests of each lock ran with.",
        );
        for (lock, c) in &self.locks {
            for (p, d) in &c.policies {
                w.sample(
                    "cachelock_policy_info",
                    &[("lock", lock), ("policy", p), ("digest", d)],
                    1.0,
                );
            }
        }
        w.family(
            "cachelock_policy_faults_total",
            "counter",
            "Policy decisions that faulted (trap, fuel, memory, time limit), whatever on_error made of them.",
        );
        for (p, n) in &self.faults {
            w.sample("cachelock_policy_faults_total", &[("policy", p)], *n as f64);
        }
        if !cache.is_empty() {
            w.family(
                "cachelock_cache_root_bytes",
                "gauge",
                "Size on disk of a cached data root (its slots included).",
            );
            for c in cache {
                w.sample(
                    "cachelock_cache_root_bytes",
                    &[("cache_id", &c.cache_id)],
                    c.bytes as f64,
                );
            }
            w.family(
                "cachelock_cache_root_last_used_timestamp_seconds",
                "gauge",
                "When a cached data root was last used (Unix time).",
            );
            for c in cache {
                w.sample(
                    "cachelock_cache_root_last_used_timestamp_seconds",
                    &[("cache_id", &c.cache_id)],
                    c.last_used_ms as f64 / 1000.0,
                );
            }
        }
        for (name, help, v) in [
            (
                "cachelock_serve_reports_total",
                "Reports of requests counted by this serve.",
                self.reports,
            ),
            (
                "cachelock_serve_reports_lost_total",
                "Reports lost: not delivered in time (as the requests' later reports said), or changes of the store its watch could not follow.",
                self.reports_lost + self.store_missed,
            ),
            (
                "cachelock_serve_reports_refused_total",
                "Reports refused: malformed, oversized, of a lock that does not exist, or over a bound.",
                self.reports_refused,
            ),
        ] {
            w.family(name, "counter", help);
            w.sample(name, &[], v as f64);
        }
        if format == Format::OpenMetrics {
            w.out.push_str("# EOF\n");
        }
        w.out
    }
}

/// A gauge family: name, help, and its value for one lock.
type GaugeFamily = (&'static str, &'static str, fn(&LockGauges) -> f64);

struct Writer {
    out: String,
    format: Format,
}

impl Writer {
    /// `# HELP` and `# TYPE` of a family. OpenMetrics names a counter family without its
    /// `_total`, and has an `info` type; the text format knows info metrics as gauges.
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let (name, kind) = match (self.format, kind) {
            (Format::OpenMetrics, "counter") => (name.strip_suffix("_total").unwrap_or(name), kind),
            (Format::OpenMetrics, "info") => (name.strip_suffix("_info").unwrap_or(name), kind),
            (Format::Text, "info") => (name, "gauge"),
            _ => (name, kind),
        };
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", number(value));
    }

    fn histogram(&mut self, name: &str, lock: &str, h: &Histogram) {
        let mut cumulative = 0;
        let bucket = format!("{name}_bucket");
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += h.counts[i];
            self.sample(
                &bucket,
                &[("lock", lock), ("le", &bound(*b))],
                cumulative as f64,
            );
        }
        self.sample(&bucket, &[("lock", lock), ("le", "+Inf")], h.count as f64);
        self.sample(&format!("{name}_sum"), &[("lock", lock)], h.sum);
        self.sample(&format!("{name}_count"), &[("lock", lock)], h.count as f64);
    }
}

/// A bucket bound as OpenMetrics' canonical numbers write it (`1.0`, `0.001`), in both
/// formats, so that a scraper switching formats keeps one series per bucket.
fn bound(b: f64) -> String {
    if b.fract() == 0.0 {
        format!("{}.0", b as i64)
    } else {
        format!("{b}")
    }
}

/// A sample value: whole numbers without a fraction, others in Rust's shortest form.
fn number(v: f64) -> String {
    if v.is_infinite() {
        return if v > 0.0 { "+Inf" } else { "-Inf" }.into();
    }
    if v.is_nan() {
        return "NaN".into();
    }
    if v.fract() == 0.0 && v.abs() < 1e15 {
        return format!("{}", v as i64);
    }
    format!("{v}")
}

fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(moment: Moment, lock: &str, outcome: Option<Outcome>, waited_ms: u64) -> Report {
        Report {
            moment,
            lock: lock.into(),
            ticket: "000000000001".into(),
            host: "h".into(),
            pid: 1,
            priority: 0,
            at_ms: 0,
            enqueued_at_ms: 0,
            generation: None,
            policy: Some("default".into()),
            digest: Some(format!("sha256:{}", "0".repeat(64))),
            outcome,
            waited_ms: Some(waited_ms),
            held_ms: outcome.filter(|o| *o == Outcome::Acquired).map(|_| 1),
            faults: 0,
            dropped: 0,
            arrived: false,
        }
    }

    #[test]
    fn counts_and_buckets() {
        let mut t = Tally::default();
        t.count(&report(Moment::Acquired, "a", None, 1));
        t.count(&report(Moment::Finished, "a", Some(Outcome::Acquired), 1));
        t.count(&report(Moment::Acquired, "a", None, 3_600_000));
        t.count(&report(Moment::Finished, "b", Some(Outcome::Conflict), 0));
        assert_eq!(t.requests("a", Outcome::Acquired), 1);
        assert_eq!(t.requests("b", Outcome::Conflict), 1);
        let text = t.render(Format::Text, &[], &[]);
        assert!(text.contains("cachelock_wait_seconds_bucket{lock=\"a\",le=\"0.001\"} 1\n"));
        assert!(text.contains("cachelock_wait_seconds_bucket{lock=\"a\",le=\"1800.0\"} 1\n"));
        assert!(text.contains("cachelock_wait_seconds_bucket{lock=\"a\",le=\"3600.0\"} 2\n"));
        assert!(text.contains("cachelock_wait_seconds_count{lock=\"a\"} 2\n"));
        assert!(text.contains("cachelock_requests_total{lock=\"b\",outcome=\"timeout\"} 0\n"));
        assert!(!text.contains("# EOF"));
        let om = t.render(Format::OpenMetrics, &[], &[]);
        assert!(om.contains("# TYPE cachelock_requests counter\n"));
        assert!(om.contains("# TYPE cachelock_policy info\n"));
        assert!(om.ends_with("# EOF\n"));
    }

    #[test]
    fn label_values_are_escaped_and_bounded() {
        let mut t = Tally::default();
        for i in 0..20 {
            let mut r = report(Moment::Arrived, "a", None, 0);
            r.policy = Some(format!("p\"{i}\n"));
            t.count(&r);
        }
        let text = t.render(Format::Text, &[], &[]);
        assert_eq!(
            text.matches("cachelock_policy_info{").count(),
            MAX_POLICIES_PER_LOCK
        );
        assert!(text.contains("policy=\"p\\\"19\\n\""));
    }
}
