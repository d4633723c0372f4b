//! A front end's side of the daemon: [`connect`] returns a [`WorkerHandle`] whose
//! requests are sent to the daemon, so the app, batch mode and the commands work the same
//! on a local worker and on the daemon. A thread of its own carries the connection: each
//! request goes out as a line with `"events": true` and a number as its id; the daemon's
//! event lines go to that request's channel, its memory notices to the handle's
//! subscribers. A cancelled token, or a requester that stopped listening, becomes a
//! `cancel` line.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::sync::{broadcast, mpsc};

use super::DaemonError;
use crate::worker::protocol::{read_line_limited, NOTICE_EVENT};
use crate::worker::{CancelToken, Event, Job, MemoryNotice, Request, WorkerHandle};

/// How often cancel tokens are looked at.
const CANCEL_POLL: Duration = Duration::from_millis(50);

/// Connects to the daemon listening on `socket`; `Ok(None)` when nothing listens there (no
/// socket file, or a stale one).
pub fn connect(socket: &Path) -> Result<Option<(WorkerHandle, std::thread::JoinHandle<()>)>, DaemonError> {
    let stream = match UnixStream::connect(socket) {
        Ok(stream) => stream,
        Err(error) if matches!(error.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => return Ok(None),
        Err(error) => return Err(DaemonError::Io { action: "connect to", path: socket.to_owned(), error }),
    };
    stream.set_nonblocking(true).map_err(|error| DaemonError::Io { action: "set up", path: socket.to_owned(), error })?;
    let (handle, jobs, notices) = WorkerHandle::remote();
    let thread = std::thread::Builder::new()
        .name("memlora-daemon-client".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(error) => return fail_all(jobs, &format!("cannot start the daemon connection: {error}")),
            };
            runtime.block_on(carry(stream, jobs, notices));
        })
        .map_err(|error| DaemonError::Io { action: "start the connection to", path: socket.to_owned(), error })?;
    Ok(Some((handle, thread)))
}

/// Answers every job with `message` (no connection to carry them).
fn fail_all(mut jobs: mpsc::UnboundedReceiver<Job>, message: &str) {
    jobs.close();
    while let Ok(job) = jobs.try_recv() {
        let _ = job.reply.send(Event::Error { message: message.into() });
        let _ = job.reply.send(Event::Done);
    }
}

struct Pending {
    reply: mpsc::UnboundedSender<Event>,
    cancel: CancelToken,
    cancel_sent: bool,
}

async fn carry(stream: UnixStream, mut jobs: mpsc::UnboundedReceiver<Job>, notices: broadcast::Sender<MemoryNotice>) {
    let gone = "the memlora daemon closed the connection";
    let stream = match tokio::net::UnixStream::from_std(stream) {
        Ok(stream) => stream,
        Err(error) => return fail_all(jobs, &format!("cannot use the daemon connection: {error}")),
    };
    let (read, mut write) = stream.into_split();
    // Lines are read by a task of their own, so that a half-read line is never dropped.
    let (line_tx, mut lines) = mpsc::unbounded_channel::<Value>();
    let reader = tokio::spawn(async move {
        let mut reader = BufReader::new(read);
        let mut buffer = Vec::new();
        loop {
            buffer.clear();
            match read_line_limited(&mut reader, &mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            match serde_json::from_slice::<Value>(&buffer) {
                Ok(value) => {
                    if line_tx.send(value).is_err() {
                        return;
                    }
                }
                Err(error) => tracing::warn!("unreadable line from the daemon: {error}"),
            }
        }
    });
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut next_id = 0u64;
    let mut jobs_open = true;
    let mut tick = tokio::time::interval(CANCEL_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        if !jobs_open && pending.is_empty() {
            break;
        }
        tokio::select! {
            job = jobs.recv(), if jobs_open => {
                let Some(job) = job else {
                    jobs_open = false;
                    continue;
                };
                next_id += 1;
                let mut request = job.request;
                // The daemon runs elsewhere: a file is named by its absolute path.
                if let Request::Ingest { path, .. } = &mut request {
                    if let Ok(absolute) = std::path::absolute(&*path) {
                        *path = absolute;
                    }
                }
                let mut line = match serde_json::to_value(&request) {
                    Ok(Value::Object(fields)) => fields,
                    _ => serde_json::Map::new(),
                };
                line.insert("id".into(), next_id.into());
                line.insert("events".into(), true.into());
                if !send_line(&mut write, &Value::Object(line)).await {
                    let _ = job.reply.send(Event::Error { message: gone.into() });
                    let _ = job.reply.send(Event::Done);
                    break;
                }
                pending.insert(next_id, Pending { reply: job.reply, cancel: job.cancel, cancel_sent: false });
            }
            line = lines.recv() => {
                let Some(line) = line else { break };
                dispatch(line, &mut pending, &notices);
            }
            _ = tick.tick() => {
                for (id, request) in pending.iter_mut() {
                    if !request.cancel_sent && (request.cancel.is_cancelled() || request.reply.is_closed()) {
                        request.cancel_sent = true;
                        let cancel = serde_json::json!({"type": "cancel", "target": id});
                        if !send_line(&mut write, &cancel).await {
                            break;
                        }
                    }
                }
            }
        }
    }
    reader.abort();
    for (_, request) in pending.drain() {
        let _ = request.reply.send(Event::Error { message: gone.into() });
        let _ = request.reply.send(Event::Done);
    }
    fail_all(jobs, gone);
}

async fn send_line(write: &mut tokio::net::unix::OwnedWriteHalf, line: &Value) -> bool {
    let mut text = line.to_string();
    text.push('\n');
    write.write_all(text.as_bytes()).await.is_ok()
}

/// One line from the daemon: an event of one of our requests, an error about one, or a
/// memory notice.
fn dispatch(mut line: Value, pending: &mut HashMap<u64, Pending>, notices: &broadcast::Sender<MemoryNotice>) {
    let Some(fields) = line.as_object_mut() else { return };
    let id = fields.remove("id");
    let Some(id) = id.as_ref().and_then(Value::as_u64) else {
        if fields.get("event").and_then(Value::as_str) == Some(NOTICE_EVENT) {
            if let (Some(changes), Some(memories)) = (fields.remove("changes"), fields.get("memories").and_then(Value::as_u64)) {
                if let Ok(changes) = serde_json::from_value(changes) {
                    let _ = notices.send(MemoryNotice { changes, memories: memories as usize });
                }
            }
        }
        return;
    };
    let Some(request) = pending.get(&id) else { return };
    let event = if fields.contains_key("event") {
        match serde_json::from_value::<Event>(line) {
            Ok(event) => event,
            Err(error) => Event::Error { message: format!("unreadable event from the daemon: {error}") },
        }
    } else {
        // The daemon refused the request line.
        let message = fields.get("error").and_then(Value::as_str).unwrap_or("the daemon refused the request").to_owned();
        let _ = request.reply.send(Event::Error { message });
        Event::Done
    };
    let done = event == Event::Done;
    let _ = request.reply.send(event);
    if done {
        pending.remove(&id);
    }
}
