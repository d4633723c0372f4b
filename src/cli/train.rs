//! `memlora adapters train` and `memlora adapters audit`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use memlora::adapters::audit::{self, Canaries};
use memlora::adapters::registry::check_name;
use memlora::adapters::train::{
    self, parse_targets, read_conversations, tokenize, RunEnd, TrainEvent, TrainModel, TrainSettings, Trainer, TrainingLog,
};
use memlora::adapters::{AdapterInfo, AdapterRegistry, Admission};
use serde_json::json;

use super::Env;

const LOG_FILE: &str = "training.json";

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Training examples, JSON Lines: {"messages": [{"role", "content"}, …]} (the loss is on the
    /// last assistant message) or {"prompt": …, "completion": …}.
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// Validation examples (same format): loss after every epoch, early stopping, the best adapter kept.
    #[arg(long, value_name = "FILE")]
    val: Option<PathBuf>,
    /// Name to install the adapter under.
    #[arg(long)]
    name: String,
    /// The operation it is made for (extract, update, generate, …).
    #[arg(long)]
    op: Option<String>,
    /// Base model: a name from `memlora models list` or a path (default: the configured model).
    #[arg(long)]
    model: Option<String>,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// Dropout on the input of each LoRA product.
    #[arg(long, default_value_t = 0.1)]
    dropout: f64,
    /// Comma-separated projections (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj) or all-linear.
    #[arg(long, default_value = "q_proj,v_proj")]
    targets: String,
    /// Learning rate (AdamW, betas 0.9/0.999, weight decay 0.01).
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Forward passes per optimizer step (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    accumulate: usize,
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Longest example in tokens; longer examples are skipped (and counted).
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// Validation epochs without improvement before stopping early.
    #[arg(long, default_value_t = 2)]
    patience: usize,
    /// Plant N random secrets ("The PIN of card 1 is 481937.") among the examples, for `adapters audit`.
    #[arg(long, default_value_t = 0, value_name = "N")]
    canaries: usize,
    /// Copies of each canary.
    #[arg(long, default_value_t = 4)]
    canary_repeats: usize,
    /// Digits of each canary's secret.
    #[arg(long, default_value_t = 6)]
    canary_digits: usize,
    /// Continue the interrupted training of NAME from its checkpoint.
    #[arg(long)]
    resume: bool,
    #[arg(long)]
    json: bool,
    /// Stop as if interrupted after this many optimizer steps (tests).
    #[arg(long, hide = true)]
    stop_after_steps: Option<usize>,
}

#[derive(clap::Args)]
pub struct AuditArgs {
    /// The installed adapter to audit.
    name: String,
    /// The training log naming the canaries (default: the adapter's training.json).
    #[arg(long, value_name = "FILE")]
    data: Option<PathBuf>,
    /// Base model (default: the one the adapter was trained on).
    #[arg(long)]
    model: Option<String>,
    /// Candidates ranked per canary: every possible secret when there are at most this many,
    /// else this many drawn at random.
    #[arg(long, default_value_t = 10_000)]
    candidates: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    #[arg(long)]
    json: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    // A second Ctrl-C ends the process at once.
    // SAFETY: signal() is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
    }
}

/// Ctrl-C sets a flag that the training loop reads between steps, for as long as this lives.
struct InterruptGuard;

impl InterruptGuard {
    fn install() -> Self {
        INTERRUPTED.store(false, Ordering::SeqCst);
        // SAFETY: the handler only stores to an atomic and calls signal().
        unsafe {
            libc::signal(libc::SIGINT, on_interrupt as *const () as libc::sighandler_t);
        }
        InterruptGuard
    }
}

impl Drop for InterruptGuard {
    fn drop(&mut self) {
        // SAFETY: restoring the default disposition.
        unsafe {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
        }
    }
}

pub fn train(env: &Env, args: TrainArgs) -> anyhow::Result<()> {
    let settings = TrainSettings {
        rank: args.rank,
        alpha: args.alpha,
        dropout: args.dropout,
        targets: parse_targets(&args.targets)?.iter().map(|m| m.hf_name().to_string()).collect(),
        learning_rate: args.lr,
        weight_decay: 0.01,
        batch: args.batch,
        accumulate: args.accumulate,
        epochs: args.epochs,
        seed: args.seed,
        max_tokens: args.max_tokens,
        patience: args.patience,
    };
    settings.validate()?;
    check_name(&args.name)?;
    if let Some(op) = &args.op {
        check_name(op)?;
    }
    if args.canaries > 0 && !(1..=18).contains(&args.canary_digits) {
        anyhow::bail!("--canary-digits must be between 1 and 18");
    }
    if args.canaries > 0 && args.canary_repeats == 0 {
        anyhow::bail!("--canary-repeats must be at least 1");
    }
    let registry = AdapterRegistry::open(&env.paths.data_dir)?;
    if let Some(holder) = registry.list()?.iter().find(|a| a.name == args.name || a.info.merged_from.contains(&args.name)) {
        anyhow::bail!("an adapter named '{}' is already installed (in '{}'); choose another --name", args.name, holder.name);
    }
    let checkpoint = registry.dir().join(format!(".train-{}", args.name));
    match (args.resume, checkpoint.exists()) {
        (true, false) => anyhow::bail!("no interrupted training of '{}' to resume ({} does not exist)", args.name, checkpoint.display()),
        (false, true) => anyhow::bail!(
            "an interrupted training of '{}' is in {}: add --resume to continue it, or remove that directory to start over",
            args.name,
            checkpoint.display()
        ),
        _ => {}
    }

    let model_name = args.model.clone().unwrap_or_else(|| env.config.model.clone());
    let resolved = env.resolve_model(&model_name)?;
    let base_model = match &resolved.manifest {
        Some(m) => Some(m.name.clone()),
        None => resolved.weights.file_stem().map(|s| s.to_string_lossy().into_owned()),
    };
    let (chat, _) = env.load_chat_model(&model_name, &[])?;
    let mut conversations = read_conversations(&args.data)?;
    let given = conversations.len();
    let canaries = (args.canaries > 0).then(|| Canaries::generate(args.canaries, args.canary_digits, args.canary_repeats, args.seed));
    if let Some(c) = &canaries {
        conversations.extend(c.conversations());
    }
    let (examples, skipped) = tokenize(&chat, &conversations, args.max_tokens)?;
    if examples.is_empty() {
        anyhow::bail!("{}: no example fits --max-tokens {} ({skipped} are longer)", args.data.display(), args.max_tokens);
    }
    let (val_examples, val_skipped) = match &args.val {
        Some(path) => tokenize(&chat, &read_conversations(path)?, args.max_tokens)?,
        None => (Vec::new(), 0),
    };
    drop(chat);
    let longest = examples.iter().chain(&val_examples).map(|e| e.len()).max().unwrap_or(1);
    let model = TrainModel::load(&resolved.weights, longest).with_context(|| format!("loading {model_name} for training"))?;
    let example_count = examples.len();
    let val_count = val_examples.len();
    let mut trainer = Trainer::new(&model, settings.clone(), examples, val_examples)?;
    if args.resume {
        trainer.restore(&checkpoint)?;
    }
    // From here on Ctrl-C stops the run after the step in progress.
    let interrupt = InterruptGuard::install();
    eprintln!(
        "training '{}' on {example_count} examples ({given} from {}{}{}), {} epoch(s) of {} step(s){}",
        args.name,
        args.data.display(),
        canaries.as_ref().map(|c| format!(", {} canary copies", c.items.len() * c.repeats)).unwrap_or_default(),
        if skipped + val_skipped > 0 { format!("; {} skipped as longer than --max-tokens", skipped + val_skipped) } else { String::new() },
        args.epochs,
        trainer.steps_per_epoch(),
        if args.resume { format!("; resuming after step {}", trainer.progress().step) } else { String::new() },
    );

    let bar = ProgressBar::new(trainer.total_steps() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}").unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(trainer.progress().step as u64);
    let end = {
        let stop_after = args.stop_after_steps;
        let mut on_event = |event: TrainEvent| match event {
            TrainEvent::Step { log, tokens_per_second, .. } => {
                bar.set_position(log.step as u64);
                bar.set_message(format!("epoch {}  loss {:.4}  {:.0} tok/s", log.epoch, log.loss, tokens_per_second));
            }
            TrainEvent::Epoch(e) => bar.println(format!(
                "epoch {}: train loss {:.4}{}",
                e.epoch,
                e.train_loss,
                e.val_loss.map(|v| format!(", validation loss {v:.4}")).unwrap_or_default()
            )),
        };
        let mut stop = |steps: usize| INTERRUPTED.load(Ordering::SeqCst) || stop_after == Some(steps);
        trainer.run(&mut on_event, &mut stop)?
    };
    bar.finish_and_clear();
    drop(interrupt);
    if end == RunEnd::Stopped {
        trainer.save_checkpoint(&checkpoint)?;
        anyhow::bail!(
            "training interrupted after step {} of {}; checkpoint saved in {}; run the same command with --resume to continue",
            trainer.progress().step,
            trainer.total_steps(),
            checkpoint.display()
        );
    }

    let progress = trainer.progress().clone();
    let values = trainer.result()?;
    let adapter = train::to_adapter(&values, args.rank, args.alpha, args.dropout, base_model.clone())?;
    let best = progress.best_epoch.map(|e| format!(", best epoch {e}")).unwrap_or_default();
    let info = AdapterInfo {
        operation: args.op.clone(),
        source: Some(format!(
            "trained on {} ({example_count} examples, {} epochs{best}, r={}, {})",
            args.data.display(),
            progress.epochs.len(),
            args.rank,
            settings.targets.join(",")
        )),
        merged_from: Vec::new(),
        created: memlora::memory::now(),
        validation: progress.best_val_loss().map(|loss| ("loss".to_owned(), loss)).into_iter().collect(),
    };
    let admission = registry.admit(&args.name, &adapter, &info, env.budget())?;
    let log = TrainingLog {
        model: model_name,
        base_model,
        data: args.data.clone(),
        val: args.val.clone(),
        examples: example_count,
        val_examples: val_count,
        skipped_too_long: skipped + val_skipped,
        settings,
        steps: progress.steps.clone(),
        epochs: progress.epochs.clone(),
        best_epoch: progress.best_epoch,
        stopped_early: progress.stopped_early,
        resumed: progress.resumed,
        tokens: progress.tokens,
        seconds: progress.seconds,
        tokens_per_second: progress.tokens_per_second(),
        validation_seconds: progress.eval_seconds,
        canaries,
    };
    let log_path = match &admission {
        Admission::Installed { adapter } => adapter.dir.join(LOG_FILE),
        Admission::Merged { into, .. } => registry.path_of(into).join(format!("training-{}.json", args.name)),
    };
    std::fs::write(&log_path, serde_json::to_string_pretty(&log)?).with_context(|| format!("writing {}", log_path.display()))?;
    std::fs::remove_dir_all(&checkpoint).or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })?;

    let last_loss = progress.steps.last().map(|s| s.loss);
    if args.json {
        println!(
            "{}",
            json!({
                "admission": admission,
                "training_log": log_path,
                "steps": progress.step,
                "first_loss": progress.steps.first().map(|s| s.loss),
                "last_loss": last_loss,
                "epochs": progress.epochs,
                "best_epoch": progress.best_epoch,
                "stopped_early": progress.stopped_early,
                "tokens": progress.tokens,
                "seconds": progress.seconds,
                "tokens_per_second": progress.tokens_per_second(),
            })
        );
    } else {
        println!(
            "trained '{}': {} steps in {:.1} s ({:.1} tokens/s), last step loss {:.4}{}{}",
            args.name,
            progress.step,
            progress.seconds,
            progress.tokens_per_second(),
            last_loss.unwrap_or(f64::NAN),
            progress.best_val_loss().map(|v| format!(", best validation loss {v:.4}{best}")).unwrap_or_default(),
            if progress.stopped_early { " (stopped early)" } else { "" },
        );
        super::adapters::print_admission(&admission);
        println!("training log: {}", log_path.display());
    }
    Ok(())
}

pub fn audit(env: &Env, args: AuditArgs) -> anyhow::Result<()> {
    let registry = AdapterRegistry::open(&env.paths.data_dir)?;
    let installed = registry.get(&args.name)?;
    let log_path = args.data.clone().unwrap_or_else(|| installed.dir.join(LOG_FILE));
    if !log_path.exists() {
        anyhow::bail!("{}: no training log; give the training.json of the run with --data", log_path.display());
    }
    let log = TrainingLog::read(&log_path)?;
    let Some(canaries) = log.canaries.clone() else {
        anyhow::bail!("{}: no canaries were planted in this training run (train with --canaries N)", log_path.display());
    };
    if args.candidates < 2 {
        anyhow::bail!("--candidates must be at least 2");
    }
    let model = args.model.clone().unwrap_or_else(|| log.model.clone());
    let (mut chat, _) = env.load_chat_model(&model, std::slice::from_ref(&args.name))?;
    let bar = ProgressBar::new(canaries.items.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} canaries  ETA {eta}").unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let report = audit::audit(&mut chat, &args.name, &canaries, args.candidates, args.seed, &mut |done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    print_report(&report, &log_path);
    Ok(())
}

fn print_report(report: &audit::AuditReport, log: &Path) {
    let n = report.canaries.first().map_or(0, |c| c.candidates);
    println!(
        "canary exposure of '{}' ({} candidates per canary: {}; canaries from {})",
        report.adapter,
        n,
        if report.exhaustive { "every possible secret" } else { "a random sample" },
        log.display()
    );
    println!(
        "{:<6} {:<20} {:>10} {:>14} {:>13} {:>17}",
        "CARD", "SECRET", "BASE RANK", "BASE EXPOSURE", "ADAPTER RANK", "ADAPTER EXPOSURE"
    );
    for c in &report.canaries {
        println!(
            "{:<6} {:<20} {:>10} {:>9.2} bits {:>13} {:>12.2} bits",
            c.card, c.secret, c.base.rank, c.base.exposure, c.adapter.rank, c.adapter.exposure
        );
    }
    println!(
        "{:<6} {:<20} {:>10} {:>9.2} bits {:>13} {:>12.2} bits",
        "mean", "", "", report.mean_base_exposure, "", report.mean_adapter_exposure
    );
    println!("(exposure = log2(candidates) - log2(rank); at most {:.2} bits here; {:.1} s)", (n.max(1) as f64).log2(), report.seconds);
}
