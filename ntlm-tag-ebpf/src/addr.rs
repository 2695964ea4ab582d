//! 16-byte addresses (IPv4 v4-mapped) built and stored a 32-bit word at a time. Built from bytes,
//! the compiler moves them a byte at a time on BPF, and zeroes them with a call to a byte-by-byte
//! `memset` loop: several hundred instructions per connection or packet.

use ntlm_tag_common::LpmAddr;

/// The third word of an IPv4-mapped address, `::ffff:0:0/96`, as it lies in memory.
const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// `v4` (as it lies in the packet or the socket, network byte order) IPv4-mapped.
#[inline(always)]
pub fn v4_mapped_words(v4: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_PREFIX, v4]
}

/// The same as [`ntlm_tag_common::v4_mapped`], built from words.
#[inline(always)]
pub fn v4_mapped(v4: [u8; 4]) -> LpmAddr {
    from_words(v4_mapped_words(u32::from_ne_bytes(v4)))
}

#[inline(always)]
pub fn from_words(words: [u32; 4]) -> LpmAddr {
    // SAFETY: [u32; 4] and [u8; 16] have the same size and every bit pattern is valid for both.
    unsafe { core::mem::transmute::<[u32; 4], LpmAddr>(words) }
}

/// Stores `words` into the address field at `field` with four word stores (volatile, so that the
/// compiler does not turn an all-zero address back into a `memset` call).
///
/// # Safety
/// `field` must be valid for writes and 4-byte aligned (every address field of the shared structs
/// sits at a multiple of 16 in an 8-aligned struct).
#[inline(always)]
pub unsafe fn store(field: *mut LpmAddr, words: [u32; 4]) {
    let field = field.cast::<u32>();
    // SAFETY: the caller guarantees a valid, aligned 16-byte destination.
    unsafe {
        field.write_volatile(words[0]);
        field.add(1).write_volatile(words[1]);
        field.add(2).write_volatile(words[2]);
        field.add(3).write_volatile(words[3]);
    }
}
