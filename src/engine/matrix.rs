//! A linear layer's weight in whichever form multiplies fastest: our packed
//! kernels for Q4_0/Q4_1/Q8_0, candle's `QMatMul` for everything else.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use super::error::Result;
use super::quant::{PackedFormat, PackedMatrix, MAX_ROWS_FOR_QUANTIZED_KERNEL};

pub enum WeightMatrix {
    Packed(PackedMatrix),
    Candle(QMatMul),
}

impl WeightMatrix {
    pub fn new(weight: QTensor) -> Result<Self> {
        Ok(match PackedMatrix::from_qtensor(&weight)? {
            Some(packed) => Self::Packed(packed),
            None => Self::Candle(QMatMul::from_qtensor(weight)?),
        })
    }

    /// `(out_features, in_features)`.
    pub fn shape(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Self::Packed(p) => (p.rows(), p.cols()),
            Self::Candle(QMatMul::QTensor(q)) => q.shape().dims2()?,
            Self::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.dims2()?,
        })
    }

    /// `x·Wᵀ` for `x` of shape `(tokens, in_features)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Packed(p) if x.dim(0)? <= MAX_ROWS_FOR_QUANTIZED_KERNEL => x.contiguous()?.apply_op1_no_bwd(p)?,
            // Many rows: f32 matmul beats integer dot products; the dequantized
            // copy lives only for this call.
            Self::Packed(p) => x.matmul(&p.dequantize()?.t()?)?,
            Self::Candle(m) => m.forward(x)?,
        })
    }

    pub fn as_packed(&self) -> Option<&PackedMatrix> {
        match self {
            Self::Packed(p) => Some(p),
            Self::Candle(_) => None,
        }
    }

    /// Rows `ids` as f32: the lookup of an embedding table.
    pub fn embedding(&self, ids: &[u32]) -> Result<Tensor> {
        Ok(match self {
            Self::Packed(p) => p.rows_f32(ids)?,
            Self::Candle(QMatMul::QTensor(q)) => q.embedding(&Tensor::new(ids, &Device::Cpu)?)?,
            Self::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.embedding(&Tensor::new(ids, &Device::Cpu)?)?.to_dtype(candle_core::DType::F32)?
            }
        })
    }

    pub fn dequantize(&self) -> Result<Tensor> {
        Ok(match self {
            Self::Packed(p) => p.dequantize()?,
            Self::Candle(QMatMul::QTensor(q)) => q.dequantize(&Device::Cpu)?,
            Self::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.to_dtype(candle_core::DType::F32)?,
        })
    }

    /// The same weight plus `delta`, stored in the same format (quantized
    /// formats round the sum).
    pub fn with_added(&self, delta: &Tensor) -> Result<Self> {
        let sum = (self.dequantize()? + delta)?;
        let dtype = match self {
            // Q4_1 holds both Q4_0 and Q4_1 weights without loss.
            Self::Packed(p) if p.format() == PackedFormat::Q4 => GgmlDType::Q4_1,
            Self::Packed(_) => GgmlDType::Q8_0,
            Self::Candle(QMatMul::QTensor(q)) => q.dtype(),
            Self::Candle(QMatMul::Tensor(_) | QMatMul::TensorF16(_)) => return Ok(Self::Candle(QMatMul::Tensor(sum))),
        };
        Self::new(QTensor::quantize(&sum, dtype)?)
    }
}
