//! Proof that a failing test's result comes back from where the tests ran: with
//! `NTLM_TAG_VM_SELFTEST_FAIL=1` this test fails on purpose, so `cargo xtask integration-test`
//! must report FAIL for every kernel and exit non-zero (the guest's exit code and output really
//! reach the host). Without the variable it passes.

#[test]
fn fails_on_purpose_when_asked() {
    let asked = std::env::var("NTLM_TAG_VM_SELFTEST_FAIL").is_ok_and(|v| v == "1");
    assert!(
        !asked,
        "failing on purpose (NTLM_TAG_VM_SELFTEST_FAIL=1), kernel {}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
}
