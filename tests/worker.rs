//! The worker threads the app drives, without the UI: dataset scans with checks, thumbnails, caption saves,
//! a training run with pause, a preview while paused, resume, and an export copied into a "WebUI" folder.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{fixture, make_dataset, tiny_config};
use crossbeam_channel::Receiver;
use lora_studio::config::{SavePrecision, TrainConfig};
use lora_studio::messages::{
    Badge, CaptionOrigin, Event, ExportFormat, ExportRequest, Job, PreviewRequest, PreviewSettings,
    PreviewSource, RunEnd,
};
use lora_studio::worker::WorkerHandle;

/// The next event that `pick` accepts, failing after a minute.
fn wait_for<T>(
    events: &Receiver<Event>,
    what: &str,
    mut pick: impl FnMut(&Event) -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(event) = events.recv_timeout(Duration::from_millis(100)) {
            if let Event::Error { message, .. } = &event {
                panic!("worker error while waiting for {what}: {message}");
            }
            if let Some(found) = pick(&event) {
                return found;
            }
        }
    }
    panic!("no {what} within a minute");
}

fn preview(id: u64, strength: f64) -> PreviewRequest {
    PreviewRequest {
        id,
        base_model: fixture("sd1"),
        device: "cpu".into(),
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
