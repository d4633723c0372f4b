//! The JSON Lines protocol of `memlora batch` and of the daemon's socket: one request per
//! line, `{"id": …, "type": "ask", …}` (a [`Request`] plus `id`, `stream` and `events`),
//! answered by one response line carrying the same `id`. With `"stream": true` token lines
//! come first; with `"events": true` every [`Event`] of the request is a line of its own,
//! ending with `{"id": …, "event": "done"}` (what the daemon's own client asks for). The
//! daemon also pushes `{"event": "memory_notice", …}` lines, without an `id`, whenever any
//! client changes memory.

use std::path::PathBuf;

use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use super::{Event, MemoryNotice, Request};

/// Longest request line accepted; a longer one is answered with an error.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// The `event` of a line pushed to every daemon client when memory changes.
pub const NOTICE_EVENT: &str = "memory_notice";

/// Reads up to a newline, keeping at most `MAX_LINE_BYTES + 1` bytes of it, so that a
/// huge line is refused without being held in memory. Returns the bytes consumed (0 at the
/// end of the input).
pub async fn read_line_limited<R: AsyncBufRead + Unpin>(reader: &mut R, out: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut total = 0;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(total);
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(end) => (&available[..=end], true),
            None => (available, false),
        };
        let keep = chunk.len().min((MAX_LINE_BYTES + 1).saturating_sub(out.len()));
        out.extend_from_slice(&chunk[..keep]);
        let consumed = chunk.len();
        total += consumed;
        reader.consume(consumed);
        if done {
            return Ok(total);
        }
    }
}

/// What a request line asks for.
#[derive(Debug)]
pub enum Line {
    /// Work for the worker.
    Request(Request),
    /// An image to attach to the next ask (`{"type": "image", "path": …}`).
    Image(PathBuf),
    /// Cancel this connection's request with the given id (`{"type": "cancel", "target": …}`).
    Cancel(Value),
}

/// A parsed request line.
#[derive(Debug)]
pub struct Parsed {
    pub id: Value,
    /// Token lines before the response.
    pub stream: bool,
    /// Every event as a line instead of one response.
    pub events: bool,
    pub line: Line,
}

/// `{"id": …, "type": "ask", "stream": true, …}` → the request; an error carries the id
/// when the line had one.
pub fn parse_line(text: &str) -> Result<Parsed, (Value, String)> {
    let value: Value = serde_json::from_str(text).map_err(|e| (Value::Null, format!("not JSON: {e}")))?;
    let Value::Object(mut object) = value else { return Err((Value::Null, "a request is a JSON object".into())) };
    let id = object.remove("id").unwrap_or(Value::Null);
    let mut flag = |name: &str| match object.remove(name) {
        None => Ok(false),
        Some(Value::Bool(value)) => Ok(value),
        Some(other) => Err(format!("\"{name}\" must be true or false, not {other}")),
    };
    let (stream, events) = match (flag("stream"), flag("events")) {
        (Ok(stream), Ok(events)) => (stream, events),
        (Err(reason), _) | (_, Err(reason)) => return Err((id, reason)),
    };
    let parsed = |line| Ok(Parsed { id: id.clone(), stream, events, line });
    match object.get("type").and_then(Value::as_str) {
        Some("image") => match (object.get("path").and_then(Value::as_str), object.len()) {
            (Some(path), 2) => parsed(Line::Image(PathBuf::from(path))),
            _ => Err((id, "invalid request: an image request has exactly `type` and `path`".into())),
        },
        Some("cancel") => match (object.remove("target"), object.len()) {
            (Some(target), 1) => parsed(Line::Cancel(target)),
            _ => Err((id, "invalid request: a cancel request has exactly `type` and `target` (the id of the request)".into())),
        },
        _ => match serde_json::from_value::<Request>(Value::Object(object)) {
            Ok(request) => parsed(Line::Request(request)),
            Err(e) => Err((id, format!("invalid request: {e}"))),
        },
    }
}

/// The answer to a line that could not be served: `{"id", "line", "ok": false, "error"}`.
pub fn error_line(id: &Value, number: usize, reason: &str) -> Value {
    json!({"id": id, "line": number, "ok": false, "error": format!("line {number}: {reason}")})
}

/// A streamed piece of an answer, as batch mode writes it.
pub fn token_line(id: &Value, text: &str) -> Value {
    json!({"id": id, "event": "token", "text": text})
}

/// One event of a request, as a line of its own (`"events": true`).
pub fn event_line(id: &Value, event: &Event) -> Value {
    let mut line = match serde_json::to_value(event) {
        Ok(Value::Object(fields)) => fields,
        _ => Map::new(),
    };
    line.insert("id".into(), id.clone());
    Value::Object(line)
}

/// The line pushed to every daemon client when memory changes.
pub fn notice_line(notice: &MemoryNotice) -> Value {
    json!({"event": NOTICE_EVENT, "changes": notice.changes, "memories": notice.memories})
}

/// One request's response line, built from its events: each event other than tokens is a
/// named field (the last progress report of an ingest, for one), memory changes are
/// gathered under `changes`, and `ok` says whether an error came.
pub struct Response {
    fields: Map<String, Value>,
    changes: Vec<Value>,
    error: Option<String>,
}

impl Response {
    pub fn new(id: Value, request: &Request) -> Response {
        let kind = Value::from(request.kind());
        let mut fields = Map::new();
        fields.insert("id".into(), id);
        fields.insert("type".into(), kind);
        Response { fields, changes: Vec::new(), error: None }
    }

    pub fn add(&mut self, event: Event) {
        match event {
            Event::Token { .. } | Event::Done => {}
            Event::Error { message } => self.error = Some(message),
            Event::Changed { changes } => self.changes.extend(changes.iter().filter_map(|c| serde_json::to_value(c).ok())),
            other => {
                if let Ok(Value::Object(fields)) = serde_json::to_value(&other) {
                    self.fields.extend(fields.into_iter().filter(|(key, _)| key != "event"));
                }
            }
        }
    }

    pub fn finish(mut self) -> Value {
        self.fields.insert("changes".into(), Value::Array(self.changes));
        match self.error {
            Some(message) => {
                self.fields.insert("ok".into(), Value::Bool(false));
                self.fields.insert("error".into(), Value::String(message));
            }
            None => {
                self.fields.insert("ok".into(), Value::Bool(true));
            }
        }
        Value::Object(self.fields)
    }
}

/// An image attached by an `image` line, for the next ask, which the vision model then
/// answers looking at it.
#[derive(Default)]
pub struct AttachedImage(Option<PathBuf>);

impl AttachedImage {
    /// Checks the image of an `image` line and keeps it; the line's response.
    pub fn attach(&mut self, id: Value, path: PathBuf) -> Value {
        match crate::images::load(&path) {
            Ok(image) => {
                let description = json!({"path": path, "width": image.width(), "height": image.height()});
                self.0 = Some(path);
                json!({"id": id, "type": "image", "ok": true, "image": description, "changes": []})
            }
            Err(error) => json!({"id": id, "type": "image", "ok": false, "error": error.to_string()}),
        }
    }

    /// Gives an ask without an image of its own the attached one, which it uses up.
    pub fn fill(&mut self, request: &mut Request) {
        if let Request::Ask { image: image @ None, .. } = request {
            *image = self.0.take();
        }
    }
}
