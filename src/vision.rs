//! The vision operation: the small vision-language model looks at an image to answer a
//! question about it (`native`), or only captions it and the chat model answers from the
//! caption (`caption`, the baseline MemLoRA-V compares with). The model is loaded the first
//! time an image is asked about, so that chat without images never pays for it.

use std::ops::ControlFlow;
use std::path::PathBuf;

use image::DynamicImage;
use serde::{Deserialize, Serialize};

use crate::adapters::LoraAdapter;
use crate::engine::vision::VisionLanguageModel;
use crate::engine::{Generation, LoadOptions, SamplingParams};

/// How an image question is answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VisionMode {
    /// The vision-language model looks at the image.
    #[default]
    Native,
    /// The image is captioned and the chat model answers from the caption.
    Caption,
}

impl std::str::FromStr for VisionMode {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "native" => Ok(VisionMode::Native),
            "caption" => Ok(VisionMode::Caption),
            other => Err(format!("vision mode is native or caption, not '{other}'")),
        }
    }
}

impl std::fmt::Display for VisionMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VisionMode::Native => "native",
            VisionMode::Caption => "caption",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    /// The model is not available (not downloaded, or none configured); says what to do.
    #[error("the vision model is not available: {0}")]
    Unavailable(String),
    #[error("vision model: {0}")]
    Model(String),
}

/// Where the model is and how to run it.
#[derive(Debug, Clone)]
pub struct VisionSettings {
    /// The checkpoint directory, or why there is none.
    pub model: Result<PathBuf, String>,
    pub load: LoadOptions,
    pub mode: VisionMode,
    /// Adapters of the `vision` operation: (name, directory, scale).
    pub adapters: Vec<(String, PathBuf, f32)>,
    /// What the model is asked to describe an image for its memory and the caption mode.
    pub caption_prompt: String,
    pub caption_tokens: usize,
}

pub struct Vision {
    settings: VisionSettings,
    model: Option<VisionLanguageModel>,
}

impl Vision {
    pub fn new(settings: VisionSettings) -> Vision {
        Vision { settings, model: None }
    }

    pub fn mode(&self) -> VisionMode {
        self.settings.mode
    }

    pub fn set_mode(&mut self, mode: VisionMode) {
        self.settings.mode = mode;
    }

    /// Whether a model is configured and present (it may not be loaded yet).
    pub fn available(&self) -> Result<(), VisionError> {
        self.settings.model.as_ref().map(|_| ()).map_err(|why| VisionError::Unavailable(why.clone()))
    }

    /// The model, loaded (with the vision adapters attached) on first use.
    pub fn model(&mut self) -> Result<&mut VisionLanguageModel, VisionError> {
        if self.model.is_none() {
            let dir = self.settings.model.as_ref().map_err(|why| VisionError::Unavailable(why.clone()))?;
            let failed = |e: &dyn std::fmt::Display| VisionError::Model(e.to_string());
            let mut model = VisionLanguageModel::load(dir, &self.settings.load).map_err(|e| failed(&e))?;
            for (name, adapter_dir, _) in &self.settings.adapters {
                let adapter = LoraAdapter::load(adapter_dir).map_err(|e| failed(&e))?;
                model.chat_model_mut().attach_adapter(name, &adapter).map_err(|e| failed(&e))?;
            }
            self.model = Some(model);
        }
        Ok(self.model.as_mut().expect("loaded above"))
    }

    fn active_adapters(&self) -> Vec<(String, f32)> {
        self.settings.adapters.iter().map(|(name, _, scale)| (name.clone(), *scale)).collect()
    }

    /// Answers `question` looking at `image`, streaming to `on_text`.
    pub fn look(
        &mut self,
        image: &DynamicImage,
        question: &str,
        sampling: &SamplingParams,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation, VisionError> {
        let adapters = self.active_adapters();
        let model = self.model()?;
        let features = model.encode(image).map_err(|e| VisionError::Model(e.to_string()))?;
        model.answer(&features, question, sampling, &adapters, on_text).map_err(|e| VisionError::Model(e.to_string()))
    }

    /// A short description of `image` (greedy).
    pub fn caption(&mut self, image: &DynamicImage) -> Result<String, VisionError> {
        let sampling = SamplingParams { max_tokens: self.settings.caption_tokens, temperature: 0.0, ..SamplingParams::default() };
        let prompt = self.settings.caption_prompt.clone();
        let generation = self.look(image, &prompt, &sampling, &mut |_| ControlFlow::Continue(()))?;
        Ok(generation.text.trim().to_owned())
    }
}
