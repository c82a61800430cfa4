//! The serving path's steady state does not allocate: after the retriever has answered every
//! query once (its pooled working memory grown to their lengths), answering them all again
//! through `retrieve_into` makes no heap allocation, with and without the rerank, on any
//! thread. Counted by a global allocator, so this file holds a single test (nothing else may
//! run in the process meanwhile).
//!
//! One amortised allocation is outside the engine and is bounded, not excluded: a query from a
//! thread outside the thread pool hands each of its parallel steps to the pool through rayon's
//! shared queue, which allocates a block of storage per 63 jobs (a few jobs per query here:
//! one allocation per ~25 queries). From a pool thread the steps go on the thread's own deque
//! and nothing is allocated at all.

mod common;

use rrra::data::beir::read_queries;
use rrra::retriever::{HitRef, Retriever, RetrieverOptions};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_during(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    f();
    ALLOCATIONS.load(Ordering::SeqCst) - before
}

#[test]
fn steady_state_queries_do_not_allocate() {
    let t = common::tiny_cranfield();
    let r = Retriever::open(
        &t.model,
        &t.store,
        &RetrieverOptions {
            adapter: Some(t.adapter.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let queries = read_queries(&common::shared().join("data/cranfield/queries.jsonl")).unwrap();
    let texts: Vec<&str> = queries.iter().map(|q| q.text.as_str()).collect();
    let k = 10;
    let mut hits: Vec<HitRef<'_>> = Vec::with_capacity(k);
    // Warm-up, and the borrowed hits against the batch API on the same query alone (a batch of
    // many is encoded through the many-row GEMM: the same hits up to the last bits).
    for rerank in [false, true] {
        for q in &texts {
            let want = r.retrieve_batch(&[q], k, rerank).unwrap().pop().unwrap();
            r.retrieve_into(q, k, rerank, &mut hits).unwrap();
            let got: Vec<_> = hits.iter().map(HitRef::to_hit).collect();
            assert_eq!(got, want, "{q}");
        }
    }

    // From a pool thread (where a service's own parallel work runs): nothing at all.
    let (mut ids, mut p_sum) = (0usize, 0.0f64);
    let inside = allocations_during(|| {
        rayon::scope(|_| {
            for rerank in [false, true] {
                for q in &texts {
                    r.retrieve_into(q, k, rerank, &mut hits).unwrap();
                    ids += hits.iter().map(|h| h.id.len()).sum::<usize>();
                    p_sum += hits.iter().filter_map(|h| h.adapter_p).sum::<f32>() as f64;
                }
            }
        })
    });
    assert!(ids > 0 && p_sum > 0.0, "the queries returned hits");
    assert_eq!(inside, 0, "allocations in {} queries", 2 * texts.len());

    // From this (non-pool) thread: only the shared queue's blocks, one per 63 jobs. The bound
    // (one per 10 queries) leaves room for a few more parallel steps per query; the path
    // before the pooled working memory made several hundred allocations per query.
    let n = 2 * texts.len();
    let outside = allocations_during(|| {
        for rerank in [false, true] {
            for q in &texts {
                r.retrieve_into(q, k, rerank, &mut hits).unwrap();
            }
        }
    });
    assert!(outside <= n / 10, "{outside} allocations in {n} queries");
}
