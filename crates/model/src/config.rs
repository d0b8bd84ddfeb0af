//! [`ModelConfig`]: the one resolved description of a LLaVA graph, whatever family the
//! checkpoint came from. Built by the `checkpoint` crate from the raw JSON; no `Option` the
//! forward path would have to unwrap and no strings to re-parse.

/// CLIP ViT vision tower (`CLIPVisionModel`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: Activation,
}

impl ClipVisionConfig {
    /// Patches per side of the input grid.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// Which CLIP rows become image tokens (`mm_vision_select_feature`,
/// `vision_feature_select_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureSelect {
    /// Drop the CLS row (`patch`, `default`): every LLaVA/KoLLaVA checkpoint.
    Patch,
    /// Keep it (`cls_patch`, `full`).
    ClsPatch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`: OpenAI CLIP.
    QuickGelu,
    /// Exact erf GELU: the LLaVA projector (`nn.GELU()`), HF `gelu`.
    Gelu,
    /// tanh approximation (`gelu_pytorch_tanh`, `gelu_new`).
    GeluTanh,
    Silu,
}

/// `mm_projector_type` / llava-hf's `multi_modal_projector`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectorKind {
    /// One `Linear(vision → hidden)` (LLaVA v0, KoLLaVA-LLaMA-v2).
    Linear,
    /// `mlp{depth}x_gelu`: Linear, then (GELU, Linear) × (depth − 1).
    Mlp {
        depth: usize,
        activation: Activation,
    },
    Identity,
}

/// What differs between the decoder architectures we run. The rest of [`DecoderConfig`]
/// (widths, heads, norms' epsilon, biases, activation, tying) is common to all.
#[derive(Debug, Clone, PartialEq)]
pub enum Architecture {
    /// LLaMA (and Vicuna, KoVicuna, Mistral/Synatra): rotary positions, RMSNorm, separate
    /// q/k/v projections, a gated MLP.
    Llama,
    /// MosaicML MPT (LLaVA-Lightning-MPT): ALiBi instead of positions, LayerNorm, one fused
    /// `Wqkv`, an ungated MLP (`down(act(up(x)))`), the output tied to the embedding.
    Mpt(MptOptions),
}

/// The `attn_config` and output settings of an MPT config (llava-spec §1d.3).
#[derive(Debug, Clone, PartialEq)]
pub struct MptOptions {
    /// `alibi_bias_max`: the slopes are `2^(-k·max/H')`.
    pub alibi_bias_max: f64,
    /// `clip_qkv`: the fused projection's output clamped to `±clip`.
    pub clip_qkv: Option<f64>,
    /// `qk_ln`: LayerNorm on q and k (over the whole width) before the heads split.
    pub qk_ln: bool,
    /// `softmax_scale` (default `1/sqrt(head_dim)`).
    pub softmax_scale: Option<f64>,
    /// `logit_scale`: logits multiplied by it.
    pub logit_scale: Option<f64>,
    /// `no_bias: false`: the norms have biases too (the linears follow `attention_bias`).
    pub norm_bias: bool,
}

impl MptOptions {
    /// ALiBi's per-head slopes, as MPT's `gen_slopes` builds them: `H'` the next power of
    /// two, `2^(-k·max/H')` for `k = 1..H'`, and when `H' != H` the odd then the even ones.
    pub fn alibi_slopes(&self, heads: usize) -> Vec<f32> {
        let h2 = heads.next_power_of_two();
        let all: Vec<f32> = (1..=h2)
            .map(|k| 2f64.powf(-(k as f64) * self.alibi_bias_max / h2 as f64) as f32)
            .collect();
        if h2 == heads {
            return all;
        }
        let odd = all.iter().skip(1).step_by(2);
        let even = all.iter().step_by(2);
        odd.chain(even).copied().take(heads).collect()
    }
}

/// A decoder-only language model: LLaMA-family (Mistral is the same graph with a sliding
/// window) or MPT, as [`Architecture`] says.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub arch: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// The norms' epsilon (RMSNorm's, or MPT's LayerNorm's).
    pub rms_norm_eps: f64,
    /// Rotary base (LLaMA); unused by ALiBi models.
    pub rope_theta: f64,
    /// Longest sequence the checkpoint supports; longer prompts are refused.
    pub max_position_embeddings: usize,
    /// Mistral: query i sees key j only when `0 <= i - j < window`.
    pub sliding_window: Option<usize>,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub hidden_act: Activation,
    pub tie_word_embeddings: bool,
}

impl DecoderConfig {
    /// MPT's options, when the model is one.
    pub fn mpt(&self) -> Option<&MptOptions> {
        match &self.arch {
            Architecture::Mpt(o) => Some(o),
            Architecture::Llama => None,
        }
    }
}

/// A whole LLaVA model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub vision: ClipVisionConfig,
    /// How many CLIP encoder layers to run: `hidden_states[k]` is the output after `k`
    /// layers, so `mm_vision_select_layer = -2` of 24 layers resolves to 23.
    pub vision_layers_used: usize,
    pub feature_select: FeatureSelect,
    pub projector: ProjectorKind,
    pub decoder: DecoderConfig,
}

impl ModelConfig {
    /// Image feature rows per image (256 for ViT-L/14 at 224 px, 576 at 336 px).
    pub fn image_tokens(&self) -> usize {
        let g = self.vision.grid();
        g * g + usize::from(self.feature_select == FeatureSelect::ClsPatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mpt(alibi_bias_max: f64) -> MptOptions {
        MptOptions {
            alibi_bias_max,
            clip_qkv: None,
            qk_ln: false,
            softmax_scale: None,
            logit_scale: None,
            norm_bias: false,
        }
    }

    /// MPT's `gen_slopes`: for 32 heads and max 8, `2^(-k/4)`; for 12 heads the 16 slopes
    /// of the next power of two, odd-indexed ones first (`2^-1 … 2^-8`), then the first
    /// four even-indexed ones (`2^-0.5 … 2^-3.5`).
    #[test]
    fn alibi_slopes_follow_mpt() {
        let s = mpt(8.0).alibi_slopes(32);
        assert_eq!(s.len(), 32);
        for (k, x) in s.iter().enumerate() {
            assert_eq!(*x, 2f64.powf(-((k + 1) as f64) / 4.0) as f32, "head {k}");
        }
        let s = mpt(8.0).alibi_slopes(12);
        let want: Vec<f32> = (1..=8)
            .map(|e| 2f64.powi(-e))
            .chain([0.5, 1.5, 2.5, 3.5].map(|e| 2f64.powf(-e)))
            .map(|x| x as f32)
            .collect();
        assert_eq!(s, want);
    }
}
