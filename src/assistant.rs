//! The assistant: the chat model, the embedder, the memory store and the memory
//! pipeline, owned together. Every front end drives memory through it, so that a
//! one-shot command, batch mode and the app's worker share one code path.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::engine::{ChatMessage, ChatModel, Embedder, EngineError, Role, SamplingParams};
use crate::memory::pipeline::{
    Answer, AppliedChange, Completion, Exchange, LanguageModel, MemoryPipeline, Operation, PipelineError, TextEmbedder, Turn, TurnReport,
    UsedMemory,
};
use crate::memory::prompts::RenderedPrompt;
use crate::memory::{Applied, MemoryError, MemoryFilter, MemoryId, MemoryOp, MemoryStore, OpKind, SearchHit, SearchQuery, Undone};
use crate::transcript::{self, Conversation, SessionRange};
use crate::vision::{Vision, VisionError, VisionMode};

#[derive(Debug, thiserror::Error)]
pub enum AssistantError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("the memory store holds {store}-dimensional embeddings but the embedder makes {embedder}-dimensional ones")]
    DimensionMismatch { store: usize, embedder: usize },
    #[error("no memory with id {0}")]
    NoSuchMemory(MemoryId),
    #[error("adapter '{name}': {message}")]
    Adapter { name: String, message: String },
    #[error(transparent)]
    Image(#[from] crate::images::ImageError),
    #[error(transparent)]
    Vision(#[from] VisionError),
}

/// How many of the best recalled memories are checked for an image to look at: an image
/// further down is a weak match, and its caption in the prompt is enough.
const IMAGE_RECALL_RANKS: usize = 3;

/// The active adapters (slot name, scale) of each operation.
pub type OperationAdapters = BTreeMap<Operation, Vec<(String, f32)>>;

/// Embeds with the engine's sentence embedder.
pub struct EngineEmbedder<'a>(pub &'a Embedder);

impl TextEmbedder for EngineEmbedder<'_> {
    fn embed(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, PipelineError> {
        self.0.embed(texts).map_err(|error| PipelineError::Embedder(error.to_string()))
    }
}

/// The chat model with each operation bound to its adapters.
struct EngineModel<'a> {
    chat: &'a mut ChatModel,
    adapters: &'a OperationAdapters,
    sampling: &'a SamplingParams,
    /// Replaces the generation prompt's system message.
    system: Option<&'a str>,
}

impl LanguageModel for EngineModel<'_> {
    fn complete(
        &mut self,
        operation: Operation,
        prompt: &RenderedPrompt,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Completion, PipelineError> {
        let sampling = match operation {
            Operation::Generate => SamplingParams { max_tokens: prompt.max_tokens.unwrap_or(self.sampling.max_tokens), ..*self.sampling },
            // Memory decisions are read by a parser, not a person: greedy, and no repeat
            // penalty, which would push the model off JSON's necessarily repeated quotes.
            Operation::Extract | Operation::Update => SamplingParams {
                max_tokens: prompt.max_tokens.unwrap_or(self.sampling.max_tokens),
                temperature: 0.0,
                repeat_penalty: 1.0,
                ..*self.sampling
            },
        };
        let adapters = self.adapters.get(&operation).map_or(&[][..], Vec::as_slice);
        let mut messages = std::borrow::Cow::Borrowed(&prompt.messages);
        if let (Operation::Generate, Some(system)) = (operation, self.system) {
            let messages = messages.to_mut();
            messages.retain(|message| message.role != Role::System);
            messages.insert(0, ChatMessage::new(Role::System, system));
        }
        let generation = self
            .chat
            .continue_constrained(&messages, &prompt.response_prefix, &sampling, adapters, prompt.constraint.as_ref(), on_text)
            .map_err(|error| match error {
                EngineError::PromptTooLong { .. } => PipelineError::TooLong { operation, message: error.to_string() },
                _ => PipelineError::Model { operation, message: error.to_string() },
            })?;
        Ok(completion_of(generation))
    }
}

/// The pipeline's view of an engine generation.
fn completion_of(generation: crate::engine::Generation) -> Completion {
    Completion {
        text: generation.text.clone(),
        prompt_tokens: generation.prompt_tokens,
        completion_tokens: generation.completion_tokens,
        stats: Some(generation),
    }
}

/// An image a question was asked about.
#[derive(Debug, Clone, Serialize)]
pub struct ImageSeen {
    /// The copy in the data dir.
    pub path: std::path::PathBuf,
    pub sha256: String,
    pub mode: VisionMode,
    /// The caption its memory (and the caption mode) uses, when one was made.
    pub caption: Option<String>,
}

/// An answer and, unless the caller said not to remember, what the exchange changed.
#[derive(Debug, Clone)]
pub struct AskOutcome {
    pub answer: Answer,
    pub remembered: Option<TurnReport>,
    /// The image attached to the question, when there was one.
    pub image: Option<ImageSeen>,
}

/// Progress of an ingest, reported after each exchange.
#[derive(Debug, Clone, Serialize)]
pub struct IngestProgress<'a> {
    pub conversation: &'a str,
    pub session: u32,
    /// Turns of all selected conversations done so far, this exchange's included.
    pub turns_done: usize,
    pub turns_total: usize,
    pub report: &'a TurnReport,
}

/// The totals of an ingest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
// Counts added later read as 0 in the records of earlier versions (an eval's journal).
#[serde(default)]
pub struct IngestSummary {
    pub conversations: usize,
    pub sessions: usize,
    pub turns: usize,
    pub exchanges: usize,
    pub facts: usize,
    pub added: usize,
    pub updated: usize,
    pub deleted: usize,
    pub unchanged: usize,
    /// Facts added because the update output for them was unusable.
    pub undecided: usize,
    pub skipped: usize,
    /// Facts refused because the turns did not support them.
    pub ungrounded: usize,
    /// Model outputs the parser could not read at all.
    pub unusable_outputs: usize,
    pub model_calls: usize,
    pub seconds: f64,
    pub memories: usize,
    /// Stopped before the end at the caller's request.
    pub cancelled: bool,
}

impl IngestSummary {
    fn count(&mut self, report: &TurnReport) {
        self.exchanges += 1;
        self.facts += report.facts.len();
        self.unchanged += report.unchanged;
        self.undecided += report.undecided;
        self.skipped += report.skipped.len();
        self.ungrounded += report.ungrounded;
        self.unusable_outputs += report.unusable_outputs;
        self.model_calls += report.model_calls;
        for change in &report.changes {
            match change.kind {
                OpKind::Add | OpKind::Restore => self.added += 1,
                OpKind::Update => self.updated += 1,
                OpKind::Delete => self.deleted += 1,
            }
        }
    }
}

pub struct Assistant {
    chat: ChatModel,
    embedder: Embedder,
    store: MemoryStore,
    pipeline: MemoryPipeline,
    adapters: OperationAdapters,
    sampling: SamplingParams,
    user_name: String,
    system: Option<String>,
    extract_window: usize,
    vision: Option<Vision>,
}

impl Assistant {
    pub fn new(
        chat: ChatModel,
        embedder: Embedder,
        store: MemoryStore,
        pipeline: MemoryPipeline,
        adapters: OperationAdapters,
        sampling: SamplingParams,
        user_name: String,
    ) -> Result<Assistant, AssistantError> {
        if store.dimension() != embedder.dimension() {
            return Err(AssistantError::DimensionMismatch { store: store.dimension(), embedder: embedder.dimension() });
        }
        Ok(Assistant { chat, embedder, store, pipeline, adapters, sampling, user_name, system: None, extract_window: 2, vision: None })
    }

    pub fn chat_model(&self) -> &ChatModel {
        &self.chat
    }

    pub fn store(&self) -> &MemoryStore {
        &self.store
    }

    pub fn adapters(&self) -> &OperationAdapters {
        &self.adapters
    }

    /// Attaches `adapter` again as slot `name` when an operation runs with it (after it
    /// changed on disk, e.g. merged into under the storage budget); returns whether it did.
    /// Called between requests, so no answer sees two versions of it.
    pub fn reload_adapter(&mut self, name: &str, adapter: &crate::adapters::LoraAdapter) -> Result<bool, AssistantError> {
        if !self.adapters.values().flatten().any(|(slot, _)| slot == name) {
            return Ok(false);
        }
        let failed = |message: String| AssistantError::Adapter { name: name.to_owned(), message };
        self.chat.attach_adapter(name, adapter).map_err(|e| failed(e.to_string()))?;
        Ok(true)
    }

    /// A system message for answers instead of the generation prompt's.
    pub fn set_system(&mut self, system: Option<String>) {
        self.system = system;
    }

    /// Answers `question` (about the image at `image`, when given) with recalled memories,
    /// streaming to `on_text`; then, when `remember`, extracts and applies what the user
    /// said (and keeps the image as a memory).
    pub fn ask(
        &mut self,
        question: &str,
        image: Option<&std::path::Path>,
        remember: bool,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<AskOutcome, AssistantError> {
        if let Some(path) = image {
            return self.ask_about_image(question, path, remember, on_text);
        }
        let answer = self.answer(question, on_text)?;
        let remembered = if remember { Some(self.remember_user_words(question)?) } else { None };
        Ok(AskOutcome { answer, remembered, image: None })
    }

    /// Answers `question` with recalled memories, streaming to `on_text`. When one of the
    /// best memories is an image and the vision model is at hand (native mode), the model
    /// looks at the stored image again instead of reading its caption.
    pub fn answer(&mut self, question: &str, on_text: &mut dyn FnMut(&str) -> ControlFlow<()>) -> Result<Answer, AssistantError> {
        let hits = self.pipeline.recall(question, &self.store, &mut EngineEmbedder(&self.embedder))?;
        let image = hits
            .iter()
            .take(IMAGE_RECALL_RANKS)
            .find_map(|hit| hit.memory.image.clone().filter(|path| path.is_file()))
            .filter(|_| self.vision.as_ref().is_some_and(|v| v.mode() == VisionMode::Native && v.available().is_ok()));
        let memories: Vec<UsedMemory> = hits
            .into_iter()
            .map(|hit| UsedMemory { id: hit.memory.id, text: hit.memory.text, date: hit.memory.event_time, score: hit.score })
            .collect();
        if let (Some(path), Some(vision)) = (image, self.vision.as_mut()) {
            let picture = crate::images::load(&path)?;
            let completion = completion_of(vision.look(&picture, question, &self.sampling, on_text)?);
            return Ok(Answer { text: completion.text.clone(), memories, completion, image: Some(path) });
        }
        self.answer_with(question, memories, on_text)
    }

    /// Adds the vision operation; its model loads the first time an image is asked about.
    pub fn set_vision(&mut self, vision: Vision) {
        self.vision = Some(vision);
    }

    pub fn vision_mut(&mut self) -> Option<&mut Vision> {
        self.vision.as_mut()
    }

    /// Answers `question` about the image at `path` (looking at it, or from its caption in
    /// caption mode), streaming to `on_text`. When `remember`, the image becomes a memory —
    /// its caption, with a copy of the file in the data dir — and what the user said is
    /// remembered as for any question.
    fn ask_about_image(
        &mut self,
        question: &str,
        path: &std::path::Path,
        remember: bool,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<AskOutcome, AssistantError> {
        let vision = self.vision.as_mut().ok_or_else(|| VisionError::Unavailable("no vision model is configured".into()))?;
        vision.available()?;
        let mode = vision.mode();
        let data_dir = self.store.dir().parent().unwrap_or(self.store.dir()).to_path_buf();
        let (stored, image) = crate::images::store(&data_dir, path)?;
        let (answer, mut caption): (Answer, Option<String>) = match mode {
            VisionMode::Native => {
                let completion = completion_of(vision.look(&image, question, &self.sampling, on_text)?);
                (Answer { text: completion.text.clone(), memories: Vec::new(), completion, image: Some(stored.path.clone()) }, None)
            }
            VisionMode::Caption => {
                let caption = vision.caption(&image)?;
                let today = transcript::format_date(crate::memory::now());
                let context = vec![UsedMemory { id: 0, text: format!("The image shows: {caption}"), date: Some(today), score: 0.0 }];
                (self.answer_with(question, context, on_text)?, Some(caption))
            }
        };
        let remembered = if remember {
            let text = match caption.take() {
                Some(text) => text,
                None => self.vision.as_mut().expect("checked above").caption(&image)?,
            };
            let mut report = self.remember_user_words(question)?;
            report.changes.push(self.remember_image(&text, &stored.path)?);
            caption = Some(text);
            Some(report)
        } else {
            None
        };
        let image = ImageSeen { path: stored.path, sha256: stored.sha256, mode, caption };
        Ok(AskOutcome { answer, remembered, image: Some(image) })
    }

    /// Stores an image memory: its caption, pointing at the copy in the data dir.
    fn remember_image(&mut self, caption: &str, stored: &std::path::Path) -> Result<AppliedChange, AssistantError> {
        let text = format!("{} shared an image: {caption}", self.user_name);
        let embedding = one_embedding(&self.embedder, &text)?;
        let now = crate::memory::now();
        let op = MemoryOp::Add {
            text: text.clone(),
            subject: Some(self.user_name.clone()),
            event_time: Some(transcript::format_date(now)),
            source: Default::default(),
            image: Some(stored.to_path_buf()),
            embedding,
            created: None,
        };
        let applied = first(self.store.apply_at(vec![op], now))?;
        Ok(AppliedChange { seq: applied.seq, id: applied.id, kind: OpKind::Add, text, old_text: None })
    }

    /// Answers `question` with `context` in the prompt instead of recalled memories.
    pub fn answer_with(
        &mut self,
        question: &str,
        context: Vec<UsedMemory>,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Answer, AssistantError> {
        let mut model =
            EngineModel { chat: &mut self.chat, adapters: &self.adapters, sampling: &self.sampling, system: self.system.as_deref() };
        Ok(self.pipeline.answer_with(question, context, &mut model, on_text)?)
    }

    /// The newest turns of `conversation` (each with its session's date) that fit in the
    /// context with room for a question and the answer, oldest first.
    pub fn full_context(&self, conversation: &Conversation) -> Result<Vec<UsedMemory>, AssistantError> {
        // Room for the prompt's own text, the question and the answer.
        let budget = self.chat.info().context.saturating_sub(self.sampling.max_tokens + 256);
        let mut used = 0;
        let mut lines = Vec::new();
        for session in conversation.sessions.iter().rev() {
            for turn in session.turns.iter().rev() {
                let text = format!("{}: {}", turn.speaker, turn_text(turn));
                let tokens = self
                    .chat
                    .tokenizer()
                    .encode(&text)
                    .map_err(|e| PipelineError::Model { operation: Operation::Generate, message: e.to_string() })?
                    .len()
                    + 6;
                if used + tokens > budget {
                    lines.reverse();
                    return Ok(lines);
                }
                used += tokens;
                lines.push(UsedMemory { id: 0, text, date: session.date.clone(), score: 0.0 });
            }
        }
        lines.reverse();
        Ok(lines)
    }

    /// Sentence embeddings of `texts` (unit length).
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, AssistantError> {
        Ok(EngineEmbedder(&self.embedder).embed(texts)?)
    }

    /// Remembers what the user said, dated today. Only the user's words are remembered:
    /// a small model's answer is not a trustworthy source of facts.
    pub fn remember_user_words(&mut self, text: &str) -> Result<TurnReport, AssistantError> {
        let now = crate::memory::now();
        let exchange = Exchange {
            turns: vec![Turn { id: None, speaker: self.user_name.clone(), text: text.to_owned() }],
            date: Some(transcript::format_date(now)),
            time: Some(now),
            conversation: None,
            session: None,
        };
        self.remember(&exchange)
    }

    /// Runs extraction and update on `exchange` and applies the result.
    pub fn remember(&mut self, exchange: &Exchange) -> Result<TurnReport, AssistantError> {
        let mut model =
            EngineModel { chat: &mut self.chat, adapters: &self.adapters, sampling: &self.sampling, system: self.system.as_deref() };
        Ok(self.pipeline.remember(exchange, &mut self.store, &mut model, &mut EngineEmbedder(&self.embedder))?)
    }

    /// Feeds `conversations` through the pipeline session by session, in order, `window`
    /// turns per extraction, calling `progress` after each exchange; `progress` returning
    /// `Break` stops after that exchange (everything before it is durable).
    pub fn ingest(
        &mut self,
        conversations: &[Conversation],
        sessions: Option<&SessionRange>,
        window: usize,
        progress: &mut dyn FnMut(IngestProgress<'_>) -> ControlFlow<()>,
    ) -> Result<IngestSummary, AssistantError> {
        let started = Instant::now();
        let window = window.max(1);
        let mut summary = IngestSummary { conversations: conversations.len(), ..IngestSummary::default() };
        fn selected<'c>(
            conversation: &'c Conversation,
            sessions: Option<&'c SessionRange>,
        ) -> impl Iterator<Item = &'c transcript::Session> {
            conversation.sessions.iter().filter(move |s| sessions.is_none_or(|range| range.contains(s.number)))
        }
        let turns_total: usize = conversations.iter().flat_map(|c| selected(c, sessions)).map(|s| s.turns.len()).sum();
        let mut turns_done = 0;
        'conversations: for conversation in conversations {
            for session in selected(conversation, sessions) {
                summary.sessions += 1;
                for exchange in session_exchanges(conversation, session, window) {
                    let report = self.remember(&exchange)?;
                    turns_done += exchange.turns.len();
                    summary.turns += exchange.turns.len();
                    summary.count(&report);
                    let step = IngestProgress {
                        conversation: &conversation.id,
                        session: session.number,
                        turns_done,
                        turns_total,
                        report: &report,
                    };
                    if progress(step).is_break() {
                        summary.cancelled = true;
                        break 'conversations;
                    }
                }
            }
        }
        summary.seconds = started.elapsed().as_secs_f64();
        summary.memories = self.store.len();
        Ok(summary)
    }

    /// Hybrid search for `text` (keywords and meaning).
    pub fn search(&self, text: &str, top_k: usize, filter: MemoryFilter) -> Result<Vec<SearchHit>, AssistantError> {
        search(&self.store, &self.embedder, text, top_k, filter)
    }

    pub fn add_memory(&mut self, text: &str, subject: Option<String>) -> Result<Applied, AssistantError> {
        add_memory(&mut self.store, &self.embedder, text, subject)
    }

    pub fn edit_memory(&mut self, id: MemoryId, text: &str) -> Result<Applied, AssistantError> {
        edit_memory(&mut self.store, &self.embedder, id, text)
    }

    pub fn forget_memory(&mut self, id: MemoryId) -> Result<Applied, AssistantError> {
        forget_memory(&mut self.store, id)
    }

    pub fn undo(&mut self) -> Result<Option<Undone>, AssistantError> {
        Ok(self.store.undo()?)
    }

    /// Turns per extraction when ingesting.
    pub fn extract_window(&self) -> usize {
        self.extract_window
    }

    pub fn set_extract_window(&mut self, turns: usize) {
        self.extract_window = turns.max(1);
    }
}

/// The exchanges an ingest remembers `session` in: `window` turns each (at least one),
/// with the session's date and time.
pub fn session_exchanges<'a>(
    conversation: &'a Conversation,
    session: &'a transcript::Session,
    window: usize,
) -> impl Iterator<Item = Exchange> + 'a {
    session.turns.chunks(window.max(1)).map(move |chunk| Exchange {
        turns: chunk.iter().map(|t| Turn { id: Some(t.id.clone()), speaker: t.speaker.clone(), text: turn_text(t) }).collect(),
        date: session.date.clone().or_else(|| session.date_time.clone()),
        time: session.timestamp,
        conversation: Some(conversation.id.clone()),
        session: Some(format!("session_{}", session.number)),
    })
}

/// What the model reads of a turn: its text, and the caption of an image shared with it.
fn turn_text(turn: &transcript::Turn) -> String {
    match &turn.image_caption {
        Some(caption) => format!("{} [shares {caption}]", turn.text),
        None => turn.text.clone(),
    }
}

/// Hybrid search, for callers that hold a store and an embedder but no chat model.
pub fn search(
    store: &MemoryStore,
    embedder: &Embedder,
    text: &str,
    top_k: usize,
    filter: MemoryFilter,
) -> Result<Vec<SearchHit>, AssistantError> {
    let embedding = EngineEmbedder(embedder).embed(&[text])?.pop();
    Ok(store.search(&SearchQuery { text: text.to_owned(), embedding, top_k, filter })?)
}

/// Adds `text` as a memory, as the user wrote it.
pub fn add_memory(store: &mut MemoryStore, embedder: &Embedder, text: &str, subject: Option<String>) -> Result<Applied, AssistantError> {
    let embedding = one_embedding(embedder, text)?;
    let now = crate::memory::now();
    let op = MemoryOp::Add {
        text: text.trim().to_owned(),
        subject,
        event_time: Some(transcript::format_date(now)),
        source: Default::default(),
        image: None,
        embedding,
        created: None,
    };
    first(store.apply_at(vec![op], now))
}

/// Replaces the text of memory `id`.
pub fn edit_memory(store: &mut MemoryStore, embedder: &Embedder, id: MemoryId, text: &str) -> Result<Applied, AssistantError> {
    if store.get(id).is_none() {
        return Err(AssistantError::NoSuchMemory(id));
    }
    let embedding = one_embedding(embedder, text)?;
    first(store.apply(vec![MemoryOp::Update { id, text: text.trim().to_owned(), event_time: None, embedding }]))
}

pub fn forget_memory(store: &mut MemoryStore, id: MemoryId) -> Result<Applied, AssistantError> {
    if store.get(id).is_none() {
        return Err(AssistantError::NoSuchMemory(id));
    }
    first(store.apply(vec![MemoryOp::Delete { id }]))
}

fn one_embedding(embedder: &Embedder, text: &str) -> Result<Vec<f32>, AssistantError> {
    let mut embeddings = EngineEmbedder(embedder).embed(&[text])?;
    embeddings.pop().ok_or_else(|| PipelineError::Embedder("no embedding returned".into()).into())
}

/// The acknowledgement of a one-op batch.
fn first(result: Result<Vec<Applied>, MemoryError>) -> Result<Applied, AssistantError> {
    crate::memory::saved(result)?
        .into_iter()
        .next()
        .ok_or_else(|| MemoryError::InvalidOp { index: 0, reason: "nothing was applied".into() }.into())
}
