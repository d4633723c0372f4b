//! Entry points for the fuzz targets in `fuzz/` (cargo fuzz) and for the replay of
//! their corpora in `tests/fuzz_corpus.rs`, so that both run the same code.
//!
//! Each takes arbitrary bytes, feeds them to one reader of untrusted input the way the
//! program does, and panics only when a property the program relies on is broken:
//! the reader itself panicking, an error that would print as an empty line, or (for
//! the model-output repair) valid JSON that comes back changed.

use std::io::Cursor;
use std::path::Path;

/// The model-output parsers: repair, facts, memory operations.
pub fn model_output(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match crate::memory::parse::repair_json(&text) {
        Ok(repaired) => {
            // Well-formed JSON that is all of the output is taken as it is.
            if let Ok(value @ (serde_json::Value::Object(_) | serde_json::Value::Array(_))) =
                serde_json::from_str::<serde_json::Value>(&text)
            {
                if depth(&value) <= crate::memory::parse::MAX_DEPTH {
                    assert_eq!(repaired.value, value, "valid JSON was changed by the repair");
                }
            }
        }
        Err(e) => printable("repair_json", &e),
    }
    if let Err(e) = crate::memory::parse::parse_facts(&text) {
        printable("parse_facts", &e);
    }
    if let Err(e) = crate::memory::parse::parse_memory_ops(&text) {
        printable("parse_memory_ops", &e);
    }
}

/// A batch-mode or daemon request line (batch reads lines lossily, the daemon strictly).
pub fn request_line(data: &[u8]) {
    let lossy = String::from_utf8_lossy(data);
    for line in lossy.lines() {
        match crate::worker::protocol::parse_line(line) {
            Ok(parsed) => {
                // What the front ends send is what the worker gets back when re-read.
                if let crate::worker::protocol::Line::Request(request) = parsed.line {
                    let written = serde_json::to_string(&request).expect("a request serialises");
                    match crate::worker::protocol::parse_line(&written) {
                        Ok(crate::worker::protocol::Parsed { line: crate::worker::protocol::Line::Request(again), .. }) => {
                            assert_eq!(again, request, "a request changed on its way through JSON")
                        }
                        _ => panic!("a request does not read back: {written}"),
                    }
                }
            }
            Err((_, reason)) => printable("parse_line", &reason),
        }
    }
}

/// A GGUF file's header, metadata and tensor table.
pub fn gguf_header(data: &[u8]) {
    let len = data.len() as u64;
    if let Err(e) = crate::engine::read_gguf_header(&mut Cursor::new(data), len, Path::new("fuzz.gguf")) {
        printable("read_gguf_header", &e);
    }
}

/// A PEFT adapter: the first two bytes (little-endian) give the length of
/// `adapter_config.json`, the rest after it is `adapter_model.safetensors`.
pub fn peft_adapter(data: &[u8]) {
    let (config, weights) = match data {
        [a, b, rest @ ..] => rest.split_at(usize::from(u16::from_le_bytes([*a, *b])).min(rest.len())),
        _ => (data, &[][..]),
    };
    let loaded = crate::adapters::LoraAdapter::from_bytes(
        config,
        Path::new("adapter_config.json"),
        weights,
        Path::new("adapter_model.safetensors"),
    );
    if let Err(e) = loaded {
        printable("LoraAdapter::from_bytes", &e);
    }
}

/// A LoCoMo file and a plain transcript.
pub fn transcript(data: &[u8]) {
    if let Err(e) = crate::transcript::parse_locomo(data, Path::new("fuzz.json")) {
        printable("parse_locomo", &e);
    }
    if let Err(e) = crate::transcript::parse_text(data, Path::new("fuzz.txt"), "fuzz") {
        printable("parse_text", &e);
    }
}

/// A model manifest, the user's config file, and a memory export being imported.
pub fn toml_and_import(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let origin = crate::models::ManifestOrigin::File("fuzz.toml".into());
    if let Err(e) = crate::models::Manifest::from_toml(&text, origin) {
        printable("Manifest::from_toml", &e);
    }
    if let Err(e) = crate::config::Config::from_user_bytes(data, Path::new("config.toml")) {
        printable("Config::from_user_bytes", &e);
    }
    if let Err(e) = crate::memory::transfer::read_jsonl(&mut Cursor::new(data), "fuzz.jsonl") {
        printable("read_jsonl", &e);
    }
}

/// memlora prints an error's first line; it must say something.
fn printable(what: &str, error: &dyn std::fmt::Display) {
    let text = error.to_string();
    assert!(
        text.lines().next().is_some_and(|line| !line.trim().is_empty()),
        "{what}: an error that prints as an empty line: {text:?}"
    );
}

fn depth(value: &serde_json::Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 1)];
    while let Some((value, level)) = stack.pop() {
        deepest = deepest.max(level);
        match value {
            serde_json::Value::Array(items) => stack.extend(items.iter().map(|v| (v, level + 1))),
            serde_json::Value::Object(map) => stack.extend(map.values().map(|v| (v, level + 1))),
            _ => {}
        }
    }
    deepest
}
