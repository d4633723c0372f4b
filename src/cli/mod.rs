//! Command implementations and what they share: paths, config, the model
//! catalog and cache, and loading a chat model with its adapters.

pub mod adapters;
pub mod app;
pub mod ask;
pub mod batch;
pub mod bench;
pub mod bench_memory;
pub mod distill;
pub mod eval;
pub mod eval_vqa;
pub mod ingest;
pub mod memory;
pub mod models;
pub mod serve;
pub mod train;

use std::path::{Path, PathBuf};

use anyhow::Context;
use memlora::adapters::{bundled, AdapterRegistry, Budget, LoraAdapter};
use memlora::assistant::{Assistant, OperationAdapters};
use memlora::config::{Config, Paths};
use memlora::daemon::{self, DaemonInfo};
use memlora::engine::{ChatModel, Embedder, LoadOptions, SamplingParams, WeightFormat};
use memlora::memory::pipeline::{MemoryPipeline, Operation, PipelineSettings};
use memlora::memory::prompts::Prompts;
use memlora::memory::MemoryStore;
use memlora::models::{Catalog, Manifest, ModelCache, ModelFiles};
use memlora::vision::{Vision, VisionMode, VisionSettings};
use memlora::worker::{Event, Request, WorkerHandle};

/// Which memory operations run with their bound adapters (`--experts`): `on`, `off`, or
/// the operations by name (`extract,update`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Experts {
    All,
    Only(Vec<String>),
}

impl Experts {
    pub fn includes(&self, operation: &str) -> bool {
        match self {
            Experts::All => true,
            Experts::Only(operations) => operations.iter().any(|o| o == operation),
        }
    }
}

impl std::str::FromStr for Experts {
    type Err = String;

    fn from_str(text: &str) -> Result<Experts, String> {
        match text {
            "on" => Ok(Experts::All),
            "off" => Ok(Experts::Only(Vec::new())),
            list => list
                .split(',')
                .map(|name| match name.trim() {
                    operation @ ("extract" | "update" | "generate" | "vision") => Ok(operation.to_owned()),
                    other => Err(format!("'{other}' is not on, off or an operation (extract, update, generate, vision)")),
                })
                .collect::<Result<_, _>>()
                .map(Experts::Only),
        }
    }
}

/// What every command starts from.
pub struct Env {
    pub paths: Paths,
    pub config: Config,
    pub catalog: Catalog,
    pub cache: ModelCache,
    /// `--no-daemon`: run standalone even when a daemon serves the data dir.
    pub no_daemon: bool,
    _log_guard: Option<tracing_appender::non_blocking::WorkerGuard>,
}

impl Env {
    pub fn new(data_dir: Option<PathBuf>, models_dir: Option<PathBuf>) -> anyhow::Result<Self> {
        let paths = Paths::resolve(data_dir, models_dir)?;
        create_private_dir(&paths.data_dir)?;
        memlora::config::check_data_dir_links(&paths.data_dir)?;
        let log_guard = init_logging(&paths.data_dir);
        let config = Config::load(&paths.config_file)?;
        // candle sizes its thread pools from these before the first model op;
        // unset, it re-reads /proc/cpuinfo on every parallel op. Its barrier
        // pool (elementwise ops of a long prefill) gets no workers: it waits
        // for every worker on every op, which stalls on a busy machine, so the
        // engine's own pool (memlora::engine::set_max_threads) does that work.
        let threads = match config.engine.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", "1");
        memlora::engine::set_max_threads(threads);
        let catalog = Catalog::load(Some(&paths.data_dir.join("models")))?;
        let cache = ModelCache::new(paths.models_dir.clone());
        Ok(Self { paths, config, catalog, cache, no_daemon: false, _log_guard: log_guard })
    }

    /// A model named in the catalog (pulled first when missing) or a path to
    /// a GGUF file or safetensors directory.
    pub fn resolve_model(&self, name_or_path: &str) -> anyhow::Result<ResolvedModel> {
        let path = Path::new(name_or_path);
        if path.exists() {
            return Ok(ResolvedModel { weights: path.to_path_buf(), manifest: None });
        }
        let manifest = self
            .catalog
            .get(name_or_path)
            .with_context(|| format!("model '{name_or_path}' is neither a file nor a known model (see `memlora models list`)"))?;
        let files = match self.cache.resolve(manifest) {
            Some(files) => files,
            None => {
                eprintln!("memlora: {} is not in the model cache yet; pulling it", manifest.name);
                models::pull_with_progress(&self.cache, manifest)?
            }
        };
        Ok(ResolvedModel { weights: model_path(&files), manifest: Some(manifest.clone()) })
    }

    /// Loads the chat model and installs `adapters` (`NAME`, `DIR`, `NAME=SCALE`),
    /// returning the active set for requests.
    pub fn load_chat_model(&self, model: &str, adapters: &[String]) -> anyhow::Result<(ChatModel, Vec<(String, f32)>)> {
        let resolved = self.resolve_model(model)?;
        let weights: WeightFormat = self.config.engine.weights.parse().map_err(anyhow::Error::msg).context("engine.weights")?;
        let mut aliases = Vec::new();
        let mut chat_template = None;
        if let Some(m) = &resolved.manifest {
            aliases.push(m.name.clone());
            aliases.extend(m.hub_repos());
            aliases.extend(m.base_model.clone());
            chat_template = m.chat_template.clone();
        }
        let options = LoadOptions { weights, context: self.config.engine.context, tokenizer: None, chat_template, aliases };
        let mut chat = ChatModel::load(&resolved.weights, &options)?;
        let mut active = Vec::new();
        for spec in adapters {
            let (name, scale) = parse_adapter_spec(spec)?;
            let dir = self.adapter_dir(&name);
            if !dir.exists() {
                anyhow::bail!(
                    "adapter '{name}' not found: not a directory, and not installed in {}",
                    self.paths.data_dir.join("adapters").display()
                );
            }
            let adapter = LoraAdapter::load(&dir)?;
            let slot_name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or(name);
            chat.attach_adapter(&slot_name, &adapter)?;
            active.push((slot_name, scale));
        }
        Ok((chat, active))
    }

    /// The sentence embedder (pulled first when missing).
    pub fn load_embedder(&self) -> anyhow::Result<Embedder> {
        let resolved = self.resolve_model(&self.config.embedder)?;
        Embedder::load(&resolved.weights).with_context(|| format!("cannot load the embedder '{}'", self.config.embedder))
    }

    /// A connection to the daemon serving the data dir, if one runs (and `--no-daemon`
    /// was not given).
    pub fn daemon(&self) -> anyhow::Result<Option<Daemon>> {
        if self.no_daemon {
            return Ok(None);
        }
        let info = daemon::locate(&self.paths.data_dir);
        Ok(daemon::connect(&info.socket)?.map(|(handle, thread)| Daemon { handle, thread, info }))
    }

    /// The embedder and the memory store of the data dir (locked for this process).
    pub fn open_memory(&self) -> anyhow::Result<(Embedder, MemoryStore)> {
        let embedder = self.load_embedder()?;
        let store = MemoryStore::open(&self.paths.data_dir, embedder.dimension())?;
        Ok((embedder, store))
    }

    /// [`Env::open_assistant`] on the memories of `data_dir` instead of the profile's.
    pub fn open_assistant_in(
        &self,
        data_dir: &Path,
        model: &str,
        generate_adapters: &[String],
        sampling: SamplingParams,
    ) -> anyhow::Result<Assistant> {
        let embedder = self.load_embedder()?;
        let store = MemoryStore::open(data_dir, embedder.dimension())?;
        self.assistant_with(embedder, store, model, generate_adapters, sampling, &Experts::All)
    }

    /// An assistant on the memories of `data_dir` for an evaluation: the config's
    /// sampling, and the bound adapters of the operations `experts` names.
    pub fn open_assistant_for_eval(&self, data_dir: &Path, model: &str, experts: &Experts) -> anyhow::Result<Assistant> {
        let embedder = self.load_embedder()?;
        let store = MemoryStore::open(data_dir, embedder.dimension())?;
        self.assistant_with(embedder, store, model, &[], self.sampling(), experts)
    }

    /// The profile's adapters, with the bundled experts for `model` provisioned (once,
    /// unless `adapters.bundled` is off).
    pub fn adapter_registry(&self, model: &str) -> anyhow::Result<AdapterRegistry> {
        let registry = AdapterRegistry::open(&self.paths.data_dir)?;
        if !self.config.adapters.bundled {
            return Ok(registry);
        }
        let installed = registry.provision_bundled(model)?;
        if !installed.is_empty() {
            tracing::info!(experts = ?installed, model, "installed the bundled memory experts");
        }
        Ok(registry)
    }

    /// Everything a conversation needs: the chat model with each memory operation's
    /// adapters attached (the config's bindings; `generate_adapters`, when given, replace
    /// the generation binding), the embedder, the memory store and the prompts.
    pub fn open_assistant(&self, model: &str, generate_adapters: &[String], sampling: SamplingParams) -> anyhow::Result<Assistant> {
        self.open_assistant_in(&self.paths.data_dir, model, generate_adapters, sampling)
    }

    fn assistant_with(
        &self,
        embedder: Embedder,
        store: MemoryStore,
        model: &str,
        generate_adapters: &[String],
        sampling: SamplingParams,
        experts: &Experts,
    ) -> anyhow::Result<Assistant> {
        // The store is opened first: a data dir locked by another process fails before a
        // model loads.
        // `adapters bind` records bindings in the registry; names in the config win.
        let mut bound = self.adapter_registry(model)?.bindings()?;
        let configured = &self.config.memory.adapters;
        let operations = [
            ("extract", &configured.extract),
            ("update", &configured.update),
            ("generate", &configured.generate),
            ("vision", &configured.vision),
        ];
        for (operation, name) in operations {
            if !name.is_empty() {
                bound.insert(operation.to_owned(), name.clone());
            }
        }
        bound.retain(|operation, name| {
            // A bundled expert is bound by default, not by choice: with another model it
            // would not fit, so that model runs the operation without it.
            let fits = bundled::EXPERTS.iter().find(|e| e.name == name.as_str()).is_none_or(|e| e.base_model == model);
            experts.includes(operation) && fits
        });
        // The vision model's decoder takes its adapter when it loads; the chat model the rest.
        let vision_adapter = bound.remove("vision");
        let mut specs: std::collections::BTreeMap<Operation, Vec<String>> = std::collections::BTreeMap::new();
        for (operation, name) in bound {
            // Bindings for operations this build does not run are kept for a build that does.
            if let Ok(operation) = operation.parse::<Operation>() {
                specs.insert(operation, vec![name]);
            }
        }
        if !generate_adapters.is_empty() {
            specs.insert(Operation::Generate, generate_adapters.to_vec());
        }
        let mut unique: Vec<String> = specs.values().flatten().cloned().collect();
        unique.sort();
        unique.dedup();
        let (chat, active) = self.load_chat_model(model, &unique)?;
        let adapters: OperationAdapters = specs
            .into_iter()
            .map(|(operation, names)| {
                let slots = names.iter().filter_map(|name| unique.iter().position(|u| u == name).map(|i| active[i].clone())).collect();
                (operation, slots)
            })
            .collect();
        let memory = &self.config.memory;
        let mut assistant = Assistant::new(chat, embedder, store, self.pipeline()?, adapters, sampling, memory.user_name.clone())?;
        assistant.set_extract_window(memory.extract_window);
        assistant.set_vision(Vision::new(self.vision_settings(vision_adapter.as_deref())?));
        Ok(assistant)
    }

    /// The memory pipeline of the config: its prompts file and settings.
    pub fn pipeline(&self) -> anyhow::Result<MemoryPipeline> {
        let memory = &self.config.memory;
        let prompts_path = (!memory.prompts.is_empty()).then(|| PathBuf::from(&memory.prompts));
        let prompts = Prompts::load(prompts_path.as_deref())?;
        let settings = PipelineSettings {
            answer_memories: memory.answer_memories,
            update_candidates: memory.update_candidates,
            undecided_facts: memory.undecided_facts,
            constrained: memory.constrained,
        };
        Ok(MemoryPipeline::new(prompts, settings))
    }

    /// The chat model of the config when it is a path or already in the model cache;
    /// `None` (nothing pulled) otherwise.
    pub fn cached_chat_model(&self) -> anyhow::Result<Option<ChatModel>> {
        let model = &self.config.model;
        let present = Path::new(model).exists() || self.catalog.get(model).is_some_and(|manifest| self.cache.resolve(manifest).is_some());
        if !present {
            return Ok(None);
        }
        Ok(Some(self.load_chat_model(model, &[])?.0))
    }

    /// The vision model's settings. The model is only located (not pulled: it is large and
    /// only wanted with images); when it is missing, using it says how to get it.
    pub fn vision_settings(&self, adapter: Option<&str>) -> anyhow::Result<VisionSettings> {
        let config = &self.config.vision;
        let mode: VisionMode = config.mode.parse().map_err(anyhow::Error::msg).context("vision.mode")?;
        let adapters = match adapter {
            None => Vec::new(),
            Some(spec) => {
                let (name, scale) = parse_adapter_spec(spec)?;
                let dir = self.adapter_dir(&name);
                let slot = dir.file_name().map_or(name, |n| n.to_string_lossy().into_owned());
                vec![(slot, dir, scale)]
            }
        };
        let weights: WeightFormat = self.config.engine.weights.parse().map_err(anyhow::Error::msg).context("engine.weights")?;
        let load = LoadOptions { weights, context: self.config.engine.context, tokenizer: None, chat_template: None, aliases: Vec::new() };
        Ok(VisionSettings {
            model: self.locate_model(&config.model),
            load,
            mode,
            adapters,
            caption_prompt: config.caption_prompt.clone(),
            caption_tokens: config.caption_tokens,
        })
    }

    /// A model's path if it is a path or in the cache, else what to do about it.
    fn locate_model(&self, name_or_path: &str) -> Result<PathBuf, String> {
        let path = Path::new(name_or_path);
        if path.exists() {
            return Ok(path.to_path_buf());
        }
        let Some(manifest) = self.catalog.get(name_or_path) else {
            return Err(format!("'{name_or_path}' is neither a directory nor a known model (see `memlora models list`)"));
        };
        self.cache
            .resolve(manifest)
            .map(|files| model_path(&files))
            .ok_or_else(|| format!("'{name_or_path}' is not downloaded; `memlora models pull {name_or_path}` fetches it"))
    }

    /// The adapter storage budget of the config.
    pub fn budget(&self) -> Budget {
        let a = &self.config.adapters;
        Budget { max_slots: a.max_slots, threshold: (a.merge_threshold > 0.0).then_some(a.merge_threshold), rank: a.merge_rank.max(1) }
    }

    /// The profile's adapters and their budget, for the worker's merge jobs.
    pub fn adapter_storage(&self) -> anyhow::Result<memlora::worker::AdapterStorage> {
        Ok(memlora::worker::AdapterStorage { registry: self.adapter_registry(&self.config.model)?, budget: self.budget() })
    }

    /// The config's sampling settings.
    pub fn sampling(&self) -> SamplingParams {
        let g = &self.config.generation;
        SamplingParams {
            max_tokens: g.max_tokens,
            temperature: g.temperature,
            top_p: g.top_p,
            seed: g.seed,
            repeat_penalty: g.repeat_penalty,
        }
    }

    /// An adapter given as a directory, or by name from the profile's adapter directory.
    fn adapter_dir(&self, name: &str) -> PathBuf {
        let path = Path::new(name);
        if path.exists() {
            path.to_path_buf()
        } else {
            self.paths.data_dir.join("adapters").join(name)
        }
    }
}

/// A LoCoMo file and the conversations of it a command uses.
#[derive(clap::Args)]
pub struct LocomoData {
    /// The LoCoMo JSON file.
    #[arg(long)]
    pub data: PathBuf,
    /// Conversation ids (default: all in the file).
    #[arg(long, value_delimiter = ',')]
    pub conversations: Vec<String>,
}

impl LocomoData {
    /// The chosen conversations, in the order asked for; an unknown id is an error.
    pub fn load(&self) -> anyhow::Result<Vec<memlora::transcript::Conversation>> {
        let conversations = memlora::transcript::load_locomo(&self.data)?;
        let wanted = (!self.conversations.is_empty()).then_some(self.conversations.as_slice());
        Ok(memlora::transcript::select(conversations, wanted, &self.data)?)
    }
}

/// A front end's connection to the daemon: a worker handle served by it.
pub struct Daemon {
    pub handle: WorkerHandle,
    pub thread: std::thread::JoinHandle<()>,
    pub info: DaemonInfo,
}

impl Daemon {
    /// "daemon pid 123", for status lines.
    pub fn label(&self) -> String {
        match self.info.pid {
            Some(pid) => format!("daemon pid {pid}"),
            None => "daemon".into(),
        }
    }

    /// Runs `request` and returns its events up to `Done`, handing tokens to `on_token`
    /// (which stops the answer by returning false); an `Error` event is the error.
    pub fn request(&self, request: Request, on_token: &mut dyn FnMut(&str) -> bool) -> anyhow::Result<Vec<Event>> {
        let mut submission = self.handle.submit(request);
        let mut events = Vec::new();
        let mut error = None;
        while let Some(event) = submission.events.blocking_recv() {
            match event {
                Event::Token { text } => {
                    if !on_token(&text) {
                        submission.cancel.cancel();
                    }
                }
                Event::Error { message } => error = Some(message),
                Event::Done => break,
                other => events.push(other),
            }
        }
        match error {
            Some(message) => anyhow::bail!("{message}"),
            None => Ok(events),
        }
    }

    /// Closes the connection once its requests are answered.
    pub fn finish(self) {
        drop(self.handle);
        let _ = self.thread.join();
    }
}

pub struct ResolvedModel {
    pub weights: PathBuf,
    pub manifest: Option<Manifest>,
}

/// A GGUF model is its weights file; a safetensors model is its directory.
fn model_path(files: &ModelFiles) -> PathBuf {
    if files.weights.extension().is_some_and(|e| e == "gguf") {
        files.weights.clone()
    } else {
        files.dir.clone()
    }
}

/// `NAME` or `NAME=SCALE`.
fn parse_adapter_spec(spec: &str) -> anyhow::Result<(String, f32)> {
    match spec.rsplit_once('=') {
        Some((name, scale)) => {
            let scale: f32 = scale.parse().with_context(|| format!("adapter '{spec}': scale '{scale}' is not a number"))?;
            Ok((name.to_string(), scale))
        }
        None => Ok((spec.to_string(), 1.0)),
    }
}

/// Private data: only the user may read the data directory.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create data dir {}", dir.display()))?;
    // Only when needed: setting a mode is a write, which a read-only file system refuses
    // even when the mode is already right (commands that only read models still work there).
    let mode = std::fs::metadata(dir).with_context(|| format!("cannot read data dir {}", dir.display()))?.permissions().mode();
    if mode & 0o777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make data dir {} private", dir.display()))?;
    }
    Ok(())
}

/// Logs go to `DATA_DIR/logs/memlora.log`, never to the terminal; the filter
/// comes from `MEMLORA_LOG` (default `info`).
fn init_logging(data_dir: &Path) -> Option<tracing_appender::non_blocking::WorkerGuard> {
    let dir = data_dir.join("logs");
    std::fs::create_dir_all(&dir).ok()?;
    // The builder reports a log file it cannot open (a read-only data dir) instead of
    // panicking as `rolling::never` does; memlora then runs without a log.
    let appender = tracing_appender::rolling::Builder::new()
        .rotation(tracing_appender::rolling::Rotation::NEVER)
        .filename_prefix("memlora.log")
        .build(&dir)
        .ok()?;
    let (writer, guard) = tracing_appender::non_blocking(appender);
    let filter = tracing_subscriber::EnvFilter::try_from_env("MEMLORA_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_writer(writer).with_ansi(false).with_env_filter(filter).try_init().ok()?;
    Some(guard)
}

#[cfg(test)]
mod tests {
    use super::Experts;

    #[test]
    fn experts_are_on_off_or_operations_by_name() {
        assert_eq!("on".parse(), Ok(Experts::All));
        assert_eq!("off".parse(), Ok(Experts::Only(Vec::new())));
        let some: Experts = "extract, update".parse().unwrap();
        assert!(some.includes("extract") && some.includes("update") && !some.includes("generate"));
        assert_eq!(
            "extract,nope".parse::<Experts>(),
            Err("'nope' is not on, off or an operation (extract, update, generate, vision)".to_owned())
        );
    }
}
