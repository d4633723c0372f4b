//! Block-quantized weight matrices with our own CPU kernels for the formats
//! small GGUF models ship in (Q4_0, Q4_1, Q8_0).
//!
//! candle has no fast kernel for Q4_1 (the packaged SmolLM2's format) and
//! converting it to another format loses precision; here Q4_0 and Q4_1 share
//! one exact representation (`w = d·q + m`, Q4_0 being `m = -8d`) and one
//! kernel. Decoding multiplies by one activation row at a time: the kernel
//! quantizes the row to 8 bits once and streams each weight row once, split
//! across candle's thread pool; a few rows share each pass over the weights.
//! Long prefills dequantize the matrix and use candle's f32 matmul, which is
//! faster there than integer dot products.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, Layout, Shape, Tensor};
use half::f16;

use super::error::Result;
use super::pool::for_each_chunk;
use crate::vector::{axpy, DisjointWrites};

const BLOCK: usize = 32;
/// Rows are stored in groups of four, interleaved block by block, so that one
/// pass over an activation block serves four rows and their four scales load
/// as one vector.
const GROUP: usize = 4;

/// At or below this many activation rows, multiply with the quantized kernel;
/// above, dequantizing the matrix once and using f32 matmul is faster
/// (measured crossover on a 2-core AVX2 machine: between 64 and 128 rows).
pub const MAX_ROWS_FOR_QUANTIZED_KERNEL: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackedFormat {
    /// `w = d·q + m`, q in 0..16, two per byte (low nibbles are the block's
    /// first 16 columns, high nibbles the last 16). Holds Q4_0 (`m = -8d`) and Q4_1 exactly.
    Q4,
    /// `w = d·q`, q in -127..=127.
    Q8,
}

impl PackedFormat {
    fn block_bytes(self) -> usize {
        match self {
            Self::Q4 => BLOCK / 2,
            Self::Q8 => BLOCK,
        }
    }
}

/// A weight matrix `(rows, cols)` in 32-column blocks. Block `b` of row `r`
/// lives in slot `((r / 4) · blocks_per_row + b) · 4 + r % 4`; rows are padded
/// to a multiple of four with zeros.
pub struct PackedMatrix {
    format: PackedFormat,
    rows: usize,
    cols: usize,
    d: Vec<f16>,
    /// Q4 only.
    m: Vec<f16>,
    qs: Vec<u8>,
}

impl PackedMatrix {
    /// Repacks a GGUF tensor whose format has a kernel here; `None` otherwise.
    pub fn from_qtensor(tensor: &QTensor) -> Result<Option<Self>> {
        let (rows, cols) = tensor.shape().dims2()?;
        let (format, ggml_block_bytes) = match tensor.dtype() {
            GgmlDType::Q4_0 => (PackedFormat::Q4, 18),
            GgmlDType::Q4_1 => (PackedFormat::Q4, 20),
            GgmlDType::Q8_0 => (PackedFormat::Q8, 34),
            _ => return Ok(None),
        };
        if cols % BLOCK != 0 {
            return Ok(None);
        }
        let data = tensor.data()?;
        let nb = cols / BLOCK;
        if data.len() < rows * nb * ggml_block_bytes {
            return Err(candle_core::Error::Msg(format!("quantized tensor data is shorter than its shape {rows}x{cols}")).into());
        }
        let slots = rows.div_ceil(GROUP) * GROUP * nb;
        let mut packed = Self {
            format,
            rows,
            cols,
            d: vec![f16::ZERO; slots],
            m: if format == PackedFormat::Q4 { vec![f16::ZERO; slots] } else { Vec::new() },
            qs: vec![0; slots * format.block_bytes()],
        };
        let half_at = |bytes: &[u8], at: usize| f16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let width = format.block_bytes();
        for (index, block) in data.chunks_exact(ggml_block_bytes).take(rows * nb).enumerate() {
            let slot = packed.slot(index / nb, index % nb);
            let qs = &mut packed.qs[slot * width..(slot + 1) * width];
            match tensor.dtype() {
                // ggml block_q4_0: f16 d, 16 bytes of nibbles (q - 8).
                GgmlDType::Q4_0 => {
                    let d = half_at(block, 0);
                    packed.d[slot] = d;
                    packed.m[slot] = f16::from_f32(-8.0 * d.to_f32());
                    qs.copy_from_slice(&block[2..18]);
                }
                // ggml block_q4_1: f16 d, f16 m, 16 bytes of nibbles.
                GgmlDType::Q4_1 => {
                    packed.d[slot] = half_at(block, 0);
                    packed.m[slot] = half_at(block, 2);
                    qs.copy_from_slice(&block[4..20]);
                }
                // ggml block_q8_0: f16 d, 32 signed bytes; -128 never occurs in
                // ggml's quantizer, clamp so the kernel's sign trick stays exact.
                _ => {
                    packed.d[slot] = half_at(block, 0);
                    for (dst, &src) in qs.iter_mut().zip(&block[2..34]) {
                        *dst = (src as i8).max(-127) as u8;
                    }
                }
            }
        }
        Ok(Some(packed))
    }

    pub fn format(&self) -> PackedFormat {
        self.format
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / BLOCK
    }

    fn slot(&self, row: usize, block: usize) -> usize {
        ((row / GROUP) * self.blocks_per_row() + block) * GROUP + row % GROUP
    }

    /// Writes the 32 weights of block `b` of row `r` to `dst`.
    fn decode_block(&self, r: usize, b: usize, dst: &mut [f32]) {
        let slot = self.slot(r, b);
        let d = self.d[slot].to_f32();
        match self.format {
            PackedFormat::Q4 => {
                let m = self.m[slot].to_f32();
                for (j, &byte) in self.qs[slot * 16..(slot + 1) * 16].iter().enumerate() {
                    dst[j] = d * f32::from(byte & 0x0f) + m;
                    dst[j + 16] = d * f32::from(byte >> 4) + m;
                }
            }
            PackedFormat::Q8 => {
                for (x, &q) in dst.iter_mut().zip(&self.qs[slot * BLOCK..(slot + 1) * BLOCK]) {
                    *x = d * f32::from(q as i8);
                }
            }
        }
    }

    fn decode_row(&self, r: usize, dst: &mut [f32]) {
        for (b, chunk) in dst.chunks_exact_mut(BLOCK).enumerate() {
            self.decode_block(r, b, chunk);
        }
    }

    /// The matrix as f32 `(rows, cols)`.
    pub fn dequantize(&self) -> Result<Tensor> {
        let (rows, cols) = (self.rows, self.cols);
        let mut out = vec![0f32; rows * cols];
        let out_ptr = DisjointWrites(out.as_mut_ptr());
        for_each_chunk(rows, 16, |range| {
            for r in range {
                // SAFETY: each row of `out` is written by exactly one task.
                self.decode_row(r, unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(r * cols), cols) });
            }
        });
        Ok(Tensor::from_vec(out, (rows, cols), &candle_core::Device::Cpu)?)
    }

    /// Rows `ids` as f32 `(ids.len(), cols)`: the embedding lookup of a tied table.
    pub fn rows_f32(&self, ids: &[u32]) -> Result<Tensor> {
        let cols = self.cols;
        let mut out = vec![0f32; ids.len() * cols];
        for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(cols)) {
            if id as usize >= self.rows {
                return Err(candle_core::Error::Msg(format!("token id {id} is outside the vocabulary of {}", self.rows)).into());
            }
            self.decode_row(id as usize, dst);
        }
        Ok(Tensor::from_vec(out, (ids.len(), cols), &candle_core::Device::Cpu)?)
    }

    /// `y[r] = Σ_c w[r][c]·x[c]` for one activation row.
    pub fn gemv(&self, x: &[f32], y: &mut [f32]) {
        Self::gemv_shared(&mut [GemvJob { weight: self, out: y, low_rank: Vec::new() }], x);
    }

    /// Several matrices with the same number of columns times one activation
    /// row, in a single pass over the thread pool (q/k/v, gate/up): the row is
    /// quantized once and the pool is woken once. Each job's low-rank terms
    /// (LoRA's B·h) are added row by row in the same pass.
    pub fn gemv_shared(jobs: &mut [GemvJob], x: &[f32]) {
        let act = QuantizedRow::new(x);
        // Group index ranges of each job, laid end to end.
        let mut starts = Vec::with_capacity(jobs.len() + 1);
        starts.push(0);
        for job in jobs.iter() {
            debug_assert_eq!(job.weight.cols, x.len());
            debug_assert_eq!(job.out.len(), job.weight.rows);
            starts.push(starts.last().copied().unwrap_or(0) + job.weight.rows.div_ceil(GROUP));
        }
        let out_ptrs: Vec<DisjointWrites> = jobs.iter_mut().map(|job| DisjointWrites(job.out.as_mut_ptr())).collect();
        let jobs: &[GemvJob] = jobs;
        let total = starts.last().copied().unwrap_or(0);
        for_each_chunk(total, 8, |range| {
            // The range may span several jobs: handle it job by job.
            let mut flat = range.start;
            while flat < range.end {
                let index = starts.partition_point(|&s| s <= flat) - 1;
                let (job, out_ptr) = (&jobs[index], out_ptrs[index]);
                let w = job.weight;
                let groups = (flat - starts[index])..(range.end.min(starts[index + 1]) - starts[index]);
                flat += groups.len();
                let rows = (groups.start * GROUP)..(groups.end * GROUP).min(w.rows);
                // SAFETY: each group of rows of each output is written by exactly one task.
                let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(rows.start), rows.len()) };
                for g in groups {
                    let sums = dot_group(w, g, &act);
                    let first = g * GROUP - rows.start;
                    let count = (out.len() - first).min(GROUP);
                    out[first..first + count].copy_from_slice(&sums[..count]);
                }
                for term in &job.low_rank {
                    for (h, b_row) in term.h.iter().zip(term.b_t.chunks_exact(w.rows)) {
                        axpy(*h, &b_row[rows.clone()], out);
                    }
                }
            }
        });
    }

    /// `y = x·Wᵀ` for several activation rows `(tokens, cols)`: each group of
    /// four weight rows is read once and, while it sits in L1, multiplied by
    /// every activation row.
    pub fn gemm(&self, x: &[f32], y: &mut [f32]) {
        let tokens = x.len() / self.cols;
        let acts: Vec<QuantizedRow> = x.chunks_exact(self.cols).map(QuantizedRow::new).collect();
        let y_ptr = DisjointWrites(y.as_mut_ptr());
        for_each_chunk(self.rows.div_ceil(GROUP), 8, |range| {
            for g in range {
                let first = g * GROUP;
                let count = (self.rows - first).min(GROUP);
                for (t, act) in acts.iter().enumerate().take(tokens) {
                    let sums = dot_group(self, g, act);
                    // SAFETY: rows `first..first + count` of every token are written by this task only.
                    let out = unsafe { std::slice::from_raw_parts_mut(y_ptr.get().add(t * self.rows + first), count) };
                    out.copy_from_slice(&sums[..count]);
                }
            }
        });
    }
}

/// One matrix-vector product of a [`PackedMatrix::gemv_shared`] pass.
pub struct GemvJob<'a> {
    pub weight: &'a PackedMatrix,
    pub out: &'a mut [f32],
    pub low_rank: Vec<LowRank<'a>>,
}

/// A low-rank addend `B·h`: `b_t` is Bᵀ, `(rank, rows)` row-major, `h` has `rank` values.
pub struct LowRank<'a> {
    pub b_t: &'a [f32],
    pub h: &'a [f32],
}

/// One activation row quantized like the weights: per 32-block a scale `d`,
/// `s = d·Σq` (for the Q4 offset term) and 32 signed bytes.
struct QuantizedRow {
    d: Vec<f32>,
    s: Vec<f32>,
    q: Vec<i8>,
}

impl QuantizedRow {
    fn new(x: &[f32]) -> Self {
        let nb = x.len() / BLOCK;
        let mut row = Self { d: Vec::with_capacity(nb), s: Vec::with_capacity(nb), q: vec![0; x.len()] };
        for (block, q) in x.chunks_exact(BLOCK).zip(row.q.chunks_exact_mut(BLOCK)) {
            let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (qi, &v) in q.iter_mut().zip(block) {
                *qi = (v * inv).round() as i8;
                sum += i32::from(*qi);
            }
            row.d.push(d);
            row.s.push(d * sum as f32);
        }
        row
    }
}

/// Dot products of the four rows of group `g` with the activation row.
fn dot_group(w: &PackedMatrix, g: usize, act: &QuantizedRow) -> [f32; GROUP] {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2::available() {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked above).
            return unsafe {
                match w.format {
                    PackedFormat::Q4 => avx2::dot_group_q4(w, g, act),
                    PackedFormat::Q8 => avx2::dot_group_q8(w, g, act),
                }
            };
        }
    }
    dot_group_portable(w, g, act)
}

fn dot_group_portable(w: &PackedMatrix, g: usize, act: &QuantizedRow) -> [f32; GROUP] {
    let mut out = [0f32; GROUP];
    for (k, y) in out.iter_mut().enumerate() {
        let r = g * GROUP + k;
        for b in 0..w.blocks_per_row() {
            let slot = w.slot(r, b);
            let qx = &act.q[b * BLOCK..(b + 1) * BLOCK];
            let d = w.d[slot].to_f32() * act.d[b];
            match w.format {
                PackedFormat::Q4 => {
                    let mut sum = 0i32;
                    for (j, &byte) in w.qs[slot * 16..(slot + 1) * 16].iter().enumerate() {
                        sum += i32::from(byte & 0x0f) * i32::from(qx[j]) + i32::from(byte >> 4) * i32::from(qx[j + 16]);
                    }
                    *y += d * sum as f32 + w.m[slot].to_f32() * act.s[b];
                }
                PackedFormat::Q8 => {
                    let qw = &w.qs[slot * BLOCK..(slot + 1) * BLOCK];
                    let sum: i32 = qw.iter().zip(qx).map(|(&a, &b)| i32::from(a as i8) * i32::from(b)).sum();
                    *y += d * sum as f32;
                }
            }
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    use super::{PackedMatrix, QuantizedRow, BLOCK, GROUP};

    pub fn available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c"))
    }

    /// Sum of the 32 products of unsigned `a` and signed `b` bytes, as 8 i32 lanes.
    #[inline(always)]
    unsafe fn dot_u8_i8(a: __m256i, b: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
    }

    /// `[Σs0, Σs1, Σs2, Σs3]` of four 8-lane vectors.
    #[inline(always)]
    unsafe fn sum4(s0: __m256i, s1: __m256i, s2: __m256i, s3: __m256i) -> __m128 {
        let t = _mm256_hadd_epi32(_mm256_hadd_epi32(s0, s1), _mm256_hadd_epi32(s2, s3));
        _mm_cvtepi32_ps(_mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1)))
    }

    /// Four f16 scales of one slot group as f32.
    #[inline(always)]
    unsafe fn scales(v: &[half::f16], slot: usize) -> __m128 {
        _mm_cvtph_ps(_mm_loadl_epi64(v.as_ptr().add(slot) as *const __m128i))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_group_q4(w: &PackedMatrix, g: usize, act: &QuantizedRow) -> [f32; GROUP] {
        let nb = w.blocks_per_row();
        let low = _mm256_set1_epi8(0x0f);
        let nibbles = |p: *const u8| {
            let packed = _mm_loadu_si128(p as *const __m128i);
            // Low nibbles are columns 0..16, high nibbles 16..32.
            _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low)
        };
        let mut acc = _mm_setzero_ps();
        let mut offset = _mm_setzero_ps();
        for b in 0..nb {
            let slot = (g * nb + b) * GROUP;
            let qx = _mm256_loadu_si256(act.q.as_ptr().add(b * BLOCK) as *const __m256i);
            let p = w.qs.as_ptr().add(slot * 16);
            let sums = sum4(
                dot_u8_i8(nibbles(p), qx),
                dot_u8_i8(nibbles(p.add(16)), qx),
                dot_u8_i8(nibbles(p.add(32)), qx),
                dot_u8_i8(nibbles(p.add(48)), qx),
            );
            acc = _mm_fmadd_ps(sums, _mm_mul_ps(scales(&w.d, slot), _mm_set1_ps(act.d[b])), acc);
            offset = _mm_fmadd_ps(scales(&w.m, slot), _mm_set1_ps(act.s[b]), offset);
        }
        let mut out = [0f32; GROUP];
        _mm_storeu_ps(out.as_mut_ptr(), _mm_add_ps(acc, offset));
        out
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_group_q8(w: &PackedMatrix, g: usize, act: &QuantizedRow) -> [f32; GROUP] {
        let nb = w.blocks_per_row();
        // maddubs wants one unsigned operand: |w| · (x with w's sign).
        let dot = |p: *const u8, qx: __m256i| {
            let qw = _mm256_loadu_si256(p as *const __m256i);
            dot_u8_i8(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw))
        };
        let mut acc = _mm_setzero_ps();
        for b in 0..nb {
            let slot = (g * nb + b) * GROUP;
            let qx = _mm256_loadu_si256(act.q.as_ptr().add(b * BLOCK) as *const __m256i);
            let p = w.qs.as_ptr().add(slot * BLOCK);
            let sums = sum4(dot(p, qx), dot(p.add(32), qx), dot(p.add(64), qx), dot(p.add(96), qx));
            acc = _mm_fmadd_ps(sums, _mm_mul_ps(scales(&w.d, slot), _mm_set1_ps(act.d[b])), acc);
        }
        let mut out = [0f32; GROUP];
        _mm_storeu_ps(out.as_mut_ptr(), acc);
        out
    }
}

/// `x·Wᵀ` for activations `(tokens, cols)` as a candle op, so that it slots
/// into the rest of the graph.
impl candle_core::CustomOp1 for PackedMatrix {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else { candle_core::bail!("packed matmul expects f32 activations") };
        let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("packed matmul expects contiguous activations") };
        let x = &data[start..end];
        let (rows, cols) = (self.rows(), self.cols());
        let mut dims = layout.shape().dims().to_vec();
        if dims.last() != Some(&cols) {
            candle_core::bail!("packed matmul: activations {:?} do not end in {cols}", dims);
        }
        let tokens = x.len() / cols;
        let mut y = vec![0f32; tokens * rows];
        if tokens == 1 {
            self.gemv(x, &mut y);
        } else {
            self.gemm(x, &mut y);
        }
        if let Some(last) = dims.last_mut() {
            *last = rows;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn matrix(rows: usize, cols: usize, seed: u32) -> Tensor {
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0) - 0.5)
            .collect();
        Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn kernels_match_dequantized_matmul_for_every_format() {
        let w = matrix(67, 96, 1);
        let x = matrix(3, 96, 2);
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let packed = PackedMatrix::from_qtensor(&q).unwrap().unwrap();
            // Repacking is exact: the dequantized matrices agree with candle's.
            let ours = packed.dequantize().unwrap();
            let theirs = q.dequantize(&Device::Cpu).unwrap();
            assert_eq!((ours.clone() - &theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0, "{dtype:?}");
            // The kernel only adds the rounding of activations to 8 bits.
            let expected = x.matmul(&theirs.t().unwrap()).unwrap();
            let got = x.apply_op1_no_bwd(&packed).unwrap();
            let err = (got - &expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = expected.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err < 0.02 * scale, "{dtype:?}: error {err} vs scale {scale}");
            // Several rows at once give exactly what one row at a time gives.
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut batched = vec![0f32; 3 * 67];
            packed.gemm(&xs, &mut batched);
            for (row, expected) in xs.chunks_exact(96).zip(batched.chunks_exact(67)) {
                let mut single = vec![0f32; 67];
                packed.gemv(row, &mut single);
                assert_eq!(single, expected, "{dtype:?}: gemm and gemv differ");
            }
            // And equals the portable kernel up to float summation order,
            // including the zero-padded last group.
            let act = QuantizedRow::new(&x.get(0).unwrap().to_vec1::<f32>().unwrap());
            let (portable, fast) = (dot_group_portable(&packed, 16, &act), dot_group(&packed, 16, &act));
            for (a, b) in portable.iter().zip(&fast) {
                assert!((a - b).abs() < 1e-4, "{dtype:?}: portable {a} vs fast {b}");
            }
        }
    }

    #[test]
    fn formats_without_a_kernel_are_left_to_candle() {
        let w = matrix(8, 256, 3);
        assert!(PackedMatrix::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q4K).unwrap()).unwrap().is_none());
        assert!(PackedMatrix::from_qtensor(&QTensor::quantize(&w, GgmlDType::F32).unwrap()).unwrap().is_none());
    }
}
