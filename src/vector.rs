//! Small f32 vector routines shared by the hand-written engine kernels and
//! the memory store's similarity scan.

/// Dot product with eight partial sums, so that it vectorises.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += a·x`.
pub(crate) fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// An output buffer that tasks on the thread pool fill in disjoint parts.
#[derive(Clone, Copy)]
pub(crate) struct DisjointWrites(pub *mut f32);
// SAFETY: every user writes only its own range, and the pool joins all tasks
// before the buffer is read again.
unsafe impl Send for DisjointWrites {}
unsafe impl Sync for DisjointWrites {}
impl DisjointWrites {
    pub fn get(self) -> *mut f32 {
        self.0
    }
}
