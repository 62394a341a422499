//! The threads the CPU kernels compute on. Every parallel kernel (the project's and candle's) splits its
//! work over rayon's threads; called from a thread outside the pool, it hands all of the work over and
//! sleeps until the pool wakes it again — twice per op, for thousands of ops per training step. A thread
//! that drives a model (the engine, a command) therefore runs as one of the pool's own threads, which
//! takes a share of each op and waits for nobody to wake it (a 512 px SDXL bf16 step on two cores, in
//! alternating runs: 6.8-7.1 s driven from outside the pool, 6.2-6.8 s from inside).

use std::sync::OnceLock;

use rayon::{ThreadPool, ThreadPoolBuilder};

/// Runs `work` on a thread of the compute pool (at once when the calling thread is a pool thread already)
/// and returns its result; a panic in `work` resumes on the caller.
pub fn on_compute_threads<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    match compute_pool() {
        Some(pool) if rayon::current_thread_index().is_none() => pool.install(work),
        _ => work(),
    }
}

/// Returns the memory the allocator holds free on the compute threads and the calling thread to the system
/// now, where the binary's allocator (mimalloc) keeps freed memory for a long while so that a training
/// step reuses its pages instead of faulting them in again: at the end of a phase whose memory the next
/// one does not reuse (a forward pass without gradients before training, a preview between steps). A
/// no-op for memory of any other allocator.
pub fn return_free_memory() {
    let collect = || {
        // SAFETY: collecting a thread's own heap is allowed at any time; with a heap never used it does
        // nothing.
        unsafe { libmimalloc_sys::mi_collect(true) }
    };
    if let Some(pool) = compute_pool() {
        pool.broadcast(|_| collect());
    }
    collect();
}

/// As many threads as rayon's global pool (`RAYON_NUM_THREADS`, else the processor's), made once; `None`
/// when the system refuses threads, and the work then runs where it is called.
fn compute_pool() -> Option<&'static ThreadPool> {
    static POOL: OnceLock<Option<ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|index| format!("lora-studio-compute-{index}"))
            .build()
            .ok()
    })
    .as_ref()
}

#[cfg(test)]
mod tests {
    use super::on_compute_threads;

    #[test]
    fn work_runs_on_a_pool_thread_that_takes_part_in_parallel_loops() {
        use rayon::prelude::*;
        assert!(rayon::current_thread_index().is_none());
        let (index, sum) = on_compute_threads(|| {
            let sum: u64 = (0..10_000u64).into_par_iter().sum();
            (rayon::current_thread_index(), sum)
        });
        assert!(index.is_some(), "the work ran outside the pool");
        assert_eq!(sum, 49_995_000);
        // Nested calls run in place.
        let nested = on_compute_threads(|| {
            let outer = std::thread::current().id();
            on_compute_threads(move || std::thread::current().id() == outer)
        });
        assert!(nested);
    }

    #[test]
    fn free_memory_goes_back_from_inside_the_pool_and_from_outside_it() {
        // Called between the phases of a run on a pool thread, and by the engine outside the pool; the
        // pool's threads each collect their own heap, the caller's among them, without waiting on it.
        let held: Vec<Vec<u8>> = (0..4).map(|i| vec![i; 1 << 20]).collect();
        drop(held);
        let inside = on_compute_threads(|| {
            super::return_free_memory();
            rayon::current_thread_index()
        });
        assert!(inside.is_some());
        super::return_free_memory();
        assert_eq!(on_compute_threads(|| 2 + 2), 4, "the pool still runs work");
    }

    #[test]
    fn a_panic_in_the_work_reaches_the_caller() {
        let caught = std::panic::catch_unwind(|| on_compute_threads(|| panic!("in the pool")));
        assert!(caught.is_err());
    }
}
