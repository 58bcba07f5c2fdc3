//! Fuzz target: `tp::fuzzing::control_messages` on arbitrary bytes (see src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tp::fuzzing::control_messages(data));
