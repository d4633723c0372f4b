//! The `memlora` command line. Library errors become `anyhow` errors here and
//! are printed as one line.

mod cli;
mod tui;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "memlora", version, about = "A private, fully local assistant that remembers")]
struct Args {
    /// Private data (memories, adapters, logs) of this profile.
    #[arg(long, global = true, env = "MEMLORA_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Model cache, shared by all profiles.
    #[arg(long, global = true, env = "MEMLORA_MODELS_DIR", value_name = "DIR")]
    models_dir: Option<PathBuf>,
    /// Run standalone even when a daemon (`memlora serve`) serves the data dir.
    // Falsey parsing lets the variable read as shells set it (1/0, yes/no, true/false).
    #[arg(long, global = true, env = "MEMLORA_NO_DAEMON", value_parser = clap::builder::FalseyValueParser::new())]
    no_daemon: bool,
    /// Without a command: the interactive app.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Installed LoRA adapters: list, import, export, bind to operations, merge.
    #[command(subcommand)]
    Adapters(cli::adapters::AdaptersCommand),
    /// Answer one question with the memories it recalls (streamed), then remember what was said.
    Ask(cli::ask::AskArgs),
    /// Measure load time, prefill and decode speed, time to first token and peak memory.
    Bench(cli::bench::BenchArgs),
    /// Serve JSON Lines requests from stdin (ask, remember, search, forget, edit, undo,
    /// memories, ingest, adapters, status); one response line each on stdout.
    Batch(cli::batch::BatchArgs),
    /// Build training sets for the memory experts (extract, update, generate) from LoCoMo.
    #[command(subcommand)]
    Distill(cli::distill::DistillCommand),
    /// Evaluate memory on LoCoMo.
    #[command(subcommand)]
    Eval(cli::eval::EvalCommand),
    /// Feed a conversation (LoCoMo JSON or "Speaker: text" lines) through the memory pipeline.
    Ingest(cli::ingest::IngestArgs),
    /// Look at and change the long-term memories.
    #[command(subcommand)]
    Memory(cli::memory::MemoryCommand),
    /// Fetch, list and verify models.
    #[command(subcommand)]
    Models(cli::models::ModelsCommand),
    /// Keep the models warm and serve the app, batch mode and the commands of every
    /// session (SSH included) on a Unix socket in the data dir.
    Serve(cli::serve::ServeArgs),
    /// Whether a daemon serves the data dir, and what it holds.
    Status {
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    // Everything memlora writes is the user's alone (memories, logs, the search index,
    // exports), whatever umask the shell has: files 0600, directories 0700.
    // SAFETY: umask only sets this process's file-creation mask.
    unsafe { libc::umask(0o077) };
    let args = Args::parse();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            // One line: the chain of causes, outermost first. (Some library
            // errors append a backtrace on later lines; many already end with
            // their cause's text, which is not repeated.)
            let mut message = String::new();
            for cause in e.chain() {
                let text = cause.to_string();
                let text = text.lines().next().unwrap_or_default();
                if message.ends_with(text) {
                    continue;
                }
                if !message.is_empty() {
                    message.push_str(": ");
                }
                message.push_str(text);
            }
            eprintln!("memlora: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut env = cli::Env::new(args.data_dir, args.models_dir)?;
    env.no_daemon = args.no_daemon;
    match args.command {
        Some(Command::Adapters(c)) => cli::adapters::run(&env, c)?,
        Some(Command::Ask(a)) => cli::ask::run(&env, a)?,
        // Failed requests were answered on stdout; the status says whether there were any.
        Some(Command::Batch(a)) => return Ok(if cli::batch::run(&env, a)? { ExitCode::SUCCESS } else { ExitCode::FAILURE }),
        Some(Command::Bench(a)) => cli::bench::run(&env, a)?,
        Some(Command::Distill(c)) => cli::distill::run(&env, c)?,
        Some(Command::Eval(c)) => cli::eval::run(&env, c)?,
        Some(Command::Ingest(a)) => cli::ingest::run(&env, a)?,
        Some(Command::Memory(c)) => cli::memory::run(&env, c)?,
        Some(Command::Models(c)) => cli::models::run(&env, c)?,
        Some(Command::Serve(a)) => cli::serve::run(&env, a)?,
        Some(Command::Status { json }) => cli::serve::status(&env, json)?,
        None => return cli::app::run(&env),
    }
    Ok(ExitCode::SUCCESS)
}
