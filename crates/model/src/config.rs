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

/// LLaMA-family decoder. Mistral is the same graph with a sliding window.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
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
