//! Fake computers for the model-discovery tests and benchmark: UI installs, a Hugging Face cache and the
//! clutter of a real home folder, built from the fixture models.

use std::path::{Path, PathBuf};

use super::fake_hub::COMMIT;
use super::fixture;

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

pub fn touch(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, b"").unwrap();
}

/// A home folder with AUTOMATIC1111 (SD1 with its config, a LoRA in the checkpoints folder), Forge two levels
/// down (SD2 without a config, in a subfolder), ComfyUI (the SD2 diffusers folder, a damaged file), a symlink
/// back to the home folder, an unreadable folder and 10,000 unrelated files; and a Hugging Face cache with
/// the SD1 diffusers folder (as blobs and snapshot links) and a chat model's config.
pub fn fake_computer(root: &Path) -> (PathBuf, PathBuf) {
    let home = root.join("home");
    let webui = home.join("stable-diffusion-webui");
    touch(&webui.join("webui.py"));
    let checkpoints = webui.join("models/Stable-diffusion");
    for name in [
        "sd1_single.safetensors",
        "sd1_single.yaml",
        "sd1_single.json",
        "lora_sd1.safetensors",
    ] {
        touch(&checkpoints.join(name));
        std::fs::copy(fixture(name), checkpoints.join(name)).unwrap();
    }
    std::fs::create_dir_all(webui.join("models/Lora")).unwrap();

    let forge = home.join("AI/tools/stable-diffusion-webui-forge");
    touch(&forge.join("webui.py"));
    std::fs::create_dir_all(forge.join("modules_forge")).unwrap();
    let sd2 = forge.join("models/Stable-diffusion/v2/sd2-768.safetensors");
    touch(&sd2);
    std::fs::copy(fixture("sd2_single.safetensors"), &sd2).unwrap();

    let comfy = home.join("ComfyUI");
    touch(&comfy.join("main.py"));
    std::fs::create_dir_all(comfy.join("comfy")).unwrap();
    copy_dir(&fixture("sd2"), &comfy.join("models/checkpoints/tiny-sd2"));
    std::fs::write(
        comfy.join("models/checkpoints/broken.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all",
    )
    .unwrap();
    std::fs::create_dir_all(comfy.join("models/loras")).unwrap();

    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&home, home.join("AI/back-home")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let private = home.join("private");
        std::fs::create_dir_all(&private).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    let photos = home.join("Pictures/holiday");
    std::fs::create_dir_all(&photos).unwrap();
    for i in 0..10_000 {
        std::fs::write(photos.join(format!("IMG_{i:05}.jpg")), b"").unwrap();
    }

    let hub = root.join("hf/hub");
    let repo = hub.join("models--someone--tiny-sd1");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    let snapshot = repo.join("snapshots").join(COMMIT);
    link_as_blobs(&fixture("sd1"), &snapshot, &repo.join("blobs"));
    let chat = hub.join("models--someone--tiny-chat");
    std::fs::create_dir_all(chat.join("refs")).unwrap();
    std::fs::write(chat.join("refs/main"), COMMIT).unwrap();
    let chat_snapshot = chat.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&chat_snapshot).unwrap();
    std::fs::write(
        chat_snapshot.join("config.json"),
        r#"{"model_type": "qwen2", "torch_dtype": "bfloat16"}"#,
    )
    .unwrap();
    std::fs::write(chat_snapshot.join("model.safetensors"), b"").unwrap();
    (home, hub)
}

/// Copies `from` as a Hugging Face snapshot: each file a blob, linked from the snapshot folder.
pub fn link_as_blobs(from: &Path, snapshot: &Path, blobs: &Path) {
    std::fs::create_dir_all(snapshot).unwrap();
    std::fs::create_dir_all(blobs).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = snapshot.join(entry.file_name());
        if entry.path().is_dir() {
            link_as_blobs(&entry.path(), &target, blobs);
            continue;
        }
        let bytes = std::fs::read(entry.path()).unwrap();
        let blob = blobs.join(lora_studio::hashing::sha256_hex(&bytes));
        std::fs::write(&blob, &bytes).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(&blob, &target).unwrap();
        #[cfg(not(unix))]
        std::fs::copy(&blob, &target).unwrap();
    }
}
