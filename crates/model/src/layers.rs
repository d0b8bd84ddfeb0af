//! Small building blocks shared by the vision tower, the projector and the decoder.
//!
//! [`Linear`] is an enum so that quantized and LoRA weights can join the dense one without
//! another model copy (style guide §2).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Module, Result, Tensor, Var, D};
use candle_nn::VarBuilder;

use crate::config::Activation;

/// From this many input rows on (prefill), a float weight is widened for a GEMM rather than
/// streamed through the matrix-vector kernels that suit decoding.
const GEMM_ROWS: usize = 16;

/// `y = x Wᵀ + b`. `x: (…, in) → (…, out)`.
#[derive(Debug, Clone)]
pub enum Linear {
    Dense(candle_nn::Linear),
    /// A weight stored in a ggml type (a GGUF model's matrices; QLoRA's frozen 4-bit base).
    /// Decoding multiplies `Q4_K`/`Q6_K` with our kernels ([`crate::kquant`]), the rest with
    /// candle's quantized kernels; when gradients are tracked it is dequantized for each
    /// product, so that they still reach the input.
    Quantized {
        weight: std::sync::Arc<candle_core::quantized::QTensor>,
        bias: Option<Tensor>,
    },
    /// A LoRA adapter over a frozen base: `base(x) + dropout(x) Aᵀ Bᵀ · alpha / r`.
    Lora(Box<Lora>),
    /// A weight packed for our AVX512-BF16 kernels (`--dtype bf16`; inference only).
    Bf16 {
        weight: std::sync::Arc<crate::bf16::PackedBf16>,
        bias: Option<Tensor>,
    },
}

/// LoRA weights: `a: (r, in)`, `b: (out, r)`.
#[derive(Debug, Clone)]
pub struct Lora {
    pub base: Linear,
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    /// Dropout on the adapter's input (training only: adapters exist only while training).
    pub dropout: f32,
    /// Tells this adapter's dropout masks from the other adapters' (see [`with_dropout_seed`]).
    pub dropout_key: u64,
}

thread_local! {
    static DROPOUT_SEED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Runs `f` with LoRA dropout masks drawn from `seed` (and each adapter's key): the trainer
/// gives every micro-batch its own seed from the run's, so that a resumed run and a layer
/// recomputed for gradient checkpointing draw exactly the masks of the first pass.
pub fn with_dropout_seed<R>(seed: u64, f: impl FnOnce() -> R) -> R {
    let old = DROPOUT_SEED.with(|s| s.replace(seed));
    let out = f();
    DROPOUT_SEED.with(|s| s.set(old));
    out
}

/// SplitMix64: a well-mixed 64-bit hash, so that element `i`'s draw is `mix(base + i)`.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Inverted dropout with masks from the current seed and `key`: each element is zeroed
/// with probability `p`, the rest scaled by `1 / (1 − p)`.
fn seeded_dropout(xs: &Tensor, p: f32, key: u64) -> Result<Tensor> {
    let seed = DROPOUT_SEED.with(|s| s.get());
    let base = splitmix64(seed ^ splitmix64(key));
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..xs.elem_count() as u64)
        .map(|i| {
            // The top 24 bits as a uniform draw in [0, 1).
            let u = (splitmix64(base.wrapping_add(i)) >> 40) as f32 / (1u64 << 24) as f32;
            if u < p {
                0.0
            } else {
                keep
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
    xs * mask
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
            Linear::Quantized { weight, bias } => {
                let rows = xs.elem_count() / xs.dim(D::Minus1)?.max(1);
                let float = matches!(
                    weight.dtype(),
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
                );
                let ours = if xs.track_op() {
                    None
                } else {
                    crate::kquant::try_matmul(weight, xs)?
                };
                let y = if let Some(y) = ours {
                    // Decoding a Q4_K/Q6_K weight: our kernels (crate::kquant).
                    y.to_dtype(xs.dtype())?
                } else if xs.track_op() || (float && rows >= GEMM_ROWS) {
                    // Training through a frozen 4-bit base: a differentiable product. Prefill
                    // with a float weight: widened once, then a (compute-bound) f32 GEMM.
                    let w = weight.dequantize(xs.device())?.to_dtype(xs.dtype())?;
                    xs.broadcast_matmul(&w.t()?)?
                } else {
                    // candle's quantized kernels: the weight is read once, in its own type,
                    // by all threads (f32 activations).
                    let x = xs.to_dtype(DType::F32)?.contiguous()?;
                    candle_core::quantized::QMatMul::QTensor(weight.clone())
                        .forward(&x)?
                        .to_dtype(xs.dtype())?
                };
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
            Linear::Bf16 { weight, bias } => {
                if xs.track_op() {
                    candle_core::bail!("a layer packed for bf16 inference cannot be trained");
                }
                let y = weight.matmul(xs)?.to_dtype(xs.dtype())?;
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
            Linear::Lora(l) => {
                let x = if l.dropout > 0.0 {
                    seeded_dropout(xs, l.dropout, l.dropout_key)?
                } else {
                    xs.clone()
                };
                let delta = x.broadcast_matmul(&l.a.t()?)?.broadcast_matmul(&l.b.t()?)?;
                l.base.forward(xs)? + (delta * l.scale)?
            }
        }
    }

    /// `(weight, bias)` of a dense layer; `None` for quantized and adapted ones.
    pub fn parameters(&self) -> Option<(&Tensor, Option<&Tensor>)> {
        match self {
            Linear::Dense(l) => Some((l.weight(), l.bias())),
            _ => None,
        }
    }

    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Linear::Dense(l) => l.weight().dims2(),
            Linear::Quantized { weight, .. } => weight.shape().dims2(),
            Linear::Lora(l) => l.base.dims(),
            Linear::Bf16 { weight, .. } => Ok(weight.dims()),
        }
    }

    /// The layer as inference runs it: the weight in a ggml container of its own dtype (f32,
    /// f16 or bf16), so that decoding multiplies through candle's multithreaded
    /// matrix-vector kernels, reading the weight once in its stored width; f32 bias.
    pub fn packed(&self) -> Result<Linear> {
        let Some((w, b)) = self.parameters() else {
            return Ok(self.clone());
        };
        let t = match w.dtype() {
            DType::F16 => GgmlDType::F16,
            DType::BF16 => GgmlDType::BF16,
            _ => GgmlDType::F32,
        };
        Ok(Linear::Quantized {
            weight: std::sync::Arc::new(QTensor::quantize(&w.detach(), t)?),
            bias: b.map(|b| b.to_dtype(DType::F32)).transpose()?,
        })
    }

    /// The layer packed for our AVX512-BF16 kernels (a dense one; others stay as they are).
    pub fn packed_bf16(&self) -> Result<Linear> {
        let Some((w, b)) = self.parameters() else {
            return Ok(self.clone());
        };
        Ok(Linear::Bf16 {
            weight: std::sync::Arc::new(crate::bf16::PackedBf16::pack(w)?),
            bias: b.map(|b| b.to_dtype(DType::F32)).transpose()?,
        })
    }

    /// Bytes of the weight (and bias) as stored.
    pub fn stored_bytes(&self) -> usize {
        let tensor = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match self {
            Linear::Dense(l) => tensor(l.weight()) + l.bias().map_or(0, tensor),
            Linear::Quantized { weight, bias } => {
                weight.storage_size_in_bytes() + bias.as_ref().map_or(0, tensor)
            }
            Linear::Lora(l) => l.base.stored_bytes() + tensor(&l.a) + tensor(&l.b),
            Linear::Bf16 { weight, bias } => {
                weight.stored_bytes() + bias.as_ref().map_or(0, tensor)
            }
        }
    }

    /// A dense copy in f32.
    pub fn to_f32(&self) -> Result<Linear> {
        Ok(match self {
            Linear::Dense(l) => Linear::Dense(candle_nn::Linear::new(
                l.weight().to_dtype(DType::F32)?,
                l.bias().map(|b| b.to_dtype(DType::F32)).transpose()?,
            )),
            other => other.clone(),
        })
    }

    /// A copy whose weight and bias are trainable `Var`s.
    pub fn to_trainable(&self) -> Result<(Linear, Var, Option<Var>)> {
        let Some((w, b)) = self.parameters() else {
            candle_core::bail!("only a dense layer can be made trainable");
        };
        let w = Var::from_tensor(w)?;
        let b = b.map(Var::from_tensor).transpose()?;
        let l = candle_nn::Linear::new(
            w.as_tensor().clone(),
            b.as_ref().map(|b| b.as_tensor().clone()),
        );
        Ok((Linear::Dense(l), w, b))
    }

    /// The same layer with its weight stored in 4 bits (ggml Q4_0, blocks of 32 inputs);
    /// a layer whose input size is not a multiple of 32 stays as it is.
    pub fn quantize_4bit(&self) -> Result<Linear> {
        let Some((w, b)) = self.parameters() else {
            return Ok(self.clone());
        };
        if w.dim(1)? % 32 != 0 {
            return Ok(self.clone());
        }
        let q = candle_core::quantized::QTensor::quantize(
            &w.to_dtype(DType::F32)?.detach(),
            candle_core::quantized::GgmlDType::Q4_0,
        )?;
        Ok(Linear::Quantized {
            weight: std::sync::Arc::new(q),
            bias: b.cloned(),
        })
    }

    /// `W + scale · B A` for an adapted dense layer: the weight a merged checkpoint stores.
    pub fn merged_weight(&self) -> Result<Option<Tensor>> {
        let Linear::Lora(l) = self else {
            return Ok(None);
        };
        let base = match &l.base {
            Linear::Dense(d) => d.weight().to_dtype(DType::F32)?,
            Linear::Quantized { weight, .. } => weight.dequantize(l.a.device())?,
            Linear::Lora(_) | Linear::Bf16 { .. } => {
                candle_core::bail!("adapters over this layer cannot be merged")
            }
        };
        let delta =
            l.b.to_dtype(DType::F32)?
                .matmul(&l.a.to_dtype(DType::F32)?)?;
        Ok(Some((base + (delta * l.scale)?)?))
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

    pub fn to_f32(&self) -> Result<Self> {
        Ok(Self {
            weight: self.weight.to_dtype(DType::F32)?,
            eps: self.eps,
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
pub struct LayerNorm(candle_nn::LayerNorm, f64);

impl LayerNorm {
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        let weight = vb.get(size, "weight")?;
        let bias = vb.get(size, "bias")?;
        Ok(Self(candle_nn::LayerNorm::new(weight, bias, eps), eps))
    }

    /// `xs: (…, hidden) → (…, hidden)`. candle's fused kernel has no backward pass, so when
    /// gradients are tracked the same math runs as differentiable primitives (in f32).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let weight = self.0.weight();
        if !(xs.track_op() || weight.track_op()) {
            return self.0.forward(xs);
        }
        let dtype = xs.dtype();
        let x = xs.to_dtype(DType::F32)?;
        let x = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_div(&(var + self.1)?.sqrt()?)?.to_dtype(dtype)?;
        let x = x.broadcast_mul(weight)?;
        match self.0.bias() {
            Some(b) => x.broadcast_add(b),
            None => Ok(x),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Dropout drops about `p` of the elements and scales the rest by `1 / (1 − p)`; the
    /// masks depend on the seed and the adapter's key and on nothing else.
    #[test]
    fn seeded_dropout_is_inverted_dropout_determined_by_seed_and_key() {
        let x = Tensor::ones((64, 500), DType::F32, &Device::Cpu).unwrap();
        let draw = |seed: u64, key: u64| -> Vec<f32> {
            with_dropout_seed(seed, || seeded_dropout(&x, 0.25, key))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let a = draw(7, 1);
        let dropped = a.iter().filter(|&&v| v == 0.0).count() as f64 / a.len() as f64;
        assert!((dropped - 0.25).abs() < 0.01, "dropped {dropped}");
        assert!(a.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        assert_eq!(a, draw(7, 1));
        assert_ne!(a, draw(8, 1));
        assert_ne!(a, draw(7, 2));
    }
}
