//! Helpers shared by the policy tests: the built test components, tickets, configs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use cachelock::config::{Config, Loaded};
use cachelock::policy::{Mode, Request, Ticket, WaitState};

/// A test policy component of crates/test-programs (`test-loop` → `test_loop.wasm`).
pub fn test_policy(name: &str) -> PathBuf {
    test_programs_artifacts::component(name)
}

/// A configuration parsed from YAML, with its compile cache in `dir`.
pub fn loaded(dir: &Path, yaml: &str) -> Loaded {
    let text = format!("policy_cache_dir: {}\n{yaml}", dir.join("cache").display());
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("config.yaml");
    std::fs::write(&path, &text).unwrap();
    let config = Config::parse(&text).unwrap();
    Loaded {
        config,
        path: Some(path),
    }
}

/// A ticket with the given id, priority, arrival and labels.
pub fn ticket(id: &str, priority: i32, enqueued_at_ms: u64, labels: &[(&str, &str)]) -> Ticket {
    Ticket {
        id: id.to_string(),
        request: Request {
            lock: "l".into(),
            mode: Mode::Exclusive,
            priority,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            host: "h".into(),
            pid: 1,
            enqueued_at_ms,
            wait_limit_ms: None,
        },
    }
}

/// A wait state of `me` among `waiters`.
pub fn state(me: Ticket, waiters: Vec<Ticket>, waited_ms: u64, evaluations: u32) -> WaitState {
    let now_ms = me.request.enqueued_at_ms + waited_ms;
    WaitState {
        me,
        holders: vec![ticket("holder", 0, 0, &[])],
        waiters,
        waited_ms,
        evaluations,
        now_ms,
    }
}
