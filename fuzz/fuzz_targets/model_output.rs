#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| memlora::fuzzing::model_output(data));
