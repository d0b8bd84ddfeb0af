//! What HF's Trainer does around the weights (llava-spec §5.5): `torch.optim.AdamW`, the
//! cosine schedule with linear warmup and global-norm gradient clipping. AdamW is our own
//! rather than candle-nn's so that its moments can be saved and restored on resume.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};

/// `torch.optim.AdamW` (decoupled weight decay, bias-corrected moments).
pub struct AdamW {
    params: Vec<(String, Var)>,
    /// First and second moments, per parameter, created on the first step.
    m: Vec<Option<Tensor>>,
    v: Vec<Option<Tensor>>,
    /// Optimizer steps taken (bias correction).
    pub t: usize,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, lr: f64, weight_decay: f64) -> Self {
        let n = params.len();
        Self {
            params,
            m: vec![None; n],
            v: vec![None; n],
            t: 0,
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        }
    }

    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().map(|(_, v)| v.clone()).collect()
    }

    /// One update from `grads`; parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        for (i, (_, var)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = g.to_dtype(DType::F32)?;
            let m = match &self.m[i] {
                Some(m) => ((m * b1)? + (&g * (1.0 - b1))?)?,
                None => (&g * (1.0 - b1))?,
            };
            let v = match &self.v[i] {
                Some(v) => ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?,
                None => (g.sqr()? * (1.0 - b2))?,
            };
            let p = var.as_tensor().to_dtype(DType::F32)?;
            let p = (&p * (1.0 - self.lr * self.weight_decay))?;
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.eps)?)?;
            let p = (p - (update * self.lr)?)?;
            var.set(&p.to_dtype(var.dtype())?)?;
            self.m[i] = Some(m);
            self.v[i] = Some(v);
        }
        Ok(())
    }

    /// The moments as named tensors (`exp_avg.NAME`, `exp_avg_sq.NAME`), to save.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            if let (Some(m), Some(v)) = (&self.m[i], &self.v[i]) {
                out.insert(format!("exp_avg.{name}"), m.clone());
                out.insert(format!("exp_avg_sq.{name}"), v.clone());
            }
        }
        out
    }

    /// Restores moments saved by [`AdamW::state`] after `t` steps.
    pub fn restore(&mut self, state: &HashMap<String, Tensor>, t: usize) -> Result<()> {
        self.t = t;
        for (i, (name, var)) in self.params.iter().enumerate() {
            let m = state.get(&format!("exp_avg.{name}"));
            let v = state.get(&format!("exp_avg_sq.{name}"));
            if let (Some(m), Some(v)) = (m, v) {
                if m.dims() != var.dims() || v.dims() != var.dims() {
                    candle_core::bail!("optimizer state for {name} has the wrong shape");
                }
                self.m[i] = Some(m.clone());
                self.v[i] = Some(v.clone());
            }
        }
        Ok(())
    }
}

/// `get_cosine_schedule_with_warmup`: linear warmup to `base`, then half a cosine to 0.
pub fn cosine_lr(base: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    base * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
}

/// HF's `warmup_steps = ceil(warmup_ratio * total_steps)`.
pub fn warmup_steps(ratio: f64, total: usize) -> usize {
    (ratio * total as f64).ceil() as usize
}

/// Scales the gradients of `vars` so their global L2 norm is at most `max_norm`
/// (`clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            total += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    let norm = total.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for v in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * coef)?);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two steps of `torch.optim.AdamW(lr=0.1, weight_decay=0.01)` on p = [1, -2] with
    /// gradients [0.5, 0.25] then [-1, 2], worked by hand from torch's update rule.
    #[test]
    fn adamw_matches_torch_update_rule() {
        let p = Var::new(&[1f32, -2.0], &candle_core::Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("p".into(), p.clone())], 0.1, 0.01);
        let mut want = [1f64, -2.0];
        let (mut m, mut v) = ([0f64; 2], [0f64; 2]);
        for (t, g) in [[0.5f64, 0.25], [-1.0, 2.0]].iter().enumerate() {
            let loss = (p.as_tensor()
                * &Tensor::new(&[g[0] as f32, g[1] as f32], p.device()).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
            let t = (t + 1) as i32;
            for i in 0..2 {
                want[i] *= 1.0 - 0.1 * 0.01;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.999f64.powi(t));
                want[i] -= 0.1 * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..2 {
            assert!(
                (got[i] as f64 - want[i]).abs() < 1e-6,
                "{got:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn cosine_schedule_warms_up_peaks_and_decays_to_zero() {
        assert_eq!(cosine_lr(1.0, 0, 10, 100), 0.0);
        assert!((cosine_lr(1.0, 5, 10, 100) - 0.5).abs() < 1e-12);
        assert!((cosine_lr(1.0, 10, 10, 100) - 1.0).abs() < 1e-12);
        assert!((cosine_lr(1.0, 55, 10, 100) - 0.5).abs() < 1e-12);
        assert!(cosine_lr(1.0, 100, 10, 100).abs() < 1e-12);
        assert_eq!(warmup_steps(0.03, 100), 3);
        assert_eq!(warmup_steps(0.03, 10), 1);
    }
}
