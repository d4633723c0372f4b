//! The malformed-input corpus (`tests/corpus/malformed/`, written by its `make.py`)
//! through the real binary: every file gets a one-line error that names it and says what
//! is wrong, a failing exit status, no panic and no abort, and the data dir it ran on is
//! unchanged and verifies afterwards.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use common::{assert_one_line_error, memlora_command, TinyModel, TinySpec};
use memlora::engine::Embedder;
use memlora::memory::MemoryStore;

fn corpus() -> PathBuf {
    common::malformed("")
}

/// File name → what its error must say.
fn cases() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(corpus().join("cases.tsv")).unwrap();
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (file, says) = line.split_once('\t').unwrap_or_else(|| panic!("cases.tsv: no tab in {line:?}"));
            (file.to_owned(), says.to_owned())
        })
        .collect()
}

/// Every file below `dir` with its size and modification time, to see that nothing changed.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, std::time::SystemTime)> {
    common::entries_under(dir)
        .into_iter()
        .filter(|(_, meta)| !meta.is_dir())
        .map(|(path, meta)| (path, (meta.len(), meta.modified().unwrap())))
        .collect()
}

#[test]
fn every_malformed_input_gets_one_line_naming_it_and_changes_nothing() {
    let cases = cases();
    assert!(cases.len() >= 40, "the corpus has {} cases", cases.len());
    let on_disk = std::fs::read_dir(corpus()).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned());
    for name in on_disk.filter(|n| n != "make.py" && n != "cases.tsv") {
        assert!(cases.iter().any(|(file, _)| *file == name), "{name} is in the corpus but not in cases.tsv");
    }

    let scratch = tempfile::tempdir().unwrap();
    let work = scratch.path();
    let model = work.join("tiny.gguf");
    TinyModel::random(TinySpec::llama(), 41).write_gguf(&model, GgmlDType::Q8_0);
    let vision_model = common::write_tiny_smolvlm(&work.join("tiny-vlm"), 4);
    let data = work.join("data");
    // A profile with a memory in it, so that "unchanged" means something.
    let out = memlora_command(&data).args(["memory", "add", "My sister lives in Porto."]).output().unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let before = snapshot(&data);

    for (file, says) in &cases {
        let path = corpus().join(file);
        assert!(path.exists(), "cases.tsv names {file}, which is not in the corpus");
        let arg = path.to_str().unwrap();
        let model_arg = model.to_str().unwrap();
        let mut command = memlora_command(&data);
        let mut placed = None;
        let prefix = file.split('-').next().unwrap();
        match prefix {
            "gguf" => command.args(["ask", "--no-remember", "--model", arg, "hello"]),
            "png" | "gif" | "webp" | "jpeg" | "bmp" | "text" => {
                command.env("MEMLORA_VISION__MODEL", &vision_model).args(["ask", "--no-remember", "--model", model_arg, "--image", arg, "What is it?"])
            }
            "locomo" => command.args(["ingest", "--model", model_arg, arg]),
            "transcript" => command.args(["ingest", "--format", "text", "--model", model_arg, arg]),
            "import" => command.args(["memory", "import", arg]),
            "adapter" => command.args(["adapters", "import", arg]),
            "config" | "manifest" => {
                let target = if prefix == "config" { data.join("config.toml") } else { data.join("models").join(file) };
                std::fs::create_dir_all(target.parent().unwrap()).unwrap();
                std::fs::copy(&path, &target).unwrap();
                placed = Some(target);
                command.args(["memory", "list"])
            }
            other => panic!("cases.tsv: no command for files named {other}-…"),
        };
        let out = command.output().unwrap();
        let named = match &placed {
            Some(target) => target.file_name().unwrap().to_str().unwrap().to_owned(),
            None => file.clone(),
        };
        assert_one_line_error(&out, &[&named, says]);
        if let Some(target) = placed {
            std::fs::remove_file(target).unwrap();
        }
    }
    let _ = std::fs::remove_dir(data.join("models"));

    // Logs may grow and the store's lock names its last opener; nothing else may change.
    let (log_dir, lock) = (data.join("logs"), data.join("memory/LOCK"));
    let kept = |files: BTreeMap<PathBuf, (u64, std::time::SystemTime)>| -> BTreeMap<_, _> {
        files.into_iter().filter(|(path, _)| !path.starts_with(&log_dir) && *path != lock).collect()
    };
    assert_eq!(kept(snapshot(&data)), kept(before), "the data dir changed");
    let embedder = Embedder::load(&data.join("tiny-bert")).unwrap();
    let store = MemoryStore::open(&data, embedder.dimension()).unwrap();
    store.verify().unwrap();
    assert_eq!(store.len(), 1);
}
