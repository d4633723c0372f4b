//! `memlora memory …`: look at and change the long-term memories directly.

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::PathBuf;

use anyhow::Context;
use memlora::assistant;
use memlora::memory::pipeline::AppliedChange;
use memlora::memory::transfer::{self, MemoryRecord};
use memlora::memory::{Change, HistoryEntry, Memory, MemoryFilter, MemoryId, MemoryOp};
use memlora::transcript::{format_date, parse_date_time};
use memlora::worker::{Event, Request};
use serde_json::json;

use super::{Daemon, Env};

#[derive(clap::Subcommand)]
pub enum MemoryCommand {
    /// Remember TEXT as it is written.
    Add {
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
        /// Who the memory is about.
        #[arg(long)]
        subject: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Every memory, oldest first.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long)]
        json: bool,
    },
    /// Memories matching QUERY by keywords and meaning, with their scores.
    Search {
        #[arg(required = true, num_args = 1..)]
        query: Vec<String>,
        #[arg(long, default_value_t = 10)]
        top_k: usize,
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long)]
        json: bool,
    },
    /// One memory with its history.
    Show {
        id: MemoryId,
        #[arg(long)]
        json: bool,
    },
    /// Replace the text of a memory.
    Edit {
        id: MemoryId,
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
    },
    /// Delete a memory (`memory undo` brings it back).
    Forget { id: MemoryId },
    /// Every change to the memories (or to memory ID), oldest first.
    History {
        id: Option<MemoryId>,
        #[arg(long)]
        json: bool,
    },
    /// Revert the last change (an added memory, or everything one exchange changed);
    /// repeat to go further back.
    Undo {
        #[arg(long)]
        json: bool,
    },
    /// Write every memory to stdout (or --out FILE).
    Export {
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Add the memories of a JSON Lines export: all of them, or none if a line is bad.
    Import { file: PathBuf },
}

/// Which memories a listing or search considers.
#[derive(clap::Args)]
pub struct FilterArgs {
    /// Only memories about WHO (case-insensitive).
    #[arg(long, value_name = "WHO")]
    subject: Option<String>,
    /// Only memories created on or after DATE ("8 May 2023", "2023-05-08", …).
    #[arg(long, value_name = "DATE", value_parser = parse_day_start)]
    from: Option<i64>,
    /// Only memories created on or before DATE (the whole day).
    #[arg(long, value_name = "DATE", value_parser = parse_day_end)]
    until: Option<i64>,
}

impl FilterArgs {
    fn filter(self) -> MemoryFilter {
        MemoryFilter { subject: self.subject, from: self.from, until: self.until, ..MemoryFilter::default() }
    }
}

fn parse_day_start(text: &str) -> Result<i64, String> {
    parse_date_time(text).map(|(_, seconds)| seconds).ok_or_else(|| format!("not a date: {text:?} (try \"8 May 2023\" or 2023-05-08)"))
}

/// The last second of the day `text` names, so that `--until 8 May 2023` includes that day.
fn parse_day_end(text: &str) -> Result<i64, String> {
    parse_day_start(text).map(|start| start - start.rem_euclid(86_400) + 86_399)
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ExportFormat {
    Jsonl,
    Markdown,
}

pub fn run(env: &Env, command: MemoryCommand) -> anyhow::Result<()> {
    if let Some(daemon) = env.daemon()? {
        let result = run_on_daemon(&daemon, command);
        daemon.finish();
        return result;
    }
    let (embedder, mut store) = env.open_memory()?;
    let mut stdout = std::io::stdout().lock();
    match command {
        MemoryCommand::Add { text, subject, json } => {
            let applied = assistant::add_memory(&mut store, &embedder, &text.join(" "), subject)?;
            if json {
                println!("{}", json!({"applied": applied, "memory": store.get(applied.id).map(|m| record(&m))}));
            } else {
                println!("remembered #{}", applied.id);
            }
        }
        MemoryCommand::List { filter, json } => {
            let records: Vec<_> = store.list(&filter.filter()).iter().map(record).collect();
            print_list(&records, json)?;
        }
        MemoryCommand::Search { query, top_k, filter, json } => {
            let hits = assistant::search(&store, &embedder, &query.join(" "), top_k, filter.filter())?;
            if json {
                let hits: Vec<_> = hits
                    .iter()
                    .map(|hit| json!({"score": hit.score, "bm25_rank": hit.bm25_rank, "vector_rank": hit.vector_rank, "memory": record(&hit.memory)}))
                    .collect();
                println!("{}", serde_json::to_string(&hits)?);
            } else if hits.is_empty() {
                println!("no memories match");
            } else {
                for hit in &hits {
                    writeln!(stdout, "{:.4}  {}", hit.score, line(&hit.memory))?;
                }
            }
        }
        MemoryCommand::Show { id, json } => {
            let memory = store.get(id).with_context(|| format!("no memory with id {id}"))?;
            let history = store.history(Some(id))?;
            if json {
                println!("{}", json!({"memory": record(&memory), "history": history}));
            } else {
                writeln!(stdout, "#{}  {}", memory.id, memory.text)?;
                writeln!(stdout, "subject: {}", memory.subject.as_deref().unwrap_or("-"))?;
                writeln!(stdout, "event time: {}", memory.event_time.as_deref().unwrap_or("-"))?;
                writeln!(stdout, "created: {}   updated: {}", format_date(memory.created), format_date(memory.updated))?;
                let source = &memory.source;
                if source.conversation.is_some() || source.session.is_some() || !source.turns.is_empty() {
                    let turns = source.turns.join(", ");
                    writeln!(
                        stdout,
                        "source: {} {} {turns}",
                        source.conversation.as_deref().unwrap_or(""),
                        source.session.as_deref().unwrap_or("")
                    )?;
                }
                writeln!(stdout, "history:")?;
                for entry in &history {
                    writeln!(stdout, "  {}", history_line(entry))?;
                }
            }
        }
        MemoryCommand::Edit { id, text } => {
            assistant::edit_memory(&mut store, &embedder, id, &text.join(" "))?;
            println!("updated #{id}");
        }
        MemoryCommand::Forget { id } => {
            assistant::forget_memory(&mut store, id)?;
            println!("forgot #{id} (`memlora memory undo` brings it back)");
        }
        MemoryCommand::History { id, json } => {
            let history = store.history(id)?;
            if json {
                println!("{}", serde_json::to_string(&history)?);
            } else if history.is_empty() {
                println!("no changes yet");
            } else {
                for entry in &history {
                    writeln!(stdout, "{}", history_line(entry))?;
                }
            }
        }
        MemoryCommand::Undo { json } => match store.undo()? {
            None if json => println!("{}", json!({"undone": null})),
            None => println!("nothing to undo"),
            Some(undone) if json => println!("{}", json!({"undone": undone.reverted, "applied": undone.applied})),
            Some(undone) => {
                writeln!(stdout, "undid {} change(s):", undone.reverted.len())?;
                for entry in &undone.reverted {
                    writeln!(stdout, "  {}", history_line(entry))?;
                }
            }
        },
        MemoryCommand::Export { format, out } => {
            let memories = store.list(&MemoryFilter::default());
            let mut sink: Box<dyn Write> = match &out {
                Some(path) => Box::new(private_file(path)?),
                None => Box::new(stdout),
            };
            match format {
                ExportFormat::Jsonl => transfer::write_jsonl(&memories, &mut sink)?,
                ExportFormat::Markdown => transfer::write_markdown(&memories, &mut sink)?,
            }
            sink.flush()?;
            if let Some(path) = out {
                eprintln!("memlora: exported {} memories to {}", memories.len(), path.display());
            }
        }
        MemoryCommand::Import { file } => {
            let name = file.display().to_string();
            let reader = File::open(&file).with_context(|| format!("cannot open {name}"))?;
            let records = transfer::read_jsonl(&mut BufReader::new(reader), &name)?;
            let texts: Vec<&str> = records.iter().map(|r| r.text.as_str()).collect();
            let embeddings = embedder.embed(&texts)?;
            let ops = records
                .into_iter()
                .zip(embeddings)
                .map(|(r, embedding)| MemoryOp::Add {
                    text: r.text,
                    subject: r.subject,
                    event_time: r.event_time,
                    source: r.source,
                    image: r.image,
                    embedding,
                    created: r.created,
                })
                .collect();
            let applied = memlora::memory::saved(store.apply(ops))?;
            println!("imported {} memories from {name}", applied.len());
        }
    }
    Ok(())
}

/// The commands the daemon's requests cover, answered by the daemon that holds the store.
fn run_on_daemon(daemon: &Daemon, command: MemoryCommand) -> anyhow::Result<()> {
    let request = |request: Request| daemon.request(request, &mut |_| true);
    let no_filter = |filter: &FilterArgs| {
        if filter.subject.is_some() || filter.from.is_some() || filter.until.is_some() {
            anyhow::bail!("--subject, --from and --until are not available through the {} (`memlora serve --stop` first)", daemon.label());
        }
        Ok(())
    };
    let changes = |events: Vec<Event>| -> Vec<AppliedChange> {
        events.into_iter().flat_map(|event| if let Event::Changed { changes } = event { changes } else { Vec::new() }).collect()
    };
    match command {
        MemoryCommand::Add { text, subject, json } => {
            let added = changes(request(Request::Remember { text: text.join(" "), subject })?);
            let change = added.first().context("the daemon reported no new memory")?;
            if json {
                println!("{}", json!({"applied": {"seq": change.seq, "id": change.id}, "memory": {"id": change.id, "text": change.text}}));
            } else {
                println!("remembered #{}", change.id);
            }
        }
        MemoryCommand::List { filter, json } => {
            no_filter(&filter)?;
            let mut records = Vec::new();
            for event in request(Request::Memories)? {
                if let Event::Memories { memories } = event {
                    records = memories;
                }
            }
            // Oldest first, as the store lists them.
            records.sort_by_key(|r| r.id);
            print_list(&records, json)?;
        }
        MemoryCommand::Search { query, top_k, filter, json } => {
            no_filter(&filter)?;
            let mut hits = Vec::new();
            for event in request(Request::Search { query: query.join(" "), top_k: Some(top_k) })? {
                if let Event::Hits { hits: found } = event {
                    hits = found;
                }
            }
            if json {
                println!("{}", serde_json::to_string(&hits)?);
            } else if hits.is_empty() {
                println!("no memories match");
            } else {
                for hit in &hits {
                    println!("{:.4}  {}", hit.score, record_line(&hit.memory));
                }
            }
        }
        MemoryCommand::Edit { id, text } => {
            request(Request::Edit { memory_id: id, text: text.join(" ") })?;
            println!("updated #{id}");
        }
        MemoryCommand::Forget { id } => {
            request(Request::Forget { memory_id: id })?;
            println!("forgot #{id} (`memlora memory undo` brings it back)");
        }
        MemoryCommand::Undo { json } => {
            let undone = match request(Request::Undo) {
                Ok(events) => changes(events),
                Err(error) if error.to_string() == "nothing to undo" => Vec::new(),
                Err(error) => return Err(error),
            };
            if json {
                println!("{}", json!({"applied": undone}));
            } else if undone.is_empty() {
                println!("nothing to undo");
            } else {
                println!("undid {} change(s)", undone.len());
            }
        }
        MemoryCommand::Show { .. } | MemoryCommand::History { .. } | MemoryCommand::Export { .. } | MemoryCommand::Import { .. } => {
            anyhow::bail!(
                "this command reads the memory store, which the {} holds: stop it first (`memlora serve --stop`), or use `memlora memory list` / `search`",
                daemon.label()
            );
        }
    }
    Ok(())
}

/// `memory list`: the records as one JSON array, or a line each.
fn print_list(records: &[MemoryRecord], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(records)?);
    } else if records.is_empty() {
        println!("no memories yet");
    } else {
        let mut stdout = std::io::stdout().lock();
        for record in records {
            writeln!(stdout, "{}", record_line(record))?;
        }
    }
    Ok(())
}

/// A memory as JSON output shows it: everything but the embedding.
fn record(memory: &Memory) -> MemoryRecord {
    MemoryRecord::from(memory)
}

fn line(memory: &Memory) -> String {
    record_line(&record(memory))
}

fn record_line(memory: &MemoryRecord) -> String {
    let when = memory.event_time.clone().unwrap_or_else(|| format_date(memory.created.unwrap_or_default()));
    let id = memory.id.map(|id| id.to_string()).unwrap_or_default();
    match &memory.subject {
        Some(subject) => format!("#{id:<5} {when:<17} {subject}: {}", memory.text),
        None => format!("#{id:<5} {when:<17} {}", memory.text),
    }
}

fn history_line(entry: &HistoryEntry) -> String {
    let change = match &entry.change {
        Change::Added { text } => format!("added    #{}: {text}", entry.id),
        Change::Updated { old_text, new_text } => format!("updated  #{}: {old_text} -> {new_text}", entry.id),
        Change::Deleted { old_text } => format!("deleted  #{}: {old_text}", entry.id),
        Change::Restored { text } => format!("restored #{}: {text}", entry.id),
    };
    let undo = entry.undo_of.map(|seq| format!("  (undo of {seq})")).unwrap_or_default();
    format!("{:>6}  {}  {change}{undo}", entry.seq, format_date(entry.time))
}

/// Exports are private data too.
fn private_file(path: &std::path::Path) -> anyhow::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))
}
