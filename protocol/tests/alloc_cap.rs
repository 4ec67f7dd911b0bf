//! Decoding arbitrary bytes never allocates past the codec's bound, whatever lengths they claim.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use banger_protocol::codec::{self, DECODE_LIMIT};
use banger_protocol::{Request, Response};
use proptest::prelude::*;

/// Records the largest single allocation made through it.
struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call unchanged to the system allocator; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn largest_during(f: impl FnOnce()) -> usize {
    LARGEST.store(0, Ordering::Relaxed);
    f();
    LARGEST.load(Ordering::Relaxed)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn decoding_garbage_stays_under_the_cap(
        tag in 0u8..16,
        lens in prop::collection::vec(any::<u64>(), 0..4),
        tail in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        // A variant tag, then varint-encoded huge lengths (0xFD = u64 follows), then noise.
        let mut bytes = vec![tag];
        for l in lens {
            bytes.push(0xFD);
            bytes.extend_from_slice(&l.to_le_bytes());
        }
        bytes.extend_from_slice(&tail);
        let largest = largest_during(|| {
            let _ = codec::decode::<Request>(&bytes);
            let _ = codec::decode::<Response>(&bytes);
        });
        prop_assert!(largest <= DECODE_LIMIT, "allocated {largest} bytes");
    }
}
