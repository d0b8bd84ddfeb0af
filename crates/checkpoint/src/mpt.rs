//! LLaVA-MPT (`LlavaMPTForCausalLM`, llava-spec §1d): what the checkpoint crate knows of the
//! MPT language model, in one place. Its config (`MPTConfig`'s keys) resolves to a
//! [`DecoderConfig`] with [`Architecture::Mpt`]; its stored names (`transformer.*`) map to
//! ours; its GGUF form is llama.cpp's `mpt` architecture. The rest is rows in the tables:
//! [`crate::Family::KNOWN`], [`crate::weights::KeyLayout::Mpt`], the GGUF names
//! (`gguf::names`), `init-random`'s architectures.

use candle_core::quantized::gguf_file::Content;
use kollava_model::config::{Activation, Architecture, DecoderConfig, MptOptions};
use serde::Deserialize;
use serde_json::Value;

use crate::config::RawLlavaConfig;

use crate::gguf::format::{self, Meta};
use crate::gguf::{kollava_metadata, rows, Keys, QuantType};
use crate::{Checkpoint, CheckpointError};

/// MPT's `attn_config`.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct RawMptAttention {
    pub alibi: Option<bool>,
    pub alibi_bias_max: Option<f64>,
    pub attn_type: Option<String>,
    pub clip_qkv: Option<f64>,
    pub qk_ln: Option<bool>,
    pub softmax_scale: Option<f64>,
    pub prefix_lm: Option<bool>,
    pub attn_uses_sequence_id: Option<bool>,
}

/// The decoder of a LLaVA-MPT config (`MPTConfig`'s keys; defaults are `MPTConfig`'s).
/// MPT-7B's LayerNorm epsilon is hard-coded (1e-5); the MLP is GELU (exact).
pub fn resolve_decoder(raw: &RawLlavaConfig, file: &str) -> Result<DecoderConfig, CheckpointError> {
    let unsupported = |what: String| CheckpointError::Unsupported {
        file: file.to_string(),
        what,
    };
    let invalid = |what: String| CheckpointError::Invalid {
        file: file.to_string(),
        what,
    };
    let attn = raw.attn_config.clone().unwrap_or_default();
    if attn.alibi == Some(false) {
        return Err(unsupported(
            "MPT without ALiBi (learned position embeddings)".into(),
        ));
    }
    if attn.prefix_lm == Some(true) || attn.attn_uses_sequence_id == Some(true) {
        return Err(unsupported("MPT prefix-LM or sequence-id attention".into()));
    }
    if let Some(t) = attn
        .attn_type
        .as_deref()
        .filter(|t| *t != "multihead_attention")
    {
        return Err(unsupported(format!("MPT attn_type {t:?}")));
    }
    match raw
        .norm_type
        .as_deref()
        .unwrap_or("low_precision_layernorm")
    {
        "low_precision_layernorm" | "layernorm" => {}
        other => return Err(unsupported(format!("MPT norm_type {other:?}"))),
    }
    if raw.tie_word_embeddings == Some(false) {
        return Err(unsupported("MPT with an untied output matrix".into()));
    }
    let hidden = raw.d_model.unwrap_or(2048);
    let heads = raw.n_heads.unwrap_or(16);
    if heads == 0 || !hidden.is_multiple_of(heads) {
        return Err(invalid(format!(
            "d_model {hidden} is not a multiple of n_heads {heads}"
        )));
    }
    let ratio = raw.expansion_ratio.unwrap_or(4.0);
    let intermediate = ratio * hidden as f64;
    if intermediate.fract() != 0.0 || intermediate <= 0.0 {
        return Err(invalid(format!(
            "expansion_ratio {ratio} of d_model {hidden}"
        )));
    }
    let logit_scale = match &raw.logit_scale {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) if s == "inv_sqrt_d_model" => Some(1.0 / (hidden as f64).sqrt()),
        Some(other) => return Err(invalid(format!("logit_scale {other}"))),
    };
    let bias = !raw.no_bias.unwrap_or(false);
    Ok(DecoderConfig {
        arch: Architecture::Mpt(MptOptions {
            alibi_bias_max: attn.alibi_bias_max.unwrap_or(8.0),
            clip_qkv: attn.clip_qkv,
            qk_ln: attn.qk_ln.unwrap_or(false),
            softmax_scale: attn.softmax_scale,
            logit_scale,
            norm_bias: bias,
        }),
        vocab_size: raw.vocab_size.unwrap_or(50368),
        hidden_size: hidden,
        intermediate_size: intermediate as usize,
        num_hidden_layers: raw.n_layers.unwrap_or(24),
        num_attention_heads: heads,
        num_key_value_heads: heads,
        head_dim: hidden / heads,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: raw.max_seq_len.unwrap_or(2048),
        sliding_window: None,
        attention_bias: bias,
        mlp_bias: bias,
        hidden_act: Activation::Gelu,
        tie_word_embeddings: true,
    })
}

/// Our names of a decoder layer's parts and MPT's (`transformer.blocks.N.` + these).
const BLOCK_PARTS: [(&str, &str); 8] = [
    ("input_layernorm.", "norm_1."),
    ("post_attention_layernorm.", "norm_2."),
    ("self_attn.qkv_proj.", "attn.Wqkv."),
    ("self_attn.o_proj.", "attn.out_proj."),
    ("self_attn.q_ln.", "attn.q_ln."),
    ("self_attn.k_ln.", "attn.k_ln."),
    ("mlp.up_proj.", "ffn.up_proj."),
    ("mlp.down_proj.", "ffn.down_proj."),
];

/// Canonical name → LLaVA-MPT's (`model.layers.3.self_attn.qkv_proj.weight` →
/// `transformer.blocks.3.attn.Wqkv.weight`). Names MPT does not have pass unchanged.
pub(crate) fn stored_name(canonical: &str) -> String {
    if canonical == "model.embed_tokens.weight" {
        return "transformer.wte.weight".into();
    }
    if let Some(rest) = canonical.strip_prefix("model.norm.") {
        return format!("transformer.norm_f.{rest}");
    }
    if let Some(rest) = canonical.strip_prefix("model.mm_projector.") {
        return format!("transformer.mm_projector.{rest}");
    }
    let Some(rest) = canonical.strip_prefix("model.layers.") else {
        return canonical.to_string();
    };
    let (layer, tail) = rest.split_once('.').unwrap_or((rest, ""));
    for (ours, theirs) in BLOCK_PARTS {
        if let Some(t) = tail.strip_prefix(ours) {
            return format!("transformer.blocks.{layer}.{theirs}{t}");
        }
    }
    canonical.to_string()
}

/// An MPT block's name (`transformer.blocks.N.attn.Wqkv…`, weights or module paths) →
/// ours; `None` for other names.
pub(crate) fn canonical_name(name: &str) -> Option<String> {
    let rest = name.strip_prefix("transformer.blocks.")?;
    let (layer, tail) = rest.split_once('.').unwrap_or((rest, ""));
    let tail = format!("{tail}.");
    BLOCK_PARTS.iter().find_map(|(ours, theirs)| {
        let t = tail.strip_prefix(theirs)?;
        let t = t.strip_suffix('.').unwrap_or(t);
        let sep = if t.is_empty() { "" } else { "." };
        let ours = ours.strip_suffix('.').unwrap_or(ours);
        Some(format!("model.layers.{layer}.{ours}{sep}{t}"))
    })
}

/// llama.cpp's `mpt` architecture keys (as its converter writes MPT-7B's) and its `gpt2`
/// tokenizer with the `mpt` pre-tokenizer.
pub(crate) fn gguf_metadata(
    ckpt: &Checkpoint,
    q: QuantType,
    o: &kollava_model::config::MptOptions,
) -> Result<Vec<(String, Meta)>, CheckpointError> {
    let d = &ckpt.config.decoder;
    let tok = ckpt.tokenizer()?;
    let Some(vocab) = tok.export_byte_level_bpe(d.vocab_size)? else {
        return Err(CheckpointError::Unsupported {
            file: ckpt.dir.display().to_string(),
            what: "an MPT model whose tokenizer is not byte-level BPE, in GGUF".into(),
        });
    };
    let u = |n: usize| Meta::U32(n as u32);
    let mut m: Vec<(String, Meta)> = vec![
        ("general.architecture".into(), Meta::Str("mpt".into())),
        ("general.name".into(), Meta::Str(ckpt.name.clone())),
        ("general.file_type".into(), Meta::U32(q.file_type())),
        (
            "general.alignment".into(),
            Meta::U32(format::ALIGNMENT as u32),
        ),
        ("mpt.vocab_size".into(), u(d.vocab_size)),
        ("mpt.context_length".into(), u(d.max_position_embeddings)),
        ("mpt.embedding_length".into(), u(d.hidden_size)),
        ("mpt.block_count".into(), u(d.num_hidden_layers)),
        ("mpt.feed_forward_length".into(), u(d.intermediate_size)),
        ("mpt.attention.head_count".into(), u(d.num_attention_heads)),
        (
            "mpt.attention.head_count_kv".into(),
            u(d.num_key_value_heads),
        ),
        (
            "mpt.attention.layer_norm_epsilon".into(),
            Meta::F32(d.rms_norm_eps as f32),
        ),
        (
            "mpt.attention.max_alibi_bias".into(),
            Meta::F32(o.alibi_bias_max as f32),
        ),
        ("tokenizer.ggml.model".into(), Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Meta::Str("mpt".into())),
        ("tokenizer.ggml.tokens".into(), Meta::ArrStr(vocab.tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Meta::ArrI32(vocab.kinds),
        ),
        ("tokenizer.ggml.merges".into(), Meta::ArrStr(vocab.merges)),
        ("tokenizer.ggml.bos_token_id".into(), Meta::U32(tok.bos_id)),
        ("tokenizer.ggml.eos_token_id".into(), Meta::U32(tok.eos_id)),
        (
            "tokenizer.ggml.unknown_token_id".into(),
            Meta::U32(tok.unk_id),
        ),
        ("tokenizer.ggml.add_bos_token".into(), Meta::Bool(false)),
        ("tokenizer.ggml.add_eos_token".into(), Meta::Bool(false)),
    ];
    if let Some(c) = o.clip_qkv {
        m.push(("mpt.attention.clamp_kqv".into(), Meta::F32(c as f32)));
    }
    for (key, value) in [
        ("kollava.mpt.softmax_scale", o.softmax_scale),
        ("kollava.mpt.logit_scale", o.logit_scale),
    ] {
        if let Some(v) = value {
            m.push((key.into(), Meta::F32(v as f32)));
        }
    }
    m.extend(kollava_metadata(ckpt));
    Ok(m)
}

/// The decoder of a GGUF `mpt` model (llama.cpp's keys; biases and q/k norms where the file
/// has their tensors).
pub(crate) fn gguf_decoder(k: &Keys, llm: &Content) -> Result<DecoderConfig, CheckpointError> {
    let hidden = k.need_uint("mpt.embedding_length")?;
    let heads = k.need_uint("mpt.attention.head_count")?;
    let has = |name: &str| llm.tensor_infos.contains_key(name);
    if heads == 0 || !hidden.is_multiple_of(heads) {
        return Err(CheckpointError::Invalid {
            file: k.file.display().to_string(),
            what: format!("mpt.embedding_length {hidden} for {heads} heads"),
        });
    }
    Ok(DecoderConfig {
        arch: kollava_model::config::Architecture::Mpt(kollava_model::config::MptOptions {
            alibi_bias_max: k.float("mpt.attention.max_alibi_bias").unwrap_or(8.0),
            clip_qkv: k.float("mpt.attention.clamp_kqv"),
            qk_ln: has("blk.0.attn_q_norm.weight"),
            softmax_scale: k.float("kollava.mpt.softmax_scale"),
            logit_scale: k.float("kollava.mpt.logit_scale"),
            norm_bias: has("blk.0.attn_norm.bias"),
        }),
        vocab_size: rows(llm, "token_embd.weight").ok_or_else(|| k.missing("token_embd.weight"))?,
        hidden_size: hidden,
        intermediate_size: k.need_uint("mpt.feed_forward_length")?,
        num_hidden_layers: k.need_uint("mpt.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: heads,
        head_dim: hidden / heads,
        rms_norm_eps: k.float("mpt.attention.layer_norm_epsilon").unwrap_or(1e-5),
        rope_theta: 10000.0,
        max_position_embeddings: k.uint("mpt.context_length").unwrap_or(2048),
        sliding_window: None,
        attention_bias: has("blk.0.attn_qkv.bias"),
        mlp_bias: has("blk.0.ffn_up.bias"),
        hidden_act: Activation::Gelu,
        tie_word_embeddings: !has("output.weight"),
    })
}
