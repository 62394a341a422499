//! How the desktop app feels, measured headless with egui_kittest (layout, accessibility tree and
//! tessellation per frame; rasterising is the GPU's work and not included):
//! - the first screen of a 1,000-photo folder: time until the grid shows and until every visible
//!   thumbnail is decoded, then frame times while scrolling through it;
//! - frame times while a training run keeps every core busy;
//! - frame times of the training view with 100,000 loss points, following the run and zoomed in;
//! - a language model's dataset of 50,000 conversations: time until the list shows and until every sample
//!   is counted in tokens, frame times while an edited turn is saved and while scrolling the list;
//! - the chat preview while a language model trains: time to the first streamed piece and to the whole
//!   reply, and frame times while replies stream in.
//!
//! Run with `cargo bench --bench app_responsiveness`. The photos are generated once into
//! `target/bench-data/` (1,000 JPEGs of 1024x768).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../tests/common/mod.rs"]
mod common;

use common::{DroppedPath, fixture};
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use lora_studio::app::{AppSettings, Mode, StudioApp, Tab};
use lora_studio::config::{LogWith, TrainConfig};
use lora_studio::messages::{Event, LossPoint};
use lora_studio::worker::WorkerHandle;

/// The allocator the `lora-studio` binary uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PHOTOS: usize = 1000;
const WINDOW: [f32; 2] = [1280.0, 820.0];

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let photos = photo_folder(
        &root.join("target/bench-data/photos-1000"),
        PHOTOS,
        1024,
        768,
    );
    first_screen_and_scrolling(&photos);
    while_training(&root.join("target/bench-data/train"));
    long_loss_chart();
    let conversations = chat_file(&root.join("target/bench-data/support-50k.jsonl"), 50_000);
    fifty_thousand_conversations(&conversations);
    chatting_while_training(&root.join("target/bench-data/chat-train"));
}

/// One frame: the app's UI pass plus tessellation of what it drew.
fn frame(harness: &mut Harness<'_, StudioApp>) -> Duration {
    let started = Instant::now();
    harness.step();
    let shapes = harness.output().shapes.clone();
    let pixels_per_point = harness.ctx.pixels_per_point();
    std::hint::black_box(harness.ctx.tessellate(shapes, pixels_per_point));
    started.elapsed()
}

fn open_app(settings: AppSettings) -> Harness<'static, StudioApp> {
    let (worker, events) = WorkerHandle::spawn(Arc::new(|| {})).expect("workers start");
    let app = StudioApp::new(settings, worker, events);
    // A random-weight chat model replies with any bytes, some of them no font draws: boxes, as in the window.
    Harness::builder()
        .with_size(WINDOW)
        .allow_missing_glyphs()
        .build_ui_state(|ui, app: &mut StudioApp| app.main_ui(ui), app)
}

/// Steps (at most 60 frames a second) until `done`.
fn step_until(harness: &mut Harness<'_, StudioApp>, done: impl Fn(&StudioApp) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !done(harness.state()) {
        assert!(Instant::now() < deadline, "{:?}", harness.state().notices());
        harness.step();
        std::thread::sleep(Duration::from_millis(16));
    }
}

fn first_screen_and_scrolling(photos: &Path) {
    let mut harness = open_app(AppSettings::default());
    harness.run_steps(2);
    let started = Instant::now();
    harness
        .input_mut()
        .dropped_files
        .push(Arc::new(DroppedPath(photos.to_path_buf())));
    let mut grid_at = None;
    loop {
        harness.step();
        let app = harness.state();
        if app.dataset_len() == PHOTOS && grid_at.is_none() {
            grid_at = Some(started.elapsed());
            // One more frame so the visible cells ask for their thumbnails.
            harness.step();
        }
        if grid_at.is_some() && harness.state().thumbnails_waiting() == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let full = started.elapsed();
    println!(
        "first screen of {PHOTOS} photos (1024x768 JPEG): grid with captions after {:.0} ms, every visible thumbnail after {:.0} ms",
        grid_at.unwrap().as_secs_f64() * 1e3,
        full.as_secs_f64() * 1e3
    );

    let times = scroll(&mut harness, 60.0, 600.0);
    report("scrolling the grid (300 frames, 60 px each)", &times);
}

fn while_training(dir: &Path) {
    let data = photo_folder(&dir.join("data"), 16, 512, 512);
    let settings = AppSettings {
        train: TrainConfig {
            train_data_dir: data.clone(),
            base_model: fixture("sd1"),
            output_dir: dir.join("out"),
            output_name: "bench".into(),
            resolution: Some(128),
            min_bucket_reso: Some(128),
            max_bucket_reso: Some(256),
            lora_rank: 8,
            lora_alpha: 8.0,
            batch_size: 2,
            max_train_steps: Some(100_000),
            save_steps: 1_000_000,
            log_with: LogWith::None,
            device: "cpu".into(),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut harness = open_app(settings);
    step_until(&mut harness, |app| app.dataset_len() == 16);
    harness.state_mut().settings_mut().tab = Tab::Train;
    harness.run_steps(2);
    harness.get_by_label("Start training").click();
    step_until(&mut harness, |app| app.losses().len() >= 2);
    let steps_before = harness.state().losses().len();
    let started = Instant::now();
    let mut times = Vec::new();
    while started.elapsed() < Duration::from_secs(20) {
        harness
            .input_mut()
            .events
            .push(egui::Event::PointerMoved(egui::pos2(
                700.0 + (times.len() % 50) as f32,
                300.0,
            )));
        times.push(frame(&mut harness));
        std::thread::sleep(Duration::from_millis(16));
    }
    let steps = harness.state().losses().len() - steps_before;
    report(
        &format!(
            "training view while training on all cores ({steps} steps in 20 s, {:.2} s/step)",
            20.0 / steps.max(1) as f64
        ),
        &times,
    );
    harness.get_by_label("Stop").click();
    step_until(&mut harness, |app| {
        format!("{:?}", app.run_status()) == "Idle"
    });
}

fn long_loss_chart() {
    let (worker, _) = WorkerHandle::spawn(Arc::new(|| {})).expect("workers start");
    let (events_tx, events) = crossbeam_channel::unbounded();
    let settings = AppSettings {
        tab: Tab::Train,
        ..Default::default()
    };
    let app = StudioApp::new(settings, worker, events);
    let mut harness = Harness::builder()
        .with_size(WINDOW)
        .build_ui_state(|ui, app: &mut StudioApp| app.main_ui(ui), app);
    const POINTS: u64 = 100_000;
    events_tx
        .send(Event::RunStarted {
            total_steps: POINTS,
            steps_per_epoch: 250,
            first_step: 0,
        })
        .unwrap();
    for step in 1..=POINTS {
        let noise = ((step * 2_654_435_761) % 1000) as f64 / 1000.0;
        events_tx
            .send(Event::Loss(LossPoint {
                step,
                epoch: step / 250,
                loss: 0.05 + 0.1 * noise + 0.1 / (1.0 + step as f64 / 1000.0),
                lr: 1e-4 * (1.0 - step as f64 / POINTS as f64),
                seconds: step as f64 * 0.5,
            }))
            .unwrap();
    }
    while harness.state().losses().len() < POINTS as usize {
        harness.step();
    }
    let times: Vec<Duration> = (0..100).map(|_| frame(&mut harness)).collect();
    report(
        "training view with 100,000 loss points (following the run)",
        &times,
    );

    // Zoom in with ctrl+wheel over the loss plot: the plot stops following the run.
    let plot = harness.get_by_label("loss").rect().center();
    let mut times = Vec::new();
    for _ in 0..100 {
        harness
            .input_mut()
            .events
            .push(egui::Event::PointerMoved(egui::pos2(plot.x, plot.y)));
        harness.input_mut().events.push(egui::Event::Zoom(1.05));
        times.push(frame(&mut harness));
    }
    report(
        "training view with 100,000 loss points (zooming in)",
        &times,
    );
}

/// Frame times of 300 frames (at most 60 a second) that each scroll down by `points` with the pointer at
/// `x`, 400.
fn scroll(harness: &mut Harness<'_, StudioApp>, points: f32, x: f32) -> Vec<Duration> {
    let mut times = Vec::new();
    for _ in 0..300 {
        harness.event(egui::Event::MouseWheel {
            unit: egui::MouseWheelUnit::Point,
            delta: egui::vec2(0.0, -points),
            modifiers: egui::Modifiers::NONE,
            phase: egui::TouchPhase::Move,
            source: egui::MouseWheelSource::Wheel,
        });
        harness
            .input_mut()
            .events
            .push(egui::Event::PointerMoved(egui::pos2(x, 400.0)));
        times.push(frame(harness));
        std::thread::sleep(Duration::from_millis(16));
    }
    times
}

/// The settings of a text-mode app on the tiny Qwen2 fixture.
fn text_settings(data: PathBuf, out: PathBuf) -> AppSettings {
    AppSettings {
        train: TrainConfig {
            train_data_dir: data,
            base_model: fixture("causal_lm/qwen2"),
            output_dir: out,
            output_name: "bench".into(),
            lora_rank: 8,
            lora_alpha: 8.0,
            batch_size: 2,
            max_seq_length: 128,
            max_train_steps: Some(100_000),
            save_steps: 1_000_000,
            log_with: LogWith::None,
            device: "cpu".into(),
            ..Default::default()
        },
        chat: lora_studio::messages::ChatSettings {
            temperature: 0.0,
            max_new_tokens: 48,
            ..Default::default()
        },
        mode: Mode::Text,
        ..Default::default()
    }
}

fn fifty_thousand_conversations(file: &Path) {
    let mut settings = text_settings(PathBuf::new(), PathBuf::from("unused"));
    settings.mode = Mode::Images;
    let mut harness = open_app(settings);
    harness.run_steps(2);
    let started = Instant::now();
    harness
        .input_mut()
        .dropped_files
        .push(Arc::new(DroppedPath(file.to_path_buf())));
    step_until(&mut harness, |app| app.conversations_len() == 50_000);
    let listed = started.elapsed();
    step_until(&mut harness, |app| app.conversations_counted() == 50_000);
    let counted = started.elapsed();
    println!(
        "50,000 conversations (JSONL, {:.1} MB): list after {:.0} ms, every sample counted in tokens after {:.0} ms",
        std::fs::metadata(file).map_or(0.0, |m| m.len() as f64 / 1e6),
        listed.as_secs_f64() * 1e3,
        counted.as_secs_f64() * 1e3
    );

    // Edit a reply of a sample and wait for the save.
    harness.get_by_label_contains("#1  ").click();
    harness.run_steps(2);
    harness
        .get_by_role_and_label(egui::accesskit::Role::MultilineTextInput, "Turn 2")
        .focus();
    harness.run_steps(1);
    harness
        .get_by_role_and_label(egui::accesskit::Role::MultilineTextInput, "Turn 2")
        .type_text(" Thanks!");
    harness.run_steps(1);
    harness.key_press(egui::Key::Escape);
    let started = Instant::now();
    let mut times = Vec::new();
    loop {
        times.push(frame(&mut harness));
        if harness.state().unsaved_conversation_edits() == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    report(
        &format!(
            "editing a turn of 50,000 conversations (the whole file saved and the sample back after {:.0} ms)",
            started.elapsed().as_secs_f64() * 1e3
        ),
        &times,
    );

    let times = scroll(&mut harness, 400.0, 300.0);
    report(
        "scrolling 50,000 conversations (300 frames, 400 px each)",
        &times,
    );
}

fn chatting_while_training(dir: &Path) {
    let data = chat_file(&dir.join("support-300.jsonl"), 300);
    let mut harness = open_app(text_settings(data, dir.join("out")));
    step_until(&mut harness, |app| app.conversations_len() == 300);
    harness.state_mut().settings_mut().tab = Tab::Train;
    harness.run_steps(2);
    harness.get_by_label("Start training").click();
    step_until(&mut harness, |app| app.losses().len() >= 2);
    harness.state_mut().settings_mut().tab = Tab::Preview;
    harness.run_steps(2);
    let mut times = Vec::new();
    let mut first_piece = Vec::new();
    let mut whole = Vec::new();
    for question in 0..5 {
        harness
            .get_by_role_and_label(egui::accesskit::Role::MultilineTextInput, "Message")
            .focus();
        harness.run_steps(1);
        harness
            .get_by_role_and_label(egui::accesskit::Role::MultilineTextInput, "Message")
            .type_text(&format!("Where is my kettle number {question}?"));
        harness.run_steps(1);
        harness.get_by_label("Send").click();
        let turns = harness.state().chat_turns().len() + 2;
        let started = Instant::now();
        let mut first = None;
        while harness.state().chat_turns().len() < turns {
            times.push(frame(&mut harness));
            if first.is_none()
                && harness
                    .state()
                    .chat_streaming()
                    .is_some_and(|t| !t.is_empty())
            {
                first = Some(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(16));
        }
        whole.push(started.elapsed().as_secs_f64());
        first_piece.push(first.unwrap_or(started.elapsed()).as_secs_f64());
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64 * 1e3;
    report(
        &format!(
            "chat preview while a language model trains (5 replies of 48 tokens: first piece after {:.0} ms, whole reply after {:.0} ms on average)",
            mean(&first_piece),
            mean(&whole)
        ),
        &times,
    );
    harness.state_mut().settings_mut().tab = Tab::Train;
    harness.run_steps(2);
    harness.get_by_label("Stop").click();
    step_until(&mut harness, |app| {
        format!("{:?}", app.run_status()) == "Idle"
    });
}

/// A JSONL file of `count` support-desk conversations (one or two exchanges each), written once.
fn chat_file(path: &Path, count: usize) -> PathBuf {
    if path.exists() {
        return path.to_path_buf();
    }
    const PRODUCTS: [&str; 5] = [
        "kettle",
        "desk lamp",
        "rain jacket",
        "backpack",
        "wool scarf",
    ];
    const WHEN: [&str; 4] = ["today", "tomorrow", "on Monday", "this morning"];
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut text = String::new();
    for i in 0..count {
        let product = PRODUCTS[i % PRODUCTS.len()];
        let when = WHEN[i / PRODUCTS.len() % WHEN.len()];
        let mut messages = vec![
            serde_json::json!({"role": "user", "content": format!("Where is my {product}? Order {i}.")}),
            serde_json::json!({"role": "assistant", "content": format!(
                "Thanks for waiting! Your {product} (order {i}) left our warehouse {when}. Anything else, just ask. - Mia"
            )}),
        ];
        if i % 3 == 0 {
            messages.push(serde_json::json!({"role": "user", "content": "Can I return it later?"}));
            messages.push(serde_json::json!({"role": "assistant", "content": format!(
                "Of course! The {product} can come back within 30 days. - Mia"
            )}));
        }
        text.push_str(&serde_json::json!({ "messages": messages }).to_string());
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

fn report(what: &str, times: &[Duration]) {
    let mut ms: Vec<f64> = times.iter().map(|t| t.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    let over = ms.iter().filter(|&&t| t > 33.0).count();
    println!(
        "{what}: frame time median {:.1} ms, p95 {:.1} ms, max {:.1} ms; {over} of {} frames over 33 ms",
        at(0.5),
        at(0.95),
        at(1.0),
        ms.len()
    );
}

/// A folder of `count` JPEG photos-like images (smooth gradients with grain) and a `metadata.csv`,
/// written once.
fn photo_folder(dir: &Path, count: usize, width: u32, height: u32) -> PathBuf {
    let csv = dir.join("metadata.csv");
    if csv.exists() {
        return dir.to_path_buf();
    }
    std::fs::create_dir_all(dir).unwrap();
    let mut captions = String::from("file_name,text\n");
    for i in 0..count {
        let image = image::RgbImage::from_fn(width, height, |x, y| {
            let grain =
                (((x * 7 + y * 13 + i as u32 * 31).wrapping_mul(2_654_435_761)) >> 24) as u8 % 24;
            image::Rgb([
                ((x * 255 / width) as u8).wrapping_add(grain),
                ((y * 255 / height) as u8).wrapping_add(i as u8),
                (((x + y) * 128 / (width + height)) as u8).wrapping_add(grain / 2),
            ])
        });
        let name = format!("photo{i:04}.jpg");
        image.save(dir.join(&name)).unwrap();
        captions.push_str(&format!("{name},\"city street {i}, neon signs, rain\"\n"));
    }
    std::fs::write(csv, captions).unwrap();
    dir.to_path_buf()
}
