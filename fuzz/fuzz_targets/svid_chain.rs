#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sigil_fuzz::targets::svid_chain::run(data));
