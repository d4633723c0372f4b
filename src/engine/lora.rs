//! Linear layers that carry LoRA adapters applied at run time:
//! `y = W·x + b + Σ scale_i · B_i(A_i·x)` over the adapters active for the
//! current request. Choosing the active set is a slice of slot ids, so
//! switching adapters between requests costs nothing.

use candle_core::Tensor;

use super::error::Result;
use super::matrix::WeightMatrix;

/// Index of an adapter slot in a loaded model.
pub type SlotId = usize;

/// The adapters active for one request, with a per-request multiplier of each
/// adapter's own `alpha / r` scale.
pub type ActiveAdapters<'a> = &'a [(SlotId, f32)];

/// One adapter's factors for one layer, stored transposed for `x·Aᵀ·Bᵀ`, the
/// adapter's `alpha / r` already folded into `b_t`.
#[derive(Clone)]
pub(crate) struct LoraFactors {
    pub a_t: Tensor,
    pub b_t: Tensor,
}

impl LoraFactors {
    /// `a`: (r, in), `b`: (out, r) as in PEFT files; `scale` = alpha / r.
    pub fn new(a: &Tensor, b: &Tensor, scale: f64) -> Result<Self> {
        Ok(Self { a_t: a.t()?.contiguous()?, b_t: (b.t()? * scale)?.contiguous()? })
    }

    /// ΔW = scale · B·A, shape (out, in).
    pub fn delta(&self) -> Result<Tensor> {
        Ok(self.a_t.matmul(&self.b_t)?.t()?.contiguous()?)
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
        let mut y = self.weight.forward(x)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        for &(slot, scale) in active {
            let Some(f) = self.adapter(slot) else { continue };
            let mut delta = x.matmul(&f.a_t)?.matmul(&f.b_t)?;
            if scale != 1.0 {
                delta = (delta * scale as f64)?;
            }
            y = (y + delta)?;
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
