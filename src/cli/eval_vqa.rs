//! `memlora eval vqa`: each question of a visual QA set asked about its image through the
//! same path as `memlora ask --image` (in a scratch data dir), scored by exact match.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use memlora::eval::vqa::{self, VqaItem};
use memlora::vision::VisionMode;
use serde::Serialize;

use super::Env;

#[derive(clap::Args)]
pub struct VqaArgs {
    /// The set: a directory with questions.jsonl and its images (the repository ships one
    /// in assets/vqa).
    #[arg(long)]
    data: PathBuf,
    /// native: the vision model looks at the image; caption: the chat model answers from
    /// the vision model's caption. Default: `vision.mode`.
    #[arg(long, value_parser = clap::builder::ValueParser::new(|s: &str| s.parse::<VisionMode>()))]
    vision: Option<VisionMode>,
    /// Questions at most.
    #[arg(long)]
    limit: Option<usize>,
    /// Tokens per answer (the answers are one word).
    #[arg(long, default_value_t = 8)]
    max_tokens: usize,
    /// The JSON report: every prediction, accuracy per kind.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Draw the shipped set (seed 7) into --data instead, and stop.
    #[arg(long)]
    generate: bool,
}

#[derive(Serialize)]
struct VqaPrediction<'a> {
    #[serde(flatten)]
    item: &'a VqaItem,
    prediction: String,
    correct: bool,
    seconds: f64,
}

pub fn run(env: &Env, args: VqaArgs) -> anyhow::Result<()> {
    if args.generate {
        let items = vqa::generate_set(&args.data, 7)?;
        println!("drew {} questions and their images into {}", items.len(), args.data.display());
        return Ok(());
    }
    let mut items = vqa::read_set(&args.data)?;
    items.truncate(args.limit.unwrap_or(usize::MAX));
    // The images are copied into a data dir by the ask path; a scratch one keeps the
    // profile's memories out of it (and the answers out of the memories).
    let scratch = tempfile::tempdir().context("cannot create a scratch data dir")?;
    let mut sampling = env.sampling();
    sampling.max_tokens = args.max_tokens;
    sampling.temperature = 0.0;
    let mut assistant = env.open_assistant_in(scratch.path(), &env.config.model, &[], sampling)?;
    let vision = assistant.vision_mut().context("no vision model is configured")?;
    if let Some(mode) = args.vision {
        vision.set_mode(mode);
    }
    let mode = vision.mode();

    let bar = ProgressBar::new(items.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:20!} {bar:30} {pos:>4}/{len:<4} questions {elapsed_precise} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(format!("vqa ({mode})"));
    let mut predictions = Vec::with_capacity(items.len());
    for item in &items {
        let started = Instant::now();
        let image = args.data.join(&item.image);
        let outcome = assistant.ask(&item.question, Some(&image), false, &mut |_| ControlFlow::Continue(()));
        let outcome = outcome.with_context(|| format!("{}: {}", image.display(), item.question))?;
        let prediction = outcome.answer.text.trim().to_owned();
        let correct = vqa::correct(&prediction, &item.answer);
        predictions.push(VqaPrediction { item, prediction, correct, seconds: started.elapsed().as_secs_f64() });
        bar.inc(1);
    }
    bar.finish_and_clear();

    let results: Vec<(String, bool)> = predictions.iter().map(|p| (p.item.kind.clone(), p.correct)).collect();
    let (by_kind, overall) = vqa::accuracy(&results);
    let seconds = predictions.iter().map(|p| p.seconds).sum::<f64>() / predictions.len().max(1) as f64;
    println!("{:<14} {:>9} {:>6}", "KIND", "ACCURACY", "ITEMS");
    for (kind, accuracy) in &by_kind {
        println!("{kind:<14} {accuracy:>8.1}% {:>6}", results.iter().filter(|(k, _)| k == kind).count());
    }
    println!("{:<14} {overall:>8.1}% {:>6}   ({mode}; {seconds:.2} s per question)", "overall", results.len());
    if let Some(out) = &args.out {
        let report = serde_json::json!({
            "data": args.data,
            "mode": mode,
            "vision_model": env.config.vision.model,
            "chat_model": env.config.model,
            "accuracy": by_kind,
            "overall": overall,
            "seconds_per_question": seconds,
            "predictions": predictions,
        });
        std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n").with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(())
}
