//! LoRA training on the CPU: a differentiable forward of the base model ([`model`]),
//! data rendered with the model's chat template ([`data`]), AdamW ([`optim`]), and a
//! training loop with gradient accumulation, validation with early stopping, and
//! checkpoints that let an interrupted run continue to the very adapter an
//! uninterrupted run would have produced.
//!
//! Everything random is derived from the seed and the position in the run (the
//! shuffle of epoch e, the dropout masks of micro-batch i), so a checkpoint needs no
//! generator state beyond the seed.

pub mod data;
pub mod model;
pub mod optim;
pub mod rng;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use data::{read_conversations, tokenize, Example};
pub use model::{to_adapter, Batch, Dropout, LoraParams, LoraTensors, TrainModel};
use optim::{AdamW, ParamsAdamW};
use rng::Rng;

use super::audit::Canaries;
use super::AdapterError;
use crate::engine::{EngineError, TargetModule};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{}: {}{message}", .path.display(), .line.map(|l| format!("line {l}: ")).unwrap_or_default())]
    Data { path: PathBuf, line: Option<usize>, message: String },
    #[error("{0}")]
    Settings(String),
    #[error("{}: {message}", .path.display())]
    Checkpoint { path: PathBuf, message: String },
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("training computation failed: {}", .0.to_string().lines().next().unwrap_or_default())]
    Compute(#[from] candle_core::Error),
}

/// Hyper-parameters of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    pub rank: usize,
    pub alpha: f64,
    /// Dropout on the input of each LoRA product.
    pub dropout: f64,
    /// PEFT names of the adapted projections.
    pub targets: Vec<String>,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// Examples per forward pass (padded to the longest).
    pub batch: usize,
    /// Forward passes per optimizer step.
    pub accumulate: usize,
    pub epochs: usize,
    pub seed: u64,
    /// Longest example in tokens; longer ones are left out.
    pub max_tokens: usize,
    /// Validation evaluations (one per epoch) without improvement before stopping.
    pub patience: usize,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.1,
            targets: vec!["q_proj".into(), "v_proj".into()],
            learning_rate: 2e-4,
            weight_decay: 0.01,
            batch: 4,
            accumulate: 1,
            epochs: 3,
            seed: 7,
            max_tokens: 512,
            patience: 2,
        }
    }
}

/// `all-linear` (every projection) or a comma-separated list of PEFT names.
pub fn parse_targets(spec: &str) -> Result<Vec<TargetModule>, TrainError> {
    if spec.trim() == "all-linear" {
        return Ok(TargetModule::ALL.to_vec());
    }
    let mut targets = Vec::new();
    for name in spec.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let module = TargetModule::from_hf_name(name).ok_or_else(|| {
            TrainError::Settings(format!(
                "unknown target module '{name}' (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj or all-linear)"
            ))
        })?;
        if !targets.contains(&module) {
            targets.push(module);
        }
    }
    if targets.is_empty() {
        return Err(TrainError::Settings("no target modules given".into()));
    }
    targets.sort();
    Ok(targets)
}

impl TrainSettings {
    /// Checks every value; returns the target modules.
    pub fn validate(&self) -> Result<Vec<TargetModule>, TrainError> {
        let bad = |m: String| Err(TrainError::Settings(m));
        if self.rank == 0 {
            return bad("--rank must be at least 1".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad(format!("--alpha {} must be a positive number", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("--dropout {} is outside [0, 1)", self.dropout));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(format!("--lr {} must be a positive number", self.learning_rate));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!("weight decay {} must be a non-negative number", self.weight_decay));
        }
        if self.batch == 0 || self.accumulate == 0 || self.epochs == 0 {
            return bad("--batch, --accumulate and --epochs must be at least 1".into());
        }
        if self.max_tokens < 2 {
            return bad("--max-tokens must be at least 2".into());
        }
        parse_targets(&self.targets.join(","))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    pub step: usize,
    pub epoch: usize,
    /// Mean loss per completion token of the step.
    pub loss: f64,
    /// Tokens processed (prompt and completion, no padding).
    pub tokens: usize,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    /// Mean loss per completion token over the epoch (with dropout, as trained).
    pub train_loss: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
}

/// Where a run is; everything a checkpoint needs besides tensors.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Epoch in progress, from 0.
    pub epoch: usize,
    /// Optimizer steps of that epoch already taken.
    pub step_in_epoch: usize,
    /// Optimizer steps taken in all.
    pub step: usize,
    pub steps: Vec<StepLog>,
    pub epochs: Vec<EpochLog>,
    pub best_epoch: Option<usize>,
    /// The best validation loss as f64 bits (exact through JSON).
    pub best_val_loss_bits: Option<u64>,
    pub evals_without_improvement: usize,
    pub stopped_early: bool,
    pub finished: bool,
    /// Tokens and seconds of the optimizer steps (throughput).
    pub tokens: u64,
    pub seconds: f64,
    /// Seconds of validation.
    pub eval_seconds: f64,
    /// The current epoch's summed loss and completion tokens.
    pub epoch_loss_sum: f64,
    pub epoch_targets: u64,
    /// How many times the run was resumed from a checkpoint.
    pub resumed: usize,
}

impl Progress {
    pub fn best_val_loss(&self) -> Option<f64> {
        self.best_val_loss_bits.map(f64::from_bits)
    }

    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
}

pub enum TrainEvent<'a> {
    Step { log: &'a StepLog, total_steps: usize, tokens_per_second: f64 },
    Epoch(&'a EpochLog),
}

/// How [`Trainer::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    Finished,
    /// `stop` asked to stop after a step; the state can be checkpointed.
    Stopped,
}

const STREAM_INIT: u64 = 1;
const STREAM_SHUFFLE: u64 = 2;
const STREAM_DROPOUT: u64 = 3;
const STATE_FILE: &str = "state.json";
const TENSORS_FILE: &str = "tensors.safetensors";

pub struct Trainer<'m> {
    model: &'m TrainModel,
    settings: TrainSettings,
    train: Vec<Example>,
    val: Vec<Example>,
    lora: LoraParams,
    optimizer: AdamW,
    best: Option<LoraTensors>,
    progress: Progress,
}

impl<'m> Trainer<'m> {
    pub fn new(model: &'m TrainModel, settings: TrainSettings, train: Vec<Example>, val: Vec<Example>) -> Result<Self, TrainError> {
        let targets = settings.validate()?;
        if train.is_empty() {
            return Err(TrainError::Settings("no training examples".into()));
        }
        if let Some(long) = train.iter().chain(&val).map(Example::len).max().filter(|&l| l > model.positions()) {
            return Err(TrainError::Settings(format!(
                "an example has {long} tokens, more than the model's {} positions",
                model.positions()
            )));
        }
        let mut rng = Rng::derive(settings.seed, STREAM_INIT, 0);
        let lora = LoraParams::init(model.config(), settings.rank, settings.alpha, &targets, &mut rng)?;
        let params = ParamsAdamW { lr: settings.learning_rate, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: settings.weight_decay };
        let optimizer = AdamW::new(lora.vars(), params)?;
        Ok(Self { model, settings, train, val, lora, optimizer, best: None, progress: Progress::default() })
    }

    pub fn settings(&self) -> &TrainSettings {
        &self.settings
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    fn micro_batches_per_epoch(&self) -> usize {
        self.train.len().div_ceil(self.settings.batch)
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.micro_batches_per_epoch().div_ceil(self.settings.accumulate)
    }

    pub fn total_steps(&self) -> usize {
        self.steps_per_epoch() * self.settings.epochs
    }

    /// Trains until the last epoch ends, validation stops it early, or `stop(steps
    /// taken)` returns true after a step.
    pub fn run(&mut self, on_event: &mut dyn FnMut(TrainEvent), stop: &mut dyn FnMut(usize) -> bool) -> Result<RunEnd, TrainError> {
        let total_steps = self.total_steps();
        while !self.progress.finished {
            let epoch = self.progress.epoch;
            let mut order: Vec<usize> = (0..self.train.len()).collect();
            Rng::derive(self.settings.seed, STREAM_SHUFFLE, epoch as u64).shuffle(&mut order);
            let micro: Vec<&[usize]> = order.chunks(self.settings.batch).collect();
            let steps: Vec<&[&[usize]]> = micro.chunks(self.settings.accumulate).collect();
            while self.progress.step_in_epoch < steps.len() {
                let index = self.progress.step_in_epoch;
                let first_micro = index * self.settings.accumulate;
                let log = self.step(epoch, first_micro, steps[index])?;
                self.progress.step_in_epoch += 1;
                self.progress.step += 1;
                self.progress.tokens += log.tokens as u64;
                self.progress.seconds += log.seconds;
                self.progress.steps.push(log);
                let log = self.progress.steps.last().expect("just pushed");
                on_event(TrainEvent::Step { log, total_steps, tokens_per_second: self.progress.tokens_per_second() });
                if stop(self.progress.step) {
                    return Ok(RunEnd::Stopped);
                }
            }
            self.end_epoch()?;
            on_event(TrainEvent::Epoch(self.progress.epochs.last().expect("just pushed")));
        }
        Ok(RunEnd::Finished)
    }

    /// One optimizer step over `micro_batches` (lists of example indices).
    fn step(&mut self, epoch: usize, first_micro: usize, micro_batches: &[&[usize]]) -> Result<StepLog, TrainError> {
        let started = Instant::now();
        let batches = micro_batches
            .iter()
            .map(|ids| {
                let examples: Vec<(&[u32], &[u32])> =
                    ids.iter().map(|&i| (self.train[i].prompt.as_slice(), self.train[i].completion.as_slice())).collect();
                Batch::new(&examples)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let targets: usize = batches.iter().map(|b| b.target_count).sum();
        let vars = self.lora.vars();
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let (mut loss_sum, mut tokens) = (0f64, 0usize);
        for (j, batch) in batches.iter().enumerate() {
            tokens += batch.real_tokens;
            if batch.target_count == 0 {
                continue;
            }
            let position = ((epoch as u64) << 32) | (first_micro + j) as u64;
            let mut dropout = Dropout { p: self.settings.dropout, rng: Rng::derive(self.settings.seed, STREAM_DROPOUT, position) };
            let lora = self.lora.tensors();
            let loss = self.model.loss(batch, Some(&lora), Some(&mut dropout))?;
            loss_sum += f64::from(loss.to_scalar::<f32>()?);
            // The mean over the step's completion tokens, however they fall into batches.
            let store = (loss / targets as f64)?.backward()?;
            for (slot, var) in grads.iter_mut().zip(&vars) {
                if let Some(g) = store.get(var.as_tensor()) {
                    *slot = Some(match slot.take() {
                        Some(sum) => (sum + g)?,
                        None => g.clone(),
                    });
                }
            }
        }
        self.optimizer.step(&grads)?;
        self.progress.epoch_loss_sum += loss_sum;
        self.progress.epoch_targets += targets as u64;
        let loss = loss_sum / targets.max(1) as f64;
        if !loss.is_finite() {
            return Err(TrainError::Settings(format!("the loss became {loss} at step {}; lower --lr", self.progress.step + 1)));
        }
        Ok(StepLog { step: self.progress.step + 1, epoch: epoch + 1, loss, tokens, seconds: started.elapsed().as_secs_f64() })
    }

    /// Validation, early stopping and the epoch's log.
    fn end_epoch(&mut self) -> Result<(), TrainError> {
        let p = &mut self.progress;
        let train_loss = p.epoch_loss_sum / p.epoch_targets.max(1) as f64;
        let epoch = p.epoch + 1;
        let mut val_loss = None;
        if !self.val.is_empty() {
            let started = Instant::now();
            let loss = self.validation_loss()?;
            let p = &mut self.progress;
            p.eval_seconds += started.elapsed().as_secs_f64();
            val_loss = Some(loss);
            if p.best_val_loss().is_none_or(|best| loss < best) {
                p.best_val_loss_bits = Some(loss.to_bits());
                p.best_epoch = Some(epoch);
                p.evals_without_improvement = 0;
                self.best = Some(self.lora.snapshot()?);
            } else {
                p.evals_without_improvement += 1;
                p.stopped_early = p.evals_without_improvement >= self.settings.patience.max(1);
            }
        }
        let p = &mut self.progress;
        p.epochs.push(EpochLog { epoch, train_loss, val_loss });
        p.epoch += 1;
        p.step_in_epoch = 0;
        p.epoch_loss_sum = 0.0;
        p.epoch_targets = 0;
        p.finished = p.stopped_early || p.epoch >= self.settings.epochs;
        Ok(())
    }

    /// Mean loss per completion token of the validation set (no dropout).
    pub fn validation_loss(&self) -> Result<f64, TrainError> {
        let lora = self.lora.snapshot()?;
        let (mut sum, mut count) = (0f64, 0usize);
        for chunk in self.val.chunks(self.settings.batch) {
            let examples: Vec<(&[u32], &[u32])> = chunk.iter().map(|e| (e.prompt.as_slice(), e.completion.as_slice())).collect();
            let batch = Batch::new(&examples)?;
            if batch.target_count > 0 {
                sum += f64::from(self.model.loss(&batch, Some(&lora), None)?.to_scalar::<f32>()?);
                count += batch.target_count;
            }
        }
        Ok(sum / count.max(1) as f64)
    }

    /// The adapter to keep: the best on validation when there is a validation set,
    /// else the last.
    pub fn result(&self) -> Result<LoraTensors, TrainError> {
        match &self.best {
            Some(best) => Ok(best.clone()),
            None => Ok(self.lora.snapshot()?),
        }
    }

    /// Identifies the run: settings, model shape and every example's tokens.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(&self.settings).unwrap_or_default());
        let c = self.model.config();
        h.update(format!("{} {} {} {} {}", c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size, c.num_heads));
        for (name, set) in [("train", &self.train), ("val", &self.val)] {
            h.update(name);
            for e in set.iter() {
                h.update((e.prompt.len() as u64).to_le_bytes());
                e.prompt.iter().chain(&e.completion).for_each(|t| h.update(t.to_le_bytes()));
                h.update(u64::MAX.to_le_bytes());
            }
        }
        format!("{:x}", h.finalize())
    }

    /// Writes the factors, the optimizer state and the progress to `dir` (replacing an
    /// older checkpoint only once the new one is complete).
    pub fn save_checkpoint(&self, dir: &Path) -> Result<(), TrainError> {
        let fail = |path: &Path, e: &dyn std::fmt::Display| TrainError::Checkpoint { path: path.to_owned(), message: e.to_string() };
        let parent = dir.parent().unwrap_or(Path::new("."));
        let staging = parent.join(format!("{}.tmp", dir.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(|e| fail(&staging, &e))?;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (key, (a, b)) in &self.lora.modules {
            tensors.insert(format!("lora.{}.a", key.peft_prefix()), a.as_tensor().copy()?);
            tensors.insert(format!("lora.{}.b", key.peft_prefix()), b.as_tensor().copy()?);
        }
        if let Some(best) = &self.best {
            for (key, (a, b)) in &best.modules {
                tensors.insert(format!("best.{}.a", key.peft_prefix()), a.clone());
                tensors.insert(format!("best.{}.b", key.peft_prefix()), b.clone());
            }
        }
        let (first, second) = self.optimizer.moments();
        for (i, (m, v)) in first.iter().zip(second).enumerate() {
            tensors.insert(format!("adam.m.{i}"), m.clone());
            tensors.insert(format!("adam.v.{i}"), v.clone());
        }
        candle_core::safetensors::save(&tensors, staging.join(TENSORS_FILE)).map_err(|e| fail(&staging, &e))?;
        let state = CheckpointState {
            fingerprint: self.fingerprint(),
            settings: self.settings.clone(),
            optimizer_steps: self.optimizer.step_count(),
            progress: self.progress.clone(),
        };
        let json = serde_json::to_string_pretty(&state).map_err(|e| fail(&staging, &e))?;
        std::fs::write(staging.join(STATE_FILE), json).map_err(|e| fail(&staging, &e))?;
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| fail(dir, &e))?;
        }
        std::fs::rename(&staging, dir).map_err(|e| fail(dir, &e))?;
        Ok(())
    }

    /// Continues from the checkpoint in `dir`, which must come from the same run (same
    /// settings, model and examples).
    pub fn restore(&mut self, dir: &Path) -> Result<(), TrainError> {
        let fail = |path: &Path, message: String| TrainError::Checkpoint { path: path.to_owned(), message };
        let state_path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&state_path).map_err(|e| fail(&state_path, e.to_string()))?;
        let state: CheckpointState =
            serde_json::from_str(&text).map_err(|e| fail(&state_path, format!("invalid checkpoint state: {e}")))?;
        if state.fingerprint != self.fingerprint() {
            return Err(fail(
                dir,
                "the checkpoint comes from a different run (other data, settings or model); remove it to start over".into(),
            ));
        }
        let tensors_path = dir.join(TENSORS_FILE);
        let mut tensors = candle_core::safetensors::load(&tensors_path, &Device::Cpu)
            .map_err(|e| fail(&tensors_path, format!("invalid checkpoint: {e}")))?;
        let mut take = |name: String| tensors.remove(&name).ok_or_else(|| fail(&tensors_path, format!("missing tensor {name}")));
        let mut current = LoraTensors { modules: Default::default(), scale: self.lora.scale() };
        let mut best = LoraTensors { modules: Default::default(), scale: self.lora.scale() };
        for key in self.lora.modules.keys() {
            let p = key.peft_prefix();
            current.modules.insert(*key, (take(format!("lora.{p}.a"))?, take(format!("lora.{p}.b"))?));
            if state.progress.best_epoch.is_some() {
                best.modules.insert(*key, (take(format!("best.{p}.a"))?, take(format!("best.{p}.b"))?));
            }
        }
        let count = self.lora.vars().len();
        let first = (0..count).map(|i| take(format!("adam.m.{i}"))).collect::<Result<Vec<_>, _>>()?;
        let second = (0..count).map(|i| take(format!("adam.v.{i}"))).collect::<Result<Vec<_>, _>>()?;
        self.lora.set(&current)?;
        self.optimizer.restore(state.optimizer_steps, first, second)?;
        self.best = state.progress.best_epoch.map(|_| best);
        self.progress = state.progress;
        self.progress.resumed += 1;
        Ok(())
    }
}

#[derive(Serialize, Deserialize)]
struct CheckpointState {
    fingerprint: String,
    settings: TrainSettings,
    optimizer_steps: usize,
    progress: Progress,
}

/// `training.json`, written beside a trained adapter: what it was trained on, how,
/// the loss curve, and the canaries planted in its data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingLog {
    /// The model argument it was trained with (catalog name or path).
    pub model: String,
    pub base_model: Option<String>,
    pub data: PathBuf,
    pub val: Option<PathBuf>,
    pub examples: usize,
    pub val_examples: usize,
    pub skipped_too_long: usize,
    pub settings: TrainSettings,
    pub steps: Vec<StepLog>,
    pub epochs: Vec<EpochLog>,
    pub best_epoch: Option<usize>,
    pub stopped_early: bool,
    pub resumed: usize,
    /// Tokens and seconds of the optimizer steps.
    pub tokens: u64,
    pub seconds: f64,
    pub tokens_per_second: f64,
    /// Seconds spent on the validation loss.
    #[serde(default)]
    pub validation_seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canaries: Option<Canaries>,
}

impl TrainingLog {
    pub fn read(path: &Path) -> Result<Self, TrainError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| TrainError::Data { path: path.to_owned(), line: None, message: e.to_string() })?;
        serde_json::from_str(&text).map_err(|e| TrainError::Data {
            path: path.to_owned(),
            line: None,
            message: format!("not a training log: {e}"),
        })
    }
}
