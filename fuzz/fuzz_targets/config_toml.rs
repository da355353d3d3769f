//! Fuzzes `Config::from_toml`. Beyond "never panics": a config that passes
//! validation prints (`check-config`) as TOML that parses back to the same
//! config, so what an operator sees is what runs.
#![no_main]

use esl_agent::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(text) {
        Ok(config) => {
            let shown = config.redacted_toml();
            let again = Config::from_toml(&shown)
                .unwrap_or_else(|e| panic!("redacted config does not re-parse: {e}\n{shown}"));
            if config.mqtt.password.is_none() {
                assert_eq!(again, config, "printed config differs from the one that runs");
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
