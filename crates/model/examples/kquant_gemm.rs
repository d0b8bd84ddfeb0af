//! Throughput of the k-quant products on a TinyLlama-sized prefill (593 activation rows,
//! 2048 ↔ 5632) and on one decoding row, for `Q4_K` and `Q6_K` weights. A tuning aid, not a
//! test:
//!
//! `cargo run --release -p kollava-model --example kquant_gemm [REPEATS]`
//!
//! Prints the median milliseconds and integer GMAC/s of each product.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use kollava_model::kquant;
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    if !kquant::available() {
        eprintln!("this CPU runs none of the k-quant kernels (AVX512-VNNI or AVX2)");
        std::process::exit(1);
    }
    let repeats: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let dev = Device::Cpu;
    for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
        for (k, n) in [(2048, 2048), (2048, 5632), (5632, 2048)] {
            let w = QTensor::quantize(&Tensor::randn(0f32, 0.02, (n, k), &dev)?, dtype)?;
            for m in [593, 1] {
                if m > kquant::max_rows() {
                    continue;
                }
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
                let secs = median(repeats, || {
                    kquant::try_matmul(&w, &x)?
                        .ok_or_else(|| candle_core::Error::Msg("no kernel".into()))
                })?;
                println!(
                    "{dtype:?} {m:>4} x {k:>4} -> {n:>4}: {:8.2} ms {:6.1} GMAC/s",
                    secs * 1e3,
                    (m * k * n) as f64 / secs / 1e9
                );
            }
        }
    }
    Ok(())
}

/// Median seconds of `repeats` runs of `f`, after one warm-up.
fn median(repeats: usize, f: impl Fn() -> candle_core::Result<Tensor>) -> candle_core::Result<f64> {
    f()?;
    let mut times = (0..repeats)
        .map(|_| {
            let t = Instant::now();
            f().map(|_| t.elapsed().as_secs_f64())
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
