//! The real default models, provisioned by `scripts/test` through memlora's
//! own puller. Without them these tests skip, unless the script said they
//! are required (MEMLORA_REQUIRE_REAL_MODELS=1), in which case they fail.

mod common;

use std::ops::ControlFlow;

use memlora::config::Config;
use memlora::engine::{cosine, ChatModel, Embedder, LoadOptions, SamplingParams};
use memlora::memory::pipeline::Operation;
use memlora::memory::prompts::Prompts;
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
