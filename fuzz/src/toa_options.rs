//! TCP options → TOA: `ntlm_tag_common::find_toa`, the very function the eBPF program runs
//! (`ntlm-tag-ebpf/src/toa.rs` calls it on the options copied out of the packet). Shared, not
//! mirrored: fuzzing it fuzzes the kernel's parser logic.
//!
//! Input: `kind`, `len`, `mode`, then option bytes. `len` is the options length the caller claims
//! (0..=255, beyond the 40 a TCP header can hold, to check the parser's own bound). `mode` picks
//! the byte accessor:
//! - bit 0 clear, *slice*: `byte(i)` is the i-th option byte while there is one, even past `len`
//!   (a caller handing over the options followed by the payload);
//! - bit 0 set, *eBPF*: the call `toa.rs` makes: `len` is a data offset's options length (a
//!   multiple of 4 up to 40: `4 * (len % 11)`), the options are copied in 4-byte words while the
//!   packet (the input's bytes) holds them, and the accessor answers `None` past what was copied.
//!
//! Checked:
//! - no `byte(i)` with `i >= len`, none at `i >= 64` (the eBPF copy buffer). (Two such reads were
//!   found by this target and fixed: the length byte of a kind byte that was the last byte within
//!   `len`, and the port bytes of a too-short option of the TOA kind; see `regressions/toa_options/`.)
//! - `Found` only for an option of `kind` with length 8 or 20 lying wholly within `len` and the
//!   accessor's bytes, reached by walking the list, with the address and port it carries
//!   (IPv4 v4-mapped);
//! - kinds 0 and 1 (end of list, no-op; 0 also means "TOA off") are never `Found`;
//! - the result does not depend on bytes past `len`.
use ntlm_tag_common::{TCP_MAX_OPTION_BYTES, ToaClient, ToaOption, find_toa, v4_mapped};
use std::cell::RefCell;

/// One decoded input.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub kind: u8,
    pub len: usize,
    pub ebpf: bool,
    pub bytes: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn decode(data: &'a [u8]) -> Option<Self> {
        let [kind, len, mode, bytes @ ..] = data else {
            return None;
        };
        let ebpf = mode & 1 == 1;
        Some(Input {
            kind: *kind,
            len: if ebpf {
                4 * (*len as usize % 11)
            } else {
                *len as usize
            },
            ebpf,
            bytes: &bytes[..bytes.len().min(256)],
        })
    }

    /// How many bytes the accessor answers for.
    fn visible(&self) -> usize {
        if self.ebpf {
            // toa.rs: whole 4-byte words, while `options_len` and the packet both have them.
            (self.bytes.len() / 4).min(self.len / 4) * 4
        } else {
            self.bytes.len()
        }
    }
}

/// Runs `find_toa` and returns its result and every index it asked for.
pub fn run(input: &Input<'_>, visible: usize) -> (ToaOption, Vec<usize>) {
    let reads = RefCell::new(Vec::new());
    let result = find_toa(input.kind, input.len, |i| {
        reads.borrow_mut().push(i);
        if i < visible {
            input.bytes.get(i).copied()
        } else {
            None
        }
    });
    (result, reads.into_inner())
}

pub fn check(data: &[u8]) {
    let Some(input) = Input::decode(data) else {
        return;
    };
    let visible = input.visible();
    let (result, reads) = run(&input, visible);

    for &i in &reads {
        assert!(
            i < 64,
            "read byte {i} (past the 64-byte eBPF copy buffer): {input:?}"
        );
        assert!(
            i < input.len,
            "read byte {i}, at or past len {}: {input:?} -> {result:?}",
            input.len
        );
    }

    if input.kind <= 1 {
        assert!(
            !matches!(result, ToaOption::Found(_)),
            "kind {} found: {input:?} -> {result:?}",
            input.kind
        );
    }

    if let ToaOption::Found(found) = result {
        let bound = input.len.min(visible);
        assert_eq!(
            walk_to_kind(&input, bound),
            Some(found),
            "Found without a well-formed option of kind {} within {bound} bytes: {input:?}",
            input.kind
        );
    }

    // Bytes past `len` must not matter: the accessor cut at `len` gives the same result.
    let bounded = visible.min(input.len);
    let (cut, _) = run(&input, bounded);
    assert_eq!(
        result, cut,
        "bytes past len {} changed the result: {input:?}",
        input.len
    );
}

/// The TOA option the list holds, found by walking it as RFC 9293 §3.1 describes: options start
/// within the 40-byte options area and end within `bound` bytes.
fn walk_to_kind(input: &Input<'_>, bound: usize) -> Option<ToaClient> {
    let opts = &input.bytes[..bound.min(input.bytes.len())];
    let mut off = 0;
    while off < opts.len() && off < TCP_MAX_OPTION_BYTES {
        match opts[off] {
            0 => return None,
            1 => off += 1,
            k => {
                let l = *opts.get(off + 1)? as usize;
                if l < 2 || off + l > opts.len() {
                    return None;
                }
                if k == input.kind {
                    let o = &opts[off..off + l];
                    let port = u16::from_be_bytes([o[2], o[3]]);
                    return match l {
                        8 => Some(ToaClient {
                            addr: v4_mapped([o[4], o[5], o[6], o[7]]),
                            port,
                        }),
                        20 => Some(ToaClient {
                            addr: o[4..20].try_into().ok()?,
                            port,
                        }),
                        _ => None,
                    };
                }
                off += l;
            }
        }
    }
    None
}
