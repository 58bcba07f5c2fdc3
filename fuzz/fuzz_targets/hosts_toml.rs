//! Fuzz target: `tp::fuzzing::hosts_toml` on arbitrary bytes (see src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tp::fuzzing::hosts_toml(data));
