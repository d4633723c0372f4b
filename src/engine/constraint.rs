//! Constrained decoding: a JSON schema, compiled by llguidance against the model's
//! vocabulary, masks at every step the tokens that cannot continue a value of the schema.
//! The memory operations use it so that what they write always parses, whatever the
//! model or adapter; the text the grammar forces (keys, separators) is fed to the model
//! in one pass instead of being decoded token by token.

use std::collections::HashMap;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory, TokenParser};

use super::error::{EngineError, Result};
use super::tokenizer::TextTokenizer;

/// What a generation's output must be.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputConstraint {
    /// One JSON value of this schema (the JSON Schema subset llguidance supports; its
    /// `x-guidance` options set separators and whitespace).
    JsonSchema(serde_json::Value),
}

impl OutputConstraint {
    fn key(&self) -> String {
        match self {
            OutputConstraint::JsonSchema(schema) => schema.to_string(),
        }
    }
}

/// Compiled grammars kept per schema: the memory operations ask for the same few again
/// and again, and compiling one costs more than a decoding step.
const COMPILED_KEPT: usize = 32;

/// The grammar engine for one tokenizer.
pub(crate) struct Grammars {
    factory: ParserFactory,
    compiled: HashMap<String, TokenParser>,
}

impl Grammars {
    /// `vocab_size` is the model's (its logits' width), which may exceed the tokenizer's.
    pub fn new(tokenizer: &TextTokenizer, vocab_size: usize) -> Result<Grammars> {
        let env: TokEnv = Arc::new(GrammarTokenizer::new(tokenizer, vocab_size)?);
        let caps = InferenceCapabilities { ff_tokens: true, ..InferenceCapabilities::default() };
        let mut factory = ParserFactory::new(&env, caps, &llguidance::earley::SlicedBiasComputer::json_slices())
            .map_err(|e| EngineError::Constraint(format!("cannot prepare the vocabulary: {}", first_line(&e))))?;
        // Its diagnostics go to stderr otherwise; errors reach us as results.
        factory.set_stderr_log_level(0);
        Ok(Grammars { factory, compiled: HashMap::new() })
    }

    /// A fresh matcher for `constraint`, at the start of the output.
    pub fn matcher(&mut self, constraint: &OutputConstraint) -> Result<Matcher> {
        let key = constraint.key();
        if !self.compiled.contains_key(&key) {
            let grammar = match constraint {
                OutputConstraint::JsonSchema(schema) => TopLevelGrammar::from_json_schema(schema.clone()),
            };
            let parser = self
                .factory
                .create_parser(grammar)
                .map_err(|e| EngineError::Constraint(format!("invalid JSON schema: {}", first_line(&e))))?;
            if self.compiled.len() >= COMPILED_KEPT {
                self.compiled.clear();
            }
            self.compiled.insert(key.clone(), parser);
        }
        Ok(Matcher::new(Ok(self.compiled[&key].clone())))
    }
}

/// llguidance's errors carry the parser's state over many lines; ours are one line.
pub(crate) fn first_line(error: &impl std::fmt::Display) -> String {
    error.to_string().lines().next().unwrap_or_default().trim().to_owned()
}

/// The model's vocabulary as llguidance reads it: each token's bytes, special tokens
/// marked, and the model's own tokenizer for the text a grammar forces.
struct GrammarTokenizer {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl GrammarTokenizer {
    fn new(tokenizer: &TextTokenizer, vocab_size: usize) -> Result<GrammarTokenizer> {
        let failed = |message: String| EngineError::Constraint(format!("cannot read the tokenizer's vocabulary: {message}"));
        let inner = tokenizer.inner();
        let spec: serde_json::Value =
            serde_json::from_str(&inner.to_string(false).map_err(|e| failed(e.to_string()))?).map_err(|e| failed(e.to_string()))?;
        let decode = TokenBytes::of_decoder(&spec["decoder"])
            .ok_or_else(|| failed(format!("decoder {} is not supported", spec["decoder"]["type"])))?;
        let specials: HashMap<u32, String> =
            inner.get_added_tokens_decoder().into_iter().filter(|(_, t)| t.special).map(|(id, t)| (id, t.content)).collect();
        let size = vocab_size.max(tokenizer.vocab_size());
        let mut words = vec![Vec::new(); size];
        for (text, id) in inner.get_vocab(true) {
            let Some(word) = words.get_mut(id as usize) else { continue };
            let bytes = match specials.get(&id) {
                Some(content) => [&[TokTrie::SPECIAL_TOKEN_MARKER][..], content.as_bytes()].concat(),
                None => decode.bytes(&text),
            };
            // The trie stores lengths in a byte; a longer token is left out (never allowed).
            if bytes.len() < 256 {
                *word = bytes;
            }
        }
        let stops: Vec<TokenId> = tokenizer.stop_ids.iter().copied().filter(|&id| (id as usize) < size).collect();
        let Some(&eos) = stops.first() else { return Err(failed("the tokenizer has no end-of-turn token".into())) };
        let info = TokRxInfo::new(size as u32, eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&stops);
        Ok(GrammarTokenizer { trie, tokenizer: inner.clone() })
    }
}

impl TokenizerEnv for GrammarTokenizer {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // Forced text is tokenized as the model's tokenizer would, so that forced tokens
        // are the ones the model saw in training; bytes that are not UTF-8 fall back to the
        // longest-match tokenization.
        match std::str::from_utf8(s).ok().and_then(|text| self.tokenizer.encode(text, false).ok()) {
            Some(encoding) => encoding.get_ids().to_vec(),
            None => self.trie.greedy_tokenize(s),
        }
    }

    fn tokenize_is_canonical(&self) -> bool {
        true
    }
}

/// How a tokenizer writes bytes into its vocabulary strings.
enum TokenBytes {
    /// GPT-2's byte-to-character table (SmolLM, Llama 3, Qwen2).
    ByteLevel(HashMap<char, u8>),
    /// SentencePiece: `<0xNN>` byte tokens, `▁` (or the decoder's replacement) for a space.
    ByteFallback(char),
}

impl TokenBytes {
    fn of_decoder(decoder: &serde_json::Value) -> Option<TokenBytes> {
        match decoder["type"].as_str()? {
            "ByteLevel" => Some(TokenBytes::ByteLevel(gpt2_byte_chars())),
            "Sequence" => {
                let decoders = decoder["decoders"].as_array()?;
                decoders.iter().any(|d| d["type"] == "ByteFallback").then(|| {
                    let space = decoders
                        .iter()
                        .filter(|d| d["type"] == "Replace" && d["content"] == " ")
                        .find_map(|d| d["pattern"]["String"].as_str().and_then(|s| s.chars().next()))
                        .unwrap_or('▁');
                    TokenBytes::ByteFallback(space)
                })
            }
            _ => None,
        }
    }

    fn bytes(&self, text: &str) -> Vec<u8> {
        match self {
            // A character outside the table cannot be produced by the byte-level
            // pre-tokenizer: such a token is never needed, and left empty.
            TokenBytes::ByteLevel(table) => text.chars().map(|c| table.get(&c).copied()).collect::<Option<Vec<u8>>>().unwrap_or_default(),
            TokenBytes::ByteFallback(space) => {
                let hex = text.strip_prefix("<0x").and_then(|rest| rest.strip_suffix('>')).filter(|h| h.len() == 2);
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => vec![byte],
                    None => text.replace(*space, " ").into_bytes(),
                }
            }
        }
    }
}

/// GPT-2's `bytes_to_unicode`: printable bytes stand for themselves, the others are
/// shifted past U+0100, in order.
fn gpt2_byte_chars() -> HashMap<char, u8> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut shifted = 0u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                char::from(b)
            } else {
                shifted += 1;
                char::from_u32(255 + shifted).unwrap_or(char::REPLACEMENT_CHARACTER)
            };
            (c, b)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gpt2_table_maps_every_byte_once() {
        let table = gpt2_byte_chars();
        assert_eq!(table.len(), 256);
        assert_eq!(table[&'Ġ'], b' ');
        assert_eq!(table[&'Ċ'], b'\n');
        assert_eq!(table[&'a'], b'a');
    }

    #[test]
    fn byte_fallback_tokens_become_their_bytes() {
        let decode = TokenBytes::ByteFallback('▁');
        assert_eq!(decode.bytes("<0x0A>"), vec![b'\n']);
        assert_eq!(decode.bytes("▁the"), b" the".to_vec());
        assert_eq!(decode.bytes("<0xZZ>"), b"<0xZZ>".to_vec());
    }
}
