#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gitfleet::fuzzing::ws_frames(data));
