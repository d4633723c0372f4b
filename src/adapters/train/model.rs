//! A differentiable forward of the llama-family decoder, for training LoRA factors.
//!
//! The inference decoder (`engine::decoder`) uses quantized kernels and fused ops that
//! have no backward pass; this one does the same arithmetic with plain candle tensor
//! ops: the base weights dequantized to f32 and frozen, RMSNorm, rotary embeddings,
//! causal attention with grouped key/value heads and the SwiGLU MLP written from basic
//! ops, LoRA factors as variables on the chosen projections. Inputs are padded batches
//! `(batch, tokens)`; padding sits at the end of a row, where the causal mask keeps it
//! out of every real position.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Storage, Tensor, Var, D};

use super::rng::Rng;
use super::TrainError;
use crate::adapters::{LoraAdapter, LoraPair, ModuleKey, PeftConfig, TargetModules};
use crate::engine::{rotary_tables, Checkpoint, DecoderConfig, RopeLayout, TargetModule, WeightFormat};

/// `x·Wᵀ` with a weight that takes no gradient: the backward pass only returns the
/// gradient of `x` (candle's matmul would also compute a weight-sized gradient of `W`
/// that nothing reads, doubling the cost of every backward).
struct FrozenMatmul(Tensor);

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = layout.shape().dims2()?;
        let (weight, weight_layout) = self.0.storage_and_layout();
        let Storage::Cpu(weight) = &*weight else { candle_core::bail!("frozen weights live on the CPU") };
        let (n, k_weight) = weight_layout.shape().dims2()?;
        if k != k_weight {
            candle_core::bail!("frozen-matmul: input has {k} features but the weight takes {k_weight}");
        }
        let out = storage.matmul(weight, (1, m, n, k), layout, &weight_layout.transpose(0, 1)?)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.0)?))
    }
}

/// A frozen projection: `(out, in)` weight and optional bias, f32.
struct Frozen {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Frozen {
    /// `x`: (rows, in) → (rows, out).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = x.contiguous()?.apply_op1(FrozenMatmul(self.weight.clone()))?;
        match &self.bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }
}

struct Layer {
    input_norm: Tensor,
    post_attention_norm: Tensor,
    /// In [`TargetModule::ALL`] order.
    linears: Vec<Frozen>,
}

/// LoRA factors used by a forward: `a` (r, in), `b` (out, r), and PEFT's scale.
#[derive(Clone)]
pub struct LoraTensors {
    pub modules: BTreeMap<ModuleKey, (Tensor, Tensor)>,
    pub scale: f64,
}

impl LoraTensors {
    pub fn from_adapter(adapter: &LoraAdapter) -> Self {
        let modules = adapter.modules.iter().map(|(k, p)| (*k, (p.a.clone(), p.b.clone()))).collect();
        Self { modules, scale: adapter.scale() }
    }
}

/// Dropout on the input of each LoRA product (as PEFT's `lora_dropout`), drawn from a
/// seeded generator in a fixed order, so a run can be repeated exactly.
pub struct Dropout {
    pub p: f64,
    pub rng: Rng,
}

impl Dropout {
    fn apply(&mut self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 / (1.0 - self.p);
        let mask: Vec<f32> = (0..x.elem_count()).map(|_| if self.rng.next_f64() < self.p { 0.0 } else { keep as f32 }).collect();
        x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?)
    }
}

/// A padded batch of token rows and the positions the loss is taken at.
pub struct Batch {
    /// `(rows, length)`, u32.
    pub tokens: Tensor,
    /// Flat indices `row · length + position` of the positions that predict a
    /// completion token.
    pub predictors: Tensor,
    /// The completion tokens they predict, `(targets, 1)`.
    pub targets: Tensor,
    pub target_count: usize,
    /// Tokens that are not padding.
    pub real_tokens: usize,
}

impl Batch {
    /// `examples`: (prompt, completion) token lists. Every completion token is predicted
    /// by the position before it; prompt tokens carry no loss.
    pub fn new(examples: &[(&[u32], &[u32])]) -> candle_core::Result<Self> {
        let length = examples.iter().map(|(p, c)| p.len() + c.len()).max().unwrap_or(0).max(1);
        let mut tokens = vec![0u32; examples.len() * length];
        let (mut predictors, mut targets) = (Vec::new(), Vec::new());
        let mut real_tokens = 0;
        for (row, (prompt, completion)) in examples.iter().enumerate() {
            let start = row * length;
            let sequence = prompt.iter().chain(completion.iter());
            for (i, &t) in sequence.enumerate() {
                tokens[start + i] = t;
            }
            real_tokens += prompt.len() + completion.len();
            for (j, &t) in completion.iter().enumerate() {
                let position = prompt.len() + j;
                if position > 0 {
                    predictors.push((start + position - 1) as u32);
                    targets.push(t);
                }
            }
        }
        let target_count = targets.len();
        Ok(Self {
            tokens: Tensor::from_vec(tokens, (examples.len(), length), &Device::Cpu)?,
            predictors: Tensor::from_vec(predictors, target_count, &Device::Cpu)?,
            targets: Tensor::from_vec(targets, (target_count, 1), &Device::Cpu)?,
            target_count,
            real_tokens,
        })
    }
}

/// The frozen base model in f32, ready for differentiable forwards.
pub struct TrainModel {
    config: DecoderConfig,
    embeddings: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Frozen,
    cos: Tensor,
    sin: Tensor,
}

impl TrainModel {
    /// Loads `path` (GGUF or a safetensors directory) through the engine's
    /// [`Checkpoint`], every weight dequantized to f32; rotary tables for `positions`.
    /// Llama GGUF files store q/k rows permuted for interleaved rotary pairs; they are
    /// put back in the Hugging Face order here, so LoRA factors train in the PEFT layout
    /// the engine expects (it permutes q/k factors itself when it attaches them).
    pub fn load(path: &Path, positions: usize) -> Result<Self, TrainError> {
        let device = Device::Cpu;
        let mut checkpoint = Checkpoint::open(path, WeightFormat::F32)?;
        let mut config = checkpoint.config.clone();
        if checkpoint.has("rope_freqs") {
            config.rope_freq_factors = Some(checkpoint.dense("rope_freqs", &device)?.to_vec1::<f32>()?);
        }
        let unpermute = checkpoint.is_gguf() && config.rope_layout == RopeLayout::Interleaved;
        let embeddings = checkpoint.dense("model.embed_tokens.weight", &device)?.contiguous()?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = format!("model.layers.{i}");
            let mut linears = Vec::with_capacity(TargetModule::ALL.len());
            for module in TargetModule::ALL {
                let base = format!("{p}.{}.{}", module.block(), module.hf_name());
                let mut weight = checkpoint.dense(&format!("{base}.weight"), &device)?;
                let bias_name = format!("{base}.bias");
                let mut bias = if checkpoint.has(&bias_name) { Some(checkpoint.dense(&bias_name, &device)?) } else { None };
                let heads = match module {
                    TargetModule::Q => Some(config.num_heads),
                    TargetModule::K => Some(config.num_kv_heads),
                    _ => None,
                };
                if let (true, Some(heads)) = (unpermute, heads) {
                    weight = hf_rows_from_interleaved(&weight, heads, config.head_dim)?;
                    bias = bias.map(|b| hf_rows_from_interleaved(&b.unsqueeze(1)?, heads, config.head_dim)?.squeeze(1)).transpose()?;
                }
                linears.push(Frozen { weight: weight.contiguous()?, bias });
            }
            layers.push(Layer {
                input_norm: checkpoint.dense(&format!("{p}.input_layernorm.weight"), &device)?,
                post_attention_norm: checkpoint.dense(&format!("{p}.post_attention_layernorm.weight"), &device)?,
                linears,
            });
        }
        let norm = checkpoint.dense("model.norm.weight", &device)?;
        let lm_head = if config.tied_embeddings || !checkpoint.has("lm_head.weight") {
            embeddings.clone()
        } else {
            checkpoint.dense("lm_head.weight", &device)?.contiguous()?
        };
        config.rope_layout = RopeLayout::Halves;
        let positions = positions.clamp(1, config.max_position.max(1));
        let (cos, sin) = rotary_tables(&config, positions, &device)?;
        // `rope` below rotates dimension i with i + d/2: the tables cover both halves.
        let cos = Tensor::cat(&[&cos, &cos], 1)?;
        let sin = Tensor::cat(&[&sin, &sin], 1)?;
        Ok(Self { config, embeddings, layers, norm, lm_head: Frozen { weight: lm_head, bias: None }, cos, sin })
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    /// Positions the rotary tables cover (the longest example).
    pub fn positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// Logits of every position of one sequence, `(tokens, vocab)` (tests and checks).
    pub fn logits(&self, tokens: &[u32], lora: Option<&LoraTensors>) -> Result<Tensor, TrainError> {
        let input = Tensor::from_slice(tokens, (1, tokens.len()), &Device::Cpu)?;
        let hidden = self.hidden(&input, lora, None)?;
        Ok(self.lm_head.forward(&hidden)?)
    }

    /// Summed negative log-likelihood of the batch's completion tokens (a scalar that
    /// can be back-propagated to the LoRA factors).
    pub fn loss(&self, batch: &Batch, lora: Option<&LoraTensors>, dropout: Option<&mut Dropout>) -> Result<Tensor, TrainError> {
        let hidden = self.hidden(&batch.tokens, lora, dropout)?;
        // Only the positions that carry loss go through the (vocabulary-sized) head.
        let hidden = hidden.index_select(&batch.predictors, 0)?;
        let logits = self.lm_head.forward(&hidden)?;
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        Ok(log_probs.gather(&batch.targets, 1)?.sum_all()?.neg()?)
    }

    /// Final-norm hidden states, `(rows · length, hidden)`.
    fn hidden(&self, tokens: &Tensor, lora: Option<&LoraTensors>, mut dropout: Option<&mut Dropout>) -> Result<Tensor, TrainError> {
        let c = &self.config;
        let (rows, length) = tokens.dims2()?;
        if length > self.positions() {
            return Err(TrainError::Settings(format!(
                "a sequence of {length} tokens is longer than the {} positions prepared",
                self.positions()
            )));
        }
        let eps = c.rms_norm_eps;
        let mut x = self.embeddings.index_select(&tokens.flatten_all()?, 0)?;
        let cos = self.cos.narrow(0, 0, length)?;
        let sin = self.sin.narrow(0, 0, length)?;
        let mask = causal_mask(length)?;
        let (heads, kv_heads, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let group = heads / kv_heads;
        for (index, layer) in self.layers.iter().enumerate() {
            let mut linear = |module: TargetModule, input: &Tensor| -> Result<Tensor, TrainError> {
                let base = layer.linears[module_index(module)].forward(input)?;
                match lora.and_then(|l| l.modules.get(&ModuleKey { layer: index, module }).map(|f| (f, l.scale))) {
                    Some(((a, b), scale)) => {
                        let input = match dropout.as_deref_mut() {
                            Some(d) => d.apply(input)?,
                            None => input.clone(),
                        };
                        let update = (input.matmul(&a.t()?)?.matmul(&b.t()?)? * scale)?;
                        Ok((base + update)?)
                    }
                    None => Ok(base),
                }
            };
            let h = rms_norm(&x, &layer.input_norm, eps)?;
            let q = linear(TargetModule::Q, &h)?;
            let k = linear(TargetModule::K, &h)?;
            let v = linear(TargetModule::V, &h)?;
            let q = rope(&q.reshape((rows, length, heads, hd))?.transpose(1, 2)?, &cos, &sin)?;
            let k = rope(&k.reshape((rows, length, kv_heads, hd))?.transpose(1, 2)?, &cos, &sin)?;
            let v = v.reshape((rows, length, kv_heads, hd))?.transpose(1, 2)?;
            // Query head h reads key/value head h / group, as the engine's attention does.
            let repeat = |t: Tensor| -> candle_core::Result<Tensor> {
                if group == 1 {
                    return t.contiguous();
                }
                t.unsqueeze(2)?.broadcast_as((rows, kv_heads, group, length, hd))?.contiguous()?.reshape((rows, heads, length, hd))
            };
            let (k, v) = (repeat(k)?, repeat(v)?);
            let scores = (q.contiguous()?.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?.broadcast_add(&mask)?;
            let probs = softmax_last_dim(&scores)?;
            let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((rows * length, heads * hd))?;
            x = (x + linear(TargetModule::O, &out)?)?;
            let h = rms_norm(&x, &layer.post_attention_norm, eps)?;
            let gate = linear(TargetModule::Gate, &h)?;
            let up = linear(TargetModule::Up, &h)?;
            x = (x + linear(TargetModule::Down, &(gate.silu()? * up)?)?)?;
        }
        Ok(rms_norm(&x, &self.norm, eps)?)
    }
}

fn module_index(module: TargetModule) -> usize {
    TargetModule::ALL.iter().position(|m| *m == module).unwrap_or(0)
}

/// RMSNorm from differentiable ops: `x / sqrt(mean(x²) + eps) · w`.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(mean_square + eps)?.sqrt()?)?.broadcast_mul(weight)
}

/// Rotary embedding with dimension i paired with i + d/2; `cos`/`sin` are
/// `(length, head_dim)` (both halves). `x`: (rows, heads, length, head_dim).
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let rotated = Tensor::cat(&[&x.narrow(D::Minus1, half, half)?.neg()?, &x.narrow(D::Minus1, 0, half)?], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let exp = x.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// Additive `(length, length)` mask hiding later positions.
fn causal_mask(length: usize) -> candle_core::Result<Tensor> {
    let data: Vec<f32> = (0..length).flat_map(|i| (0..length).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(data, (length, length), &Device::Cpu)
}

/// Undoes llama.cpp's q/k row permutation: rows (heads, d/2, 2) → (heads, 2, d/2).
fn hf_rows_from_interleaved(w: &Tensor, heads: usize, head_dim: usize) -> candle_core::Result<Tensor> {
    let (out, cols) = w.dims2()?;
    w.reshape((heads, head_dim / 2, 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((out, cols))
}

/// The trainable LoRA factors: `a` (r, in) initialised as PEFT does (Kaiming-uniform,
/// bound 1/√in), `b` (out, r) zeros, so training starts from the base model.
pub struct LoraParams {
    pub rank: usize,
    pub alpha: f64,
    pub modules: BTreeMap<ModuleKey, (Var, Var)>,
}

impl LoraParams {
    pub fn init(config: &DecoderConfig, rank: usize, alpha: f64, targets: &[TargetModule], rng: &mut Rng) -> candle_core::Result<Self> {
        let mut modules = BTreeMap::new();
        for layer in 0..config.num_layers {
            for &module in targets {
                let (out, inp) = config.linear_shape(module);
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f32> = (0..rank * inp).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (rank, inp), &Device::Cpu)?)?;
                let b = Var::zeros((out, rank), DType::F32, &Device::Cpu)?;
                modules.insert(ModuleKey { layer, module }, (a, b));
            }
        }
        Ok(Self { rank, alpha, modules })
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Every variable, A then B of each module in key order (the optimizer's order).
    pub fn vars(&self) -> Vec<Var> {
        self.modules.values().flat_map(|(a, b)| [a.clone(), b.clone()]).collect()
    }

    /// The factors as tensors that record the graph (training).
    pub fn tensors(&self) -> LoraTensors {
        let modules = self.modules.iter().map(|(k, (a, b))| (*k, (a.as_tensor().clone(), b.as_tensor().clone()))).collect();
        LoraTensors { modules, scale: self.scale() }
    }

    /// A copy of the current values, detached from any graph (evaluation, snapshots).
    pub fn snapshot(&self) -> candle_core::Result<LoraTensors> {
        let modules = self
            .modules
            .iter()
            .map(|(k, (a, b))| Ok((*k, (a.as_tensor().detach().copy()?, b.as_tensor().detach().copy()?))))
            .collect::<candle_core::Result<_>>()?;
        Ok(LoraTensors { modules, scale: self.scale() })
    }

    /// Sets every factor from `values` (same modules and shapes).
    pub fn set(&self, values: &LoraTensors) -> candle_core::Result<()> {
        for (key, (a, b)) in &self.modules {
            let Some((va, vb)) = values.modules.get(key) else { candle_core::bail!("no factors for {}", key.peft_prefix()) };
            a.set(va)?;
            b.set(vb)?;
        }
        Ok(())
    }
}

/// `values` as a PEFT adapter.
pub fn to_adapter(
    values: &LoraTensors,
    rank: usize,
    alpha: f64,
    dropout: f64,
    base_model: Option<String>,
) -> candle_core::Result<LoraAdapter> {
    let mut targets: Vec<TargetModule> = values.modules.keys().map(|k| k.module).collect();
    targets.sort();
    targets.dedup();
    let modules =
        values.modules.iter().map(|(k, (a, b))| Ok((*k, LoraPair { a: a.copy()?, b: b.copy()? }))).collect::<candle_core::Result<_>>()?;
    let config = PeftConfig {
        peft_type: "LORA".into(),
        r: rank,
        lora_alpha: alpha,
        lora_dropout: dropout,
        target_modules: TargetModules::List(targets.iter().map(|m| m.hf_name().to_string()).collect()),
        base_model_name_or_path: base_model,
        use_rslora: false,
        task_type: Some("CAUSAL_LM".into()),
        bias: "none".into(),
        other: BTreeMap::new(),
    };
    Ok(LoraAdapter { config, modules })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(shape: (usize, usize), seed: u64) -> Tensor {
        let mut rng = Rng::new(seed);
        let data: Vec<f32> = (0..shape.0 * shape.1).map(|_| (rng.next_f64() * 2.0 - 1.0) as f32).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn frozen_matmul_matches_matmul_forward_and_input_gradient() {
        let w = random((6, 5), 1);
        let x = Var::from_tensor(&random((4, 5), 2)).unwrap();
        let target = random((4, 6), 3);
        let frozen = Frozen { weight: w.clone(), bias: None };
        let y1 = frozen.forward(x.as_tensor()).unwrap();
        let y2 = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let diff = (&y1 - &y2).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "{diff}");
        let g1 = (y1 * &target).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (y2 * &target).unwrap().sum_all().unwrap().backward().unwrap();
        let (g1, g2) = (g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
        let diff = (g1 - g2).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "{diff}");
    }

    #[test]
    fn basic_op_norm_rope_and_softmax_match_candle_fused_ops() {
        let x = random((3, 8), 4);
        let w = random((1, 8), 5).squeeze(0).unwrap();
        let d = (rms_norm(&x, &w, 1e-5).unwrap() - candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap()).unwrap();
        assert!(d.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-5);
        let s = random((3, 8), 6);
        let d = (softmax_last_dim(&s).unwrap() - candle_nn::ops::softmax_last_dim(&s).unwrap()).unwrap();
        assert!(d.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-6);
        let q = random((2 * 5, 8), 7).reshape((1, 2, 5, 8)).unwrap();
        let (cos, sin) = (random((5, 4), 8), random((5, 4), 9));
        let both = |t: &Tensor| Tensor::cat(&[t, t], 1).unwrap();
        let d = (rope(&q, &both(&cos), &both(&sin)).unwrap() - candle_nn::rotary_emb::rope(&q, &cos, &sin).unwrap()).unwrap();
        assert!(d.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-6);
    }

    #[test]
    fn batches_put_loss_on_completion_tokens_only() {
        let batch = Batch::new(&[(&[1, 2, 3], &[4, 5]), (&[6], &[7, 8, 9])]).unwrap();
        assert_eq!(batch.tokens.dims(), &[2, 5]);
        assert_eq!(batch.tokens.to_vec2::<u32>().unwrap(), [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]);
        assert_eq!(batch.predictors.to_vec1::<u32>().unwrap(), [2, 3, 5, 6, 7]);
        assert_eq!(batch.targets.flatten_all().unwrap().to_vec1::<u32>().unwrap(), [4, 5, 7, 8, 9]);
        assert_eq!((batch.target_count, batch.real_tokens), (5, 9));
    }
}
