//! Linear layers that carry LoRA adapters applied at run time:
//! `y = W·x + b + Σ scale_i · B_i(A_i·x)` over the adapters active for the
//! current request. Choosing the active set is a slice of slot ids, so
//! switching adapters between requests costs nothing.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use super::error::Result;

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
    weight: Arc<QTensor>,
    matmul: QMatMul,
    bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
    adapters: Vec<(SlotId, LoraFactors)>,
}

impl LoraLinear {
    pub fn new(weight: Arc<QTensor>, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.shape().dims2()?;
        let matmul = QMatMul::from_arc(weight.clone())?;
        Ok(Self { weight, matmul, bias, in_features, out_features, adapters: Vec::new() })
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
        let mut y = self.matmul.forward(x)?;
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
    pub fn fold(&mut self, slot: SlotId, scale: f32, device: &Device) -> Result<()> {
        let Some(f) = self.adapter(slot) else { return Ok(()) };
        let dense = self.weight.dequantize(device)?;
        let merged = (dense + (f.delta()? * scale as f64)?)?;
        let weight = Arc::new(QTensor::quantize(&merged, self.weight.dtype())?);
        self.matmul = QMatMul::from_arc(weight.clone())?;
        self.weight = weight;
        self.remove_adapter(slot);
        Ok(())
    }
}
