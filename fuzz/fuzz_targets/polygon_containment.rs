//! See `kabao::fuzzing::polygon_containment` for what must hold on every input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kabao::fuzzing::polygon_containment(data));
