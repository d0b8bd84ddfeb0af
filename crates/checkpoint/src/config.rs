//! Raw `config.json` / `preprocessor_config.json` structs (fields named exactly as the JSON
//! keys, missing keys as `Option`) and their one-time resolution into a [`ModelConfig`].
//!
//! Defaults cite upstream: LLaMA's from transformers' `LlamaConfig`, LLaVA's from
//! `haotian-liu/LLaVA:llava/model/llava_arch.py@c121f04` (`mm_vision_select_layer` -1 when
//! absent, `mm_projector_type` linear, `mm_use_im_patch_token` true, `image_aspect_ratio`
//! square) and the June-2023 code (llava-spec §1a).

use kollava_model::config::{
    Activation, Architecture, ClipVisionConfig, DecoderConfig, FeatureSelect, ModelConfig,
    ProjectorKind,
};
use serde::Deserialize;
use serde_json::Value;

use crate::CheckpointError;

/// The code that wrote a checkpoint: it decides the files' layout and how images enter the
/// ids (llava-spec §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// LLaVA's June-2023 code (May's for MPT): `<im_patch>` tokens in the text, the tower
    /// loaded separately, a linear projector.
    LlavaV0,
    /// LLaVA's code from v1.0 on (`Llava*ForCausalLM`): `<image>` spliced as `-200`.
    Llava15,
    /// transformers' `LlavaForConditionalGeneration` (llava-hf): one `<image>` token per row.
    LlavaHf,
}

/// The language model inside, as the checkpoint's class names it. What differs in the
/// graph is [`kollava_model::config::Architecture`]; this also decides key names, module
/// paths and the reference's template choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Llm {
    /// LLaMA, LLaMA-2, Vicuna, KoVicuna.
    Llama,
    /// Mistral (Synatra): LLaMA's graph with grouped-query attention and a sliding window.
    Mistral,
    /// MosaicML MPT (`LlavaMPTForCausalLM`): ALiBi, fused `Wqkv`, stored as `transformer.*`.
    Mpt,
}

/// A checkpoint family: a [`Layout`] times an [`Llm`]. Code asks whichever of the two its
/// decision depends on; a new language model is a new [`Llm`] (and its graph in
/// `kollava_model`) plus a row in [`Family::KNOWN`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    pub layout: Layout,
    pub llm: Llm,
}

impl Family {
    /// June-2023 LLaVA / KoLLaVA-KoVicuna.
    pub const LLAVA_V0: Family = Family {
        layout: Layout::LlavaV0,
        llm: Llm::Llama,
    };
    /// LLaVA-1.5 (and KoLLaVA-LLaMA-v2).
    pub const LLAVA_15: Family = Family {
        layout: Layout::Llava15,
        llm: Llm::Llama,
    };
    /// `LlavaMistralForCausalLM` (KoLLaVA-v1.5-Synatra).
    pub const LLAVA_MISTRAL: Family = Family {
        layout: Layout::Llava15,
        llm: Llm::Mistral,
    };
    /// llava-hf.
    pub const LLAVA_HF: Family = Family {
        layout: Layout::LlavaHf,
        llm: Llm::Llama,
    };
    /// LLaVA-Lightning-MPT (May 2023).
    pub const LLAVA_MPT: Family = Family {
        layout: Layout::LlavaV0,
        llm: Llm::Mpt,
    };

    /// Every family kollava loads, with the name it goes by (output, GGUF metadata).
    pub const KNOWN: [(Family, &'static str); 5] = [
        (Family::LLAVA_V0, "llava-v0"),
        (Family::LLAVA_15, "llava-v1.5"),
        (Family::LLAVA_MISTRAL, "llava-mistral"),
        (Family::LLAVA_HF, "llava-hf"),
        (Family::LLAVA_MPT, "llava-mpt"),
    ];

    pub fn name(self) -> &'static str {
        Family::KNOWN
            .iter()
            .find(|(f, _)| *f == self)
            .map_or("llava", |(_, n)| n)
    }

    /// The family named `name` (as [`Family::name`] writes it).
    pub fn from_name(name: &str) -> Option<Family> {
        Family::KNOWN
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(f, _)| *f)
    }

    /// A weight's name in the family's own Python class, for the files LLaVA's code reads
    /// (`mm_projector.bin`, `non_lora_trainables.bin`): `transformer.*` for LLaVA-MPT, our
    /// (LLaVA's) names otherwise.
    pub fn original_name(self, ours: &str) -> String {
        match self.llm {
            Llm::Mpt => crate::weights::KeyLayout::Mpt.llm_key(ours),
            Llm::Llama | Llm::Mistral => ours.to_string(),
        }
    }

    /// Our module path (`model.layers.3.self_attn.q_proj`) as it is in the module tree of
    /// the family's Python class, the paths PEFT adapts: transformers 5.x's
    /// `LlavaForConditionalGeneration` for llava-hf (`model.language_model.layers.3…`),
    /// LLaVA's `LlavaMPTForCausalLM` (`transformer.blocks.3.attn.Wqkv`), and LLaVA's other
    /// `Llava*ForCausalLM`, whose paths are our names.
    pub fn peft_module(self, ours: &str) -> String {
        match (self.layout, self.llm) {
            (Layout::LlavaHf, _) => match ours.strip_prefix("model.layers.") {
                Some(rest) => format!("model.language_model.layers.{rest}"),
                None => ours.to_string(),
            },
            (_, Llm::Mpt) => crate::weights::KeyLayout::Mpt.module_key(ours),
            (Layout::LlavaV0 | Layout::Llava15, _) => ours.to_string(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct RawLlavaConfig {
    pub architectures: Option<Vec<String>>,
    pub model_type: Option<String>,
    pub vocab_size: Option<usize>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<Value>,
    pub rope_parameters: Option<Value>,
    pub max_position_embeddings: Option<usize>,
    pub max_sequence_length: Option<usize>,
    pub sliding_window: Option<usize>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub hidden_act: Option<String>,
    pub tie_word_embeddings: Option<bool>,
    pub eos_token_id: Option<Value>,
    // MPT keys (`MPTConfig`, llava-spec §1d.2).
    pub d_model: Option<usize>,
    pub n_heads: Option<usize>,
    pub n_layers: Option<usize>,
    pub expansion_ratio: Option<f64>,
    pub max_seq_len: Option<usize>,
    pub attn_config: Option<crate::mpt::RawMptAttention>,
    pub no_bias: Option<bool>,
    pub norm_type: Option<String>,
    pub logit_scale: Option<Value>,
    /// Written by `kollava train`: the conversation format the model was trained in.
    pub kollava_template: Option<String>,
    /// Written by `kollava convert --layout hf`: the model was trained on LLaVA's own
    /// tokenization (the text around each `<image>` tokenized on its own), so prompts are
    /// tokenized that way, not as one string with `<image>` tokens in it.
    pub kollava_original_tokenization: Option<bool>,
    // LLaVA (original code) keys.
    pub mm_vision_tower: Option<String>,
    pub mm_hidden_size: Option<usize>,
    pub mm_projector_type: Option<String>,
    pub mm_vision_select_layer: Option<i64>,
    pub mm_vision_select_feature: Option<String>,
    pub mm_use_im_start_end: Option<bool>,
    pub mm_use_im_patch_token: Option<bool>,
    pub image_aspect_ratio: Option<String>,
    // llava-hf keys.
    pub text_config: Option<Box<RawLlavaConfig>>,
    pub vision_config: Option<RawClipConfig>,
    pub vision_feature_layer: Option<i64>,
    pub vision_feature_select_strategy: Option<String>,
    pub image_token_index: Option<u32>,
    pub projector_hidden_act: Option<String>,
    pub multimodal_projector_bias: Option<bool>,
}

/// A CLIP config: `CLIPVisionModel` (flat) or `CLIPModel` (with `vision_config`).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct RawClipConfig {
    pub model_type: Option<String>,
    pub vision_config: Option<Box<RawClipConfig>>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub image_size: Option<usize>,
    pub patch_size: Option<usize>,
    pub num_channels: Option<usize>,
    pub layer_norm_eps: Option<f64>,
    pub hidden_act: Option<String>,
}

/// `preprocessor_config.json` of a CLIP image processor (or of transformers'
/// `LlavaImageProcessor`, which adds `do_pad`).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct RawPreprocessorConfig {
    /// `LlavaImageProcessor`'s square padding with the mean colour before the resize: LLaVA's
    /// `image_aspect_ratio: pad`.
    pub do_pad: Option<bool>,
    pub size: Option<Value>,
    pub crop_size: Option<Value>,
    pub image_mean: Option<Vec<f32>>,
    pub image_std: Option<Vec<f32>>,
    pub rescale_factor: Option<f64>,
    pub do_center_crop: Option<bool>,
    pub resample: Option<u32>,
}

pub(crate) fn parse_activation(name: &str, file: &str) -> Result<Activation, CheckpointError> {
    match name {
        "quick_gelu" => Ok(Activation::QuickGelu),
        "gelu" => Ok(Activation::Gelu),
        "gelu_new" | "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
        "silu" | "swish" => Ok(Activation::Silu),
        other => Err(CheckpointError::Unsupported {
            file: file.to_string(),
            what: format!("activation {other:?}"),
        }),
    }
}

/// Which family a config describes, from `architectures`/`model_type` (never the name).
pub fn detect_family(raw: &RawLlavaConfig, file: &str) -> Result<Family, CheckpointError> {
    let archs = raw.architectures.clone().unwrap_or_default();
    let has = |a: &str| archs.iter().any(|x| x == a);
    let model_type = raw.model_type.as_deref().unwrap_or("");
    if archs
        .iter()
        .any(|a| a.starts_with("LlavaNext") || a.starts_with("LlavaOnevision"))
        || raw_has_grid(raw)
    {
        return Err(CheckpointError::Unsupported {
            file: file.to_string(),
            what: format!("LLaVA-1.6/NeXT checkpoints ({archs:?}; anyres is out of scope)"),
        });
    }
    if has("LlavaForConditionalGeneration")
        || (archs.is_empty()
            && model_type == "llava"
            && raw.text_config.is_some()
            && raw.vision_config.is_some())
    {
        return Ok(Family::LLAVA_HF);
    }
    if has("LlavaMistralForCausalLM") || model_type == "llava_mistral" {
        return Ok(Family::LLAVA_MISTRAL);
    }
    let llama_llava = has("LlavaLlamaForCausalLM")
        || matches!(model_type, "llava" | "llava_llama")
        || (model_type == "llama" && raw.mm_vision_tower.is_some());
    if llama_llava {
        if raw.mm_vision_tower.is_none() {
            return Err(CheckpointError::Unsupported {
                file: file.to_string(),
                what: "a LLaVA config without mm_vision_tower (a projector-only or text-only checkpoint)".into(),
            });
        }
        // Keys the v1.0 refactor introduced; June-2023 configs have none of them.
        let v1 = raw.mm_projector_type.is_some()
            || raw.mm_use_im_patch_token.is_some()
            || raw.image_aspect_ratio.is_some();
        return Ok(if v1 {
            Family::LLAVA_15
        } else {
            Family::LLAVA_V0
        });
    }
    if has("LlavaMPTForCausalLM") || has("LlavaMptForCausalLM") || model_type == "llava_mpt" {
        if raw.mm_vision_tower.is_none() {
            return Err(CheckpointError::Unsupported {
                file: file.to_string(),
                what: "a LLaVA-MPT config without mm_vision_tower".into(),
            });
        }
        return Ok(Family::LLAVA_MPT);
    }
    if model_type == "mpt" {
        return Err(CheckpointError::Unsupported {
            file: file.to_string(),
            what: "a text-only MPT model (kollava runs LLaVA-MPT checkpoints)".into(),
        });
    }
    Err(CheckpointError::UnknownFamily {
        file: file.to_string(),
        architectures: archs,
        model_type: raw.model_type.clone(),
    })
}

/// LLaVA-1.6 configs carry `image_grid_pinpoints` (anyres).
fn raw_has_grid(raw: &RawLlavaConfig) -> bool {
    raw.image_aspect_ratio.as_deref() == Some("anyres")
}

/// Defaults for keys a saved config may omit. transformers writes nested configs as a
/// diff against their class defaults, so llava-hf's `text_config` of llava-1.5-7b has no
/// `hidden_size` at all: these are `LlamaConfig`'s and `MistralConfig`'s defaults
/// (transformers v4.37 `configuration_llama.py` / `configuration_mistral.py`).
struct DecoderDefaults {
    vocab: usize,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: Option<usize>,
    max_positions: usize,
    sliding_window: Option<usize>,
}

const LLAMA_DEFAULTS: DecoderDefaults = DecoderDefaults {
    vocab: 32000,
    hidden: 4096,
    intermediate: 11008,
    layers: 32,
    heads: 32,
    kv_heads: None,
    max_positions: 2048,
    sliding_window: None,
};
const MISTRAL_DEFAULTS: DecoderDefaults = DecoderDefaults {
    vocab: 32000,
    hidden: 4096,
    intermediate: 14336,
    layers: 32,
    heads: 32,
    kv_heads: Some(8),
    max_positions: 4096 * 32,
    sliding_window: Some(4096),
};

/// The decoder part of a config (the top level, or llava-hf's `text_config`).
pub fn resolve_decoder(
    raw: &RawLlavaConfig,
    family: Family,
    file: &str,
) -> Result<DecoderConfig, CheckpointError> {
    if let Some(s) = raw.rope_scaling.as_ref().filter(|v| !v.is_null()) {
        return Err(CheckpointError::Unsupported {
            file: file.to_string(),
            what: format!("rope_scaling {s}"),
        });
    }
    let model_type = raw.model_type.as_deref().unwrap_or("llama");
    let defaults = match model_type {
        "mistral" | "llava_mistral" => &MISTRAL_DEFAULTS,
        "llama" | "llava" | "llava_llama" => &LLAMA_DEFAULTS,
        other => {
            return Err(CheckpointError::Unsupported {
                file: file.to_string(),
                what: format!("language model type {other:?} (supported: llama, mistral)"),
            })
        }
    };
    let invalid = |what: String| CheckpointError::Invalid {
        file: file.to_string(),
        what,
    };
    let hidden = raw.hidden_size.unwrap_or(defaults.hidden);
    let heads = raw.num_attention_heads.unwrap_or(defaults.heads);
    let kv_heads = raw
        .num_key_value_heads
        .or(defaults.kv_heads)
        .unwrap_or(heads);
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(invalid(format!(
            "attention heads: {heads} query heads cannot share {kv_heads} key/value heads"
        )));
    }
    let head_dim = match raw.head_dim {
        Some(d) => d,
        None if hidden.is_multiple_of(heads) => hidden / heads,
        None => {
            return Err(invalid(format!(
                "hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
            )))
        }
    };
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(invalid(format!(
            "head_dim {head_dim} (rotary embeddings need an even, non-zero size)"
        )));
    }
    let rope_theta = raw
        .rope_theta
        .or_else(|| {
            raw.rope_parameters
                .as_ref()
                .and_then(|p| p.get("rope_theta"))
                .and_then(Value::as_f64)
        })
        .unwrap_or(10000.0);
    let sliding_window = if family.llm == Llm::Mistral || model_type == "mistral" {
        raw.sliding_window.or(defaults.sliding_window)
    } else {
        None
    };
    Ok(DecoderConfig {
        arch: Architecture::Llama,
        vocab_size: raw.vocab_size.unwrap_or(defaults.vocab),
        hidden_size: hidden,
        intermediate_size: raw.intermediate_size.unwrap_or(defaults.intermediate),
        num_hidden_layers: raw.num_hidden_layers.unwrap_or(defaults.layers),
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
        rope_theta,
        // LLaMA-1 era configs carry `max_sequence_length` only.
        max_position_embeddings: raw
            .max_position_embeddings
            .or(raw.max_sequence_length)
            .unwrap_or(defaults.max_positions),
        sliding_window,
        attention_bias: raw.attention_bias.unwrap_or(false),
        mlp_bias: raw.mlp_bias.unwrap_or(false),
        hidden_act: parse_activation(raw.hidden_act.as_deref().unwrap_or("silu"), file)?,
        tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
    })
}

/// The vision config of a CLIP checkpoint or of llava-hf's `vision_config`. Missing keys
/// take `CLIPVisionConfig`'s defaults (transformers v4.37 `configuration_clip.py`), since
/// nested configs are saved as a diff against them.
pub fn resolve_clip(raw: &RawClipConfig, file: &str) -> Result<ClipVisionConfig, CheckpointError> {
    let v = raw.vision_config.as_deref().unwrap_or(raw);
    let invalid = |what: String| CheckpointError::Invalid {
        file: file.to_string(),
        what,
    };
    let hidden = v.hidden_size.unwrap_or(768);
    let heads = v.num_attention_heads.unwrap_or(12);
    let (image_size, patch_size) = (v.image_size.unwrap_or(224), v.patch_size.unwrap_or(32));
    if heads == 0 || !hidden.is_multiple_of(heads) {
        return Err(invalid(format!(
            "vision hidden_size {hidden} is not a multiple of {heads} heads"
        )));
    }
    if patch_size == 0 || !image_size.is_multiple_of(patch_size) {
        return Err(invalid(format!(
            "vision image_size {image_size} is not a multiple of patch_size {patch_size}"
        )));
    }
    Ok(ClipVisionConfig {
        hidden_size: hidden,
        intermediate_size: v.intermediate_size.unwrap_or(3072),
        num_attention_heads: heads,
        num_hidden_layers: v.num_hidden_layers.unwrap_or(12),
        image_size,
        patch_size,
        num_channels: v.num_channels.unwrap_or(3),
        layer_norm_eps: v.layer_norm_eps.unwrap_or(1e-5),
        hidden_act: parse_activation(v.hidden_act.as_deref().unwrap_or("quick_gelu"), file)?,
    })
}

/// `hidden_states[select]` → number of encoder layers to run.
pub fn resolve_select_layer(
    select: i64,
    layers: usize,
    file: &str,
) -> Result<usize, CheckpointError> {
    let idx = if select < 0 {
        layers as i64 + 1 + select
    } else {
        select
    };
    if !(0..=layers as i64).contains(&idx) {
        return Err(CheckpointError::Invalid {
            file: file.to_string(),
            what: format!("vision select layer {select} for a tower of {layers} layers"),
        });
    }
    Ok(idx as usize)
}

/// `mm_projector_type`: `linear`, `identity`, or `mlp{N}x_gelu`.
pub fn resolve_projector(name: &str, file: &str) -> Result<ProjectorKind, CheckpointError> {
    if name == "linear" {
        return Ok(ProjectorKind::Linear);
    }
    if name == "identity" {
        return Ok(ProjectorKind::Identity);
    }
    if let Some(depth) = name
        .strip_prefix("mlp")
        .and_then(|s| s.strip_suffix("x_gelu"))
        .and_then(|d| d.parse::<usize>().ok())
    {
        if depth >= 1 {
            return Ok(ProjectorKind::Mlp {
                depth,
                activation: Activation::Gelu,
            });
        }
    }
    Err(CheckpointError::Unsupported {
        file: file.to_string(),
        what: format!("mm_projector_type {name:?} (expected linear, identity or mlpNx_gelu)"),
    })
}

/// Assembles a [`ModelConfig`] from the LLaVA config and the tower's vision config.
pub fn resolve_model(
    raw: &RawLlavaConfig,
    family: Family,
    vision: ClipVisionConfig,
    file: &str,
) -> Result<ModelConfig, CheckpointError> {
    let (decoder, projector, select, feature) = match family.layout {
        Layout::LlavaHf => {
            let text = raw
                .text_config
                .as_deref()
                .ok_or_else(|| CheckpointError::MissingKey {
                    file: file.to_string(),
                    key: "text_config".into(),
                })?;
            let act =
                parse_activation(raw.projector_hidden_act.as_deref().unwrap_or("gelu"), file)?;
            let feature = match raw
                .vision_feature_select_strategy
                .as_deref()
                .unwrap_or("default")
            {
                "default" => FeatureSelect::Patch,
                "full" => FeatureSelect::ClsPatch,
                other => {
                    return Err(CheckpointError::Unsupported {
                        file: file.to_string(),
                        what: format!("vision_feature_select_strategy {other:?}"),
                    })
                }
            };
            if raw.multimodal_projector_bias == Some(false) {
                return Err(CheckpointError::Unsupported {
                    file: file.to_string(),
                    what: "multimodal_projector_bias false".into(),
                });
            }
            let mut dec = resolve_decoder(text, family, file)?;
            if let Some(v) = raw.vocab_size {
                dec.vocab_size = v;
            }
            (
                dec,
                ProjectorKind::Mlp {
                    depth: 2,
                    activation: act,
                },
                raw.vision_feature_layer.unwrap_or(-2),
                feature,
            )
        }
        _ => {
            let projector = match family.layout {
                // June-2023 code (and May's, MPT's) has only the linear projector.
                Layout::LlavaV0 => ProjectorKind::Linear,
                _ => resolve_projector(raw.mm_projector_type.as_deref().unwrap_or("linear"), file)?,
            };
            let feature = match raw.mm_vision_select_feature.as_deref().unwrap_or("patch") {
                "patch" => FeatureSelect::Patch,
                "cls_patch" => FeatureSelect::ClsPatch,
                other => {
                    return Err(CheckpointError::Unsupported {
                        file: file.to_string(),
                        what: format!("mm_vision_select_feature {other:?}"),
                    })
                }
            };
            let decoder = match family.llm {
                Llm::Mpt => crate::mpt::resolve_decoder(raw, file)?,
                Llm::Llama | Llm::Mistral => resolve_decoder(raw, family, file)?,
            };
            (
                decoder,
                projector,
                raw.mm_vision_select_layer.unwrap_or(-1),
                feature,
            )
        }
    };
    if let Some(mm) = raw.mm_hidden_size {
        if mm != vision.hidden_size {
            return Err(CheckpointError::Invalid {
                file: file.to_string(),
                what: format!(
                    "mm_hidden_size {mm} but the vision tower's hidden_size is {}",
                    vision.hidden_size
                ),
            });
        }
    }
    if projector == ProjectorKind::Identity && vision.hidden_size != decoder.hidden_size {
        return Err(CheckpointError::Invalid {
            file: file.to_string(),
            what: format!(
                "identity projector between vision width {} and hidden size {}",
                vision.hidden_size, decoder.hidden_size
            ),
        });
    }
    let vision_layers_used = resolve_select_layer(select, vision.num_hidden_layers, file)?;
    Ok(ModelConfig {
        vision,
        vision_layers_used,
        feature_select: feature,
        projector,
        decoder,
    })
}

/// Image processor settings: `shortest_edge`, crop, mean/std and rescale factor.
pub fn resolve_preprocess(
    raw: Option<&RawPreprocessorConfig>,
    image_size: usize,
) -> kollava_inputs::image::ClipPreprocess {
    let mut p = kollava_inputs::image::ClipPreprocess::square(image_size as u32);
    let Some(raw) = raw else { return p };
    let dims = |v: &Value| -> Option<(u32, u32)> {
        match v {
            Value::Number(n) => n.as_u64().map(|n| (n as u32, n as u32)),
            Value::Object(o) => {
                if let Some(s) = o.get("shortest_edge").and_then(Value::as_u64) {
                    return Some((s as u32, s as u32));
                }
                Some((
                    o.get("width")?.as_u64()? as u32,
                    o.get("height")?.as_u64()? as u32,
                ))
            }
            _ => None,
        }
    };
    if let Some((s, _)) = raw.size.as_ref().and_then(dims) {
        p.shortest_edge = s;
    }
    if let Some(c) = raw.crop_size.as_ref().and_then(dims) {
        p.crop = c;
    }
    if let Some(m) = raw.image_mean.as_ref().filter(|m| m.len() == 3) {
        p.mean = [m[0], m[1], m[2]];
    }
    if let Some(s) = raw.image_std.as_ref().filter(|s| s.len() == 3) {
        p.std = [s[0], s[1], s[2]];
    }
    if let Some(r) = raw.rescale_factor {
        p.rescale_factor = r;
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_layer_minus_two_runs_all_but_the_last_layer() {
        assert_eq!(resolve_select_layer(-2, 24, "c").unwrap(), 23);
        assert_eq!(resolve_select_layer(-1, 24, "c").unwrap(), 24);
        assert!(resolve_select_layer(-26, 24, "c").is_err());
    }

    #[test]
    fn projector_types_parse_and_unknown_ones_are_named() {
        assert_eq!(
            resolve_projector("mlp2x_gelu", "c").unwrap(),
            ProjectorKind::Mlp {
                depth: 2,
                activation: Activation::Gelu
            }
        );
        assert_eq!(
            resolve_projector("mlp3x_gelu", "c").unwrap(),
            ProjectorKind::Mlp {
                depth: 3,
                activation: Activation::Gelu
            }
        );
        let err = resolve_projector("qformer", "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("qformer") && err.contains("cfg.json"), "{err}");
    }

    #[test]
    fn sparse_hub_configs_take_transformers_defaults() {
        // llava-hf/llava-1.5-7b-hf's config.json as published: text_config and
        // vision_config only list what differs from LlamaConfig / CLIPVisionConfig.
        let raw: RawLlavaConfig = serde_json::from_str(
            r#"{"architectures":["LlavaForConditionalGeneration"],"model_type":"llava","image_token_index":32000,
                "projector_hidden_act":"gelu","vision_feature_layer":-2,"vision_feature_select_strategy":"default",
                "text_config":{"_name_or_path":"lmsys/vicuna-7b-v1.5","architectures":["LlamaForCausalLM"],
                    "max_position_embeddings":4096,"model_type":"llama","rms_norm_eps":1e-05,"torch_dtype":"float16","vocab_size":32064},
                "vision_config":{"hidden_size":1024,"image_size":336,"intermediate_size":4096,"model_type":"clip_vision_model",
                    "num_attention_heads":16,"num_hidden_layers":24,"patch_size":14,"projection_dim":768,"vocab_size":32000},
                "vocab_size":32064}"#,
        )
        .unwrap();
        assert_eq!(detect_family(&raw, "c").unwrap(), Family::LLAVA_HF);
        let vision = resolve_clip(raw.vision_config.as_ref().unwrap(), "c").unwrap();
        let cfg = resolve_model(&raw, Family::LLAVA_HF, vision, "c").unwrap();
        assert_eq!(
            (
                cfg.decoder.hidden_size,
                cfg.decoder.num_hidden_layers,
                cfg.decoder.intermediate_size
            ),
            (4096, 32, 11008)
        );
        assert_eq!(
            (
                cfg.decoder.num_key_value_heads,
                cfg.decoder.head_dim,
                cfg.decoder.vocab_size
            ),
            (32, 128, 32064)
        );
        assert_eq!((cfg.image_tokens(), cfg.vision_layers_used), (576, 23));
    }

    #[test]
    fn impossible_head_counts_are_invalid_not_a_panic() {
        let raw: RawLlavaConfig =
            serde_json::from_str(r#"{"hidden_size":100,"num_attention_heads":3}"#).unwrap();
        let err = resolve_decoder(&raw, Family::LLAVA_15, "config.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("config.json") && err.contains("100"), "{err}");
        let raw: RawLlavaConfig =
            serde_json::from_str(r#"{"num_attention_heads":32,"num_key_value_heads":5}"#).unwrap();
        assert!(resolve_decoder(&raw, Family::LLAVA_15, "c").is_err());
    }

    /// LLaVA-MPT-7B's config as uploaded (llava-spec §1d.2) resolves to MPT-7B's decoder;
    /// what kollava cannot run is refused by name.
    #[test]
    fn llava_mpt_configs_resolve_to_an_mpt_decoder() {
        let parse = |s: &str| serde_json::from_str::<RawLlavaConfig>(s).unwrap();
        let raw = parse(
            r#"{"architectures":["LlavaMPTForCausalLM"],"model_type":"llava_mpt","d_model":4096,
                "n_heads":32,"n_layers":32,"expansion_ratio":4,"max_seq_len":2048,"vocab_size":50282,
                "attn_config":{"alibi":true,"alibi_bias_max":8,"attn_impl":"torch","clip_qkv":null,
                    "qk_ln":false,"softmax_scale":null,"prefix_lm":false,"attn_uses_sequence_id":false},
                "no_bias":true,"norm_type":"low_precision_layernorm","logit_scale":null,
                "mm_vision_tower":"openai/clip-vit-large-patch14","mm_hidden_size":1024,
                "mm_vision_select_layer":-2,"mm_use_im_start_end":true}"#,
        );
        assert_eq!(detect_family(&raw, "c").unwrap(), Family::LLAVA_MPT);
        let d = crate::mpt::resolve_decoder(&raw, "c").unwrap();
        assert_eq!(
            (
                d.hidden_size,
                d.intermediate_size,
                d.num_hidden_layers,
                d.head_dim
            ),
            (4096, 16384, 32, 128)
        );
        assert_eq!((d.vocab_size, d.max_position_embeddings), (50282, 2048));
        assert!(d.tie_word_embeddings && !d.attention_bias && !d.mlp_bias);
        assert_eq!(d.mpt().map(|o| o.alibi_bias_max), Some(8.0));
        for (bad, what) in [
            (r#"{"attn_config":{"alibi":false}}"#, "ALiBi"),
            (r#"{"attn_config":{"prefix_lm":true}}"#, "prefix-LM"),
            (r#"{"norm_type":"rmsnorm"}"#, "rmsnorm"),
            (r#"{"tie_word_embeddings":false}"#, "untied"),
            (r#"{"d_model":100,"n_heads":3}"#, "100"),
        ] {
            let err = crate::mpt::resolve_decoder(&parse(bad), "config.json")
                .unwrap_err()
                .to_string();
            assert!(err.contains(what) && err.contains("config.json"), "{err}");
        }
        let text_only = parse(r#"{"architectures":["MPTForCausalLM"],"model_type":"mpt"}"#);
        assert!(detect_family(&text_only, "c")
            .unwrap_err()
            .to_string()
            .contains("text-only MPT"));
    }

    #[test]
    fn llava_next_is_refused_by_name() {
        let raw: RawLlavaConfig = serde_json::from_str(r#"{"architectures":["LlavaNextForConditionalGeneration"],"model_type":"llava_next","text_config":{},"vision_config":{}}"#).unwrap();
        assert!(detect_family(&raw, "c")
            .unwrap_err()
            .to_string()
            .contains("NeXT"));
    }

    #[test]
    fn family_comes_from_architectures_and_keys() {
        let parse = |s: &str| serde_json::from_str::<RawLlavaConfig>(s).unwrap();
        let v0 = parse(
            r#"{"architectures":["LlavaLlamaForCausalLM"],"model_type":"llava","mm_vision_tower":"x","mm_use_im_start_end":true}"#,
        );
        assert_eq!(detect_family(&v0, "c").unwrap(), Family::LLAVA_V0);
        let old = parse(r#"{"model_type":"llama","mm_vision_tower":"x"}"#);
        assert_eq!(detect_family(&old, "c").unwrap(), Family::LLAVA_V0);
        let v15 = parse(
            r#"{"architectures":["LlavaLlamaForCausalLM"],"mm_vision_tower":"x","mm_projector_type":"mlp2x_gelu"}"#,
        );
        assert_eq!(detect_family(&v15, "c").unwrap(), Family::LLAVA_15);
        let unknown = parse(r#"{"architectures":["BertModel"],"model_type":"bert"}"#);
        let err = detect_family(&unknown, "config.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("BertModel") && err.contains("bert"), "{err}");
    }
}
