//! The tantivy index over the live memories: BM25 over text, subject and event time, plus
//! exact subject and time fields for filtering. It is derived data: every commit records the
//! log seq it reflects in its payload, and an index that is missing, damaged, of another
//! schema or not at the log's seq is caught up or rebuilt from the replayed state.

use std::collections::HashMap;
use std::fs::{self, DirBuilder};
use std::io;
use std::ops::Bound;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tantivy::collector::TopDocs;
use tantivy::query::{BooleanQuery, ConstScoreQuery, Occur, Query, RangeQuery, TermQuery};
use tantivy::schema::{Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, Value, FAST, INDEXED, STORED, STRING};
use tantivy::{DocAddress, Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, TantivyError, Term};

use super::state::State;
use super::{subject_key, Memory, MemoryError, MemoryFilter, MemoryId, TimeField};

/// One indexing thread: memories arrive a few at a time, and a rebuild of 100k short texts
/// takes seconds either way.
const WRITER_THREADS: usize = 1;
const WRITER_MEMORY: usize = 32 << 20;

#[derive(Clone, Copy)]
struct Fields {
    id: Field,
    text: Field,
    subject: Field,
    subject_key: Field,
    event_time: Field,
    created: Field,
    updated: Field,
}

/// English stemming, so that "painted" in a question finds "paints" in a memory. Positions
/// are not kept: queries are bags of words, never phrases.
const TOKENIZER: &str = "en_stem";

fn schema() -> (Schema, Fields) {
    let words = TextOptions::default()
        .set_indexing_options(TextFieldIndexing::default().set_tokenizer(TOKENIZER).set_index_option(IndexRecordOption::WithFreqs));
    let mut builder = Schema::builder();
    let fields = Fields {
        id: builder.add_u64_field("id", INDEXED | FAST | STORED),
        text: builder.add_text_field("text", words.clone() | STORED),
        subject: builder.add_text_field("subject", words.clone()),
        subject_key: builder.add_text_field("subject_key", STRING),
        event_time: builder.add_text_field("event_time", words),
        created: builder.add_i64_field("created", INDEXED | FAST),
        updated: builder.add_i64_field("updated", INDEXED | FAST),
    };
    (builder.build(), fields)
}

pub(super) struct MemoryIndex {
    path: PathBuf,
    index: Index,
    writer: IndexWriter<TantivyDocument>,
    reader: IndexReader,
    fields: Fields,
    /// The log seq of the last commit.
    seq: u64,
}

impl MemoryIndex {
    /// Opens the index at `path` and brings it to `state`'s seq, rebuilding it when it cannot
    /// be trusted.
    pub(super) fn open(path: &Path, state: &State) -> Result<MemoryIndex, MemoryError> {
        if path.exists() {
            match MemoryIndex::open_existing(path, state) {
                Ok(index) => return Ok(index),
                Err(reason) => tracing::warn!(path = %path.display(), %reason, "rebuilding the memory index from the log"),
            }
        }
        MemoryIndex::rebuild(path, state)
    }

    fn open_existing(path: &Path, state: &State) -> Result<MemoryIndex, String> {
        let (schema, fields) = schema();
        let index = Index::open_in_dir(path).map_err(|error| format!("cannot open it: {error}"))?;
        if serde_json::to_value(index.schema()).ok() != serde_json::to_value(&schema).ok() {
            return Err("its schema differs from this version's".into());
        }
        let damaged = index.validate_checksum().map_err(|error| format!("cannot check it: {error}"))?;
        if !damaged.is_empty() {
            return Err(format!("{} damaged files", damaged.len()));
        }
        let payload = index.load_metas().map_err(|error| format!("cannot read its metadata: {error}"))?.payload;
        let seq: u64 = payload.as_deref().and_then(|payload| payload.parse().ok()).ok_or("its commit does not record a log seq")?;
        if seq > state.seq() {
            return Err(format!("it is at seq {seq}, ahead of the log at seq {}", state.seq()));
        }
        let mut opened = MemoryIndex::from_index(path, index, fields, seq).map_err(|error| error.to_string())?;
        if seq < state.seq() {
            tracing::info!(path = %path.display(), index_seq = seq, log_seq = state.seq(), "catching the memory index up with the log");
            opened.apply(&state.touched_since(seq), state).map_err(|error| error.to_string())?;
        }
        let docs = opened.reader.searcher().num_docs();
        if docs != state.len() as u64 {
            return Err(format!("it holds {docs} memories, the log {}", state.len()));
        }
        Ok(opened)
    }

    fn rebuild(path: &Path, state: &State) -> Result<MemoryIndex, MemoryError> {
        match fs::remove_dir_all(path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(MemoryError::Io { action: "remove", path: path.to_owned(), error }),
        }
        DirBuilder::new().mode(0o700).create(path).map_err(|error| MemoryError::Io { action: "create", path: path.to_owned(), error })?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(|error| MemoryError::Io {
            action: "set permissions of",
            path: path.to_owned(),
            error,
        })?;
        let (schema, fields) = schema();
        let tantivy_error = |error| MemoryError::Index { path: path.to_owned(), error };
        let index = Index::create_in_dir(path, schema).map_err(tantivy_error)?;
        let mut rebuilt = MemoryIndex::from_index(path, index, fields, 0)?;
        for memory in state.rows() {
            rebuilt.writer.add_document(rebuilt.document(memory)).map_err(tantivy_error)?;
        }
        rebuilt.commit(state.seq())?;
        Ok(rebuilt)
    }

    fn from_index(path: &Path, index: Index, fields: Fields, seq: u64) -> Result<MemoryIndex, MemoryError> {
        let tantivy_error = |error| MemoryError::Index { path: path.to_owned(), error };
        let writer = index.writer_with_num_threads(WRITER_THREADS, WRITER_MEMORY).map_err(tantivy_error)?;
        let reader = index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into().map_err(tantivy_error)?;
        Ok(MemoryIndex { path: path.to_owned(), index, writer, reader, fields, seq })
    }

    pub(super) fn seq(&self) -> u64 {
        self.seq
    }

    fn tantivy_error(&self, error: TantivyError) -> MemoryError {
        MemoryError::Index { path: self.path.clone(), error }
    }

    fn document(&self, memory: &Memory) -> TantivyDocument {
        let fields = self.fields;
        let mut document = TantivyDocument::new();
        document.add_u64(fields.id, memory.id);
        document.add_text(fields.text, &memory.text);
        if let Some(subject) = &memory.subject {
            document.add_text(fields.subject, subject);
            document.add_text(fields.subject_key, subject_key(subject));
        }
        if let Some(event_time) = &memory.event_time {
            document.add_text(fields.event_time, event_time);
        }
        document.add_i64(fields.created, memory.created);
        document.add_i64(fields.updated, memory.updated);
        document
    }

    /// Re-indexes `ids` from `state` (dropping those no longer live) and commits at
    /// `state`'s seq.
    pub(super) fn apply(&mut self, ids: &[MemoryId], state: &State) -> Result<(), MemoryError> {
        for &id in ids {
            self.writer.delete_term(Term::from_field_u64(self.fields.id, id));
            if let Some(memory) = state.get_row(id) {
                let document = self.document(memory);
                self.writer.add_document(document).map_err(|error| self.tantivy_error(error))?;
            }
        }
        self.commit(state.seq())
    }

    fn commit(&mut self, seq: u64) -> Result<(), MemoryError> {
        let mut prepared = self.writer.prepare_commit().map_err(|error| MemoryError::Index { path: self.path.clone(), error })?;
        prepared.set_payload(&seq.to_string());
        prepared.commit().map_err(|error| MemoryError::Index { path: self.path.clone(), error })?;
        self.seq = seq;
        self.reader.reload().map_err(|error| self.tantivy_error(error))
    }

    /// The ids of the best `limit` BM25 matches of `text` that pass `filter`, best first.
    /// The text is split by the index's own tokenizer into plain term queries, so no
    /// character in it has query-syntax meaning and no question can fail to parse.
    pub(super) fn search(&self, text: &str, filter: &MemoryFilter, limit: usize) -> Result<Vec<MemoryId>, MemoryError> {
        let fields = self.fields;
        let mut analyzer = self.index.tokenizer_for_field(fields.text).map_err(|error| self.tantivy_error(error))?;
        let mut words: Vec<String> = Vec::new();
        let mut stream = analyzer.token_stream(text);
        while stream.advance() {
            words.push(stream.token().text.clone());
        }
        words.sort_unstable();
        words.dedup();
        if words.is_empty() {
            return Ok(Vec::new());
        }
        let mut any_word: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        for field in [fields.text, fields.subject, fields.event_time] {
            for word in &words {
                any_word.push((Occur::Should, Box::new(TermQuery::new(Term::from_field_text(field, word), IndexRecordOption::WithFreqs))));
            }
        }
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = vec![(Occur::Must, Box::new(BooleanQuery::new(any_word)))];
        // Filters score 0 so that they restrict the ranking without changing it.
        if let Some(subject) = &filter.subject {
            let exact = TermQuery::new(Term::from_field_text(fields.subject_key, &subject_key(subject)), IndexRecordOption::Basic);
            clauses.push((Occur::Must, Box::new(ConstScoreQuery::new(Box::new(exact), 0.0))));
        }
        if filter.from.is_some() || filter.until.is_some() {
            let field = match filter.time_field {
                TimeField::Created => fields.created,
                TimeField::Updated => fields.updated,
            };
            let bound = |value: Option<i64>| value.map_or(Bound::Unbounded, |value| Bound::Included(Term::from_field_i64(field, value)));
            let range = RangeQuery::new(bound(filter.from), bound(filter.until));
            clauses.push((Occur::Must, Box::new(ConstScoreQuery::new(Box::new(range), 0.0))));
        }
        let searcher = self.reader.searcher();
        let top = searcher
            .search(&BooleanQuery::new(clauses), &TopDocs::with_limit(limit).order_by_score())
            .map_err(|error| self.tantivy_error(error))?;
        let mut hits = Vec::with_capacity(top.len());
        for (score, address) in top {
            hits.push((score, self.id_of(&searcher, address)?));
        }
        hits.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        Ok(hits.into_iter().map(|(_, id)| id).collect())
    }

    fn id_of(&self, searcher: &tantivy::Searcher, address: DocAddress) -> Result<MemoryId, MemoryError> {
        let column = searcher.segment_reader(address.segment_ord).fast_fields().u64("id").map_err(|error| self.tantivy_error(error))?;
        column.first(address.doc_id).ok_or_else(|| self.mismatch(format!("document {address:?} has no id")))
    }

    fn mismatch(&self, reason: String) -> MemoryError {
        MemoryError::IndexMismatch { path: self.path.clone(), reason }
    }

    /// Every live memory of `state` is indexed once with its text, and nothing else is.
    pub(super) fn verify(&self, state: &State) -> Result<(), MemoryError> {
        if self.seq != state.seq() {
            return Err(self.mismatch(format!("it is at seq {}, the log at seq {}", self.seq, state.seq())));
        }
        let searcher = self.reader.searcher();
        let mut indexed: HashMap<MemoryId, String> = HashMap::new();
        for (ordinal, segment) in searcher.segment_readers().iter().enumerate() {
            for doc_id in segment.doc_ids_alive() {
                let document: TantivyDocument =
                    searcher.doc(DocAddress::new(ordinal as u32, doc_id)).map_err(|error| self.tantivy_error(error))?;
                let id = document.get_first(self.fields.id).and_then(|value| value.as_u64());
                let text = document.get_first(self.fields.text).and_then(|value| value.as_str().map(str::to_owned));
                let (Some(id), Some(text)) = (id, text) else {
                    return Err(self.mismatch(format!("document {doc_id} of segment {ordinal} lacks an id or a text")));
                };
                if indexed.insert(id, text).is_some() {
                    return Err(self.mismatch(format!("memory {id} is indexed twice")));
                }
            }
        }
        for memory in state.rows() {
            match indexed.remove(&memory.id) {
                None => return Err(self.mismatch(format!("memory {} is not indexed", memory.id))),
                Some(text) if text != memory.text => return Err(self.mismatch(format!("memory {} is indexed with an old text", memory.id))),
                Some(_) => {}
            }
        }
        match indexed.keys().min() {
            Some(id) => Err(self.mismatch(format!("memory {id} is indexed but not live"))),
            None => Ok(()),
        }
    }
}
