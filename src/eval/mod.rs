//! Evaluation. `metrics` scores answers exactly as LoCoMo's official evaluation code
//! does; `locomo` holds a run's journalled predictions and its report (the runner is
//! `memlora eval locomo`); `vqa` is the visual question set and its score (`memlora eval
//! vqa`).

use std::path::PathBuf;

pub mod locomo;
pub mod metrics;
pub mod vqa;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("cannot {action} {}: {error}", .path.display())]
    Io { action: &'static str, path: PathBuf, error: std::io::Error },
    #[error("{} line {line}: {reason}", .path.display())]
    Corrupt { path: PathBuf, line: usize, reason: String },
    #[error("{}: {message}", .path.display())]
    Data { path: PathBuf, message: String },
}
