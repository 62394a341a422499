//! The worker threads the app drives, without the UI: dataset scans with checks, thumbnails, caption saves,
//! a training run with pause, a preview while paused, resume, and an export copied into a "WebUI" folder.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{fixture, make_dataset, tiny_config, wait_for};
use crossbeam_channel::Receiver;
use lora_studio::config::{SavePrecision, TrainConfig};
use lora_studio::messages::{
    Badge, CaptionOrigin, Event, ExportFormat, ExportRequest, Job, PreviewRequest, PreviewSettings,
    PreviewSource, RunEnd,
};
use lora_studio::worker::WorkerHandle;

fn preview(id: u64, strength: f64) -> PreviewRequest {
    PreviewRequest {
        id,
        base_model: fixture("sd1"),
        device: "cpu".into(),
        prediction_type: None,
        source: PreviewSource::Live,
        settings: PreviewSettings {
            prompt: "neon city".into(),
            negative_prompt: String::new(),
            seed: 3,
            steps: 2,
            width: 64,
            height: 64,
            size_chosen: true,
            cfg: 5.0,
            strength,
        },
    }
}

#[test]
fn the_app_workflow_runs_on_the_workers() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 4);
    // Make img3 a byte copy of img0.
    std::fs::copy(data.join("img0.png"), data.join("img3.png")).unwrap();
    let (worker, events) = WorkerHandle::spawn(Arc::new(|| {})).unwrap();
    let config = TrainConfig {
        max_train_steps: Some(12),
        save_steps: 6,
        trigger_word: Some("cyb3r".into()),
        ..tiny_config(&data, &dir.path().join("out"))
    };

    worker.send(Job::ScanDataset {
        config: Box::new(config.clone()),
    });
    let view = wait_for(&events, "the dataset", |e| match e {
        Event::Dataset(view) => Some(view.clone()),
        _ => None,
    });
    assert_eq!(view.entries.len(), 4);
    assert_eq!(view.entries[0].caption, "neon city 0, magenta squares");
    let badges = wait_for(&events, "the checks", |e| match e {
        Event::Checks { badges, .. } => Some(badges.clone()),
        _ => None,
    });
    assert!(badges[0].contains(&Badge::TriggerMissing));
    assert!(
        badges[3]
            .iter()
            .any(|b| matches!(b, Badge::Duplicate { .. })),
        "{:?}",
        badges[3]
    );

    worker.send(Job::Thumbnail {
        path: view.entries[1].path.clone(),
        max_side: 32,
    });
    let (w, h, len) = wait_for(&events, "a thumbnail", |e| match e {
        Event::Thumbnail {
            width,
            height,
            rgba,
            ..
        } => Some((*width, *height, rgba.len())),
        _ => None,
    });
    assert_eq!((w, h, len), (32, 21, 32 * 21 * 4));
    let broken = dir.path().join("broken.png");
    std::fs::write(&broken, b"\x89PNG\r\n\x1a\n not really").unwrap();
    worker.send(Job::Thumbnail {
        path: broken.clone(),
        max_side: 32,
    });
    let failed = wait_for(&events, "a failed thumbnail", |e| match e {
        Event::ThumbnailFailed { path, .. } => Some(path.clone()),
        _ => None,
    });
    assert_eq!(failed, broken);

    worker.send(Job::SaveCaption {
        root: data.clone(),
        relative: "img1.png".into(),
        caption: "cyb3r, \"quoted\", edited".into(),
        origin: CaptionOrigin::MetadataCsv,
        metadata_csv: view.metadata_csv.clone(),
        caption_extension: ".txt".into(),
    });
    wait_for(&events, "the caption save", |e| {
        matches!(e, Event::CaptionSaved { .. }).then_some(())
    });
    let csv = std::fs::read_to_string(data.join("metadata.csv")).unwrap();
    assert!(
        csv.contains("img1.png,\"cyb3r, \"\"quoted\"\", edited\""),
        "{csv}"
    );
    assert!(
        csv.contains("img0.png,\"neon city 0, magenta squares\""),
        "other rows are kept: {csv}"
    );

    worker.send(Job::Train {
        config: Box::new(config.clone()),
        resume: None,
    });
    wait_for(&events, "the run to start", |e| {
        matches!(e, Event::RunStarted { .. }).then_some(())
    });
    wait_for(&events, "a loss point", |e| {
        matches!(e, Event::Loss(_)).then_some(())
    });
    // Previews sent right behind the pause still render while paused; the newest request wins.
    worker.send(Job::Pause);
    worker.send(Job::Preview(preview(1, 0.5)));
    worker.send(Job::Preview(preview(2, 1.0)));
    wait_for(&events, "the pause", |e| {
        matches!(e, Event::Paused).then_some(())
    });
    let (strength, bytes) = wait_for(&events, "the newest preview", |e| match e {
        Event::Preview {
            id: 2,
            strength,
            rgba,
            ..
        } => Some((*strength, rgba.len())),
        _ => None,
    });
    assert_eq!((strength, bytes), (1.0, 64 * 64 * 4));
    worker.send(Job::Resume);
    wait_for(&events, "the resume", |e| {
        matches!(e, Event::Resumed).then_some(())
    });
    let (end, checkpoint) = wait_for(&events, "the end of the run", |e| match e {
        Event::RunEnded {
            end, checkpoint, ..
        } => Some((*end, checkpoint.clone())),
        _ => None,
    });
    assert_eq!(end, RunEnd::Finished);
    let checkpoint = checkpoint.unwrap();

    let webui = dir.path().join("webui/models/Lora");
    std::fs::create_dir_all(&webui).unwrap();
    worker.send(Job::Export(ExportRequest {
        base_model: fixture("sd1"),
        device: "cpu".into(),
        prediction_type: None,
        checkpoint,
        output: dir.path().join("exports/my_style.safetensors"),
        precision: SavePrecision::Fp16,
        format: ExportFormat::Kohya,
        copy_to: Some(webui.clone()),
    }));
    let copied = wait_for(&events, "the export", |e| match e {
        Event::Exported { copied_to, .. } => Some(copied_to.clone()),
        _ => None,
    });
    let copied = copied.unwrap();
    assert_eq!(copied, webui.join("my_style.safetensors"));
    let file = lora_studio::tensor_file::TensorFile::open(&copied).unwrap();
    assert_eq!(file.metadata()["ss_output_name"], "my_style");
}

#[test]
fn a_newer_preview_cancels_the_one_rendering() {
    let (worker, events) = WorkerHandle::spawn(Arc::new(|| {})).unwrap();
    let mut slow = preview(1, 0.8);
    slow.settings.steps = 500;
    worker.send(Job::Preview(slow));
    // The render starts once the model is loaded.
    wait_for(&events, "the base model", |e| {
        matches!(
            e,
            Event::Stage {
                done: 1,
                total: 1,
                ..
            }
        )
        .then_some(())
    });
    let sent = Instant::now();
    worker.send(Job::Preview(preview(2, 0.8)));
    let id = wait_for(&events, "a preview", |e| match e {
        Event::Preview { id, .. } => Some(*id),
        _ => None,
    });
    assert_eq!(id, 2, "the 500-step render gave way to the newer request");
    assert!(sent.elapsed() < Duration::from_secs(30));
}

#[test]
fn auto_captioning_streams_captions_and_stops_when_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..40u32 {
        let image = image::RgbImage::from_fn(48, 40, |x, y| {
            image::Rgb([(x * 5 + i) as u8, (y * 6) as u8, (i * 9) as u8])
        });
        image.save(data.join(format!("img{i:02}.png"))).unwrap();
    }
    // An unreadable file is reported, but not counted as an image to caption.
    std::fs::write(data.join("broken.png"), b"not a png").unwrap();
    let (worker, events) = WorkerHandle::spawn(Arc::new(|| {})).unwrap();
    let request = lora_studio::messages::AutoCaptionRequest {
        root: data.clone(),
        models: vec![fixture("captioners/blip").display().to_string()],
        prefix: Some("cyb3r".into()),
        overwrite: false,
        metadata_csv: None,
        caption_extension: ".txt".into(),
        device: "cpu".into(),
    };
    worker.send(Job::AutoCaption(request.clone()));
    let (relative, caption, target) = wait_for(&events, "the first caption", |e| match e {
        Event::AutoCaptioned {
            relative,
            caption,
            target,
        } => Some((relative.clone(), caption.clone(), target.clone())),
        _ => None,
    });
    worker.send(Job::CancelAutoCaption);
    assert!(caption.starts_with("cyb3r, "), "{caption}");
    assert_eq!(target, data.join(&relative).with_extension("txt"));
    assert_eq!(std::fs::read_to_string(&target).unwrap(), caption);
    let (captioned, cancelled) = wait_for(&events, "the end", |e| match e {
        Event::AutoCaptionEnded {
            captioned,
            cancelled,
            ..
        } => Some((*captioned, *cancelled)),
        _ => None,
    });
    assert!(cancelled);
    assert!((1..40).contains(&captioned), "{captioned}");
    let sidecars = std::fs::read_dir(&data)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "txt")
        })
        .count();
    assert_eq!(sidecars, captioned);

    // Running again captions only the rest (the models stay loaded).
    worker.send(Job::AutoCaption(request));
    let mut progress = (0, 0);
    let (again, kept, failed) = wait_for(&events, "the second run", |e| match e {
        Event::AutoCaptionProgress { done, total, .. } => {
            progress = (*done, *total);
            None
        }
        Event::AutoCaptionEnded {
            captioned,
            kept,
            failed,
            ..
        } => Some((*captioned, *kept, failed.len())),
        _ => None,
    });
    assert_eq!((again, kept, failed), (40 - captioned, captioned, 1));
    assert_eq!(progress, ((40 - captioned) as u64, (40 - captioned) as u64));
}

/// The events up to the next preview: its pixels, and whether the base model was loaded on the way.
fn next_preview(events: &Receiver<Event>) -> (Vec<u8>, bool) {
    let mut loaded = false;
    let rgba = wait_for(events, "a preview", |e| match e {
        Event::Stage { stage, .. } if stage == "loading the base model" => {
            loaded = true;
            None
        }
        Event::Preview { rgba, .. } => Some(rgba.clone()),
        _ => None,
    });
    (rgba, loaded)
}

#[test]
fn previews_and_exports_keep_the_prediction_type_override_and_need_no_base_or_dataset() {
    use lora_studio::config::PredictionOverride;
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 2);
    let (worker, events) = WorkerHandle::spawn(Arc::new(|| {})).unwrap();
    let config = TrainConfig {
        max_train_steps: Some(2),
        prediction_type: Some(PredictionOverride::VPrediction),
        ..tiny_config(&data, &dir.path().join("out"))
    };
    worker.send(Job::Train {
        config: Box::new(config.clone()),
        resume: None,
    });
    let checkpoint = wait_for(&events, "the end of the run", |e| match e {
        Event::RunEnded { checkpoint, .. } => Some(checkpoint.clone()),
        _ => None,
    })
    .unwrap();

    // The model the run trained (v-prediction, as the config says) renders the preview: no reload.
    let request = |id, prediction_type| PreviewRequest {
        prediction_type,
        ..preview(id, 1.0)
    };
    worker.send(Job::Preview(request(
        1,
        Some(PredictionOverride::VPrediction),
    )));
    let (as_trained, reloaded) = next_preview(&events);
    assert!(
        !reloaded,
        "the preview reloaded the base model the run used"
    );
    // Without the override the model predicts noise again, which renders differently.
    worker.send(Job::Preview(request(2, None)));
    let (as_epsilon, reloaded) = next_preview(&events);
    assert!(reloaded);
    assert_ne!(
        as_trained, as_epsilon,
        "the prediction type made no difference"
    );

    // The checkpoint exports with its dataset folder gone and no base model to load.
    std::fs::remove_dir_all(&data).unwrap();
    let output = dir.path().join("exports/kept.safetensors");
    worker.send(Job::Export(ExportRequest {
        base_model: dir.path().join("no such model"),
        device: "cpu".into(),
        prediction_type: None,
        checkpoint,
        output: output.clone(),
        precision: SavePrecision::Bf16,
        format: ExportFormat::KohyaAndPeft,
        copy_to: None,
    }));
    let path = wait_for(&events, "the export", |e| match e {
        Event::Exported { path, .. } => Some(path.clone()),
        _ => None,
    });
    assert_eq!(path, output);
    let file = lora_studio::tensor_file::TensorFile::open(&output).unwrap();
    assert_eq!(file.metadata()["ss_output_name"], "kept");
    assert_eq!(file.metadata()["ss_v_parameterization"], "True");
    assert!(file.infos().values().all(|i| i.dtype.to_string() == "bf16"));
    assert!(
        dir.path()
            .join("exports/kept_diffusers/pytorch_lora_weights.safetensors")
            .is_file()
    );
}

/// An SDXL run on the workers: a preview of the live adapters while paused (64x48, so the size conditioning
/// and the latent shape cannot swap height and width unnoticed), the run resumed to its end, previews of its
/// checkpoint at two strengths (strength 0 is the base model, 1 is not), and the checkpoint exported with
/// kohya's SDXL names.
#[test]
fn sdxl_trains_with_previews_on_the_workers() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 3);
    let (worker, events) = WorkerHandle::spawn(Arc::new(|| {})).unwrap();
    let config = TrainConfig {
        base_model: fixture("sdxl"),
        max_train_steps: Some(6),
        learning_rate: 1e-2,
        conv_lora: true,
        train_text_encoder: true,
        ..tiny_config(&data, &dir.path().join("out"))
    };
    let sdxl_preview = |id, strength, source| PreviewRequest {
        base_model: fixture("sdxl"),
        source,
        settings: PreviewSettings {
            width: 64,
            height: 48,
            ..preview(id, strength).settings
        },
        ..preview(id, strength)
    };
    worker.send(Job::Train {
        config: Box::new(config),
        resume: None,
    });
    wait_for(&events, "a loss point", |e| {
        matches!(e, Event::Loss(_)).then_some(())
    });
    worker.send(Job::Pause);
    worker.send(Job::Preview(sdxl_preview(1, 1.0, PreviewSource::Live)));
    wait_for(&events, "the pause", |e| {
        matches!(e, Event::Paused).then_some(())
    });
    let (width, height, bytes) = wait_for(&events, "the live preview", |e| match e {
        Event::Preview {
            id: 1,
            width,
            height,
            rgba,
            ..
        } => Some((*width, *height, rgba.len())),
        _ => None,
    });
    assert_eq!((width, height, bytes), (64, 48, 64 * 48 * 4));
    worker.send(Job::Resume);
    let checkpoint = wait_for(&events, "the end of the run", |e| match e {
        Event::RunEnded {
            end: RunEnd::Finished,
            checkpoint,
            ..
        } => Some(checkpoint.clone()),
        Event::RunEnded { end, .. } => panic!("the run ended with {end:?}"),
        _ => None,
    })
    .unwrap();

    let mut rendered = Vec::new();
    for (id, strength) in [(2, 0.0), (3, 1.0)] {
        let source = PreviewSource::Checkpoint(checkpoint.clone());
        worker.send(Job::Preview(sdxl_preview(id, strength, source)));
        rendered.push(wait_for(&events, "a checkpoint preview", |e| match e {
            Event::Preview { id: got, rgba, .. } if *got == id => Some(rgba.clone()),
            _ => None,
        }));
    }
    worker.send(Job::Preview(sdxl_preview(4, 1.0, PreviewSource::Live)));
    let base = wait_for(&events, "a preview of the base model", |e| match e {
        Event::Preview { id: 4, rgba, .. } => Some(rgba.clone()),
        _ => None,
    });
    assert_eq!(rendered[0], base, "strength 0 renders the base model");
    assert_ne!(rendered[1], base, "the trained LoRA changes the image");

    let output = dir.path().join("exports/sdxl.safetensors");
    worker.send(Job::Export(ExportRequest {
        base_model: fixture("sdxl"),
        device: "cpu".into(),
        prediction_type: None,
        checkpoint,
        output: output.clone(),
        precision: SavePrecision::Fp16,
        format: ExportFormat::Kohya,
        copy_to: None,
    }));
    wait_for(&events, "the export", |e| {
        matches!(e, Event::Exported { .. }).then_some(())
    });
    let file = lora_studio::tensor_file::TensorFile::open(&output).unwrap();
    assert_eq!(file.metadata()["ss_base_model_version"], "sdxl_base_v1-0");
    for name in [
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha",
        "lora_unet_output_blocks_2_2_conv.alpha",
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha",
        "lora_te2_text_model_encoder_layers_3_self_attn_v_proj.alpha",
    ] {
        assert!(file.infos().contains_key(name), "no {name}");
    }
}

#[test]
fn captions_typed_while_auto_captioning_into_the_same_csv_are_all_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let images = 200u32;
    let names: Vec<String> = (0..images).map(|i| format!("img{i:03}.png")).collect();
    for (i, name) in (0u32..).zip(&names) {
        let image = image::RgbImage::from_fn(24, 20, |x, y| {
            image::Rgb([(x * 9 + i) as u8, (y * 11) as u8, (i * 7) as u8])
        });
        image.save(data.join(name)).unwrap();
    }
    let csv = data.join("metadata.csv");
    std::fs::write(&csv, "file_name,text\n").unwrap();
    let (worker, events) = WorkerHandle::spawn(Arc::new(|| {})).unwrap();
    worker.send(Job::AutoCaption(
        lora_studio::messages::AutoCaptionRequest {
            root: data.clone(),
            models: vec![fixture("captioners/blip").display().to_string()],
            prefix: None,
            overwrite: false,
            metadata_csv: Some(csv.clone()),
            caption_extension: ".txt".into(),
            device: "cpu".into(),
        },
    ));
    // Once the run is under way, every other image is captioned by hand, last image first; the first 40
    // images are typed only once the captioner has passed them. So some edits come before the captioner
    // reaches their image and some after. Each caption is typed in steps, and the app saves every step.
    let typed: Vec<(String, String)> = names
        .iter()
        .rev()
        .step_by(2)
        .map(|name| (name.clone(), format!("typed by hand for {name}")))
        .collect();
    let typed_late = typed
        .iter()
        .position(|(name, _)| *name < names[40])
        .unwrap();
    // How many images the captioner has passed: one more than the highest it captioned.
    let passed = Arc::new(AtomicUsize::new(0));
    let mut auto_captions = std::collections::HashMap::new();
    let (mut saved, mut errors, mut ended) = (0, Vec::new(), None);
    let (mut typist, mut saves_sent) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(120);
    // A save that fails sends an error instead of `CaptionSaved`.
    while ended.is_none() || saves_sent.is_none_or(|sent| saved + errors.len() < sent) {
        assert!(
            Instant::now() < deadline,
            "the run or the saves did not end"
        );
        if typist
            .as_ref()
            .is_some_and(|t: &std::thread::JoinHandle<usize>| t.is_finished())
        {
            saves_sent = typist.take().map(|t| t.join().unwrap());
        }
        match events.recv_timeout(Duration::from_millis(100)) {
            Ok(Event::AutoCaptioned {
                relative, caption, ..
            }) => {
                let index = names.iter().position(|n| relative == Path::new(n)).unwrap();
                passed.fetch_max(index + 1, Ordering::SeqCst);
                auto_captions.insert(relative.display().to_string(), caption);
                if typist.is_none() && saves_sent.is_none() {
                    let (worker, typed, csv) = (worker.clone(), typed.clone(), csv.clone());
                    let passed = passed.clone();
                    typist = Some(std::thread::spawn(move || {
                        let (early, late) = typed.split_at(typed_late);
                        let saves = type_captions(&worker, early, &csv);
                        let waited = Instant::now();
                        while passed.load(Ordering::SeqCst) <= 40
                            && waited.elapsed() < Duration::from_secs(60)
                        {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        saves + type_captions(&worker, late, &csv)
                    }));
                }
            }
            Ok(Event::CaptionSaved { .. }) => saved += 1,
            Ok(Event::Error { message, .. }) => errors.push(message),
            Ok(Event::AutoCaptionEnded {
                captioned, kept, ..
            }) => {
                passed.store(names.len(), Ordering::SeqCst);
                ended = Some((captioned, kept));
            }
            _ => {}
        }
    }
    let (captioned, kept) = ended.unwrap();
    let typed_over = typed
        .iter()
        .filter(|(name, _)| auto_captions.contains_key(name))
        .count();
    eprintln!(
        "{captioned} captioned, {kept} kept as typed before the captioner came; {typed_over} typed over an auto-caption; {saved} saves, {} errors",
        errors.len()
    );
    let on_disk: std::collections::HashMap<String, String> =
        lora_studio::data::captions::read_metadata_csv(&csv, &data)
            .unwrap()
            .into_iter()
            .map(|(path, caption)| (path.display().to_string(), caption))
            .collect();
    let typed: std::collections::HashMap<String, String> = typed.into_iter().collect();
    let wrong: Vec<String> = names
        .iter()
        .filter_map(|name| {
            let expected = typed.get(name).or(auto_captions.get(name));
            (expected.is_none() || on_disk.get(name) != expected)
                .then(|| format!("{name}: {:?} instead of {expected:?}", on_disk.get(name)))
        })
        .collect();
    assert!(
        errors.is_empty() && wrong.is_empty(),
        "{} errors, first {:?}; {} of {images} images without their caption, first {:?}",
        errors.len(),
        errors.first(),
        wrong.len(),
        wrong.first()
    );
    assert_eq!(captioned + kept, images as usize);
    assert!(
        kept > 0 && typed_over > 0,
        "the edits did not interleave with the run, so the test checked nothing"
    );
    assert_eq!(auto_captions.len(), captioned);
    let rows = std::fs::read_to_string(&csv).unwrap().lines().count();
    assert_eq!(
        rows,
        1 + images as usize,
        "one header and one row per image"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Types `typed` (image, caption) into the app's caption editor word by word, saving every step as the app
/// does, into `csv`; returns the number of saves sent.
fn type_captions(worker: &WorkerHandle, typed: &[(String, String)], csv: &Path) -> usize {
    let mut saves = 0;
    for (name, caption) in typed {
        let words: Vec<&str> = caption.split(' ').collect();
        for typed_words in 1..=words.len() {
            worker.send(Job::SaveCaption {
                root: csv.parent().unwrap().to_path_buf(),
                relative: name.into(),
                caption: words[..typed_words].join(" "),
                origin: CaptionOrigin::None,
                metadata_csv: Some(csv.to_path_buf()),
                caption_extension: ".txt".into(),
            });
            saves += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    saves
}

#[test]
fn a_run_may_name_its_base_model_as_the_model_list_does() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 2);
    let (home, hub) = common::fake_installs::fake_computer(&dir.path().join("computer"));
    let places = lora_studio::worker::ModelPlaces {
        discovery: lora_studio::discovery::DiscoveryOptions {
            home: Some(home),
            hub_cache: Some(hub.clone()),
            extra_roots: Vec::new(),
            cache_file: None,
            time_limit: Duration::from_secs(60),
        },
        hub: lora_studio::hub::HubSettings {
            endpoint: "http://127.0.0.1:9".into(),
            cache_dir: hub,
            offline: true,
        },
    };
    let (worker, events) = WorkerHandle::spawn_with(Arc::new(|| {}), places).unwrap();
    let config = TrainConfig {
        max_train_steps: Some(1),
        base_model: "sd1_single".into(),
        ..tiny_config(&data, &dir.path().join("out"))
    };
    worker.send(Job::Train {
        config: Box::new(config.clone()),
        resume: None,
    });
    let end = wait_for(&events, "the end of the run", |e| match e {
        Event::RunEnded { end, .. } => Some(*end),
        _ => None,
    });
    assert_eq!(end, RunEnd::Finished);
    worker.send(Job::Train {
        config: Box::new(TrainConfig {
            base_model: "no-such-model".into(),
            ..config
        }),
        resume: None,
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let message = loop {
        assert!(
            Instant::now() < deadline,
            "no error for an unknown model name"
        );
        if let Ok(Event::Error { message, .. }) = events.recv_timeout(Duration::from_millis(100)) {
            break message;
        }
    };
    assert!(
        message.contains("no-such-model is neither a file nor a folder nor the name of a model")
            && message.contains("sd1_single"),
        "{message}"
    );
}
