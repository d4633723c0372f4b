//! Data-free merging of LoRA adapters.
//!
//! Every operator works on the weight update of each module,
//! ΔW = scale · B · A (out × in, `scale` = [`LoraAdapter::scale`]), and
//! returns a valid PEFT adapter of a chosen rank `r`:
//!
//! * the merged ΔW is re-factorised by a truncated SVD, ΔW ≈ U_r Σ_r V_rᵀ,
//!   split evenly into **B = U_r √Σ_r** and **A = √Σ_r V_rᵀ**;
//! * the output config has `r = lora_alpha = rank` and `use_rslora = false`,
//!   so its scale is exactly 1 (the caller's alphas are folded into the
//!   factors). Other config fields are copied from the first input adapter;
//!   `target_modules` lists the modules present and `base_model_name_or_path`
//!   is the inputs' common base model;
//! * every module of the union of the inputs' modules is written with rank
//!   `r` (zero-padded when the merged ΔW has lower rank), since PEFT needs one
//!   `r` for the whole file. An adapter without a module contributes ΔW = 0.
//!
//! Each merge reports the relative Frobenius reconstruction error
//! ‖ΔW − B·A·scale‖ / ‖ΔW‖ per module and overall (√Σ‖err‖² / √Σ‖ΔW‖²).
//! The errors are those of the f64 fit; storing the factors in f32 adds about
//! 1e-7 relative on top.
//!
//! Numerics (all dense, f64 internally): Householder thin QR; one-sided
//! (Hestenes) Jacobi SVD for small matrices; truncated SVD of an m × n
//! matrix either exactly (thin QR of the tall orientation, then Jacobi on the
//! min(m, n)² triangle) when min(m, n) ≤ 128 or r + 8 ≥ min(m, n), otherwise
//! by seeded randomized range finding (oversampling 8, 2 power iterations,
//! re-orthonormalised by QR). Sums of low-rank terms (linear, K-Merge) never
//! form ΔW: they are factored exactly through QR of the stacked factors and
//! an SVD of the small core.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

// In memlora: `use super::peft::{...}` and `use crate::engine::TargetModule;`.
use super::peft::{LoraAdapter, LoraPair, ModuleKey, PeftConfig, TargetModules};
use crate::engine::TargetModule;

/// Extra random directions in the randomized range finder.
const OVERSAMPLE: usize = 8;
/// Power (subspace) iterations of the randomized range finder.
const POWER_ITERATIONS: usize = 2;
/// At or below this min(m, n), dense truncated SVDs are exact.
const EXACT_LIMIT: usize = 128;
/// Above this total rank, a sum of low-rank terms is formed densely instead
/// of being factored through its stacked factors (the Jacobi core is R × R).
const FACTORED_LIMIT: usize = 256;
/// Seed of the randomized SVD's test matrices (mixed with the module).
const SVD_SEED: u64 = 0x6d65_6d6c_6f72_6121;
const JACOBI_TOL: f64 = 1e-15;
const JACOBI_MAX_SWEEPS: usize = 60;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MergeError {
    #[error("no adapters to merge")]
    Empty,
    #[error("the merged rank must be at least 1")]
    ZeroRank,
    #[error("a budget of 0 slots cannot hold any adapter")]
    ZeroSlots,
    #[error("the number of clusters must be at least 1")]
    ZeroClusters,
    #[error("density {0} is outside (0, 1]")]
    Density(f32),
    #[error("drop rate {0} is outside [0, 1)")]
    DropRate(f32),
    #[error("similarity threshold {0} is not a finite number")]
    Threshold(f32),
    #[error("{adapter} is for base model '{other}' but {first_adapter} is for '{first}'")]
    BaseModel { first: String, first_adapter: String, other: String, adapter: String },
    #[error("{module}: ΔW is {}x{} in {first_adapter} but {}x{} in {adapter}", .first.0, .first.1, .other.0, .other.1)]
    Shape { module: String, first: (usize, usize), first_adapter: String, other: (usize, usize), adapter: String },
    #[error("{adapter}, {module}: lora_A is {}x{} but lora_B is {}x{}; their ranks must agree", .a.0, .a.1, .b.0, .b.1)]
    Factors { adapter: String, module: String, a: (usize, usize), b: (usize, usize) },
    #[error("{adapter}, {module}: the LoRA factors hold NaN or infinite values")]
    NonFinite { adapter: String, module: String },
    #[error("{adapter}: its scale lora_alpha / r = {scale} is not finite")]
    Scale { adapter: String, scale: f64 },
    #[error("{adapter}: merge weight {weight} is not finite")]
    Weight { adapter: String, weight: f32 },
    #[error("adapter name '{0}' appears more than once")]
    DuplicateName(String),
    #[error("no adapter named '{0}' in this merge")]
    UnknownAdapter(String),
    #[error("tensor error: {0}")]
    Tensor(String),
    #[error("the merge was cancelled")]
    Cancelled,
}

impl From<candle_core::Error> for MergeError {
    fn from(e: candle_core::Error) -> Self {
        MergeError::Tensor(e.to_string().lines().next().unwrap_or_default().to_string())
    }
}

type Result<T> = std::result::Result<T, MergeError>;

/// How well one module's merged ΔW is represented by the rank-r factors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModuleFit {
    /// ‖ΔW − scale·B·A‖_F / ‖ΔW‖_F (0 when ΔW = 0).
    pub relative_error: f64,
    /// ‖ΔW‖_F of the merged target.
    pub norm: f64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct MergeReport {
    pub modules: BTreeMap<ModuleKey, ModuleFit>,
    /// √(Σ‖err‖²) / √(Σ‖ΔW‖²) over all modules.
    pub overall: f64,
}

impl MergeReport {
    pub fn max_module_error(&self) -> f64 {
        self.modules.values().map(|f| f.relative_error).fold(0.0, f64::max)
    }
}

/// A merged adapter (scale 1, rank `r`) and how faithful it is.
#[derive(Debug, Clone)]
pub struct Merged {
    pub adapter: LoraAdapter,
    pub report: MergeReport,
}

// ---------------------------------------------------------------------------
// Offline merges
// ---------------------------------------------------------------------------

/// An offline merge operator and its settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
pub enum MergeMethod {
    /// [`linear`]
    #[default]
    Linear,
    /// [`ties`]; `density` is the fraction of each adapter's largest entries kept.
    Ties { density: f32 },
    /// [`dare`]; `drop_rate` is the probability of dropping each entry.
    Dare { drop_rate: f32, seed: u64 },
}

impl MergeMethod {
    /// How the result was made, for its record and for people.
    pub fn recipe(&self, rank: usize) -> String {
        match self {
            MergeMethod::Linear => format!("linear r={rank}"),
            MergeMethod::Ties { density } => format!("ties density={density} r={rank}"),
            MergeMethod::Dare { drop_rate, seed } => format!("dare drop={drop_rate} seed={seed} r={rank}"),
        }
    }
}

/// Called after each module is fitted with (modules done, modules in all); `Break` stops
/// the merge with [`MergeError::Cancelled`].
pub type OnModule<'a> = &'a mut dyn FnMut(usize, usize) -> ControlFlow<()>;

/// Merges with `method`, reporting each fitted module to `on_module`.
pub fn merge(adapters: &[(&LoraAdapter, f32)], method: MergeMethod, rank: usize, on_module: OnModule) -> Result<Merged> {
    match method {
        MergeMethod::Linear => {
            let (prepared, weights, compat) = prepare_weighted(adapters, rank)?;
            let members: Vec<(f64, &Prepared)> = weights.iter().copied().zip(&prepared).collect();
            combine(&members, rank, &compat, &prepared[0].config, on_module)
        }
        MergeMethod::Ties { density } => ties_merge(adapters, density, rank, on_module),
        MergeMethod::Dare { drop_rate, seed } => dare_merge(adapters, drop_rate, seed, rank, on_module),
    }
}

fn no_progress(_: usize, _: usize) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

/// Task arithmetic: Σ wᵢ ΔWᵢ, re-factorised to `rank`. Exact (up to
/// rounding) whenever `rank` ≥ Σ rᵢ, because the sum is factored from the
/// stacked factors [w₁s₁B₁ | w₂s₂B₂ | …]·[A₁; A₂; …] without forming ΔW.
pub fn linear(adapters: &[(&LoraAdapter, f32)], rank: usize) -> Result<Merged> {
    merge(adapters, MergeMethod::Linear, rank, &mut no_progress)
}

/// TIES-merging (Yadav et al., 2023), per module:
///
/// 1. trim: each adapter's ΔWᵢ keeps its round(density · out · in) (at least
///    one) largest-magnitude entries, the rest become 0 (per module, as PEFT
///    does, rather than over the whole task vector);
/// 2. elect: the sign of each entry is the sign of the sum of the trimmed,
///    unweighted values;
/// 3. disjoint mean: each entry is the mean of wᵢ · trimmedᵢ over the
///    adapters whose trimmed value is non-zero with the elected sign.
///
/// The paper's single scaling λ (θ = θ₀ + λ·τ_m) is the case of all weights
/// equal to λ; weights of 1 give the plain TIES mean, so merging an adapter
/// with itself at weights 1 and density 1 returns it.
pub fn ties(adapters: &[(&LoraAdapter, f32)], density: f32, rank: usize) -> Result<Merged> {
    merge(adapters, MergeMethod::Ties { density }, rank, &mut no_progress)
}

fn ties_merge(adapters: &[(&LoraAdapter, f32)], density: f32, rank: usize, on_module: OnModule) -> Result<Merged> {
    if !(density > 0.0 && density <= 1.0) {
        return Err(MergeError::Density(density));
    }
    let (prepared, weights, compat) = prepare_weighted(adapters, rank)?;
    let keys = union_keys(&prepared);
    let mut out = Builder::new(rank, keys.len(), on_module);
    for key in keys {
        let (m, n) = compat.shape(&key);
        let members: Vec<(f64, &Fac)> = weights.iter().zip(&prepared).filter_map(|(&w, p)| p.modules.get(&key).map(|f| (w, f))).collect();
        // Two passes recompute the trimmed ΔWs rather than hold all of them.
        let mut elected = vec![0.0; m * n];
        for (_, fac) in &members {
            for (s, t) in elected.iter_mut().zip(trim(fac.dense().data, density)) {
                *s += t;
            }
        }
        let mut sum = vec![0.0; m * n];
        let mut count = vec![0u32; m * n];
        for (w, fac) in &members {
            for (e, t) in trim(fac.dense().data, density).into_iter().enumerate() {
                if t * elected[e] > 0.0 {
                    sum[e] += w * t;
                    count[e] += 1;
                }
            }
        }
        for (s, &c) in sum.iter_mut().zip(&count) {
            if c > 0 {
                *s /= c as f64;
            }
        }
        out.push(key, fit_dense(&Mat { rows: m, cols: n, data: sum }, rank, module_seed(SVD_SEED, &key, 0), EXACT_LIMIT))?;
    }
    out.finish(&prepared[0].config, compat.base_model())
}

/// DARE (Yu et al., 2024): every entry of every adapter's ΔWᵢ is dropped with
/// probability `drop_rate` and kept ones are rescaled by 1 / (1 − drop_rate);
/// the results are summed with the weights. Masks are drawn independently per
/// adapter and module from a stream seeded by (`seed`, adapter index, layer,
/// module), so the result is deterministic and independent of module order.
pub fn dare(adapters: &[(&LoraAdapter, f32)], drop_rate: f32, seed: u64, rank: usize) -> Result<Merged> {
    merge(adapters, MergeMethod::Dare { drop_rate, seed }, rank, &mut no_progress)
}

fn dare_merge(adapters: &[(&LoraAdapter, f32)], drop_rate: f32, seed: u64, rank: usize, on_module: OnModule) -> Result<Merged> {
    if !(0.0..1.0).contains(&drop_rate) {
        return Err(MergeError::DropRate(drop_rate));
    }
    let (prepared, weights, compat) = prepare_weighted(adapters, rank)?;
    let p = drop_rate as f64;
    let keep_scale = 1.0 / (1.0 - p);
    let keys = union_keys(&prepared);
    let mut out = Builder::new(rank, keys.len(), on_module);
    for key in keys {
        let (m, n) = compat.shape(&key);
        let mut sum = vec![0.0; m * n];
        for (index, (&w, prep)) in weights.iter().zip(&prepared).enumerate() {
            let Some(fac) = prep.modules.get(&key) else { continue };
            let mut rng = SplitMix::new(module_seed(seed, &key, index as u64));
            for (s, d) in sum.iter_mut().zip(fac.dense().data) {
                if rng.uniform() >= p {
                    *s += w * keep_scale * d;
                }
            }
        }
        out.push(key, fit_dense(&Mat { rows: m, cols: n, data: sum }, rank, module_seed(SVD_SEED, &key, 0), EXACT_LIMIT))?;
    }
    out.finish(&prepared[0].config, compat.base_model())
}

// ---------------------------------------------------------------------------
// K-Merge / K-Merge++: online merging into at most k slots
// ---------------------------------------------------------------------------

/// One slot of a [`SlotBank`]: the running average of its members' ΔW.
#[derive(Debug, Clone)]
pub struct Slot {
    /// The merged adapter (scale 1, rank as of the last `add` to this slot).
    pub adapter: LoraAdapter,
    pub members: Vec<String>,
    pub count: usize,
}

/// Where [`SlotBank::add`] put an adapter. `error` is the overall relative
/// error of re-factorising the slot's new ΔW to the requested rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Placement {
    Opened { slot: usize, error: f64 },
    Merged { slot: usize, similarity: f32, error: f64 },
}

impl Placement {
    pub fn slot(&self) -> usize {
        match *self {
            Placement::Opened { slot, .. } | Placement::Merged { slot, .. } => slot,
        }
    }
}

/// A budget of at most `k` adapters that new adapters are merged into
/// online. `threshold: None` is K-Merge (fill free slots first), `Some(t)` is
/// K-Merge++ (open a slot only for an adapter whose similarity to every slot
/// is below `t`).
#[derive(Debug, Clone)]
pub struct SlotBank {
    k: usize,
    threshold: Option<f32>,
    slots: Vec<Slot>,
    compat: Compat,
}

impl SlotBank {
    pub fn new(k: usize, threshold: Option<f32>) -> Result<Self> {
        if k == 0 {
            return Err(MergeError::ZeroSlots);
        }
        if let Some(t) = threshold.filter(|t| !t.is_finite()) {
            return Err(MergeError::Threshold(t));
        }
        Ok(Self { k, threshold, slots: Vec::new(), compat: Compat::default() })
    }

    /// A bank holding `slots` already (reloaded from the adapters installed on disk). More
    /// slots than `k` are kept: a lowered budget merges new adapters, it does not undo
    /// what exists.
    pub fn with_slots(k: usize, threshold: Option<f32>, slots: Vec<Slot>) -> Result<Self> {
        let mut bank = Self::new(k, threshold)?;
        for (i, slot) in slots.iter().enumerate() {
            let prepared = prepare_one(format!("slot {i}"), &slot.adapter)?;
            bank.compat.check(&prepared)?;
            bank.compat.insert(&prepared);
        }
        bank.slots = slots;
        Ok(bank)
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn threshold(&self) -> Option<f32> {
        self.threshold
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    pub fn slot_of(&self, name: &str) -> Option<usize> {
        self.slots.iter().position(|s| s.members.iter().any(|m| m == name))
    }

    /// Cosine similarity (of flattened ΔW, averaged over the modules both
    /// have; 0 when they share none) between `adapter` and each slot.
    pub fn similarities(&self, adapter: &LoraAdapter) -> Result<Vec<f32>> {
        let incoming = prepare_one("the adapter".into(), adapter)?;
        self.slots
            .iter()
            .enumerate()
            .map(|(i, slot)| Ok(similarity(&incoming, &prepare_one(format!("slot {i}"), &slot.adapter)?) as f32))
            .collect()
    }

    /// Places `adapter` in the bank. While fewer than k slots exist, K-Merge
    /// opens a new slot for every adapter and K-Merge++ opens one only when
    /// the similarity to every slot is below the threshold; otherwise the
    /// adapter is merged into the most similar slot (the lowest index on
    /// ties) as a running average in ΔW space over the n adapters then in
    /// it, ΔW ← (1 − 1/n)·ΔW_slot + (1/n)·ΔW_adapter, re-factorised to
    /// `rank`. A new slot holds the adapter re-factorised to `rank` (scale 1).
    pub fn add(&mut self, name: &str, adapter: &LoraAdapter, rank: usize) -> Result<Placement> {
        if self.k == 0 {
            return Err(MergeError::ZeroSlots);
        }
        if rank == 0 {
            return Err(MergeError::ZeroRank);
        }
        if self.slot_of(name).is_some() {
            return Err(MergeError::DuplicateName(name.to_string()));
        }
        let incoming = prepare_one(format!("adapter '{name}'"), adapter)?;
        self.compat.check(&incoming)?;
        let slot_facs: Vec<Prepared> =
            self.slots.iter().enumerate().map(|(i, s)| prepare_one(format!("slot {i}"), &s.adapter)).collect::<Result<_>>()?;
        let mut best: Option<(usize, f64)> = None;
        for (i, slot) in slot_facs.iter().enumerate() {
            let s = similarity(&incoming, slot);
            if best.is_none_or(|(_, b)| s > b) {
                best = Some((i, s));
            }
        }
        let open = match (self.slots.len() < self.k, self.threshold, best) {
            (false, _, _) => false,
            (true, None, _) | (true, _, None) => true,
            (true, Some(t), Some((_, s))) => s < t as f64,
        };
        let mut compat = self.compat.clone();
        compat.insert(&incoming);
        let placement = if open {
            let merged = combine(&[(1.0, &incoming)], rank, &compat, &incoming.config, &mut no_progress)?;
            self.slots.push(Slot { adapter: merged.adapter, members: vec![name.to_string()], count: 1 });
            Placement::Opened { slot: self.slots.len() - 1, error: merged.report.overall }
        } else {
            let (i, similarity) = best.expect("a full bank has slots");
            let n = (self.slots[i].count + 1) as f64;
            let members = [(1.0 - 1.0 / n, &slot_facs[i]), (1.0 / n, &incoming)];
            let merged = combine(&members, rank, &compat, &self.slots[i].adapter.config, &mut no_progress)?;
            let slot = &mut self.slots[i];
            slot.adapter = merged.adapter;
            slot.members.push(name.to_string());
            slot.count += 1;
            Placement::Merged { slot: i, similarity: similarity as f32, error: merged.report.overall }
        };
        self.compat = compat;
        Ok(placement)
    }
}

// ---------------------------------------------------------------------------
// HydraOpt-style shared-matrix merge
// ---------------------------------------------------------------------------

/// Adapters grouped into clusters; per cluster and module one shared A
/// (rank × in, orthonormal rows) and per adapter its own B (out × rank).
#[derive(Debug, Clone)]
pub struct SharedMerge {
    rank: usize,
    clusters: Vec<Vec<String>>,
    shared: Vec<BTreeMap<ModuleKey, Tensor>>,
    members: BTreeMap<String, SharedMember>,
}

#[derive(Debug, Clone)]
struct SharedMember {
    cluster: usize,
    config: PeftConfig,
    b: BTreeMap<ModuleKey, Tensor>,
    report: MergeReport,
}

/// One row of the storage / fidelity trade-off of [`report`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TradeoffRow {
    /// Clusters actually used (the request, capped at the number of adapters).
    pub clusters: usize,
    /// f32 bytes of all shared A's and per-adapter B's.
    pub storage_bytes: usize,
    /// f32 bytes of the original adapters' factors, for comparison.
    pub original_bytes: usize,
    pub mean_error: f64,
    pub max_error: f64,
}

impl SharedMerge {
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Adapter names per cluster, in input order within a cluster.
    pub fn clusters(&self) -> &[Vec<String>] {
        &self.clusters
    }

    pub fn cluster_of(&self, name: &str) -> Option<usize> {
        self.members.get(name).map(|m| m.cluster)
    }

    /// The reconstructed PEFT adapter (scale 1, rank `rank`, the modules the
    /// original had). Its A tensors share storage with the cluster's.
    pub fn adapter(&self, name: &str) -> Result<LoraAdapter> {
        let member = self.members.get(name).ok_or_else(|| MergeError::UnknownAdapter(name.to_string()))?;
        let shared = &self.shared[member.cluster];
        let modules = member.b.iter().map(|(key, b)| (*key, LoraPair { a: shared[key].clone(), b: b.clone() })).collect();
        Ok(LoraAdapter { config: member.config.clone(), modules })
    }

    /// f32 bytes of all shared A's plus all per-adapter B's.
    pub fn storage_bytes(&self) -> usize {
        let a: usize = self.shared.iter().flat_map(|c| c.values()).map(|t| t.elem_count()).sum();
        let b: usize = self.members.values().flat_map(|m| m.b.values()).map(|t| t.elem_count()).sum();
        4 * (a + b)
    }

    /// Overall relative ΔW error per adapter.
    pub fn errors(&self) -> BTreeMap<String, f64> {
        self.members.iter().map(|(name, m)| (name.clone(), m.report.overall)).collect()
    }

    /// Per-module errors of one adapter.
    pub fn report_of(&self, name: &str) -> Option<&MergeReport> {
        self.members.get(name).map(|m| &m.report)
    }
}

/// Clusters the adapters by ΔW similarity (deterministic average-linkage
/// agglomeration on the cosine matrix, down to `clusters` groups, capped at
/// the number of adapters) and, per cluster and module, shares one A: the
/// top-`rank` right singular vectors of the stacked [ΔW₁; ΔW₂; …] (computed
/// from the factors: QR of the stacked Aᵢᵀ, QR of the small stacked core,
/// Jacobi SVD). Each adapter keeps B = ΔWᵢ Aᵀ, the least-squares fit since
/// A's rows are orthonormal. One cluster per adapter with `rank` ≥ every
/// adapter's rank reconstructs them exactly.
pub fn shared_factor_merge(adapters: &[(&str, &LoraAdapter)], clusters: usize, rank: usize) -> Result<SharedMerge> {
    let (prepared, compat) = prepare_named(adapters, rank)?;
    if clusters == 0 {
        return Err(MergeError::ZeroClusters);
    }
    let sims = similarity_matrix(&prepared);
    build_shared(adapters, &prepared, &compat, agglomerate(&sims, clusters), rank)
}

/// The storage / fidelity trade-off of [`shared_factor_merge`] for each
/// cluster count, for a CLI to print.
pub fn report(adapters: &[(&str, &LoraAdapter)], cluster_counts: &[usize], rank: usize) -> Result<Vec<TradeoffRow>> {
    let (prepared, compat) = prepare_named(adapters, rank)?;
    if cluster_counts.contains(&0) {
        return Err(MergeError::ZeroClusters);
    }
    let sims = similarity_matrix(&prepared);
    let original_bytes: usize = prepared.iter().flat_map(|p| p.modules.values()).map(|f| 4 * f.rank() * (f.b.rows + f.a.cols)).sum();
    cluster_counts
        .iter()
        .map(|&count| {
            let merge = build_shared(adapters, &prepared, &compat, agglomerate(&sims, count), rank)?;
            let errors: Vec<f64> = merge.errors().into_values().collect();
            Ok(TradeoffRow {
                clusters: merge.clusters.len(),
                storage_bytes: merge.storage_bytes(),
                original_bytes,
                mean_error: errors.iter().sum::<f64>() / errors.len() as f64,
                max_error: errors.iter().copied().fold(0.0, f64::max),
            })
        })
        .collect()
}

fn prepare_named(adapters: &[(&str, &LoraAdapter)], rank: usize) -> Result<(Vec<Prepared>, Compat)> {
    if adapters.is_empty() {
        return Err(MergeError::Empty);
    }
    if rank == 0 {
        return Err(MergeError::ZeroRank);
    }
    let mut seen = BTreeSet::new();
    let mut prepared = Vec::with_capacity(adapters.len());
    for (name, adapter) in adapters {
        if !seen.insert(*name) {
            return Err(MergeError::DuplicateName(name.to_string()));
        }
        prepared.push(prepare_one(format!("adapter '{name}'"), adapter)?);
    }
    let compat = Compat::admit_all(&prepared)?;
    Ok((prepared, compat))
}

fn similarity_matrix(prepared: &[Prepared]) -> Vec<Vec<f64>> {
    let n = prepared.len();
    let mut sims = vec![vec![1.0; n]; n];
    for i in 0..n {
        for j in i + 1..n {
            let s = similarity(&prepared[i], &prepared[j]);
            sims[i][j] = s;
            sims[j][i] = s;
        }
    }
    sims
}

/// Average-linkage agglomeration: repeatedly joins the two groups with the
/// highest mean pairwise similarity (the first pair in index order on ties).
fn agglomerate(sims: &[Vec<f64>], target: usize) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = (0..sims.len()).map(|i| vec![i]).collect();
    while groups.len() > target.max(1) {
        let mut best = (0, 1, f64::NEG_INFINITY);
        for i in 0..groups.len() {
            for j in i + 1..groups.len() {
                let total: f64 = groups[i].iter().flat_map(|&a| groups[j].iter().map(move |&b| sims[a][b])).sum();
                let mean = total / (groups[i].len() * groups[j].len()) as f64;
                if mean > best.2 {
                    best = (i, j, mean);
                }
            }
        }
        let joined = groups.remove(best.1);
        groups[best.0].extend(joined);
        groups[best.0].sort_unstable();
    }
    groups
}

fn build_shared(
    adapters: &[(&str, &LoraAdapter)],
    prepared: &[Prepared],
    compat: &Compat,
    groups: Vec<Vec<usize>>,
    rank: usize,
) -> Result<SharedMerge> {
    let mut shared = Vec::with_capacity(groups.len());
    let mut members = BTreeMap::new();
    for (cluster, group) in groups.iter().enumerate() {
        let keys: BTreeSet<ModuleKey> = group.iter().flat_map(|&i| prepared[i].modules.keys().copied()).collect();
        let mut a_of = BTreeMap::new();
        let mut fits: Vec<BTreeMap<ModuleKey, (Mat, f64, f64)>> = vec![BTreeMap::new(); group.len()];
        for key in keys {
            let facs: Vec<(usize, &Fac)> =
                group.iter().enumerate().filter_map(|(g, &i)| prepared[i].modules.get(&key).map(|f| (g, f))).collect();
            let a = shared_rows(&facs.iter().map(|(_, f)| *f).collect::<Vec<_>>(), compat.shape(&key).1, rank);
            for (g, fac) in facs {
                // B = ΔW Aᵀ = s · B₀ (A₀ Aᵀ); with orthonormal rows of A the
                // residual is ‖ΔW‖² − ‖B‖².
                let mut b = fac.b.matmul(&fac.a.matmul_t(&a));
                b.scale(fac.scale);
                let total = fac.inner(fac);
                let err = (total - b.frob_sq()).max(0.0);
                fits[g].insert(key, (b, err, total));
            }
            a_of.insert(key, a.to_tensor()?);
        }
        for (g, &i) in group.iter().enumerate() {
            let mut quiet = no_progress;
            let mut builder = Builder::new(rank, 0, &mut quiet);
            let mut b_of = BTreeMap::new();
            for (key, (b, err, total)) in std::mem::take(&mut fits[g]) {
                b_of.insert(key, b.to_tensor()?);
                builder.record(key, err, total);
            }
            let config = output_config(&prepared[i].config, compat.base_model(), rank, b_of.keys().copied());
            let report = builder.report();
            members.insert(adapters[i].0.to_string(), SharedMember { cluster, config, b: b_of, report });
        }
        shared.push(a_of);
    }
    let clusters = groups.iter().map(|g| g.iter().map(|&i| adapters[i].0.to_string()).collect()).collect();
    Ok(SharedMerge { rank, clusters, shared, members })
}

/// The top-`rank` right singular vectors of [s₁B₁A₁; s₂B₂A₂; …] as the
/// rows of a rank × n matrix (zero rows past the stack's rank).
fn shared_rows(facs: &[&Fac], n: usize, rank: usize) -> Mat {
    let total_rank: usize = facs.iter().map(|f| f.rank()).sum();
    let mut a = Mat::zeros(rank, n);
    if total_rank == 0 {
        return a;
    }
    let mut stacked_a = Mat::zeros(total_rank, n);
    let mut offset = 0;
    for f in facs {
        stacked_a.data[offset * n..(offset + f.rank()) * n].copy_from_slice(&f.a.data);
        offset += f.rank();
    }
    // [A₁; A₂; …]ᵀ = Q R, so the stack is blockdiag(sᵢBᵢ) Rᵀ Qᵀ.
    let (q, r) = qr(&stacked_a.transpose());
    let kr = q.cols;
    let total_rows: usize = facs.iter().map(|f| f.b.rows).sum();
    let mut core = Mat::zeros(total_rows, kr);
    let (mut row, mut offset) = (0, 0);
    for f in facs {
        let mut r_block = Mat::zeros(kr, f.rank());
        for i in 0..kr {
            r_block.row_mut(i).copy_from_slice(&r.row(i)[offset..offset + f.rank()]);
        }
        let mut block = f.b.matmul_t(&r_block);
        block.scale(f.scale);
        core.data[row * kr..(row + f.b.rows) * kr].copy_from_slice(&block.data);
        row += f.b.rows;
        offset += f.rank();
    }
    let (_, core_r) = qr(&core);
    let svd = jacobi_svd(&core_r);
    let v = q.matmul(&svd.v);
    for j in 0..rank.min(v.cols) {
        for i in 0..n {
            a.data[j * n + i] = v.at(i, j);
        }
    }
    a
}

// ---------------------------------------------------------------------------
// Validation and shared plumbing
// ---------------------------------------------------------------------------

/// One module's factors: ΔW = scale · b · a.
#[derive(Debug, Clone)]
struct Fac {
    b: Mat,
    a: Mat,
    scale: f64,
}

impl Fac {
    fn rank(&self) -> usize {
        self.a.rows
    }

    fn dense(&self) -> Mat {
        let mut d = self.b.matmul(&self.a);
        d.scale(self.scale);
        d
    }

    /// ⟨ΔW_self, ΔW_other⟩_F = s₁s₂ Σᵢⱼ (B₁ᵀB₂)ᵢⱼ (A₁A₂ᵀ)ᵢⱼ, without forming ΔW.
    fn inner(&self, other: &Fac) -> f64 {
        let bb = self.b.t_matmul(&other.b);
        let aa = self.a.matmul_t(&other.a);
        self.scale * other.scale * bb.data.iter().zip(&aa.data).map(|(x, y)| x * y).sum::<f64>()
    }
}

#[derive(Debug, Clone)]
struct Prepared {
    /// How errors name it: `adapter #2`, `adapter 'name'`, `slot 1`.
    label: String,
    config: PeftConfig,
    modules: BTreeMap<ModuleKey, Fac>,
}

fn module_name(key: &ModuleKey) -> String {
    format!("layer {} {}", key.layer, key.module.hf_name())
}

/// Reads an adapter's factors, checking each module on its own.
fn prepare_one(label: String, adapter: &LoraAdapter) -> Result<Prepared> {
    let scale = adapter.scale();
    if !scale.is_finite() {
        return Err(MergeError::Scale { adapter: label, scale });
    }
    let mut modules = BTreeMap::new();
    for (key, pair) in &adapter.modules {
        let (a_shape, b_shape) = (pair.a.dims2()?, pair.b.dims2()?);
        if a_shape.0 != b_shape.1 {
            return Err(MergeError::Factors { adapter: label, module: module_name(key), a: a_shape, b: b_shape });
        }
        let fac = Fac { a: Mat::from_tensor(&pair.a)?, b: Mat::from_tensor(&pair.b)?, scale };
        if !fac.a.is_finite() || !fac.b.is_finite() {
            return Err(MergeError::NonFinite { adapter: label, module: module_name(key) });
        }
        modules.insert(*key, fac);
    }
    Ok(Prepared { label, config: adapter.config.clone(), modules })
}

fn prepare_weighted(adapters: &[(&LoraAdapter, f32)], rank: usize) -> Result<(Vec<Prepared>, Vec<f64>, Compat)> {
    if adapters.is_empty() {
        return Err(MergeError::Empty);
    }
    if rank == 0 {
        return Err(MergeError::ZeroRank);
    }
    let mut prepared = Vec::with_capacity(adapters.len());
    let mut weights = Vec::with_capacity(adapters.len());
    for (i, (adapter, weight)) in adapters.iter().enumerate() {
        let label = format!("adapter #{i}");
        if !weight.is_finite() {
            return Err(MergeError::Weight { adapter: label, weight: *weight });
        }
        prepared.push(prepare_one(label, adapter)?);
        weights.push(*weight as f64);
    }
    let compat = Compat::admit_all(&prepared)?;
    Ok((prepared, weights, compat))
}

/// What adapters merged together must agree on: the base model (when both
/// name one) and each module's ΔW shape. Different module sets are fine.
#[derive(Debug, Clone, Default)]
struct Compat {
    /// (base model, the adapter that named it first)
    base: Option<(String, String)>,
    shapes: BTreeMap<ModuleKey, ((usize, usize), String)>,
}

impl Compat {
    fn admit_all(prepared: &[Prepared]) -> Result<Compat> {
        let mut compat = Compat::default();
        for p in prepared {
            compat.check(p)?;
            compat.insert(p);
        }
        Ok(compat)
    }

    fn check(&self, p: &Prepared) -> Result<()> {
        if let (Some((first, first_adapter)), Some(other)) = (&self.base, &p.config.base_model_name_or_path) {
            if !super::peft::same_base_model(first, other) {
                return Err(MergeError::BaseModel {
                    first: first.clone(),
                    first_adapter: first_adapter.clone(),
                    other: other.clone(),
                    adapter: p.label.clone(),
                });
            }
        }
        for (key, fac) in &p.modules {
            let other = (fac.b.rows, fac.a.cols);
            if let Some((first, first_adapter)) = self.shapes.get(key) {
                if *first != other {
                    return Err(MergeError::Shape {
                        module: module_name(key),
                        first: *first,
                        first_adapter: first_adapter.clone(),
                        other,
                        adapter: p.label.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    fn insert(&mut self, p: &Prepared) {
        if let (None, Some(base)) = (&self.base, &p.config.base_model_name_or_path) {
            self.base = Some((base.clone(), p.label.clone()));
        }
        for (key, fac) in &p.modules {
            self.shapes.entry(*key).or_insert(((fac.b.rows, fac.a.cols), p.label.clone()));
        }
    }

    fn shape(&self, key: &ModuleKey) -> (usize, usize) {
        self.shapes[key].0
    }

    fn base_model(&self) -> Option<String> {
        self.base.as_ref().map(|(b, _)| b.clone())
    }
}

fn union_keys(prepared: &[Prepared]) -> BTreeSet<ModuleKey> {
    prepared.iter().flat_map(|p| p.modules.keys().copied()).collect()
}

/// Mean over shared modules of the cosine of the flattened ΔWs.
fn similarity(x: &Prepared, y: &Prepared) -> f64 {
    let (mut sum, mut shared) = (0.0, 0usize);
    for (key, f) in &x.modules {
        let Some(g) = y.modules.get(key) else { continue };
        shared += 1;
        let (nf, ng) = (f.inner(f), g.inner(g));
        if nf > 0.0 && ng > 0.0 {
            sum += (f.inner(g) / (nf.sqrt() * ng.sqrt())).clamp(-1.0, 1.0);
        }
    }
    if shared == 0 {
        0.0
    } else {
        sum / shared as f64
    }
}

/// Σ coefᵢ ΔWᵢ over the union of modules, re-factorised to `rank`.
fn combine(members: &[(f64, &Prepared)], rank: usize, compat: &Compat, template: &PeftConfig, on_module: OnModule) -> Result<Merged> {
    let keys: BTreeSet<ModuleKey> = members.iter().flat_map(|(_, p)| p.modules.keys().copied()).collect();
    let mut out = Builder::new(rank, keys.len(), on_module);
    for key in keys {
        let terms: Vec<(f64, &Fac)> = members.iter().filter_map(|(w, p)| p.modules.get(&key).map(|f| (w * f.scale, f))).collect();
        out.push(key, fit_sum(&terms, compat.shape(&key), rank, module_seed(SVD_SEED, &key, 0)))?;
    }
    out.finish(template, compat.base_model())
}

fn output_config(template: &PeftConfig, base: Option<String>, rank: usize, keys: impl Iterator<Item = ModuleKey>) -> PeftConfig {
    let present: BTreeSet<TargetModule> = keys.map(|k| k.module).collect();
    let mut config = template.clone();
    config.r = rank;
    config.lora_alpha = rank as f64;
    config.use_rslora = false;
    config.target_modules =
        TargetModules::List(TargetModule::ALL.iter().filter(|m| present.contains(m)).map(|m| m.hf_name().to_string()).collect());
    config.base_model_name_or_path = base;
    config
}

/// Collects fitted modules into an adapter and its report.
struct Builder<'a> {
    rank: usize,
    modules: BTreeMap<ModuleKey, LoraPair>,
    fits: BTreeMap<ModuleKey, ModuleFit>,
    err_sq: f64,
    total_sq: f64,
    /// Modules expected in all, for `on_module`.
    expected: usize,
    on_module: OnModule<'a>,
}

impl<'a> Builder<'a> {
    fn new(rank: usize, expected: usize, on_module: OnModule<'a>) -> Self {
        Self { rank, modules: BTreeMap::new(), fits: BTreeMap::new(), err_sq: 0.0, total_sq: 0.0, expected, on_module }
    }

    fn record(&mut self, key: ModuleKey, err_sq: f64, total_sq: f64) {
        let relative_error = if total_sq > 0.0 { (err_sq / total_sq).sqrt() } else { 0.0 };
        self.fits.insert(key, ModuleFit { relative_error, norm: total_sq.sqrt() });
        self.err_sq += err_sq;
        self.total_sq += total_sq;
    }

    fn push(&mut self, key: ModuleKey, fit: Fit) -> Result<()> {
        debug_assert_eq!(fit.a.rows, self.rank);
        self.modules.insert(key, LoraPair { a: fit.a.to_tensor()?, b: fit.b.to_tensor()? });
        self.record(key, fit.err_sq, fit.total_sq);
        match (self.on_module)(self.modules.len(), self.expected) {
            ControlFlow::Continue(()) => Ok(()),
            ControlFlow::Break(()) => Err(MergeError::Cancelled),
        }
    }

    fn report(&self) -> MergeReport {
        let overall = if self.total_sq > 0.0 { (self.err_sq / self.total_sq).sqrt() } else { 0.0 };
        MergeReport { modules: self.fits.clone(), overall }
    }

    fn finish(self, template: &PeftConfig, base: Option<String>) -> Result<Merged> {
        let report = self.report();
        let config = output_config(template, base, self.rank, self.modules.keys().copied());
        Ok(Merged { adapter: LoraAdapter { config, modules: self.modules }, report })
    }
}

/// Keeps the round(density · len) (at least 1) largest-magnitude entries;
/// ties go to the lower index, so the result is deterministic.
fn trim(data: Vec<f64>, density: f32) -> Vec<f64> {
    let len = data.len();
    let keep = ((density as f64 * len as f64).round() as usize).clamp(1, len.max(1));
    if keep >= len {
        return data;
    }
    let mut order: Vec<usize> = (0..len).collect();
    order.select_nth_unstable_by(keep - 1, |&i, &j| data[j].abs().total_cmp(&data[i].abs()).then(i.cmp(&j)));
    let mut out = vec![0.0; len];
    for &i in &order[..keep] {
        out[i] = data[i];
    }
    out
}

fn module_seed(seed: u64, key: &ModuleKey, extra: u64) -> u64 {
    mix(&[seed, key.layer as u64, key.module as u64, extra])
}

// ---------------------------------------------------------------------------
// Low-rank fitting
// ---------------------------------------------------------------------------

/// Rank-r factors (B = U√Σ, A = √ΣVᵀ, zero-padded) of a target and the
/// squared Frobenius norms of the residual and of the target.
struct Fit {
    b: Mat,
    a: Mat,
    err_sq: f64,
    total_sq: f64,
}

impl Fit {
    fn zero((m, n): (usize, usize), rank: usize) -> Fit {
        Fit { b: Mat::zeros(m, rank), a: Mat::zeros(rank, n), err_sq: 0.0, total_sq: 0.0 }
    }

    fn from_svd(svd: &Svd, (m, n): (usize, usize), rank: usize, err_sq: f64, total_sq: f64) -> Fit {
        let mut fit = Fit { err_sq, total_sq, ..Fit::zero((m, n), rank) };
        for (j, &s) in svd.s.iter().enumerate().take(rank) {
            if s <= 0.0 {
                continue;
            }
            let root = s.sqrt();
            for i in 0..m {
                fit.b.data[i * rank + j] = svd.u.at(i, j) * root;
            }
            for i in 0..n {
                fit.a.data[j * n + i] = svd.v.at(i, j) * root;
            }
        }
        fit
    }
}

/// Truncated SVD of a dense matrix: exact when min(m, n) ≤ `exact_limit` or
/// the sketch would not be smaller, randomized otherwise.
fn fit_dense(m: &Mat, rank: usize, seed: u64, exact_limit: usize) -> Fit {
    let shape = (m.rows, m.cols);
    let total_sq = m.frob_sq();
    if total_sq == 0.0 {
        return Fit::zero(shape, rank);
    }
    let p = m.rows.min(m.cols);
    if p <= exact_limit || rank + OVERSAMPLE >= p {
        let svd = exact_svd(m);
        let err_sq = svd.s.iter().skip(rank).map(|s| s * s).sum();
        Fit::from_svd(&svd, shape, rank, err_sq, total_sq)
    } else {
        let svd = randomized_svd(m, rank + OVERSAMPLE, seed);
        let kept: f64 = svd.s.iter().take(rank).map(|s| s * s).sum();
        Fit::from_svd(&svd, shape, rank, (total_sq - kept).max(0.0), total_sq)
    }
}

/// Σ coefᵢ Bᵢ Aᵢ re-factorised to `rank`, exactly through the stacked
/// factors when their total rank is at most [`FACTORED_LIMIT`].
fn fit_sum(terms: &[(f64, &Fac)], shape: (usize, usize), rank: usize, seed: u64) -> Fit {
    let terms: Vec<(f64, &Fac)> = terms.iter().copied().filter(|(c, f)| *c != 0.0 && f.rank() > 0).collect();
    let total_rank: usize = terms.iter().map(|(_, f)| f.rank()).sum();
    if terms.is_empty() {
        return Fit::zero(shape, rank);
    }
    let (m, n) = shape;
    if total_rank > FACTORED_LIMIT {
        let mut dense = Mat::zeros(m, n);
        for (c, f) in &terms {
            let mut d = f.b.matmul(&f.a);
            d.scale(*c);
            dense.data.iter_mut().zip(&d.data).for_each(|(x, y)| *x += y);
        }
        return fit_dense(&dense, rank, seed, EXACT_LIMIT);
    }
    let mut left = Mat::zeros(m, total_rank);
    let mut right = Mat::zeros(total_rank, n);
    let mut offset = 0;
    for (c, f) in &terms {
        let r = f.rank();
        for i in 0..m {
            for j in 0..r {
                left.data[i * total_rank + offset + j] = c * f.b.at(i, j);
            }
        }
        right.data[offset * n..(offset + r) * n].copy_from_slice(&f.a.data);
        offset += r;
    }
    let svd = factored_svd(&left, &right);
    let total_sq: f64 = svd.s.iter().map(|s| s * s).sum();
    if total_sq == 0.0 {
        return Fit::zero(shape, rank);
    }
    let err_sq = svd.s.iter().skip(rank).map(|s| s * s).sum();
    Fit::from_svd(&svd, shape, rank, err_sq, total_sq)
}

// ---------------------------------------------------------------------------
// Dense numerics
// ---------------------------------------------------------------------------

/// A dense row-major f64 matrix.
#[derive(Debug, Clone, PartialEq)]
struct Mat {
    rows: usize,
    cols: usize,
    data: Vec<f64>,
}

impl Mat {
    fn zeros(rows: usize, cols: usize) -> Self {
        Self { rows, cols, data: vec![0.0; rows * cols] }
    }

    fn from_tensor(t: &Tensor) -> Result<Self> {
        let (rows, cols) = t.dims2()?;
        let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self { rows, cols, data: data.into_iter().map(f64::from).collect() })
    }

    fn to_tensor(&self) -> Result<Tensor> {
        let data: Vec<f32> = self.data.iter().map(|&x| x as f32).collect();
        Ok(Tensor::from_vec(data, (self.rows, self.cols), &Device::Cpu)?)
    }

    fn at(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.cols + j]
    }

    fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    fn row_mut(&mut self, i: usize) -> &mut [f64] {
        &mut self.data[i * self.cols..(i + 1) * self.cols]
    }

    fn transpose(&self) -> Mat {
        let mut t = Mat::zeros(self.cols, self.rows);
        for i in 0..self.rows {
            for j in 0..self.cols {
                t.data[j * self.rows + i] = self.data[i * self.cols + j];
            }
        }
        t
    }

    /// self · other
    fn matmul(&self, other: &Mat) -> Mat {
        assert_eq!(self.cols, other.rows, "matmul shapes");
        let n = other.cols;
        let mut out = Mat::zeros(self.rows, n);
        for i in 0..self.rows {
            let out_row = &mut out.data[i * n..(i + 1) * n];
            for (p, &x) in self.row(i).iter().enumerate() {
                if x != 0.0 {
                    out_row.iter_mut().zip(other.row(p)).for_each(|(o, y)| *o += x * y);
                }
            }
        }
        out
    }

    /// selfᵀ · other
    fn t_matmul(&self, other: &Mat) -> Mat {
        assert_eq!(self.rows, other.rows, "t_matmul shapes");
        let n = other.cols;
        let mut out = Mat::zeros(self.cols, n);
        for p in 0..self.rows {
            let other_row = other.row(p);
            for (i, &x) in self.row(p).iter().enumerate() {
                if x != 0.0 {
                    out.data[i * n..(i + 1) * n].iter_mut().zip(other_row).for_each(|(o, y)| *o += x * y);
                }
            }
        }
        out
    }

    /// self · otherᵀ
    fn matmul_t(&self, other: &Mat) -> Mat {
        assert_eq!(self.cols, other.cols, "matmul_t shapes");
        let mut out = Mat::zeros(self.rows, other.rows);
        for i in 0..self.rows {
            for j in 0..other.rows {
                out.data[i * other.rows + j] = dot(self.row(i), other.row(j));
            }
        }
        out
    }

    fn frob_sq(&self) -> f64 {
        dot(&self.data, &self.data)
    }

    fn scale(&mut self, s: f64) {
        self.data.iter_mut().for_each(|x| *x *= s);
    }

    fn is_finite(&self) -> bool {
        self.data.iter().all(|x| x.is_finite())
    }
}

fn dot(x: &[f64], y: &[f64]) -> f64 {
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// Householder thin QR: a (m × n) = q (m × k) · r (k × n), k = min(m, n),
/// q with orthonormal columns, r upper triangular (trapezoidal).
fn qr(a: &Mat) -> (Mat, Mat) {
    let (m, n) = (a.rows, a.cols);
    let k = m.min(n);
    let mut cols: Vec<Vec<f64>> = (0..n).map(|j| (0..m).map(|i| a.at(i, j)).collect()).collect();
    let mut reflectors: Vec<Option<Vec<f64>>> = Vec::with_capacity(k);
    for j in 0..k {
        let norm = cols[j][j..].iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm == 0.0 {
            reflectors.push(None);
            continue;
        }
        let alpha = if cols[j][j] > 0.0 { -norm } else { norm };
        let mut v = cols[j][j..].to_vec();
        v[0] -= alpha;
        let v_norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter_mut().for_each(|x| *x /= v_norm);
        cols[j][j] = alpha;
        cols[j][j + 1..].iter_mut().for_each(|x| *x = 0.0);
        for col in cols.iter_mut().skip(j + 1) {
            reflect(&v, &mut col[j..]);
        }
        reflectors.push(Some(v));
    }
    let mut r = Mat::zeros(k, n);
    for (j, col) in cols.iter().enumerate() {
        for (i, &x) in col.iter().enumerate().take(k.min(j + 1)) {
            r.data[i * n + j] = x;
        }
    }
    // Q = H₀ H₁ … H_{k−1} [I_k; 0]; Hⱼ leaves the first j unit columns alone.
    let mut q_cols: Vec<Vec<f64>> = (0..k)
        .map(|j| {
            let mut e = vec![0.0; m];
            e[j] = 1.0;
            e
        })
        .collect();
    for (j, v) in reflectors.iter().enumerate().rev() {
        if let Some(v) = v {
            for col in q_cols.iter_mut().skip(j) {
                reflect(v, &mut col[j..]);
            }
        }
    }
    let mut q = Mat::zeros(m, k);
    for (j, col) in q_cols.iter().enumerate() {
        for (i, &x) in col.iter().enumerate() {
            q.data[i * k + j] = x;
        }
    }
    (q, r)
}

/// x ← (I − 2vvᵀ) x for a unit vector v.
fn reflect(v: &[f64], x: &mut [f64]) {
    let d = 2.0 * dot(v, x);
    x.iter_mut().zip(v).for_each(|(xi, vi)| *xi -= d * vi);
}

/// a = u · diag(s) · vᵀ with p = min(m, n) components, s descending. Columns
/// of u for zero singular values are zero; v is always orthonormal.
#[derive(Debug, Clone)]
struct Svd {
    u: Mat,
    s: Vec<f64>,
    v: Mat,
}

/// One-sided (Hestenes) Jacobi SVD, for small dense matrices.
fn jacobi_svd(a: &Mat) -> Svd {
    if a.rows < a.cols {
        let t = jacobi_svd(&a.transpose());
        return Svd { u: t.v, s: t.s, v: t.u };
    }
    let (m, n) = (a.rows, a.cols);
    let mut u: Vec<Vec<f64>> = (0..n).map(|j| (0..m).map(|i| a.at(i, j)).collect()).collect();
    let mut v: Vec<Vec<f64>> = (0..n)
        .map(|j| {
            let mut e = vec![0.0; n];
            e[j] = 1.0;
            e
        })
        .collect();
    for _ in 0..JACOBI_MAX_SWEEPS {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let (alpha, beta, gamma) = (dot(&u[p], &u[p]), dot(&u[q], &u[q]), dot(&u[p], &u[q]));
                if gamma == 0.0 || gamma.abs() <= JACOBI_TOL * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                // The rotation that makes columns p and q orthogonal.
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = if zeta.abs() > 1e150 { 0.5 / zeta } else { zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt()) };
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                rotate(&mut u, p, q, c, s);
                rotate(&mut v, p, q, c, s);
            }
        }
        if !rotated {
            break;
        }
    }
    let mut order: Vec<(f64, usize)> = u.iter().enumerate().map(|(j, col)| (dot(col, col).sqrt(), j)).collect();
    order.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
    let mut svd = Svd { u: Mat::zeros(m, n), s: Vec::with_capacity(n), v: Mat::zeros(n, n) };
    for (new, &(sigma, j)) in order.iter().enumerate() {
        svd.s.push(sigma);
        if sigma > 0.0 {
            for (i, x) in u[j].iter().enumerate() {
                svd.u.data[i * n + new] = x / sigma;
            }
        }
        for (i, x) in v[j].iter().enumerate() {
            svd.v.data[i * n + new] = *x;
        }
    }
    svd
}

fn rotate(cols: &mut [Vec<f64>], p: usize, q: usize, c: f64, s: f64) {
    let (left, right) = cols.split_at_mut(q);
    for (x, y) in left[p].iter_mut().zip(right[0].iter_mut()) {
        let (a, b) = (*x, *y);
        *x = c * a - s * b;
        *y = s * a + c * b;
    }
}

/// Full thin SVD: QR of the tall orientation, then Jacobi on the triangle.
fn exact_svd(a: &Mat) -> Svd {
    if a.rows < a.cols {
        let t = exact_svd(&a.transpose());
        return Svd { u: t.v, s: t.s, v: t.u };
    }
    let (q, r) = qr(a);
    let svd = jacobi_svd(&r);
    Svd { u: q.matmul(&svd.u), s: svd.s, v: svd.v }
}

/// Randomized SVD (Halko, Martinsson & Tropp) with `width` = rank +
/// oversampling columns: Y = (AAᵀ)^q A Ω with QR between products, then the
/// exact SVD of the small QᵀA.
fn randomized_svd(a: &Mat, width: usize, seed: u64) -> Svd {
    let mut rng = SplitMix::new(seed);
    let width = width.min(a.rows.min(a.cols));
    let omega = Mat { rows: a.cols, cols: width, data: (0..a.cols * width).map(|_| rng.gaussian()).collect() };
    let mut q = qr(&a.matmul(&omega)).0;
    for _ in 0..POWER_ITERATIONS {
        let z = qr(&a.t_matmul(&q)).0;
        q = qr(&a.matmul(&z)).0;
    }
    let small = exact_svd(&q.t_matmul(a));
    Svd { u: q.matmul(&small.u), s: small.s, v: small.v }
}

/// Exact SVD of left (m × R) · right (R × n) through QR of both factors and
/// a Jacobi SVD of the (≤ R × R) core.
fn factored_svd(left: &Mat, right: &Mat) -> Svd {
    let (ql, rl) = qr(left);
    let (qr_right, rr) = qr(&right.transpose());
    let core = jacobi_svd(&rl.matmul_t(&rr));
    Svd { u: ql.matmul(&core.u), s: core.s, v: qr_right.matmul(&core.v) }
}

/// SplitMix64: small, seedable and good enough for masks and sketches.
struct SplitMix(u64);

impl SplitMix {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    fn gaussian(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

fn mix(parts: &[u64]) -> u64 {
    parts.iter().fold(0x243F_6A88_85A3_08D3, |h, &p| SplitMix::new(h ^ p).next_u64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const Q0: ModuleKey = ModuleKey { layer: 0, module: TargetModule::Q };
    const V1: ModuleKey = ModuleKey { layer: 1, module: TargetModule::V };
    const K1: ModuleKey = ModuleKey { layer: 1, module: TargetModule::K };
    /// (module, out, in)
    const SHAPES: [(ModuleKey, usize, usize); 2] = [(Q0, 12, 10), (V1, 6, 10)];

    fn config(r: usize, alpha: f64, base: Option<&str>, rslora: bool) -> PeftConfig {
        serde_json::from_value(serde_json::json!({
            "r": r, "lora_alpha": alpha, "base_model_name_or_path": base, "use_rslora": rslora,
            "target_modules": ["q_proj", "k_proj", "v_proj"], "task_type": "CAUSAL_LM",
        }))
        .unwrap()
    }

    fn tensor(data: Vec<f32>, shape: (usize, usize)) -> Tensor {
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    fn uniform(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn random_adapter(seed: u64, r: usize, alpha: f64, shapes: &[(ModuleKey, usize, usize)]) -> LoraAdapter {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let modules = shapes
            .iter()
            .map(|&(key, out, inp)| {
                let a = tensor(uniform(&mut rng, r * inp), (r, inp));
                let b = tensor(uniform(&mut rng, out * r), (out, r));
                (key, LoraPair { a, b })
            })
            .collect();
        LoraAdapter { config: config(r, alpha, Some("tiny-lm"), false), modules }
    }

    /// The adapter's factors times (1 + eps · uniform noise).
    fn perturbed(adapter: &LoraAdapter, eps: f32, seed: u64) -> LoraAdapter {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut noisy = |t: &Tensor| {
            let data: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let data = data.iter().map(|x| x * (1.0 + eps * rng.random_range(-1.0f32..1.0))).collect();
            tensor(data, t.dims2().unwrap())
        };
        let modules = adapter.modules.iter().map(|(k, p)| (*k, LoraPair { a: noisy(&p.a), b: noisy(&p.b) })).collect();
        LoraAdapter { config: adapter.config.clone(), modules }
    }

    /// An adapter whose ΔW of `key` is the given rows × cols matrix
    /// (A = I, B = ΔW, r = alpha = cols).
    fn dense_adapter(key: ModuleKey, rows: usize, cols: usize, delta: &[f32]) -> LoraAdapter {
        let mut eye = vec![0.0f32; cols * cols];
        (0..cols).for_each(|i| eye[i * cols + i] = 1.0);
        let pair = LoraPair { a: tensor(eye, (cols, cols)), b: tensor(delta.to_vec(), (rows, cols)) };
        LoraAdapter { config: config(cols, cols as f64, None, false), modules: BTreeMap::from([(key, pair)]) }
    }

    /// ΔW = scale · B · A, computed with candle (independently of `Mat`).
    fn delta(adapter: &LoraAdapter, key: ModuleKey) -> Option<Tensor> {
        let p = adapter.modules.get(&key)?;
        Some(p.b.matmul(&p.a).unwrap().affine(adapter.scale(), 0.0).unwrap())
    }

    fn delta_or_zero(adapter: &LoraAdapter, key: ModuleKey, shape: (usize, usize)) -> Tensor {
        delta(adapter, key).unwrap_or_else(|| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap())
    }

    fn sq_norm(t: &Tensor) -> f64 {
        t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64
    }

    /// ‖x − y‖ / ‖y‖
    fn rel(x: &Tensor, y: &Tensor) -> f64 {
        (sq_norm(&(x - y).unwrap()) / sq_norm(y)).sqrt()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn cosine(x: &Tensor, y: &Tensor) -> f64 {
        let dot = (x * y).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        dot / (sq_norm(x) * sq_norm(y)).sqrt()
    }

    /// PEFT-valid output: r = alpha = rank, scale 1, every module rank `rank`.
    fn assert_valid(adapter: &LoraAdapter, rank: usize) {
        assert_eq!(adapter.config.r, rank);
        assert_eq!(adapter.scale(), 1.0);
        assert!(!adapter.config.use_rslora);
        let names = match &adapter.config.target_modules {
            TargetModules::List(v) => v.clone(),
            other => panic!("target_modules {other:?}"),
        };
        for (key, pair) in &adapter.modules {
            assert_eq!(pair.a.dims2().unwrap().0, rank);
            assert_eq!(pair.b.dims2().unwrap().1, rank);
            assert!(names.iter().any(|n| n == key.module.hf_name()));
        }
    }

    fn random_mat(rng: &mut rand::rngs::StdRng, rows: usize, cols: usize) -> Mat {
        Mat { rows, cols, data: (0..rows * cols).map(|_| rng.random_range(-1.0..1.0)).collect() }
    }

    fn max_abs_diff(x: &Mat, y: &Mat) -> f64 {
        assert_eq!((x.rows, x.cols), (y.rows, y.cols));
        x.data.iter().zip(&y.data).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max)
    }

    fn identity(n: usize) -> Mat {
        let mut m = Mat::zeros(n, n);
        (0..n).for_each(|i| m.data[i * n + i] = 1.0);
        m
    }

    fn reconstruct(svd: &Svd) -> Mat {
        let mut us = svd.u.clone();
        for i in 0..us.rows {
            for (j, s) in svd.s.iter().enumerate() {
                us.data[i * us.cols + j] *= s;
            }
        }
        us.matmul_t(&svd.v)
    }

    // --- numerics -----------------------------------------------------------

    #[test]
    fn qr_is_orthonormal_and_reconstructs() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut deficient = random_mat(&mut rng, 9, 5);
        for i in 0..9 {
            let (a, b) = (deficient.at(i, 0), deficient.at(i, 1));
            deficient.data[i * 5 + 3] = a - 2.0 * b; // column 3 depends on 0 and 1
            deficient.data[i * 5 + 4] = 0.0; // column 4 is zero
        }
        for a in [random_mat(&mut rng, 9, 4), random_mat(&mut rng, 4, 9), random_mat(&mut rng, 6, 6), deficient] {
            let (q, r) = qr(&a);
            let k = a.rows.min(a.cols);
            assert_eq!((q.rows, q.cols, r.rows, r.cols), (a.rows, k, k, a.cols));
            assert!(max_abs_diff(&q.t_matmul(&q), &identity(k)) < 1e-12);
            assert!(max_abs_diff(&q.matmul(&r), &a) < 1e-12);
            for i in 0..k {
                for j in 0..i {
                    assert_eq!(r.at(i, j), 0.0, "R is upper triangular");
                }
            }
        }
    }

    #[test]
    fn jacobi_svd_reconstructs_with_known_singular_values() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        for a in [random_mat(&mut rng, 7, 5), random_mat(&mut rng, 5, 9), random_mat(&mut rng, 1, 3)] {
            let svd = jacobi_svd(&a);
            let p = a.rows.min(a.cols);
            assert_eq!(svd.s.len(), p);
            assert!(svd.s.windows(2).all(|w| w[0] >= w[1]), "descending");
            assert!(max_abs_diff(&reconstruct(&svd), &a) < 1e-12);
            assert!(max_abs_diff(&svd.u.t_matmul(&svd.u), &identity(p)) < 1e-12);
            assert!(max_abs_diff(&svd.v.t_matmul(&svd.v), &identity(p)) < 1e-12);
        }
        // U diag(5, 3, 1e-3) Vᵀ with orthonormal U, V from QR.
        let (u, _) = qr(&random_mat(&mut rng, 8, 3));
        let (v, _) = qr(&random_mat(&mut rng, 6, 3));
        let svd = Svd { u, s: vec![5.0, 3.0, 1e-3], v };
        let built = reconstruct(&svd);
        for found in [jacobi_svd(&built), exact_svd(&built)] {
            for (got, want) in found.s.iter().zip([5.0, 3.0, 1e-3, 0.0, 0.0, 0.0]) {
                assert!((got - want).abs() < 1e-12, "{got} vs {want}");
            }
        }
    }

    #[test]
    fn randomized_svd_matches_exact_on_low_rank_plus_noise() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut m = random_mat(&mut rng, 70, 6).matmul(&random_mat(&mut rng, 6, 50));
        let noise = random_mat(&mut rng, 70, 50);
        m.data.iter_mut().zip(&noise.data).for_each(|(x, n)| *x += 1e-3 * n);
        let exact = fit_dense(&m, 6, 7, usize::MAX);
        let randomized = fit_dense(&m, 6, 7, 0); // forces the randomized route
        let optimal = (exact.err_sq / exact.total_sq).sqrt();
        let got = (randomized.err_sq / randomized.total_sq).sqrt();
        assert!(optimal > 1e-4 && got <= optimal * 1.01 + 1e-12, "randomized {got} vs optimal {optimal}");
        // The reported error is the measured one.
        let mut diff = randomized.b.matmul(&randomized.a);
        diff.data.iter_mut().zip(&m.data).for_each(|(x, y)| *x -= y);
        assert!(((diff.frob_sq() / m.frob_sq()).sqrt() - got).abs() < 1e-9);
        // Deterministic for a seed.
        assert_eq!(fit_dense(&m, 6, 7, 0).a, randomized.a);
    }

    #[test]
    fn factored_and_dense_sums_agree() {
        let x = prepare_one("x".into(), &random_adapter(4, 3, 6.0, &SHAPES)).unwrap();
        let y = prepare_one("y".into(), &random_adapter(5, 4, 4.0, &SHAPES)).unwrap();
        let (fx, fy) = (&x.modules[&Q0], &y.modules[&Q0]);
        let factored = fit_sum(&[(0.5 * fx.scale, fx), (-2.0 * fy.scale, fy)], (12, 10), 4, 0);
        let mut dense = fx.dense();
        dense.scale(0.5);
        let mut dy = fy.dense();
        dy.scale(-2.0);
        dense.data.iter_mut().zip(&dy.data).for_each(|(a, b)| *a += b);
        let reference = fit_dense(&dense, 4, 0, usize::MAX);
        assert!((factored.err_sq - reference.err_sq).abs() < 1e-9 * reference.total_sq);
        assert!((factored.total_sq - reference.total_sq).abs() < 1e-9 * reference.total_sq);
        assert!(max_abs_diff(&factored.b.matmul(&factored.a), &reference.b.matmul(&reference.a)) < 1e-9);
    }

    // --- merges of identical adapters -----------------------------------------

    #[test]
    fn merging_identical_adapters_returns_the_adapter() {
        let x = random_adapter(10, 3, 12.0, &SHAPES);
        let lin = linear(&[(&x, 0.5), (&x, 0.5)], 3).unwrap();
        let ti = ties(&[(&x, 1.0), (&x, 1.0)], 1.0, 3).unwrap();
        let da = dare(&[(&x, 0.5), (&x, 0.5)], 1e-6, 42, 3).unwrap();
        let mut bank = SlotBank::new(1, None).unwrap();
        bank.add("x1", &x, 3).unwrap();
        assert!(matches!(bank.add("x2", &x, 3).unwrap(), Placement::Merged { slot: 0, similarity, .. } if similarity > 0.9999));
        let mut plus = SlotBank::new(3, Some(0.9)).unwrap();
        plus.add("x1", &x, 3).unwrap();
        assert_eq!(plus.add("x2", &x, 3).unwrap().slot(), 0);
        assert_eq!(plus.slots().len(), 1);
        for (what, merged) in [
            ("linear", &lin.adapter),
            ("ties", &ti.adapter),
            ("dare", &da.adapter),
            ("k-merge", &bank.slots()[0].adapter),
            ("k-merge++", &plus.slots()[0].adapter),
        ] {
            assert_valid(merged, 3);
            assert_eq!(merged.config.base_model_name_or_path.as_deref(), Some("tiny-lm"));
            for (key, _, _) in SHAPES {
                let err = rel(&delta(merged, key).unwrap(), &delta(&x, key).unwrap());
                assert!(err < 1e-4, "{what} {key:?}: {err}");
            }
        }
        for report in [&lin.report, &ti.report, &da.report] {
            assert!(report.overall < 1e-6 && report.max_module_error() < 1e-6);
        }
    }

    // --- linear -------------------------------------------------------------

    /// x (rank 3, scale 2, modules Q0 and V1) and y (rank 4, rsLoRA scale
    /// 4/√4 = 2, modules Q0 and K1): different module sets and scales.
    fn pair_for_linear() -> (LoraAdapter, LoraAdapter) {
        let x = random_adapter(20, 3, 6.0, &SHAPES);
        let mut y = random_adapter(21, 4, 4.0, &[(Q0, 12, 10), (K1, 4, 10)]);
        y.config.use_rslora = true;
        assert_eq!((x.scale(), y.scale()), (2.0, 2.0));
        (x, y)
    }

    #[test]
    fn linear_is_exact_when_rank_covers_the_sum() {
        let (x, y) = pair_for_linear();
        let merged = linear(&[(&x, 0.7), (&y, -1.3)], 7).unwrap();
        assert_valid(&merged.adapter, 7);
        assert_eq!(merged.adapter.config.target_modules, TargetModules::List(vec!["q_proj".into(), "k_proj".into(), "v_proj".into()]));
        for (key, shape) in [(Q0, (12, 10)), (V1, (6, 10)), (K1, (4, 10))] {
            let want = ((delta_or_zero(&x, key, shape) * 0.7).unwrap() + (delta_or_zero(&y, key, shape) * -1.3).unwrap()).unwrap();
            let err = rel(&delta(&merged.adapter, key).unwrap(), &want);
            assert!(err < 1e-4, "{key:?}: {err}");
            assert!(merged.report.modules[&key].relative_error < 1e-6);
            assert!((merged.report.modules[&key].norm - sq_norm(&want).sqrt()).abs() < 1e-4 * merged.report.modules[&key].norm);
        }
    }

    #[test]
    fn linear_reports_the_measured_error_when_truncating() {
        let (x, y) = pair_for_linear();
        let merged = linear(&[(&x, 0.7), (&y, -1.3)], 2).unwrap();
        assert_valid(&merged.adapter, 2);
        let (mut err_sq, mut total_sq) = (0.0, 0.0);
        for (key, shape) in [(Q0, (12, 10)), (V1, (6, 10)), (K1, (4, 10))] {
            let want = ((delta_or_zero(&x, key, shape) * 0.7).unwrap() + (delta_or_zero(&y, key, shape) * -1.3).unwrap()).unwrap();
            let measured = rel(&delta(&merged.adapter, key).unwrap(), &want);
            let reported = merged.report.modules[&key].relative_error;
            assert!((measured - reported).abs() < 1e-5, "{key:?}: measured {measured}, reported {reported}");
            err_sq += sq_norm(&(delta(&merged.adapter, key).unwrap() - &want).unwrap());
            total_sq += sq_norm(&want);
        }
        // Q0 is a rank-7 sum: truncating it to 2 must lose something.
        assert!(merged.report.modules[&Q0].relative_error > 0.05);
        assert!(((err_sq / total_sq).sqrt() - merged.report.overall).abs() < 1e-5);
    }

    // --- TIES ---------------------------------------------------------------

    #[test]
    fn ties_elects_signs_and_takes_the_disjoint_mean() {
        let t1 = dense_adapter(Q0, 2, 2, &[3.0, -1.0, 2.0, 0.5]);
        let t2 = dense_adapter(Q0, 2, 2, &[-1.0, -2.0, 1.0, -4.0]);
        let t3 = dense_adapter(Q0, 2, 2, &[-1.0, 2.5, -4.0, 1.0]);
        let check = |weights: [f32; 3], density: f32, want: [f32; 4]| {
            let merged = ties(&[(&t1, weights[0]), (&t2, weights[1]), (&t3, weights[2])], density, 2).unwrap();
            assert_valid(&merged.adapter, 2);
            let got = values(&delta(&merged.adapter, Q0).unwrap());
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-5, "weights {weights:?} density {density}: got {got:?}, want {want:?}");
            }
        };
        // Sums (3-1-1, -1-2+2.5, 2+1-4, 0.5-4+1) elect (+, -, -, -); the
        // means of the agreeing entries are (3, (-1-2)/2, -4, -4).
        check([1.0; 3], 1.0, [3.0, -1.5, -4.0, -4.0]);
        // Density 0.5 keeps two entries each: t1 → (3, ·, 2, ·),
        // t2 → (·, -2, ·, -4), t3 → (·, 2.5, -4, ·); signs (+, +, -, -).
        check([1.0; 3], 0.5, [3.0, 2.5, -4.0, -4.0]);
        // Weights scale the agreeing values but not the election.
        check([0.5, 1.0, 2.0], 1.0, [1.5, -1.25, -8.0, -4.0]);
    }

    // --- DARE ---------------------------------------------------------------

    #[test]
    fn dare_is_seeded_and_deterministic() {
        let (x, y) = (random_adapter(30, 3, 3.0, &SHAPES), random_adapter(31, 3, 3.0, &SHAPES));
        let run = |seed| dare(&[(&x, 1.0), (&y, 0.5)], 0.5, seed, 6).unwrap().adapter;
        let (a, b, c) = (run(7), run(7), run(8));
        for (key, _, _) in SHAPES {
            assert_eq!(values(&delta(&a, key).unwrap()), values(&delta(&b, key).unwrap()));
            assert!(rel(&delta(&a, key).unwrap(), &delta(&c, key).unwrap()) > 0.05);
        }
    }

    #[test]
    fn dare_draws_an_independent_mask_per_adapter() {
        // x merged with itself at weights 1/2: an entry kept by both masks is
        // 2·x, by one x, by none 0. A shared mask would never give x.
        let x = random_adapter(34, 3, 3.0, &[(Q0, 12, 10)]);
        let merged = dare(&[(&x, 0.5), (&x, 0.5)], 0.5, 9, 10).unwrap();
        let (got, orig) = (values(&delta(&merged.adapter, Q0).unwrap()), values(&delta(&x, Q0).unwrap()));
        let mut counts = [0; 3];
        for (g, o) in got.iter().zip(&orig) {
            let k = [0.0, 1.0, 2.0].iter().position(|k| (g - k * o).abs() < 1e-4 * (1.0 + o.abs())).expect("0, 1 or 2 times the entry");
            counts[k] += 1;
        }
        assert!(counts.iter().all(|&c| c > 10), "{counts:?}");
    }

    #[test]
    fn dare_preserves_the_expectation() {
        let x = random_adapter(32, 3, 3.0, &[(Q0, 6, 5)]);
        let y = random_adapter(33, 2, 4.0, &[(Q0, 6, 5)]);
        let want = (delta(&x, Q0).unwrap() + (delta(&y, Q0).unwrap() * 0.5).unwrap()).unwrap();
        let draws = 400;
        let mut mean = Tensor::zeros((6, 5), DType::F32, &Device::Cpu).unwrap();
        let mut single = 0.0;
        for seed in 0..draws {
            let merged = dare(&[(&x, 1.0), (&y, 0.5)], 0.5, seed, 5).unwrap();
            assert!(merged.report.overall < 1e-6, "rank 5 holds a 6x5 matrix exactly");
            let d = delta(&merged.adapter, Q0).unwrap();
            if seed == 0 {
                single = rel(&d, &want);
            }
            mean = (mean + d).unwrap();
        }
        let mean = (mean / draws as f64).unwrap();
        let err = rel(&mean, &want);
        assert!(single > 0.3, "one draw is noisy: {single}");
        assert!(err < 0.12, "the mean of {draws} draws is close: {err}");
    }

    // --- K-Merge ------------------------------------------------------------

    const BANK_SHAPES: [(ModuleKey, usize, usize); 2] = [(Q0, 16, 12), (V1, 8, 12)];

    fn family(seed: u64) -> LoraAdapter {
        random_adapter(seed, 2, 2.0, &BANK_SHAPES)
    }

    #[test]
    fn k_merge_plus_plus_shares_slots_between_similar_adapters_only() {
        let (f1, f2, f3) = (family(100), family(200), family(300));
        let mut bank = SlotBank::new(4, Some(0.6)).unwrap();
        let mut add = |name: &str, adapter: &LoraAdapter| {
            let placement = bank.add(name, adapter, 4).unwrap();
            assert!(bank.slots().len() <= bank.k());
            placement
        };
        assert!(matches!(add("f1", &f1), Placement::Opened { slot: 0, .. }));
        assert!(matches!(add("f1-a", &perturbed(&f1, 0.02, 1)), Placement::Merged { slot: 0, similarity, .. } if similarity > 0.95));
        assert!(matches!(add("f2", &f2), Placement::Opened { slot: 1, .. }));
        assert!(matches!(add("f2-a", &perturbed(&f2, 0.02, 2)), Placement::Merged { slot: 1, similarity, .. } if similarity > 0.95));
        assert!(matches!(add("f3", &f3), Placement::Opened { slot: 2, .. }));
        assert!(matches!(add("f1-b", &perturbed(&f1, 0.02, 3)), Placement::Merged { slot: 0, .. }));
        assert_eq!(bank.slots().len(), 3, "one slot is still free");
        assert_eq!(bank.slots()[0].members, ["f1", "f1-a", "f1-b"]);
        assert_eq!(bank.slot_of("f2-a"), Some(1));
        // Dissimilar adapters really are dissimilar.
        let sims = bank.similarities(&f3).unwrap();
        assert!(sims[0].abs() < 0.5 && sims[1].abs() < 0.5 && sims[2] > 0.999, "{sims:?}");
    }

    #[test]
    fn k_merge_fills_free_slots_then_merges_into_the_most_similar() {
        let (f1, f2, f3) = (family(100), family(200), family(300));
        let mut bank = SlotBank::new(3, None).unwrap();
        assert_eq!(bank.add("f1", &f1, 4).unwrap().slot(), 0);
        assert_eq!(bank.add("f1-a", &perturbed(&f1, 0.02, 1), 4).unwrap().slot(), 1, "free slots are used first");
        assert_eq!(bank.add("f2", &f2, 4).unwrap().slot(), 2);
        assert!(
            matches!(bank.add("f2-a", &perturbed(&f2, 0.02, 2), 4).unwrap(), Placement::Merged { slot: 2, similarity, .. } if similarity > 0.95)
        );
        let placement = bank.add("f3", &f3, 4).unwrap();
        assert!(matches!(placement, Placement::Merged { similarity, .. } if similarity < 0.5));
        assert_eq!(bank.slots().len(), 3);
    }

    #[test]
    fn k_merge_keeps_a_running_average() {
        let xs: [[f32; 9]; 3] = [
            [1.0, 2.0, 0.0, -1.0, 0.5, 3.0, 0.0, 1.0, -2.0],
            [2.0, -1.0, 1.0, 0.0, 1.5, 1.0, -3.0, 0.0, 1.0],
            [-4.0, 0.0, 2.0, 1.0, 1.0, -1.0, 0.5, 2.0, 0.0],
        ];
        let adapters: Vec<LoraAdapter> = xs.iter().map(|x| dense_adapter(Q0, 3, 3, x)).collect();
        let mut bank = SlotBank::new(1, Some(0.99)).unwrap();
        assert!(matches!(bank.add("x0", &adapters[0], 3).unwrap(), Placement::Opened { slot: 0, .. }));
        for n in 2..=3 {
            let before = delta(&bank.slots()[0].adapter, Q0).unwrap();
            let incoming = delta(&adapters[n - 1], Q0).unwrap();
            let Placement::Merged { slot: 0, similarity, error } = bank.add(&format!("x{}", n - 1), &adapters[n - 1], 3).unwrap() else {
                panic!("a full bank merges");
            };
            assert!((similarity as f64 - cosine(&before, &incoming)).abs() < 1e-5);
            assert!(error < 1e-6);
            let slot = &bank.slots()[0];
            assert_eq!(slot.count, n);
            let want: Vec<f32> = (0..9).map(|e| xs[..n].iter().map(|x| x[e]).sum::<f32>() / n as f32).collect();
            let got = values(&delta(&slot.adapter, Q0).unwrap());
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "after {n}: got {got:?}, want {want:?}");
            }
        }
    }

    #[test]
    fn slot_bank_never_exceeds_k() {
        for threshold in [None, Some(0.3), Some(-2.0), Some(2.0)] {
            let mut bank = SlotBank::new(3, threshold).unwrap();
            for i in 0..12u64 {
                let adapter = if i % 2 == 0 { family(1000 + i) } else { perturbed(&family(1000 + i - 1), 0.05, i) };
                bank.add(&format!("a{i}"), &adapter, 3).unwrap();
                assert!(bank.slots().len() <= 3, "{threshold:?} after {i}");
                assert!(bank.slots().iter().all(|s| s.count == s.members.len()));
                bank.slots().iter().for_each(|s| assert_valid(&s.adapter, 3));
            }
            assert_eq!(bank.slots().iter().map(|s| s.count).sum::<usize>(), 12);
            // threshold > every similarity: always open while slots are free.
            let expected_slots = if threshold == Some(-2.0) { 1 } else { 3 };
            assert_eq!(bank.slots().len(), expected_slots, "{threshold:?}");
        }
    }

    // --- shared-factor merge ------------------------------------------------

    #[test]
    fn shared_merge_with_one_cluster_per_adapter_is_exact() {
        let adapters: Vec<LoraAdapter> = (0..4u64)
            .map(|i| if i == 3 { random_adapter(400 + i, 3, 6.0, &SHAPES[..1]) } else { random_adapter(400 + i, 3, 6.0, &SHAPES) })
            .collect();
        let names = ["a", "b", "c", "d"];
        let named: Vec<(&str, &LoraAdapter)> = names.iter().copied().zip(&adapters).collect();
        let merge = shared_factor_merge(&named, 4, 3).unwrap();
        assert_eq!(merge.clusters().len(), 4);
        for (name, adapter) in &named {
            assert!(merge.errors()[*name] < 1e-6);
            let rebuilt = merge.adapter(name).unwrap();
            assert_valid(&rebuilt, 3);
            assert_eq!(rebuilt.modules.len(), adapter.modules.len(), "only the modules it had");
            for key in adapter.modules.keys() {
                let err = rel(&delta(&rebuilt, *key).unwrap(), &delta(adapter, *key).unwrap());
                assert!(err < 1e-4, "{name} {key:?}: {err}");
            }
        }
        // Per cluster and module one 3x10 A, per adapter and module one B.
        let a_floats = 3 * 10 * 7; // 7 (cluster, module) pairs: d has no V1
        let b_floats = 3 * (3 * 12 + 3 * 6) + 3 * 12;
        assert_eq!(merge.storage_bytes(), 4 * (a_floats + b_floats));
        assert!(matches!(merge.adapter("nope"), Err(MergeError::UnknownAdapter(n)) if n == "nope"));
    }

    #[test]
    fn fewer_clusters_store_less_and_lose_more() {
        let adapters: Vec<LoraAdapter> = (0..4u64).map(|i| random_adapter(500 + i, 3, 3.0, &SHAPES)).collect();
        let names = ["a", "b", "c", "d"];
        let named: Vec<(&str, &LoraAdapter)> = names.iter().copied().zip(&adapters).collect();
        let rows = report(&named, &[4, 3, 2, 1], 3).unwrap();
        assert_eq!(rows.iter().map(|r| r.clusters).collect::<Vec<_>>(), [4, 3, 2, 1]);
        assert!(rows[0].max_error < 1e-6);
        assert_eq!(rows[0].original_bytes, 4 * 4 * 3 * (12 + 10 + 6 + 10));
        for w in rows.windows(2) {
            assert!(w[1].storage_bytes < w[0].storage_bytes, "{rows:?}");
            assert!(w[1].mean_error > w[0].mean_error + 0.01, "{rows:?}");
            assert!(w[1].max_error >= w[0].max_error, "{rows:?}");
        }
    }

    #[test]
    fn a_shared_rank_covering_the_cluster_is_exact_and_errors_are_measured() {
        let adapters: Vec<LoraAdapter> = (0..3u64).map(|i| random_adapter(550 + i, 2, 2.0, &SHAPES)).collect();
        let named: Vec<(&str, &LoraAdapter)> = ["a", "b", "c"].into_iter().zip(&adapters).collect();
        // One cluster, rank 6 ≥ 2 + 2 + 2: A spans every adapter's rows.
        let merge = shared_factor_merge(&named, 1, 6).unwrap();
        assert!(merge.errors().values().all(|&e| e < 1e-6), "{:?}", merge.errors());
        // Rank 3 < 6 loses something, and the reported errors are the measured ones.
        let merge = shared_factor_merge(&named, 1, 3).unwrap();
        for (name, adapter) in &named {
            let rebuilt = merge.adapter(name).unwrap();
            let (mut err_sq, mut total_sq) = (0.0, 0.0);
            for key in adapter.modules.keys() {
                let (got, want) = (delta(&rebuilt, *key).unwrap(), delta(adapter, *key).unwrap());
                let measured = rel(&got, &want);
                assert!((measured - merge.report_of(name).unwrap().modules[key].relative_error).abs() < 1e-5);
                err_sq += sq_norm(&(got - &want).unwrap());
                total_sq += sq_norm(&want);
            }
            let measured = (err_sq / total_sq).sqrt();
            assert!(measured > 0.05 && (measured - merge.errors()[*name]).abs() < 1e-5, "{name}: {measured}");
        }
    }

    #[test]
    fn shared_merge_clusters_similar_adapters_together() {
        let (f, g) = (family(600), family(700));
        let adapters = [f.clone(), g.clone(), perturbed(&f, 0.02, 1), perturbed(&g, 0.02, 2)];
        let named: Vec<(&str, &LoraAdapter)> = ["f", "g", "f2", "g2"].into_iter().zip(&adapters).collect();
        let merge = shared_factor_merge(&named, 2, 2).unwrap();
        assert_eq!(merge.clusters(), [vec!["f".to_string(), "f2".into()], vec!["g".into(), "g2".into()]]);
        assert!(merge.errors().values().all(|&e| e < 0.05), "{:?}", merge.errors());
        // The two members of a cluster share their A tensors.
        let (a, b) = (merge.adapter("f").unwrap(), merge.adapter("f2").unwrap());
        assert_eq!(values(&a.modules[&Q0].a), values(&b.modules[&Q0].a));
    }

    // --- realistic sizes (run with `cargo test -- --ignored --nocapture`) ----

    /// Qwen2.5-0.5B shapes (q_proj 896×896, down_proj 896×4864), 4 adapters
    /// of rank 16: timings, and reported vs measured error on the dense
    /// (randomized SVD) route.
    #[test]
    #[ignore]
    fn realistic_sizes() {
        let shapes = [(Q0, 896, 896), (ModuleKey { layer: 0, module: TargetModule::Down }, 896, 4864)];
        let adapters: Vec<LoraAdapter> = (0..4u64).map(|i| random_adapter(900 + i, 16, 32.0, &shapes)).collect();
        let weighted: Vec<(&LoraAdapter, f32)> = adapters.iter().map(|a| (a, 0.25)).collect();
        let timed = |what: &str, f: &mut dyn FnMut() -> Merged| {
            let start = std::time::Instant::now();
            let merged = f();
            println!("{what}: {:.2?}, reported error {:.4}", start.elapsed(), merged.report.overall);
            merged
        };
        let lin = timed("linear rank 64 (exact)", &mut || linear(&weighted, 64).unwrap());
        assert!(lin.report.overall < 1e-6);
        timed("linear rank 16", &mut || linear(&weighted, 16).unwrap());
        let merged = timed("ties rank 16", &mut || ties(&weighted, 0.2, 16).unwrap());
        timed("dare rank 16", &mut || dare(&weighted, 0.9, 1, 16).unwrap());
        // Reported vs measured on the randomized route: rebuild the TIES target densely.
        let one = ties(&weighted[..1], 0.2, 16).unwrap();
        let target = {
            let fac = &prepare_one("x".into(), &adapters[0]).unwrap().modules[&Q0];
            let mut t = Mat { rows: 896, cols: 896, data: trim(fac.dense().data, 0.2) };
            t.scale(0.25);
            t.to_tensor().unwrap()
        };
        let measured = rel(&delta(&one.adapter, Q0).unwrap(), &target);
        println!("ties q_proj of one adapter: reported {:.5}, measured {measured:.5}", one.report.modules[&Q0].relative_error);
        assert!((measured - one.report.modules[&Q0].relative_error).abs() < 1e-4);
        assert_valid(&merged.adapter, 16);
        let named: Vec<(&str, &LoraAdapter)> = ["a", "b", "c", "d"].into_iter().zip(&adapters).collect();
        let start = std::time::Instant::now();
        for row in report(&named, &[4, 2, 1], 16).unwrap() {
            println!("{row:?}");
        }
        println!("shared-factor report: {:.2?}", start.elapsed());
        let mut bank = SlotBank::new(2, Some(0.5)).unwrap();
        let start = std::time::Instant::now();
        for (name, a) in &named {
            println!("{name}: {:?}", bank.add(name, a, 16).unwrap());
        }
        println!("k-merge++ 4 adds: {:.2?}", start.elapsed());
    }

    // --- validation ---------------------------------------------------------

    #[test]
    fn invalid_inputs_are_rejected_with_one_line_messages() {
        let x = random_adapter(800, 2, 2.0, &SHAPES);
        let mut other_base = x.clone();
        other_base.config.base_model_name_or_path = Some("other-lm".into());
        let no_base = {
            let mut a = random_adapter(801, 2, 2.0, &[(Q0, 12, 10), (K1, 4, 10)]);
            a.config.base_model_name_or_path = None;
            a
        };
        let wrong_shape = random_adapter(802, 2, 2.0, &[(V1, 6, 9)]);
        let mut nan = x.clone();
        nan.modules.get_mut(&V1).unwrap().b = tensor(vec![f32::NAN; 12], (6, 2));
        let mut bad_factors = x.clone();
        bad_factors.modules.get_mut(&Q0).unwrap().b = tensor(vec![0.0; 36], (12, 3));
        let mut bad_alpha = x.clone();
        bad_alpha.config.lora_alpha = f64::INFINITY;

        let mut errors: Vec<MergeError> = vec![
            linear(&[], 2).unwrap_err(),
            linear(&[(&x, 1.0)], 0).unwrap_err(),
            SlotBank::new(0, None).unwrap_err(),
            SlotBank::new(2, Some(f32::NAN)).unwrap_err(),
            ties(&[(&x, 1.0)], 0.0, 2).unwrap_err(),
            ties(&[(&x, 1.0)], 1.5, 2).unwrap_err(),
            ties(&[(&x, 1.0)], f32::NAN, 2).unwrap_err(),
            dare(&[(&x, 1.0)], 1.0, 0, 2).unwrap_err(),
            dare(&[(&x, 1.0)], -0.1, 0, 2).unwrap_err(),
            linear(&[(&x, 1.0), (&other_base, 1.0)], 2).unwrap_err(),
            linear(&[(&x, 1.0), (&wrong_shape, 1.0)], 2).unwrap_err(),
            dare(&[(&x, 1.0), (&nan, 1.0)], 0.1, 0, 2).unwrap_err(),
            linear(&[(&x, 1.0), (&x, f32::INFINITY)], 2).unwrap_err(),
            linear(&[(&bad_factors, 1.0)], 2).unwrap_err(),
            linear(&[(&bad_alpha, 1.0)], 2).unwrap_err(),
            shared_factor_merge(&[("a", &x), ("a", &x)], 1, 2).unwrap_err(),
            shared_factor_merge(&[("a", &x)], 0, 2).unwrap_err(),
            report(&[("a", &x)], &[1, 0], 2).unwrap_err(),
        ];
        let mut bank = SlotBank::new(2, None).unwrap();
        bank.add("x", &x, 2).unwrap();
        errors.push(bank.add("x", &x, 2).unwrap_err());
        errors.push(bank.add("y", &x, 0).unwrap_err());
        errors.push(bank.add("w", &wrong_shape, 2).unwrap_err());
        errors.push(bank.add("o", &other_base, 2).unwrap_err());
        assert_eq!(bank.slots().len(), 1, "failed adds change nothing");

        let expected = [
            "no adapters to merge",
            "the merged rank must be at least 1",
            "a budget of 0 slots cannot hold any adapter",
            "similarity threshold NaN is not a finite number",
            "density 0 is outside (0, 1]",
            "density 1.5 is outside (0, 1]",
            "density NaN is outside (0, 1]",
            "drop rate 1 is outside [0, 1)",
            "drop rate -0.1 is outside [0, 1)",
            "adapter #1 is for base model 'other-lm' but adapter #0 is for 'tiny-lm'",
            "layer 1 v_proj: ΔW is 6x10 in adapter #0 but 6x9 in adapter #1",
            "adapter #1, layer 1 v_proj: the LoRA factors hold NaN or infinite values",
            "adapter #1: merge weight inf is not finite",
            "adapter #0, layer 0 q_proj: lora_A is 2x10 but lora_B is 12x3; their ranks must agree",
            "adapter #0: its scale lora_alpha / r = inf is not finite",
            "adapter name 'a' appears more than once",
            "the number of clusters must be at least 1",
            "the number of clusters must be at least 1",
            "adapter name 'x' appears more than once",
            "the merged rank must be at least 1",
            "layer 1 v_proj: ΔW is 6x10 in adapter 'x' but 6x9 in adapter 'w'",
            "adapter 'o' is for base model 'other-lm' but adapter 'x' is for 'tiny-lm'",
        ];
        assert_eq!(errors.len(), expected.len());
        for (e, want) in errors.iter().zip(expected) {
            assert_eq!(e.to_string(), want);
            assert!(!e.to_string().contains('\n'));
        }

        // Different module sets and a missing base model are fine.
        let merged = linear(&[(&x, 1.0), (&no_base, 1.0)], 4).unwrap();
        assert_eq!(merged.adapter.modules.len(), 3);
        assert_eq!(merged.adapter.config.base_model_name_or_path.as_deref(), Some("tiny-lm"));
        // A zero-weight merge yields zero factors, not an error.
        let zero = linear(&[(&x, 0.0)], 2).unwrap();
        assert_eq!(zero.report.overall, 0.0);
        assert_valid(&zero.adapter, 2);
    }
}
