//! The interactive app (`memlora` with no command): a ratatui front end on the worker.
//!
//! One tokio task runs the loop: terminal events (crossterm's `EventStream`), the events
//! of each submitted request, memory notices broadcast by the worker, results of image
//! decoding (on the blocking pool) and a render tick. Each input goes through
//! [`state::AppState::update`], which returns effects the loop carries out; the screen is
//! redrawn on the tick when something changed, never per token. The UI thread never
//! touches a model.
//!
//! Modules: `action` (what keys do), `keymap` (keys → actions, from config/keymap-*.toml),
//! `command` (slash commands), `state` (state and update), `view` (drawing, pure),
//! `markdown` (answers as styled text), `image` (protocol choice, decoding).

pub mod action;
pub mod command;
pub mod image;
pub mod keymap;
pub mod markdown;
pub mod state;
pub mod view;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io::{self, Stdout, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossterm::event::{
    DisableBracketedPaste, EnableBracketedPaste, Event as TermEvent, EventStream, KeyboardEnhancementFlags, PopKeyboardEnhancementFlags,
    PushKeyboardEnhancementFlags,
};
use crossterm::terminal::{disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen};
use futures_util::StreamExt;
use memlora::adapters::AdapterRegistry;
use memlora::worker::{CancelToken, Event, WorkerHandle};
use ratatui::backend::CrosstermBackend;
use ratatui::Terminal;
use tokio::sync::{broadcast, mpsc};

use self::image::ImagesSetting;
use self::keymap::Keymap;
use self::state::{AppState, Effect, Input, RequestId, Settings};

/// The redraw interval.
const FRAME: Duration = Duration::from_millis(33);

pub struct Options {
    pub model: String,
    pub embedder: String,
    pub keymap: Keymap,
    pub images: ImagesSetting,
    pub adapters_dir: PathBuf,
    /// The adapter storage budget (`adapters.max_slots`; 0 = no limit).
    pub adapter_slots: usize,
    /// Where stray output to stderr goes while the app owns the screen.
    pub logs_dir: PathBuf,
    /// "daemon pid N" when the app runs on a daemon's worker.
    pub daemon: Option<String>,
}

/// How the app ended.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// Nothing that changes memory was running.
    Quit,
    /// Quit twice while these memory operations ran.
    Forced { pending: Vec<String> },
}

/// Runs the app on this terminal until the user quits. `start` loads the models and
/// starts the worker; it runs once the screen is set up (so terminal queries come before
/// anything the user types) and its error ends the app after the terminal is restored.
/// The worker is released on return.
pub fn run(options: Options, start: impl FnOnce() -> anyhow::Result<WorkerHandle>) -> anyhow::Result<Outcome> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let _stderr = StderrRedirect::to(&options.logs_dir.join("stderr.log"));
    let mut screen = Screen::enter()?;
    let picker = image::picker(options.images);
    let settings = Settings {
        model: options.model,
        embedder: options.embedder,
        keymap: options.keymap,
        images: picker.as_ref().map(image::protocol_name),
        adapters_dir: options.adapters_dir,
        adapter_slots: options.adapter_slots,
        daemon: options.daemon,
    };
    let size = screen.terminal.size()?;
    let mut state = AppState::new(settings, (size.width, size.height), Instant::now());
    state.loading = true;
    screen.terminal.draw(|frame| view::draw(frame, &state))?;
    let handle = start()?;
    state.loading = false;
    let outcome = runtime.block_on(event_loop(&mut screen.terminal, handle, state, picker));
    drop(screen);
    // Image work left on the blocking pool is not waited for.
    runtime.shutdown_background();
    outcome
}

async fn event_loop(
    terminal: &mut Terminal<CrosstermBackend<Stdout>>,
    handle: WorkerHandle,
    mut state: AppState,
    picker: Option<ratatui_image::picker::Picker>,
) -> anyhow::Result<Outcome> {
    let mut notices = handle.subscribe();
    let mut notices_open = true;
    let (worker_tx, mut worker_rx) = mpsc::unbounded_channel::<(RequestId, Option<Event>)>();
    let (local_tx, mut local_rx) = mpsc::unbounded_channel::<Input>();
    let mut cancels: HashMap<RequestId, CancelToken> = HashMap::new();
    let mut terminal_events = EventStream::new();
    let mut frames = tokio::time::interval(FRAME);
    frames.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut effects = state.start();
    loop {
        for effect in effects.drain(..) {
            match effect {
                Effect::Submit { id, request } => {
                    let submission = handle.submit(request);
                    cancels.insert(id, submission.cancel.clone());
                    tokio::spawn(forward(id, submission.events, worker_tx.clone()));
                }
                Effect::Cancel(id) => {
                    if let Some(token) = cancels.get(&id) {
                        token.cancel();
                    }
                }
                Effect::LoadImage { generation, path } => {
                    let tx = local_tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let result = std::panic::catch_unwind(|| image::decode(&path))
                            .unwrap_or_else(|_| Err(format!("{}: the decoder failed", path.display())));
                        let _ = tx.send(Input::ImageDecoded { generation, result });
                    });
                }
                Effect::EncodeImage { generation, image, size } => {
                    if let Some(picker) = picker.clone() {
                        let tx = local_tx.clone();
                        tokio::task::spawn_blocking(move || {
                            let result =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| image::encode(&picker, (*image).clone(), size)))
                                    .unwrap_or_else(|_| Err("the image encoder failed".into()));
                            let _ = tx.send(Input::ImageEncoded { generation, size, result });
                        });
                    }
                }
                Effect::ScanAdapters => {
                    let tx = local_tx.clone();
                    let dir = state.settings.adapters_dir.clone();
                    tokio::task::spawn_blocking(move || {
                        let _ = tx.send(Input::InstalledAdapters(installed_adapters(&dir)));
                    });
                }
                Effect::Exit => return Ok(Outcome::Quit),
                Effect::ForceExit { pending } => return Ok(Outcome::Forced { pending }),
            }
        }
        let input = tokio::select! {
            _ = frames.tick() => {
                if state.dirty {
                    terminal.draw(|frame| view::draw(frame, &state))?;
                    state.dirty = false;
                }
                Input::Tick(Instant::now())
            }
            event = terminal_events.next() => match event {
                Some(Ok(TermEvent::Key(key))) => Input::Key(key),
                Some(Ok(TermEvent::Paste(text))) => Input::Paste(text),
                Some(Ok(TermEvent::Resize(width, height))) => Input::Resize(width, height),
                Some(Ok(_)) => continue,
                Some(Err(error)) => return Err(anyhow::Error::new(error).context("reading the terminal")),
                // The terminal went away.
                None => return Ok(Outcome::Quit),
            },
            Some((id, event)) = worker_rx.recv() => {
                if matches!(event, None | Some(Event::Done)) {
                    cancels.remove(&id);
                }
                Input::Worker { id, event }
            }
            notice = notices.recv(), if notices_open => match notice {
                Ok(notice) => Input::Notice(notice),
                Err(broadcast::error::RecvError::Lagged(_)) => Input::NoticesLagged,
                Err(broadcast::error::RecvError::Closed) => {
                    notices_open = false;
                    continue;
                }
            },
            Some(input) = local_rx.recv() => input,
        };
        effects = state.update(input);
    }
}

/// Passes a request's events to the loop, tagged with its id; None when the channel
/// closed before Done.
async fn forward(id: RequestId, mut events: mpsc::UnboundedReceiver<Event>, tx: mpsc::UnboundedSender<(RequestId, Option<Event>)>) {
    while let Some(event) = events.recv().await {
        let done = event == Event::Done;
        let _ = tx.send((id, Some(event)));
        if done {
            return;
        }
    }
    let _ = tx.send((id, None));
}

/// The adapters installed in the profile, each with what it was merged from.
fn installed_adapters(dir: &Path) -> Result<Vec<String>, String> {
    let data_dir = dir.parent().unwrap_or(dir);
    let adapters = AdapterRegistry::open(data_dir).and_then(|registry| registry.list()).map_err(|error| error.to_string())?;
    Ok(adapters
        .into_iter()
        .map(|a| if a.info.merged_from.is_empty() { a.name } else { format!("{} (merged: {})", a.name, a.info.merged_from.join(", ")) })
        .collect())
}

// ---- the terminal ----

/// The terminal in raw mode on the alternate screen, restored on drop and on a panic of
/// the UI thread (before the panic message is printed).
struct Screen {
    terminal: Terminal<CrosstermBackend<Stdout>>,
}

type PanicHook = Box<dyn Fn(&std::panic::PanicHookInfo<'_>) + Sync + Send + 'static>;

static KEYBOARD_FLAGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Screen {
    fn enter() -> anyhow::Result<Screen> {
        let previous: Arc<PanicHook> = Arc::new(std::panic::take_hook());
        let ui_thread = std::thread::current().id();
        let hook_previous = previous.clone();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().id() == ui_thread {
                restore_terminal();
                restore_stderr();
                hook_previous(info);
            } else {
                // Another thread (the worker, an image decoder): the screen stays ours; the
                // loop sees the failure through that thread's channel.
                tracing::error!("panic in thread {:?}: {info}", std::thread::current().name());
            }
        }));
        PREVIOUS_HOOK.with(|slot| *slot.borrow_mut() = Some(previous));
        Self::setup().inspect_err(|_| {
            restore_terminal();
            restore_panic_hook();
        })
    }

    fn setup() -> anyhow::Result<Screen> {
        enable_raw_mode()?;
        let mut stdout = io::stdout();
        crossterm::execute!(stdout, EnterAlternateScreen, EnableBracketedPaste)?;
        // Terminals with the kitty keyboard protocol report Shift+Enter apart from Enter.
        // Not asked under tmux, where a query's answer can be lost.
        let tmux = std::env::var_os("TMUX").is_some_and(|v| !v.is_empty());
        if !tmux && matches!(crossterm::terminal::supports_keyboard_enhancement(), Ok(true)) {
            crossterm::execute!(stdout, PushKeyboardEnhancementFlags(KeyboardEnhancementFlags::DISAMBIGUATE_ESCAPE_CODES))?;
            KEYBOARD_FLAGS.store(true, Ordering::Relaxed);
        }
        let mut terminal = Terminal::new(CrosstermBackend::new(stdout))?;
        terminal.clear()?;
        terminal.hide_cursor()?;
        Ok(Screen { terminal })
    }
}

thread_local! {
    static PREVIOUS_HOOK: std::cell::RefCell<Option<Arc<PanicHook>>> = const { std::cell::RefCell::new(None) };
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore_terminal();
        restore_panic_hook();
    }
}

fn restore_panic_hook() {
    if let Some(previous) = PREVIOUS_HOOK.with(|slot| slot.borrow_mut().take()) {
        let _ = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| previous(info)));
    }
}

fn restore_terminal() {
    let mut stdout = io::stdout();
    if KEYBOARD_FLAGS.swap(false, Ordering::Relaxed) {
        let _ = crossterm::execute!(stdout, PopKeyboardEnhancementFlags);
    }
    let _ = crossterm::execute!(stdout, DisableBracketedPaste, LeaveAlternateScreen, crossterm::cursor::Show);
    let _ = disable_raw_mode();
    let _ = stdout.flush();
}

/// Our stderr while the app runs: anything a library prints there goes to a log file
/// instead of over the screen.
static SAVED_STDERR: AtomicI32 = AtomicI32::new(-1);

struct StderrRedirect;

impl StderrRedirect {
    fn to(path: &Path) -> Option<StderrRedirect> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path).ok()?;
        // SAFETY: plain descriptor calls on descriptors we own; 2 is replaced, not closed.
        let saved = unsafe { libc::dup(2) };
        if saved < 0 {
            return None;
        }
        if unsafe { libc::dup2(file.as_raw_fd(), 2) } < 0 {
            unsafe { libc::close(saved) };
            return None;
        }
        SAVED_STDERR.store(saved, Ordering::SeqCst);
        Some(StderrRedirect)
    }
}

impl Drop for StderrRedirect {
    fn drop(&mut self) {
        restore_stderr();
    }
}

fn restore_stderr() {
    let saved = SAVED_STDERR.swap(-1, Ordering::SeqCst);
    if saved >= 0 {
        // SAFETY: `saved` is the descriptor dup'ed in `StderrRedirect::to`.
        unsafe {
            libc::dup2(saved, 2);
            libc::close(saved);
        }
    }
}
