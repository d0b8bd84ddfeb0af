//! Small building blocks shared by the vision tower, the projector and the decoder.
//!
//! [`Linear`] is an enum so that quantized and LoRA weights can join the dense one without
//! another model copy (style guide §2).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Module, Result, Tensor, Var, D};
use candle_nn::VarBuilder;

use crate::config::Activation;
use crate::form::{Matrices, Pack};
use crate::kernels::sgemm;
use crate::kernels::softmax::{exp_nonpositive, softmax_in_place};

/// From this many input rows on (prefill), a float weight is widened for a GEMM rather than
/// streamed through the matrix-vector kernels that suit decoding.
const GEMM_ROWS: usize = 16;

/// `y = x Wᵀ + b`. `x: (…, in) → (…, out)`.
#[derive(Debug, Clone)]
pub enum Linear {
    Dense(candle_nn::Linear),
    /// A weight stored in a ggml type (a GGUF model's matrices; QLoRA's frozen 4-bit base).
    /// Decoding multiplies `Q4_K`/`Q6_K` with our kernels ([`crate::kernels::kquant`]), the rest with
    /// candle's quantized kernels; when gradients are tracked it is dequantized for each
    /// product, so that they still reach the input.
    Quantized {
        weight: std::sync::Arc<candle_core::quantized::QTensor>,
        bias: Option<Tensor>,
    },
    /// A LoRA adapter over a frozen base: `base(x) + dropout(x) Aᵀ Bᵀ · alpha / r`.
    Lora(Box<Lora>),
    /// A weight packed for our bf16 kernels (`--dtype bf16`; AVX512-BF16 or AVX2+FMA, see
    /// [`crate::kernels::bf16`]). With `transposed` (`Wᵀ` packed too) gradients can flow
    /// through it to its input: a frozen matrix under `train --bf16`.
    Bf16 {
        weight: std::sync::Arc<crate::kernels::bf16::PackedBf16>,
        bias: Option<Tensor>,
        transposed: Option<std::sync::Arc<crate::kernels::bf16::PackedBf16>>,
    },
}

/// `xs` through several layers that read it (a layer's q/k/v, its gate/up). When decoding
/// k-quant weights, the input is quantized once per weight type and all the products go to
/// the worker threads in one dispatch (+4 % tokens/s on a Q4_K_M model); otherwise layer by
/// layer. The numbers are the same either way. (Doing the same for bf16-packed weights
/// measured no gain: their decoding is at the memory-bandwidth roofline already.)
pub fn forward_shared<const N: usize>(linears: [&Linear; N], xs: &Tensor) -> Result<[Tensor; N]> {
    let ys = match shared_products(&linears, xs)? {
        Some(ys) => ys,
        None => linears
            .iter()
            .map(|l| l.forward(xs))
            .collect::<Result<Vec<_>>>()?,
    };
    Ok(ys.try_into().expect("one output per layer"))
}

/// [`forward_shared`]'s single dispatch, when every layer is a k-quant weight our decoding
/// kernels take; `None` otherwise.
fn shared_products(linears: &[&Linear], xs: &Tensor) -> Result<Option<Vec<Tensor>>> {
    if xs.track_op() {
        return Ok(None);
    }
    let (mut weights, mut biases) = (Vec::new(), Vec::new());
    for l in linears {
        let Linear::Quantized { weight, bias } = l else {
            return Ok(None);
        };
        weights.push(weight.as_ref());
        biases.push(bias.as_ref());
    }
    let Some(ys) = crate::kernels::kquant::try_matmul_many(&weights, xs)? else {
        return Ok(None);
    };
    ys.into_iter()
        .zip(biases)
        .map(|(y, bias)| with_bias(y.to_dtype(xs.dtype())?, bias))
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Whether a product with this weight (`None`: a ggml one, which never trains) should take
/// [`frozen_product`]: gradients flow through the input, not into the weight, on the CPU.
fn frozen_under_training(xs: &Tensor, weight: Option<&Tensor>) -> bool {
    xs.track_op() && xs.device().is_cpu() && !weight.is_some_and(Tensor::track_op)
}

/// A weight that does not train, for [`frozen_product`].
#[derive(Clone)]
enum FrozenWeight {
    Dense(Tensor),
    /// QLoRA's 4-bit base: widened for each product, as the dense path widens it.
    Quantized(std::sync::Arc<QTensor>),
    /// `train --bf16`: `W` and `Wᵀ` packed for our bf16 kernels (f32 in and out).
    Bf16 {
        w: std::sync::Arc<crate::kernels::bf16::PackedBf16>,
        wt: std::sync::Arc<crate::kernels::bf16::PackedBf16>,
    },
}

impl FrozenWeight {
    fn dense(&self, dtype: DType) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => w.to_dtype(dtype),
            FrozenWeight::Quantized(q) => q.dequantize(&candle_core::Device::Cpu)?.to_dtype(dtype),
            FrozenWeight::Bf16 { .. } => candle_core::bail!("a packed weight has no dense form"),
        }
    }

    /// `x Wᵀ`, as candle's `Linear` computes it (bf16 kernels for a packed weight).
    fn product(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            FrozenWeight::Bf16 { w, .. } => w.matmul(x)?.to_dtype(x.dtype()),
            _ => candle_nn::Linear::new(self.dense(x.dtype())?, None).forward(x),
        }
    }

    /// `dY W`.
    fn input_grad(&self, grad: &Tensor) -> Result<Tensor> {
        match self {
            FrozenWeight::Bf16 { wt, .. } => wt.matmul(grad)?.to_dtype(grad.dtype()),
            _ => grad.broadcast_matmul(&self.dense(grad.dtype())?),
        }
    }
}

/// A custom op's CPU input as a tensor (a copy of its span; the ops run candle's own
/// arithmetic on it).
fn storage_tensor(
    s: &candle_core::CpuStorage,
    l: &candle_core::Layout,
    op: &str,
) -> Result<Tensor> {
    use candle_core::CpuStorage as S;
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: the input is not contiguous");
    };
    let cpu = &candle_core::Device::Cpu;
    match s {
        S::F32(v) => Tensor::from_slice(&v[start..end], l.shape(), cpu),
        S::BF16(v) => Tensor::from_slice(&v[start..end], l.shape(), cpu),
        S::F16(v) => Tensor::from_slice(&v[start..end], l.shape(), cpu),
        _ => candle_core::bail!("{op}: a float input is expected"),
    }
}

/// A custom op's CPU result from a tensor.
fn tensor_storage(t: &Tensor, op: &str) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
    use candle_core::CpuStorage as S;
    let flat = t.flatten_all()?;
    let s = match t.dtype() {
        DType::F32 => S::F32(flat.to_vec1()?),
        DType::BF16 => S::BF16(flat.to_vec1()?),
        DType::F16 => S::F16(flat.to_vec1()?),
        d => candle_core::bail!("{op}: a {d:?} result"),
    };
    Ok((s, t.shape().clone()))
}

/// `x Wᵀ` for a weight that does not train (stage 1's language model, the base under
/// LoRA/QLoRA), as one op whose backward is only `dX = dY W`. candle's matmul backward
/// also computes `dW` (batch-broadcast, then summed) for every frozen matrix and throws it
/// away: as much work again as the product, and a weight-sized buffer per sample. The
/// forward is candle's own `Linear` product, so the numbers are the same.
fn frozen_product(xs: &Tensor, weight: FrozenWeight) -> Result<Tensor> {
    xs.contiguous()?.apply_op1(FrozenProduct(weight))
}

struct FrozenProduct(FrozenWeight);

impl candle_core::CustomOp1 for FrozenProduct {
    fn name(&self) -> &'static str {
        "frozen-product"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        if let (FrozenWeight::Dense(w), candle_core::CpuStorage::F32(_)) = (&self.0, storage) {
            if w.dtype() == DType::F32 {
                let x = f32_span(storage, layout, "frozen-product")?;
                return dense_product(x, layout.shape(), w);
            }
        }
        let x = storage_tensor(storage, layout, "frozen-product")?;
        tensor_storage(&self.0.product(&x)?, "frozen-product")
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.0.input_grad(grad)?))
    }
}

/// `x Wᵀ` straight from the op's input into its output, by the GEMM candle's matmul calls
/// with the same operands (no copy of either side). `x: (…, k)`, `w: (n, k)` f32.
fn dense_product(
    x: &[f32],
    shape: &candle_core::Shape,
    w: &Tensor,
) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
    let (n, k) = w.dims2()?;
    with_f32(w, |w| {
        product_storage(x, shape, w, (n, k), "frozen-product")
    })
}

/// `x Wᵀ` for `x: (…, k)` and a row-major `w: (n, k)`, as a custom op's output `(…, n)`.
fn product_storage(
    x: &[f32],
    shape: &candle_core::Shape,
    w: &[f32],
    (n, k): (usize, usize),
    op: &str,
) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
    let dims = shape.dims();
    if dims.last() != Some(&k) {
        candle_core::bail!("{op}: an input {dims:?} for a weight ({n}, {k})");
    }
    let y = dense_rows(x, w, (n, k));
    let mut out = dims.to_vec();
    *out.last_mut().expect("a dimension") = n;
    Ok((candle_core::CpuStorage::F32(y), out.into()))
}

/// `x Wᵀ` for the rows of `x` (`k` wide) and a row-major `w: (n, k)`, on the thread pool.
fn dense_rows(x: &[f32], w: &[f32], (n, k): (usize, usize)) -> Vec<f32> {
    let m = x.len() / k.max(1);
    let mut y = vec![0f32; m * n];
    sgemm((m, n, k), &mut y, false, x, (k, 1), w, (1, k), 1.0, true);
    y
}

/// Whether a product with this weight takes [`TrainedProduct`]: a trained f32 weight and
/// an f32 input on the CPU, outside bf16 autocast.
fn trained_on_cpu(xs: &Tensor, w: &Tensor) -> bool {
    w.track_op()
        && xs.device().is_cpu()
        && xs.dtype() == DType::F32
        && w.dtype() == DType::F32
        && w.rank() == 2
        && w.is_contiguous()
        && !BF16_AUTOCAST.with(|s| s.get())
}

/// `x Wᵀ` for a trained f32 weight on the CPU, as one op whose backward gives `dW = dYᵀ X`
/// in the weight's own layout. Through candle's matmul, `dW` came out transposed at the
/// `Wᵀ` view, was accumulated there (a weight-sized zero buffer and a sum) and then added
/// into the weight's gradient through the transposed view, element by element.
struct TrainedProduct;

impl candle_core::CustomOp2 for TrainedProduct {
    fn name(&self) -> &'static str {
        "trained-product"
    }

    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        ws: &candle_core::CpuStorage,
        wl: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = f32_span(xs, xl, self.name())?;
        let w = f32_span(ws, wl, self.name())?;
        product_storage(x, xl.shape(), w, wl.shape().dims2()?, self.name())
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, k) = w.dims2()?;
        let m = x.elem_count() / k.max(1);
        let mut dx = vec![0f32; m * k];
        let mut dw = vec![0f32; n * k];
        with_f32(grad, |dy| {
            with_f32(w, |wv| {
                // dX = dY W.
                sgemm((m, k, n), &mut dx, false, dy, (n, 1), wv, (k, 1), 1.0, true);
                Ok(())
            })?;
            with_f32(x, |xv| {
                // dW = dYᵀ X.
                sgemm((n, k, m), &mut dw, false, dy, (1, n), xv, (k, 1), 1.0, true);
                Ok(())
            })
        })?;
        let dev = x.device();
        let dx = x
            .track_op()
            .then(|| Tensor::from_vec(dx, x.shape(), dev))
            .transpose()?;
        Ok((dx, Some(Tensor::from_vec(dw, (n, k), dev)?)))
    }
}

/// A LoRA map for training on the CPU in f32 as one op over `(x, A, B)`:
/// `y = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ` with the base `W` frozen. It keeps only the rank-r
/// product `drop(x) Aᵀ` and the dropout mask as bits: candle's ops kept the dropped copy of
/// the input, the mask in f32 and three output-sized tensors (the adapter's output, it
/// scaled, the sum) per adapted map, and those were most of a LoRA run's peak memory. The
/// backward: `d(xa) = s · dY B`, `dB = s · dYᵀ (xa)`, `dA = d(xa)ᵀ drop(x)`,
/// `dx = dY W + drop'(d(xa) A)`. The masks are [`seeded_dropout`]'s.
struct LoraProduct {
    base: FrozenWeight,
    scale: f32,
    dropout: f32,
    /// [`seeded_dropout`]'s stream for this adapter and micro-batch.
    stream: u64,
    /// From the forward: each element's keep bit, and `drop(x) Aᵀ` `(rows, r)`.
    saved: std::sync::Mutex<Option<(Vec<u64>, Vec<f32>)>>,
}

impl LoraProduct {
    /// The op for `l` over `xs` and the base's bias, when it applies: f32 on the CPU, a base
    /// our frozen products take. (Under `--bf16` too: the adapters' products stay in f32, as
    /// the tensor-op path computed them; the base is packed for the bf16 kernels.)
    fn for_input(l: &Lora, xs: &Tensor) -> Result<Option<(Self, Option<Tensor>)>> {
        let f32s =
            xs.dtype() == DType::F32 && l.a.dtype() == DType::F32 && l.b.dtype() == DType::F32;
        if !xs.device().is_cpu() || !f32s {
            return Ok(None);
        }
        let (base, bias) = match &l.base {
            Linear::Dense(d) if d.weight().dtype() == DType::F32 && !d.weight().track_op() => {
                (FrozenWeight::Dense(d.weight().clone()), d.bias().cloned())
            }
            Linear::Quantized { weight, bias } => {
                (FrozenWeight::Quantized(weight.clone()), bias.clone())
            }
            Linear::Bf16 {
                weight,
                bias,
                transposed: Some(wt),
            } => (
                FrozenWeight::Bf16 {
                    w: weight.clone(),
                    wt: wt.clone(),
                },
                bias.clone(),
            ),
            _ => return Ok(None),
        };
        let seed = DROPOUT_SEED.with(|s| s.get());
        Ok(Some((
            LoraProduct {
                base,
                scale: l.scale as f32,
                dropout: l.dropout,
                stream: splitmix64(seed ^ splitmix64(l.dropout_key)),
                saved: std::sync::Mutex::new(None),
            },
            bias,
        )))
    }

    /// Keep bits of elements `0..n` (bit `i % 64` of word `i / 64`).
    fn keep_bits(&self, n: usize) -> Vec<u64> {
        use rayon::prelude::*;
        let p = self.dropout;
        let mut bits = vec![0u64; n.div_ceil(64)];
        bits.par_iter_mut().enumerate().for_each(|(w, word)| {
            for j in 0..64.min(n - w * 64) {
                let i = (w * 64 + j) as u64;
                if dropout_draw(self.stream, i) >= p {
                    *word |= 1 << j;
                }
            }
        });
        bits
    }

    /// `x ⊙ keep / (1 − p)`, as [`seeded_dropout`] computes it.
    fn dropped(&self, x: &[f32], bits: &[u64]) -> Vec<f32> {
        let keep = 1.0 / (1.0 - self.dropout);
        let mut out = x.to_vec();
        for_chunks(&mut out, |c, at| {
            for (j, v) in c.iter_mut().enumerate() {
                let i = at + j;
                *v *= if bits[i / 64] >> (i % 64) & 1 == 1 {
                    keep
                } else {
                    0.0
                };
            }
        });
        out
    }

    /// The frozen base's `x Wᵀ`, `(m, out)` values.
    fn base_product(&self, x: &[f32], shape: &candle_core::Shape) -> Result<Vec<f32>> {
        if let FrozenWeight::Dense(w) = &self.base {
            let nk = w.dims2()?;
            return with_f32(w, |w| Ok(dense_rows(x, w, nk)));
        }
        let x = Tensor::from_slice(x, shape, &candle_core::Device::Cpu)?;
        self.base.product(&x)?.flatten_all()?.to_vec1()
    }
}

impl candle_core::CustomOp3 for LoraProduct {
    fn name(&self) -> &'static str {
        "lora-product"
    }

    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        as_: &candle_core::CpuStorage,
        al: &candle_core::Layout,
        bs: &candle_core::CpuStorage,
        bl: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = f32_span(xs, xl, self.name())?;
        let a = f32_span(as_, al, self.name())?;
        let b = f32_span(bs, bl, self.name())?;
        let (r, k) = al.shape().dims2()?;
        let (n, rb) = bl.shape().dims2()?;
        let dims = xl.shape().dims();
        if rb != r || dims.last() != Some(&k) {
            candle_core::bail!(
                "lora-product: x {dims:?}, A {:?}, B {:?}",
                al.dims(),
                bl.dims()
            );
        }
        let m = x.len() / k.max(1);
        let bits = if self.dropout > 0.0 {
            self.keep_bits(x.len())
        } else {
            Vec::new()
        };
        let mut xa = vec![0f32; m * r];
        {
            let dropped;
            let input = if self.dropout > 0.0 {
                dropped = self.dropped(x, &bits);
                &dropped[..]
            } else {
                x
            };
            sgemm(
                (m, r, k),
                &mut xa,
                false,
                input,
                (k, 1),
                a,
                (1, k),
                1.0,
                true,
            );
        }
        let mut y = self.base_product(x, xl.shape())?;
        sgemm(
            (m, n, r),
            &mut y,
            true,
            &xa,
            (r, 1),
            b,
            (1, r),
            self.scale,
            true,
        );
        *self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))? = Some((bits, xa));
        let mut out = dims.to_vec();
        *out.last_mut().expect("a dimension") = n;
        Ok((candle_core::CpuStorage::F32(y), out.into()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some((bits, xa)) = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?
            .clone()
        else {
            candle_core::bail!("lora-product: backward before forward");
        };
        let (r, k) = a.dims2()?;
        let (n, _) = b.dims2()?;
        let m = x.elem_count() / k.max(1);
        let dev = x.device();
        // d(xa) = s · dY B, dB = s · dYᵀ xa.
        let mut dxa = vec![0f32; m * r];
        let mut db = vec![0f32; n * r];
        with_f32(grad, |dy| {
            with_f32(b, |bv| {
                sgemm(
                    (m, r, n),
                    &mut dxa,
                    false,
                    dy,
                    (n, 1),
                    bv,
                    (r, 1),
                    self.scale,
                    true,
                );
                Ok(())
            })?;
            sgemm(
                (n, r, m),
                &mut db,
                false,
                dy,
                (1, n),
                &xa,
                (r, 1),
                self.scale,
                true,
            );
            Ok(())
        })?;
        // dA = d(xa)ᵀ drop(x); the adapter's part of dx, d(xa) A, through the mask.
        let mut da = vec![0f32; r * k];
        let mut dx_adapter = vec![0f32; m * k];
        with_f32(x, |xv| {
            let dropped;
            let input = if self.dropout > 0.0 {
                dropped = self.dropped(xv, &bits);
                &dropped[..]
            } else {
                xv
            };
            sgemm(
                (r, k, m),
                &mut da,
                false,
                &dxa,
                (1, r),
                input,
                (k, 1),
                1.0,
                true,
            );
            Ok(())
        })?;
        with_f32(a, |av| {
            sgemm(
                (m, k, r),
                &mut dx_adapter,
                false,
                &dxa,
                (r, 1),
                av,
                (k, 1),
                1.0,
                true,
            );
            Ok(())
        })?;
        let dx_adapter = if self.dropout > 0.0 {
            self.dropped(&dx_adapter, &bits)
        } else {
            dx_adapter
        };
        let dx = (self.base.input_grad(grad)? + Tensor::from_vec(dx_adapter, x.shape(), dev)?)?;
        Ok((
            Some(dx),
            Some(Tensor::from_vec(da, (r, k), dev)?),
            Some(Tensor::from_vec(db, (n, r), dev)?),
        ))
    }
}

thread_local! {
    static BF16_AUTOCAST: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the products of trained weights in bf16 ([`trained_bf16_product`]), as
/// `torch.autocast(dtype=torch.bfloat16)` runs a step under the reference's `--bf16 True`
/// (`train --bf16`; frozen matrices are packed for the bf16 kernels once, beforehand).
pub fn with_bf16_autocast<R>(on: bool, f: impl FnOnce() -> R) -> R {
    let old = BF16_AUTOCAST.with(|s| s.replace(on));
    let out = f();
    BF16_AUTOCAST.with(|s| s.set(old));
    out
}

/// Whether a product with trained weight `w` takes [`trained_bf16_product`].
fn autocast_bf16(xs: &Tensor, w: &Tensor) -> bool {
    BF16_AUTOCAST.with(|s| s.get())
        && w.track_op()
        && xs.device().is_cpu()
        && w.rank() == 2
        && crate::kernels::bf16::available()
}

/// `x Wᵀ` for a trained weight under bf16 autocast: `x` and `W` rounded to bf16 for the
/// product, sums and result in f32 (our bf16 kernels); the backward's products `dX = dY W`
/// and `dW = dYᵀ X` alike, `dW` arriving in f32 for the f32 master weight and AdamW.
fn trained_bf16_product(xs: &Tensor, w: &Tensor) -> Result<Tensor> {
    xs.contiguous()?
        .apply_op2(&w.contiguous()?, TrainedBf16Product)
}

struct TrainedBf16Product;

impl candle_core::CustomOp2 for TrainedBf16Product {
    fn name(&self) -> &'static str {
        "trained-bf16-product"
    }

    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        ws: &candle_core::CpuStorage,
        wl: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = storage_tensor(xs, xl, self.name())?;
        let w = storage_tensor(ws, wl, self.name())?;
        let y = crate::kernels::bf16::PackedBf16::pack(&w)?.matmul(&x)?;
        tensor_storage(&y.to_dtype(x.dtype())?, self.name())
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        use crate::kernels::bf16::PackedBf16;
        let (n, k) = w.dims2()?;
        // dY W = dY (Wᵀ)ᵀ, and dYᵀ X = dYᵀ (Xᵀ)ᵀ: the kernels multiply by a packed
        // matrix's transpose.
        let dx = PackedBf16::pack(&transposed(w)?)?.matmul(grad)?;
        let xt = transposed(&x.reshape(((), k))?)?;
        let dw = PackedBf16::pack(&xt)?.matmul(&transposed(&grad.reshape(((), n))?)?)?;
        Ok((Some(dx.to_dtype(x.dtype())?), Some(dw.to_dtype(w.dtype())?)))
    }
}

/// The transpose of a 2-D f32 CPU tensor, contiguous: by tiles on the thread pool, where
/// candle's strided copy went element by element down the source's columns (12 % of a
/// `--bf16` finetuning step, which transposes the input and the gradient of every trained
/// matrix for `dW`). Other tensors take candle's copy.
fn transposed(t: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let (rows, cols) = t.dims2()?;
    if t.dtype() != DType::F32 || !t.device().is_cpu() {
        return t.t()?.contiguous();
    }
    const TILE: usize = 32;
    let mut out = vec![0f32; rows * cols];
    with_f32(t, |src| {
        // One task per band of TILE output rows (TILE source columns).
        out.par_chunks_mut(TILE * rows)
            .enumerate()
            .for_each(|(band, dst)| {
                let c0 = band * TILE;
                let width = TILE.min(cols - c0);
                for r0 in (0..rows).step_by(TILE) {
                    for r in r0..(r0 + TILE).min(rows) {
                        let row = &src[r * cols + c0..r * cols + c0 + width];
                        for (j, &v) in row.iter().enumerate() {
                            dst[j * rows + r] = v;
                        }
                    }
                }
            });
        Ok(())
    })?;
    Tensor::from_vec(out, (cols, rows), t.device())
}

/// `y + bias` (broadcast over rows), or `y`.
fn with_bias(y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Whether a ggml type holds plain floats (a GGUF file's F32/F16/BF16 matrices, or ours
/// from [`Linear::packed`]) rather than quantized blocks.
fn is_float(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
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

/// Element `i`'s uniform draw in `[0, 1)` from a dropout stream: the top 24 bits of its hash.
fn dropout_draw(stream: u64, i: u64) -> f32 {
    (splitmix64(stream.wrapping_add(i)) >> 40) as f32 / (1u64 << 24) as f32
}

/// Inverted dropout with masks from the current seed and `key`: each element is zeroed
/// with probability `p`, the rest scaled by `1 / (1 − p)`.
fn seeded_dropout(xs: &Tensor, p: f32, key: u64) -> Result<Tensor> {
    let seed = DROPOUT_SEED.with(|s| s.get());
    let base = splitmix64(seed ^ splitmix64(key));
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..xs.elem_count() as u64)
        .map(|i| if dropout_draw(base, i) < p { 0.0 } else { keep })
        .collect();
    let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
    xs * mask
}

impl Linear {
    /// Loads `weight` (`[out, in]`) and, when `bias`, `bias` (`[out]`), straight into the
    /// form `m` asks for: the weight as stored when `m` holds it in blocks, read in bf16
    /// when it is to be packed for our bf16 kernels (it never exists wider).
    pub fn load(
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        m: Matrices,
    ) -> Result<Self> {
        let read_bias = |dtype| match bias {
            true => vb
                .get_with_hints_dtype(out_dim, "bias", Default::default(), dtype)
                .map(Some),
            false => Ok(None),
        };
        let layer = match m.stored(&format!("{}.weight", vb.prefix()))? {
            Some(weight) => {
                if weight.shape().dims2()? != (out_dim, in_dim) {
                    candle_core::bail!(
                        "{}.weight is stored as {:?}, the config implies ({out_dim}, {in_dim})",
                        vb.prefix(),
                        weight.shape()
                    );
                }
                let bias = read_bias(DType::F32)?;
                Linear::Quantized { weight, bias }
            }
            None => {
                let dtype = match m.pack {
                    Pack::Bf16 => DType::BF16,
                    _ => vb.dtype(),
                };
                // The weight before the bias: trainable parameters are listed in read order.
                let weight = vb.get_with_hints_dtype(
                    (out_dim, in_dim),
                    "weight",
                    Default::default(),
                    dtype,
                )?;
                Linear::Dense(candle_nn::Linear::new(weight, read_bias(vb.dtype())?))
            }
        };
        layer.in_form(m.pack)
    }

    /// The layer held as `pack` says.
    pub fn in_form(&self, pack: Pack) -> Result<Linear> {
        match pack {
            Pack::AsRead => Ok(self.clone()),
            Pack::F32 => self.to_f32(),
            Pack::Ggml => self.packed(),
            Pack::Bf16 => self.packed_bf16(),
            Pack::Q4_0 => self.quantize_4bit(),
        }
    }

    pub fn from_weight(weight: Tensor) -> Self {
        Linear::Dense(candle_nn::Linear::new(weight, None))
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Dense(l) if frozen_under_training(xs, Some(l.weight())) => with_bias(
                frozen_product(xs, FrozenWeight::Dense(l.weight().clone()))?,
                l.bias(),
            ),
            Linear::Dense(l) if autocast_bf16(xs, l.weight()) => {
                with_bias(trained_bf16_product(xs, l.weight())?, l.bias())
            }
            Linear::Dense(l) if trained_on_cpu(xs, l.weight()) => with_bias(
                xs.contiguous()?.apply_op2(l.weight(), TrainedProduct)?,
                l.bias(),
            ),
            Linear::Dense(l) => l.forward(xs),
            Linear::Quantized { weight, bias } if frozen_under_training(xs, None) => with_bias(
                frozen_product(xs, FrozenWeight::Quantized(weight.clone()))?,
                bias.as_ref(),
            ),
            Linear::Quantized { weight, bias } => {
                let rows = xs.elem_count() / xs.dim(D::Minus1)?.max(1);
                let float = is_float(weight.dtype());
                let mut ours = None;
                if !xs.track_op() {
                    if rows <= crate::kernels::kquant::max_rows() {
                        ours = crate::kernels::kquant::try_matmul(weight, xs)?;
                    }
                    if ours.is_none()
                        && rows > crate::kernels::kquant::gemm_above_rows()
                        && crate::kernels::bf16::available()
                    {
                        ours = crate::kernels::bf16::matmul_ggml(weight, xs)?;
                    }
                }
                let y = if let Some(y) = ours {
                    // Decoding a Q4_K/Q6_K weight (and, with the AVX2 kernels, prefill):
                    // our integer kernels (crate::kernels::kquant). Other prefill with a quantized
                    // weight: our bf16 GEMM, the weight unpacked block by block
                    // (crate::kernels::bf16::matmul_ggml).
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
                with_bias(y, bias.as_ref())
            }
            Linear::Bf16 {
                weight,
                bias,
                transposed: Some(wt),
            } if frozen_under_training(xs, None) => with_bias(
                frozen_product(
                    xs,
                    FrozenWeight::Bf16 {
                        w: weight.clone(),
                        wt: wt.clone(),
                    },
                )?,
                bias.as_ref(),
            ),
            Linear::Bf16 { weight, bias, .. } => {
                if xs.track_op() {
                    candle_core::bail!("a layer packed for bf16 inference cannot be trained");
                }
                with_bias(weight.matmul(xs)?.to_dtype(xs.dtype())?, bias.as_ref())
            }
            Linear::Lora(l) => {
                if let Some((op, bias)) = LoraProduct::for_input(l, xs)? {
                    let (a, b) = (l.a.contiguous()?, l.b.contiguous()?);
                    let y = xs.contiguous()?.apply_op3_arc(
                        &a,
                        &b,
                        std::sync::Arc::new(Box::new(op)),
                    )?;
                    return with_bias(y, bias.as_ref());
                }
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

    /// The layer packed for our bf16 kernels: a dense one, or one held in a ggml float
    /// type (a GGUF file's F16 matrices); quantized and adapted ones stay as they are.
    pub fn packed_bf16(&self) -> Result<Linear> {
        let (w, b) = match self {
            Linear::Dense(l) => (l.weight().clone(), l.bias().cloned()),
            Linear::Quantized { weight, bias } if is_float(weight.dtype()) => {
                (weight.dequantize(&candle_core::Device::Cpu)?, bias.clone())
            }
            _ => return Ok(self.clone()),
        };
        Ok(Linear::Bf16 {
            weight: std::sync::Arc::new(crate::kernels::bf16::PackedBf16::pack(&w)?),
            bias: b.map(|b| b.to_dtype(DType::F32)).transpose()?,
            transposed: None,
        })
    }

    /// For training in bf16 (`train --bf16`): a frozen dense weight (one that is not a
    /// parameter) packed for our bf16 kernels both ways, `W` for the forward and `Wᵀ` for
    /// the input's gradient; under an adapter, its base. Trained, quantized and already
    /// packed layers stay as they are. Needs [`crate::kernels::bf16::available`].
    pub fn frozen_bf16(&self) -> Result<Linear> {
        use crate::kernels::bf16::PackedBf16;
        match self {
            Linear::Dense(l) if !l.weight().track_op() => {
                let w = l.weight().detach();
                Ok(Linear::Bf16 {
                    weight: std::sync::Arc::new(PackedBf16::pack(&w)?),
                    bias: l.bias().map(|b| b.to_dtype(DType::F32)).transpose()?,
                    transposed: Some(std::sync::Arc::new(PackedBf16::pack(&transposed(&w)?)?)),
                })
            }
            Linear::Lora(l) => {
                let mut l = l.clone();
                l.base = l.base.frozen_bf16()?;
                Ok(Linear::Lora(l))
            }
            _ => Ok(self.clone()),
        }
    }

    /// The fewest rows from which each row of a product is the same numbers however many
    /// rows there are (below it another kernel, summing in another order, takes the rows:
    /// candle's matrix-vector path for one row, candle's quantized kernels below
    /// [`GEMM_ROWS`] for a float weight in a ggml container and up to
    /// [`crate::kernels::kquant::gemm_above_rows`] for a quantized type (our k-quant kernels or
    /// candle's), the bf16
    /// kernels' matrix-vector path up to [`crate::kernels::bf16::GEMV_ROWS`]). A prompt cut into
    /// steps at least this long is computed the same as in one step.
    pub fn steady_rows(&self) -> usize {
        match self {
            Linear::Dense(_) => 2,
            Linear::Quantized { weight, .. } if is_float(weight.dtype()) => GEMM_ROWS,
            // Quantized types: our k-quant kernels (with AVX512 up to the GEMM's threshold;
            // with AVX2 every step) or candle's, then the bf16 GEMM.
            Linear::Quantized { .. } => match crate::kernels::kquant::gemm_above_rows() {
                n if n == usize::MAX || !crate::kernels::bf16::available() => 2,
                n => n + 1,
            },
            Linear::Bf16 { .. } => crate::kernels::bf16::GEMV_ROWS + 1,
            Linear::Lora(l) => l.base.steady_rows().max(2),
        }
    }

    /// Whether the weight is stored in a quantized ggml type (not a float one).
    pub fn is_quantized(&self) -> bool {
        match self {
            Linear::Quantized { weight, .. } => !is_float(weight.dtype()),
            Linear::Lora(l) => l.base.is_quantized(),
            _ => false,
        }
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
            Linear::Bf16 {
                weight,
                bias,
                transposed,
            } => {
                weight.stored_bytes()
                    + transposed.as_ref().map_or(0, |t| t.stored_bytes())
                    + bias.as_ref().map_or(0, tensor)
            }
        }
    }

    /// A dense copy in f32 (of a dense layer or one held in a ggml float type).
    pub fn to_f32(&self) -> Result<Linear> {
        Ok(match self {
            Linear::Dense(l) => Linear::Dense(candle_nn::Linear::new(
                l.weight().to_dtype(DType::F32)?,
                l.bias().map(|b| b.to_dtype(DType::F32)).transpose()?,
            )),
            Linear::Quantized { weight, bias } if is_float(weight.dtype()) => {
                Linear::Dense(candle_nn::Linear::new(
                    weight.dequantize(&candle_core::Device::Cpu)?,
                    bias.as_ref().map(|b| b.to_dtype(DType::F32)).transpose()?,
                ))
            }
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
        if xs.track_op()
            && xs.device().is_cpu()
            && xs.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
        {
            // Training: one op, whose backward needs only `x` and the weight.
            return xs
                .contiguous()?
                .apply_op2(&self.weight, RmsNormOp(self.eps));
        }
        rms_normalize(&xs.to_dtype(DType::F32)?, self.eps)?
            .to_dtype(xs.dtype())?
            .broadcast_mul(&self.weight)
    }
}

/// `x / √(mean(x²) + eps)` over the last dimension, in f32: RMSNorm before its weight.
fn rms_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(var + eps)?.sqrt()?)
}

/// RMSNorm for training on the CPU as one op: `y = x · rstd · w` with
/// `rstd = 1/√(mean(x²) + eps)` per row. candle's ops kept five row-sized intermediates for
/// the backward and computed a gradient for the (often frozen) weight through broadcasts;
/// this backward recomputes `rstd` from `x` and gives
/// `dx = rstd · (g·w − x̂ · mean(g·w·x̂))` (`x̂ = x · rstd`) and, for a trained weight,
/// `dw = Σ_rows g · x̂`.
struct RmsNormOp(f64);

impl RmsNormOp {
    /// Each row's `rstd`.
    fn rstd(&self, x: &[f32], h: usize) -> Vec<f32> {
        x.chunks_exact(h)
            .map(|r| {
                let ms = r.iter().map(|v| v * v).sum::<f32>() / h as f32;
                1.0 / (ms + self.0 as f32).sqrt()
            })
            .collect()
    }
}

impl candle_core::CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        ws: &candle_core::CpuStorage,
        wl: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        // The untracked path's arithmetic, so that a forward run with and without
        // gradients (gradient checkpointing runs both) gives the same numbers.
        let x = storage_tensor(xs, xl, "rms-norm")?;
        let w = storage_tensor(ws, wl, "rms-norm")?;
        let y = rms_normalize(&x, self.0)?.broadcast_mul(&w)?;
        tensor_storage(&y, "rms-norm")
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let h = w.elem_count();
        let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let wv: Vec<f32> = w.to_vec1()?;
        let gv: Vec<f32> = grad.flatten_all()?.to_vec1()?;
        let mut dx = vec![0f32; xv.len()];
        // Summed over every row of the batch: in f64, so that the order of rows is moot.
        let mut dw = vec![0f64; h];
        for (((dxr, xr), gr), r) in dx
            .chunks_exact_mut(h)
            .zip(xv.chunks_exact(h))
            .zip(gv.chunks_exact(h))
            .zip(self.rstd(&xv, h))
        {
            // mean(g·w·x̂) over the row.
            let dot = xr
                .iter()
                .zip(gr)
                .zip(&wv)
                .map(|((&xi, &gi), &wi)| gi * wi * xi * r)
                .sum::<f32>()
                / h as f32;
            for i in 0..h {
                let xhat = xr[i] * r;
                dxr[i] = r * (gr[i] * wv[i] - xhat * dot);
                dw[i] += (gr[i] * xhat) as f64;
            }
        }
        let dev = x.device();
        let dw = w
            .track_op()
            .then(|| Tensor::from_vec(dw.iter().map(|&v| v as f32).collect::<Vec<_>>(), h, dev))
            .transpose()?;
        Ok((Some(Tensor::from_vec(dx, x.shape(), dev)?), dw))
    }
}

/// `torch.nn.LayerNorm` with weight and bias (or weight only: MPT's `no_bias`).
#[derive(Debug, Clone)]
pub struct LayerNorm(candle_nn::LayerNorm, f64);

impl LayerNorm {
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Self::load_with_bias(vb, size, eps, true)
    }

    pub fn load_with_bias(vb: VarBuilder, size: usize, eps: f64, bias: bool) -> Result<Self> {
        let weight = vb.get(size, "weight")?;
        Ok(Self(
            if bias {
                candle_nn::LayerNorm::new(weight, vb.get(size, "bias")?, eps)
            } else {
                candle_nn::LayerNorm::new_no_bias(weight, eps)
            },
            eps,
        ))
    }

    /// The weights in f32 (a model packed for inference computes its activations in f32).
    pub fn to_f32(&self) -> Result<Self> {
        let w = self.0.weight().to_dtype(DType::F32)?;
        let eps = self.1;
        Ok(Self(
            match self.0.bias() {
                Some(b) => candle_nn::LayerNorm::new(w, b.to_dtype(DType::F32)?, eps),
                None => candle_nn::LayerNorm::new_no_bias(w, eps),
            },
            eps,
        ))
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

/// `act(gate) · up`, the gated MLP's middle. Inference on the CPU with SiLU (LLaMA's,
/// Mistral's) writes the result over `gate`'s buffer in one pass with a vectorized `exp`:
/// candle's ops would allocate two more buffers as large (28 MB each per layer of a 7B
/// model's 600-token prefill) and call the scalar `exp` per element. `gate` must be a
/// fresh product nobody else holds (it is taken by value for that reason).
pub fn gated(act: Activation, gate: Tensor, up: &Tensor) -> Result<Tensor> {
    let fused = act == Activation::Silu
        && !gate.track_op()
        && !up.track_op()
        && gate.device().is_cpu()
        && gate.dtype() == DType::F32
        && up.dtype() == DType::F32
        && gate.shape() == up.shape()
        && gate.is_contiguous()
        && up.is_contiguous();
    if !fused {
        let trainable = act == Activation::Silu
            && gate.device().is_cpu()
            && gate.dtype() == DType::F32
            && up.dtype() == DType::F32
            && gate.shape() == up.shape();
        if trainable && (gate.track_op() || up.track_op()) {
            return gate.contiguous()?.apply_op2(&up.contiguous()?, SiluGate);
        }
        return activate(act, &gate)? * up;
    }
    gate.inplace_op2(up, &SiluTimes)?;
    Ok(gate)
}

/// `act(xs)`, written over `xs`'s buffer when it can be (inference on the CPU in f32 with
/// SiLU or CLIP's quick GELU: one pass, a vectorized `exp`, no new buffer); `xs` must be a
/// fresh result nobody else holds.
pub fn activate_owned(act: Activation, xs: Tensor) -> Result<Tensor> {
    let fused = matches!(act, Activation::Silu | Activation::QuickGelu)
        && !xs.track_op()
        && xs.device().is_cpu()
        && xs.dtype() == DType::F32
        && xs.is_contiguous();
    if !fused {
        return activate(act, &xs);
    }
    xs.inplace_op1(&InPlace(act))?;
    Ok(xs)
}

/// `σ(z) = 1 / (1 + e^(−z))` from `e^(−|z|) ≤ 1`, so neither tail overflows.
#[inline(always)]
fn sigmoid(z: f32) -> f32 {
    let e = exp_nonpositive(-z.abs());
    (if z >= 0.0 { 1.0 } else { e }) / (1.0 + e)
}

/// Runs `f` over `xs` in chunks, on the thread pool when there are many.
fn for_chunks(xs: &mut [f32], f: impl Fn(&mut [f32], usize) + Sync) {
    const CHUNK: usize = 1 << 14;
    if xs.len() <= CHUNK {
        // Decoding: one row, not worth waking threads for.
        f(xs, 0);
    } else {
        use rayon::prelude::*;
        xs.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(i, c)| f(c, i * CHUNK));
    }
}

/// `xs ← act(xs)`, for [`activate_owned`].
struct InPlace(Activation);

impl candle_core::InplaceOp1 for InPlace {
    fn name(&self) -> &'static str {
        "activation"
    }

    fn cpu_fwd(&self, s: &mut candle_core::CpuStorage, l: &candle_core::Layout) -> Result<()> {
        let candle_core::CpuStorage::F32(v) = s else {
            candle_core::bail!("in-place activation on f32 tensors");
        };
        let v = &mut v[l.start_offset()..l.start_offset() + l.shape().elem_count()];
        let k = match self.0 {
            Activation::Silu => 1.0,
            Activation::QuickGelu => 1.702,
            other => candle_core::bail!("no in-place {other:?}"),
        };
        for_chunks(v, |c, _| {
            for x in c {
                *x *= sigmoid(k * *x);
            }
        });
        Ok(())
    }
}

/// `gate ← silu(gate) · up`, for [`gated`].
struct SiluTimes;

impl candle_core::InplaceOp2 for SiluTimes {
    fn name(&self) -> &'static str {
        "silu-times"
    }

    fn cpu_fwd(
        &self,
        gate: &mut candle_core::CpuStorage,
        gl: &candle_core::Layout,
        up: &candle_core::CpuStorage,
        ul: &candle_core::Layout,
    ) -> Result<()> {
        let n = gl.shape().elem_count();
        let (candle_core::CpuStorage::F32(g), candle_core::CpuStorage::F32(u)) = (gate, up) else {
            candle_core::bail!("silu-times on f32 tensors");
        };
        let g = &mut g[gl.start_offset()..gl.start_offset() + n];
        let u = &u[ul.start_offset()..ul.start_offset() + n];
        for_chunks(g, |g, at| {
            for (g, &u) in g.iter_mut().zip(&u[at..]) {
                *g = *g * sigmoid(*g) * u;
            }
        });
        Ok(())
    }
}

/// A contiguous f32 CPU tensor's values, borrowed (a custom op's backward reads its saved
/// inputs and the incoming gradient this way instead of copying them out).
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) =
        (&*storage, layout.contiguous_offsets())
    else {
        candle_core::bail!("a contiguous f32 CPU tensor is expected");
    };
    f(&v[a..b])
}

/// A contiguous f32 CPU storage's values.
fn f32_span<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    op: &str,
) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: a contiguous f32 input is expected"),
    }
}

/// `silu(gate) · up` for training on the CPU, as one op ([`gated`] with gradients): the
/// forward is [`SiluTimes`]'s arithmetic (so that a checkpointed layer's recomputation
/// gives the numbers of its first forward), and the backward is one pass giving both
/// gradients, `d_up = g · silu(gate)` and `d_gate = g · up · σ(gate)(1 + gate(1 − σ(gate)))`,
/// where candle's ops ran about ten passes over intermediate-sized tensors and kept three.
struct SiluGate;

impl candle_core::CustomOp2 for SiluGate {
    fn name(&self) -> &'static str {
        "silu-gate"
    }

    fn cpu_fwd(
        &self,
        gs: &candle_core::CpuStorage,
        gl: &candle_core::Layout,
        us: &candle_core::CpuStorage,
        ul: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let g = f32_span(gs, gl, "silu-gate")?;
        let u = f32_span(us, ul, "silu-gate")?;
        let mut out = g.to_vec();
        for_chunks(&mut out, |o, at| {
            for (o, &u) in o.iter_mut().zip(&u[at..]) {
                *o = *o * sigmoid(*o) * u;
            }
        });
        Ok((candle_core::CpuStorage::F32(out), gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut d_gate = with_f32(gate, |g| Ok(g.to_vec()))?;
        let mut d_up = vec![0f32; d_gate.len()];
        with_f32(up, |u| {
            with_f32(grad, |dy| {
                const CHUNK: usize = 1 << 14;
                use rayon::prelude::*;
                d_gate
                    .par_chunks_mut(CHUNK)
                    .zip(d_up.par_chunks_mut(CHUNK))
                    .enumerate()
                    .for_each(|(i, (dg, du))| {
                        let at = i * CHUNK;
                        for (j, (dg, du)) in dg.iter_mut().zip(du).enumerate() {
                            let (x, s) = (*dg, sigmoid(*dg));
                            let dy = dy[at + j];
                            *du = dy * x * s;
                            *dg = dy * u[at + j] * s * (1.0 + x * (1.0 - s));
                        }
                    });
                Ok(())
            })
        })?;
        let dev = gate.device();
        let d_up = up
            .track_op()
            .then(|| Tensor::from_vec(d_up, up.shape(), dev))
            .transpose()?;
        let d_gate = gate
            .track_op()
            .then(|| Tensor::from_vec(d_gate, gate.shape(), dev))
            .transpose()?;
        Ok((d_gate, d_up))
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
    let scores = q.matmul(&k.t()?)?;
    probs_matmul(&scaled_masked_softmax(&scores, scale, mask)?, v)
}

fn probs_matmul(p: &Tensor, v: &Tensor) -> Result<Tensor> {
    p.matmul(v)
}

/// `softmax(scores · scale + mask)` over the last dimension, for inference in one parallel
/// pass over the scores (instead of three tensor ops and a scalar `exp` per element).
/// `scores: (b, h, r·s, t)` with `mask: (b, 1, s, t)`: row `i` of a head takes mask row
/// `i mod s` (grouped-query attention stacks `r` heads' queries). With gradients tracked,
/// on other devices or dtypes, the same math runs as differentiable tensor ops.
pub fn scaled_masked_softmax(scores: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let (b, h, rows, t) = scores.dims4()?;
    let mask_rows = match mask {
        Some(m) => Some(m.dims4()?)
            .filter(|&(mb, one, s, mt)| mb == b && one == 1 && mt == t && s > 0 && rows % s == 0),
        None => None,
    };
    let fused = !scores.track_op()
        && scores.device().is_cpu()
        && scores.dtype() == DType::F32
        && mask.is_none_or(|m| mask_rows.is_some() && m.dtype() == DType::F32);
    if !fused {
        let s = (scores * scale)?;
        let s = match mask {
            Some(m) if rows != m.dim(2)? => {
                let (mb, _, ms, mt) = m.dims4()?;
                s.reshape((b, h, rows / ms, ms, t))?
                    .broadcast_add(&m.reshape((mb, 1, 1, ms, mt))?)?
                    .reshape((b, h, rows, t))?
            }
            Some(m) => s.broadcast_add(m)?,
            None => s,
        };
        return softmax_last_dim(&s);
    }
    use rayon::prelude::*;
    let scores = scores.contiguous()?;
    let mask = mask.map(Tensor::contiguous).transpose()?;
    let (ss, sl) = scores.storage_and_layout();
    let candle_core::Storage::Cpu(ss) = &*ss else {
        candle_core::bail!("fused softmax runs on CPU tensors");
    };
    let sv = &ss.as_slice::<f32>()?[sl.start_offset()..sl.start_offset() + b * h * rows * t];
    let guard = mask.as_ref().map(|m| m.storage_and_layout());
    let mv = match &guard {
        Some((ms, ml)) => {
            let candle_core::Storage::Cpu(ms) = &**ms else {
                candle_core::bail!("fused softmax runs on CPU tensors");
            };
            let s = mask_rows.map_or(0, |(_, _, s, _)| s);
            Some((
                &ms.as_slice::<f32>()?[ml.start_offset()..ml.start_offset() + b * s * t],
                s,
            ))
        }
        None => None,
    };
    let scale = scale as f32;
    let mut out = vec![0f32; b * h * rows * t];
    out.par_chunks_mut(t).enumerate().for_each(|(row, o)| {
        let src = &sv[row * t..(row + 1) * t];
        match mv {
            Some((m, s)) => {
                let at = ((row / (h * rows)) * s + (row % rows) % s) * t;
                for ((o, &x), &mk) in o.iter_mut().zip(src).zip(&m[at..at + t]) {
                    *o = x * scale + mk;
                }
            }
            None => {
                for (o, &x) in o.iter_mut().zip(src) {
                    *o = x * scale;
                }
            }
        }
        softmax_in_place(o);
    });
    drop(guard);
    Tensor::from_vec(out, (b, h, rows, t), scores.device())
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

/// A projection's output `xs: (b, s, heads·d)` split into heads `(b, heads, s, d)` and
/// rotated by `cos/sin: (b, s, d/2)` ([`rope`]'s layout and arithmetic). Training on the
/// CPU in f32 takes one op for both ([`RopeHeads`]); otherwise candle's transpose and rope.
pub fn rope_heads(xs: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, s, width) = xs.dims3()?;
    let d = width / heads;
    if xs.track_op() && xs.device().is_cpu() && xs.dtype() == DType::F32 && d.is_multiple_of(2) {
        let table = |t: &Tensor| -> Result<std::sync::Arc<Vec<f32>>> {
            let t = t.to_dtype(DType::F32)?;
            if t.dims() != [b, s, d / 2] {
                candle_core::bail!("rope: a table {:?} for {:?}", t.dims(), xs.dims());
            }
            Ok(std::sync::Arc::new(t.flatten_all()?.to_vec1()?))
        };
        let op = RopeHeads {
            heads,
            cos: table(cos)?,
            sin: table(sin)?,
        };
        return xs.contiguous()?.apply_op1(op);
    }
    let split = xs
        .reshape((b, s, heads, d))?
        .transpose(1, 2)?
        .contiguous()?;
    rope(&split, cos, sin)
}

/// [`rope_heads`] for training: `x: (b, s, heads·d) → (b, heads, s, d)` with
/// `y₁ = x₁ cos − x₂ sin`, `y₂ = x₁ sin + x₂ cos` (the halves of each head), and the
/// backward `dx₁ = dy₁ cos + dy₂ sin`, `dx₂ = dy₂ cos − dy₁ sin` written back in the
/// projection's layout: one pass each way, where candle's ops took a copy for the split and
/// about ten passes (and as many kept intermediates) for the rotation.
struct RopeHeads {
    heads: usize,
    cos: std::sync::Arc<Vec<f32>>,
    sin: std::sync::Arc<Vec<f32>>,
}

impl candle_core::CustomOp1 for RopeHeads {
    fn name(&self) -> &'static str {
        "rope-heads"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let x = f32_span(storage, layout, "rope-heads")?;
        let (b, s, width) = layout.shape().dims3()?;
        let (n, d) = (self.heads, width / self.heads);
        let half = d / 2;
        let mut out = vec![0f32; x.len()];
        // One task per (batch row, head): its `s × d` block of the output is contiguous.
        out.par_chunks_mut(s * d).enumerate().for_each(|(bh, o)| {
            let (bi, h) = (bh / n, bh % n);
            for t in 0..s {
                let row = (bi * s + t) * width + h * d;
                let (x1, x2) = x[row..row + d].split_at(half);
                let cs = (bi * s + t) * half;
                let (c, sn) = (&self.cos[cs..cs + half], &self.sin[cs..cs + half]);
                let (o1, o2) = o[t * d..(t + 1) * d].split_at_mut(half);
                for i in 0..half {
                    o1[i] = x1[i] * c[i] - x2[i] * sn[i];
                    o2[i] = x1[i] * sn[i] + x2[i] * c[i];
                }
            }
        });
        Ok((candle_core::CpuStorage::F32(out), (b, n, s, d).into()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        use rayon::prelude::*;
        let (b, s, width) = x.dims3()?;
        let (n, d) = (self.heads, width / self.heads);
        let half = d / 2;
        let mut dx = vec![0f32; b * s * width];
        with_f32(grad, |dy| {
            // One task per position: its row of `dx` gathers every head's gradient.
            dx.par_chunks_mut(width).enumerate().for_each(|(row, out)| {
                let (bi, t) = (row / s, row % s);
                let cs = row * half;
                let (c, sn) = (&self.cos[cs..cs + half], &self.sin[cs..cs + half]);
                for h in 0..n {
                    let at = ((bi * n + h) * s + t) * d;
                    let (g1, g2) = dy[at..at + d].split_at(half);
                    let (o1, o2) = out[h * d..(h + 1) * d].split_at_mut(half);
                    for i in 0..half {
                        o1[i] = g1[i] * c[i] + g2[i] * sn[i];
                        o2[i] = g2[i] * c[i] - g1[i] * sn[i];
                    }
                }
            });
            Ok(())
        })?;
        Ok(Some(Tensor::from_vec(dx, (b, s, width), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use kollava_testkit::{assert_values_and_grads, max_abs, max_abs_diff_tensors, probed_grads};

    /// A frozen weight's product ([`frozen_product`]) against candle's own `Linear` on
    /// the same tracked input: the same values, and the same input gradient, for 2-D and
    /// 3-D inputs of odd sizes, with and without bias; a ggml weight (QLoRA's base) against
    /// its widened copy.
    #[test]
    fn frozen_products_give_candles_values_and_input_gradients() {
        let dev = Device::Cpu;
        for (rows, inp, out) in [(1, 1, 1), (7, 33, 5), (37, 64, 130), (301, 200, 190)] {
            for batched in [false, true] {
                for bias in [false, true] {
                    let shape: Vec<usize> = if batched {
                        vec![3, rows, inp]
                    } else {
                        vec![rows, inp]
                    };
                    let x =
                        Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap();
                    let w = Tensor::randn(0f32, 1.0, (out, inp), &dev).unwrap();
                    let b = bias.then(|| Tensor::randn(0f32, 1.0, out, &dev).unwrap());
                    // A fixed weighting of the outputs, so that every output position counts.
                    let probe = |y: &Tensor| {
                        let r = Tensor::randn(0f32, 1.0, y.shape(), &dev).unwrap();
                        (y.clone(), r)
                    };
                    let ours = Linear::Dense(candle_nn::Linear::new(w.clone(), b.clone()))
                        .forward(x.as_tensor())
                        .unwrap();
                    let theirs = candle_nn::Linear::new(w.clone(), b.clone())
                        .forward(x.as_tensor())
                        .unwrap();
                    let (ours, r) = probe(&ours);
                    let diff = |a: &Tensor, b: &Tensor| {
                        (a - b)
                            .unwrap()
                            .abs()
                            .unwrap()
                            .max_all()
                            .unwrap()
                            .to_scalar::<f32>()
                            .unwrap()
                    };
                    assert_eq!(diff(&ours, &theirs), 0.0, "{rows}x{inp}x{out}");
                    let g_ours = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    let g_theirs = (theirs * &r)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    let (a, b) = (
                        g_ours.get(x.as_tensor()).unwrap(),
                        g_theirs.get(x.as_tensor()).unwrap(),
                    );
                    assert!(
                        diff(a, b) <= 1e-5 * (inp as f32),
                        "{rows}x{inp}x{out}: {}",
                        diff(a, b)
                    );
                    assert!(diff(b, &b.zeros_like().unwrap()) > 0.0);
                }
            }
        }
        // QLoRA's frozen 4-bit base: the product of its widened weight, both ways.
        let w = Tensor::randn(0f32, 1.0, (96, 64), &dev).unwrap();
        let q = std::sync::Arc::new(QTensor::quantize(&w, GgmlDType::Q4_0).unwrap());
        let widened = q.dequantize(&dev).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 9, 64), &dev).unwrap()).unwrap();
        let ours = Linear::Quantized {
            weight: q,
            bias: None,
        }
        .forward(x.as_tensor())
        .unwrap();
        let theirs = candle_nn::Linear::new(widened, None)
            .forward(x.as_tensor())
            .unwrap();
        let d = (&ours - &theirs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
        let ga = ours.sum_all().unwrap().backward().unwrap();
        let gb = theirs.sum_all().unwrap().backward().unwrap();
        let (a, b) = (
            ga.get(x.as_tensor()).unwrap(),
            gb.get(x.as_tensor()).unwrap(),
        );
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-4, "{d}");
    }

    /// Input shapes and output widths the bf16 training products are checked on: odd
    /// sizes, batched inputs.
    const BF16_SHAPES: [(&[usize], usize); 3] =
        [(&[5, 33], 7), (&[2, 19, 64], 130), (&[3, 40, 96], 17)];

    /// Whether this CPU has bf16 kernels (else the test says it is skipped).
    fn bf16_kernels_or_skip() -> bool {
        let ok = crate::kernels::bf16::available();
        if !ok {
            eprintln!("skipped: no bf16 kernels on this CPU");
        }
        ok
    }

    /// `train --bf16`'s frozen product ([`Linear::frozen_bf16`]) against candle's f32 product
    /// of the same weight: values and input gradients within bf16 rounding (inputs and
    /// weights rounded to 8 bits of mantissa, f32 sums), on odd sizes and batched inputs;
    /// a trained (variable) weight is left dense.
    #[test]
    fn frozen_bf16_products_track_the_f32_values_and_input_gradients() {
        if !bf16_kernels_or_skip() {
            return;
        }
        let dev = Device::Cpu;
        for (shape, out) in BF16_SHAPES.map(|(s, o)| (s.to_vec(), o)) {
            let inp = *shape.last().unwrap();
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap();
            let w = Tensor::randn(0f32, 1.0, (out, inp), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, out, &dev).unwrap();
            let dense = Linear::Dense(candle_nn::Linear::new(w.clone(), Some(b.clone())));
            let packed = dense.frozen_bf16().unwrap();
            assert!(matches!(
                packed,
                Linear::Bf16 {
                    transposed: Some(_),
                    ..
                }
            ));
            let ours = packed.forward(x.as_tensor()).unwrap();
            let theirs = dense.forward(x.as_tensor()).unwrap();
            let scale = (inp as f32).sqrt();
            let err = max_abs_diff_tensors(&ours, &theirs);
            assert!(err < 0.02 * scale, "{inp}x{out}: forward off by {err}");
            let (a, b) = probed_grads(&ours, &theirs, &[&x]).remove(0);
            let err = max_abs_diff_tensors(&a, &b);
            let outs = (out as f32).sqrt();
            // Sums of few products are dominated by their largest terms' rounding (2⁻⁸
            // per operand): a share of the largest value, beside the √n of long sums.
            assert!(
                err < 0.02 * outs + max_abs(&b) / 64.0,
                "{inp}x{out}: input gradient off by {err}"
            );
            assert!(max_abs(&b) > 0.1 * outs);
        }
        let trained = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 8), &dev).unwrap()).unwrap();
        let l = Linear::Dense(candle_nn::Linear::new(trained.as_tensor().clone(), None));
        assert!(matches!(l.frozen_bf16().unwrap(), Linear::Dense(_)));
    }

    /// A trained weight's product under bf16 autocast against candle's f32 product: values,
    /// and gradients of the input and the weight, within bf16 rounding (inputs rounded to 8
    /// bits of mantissa, f32 sums), on odd sizes and batched inputs; outside autocast the
    /// product is candle's own.
    #[test]
    fn autocast_bf16_products_track_the_f32_values_and_both_gradients() {
        if !bf16_kernels_or_skip() {
            return;
        }
        let dev = Device::Cpu;
        for (shape, out) in BF16_SHAPES.map(|(s, o)| (s.to_vec(), o)) {
            let inp = *shape.last().unwrap();
            let rows: usize = shape[..shape.len() - 1].iter().product();
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (out, inp), &dev).unwrap()).unwrap();
            let b = Tensor::randn(0f32, 1.0, out, &dev).unwrap();
            let l = Linear::Dense(candle_nn::Linear::new(w.as_tensor().clone(), Some(b)));
            let ours = with_bf16_autocast(true, || l.forward(x.as_tensor())).unwrap();
            let theirs = l.forward(x.as_tensor()).unwrap();
            let scale = (inp as f32).sqrt();
            let err = max_abs_diff_tensors(&ours, &theirs);
            assert!(err < 0.02 * scale, "{inp}x{out}: forward off by {err}");
            assert!(err > 0.0, "{inp}x{out}: the bf16 path did not run");
            let grads = probed_grads(&ours, &theirs, &[&x, &w]);
            for ((a, b), (what, n)) in grads.iter().zip([("input", out), ("weight", rows)]) {
                let err = max_abs_diff_tensors(a, b);
                let scale = (n as f32).sqrt();
                // As above: a sum over 5 rows is as far off as its largest terms' rounding.
                assert!(
                    err < 0.02 * scale + max_abs(b) / 64.0,
                    "{inp}x{out}: {what} gradient off by {err}"
                );
                assert!(max_abs(b) > 0.1 * scale);
            }
        }
    }

    /// Training's RMSNorm op against candle's ops (the inference path): the same values,
    /// and the same gradients for the input and a trained weight, on odd widths.
    #[test]
    fn training_rms_norm_matches_candles_values_and_gradients() {
        let dev = Device::Cpu;
        for (rows, h) in [(1, 1), (7, 33), (3 * 5, 128)] {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 2.0, (rows / 3 + 1, 3, h), &dev).unwrap())
                    .unwrap();
            let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, h, &dev).unwrap()).unwrap();
            let norm = RmsNorm {
                weight: w.as_tensor().clone(),
                eps: 1e-5,
            };
            let ours = norm.forward(x.as_tensor()).unwrap();
            let theirs = {
                let x = x.as_tensor();
                let var = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                x.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
                    .unwrap()
                    .broadcast_mul(w.as_tensor())
                    .unwrap()
            };
            let what = format!("{rows}x{h}");
            let vars = [("x", &x), ("w", &w)];
            assert_values_and_grads(&what, &ours, &theirs, &vars, (1e-5, 1e-4));
        }
    }

    /// The fused SiLU gate against candle's ops, on values from −100 to 100 (both tails of
    /// the sigmoid) and on a prefill-sized tensor that takes the parallel path.
    #[test]
    fn gated_silu_matches_candle_ops() {
        let dev = Device::Cpu;
        for n in [2001, 3 * (1 << 14) + 5] {
            let gate = (Tensor::rand(-1f32, 1.0, n, &dev).unwrap() * 100.0).unwrap();
            let up = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            let want = (candle_nn::ops::silu(&gate).unwrap() * &up).unwrap();
            let got = gated(Activation::Silu, gate.copy().unwrap(), &up).unwrap();
            let (got, want) = (
                got.to_vec1::<f32>().unwrap(),
                want.to_vec1::<f32>().unwrap(),
            );
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                    "element {i}: {a} vs {b}"
                );
            }
        }
    }

    /// The training SiLU gate ([`SiluGate`]) against candle's ops: values and both
    /// gradients, on odd sizes, values in both tails of the sigmoid, and a tensor large
    /// enough for the parallel chunks.
    #[test]
    fn training_silu_gate_matches_candles_values_and_gradients() {
        let dev = Device::Cpu;
        for shape in [(1, 1, 1), (3, 7, 33), (2, 5, 3 * (1 << 12) + 7)] {
            let gate = (Tensor::rand(-1f32, 1.0, shape, &dev).unwrap() * 30.0).unwrap();
            let gate = Var::from_tensor(&gate).unwrap();
            let up = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap();
            let ours = gated(Activation::Silu, gate.as_tensor().clone(), up.as_tensor()).unwrap();
            assert!(ours.track_op(), "a tracked result");
            let theirs =
                (candle_nn::ops::silu(gate.as_tensor()).unwrap() * up.as_tensor()).unwrap();
            let what = format!("{shape:?}");
            let vars = [("gate", &gate), ("up", &up)];
            assert_values_and_grads(&what, &ours, &theirs, &vars, (1e-5, 1e-5));
        }
    }

    /// The training rotary op ([`rope_heads`]) against the split and candle's tensor ops:
    /// values and the input's gradient, on odd lengths and head counts.
    #[test]
    fn training_rope_heads_matches_candles_values_and_gradients() {
        let dev = Device::Cpu;
        for (b, s, heads, d) in [(1, 1, 1, 2), (2, 7, 3, 10), (3, 33, 5, 64)] {
            let x = Tensor::randn(0f32, 1.0, (b, s, heads * d), &dev).unwrap();
            let x = Var::from_tensor(&x).unwrap();
            let angle = Tensor::rand(-4f32, 4.0, (b, s, d / 2), &dev).unwrap();
            let (cos, sin) = (angle.cos().unwrap(), angle.sin().unwrap());
            let ours = rope_heads(x.as_tensor(), heads, &cos, &sin).unwrap();
            assert_eq!(ours.dims(), [b, heads, s, d]);
            let theirs = {
                let split = x.as_tensor().reshape((b, s, heads, d)).unwrap();
                let split = split.transpose(1, 2).unwrap().contiguous().unwrap();
                // `rope`'s tracked path: candle's differentiable ops.
                rope(&split, &cos, &sin).unwrap()
            };
            let untracked = {
                let split = x.as_tensor().detach().reshape((b, s, heads, d)).unwrap();
                let split = split.transpose(1, 2).unwrap().contiguous().unwrap();
                rope(&split, &cos, &sin).unwrap()
            };
            // Bit for bit candle's fused kernel, which inference and checkpointing run.
            assert_eq!(
                max_abs_diff_tensors(&ours, &untracked),
                0.0,
                "{b}x{s}x{heads}x{d}"
            );
            let what = format!("{b}x{s}x{heads}x{d}");
            assert_values_and_grads(&what, &ours, &theirs, &[("x", &x)], (1e-5, 1e-5));
        }
    }

    /// The fused LoRA map ([`LoraProduct`]) against candle's ops on the same dropout
    /// masks: values, and the gradients of the input and both adapter matrices, on odd
    /// sizes, with and without dropout, over a dense and a 4-bit base.
    #[test]
    fn training_lora_product_matches_candles_values_and_gradients() {
        let dev = Device::Cpu;
        for (rows, inp, out, r, p, four_bit) in [
            (1, 1, 1, 1, 0.0, false),
            (7, 33, 5, 3, 0.3, false),
            (61, 64, 130, 8, 0.05, false),
            (61, 64, 96, 4, 0.5, true),
        ] {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, rows, inp), &dev).unwrap()).unwrap();
            let a = Var::from_tensor(&Tensor::randn(0f32, 0.5, (r, inp), &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, (out, r), &dev).unwrap()).unwrap();
            let w = Tensor::randn(0f32, 1.0, (out, inp), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, out, &dev).unwrap();
            let base = if four_bit {
                let q = QTensor::quantize(&w, GgmlDType::Q4_0).unwrap();
                Linear::Quantized {
                    weight: std::sync::Arc::new(q),
                    bias: Some(bias),
                }
            } else {
                Linear::Dense(candle_nn::Linear::new(w, Some(bias)))
            };
            let lora = Lora {
                base: base.clone(),
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale: 2.0,
                dropout: p,
                dropout_key: 7,
            };
            with_dropout_seed(42, || {
                let ours = Linear::Lora(Box::new(lora.clone()))
                    .forward(x.as_tensor())
                    .unwrap();
                let theirs = {
                    let xs = x.as_tensor();
                    let dropped = if p > 0.0 {
                        seeded_dropout(xs, p, 7).unwrap()
                    } else {
                        xs.clone()
                    };
                    let delta = dropped
                        .broadcast_matmul(&a.as_tensor().t().unwrap())
                        .unwrap()
                        .broadcast_matmul(&b.as_tensor().t().unwrap())
                        .unwrap();
                    (base.forward(xs).unwrap() + (delta * 2.0).unwrap()).unwrap()
                };
                let what = format!("{rows}x{inp}x{out} r{r} p{p} 4-bit {four_bit}");
                let vars = [("x", &x), ("A", &a), ("B", &b)];
                assert_values_and_grads(&what, &ours, &theirs, &vars, (1e-5, 1e-5));
            });
        }
    }

    /// A trained weight's product ([`TrainedProduct`]) against candle's `Linear`: values,
    /// and the gradients of the input and the weight, 2-D and batched, with a bias.
    #[test]
    fn trained_products_match_candles_values_and_gradients() {
        let dev = Device::Cpu;
        for (shape, out) in [(vec![1, 1], 1), (vec![7, 33], 5), (vec![3, 61, 64], 130)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap();
            let inp = *x.dims().last().unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (out, inp), &dev).unwrap()).unwrap();
            let b = Tensor::randn(0f32, 1.0, out, &dev).unwrap();
            let ours = Linear::Dense(candle_nn::Linear::new(
                w.as_tensor().clone(),
                Some(b.clone()),
            ))
            .forward(x.as_tensor())
            .unwrap();
            let theirs = candle_nn::Linear::new(w.as_tensor().clone(), Some(b))
                .forward(x.as_tensor())
                .unwrap();
            let what = format!("{:?}x{out}", x.dims());
            let vars = [("x", &x), ("w", &w)];
            assert_values_and_grads(&what, &ours, &theirs, &vars, (1e-5, 1e-5));
        }
    }

    /// The tiled transpose against candle's, on sizes that leave partial tiles.
    #[test]
    fn tiled_transpose_is_candles() {
        let dev = Device::Cpu;
        for (r, c) in [(1, 1), (1, 70), (33, 1), (65, 97), (300, 64)] {
            let t = Tensor::randn(0f32, 1.0, (r, c), &dev).unwrap();
            let ours = transposed(&t).unwrap();
            let theirs = t.t().unwrap().contiguous().unwrap();
            assert_eq!(ours.dims(), [c, r]);
            assert_eq!(max_abs_diff_tensors(&ours, &theirs), 0.0, "{r}x{c}");
        }
    }

    /// The in-place activations against candle's ops (CLIP's quick GELU, SiLU), and the
    /// ones without an in-place form still right.
    #[test]
    fn activations_in_place_match_candle_ops() {
        let dev = Device::Cpu;
        for n in [999, 2 * (1 << 14) + 3] {
            let xs = (Tensor::rand(-1f32, 1.0, n, &dev).unwrap() * 60.0).unwrap();
            for act in [
                Activation::QuickGelu,
                Activation::Silu,
                Activation::Gelu,
                Activation::GeluTanh,
            ] {
                let want = activate(act, &xs).unwrap().to_vec1::<f32>().unwrap();
                let got = activate_owned(act, xs.copy().unwrap()).unwrap();
                for (i, (a, b)) in got.to_vec1::<f32>().unwrap().iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                        "{act:?} element {i}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn exp_is_accurate_where_softmax_uses_it() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -(i as f32) * 80.0 / 200_000.0;
            let (got, want) = (exp_nonpositive(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-200.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }

    /// The fused pass against the tensor-op math, for a plain mask, a mask shared by the
    /// stacked query heads of grouped-query attention, and no mask.
    #[test]
    fn fused_softmax_matches_tensor_ops() {
        let dev = Device::Cpu;
        let (b, h, s, t) = (2, 3, 5, 37);
        let mask: Vec<f32> = (0..b * s * t)
            .map(|i| match (i % t, (i / t) % s) {
                (j, q) if j > q + 30 => f32::NEG_INFINITY,
                (j, _) => -0.5 * (j % 3) as f32,
            })
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, s, t), &dev).unwrap();
        for (rows, mask) in [(s, Some(&mask)), (4 * s, Some(&mask)), (s, None)] {
            let scores = Tensor::randn(0f32, 3.0, (b, h, rows, t), &dev).unwrap();
            let got = scaled_masked_softmax(&scores, 0.125, mask).unwrap();
            let want = match mask {
                Some(m) => (scores * 0.125)
                    .unwrap()
                    .reshape((b, h, rows / s, s, t))
                    .unwrap()
                    .broadcast_add(&m.unsqueeze(1).unwrap())
                    .unwrap()
                    .reshape((b, h, rows, t))
                    .unwrap(),
                None => (scores * 0.125).unwrap(),
            };
            let want = candle_nn::ops::softmax(&want, D::Minus1).unwrap();
            let err = kollava_testkit::max_abs_diff_tensors(&got, &want);
            assert!(err < 1e-6, "rows {rows}, mask {}: {err}", mask.is_some());
        }
    }

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
