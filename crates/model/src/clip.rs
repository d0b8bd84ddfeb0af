//! The CLIP ViT vision tower (transformers' `CLIPVisionModel`), up to the hidden state LLaVA
//! selects (llava-spec §1a.2): patch + position embeddings, `pre_layrnorm`, then the first
//! `vision_layers_used` encoder layers. `post_layernorm` is never applied.
//!
//! Reference: huggingface/transformers `models/clip/modeling_clip.py` (v4.37).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};

use crate::config::{ClipVisionConfig, FeatureSelect};
use crate::form::Matrices;
use crate::layers::{activate_owned, attention, LayerNorm, Linear};

#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    act: crate::config::Activation,
}

impl EncoderLayer {
    fn load(vb: VarBuilder, cfg: &ClipVisionConfig, m: Matrices) -> Result<Self> {
        let h = cfg.hidden_size;
        let attn = vb.pp("self_attn");
        Ok(Self {
            layer_norm1: LayerNorm::load(vb.pp("layer_norm1"), h, cfg.layer_norm_eps)?,
            q_proj: Linear::load(attn.pp("q_proj"), h, h, true, m)?,
            k_proj: Linear::load(attn.pp("k_proj"), h, h, true, m)?,
            v_proj: Linear::load(attn.pp("v_proj"), h, h, true, m)?,
            out_proj: Linear::load(attn.pp("out_proj"), h, h, true, m)?,
            layer_norm2: LayerNorm::load(vb.pp("layer_norm2"), h, cfg.layer_norm_eps)?,
            fc1: Linear::load(vb.pp("mlp").pp("fc1"), h, cfg.intermediate_size, true, m)?,
            fc2: Linear::load(vb.pp("mlp").pp("fc2"), cfg.intermediate_size, h, true, m)?,
            heads: cfg.num_attention_heads,
            act: cfg.hidden_act,
        })
    }

    /// `xs: (b, n, hidden) → (b, n, hidden)`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, n, h) = xs.dims3()?;
        let d = h / self.heads;
        let x = self.layer_norm1.forward(xs)?;
        let split = |t: Tensor| {
            t.reshape((b, n, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q_proj.forward(&x)?)?;
        let k = split(self.k_proj.forward(&x)?)?;
        let v = split(self.v_proj.forward(&x)?)?;
        // A tower in bf16 rounds its attention's operands to bf16 too (on AMX tiles).
        let blocks = match self.q_proj {
            Linear::Bf16 { .. } => {
                crate::kernels::block_attention::attention_bf16(&q, &k, &v, None)?
            }
            _ => crate::kernels::block_attention::attention(&q, &k, &v, None)?,
        };
        let a = match blocks {
            Some(a) => a,
            None => attention(&q, &k, &v, None, (d as f64).powf(-0.5))?,
        };
        let a = a.transpose(1, 2)?.reshape((b, n, h))?;
        let xs = (xs + self.out_proj.forward(&a)?)?;
        let x = self.layer_norm2.forward(&xs)?;
        let x = self
            .fc2
            .forward(&activate_owned(self.act, self.fc1.forward(&x)?)?)?;
        xs + x
    }
}

/// CLIP vision weights (the layers LLaVA uses).
#[derive(Debug, Clone)]
pub struct ClipVision {
    patch_embedding: Conv2d,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    feature_select: FeatureSelect,
}

impl ClipVision {
    /// `vb` is scoped at `vision_model`. Only the first `layers_used` encoder layers load.
    pub fn load(
        vb: VarBuilder,
        cfg: &ClipVisionConfig,
        layers_used: usize,
        feature_select: FeatureSelect,
        m: Matrices,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let conv_cfg = Conv2dConfig {
            stride: cfg.patch_size,
            ..Default::default()
        };
        let weight = emb.pp("patch_embedding").get(
            (h, cfg.num_channels, cfg.patch_size, cfg.patch_size),
            "weight",
        )?;
        let patch_embedding = Conv2d::new(weight, None, conv_cfg);
        let num_positions = cfg.grid() * cfg.grid() + 1;
        let position_embedding = emb
            .pp("position_embedding")
            .get((num_positions, h), "weight")?;
        let class_embedding = emb.get(h, "class_embedding")?;
        let pre_layrnorm = LayerNorm::load(vb.pp("pre_layrnorm"), h, cfg.layer_norm_eps)?;
        let layers = (0..layers_used)
            .map(|i| EncoderLayer::load(vb.pp("encoder.layers").pp(i), cfg, m))
            .collect::<Result<_>>()?;
        Ok(Self {
            patch_embedding,
            class_embedding,
            position_embedding,
            pre_layrnorm,
            layers,
            feature_select,
        })
    }

    /// Replaces every linear map of the encoder layers by `f` of it.
    pub fn map_linears(&mut self, f: impl Fn(&Linear) -> Result<Linear>) -> Result<()> {
        for (_, lin) in self.linears_mut() {
            *lin = f(lin)?;
        }
        Ok(())
    }

    /// Every linear map of the encoder layers, named as under `vision_model`
    /// (`encoder.layers.0.self_attn.q_proj`, …).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::with_capacity(6 * self.layers.len());
        for (i, l) in self.layers.iter_mut().enumerate() {
            let at = |p: &str| format!("encoder.layers.{i}.{p}");
            out.push((at("self_attn.q_proj"), &mut l.q_proj));
            out.push((at("self_attn.k_proj"), &mut l.k_proj));
            out.push((at("self_attn.v_proj"), &mut l.v_proj));
            out.push((at("self_attn.out_proj"), &mut l.out_proj));
            out.push((at("mlp.fc1"), &mut l.fc1));
            out.push((at("mlp.fc2"), &mut l.fc2));
        }
        out
    }

    /// The selected hidden state. `pixels: (b, 3, S, S) → (b, N, vision_hidden)`, with
    /// `N = (S/patch)²` (+1 with `ClsPatch`).
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        // Pixels come as f32; the reference casts them to the tower's dtype.
        let pixels = pixels.to_dtype(self.class_embedding.dtype())?;
        let patches = self.patch_embedding.forward(&pixels)?; // (b, h, g, g)
        let (b, h, _, _) = patches.dims4()?;
        let patches = patches.flatten_from(2)?.transpose(1, 2)?; // (b, g², h)
        let cls = self
            .class_embedding
            .reshape((1, 1, h))?
            .broadcast_as((b, 1, h))?;
        let xs = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        let mut xs = self.pre_layrnorm.forward(&xs)?;
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        match self.feature_select {
            FeatureSelect::Patch => xs.narrow(1, 1, xs.dim(1)? - 1),
            FeatureSelect::ClsPatch => Ok(xs),
        }
    }
}
