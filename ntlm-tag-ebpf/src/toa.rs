//! TOA: finding the option in a TCP header in packet memory. Shared by the sock_ops program and the
//! test-only XDP program that runs it on crafted packets with `BPF_PROG_TEST_RUN`. The parsing itself
//! is `ntlm_tag_common::find_toa`, the same function the unit tests and the fuzzer exercise.

use ntlm_tag_common::{ToaOption, find_toa};

/// Finds the TOA option of `kind` in the TCP header at packet address `tcp` (packet end `end`).
/// The options are first copied into `buf` with constant-offset packet loads (TCP options come in
/// 4-byte words): packet access at variable offsets does not pass older verifiers, map memory does.
#[inline(always)]
pub fn find_in_packet(kind: u8, tcp: usize, end: usize, buf: &mut [u8; 64]) -> ToaOption {
    // Fixed TCP header: 20 bytes; byte 12 holds the data offset in 32-bit words.
    if tcp + 20 > end {
        return ToaOption::Absent;
    }
    // SAFETY: tcp + 20 <= end was checked above.
    let doff = unsafe { *((tcp + 12) as *const u8) } >> 4;
    let options_len = (doff as usize * 4).saturating_sub(20);
    let mut copied = 0usize;
    macro_rules! copy_word {
        ($w:literal) => {
            if copied == $w * 4 && options_len > $w * 4 && tcp + 20 + $w * 4 + 4 <= end {
                let p = (tcp + 20 + $w * 4) as *const u8;
                // SAFETY: tcp + 20 + 4w + 4 <= end was checked just above.
                unsafe {
                    buf[$w * 4] = *p;
                    buf[$w * 4 + 1] = *p.add(1);
                    buf[$w * 4 + 2] = *p.add(2);
                    buf[$w * 4 + 3] = *p.add(3);
                }
                copied += 4;
            }
        };
    }
    copy_word!(0);
    copy_word!(1);
    copy_word!(2);
    copy_word!(3);
    copy_word!(4);
    copy_word!(5);
    copy_word!(6);
    copy_word!(7);
    copy_word!(8);
    copy_word!(9);
    // Options the header claims but the packet does not hold: the parser sees the area cut where
    // the copy ends. `find_toa` never reads at or past its `len` and its result does not depend on
    // bytes past it (both fuzzed), so this gives what a `None`-past-`copied` accessor over the
    // claimed length would: a TOA option running into the missing bytes is malformed, anything
    // else there absent. The accessor itself is total, one constant-offset or masked load with no
    // branch: an `Option` per byte made the compiler keep values alive across branches that
    // only newer verifiers can correlate (5.10: "invalid read from stack"), and multiplied the
    // paths the verifier walks (6.12: "the sequence of 8193 jumps is too complex").
    let buf = &*buf;
    find_toa(kind, copied, |i| Some(buf[i & 63]))
}
