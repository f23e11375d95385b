//! Test policy: `configure` refuses every configuration.
use cachelock_policy_sdk::*;

struct Refuse;

impl Policy for Refuse {
    fn configure(config: &Config) -> Result<Self, String> {
        Err(format!(
            "test-configure-error refuses every configuration ({} keys given)",
            config.entries().len()
        ))
    }
}

export_policy!(Refuse);
