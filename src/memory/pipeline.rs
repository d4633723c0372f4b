//! The MemLoRA memory pipeline: after an exchange, **extract** facts, retrieve the old
//! memories most similar to each, let the model **update** them (ADD / UPDATE / DELETE /
//! NONE), validate and apply the decisions as one batch; before an answer, retrieve
//! memories and **generate** with them in context.
//!
//! The pipeline does not own a model: it talks to [`LanguageModel`] and [`TextEmbedder`],
//! which the caller implements over the engine (binding each operation to its adapter) and
//! tests implement with scripted stand-ins.

use std::collections::HashSet;
use std::fmt;
use std::ops::ControlFlow;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::engine::Generation;
use crate::eval::metrics::kept_share;

use super::dates::{self, format_day, parse_day};
use super::grounding;
use super::parse::{self, Event, ParseError, ProposedOp};
use super::prompts::{PromptError, Prompts, RenderedPrompt};
use super::{MemoryError, MemoryId, MemoryOp, MemorySource, MemoryStore, OpKind, SearchHit, SearchQuery};

/// The model operations of the pipeline; each may run with its own adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Extract,
    Update,
    Generate,
}

impl Operation {
    pub const ALL: [Operation; 3] = [Operation::Extract, Operation::Update, Operation::Generate];
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::Extract => "extract",
            Operation::Update => "update",
            Operation::Generate => "generate",
        })
    }
}

impl std::str::FromStr for Operation {
    type Err = String;

    fn from_str(text: &str) -> Result<Operation, String> {
        Operation::ALL
            .into_iter()
            .find(|operation| operation.to_string() == text)
            .ok_or_else(|| format!("unknown memory operation '{text}' (expected extract, update or generate)"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error("{operation} model: {message}")]
    Model { operation: Operation, message: String },
    /// The prompt does not fit the model's context; memory operations skip such input.
    #[error("{operation} model: {message}")]
    TooLong { operation: Operation, message: String },
    #[error("embedder: {0}")]
    Embedder(String),
}

/// What the model produced for one prompt.
#[derive(Debug, Clone, Default)]
pub struct Completion {
    /// The continuation, without the response prefix.
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// The engine's timings, when a real model ran.
    pub stats: Option<Generation>,
}

pub trait LanguageModel {
    /// Continues `prompt` (its messages, then its response prefix) for `operation`,
    /// passing each new piece of text to `on_text`, which may stop the model early.
    fn complete(
        &mut self,
        operation: Operation,
        prompt: &RenderedPrompt,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Completion, PipelineError>;
}

pub trait TextEmbedder {
    /// One unit-length vector per text, of the store's dimension.
    fn embed(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, PipelineError>;
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Turn {
    /// The turn's id in its conversation (LoCoMo's "D1:3"), when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub speaker: String,
    pub text: String,
}

/// The turns to remember, with where and when they happened.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exchange {
    pub turns: Vec<Turn>,
    /// The date the conversation took place ("8 May 2023"), so that "yesterday" can
    /// become a date; it is also the new memories' event time.
    pub date: Option<String>,
    /// Unix seconds the memories are stamped with; `None` = now.
    pub time: Option<i64>,
    pub conversation: Option<String>,
    pub session: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PipelineSettings {
    /// Memories given to the generation operation.
    pub answer_memories: usize,
    /// Old memories shown to the update operation per new fact (MemLoRA: 5).
    pub update_candidates: usize,
    pub undecided_facts: UndecidedFacts,
    /// Decode extraction and update under their JSON schemas ([`super::schema`]).
    pub constrained: bool,
}

/// What happens to a new fact when the update operation's output for it is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UndecidedFacts {
    /// Keep it as a new memory: nothing the user said is lost to a formatting slip.
    #[default]
    Add,
    Skip,
}

impl Default for PipelineSettings {
    fn default() -> PipelineSettings {
        PipelineSettings { answer_memories: 10, update_candidates: 5, undecided_facts: UndecidedFacts::Add, constrained: true }
    }
}

/// One applied change, for reports and the UI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppliedChange {
    pub seq: u64,
    pub id: MemoryId,
    pub kind: OpKind,
    /// The memory's text after the change (before it, for a delete).
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_text: Option<String>,
}

/// The share of an old memory's words (stemmed, as LoCoMo's token F1 counts them) that an
/// UPDATE's new text must keep. A rewrite that keeps less says something else: it would
/// lose the memory, so its text is added beside the memory instead. distill labels UPDATE
/// by the same rule, so the update expert is only taught rewrites that pass it.
pub const UPDATE_KEEPS: f64 = 0.5;

/// What remembering one exchange did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TurnReport {
    pub facts: Vec<String>,
    pub changes: Vec<AppliedChange>,
    /// Model output or decisions that could not be used, each with why.
    pub skipped: Vec<String>,
    /// Facts judged already known (NONE), including exact repeats.
    pub unchanged: usize,
    /// Facts added because the update output for them was unusable.
    pub undecided: usize,
    /// Extracted facts not kept because what was said does not support them.
    #[serde(default)]
    pub ungrounded: usize,
    /// Model outputs that could not be read at all.
    #[serde(default)]
    pub unusable_outputs: usize,
    pub model_calls: usize,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub seconds: f64,
}

/// A memory given to the generation operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsedMemory {
    pub id: MemoryId,
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub date: Option<String>,
    pub score: f64,
}

#[derive(Debug, Clone)]
pub struct Answer {
    pub text: String,
    pub memories: Vec<UsedMemory>,
    pub completion: Completion,
    /// The image the vision model looked at to answer, if it did.
    pub image: Option<std::path::PathBuf>,
}

/// The pipeline's fixed parts: prompts and settings.
#[derive(Debug)]
pub struct MemoryPipeline {
    prompts: Prompts,
    settings: PipelineSettings,
}

impl MemoryPipeline {
    pub fn new(prompts: Prompts, settings: PipelineSettings) -> MemoryPipeline {
        MemoryPipeline { prompts, settings }
    }

    pub fn prompts(&self) -> &Prompts {
        &self.prompts
    }

    pub fn settings(&self) -> &PipelineSettings {
        &self.settings
    }

    /// The **extract** prompt of `exchange` (`None` when none of its turns says anything).
    /// Training sets are rendered by this same function, so that an adapter learns the
    /// prompt it will be given.
    pub fn extract_prompt(&self, exchange: &Exchange) -> Result<Option<RenderedPrompt>, PipelineError> {
        let turns = spoken_turns(exchange);
        if turns.is_empty() {
            return Ok(None);
        }
        let mut prompt = self.prompts.render(Operation::Extract, json!({ "date": exchange.date, "turns": turns }))?;
        if self.settings.constrained {
            prompt.constraint = Some(super::schema::facts());
        }
        Ok(Some(prompt))
    }

    /// The old memories the **update** operation is shown for `fact`, most similar first.
    pub fn update_candidates(&self, fact: &str, embedding: &[f32], store: &MemoryStore) -> Result<Vec<SearchHit>, PipelineError> {
        let query = SearchQuery {
            text: fact.to_owned(),
            embedding: Some(embedding.to_vec()),
            top_k: self.settings.update_candidates,
            ..SearchQuery::default()
        };
        Ok(store.search(&query)?)
    }

    /// The **update** prompt for `fact` with `candidates` numbered 0…n−1.
    pub fn update_prompt(&self, fact: &str, candidates: &[SearchHit]) -> Result<RenderedPrompt, PipelineError> {
        let memories: Vec<_> = candidates.iter().enumerate().map(|(index, hit)| json!({"id": index, "text": hit.memory.text})).collect();
        let mut prompt = self.prompts.render(Operation::Update, json!({ "fact": fact, "memories": memories }))?;
        if self.settings.constrained {
            prompt.constraint = Some(super::schema::memory_ops(candidates.len()));
        }
        Ok(prompt)
    }

    /// The **generate** prompt for `question` with `memories` in context.
    pub fn generate_prompt(&self, question: &str, memories: &[UsedMemory]) -> Result<RenderedPrompt, PipelineError> {
        Ok(self.prompts.render(Operation::Generate, json!({ "question": question, "memories": memories }))?)
    }

    /// Extracts facts from `exchange`, decides what each changes and applies all the
    /// decisions as one batch: either all of them are durable or none is.
    pub fn remember(
        &self,
        exchange: &Exchange,
        store: &mut MemoryStore,
        model: &mut dyn LanguageModel,
        embedder: &mut dyn TextEmbedder,
    ) -> Result<TurnReport, PipelineError> {
        let started = Instant::now();
        let mut report = TurnReport::default();
        let turns = spoken_turns(exchange);
        // Questions, small talk and requests state nothing to remember: the model is not
        // asked, so it cannot make something up from them.
        let said: Vec<&str> = turns.iter().flat_map(|turn| grounding::statements(&turn.text)).collect();
        if said.is_empty() {
            return Ok(report);
        }
        let Some(prompt) = self.extract_prompt(exchange)? else {
            return Ok(report);
        };
        let Some(output) = complete_json(model, Operation::Extract, &prompt, &mut report)? else {
            report.seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        };
        let extracted = match parse::parse_facts(&output) {
            Ok(parsed) => {
                report.skipped.extend(parsed.skipped.into_iter().map(|reason| format!("extract: {reason}")));
                parsed.items
            }
            Err(error) => {
                skip(&mut report, Operation::Extract, &error, &output);
                Vec::new()
            }
        };
        let facts = grounded_facts(extracted, exchange, &turns, &said, &mut report);
        report.facts = facts.iter().map(|(text, _)| text.clone()).collect();
        if report.facts.is_empty() {
            report.seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        }

        let fact_refs: Vec<&str> = report.facts.iter().map(String::as_str).collect();
        let fact_embeddings = embed_checked(embedder, &fact_refs)?;
        let mut plan = Plan::default();
        for ((fact, event_day), embedding) in facts.iter().zip(fact_embeddings) {
            self.decide(fact, event_day.as_deref(), embedding, store, model, &mut plan, &mut report)?;
        }
        let (ops, descriptions) = plan.into_ops(exchange, &turns, embedder)?;
        let applied = super::saved(store.apply_at(ops, exchange.time.unwrap_or_else(super::now)))?;
        report.changes = applied
            .into_iter()
            .zip(descriptions)
            .map(|(applied, (text, old_text))| AppliedChange { seq: applied.seq, id: applied.id, kind: applied.kind, text, old_text })
            .collect();
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Decides what `fact` (which happened on `event_day`, when it says so) changes and
    /// records it in `plan`.
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &self,
        fact: &str,
        event_day: Option<&str>,
        embedding: Vec<f32>,
        store: &MemoryStore,
        model: &mut dyn LanguageModel,
        plan: &mut Plan,
        report: &mut TurnReport,
    ) -> Result<(), PipelineError> {
        let candidates = self.update_candidates(fact, &embedding, store)?;
        // With nothing related there is nothing to decide; a repeat of a memory word for
        // word is known. Neither needs the model.
        if candidates.is_empty() {
            plan.add(fact.to_owned(), Some(embedding), event_day, report);
            return Ok(());
        }
        if candidates.iter().any(|hit| same_text(&hit.memory.text, fact)) {
            report.unchanged += 1;
            return Ok(());
        }
        let prompt = self.update_prompt(fact, &candidates)?;
        let mut decided = false;
        if let Some(output) = complete_json(model, Operation::Update, &prompt, report)? {
            match parse::parse_memory_ops(&output) {
                Ok(parsed) => {
                    report.skipped.extend(parsed.skipped.into_iter().map(|reason| format!("update: {reason}")));
                    for proposed in parsed.items {
                        match plan.take(proposed, &candidates, event_day, report) {
                            Ok(()) => decided = true,
                            Err(reason) => {
                                tracing::info!(%fact, %reason, "skipping a memory decision");
                                report.skipped.push(format!("update: {reason}"));
                            }
                        }
                    }
                }
                Err(error) => skip(report, Operation::Update, &error, &output),
            }
        }
        if !decided && self.settings.undecided_facts == UndecidedFacts::Add {
            report.undecided += 1;
            plan.add(fact.to_owned(), Some(embedding), event_day, report);
        }
        Ok(())
    }

    /// The memories most related to `question`, best first.
    pub fn recall(&self, question: &str, store: &MemoryStore, embedder: &mut dyn TextEmbedder) -> Result<Vec<SearchHit>, PipelineError> {
        if store.is_empty() || self.settings.answer_memories == 0 {
            return Ok(Vec::new());
        }
        let embedding = embed_checked(embedder, &[question])?.pop();
        Ok(store.search(&SearchQuery {
            text: question.to_owned(),
            embedding,
            top_k: self.settings.answer_memories,
            ..SearchQuery::default()
        })?)
    }

    /// Answers `question` with the recalled memories in context, streaming to `on_text`.
    pub fn answer(
        &self,
        question: &str,
        store: &MemoryStore,
        model: &mut dyn LanguageModel,
        embedder: &mut dyn TextEmbedder,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Answer, PipelineError> {
        let memories = used_memories(self.recall(question, store, embedder)?);
        self.answer_with(question, memories, model, on_text)
    }

    /// Answers `question` with `memories` in context (whatever the caller chose: recalled
    /// memories, or a conversation's own turns), streaming to `on_text`.
    pub fn answer_with(
        &self,
        question: &str,
        memories: Vec<UsedMemory>,
        model: &mut dyn LanguageModel,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Answer, PipelineError> {
        let prompt = self.generate_prompt(question, &memories)?;
        let completion = model.complete(Operation::Generate, &prompt, on_text)?;
        Ok(Answer { text: completion.text.clone(), memories, completion, image: None })
    }
}

/// The extracted facts that what was said supports, each with its relative dates written
/// out against the exchange's date and the day it happened when it names one; the others
/// are counted and listed in `report` with why (see [`grounding`]).
fn grounded_facts(
    extracted: Vec<String>,
    exchange: &Exchange,
    turns: &[&Turn],
    said: &[&str],
    report: &mut TurnReport,
) -> Vec<(String, Option<String>)> {
    let session_day = exchange.date.as_deref().and_then(parse_day);
    let year = session_day.map(|day| day.year());
    let mut speakers: Vec<&str> = turns.iter().map(|turn| turn.speaker.as_str()).collect();
    speakers.sort_unstable();
    speakers.dedup();
    let mut kept = Vec::new();
    for fact in extracted {
        let (text, event_day) = match session_day {
            Some(day) => {
                let resolved = dates::resolve_relative_dates(&fact, day);
                (resolved.text, resolved.event_day.map(format_day))
            }
            None => (fact, None),
        };
        let text = match speakers.as_slice() {
            [only] => grounding::with_speaker_for_example(&text, said, only),
            _ => text,
        };
        let Some(reason) = grounding::unsupported(&text, said, &speakers, year) else {
            kept.push((text, event_day));
            continue;
        };
        tracing::info!(fact = %text, %reason, "extracted fact not kept");
        report.ungrounded += 1;
        match grounding::leading_clause(&text).filter(|head| grounding::unsupported(head, said, &speakers, year).is_none()) {
            Some(head) => {
                report.skipped.push(format!("extract: {text:?} not kept ({reason}); kept {head:?}"));
                kept.push((head, event_day));
            }
            None => report.skipped.push(format!("extract: {text:?} not kept: {reason}")),
        }
    }
    kept
}

/// Recalled memories as the generation operation is given them.
pub fn used_memories(hits: Vec<SearchHit>) -> Vec<UsedMemory> {
    hits.into_iter()
        .map(|hit| UsedMemory { id: hit.memory.id, text: hit.memory.text, date: hit.memory.event_time, score: hit.score })
        .collect()
}

/// The turns of `exchange` that say something.
fn spoken_turns(exchange: &Exchange) -> Vec<&Turn> {
    exchange.turns.iter().filter(|turn| !turn.text.trim().is_empty()).collect()
}

/// Runs `prompt` and returns the response prefix plus the model's continuation (`None`
/// when the prompt does not fit the context: recorded as skipped), stopping
/// the model as soon as the JSON value it opened is closed, or, for extraction, as soon as
/// it writes a fact for the second time: small models fall into such loops, and the
/// repeats would only be dropped.
fn complete_json(
    model: &mut dyn LanguageModel,
    operation: Operation,
    prompt: &RenderedPrompt,
    report: &mut TurnReport,
) -> Result<Option<String>, PipelineError> {
    let mut scanner = JsonEnd { stop_on_repeat: operation == Operation::Extract, ..JsonEnd::default() };
    scanner.feed(&prompt.response_prefix);
    let completion = match model.complete(operation, prompt, &mut |piece| {
        if scanner.feed(piece) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }) {
        Ok(completion) => completion,
        Err(PipelineError::TooLong { message, .. }) => {
            tracing::warn!(%operation, %message, "input too long for a memory operation; skipped");
            report.skipped.push(format!("{operation}: {message}"));
            return Ok(None);
        }
        Err(error) => return Err(error),
    };
    report.model_calls += 1;
    report.prompt_tokens += completion.prompt_tokens;
    report.completion_tokens += completion.completion_tokens;
    Ok(Some(format!("{}{}", prompt.response_prefix, completion.text)))
}

fn skip(report: &mut TurnReport, operation: Operation, error: &ParseError, output: &str) {
    tracing::warn!(%operation, %error, output, "unusable model output skipped");
    report.unusable_outputs += 1;
    report.skipped.push(format!("{operation}: {error}"));
}

fn embed_checked(embedder: &mut dyn TextEmbedder, texts: &[&str]) -> Result<Vec<Vec<f32>>, PipelineError> {
    let embeddings = embedder.embed(texts)?;
    if embeddings.len() != texts.len() {
        return Err(PipelineError::Embedder(format!("{} embeddings for {} texts", embeddings.len(), texts.len())));
    }
    Ok(embeddings)
}

/// Whitespace- and case-insensitive equality, ignoring a final full stop: a repeat the
/// update operation is never asked about.
pub fn same_text(a: &str, b: &str) -> bool {
    let normal = |text: &str| text.trim().trim_end_matches('.').split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
    normal(a) == normal(b)
}

fn already_changed(id: MemoryId) -> String {
    format!("memory {id} was already changed by an earlier decision of this exchange")
}

/// The validated decisions of one exchange, in order.
#[derive(Default)]
struct Plan {
    decisions: Vec<Decision>,
    /// Old memories already changed by an earlier decision: a second change to the same
    /// memory in one batch would contradict the first.
    touched: HashSet<MemoryId>,
    added: HashSet<String>,
}

enum Decision {
    Add { text: String, embedding: Option<Vec<f32>>, event_day: Option<String> },
    Update { id: MemoryId, text: String, old_text: String, event_day: Option<String> },
    Delete { id: MemoryId, old_text: String },
}

impl Plan {
    fn add(&mut self, text: String, embedding: Option<Vec<f32>>, event_day: Option<&str>, report: &mut TurnReport) {
        let key = text.trim().trim_end_matches('.').to_lowercase();
        if self.added.insert(key) {
            self.decisions.push(Decision::Add { text, embedding, event_day: event_day.map(str::to_owned) });
        } else {
            report.unchanged += 1;
        }
    }

    /// Validates one proposed operation against the candidates the model was shown.
    fn take(
        &mut self,
        proposed: ProposedOp,
        candidates: &[SearchHit],
        event_day: Option<&str>,
        report: &mut TurnReport,
    ) -> Result<(), String> {
        let ProposedOp { id, text, event, .. } = proposed;
        let old = || -> Result<&SearchHit, String> {
            let shown = id.as_deref().ok_or_else(|| format!("{event:?} without an id"))?;
            shown
                .parse::<usize>()
                .ok()
                .and_then(|index| candidates.get(index))
                .ok_or_else(|| format!("{event:?} of id {shown:?}, which is not one of the {} memories shown", candidates.len()))
        };
        match event {
            Event::None => {
                report.unchanged += 1;
                Ok(())
            }
            Event::Add => {
                let text = text.ok_or("ADD without text")?;
                self.add(text, None, event_day, report);
                Ok(())
            }
            Event::Update => {
                let old = old()?;
                let text = text.ok_or("UPDATE without text")?;
                if same_text(&text, &old.memory.text) {
                    report.unchanged += 1;
                    return Ok(());
                }
                if self.touched.contains(&old.memory.id) {
                    return Err(already_changed(old.memory.id));
                }
                if kept_share(&text, &old.memory.text) < UPDATE_KEEPS {
                    report.skipped.push(format!(
                        "update: UPDATE of memory {} would drop most of {:?}; {:?} added beside it",
                        old.memory.id, old.memory.text, text
                    ));
                    self.add(text, None, event_day, report);
                    return Ok(());
                }
                self.touch(old.memory.id)?;
                self.decisions.push(Decision::Update {
                    id: old.memory.id,
                    text,
                    old_text: old.memory.text.clone(),
                    event_day: event_day.map(str::to_owned),
                });
                Ok(())
            }
            Event::Delete => {
                let old = old()?;
                self.touch(old.memory.id)?;
                self.decisions.push(Decision::Delete { id: old.memory.id, old_text: old.memory.text.clone() });
                Ok(())
            }
        }
    }

    fn touch(&mut self, id: MemoryId) -> Result<(), String> {
        if self.touched.insert(id) {
            Ok(())
        } else {
            Err(already_changed(id))
        }
    }

    /// The store operations, with embeddings for the texts that lack one, and each one's
    /// text and old text for the report.
    #[allow(clippy::type_complexity)]
    fn into_ops(
        self,
        exchange: &Exchange,
        turns: &[&Turn],
        embedder: &mut dyn TextEmbedder,
    ) -> Result<(Vec<MemoryOp>, Vec<(String, Option<String>)>), PipelineError> {
        let missing: Vec<&str> = self
            .decisions
            .iter()
            .filter_map(|decision| match decision {
                Decision::Add { text, embedding: None, .. } | Decision::Update { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        let mut embeddings = if missing.is_empty() { Vec::new() } else { embed_checked(embedder, &missing)? }.into_iter();
        let source = MemorySource {
            conversation: exchange.conversation.clone(),
            session: exchange.session.clone(),
            turns: turns.iter().filter_map(|turn| turn.id.clone()).collect(),
        };
        let mut ops = Vec::with_capacity(self.decisions.len());
        let mut descriptions = Vec::with_capacity(self.decisions.len());
        for decision in self.decisions {
            descriptions.push(match &decision {
                Decision::Add { text, .. } => (text.clone(), None),
                Decision::Update { text, old_text, .. } => (text.clone(), Some(old_text.clone())),
                Decision::Delete { old_text, .. } => (old_text.clone(), None),
            });
            ops.push(match decision {
                Decision::Add { text, embedding, event_day } => {
                    let embedding = match embedding {
                        Some(embedding) => embedding,
                        None => embeddings.next().unwrap_or_default(),
                    };
                    MemoryOp::Add {
                        subject: subject_of(&text, turns),
                        text,
                        event_time: event_day.or_else(|| exchange.date.clone()),
                        source: source.clone(),
                        image: None,
                        embedding,
                        created: None,
                    }
                }
                Decision::Update { id, text, event_day, .. } => MemoryOp::Update {
                    id,
                    text,
                    event_time: event_day.or_else(|| exchange.date.clone()),
                    embedding: embeddings.next().unwrap_or_default(),
                },
                Decision::Delete { id, .. } => MemoryOp::Delete { id },
            });
        }
        Ok((ops, descriptions))
    }
}

/// The speaker a fact is about: the one it names (the first named), else the only
/// speaker of the exchange.
fn subject_of(fact: &str, turns: &[&Turn]) -> Option<String> {
    let words: HashSet<String> = fact.split(|c: char| !c.is_alphanumeric()).map(str::to_lowercase).collect();
    let mut speakers: Vec<&str> = Vec::new();
    for turn in turns {
        if !speakers.contains(&turn.speaker.as_str()) {
            speakers.push(&turn.speaker);
        }
    }
    let named = fact
        .split(|c: char| !c.is_alphanumeric())
        .find_map(|word| speakers.iter().find(|speaker| speaker.eq_ignore_ascii_case(word)))
        .or_else(|| speakers.iter().find(|speaker| words.contains(&speaker.to_lowercase())));
    match (named, speakers.as_slice()) {
        (Some(speaker), _) => Some((*speaker).to_owned()),
        (None, [only]) => Some((*only).to_owned()),
        _ => None,
    }
}

/// Tells when a streamed JSON value is complete (the depth of brackets outside strings
/// returns to zero) or, optionally, starts repeating its strings.
#[derive(Default)]
struct JsonEnd {
    depth: usize,
    opened: bool,
    in_string: bool,
    escaped: bool,
    stop_on_repeat: bool,
    string: String,
    strings: HashSet<String>,
}

impl JsonEnd {
    /// Feeds more text; true once the first value is closed or a string repeats.
    fn feed(&mut self, text: &str) -> bool {
        for c in text.chars() {
            if self.in_string {
                match (self.escaped, c) {
                    (true, _) => self.escaped = false,
                    (false, '\\') => self.escaped = true,
                    (false, '"') => {
                        self.in_string = false;
                        let string = std::mem::take(&mut self.string);
                        if self.stop_on_repeat && !string.trim().is_empty() && !self.strings.insert(string.trim().to_lowercase()) {
                            return true;
                        }
                    }
                    _ => {}
                }
                if self.in_string {
                    self.string.push(c);
                }
                continue;
            }
            match c {
                '"' => self.in_string = true,
                '{' | '[' => {
                    self.depth += 1;
                    self.opened = true;
                }
                '}' | ']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.opened && self.depth == 0 {
                        return true;
                    }
                }
                _ => {}
            }
        }
        false
    }
}

#[cfg(test)]
#[path = "pipeline_tests.rs"]
mod tests;
