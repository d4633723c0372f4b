//! The inference engine on tiny random models written in the test: loading
//! both formats and architectures, run-time LoRA correctness, generation.

mod common;

use std::ops::ControlFlow;

use candle_core::quantized::GgmlDType;
use candle_core::Tensor;
use common::{max_abs_diff, TinyModel, TinySpec, TinyVocab};
use memlora::adapters::{LoraAdapter, ModuleKey};
use memlora::engine::{
    ChatMessage, ChatModel, Checkpoint, Decoder, LoadOptions, Role, SamplingParams, StopReason, TargetModule, WeightFormat,
};

/// Logits agree to this absolute tolerance when the same f32 computation is
/// arranged differently (fused vs separate LoRA, GGUF vs safetensors layout).
const TOL: f32 = 2e-4;

fn tokens() -> Vec<u32> {
    let v = TinyVocab::new();
    vec![v.id("<|im_start|>"), 72, 101, 300 % v.len() as u32, 5, 17, 99, 42, v.id("Ġthe"), 3, 250, 11]
}

fn load(path: &std::path::Path) -> ChatModel {
    ChatModel::load(path, &LoadOptions { weights: WeightFormat::Keep, context: 256, ..LoadOptions::default() }).unwrap()
}

fn logits(model: &mut ChatModel, adapters: &[(&str, f32)]) -> Tensor {
    let adapters: Vec<(String, f32)> = adapters.iter().map(|(n, s)| (n.to_string(), *s)).collect();
    model.logits(&tokens(), &adapters).unwrap()
}

/// ΔW = scale · B·A of one adapter module, as the test computes it.
fn delta(adapter: &LoraAdapter, key: &ModuleKey, scale: f64) -> Tensor {
    let pair = &adapter.modules[key];
    (pair.b.matmul(&pair.a).unwrap() * (adapter.scale() * scale)).unwrap()
}

fn merged(base: &TinyModel, adapters: &[(&LoraAdapter, f64)]) -> TinyModel {
    let mut model = base.clone();
    for (adapter, scale) in adapters {
        for key in adapter.modules.keys() {
            let name = format!("model.layers.{}.{}.{}.weight", key.layer, key.module.block(), key.module.hf_name());
            model = model.with_added(&name, &delta(adapter, key, *scale));
        }
    }
    model
}

#[test]
fn gguf_and_safetensors_of_one_model_give_the_same_logits() {
    for spec in [TinySpec::llama(), TinySpec::qwen2()] {
        let dir = tempfile::tempdir().unwrap();
        let model = TinyModel::random(spec, 1);
        let st = model.write_safetensors(&dir.path().join("st"));
        let gguf = model.write_gguf(&dir.path().join("tiny.gguf"), GgmlDType::F32);
        let a = logits(&mut load(&st), &[]);
        let b = logits(&mut load(&gguf), &[]);
        assert_eq!(a.dims(), &[tokens().len(), model.vocab_size]);
        let diff = max_abs_diff(&a, &b);
        assert!(diff < TOL, "{:?}: GGUF and safetensors logits differ by {diff}", spec.arch);
    }
}

#[test]
fn quantized_weights_stay_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let model = TinyModel::random(TinySpec::llama(), 2);
    let f32_path = model.write_gguf(&dir.path().join("f32.gguf"), GgmlDType::F32);
    let reference = logits(&mut load(&f32_path), &[]);
    let scale = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    for (stored, format, tolerance) in [
        (GgmlDType::F32, WeightFormat::Q8_0, 0.05),
        (GgmlDType::Q8_0, WeightFormat::Keep, 0.05),
        (GgmlDType::Q4_1, WeightFormat::Auto, 0.25),
        (GgmlDType::Q4_0, WeightFormat::Keep, 0.35),
    ] {
        let path = model.write_gguf(&dir.path().join(format!("{stored:?}.gguf")), stored);
        let mut m = ChatModel::load(&path, &LoadOptions { weights: format, context: 256, ..LoadOptions::default() }).unwrap();
        let diff = max_abs_diff(&logits(&mut m, &[]), &reference) / scale;
        assert!(diff < tolerance, "{stored:?} as {format:?}: relative logit error {diff}");
    }
}

#[test]
fn active_adapter_equals_weights_with_scaled_delta_added() {
    let all: Vec<TargetModule> = TargetModule::ALL.to_vec();
    for spec in [TinySpec::llama(), TinySpec::qwen2()] {
        let dir = tempfile::tempdir().unwrap();
        let base = TinyModel::random(spec, 3);
        let mut model = load(&base.write_safetensors(&dir.path().join("base")));
        let adapter = LoraAdapter::random(model.decoder_config(), 8, 16.0, &all, 0.2, 11).unwrap();
        model.attach_adapter("a", &adapter).unwrap();
        let with_adapter = logits(&mut model, &[("a", 1.0)]);
        let expected = logits(&mut load(&merged(&base, &[(&adapter, 1.0)]).write_safetensors(&dir.path().join("merged"))), &[]);
        let diff = max_abs_diff(&with_adapter, &expected);
        assert!(diff < TOL, "{:?}: adapter vs merged weights differ by {diff}", spec.arch);
        // The adapter changes the output at all (otherwise the check above proves nothing).
        assert!(max_abs_diff(&with_adapter, &logits(&mut model, &[])) > 1e-2);
    }
}

#[test]
fn adapters_on_gguf_llama_follow_the_permuted_rotary_layout() {
    // llama.cpp reorders q/k rows; a PEFT adapter trained on the Hugging Face
    // layout must give the same result as merging it before conversion.
    let dir = tempfile::tempdir().unwrap();
    let base = TinyModel::random(TinySpec::llama(), 4);
    let mut model = load(&base.write_gguf(&dir.path().join("base.gguf"), GgmlDType::F32));
    let adapter =
        LoraAdapter::random(model.decoder_config(), 4, 8.0, &[TargetModule::Q, TargetModule::K, TargetModule::V], 0.3, 5).unwrap();
    model.attach_adapter("qkv", &adapter).unwrap();
    let got = logits(&mut model, &[("qkv", 1.0)]);
    let expected = logits(&mut load(&merged(&base, &[(&adapter, 1.0)]).write_gguf(&dir.path().join("merged.gguf"), GgmlDType::F32)), &[]);
    let diff = max_abs_diff(&got, &expected);
    assert!(diff < TOL, "GGUF llama adapter differs from merged weights by {diff}");
}

#[test]
fn zero_b_adapter_changes_nothing_and_two_adapters_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let base = TinyModel::random(TinySpec::qwen2(), 6);
    let mut model = load(&base.write_safetensors(&dir.path().join("base")));
    let config = model.decoder_config().clone();
    let zero = LoraAdapter::random(&config, 8, 16.0, &[TargetModule::Q, TargetModule::V], 0.0, 1).unwrap();
    model.attach_adapter("zero", &zero).unwrap();
    let plain = logits(&mut model, &[]);
    assert_eq!(max_abs_diff(&plain, &logits(&mut model, &[("zero", 1.0)])), 0.0);

    let first = LoraAdapter::random(&config, 8, 16.0, &[TargetModule::Q, TargetModule::V], 0.2, 2).unwrap();
    let second = LoraAdapter::random(&config, 4, 4.0, &[TargetModule::V, TargetModule::Up, TargetModule::Down], 0.2, 3).unwrap();
    model.attach_adapter("first", &first).unwrap();
    model.attach_adapter("second", &second).unwrap();
    let both = logits(&mut model, &[("first", 0.5), ("second", 1.5)]);
    let expected = logits(&mut load(&merged(&base, &[(&first, 0.5), (&second, 1.5)]).write_safetensors(&dir.path().join("m"))), &[]);
    let diff = max_abs_diff(&both, &expected);
    assert!(diff < TOL, "two scaled adapters differ from their merged sum by {diff}");

    // Folding into the weights gives what the run-time adapters gave.
    model.fold_adapter("first", 0.5).unwrap();
    model.fold_adapter("second", 1.5).unwrap();
    assert!(max_abs_diff(&logits(&mut model, &[]), &expected) < TOL);
    assert!(model.slot_of("first").is_err());
}

#[test]
fn saved_peft_adapter_loads_back_to_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let base = TinyModel::random(TinySpec::llama(), 7);
    let mut model = load(&base.write_safetensors(&dir.path().join("base")));
    let adapter = LoraAdapter::random(model.decoder_config(), 8, 16.0, &[TargetModule::Q, TargetModule::V], 0.2, 9).unwrap();
    adapter.save(&dir.path().join("adapter")).unwrap();
    let reloaded = LoraAdapter::load(&dir.path().join("adapter")).unwrap();
    model.attach_adapter("in-memory", &adapter).unwrap();
    model.attach_adapter("from-disk", &reloaded).unwrap();
    assert_eq!(max_abs_diff(&logits(&mut model, &[("in-memory", 1.0)]), &logits(&mut model, &[("from-disk", 1.0)])), 0.0);
}

#[test]
fn incremental_decoding_with_the_cache_matches_a_full_forward() {
    let dir = tempfile::tempdir().unwrap();
    // f32 weights take the same arithmetic either way; with Q8_0 weights a
    // single token goes through the 8-bit kernel and a long prompt through f32
    // matmul, so they agree only up to activation rounding.
    for (spec, stored, tolerance) in
        [(TinySpec::llama(), GgmlDType::F32, 1e-3), (TinySpec::qwen2(), GgmlDType::F32, 1e-3), (TinySpec::qwen2(), GgmlDType::Q8_0, 0.05)]
    {
        let path = TinyModel::random(spec, 8).write_gguf(&dir.path().join("m.gguf"), stored);
        let mut checkpoint = Checkpoint::open(&path, WeightFormat::Keep).unwrap();
        let mut decoder = Decoder::load(&mut checkpoint, 512, &candle_core::Device::Cpu).unwrap();
        // Long enough to cross a prefill chunk and a cache growth step.
        let toks: Vec<u32> = (0..300).map(|i| (i * 7 % 250) as u32).collect();
        let full = decoder.forward_all(&toks, &[]).unwrap();
        decoder.truncate_cache(0);
        decoder.forward_last(&toks[..290], &[]).unwrap();
        for (i, &t) in toks[290..].iter().enumerate() {
            let step = decoder.forward_last(&[t], &[]).unwrap();
            let row = full.get(290 + i).unwrap();
            let diff = max_abs_diff(&step, &row);
            assert!(diff < tolerance, "{:?}: step {} differs from full forward by {diff}", spec.arch, 290 + i);
        }
    }
}

fn chat(model: &mut ChatModel, text: &str, sampling: &SamplingParams) -> memlora::engine::Generation {
    let messages = [ChatMessage::new(Role::User, text)];
    let mut streamed = String::new();
    let g = model
        .generate(&messages, sampling, &[], &mut |piece| {
            streamed.push_str(piece);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(streamed, g.text, "streamed pieces add up to the answer");
    g
}

#[test]
fn generation_is_deterministic_for_a_seed_and_reuses_the_prompt_cache() {
    let dir = tempfile::tempdir().unwrap();
    let path = TinyModel::random(TinySpec::llama(), 10).write_gguf(&dir.path().join("m.gguf"), GgmlDType::Q8_0);
    let greedy = SamplingParams { max_tokens: 20, temperature: 0.0, ..SamplingParams::default() };
    let mut model = load(&path);
    let first = chat(&mut model, "the cat in the hat", &greedy);
    let second = chat(&mut model, "the cat in the hat", &greedy);
    assert_eq!(first.text, second.text);
    assert_eq!(first.completion_tokens, 20);
    assert_eq!(first.stop_reason, StopReason::MaxTokens);
    assert_eq!(first.reused_prompt_tokens, 0);
    assert_eq!(second.reused_prompt_tokens, second.prompt_tokens - 1);
    // A fresh model gives the same answer: nothing depends on leftover state.
    assert_eq!(chat(&mut load(&path), "the cat in the hat", &greedy).text, first.text);

    // A hot temperature: the tiny random model is too peaked to vary otherwise.
    let sampled = SamplingParams { max_tokens: 20, temperature: 5.0, top_p: 0.999, seed: 42, repeat_penalty: 1.1 };
    let a = chat(&mut model, "on the mat", &sampled);
    let b = chat(&mut load(&path), "on the mat", &sampled);
    assert_eq!(a.text, b.text);
    let other_seed = chat(&mut model, "on the mat", &SamplingParams { seed: 43, ..sampled });
    assert_ne!(a.text, other_seed.text, "a different seed samples differently");
}

#[test]
fn cancelling_stops_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let path = TinyModel::random(TinySpec::qwen2(), 12).write_safetensors(&dir.path().join("m"));
    let mut model = load(&path);
    let mut pieces = 0;
    let g = model
        .generate(
            &[ChatMessage::new(Role::User, "hello")],
            &SamplingParams { max_tokens: 50, ..SamplingParams::default() },
            &[],
            &mut |_| {
                pieces += 1;
                if pieces == 3 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        )
        .unwrap();
    assert_eq!(g.stop_reason, StopReason::Cancelled);
    assert!(g.completion_tokens < 50);
}

#[test]
fn oldest_turns_are_dropped_to_fit_and_an_oversized_message_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = TinyModel::random(TinySpec::llama(), 13).write_safetensors(&dir.path().join("m"));
    let mut model = ChatModel::load(&path, &LoadOptions { context: 128, ..LoadOptions::default() }).unwrap();
    let sampling = SamplingParams { max_tokens: 8, ..SamplingParams::default() };
    let long_turn = "a b c d e f g h i j k l m n o p ".repeat(2);
    let mut messages = vec![ChatMessage::new(Role::System, "sys")];
    for i in 0..6 {
        messages.push(ChatMessage::new(if i % 2 == 0 { Role::User } else { Role::Assistant }, long_turn.clone()));
    }
    messages.push(ChatMessage::new(Role::User, "last"));
    let g = model.generate(&messages, &sampling, &[], &mut |_| ControlFlow::Continue(())).unwrap();
    assert!(g.dropped_messages > 0 && g.dropped_messages < 7, "dropped {}", g.dropped_messages);
    assert!(g.prompt_tokens + 8 <= 128);

    let huge = vec![ChatMessage::new(Role::User, "word ".repeat(500))];
    let err = model.generate(&huge, &sampling, &[], &mut |_| ControlFlow::Continue(())).unwrap_err().to_string();
    assert!(err.contains("context"), "{err}");
}

#[test]
fn gguf_metadata_tokenizer_matches_tokenizer_json() {
    let dir = tempfile::tempdir().unwrap();
    let model = TinyModel::random(TinySpec::llama(), 14);
    let from_json = load(&model.write_safetensors(&dir.path().join("st")));
    let from_gguf = load(&model.write_gguf(&dir.path().join("m.gguf"), GgmlDType::F32));
    for text in ["<|im_start|>user\nthe 2024 cat<|im_end|>", "héllo wörld 123", "in the are on"] {
        let a = from_json.tokenizer().encode(text).unwrap();
        assert_eq!(a, from_gguf.tokenizer().encode(text).unwrap(), "{text}");
        assert_eq!(from_gguf.tokenizer().decode(&a).unwrap(), text.replace("<|im_start|>", "").replace("<|im_end|>", ""));
    }
    let im_end = TinyVocab::new().id("<|im_end|>");
    assert!(from_gguf.tokenizer().is_stop(im_end));
    assert!(from_json.tokenizer().is_stop(im_end));
}

#[test]
fn adapters_that_do_not_fit_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = ChatModel::load(
        &TinyModel::random(TinySpec::llama(), 15).write_safetensors(&dir.path().join("m")),
        &LoadOptions { aliases: vec!["tiny-llama".into()], ..LoadOptions::default() },
    )
    .unwrap();
    let mut other = model.decoder_config().clone();
    other.hidden_size = 96;
    let wrong_shape = LoraAdapter::random(&other, 8, 16.0, &[TargetModule::Q], 0.1, 1).unwrap();
    let err = model.attach_adapter("wide", &wrong_shape).unwrap_err().to_string();
    assert!(err.contains("'wide'") && err.contains("q_proj") && err.contains("64"), "{err}");

    let mut deeper = model.decoder_config().clone();
    deeper.num_layers = 5;
    let err =
        model.attach_adapter("deep", &LoraAdapter::random(&deeper, 8, 16.0, &[TargetModule::V], 0.1, 1).unwrap()).unwrap_err().to_string();
    assert!(err.contains("layer 4") || err.contains("layers"), "{err}");

    let mut foreign = LoraAdapter::random(model.decoder_config(), 8, 16.0, &[TargetModule::V], 0.1, 1).unwrap();
    foreign.config.base_model_name_or_path = Some("Qwen/Qwen2.5-0.5B-Instruct".into());
    let err = model.attach_adapter("foreign", &foreign).unwrap_err().to_string();
    assert!(err.contains("Qwen/Qwen2.5-0.5B-Instruct") && err.contains("tiny-llama"), "{err}");
    foreign.config.base_model_name_or_path = Some("someone/tiny-llama".into());
    model.attach_adapter("foreign", &foreign).unwrap();

    // A refused adapter leaves the model as it was.
    assert_eq!(model.adapters().map(|a| a.name.as_str()).collect::<Vec<_>>(), vec!["foreign"]);
}

#[test]
fn adapters_apply_the_same_when_decoding_token_by_token() {
    // Single tokens take the hand-written LoRA and attention paths; a whole
    // sequence takes matmuls. Both must match the merged model.
    let dir = tempfile::tempdir().unwrap();
    let base = TinyModel::random(TinySpec::qwen2(), 16);
    let path = base.write_safetensors(&dir.path().join("base"));
    let config = Checkpoint::open(&path, WeightFormat::Keep).unwrap().config;
    let adapter = LoraAdapter::random(&config, 8, 16.0, &TargetModule::ALL, 0.2, 17).unwrap();
    let merged_path = merged(&base, &[(&adapter, 0.7)]).write_safetensors(&dir.path().join("merged"));
    let mut merged_model = load(&merged_path);
    let expected = merged_model.logits(&tokens(), &[]).unwrap();

    let mut model = load(&path);
    model.attach_adapter("a", &adapter).unwrap();
    let active = [("a".to_string(), 0.7)];
    assert!(max_abs_diff(&model.logits(&tokens(), &active).unwrap(), &expected) < TOL);
    let toks = tokens();
    for end in 6..=toks.len() {
        let step = model.next_token_logits(&toks[..end], &active).unwrap();
        let diff = max_abs_diff(&step, &expected.get(end - 1).unwrap());
        assert!(diff < TOL, "token {end}: step-by-step adapter logits differ from merged weights by {diff}");
    }
}
