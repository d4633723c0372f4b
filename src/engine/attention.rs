//! Attention of one new token over the key/value cache, as a single op.
//!
//! Decoding runs this once per layer per token; done with generic tensor ops
//! it is a dozen small ops (and two tiny matmuls) whose fixed costs outweigh
//! the arithmetic, so it is written out here over the cache buffers.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape};

use super::vector::{axpy, dot};

/// `q`: `(1, heads, 1, head_dim)`; keys and values: `(1, kv_heads, capacity,
/// head_dim)` caches whose first `len` positions are valid. Output:
/// `(1, heads·head_dim)`, heads in order.
pub(crate) struct SingleTokenAttention {
    pub len: usize,
}

impl CustomOp3 for SingleTokenAttention {
    fn name(&self) -> &'static str {
        "single-token-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) = match (q, k, v) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => (q, k, v),
            _ => candle_core::bail!("single-token attention expects f32"),
        };
        let (Some((q0, q1)), Some((k0, k1)), Some((v0, v1))) =
            (q_layout.contiguous_offsets(), k_layout.contiguous_offsets(), v_layout.contiguous_offsets())
        else {
            candle_core::bail!("single-token attention expects contiguous tensors")
        };
        let (_, heads, _, hd) = q_layout.shape().dims4()?;
        let (_, kv_heads, capacity, _) = k_layout.shape().dims4()?;
        if self.len > capacity || heads % kv_heads != 0 {
            candle_core::bail!("single-token attention: {} positions in a cache of {capacity}", self.len);
        }
        let (q, k, v) = (&q[q0..q1], &k[k0..k1], &v[v0..v1]);
        let group = heads / kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0f32; heads * hd];
        let mut scores = vec![0f32; self.len];
        for h in 0..heads {
            let kv = h / group;
            let query = &q[h * hd..(h + 1) * hd];
            let keys = &k[kv * capacity * hd..][..self.len * hd];
            let values = &v[kv * capacity * hd..][..self.len * hd];
            let mut max = f32::NEG_INFINITY;
            for (score, key) in scores.iter_mut().zip(keys.chunks_exact(hd)) {
                *score = dot(query, key) * scale;
                max = max.max(*score);
            }
            let mut total = 0.0;
            for score in scores.iter_mut() {
                *score = (*score - max).exp();
                total += *score;
            }
            let o = &mut out[h * hd..(h + 1) * hd];
            for (&p, value) in scores.iter().zip(values.chunks_exact(hd)) {
                axpy(p / total, value, o);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((1, heads * hd))))
    }
}
