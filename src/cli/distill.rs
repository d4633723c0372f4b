//! `memlora distill locomo`: training sets for the three memory experts from LoCoMo's
//! annotations (the library's `distill` module does the work), written for
//! `memlora adapters train`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use memlora::distill::{self, label, teacher::Teacher, Distilled, Distiller, Sampling, Split, TokenStats};
use memlora::memory::pipeline::{Operation, UPDATE_KEEPS};
use memlora::transcript;
use serde_json::json;

use super::{Env, LocomoData};

#[derive(clap::Subcommand)]
pub enum DistillCommand {
    /// Build extraction, update and generation training sets from a LoCoMo file.
    ///
    /// Every prompt is rendered by the pipeline's own code, exactly as inference sends it;
    /// the answer to learn is the whole JSON the pipeline parses, starting with the
    /// response prefix the pipeline pre-fills. Extraction: per exchange window
    /// (memory.extract_window turns, as ingest runs it — not per session), the
    /// observations whose evidence turns end in the window; windows without one answer
    /// {"facts": [" "]} and are kept to at most 20 % of the split. Update: the observations
    /// replayed in order through a scratch memory store with the real embedder and the
    /// pipeline's retrieval; each fact the model would be asked about is judged against
    /// the shown memories about the same person: NONE (one says it: token F1 ≥ 0.8, or
    /// cosine ≥ 0.92 with F1 ≥ 0.5), DELETE (same topic — cosine ≥ 0.65, F1 ≥ 0.35 — and
    /// the fact says it ended: rare), UPDATE (same topic, and the fact keeps at least half
    /// of the memory's words, so it replaces it without loss) or ADD, and the decision is
    /// applied before the next fact; with --teacher the teacher decides instead.
    /// Generation: each QA item of categories 1–4 with the memories recalled from the
    /// replayed bank, answered with LoCoMo's ground truth.
    Locomo(LocomoArgs),
}

#[derive(clap::Args)]
pub struct LocomoArgs {
    #[command(flatten)]
    locomo: LocomoData,
    /// Training conversations (default: every used one not in --val).
    #[arg(long, value_delimiter = ',')]
    train: Option<Vec<String>>,
    /// Validation conversations (default: conv-26 when it is used).
    #[arg(long, value_delimiter = ',')]
    val: Option<Vec<String>>,
    /// Output directory: OP.train.jsonl / OP.val.jsonl per operation and distill.json.
    #[arg(long)]
    out: PathBuf,
    /// Keep at most N examples per operation and split (a seeded sample).
    #[arg(long, value_name = "N")]
    max_examples_per_op: Option<usize>,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// An OpenAI-compatible server (http://host:port, …/v1 or …/v1/chat/completions) whose
    /// answers label the update decisions; the only network access of this command.
    /// A bearer token, when needed, is read from MEMLORA_TEACHER_API_KEY.
    #[arg(long, value_name = "URL", requires = "teacher_model")]
    teacher: Option<String>,
    /// The model name to ask the teacher server for.
    #[arg(long, value_name = "NAME", requires = "teacher")]
    teacher_model: Option<String>,
}

pub fn run(env: &Env, command: DistillCommand) -> anyhow::Result<()> {
    let DistillCommand::Locomo(args) = command;
    let started = Instant::now();
    let data = &args.locomo.data;
    let splits = distill::split(args.locomo.load()?, args.train.as_deref(), args.val.as_deref(), data)?;
    let data_sha256 = distill::file_sha256(data)?;

    let pipeline = env.pipeline()?;
    let embedder = env.load_embedder()?;
    let teacher = match (&args.teacher, &args.teacher_model) {
        (Some(url), Some(model)) => Some(Teacher::new(url, model)),
        _ => None,
    };
    let window = env.config.memory.extract_window;
    let mut engine_embedder = memlora::assistant::EngineEmbedder(&embedder);
    let mut distiller = Distiller::new(&pipeline, &mut engine_embedder, embedder.dimension(), window, teacher.as_ref());
    let mut distilled = Distilled::default();
    for (split, conversations) in [(Split::Train, &splits.train), (Split::Val, &splits.val)] {
        for conversation in conversations {
            let conversation_started = Instant::now();
            let set = distiller.conversation(conversation).with_context(|| format!("{} {}", data.display(), conversation.id))?;
            eprintln!(
                "memlora: {} ({}): {} extraction, {} update, {} generation examples in {:.1} s",
                conversation.id,
                split.name(),
                set.extract.len(),
                set.update.len(),
                set.generate.len(),
                conversation_started.elapsed().as_secs_f64()
            );
            distilled.add(split, &conversation.id, set);
        }
    }
    distilled.sample(Sampling { max_examples_per_op: args.max_examples_per_op, seed: args.seed });
    distilled.write(&args.out)?;

    // Token counts with the default model's tokenizer and template when it is at hand.
    let chat = env.cached_chat_model()?;
    let unit = if chat.is_some() { "tokens" } else { "characters" };
    let mut lengths = serde_json::Map::new();
    let mut table = Vec::new();
    for operation in Operation::ALL {
        let mut per_split = serde_json::Map::new();
        for split in Split::ALL {
            let examples = distilled.get(operation, split);
            let stats: TokenStats = match &chat {
                Some(chat) => distill::token_stats(chat, examples)?,
                None => distill::character_stats(examples),
            };
            table.push((operation, split, stats.clone()));
            per_split.insert(split.name().into(), serde_json::to_value(&stats)?);
        }
        lengths.insert(operation.to_string(), per_split.into());
    }
    let labels = distilled.labels();
    let counts: serde_json::Map<String, serde_json::Value> = Operation::ALL
        .iter()
        .map(|operation| {
            let per_split: serde_json::Map<String, serde_json::Value> = Split::ALL
                .iter()
                .map(|&split| {
                    let available = distilled.available.get(&(*operation, split)).copied().unwrap_or(0);
                    (split.name().to_owned(), json!({"examples": distilled.get(*operation, split).len(), "available": available}))
                })
                .collect();
            (operation.to_string(), per_split.into())
        })
        .collect();
    let ids = |conversations: &[transcript::Conversation]| conversations.iter().map(|c| c.id.clone()).collect::<Vec<_>>();
    let report = json!({
        "data": data.display().to_string(),
        "data_sha256": data_sha256,
        "prompts_version": pipeline.prompts().version(),
        "conversations": {"train": ids(&splits.train), "val": ids(&splits.val)},
        "extract_window": window,
        "update_candidates": pipeline.settings().update_candidates,
        "answer_memories": pipeline.settings().answer_memories,
        "embedder": env.config.embedder,
        "update_labels": match &teacher {
            Some(teacher) => json!({"teacher": teacher.url(), "model": teacher.model()}),
            None => json!("rules"),
        },
        "thresholds": {
            "duplicate_f1": label::DUPLICATE_F1,
            "duplicate_cosine": label::DUPLICATE_COSINE,
            "duplicate_cosine_f1": label::DUPLICATE_COSINE_F1,
            "same_topic_cosine": label::SAME_TOPIC_COSINE,
            "same_topic_f1": label::SAME_TOPIC_F1,
            "update_coverage": UPDATE_KEEPS,
            "ended_cues": label::ENDED_CUES,
            "empty_window_share": distill::EMPTY_WINDOW_SHARE,
        },
        "seed": args.seed,
        "max_examples_per_op": args.max_examples_per_op,
        "counts": counts,
        "labels": labels,
        "length_unit": unit,
        "length_model": chat.as_ref().map(|_| env.config.model.clone()),
        "lengths": lengths,
        "replay": distilled.replay,
        "seconds": started.elapsed().as_secs_f64(),
    });
    let report_path = args.out.join("distill.json");
    distill::write_file(&report_path, serde_json::to_string_pretty(&report)?.as_bytes())?;

    println!("{:<9} {:<6} {:>8} {:>10} {:>12}  LABELS", "OP", "SPLIT", "EXAMPLES", "AVAILABLE", format!("MEAN {}", unit.to_uppercase()));
    for (operation, split, stats) in &table {
        let available = distilled.available.get(&(*operation, *split)).copied().unwrap_or(0);
        let labels = labels
            .get(&operation.to_string())
            .and_then(|splits| splits.get(split.name()))
            .map(|counts| counts.iter().map(|(label, n)| format!("{label} {n}")).collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        println!("{:<9} {:<6} {:>8} {:>10} {:>12.1}  {labels}", operation.to_string(), split.name(), stats.examples, available, stats.mean);
    }
    let mismatches: usize = table.iter().map(|(_, _, stats)| stats.prefix_mismatches).sum();
    if chat.is_some() && mismatches > 0 {
        println!("warning: {mismatches} examples tokenize differently from the prompt inference sends (see distill.json)");
    }
    println!("wrote {} in {:.1} s", args.out.display(), started.elapsed().as_secs_f64());
    Ok(())
}
