//! Reading decoder checkpoints: GGUF (quantized, llama.cpp names) and
//! safetensors directories (Hugging Face names). Both are presented under the
//! Hugging Face tensor names, with the model's hyper-parameters in one
//! [`DecoderConfig`].

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::error::{bad_file, EngineError, Result};

/// Supported decoder families. They share one implementation; Qwen2 adds
/// biases on the q/k/v projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
}

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
        }
    }
}

/// How rotary embeddings pair up the dimensions of a head. llama.cpp's
/// converter permutes the q/k rows of llama checkpoints so that adjacent
/// dimensions form the pairs; Hugging Face checkpoints pair dimension i with
/// i + d/2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    Interleaved,
    Halves,
}

#[derive(Debug, Clone)]
pub struct DecoderConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_layout: RopeLayout,
    /// Llama 3 style per-frequency divisors (from `rope_scaling` or GGUF `rope_freqs`).
    pub rope_freq_factors: Option<Vec<f32>>,
    pub max_position: usize,
    pub tied_embeddings: bool,
}

impl DecoderConfig {
    /// `(out_features, in_features)` of a projection.
    pub fn linear_shape(&self, module: super::TargetModule) -> (usize, usize) {
        use super::TargetModule as M;
        let (h, q, kv, ff) = (self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.intermediate_size);
        match module {
            M::Q => (q, h),
            M::K | M::V => (kv, h),
            M::O => (h, q),
            M::Gate | M::Up => (ff, h),
            M::Down => (h, ff),
        }
    }
}

/// What the weights of a linear layer are stored as after loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// Keep formats that have fast CPU kernels, convert the others to Q8_0.
    Auto,
    Keep,
    Q8_0,
    Q4_0,
    F16,
    F32,
}

impl std::str::FromStr for WeightFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "auto" => Self::Auto,
            "keep" => Self::Keep,
            "q8_0" => Self::Q8_0,
            "q4_0" => Self::Q4_0,
            "f16" => Self::F16,
            "f32" => Self::F32,
            other => return Err(format!("unknown weight format '{other}' (auto, keep, q8_0, q4_0, f16, f32)")),
        })
    }
}

impl WeightFormat {
    fn target(self, stored: GgmlDType) -> GgmlDType {
        match self {
            Self::Keep => stored,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::F16 => GgmlDType::F16,
            Self::F32 => GgmlDType::F32,
            // Q4_0/Q4_1/Q8_0 have kernels in `quant`, the k-quants and floats in candle.
            Self::Auto => match stored {
                GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q8_1 => GgmlDType::Q8_0,
                other => other,
            },
        }
    }
}

/// A checkpoint opened for reading, tensors addressed by Hugging Face name.
pub struct Checkpoint {
    pub path: PathBuf,
    pub config: DecoderConfig,
    /// GGUF metadata, kept for the tokenizer and chat template.
    pub gguf_metadata: Option<HashMap<String, gguf_file::Value>>,
    source: TensorSource,
    format: WeightFormat,
}

enum TensorSource {
    Gguf {
        content: gguf_file::Content,
        reader: BufReader<File>,
        names: HashMap<String, String>,
    },
    /// `text_prefix`: where a vision-language checkpoint keeps its decoder's `model.*`
    /// tensors (Idefics3: `model.text_model.*`).
    Safetensors {
        files: candle_core::safetensors::MmapedSafetensors,
        text_prefix: Option<&'static str>,
    },
}

/// Where an Idefics3 (SmolVLM) checkpoint keeps the tensors that a plain decoder names
/// `model.*`.
const IDEFICS3_TEXT_PREFIX: &str = "model.text_model.";

/// The stored name of decoder tensor `name`.
fn stored_name<'a>(name: &'a str, text_prefix: Option<&str>) -> std::borrow::Cow<'a, str> {
    match (text_prefix, name.strip_prefix("model.")) {
        (Some(prefix), Some(rest)) => format!("{prefix}{rest}").into(),
        _ => name.into(),
    }
}

impl Checkpoint {
    /// Opens a `.gguf` file, or a directory holding `config.json` and
    /// `model.safetensors` (or `*.gguf`), or a `.safetensors` file beside its `config.json`.
    pub fn open(path: &Path, format: WeightFormat) -> Result<Self> {
        if path.is_dir() {
            if path.join("config.json").is_file() {
                return Self::open_safetensors_dir(path, format);
            }
            let gguf = first_with_extension(path, "gguf")
                .ok_or_else(|| bad_file(path, "directory has neither config.json + *.safetensors nor a *.gguf file"))?;
            return Self::open_gguf(&gguf, format);
        }
        match path.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => {
                let dir = path.parent().unwrap_or(Path::new("."));
                Self::open_safetensors_dir(dir, format)
            }
            _ if path.is_file() => Self::open_gguf(path, format),
            _ => Err(bad_file(path, "no such file or directory")),
        }
    }

    fn open_gguf(path: &Path, format: WeightFormat) -> Result<Self> {
        let file = File::open(path).map_err(|e| bad_file(path, e))?;
        let file_len = file.metadata().map_err(|e| bad_file(path, e))?.len();
        let mut reader = BufReader::new(file);
        let (content, config) = read_gguf_header(&mut reader, file_len, path)?;
        let names = gguf_names(config.num_layers);
        let metadata = content.metadata.clone();
        Ok(Self {
            path: path.to_path_buf(),
            config,
            gguf_metadata: Some(metadata),
            source: TensorSource::Gguf { content, reader, names },
            format,
        })
    }

    fn open_safetensors_dir(dir: &Path, format: WeightFormat) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| bad_file(&config_path, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad_file(&config_path, format!("invalid config.json: {e}")))?;
        // A vision-language checkpoint: the decoder is described by `text_config`.
        let (json, text_prefix) = match json.get("text_config") {
            Some(text_config) => (text_config.clone(), Some(IDEFICS3_TEXT_PREFIX)),
            None => (json, None),
        };
        let hf: HfConfig = serde_json::from_value(json).map_err(|e| bad_file(&config_path, format!("invalid config.json: {e}")))?;
        let config = hf.into_decoder_config(&config_path)?;
        let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| bad_file(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("adapter_")))
            .collect();
        shards.sort();
        if shards.is_empty() {
            return Err(bad_file(dir, "no *.safetensors weights beside config.json"));
        }
        // SAFETY: the files are memory-mapped read-only; memlora never writes
        // model files while a model is loaded.
        let files = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&shards) }
            .map_err(|e| bad_file(&shards[0], format!("invalid safetensors: {e}")))?;
        Ok(Self { path: dir.to_path_buf(), config, gguf_metadata: None, source: TensorSource::Safetensors { files, text_prefix }, format })
    }

    pub fn is_gguf(&self) -> bool {
        matches!(self.source, TensorSource::Gguf { .. })
    }

    pub fn has(&self, name: &str) -> bool {
        match &self.source {
            TensorSource::Gguf { content, names, .. } => names.get(name).is_some_and(|g| content.tensor_infos.contains_key(g)),
            TensorSource::Safetensors { files, text_prefix } => files.get(&stored_name(name, *text_prefix)).is_ok(),
        }
    }

    /// A tensor as f32 (norms, biases, rope factors).
    pub fn dense(&mut self, name: &str, device: &Device) -> Result<Tensor> {
        let path = self.path.clone();
        let t = match &mut self.source {
            TensorSource::Gguf { .. } => self.quantized_raw(name, device)?.dequantize(device)?,
            TensorSource::Safetensors { files, text_prefix } => {
                let name = stored_name(name, *text_prefix);
                files.load(&name, device).map_err(|e| bad_file(&path, format!("tensor {name}: {e}")))?.to_dtype(DType::F32)?
            }
        };
        Ok(t)
    }

    /// The weight of a linear layer, `(out, in)`, in the configured format.
    pub fn linear_weight(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        let q = match &self.source {
            TensorSource::Gguf { .. } => {
                let raw = self.quantized_raw(name, device)?;
                let target = self.format.target(raw.dtype());
                if target == raw.dtype() {
                    raw
                } else {
                    requantize(&raw, target, device)?
                }
            }
            TensorSource::Safetensors { .. } => {
                let dense = self.dense(name, device)?;
                let target = match self.format {
                    WeightFormat::Auto | WeightFormat::Keep | WeightFormat::F32 => GgmlDType::F32,
                    other => other.target(GgmlDType::F32),
                };
                quantize_checked(&dense, target)?
            }
        };
        Ok(q)
    }

    fn quantized_raw(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        let path = self.path.clone();
        match &mut self.source {
            TensorSource::Gguf { content, reader, names } => {
                let gguf_name = names.get(name).ok_or_else(|| bad_file(&path, format!("no GGUF name for tensor {name}")))?;
                content.tensor(reader, gguf_name, device).map_err(|e| bad_file(&path, format!("tensor {gguf_name}: {e}")))
            }
            TensorSource::Safetensors { .. } => {
                let dense = self.dense(name, device)?;
                Ok(QTensor::quantize(&dense, GgmlDType::F32)?)
            }
        }
    }
}

/// Block quantizations need the input dimension to be a multiple of the block
/// size; fall back to f32 for odd shapes rather than failing.
fn quantize_checked(dense: &Tensor, target: GgmlDType) -> Result<QTensor> {
    let cols = dense.dims().last().copied().unwrap_or(0);
    let target = if cols % target.block_size() == 0 { target } else { GgmlDType::F32 };
    Ok(QTensor::quantize(dense, target)?)
}

fn requantize(raw: &QTensor, target: GgmlDType, device: &Device) -> Result<QTensor> {
    let dense = raw.dequantize(device)?;
    quantize_checked(&dense, target)
}

fn first_with_extension(dir: &Path, ext: &str) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> =
        std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == ext)).collect();
    found.sort();
    found.into_iter().next()
}

/// A truncated download is the most common corrupt model: say so up front
/// instead of failing on whichever tensor happens to be read first.
/// Reads a GGUF file's header from `reader` (a file of `file_len` bytes named `path`):
/// the magic, the metadata and tensor table, a check that every tensor lies inside the
/// file, and the decoder configuration. Every failure is one line naming `path`.
pub fn read_gguf_header<R: Read + std::io::Seek>(
    reader: &mut R,
    file_len: u64,
    path: &Path,
) -> Result<(gguf_file::Content, DecoderConfig)> {
    let mut magic = [0u8; 4];
    if reader.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
        return Err(bad_file(path, "not a GGUF file (bad magic; expected 'GGUF')"));
    }
    reader.rewind().map_err(|e| bad_file(path, e))?;
    let content = gguf_file::Content::read(reader).map_err(|e| bad_file(path, format!("corrupt or truncated GGUF header: {e}")))?;
    check_gguf_length(path, file_len, &content)?;
    let config = gguf_config(path, &content)?;
    Ok((content, config))
}

fn check_gguf_length(path: &Path, file_len: u64, content: &gguf_file::Content) -> Result<()> {
    let mut needed = content.tensor_data_offset;
    for (name, info) in &content.tensor_infos {
        // Shapes come from the file: an absurd one must not overflow into a small size.
        let bytes = info
            .shape
            .dims()
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
            .map(|elements| elements / info.ggml_dtype.block_size() as u64 * info.ggml_dtype.type_size() as u64)
            .and_then(|bytes| content.tensor_data_offset.checked_add(info.offset)?.checked_add(bytes));
        match bytes {
            Some(end) => needed = needed.max(end),
            None => return Err(bad_file(path, format!("GGUF tensor '{name}' has an impossible shape {:?}", info.shape.dims()))),
        }
    }
    if file_len < needed {
        return Err(bad_file(path, format!("truncated GGUF file: tensors need {needed} bytes, the file has {file_len}")));
    }
    Ok(())
}

/// Hugging Face name → llama.cpp GGUF name for every tensor the decoder reads.
fn gguf_names(num_layers: usize) -> HashMap<String, String> {
    let mut names = HashMap::new();
    let mut add = |hf: String, gguf: String| {
        names.insert(hf, gguf);
    };
    add("model.embed_tokens.weight".into(), "token_embd.weight".into());
    add("model.norm.weight".into(), "output_norm.weight".into());
    add("lm_head.weight".into(), "output.weight".into());
    add("rope_freqs".into(), "rope_freqs.weight".into());
    for i in 0..num_layers {
        let hf = format!("model.layers.{i}");
        let g = format!("blk.{i}");
        add(format!("{hf}.input_layernorm.weight"), format!("{g}.attn_norm.weight"));
        add(format!("{hf}.post_attention_layernorm.weight"), format!("{g}.ffn_norm.weight"));
        for (module, gguf) in [("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output")] {
            add(format!("{hf}.self_attn.{module}.weight"), format!("{g}.{gguf}.weight"));
            add(format!("{hf}.self_attn.{module}.bias"), format!("{g}.{gguf}.bias"));
        }
        for (module, gguf) in [("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")] {
            add(format!("{hf}.mlp.{module}.weight"), format!("{g}.{gguf}.weight"));
        }
    }
    names
}

fn gguf_config(path: &Path, content: &gguf_file::Content) -> Result<DecoderConfig> {
    let md = &content.metadata;
    let arch_name = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .ok_or_else(|| bad_file(path, "GGUF metadata has no general.architecture"))?
        .clone();
    let architecture = match arch_name.as_str() {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        other => return Err(EngineError::UnknownArchitecture { path: path.to_path_buf(), architecture: other.to_string() }),
    };
    let get = |key: &str| -> Result<&gguf_file::Value> {
        md.get(&format!("{arch_name}.{key}")).ok_or_else(|| bad_file(path, format!("GGUF metadata has no {arch_name}.{key}")))
    };
    let usize_of = |key: &str| -> Result<usize> {
        let v = get(key)?;
        v.to_u32()
            .map(|x| x as usize)
            .or_else(|_| v.to_u64().map(|x| x as usize))
            .map_err(|e| bad_file(path, format!("GGUF {arch_name}.{key}: {e}")))
    };
    let f64_of = |key: &str, default: f64| -> f64 { get(key).ok().and_then(|v| v.to_f32().ok()).map(f64::from).unwrap_or(default) };

    let hidden_size = usize_of("embedding_length")?;
    let num_heads = usize_of("attention.head_count")?;
    let num_kv_heads = usize_of("attention.head_count_kv").unwrap_or(num_heads);
    let head_dim = usize_of("attention.key_length").unwrap_or(hidden_size / num_heads.max(1));
    let embd = content.tensor_infos.get("token_embd.weight").ok_or_else(|| bad_file(path, "GGUF has no token_embd.weight tensor"))?;
    let vocab_size = embd.shape.dims().iter().copied().find(|&d| d != hidden_size).unwrap_or(hidden_size);
    let config = DecoderConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size: usize_of("feed_forward_length")?,
        num_layers: usize_of("block_count")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: f64_of("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta: f64_of("rope.freq_base", 10_000.0),
        // llama.cpp permutes llama q/k rows (interleaved pairs); qwen2 is NeoX style.
        rope_layout: match architecture {
            Architecture::Llama => RopeLayout::Interleaved,
            Architecture::Qwen2 => RopeLayout::Halves,
        },
        rope_freq_factors: None,
        max_position: usize_of("context_length").unwrap_or(4096),
        tied_embeddings: !content.tensor_infos.contains_key("output.weight"),
    };
    validate(path, config)
}

fn validate(path: &Path, config: DecoderConfig) -> Result<DecoderConfig> {
    let c = &config;
    if c.num_heads == 0 || c.num_kv_heads == 0 || !c.num_heads.is_multiple_of(c.num_kv_heads) {
        return Err(bad_file(path, format!("{} attention heads cannot share {} key/value heads", c.num_heads, c.num_kv_heads)));
    }
    if c.head_dim == 0 || !c.head_dim.is_multiple_of(2) || c.num_layers == 0 || c.vocab_size == 0 {
        return Err(bad_file(path, "model dimensions are zero or odd (head_dim must be even)"));
    }
    Ok(config)
}

#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    #[serde(default = "default_max_position")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    rope_scaling: Option<RopeScaling>,
}

#[derive(Deserialize)]
struct RopeScaling {
    #[serde(alias = "type")]
    rope_type: String,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_position() -> usize {
    4096
}

impl HfConfig {
    fn into_decoder_config(self, path: &Path) -> Result<DecoderConfig> {
        let kind = self
            .model_type
            .clone()
            .or_else(|| self.architectures.first().map(|a| a.trim_end_matches("ForCausalLM").to_lowercase()))
            .unwrap_or_default();
        let architecture = match kind.as_str() {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            other => return Err(EngineError::UnknownArchitecture { path: path.to_path_buf(), architecture: other.to_string() }),
        };
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        let rope_freq_factors = match &self.rope_scaling {
            Some(s) if s.rope_type == "llama3" => Some(llama3_freq_factors(s, head_dim, self.rope_theta)),
            Some(s) if s.rope_type == "default" => None,
            Some(s) => return Err(bad_file(path, format!("unsupported rope_scaling type '{}'", s.rope_type))),
            None => None,
        };
        validate(
            path,
            DecoderConfig {
                architecture,
                vocab_size: self.vocab_size,
                hidden_size: self.hidden_size,
                intermediate_size: self.intermediate_size,
                num_layers: self.num_hidden_layers,
                num_heads: self.num_attention_heads,
                num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
                head_dim,
                rms_norm_eps: self.rms_norm_eps,
                rope_theta: self.rope_theta,
                rope_layout: RopeLayout::Halves,
                rope_freq_factors,
                max_position: self.max_position_embeddings,
                tied_embeddings: self.tie_word_embeddings,
            },
        )
    }
}

/// Llama 3.1+ frequency scaling, expressed as the divisor of each inverse
/// frequency (the form llama.cpp stores in `rope_freqs.weight`).
fn llama3_freq_factors(s: &RopeScaling, head_dim: usize, theta: f64) -> Vec<f32> {
    let factor = s.factor.unwrap_or(8.0);
    let low = s.low_freq_factor.unwrap_or(1.0);
    let high = s.high_freq_factor.unwrap_or(4.0);
    let original = s.original_max_position_embeddings.unwrap_or(8192) as f64;
    let low_wavelen = original / low;
    let high_wavelen = original / high;
    (0..head_dim / 2)
        .map(|i| {
            let inv_freq = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
            let scaled = if wavelen < high_wavelen {
                inv_freq
            } else if wavelen > low_wavelen {
                inv_freq / factor
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
            };
            (inv_freq / scaled) as f32
        })
        .collect()
}
