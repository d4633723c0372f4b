//! The real default models, provisioned by `scripts/test` through memlora's
//! own puller. Without them these tests skip, unless the script said they
//! are required (MEMLORA_REQUIRE_REAL_MODELS=1), in which case they fail.

mod common;

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use memlora::adapters::bundled;
use memlora::config::Config;
use memlora::engine::{cosine, ChatModel, Embedder, LoadOptions, SamplingParams};
use memlora::memory::pipeline::{Exchange, MemoryPipeline, Operation, PipelineSettings, Turn};
use memlora::memory::prompts::{Prompts, RenderedPrompt};
use memlora::models::{Catalog, ModelCache, ModelFiles};

fn provisioned(name: &str) -> Option<ModelFiles> {
    let files = common::real_models_dir().and_then(|dir| {
        let catalog = Catalog::builtin().expect("builtin manifests parse");
        let manifest = catalog.get(name)?.clone();
        ModelCache::new(dir).resolve(&manifest)
    });
    if files.is_none() {
        assert!(!common::require_real_models(), "{name} is required but not in the model cache; run `memlora models pull {name}`");
        eprintln!("skipping: {name} is not in the model cache");
    }
    files
}

#[test]
fn default_model_answers_the_france_question_with_paris() {
    let Some(files) = provisioned("smollm2-135m-instruct") else { return };
    let config = Config::defaults();
    let options = LoadOptions { weights: config.engine.weights.parse().unwrap(), context: config.engine.context, ..LoadOptions::default() };
    let mut model = ChatModel::load(&files.weights, &options).unwrap();
    // The generation prompt `memlora ask` uses, with no memories recalled.
    let prompt = Prompts::builtin()
        .render(Operation::Generate, serde_json::json!({"question": "What is the capital of France?", "memories": []}))
        .unwrap();
    let messages = prompt.messages;
    let sampling = SamplingParams {
        max_tokens: 32,
        temperature: 0.0,
        top_p: 1.0,
        seed: config.generation.seed,
        repeat_penalty: config.generation.repeat_penalty,
    };
    let answer = model.generate(&messages, &sampling, &[], &mut |_| ControlFlow::Continue(())).unwrap();
    assert!(answer.text.contains("Paris"), "answer: {:?}", answer.text);
}

#[test]
fn minilm_puts_cat_nearer_kitten_than_revenue() {
    let Some(files) = provisioned("all-minilm-l6-v2") else { return };
    let embedder = Embedder::load(&files.dir).unwrap();
    assert_eq!(embedder.dimension(), 384);
    let v = embedder.embed(&["cat", "kitten", "revenue"]).unwrap();
    let (kitten, revenue) = (cosine(&v[0], &v[1]), cosine(&v[0], &v[2]));
    assert!(kitten > revenue + 0.2, "cat~kitten {kitten}, cat~revenue {revenue}");
    // Batched and single embeddings agree (padding is masked out).
    let single = embedder.embed(&["revenue"]).unwrap();
    assert!(cosine(&single[0], &v[2]) > 0.9999);
}

/// Perplexity of `text` when every position is computed as in decoding
/// (one token at a time, through the quantized kernels).
fn stepwise_perplexity(model: &mut ChatModel, text: &str) -> f64 {
    let tokens = model.tokenizer().encode(text).unwrap();
    let mut nll = 0.0;
    for end in 1..tokens.len() {
        let logits = model.next_token_logits(&tokens[..end], &[]).unwrap();
        let log_probs = candle_nn::ops::log_softmax(&logits, 0).unwrap();
        nll -= f64::from(log_probs.get(tokens[end] as usize).unwrap().to_scalar::<f32>().unwrap());
    }
    (nll / (tokens.len() - 1) as f64).exp()
}

#[test]
fn decode_kernels_keep_the_models_perplexity() {
    let Some(files) = provisioned("smollm2-135m-instruct") else { return };
    const TEXT: &str =
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after the engineer \
        Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally nicknamed La dame de fer, it was constructed \
        as the centrepiece of the 1889 World's Fair, and to crown the centennial anniversary of the French Revolution.";
    let load = |weights: &str| {
        ChatModel::load(&files.weights, &LoadOptions { weights: weights.parse().unwrap(), ..LoadOptions::default() }).unwrap()
    };
    // f32 weights: the exact values of the shipped Q4_1 file, f32 arithmetic.
    let reference = stepwise_perplexity(&mut load("f32"), TEXT);
    let ours = stepwise_perplexity(&mut load("auto"), TEXT);
    eprintln!("perplexity: f32 {reference:.3}, default kernels {ours:.3}");
    assert!(reference > 2.0 && reference < 30.0, "the model reads English: perplexity {reference}");
    assert!((ours / reference - 1.0).abs() < 0.01, "default kernels change perplexity from {reference:.3} to {ours:.3}");
}

/// The default model with each bundled expert attached under its own name.
fn default_model_with_experts(files: &ModelFiles) -> (ChatModel, BTreeMap<String, String>) {
    let config = Config::defaults();
    // The catalog name is what the app loads the model as, and what the experts name.
    let options = LoadOptions {
        weights: config.engine.weights.parse().unwrap(),
        context: config.engine.context,
        aliases: vec!["smollm2-135m-instruct".into()],
        ..LoadOptions::default()
    };
    let mut model = ChatModel::load(&files.weights, &options).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let mut by_operation = BTreeMap::new();
    for expert in bundled::EXPERTS.iter().filter(|e| e.base_model == "smollm2-135m-instruct") {
        let (adapter, info) = expert.load(scratch.path()).unwrap();
        model.attach_adapter(expert.name, &adapter).unwrap_or_else(|e| panic!("{} does not fit the default model: {e}", expert.name));
        by_operation.insert(info.operation.unwrap(), expert.name.to_owned());
    }
    (model, by_operation)
}

/// What the model writes after the prompt's response prefix, greedy, as the pipeline
/// asks for JSON.
fn complete_json(model: &mut ChatModel, prompt: &RenderedPrompt, adapter: &str) -> serde_json::Value {
    let sampling =
        SamplingParams { max_tokens: prompt.max_tokens.unwrap_or(160), temperature: 0.0, top_p: 1.0, seed: 7, repeat_penalty: 1.0 };
    let generation = model
        .continue_answer(&prompt.messages, &prompt.response_prefix, &sampling, &[(adapter.to_owned(), 1.0)], &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
    let text = format!("{}{}", prompt.response_prefix, generation.text);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{adapter} wrote invalid JSON ({e}): {text}"))
}

#[test]
fn bundled_experts_fit_the_default_model_and_write_the_pipelines_json() {
    let Some(files) = provisioned("smollm2-135m-instruct") else { return };
    let (mut model, experts) = default_model_with_experts(&files);
    assert_eq!(experts.keys().map(String::as_str).collect::<Vec<_>>(), ["extract", "generate", "update"], "an expert per memory operation");
    let pipeline = MemoryPipeline::new(Prompts::builtin(), PipelineSettings::default());

    // Extraction on a fixed excerpt: {"facts": [...]} with facts about what was said.
    let turn = |speaker: &str, text: &str| Turn { id: None, speaker: speaker.into(), text: text.into() };
    let exchange = Exchange {
        turns: vec![
            turn("Maya", "I finally adopted a dog last weekend, a beagle named Biscuit!"),
            turn("Tom", "Congrats! I'm still training for the Berlin marathon in September."),
        ],
        date: Some("8 May 2023".into()),
        ..Exchange::default()
    };
    let prompt = pipeline.extract_prompt(&exchange).unwrap().unwrap();
    let extracted = complete_json(&mut model, &prompt, &experts["extract"]);
    let facts = extracted["facts"].as_array().unwrap_or_else(|| panic!("no facts list: {extracted}"));
    assert!(!facts.is_empty() && facts.iter().all(|f| f.as_str().is_some_and(|f| !f.trim().is_empty())), "{extracted}");
    let all = facts.iter().filter_map(|f| f.as_str()).collect::<Vec<_>>().join(" ");
    assert!(all.contains("Biscuit") || all.contains("beagle") || all.contains("marathon"), "facts miss the excerpt: {all}");

    // Update: {"memory": [...]} with events the pipeline knows, about memories it was shown.
    let memories = serde_json::json!([{"id": 0, "text": "Maya has a cat named Tom."}, {"id": 1, "text": "Maya lives in Leeds."}]);
    let prompt = Prompts::builtin()
        .render(Operation::Update, serde_json::json!({"fact": "Maya moved to York in May 2023.", "memories": memories}))
        .unwrap();
    let decided = complete_json(&mut model, &prompt, &experts["update"]);
    let decisions = decided["memory"].as_array().unwrap_or_else(|| panic!("no memory list: {decided}"));
    assert!(!decisions.is_empty(), "{decided}");
    for decision in decisions {
        let event = decision["event"].as_str().unwrap_or_default();
        assert!(["ADD", "UPDATE", "DELETE", "NONE"].contains(&event), "{decided}");
        if event != "ADD" {
            assert!(["0", "1"].contains(&decision["id"].as_str().unwrap_or_default()), "{decided}");
        }
    }

    // Generation: a short answer from the memory that holds it.
    let prompt = Prompts::builtin()
        .render(
            Operation::Generate,
            serde_json::json!({"question": "Where does my sister Alice live?", "memories": [
                {"text": "Alice lives in Lisbon and works as a nurse.", "date": "8 May 2023"},
                {"text": "Maya has a cat named Tom.", "date": "2 May 2023"}
            ]}),
        )
        .unwrap();
    let sampling = SamplingParams { max_tokens: 32, temperature: 0.0, top_p: 1.0, seed: 7, repeat_penalty: 1.1 };
    let answer = model
        .continue_answer(&prompt.messages, &prompt.response_prefix, &sampling, &[(experts["generate"].clone(), 1.0)], &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
    assert!(answer.text.contains("Lisbon") && answer.text.len() < 80, "answer: {:?}", answer.text);
}
