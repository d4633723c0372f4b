//! The inference engine: a llama-family chat model with LoRA adapter slots,
//! and a sentence embedder. Everything runs on the CPU with candle.

mod attention;
mod chat;
mod constraint;
mod decoder;
mod embedder;
mod error;
mod lora;
mod matrix;
mod pool;
mod quant;
mod tokenizer;
pub mod vision;
mod weights;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_transformers::generation::LogitsProcessor;
use serde::Serialize;

pub use chat::{ChatMessage, ChatTemplate, Role};
pub use constraint::OutputConstraint;
pub(crate) use decoder::rotary_tables;
pub use decoder::{Decoder, Splice, TargetModule};
pub use embedder::{cosine, Embedder};
pub use error::{EngineError, Result};
pub use lora::SlotId;
pub use pool::{max_threads, set_max_threads};
pub use tokenizer::{TextTokenizer, TokenTextStream};
pub use weights::{read_gguf_header, Architecture, Checkpoint, DecoderConfig, RopeLayout, WeightFormat};

use crate::adapters::LoraAdapter;
use constraint::Grammars;
use decoder::KvSnapshot;
use lora::LoraFactors;

/// How to load a chat model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub weights: WeightFormat,
    /// Context window in tokens (clamped to the model's maximum).
    pub context: usize,
    /// `tokenizer.json` to use instead of the one beside the model or in GGUF metadata.
    pub tokenizer: Option<PathBuf>,
    /// Chat template to use when the model carries none.
    pub chat_template: Option<String>,
    /// Names this model is known by (manifest name, hub repository); an
    /// adapter whose `base_model_name_or_path` names none of them is refused.
    pub aliases: Vec<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { weights: WeightFormat::Auto, context: 2048, tokenizer: None, chat_template: None, aliases: Vec::new() }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub path: PathBuf,
    pub architecture: &'static str,
    pub parameters: usize,
    pub layers: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub context: usize,
    pub load_seconds: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SamplingParams {
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// Divides the logits of tokens already in the answer (1 = off); small
    /// models otherwise fall into loops.
    pub repeat_penalty: f32,
}

/// How many of the latest answer tokens the repeat penalty looks at.
const REPEAT_WINDOW: usize = 64;

impl Default for SamplingParams {
    fn default() -> Self {
        Self { max_tokens: 256, temperature: 0.0, top_p: 0.9, seed: 299_792_458, repeat_penalty: 1.0 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    EndOfTurn,
    MaxTokens,
    ContextFull,
    Cancelled,
}

#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub text: String,
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values were reused from the previous request.
    pub reused_prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Oldest messages left out so the prompt fits the context.
    pub dropped_messages: usize,
    pub stop_reason: StopReason,
    pub prefill_seconds: f64,
    pub time_to_first_token_seconds: f64,
    pub decode_seconds: f64,
}

impl Generation {
    pub fn prefill_tokens_per_second(&self) -> f64 {
        (self.prompt_tokens - self.reused_prompt_tokens) as f64 / self.prefill_seconds.max(1e-9)
    }
    /// Tokens after the first, over the time spent producing them.
    pub fn decode_tokens_per_second(&self) -> f64 {
        self.completion_tokens.saturating_sub(1) as f64 / self.decode_seconds.max(1e-9)
    }
}

/// An adapter installed in a slot of the loaded model.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterSlot {
    pub name: String,
    pub rank: usize,
    pub targets: Vec<&'static str>,
    pub scale: f64,
}

pub struct ChatModel {
    decoder: Decoder,
    tokenizer: TextTokenizer,
    template: ChatTemplate,
    slots: Vec<Option<AdapterSlot>>,
    aliases: Vec<String>,
    info: ModelInfo,
    /// Tokens whose keys and values are in the decoder's cache, and the
    /// adapters that produced them.
    cached_tokens: Vec<u32>,
    cached_adapters: Vec<(SlotId, f32)>,
    /// Keys and values of recent prompts' system parts, per adapter set: the memory
    /// operations alternate between adapters, each of which changes the cache, and
    /// their system prompts never change.
    prefixes: Vec<CachedPrefix>,
    /// Built on the first constrained request.
    grammars: Option<Grammars>,
}

/// The cached system part of a prompt, computed with `adapters`.
struct CachedPrefix {
    tokens: Vec<u32>,
    adapters: Vec<(SlotId, f32)>,
    kv: KvSnapshot,
}

/// System parts kept: one per memory operation and the answers, with room to spare.
const PREFIXES_KEPT: usize = 8;
/// A system part shorter than this is not worth a copy of its keys and values.
const PREFIX_MIN_TOKENS: usize = 16;

impl ChatModel {
    /// Loads a GGUF file or a safetensors directory.
    pub fn load(path: &Path, options: &LoadOptions) -> Result<Self> {
        let started = Instant::now();
        let device = Device::Cpu;
        let mut checkpoint = Checkpoint::open(path, options.weights)?;
        let tokenizer = match (options.tokenizer.clone().or_else(|| tokenizer_beside(path)), &checkpoint.gguf_metadata) {
            (Some(file), _) => TextTokenizer::from_file(&file)?,
            (None, Some(md)) => TextTokenizer::from_gguf(path, md)?,
            (None, None) => {
                return Err(EngineError::MissingTokenizer {
                    path: path.to_path_buf(),
                    message: "no tokenizer.json beside the model".into(),
                })
            }
        };
        let template_source = tokenizer.chat_template.clone().or_else(|| options.chat_template.clone());
        let template = ChatTemplate::new(template_source.as_deref(), tokenizer.bos_token.as_deref(), tokenizer.eos_token.as_deref())?;
        let decoder = Decoder::load(&mut checkpoint, options.context, &device)?;
        let config = decoder.config();
        if tokenizer.vocab_size() > config.vocab_size {
            return Err(error::bad_file(
                path,
                format!("tokenizer has {} tokens but the model only {}", tokenizer.vocab_size(), config.vocab_size),
            ));
        }
        let info = ModelInfo {
            path: path.to_path_buf(),
            architecture: config.architecture.name(),
            parameters: parameter_count(config),
            layers: config.num_layers,
            hidden_size: config.hidden_size,
            vocab_size: config.vocab_size,
            context: decoder.context(),
            load_seconds: started.elapsed().as_secs_f64(),
        };
        let mut aliases = options.aliases.clone();
        aliases.extend(path.file_stem().map(|s| s.to_string_lossy().to_string()));
        Ok(Self {
            decoder,
            tokenizer,
            template,
            slots: Vec::new(),
            aliases,
            info,
            cached_tokens: Vec::new(),
            cached_adapters: Vec::new(),
            prefixes: Vec::new(),
            grammars: None,
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Makes generation also stop at `token`; false when the tokenizer has no such token.
    pub fn stop_at(&mut self, token: &str) -> bool {
        let Some(id) = self.tokenizer.token_id(token) else { return false };
        if !self.tokenizer.stop_ids.contains(&id) {
            self.tokenizer.stop_ids.push(id);
        }
        true
    }

    pub fn decoder_config(&self) -> &DecoderConfig {
        self.decoder.config()
    }

    pub fn adapters(&self) -> impl Iterator<Item = &AdapterSlot> {
        self.slots.iter().flatten()
    }

    pub fn slot_of(&self, name: &str) -> Result<SlotId> {
        self.slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.name == name))
            .ok_or_else(|| EngineError::UnknownAdapter(name.to_string()))
    }

    /// Installs `adapter` under `name` (replacing an adapter of that name)
    /// after checking that it fits this model; nothing changes if it does not.
    pub fn attach_adapter(&mut self, name: &str, adapter: &LoraAdapter) -> Result<SlotId> {
        let mismatch = |message: String| EngineError::AdapterMismatch { name: name.to_string(), message };
        self.check_base_model(adapter).map_err(mismatch)?;
        let config = self.decoder.config().clone();
        let permute_qk = self.decoder.config().rope_layout == RopeLayout::Interleaved;
        let scale = adapter.scale();
        let mut factors = Vec::with_capacity(adapter.modules.len());
        for (key, pair) in &adapter.modules {
            let module = key.module.hf_name();
            if key.layer >= config.num_layers {
                return Err(mismatch(format!("adapts layer {} but the model has {} layers", key.layer, config.num_layers)));
            }
            let linear = self.decoder.linear(key.layer, key.module);
            let (_, a_in) = pair.a.dims2()?;
            let (b_out, _) = pair.b.dims2()?;
            if a_in != linear.in_features() || b_out != linear.out_features() {
                return Err(mismatch(format!(
                    "layer {} {module} is {}x{} (out x in) in the model but {}x{} in the adapter",
                    key.layer,
                    linear.out_features(),
                    linear.in_features(),
                    b_out,
                    a_in
                )));
            }
            let b = match (permute_qk, key.module) {
                (true, TargetModule::Q) => permute_rows_for_interleaved_rope(&pair.b, config.num_heads, config.head_dim)?,
                (true, TargetModule::K) => permute_rows_for_interleaved_rope(&pair.b, config.num_kv_heads, config.head_dim)?,
                _ => pair.b.clone(),
            };
            factors.push((*key, LoraFactors::new(&pair.a, &b, scale)?));
        }
        let slot = match self.slot_of(name) {
            Ok(slot) => {
                self.remove_from_layers(slot);
                slot
            }
            Err(_) => self.slots.iter().position(Option::is_none).unwrap_or_else(|| {
                self.slots.push(None);
                self.slots.len() - 1
            }),
        };
        for (key, f) in factors {
            self.decoder.linear_mut(key.layer, key.module).set_adapter(slot, f);
        }
        let targets = adapter.modules_present().into_iter().map(TargetModule::hf_name).collect();
        self.slots[slot] = Some(AdapterSlot { name: name.to_string(), rank: adapter.config.r, targets, scale });
        self.invalidate_cache_if_uses(slot);
        Ok(slot)
    }

    pub fn detach_adapter(&mut self, name: &str) -> Result<()> {
        let slot = self.slot_of(name)?;
        self.remove_from_layers(slot);
        self.slots[slot] = None;
        self.invalidate_cache_if_uses(slot);
        Ok(())
    }

    /// Adds `scale · ΔW` of the adapter into the base weights for good and
    /// frees its slot. Quantized weights are re-quantized, which rounds.
    pub fn fold_adapter(&mut self, name: &str, scale: f32) -> Result<()> {
        let slot = self.slot_of(name)?;
        for layer in 0..self.decoder.config().num_layers {
            for module in TargetModule::ALL {
                self.decoder.linear_mut(layer, module).fold(slot, scale)?;
            }
        }
        self.slots[slot] = None;
        self.reset_cache();
        // The base weights changed: no cached keys or values are theirs any more.
        self.prefixes.clear();
        Ok(())
    }

    fn remove_from_layers(&mut self, slot: SlotId) {
        for layer in 0..self.decoder.config().num_layers {
            for module in TargetModule::ALL {
                self.decoder.linear_mut(layer, module).remove_adapter(slot);
            }
        }
    }

    fn check_base_model(&self, adapter: &LoraAdapter) -> std::result::Result<(), String> {
        let Some(base) = adapter.config.base_model_name_or_path.as_deref().filter(|b| !b.is_empty()) else { return Ok(()) };
        if self.aliases.iter().any(|alias| crate::adapters::peft::same_base_model(alias, base)) {
            Ok(())
        } else {
            Err(format!("trained for base model '{base}', but this model is {}", self.aliases.join(" / ")))
        }
    }

    /// Resolves adapter names with their scales for one request.
    pub fn active_adapters(&self, adapters: &[(String, f32)]) -> Result<Vec<(SlotId, f32)>> {
        adapters.iter().map(|(name, scale)| Ok((self.slot_of(name)?, *scale))).collect()
    }

    fn reset_cache(&mut self) {
        self.cached_tokens.clear();
        self.decoder.truncate_cache(0);
    }

    fn invalidate_cache_if_uses(&mut self, slot: SlotId) {
        if self.cached_adapters.iter().any(|(s, _)| *s == slot) {
            self.reset_cache();
        }
        self.prefixes.retain(|prefix| prefix.adapters.iter().all(|(s, _)| *s != slot));
    }

    /// Logits for every position of `tokens` from an empty cache; for tests
    /// and scoring.
    pub fn logits(&mut self, tokens: &[u32], adapters: &[(String, f32)]) -> Result<Tensor> {
        let active = self.active_adapters(adapters)?;
        self.reset_cache();
        let logits = self.decoder.forward_all(tokens, &active);
        self.reset_cache();
        logits
    }

    /// Logits after the last of `tokens`, reusing the cached keys and values
    /// of the longest prefix shared with the previous call (scoring and
    /// step-by-step decoding).
    pub fn next_token_logits(&mut self, tokens: &[u32], adapters: &[(String, f32)]) -> Result<Tensor> {
        let active = self.active_adapters(adapters)?;
        Ok(self.run_prompt(tokens, &active, 0)?.0)
    }

    /// Runs `prompt` after the longest prefix of it already computed with the same
    /// adapters — in the cache, or a kept system part — (the last token is always
    /// recomputed) and returns the last logits and how many tokens were reused. The first
    /// `fixed` tokens (a system part that later prompts repeat) are kept for them.
    fn run_prompt(&mut self, prompt: &[u32], active: &[(SlotId, f32)], fixed: usize) -> Result<(Tensor, usize)> {
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let live =
            if active == self.cached_adapters.as_slice() { common_prefix(&self.cached_tokens, prompt).min(prompt.len() - 1) } else { 0 };
        let kept = self
            .prefixes
            .iter()
            .enumerate()
            .filter(|(_, p)| p.adapters == active && p.tokens.len() < prompt.len() && prompt.starts_with(&p.tokens))
            .max_by_key(|(_, p)| p.tokens.len())
            .map(|(index, p)| (index, p.tokens.len()))
            .filter(|&(_, len)| len > live);
        let reusable = match kept {
            Some((index, len)) => {
                let prefix = self.prefixes.remove(index);
                if let Err(e) = self.decoder.restore(&prefix.kv) {
                    self.reset_cache();
                    return Err(e);
                }
                self.cached_tokens.clone_from(&prefix.tokens);
                // Most recently used last: the first is the one to drop.
                self.prefixes.push(prefix);
                len
            }
            None => {
                self.decoder.truncate_cache(live);
                self.cached_tokens.truncate(live);
                live
            }
        };
        self.cached_adapters = active.to_vec();
        match self.decoder.forward_last(&prompt[reusable..], active) {
            Ok(logits) => {
                self.cached_tokens.extend_from_slice(&prompt[reusable..]);
                self.keep_prefix(&prompt[..fixed.min(prompt.len())], active)?;
                Ok((logits, reusable))
            }
            Err(e) => {
                self.reset_cache();
                Err(e)
            }
        }
    }

    /// Keeps the cached keys and values of `tokens` (the cache's first positions) for
    /// later prompts that start with them, unless they are already kept or too short.
    fn keep_prefix(&mut self, tokens: &[u32], active: &[(SlotId, f32)]) -> Result<()> {
        if tokens.len() < PREFIX_MIN_TOKENS || self.prefixes.iter().any(|p| p.adapters == active && p.tokens == tokens) {
            return Ok(());
        }
        let kv = self.decoder.snapshot(tokens.len())?;
        if self.prefixes.len() >= PREFIXES_KEPT {
            self.prefixes.remove(0);
        }
        self.prefixes.push(CachedPrefix { tokens: tokens.to_vec(), adapters: active.to_vec(), kv });
        Ok(())
    }

    /// How many of `prompt`'s tokens are its system message's, as rendered on its own
    /// (0 when there is none, or when the template renders it differently alone).
    fn system_part(&self, messages: &[ChatMessage], prompt: &[u32]) -> usize {
        let Some(system) = messages.first().filter(|m| m.role == Role::System) else { return 0 };
        let Ok(text) = self.template.render_with(std::slice::from_ref(system), false) else { return 0 };
        let Ok(tokens) = self.tokenizer.encode(&text) else { return 0 };
        // The last token may merge with what follows in the whole prompt.
        common_prefix(&tokens, prompt).min(tokens.len().saturating_sub(1))
    }

    /// Renders `messages` with the chat template, followed by `response_prefix`
    /// (the start of the assistant's answer), dropping the oldest turns (never the
    /// system message or the last message) until the prompt and `reserve` answer
    /// tokens fit the context.
    pub fn prompt_tokens(&self, messages: &[ChatMessage], response_prefix: &str, reserve: usize) -> Result<(Vec<u32>, usize)> {
        let context = self.decoder.context();
        let system = messages.first().filter(|m| m.role == Role::System).cloned();
        let rest_start = usize::from(system.is_some());
        let mut dropped = 0;
        loop {
            let kept: Vec<ChatMessage> = system.iter().cloned().chain(messages[rest_start + dropped..].iter().cloned()).collect();
            let tokens = self.tokenizer.encode(&(self.template.render(&kept)? + response_prefix))?;
            if tokens.len() + reserve <= context {
                return Ok((tokens, dropped));
            }
            if rest_start + dropped + 1 >= messages.len() {
                return Err(EngineError::PromptTooLong { prompt_tokens: tokens.len(), context, reserved: reserve });
            }
            dropped += 1;
        }
    }

    /// A training example: the tokens of the prompt (the template up to where the answer
    /// of the last message starts, exactly as [`ChatModel::generate`] would encode it) and
    /// of that answer with the template's end-of-turn text. The last message must be the
    /// assistant's.
    pub fn example_tokens(&self, messages: &[ChatMessage]) -> Result<(Vec<u32>, Vec<u32>)> {
        let Some((answer, context)) = messages.split_last().filter(|(m, _)| m.role == Role::Assistant) else {
            return Err(EngineError::ChatTemplate("a training example must end with an assistant message".into()));
        };
        let prompt = self.template.render(context)?;
        let whole = self.template.render_with(messages, false)?;
        let completion = whole.strip_prefix(&prompt).filter(|c| c.contains(answer.content.as_str())).ok_or_else(|| {
            EngineError::ChatTemplate("the template does not write the answer after the prompt it renders for generation".into())
        })?;
        Ok((self.tokenizer.encode(&prompt)?, self.tokenizer.encode(completion)?))
    }

    /// Generates the assistant's answer to `messages`, calling `on_text` with
    /// each new piece of text; `on_text` returning `Break` cancels.
    pub fn generate(
        &mut self,
        messages: &[ChatMessage],
        sampling: &SamplingParams,
        adapters: &[(String, f32)],
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        self.continue_answer(messages, "", sampling, adapters, on_text)
    }

    /// Like [`ChatModel::generate`], with the answer forced to begin with
    /// `response_prefix` (which is not part of the returned text). Small models
    /// keep to a JSON format far better when its opening is given.
    pub fn continue_answer(
        &mut self,
        messages: &[ChatMessage],
        response_prefix: &str,
        sampling: &SamplingParams,
        adapters: &[(String, f32)],
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        self.continue_constrained(messages, response_prefix, sampling, adapters, None, on_text)
    }

    /// Like [`ChatModel::continue_answer`], with the answer — `response_prefix` and what
    /// follows it — held to `constraint`: at each step only tokens that can continue a
    /// valid output are sampled, text the constraint forces is run in one pass, and
    /// generation ends as soon as the output is complete.
    pub fn continue_constrained(
        &mut self,
        messages: &[ChatMessage],
        response_prefix: &str,
        sampling: &SamplingParams,
        adapters: &[(String, f32)],
        constraint: Option<&OutputConstraint>,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let active = self.active_adapters(adapters)?;
        let matcher = match constraint {
            Some(constraint) => Some(self.matcher_after(constraint, response_prefix)?),
            None => None,
        };
        // Keep room for the answer, but never more than half the context.
        let reserve = sampling.max_tokens.min(self.decoder.context() / 2);
        let (prompt, dropped_messages) = self.prompt_tokens(messages, response_prefix, reserve)?;
        let fixed = self.system_part(messages, &prompt);
        let started = Instant::now();
        let (logits, reusable) = self.run_prompt(&prompt, &active, fixed)?;
        let prefilled = Prefilled { prompt_tokens: prompt.len(), reused_prompt_tokens: reusable, dropped_messages, started };
        self.decode(logits, prefilled, sampling, &active, matcher, on_text)
    }

    /// A matcher for `constraint` that has read `prefix`, the answer's given start.
    fn matcher_after(&mut self, constraint: &OutputConstraint, prefix: &str) -> Result<llguidance::Matcher> {
        if self.grammars.is_none() {
            self.grammars = Some(Grammars::new(&self.tokenizer, self.decoder.config().vocab_size)?);
        }
        let grammars = self.grammars.as_mut().expect("built above");
        let mut matcher = grammars.matcher(constraint)?;
        if !prefix.is_empty() {
            let tokens = self.tokenizer.encode(prefix)?;
            matcher.consume_tokens(&tokens).map_err(|e| {
                EngineError::Constraint(format!(
                    "the answer's start {prefix:?} does not fit the constraint: {}",
                    constraint::first_line(&e)
                ))
            })?;
        }
        Ok(matcher)
    }

    /// Answers `prompt` (tokens of a rendered conversation) whose `splice.token`s are
    /// embedded as `splice.rows` — an image's features in a vision-language model.
    pub fn generate_spliced(
        &mut self,
        prompt: &[u32],
        splice: &Splice,
        sampling: &SamplingParams,
        adapters: &[(String, f32)],
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let active = self.active_adapters(adapters)?;
        let context = self.decoder.context();
        let reserve = sampling.max_tokens.min(context / 2);
        if prompt.len() + reserve > context {
            return Err(EngineError::PromptTooLong { prompt_tokens: prompt.len(), context, reserved: reserve });
        }
        let started = Instant::now();
        self.reset_cache();
        self.cached_adapters = active.clone();
        let logits = match self.decoder.forward_last_spliced(prompt, splice, &active) {
            Ok(logits) => logits,
            Err(e) => {
                self.reset_cache();
                return Err(e);
            }
        };
        // The placeholders' cache entries hold the rows, not the token: no later prompt may
        // reuse them as if they were that token.
        self.cached_tokens = prompt.iter().map(|&t| if t == splice.token { NOT_A_TOKEN } else { t }).collect();
        let prefilled = Prefilled { prompt_tokens: prompt.len(), reused_prompt_tokens: 0, dropped_messages: 0, started };
        self.decode(logits, prefilled, sampling, &active, None, on_text)
    }

    /// The logits after `prompt` with `splice` (scoring, tests); nothing is cached.
    pub fn spliced_logits(&mut self, prompt: &[u32], splice: &Splice, adapters: &[(String, f32)]) -> Result<Tensor> {
        let active = self.active_adapters(adapters)?;
        self.reset_cache();
        let logits = self.decoder.forward_last_spliced(prompt, splice, &active);
        self.reset_cache();
        logits
    }

    /// Samples the answer from the logits after the prompt, within `matcher`'s grammar
    /// when there is one.
    fn decode(
        &mut self,
        logits: Tensor,
        prefilled: Prefilled,
        sampling: &SamplingParams,
        active: &[(SlotId, f32)],
        mut matcher: Option<llguidance::Matcher>,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let Prefilled { prompt_tokens, reused_prompt_tokens, dropped_messages, started } = prefilled;
        let prefill_seconds = started.elapsed().as_secs_f64();
        let mut sampler = LogitsProcessor::new(
            sampling.seed,
            (sampling.temperature > 0.0).then_some(sampling.temperature),
            (sampling.top_p > 0.0 && sampling.top_p < 1.0).then_some(sampling.top_p),
        );

        let mut stream = TokenTextStream::new(&self.tokenizer);
        let mut text = String::new();
        let mut completion_tokens = 0;
        let mut time_to_first_token_seconds = 0.0;
        let mut decode_started = Instant::now();
        let mut answer: Vec<u32> = Vec::new();
        let mut sample = |logits: &Tensor, answer: &[u32], matcher: Option<&mut llguidance::Matcher>| -> Result<u32> {
            let logits = match matcher {
                Some(matcher) => masked(logits, matcher)?,
                None => logits.clone(),
            };
            if sampling.repeat_penalty == 1.0 || answer.is_empty() {
                return Ok(sampler.sample(&logits)?);
            }
            let recent = &answer[answer.len().saturating_sub(REPEAT_WINDOW)..];
            Ok(sampler.sample(&candle_transformers::utils::apply_repeat_penalty(&logits, sampling.repeat_penalty, recent)?)?)
        };
        let mut next = sample(&logits, &answer, matcher.as_mut())?;
        let stop_reason = 'decoding: loop {
            if self.tokenizer.is_stop(next) {
                break StopReason::EndOfTurn;
            }
            // The sampled token, then whatever the constraint forces after it: all of
            // them go through the model in one pass.
            let mut step = vec![next];
            let mut complete = false;
            if let Some(matcher) = matcher.as_mut() {
                matcher.consume_token(next).map_err(|e| EngineError::Constraint(constraint::first_line(&e)))?;
                complete = matcher.is_stopped();
                if !complete {
                    step.extend(matcher.consume_ff_tokens());
                    complete = matcher.is_stopped();
                }
            }
            for &token in &step {
                completion_tokens += 1;
                answer.push(token);
                if completion_tokens == 1 {
                    time_to_first_token_seconds = started.elapsed().as_secs_f64();
                    decode_started = Instant::now();
                }
                if let Some(piece) = stream.push(token)? {
                    text.push_str(&piece);
                    if on_text(&piece).is_break() {
                        break 'decoding StopReason::Cancelled;
                    }
                }
            }
            // A complete constrained output needs nothing more from the model.
            if complete {
                break StopReason::EndOfTurn;
            }
            if completion_tokens >= sampling.max_tokens {
                break StopReason::MaxTokens;
            }
            if self.decoder.cached_tokens() + step.len() > self.decoder.context() {
                break StopReason::ContextFull;
            }
            let logits = self.decoder.forward_last(&step, active)?;
            self.cached_tokens.extend_from_slice(&step);
            next = sample(&logits, &answer, matcher.as_mut())?;
        };
        if let Some(piece) = stream.finish()? {
            text.push_str(&piece);
            let _ = on_text(&piece);
        }
        Ok(Generation {
            text,
            prompt_tokens,
            reused_prompt_tokens,
            completion_tokens,
            dropped_messages,
            stop_reason,
            prefill_seconds,
            time_to_first_token_seconds,
            decode_seconds: if completion_tokens > 1 { decode_started.elapsed().as_secs_f64() } else { 0.0 },
        })
    }
}

/// `logits` with every token the grammar does not allow next set to −∞.
fn masked(logits: &Tensor, matcher: &mut llguidance::Matcher) -> Result<Tensor> {
    let mask = matcher.compute_mask_or_eos().map_err(|e| EngineError::Constraint(constraint::first_line(&e)))?;
    if mask.is_zero() {
        return Err(EngineError::Constraint("no token can continue the output".into()));
    }
    let mut values = logits.to_vec1::<f32>()?;
    for (token, value) in values.iter_mut().enumerate() {
        if !mask.is_allowed(token as u32) {
            *value = f32::NEG_INFINITY;
        }
    }
    Ok(Tensor::from_vec(values, logits.shape(), logits.device())?)
}

/// The prompt's side of a generation, for its statistics.
struct Prefilled {
    prompt_tokens: usize,
    reused_prompt_tokens: usize,
    dropped_messages: usize,
    started: Instant,
}

/// Stands in the cached-token list for positions that hold no token's embedding.
const NOT_A_TOKEN: u32 = u32::MAX;

/// One speed measurement in llama-bench's terms: `prompt_tokens` of prefill
/// from an empty cache ("pp"), and `decode_steps` greedy tokens generated
/// from a one-token context with no stop condition ("tg").
#[derive(Debug, Clone, Serialize)]
pub struct SpeedRun {
    pub prompt_tokens: usize,
    pub decode_steps: usize,
    pub prefill_seconds: f64,
    /// Prefill plus choosing the first token.
    pub time_to_first_token_seconds: f64,
    pub decode_seconds: f64,
}

impl SpeedRun {
    pub fn prefill_tokens_per_second(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_seconds.max(1e-9)
    }
    pub fn decode_tokens_per_second(&self) -> f64 {
        self.decode_steps as f64 / self.decode_seconds.max(1e-9)
    }
}

impl ChatModel {
    pub fn measure_speed(&mut self, prompt_tokens: usize, decode_steps: usize, adapters: &[(String, f32)]) -> Result<SpeedRun> {
        const TEXT: &str = "The quick brown fox jumps over the lazy dog while the committee reviews the quarterly report. ";
        let active = self.active_adapters(adapters)?;
        let context = self.decoder.context();
        if prompt_tokens == 0 || prompt_tokens > context || decode_steps + 1 > context {
            return Err(EngineError::PromptTooLong { prompt_tokens, context, reserved: decode_steps });
        }
        let unit = self.tokenizer.encode(TEXT)?;
        let prompt: Vec<u32> = unit.iter().copied().cycle().take(prompt_tokens).collect();

        self.reset_cache();
        let started = Instant::now();
        let logits = self.decoder.forward_last(&prompt, &active)?;
        let prefill_seconds = started.elapsed().as_secs_f64();
        let mut next = decoder::argmax(&logits)?;
        let time_to_first_token_seconds = started.elapsed().as_secs_f64();

        self.reset_cache();
        self.decoder.forward_last(&prompt[..1], &active)?;
        let decode_started = Instant::now();
        for _ in 0..decode_steps {
            let logits = self.decoder.forward_last(&[next], &active)?;
            next = decoder::argmax(&logits)?;
        }
        let decode_seconds = decode_started.elapsed().as_secs_f64();
        self.reset_cache();
        Ok(SpeedRun { prompt_tokens, decode_steps, prefill_seconds, time_to_first_token_seconds, decode_seconds })
    }
}

fn tokenizer_beside(path: &Path) -> Option<PathBuf> {
    let dir = if path.is_dir() { path } else { path.parent()? };
    let candidate = dir.join("tokenizer.json");
    candidate.is_file().then_some(candidate)
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn parameter_count(c: &DecoderConfig) -> usize {
    let attn = c.hidden_size * c.num_heads * c.head_dim * 2 + c.hidden_size * c.num_kv_heads * c.head_dim * 2;
    let mlp = 3 * c.hidden_size * c.intermediate_size;
    let embed = c.vocab_size * c.hidden_size * if c.tied_embeddings { 1 } else { 2 };
    c.num_layers * (attn + mlp + 2 * c.hidden_size) + embed + c.hidden_size
}

/// llama.cpp's converter reorders the q/k rows of llama checkpoints so that
/// rotary pairs are adjacent; LoRA B factors trained on the Hugging Face
/// layout get the same reordering: (heads, 2, d/2) → (heads, d/2, 2).
fn permute_rows_for_interleaved_rope(b: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let (out, r) = b.dims2()?;
    Ok(b.reshape((heads, 2, head_dim / 2, r))?.transpose(1, 2)?.contiguous()?.reshape((out, r))?)
}
