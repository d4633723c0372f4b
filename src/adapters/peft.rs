//! LoRA adapters in the Hugging Face PEFT format: a directory holding
//! `adapter_config.json` and `adapter_model.safetensors`, tensors named
//! `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::AdapterError;
use crate::engine::TargetModule;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Whether two `base_model_name_or_path` values name the same model: memlora names a
/// model by its catalog name (`smollm2-135m-instruct`), exports by its hub id
/// (`HuggingFaceTB/SmolLM2-135M-Instruct`), and other tools by a hub id or a local path.
pub fn same_base_model(a: &str, b: &str) -> bool {
    let short = |s: &str| s.trim_end_matches('/').rsplit('/').next().unwrap_or(s).to_lowercase();
    short(a) == short(b)
}

/// The fields of PEFT's `LoraConfig` that memlora reads and writes; others
/// are kept so that a re-exported adapter loses nothing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeftConfig {
    #[serde(default = "lora")]
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub target_modules: TargetModules,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default = "none")]
    pub bias: String,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

fn lora() -> String {
    "LORA".into()
}
fn none() -> String {
    "none".into()
}

/// PEFT writes `target_modules` as a list or as one regex string.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Pattern(String),
    #[default]
    #[serde(skip)]
    Unspecified,
}

impl TargetModules {
    pub fn names(&self) -> Vec<String> {
        match self {
            TargetModules::List(v) => v.clone(),
            TargetModules::Pattern(p) => vec![p.clone()],
            TargetModules::Unspecified => Vec::new(),
        }
    }
}

/// Where one pair of LoRA factors applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleKey {
    pub layer: usize,
    pub module: TargetModule,
}

impl ModuleKey {
    /// `base_model.model.model.layers.{layer}.{block}.{module}` — PEFT's prefix
    /// on a causal LM.
    pub fn peft_prefix(&self) -> String {
        format!("base_model.model.model.layers.{}.{}.{}", self.layer, self.module.block(), self.module.hf_name())
    }

    /// Parses a PEFT tensor name into its module and whether it is the A or B factor.
    pub fn parse(name: &str) -> Option<(Self, Factor)> {
        // Accept both `lora_A.weight` and the named form `lora_A.default.weight`.
        let rest = name.strip_suffix(".weight")?;
        let rest = rest.strip_suffix(".default").unwrap_or(rest);
        let (module_path, factor) = if let Some(p) = rest.strip_suffix(".lora_A") {
            (p, Factor::A)
        } else if let Some(p) = rest.strip_suffix(".lora_B") {
            (p, Factor::B)
        } else {
            return None;
        };
        let parts: Vec<&str> = module_path.split('.').collect();
        let layers_at = parts.iter().position(|p| *p == "layers")?;
        let layer = parts.get(layers_at + 1)?.parse().ok()?;
        let module = TargetModule::from_hf_name(parts.last()?)?;
        Some((ModuleKey { layer, module }, factor))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factor {
    A,
    B,
}

/// `a`: (r, in_features), `b`: (out_features, r), f32.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
}

#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub config: PeftConfig,
    pub modules: BTreeMap<ModuleKey, LoraPair>,
}

impl LoraAdapter {
    /// The factor PEFT multiplies B·A by: alpha / r, or alpha / √r with rsLoRA.
    pub fn scale(&self) -> f64 {
        let r = self.config.r.max(1) as f64;
        if self.config.use_rslora {
            self.config.lora_alpha / r.sqrt()
        } else {
            self.config.lora_alpha / r
        }
    }

    /// The target modules present in the weights.
    pub fn modules_present(&self) -> BTreeSet<TargetModule> {
        self.modules.keys().map(|k| k.module).collect()
    }

    /// An adapter with uniformly random factors for every layer's `targets`
    /// (benchmarks and tests). `b_scale` = 0 gives an adapter that changes nothing.
    pub fn random(
        model: &crate::engine::DecoderConfig,
        rank: usize,
        alpha: f64,
        targets: &[TargetModule],
        b_scale: f32,
        seed: u64,
    ) -> candle_core::Result<Self> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut uniform = |n: usize, bound: f32| -> Vec<f32> {
            (0..n).map(|_| if bound == 0.0 { 0.0 } else { rng.random_range(-bound..bound) }).collect()
        };
        let mut modules = BTreeMap::new();
        for layer in 0..model.num_layers {
            for &module in targets {
                let (out, inp) = model.linear_shape(module);
                let a = Tensor::from_vec(uniform(rank * inp, 1.0 / (inp as f32).sqrt()), (rank, inp), &Device::Cpu)?;
                let b = Tensor::from_vec(uniform(out * rank, b_scale), (out, rank), &Device::Cpu)?;
                modules.insert(ModuleKey { layer, module }, LoraPair { a, b });
            }
        }
        let config = PeftConfig {
            peft_type: lora(),
            r: rank,
            lora_alpha: alpha,
            lora_dropout: 0.0,
            target_modules: TargetModules::List(targets.iter().map(|m| m.hf_name().to_string()).collect()),
            base_model_name_or_path: None,
            use_rslora: false,
            task_type: Some("CAUSAL_LM".into()),
            bias: none(),
            other: BTreeMap::new(),
        };
        Ok(Self { config, modules })
    }

    /// Reads a PEFT directory (or its `adapter_model.safetensors`), checking
    /// that the file is self-consistent: every module has both factors, ranks
    /// agree with `r`, and `target_modules` names the modules present.
    pub fn load(path: &Path) -> Result<Self, AdapterError> {
        if !path.exists() {
            return Err(AdapterError::Invalid { path: path.to_path_buf(), message: "no such adapter directory or file".into() });
        }
        let dir: PathBuf = if path.is_dir() { path.to_path_buf() } else { path.parent().unwrap_or(Path::new(".")).to_path_buf() };
        let config_path = dir.join(CONFIG_FILE);
        let weights_path = if path.is_file() { path.to_path_buf() } else { dir.join(WEIGHTS_FILE) };
        let bad = |path: &Path, message: String| AdapterError::Invalid { path: path.to_path_buf(), message };
        let config = std::fs::read(&config_path).map_err(|e| bad(&config_path, e.to_string()))?;
        let weights = std::fs::read(&weights_path).map_err(|e| bad(&weights_path, e.to_string()))?;
        Self::from_bytes(&config, &config_path, &weights, &weights_path)
    }

    /// An adapter from the bytes of its `adapter_config.json` and `adapter_model.safetensors`
    /// (named by the two paths in errors), with the checks of [`LoraAdapter::load`].
    pub fn from_bytes(config: &[u8], config_path: &Path, weights: &[u8], weights_path: &Path) -> Result<Self, AdapterError> {
        let bad = |path: &Path, message: String| AdapterError::Invalid { path: path.to_path_buf(), message };
        let config: PeftConfig = serde_json::from_slice(config).map_err(|e| bad(config_path, format!("invalid adapter config: {e}")))?;
        if config.peft_type != "LORA" {
            return Err(bad(config_path, format!("peft_type is '{}', only LORA is supported", config.peft_type)));
        }
        if config.r == 0 {
            return Err(bad(config_path, "r is 0".into()));
        }
        let tensors = candle_core::safetensors::load_buffer(weights, &Device::Cpu)
            .map_err(|e| bad(weights_path, format!("invalid safetensors: {e}")))?;
        let mut halves: HashMap<ModuleKey, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
        for (name, tensor) in tensors {
            let Some((key, factor)) = ModuleKey::parse(&name) else {
                return Err(bad(
                    weights_path,
                    format!("unexpected tensor '{name}' (only lora_A/lora_B of q,k,v,o,gate,up,down projections are supported)"),
                ));
            };
            let tensor = tensor.to_dtype(DType::F32).map_err(|e| bad(weights_path, e.to_string()))?;
            let entry = halves.entry(key).or_default();
            match factor {
                Factor::A => entry.0 = Some(tensor),
                Factor::B => entry.1 = Some(tensor),
            }
        }
        let mut modules = BTreeMap::new();
        for (key, pair) in halves {
            let (Some(a), Some(b)) = pair else {
                return Err(bad(weights_path, format!("{} has only one of lora_A / lora_B", key.peft_prefix())));
            };
            let (Ok((ra, _)), Ok((_, rb))) = (a.dims2(), b.dims2()) else {
                return Err(bad(weights_path, format!("{}: LoRA factors must be matrices", key.peft_prefix())));
            };
            if ra != config.r || rb != config.r {
                return Err(bad(
                    weights_path,
                    format!("{}: rank {ra}/{rb} in the weights but r = {} in {CONFIG_FILE}", key.peft_prefix(), config.r),
                ));
            }
            modules.insert(key, LoraPair { a, b });
        }
        if modules.is_empty() {
            return Err(bad(weights_path, "no LoRA tensors".into()));
        }
        let adapter = Self { config, modules };
        adapter.check_finite(weights_path)?;
        if let TargetModules::List(names) = &adapter.config.target_modules {
            for module in adapter.modules_present() {
                if !names.iter().any(|n| n == module.hf_name()) {
                    return Err(bad(config_path, format!("weights adapt {} but target_modules is {names:?}", module.hf_name())));
                }
            }
        }
        Ok(adapter)
    }

    /// A NaN or infinite weight would poison every answer the adapter touches.
    pub fn check_finite(&self, path: &Path) -> Result<(), AdapterError> {
        for (key, pair) in &self.modules {
            for (factor, tensor) in [("lora_A", &pair.a), ("lora_B", &pair.b)] {
                let values = tensor.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| AdapterError::Invalid {
                    path: path.to_owned(),
                    message: format!("{}.{factor}: {e}", key.peft_prefix()),
                })?;
                if values.iter().any(|v| !v.is_finite()) {
                    return Err(AdapterError::Invalid {
                        path: path.to_owned(),
                        message: format!("{}.{factor} has NaN or infinite weights", key.peft_prefix()),
                    });
                }
            }
        }
        Ok(())
    }

    /// Writes the adapter as a PEFT directory, atomically: into a temporary
    /// sibling directory that replaces `dir` only when complete.
    pub fn save(&self, dir: &Path) -> Result<(), AdapterError> {
        let io = |path: &Path, e: &dyn std::fmt::Display| AdapterError::Io { path: path.to_path_buf(), message: e.to_string() };
        let parent = dir.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| io(parent, &e))?;
        let staging = parent.join(format!(".{}.tmp", dir.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(|e| io(&staging, &e))?;
        let mut config = self.config.clone();
        if matches!(config.target_modules, TargetModules::Unspecified) {
            config.target_modules = TargetModules::List(self.modules_present().iter().map(|m| m.hf_name().to_string()).collect());
        }
        let json = serde_json::to_string_pretty(&config).map_err(|e| io(&staging, &e))?;
        std::fs::write(staging.join(CONFIG_FILE), json).map_err(|e| io(&staging, &e))?;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (key, pair) in &self.modules {
            tensors.insert(format!("{}.lora_A.weight", key.peft_prefix()), pair.a.clone());
            tensors.insert(format!("{}.lora_B.weight", key.peft_prefix()), pair.b.clone());
        }
        let weights = staging.join(WEIGHTS_FILE);
        candle_core::safetensors::save(&tensors, &weights).map_err(|e| io(&weights, &e))?;
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| io(dir, &e))?;
        }
        std::fs::rename(&staging, dir).map_err(|e| io(dir, &e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_names_round_trip() {
        for layer in [0, 7, 29] {
            for module in TargetModule::ALL {
                let key = ModuleKey { layer, module };
                for (suffix, factor) in [("lora_A.weight", Factor::A), ("lora_B.weight", Factor::B), ("lora_B.default.weight", Factor::B)] {
                    let name = format!("{}.{suffix}", key.peft_prefix());
                    assert_eq!(ModuleKey::parse(&name), Some((key, factor)), "{name}");
                }
            }
        }
        assert_eq!(ModuleKey::parse("base_model.model.model.layers.0.self_attn.rotary.lora_A.weight"), None);
        assert_eq!(ModuleKey::parse("model.embed_tokens.weight"), None);
    }

    #[test]
    fn save_then_load_preserves_config_and_factors() {
        let dir = tempfile::tempdir().unwrap();
        let mut modules = BTreeMap::new();
        let key = ModuleKey { layer: 1, module: TargetModule::V };
        let a = Tensor::arange(0f32, 8.0 * 4.0, &Device::Cpu).unwrap().reshape((8, 4)).unwrap();
        let b = Tensor::ones((6, 8), DType::F32, &Device::Cpu).unwrap();
        modules.insert(key, LoraPair { a: a.clone(), b });
        let config: PeftConfig =
            serde_json::from_str(r#"{"r": 8, "lora_alpha": 16, "base_model_name_or_path": "tiny", "fan_in_fan_out": false}"#).unwrap();
        let adapter = LoraAdapter { config, modules };
        let path = dir.path().join("adapter");
        adapter.save(&path).unwrap();
        let loaded = LoraAdapter::load(&path).unwrap();
        assert_eq!(loaded.config.target_modules, TargetModules::List(vec!["v_proj".into()]));
        assert_eq!(loaded.config.other.get("fan_in_fan_out"), Some(&serde_json::json!(false)));
        assert_eq!(loaded.scale(), 2.0);
        let diff = (&loaded.modules[&key].a - &a).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn inconsistent_files_are_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join(CONFIG_FILE), r#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}"#).unwrap();
        let mut tensors = HashMap::new();
        tensors.insert(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string(),
            Tensor::zeros((8, 16), DType::F32, &Device::Cpu).unwrap(),
        );
        tensors.insert(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight".to_string(),
            Tensor::zeros((16, 8), DType::F32, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&tensors, path.join(WEIGHTS_FILE)).unwrap();
        let err = LoraAdapter::load(&path).unwrap_err().to_string();
        assert!(err.contains("rank 8/8") && err.contains(WEIGHTS_FILE), "{err}");

        // A module memlora cannot adapt (the output head) is named.
        std::fs::write(path.join(CONFIG_FILE), r#"{"r": 8, "lora_alpha": 8, "target_modules": ["lm_head"]}"#).unwrap();
        let mut head = HashMap::new();
        head.insert("base_model.model.lm_head.lora_A.weight".to_string(), Tensor::zeros((8, 16), DType::F32, &Device::Cpu).unwrap());
        head.insert("base_model.model.lm_head.lora_B.weight".to_string(), Tensor::zeros((16, 8), DType::F32, &Device::Cpu).unwrap());
        candle_core::safetensors::save(&head, path.join(WEIGHTS_FILE)).unwrap();
        let err = LoraAdapter::load(&path).unwrap_err().to_string();
        assert!(err.contains("lm_head") && err.contains("unexpected tensor"), "{err}");

        std::fs::write(path.join(CONFIG_FILE), "{not json").unwrap();
        let err = LoraAdapter::load(&path).unwrap_err().to_string();
        assert!(err.contains(CONFIG_FILE), "{err}");
    }
}
