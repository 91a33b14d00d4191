#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gitfleet::fuzzing::fleet_file(data));
