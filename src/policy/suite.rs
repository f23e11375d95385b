//! `cachelock policy test`: table-driven tests of a policy, in YAML beside it, run against the
//! compiled component exactly as the engine calls it (`rank` for every waiter, then the
//! engine's serving order; `on-wait` with the engine's wait state; the dockerd calls), at a
//! fixed `now`. [`Suite::parse`] is pure; [`run_case`] takes the loaded policy.
//!
//! ```yaml
//! policy: builtin:priority          # a configured name, builtin:NAME, a .wasm path (relative to
//!                                   # this file) or an oci:// reference
//! config: {boost.branch.main: 100}  # over the policy's configured `config`
//! now_ms: 1700000000000             # the fixed clock (this is the default)
//! cases:
//!   - name: main first
//!     queue:                        # waiters in arrival order, 1 s apart, the last at now
//!       - {ticket: a, priority: 0, labels: {branch: dev}}
//!       - {ticket: b, priority: 0, labels: {branch: main}}
//!     expect:
//!       order: [b, a]               # serving order
//!       ranks: {a: 0, b: 100}       # optional: exact ranks
//!   - name: gives up after the wait bound
//!     config: {max_wait: 30s}       # this case only
//!     queue: [{ticket: me, waited_ms: 31000}]
//!     holders: [{ticket: nightly}]
//!     on_wait: {me: me, evaluations: 3}
//!     expect: {decision: give-up, reason_contains: "30"}
//!   - name: dockerd retries containerd's timeout
//!     start_failure: {attempt: 1, log: "failed to start containerd: timeout waiting for containerd to start"}
//!     expect: {decision: retry, delay_ms: 5000}
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Deserialize;

use super::{
    Mode, Policy, Request, RetryDecision, StartAttempt, StartFailure, Ticket, WaitDecision,
    WaitState,
};

/// The clock of a test unless it says otherwise (2023-11-14T22:13:20Z).
pub const DEFAULT_NOW_MS: u64 = 1_700_000_000_000;
/// Gap between two queue entries that give no `waited_ms`.
const ARRIVAL_GAP_MS: u64 = 1000;

/// A test file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    /// The policy under test.
    pub policy: String,
    /// `configure` values over the policy's own.
    #[serde(default, deserialize_with = "de_config")]
    pub config: BTreeMap<String, String>,
    /// The fixed clock, Unix ms.
    #[serde(default = "default_now")]
    pub now_ms: u64,
    /// The lock name the policy sees.
    #[serde(default = "default_lock")]
    pub lock: String,
    /// The cases.
    pub cases: Vec<Case>,
}

fn default_now() -> u64 {
    DEFAULT_NOW_MS
}

fn default_lock() -> String {
    "test".into()
}

/// One case: a queue and the call it checks.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// Shown in the report.
    pub name: String,
    /// `configure` values over the file's, for this case.
    #[serde(default, deserialize_with = "de_config")]
    pub config: BTreeMap<String, String>,
    /// The clock of this case.
    pub now_ms: Option<u64>,
    /// Waiters, in arrival order.
    #[serde(default)]
    pub queue: Vec<Entry>,
    /// Holders (for `on_wait`; default none).
    #[serde(default)]
    pub holders: Vec<Entry>,
    /// Call `on-wait` for one waiter instead of ranking the queue.
    pub on_wait: Option<OnWait>,
    /// Call `start-timeout`.
    pub start_timeout: Option<Dockerd>,
    /// Call `on-start-failure`.
    pub start_failure: Option<Failure>,
    /// Call `stop-timeout`.
    pub stop_timeout: Option<Dockerd>,
    /// What must come out.
    pub expect: Expect,
}

/// A ticket in a case.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Ticket id.
    pub ticket: String,
    /// `--priority`.
    #[serde(default)]
    pub priority: i32,
    /// `--label`s.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Exclusive (default) or shared.
    #[serde(default)]
    pub mode: Mode,
    /// How long it has waited at `now` (default: arrival order, 1 s apart).
    pub waited_ms: Option<u64>,
    /// `-w`, ms.
    pub wait_limit_ms: Option<u64>,
    /// Host name (default `test`).
    pub host: Option<String>,
}

/// `on_wait:`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OnWait {
    /// The waiter asking (a ticket of `queue`; default its first).
    pub me: Option<String>,
    /// Earlier `on-wait` calls of this request.
    #[serde(default)]
    pub evaluations: u32,
}

/// `start_timeout:` / `stop_timeout:`.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Dockerd {
    /// Start attempt (1 = first).
    #[serde(default = "one")]
    pub attempt: u32,
    /// The cache id (none: an ephemeral data root).
    pub cache_id: Option<String>,
}

fn one() -> u32 {
    1
}

/// `start_failure:`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Failure {
    /// Start attempt.
    #[serde(default = "one")]
    pub attempt: u32,
    /// The cache id.
    pub cache_id: Option<String>,
    /// dockerd did not answer within this many ms (default: it exited).
    pub timed_out_ms: Option<u64>,
    /// Its exit code, if it exited.
    pub exit_code: Option<i32>,
    /// The tail of its log.
    #[serde(default)]
    pub log: String,
}

/// `expect:`.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Serving order of `queue`.
    pub order: Option<Vec<String>>,
    /// Exact ranks.
    pub ranks: Option<BTreeMap<String, i64>>,
    /// `keep-waiting`, `give-up`, `fall-back` (on-wait); `retry`, `give-up` (start failure).
    pub decision: Option<String>,
    /// The keep-waiting interval, ms.
    pub interval_ms: Option<u64>,
    /// The retry delay, ms.
    pub delay_ms: Option<u64>,
    /// Text the give-up or fall-back reason must contain.
    pub reason_contains: Option<String>,
    /// start-timeout / stop-timeout, ms.
    pub timeout_ms: Option<u64>,
    /// The policy must fail (load or call) with a message containing this.
    pub error: Option<String>,
}

fn de_config<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let raw: BTreeMap<String, serde_yaml::Value> = BTreeMap::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| match v {
            serde_yaml::Value::String(s) => Ok((k, s)),
            serde_yaml::Value::Number(n) => Ok((k, n.to_string())),
            serde_yaml::Value::Bool(b) => Ok((k, b.to_string())),
            _ => Err(serde::de::Error::custom(format!(
                "config value of {k:?} must be a string, number or boolean"
            ))),
        })
        .collect()
}

impl Suite {
    /// Parses a test file; the error names the line and key. Checks what serde cannot: one
    /// call per case, expectations that fit it, tickets that exist.
    pub fn parse(text: &str) -> Result<Suite, String> {
        let s: Suite = crate::config::parse_yaml(text)?;
        if s.cases.is_empty() {
            return Err("no cases (`cases:` is empty)".into());
        }
        for (i, c) in s.cases.iter().enumerate() {
            let at = |m: String| format!("key `cases[{i}]` ({}): {m}", c.name);
            let calls = [
                c.on_wait.is_some(),
                c.start_timeout.is_some(),
                c.start_failure.is_some(),
                c.stop_timeout.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if calls > 1 {
                return Err(at(
                    "give at most one of on_wait, start_timeout, start_failure, stop_timeout"
                        .into(),
                ));
            }
            let e = &c.expect;
            if calls == 0 {
                if c.queue.is_empty() && e.error.is_none() {
                    return Err(at(
                        "nothing to test: give a `queue` (ranked into `expect.order`) or a call"
                            .into(),
                    ));
                }
                if e.order.is_none() && e.ranks.is_none() && e.error.is_none() {
                    return Err(at("a queue case expects `order` and/or `ranks`".into()));
                }
            }
            if let Some(w) = &c.on_wait {
                if c.queue.is_empty() {
                    return Err(at("on_wait needs the waiter in `queue`".into()));
                }
                if let Some(me) = &w.me {
                    if !c.queue.iter().any(|q| &q.ticket == me) {
                        return Err(at(format!("on_wait.me {me:?} is not in `queue`")));
                    }
                }
            }
            let mut ids: Vec<&str> = c
                .queue
                .iter()
                .chain(&c.holders)
                .map(|q| q.ticket.as_str())
                .collect();
            ids.sort_unstable();
            if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
                return Err(at(format!("ticket {:?} appears twice", w[0])));
            }
            if let Some(d) = &e.decision {
                let ok: &[&str] = if c.start_failure.is_some() {
                    &["retry", "give-up"]
                } else {
                    &["keep-waiting", "give-up", "fall-back"]
                };
                if !ok.contains(&d.as_str()) {
                    return Err(at(format!(
                        "expect.decision {d:?} is not one of {}",
                        ok.join(", ")
                    )));
                }
            }
        }
        Ok(s)
    }

    /// The configuration of case `c`: the file's, then the case's over it.
    pub fn config_of(&self, c: &Case) -> Vec<(String, String)> {
        let mut m = self.config.clone();
        m.extend(c.config.clone());
        m.into_iter().collect()
    }
}

fn ticket(e: &Entry, lock: &str, enqueued_at_ms: u64) -> Ticket {
    Ticket {
        id: e.ticket.clone(),
        request: Request {
            lock: lock.to_string(),
            mode: e.mode,
            priority: e.priority,
            labels: e
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            host: e.host.clone().unwrap_or_else(|| "test".into()),
            pid: 1,
            enqueued_at_ms,
            wait_limit_ms: e.wait_limit_ms,
        },
    }
}

/// The queue of `c` as tickets at `now`: an entry without `waited_ms` arrived 1 s after the
/// one before it, the last at `now`.
fn queue(c: &Case, lock: &str, now: u64) -> Vec<Ticket> {
    let n = c.queue.len() as u64;
    c.queue
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let waited = e.waited_ms.unwrap_or((n - 1 - i as u64) * ARRIVAL_GAP_MS);
            ticket(e, lock, now.saturating_sub(waited))
        })
        .collect()
}

/// Runs case `c` against `policy` (loaded with [`Suite::config_of`]); `Err` says what differed:
/// expected against actual.
pub fn run_case(suite: &Suite, c: &Case, policy: &mut dyn Policy) -> Result<(), String> {
    let now = c.now_ms.unwrap_or(suite.now_ms);
    let lock = suite.lock.as_str();
    let e = &c.expect;
    let outcome = call(suite, c, policy, now, lock);
    match (&e.error, outcome) {
        (Some(want), Err(got)) if got.contains(want.as_str()) => Ok(()),
        (Some(want), Err(got)) => Err(format!(
            "expected an error containing {want:?}\n  actual:   {got}"
        )),
        (Some(want), Ok(got)) => Err(format!(
            "expected an error containing {want:?}\n  actual:   {}",
            got.describe()
        )),
        (None, Err(got)) => Err(format!("the policy failed: {got}")),
        (None, Ok(got)) => got.check(e),
    }
}

/// What a call returned.
enum Actual {
    Ranked(Vec<(String, i64)>),
    Wait(WaitDecision),
    Timeout(u64),
    Retry(RetryDecision),
}

fn call(
    suite: &Suite,
    c: &Case,
    policy: &mut dyn Policy,
    now: u64,
    lock: &str,
) -> Result<Actual, String> {
    let err = |e: super::PolicyError| e.to_string();
    if let Some(w) = &c.on_wait {
        let q = queue(c, lock, now);
        let me_id = w.me.clone().unwrap_or_else(|| q[0].id.clone());
        let me = q
            .iter()
            .find(|t| t.id == me_id)
            .cloned()
            .expect("checked by parse");
        let holders = c
            .holders
            .iter()
            .map(|h| ticket(h, lock, now.saturating_sub(h.waited_ms.unwrap_or(60_000))))
            .collect();
        let state = WaitState {
            waited_ms: now.saturating_sub(me.request.enqueued_at_ms),
            me,
            holders,
            waiters: q.into_iter().filter(|t| t.id != me_id).collect(),
            evaluations: w.evaluations,
            now_ms: now,
        };
        return policy.on_wait(&state).map(Actual::Wait).map_err(err);
    }
    if let Some(d) = &c.start_timeout {
        let a = StartAttempt {
            attempt: d.attempt,
            cache_id: d.cache_id.clone(),
        };
        return policy
            .start_timeout_ms(&a)
            .map(Actual::Timeout)
            .map_err(err);
    }
    if let Some(d) = &c.stop_timeout {
        return policy
            .stop_timeout_ms(d.cache_id.as_deref())
            .map(Actual::Timeout)
            .map_err(err);
    }
    if let Some(f) = &c.start_failure {
        let a = StartAttempt {
            attempt: f.attempt,
            cache_id: f.cache_id.clone(),
        };
        let failure = match f.timed_out_ms {
            Some(ms) => StartFailure::TimedOut(ms),
            None => StartFailure::Exited(f.exit_code),
        };
        return policy
            .on_start_failure(&a, &failure, &f.log)
            .map(Actual::Retry)
            .map_err(err);
    }
    let _ = suite;
    let tickets: Vec<crate::lock::TicketData> =
        queue(c, lock, now).into_iter().map(Into::into).collect();
    let ranked = crate::lock::order::rank_all(tickets, policy, now).map_err(err)?;
    Ok(Actual::Ranked(
        ranked.into_iter().map(|(t, r)| (t.ticket.id, r)).collect(),
    ))
}

impl Actual {
    fn describe(&self) -> String {
        match self {
            Actual::Ranked(v) => format!(
                "order [{}] (ranks {})",
                v.iter()
                    .map(|(t, _)| t.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                v.iter()
                    .map(|(t, r)| format!("{t}={r}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            Actual::Wait(WaitDecision::KeepWaiting(ms)) => {
                format!("keep-waiting (interval {ms} ms)")
            }
            Actual::Wait(WaitDecision::GiveUp(r)) => format!("give-up ({r:?})"),
            Actual::Wait(WaitDecision::FallBack(r)) => format!("fall-back ({r:?})"),
            Actual::Retry(RetryDecision::RetryAfter(ms)) => format!("retry (after {ms} ms)"),
            Actual::Retry(RetryDecision::GiveUp(r)) => format!("give-up ({r:?})"),
            Actual::Timeout(ms) => format!("{ms} ms"),
        }
    }

    fn check(&self, e: &Expect) -> Result<(), String> {
        let mut wrong = Vec::new();
        match self {
            Actual::Ranked(v) => {
                if let Some(order) = &e.order {
                    let got: Vec<&str> = v.iter().map(|(t, _)| t.as_str()).collect();
                    if got != order.iter().map(String::as_str).collect::<Vec<_>>() {
                        wrong.push(format!("order [{}]", order.join(", ")));
                    }
                }
                if let Some(ranks) = &e.ranks {
                    for (t, want) in ranks {
                        if v.iter().find(|(id, _)| id == t).map(|(_, r)| *r) != Some(*want) {
                            wrong.push(format!("rank {t}={want}"));
                        }
                    }
                }
            }
            Actual::Wait(d) => {
                let (name, reason, interval) = match d {
                    WaitDecision::KeepWaiting(ms) => ("keep-waiting", None, Some(*ms)),
                    WaitDecision::GiveUp(r) => ("give-up", Some(r), None),
                    WaitDecision::FallBack(r) => ("fall-back", Some(r), None),
                };
                expect_decision(e, name, reason, &mut wrong);
                if e.interval_ms.is_some() && e.interval_ms != interval {
                    wrong.push(format!(
                        "keep-waiting (interval {} ms)",
                        e.interval_ms.unwrap_or(0)
                    ));
                }
            }
            Actual::Retry(d) => {
                let (name, reason, delay) = match d {
                    RetryDecision::RetryAfter(ms) => ("retry", None, Some(*ms)),
                    RetryDecision::GiveUp(r) => ("give-up", Some(r), None),
                };
                expect_decision(e, name, reason, &mut wrong);
                if e.delay_ms.is_some() && e.delay_ms != delay {
                    wrong.push(format!("retry (after {} ms)", e.delay_ms.unwrap_or(0)));
                }
            }
            Actual::Timeout(ms) => {
                if e.timeout_ms.is_some_and(|t| t != *ms) {
                    wrong.push(format!("{} ms", e.timeout_ms.unwrap_or(0)));
                }
            }
        }
        if wrong.is_empty() {
            return Ok(());
        }
        let mut s = String::new();
        let _ = write!(
            s,
            "expected: {}\n  actual:   {}",
            wrong.join("; "),
            self.describe()
        );
        Err(s)
    }
}

fn expect_decision(e: &Expect, name: &str, reason: Option<&String>, wrong: &mut Vec<String>) {
    if e.decision.as_deref().is_some_and(|d| d != name) {
        wrong.push(e.decision.clone().unwrap_or_default());
    }
    if let Some(want) = &e.reason_contains {
        if !reason.is_some_and(|r| r.contains(want.as_str())) {
            wrong.push(format!("a reason containing {want:?}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_shape_parses_and_mistakes_are_named() {
        let s = Suite::parse(
            "policy: builtin:priority\nconfig: {boost.branch.main: 100}\ncases:\n  - name: main first\n    queue:\n      - {ticket: a, priority: 0, labels: {branch: dev}}\n      - {ticket: b, priority: 0, labels: {branch: main}}\n    expect:\n      order: [b, a]\n",
        )
        .unwrap();
        assert_eq!(s.config["boost.branch.main"], "100");
        assert_eq!(s.now_ms, DEFAULT_NOW_MS);
        let q = queue(&s.cases[0], "l", 10_000);
        assert_eq!(q[0].request.enqueued_at_ms, 9_000);
        assert_eq!(q[1].request.enqueued_at_ms, 10_000);
        for (bad, what) in [
            ("policy: p\ncases: []\n", "no cases"),
            ("policy: p\ncases:\n  - {name: x, expect: {}}\n", "nothing to test"),
            ("policy: p\ncases:\n  - {name: x, queue: [{ticket: a}], expect: {}}\n", "expects `order`"),
            ("policy: p\ncases:\n  - {name: x, queue: [{ticket: a}, {ticket: a}], expect: {order: [a]}}\n", "appears twice"),
            ("policy: p\ncases:\n  - {name: x, queue: [{ticket: a}], on_wait: {me: b}, expect: {}}\n", "not in `queue`"),
            ("policy: p\ncases:\n  - {name: x, queue: [{ticket: a}], on_wait: {}, expect: {decision: wait}}\n", "not one of"),
            ("policy: p\ncases:\n  - {name: x, queu: [], expect: {}}\n", "queu"),
        ] {
            let e = Suite::parse(bad).unwrap_err();
            assert!(e.contains(what), "{bad}: {e}");
        }
    }

    #[test]
    fn expectations_compare_and_say_expected_and_actual() {
        let e = Expect {
            order: Some(vec!["b".into(), "a".into()]),
            ..Default::default()
        };
        assert!(Actual::Ranked(vec![("b".into(), 100), ("a".into(), 0)])
            .check(&e)
            .is_ok());
        let msg = Actual::Ranked(vec![("a".into(), 0), ("b".into(), 0)])
            .check(&e)
            .unwrap_err();
        assert_eq!(
            msg,
            "expected: order [b, a]\n  actual:   order [a, b] (ranks a=0 b=0)"
        );
        let e = Expect {
            decision: Some("give-up".into()),
            reason_contains: Some("30".into()),
            ..Default::default()
        };
        assert!(Actual::Wait(WaitDecision::GiveUp("waited 30 s".into()))
            .check(&e)
            .is_ok());
        let msg = Actual::Wait(WaitDecision::KeepWaiting(50))
            .check(&e)
            .unwrap_err();
        assert!(
            msg.contains("actual:   keep-waiting (interval 50 ms)"),
            "{msg}"
        );
    }
}
