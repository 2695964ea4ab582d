//! `cargo fuzz run ntlm_message`: see `ntlm_tag_fuzz::ntlm_message` for the input format and what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ntlm_tag_fuzz::ntlm_message::check(data));
