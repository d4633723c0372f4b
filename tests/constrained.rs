//! Constrained decoding with tiny random models: whatever the weights, seed or adapter,
//! an output decoded under the memory operations' schemas is a complete value of them.

mod common;

use std::ops::ControlFlow;

use common::{TinyModel, TinySpec};
use memlora::adapters::LoraAdapter;
use memlora::engine::{
    ChatMessage, ChatModel, LoadOptions, OutputConstraint, Role, SamplingParams, StopReason, TargetModule, WeightFormat,
};
use memlora::memory::schema;
use serde_json::Value;

/// Short texts keep a random model's outputs (it seldom closes a string) within the
/// tiny model's 512-token context.
const CHARS: usize = 24;

fn generate(
    model: &mut ChatModel,
    prefix: &str,
    constraint: &OutputConstraint,
    seed: u64,
    adapters: &[(String, f32)],
) -> (String, StopReason) {
    let messages = [ChatMessage::new(Role::System, "Answer in JSON."), ChatMessage::new(Role::User, "Sam: I adopted a puppy.")];
    let sampling = SamplingParams { max_tokens: 400, temperature: 1.0, top_p: 1.0, seed, repeat_penalty: 1.0 };
    let generation =
        model.continue_constrained(&messages, prefix, &sampling, adapters, Some(constraint), &mut |_| ControlFlow::Continue(())).unwrap();
    (format!("{prefix}{}", generation.text), generation.stop_reason)
}

fn models() -> Vec<(tempfile::TempDir, ChatModel)> {
    [TinySpec::llama(), TinySpec::qwen2()]
        .into_iter()
        .map(|spec| {
            let dir = tempfile::tempdir().unwrap();
            let path = TinyModel::random(spec, 7).write_safetensors(&dir.path().join("model"));
            let mut model =
                ChatModel::load(&path, &LoadOptions { weights: WeightFormat::Keep, context: 512, ..LoadOptions::default() }).unwrap();
            let adapter = LoraAdapter::random(model.decoder_config(), 4, 8.0, &[TargetModule::Q, TargetModule::V], 0.5, 3).unwrap();
            model.attach_adapter("random", &adapter).unwrap();
            (dir, model)
        })
        .collect()
}

fn adapter_sets() -> [Vec<(String, f32)>; 2] {
    [Vec::new(), vec![("random".to_string(), 1.0)]]
}

fn string_within(value: &Value, chars: usize) -> bool {
    value.as_str().is_some_and(|s| s.chars().count() <= chars)
}

#[test]
fn extraction_outputs_are_always_fact_lists() {
    let constraint = schema::facts_bounded(4, CHARS);
    for (_dir, mut model) in models() {
        for adapters in adapter_sets() {
            for seed in 0..12 {
                let (output, stop) = generate(&mut model, "{\"facts\": [\"", &constraint, seed, &adapters);
                assert_eq!(stop, StopReason::EndOfTurn, "seed {seed}: {output}");
                let value: Value = serde_json::from_str(&output).unwrap_or_else(|e| panic!("seed {seed}: {e}: {output}"));
                let facts = value["facts"].as_array().unwrap_or_else(|| panic!("no facts list: {output}"));
                assert!(!facts.is_empty() && facts.len() <= 4, "{output}");
                assert!(facts.iter().all(|f| string_within(f, CHARS)), "{output}");
                assert_eq!(value.as_object().unwrap().len(), 1, "{output}");
                assert!(output.starts_with("{\"facts\": [\"") && !output.contains("\n"), "{output}");
            }
        }
    }
}

#[test]
fn update_outputs_only_name_the_ids_shown() {
    for (_dir, mut model) in models() {
        for adapters in adapter_sets() {
            for (seed, shown) in (0..12).zip([0, 1, 3].into_iter().cycle()) {
                let constraint = schema::memory_ops_bounded(shown, CHARS);
                let (output, stop) = generate(&mut model, "{\"memory\": [{\"id\": \"", &constraint, seed, &adapters);
                assert_eq!(stop, StopReason::EndOfTurn, "seed {seed}: {output}");
                let value: Value = serde_json::from_str(&output).unwrap_or_else(|e| panic!("seed {seed}: {e}: {output}"));
                let ops = value["memory"].as_array().unwrap_or_else(|| panic!("no memory list: {output}"));
                assert!(!ops.is_empty() && ops.len() <= schema::MAX_DECISIONS, "{output}");
                for op in ops {
                    let id: usize = op["id"].as_str().and_then(|id| id.parse().ok()).unwrap_or_else(|| panic!("id: {output}"));
                    match op["event"].as_str() {
                        Some("ADD") => assert_eq!(id, shown, "{output}"),
                        Some("UPDATE" | "DELETE" | "NONE") => assert!(id < shown, "{output}"),
                        other => panic!("event {other:?}: {output}"),
                    }
                    assert!(string_within(&op["text"], CHARS), "{output}");
                    assert!(op.get("old_memory").is_none_or(|old| string_within(old, CHARS)), "{output}");
                }
            }
        }
    }
}

#[test]
fn a_prefix_the_schema_cannot_continue_is_refused_in_one_line() {
    let (_dir, mut model) = models().remove(0);
    let messages = [ChatMessage::new(Role::User, "hi")];
    let error = model
        .continue_constrained(&messages, "[1, 2", &SamplingParams::default(), &[], Some(&schema::facts()), &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap_err()
        .to_string();
    assert!(error.contains("does not fit the constraint") && !error.contains('\n'), "{error}");
    let bad = OutputConstraint::JsonSchema(serde_json::json!({"type": "no-such-type"}));
    let error = model
        .continue_constrained(&messages, "", &SamplingParams::default(), &[], Some(&bad), &mut |_| ControlFlow::Continue(()))
        .unwrap_err();
    assert!(error.to_string().contains("schema"), "{error}");
}

#[test]
fn greedy_constrained_decoding_repeats_and_reuses_the_system_part() {
    let (_dir, mut model) = models().remove(0);
    let constraint = schema::facts_bounded(2, CHARS);
    let sampling = SamplingParams { max_tokens: 200, temperature: 0.0, ..SamplingParams::default() };
    let system = ChatMessage::new(
        Role::System,
        "Extract facts worth remembering from the conversation, one short sentence per fact. Answer in JSON.",
    );
    let mut run = |text: &str, adapters: &[(String, f32)]| {
        let messages = [system.clone(), ChatMessage::new(Role::User, text)];
        model
            .continue_constrained(&messages, "{\"facts\": [\"", &sampling, adapters, Some(&constraint), &mut |_| ControlFlow::Continue(()))
            .unwrap()
    };
    let adapter = vec![("random".to_string(), 1.0)];
    let first = run("Sam: I adopted a puppy.", &[]);
    // Another adapter in between replaces the cache; the system part comes back from its copy.
    run("Ann: I moved.", &adapter);
    let again = run("Sam: I adopted a puppy.", &[]);
    assert_eq!(first.text, again.text);
    assert!(again.reused_prompt_tokens > 16, "reused {}", again.reused_prompt_tokens);
    let fresh = run("Bob: I like tea.", &adapter);
    assert!(fresh.reused_prompt_tokens > 16, "reused {}", fresh.reused_prompt_tokens);
}
