//! The `lora-studio` binary: the desktop app, or a headless command.

fn main() -> std::process::ExitCode {
    lora_studio::cli::run()
}
