//! `cargo fuzz run header_sanitisation`: see `ntlm_tag_fuzz::header_sanitisation` for the input format and what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ntlm_tag_fuzz::header_sanitisation::check(data));
