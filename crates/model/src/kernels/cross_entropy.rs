//! Training's loss head: the summed negative log-likelihood of target tokens under
//! `softmax(logits)`, as one op. Built from candle's ops it keeps three `(rows, vocab)`
//! tensors for the backward pass (the logits, their log-softmax and its gather's input);
//! this keeps the logits alone and recomputes each row's log-sum-exp when the gradient,
//! `softmax − one-hot`, is asked for.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

/// `Σ_r −log softmax(logits[r])[targets[r]]` for `logits: (rows, vocab)`, a scalar. f32 CPU
/// logits take our op; other devices and dtypes the same computation from candle's ops.
pub fn nll_sum(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    if rows != targets.len() {
        candle_core::bail!("{} targets for {rows} rows of logits", targets.len());
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("target token {t} is outside the vocabulary of {vocab}");
    }
    if logits.device().is_cpu() && logits.dtype() == DType::F32 {
        return logits.contiguous()?.apply_op1(NllSum {
            targets: targets.to_vec(),
        });
    }
    let logp = candle_nn::ops::log_softmax(logits, 1)?;
    let t = Tensor::new(targets, logits.device())?.unsqueeze(1)?;
    logp.gather(&t, 1)?.sum_all()?.neg()
}

struct NllSum {
    targets: Vec<u32>,
}

/// The contiguous f32 data of a CPU tensor, borrowed.
fn with_rows<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(v)) = &*storage else {
        candle_core::bail!("nll: f32 CPU logits expected");
    };
    match layout.contiguous_offsets() {
        Some((a, b)) => f(&v[a..b]),
        None => candle_core::bail!("nll: contiguous logits expected"),
    }
}

/// `log Σ exp(row)`, as candle's `log_softmax` computes it (max subtracted first).
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|x| (x - max).exp()).sum();
    max + sum.ln()
}

impl CustomOp1 for NllSum {
    fn name(&self) -> &'static str {
        "nll-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("nll: f32 logits expected");
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("nll: contiguous logits expected");
        };
        let x = &v[a..b];
        let vocab = l.dims()[1];
        let total: f64 = x
            .par_chunks_exact(vocab)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| (log_sum_exp(row) - row[t as usize]) as f64)
            .sum();
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }

    fn bwd(&self, logits: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let (rows, vocab) = logits.dims2()?;
        let mut d = vec![0f32; rows * vocab];
        with_rows(logits, |x| {
            d.par_chunks_exact_mut(vocab)
                .zip(x.par_chunks_exact(vocab))
                .zip(self.targets.par_iter())
                .for_each(|((d, row), &t)| {
                    let lse = log_sum_exp(row);
                    for (d, &x) in d.iter_mut().zip(row) {
                        *d = g * (x - lse).exp();
                    }
                    d[t as usize] -= g;
                });
            Ok(())
        })?;
        Ok(Some(Tensor::from_vec(d, (rows, vocab), logits.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The op gives candle's log-softmax-and-gather loss and its gradient, on odd shapes.
    #[test]
    fn nll_sum_matches_candles_composition_and_gradient() {
        let dev = candle_core::Device::Cpu;
        for (rows, vocab) in [(1usize, 7usize), (5, 33), (17, 1000), (3, 32000)] {
            let x = Tensor::randn(0f32, 3.0, (rows, vocab), &dev).unwrap();
            let targets: Vec<u32> = (0..rows).map(|r| ((r * 7919) % vocab) as u32).collect();
            let var = candle_core::Var::from_tensor(&x).unwrap();
            let ours = nll_sum(var.as_tensor(), &targets).unwrap();
            let t = Tensor::new(targets.as_slice(), &dev)
                .unwrap()
                .unsqueeze(1)
                .unwrap();
            let theirs = candle_nn::ops::log_softmax(var.as_tensor(), 1)
                .unwrap()
                .gather(&t, 1)
                .unwrap()
                .sum_all()
                .unwrap()
                .neg()
                .unwrap();
            let (a, b) = (
                ours.to_scalar::<f32>().unwrap(),
                theirs.to_scalar::<f32>().unwrap(),
            );
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{rows}x{vocab}: {a} {b}"
            );
            let scale = 0.37;
            let ga = (ours * scale).unwrap().backward().unwrap();
            let gb = (theirs * scale).unwrap().backward().unwrap();
            let (ga, gb) = (
                ga.get(var.as_tensor()).unwrap(),
                gb.get(var.as_tensor()).unwrap(),
            );
            // candle's log-softmax backward sums each row's gradient in f32: over 32000
            // entries its own rounding reaches ~1e-5 of the largest entry.
            let diff = kollava_testkit::max_abs_diff_tensors(ga, gb);
            let scale = kollava_testkit::max_abs(gb);
            assert!(
                diff <= 1e-4 * scale,
                "{rows}x{vocab}: gradient off by {diff} of {scale}"
            );
        }
    }

    #[test]
    fn targets_outside_the_vocabulary_are_refused() {
        let x = Tensor::zeros((2, 5), DType::F32, &candle_core::Device::Cpu).unwrap();
        let e = nll_sum(&x, &[1, 5]).unwrap_err().to_string();
        assert!(e.contains("outside the vocabulary"), "{e}");
        assert!(nll_sum(&x, &[1]).is_err());
    }
}
