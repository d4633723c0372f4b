//! `memlora ingest FILE`: feed a conversation through the memory pipeline, session by
//! session, in order, with its dates.

use std::io::Write;
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use memlora::transcript::{self, SessionRange, TranscriptFormat};
use serde_json::json;

use super::Env;

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

    let model = args.model.clone().unwrap_or_else(|| env.config.model.clone());
    let mut assistant = env.open_assistant(&model, &[], env.sampling())?;
    if let Some(window) = args.window {
        assistant.set_extract_window(window);
    }
    let bar = if args.json { ProgressBar::hidden() } else { ProgressBar::new(total_turns as u64) };
    bar.set_style(
        ProgressStyle::with_template("{msg:24!} {bar:30} {pos:>5}/{len:<5} turns {elapsed_precise} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
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
