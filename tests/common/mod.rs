//! Tiny random models written to disk in the formats memlora loads (GGUF with
//! llama.cpp names and tokenizer metadata; safetensors directories with
//! Hugging Face names, config.json and tokenizer.json), so tests exercise the
//! real loading code without downloading anything.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::bert::{BertModel, Config};
use rand::{Rng, SeedableRng};
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
}

#[derive(Debug, Clone, Copy)]
pub struct TinySpec {
    pub arch: Arch,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub tied: bool,
}

impl TinySpec {
    pub fn llama() -> Self {
        Self { arch: Arch::Llama, hidden: 64, intermediate: 128, layers: 2, heads: 4, kv_heads: 2, tied: true }
    }
    pub fn qwen2() -> Self {
        Self { arch: Arch::Qwen2, tied: false, ..Self::llama() }
    }
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A byte-level BPE vocabulary: the 256 byte symbols, a few merges, then the
/// special tokens.
pub struct TinyVocab {
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
}

impl TinyVocab {
    pub fn new() -> Self {
        let mut tokens: Vec<String> = byte_symbols();
        let mut merges = Vec::new();
        for pair in [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġ", "c")] {
            merges.push(format!("{} {}", pair.0, pair.1));
            tokens.push(format!("{}{}", pair.0, pair.1));
        }
        tokens.extend(SPECIALS.iter().map(|s| s.to_string()));
        Self { tokens, merges }
    }
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn id(&self, token: &str) -> u32 {
        self.tokens.iter().position(|t| t == token).expect("token in vocab") as u32
    }

    pub fn tokenizer_json(&self) -> serde_json::Value {
        let vocab: serde_json::Map<String, serde_json::Value> =
            self.tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
        let added: Vec<_> = SPECIALS
            .iter()
            .map(|s| json!({"id": self.id(s), "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
            .collect();
        json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": self.merges}
        })
    }
}

/// GPT-2's reversible byte → printable character mapping.
fn byte_symbols() -> Vec<String> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    let mut by_byte: Vec<(u32, u32)> = printable.into_iter().zip(chars).collect();
    by_byte.sort();
    by_byte.into_iter().map(|(_, c)| char::from_u32(c).unwrap().to_string()).collect()
}

/// Random f32 weights under Hugging Face names.
#[derive(Clone)]
pub struct TinyModel {
    pub spec: TinySpec,
    pub vocab_size: usize,
    pub tensors: BTreeMap<String, Tensor>,
}

pub const PROJECTIONS: [(&str, &str); 7] = [
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
];

impl TinyModel {
    pub fn random(spec: TinySpec, seed: u64) -> Self {
        let vocab_size = TinyVocab::new().len();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut t = |shape: (usize, usize), bound: f32| {
            let data: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.random_range(-bound..bound)).collect();
            Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
        };
        let (h, ff, hd) = (spec.hidden, spec.intermediate, spec.head_dim());
        let mut tensors = BTreeMap::new();
        tensors.insert("model.embed_tokens.weight".to_string(), t((vocab_size, h), 1.0));
        if !spec.tied {
            tensors.insert("lm_head.weight".to_string(), t((vocab_size, h), 0.2));
        }
        let norm = |rng_t: &mut dyn FnMut((usize, usize), f32) -> Tensor| (rng_t((1, h), 0.2).squeeze(0).unwrap() + 1.0).unwrap();
        tensors.insert("model.norm.weight".to_string(), norm(&mut t));
        for i in 0..spec.layers {
            let p = format!("model.layers.{i}");
            let shapes =
                [(spec.heads * hd, h), (spec.kv_heads * hd, h), (spec.kv_heads * hd, h), (h, spec.heads * hd), (ff, h), (ff, h), (h, ff)];
            for ((block, module), shape) in PROJECTIONS.iter().zip(shapes) {
                tensors.insert(format!("{p}.{block}.{module}.weight"), t(shape, 1.0 / (shape.1 as f32).sqrt()));
            }
            if spec.arch == Arch::Qwen2 {
                for (module, out) in [("q_proj", spec.heads * hd), ("k_proj", spec.kv_heads * hd), ("v_proj", spec.kv_heads * hd)] {
                    tensors.insert(format!("{p}.self_attn.{module}.bias"), t((1, out), 0.1).squeeze(0).unwrap());
                }
            }
            tensors.insert(format!("{p}.input_layernorm.weight"), norm(&mut t));
            tensors.insert(format!("{p}.post_attention_layernorm.weight"), norm(&mut t));
        }
        Self { spec, vocab_size, tensors }
    }

    /// The same model with `delta` added to one weight.
    pub fn with_added(&self, name: &str, delta: &Tensor) -> Self {
        let mut out = self.clone();
        let w = out.tensors.get(name).unwrap_or_else(|| panic!("no tensor {name}"));
        let sum = (w + delta).unwrap();
        out.tensors.insert(name.to_string(), sum);
        out
    }

    fn arch_name(&self) -> &'static str {
        match self.spec.arch {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }

    /// `dir/config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`.
    pub fn write_safetensors(&self, dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let s = &self.spec;
        let architectures = match s.arch {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        };
        let config = json!({
            "architectures": [architectures], "model_type": self.arch_name(), "vocab_size": self.vocab_size,
            "hidden_size": s.hidden, "intermediate_size": s.intermediate, "num_hidden_layers": s.layers,
            "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": s.tied,
        });
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let tensors: std::collections::HashMap<String, Tensor> = self.tensors.clone().into_iter().collect();
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
        std::fs::write(dir.join("tokenizer.json"), TinyVocab::new().tokenizer_json().to_string()).unwrap();
        let tokenizer_config = json!({"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": null});
        std::fs::write(dir.join("tokenizer_config.json"), tokenizer_config.to_string()).unwrap();
        dir.to_path_buf()
    }

    /// A GGUF file as llama.cpp's converter writes it: llama.cpp names, q/k
    /// rows of llama models permuted for interleaved rotary pairs, tokenizer
    /// and chat template in the metadata.
    pub fn write_gguf(&self, path: &Path, dtype: GgmlDType) -> PathBuf {
        self.write_gguf_with(path, dtype, self.arch_name(), true)
    }

    pub fn write_gguf_with(&self, path: &Path, dtype: GgmlDType, arch: &str, with_tokenizer: bool) -> PathBuf {
        let s = &self.spec;
        let vocab = TinyVocab::new();
        let u32v = |v: usize| gguf_file::Value::U32(v as u32);
        let mut md: Vec<(String, gguf_file::Value)> = vec![
            ("general.architecture".into(), gguf_file::Value::String(arch.into())),
            ("general.name".into(), gguf_file::Value::String("tiny".into())),
            (format!("{arch}.block_count"), u32v(s.layers)),
            (format!("{arch}.context_length"), u32v(512)),
            (format!("{arch}.embedding_length"), u32v(s.hidden)),
            (format!("{arch}.feed_forward_length"), u32v(s.intermediate)),
            (format!("{arch}.attention.head_count"), u32v(s.heads)),
            (format!("{arch}.attention.head_count_kv"), u32v(s.kv_heads)),
            (format!("{arch}.rope.freq_base"), gguf_file::Value::F32(10000.0)),
            (format!("{arch}.attention.layer_norm_rms_epsilon"), gguf_file::Value::F32(1e-5)),
        ];
        if with_tokenizer {
            let strings = |v: &[String]| gguf_file::Value::Array(v.iter().map(|s| gguf_file::Value::String(s.clone())).collect());
            let types = vocab.tokens.iter().map(|t| gguf_file::Value::I32(if SPECIALS.contains(&t.as_str()) { 3 } else { 1 })).collect();
            md.extend([
                ("tokenizer.ggml.model".to_string(), gguf_file::Value::String("gpt2".into())),
                ("tokenizer.ggml.pre".to_string(), gguf_file::Value::String("smollm".into())),
                ("tokenizer.ggml.tokens".to_string(), strings(&vocab.tokens)),
                ("tokenizer.ggml.merges".to_string(), strings(&vocab.merges)),
                ("tokenizer.ggml.token_type".to_string(), gguf_file::Value::Array(types)),
                ("tokenizer.ggml.bos_token_id".to_string(), u32v(vocab.id("<|im_start|>") as usize)),
                ("tokenizer.ggml.eos_token_id".to_string(), u32v(vocab.id("<|im_end|>") as usize)),
                ("tokenizer.chat_template".to_string(), gguf_file::Value::String(CHATML.into())),
            ]);
        }
        let mut qtensors: Vec<(String, QTensor)> = Vec::new();
        for (name, t) in &self.tensors {
            let mut t = t.clone();
            if s.arch == Arch::Llama && name.ends_with("q_proj.weight") {
                t = permute_for_interleaved_rope(&t, s.heads);
            } else if s.arch == Arch::Llama && name.ends_with("k_proj.weight") {
                t = permute_for_interleaved_rope(&t, s.kv_heads);
            }
            let is_matrix = t.rank() == 2;
            let q = if is_matrix { QTensor::quantize(&t, dtype).unwrap() } else { QTensor::quantize(&t, GgmlDType::F32).unwrap() };
            qtensors.push((gguf_name(name), q));
        }
        let mut file = std::fs::File::create(path).unwrap();
        let md_refs: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut file, &md_refs, &t_refs).unwrap();
        path.to_path_buf()
    }
}

/// convert_hf_to_gguf.py's `permute`: rows (heads, 2, d/2) → (heads, d/2, 2).
pub fn permute_for_interleaved_rope(w: &Tensor, heads: usize) -> Tensor {
    let (out, cols) = w.dims2().unwrap();
    w.reshape((heads, 2, out / heads / 2, cols)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap().reshape((out, cols)).unwrap()
}

fn gguf_name(hf: &str) -> String {
    let direct = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = direct.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").expect("layer tensor");
    let (layer, rest) = rest.split_once('.').unwrap();
    let mapped = match rest {
        "input_layernorm.weight" => "attn_norm.weight".to_string(),
        "post_attention_layernorm.weight" => "ffn_norm.weight".to_string(),
        other => {
            let (module, kind) = other.rsplit_once('.').unwrap();
            let module = module.rsplit('.').next().unwrap();
            let g = match module {
                "q_proj" => "attn_q",
                "k_proj" => "attn_k",
                "v_proj" => "attn_v",
                "o_proj" => "attn_output",
                "gate_proj" => "ffn_gate",
                "up_proj" => "ffn_up",
                "down_proj" => "ffn_down",
                m => panic!("unknown module {m}"),
            };
            format!("{g}.{kind}")
        }
    };
    format!("blk.{layer}.{mapped}")
}

pub const BERT_WORDS: [&str; 12] = ["the", "cat", "sat", "on", "mat", "kitten", "revenue", "grew", "a", "dog", "quarterly", "report"];

/// A tiny random BERT sentence embedder (32 dimensions, a 12-word vocabulary) in the
/// layout of all-minilm-l6-v2's directory.
pub fn write_tiny_bert(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let config = json!({
        "vocab_size": 4 + BERT_WORDS.len(), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "max_position_embeddings": 64,
        "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0, "model_type": "bert"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    // Build the model through candle's own BERT so tensor names are the real ones.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let cfg: Config = serde_json::from_value(config).unwrap();
    BertModel::load(vb, &cfg).unwrap();
    // candle initialises from an unseeded generator; the same weights every run keep tests
    // that compare embeddings from depending on the draw. Random tensors keep their spread,
    // constant ones (norms, biases) stay as they are.
    let mut names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
    names.sort();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xbe27);
    for name in names {
        let var = varmap.data().lock().unwrap()[&name].clone();
        let values = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mean = values.iter().sum::<f32>() / values.len() as f32;
        let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / values.len() as f32).sqrt();
        if std == 0.0 {
            continue;
        }
        let bound = std * 3f32.sqrt();
        let seeded: Vec<f32> = values.iter().map(|_| mean + rng.random_range(-bound..bound)).collect();
        var.set(&Tensor::from_vec(seeded, var.as_tensor().shape(), &Device::Cpu).unwrap()).unwrap();
    }
    varmap.save(dir.join("model.safetensors")).unwrap();

    let mut vocab = serde_json::Map::new();
    for (i, w) in ["[PAD]", "[UNK]", "[CLS]", "[SEP]"].iter().chain(BERT_WORDS.iter()).enumerate() {
        vocab.insert(w.to_string(), json!(i));
    }
    let added: Vec<_> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]}, "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": vocab}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap()
}

/// Where the real models are, when the test script has pulled them.
pub fn real_models_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("MEMLORA_MODELS_DIR") {
        return Some(PathBuf::from(dir));
    }
    directories::ProjectDirs::from("", "", "memlora").map(|d| d.cache_dir().join("models"))
}

/// Real-model tests skip when the models are absent, unless the test script
/// said they are required (it pulls them first).
pub fn require_real_models() -> bool {
    std::env::var("MEMLORA_REQUIRE_REAL_MODELS").is_ok_and(|v| v == "1")
}

/// The model cache holding both real models, or `None` (the test skips) when they are
/// absent and not required.
pub fn real_models() -> Option<PathBuf> {
    let dir = real_models_dir()?;
    let catalog = memlora::models::Catalog::builtin().expect("builtin manifests parse");
    let cache = memlora::models::ModelCache::new(dir.clone());
    let present =
        ["smollm2-135m-instruct", "all-minilm-l6-v2"].iter().all(|name| catalog.get(name).and_then(|m| cache.resolve(m)).is_some());
    if !present {
        assert!(!require_real_models(), "the real models are required but not in {}; run scripts/test", dir.display());
        eprintln!("skipping: the real models are not in {}", dir.display());
        return None;
    }
    Some(dir)
}

/// The memlora binary on `data_dir` with the real models of `models` (see [`real_models`]),
/// offline, running `args`.
pub fn real_memlora_command(data_dir: &Path, models: &Path, args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_memlora"));
    command
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--models-dir")
        .arg(models)
        .args(args)
        .env_remove("MEMLORA_DATA_DIR")
        .env_remove("MEMLORA_MODELS_DIR")
        .env("HF_HUB_OFFLINE", "1");
    command
}

/// The memlora binary on `data_dir` with a tiny random sentence embedder (so that
/// commands with memory run without the real models), its own model cache, and no hub.
pub fn memlora_command(data_dir: &Path) -> std::process::Command {
    let embedder = data_dir.join("tiny-bert");
    if !embedder.exists() {
        write_tiny_bert(&embedder);
    }
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_memlora"));
    command
        .env("MEMLORA_EMBEDDER", &embedder)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--models-dir")
        .arg(data_dir.join("models-cache"))
        .env_remove("MEMLORA_DATA_DIR")
        .env_remove("MEMLORA_MODELS_DIR")
        // The bundled experts are for the default model; these tests run tiny ones
        // (tests/real_models.rs and tests/memory.rs run the experts).
        .env("MEMLORA_ADAPTERS__BUNDLED", "false")
        // No hub here and none wanted in tests: fail fast, never hang.
        .env("HF_HUB_OFFLINE", "1");
    command
}

pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Fails unless the command failed with exactly one line that names every needle.
pub fn assert_one_line_error(out: &std::process::Output, needles: &[&str]) {
    let err = stderr(out);
    assert!(!out.status.success(), "expected failure, got success; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
    for needle in needles {
        assert!(lines[0].contains(needle), "error line lacks '{needle}': {}", lines[0]);
    }
}

/// Runs a [`memlora_command`] that must succeed and returns its stdout parsed as JSON.
pub fn json_of(data_dir: &Path, args: &[&str]) -> serde_json::Value {
    let out = memlora_command(data_dir).args(args).output().expect("run memlora");
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// A tiny random SmolVLM (Idefics3) checkpoint directory, written by the library's own
/// writer with the real tensor names: 32×32 images, 4 image tokens, a 2-layer decoder.
pub fn write_tiny_smolvlm(dir: &Path, seed: u64) -> PathBuf {
    memlora::engine::vision::write_random_checkpoint(dir, &memlora::engine::vision::SmolVlmShape::TINY, seed).unwrap();
    dir.to_path_buf()
}

/// A file of the malformed-input corpus (`tests/corpus/malformed/`).
pub fn malformed(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/malformed").join(name)
}

/// Every file and directory below `dir` (not `dir` itself), with its metadata
/// (symlinks not followed).
pub fn entries_under(dir: &Path) -> Vec<(PathBuf, std::fs::Metadata)> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let meta = std::fs::symlink_metadata(entry.path()).unwrap();
            if meta.is_dir() {
                pending.push(entry.path());
            }
            found.push((entry.path(), meta));
        }
    }
    found
}
