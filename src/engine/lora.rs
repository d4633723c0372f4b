//! Linear layers that carry LoRA adapters applied at run time:
//! `y = W·x + b + Σ scale_i · B_i(A_i·x)` over the adapters active for the
//! current request. Choosing the active set is a slice of slot ids, so
//! switching adapters between requests costs nothing.

use candle_core::{Device, Tensor};

use super::error::Result;
use super::matrix::WeightMatrix;
use super::vector::{axpy, dot};

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

/// Up to this many tokens the adapter is applied with plain loops; the fixed
/// cost of two matmul calls per layer would dominate a rank-8 product.
const MAX_TOKENS_FOR_LOOPS: usize = 4;

impl LoraFactors {
    /// `a`: (r, in), `b`: (out, r) as in PEFT files; `scale` = alpha / r.
    pub fn new(a: &Tensor, b: &Tensor, scale: f64) -> Result<Self> {
        let (rank, in_features) = a.dims2()?;
        let (out_features, _) = b.dims2()?;
        let a = a.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
        let b_t = (b.t()? * scale)?.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
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

    /// `y += multiplier · ΔW·x` for one token.
    fn add_to_row(&self, x: &[f32], y: &mut [f32], multiplier: f32) {
        for (a_row, b_row) in self.a.chunks_exact(self.in_features).zip(self.b_t.chunks_exact(self.out_features)) {
            axpy(multiplier * dot(a_row, x), b_row, y);
        }
    }

    /// `multiplier · x·ΔWᵀ` for `x` of shape `(tokens, in)`.
    fn product(&self, x: &Tensor, multiplier: f32) -> Result<Tensor> {
        Ok((x.matmul(&self.a_tensor()?.t()?)?.matmul(&self.b_t_tensor()?)? * f64::from(multiplier))?)
    }
}

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

    /// `x`: (tokens, in) → (tokens, out).
    pub fn forward(&self, x: &Tensor, active: ActiveAdapters) -> Result<Tensor> {
        let y = self.weight.forward(x)?;
        self.add_bias_and_adapters(x, y, active)
    }

    /// The forwards of several layers that read the same `x`, their base
    /// products computed together.
    pub fn forward_shared<const N: usize>(layers: [&LoraLinear; N], x: &Tensor, active: ActiveAdapters) -> Result<[Tensor; N]> {
        let weights: Vec<&WeightMatrix> = layers.iter().map(|l| &l.weight).collect();
        let products = WeightMatrix::forward_shared(&weights, x)?;
        let outputs = layers.iter().zip(products).map(|(layer, y)| layer.add_bias_and_adapters(x, y, active)).collect::<Result<Vec<_>>>()?;
        outputs.try_into().map_err(|_| candle_core::Error::Msg("forward_shared: output count".into()).into())
    }

    fn add_bias_and_adapters(&self, x: &Tensor, mut y: Tensor, active: ActiveAdapters) -> Result<Tensor> {
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        let mut adapters = active.iter().filter_map(|&(slot, multiplier)| Some((self.adapter(slot)?, multiplier))).peekable();
        if adapters.peek().is_none() {
            return Ok(y);
        }
        let tokens = x.dim(0)?;
        if tokens <= MAX_TOKENS_FOR_LOOPS {
            let xs = x.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let mut ys = y.flatten_all()?.to_vec1::<f32>()?;
            for (factors, multiplier) in adapters {
                for (xr, yr) in xs.chunks_exact(self.in_features).zip(ys.chunks_exact_mut(self.out_features)) {
                    factors.add_to_row(xr, yr, multiplier);
                }
            }
            return Ok(Tensor::from_vec(ys, (tokens, self.out_features), x.device())?);
        }
        for (factors, multiplier) in adapters {
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
