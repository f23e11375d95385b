//! Test policy: `on-wait` allocates until memory runs out. The host's memory cap must end it.
use cachelock_policy_sdk::*;

struct MemBomb;

impl Policy for MemBomb {
    fn configure(_: &Config) -> Result<Self, String> {
        Ok(MemBomb)
    }
    fn on_wait(&mut self, _: &WaitState) -> WaitDecision {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            // Reserve without touching: the point is the memory cap, not the fuel limit.
            hoard.push(std::hint::black_box(Vec::with_capacity(1 << 20)));
            if hoard.len() == usize::MAX {
                break;
            }
        }
        WaitDecision::KeepWaiting(hoard.len() as u64)
    }
}

export_policy!(MemBomb);
