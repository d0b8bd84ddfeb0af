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
