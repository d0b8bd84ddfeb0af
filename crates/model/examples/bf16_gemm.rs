//! Throughput of the bf16 GEMM on the shapes that dominate time to first token: the CLIP
//! ViT-L/14-336 tower (577 rows, 1024 ↔ 4096) and a TinyLlama-sized prefill (593 rows,
//! 2048 ↔ 5632). A tuning aid, not a test:
//!
//! `cargo run --release -p kollava-model --example bf16_gemm [REPEATS [SHAPE]]`
//!
//! Prints the median GFLOP/s of each shape (or only of shape number `SHAPE`, counted from
//! 0, which is what to profile) and of their flop-weighted sum. `OURS_ONLY=1` skips candle's
//! GEMM; `FASTEST=1` reports the fastest run instead of the median (steadier for A/B runs on a
//! shared machine).

use candle_core::{Device, Tensor};
use kollava_model::kernels::bf16::{self, PackedBf16};
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let Some(kernels) = bf16::kernels() else {
        eprintln!("this CPU runs none of the bf16 kernels (AVX512-BF16 or AVX2+FMA)");
        std::process::exit(1);
    };
    let repeats: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(7);
    // (rows, in, out): q/k/v/o, fc1, fc2 of the tower; q, gate/up, down of the decoder.
    let shapes = [
        (577, 1024, 1024),
        (577, 1024, 4096),
        (577, 4096, 1024),
        (593, 2048, 2048),
        (593, 2048, 5632),
        (593, 5632, 2048),
    ];
    let dev = Device::Cpu;
    let (mut flops, mut secs) = (0f64, [0f64; 2]);
    let only: Option<usize> = std::env::args().nth(2).and_then(|a| a.parse().ok());
    let shapes = shapes
        .into_iter()
        .enumerate()
        .filter(|&(i, _)| only.is_none_or(|o| o == i))
        .map(|(_, s)| s);
    for (m, k, n) in shapes {
        let wf = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
        let w = PackedBf16::pack(&wf)?;
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let ours = median(repeats, || w.matmul(&x))?;
        // candle's f32 GEMM on the same shapes: what a CPU without our kernels gets.
        let wt = wf.t()?;
        let candle = if std::env::var_os("OURS_ONLY").is_some() {
            f64::NAN
        } else {
            median(repeats, || x.matmul(&wt))?
        };
        let f = 2.0 * (m * k * n) as f64;
        println!(
            "{m:>4} x {k:>4} -> {n:>4}: ours {:7.2} ms {:6.1} GFLOP/s   candle f32 {:7.2} ms {:6.1} GFLOP/s",
            ours * 1e3,
            f / ours / 1e9,
            candle * 1e3,
            f / candle / 1e9
        );
        flops += f;
        secs[0] += ours;
        secs[1] += candle;
    }
    println!(
        "all: ours {:6.1} GFLOP/s, candle f32 {:6.1} GFLOP/s ({})",
        flops / secs[0] / 1e9,
        flops / secs[1] / 1e9,
        kernels
    );
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
    // The fastest run is the one least disturbed by the machine's other tenants.
    let fastest = std::env::var_os("FASTEST").is_some();
    Ok(times[if fastest { 0 } else { times.len() / 2 }])
}
