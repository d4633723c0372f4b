//! Training data: JSON Lines of conversations, rendered with the model's own chat
//! template and tokenizer (the engine's code, so training sees exactly the prompt that
//! generation will build).
//!
//! A line is `{"messages": [{"role": "user", "content": "…"}, …]}` (the loss is on the
//! last assistant message; what follows it is ignored) or `{"prompt": "…",
//! "completion": "…"}` (one user turn and its answer). Blank lines are skipped.

use std::path::Path;

use serde::Deserialize;

use super::TrainError;
use crate::engine::{ChatMessage, ChatModel, Role};

/// One example: the tokens of the prompt (no loss) and of the answer (loss), the
/// answer's end-of-turn marker included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
}

impl Example {
    pub fn len(&self) -> usize {
        self.prompt.len() + self.completion.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Deserialize)]
struct Line {
    messages: Option<Vec<ChatMessage>>,
    prompt: Option<String>,
    completion: Option<String>,
}

/// The conversations of a JSONL file, each ending with the assistant message the loss
/// is on. Any malformed line fails the whole file, naming the line.
pub fn read_conversations(path: &Path) -> Result<Vec<Vec<ChatMessage>>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::Data { path: path.to_owned(), line: None, message: e.to_string() })?;
    let mut conversations = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| TrainError::Data { path: path.to_owned(), line: Some(i + 1), message };
        let record: Line = serde_json::from_str(line).map_err(|e| bad(format!("not a training example: {e}")))?;
        let messages = match record {
            Line { messages: Some(messages), prompt: None, completion: None } => {
                let last = messages
                    .iter()
                    .rposition(|m| m.role == Role::Assistant)
                    .ok_or_else(|| bad("\"messages\" has no assistant message to learn".into()))?;
                messages[..=last].to_vec()
            }
            Line { messages: None, prompt: Some(prompt), completion: Some(completion) } => {
                vec![ChatMessage::new(Role::User, prompt), ChatMessage::new(Role::Assistant, completion)]
            }
            _ => return Err(bad("expected {\"messages\": [...]} or {\"prompt\": ..., \"completion\": ...}".into())),
        };
        if messages.last().is_some_and(|m| m.content.is_empty()) {
            return Err(bad("the assistant message to learn is empty".into()));
        }
        conversations.push(messages);
    }
    Ok(conversations)
}

/// Tokenizes `conversations` with `chat`'s template; examples longer than `max_tokens`
/// are left out and counted.
pub fn tokenize(chat: &ChatModel, conversations: &[Vec<ChatMessage>], max_tokens: usize) -> Result<(Vec<Example>, usize), TrainError> {
    let mut examples = Vec::with_capacity(conversations.len());
    let mut skipped = 0;
    for messages in conversations {
        let (prompt, completion) = chat.example_tokens(messages)?;
        let example = Example { prompt, completion };
        if example.len() > max_tokens || example.completion.is_empty() {
            skipped += 1;
        } else {
            examples.push(example);
        }
    }
    Ok((examples, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Vec<Vec<ChatMessage>>, TrainError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.jsonl");
        std::fs::write(&path, text).unwrap();
        read_conversations(&path)
    }

    #[test]
    fn both_line_forms_are_read_and_the_last_answer_is_learned() {
        let got = read(concat!(
            r#"{"prompt": "2+2?", "completion": "4"}"#,
            "\n\n",
            r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "later"}], "id": 7}"#,
            "\n"
        ))
        .unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], [ChatMessage::new(Role::User, "2+2?"), ChatMessage::new(Role::Assistant, "4")]);
        assert_eq!(got[1].len(), 3);
        assert_eq!(got[1][2], ChatMessage::new(Role::Assistant, "Hello"));
    }

    #[test]
    fn malformed_lines_are_named() {
        let cases = [
            ("{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\"", "line 2: not a training example"),
            ("{\"prompt\": \"a\"}", "line 1: expected {\"messages\""),
            ("{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}", "line 1: \"messages\" has no assistant"),
            ("{\"messages\": [{\"role\": \"robot\", \"content\": \"a\"}]}", "line 1: not a training example: unknown variant `robot`"),
            ("{\"prompt\": \"a\", \"completion\": \"\"}", "line 1: the assistant message to learn is empty"),
        ];
        for (text, needle) in cases {
            let err = read(text).unwrap_err().to_string();
            assert!(err.contains("data.jsonl") && err.contains(needle) && !err.contains('\n'), "{err}");
        }
    }
}
