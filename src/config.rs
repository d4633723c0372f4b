//! Layered configuration: the defaults embedded in the binary, then the user's
//! `config.toml`, then `MEMLORA_*` environment variables.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

const DEFAULT_CONFIG: &str = include_str!("../config/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {message}")]
    Invalid { path: String, message: String },
    #[error("cannot determine a home directory for the data and model directories; set MEMLORA_DATA_DIR and MEMLORA_MODELS_DIR")]
    NoHome,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub model: String,
    pub embedder: String,
    pub engine: EngineConfig,
    pub generation: GenerationConfig,
    pub memory: MemoryConfig,
    pub adapters: AdaptersConfig,
    pub vision: VisionConfig,
    pub ui: UiConfig,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VisionConfig {
    pub model: String,
    pub mode: String,
    pub caption_prompt: String,
    pub caption_tokens: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AdaptersConfig {
    pub bundled: bool,
    pub max_slots: usize,
    pub merge_threshold: f32,
    pub merge_rank: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EngineConfig {
    pub weights: String,
    pub context: usize,
    pub threads: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GenerationConfig {
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    pub repeat_penalty: f32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MemoryConfig {
    pub answer_memories: usize,
    pub update_candidates: usize,
    pub undecided_facts: crate::memory::pipeline::UndecidedFacts,
    pub constrained: bool,
    pub extract_window: usize,
    pub user_name: String,
    pub prompts: String,
    pub adapters: OperationAdapters,
}

/// The interactive app.
#[derive(Debug, Clone, Deserialize)]
pub struct UiConfig {
    /// "default" or "vim" (config/keymap-*.toml).
    pub keymap: String,
    /// "auto" | "kitty" | "sixel" | "iterm2" | "halfblocks" | "off".
    pub images: String,
    #[serde(default)]
    pub keys: KeyOverrides,
}

/// Single keys bound over the keymap, per section: key string → action name ("none"
/// removes the key). Keys directly under `[ui.keys]` bind in the global section.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct KeyOverrides {
    #[serde(flatten)]
    pub direct: BTreeMap<String, String>,
    #[serde(default)]
    pub global: BTreeMap<String, String>,
    #[serde(default)]
    pub input: BTreeMap<String, String>,
    #[serde(default)]
    pub browse: BTreeMap<String, String>,
}

/// Adapter names (or directories) per memory operation; empty = none.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct OperationAdapters {
    pub extract: String,
    pub update: String,
    pub generate: String,
    #[serde(default)]
    pub vision: String,
}

/// Where memlora keeps things. The data dir holds private data (memories,
/// adapters, logs) and is per profile; the model cache is shared between profiles.
#[derive(Debug, Clone)]
pub struct Paths {
    pub data_dir: PathBuf,
    pub models_dir: PathBuf,
    pub config_file: PathBuf,
}

impl Paths {
    /// `data_dir` and `models_dir` come from the command line or `MEMLORA_DATA_DIR` /
    /// `MEMLORA_MODELS_DIR` (clap reads the environment); otherwise the platform's
    /// directories are used.
    pub fn resolve(data_dir: Option<PathBuf>, models_dir: Option<PathBuf>) -> Result<Self, ConfigError> {
        let dirs = directories::ProjectDirs::from("", "", "memlora");
        let data_dir = match data_dir {
            Some(dir) => dir,
            None => dirs.as_ref().ok_or(ConfigError::NoHome)?.data_dir().to_path_buf(),
        };
        let models_dir = match models_dir {
            Some(dir) => dir,
            None => dirs.as_ref().ok_or(ConfigError::NoHome)?.cache_dir().join("models"),
        };
        // An explicit data dir is a self-contained profile: its config lives inside it.
        let config_file = match &dirs {
            Some(dirs) if !data_dir_is_explicit(&data_dir, dirs) => dirs.config_dir().join("config.toml"),
            _ => data_dir.join("config.toml"),
        };
        Ok(Self { data_dir, models_dir, config_file })
    }
}

/// Refuses a data dir holding a symlink that leads outside it: memlora writes memories,
/// adapters and logs through those paths, and private data written through such a link
/// would land (or overwrite a file) where the user did not put their profile. A data dir
/// that is itself a link is fine; its target is the profile.
pub fn check_data_dir_links(data_dir: &Path) -> Result<(), ConfigError> {
    let invalid = |message: String| ConfigError::Invalid { path: data_dir.display().to_string(), message };
    let root = std::fs::canonicalize(data_dir).map_err(|e| invalid(format!("cannot resolve the data dir: {e}")))?;
    let mut pending = vec![root.clone()];
    while let Some(dir) = pending.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| invalid(format!("cannot read {}: {e}", dir.display())))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_symlink() {
                let target = std::fs::read_link(&path).unwrap_or_default();
                // A dangling link is judged by where it points, as a write would follow it.
                let resolved = std::fs::canonicalize(&path).unwrap_or_else(|_| lexically_normal(&dir.join(&target)));
                if !resolved.starts_with(&root) {
                    return Err(ConfigError::Invalid {
                        path: path.display().to_string(),
                        message: format!(
                            "a symlink to {}, outside the data dir; memlora keeps private data only inside it (move the whole data dir instead, with --data-dir or MEMLORA_DATA_DIR)",
                            target.display()
                        ),
                    });
                }
            }
        }
    }
    Ok(())
}

/// `path` with `.` and `..` resolved by name alone (for a path that does not exist).
fn lexically_normal(path: &Path) -> PathBuf {
    let mut normal = PathBuf::new();
    for component in path.components() {
        match component {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                normal.pop();
            }
            other => normal.push(other),
        }
    }
    normal
}

fn data_dir_is_explicit(data_dir: &Path, dirs: &directories::ProjectDirs) -> bool {
    data_dir != dirs.data_dir()
}

impl Config {
    /// Defaults, then `user_file` if it exists, then `MEMLORA_*` variables.
    pub fn load(user_file: &Path) -> Result<Self, ConfigError> {
        let bytes = match std::fs::read(user_file) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(ConfigError::Invalid { path: user_file.display().to_string(), message: format!("cannot read: {e}") }),
        };
        Self::from_user_bytes(&bytes, user_file)
    }

    /// Defaults, then the bytes of the user's config file (named `user_file` in errors),
    /// then `MEMLORA_*` variables.
    pub fn from_user_bytes(bytes: &[u8], user_file: &Path) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid { path: user_file.display().to_string(), message };
        let user_text = check_user_text(bytes).map_err(invalid)?;
        let builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULT_CONFIG, config::FileFormat::Toml))
            .add_source(config::File::from_str(&user_text, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("MEMLORA")
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true)
                    // MEMLORA_DATA_DIR and MEMLORA_MODELS_DIR are paths, not settings.
                    .keep_prefix(false),
            );
        let built = builder.build().map_err(|e| invalid(e.to_string()))?;
        built.try_deserialize().map_err(|e| invalid(e.to_string()))
    }

    /// The embedded defaults alone (tests, and a fallback description of every key).
    pub fn defaults() -> Self {
        toml::from_str(DEFAULT_CONFIG).expect("embedded config/default.toml is valid")
    }
}

/// The user's config file as TOML text, refused when it is not UTF-8 or TOML, or sets a
/// key the defaults do not have (a misspelt key would otherwise be ignored without a word).
fn check_user_text(bytes: &[u8]) -> Result<String, String> {
    let text = String::from_utf8(bytes.to_vec())
        .map_err(|e| format!("not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to()))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let at = e.span().map_or(0, |span| span.start);
        let line = text.as_bytes()[..at.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1;
        format!("not valid TOML at line {line}: {}", e.message().trim_end())
    })?;
    let defaults: toml::Table = DEFAULT_CONFIG.parse().expect("embedded config/default.toml is valid");
    match unknown_key(&table, &defaults, "") {
        Some(key) => Err(format!("unknown key `{key}` (config/default.toml lists every setting)")),
        None => Ok(text),
    }
}

/// Tables whose keys are the user's own (key bindings), checked where they are used.
const FREE_FORM_TABLES: [&str; 1] = ["ui.keys"];

/// The first key of `table` (dotted, after `prefix`) that `known` does not have.
fn unknown_key(table: &toml::Table, known: &toml::Table, prefix: &str) -> Option<String> {
    table.iter().find_map(|(key, value)| {
        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        if FREE_FORM_TABLES.contains(&path.as_str()) {
            return None;
        }
        match (value, known.get(key)) {
            (_, None) => Some(path),
            (toml::Value::Table(inner), Some(toml::Value::Table(known_inner))) => unknown_key(inner, known_inner, &path),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dangling_links_are_judged_by_where_a_write_would_land() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("memory")).unwrap();
        // Inside, by way of `..`: fine.
        std::os::unix::fs::symlink("../adapters/not-yet", data.join("memory/shortcut")).unwrap();
        check_data_dir_links(&data).unwrap();
        // Out of the profile: refused, naming the link and its target.
        std::os::unix::fs::symlink("../../elsewhere/file", data.join("memory/escape")).unwrap();
        let message = check_data_dir_links(&data).unwrap_err().to_string();
        assert!(message.contains("memory/escape") && message.contains("../../elsewhere/file"), "{message}");
    }

    #[test]
    fn unreadable_misspelt_and_non_utf8_files_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        for (content, says) in [
            (&b"[engine]\nturbo = true\n"[..], "unknown key `engine.turbo`"),
            (b"[memory.adapters]\nextrct = \"x\"\n", "unknown key `memory.adapters.extrct`"),
            (b"[engine]\nweights = \"\xff\"\n", "not UTF-8 text (invalid byte at offset 20)"),
            (b"[engine\n", "not valid TOML at line 1"),
            (b"[engine]\nthreads = 1\nthreads = 2\n", "not valid TOML at line 3: duplicate key"),
            (b"[engine]\nthreads = \"many\"\n", "engine.threads"),
        ] {
            std::fs::write(&file, content).unwrap();
            let message = Config::load(&file).unwrap_err().to_string();
            assert!(message.starts_with(&format!("config {}: ", file.display())) && message.contains(says), "{message}");
            assert_eq!(message.lines().count(), 1, "{message}");
        }
        // A directory where the file should be is not silently skipped.
        std::fs::remove_file(&file).unwrap();
        std::fs::create_dir(&file).unwrap();
        assert!(Config::load(&file).unwrap_err().to_string().contains("cannot read"));
    }

    #[test]
    fn defaults_parse() {
        let config = Config::defaults();
        assert_eq!(config.model, "smollm2-135m-instruct");
        assert!(config.engine.context >= 512);
    }

    #[test]
    fn user_file_overrides_defaults_and_bad_file_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        std::fs::write(&file, "[generation]\nmax_tokens = 7\n").unwrap();
        let config = Config::load(&file).unwrap();
        assert_eq!(config.generation.max_tokens, 7);
        assert_eq!(config.model, "smollm2-135m-instruct");

        // Environment variables override the file.
        std::env::set_var("MEMLORA_ENGINE__CONTEXT", "777");
        let config = Config::load(&file).unwrap();
        std::env::remove_var("MEMLORA_ENGINE__CONTEXT");
        assert_eq!(config.engine.context, 777);
        assert_eq!(config.generation.max_tokens, 7);

        // Key strings keep their case (G is not g).
        std::fs::write(
            &file,
            "[ui]\nkeymap = \"vim\"\n[ui.keys]\n\"ctrl-y\" = \"help\"\n[ui.keys.browse]\nG = \"top\"\n\"ctrl-x\" = \"quit\"\n",
        )
        .unwrap();
        let config = Config::load(&file).unwrap();
        assert_eq!(config.ui.keymap, "vim");
        assert_eq!(config.ui.images, "auto");
        let keys: Vec<(&str, &str)> = config.ui.keys.browse.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(keys, [("G", "top"), ("ctrl-x", "quit")]);
        assert_eq!(config.ui.keys.direct.get("ctrl-y").map(String::as_str), Some("help"));
        assert!(config.ui.keys.global.is_empty());

        std::fs::write(&file, "[generation\nmax_tokens = ").unwrap();
        let err = Config::load(&file).unwrap_err().to_string();
        assert!(err.contains("config.toml"), "{err}");
    }
}
