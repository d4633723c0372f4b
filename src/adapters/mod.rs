//! LoRA adapters as files: the PEFT format. (Registry, budget, merging and
//! training build on this.)

pub mod peft;

pub use peft::{LoraAdapter, LoraPair, ModuleKey, PeftConfig, TargetModules};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
}
