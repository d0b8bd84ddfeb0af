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
