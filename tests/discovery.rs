//! Finding the models a user already has, in fake install trees built from the fixture models: AUTOMATIC1111,
//! Forge, ComfyUI, the Hugging Face cache (refs, snapshots, blobs) and an added folder, among a symlink loop,
//! an unreadable folder, a damaged file and 10,000 unrelated files; the second scan served from the cache;
//! names resolved for `train` and `generate`; and `lora-studio download` against a local stand-in for the
//! Hub (a cut resumed, a corrupted byte refused, offline mode, a full disk).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::fake_hub::{COMMIT, FakeHub, resumed_offsets};
use common::fake_installs::{fake_computer, touch};
use common::fixture;
use lora_studio::discovery::{
    Discovery, DiscoveryOptions, Family, InstallKind, add_folder, added_folders, discover, resolve,
};

const BIN: &str = env!("CARGO_BIN_EXE_lora-studio");

fn options(home: &Path, hub: &Path, data: &Path) -> DiscoveryOptions {
    DiscoveryOptions {
        home: Some(home.to_path_buf()),
        hub_cache: Some(hub.to_path_buf()),
        extra_roots: added_folders(data),
        cache_file: Some(data.join("models-cache.json")),
        time_limit: Duration::from_secs(60),
    }
}

/// (name, family, where it was found) of every model found.
fn summary(found: &Discovery) -> Vec<(String, Family, InstallKind)> {
    found
        .models
        .iter()
        .map(|m| (m.name.clone(), m.family, m.source))
        .collect()
}

#[test]
fn models_are_found_where_each_ui_keeps_them_and_described_from_their_headers() {
    let dir = tempfile::tempdir().unwrap();
    let (home, hub) = fake_computer(dir.path());
    let data = dir.path().join("data");
    let found = discover(&options(&home, &hub, &data));
    assert!(!found.incomplete, "the scan ran out of budget");
    let mut expected = vec![
        (
            "sd1_single".to_string(),
            Family::Sd1,
            InstallKind::Automatic1111,
        ),
        (
            "tiny-sd1".to_string(),
            Family::Sd1,
            InstallKind::HuggingFaceCache,
        ),
        ("tiny-sd2".to_string(), Family::Sd2V, InstallKind::ComfyUi),
        ("sd2-768".to_string(), Family::Sd2, InstallKind::Forge),
        (
            "tiny-chat".to_string(),
            Family::ChatModel,
            InstallKind::HuggingFaceCache,
        ),
    ];
    expected.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    assert_eq!(summary(&found), expected);
    let sd1 = &found.models[0];
    assert_eq!(sd1.precision, "f16");
    assert_eq!(
        sd1.size_bytes,
        std::fs::metadata(fixture("sd1_single.safetensors"))
            .unwrap()
            .len()
    );
    let tiny_sd2 = found.models.iter().find(|m| m.name == "tiny-sd2").unwrap();
    assert_eq!(tiny_sd2.precision, "f16", "the fp16 variant's weights");
    let from_hub = found.models.iter().find(|m| m.name == "tiny-sd1").unwrap();
    assert_eq!(from_hub.precision, "f32");
    assert!(
        from_hub.size_bytes > 3_000_000,
        "sizes follow the cache's links"
    );
    let loras: Vec<(InstallKind, PathBuf)> = found
        .lora_folders
        .iter()
        .map(|f| (f.source, f.path.clone()))
        .collect();
    assert_eq!(
        loras,
        [
            (InstallKind::ComfyUi, home.join("ComfyUI/models/loras")),
            (
                InstallKind::Automatic1111,
                home.join("stable-diffusion-webui/models/Lora")
            ),
        ]
    );
    assert_eq!(found.skipped.len(), 1, "{:?}", found.skipped);
    assert!(found.skipped[0].0.ends_with("broken.safetensors"));

    // The second scan reads no header: every description comes from the cache.
    let again = discover(&options(&home, &hub, &data));
    assert_eq!(summary(&again), summary(&found));
    assert_eq!(
        again.cached,
        found.models.len() + 1,
        "the LoRA file is remembered too"
    );
    assert_eq!(found.cached, 0);
}

#[test]
fn added_folders_are_searched_and_names_resolve_to_paths() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mine = dir.path().join("my models/sd");
    touch(&mine.join("a/b/x.txt"));
    std::fs::copy(
        fixture("sd1_single.safetensors"),
        mine.join("a/b/my-sd15.safetensors"),
    )
    .unwrap();
    add_folder(&data, &mine).unwrap();
    add_folder(&data, &mine).unwrap();
    assert_eq!(added_folders(&data), [mine.canonicalize().unwrap()]);
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let options = options(&empty, &empty.join("no-hub"), &data);
    let found = discover(&options);
    assert_eq!(
        summary(&found),
        [("my-sd15".to_string(), Family::Sd1, InstallKind::AddedFolder)]
    );

    let scan = || discover(&options);
    let path = mine.canonicalize().unwrap().join("a/b/my-sd15.safetensors");
    assert_eq!(resolve(Path::new("my-sd15"), scan).unwrap(), path);
    assert_eq!(resolve(Path::new("MY-SD15"), scan).unwrap(), path);
    let existing = fixture("sd1");
    assert_eq!(
        resolve(&existing, || panic!("no scan for a path")).unwrap(),
        existing
    );
    let unknown = resolve(Path::new("sd-nonexistent"), scan).unwrap_err();
    assert!(
        unknown.contains("sd-nonexistent") && unknown.contains("my-sd15"),
        "{unknown}"
    );
    let missing_file = resolve(Path::new("models/v1-5.safetensors"), scan).unwrap_err();
    assert_eq!(missing_file, "models/v1-5.safetensors does not exist");
}

fn run(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_remove("HF_ENDPOINT")
        .env_remove("HF_HUB_OFFLINE");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

#[test]
fn the_models_command_lists_what_was_found_and_generate_takes_a_name() {
    let dir = tempfile::tempdir().unwrap();
    let (home, hub) = fake_computer(dir.path());
    let data = dir.path().join("data");
    let env = [
        ("HOME", home.as_path()),
        ("HF_HUB_CACHE", &hub),
        ("LORA_STUDIO_DATA_DIR", &data),
    ];
    let out = run(&["models", "--json"], &env);
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = json["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 5, "{names:?}");
    assert_eq!(json["models"][0]["family"], "SD 1.x");
    let out = run(&["models"], &env);
    let listing = text(&out);
    assert!(
        listing.contains("Stable Diffusion 2.x")
            && listing.contains("sd2-768")
            && listing.contains("LoRA folders"),
        "{listing}"
    );
    let image = dir.path().join("out.png");
    let image_arg = image.display().to_string();
    let out = run(
        &[
            "generate", "--base", "tiny-sd1", "--prompt", "neon", "--steps", "1", "--width", "64",
            "--height", "64", "--out", &image_arg,
        ],
        &env,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(image.is_file());
    let out = run(
        &[
            "generate",
            "--base",
            "no-such-model",
            "--prompt",
            "neon",
            "--out",
            &image_arg,
        ],
        &env,
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no-such-model is neither a file nor a folder nor the name of a model"),
        "{}",
        text(&out)
    );
}

#[test]
fn downloads_resume_refuse_a_corrupted_file_and_respect_offline_mode() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served");
    std::fs::create_dir_all(&served).unwrap();
    std::fs::copy(
        fixture("sd1_single.safetensors"),
        served.join("tiny.safetensors"),
    )
    .unwrap();
    let size = std::fs::metadata(served.join("tiny.safetensors"))
        .unwrap()
        .len();
    let cache = dir.path().join("cache");
    let cache_arg = cache.display().to_string();
    let data = dir.path().join("data");
    let env = [("LORA_STUDIO_DATA_DIR", data.as_path())];

    // A transfer cut half way resumes from where it stopped.
    let hub = FakeHub::start("someone/tiny", &served, "tiny.safetensors", 1);
    let args = [
        "download",
        "someone/tiny",
        "tiny.safetensors",
        "--hub-endpoint",
        &hub.address,
        "--cache-dir",
        &cache_arg,
    ];
    let out = run(&args, &env);
    assert!(out.status.success(), "{}\n{:?}", text(&out), hub.requests());
    assert_eq!(
        resumed_offsets(&hub.requests(), "tiny.safetensors"),
        [size / 2]
    );
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(
        path,
        cache
            .join("models--someone--tiny/snapshots")
            .join(COMMIT)
            .join("tiny.safetensors")
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(served.join("tiny.safetensors")).unwrap()
    );
    assert!(text(&out).contains("base_model=tiny"), "{}", text(&out));

    // Offline, what the cache has is found and what it lacks is one sentence.
    let offline = [
        ("LORA_STUDIO_DATA_DIR", data.as_path()),
        ("HF_HUB_OFFLINE", Path::new("1")),
    ];
    let out = run(
        &[
            "download",
            "someone/tiny",
            "tiny.safetensors",
            "--cache-dir",
            &cache_arg,
        ],
        &offline,
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = run(
        &[
            "download",
            "someone/tiny",
            "other.safetensors",
            "--cache-dir",
            &cache_arg,
        ],
        &offline,
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("downloads are off"), "{}", text(&out));

    // A byte changed on the way does not match the Hub's SHA-256: the file is not kept.
    let other_cache = dir.path().join("cache2");
    let other_arg = other_cache.display().to_string();
    let corrupting = FakeHub::serving(
        "someone/tiny",
        &served,
        "",
        0,
        Some(("tiny.safetensors", 1000)),
    );
    let args = [
        "download",
        "someone/tiny",
        "tiny.safetensors",
        "--hub-endpoint",
        &corrupting.address,
        "--cache-dir",
        &other_arg,
    ];
    let out = run(&args, &env);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("does not match the Hub's SHA-256"),
        "{}",
        text(&out)
    );
    let kept: Vec<PathBuf> = walk_files(&other_cache)
        .into_iter()
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 1000))
        .collect();
    assert!(kept.is_empty(), "kept: {kept:?}");

    // A name that is neither recommended nor a repository is one sentence naming the choices.
    let out = run(&["download", "sd99"], &env);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("sd15") && text(&out).contains("OWNER/NAME FILE"),
        "{}",
        text(&out)
    );
}

#[test]
fn the_recommended_chat_model_downloads_as_a_model_folder_the_models_list_shows() {
    let dir = tempfile::tempdir().unwrap();
    let served = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/causal_lm/qwen2");
    let hub = FakeHub::start(
        "Qwen/Qwen2.5-0.5B-Instruct",
        &served,
        "model.safetensors",
        1,
    );
    let cache = dir.path().join("hub");
    let cache_arg = cache.display().to_string();
    let data = dir.path().join("data");
    let env = [("LORA_STUDIO_DATA_DIR", data.as_path())];
    let out = run(
        &[
            "download",
            "qwen2.5-0.5b",
            "--hub-endpoint",
            &hub.address,
            "--cache-dir",
            &cache_arg,
        ],
        &env,
    );
    assert!(out.status.success(), "{}\n{:?}", text(&out), hub.requests());
    let folder = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(
        folder,
        cache
            .join("models--Qwen--Qwen2.5-0.5B-Instruct/snapshots")
            .join(COMMIT)
    );
    for file in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        assert_eq!(
            std::fs::read(folder.join(file)).unwrap(),
            std::fs::read(served.join(file)).unwrap(),
            "{file}"
        );
    }
    assert!(!folder.join("reference.safetensors").exists());
    assert_eq!(
        resumed_offsets(&hub.requests(), "model.safetensors").len(),
        1,
        "the cut weights file resumed once"
    );
    assert!(
        text(&out).contains("base_model=Qwen2.5-0.5B-Instruct"),
        "{}",
        text(&out)
    );

    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let listed = run(
        &["models", "--json"],
        &[
            ("HOME", home.as_path()),
            ("HF_HUB_CACHE", cache.as_path()),
            ("LORA_STUDIO_DATA_DIR", data.as_path()),
        ],
    );
    assert!(listed.status.success(), "{}", text(&listed));
    let json: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let models = json["models"].as_array().unwrap();
    assert_eq!(models.len(), 1, "{json}");
    assert_eq!(models[0]["name"], "Qwen2.5-0.5B-Instruct");
    assert_eq!(models[0]["family"], "chat model");
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk_files(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn a_download_that_does_not_fit_on_the_disk_is_refused_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served");
    std::fs::create_dir_all(&served).unwrap();
    // 8 MiB of content on a 4 MiB disk.
    std::fs::write(served.join("big.safetensors"), vec![7u8; 8 << 20]).unwrap();
    let hub = FakeHub::start("someone/big", &served, "", 0);
    let cache = dir.path().join("small-disk");
    std::fs::create_dir_all(&cache).unwrap();
    let script = r#"mount -t tmpfs -o size=4m tmpfs "$1" || exit 90
"$2" download someone/big big.safetensors --hub-endpoint "$3" --cache-dir "$1/hub" 2>&1"#;
    let attempt = |namespaces: &[&str]| {
        Command::new("unshare")
            .args(namespaces)
            .args(["sh", "-c", script, "sh"])
            .arg(&cache)
            .arg(BIN)
            .arg(&hub.address)
            .env("LORA_STUDIO_DATA_DIR", dir.path().join("data"))
            .output()
            .expect("`unshare` (util-linux) runs the download in a private mount namespace")
    };
    let mut output = attempt(&["--user", "--map-root-user", "--mount"]);
    if String::from_utf8_lossy(&output.stderr).starts_with("unshare:") {
        output = attempt(&["--mount"]);
    }
    let said = text(&output);
    assert_ne!(
        output.status.code(),
        Some(90),
        "tmpfs could not be mounted: {said}"
    );
    assert!(!output.status.success(), "{said}");
    assert!(
        said.contains("`big.safetensors` of someone/big needs 8.0 MiB but")
            && said.contains("free"),
        "{said}"
    );
    assert!(
        !hub.requests()
            .iter()
            .any(|r| r.contains("bytes=0-") && !r.contains("bytes=0-0")),
        "the download started: {:?}",
        hub.requests()
    );
}
