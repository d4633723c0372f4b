//! `memlora ask`: one question, the answer streamed to stdout.

use std::io::Write;
use std::ops::ControlFlow;

use memlora::engine::{ChatMessage, Role, SamplingParams};
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
    /// System prompt (default: the config's, else the model's own).
    #[arg(long)]
    system: Option<String>,
    /// LoRA adapter by name or directory, optionally NAME=SCALE; repeatable.
    #[arg(long = "adapter", value_name = "NAME|DIR[=SCALE]")]
    adapters: Vec<String>,
    /// Print one JSON object (text, token counts, timings) instead of streaming.
    #[arg(long)]
    json: bool,
}

pub fn run(env: &Env, args: AskArgs) -> anyhow::Result<()> {
    let model_name = args.model.clone().unwrap_or_else(|| env.config.model.clone());
    let (mut chat, active) = env.load_chat_model(&model_name, &args.adapters)?;
    let g = &env.config.generation;
    let sampling = SamplingParams {
        max_tokens: args.max_tokens.unwrap_or(g.max_tokens),
        temperature: args.temperature.unwrap_or(g.temperature),
        top_p: args.top_p.unwrap_or(g.top_p),
        seed: args.seed.unwrap_or(g.seed),
        repeat_penalty: args.repeat_penalty.unwrap_or(g.repeat_penalty),
    };
    let system = args.system.clone().unwrap_or_else(|| g.system.clone());
    let mut messages = Vec::new();
    if !system.is_empty() {
        messages.push(ChatMessage::new(Role::System, system));
    }
    messages.push(ChatMessage::new(Role::User, args.prompt.join(" ")));

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
    let generation = chat.generate(&messages, &sampling, &active, &mut on_text)?;
    if generation.dropped_messages > 0 {
        eprintln!("memlora: left out the {} oldest messages to fit the context", generation.dropped_messages);
    }
    if json {
        let report = json!({
            "model": model_name,
            "adapters": active,
            "text": generation.text,
            "prompt_tokens": generation.prompt_tokens,
            "completion_tokens": generation.completion_tokens,
            "stop_reason": generation.stop_reason,
            "load_seconds": chat.info().load_seconds,
            "prefill_seconds": generation.prefill_seconds,
            "time_to_first_token_seconds": generation.time_to_first_token_seconds,
            "decode_seconds": generation.decode_seconds,
            "prefill_tokens_per_second": generation.prefill_tokens_per_second(),
            "decode_tokens_per_second": generation.decode_tokens_per_second(),
        });
        println!("{report}");
    } else {
        println!();
    }
    Ok(())
}
