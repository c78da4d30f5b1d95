//! See `kabao::fuzzing::ping_body` for what must hold on every input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kabao::fuzzing::ping_body(data));
