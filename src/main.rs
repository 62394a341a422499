//! The `lora-studio` binary: the desktop app, or a headless command.

/// Training allocates and frees tensors of hundreds of megabytes every step; mimalloc keeps those pages
/// mapped for reuse where the system allocator returns them to the kernel and faults them in again.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (mimalloc.h): how long freed memory stays mapped before it is
/// returned to the kernel.
const PURGE_DELAY_OPTION: libmimalloc_sys::mi_option_t = 15;
const PURGE_DELAY_MS: std::ffi::c_long = 3_600_000;

/// How often candle's own worker threads (behind its parallel element-wise ops) spin before they sleep.
const CANDLE_SPIN_LIMIT: &str = "0";

fn main() -> std::process::ExitCode {
    // A training step frees its activations in the backward pass and needs as much again in the next
    // forward pass, seconds later; returned to the kernel after mimalloc's default 10 ms, they would be
    // faulted in and zeroed again every step (15-25 % of an SD 1.5 step on the CPU). The delay counts
    // from the first free of a 32 MiB segment that is not yet due, and when it is due every span then
    // free in the segment goes back, freed a moment ago or not: with a minute an SDXL run still faulted
    // in 1,500-10,000 pages a step. With an hour that happens once an hour; memory that the steps do not
    // reuse (what a forward pass without gradients or a preview left) goes back when that phase ends
    // (`kernels::return_free_memory`).
    // SAFETY: setting an option is thread-safe; it applies to later purges.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY_OPTION, PURGE_DELAY_MS) };
    // candle looks up the thread count before every CPU matrix product; without RAYON_NUM_THREADS that
    // means parsing /proc/cpuinfo (35 µs; 1 % of a 512 px step's samples, on the thread that runs the
    // graph). Setting the variable to candle's own answer keeps the count and ends the re-reading.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        // SAFETY: no other thread has been started yet, so none reads the environment meanwhile.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
    // candle's parallel element-wise ops run on its own pool, whose workers spin for 25,000 pauses
    // (half a millisecond) after each op; the products that follow run on the compute threads, which
    // then share the cores with a spinning thread (3 % of an SDXL step's samples on two cores).
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: as above, no other thread runs yet.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT) };
    }
    lora_studio::cli::run()
}
