//! Tolerant parsing of the JSON that small local models write.
//!
//! The assistant prefills the model's answer with the start of a JSON document, so what reaches this
//! module is usually JSON that is almost right: cut off at the token limit, wrapped in a code fence or
//! in prose, written with Python or JavaScript habits. The scanner here repairs what has one plausible
//! reading and reports every change, so that the caller can log it; anything else is an error that
//! the caller logs before skipping the output.
//!
//! The scanner keeps its own stack instead of recursing, so no input can exhaust the thread's stack,
//! and it refuses nesting deeper than [`MAX_DEPTH`], so no value it builds is deep enough to make
//! dropping it recurse far.

use std::borrow::Cow;
use std::collections::HashSet;

use serde_json::{Map, Number, Value};

/// Outputs larger than this are not answers to our prompts; refusing them bounds the work per call.
pub const MAX_INPUT_BYTES: usize = 64 * 1024;
/// Our prompts never ask for more than a few levels, and the limit keeps every built value shallow.
pub const MAX_DEPTH: usize = 64;
/// Each candidate start costs a scan of the rest of the text, so prose full of brackets must not make
/// parsing quadratic.
const MAX_CANDIDATES: usize = 16;
const FENCE: &str = "```";
/// Long enough to recognise an item in the log, short enough to keep the log line readable.
const SNIPPET_CHARS: usize = 80;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("the model output is {size} bytes, more than the {limit} this parser reads")]
    TooLarge { size: usize, limit: usize },
    #[error("the model output contains no JSON object or list")]
    NoJson,
    #[error("the JSON is nested deeper than {limit} levels")]
    TooDeep { limit: usize },
    #[error("the JSON cannot be repaired: {problem} at byte {offset}")]
    Unrepairable { problem: String, offset: usize },
    #[error("expected {expected}, found {found}")]
    WrongShape { expected: String, found: String },
}

/// What the repair had to change, for the log (e.g. "removed a code fence", "closed 2 brackets",
/// "closed an unterminated string", "quoted a key", "dropped text after the JSON").
pub type Repairs = Vec<String>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repaired {
    pub value: Value,
    pub repairs: Repairs,
    /// True when the input ended inside the JSON (brackets or a string had to be closed).
    pub truncated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed<T> {
    pub items: Vec<T>,
    /// Items that could not be interpreted, each with a one-line reason.
    pub skipped: Vec<String>,
    pub repairs: Repairs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Event {
    Add,
    Update,
    Delete,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProposedOp {
    pub id: Option<String>,
    pub text: Option<String>,
    pub event: Event,
    pub old_memory: Option<String>,
}

/// The first JSON object or list in `text`, repaired.
pub fn repair_json(text: &str) -> Result<Repaired, ParseError> {
    check_size(text)?;
    let detailed = first_repair(text)?;
    log_repairs("JSON", &detailed.repaired.repairs, 0);
    Ok(detailed.repaired)
}

/// Facts from `{"facts": ["…", …]}`.
///
/// Also accepted: a bare list, and an object with exactly one list among its values. Items may be
/// strings or objects with a "fact", "text" or "memory" string. Facts are trimmed; empty ones and
/// case-insensitive repeats are dropped silently, since models repeat themselves and that is not worth
/// a log line. A last item that the output ended inside is dropped and reported in `skipped`.
pub fn parse_facts(text: &str) -> Result<Parsed<String>, ParseError> {
    check_size(text)?;
    let (mut detailed, path) = pick_candidate(text, locate_facts, "an object with a \"facts\" list")?;
    let path = unwrap_repeated_prefill(&mut detailed, path, locate_facts);
    let parsed = facts_at(detailed, &path)?;
    log_repairs("facts", &parsed.repairs, parsed.skipped.len());
    Ok(parsed)
}

/// Memory operations from `{"memory": [{"id": "0", "text": "…", "event": "ADD|UPDATE|DELETE|NONE", "old_memory": "…"}, …]}`.
///
/// Also accepted: the keys "memories" and "operations", a bare list, a single operation object, and an
/// object with exactly one list among its values. Ids are not checked against anything here.
pub fn parse_memory_ops(text: &str) -> Result<Parsed<ProposedOp>, ParseError> {
    check_size(text)?;
    let (mut detailed, path) = pick_candidate(text, locate_ops, "an object with a \"memory\" list of operations")?;
    let path = unwrap_repeated_prefill(&mut detailed, path, locate_ops);
    let parsed = ops_at(detailed, &path)?;
    log_repairs("memory operations", &parsed.repairs, parsed.skipped.len());
    Ok(parsed)
}

fn log_repairs(what: &str, repairs: &Repairs, skipped: usize) {
    if !repairs.is_empty() || skipped > 0 {
        tracing::debug!(repairs = ?repairs, skipped, "repaired model output while reading {what}");
    }
}

fn check_size(text: &str) -> Result<(), ParseError> {
    if text.len() > MAX_INPUT_BYTES {
        return Err(ParseError::TooLarge { size: text.len(), limit: MAX_INPUT_BYTES });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Finding the JSON in the text
// ---------------------------------------------------------------------------------------------

/// One step from a value to a child, so the parsers can tell whether the output ended inside a given item.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PathStep {
    Key(String),
    Index(usize),
}

/// A repaired value plus what only this module needs to know about it.
#[derive(Debug)]
struct Detailed {
    repaired: Repaired,
    /// The path to the deepest value that the input ended inside (every value on the path is
    /// unfinished too); `None` when the JSON was complete.
    incomplete: Option<Vec<PathStep>>,
    /// Where the value ended in the text, or `None` when it ran to the end (or was unescaped, so
    /// that its offsets are not the text's).
    end: Option<usize>,
}

/// Byte offsets where a JSON object or list may start.
fn candidate_starts(text: &str) -> impl Iterator<Item = usize> + '_ {
    text.char_indices().filter(|&(_, c)| c == '{' || c == '[').map(|(at, _)| at)
}

/// The first candidate that yields a value, without the size check (the tests use that to feed it
/// more than the size limit).
fn first_repair(text: &str) -> Result<Detailed, ParseError> {
    let mut first_error = None;
    for start in candidate_starts(text).take(MAX_CANDIDATES) {
        match repair_at(text, start) {
            Ok(detailed) => return Ok(detailed),
            // Later candidates start inside the same deep nest; trying them would only find a
            // suffix of it, which is no better an answer.
            Err(error @ ParseError::TooDeep { .. }) => return Err(error),
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    Err(first_error.unwrap_or(ParseError::NoJson))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fit {
    /// The value has the key we asked for.
    Exact,
    /// The value is a shape we accept, but prose later in the text might still hold the exact one.
    Fallback,
}

type Locate = fn(&Value) -> Option<(Fit, Vec<PathStep>)>;

/// The first candidate with the expected key (at its top or nested inside it), else the first with an
/// acceptable shape. Prose before the JSON sometimes holds brackets of its own ("Note [1]: …"), so the
/// first value is not always the answer.
fn pick_candidate(text: &str, locate: Locate, expected: &str) -> Result<(Detailed, Vec<PathStep>), ParseError> {
    let mut first_error = None;
    let mut fallback = None;
    let mut unfit_found = None;
    // Starts inside a value already read are part of it: the search below covers them without
    // reading the rest of the text again for each.
    let mut resume_at = 0;
    let mut attempts = 0;
    for start in candidate_starts(text) {
        if start < resume_at {
            continue;
        }
        if attempts == MAX_CANDIDATES {
            break;
        }
        attempts += 1;
        let detailed = match repair_at(text, start) {
            Ok(detailed) => detailed,
            Err(error @ ParseError::TooDeep { .. }) => return Err(error),
            Err(error) => {
                first_error.get_or_insert(error);
                continue;
            }
        };
        let end = detailed.end;
        match locate(&detailed.repaired.value) {
            Some((Fit::Exact, path)) => return Ok((detailed, path)),
            fit => {
                if let Some(path) = nested_exact(&detailed.repaired.value, locate) {
                    return Ok((detailed, path));
                }
                match fit {
                    Some((_, path)) => {
                        if fallback.is_none() {
                            fallback = Some((detailed, path));
                        }
                    }
                    None => {
                        if unfit_found.is_none() {
                            unfit_found = Some(describe(&detailed.repaired.value));
                        }
                    }
                }
            }
        }
        match end {
            Some(end) => resume_at = end,
            None => break,
        }
    }
    if let Some(found) = fallback {
        return Ok(found);
    }
    if let Some(found) = unfit_found {
        return Err(ParseError::WrongShape { expected: expected.to_owned(), found });
    }
    Err(first_error.unwrap_or(ParseError::NoJson))
}

/// The shallowest value below the top of `root` that has the expected key, found breadth first
/// without recursing.
fn nested_exact(root: &Value, locate: Locate) -> Option<Vec<PathStep>> {
    let mut queue = std::collections::VecDeque::from([(root, Vec::new())]);
    while let Some((value, path)) = queue.pop_front() {
        if !path.is_empty() {
            if let Some((Fit::Exact, inner)) = locate(value) {
                return Some(path.into_iter().chain(inner).collect());
            }
        }
        let child_path = |step: PathStep| {
            let mut child = path.clone();
            child.push(step);
            child
        };
        match value {
            Value::Array(items) => {
                queue.extend(
                    items
                        .iter()
                        .enumerate()
                        .filter(|(_, item)| is_container(item))
                        .map(|(index, item)| (item, child_path(PathStep::Index(index)))),
                );
            }
            Value::Object(map) => {
                queue.extend(
                    map.iter().filter(|(_, item)| is_container(item)).map(|(key, item)| (item, child_path(PathStep::Key(key.clone())))),
                );
            }
            _ => {}
        }
    }
    None
}

fn is_container(value: &Value) -> bool {
    value.is_array() || value.is_object()
}

/// Repairs the JSON value that starts at `start`, which holds `{` or `[`.
fn repair_at(text: &str, start: usize) -> Result<Detailed, ParseError> {
    let (before, candidate) = text.split_at_checked(start).unwrap_or((text, ""));
    let mut fixes = FixLog::default();
    note_text_before(before, &mut fixes);

    // Fast path: most outputs are valid JSON, perhaps with text around it.
    let mut stream = serde_json::Deserializer::from_str(candidate).into_iter::<Value>();
    if let Some(Ok(value)) = stream.next() {
        if nesting_depth(&value) > MAX_DEPTH {
            return Err(ParseError::TooDeep { limit: MAX_DEPTH });
        }
        let consumed = stream.byte_offset();
        note_text_after(candidate.get(consumed..).unwrap_or_default(), &mut fixes);
        return Ok(Detailed {
            repaired: Repaired { value, repairs: fixes.render(), truncated: false },
            incomplete: None,
            end: Some(start + consumed),
        });
    }

    let escaped = looks_escaped(candidate);
    let scan_text: Cow<'_, str> = if escaped {
        fixes.add(Fix::EscapedJson);
        Cow::Owned(unescape_once(candidate))
    } else {
        Cow::Borrowed(candidate)
    };
    let outcome = match Scanner::new(&scan_text, false, fixes.clone()).run() {
        Ok(outcome) => outcome,
        Err(failure) => {
            let Failure { error, checkpoint } = failure;
            let (ParseError::Unrepairable { problem, offset }, Some(checkpoint)) = (&error, checkpoint) else {
                return Err(shift_offset(error, start));
            };
            // The JSON up to the last complete item is still worth having: cut the text there and
            // read it again, which closes whatever was open at that point.
            let kept = scan_text.get(..checkpoint).unwrap_or_default();
            let mut outcome = match Scanner::new(kept, true, fixes).run() {
                Ok(outcome) => outcome,
                Err(_) => return Err(shift_offset(error, start)),
            };
            outcome.fixes.note(format!(
                "dropped the JSON from byte {} on, which could not be repaired ({problem} at byte {})",
                start + checkpoint,
                start + offset
            ));
            outcome
        }
    };
    let Outcome { value, consumed, incomplete, mut fixes } = outcome;
    if let Some(consumed) = consumed {
        note_text_after(scan_text.get(consumed..).unwrap_or_default(), &mut fixes);
    }
    Ok(Detailed {
        repaired: Repaired { value, repairs: fixes.render(), truncated: consumed.is_none() },
        incomplete,
        end: consumed.filter(|_| !escaped).map(|consumed| start + consumed),
    })
}

fn shift_offset(error: ParseError, start: usize) -> ParseError {
    match error {
        ParseError::Unrepairable { problem, offset } => ParseError::Unrepairable { problem, offset: offset + start },
        other => other,
    }
}

fn note_text_before(before: &str, fixes: &mut FixLog) {
    let mut prose = String::new();
    let mut rest = before;
    while let Some((head, tail)) = rest.split_once(FENCE) {
        fixes.add(Fix::CodeFence);
        prose.push_str(head);
        // The fence's language tag ("json") is part of the fence, not prose.
        rest = tail.trim_start_matches(|c: char| c.is_alphanumeric());
    }
    prose.push_str(rest);
    if !prose.trim().is_empty() {
        fixes.add(Fix::TextBefore);
    }
}

fn note_text_after(after: &str, fixes: &mut FixLog) {
    let after = after.trim_start();
    let after = match after.strip_prefix(FENCE) {
        Some(rest) => {
            fixes.add(Fix::CodeFence);
            rest
        }
        None => after,
    };
    if !after.trim().is_empty() {
        fixes.add(Fix::TextAfter);
    }
}

/// Models sometimes write the JSON as the body of a JSON string (`{\"facts\": …`); such text needs
/// one round of unescaping before it is JSON at all.
fn looks_escaped(candidate: &str) -> bool {
    let mut rest = candidate.get(1..).unwrap_or_default();
    loop {
        rest = rest.trim_start();
        match rest.strip_prefix("\\n").or_else(|| rest.strip_prefix("\\r")).or_else(|| rest.strip_prefix("\\t")) {
            Some(after) => rest = after,
            None => return rest.starts_with("\\\""),
        }
    }
}

fn unescape_once(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let replacement = match chars.peek() {
            Some('"') => '"',
            Some('\\') => '\\',
            Some('/') => '/',
            Some('n') => '\n',
            Some('r') => '\r',
            Some('t') => '\t',
            // Left for the JSON parser, which reads the same escape the same way.
            _ => {
                out.push('\\');
                continue;
            }
        };
        chars.next();
        out.push(replacement);
    }
    out
}

/// Counts nested containers without recursing, for values that serde_json built.
fn nesting_depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut pending = vec![(value, 1)];
    while let Some((value, depth)) = pending.pop() {
        match value {
            Value::Array(items) => {
                deepest = deepest.max(depth);
                pending.extend(items.iter().map(|item| (item, depth + 1)));
            }
            Value::Object(map) => {
                deepest = deepest.max(depth);
                pending.extend(map.values().map(|item| (item, depth + 1)));
            }
            _ => {}
        }
    }
    deepest
}

// ---------------------------------------------------------------------------------------------
// The record of repairs
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fix {
    CodeFence,
    TextBefore,
    TextAfter,
    EscapedJson,
    ClosedBrackets,
    UnterminatedString,
    QuotedKey,
    QuotedBareValue,
    SingleQuotes,
    SmartQuotes,
    TrailingComma,
    ExtraComma,
    MissingComma,
    MissingColon,
    ExtraColon,
    ForeignLiteral,
    NonFiniteNumber,
    MalformedNumber,
    MismatchedCloser,
    KeyWithoutValue,
    InvalidEscape,
    StrayBackslash,
    ControlCharacter,
    StrayCharacter,
    Comment,
}

impl Fix {
    fn describe(self, count: usize) -> String {
        let counted = |one: &str, many: &str| if count == 1 { one.to_owned() } else { many.replace("{n}", &count.to_string()) };
        match self {
            Fix::CodeFence => "removed a code fence".to_owned(),
            Fix::TextBefore => "dropped text before the JSON".to_owned(),
            Fix::TextAfter => "dropped text after the JSON".to_owned(),
            Fix::EscapedJson => "unescaped JSON that was written as the inside of a string".to_owned(),
            Fix::ClosedBrackets => counted("closed 1 bracket", "closed {n} brackets"),
            Fix::UnterminatedString => "closed an unterminated string".to_owned(),
            Fix::QuotedKey => counted("quoted a key", "quoted {n} keys"),
            Fix::QuotedBareValue => counted("quoted a bare value", "quoted {n} bare values"),
            Fix::SingleQuotes => {
                counted("turned a single-quoted string into a JSON string", "turned {n} single-quoted strings into JSON strings")
            }
            Fix::SmartQuotes => counted("replaced smart quotes around a string", "replaced smart quotes around {n} strings"),
            Fix::TrailingComma => counted("removed a trailing comma", "removed {n} trailing commas"),
            Fix::ExtraComma => counted("removed an extra comma", "removed {n} extra commas"),
            Fix::MissingComma => counted("inserted a missing comma", "inserted {n} missing commas"),
            Fix::MissingColon => counted("inserted a missing colon", "inserted {n} missing colons"),
            Fix::ExtraColon => counted("removed an extra colon", "removed {n} extra colons"),
            Fix::ForeignLiteral => counted(
                "converted a Python or JavaScript literal (True, False, None, undefined)",
                "converted {n} Python or JavaScript literals (True, False, None, undefined)",
            ),
            Fix::NonFiniteNumber => counted("replaced NaN or Infinity with null", "replaced {n} NaN or Infinity values with null"),
            Fix::MalformedNumber => counted("rewrote a malformed number", "rewrote {n} malformed numbers"),
            Fix::MismatchedCloser => counted("replaced a mismatched closing bracket", "replaced {n} mismatched closing brackets"),
            Fix::KeyWithoutValue => counted("dropped a key without a value", "dropped {n} keys without a value"),
            Fix::InvalidEscape => counted("fixed an invalid escape", "fixed {n} invalid escapes"),
            Fix::StrayBackslash => counted("removed a stray backslash", "removed {n} stray backslashes"),
            Fix::ControlCharacter => counted("removed a stray control character", "removed {n} stray control characters"),
            Fix::StrayCharacter => counted("dropped a stray character", "dropped {n} stray characters"),
            Fix::Comment => counted("removed a comment", "removed {n} comments"),
        }
    }
}

#[derive(Debug, Clone)]
enum LogEntry {
    Counted(Fix, usize),
    Note(String),
}

/// Repairs in the order they were first needed, each kind once with a count, so a badly broken output
/// gives a short log line rather than one entry per comma.
#[derive(Debug, Clone, Default)]
struct FixLog {
    entries: Vec<LogEntry>,
}

impl FixLog {
    fn add(&mut self, fix: Fix) {
        self.add_many(fix, 1);
    }

    fn add_many(&mut self, fix: Fix, count: usize) {
        if count == 0 {
            return;
        }
        for entry in &mut self.entries {
            if let LogEntry::Counted(seen, seen_count) = entry {
                if *seen == fix {
                    *seen_count += count;
                    return;
                }
            }
        }
        self.entries.push(LogEntry::Counted(fix, count));
    }

    fn note(&mut self, note: String) {
        self.entries.push(LogEntry::Note(note));
    }

    fn render(&self) -> Repairs {
        self.entries
            .iter()
            .map(|entry| match entry {
                LogEntry::Counted(fix, count) => fix.describe(*count),
                LogEntry::Note(note) => note.clone(),
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The tolerant scanner
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bracket {
    Curly,
    Square,
}

/// What the innermost container is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Just after the opening bracket: an item (a key in an object) or the closing bracket.
    First,
    /// After a comma: an item (a key in an object), or a closing bracket that makes the comma a trailing one.
    AfterComma,
    /// After an item: a comma or the closing bracket.
    CommaOrClose,
    /// Object only: after a key.
    Colon,
    /// Object only: after a colon.
    Value,
}

#[derive(Debug)]
enum Container {
    List(Vec<Value>),
    Object { map: Map<String, Value>, key: Option<String> },
}

impl Container {
    fn bracket(&self) -> Bracket {
        match self {
            Container::List(_) => Bracket::Square,
            Container::Object { .. } => Bracket::Curly,
        }
    }

    fn into_value(self) -> Value {
        match self {
            Container::List(items) => Value::Array(items),
            Container::Object { map, .. } => Value::Object(map),
        }
    }
}

#[derive(Debug)]
struct Frame {
    container: Container,
    expect: Expect,
    /// Where this container goes in its parent; `None` for the outermost one.
    step_in_parent: Option<PathStep>,
}

#[derive(Debug)]
enum Token {
    Open(Bracket),
    Close(Bracket),
    Comma,
    Colon,
    /// `complete` is false when the input ended before the closing quote.
    Text {
        text: String,
        complete: bool,
    },
    /// `value` is `None` when `raw` cannot be read as a number at all.
    Number {
        raw: String,
        value: Option<Value>,
        complete: bool,
    },
    /// An unquoted word: a key, a literal such as `true`, or (after a colon) a bare value.
    Word {
        text: String,
        complete: bool,
    },
    /// A character, or a run of number punctuation without digits, that has no place in JSON.
    Stray,
    End,
}

#[derive(Debug)]
struct Failure {
    error: ParseError,
    /// The end of the last complete item, where the JSON can be cut to keep what came before.
    checkpoint: Option<usize>,
}

#[derive(Debug)]
struct Outcome {
    value: Value,
    /// Where the value ended, or `None` when the input ended inside it.
    consumed: Option<usize>,
    incomplete: Option<Vec<PathStep>>,
    fixes: FixLog,
}

struct Scanner<'t> {
    text: &'t str,
    pos: usize,
    /// True when `text` was cut just after a complete item, so a token that reaches the end is whole.
    cut_at_checkpoint: bool,
    fixes: FixLog,
    stack: Vec<Frame>,
    checkpoint: Option<usize>,
    /// Where the last scalar went if the input ended inside it.
    incomplete_scalar: Option<PathStep>,
}

impl<'t> Scanner<'t> {
    fn new(text: &'t str, cut_at_checkpoint: bool, fixes: FixLog) -> Self {
        Scanner { text, pos: 0, cut_at_checkpoint, fixes, stack: Vec::new(), checkpoint: None, incomplete_scalar: None }
    }

    fn run(mut self) -> Result<Outcome, Failure> {
        loop {
            let allow_bare_value = self.expecting() == Some(Expect::Value);
            let token_start = self.pos;
            let token = self.next_token(allow_bare_value);
            if self.stack.is_empty() && !matches!(token, Token::Open(_)) {
                // Candidates start at a bracket, so this only happens if that invariant breaks.
                return Err(self.failure("no opening bracket", token_start));
            }
            match token {
                Token::End => return Ok(self.close_at_end()),
                Token::Open(bracket) => self.open(bracket, token_start)?,
                Token::Close(bracket) => {
                    if let Some(value) = self.close(bracket) {
                        return Ok(Outcome { value, consumed: Some(self.pos), incomplete: None, fixes: self.fixes });
                    }
                }
                Token::Comma => self.comma(),
                Token::Colon => self.colon(token_start)?,
                Token::Text { text, complete } => {
                    if self.at_key_position() {
                        self.take_key(text);
                    } else {
                        self.scalar(Value::String(text), complete, token_start, "a string")?;
                    }
                }
                Token::Number { raw, value, complete } => {
                    if self.at_key_position() {
                        self.fixes.add(Fix::QuotedKey);
                        self.take_key(raw);
                    } else {
                        let Some(value) = value else {
                            return Err(self.failure(&format!("a malformed number {}", snippet(&raw)), token_start));
                        };
                        self.scalar(value, complete, token_start, "a number")?;
                    }
                }
                Token::Word { text, complete } => self.word(text, complete, token_start)?,
                // Punctuation that JSON has no use for (`;`, `@`, a lone `-`, "...") carries no data;
                // dropping it loses less than cutting the JSON there.
                Token::Stray => self.fixes.add(Fix::StrayCharacter),
            }
        }
    }

    fn failure(&self, problem: &str, at: usize) -> Failure {
        Failure { error: ParseError::Unrepairable { problem: problem.to_owned(), offset: at }, checkpoint: self.checkpoint }
    }

    fn expecting(&self) -> Option<Expect> {
        self.stack.last().map(|frame| frame.expect)
    }

    fn at_key_position(&self) -> bool {
        self.stack.last().is_some_and(|frame| {
            matches!(frame.container, Container::Object { .. })
                && matches!(frame.expect, Expect::First | Expect::AfterComma | Expect::CommaOrClose)
        })
    }

    fn take_key(&mut self, key: String) {
        let Some(frame) = self.stack.last_mut() else { return };
        if frame.expect == Expect::CommaOrClose {
            self.fixes.add(Fix::MissingComma);
        }
        if let Container::Object { key: slot, .. } = &mut frame.container {
            *slot = Some(key);
        }
        frame.expect = Expect::Colon;
    }

    /// Checks that a value may come next in the innermost container, repairing a missing comma or
    /// colon, and says where the value will go.
    fn slot(&mut self, at: usize, what: &str) -> Result<Option<PathStep>, Failure> {
        let checkpoint = self.checkpoint;
        let Some(frame) = self.stack.last_mut() else { return Ok(None) };
        let step = match (&frame.container, frame.expect) {
            (Container::List(items), Expect::First | Expect::AfterComma) => Some(PathStep::Index(items.len())),
            (Container::List(items), Expect::CommaOrClose) => {
                self.fixes.add(Fix::MissingComma);
                Some(PathStep::Index(items.len()))
            }
            (Container::Object { key: Some(key), .. }, Expect::Value) => Some(PathStep::Key(key.clone())),
            (Container::Object { key: Some(key), .. }, Expect::Colon) => {
                self.fixes.add(Fix::MissingColon);
                Some(PathStep::Key(key.clone()))
            }
            _ => None,
        };
        match step {
            Some(step) => {
                frame.expect = match frame.expect {
                    Expect::Colon => Expect::Value,
                    other => other,
                };
                Ok(Some(step))
            }
            None => Err(Failure {
                error: ParseError::Unrepairable { problem: format!("{what} where a key was expected"), offset: at },
                checkpoint,
            }),
        }
    }

    /// Puts a finished value where [`Scanner::slot`] made room for it.
    fn place(&mut self, value: Value) {
        let Some(frame) = self.stack.last_mut() else { return };
        match &mut frame.container {
            Container::List(items) => items.push(value),
            Container::Object { map, key } => {
                if let Some(key) = key.take() {
                    map.insert(key, value);
                }
            }
        }
        frame.expect = Expect::CommaOrClose;
    }

    fn scalar(&mut self, value: Value, complete: bool, at: usize, what: &str) -> Result<(), Failure> {
        let step = self.slot(at, what)?;
        self.place(value);
        if complete {
            self.checkpoint = Some(self.pos);
        } else {
            self.incomplete_scalar = step;
        }
        Ok(())
    }

    fn word(&mut self, text: String, complete: bool, at: usize) -> Result<(), Failure> {
        if self.at_key_position() {
            self.fixes.add(Fix::QuotedKey);
            self.take_key(text);
            return Ok(());
        }
        if let Some((value, fix)) = literal(&text) {
            if let Some(fix) = fix {
                self.fixes.add(fix);
            }
            return self.scalar(value, complete, at, "a literal");
        }
        // A bare word after a colon is almost always an unquoted string (`"event": ADD`); anywhere
        // else it is more likely prose that ran into the JSON, which is better cut off than kept.
        if self.expecting() == Some(Expect::Value) {
            self.fixes.add(Fix::QuotedBareValue);
            return self.scalar(Value::String(text), complete, at, "a bare value");
        }
        Err(self.failure(&format!("a bare word {} where a value was expected", snippet(&text)), at))
    }

    fn open(&mut self, bracket: Bracket, at: usize) -> Result<(), Failure> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(Failure { error: ParseError::TooDeep { limit: MAX_DEPTH }, checkpoint: None });
        }
        let step_in_parent = if self.stack.is_empty() { None } else { self.slot(at, "a nested object or list")? };
        let container = match bracket {
            Bracket::Curly => Container::Object { map: Map::new(), key: None },
            Bracket::Square => Container::List(Vec::new()),
        };
        self.stack.push(Frame { container, expect: Expect::First, step_in_parent });
        Ok(())
    }

    /// Closes the innermost container; returns the outermost value once that one closes.
    fn close(&mut self, bracket: Bracket) -> Option<Value> {
        let frame = self.stack.last_mut()?;
        match frame.expect {
            Expect::AfterComma => self.fixes.add(Fix::TrailingComma),
            Expect::Colon | Expect::Value => {
                if let Container::Object { key, .. } = &mut frame.container {
                    *key = None;
                }
                self.fixes.add(Fix::KeyWithoutValue);
            }
            Expect::First | Expect::CommaOrClose => {}
        }
        // Whichever bracket the model wrote, it meant to close what is open; closing the innermost
        // container never loses an item, while searching outwards for a match could.
        if frame.container.bracket() != bracket {
            self.fixes.add(Fix::MismatchedCloser);
        }
        let frame = self.stack.pop()?;
        let value = frame.container.into_value();
        if self.stack.is_empty() {
            return Some(value);
        }
        self.place(value);
        self.checkpoint = Some(self.pos);
        None
    }

    fn comma(&mut self) {
        let Some(frame) = self.stack.last_mut() else { return };
        match frame.expect {
            Expect::CommaOrClose => frame.expect = Expect::AfterComma,
            Expect::First | Expect::AfterComma => self.fixes.add(Fix::ExtraComma),
            Expect::Colon | Expect::Value => {
                if let Container::Object { key, .. } = &mut frame.container {
                    *key = None;
                }
                self.fixes.add(Fix::KeyWithoutValue);
                frame.expect = Expect::AfterComma;
            }
        }
    }

    fn colon(&mut self, at: usize) -> Result<(), Failure> {
        match self.stack.last_mut() {
            Some(frame) if frame.expect == Expect::Colon => {
                frame.expect = Expect::Value;
            }
            Some(frame) if frame.expect == Expect::Value => self.fixes.add(Fix::ExtraColon),
            // Unlike other stray punctuation, a colon in a list says the text around it is a key and a
            // value; keeping both as items would store junk, so the JSON is cut here instead.
            _ => return Err(self.failure("a ':' where none belongs", at)),
        }
        Ok(())
    }

    /// The input ended inside the JSON: close everything that is open.
    fn close_at_end(mut self) -> Outcome {
        if let Some(frame) = self.stack.last_mut() {
            if matches!(frame.expect, Expect::Colon | Expect::Value) {
                if let Container::Object { key, .. } = &mut frame.container {
                    *key = None;
                }
                self.fixes.add(Fix::KeyWithoutValue);
            }
        }
        let mut incomplete: Vec<PathStep> = self.stack.iter().filter_map(|frame| frame.step_in_parent.clone()).collect();
        if let Some(step) = self.incomplete_scalar.take() {
            incomplete.push(step);
        }
        self.fixes.add_many(Fix::ClosedBrackets, self.stack.len());
        let mut value = Value::Null;
        while let Some(frame) = self.stack.pop() {
            let finished = frame.container.into_value();
            if self.stack.is_empty() {
                value = finished;
            } else {
                self.place(finished);
            }
        }
        Outcome { value, consumed: None, incomplete: Some(incomplete), fixes: self.fixes }
    }

    // --- characters ---

    fn rest(&self) -> &'t str {
        self.text.get(self.pos..).unwrap_or_default()
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn peek_second(&self) -> Option<char> {
        self.rest().chars().nth(1)
    }

    fn bump(&mut self, c: char) {
        self.pos += c.len_utf8();
    }

    fn at_fence(&self) -> bool {
        self.rest().starts_with(FENCE)
    }

    fn at_end(&self) -> bool {
        self.pos >= self.text.len()
    }

    /// Whether a token that ended here is whole: one that ran into the end of the model's output may
    /// have been cut, one that ran into our own cut was not.
    fn token_complete(&self) -> bool {
        !self.at_end() || self.cut_at_checkpoint
    }

    // --- tokens ---

    fn next_token(&mut self, allow_bare_value: bool) -> Token {
        self.skip_insignificant();
        if self.at_fence() {
            // A fence inside the JSON is the model closing its code block: the JSON ends here.
            self.fixes.add(Fix::CodeFence);
            return Token::End;
        }
        let Some(c) = self.peek() else { return Token::End };
        let simple = match c {
            '{' => Some(Token::Open(Bracket::Curly)),
            '[' => Some(Token::Open(Bracket::Square)),
            '}' => Some(Token::Close(Bracket::Curly)),
            ']' => Some(Token::Close(Bracket::Square)),
            ',' | '，' => Some(Token::Comma),
            ':' | '：' => Some(Token::Colon),
            _ => None,
        };
        if let Some(token) = simple {
            self.bump(c);
            return token;
        }
        match c {
            '"' | '\'' | '“' | '”' | '„' | '‘' | '’' => self.read_string(c),
            '-' if self.peek_second().is_some_and(char::is_alphabetic) => self.read_word(allow_bare_value),
            '0'..='9' | '-' | '+' | '.' => self.read_number(),
            c if c.is_alphabetic() || c == '_' || c == '$' => self.read_word(allow_bare_value),
            other => {
                self.bump(other);
                Token::Stray
            }
        }
    }

    fn skip_insignificant(&mut self) {
        while let Some(c) = self.peek() {
            if c.is_whitespace() || c == '\u{feff}' || c == '\u{200b}' {
                self.bump(c);
            } else if c.is_control() {
                self.fixes.add(Fix::ControlCharacter);
                self.bump(c);
            } else if c == '/' && self.peek_second() == Some('/') {
                self.fixes.add(Fix::Comment);
                let line_length = self.rest().find('\n').unwrap_or(self.rest().len());
                self.pos += line_length;
            } else if c == '/' && self.peek_second() == Some('*') {
                self.fixes.add(Fix::Comment);
                let body = self.rest().get(2..).unwrap_or_default();
                self.pos += 2 + body.find("*/").map_or(body.len(), |end| end + 2);
            } else if c == '\\' {
                // Left over from escaped output; `\n` and friends stood for whitespace.
                self.fixes.add(Fix::StrayBackslash);
                self.bump(c);
                if let Some(next @ ('n' | 'r' | 't')) = self.peek() {
                    self.bump(next);
                }
            } else {
                return;
            }
        }
    }

    fn read_string(&mut self, open: char) -> Token {
        let closers: &[char] = match open {
            '"' => &['"'],
            '\'' => &['\''],
            '‘' | '’' => &['’', '‘', '\''],
            _ => &['”', '“', '"', '„'],
        };
        match open {
            '"' => {}
            '\'' => self.fixes.add(Fix::SingleQuotes),
            _ => self.fixes.add(Fix::SmartQuotes),
        }
        let single = matches!(open, '\'' | '‘' | '’');
        self.bump(open);
        let mut text = String::new();
        loop {
            if self.at_fence() {
                self.fixes.add(Fix::UnterminatedString);
                return Token::Text { text, complete: false };
            }
            let Some(c) = self.peek() else {
                self.fixes.add(Fix::UnterminatedString);
                return Token::Text { text, complete: false };
            };
            self.bump(c);
            if c == '\\' {
                self.read_escape(&mut text, single);
            } else if closers.contains(&c) && self.quote_closes_here() {
                return Token::Text { text, complete: true };
            } else {
                text.push(c);
            }
        }
    }

    /// Whether a quote that was just read closes its string. Models write unescaped quotes inside
    /// strings ("He said "hi" to me") and apostrophes inside single-quoted ones ('I don't'), so a
    /// quote that the same line's text goes on after is part of the string.
    fn quote_closes_here(&self) -> bool {
        for c in self.rest().chars() {
            if c == '\n' {
                return true;
            }
            if !c.is_whitespace() {
                return !(c.is_alphanumeric() || matches!(c, '(' | '.' | '!' | '?' | '-' | '&' | '…'));
            }
        }
        true
    }

    fn read_escape(&mut self, text: &mut String, single_quoted: bool) {
        // A backslash at the very end is dropped; the caller then finds the end of the input.
        let Some(c) = self.peek() else { return };
        self.bump(c);
        match c {
            '"' | '\\' | '/' => text.push(c),
            'n' => text.push('\n'),
            'r' => text.push('\r'),
            't' => text.push('\t'),
            'b' => text.push('\u{8}'),
            'f' => text.push('\u{c}'),
            'u' => self.read_unicode_escape(text),
            '\'' => {
                if !single_quoted {
                    self.fixes.add(Fix::InvalidEscape);
                }
                text.push('\'');
            }
            other => {
                self.fixes.add(Fix::InvalidEscape);
                text.push(other);
            }
        }
    }

    fn read_unicode_escape(&mut self, text: &mut String) {
        let Some(first) = self.read_hex4() else {
            self.fixes.add(Fix::InvalidEscape);
            text.push('u');
            return;
        };
        let decoded = if (0xD800..0xDC00).contains(&first) {
            // A high surrogate is a character only together with the low surrogate that should follow.
            let before_second = self.pos;
            let second = if self.rest().starts_with("\\u") {
                self.pos += 2;
                self.read_hex4()
            } else {
                None
            };
            match second {
                Some(second) if (0xDC00..0xE000).contains(&second) => {
                    char::from_u32(0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00))
                }
                _ => {
                    self.pos = before_second;
                    None
                }
            }
        } else {
            char::from_u32(first)
        };
        match decoded {
            Some(c) => text.push(c),
            None => {
                self.fixes.add(Fix::InvalidEscape);
                text.push('\u{fffd}');
            }
        }
    }

    fn read_hex4(&mut self) -> Option<u32> {
        let digits = self.rest().get(..4)?;
        if !digits.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let value = u32::from_str_radix(digits, 16).ok()?;
        self.pos += 4;
        Some(value)
    }

    fn read_number(&mut self) -> Token {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if !(c.is_ascii_digit() || matches!(c, '+' | '-' | '.' | 'e' | 'E')) {
                break;
            }
            self.bump(c);
        }
        let raw = self.text.get(start..self.pos).unwrap_or_default().to_owned();
        if !raw.contains(|c: char| c.is_ascii_digit()) {
            return Token::Stray;
        }
        let value = number_value(&raw, &mut self.fixes);
        Token::Number { raw, value, complete: self.token_complete() }
    }

    fn read_word(&mut self, allow_bare_value: bool) -> Token {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if !(c.is_alphanumeric() || matches!(c, '_' | '$' | '-' | '.')) {
                break;
            }
            self.bump(c);
        }
        let word = self.text.get(start..self.pos).unwrap_or_default();
        if allow_bare_value && literal(word).is_none() {
            // An unquoted string value may hold spaces ("text": I like tea); it ends where JSON resumes.
            while let Some(c) = self.peek() {
                if matches!(c, ',' | '}' | ']' | '\n' | '"' | '{' | '[') || self.at_fence() {
                    break;
                }
                self.bump(c);
            }
        }
        let text = self.text.get(start..self.pos).unwrap_or_default().trim_end().to_owned();
        Token::Word { text, complete: self.token_complete() }
    }
}

/// The value of an unquoted word that stands for a JSON literal, and the repair it took, if any.
fn literal(word: &str) -> Option<(Value, Option<Fix>)> {
    Some(match word {
        "true" => (Value::Bool(true), None),
        "false" => (Value::Bool(false), None),
        "null" => (Value::Null, None),
        "True" | "TRUE" => (Value::Bool(true), Some(Fix::ForeignLiteral)),
        "False" | "FALSE" => (Value::Bool(false), Some(Fix::ForeignLiteral)),
        "None" | "NULL" | "Null" | "undefined" => (Value::Null, Some(Fix::ForeignLiteral)),
        "NaN" | "Infinity" | "-Infinity" => (Value::Null, Some(Fix::NonFiniteNumber)),
        _ => return None,
    })
}

fn number_value(raw: &str, fixes: &mut FixLog) -> Option<Value> {
    if let Ok(number) = raw.parse::<Number>() {
        return Some(Value::Number(number));
    }
    // Leading zeros, a leading plus, "1." and ".5" have one obvious meaning.
    let unsigned = raw.strip_prefix('+').unwrap_or(raw);
    if let Ok(integer) = unsigned.parse::<i64>() {
        fixes.add(Fix::MalformedNumber);
        return Some(Value::from(integer));
    }
    let float = unsigned.parse::<f64>().ok()?;
    match Number::from_f64(float) {
        Some(number) => {
            fixes.add(Fix::MalformedNumber);
            Some(Value::Number(number))
        }
        None => {
            fixes.add(Fix::NonFiniteNumber);
            Some(Value::Null)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Interpreting the repaired value
// ---------------------------------------------------------------------------------------------

/// Lower-cased, trimmed, with spaces and dashes as underscores, so "Old Memory" matches "old_memory".
fn normalized_key(key: &str) -> String {
    key.trim().to_lowercase().replace([' ', '-'], "_")
}

fn field<'v>(map: &'v Map<String, Value>, name: &str) -> Option<&'v Value> {
    map.iter().find(|(key, _)| normalized_key(key) == name).map(|(_, value)| value)
}

fn key_named<'v>(map: &'v Map<String, Value>, names: &[&str]) -> Option<&'v String> {
    map.keys().find(|key| names.contains(&normalized_key(key).as_str()))
}

/// The key of the only list among the object's values, if exactly one value is a list.
fn only_list_key(map: &Map<String, Value>) -> Option<&String> {
    let mut lists = map.iter().filter(|(_, value)| value.is_array());
    let (key, _) = lists.next()?;
    lists.next().is_none().then_some(key)
}

fn locate_facts(value: &Value) -> Option<(Fit, Vec<PathStep>)> {
    match value {
        Value::Object(map) => {
            if let Some(key) = key_named(map, &["facts"]) {
                return Some((Fit::Exact, vec![PathStep::Key(key.clone())]));
            }
            only_list_key(map).map(|key| (Fit::Fallback, vec![PathStep::Key(key.clone())]))
        }
        Value::Array(_) => Some((Fit::Fallback, Vec::new())),
        _ => None,
    }
}

fn locate_ops(value: &Value) -> Option<(Fit, Vec<PathStep>)> {
    match value {
        Value::Object(map) => {
            if let Some(key) = key_named(map, &["memory", "memories", "operations"]) {
                return Some((Fit::Exact, vec![PathStep::Key(key.clone())]));
            }
            if field(map, "event").is_some() {
                return Some((Fit::Fallback, Vec::new()));
            }
            only_list_key(map).map(|key| (Fit::Fallback, vec![PathStep::Key(key.clone())]))
        }
        Value::Array(_) => Some((Fit::Fallback, Vec::new())),
        _ => None,
    }
}

/// A model that did not notice the prefill writes the whole document again inside it
/// (`{"facts": [{"facts": ["…"]}`); the inner list is then the answer.
fn unwrap_repeated_prefill(detailed: &mut Detailed, mut path: Vec<PathStep>, locate: Locate) -> Vec<PathStep> {
    let mut unwrapped = false;
    // Each round goes one level deeper, and the value is at most MAX_DEPTH deep.
    for _ in 0..MAX_DEPTH {
        let Some(Value::Array(items)) = value_at(&detailed.repaired.value, &path) else { break };
        let [only] = items.as_slice() else { break };
        let Some((Fit::Exact, inner)) = locate(only) else { break };
        path.push(PathStep::Index(0));
        path.extend(inner);
        unwrapped = true;
    }
    if unwrapped {
        detailed.repaired.repairs.push("read the document that the model wrote again inside the prefilled one".to_owned());
    }
    path
}

fn value_at<'v>(root: &'v Value, path: &[PathStep]) -> Option<&'v Value> {
    path.iter().try_fold(root, |value, step| match step {
        PathStep::Key(key) => value.get(key.as_str()),
        PathStep::Index(index) => value.get(*index),
    })
}

/// Whether the output ended inside the value at `path`.
fn ended_inside(incomplete: Option<&Vec<PathStep>>, path: &[PathStep]) -> bool {
    incomplete.is_some_and(|incomplete| incomplete.starts_with(path))
}

/// The items of the list (or the single item) at `path`, each with whether the output ended inside it.
fn items_at<'v>(
    root: &'v Value,
    path: &[PathStep],
    incomplete: Option<&Vec<PathStep>>,
    expected: impl FnOnce() -> String,
    single_item: fn(&Value) -> bool,
) -> Result<Vec<(&'v Value, bool)>, ParseError> {
    let target = value_at(root, path).unwrap_or(&Value::Null);
    match target {
        Value::Array(items) => {
            let last = items.len().saturating_sub(1);
            let mut last_path = path.to_vec();
            last_path.push(PathStep::Index(last));
            let last_cut = ended_inside(incomplete, &last_path);
            Ok(items.iter().enumerate().map(|(index, item)| (item, last_cut && index == last)).collect())
        }
        Value::Null => Ok(Vec::new()),
        other if single_item(other) => Ok(vec![(other, ended_inside(incomplete, path))]),
        other => Err(ParseError::WrongShape { expected: expected(), found: describe(other) }),
    }
}

fn under_key(path: &[PathStep], what: &str) -> String {
    match path.last() {
        Some(PathStep::Key(key)) => format!("{what} under {}", snippet(key)),
        _ => what.to_owned(),
    }
}

fn facts_at(detailed: Detailed, path: &[PathStep]) -> Result<Parsed<String>, ParseError> {
    let Detailed { repaired, incomplete, .. } = detailed;
    let items = items_at(&repaired.value, path, incomplete.as_ref(), || under_key(path, "a list of facts"), Value::is_string)?;
    let mut facts = Vec::new();
    let mut skipped = Vec::new();
    let mut seen = HashSet::new();
    for (item, cut) in items {
        if cut {
            skipped.push(format!("the last fact was cut off where the output ended: {}", value_snippet(item)));
            continue;
        }
        match fact_text(item) {
            Ok(fact) => {
                let fact = fact.trim();
                if !fact.is_empty() && seen.insert(fact.to_lowercase()) {
                    facts.push(fact.to_owned());
                }
            }
            Err(reason) => skipped.push(reason),
        }
    }
    Ok(Parsed { items: facts, skipped, repairs: repaired.repairs })
}

fn fact_text(item: &Value) -> Result<&str, String> {
    match item {
        Value::String(text) => Ok(text),
        Value::Object(map) => ["fact", "text", "memory"]
            .iter()
            .find_map(|name| field(map, name).and_then(Value::as_str))
            .ok_or_else(|| format!("an object without a \"fact\", \"text\" or \"memory\" string: {}", value_snippet(item))),
        Value::Number(number) => Err(format!("a number, not a fact: {}", value_snippet(&Value::Number(number.clone())))),
        Value::Bool(flag) => Err(format!("{flag}, not a fact")),
        Value::Null => Err("null, not a fact".to_owned()),
        Value::Array(_) => Err(format!("a list, not a fact: {}", value_snippet(item))),
    }
}

fn ops_at(detailed: Detailed, path: &[PathStep]) -> Result<Parsed<ProposedOp>, ParseError> {
    let Detailed { repaired, incomplete, .. } = detailed;
    let items = items_at(&repaired.value, path, incomplete.as_ref(), || under_key(path, "a list of memory operations"), Value::is_object)?;
    let mut ops = Vec::new();
    let mut skipped = Vec::new();
    for (item, cut) in items {
        if cut {
            skipped.push(format!("the last memory operation was cut off where the output ended: {}", value_snippet(item)));
            continue;
        }
        match proposed_op(item) {
            Ok(op) => ops.push(op),
            Err(reason) => skipped.push(reason),
        }
    }
    Ok(Parsed { items: ops, skipped, repairs: repaired.repairs })
}

fn proposed_op(item: &Value) -> Result<ProposedOp, String> {
    let Value::Object(map) = item else {
        return Err(format!("{}, not a memory operation: {}", describe(item), value_snippet(item)));
    };
    let event = match field(map, "event") {
        None => return Err(format!("an operation without an event: {}", value_snippet(item))),
        Some(Value::String(name)) => {
            event_named(name).ok_or_else(|| format!("an operation with an unknown event {}: {}", snippet(name), value_snippet(item)))?
        }
        Some(other) => return Err(format!("an operation whose event is {}: {}", describe(other), value_snippet(item))),
    };
    Ok(ProposedOp {
        id: field(map, "id").and_then(id_text),
        text: field(map, "text").and_then(trimmed_text),
        event,
        old_memory: field(map, "old_memory").and_then(trimmed_text),
    })
}

fn event_named(name: &str) -> Option<Event> {
    match normalized_key(name).as_str() {
        "add" => Some(Event::Add),
        "update" => Some(Event::Update),
        "delete" => Some(Event::Delete),
        "none" | "noop" | "no_op" | "keep" => Some(Event::None),
        _ => None,
    }
}

fn id_text(id: &Value) -> Option<String> {
    match id {
        Value::String(_) => trimmed_text(id),
        Value::Number(number) => Some(match number.as_f64() {
            // Ids are small integers; one written as 3.0 still means "3".
            Some(float) if !number.is_i64() && !number.is_u64() && float.fract() == 0.0 && float.abs() < 1e15 => format!("{float:.0}"),
            _ => number.to_string(),
        }),
        _ => None,
    }
}

fn trimmed_text(value: &Value) -> Option<String> {
    let text = value.as_str()?.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(_) => "true or false".to_owned(),
        Value::Number(_) => "a number".to_owned(),
        Value::String(_) => "a string".to_owned(),
        Value::Array(_) => "a list".to_owned(),
        Value::Object(map) if map.is_empty() => "an empty object".to_owned(),
        Value::Object(map) => {
            let keys: Vec<String> = map.keys().take(4).map(|key| snippet(key)).collect();
            let more = if map.len() > 4 { ", …" } else { "" };
            format!("an object with keys {}{more}", keys.join(", "))
        }
    }
}

/// A quoted, escaped, shortened rendering that always fits on one line.
fn snippet(text: &str) -> String {
    let mut chars = text.chars();
    let head: String = chars.by_ref().take(SNIPPET_CHARS).collect();
    if chars.next().is_some() {
        format!("{head:?}…")
    } else {
        format!("{head:?}")
    }
}

/// Compact JSON escapes newlines, so this is one line too.
fn value_snippet(value: &Value) -> String {
    let json = value.to_string();
    let mut chars = json.chars();
    let head: String = chars.by_ref().take(SNIPPET_CHARS).collect();
    if chars.next().is_some() {
        format!("{head}…")
    } else {
        head
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::json;

    fn facts(text: &str) -> Vec<String> {
        match parse_facts(text) {
            Ok(parsed) => parsed.items,
            Err(error) => panic!("parse_facts failed on {text:?}: {error}"),
        }
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|item| (*item).to_owned()).collect()
    }

    fn op(id: Option<&str>, text: Option<&str>, event: Event, old_memory: Option<&str>) -> ProposedOp {
        ProposedOp { id: id.map(str::to_owned), text: text.map(str::to_owned), event, old_memory: old_memory.map(str::to_owned) }
    }

    fn repaired(text: &str) -> Repaired {
        match repair_json(text) {
            Ok(repaired) => repaired,
            Err(error) => panic!("repair_json failed on {text:?}: {error}"),
        }
    }

    // --- the fast path ---

    #[test]
    fn valid_json_needs_no_repairs() {
        let parsed = parse_facts(r#"{"facts": ["Likes tea", "Lives in Lyon"]}"#).unwrap();
        assert_eq!(parsed.items, strings(&["Likes tea", "Lives in Lyon"]));
        assert!(parsed.repairs.is_empty());
        assert!(parsed.skipped.is_empty());
        let repaired = repaired(r#"{"a": [1, 2.5, null, true]}"#);
        assert_eq!(repaired.value, json!({"a": [1, 2.5, null, true]}));
        assert!(!repaired.truncated);
    }

    // --- each broken form ---

    #[test]
    fn code_fence() {
        let parsed = parse_facts("```json\n{\"facts\": [\"Likes tea\", \"Has a cat\"]}\n```").unwrap();
        assert_eq!(parsed.items, strings(&["Likes tea", "Has a cat"]));
        assert_eq!(parsed.repairs, strings(&["removed a code fence"]));
    }

    #[test]
    fn code_fence_around_truncated_json() {
        let parsed = parse_facts("```json\n{\"facts\": [\"Likes tea\", \"Has a c\n```").unwrap();
        assert_eq!(parsed.items, strings(&["Likes tea"]));
        assert_eq!(parsed.skipped.len(), 1);
        let repaired = repaired("```\n{\"facts\": [\"Likes tea\"\n```\nmore");
        assert_eq!(repaired.value, json!({"facts": ["Likes tea"]}));
        assert!(repaired.truncated);
    }

    #[test]
    fn prose_before_and_after() {
        let parsed = parse_facts("Sure! Here are the facts: {\"facts\": [\"Likes tea\"]} Hope that helps.").unwrap();
        assert_eq!(parsed.items, strings(&["Likes tea"]));
        assert_eq!(parsed.repairs, strings(&["dropped text before the JSON", "dropped text after the JSON"]));
    }

    #[test]
    fn prose_with_brackets_before_the_json() {
        assert_eq!(facts("Note [1]: the list {\"facts\": [\"Likes tea\"]}"), strings(&["Likes tea"]));
        assert_eq!(facts("Here [are] the facts: {\"facts\": [\"Likes tea\"]}"), strings(&["Likes tea"]));
        // repair_json takes the first value that parses, whatever its shape.
        assert_eq!(repaired("Note [1]: {\"facts\": []}").value, json!([1]));
    }

    #[test]
    fn single_quoted_strings_and_keys() {
        assert_eq!(
            facts("{'facts': ['I don't like fish', 'Owns a '67 Mustang', 'b']}"),
            strings(&["I don't like fish", "Owns a '67 Mustang", "b"])
        );
        let repaired = repaired("{'a': 'x \"quoted\" y'}");
        assert_eq!(repaired.value, json!({"a": "x \"quoted\" y"}));
        assert_eq!(repaired.repairs, strings(&["turned 2 single-quoted strings into JSON strings"]));
    }

    #[test]
    fn unquoted_keys() {
        let parsed = parse_facts("{facts: [\"Likes tea\"]}").unwrap();
        assert_eq!(parsed.items, strings(&["Likes tea"]));
        assert_eq!(parsed.repairs, strings(&["quoted a key"]));
        assert_eq!(repaired("{id: 1, old_memory: \"x\", 2: \"y\"}").value, json!({"id": 1, "old_memory": "x", "2": "y"}));
    }

    #[test]
    fn trailing_and_extra_commas() {
        let parsed = parse_facts("{\"facts\": [\"a\", \"b\",],}").unwrap();
        assert_eq!(parsed.items, strings(&["a", "b"]));
        assert_eq!(parsed.repairs, strings(&["removed 2 trailing commas"]));
        assert_eq!(facts("{\"facts\": [,\"a\",, \"b\"]}"), strings(&["a", "b"]));
    }

    #[test]
    fn python_and_javascript_literals() {
        let repaired = repaired("{\"a\": True, \"b\": False, \"c\": None, \"d\": undefined, \"e\": NaN}");
        assert_eq!(repaired.value, json!({"a": true, "b": false, "c": null, "d": null, "e": null}));
        assert_eq!(
            repaired.repairs,
            strings(&["converted 4 Python or JavaScript literals (True, False, None, undefined)", "replaced NaN or Infinity with null"])
        );
    }

    #[test]
    fn missing_commas() {
        let parsed = parse_facts("{\"facts\": [\"a\" \"b\"\n\"c\"]}").unwrap();
        assert_eq!(parsed.items, strings(&["a", "b", "c"]));
        assert_eq!(parsed.repairs, strings(&["inserted 2 missing commas"]));
        let ops = parse_memory_ops(
            "{\"memory\": [{\"id\": \"0\" \"text\": \"Likes tea\" \"event\": \"ADD\"} {\"id\": 1, \"text\": \"x\", \"event\": \"DELETE\"}]}",
        )
        .unwrap();
        assert_eq!(ops.items, vec![op(Some("0"), Some("Likes tea"), Event::Add, None), op(Some("1"), Some("x"), Event::Delete, None)]);
    }

    #[test]
    fn missing_closing_brackets() {
        let parsed = parse_facts("{\"facts\": [\"a\", \"b\"").unwrap();
        assert_eq!(parsed.items, strings(&["a", "b"]));
        assert!(parsed.skipped.is_empty());
        assert_eq!(parsed.repairs, strings(&["closed 2 brackets"]));
        let repaired = repaired("{\"facts\": [\"a\", \"b\"]");
        assert!(repaired.truncated);
        assert_eq!(repaired.value, json!({"facts": ["a", "b"]}));
    }

    #[test]
    fn unterminated_final_string_is_dropped() {
        let parsed = parse_facts("{\"facts\": [\"Likes tea\", \"Lives in Ly").unwrap();
        assert_eq!(parsed.items, strings(&["Likes tea"]));
        assert_eq!(parsed.skipped, strings(&["the last fact was cut off where the output ended: \"Lives in Ly\""]));
        assert_eq!(parsed.repairs, strings(&["closed an unterminated string", "closed 2 brackets"]));
        let repaired = repaired("{\"facts\": [\"Likes tea\", \"Lives in Ly");
        assert!(repaired.truncated);
        assert_eq!(repaired.value, json!({"facts": ["Likes tea", "Lives in Ly"]}));
    }

    #[test]
    fn smart_quotes() {
        let parsed = parse_facts("{“facts”: [“I like tea”, ‘Has a dog’]}").unwrap();
        assert_eq!(parsed.items, strings(&["I like tea", "Has a dog"]));
        assert_eq!(parsed.repairs, strings(&["replaced smart quotes around 3 strings"]));
        // Inside ordinary strings they are text.
        assert_eq!(facts("{\"facts\": [\"Said “hi” to Ann’s dog\",]}"), strings(&["Said “hi” to Ann’s dog"]));
    }

    #[test]
    fn document_repeated_inside_the_prefill() {
        let parsed = parse_facts("{\"facts\": [{\"facts\": [\"a\", \"b").unwrap();
        assert_eq!(parsed.items, strings(&["a"]));
        assert_eq!(parsed.skipped.len(), 1);
        assert_eq!(
            parsed.repairs,
            strings(&[
                "closed an unterminated string",
                "closed 4 brackets",
                "read the document that the model wrote again inside the prefilled one"
            ])
        );
        let ops = parse_memory_ops("{\"memory\": [{\"memory\": [{\"id\": \"0\", \"text\": \"a\", \"event\": \"ADD\"}]}]}").unwrap();
        assert_eq!(ops.items, vec![op(Some("0"), Some("a"), Event::Add, None)]);
    }

    #[test]
    fn nested_document_is_found() {
        assert_eq!(facts("{\"result\": {\"facts\": [\"a\"]}, \"other\": [1, 2], \"more\": [3]}"), strings(&["a"]));
    }

    #[test]
    fn duplicated_objects_back_to_back() {
        let parsed = parse_facts("{\"facts\": [\"a\"]}{\"facts\": [\"b\"]}").unwrap();
        assert_eq!(parsed.items, strings(&["a"]));
        assert_eq!(parsed.repairs, strings(&["dropped text after the JSON"]));
        let parsed = parse_facts("{\"facts\": ['a']}\n{\"facts\": ['b']}").unwrap();
        assert_eq!(parsed.items, strings(&["a"]));
    }

    #[test]
    fn escaped_json() {
        let parsed = parse_facts(r#"{\"facts\": [\"Likes tea\", \"Said \\\"hi\\\"\"]}"#).unwrap();
        assert_eq!(parsed.items, strings(&["Likes tea", "Said \"hi\""]));
        assert_eq!(parsed.repairs, strings(&["unescaped JSON that was written as the inside of a string"]));
        assert_eq!(facts(r#""{\n  \"facts\": [\"a\"]\n}""#), strings(&["a"]));
    }

    #[test]
    fn invalid_escapes_and_surrogates() {
        let repaired = repaired(r#"{"a": "it\'s a\qb", "b": "\ud83d\ude00 \ud83d x", "c": "\u00e9\u00"}"#);
        assert_eq!(repaired.value, json!({"a": "it's aqb", "b": "😀 \u{fffd} x", "c": "éu00"}));
        assert_eq!(repaired.repairs, strings(&["fixed 4 invalid escapes"]));
    }

    #[test]
    fn unescaped_quotes_inside_strings() {
        assert_eq!(facts(r#"{"facts": ["He said "hi" to me", "b"]}"#), strings(&["He said \"hi\" to me", "b"]));
    }

    #[test]
    fn comments_stray_backslashes_and_control_characters() {
        let commented = repaired("{\"a\": 1, // note\n /* block */ \"b\": 2}\u{0}");
        assert_eq!(commented.value, json!({"a": 1, "b": 2}));
        assert_eq!(commented.repairs, strings(&["removed 2 comments", "dropped text after the JSON"]));
        let escaped = repaired("{\\n \"a\": \u{1}1}");
        assert_eq!(escaped.value, json!({"a": 1}));
        assert_eq!(escaped.repairs, strings(&["removed a stray backslash", "removed a stray control character"]));
    }

    #[test]
    fn mismatched_closers_and_keys_without_values() {
        assert_eq!(repaired("{\"facts\": [\"a\", \"b\"}, \"x\": 1}").value, json!({"facts": ["a", "b"], "x": 1}));
        assert_eq!(repaired("{\"a\": , \"b\": 2, \"c\"}").value, json!({"b": 2}));
        let repaired = repaired("{\"a\": 1, \"b\":");
        assert_eq!(repaired.value, json!({"a": 1}));
        assert_eq!(repaired.repairs, strings(&["dropped a key without a value", "closed 1 bracket"]));
    }

    #[test]
    fn stray_punctuation_is_dropped() {
        let parsed = parse_facts("{\"facts\": [\"a\"; \"b\" @ `\"c\"`, ...]}").unwrap();
        assert_eq!(parsed.items, strings(&["a", "b", "c"]));
        assert_eq!(parsed.repairs, strings(&["dropped 5 stray characters", "inserted 2 missing commas", "removed a trailing comma"]));
    }

    #[test]
    fn malformed_numbers() {
        let repaired = repaired("[007, +1, .5, 1., 1e999]");
        assert_eq!(repaired.value, json!([7, 1, 0.5, 1.0, null]));
        assert_eq!(repaired.repairs, strings(&["rewrote 4 malformed numbers", "replaced NaN or Infinity with null"]));
    }

    #[test]
    fn bare_values_after_a_colon() {
        let ops = parse_memory_ops("{\"memory\": [{\"id\": 0, \"text\": I like tea, \"event\": ADD}]}").unwrap();
        assert_eq!(ops.items, vec![op(Some("0"), Some("I like tea"), Event::Add, None)]);
        assert_eq!(ops.repairs, strings(&["quoted 2 bare values"]));
    }

    #[test]
    fn unrepairable_text_after_the_last_good_item_is_cut() {
        let parsed = parse_facts("{\"facts\": [\"a\", \"b\"] Hope this helps").unwrap();
        assert_eq!(parsed.items, strings(&["a", "b"]));
        // The repairs are those of the JSON that was kept: the failed attempt to read the prose as a key is not among them.
        assert_eq!(
            parsed.repairs,
            strings(&[
                "closed 1 bracket",
                "dropped the JSON from byte 20 on, which could not be repaired (a bare word \"this\" where a value was expected at byte 25)"
            ])
        );
        assert_eq!(facts("{\"facts\": [\"a\", \"b\", 1.2.3, \"c\"]}"), strings(&["a", "b"]));
    }

    #[test]
    fn errors_have_one_line_messages() {
        assert_eq!(parse_facts("I have no idea.").unwrap_err().to_string(), "the model output contains no JSON object or list");
        assert_eq!(
            parse_facts(&"x".repeat(70_000)).unwrap_err().to_string(),
            "the model output is 70000 bytes, more than the 65536 this parser reads"
        );
        assert_eq!(parse_facts("{\"facts\": 5}").unwrap_err().to_string(), "expected a list of facts under \"facts\", found a number");
        assert_eq!(
            parse_facts("{\"a\": 1, \"b\": 2}").unwrap_err().to_string(),
            "expected an object with a \"facts\" list, found an object with keys \"a\", \"b\""
        );
        assert_eq!(
            parse_memory_ops("{\"Memory\": \"none\"}").unwrap_err().to_string(),
            "expected a list of memory operations under \"Memory\", found a string"
        );
        assert_eq!(
            repair_json("[1.2.3]").unwrap_err(),
            ParseError::Unrepairable { problem: "a malformed number \"1.2.3\"".to_owned(), offset: 1 }
        );
        assert_eq!(
            repair_json("[word]").unwrap_err().to_string(),
            "the JSON cannot be repaired: a bare word \"word\" where a value was expected at byte 1"
        );
    }

    #[test]
    fn size_limit_is_inclusive() {
        let json = "{\"facts\": []}";
        let text = format!("{json}{}", " ".repeat(MAX_INPUT_BYTES - json.len()));
        assert_eq!(text.len(), MAX_INPUT_BYTES);
        assert!(parse_facts(&text).is_ok());
        let text = format!("{text} ");
        assert_eq!(parse_facts(&text).unwrap_err(), ParseError::TooLarge { size: MAX_INPUT_BYTES + 1, limit: MAX_INPUT_BYTES });
    }

    #[test]
    fn depth_limit_is_sixty_four() {
        let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert_eq!(nesting_depth(&repaired(&nested(MAX_DEPTH)).value), MAX_DEPTH);
        assert_eq!(repair_json(&nested(MAX_DEPTH + 1)).unwrap_err().to_string(), "the JSON is nested deeper than 64 levels");
        // Over serde_json's own limit the strict parser fails and the scanner must refuse too.
        assert_eq!(repair_json(&nested(200)).unwrap_err(), ParseError::TooDeep { limit: MAX_DEPTH });
        let unclosed = "[".repeat(MAX_DEPTH);
        assert!(repaired(&unclosed).truncated);
    }

    // --- parse_facts shapes ---

    #[test]
    fn facts_shapes() {
        assert_eq!(facts("[\"a\", \"b\"]"), strings(&["a", "b"]));
        assert_eq!(facts("{\"FACTS\": [\"a\"]}"), strings(&["a"]));
        assert_eq!(facts("{\"extracted\": [\"a\"], \"count\": 1}"), strings(&["a"]));
        assert_eq!(facts("{\"facts\": \"Only one\"}"), strings(&["Only one"]));
        assert!(facts("{\"facts\": null}").is_empty());
        assert!(facts("{\"facts\": [}").is_empty());
        assert_eq!(
            facts("{\"facts\": [{\"fact\": \"a\"}, {\"text\": \"b\"}, {\"Memory\": \"c\"}, {\"fact\": \"d\", \"text\": \"e\"}]}"),
            strings(&["a", "b", "c", "d"])
        );
    }

    #[test]
    fn facts_are_trimmed_and_deduplicated() {
        let parsed = parse_facts("{\"facts\": [\"  Likes tea \", \"\", \"   \", \"likes TEA\", \"Likes tea\", \"Has a cat\"]}").unwrap();
        assert_eq!(parsed.items, strings(&["Likes tea", "Has a cat"]));
        assert!(parsed.skipped.is_empty());
    }

    #[test]
    fn facts_that_are_not_strings_are_skipped_with_reasons() {
        let parsed = parse_facts("{\"facts\": [\"a\", 42, true, null, [\"x\"], {\"other\": 1}, \"b\"]}").unwrap();
        assert_eq!(parsed.items, strings(&["a", "b"]));
        assert_eq!(
            parsed.skipped,
            strings(&[
                "a number, not a fact: 42",
                "true, not a fact",
                "null, not a fact",
                "a list, not a fact: [\"x\"]",
                "an object without a \"fact\", \"text\" or \"memory\" string: {\"other\":1}",
            ])
        );
    }

    #[test]
    fn truncated_last_object_fact_is_dropped() {
        let parsed = parse_facts("[{\"fact\": \"a\"}, {\"fact\": \"b\"").unwrap();
        assert_eq!(parsed.items, strings(&["a"]));
        assert_eq!(parsed.skipped, strings(&["the last fact was cut off where the output ended: {\"fact\":\"b\"}"]));
    }

    // --- parse_memory_ops ---

    #[test]
    fn memory_ops_shapes() {
        let expected = vec![op(Some("0"), Some("Likes tea"), Event::Add, None)];
        let single = "{\"id\": \"0\", \"text\": \"Likes tea\", \"event\": \"ADD\"}";
        for text in [
            format!("{{\"memory\": [{single}]}}"),
            format!("{{\"Memories\": [{single}]}}"),
            format!("{{\"OPERATIONS\": [{single}]}}"),
            format!("[{single}]"),
            single.to_owned(),
            format!("{{\"memory\": {single}}}"),
            format!("{{\"ops\": [{single}]}}"),
        ] {
            assert_eq!(parse_memory_ops(&text).unwrap().items, expected, "{text}");
        }
        assert!(parse_memory_ops("{\"memory\": []}").unwrap().items.is_empty());
    }

    #[test]
    fn memory_op_fields_are_normalised() {
        let parsed = parse_memory_ops(
            "{\"memory\": [\
             {\"id\": 7, \"text\": \"  Likes coffee \", \"event\": \" update \", \"old_memory\": \" Likes tea \"},\
             {\"id\": \" 3 \", \"text\": \"\", \"event\": \"noop\", \"old_memory\": \"   \"},\
             {\"id\": 4.0, \"event\": \"No-Op\"},\
             {\"ID\": \"5\", \"Text\": \"x\", \"Event\": \"KEEP\", \"Old Memory\": \"y\"},\
             {\"id\": \"6\", \"event\": \"delete\"},\
             {\"id\": true, \"event\": \"NONE\", \"text\": 12}\
             ]}",
        )
        .unwrap();
        assert_eq!(
            parsed.items,
            vec![
                op(Some("7"), Some("Likes coffee"), Event::Update, Some("Likes tea")),
                op(Some("3"), None, Event::None, None),
                op(Some("4"), None, Event::None, None),
                op(Some("5"), Some("x"), Event::None, Some("y")),
                op(Some("6"), None, Event::Delete, None),
                op(None, None, Event::None, None),
            ]
        );
        assert!(parsed.skipped.is_empty());
    }

    #[test]
    fn memory_ops_without_a_known_event_are_skipped() {
        let parsed = parse_memory_ops(
            "{\"memory\": [{\"id\": \"0\", \"text\": \"a\"}, {\"id\": \"1\", \"event\": \"MERGE\"}, {\"event\": 3}, \"ADD\", {\"event\": \"ADD\", \"text\": \"b\"}]}",
        )
        .unwrap();
        assert_eq!(parsed.items, vec![op(None, Some("b"), Event::Add, None)]);
        assert_eq!(
            parsed.skipped,
            strings(&[
                "an operation without an event: {\"id\":\"0\",\"text\":\"a\"}",
                "an operation with an unknown event \"MERGE\": {\"id\":\"1\",\"event\":\"MERGE\"}",
                "an operation whose event is a number: {\"event\":3}",
                "a string, not a memory operation: \"ADD\"",
            ])
        );
    }

    #[test]
    fn truncated_last_memory_op_is_dropped() {
        let parsed = parse_memory_ops(
            "{\"memory\": [{\"id\": \"0\", \"text\": \"Likes tea\", \"event\": \"ADD\"}, {\"id\": \"1\", \"text\": \"Has a c",
        )
        .unwrap();
        assert_eq!(parsed.items, vec![op(Some("0"), Some("Likes tea"), Event::Add, None)]);
        assert_eq!(
            parsed.skipped,
            strings(&["the last memory operation was cut off where the output ended: {\"id\":\"1\",\"text\":\"Has a c\"}"])
        );
        // A complete last op survives when only the closing brackets are missing.
        let parsed = parse_memory_ops("{\"memory\": [{\"id\": \"0\", \"text\": \"Likes tea\", \"event\": \"ADD\"}").unwrap();
        assert_eq!(parsed.items.len(), 1);
        assert!(parsed.skipped.is_empty());
    }

    #[test]
    fn event_serializes_in_upper_case() {
        assert_eq!(
            serde_json::to_string(&[Event::Add, Event::Update, Event::Delete, Event::None]).unwrap(),
            "[\"ADD\",\"UPDATE\",\"DELETE\",\"NONE\"]"
        );
    }

    // --- property tests ---

    const PIECES: &[&str] = &[
        "{", "}", "[", "]", "\"", ":", ",", "'", " ", "\n", "\\", "a", "b", "z", "Q", "0", "1", "9", "é", "’", "“", "”", "\u{0}", "facts",
        "memory", "event", "ADD", "true", "None", "```", "-", ".", "e", "/", "*", "u", "#",
    ];

    const MUTATION_CHARS: &[char] =
        &['{', '}', '[', ']', '"', ':', ',', '\'', ' ', '\n', '\\', 'a', 'Z', '0', '9', 'é', '’', '“', '\u{0}', '`', '-', '.', '/'];

    fn one_line(text: &str) -> bool {
        !text.is_empty() && !text.contains('\n')
    }

    /// Checks what must hold for any input, and says whether anything useful came out.
    fn check_invariants(text: &str) -> bool {
        let mut useful = false;
        match repair_json(text) {
            Ok(repaired) => {
                assert!(repaired.value.is_object() || repaired.value.is_array(), "{text:?} gave {}", repaired.value);
                assert!(repaired.repairs.iter().all(|repair| one_line(repair)), "{:?}", repaired.repairs);
                let round_trip: Value = serde_json::from_str(&repaired.value.to_string()).unwrap();
                assert_eq!(round_trip, repaired.value);
                assert!(nesting_depth(&repaired.value) <= MAX_DEPTH);
            }
            Err(error) => assert!(one_line(&error.to_string()), "{error}"),
        }
        match parse_facts(text) {
            Ok(parsed) => {
                let mut seen = HashSet::new();
                for fact in &parsed.items {
                    assert!(!fact.is_empty() && fact.trim() == fact, "{fact:?} from {text:?}");
                    assert!(seen.insert(fact.to_lowercase()), "{fact:?} repeated from {text:?}");
                }
                assert!(parsed.skipped.iter().chain(&parsed.repairs).all(|line| one_line(line)));
                useful |= !parsed.items.is_empty();
            }
            Err(error) => assert!(one_line(&error.to_string()), "{error}"),
        }
        match parse_memory_ops(text) {
            Ok(parsed) => {
                for op in &parsed.items {
                    for field in [&op.id, &op.text, &op.old_memory].into_iter().flatten() {
                        assert!(!field.is_empty() && field.trim() == field, "{field:?} from {text:?}");
                    }
                }
                assert!(parsed.skipped.iter().chain(&parsed.repairs).all(|line| one_line(line)));
                useful |= !parsed.items.is_empty();
            }
            Err(error) => assert!(one_line(&error.to_string()), "{error}"),
        }
        useful
    }

    #[test]
    fn random_inputs_never_panic() {
        let mut rng = StdRng::seed_from_u64(0x006d_656d_6c6f_7261);
        let mut useful = 0;
        for case in 0..20_000 {
            let length = rng.random_range(0..100);
            let text = match case % 3 {
                0 => {
                    let bytes: Vec<u8> = (0..length).map(|_| rng.random()).collect();
                    String::from_utf8_lossy(&bytes).into_owned()
                }
                1 => (0..length).map(|_| PIECES[rng.random_range(0..PIECES.len())]).collect(),
                // Starting from the prefill explores the repairs rather than the search for JSON.
                _ => {
                    let tail: String = (0..length).map(|_| PIECES[rng.random_range(0..PIECES.len())]).collect();
                    format!("{{\"facts\": [\"{tail}")
                }
            };
            if check_invariants(&text) {
                useful += 1;
            }
        }
        assert!(useful > 1_000, "only {useful} random inputs gave any items");
    }

    const FACT_LISTS: &[&[&str]] = &[
        &["Likes green tea", "Lives in Lyon", "Has a cat named Miso"],
        &["Said \"hi\" to Ann", "Path is C:\\temp", "Café owner’s son", "Uses [brackets], {braces}: and commas"],
        &["Born in 1990", "Line one\nline two", "Emoji 😀 fan", "Tab\tseparated"],
    ];

    fn facts_documents() -> Vec<(String, Vec<String>)> {
        let mut documents = Vec::new();
        for list in FACT_LISTS {
            let expected = strings(list);
            let compact = serde_json::to_string(&json!({ "facts": expected })).unwrap();
            let pretty = serde_json::to_string_pretty(&json!({ "facts": expected })).unwrap();
            documents.push((compact.clone(), expected.clone()));
            documents.push((pretty.clone(), expected.clone()));
            documents.push((format!("```json\n{pretty}\n```"), expected.clone()));
            documents.push((format!("Here you go: {compact} Anything else [y/n]?"), expected.clone()));
            documents.push((serde_json::to_string(&json!({ "facts": expected, "note": "done" })).unwrap(), expected.clone()));
            documents.push((
                serde_json::to_string(&json!({ "facts": expected.iter().map(|fact| json!({"fact": fact})).collect::<Vec<_>>() })).unwrap(),
                expected,
            ));
        }
        documents
    }

    fn ops_documents() -> Vec<(String, Vec<ProposedOp>)> {
        let expected = vec![
            op(Some("0"), Some("Likes green tea"), Event::Add, None),
            op(Some("1"), Some("Lives in Paris"), Event::Update, Some("Lives in Lyon")),
            op(Some("2"), None, Event::Delete, None),
            op(Some("3"), Some("Has a cat: \"Miso\""), Event::None, None),
        ];
        let as_json: Vec<Value> = expected
            .iter()
            .map(|op| {
                let mut map = Map::new();
                if let Some(id) = &op.id {
                    map.insert("id".to_owned(), json!(id));
                }
                if let Some(text) = &op.text {
                    map.insert("text".to_owned(), json!(text));
                }
                map.insert("event".to_owned(), serde_json::to_value(op.event).unwrap());
                if let Some(old) = &op.old_memory {
                    map.insert("old_memory".to_owned(), json!(old));
                }
                Value::Object(map)
            })
            .collect();
        let compact = serde_json::to_string(&json!({ "memory": as_json })).unwrap();
        let pretty = serde_json::to_string_pretty(&json!({ "memory": as_json })).unwrap();
        let with_integer_ids: Vec<Value> = as_json
            .iter()
            .enumerate()
            .map(|(index, op)| {
                let mut op = op.clone();
                op["id"] = json!(index);
                op
            })
            .collect();
        let with_integer_ids = serde_json::to_string(&json!({ "memory": with_integer_ids })).unwrap();
        assert!(with_integer_ids.contains("\"id\":3"));
        vec![
            (compact.clone(), expected.clone()),
            (pretty.clone(), expected.clone()),
            (format!("```json\n{pretty}\n```"), expected.clone()),
            (serde_json::to_string(&as_json).unwrap(), expected.clone()),
            (with_integer_ids, expected),
        ]
    }

    fn is_prefix<T: PartialEq>(prefix: &[T], of: &[T]) -> bool {
        prefix.len() <= of.len() && of.iter().zip(prefix).all(|(whole, part)| whole == part)
    }

    #[test]
    fn every_truncation_of_a_facts_document_gives_a_prefix() {
        for (document, expected) in facts_documents() {
            assert_eq!(facts(&document), expected, "{document}");
            let mut partial_results = 0;
            for (cut, _) in document.char_indices() {
                let truncated = &document[..cut];
                if let Ok(parsed) = parse_facts(truncated) {
                    assert!(is_prefix(&parsed.items, &expected), "{truncated:?} gave {:?}", parsed.items);
                    if !parsed.items.is_empty() && parsed.items.len() < expected.len() {
                        partial_results += 1;
                    }
                }
            }
            assert!(partial_results > 0, "no truncation of {document:?} kept a partial list");
        }
    }

    #[test]
    fn every_truncation_of_an_ops_document_gives_a_prefix() {
        for (document, expected) in ops_documents() {
            assert_eq!(parse_memory_ops(&document).unwrap().items, expected, "{document}");
            let mut partial_results = 0;
            for (cut, _) in document.char_indices() {
                let truncated = &document[..cut];
                if let Ok(parsed) = parse_memory_ops(truncated) {
                    assert!(is_prefix(&parsed.items, &expected), "{truncated:?} gave {:?}", parsed.items);
                    if !parsed.items.is_empty() && parsed.items.len() < expected.len() {
                        partial_results += 1;
                    }
                }
            }
            assert!(partial_results > 0, "no truncation of {document:?} kept a partial list");
        }
    }

    #[test]
    fn single_character_mutations_never_panic() {
        // (document, how many items it holds, whether it is a facts document)
        let documents: Vec<(String, usize, bool)> = facts_documents()
            .into_iter()
            .map(|(document, facts)| (document, facts.len(), true))
            .chain(ops_documents().into_iter().map(|(document, ops)| (document, ops.len(), false)))
            .collect();
        let mut rng = StdRng::seed_from_u64(42);
        let mut useful = 0;
        let mut same_count = 0;
        let cases = 20_000;
        for _ in 0..cases {
            let (document, expected_count, is_facts) = &documents[rng.random_range(0..documents.len())];
            let boundaries: Vec<usize> = document.char_indices().map(|(at, _)| at).chain([document.len()]).collect();
            let at = boundaries[rng.random_range(0..boundaries.len())];
            let piece = MUTATION_CHARS[rng.random_range(0..MUTATION_CHARS.len())];
            let (head, tail) = document.split_at(at);
            let mut tail_chars = tail.chars();
            let mutated = match rng.random_range(0..3) {
                0 => {
                    tail_chars.next();
                    format!("{head}{}", tail_chars.as_str())
                }
                1 => format!("{head}{piece}{tail}"),
                _ => {
                    tail_chars.next();
                    format!("{head}{piece}{}", tail_chars.as_str())
                }
            };
            if check_invariants(&mutated) {
                useful += 1;
            }
            let count = if *is_facts {
                parse_facts(&mutated).map(|parsed| parsed.items.len())
            } else {
                parse_memory_ops(&mutated).map(|parsed| parsed.items.len())
            };
            if let Ok(count) = count {
                // One damaged character can split an item in two at most; more would mean the repair invents items.
                assert!(count <= expected_count + 1, "{mutated:?} gave {count} items, from {expected_count}");
            }
            if count == Ok(*expected_count) {
                same_count += 1;
            }
        }
        // Most single-character damage is repairable; a collapse here means a repair stopped working.
        assert!(useful * 100 > cases * 95, "only {useful} of {cases} mutated documents gave any items");
        assert!(same_count * 100 > cases * 78, "only {same_count} of {cases} mutated documents kept their number of items");
    }

    #[test]
    fn deep_nesting_never_overflows_the_stack() {
        let brackets = "[".repeat(100_000);
        assert_eq!(repair_json(&brackets).unwrap_err(), ParseError::TooLarge { size: 100_000, limit: MAX_INPUT_BYTES });
        // The size check aside, the scanner itself must stop at the depth limit.
        assert_eq!(first_repair(&brackets).unwrap_err(), ParseError::TooDeep { limit: MAX_DEPTH });
        assert_eq!(first_repair(&"{\"a\":[".repeat(50_000)).unwrap_err(), ParseError::TooDeep { limit: MAX_DEPTH });
        let balanced = format!("{}{}", "[".repeat(30_000), "]".repeat(30_000));
        assert_eq!(repair_json(&balanced).unwrap_err(), ParseError::TooDeep { limit: MAX_DEPTH });
        assert_eq!(parse_facts(&format!("{{\"facts\": {}", "[".repeat(60_000))).unwrap_err(), ParseError::TooDeep { limit: MAX_DEPTH });
        assert_eq!(parse_memory_ops(&"{\"memory\":".repeat(6_000)).unwrap_err(), ParseError::TooDeep { limit: MAX_DEPTH });
    }
}
