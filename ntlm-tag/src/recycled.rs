//! A future in a heap block that goes back to a small per-thread stack of spares when the future is
//! dropped, for the next one of its size.
//!
//! Each request's future is several KiB and lives only as long as the request (an idle connection
//! holds none). Allocated from mimalloc anew for every request, a block that size is freed into one
//! of several pages and the next allocation rarely finds it: about 400 instructions a request went to
//! mimalloc's search for a free block and to retiring and making pages (callgrind), and the block came
//! back cold. The last block given back is the first taken (LIFO), so it is still in the cache.
//!
//! Written here because the crates that recycle heap storage (`recycle_box`) keep the block with
//! its owner, which would keep kilobytes with every idle connection.

use std::{
    alloc::{self, Layout},
    cell::RefCell,
    future::Future,
    pin::Pin,
    ptr::{self, NonNull},
    task::{Context, Poll},
};

/// Spare blocks kept per thread: enough for bursts of requests across many connections, at most
/// `KEPT` × the future's size (about 256 KiB per worker for the request's future).
const KEPT: usize = 32;

/// One thread's spare blocks, all of `layout`.
struct Spares {
    layout: Option<Layout>,
    blocks: Vec<NonNull<u8>>,
}

impl Drop for Spares {
    fn drop(&mut self) {
        if let Some(layout) = self.layout {
            for block in self.blocks.drain(..) {
                // SAFETY: each block was allocated with `layout` and is owned by this stack alone.
                unsafe { alloc::dealloc(block.as_ptr(), layout) };
            }
        }
    }
}

thread_local! {
    static SPARES: RefCell<Spares> = const {
        RefCell::new(Spares {
            layout: None,
            blocks: Vec::new(),
        })
    };
}

/// A spare block of `layout`, if this thread has one.
fn take_spare(layout: Layout) -> Option<NonNull<u8>> {
    SPARES
        .try_with(|spares| {
            let mut spares = spares.try_borrow_mut().ok()?;
            if spares.layout == Some(layout) {
                spares.blocks.pop()
            } else {
                None
            }
        })
        .ok()
        .flatten()
}

/// Keeps `block` (of `layout`, holding no value) as a spare, or frees it when the stack is full, holds
/// another size, or is gone (thread exit).
fn give_back(block: NonNull<u8>, layout: Layout) {
    let kept = SPARES
        .try_with(|spares| {
            let Ok(mut spares) = spares.try_borrow_mut() else {
                return false;
            };
            if spares.layout.is_none() {
                spares.layout = Some(layout);
            }
            if spares.layout != Some(layout) || spares.blocks.len() >= KEPT {
                return false;
            }
            spares.blocks.push(block);
            true
        })
        .unwrap_or(false);
    if !kept {
        // SAFETY: the block was allocated with `layout` and no longer holds a value.
        unsafe { alloc::dealloc(block.as_ptr(), layout) };
    }
}

/// A future in a heap block of its own that is recycled when it is dropped. Like `Pin<Box<F>>`,
/// the future never moves once made.
pub struct Recycled<F> {
    future: NonNull<F>,
}

// SAFETY: `Recycled<F>` owns its `F` exactly as a `Box<F>` does; the spare stacks are per thread and
// a block handed back on another thread simply joins that thread's stack.
unsafe impl<F: Send> Send for Recycled<F> {}
// SAFETY: as above; `&Recycled<F>` gives no access to the `F`.
unsafe impl<F: Sync> Sync for Recycled<F> {}

impl<F> Unpin for Recycled<F> {}

impl<F> Recycled<F> {
    /// Takes a spare block (or allocates one), then makes the future in it: made after the block
    /// exists, a future of kilobytes is written in place rather than built on the stack and copied.
    pub fn make(make: impl FnOnce() -> F) -> Self {
        let layout = Layout::new::<F>();
        if layout.size() == 0 {
            // A zero-sized value needs no block (and allocating zero bytes is not allowed).
            let future = NonNull::<F>::dangling();
            // SAFETY: writing a zero-sized value through a dangling, aligned pointer is allowed.
            unsafe { future.as_ptr().write(make()) };
            return Recycled { future };
        }
        let block = take_spare(layout).unwrap_or_else(|| {
            // SAFETY: `layout` has a non-zero size.
            let raw = unsafe { alloc::alloc(layout) };
            NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout))
        });
        // Should `make` panic, the empty block goes back rather than leaking.
        let unfilled = Unfilled { block, layout };
        let future = block.cast::<F>();
        // SAFETY: the block is `layout`-sized and aligned for `F`, and holds no value.
        unsafe { future.as_ptr().write(make()) };
        std::mem::forget(unfilled);
        Recycled { future }
    }
}

/// A block that does not hold a value yet: given back if dropped.
struct Unfilled {
    block: NonNull<u8>,
    layout: Layout,
}

impl Drop for Unfilled {
    fn drop(&mut self) {
        give_back(self.block, self.layout);
    }
}

impl<F: Future> Future for Recycled<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: the `F` lives in its block from `new` until `drop` and is never moved out, so it
        // is pinned; `self` is borrowed mutably, so this is the only reference to it.
        let future = unsafe { Pin::new_unchecked(&mut *self.future.as_ptr()) };
        future.poll(cx)
    }
}

impl<F> Drop for Recycled<F> {
    fn drop(&mut self) {
        let layout = Layout::new::<F>();
        // SAFETY: the block holds a live `F` (written in `new`, never moved out); it is dropped
        // once, here, in place, as a pinned value must be.
        unsafe { ptr::drop_in_place(self.future.as_ptr()) };
        if layout.size() != 0 {
            give_back(self.future.cast::<u8>(), layout);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        rc::Rc,
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        task::Waker,
    };

    use super::*;

    /// Counts its drops; answers its value on the second poll (one `Pending` first).
    struct Probe {
        value: [u64; 64],
        polled: bool,
        drops: Arc<AtomicUsize>,
    }

    impl Future for Probe {
        type Output = u64;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u64> {
            if self.polled {
                Poll::Ready(self.value.iter().sum())
            } else {
                self.polled = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            self.drops.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn probe(n: u64, drops: &Arc<AtomicUsize>) -> Probe {
        Probe {
            value: [n; 64],
            polled: false,
            drops: Arc::clone(drops),
        }
    }

    fn run<F: Future>(mut f: Recycled<F>) -> F::Output {
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            if let Poll::Ready(v) = Pin::new(&mut f).poll(&mut cx) {
                return v;
            }
        }
    }

    #[test]
    fn a_future_runs_to_its_value_and_is_dropped_once_in_place() {
        let drops = Arc::new(AtomicUsize::new(0));
        assert_eq!(run(Recycled::make(|| probe(2, &drops))), 128);
        assert_eq!(drops.load(Ordering::Relaxed), 1);
        // Dropped before it finished, too.
        drop(Recycled::make(|| probe(1, &drops)));
        assert_eq!(drops.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn the_last_block_given_back_is_the_next_taken_and_the_stack_is_bounded() {
        let drops = Arc::new(AtomicUsize::new(0));
        let first = Recycled::make(|| probe(1, &drops));
        let block = first.future.cast::<u8>();
        drop(first);
        let second = Recycled::make(|| probe(2, &drops));
        assert_eq!(
            second.future.cast::<u8>(),
            block,
            "the spare block is reused"
        );
        assert_eq!(run(second), 128);
        // More live futures than the stack keeps: all run, and at most KEPT blocks stay.
        let many: Vec<_> = (0..KEPT as u64 * 2)
            .map(|i| Recycled::make(|| probe(i, &drops)))
            .collect();
        drop(many);
        let kept = SPARES.with(|s| s.borrow().blocks.len());
        assert_eq!(kept, KEPT);
        assert_eq!(drops.load(Ordering::Relaxed), 2 + KEPT * 2);
    }

    #[test]
    fn futures_of_another_size_and_zero_sized_ones_are_never_given_a_wrong_block() {
        let drops = Arc::new(AtomicUsize::new(0));
        drop(Recycled::make(|| probe(1, &drops)));
        // Another layout: its own allocation, freed rather than kept beside blocks of another size.
        let small = Recycled::make(|| async { 7u8 });
        assert_eq!(run(small), 7);
        let zero = Recycled::make(std::future::pending::<()>);
        assert_eq!(Layout::for_value(&std::future::pending::<()>()).size(), 0);
        drop(zero);
        // A value that is not Send still runs (the type only lacks Send then).
        let local = Rc::new(5u32);
        assert_eq!(run(Recycled::make(|| async move { *local })), 5);
        // A panic while making the future gives the block back.
        let made = std::panic::catch_unwind(|| Recycled::<Probe>::make(|| panic!("not made")));
        assert!(made.is_err());
    }
}
