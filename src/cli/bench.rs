//! `memlora bench`: load time, prefill and decode speed, time to first token,
//! adapter switching cost and peak memory of the chosen model.

use std::time::Instant;

use anyhow::Context;
use memlora::adapters::LoraAdapter;
use memlora::engine::{SpeedRun, TargetModule};
use serde_json::json;

use super::Env;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// engine: model speed; memory: the memory pipeline on a conversation; retrieval:
    /// search latency by store size; vision: the vision model's load, image encoding and
    /// decoding (`vision.model`, or random weights of SmolVLM-256M's size when it is not
    /// downloaded).
    #[arg(long, value_enum, default_value_t = Suite::Engine)]
    suite: Suite,
    #[command(flatten)]
    memory: super::bench_memory::MemoryBenchArgs,
    /// Model name or path (default: the configured model).
    #[arg(long)]
    model: Option<String>,
    /// Prefill length in tokens (llama-bench's pp).
    #[arg(long, default_value_t = 256)]
    prompt_tokens: usize,
    /// Tokens generated from an empty context (llama-bench's tg).
    #[arg(long, default_value_t = 64)]
    steps: usize,
    /// Runs of each measurement; medians are reported.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Also measure with a random LoRA adapter of this rank active.
    #[arg(long, value_name = "RANK")]
    lora_rank: Option<usize>,
    /// Projections the random adapter targets.
    #[arg(long, value_delimiter = ',', default_value = "q_proj,v_proj")]
    lora_targets: Vec<String>,
    /// LoRA adapters (NAME|DIR[=SCALE]) active during the measurement.
    #[arg(long = "adapter")]
    adapters: Vec<String>,
    /// Also measure with 1..=N CPU-bound processes running beside the engine
    /// (started and stopped by the bench), each against the idle figures.
    #[arg(long, value_name = "N")]
    under_load: Option<usize>,
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    Engine,
    Memory,
    Retrieval,
    Vision,
}

pub fn run(env: &Env, args: BenchArgs) -> anyhow::Result<()> {
    match args.suite {
        Suite::Engine => {}
        Suite::Memory => return super::bench_memory::memory(env, args.model.as_deref(), &args.memory, args.json),
        Suite::Retrieval => return super::bench_memory::retrieval(env, &args.memory, args.json),
        Suite::Vision => return vision(env, args.steps, args.repeat, args.json),
    }
    let model_name = args.model.clone().unwrap_or_else(|| env.config.model.clone());
    let (mut chat, active) = env.load_chat_model(&model_name, &args.adapters)?;
    let repeat = args.repeat.max(1);
    let mut lora = None;
    if let Some(rank) = args.lora_rank {
        let targets = args
            .lora_targets
            .iter()
            .map(|t| {
                TargetModule::from_hf_name(t)
                    .with_context(|| format!("unknown LoRA target '{t}' (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let adapter = LoraAdapter::random(chat.decoder_config(), rank, 2.0 * rank as f64, &targets, 0.01, 7)?;
        let attach_started = Instant::now();
        chat.attach_adapter("bench-random", &adapter)?;
        let attach_seconds = attach_started.elapsed().as_secs_f64();
        let mut with = active.clone();
        with.push(("bench-random".to_string(), 1.0));
        // Switching = choosing the active set for a request: resolve names to slots.
        let switch_started = Instant::now();
        const SWITCHES: u32 = 1000;
        for i in 0..SWITCHES {
            let set = if i % 2 == 0 { &with[..] } else { &active[..] };
            std::hint::black_box(chat.active_adapters(set)?);
        }
        let switch_seconds = switch_started.elapsed().as_secs_f64() / f64::from(SWITCHES);
        lora = Some((rank, targets, attach_seconds, switch_seconds, with));
    }
    // Runs with and without the adapter alternate, so that a machine whose
    // speed drifts affects both alike; each figure is the median of `repeat`.
    let (mut base_runs, mut lora_runs) = (Vec::new(), Vec::new());
    for _ in 0..repeat {
        base_runs.push(chat.measure_speed(args.prompt_tokens, args.steps, &active)?);
        if let Some((.., with)) = &lora {
            lora_runs.push(chat.measure_speed(args.prompt_tokens, args.steps, with)?);
        }
    }
    let base = median_run(&base_runs);
    let mut loaded = Vec::new();
    for busy in 1..=args.under_load.unwrap_or(0) {
        let loops = BusyLoops::start(busy)?;
        // Long enough for the engine to see the load before the first run.
        std::thread::sleep(std::time::Duration::from_millis(600));
        let runs = (0..repeat)
            .map(|_| chat.measure_speed(args.prompt_tokens, args.steps, &active))
            .collect::<Result<Vec<_>, _>>()?;
        drop(loops);
        loaded.push((busy, median_run(&runs)));
    }
    let lora = lora.map(|(rank, targets, attach, switch, _)| (rank, targets, attach, switch, median_run(&lora_runs)));
    let peak_rss_mb = peak_rss_bytes().map(|b| b as f64 / 1e6);
    let info = chat.info();

    if args.json {
        let mut report = json!({
            "model": model_name,
            "path": info.path,
            "architecture": info.architecture,
            "parameters": info.parameters,
            "weights": env.config.engine.weights,
            "threads": memlora::engine::max_threads(),
            "load_seconds": info.load_seconds,
            "prompt_tokens": base.prompt_tokens,
            "decode_steps": base.decode_steps,
            "repeat": repeat,
            "prefill_tokens_per_second": base.prefill_tokens_per_second(),
            "decode_tokens_per_second": base.decode_tokens_per_second(),
            "time_to_first_token_seconds": base.time_to_first_token_seconds,
            "peak_rss_mb": peak_rss_mb,
        });
        if !loaded.is_empty() {
            report["under_load"] = loaded
                .iter()
                .map(|(busy, run)| {
                    json!({
                        "busy_processes": busy,
                        "prefill_tokens_per_second": run.prefill_tokens_per_second(),
                        "decode_tokens_per_second": run.decode_tokens_per_second(),
                        "decode_ratio_to_idle": run.decode_tokens_per_second() / base.decode_tokens_per_second(),
                    })
                })
                .collect();
        }
        if let Some((rank, targets, attach, switch, run)) = &lora {
            report["lora"] = json!({
                "rank": rank,
                "targets": targets.iter().map(|t| t.hf_name()).collect::<Vec<_>>(),
                "attach_seconds": attach,
                "switch_seconds": switch,
                "prefill_tokens_per_second": run.prefill_tokens_per_second(),
                "decode_tokens_per_second": run.decode_tokens_per_second(),
                "decode_slowdown_percent": 100.0 * (1.0 - run.decode_tokens_per_second() / base.decode_tokens_per_second()),
            });
        }
        println!("{report}");
        return Ok(());
    }
    println!(
        "model            {} ({}, {:.1}M parameters, weights {})",
        model_name,
        info.architecture,
        info.parameters as f64 / 1e6,
        env.config.engine.weights
    );
    println!("threads          {}", memlora::engine::max_threads());
    println!("load             {:.2} s", info.load_seconds);
    println!("prefill          {:.1} tok/s (pp{})", base.prefill_tokens_per_second(), base.prompt_tokens);
    println!("decode           {:.1} tok/s (tg{})", base.decode_tokens_per_second(), base.decode_steps);
    println!("first token      {:.3} s after a {}-token prompt", base.time_to_first_token_seconds, base.prompt_tokens);
    if let Some((rank, targets, attach, switch, run)) = &lora {
        let names: Vec<_> = targets.iter().map(|t| t.hf_name()).collect();
        println!(
            "lora r={rank} on {}: prefill {:.1} tok/s, decode {:.1} tok/s ({:+.1} %), attach {:.1} ms, switch {:.2} µs",
            names.join(","),
            run.prefill_tokens_per_second(),
            run.decode_tokens_per_second(),
            -100.0 * (1.0 - run.decode_tokens_per_second() / base.decode_tokens_per_second()),
            attach * 1e3,
            switch * 1e6
        );
    }
    for (busy, run) in &loaded {
        println!(
            "{busy} busy process{}  prefill {:.1} tok/s, decode {:.1} tok/s ({:.2}× idle)",
            if *busy == 1 { "  " } else { "es" },
            run.prefill_tokens_per_second(),
            run.decode_tokens_per_second(),
            run.decode_tokens_per_second() / base.decode_tokens_per_second()
        );
    }
    match peak_rss_mb {
        Some(mb) => println!("peak RSS         {mb:.0} MB"),
        None => println!("peak RSS         unknown"),
    }
    Ok(())
}

/// CPU-bound child processes that spin until dropped (or until the bench
/// dies: each asks the kernel to kill it with its parent).
struct BusyLoops(Vec<libc::pid_t>);

impl BusyLoops {
    fn start(count: usize) -> anyhow::Result<Self> {
        let mut loops = Self(Vec::new());
        for _ in 0..count {
            // SAFETY: the child runs only async-signal-safe code (a prctl
            // syscall and a spin loop) and never returns into Rust.
            match unsafe { libc::fork() } {
                -1 => anyhow::bail!("bench --under-load: fork failed: {}", std::io::Error::last_os_error()),
                0 => unsafe {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    loop {
                        std::hint::spin_loop();
                    }
                },
                pid => loops.0.push(pid),
            }
        }
        Ok(loops)
    }
}

impl Drop for BusyLoops {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: plain syscalls on children this process started.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

fn median_run(runs: &[SpeedRun]) -> SpeedRun {
    let median = |f: fn(&SpeedRun) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    SpeedRun {
        prefill_seconds: median(|r| r.prefill_seconds),
        time_to_first_token_seconds: median(|r| r.time_to_first_token_seconds),
        decode_seconds: median(|r| r.decode_seconds),
        ..runs[0].clone()
    }
}

/// Peak resident set size of this process (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Load time, image encoding time and decode speed of the vision model: the configured one
/// when it is present, else one of SmolVLM-256M's exact shape with random weights (the
/// speed of the arithmetic does not depend on the values).
fn vision(env: &Env, steps: usize, repeat: usize, json_out: bool) -> anyhow::Result<()> {
    use memlora::engine::vision::{write_random_checkpoint, SmolVlmShape, VisionLanguageModel};
    let settings = env.vision_settings(None)?;
    let scratch = tempfile::tempdir()?;
    let (dir, weights) = match &settings.model {
        Ok(dir) => (dir.clone(), "real"),
        Err(why) => {
            eprintln!("memlora: {why}; measuring random weights of SmolVLM-256M's size instead");
            let dir = scratch.path().join("smolvlm-256m-random");
            write_random_checkpoint(&dir, &SmolVlmShape::SMOLVLM_256M, 7)?;
            (dir, "random")
        }
    };
    let started = Instant::now();
    let mut model = VisionLanguageModel::load(&dir, &settings.load)?;
    let load_seconds = started.elapsed().as_secs_f64();
    let image =
        image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(640, 480, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 90])));
    let mut encode = Vec::new();
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    // Random weights rarely produce the end-of-turn token, so `steps` tokens are decoded.
    let sampling = memlora::engine::SamplingParams { max_tokens: steps, temperature: 0.0, ..memlora::engine::SamplingParams::default() };
    for _ in 0..repeat.max(1) {
        let features = model.encode(&image)?;
        encode.push(features.seconds);
        let generation =
            model.answer(&features, "What is in the picture?", &sampling, &[], &mut |_| std::ops::ControlFlow::Continue(()))?;
        prefill.push(generation.prefill_seconds);
        if generation.completion_tokens > 1 {
            decode.push(generation.decode_tokens_per_second());
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let peak_rss_mb = peak_rss_bytes().map(|b| b as f64 / 1e6);
    let (encode, prefill, decode) = (median(&mut encode), median(&mut prefill), median(&mut decode));
    let tokens_per_image = model.tokens_per_image();
    if json_out {
        println!(
            "{}",
            json!({"model": dir, "weights": weights, "load_seconds": load_seconds, "encode_seconds": encode,
                   "tokens_per_image": tokens_per_image, "prefill_seconds": prefill, "decode_tokens_per_second": decode,
                   "peak_rss_mb": peak_rss_mb})
        );
    } else {
        println!("vision model      {} ({weights} weights)", dir.display());
        println!("load              {load_seconds:.2} s");
        println!("encode an image   {encode:.2} s (→ {tokens_per_image} image tokens)");
        println!("prefill           {prefill:.2} s (image tokens + question)");
        println!("decode            {decode:.1} tokens/s");
        if let Some(mb) = peak_rss_mb {
            println!("peak memory       {mb:.0} MB");
        }
    }
    Ok(())
}
