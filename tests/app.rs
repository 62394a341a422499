//! The desktop app driven like a user would, headless with egui_kittest: drop a dataset folder, edit a
//! caption and find it on disk, train and watch the loss arrive, pause, move the strength slider and get a
//! preview, resume to the end, and export a LoRA file; drop a training config and get its settings; every
//! view names its widgets for screen readers.
#![cfg(feature = "gui")]

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{DroppedPath, make_dataset, tiny_config};
use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use lora_studio::app::{AppSettings, StudioApp, Tab};
use lora_studio::config::{TrainConfig, save_config};
use lora_studio::worker::WorkerHandle;

/// The app with `settings` and real workers, in a 1280x900 window.
fn open_app(settings: AppSettings) -> Harness<'static, StudioApp> {
    open_app_sized(settings, [1280.0, 900.0])
}

/// The app with `settings` and real workers, in a window of `size` points. The workers look for models
/// nowhere (a search finds none at once), so a test never depends on what the machine has installed.
fn open_app_sized(settings: AppSettings, size: [f32; 2]) -> Harness<'static, StudioApp> {
    let places = common::offline_places(None);
    let (worker, events) = WorkerHandle::spawn_with(Arc::new(|| {}), places).unwrap();
    Harness::builder().with_size(size).build_ui_state(
        |ui, app: &mut StudioApp| app.main_ui(ui),
        StudioApp::new(settings, worker, events),
    )
}

/// Drops `path` on the window.
fn drop_path(harness: &mut Harness<'_, StudioApp>, path: PathBuf) {
    harness
        .input_mut()
        .dropped_files
        .push(Arc::new(DroppedPath(path)));
}

/// Steps the app until `done` holds, failing after a minute.
fn step_until(harness: &mut Harness<'_, StudioApp>, what: &str, done: impl Fn(&StudioApp) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done(harness.state()) {
        assert!(
            Instant::now() < deadline,
            "gave up waiting for {what}; notices: {:?}",
            harness.state().notices()
        );
        std::thread::sleep(Duration::from_millis(20));
        harness.step();
    }
}

/// Steps the app until a widget labelled `label` shows, failing after a minute.
fn step_until_shown(harness: &mut Harness<'_, StudioApp>, label: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while harness.query_by_label(label).is_none() {
        assert!(Instant::now() < deadline, "gave up waiting for {label:?}");
        std::thread::sleep(Duration::from_millis(20));
        harness.step();
    }
}

#[test]
fn drop_edit_train_pause_preview_resume_export() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 4);
    let settings = AppSettings {
        train: TrainConfig {
            train_data_dir: PathBuf::new(),
            max_train_steps: Some(30),
            save_steps: 10,
            ..tiny_config(&data, &dir.path().join("out"))
        },
        ..Default::default()
    };
    let mut harness = open_app(settings);

    // Drop the folder: the grid fills.
    drop_path(&mut harness, data.clone());
    step_until(&mut harness, "the dataset", |app| app.dataset_len() == 4);
    harness.run_steps(3);
    let caption = harness.get_by_role_and_label(Role::MultilineTextInput, "img1.png");
    assert_eq!(
        caption.value().as_deref(),
        Some("neon city 1, magenta squares")
    );

    // Edit a caption: it is on disk at once.
    caption.focus();
    harness.run_steps(2);
    harness
        .get_by_role_and_label(Role::MultilineTextInput, "img1.png")
        .type_text(" wet streets");
    harness.run_steps(2);
    step_until(&mut harness, "the caption save", |app| {
        app.unsaved_captions() == 0
    });
    let csv = std::fs::read_to_string(data.join("metadata.csv")).unwrap();
    assert!(csv.contains("wet streets"), "{csv}");

    // Train: loss points arrive and the progress advances.
    harness.state_mut().settings_mut().tab = Tab::Train;
    harness.run_steps(2);
    harness.get_by_label("Start training").click();
    step_until(&mut harness, "loss points", |app| app.losses().len() >= 3);
    harness.get_by_label("Pause").click();
    step_until(&mut harness, "the pause", |app| {
        format!("{:?}", app.run_status()) == "Paused"
    });
    let paused_at = harness.state().losses().len();

    // While paused, the strength slider renders a preview with the current adapters.
    let preview = &mut harness.state_mut().settings_mut().preview;
    (preview.width, preview.height, preview.steps) = (64, 64, 4);
    harness.state_mut().settings_mut().tab = Tab::Preview;
    harness.run_steps(2);
    harness
        .get_by_role_and_label(Role::TextInput, "Prompt")
        .focus();
    harness.run_steps(1);
    harness
        .get_by_role_and_label(Role::TextInput, "Prompt")
        .type_text("neon city");
    harness.run_steps(1);
    harness
        .get_by_role_and_label(Role::Slider, "LoRA strength")
        .set_value_accesskit(1.2);
    step_until(&mut harness, "a preview", |app| {
        app.shown_preview()
            .is_some_and(|(_, s)| (s - 1.2).abs() < 1e-9)
    });
    assert_eq!(
        harness.state().losses().len(),
        paused_at,
        "no steps while paused"
    );

    // Resume to the end.
    harness.state_mut().settings_mut().tab = Tab::Train;
    harness.run_steps(2);
    harness.get_by_label("Resume").click();
    step_until(&mut harness, "the end of the run", |app| {
        format!("{:?}", app.run_status()) == "Idle"
    });
    assert_eq!(harness.state().losses().last().map(|p| p.step), Some(30));

    // Export a LoRA file from the last checkpoint.
    harness.state_mut().settings_mut().tab = Tab::Export;
    harness.run_steps(2);
    harness.get_by_label("Export LoRA").click();
    step_until(&mut harness, "the export", |app| !app.exported().is_empty());
    let exported = harness.state().exported()[0].clone();
    let file = lora_studio::tensor_file::TensorFile::open(&exported).unwrap();
    assert!(file.infos().keys().any(|k| k.starts_with("lora_unet_")));
    assert_eq!(exported, dir.path().join("out/tiny.safetensors"));
}

#[test]
fn starting_without_a_dataset_or_base_model_says_what_to_choose() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 2);
    let settings = AppSettings {
        train: TrainConfig {
            train_data_dir: PathBuf::new(),
            base_model: PathBuf::new(),
            ..tiny_config(&data, &dir.path().join("out"))
        },
        tab: Tab::Train,
        ..Default::default()
    };
    let mut harness = open_app(settings);
    step_until(&mut harness, "the search for models", |app| {
        app.models_found() == Some(0)
    });
    harness.run_steps(2);
    harness.get_by_label("No base model was found on this computer.");
    // Clicks Start on the Train view and returns the newest notice.
    let start = |harness: &mut Harness<'_, StudioApp>| {
        harness.state_mut().settings_mut().tab = Tab::Train;
        harness.run_steps(2);
        harness.get_by_label("Start training").click();
        harness.run_steps(2);
        harness.state().notices().pop().unwrap_or_default()
    };
    let notice = start(&mut harness);
    assert!(
        notice.starts_with("Open a dataset folder first"),
        "{notice}"
    );
    drop_path(&mut harness, data);
    step_until(&mut harness, "the dataset", |app| app.dataset_len() == 2);
    let notice = start(&mut harness);
    assert!(notice.starts_with("Choose a base model first"), "{notice}");
    assert_eq!(format!("{:?}", harness.state().run_status()), "Idle");
}

#[test]
fn a_dropped_kohya_config_shows_what_was_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 2);
    let file = dir.path().join("kohya.toml");
    let text = format!(
        "[model_arguments]\npretrained_model_name_or_path = \"{}\"\n[dataset_arguments]\n\
         train_data_dir = \"{}\"\n[training_arguments]\nxformers = true\nnetwork_dim = 8\n",
        common::fixture("sd1").display(),
        data.display()
    );
    std::fs::write(&file, text).unwrap();
    let mut harness = open_app(AppSettings::default());
    drop_path(&mut harness, file);
    step_until(&mut harness, "the dataset", |app| app.dataset_len() == 2);
    assert_eq!(harness.state().settings().train.lora_rank, 8);
    let notices = harness.state().notices();
    assert!(
        notices.contains(&"ignored (they tune the Python trainer): xformers".to_string()),
        "{notices:?}"
    );
}

#[test]
fn a_dropped_config_brings_its_settings_and_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 3);
    let config = TrainConfig {
        lora_rank: 12,
        ..tiny_config(&data, &dir.path().join("out"))
    };
    let file = dir.path().join("style.toml");
    save_config(&config, &file).unwrap();
    // An earlier run left two complete checkpoints and one cut off before its state was written.
    for (step, complete) in [(40, true), (80, true), (120, false)] {
        let folder = config.output_dir.join(format!("checkpoint-{step}"));
        std::fs::create_dir_all(&folder).unwrap();
        if complete {
            std::fs::write(folder.join("state.json"), "{}").unwrap();
        }
    }
    let mut harness = open_app(AppSettings::default());
    drop_path(&mut harness, file);
    step_until(&mut harness, "the dataset", |app| app.dataset_len() == 3);
    assert_eq!(harness.state().settings().train, config);
    assert_eq!(harness.state().settings().tab, Tab::Train);
    harness.get_by_label("Start training");

    // Its checkpoints are offered for resuming and exporting.
    step_until(&mut harness, "the checkpoints", |app| {
        app.checkpoints().len() == 2
    });
    let steps: Vec<u64> = harness.state().checkpoints().iter().map(|c| c.0).collect();
    assert_eq!(steps, [40, 80]);
    harness.run();
    harness.get_by_label("Resume from step 80");

    // Every view names its widgets for screen readers (checked when the frames settle).
    for tab in [Tab::Dataset, Tab::Train, Tab::Preview, Tab::Export] {
        harness.state_mut().settings_mut().tab = tab;
        assert!(harness.run_ok().is_some(), "{tab:?} settles");
    }
}

#[test]
fn auto_caption_fills_empty_captions_then_replaces_all_after_confirmation() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 3);
    // img2 loses its caption.
    let csv = std::fs::read_to_string(data.join("metadata.csv")).unwrap();
    let kept: Vec<&str> = csv.lines().filter(|l| !l.starts_with("img2.png")).collect();
    std::fs::write(data.join("metadata.csv"), kept.join("\n") + "\n").unwrap();
    let mut settings = AppSettings {
        train: TrainConfig {
            train_data_dir: PathBuf::new(),
            ..tiny_config(&data, &dir.path().join("out"))
        },
        ..Default::default()
    };
    settings.auto_caption.models = common::fixture("captioners/blip").display().to_string();
    let mut harness = open_app(settings);
    drop_path(&mut harness, data.clone());
    step_until(&mut harness, "the dataset", |app| app.dataset_len() == 3);
    harness.run_steps(3);

    harness.get_by_label("Caption 1 empty").click();
    harness.run_steps(1);
    step_until(&mut harness, "auto-captioning", |app| {
        !app.auto_captioning()
    });
    let captions = harness.state().captions().to_vec();
    assert_eq!(captions[0], "neon city 0, magenta squares");
    assert!(!captions[2].trim().is_empty(), "{captions:?}");
    let on_disk = std::fs::read_to_string(data.join("metadata.csv")).unwrap();
    assert!(on_disk.contains(&captions[2]), "{on_disk}");
    assert!(
        harness
            .state()
            .notices()
            .iter()
            .any(|n| n.contains("1 captioned, 2 kept")),
        "{:?}",
        harness.state().notices()
    );

    // Re-caption all asks first; "Keep them" changes nothing.
    harness.get_by_label("Re-caption all…").click();
    harness.run_steps(2);
    harness.get_by_label("Keep them").click();
    harness.run_steps(2);
    assert!(!harness.state().auto_captioning());
    assert_eq!(
        harness.state().captions()[0],
        "neon city 0, magenta squares"
    );
    harness.get_by_label("Re-caption all…").click();
    harness.run_steps(2);
    harness.get_by_label("Replace all").click();
    harness.run_steps(1);
    step_until(&mut harness, "re-captioning", |app| !app.auto_captioning());
    let captions = harness.state().captions().to_vec();
    assert!(
        captions.iter().all(|c| !c.contains("neon city")),
        "{captions:?}"
    );
    let on_disk = std::fs::read_to_string(data.join("metadata.csv")).unwrap();
    assert!(!on_disk.contains("neon city"), "{on_disk}");
}

#[test]
fn the_dataset_grid_wraps_to_the_width_left_by_the_caption_panel() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 30);
    let settings = AppSettings {
        train: TrainConfig {
            train_data_dir: PathBuf::new(),
            ..tiny_config(&data, &dir.path().join("out"))
        },
        ..Default::default()
    };
    let mut harness = open_app_sized(settings, [1400.0, 900.0]);
    drop_path(&mut harness, data);
    step_until(&mut harness, "the dataset", |app| app.dataset_len() == 30);
    // Window widths from 1000 to 2000 points, 1400 among them.
    for width in (1000..=2000).step_by(25).map(|w| w as f32) {
        harness.set_size(egui::vec2(width, 900.0));
        harness.run_steps(3);
        let panel_left = harness
            .get_by_label("Click an image to edit its caption here.")
            .rect()
            .left();
        let cards: Vec<egui::Rect> = harness
            .get_all_by_role(Role::MultilineTextInput)
            .map(|caption| caption.rect())
            .collect();
        assert!(cards.len() >= 8, "{} cards at {width} points", cards.len());
        let rightmost = cards.iter().map(|r| r.right()).fold(f32::MIN, f32::max);
        assert!(
            rightmost < panel_left,
            "at {width} points a card reaches {rightmost}, under the caption panel at {panel_left}"
        );
        // And the row is full: a card one step further would reach under the panel.
        let card_step = cards[1].left() - cards[0].left();
        assert!(
            rightmost + card_step > panel_left - card_step / 4.0,
            "at {width} points the row ends at {rightmost}, a card short of {panel_left}"
        );
    }
}

#[test]
fn a_small_image_says_whether_it_is_upscaled() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    image::RgbImage::from_pixel(320, 256, image::Rgb([200, 40, 40]))
        .save(data.join("small.png"))
        .unwrap();
    std::fs::write(
        data.join("metadata.csv"),
        "file_name,text\nsmall.png,a red square\n",
    )
    .unwrap();
    // At 512 px: with bucket_no_upscale (the default) the image keeps its size; without it, it is
    // enlarged to cover the bucket of its aspect ratio (kohya's 576x448 for 5:4).
    for (no_upscale, badge) in [
        (true, "small 320x256: trained at 320x256, not upscaled"),
        (false, "small 320x256: upscaled to fill 576x448"),
    ] {
        let settings = AppSettings {
            train: TrainConfig {
                bucket_no_upscale: no_upscale,
                ..TrainConfig::default()
            },
            ..Default::default()
        };
        let mut harness = open_app(settings);
        drop_path(&mut harness, data.clone());
        step_until(&mut harness, "the dataset", |app| app.dataset_len() == 1);
        step_until_shown(&mut harness, badge);
    }
}

#[test]
fn the_preview_renders_at_the_training_size_until_the_user_chooses_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 2);
    let settings = AppSettings {
        train: TrainConfig {
            train_data_dir: PathBuf::new(),
            resolution: Some(128),
            ..tiny_config(&data, &dir.path().join("out"))
        },
        tab: Tab::Preview,
        ..Default::default()
    };
    let mut harness = open_app(settings);
    harness.run_steps(2);
    let size = |harness: &Harness<'_, StudioApp>| {
        let preview = &harness.state().settings().preview;
        (preview.width, preview.height)
    };
    assert_eq!(size(&harness), (128, 128));
    // A resolution between buckets renders at its square bucket.
    harness.state_mut().settings_mut().train.resolution = Some(200);
    harness.run_steps(2);
    assert_eq!(size(&harness), (192, 192));

    // The user's width stays, whatever the training resolution becomes, also after a restart.
    harness
        .get_by_role_and_label(Role::SpinButton, "Width")
        .set_value_accesskit(96.0);
    harness.run_steps(2);
    assert_eq!(size(&harness), (96, 192));
    harness.state_mut().settings_mut().train.resolution = Some(64);
    harness.run_steps(2);
    assert_eq!(size(&harness), (96, 192));
    let remembered = harness.state().settings().clone();
    let mut harness = open_app(remembered);
    harness.run_steps(2);
    assert_eq!(size(&harness), (96, 192));

    // "Training size" follows the training resolution again.
    harness.get_by_label("Training size").click();
    harness.run_steps(2);
    assert_eq!(size(&harness), (64, 64));
}

#[test]
fn a_long_base_model_path_leaves_the_chart_its_width() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 2);
    let deep: PathBuf = (0..12)
        .map(|i| format!("a-rather-long-folder-name-{i}"))
        .collect();
    let base_model = dir
        .path()
        .join(deep)
        .join("v1-5-pruned-emaonly.safetensors");
    let settings = AppSettings {
        train: TrainConfig {
            train_data_dir: PathBuf::new(),
            base_model: base_model.clone(),
            ..tiny_config(&data, &dir.path().join("out"))
        },
        tab: Tab::Train,
        ..Default::default()
    };
    let mut harness = open_app_sized(settings, [1400.0, 900.0]);
    harness.run_steps(3);
    // The settings panel keeps about its default width of 380 points.
    let chart_left = harness.get_by_label("Start training").rect().left();
    assert!(
        chart_left < 450.0,
        "the chart starts at {chart_left} of 1400 points"
    );
    // The path shows its start and its end with the whole file name, and in full on hover.
    let shown_path = |node: &egui_kittest::kittest::AccessKitNode<'_>| {
        node.role() == Role::Label && node.value().is_some_and(|v| v.ends_with(".safetensors"))
    };
    let shown = harness.get_by(shown_path).value().unwrap_or_default();
    let full = base_model.display().to_string();
    let (start, end) = shown.split_once('…').unwrap_or_else(|| panic!("{shown}"));
    assert!(
        full.starts_with(start) && full.ends_with(end) && end.contains("/v1-5-pruned-emaonly"),
        "{shown}"
    );
    harness.get_by(shown_path).hover();
    step_until_shown(&mut harness, &full);
}

#[test]
fn a_caption_stays_one_line_enter_ends_the_edit_and_pasted_line_breaks_become_spaces() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 2);
    let mut harness = open_app(AppSettings::default());
    drop_path(&mut harness, data.clone());
    step_until(&mut harness, "the dataset", |app| app.dataset_len() == 2);
    harness.run_steps(3);
    let caption = || "neon city 1, magenta squares";
    harness
        .get_by_role_and_label(Role::MultilineTextInput, "img1.png")
        .focus();
    harness.run_steps(2);
    // Enter ends the edit: what is typed next goes nowhere.
    harness.key_press(egui::Key::Enter);
    harness.run_steps(2);
    harness
        .get_by_role_and_label(Role::MultilineTextInput, "img1.png")
        .type_text("x");
    harness.run_steps(2);
    assert_eq!(
        harness
            .get_by_role_and_label(Role::MultilineTextInput, "img1.png")
            .value()
            .as_deref(),
        Some(caption())
    );
    // A pasted list of lines joins the caption as one line, and is saved as one.
    harness
        .get_by_role_and_label(Role::MultilineTextInput, "img1.png")
        .focus();
    harness.run_steps(2);
    harness
        .input_mut()
        .events
        .push(egui::Event::Paste(", wet streets\nrain\r\n".into()));
    harness.run_steps(2);
    step_until(&mut harness, "the caption save", |app| {
        app.unsaved_captions() == 0
    });
    let csv = std::fs::read_to_string(data.join("metadata.csv")).unwrap();
    assert!(
        csv.contains("img1.png,\"neon city 1, magenta squares, wet streets rain\""),
        "{csv}"
    );
    assert!(
        harness.state().notices().is_empty(),
        "{:?}",
        harness.state().notices()
    );
}

/// The app with real workers that look for models on the fake computer under `root` and download from
/// `endpoint` into `root/hub-cache`.
fn open_app_on(
    root: &std::path::Path,
    home: &std::path::Path,
    endpoint: &str,
    settings: AppSettings,
) -> Harness<'static, StudioApp> {
    let places = lora_studio::worker::ModelPlaces {
        discovery: lora_studio::discovery::DiscoveryOptions {
            home: Some(home.to_path_buf()),
            hub_cache: Some(root.join("hub-cache")),
            extra_roots: Vec::new(),
            cache_file: Some(root.join("data/models-cache.json")),
            time_limit: Duration::from_secs(60),
        },
        hub: lora_studio::hub::HubSettings {
            endpoint: endpoint.to_string(),
            cache_dir: root.join("hub-cache"),
            offline: false,
        },
    };
    let (worker, events) = WorkerHandle::spawn_with(Arc::new(|| {}), places).unwrap();
    Harness::builder()
        .with_size([1280.0, 900.0])
        .build_ui_state(
            |ui, app: &mut StudioApp| app.main_ui(ui),
            StudioApp::new(settings, worker, events),
        )
}

/// A ComfyUI install under `home` whose checkpoints folder holds the fixture checkpoints called `names`
/// (with their sidecar configs); its checkpoints folder.
fn fake_comfyui(home: &std::path::Path, names: &[&str]) -> PathBuf {
    let checkpoints = home.join("ComfyUI/models/checkpoints");
    std::fs::create_dir_all(home.join("ComfyUI/comfy")).unwrap();
    std::fs::create_dir_all(&checkpoints).unwrap();
    std::fs::write(home.join("ComfyUI/main.py"), b"").unwrap();
    for name in names {
        for extension in ["safetensors", "yaml", "json"] {
            let file = format!("{name}.{extension}");
            if common::fixture(&file).exists() {
                std::fs::copy(common::fixture(&file), checkpoints.join(&file)).unwrap();
            }
        }
    }
    checkpoints
}

#[test]
fn a_model_found_on_this_computer_is_picked_from_the_list_and_trained_on() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 2);
    let home = dir.path().join("home");
    let checkpoints = fake_comfyui(&home, &["sd1_single"]);
    let settings = AppSettings {
        train: TrainConfig {
            train_data_dir: PathBuf::new(),
            base_model: PathBuf::new(),
            max_train_steps: Some(3),
            ..tiny_config(&data, &dir.path().join("out"))
        },
        ..Default::default()
    };
    let mut harness = open_app_on(dir.path(), &home, "http://127.0.0.1:9", settings);
    drop_path(&mut harness, data.clone());
    step_until(&mut harness, "the dataset", |app| app.dataset_len() == 2);
    step_until(&mut harness, "the search for models", |app| {
        app.models_found() == Some(1)
    });
    harness.state_mut().settings_mut().tab = Tab::Train;
    harness.run_steps(2);
    harness
        .get_by_role_and_label(Role::ComboBox, "Base model")
        .click();
    harness.run_steps(2);
    harness
        .get_by_label_contains("sd1_single  —  SD 1.x")
        .click();
    harness.run_steps(2);
    assert_eq!(
        harness.state().settings().train.base_model,
        checkpoints.join("sd1_single.safetensors")
    );
    assert_eq!(
        harness.state().settings().export.ui_lora_folder,
        None,
        "this ComfyUI has no loras folder"
    );
    harness.get_by_label("Start training").click();
    step_until(&mut harness, "the run to end", |app| {
        app.notices()
            .iter()
            .any(|n| n.starts_with("run ended after 3 steps"))
    });
    assert_eq!(harness.state().losses().len(), 3);
}

#[test]
fn a_first_start_without_models_offers_a_download_that_becomes_the_base_model() {
    use common::fake_hub::{COMMIT, FakeHub};
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("empty-home");
    std::fs::create_dir_all(&home).unwrap();
    // The stand-in Hub serves the tiny SD1 file under the recommended base's repository and file name.
    let served = dir.path().join("served");
    std::fs::create_dir_all(&served).unwrap();
    std::fs::copy(
        common::fixture("sd1_single.safetensors"),
        served.join("v1-5-pruned-emaonly-fp16.safetensors"),
    )
    .unwrap();
    let hub = FakeHub::start("Comfy-Org/stable-diffusion-v1-5-archive", &served, "", 0);
    let mut harness = open_app_on(dir.path(), &home, &hub.address, AppSettings::default());
    harness.state_mut().settings_mut().tab = Tab::Train;
    step_until(&mut harness, "the search for models", |app| {
        app.models_found() == Some(0)
    });
    harness.run_steps(2);
    assert!(
        harness
            .query_by_label("No base model was found on this computer.")
            .is_some()
    );
    harness
        .get_by_label_contains("Download Stable Diffusion 1.5")
        .click();
    step_until(&mut harness, "the download", |app| {
        !app.settings().train.base_model.as_os_str().is_empty()
    });
    let expected = dir
        .path()
        .join("hub-cache/models--Comfy-Org--stable-diffusion-v1-5-archive/snapshots")
        .join(COMMIT)
        .join("v1-5-pruned-emaonly-fp16.safetensors");
    assert_eq!(harness.state().settings().train.base_model, expected);
    step_until(&mut harness, "the new search", |app| {
        app.models_found() == Some(1)
    });
    assert!(
        harness
            .state()
            .notices()
            .iter()
            .any(|n| n.starts_with("downloaded sd15")),
        "{:?}",
        harness.state().notices()
    );
}

/// The label of the estimate line.
fn estimate_line(harness: &Harness<'_, StudioApp>) -> String {
    harness
        .get_by_label_contains("Rough estimate for")
        .value()
        .unwrap_or_default()
}

/// Opens the preset list and says whether it offers `name`, then closes it.
fn presets_offer(harness: &mut Harness<'_, StudioApp>, name: &str) -> bool {
    harness
        .get_by_role_and_label(Role::ComboBox, "Preset")
        .click();
    harness.run_steps(2);
    let offered = harness.query_by_label(name).is_some();
    harness
        .get_by_role_and_label(Role::ComboBox, "Preset")
        .click();
    harness.run_steps(2);
    offered
}

#[test]
fn picking_an_sdxl_base_offers_and_applies_the_sdxl_presets_and_an_sd1_base_brings_them_back() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 2);
    let home = dir.path().join("home");
    let checkpoints = fake_comfyui(&home, &["sd1_single", "sdxl_single"]);
    let settings = AppSettings {
        train: TrainConfig {
            base_model: PathBuf::new(),
            ..tiny_config(&data, &dir.path().join("out"))
        },
        preset: "16 GB GPU".to_string(),
        tab: Tab::Train,
        ..Default::default()
    };
    let mut harness = open_app_on(dir.path(), &home, "http://127.0.0.1:9", settings);
    step_until(&mut harness, "the search for models", |app| {
        app.models_found() == Some(2)
    });
    harness.run_steps(2);
    assert!(presets_offer(&mut harness, "Cyberpunk example"));
    assert!(!presets_offer(&mut harness, "SDXL, 12 GB GPU"));
    let pick = |harness: &mut Harness<'_, StudioApp>, label: &str| {
        harness
            .get_by_role_and_label(Role::ComboBox, "Base model")
            .click();
        harness.run_steps(2);
        harness.get_by_label_contains(label).click();
        harness.run_steps(3);
    };

    // An SDXL base: the SDXL preset for the same GPU takes over, and the estimate is SDXL's.
    pick(&mut harness, "sdxl_single  —  SDXL");
    let train = &harness.state().settings().train;
    assert_eq!(
        train.base_model,
        checkpoints.join("sdxl_single.safetensors")
    );
    assert_eq!(harness.state().settings().preset, "SDXL, 16 GB GPU");
    assert_eq!(train.resolution, Some(1024));
    assert!(train.gradient_checkpointing);
    assert_eq!(train.output_dir, dir.path().join("out"), "the paths stay");
    assert!(presets_offer(&mut harness, "SDXL, 12 GB GPU"));
    assert!(!presets_offer(&mut harness, "Cyberpunk example"));
    let sdxl_estimate = estimate_line(&harness);
    assert!(sdxl_estimate.contains("an SDXL model"), "{sdxl_estimate}");

    // Back to an SD 1.x base: the SD preset for that GPU.
    pick(&mut harness, "sd1_single  —  SD 1.x");
    assert_eq!(harness.state().settings().preset, "16 GB GPU");
    assert_eq!(harness.state().settings().train.resolution, Some(512));
    assert!(presets_offer(&mut harness, "Cyberpunk example"));
    let sd_estimate = estimate_line(&harness);
    assert!(sd_estimate.contains("an SD 1.5 model"), "{sd_estimate}");
}

#[test]
fn a_remembered_sdxl_file_is_described_and_its_settings_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 2);
    let sdxl = common::fixture("sdxl_single.safetensors");
    let settings = AppSettings {
        train: TrainConfig {
            base_model: sdxl.clone(),
            resolution: Some(768),
            ..tiny_config(&data, &dir.path().join("out"))
        },
        tab: Tab::Train,
        ..Default::default()
    };
    let mut harness = open_app_sized(settings, [1280.0, 900.0]);
    // The list finds nothing (it looks nowhere): the files thread tells the family from the file's headers.
    let deadline = Instant::now() + Duration::from_secs(60);
    let shown = |harness: &Harness<'_, StudioApp>| {
        harness
            .get_by_role_and_label(Role::ComboBox, "Base model")
            .value()
    };
    while shown(&harness).as_deref() != Some("sdxl_single.safetensors (SDXL)") {
        assert!(
            Instant::now() < deadline,
            "the base model shows {:?}",
            shown(&harness)
        );
        std::thread::sleep(Duration::from_millis(20));
        harness.step();
    }
    assert!(estimate_line(&harness).contains("an SDXL model"));
    assert!(presets_offer(&mut harness, "SDXL, 8 GB GPU"));
    // Nothing was picked: the remembered settings stay as they were.
    let settings = harness.state().settings();
    assert_eq!(
        (settings.preset.as_str(), settings.train.resolution),
        ("", Some(768))
    );
    assert_eq!(settings.train.base_model, sdxl);
}
