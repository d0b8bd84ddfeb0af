//! Canonical LLaVA tensor names ↔ llama.cpp's GGUF names.
//!
//! The language model goes to llama.cpp's `llama` architecture names (`token_embd`,
//! `blk.N.attn_q`, …), or its `mpt` ones (`blk.N.attn_qkv`, no gate, norms with optional
//! biases); the tower and projector to the names of llama.cpp's LLaVA image encoder
//! (`v.blk.N.attn_q`, `mm.0`, …). Two llama.cpp conventions apply:
//! - its rotary embedding rotates adjacent pairs where HF LLaMA rotates the two halves of a
//!   head, so the rows of `q_proj`/`k_proj` are interleaved per head on the way in
//!   ([`Mapped::heads`]) and put back on the way out;
//! - its LLaVA converter calls CLIP's `fc1` `ffn_down` and `fc2` `ffn_up`; llama.cpp swaps
//!   them back by shape, and so do we when reading.

use kollava_model::config::ProjectorKind;
use kollava_model::ModelConfig;

/// Which of the two files a tensor lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The language model file.
    Llm,
    /// The image encoder file (`mmproj`): tower and projector.
    Mmproj,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    pub part: Part,
    pub name: String,
    /// `Some(h)`: the rows form `h` rotary heads stored in llama.cpp's pair order.
    pub heads: Option<usize>,
}

/// Every canonical tensor a checkpoint of `cfg` holds, in the order they are written.
pub fn canonical_names(cfg: &ModelConfig) -> Vec<String> {
    let d = &cfg.decoder;
    let mpt = d.mpt();
    // MPT's LayerNorms have biases unless `no_bias`; RMSNorm has none.
    let norm_bias = mpt.is_some_and(|o| o.norm_bias);
    let norm = |v: &mut Vec<String>, name: String| {
        v.push(format!("{name}.weight"));
        if norm_bias {
            v.push(format!("{name}.bias"));
        }
    };
    let (attention, mlp): (&[&str], &[&str]) = match mpt {
        None => (
            &["q_proj", "k_proj", "v_proj", "o_proj"],
            &["gate_proj", "up_proj", "down_proj"],
        ),
        Some(_) => (&["qkv_proj", "o_proj"], &["up_proj", "down_proj"]),
    };
    let mut v = vec!["model.embed_tokens.weight".to_string()];
    for i in 0..d.num_hidden_layers {
        let l = format!("model.layers.{i}");
        norm(&mut v, format!("{l}.input_layernorm"));
        for p in attention {
            v.push(format!("{l}.self_attn.{p}.weight"));
            if d.attention_bias {
                v.push(format!("{l}.self_attn.{p}.bias"));
            }
        }
        if mpt.is_some_and(|o| o.qk_ln) {
            norm(&mut v, format!("{l}.self_attn.q_ln"));
            norm(&mut v, format!("{l}.self_attn.k_ln"));
        }
        norm(&mut v, format!("{l}.post_attention_layernorm"));
        for p in mlp {
            v.push(format!("{l}.mlp.{p}.weight"));
            if d.mlp_bias {
                v.push(format!("{l}.mlp.{p}.bias"));
            }
        }
    }
    norm(&mut v, "model.norm".into());
    if !d.tie_word_embeddings {
        v.push("lm_head.weight".into());
    }
    match cfg.projector {
        ProjectorKind::Linear => {
            v.push("model.mm_projector.weight".into());
            v.push("model.mm_projector.bias".into());
        }
        ProjectorKind::Mlp { depth, .. } => {
            for k in 0..depth {
                v.push(format!("model.mm_projector.{}.weight", 2 * k));
                v.push(format!("model.mm_projector.{}.bias", 2 * k));
            }
        }
        ProjectorKind::Identity => {}
    }
    let e = "vision_model.embeddings";
    v.push(format!("{e}.class_embedding"));
    v.push(format!("{e}.patch_embedding.weight"));
    v.push(format!("{e}.position_embedding.weight"));
    v.push("vision_model.pre_layrnorm.weight".into());
    v.push("vision_model.pre_layrnorm.bias".into());
    for i in 0..cfg.vision_layers_used {
        let l = format!("vision_model.encoder.layers.{i}");
        for p in [
            "layer_norm1",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "layer_norm2",
            "mlp.fc1",
            "mlp.fc2",
        ] {
            v.push(format!("{l}.{p}.weight"));
            v.push(format!("{l}.{p}.bias"));
        }
    }
    v
}

/// The GGUF name of a canonical tensor; `None` for names this layout has no place for.
pub fn to_gguf(canonical: &str, cfg: &ModelConfig) -> Option<Mapped> {
    let llm = |name: String, heads: Option<usize>| Mapped {
        part: Part::Llm,
        name,
        heads,
    };
    let mm = |name: String| Mapped {
        part: Part::Mmproj,
        name,
        heads: None,
    };
    let (stem, suffix) = canonical.rsplit_once('.')?;
    match stem {
        "model.embed_tokens" => return Some(llm(format!("token_embd.{suffix}"), None)),
        "model.norm" => return Some(llm(format!("output_norm.{suffix}"), None)),
        "lm_head" => return Some(llm(format!("output.{suffix}"), None)),
        "model.mm_projector" => return Some(mm(format!("mm.0.{suffix}"))),
        "vision_model.embeddings" if suffix == "class_embedding" => {
            return Some(mm("v.class_embd".into()))
        }
        "vision_model.embeddings.patch_embedding" => {
            return Some(mm(format!("v.patch_embd.{suffix}")))
        }
        "vision_model.embeddings.position_embedding" => {
            return Some(mm(format!("v.position_embd.{suffix}")))
        }
        "vision_model.pre_layrnorm" => return Some(mm(format!("v.pre_ln.{suffix}"))),
        _ => {}
    }
    if let Some(rest) = stem.strip_prefix("model.mm_projector.") {
        let k: usize = rest.parse().ok()?;
        return Some(mm(format!("mm.{k}.{suffix}")));
    }
    if let Some(rest) = stem.strip_prefix("model.layers.") {
        let (i, part) = rest.split_once('.')?;
        let i: usize = i.parse().ok()?;
        let d = &cfg.decoder;
        let (name, heads) = match part {
            "input_layernorm" => ("attn_norm", None),
            "self_attn.q_proj" => ("attn_q", Some(d.num_attention_heads)),
            "self_attn.k_proj" => ("attn_k", Some(d.num_key_value_heads)),
            "self_attn.v_proj" => ("attn_v", None),
            // MPT: no rotary embedding, so no rows to reorder.
            "self_attn.qkv_proj" => ("attn_qkv", None),
            "self_attn.q_ln" => ("attn_q_norm", None),
            "self_attn.k_ln" => ("attn_k_norm", None),
            "self_attn.o_proj" => ("attn_output", None),
            "post_attention_layernorm" => ("ffn_norm", None),
            "mlp.gate_proj" => ("ffn_gate", None),
            "mlp.up_proj" => ("ffn_up", None),
            "mlp.down_proj" => ("ffn_down", None),
            _ => return None,
        };
        return Some(llm(format!("blk.{i}.{name}.{suffix}"), heads));
    }
    if let Some(rest) = stem.strip_prefix("vision_model.encoder.layers.") {
        let (i, part) = rest.split_once('.')?;
        let i: usize = i.parse().ok()?;
        let name = match part {
            "layer_norm1" => "ln1",
            "layer_norm2" => "ln2",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.out_proj" => "attn_out",
            "mlp.fc1" => "ffn_down",
            "mlp.fc2" => "ffn_up",
            _ => return None,
        };
        return Some(mm(format!("v.blk.{i}.{name}.{suffix}")));
    }
    None
}

/// Row `r` of the HF layout is row `pair_order_row(r)` of llama.cpp's, for `heads` heads of
/// `rows / heads` rows each: HF keeps a head's two rotary halves apart, llama.cpp interleaves
/// them.
pub fn pair_order_row(r: usize, rows: usize, heads: usize) -> usize {
    let d = rows / heads;
    let (h, within) = (r / d, r % d);
    let (half, i) = (within / (d / 2), within % (d / 2));
    h * d + 2 * i + half
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_order_is_a_permutation_that_interleaves_halves() {
        // One head of 4 rows: HF rows [a0 a1 b0 b1] are llama.cpp's [a0 b0 a1 b1].
        let map: Vec<usize> = (0..4).map(|r| pair_order_row(r, 4, 1)).collect();
        assert_eq!(map, vec![0, 2, 1, 3]);
        let mut all: Vec<usize> = (0..24).map(|r| pair_order_row(r, 24, 3)).collect();
        all.sort();
        assert_eq!(all, (0..24).collect::<Vec<_>>());
        // Heads stay in place.
        assert!((8..16).all(|r| (8..16).contains(&pair_order_row(r, 24, 3))));
    }
}
