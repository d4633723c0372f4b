//! `memlora batch`: JSON Lines in on stdin, JSON Lines out on stdout, one request per
//! line, served by the same worker as the app (the daemon's, when one runs). Requests run in order; each gets one
//! response line carrying its `id` (with `"stream": true`, token lines come first). A
//! malformed line gets an error line with its line number and the next line is read.
//! The exit status is non-zero when any request failed. Nothing here writes terminal
//! escape codes.

use std::io::Write;

use memlora::worker::protocol::{self, read_line_limited, AttachedImage, Line, Parsed, Response, MAX_LINE_BYTES};
use memlora::worker::{self, Event, Request, WorkerHandle};
use serde_json::Value;
use tokio::io::BufReader;

use super::Env;

#[derive(clap::Args)]
pub struct BatchArgs {
    /// Model name or path (default: the configured model).
    #[arg(long)]
    model: Option<String>,
}

pub fn run(env: &Env, args: BatchArgs) -> anyhow::Result<bool> {
    let (handle, thread) = match env.daemon()? {
        Some(daemon) => {
            if let Some(model) = args.model {
                anyhow::bail!(
                    "--model {model}: the {} serves its own model (`memlora status`); stop it first (`memlora serve --stop`)",
                    daemon.label()
                );
            }
            (daemon.handle, daemon.thread)
        }
        None => {
            let model = args.model.unwrap_or_else(|| env.config.model.clone());
            let assistant = env.open_assistant(&model, &[], env.sampling())?;
            worker::spawn(assistant, model, env.adapter_storage()?)
        }
    };
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
    let mut attached = AttachedImage::default();
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
            protocol::error_line(&Value::Null, number, &format!("longer than {MAX_LINE_BYTES} bytes"))
        } else {
            match protocol::parse_line(&text) {
                Ok(Parsed { id, line: Line::Image(path), .. }) => attached.attach(id, path),
                Ok(Parsed { id, line: Line::Cancel(_), .. }) => {
                    protocol::error_line(&id, number, "batch mode serves one request at a time: there is nothing to cancel")
                }
                Ok(Parsed { id, stream, line: Line::Request(mut request), .. }) => {
                    attached.fill(&mut request);
                    serve(handle, id, stream, &request, &mut stdout).await?
                }
                Err((id, reason)) => protocol::error_line(&id, number, &reason),
            }
        };
        all_ok &= response["ok"] == true;
        writeln!(stdout, "{response}")?;
        stdout.flush()?;
    }
    Ok(all_ok)
}

/// Runs one request and returns its response object; token lines are written as they
/// come when `stream`.
async fn serve(handle: &WorkerHandle, id: Value, stream: bool, request: &Request, stdout: &mut dyn Write) -> anyhow::Result<Value> {
    let mut response = Response::new(id.clone(), request);
    let mut submission = handle.submit(request.clone());
    while let Some(event) = submission.events.recv().await {
        match event {
            Event::Token { text } if stream => {
                writeln!(stdout, "{}", protocol::token_line(&id, &text))?;
                stdout.flush()?;
            }
            Event::Done => break,
            other => response.add(other),
        }
    }
    Ok(response.finish())
}
