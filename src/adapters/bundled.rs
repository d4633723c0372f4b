//! The memory experts that ship inside the binary: LoRA adapters trained for the default
//! model (`assets/experts/NAME`, see the README's "Memory quality"), one per memory
//! operation. A data dir gets each of them once: installed, and bound to its operation
//! unless the user bound something else first. An expert
//! the user later removes or unbinds stays so: `bundled.json` remembers what was
//! provisioned.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use super::peft::{CONFIG_FILE, WEIGHTS_FILE};
use super::registry::{io, AdapterInfo, AdapterRegistry, INFO_FILE};
use super::{AdapterError, LoraAdapter};

const PROVISIONED_FILE: &str = "bundled.json";

/// One expert's files, compiled in.
pub struct BundledExpert {
    pub name: &'static str,
    /// The catalog name of the model it was trained for.
    pub base_model: &'static str,
    config: &'static [u8],
    weights: &'static [u8],
    info: &'static [u8],
}

macro_rules! expert {
    ($name:literal, $base:literal) => {
        BundledExpert {
            name: $name,
            base_model: $base,
            config: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/experts/", $name, "/adapter_config.json")),
            weights: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/experts/", $name, "/adapter_model.safetensors")),
            info: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/experts/", $name, "/memlora.json")),
        }
    };
}

pub const EXPERTS: &[BundledExpert] = &[
    expert!("smollm2-135m-extract", "smollm2-135m-instruct"),
    expert!("smollm2-135m-generate", "smollm2-135m-instruct"),
    expert!("smollm2-135m-update", "smollm2-135m-instruct"),
];

impl BundledExpert {
    /// The adapter, read from the compiled-in files (through a scratch directory beside
    /// the installed adapters, because the PEFT reader reads directories).
    pub fn load(&self, scratch_parent: &Path) -> Result<(LoraAdapter, AdapterInfo), AdapterError> {
        let scratch = scratch_parent.join(format!(".bundled-{}.tmp", self.name));
        let _ = fs::remove_dir_all(&scratch);
        fs::create_dir_all(&scratch).map_err(|e| io(&scratch, e))?;
        let loaded = (|| {
            for (file, bytes) in [(CONFIG_FILE, self.config), (WEIGHTS_FILE, self.weights)] {
                fs::write(scratch.join(file), bytes).map_err(|e| io(&scratch.join(file), e))?;
            }
            let adapter = LoraAdapter::load(&scratch)?;
            let info: AdapterInfo = serde_json::from_slice(self.info).map_err(|e| AdapterError::Invalid {
                path: scratch.join(INFO_FILE),
                message: format!("invalid bundled adapter info: {e}"),
            })?;
            Ok((adapter, info))
        })();
        let _ = fs::remove_dir_all(&scratch);
        loaded
    }
}

impl AdapterRegistry {
    /// Installs the bundled experts made for `model` that this data dir has not had yet,
    /// binding each to its operation when nothing serves that operation. Returns the names installed.
    pub fn provision_bundled(&self, model: &str) -> Result<Vec<String>, AdapterError> {
        let record = self.dir().join(PROVISIONED_FILE);
        let mut provisioned: BTreeSet<String> = match fs::read_to_string(&record) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| AdapterError::Invalid { path: record.clone(), message: format!("invalid list of bundled adapters: {e}") })?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(error) => return Err(io(&record, error)),
        };
        let mut installed = Vec::new();
        for expert in EXPERTS {
            if expert.base_model != model || provisioned.contains(expert.name) {
                continue;
            }
            let (adapter, info) = expert.load(self.dir())?;
            // An adapter of that name already here is one this provisioning installed before
            // an interruption, or the user's own: either way it is kept.
            if !self.path_of(expert.name).exists() {
                self.install(expert.name, &adapter, &info)?;
                installed.push(expert.name.to_owned());
            }
            if let Some(operation) = info.operation.as_ref() {
                if !self.bindings()?.contains_key(operation) {
                    self.bind(operation, Some(expert.name))?;
                }
            }
            provisioned.insert(expert.name.to_owned());
            self.write_json(PROVISIONED_FILE, &provisioned)?;
        }
        Ok(installed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bundled_expert_reads_and_names_its_operation() {
        let dir = tempfile::tempdir().unwrap();
        for expert in EXPERTS {
            let (adapter, info) = expert.load(dir.path()).unwrap();
            assert_eq!(adapter.config.base_model_name_or_path.as_deref(), Some(expert.base_model), "{}", expert.name);
            let operation = info.operation.unwrap_or_default();
            assert!(expert.name.ends_with(&operation) && !operation.is_empty(), "{}: operation '{operation}'", expert.name);
            assert!(info.validation.contains_key("loss"), "{}: no validation loss", expert.name);
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "scratch directories are removed");
    }

    #[test]
    fn provisioning_installs_and_binds_once_and_respects_the_users_choices() {
        let dir = tempfile::tempdir().unwrap();
        let registry = AdapterRegistry::open(dir.path()).unwrap();
        assert_eq!(registry.provision_bundled("some-other-model").unwrap(), Vec::<String>::new());
        assert!(registry.list().unwrap().is_empty());

        let names: Vec<String> = EXPERTS.iter().map(|e| e.name.to_owned()).collect();
        assert_eq!(registry.provision_bundled("smollm2-135m-instruct").unwrap(), names);
        let bindings = registry.bindings().unwrap();
        for expert in EXPERTS {
            let operation = registry.get(expert.name).unwrap().info.operation.unwrap();
            let bound = bindings.get(&operation).map(String::as_str);
            assert_eq!(bound, Some(expert.name), "{operation}");
        }
        // Removed by the user: not installed again.
        let first = EXPERTS[0].name;
        registry.remove(first).unwrap();
        assert!(registry.provision_bundled("smollm2-135m-instruct").unwrap().is_empty());
        assert!(registry.get(first).is_err());
    }

    #[test]
    fn an_operation_the_user_bound_keeps_its_adapter() {
        let dir = tempfile::tempdir().unwrap();
        let registry = AdapterRegistry::open(dir.path()).unwrap();
        let expert = &EXPERTS[0];
        let (adapter, info) = expert.load(registry.dir()).unwrap();
        let operation = info.operation.clone().unwrap();
        registry.install("mine", &adapter, &AdapterInfo::default()).unwrap();
        registry.bind(&operation, Some("mine")).unwrap();
        registry.provision_bundled(expert.base_model).unwrap();
        assert_eq!(registry.bindings().unwrap()[&operation], "mine");
        assert!(registry.get(expert.name).is_ok(), "installed all the same, to bind by hand");
    }
}
