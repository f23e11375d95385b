//! [`Report`]: what `serve` learns of one moment of one request — its arrival, its
//! acquisition, its end — from the request itself (a datagram, on a lock directory) or from the
//! store (etcd's watch). Reports from datagrams are claims of whoever sent them: they are
//! bounded and checked here before anything counts them.

use serde::{Deserialize, Serialize};

use crate::lock::events::{Event, Now, Outcome};
use crate::lock::{digest_label, name, TicketData};

/// Largest report accepted (a datagram); one a request writes is a few hundred bytes.
pub const MAX_REPORT_BYTES: usize = 4096;
/// Longest host name kept.
const MAX_HOST: usize = 255;
/// Longest ticket id kept.
const MAX_TICKET: usize = 32;

/// Which moment of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Moment {
    /// It joined the queue.
    Arrived,
    /// It holds the lock.
    Acquired,
    /// It is over (released, or left without the lock).
    Finished,
}

/// One moment of one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Which moment.
    pub moment: Moment,
    /// Lock name.
    pub lock: String,
    /// Ticket id.
    pub ticket: String,
    /// The requester's host (its claim).
    pub host: String,
    /// Its process id there (its claim).
    pub pid: u32,
    /// `--priority`.
    #[serde(default)]
    pub priority: i32,
    /// Wall clock of the moment (Unix ms).
    pub at_ms: u64,
    /// Arrival stamp.
    #[serde(default)]
    pub enqueued_at_ms: u64,
    /// Generation of the acquisition, if it held the lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// The policy's name, as configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// `sha256:<hex>` of its module, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// How it ended (finished only).
    #[serde(
        default,
        with = "outcome_name",
        skip_serializing_if = "Option::is_none"
    )]
    pub outcome: Option<Outcome>,
    /// Arrival to acquisition, or to the end of the wait (acquired and finished).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waited_ms: Option<u64>,
    /// How long it held the lock (finished, if it held it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_ms: Option<u64>,
    /// Decisions of its policy that faulted.
    #[serde(default)]
    pub faults: u32,
    /// Earlier reports of this request that could not be delivered.
    #[serde(default)]
    pub dropped: u32,
    /// This report also stands for the request's arrival (at `enqueued_at_ms`): a request that
    /// takes the lock, or leaves, without waiting sends one datagram where it would send two.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub arrived: bool,
}

mod outcome_name {
    use super::Outcome;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(o: &Option<Outcome>, s: S) -> Result<S::Ok, S::Error> {
        match o {
            Some(o) => s.serialize_str(o.as_str()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Outcome>, D::Error> {
        let v: Option<String> = Option::deserialize(d)?;
        v.map(|v| {
            Outcome::parse(&v)
                .ok_or_else(|| serde::de::Error::custom(format!("unknown outcome {v:?}")))
        })
        .transpose()
    }
}

fn ms(d: std::time::Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

impl Report {
    /// A report of `ticket` at `at_ms`, with nothing of the moment's own yet.
    pub fn of_ticket(moment: Moment, t: &TicketData, at_ms: u64) -> Report {
        let r = t.request();
        Report {
            moment,
            lock: r.lock.clone(),
            ticket: t.id().to_string(),
            host: r.host.clone(),
            pid: r.pid,
            priority: r.priority,
            at_ms,
            enqueued_at_ms: r.enqueued_at_ms,
            generation: t.generation,
            policy: t.policy.clone(),
            digest: t.policy_digest.clone(),
            outcome: None,
            waited_ms: None,
            held_ms: None,
            faults: 0,
            dropped: 0,
            arrived: false,
        }
    }

    /// The report of an event, for the events a watcher counts.
    pub fn from_event(now: Now, e: &Event<'_>) -> Option<Report> {
        Some(match e {
            Event::Arrived { ticket } => Report::of_ticket(Moment::Arrived, ticket, now.wall_ms),
            Event::Acquired { ticket, waited } => Report {
                waited_ms: Some(ms(*waited)),
                ..Report::of_ticket(Moment::Acquired, ticket, now.wall_ms)
            },
            Event::Finished(s) => Report {
                policy: Some(crate::lock::cut(s.policy, crate::lock::PolicyRef::MAX_NAME).into()),
                digest: s.digest.map(digest_label),
                outcome: Some(s.outcome),
                waited_ms: Some(ms(s.waited)),
                held_ms: s.held.map(ms),
                faults: s.faults,
                ..Report::of_ticket(Moment::Finished, s.ticket, now.wall_ms)
            },
            _ => return None,
        })
    }

    /// Encodes for a datagram.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a report encodes")
    }

    /// Decodes and checks a datagram: bounded, a valid lock name, a short ticket id, a digest
    /// that is one, an outcome on a finished report only; text fields that other users wrote
    /// are kept within bounds (and escaped wherever they are printed).
    pub fn decode(bytes: &[u8]) -> Result<Report, String> {
        if bytes.len() > MAX_REPORT_BYTES {
            return Err(format!("larger than {MAX_REPORT_BYTES} bytes"));
        }
        let r: Report = serde_json::from_slice(bytes).map_err(|e| format!("not a report ({e})"))?;
        r.check()?;
        Ok(r)
    }

    /// See [`Report::decode`].
    pub fn check(&self) -> Result<(), String> {
        name::validate(&self.lock).map_err(|e| e.message)?;
        if self.ticket.is_empty()
            || self.ticket.len() > MAX_TICKET
            || !self
                .ticket
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("a ticket id that is not one".into());
        }
        if self.host.len() > MAX_HOST {
            return Err(format!("a host name longer than {MAX_HOST} bytes"));
        }
        if self
            .policy
            .as_ref()
            .is_some_and(|p| p.len() > crate::lock::PolicyRef::MAX_NAME)
        {
            return Err("a policy name that is too long".into());
        }
        if let Some(d) = &self.digest {
            let hex = d.strip_prefix("sha256:").unwrap_or("");
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err("a digest that is not sha256:<64 hex digits>".into());
            }
        }
        match (self.moment, self.outcome) {
            (Moment::Finished, None) => Err("a finished report without an outcome".into()),
            (Moment::Arrived | Moment::Acquired, Some(_)) => {
                Err("an outcome on a report that is not finished".into())
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::events::Summary;
    use crate::lock::Options;
    use std::time::Duration;

    fn ticket() -> TicketData {
        let mut o = Options::new("build");
        o.policy = Some(crate::lock::PolicyRef {
            name: "default".into(),
            digest: Some(format!("sha256:{}", "ab".repeat(32))),
        });
        TicketData::new(&o, "000000000007".into(), 1000, "ci-1".into(), 42)
    }

    #[test]
    fn a_finished_request_round_trips() {
        let t = ticket();
        let s = Summary {
            ticket: &t,
            policy: "default",
            digest: Some(&"ab".repeat(32)),
            faults: 1,
            outcome: Outcome::Timeout,
            reason: Some("timed out"),
            waited: Duration::from_millis(2500),
            held: None,
            position_at_arrival: None,
            decisions: 3,
            last_decision: None,
        };
        let now = Now {
            at: Duration::ZERO,
            wall_ms: 5000,
        };
        let r = Report::from_event(now, &Event::Finished(s)).unwrap();
        assert_eq!(r.outcome, Some(Outcome::Timeout));
        assert_eq!(r.waited_ms, Some(2500));
        assert_eq!(
            r.digest.as_deref(),
            Some(&*format!("sha256:{}", "ab".repeat(32)))
        );
        let bytes = r.encode();
        assert!(bytes.len() < 600, "{}", bytes.len());
        assert_eq!(Report::decode(&bytes).unwrap(), r);
    }

    #[test]
    fn forged_reports_are_refused() {
        let good = Report::of_ticket(Moment::Arrived, &ticket(), 1);
        let bad = |f: &dyn Fn(&mut Report)| {
            let mut r = good.clone();
            f(&mut r);
            Report::decode(&r.encode()).unwrap_err()
        };
        bad(&|r| r.lock = "../etc".into());
        bad(&|r| r.ticket = "x".repeat(100));
        bad(&|r| r.ticket = "1\n2".into());
        bad(&|r| r.digest = Some("md5:abc".into()));
        bad(&|r| r.outcome = Some(Outcome::Acquired));
        bad(&|r| {
            r.moment = Moment::Finished;
            r.outcome = None
        });
        assert!(Report::decode(&vec![b' '; MAX_REPORT_BYTES + 1]).is_err());
        assert!(Report::decode(br#"{"moment":"finished","outcome":"won"}"#).is_err());
        assert!(Report::decode(&good.encode()).is_ok());
    }
}
