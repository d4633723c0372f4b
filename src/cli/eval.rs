//! `memlora eval locomo`: for each conversation a fresh data dir, the conversation
//! ingested session by session through the real pipeline (or, in full-context mode, as
//! much of it as fits in the prompt), then every QA item answered by the generation
//! operation and scored as LoCoMo's official code scores it. Predictions are journalled
//! as they come, so a killed run continues where it stopped.

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use memlora::assistant::Assistant;
use memlora::engine::cosine;
use memlora::eval::locomo::{read_journal, IngestRecord, JournalWriter, Mode, Prediction, Report};
use memlora::eval::metrics;
use memlora::transcript::Conversation;

use super::{Env, Experts, LocomoData};

#[derive(clap::Subcommand)]
pub enum EvalCommand {
    /// Answer LoCoMo's questions after ingesting each conversation; score and report.
    Locomo(LocomoArgs),
    /// Visual questions with one-word answers (counting, colours, the odd object): the vision
    /// model looks at each image (or only captions it); exact-match accuracy.
    Vqa(super::eval_vqa::VqaArgs),
}

#[derive(clap::Args)]
pub struct LocomoArgs {
    #[command(flatten)]
    locomo: LocomoData,
    /// Category ids to answer (5 = adversarial).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4")]
    categories: Vec<u8>,
    /// Which memory operations run with their bound adapters: on (all), off (the base
    /// model for everything), or operations by name (extract,update).
    #[arg(long, default_value = "on")]
    experts: Experts,
    #[arg(long, value_enum, default_value_t = Mode::Memory)]
    mode: Mode,
    /// Questions per conversation at most.
    #[arg(long)]
    limit: Option<usize>,
    /// Model name or path (default: the configured model).
    #[arg(long)]
    model: Option<String>,
    /// The JSON report; its working files (data dirs, journals) go in REPORT.d/.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(env: &Env, command: EvalCommand) -> anyhow::Result<()> {
    let args = match command {
        EvalCommand::Locomo(args) => args,
        EvalCommand::Vqa(args) => return super::eval_vqa::run(env, args),
    };
    let conversations = args.locomo.load()?;
    let work = PathBuf::from(format!("{}.d", args.out.display()));
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let predictions_path = work.join("predictions.jsonl");
    let ingests_path = work.join("ingests.jsonl");
    let done: HashSet<(String, usize)> =
        read_journal::<Prediction>(&predictions_path)?.into_iter().map(|p| (p.conversation, p.index)).collect();
    let ingested: HashSet<String> = read_journal::<IngestRecord>(&ingests_path)?.into_iter().map(|r| r.conversation).collect();
    let mut predictions = JournalWriter::open(&predictions_path)?;
    let mut ingests = JournalWriter::open(&ingests_path)?;

    let questions = |c: &Conversation| -> Vec<usize> {
        let mut indices: Vec<usize> = (0..c.qa.len()).filter(|&i| args.categories.contains(&c.qa[i].category)).collect();
        indices.truncate(args.limit.unwrap_or(usize::MAX));
        indices
    };
    let total: usize = conversations.iter().map(|c| questions(c).len()).sum();
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:28!} {bar:30} {pos:>5}/{len:<5} questions {elapsed_precise} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(done.len().min(total) as u64);
    let model = args.model.clone().unwrap_or_else(|| env.config.model.clone());
    for conversation in &conversations {
        let pending: Vec<usize> = questions(conversation).into_iter().filter(|&i| !done.contains(&(conversation.id.clone(), i))).collect();
        if pending.is_empty() {
            continue;
        }
        let data_dir = work.join(&conversation.id);
        let mut assistant = env.open_assistant_for_eval(&data_dir, &model, &args.experts)?;
        if args.mode == Mode::Memory && !ingested.contains(&conversation.id) {
            // A conversation whose ingest was interrupted starts again from a fresh store.
            drop(assistant);
            let _ = std::fs::remove_dir_all(&data_dir);
            assistant = env.open_assistant_for_eval(&data_dir, &model, &args.experts)?;
            let record = ingest(&mut assistant, conversation, &bar)?;
            ingests.append(&record)?;
        }
        let context = match args.mode {
            Mode::FullContext => Some(assistant.full_context(conversation)?),
            Mode::Memory => None,
        };
        for index in pending {
            bar.set_message(format!("{} question {}", conversation.id, index + 1));
            let prediction = answer(&mut assistant, conversation, index, context.clone())?;
            predictions.append(&prediction)?;
            bar.inc(1);
        }
    }
    bar.finish_and_clear();

    let report = Report::new(read_journal(&predictions_path)?, read_journal(&ingests_path)?);
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(&args.out, json).with_context(|| format!("cannot write {}", args.out.display()))?;
    print_table(&report);
    println!("report: {} (working files in {})", args.out.display(), work.display());
    Ok(())
}

fn ingest(assistant: &mut Assistant, conversation: &Conversation, bar: &ProgressBar) -> anyhow::Result<IngestRecord> {
    let window = assistant.extract_window();
    let summary = assistant.ingest(std::slice::from_ref(conversation), None, window, &mut |progress| {
        bar.set_message(format!("{} ingest {}/{}", progress.conversation, progress.turns_done, progress.turns_total));
        ControlFlow::Continue(())
    })?;
    Ok(IngestRecord { conversation: conversation.id.clone(), summary })
}

fn answer(
    assistant: &mut Assistant,
    conversation: &Conversation,
    index: usize,
    context: Option<Vec<memlora::memory::pipeline::UsedMemory>>,
) -> anyhow::Result<Prediction> {
    let item = &conversation.qa[index];
    let started = Instant::now();
    let mut quiet = |_: &str| ControlFlow::Continue(());
    let answer = match context {
        Some(context) => assistant.answer_with(&item.question, context, &mut quiet)?,
        None => assistant.answer(&item.question, &mut quiet)?,
    };
    let seconds = started.elapsed().as_secs_f64();
    let prediction = answer.text.trim().to_owned();
    // Category 5 has no answer to compare with; its score only asks whether the model said
    // the information is not available.
    let truth = item.answer.clone().unwrap_or_default();
    let score = metrics::score(item.category, &prediction, &truth);
    let similarity = if truth.is_empty() || prediction.is_empty() {
        0.0
    } else {
        let embeddings = assistant.embed(&[&truth, &prediction])?;
        f64::from(cosine(&embeddings[0], &embeddings[1]))
    };
    Ok(Prediction {
        conversation: conversation.id.clone(),
        index,
        category: item.category,
        question: item.question.clone(),
        answer: truth,
        prediction,
        f1: score.f1,
        bleu1: score.bleu1,
        similarity,
        seconds,
        tokens: answer.completion.completion_tokens,
        memories_used: answer.memories.len(),
    })
}

fn print_table(report: &Report) {
    println!("{:<12} {:>6} {:>8} {:>8} {:>10} {:>9} {:>8}", "CATEGORY", "ITEMS", "F1", "BLEU-1", "EMBED SIM", "S/ANSWER", "TOKENS");
    let row = |name: String, a: &memlora::eval::locomo::Averages| {
        println!(
            "{name:<12} {:>6} {:>8.2} {:>8.2} {:>10.3} {:>9.2} {:>8.1}",
            a.count,
            100.0 * a.f1,
            100.0 * a.bleu1,
            a.similarity,
            a.seconds,
            a.tokens
        );
    };
    for (category, averages) in &report.by_category {
        row(format!("{category} {}", metrics::category_name(*category).unwrap_or("")), averages);
    }
    row("1-4".into(), &report.answerable);
    row("all".into(), &report.overall);
    for ingest in &report.ingests {
        let s = &ingest.summary;
        println!(
            "{}: {} turns ingested in {:.0} s; {} facts; +{} added, {} updated, {} deleted, {} known; {} memories",
            ingest.conversation, s.turns, s.seconds, s.facts, s.added, s.updated, s.deleted, s.unchanged, s.memories
        );
    }
}
