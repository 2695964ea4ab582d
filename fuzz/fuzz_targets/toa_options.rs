//! `cargo fuzz run toa_options`: see `ntlm_tag_fuzz::toa_options` for the input format and what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ntlm_tag_fuzz::toa_options::check(data));
