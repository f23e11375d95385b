//! Sandbox limits of one policy (fuel per call, memory, tables, instances, log size) and the
//! sanity rules applied to what a policy returns.

#[cfg(feature = "wasm")]
use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};

use super::{RetryDecision, WaitDecision};
use crate::config::Limits;

/// Fuel per call (≈ wasm instructions): ~10 ms of work, far above what any sane decision needs.
pub const DEFAULT_FUEL: u64 = 10_000_000;
/// `configure` may do more (parse its config, build tables): this many times the call fuel.
pub const CONFIGURE_FUEL_FACTOR: u64 = 10;
/// Linear memory cap.
pub const DEFAULT_MEMORY_MIB: u64 = 64;
/// Table elements cap.
pub const DEFAULT_TABLE_ELEMENTS: u32 = 20_000;
/// Core instances inside the component (a Rust wasip2 component has a handful).
pub const DEFAULT_INSTANCES: u32 = 32;
/// Smallest accepted `keep-waiting` interval.
pub const DEFAULT_MIN_INTERVAL_MS: u64 = 5;
/// Largest accepted `keep-waiting` interval.
pub const DEFAULT_MAX_INTERVAL_MS: u64 = 60_000;
/// Log bytes kept per call (stdout, stderr and `host.log` each).
pub const DEFAULT_LOG_BYTES: u64 = 4096;
/// Wall-clock time per call, sleeps included (epoch interruption; `configure` gets 10×).
pub const DEFAULT_TIME_MS: u64 = 1000;
/// The queue data passed to one call (tickets, labels, strings) is cut to fit in this fraction
/// of the policy's memory limit (1/16: an interpreter such as CPython needs several times the
/// raw bytes once they are objects).
pub const INPUT_MEMORY_DIVISOR: u64 = 16;
/// Reasons (give-up, fall-back) longer than this are truncated.
pub const MAX_REASON_BYTES: usize = 1024;
/// dockerd start timeout accepted from a policy: at least 100 ms, at most a day.
pub const START_TIMEOUT_RANGE_MS: (u64, u64) = (100, 86_400_000);
/// dockerd stop grace and retry delay accepted from a policy: at most an hour.
pub const MAX_DOCKERD_DELAY_MS: u64 = 3_600_000;

/// The limits in force for one policy, defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effective {
    /// Fuel per call.
    pub fuel: u64,
    /// Linear memory cap, bytes.
    pub memory_bytes: u64,
    /// Table elements cap.
    pub table_elements: u32,
    /// Core instances cap.
    pub instances: u32,
    /// `keep-waiting` is clamped to this range.
    pub min_interval_ms: u64,
    /// See `min_interval_ms`.
    pub max_interval_ms: u64,
    /// Log bytes kept per call and stream.
    pub log_bytes: u64,
    /// Wall-clock bound per call, milliseconds.
    pub time_ms: u64,
}

impl Effective {
    /// Applies the defaults to the policy file's `limits`; refuses contradictions.
    pub fn from_config(l: &Limits) -> Result<Self, String> {
        let e = Effective {
            fuel: l.fuel.unwrap_or(DEFAULT_FUEL),
            memory_bytes: l
                .memory_mib
                .unwrap_or(DEFAULT_MEMORY_MIB)
                .saturating_mul(1 << 20),
            table_elements: l.table_elements.unwrap_or(DEFAULT_TABLE_ELEMENTS),
            instances: l.instances.unwrap_or(DEFAULT_INSTANCES),
            min_interval_ms: l.min_interval_ms.unwrap_or(DEFAULT_MIN_INTERVAL_MS),
            max_interval_ms: l.max_interval_ms.unwrap_or(DEFAULT_MAX_INTERVAL_MS),
            log_bytes: l.log_bytes.unwrap_or(DEFAULT_LOG_BYTES),
            time_ms: l.time_ms.unwrap_or(DEFAULT_TIME_MS),
        };
        if e.time_ms == 0 || e.time_ms > 3_600_000 {
            return Err(format!(
                "limits.time_ms must be between 1 and 3600000 (got {})",
                e.time_ms
            ));
        }
        if e.fuel == 0 {
            return Err("limits.fuel must be at least 1".into());
        }
        if e.memory_bytes == 0 {
            return Err("limits.memory_mib must be at least 1".into());
        }
        if e.min_interval_ms > e.max_interval_ms {
            return Err(format!(
                "limits.min_interval_ms ({}) is larger than limits.max_interval_ms ({})",
                e.min_interval_ms, e.max_interval_ms
            ));
        }
        Ok(e)
    }

    /// The store limiter enforcing these limits.
    #[cfg(feature = "wasm")]
    pub fn limiter(&self) -> Limiter {
        Limiter {
            inner: StoreLimitsBuilder::new()
                .memory_size(usize::try_from(self.memory_bytes).unwrap_or(usize::MAX))
                .table_elements(self.table_elements as usize)
                .instances(self.instances as usize)
                .tables(self.instances as usize * 4)
                .memories(self.instances as usize)
                .trap_on_grow_failure(true)
                .build(),
            memory_hit: false,
            table_hit: false,
        }
    }

    /// Bytes of queue data one call may be given.
    pub fn input_bytes(&self) -> usize {
        usize::try_from((self.memory_bytes / INPUT_MEMORY_DIVISOR).max(64 * 1024))
            .unwrap_or(usize::MAX)
    }

    /// Clamps `keep-waiting` and truncates reasons.
    pub fn sanitize_wait(&self, d: WaitDecision) -> WaitDecision {
        match d {
            WaitDecision::KeepWaiting(ms) => {
                WaitDecision::KeepWaiting(ms.clamp(self.min_interval_ms, self.max_interval_ms))
            }
            WaitDecision::GiveUp(r) => WaitDecision::GiveUp(truncate(r, MAX_REASON_BYTES)),
            WaitDecision::FallBack(r) => WaitDecision::FallBack(truncate(r, MAX_REASON_BYTES)),
        }
    }
}

impl Default for Effective {
    fn default() -> Self {
        Self::from_config(&Limits::default()).expect("defaults are consistent")
    }
}

/// Clamps a dockerd start timeout.
pub fn sanitize_start_timeout(ms: u64) -> u64 {
    ms.clamp(START_TIMEOUT_RANGE_MS.0, START_TIMEOUT_RANGE_MS.1)
}

/// Clamps a dockerd stop grace.
pub fn sanitize_stop_timeout(ms: u64) -> u64 {
    ms.min(MAX_DOCKERD_DELAY_MS)
}

/// Clamps a retry delay and truncates a give-up reason.
pub fn sanitize_retry(d: RetryDecision) -> RetryDecision {
    match d {
        RetryDecision::RetryAfter(ms) => RetryDecision::RetryAfter(ms.min(MAX_DOCKERD_DELAY_MS)),
        RetryDecision::GiveUp(r) => RetryDecision::GiveUp(truncate(r, MAX_REASON_BYTES)),
    }
}

/// Cuts `s` to at most `max` bytes (on a char boundary), saying how much was cut; control
/// characters become spaces so that a reason cannot forge terminal output.
pub fn truncate(s: String, max: usize) -> String {
    let clean = |t: &str| -> String {
        t.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect()
    };
    if s.len() <= max {
        return clean(&s);
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… ({} more bytes cut)", clean(&s[..cut]), s.len() - cut)
}

/// `StoreLimits` plus a record of which limit a policy hit, for the fault message.
#[cfg(feature = "wasm")]
pub struct Limiter {
    inner: StoreLimits,
    /// A memory growth beyond the cap was refused.
    pub memory_hit: bool,
    /// A table growth beyond the cap was refused.
    pub table_hit: bool,
}

#[cfg(feature = "wasm")]
impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let r = self.inner.memory_growing(current, desired, maximum);
        if !matches!(r, Ok(true)) {
            self.memory_hit = true;
        }
        r
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let r = self.inner.table_growing(current, desired, maximum);
        if !matches!(r, Ok(true)) {
            self.table_hit = true;
        }
        r
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_are_clamped_and_reasons_cut() {
        let e = Effective::default();
        assert_eq!(
            e.sanitize_wait(WaitDecision::KeepWaiting(u64::MAX)),
            WaitDecision::KeepWaiting(DEFAULT_MAX_INTERVAL_MS)
        );
        assert_eq!(
            e.sanitize_wait(WaitDecision::KeepWaiting(0)),
            WaitDecision::KeepWaiting(DEFAULT_MIN_INTERVAL_MS)
        );
        let WaitDecision::GiveUp(r) = e.sanitize_wait(WaitDecision::GiveUp("é".repeat(5000)))
        else {
            panic!()
        };
        assert!(
            r.len() < MAX_REASON_BYTES + 64 && r.contains("more bytes cut"),
            "{r}"
        );
        assert_eq!(truncate("a\nb".into(), 10), "a b");
    }

    #[test]
    fn contradictory_limits_are_refused() {
        let l = Limits {
            min_interval_ms: Some(10),
            max_interval_ms: Some(5),
            ..Limits::default()
        };
        assert!(Effective::from_config(&l)
            .unwrap_err()
            .contains("min_interval_ms"));
    }
}
