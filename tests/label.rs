//! Auto-captioning end to end with the tiny random-weight captioners of `tests/fixtures/captioners`: the
//! command line on a dataset folder (CSV and sidecars, existing captions kept, resuming, overwriting), the
//! result read back by the dataset loader, and models downloaded from a local stand-in for the Hub,
//! including transfers that break off and resume.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fake_hub::{COMMIT, FakeHub, resumed_offsets};
use common::fixture;
use lora_studio::config::TrainConfig;
use lora_studio::data::scan::scan_dataset;

fn blip_dir() -> String {
    fixture("captioners/blip").display().to_string()
}

fn clip_dir() -> String {
    fixture("captioners/clip").display().to_string()
}

fn label(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lora-studio"));
    command.arg("label").args(args).arg("--device").arg("cpu");
    for var in ["HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE"] {
        command.env_remove(var);
    }
    command.envs(envs.iter().copied());
    command.output().unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Four images: `a.png` and `b.png` without captions, `c.png` with a sidecar caption, and one in a kohya
/// repeat folder, plus an unreadable file.
fn dataset(root: &Path) -> PathBuf {
    let data = root.join("data");
    std::fs::create_dir_all(data.join("3_style")).unwrap();
    for (i, name) in ["a.png", "b.png", "c.png", "3_style/d.png"]
        .iter()
        .enumerate()
    {
        let image = image::RgbImage::from_fn(40 + 8 * i as u32, 36, |x, y| {
            image::Rgb([
                (x * 7 + i as u32 * 50) as u8,
                (y * 5) as u8,
                ((x + y) * 3) as u8,
            ])
        });
        image.save(data.join(name)).unwrap();
    }
    std::fs::write(data.join("c.txt"), "my own words").unwrap();
    std::fs::write(data.join("broken.jpg"), b"not a jpeg").unwrap();
    data
}

fn scanned_captions(data: &Path) -> HashMap<String, String> {
    let config = TrainConfig {
        train_data_dir: data.to_path_buf(),
        ..TrainConfig::default()
    };
    scan_dataset(&config)
        .unwrap()
        .items
        .into_iter()
        .map(|item| {
            (
                item.relative.display().to_string(),
                item.raw_caption.unwrap_or_default(),
            )
        })
        .collect()
}

fn image_bytes(data: &Path) -> Vec<Vec<u8>> {
    ["a.png", "b.png", "c.png", "3_style/d.png"]
        .iter()
        .map(|n| std::fs::read(data.join(n)).unwrap())
        .collect()
}

#[test]
fn label_writes_a_csv_the_dataset_loader_reads_and_keeps_existing_captions() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let images_before = image_bytes(&data);
    let data_arg = data.display().to_string();
    let out = label(
        &[
            "--input",
            &data_arg,
            "--output",
            "metadata.csv",
            "--model",
            &blip_dir(),
            "--model",
            &clip_dir(),
            "--prefix",
            "sks style",
            "--max-tokens",
            "8",
        ],
        &[],
    );
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("captioning 3 images (1 already has a caption)"),
        "{log}"
    );
    assert!(log.contains("skipped broken.jpg"), "{log}");
    assert!(log.contains("captioned 3 images"), "{log}");

    let captions = scanned_captions(&data);
    assert_eq!(captions.len(), 4, "{captions:?}");
    assert_eq!(captions["c.png"], "my own words");
    for name in ["a.png", "b.png", "3_style/d.png"] {
        let caption = &captions[name];
        assert!(caption.starts_with("sks style, "), "{name}: {caption}");
        // The sentence, then one tag from each of the five built-in vocabularies.
        assert!(caption.split(", ").count() >= 7, "{name}: {caption}");
    }
    let csv = std::fs::read_to_string(data.join("metadata.csv")).unwrap();
    assert!(csv.starts_with("file_name,text\n"), "{csv}");
    assert!(
        !csv.contains("c.png"),
        "the sidecar caption was copied or replaced: {csv}"
    );
    assert_eq!(image_bytes(&data), images_before, "an image was modified");

    // Deterministic, and a second run has nothing left to do.
    let again = label(&["--input", &data_arg, "--model", &blip_dir()], &[]);
    assert!(
        stderr(&again).contains("nothing to caption: 4 images already have a caption"),
        "{}",
        stderr(&again)
    );
    assert_eq!(
        std::fs::read_to_string(data.join("metadata.csv")).unwrap(),
        csv
    );

    // --overwrite replaces every caption, the sidecar one included (the CSV row wins over the sidecar).
    let out = label(
        &[
            "--input",
            &data_arg,
            "--model",
            &blip_dir(),
            "--overwrite",
            "--max-tokens",
            "6",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let captions = scanned_captions(&data);
    assert!(
        captions
            .values()
            .all(|c| !c.starts_with("sks style") && !c.is_empty()),
        "{captions:?}"
    );
    assert_ne!(captions["c.png"], "my own words");
    assert_eq!(
        std::fs::read_to_string(data.join("c.txt")).unwrap(),
        "my own words"
    );
}

#[test]
fn label_fills_a_csv_whose_file_name_column_is_not_first_and_keeps_its_other_columns() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let original = "\u{feff}text,score,file_name\r\n\"my own, words\",5,a.png\r\n";
    std::fs::write(data.join("metadata.csv"), original).unwrap();
    let data_arg = data.display().to_string();
    let out = label(&["--input", &data_arg, "--model", &blip_dir()], &[]);
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("captioning 2 images (2 already have a caption)"),
        "{log}"
    );
    let csv = std::fs::read_to_string(data.join("metadata.csv")).unwrap();
    let added = csv
        .strip_prefix(original)
        .unwrap_or_else(|| panic!("{csv:?}"));
    let rows: Vec<&str> = added.split_terminator("\r\n").collect();
    assert_eq!(rows.len(), 2, "{csv:?}");
    for (row, name) in rows.iter().zip(["b.png", "3_style/d.png"]) {
        assert!(row.ends_with(&format!(",,{name}")), "{csv:?}");
    }
    let captions = scanned_captions(&data);
    assert_eq!(captions["a.png"], "my own, words");
    assert_eq!(captions["c.png"], "my own words");
    for name in ["b.png", "3_style/d.png"] {
        assert!(!captions[name].is_empty(), "{name}: {captions:?}");
    }
}

#[test]
fn label_writes_sidecars_and_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    // A previous run that stopped after one image.
    std::fs::write(data.join("a.txt"), "captioned before the stop").unwrap();
    let data_arg = data.display().to_string();
    let out = label(
        &["--input", &data_arg, "--sidecars", "--model", &blip_dir()],
        &[],
    );
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("captioning 2 images (2 already have a caption)"),
        "{log}"
    );
    assert_eq!(
        std::fs::read_to_string(data.join("a.txt")).unwrap(),
        "captioned before the stop"
    );
    assert_eq!(
        std::fs::read_to_string(data.join("c.txt")).unwrap(),
        "my own words"
    );
    for sidecar in ["b.txt", "3_style/d.txt"] {
        let text = std::fs::read_to_string(data.join(sidecar)).unwrap();
        assert!(
            !text.trim().is_empty() && !text.contains('\n'),
            "{sidecar}: {text:?}"
        );
    }
    assert!(!data.join("metadata.csv").exists());
    let leftovers: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn bad_model_names_are_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let data_arg = data.display().to_string();
    let out = label(&["--input", &data_arg, "--model", "no-such-model"], &[]);
    assert!(!out.status.success());
    let log = stderr(&out);
    assert!(
        log.contains("the model `no-such-model` is neither a folder"),
        "{log}"
    );
    let cache = dir.path().join("cache").display().to_string();
    let out = label(
        &[
            "--input",
            &data_arg,
            "--model",
            "blip",
            "--offline",
            "--cache-dir",
            &cache,
        ],
        &[],
    );
    let log = stderr(&out);
    assert!(!out.status.success());
    assert!(log.contains("is not in the Hugging Face cache"), "{log}");
    let out = label(&["--input", "/no/such/folder"], &[]);
    assert!(stderr(&out).contains("the input folder /no/such/folder does not exist"));
    let out = label(&["--input", &data_arg, "--repetition-penalty", "0"], &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--repetition-penalty must be a positive number"),
        "{}",
        stderr(&out)
    );
    let out = label(&["--input", &data_arg, "--beams", "0"], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--beams"), "{}", stderr(&out));
}

#[test]
fn models_download_from_the_hub_endpoint_into_the_cache_and_resume_broken_transfers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let data_arg = data.display().to_string();
    let cache = dir.path().join("hub-cache");
    let cache_arg = cache.display().to_string();
    // The first transfer of the weights breaks off half way; the downloader resumes it.
    let hub = FakeHub::start(
        "tiny/blip",
        &fixture("captioners/blip"),
        "model.safetensors",
        1,
    );
    let out = label(
        &[
            "--input",
            &data_arg,
            "--sidecars",
            "--model",
            "tiny/blip",
            "--cache-dir",
            &cache_arg,
        ],
        &[("HF_ENDPOINT", &hub.address)],
    );
    let log = stderr(&out);
    assert!(out.status.success(), "{log}\n{:?}", hub.requests());
    let weights_size = std::fs::metadata(fixture("captioners/blip/model.safetensors"))
        .unwrap()
        .len();
    assert!(
        log.contains("downloading") && log.contains("model.safetensors"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "model.safetensors ({})",
            indicatif::HumanBytes(weights_size)
        )),
        "{log}"
    );
    let offsets = resumed_offsets(&hub.requests(), "model.safetensors");
    assert_eq!(offsets, [weights_size / 2], "{:?}", hub.requests());
    let snapshot = cache.join("models--tiny--blip/snapshots").join(COMMIT);
    for file in ["config.json", "model.safetensors", "vocab.txt"] {
        assert_eq!(
            std::fs::read(snapshot.join(file)).unwrap(),
            std::fs::read(fixture("captioners/blip").join(file)).unwrap(),
            "{file}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(cache.join("models--tiny--blip/refs/main")).unwrap(),
        COMMIT
    );
    // The same captions as from the folder itself.
    let from_hub = std::fs::read_to_string(data.join("a.txt")).unwrap();
    std::fs::remove_file(data.join("a.txt")).unwrap();
    let out = label(
        &["--input", &data_arg, "--sidecars", "--model", &blip_dir()],
        &[],
    );
    assert!(out.status.success());
    assert_eq!(
        std::fs::read_to_string(data.join("a.txt")).unwrap(),
        from_hub
    );

    // Offline, the cache is enough.
    std::fs::remove_file(data.join("a.txt")).unwrap();
    let out = label(
        &[
            "--input",
            &data_arg,
            "--sidecars",
            "--model",
            "tiny/blip",
            "--cache-dir",
            &cache_arg,
            "--offline",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_download_that_keeps_breaking_off_resumes_in_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let data_arg = data.display().to_string();
    let cache = dir.path().join("hub-cache");
    let cache_arg = cache.display().to_string();
    let args = [
        "--input",
        &data_arg,
        "--model",
        "tiny/blip",
        "--cache-dir",
        &cache_arg,
    ];
    // Every transfer of the first run breaks off (more often than the downloader retries).
    let hub = FakeHub::start(
        "tiny/blip",
        &fixture("captioners/blip"),
        "model.safetensors",
        100,
    );
    let out = label(&args, &[("HF_ENDPOINT", &hub.address)]);
    let log = stderr(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("could not download `model.safetensors` of tiny/blip"),
        "{log}"
    );
    assert!(log.contains("run again to resume it"), "{log}");
    let parts: Vec<_> = std::fs::read_dir(cache.join("models--tiny--blip/blobs"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
        .collect();
    assert_eq!(parts.len(), 1, "the partial download was not kept");
    let partial = parts[0].metadata().unwrap().len();
    assert!(partial > 0);

    let healthy = FakeHub::start(
        "tiny/blip",
        &fixture("captioners/blip"),
        "model.safetensors",
        0,
    );
    let out = label(&args, &[("HF_ENDPOINT", &healthy.address)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        resumed_offsets(&healthy.requests(), "model.safetensors"),
        [partial]
    );
    let snapshot = cache.join("models--tiny--blip/snapshots").join(COMMIT);
    assert_eq!(
        std::fs::read(snapshot.join("model.safetensors")).unwrap(),
        std::fs::read(fixture("captioners/blip/model.safetensors")).unwrap()
    );
}

#[test]
fn a_cache_holding_only_an_older_config_is_completed_in_one_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let data_arg = data.display().to_string();
    let cache = dir.path().join("hub-cache");
    // What a Python tool may leave: the config of an older revision, nothing else.
    let old = "fedcba9876543210fedcba9876543210fedcba98";
    let repo = cache.join("models--tiny--blip");
    std::fs::create_dir_all(repo.join("snapshots").join(old)).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), old).unwrap();
    std::fs::copy(
        fixture("captioners/blip/config.json"),
        repo.join("snapshots").join(old).join("config.json"),
    )
    .unwrap();
    let hub = FakeHub::start(
        "tiny/blip",
        &fixture("captioners/blip"),
        "model.safetensors",
        0,
    );
    let cache_arg = cache.display().to_string();
    let out = label(
        &[
            "--input",
            &data_arg,
            "--sidecars",
            "--model",
            "tiny/blip",
            "--cache-dir",
            &cache_arg,
        ],
        &[("HF_ENDPOINT", &hub.address)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let snapshot = repo.join("snapshots").join(COMMIT);
    for file in ["config.json", "model.safetensors", "vocab.txt"] {
        assert!(
            snapshot.join(file).is_file(),
            "{file} is not in the new snapshot"
        );
    }
    assert!(data.join("a.txt").is_file());
}
