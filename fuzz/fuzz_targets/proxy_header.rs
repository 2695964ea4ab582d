//! `cargo fuzz run proxy_header`: see `ntlm_tag_fuzz::proxy_header` for the input format and what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ntlm_tag_fuzz::proxy_header::check(data));
