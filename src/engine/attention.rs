//! Attention of one new token over the key/value cache, as a single op.
//!
//! Decoding runs this once per layer per token; done with generic tensor ops
//! it is a dozen small ops (and two tiny matmuls) whose fixed costs outweigh
//! the arithmetic, so it is written out here over the cache buffers.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape};

use crate::vector::{axpy, dot, DisjointWrites};

/// Multiply-adds below which the heads are computed on the calling thread.
const PARALLEL_WORK: usize = 32 * 1024;

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
        let len = self.len;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0f32; heads * hd];
        let out_ptr = DisjointWrites(out.as_mut_ptr());
        let head = |h: usize| {
            let kv = h / group;
            let query = &q[h * hd..(h + 1) * hd];
            let keys = &k[kv * capacity * hd..][..len * hd];
            let values = &v[kv * capacity * hd..][..len * hd];
            let mut scores: Vec<f32> = keys.chunks_exact(hd).map(|key| dot(query, key) * scale).collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut total = 0.0;
            for score in scores.iter_mut() {
                *score = (*score - max).exp();
                total += *score;
            }
            // SAFETY: head `h` writes only its own `hd` outputs.
            let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(h * hd), hd) };
            for (&p, value) in scores.iter().zip(values.chunks_exact(hd)) {
                axpy(p / total, value, o);
            }
        };
        // Short contexts are cheaper than waking the pool.
        if len * heads * hd < PARALLEL_WORK {
            (0..heads).for_each(head);
        } else {
            super::pool::for_each_chunk(heads, 1, |range| range.for_each(head));
        }
        Ok((CpuStorage::F32(out), Shape::from((1, heads * hd))))
    }
}
