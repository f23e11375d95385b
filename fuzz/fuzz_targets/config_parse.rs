//! Fuzzes the configuration parser: any input must give a `Config` or an error message,
//! never a panic, and an error must say where (a line) or what (a key) when it can.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(config) = cachelock::config::Config::parse(text) {
            // Whatever parsed must be usable: rules resolve for any lock name.
            let _ = config.lock_settings("fuzz");
        }
    }
});
