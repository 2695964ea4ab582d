//! `cargo fuzz run http1_forward`: see `ntlm_tag_fuzz::http1_forward` for the input format and what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ntlm_tag_fuzz::http1_forward::check(data));
