//! Warm policy decision cost (issue 5: target ≤ 5 µs): `rank` and `on_wait` of the policy a lock
//! gets through `policy::for_lock` (the WASM built-ins once the policy runtime is in), called
//! repeatedly on one instance with a realistic queue of 16 waiters.
//!
//! `cargo bench --bench policy_decision`; `cargo bench --bench compare` then reports the medians.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

use cachelock::config::Loaded;
use cachelock::policy::{self, Mode, Request, Ticket, WaitState};

fn ticket(i: u64, priority: i32) -> Ticket {
    Ticket {
        id: format!("{i:016}"),
        request: Request {
            lock: "bench".into(),
            mode: Mode::Exclusive,
            priority,
            labels: vec![("team".into(), "infra".into())],
            host: "host-a".into(),
            pid: 1000 + i as u32,
            enqueued_at_ms: 1_700_000_000_000 + i,
            wait_limit_ms: None,
        },
    }
}

fn state(now_ms: u64) -> WaitState {
    WaitState {
        me: ticket(8, 0),
        holders: vec![ticket(0, 0)],
        waiters: (1..=16)
            .filter(|&i| i != 8)
            .map(|i| ticket(i, (i % 3) as i32))
            .collect(),
        waited_ms: 1500,
        evaluations: 3,
        now_ms,
    }
}

fn decisions(c: &mut Criterion) {
    let loaded = Loaded::default();
    for name in ["builtin:default", "builtin:priority"] {
        let settings = loaded.config.lock_settings("bench");
        let mut p = match policy::for_lock(&loaded, &settings, Some(name), &[]) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("policy_decision: cannot load {name}: {e}");
                continue;
            }
        };
        let short = name.trim_start_matches("builtin:");
        eprintln!("policy_decision: {name} is implemented by `{}`", p.name());
        let t = ticket(3, 1);
        let st = state(1_700_000_001_500);
        // Warm up: the first calls instantiate and fault in the component.
        for _ in 0..100 {
            p.rank(&t, st.now_ms).unwrap();
            p.on_wait(&st).unwrap();
        }
        c.bench_function(&format!("{short}-rank"), |b| {
            b.iter(|| p.rank(std::hint::black_box(&t), st.now_ms).unwrap())
        });
        let alone = WaitState {
            waiters: vec![],
            ..st.clone()
        };
        c.bench_function(&format!("{short}-on_wait-0"), |b| {
            b.iter_batched_ref(
                || alone.clone(),
                |s| p.on_wait(std::hint::black_box(s)).unwrap(),
                BatchSize::SmallInput,
            )
        });
        c.bench_function(&format!("{short}-on_wait-16"), |b| {
            b.iter_batched_ref(
                || st.clone(),
                |s| p.on_wait(std::hint::black_box(s)).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
}

criterion_group!(benches, decisions);
criterion_main!(benches);
