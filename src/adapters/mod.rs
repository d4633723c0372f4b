//! LoRA adapters as files: the PEFT format, and the registry of installed adapters with
//! their operation bindings; the storage budget and merging, training on the CPU, and the
//! memorization audit build on this.

pub mod audit;
pub mod bundled;
pub mod merge;
pub mod peft;
pub mod registry;
pub mod train;

pub use peft::{LoraAdapter, LoraPair, ModuleKey, PeftConfig, TargetModules};
pub use registry::{AdapterInfo, AdapterRegistry, Admission, Budget, InstalledAdapter, MergeOutcome, MergeProgress, MergeSpec, MergeStage};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error(transparent)]
    Merge(#[from] merge::MergeError),
}
