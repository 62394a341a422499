//! The `lora-studio` binary: the desktop app, or a headless command.

/// Training allocates and frees tensors of hundreds of megabytes every step; mimalloc keeps those pages
/// mapped for reuse where the system allocator returns them to the kernel and faults them in again.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    lora_studio::cli::run()
}
