//! `memlora batch`: JSON Lines in on stdin, JSON Lines out on stdout, one request per
//! line, served by the same worker as the app. Requests run in order; each gets one
//! response line carrying its `id` (with `"stream": true`, token lines come first). A
//! malformed line gets an error line with its line number and the next line is read.
//! The exit status is non-zero when any request failed. Nothing here writes terminal
//! escape codes.

use std::io::Write;
use std::path::{Path, PathBuf};

use memlora::worker::{self, Event, Request, WorkerHandle};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::Env;

#[derive(clap::Args)]
pub struct BatchArgs {
    /// Model name or path (default: the configured model).
    #[arg(long)]
    model: Option<String>,
}

/// Longest request line accepted; a longer one is answered with an error and skipped.
const MAX_LINE_BYTES: usize = 1 << 20;

pub fn run(env: &Env, args: BatchArgs) -> anyhow::Result<bool> {
    let model = args.model.unwrap_or_else(|| env.config.model.clone());
    let assistant = env.open_assistant(&model, &[], env.sampling())?;
    let (handle, thread) = worker::spawn(assistant, model, env.adapter_storage()?);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    let all_ok = runtime.block_on(serve_stdin(&handle))?;
    drop(handle);
    // The worker finishes what it is doing (a memory write becomes durable) and stops.
    let _ = thread.join();
    Ok(all_ok)
}

async fn serve_stdin(handle: &WorkerHandle) -> anyhow::Result<bool> {
    let mut lines = BufReader::new(tokio::io::stdin());
    let mut stdout = std::io::stdout().lock();
    let mut all_ok = true;
    let mut number = 0usize;
    let mut buffer = Vec::new();
    // An image attached by an `image` line, for the next ask.
    let mut attached: Option<PathBuf> = None;
    loop {
        buffer.clear();
        let read = read_line_limited(&mut lines, &mut buffer).await?;
        if read == 0 {
            break;
        }
        number += 1;
        let text = String::from_utf8_lossy(&buffer);
        if text.trim().is_empty() {
            continue;
        }
        let response = if buffer.len() > MAX_LINE_BYTES {
            json!({"line": number, "ok": false, "error": format!("line {number}: longer than {MAX_LINE_BYTES} bytes")})
        } else {
            match parse_line(&text) {
                Ok((id, _, Line::Image(path))) => attach_image(id, &path, &mut attached),
                Ok((id, stream, Line::Request(mut request))) => {
                    if let Request::Ask { image: image @ None, .. } = &mut request {
                        *image = attached.take();
                    }
                    serve(handle, id, stream, request, &mut stdout).await?
                }
                Err((id, reason)) => json!({"id": id, "line": number, "ok": false, "error": format!("line {number}: {reason}")}),
            }
        };
        all_ok &= response["ok"] == true;
        writeln!(stdout, "{response}")?;
        stdout.flush()?;
    }
    Ok(all_ok)
}

/// Reads up to a newline, keeping at most `MAX_LINE_BYTES + 1` bytes of it, so that a
/// huge line is refused without being held in memory.
async fn read_line_limited(reader: &mut BufReader<tokio::io::Stdin>, out: &mut Vec<u8>) -> std::io::Result<usize> {
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

/// A request line: one for the worker, or an image to attach to the next ask.
enum Line {
    Request(Request),
    Image(PathBuf),
}

/// `{"id": …, "type": "ask", "stream": true, …}` → (id, stream, line); an error carries
/// the id when the line had one.
fn parse_line(text: &str) -> Result<(Value, bool, Line), (Value, String)> {
    let value: Value = serde_json::from_str(text).map_err(|e| (Value::Null, format!("not JSON: {e}")))?;
    let Value::Object(mut object) = value else { return Err((Value::Null, "a request is a JSON object".into())) };
    let id = object.remove("id").unwrap_or(Value::Null);
    let stream = match object.remove("stream") {
        None => false,
        Some(Value::Bool(stream)) => stream,
        Some(other) => return Err((id, format!("\"stream\" must be true or false, not {other}"))),
    };
    if object.get("type").and_then(Value::as_str) == Some("image") {
        return match (object.get("path").and_then(Value::as_str), object.len()) {
            (Some(path), 2) => Ok((id, stream, Line::Image(PathBuf::from(path)))),
            _ => Err((id, "invalid request: an image request has exactly `type` and `path`".into())),
        };
    }
    match serde_json::from_value::<Request>(Value::Object(object)) {
        Ok(request) => Ok((id, stream, Line::Request(request))),
        Err(e) => Err((id, format!("invalid request: {e}"))),
    }
}

/// Checks that `path` is an image memlora can read and keeps it for the next ask, which
/// the vision model then answers looking at it.
fn attach_image(id: Value, path: &Path, attached: &mut Option<PathBuf>) -> Value {
    match memlora::images::load(path) {
        Ok(image) => {
            *attached = Some(path.to_owned());
            let description = json!({"path": path, "width": image.width(), "height": image.height()});
            json!({"id": id, "type": "image", "ok": true, "image": description, "changes": []})
        }
        Err(error) => json!({"id": id, "type": "image", "ok": false, "error": error.to_string()}),
    }
}

/// Runs one request and returns its response object; token lines are written as they
/// come when `stream`.
async fn serve(handle: &WorkerHandle, id: Value, stream: bool, request: Request, stdout: &mut dyn Write) -> anyhow::Result<Value> {
    let kind = serde_json::to_value(&request)?.get("type").cloned().unwrap_or(Value::Null);
    let mut submission = handle.submit(request);
    let mut response = Map::new();
    response.insert("id".into(), id.clone());
    response.insert("type".into(), kind);
    let mut error = None;
    let mut changes = Vec::new();
    while let Some(event) = submission.events.recv().await {
        match event {
            Event::Token { text } if stream => {
                writeln!(stdout, "{}", json!({"id": id, "event": "token", "text": text}))?;
                stdout.flush()?;
            }
            Event::Token { .. } => {}
            Event::Error { message } => error = Some(message),
            Event::Changed { changes: more } => changes.extend(more),
            Event::Done => break,
            other => {
                // Each remaining event is one named field of the response (the last
                // progress report of an ingest, for one).
                if let Value::Object(fields) = serde_json::to_value(&other)? {
                    for (key, value) in fields.into_iter().filter(|(key, _)| key != "event") {
                        response.insert(key, value);
                    }
                }
            }
        }
    }
    response.insert("changes".into(), serde_json::to_value(changes)?);
    match error {
        Some(message) => {
            response.insert("ok".into(), Value::Bool(false));
            response.insert("error".into(), Value::String(message));
        }
        None => {
            response.insert("ok".into(), Value::Bool(true));
        }
    }
    Ok(Value::Object(response))
}
