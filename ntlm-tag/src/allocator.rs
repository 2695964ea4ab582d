//! The gateway's global allocator: mimalloc, asked for an alignment only when a type needs more
//! than a word.
//!
//! mimalloc's thread-local free lists serve the per-request allocations (header maps, the request's
//! future of several KiB, buffers) in a few dozen instructions; glibc's general-purpose paths cost
//! several times that. The `mimalloc` crate's allocator passes every layout to `mi_malloc_aligned`,
//! and mimalloc 3 serves an aligned request of more than 1 KiB whose size class is not a power of two
//! by over-allocating and aligning inside the block, even for an alignment of 8: several times the
//! instructions of a plain allocation, and the page is marked as holding interior pointers, which
//! slows every free on it. The request's future took that path on every request. Every mimalloc
//! block is aligned to at least a word (mimalloc's own `mi_realloc_aligned` takes the same shortcut),
//! so word-aligned layouts use the plain calls; larger alignments (tokio's task cells, 128) keep the
//! aligned ones.

use std::{
    alloc::{GlobalAlloc, Layout},
    ffi::c_void,
};

use libmimalloc_sys as mi;

/// The alignment every mimalloc block has, whatever its size.
const WORD: usize = std::mem::size_of::<usize>();

/// mimalloc, with plain calls for word-aligned layouts. Set with `#[global_allocator]`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Allocator;

// SAFETY: every method hands the layout to the mimalloc call that honours it: the plain calls return
// word-aligned blocks of at least the size asked for, the aligned calls blocks of the alignment asked
// for; `mi_free` and the reallocation calls accept any block either kind returned.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's allocation calls have no preconditions; null reports failure.
        unsafe {
            if layout.align() <= WORD {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        unsafe {
            if layout.align() <= WORD {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: the caller passes a block this allocator returned, once.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller passes a live block this allocator returned with `layout`; the new
        // block keeps that alignment.
        unsafe {
            if layout.align() <= WORD {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes around mimalloc's size-class edges and the gateway's large futures.
    const SIZES: [usize; 14] = [
        1, 7, 8, 9, 24, 100, 384, 1000, 1025, 1300, 4096, 7896, 8200, 70_000,
    ];
    const ALIGNS: [usize; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 4096];

    #[test]
    fn every_block_has_its_layouts_alignment_and_keeps_its_bytes_through_realloc() {
        let allocator = Allocator;
        for &size in &SIZES {
            for &align in &ALIGNS {
                let layout = Layout::from_size_align(size, align).expect("valid layout");
                for zeroed in [false, true] {
                    // SAFETY: non-zero size; the block is written only within its size, grown
                    // by `realloc` with the same layout, and freed once.
                    unsafe {
                        let p = if zeroed {
                            allocator.alloc_zeroed(layout)
                        } else {
                            allocator.alloc(layout)
                        };
                        assert!(!p.is_null(), "size {size} align {align}");
                        assert_eq!(p as usize % align, 0, "size {size} align {align}");
                        if zeroed {
                            assert!(
                                std::slice::from_raw_parts(p, size).iter().all(|&b| b == 0),
                                "size {size} align {align}: not zeroed"
                            );
                        }
                        for i in 0..size {
                            p.add(i).write(i as u8);
                        }
                        let grown = allocator.realloc(p, layout, size * 3);
                        assert!(!grown.is_null());
                        assert_eq!(
                            grown as usize % align,
                            0,
                            "realloc: size {size} align {align}"
                        );
                        for i in 0..size {
                            assert_eq!(grown.add(i).read(), i as u8, "realloc lost byte {i}");
                        }
                        allocator.dealloc(
                            grown,
                            Layout::from_size_align(size * 3, align).expect("valid layout"),
                        );
                    }
                }
            }
        }
    }
}
