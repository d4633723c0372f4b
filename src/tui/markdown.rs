//! Markdown to styled terminal lines (headings, emphasis, inline code, code blocks, lists,
//! quotes, links, rules, simple tables), and word wrapping of styled lines.
//!
//! The renderer produces logical lines ([`Para`]); [`wrap`] breaks them to a width,
//! indenting continuation lines under list items and quotes.

use pulldown_cmark::{CodeBlockKind, Event, HeadingLevel, Options, Parser, Tag, TagEnd};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use unicode_width::UnicodeWidthChar;

/// A logical line and the indent of its continuation lines when wrapped.
#[derive(Debug, Clone, PartialEq)]
pub struct Para {
    pub line: Line<'static>,
    pub hang: usize,
}

impl Para {
    pub fn plain(text: impl Into<String>, style: Style) -> Self {
        Para { line: Line::from(Span::styled(text.into(), style)), hang: 0 }
    }
}

pub const CODE: Style = Style::new().fg(Color::Yellow);
const RULE_WIDTH: usize = 24;

/// Renders `markdown` as lines. Unknown or raw HTML is shown as text.
pub fn render(markdown: &str) -> Vec<Para> {
    let options = Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TASKLISTS | Options::ENABLE_TABLES;
    let mut renderer = Renderer::default();
    for event in Parser::new_ext(markdown, options) {
        renderer.event(event);
    }
    renderer.flush();
    while renderer.out.last().is_some_and(is_blank) {
        renderer.out.pop();
    }
    renderer.out
}

fn is_blank(para: &Para) -> bool {
    para.line.spans.iter().all(|span| span.content.trim().is_empty())
}

#[derive(Default)]
struct Renderer {
    out: Vec<Para>,
    spans: Vec<Span<'static>>,
    styles: Vec<Style>,
    /// Per open list: the next number (ordered) or None (bullets), and its marker width.
    lists: Vec<(Option<u64>, usize)>,
    /// The marker of a list item whose first line is not written yet.
    marker: Option<String>,
    quotes: usize,
    code_block: bool,
    links: Vec<String>,
    heading: Option<HeadingLevel>,
    table_cells: Vec<String>,
    in_table: bool,
}

impl Renderer {
    fn style(&self) -> Style {
        self.styles.iter().fold(Style::default(), |acc, s| acc.patch(*s))
    }

    fn push_style(&mut self, style: Style) {
        self.styles.push(style);
    }

    fn pop_style(&mut self) {
        self.styles.pop();
    }

    /// The prefix of the next line (quote bars, list indentation and a pending marker) and
    /// the continuation indent.
    fn prefix(&mut self) -> (Vec<Span<'static>>, usize) {
        let mut spans = Vec::new();
        let mut width = 0;
        for _ in 0..self.quotes {
            spans.push(Span::styled("│ ", Style::new().fg(Color::DarkGray)));
            width += 2;
        }
        let outer: usize = self.lists.iter().rev().skip(1).map(|(_, w)| w).sum();
        let inner = self.lists.last().map_or(0, |(_, w)| *w);
        match self.marker.take() {
            Some(marker) => {
                spans.push(Span::raw(" ".repeat(outer)));
                let pad = inner.saturating_sub(marker.chars().count());
                spans.push(Span::styled(format!("{marker}{}", " ".repeat(pad)), Style::new().fg(Color::Cyan)));
            }
            None if outer + inner > 0 => spans.push(Span::raw(" ".repeat(outer + inner))),
            None => {}
        }
        width += outer + inner;
        (spans, width)
    }

    /// Ends the current line (if it has content, or a list marker waits).
    fn flush(&mut self) {
        if self.spans.is_empty() && self.marker.is_none() {
            return;
        }
        let (mut line, hang) = self.prefix();
        line.append(&mut self.spans);
        self.out.push(Para { line: Line::from(line), hang });
    }

    fn blank_line(&mut self) {
        if self.out.last().is_some_and(|p| !is_blank(p)) {
            let (prefix, hang) = if self.quotes > 0 {
                let quotes = self.quotes;
                (vec![Span::styled("│ ".repeat(quotes), Style::new().fg(Color::DarkGray))], 0)
            } else {
                (Vec::new(), 0)
            };
            self.out.push(Para { line: Line::from(prefix), hang });
        }
    }

    fn text(&mut self, text: &str) {
        let style = self.style();
        if self.code_block {
            // Code keeps its lines and indentation.
            let mut lines = text.split('\n').peekable();
            while let Some(line) = lines.next() {
                if !line.is_empty() {
                    self.spans.push(Span::styled(line.to_owned(), CODE));
                }
                if lines.peek().is_some() {
                    let (mut prefix, hang) = self.prefix();
                    prefix.push(Span::styled("│ ", Style::new().fg(Color::DarkGray)));
                    prefix.append(&mut self.spans);
                    self.out.push(Para { line: Line::from(prefix), hang: hang + 2 });
                }
            }
        } else if self.in_table {
            if let Some(cell) = self.table_cells.last_mut() {
                cell.push_str(text);
            }
        } else {
            self.spans.push(Span::styled(text.to_owned(), style));
        }
    }

    fn event(&mut self, event: Event<'_>) {
        match event {
            Event::Start(tag) => self.start(tag),
            Event::End(tag) => self.end(tag),
            Event::Text(text) => self.text(&text),
            Event::Code(code) => {
                if self.in_table {
                    self.text(&code);
                } else {
                    self.spans.push(Span::styled(code.to_string(), self.style().patch(CODE)));
                }
            }
            Event::InlineMath(text) | Event::DisplayMath(text) => self.text(&text),
            Event::Html(html) | Event::InlineHtml(html) => self.text(html.trim_end_matches('\n')),
            Event::SoftBreak => self.text(" "),
            Event::HardBreak => self.flush(),
            Event::Rule => {
                self.flush();
                self.blank_line();
                self.out.push(Para::plain("─".repeat(RULE_WIDTH), Style::new().fg(Color::DarkGray)));
            }
            Event::TaskListMarker(done) => self.spans.push(Span::raw(if done { "[x] " } else { "[ ] " })),
            Event::FootnoteReference(name) => self.text(&format!("[{name}]")),
        }
    }

    fn start(&mut self, tag: Tag<'_>) {
        match tag {
            Tag::Paragraph => {
                if self.marker.is_none() {
                    self.blank_line();
                }
            }
            Tag::Heading { level, .. } => {
                self.flush();
                self.blank_line();
                self.heading = Some(level);
                let style = match level {
                    HeadingLevel::H1 => Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED).fg(Color::Magenta),
                    HeadingLevel::H2 => Style::new().add_modifier(Modifier::BOLD).fg(Color::Magenta),
                    _ => Style::new().add_modifier(Modifier::BOLD),
                };
                self.push_style(style);
            }
            Tag::BlockQuote(_) => {
                self.flush();
                self.blank_line();
                self.quotes += 1;
                self.push_style(Style::new().add_modifier(Modifier::ITALIC));
            }
            Tag::CodeBlock(kind) => {
                self.flush();
                if self.marker.is_none() {
                    self.blank_line();
                }
                if let CodeBlockKind::Fenced(lang) = kind {
                    if !lang.is_empty() {
                        let (mut prefix, hang) = self.prefix();
                        prefix.push(Span::styled(format!("┌ {lang}"), Style::new().fg(Color::DarkGray)));
                        self.out.push(Para { line: Line::from(prefix), hang });
                    }
                }
                self.code_block = true;
            }
            Tag::List(start) => {
                self.flush();
                if self.lists.is_empty() {
                    self.blank_line();
                }
                let width = start.map_or(2, |n| format!("{n}. ").len().max(3));
                self.lists.push((start, width));
            }
            Tag::Item => {
                self.flush();
                let marker = match self.lists.last_mut() {
                    Some((Some(n), _)) => {
                        let marker = format!("{n}.");
                        *n += 1;
                        marker
                    }
                    _ => "•".to_owned(),
                };
                self.marker = Some(marker);
            }
            Tag::Emphasis => self.push_style(Style::new().add_modifier(Modifier::ITALIC)),
            Tag::Strong => self.push_style(Style::new().add_modifier(Modifier::BOLD)),
            Tag::Strikethrough => self.push_style(Style::new().add_modifier(Modifier::CROSSED_OUT)),
            Tag::Link { dest_url, .. } => {
                self.links.push(dest_url.to_string());
                self.push_style(Style::new().fg(Color::Blue).add_modifier(Modifier::UNDERLINED));
            }
            Tag::Image { dest_url, .. } => {
                self.links.push(dest_url.to_string());
                self.push_style(Style::new().fg(Color::Blue));
                self.spans.push(Span::styled("[image: ", Style::new().fg(Color::Blue)));
            }
            Tag::Table(_) => {
                self.flush();
                self.blank_line();
                self.in_table = true;
            }
            Tag::TableHead | Tag::TableRow => self.table_cells.clear(),
            Tag::TableCell => self.table_cells.push(String::new()),
            Tag::HtmlBlock
            | Tag::FootnoteDefinition(_)
            | Tag::DefinitionList
            | Tag::DefinitionListTitle
            | Tag::DefinitionListDefinition
            | Tag::MetadataBlock(_)
            | Tag::Superscript
            | Tag::Subscript => {}
        }
    }

    fn end(&mut self, tag: TagEnd) {
        match tag {
            TagEnd::Paragraph => self.flush(),
            TagEnd::Heading(_) => {
                self.flush();
                self.pop_style();
                self.heading = None;
            }
            TagEnd::BlockQuote(_) => {
                self.flush();
                self.pop_style();
                self.quotes = self.quotes.saturating_sub(1);
                self.blank_line();
            }
            TagEnd::CodeBlock => {
                if !self.spans.is_empty() {
                    let (mut prefix, hang) = self.prefix();
                    prefix.push(Span::styled("│ ", Style::new().fg(Color::DarkGray)));
                    prefix.append(&mut self.spans);
                    self.out.push(Para { line: Line::from(prefix), hang: hang + 2 });
                }
                self.code_block = false;
                self.blank_line();
            }
            TagEnd::List(_) => {
                self.flush();
                self.lists.pop();
                if self.lists.is_empty() {
                    self.blank_line();
                }
            }
            TagEnd::Item => self.flush(),
            TagEnd::Emphasis | TagEnd::Strong | TagEnd::Strikethrough => self.pop_style(),
            TagEnd::Link => {
                self.pop_style();
                if let Some(url) = self.links.pop() {
                    let text: String = self.spans.iter().rev().take(4).map(|s| s.content.as_ref()).collect();
                    if !url.is_empty() && !text.contains(url.as_str()) {
                        self.spans.push(Span::styled(format!(" ({url})"), Style::new().fg(Color::DarkGray)));
                    }
                }
            }
            TagEnd::Image => {
                self.pop_style();
                let url = self.links.pop().unwrap_or_default();
                self.spans.push(Span::styled(format!(" {url}]"), Style::new().fg(Color::Blue)));
            }
            TagEnd::Table => {
                self.in_table = false;
                self.blank_line();
            }
            TagEnd::TableHead | TagEnd::TableRow => {
                let head = matches!(tag, TagEnd::TableHead);
                let style = if head { Style::new().add_modifier(Modifier::BOLD) } else { Style::default() };
                let row = self.table_cells.join(" │ ");
                self.table_cells.clear();
                self.out.push(Para::plain(row, style));
            }
            _ => {}
        }
    }
}

/// Breaks `para` into lines of at most `width` columns, at spaces where possible (a word
/// longer than a line is split). Continuation lines start with `para.hang` spaces.
pub fn wrap(para: &Para, width: usize) -> Vec<Line<'static>> {
    let width = width.max(1);
    let cells: Vec<(char, Style)> =
        para.line.spans.iter().flat_map(|span| span.content.chars().map(move |c| (c, span.style))).filter(|(c, _)| *c != '\n').collect();
    let total: usize = cells.iter().map(|(c, _)| char_width(*c)).sum();
    if total <= width {
        return vec![para.line.clone()];
    }
    let hang = if para.hang * 2 > width { 0 } else { para.hang };
    let mut lines: Vec<Vec<(char, Style)>> = Vec::new();
    let mut current: Vec<(char, Style)> = Vec::new();
    let mut used = 0;
    let mut at_line_start = true;
    let mut i = 0;
    while i < cells.len() {
        // The next token: a run of spaces or a run of non-spaces.
        let space = cells[i].0 == ' ';
        let end = cells[i..].iter().position(|(c, _)| (*c == ' ') != space).map_or(cells.len(), |n| i + n);
        let token = &cells[i..end];
        let token_width: usize = token.iter().map(|(c, _)| char_width(*c)).sum();
        i = end;
        if space {
            // Spaces at a line break are dropped, leading indentation kept.
            if at_line_start && !lines.is_empty() {
                continue;
            }
            if used + token_width <= width {
                current.extend_from_slice(token);
                used += token_width;
            } else {
                lines.push(std::mem::take(&mut current));
                current = vec![(' ', Style::default()); hang];
                used = hang;
                at_line_start = true;
            }
            continue;
        }
        if used + token_width > width && !at_line_start {
            // Trailing spaces of the finished line go.
            while current.last().is_some_and(|(c, _)| *c == ' ') {
                current.pop();
            }
            lines.push(std::mem::take(&mut current));
            current = vec![(' ', Style::default()); hang];
            used = hang;
        }
        for &(c, style) in token {
            let w = char_width(c);
            if used + w > width && used > hang {
                lines.push(std::mem::take(&mut current));
                current = vec![(' ', Style::default()); hang];
                used = hang;
            }
            current.push((c, style));
            used += w;
        }
        at_line_start = false;
    }
    while current.last().is_some_and(|(c, _)| *c == ' ') && current.len() > hang {
        current.pop();
    }
    if !current.is_empty() {
        lines.push(current);
    }
    lines.into_iter().map(cells_to_line).collect()
}

fn char_width(c: char) -> usize {
    c.width().unwrap_or(0)
}

fn cells_to_line(cells: Vec<(char, Style)>) -> Line<'static> {
    let mut spans: Vec<Span<'static>> = Vec::new();
    let mut text = String::new();
    let mut style = None;
    for (c, s) in cells {
        if style.is_some_and(|current| current != s) {
            spans.push(Span::styled(std::mem::take(&mut text), style.unwrap_or_default()));
        }
        style = Some(s);
        text.push(c);
    }
    if !text.is_empty() {
        spans.push(Span::styled(text, style.unwrap_or_default()));
    }
    Line::from(spans)
}

/// The plain text of a line.
#[cfg(test)]
pub fn line_text(line: &Line<'_>) -> String {
    line.spans.iter().map(|s| s.content.as_ref()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(paras: &[Para]) -> Vec<String> {
        paras.iter().map(|p| line_text(&p.line)).collect()
    }

    #[test]
    fn headings_emphasis_code_and_lists() {
        let paras =
            render("# Title\n\nSome **bold** and *italic* and `code`.\n\n- one\n- two\n  1. nested\n\n```rust\nfn main() {}\n```\n");
        assert_eq!(
            texts(&paras),
            ["Title", "", "Some bold and italic and code.", "", "• one", "• two", "  1. nested", "", "┌ rust", "│ fn main() {}"]
        );
        let title = &paras[0].line.spans[0];
        assert!(title.style.add_modifier.contains(Modifier::BOLD));
        let body = &paras[2].line.spans;
        let bold = body.iter().find(|s| s.content == "bold").unwrap();
        assert!(bold.style.add_modifier.contains(Modifier::BOLD));
        let italic = body.iter().find(|s| s.content == "italic").unwrap();
        assert!(italic.style.add_modifier.contains(Modifier::ITALIC));
        let code = body.iter().find(|s| s.content == "code").unwrap();
        assert_eq!(code.style.fg, Some(Color::Yellow));
    }

    #[test]
    fn quotes_links_and_rules() {
        let paras = render("> quoted\n\nsee [docs](https://x.org)\n\n---\n");
        assert_eq!(texts(&paras), ["│ quoted", "", "see docs (https://x.org)", "", "─".repeat(RULE_WIDTH).as_str()]);
    }

    #[test]
    fn wrapping_breaks_at_spaces_and_hangs_list_items() {
        let para = Para { line: Line::from("• alpha beta gamma delta"), hang: 2 };
        let lines: Vec<String> = wrap(&para, 12).iter().map(line_text).collect();
        assert_eq!(lines, ["• alpha beta", "  gamma", "  delta"]);
        let long = Para { line: Line::from("abcdefghijkl"), hang: 0 };
        let lines: Vec<String> = wrap(&long, 5).iter().map(line_text).collect();
        assert_eq!(lines, ["abcde", "fghij", "kl"]);
        for line in wrap(&Para::plain("x ".repeat(50), Style::default()), 7) {
            assert!(line.width() <= 7);
        }
    }
}
