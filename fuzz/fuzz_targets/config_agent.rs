#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sigil_fuzz::targets::config_agent::run(data));
