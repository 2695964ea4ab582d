//! Test harness for ntlm-tag integration tests.
