//! Export and import of memories: JSON Lines (one memory per line, without embeddings, so
//! that a file moves between machines and embedders) and a Markdown view for reading.

use std::io::{self, BufRead, Read, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Memory, MemoryId, MemorySource};

/// Longest accepted import line: a memory is a sentence, not a document.
const MAX_LINE_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("cannot read {name}: {error}")]
    Read { name: String, error: io::Error },
    #[error("{name} line {line}: {reason}")]
    Line { name: String, line: usize, reason: String },
}

/// One memory as exported; every field but `text` is optional on import.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryRecord {
    /// The id in the exporting store; informational, a store assigns its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<MemoryId>,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time: Option<String>,
    #[serde(default, skip_serializing_if = "is_default_source")]
    pub source: MemorySource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
}

fn is_default_source(source: &MemorySource) -> bool {
    *source == MemorySource::default()
}

impl From<&Memory> for MemoryRecord {
    fn from(memory: &Memory) -> MemoryRecord {
        MemoryRecord {
            id: Some(memory.id),
            text: memory.text.clone(),
            subject: memory.subject.clone(),
            created: Some(memory.created),
            updated: Some(memory.updated),
            event_time: memory.event_time.clone(),
            source: memory.source.clone(),
            image: memory.image.clone(),
        }
    }
}

pub fn write_jsonl(memories: &[Memory], out: &mut dyn Write) -> io::Result<()> {
    for memory in memories {
        serde_json::to_writer(&mut *out, &MemoryRecord::from(memory))?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// Memories grouped by subject, each with its event time and id.
pub fn write_markdown(memories: &[Memory], out: &mut dyn Write) -> io::Result<()> {
    writeln!(out, "# Memories\n")?;
    let mut subjects: Vec<Option<&str>> = memories.iter().map(|m| m.subject.as_deref()).collect();
    subjects.sort();
    subjects.dedup();
    for subject in subjects {
        writeln!(out, "## {}\n", subject.unwrap_or("Other"))?;
        for memory in memories.iter().filter(|m| m.subject.as_deref() == subject) {
            let text = memory.text.replace('\n', " ");
            match &memory.event_time {
                Some(time) => writeln!(out, "- {text} _({time}; #{})_", memory.id)?,
                None => writeln!(out, "- {text} _(#{})_", memory.id)?,
            }
        }
        writeln!(out)?;
    }
    Ok(())
}

/// Reads every record of a JSON Lines export, or fails naming the first bad line: an
/// import applies all of a file or nothing.
pub fn read_jsonl(reader: &mut dyn BufRead, name: &str) -> Result<Vec<MemoryRecord>, TransferError> {
    let mut records = Vec::new();
    let mut line = Vec::new();
    let mut number = 0;
    loop {
        line.clear();
        // Read at most one byte past the limit, so that a huge line cannot fill memory.
        let read = Read::take(&mut *reader, MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|error| TransferError::Read { name: name.to_owned(), error })?;
        if read == 0 {
            break;
        }
        number += 1;
        let bad = |reason: String| TransferError::Line { name: name.to_owned(), line: number, reason };
        if line.len() > MAX_LINE_BYTES {
            return Err(bad(format!("longer than {MAX_LINE_BYTES} bytes")));
        }
        let text = std::str::from_utf8(&line).map_err(|_| bad("not UTF-8".into()))?.trim();
        if text.is_empty() {
            continue;
        }
        let record: MemoryRecord = serde_json::from_str(text).map_err(|error| bad(format!("not a memory record: {error}")))?;
        if record.text.trim().is_empty() {
            return Err(bad("the memory text is empty".into()));
        }
        records.push(record);
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(id: MemoryId, text: &str, subject: Option<&str>) -> Memory {
        Memory {
            id,
            text: text.into(),
            subject: subject.map(Into::into),
            created: 100,
            updated: 200,
            event_time: Some("8 May 2023".into()),
            source: MemorySource { conversation: Some("conv-1".into()), session: None, turns: vec!["D1:2".into()] },
            image: None,
            embedding: vec![1.0, 0.0],
        }
    }

    #[test]
    fn jsonl_round_trips_without_embeddings() {
        let memories = [memory(1, "Maya lives in Porto", Some("Maya")), memory(4, "Tom plays chess", None)];
        let mut out = Vec::new();
        write_jsonl(&memories, &mut out).unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(!text.contains("embedding"));
        let records = read_jsonl(&mut out.as_slice(), "export.jsonl").unwrap();
        assert_eq!(records, memories.iter().map(MemoryRecord::from).collect::<Vec<_>>());
        assert_eq!(records[0].created, Some(100));
    }

    #[test]
    fn bad_lines_are_named_and_nothing_is_returned() {
        let cases = [
            ("{\"text\": \"ok\"}\n{\"text\": \n", 2, "not a memory record"),
            ("\n{\"text\": \"  \"}\n", 2, "empty"),
            ("{\"text\": \"ok\", \"colour\": 1}\n", 1, "unknown field"),
            ("{\"subject\": \"x\"}\n", 1, "missing field `text`"),
            ("[1, 2]\n", 1, "not a memory record"),
        ];
        for (input, line, reason) in cases {
            let error = read_jsonl(&mut input.as_bytes(), "in.jsonl").unwrap_err().to_string();
            assert!(error.starts_with(&format!("in.jsonl line {line}: ")) && error.contains(reason), "{input:?}: {error}");
        }
        let invalid_utf8 = b"{\"text\": \"\xff\"}\n".to_vec();
        assert!(read_jsonl(&mut invalid_utf8.as_slice(), "x").unwrap_err().to_string().contains("not UTF-8"));
        let huge = format!("{{\"text\": \"{}\"}}\n", "a".repeat(MAX_LINE_BYTES));
        assert!(read_jsonl(&mut huge.as_bytes(), "x").unwrap_err().to_string().contains("longer than"));
    }

    #[test]
    fn markdown_groups_by_subject() {
        let memories =
            [memory(1, "Maya lives in Porto", Some("Maya")), memory(2, "Tom plays chess", Some("Tom")), memory(3, "It rained", None)];
        let mut out = Vec::new();
        write_markdown(&memories, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "# Memories\n\n## Other\n\n- It rained _(8 May 2023; #3)_\n\n## Maya\n\n- Maya lives in Porto _(8 May 2023; #1)_\n\n## Tom\n\n- Tom plays chess _(8 May 2023; #2)_\n\n"
        );
    }
}
