//! The app's state and its one way of changing: [`AppState::update`] takes an [`Input`]
//! (a key, a worker event, a memory notice, a decoded image, a tick) and returns the
//! [`Effect`]s the event loop must carry out (submit a request, cancel one, decode an
//! image, exit). Nothing here blocks or does I/O, so every behaviour is testable by
//! feeding inputs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossterm::event::{KeyEvent, KeyEventKind};
use image::DynamicImage;
use memlora::adapters::{Admission, MergeProgress, MergeStage};
use memlora::memory::{MemoryId, OpKind};
use memlora::vision::VisionMode;
use memlora::worker::{Binding, Event, Hit, MemoryNotice, Request};
use ratatui::layout::{Rect, Size};
use ratatui::style::{Modifier, Style};
use ratatui_image::protocol::Protocol;
use ratatui_textarea::{CursorMove, TextArea, WrapMode};

use super::action::Action;
use super::command::{self, Command};
use super::keymap::{Keymap, Section};
use super::markdown::{self, Para};
use super::view;

pub type RequestId = u64;

/// How long a new / updated / deleted memory stays marked (the next exchange clears the
/// marks sooner).
pub const MARK_FADE: Duration = Duration::from_secs(10);
const HISTORY_LIMIT: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pane {
    Chat,
    Memories,
    Adapters,
    Image,
}

impl Pane {
    pub const ALL: [Pane; 4] = [Pane::Chat, Pane::Memories, Pane::Adapters, Pane::Image];

    pub fn title(self) -> &'static str {
        match self {
            Pane::Chat => "chat",
            Pane::Memories => "memories",
            Pane::Adapters => "adapters",
            Pane::Image => "image",
        }
    }

    fn index(self) -> usize {
        Pane::ALL.iter().position(|p| *p == self).unwrap_or(0)
    }

    fn next(self) -> Pane {
        Pane::ALL[(self.index() + 1) % Pane::ALL.len()]
    }

    fn prev(self) -> Pane {
        Pane::ALL[(self.index() + Pane::ALL.len() - 1) % Pane::ALL.len()]
    }
}

/// What the app shows and knows, apart from the terminal.
pub struct Settings {
    pub model: String,
    pub embedder: String,
    pub keymap: Keymap,
    /// The image protocol in use ("halfblocks", "kitty", …), or None when `ui.images = "off"`.
    pub images: Option<String>,
    /// Where installed adapters live (DATA_DIR/adapters), for the adapters pane.
    pub adapters_dir: PathBuf,
    /// The adapter storage budget (`adapters.max_slots`; 0 = no limit).
    pub adapter_slots: usize,
    /// "daemon pid N" when the requests go to a daemon (shown in the status line).
    pub daemon: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ChatEntry {
    User(String),
    Answer(AnswerEntry),
    Note(String),
    Error(String),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct AnswerEntry {
    pub request: RequestId,
    pub text: String,
    /// Complete: shown as `rendered` (the text as markdown) from now on.
    pub done: bool,
    pub rendered: Vec<Para>,
    pub cancelled: bool,
    pub memories_used: Vec<MemoryId>,
    /// What remembering the user's words changed.
    pub remembered: Vec<(OpKind, MemoryId)>,
    pub error: Option<String>,
}

impl AnswerEntry {
    /// Ends the answer with the text it has.
    fn finish(&mut self) {
        if !self.done {
            self.rendered = markdown::render(&self.text);
            self.done = true;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    New,
    Updated,
    Deleted,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MemoryItem {
    pub id: MemoryId,
    pub text: String,
}

pub struct SearchView {
    pub query: String,
    /// None while the search runs.
    pub hits: Option<Vec<Hit>>,
}

pub enum ImageStatus {
    Loading,
    Decoded(Arc<DynamicImage>),
    Failed(String),
    /// `ui.images = "off"`.
    Off,
}

pub struct ImageView {
    pub path: PathBuf,
    pub generation: u64,
    pub status: ImageStatus,
    /// The encoded image and the cell size it was made for.
    pub encoded: Option<(Size, Protocol)>,
    /// The size an encoding is running for.
    pub encoding: Option<Size>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Job {
    Ask {
        answered: bool,
    },
    Remember,
    Forget(MemoryId),
    Edit(MemoryId),
    Undo,
    Search,
    Ingest {
        path: PathBuf,
        done: usize,
        total: usize,
    },
    Memories,
    Adapters,
    /// A merge job; its progress arrives as it runs.
    Merge {
        into: String,
        progress: Option<MergeProgress>,
    },
}

impl Job {
    /// Whether it changes memory: quitting waits for these.
    pub fn changes_memory(&self) -> bool {
        matches!(self, Job::Ask { .. } | Job::Remember | Job::Forget(_) | Job::Edit(_) | Job::Undo | Job::Ingest { .. })
    }

    pub fn describe(&self) -> String {
        match self {
            Job::Ask { answered: false } => "answering".into(),
            Job::Ask { answered: true } => "remembering what you said".into(),
            Job::Remember => "saving a memory".into(),
            Job::Forget(id) => format!("forgetting #{id}"),
            Job::Edit(id) => format!("saving #{id}"),
            Job::Undo => "undoing the last change".into(),
            Job::Search => "searching".into(),
            Job::Ingest { path, done, total } => {
                let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
                if *total > 0 {
                    format!("ingest {name} {done}/{total}")
                } else {
                    format!("ingest {name}")
                }
            }
            Job::Memories => "loading memories".into(),
            Job::Adapters => "loading adapters".into(),
            Job::Merge { into, progress } => match progress {
                None => format!("merge → {into}"),
                Some(MergeProgress { stage: MergeStage::Loading, done, total }) => format!("merge → {into}: loading {done}/{total}"),
                Some(MergeProgress { stage: MergeStage::Merging, done, total }) => format!("merge → {into}: module {done}/{total}"),
                Some(MergeProgress { stage: MergeStage::Installing, .. }) => format!("merge → {into}: installing"),
            },
        }
    }
}

pub struct Pending {
    pub id: RequestId,
    pub job: Job,
    pub cancelled: bool,
}

/// Everything the state reacts to.
pub enum Input {
    Key(KeyEvent),
    Paste(String),
    Resize(u16, u16),
    Tick(Instant),
    /// An event of request `id`; None when its channel closed.
    Worker {
        id: RequestId,
        event: Option<Event>,
    },
    Notice(MemoryNotice),
    /// Memory notices were missed: reload the list.
    NoticesLagged,
    ImageDecoded {
        generation: u64,
        result: Result<DynamicImage, String>,
    },
    ImageEncoded {
        generation: u64,
        size: Size,
        result: Result<Protocol, String>,
    },
    InstalledAdapters(Result<Vec<String>, String>),
}

/// What the event loop must do.
pub enum Effect {
    Submit {
        id: RequestId,
        request: Request,
    },
    Cancel(RequestId),
    LoadImage {
        generation: u64,
        path: PathBuf,
    },
    EncodeImage {
        generation: u64,
        image: Arc<DynamicImage>,
        size: Size,
    },
    ScanAdapters,
    Exit,
    /// Quit now although memory operations are running; they are listed for stderr.
    ForceExit {
        pending: Vec<String>,
    },
}

impl std::fmt::Debug for Effect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Effect::Submit { id, request } => write!(f, "Submit({id}, {request:?})"),
            Effect::Cancel(id) => write!(f, "Cancel({id})"),
            Effect::LoadImage { generation, path } => write!(f, "LoadImage({generation}, {})", path.display()),
            Effect::EncodeImage { generation, size, .. } => write!(f, "EncodeImage({generation}, {}x{})", size.width, size.height),
            Effect::ScanAdapters => write!(f, "ScanAdapters"),
            Effect::Exit => write!(f, "Exit"),
            Effect::ForceExit { pending } => write!(f, "ForceExit({pending:?})"),
        }
    }
}

pub struct AppState {
    pub settings: Settings,
    pub size: (u16, u16),
    pub now: Instant,
    pub focus: Pane,
    /// Keys go to the input (vim: insert mode).
    pub typing: bool,
    pub input: TextArea<'static>,
    pub history: Vec<String>,
    history_pos: Option<usize>,
    draft: String,
    /// The memory whose text is in the input.
    pub editing: Option<MemoryId>,
    pub chat: Vec<ChatEntry>,
    /// Lines scrolled up from the bottom; 0 follows new text.
    pub chat_scroll: usize,
    /// Newest first; deleted ones stay (marked) until their mark fades.
    pub memories: Vec<MemoryItem>,
    pub memories_loaded: bool,
    pub marks: HashMap<MemoryId, (Mark, Instant)>,
    /// The memories the last answer used.
    pub last_used: Vec<MemoryId>,
    pub selected: usize,
    pub search: Option<SearchView>,
    pub bindings: Option<Vec<Binding>>,
    pub installed: Option<Result<Vec<String>, String>>,
    pub image: Option<ImageView>,
    /// The image the next question is about.
    pub attached: Option<PathBuf>,
    image_generation: u64,
    pub pending: Vec<Pending>,
    next_id: RequestId,
    pub tokens_per_second: Option<f64>,
    /// Quit was asked while memory operations ran; exit when they are done.
    pub quitting: bool,
    /// The help overlay, with its scroll offset.
    pub help: Option<usize>,
    /// A memory waiting for y/n before it is forgotten.
    pub confirm: Option<MemoryItem>,
    /// A one-line message in the status line until the next key.
    pub flash: Option<String>,
    /// Something changed since the last draw.
    pub dirty: bool,
    /// The models are loading (the first screen).
    pub loading: bool,
}

impl AppState {
    pub fn new(settings: Settings, size: (u16, u16), now: Instant) -> Self {
        let typing = true;
        let mut state = AppState {
            settings,
            size,
            now,
            focus: Pane::Chat,
            typing,
            input: TextArea::default(),
            history: Vec::new(),
            history_pos: None,
            draft: String::new(),
            editing: None,
            chat: Vec::new(),
            chat_scroll: 0,
            memories: Vec::new(),
            memories_loaded: false,
            marks: HashMap::new(),
            last_used: Vec::new(),
            selected: 0,
            search: None,
            bindings: None,
            installed: None,
            image: None,
            attached: None,
            image_generation: 0,
            pending: Vec::new(),
            next_id: 1,
            tokens_per_second: None,
            quitting: false,
            help: None,
            confirm: None,
            flash: None,
            dirty: true,
            loading: false,
        };
        state.set_input("");
        state
    }

    /// The requests of a fresh start: the memories and the adapters.
    pub fn start(&mut self) -> Vec<Effect> {
        let mut effects = vec![Effect::ScanAdapters];
        effects.push(self.submit(Job::Memories, Request::Memories));
        effects.push(self.submit(Job::Adapters, Request::Adapters));
        effects
    }

    pub fn update(&mut self, input: Input) -> Vec<Effect> {
        let marks_before = self.marks.len();
        let is_tick = matches!(input, Input::Tick(_));
        let mut effects = match input {
            Input::Key(key) => self.key(key),
            Input::Paste(text) => {
                if self.typing {
                    self.input.insert_str(text.replace("\r\n", "\n").replace('\r', "\n"));
                }
                Vec::new()
            }
            Input::Resize(width, height) => {
                self.size = (width, height);
                Vec::new()
            }
            Input::Tick(now) => {
                self.tick(now);
                Vec::new()
            }
            Input::Worker { id, event } => self.worker_event(id, event),
            Input::Notice(notice) => {
                self.notice(notice);
                Vec::new()
            }
            Input::NoticesLagged => vec![self.submit(Job::Memories, Request::Memories)],
            Input::ImageDecoded { generation, result } => {
                if let Some(view) = self.image.as_mut().filter(|v| v.generation == generation) {
                    view.status = match result {
                        Ok(image) => ImageStatus::Decoded(Arc::new(image)),
                        Err(message) => {
                            // Not an image the model could read either.
                            if self.attached.as_ref() == Some(&view.path) {
                                self.attached = None;
                            }
                            ImageStatus::Failed(message)
                        }
                    };
                }
                Vec::new()
            }
            Input::ImageEncoded { generation, size, result } => {
                if let Some(view) = self.image.as_mut().filter(|v| v.generation == generation && v.encoding == Some(size)) {
                    view.encoding = None;
                    match result {
                        Ok(protocol) => view.encoded = Some((size, protocol)),
                        Err(message) => view.status = ImageStatus::Failed(message),
                    }
                }
                Vec::new()
            }
            Input::InstalledAdapters(list) => {
                self.installed = Some(list);
                Vec::new()
            }
        };
        effects.extend(self.image_effect());
        self.sync_cursor();
        if !is_tick || self.marks.len() != marks_before {
            self.dirty = true;
        }
        effects
    }

    // ---- requests ----

    fn submit(&mut self, job: Job, request: Request) -> Effect {
        let id = self.next_id;
        self.next_id += 1;
        self.pending.push(Pending { id, job, cancelled: false });
        Effect::Submit { id, request }
    }

    /// Whether a request the user waits for is running ("working…").
    pub fn busy(&self) -> bool {
        self.pending.iter().any(|p| p.job.changes_memory() || p.job == Job::Search)
    }

    /// Descriptions of the running memory operations.
    pub fn memory_operations(&self) -> Vec<String> {
        self.pending.iter().filter(|p| p.job.changes_memory()).map(|p| p.job.describe()).collect()
    }

    /// The adapter of the operation running now ("adapter: NAME (generate)"); while
    /// nothing runs, the operations that have an expert bound ("experts: extract,
    /// generate"), or "adapter: base" when none has.
    pub fn active_adapter(&self) -> String {
        let operation = self.pending.iter().find_map(|p| match p.job {
            Job::Ask { answered: false } => Some("generate"),
            Job::Ask { answered: true } | Job::Ingest { .. } => Some("extract"),
            _ => None,
        });
        let Some(operation) = operation else {
            let mut bound: Vec<&str> = self.bindings.iter().flatten().map(|b| b.operation.as_str()).collect();
            bound.dedup();
            return if bound.is_empty() { "adapter: base".into() } else { format!("experts: {}", bound.join(", ")) };
        };
        let names: Vec<String> = self
            .bindings
            .iter()
            .flatten()
            .filter(|b| b.operation == operation)
            .map(|b| if b.scale == 1.0 { b.adapter.clone() } else { format!("{}×{}", b.adapter, b.scale) })
            .collect();
        if names.is_empty() {
            format!("adapter: base ({operation})")
        } else {
            format!("adapter: {} ({operation})", names.join("+"))
        }
    }

    fn answer_mut(&mut self, id: RequestId) -> Option<&mut AnswerEntry> {
        self.chat.iter_mut().rev().find_map(|entry| match entry {
            ChatEntry::Answer(answer) if answer.request == id => Some(answer),
            _ => None,
        })
    }

    fn worker_event(&mut self, id: RequestId, event: Option<Event>) -> Vec<Effect> {
        let Some(index) = self.pending.iter().position(|p| p.id == id) else { return Vec::new() };
        let job = self.pending[index].job.clone();
        let Some(event) = event else {
            // The channel closed without Done: the worker is gone.
            self.chat.push(ChatEntry::Error(format!("{}: the worker stopped", job.describe())));
            return self.finish(index);
        };
        match event {
            Event::Token { text } => {
                if let Some(answer) = self.answer_mut(id) {
                    answer.text.push_str(&text);
                }
            }
            Event::Answer { text, memories_used, completion_tokens, tokens_per_second, cancelled, image, vision } => {
                if let (Some(path), Some(vision)) = (image, vision) {
                    let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
                    let how = match vision {
                        VisionMode::Native => "the vision model looked at",
                        VisionMode::Caption => "answered from the caption of",
                    };
                    self.chat.push(ChatEntry::Note(format!("{how} image {name}")));
                }
                let used: Vec<MemoryId> = memories_used.iter().map(|m| m.id).collect();
                if let Some(answer) = self.answer_mut(id) {
                    answer.rendered = markdown::render(&text);
                    answer.text = text;
                    answer.done = true;
                    answer.cancelled = cancelled;
                    answer.memories_used = used.clone();
                }
                self.last_used = used;
                if completion_tokens > 0 && tokens_per_second > 0.0 {
                    self.tokens_per_second = Some(tokens_per_second);
                }
                self.pending[index].job = Job::Ask { answered: true };
            }
            Event::Remembered { report } => {
                if let Some(answer) = self.answer_mut(id) {
                    answer.remembered = report.changes.iter().map(|c| (c.kind, c.id)).collect();
                }
            }
            Event::Changed { changes } => {
                for change in changes {
                    let note = match (&job, change.kind) {
                        (Job::Remember, _) => format!("remembered #{}: {}", change.id, change.text),
                        (Job::Forget(_), _) => format!("forgot #{}: {}", change.id, change.text),
                        (Job::Edit(_), _) => format!("saved #{}: {}", change.id, change.text),
                        (Job::Undo, kind) => format!("undone: {} #{}: {}", kind_word(kind), change.id, change.text),
                        _ => continue,
                    };
                    self.chat.push(ChatEntry::Note(note));
                }
            }
            Event::Memories { memories } => {
                let mut items: Vec<MemoryItem> =
                    memories.into_iter().filter_map(|m| m.id.map(|id| MemoryItem { id, text: m.text })).collect();
                // Deleted memories still marked stay visible until their mark fades.
                for (id, (mark, _)) in &self.marks {
                    if *mark == Mark::Deleted && !items.iter().any(|m| m.id == *id) {
                        if let Some(old) = self.memories.iter().find(|m| m.id == *id) {
                            items.push(old.clone());
                        }
                    }
                }
                items.sort_by_key(|m| std::cmp::Reverse(m.id));
                self.memories = items;
                self.memories_loaded = true;
                self.clamp_selection();
            }
            Event::Hits { hits } => {
                if let Some(search) = self.search.as_mut() {
                    search.hits = Some(hits);
                    self.selected = 0;
                }
            }
            Event::Progress { done, total, .. } => {
                if let Job::Ingest { path, .. } = &job {
                    self.pending[index].job = Job::Ingest { path: path.clone(), done, total };
                }
            }
            Event::Adapters { bindings } => self.bindings = Some(bindings),
            Event::MergeProgress { progress } => {
                if let Job::Merge { into, .. } = job {
                    self.pending[index].job = Job::Merge { into, progress: Some(progress) };
                }
            }
            Event::Merged { outcome } => {
                let placed = match &outcome.admission {
                    Admission::Installed { adapter } => format!("installed '{}'", adapter.name),
                    Admission::Merged { into, members, .. } => {
                        format!("the adapter budget is full: merged into '{into}', which now stands for {}", members.join(", "))
                    }
                };
                self.chat.push(ChatEntry::Note(format!(
                    "merge done ({}; re-factorisation error {:.2} %): {placed}",
                    outcome.recipe,
                    100.0 * outcome.reconstruction_error
                )));
                return vec![Effect::ScanAdapters, self.submit(Job::Adapters, Request::Adapters)];
            }
            Event::Status { .. } => {}
            Event::Error { message } => match job {
                Job::Ask { answered } => {
                    let answer_done = self.answer_mut(id).is_none_or(|a| a.done);
                    if !answered && !answer_done {
                        if let Some(answer) = self.answer_mut(id) {
                            answer.finish();
                            if message == "cancelled before it started" {
                                answer.cancelled = true;
                            } else {
                                answer.error = Some(message);
                            }
                        }
                    } else {
                        self.chat.push(ChatEntry::Error(format!("remembering failed: {message}")));
                    }
                }
                other => self.chat.push(ChatEntry::Error(format!("{}: {message}", other.describe()))),
            },
            Event::Done => return self.finish(index),
        }
        Vec::new()
    }

    /// Request `index` is over.
    fn finish(&mut self, index: usize) -> Vec<Effect> {
        let pending = self.pending.remove(index);
        match &pending.job {
            Job::Ask { .. } => {
                if let Some(answer) = self.answer_mut(pending.id) {
                    answer.finish();
                }
            }
            Job::Ingest { path, done, total } => {
                let how = if pending.cancelled { "stopped" } else { "finished" };
                self.chat.push(ChatEntry::Note(format!("ingest of {} {how}: {done}/{total} turns", path.display())));
            }
            _ => {}
        }
        if self.quitting && self.memory_operations().is_empty() {
            return vec![Effect::Exit];
        }
        Vec::new()
    }

    // ---- memory notices ----

    fn notice(&mut self, notice: MemoryNotice) {
        for change in notice.changes {
            match change.kind {
                OpKind::Add | OpKind::Restore | OpKind::Update => {
                    let mark = if change.kind == OpKind::Update { Mark::Updated } else { Mark::New };
                    match self.memories.iter_mut().find(|m| m.id == change.id) {
                        Some(item) => item.text = change.text.clone(),
                        None => {
                            let at = self.memories.iter().position(|m| m.id < change.id).unwrap_or(self.memories.len());
                            self.memories.insert(at, MemoryItem { id: change.id, text: change.text.clone() });
                        }
                    }
                    if let Some(hit) = self
                        .search
                        .as_mut()
                        .and_then(|s| s.hits.as_mut())
                        .and_then(|h| h.iter_mut().find(|h| h.memory.id == Some(change.id)))
                    {
                        hit.memory.text = change.text.clone();
                    }
                    self.marks.insert(change.id, (mark, self.now));
                }
                OpKind::Delete => {
                    if self.memories.iter().any(|m| m.id == change.id) {
                        self.marks.insert(change.id, (Mark::Deleted, self.now));
                    }
                }
            }
        }
        self.clamp_selection();
    }

    /// Live memories (not the deleted ones still shown).
    pub fn memory_count(&self) -> usize {
        self.memories.iter().filter(|m| !matches!(self.marks.get(&m.id), Some((Mark::Deleted, _)))).count()
    }

    fn tick(&mut self, now: Instant) {
        self.now = now;
        let expired: Vec<(MemoryId, Mark)> = self
            .marks
            .iter()
            .filter(|(_, (_, since))| now.duration_since(*since) >= MARK_FADE)
            .map(|(id, (mark, _))| (*id, *mark))
            .collect();
        self.expire(expired);
    }

    /// The next exchange starts: marks go, deleted memories leave the list.
    fn clear_marks(&mut self) {
        let all: Vec<(MemoryId, Mark)> = self.marks.iter().map(|(id, (mark, _))| (*id, *mark)).collect();
        self.expire(all);
    }

    fn expire(&mut self, marks: Vec<(MemoryId, Mark)>) {
        if marks.is_empty() {
            return;
        }
        for (id, mark) in marks {
            self.marks.remove(&id);
            if mark == Mark::Deleted {
                self.memories.retain(|m| m.id != id);
                if let Some(hits) = self.search.as_mut().and_then(|s| s.hits.as_mut()) {
                    hits.retain(|h| h.memory.id != Some(id));
                }
            }
        }
        self.clamp_selection();
    }

    // ---- keys ----

    fn key(&mut self, key: KeyEvent) -> Vec<Effect> {
        if key.kind == KeyEventKind::Release {
            return Vec::new();
        }
        self.flash = None;
        let keymap = &self.settings.keymap;
        let global = keymap.lookup(Section::Global, &key);
        let browse = keymap.lookup(Section::Browse, &key);
        let input = keymap.lookup(Section::Input, &key);
        if let Some(scroll) = self.help {
            let action = global.or(browse);
            let closes = matches!(action, Some(Action::Help | Action::Cancel | Action::Quit | Action::Interrupt))
                || matches!(key.code, crossterm::event::KeyCode::Esc | crossterm::event::KeyCode::Char('q'));
            if closes {
                self.help = None;
            } else {
                self.help = Some(match action {
                    Some(Action::MoveUp) => scroll.saturating_sub(1),
                    Some(Action::MoveDown) => scroll + 1,
                    Some(Action::PageUp) => scroll.saturating_sub(10),
                    Some(Action::PageDown) => scroll + 10,
                    Some(Action::Top) => 0,
                    _ => scroll,
                });
            }
            return Vec::new();
        }
        if let Some(item) = self.confirm.clone() {
            use crossterm::event::KeyCode;
            return match key.code {
                KeyCode::Char('y' | 'Y') | KeyCode::Enter => {
                    self.confirm = None;
                    vec![self.submit(Job::Forget(item.id), Request::Forget { memory_id: item.id })]
                }
                KeyCode::Char('n' | 'N') | KeyCode::Esc => {
                    self.confirm = None;
                    Vec::new()
                }
                _ if global == Some(Action::Interrupt) => {
                    self.confirm = None;
                    Vec::new()
                }
                _ => Vec::new(),
            };
        }
        if let Some(action) = global {
            return self.action(action);
        }
        if self.typing {
            if let Some(action) = input {
                return self.action(action);
            }
            self.input.input(key);
            Vec::new()
        } else {
            browse.map(|action| self.action(action)).unwrap_or_default()
        }
    }

    pub fn action(&mut self, action: Action) -> Vec<Effect> {
        match action {
            Action::Submit => return self.submit_input(),
            Action::Newline => {
                if self.typing {
                    self.input.insert_newline();
                }
            }
            Action::HistoryPrev => self.history_prev(),
            Action::HistoryNext => self.history_next(),
            Action::Cancel => return self.cancel(),
            Action::Interrupt => return self.interrupt(),
            Action::Quit => return self.quit(),
            Action::Help => self.help = Some(0),
            Action::NextPane => self.set_focus(self.focus.next()),
            Action::PrevPane => self.set_focus(self.focus.prev()),
            Action::FocusChat => self.set_focus(Pane::Chat),
            Action::FocusMemories => self.set_focus(Pane::Memories),
            Action::FocusAdapters => self.set_focus(Pane::Adapters),
            Action::FocusImage => self.set_focus(Pane::Image),
            Action::MoveUp => self.move_by(-1),
            Action::MoveDown => self.move_by(1),
            Action::PageUp => self.move_by(-(self.page() as isize)),
            Action::PageDown => self.move_by(self.page() as isize),
            Action::Top => self.move_by(isize::MIN / 2),
            Action::Bottom => self.move_by(isize::MAX / 2),
            Action::Search => {
                self.editing = None;
                self.set_input("/search ");
                self.typing = true;
            }
            Action::EditMemory => match self.selected_memory() {
                Some(item) => {
                    self.editing = Some(item.id);
                    self.set_input(&item.text);
                    self.typing = true;
                }
                None => self.flash = Some(self.select_hint()),
            },
            Action::ForgetMemory => match self.selected_memory() {
                Some(item) => self.confirm = Some(item),
                None => self.flash = Some(self.select_hint()),
            },
            Action::InsertMode => {
                if !self.settings.keymap.modal {
                    self.focus = Pane::Chat;
                }
                self.typing = true;
            }
            Action::NormalMode => self.typing = false,
            Action::Command => {
                if self.input.is_empty() {
                    self.set_input("/");
                }
                self.typing = true;
            }
        }
        Vec::new()
    }

    fn select_hint(&self) -> String {
        let key = self.settings.keymap.hint(Action::FocusMemories).unwrap_or_else(|| "tab".into());
        if self.focus == Pane::Memories {
            "no memory selected".into()
        } else {
            format!("select a memory in the memories pane first ({key})")
        }
    }

    fn set_focus(&mut self, pane: Pane) {
        self.focus = pane;
        if !self.settings.keymap.modal {
            self.typing = pane == Pane::Chat;
        }
    }

    /// Rows a page moves.
    fn page(&self) -> usize {
        let areas = view::layout(self.area(), self);
        let rows = match self.focus {
            Pane::Memories => areas.memories.map_or(10, |r| r.height),
            _ => areas.chat.map_or(10, |r| r.height),
        };
        usize::from(rows.saturating_sub(3)).max(1)
    }

    fn move_by(&mut self, delta: isize) {
        let target = if self.focus == Pane::Chat || (self.typing && self.focus != Pane::Memories) { Pane::Chat } else { self.focus };
        match target {
            Pane::Memories => {
                let count = self.visible_memories().len();
                if count > 0 {
                    self.selected = (self.selected as isize).saturating_add(delta).clamp(0, count as isize - 1) as usize;
                }
            }
            Pane::Chat => {
                // Up scrolls back: the offset counts from the bottom.
                let max = self.chat_max_scroll();
                self.chat_scroll = (self.chat_scroll as isize).saturating_sub(delta).clamp(0, max as isize) as usize;
            }
            Pane::Adapters | Pane::Image => {}
        }
    }

    fn chat_max_scroll(&self) -> usize {
        let areas = view::layout(self.area(), self);
        let Some(chat) = areas.chat else { return 0 };
        let inner = view::chat_text_area(chat);
        view::chat_lines(self, inner.width).len().saturating_sub(usize::from(inner.height))
    }

    pub fn area(&self) -> Rect {
        Rect::new(0, 0, self.size.0, self.size.1)
    }

    /// The memories the pane lists: search hits while a search is shown.
    pub fn visible_memories(&self) -> Vec<(MemoryItem, Option<f64>)> {
        match &self.search {
            Some(SearchView { hits: Some(hits), .. }) => {
                hits.iter().filter_map(|h| h.memory.id.map(|id| (MemoryItem { id, text: h.memory.text.clone() }, Some(h.score)))).collect()
            }
            Some(SearchView { hits: None, .. }) => Vec::new(),
            None => self.memories.iter().map(|m| (m.clone(), None)).collect(),
        }
    }

    fn selected_memory(&self) -> Option<MemoryItem> {
        if self.focus != Pane::Memories {
            return None;
        }
        self.visible_memories().into_iter().nth(self.selected).map(|(m, _)| m)
    }

    fn clamp_selection(&mut self) {
        let count = self.visible_memories().len();
        self.selected = self.selected.min(count.saturating_sub(1));
    }

    // ---- input ----

    fn set_input(&mut self, text: &str) {
        let lines: Vec<String> = text.split('\n').map(str::to_owned).collect();
        let mut area = TextArea::new(lines);
        area.set_cursor_line_style(Style::default());
        area.set_wrap_mode(WrapMode::WordOrGlyph);
        area.move_cursor(CursorMove::Bottom);
        area.move_cursor(CursorMove::End);
        self.input = area;
        self.sync_cursor();
    }

    fn sync_cursor(&mut self) {
        let style = if self.typing { Style::default().add_modifier(Modifier::REVERSED) } else { Style::default() };
        if self.input.cursor_style() != style {
            self.input.set_cursor_style(style);
        }
    }

    pub fn input_text(&self) -> String {
        self.input.lines().join("\n")
    }

    fn history_prev(&mut self) {
        let on_first_line = self.input.is_empty() || self.input.cursor().0 == 0;
        if !on_first_line || self.history.is_empty() {
            self.input.move_cursor(CursorMove::Up);
            return;
        }
        let pos = match self.history_pos {
            None => {
                self.draft = self.input_text();
                self.history.len() - 1
            }
            Some(pos) => pos.saturating_sub(1),
        };
        self.history_pos = Some(pos);
        let text = self.history[pos].clone();
        self.set_input(&text);
    }

    fn history_next(&mut self) {
        let on_last_line = self.input.cursor().0 + 1 >= self.input.lines().len();
        let Some(pos) = self.history_pos.filter(|_| on_last_line) else {
            self.input.move_cursor(CursorMove::Down);
            return;
        };
        if pos + 1 < self.history.len() {
            self.history_pos = Some(pos + 1);
            let text = self.history[pos + 1].clone();
            self.set_input(&text);
        } else {
            self.history_pos = None;
            let draft = std::mem::take(&mut self.draft);
            self.set_input(&draft);
        }
    }

    fn remember_input(&mut self, text: &str) {
        if self.history.last().map(String::as_str) != Some(text) {
            self.history.push(text.to_owned());
            if self.history.len() > HISTORY_LIMIT {
                self.history.remove(0);
            }
        }
        self.history_pos = None;
        self.draft.clear();
    }

    fn submit_input(&mut self) -> Vec<Effect> {
        let text = self.input_text();
        let trimmed = text.trim().to_owned();
        if trimmed.is_empty() {
            return Vec::new();
        }
        self.remember_input(&trimmed);
        self.set_input("");
        // Typing from a pane (an edit, a search, a command) ends there: its keys browse again.
        if !self.settings.keymap.modal && self.focus != Pane::Chat {
            self.typing = false;
        }
        if let Some(id) = self.editing.take() {
            return vec![self.submit(Job::Edit(id), Request::Edit { memory_id: id, text: trimmed })];
        }
        if trimmed.starts_with('/') {
            return match command::parse(&trimmed) {
                Ok(command) => self.run_command(command),
                Err(message) => {
                    self.chat.push(ChatEntry::Error(message));
                    self.chat_scroll = 0;
                    Vec::new()
                }
            };
        }
        self.ask(trimmed)
    }

    fn ask(&mut self, text: String) -> Vec<Effect> {
        self.clear_marks();
        self.chat_scroll = 0;
        // An attached image goes with the next question, once.
        let image = self.attached.take();
        let effect = self.submit(Job::Ask { answered: false }, Request::Ask { text: text.clone(), remember: true, image });
        let Effect::Submit { id, .. } = &effect else { unreachable!() };
        let id = *id;
        self.chat.push(ChatEntry::User(text));
        self.chat.push(ChatEntry::Answer(AnswerEntry { request: id, ..AnswerEntry::default() }));
        vec![effect]
    }

    fn run_command(&mut self, command: Command) -> Vec<Effect> {
        self.chat_scroll = 0;
        match command {
            Command::Image(path) => {
                self.image_generation += 1;
                let generation = self.image_generation;
                let name = path.display().to_string();
                let enabled = self.settings.images.is_some();
                let status = if enabled { ImageStatus::Loading } else { ImageStatus::Off };
                self.image = Some(ImageView { path: path.clone(), generation, status, encoded: None, encoding: None });
                self.attached = Some(path.clone());
                self.chat.push(ChatEntry::Note(format!("image attached: {name} (your next message asks about it)")));
                if enabled {
                    return vec![Effect::LoadImage { generation, path }];
                }
            }
            Command::Remember(text) => return vec![self.submit(Job::Remember, Request::Remember { text, subject: None })],
            Command::Forget(id) => return vec![self.submit(Job::Forget(id), Request::Forget { memory_id: id })],
            Command::Search(query) => {
                self.search = Some(SearchView { query: query.clone(), hits: None });
                self.selected = 0;
                if !view::is_wide(self.area()) {
                    self.focus = Pane::Memories;
                    self.typing = false;
                }
                return vec![self.submit(Job::Search, Request::Search { query, top_k: None })];
            }
            Command::Undo => return vec![self.submit(Job::Undo, Request::Undo)],
            Command::Ingest(path) => {
                self.chat.push(ChatEntry::Note(format!("ingesting {} (progress in the status line)", path.display())));
                let request = Request::Ingest { path: path.clone(), format: None, conversations: Vec::new(), sessions: None };
                return vec![self.submit(Job::Ingest { path, done: 0, total: 0 }, request)];
            }
            Command::Merge(spec) => {
                self.chat.push(ChatEntry::Note(format!(
                    "merging {} into '{}' ({}; progress in the adapters pane)",
                    spec.adapters.join(" + "),
                    spec.into,
                    spec.method.recipe(spec.rank)
                )));
                let job = Job::Merge { into: spec.into.clone(), progress: None };
                return vec![self.submit(job, Request::MergeAdapters(spec))];
            }
            Command::Adapters => {
                self.set_focus(Pane::Adapters);
                return vec![Effect::ScanAdapters, self.submit(Job::Adapters, Request::Adapters)];
            }
            Command::Model => {
                let images = self.settings.images.as_deref().unwrap_or("off");
                self.chat.push(ChatEntry::Note(format!(
                    "model: {} · embedder: {} · image previews: {images}",
                    self.settings.model, self.settings.embedder
                )));
            }
            Command::Clear => self.chat.retain(|e| matches!(e, ChatEntry::Answer(a) if !a.done)),
            Command::Help => self.help = Some(0),
            Command::Quit => return self.quit(),
        }
        Vec::new()
    }

    // ---- cancel and quit ----

    /// Stops running answers and ingests (an ingest stops after its current exchange).
    fn stop_running(&mut self) -> Vec<Effect> {
        let mut effects = Vec::new();
        for pending in &mut self.pending {
            let stoppable = matches!(pending.job, Job::Ask { answered: false } | Job::Ingest { .. } | Job::Merge { .. });
            if stoppable && !pending.cancelled {
                pending.cancelled = true;
                effects.push(Effect::Cancel(pending.id));
            }
        }
        effects
    }

    fn cancel(&mut self) -> Vec<Effect> {
        let stopped = self.stop_running();
        if !stopped.is_empty() {
            self.flash = Some("stopping…".into());
            return stopped;
        }
        if self.editing.take().is_some() {
            self.set_input("");
            if !self.settings.keymap.modal {
                self.typing = self.focus == Pane::Chat;
            }
        } else if self.search.take().is_some() {
            self.selected = 0;
        } else if !self.settings.keymap.modal && self.focus != Pane::Chat {
            self.set_focus(Pane::Chat);
        }
        Vec::new()
    }

    fn interrupt(&mut self) -> Vec<Effect> {
        if self.quitting {
            return self.force_quit();
        }
        let stopped = self.stop_running();
        if !stopped.is_empty() {
            self.flash = Some("stopping…".into());
            return stopped;
        }
        self.quit()
    }

    fn quit(&mut self) -> Vec<Effect> {
        if self.quitting {
            return self.force_quit();
        }
        if self.memory_operations().is_empty() {
            // A merge in flight is cancelled: it installs nothing then.
            let mut effects = self.stop_running();
            effects.push(Effect::Exit);
            return effects;
        }
        self.quitting = true;
        self.help = None;
        self.confirm = None;
        self.stop_running()
    }

    fn force_quit(&self) -> Vec<Effect> {
        vec![Effect::ForceExit { pending: self.memory_operations() }]
    }

    // ---- images ----

    /// Asks for the attached image to be encoded for the size its pane has now.
    fn image_effect(&mut self) -> Option<Effect> {
        let canvas = view::image_canvas(self.area(), self)?;
        let size = Size::new(canvas.width, canvas.height);
        let view = self.image.as_mut()?;
        let ImageStatus::Decoded(image) = &view.status else { return None };
        if view.encoded.as_ref().is_some_and(|(s, _)| *s == size) || view.encoding == Some(size) {
            return None;
        }
        view.encoding = Some(size);
        Some(Effect::EncodeImage { generation: view.generation, image: image.clone(), size })
    }
}

fn kind_word(kind: OpKind) -> &'static str {
    match kind {
        OpKind::Add => "added",
        OpKind::Update => "changed back",
        OpKind::Delete => "removed",
        OpKind::Restore => "restored",
    }
}
