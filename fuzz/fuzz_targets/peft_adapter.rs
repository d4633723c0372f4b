#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| memlora::fuzzing::peft_adapter(data));
