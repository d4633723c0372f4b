use std::path::PathBuf;

/// Everything that can go wrong loading or running a model. Messages are one
/// line and name the file or adapter concerned.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: {message}")]
    BadModelFile { path: PathBuf, message: String },
    #[error("{path}: unsupported architecture '{architecture}' (supported: llama, qwen2)")]
    UnknownArchitecture { path: PathBuf, architecture: String },
    #[error("{path}: no tokenizer: {message}")]
    MissingTokenizer { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("adapter '{name}': {message}")]
    AdapterMismatch { name: String, message: String },
    #[error("adapter '{0}' is not loaded")]
    UnknownAdapter(String),
    #[error("prompt has {prompt_tokens} tokens but the context holds {context} (with {reserved} reserved for the answer); shorten the message or raise engine.context")]
    PromptTooLong { prompt_tokens: usize, context: usize, reserved: usize },
    #[error("nothing to run: the prompt has no tokens")]
    EmptyPrompt,
    #[error("image features do not fit the prompt: {0}")]
    Splice(String),
    #[error("image: {0}")]
    Image(String),
    #[error("constrained decoding: {0}")]
    Constraint(String),
    #[error("model computation failed: {}", first_line(.0))]
    Compute(#[from] candle_core::Error),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

pub(crate) fn bad_file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> EngineError {
    EngineError::BadModelFile { path: path.into(), message: first_line(&message) }
}

/// candle appends a backtrace to some error messages when RUST_BACKTRACE is
/// set; errors here are one line.
fn first_line(message: &impl std::fmt::Display) -> String {
    message.to_string().lines().next().unwrap_or_default().to_string()
}
