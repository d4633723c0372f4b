//! The JSON schemas the extraction and update operations are decoded under. They say
//! what the prompts' examples say, and no more: the separators the prompts (and the
//! experts' training answers) use, a bounded number of facts, and for update decisions
//! only the ids that were shown — an ADD under the id one past them, as distill writes it.

use serde_json::{json, Value};

use crate::engine::OutputConstraint;

/// Facts one extraction may write.
pub const MAX_FACTS: usize = 6;
/// Characters of one fact or memory text: a sentence, not a paragraph.
pub const MAX_TEXT_CHARS: usize = 240;
/// Decisions one update may write about its one fact.
pub const MAX_DECISIONS: usize = 3;

/// `{"facts": [string, …]}` as the prompts write it (`", "` and `": "`, no other spacing).
/// An empty list is allowed, and so is a blank string, which the first experts write for
/// "nothing" after the pre-filled `["` and the parser drops.
pub fn facts() -> OutputConstraint {
    facts_bounded(MAX_FACTS, MAX_TEXT_CHARS)
}

/// [`facts`] with other bounds (tests that must fit a tiny model's context).
pub fn facts_bounded(max_facts: usize, max_chars: usize) -> OutputConstraint {
    with_prompt_spacing(json!({
        "type": "object",
        "properties": {
            "facts": {"type": "array", "items": {"type": "string", "maxLength": max_chars}, "maxItems": max_facts}
        },
        "required": ["facts"],
        "additionalProperties": false
    }))
}

/// `{"memory": [{"id", "text", "event", "old_memory"?}, …]}` for `shown` old memories
/// (ids "0" … shown−1): UPDATE, DELETE and NONE name one of them; ADD uses the id
/// `shown`, as the update training answers do.
pub fn memory_ops(shown: usize) -> OutputConstraint {
    memory_ops_bounded(shown, MAX_TEXT_CHARS)
}

/// [`memory_ops`] with another bound on texts.
pub fn memory_ops_bounded(shown: usize, max_chars: usize) -> OutputConstraint {
    let text = json!({"type": "string", "maxLength": max_chars});
    let add = json!({
        "type": "object",
        "properties": {"id": {"const": shown.to_string()}, "text": text, "event": {"const": "ADD"}},
        "required": ["id", "text", "event"],
        "additionalProperties": false
    });
    let mut decisions = vec![add];
    if shown > 0 {
        let ids: Vec<String> = (0..shown).map(|id| id.to_string()).collect();
        decisions.push(json!({
            "type": "object",
            "properties": {
                "id": {"enum": ids},
                "text": text,
                "event": {"enum": ["UPDATE", "DELETE", "NONE"]},
                "old_memory": text
            },
            "required": ["id", "text", "event"],
            "additionalProperties": false
        }));
    }
    with_prompt_spacing(json!({
        "type": "object",
        "properties": {
            "memory": {"type": "array", "items": {"anyOf": decisions}, "minItems": 1, "maxItems": MAX_DECISIONS}
        },
        "required": ["memory"],
        "additionalProperties": false
    }))
}

fn with_prompt_spacing(mut schema: Value) -> OutputConstraint {
    schema["x-guidance"] = json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "});
    OutputConstraint::JsonSchema(schema)
}
