//! The real default models, provisioned by `scripts/test` through memlora's
//! own puller. Without them these tests skip, unless the script said they
//! are required (MEMLORA_REQUIRE_REAL_MODELS=1), in which case they fail.

mod common;

use std::ops::ControlFlow;

use memlora::config::Config;
use memlora::engine::{cosine, ChatMessage, ChatModel, Embedder, LoadOptions, Role, SamplingParams};
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
    let mut messages = Vec::new();
    if !config.generation.system.is_empty() {
        messages.push(ChatMessage::new(Role::System, config.generation.system.clone()));
    }
    messages.push(ChatMessage::new(Role::User, "What is the capital of France?"));
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
