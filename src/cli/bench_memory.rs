//! `memlora bench --suite memory | retrieval`: the memory pipeline's cost per exchange and
//! ingest throughput, and search latency (query embedding included) by store size. Both
//! work in a scratch data dir: a benchmark never touches the user's memories.

use std::path::PathBuf;
use std::time::Instant;

use memlora::memory::{MemoryOp, MemoryStore, SearchQuery};
use memlora::transcript::{self, SessionRange};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::Env;

#[derive(clap::Args)]
pub struct MemoryBenchArgs {
    /// memory suite: a LoCoMo file to ingest (default: the demo conversation in assets/).
    #[arg(long, value_name = "FILE")]
    data: Option<PathBuf>,
    /// memory suite: the conversation of --data to ingest (default: the first).
    #[arg(long, value_name = "ID")]
    conversation: Option<String>,
    /// memory suite: sessions to ingest (default: all).
    #[arg(long)]
    sessions: Option<SessionRange>,
    /// retrieval suite: store sizes.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    sizes: Vec<usize>,
    /// retrieval suite: queries per size.
    #[arg(long, default_value_t = 100)]
    queries: usize,
}

pub fn memory(env: &Env, model: Option<&str>, args: &MemoryBenchArgs, as_json: bool) -> anyhow::Result<()> {
    let conversations = match &args.data {
        Some(path) => transcript::load_locomo(path)?,
        None => transcript::demo_conversation()?,
    };
    let name = args.data.as_ref().map_or("assets/demo-conversation.json".into(), |p| p.display().to_string());
    let wanted = args.conversation.clone().or_else(|| conversations.first().map(|c| c.id.clone()));
    let conversations = transcript::select(conversations, wanted.as_ref().map(std::slice::from_ref), std::path::Path::new(&name))?;
    let scratch = tempfile::tempdir()?;
    let model = model.map_or_else(|| env.config.model.clone(), str::to_owned);
    let mut assistant = env.open_assistant_in(scratch.path(), &model, &[], env.sampling())?;
    let mut seconds = Vec::new();
    let window = assistant.extract_window();
    let summary = assistant.ingest(&conversations, args.sessions.as_ref(), window, &mut |progress| {
        seconds.push(progress.report.seconds);
        eprint!("\r{} session {}: {}/{} turns", progress.conversation, progress.session, progress.turns_done, progress.turns_total);
        std::ops::ControlFlow::Continue(())
    })?;
    eprintln!();
    seconds.sort_by(f64::total_cmp);
    let (p50, p95) = (percentile(&seconds, 0.50), percentile(&seconds, 0.95));
    let turns_per_second = summary.turns as f64 / summary.seconds.max(1e-9);
    if as_json {
        println!(
            "{}",
            json!({"suite": "memory", "model": model, "data": name, "conversation": wanted, "window": window,
                   "prompts_version": assistant_prompts_version(), "exchange_seconds_p50": p50, "exchange_seconds_p95": p95,
                   "turns_per_second": turns_per_second, "summary": summary})
        );
        return Ok(());
    }
    println!(
        "data             {name} {} ({} sessions, {} turns, {window} turns per exchange)",
        wanted.unwrap_or_default(),
        summary.sessions,
        summary.turns
    );
    println!(
        "memory turn      p50 {:.2} s, p95 {:.2} s per exchange (extract + update + apply), {} exchanges",
        p50, p95, summary.exchanges
    );
    println!("ingest           {:.2} turns/s, {:.1} s in all", turns_per_second, summary.seconds);
    println!(
        "pipeline         {} facts, +{} added, {} updated, {} deleted, {} known, {} skipped ({} ungrounded), {} model calls ({} unusable outputs), {} memories",
        summary.facts,
        summary.added,
        summary.updated,
        summary.deleted,
        summary.unchanged,
        summary.skipped,
        summary.ungrounded,
        summary.model_calls,
        summary.unusable_outputs,
        summary.memories
    );
    Ok(())
}

fn assistant_prompts_version() -> u32 {
    memlora::memory::prompts::Prompts::builtin().version()
}

/// Words for synthetic memories: enough of them that BM25 has rare and common terms.
const WORDS: [&str; 24] = [
    "Maya", "Tom", "moved", "Porto", "Lisbon", "adopted", "beagle", "painting", "museum", "job", "sister", "guitar", "garden", "hiking",
    "birthday", "concert", "recipe", "novel", "train", "coffee", "marathon", "camera", "kitchen", "festival",
];

pub fn retrieval(env: &Env, args: &MemoryBenchArgs, as_json: bool) -> anyhow::Result<()> {
    let embedder = env.load_embedder()?;
    let dimension = embedder.dimension();
    let mut rng = StdRng::seed_from_u64(11);
    let mut results = Vec::new();
    for &size in &args.sizes {
        let scratch = tempfile::tempdir()?;
        let mut store = MemoryStore::open(scratch.path(), dimension)?;
        let fill_started = Instant::now();
        let mut added = 0;
        while added < size {
            let batch: Vec<MemoryOp> = (0..(size - added).min(1000))
                .map(|i| MemoryOp::Add {
                    text: format!(
                        "{} {}",
                        (0..8).map(|_| WORDS[rng.random_range(0..WORDS.len())]).collect::<Vec<_>>().join(" "),
                        added + i
                    ),
                    subject: Some(WORDS[rng.random_range(0..2)].into()),
                    event_time: None,
                    source: Default::default(),
                    image: None,
                    embedding: random_unit(&mut rng, dimension),
                    created: None,
                })
                .collect();
            added += batch.len();
            memlora::memory::saved(store.apply(batch))?;
        }
        let fill_seconds = fill_started.elapsed().as_secs_f64();
        let (mut total, mut search_only) = (Vec::new(), Vec::new());
        for q in 0..args.queries.max(1) {
            let question = format!("When did {} go {} with the {}?", WORDS[q % 2], WORDS[2 + q % 22], WORDS[(q * 7) % 24]);
            let started = Instant::now();
            let embedding = embedder.embed(&[&question])?.pop();
            let searched = Instant::now();
            let hits = store.search(&SearchQuery { text: question, embedding, top_k: 10, ..SearchQuery::default() })?;
            std::hint::black_box(hits);
            search_only.push(searched.elapsed().as_secs_f64());
            total.push(started.elapsed().as_secs_f64());
        }
        total.sort_by(f64::total_cmp);
        search_only.sort_by(f64::total_cmp);
        results.push(json!({"memories": size, "fill_seconds": fill_seconds,
            "p50_ms": 1e3 * percentile(&total, 0.5), "p95_ms": 1e3 * percentile(&total, 0.95),
            "search_only_p50_ms": 1e3 * percentile(&search_only, 0.5)}));
        if !as_json {
            println!(
                "{size:>7} memories  p50 {:6.2} ms  p95 {:6.2} ms  (search alone p50 {:.2} ms; embedding included; filled in {fill_seconds:.1} s)",
                1e3 * percentile(&total, 0.5),
                1e3 * percentile(&total, 0.95),
                1e3 * percentile(&search_only, 0.5)
            );
        }
    }
    if as_json {
        println!("{}", json!({"suite": "retrieval", "top_k": 10, "queries": args.queries, "results": results}));
    }
    Ok(())
}

fn random_unit(rng: &mut StdRng, dimension: usize) -> Vec<f32> {
    let mut vector: Vec<f32> = (0..dimension).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let norm = vector.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-6);
    vector.iter_mut().for_each(|v| *v /= norm);
    vector
}

/// The value at fraction `q` of sorted `values` (nearest rank).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}
