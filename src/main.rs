//! The `lora-studio` binary: the desktop app, or a headless command.

/// Training allocates and frees tensors of hundreds of megabytes every step; mimalloc keeps those pages
/// mapped for reuse where the system allocator returns them to the kernel and faults them in again.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (mimalloc.h): how long freed memory stays mapped before it is
/// returned to the kernel.
const PURGE_DELAY_OPTION: libmimalloc_sys::mi_option_t = 15;
const PURGE_DELAY_MS: std::ffi::c_long = 60_000;

fn main() -> std::process::ExitCode {
    // A training step frees its activations in the backward pass and needs as much again in the next
    // forward pass, seconds later; returned to the kernel after mimalloc's default second, they would be
    // faulted in and zeroed again every step (15-25 % of an SD 1.5 step on the CPU). A minute outlasts
    // any step, and memory still goes back to the system a minute after a run.
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
    lora_studio::cli::run()
}
