//! The `lora-studio` binary as a user runs it: version stamp, inspect, generate, and one-sentence errors.

mod common;

use std::process::Command;

use common::fixture;

fn lora_studio(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_lora-studio"))
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn version_names_commit_and_backends() {
    let (ok, stdout, _) = lora_studio(&["--version"]);
    assert!(ok);
    assert!(
        stdout.starts_with(&format!("lora-studio {}", env!("CARGO_PKG_VERSION"))),
        "{stdout}"
    );
    assert!(
        stdout.contains("commit ") && stdout.contains("backends: cpu"),
        "{stdout}"
    );
}

#[test]
fn inspect_describes_checkpoints_and_loras() {
    let (ok, stdout, _) = lora_studio(&[
        "inspect",
        fixture("sd2_single.safetensors").to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}");
    assert!(
        stdout.contains("Stable Diffusion 2.x base model")
            && stdout.contains("prediction: v_prediction"),
        "{stdout}"
    );
    let (ok, stdout, _) =
        lora_studio(&["inspect", fixture("lora_sd1.safetensors").to_str().unwrap()]);
    assert!(ok, "{stdout}");
    assert!(
        stdout.contains("kohya LoRA")
            && stdout.contains("rank: 2, 4")
            && stdout.contains("ss_network_module"),
        "{stdout}"
    );
}

#[test]
fn inspect_names_sdxl_base_models_v_prediction_fine_tunes_and_refiners() {
    let inspect = |path: &std::path::Path| {
        let (ok, stdout, stderr) = lora_studio(&["inspect", path.to_str().unwrap()]);
        assert!(ok, "{stderr}");
        stdout
    };
    let stdout = inspect(&fixture("sdxl_single.safetensors"));
    assert!(
        stdout.contains("Stable Diffusion XL base model")
            && stdout.contains("text encoders:")
            && stdout.contains("pooled projection 10")
            && stdout.contains("prediction: epsilon"),
        "{stdout}"
    );
    let stdout = inspect(&fixture("sdxl"));
    assert!(
        stdout.contains("Stable Diffusion XL base model"),
        "{stdout}"
    );

    let dir = tempfile::tempdir().unwrap();
    let stdout = inspect(&common::sdxl_v_prediction_file(dir.path()));
    assert!(
        stdout.contains("Stable Diffusion XL v-prediction fine-tune")
            && stdout
                .contains("v_prediction (`v_pred` marker), zero terminal SNR (`ztsnr` marker)"),
        "{stdout}"
    );

    let refiner = dir.path().join("refiner.safetensors");
    common::rewrite(
        &fixture("sdxl_single.safetensors"),
        &refiner,
        |k| !k.starts_with("conditioner."),
        &[(
            "conditioner.embedders.0.model.ln_final.weight",
            candle_core::Tensor::zeros(4, candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap(),
        )],
    );
    let stdout = inspect(&refiner);
    assert!(
        stdout.contains("refiner.safetensors: an SDXL refiner"),
        "{stdout}"
    );

    let stdout = inspect(&fixture("lora_sdxl.safetensors"));
    assert!(
        stdout.contains("kohya LoRA for SDXL")
            && stdout.contains("ss_base_model_version: sdxl_base_v1-0"),
        "{stdout}"
    );
}

#[test]
fn generate_writes_a_png_with_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let lora = format!("{}:0.8", fixture("lora_sd1.safetensors").display());
    let (ok, _, stderr) = lora_studio(&[
        "generate",
        "--base",
        fixture("sd1_single.safetensors").to_str().unwrap(),
        "--prompt",
        "a cyberpunk city at night",
        "--lora",
        &lora,
        "--steps",
        "3",
        "--seed",
        "7",
        "--width",
        "64",
        "--height",
        "64",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&out).unwrap()));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    assert_eq!((info.width, info.height), (64, 64));
    let parameters = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .unwrap();
    assert!(
        parameters.text.contains("<lora:lora_sd1:0.8>") && parameters.text.contains("Seed: 7"),
        "{}",
        parameters.text
    );
    assert!(
        !dir.path().read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".tmp"))
    );
}

#[test]
fn bad_input_is_one_sentence_without_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("bogus.safetensors");
    std::fs::write(&bogus, b"not a model").unwrap();
    let out = dir.path().join("x.png");
    let generate = |extra: &[&str]| -> Vec<String> {
        let mut args = vec!["generate".to_string(), "--prompt".into(), "x".into()];
        args.extend(["--out".to_string(), out.display().to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let (sd1, bogus_base) = (
        fixture("sd1").display().to_string(),
        bogus.display().to_string(),
    );
    let checkpoint_as_lora = fixture("sd1_single.safetensors").display().to_string();
    let cases = [
        vec!["inspect".to_string(), bogus_base.clone()],
        generate(&["--base", &bogus_base]),
        generate(&["--base", &sd1, "--lora", &checkpoint_as_lora]),
        generate(&["--base", &sd1, "--width", "70"]),
        generate(&["--base", &sd1, "--scheduler", "euler", "--karras"]),
    ];
    for args in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, _, stderr) = lora_studio(&args);
        assert!(!ok, "{args:?} succeeded");
        let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        assert!(
            !stderr.contains("panicked")
                && !stderr.contains("stack backtrace")
                && !stderr.contains("   0: "),
            "{stderr}"
        );
    }
    assert!(!out.exists());
}

/// Asserts a failed run printed one `error:` line, with no panic or backtrace, that contains every one of
/// `parts`.
fn assert_one_error_line_with(args: &[&str], (ok, stderr): (bool, &str), parts: &[&str]) {
    assert!(!ok, "{args:?} succeeded");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
    for part in parts {
        assert!(
            lines[0].contains(part),
            "{args:?}: `{part}` is not in: {stderr}"
        );
    }
    assert!(
        !stderr.contains("panicked") && !stderr.contains("stack backtrace"),
        "{stderr}"
    );
}

/// An SDXL LoRA on an SD1 base and an SD1 LoRA on an SDXL base (folder and single file) are refused by
/// `generate --lora` and by `merge` with one sentence naming the LoRA file and both families; nothing is
/// written.
#[test]
fn loras_of_the_other_family_are_one_sentence_in_generate_and_merge() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("out.png");
    let merged = dir.path().join("merged.safetensors");
    for (base, lora, problem) in [
        (
            "sd1",
            "lora_sdxl.safetensors",
            "is a LoRA for SDXL and this is an SD1/SD2 model",
        ),
        (
            "sd1_single.safetensors",
            "lora_sdxl.safetensors",
            "is a LoRA for SDXL and this is an SD1/SD2 model",
        ),
        (
            "sdxl",
            "lora_sd1.safetensors",
            "is a LoRA for SD1/SD2 and this is an SDXL model",
        ),
        (
            "sdxl_single.safetensors",
            "lora_sd1.safetensors",
            "is a LoRA for SD1/SD2 and this is an SDXL model",
        ),
    ] {
        let (base, lora) = (
            fixture(base).display().to_string(),
            fixture(lora).display().to_string(),
        );
        let spec = format!("{lora}:0.8");
        let generate = [
            "generate",
            "--base",
            &base,
            "--lora",
            &spec,
            "--prompt",
            "x",
            "--steps",
            "2",
            "--out",
            png.to_str().unwrap(),
        ];
        let merge = [
            "merge",
            "--base",
            &base,
            "--lora",
            &spec,
            "--out",
            merged.to_str().unwrap(),
        ];
        for args in [&generate[..], &merge[..]] {
            let (ok, _, stderr) = lora_studio(args);
            assert_one_error_line_with(args, (ok, &stderr), &[&lora, problem]);
        }
        assert!(!png.exists() && !merged.exists());
    }
}

/// Runs `generate` on the fixture model `base` from the reference's initial noise `{key}.init_noise` with the
/// reference run's settings (10 steps, guidance 7.5, `size`) plus `sampler_args`, checks the image against
/// `expected_png` (2/255 per pixel) and returns the PNG's parameters text.
fn reproduce_reference(
    (reference, base, size): (&common::Reference, &str, (&str, &str)),
    key: &str,
    sampler_args: &[&str],
    expected_png: &str,
) -> String {
    let dir = tempfile::tempdir().unwrap();
    let noise_path = dir.path().join("noise.safetensors");
    let noise = reference.f32(&format!("{key}.init_noise"));
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents".to_string(), noise)]),
        &noise_path,
    )
    .unwrap();
    let out = dir.path().join("out.png");
    let prompt = reference.metadata("pipeline.prompt");
    let mut args = vec![
        "generate",
        "--base",
        fixture(base).to_str().unwrap(),
        "--prompt",
        &prompt,
        "--steps",
        "10",
        "--cfg",
        "7.5",
        "--width",
        size.0,
        "--height",
        size.1,
        "--init-noise",
        noise_path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]
    .into_iter()
    .map(str::to_string)
    .collect::<Vec<_>>();
    args.extend(sampler_args.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, _, stderr) = lora_studio(&args);
    assert!(ok, "{stderr}");
    let ours = image::open(&out).unwrap().to_rgb8();
    let expected = image::open(fixture(expected_png)).unwrap().to_rgb8();
    assert_eq!(ours.dimensions(), expected.dimensions());
    let worst = ours
        .as_raw()
        .iter()
        .zip(expected.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(worst <= 2, "{key}: pixels differ by up to {worst}/255");
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&out).unwrap()));
    let reader = decoder.read_info().unwrap();
    reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .unwrap()
        .text
        .clone()
}

#[test]
fn generate_with_reference_init_noise_reproduces_the_reference_image() {
    let parameters = reproduce_reference(
        (&common::Reference::open("sd1"), "sd1", ("64", "64")),
        "ddim",
        &["--scheduler", "ddim"],
        "sd1_ddim.png",
    );
    assert!(parameters.contains("Sampler: DDIM,"), "{parameters}");
    // SDXL, at 64x48, from its single file.
    reproduce_reference(
        (
            &common::Reference::open("sdxl"),
            "sdxl_single.safetensors",
            ("64", "48"),
        ),
        "ddim",
        &["--scheduler", "ddim"],
        "sdxl_ddim.png",
    );
}

#[test]
fn generate_runs_euler_and_dpm_solver_as_diffusers_and_names_them_as_webui_does() {
    let reference = common::Reference::open("schedulers/sd1");
    for (key, sampler_args, name) in [
        ("euler", &["--scheduler", "euler"][..], "Euler"),
        ("dpmpp_2m", &["--scheduler", "dpmpp_2m"][..], "DPM++ 2M"),
        (
            "dpmpp_2m_karras",
            &["--scheduler", "dpmpp_2m", "--karras"][..],
            "DPM++ 2M Karras",
        ),
    ] {
        let png = format!("schedulers/sd1_{key}.png");
        let parameters =
            reproduce_reference((&reference, "sd1", ("64", "64")), key, sampler_args, &png);
        assert!(
            parameters.contains(&format!("Sampler: {name},")),
            "{parameters}"
        );
    }
    // SDXL (its scheduler config, leading spacing), at 64x48, from its single file.
    let sdxl = common::Reference::open("sdxl");
    for (key, sampler_args) in [
        ("euler", &["--scheduler", "euler"][..]),
        (
            "dpmpp_2m_karras",
            &["--scheduler", "dpmpp_2m", "--karras"][..],
        ),
    ] {
        reproduce_reference(
            (&sdxl, "sdxl_single.safetensors", ("64", "48")),
            key,
            sampler_args,
            &format!("sdxl_{key}.png"),
        );
    }
}

/// Without a size, an SDXL model draws at its native size (the UNet's sample size times 8: 1024 px for SDXL
/// 1.0, 64 px for the tiny one), with the same flags as SD1/SD2.
#[test]
fn generate_draws_sdxl_at_its_native_size() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sdxl.png");
    let (ok, _, stderr) = lora_studio(&[
        "generate",
        "--base",
        fixture("sdxl").to_str().unwrap(),
        "--prompt",
        "a lighthouse",
        "--lora",
        &format!("{}:0.8", fixture("lora_sdxl.safetensors").display()),
        "--steps",
        "2",
        "--seed",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("Stable Diffusion XL"), "{stderr}");
    assert!(stderr.contains("299 modules"), "{stderr}");
    assert_eq!(image::open(&out).unwrap().to_rgb8().dimensions(), (64, 64));
}

/// A v-prediction SDXL file says what it predicts and why (its markers), and that Euler a does not start
/// from pure noise on its zero-terminal-SNR schedule as DDIM does.
#[test]
fn generate_on_a_v_prediction_sdxl_file_says_what_it_follows() {
    let dir = tempfile::tempdir().unwrap();
    let base = common::sdxl_v_prediction_file(dir.path());
    let out = dir.path().join("vpred.png");
    let (ok, _, stderr) = lora_studio(&[
        "generate",
        "--base",
        base.to_str().unwrap(),
        "--prompt",
        "a lighthouse",
        "--steps",
        "1",
        "--scheduler",
        "euler_a",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("v_prediction") && stderr.contains("`v_pred` marker"),
        "{stderr}"
    );
    assert!(
        stderr.contains("zero terminal SNR") && stderr.contains("--scheduler ddim"),
        "{stderr}"
    );
}
