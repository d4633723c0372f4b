//! `memlora ask`: one question, answered with the memories it recalls and streamed to
//! stdout; then what the user said is remembered.

use std::io::Write;
use std::ops::ControlFlow;

use memlora::memory::pipeline::TurnReport;
use memlora::memory::OpKind;
use memlora::vision::VisionMode;
use serde_json::json;

use super::Env;

#[derive(clap::Args)]
pub struct AskArgs {
    /// The question.
    #[arg(required = true, num_args = 1..)]
    prompt: Vec<String>,
    /// Model name (see `memlora models list`) or path to a GGUF file / safetensors directory.
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    max_tokens: Option<usize>,
    /// 0 = greedy (deterministic).
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Penalise tokens already in the answer (1 = off).
    #[arg(long)]
    repeat_penalty: Option<f32>,
    /// System prompt, replacing the generation prompt's.
    #[arg(long)]
    system: Option<String>,
    /// LoRA adapter for the answer, by name or directory, optionally NAME=SCALE; repeatable.
    /// Replaces the adapter bound to the generation operation.
    #[arg(long = "adapter", value_name = "NAME|DIR[=SCALE]")]
    adapters: Vec<String>,
    /// An image the question is about (PNG, JPEG, WebP, GIF, BMP): the vision model looks at
    /// it, and it is remembered.
    #[arg(long)]
    image: Option<std::path::PathBuf>,
    /// How the image is answered: the vision model looks at it (native), or only captions it
    /// and the chat model answers (caption). Default: `vision.mode`.
    #[arg(long, value_parser = clap::builder::ValueParser::new(|s: &str| s.parse::<VisionMode>()))]
    vision: Option<VisionMode>,
    /// Answer without extracting memories from the question.
    #[arg(long)]
    no_remember: bool,
    /// Print one JSON object (answer, memories used, memory changes, timings) instead of streaming.
    #[arg(long)]
    json: bool,
}

pub fn run(env: &Env, args: AskArgs) -> anyhow::Result<()> {
    let model_name = args.model.clone().unwrap_or_else(|| env.config.model.clone());
    let mut sampling = env.sampling();
    sampling.max_tokens = args.max_tokens.unwrap_or(sampling.max_tokens);
    sampling.temperature = args.temperature.unwrap_or(sampling.temperature);
    sampling.top_p = args.top_p.unwrap_or(sampling.top_p);
    sampling.seed = args.seed.unwrap_or(sampling.seed);
    sampling.repeat_penalty = args.repeat_penalty.unwrap_or(sampling.repeat_penalty);
    let mut assistant = env.open_assistant(&model_name, &args.adapters, sampling)?;
    assistant.set_system(args.system.clone());
    if let (Some(mode), Some(vision)) = (args.vision, assistant.vision_mut()) {
        vision.set_mode(mode);
    }

    let stdout = std::io::stdout();
    let json = args.json;
    let mut on_text = |piece: &str| {
        if !json {
            let mut out = stdout.lock();
            // A closed stdout (`| head`) ends the answer early rather than failing.
            if out.write_all(piece.as_bytes()).and_then(|_| out.flush()).is_err() {
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    };
    let question = args.prompt.join(" ");
    let outcome = assistant.ask(&question, args.image.as_deref(), !args.no_remember, &mut on_text)?;
    let answer = &outcome.answer;
    if json {
        let stats = answer.completion.stats.as_ref();
        let report = json!({
            "model": model_name,
            "adapters": assistant.adapters(),
            "text": answer.text,
            "memories_used": answer.memories,
            "remembered": outcome.remembered,
            "image": outcome.image,
            "looked_at": answer.image,
            "prompt_tokens": answer.completion.prompt_tokens,
            "completion_tokens": answer.completion.completion_tokens,
            "stop_reason": stats.map(|s| s.stop_reason),
            "load_seconds": assistant.chat_model().info().load_seconds,
            "time_to_first_token_seconds": stats.map(|s| s.time_to_first_token_seconds),
            "prefill_tokens_per_second": stats.map(|s| s.prefill_tokens_per_second()),
            "decode_tokens_per_second": stats.map(|s| s.decode_tokens_per_second()),
        });
        println!("{report}");
    } else {
        println!();
        if let Some(stats) = answer.completion.stats.as_ref().filter(|s| s.dropped_messages > 0) {
            eprintln!("memlora: left out the {} oldest messages to fit the context", stats.dropped_messages);
        }
        if let Some(report) = &outcome.remembered {
            if let Some(summary) = summarise(report) {
                eprintln!("memlora: {summary}");
            }
        }
    }
    Ok(())
}

/// "remembered 2 new, updated 1" — or nothing when memory did not change.
fn summarise(report: &TurnReport) -> Option<String> {
    let count = |kind: OpKind| report.changes.iter().filter(|c| c.kind == kind).count();
    let parts: Vec<String> = [(OpKind::Add, "new"), (OpKind::Update, "updated"), (OpKind::Delete, "forgotten")]
        .into_iter()
        .filter_map(|(kind, word)| Some(count(kind)).filter(|&n| n > 0).map(|n| format!("{n} {word}")))
        .collect();
    (!parts.is_empty()).then(|| format!("memories: {} (`memlora memory history`)", parts.join(", ")))
}
