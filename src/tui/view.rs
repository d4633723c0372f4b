//! Drawing: [`draw`] is a pure function of the [`AppState`] (no I/O, no state change), so
//! every screen is reproducible in tests with ratatui's `TestBackend`.
//!
//! Layout: at least 100×30 the chat sits beside a column of memories, adapters and image
//! panes; smaller terminals show one pane at a time under a row of tabs. The input and the
//! status line are always at the bottom.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span, Text};
use ratatui::widgets::{Block, BorderType, Borders, Clear, List, ListItem, ListState, Paragraph, Tabs, Wrap};
use ratatui::Frame;
use ratatui_image::Image;

use super::action::Action;
use super::command::COMMANDS;
use super::keymap::Section;
use super::markdown::{self, Para};
use super::state::{AppState, ChatEntry, ImageStatus, Job, Mark, Pane};
use memlora::adapters::{MergeProgress, MergeStage};
use memlora::memory::OpKind;

pub const WIDE_MIN: (u16, u16) = (100, 30);
const OPERATIONS: [&str; 3] = ["extract", "update", "generate"];

const HELP_COLUMN: usize = 20;
const DIM: Style = Style::new().fg(Color::DarkGray);
const FOCUSED: Style = Style::new().fg(Color::Cyan);

pub struct Areas {
    pub tabs: Option<Rect>,
    pub chat: Option<Rect>,
    pub memories: Option<Rect>,
    pub adapters: Option<Rect>,
    pub image: Option<Rect>,
    pub input: Rect,
    pub status: Rect,
}

pub fn is_wide(area: Rect) -> bool {
    area.width >= WIDE_MIN.0 && area.height >= WIDE_MIN.1
}

pub fn layout(area: Rect, state: &AppState) -> Areas {
    let wide = is_wide(area);
    let max_lines = if wide { 6 } else { 3 };
    let input_lines = (state.input.lines().len() as u16).clamp(1, max_lines);
    let [main, input, status] =
        Layout::vertical([Constraint::Min(3), Constraint::Length(input_lines + 2), Constraint::Length(1)]).areas(area);
    if wide {
        let [chat, side] = Layout::horizontal([Constraint::Percentage(60), Constraint::Percentage(40)]).areas(main);
        let image_height = if state.image.is_some() { (side.height / 3).max(8) } else { 3 };
        let adapters_height = (adapter_lines(state, side.width.saturating_sub(2)).len() as u16 + 2).min(side.height / 3);
        let [memories, adapters, image] =
            Layout::vertical([Constraint::Min(5), Constraint::Length(adapters_height), Constraint::Length(image_height)]).areas(side);
        Areas { tabs: None, chat: Some(chat), memories: Some(memories), adapters: Some(adapters), image: Some(image), input, status }
    } else {
        let [tabs, pane] = Layout::vertical([Constraint::Length(1), Constraint::Min(1)]).areas(main);
        let mut areas = Areas { tabs: Some(tabs), chat: None, memories: None, adapters: None, image: None, input, status };
        match state.focus {
            Pane::Chat => areas.chat = Some(pane),
            Pane::Memories => areas.memories = Some(pane),
            Pane::Adapters => areas.adapters = Some(pane),
            Pane::Image => areas.image = Some(pane),
        }
        areas
    }
}

/// Inside a bordered pane.
pub fn inner(area: Rect) -> Rect {
    Block::default().borders(Borders::ALL).inner(area)
}

/// Where the chat's text goes: inside the border, a column of space on each side.
pub fn chat_text_area(area: Rect) -> Rect {
    let inner = inner(area);
    if inner.width > 10 {
        Rect { x: inner.x + 1, width: inner.width - 2, ..inner }
    } else {
        inner
    }
}

/// Where an attached image is drawn (below its caption line), when its pane is shown.
pub fn image_canvas(area: Rect, state: &AppState) -> Option<Rect> {
    let pane = inner(layout(area, state).image?);
    let canvas = Rect { y: pane.y + 1, height: pane.height.saturating_sub(1), ..pane };
    (canvas.width >= 2 && canvas.height >= 2).then_some(canvas)
}

pub fn draw(frame: &mut Frame, state: &AppState) {
    let area = frame.area();
    let areas = layout(area, state);
    if let Some(tabs) = areas.tabs {
        draw_tabs(frame, tabs, state);
    }
    if let Some(rect) = areas.chat {
        draw_chat(frame, rect, state);
    }
    if let Some(rect) = areas.memories {
        draw_memories(frame, rect, state);
    }
    if let Some(rect) = areas.adapters {
        draw_adapters(frame, rect, state);
    }
    if let Some(rect) = areas.image {
        draw_image(frame, rect, state);
    }
    draw_input(frame, areas.input, state);
    draw_status(frame, areas.status, state);
    if let Some(item) = &state.confirm {
        draw_confirm(frame, area, item.id, &item.text);
    }
    if let Some(scroll) = state.help {
        draw_help(frame, area, state, scroll);
    }
}

fn pane_block(state: &AppState, pane: Pane, title: String) -> Block<'static> {
    let focused = state.focus == pane;
    let style = if focused { FOCUSED } else { DIM };
    let title_style = if focused { FOCUSED.add_modifier(Modifier::BOLD) } else { Style::default() };
    Block::default()
        .borders(Borders::ALL)
        .border_type(BorderType::Rounded)
        .border_style(style)
        .title(Span::styled(format!(" {title} "), title_style))
}

fn draw_tabs(frame: &mut Frame, area: Rect, state: &AppState) {
    let titles: Vec<Line> = Pane::ALL
        .iter()
        .map(|pane| {
            let marked = *pane == Pane::Memories && !state.marks.is_empty();
            Line::from(format!("{}{}", pane.title(), if marked { " •" } else { "" }))
        })
        .collect();
    let selected = Pane::ALL.iter().position(|p| *p == state.focus).unwrap_or(0);
    let tabs = Tabs::new(titles)
        .select(selected)
        .style(DIM)
        .highlight_style(FOCUSED.add_modifier(Modifier::BOLD | Modifier::REVERSED))
        .divider("│");
    frame.render_widget(tabs, area);
}

// ---- chat ----

/// The chat as wrapped lines for `width` columns.
pub fn chat_lines(state: &AppState, width: u16) -> Vec<Line<'static>> {
    chat_tail(state, width, usize::MAX)
}

/// At least the last `count` wrapped lines of the chat (all when it has fewer): drawing
/// costs what is visible, however long the conversation.
pub fn chat_tail(state: &AppState, width: u16, count: usize) -> Vec<Line<'static>> {
    if state.chat.is_empty() {
        let send = state.settings.keymap.keys_for(Section::Input, Action::Submit).into_iter().next().unwrap_or_else(|| "enter".into());
        let welcome = Para::plain(format!("Type a message and press {send}. /help or F1 lists keys and commands."), DIM);
        return markdown::wrap(&welcome, usize::from(width));
    }
    let mut blocks: Vec<Vec<Line<'static>>> = Vec::new();
    let mut total = 0;
    for index in (0..state.chat.len()).rev() {
        let lines: Vec<Line<'static>> =
            entry_paras(state, index).iter().flat_map(|para| markdown::wrap(para, usize::from(width))).collect();
        total += lines.len();
        blocks.push(lines);
        if total >= count {
            break;
        }
    }
    blocks.into_iter().rev().flatten().collect()
}

/// Chat entry `index` as logical lines.
fn entry_paras(state: &AppState, index: usize) -> Vec<Para> {
    let mut paras: Vec<Para> = Vec::new();
    match &state.chat[index] {
        ChatEntry::User(text) => {
            if index > 0 {
                paras.push(Para::plain("", Style::default()));
            }
            for (i, line) in text.split('\n').enumerate() {
                let prefix = if i == 0 { "› " } else { "  " };
                paras.push(Para {
                    line: Line::from(vec![
                        Span::styled(prefix, Style::new().fg(Color::Green).add_modifier(Modifier::BOLD)),
                        Span::styled(line.to_owned(), Style::new().add_modifier(Modifier::BOLD)),
                    ]),
                    hang: 2,
                });
            }
        }
        ChatEntry::Answer(answer) => {
            if !answer.done {
                if answer.text.is_empty() {
                    paras.push(Para::plain("…", DIM));
                } else {
                    let lines: Vec<&str> = answer.text.split('\n').collect();
                    for (i, line) in lines.iter().enumerate() {
                        let mut spans = vec![Span::raw(line.to_string())];
                        if i + 1 == lines.len() {
                            spans.push(Span::styled("▌", DIM));
                        }
                        paras.push(Para { line: Line::from(spans), hang: 0 });
                    }
                }
            } else {
                paras.extend(answer.rendered.iter().cloned());
            }
            let mut meta: Vec<Span> = Vec::new();
            let mut add = |span: Span<'static>| {
                if !meta.is_empty() {
                    meta.push(Span::styled(" · ", DIM));
                }
                meta.push(span);
            };
            if answer.cancelled {
                add(Span::styled(if answer.text.is_empty() { "(cancelled)" } else { "(stopped)" }, Style::new().fg(Color::Yellow)));
            }
            if let Some(error) = &answer.error {
                add(Span::styled(format!("error: {error}"), Style::new().fg(Color::Red)));
            }
            if !answer.memories_used.is_empty() {
                let ids: Vec<String> = answer.memories_used.iter().map(|id| format!("#{id}")).collect();
                add(Span::styled(format!("memories used: {}", ids.join(" ")), Style::new().fg(Color::Cyan)));
            }
            if !answer.remembered.is_empty() {
                let ids: Vec<String> = answer.remembered.iter().map(|(kind, id)| format!("{}#{id}", mark_char(kind_mark(*kind)))).collect();
                add(Span::styled(format!("remembered: {}", ids.join(" ")), Style::new().fg(Color::Green)));
            }
            if !meta.is_empty() {
                paras.push(Para { line: Line::from(meta), hang: 0 });
            }
        }
        ChatEntry::Note(text) => paras.push(Para {
            line: Line::from(vec![Span::styled("· ", DIM), Span::styled(text.clone(), DIM.add_modifier(Modifier::ITALIC))]),
            hang: 2,
        }),
        ChatEntry::Error(text) => paras.push(Para {
            line: Line::from(vec![
                Span::styled("! ", Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)),
                Span::styled(text.clone(), Style::new().fg(Color::Red)),
            ]),
            hang: 2,
        }),
    }
    paras
}

fn draw_chat(frame: &mut Frame, area: Rect, state: &AppState) {
    let inner = chat_text_area(area);
    let height = usize::from(inner.height);
    let lines = chat_tail(state, inner.width, height + state.chat_scroll);
    let scroll = state.chat_scroll.min(lines.len().saturating_sub(height));
    let end = lines.len() - scroll;
    let start = end.saturating_sub(height);
    let title = if scroll > 0 { format!("chat · {scroll} lines back") } else { "chat".to_owned() };
    frame.render_widget(pane_block(state, Pane::Chat, title), area);
    frame.render_widget(Paragraph::new(Text::from(lines[start..end].to_vec())), inner);
}

// ---- memories ----

fn kind_mark(kind: OpKind) -> Mark {
    match kind {
        OpKind::Add | OpKind::Restore => Mark::New,
        OpKind::Update => Mark::Updated,
        OpKind::Delete => Mark::Deleted,
    }
}

fn mark_char(mark: Mark) -> char {
    match mark {
        Mark::New => '+',
        Mark::Updated => '~',
        Mark::Deleted => '-',
    }
}

fn mark_style(mark: Mark) -> Style {
    match mark {
        Mark::New => Style::new().fg(Color::Green),
        Mark::Updated => Style::new().fg(Color::Yellow),
        Mark::Deleted => Style::new().fg(Color::Red).add_modifier(Modifier::CROSSED_OUT),
    }
}

fn draw_memories(frame: &mut Frame, area: Rect, state: &AppState) {
    let title = match &state.search {
        Some(search) => match &search.hits {
            Some(hits) => format!("search \"{}\" · {} found · esc clears", search.query, hits.len()),
            None => format!("search \"{}\" …", search.query),
        },
        None => format!("memories ({})", state.memory_count()),
    };
    let block = pane_block(state, Pane::Memories, title);
    let inner = inner(area);
    let visible = state.visible_memories();
    let placeholder = if state.search.as_ref().is_some_and(|s| s.hits.is_none()) {
        Some("searching…")
    } else if state.search.is_some() && visible.is_empty() {
        Some("nothing found")
    } else if !state.memories_loaded && state.search.is_none() {
        Some("loading…")
    } else if visible.is_empty() {
        Some("no memories yet: tell me about yourself, or /remember TEXT")
    } else {
        None
    };
    if let Some(text) = placeholder {
        frame.render_widget(Paragraph::new(Span::styled(text, DIM)).wrap(Wrap { trim: true }).block(block), area);
        return;
    }
    let items: Vec<ListItem> = visible
        .iter()
        .map(|(item, score)| {
            let mark = state.marks.get(&item.id).map(|(mark, _)| *mark);
            let used = state.last_used.contains(&item.id);
            let (marker, marker_style) = match mark {
                Some(mark) => (mark_char(mark), mark_style(mark).add_modifier(Modifier::BOLD)),
                None if used => ('*', Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD)),
                None => (' ', Style::default()),
            };
            let text_style = match mark {
                Some(mark) => mark_style(mark),
                None if used => Style::new().fg(Color::Cyan),
                None => Style::default(),
            };
            let id = format!("#{} ", item.id);
            let hang = 2 + id.chars().count();
            let mut spans =
                vec![Span::styled(format!("{marker} "), marker_style), Span::styled(id, DIM), Span::styled(item.text.clone(), text_style)];
            if let Some(score) = score {
                spans.push(Span::styled(format!(" ({score:.2})"), DIM));
            }
            let lines = markdown::wrap(&Para { line: Line::from(spans), hang }, usize::from(inner.width));
            ListItem::new(Text::from(lines))
        })
        .collect();
    let focused = state.focus == Pane::Memories;
    let list = List::new(items).block(block).highlight_style(if focused {
        Style::new().add_modifier(Modifier::REVERSED)
    } else {
        Style::default()
    });
    let mut list_state = ListState::default().with_selected(Some(state.selected));
    frame.render_stateful_widget(list, area, &mut list_state);
}

// ---- adapters ----

/// The adapters pane's lines for `width` columns.
fn adapter_lines(state: &AppState, width: u16) -> Vec<Line<'static>> {
    let mut lines: Vec<Line> = Vec::new();
    for operation in OPERATIONS {
        let value = match &state.bindings {
            None => Span::styled("…", DIM),
            Some(bindings) => {
                let bound: Vec<String> = bindings
                    .iter()
                    .filter(|b| b.operation == operation)
                    .map(|b| if b.scale == 1.0 { b.adapter.clone() } else { format!("{} × {}", b.adapter, b.scale) })
                    .collect();
                if bound.is_empty() {
                    Span::styled("base model", DIM)
                } else {
                    Span::styled(bound.join(", "), Style::new().fg(Color::Green))
                }
            }
        };
        lines.push(Line::from(vec![Span::raw(format!("{operation:<10}")), value]));
    }
    let installed = match &state.installed {
        None => Span::styled("…", DIM),
        Some(Err(error)) => Span::styled(error.clone(), Style::new().fg(Color::Red)),
        Some(Ok(names)) if names.is_empty() => Span::styled(format!("none in {}", state.settings.adapters_dir.display()), DIM),
        Some(Ok(names)) => Span::raw(names.join(", ")),
    };
    lines.push(Line::from(vec![Span::raw(format!("{:<10}", "installed")), installed]));
    let budget = match (state.settings.adapter_slots, &state.installed) {
        (0, _) => Span::styled("no limit (adapters.max_slots)", DIM),
        (slots, Some(Ok(names))) => Span::raw(format!("{} of {slots} slots used", names.len())),
        (slots, _) => Span::raw(format!("{slots} slots")),
    };
    lines.push(Line::from(vec![Span::raw(format!("{:<10}", "budget")), budget]));
    for pending in &state.pending {
        if let Job::Merge { into, progress } = &pending.job {
            lines.push(Line::from(vec![Span::raw(format!("{:<10}", "merging")), Span::raw(merge_gauge(into, progress.as_ref()))]));
        }
    }
    lines.into_iter().flat_map(|line| markdown::wrap(&Para { line, hang: 10 }, usize::from(width))).collect()
}

/// `into  ▰▰▰▰▱▱▱▱▱▱ module 12/30`: a job's progress in text, so that it wraps with the pane.
fn merge_gauge(into: &str, progress: Option<&MergeProgress>) -> String {
    const CELLS: usize = 10;
    let Some(progress) = progress else { return format!("{into}  waiting") };
    let fraction = match progress.stage {
        MergeStage::Loading => 0.0,
        MergeStage::Merging => progress.done as f64 / progress.total.max(1) as f64,
        MergeStage::Installing => 1.0,
    };
    let filled = ((fraction * CELLS as f64).round() as usize).min(CELLS);
    let stage = match progress.stage {
        MergeStage::Loading => format!("loading {}/{}", progress.done, progress.total),
        MergeStage::Merging => format!("module {}/{}", progress.done, progress.total),
        MergeStage::Installing => "installing".into(),
    };
    format!("{into}  {}{} {stage}", "▰".repeat(filled), "▱".repeat(CELLS - filled))
}

fn draw_adapters(frame: &mut Frame, area: Rect, state: &AppState) {
    let block = pane_block(state, Pane::Adapters, "adapters".into());
    let lines = adapter_lines(state, inner(area).width);
    frame.render_widget(Paragraph::new(lines).block(block), area);
}

// ---- image ----

fn draw_image(frame: &mut Frame, area: Rect, state: &AppState) {
    let block = pane_block(state, Pane::Image, "image".into());
    let inner = inner(area);
    frame.render_widget(block, area);
    let Some(view) = &state.image else {
        frame.render_widget(Paragraph::new(Span::styled("no image: /image PATH attaches one", DIM)), inner);
        return;
    };
    let name = view.path.file_name().map_or_else(|| view.path.display().to_string(), |n| n.to_string_lossy().into_owned());
    let waiting = if state.attached.as_ref() == Some(&view.path) { " · for your next question" } else { "" };
    let caption = match &view.status {
        ImageStatus::Decoded(image) => format!("{name} · {}×{}{waiting}", image.width(), image.height()),
        _ => format!("{name}{waiting}"),
    };
    let (caption_area, body) = {
        let [top, rest] = Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(inner);
        (top, rest)
    };
    frame.render_widget(Paragraph::new(Span::styled(caption, Style::new().add_modifier(Modifier::BOLD))), caption_area);
    let message =
        |text: String, style: Style| Paragraph::new(Text::from(markdown::wrap(&Para::plain(text, style), usize::from(body.width))));
    match &view.status {
        ImageStatus::Loading => frame.render_widget(message("decoding…".into(), DIM), body),
        ImageStatus::Off => frame.render_widget(message("image previews are off (ui.images = \"off\")".into(), DIM), body),
        ImageStatus::Failed(error) => {
            frame.render_widget(message(format!("cannot show this image: {error}"), Style::new().fg(Color::Red)), body)
        }
        ImageStatus::Decoded(_) => match (&view.encoded, image_canvas(frame.area(), state)) {
            (Some((size, protocol)), Some(canvas)) if size.width == canvas.width && size.height == canvas.height => {
                frame.render_widget(Image::new(protocol), canvas);
            }
            _ => frame.render_widget(message("resizing…".into(), DIM), body),
        },
    }
}

// ---- input and status ----

fn draw_input(frame: &mut Frame, area: Rect, state: &AppState) {
    let keymap = &state.settings.keymap;
    let hint = |section: Section, action: Action| keymap.keys_for(section, action).into_iter().next().unwrap_or_else(|| "?".into());
    let title = if let Some(id) = state.editing {
        format!("edit memory #{id} · {} saves · {} cancels", hint(Section::Input, Action::Submit), cancel_key(state))
    } else if keymap.modal {
        if state.typing {
            format!(
                "INSERT · {} sends · {} new line · {} normal mode",
                hint(Section::Input, Action::Submit),
                hint(Section::Input, Action::Newline),
                hint(Section::Input, Action::NormalMode)
            )
        } else {
            format!(
                "NORMAL · {} type · {} command · {} help",
                hint(Section::Browse, Action::InsertMode),
                hint(Section::Browse, Action::Command),
                hint(Section::Browse, Action::Help)
            )
        }
    } else if state.typing {
        format!("message · {} sends · {} new line", hint(Section::Input, Action::Submit), hint(Section::Input, Action::Newline))
    } else {
        format!("{} to type · {} help", hint(Section::Browse, Action::InsertMode), hint(Section::Browse, Action::Help))
    };
    let style = if state.typing { FOCUSED } else { DIM };
    let block = Block::default()
        .borders(Borders::ALL)
        .border_type(BorderType::Rounded)
        .border_style(style)
        .title(Span::styled(format!(" {title} "), Style::default()));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    frame.render_widget(&state.input, inner);
}

fn cancel_key(state: &AppState) -> String {
    let keymap = &state.settings.keymap;
    let section = if keymap.modal { Section::Browse } else { Section::Input };
    keymap.keys_for(section, Action::Cancel).into_iter().next().unwrap_or_else(|| "esc".into())
}

fn draw_status(frame: &mut Frame, area: Rect, state: &AppState) {
    if state.loading {
        let text = format!(" loading {} and {}…", state.settings.model, state.settings.embedder);
        frame.render_widget(Paragraph::new(Span::styled(text, Style::new().fg(Color::Yellow))), area);
        return;
    }
    if state.quitting {
        let again = state.settings.keymap.hint(Action::Interrupt).unwrap_or_else(|| "ctrl-c".into());
        let text = format!(" finishing: {}… ({again} again quits now)", state.memory_operations().join(", "));
        frame.render_widget(Paragraph::new(Span::styled(text, Style::new().fg(Color::Black).bg(Color::Yellow))), area);
        return;
    }
    let sep = || Span::styled(" │ ", DIM);
    let mut left = vec![Span::styled(format!(" {}", state.settings.model), Style::new().add_modifier(Modifier::BOLD)), sep()];
    if let Some(daemon) = &state.settings.daemon {
        left.push(Span::styled(daemon.clone(), Style::new().fg(Color::Cyan)));
        left.push(sep());
    }
    left.extend([
        Span::raw(state.active_adapter()),
        sep(),
        Span::raw(match state.tokens_per_second {
            Some(tps) => format!("{tps:.1} tok/s"),
            None => "– tok/s".into(),
        }),
        sep(),
        Span::raw(format!("{} memories", state.memory_count())),
    ]);
    for pending in &state.pending {
        if let Job::Ingest { .. } | Job::Merge { .. } = pending.job {
            left.push(sep());
            left.push(Span::styled(pending.job.describe(), Style::new().fg(Color::Magenta)));
        }
    }
    let mut right: Vec<Span> = Vec::new();
    if let Some(flash) = &state.flash {
        right.push(Span::styled(flash.clone(), Style::new().fg(Color::Yellow)));
        right.push(Span::raw(" "));
    }
    if state.busy() {
        right.push(Span::styled("working…", Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD)));
        right.push(Span::raw(" "));
    }
    let help = state.settings.keymap.hint(Action::Help).unwrap_or_else(|| "f1".into());
    let left_width: usize = left.iter().map(Span::width).sum();
    let help = Span::styled(format!("{help} help "), DIM);
    // The help hint gives way when the line is full.
    if left_width + right.iter().map(Span::width).sum::<usize>() + help.width() <= usize::from(area.width) {
        right.push(help);
    }
    let right_width: u16 = right.iter().map(|s| s.width() as u16).sum();
    let [left_area, right_area] = Layout::horizontal([Constraint::Min(0), Constraint::Length(right_width)]).areas(area);
    frame.render_widget(Paragraph::new(Line::from(left)), left_area);
    frame.render_widget(Paragraph::new(Line::from(right)), right_area);
}

// ---- overlays ----

fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let width = width.min(area.width);
    let height = height.min(area.height);
    Rect { x: area.x + (area.width - width) / 2, y: area.y + (area.height - height) / 2, width, height }
}

fn draw_confirm(frame: &mut Frame, area: Rect, id: u64, text: &str) {
    let popup = centered(area, 60, 6);
    frame.render_widget(Clear, popup);
    let block = Block::default()
        .borders(Borders::ALL)
        .border_type(BorderType::Rounded)
        .border_style(Style::new().fg(Color::Red))
        .title(" forget this memory? ");
    let inner = block.inner(popup);
    let mut lines = markdown::wrap(&Para::plain(format!("#{id} {text}"), Style::default()), usize::from(inner.width));
    lines.truncate(usize::from(inner.height.saturating_sub(1)).max(1));
    lines.push(Line::from(vec![
        Span::styled("y", Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(" forget   "),
        Span::styled("n", Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(" keep"),
    ]));
    frame.render_widget(Paragraph::new(lines).block(block), popup);
}

/// The help overlay's text: every key of the keymap and every command.
pub fn help_lines(state: &AppState) -> Vec<Line<'static>> {
    let keymap = &state.settings.keymap;
    let heading = |text: String| Line::from(Span::styled(text, Style::new().fg(Color::Magenta).add_modifier(Modifier::BOLD)));
    let mut lines = vec![heading(format!("Keys ({} keymap, ui.keymap)", keymap.name))];
    let sections = [
        (Section::Global, "anywhere"),
        (Section::Input, if keymap.modal { "insert mode (typing)" } else { "typing in the input" }),
        (Section::Browse, if keymap.modal { "normal mode" } else { "in the memories, adapters and image panes" }),
    ];
    // A key column; keys longer than it get a line of their own.
    let entry = |lines: &mut Vec<Line<'static>>, keys: String, what: &'static str| {
        if keys.chars().count() < HELP_COLUMN {
            lines.push(Line::from(vec![Span::styled(format!("   {keys:<HELP_COLUMN$}"), FOCUSED), Span::raw(what)]));
        } else {
            lines.push(Line::from(Span::styled(format!("   {keys}"), FOCUSED)));
            lines.push(Line::from(vec![Span::raw(format!("   {:<HELP_COLUMN$}", "")), Span::raw(what)]));
        }
    };
    for (section, title) in sections {
        lines.push(Line::from(Span::styled(format!(" {title}"), Style::new().add_modifier(Modifier::BOLD))));
        for action in Action::ALL {
            let keys = keymap.keys_for(section, action);
            if !keys.is_empty() {
                entry(&mut lines, keys.join(", "), action.describe());
            }
        }
    }
    lines.push(Line::from(Span::styled(" asked to confirm", Style::new().add_modifier(Modifier::BOLD))));
    entry(&mut lines, "y, enter".into(), "yes");
    entry(&mut lines, "n, esc".into(), "no");
    lines.push(Line::default());
    lines.push(heading("Commands".into()));
    for (usage, what) in COMMANDS {
        entry(&mut lines, usage.into(), what);
    }
    lines.push(Line::default());
    lines.push(heading("Memories pane".into()));
    lines.push(Line::from(vec![
        Span::raw("   "),
        Span::styled("+", mark_style(Mark::New)),
        Span::raw(" new  "),
        Span::styled("~", mark_style(Mark::Updated)),
        Span::raw(" updated  "),
        Span::styled("-", Style::new().fg(Color::Red)),
        Span::raw(" deleted  "),
        Span::styled("*", Style::new().fg(Color::Cyan)),
        Span::raw(" used by the last answer"),
    ]));
    lines.push(Line::from(format!(
        "   Below {}×{} one pane is shown at a time: tabs switch with tab / backtab or f2–f5.",
        WIDE_MIN.0, WIDE_MIN.1
    )));
    lines
}

fn draw_help(frame: &mut Frame, area: Rect, state: &AppState, scroll: usize) {
    let width = (area.width * 9 / 10).max(area.width.min(60));
    let height = (area.height * 9 / 10).max(area.height.min(20));
    let popup = centered(area, width, height);
    frame.render_widget(Clear, popup);
    let lines = help_lines(state);
    let block = Block::default()
        .borders(Borders::ALL)
        .border_type(BorderType::Rounded)
        .border_style(FOCUSED)
        .title(" help · esc closes · ↑↓ scroll ");
    let inner = block.inner(popup);
    let wrapped: Vec<Line> =
        lines.into_iter().flat_map(|line| markdown::wrap(&Para { line, hang: HELP_COLUMN + 3 }, usize::from(inner.width))).collect();
    let max = wrapped.len().saturating_sub(usize::from(inner.height));
    let scroll = scroll.min(max) as u16;
    frame.render_widget(Paragraph::new(wrapped).block(block).scroll((scroll, 0)), popup);
}
