//! Tokenizers: `tokenizer.json` when the model has one, otherwise a byte-level
//! BPE tokenizer rebuilt from GGUF metadata (the packaged SmolLM2 GGUF ships
//! its vocabulary and merges only there). Also the incremental detokenizer
//! used for streaming.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::json;

use super::error::{EngineError, Result};

/// Strings that end an assistant turn in the chat formats memlora knows.
const END_OF_TURN_TOKENS: &[&str] = &["<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>", "</s>"];

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// Generation stops at any of these.
    pub stop_ids: Vec<u32>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Chat template found beside the tokenizer (tokenizer_config.json or GGUF metadata).
    pub chat_template: Option<String>,
}

impl TextTokenizer {
    /// `tokenizer.json` (with `tokenizer_config.json` beside it when present).
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| EngineError::MissingTokenizer { path: path.to_path_buf(), message: format!("invalid tokenizer.json: {e}") })?;
        let mut bos_token = None;
        let mut eos_token = None;
        let mut chat_template = None;
        if let Some(dir) = path.parent() {
            if let Ok(text) = std::fs::read_to_string(dir.join("tokenizer_config.json")) {
                if let Ok(cfg) = serde_json::from_str::<serde_json::Value>(&text) {
                    bos_token = token_string(&cfg["bos_token"]);
                    eos_token = token_string(&cfg["eos_token"]);
                    chat_template = cfg["chat_template"].as_str().map(str::to_string);
                }
            }
        }
        let mut stop_ids: Vec<u32> = Vec::new();
        if let Some(eos) = &eos_token {
            stop_ids.extend(inner.token_to_id(eos));
        }
        Ok(Self::with_end_of_turn(Self { inner, stop_ids, bos_token, eos_token, chat_template }))
    }

    /// Rebuilds a Hugging Face tokenizer from `tokenizer.ggml.*` metadata.
    pub fn from_gguf(path: &Path, md: &HashMap<String, Value>) -> Result<Self> {
        let missing = |message: String| EngineError::MissingTokenizer { path: path.to_path_buf(), message };
        let model = md.get("tokenizer.ggml.model").and_then(|v| v.to_string().ok()).map(String::as_str);
        match model {
            Some("gpt2") => {}
            Some(other) => {
                return Err(missing(format!("GGUF tokenizer model '{other}' is not supported; put a tokenizer.json beside the model")));
            }
            None => return Err(missing("GGUF metadata has no tokenizer.ggml.model and there is no tokenizer.json".into())),
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            let values = md.get(key).and_then(|v| v.to_vec().ok()).ok_or_else(|| missing(format!("GGUF metadata has no {key}")))?;
            values.iter().map(|v| v.to_string().cloned().map_err(|e| missing(format!("{key}: {e}")))).collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<i32> = md
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.iter().map(|t| t.to_i32().unwrap_or(1)).collect())
            .unwrap_or_default();
        let id_of = |key: &str| md.get(key).and_then(|v| v.to_u32().ok());

        let vocab: serde_json::Map<String, serde_json::Value> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
        // Token types 3 (control) and 4 (user defined) are matched whole, never split.
        let added: Vec<serde_json::Value> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
            .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
            .collect();
        let pre = md.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).map(String::as_str).unwrap_or("default");
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer(pre),
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            }
        });
        let inner: tokenizers::Tokenizer =
            spec.to_string().parse().map_err(|e| missing(format!("cannot build a tokenizer from GGUF metadata: {e}")))?;
        let name_of = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        let eos_id = id_of("tokenizer.ggml.eos_token_id");
        let eot_id = id_of("tokenizer.ggml.eot_token_id");
        let chat_template = md.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();
        Ok(Self::with_end_of_turn(Self {
            inner,
            stop_ids: eos_id.into_iter().chain(eot_id).collect(),
            bos_token: name_of(id_of("tokenizer.ggml.bos_token_id")),
            eos_token: name_of(eos_id),
            chat_template,
        }))
    }

    /// Adds the end-of-turn markers of the chat format the template uses.
    fn with_end_of_turn(mut self) -> Self {
        for marker in END_OF_TURN_TOKENS {
            let used = self.chat_template.as_deref().is_some_and(|t| t.contains(marker)) || self.eos_token.as_deref() == Some(marker);
            if let (true, Some(id)) = (used, self.inner.token_to_id(marker)) {
                if !self.stop_ids.contains(&id) {
                    self.stop_ids.push(id);
                }
            }
        }
        self
    }

    /// Encodes text in which special tokens (`<|im_start|>`) are recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    pub(crate) fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a single token (special ones included).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }
}

fn token_string(v: &serde_json::Value) -> Option<String> {
    v.as_str().map(str::to_string).or_else(|| v["content"].as_str().map(str::to_string))
}

/// The pre-tokenizer llama.cpp associates with `tokenizer.ggml.pre`.
fn pre_tokenizer(pre: &str) -> serde_json::Value {
    let byte_level =
        |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            byte_level(false),
        ]})
    };
    match pre {
        // SmolLM / StarCoder: every digit on its own, then GPT-2 splitting.
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true),
        ]}),
        "qwen2" => split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
        "llama-bpe" | "llama3" => {
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
        }
        _ => byte_level(true),
    }
}

/// Turns a stream of token ids into text pieces, holding back bytes that do
/// not yet form a whole UTF-8 character. Only the tokens since the last
/// emitted piece are decoded each step.
pub struct TokenTextStream<'a> {
    tokenizer: &'a TextTokenizer,
    tokens: Vec<u32>,
    /// Start of the window decoded each step and end of what was emitted.
    window_start: usize,
    emitted_end: usize,
}

impl<'a> TokenTextStream<'a> {
    pub fn new(tokenizer: &'a TextTokenizer) -> Self {
        Self { tokenizer, tokens: Vec::new(), window_start: 0, emitted_end: 0 }
    }

    /// Returns the new text that `token` completes, if any.
    pub fn push(&mut self, token: u32) -> Result<Option<String>> {
        let before = self.tokenizer.decode(&self.tokens[self.window_start..self.emitted_end])?;
        self.tokens.push(token);
        let text = self.tokenizer.decode(&self.tokens[self.window_start..])?;
        if text.len() > before.len() && !text.ends_with('\u{fffd}') && text.is_char_boundary(before.len()) {
            self.window_start = self.emitted_end;
            self.emitted_end = self.tokens.len();
            return Ok(Some(text[before.len()..].to_string()));
        }
        Ok(None)
    }

    /// Whatever is still held back at the end of generation.
    pub fn finish(&mut self) -> Result<Option<String>> {
        let before = self.tokenizer.decode(&self.tokens[self.window_start..self.emitted_end])?;
        let text = self.tokenizer.decode(&self.tokens[self.window_start..])?;
        self.window_start = self.emitted_end;
        self.emitted_end = self.tokens.len();
        if text.len() > before.len() && text.is_char_boundary(before.len()) {
            return Ok(Some(text[before.len()..].to_string()));
        }
        Ok(None)
    }
}
