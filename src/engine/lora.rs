//! Linear layers that carry LoRA adapters applied at run time:
//! `y = W·x + b + Σ scale_i · B_i(A_i·x)` over the adapters active for the
//! current request. Choosing the active set is a slice of slot ids, so
//! switching adapters between requests costs nothing.

use candle_core::{DType, Device, Tensor};

use super::error::Result;
use super::matrix::WeightMatrix;
use super::quant::{GemvJob, LowRank, PackedMatrix};
use crate::vector::dot;

/// Index of an adapter slot in a loaded model.
pub type SlotId = usize;

/// The adapters active for one request, with a per-request multiplier of each
/// adapter's own `alpha / r` scale.
pub type ActiveAdapters<'a> = &'a [(SlotId, f32)];

/// One adapter's factors for one layer, the adapter's `alpha / r` folded into B.
#[derive(Clone)]
pub(crate) struct LoraFactors {
    rank: usize,
    in_features: usize,
    out_features: usize,
    /// A, `(rank, in)` row-major.
    a: Vec<f32>,
    /// scale·Bᵀ, `(rank, out)` row-major.
    b_t: Vec<f32>,
}

impl LoraFactors {
    /// `a`: (r, in), `b`: (out, r) as in PEFT files; `scale` = alpha / r.
    pub fn new(a: &Tensor, b: &Tensor, scale: f64) -> Result<Self> {
        let (rank, in_features) = a.dims2()?;
        let (out_features, _) = b.dims2()?;
        let a = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let b_t = (b.t()? * scale)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        Ok(Self { rank, in_features, out_features, a, b_t })
    }

    fn a_tensor(&self) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.a, (self.rank, self.in_features), &Device::Cpu)?)
    }

    fn b_t_tensor(&self) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.b_t, (self.rank, self.out_features), &Device::Cpu)?)
    }

    /// ΔW = scale · B·A, shape (out, in).
    pub fn delta(&self) -> Result<Tensor> {
        Ok(self.b_t_tensor()?.t()?.matmul(&self.a_tensor()?)?)
    }

    /// `multiplier · A·x` for one token: the rank-sized middle of the product.
    fn project(&self, x: &[f32], multiplier: f32) -> Vec<f32> {
        self.a.chunks_exact(self.in_features).map(|row| multiplier * dot(row, x)).collect()
    }

    /// `multiplier · x·ΔWᵀ` for `x` of shape `(tokens, in)`.
    fn product(&self, x: &Tensor, multiplier: f32) -> Result<Tensor> {
        Ok((x.matmul(&self.a_tensor()?.t()?)?.matmul(&self.b_t_tensor()?)? * f64::from(multiplier))?)
    }
}

/// Up to this many tokens the adapter is applied with vector loops (its B
/// product inside the weight kernel's pass); the fixed cost of two matmul
/// calls per layer would dominate a rank-8 product.
const MAX_TOKENS_FOR_LOOPS: usize = 4;

pub(crate) struct LoraLinear {
    weight: WeightMatrix,
    bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
    adapters: Vec<(SlotId, LoraFactors)>,
}

impl LoraLinear {
    pub fn new(weight: WeightMatrix, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.shape()?;
        Ok(Self { weight, bias, in_features, out_features, adapters: Vec::new() })
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn set_adapter(&mut self, slot: SlotId, factors: LoraFactors) {
        self.remove_adapter(slot);
        self.adapters.push((slot, factors));
    }

    pub fn remove_adapter(&mut self, slot: SlotId) {
        self.adapters.retain(|(s, _)| *s != slot);
    }

    pub fn adapter(&self, slot: SlotId) -> Option<&LoraFactors> {
        self.adapters.iter().find(|(s, _)| *s == slot).map(|(_, f)| f)
    }

    fn active<'a>(&'a self, active: ActiveAdapters<'a>) -> impl Iterator<Item = (&'a LoraFactors, f32)> + 'a {
        active.iter().filter_map(|&(slot, multiplier)| Some((self.adapter(slot)?, multiplier)))
    }

    /// `x`: (tokens, in) → (tokens, out).
    pub fn forward(&self, x: &Tensor, active: ActiveAdapters) -> Result<Tensor> {
        let [y] = Self::forward_shared([self], x, active)?;
        Ok(y)
    }

    /// The forwards of several layers that read the same `x` (q/k/v,
    /// gate/up). For a few tokens on packed weights, each token is one pass
    /// over the thread pool for all layers, adapters included.
    pub fn forward_shared<const N: usize>(layers: [&LoraLinear; N], x: &Tensor, active: ActiveAdapters) -> Result<[Tensor; N]> {
        let tokens = x.dim(0)?;
        let packed: Option<Vec<&PackedMatrix>> = layers.iter().map(|l| l.weight.as_packed()).collect();
        let outputs = match packed {
            Some(packed) if tokens <= MAX_TOKENS_FOR_LOOPS => {
                let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let mut ys: Vec<Vec<f32>> = layers.iter().map(|l| vec![0f32; tokens * l.out_features]).collect();
                for (t, row) in xs.chunks_exact(x.dim(1)?).enumerate() {
                    let middles: Vec<Vec<Vec<f32>>> =
                        layers.iter().map(|l| l.active(active).map(|(f, m)| f.project(row, m)).collect()).collect();
                    let mut jobs: Vec<GemvJob> = layers
                        .iter()
                        .zip(&packed)
                        .zip(ys.iter_mut())
                        .zip(&middles)
                        .map(|(((layer, weight), y), middles)| GemvJob {
                            weight,
                            out: &mut y[t * layer.out_features..(t + 1) * layer.out_features],
                            low_rank: layer.active(active).zip(middles).map(|((f, _), h)| LowRank { b_t: &f.b_t, h }).collect(),
                        })
                        .collect();
                    PackedMatrix::gemv_shared(&mut jobs, row);
                }
                layers
                    .iter()
                    .zip(ys)
                    .map(|(layer, y)| layer.add_bias(Tensor::from_vec(y, (tokens, layer.out_features), x.device())?))
                    .collect::<Result<Vec<_>>>()?
            }
            _ => layers.iter().map(|layer| layer.forward_unfused(x, active)).collect::<Result<Vec<_>>>()?,
        };
        outputs.try_into().map_err(|_| candle_core::Error::Msg("forward_shared: output count".into()).into())
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        })
    }

    /// Base product, bias and adapters as separate tensor ops.
    fn forward_unfused(&self, x: &Tensor, active: ActiveAdapters) -> Result<Tensor> {
        let mut y = self.add_bias(self.weight.forward(x)?)?;
        for (factors, multiplier) in self.active(active) {
            y = (y + factors.product(x, multiplier)?)?;
        }
        Ok(y)
    }

    /// Adds `scale · ΔW` of `slot` into the base weight (re-quantizing to the
    /// weight's format) and drops the adapter from this layer.
    pub fn fold(&mut self, slot: SlotId, scale: f32) -> Result<()> {
        let Some(f) = self.adapter(slot) else { return Ok(()) };
        self.weight = self.weight.with_added(&(f.delta()? * scale as f64)?)?;
        self.remove_adapter(slot);
        Ok(())
    }
}
