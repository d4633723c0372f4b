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

/// A scratch dir holding a profile `data` with two memories, and what `memory list
/// --json` says of them.
fn profile_with_memories() -> (tempfile::TempDir, PathBuf, serde_json::Value) {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    for text in ["My sister lives in Porto.", "I work as a nurse in Leeds."] {
        let out = memlora_command(&data).args(["memory", "add", text]).output().unwrap();
        assert!(out.status.success(), "{}", common::stderr(&out));
    }
    let listed = common::json_of(&data, &["memory", "list", "--json"]);
    (scratch, data, listed)
}

/// The store opens (recovering from whatever happened) and its index agrees with its log.
fn verify_store(data: &Path) {
    let embedder = Embedder::load(&data.join("tiny-bert")).unwrap();
    MemoryStore::open(data, embedder.dimension()).unwrap().verify().unwrap();
}

/// The index agrees with the log, and the memories are `listed`.
fn assert_store_verifies(data: &Path, listed: &serde_json::Value) {
    assert_eq!(&common::json_of(data, &["memory", "list", "--json"]), listed, "the memories changed");
    verify_store(data);
}

#[test]
fn a_symlink_out_of_the_data_dir_is_refused_before_anything_is_written() {
    let (scratch, data, listed) = profile_with_memories();
let outside = scratch.path().join("elsewhere");
    std::fs::create_dir(&outside).unwrap();
    // Adapters written through this link would land outside the private profile.
    let link = data.join("adapters");
    let _ = std::fs::remove_dir_all(&link);
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let before = snapshot(&data);
    for args in [&["memory", "add", "I have a cat."][..], &["memory", "list"], &["adapters", "list"]] {
        let out = memlora_command(&data).args(args).output().unwrap();
        assert_one_line_error(&out, &[link.to_str().unwrap(), "outside the data dir"]);
    }
    assert_eq!(snapshot(&data), before, "the data dir changed");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "something was written through the link");
    // A link that stays inside the profile is fine, and so is a data dir that is a link.
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(data.join("memory"), data.join("memories-shortcut")).unwrap();
    let linked_profile = scratch.path().join("profile-link");
    std::os::unix::fs::symlink(&data, &linked_profile).unwrap();
    let out = memlora_command(&linked_profile).args(["memory", "list"]).output().unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    std::fs::remove_file(data.join("memories-shortcut")).unwrap();
    assert_store_verifies(&data, &listed);
}

/// `memlora ARGS` on `data` mounted read-only in a private mount namespace.
fn on_read_only_data_dir(data: &Path, args: &[&str]) -> std::process::Output {
    let memlora = memlora_command(data);
    let mut command = std::process::Command::new("unshare");
    command.args(["-rm", "--", "sh", "-c", r#"mount --bind -o ro "$1" "$1" && shift && exec "$@""#, "sh"]).arg(data);
    command.arg(memlora.get_program()).args(memlora.get_args());
    for (key, value) in memlora.get_envs() {
        match value {
            Some(value) => command.env(key, value),
            None => command.env_remove(key),
        };
    }
    command.args(args).output().expect("unshare runs (util-linux)")
}

#[test]
fn a_read_only_data_dir_gets_one_line_and_stays_as_it_was() {
    let (scratch, data, listed) = profile_with_memories();
let export = scratch.path().join("export.jsonl");
    let out = memlora_command(&data).args(["memory", "export", "--out", export.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let before = snapshot(&data);
    // The store takes a write lock even to read, so every command that opens it says why
    // it cannot (a half-read, half-written profile would be worse).
    let commands = [&["memory", "list"][..], &["memory", "add", "I have a cat."], &["memory", "forget", "1"], &["memory", "import", export.to_str().unwrap()]];
    for args in commands {
        let out = on_read_only_data_dir(&data, args);
        assert_one_line_error(&out, &[data.to_str().unwrap(), "Read-only file system"]);
    }
    assert_eq!(snapshot(&data), before, "the data dir changed");
    assert_store_verifies(&data, &listed);
}

#[test]
fn a_full_disk_fails_the_change_in_one_line_and_loses_nothing() {
    use std::os::unix::process::CommandExt;
    let (_scratch, data, listed) = profile_with_memories();
    let count = listed.as_array().unwrap().len();
    // RLIMIT_FSIZE makes every write past the limit fail with EFBIG, as a full disk fails
    // with ENOSPC; SIGXFSZ is ignored so that the write returns the error instead of
    // killing the process. Limits from nothing at all to room for a few files.
    let mut added = 0;
    for limit in [0u64, 64, 512, 4096, 32 * 1024, 256 * 1024] {
        let mut command = memlora_command(&data);
        command.args(["memory", "add", &format!("Limit {limit}: my locker code is 4471.")]);
        // SAFETY: only async-signal-safe calls (setrlimit, signal) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                let rlimit = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &rlimit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
        let out = command.output().unwrap();
        if out.status.success() {
            added += 1;
        } else {
            assert_one_line_error(&out, &[&data.display().to_string(), "File too large"]);
        }
        // Whatever happened, the next start sees a consistent store: the memory is
        // either all there or not there at all.
        let now = common::json_of(&data, &["memory", "list", "--json"]);
        assert_eq!(now.as_array().unwrap().len(), count + added, "limit {limit}: {now}");
        verify_store(&data);
    }
    assert!(added < 6, "no limit was small enough to fail a write");
    let now = common::json_of(&data, &["memory", "list", "--json"]);
    assert_eq!(now.as_array().unwrap()[..count], listed.as_array().unwrap()[..], "the old memories changed");
}
