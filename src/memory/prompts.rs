//! The prompts of the memory operations: `config/prompts.toml`, embedded in the binary
//! and replaceable by a user file, rendered with minijinja.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::pipeline::Operation;
use crate::engine::{ChatMessage, OutputConstraint, Role};

const BUILTIN: &str = include_str!("../../config/prompts.toml");

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("cannot read prompts {}: {error}", .path.display())]
    Read { path: PathBuf, error: std::io::Error },
    #[error("prompts {source_name}: {message}")]
    Invalid { source_name: String, message: String },
    #[error("cannot render the {operation} prompt: {message}")]
    Render { operation: Operation, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptFile {
    version: u32,
    extract: PromptSpec,
    update: PromptSpec,
    generate: PromptSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptSpec {
    system: String,
    user: String,
    #[serde(default)]
    response_prefix: String,
    /// `None`: the caller's limit (generation answers use the config's).
    #[serde(default)]
    max_tokens: Option<usize>,
}

/// A prompt ready for the model.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderedPrompt {
    pub messages: Vec<ChatMessage>,
    /// The start of the assistant's answer, written for the model to continue.
    pub response_prefix: String,
    pub max_tokens: Option<usize>,
    /// What the answer (its prefix included) must be, when it is held to a grammar.
    pub constraint: Option<OutputConstraint>,
}

#[derive(Debug)]
pub struct Prompts {
    version: u32,
    file: PromptFile,
    env: minijinja::Environment<'static>,
}

impl Prompts {
    pub fn builtin() -> Prompts {
        // The embedded file is checked by a unit test; a failure here is a build defect.
        Prompts::parse(BUILTIN, "built-in config/prompts.toml").unwrap_or_else(|error| panic!("{error}"))
    }

    /// The built-in prompts, or the file at `path` when one is given.
    pub fn load(path: Option<&Path>) -> Result<Prompts, PromptError> {
        match path {
            None => Ok(Prompts::builtin()),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| PromptError::Read { path: path.to_owned(), error })?;
                Prompts::parse(&text, &path.display().to_string())
            }
        }
    }

    fn parse(text: &str, source_name: &str) -> Result<Prompts, PromptError> {
        let invalid = |message: String| PromptError::Invalid { source_name: source_name.to_owned(), message };
        let file: PromptFile = toml::from_str(text).map_err(|error| invalid(error.message().to_owned()))?;
        let mut env = minijinja::Environment::new();
        // Undefined variables are template mistakes, not empty strings.
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env.set_trim_blocks(false);
        for operation in Operation::ALL {
            let spec = file.spec(operation);
            if spec.max_tokens == Some(0) {
                return Err(invalid(format!("[{operation}] max_tokens must be at least 1")));
            }
            env.add_template_owned(operation.to_string(), spec.user.clone())
                .map_err(|error| invalid(format!("[{operation}] user template: {error}")))?;
        }
        Ok(Prompts { version: file.version, file, env })
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// The messages of `operation` for `context` (the variables its template uses).
    pub fn render(&self, operation: Operation, context: impl Serialize) -> Result<RenderedPrompt, PromptError> {
        let spec = self.file.spec(operation);
        let render_error = |error: minijinja::Error| PromptError::Render { operation, message: error.to_string() };
        let template = self.env.get_template(&operation.to_string()).map_err(render_error)?;
        let user = template.render(context).map_err(render_error)?;
        let mut messages = Vec::with_capacity(2);
        if !spec.system.is_empty() {
            messages.push(ChatMessage::new(Role::System, spec.system.clone()));
        }
        messages.push(ChatMessage::new(Role::User, user.trim_end().to_owned()));
        Ok(RenderedPrompt { messages, response_prefix: spec.response_prefix.clone(), max_tokens: spec.max_tokens, constraint: None })
    }
}

impl PromptFile {
    fn spec(&self, operation: Operation) -> &PromptSpec {
        match operation {
            Operation::Extract => &self.extract,
            Operation::Update => &self.update,
            Operation::Generate => &self.generate,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn builtin_prompts_render_every_operation() {
        let prompts = Prompts::builtin();
        let extract = prompts
            .render(Operation::Extract, json!({"date": "8 May 2023", "turns": [{"speaker": "Maya", "text": "I moved to Porto."}]}))
            .unwrap();
        assert_eq!(extract.messages.len(), 2);
        assert_eq!(extract.messages[1].content, "Date: 8 May 2023\nMaya: I moved to Porto.");
        assert_eq!(extract.response_prefix, r#"{"facts": [""#);
        let update = prompts
            .render(Operation::Update, json!({"fact": "Maya lives in Porto.", "memories": [{"id": 0, "text": "Maya lives in Lisbon."}]}))
            .unwrap();
        assert_eq!(update.messages[1].content, "Old memories:\n0: Maya lives in Lisbon.\nNew fact: Maya lives in Porto.");
        let generate = prompts
            .render(
                Operation::Generate,
                json!({"question": "Where does Maya live?", "memories": [{"text": "Maya lives in Porto.", "date": "9 June 2023"}]}),
            )
            .unwrap();
        assert_eq!(generate.messages[1].content, "Memories:\n- (9 June 2023) Maya lives in Porto.\n\nWhere does Maya live?");
        let without = prompts.render(Operation::Generate, json!({"question": "Hi?", "memories": []})).unwrap();
        assert_eq!(without.messages[1].content, "Hi?");
    }

    #[test]
    fn a_user_file_replaces_the_prompts_and_mistakes_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prompts.toml");
        let custom = BUILTIN.replace("version = 1", "version = 7").replace("New fact:", "Fact:");
        std::fs::write(&path, custom).unwrap();
        let prompts = Prompts::load(Some(&path)).unwrap();
        assert_eq!(prompts.version(), 7);
        let update = prompts.render(Operation::Update, json!({"fact": "x", "memories": []})).unwrap();
        assert!(update.messages[1].content.ends_with("Fact: x"));

        std::fs::write(&path, BUILTIN.replace("{{ fact }}", "{{ fact ")).unwrap();
        let error = Prompts::load(Some(&path)).unwrap_err().to_string();
        assert!(error.contains("prompts.toml") && error.contains("[update] user template"), "{error}");
        std::fs::write(&path, "version = 1\n").unwrap();
        assert!(Prompts::load(Some(&path)).unwrap_err().to_string().contains("missing field"));
        let missing = dir.path().join("nope.toml");
        assert!(Prompts::load(Some(&missing)).unwrap_err().to_string().contains("nope.toml"));
        // A variable the caller does not provide is an error, not an empty string.
        let prompts = Prompts::builtin();
        assert!(matches!(prompts.render(Operation::Update, json!({"memories": []})), Err(PromptError::Render { .. })));
    }
}
