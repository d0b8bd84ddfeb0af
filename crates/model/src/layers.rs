//! Small building blocks shared by the vision tower, the projector and the decoder.
//!
//! [`Linear`] is an enum so that quantized and LoRA weights can join the dense one without
//! another model copy (style guide §2).

use candle_core::{DType, Module, Result, Tensor, Var, D};
use candle_nn::VarBuilder;

use crate::config::Activation;

/// `y = x Wᵀ + b`. `x: (…, in) → (…, out)`.
#[derive(Debug, Clone)]
pub enum Linear {
    Dense(candle_nn::Linear),
}

impl Linear {
    /// Loads `weight` (`[out, in]`) and, when `bias`, `bias` (`[out]`).
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Linear::Dense(candle_nn::Linear::new(weight, bias)))
    }

    pub fn from_weight(weight: Tensor) -> Self {
        Linear::Dense(candle_nn::Linear::new(weight, None))
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Dense(l) => l.forward(xs),
        }
    }

    /// `(weight, bias)`.
    pub fn parameters(&self) -> (&Tensor, Option<&Tensor>) {
        match self {
            Linear::Dense(l) => (l.weight(), l.bias()),
        }
    }

    /// A copy whose weight and bias are trainable `Var`s.
    pub fn to_trainable(&self) -> Result<(Linear, Var, Option<Var>)> {
        let (w, b) = self.parameters();
        let w = Var::from_tensor(w)?;
        let b = b.map(Var::from_tensor).transpose()?;
        let l = candle_nn::Linear::new(
            w.as_tensor().clone(),
            b.as_ref().map(|b| b.as_tensor().clone()),
        );
        Ok((Linear::Dense(l), w, b))
    }
}

/// LLaMA's RMSNorm, computed in f32: `x / sqrt(mean(x²) + eps) * w`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }

    /// `xs: (…, hidden) → (…, hidden)`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let x = xs.to_dtype(DType::F32)?;
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        x.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

/// `torch.nn.LayerNorm` with weight and bias.
#[derive(Debug, Clone)]
pub struct LayerNorm(candle_nn::LayerNorm);

impl LayerNorm {
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        let weight = vb.get(size, "weight")?;
        let bias = vb.get(size, "bias")?;
        Ok(Self(candle_nn::LayerNorm::new(weight, bias, eps)))
    }

    /// `xs: (…, hidden) → (…, hidden)`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.0.forward(xs)
    }
}

pub fn activate(act: Activation, xs: &Tensor) -> Result<Tensor> {
    match act {
        Activation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
        Activation::Gelu => xs.gelu_erf(),
        Activation::GeluTanh => xs.gelu(),
        Activation::Silu => candle_nn::ops::silu(xs),
    }
}

/// Softmax attention over heads. `q: (b, h, s, d)`, `k, v: (b, h, t, d)`, `mask`
/// broadcastable to `(b, h, s, t)` with 0 / −∞ → `(b, h, s, d)`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    probs_matmul(&softmax_last_dim(&scores)?, v)
}

fn probs_matmul(p: &Tensor, v: &Tensor) -> Result<Tensor> {
    p.matmul(v)
}

/// Softmax over the last dimension. candle's fused kernel has no backward pass, so when
/// gradients are tracked (training) the same math runs as differentiable primitives.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if xs.track_op() {
        candle_nn::ops::softmax(xs, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(xs)
    }
}

/// Rotary embedding in the non-interleaved (`rotate_half`) layout of HF LLaMA.
/// `xs: (b, h, s, d)`, `cos/sin: (b, s, d/2)`. Differentiable when gradients are tracked
/// (candle's fused kernel has no backward pass).
pub fn rope(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if !xs.track_op() {
        return candle_nn::rotary_emb::rope(xs, cos, sin);
    }
    let half = xs.dim(D::Minus1)? / 2;
    let x1 = xs.narrow(D::Minus1, 0, half)?;
    let x2 = xs.narrow(D::Minus1, half, half)?;
    let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
    let out1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let out2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[out1, out2], D::Minus1)
}
