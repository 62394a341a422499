//! Faults a long training run meets, with the binary run as a user runs it: the process killed at random
//! moments, Ctrl-C at random moments (a save in progress finishes first), a full disk during a save, and
//! an output folder that cannot be written.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use candle_core::Device;
use common::{make_dataset, tiny_config};
use lora_studio::config::{TrainConfig, save_config};
use lora_studio::tensor_file::TensorFile;
use lora_studio::train::{
    CancelToken, SilentReporter, TrainStop, list_checkpoints, load_checkpoint, train,
};
use rand::{Rng, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_lora-studio");

/// A run of the tiny model that saves a checkpoint after every step (rank 32, so that saving takes a
/// good part of each step).
fn checkpointing_config(root: &Path, steps: u64) -> TrainConfig {
    let data = make_dataset(&root.join("data"), 4);
    TrainConfig {
        max_train_steps: Some(steps),
        save_steps: 1,
        keep_last_checkpoints: 3,
        lora_rank: 32,
        lora_alpha: 16.0,
        ..tiny_config(&data, &root.join("out"))
    }
}

fn write_config(root: &Path, config: &TrainConfig) -> PathBuf {
    let path = root.join("train.toml");
    save_config(config, &path).unwrap();
    path
}

/// `lora-studio train` on `config`, resuming from the newest checkpoint when there is one; stderr goes to `log`.
fn train_command(config: &Path, output: &Path, log: &Path) -> Command {
    let mut command = Command::new(BIN);
    command.args(["train", "--config"]).arg(config);
    if !list_checkpoints(output).is_empty() {
        command.args(["--resume_from_checkpoint", "latest"]);
    }
    command
        .stdout(Stdio::null())
        .stderr(File::create(log).unwrap());
    command
}

/// Checks that everything under a final name in `output` is whole (every `checkpoint-N` loads and says
/// step N, the LoRA file loads) and returns the newest checkpoint's step and the names of hidden
/// temporaries a killed writer left.
fn assert_whole(output: &Path) -> (Option<u64>, Vec<String>) {
    let mut newest = None;
    let mut temporaries = Vec::new();
    for entry in std::fs::read_dir(output).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name.strip_prefix("checkpoint-") {
            let step: u64 = step.parse().unwrap();
            let checkpoint = load_checkpoint(&entry.path(), &Device::Cpu)
                .unwrap_or_else(|e| panic!("{name} is not whole: {e}"));
            assert_eq!(checkpoint.state.step, step, "{name}");
            newest = newest.max(Some(step));
        } else if name.ends_with(".safetensors") {
            let file = TensorFile::open(&entry.path())
                .unwrap_or_else(|e| panic!("{name} is not whole: {e}"));
            for tensor in file.infos().keys() {
                file.load(tensor, &Device::Cpu)
                    .unwrap_or_else(|e| panic!("{name} is not whole: {e}"));
            }
        } else if name.starts_with('.') && name.contains(".tmp-") {
            temporaries.push(name);
        }
    }
    (newest, temporaries)
}

/// Runs `lora-studio train` until it exits or `when` says so, then sends `signal` (a `libc::SIG*`);
/// returns the exit status and whether the signal was sent.
fn run_and_signal_when(
    command: &mut Command,
    mut when: impl FnMut() -> bool,
    signal: i32,
) -> (ExitStatus, bool) {
    let mut child = command.spawn().unwrap();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, false);
        }
        if when() {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: `kill` only sends a signal to the child, which has not been waited for, so its pid is its own.
    let sent = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    assert_eq!(sent, 0, "the signal could not be sent");
    (child.wait().unwrap(), true)
}

/// [`run_and_signal_when`] `after` has passed.
fn run_and_signal(command: &mut Command, after: Duration, signal: i32) -> (ExitStatus, bool) {
    let deadline = std::time::Instant::now() + after;
    run_and_signal_when(command, || std::time::Instant::now() >= deadline, signal)
}

/// Whether a checkpoint is being written in `output` (its hidden staging folder exists).
fn saving(output: &Path) -> bool {
    std::fs::read_dir(output)
        .into_iter()
        .flatten()
        .flatten()
        .any(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            name.starts_with(".checkpoint-") && name.contains(".tmp-")
        })
}

#[test]
fn killed_at_random_moments_training_resumes_from_a_whole_checkpoint_every_time() {
    let dir = tempfile::tempdir().unwrap();
    let config = checkpointing_config(dir.path(), 80);
    let config_path = write_config(dir.path(), &config);
    let log = dir.path().join("train.log");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let (mut kills, mut during_saves, mut newest) = (0, 0, None);
    // Kills aimed at a save in progress: the staging folder is seen, the process dies at once.
    for _ in 0..10 {
        let mut command = train_command(&config_path, &config.output_dir, &log);
        let (_, killed) =
            run_and_signal_when(&mut command, || saving(&config.output_dir), libc::SIGKILL);
        assert!(killed, "the run ended before a save was seen");
        kills += 1;
        let (step, temporaries) = assert_whole(&config.output_dir);
        newest = step;
        if !temporaries.is_empty() {
            during_saves += 1;
            break;
        }
    }
    assert!(
        during_saves > 0,
        "no kill landed while a checkpoint was half-written"
    );
    // And at random moments.
    for _ in 0..20 {
        let after = Duration::from_millis(rng.random_range(100..1500));
        let mut command = train_command(&config_path, &config.output_dir, &log);
        let (status, killed) = run_and_signal(&mut command, after, libc::SIGKILL);
        if !killed {
            assert!(
                status.success(),
                "{}",
                std::fs::read_to_string(&log).unwrap()
            );
            break;
        }
        kills += 1;
        let (step, temporaries) = assert_whole(&config.output_dir);
        during_saves += usize::from(!temporaries.is_empty());
        assert!(
            step >= newest,
            "the newest checkpoint went back from {newest:?} to {step:?}"
        );
        newest = step;
    }
    eprintln!("{kills} kills, {during_saves} of them during a write; newest checkpoint {newest:?}");
    assert!(kills > 0, "the run finished before it could be killed");

    let finished = train_command(&config_path, &config.output_dir, &log)
        .status()
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(finished.success(), "{text}");
    assert!(text.contains("finished 80 steps"), "{text}");
    let (step, temporaries) = assert_whole(&config.output_dir);
    assert_eq!(step, Some(80));
    assert!(temporaries.is_empty(), "left behind: {temporaries:?}");
    let lora = TensorFile::open(&config.output_dir.join("tiny.safetensors")).unwrap();
    assert_eq!(lora.metadata()["ss_steps"], "80");
}

#[test]
fn ctrl_c_at_random_moments_stops_with_a_whole_checkpoint_of_the_last_step() {
    let dir = tempfile::tempdir().unwrap();
    let config = checkpointing_config(dir.path(), 400);
    let config_path = write_config(dir.path(), &config);
    let log = dir.path().join("train.log");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    for _ in 0..4 {
        let after = Duration::from_millis(rng.random_range(700..2000));
        let mut command = train_command(&config_path, &config.output_dir, &log);
        let (status, stopped) = run_and_signal(&mut command, after, libc::SIGINT);
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(stopped && status.success(), "{status}: {text}");
        let step: u64 = text
            .split("stopped at step ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no stop line in: {text}"));
        let (newest, temporaries) = assert_whole(&config.output_dir);
        assert_eq!(newest, Some(step), "{text}");
        assert!(temporaries.is_empty(), "left behind: {temporaries:?}");
    }
}

#[test]
fn stop_during_a_save_finishes_the_save_and_stops_at_its_step() {
    let dir = tempfile::tempdir().unwrap();
    let config = checkpointing_config(dir.path(), 200);
    let cancel = CancelToken::default();
    let run = {
        let (config, cancel) = (config.clone(), cancel.clone());
        std::thread::spawn(move || train(&config, None, &mut SilentReporter, &cancel))
    };
    // Watch for a checkpoint being written (its hidden staging folder) and press Stop right then.
    let mut stopped_during = None;
    while stopped_during.is_none() && !run.is_finished() {
        stopped_during = std::fs::read_dir(&config.output_dir)
            .into_iter()
            .flatten()
            .flatten()
            .find_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let step = name.strip_prefix(".checkpoint-")?.split_once(".tmp-")?.0;
                step.parse::<u64>().ok()
            });
        if stopped_during.is_some() {
            cancel.cancel();
        }
    }
    let outcome = run.join().unwrap().unwrap();
    let step = stopped_during.expect("no save was seen in progress in 200 steps");
    assert_eq!(outcome.stop, TrainStop::Cancelled);
    assert_eq!(
        outcome.steps, step,
        "the run stops at the step it was saving"
    );
    let checkpoint = outcome.checkpoint.unwrap();
    assert_eq!(
        checkpoint,
        config.output_dir.join(format!("checkpoint-{step}"))
    );
    assert_eq!(
        load_checkpoint(&checkpoint, &Device::Cpu)
            .unwrap()
            .state
            .step,
        step
    );
    let (newest, temporaries) = assert_whole(&config.output_dir);
    assert_eq!(newest, Some(step));
    assert!(temporaries.is_empty(), "left behind: {temporaries:?}");
}

/// Sum of the sizes of the files under `dir`, each rounded up to whole 4 KiB pages as tmpfs stores them.
fn pages_used(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        total += if path.is_dir() {
            pages_used(&path)
        } else {
            entry.metadata().unwrap().len().div_ceil(4096) * 4096
        };
    }
    total
}

/// Runs `lora-studio train --config CONFIG` with the output folder on its own tmpfs of `size` bytes
/// (mounted with `options`) in a private mount namespace, and copies what it wrote to `keep`.
fn train_on_tmpfs(config: &TrainConfig, config_path: &Path, options: &str, keep: &Path) -> String {
    std::fs::create_dir_all(&config.output_dir).unwrap();
    std::fs::create_dir_all(keep).unwrap();
    let script = r#"mount -t tmpfs -o "$1" tmpfs "$2" || exit 90
"$3" train --config "$4" 2>&1
status=$?
cp -a "$2/." "$5/"
exit $status"#;
    // A user namespace lets anyone mount; where those are not allowed, root can still unshare the mounts.
    let run = |namespaces: &[&str]| {
        Command::new("unshare")
            .args(namespaces)
            .args(["sh", "-c", script, "sh"])
            .args([options.as_ref(), config.output_dir.as_os_str()])
            .args([BIN.as_ref(), config_path.as_os_str(), keep.as_os_str()])
            .output()
            .expect("`unshare` (util-linux) runs the training in a private mount namespace")
    };
    let mut output = run(&["--user", "--map-root-user", "--mount"]);
    if String::from_utf8_lossy(&output.stderr).starts_with("unshare:") {
        output = run(&["--mount"]);
    }
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert_ne!(
        output.status.code(),
        Some(90),
        "tmpfs could not be mounted: {text}"
    );
    assert!(
        !output.status.success(),
        "training should have failed: {text}"
    );
    text
}

#[test]
fn a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    // Measure what two checkpoints take, then give the output folder only that much room.
    let measured = checkpointing_config(&dir.path().join("measure"), 2);
    let measured = TrainConfig {
        save_steps: 0,
        ..measured
    };
    let config_path = write_config(&dir.path().join("measure"), &measured);
    let log = dir.path().join("measure.log");
    assert!(
        train_command(&config_path, &measured.output_dir, &log)
            .status()
            .unwrap()
            .success()
    );
    let one_checkpoint = pages_used(&measured.output_dir.join("checkpoint-2"));
    let room = 2 * one_checkpoint + one_checkpoint / 2;

    let config = checkpointing_config(dir.path(), 6);
    let config_path = write_config(dir.path(), &config);
    let keep = dir.path().join("kept");
    let text = train_on_tmpfs(&config, &config_path, &format!("size={room}"), &keep);
    assert!(
        text.contains("checkpoint 3 could not be saved in")
            && text.contains("No space left on device")
            && text.contains("checkpoint-2 is kept; free some space and resume from it"),
        "{text}"
    );
    let (newest, temporaries) = assert_whole(&keep);
    assert_eq!(newest, Some(2));
    assert!(temporaries.is_empty(), "left behind: {temporaries:?}");

    // With room again, the run resumes from what was kept.
    let resumed = TrainConfig {
        output_dir: keep.clone(),
        ..config
    };
    let config_path = write_config(dir.path(), &resumed);
    let finished = train_command(&config_path, &keep, &log).status().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        finished.success() && text.contains("resuming from"),
        "{text}"
    );
    assert_eq!(assert_whole(&keep).0, Some(6));
}

#[test]
fn an_output_folder_that_cannot_be_written_is_named_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let config = checkpointing_config(dir.path(), 3);
    let config_path = write_config(dir.path(), &config);
    let text = train_on_tmpfs(
        &config,
        &config_path,
        "ro,size=1m",
        &dir.path().join("kept"),
    );
    let expected = format!(
        "the output folder {} is not writable: Read-only file system",
        config.output_dir.display()
    );
    assert!(
        text.contains(&expected) && !text.contains("loading the base model"),
        "{text}"
    );

    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let config = TrainConfig {
        output_dir: file.join("out"),
        ..config
    };
    let config_path = write_config(dir.path(), &config);
    let output = Command::new(BIN)
        .args(["train", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        text.contains(&format!(
            "the output folder {} is not writable",
            file.join("out").display()
        )),
        "{text}"
    );
}
