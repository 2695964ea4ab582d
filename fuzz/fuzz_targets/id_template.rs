//! `cargo fuzz run id_template`: see `ntlm_tag_fuzz::id_template` for the input format and what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ntlm_tag_fuzz::id_template::check(data));
