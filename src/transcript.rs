//! Conversation transcripts to ingest into long-term memory: LoCoMo JSON files and plain
//! `Speaker: text` transcripts, both read into one shape ([`Conversation`]).
//!
//! LoCoMo files are walked as untyped JSON rather than deserialised into structs so that a
//! malformed file is reported as "conv-26 session_4 turn 7 has no \"text\"" instead of a serde
//! message about an anonymous map, and so that the quirks of the real data (numeric answers,
//! evidence given as one string or a list, dated sessions without turns) need no special types.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Transcripts are read whole into memory; anything bigger is almost certainly the wrong file
/// (the whole LoCoMo benchmark is under 3 MiB).
pub const MAX_TRANSCRIPT_BYTES: u64 = 256 * 1024 * 1024;

/// Error lists of conversation ids are cut short so that the message stays one readable line.
const MAX_LISTED_IDS: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum TranscriptError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{} is {}; transcripts over {} are refused", path.display(), human_size(*size), human_size(*limit))]
    TooLarge { path: PathBuf, size: u64, limit: u64 },
    #[error("{} is not UTF-8 text (invalid byte at offset {offset})", path.display())]
    NotUtf8 { path: PathBuf, offset: usize },
    #[error("{} is not JSON: {source}", path.display())]
    NotJson { path: PathBuf, source: serde_json::Error },
    /// The file parsed but its content is not a usable transcript.
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("{} line {line}: {message}", path.display())]
    Line { path: PathBuf, line: usize, message: String },
    #[error("{}: {}", path.display(), unknown_conversations_message(missing, available))]
    UnknownConversation { path: PathBuf, missing: Vec<String>, available: Vec<String> },
    #[error("invalid session range {text:?}: {reason}")]
    SessionRange { text: String, reason: String },
    #[error("unknown transcript format {text:?} (expected \"locomo\" or \"text\")")]
    UnknownFormat { text: String },
}

/// One conversation between (usually) two people, split into dated sessions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Conversation {
    pub id: String,
    /// In order of first appearance (LoCoMo: `speaker_a`, `speaker_b`, then anyone else).
    pub speakers: Vec<String>,
    /// Sorted by number; numbers may have gaps where a session had no turns.
    pub sessions: Vec<Session>,
    pub qa: Vec<QaItem>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Session {
    /// 1-based, as in the source (`session_4` / the fourth `#` header).
    pub number: u32,
    /// The date/time exactly as written in the source.
    pub date_time: Option<String>,
    /// Normalised date ("8 May 2023") when `date_time` could be parsed.
    pub date: Option<String>,
    /// Unix seconds, UTC (times without a zone are taken as UTC).
    pub timestamp: Option<i64>,
    pub turns: Vec<Turn>,
    /// Annotated facts (LoCoMo `observation`); empty for plain transcripts.
    pub observations: Vec<Observation>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Turn {
    /// "D{session}:{n}", referenced by QA and observation evidence.
    pub id: String,
    pub speaker: String,
    pub text: String,
    /// LoCoMo `blip_caption`: the only trace of a shared photo, which is not available itself.
    pub image_caption: Option<String>,
    pub image_urls: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Observation {
    pub speaker: String,
    pub fact: String,
    /// Turn ids the fact was drawn from.
    pub evidence: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QaItem {
    pub question: String,
    /// Numeric answers in the source become their decimal text ("2022").
    pub answer: Option<String>,
    pub evidence: Vec<String>,
    /// LoCoMo category id: 1 multi-hop, 2 temporal, 3 open-domain, 4 single-hop, 5 adversarial.
    pub category: u8,
    /// Category 5: the plausible but wrong answer a model should not give.
    pub adversarial_answer: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TranscriptFormat {
    Locomo,
    Text,
}

impl FromStr for TranscriptFormat {
    type Err = TranscriptError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "locomo" => Ok(Self::Locomo),
            "text" => Ok(Self::Text),
            _ => Err(TranscriptError::UnknownFormat { text: text.to_string() }),
        }
    }
}

impl fmt::Display for TranscriptFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Locomo => "locomo",
            Self::Text => "text",
        })
    }
}

/// Reads every conversation in a LoCoMo file (sessions sorted by number).
pub fn load_locomo(path: &Path) -> Result<Vec<Conversation>, TranscriptError> {
    let bytes = read_limited(path, MAX_TRANSCRIPT_BYTES)?;
    parse_locomo(&bytes, path)
}

/// The invented demo conversation shipped in `assets/` (LoCoMo format), embedded so that
/// benchmarks and tests run anywhere.
pub fn demo_conversation() -> Result<Vec<Conversation>, TranscriptError> {
    parse_locomo(DEMO_CONVERSATION.as_bytes(), Path::new("assets/demo-conversation.json"))
}

const DEMO_CONVERSATION: &str = include_str!("../assets/demo-conversation.json");

/// Reads a plain transcript as one conversation named `id`.
pub fn load_text(path: &Path, id: &str) -> Result<Conversation, TranscriptError> {
    let bytes = read_limited(path, MAX_TRANSCRIPT_BYTES)?;
    parse_text(&bytes, path, id)
}

/// Picks conversations by id; `None` = all. Unknown ids are an error listing the available ones.
/// The result follows the order of `ids` (repeats dropped), since that is what the caller asked for.
pub fn select(conversations: Vec<Conversation>, ids: Option<&[String]>, path: &Path) -> Result<Vec<Conversation>, TranscriptError> {
    let Some(ids) = ids else { return Ok(conversations) };
    let mut wanted: Vec<&str> = Vec::new();
    for id in ids {
        let id = id.trim();
        if !wanted.contains(&id) {
            wanted.push(id);
        }
    }
    let missing: Vec<String> = wanted.iter().filter(|id| !conversations.iter().any(|c| c.id == **id)).map(|id| (*id).to_string()).collect();
    if !missing.is_empty() {
        let available = conversations.into_iter().map(|c| c.id).collect();
        return Err(TranscriptError::UnknownConversation { path: path.to_path_buf(), missing, available });
    }
    let mut pool: Vec<Option<Conversation>> = conversations.into_iter().map(Some).collect();
    let mut picked = Vec::with_capacity(wanted.len());
    for id in wanted {
        if let Some(conversation) = pool.iter_mut().find(|c| c.as_ref().is_some_and(|c| c.id == id)).and_then(Option::take) {
            picked.push(conversation);
        }
    }
    Ok(picked)
}

/// "1-3,5,8-" style session selection (1-based, inclusive; open end allowed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRange {
    spans: Vec<(u32, Option<u32>)>,
}

impl SessionRange {
    /// Every session; what a caller uses when no range was given.
    pub fn all() -> Self {
        Self { spans: vec![(1, None)] }
    }

    pub fn contains(&self, session: u32) -> bool {
        self.spans.iter().any(|&(start, end)| session >= start && end.is_none_or(|end| session <= end))
    }
}

impl FromStr for SessionRange {
    type Err = TranscriptError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |reason: String| TranscriptError::SessionRange { text: text.to_string(), reason };
        if text.trim().is_empty() {
            return Err(fail("no sessions given (expected e.g. \"1-3,5,8-\")".to_string()));
        }
        let mut spans = Vec::new();
        for part in text.split(',').map(str::trim) {
            if part.is_empty() {
                return Err(fail("empty item between commas".to_string()));
            }
            let span = match part.split_once('-') {
                Some((start, end)) => {
                    let (start, end) = (start.trim(), end.trim());
                    if start.is_empty() {
                        return Err(fail(format!("{part:?} has no start (sessions start at 1: write \"1{part}\")")));
                    }
                    let start = session_number(start).map_err(fail)?;
                    let end = if end.is_empty() { None } else { Some(session_number(end).map_err(fail)?) };
                    if let Some(end) = end.filter(|&end| end < start) {
                        return Err(fail(format!("{start} is after {end}")));
                    }
                    (start, end)
                }
                None => {
                    let number = session_number(part).map_err(fail)?;
                    (number, Some(number))
                }
            };
            spans.push(span);
        }
        Ok(Self { spans })
    }
}

impl fmt::Display for SessionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, &(start, end)) in self.spans.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            match end {
                Some(end) if end == start => write!(f, "{start}")?,
                Some(end) => write!(f, "{start}-{end}")?,
                None => write!(f, "{start}-")?,
            }
        }
        Ok(())
    }
}

fn session_number(text: &str) -> Result<u32, String> {
    // u32::from_str would also take "+3"; only plain digits are a session number.
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{text:?} is not a session number"));
    }
    match text.parse::<u32>() {
        Ok(0) => Err("sessions are numbered from 1".to_string()),
        Ok(number) => Ok(number),
        Err(_) => Err(format!("{text} is too large for a session number")),
    }
}

/// Date parsing: "1:56 pm on 8 May, 2023", "8 May, 2023", "8 May 2023", "May 8, 2023",
/// "2023-05-08", "2023-05-08 13:56", "2023-05-08T13:56:00" → (date text normalised as
/// "8 May 2023", unix seconds UTC). Unknown formats → None.
pub fn parse_date_time(text: &str) -> Option<(String, i64)> {
    let lower = text.trim().to_ascii_lowercase();
    let (clock, date_text) = match lower.split_once(" on ") {
        Some((clock, date)) => (Some(parse_clock(clock)?), date.trim()),
        None => (None, lower.as_str()),
    };
    let ((year, month, day), iso_time) = match parse_iso(date_text) {
        Some(parsed) => parsed,
        None => (parse_written_date(date_text)?, None),
    };
    let seconds_of_day = match (clock, iso_time) {
        // "1:56 pm on 2023-05-08 13:56" says the time twice; refuse rather than guess.
        (Some(_), Some(_)) => return None,
        (Some(seconds), None) | (None, Some(seconds)) => seconds,
        (None, None) => 0,
    };
    let month_name = MONTHS.get(usize::try_from(month).ok()?.checked_sub(1)?)?;
    let timestamp = days_from_civil(year, month, day) * 86_400 + seconds_of_day;
    Some((format!("{day} {month_name} {year}"), timestamp))
}

/// English month names, January first, as dates are written.
pub(crate) const MONTHS: [&str; 12] =
    ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];

fn is_leap_year(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap_year(year) => 29,
        2 => 28,
        _ => 0,
    }
}

fn valid_date(year: i64, month: u32, day: u32) -> Option<(i64, u32, u32)> {
    (day >= 1 && day <= days_in_month(year, month)).then_some((year, month, day))
}

/// The UTC date of unix time `seconds`, written as conversations and memories write
/// dates ("8 May 2023").
pub fn format_date(seconds: i64) -> String {
    let (year, month, day) = civil_from_days(seconds.div_euclid(86_400));
    let month_name = MONTHS.get(month as usize - 1).copied().unwrap_or("?");
    format!("{day} {month_name} {year}")
}

/// The inverse of [`days_from_civil`] (Howard Hinnant's civil_from_days).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let days = days + 719_468;
    let era = if days >= 0 { days } else { days - 146_096 } / 146_097;
    let day_of_era = days - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 } as u32;
    (year_of_era + era * 400 + i64::from(month <= 2), month, day)
}

/// Days since 1970-01-01 (Howard Hinnant's days_from_civil, proleptic Gregorian).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = if year >= 0 { year } else { year - 399 } / 400;
    let year_of_era = year - era * 400;
    let month_from_march = i64::from((month + 9) % 12);
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn digits(text: &str, min_len: usize, max_len: usize) -> Option<u32> {
    let ok = (min_len..=max_len).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_digit());
    if ok {
        text.parse().ok()
    } else {
        None
    }
}

/// "1:56 pm", "1:56pm", "1 pm", "12:05 a.m.", "13:56", "13:56:07" → seconds since midnight.
fn parse_clock(text: &str) -> Option<i64> {
    let text = text.trim();
    let (text, meridiem) = if let Some(rest) = text.strip_suffix("am").or_else(|| text.strip_suffix("a.m.")) {
        (rest.trim_end(), Some(false))
    } else if let Some(rest) = text.strip_suffix("pm").or_else(|| text.strip_suffix("p.m.")) {
        (rest.trim_end(), Some(true))
    } else {
        (text, None)
    };
    let mut parts = text.split(':');
    let hour = digits(parts.next()?, 1, 2)?;
    let minute = parts.next().map_or(Some(0), |m| digits(m, 2, 2))?;
    let second = parts.next().map_or(Some(0), |s| digits(s, 2, 2))?;
    if parts.next().is_some() || minute > 59 || second > 59 {
        return None;
    }
    let hour = match meridiem {
        // 12 am is midnight and 12 pm is noon: the 12 wraps to 0 before the pm offset.
        Some(pm) if (1..=12).contains(&hour) => hour % 12 + if pm { 12 } else { 0 },
        Some(_) => return None,
        // A bare "13" is more likely a day or a count than a time.
        None if !text.contains(':') || hour > 23 => return None,
        None => hour,
    };
    Some(i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second))
}

/// "2023-05-08", optionally followed by "T" or a space and a time, optionally with fractional
/// seconds and a "Z" or "±HH:MM" zone; the time comes back in UTC seconds of that day, which
/// may fall outside 0..86400 when a zone shifts it across midnight.
fn parse_iso(text: &str) -> Option<((i64, u32, u32), Option<i64>)> {
    let date = text.get(..10)?;
    let mut fields = date.split('-');
    let year = digits(fields.next()?, 4, 4)?;
    let month = digits(fields.next()?, 2, 2)?;
    let day = digits(fields.next()?, 2, 2)?;
    if fields.next().is_some() {
        return None;
    }
    let date = valid_date(i64::from(year), month, day)?;
    let rest = text.get(10..)?;
    if rest.is_empty() {
        return Some((date, None));
    }
    let time = rest.strip_prefix('t').or_else(|| rest.strip_prefix(' '))?.trim();
    let (time, offset) = split_zone(time)?;
    let time = match time.split_once('.') {
        Some((whole, fraction)) if !fraction.is_empty() && fraction.bytes().all(|b| b.is_ascii_digit()) => whole,
        Some(_) => return None,
        None => time,
    };
    Some((date, Some(parse_clock(time)? - offset)))
}

/// Splits "13:56:00+02:00" into ("13:56:00", 7200); "Z" is offset 0, no zone is UTC.
fn split_zone(time: &str) -> Option<(&str, i64)> {
    if let Some(time) = time.strip_suffix('z') {
        return Some((time.trim_end(), 0));
    }
    let Some(at) = time.rfind(['+', '-']) else { return Some((time, 0)) };
    let (clock, zone) = time.split_at(at);
    let sign = if zone.starts_with('-') { -1 } else { 1 };
    let zone = zone.get(1..)?;
    let (hours, minutes) = match zone.split_once(':') {
        Some((hours, minutes)) => (digits(hours, 2, 2)?, digits(minutes, 2, 2)?),
        None => {
            let minutes = zone.get(2..)?;
            (digits(zone.get(..2)?, 2, 2)?, if minutes.is_empty() { 0 } else { digits(minutes, 2, 2)? })
        }
    };
    if hours > 14 || minutes > 59 {
        return None;
    }
    Some((clock.trim_end(), sign * (i64::from(hours) * 3600 + i64::from(minutes) * 60)))
}

/// "8 May, 2023", "8 May 2023", "May 8, 2023", "8th May 2023", "Sept. 8 2023".
fn parse_written_date(text: &str) -> Option<(i64, u32, u32)> {
    let words: Vec<&str> = text.split(|c: char| c == ',' || c.is_whitespace()).filter(|w| !w.is_empty()).collect();
    let [first, second, year] = words.as_slice() else { return None };
    let (day, month) = match (day_number(first), month_number(second)) {
        (Some(day), Some(month)) => (day, month),
        _ => (day_number(second)?, month_number(first)?),
    };
    valid_date(i64::from(digits(year, 4, 4)?), month, day)
}

fn day_number(word: &str) -> Option<u32> {
    let word = ["st", "nd", "rd", "th"].iter().find_map(|suffix| word.strip_suffix(suffix)).unwrap_or(word);
    digits(word, 1, 2)
}

/// Full names and abbreviations of at least three letters ("sep", "sept.", "september").
fn month_number(word: &str) -> Option<u32> {
    let word = word.strip_suffix('.').unwrap_or(word);
    if word.len() < 3 {
        return None;
    }
    let index = MONTHS.iter().position(|name| name.to_ascii_lowercase().starts_with(word))?;
    u32::try_from(index + 1).ok()
}

/// "300 MiB", "256.1 MiB", "1.5 KiB", "10 bytes". Rounded up, so a file just over the limit
/// never prints as the limit itself.
fn human_size(bytes: u64) -> String {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * 1024;
    let (unit, name) = if bytes >= MIB {
        (MIB, "MiB")
    } else if bytes >= KIB {
        (KIB, "KiB")
    } else {
        return format!("{bytes} bytes");
    };
    let tenths = (u128::from(bytes) * 10).div_ceil(u128::from(unit));
    if tenths % 10 == 0 {
        format!("{} {name}", tenths / 10)
    } else {
        format!("{}.{} {name}", tenths / 10, tenths % 10)
    }
}

fn unknown_conversations_message(missing: &[String], available: &[String]) -> String {
    let missing_list = missing.iter().map(|id| format!("{id:?}")).collect::<Vec<_>>().join(", ");
    let noun = if missing.len() == 1 { "conversation" } else { "conversations" };
    let has = if available.is_empty() {
        "none".to_string()
    } else {
        let mut listed = available.iter().take(MAX_LISTED_IDS).map(|id| id.escape_debug().to_string()).collect::<Vec<_>>().join(", ");
        if available.len() > MAX_LISTED_IDS {
            listed = format!("{listed}, … ({} in all)", available.len());
        }
        listed
    };
    format!("no {noun} {missing_list} (the file has {has})")
}

fn check_size(path: &Path, size: u64, limit: u64) -> Result<(), TranscriptError> {
    if size > limit {
        return Err(TranscriptError::TooLarge { path: path.to_path_buf(), size, limit });
    }
    Ok(())
}

fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, TranscriptError> {
    let read_error = |source: std::io::Error| TranscriptError::Read { path: path.to_path_buf(), source };
    let file = File::open(path).map_err(read_error)?;
    let size = file.metadata().map_err(read_error)?.len();
    check_size(path, size, limit)?;
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    // The file may grow between the size check and the read (a log still being written).
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes).map_err(read_error)?;
    check_size(path, u64::try_from(bytes.len()).unwrap_or(u64::MAX), limit)?;
    Ok(bytes)
}

fn strip_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)
}

/// Parses the bytes of a LoCoMo file named `path` (errors name it).
pub fn parse_locomo(bytes: &[u8], path: &Path) -> Result<Vec<Conversation>, TranscriptError> {
    let value: Value =
        serde_json::from_slice(strip_bom(bytes)).map_err(|source| TranscriptError::NotJson { path: path.to_path_buf(), source })?;
    locomo_conversations(value).map_err(|message| TranscriptError::Invalid { path: path.to_path_buf(), message })
}

/// "a string", "a list", … for messages about values of the wrong type.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// An optional string field; null counts as absent because exporters write it for "none".
fn optional_str<'a>(object: &'a Map<String, Value>, key: &str, context: &str) -> Result<Option<&'a str>, String> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(other) => Err(format!("{context}: {key:?} is {}, not a string", kind(other))),
    }
}

/// A string or a number (LoCoMo has answers like `2022`); empty text counts as absent.
fn optional_answer(object: &Map<String, Value>, key: &str, context: &str) -> Result<Option<String>, String> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.trim().to_string()).filter(|text| !text.is_empty())),
        Some(Value::Number(number)) => Ok(Some(number.to_string())),
        Some(other) => Err(format!("{context}: {key:?} is {}, not a string or number", kind(other))),
    }
}

/// One string or a list of strings; absent or null is an empty list.
fn string_list(value: Option<&Value>, what: impl Fn() -> String) -> Result<Vec<String>, String> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(text)) => Ok(vec![text.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(text) => Ok(text.clone()),
                other => Err(format!("{} contains {}, not a string", what(), kind(other))),
            })
            .collect(),
        Some(other) => Err(format!("{} is {}, not a string or list of strings", what(), kind(other))),
    }
}

/// A few LoCoMo evidence entries pack several ids into one string ("D8:6; D9:17", "D9:1 D4:4"),
/// so ids are split on separators; anything else is kept as written, even if it is no valid id.
fn evidence_ids(entries: &[String]) -> Vec<String> {
    entries
        .iter()
        .flat_map(|entry| entry.split(|c: char| c == ';' || c == ',' || c.is_whitespace()))
        .filter(|id| !id.is_empty())
        .map(str::to_string)
        .collect()
}

fn locomo_conversations(value: Value) -> Result<Vec<Conversation>, String> {
    let items = match value {
        Value::Array(items) => items,
        other => return Err(format!("expected a list of LoCoMo conversations, found {}", kind(&other))),
    };
    if items.is_empty() {
        return Err("the list of conversations is empty".to_string());
    }
    let mut conversations: Vec<Conversation> = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let conversation = locomo_conversation(item, index + 1)?;
        // Ids are how conversations are selected and how results are reported, so they must be unique.
        if conversations.iter().any(|c| c.id == conversation.id) {
            return Err(format!("conversation id {:?} appears more than once", conversation.id));
        }
        conversations.push(conversation);
    }
    Ok(conversations)
}

/// What is known about one LoCoMo session while its keys are being collected.
#[derive(Default)]
struct RawSession<'a> {
    turns: Option<&'a Value>,
    date_time: Option<&'a str>,
}

fn locomo_conversation(item: &Value, position: usize) -> Result<Conversation, String> {
    let Value::Object(object) = item else {
        return Err(format!("conversation {position} is {}, not an object", kind(item)));
    };
    let id = match optional_str(object, "sample_id", &format!("conversation {position}"))?.map(str::trim) {
        Some(id) if !id.is_empty() => id.to_string(),
        // Hand-made files may lack ids; a positional one still lets them be selected.
        _ => format!("conversation-{position}"),
    };
    let label = id.escape_debug().to_string();
    let dialogue = match object.get("conversation") {
        Some(Value::Object(dialogue)) => dialogue,
        None | Some(Value::Null) => return Err(format!("{label} has no \"conversation\" object")),
        Some(other) => return Err(format!("{label}: \"conversation\" is {}, not an object", kind(other))),
    };

    let mut speakers: Vec<String> = Vec::new();
    for key in ["speaker_a", "speaker_b"] {
        if let Some(name) = optional_str(dialogue, key, &label)?.map(str::trim).filter(|name| !name.is_empty()) {
            if !speakers.iter().any(|s| s == name) {
                speakers.push(name.to_string());
            }
        }
    }

    let mut raw_sessions: BTreeMap<u32, RawSession> = BTreeMap::new();
    for (key, value) in dialogue {
        let Some(rest) = key.strip_prefix("session_") else { continue };
        let (number, is_date) = match rest.strip_suffix("_date_time") {
            Some(number) => (number, true),
            None => (rest, false),
        };
        // Other session_* keys (summaries in some exports) are not ours to interpret.
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let number = session_number(number).map_err(|reason| format!("{label} has a key {key:?}: {reason}"))?;
        let raw = raw_sessions.entry(number).or_default();
        if is_date {
            raw.date_time = match value {
                Value::String(text) => Some(text.as_str()).filter(|text| !text.trim().is_empty()),
                Value::Null => None,
                other => return Err(format!("{label} {key} is {}, not a string", kind(other))),
            };
        } else {
            raw.turns = Some(value);
        }
    }

    let mut turn_ids: HashSet<String> = HashSet::new();
    let mut sessions = Vec::new();
    for (number, raw) in raw_sessions {
        // LoCoMo lists dates for sessions that were never generated; they have no turns to keep.
        let Some(turns_value) = raw.turns else { continue };
        let turns = locomo_turns(turns_value, number, &label, &mut speakers, &mut turn_ids)?;
        if turns.is_empty() {
            continue;
        }
        let date_time = raw.date_time.map(|text| text.trim().to_string());
        let parsed = date_time.as_deref().and_then(parse_date_time);
        sessions.push(Session {
            number,
            date_time,
            date: parsed.as_ref().map(|(date, _)| date.clone()),
            timestamp: parsed.map(|(_, timestamp)| timestamp),
            turns,
            observations: Vec::new(),
        });
    }
    if sessions.is_empty() {
        return Err(format!("{label} has no turns"));
    }

    locomo_observations(object.get("observation"), &label, &speakers, &mut sessions)?;
    let qa = locomo_qa(object.get("qa"), &label)?;
    Ok(Conversation { id, speakers, sessions, qa })
}

fn locomo_turns(
    value: &Value,
    session: u32,
    label: &str,
    speakers: &mut Vec<String>,
    turn_ids: &mut HashSet<String>,
) -> Result<Vec<Turn>, String> {
    let items = match value {
        Value::Array(items) => items,
        Value::Null => return Ok(Vec::new()),
        other => return Err(format!("{label} session_{session} is {}, not a list of turns", kind(other))),
    };
    let mut turns = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let position = index + 1;
        let context = format!("{label} session_{session} turn {position}");
        let Value::Object(object) = item else {
            return Err(format!("{context} is {}, not an object", kind(item)));
        };
        let speaker = match optional_str(object, "speaker", &context)?.map(str::trim) {
            Some(speaker) if !speaker.is_empty() => speaker.to_string(),
            _ => return Err(format!("{context} has no \"speaker\"")),
        };
        let Some(text) = optional_str(object, "text", &context)? else {
            return Err(format!("{context} has no \"text\""));
        };
        let text = text.trim();
        // An empty turn carries nothing to remember; dropping it beats failing a whole file.
        if text.is_empty() {
            continue;
        }
        let id = match optional_str(object, "dia_id", &context)?.map(str::trim) {
            Some(id) if !id.is_empty() => id.to_string(),
            // Positional, so it matches the evidence ids a hand-written file would use.
            _ => format!("D{session}:{position}"),
        };
        if !turn_ids.insert(id.clone()) {
            return Err(format!("{context}: turn id {id:?} is used twice"));
        }
        let image_caption =
            optional_str(object, "blip_caption", &context)?.map(str::trim).filter(|caption| !caption.is_empty()).map(str::to_string);
        let image_urls = string_list(object.get("img_url"), || format!("{context} \"img_url\""))?;
        if !speakers.contains(&speaker) {
            speakers.push(speaker.clone());
        }
        turns.push(Turn { id, speaker, text: text.to_string(), image_caption, image_urls });
    }
    Ok(turns)
}

fn locomo_observations(value: Option<&Value>, label: &str, speakers: &[String], sessions: &mut [Session]) -> Result<(), String> {
    let by_session = match value {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Object(by_session)) => by_session,
        Some(other) => return Err(format!("{label}: \"observation\" is {}, not an object", kind(other))),
    };
    for (key, value) in by_session {
        let Some(number) = key.strip_prefix("session_").and_then(|rest| rest.strip_suffix("_observation")) else { continue };
        let Ok(number) = session_number(number) else { continue };
        let by_speaker = match value {
            Value::Object(by_speaker) => by_speaker,
            Value::Null => continue,
            other => return Err(format!("{label} {key} is {}, not an object", kind(other))),
        };
        let mut observations = Vec::new();
        for (speaker, facts) in by_speaker {
            let context = format!("{label} {key} {speaker:?}");
            let facts = match facts {
                Value::Array(facts) => facts,
                Value::Null => continue,
                other => return Err(format!("{context} is {}, not a list of facts", kind(other))),
            };
            for (index, entry) in facts.iter().enumerate() {
                let item = format!("{context} item {}", index + 1);
                let (fact, evidence) = match entry {
                    Value::Array(pair) => match pair.as_slice() {
                        [Value::String(fact)] => (fact, Vec::new()),
                        [Value::String(fact), evidence] => (fact, string_list(Some(evidence), || format!("{item} evidence"))?),
                        _ => return Err(format!("{item} is not a [fact, evidence] pair")),
                    },
                    // A bare fact without evidence is still a fact.
                    Value::String(fact) => (fact, Vec::new()),
                    other => return Err(format!("{item} is {}, not a [fact, evidence] pair", kind(other))),
                };
                let fact = fact.trim();
                if !fact.is_empty() {
                    observations.push(Observation {
                        speaker: speaker.trim().to_string(),
                        fact: fact.to_string(),
                        evidence: evidence_ids(&evidence),
                    });
                }
            }
        }
        // JSON object order is not guaranteed to survive parsing (serde_json sorts keys unless
        // preserve_order is on), so order by the conversation's speakers instead.
        let rank = |name: &str| speakers.iter().position(|s| s == name).unwrap_or(usize::MAX);
        observations.sort_by(|a, b| rank(&a.speaker).cmp(&rank(&b.speaker)).then_with(|| a.speaker.cmp(&b.speaker)));
        // Facts about a session that has no turns have nothing to attach to.
        if let Some(session) = sessions.iter_mut().find(|s| s.number == number) {
            session.observations = observations;
        }
    }
    Ok(())
}

fn locomo_qa(value: Option<&Value>, label: &str) -> Result<Vec<QaItem>, String> {
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => return Err(format!("{label}: \"qa\" is {}, not a list", kind(other))),
    };
    let mut qa = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let context = format!("{label} qa {}", index + 1);
        let Value::Object(object) = item else {
            return Err(format!("{context} is {}, not an object", kind(item)));
        };
        let question = match optional_str(object, "question", &context)?.map(str::trim) {
            Some(question) if !question.is_empty() => question.to_string(),
            _ => return Err(format!("{context} has no \"question\"")),
        };
        let category = match object.get("category") {
            None | Some(Value::Null) => return Err(format!("{context} has no \"category\"")),
            Some(value) => value
                .as_u64()
                .and_then(|category| u8::try_from(category).ok())
                .ok_or_else(|| format!("{context} has a \"category\" that is not a small whole number: {value}"))?,
        };
        qa.push(QaItem {
            question,
            answer: optional_answer(object, "answer", &context)?,
            evidence: evidence_ids(&string_list(object.get("evidence"), || format!("{context} \"evidence\""))?),
            category,
            adversarial_answer: optional_answer(object, "adversarial_answer", &context)?,
        });
    }
    Ok(qa)
}

/// A session of a plain transcript while its lines are being read.
struct TextSession {
    number: u32,
    date_time: Option<String>,
    turns: Vec<(String, String)>,
}

/// Parses the bytes of a plain transcript named `path` as one conversation named `id`.
pub fn parse_text(bytes: &[u8], path: &Path, id: &str) -> Result<Conversation, TranscriptError> {
    let body = strip_bom(bytes);
    let bom_length = bytes.len() - body.len();
    let text = std::str::from_utf8(body)
        .map_err(|error| TranscriptError::NotUtf8 { path: path.to_path_buf(), offset: bom_length + error.valid_up_to() })?;
    let line_error = |line: usize, message: &str| TranscriptError::Line { path: path.to_path_buf(), line, message: message.to_string() };

    let mut sessions = vec![TextSession { number: 1, date_time: None, turns: Vec::new() }];
    // Until the first header, session 1 is implicit: a header that arrives before any turn names it
    // rather than starting session 2.
    let mut implicit_first = true;
    for (index, line) in text.lines().enumerate() {
        let line_number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        if let Some(header) = line.strip_prefix('#') {
            let header = header.trim_start_matches('#').trim();
            let date_time = Some(header.to_string()).filter(|header| !header.is_empty());
            match sessions.last_mut() {
                Some(first) if implicit_first && first.turns.is_empty() => first.date_time = date_time,
                _ => {
                    let number = u32::try_from(sessions.len() + 1).map_err(|_| line_error(line_number, "too many sessions"))?;
                    sessions.push(TextSession { number, date_time, turns: Vec::new() });
                }
            }
            implicit_first = false;
            continue;
        }
        let Some(session) = sessions.last_mut() else { continue };
        if let Some((speaker, said)) = split_speaker(line) {
            session.turns.push((speaker.to_string(), said.to_string()));
            continue;
        }
        let Some((_, said)) = session.turns.last_mut() else {
            let message = if session.number == 1 && implicit_first {
                "text before the first speaker line"
            } else {
                // Continuing the previous session's last turn across a header would be a silent mix-up.
                "text after a session header before any speaker line"
            };
            return Err(line_error(line_number, message));
        };
        if !said.is_empty() {
            said.push('\n');
        }
        said.push_str(line.trim());
    }

    let mut speakers: Vec<String> = Vec::new();
    let mut kept = Vec::new();
    for draft in sessions {
        let mut turns = Vec::new();
        for (speaker, text) in draft.turns {
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            if !speakers.contains(&speaker) {
                speakers.push(speaker.clone());
            }
            turns.push(Turn {
                id: format!("D{}:{}", draft.number, turns.len() + 1),
                speaker,
                text: text.to_string(),
                image_caption: None,
                image_urls: Vec::new(),
            });
        }
        if turns.is_empty() {
            continue;
        }
        let parsed = draft.date_time.as_deref().and_then(parse_date_time);
        kept.push(Session {
            number: draft.number,
            date: parsed.as_ref().map(|(date, _)| date.clone()),
            timestamp: parsed.map(|(_, timestamp)| timestamp),
            date_time: draft.date_time,
            turns,
            observations: Vec::new(),
        });
    }
    if kept.is_empty() {
        return Err(TranscriptError::Invalid { path: path.to_path_buf(), message: "no \"Speaker: text\" lines".to_string() });
    }
    Ok(Conversation { id: id.to_string(), speakers, sessions: kept, qa: Vec::new() })
}

/// "Maya: hello" → ("Maya", "hello"). The name must be 1–40 characters, not indented (so an
/// indented "P.S.: …" continues a turn), and contain a letter (so "10:30 we met" is not a speaker).
fn split_speaker(line: &str) -> Option<(&str, &str)> {
    if line.starts_with(char::is_whitespace) {
        return None;
    }
    let (name, said) = line.split_once(':')?;
    let name = name.trim();
    let length = name.chars().count();
    if !(1..=40).contains(&length) || !name.chars().any(char::is_alphabetic) {
        return None;
    }
    Some((name, said.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// The demo files shipped in `assets/`.
    const DEMO_TRANSCRIPT: &str = include_str!("../assets/demo-transcript.txt");

    #[test]
    fn format_date_inverts_parse_date_time() {
        for text in ["8 May 2023", "29 February 2024", "1 January 1970", "31 December 1969", "28 February 2100"] {
            let (normalised, seconds) = parse_date_time(text).unwrap();
            assert_eq!(format_date(seconds), normalised);
            assert_eq!(format_date(seconds + 86_399), normalised);
        }
        assert_eq!(format_date(1_683_554_160), "8 May 2023");
    }

    fn locomo_path() -> Option<PathBuf> {
        let path = match std::env::var_os("MEMLORA_LOCOMO") {
            Some(path) => PathBuf::from(path),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/locomo/locomo8.json"),
        };
        if path.is_file() {
            Some(path)
        } else {
            println!("skipped: no LoCoMo file at {} (set MEMLORA_LOCOMO)", path.display());
            None
        }
    }

    fn write(dir: &tempfile::TempDir, name: &str, contents: &str) -> PathBuf {
        let path = dir.path().join(name);
        fs::write(&path, contents).unwrap();
        path
    }

    fn locomo_error(json: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "bad.json", json);
        let error = load_locomo(&path).unwrap_err();
        let message = error.to_string();
        assert!(message.starts_with(&path.display().to_string()), "{message}");
        assert!(!message.contains('\n'), "{message}");
        message
    }

    fn text_result(text: &str) -> Result<Conversation, TranscriptError> {
        parse_text(text.as_bytes(), Path::new("chat.txt"), "chat")
    }

    fn ts(year: i64, month: u32, day: u32, hour: i64, minute: i64) -> i64 {
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60
    }

    /// A minimal valid conversation with `session` spliced in as `session_1`.
    fn one_session(session: &str) -> String {
        format!(r#"[{{"sample_id": "c1", "conversation": {{"speaker_a": "A", "speaker_b": "B", "session_1": {session}}}}}]"#)
    }

    #[test]
    fn loads_real_locomo_file() {
        let Some(path) = locomo_path() else { return };
        let conversations = load_locomo(&path).unwrap();
        assert_eq!(conversations.len(), 8);
        let ids: Vec<&str> = conversations.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["conv-26", "conv-42", "conv-43", "conv-44", "conv-47", "conv-48", "conv-49", "conv-50"]);

        let conv = &conversations[0];
        assert_eq!(conv.speakers, ["Caroline", "Melanie"]);
        // 35 dated sessions, only 19 with turns.
        assert_eq!(conv.sessions.len(), 19);
        assert_eq!(conv.sessions.iter().map(|s| s.number).collect::<Vec<_>>(), (1..=19).collect::<Vec<_>>());
        let first = &conv.sessions[0];
        assert_eq!(first.date_time.as_deref(), Some("1:56 pm on 8 May, 2023"));
        assert_eq!(first.date.as_deref(), Some("8 May 2023"));
        assert_eq!(first.timestamp, Some(1_683_554_160));
        assert_eq!(first.turns[0].id, "D1:1");
        assert_eq!(first.turns[0].speaker, "Caroline");
        assert_eq!(first.turns[0].text, "Hey Mel! Good to see you! How have you been?");
        let photo = first.turns.iter().find(|t| t.id == "D1:5").unwrap();
        assert_eq!(photo.image_caption.as_deref(), Some("a photo of a dog walking past a wall with a painting of a woman"));
        assert_eq!(photo.image_urls.len(), 1);
        assert_eq!(conv.sessions.iter().map(|s| s.turns.len()).sum::<usize>(), 419);

        assert_eq!(conv.qa.len(), 199);
        assert_eq!(conv.qa.iter().filter(|q| (1..=4).contains(&q.category)).count(), 152);
        let sunrise = conv.qa.iter().find(|q| q.question == "When did Melanie paint a sunrise?").unwrap();
        assert_eq!(sunrise.answer.as_deref(), Some("2022"));
        let children = conv.qa.iter().find(|q| q.question == "How many children does Melanie have?").unwrap();
        assert_eq!(children.answer.as_deref(), Some("3"));
        assert!(conv.qa.iter().filter(|q| q.category == 5).all(|q| q.adversarial_answer.is_some()));

        let observation = &first.observations[0];
        assert_eq!(observation.speaker, "Caroline");
        assert_eq!(observation.evidence, ["D1:3"]);
        assert!(observation.fact.starts_with("Caroline attended an LGBTQ support group"));
        assert!(conv.sessions.iter().all(|s| !s.observations.is_empty()));

        for conversation in &conversations {
            assert!(!conversation.qa.is_empty(), "{}", conversation.id);
            for session in &conversation.sessions {
                assert!(session.timestamp.is_some(), "{} session {} {:?}", conversation.id, session.number, session.date_time);
            }
        }
        // "D8:6; D9:17" in the source is two ids.
        let all_evidence: Vec<&String> = conversations.iter().flat_map(|c| &c.qa).flat_map(|q| &q.evidence).collect();
        assert!(all_evidence.iter().all(|id| !id.contains(';') && !id.contains(' ')));
        // Observation evidence given as a list (conv-43 has several).
        assert!(conversations.iter().flat_map(|c| &c.sessions).flat_map(|s| &s.observations).any(|o| o.evidence.len() > 1));
    }

    #[test]
    fn demo_conversation_matches_its_contents() {
        let conversations = parse_locomo(DEMO_CONVERSATION.as_bytes(), Path::new("demo-conversation.json")).unwrap();
        assert_eq!(conversations.len(), 1);
        let conv = &conversations[0];
        assert_eq!(conv.id, "demo-maya-tom");
        assert_eq!(conv.speakers, ["Maya", "Tom"]);
        assert_eq!(conv.sessions.len(), 3);
        let dates: Vec<_> = conv.sessions.iter().map(|s| (s.date.as_deref().unwrap(), s.timestamp.unwrap())).collect();
        assert_eq!(dates, [("14 March 2023", 1_678_822_200), ("2 June 2023", 1_685_700_900), ("19 September 2023", 1_695_082_800)]);
        assert_eq!(conv.sessions.iter().map(|s| s.turns.len()).collect::<Vec<_>>(), [8, 8, 9]);
        let adoption = &conv.sessions[1].turns[0];
        assert_eq!(adoption.id, "D2:1");
        assert_eq!(adoption.speaker, "Tom");
        assert!(adoption.text.contains("Biscuit"));
        assert_eq!(adoption.image_caption.as_deref(), Some("a photo of a beagle sitting on a wooden floor"));
        assert!(conv.sessions[2].turns[0].text.contains("Denver"));
        assert!(conv.sessions.iter().all(|s| s.observations.iter().any(|o| o.speaker == "Maya") && !s.observations.is_empty()));
        assert_eq!(conv.sessions[2].observations[0].speaker, "Maya");

        assert_eq!(conv.qa.len(), 9);
        for category in 1..=5 {
            assert!(conv.qa.iter().any(|q| q.category == category), "category {category}");
        }
        let years = conv.qa.iter().find(|q| q.question.starts_with("How many years")).unwrap();
        assert_eq!(years.answer.as_deref(), Some("8"));
        let adversarial = conv.qa.iter().find(|q| q.category == 5).unwrap();
        assert_eq!(adversarial.answer, None);
        assert_eq!(adversarial.adversarial_answer.as_deref(), Some("beagle"));
        // Every evidence id names a real turn.
        let ids: HashSet<&str> = conv.sessions.iter().flat_map(|s| &s.turns).map(|t| t.id.as_str()).collect();
        let cited =
            conv.qa.iter().flat_map(|q| &q.evidence).chain(conv.sessions.iter().flat_map(|s| &s.observations).flat_map(|o| &o.evidence));
        for id in cited {
            assert!(ids.contains(id.as_str()), "{id}");
        }
    }

    #[test]
    fn demo_transcript_loads_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "demo-transcript.txt", DEMO_TRANSCRIPT);
        let conv = load_text(&path, "demo-transcript").unwrap();
        assert_eq!(conv.id, "demo-transcript");
        assert_eq!(conv.speakers, ["Maya", "Tom"]);
        assert_eq!(conv.sessions.len(), 2);
        assert_eq!(conv.sessions[0].date.as_deref(), Some("12 January 2024"));
        assert_eq!(conv.sessions[0].timestamp, Some(1_705_084_800));
        assert_eq!(conv.sessions[1].date_time.as_deref(), Some("2024-03-03 09:15"));
        assert_eq!(conv.sessions[1].timestamp, Some(1_709_457_300));
        let juniper = conv.sessions[0].turns.iter().find(|t| t.text.contains("Juniper")).unwrap();
        assert_eq!(juniper.text.lines().count(), 3, "{:?}", juniper.text);
        assert!(juniper.text.ends_with("P.S.: she already hates the vacuum."));
        for session in &conv.sessions {
            assert!(session.turns.iter().all(|t| t.id.starts_with(&format!("D{}:", session.number))));
        }
    }

    #[test]
    fn rejects_files_that_are_not_locomo() {
        assert!(locomo_error("{not json").contains("is not JSON: key must be a string at line 1 column 2"));
        assert!(locomo_error(r#"{"conv-26": {}}"#).ends_with("expected a list of LoCoMo conversations, found an object"));
        assert!(locomo_error("[]").ends_with("the list of conversations is empty"));
        assert!(locomo_error(r#"[{"sample_id": "c1"}]"#).ends_with(r#"c1 has no "conversation" object"#));
        assert!(locomo_error(r#"[{"sample_id": "c1", "conversation": []}]"#).ends_with(r#"c1: "conversation" is a list, not an object"#));
        assert!(locomo_error(r#"[3]"#).ends_with("conversation 1 is a number, not an object"));
        let twice = r#"[{"sample_id": "c1", "conversation": {"session_1": [{"speaker": "A", "text": "hi"}]}},
                        {"sample_id": "c1", "conversation": {"session_1": [{"speaker": "A", "text": "hi"}]}}]"#;
        assert!(locomo_error(twice).ends_with(r#"conversation id "c1" appears more than once"#));
    }

    #[test]
    fn rejects_malformed_turns() {
        let message = locomo_error(&one_session(r#"[{"speaker": "A", "text": "hi"}, {"text": "no speaker"}]"#));
        assert!(message.ends_with(r#": c1 session_1 turn 2 has no "speaker""#), "{message}");
        assert!(locomo_error(&one_session(r#"[{"speaker": " ", "text": "x"}]"#)).ends_with(r#"turn 1 has no "speaker""#));
        assert!(locomo_error(&one_session(r#"[{"speaker": "A"}]"#)).ends_with(r#"c1 session_1 turn 1 has no "text""#));
        assert!(locomo_error(&one_session(r#"[{"speaker": "A", "text": 5}]"#)).ends_with(r#"turn 1: "text" is a number, not a string"#));
        assert!(locomo_error(&one_session(r#""hello""#)).ends_with("c1 session_1 is a string, not a list of turns"));
        assert!(locomo_error(&one_session(r#"["hello"]"#)).ends_with("c1 session_1 turn 1 is a string, not an object"));
        let duplicate = r#"[{"speaker": "A", "text": "x", "dia_id": "D1:1"}, {"speaker": "B", "text": "y", "dia_id": "D1:1"}]"#;
        assert!(locomo_error(&one_session(duplicate)).ends_with(r#"turn 2: turn id "D1:1" is used twice"#));
        assert!(locomo_error(&one_session(r#"[{"speaker": "A", "text": "x", "img_url": [1]}]"#))
            .ends_with(r#""img_url" contains a number, not a string"#));
    }

    #[test]
    fn sessions_without_turns_are_skipped() {
        let json = r#"[{"sample_id": "c1", "conversation": {
            "speaker_a": "A", "speaker_b": "B",
            "session_3_date_time": "9:00 am on 3 May, 2023",
            "session_3": [{"speaker": "C", "text": "third"}, {"speaker": "A", "text": "  "}, {"speaker": "B", "text": "again"}],
            "session_1_date_time": "8:00 am on 1 May, 2023",
            "session_1": [{"speaker": "B", "text": " first ", "blip_caption": "a cat", "img_url": "http://x/cat.jpg"}],
            "session_2_date_time": "8:00 am on 2 May, 2023",
            "session_2": [],
            "session_4_date_time": "8:00 am on 4 May, 2023",
            "session_5_date_time": "sometime in June",
            "session_5": [{"speaker": "A", "text": "undated"}]
        },
        "observation": {"session_1_observation": {"B": [["B has a cat.", "D1:1"]], "A": [["A exists.", ["D1:1", "D3:1"]], "Bare fact."]},
                        "session_4_observation": {"A": [["lost", "D4:1"]]}},
        "qa": [{"question": "Q?", "answer": 2.5, "evidence": "D1:1; D3:1", "category": 4},
               {"question": "Adv?", "adversarial_answer": "yes", "evidence": ["D1:1"], "category": 5}]}]"#;
        let conversations = parse_locomo(json.as_bytes(), Path::new("x.json")).unwrap();
        let conv = &conversations[0];
        assert_eq!(conv.speakers, ["A", "B", "C"]);
        assert_eq!(conv.sessions.iter().map(|s| s.number).collect::<Vec<_>>(), [1, 3, 5]);
        let first = &conv.sessions[0];
        assert_eq!(first.timestamp, Some(ts(2023, 5, 1, 8, 0)));
        assert_eq!(
            first.turns,
            [Turn {
                id: "D1:1".into(),
                speaker: "B".into(),
                text: "first".into(),
                image_caption: Some("a cat".into()),
                image_urls: vec!["http://x/cat.jpg".into()]
            }]
        );
        // Generated ids stay positional, so the dropped empty turn leaves a gap.
        assert_eq!(conv.sessions[1].turns.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["D3:1", "D3:3"]);
        assert_eq!(conv.sessions[2].date_time.as_deref(), Some("sometime in June"));
        assert_eq!((conv.sessions[2].date.as_deref(), conv.sessions[2].timestamp), (None, None));
        assert_eq!(
            first.observations,
            [
                Observation { speaker: "A".into(), fact: "A exists.".into(), evidence: vec!["D1:1".into(), "D3:1".into()] },
                Observation { speaker: "A".into(), fact: "Bare fact.".into(), evidence: vec![] },
                Observation { speaker: "B".into(), fact: "B has a cat.".into(), evidence: vec!["D1:1".into()] },
            ]
        );
        assert_eq!(
            conv.qa,
            [
                QaItem {
                    question: "Q?".into(),
                    answer: Some("2.5".into()),
                    evidence: vec!["D1:1".into(), "D3:1".into()],
                    category: 4,
                    adversarial_answer: None
                },
                QaItem {
                    question: "Adv?".into(),
                    answer: None,
                    evidence: vec!["D1:1".into()],
                    category: 5,
                    adversarial_answer: Some("yes".into())
                },
            ]
        );

        let empty = one_session(r#"[{"speaker": "A", "text": ""}]"#);
        assert!(locomo_error(&empty).ends_with("c1 has no turns"));
    }

    #[test]
    fn rejects_malformed_qa_and_observations() {
        let with = |extra: &str| {
            format!(r#"[{{"sample_id": "c1", "conversation": {{"session_1": [{{"speaker": "A", "text": "hi"}}]}}, {extra}}}]"#)
        };
        assert!(locomo_error(&with(r#""qa": [{"answer": "x", "category": 1}]"#)).ends_with(r#"c1 qa 1 has no "question""#));
        assert!(locomo_error(&with(r#""qa": [{"question": "q"}]"#)).ends_with(r#"c1 qa 1 has no "category""#));
        assert!(locomo_error(&with(r#""qa": [{"question": "q", "category": 300}]"#)).contains("not a small whole number: 300"));
        assert!(locomo_error(&with(r#""qa": [{"question": "q", "category": 1, "answer": true}]"#))
            .ends_with(r#"c1 qa 1: "answer" is a boolean, not a string or number"#));
        assert!(locomo_error(&with(r#""qa": {}"#)).ends_with(r#"c1: "qa" is an object, not a list"#));
        assert!(locomo_error(&with(r#""observation": {"session_1_observation": {"A": [[1, "D1:1"]]}}"#))
            .ends_with(r#"c1 session_1_observation "A" item 1 is not a [fact, evidence] pair"#));
        assert!(locomo_error(&with(r#""observation": {"session_1_observation": {"A": [["f", 7]]}}"#))
            .ends_with(r#"item 1 evidence is a number, not a string or list of strings"#));
    }

    #[test]
    fn missing_sample_id_gets_a_positional_one() {
        let json = r#"[{"conversation": {"session_1": [{"speaker": "A", "text": "hi"}]}}]"#;
        let conversations = parse_locomo(json.as_bytes(), Path::new("x.json")).unwrap();
        assert_eq!(conversations[0].id, "conversation-1");
        assert_eq!(conversations[0].sessions[0].turns[0].id, "D1:1");
    }

    #[test]
    fn read_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.json");
        let message = load_locomo(&missing).unwrap_err().to_string();
        assert!(message.starts_with(&format!("cannot read {}: ", missing.display())), "{message}");
        assert!(matches!(load_text(dir.path(), "x"), Err(TranscriptError::Read { .. })));
        let latin1 = dir.path().join("latin1.txt");
        fs::write(&latin1, b"Maya: caf\xe9\n").unwrap();
        assert_eq!(
            load_text(&latin1, "x").unwrap_err().to_string(),
            format!("{} is not UTF-8 text (invalid byte at offset 9)", latin1.display())
        );
    }

    #[test]
    fn size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "big.txt", "Maya: 0123456789\n");
        assert_eq!(read_limited(&path, 17).unwrap().len(), 17);
        let message = read_limited(&path, 16).unwrap_err().to_string();
        assert_eq!(message, format!("{} is 17 bytes; transcripts over 16 bytes are refused", path.display()));
        let message = check_size(&path, 300 * 1024 * 1024, MAX_TRANSCRIPT_BYTES).unwrap_err().to_string();
        assert_eq!(message, format!("{} is 300 MiB; transcripts over 256 MiB are refused", path.display()));
        assert!(check_size(&path, MAX_TRANSCRIPT_BYTES, MAX_TRANSCRIPT_BYTES).is_ok());
        assert_eq!(human_size(MAX_TRANSCRIPT_BYTES + 1), "256.1 MiB");
        assert_eq!(human_size(1536), "1.5 KiB");
    }

    #[test]
    fn select_by_id() {
        let make = |id: &str| Conversation { id: id.into(), speakers: vec![], sessions: vec![], qa: vec![] };
        let all = vec![make("conv-26"), make("conv-30"), make("conv-41")];
        let path = Path::new("locomo.json");
        assert_eq!(select(all.clone(), None, path).unwrap(), all);
        let picked = select(all.clone(), Some(&["conv-41".into(), "conv-26".into(), "conv-41".into()]), path).unwrap();
        assert_eq!(picked.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), ["conv-41", "conv-26"]);
        let error = select(all.clone(), Some(&["conv-26".into(), "conv-99".into()]), path).unwrap_err();
        assert_eq!(error.to_string(), r#"locomo.json: no conversation "conv-99" (the file has conv-26, conv-30, conv-41)"#);
        let error = select(all, Some(&["a".into(), "b".into()]), path).unwrap_err();
        assert!(error.to_string().contains(r#"no conversations "a", "b" (the file has"#));
        let many: Vec<Conversation> = (0..20).map(|n| make(&format!("c{n}"))).collect();
        let error = select(many, Some(&["zz".into()]), path).unwrap_err().to_string();
        assert!(error.ends_with("c10, c11, … (20 in all))"), "{error}");
    }

    #[test]
    fn plain_text_sessions_and_multi_line_turns() {
        let text =
            "\u{feff}Maya: before any header\n\n# 1:56 pm on 8 May, 2023\nTom: hello\nthere\n  P.S.: indented lines continue\nMaya:\n\
                    \n## 2023-05-09T08:00:00Z\nTom: second\n#\nMaya: third, undated\n# not a date\n\n# 10 May 2023\nMaya: last\r\n";
        let conv = text_result(text).unwrap();
        assert_eq!(conv.id, "chat");
        assert_eq!(conv.speakers, ["Maya", "Tom"]);
        let summary: Vec<_> = conv.sessions.iter().map(|s| (s.number, s.date_time.as_deref(), s.timestamp, s.turns.len())).collect();
        assert_eq!(
            summary,
            [
                (1, None, None, 1),
                (2, Some("1:56 pm on 8 May, 2023"), Some(ts(2023, 5, 8, 13, 56)), 1),
                (3, Some("2023-05-09T08:00:00Z"), Some(ts(2023, 5, 9, 8, 0)), 1),
                (4, None, None, 1),
                (6, Some("10 May 2023"), Some(ts(2023, 5, 10, 0, 0)), 1),
            ]
        );
        let hello = &conv.sessions[1].turns[0];
        assert_eq!((hello.id.as_str(), hello.speaker.as_str()), ("D2:1", "Tom"));
        assert_eq!(hello.text, "hello\nthere\nP.S.: indented lines continue");
        assert_eq!(conv.sessions[4].turns[0].text, "last");

        // A header before any turn names session 1 instead of starting session 2.
        let conv = text_result("# 8 May 2023\nA: one\nB: two: with a colon\n10:30 we met\n").unwrap();
        assert_eq!(conv.sessions.len(), 1);
        assert_eq!(conv.sessions[0].number, 1);
        assert_eq!(conv.sessions[0].date.as_deref(), Some("8 May 2023"));
        assert_eq!(conv.sessions[0].turns[1].text, "two: with a colon\n10:30 we met");
        assert_eq!(conv.sessions[0].turns[1].id, "D1:2");
    }

    #[test]
    fn plain_text_errors_name_the_line() {
        let error = text_result("\n\njust some text\nMaya: hi\n").unwrap_err();
        assert_eq!(error.to_string(), "chat.txt line 3: text before the first speaker line");
        let error = text_result("Maya: hi\n# 8 May 2023\ndangling\n").unwrap_err();
        assert_eq!(error.to_string(), "chat.txt line 3: text after a session header before any speaker line");
        let long_name = format!("{}: hi\n", "x".repeat(41));
        assert!(matches!(text_result(&long_name), Err(TranscriptError::Line { line: 1, .. })));
        assert_eq!(text_result("# 8 May 2023\n\n").unwrap_err().to_string(), "chat.txt: no \"Speaker: text\" lines");
        assert!(text_result("").is_err());
    }

    #[test]
    fn parses_date_formats() {
        let expect = |text: &str, date: &str, stamp: i64| {
            assert_eq!(parse_date_time(text), Some((date.to_string(), stamp)), "{text}");
        };
        let may8 = ts(2023, 5, 8, 0, 0);
        expect("1:56 pm on 8 May, 2023", "8 May 2023", 1_683_554_160);
        expect("8 May, 2023", "8 May 2023", may8);
        expect("8 May 2023", "8 May 2023", may8);
        expect("May 8, 2023", "8 May 2023", may8);
        expect("may 8 2023", "8 May 2023", may8);
        expect("8th Sept. 2023", "8 September 2023", ts(2023, 9, 8, 0, 0));
        expect("2023-05-08", "8 May 2023", may8);
        expect("2023-05-08 13:56", "8 May 2023", 1_683_554_160);
        expect("2023-05-08T13:56:00", "8 May 2023", 1_683_554_160);
        expect("2023-05-08T13:56:00.250Z", "8 May 2023", 1_683_554_160);
        expect("2023-05-08T15:56:00+02:00", "8 May 2023", 1_683_554_160);
        expect("2023-05-08T11:26-0230", "8 May 2023", 1_683_554_160);
        expect("2023-05-08 15:56+02", "8 May 2023", 1_683_554_160);
        expect("  10:04 AM on 19 December, 2023 ", "19 December 2023", ts(2023, 12, 19, 10, 4));
        expect("13:56 on 8 May 2023", "8 May 2023", 1_683_554_160);
        expect("1970-01-01", "1 January 1970", 0);
        expect("1969-12-31 23:59:59", "31 December 1969", -1);
    }

    #[test]
    fn twelve_o_clock_and_leap_years() {
        let stamp = |text: &str| parse_date_time(text).map(|(_, stamp)| stamp);
        assert_eq!(stamp("12:00 am on 1 January, 2024"), Some(ts(2024, 1, 1, 0, 0)));
        assert_eq!(stamp("12:30 am on 1 January, 2024"), Some(ts(2024, 1, 1, 0, 30)));
        assert_eq!(stamp("12:30 pm on 1 January, 2024"), Some(ts(2024, 1, 1, 12, 30)));
        assert_eq!(stamp("11:59 pm on 1 January, 2024"), Some(ts(2024, 1, 1, 23, 59)));
        assert_eq!(stamp("1 pm on 1 January, 2024"), Some(ts(2024, 1, 1, 13, 0)));
        assert_eq!(stamp("0:30 am on 1 January, 2024"), None);
        assert_eq!(stamp("13:00 pm on 1 January, 2024"), None);

        assert_eq!(stamp("29 February 2024"), Some(1_709_164_800));
        assert_eq!(stamp("2000-02-29 12:00"), Some(951_825_600));
        assert_eq!(stamp("29 February 2023"), None);
        assert_eq!(stamp("1900-02-29"), None);
        assert_eq!(stamp("31 April 2023"), None);
        // The day after 28 February in a leap year is the 29th, then 1 March.
        assert_eq!(stamp("1 March 2024").zip(stamp("28 February 2024")).map(|(a, b)| (a - b) / 86_400), Some(2));
    }

    #[test]
    fn rejects_unknown_dates() {
        for text in [
            "",
            "yesterday",
            "sometime in June",
            "8 Foo 2023",
            "32 May 2023",
            "8 May 23",
            "2023-13-01",
            "2023-5-8",
            "2023-05-08X13:56",
            "2023-05-08 25:00",
            "2023-05-08 13:60",
            "1:56 pm on 2023-05-08 13:56",
            "1:56 on",
            "pm on 8 May 2023",
            "ma 8 2023",
            "8 May 2023 extra",
            "２０２３-05-08",
            "2023-05-08T13:56:00+99:00",
            "2023-05-08T13:56:00+02ab",
            "2023-05-08T13:56:00+2",
        ] {
            assert_eq!(parse_date_time(text), None, "{text:?}");
        }
    }

    #[test]
    fn session_ranges() {
        let range: SessionRange = "1-3,5".parse().unwrap();
        assert_eq!((1..=7).filter(|&n| range.contains(n)).collect::<Vec<_>>(), [1, 2, 3, 5]);
        let single: SessionRange = " 2 ".parse().unwrap();
        assert_eq!((1..=4).filter(|&n| single.contains(n)).collect::<Vec<_>>(), [2]);
        let open: SessionRange = "4-".parse().unwrap();
        assert!(!open.contains(3) && open.contains(4) && open.contains(u32::MAX));
        assert_eq!("1-3, 5,8-,2-2".parse::<SessionRange>().unwrap().to_string(), "1-3,5,8-,2");
        assert!(SessionRange::all().contains(1) && SessionRange::all().contains(99));

        let reason = |text: &str| match text.parse::<SessionRange>() {
            Err(TranscriptError::SessionRange { reason, .. }) => reason,
            other => panic!("{text:?} gave {other:?}"),
        };
        assert_eq!(reason("0"), "sessions are numbered from 1");
        assert_eq!(reason("3-1"), "3 is after 1");
        assert_eq!(reason("x"), "\"x\" is not a session number");
        assert!(reason("").starts_with("no sessions given"));
        assert_eq!(reason("1,,2"), "empty item between commas");
        assert!(reason("-3").contains("write \"1-3\""));
        assert_eq!(reason("+3"), "\"+3\" is not a session number");
        assert_eq!(reason("1-2-3"), "\"2-3\" is not a session number");
        assert_eq!(reason("99999999999"), "99999999999 is too large for a session number");
        assert_eq!("3-1".parse::<SessionRange>().unwrap_err().to_string(), "invalid session range \"3-1\": 3 is after 1");
    }

    #[test]
    fn format_names() {
        assert_eq!("locomo".parse::<TranscriptFormat>().unwrap(), TranscriptFormat::Locomo);
        assert_eq!(" Text ".parse::<TranscriptFormat>().unwrap(), TranscriptFormat::Text);
        assert_eq!(TranscriptFormat::Locomo.to_string(), "locomo");
        assert_eq!(TranscriptFormat::Text.to_string(), "text");
        assert_eq!(
            "csv".parse::<TranscriptFormat>().unwrap_err().to_string(),
            "unknown transcript format \"csv\" (expected \"locomo\" or \"text\")"
        );
    }

    #[test]
    fn serialises_for_reports() {
        let conv = text_result("# 8 May 2023\nA: hi\n").unwrap();
        let json = serde_json::to_value(&conv).unwrap();
        assert_eq!(json["sessions"][0]["turns"][0]["id"], "D1:1");
        assert_eq!(json["sessions"][0]["date"], "8 May 2023");
        assert_eq!(serde_json::to_value(TranscriptFormat::Locomo).unwrap(), "locomo");
    }

    #[test]
    fn never_panics_on_odd_input() {
        let odd = [
            "null",
            "[null]",
            "[[]]",
            r#"[{"conversation": {"session_": [], "session_x": 1, "session_1_summary": 2, "session_1": null}}]"#,
            r#"[{"sample_id": 7, "conversation": {}}]"#,
            r#"[{"sample_id": "c", "conversation": {"session_99999999999": []}}]"#,
            r#"[{"sample_id": "c", "conversation": {"session_1_date_time": 5, "session_1": []}}]"#,
            r#"[{"sample_id": "c\n", "conversation": {"session_1": [{"speaker": "A", "text": "hi", "dia_id": 3}]}}]"#,
        ];
        for json in odd {
            if let Err(error) = parse_locomo(json.as_bytes(), Path::new("odd.json")) {
                assert!(!error.to_string().contains('\n'), "{error}");
            }
        }
        for text in ["#", ":", ": x", "é: ü", "\u{feff}", "a:b:c\n#\n#\n\tx"] {
            let _ = text_result(text);
        }
        for text in ["1:56 pm on", " on ", "2023-05-0", "2023-05-08T", "2023-05-08T1", "2023-05-08T13:56+", "é".repeat(11).as_str()] {
            assert_eq!(parse_date_time(text), None, "{text:?}");
        }
    }
}
