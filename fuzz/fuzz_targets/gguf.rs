//! Fuzz target: `tp::fuzzing::gguf` on arbitrary bytes (see src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tp::fuzzing::gguf(data));
