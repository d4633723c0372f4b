//! The sentence embedder on a tiny random BERT written in the test.

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::bert::{BertModel, Config};
use memlora::engine::{cosine, Embedder};
use serde_json::json;

const WORDS: [&str; 12] = ["the", "cat", "sat", "on", "mat", "kitten", "revenue", "grew", "a", "dog", "quarterly", "report"];

fn write_tiny_bert(dir: &std::path::Path) {
    let config = json!({
        "vocab_size": 4 + WORDS.len(), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "max_position_embeddings": 64,
        "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0, "model_type": "bert"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    // Build the model through candle's own BERT so tensor names are the real ones.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let cfg: Config = serde_json::from_value(config).unwrap();
    BertModel::load(vb, &cfg).unwrap();
    varmap.save(dir.join("model.safetensors")).unwrap();

    let mut vocab = serde_json::Map::new();
    for (i, w) in ["[PAD]", "[UNK]", "[CLS]", "[SEP]"].iter().chain(WORDS.iter()).enumerate() {
        vocab.insert(w.to_string(), json!(i));
    }
    let added: Vec<_> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]}, "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": vocab}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
}

#[test]
fn embeddings_are_unit_length_and_independent_of_batch_padding() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_bert(dir.path());
    let embedder = Embedder::load(dir.path()).unwrap();
    assert_eq!(embedder.dimension(), 32);
    let texts = ["the cat sat on the mat", "revenue grew", "a dog", "the quarterly revenue report grew on a mat"];
    let batch = embedder.embed(&texts).unwrap();
    assert_eq!(batch.len(), texts.len());
    for (text, v) in texts.iter().zip(&batch) {
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{text}: norm {norm}");
        // Alone, without padding, the text embeds the same.
        let alone = embedder.embed(&[text]).unwrap();
        assert!(cosine(&alone[0], v) > 0.99999, "{text}: batched and single embeddings differ");
    }
    assert!(cosine(&batch[0], &batch[1]) < 0.99999, "different texts embed differently");
    // More texts than one batch.
    let many: Vec<&str> = (0..70).map(|i| texts[i % texts.len()]).collect();
    assert_eq!(embedder.embed(&many).unwrap().len(), 70);
}

#[test]
fn a_missing_or_broken_embedder_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = Embedder::load(dir.path()).err().unwrap().to_string();
    assert!(err.contains("config.json"), "{err}");
    write_tiny_bert(dir.path());
    std::fs::write(dir.path().join("model.safetensors"), b"garbage").unwrap();
    let err = Embedder::load(dir.path()).err().unwrap().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}
