//! `memlora adapters …`: the installed LoRA adapters, their operation bindings, the
//! storage budget and data-free merging.

use std::ops::ControlFlow;
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};

use memlora::adapters::merge::{self, MergeMethod};
use memlora::adapters::{Admission, InstalledAdapter, LoraAdapter, MergeOutcome, MergeProgress, MergeSpec, MergeStage};
use memlora::daemon;
use memlora::engine::TargetModule;
use memlora::worker::{Event, Request};
use serde_json::json;

use super::Env;

#[derive(clap::Subcommand)]
pub enum AdaptersCommand {
    /// Installed adapters: base model, rank, targets, size, operation, what they merge.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One adapter in detail, with the operations it serves.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Install a PEFT adapter (a directory, or its adapter_model.safetensors); beyond the
    /// storage budget it is merged into the most similar installed adapter.
    Import {
        path: PathBuf,
        #[arg(long)]
        name: Option<String>,
        /// The operation it is made for (extract, update, generate, vision, …).
        #[arg(long)]
        op: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Write an adapter as a plain PEFT directory.
    Export {
        name: String,
        dir: PathBuf,
    },
    /// Uninstall an adapter (and unbind it).
    Remove {
        name: String,
    },
    /// Make NAME serve OPERATION (extract, update, generate).
    Bind {
        operation: String,
        name: String,
    },
    Unbind {
        operation: String,
    },
    /// Merge installed adapters into a new one (data-free, in ΔW space, re-factorised to --rank).
    Merge {
        /// Adapters to merge, NAME or NAME=WEIGHT.
        #[arg(required = true, num_args = 1..)]
        adapters: Vec<String>,
        #[arg(long)]
        into: String,
        #[arg(long, value_enum, default_value_t = Method::Linear)]
        method: Method,
        #[arg(long, default_value_t = 8)]
        rank: usize,
        /// TIES: fraction of each adapter's largest entries kept.
        #[arg(long, default_value_t = 0.2)]
        density: f32,
        /// DARE: probability of dropping each entry.
        #[arg(long, default_value_t = 0.9)]
        drop: f32,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        #[arg(long)]
        op: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Train a LoRA adapter on JSON Lines examples (on the CPU) and install it; Ctrl-C saves a
    /// checkpoint that --resume continues.
    Train(Box<super::train::TrainArgs>),
    /// Canary exposure of an adapter trained with --canaries: how far it memorised the planted
    /// secrets, against the base model.
    Audit(super::train::AuditArgs),
    /// Storage against fidelity of sharing low-rank factors between adapters (HydraOpt-style).
    ShareReport {
        #[arg(required = true, num_args = 1..)]
        adapters: Vec<String>,
        #[arg(long, default_value_t = 8)]
        rank: usize,
        /// Numbers of clusters (shared factor sets) to try.
        #[arg(long, value_delimiter = ',', default_value = "4,2,1")]
        clusters: Vec<usize>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Method {
    Linear,
    Ties,
    Dare,
}

pub fn run(env: &Env, command: AdaptersCommand) -> anyhow::Result<()> {
    use AdaptersCommand::*;
    // (A merge goes through the daemon when one runs.)
    let changes_adapters = matches!(command, Import { .. } | Remove { .. } | Bind { .. } | Unbind { .. } | Train(_));
    run_command(env, command)?;
    // The adapter files are the registry's, not the daemon's: they change here, and the
    // daemon loads them when it starts.
    if let Some(info) = daemon::running(&env.paths.data_dir).filter(|_| changes_adapters) {
        let pid = info.pid.map(|pid| format!(" (pid {pid})")).unwrap_or_default();
        eprintln!(
            "memlora: the daemon{pid} uses the adapters it started with; `memlora serve --stop` and `memlora serve` to use this change"
        );
    }
    Ok(())
}

fn run_command(env: &Env, command: AdaptersCommand) -> anyhow::Result<()> {
    let registry = env.adapter_registry(&env.config.model)?;
    match command {
        AdaptersCommand::Train(args) => return super::train::train(env, *args),
        AdaptersCommand::Audit(args) => return super::train::audit(env, args),
        AdaptersCommand::List { json } => {
            let adapters = registry.list()?;
            if json {
                println!("{}", serde_json::to_string(&adapters)?);
                return Ok(());
            }
            let bindings = registry.bindings()?;
            if adapters.is_empty() {
                println!("no adapters installed in {}", registry.dir().display());
            }
            println!(
                "{:<24} {:>4} {:<40} {:>9} {:<10} {:<16} {:<30} MERGED FROM",
                "NAME", "RANK", "TARGETS", "SIZE", "OPERATION", "SERVES", "VALIDATION"
            );
            for adapter in &adapters {
                let serves: Vec<&str> = bindings.iter().filter(|(_, n)| **n == adapter.name).map(|(op, _)| op.as_str()).collect();
                println!(
                    "{:<24} {:>4} {:<40} {:>9} {:<10} {:<16} {:<30} {}",
                    adapter.name,
                    adapter.rank,
                    targets_summary(&adapter.targets),
                    format!("{:.1} MB", adapter.bytes as f64 / 1e6),
                    adapter.info.operation.as_deref().unwrap_or("-"),
                    if serves.is_empty() { "-".into() } else { serves.join(",") },
                    adapter.info.validation_summary(),
                    adapter.info.merged_from.join(", ")
                );
            }
            let budget = env.budget();
            match budget.max_slots {
                0 => println!("budget: no limit (adapters.max_slots = 0)"),
                k => println!("budget: {} of {k} slots used", adapters.len()),
            }
        }
        AdaptersCommand::Show { name, json } => {
            let adapter = registry.get(&name)?;
            let serves: Vec<String> = registry.bindings()?.into_iter().filter(|(_, n)| *n == name).map(|(op, _)| op).collect();
            if json {
                println!("{}", json!({"adapter": adapter, "serves": serves}));
            } else {
                print_adapter(&adapter, &serves);
            }
        }
        AdaptersCommand::Import { path, name, op, json } => {
            let admission = registry.import(&path, name.as_deref(), op.as_deref(), env.budget())?;
            if json {
                println!("{}", serde_json::to_string(&admission)?);
            } else {
                print_admission(&admission);
            }
        }
        AdaptersCommand::Export { name, dir } => {
            // PEFT loads an adapter onto the model its config names: the hub id of the
            // original model rather than memlora's name for the quantised one.
            let installed = registry.get(&name)?;
            let hub_id = installed.base_model.as_deref().and_then(|base| env.catalog.get(base)).and_then(|m| m.base_model.clone());
            registry.export(&name, &dir, hub_id.as_deref())?;
            println!("exported '{name}' to {} (PEFT format)", dir.display());
        }
        AdaptersCommand::Remove { name } => {
            let unbound = registry.remove(&name)?;
            println!("removed '{name}'");
            if !unbound.is_empty() {
                println!("{} now run(s) on the base model", unbound.join(", "));
            }
        }
        AdaptersCommand::Bind { operation, name } => {
            registry.bind(&operation, Some(&name))?;
            println!("{operation} now runs with '{name}'");
        }
        AdaptersCommand::Unbind { operation } => {
            registry.bind(&operation, None)?;
            println!("{operation} now runs on the base model");
        }
        AdaptersCommand::Merge { adapters, into, method, rank, density, drop, seed, op, json } => {
            let method = match method {
                Method::Linear => MergeMethod::Linear,
                Method::Ties => MergeMethod::Ties { density },
                Method::Dare => MergeMethod::Dare { drop_rate: drop, seed },
            };
            let spec = MergeSpec { adapters, into, method, rank, operation: op };
            let bar = if json { ProgressBar::hidden() } else { ProgressBar::new(0) };
            bar.set_style(
                ProgressStyle::with_template("{msg:16!} {bar:30} {pos:>4}/{len:<4} {elapsed_precise}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            let outcome = match env.daemon()? {
                // The daemon's own adapter jobs merge, and its worker attaches a rewritten
                // adapter it runs with.
                Some(daemon) => merge_on_daemon(daemon, &spec, &bar),
                None => registry
                    .merge(&spec, env.budget(), &mut |progress| {
                        show_merge_progress(&bar, progress);
                        ControlFlow::Continue(())
                    })
                    .map_err(anyhow::Error::from),
            };
            bar.finish_and_clear();
            let outcome = outcome?;
            if json {
                println!("{}", serde_json::to_string(&outcome)?);
            } else {
                print_merge_outcome(&spec, &outcome);
            }
        }
        AdaptersCommand::ShareReport { adapters, rank, clusters, json } => {
            let inputs = registry.load_weighted(&adapters)?;
            let named: Vec<(&str, &LoraAdapter)> = inputs.iter().map(|(name, adapter, _)| (name.as_str(), adapter)).collect();
            let rows = merge::report(&named, &clusters, rank)?;
            if json {
                let rows: Vec<_> = rows
                    .iter()
                    .map(|r| json!({"clusters": r.clusters, "storage_bytes": r.storage_bytes, "original_bytes": r.original_bytes, "mean_error": r.mean_error, "max_error": r.max_error}))
                    .collect();
                println!("{}", json!({"rank": rank, "rows": rows}));
                return Ok(());
            }
            println!("{:>8} {:>14} {:>14} {:>12} {:>12}", "CLUSTERS", "STORAGE", "ORIGINAL", "MEAN ERROR", "MAX ERROR");
            for row in rows {
                println!(
                    "{:>8} {:>11.2} MB {:>11.2} MB {:>11.3}% {:>11.3}%",
                    row.clusters,
                    row.storage_bytes as f64 / 1e6,
                    row.original_bytes as f64 / 1e6,
                    100.0 * row.mean_error,
                    100.0 * row.max_error
                );
            }
        }
    }
    Ok(())
}

/// Runs the merge as the daemon's job, drawing its progress as it comes.
fn merge_on_daemon(daemon: super::Daemon, spec: &MergeSpec, bar: &ProgressBar) -> anyhow::Result<MergeOutcome> {
    let mut submission = daemon.handle.submit(Request::MergeAdapters(spec.clone()));
    let (mut outcome, mut error) = (None, None);
    while let Some(event) = submission.events.blocking_recv() {
        match event {
            Event::MergeProgress { progress } => show_merge_progress(bar, progress),
            Event::Merged { outcome: merged } => outcome = Some(merged),
            Event::Error { message } => error = Some(message),
            Event::Done => break,
            _ => {}
        }
    }
    daemon.finish();
    match (outcome, error) {
        (_, Some(message)) => anyhow::bail!("{message}"),
        (Some(outcome), None) => Ok(outcome),
        (None, None) => anyhow::bail!("the daemon ended the merge without a result"),
    }
}

fn show_merge_progress(bar: &indicatif::ProgressBar, progress: MergeProgress) {
    let stage = match progress.stage {
        MergeStage::Loading => "loading",
        MergeStage::Merging => "merging modules",
        MergeStage::Installing => "installing",
    };
    bar.set_length(progress.total as u64);
    bar.set_position(progress.done as u64);
    bar.set_message(stage);
}

pub(super) fn print_merge_outcome(spec: &MergeSpec, outcome: &MergeOutcome) {
    // TIES and DARE make a full-rank ΔW; the error is measured against it.
    println!(
        "merged {} → '{}' ({}); rank-{} reconstruction error of the merged ΔW: {:.2} % overall, {:.2} % worst module",
        spec.adapters.join(" + "),
        spec.into,
        outcome.recipe,
        spec.rank,
        100.0 * outcome.reconstruction_error,
        100.0 * outcome.max_module_error
    );
    print_admission(&outcome.admission);
}

fn print_adapter(adapter: &InstalledAdapter, serves: &[String]) {
    println!("{}", adapter.name);
    println!("  base model   {}", adapter.base_model.as_deref().unwrap_or("-"));
    println!("  rank         {} (alpha {})", adapter.rank, adapter.alpha);
    println!("  targets      {}", adapter.targets.join(", "));
    println!("  size         {:.2} MB", adapter.bytes as f64 / 1e6);
    println!("  operation    {}", adapter.info.operation.as_deref().unwrap_or("-"));
    println!("  serves       {}", if serves.is_empty() { "-".into() } else { serves.join(", ") });
    println!("  source       {}", adapter.info.source.as_deref().unwrap_or("-"));
    println!("  validation   {}", adapter.info.validation_summary());
    if !adapter.info.merged_from.is_empty() {
        println!("  merged from  {}", adapter.info.merged_from.join(", "));
    }
    println!("  path         {}", adapter.dir.display());
}

pub(super) fn print_admission(admission: &Admission) {
    match admission {
        Admission::Installed { adapter } => println!("installed '{}' (rank {}, {})", adapter.name, adapter.rank, adapter.targets.join(",")),
        Admission::Merged { into, similarity, reconstruction_error, members } => println!(
            "the adapter budget is full: merged into '{into}' (ΔW similarity {similarity:.2}, re-factorisation error {:.2} %); '{into}' now stands for {}",
            100.0 * reconstruction_error,
            members.join(", ")
        ),
    }
}

/// "all-linear" when an adapter covers every projection, else the projections.
fn targets_summary(targets: &[String]) -> String {
    let all = TargetModule::ALL.iter().all(|module| targets.iter().any(|t| t == module.hf_name()));
    if all {
        "all-linear".to_owned()
    } else {
        targets.join(",")
    }
}
