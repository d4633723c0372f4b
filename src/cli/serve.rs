//! `memlora serve`: the daemon (one warm worker for every session on this data dir);
//! `memlora serve --stop`; `memlora status`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use memlora::daemon::{self, ServeOptions};
use memlora::worker::{self, Event, Request};
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};

use super::Env;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Listen on PATH instead of DATA_DIR/memlora.sock (clients find it in DATA_DIR/daemon.pid).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Stop the daemon of this data dir (it lets a memory write in progress finish).
    #[arg(long, conflicts_with_all = ["socket", "model"])]
    stop: bool,
    /// Model name or path (default: the configured model).
    #[arg(long)]
    model: Option<String>,
}

/// How long `serve --stop` waits for the daemon to finish what it is doing.
const STOP_WAIT: Duration = Duration::from_secs(300);

pub fn run(env: &Env, args: ServeArgs) -> anyhow::Result<()> {
    let data_dir = &env.paths.data_dir;
    if args.stop {
        let info = daemon::stop(data_dir, STOP_WAIT)?;
        let pid = info.pid.map(|pid| format!(" (pid {pid})")).unwrap_or_default();
        eprintln!("memlora: stopped the daemon{pid} of {}", data_dir.display());
        return Ok(());
    }
    let socket = args.socket.unwrap_or_else(|| daemon::default_socket(data_dir));
    // The data dir and the socket first: a second daemon is refused before a model loads.
    let mut lock = daemon::claim(data_dir, &socket)?;
    let listener = lock.bind()?;
    // Clients that connect while the models load wait in the socket's backlog.
    let model = args.model.unwrap_or_else(|| env.config.model.clone());
    let assistant = env.open_assistant(&model, &[], env.sampling())?;
    let (handle, thread) = worker::spawn(assistant, model.clone(), env.adapter_storage()?);
    eprintln!("memlora: serving {} with {model} on {} (pid {})", data_dir.display(), lock.socket().display(), std::process::id());
    tracing::info!("daemon serving {} on {}", data_dir.display(), lock.socket().display());

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        listener.set_nonblocking(true).context("socket")?;
        let listener = tokio::net::UnixListener::from_std(listener).context("socket")?;
        let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        // A daemon started by hand keeps running when the SSH session that started it ends.
        let _hangup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
        let options = ServeOptions::default();
        let shutdown = async {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        };
        daemon::serve(handle, listener, options, shutdown).await;
        anyhow::Ok(())
    })?;
    drop(runtime);
    // The worker finishes the request it is serving (a memory write becomes durable).
    let _ = thread.join();
    drop(lock);
    eprintln!("memlora: daemon stopped");
    Ok(())
}

pub fn status(env: &Env, json: bool) -> anyhow::Result<()> {
    let data_dir = &env.paths.data_dir;
    let Some(daemon) = env.daemon()? else {
        if json {
            println!("{}", json!({"data_dir": data_dir, "daemon": null}));
        } else {
            println!("no daemon serves {}; commands run standalone", data_dir.display());
        }
        return Ok(());
    };
    let events = daemon.request(Request::Status, &mut |_| true)?;
    let Some(Event::Status { status }) = events.into_iter().next() else { anyhow::bail!("the daemon did not report its status") };
    if json {
        println!("{}", json!({"data_dir": data_dir, "daemon": {"pid": daemon.info.pid, "socket": daemon.info.socket}, "status": status}));
    } else {
        println!("{} on {}: serving {}", daemon.label(), daemon.info.socket.display(), data_dir.display());
        println!("model {}, {} memories", status.model, status.memories);
        for binding in &status.bindings {
            println!("{}: {} ×{}", binding.operation, binding.adapter, binding.scale);
        }
    }
    daemon.finish();
    Ok(())
}
