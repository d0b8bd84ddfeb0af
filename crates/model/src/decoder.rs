//! The decoder-only language model: LLaMA (LLaMA-1/2, Vicuna, KoVicuna, Mistral/Synatra as
//! LLaMA + GQA + an optional sliding window) and MPT, which differ in the few places
//! [`Architecture`] names (positions, norms, fused projections, the MLP's gate). One forward
//! path for inference and training: it takes input embeddings and returns the final-normed
//! hidden state of every position; [`Decoder::logits`] applies `lm_head` to whichever
//! positions the caller needs.
//!
//! References: huggingface/transformers `models/llama/modeling_llama.py` (v4.37); LLaVA's
//! May-2023 `llava/model/mpt/{attention,blocks,modeling_mpt}.py` (llava-spec §1d.3).

use candle_core::backprop::GradStore;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Module, Result, Tensor, Var, D};
use candle_nn::{Embedding, VarBuilder};

use crate::config::{Architecture, DecoderConfig};
use crate::form::{Matrices, Pack};
use crate::kv_cache::KvCache;
use crate::layers::{attention, LayerNorm, Linear, RmsNorm};

mod alibi;
use alibi::Alibi;

/// A decoder norm: LLaMA's RMSNorm or MPT's LayerNorm.
#[derive(Debug, Clone)]
enum Norm {
    Rms(RmsNorm),
    Layer(LayerNorm),
}

impl Norm {
    fn load(vb: VarBuilder, size: usize, cfg: &DecoderConfig) -> Result<Self> {
        let eps = cfg.rms_norm_eps;
        Ok(match cfg.mpt() {
            None => Norm::Rms(RmsNorm::load(vb, size, eps)?),
            Some(o) => Norm::Layer(LayerNorm::load_with_bias(vb, size, eps, o.norm_bias)?),
        })
    }

    /// [`Norm::load`] of a `hidden`-wide norm, in f32 for inference (see [`Decoder::load`]).
    fn load_for(vb: VarBuilder, cfg: &DecoderConfig, inference: bool) -> Result<Self> {
        let n = Norm::load(vb, cfg.hidden_size, cfg)?;
        if inference {
            n.to_f32()
        } else {
            Ok(n)
        }
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Rms(n) => n.forward(xs),
            Norm::Layer(n) => n.forward(xs),
        }
    }

    fn to_f32(&self) -> Result<Self> {
        Ok(match self {
            Norm::Rms(n) => Norm::Rms(n.to_f32()?),
            Norm::Layer(n) => Norm::Layer(n.to_f32()?),
        })
    }
}

/// The query, key and value projections: three matrices (LLaMA), or MPT's one `Wqkv`
/// whose output is `[q | k | v]` (kept fused: an adapter on it is one adapter, as in PEFT).
#[derive(Debug, Clone)]
enum Qkv {
    Separate([Linear; 3]),
    Fused(Linear),
}

/// MPT's options on the attention: the fused output's clamp and the q/k LayerNorms.
#[derive(Debug, Clone)]
struct MptAttention {
    clip_qkv: Option<f64>,
    qk_ln: Option<(LayerNorm, LayerNorm)>,
}

#[derive(Debug, Clone)]
struct SelfAttention {
    qkv: Qkv,
    o_proj: Linear,
    mpt: Option<MptAttention>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl SelfAttention {
    fn load(vb: VarBuilder, cfg: &DecoderConfig, m: Matrices) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let bias = cfg.attention_bias;
        let (qkv, mpt) = match cfg.mpt() {
            None => (
                Qkv::Separate([
                    Linear::load(vb.pp("q_proj"), h, nh * d, bias, m)?,
                    Linear::load(vb.pp("k_proj"), h, nkv * d, bias, m)?,
                    Linear::load(vb.pp("v_proj"), h, nkv * d, bias, m)?,
                ]),
                None,
            ),
            Some(o) => {
                let ln = |name: &str| {
                    let n =
                        LayerNorm::load_with_bias(vb.pp(name), h, cfg.rms_norm_eps, o.norm_bias)?;
                    match m.pack {
                        Pack::AsRead | Pack::Q4_0 => Ok(n),
                        _ => n.to_f32(),
                    }
                };
                let qk_ln = if o.qk_ln {
                    Some((ln("q_ln")?, ln("k_ln")?))
                } else {
                    None
                };
                (
                    Qkv::Fused(Linear::load(
                        vb.pp("qkv_proj"),
                        h,
                        (nh + 2 * nkv) * d,
                        bias,
                        m,
                    )?),
                    Some(MptAttention {
                        clip_qkv: o.clip_qkv,
                        qk_ln,
                    }),
                )
            }
        };
        Ok(Self {
            qkv,
            o_proj: Linear::load(vb.pp("o_proj"), nh * d, h, bias, m)?,
            mpt,
            heads: nh,
            kv_heads: nkv,
            head_dim: d,
            scale: cfg
                .mpt()
                .and_then(|o| o.softmax_scale)
                .unwrap_or((d as f64).powf(-0.5)),
        })
    }

    /// The matrices by their canonical names under `self_attn.`.
    fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        let mut out = match &mut self.qkv {
            Qkv::Separate([q, k, v]) => vec![("q_proj", q), ("k_proj", k), ("v_proj", v)],
            Qkv::Fused(l) => vec![("qkv_proj", l)],
        };
        out.push(("o_proj", &mut self.o_proj));
        out
    }

    /// The query (or fused) projection: how the matrices are stored.
    fn first(&self) -> &Linear {
        match &self.qkv {
            Qkv::Separate([q, ..]) => q,
            Qkv::Fused(l) => l,
        }
    }

    fn linears(&self) -> Vec<&Linear> {
        let mut out: Vec<&Linear> = match &self.qkv {
            Qkv::Separate(l) => l.iter().collect(),
            Qkv::Fused(l) => vec![l],
        };
        out.push(&self.o_proj);
        out
    }

    /// `xs → (q, k, v)`, each `(b, s, width)`, with MPT's clamp and q/k norms applied.
    fn project(&self, xs: &Tensor) -> Result<[Tensor; 3]> {
        let [q, k, v] = match &self.qkv {
            Qkv::Separate([q, k, v]) => crate::layers::forward_shared([q, k, v], xs)?,
            Qkv::Fused(l) => {
                let mut qkv = l.forward(xs)?;
                if let Some(c) = self.mpt.as_ref().and_then(|m| m.clip_qkv) {
                    qkv = qkv.clamp(-c, c)?;
                }
                let (qw, kw) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
                [
                    qkv.narrow(D::Minus1, 0, qw)?,
                    qkv.narrow(D::Minus1, qw, kw)?,
                    qkv.narrow(D::Minus1, qw + kw, kw)?,
                ]
            }
        };
        match self.mpt.as_ref().and_then(|m| m.qk_ln.as_ref()) {
            Some((qn, kn)) => Ok([
                qn.forward(&q.contiguous()?)?,
                kn.forward(&k.contiguous()?)?,
                v,
            ]),
            None => Ok([q, k, v]),
        }
    }

    /// `xs: (b, s, hidden)` → `(b, s, hidden)`, with the step's rotary tables and mask.
    fn forward(
        &self,
        xs: &Tensor,
        step: &StepInputs,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let (b, s, _) = xs.dims3()?;
        let d = self.head_dim;
        let split = |t: Tensor, n: usize| t.reshape((b, s, n, d))?.transpose(1, 2)?.contiguous();
        let [q, k, v] = self.project(xs)?;
        let (q, k) = match &step.rotary {
            Some((cos, sin)) => (
                crate::layers::rope_heads(&q, self.heads, cos, sin)?,
                crate::layers::rope_heads(&k, self.kv_heads, cos, sin)?,
            ),
            None => (split(q, self.heads)?, split(k, self.kv_heads)?),
        };
        let v = split(v, self.kv_heads)?;
        let (k, v) = cache.append(layer, &k, &v)?;
        let a = match cache.decode_spans() {
            // Decoding: each row over its own slots, unmasked (see `decode_spans`); the
            // kernel reads an f16 cache as it is.
            Some(spans) if q.dtype() == DType::F32 && q.device().is_cpu() => {
                let slopes = step.alibi.as_ref().map(|a| &a.values[..]);
                crate::kernels::decode_attention::decode_attention(
                    &q,
                    &k,
                    &v,
                    spans,
                    self.kv_heads,
                    (self.scale as f32, slopes),
                )?
            }
            spans => {
                let (k, v) = (k.to_dtype(q.dtype())?, v.to_dtype(q.dtype())?);
                self.attend(&q, &k, &v, step, spans)?
            }
        };
        let a = a.transpose(1, 2)?.reshape((b, s, self.heads * d))?;
        self.o_proj.forward(&a)
    }

    /// Attention by tensor ops: per row over its own slots when decoding (`spans`), else
    /// under the step's mask (by query blocks for inference).
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        step: &StepInputs,
        spans: Option<&[(usize, usize)]>,
    ) -> Result<Tensor> {
        match spans {
            Some(spans) => {
                let rows = spans
                    .iter()
                    .enumerate()
                    .map(|(r, &(start, len))| {
                        let row = |t: &Tensor| t.narrow(0, r, 1)?.narrow(2, start, len);
                        // The row's keys are its last `len` positions, the query the last.
                        let alibi = match &step.alibi {
                            Some(a) => Some(a.for_last_keys(len)?),
                            None => None,
                        };
                        grouped_attention(
                            &q.narrow(0, r, 1)?,
                            &row(k)?,
                            &row(v)?,
                            None,
                            alibi.as_ref(),
                            self.kv_heads,
                            self.scale,
                        )
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&rows, 0)
            }
            None => {
                // A model whose matrices are bf16 or quantized keeps a 16-bit cache already:
                // its prompt's attention may round to bf16 too (on AMX tiles).
                let bf16 = matches!(self.first(), Linear::Bf16 { .. } | Linear::Quantized { .. });
                let blocks = match &step.alibi {
                    Some(a) => crate::kernels::block_attention::attention_alibi(
                        q,
                        k,
                        v,
                        &step.mask,
                        (&a.dist, &a.values, self.scale),
                        bf16,
                    )?,
                    None if bf16 => {
                        crate::kernels::block_attention::attention_bf16(q, k, v, Some(&step.mask))?
                    }
                    None => crate::kernels::block_attention::attention(q, k, v, Some(&step.mask))?,
                };
                if let Some(a) = blocks {
                    return Ok(a);
                }
                let alibi = step.alibi.as_ref();
                if q.track_op() && q.device().is_cpu() && q.dtype() == DType::F32 {
                    // Training: forward and backward without keeping the score matrices.
                    let alibi = alibi.map(|a| (&a.dist, &a.values[..]));
                    return crate::kernels::train_attention::attention(
                        q, k, v, &step.mask, alibi, self.scale,
                    );
                }
                match step.query_blocks.as_deref().filter(|_| !q.track_op()) {
                    Some(blocks) => blocked_attention(
                        q,
                        k,
                        v,
                        &step.mask,
                        alibi,
                        blocks,
                        self.kv_heads,
                        self.scale,
                    ),
                    None => grouped_attention(
                        q,
                        k,
                        v,
                        Some(&step.mask),
                        alibi,
                        self.kv_heads,
                        self.scale,
                    ),
                }
            }
        }
    }
}

/// Attention scores computed at once, at most (f32s; 16 MiB).
const SCORES_AT_ONCE: usize = 4 << 20;

/// Query rows per block of a masked prompt (see [`query_blocks`]).
const QUERY_BLOCK: usize = 64;

/// Query rows `start..start + len` of a step and the leading slots `0..extent` that cover
/// every slot any of them sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct QueryBlock {
    start: usize,
    len: usize,
    extent: usize,
}

/// A long masked step in blocks of [`QUERY_BLOCK`] query rows, each to attend over only the
/// slots up to the last one any of its rows sees (one past the last finite entry of
/// `mask: (b, 1, s, t)`, over the batch): under a causal mask that skips the upper
/// triangle, about half of a prompt's products and softmax. The skipped scores are masked
/// (−∞, weight 0), so the answer is the same up to summation order. Built once per step;
/// `None` where no block would skip a slot (decoding, short steps) or off the CPU.
fn query_blocks(mask: &Tensor) -> Result<Option<Vec<QueryBlock>>> {
    let (b, _, s, t) = mask.dims4()?;
    if s <= QUERY_BLOCK || !mask.device().is_cpu() {
        return Ok(None);
    }
    let m = mask.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let visible = |i: usize| {
        (0..b)
            .map(|r| {
                let row = &m[(r * s + i) * t..(r * s + i + 1) * t];
                row.iter().rposition(|x| x.is_finite()).map_or(0, |j| j + 1)
            })
            .max()
            .unwrap_or(t)
    };
    let blocks: Vec<QueryBlock> = (0..s)
        .step_by(QUERY_BLOCK)
        .map(|start| {
            let len = QUERY_BLOCK.min(s - start);
            let extent = (start..start + len).map(visible).max().unwrap_or(t);
            QueryBlock {
                start,
                len,
                extent: extent.max(1),
            }
        })
        .collect();
    Ok(blocks.iter().any(|q| q.extent < t).then_some(blocks))
}

/// [`grouped_attention`] under `mask`, one [`QueryBlock`] at a time.
#[allow(clippy::too_many_arguments)]
fn blocked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    alibi: Option<&Alibi>,
    blocks: &[QueryBlock],
    kv_heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let parts = blocks
        .iter()
        .map(|&QueryBlock { start, len, extent }| {
            let alibi = match alibi {
                Some(a) => Some(a.block(start, len, extent)?),
                None => None,
            };
            grouped_attention(
                &q.narrow(2, start, len)?.contiguous()?,
                &k.narrow(2, 0, extent)?,
                &v.narrow(2, 0, extent)?,
                Some(&mask.narrow(2, start, len)?.narrow(3, 0, extent)?),
                alibi.as_ref(),
                kv_heads,
                scale,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 2)
}

/// Grouped-query attention without copying keys and values per query head: the `rep`
/// query heads that share a key/value head are stacked along the sequence axis, so one
/// product per key/value head serves them all.
/// `q: (b, heads, s, d)`, `k, v: (b, kv_heads, t, d)`, `mask: (b, 1, s, t)` (none: every
/// key is visible) → `(b, heads, s, d)`.
fn grouped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    alibi: Option<&Alibi>,
    kv_heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (b, heads, s, d) = q.dims4()?;
    let rep = heads / kv_heads;
    // A long prompt's scores go a few key/value heads at a time, so that they never take
    // much memory (a 7B model at 600 tokens: 12 MB at once rather than 2 × 50 MB). Heads
    // are independent: the numbers are the same.
    let per_head = b * rep * s * k.dim(2)?;
    let group = (SCORES_AT_ONCE / per_head.max(1)).clamp(1, kv_heads);
    if group < kv_heads && !q.track_op() {
        let parts = (0..kv_heads)
            .step_by(group)
            .map(|g| {
                let n = group.min(kv_heads - g);
                let alibi = match alibi {
                    Some(a) => Some(a.heads(g * rep, n * rep)?),
                    None => None,
                };
                grouped_attention(
                    &q.narrow(1, g * rep, n * rep)?,
                    &k.narrow(1, g, n)?,
                    &v.narrow(1, g, n)?,
                    mask,
                    alibi.as_ref(),
                    n,
                    scale,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        return Tensor::cat(&parts, 1);
    }
    if let Some(a) = alibi {
        // Per-head biases: ALiBi models share no key/value heads (refused at load).
        if rep != 1 {
            candle_core::bail!("ALiBi with grouped-query attention");
        }
        let bias = a.with_mask(mask)?.to_dtype(q.dtype())?;
        return attention(q, k, v, Some(&bias), scale);
    }
    if rep == 1 {
        return attention(q, k, v, mask, scale);
    }
    let q = q.reshape((b, kv_heads, rep * s, d))?;
    attention(&q, k, v, mask, scale)?.reshape((b, heads, s, d))
}

/// `down(act(gate(x)) · up(x))` (LLaMA), or `down(act(up(x)))` without a gate (MPT).
#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Option<Linear>,
    up_proj: Linear,
    down_proj: Linear,
    act: crate::config::Activation,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &DecoderConfig, m: Matrices) -> Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        let gate_proj = match cfg.arch {
            Architecture::Llama => Some(Linear::load(vb.pp("gate_proj"), h, i, bias, m)?),
            Architecture::Mpt(_) => None,
        };
        Ok(Self {
            gate_proj,
            up_proj: Linear::load(vb.pp("up_proj"), h, i, bias, m)?,
            down_proj: Linear::load(vb.pp("down_proj"), i, h, bias, m)?,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = match &self.gate_proj {
            Some(gate_proj) => {
                let [gate, up] = crate::layers::forward_shared([gate_proj, &self.up_proj], xs)?;
                crate::layers::gated(self.act, gate, &up)?
            } // gate and up are freed before the down projection allocates
            None => crate::layers::activate_owned(self.act, self.up_proj.forward(xs)?)?,
        };
        self.down_proj.forward(&h)
    }

    /// The matrices by their canonical names under `mlp.`.
    fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        let mut out = Vec::with_capacity(3);
        if let Some(g) = &mut self.gate_proj {
            out.push(("gate_proj", g));
        }
        out.push(("up_proj", &mut self.up_proj));
        out.push(("down_proj", &mut self.down_proj));
        out
    }

    fn linears(&self) -> Vec<&Linear> {
        let mut out: Vec<&Linear> = self.gate_proj.iter().collect();
        out.extend([&self.up_proj, &self.down_proj]);
        out
    }
}

/// One decoder layer's weights. Sharded training builds one from gathered weights
/// ([`Decoder::load_layer`]) for each use and drops it after.
#[derive(Debug, Clone)]
pub struct Layer {
    input_layernorm: Norm,
    self_attn: SelfAttention,
    post_attention_layernorm: Norm,
    mlp: Mlp,
}

impl Layer {
    /// `vb` at the layer (`model.layers.I`); `inference`: norms in f32 (see
    /// [`Decoder::load`]).
    fn load(vb: VarBuilder, cfg: &DecoderConfig, m: Matrices, inference: bool) -> Result<Self> {
        let norm = |vb: VarBuilder| Norm::load_for(vb, cfg, inference);
        Ok(Layer {
            input_layernorm: norm(vb.pp("input_layernorm"))?,
            self_attn: SelfAttention::load(vb.pp("self_attn"), cfg, m)?,
            post_attention_layernorm: norm(vb.pp("post_attention_layernorm"))?,
            mlp: Mlp::load(vb.pp("mlp"), cfg, m)?,
        })
    }

    /// Every matrix of the layer.
    fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.self_attn
            .linears()
            .into_iter()
            .chain(self.mlp.linears())
    }

    /// `xs + attn(norm(xs))`, then `+ mlp(norm(·))`; appends this layer's keys and values
    /// (layer `i`) to `cache`.
    fn forward(
        &self,
        xs: &Tensor,
        step: &StepInputs,
        cache: &mut KvCache,
        i: usize,
    ) -> Result<Tensor> {
        // Each intermediate is dropped as soon as it is used: a long prefill's are tens of
        // megabytes each, and peak memory is the sum of those alive at once.
        let attended = {
            let x = self.input_layernorm.forward(xs)?;
            self.self_attn.forward(&x, step, cache, i)?
        };
        let xs = (xs + attended)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&xs)?)?;
        xs + mlp
    }
}

/// What every layer of one step shares: the rotary tables `(b, s, d/2)` of the step's
/// positions (LLaMA) or ALiBi's distances (MPT), the additive attention mask
/// `(b, 1, s, slots)` and its query blocks.
#[derive(Debug, Clone)]
struct StepInputs {
    rotary: Option<(Tensor, Tensor)>,
    alibi: Option<Alibi>,
    mask: Tensor,
    query_blocks: Option<Vec<QueryBlock>>,
}

/// Where a checkpointed forward and its backward get each layer's weights, and where the
/// gradients of a recomputed layer go. The decoder's own layers by default; sharded
/// training (`train --shard full`) gathers a layer's weights from the ranks for each use
/// and hands its gradients back to be reduce-scattered.
pub trait LayerSource {
    /// Layer `i`'s weights for one forward (or its recomputation in the backward).
    fn layer(&mut self, i: usize) -> Result<std::borrow::Cow<'_, Layer>>;
    /// Layer `i`, recomputed, has been differentiated: `grads` holds its gradients.
    fn layer_grads(&mut self, i: usize, grads: &GradStore) -> Result<()>;
}

/// The decoder's own layers; their parameters' gradients accumulate into a store.
struct Resident<'a> {
    decoder: &'a Decoder,
    /// `None` in a forward.
    into: Option<&'a mut GradStore>,
    params: &'a [Var],
}

impl LayerSource for Resident<'_> {
    fn layer(&mut self, i: usize) -> Result<std::borrow::Cow<'_, Layer>> {
        self.decoder.check_whole()?;
        Ok(std::borrow::Cow::Borrowed(&self.decoder.layers[i]))
    }

    fn layer_grads(&mut self, _: usize, grads: &GradStore) -> Result<()> {
        match self.into.as_deref_mut() {
            Some(into) => accumulate(into, grads, self.params),
            None => Ok(()),
        }
    }
}

/// A training forward that kept only each decoder layer's input (gradient checkpointing):
/// activations inside a layer are recomputed, one layer at a time, during
/// [`Checkpointed::backward`]. Memory for activations goes from all layers' to one layer's
/// plus one `(b, s, hidden)` tensor per layer, for one more forward of the layers.
pub struct Checkpointed {
    /// Detached input of each layer.
    inputs: Vec<Tensor>,
    /// The last layer's output, a leaf of the graph that [`Checkpointed::hidden`] starts.
    last: Var,
    step: StepInputs,
    batch: usize,
}

impl Checkpointed {
    /// The final-normed hidden states `(b, s, hidden)`, as [`Decoder::forward`] returns
    /// them; a loss computed from them differentiates back to the final norm and to
    /// [`Checkpointed::backward`]'s starting point.
    pub fn hidden(&self, decoder: &Decoder) -> Result<Tensor> {
        decoder.norm.forward(self.last.as_tensor())
    }

    /// Back through the layers, last to first, each recomputed from its saved input: takes
    /// `grads` of a loss computed from [`Checkpointed::hidden`], adds to it the gradients
    /// of those `params` that live in the layers, and returns the loss's gradient with
    /// respect to the decoder's input (to carry on into the embeddings and projector).
    pub fn backward(
        &self,
        decoder: &Decoder,
        grads: &mut GradStore,
        params: &[Var],
    ) -> Result<Tensor> {
        let g = self.output_grad(grads)?;
        let mut own = Resident {
            decoder,
            into: Some(grads),
            params,
        };
        self.backward_with(g, &mut own)
    }

    /// The loss's gradient with respect to the last layer's output, from `grads` of a loss
    /// computed from [`Checkpointed::hidden`]: where [`Checkpointed::backward_with`] starts.
    pub fn output_grad(&self, grads: &GradStore) -> Result<Tensor> {
        match grads.get(self.last.as_tensor()) {
            Some(g) => Ok(g.detach()),
            None => candle_core::bail!("the loss does not depend on the decoder's output"),
        }
    }

    /// [`Checkpointed::backward`] from the last layer's output gradient `g`, with the
    /// layers (and what becomes of their gradients) from `layers`.
    pub fn backward_with(&self, mut g: Tensor, layers: &mut dyn LayerSource) -> Result<Tensor> {
        for i in (0..self.inputs.len()).rev() {
            let x = Var::from_tensor(&self.inputs[i])?;
            let layer_grads = {
                let layer = layers.layer(i)?;
                let mut scratch = KvCache::new(self.inputs.len(), self.batch);
                let out = layer.forward(x.as_tensor(), &self.step, &mut scratch, i)?;
                // d/dθ Σ out·g = gᵀ ∂out/∂θ: the chain rule through this layer alone.
                (out * &g)?.sum_all()?.backward()?
            };
            g = match layer_grads.get(x.as_tensor()) {
                Some(gx) => gx.detach(),
                None => candle_core::bail!("layer {i}'s output does not depend on its input"),
            };
            layers.layer_grads(i, &layer_grads)?;
        }
        Ok(g)
    }
}

/// `into[p] += from[p]` for each parameter `p` that `from` has a gradient for.
pub fn accumulate(into: &mut GradStore, from: &GradStore, params: &[Var]) -> Result<()> {
    for p in params {
        let Some(new) = from.get(p.as_tensor()) else {
            continue;
        };
        let sum = match into.get(p.as_tensor()) {
            Some(old) => (old + new)?,
            None => new.clone(),
        };
        into.insert(p.as_tensor(), sum);
    }
    Ok(())
}

/// The token embedding table.
#[derive(Debug, Clone)]
enum TokenEmbedding {
    Dense(Embedding),
    /// A ggml table on the CPU: each lookup unpacks its rows (in f32) and moves them to
    /// `device`.
    Blocks {
        table: Arc<QTensor>,
        device: Device,
    },
}

impl TokenEmbedding {
    /// `ids: (b, s)` u32 → `(b, s, hidden)`.
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            TokenEmbedding::Dense(e) => e.forward(ids),
            TokenEmbedding::Blocks { table, device } => {
                let (b, s) = ids.dims2()?;
                let h = table.shape().dims2()?.1;
                let ids = ids.flatten_all()?.to_vec1::<u32>()?;
                let rows = crate::kernels::bf16::ggml_rows(table, &ids)?;
                Tensor::from_vec(rows, (b, s, h), &Device::Cpu)?.to_device(device)
            }
        }
    }

    fn dtype(&self) -> DType {
        match self {
            TokenEmbedding::Dense(e) => e.embeddings().dtype(),
            TokenEmbedding::Blocks { .. } => DType::F32,
        }
    }

    /// Bytes one lookup reads from the table.
    fn row_bytes(&self, hidden: usize) -> usize {
        match self {
            TokenEmbedding::Dense(e) => hidden * e.embeddings().dtype().size_in_bytes(),
            TokenEmbedding::Blocks { table, .. } => {
                hidden / table.dtype().block_size() * table.dtype().type_size()
            }
        }
    }
}

/// LLaMA weights. Immutable; share it behind an `Arc` and give each request a [`KvCache`].
#[derive(Debug, Clone)]
pub struct Decoder {
    embed_tokens: TokenEmbedding,
    layers: Vec<Layer>,
    norm: Norm,
    lm_head: Linear,
    /// `1 / theta^(2i/d)`, `(d/2,)` f32.
    inv_freq: Tensor,
    /// The activations' dtype: the weights' as loaded, f32 once packed for inference.
    compute_dtype: DType,
    /// The dtype a new [`KvCache`] keeps keys and values in (`None`: the activations').
    kv_storage: Option<DType>,
    cfg: DecoderConfig,
}

impl Decoder {
    /// `vb` is at the checkpoint root: loads `model.embed_tokens`, `model.layers.*`,
    /// `model.norm` and `lm_head` (or the tied embedding), each matrix as `m` says. Packed
    /// for inference, norms and activations are f32, and with bf16 kernels the KV cache is
    /// f16 (as llama.cpp keeps it): a run that already rounds its weights gives up
    /// exactness for speed and memory, an f32 one does not.
    pub fn load(vb: VarBuilder, cfg: &DecoderConfig, m: Matrices) -> Result<Self> {
        let md = vb.pp("model");
        let (h, vocab) = (cfg.hidden_size, cfg.vocab_size);
        // A GGUF file's table stays in its blocks (a 7B model's would take 0.5 GB in f32):
        // lookups unpack a few rows at a time, on the CPU whatever the device.
        let (embed_tokens, tied_head) = match m.stored("model.embed_tokens.weight")? {
            Some(table) => {
                if table.shape().dims2()? != (vocab, h) {
                    candle_core::bail!(
                        "an embedding table of {:?} for a model of {vocab}x{h}",
                        table.shape()
                    );
                }
                let head = Linear::Quantized {
                    weight: table.clone(),
                    bias: None,
                };
                let device = vb.device().clone();
                (TokenEmbedding::Blocks { table, device }, head)
            }
            None => {
                let w = md.pp("embed_tokens").get((vocab, h), "weight")?;
                let head = Linear::from_weight(w.clone());
                (TokenEmbedding::Dense(Embedding::new(w, h)), head)
            }
        };
        if cfg.mpt().is_some() && cfg.num_key_value_heads != cfg.num_attention_heads {
            candle_core::bail!("ALiBi with grouped-query attention is not an MPT model");
        }
        // Packed for inference, norms and activations are f32; a training form keeps the
        // dtype read.
        let inference = matches!(m.pack, Pack::F32 | Pack::Ggml | Pack::Bf16);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::load(md.pp("layers").pp(i), cfg, m, inference))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = Norm::load_for(md.pp("norm"), cfg, inference)?;
        // QLoRA keeps the output head as read (it is no adapted layer).
        let head = match m.pack {
            Pack::Q4_0 => Matrices {
                pack: Pack::AsRead,
                ..m
            },
            _ => m,
        };
        let lm_head = if cfg.tie_word_embeddings {
            tied_head.in_form(head.pack)?
        } else {
            Linear::load(vb.pp("lm_head"), h, vocab, false, head)?
        };
        let d = cfg.head_dim;
        let inv_freq: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / d as f32))
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, d / 2, vb.device())?;
        Ok(Self {
            compute_dtype: match inference {
                false => embed_tokens.dtype(),
                true => DType::F32,
            },
            kv_storage: (m.pack == Pack::Bf16).then_some(DType::F16),
            embed_tokens,
            layers,
            norm: final_norm,
            lm_head,
            inv_freq,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// Builds layer `i` on its own, as read for training, from `vb` at the checkpoint root
    /// (sharded training gathers one layer's weights at a time).
    pub fn load_layer(vb: VarBuilder, cfg: &DecoderConfig, i: usize) -> Result<Layer> {
        Layer::load(
            vb.pp("model").pp("layers").pp(i),
            cfg,
            Matrices::AS_READ,
            false,
        )
    }

    /// Gives up the layers' weights (sharded training keeps each rank's share of them
    /// elsewhere and builds a layer for each use with [`Decoder::load_layer`]); a forward
    /// that needs them is refused from then on.
    pub fn drop_layers(&mut self) {
        self.layers = Vec::new();
    }

    /// Refuses to run without the layers (see [`Decoder::drop_layers`]).
    fn check_whole(&self) -> Result<()> {
        if self.layers.len() != self.cfg.num_hidden_layers {
            candle_core::bail!(
                "this decoder's layers are held by sharded training; run it through a LayerSource"
            );
        }
        Ok(())
    }

    /// An empty cache for `batch` sequences, in the dtype this model keeps keys and values.
    pub fn new_cache(&self, batch: usize) -> KvCache {
        let cache = KvCache::new(self.layers.len(), batch);
        match self.kv_storage {
            Some(dtype) => cache.storing(dtype),
            None => cache,
        }
    }

    /// The activations' dtype: the weights' as read, f32 once packed for inference.
    pub fn dtype(&self) -> DType {
        self.compute_dtype
    }

    /// Brings a decoder built as read (one made for training) into the form `pack` that
    /// [`Decoder::load`] builds directly; the tests check that both give the same numbers.
    pub fn pack_for_inference(&mut self, pack: Pack) -> Result<()> {
        if pack == Pack::AsRead {
            return Ok(());
        }
        if pack == Pack::Bf16 {
            self.kv_storage = Some(DType::F16);
        }
        for (_, l) in self.linears_mut() {
            *l = l.in_form(pack)?;
        }
        self.lm_head = self.lm_head.in_form(pack)?;
        for l in &mut self.layers {
            l.input_layernorm = l.input_layernorm.to_f32()?;
            l.post_attention_layernorm = l.post_attention_layernorm.to_f32()?;
            if let Some((q, k)) = l.self_attn.mpt.as_mut().and_then(|m| m.qk_ln.as_mut()) {
                (*q, *k) = (q.to_f32()?, k.to_f32()?);
            }
        }
        self.norm = self.norm.to_f32()?;
        self.compute_dtype = DType::F32;
        Ok(())
    }

    /// The fewest positions a step must have for every position's keys, values and hidden
    /// states to be the numbers a longer step computes for it (see [`Linear::steady_rows`];
    /// a one-position step also takes the decoding attention kernel). What reuses a
    /// prompt's prefix prefills at least this many positions, so that the prompt's rows are
    /// a cold prefill's.
    pub fn steady_rows(&self) -> usize {
        self.layers
            .iter()
            .flat_map(Layer::linears)
            .map(Linear::steady_rows)
            .max()
            .unwrap_or(2)
            .max(2)
    }

    /// Whether the matrices are quantized (a GGUF model's `Q4_K`, …), as layer 0's query
    /// projection is.
    pub fn is_quantized(&self) -> bool {
        self.first_matrix().is_some_and(Linear::is_quantized)
    }

    /// Layer 0's first matrix (its query or fused projection): how the matrices are stored.
    fn first_matrix(&self) -> Option<&Linear> {
        self.layers.first().map(|l| l.self_attn.first())
    }

    /// How the matrices are stored (`F16`, `Q4K`, …), as layer 0's query projection is.
    pub fn weight_format(&self) -> String {
        match self.first_matrix() {
            Some(Linear::Quantized { weight, .. }) => format!("{:?}", weight.dtype()),
            Some(Linear::Dense(l)) => format!("{:?}", l.weight().dtype()).to_uppercase(),
            Some(Linear::Bf16 { .. }) => match crate::kernels::bf16::kernels() {
                Some(k) => format!("BF16 ({k} kernels)"),
                None => "BF16".into(),
            },
            _ => "?".into(),
        }
    }

    /// Bytes of weights one decode step reads: every layer's matrices and norms, the final
    /// norm, `lm_head`, and one embedding row.
    pub fn bytes_per_token(&self) -> usize {
        let h = self.cfg.hidden_size;
        let norm = h * 4;
        let layers: usize = self
            .layers
            .iter()
            .map(|l| l.linears().map(Linear::stored_bytes).sum::<usize>() + 2 * norm)
            .sum();
        let row = self.embed_tokens.row_bytes(h);
        layers + norm + self.lm_head.stored_bytes() + row
    }

    pub fn device(&self) -> &candle_core::Device {
        self.inv_freq.device()
    }

    /// Token embeddings. `ids: (b, s)` u32 → `(b, s, hidden)`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(ids)?.to_dtype(self.compute_dtype)
    }

    /// The whole stack on a step of embeddings, appending to `cache`.
    /// `xs: (b, s, hidden)`; `valid[r]` real (not padding) leading positions of row `r`
    /// → final-normed hidden states `(b, s, hidden)`.
    pub fn forward(&self, xs: &Tensor, valid: &[usize], cache: &mut KvCache) -> Result<Tensor> {
        self.check_whole()?;
        let step = self.begin_step(xs, valid, cache)?;
        let mut xs = xs.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs, &step, cache, i)?;
        }
        self.norm.forward(&xs)
    }

    /// [`Decoder::forward`] for training with gradient checkpointing, from a fresh cache:
    /// each layer runs on the detached output of the one before, and only those inputs are
    /// kept. `xs` is detached here; carry [`Checkpointed::backward`]'s result into whatever
    /// produced it.
    pub fn forward_checkpointed(&self, xs: &Tensor, valid: &[usize]) -> Result<Checkpointed> {
        let mut own = Resident {
            decoder: self,
            into: None,
            params: &[],
        };
        self.forward_checkpointed_with(xs, valid, &mut own)
    }

    /// [`Decoder::forward_checkpointed`] with the layers from `layers`.
    pub fn forward_checkpointed_with(
        &self,
        xs: &Tensor,
        valid: &[usize],
        layers: &mut dyn LayerSource,
    ) -> Result<Checkpointed> {
        let (batch, n) = (xs.dim(0)?, self.cfg.num_hidden_layers);
        let step = self.begin_step(xs, valid, &mut KvCache::new(n, batch))?;
        let mut inputs = Vec::with_capacity(n);
        let mut x = xs.detach();
        for i in 0..n {
            let mut scratch = KvCache::new(n, batch);
            let out = layers
                .layer(i)?
                .forward(&x, &step, &mut scratch, i)?
                .detach();
            inputs.push(std::mem::replace(&mut x, out));
        }
        Ok(Checkpointed {
            inputs,
            last: Var::from_tensor(&x)?,
            step,
            batch,
        })
    }

    /// Registers a step of `xs: (b, s, hidden)` in `cache` and builds what its layers share.
    fn begin_step(&self, xs: &Tensor, valid: &[usize], cache: &mut KvCache) -> Result<StepInputs> {
        let (b, s, _) = xs.dims3()?;
        let (positions, mask) = cache.begin_step(
            valid,
            s,
            self.cfg.sliding_window,
            self.cfg.max_position_embeddings,
            xs.device(),
        )?;
        let dtype = xs.dtype();
        let (rotary, alibi) = match self.cfg.mpt() {
            None => {
                let pos = Tensor::from_vec(positions, (b, s), xs.device())?.to_dtype(DType::F32)?;
                let freqs =
                    pos.unsqueeze(2)?
                        .broadcast_mul(&self.inv_freq.reshape((1, 1, ()))?)?;
                let cos = freqs.cos()?.to_dtype(dtype)?.contiguous()?;
                (
                    Some((cos, freqs.sin()?.to_dtype(dtype)?.contiguous()?)),
                    None,
                )
            }
            Some(o) => {
                let slopes = o.alibi_slopes(self.cfg.num_attention_heads);
                let dist = cache.key_offsets(&positions, s, xs.device())?;
                (None, Some(Alibi::new(dist, slopes, dtype)?))
            }
        };
        Ok(StepInputs {
            rotary,
            alibi,
            query_blocks: query_blocks(&mask)?,
            mask: mask.to_dtype(dtype)?,
        })
    }

    /// `hidden: (…, hidden) → (…, vocab)`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = self.lm_head.forward(hidden)?;
        match self.cfg.mpt().and_then(|o| o.logit_scale) {
            Some(scale) => logits * scale,
            None => Ok(logits),
        }
    }

    /// The output projection (the embedding itself when tied).
    pub fn lm_head_mut(&mut self) -> &mut Linear {
        &mut self.lm_head
    }

    /// Every linear map of the layers by canonical name (`model.layers.3.mlp.up_proj`), for
    /// LoRA adapters and 4-bit bases. `lm_head` is not among them (KoLLaVA's LoRA recipe
    /// leaves it alone).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::with_capacity(7 * self.layers.len());
        for (i, l) in self.layers.iter_mut().enumerate() {
            for (name, lin) in l.self_attn.linears_mut() {
                out.push((format!("model.layers.{i}.self_attn.{name}"), lin));
            }
            for (name, lin) in l.mlp.linears_mut() {
                out.push((format!("model.layers.{i}.mlp.{name}"), lin));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of query rows over their visible slots give what attention over every slot
    /// gives, for the masks the cache builds: a prompt after cached tokens, a padded batch
    /// of two prompts of different lengths, and a sliding window.
    #[test]
    fn query_blocks_match_attention_over_every_slot() -> Result<()> {
        let dev = Device::Cpu;
        let (heads, kv_heads, d) = (4, 2, 16);
        for (past, valid, window) in [
            (0, vec![150], None),
            (37, vec![130], None),
            (0, vec![150, 97], None),
            (0, vec![140], Some(50)),
        ] {
            let (b, s) = (valid.len(), valid[0]);
            let mut cache = KvCache::new(1, b);
            if past > 0 {
                cache.begin_step(&vec![past; b], past, window, 4096, &dev)?;
            }
            let (_, mask) = cache.begin_step(&valid, s, window, 4096, &dev)?;
            let blocks = query_blocks(&mask)?.expect("a long prompt has blocks that skip slots");
            let t = mask.dim(3)?;
            let q = Tensor::randn(0f32, 1.0, (b, heads, s, d), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (b, kv_heads, t, d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (b, kv_heads, t, d), &dev)?;
            let scale = (d as f64).powf(-0.5);
            let blocked = blocked_attention(&q, &k, &v, &mask, None, &blocks, kv_heads, scale)?;
            let whole = grouped_attention(&q, &k, &v, Some(&mask), None, kv_heads, scale)?;
            let diff = kollava_testkit::max_abs_diff_tensors(&blocked, &whole);
            assert!(
                diff < 1e-5,
                "past {past}, rows {valid:?}, window {window:?}: {diff}"
            );
        }
        Ok(())
    }

    /// Under a causal mask after 5 cached tokens, row `i` sees slots `0..=5 + i`: each block
    /// ends at its last row's slot; a step of one block's rows or fewer has none.
    #[test]
    fn a_causal_masks_blocks_end_at_their_last_rows_slot() -> Result<()> {
        let dev = Device::Cpu;
        let mut cache = KvCache::new(1, 1);
        cache.begin_step(&[5], 5, None, 4096, &dev)?;
        let (_, mask) = cache.begin_step(&[130], 130, None, 4096, &dev)?;
        let block = |start, len, extent| QueryBlock { start, len, extent };
        assert_eq!(
            query_blocks(&mask)?,
            Some(vec![
                block(0, 64, 69),
                block(64, 64, 133),
                block(128, 2, 135)
            ])
        );
        let (_, mask) = cache.begin_step(&[QUERY_BLOCK], QUERY_BLOCK, None, 4096, &dev)?;
        assert_eq!(query_blocks(&mask)?, None);
        Ok(())
    }
}
