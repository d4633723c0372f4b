//! The event log: one JSON record per line, appended and fsync'd before an operation is
//! acknowledged. Records of one `apply` batch are written together and the last one is
//! marked `end`, so that a crash in the middle of a batch loses the whole batch, never
//! half of it.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::state::State;
use super::{io_error, open_private_file, Memory, MemoryError, MemoryId};

pub const LOG_FILE: &str = "log.jsonl";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct LogRecord {
    /// 1, 2, 3, … without gaps.
    pub seq: u64,
    /// Unix seconds when the batch was applied.
    pub time: i64,
    /// The last record of its batch.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub end: bool,
    /// Set on the records of an undo: the seq of the last record of the batch it reverts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undo_of: Option<u64>,
    pub op: RecordOp,
}

/// Updates and deletes keep the old text, so that the log alone tells the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum RecordOp {
    Add {
        memory: Memory,
    },
    Update {
        id: MemoryId,
        old_text: String,
        new_text: String,
        /// The event time after the update.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        event_time: Option<String>,
        #[serde(with = "super::vectors::base64_f32")]
        embedding: Vec<f32>,
    },
    Delete {
        id: MemoryId,
        old_text: String,
    },
    /// A deleted memory brought back under its own id (an undone delete).
    Restore {
        memory: Memory,
    },
}

impl RecordOp {
    /// The memory the record changes.
    pub(super) fn id(&self) -> MemoryId {
        match self {
            RecordOp::Add { memory } | RecordOp::Restore { memory } => memory.id,
            RecordOp::Update { id, .. } | RecordOp::Delete { id, .. } => *id,
        }
    }
}

#[derive(Debug)]
pub(super) struct EventLog {
    path: PathBuf,
    file: File,
    /// Bytes of complete, acknowledged records; a failed append is cut back to it.
    len: u64,
    /// Lines (records) in those bytes, for errors that name a record.
    lines: usize,
}

impl EventLog {
    /// Opens or creates the log and replays it. A torn tail (a last line without its
    /// newline, or records of a batch whose `end` never made it to disk) was never
    /// acknowledged: it is cut off with a warning. Anything else that does not parse is an
    /// error naming the line: acknowledged data is never dropped silently.
    pub(super) fn open(path: &Path, dimension: usize) -> Result<(EventLog, State), MemoryError> {
        let (file, created) = open_private_file(path)?;
        if created {
            // The new directory entries (the log in `memory/`, `memory/` in the data dir) must
            // survive a crash as well as the records in them.
            for dir in path.ancestors().skip(1).take(2) {
                File::open(dir).and_then(|dir| dir.sync_all()).map_err(io_error("sync", dir))?;
            }
        }
        let mut state = State::new(dimension);
        let corrupt = |line: usize, reason: String| MemoryError::CorruptLog { path: path.to_owned(), line, reason };
        let mut reader = BufReader::new(&file);
        let mut line = Vec::new();
        let mut line_number = 0;
        let mut offset = 0u64;
        let mut len = 0u64;
        let mut lines = 0;
        let mut batch: Vec<(usize, LogRecord)> = Vec::new();
        loop {
            line.clear();
            let read = reader.read_until(b'\n', &mut line).map_err(io_error("read", path))?;
            if read == 0 || line.last() != Some(&b'\n') {
                break;
            }
            line_number += 1;
            offset += read as u64;
            let record: LogRecord =
                serde_json::from_slice(&line[..read - 1]).map_err(|error| corrupt(line_number, format!("not a log record: {error}")))?;
            let end = record.end;
            batch.push((line_number, record));
            if end {
                for (number, record) in batch.drain(..) {
                    state.apply(&record).map_err(|reason| corrupt(number, reason))?;
                }
                len = offset;
                lines = line_number;
            }
        }
        let file_len = file.metadata().map_err(io_error("read", path))?.len();
        if file_len > len {
            tracing::warn!(
                path = %path.display(),
                bytes = file_len - len,
                from_line = batch.first().map_or(line_number + 1, |(number, _)| *number),
                "memory log ends in an incomplete write that was never acknowledged; cutting it off"
            );
            file.set_len(len).and_then(|()| file.sync_all()).map_err(io_error("truncate", path))?;
        }
        Ok((EventLog { path: path.to_owned(), file, len, lines }, state))
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn lines(&self) -> usize {
        self.lines
    }

    /// Every acknowledged record, read back from the file (history and undo are rare, so
    /// the records are not kept in memory).
    pub(super) fn records(&self) -> Result<Vec<LogRecord>, MemoryError> {
        let file = File::open(&self.path).map_err(io_error("read", &self.path))?;
        let mut reader = BufReader::new(file.take(self.len));
        let mut records = Vec::with_capacity(self.lines);
        let mut line = Vec::new();
        for number in 1..=self.lines {
            line.clear();
            reader.read_until(b'\n', &mut line).map_err(io_error("read", &self.path))?;
            let record = serde_json::from_slice(line.strip_suffix(b"\n").unwrap_or(&line)).map_err(|error| MemoryError::CorruptLog {
                path: self.path.clone(),
                line: number,
                reason: format!("not a log record: {error}"),
            })?;
            records.push(record);
        }
        Ok(records)
    }

    /// Writes `records` in one piece and fsyncs. On failure the file is cut back to its
    /// previous length so that a later append does not follow a torn record.
    pub(super) fn append(&mut self, records: &[LogRecord]) -> Result<(), MemoryError> {
        let mut buffer = Vec::new();
        for record in records {
            // Serialising plain data into a Vec cannot fail; map it anyway instead of panicking.
            serde_json::to_writer(&mut buffer, record).map_err(|error| MemoryError::Io {
                action: "encode a record for",
                path: self.path.clone(),
                error: error.into(),
            })?;
            buffer.push(b'\n');
        }
        let written = self.file.write_all(&buffer).and_then(|()| self.file.sync_data());
        if let Err(error) = written {
            if let Err(cut) = self.file.set_len(self.len).and_then(|()| self.file.sync_data()) {
                tracing::warn!(path = %self.path.display(), error = %cut, "cannot cut the memory log back after a failed write");
            }
            return Err(MemoryError::Io { action: "append to", path: self.path.clone(), error });
        }
        self.len += buffer.len() as u64;
        self.lines += records.len();
        Ok(())
    }
}
