//! The app without a worker or a terminal: state changes fed as inputs, screens drawn on
//! ratatui's TestBackend and compared with the snapshots in src/tui/snapshots/.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use memlora::adapters::{Admission, MergeOutcome, MergeProgress, MergeStage};
use memlora::config::KeyOverrides;
use memlora::memory::pipeline::{AppliedChange, TurnReport, UsedMemory};
use memlora::memory::transfer::MemoryRecord;
use memlora::memory::OpKind;
use memlora::worker::{Binding, Event, Hit, MemoryNotice, Request};
use ratatui::backend::TestBackend;
use ratatui::layout::Size;
use ratatui::style::Color;
use ratatui::Terminal;

use super::action::Action;
use super::keymap::Keymap;
use super::state::{AppState, ChatEntry, Effect, ImageStatus, Input, Job, Mark, Pane, Settings, MARK_FADE};
use super::view;

fn settings(keymap: &str) -> Settings {
    Settings {
        model: "smollm2-135m-instruct".into(),
        embedder: "all-minilm-l6-v2".into(),
        keymap: Keymap::load(keymap, &KeyOverrides::default()).unwrap(),
        images: Some("halfblocks".into()),
        adapters_dir: PathBuf::from("/data/adapters"),
        adapter_slots: 4,
        daemon: None,
    }
}

fn record(id: u64, text: &str) -> MemoryRecord {
    MemoryRecord {
        id: Some(id),
        text: text.into(),
        subject: None,
        created: None,
        updated: None,
        event_time: None,
        source: Default::default(),
        image: None,
    }
}

/// A started app whose memories and adapters have arrived.
fn app(keymap: &str, size: (u16, u16)) -> AppState {
    let mut state = AppState::new(settings(keymap), size, Instant::now());
    let effects = state.start();
    let ids: Vec<u64> = effects.iter().filter_map(|e| if let Effect::Submit { id, .. } = e { Some(*id) } else { None }).collect();
    assert_eq!(ids.len(), 2);
    let memories = vec![
        record(1, "User likes green tea."),
        record(2, "User works as a nurse in Porto."),
        record(3, "User's cat is called Miso."),
        record(4, "User is learning the cello."),
    ];
    worker(&mut state, ids[0], vec![Event::Memories { memories }]);
    let bindings = vec![Binding { operation: "extract".into(), adapter: "extract-expert".into(), scale: 1.0 }];
    worker(&mut state, ids[1], vec![Event::Adapters { bindings }]);
    state.update(Input::InstalledAdapters(Ok(vec!["extract-expert".into(), "style".into()])));
    state
}

/// Feeds `events` then Done for request `id`.
fn worker(state: &mut AppState, id: u64, events: Vec<Event>) -> Vec<Effect> {
    let mut effects = Vec::new();
    for event in events.into_iter().chain([Event::Done]) {
        effects.extend(state.update(Input::Worker { id, event: Some(event) }));
    }
    effects
}

fn key(code: KeyCode) -> Input {
    Input::Key(KeyEvent::new(code, KeyModifiers::NONE))
}

fn ctrl(c: char) -> Input {
    Input::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL))
}

fn type_text(state: &mut AppState, text: &str) {
    for c in text.chars() {
        let effects = state.update(key(KeyCode::Char(c)));
        assert!(effects.is_empty());
    }
}

/// Types `text` and presses Enter; returns the request submitted, if any.
fn send(state: &mut AppState, text: &str) -> Vec<Effect> {
    type_text(state, text);
    state.update(key(KeyCode::Enter))
}

fn submitted(effects: &[Effect]) -> Vec<(u64, Request)> {
    effects.iter().filter_map(|e| if let Effect::Submit { id, request } = e { Some((*id, request.clone())) } else { None }).collect()
}

fn only(effects: &[Effect]) -> (u64, Request) {
    let mut all = submitted(effects);
    assert_eq!(all.len(), 1, "{effects:?}");
    all.remove(0)
}

fn ask_id(effects: &[Effect]) -> u64 {
    match submitted(effects).as_slice() {
        [(id, Request::Ask { .. })] => *id,
        other => panic!("expected one ask, got {other:?}"),
    }
}

fn render(state: &AppState) -> Terminal<TestBackend> {
    let mut terminal = Terminal::new(TestBackend::new(state.size.0, state.size.1)).unwrap();
    terminal.draw(|frame| view::draw(frame, state)).unwrap();
    terminal
}

fn screen_text(terminal: &Terminal<TestBackend>) -> String {
    let buffer = terminal.backend().buffer();
    let mut out = String::new();
    for y in 0..buffer.area.height {
        for x in 0..buffer.area.width {
            out.push_str(buffer[(x, y)].symbol());
        }
        out.push('\n');
    }
    out
}

/// The foreground colour of the first cell showing `needle`.
fn color_of(terminal: &Terminal<TestBackend>, needle: &str) -> Option<Color> {
    let buffer = terminal.backend().buffer();
    for y in 0..buffer.area.height {
        let row: String = (0..buffer.area.width).map(|x| buffer[(x, y)].symbol().to_string()).collect();
        if let Some(at) = row.find(needle) {
            let x = row[..at].chars().count() as u16;
            return Some(buffer[(x, y)].fg);
        }
    }
    None
}

const ANSWER: &str =
    "Your sister **Alice** lives in *Lisbon*.\n\n## Things to do\n\n- visit the `Alfama`\n- eat pastéis\n\n```\nflight LIS\n```";

/// An exchange finished: streamed, answered with memories, remembered.
fn exchange(state: &mut AppState) {
    let id = ask_id(&send(state, "Where does my sister live?"));
    worker(
        state,
        id,
        vec![
            Event::Token { text: "Your sister".into() },
            Event::Answer {
                text: ANSWER.into(),
                memories_used: vec![
                    UsedMemory { id: 2, text: "User works as a nurse in Porto.".into(), date: None, score: 0.5 },
                    UsedMemory { id: 4, text: "User is learning the cello.".into(), date: None, score: 0.4 },
                ],
                completion_tokens: 30,
                tokens_per_second: 152.34,
                cancelled: false,
                image: None,
                vision: None,
            },
            Event::Remembered {
                report: TurnReport {
                    changes: vec![AppliedChange { seq: 9, id: 5, kind: OpKind::Add, text: "User has a sister.".into(), old_text: None }],
                    ..TurnReport::default()
                },
            },
        ],
    );
}

// ---- snapshots ----

#[test]
fn snapshot_wide_chat_with_markdown_answer_and_memories_used() {
    let mut state = app("default", (120, 40));
    exchange(&mut state);
    let terminal = render(&state);
    insta::assert_snapshot!("wide_chat", terminal.backend());
    let text = screen_text(&terminal);
    assert!(text.contains("memories used: #2 #4"), "{text}");
    assert!(text.contains("152.3 tok/s"));
    // Markdown is rendered: no asterisks or fences, list bullets.
    assert!(!text.contains("**Alice**") && !text.contains("```") && text.contains("• visit the Alfama"));
    // The used memories are marked in the memories pane.
    assert_eq!(color_of(&terminal, "User works as a nurse"), Some(Color::Cyan));
    assert!(text.contains("* #2 User works as a nurse in Porto."));
}

#[test]
fn snapshot_wide_memories_pane_focused_with_search_hits() {
    let mut state = app("default", (120, 40));
    let effects = send(&mut state, "/search porto");
    let (id, Request::Search { query, .. }) = only(&effects) else { panic!() };
    assert_eq!(query, "porto");
    worker(
        &mut state,
        id,
        vec![Event::Hits {
            hits: vec![
                Hit { score: 0.82, memory: record(2, "User works as a nurse in Porto.") },
                Hit { score: 0.31, memory: record(1, "User likes green tea.") },
            ],
        }],
    );
    state.update(Input::Key(KeyEvent::new(KeyCode::F(3), KeyModifiers::NONE)));
    state.update(key(KeyCode::Down));
    assert_eq!((state.focus, state.selected), (Pane::Memories, 1));
    insta::assert_snapshot!("wide_memories_search", render(&state).backend());
}

#[test]
fn snapshot_wide_adapters_pane() {
    let mut state = app("default", (120, 40));
    let effects = send(&mut state, "/adapters");
    assert!(matches!(effects.as_slice(), [Effect::ScanAdapters, Effect::Submit { request: Request::Adapters, .. }]));
    assert_eq!(state.focus, Pane::Adapters);
    let terminal = render(&state);
    insta::assert_snapshot!("wide_adapters", terminal.backend());
    let text = screen_text(&terminal);
    assert!(
        text.contains("extract   extract-expert") && text.contains("budget    2 of 4 slots used") && text.contains("extract-expert, style")
    );
}

#[test]
fn snapshot_a_merge_job_shows_its_progress_in_the_adapters_pane() {
    let mut state = app("default", (120, 40));
    let (id, request) = only(&send(&mut state, "/merge extract-expert style=0.5 --into blend --method ties"));
    let Request::MergeAdapters(spec) = request else { panic!("{request:?}") };
    assert_eq!((spec.adapters.join(" "), spec.into.as_str()), ("extract-expert style=0.5".into(), "blend"));
    for (stage, done, total) in [(MergeStage::Loading, 0, 2), (MergeStage::Loading, 1, 2), (MergeStage::Merging, 12, 30)] {
        state.update(Input::Worker { id, event: Some(Event::MergeProgress { progress: MergeProgress { stage, done, total } }) });
    }
    let terminal = render(&state);
    insta::assert_snapshot!("wide_adapters_merging", terminal.backend());
    let text = screen_text(&terminal);
    assert!(text.contains("merging   blend  ▰▰▰▰▱▱▱▱▱▱ module 12/30"), "{text}");
    assert!(text.contains("merge → blend: module 12/30"), "the status line shows the job too: {text}");

    // Done: a note, and the pane reloads the installed adapters and the bindings.
    let outcome = MergeOutcome {
        recipe: "ties density=0.2 r=8".into(),
        admission: Admission::Merged {
            into: "style".into(),
            similarity: 0.8,
            reconstruction_error: 0.01,
            members: vec!["style".into(), "blend".into()],
        },
        reconstruction_error: 0.0123,
        max_module_error: 0.02,
    };
    let effects = worker(&mut state, id, vec![Event::Merged { outcome }]);
    assert!(matches!(effects.as_slice(), [Effect::ScanAdapters, Effect::Submit { request: Request::Adapters, .. }]), "{effects:?}");
    assert!(state.pending.iter().all(|p| !matches!(p.job, Job::Merge { .. })));
    let Some(ChatEntry::Note(note)) = state.chat.last() else { panic!() };
    assert_eq!(
        note,
        "merge done (ties density=0.2 r=8; re-factorisation error 1.23 %): the adapter budget is full: merged into 'style', which now stands for style, blend"
    );
}

#[test]
fn quitting_cancels_a_running_merge_and_esc_stops_one() {
    let mut state = app("default", (120, 40));
    let (id, _) = only(&send(&mut state, "/merge a b --into c"));
    let effects = state.update(ctrl('q'));
    assert!(matches!(effects.as_slice(), [Effect::Cancel(cancelled), Effect::Exit] if *cancelled == id), "{effects:?}");

    let mut state = app("default", (120, 40));
    let (id, _) = only(&send(&mut state, "/merge a b --into c"));
    let effects = state.update(key(KeyCode::Esc));
    assert!(matches!(effects.as_slice(), [Effect::Cancel(cancelled)] if *cancelled == id), "{effects:?}");
    worker(&mut state, id, vec![Event::Error { message: "the merge was cancelled".into() }]);
    let Some(ChatEntry::Error(error)) = state.chat.last() else { panic!() };
    assert_eq!(error, "merge → c: the merge was cancelled");
}

#[test]
fn snapshot_wide_image_pane_with_a_halfblocks_preview() {
    let mut state = app("default", (120, 40));
    let effects = send(&mut state, "/image /pictures/flag.png");
    let [Effect::LoadImage { generation, path }] = effects.as_slice() else { panic!("{effects:?}") };
    assert_eq!(path, &PathBuf::from("/pictures/flag.png"));
    // Three stripes: red, white, blue.
    let picture = image::RgbImage::from_fn(400, 210, |_, y| match y / 70 {
        0 => image::Rgb([200, 0, 0]),
        1 => image::Rgb([255, 255, 255]),
        _ => image::Rgb([0, 0, 200]),
    });
    let effects = state.update(Input::ImageDecoded { generation: *generation, result: Ok(image::DynamicImage::ImageRgb8(picture)) });
    let [Effect::EncodeImage { generation, image, size }] = effects.as_slice() else { panic!("{effects:?}") };
    let protocol = super::image::encode(&ratatui_image::picker::Picker::halfblocks(), (**image).clone(), *size).unwrap();
    state.update(Input::ImageEncoded { generation: *generation, size: *size, result: Ok(protocol) });
    state.update(Input::Key(KeyEvent::new(KeyCode::F(5), KeyModifiers::NONE)));
    let terminal = render(&state);
    insta::assert_snapshot!("wide_image", terminal.backend());
    let text = screen_text(&terminal);
    assert!(text.contains("flag.png · 400×210 · for your next question"), "{text}");
    assert!(text.contains("image attached: /pictures/flag.png (your next message asks about"), "{text}");
    assert!(text.contains('▀'), "halfblocks drawn");
    // The next question carries the image; the one after it does not.
    let (_, request) = only(&send(&mut state, "What flag is this?"));
    assert!(matches!(request, Request::Ask { image: Some(ref path), .. } if path == &PathBuf::from("/pictures/flag.png")), "{request:?}");
    let (_, request) = only(&send(&mut state, "And now?"));
    assert!(matches!(request, Request::Ask { image: None, .. }), "{request:?}");
}

#[test]
fn snapshot_small_terminal_shows_one_pane_as_tabs() {
    let mut state = app("default", (80, 24));
    exchange(&mut state);
    let terminal = render(&state);
    insta::assert_snapshot!("small_chat_tab", terminal.backend());
    assert!(!screen_text(&terminal).contains("memories (5)"), "the memories pane is not shown beside the chat");
    state.update(key(KeyCode::Tab));
    assert_eq!((state.focus, state.typing), (Pane::Memories, false));
    insta::assert_snapshot!("small_memories_tab", render(&state).backend());
    state.update(Input::Key(KeyEvent::new(KeyCode::BackTab, KeyModifiers::SHIFT)));
    assert_eq!((state.focus, state.typing), (Pane::Chat, true));
    state.update(Input::Key(KeyEvent::new(KeyCode::F(4), KeyModifiers::NONE)));
    assert_eq!(state.focus, Pane::Adapters);
}

#[test]
fn snapshot_help_overlay_lists_every_key_and_command() {
    for name in ["default", "vim"] {
        let mut state = app(name, (120, 40));
        state.update(Input::Key(KeyEvent::new(KeyCode::F(1), KeyModifiers::NONE)));
        assert!(state.help.is_some());
        let text: String = view::help_lines(&state).iter().map(|l| format!("{l}\n")).collect();
        for section in super::keymap::Section::ALL {
            for (spec, _) in state.settings.keymap.bindings(section) {
                assert!(text.contains(&spec.to_string()), "{name}: {spec} missing from help");
            }
        }
        for (usage, _) in super::command::COMMANDS {
            assert!(text.contains(usage), "{usage}");
        }
        insta::assert_snapshot!(format!("help_{name}"), render(&state).backend());
        state.update(key(KeyCode::Esc));
        assert!(state.help.is_none());
    }
}

#[test]
fn snapshot_streaming_answer_is_plain_text_with_a_cursor() {
    let mut state = app("default", (100, 30));
    let id = ask_id(&send(&mut state, "Tell me about Lisbon"));
    for piece in ["Lisbon is **the", " capital** of Portugal.\n\n- tram", " 28"] {
        state.update(Input::Worker { id, event: Some(Event::Token { text: piece.into() }) });
    }
    let terminal = render(&state);
    insta::assert_snapshot!("streaming", terminal.backend());
    let text = screen_text(&terminal);
    assert!(text.contains("Lisbon is **the capital** of Portugal."), "plain while streaming");
    assert!(text.contains("- tram 28▌"));
    assert!(text.contains("working…"));
    assert!(text.contains("adapter: base (generate)"));
}

#[test]
fn snapshot_memory_changes_are_marked_then_fade() {
    let mut state = app("default", (120, 40));
    let start = state.now;
    state.update(Input::Notice(MemoryNotice {
        changes: vec![
            AppliedChange { seq: 10, id: 5, kind: OpKind::Add, text: "User's sister Alice lives in Lisbon.".into(), old_text: None },
            AppliedChange { seq: 11, id: 2, kind: OpKind::Update, text: "User works as a nurse in Lisbon.".into(), old_text: None },
            AppliedChange { seq: 12, id: 3, kind: OpKind::Delete, text: "User's cat is called Miso.".into(), old_text: None },
        ],
        memories: 4,
    }));
    let terminal = render(&state);
    insta::assert_snapshot!("memory_marks", terminal.backend());
    let text = screen_text(&terminal);
    assert!(text.contains("+ #5 User's sister Alice lives in Lisbon."));
    assert!(text.contains("~ #2 User works as a nurse in Lisbon."));
    assert!(text.contains("- #3 User's cat is called Miso."));
    assert!(text.contains("memories (4)"));
    assert_eq!(color_of(&terminal, "User's sister Alice"), Some(Color::Green));
    assert_eq!(color_of(&terminal, "User works as a nurse in Lisbon"), Some(Color::Yellow));
    assert_eq!(color_of(&terminal, "User's cat"), Some(Color::Red));
    // Before the fade nothing changes; after it the marks and the deleted memory are gone.
    state.update(Input::Tick(start + MARK_FADE / 2));
    assert_eq!(state.marks.len(), 3);
    state.dirty = false;
    state.update(Input::Tick(start + MARK_FADE + Duration::from_millis(1)));
    assert!(state.marks.is_empty() && state.dirty);
    let ids: Vec<u64> = state.memories.iter().map(|m| m.id).collect();
    assert_eq!(ids, [5, 4, 2, 1]);
    let text = screen_text(&render(&state));
    assert!(text.contains("  #5 User's sister") && !text.contains("Miso"));
}

#[test]
fn the_next_exchange_clears_memory_marks() {
    let mut state = app("default", (120, 40));
    state.update(Input::Notice(MemoryNotice {
        changes: vec![AppliedChange { seq: 12, id: 3, kind: OpKind::Delete, text: "x".into(), old_text: None }],
        memories: 3,
    }));
    assert_eq!(state.marks.get(&3).map(|m| m.0), Some(Mark::Deleted));
    send(&mut state, "hello");
    assert!(state.marks.is_empty());
    assert!(!state.memories.iter().any(|m| m.id == 3));
}

#[test]
fn snapshot_image_error_message() {
    let mut state = app("default", (120, 40));
    let effects = send(&mut state, "/image notes.txt");
    let [Effect::LoadImage { generation, .. }] = effects.as_slice() else { panic!() };
    let error = "notes.txt: not an image in a supported format (png, jpeg, gif, webp, bmp)".to_owned();
    state.update(Input::ImageDecoded { generation: *generation, result: Err(error) });
    let terminal = render(&state);
    insta::assert_snapshot!("image_error", terminal.backend());
    let text = screen_text(&terminal);
    assert!(text.contains("cannot show this image: notes.txt: not an") && text.contains("image in a supported format"), "{text}");
    // Nor is it sent with the next question.
    let (_, request) = only(&send(&mut state, "What is in it?"));
    assert!(matches!(request, Request::Ask { image: None, .. }), "{request:?}");
}

#[test]
fn snapshot_quitting_while_remembering() {
    let mut state = app("default", (100, 30));
    let id = ask_id(&send(&mut state, "I moved to Porto"));
    worker_events(
        &mut state,
        id,
        vec![Event::Answer {
            text: "Nice!".into(),
            memories_used: vec![],
            completion_tokens: 2,
            tokens_per_second: 90.0,
            cancelled: false,
            image: None,
            vision: None,
        }],
    );
    let effects = state.update(ctrl('c'));
    assert!(effects.is_empty() && state.quitting, "{effects:?}");
    let terminal = render(&state);
    insta::assert_snapshot!("quitting", terminal.backend());
    assert!(screen_text(&terminal).contains("finishing: remembering what you said… (ctrl-c again quits now)"));
}

// ---- behaviour ----

fn worker_events(state: &mut AppState, id: u64, events: Vec<Event>) -> Vec<Effect> {
    events.into_iter().flat_map(|event| state.update(Input::Worker { id, event: Some(event) })).collect()
}

fn is_exit(effects: &[Effect]) -> bool {
    matches!(effects, [Effect::Exit])
}

#[test]
fn quit_when_idle_exits_at_once() {
    let mut state = app("default", (120, 40));
    assert!(is_exit(&state.update(ctrl('c'))));
    let mut state = app("default", (120, 40));
    assert!(is_exit(&state.update(ctrl('q'))));
    let mut state = app("vim", (120, 40));
    state.update(key(KeyCode::Esc));
    assert!(is_exit(&state.update(key(KeyCode::Char('q')))));
    let mut state = app("default", (120, 40));
    assert!(is_exit(&send(&mut state, "/quit")));
}

#[test]
fn ctrl_c_cancels_the_answer_then_quits_after_remembering_and_a_third_forces() {
    let mut state = app("default", (120, 40));
    let id = ask_id(&send(&mut state, "My sister lives in Lisbon."));
    worker_events(&mut state, id, vec![Event::Token { text: "Nice".into() }]);
    // First: stops the answer.
    let effects = state.update(ctrl('c'));
    assert!(matches!(effects.as_slice(), [Effect::Cancel(c)] if *c == id), "{effects:?}");
    assert!(!state.quitting);
    worker_events(
        &mut state,
        id,
        vec![Event::Answer {
            text: "Nice".into(),
            memories_used: vec![],
            completion_tokens: 1,
            tokens_per_second: 50.0,
            cancelled: true,
            image: None,
            vision: None,
        }],
    );
    // Second: the memory operation is still running, so quitting waits.
    let effects = state.update(ctrl('c'));
    assert!(effects.is_empty() && state.quitting, "{effects:?}");
    assert_eq!(state.memory_operations(), ["remembering what you said"]);
    // Third: quits now, saying what was pending.
    match state.update(ctrl('c')).as_slice() {
        [Effect::ForceExit { pending }] => assert_eq!(pending, &["remembering what you said"]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn quit_while_busy_waits_for_done_then_exits() {
    let mut state = app("default", (120, 40));
    let id = ask_id(&send(&mut state, "I like jazz"));
    let effects = send(&mut state, "/quit");
    // The answer is stopped; the remembering that follows it is waited for.
    assert!(matches!(effects.as_slice(), [Effect::Cancel(c)] if *c == id), "{effects:?}");
    assert!(state.quitting);
    let effects = worker_events(
        &mut state,
        id,
        vec![
            Event::Answer {
                text: "".into(),
                memories_used: vec![],
                completion_tokens: 0,
                tokens_per_second: 0.0,
                cancelled: true,
                image: None,
                vision: None,
            },
            Event::Remembered { report: TurnReport::default() },
        ],
    );
    assert!(effects.is_empty());
    assert!(is_exit(&state.update(Input::Worker { id, event: Some(Event::Done) })));
    // A closed channel counts as done too.
    let mut state = app("default", (120, 40));
    let id = ask_id(&send(&mut state, "x"));
    state.update(ctrl('q'));
    assert!(is_exit(&state.update(Input::Worker { id, event: None })));
}

#[test]
fn esc_stops_a_streaming_answer_and_cancelled_answers_say_so() {
    let mut state = app("default", (120, 40));
    let id = ask_id(&send(&mut state, "long story please"));
    worker_events(&mut state, id, vec![Event::Token { text: "Once".into() }]);
    assert!(matches!(state.update(key(KeyCode::Esc)).as_slice(), [Effect::Cancel(c)] if *c == id));
    // A second Esc does not cancel twice.
    assert!(state.update(key(KeyCode::Esc)).is_empty());
    worker(
        &mut state,
        id,
        vec![Event::Answer {
            text: "Once".into(),
            memories_used: vec![],
            completion_tokens: 1,
            tokens_per_second: 10.0,
            cancelled: true,
            image: None,
            vision: None,
        }],
    );
    let Some(ChatEntry::Answer(answer)) = state.chat.last() else { panic!() };
    assert!(answer.done && answer.cancelled);
    assert!(screen_text(&render(&state)).contains("(stopped)"));
}

#[test]
fn input_history_walks_back_and_forth_and_keeps_the_draft() {
    let mut state = app("default", (120, 40));
    send(&mut state, "first");
    send(&mut state, "second");
    type_text(&mut state, "draft");
    // Up on the first line recalls history, newest first.
    state.update(key(KeyCode::Up));
    assert_eq!(state.input_text(), "second");
    state.update(key(KeyCode::Up));
    assert_eq!(state.input_text(), "first");
    state.update(key(KeyCode::Up));
    assert_eq!(state.input_text(), "first");
    state.update(key(KeyCode::Down));
    assert_eq!(state.input_text(), "second");
    state.update(key(KeyCode::Down));
    assert_eq!(state.input_text(), "draft");
    // In a multi-line input, Up from the second line moves the cursor instead.
    state.update(Input::Key(KeyEvent::new(KeyCode::Enter, KeyModifiers::ALT)));
    type_text(&mut state, "more");
    assert_eq!(state.input_text(), "draft\nmore");
    state.update(key(KeyCode::Up));
    assert_eq!(state.input_text(), "draft\nmore");
    assert_eq!(state.input.cursor().0, 0);
    state.update(key(KeyCode::Up));
    assert_eq!(state.input_text(), "second");
    // Repeats are stored once; commands are history too.
    send(&mut state, "");
    let mut state = app("default", (120, 40));
    send(&mut state, "same");
    send(&mut state, "same");
    send(&mut state, "/model");
    assert_eq!(state.history, ["same", "/model"]);
}

#[test]
fn newline_keys_add_lines_and_paste_keeps_them() {
    let mut state = app("default", (120, 40));
    type_text(&mut state, "a");
    state.update(Input::Key(KeyEvent::new(KeyCode::Enter, KeyModifiers::SHIFT)));
    type_text(&mut state, "b");
    state.update(ctrl('j'));
    state.update(Input::Paste("c\r\nd".into()));
    assert_eq!(state.input_text(), "a\nb\nc\nd");
    let effects = state.update(key(KeyCode::Enter));
    assert!(matches!(submitted(&effects).as_slice(), [(_, Request::Ask { text, remember: true, image: None })] if text == "a\nb\nc\nd"));
}

#[test]
fn slash_commands_submit_requests_and_bad_ones_get_a_message() {
    let mut state = app("default", (120, 40));
    let effects = send(&mut state, "/remember I was born in 1990");
    assert!(matches!(submitted(&effects).as_slice(), [(_, Request::Remember { text, subject: None })] if text == "I was born in 1990"));
    let effects = send(&mut state, "/forget 3");
    assert!(matches!(submitted(&effects).as_slice(), [(_, Request::Forget { memory_id: 3 })]));
    let effects = send(&mut state, "/undo");
    assert!(matches!(submitted(&effects).as_slice(), [(_, Request::Undo)]));
    let effects = send(&mut state, "/frobnicate now");
    assert!(effects.is_empty());
    assert_eq!(state.chat.last(), Some(&ChatEntry::Error("unknown command /frobnicate; /help lists the commands".into())));
    send(&mut state, "/forget x");
    assert!(matches!(state.chat.last(), Some(ChatEntry::Error(m)) if m.contains("not 'x'")));
    send(&mut state, "/model");
    assert!(matches!(state.chat.last(), Some(ChatEntry::Note(m)) if m.contains("smollm2-135m-instruct")));
    send(&mut state, "/help");
    assert!(state.help.is_some());
    state.update(key(KeyCode::Esc));
    // A worker error for a command becomes a chat message.
    let effects = send(&mut state, "/forget 99");
    let (id, _) = only(&effects);
    worker(&mut state, id, vec![Event::Error { message: "no memory with id 99".into() }]);
    assert_eq!(state.chat.last(), Some(&ChatEntry::Error("forgetting #99: no memory with id 99".into())));
}

#[test]
fn edit_and_forget_from_the_memories_pane() {
    let mut state = app("default", (120, 40));
    // Not in the memories pane: a hint, no edit.
    state.action(Action::EditMemory);
    assert!(state.editing.is_none() && state.flash.as_deref().is_some_and(|f| f.contains("memories pane")));
    state.update(key(KeyCode::Tab));
    assert_eq!(state.focus, Pane::Memories);
    state.update(key(KeyCode::Char('j')));
    // Newest first: #4, #3, …
    state.update(key(KeyCode::Char('e')));
    assert_eq!(state.editing, Some(3));
    assert!(state.typing);
    assert_eq!(state.input_text(), "User's cat is called Miso.");
    state.update(Input::Key(KeyEvent::new(KeyCode::Backspace, KeyModifiers::NONE)));
    type_text(&mut state, " (a tabby)");
    let effects = state.update(key(KeyCode::Enter));
    assert!(
        matches!(submitted(&effects).as_slice(), [(_, Request::Edit { memory_id: 3, text })] if text == "User's cat is called Miso (a tabby)"),
        "{effects:?}"
    );
    assert!(state.editing.is_none() && !state.typing);
    // Forget asks first; n keeps, y forgets.
    state.update(key(KeyCode::Char('d')));
    assert_eq!(state.confirm.as_ref().map(|m| m.id), Some(3));
    assert!(screen_text(&render(&state)).contains("forget this memory?"));
    assert!(state.update(key(KeyCode::Char('n'))).is_empty());
    assert!(state.confirm.is_none());
    state.update(key(KeyCode::Delete));
    let effects = state.update(key(KeyCode::Char('y')));
    assert!(matches!(submitted(&effects).as_slice(), [(_, Request::Forget { memory_id: 3 })]));
    // Esc while editing drops the edit.
    state.update(key(KeyCode::Char('e')));
    assert!(state.editing.is_some());
    state.update(key(KeyCode::Esc));
    assert!(state.editing.is_none() && state.input_text().is_empty());
    // `/` starts a search in the input; once sent, the pane's keys browse again.
    state.update(key(KeyCode::Char('/')));
    assert_eq!(state.input_text(), "/search ");
    assert!(state.typing);
    let effects = send(&mut state, "cat");
    assert!(matches!(submitted(&effects).as_slice(), [(_, Request::Search { query, .. })] if query == "cat"));
    assert!(!state.typing && state.focus == Pane::Memories);
}

#[test]
fn vim_keymap_has_normal_and_insert_modes() {
    let mut state = app("vim", (120, 40));
    assert!(state.typing, "starts in insert mode");
    type_text(&mut state, "hello");
    state.update(key(KeyCode::Esc));
    assert!(!state.typing);
    // Normal mode: letters act, they are not typed.
    state.update(key(KeyCode::Char('l')));
    assert_eq!(state.focus, Pane::Memories);
    state.update(key(KeyCode::Char('j')));
    state.update(key(KeyCode::Char('j')));
    assert_eq!(state.selected, 2);
    state.update(key(KeyCode::Char('k')));
    assert_eq!(state.selected, 1);
    state.update(Input::Key(KeyEvent::new(KeyCode::Char('G'), KeyModifiers::SHIFT)));
    assert_eq!(state.selected, 3);
    assert_eq!(state.input_text(), "hello");
    // Insert mode keeps the pane; Enter sends.
    state.update(key(KeyCode::Char('i')));
    assert!(state.typing && state.focus == Pane::Memories);
    let effects = send(&mut state, " there");
    assert!(matches!(submitted(&effects).as_slice(), [(_, Request::Ask { text, .. })] if text == "hello there"));
    // `:` starts a command.
    state.update(key(KeyCode::Esc));
    state.update(key(KeyCode::Char(':')));
    assert!(state.typing);
    assert_eq!(state.input_text(), "/");
    assert!(screen_text(&render(&state)).contains("INSERT"));
}

#[test]
fn chat_scrolls_back_and_follows_again() {
    let mut state = app("default", (100, 30));
    for _ in 0..30 {
        send(&mut state, "/model");
    }
    assert_eq!(state.chat_scroll, 0);
    state.update(key(KeyCode::PageUp));
    assert!(state.chat_scroll > 0, "PageUp while typing scrolls the chat");
    let back = state.chat_scroll;
    state.update(key(KeyCode::PageDown));
    assert!(state.chat_scroll < back);
    for _ in 0..100 {
        state.update(key(KeyCode::PageUp));
    }
    let top = state.chat_scroll;
    state.update(key(KeyCode::PageUp));
    assert_eq!(state.chat_scroll, top, "stops at the top");
    // The chat shows where it is.
    assert!(screen_text(&render(&state)).contains("lines back"));
}

#[test]
fn stale_image_results_are_dropped() {
    let mut state = app("default", (120, 40));
    let first = send(&mut state, "/image a.png");
    let second = send(&mut state, "/image b.png");
    let ([Effect::LoadImage { generation: g1, .. }], [Effect::LoadImage { generation: g2, .. }]) = (first.as_slice(), second.as_slice())
    else {
        panic!()
    };
    assert!(g2 > g1);
    // The first image's result arrives late: ignored.
    let effects = state.update(Input::ImageDecoded { generation: *g1, result: Ok(image::DynamicImage::new_rgb8(4, 4)) });
    assert!(effects.is_empty());
    assert!(matches!(state.image.as_ref().unwrap().status, ImageStatus::Loading));
    let effects = state.update(Input::ImageDecoded { generation: *g2, result: Ok(image::DynamicImage::new_rgb8(4, 4)) });
    let [Effect::EncodeImage { size, .. }] = effects.as_slice() else { panic!() };
    let canvas = view::image_canvas(state.area(), &state).unwrap();
    assert_eq!(*size, Size::new(canvas.width, canvas.height));
    // An encoding for an old size is dropped; a resize asks again.
    let old = *size;
    let effects = state.update(Input::Resize(130, 45));
    let [Effect::EncodeImage { size: new, .. }] = effects.as_slice() else { panic!("{effects:?}") };
    assert_ne!(*new, old);
    let protocol = super::image::encode(&ratatui_image::picker::Picker::halfblocks(), image::DynamicImage::new_rgb8(4, 4), old).unwrap();
    state.update(Input::ImageEncoded { generation: *g2, size: old, result: Ok(protocol) });
    assert!(state.image.as_ref().unwrap().encoded.is_none());
    // Images off: attaching notes it, nothing is decoded.
    let mut settings = settings("default");
    settings.images = None;
    let mut state = AppState::new(settings, (120, 40), Instant::now());
    assert!(send(&mut state, "/image a.png").is_empty());
    assert!(matches!(state.image.as_ref().unwrap().status, ImageStatus::Off));
}

#[test]
fn ingest_progress_shows_in_the_status_line_and_can_be_stopped() {
    let mut state = app("default", (120, 40));
    let effects = send(&mut state, "/ingest /talks/chat.txt");
    let (id, Request::Ingest { path, .. }) = only(&effects) else { panic!() };
    assert_eq!(path, PathBuf::from("/talks/chat.txt"));
    worker_events(&mut state, id, vec![Event::Progress { done: 3, total: 10, message: "chat session 1".into() }]);
    let text = screen_text(&render(&state));
    assert!(text.contains("ingest chat.txt 3/10"), "{text}");
    assert!(matches!(state.update(ctrl('c')).as_slice(), [Effect::Cancel(c)] if *c == id));
    worker(&mut state, id, vec![Event::Progress { done: 4, total: 10, message: "chat session 1".into() }]);
    assert!(matches!(state.chat.last(), Some(ChatEntry::Note(m)) if m == "ingest of /talks/chat.txt stopped: 4/10 turns"));
    assert!(!state.busy());
}
