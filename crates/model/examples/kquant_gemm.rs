//! Throughput of the k-quant products on a TinyLlama-sized prefill (593 activation rows,
//! 2048 ↔ 5632), on four decoding rows (a batch of streams) and on one, for `Q4_K` and
//! `Q6_K` weights. A tuning aid, not a test:
//!
//! `cargo run --release -p kollava-model --example kquant_gemm [REPEATS] [stream]`
//!
//! Prints the median milliseconds and integer GMAC/s of each product. With `stream`, it
//! times decoding-like chains instead (one row through 2048 → 5632 → 2048, again and again):
//! over 46 distinct weight pairs (570 MiB of `Q4_K`, 830 of `Q6_K`, read from memory, as a
//! TinyLlama token reads its weights) and over one pair 46 times (12 MiB of `Q4_K`, from the
//! L3 cache), in GB/s of weights. The first says how close decoding's products come to the
//! memory's bandwidth, the second what the kernels do when memory is not the limit.
//! `KQ_H` and `KQ_I` change the two widths (2048 and 5632), e.g. to fit the pair in L2.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use kollava_model::kernels::kquant;
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
    if std::env::args().nth(2).as_deref() == Some("stream") {
        return stream(repeats);
    }
    for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
        for (k, n) in [(2048, 2048), (2048, 5632), (5632, 2048)] {
            let w = QTensor::quantize(&Tensor::randn(0f32, 0.02, (n, k), &dev)?, dtype)?;
            for m in [593, 4, 1] {
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

/// Decoding-like chains of products (see the module doc).
fn stream(repeats: usize) -> candle_core::Result<()> {
    use candle_core::quantized::ggml_file::qtensor_from_ggml;
    const PAIRS: usize = 46;
    let dev = Device::Cpu;
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (h, i) = (env("KQ_H", 2048), env("KQ_I", 5632));
    for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
        let up = QTensor::quantize(&Tensor::randn(0f32, 0.02, (i, h), &dev)?, dtype)?;
        let down = QTensor::quantize(&Tensor::randn(0f32, 0.02, (h, i), &dev)?, dtype)?;
        let copies = |w: &QTensor| -> candle_core::Result<Vec<QTensor>> {
            let bytes = w.data()?;
            (0..PAIRS)
                .map(|_| qtensor_from_ggml(dtype, &bytes, w.shape().dims().to_vec(), &dev))
                .collect()
        };
        let (ups, downs) = (copies(&up)?, copies(&down)?);
        let bytes = (up.storage_size_in_bytes() + down.storage_size_in_bytes()) * PAIRS;
        let x = Tensor::randn(0f32, 1.0, (1, h), &dev)?;
        let chain = |pairs: &mut dyn Iterator<Item = (&QTensor, &QTensor)>| {
            let mut x = x.clone();
            for (u, d) in pairs {
                let y = kquant::try_matmul(u, &x)?.expect("a kernel");
                x = (kquant::try_matmul(d, &y)?.expect("a kernel") * 1e-2)?;
            }
            Ok(x)
        };
        let memory = median(repeats, || chain(&mut ups.iter().zip(&downs)))?;
        let cache = median(repeats, || {
            chain(&mut std::iter::repeat_n((&up, &down), PAIRS))
        })?;
        for (from, secs) in [("memory", memory), ("L3 cache", cache)] {
            println!(
                "{dtype:?} one row, {} MiB of weights from {from:8}: {:7.2} ms {:5.1} GB/s",
                bytes >> 20,
                secs * 1e3,
                bytes as f64 / secs / 1e9
            );
        }
    }
    Ok(())
}
