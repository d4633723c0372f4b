//! Sentence embeddings with a BERT-family encoder (all-MiniLM-L6-v2): mean
//! pooling over the tokens of each text, then L2 normalisation.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};

use super::error::{bad_file, EngineError, Result};

/// Longest input in tokens; longer texts are cut (the model's position table
/// ends at 512).
const MAX_TOKENS: usize = 256;
/// Texts embedded per forward pass.
const BATCH: usize = 32;

pub struct Embedder {
    model: BertModel,
    tokenizer: tokenizers::Tokenizer,
    dimension: usize,
    device: Device,
}

impl Embedder {
    /// Loads `config.json`, `model.safetensors` and `tokenizer.json` from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let device = Device::Cpu;
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| bad_file(&config_path, e))?;
        let config: Config = serde_json::from_str(&text).map_err(|e| bad_file(&config_path, format!("invalid BERT config: {e}")))?;
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(bad_file(&weights, "missing"));
        }
        // SAFETY: memory-mapped read-only; model files are not modified while loaded.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &device) }
            .map_err(|e| bad_file(&weights, format!("invalid safetensors: {e}")))?;
        // sentence-transformers checkpoints name tensors without the `bert.` prefix.
        let model = BertModel::load(vb.clone(), &config)
            .or_else(|_| BertModel::load(vb.pp("bert"), &config))
            .map_err(|e| bad_file(&weights, format!("not a BERT checkpoint matching config.json: {e}")))?;
        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| EngineError::MissingTokenizer { path: tokenizer_path.clone(), message: e.to_string() })?;
        tokenizer
            // Never past the model's position table (a small encoder may have fewer).
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: MAX_TOKENS.min(config.max_position_embeddings),
                ..Default::default()
            }))
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        tokenizer
            .with_padding(Some(tokenizers::PaddingParams { strategy: tokenizers::PaddingStrategy::BatchLongest, ..Default::default() }));
        Ok(Self { model, tokenizer, dimension: config.hidden_size, device })
    }

    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// One unit-length vector per text, in order.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(texts.len());
        for batch in texts.chunks(BATCH) {
            let encodings = self.tokenizer.encode_batch(batch.to_vec(), true).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
            let rows = encodings.len();
            let width = encodings.first().map_or(0, |e| e.len());
            let ids: Vec<u32> = encodings.iter().flat_map(|e| e.get_ids().iter().copied()).collect();
            let mask: Vec<u32> = encodings.iter().flat_map(|e| e.get_attention_mask().iter().copied()).collect();
            let ids = Tensor::from_vec(ids, (rows, width), &self.device)?;
            let mask = Tensor::from_vec(mask, (rows, width), &self.device)?;
            let token_types = ids.zeros_like()?;
            let hidden = self.model.forward(&ids, &token_types, Some(&mask))?;
            let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
            let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
            let counts = mask.sum(1)?.clamp(1.0, f64::MAX)?;
            let mean = summed.broadcast_div(&counts)?;
            let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
            out.extend(mean.broadcast_div(&norm)?.to_vec2::<f32>()?);
        }
        Ok(out)
    }
}

/// Cosine similarity of two unit vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    crate::vector::dot(a, b)
}
