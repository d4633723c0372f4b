//! `memlora` with no command: the interactive app on the worker, or on the daemon's
//! when one serves the data dir.

use std::io::IsTerminal;
use std::process::ExitCode;

use memlora::worker;

use super::Env;
use crate::tui::{self, image::ImagesSetting, keymap::Keymap, Outcome};

pub fn run(env: &Env) -> anyhow::Result<ExitCode> {
    // Settings are checked first: a mistake in them is reported even without a terminal.
    let ui = &env.config.ui;
    let keymap = Keymap::load(&ui.keymap, &ui.keys)?;
    let images: ImagesSetting = ui.images.parse().map_err(anyhow::Error::msg)?;
    if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        anyhow::bail!(
            "the interactive app needs a terminal (stdin and stdout); for scripts use `memlora batch` (JSON Lines) or `memlora ask \"…\"`"
        );
    }
    let model = env.config.model.clone();
    let mut daemon = env.daemon()?;
    if daemon.is_none() {
        // Missing models are pulled here, with their progress on the terminal; loading
        // them happens inside the app.
        env.resolve_model(&model)?;
        env.resolve_model(&env.config.embedder)?;
    }
    let options = tui::Options {
        daemon: daemon.as_ref().map(|d| d.label()),
        model: model.clone(),
        embedder: env.config.embedder.clone(),
        keymap,
        images,
        adapters_dir: env.paths.data_dir.join("adapters"),
        adapter_slots: env.budget().max_slots,
        logs_dir: env.paths.data_dir.join("logs"),
    };
    let mut worker_thread = None;
    let outcome = tui::run(options, || {
        if let Some(daemon) = daemon.take() {
            worker_thread = Some(daemon.thread);
            return Ok(daemon.handle);
        }
        let assistant = env.open_assistant(&model, &[], env.sampling())?;
        let (handle, thread) = worker::spawn(assistant, model.clone(), env.adapter_storage()?);
        worker_thread = Some(thread);
        Ok(handle)
    })?;
    match outcome {
        Outcome::Quit => {
            // The handle is gone: the worker (or the connection to the daemon) finishes
            // what it is doing and stops.
            if let Some(thread) = worker_thread {
                let _ = thread.join();
            }
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Forced { pending } => {
            eprintln!("memlora: quit while still {}; those memory changes may not have been saved", pending.join(", "));
            Ok(ExitCode::FAILURE)
        }
    }
}
