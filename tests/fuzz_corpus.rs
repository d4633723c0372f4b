//! Replays every fuzz target's committed corpus (fuzz/corpus/<target>/: seeds and the
//! inputs the fuzzer kept, including those that once found a bug) through the same entry
//! points the fuzzer runs, so a regression fails here without cargo fuzz or nightly.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 6] = [
    ("model_output", memlora::fuzzing::model_output),
    ("request_line", memlora::fuzzing::request_line),
    ("gguf_header", memlora::fuzzing::gguf_header),
    ("peft_adapter", memlora::fuzzing::peft_adapter),
    ("transcript", memlora::fuzzing::transcript),
    ("toml_and_import", memlora::fuzzing::toml_and_import),
];

#[test]
fn every_fuzz_corpus_input_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut failures = Vec::new();
    for (target, run) in TARGETS {
        let dir = root.join(target);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.expect("a corpus entry").path())
            .collect();
        inputs.sort();
        // Seeds of every kind are committed; an empty corpus means a target lost its inputs.
        assert!(inputs.len() >= 2, "{target}: only {} corpus inputs in {}", inputs.len(), dir.display());
        for input in inputs {
            let data = std::fs::read(&input).unwrap_or_else(|e| panic!("{}: {e}", input.display()));
            if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
                failures.push(input.display().to_string());
            }
        }
    }
    assert!(failures.is_empty(), "fuzz corpus inputs that fail their target:\n{}", failures.join("\n"));
}
