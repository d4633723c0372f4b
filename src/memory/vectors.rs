//! The embedding matrix (one contiguous row per live memory) and the base64 form in which
//! embeddings are written to the log.
//!
//! A brute-force pass over 100k × 384 f32s reads 150 MB and is bound by memory bandwidth
//! (≈13 ms), over half the retrieval budget. So the pass runs over an int8 copy (a quarter
//! of the bytes, one scale per row) and only its best candidates are rescored exactly.

use crate::vector::dot;

/// How many approximate candidates per wanted result are rescored with the f32 rows;
/// int8 rounding moves a cosine by about 0.005, far less than the gaps this pool spans.
const RESCORE_FACTOR: usize = 4;

/// Row-major embeddings, their int8 codes and inverse norms.
#[derive(Debug, Default)]
pub(super) struct Matrix {
    dimension: usize,
    values: Vec<f32>,
    inverse_norms: Vec<f32>,
    codes: Vec<i8>,
    /// Per row: the value one code step stands for.
    scales: Vec<f32>,
}

impl Matrix {
    pub(super) fn new(dimension: usize) -> Matrix {
        Matrix { dimension, ..Matrix::default() }
    }

    pub(super) fn dimension(&self) -> usize {
        self.dimension
    }

    pub(super) fn row(&self, row: usize) -> &[f32] {
        &self.values[row * self.dimension..(row + 1) * self.dimension]
    }

    /// The caller checked the length (`State::check_embedding`).
    pub(super) fn push(&mut self, embedding: &[f32]) {
        self.values.extend_from_slice(embedding);
        self.inverse_norms.push(inverse_norm(embedding));
        let scale = quantize_into(embedding, &mut self.codes);
        self.scales.push(scale);
    }

    pub(super) fn set(&mut self, row: usize, embedding: &[f32]) {
        let dimension = self.dimension;
        self.values[row * dimension..(row + 1) * dimension].copy_from_slice(embedding);
        self.inverse_norms[row] = inverse_norm(embedding);
        let mut codes = Vec::with_capacity(dimension);
        self.scales[row] = quantize_into(embedding, &mut codes);
        self.codes[row * dimension..(row + 1) * dimension].copy_from_slice(&codes);
    }

    /// Removes `row` by moving the last row into its place, like `Vec::swap_remove`.
    pub(super) fn swap_remove(&mut self, row: usize) {
        let dimension = self.dimension;
        let last = self.inverse_norms.len() - 1;
        if row != last {
            self.values.copy_within(last * dimension..(last + 1) * dimension, row * dimension);
            self.codes.copy_within(last * dimension..(last + 1) * dimension, row * dimension);
        }
        self.values.truncate(last * dimension);
        self.codes.truncate(last * dimension);
        self.inverse_norms.swap_remove(row);
        self.scales.swap_remove(row);
    }

    /// The `limit` rows for which `keep` holds with the highest cosine to `query`, best
    /// first, as (cosine, row); `tie` orders equal cosines.
    pub(super) fn nearest<K: Ord>(
        &self,
        query: &[f32],
        limit: usize,
        keep: impl Fn(usize) -> bool,
        tie: impl Fn(usize) -> K,
    ) -> Vec<(f32, usize)> {
        let mut query_codes = Vec::with_capacity(self.dimension);
        // The query's scale and norm are the same for every row: the approximate ranking
        // leaves them out.
        quantize_into(query, &mut query_codes);
        let mut approximate: Vec<(f32, usize)> = self
            .codes
            .chunks_exact(self.dimension)
            .enumerate()
            .filter(|(row, _)| keep(*row))
            .map(|(row, codes)| (dot_i8(codes, &query_codes) as f32 * self.scales[row] * self.inverse_norms[row], row))
            .collect();
        let pool = limit.saturating_mul(RESCORE_FACTOR);
        if approximate.len() > pool {
            approximate.select_nth_unstable_by(pool, |a, b| b.0.total_cmp(&a.0));
            approximate.truncate(pool);
        }
        let query_inverse = inverse_norm(query);
        let mut exact: Vec<(f32, usize)> =
            approximate.into_iter().map(|(_, row)| (dot(self.row(row), query) * self.inverse_norms[row] * query_inverse, row)).collect();
        exact.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then_with(|| tie(a.1).cmp(&tie(b.1))));
        exact.truncate(limit);
        exact
    }
}

/// Appends the int8 codes of `values` and returns their scale (`value ≈ code × scale`).
fn quantize_into(values: &[f32], codes: &mut Vec<i8>) -> f32 {
    let largest = values.iter().fold(0f32, |largest, value| largest.max(value.abs()));
    let scale = if largest > 0.0 { largest / 127.0 } else { 1.0 };
    codes.extend(values.iter().map(|value| (value / scale).round().clamp(-127.0, 127.0) as i8));
    scale
}

/// Sixteen independent i32 partial sums, which the compiler turns into widening SIMD
/// multiply-adds.
fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    let mut sums = [0i32; 16];
    let (a_chunks, b_chunks) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: i32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(x, y)| i32::from(*x) * i32::from(*y)).sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for lane in 0..16 {
            sums[lane] += i32::from(x[lane]) * i32::from(y[lane]);
        }
    }
    sums.iter().sum::<i32>() + tail
}

pub(super) fn norm(vector: &[f32]) -> f32 {
    dot(vector, vector).sqrt()
}

fn inverse_norm(vector: &[f32]) -> f32 {
    1.0 / norm(vector)
}

/// Serde for `Vec<f32>` as standard base64 (with padding) of the little-endian bytes.
pub(super) mod base64_f32 {
    use serde::{de, Deserialize, Deserializer, Serializer};

    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn serialize<S: Serializer>(values: &[f32], serializer: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = values.iter().flat_map(|value| value.to_le_bytes()).collect();
        serializer.serialize_str(&encode(&bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<f32>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        let bytes = decode(&text).ok_or_else(|| de::Error::custom("embedding is not valid base64"))?;
        if !bytes.len().is_multiple_of(4) {
            return Err(de::Error::custom(format!("embedding has {} bytes, not a whole number of f32s", bytes.len())));
        }
        Ok(bytes.chunks_exact(4).map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]])).collect())
    }

    pub(in crate::memory) fn encode(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let n = (u32::from(chunk[0]) << 16) | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8) | u32::from(*chunk.get(2).unwrap_or(&0));
            for position in 0..4 {
                if position <= chunk.len() {
                    out.push(ALPHABET[(n >> (18 - 6 * position)) as usize & 63] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    pub(in crate::memory) fn decode(text: &str) -> Option<Vec<u8>> {
        let text = text.as_bytes();
        if !text.len().is_multiple_of(4) {
            return None;
        }
        let mut out = Vec::with_capacity(text.len() / 4 * 3);
        for (index, chunk) in text.chunks(4).enumerate() {
            let last = index + 1 == text.len() / 4;
            let padding = chunk.iter().rev().take_while(|&&c| c == b'=').count();
            if padding > 2 || (padding > 0 && !last) {
                return None;
            }
            let mut n = 0u32;
            for &c in &chunk[..4 - padding] {
                n = (n << 6) | u32::from(sextet(c)?);
            }
            n <<= 6 * padding as u32;
            let decoded = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            out.extend_from_slice(&decoded[..3 - padding]);
        }
        Some(out)
    }

    fn sextet(c: u8) -> Option<u8> {
        match c {
            b'A'..=b'Z' => Some(c - b'A'),
            b'a'..=b'z' => Some(c - b'a' + 26),
            b'0'..=b'9' => Some(c - b'0' + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
}
