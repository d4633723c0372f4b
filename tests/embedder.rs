//! The sentence embedder on a tiny random BERT written in the test.

mod common;

use common::write_tiny_bert;
use memlora::engine::{cosine, Embedder};

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
