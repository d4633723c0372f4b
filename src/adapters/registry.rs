//! The installed adapters of a data dir: `DATA_DIR/adapters/NAME/` is a PEFT directory
//! plus memlora's `memlora.json` (the operation it serves, where it came from, what it
//! merges), and `DATA_DIR/adapters/bindings.json` says which adapter serves each memory
//! operation.

use std::collections::BTreeMap;
use std::fs;
use std::ops::ControlFlow;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::merge::{self, MergeMethod, Placement, Slot, SlotBank};
use super::peft::{CONFIG_FILE, WEIGHTS_FILE};
use super::{AdapterError, LoraAdapter, PeftConfig};

pub const ADAPTERS_DIR: &str = "adapters";
pub(super) const INFO_FILE: &str = "memlora.json";
const BINDINGS_FILE: &str = "bindings.json";

/// What memlora records about an installed adapter.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AdapterInfo {
    /// The operation it was made for (extract, update, generate, vision, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// Where it was imported from, or how it was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The adapters merged into it, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged_from: Vec<String>,
    /// Unix seconds.
    #[serde(default)]
    pub created: i64,
    /// Scores on held-out data, by name: `loss` is the mean token loss on the validation
    /// set training was given (the best epoch's).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub validation: BTreeMap<String, f64>,
}

impl AdapterInfo {
    /// The validation scores in words ("loss 1.120"), or "-".
    pub fn validation_summary(&self) -> String {
        if self.validation.is_empty() {
            return "-".into();
        }
        let words: Vec<String> = self.validation.iter().map(|(name, value)| format!("{name} {value:.3}")).collect();
        words.join(", ")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstalledAdapter {
    pub name: String,
    pub dir: PathBuf,
    pub base_model: Option<String>,
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<String>,
    pub bytes: u64,
    pub info: AdapterInfo,
}

/// The storage budget: at most `max_slots` installed adapters (0 = no limit). An adapter
/// added beyond it is merged into the most similar installed one (K-Merge; with a
/// `threshold`, K-Merge++ also merges into a similar one while slots are free).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub max_slots: usize,
    pub threshold: Option<f32>,
    /// Rank of a merged slot.
    pub rank: usize,
}

/// What [`AdapterRegistry::admit`] did with a new adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "placement", rename_all = "snake_case")]
pub enum Admission {
    Installed {
        adapter: InstalledAdapter,
    },
    /// Merged into the installed adapter `into`, which now stands for `members`.
    Merged {
        into: String,
        similarity: f32,
        reconstruction_error: f64,
        members: Vec<String>,
    },
}

/// A merge of installed adapters into a new one, as a front end asks for it
/// (`{"adapters": ["a", "b=0.5"], "into": "c", "method": {"name": "ties", "density": 0.2}}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeSpec {
    /// Installed adapters, `NAME` or `NAME=WEIGHT`.
    pub adapters: Vec<String>,
    pub into: String,
    #[serde(default)]
    pub method: MergeMethod,
    #[serde(default = "default_merge_rank")]
    pub rank: usize,
    /// The operation the result is made for.
    #[serde(default)]
    pub operation: Option<String>,
}

fn default_merge_rank() -> usize {
    8
}

/// Where a merge job is: loading its inputs, fitting modules, installing the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeStage {
    Loading,
    Merging,
    Installing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeProgress {
    pub stage: MergeStage,
    pub done: usize,
    pub total: usize,
}

/// What a merge job made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeOutcome {
    pub recipe: String,
    pub admission: Admission,
    /// Relative Frobenius error of the rank-r factors against the merged ΔW, overall and
    /// in the worst module.
    pub reconstruction_error: f64,
    pub max_module_error: f64,
}

/// The adapter directory of one data dir.
#[derive(Debug, Clone)]
pub struct AdapterRegistry {
    dir: PathBuf,
}

impl AdapterRegistry {
    /// `data_dir/adapters`, created private (0700) when missing.
    pub fn open(data_dir: &Path) -> Result<AdapterRegistry, AdapterError> {
        let dir = data_dir.join(ADAPTERS_DIR);
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(|e| io(&dir, e))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(|e| io(&dir, e))?;
        Ok(AdapterRegistry { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory of adapter `name` (whether or not it is installed).
    pub fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Every installed adapter, by name. Reads configs, not weights.
    pub fn list(&self) -> Result<Vec<InstalledAdapter>, AdapterError> {
        let mut adapters = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| io(&self.dir, e))? {
            let entry = entry.map_err(|e| io(&self.dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Staging directories of an interrupted save start with a dot.
            if name.starts_with('.') || !entry.path().join(CONFIG_FILE).is_file() {
                continue;
            }
            adapters.push(self.get(&name)?);
        }
        adapters.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(adapters)
    }

    pub fn get(&self, name: &str) -> Result<InstalledAdapter, AdapterError> {
        check_name(name)?;
        let dir = self.path_of(name);
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.is_file() {
            return Err(AdapterError::Invalid { path: dir, message: format!("no adapter named '{name}' is installed") });
        }
        let text = fs::read_to_string(&config_path).map_err(|e| io(&config_path, e))?;
        let config: PeftConfig = serde_json::from_str(&text)
            .map_err(|e| AdapterError::Invalid { path: config_path.clone(), message: format!("invalid adapter config: {e}") })?;
        let info_path = dir.join(INFO_FILE);
        let info = match fs::read_to_string(&info_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| AdapterError::Invalid { path: info_path.clone(), message: format!("invalid adapter info: {e}") })?,
            Err(_) => AdapterInfo::default(),
        };
        let bytes = [CONFIG_FILE, WEIGHTS_FILE, INFO_FILE].iter().filter_map(|f| fs::metadata(dir.join(f)).ok()).map(|m| m.len()).sum();
        Ok(InstalledAdapter {
            name: name.to_owned(),
            base_model: config.base_model_name_or_path.clone(),
            rank: config.r,
            alpha: config.lora_alpha,
            targets: config.target_modules.names(),
            bytes,
            dir,
            info,
        })
    }

    /// Installs `adapter` as `name` (replacing nothing: the name must be free).
    pub fn install(&self, name: &str, adapter: &LoraAdapter, info: &AdapterInfo) -> Result<InstalledAdapter, AdapterError> {
        check_name(name)?;
        let dir = self.path_of(name);
        if dir.exists() {
            return Err(AdapterError::Invalid { path: dir, message: format!("an adapter named '{name}' is already installed") });
        }
        adapter.check_finite(&dir)?;
        adapter.save(&dir)?;
        let info_path = dir.join(INFO_FILE);
        let json = serde_json::to_string_pretty(info).map_err(|e| io(&info_path, e))?;
        fs::write(&info_path, json).map_err(|e| io(&info_path, e))?;
        self.get(name)
    }

    /// Installs `adapter` as `name` within `budget`: as a new adapter while the budget
    /// allows, else merged into the most similar installed adapter (in ΔW space, then
    /// re-factorised to `budget.rank`), which keeps its name and records its members.
    pub fn admit(&self, name: &str, adapter: &LoraAdapter, info: &AdapterInfo, budget: Budget) -> Result<Admission, AdapterError> {
        check_name(name)?;
        adapter.check_finite(&self.path_of(name))?;
        if budget.max_slots == 0 {
            return Ok(Admission::Installed { adapter: self.install(name, adapter, info)? });
        }
        self.check_free(name)?;
        let installed = self.list()?;
        let mut slots = Vec::with_capacity(installed.len());
        for existing in &installed {
            let members =
                if existing.info.merged_from.is_empty() { vec![existing.name.clone()] } else { existing.info.merged_from.clone() };
            slots.push(Slot { adapter: LoraAdapter::load(&existing.dir)?, count: members.len(), members });
        }
        let mut bank = SlotBank::with_slots(budget.max_slots, budget.threshold, slots)?;
        match bank.add(name, adapter, budget.rank)? {
            Placement::Opened { .. } => Ok(Admission::Installed { adapter: self.install(name, adapter, info)? }),
            Placement::Merged { slot, similarity, error } => {
                let target = &installed[slot];
                let merged = &bank.slots()[slot];
                merged.adapter.save(&target.dir)?;
                let info = AdapterInfo {
                    merged_from: merged.members.clone(),
                    source: Some(format!("k-merge of {}", merged.members.join(", "))),
                    // The scores were the unmerged adapter's.
                    validation: BTreeMap::new(),
                    ..target.info.clone()
                };
                let info_path = target.dir.join(INFO_FILE);
                let json = serde_json::to_string_pretty(&info).map_err(|e| io(&info_path, e))?;
                fs::write(&info_path, json).map_err(|e| io(&info_path, e))?;
                Ok(Admission::Merged {
                    into: target.name.clone(),
                    similarity,
                    reconstruction_error: error,
                    members: merged.members.clone(),
                })
            }
        }
    }

    /// Reads a PEFT directory (or its safetensors file) and installs it within `budget`.
    pub fn import(&self, source: &Path, name: Option<&str>, operation: Option<&str>, budget: Budget) -> Result<Admission, AdapterError> {
        let adapter = LoraAdapter::load(source)?;
        let dir = if source.is_dir() { source } else { source.parent().unwrap_or(Path::new(".")) };
        let name =
            match name {
                Some(name) => name.to_owned(),
                None => dir.canonicalize().ok().and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned())).ok_or_else(|| {
                    AdapterError::Invalid { path: source.to_owned(), message: "cannot name the adapter; give --name".into() }
                })?,
            };
        if let Some(operation) = operation {
            check_name(operation)?;
        }
        let info = AdapterInfo {
            operation: operation.map(str::to_owned),
            source: Some(source.display().to_string()),
            created: crate::memory::now(),
            ..AdapterInfo::default()
        };
        self.admit(&name, &adapter, &info, budget)
    }

    /// Writes adapter `name` to `dest` as a plain PEFT directory (loadable by PEFT).
    pub fn export(&self, name: &str, dest: &Path, base_model: Option<&str>) -> Result<(), AdapterError> {
        let installed = self.get(name)?;
        if dest.exists() && fs::read_dir(dest).map_err(|e| io(dest, e))?.next().is_some() {
            return Err(AdapterError::Invalid { path: dest.to_owned(), message: "the export directory exists and is not empty".into() });
        }
        let mut adapter = LoraAdapter::load(&installed.dir)?;
        if let Some(base_model) = base_model {
            adapter.config.base_model_name_or_path = Some(base_model.to_owned());
        }
        adapter.save(dest)
    }

    /// Fails when `name` is installed, or merged into an installed adapter.
    fn check_free(&self, name: &str) -> Result<(), AdapterError> {
        check_name(name)?;
        if let Some(holder) = self.list()?.iter().find(|a| a.name == name || a.info.merged_from.iter().any(|m| m == name)) {
            let place = if holder.name == name { String::new() } else { format!(" (in '{}')", holder.name) };
            return Err(AdapterError::Invalid {
                path: self.path_of(name),
                message: format!("an adapter named '{name}' is already installed{place}"),
            });
        }
        Ok(())
    }

    /// Installed adapters given as `NAME` or `NAME=WEIGHT` (weight 1), loaded.
    pub fn load_weighted(&self, specs: &[String]) -> Result<Vec<(String, LoraAdapter, f32)>, AdapterError> {
        specs
            .iter()
            .map(|spec| {
                let (name, weight) = match spec.rsplit_once('=') {
                    Some((name, weight)) => (
                        name,
                        weight.parse::<f32>().map_err(|_| AdapterError::Invalid {
                            path: PathBuf::from(spec),
                            message: format!("merge weight '{weight}' is not a number"),
                        })?,
                    ),
                    None => (spec.as_str(), 1.0),
                };
                let installed = self.get(name)?;
                Ok((name.to_owned(), LoraAdapter::load(&installed.dir)?, weight))
            })
            .collect()
    }

    /// Merges installed adapters as `spec` says and installs the result within `budget`,
    /// reporting progress; `Break` from `on_progress` cancels the job before anything is
    /// installed (installing itself is not interrupted).
    pub fn merge(
        &self,
        spec: &MergeSpec,
        budget: Budget,
        on_progress: &mut dyn FnMut(MergeProgress) -> ControlFlow<()>,
    ) -> Result<MergeOutcome, AdapterError> {
        self.check_free(&spec.into)?;
        let cancelled = || AdapterError::Merge(merge::MergeError::Cancelled);
        let total = spec.adapters.len();
        let mut inputs = Vec::with_capacity(total);
        for (done, one) in spec.adapters.iter().enumerate() {
            if on_progress(MergeProgress { stage: MergeStage::Loading, done, total }).is_break() {
                return Err(cancelled());
            }
            inputs.extend(self.load_weighted(std::slice::from_ref(one))?);
        }
        let weighted: Vec<(&LoraAdapter, f32)> = inputs.iter().map(|(_, adapter, weight)| (adapter, *weight)).collect();
        let merged = merge::merge(&weighted, spec.method, spec.rank, &mut |done, total| {
            on_progress(MergeProgress { stage: MergeStage::Merging, done, total })
        })?;
        let _ = on_progress(MergeProgress { stage: MergeStage::Installing, done: 0, total: 1 });
        let recipe = spec.method.recipe(spec.rank);
        let info = AdapterInfo {
            operation: spec.operation.clone(),
            source: Some(format!("merge: {recipe} of {}", spec.adapters.join(" "))),
            merged_from: inputs.into_iter().map(|(name, ..)| name).collect(),
            created: crate::memory::now(),
            ..AdapterInfo::default()
        };
        let admission = self.admit(&spec.into, &merged.adapter, &info, budget)?;
        let _ = on_progress(MergeProgress { stage: MergeStage::Installing, done: 1, total: 1 });
        Ok(MergeOutcome {
            recipe,
            admission,
            reconstruction_error: merged.report.overall,
            max_module_error: merged.report.max_module_error(),
        })
    }

    /// Uninstalls `name` and unbinds it from every operation; returns those operations.
    pub fn remove(&self, name: &str) -> Result<Vec<String>, AdapterError> {
        let installed = self.get(name)?;
        let mut bindings = self.bindings()?;
        let unbound: Vec<String> = bindings.iter().filter(|(_, adapter)| *adapter == name).map(|(op, _)| op.clone()).collect();
        bindings.retain(|_, adapter| adapter != name);
        // Unbind first: a binding to a missing adapter would fail every later start.
        self.write_bindings(&bindings)?;
        fs::remove_dir_all(&installed.dir).map_err(|e| io(&installed.dir, e))?;
        Ok(unbound)
    }

    /// Operation → adapter name.
    pub fn bindings(&self) -> Result<BTreeMap<String, String>, AdapterError> {
        let path = self.dir.join(BINDINGS_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| AdapterError::Invalid { path, message: format!("invalid bindings (operation → adapter name): {e}") }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(error) => Err(io(&path, error)),
        }
    }

    /// Makes `name` serve `operation` (`None` unbinds it).
    pub fn bind(&self, operation: &str, name: Option<&str>) -> Result<(), AdapterError> {
        check_name(operation)?;
        let mut bindings = self.bindings()?;
        match name {
            Some(name) => {
                self.get(name)?;
                bindings.insert(operation.to_owned(), name.to_owned());
            }
            None => {
                bindings.remove(operation);
            }
        }
        self.write_bindings(&bindings)
    }

    fn write_bindings(&self, bindings: &BTreeMap<String, String>) -> Result<(), AdapterError> {
        self.write_json(BINDINGS_FILE, bindings)
    }

    /// Writes `file` in the adapters directory whole or not at all (a staged rename).
    pub(super) fn write_json(&self, file: &str, value: &impl Serialize) -> Result<(), AdapterError> {
        let path = self.dir.join(file);
        let staging = self.dir.join(format!(".{file}.tmp"));
        let json = serde_json::to_string_pretty(value).map_err(|e| io(&path, e))?;
        fs::write(&staging, json).map_err(|e| io(&staging, e))?;
        fs::rename(&staging, &path).map_err(|e| io(&path, e))
    }
}

/// Adapter and operation names are single path components a shell need not quote.
pub fn check_name(name: &str) -> Result<(), AdapterError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(AdapterError::Invalid {
            path: PathBuf::from(name),
            message: "names are 1–64 letters, digits, '-', '_' or '.', not starting with '.'".into(),
        })
    }
}

pub(super) fn io(path: &Path, error: impl std::fmt::Display) -> AdapterError {
    AdapterError::Io { path: path.to_owned(), message: error.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Architecture, DecoderConfig, RopeLayout, TargetModule};

    fn config() -> DecoderConfig {
        DecoderConfig {
            architecture: Architecture::Llama,
            vocab_size: 32,
            hidden_size: 16,
            intermediate_size: 32,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 4,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_layout: RopeLayout::Halves,
            rope_freq_factors: None,
            max_position: 64,
            tied_embeddings: true,
        }
    }

    const UNLIMITED: Budget = Budget { max_slots: 0, threshold: None, rank: 4 };

    fn adapter(seed: u64) -> LoraAdapter {
        LoraAdapter::random(&config(), 4, 8.0, &[TargetModule::Q, TargetModule::V], 0.1, seed).unwrap()
    }

    #[test]
    fn import_list_show_export_bind_remove() {
        let data = tempfile::tempdir().unwrap();
        let registry = AdapterRegistry::open(data.path()).unwrap();
        let source = data.path().join("incoming").join("extract-v1");
        adapter(1).save(&source).unwrap();
        let Admission::Installed { adapter: installed } = registry.import(&source, None, Some("extract"), UNLIMITED).unwrap() else {
            panic!()
        };
        assert_eq!((installed.name.as_str(), installed.rank, installed.info.operation.as_deref()), ("extract-v1", 4, Some("extract")));
        assert_eq!(installed.targets, ["q_proj", "v_proj"]);
        assert!(installed.bytes > 0);
        registry.import(&source, Some("copy"), None, UNLIMITED).unwrap();
        assert_eq!(registry.list().unwrap().iter().map(|a| a.name.as_str()).collect::<Vec<_>>(), ["copy", "extract-v1"]);
        assert!(registry.import(&source, Some("copy"), None, UNLIMITED).unwrap_err().to_string().contains("already installed"));

        let out = data.path().join("exported");
        registry.export("extract-v1", &out, Some("org/original-model")).unwrap();
        let exported = LoraAdapter::load(&out).unwrap();
        assert_eq!(exported.modules.len(), adapter(1).modules.len());
        assert_eq!(exported.config.base_model_name_or_path.as_deref(), Some("org/original-model"));
        assert!(!out.join(INFO_FILE).exists(), "an export is plain PEFT");
        assert!(registry.export("extract-v1", &out, None).unwrap_err().to_string().contains("not empty"));

        registry.bind("extract", Some("extract-v1")).unwrap();
        registry.bind("update", Some("copy")).unwrap();
        assert!(registry.bind("generate", Some("missing")).unwrap_err().to_string().contains("no adapter named 'missing'"));
        assert_eq!(registry.remove("extract-v1").unwrap(), ["extract"]);
        assert_eq!(registry.bindings().unwrap(), BTreeMap::from([("update".to_string(), "copy".to_string())]));
        assert!(registry.get("extract-v1").is_err());
    }

    /// `base` plus a little noise: nearly the same ΔW.
    fn near(base: &LoraAdapter, seed: u64) -> LoraAdapter {
        let noise = adapter(seed);
        let mut out = base.clone();
        for (key, pair) in out.modules.iter_mut() {
            pair.b = (&pair.b + (noise.modules[key].b.clone() * 0.01).unwrap()).unwrap();
        }
        out
    }

    #[test]
    fn beyond_the_budget_a_new_adapter_is_merged_into_the_most_similar() {
        let data = tempfile::tempdir().unwrap();
        let registry = AdapterRegistry::open(data.path()).unwrap();
        let budget = Budget { max_slots: 2, threshold: None, rank: 4 };
        let info = AdapterInfo::default();
        let (a, b) = (adapter(10), adapter(11));
        assert!(matches!(registry.admit("a", &a, &info, budget).unwrap(), Admission::Installed { .. }));
        assert!(matches!(registry.admit("b", &b, &info, budget).unwrap(), Admission::Installed { .. }));
        let Admission::Merged { into, similarity, members, .. } = registry.admit("c", &near(&a, 12), &info, budget).unwrap() else {
            panic!("the budget is full")
        };
        assert_eq!((into.as_str(), members), ("a", vec!["a".to_string(), "c".to_string()]));
        assert!(similarity > 0.9, "{similarity}");
        let names: Vec<String> = registry.list().unwrap().into_iter().map(|a| a.name).collect();
        assert_eq!(names, ["a", "b"], "never more than the budget");
        assert_eq!(registry.get("a").unwrap().info.merged_from, ["a", "c"]);
        assert!(registry.admit("c", &b, &info, budget).unwrap_err().to_string().contains("already installed (in 'a')"));

        // K-Merge++: a similar adapter joins its neighbour even while a slot is free.
        let plus = Budget { max_slots: 3, threshold: Some(0.5), rank: 4 };
        assert!(matches!(registry.admit("d", &near(&b, 13), &info, plus).unwrap(), Admission::Merged { ref into, .. } if into == "b"));
        assert!(matches!(registry.admit("e", &adapter(14), &info, plus).unwrap(), Admission::Installed { .. }));
        assert_eq!(registry.list().unwrap().len(), 3);
    }

    #[test]
    fn bad_names_and_nan_weights_are_refused() {
        let data = tempfile::tempdir().unwrap();
        let registry = AdapterRegistry::open(data.path()).unwrap();
        for name in ["", "../up", ".hidden", "a/b", "sp ace"] {
            assert!(registry.install(name, &adapter(2), &AdapterInfo::default()).is_err(), "{name:?}");
        }
        let mut poisoned = adapter(3);
        let pair = poisoned.modules.values_mut().next().unwrap();
        pair.b = (pair.b.clone() * f64::NAN).unwrap();
        let error = registry.install("nan", &poisoned, &AdapterInfo::default()).unwrap_err().to_string();
        assert!(error.contains("NaN"), "{error}");
        assert!(registry.list().unwrap().is_empty(), "nothing half-installed");
        fs::write(registry.dir().join(BINDINGS_FILE), "{not json").unwrap();
        assert!(registry.bindings().unwrap_err().to_string().contains("invalid bindings"));
    }
}
