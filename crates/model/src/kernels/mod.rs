//! Our CPU kernels, apart from the graphs that call them: the bf16 GEMM and GEMV (also over
//! ggml blocks, with AMX tiles where the CPU has them), the k-quant matrix-vector and tiled
//! prefill kernels, block attention for prompts and the tower, decoding attention, the
//! row softmax they share, and training's attention (forward and backward without the
//! score matrices kept) and loss head (the logits kept alone). [`cpu`] is the one place that detects what the CPU can run (and
//! reads `KOLLAVA_KERNELS`); every kernel asks it.

pub mod bf16;
pub(crate) mod block_attention;
pub mod cpu;
pub mod cross_entropy;
pub(crate) mod decode_attention;
pub mod kquant;
mod prefetch;
pub(crate) mod softmax;
pub mod train_attention;

/// An attention's extents: batch rows, query and key/value heads, query and key positions,
/// head width (the prompt kernels' and training's).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub b: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub s: usize,
    pub t: usize,
    pub d: usize,
}

impl Dims {
    /// Query heads per key/value head.
    pub fn rep(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// `dst (m×n) = [dst +] alpha · a (m×k) · b (k×n)` by `gemm` (candle's own matrix kernels),
/// `a` and `b` given by their (row, column) strides, `dst` row-major. `parallel`: on the
/// thread pool; without it one thread (callers that parallelise over heads themselves).
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    add: bool,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    alpha: f32,
    parallel: bool,
) {
    assert!(dst.len() >= m * n, "sgemm: a destination too small");
    assert!(m == 0 || k == 0 || a.len() > (m - 1) * a_rs + (k - 1) * a_cs);
    assert!(k == 0 || n == 0 || b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    let threads = rayon::current_num_threads();
    let par = if parallel && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above: every element the strides reach is inside its slice, and
    // `dst` is a unique borrow.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            add,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        )
    }
}
