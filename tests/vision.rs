//! The vision-language model with tiny random SmolVLM checkpoints written here with the
//! real tensor names and loaded through the real loader.

mod common;

use candle_core::{Device, Tensor};
use common::{max_abs_diff, write_tiny_smolvlm};
use image::{DynamicImage, Rgb, RgbImage};
use memlora::adapters::LoraAdapter;
use memlora::engine::vision::VisionLanguageModel;
use memlora::engine::{LoadOptions, SamplingParams, TargetModule};

fn picture(colour: [u8; 3]) -> DynamicImage {
    let mut image = RgbImage::from_pixel(40, 30, Rgb([255, 255, 255]));
    for x in 5..20 {
        for y in 5..25 {
            image.put_pixel(x, y, Rgb(colour));
        }
    }
    DynamicImage::ImageRgb8(image)
}

fn generate(model: &mut VisionLanguageModel, image: &DynamicImage, sampling: &SamplingParams) -> (String, usize) {
    let features = model.encode(image).unwrap();
    let generation =
        model.answer(&features, "What colour is the square?", sampling, &[], &mut |_| std::ops::ControlFlow::Continue(())).unwrap();
    (generation.text, generation.completion_tokens)
}

#[test]
fn a_tiny_smolvlm_loads_encodes_an_image_and_generates_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_tiny_smolvlm(&dir.path().join("vlm"), 3);
    let mut model = VisionLanguageModel::load(&path, &LoadOptions::default()).unwrap();
    assert_eq!(model.tokens_per_image(), 4, "16 patches shuffled by 2");
    let red = picture([200, 20, 20]);
    let features = model.encode(&red).unwrap();
    assert_eq!(features.rows.dims(), [4, 64], "one decoder-width row per image token");
    assert!(features.rows.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite()));

    // The prompt holds exactly the image's placeholders.
    let prompt = model.prompt("What is it?");
    assert_eq!(prompt.matches("<image>").count(), 4);
    assert!(prompt.starts_with("<|im_start|>User:<fake_token_around_image><global-img><image>"));
    assert!(prompt.ends_with("What is it?<end_of_utterance>\nAssistant:"));

    let sampling = SamplingParams { max_tokens: 12, temperature: 0.9, top_p: 0.95, seed: 11, ..SamplingParams::default() };
    let first = generate(&mut model, &red, &sampling);
    assert!(first.1 > 0);
    assert_eq!(generate(&mut model, &red, &sampling), first, "the same seed gives the same answer");
    let other_seed = SamplingParams { seed: 12, ..sampling };
    let _ = generate(&mut model, &red, &other_seed);
    // A text prompt after an image prompt starts afresh (the image rows are not reused
    // as if they were the placeholder token's embedding).
    assert_eq!(generate(&mut model, &red, &sampling), first);

    // The model looks at the image: another picture moves the logits.
    let blue = model.encode(&picture([20, 20, 200])).unwrap();
    let red_logits = model.logits(&features, "What colour?", &[]).unwrap();
    let blue_logits = model.logits(&blue, "What colour?", &[]).unwrap();
    assert!(max_abs_diff(&red_logits, &blue_logits) > 1e-4);
}

#[test]
fn a_lora_on_the_text_decoder_changes_the_logits_as_its_delta_w_says() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = write_tiny_smolvlm(&dir.path().join("base"), 5);
    let mut base = VisionLanguageModel::load(&base_path, &LoadOptions::default()).unwrap();
    let config = base.chat_model().decoder_config().clone();
    let adapter = LoraAdapter::random(&config, 4, 8.0, &[TargetModule::Q, TargetModule::V], 0.3, 9).unwrap();

    // The same checkpoint with ΔW = scale·B·A added to each adapted weight.
    let merged_path = dir.path().join("merged");
    std::fs::create_dir_all(&merged_path).unwrap();
    for file in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(base_path.join(file), merged_path.join(file)).unwrap();
    }
    let mut tensors = candle_core::safetensors::load(base_path.join("model.safetensors"), &Device::Cpu).unwrap();
    for (key, pair) in &adapter.modules {
        let delta = (pair.b.matmul(&pair.a).unwrap() * adapter.scale()).unwrap();
        let name = format!("model.text_model.layers.{}.self_attn.{}.weight", key.layer, key.module.hf_name());
        let weight = (&tensors[&name] + delta).unwrap();
        tensors.insert(name, weight);
    }
    candle_core::safetensors::save(&tensors, merged_path.join("model.safetensors")).unwrap();
    let mut reference = VisionLanguageModel::load(&merged_path, &LoadOptions::default()).unwrap();

    base.chat_model_mut().attach_adapter("vision-expert", &adapter).unwrap();
    let image = picture([30, 160, 40]);
    let features = base.encode(&image).unwrap();
    let with_lora = base.logits(&features, "How many squares?", &[("vision-expert".into(), 1.0)]).unwrap();
    let without = base.logits(&features, "How many squares?", &[]).unwrap();
    let expected = reference.logits(&reference.encode(&image).unwrap(), "How many squares?", &[]).unwrap();
    assert!(max_abs_diff(&with_lora, &without) > 1e-3, "the adapter does something");
    assert!(max_abs_diff(&with_lora, &expected) < 1e-3, "and exactly what its ΔW says: {}", max_abs_diff(&with_lora, &expected));
}

#[test]
fn broken_checkpoints_get_one_line_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_tiny_smolvlm(&dir.path().join("vlm"), 3);
    // A plain decoder is not a vision-language model.
    let config = std::fs::read_to_string(path.join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&config).unwrap();
    json.as_object_mut().unwrap().remove("vision_config");
    std::fs::write(path.join("config.json"), json.to_string()).unwrap();
    let error = VisionLanguageModel::load(&path, &LoadOptions::default()).err().unwrap().to_string();
    assert!(error.contains("config.json") && error.contains("vision_config"), "{error}");
    assert_eq!(error.lines().count(), 1);

    // A tower tensor missing.
    let path = write_tiny_smolvlm(&dir.path().join("cut"), 3);
    let tensors = candle_core::safetensors::load(path.join("model.safetensors"), &Device::Cpu).unwrap();
    let kept: std::collections::HashMap<String, Tensor> =
        tensors.into_iter().filter(|(name, _)| !name.contains("post_layernorm")).collect();
    candle_core::safetensors::save(&kept, path.join("model.safetensors")).unwrap();
    let error = VisionLanguageModel::load(&path, &LoadOptions::default()).err().unwrap().to_string();
    assert!(error.contains("vision tower") && error.contains("post_layernorm"), "{error}");
}

fn write_png(path: &std::path::Path, colour: [u8; 3]) {
    picture(colour).save_with_format(path, image::ImageFormat::Png).unwrap();
}

#[test]
fn an_image_memory_is_kept_and_a_later_question_looks_at_the_stored_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let chat =
        common::TinyModel::random(common::TinySpec::llama(), 8).write_gguf(&d.join("chat.gguf"), candle_core::quantized::GgmlDType::Q8_0);
    let vlm = write_tiny_smolvlm(&d.join("vlm"), 3);
    let photo = d.join("holiday photo.png");
    write_png(&photo, [200, 30, 30]);
    let original = std::fs::read(&photo).unwrap();
    let ask = |args: &[&str]| {
        let out = common::memlora_command(d)
            .env("MEMLORA_VISION__MODEL", &vlm)
            .env("MEMLORA_GENERATION__MAX_TOKENS", "6")
            .args(["ask", "--json", "--model", chat.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", common::stderr(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };

    let first = ask(&["--image", photo.to_str().unwrap(), "What colour is my car?"]);
    let stored = std::path::PathBuf::from(first["image"]["path"].as_str().unwrap());
    assert_eq!(first["image"]["mode"], "native");
    assert_eq!(first["looked_at"], first["image"]["path"], "the model looked at the stored copy");
    assert!(stored.starts_with(d.join("images")), "{}", stored.display());
    assert_eq!(std::fs::read(&stored).unwrap(), original);
    let sha = first["image"]["sha256"].as_str().unwrap();
    assert!(stored.file_name().unwrap().to_string_lossy().starts_with(sha));
    let changes = first["remembered"]["changes"].as_array().unwrap();
    let image_memory = changes.iter().find(|c| c["text"].as_str().unwrap().starts_with("User shared an image:")).unwrap();

    // The memory points at the copy, which outlives the original.
    let listed = common::json_of(d, &["memory", "show", "--json", &image_memory["id"].to_string()]);
    assert_eq!(listed["memory"]["image"].as_str().map(std::path::PathBuf::from), Some(stored.clone()), "{listed}");
    std::fs::remove_file(&photo).unwrap();

    // A later question that recalls the image memory is answered looking at it again.
    let later = ask(&["--no-remember", "What was in the image I shared?"]);
    assert_eq!(later["looked_at"].as_str().map(std::path::PathBuf::from), Some(stored.clone()), "{later}");
    assert!(later["memories_used"].as_array().unwrap().iter().any(|m| m["id"] == image_memory["id"]));

    // In caption mode the chat model answers from the caption instead.
    let captioned = ask(&["--vision", "caption", "--no-remember", "--image", stored.to_str().unwrap(), "What colour?"]);
    assert_eq!(captioned["image"]["mode"], "caption");
    assert!(captioned["looked_at"].is_null());
    assert!(captioned["image"]["caption"].is_string());
}

#[test]
fn bad_images_and_a_missing_vision_model_get_one_line_errors_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let chat =
        common::TinyModel::random(common::TinySpec::llama(), 8).write_gguf(&d.join("chat.gguf"), candle_core::quantized::GgmlDType::Q8_0);
    let vlm = write_tiny_smolvlm(&d.join("vlm"), 3);
    let run = |vision_model: &std::path::Path, image: &std::path::Path| {
        common::memlora_command(d)
            .env("MEMLORA_VISION__MODEL", vision_model)
            .args(["ask", "--model", chat.to_str().unwrap(), "--image", image.to_str().unwrap(), "What is it?"])
            .output()
            .unwrap()
    };
    let empty = d.join("empty.png");
    std::fs::write(&empty, b"").unwrap();
    common::assert_one_line_error(&run(&vlm, &empty), &["empty.png", "empty"]);
    let text = d.join("notes.jpg");
    std::fs::write(&text, "not a picture").unwrap();
    common::assert_one_line_error(&run(&vlm, &text), &["notes.jpg", "not an image in a supported format"]);
    let cut = d.join("cut.png");
    let mut bytes = Vec::new();
    picture([1, 2, 3]).write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    common::assert_one_line_error(&run(&vlm, &cut), &["cut.png"]);
    common::assert_one_line_error(&run(&vlm, &d.join("missing.gif")), &["missing.gif"]);
    let good = d.join("good.png");
    write_png(&good, [5, 5, 5]);
    common::assert_one_line_error(&run(&d.join("no-such-model"), &good), &["vision model is not available", "no-such-model"]);
    assert!(!d.join("images").exists(), "nothing was stored");
    let memories = common::json_of(d, &["memory", "list", "--json"]);
    assert_eq!(memories.as_array().map(Vec::len), Some(0), "{memories}");
}

#[test]
fn eval_vqa_asks_each_question_about_its_image_and_reports_accuracy_per_kind() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let chat =
        common::TinyModel::random(common::TinySpec::llama(), 8).write_gguf(&d.join("chat.gguf"), candle_core::quantized::GgmlDType::Q8_0);
    let vlm = write_tiny_smolvlm(&d.join("vlm"), 3);
    let set = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/vqa");
    let report_path = d.join("vqa.json");
    for mode in ["native", "caption"] {
        let out = common::memlora_command(d)
            .env("MEMLORA_VISION__MODEL", &vlm)
            .env("MEMLORA_MODEL", &chat)
            .args(["eval", "vqa", "--data", set.to_str().unwrap(), "--limit", "3", "--vision", mode, "--out"])
            .arg(&report_path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", common::stderr(&out));
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
        assert_eq!(report["mode"], mode);
        let predictions = report["predictions"].as_array().unwrap();
        assert_eq!(predictions.len(), 3);
        for p in predictions {
            let right = memlora::eval::vqa::correct(p["prediction"].as_str().unwrap(), p["answer"].as_str().unwrap());
            assert_eq!(p["correct"], right, "{p}");
        }
        let right = predictions.iter().filter(|p| p["correct"] == true).count() as f64;
        assert!((report["overall"].as_f64().unwrap() - 100.0 * right / 3.0).abs() < 1e-9);
        assert!(String::from_utf8_lossy(&out.stdout).contains("counting"));
    }
    // Nothing of the evaluation lands in the profile's memories.
    assert_eq!(common::json_of(d, &["memory", "list", "--json"]).as_array().map(Vec::len), Some(0));
}
