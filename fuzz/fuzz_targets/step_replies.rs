//! Fuzz target: `tp::fuzzing::step_replies` on arbitrary bytes (see src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tp::fuzzing::step_replies(data));
