//! See `kabao::fuzzing::campaign_body` for what must hold on every input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kabao::fuzzing::campaign_body(data));
