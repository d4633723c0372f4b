//! The llama-family decoder (Llama 2/3, SmolLM2, Qwen2) with run-time LoRA on
//! every linear layer and a key/value cache that grows in place.
//!
//! Batch size is always one: activations are `(tokens, hidden)`.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};

use super::attention::SingleTokenAttention;
use super::error::{EngineError, Result};
use super::lora::{ActiveAdapters, LoraLinear};
use super::matrix::WeightMatrix;
use super::weights::{Checkpoint, DecoderConfig, RopeLayout};

/// The projections a LoRA adapter can target, named as in PEFT's `target_modules`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetModule {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl TargetModule {
    pub const ALL: [TargetModule; 7] = [Self::Q, Self::K, Self::V, Self::O, Self::Gate, Self::Up, Self::Down];

    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }

    pub fn from_hf_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.hf_name() == name)
    }

    /// `self_attn` or `mlp`, the parent module in Hugging Face names.
    pub fn block(self) -> &'static str {
        match self {
            Self::Q | Self::K | Self::V | Self::O => "self_attn",
            Self::Gate | Self::Up | Self::Down => "mlp",
        }
    }
}

/// Prefill runs in chunks so the attention scores of a long prompt stay small.
const PREFILL_CHUNK: usize = 256;
/// The key/value cache grows by this many positions at a time.
const CACHE_GROWTH: usize = 256;

struct Attention {
    q: LoraLinear,
    k: LoraLinear,
    v: LoraLinear,
    o: LoraLinear,
}

struct Mlp {
    gate: LoraLinear,
    up: LoraLinear,
    down: LoraLinear,
}

struct Layer {
    input_norm: Tensor,
    attn: Attention,
    post_attention_norm: Tensor,
    mlp: Mlp,
}

impl Layer {
    fn linear_mut(&mut self, module: TargetModule) -> &mut LoraLinear {
        match module {
            TargetModule::Q => &mut self.attn.q,
            TargetModule::K => &mut self.attn.k,
            TargetModule::V => &mut self.attn.v,
            TargetModule::O => &mut self.attn.o,
            TargetModule::Gate => &mut self.mlp.gate,
            TargetModule::Up => &mut self.mlp.up,
            TargetModule::Down => &mut self.mlp.down,
        }
    }

    fn linear(&self, module: TargetModule) -> &LoraLinear {
        match module {
            TargetModule::Q => &self.attn.q,
            TargetModule::K => &self.attn.k,
            TargetModule::V => &self.attn.v,
            TargetModule::O => &self.attn.o,
            TargetModule::Gate => &self.mlp.gate,
            TargetModule::Up => &self.mlp.up,
            TargetModule::Down => &self.mlp.down,
        }
    }
}

/// The cached keys and values of a prompt's first positions, per layer.
pub(crate) struct KvSnapshot {
    len: usize,
    layers: Vec<(Tensor, Tensor)>,
}

/// Keys and values of one layer: `(1, kv_heads, capacity, head_dim)` buffers,
/// the first `len` positions valid.
struct LayerCache {
    k: Tensor,
    v: Tensor,
}

pub struct Decoder {
    config: DecoderConfig,
    device: Device,
    /// Shared with `lm_head` when the model ties them.
    embeddings: Arc<WeightMatrix>,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Arc<WeightMatrix>,
    cos: Tensor,
    sin: Tensor,
    cache: Vec<LayerCache>,
    cache_len: usize,
    cache_capacity: usize,
    context: usize,
}

impl Decoder {
    /// Loads every tensor of `checkpoint`; `context` caps the positions (and
    /// the rotary tables) at what the caller will use.
    pub fn load(checkpoint: &mut Checkpoint, context: usize, device: &Device) -> Result<Self> {
        let mut config = checkpoint.config.clone();
        if checkpoint.has("rope_freqs") {
            let factors = checkpoint.dense("rope_freqs", device)?.to_vec1::<f32>()?;
            config.rope_freq_factors = Some(factors);
        }
        let context = context.min(config.max_position).max(1);
        let embeddings = Arc::new(WeightMatrix::new(checkpoint.linear_weight("model.embed_tokens.weight", device)?)?);
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = format!("model.layers.{i}");
            let linear = |module: TargetModule, checkpoint: &mut Checkpoint| -> Result<LoraLinear> {
                let base = format!("{p}.{}.{}", module.block(), module.hf_name());
                let weight = checkpoint.linear_weight(&format!("{base}.weight"), device)?;
                let bias_name = format!("{base}.bias");
                let bias = if checkpoint.has(&bias_name) { Some(checkpoint.dense(&bias_name, device)?) } else { None };
                LoraLinear::new(WeightMatrix::new(weight)?, bias)
            };
            let attn = Attention {
                q: linear(TargetModule::Q, checkpoint)?,
                k: linear(TargetModule::K, checkpoint)?,
                v: linear(TargetModule::V, checkpoint)?,
                o: linear(TargetModule::O, checkpoint)?,
            };
            let mlp = Mlp {
                gate: linear(TargetModule::Gate, checkpoint)?,
                up: linear(TargetModule::Up, checkpoint)?,
                down: linear(TargetModule::Down, checkpoint)?,
            };
            layers.push(Layer {
                input_norm: checkpoint.dense(&format!("{p}.input_layernorm.weight"), device)?,
                attn,
                post_attention_norm: checkpoint.dense(&format!("{p}.post_attention_layernorm.weight"), device)?,
                mlp,
            });
        }
        let norm = checkpoint.dense("model.norm.weight", device)?;
        let lm_head = if config.tied_embeddings || !checkpoint.has("lm_head.weight") {
            embeddings.clone()
        } else {
            Arc::new(WeightMatrix::new(checkpoint.linear_weight("lm_head.weight", device)?)?)
        };
        let (cos, sin) = rotary_tables(&config, context, device)?;
        let cache = Vec::new();
        Ok(Self {
            config,
            device: device.clone(),
            embeddings,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            cache,
            cache_len: 0,
            cache_capacity: 0,
            context,
        })
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    /// Positions this decoder can hold (prompt + answer).
    pub fn context(&self) -> usize {
        self.context
    }

    /// Tokens already in the key/value cache.
    pub fn cached_tokens(&self) -> usize {
        self.cache_len
    }

    /// Drops the cached keys and values beyond `len` tokens (0 = start over);
    /// the buffers are kept for the next request.
    pub fn truncate_cache(&mut self, len: usize) {
        self.cache_len = self.cache_len.min(len);
    }

    /// A copy of the keys and values of the first `len` cached positions.
    pub(crate) fn snapshot(&self, len: usize) -> Result<KvSnapshot> {
        let len = len.min(self.cache_len);
        let owned = |t: &Tensor| -> Result<Tensor> {
            let part = t.narrow(2, 0, len)?;
            // A contiguous view still shares the cache's buffer, which later writes change.
            Ok(if part.is_contiguous() { part.copy()? } else { part.contiguous()? })
        };
        let layers = self.cache.iter().map(|c| Ok((owned(&c.k)?, owned(&c.v)?))).collect::<Result<Vec<_>>>()?;
        Ok(KvSnapshot { len, layers })
    }

    /// Makes the cache hold exactly `snapshot`'s positions.
    pub(crate) fn restore(&mut self, snapshot: &KvSnapshot) -> Result<()> {
        self.cache_len = 0;
        if snapshot.len == 0 {
            return Ok(());
        }
        self.reserve(snapshot.len)?;
        for (cache, (k, v)) in self.cache.iter().zip(&snapshot.layers) {
            cache.k.slice_set(k, 2, 0)?;
            cache.v.slice_set(v, 2, 0)?;
        }
        self.cache_len = snapshot.len;
        Ok(())
    }

    pub(crate) fn linear(&self, layer: usize, module: TargetModule) -> &LoraLinear {
        self.layers[layer].linear(module)
    }

    pub(crate) fn linear_mut(&mut self, layer: usize, module: TargetModule) -> &mut LoraLinear {
        self.layers[layer].linear_mut(module)
    }

    /// Runs `tokens` after the cached ones and returns the logits of the last
    /// token, `(vocab,)`.
    pub fn forward_last(&mut self, tokens: &[u32], active: ActiveAdapters) -> Result<Tensor> {
        let mut last = None;
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            let hidden = self.forward_hidden(chunk, active)?;
            last = Some(hidden.narrow(0, chunk.len() - 1, 1)?);
        }
        let last = last.ok_or_else(|| candle_core::Error::Msg("forward called with no tokens".into()))?;
        Ok(self.lm_head.forward(&last)?.squeeze(0)?)
    }

    /// Like [`Decoder::forward_last`], with the placeholders of `splice` embedded as its
    /// rows.
    pub fn forward_last_spliced(&mut self, tokens: &[u32], splice: &Splice, active: ActiveAdapters) -> Result<Tensor> {
        let mut last = None;
        let mut used = 0;
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            let hidden = self.forward_embedded(chunk, Some((splice, &mut used)), active)?;
            last = Some(hidden.narrow(0, chunk.len() - 1, 1)?);
        }
        if used != splice.rows.dim(0)? {
            return Err(EngineError::Splice(format!("{used} placeholder tokens for {} rows", splice.rows.dim(0)?)));
        }
        let last = last.ok_or_else(|| candle_core::Error::Msg("forward called with no tokens".into()))?;
        Ok(self.lm_head.forward(&last)?.squeeze(0)?)
    }

    /// Logits of every position, `(tokens, vocab)`; for tests and scoring.
    pub fn forward_all(&mut self, tokens: &[u32], active: ActiveAdapters) -> Result<Tensor> {
        let mut logits = Vec::new();
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            let hidden = self.forward_hidden(chunk, active)?;
            logits.push(self.lm_head.forward(&hidden)?);
        }
        Ok(Tensor::cat(&logits, 0)?)
    }

    /// Final-norm hidden states of `tokens`, appended to the cache.
    fn forward_hidden(&mut self, tokens: &[u32], active: ActiveAdapters) -> Result<Tensor> {
        self.forward_embedded(tokens, None, active)
    }

    /// [`Decoder::forward_hidden`] with the placeholders of a splice (whose first `used`
    /// rows went to earlier chunks) embedded as its rows.
    fn forward_embedded(&mut self, tokens: &[u32], splice: Option<(&Splice, &mut usize)>, active: ActiveAdapters) -> Result<Tensor> {
        let seq = tokens.len();
        let start = self.cache_len;
        if start + seq > self.context {
            return Err(EngineError::PromptTooLong { prompt_tokens: start + seq, context: self.context, reserved: 0 });
        }
        self.reserve(start + seq)?;
        let mut x = self.embeddings.embedding(tokens)?;
        if let Some((splice, used)) = splice {
            x = splice.apply(&x, tokens, used)?;
        }
        let cos = self.cos.narrow(0, start, seq)?;
        let sin = self.sin.narrow(0, start, seq)?;
        let mask = causal_mask(seq, start, self.config.num_heads / self.config.num_kv_heads, &self.device)?;
        let eps = self.config.rms_norm_eps as f32;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.input_norm, eps)?;
            let h = attention(&self.config, layer, &self.cache[i], &h, start, &cos, &sin, mask.as_ref(), active)?;
            x = (x + h)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.post_attention_norm, eps)?;
            let [gate, up] = LoraLinear::forward_shared([&layer.mlp.gate, &layer.mlp.up], &h, active)?;
            let h = layer.mlp.down.forward(&(candle_nn::ops::silu(&gate)? * up)?, active)?;
            x = (x + h)?;
        }
        self.cache_len = start + seq;
        Ok(candle_nn::ops::rms_norm(&x, &self.norm, eps)?)
    }

    /// Makes the cache hold at least `needed` positions, growing in steps and
    /// keeping what it holds.
    fn reserve(&mut self, needed: usize) -> Result<()> {
        if needed <= self.cache_capacity {
            return Ok(());
        }
        let capacity = needed.div_ceil(CACHE_GROWTH).saturating_mul(CACHE_GROWTH).min(self.context);
        let shape = (1, self.config.num_kv_heads, capacity, self.config.head_dim);
        let mut grown = Vec::with_capacity(self.config.num_layers);
        for i in 0..self.config.num_layers {
            let k = Tensor::zeros(shape, DType::F32, &self.device)?;
            let v = Tensor::zeros(shape, DType::F32, &self.device)?;
            if self.cache_len > 0 {
                let old = &self.cache[i];
                k.slice_set(&old.k.narrow(2, 0, self.cache_len)?.contiguous()?, 2, 0)?;
                v.slice_set(&old.v.narrow(2, 0, self.cache_len)?.contiguous()?, 2, 0)?;
            }
            grown.push(LayerCache { k, v });
        }
        self.cache = grown;
        self.cache_capacity = capacity;
        Ok(())
    }
}

/// Rows that replace the embeddings of a placeholder token: the `i`-th occurrence of
/// `token` in a prompt is embedded as row `i` of `rows` (an image's features, projected to
/// the decoder's width).
pub struct Splice<'a> {
    pub token: u32,
    pub rows: &'a Tensor,
}

impl Splice<'_> {
    /// `embedded` (one row per token of `tokens`) with the placeholders' rows replaced,
    /// continuing after the `used` rows already taken.
    fn apply(&self, embedded: &Tensor, tokens: &[u32], used: &mut usize) -> Result<Tensor> {
        if !tokens.contains(&self.token) {
            return Ok(embedded.clone());
        }
        let available = self.rows.dim(0)?;
        let mut pieces = Vec::new();
        let mut at = 0;
        while at < tokens.len() {
            let placeholder = tokens[at] == self.token;
            let run = tokens[at..].iter().take_while(|&&t| (t == self.token) == placeholder).count();
            if placeholder {
                if *used + run > available {
                    return Err(EngineError::Splice(format!("more placeholder tokens than the {available} rows")));
                }
                pieces.push(self.rows.narrow(0, *used, run)?.to_dtype(embedded.dtype())?);
                *used += run;
            } else {
                pieces.push(embedded.narrow(0, at, run)?);
            }
            at += run;
        }
        Ok(Tensor::cat(&pieces, 0)?)
    }
}

#[allow(clippy::too_many_arguments)]
fn attention(
    config: &DecoderConfig,
    layer: &Layer,
    cache: &LayerCache,
    x: &Tensor,
    start: usize,
    cos: &Tensor,
    sin: &Tensor,
    mask: Option<&Tensor>,
    active: ActiveAdapters,
) -> Result<Tensor> {
    let seq = x.dim(0)?;
    let (heads, kv_heads, hd) = (config.num_heads, config.num_kv_heads, config.head_dim);
    let group = heads / kv_heads;
    let [q, k, v] = LoraLinear::forward_shared([&layer.attn.q, &layer.attn.k, &layer.attn.v], x, active)?;
    let q = q.reshape((1, seq, heads, hd))?.transpose(1, 2)?.contiguous()?;
    let k = k.reshape((1, seq, kv_heads, hd))?.transpose(1, 2)?.contiguous()?;
    let v = v.reshape((1, seq, kv_heads, hd))?.transpose(1, 2)?.contiguous()?;
    let (q, k) = match config.rope_layout {
        RopeLayout::Interleaved => (candle_nn::rotary_emb::rope_i(&q, cos, sin)?, candle_nn::rotary_emb::rope_i(&k, cos, sin)?),
        RopeLayout::Halves => (candle_nn::rotary_emb::rope(&q, cos, sin)?, candle_nn::rotary_emb::rope(&k, cos, sin)?),
    };
    cache.k.slice_set(&k, 2, start)?;
    cache.v.slice_set(&v, 2, start)?;
    let total = start + seq;
    if seq == 1 {
        let out = q.apply_op3_no_bwd(&cache.k, &cache.v, &SingleTokenAttention { len: total })?;
        return layer.attn.o.forward(&out, active);
    }
    let keys = cache.k.narrow(2, 0, total)?;
    let values = cache.v.narrow(2, 0, total)?;
    // Grouped-query attention without copying keys: the `group` query heads
    // that share a key/value head are stacked along the row axis.
    let q = q.reshape((1, kv_heads, group * seq, hd))?;
    let scores = (q.matmul(&keys.t()?)? * (1.0 / (hd as f64).sqrt()))?;
    let scores = match mask {
        Some(mask) => scores.broadcast_add(mask)?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let out = probs.matmul(&values)?; // (1, kv_heads, group*seq, hd)
    let out = out.reshape((1, heads, seq, hd))?.transpose(1, 2)?.reshape((seq, heads * hd))?;
    layer.attn.o.forward(&out, active)
}

/// Additive mask `(group*seq, start+seq)` hiding later positions; none is
/// needed for a single new token.
fn causal_mask(seq: usize, start: usize, group: usize, device: &Device) -> Result<Option<Tensor>> {
    if seq == 1 {
        return Ok(None);
    }
    let total = start + seq;
    let mut data = Vec::with_capacity(group * seq * total);
    for _ in 0..group {
        for i in 0..seq {
            data.extend((0..total).map(|j| if j > start + i { f32::NEG_INFINITY } else { 0.0 }));
        }
    }
    Ok(Some(Tensor::from_vec(data, (group * seq, total), device)?))
}

/// Cosine and sine of every position's rotary angles, `(positions, head_dim / 2)`.
pub(crate) fn rotary_tables(config: &DecoderConfig, positions: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = config.head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| {
            let f = 1.0 / config.rope_theta.powf(2.0 * i as f64 / config.head_dim as f64);
            let divisor = config.rope_freq_factors.as_ref().and_then(|v| v.get(i)).copied().unwrap_or(1.0) as f64;
            (f / divisor) as f32
        })
        .collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
    let t = Tensor::arange(0u32, positions as u32, device)?.to_dtype(DType::F32)?.reshape((positions, 1))?;
    let freqs = t.matmul(&inv_freq)?;
    Ok((freqs.cos()?.contiguous()?, freqs.sin()?.contiguous()?))
}

/// Helper for callers that need the index of the most likely token.
pub fn argmax(logits: &Tensor) -> Result<u32> {
    Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?)
}
