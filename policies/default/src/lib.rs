//! `builtin:default`: rank = the caller's `--priority`, FIFO among equals, wait until the
//! caller's bound; dockerd: 300 s start timeout, retry after 5 s up to 5 attempts on the
//! containerd time-out line, 30 s stop grace. All of it is the SDK's defaults.
use cachelock_policy_sdk::*;

struct DefaultPolicy;

impl Policy for DefaultPolicy {
    fn configure(config: &Config) -> Result<Self, String> {
        config.deny_unknown(&[])?;
        Ok(DefaultPolicy)
    }
}

export_policy!(DefaultPolicy);
