//! Training sets for the three memory experts, distilled from LoCoMo's annotations where
//! MemLoRA used a teacher's outputs (`memlora distill locomo`).
//!
//! Every prompt is rendered by the pipeline's own functions ([`MemoryPipeline::extract_prompt`],
//! [`MemoryPipeline::update_prompt`], [`MemoryPipeline::generate_prompt`]) from the same
//! exchanges an ingest makes ([`session_exchanges`]), so an expert learns exactly what it will
//! be asked. The answer to learn is the JSON the pipeline parses, written whole: the trainer
//! has no place for a pre-filled prefix, so the assistant message starts with the response
//! prefix the pipeline pre-fills (`{"facts": ["`, `{"memory": [{"id": "`) and the learned
//! tokens after it are the ones inference continues with. The prefix ends where the chat
//! template's tokenizer splits anyway (after a quote), which [`token_stats`] checks per
//! example when a tokenizer is at hand.
//!
//! - **extract**: per exchange window (not per session: the pipeline never sees a whole
//!   session), the session's observations whose evidence turns end in that window, as
//!   `{"facts": [...]}`. A window without any is `{"facts": [" "]}` — the pre-filled `["`
//!   closed at once, which the parser reads as no facts — and at most
//!   [`EMPTY_WINDOW_SHARE`] of a split's extraction examples are such windows.
//! - **update**: the observations replayed in conversation order through a scratch
//!   [`MemoryStore`] with the real embedder and the pipeline's candidate retrieval; each
//!   fact that the pipeline would ask the model about is labelled by [`label::label`] (or
//!   by a teacher), and the decision is applied so later facts see the updated bank.
//! - **generate**: each QA item of categories 1–4 with the memories recalled from the
//!   whole replayed bank; the answer is LoCoMo's ground truth.

pub mod label;
pub mod teacher;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::adapters::train::rng::Rng;
use crate::assistant::session_exchanges;
use crate::engine::{cosine, ChatMessage, ChatModel, Role};
use crate::memory::parse::{self, Event};
use crate::memory::pipeline::{same_text, used_memories, Exchange, MemoryPipeline, Operation, PipelineError, TextEmbedder};
use crate::memory::prompts::RenderedPrompt;
use crate::memory::{MemoryError, MemoryId, MemoryOp, MemorySource, MemoryStore, SearchHit};
use crate::transcript::{self, Conversation, Observation, TranscriptError};
use label::{Label, Shown};
use teacher::Teacher;

/// The validation conversation unless `--val` names others.
pub const DEFAULT_VALIDATION: &str = "conv-26";
/// Most of a split's extraction examples that may be windows without a fact: enough to
/// teach the expert to write nothing, not so many that it learns to write nothing.
pub const EMPTY_WINDOW_SHARE: f64 = 0.2;
/// LoCoMo categories with an answer to learn (5, adversarial, has none).
pub const ANSWERED_CATEGORIES: [u8; 4] = [1, 2, 3, 4];

#[derive(Debug, thiserror::Error)]
pub enum DistillError {
    #[error(transparent)]
    Transcript(#[from] TranscriptError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("conversation {0} cannot be in both the training and the validation split")]
    Overlap(String),
    #[error("no conversation to distill: both splits are empty")]
    NoConversations,
    #[error("teacher {url}: {message}")]
    Teacher { url: String, message: String },
    #[error("the {operation} answer {json:?} does not start with the prompt's response prefix {prefix:?}")]
    Prefix { operation: Operation, prefix: String, json: String },
    #[error("cannot {action} {}: {error}", path.display())]
    Io { action: &'static str, path: PathBuf, error: std::io::Error },
    #[error("counting tokens: {0}")]
    Tokens(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
}

impl Split {
    pub const ALL: [Split; 2] = [Split::Train, Split::Val];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

/// The conversations of each split.
#[derive(Debug)]
pub struct Splits {
    pub train: Vec<Conversation>,
    pub val: Vec<Conversation>,
}

/// Splits `conversations` by id: `val` defaults to [`DEFAULT_VALIDATION`] when the file
/// holds it (else no validation split), `train` to every other conversation. An id the
/// file lacks is refused, naming what it holds.
pub fn split(
    conversations: Vec<Conversation>,
    train: Option<&[String]>,
    val: Option<&[String]>,
    path: &Path,
) -> Result<Splits, DistillError> {
    let ids = |ids: &[String]| -> Vec<String> { ids.iter().map(|id| id.trim().to_owned()).filter(|id| !id.is_empty()).collect() };
    let val_ids = match val {
        Some(val) => ids(val),
        None => conversations.iter().filter(|c| c.id == DEFAULT_VALIDATION).map(|c| c.id.clone()).collect(),
    };
    let train_ids = match train {
        Some(train) => ids(train),
        None => conversations.iter().map(|c| c.id.clone()).filter(|id| !val_ids.contains(id)).collect(),
    };
    if let Some(both) = train_ids.iter().find(|id| val_ids.contains(id)) {
        return Err(DistillError::Overlap(both.clone()));
    }
    let val = transcript::select(conversations.clone(), Some(&val_ids), path)?;
    let train = transcript::select(conversations, Some(&train_ids), path)?;
    if train.is_empty() && val.is_empty() {
        return Err(DistillError::NoConversations);
    }
    Ok(Splits { train, val })
}

/// The sha256 of the file at `path`, in hex.
pub fn file_sha256(path: &Path) -> Result<String, DistillError> {
    use sha2::Digest;
    let bytes = std::fs::read(path).map_err(|error| DistillError::Io { action: "read", path: path.to_owned(), error })?;
    Ok(crate::models::hex(&sha2::Sha256::digest(&bytes)))
}

/// One line of a training file: the messages up to the answer to learn (the trainer's
/// `{"messages": [...]}` form), with where it came from.
#[derive(Debug, Clone, Serialize)]
pub struct DistilledExample {
    pub messages: Vec<ChatMessage>,
    pub conversation: String,
    /// extract: "facts" or "empty"; update: the events ("UPDATE", "DELETE+ADD" …);
    /// generate: the QA category.
    pub label: String,
    /// The part of the answer the pipeline pre-fills at inference.
    #[serde(skip)]
    pub response_prefix: String,
}

/// What replaying one conversation found, besides the examples.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayStats {
    pub observations: usize,
    /// Observations whose evidence names none of their session's turns: replayed into the
    /// bank at the end of the session, never an extraction target.
    pub unplaced: usize,
    pub windows: usize,
    /// Facts the pipeline adds without asking the model (no old memory retrieved).
    pub added_without_model: usize,
    /// Facts the pipeline knows without asking the model (a memory says them word for word).
    pub known_without_model: usize,
    /// Update decisions the teacher gave no usable answer for, labelled by the rules.
    pub teacher_fallbacks: usize,
    /// QA items without an answer to learn (category 5, or no answer).
    pub questions_skipped: usize,
    /// Memories in the bank after the replay.
    pub memories: usize,
}

/// The examples of one conversation.
#[derive(Debug, Clone, Default)]
pub struct ConversationSet {
    pub extract: Vec<DistilledExample>,
    pub update: Vec<DistilledExample>,
    pub generate: Vec<DistilledExample>,
    pub stats: ReplayStats,
}

impl ConversationSet {
    pub fn examples(&self, operation: Operation) -> &[DistilledExample] {
        match operation {
            Operation::Extract => &self.extract,
            Operation::Update => &self.update,
            Operation::Generate => &self.generate,
        }
    }
}

/// Replays conversations through the pipeline's retrieval and renders their examples.
pub struct Distiller<'a> {
    pipeline: &'a MemoryPipeline,
    embedder: &'a mut dyn TextEmbedder,
    dimension: usize,
    window: usize,
    teacher: Option<&'a Teacher>,
}

/// One decision about a fact, as the update prompt asks for it; `id` is the number the
/// memory was shown under (an ADD gets the next free number).
#[derive(Debug, Clone, PartialEq, Serialize)]
struct DecisionOp {
    id: String,
    text: String,
    event: Event,
    #[serde(skip_serializing_if = "Option::is_none")]
    old_memory: Option<String>,
}

/// The store changes of one exchange, applied together as the pipeline applies them.
#[derive(Default)]
struct Batch {
    ops: Vec<MemoryOp>,
    touched: HashSet<MemoryId>,
    added: HashSet<String>,
}

impl<'a> Distiller<'a> {
    /// `dimension` is the embedder's; `window` the turns per extraction (`extract_window`).
    pub fn new(
        pipeline: &'a MemoryPipeline,
        embedder: &'a mut dyn TextEmbedder,
        dimension: usize,
        window: usize,
        teacher: Option<&'a Teacher>,
    ) -> Distiller<'a> {
        Distiller { pipeline, embedder, dimension, window: window.max(1), teacher }
    }

    /// The examples of `conversation`, its memory bank built in a scratch store.
    pub fn conversation(&mut self, conversation: &Conversation) -> Result<ConversationSet, DistillError> {
        let scratch = tempfile::tempdir().map_err(|error| DistillError::Io {
            action: "create a scratch memory store in",
            path: std::env::temp_dir(),
            error,
        })?;
        let mut store = MemoryStore::open(scratch.path(), self.dimension)?;
        let mut set = ConversationSet::default();
        for session in &conversation.sessions {
            let exchanges: Vec<Exchange> = session_exchanges(conversation, session, self.window).collect();
            let position: HashMap<&str, usize> = session.turns.iter().enumerate().map(|(i, turn)| (turn.id.as_str(), i)).collect();
            // Each observation goes to the window holding its last evidence turn in this
            // session: only there has everything it says been said.
            let mut placed: Vec<Vec<(usize, usize, &Observation)>> = vec![Vec::new(); exchanges.len()];
            let mut unplaced = Vec::new();
            for (order, observation) in session.observations.iter().enumerate() {
                set.stats.observations += 1;
                match observation.evidence.iter().filter_map(|id| position.get(id.as_str())).max() {
                    Some(&turn) => placed[turn / self.window].push((turn, order, observation)),
                    None => unplaced.push(observation),
                }
            }
            for (exchange, mut observations) in exchanges.iter().zip(placed) {
                observations.sort_by_key(|&(turn, order, _)| (turn, order));
                let facts = distinct_facts(observations.iter().map(|&(_, _, observation)| observation));
                match self.pipeline.extract_prompt(exchange)? {
                    Some(prompt) => {
                        set.stats.windows += 1;
                        let texts: Vec<&str> = facts.iter().map(|(fact, _)| fact.as_str()).collect();
                        let label = if texts.is_empty() { "empty" } else { "facts" };
                        let json = facts_json(&texts);
                        set.extract.push(example(Operation::Extract, &prompt, json, conversation, label.to_owned())?);
                    }
                    // Nothing is said in the window: its facts have no words to come from.
                    None => set.stats.unplaced += facts.len(),
                }
                self.replay(&mut store, exchange, &facts, conversation, &mut set)?;
            }
            if !unplaced.is_empty() {
                set.stats.unplaced += unplaced.len();
                let facts = distinct_facts(unplaced.into_iter());
                let exchange = Exchange {
                    turns: Vec::new(),
                    date: session.date.clone().or_else(|| session.date_time.clone()),
                    time: session.timestamp,
                    conversation: Some(conversation.id.clone()),
                    session: Some(format!("session_{}", session.number)),
                };
                self.replay(&mut store, &exchange, &facts, conversation, &mut set)?;
            }
        }
        for item in &conversation.qa {
            let answer = item.answer.as_deref().map(str::trim).unwrap_or_default();
            if !ANSWERED_CATEGORIES.contains(&item.category) || answer.is_empty() {
                set.stats.questions_skipped += 1;
                continue;
            }
            let memories = used_memories(self.pipeline.recall(&item.question, &store, self.embedder)?);
            let prompt = self.pipeline.generate_prompt(&item.question, &memories)?;
            set.generate.push(example(Operation::Generate, &prompt, answer.to_owned(), conversation, item.category.to_string())?);
        }
        set.stats.memories = store.len();
        Ok(set)
    }

    /// Decides each of `facts` (text, speaker) as the pipeline would after `exchange`,
    /// recording an example for every decision the model would be asked for, and applies
    /// the decisions as one batch.
    fn replay(
        &mut self,
        store: &mut MemoryStore,
        exchange: &Exchange,
        facts: &[(String, String)],
        conversation: &Conversation,
        set: &mut ConversationSet,
    ) -> Result<(), DistillError> {
        if facts.is_empty() {
            return Ok(());
        }
        let texts: Vec<&str> = facts.iter().map(|(fact, _)| fact.as_str()).collect();
        let embeddings = self.embed(&texts)?;
        let mut batch = Batch::default();
        for ((fact, speaker), embedding) in facts.iter().zip(embeddings) {
            let candidates = self.pipeline.update_candidates(fact, &embedding, store)?;
            if candidates.is_empty() {
                set.stats.added_without_model += 1;
                batch.add(fact, embedding, speaker, exchange);
                continue;
            }
            if candidates.iter().any(|hit| same_text(&hit.memory.text, fact)) {
                set.stats.known_without_model += 1;
                continue;
            }
            let prompt = self.pipeline.update_prompt(fact, &candidates)?;
            let taught = match self.teacher {
                Some(teacher) => teacher_decision(&teacher.answer(&prompt)?, &candidates, &batch.touched),
                None => None,
            };
            let decision = match taught {
                Some(decision) => decision,
                None => {
                    set.stats.teacher_fallbacks += usize::from(self.teacher.is_some());
                    rule_decision(fact, speaker, &embedding, &candidates, &batch.touched)
                }
            };
            let events: Vec<&str> = decision.iter().map(|op| event_name(op.event)).collect();
            set.update.push(example(Operation::Update, &prompt, memory_json(&decision), conversation, events.join("+"))?);
            for op in decision {
                self.apply(&mut batch, op, fact, &embedding, speaker, &candidates, exchange)?;
            }
        }
        store.apply_at(batch.ops, exchange.time.unwrap_or_else(crate::memory::now))?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        batch: &mut Batch,
        op: DecisionOp,
        fact: &str,
        fact_embedding: &[f32],
        speaker: &str,
        candidates: &[SearchHit],
        exchange: &Exchange,
    ) -> Result<(), DistillError> {
        let shown = || op.id.parse::<usize>().ok().and_then(|index| candidates.get(index)).map(|hit| hit.memory.id);
        match (op.event, shown()) {
            (Event::Add, _) => {
                let embedding = if op.text == fact { fact_embedding.to_vec() } else { self.embed(&[&op.text])?.remove(0) };
                batch.add(&op.text, embedding, speaker, exchange);
            }
            (Event::Update, Some(id)) => {
                let embedding = if op.text == fact { fact_embedding.to_vec() } else { self.embed(&[&op.text])?.remove(0) };
                batch.touched.insert(id);
                batch.ops.push(MemoryOp::Update { id, text: op.text, event_time: exchange.date.clone(), embedding });
            }
            (Event::Delete, Some(id)) => {
                batch.touched.insert(id);
                batch.ops.push(MemoryOp::Delete { id });
            }
            _ => {}
        }
        Ok(())
    }

    fn embed(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, DistillError> {
        let embeddings = self.embedder.embed(texts)?;
        if embeddings.len() != texts.len() {
            let message = format!("{} embeddings for {} texts", embeddings.len(), texts.len());
            return Err(PipelineError::Embedder(message).into());
        }
        Ok(embeddings)
    }
}

impl Batch {
    fn add(&mut self, text: &str, embedding: Vec<f32>, speaker: &str, exchange: &Exchange) {
        // The pipeline adds one text once per exchange.
        if !self.added.insert(text.trim().trim_end_matches('.').to_lowercase()) {
            return;
        }
        self.ops.push(MemoryOp::Add {
            text: text.to_owned(),
            subject: Some(speaker.to_owned()),
            event_time: exchange.date.clone(),
            source: MemorySource {
                conversation: exchange.conversation.clone(),
                session: exchange.session.clone(),
                turns: exchange.turns.iter().filter_map(|turn| turn.id.clone()).collect(),
            },
            image: None,
            embedding,
            created: None,
        });
    }
}

/// The facts of `observations` with their speakers, case-insensitive repeats dropped (as
/// the pipeline's parser drops them).
fn distinct_facts<'o>(observations: impl Iterator<Item = &'o Observation>) -> Vec<(String, String)> {
    let mut seen = HashSet::new();
    observations
        .filter(|observation| seen.insert(observation.fact.trim().to_lowercase()))
        .map(|observation| (observation.fact.trim().to_owned(), observation.speaker.clone()))
        .collect()
}

/// The rules' decision (see [`label`]). A memory already changed in this exchange cannot be
/// changed again (the pipeline refuses it), so such a decision becomes an ADD.
fn rule_decision(fact: &str, speaker: &str, embedding: &[f32], candidates: &[SearchHit], touched: &HashSet<MemoryId>) -> Vec<DecisionOp> {
    let shown: Vec<Shown<'_>> = candidates
        .iter()
        .map(|hit| Shown {
            text: &hit.memory.text,
            subject: hit.memory.subject.as_deref(),
            cosine: cosine(embedding, &hit.memory.embedding),
        })
        .collect();
    let mut decided = label::label(fact, Some(speaker), &shown);
    if let Label::Update(index) | Label::Delete(index) = decided {
        if touched.contains(&candidates[index].memory.id) {
            decided = Label::Add;
        }
    }
    let old = |index: usize| candidates[index].memory.text.clone();
    vec![match decided {
        Label::Add => DecisionOp { id: candidates.len().to_string(), text: fact.to_owned(), event: Event::Add, old_memory: None },
        Label::None(index) => DecisionOp { id: index.to_string(), text: old(index), event: Event::None, old_memory: None },
        Label::Update(index) => {
            DecisionOp { id: index.to_string(), text: fact.to_owned(), event: Event::Update, old_memory: Some(old(index)) }
        }
        Label::Delete(index) => DecisionOp { id: index.to_string(), text: old(index), event: Event::Delete, old_memory: None },
    }]
}

/// The teacher's answer as decisions the pipeline would accept, rewritten in the prompt's
/// format; `None` when no operation in it is usable.
fn teacher_decision(answer: &str, candidates: &[SearchHit], touched: &HashSet<MemoryId>) -> Option<Vec<DecisionOp>> {
    let parsed = parse::parse_memory_ops(answer).ok()?;
    let mut changed = touched.clone();
    let mut ops = Vec::new();
    for proposed in parsed.items {
        let index = proposed.id.as_deref().and_then(|id| id.trim().parse::<usize>().ok()).filter(|&index| index < candidates.len());
        let text = proposed.text.map(|text| text.trim().to_owned()).filter(|text| !text.is_empty());
        let old = |index: usize| candidates[index].memory.text.clone();
        let op = match (proposed.event, index, text) {
            (Event::Add, _, Some(text)) => DecisionOp { id: candidates.len().to_string(), text, event: Event::Add, old_memory: None },
            (Event::None, index, _) => {
                let index = index.unwrap_or(0);
                DecisionOp { id: index.to_string(), text: old(index), event: Event::None, old_memory: None }
            }
            (Event::Update, Some(index), Some(text)) if !same_text(&text, &old(index)) => {
                if !changed.insert(candidates[index].memory.id) {
                    continue;
                }
                DecisionOp { id: index.to_string(), text, event: Event::Update, old_memory: Some(old(index)) }
            }
            (Event::Update, Some(index), Some(_)) => {
                DecisionOp { id: index.to_string(), text: old(index), event: Event::None, old_memory: None }
            }
            (Event::Delete, Some(index), _) => {
                if !changed.insert(candidates[index].memory.id) {
                    continue;
                }
                DecisionOp { id: index.to_string(), text: old(index), event: Event::Delete, old_memory: None }
            }
            _ => continue,
        };
        ops.push(op);
    }
    (!ops.is_empty()).then_some(ops)
}

fn event_name(event: Event) -> &'static str {
    match event {
        Event::Add => "ADD",
        Event::Update => "UPDATE",
        Event::Delete => "DELETE",
        Event::None => "NONE",
    }
}

/// A training example: the prompt's messages and `answer` as the assistant's, which must
/// start with the response prefix the pipeline pre-fills.
fn example(
    operation: Operation,
    prompt: &RenderedPrompt,
    answer: String,
    conversation: &Conversation,
    label: String,
) -> Result<DistilledExample, DistillError> {
    if !answer.starts_with(&prompt.response_prefix) {
        return Err(DistillError::Prefix { operation, prefix: prompt.response_prefix.clone(), json: answer });
    }
    let mut messages = prompt.messages.clone();
    messages.push(ChatMessage::new(Role::Assistant, answer));
    Ok(DistilledExample { messages, conversation: conversation.id.clone(), label, response_prefix: prompt.response_prefix.clone() })
}

/// JSON as the prompts write it (`{"a": [1, 2]}`: a space after `:` and `,`), so the answer
/// continues the pre-filled prefix character for character.
struct PromptStyle;

impl serde_json::ser::Formatter for PromptStyle {
    fn begin_array_value<W: ?Sized + Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        self.begin_array_value(writer, first)
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

fn prompt_json(value: &impl Serialize) -> String {
    let mut bytes = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut bytes, PromptStyle);
    // Serializing strings and plain structs into memory cannot fail.
    value.serialize(&mut serializer).expect("JSON of strings");
    String::from_utf8(bytes).expect("serde_json writes UTF-8")
}

/// `{"facts": [...]}`; no facts is `{"facts": [" "]}`: the pre-filled `["` closed at once
/// (a blank fact, which the parser drops). Not `[""]`: the tokenizer would merge `[""` into
/// other tokens than the `["` inference pre-fills.
fn facts_json(facts: &[&str]) -> String {
    #[derive(Serialize)]
    struct Facts<'a> {
        facts: &'a [&'a str],
    }
    prompt_json(&Facts { facts: if facts.is_empty() { &[" "] } else { facts } })
}

fn memory_json(ops: &[DecisionOp]) -> String {
    #[derive(Serialize)]
    struct Memory<'a> {
        memory: &'a [DecisionOp],
    }
    prompt_json(&Memory { memory: ops })
}

/// The examples of every split and operation, after sampling.
#[derive(Debug, Default)]
pub struct Distilled {
    pub examples: BTreeMap<(Operation, Split), Vec<DistilledExample>>,
    /// Examples per operation and split before sampling.
    pub available: BTreeMap<(Operation, Split), usize>,
    pub replay: BTreeMap<String, ReplayStats>,
}

/// How many examples to keep.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    pub max_examples_per_op: Option<usize>,
    pub seed: u64,
}

impl Distilled {
    /// Adds the examples of `set` (a conversation of `split`).
    pub fn add(&mut self, split: Split, conversation: &str, set: ConversationSet) {
        for operation in Operation::ALL {
            let examples = set.examples(operation).to_vec();
            *self.available.entry((operation, split)).or_default() += examples.len();
            self.examples.entry((operation, split)).or_default().extend(examples);
        }
        self.replay.insert(conversation.to_owned(), set.stats);
    }

    /// Caps empty extraction windows at [`EMPTY_WINDOW_SHARE`], then each operation and
    /// split at `max_examples_per_op`, choosing with seeded shuffles (order kept).
    pub fn sample(&mut self, sampling: Sampling) {
        for ((operation, split), examples) in &mut self.examples {
            let stream = (*operation as u64) * 2 + *split as u64;
            if *operation == Operation::Extract {
                let (empty, full): (Vec<usize>, Vec<usize>) = (0..examples.len()).partition(|&i| examples[i].label == "empty");
                let allowed = (full.len() as f64 * EMPTY_WINDOW_SHARE / (1.0 - EMPTY_WINDOW_SHARE)).floor() as usize;
                let kept: HashSet<usize> = full.into_iter().chain(choose(empty, allowed, Rng::derive(sampling.seed, stream, 0))).collect();
                keep(examples, &kept);
            }
            if let Some(max) = sampling.max_examples_per_op {
                let kept: HashSet<usize> =
                    choose((0..examples.len()).collect(), max, Rng::derive(sampling.seed, stream, 1)).into_iter().collect();
                keep(examples, &kept);
            }
        }
    }

    pub fn get(&self, operation: Operation, split: Split) -> &[DistilledExample] {
        self.examples.get(&(operation, split)).map_or(&[], Vec::as_slice)
    }

    /// Label counts per operation and split.
    pub fn labels(&self) -> BTreeMap<String, BTreeMap<&'static str, BTreeMap<String, usize>>> {
        let mut labels: BTreeMap<String, BTreeMap<&'static str, BTreeMap<String, usize>>> = BTreeMap::new();
        for ((operation, split), examples) in &self.examples {
            let counts = labels.entry(operation.to_string()).or_default().entry(split.name()).or_default();
            for example in examples {
                *counts.entry(example.label.clone()).or_default() += 1;
            }
        }
        labels
    }

    /// Writes `OUT/{extract,update,generate}.{train,val}.jsonl` (every one, empty or not).
    pub fn write(&self, out: &Path) -> Result<Vec<PathBuf>, DistillError> {
        std::fs::create_dir_all(out).map_err(|error| DistillError::Io { action: "create", path: out.to_owned(), error })?;
        let mut written = Vec::new();
        for operation in Operation::ALL {
            for split in Split::ALL {
                let path = out.join(format!("{operation}.{}.jsonl", split.name()));
                let mut text = String::new();
                for example in self.get(operation, split) {
                    text.push_str(&serde_json::to_string(example).expect("JSON of strings"));
                    text.push('\n');
                }
                write_file(&path, text.as_bytes())?;
                written.push(path);
            }
        }
        Ok(written)
    }
}

/// Writes `bytes` to `path` through a temporary file renamed into place.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), DistillError> {
    let partial = path.with_extension("part");
    let io = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |error| DistillError::Io { action, path, error }
    };
    std::fs::write(&partial, bytes).map_err(io("write", &partial))?;
    std::fs::rename(&partial, path).map_err(io("write", path))
}

/// `count` of `indices` chosen by a seeded shuffle (all when there are no more).
fn choose(mut indices: Vec<usize>, count: usize, mut rng: Rng) -> Vec<usize> {
    if indices.len() > count {
        rng.shuffle(&mut indices);
        indices.truncate(count);
    }
    indices
}

fn keep(examples: &mut Vec<DistilledExample>, kept: &HashSet<usize>) {
    let mut index = 0;
    examples.retain(|_| {
        index += 1;
        kept.contains(&(index - 1))
    });
}

/// Token counts of a set of examples under a model's template and tokenizer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TokenStats {
    pub examples: usize,
    pub mean: f64,
    pub max: usize,
    /// Examples whose training tokens do not begin with the tokens inference feeds the
    /// model (prompt + pre-filled prefix): they would teach a different continuation.
    pub prefix_mismatches: usize,
}

/// Counts the tokens of `examples` as `adapters train` tokenizes them, and checks that each
/// one's tokens begin with the inference prompt's (template + response prefix).
pub fn token_stats(chat: &ChatModel, examples: &[DistilledExample]) -> Result<TokenStats, DistillError> {
    let mut stats = TokenStats { examples: examples.len(), ..TokenStats::default() };
    let mut total = 0;
    for example in examples {
        let tokens = |error: crate::engine::EngineError| DistillError::Tokens(error.to_string());
        let (prompt, completion) = chat.example_tokens(&example.messages).map_err(tokens)?;
        let context = &example.messages[..example.messages.len() - 1];
        let (inference, _) = chat.prompt_tokens(context, &example.response_prefix, 0).map_err(tokens)?;
        let trained: Vec<u32> = prompt.iter().chain(&completion).copied().collect();
        if !trained.starts_with(&inference) {
            stats.prefix_mismatches += 1;
        }
        total += trained.len();
        stats.max = stats.max.max(trained.len());
    }
    stats.mean = if examples.is_empty() { 0.0 } else { total as f64 / examples.len() as f64 };
    Ok(stats)
}

/// Characters of the messages, when no tokenizer is at hand.
pub fn character_stats(examples: &[DistilledExample]) -> TokenStats {
    let lengths: Vec<usize> = examples.iter().map(|e| e.messages.iter().map(|m| m.content.chars().count()).sum()).collect();
    TokenStats {
        examples: examples.len(),
        mean: if lengths.is_empty() { 0.0 } else { lengths.iter().sum::<usize>() as f64 / lengths.len() as f64 },
        max: lengths.into_iter().max().unwrap_or(0),
        prefix_mismatches: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_written_as_the_prompts_write_json() {
        assert_eq!(
            facts_json(&["Sam adopted a puppy.", "Rex is \"small\"."]),
            r#"{"facts": ["Sam adopted a puppy.", "Rex is \"small\"."]}"#
        );
        assert_eq!(facts_json(&[]), r#"{"facts": [" "]}"#);
        let ops = [DecisionOp {
            id: "0".into(),
            text: "Sam lives in Rome.".into(),
            event: Event::Update,
            old_memory: Some("Sam lives in Paris.".into()),
        }];
        // The update prompt's own example, character for character.
        assert_eq!(
            memory_json(&ops),
            r#"{"memory": [{"id": "0", "text": "Sam lives in Rome.", "event": "UPDATE", "old_memory": "Sam lives in Paris."}]}"#
        );
        let prompts = crate::memory::prompts::Prompts::builtin();
        let update = prompts.render(Operation::Update, serde_json::json!({"fact": "x", "memories": []})).unwrap();
        assert!(memory_json(&ops).starts_with(&update.response_prefix));
        // What the parser reads back.
        assert!(parse::parse_facts(&facts_json(&[])).unwrap().items.is_empty());
        let parsed = parse::parse_memory_ops(&memory_json(&ops)).unwrap().items;
        assert_eq!((parsed[0].id.as_deref(), parsed[0].event), (Some("0"), Event::Update));
    }

    #[test]
    fn sampling_caps_empty_windows_and_each_operation_with_a_seed() {
        let example = |label: &str| DistilledExample {
            messages: vec![ChatMessage::new(Role::Assistant, label)],
            conversation: "c".into(),
            label: label.into(),
            response_prefix: String::new(),
        };
        let mut distilled = Distilled::default();
        let set = ConversationSet {
            extract: (0..8).map(|_| example("facts")).chain((0..10).map(|_| example("empty"))).collect(),
            update: (0..30).map(|_| example("ADD")).collect(),
            ..ConversationSet::default()
        };
        distilled.add(Split::Train, "c", set);
        let mut capped = Distilled { examples: distilled.examples.clone(), ..Distilled::default() };
        capped.sample(Sampling { max_examples_per_op: None, seed: 1 });
        // 8 with facts allow 2 empty windows (20 % of 10).
        assert_eq!(capped.labels()["extract"]["train"]["empty"], 2);
        assert_eq!(capped.get(Operation::Update, Split::Train).len(), 30);
        distilled.sample(Sampling { max_examples_per_op: Some(5), seed: 1 });
        assert_eq!(distilled.get(Operation::Extract, Split::Train).len(), 5);
        assert_eq!(distilled.get(Operation::Update, Split::Train).len(), 5);
        assert_eq!(distilled.available[&(Operation::Update, Split::Train)], 30);
    }
}
