//! The live memories in RAM, as the log's replay leaves them.

use std::collections::HashMap;

use super::log::{LogRecord, RecordOp};
use super::vectors::{norm, Matrix};
use super::{Memory, MemoryFilter, MemoryId};

/// Row `i` of `rows` and of `matrix` belong to the same memory. The rows' own `embedding`
/// is left empty: the matrix holds the only copy (100k × 384 floats is 150 MB).
#[derive(Debug)]
pub(super) struct State {
    rows: Vec<Memory>,
    matrix: Matrix,
    row_of: HashMap<MemoryId, usize>,
    /// The seq of the last record that changed each id, live or deleted; the index catches
    /// up from it.
    last_change: HashMap<MemoryId, u64>,
    next_id: MemoryId,
    seq: u64,
}

impl State {
    pub(super) fn new(dimension: usize) -> State {
        State { rows: Vec::new(), matrix: Matrix::new(dimension), row_of: HashMap::new(), last_change: HashMap::new(), next_id: 1, seq: 0 }
    }

    pub(super) fn dimension(&self) -> usize {
        self.matrix.dimension()
    }

    pub(super) fn len(&self) -> usize {
        self.rows.len()
    }

    pub(super) fn seq(&self) -> u64 {
        self.seq
    }

    pub(super) fn next_id(&self) -> MemoryId {
        self.next_id
    }

    /// The memory without its embedding.
    pub(super) fn get_row(&self, id: MemoryId) -> Option<&Memory> {
        self.row_of.get(&id).map(|&row| &self.rows[row])
    }

    /// The memory with its embedding.
    pub(super) fn get(&self, id: MemoryId) -> Option<Memory> {
        self.row_of.get(&id).map(|&row| self.full(row))
    }

    fn full(&self, row: usize) -> Memory {
        Memory { embedding: self.matrix.row(row).to_vec(), ..self.rows[row].clone() }
    }

    /// Live memories without their embeddings, in no particular order.
    pub(super) fn rows(&self) -> &[Memory] {
        &self.rows
    }

    pub(super) fn list(&self, filter: &MemoryFilter) -> Vec<Memory> {
        let mut rows: Vec<usize> = (0..self.rows.len()).filter(|&row| filter.matches(&self.rows[row])).collect();
        rows.sort_by_key(|&row| self.rows[row].id);
        rows.into_iter().map(|row| self.full(row)).collect()
    }

    /// Ids changed by records after `seq`, ascending.
    pub(super) fn touched_since(&self, seq: u64) -> Vec<MemoryId> {
        let mut ids: Vec<MemoryId> = self.last_change.iter().filter(|(_, &changed)| changed > seq).map(|(&id, _)| id).collect();
        ids.sort_unstable();
        ids
    }

    pub(super) fn check_embedding(&self, embedding: &[f32]) -> Result<(), String> {
        if embedding.len() != self.dimension() {
            return Err(format!("the embedding has {} values, expected {}", embedding.len(), self.dimension()));
        }
        if embedding.iter().any(|value| !value.is_finite()) {
            return Err("the embedding has a NaN or infinite value".into());
        }
        // Cosine is undefined for a zero vector, and an overflowing norm would zero it.
        let length = norm(embedding);
        if length <= 0.0 || length.is_infinite() {
            return Err("the embedding's length is zero or overflows".into());
        }
        Ok(())
    }

    /// Applies one log record; the error says why the record cannot follow the state.
    pub(super) fn apply(&mut self, record: &LogRecord) -> Result<(), String> {
        if record.seq != self.seq + 1 {
            return Err(format!("seq {} follows seq {}", record.seq, self.seq));
        }
        let id = match &record.op {
            RecordOp::Add { memory } => {
                if memory.id < self.next_id {
                    return Err(format!("memory id {} is reused (ids up to {} were assigned)", memory.id, self.next_id - 1));
                }
                self.check_embedding(&memory.embedding)?;
                self.matrix.push(&memory.embedding);
                self.row_of.insert(memory.id, self.rows.len());
                self.rows.push(Memory { embedding: Vec::new(), ..memory.clone() });
                self.next_id = memory.id + 1;
                memory.id
            }
            RecordOp::Update { id, new_text, event_time, embedding, .. } => {
                let row = *self.row_of.get(id).ok_or_else(|| format!("update of memory {id}, which does not exist"))?;
                self.check_embedding(embedding)?;
                let memory = &mut self.rows[row];
                memory.text = new_text.clone();
                memory.event_time = event_time.clone();
                memory.updated = record.time;
                self.matrix.set(row, embedding);
                *id
            }
            RecordOp::Restore { memory } => {
                if memory.id >= self.next_id {
                    return Err(format!("restore of memory {}, which was never added", memory.id));
                }
                if self.row_of.contains_key(&memory.id) {
                    return Err(format!("restore of memory {}, which is not deleted", memory.id));
                }
                self.check_embedding(&memory.embedding)?;
                self.matrix.push(&memory.embedding);
                self.row_of.insert(memory.id, self.rows.len());
                self.rows.push(Memory { embedding: Vec::new(), ..memory.clone() });
                memory.id
            }
            RecordOp::Delete { id, .. } => {
                let row = self.row_of.remove(id).ok_or_else(|| format!("delete of memory {id}, which does not exist"))?;
                self.rows.swap_remove(row);
                self.matrix.swap_remove(row);
                if let Some(moved) = self.rows.get(row) {
                    self.row_of.insert(moved.id, row);
                }
                *id
            }
        };
        self.last_change.insert(id, record.seq);
        self.seq = record.seq;
        Ok(())
    }

    /// The ids of the `limit` rows passing `filter` with the highest cosine to `query`
    /// (checked by the caller), best first; ties go to the lower id.
    pub(super) fn nearest(&self, query: &[f32], filter: &MemoryFilter, limit: usize) -> Vec<MemoryId> {
        let all = filter.is_empty();
        self.matrix
            .nearest(query, limit, |row| all || filter.matches(&self.rows[row]), |row| self.rows[row].id)
            .into_iter()
            .map(|(_, row)| self.rows[row].id)
            .collect()
    }
}
