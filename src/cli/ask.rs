//! `memlora ask`: one question, answered with the memories it recalls and streamed to
//! stdout; then what the user said is remembered.

use std::io::Write;
use std::ops::ControlFlow;
use std::time::Instant;

use anyhow::Context;
use memlora::worker::{Event, Request};

use memlora::memory::pipeline::TurnReport;
use memlora::memory::OpKind;
use memlora::vision::VisionMode;
use serde_json::json;

use super::{Daemon, Env};

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
    if let Some(daemon) = env.daemon()? {
        return ask_daemon(daemon, &args);
    }
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

/// The question answered by the daemon's warm model. Settings that would need another
/// model or other sampling are refused: the daemon serves everyone with the same ones.
fn ask_daemon(daemon: Daemon, args: &AskArgs) -> anyhow::Result<()> {
    let own_settings = [
        ("--model", args.model.is_some()),
        ("--max-tokens", args.max_tokens.is_some()),
        ("--temperature", args.temperature.is_some()),
        ("--top-p", args.top_p.is_some()),
        ("--seed", args.seed.is_some()),
        ("--repeat-penalty", args.repeat_penalty.is_some()),
        ("--system", args.system.is_some()),
        ("--adapter", !args.adapters.is_empty()),
        ("--vision", args.vision.is_some()),
    ];
    if let Some((flag, _)) = own_settings.iter().find(|(_, given)| *given) {
        anyhow::bail!(
            "{flag}: the {} answers with its own settings; use it without {flag}, or stop it (`memlora serve --stop`)",
            daemon.label()
        );
    }
    let started = Instant::now();
    let mut first_token = None;
    let stdout = std::io::stdout();
    // The daemon reads the image itself: give it a path that does not depend on our
    // working directory.
    let image = args.image.as_deref().map(std::path::absolute).transpose().context("--image")?;
    let request = Request::Ask { text: args.prompt.join(" "), remember: !args.no_remember, image };
    let events = daemon.request(request, &mut |piece| {
        first_token.get_or_insert_with(|| started.elapsed().as_secs_f64());
        if args.json {
            return true;
        }
        let mut out = stdout.lock();
        // A closed stdout (`| head`) ends the answer early rather than failing.
        out.write_all(piece.as_bytes()).and_then(|_| out.flush()).is_ok()
    })?;
    let mut answer = None;
    let mut remembered = None;
    let mut looked_at = None;
    for event in events {
        match event {
            Event::Answer { text, memories_used, completion_tokens, tokens_per_second, image, vision, .. } => {
                looked_at = image.map(|path| json!({"path": path, "mode": vision}));
                answer = Some((text, memories_used, completion_tokens, tokens_per_second))
            }
            Event::Remembered { report } => remembered = Some(report),
            _ => {}
        }
    }
    let (text, memories_used, completion_tokens, tokens_per_second) = answer.context("the daemon sent no answer")?;
    if args.json {
        let report = json!({
            "daemon": {"pid": daemon.info.pid, "socket": daemon.info.socket},
            "text": text,
            "memories_used": memories_used,
            "remembered": remembered,
            "looked_at": looked_at,
            "completion_tokens": completion_tokens,
            "time_to_first_token_seconds": first_token,
            "decode_tokens_per_second": tokens_per_second,
        });
        println!("{report}");
    } else {
        println!();
        if let Some(summary) = remembered.as_ref().and_then(summarise) {
            eprintln!("memlora: {summary}");
        }
    }
    daemon.finish();
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
