//! The LLaMA decoder (LLaMA-1/2, Vicuna, KoVicuna, Mistral/Synatra as LLaMA + GQA + an
//! optional sliding window). One forward path for inference and training: it takes input
//! embeddings and returns the final-normed hidden state of every position; [`Decoder::logits`]
//! applies `lm_head` to whichever positions the caller needs.
//!
//! Reference: huggingface/transformers `models/llama/modeling_llama.py` (v4.37).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use crate::config::DecoderConfig;
use crate::kv_cache::KvCache;
use crate::layers::{activate, attention, Linear, RmsNorm};

#[derive(Debug, Clone)]
struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    fn load(vb: VarBuilder, cfg: &DecoderConfig) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let bias = cfg.attention_bias;
        Ok(Self {
            q_proj: Linear::load(vb.pp("q_proj"), h, nh * d, bias)?,
            k_proj: Linear::load(vb.pp("k_proj"), h, nkv * d, bias)?,
            v_proj: Linear::load(vb.pp("v_proj"), h, nkv * d, bias)?,
            o_proj: Linear::load(vb.pp("o_proj"), nh * d, h, bias)?,
            heads: nh,
            kv_heads: nkv,
            head_dim: d,
        })
    }

    /// `xs: (b, s, hidden)`, `cos/sin: (b, s, d/2)`, `mask: (b, 1, s, t)` → `(b, s, hidden)`.
    fn forward(
        &self,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let (b, s, _) = xs.dims3()?;
        let d = self.head_dim;
        let split = |t: Tensor, n: usize| t.reshape((b, s, n, d))?.transpose(1, 2)?.contiguous();
        let q = split(self.q_proj.forward(xs)?, self.heads)?;
        let k = split(self.k_proj.forward(xs)?, self.kv_heads)?;
        let v = split(self.v_proj.forward(xs)?, self.kv_heads)?;
        let q = crate::layers::rope(&q, cos, sin)?;
        let k = crate::layers::rope(&k, cos, sin)?;
        let (k, v) = cache.append(layer, &k, &v)?;
        let a = match cache.decode_spans() {
            // Decoding: each row over its own slots, unmasked (see `decode_spans`).
            Some(spans) if q.dtype() == DType::F32 && q.device().is_cpu() => {
                crate::decode_attention::decode_attention(&q, &k, &v, spans, self.kv_heads)?
            }
            Some(spans) => {
                let rows = spans
                    .iter()
                    .enumerate()
                    .map(|(r, &(start, len))| {
                        let row = |t: &Tensor| t.narrow(0, r, 1)?.narrow(2, start, len);
                        grouped_attention(
                            &q.narrow(0, r, 1)?,
                            &row(&k)?,
                            &row(&v)?,
                            None,
                            self.kv_heads,
                        )
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&rows, 0)?
            }
            None => grouped_attention(&q, &k, &v, Some(mask), self.kv_heads)?,
        };
        let a = a.transpose(1, 2)?.reshape((b, s, self.heads * d))?;
        self.o_proj.forward(&a)
    }
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
    kv_heads: usize,
) -> Result<Tensor> {
    let (b, heads, s, d) = q.dims4()?;
    let rep = heads / kv_heads;
    if rep == 1 {
        return attention(q, k, v, mask, (d as f64).powf(-0.5));
    }
    let t = k.dim(2)?;
    let q = q.reshape((b, kv_heads, rep * s, d))?;
    let scores = (q.matmul(&k.t()?)? * (d as f64).powf(-0.5))?;
    let scores = match mask {
        Some(mask) => scores
            .reshape((b, kv_heads, rep, s, t))?
            .broadcast_add(&mask.unsqueeze(1)?)?
            .reshape((b, kv_heads, rep * s, t))?,
        None => scores,
    };
    let probs = crate::layers::softmax_last_dim(&scores)?;
    probs.matmul(v)?.reshape((b, heads, s, d))
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: crate::config::Activation,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &DecoderConfig) -> Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: Linear::load(vb.pp("gate_proj"), h, i, bias)?,
            up_proj: Linear::load(vb.pp("up_proj"), h, i, bias)?,
            down_proj: Linear::load(vb.pp("down_proj"), i, h, bias)?,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gate = activate(self.act, &self.gate_proj.forward(xs)?)?;
        self.down_proj.forward(&(gate * self.up_proj.forward(xs)?)?)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    input_layernorm: RmsNorm,
    self_attn: SelfAttention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// LLaMA weights. Immutable; share it behind an `Arc` and give each request a [`KvCache`].
#[derive(Debug, Clone)]
pub struct Decoder {
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    /// `1 / theta^(2i/d)`, `(d/2,)` f32.
    inv_freq: Tensor,
    /// The activations' dtype: the weights' as loaded, f32 once packed for inference.
    compute_dtype: DType,
    cfg: DecoderConfig,
}

impl Decoder {
    /// `vb` is at the checkpoint root: loads `model.embed_tokens`, `model.layers.*`,
    /// `model.norm` and `lm_head` (or the tied embedding).
    pub fn load(vb: VarBuilder, cfg: &DecoderConfig) -> Result<Self> {
        let m = vb.pp("model");
        let embed_weight = m
            .pp("embed_tokens")
            .get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let embed_tokens = Embedding::new(embed_weight.clone(), cfg.hidden_size);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = m.pp("layers").pp(i);
            layers.push(Layer {
                input_layernorm: RmsNorm::load(
                    l.pp("input_layernorm"),
                    cfg.hidden_size,
                    cfg.rms_norm_eps,
                )?,
                self_attn: SelfAttention::load(l.pp("self_attn"), cfg)?,
                post_attention_layernorm: RmsNorm::load(
                    l.pp("post_attention_layernorm"),
                    cfg.hidden_size,
                    cfg.rms_norm_eps,
                )?,
                mlp: Mlp::load(l.pp("mlp"), cfg)?,
            });
        }
        let norm = RmsNorm::load(m.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::from_weight(embed_weight)
        } else {
            Linear::load(vb.pp("lm_head"), cfg.hidden_size, cfg.vocab_size, false)?
        };
        let d = cfg.head_dim;
        let inv_freq: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / d as f32))
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, d / 2, vb.device())?;
        Ok(Self {
            compute_dtype: embed_tokens.embeddings().dtype(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// The activations' dtype (the weights' until [`Decoder::pack_for_inference`]).
    pub fn dtype(&self) -> DType {
        self.compute_dtype
    }

    /// Readies the weights for generation: every matrix moves into a ggml container of its
    /// own dtype (decoding then reads it once, in that width, on all threads), the norms
    /// widen to f32, and activations run in f32. Training keeps the unpacked form.
    /// With `bf16`, matrices are packed for our AVX512-BF16 kernels instead.
    pub fn pack_for_inference(&mut self, bf16: bool) -> Result<()> {
        let pack = |l: &Linear| if bf16 { l.packed_bf16() } else { l.packed() };
        for (_, l) in self.linears_mut() {
            *l = pack(l)?;
        }
        self.lm_head = pack(&self.lm_head)?;
        for l in &mut self.layers {
            l.input_layernorm = l.input_layernorm.to_f32()?;
            l.post_attention_layernorm = l.post_attention_layernorm.to_f32()?;
        }
        self.norm = self.norm.to_f32()?;
        self.compute_dtype = DType::F32;
        Ok(())
    }

    /// How the matrices are stored (`F16`, `Q4K`, …), as layer 0's query projection is.
    pub fn weight_format(&self) -> String {
        match self.layers.first().map(|l| &l.self_attn.q_proj) {
            Some(Linear::Quantized { weight, .. }) => format!("{:?}", weight.dtype()),
            Some(Linear::Dense(l)) => format!("{:?}", l.weight().dtype()).to_uppercase(),
            Some(Linear::Bf16 { .. }) => "BF16 (AVX512-BF16 kernels)".into(),
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
            .map(|l| {
                let a = &l.self_attn;
                let m = &l.mlp;
                [
                    &a.q_proj,
                    &a.k_proj,
                    &a.v_proj,
                    &a.o_proj,
                    &m.gate_proj,
                    &m.up_proj,
                    &m.down_proj,
                ]
                .iter()
                .map(|x| x.stored_bytes())
                .sum::<usize>()
                    + 2 * norm
            })
            .sum();
        let row = h * self.embed_tokens.embeddings().dtype().size_in_bytes();
        layers + norm + self.lm_head.stored_bytes() + row
    }

    pub fn device(&self) -> &candle_core::Device {
        self.embed_tokens.embeddings().device()
    }

    /// Token embeddings. `ids: (b, s)` u32 → `(b, s, hidden)`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(ids)?.to_dtype(self.compute_dtype)
    }

    /// The whole stack on a step of embeddings, appending to `cache`.
    /// `xs: (b, s, hidden)`; `valid[r]` real (not padding) leading positions of row `r`
    /// → final-normed hidden states `(b, s, hidden)`.
    pub fn forward(&self, xs: &Tensor, valid: &[usize], cache: &mut KvCache) -> Result<Tensor> {
        let (b, s, _) = xs.dims3()?;
        let (positions, mask) = cache.begin_step(
            valid,
            s,
            self.cfg.sliding_window,
            self.cfg.max_position_embeddings,
            xs.device(),
        )?;
        let pos = Tensor::from_vec(positions, (b, s), xs.device())?.to_dtype(DType::F32)?;
        let freqs = pos
            .unsqueeze(2)?
            .broadcast_mul(&self.inv_freq.reshape((1, 1, ()))?)?;
        let dtype = xs.dtype();
        let (cos, sin) = (
            freqs.cos()?.to_dtype(dtype)?.contiguous()?,
            freqs.sin()?.to_dtype(dtype)?.contiguous()?,
        );
        let mask = mask.to_dtype(dtype)?;
        let mut xs = xs.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let x = layer.input_layernorm.forward(&xs)?;
            let x = layer.self_attn.forward(&x, &cos, &sin, &mask, cache, i)?;
            xs = (xs + x)?;
            let x = layer.post_attention_layernorm.forward(&xs)?;
            xs = (&xs + layer.mlp.forward(&x)?)?;
        }
        self.norm.forward(&xs)
    }

    /// `hidden: (…, hidden) → (…, vocab)`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
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
            let SelfAttention {
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                ..
            } = &mut l.self_attn;
            let Mlp {
                gate_proj,
                up_proj,
                down_proj,
                ..
            } = &mut l.mlp;
            for (name, lin) in [
                ("self_attn.q_proj", q_proj),
                ("self_attn.k_proj", k_proj),
                ("self_attn.v_proj", v_proj),
                ("self_attn.o_proj", o_proj),
                ("mlp.gate_proj", gate_proj),
                ("mlp.up_proj", up_proj),
                ("mlp.down_proj", down_proj),
            ] {
                out.push((format!("model.layers.{i}.{name}"), lin));
            }
        }
        out
    }
}
