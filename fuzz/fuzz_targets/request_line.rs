#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| memlora::fuzzing::request_line(data));
