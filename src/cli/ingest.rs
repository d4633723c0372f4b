//! `memlora ingest FILE`: feed a conversation through the memory pipeline, session by
//! session, in order, with its dates (the daemon's pipeline when one serves the data dir).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use memlora::memory::OpKind;
use memlora::transcript::{self, SessionRange, TranscriptFormat};
use memlora::worker::{Event, Request};
use serde_json::json;

use super::{Daemon, Env};

#[derive(clap::Args)]
pub struct IngestArgs {
    /// A LoCoMo JSON file or a plain "Speaker: text" transcript.
    file: PathBuf,
    /// locomo | text (default: locomo for .json files, text otherwise).
    #[arg(long)]
    format: Option<TranscriptFormat>,
    /// Conversation ids to ingest (LoCoMo's sample_id, e.g. conv-26); repeatable; default: all.
    #[arg(long = "conversation", value_name = "ID")]
    conversations: Vec<String>,
    /// Sessions to ingest, e.g. 1-3,5 or 4- (default: all).
    #[arg(long)]
    sessions: Option<SessionRange>,
    /// Turns per extraction (default: memory.extract_window in the config).
    #[arg(long)]
    window: Option<usize>,
    /// Model name or path (default: the configured model).
    #[arg(long)]
    model: Option<String>,
    /// One JSON line per exchange (its facts and acknowledged memory changes), then a summary line.
    #[arg(long)]
    json: bool,
}

pub fn run(env: &Env, args: IngestArgs) -> anyhow::Result<()> {
    let format = args.format.unwrap_or(if args.file.extension().is_some_and(|e| e == "json") {
        TranscriptFormat::Locomo
    } else {
        TranscriptFormat::Text
    });
    let conversations = match format {
        TranscriptFormat::Locomo => transcript::load_locomo(&args.file)?,
        TranscriptFormat::Text => {
            let id = args.file.file_stem().map_or("transcript".into(), |stem| stem.to_string_lossy().into_owned());
            vec![transcript::load_text(&args.file, &id)?]
        }
    };
    let wanted = (!args.conversations.is_empty()).then_some(args.conversations.as_slice());
    let conversations = transcript::select(conversations, wanted, &args.file)?;
    let sessions = args.sessions.as_ref();
    let total_turns: usize = conversations
        .iter()
        .flat_map(|c| &c.sessions)
        .filter(|s| sessions.is_none_or(|range| range.contains(s.number)))
        .map(|s| s.turns.len())
        .sum();
    if total_turns == 0 {
        anyhow::bail!("{}: no turns in the selected conversations and sessions", args.file.display());
    }

    if let Some(daemon) = env.daemon()? {
        let result = ingest_on_daemon(&daemon, &args, format, total_turns);
        daemon.finish();
        return result;
    }

    let model = args.model.clone().unwrap_or_else(|| env.config.model.clone());
    let mut assistant = env.open_assistant(&model, &[], env.sampling())?;
    if let Some(window) = args.window {
        assistant.set_extract_window(window);
    }
    let bar = progress_bar(args.json, total_turns);
    let mut stdout = std::io::stdout().lock();
    let mut write_failed = None;
    let window = assistant.extract_window();
    let summary = assistant.ingest(&conversations, sessions, window, &mut |progress| {
        bar.set_message(format!("{} session {}", progress.conversation, progress.session));
        bar.set_position(progress.turns_done as u64);
        if args.json {
            // Each line is printed after its changes are durable: a reader may count them
            // as acknowledged.
            let line = json!({"conversation": progress.conversation, "session": progress.session, "turns_done": progress.turns_done, "report": progress.report});
            if let Err(error) = writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
                // Nobody reads the acknowledgements any more: stop after this exchange.
                write_failed = Some(error);
                return std::ops::ControlFlow::Break(());
            }
        }
        std::ops::ControlFlow::Continue(())
    });
    bar.finish_and_clear();
    let summary = summary?;
    if let Some(error) = write_failed {
        anyhow::bail!("stopped after {} turns: cannot write to stdout: {error}", summary.turns);
    }
    if args.json {
        writeln!(stdout, "{}", json!({ "summary": summary }))?;
        return Ok(());
    }
    writeln!(
        stdout,
        "ingested {} turns ({} sessions) in {:.1} s: {} facts extracted; memories +{} added, {} updated, {} deleted, {} already known; {} unusable outputs skipped; {} memories now",
        summary.turns, summary.sessions, summary.seconds, summary.facts, summary.added, summary.updated, summary.deleted, summary.unchanged, summary.skipped, summary.memories
    )?;
    Ok(())
}

fn progress_bar(hidden: bool, total_turns: usize) -> ProgressBar {
    let bar = if hidden { ProgressBar::hidden() } else { ProgressBar::new(total_turns as u64) };
    bar.set_style(
        ProgressStyle::with_template("{msg:24!} {bar:30} {pos:>5}/{len:<5} turns {elapsed_precise} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// The ingest run by the daemon, with its model and settings. With `--json`, one line per
/// exchange that changed memory (`changes`, durable when printed), then a summary line.
/// Interrupting this command stops the ingest after the exchange in progress.
fn ingest_on_daemon(daemon: &Daemon, args: &IngestArgs, format: TranscriptFormat, total_turns: usize) -> anyhow::Result<()> {
    for (flag, given) in [("--model", args.model.is_some()), ("--window", args.window.is_some())] {
        if given {
            anyhow::bail!(
                "{flag}: the {} ingests with its own settings; use it without {flag}, or stop it (`memlora serve --stop`)",
                daemon.label()
            );
        }
    }
    let path = std::path::absolute(&args.file).with_context(|| format!("{}", args.file.display()))?;
    let request = Request::Ingest {
        path,
        format: Some(format),
        conversations: args.conversations.clone(),
        sessions: args.sessions.as_ref().map(ToString::to_string),
    };
    let bar = progress_bar(args.json, total_turns);
    let mut submission = daemon.handle.submit(request);
    let mut counts = [0usize; 3];
    let mut error = None;
    let mut stdout = std::io::stdout().lock();
    while let Some(event) = submission.events.blocking_recv() {
        match event {
            Event::Progress { done, message, .. } => {
                bar.set_message(message);
                bar.set_position(done as u64);
            }
            Event::Changed { changes } => {
                for change in &changes {
                    counts[match change.kind {
                        OpKind::Add | OpKind::Restore => 0,
                        OpKind::Update => 1,
                        OpKind::Delete => 2,
                    }] += 1;
                }
                if args.json && writeln!(stdout, "{}", json!({ "changes": changes })).and_then(|()| stdout.flush()).is_err() {
                    submission.cancel.cancel();
                }
            }
            Event::Error { message } => error = Some(message),
            Event::Done => break,
            _ => {}
        }
    }
    bar.finish_and_clear();
    if let Some(message) = error {
        anyhow::bail!("{message}");
    }
    let [added, updated, deleted] = counts;
    if args.json {
        writeln!(stdout, "{}", json!({"summary": {"turns": total_turns, "added": added, "updated": updated, "deleted": deleted}}))?;
    } else {
        writeln!(
            stdout,
            "ingested {total_turns} turns on the {}: memories +{added} added, {updated} updated, {deleted} deleted",
            daemon.label()
        )?;
    }
    Ok(())
}
