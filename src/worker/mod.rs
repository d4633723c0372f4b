//! The worker: one thread that owns the [`Assistant`] (the models and the memory store)
//! and serves requests from every front end — the terminal app, batch mode, the commands
//! and the daemon's clients. A request carries its own reply channel, on which the worker sends
//! the request's events in order, ending with [`Event::Done`]; changes to memory are also
//! broadcast to every subscriber, so that any memories pane stays current.
//!
//! Model work is blocking (candle), so the worker runs on its own OS thread and the async
//! front ends never wait on it: they await their reply channel.
//!
//! Adapter merges need no model, so they run on a second thread, one job at a time, and
//! chat goes on meanwhile. When a merge rewrites an adapter that an operation runs with,
//! the worker attaches the new version between two requests.

pub mod protocol;

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

use crate::adapters::{AdapterRegistry, Admission, Budget, LoraAdapter, MergeOutcome, MergeProgress, MergeSpec};
use crate::assistant::{self, Assistant};
use crate::memory::pipeline::{AppliedChange, TurnReport, UsedMemory};
use crate::memory::transfer::MemoryRecord;
use crate::memory::{Change, MemoryFilter, MemoryId, OpKind};
use crate::transcript::{self, SessionRange, TranscriptFormat};
use crate::vision::VisionMode;

/// What a front end can ask of the worker. The JSON form (`{"type": "ask", …}`) is
/// batch mode's protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Answer with memories; then remember what the user said unless `remember` is false.
    Ask {
        text: String,
        #[serde(default = "default_true")]
        remember: bool,
        /// An image the question is about; the vision model looks at it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image: Option<PathBuf>,
    },
    /// Store `text` as a memory, as written.
    Remember {
        text: String,
        #[serde(default)]
        subject: Option<String>,
    },
    Search {
        query: String,
        #[serde(default)]
        top_k: Option<usize>,
    },
    /// (`memory_id`, because batch mode's `id` names the request.)
    Forget {
        memory_id: MemoryId,
    },
    Edit {
        memory_id: MemoryId,
        text: String,
    },
    /// Revert the last change to memory.
    Undo,
    /// Every memory.
    Memories,
    /// Feed a conversation file through the pipeline.
    Ingest {
        path: PathBuf,
        #[serde(default)]
        format: Option<TranscriptFormat>,
        #[serde(default)]
        conversations: Vec<String>,
        #[serde(default)]
        sessions: Option<String>,
    },
    /// The adapters bound to each memory operation.
    Adapters,
    /// Merge installed adapters into a new one (a background job: other requests are
    /// served meanwhile).
    MergeAdapters(MergeSpec),
    /// Model, memory count and adapters, for a status line.
    Status,
}

impl Request {
    /// The request's `type`, as the protocol spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Ask { .. } => "ask",
            Request::Remember { .. } => "remember",
            Request::Search { .. } => "search",
            Request::Forget { .. } => "forget",
            Request::Edit { .. } => "edit",
            Request::Undo => "undo",
            Request::Memories => "memories",
            Request::Ingest { .. } => "ingest",
            Request::Adapters => "adapters",
            Request::MergeAdapters(_) => "merge_adapters",
            Request::Status => "status",
        }
    }
}

fn default_true() -> bool {
    true
}

/// What the worker reports back. Every request ends with `Done` (after an `Error` too).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A piece of a streaming answer.
    Token {
        text: String,
    },
    Answer {
        text: String,
        memories_used: Vec<UsedMemory>,
        completion_tokens: usize,
        tokens_per_second: f64,
        cancelled: bool,
        /// The image the vision model looked at (the one attached, or one a memory recalled)
        /// and how it answered.
        #[serde(skip_serializing_if = "Option::is_none")]
        image: Option<PathBuf>,
        #[serde(skip_serializing_if = "Option::is_none")]
        vision: Option<VisionMode>,
    },
    /// What remembering an exchange (or an ingest step) did.
    Remembered {
        report: TurnReport,
    },
    /// Memory changed (also broadcast to subscribers).
    Changed {
        changes: Vec<AppliedChange>,
    },
    Memories {
        memories: Vec<MemoryRecord>,
    },
    Hits {
        hits: Vec<Hit>,
    },
    /// Progress of a long request (an ingest).
    Progress {
        done: usize,
        total: usize,
        message: String,
    },
    Adapters {
        bindings: Vec<Binding>,
    },
    /// Where a merge job is.
    MergeProgress {
        progress: MergeProgress,
    },
    /// A merge job's result, installed.
    Merged {
        outcome: MergeOutcome,
    },
    Status {
        status: Status,
    },
    Error {
        message: String,
    },
    Done,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hit {
    pub score: f64,
    pub memory: MemoryRecord,
}

/// An adapter bound to a memory operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Binding {
    pub operation: String,
    pub adapter: String,
    pub scale: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub model: String,
    pub memories: usize,
    pub bindings: Vec<Binding>,
}

/// A memory change, as broadcast to every subscriber.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryNotice {
    pub changes: Vec<AppliedChange>,
    pub memories: usize,
}

/// Cancels one request: the answer stops at the next token, an ingest after the current
/// exchange (whose changes stay durable).
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A submitted request: its events, and the means to cancel it.
pub struct Submission {
    pub events: mpsc::UnboundedReceiver<Event>,
    pub cancel: CancelToken,
}

/// A request on its way to whoever serves it: the worker thread, or the daemon a
/// [`WorkerHandle::remote`] handle forwards to.
pub(crate) struct Job {
    pub(crate) request: Request,
    pub(crate) reply: mpsc::UnboundedSender<Event>,
    pub(crate) cancel: CancelToken,
}

/// Where merge jobs install adapters, and within which storage budget.
#[derive(Debug, Clone)]
pub struct AdapterStorage {
    pub registry: AdapterRegistry,
    pub budget: Budget,
}

/// The front ends' side of the worker. Cloning it gives another front end.
#[derive(Clone)]
pub struct WorkerHandle {
    jobs: mpsc::UnboundedSender<Job>,
    /// Merges (the same queue as `jobs` for a remote handle).
    adapter_jobs: mpsc::UnboundedSender<Job>,
    notices: broadcast::Sender<MemoryNotice>,
}

impl WorkerHandle {
    /// Queues `request`; its events arrive on the returned receiver.
    pub fn submit(&self, request: Request) -> Submission {
        self.submit_with(request, CancelToken::default())
    }

    /// [`WorkerHandle::submit`] with a token made beforehand (the daemon makes one when a
    /// request line arrives, so that it can be cancelled while it waits its turn).
    pub fn submit_with(&self, request: Request, cancel: CancelToken) -> Submission {
        let (reply, events) = mpsc::unbounded_channel();
        let job = Job { request, reply, cancel: cancel.clone() };
        let queue = if matches!(job.request, Request::MergeAdapters(_)) { &self.adapter_jobs } else { &self.jobs };
        if let Err(mpsc::error::SendError(job)) = queue.send(job) {
            let _ = job.reply.send(Event::Error { message: "the worker has stopped".into() });
            let _ = job.reply.send(Event::Done);
        }
        Submission { events, cancel }
    }

    /// Memory changes made by any request, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<MemoryNotice> {
        self.notices.subscribe()
    }

    /// A handle whose requests are served by someone else than a local worker thread (the
    /// daemon client): it receives the jobs, and announces memory changes on the sender.
    pub(crate) fn remote() -> (WorkerHandle, mpsc::UnboundedReceiver<Job>, broadcast::Sender<MemoryNotice>) {
        let (jobs, queue) = mpsc::unbounded_channel::<Job>();
        let (notices, _) = broadcast::channel(256);
        (WorkerHandle { adapter_jobs: jobs.clone(), jobs, notices: notices.clone() }, queue, notices)
    }
}

/// Starts the worker thread with `assistant` (and the thread of adapter jobs on
/// `adapters`); they stop when every handle is dropped, after finishing the request they
/// are serving (so a memory operation in flight becomes durable). The returned thread
/// ends after both.
pub fn spawn(assistant: Assistant, model_name: String, adapters: AdapterStorage) -> (WorkerHandle, std::thread::JoinHandle<()>) {
    let (jobs, mut queue) = mpsc::unbounded_channel::<Job>();
    let (adapter_jobs, adapter_queue) = mpsc::unbounded_channel::<Job>();
    // Adapters a merge rewrote, for the worker to attach again before its next request.
    let (changed, mut changes) = mpsc::unbounded_channel::<String>();
    let (notices, _) = broadcast::channel(256);
    let handle = WorkerHandle { jobs, adapter_jobs, notices: notices.clone() };
    let registry = adapters.registry.clone();
    let adapter_thread = std::thread::Builder::new()
        .name("memlora-adapter-jobs".into())
        .spawn(move || run_adapter_jobs(adapter_queue, adapters, changed))
        .unwrap_or_else(|error| panic!("cannot start the adapter jobs thread: {error}"));
    let thread = std::thread::Builder::new()
        .name("memlora-worker".into())
        .spawn(move || {
            let mut worker = Worker { assistant, model_name, notices, registry };
            while let Some(job) = queue.blocking_recv() {
                while let Ok(name) = changes.try_recv() {
                    worker.reload_adapter(&name);
                }
                worker.serve(job);
            }
            let _ = adapter_thread.join();
        })
        .unwrap_or_else(|error| panic!("cannot start the worker thread: {error}"));
    (handle, thread)
}

/// Serves merge jobs in order; tells the worker about adapters they rewrote.
fn run_adapter_jobs(mut queue: mpsc::UnboundedReceiver<Job>, storage: AdapterStorage, changed: mpsc::UnboundedSender<String>) {
    while let Some(Job { request, reply, cancel }) = queue.blocking_recv() {
        let send = |event: Event| {
            let _ = reply.send(event);
        };
        let Request::MergeAdapters(spec) = request else {
            send(Event::Error { message: "not an adapter job".into() });
            send(Event::Done);
            continue;
        };
        if cancel.is_cancelled() {
            send(Event::Error { message: "cancelled before it started".into() });
            send(Event::Done);
            continue;
        }
        let merged = storage.registry.merge(&spec, storage.budget, &mut |progress| {
            send(Event::MergeProgress { progress });
            if cancel.is_cancelled() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        match merged {
            Ok(outcome) => {
                // Before `Merged`: a request sent after it finds the new version attached.
                if let Admission::Merged { into, .. } = &outcome.admission {
                    let _ = changed.send(into.clone());
                }
                send(Event::Merged { outcome });
            }
            Err(error) => send(Event::Error { message: error.to_string() }),
        }
        send(Event::Done);
    }
}

struct Worker {
    assistant: Assistant,
    model_name: String,
    notices: broadcast::Sender<MemoryNotice>,
    registry: AdapterRegistry,
}

impl Worker {
    fn reload_adapter(&mut self, name: &str) {
        let reloaded = LoraAdapter::load(&self.registry.path_of(name))
            .map_err(|e| e.to_string())
            .and_then(|adapter| self.assistant.reload_adapter(name, &adapter).map_err(|e| e.to_string()));
        match reloaded {
            Ok(true) => tracing::info!(adapter = name, "attached the merged version"),
            Ok(false) => {}
            // The old version stays attached; the next start loads the new one.
            Err(error) => tracing::warn!(adapter = name, %error, "cannot attach the merged version"),
        }
    }

    fn serve(&mut self, job: Job) {
        let Job { request, reply, cancel } = job;
        let send = |event: Event| {
            // A front end that went away no longer wants the events; the work itself
            // still completes, so that memory stays consistent.
            let _ = reply.send(event);
        };
        if cancel.is_cancelled() {
            send(Event::Error { message: "cancelled before it started".into() });
        } else {
            let kind = request.kind();
            // A bug reached by one request must not end the worker that every front end
            // (and every daemon client) shares: it becomes that request's error. The
            // stores write whole records or nothing, so memory stays consistent.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.handle(request, &send, &cancel)));
            let failure = match outcome {
                Ok(Ok(())) => None,
                Ok(Err(message)) => Some(message),
                Err(payload) => {
                    let what = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    tracing::error!(request = kind, panic = %what, "a request failed inside the worker");
                    Some(format!("internal error while serving a {kind} request: {what}"))
                }
            };
            if let Some(message) = failure {
                send(Event::Error { message });
            }
        }
        send(Event::Done);
    }

    fn handle(&mut self, request: Request, send: &dyn Fn(Event), cancel: &CancelToken) -> Result<(), String> {
        let text_error = |error: assistant::AssistantError| error.to_string();
        match request {
            Request::Ask { text, remember, image } => {
                let mut on_text = |piece: &str| {
                    send(Event::Token { text: piece.to_owned() });
                    if cancel.is_cancelled() {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                };
                let attached = image.is_some();
                let (answer, remembered, vision) = match image {
                    // Remembering an image needs its caption, so it happens inside.
                    Some(path) => {
                        let outcome = self.assistant.ask(&text, Some(&path), remember, &mut on_text).map_err(text_error)?;
                        let mode = outcome.image.as_ref().map(|seen| seen.mode);
                        (outcome.answer, outcome.remembered, mode)
                    }
                    None => {
                        let answer = self.assistant.answer(&text, &mut on_text).map_err(text_error)?;
                        let vision = answer.image.as_ref().map(|_| VisionMode::Native);
                        (answer, None, vision)
                    }
                };
                let stats = answer.completion.stats.as_ref();
                let cancelled = cancel.is_cancelled();
                send(Event::Answer {
                    text: answer.text.clone(),
                    memories_used: answer.memories.clone(),
                    completion_tokens: answer.completion.completion_tokens,
                    tokens_per_second: stats.map_or(0.0, |s| s.decode_tokens_per_second()),
                    cancelled,
                    image: answer.image.clone(),
                    vision,
                });
                // A cancelled answer still remembers what the user said: the question was
                // asked, only the answer was cut short.
                let remembered = match (attached, remember) {
                    (false, true) => Some(self.assistant.remember_user_words(&text).map_err(text_error)?),
                    _ => remembered,
                };
                if let Some(report) = remembered {
                    self.announce(&report.changes, send);
                    send(Event::Remembered { report });
                }
            }
            Request::Remember { text, subject } => {
                let applied = self.assistant.add_memory(&text, subject).map_err(text_error)?;
                let change =
                    AppliedChange { seq: applied.seq, id: applied.id, kind: OpKind::Add, text: text.trim().to_owned(), old_text: None };
                self.announce(&[change], send);
            }
            Request::Search { query, top_k } => {
                let hits = self.assistant.search(&query, top_k.unwrap_or(10), MemoryFilter::default()).map_err(text_error)?;
                let hits = hits.iter().map(|hit| Hit { score: hit.score, memory: MemoryRecord::from(&hit.memory) }).collect();
                send(Event::Hits { hits });
            }
            Request::Forget { memory_id: id } => {
                let old = self.assistant.store().get(id).map(|m| m.text).unwrap_or_default();
                let applied = self.assistant.forget_memory(id).map_err(text_error)?;
                self.announce(&[AppliedChange { seq: applied.seq, id, kind: OpKind::Delete, text: old, old_text: None }], send);
            }
            Request::Edit { memory_id: id, text } => {
                let old = self.assistant.store().get(id).map(|m| m.text);
                let applied = self.assistant.edit_memory(id, &text).map_err(text_error)?;
                let change = AppliedChange { seq: applied.seq, id, kind: OpKind::Update, text: text.trim().to_owned(), old_text: old };
                self.announce(&[change], send);
            }
            Request::Undo => match self.assistant.undo().map_err(text_error)? {
                None => send(Event::Error { message: "nothing to undo".into() }),
                Some(undone) => {
                    let changes: Vec<AppliedChange> = undone
                        .applied
                        .iter()
                        .map(|applied| {
                            let text = self.assistant.store().get(applied.id).map(|m| m.text).unwrap_or_else(|| {
                                // A deleted memory: its text is the one the undone batch gave it.
                                undone
                                    .reverted
                                    .iter()
                                    .rev()
                                    .find(|entry| entry.id == applied.id)
                                    .map(|entry| match &entry.change {
                                        Change::Added { text } | Change::Restored { text } => text.clone(),
                                        Change::Updated { new_text, .. } => new_text.clone(),
                                        Change::Deleted { old_text } => old_text.clone(),
                                    })
                                    .unwrap_or_default()
                            });
                            AppliedChange { seq: applied.seq, id: applied.id, kind: applied.kind, text, old_text: None }
                        })
                        .collect();
                    self.announce(&changes, send);
                }
            },
            Request::Memories => {
                let memories = self.assistant.store().list(&MemoryFilter::default()).iter().map(MemoryRecord::from).collect();
                send(Event::Memories { memories });
            }
            Request::Ingest { path, format, conversations, sessions } => {
                let sessions: Option<SessionRange> =
                    sessions.as_deref().map(str::parse).transpose().map_err(|e: transcript::TranscriptError| e.to_string())?;
                let format = format.unwrap_or(if path.extension().is_some_and(|e| e == "json") {
                    TranscriptFormat::Locomo
                } else {
                    TranscriptFormat::Text
                });
                let loaded = match format {
                    TranscriptFormat::Locomo => transcript::load_locomo(&path),
                    TranscriptFormat::Text => {
                        let id = path.file_stem().map_or("transcript".into(), |stem| stem.to_string_lossy().into_owned());
                        transcript::load_text(&path, &id).map(|c| vec![c])
                    }
                }
                .map_err(|e| e.to_string())?;
                let wanted = (!conversations.is_empty()).then_some(conversations.as_slice());
                let selected = transcript::select(loaded, wanted, &path).map_err(|e| e.to_string())?;
                let notices = self.notices.clone();
                let summary = self
                    .assistant
                    .ingest(&selected, sessions.as_ref(), self.assistant.extract_window(), &mut |progress| {
                        if !progress.report.changes.is_empty() {
                            let _ = notices.send(MemoryNotice { changes: progress.report.changes.clone(), memories: 0 });
                            send(Event::Changed { changes: progress.report.changes.clone() });
                        }
                        send(Event::Progress {
                            done: progress.turns_done,
                            total: progress.turns_total,
                            message: format!("{} session {}", progress.conversation, progress.session),
                        });
                        if cancel.is_cancelled() {
                            ControlFlow::Break(())
                        } else {
                            ControlFlow::Continue(())
                        }
                    })
                    .map_err(text_error)?;
                send(Event::Progress { done: summary.turns, total: summary.turns, message: format!("ingested {} turns", summary.turns) });
            }
            Request::Adapters => send(Event::Adapters { bindings: self.bindings() }),
            Request::MergeAdapters(_) => return Err("merges run as adapter jobs, not on the worker".into()),
            Request::Status => send(Event::Status {
                status: Status { model: self.model_name.clone(), memories: self.assistant.store().len(), bindings: self.bindings() },
            }),
        }
        Ok(())
    }

    /// Sends `changes` to the requester and to every subscriber.
    fn announce(&self, changes: &[AppliedChange], send: &dyn Fn(Event)) {
        if changes.is_empty() {
            return;
        }
        let _ = self.notices.send(MemoryNotice { changes: changes.to_vec(), memories: self.assistant.store().len() });
        send(Event::Changed { changes: changes.to_vec() });
    }

    fn bindings(&self) -> Vec<Binding> {
        self.assistant
            .adapters()
            .iter()
            .flat_map(|(operation, slots)| {
                slots.iter().map(move |(adapter, scale)| Binding {
                    operation: operation.to_string(),
                    adapter: adapter.clone(),
                    scale: *scale,
                })
            })
            .collect()
    }
}
