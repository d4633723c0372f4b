//! The small vision-language model (SVLM): SmolVLM, an Idefics3-architecture model — a
//! SigLIP vision tower, a pixel-shuffle connector that turns each 512×512 image into 64
//! embeddings of the decoder's width, and a llama decoder (SmolLM2) that is a [`ChatModel`]
//! with the engine's run-time LoRA slots.
//!
//! One checkpoint directory holds it all (`config.json` with `text_config` and
//! `vision_config`, `model.safetensors`, `tokenizer.json`): the decoder loads through the
//! chat engine's own loader, the tower and connector through candle's SigLIP. An image is
//! resized to the tower's square input (no tiling into sub-images: one global view keeps
//! the prompt at 64 image tokens, which is what a 2-core CPU can afford).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::siglip;
use image::DynamicImage;
use serde::Deserialize;

use super::error::{bad_file, EngineError, Result};
use super::{ChatModel, Generation, LoadOptions, SamplingParams, Splice};

/// Idefics3's placeholder tokens.
const IMAGE_TOKEN: &str = "<image>";
const AROUND_IMAGE: &str = "<fake_token_around_image>";
const GLOBAL_IMAGE: &str = "<global-img>";

/// SmolVLM's chat format (its template, rendered for one user turn with one image).
const PROMPT_START: &str = "<|im_start|>User:";
const TURN_END: &str = "<end_of_utterance>";
const PROMPT_END: &str = "<end_of_utterance>\nAssistant:";

/// What SmolVLM's `config.json` adds to its decoder's.
#[derive(Deserialize)]
struct VlmConfig {
    vision_config: siglip::VisionConfig,
    #[serde(default = "default_scale_factor")]
    scale_factor: usize,
}

fn default_scale_factor() -> usize {
    4
}

/// `preprocessor_config.json`'s normalisation (SmolVLM: mean = std = 0.5).
#[derive(Deserialize)]
struct Preprocessor {
    #[serde(default = "half")]
    image_mean: [f32; 3],
    #[serde(default = "half")]
    image_std: [f32; 3],
}

fn half() -> [f32; 3] {
    [0.5; 3]
}

/// An image turned into decoder-width rows, ready to be spliced into a prompt.
pub struct ImageFeatures {
    /// `(tokens per image, decoder hidden size)`
    pub rows: Tensor,
    pub seconds: f64,
}

pub struct VisionLanguageModel {
    chat: ChatModel,
    tower: siglip::VisionModel,
    /// `model.connector.modality_projection.proj`, no bias.
    projection: candle_nn::Linear,
    image_size: usize,
    scale_factor: usize,
    mean: [f32; 3],
    std: [f32; 3],
    image_token: u32,
    tokens_per_image: usize,
    path: PathBuf,
    load_seconds: f64,
}

impl VisionLanguageModel {
    /// Loads a SmolVLM checkpoint directory.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self> {
        let started = Instant::now();
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| bad_file(&config_path, e))?;
        let config: VlmConfig = serde_json::from_str(&text)
            .map_err(|e| bad_file(&config_path, format!("not a vision-language model config (vision_config): {e}")))?;
        let vision = &config.vision_config;
        if vision.patch_size == 0 || !vision.image_size.is_multiple_of(vision.patch_size) || config.scale_factor == 0 {
            return Err(bad_file(&config_path, "image_size must be a multiple of patch_size, and scale_factor at least 1"));
        }
        let side = vision.image_size / vision.patch_size;
        if !side.is_multiple_of(config.scale_factor) {
            return Err(bad_file(&config_path, format!("{side} patches a side do not shuffle by scale_factor {}", config.scale_factor)));
        }
        let preprocessor = match std::fs::read_to_string(dir.join("preprocessor_config.json")) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| bad_file(dir.join("preprocessor_config.json"), format!("invalid preprocessor config: {e}")))?,
            Err(_) => Preprocessor { image_mean: half(), image_std: half() },
        };

        let mut chat = ChatModel::load(dir, options)?;
        // SmolVLM ends its turns with this token, whatever tokenizer_config.json says.
        chat.stop_at(TURN_END);
        let hidden = chat.decoder_config().hidden_size;
        let tokenizer = chat.tokenizer();
        let token = |name: &str| {
            tokenizer.token_id(name).ok_or_else(|| bad_file(dir, format!("the tokenizer has no '{name}' token; not a SmolVLM tokenizer")))
        };
        let image_token = token(IMAGE_TOKEN)?;
        token(AROUND_IMAGE)?;
        token(GLOBAL_IMAGE)?;

        let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| bad_file(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors") && !p.to_string_lossy().contains("adapter_"))
            .collect();
        shards.sort();
        let device = Device::Cpu;
        // SAFETY: memory-mapped read-only; model files are never written while loaded.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&shards, DType::F32, &device) }
            .map_err(|e| bad_file(dir, format!("invalid safetensors: {e}")))?;
        let tower = siglip::VisionModel::new(vision, false, vb.pp("model.vision_model"))
            .map_err(|e| bad_file(dir, format!("vision tower: {}", first_line(&e))))?;
        let shuffled = vision.hidden_size * config.scale_factor * config.scale_factor;
        let projection = candle_nn::linear_no_bias(shuffled, hidden, vb.pp("model.connector.modality_projection.proj"))
            .map_err(|e| bad_file(dir, format!("connector: {}", first_line(&e))))?;
        Ok(Self {
            chat,
            tower,
            projection,
            image_size: vision.image_size,
            scale_factor: config.scale_factor,
            mean: preprocessor.image_mean,
            std: preprocessor.image_std,
            image_token,
            tokens_per_image: side * side / (config.scale_factor * config.scale_factor),
            path: dir.to_path_buf(),
            load_seconds: started.elapsed().as_secs_f64(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn load_seconds(&self) -> f64 {
        self.load_seconds
    }

    /// The decoder, for attaching LoRA adapters (the `vision` operation's).
    pub fn chat_model_mut(&mut self) -> &mut ChatModel {
        &mut self.chat
    }

    pub fn chat_model(&self) -> &ChatModel {
        &self.chat
    }

    pub fn tokens_per_image(&self) -> usize {
        self.tokens_per_image
    }

    /// The tower's input: `image` resized to its square side, normalised, `(1, 3, S, S)`.
    pub fn pixels(&self, image: &DynamicImage) -> Result<Tensor> {
        let side = self.image_size as u32;
        let rgb = image.resize_exact(side, side, image::imageops::FilterType::CatmullRom).to_rgb8();
        let s = self.image_size;
        let mut data = vec![0f32; 3 * s * s];
        for (x, y, pixel) in rgb.enumerate_pixels() {
            for c in 0..3 {
                data[c * s * s + y as usize * s + x as usize] = (pixel[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        Ok(Tensor::from_vec(data, (1, 3, s, s), &Device::Cpu)?)
    }

    /// Encodes `image` into the rows its placeholders stand for.
    pub fn encode(&self, image: &DynamicImage) -> Result<ImageFeatures> {
        let started = Instant::now();
        let patches = self.tower.forward(&self.pixels(image)?)?;
        let rows = self.projection.forward(&pixel_shuffle(&patches, self.scale_factor)?)?.squeeze(0)?;
        Ok(ImageFeatures { rows, seconds: started.elapsed().as_secs_f64() })
    }

    /// The prompt text for one question about one image.
    pub fn prompt(&self, question: &str) -> String {
        let image = format!("{AROUND_IMAGE}{GLOBAL_IMAGE}{}{AROUND_IMAGE}", IMAGE_TOKEN.repeat(self.tokens_per_image));
        format!("{PROMPT_START}{image}{}{PROMPT_END}", question.trim())
    }

    /// Answers `question` looking at the image `features` encode, streaming to `on_text`.
    pub fn answer(
        &mut self,
        features: &ImageFeatures,
        question: &str,
        sampling: &SamplingParams,
        adapters: &[(String, f32)],
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let prompt = self.chat.tokenizer().encode(&self.prompt(question))?;
        let splice = Splice { token: self.image_token, rows: &features.rows };
        self.chat.generate_spliced(&prompt, &splice, sampling, adapters, on_text)
    }
}

impl VisionLanguageModel {
    /// The next-token logits after `question` about the image (scoring, tests).
    pub fn logits(&mut self, features: &ImageFeatures, question: &str, adapters: &[(String, f32)]) -> Result<Tensor> {
        let prompt = self.chat.tokenizer().encode(&self.prompt(question))?;
        let splice = Splice { token: self.image_token, rows: &features.rows };
        self.chat.spliced_logits(&prompt, &splice, adapters)
    }
}

/// Idefics3's pixel shuffle: `(1, n², d)` patches → `(1, n²/s², d·s²)`, each output row
/// holding an s × s block of neighbouring patches.
fn pixel_shuffle(x: &Tensor, scale: usize) -> Result<Tensor> {
    let (batch, seq, dim) = x.dims3()?;
    let side = (seq as f64).sqrt().round() as usize;
    if side * side != seq || !side.is_multiple_of(scale) {
        return Err(EngineError::Image(format!("{seq} patches do not form a square divisible by {scale}")));
    }
    let x = x.reshape((batch, side, side / scale, dim * scale))?;
    let x = x.permute((0, 2, 1, 3))?.contiguous()?;
    let x = x.reshape((batch, side / scale, side / scale, dim * scale * scale))?;
    let x = x.permute((0, 2, 1, 3))?.contiguous()?;
    Ok(x.reshape((batch, seq / (scale * scale), dim * scale * scale))?)
}

fn first_line(e: &impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_shuffle_groups_neighbouring_patches_as_idefics3_does() {
        // 4×4 patches of width 1, numbered row by row; scale 2 → 4 rows of 4 values.
        let x = Tensor::arange(0f32, 16., &Device::Cpu).unwrap().reshape((1, 16, 1)).unwrap();
        let y = pixel_shuffle(&x, 2).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        // What transformers' Idefics3Connector.pixel_shuffle gives for this input.
        assert_eq!(y, [[0., 1., 4., 5.], [2., 3., 6., 7.], [8., 9., 12., 13.], [10., 11., 14., 15.]]);
        assert!(pixel_shuffle(&Tensor::zeros((1, 12, 1), DType::F32, &Device::Cpu).unwrap(), 2).is_err());
    }
}

/// The dimensions of a SmolVLM checkpoint, for random ones (benchmarks, tests).
#[derive(Debug, Clone, Copy)]
pub struct SmolVlmShape {
    pub text_hidden: usize,
    pub text_intermediate: usize,
    pub text_layers: usize,
    pub text_heads: usize,
    pub text_kv_heads: usize,
    /// At least the tokenizer's 256 byte tokens and its special tokens.
    pub vocab: usize,
    pub vision_hidden: usize,
    pub vision_intermediate: usize,
    pub vision_layers: usize,
    pub vision_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub scale_factor: usize,
}

impl SmolVlmShape {
    /// HuggingFaceTB/SmolVLM-256M-Instruct.
    pub const SMOLVLM_256M: SmolVlmShape = SmolVlmShape {
        text_hidden: 576,
        text_intermediate: 1536,
        text_layers: 30,
        text_heads: 9,
        text_kv_heads: 3,
        vocab: 49280,
        vision_hidden: 768,
        vision_intermediate: 3072,
        vision_layers: 12,
        vision_heads: 12,
        image_size: 512,
        patch_size: 16,
        scale_factor: 4,
    };

    /// Small enough for unit tests: 32 × 32 images in 8 × 8 patches, 4 image tokens.
    pub const TINY: SmolVlmShape = SmolVlmShape {
        text_hidden: 64,
        text_intermediate: 128,
        text_layers: 2,
        text_heads: 4,
        text_kv_heads: 2,
        vocab: 300,
        vision_hidden: 32,
        vision_intermediate: 64,
        vision_layers: 2,
        vision_heads: 2,
        image_size: 32,
        patch_size: 8,
        scale_factor: 2,
    };
}

/// Writes a SmolVLM checkpoint directory of `shape` with random weights (seeded) under the
/// real tensor names, and a byte-level tokenizer with SmolVLM's special tokens: what the
/// benchmark measures when the real weights are not at hand, and what tests load.
pub fn write_random_checkpoint(dir: &Path, shape: &SmolVlmShape, seed: u64) -> Result<()> {
    use rand::{Rng, SeedableRng};
    let failed = |e: &dyn std::fmt::Display| bad_file(dir, e);
    std::fs::create_dir_all(dir).map_err(|e| failed(&e))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tensors: std::collections::HashMap<String, Tensor> = std::collections::HashMap::new();
    let mut put = |name: String, dims: &[usize], bound: f32, offset: f32| -> Result<()> {
        let n: usize = dims.iter().product();
        let data: Vec<f32> = (0..n).map(|_| offset + rng.random_range(-bound..=bound)).collect();
        tensors.insert(name, Tensor::from_vec(data, dims, &Device::Cpu)?);
        Ok(())
    };
    let s = shape;
    let head_dim = s.text_hidden / s.text_heads;
    let t = "model.text_model";
    put(format!("{t}.embed_tokens.weight"), &[s.vocab, s.text_hidden], 1.0, 0.0)?;
    put(format!("{t}.norm.weight"), &[s.text_hidden], 0.2, 1.0)?;
    for i in 0..s.text_layers {
        let p = format!("{t}.layers.{i}");
        let (h, ff, q, kv) = (s.text_hidden, s.text_intermediate, s.text_heads * head_dim, s.text_kv_heads * head_dim);
        for (name, out, inp) in [
            ("self_attn.q_proj", q, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, q),
            ("mlp.gate_proj", ff, h),
            ("mlp.up_proj", ff, h),
            ("mlp.down_proj", h, ff),
        ] {
            put(format!("{p}.{name}.weight"), &[out, inp], 1.0 / (inp as f32).sqrt(), 0.0)?;
        }
        put(format!("{p}.input_layernorm.weight"), &[h], 0.2, 1.0)?;
        put(format!("{p}.post_attention_layernorm.weight"), &[h], 0.2, 1.0)?;
    }
    let v = "model.vision_model";
    let (d, ff) = (s.vision_hidden, s.vision_intermediate);
    let patches = (s.image_size / s.patch_size).pow(2);
    put(format!("{v}.embeddings.patch_embedding.weight"), &[d, 3, s.patch_size, s.patch_size], 0.1, 0.0)?;
    put(format!("{v}.embeddings.patch_embedding.bias"), &[d], 0.1, 0.0)?;
    put(format!("{v}.embeddings.position_embedding.weight"), &[patches, d], 0.5, 0.0)?;
    let mut norms = vec![format!("{v}.post_layernorm")];
    for i in 0..s.vision_layers {
        let p = format!("{v}.encoder.layers.{i}");
        norms.push(format!("{p}.layer_norm1"));
        norms.push(format!("{p}.layer_norm2"));
        for module in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            put(format!("{p}.self_attn.{module}.weight"), &[d, d], 1.0 / (d as f32).sqrt(), 0.0)?;
            put(format!("{p}.self_attn.{module}.bias"), &[d], 0.1, 0.0)?;
        }
        put(format!("{p}.mlp.fc1.weight"), &[ff, d], 1.0 / (d as f32).sqrt(), 0.0)?;
        put(format!("{p}.mlp.fc1.bias"), &[ff], 0.1, 0.0)?;
        put(format!("{p}.mlp.fc2.weight"), &[d, ff], 1.0 / (ff as f32).sqrt(), 0.0)?;
        put(format!("{p}.mlp.fc2.bias"), &[d], 0.1, 0.0)?;
    }
    for norm in norms {
        put(format!("{norm}.weight"), &[d], 0.1, 1.0)?;
        put(format!("{norm}.bias"), &[d], 0.1, 0.0)?;
    }
    let shuffled = d * s.scale_factor * s.scale_factor;
    put("model.connector.modality_projection.proj.weight".into(), &[s.text_hidden, shuffled], 1.0 / (shuffled as f32).sqrt(), 0.0)?;
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).map_err(|e| failed(&e))?;

    let config = serde_json::json!({
        "architectures": ["Idefics3ForConditionalGeneration"], "model_type": "idefics3", "scale_factor": s.scale_factor,
        "text_config": {
            "model_type": "llama", "vocab_size": s.vocab, "hidden_size": s.text_hidden, "intermediate_size": s.text_intermediate,
            "num_hidden_layers": s.text_layers, "num_attention_heads": s.text_heads, "num_key_value_heads": s.text_kv_heads,
            "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": true,
        },
        "vision_config": {
            "hidden_size": d, "intermediate_size": ff, "num_hidden_layers": s.vision_layers, "num_attention_heads": s.vision_heads,
            "num_channels": 3, "image_size": s.image_size, "patch_size": s.patch_size, "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
        },
    });
    std::fs::write(dir.join("config.json"), config.to_string()).map_err(|e| failed(&e))?;
    std::fs::write(dir.join("tokenizer.json"), byte_tokenizer_json().to_string()).map_err(|e| failed(&e))?;
    let tokenizer_config = serde_json::json!({"eos_token": "<end_of_utterance>", "bos_token": null});
    std::fs::write(dir.join("tokenizer_config.json"), tokenizer_config.to_string()).map_err(|e| failed(&e))
}

/// SmolVLM's special tokens, after the 256 byte tokens of [`byte_tokenizer_json`].
pub const RANDOM_CHECKPOINT_SPECIALS: [&str; 6] =
    ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", IMAGE_TOKEN, AROUND_IMAGE, GLOBAL_IMAGE];

/// A byte-level BPE tokenizer without merges: every byte is a token, then the specials.
fn byte_tokenizer_json() -> serde_json::Value {
    // GPT-2's reversible byte → printable character mapping.
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars = printable.clone();
    for (extra, b) in (0..256u32).filter(|b| !printable.contains(b)).collect::<Vec<_>>().into_iter().enumerate() {
        printable.push(b);
        chars.push(256 + extra as u32);
    }
    let mut by_byte: Vec<(u32, u32)> = printable.into_iter().zip(chars).collect();
    by_byte.sort();
    let mut vocab = serde_json::Map::new();
    for (id, (_, c)) in by_byte.iter().enumerate() {
        vocab.insert(char::from_u32(*c).expect("valid mapping").to_string(), id.into());
    }
    let added: Vec<serde_json::Value> = RANDOM_CHECKPOINT_SPECIALS
        .iter()
        .enumerate()
        .map(|(i, token)| {
            vocab.insert(token.to_string(), (256 + i).into());
            serde_json::json!({"id": 256 + i, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
                               "normalized": false, "special": true})
        })
        .collect();
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []}
    })
}
