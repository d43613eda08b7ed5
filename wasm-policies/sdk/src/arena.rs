//! The allocator for one-decision instances: a bump arena in the module's initial memory.
//!
//! The relay instantiates a policy for every decision and throws the instance away after it, so
//! freeing memory is wasted work, and so is growing it: with Rust's default allocator the first
//! allocation of every decision calls `memory.grow`, which the host pays for with `mprotect`
//! calls and a TLB shootdown when the slot is reset. This arena lives in `.bss`, inside the
//! initial memory: allocations are a pointer bump, nothing is freed, nothing grows. A decision
//! that needs more than the arena (256 KiB) continues on the default allocator, still under the
//! relay's memory cap.
//!
//! Enabled by the SDK's default `arena` feature; turn it off (`default-features = false`) to use
//! your own `#[global_allocator]`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicUsize, Ordering};

const ARENA_BYTES: usize = 256 << 10;

#[repr(C, align(16))]
struct Arena(UnsafeCell<[u8; ARENA_BYTES]>);

// SAFETY: the arena's bytes are only handed out through `BumpAllocator`, which gives each byte
// to at most one allocation (the offset only moves forward, except to extend the most recent
// allocation in place).
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena(UnsafeCell::new([0; ARENA_BYTES]));
/// Offset of the first free byte of the arena.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Bump allocation in [`ARENA`], falling back to the system allocator when it is full.
pub struct BumpAllocator;

impl BumpAllocator {
    fn base() -> usize {
        ARENA.0.get() as usize
    }

    fn owns(ptr: *mut u8) -> bool {
        let p = ptr as usize;
        p >= Self::base() && p < Self::base() + ARENA_BYTES
    }

    /// A fresh block of the arena, or `None` when it does not fit.
    fn bump(layout: Layout) -> Option<*mut u8> {
        let base = Self::base();
        let next = NEXT.load(Ordering::Relaxed);
        let start = (base + next).checked_next_multiple_of(layout.align())?;
        let end = start.checked_add(layout.size())?;
        if end - base > ARENA_BYTES {
            return None;
        }
        NEXT.store(end - base, Ordering::Relaxed);
        Some(start as *mut u8)
    }
}

// SAFETY: every block returned is either a fresh, suitably aligned, unshared range of the arena,
// or comes from `System` with the same layout; blocks are returned to `System` only if they came
// from it.
unsafe impl GlobalAlloc for BumpAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match Self::bump(layout) {
            Some(ptr) => ptr,
            // SAFETY: forwarding the caller's valid layout.
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !Self::owns(ptr) {
            // SAFETY: not ours, so `System` allocated it with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
        // Arena blocks are released all at once, when the relay drops the instance.
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let base = Self::base();
        let next = NEXT.load(Ordering::Relaxed);
        // The most recent arena block grows (or shrinks) in place when there is room: the common
        // case of a `Vec` or `String` being built.
        if Self::owns(ptr) && ptr as usize + layout.size() == base + next {
            let end = ptr as usize + new_size;
            if end - base <= ARENA_BYTES {
                NEXT.store(end - base, Ordering::Relaxed);
                return ptr;
            }
        }
        // SAFETY: the caller guarantees `layout.align()` with `new_size` is a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: a valid, non-zero-size layout (as for the original block).
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are valid for the smaller of the two sizes and do not overlap
            // (the new block is fresh).
            unsafe { std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
            // SAFETY: `ptr` was allocated by this allocator with `layout`.
            unsafe { self.dealloc(ptr, layout) };
        }
        new
    }
}
