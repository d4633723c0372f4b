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
        if vision.patch_size == 0 || vision.image_size % vision.patch_size != 0 || config.scale_factor == 0 {
            return Err(bad_file(&config_path, "image_size must be a multiple of patch_size, and scale_factor at least 1"));
        }
        let side = vision.image_size / vision.patch_size;
        if side % config.scale_factor != 0 {
            return Err(bad_file(&config_path, format!("{side} patches a side do not shuffle by scale_factor {}", config.scale_factor)));
        }
        let preprocessor = match std::fs::read_to_string(dir.join("preprocessor_config.json")) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| bad_file(dir.join("preprocessor_config.json"), format!("invalid preprocessor config: {e}")))?,
            Err(_) => Preprocessor { image_mean: half(), image_std: half() },
        };

        let chat = ChatModel::load(dir, options)?;
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
    if side * side != seq || side % scale != 0 {
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
