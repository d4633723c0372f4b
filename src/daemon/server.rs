//! Serving the daemon's clients. Per connection:
//!
//! - the reader (the connection's own task) parses request lines. A line that is not JSON,
//!   not UTF-8 or longer than [`MAX_LINE_BYTES`] gets an error line and ends the
//!   connection; a well-formed line with a bad request gets an error line, as in batch
//!   mode. A `cancel` line cancels a request of this connection only: ids are looked up in
//!   the connection's own table.
//! - the runner serves the connection's requests one after the other. Each connection has
//!   at most one request in the worker's queue, so the worker's first-come order takes the
//!   connections in turn: a client that sends many requests does not hold back the others.
//! - the notice task pushes every memory change to the client.
//! - the writer writes the lines queued by the others. The queue is bounded: a client that
//!   stops reading is disconnected when it is full, instead of memory growing.
//!
//! When the connection ends (end of input, a dropped SSH session, garbage, a full queue)
//! its requests are cancelled: an answer stops at the next token; a memory write already
//! started completes and is durable; the daemon goes on serving the others.

use std::collections::HashMap;
use std::future::Future;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::{broadcast, mpsc, Notify};
use tokio::task::JoinSet;

use crate::worker::protocol::{self, read_line_limited, AttachedImage, Line, Parsed, Response, MAX_LINE_BYTES};
use crate::worker::{CancelToken, Event, Request, WorkerHandle};

#[derive(Clone)]
pub struct ServeOptions {
    /// Lines waiting to be written to one client; a client that lets more pile up is
    /// disconnected.
    pub queue_lines: usize,
    /// Requests of one client waiting for their turn; beyond that its lines are not read.
    pub queue_requests: usize,
}

impl Default for ServeOptions {
    fn default() -> ServeOptions {
        ServeOptions { queue_lines: 4096, queue_requests: 64 }
    }
}

/// How long a closing connection may take to write what is queued for it.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves clients on `listener` until `shutdown` completes; then every connection's
/// requests are cancelled and the connections closed. The worker stops when the last
/// clone of `handle` is dropped, after the request it is serving.
pub async fn serve(handle: WorkerHandle, listener: UnixListener, options: ServeOptions, shutdown: impl Future<Output = ()>) {
    let options = Arc::new(options);
    let mut connections = JoinSet::new();
    let mut number = 0u64;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    number += 1;
                    tracing::info!("client {number} connected");
                    connections.spawn(connection(number, stream, handle.clone(), options.clone()));
                }
                Err(error) => {
                    // Out of descriptors, most likely: wait for connections to close.
                    tracing::warn!("accepting a client: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next() => {}
        }
    }
    // Dropping a connection's task cancels its requests (see `Requests`).
    connections.shutdown().await;
}

/// A connection's requests by id, each with its cancel token.
#[derive(Default)]
struct Requests {
    tokens: Mutex<HashMap<String, CancelToken>>,
}

impl Requests {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CancelToken>> {
        self.tokens.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn cancel_all(&self) {
        for token in self.lock().values() {
            token.cancel();
        }
    }
}

/// Cancels every request of the connection when the connection's task ends, however it
/// ends (the daemon stopping aborts it).
struct CancelOnDrop(Arc<Requests>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel_all();
    }
}

/// A request waiting for the runner.
enum Work {
    Request { id: Value, key: String, stream: bool, events: bool, request: Request, cancel: CancelToken },
    Image { id: Value, path: std::path::PathBuf },
}

/// The queue of lines to write; full means the client is not reading.
#[derive(Clone)]
struct Outbox {
    lines: mpsc::Sender<String>,
    hang_up: Arc<Notify>,
}

impl Outbox {
    /// Queues `line`; false when the client is gone or is dropped for not reading.
    fn send(&self, line: &Value) -> bool {
        match self.lines.try_send(line.to_string()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!("a client stopped reading; disconnecting it");
                self.hang_up.notify_one();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

async fn connection(number: u64, stream: tokio::net::UnixStream, handle: WorkerHandle, options: Arc<ServeOptions>) {
    let (read, mut write) = stream.into_split();
    let (line_tx, mut line_rx) = mpsc::channel::<String>(options.queue_lines.max(1));
    let outbox = Outbox { lines: line_tx, hang_up: Arc::new(Notify::new()) };
    let requests = Arc::new(Requests::default());
    let _cancel_on_drop = CancelOnDrop(requests.clone());

    let mut writer = tokio::spawn(async move {
        while let Some(mut line) = line_rx.recv().await {
            line.push('\n');
            if write.write_all(line.as_bytes()).await.is_err() {
                return;
            }
        }
        let _ = write.shutdown().await;
    });
    let (work_tx, work_rx) = mpsc::channel::<Work>(options.queue_requests.max(1));
    let runner = tokio::spawn(run_requests(work_rx, handle.clone(), outbox.clone(), requests.clone()));
    let notices = tokio::spawn(push_notices(handle.subscribe(), outbox.clone()));

    let reason = read_requests(read, &work_tx, &outbox, &requests).await;
    tracing::info!("client {number}: {reason}");
    // Stop what this client asked for; a memory write in progress still completes in the
    // worker, which no longer needs anyone to listen.
    requests.cancel_all();
    runner.abort();
    notices.abort();
    drop((work_tx, outbox));
    let _ = runner.await;
    let _ = notices.await;
    if tokio::time::timeout(FLUSH_TIMEOUT, &mut writer).await.is_err() {
        writer.abort();
    }
}

/// Reads request lines until the client goes, misbehaves or is dropped; returns why it ended.
async fn read_requests(read: tokio::net::unix::OwnedReadHalf, work: &mpsc::Sender<Work>, outbox: &Outbox, requests: &Requests) -> String {
    let mut reader = BufReader::new(read);
    let mut buffer = Vec::new();
    let mut number = 0usize;
    let mut anonymous = 0u64;
    loop {
        buffer.clear();
        let read = tokio::select! {
            read = read_line_limited(&mut reader, &mut buffer) => read,
            _ = outbox.hang_up.notified() => return "dropped: it stopped reading".into(),
        };
        match read {
            Ok(0) => return "disconnected".into(),
            Ok(_) => {}
            Err(error) => return format!("disconnected: {error}"),
        }
        number += 1;
        if buffer.len() > MAX_LINE_BYTES {
            outbox.send(&protocol::error_line(&Value::Null, number, &format!("longer than {MAX_LINE_BYTES} bytes; closing")));
            return format!("line {number} too long");
        }
        let Ok(text) = std::str::from_utf8(&buffer) else {
            outbox.send(&protocol::error_line(&Value::Null, number, "not UTF-8; closing"));
            return format!("line {number} not UTF-8");
        };
        if text.trim().is_empty() {
            continue;
        }
        let work_item = match protocol::parse_line(text) {
            Err((id, reason)) if reason.starts_with("not JSON") => {
                outbox.send(&protocol::error_line(&id, number, &format!("{reason}; closing")));
                return format!("line {number} not JSON");
            }
            Err((id, reason)) => {
                outbox.send(&protocol::error_line(&id, number, &reason));
                continue;
            }
            Ok(Parsed { id, line: Line::Cancel(target), .. }) => {
                let found = requests.lock().get(&target.to_string()).cloned();
                let response = match found {
                    Some(token) => {
                        token.cancel();
                        json!({"id": id, "type": "cancel", "target": target, "ok": true})
                    }
                    None => protocol::error_line(&id, number, &format!("no request {target} of this client is waiting or running")),
                };
                outbox.send(&response);
                continue;
            }
            Ok(Parsed { id, line: Line::Image(path), .. }) => Work::Image { id, path },
            Ok(Parsed { id, stream, events, line: Line::Request(request) }) => {
                // Requests without an id cannot be named by a cancel, but still stop when
                // the client goes.
                let key = if id.is_null() {
                    anonymous += 1;
                    format!("#{anonymous}")
                } else {
                    id.to_string()
                };
                let cancel = CancelToken::default();
                {
                    let mut tokens = requests.lock();
                    if tokens.contains_key(&key) {
                        drop(tokens);
                        outbox.send(&protocol::error_line(&id, number, &format!("request id {id} is already waiting or running")));
                        continue;
                    }
                    tokens.insert(key.clone(), cancel.clone());
                }
                Work::Request { id, key, stream, events, request, cancel }
            }
        };
        tokio::select! {
            sent = work.send(work_item) => if sent.is_err() { return "its requests stopped".into() },
            _ = outbox.hang_up.notified() => return "dropped: it stopped reading".into(),
        }
    }
}

/// Serves a connection's requests in order, writing their events or responses.
async fn run_requests(mut work: mpsc::Receiver<Work>, handle: WorkerHandle, outbox: Outbox, requests: Arc<Requests>) {
    let mut attached = AttachedImage::default();
    while let Some(item) = work.recv().await {
        let (id, key, stream, events, request, cancel) = match item {
            Work::Image { id, path } => {
                if !outbox.send(&attached.attach(id, path)) {
                    return;
                }
                continue;
            }
            Work::Request { id, key, stream, events, mut request, cancel } => {
                attached.fill(&mut request);
                (id, key, stream, events, request, cancel)
            }
        };
        let mut response = Response::new(id.clone(), &request);
        let mut submission = handle.submit_with(request.clone(), cancel);
        let mut open = true;
        while let Some(event) = submission.events.recv().await {
            let done = event == Event::Done;
            if events {
                open &= outbox.send(&protocol::event_line(&id, &event));
            } else if let Event::Token { text } = &event {
                if stream {
                    open &= outbox.send(&protocol::token_line(&id, text));
                }
            } else {
                response.add(event);
            }
            if done || !open {
                break;
            }
        }
        requests.lock().remove(&key);
        if !open {
            return;
        }
        if !events {
            let response = response.finish();
            if !outbox.send(&response) {
                return;
            }
        }
    }
}

/// Pushes every memory change to the client.
async fn push_notices(mut notices: broadcast::Receiver<crate::worker::MemoryNotice>, outbox: Outbox) {
    loop {
        match notices.recv().await {
            Ok(notice) => {
                if !outbox.send(&protocol::notice_line(&notice)) {
                    return;
                }
            }
            // Changes were missed: say so, so that the client can list the memories again.
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                if !outbox.send(&json!({"event": protocol::NOTICE_EVENT, "missed": missed})) {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
