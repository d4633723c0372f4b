//! The durable memory store: an append-only event log (`DATA_DIR/memory/log.jsonl`, the
//! source of truth, fsync'd before an operation is acknowledged), a tantivy index derived
//! from it (`DATA_DIR/memory/index/`, rebuilt when missing, stale or damaged), and hybrid
//! retrieval: BM25 from tantivy plus embedding cosine over an in-memory matrix, fused by
//! reciprocal rank fusion.
//!
//! Embeddings are computed by the caller (the engine's embedder); the store never runs a
//! model. One process writes a data dir at a time: [`MemoryStore::open`] holds an OS lock
//! on `DATA_DIR/memory/LOCK` for the store's lifetime.

pub mod dates;
pub mod grounding;
mod index;
mod log;
pub mod parse;
pub mod pipeline;
pub mod prompts;
pub mod schema;
mod state;
#[cfg(test)]
pub(crate) mod tests;
pub mod transfer;
mod vectors;

use std::collections::{HashMap, HashSet};
use std::fs::{self, DirBuilder, File, TryLockError};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use index::MemoryIndex;
use log::{EventLog, LogRecord, RecordOp};
use state::State;

pub use log::LOG_FILE;

pub const MEMORY_DIR: &str = "memory";
pub const INDEX_DIR: &str = "index";
const LOCK_FILE: &str = "LOCK";

/// Reciprocal rank fusion constant (Cormack et al.): large enough that a single first
/// place does not outweigh agreement between the two rankers.
const RRF_K: f64 = 60.0;
/// Each ranker contributes at least this many candidates to the fusion, so that a memory
/// ranked moderately by both still surfaces.
const MIN_CANDIDATES: usize = 50;

/// Ids are assigned by the store, increase, and are never reused after a delete.
pub type MemoryId = u64;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot {action} {}: {error}", .path.display())]
    Io { action: &'static str, path: PathBuf, error: io::Error },

    #[error("data dir {} is in use by memlora ({})", .dir.display(), holder(*.pid))]
    Locked { dir: PathBuf, pid: Option<u32> },

    #[error("memory log {} line {line}: {reason}", .path.display())]
    CorruptLog { path: PathBuf, line: usize, reason: String },

    #[error("memory operation {index} of the batch is invalid: {reason}")]
    InvalidOp { index: usize, reason: String },

    #[error("the memory store's embedding dimension must be at least 1")]
    ZeroDimension,

    #[error("invalid memory query: {reason}")]
    InvalidQuery { reason: String },

    #[error("memory index {}: {error}", .path.display())]
    Index { path: PathBuf, error: tantivy::TantivyError },

    /// The batch is saved and acknowledged (`applied`), but keyword search does not see it
    /// yet: the index catches up on the next successful write or open.
    #[error("memory changes up to seq {} are saved, but the index was not updated: {reason}", .applied.last().map_or(0, |a| a.seq))]
    IndexBehind { applied: Vec<Applied>, reason: String },

    #[error("memory index {} does not match the log: {reason}", .path.display())]
    IndexMismatch { path: PathBuf, reason: String },
}

/// The acknowledgements of an `apply`, counting a lagging index as success: the batch is
/// saved, and keyword search catches up on the next write or open. The lag is logged.
pub fn saved(result: Result<Vec<Applied>, MemoryError>) -> Result<Vec<Applied>, MemoryError> {
    match result {
        Err(MemoryError::IndexBehind { applied, reason }) => {
            tracing::warn!(%reason, "memories saved; keyword search catches up on the next write");
            Ok(applied)
        }
        other => other,
    }
}

fn holder(pid: Option<u32>) -> String {
    match pid {
        Some(pid) => format!("pid {pid}"),
        None => "pid unknown".to_owned(),
    }
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> MemoryError + 'a {
    move |error| MemoryError::Io { action, path: path.to_owned(), error }
}

/// Where a memory came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemorySource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub turns: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    pub id: MemoryId,
    pub text: String,
    /// Who the memory is about or who said it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Unix seconds.
    pub created: i64,
    /// Unix seconds; equals `created` until the first update.
    pub updated: i64,
    /// The time the memory refers to as written in the conversation ("7 May 2023").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time: Option<String>,
    #[serde(default)]
    pub source: MemorySource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
    /// Stored as base64 of little-endian f32s: exact, and half the size of decimal text.
    #[serde(with = "vectors::base64_f32")]
    pub embedding: Vec<f32>,
}

/// One change requested by the caller (the memory-update step of the pipeline).
#[derive(Debug, Clone, PartialEq)]
pub enum MemoryOp {
    Add {
        text: String,
        subject: Option<String>,
        event_time: Option<String>,
        source: MemorySource,
        image: Option<PathBuf>,
        embedding: Vec<f32>,
        /// Unix seconds; `None` = the batch's time. Imports keep the original time.
        created: Option<i64>,
    },
    Update {
        id: MemoryId,
        text: String,
        /// `None` keeps the memory's event time.
        event_time: Option<String>,
        embedding: Vec<f32>,
    },
    Delete {
        id: MemoryId,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Add,
    Update,
    Delete,
    /// A deleted memory back under its own id (`undo` of a delete).
    Restore,
}

/// An acknowledged operation: its log record is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Applied {
    pub seq: u64,
    pub id: MemoryId,
    pub kind: OpKind,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TimeField {
    #[default]
    Created,
    Updated,
}

/// Restricts listing and both rankers of a search. Bounds are inclusive unix seconds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryFilter {
    /// Compared case-insensitively with the memory's subject.
    pub subject: Option<String>,
    pub from: Option<i64>,
    pub until: Option<i64>,
    pub time_field: TimeField,
}

impl MemoryFilter {
    fn is_empty(&self) -> bool {
        self.subject.is_none() && self.from.is_none() && self.until.is_none()
    }

    fn matches(&self, memory: &Memory) -> bool {
        let time = match self.time_field {
            TimeField::Created => memory.created,
            TimeField::Updated => memory.updated,
        };
        self.from.is_none_or(|from| time >= from)
            && self.until.is_none_or(|until| time <= until)
            && self.subject.as_deref().is_none_or(|wanted| memory.subject.as_deref().is_some_and(|s| subject_key(s) == subject_key(wanted)))
    }
}

/// The form of a subject that filters compare.
fn subject_key(subject: &str) -> String {
    subject.trim().to_lowercase()
}

#[derive(Debug, Clone, PartialEq)]
pub struct SearchQuery {
    /// Searched with BM25 over text, subject and event time; any characters are allowed.
    pub text: String,
    /// The query's embedding; `None` searches by keywords only.
    pub embedding: Option<Vec<f32>>,
    pub top_k: usize,
    pub filter: MemoryFilter,
}

impl Default for SearchQuery {
    fn default() -> SearchQuery {
        SearchQuery { text: String::new(), embedding: None, top_k: 10, filter: MemoryFilter::default() }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SearchHit {
    pub memory: Memory,
    /// Reciprocal rank fusion score: the sum of `1 / (60 + rank)` over the rankers.
    pub score: f64,
    /// 1-based rank among the BM25 candidates, if it was one.
    pub bm25_rank: Option<usize>,
    /// 1-based rank among the cosine candidates, if it was one.
    pub vector_rank: Option<usize>,
}

/// One record of the log, as `memory history` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryEntry {
    pub seq: u64,
    /// Unix seconds.
    pub time: i64,
    pub id: MemoryId,
    #[serde(flatten)]
    pub change: Change,
    /// The last seq of the batch this entry reverts, when it is part of an undo.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub undo_of: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    Added { text: String },
    Updated { old_text: String, new_text: String },
    Deleted { old_text: String },
    Restored { text: String },
}

impl From<&LogRecord> for HistoryEntry {
    fn from(record: &LogRecord) -> HistoryEntry {
        let change = match &record.op {
            RecordOp::Add { memory } => Change::Added { text: memory.text.clone() },
            RecordOp::Update { old_text, new_text, .. } => Change::Updated { old_text: old_text.clone(), new_text: new_text.clone() },
            RecordOp::Delete { old_text, .. } => Change::Deleted { old_text: old_text.clone() },
            RecordOp::Restore { memory } => Change::Restored { text: memory.text.clone() },
        };
        HistoryEntry { seq: record.seq, time: record.time, id: record.op.id(), change, undo_of: record.undo_of }
    }
}

/// What [`MemoryStore::undo`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Undone {
    /// The batch that was reverted.
    pub reverted: Vec<HistoryEntry>,
    /// The inverse changes, acknowledged.
    pub applied: Vec<Applied>,
}

/// The memory store of one data dir. Only one exists per data dir at a time, across
/// processes.
pub struct MemoryStore {
    dir: PathBuf,
    log: EventLog,
    state: State,
    index: MemoryIndex,
    // Declared last so that the lock is released only after the log and index are closed.
    _lock: File,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").field("dir", &self.dir).field("len", &self.state.len()).field("seq", &self.state.seq()).finish()
    }
}

impl MemoryStore {
    /// Opens (creating if needed) the store in `data_dir/memory/` for embeddings of
    /// `dimension` floats: locks it, replays the log, and brings the index up to date.
    pub fn open(data_dir: &Path, dimension: usize) -> Result<MemoryStore, MemoryError> {
        if dimension == 0 {
            return Err(MemoryError::ZeroDimension);
        }
        let dir = data_dir.join(MEMORY_DIR);
        create_private_dir(&dir)?;
        let lock = lock_dir(data_dir, &dir.join(LOCK_FILE))?;
        let (log, state) = EventLog::open(&dir.join(LOG_FILE), dimension)?;
        let index = MemoryIndex::open(&dir.join(INDEX_DIR), &state)?;
        Ok(MemoryStore { dir, log, state, index, _lock: lock })
    }

    /// `DATA_DIR/memory`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn dimension(&self) -> usize {
        self.state.dimension()
    }

    pub fn len(&self) -> usize {
        self.state.len()
    }

    pub fn is_empty(&self) -> bool {
        self.state.len() == 0
    }

    /// The sequence number of the last record in the log (0 for an empty log).
    pub fn seq(&self) -> u64 {
        self.state.seq()
    }

    pub fn get(&self, id: MemoryId) -> Option<Memory> {
        self.state.get(id)
    }

    /// The live memories that pass `filter`, by id.
    pub fn list(&self, filter: &MemoryFilter) -> Vec<Memory> {
        self.state.list(filter)
    }

    /// Applies `ops` with the current time; see [`MemoryStore::apply_at`].
    pub fn apply(&mut self, ops: Vec<MemoryOp>) -> Result<Vec<Applied>, MemoryError> {
        self.apply_at(ops, now())
    }

    /// Applies `ops` as one batch stamped `now` (unix seconds; imports of old
    /// conversations pass their own time). Every op is checked first, so an invalid batch
    /// changes nothing. The batch is acknowledged once its records are fsync'd; if the index
    /// then fails to update, [`MemoryError::IndexBehind`] still carries the acknowledgements.
    pub fn apply_at(&mut self, ops: Vec<MemoryOp>, now: i64) -> Result<Vec<Applied>, MemoryError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let records = self.plan(ops, now)?;
        self.commit(records)
    }

    /// Appends `records` (checked against the state) as one batch, then applies them to the
    /// state and the index.
    fn commit(&mut self, records: Vec<LogRecord>) -> Result<Vec<Applied>, MemoryError> {
        let first_line = self.log.lines() + 1;
        self.log.append(&records)?;
        let index_was_current = self.index.seq() == self.state.seq();
        let mut applied = Vec::with_capacity(records.len());
        for (offset, record) in records.iter().enumerate() {
            // `plan` checked these records against this state, so this only fails on a bug;
            // the next open would refuse the same line.
            self.state.apply(record).map_err(|reason| MemoryError::CorruptLog {
                path: self.log.path().to_owned(),
                line: first_line + offset,
                reason,
            })?;
            let (id, kind) = match &record.op {
                RecordOp::Add { memory } => (memory.id, OpKind::Add),
                RecordOp::Update { id, .. } => (*id, OpKind::Update),
                RecordOp::Delete { id, .. } => (*id, OpKind::Delete),
                RecordOp::Restore { memory } => (memory.id, OpKind::Restore),
            };
            applied.push(Applied { seq: record.seq, id, kind });
        }
        // A previous index failure leaves the index behind the log; then this commit must
        // carry every change since, not just this batch, before it records the new seq.
        let touched: Vec<MemoryId> =
            if index_was_current { applied.iter().map(|a| a.id).collect() } else { self.state.touched_since(self.index.seq()) };
        match self.index.apply(&touched, &self.state) {
            Ok(()) => Ok(applied),
            Err(error) => Err(MemoryError::IndexBehind { reason: error.to_string(), applied }),
        }
    }

    /// Checks `ops` against the current state and turns them into log records.
    fn plan(&self, ops: Vec<MemoryOp>, now: i64) -> Result<Vec<LogRecord>, MemoryError> {
        let mut next_id = self.state.next_id();
        let mut gone = HashSet::new();
        let count = ops.len();
        let mut records = Vec::with_capacity(count);
        for (index, op) in ops.into_iter().enumerate() {
            let invalid = |reason: String| MemoryError::InvalidOp { index, reason };
            let live = |id: MemoryId| {
                self.state.get_row(id).filter(|_| !gone.contains(&id)).ok_or_else(|| invalid(format!("no memory with id {id}")))
            };
            let op = match op {
                MemoryOp::Add { text, subject, event_time, source, image, embedding, created } => {
                    check_text(&text).map_err(invalid)?;
                    self.state.check_embedding(&embedding).map_err(invalid)?;
                    let id = next_id;
                    next_id += 1;
                    RecordOp::Add {
                        memory: Memory {
                            id,
                            text,
                            subject: subject.filter(|s| !s.trim().is_empty()),
                            created: created.unwrap_or(now),
                            updated: created.unwrap_or(now),
                            event_time: event_time.filter(|t| !t.trim().is_empty()),
                            source,
                            image,
                            embedding,
                        },
                    }
                }
                MemoryOp::Update { id, text, event_time, embedding } => {
                    let old = live(id)?;
                    check_text(&text).map_err(invalid)?;
                    self.state.check_embedding(&embedding).map_err(invalid)?;
                    let event_time = event_time.filter(|t| !t.trim().is_empty()).or_else(|| old.event_time.clone());
                    RecordOp::Update { id, old_text: old.text.clone(), new_text: text, event_time, embedding }
                }
                MemoryOp::Delete { id } => {
                    let old = live(id)?;
                    let old_text = old.text.clone();
                    gone.insert(id);
                    RecordOp::Delete { id, old_text }
                }
            };
            records.push(LogRecord { seq: self.state.seq() + index as u64 + 1, time: now, end: index + 1 == count, undo_of: None, op });
        }
        Ok(records)
    }

    /// Hybrid retrieval: BM25 and cosine candidates (each restricted by the filter first),
    /// fused by reciprocal rank; ties go to the lower id.
    pub fn search(&self, query: &SearchQuery) -> Result<Vec<SearchHit>, MemoryError> {
        if query.top_k == 0 || self.state.len() == 0 {
            return Ok(Vec::new());
        }
        // Never more candidates than memories: a caller's top_k may be absurd, and
        // tantivy sizes its heap by it.
        let candidates = query.top_k.saturating_mul(4).max(MIN_CANDIDATES).min(self.state.len());
        let bm25 = self.index.search(&query.text, &query.filter, candidates)?;
        let vector = match &query.embedding {
            Some(embedding) => {
                self.state.check_embedding(embedding).map_err(|reason| MemoryError::InvalidQuery { reason })?;
                self.state.nearest(embedding, &query.filter, candidates)
            }
            None => Vec::new(),
        };
        let mut fused: Vec<(MemoryId, f64, Option<usize>, Option<usize>)> = Vec::with_capacity(bm25.len() + vector.len());
        for (rank, id) in bm25.iter().enumerate() {
            fused.push((*id, 1.0 / (RRF_K + (rank + 1) as f64), Some(rank + 1), None));
        }
        for (rank, id) in vector.iter().enumerate() {
            let score = 1.0 / (RRF_K + (rank + 1) as f64);
            match fused.iter_mut().find(|entry| entry.0 == *id) {
                Some(entry) => {
                    entry.1 += score;
                    entry.3 = Some(rank + 1);
                }
                None => fused.push((*id, score, None, Some(rank + 1))),
            }
        }
        fused.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        Ok(fused
            .into_iter()
            // An id missing from the state would be an index bug that verify reports; the
            // search still answers from what is live.
            .filter_map(|(id, score, bm25_rank, vector_rank)| {
                self.state.get(id).map(|memory| SearchHit { memory, score, bm25_rank, vector_rank })
            })
            .take(query.top_k)
            .collect())
    }

    /// The log, oldest first, as changes to memories; `id` restricts it to one memory.
    pub fn history(&self, id: Option<MemoryId>) -> Result<Vec<HistoryEntry>, MemoryError> {
        Ok(self.log.records()?.iter().map(HistoryEntry::from).filter(|entry| id.is_none_or(|id| entry.id == id)).collect())
    }

    /// Reverts the most recent batch that is not an undo and not undone yet; see
    /// [`MemoryStore::undo_at`].
    pub fn undo(&mut self) -> Result<Option<Undone>, MemoryError> {
        self.undo_at(now())
    }

    /// Reverts the most recent batch (one `apply`: an added memory, the decisions of one
    /// conversation turn, an import) that is not itself an undo and was not undone yet,
    /// by appending the inverse changes as a new batch: the log stays append-only and the
    /// undo shows in the history. Undoing again goes one batch further back. `None` when
    /// there is nothing left to undo.
    pub fn undo_at(&mut self, now: i64) -> Result<Option<Undone>, MemoryError> {
        let records = self.log.records()?;
        let undone: HashSet<u64> = records.iter().filter_map(|record| record.undo_of).collect();
        let mut batches: Vec<&[LogRecord]> = Vec::new();
        let mut start = 0;
        for (index, record) in records.iter().enumerate() {
            if record.end {
                batches.push(&records[start..=index]);
                start = index + 1;
            }
        }
        for batch in batches.into_iter().rev() {
            let (Some(first), Some(last)) = (batch.first(), batch.last()) else { continue };
            if first.undo_of.is_some() || undone.contains(&last.seq) {
                continue;
            }
            let inverse = self.inverse_of(batch, &records);
            if inverse.is_empty() {
                continue;
            }
            let count = inverse.len();
            let records = inverse
                .into_iter()
                .enumerate()
                .map(|(index, op)| LogRecord {
                    seq: self.state.seq() + index as u64 + 1,
                    time: now,
                    end: index + 1 == count,
                    undo_of: Some(last.seq),
                    op,
                })
                .collect();
            let reverted = batch.iter().map(HistoryEntry::from).collect();
            let applied = self.commit(records)?;
            return Ok(Some(Undone { reverted, applied }));
        }
        Ok(None)
    }

    /// The changes that bring every memory `batch` touched back to how it was before the
    /// batch. Every later batch is undone already, so the live state is the state right
    /// after `batch`.
    fn inverse_of(&self, batch: &[LogRecord], records: &[LogRecord]) -> Vec<RecordOp> {
        let mut touched: Vec<MemoryId> = batch.iter().map(|record| record.op.id()).collect();
        touched.sort_unstable();
        touched.dedup();
        let first_seq = batch.first().map_or(0, |record| record.seq);
        // The touched memories that were live before the batch, as they were then.
        let mut before: HashMap<MemoryId, Memory> = HashMap::new();
        for record in records.iter().take_while(|record| record.seq < first_seq) {
            let id = record.op.id();
            if touched.binary_search(&id).is_err() {
                continue;
            }
            match &record.op {
                RecordOp::Add { memory } | RecordOp::Restore { memory } => {
                    before.insert(id, memory.clone());
                }
                RecordOp::Update { new_text, event_time, embedding, .. } => {
                    if let Some(memory) = before.get_mut(&id) {
                        memory.text = new_text.clone();
                        memory.event_time = event_time.clone();
                        memory.embedding = embedding.clone();
                        memory.updated = record.time;
                    }
                }
                RecordOp::Delete { .. } => {
                    before.remove(&id);
                }
            }
        }
        let mut inverse = Vec::new();
        for id in touched {
            match (self.state.get(id), before.remove(&id)) {
                (Some(now), None) => inverse.push(RecordOp::Delete { id, old_text: now.text }),
                (None, Some(then)) => inverse.push(RecordOp::Restore { memory: then }),
                (Some(now), Some(then))
                    if now.text != then.text || now.event_time != then.event_time || now.embedding != then.embedding =>
                {
                    inverse.push(RecordOp::Update {
                        id,
                        old_text: now.text,
                        new_text: then.text,
                        event_time: then.event_time,
                        embedding: then.embedding,
                    })
                }
                _ => {}
            }
        }
        inverse
    }

    /// Checks that the index holds exactly the live memories of the log (ids and texts) and
    /// is marked with the log's last seq.
    pub fn verify(&self) -> Result<(), MemoryError> {
        self.index.verify(&self.state)
    }
}

/// Unix seconds now.
pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs() as i64)
}

fn check_text(text: &str) -> Result<(), String> {
    if text.trim().is_empty() {
        return Err("the memory text is empty".into());
    }
    Ok(())
}

/// Creates `dir` (and missing parents) readable by the owner only, and tightens an existing
/// one: memories are private data.
fn create_private_dir(dir: &Path) -> Result<(), MemoryError> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_error("create", dir))?;
    // Only when needed: setting a mode is a write, which a read-only file system refuses
    // even when the mode is already right.
    if fs::metadata(dir).map_err(io_error("read", dir))?.permissions().mode() & 0o777 != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_error("set permissions of", dir))?;
    }
    Ok(())
}

/// Opens a private (0600) file for reading and appending, creating it if needed; the bool
/// says whether it was created.
fn open_private_file(path: &Path) -> Result<(File, bool), MemoryError> {
    let existed = path.exists();
    let file = File::options().read(true).append(true).create(true).mode(0o600).open(path).map_err(io_error("open", path))?;
    if existed {
        file.set_permissions(fs::Permissions::from_mode(0o600)).map_err(io_error("set permissions of", path))?;
    }
    Ok((file, !existed))
}

/// Takes the exclusive lock of the data dir and writes our pid into the lock file, so that a
/// second process can say who holds it. The OS releases the lock when the file closes, even
/// on a crash, so a stale lock file never blocks.
fn lock_dir(data_dir: &Path, path: &Path) -> Result<File, MemoryError> {
    let (mut file, _) = open_private_file(path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut content = String::new();
            // The holder may not have written its pid yet; the error then says "pid unknown".
            let pid = file.read_to_string(&mut content).ok().and_then(|_| content.trim().parse().ok());
            return Err(MemoryError::Locked { dir: data_dir.to_owned(), pid });
        }
        Err(TryLockError::Error(error)) => return Err(MemoryError::Io { action: "lock", path: path.to_owned(), error }),
    }
    file.set_len(0).map_err(io_error("write", path))?;
    file.write_all(format!("{}\n", std::process::id()).as_bytes()).map_err(io_error("write", path))?;
    Ok(file)
}
