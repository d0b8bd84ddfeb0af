//! Random-weight checkpoints with real shapes (`kollava init-random`): what benchmarks,
//! memory tests and users sizing hardware run on, since no pretrained weights can be
//! downloaded here. Written in the same on-disk layouts users download (LLaVA's original
//! layout with a separate CLIP tower directory, or llava-hf's), so every loader path is
//! exercised. Weights are N(0, 0.02) (norms 1, biases 0), seeded per tensor name, so a file
//! does not depend on write order and generation stays numerically sane.
//!
//! Tensors are generated lazily while safetensors writes them: memory stays at one tensor.
//! The directory is written under a temporary name and renamed when complete.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::{Dtype, View};
use serde_json::json;

use crate::CheckpointError;

/// Weight dtype on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskDtype {
    F32,
    F16,
    Bf16,
}

impl DiskDtype {
    fn size(self) -> usize {
        match self {
            DiskDtype::F32 => 4,
            _ => 2,
        }
    }
    fn safetensors(self) -> Dtype {
        match self {
            DiskDtype::F32 => Dtype::F32,
            DiskDtype::F16 => Dtype::F16,
            DiskDtype::Bf16 => Dtype::BF16,
        }
    }
    fn torch_name(self) -> &'static str {
        match self {
            DiskDtype::F32 => "float32",
            DiskDtype::F16 => "float16",
            DiskDtype::Bf16 => "bfloat16",
        }
    }
}

/// Key layout of the written checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// LLaVA's own layout; the tower goes to a `clip-*` directory beside the weights.
    Original,
    /// transformers' `LlavaForConditionalGeneration` (legacy hub names).
    Hf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    V0,
    V15,
    Mistral,
    /// LLaVA-Lightning-MPT: an MPT decoder (expansion 4, ALiBi) under v0's image tokens.
    Mpt,
}

/// A named architecture.
#[derive(Debug, Clone, Copy)]
pub struct Arch {
    pub name: &'static str,
    pub about: &'static str,
    kind: Kind,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    mlp: usize,
    vocab: usize,
    max_positions: usize,
    rms_eps: f64,
    image_size: usize,
    vision_hidden: usize,
    vision_layers: usize,
    vision_heads: usize,
    vision_mlp: usize,
    patch: usize,
    pub default_layout: Layout,
}

const VIT_L: (usize, usize, usize, usize) = (1024, 24, 16, 4096);

/// Every architecture `init-random` knows.
pub const ARCHS: &[Arch] = &[
    Arch { name: "llava-v0-7b", about: "KoLLaVA-KoVicuna-7B: LLaMA-7B, CLIP ViT-L/14 224, linear projector, <im_*> tokens", kind: Kind::V0, hidden: 4096, layers: 32, heads: 32, kv_heads: 32, mlp: 11008, vocab: 32003, max_positions: 2048, rms_eps: 1e-6, image_size: 224, vision_hidden: VIT_L.0, vision_layers: VIT_L.1, vision_heads: VIT_L.2, vision_mlp: VIT_L.3, patch: 14, default_layout: Layout::Original },
    Arch { name: "llava-1.5-7b", about: "LLaVA-1.5-7B: LLaMA-2-7B, CLIP ViT-L/14 336, mlp2x_gelu", kind: Kind::V15, hidden: 4096, layers: 32, heads: 32, kv_heads: 32, mlp: 11008, vocab: 32000, max_positions: 4096, rms_eps: 1e-5, image_size: 336, vision_hidden: VIT_L.0, vision_layers: VIT_L.1, vision_heads: VIT_L.2, vision_mlp: VIT_L.3, patch: 14, default_layout: Layout::Original },
    Arch { name: "llava-1.5-13b", about: "LLaVA-1.5-13B: LLaMA-2-13B, CLIP ViT-L/14 336, mlp2x_gelu", kind: Kind::V15, hidden: 5120, layers: 40, heads: 40, kv_heads: 40, mlp: 13824, vocab: 32000, max_positions: 4096, rms_eps: 1e-5, image_size: 336, vision_hidden: VIT_L.0, vision_layers: VIT_L.1, vision_heads: VIT_L.2, vision_mlp: VIT_L.3, patch: 14, default_layout: Layout::Original },
    Arch { name: "llava-mistral-7b", about: "KoLLaVA-v1.5-Synatra-7B shape: Mistral-7B (GQA 8, window 4096), ViT-L/14 336", kind: Kind::Mistral, hidden: 4096, layers: 32, heads: 32, kv_heads: 8, mlp: 14336, vocab: 32000, max_positions: 32768, rms_eps: 1e-5, image_size: 336, vision_hidden: VIT_L.0, vision_layers: VIT_L.1, vision_heads: VIT_L.2, vision_mlp: VIT_L.3, patch: 14, default_layout: Layout::Original },
    Arch { name: "llava-mpt-7b", about: "LLaVA-Lightning-MPT-7B-preview: MPT-7B-chat (ALiBi, fused Wqkv), CLIP ViT-L/14 224, linear projector, <im_*> tokens; the fixture's small GPT-NeoX BPE unless --tokenizer", kind: Kind::Mpt, hidden: 4096, layers: 32, heads: 32, kv_heads: 32, mlp: 16384, vocab: 50282, max_positions: 2048, rms_eps: 1e-5, image_size: 224, vision_hidden: VIT_L.0, vision_layers: VIT_L.1, vision_heads: VIT_L.2, vision_mlp: VIT_L.3, patch: 14, default_layout: Layout::Original },
    Arch { name: "bench-mpt-1b", about: "an MPT the size of bench-1b's LLaMA (2048 wide, 24 layers, 16 heads) for speed comparisons, CLIP ViT-L/14 224, LLaVA-MPT layout", kind: Kind::Mpt, hidden: 2048, layers: 24, heads: 16, kv_heads: 16, mlp: 8192, vocab: 50282, max_positions: 2048, rms_eps: 1e-5, image_size: 224, vision_hidden: VIT_L.0, vision_layers: VIT_L.1, vision_heads: VIT_L.2, vision_mlp: VIT_L.3, patch: 14, default_layout: Layout::Original },
    Arch { name: "bench-1b", about: "the peers' bench model: TinyLlama-1.1B dims + CLIP ViT-L/14 336 + mlp2x_gelu, llava-hf layout", kind: Kind::V15, hidden: 2048, layers: 22, heads: 32, kv_heads: 4, mlp: 5632, vocab: 32064, max_positions: 2048, rms_eps: 1e-5, image_size: 336, vision_hidden: VIT_L.0, vision_layers: VIT_L.1, vision_heads: VIT_L.2, vision_mlp: VIT_L.3, patch: 14, default_layout: Layout::Hf },
    Arch { name: "bench-train", about: "the training benchmark's model: 768-wide 8-layer LLaMA, 384-wide 6-layer ViT/14 at 224 px (256 image tokens), mlp2x_gelu, llava-hf layout", kind: Kind::V15, hidden: 768, layers: 8, heads: 12, kv_heads: 12, mlp: 2048, vocab: 32000, max_positions: 2048, rms_eps: 1e-5, image_size: 224, vision_hidden: 384, vision_layers: 6, vision_heads: 6, vision_mlp: 1536, patch: 14, default_layout: Layout::Hf },
    Arch { name: "demo", about: "the bundled demo model: 4-layer 128-wide LLaMA, 3-layer 96-wide ViT/8 at 64 px; vocabulary from --tokenizer", kind: Kind::V15, hidden: 128, layers: 4, heads: 4, kv_heads: 4, mlp: 384, vocab: 0, max_positions: 512, rms_eps: 1e-5, image_size: 64, vision_hidden: 96, vision_layers: 4, vision_heads: 4, vision_mlp: 384, patch: 8, default_layout: Layout::Original },
    Arch { name: "tiny", about: "smoke tests: 2-layer 128-wide LLaMA, 4-layer 64-wide ViT at 336 px", kind: Kind::V15, hidden: 128, layers: 2, heads: 4, kv_heads: 4, mlp: 256, vocab: 32000, max_positions: 2048, rms_eps: 1e-5, image_size: 336, vision_hidden: 64, vision_layers: 4, vision_heads: 4, vision_mlp: 256, patch: 14, default_layout: Layout::Original },
];

pub fn arch(name: &str) -> Option<&'static Arch> {
    ARCHS.iter().find(|a| a.name == name)
}

impl Arch {
    /// The same architecture, 2 layers of 64 and a 2-layer tower, for tests.
    #[cfg(test)]
    fn shrunk_for_tests(mut self) -> Arch {
        (
            self.hidden,
            self.layers,
            self.heads,
            self.kv_heads,
            self.mlp,
        ) = (64, 2, 4, 4, 256);
        (
            self.vision_hidden,
            self.vision_layers,
            self.vision_heads,
            self.vision_mlp,
        ) = (64, 2, 4, 128);
        self
    }

    /// The same architecture sized for another tokenizer's vocabulary.
    pub fn with_vocab(mut self, vocab: usize) -> Arch {
        self.vocab = vocab;
        self
    }
}

// Tokenizer files, from the fixtures (the real LLaMA vocabulary).
const SP_MODEL: &[u8] = include_bytes!("../../../tests/fixtures/llava-v1.5/tokenizer.model");
const SP_CONFIG: &str = include_str!("../../../tests/fixtures/llava-v1.5/tokenizer_config.json");
const SP_SPECIAL: &str = include_str!("../../../tests/fixtures/llava-v1.5/special_tokens_map.json");
const V0_CONFIG: &str = include_str!("../../../tests/fixtures/llava-v0/tokenizer_config.json");
const V0_SPECIAL: &str = include_str!("../../../tests/fixtures/llava-v0/special_tokens_map.json");
const V0_ADDED: &str = include_str!("../../../tests/fixtures/llava-v0/added_tokens.json");
const HF_TOKENIZER: &str = include_str!("../../../tests/fixtures/llava-hf/tokenizer.json");
const HF_CONFIG: &str = include_str!("../../../tests/fixtures/llava-hf/tokenizer_config.json");
const HF_SPECIAL: &str = include_str!("../../../tests/fixtures/llava-hf/special_tokens_map.json");
// A small GPT-NeoX byte-level BPE with MPT-7B-chat's ChatML and LLaVA's image tokens.
const MPT_TOKENIZER: &str = include_str!("../../../tests/fixtures/llava-mpt/tokenizer.json");
const MPT_CONFIG: &str = include_str!("../../../tests/fixtures/llava-mpt/tokenizer_config.json");
const MPT_SPECIAL: &str = include_str!("../../../tests/fixtures/llava-mpt/special_tokens_map.json");

#[derive(Debug, Clone, Copy)]
enum Init {
    Normal,
    Ones,
    Zeros,
}

/// One tensor to write, generated when safetensors asks for its bytes.
struct Lazy {
    name: String,
    shape: Vec<usize>,
    init: Init,
    dtype: DiskDtype,
    seed: u64,
}

impl Lazy {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// FNV-1a of the name mixed with the seed: per-tensor streams independent of order.
fn stream_seed(seed: u64, name: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl View for &Lazy {
    fn dtype(&self) -> Dtype {
        self.dtype.safetensors()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let n = self.numel();
        let mut rng = StdRng::seed_from_u64(stream_seed(self.seed, &self.name));
        let value = |rng: &mut StdRng| -> f32 {
            match self.init {
                Init::Ones => 1.0,
                Init::Zeros => 0.0,
                Init::Normal => {
                    // Box-Muller: one N(0, 1) draw from two uniforms.
                    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                    let u2: f64 = rng.random();
                    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * 0.02) as f32
                }
            }
        };
        let mut out = Vec::with_capacity(n * self.dtype.size());
        for _ in 0..n {
            let v = value(&mut rng);
            match self.dtype {
                DiskDtype::F32 => out.extend_from_slice(&v.to_le_bytes()),
                DiskDtype::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                DiskDtype::Bf16 => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            }
        }
        Cow::Owned(out)
    }
    fn data_len(&self) -> usize {
        self.numel() * self.dtype.size()
    }
}

fn vision_tensors(a: &Arch, prefix: &str, out: &mut Vec<(String, Vec<usize>, Init)>) {
    let h = a.vision_hidden;
    let g = a.image_size / a.patch;
    let p = |s: &str| format!("{prefix}vision_model.{s}");
    out.push((p("embeddings.class_embedding"), vec![h], Init::Normal));
    out.push((
        p("embeddings.patch_embedding.weight"),
        vec![h, 3, a.patch, a.patch],
        Init::Normal,
    ));
    out.push((
        p("embeddings.position_embedding.weight"),
        vec![g * g + 1, h],
        Init::Normal,
    ));
    for n in ["pre_layrnorm", "post_layernorm"] {
        out.push((p(&format!("{n}.weight")), vec![h], Init::Ones));
        out.push((p(&format!("{n}.bias")), vec![h], Init::Zeros));
    }
    for l in 0..a.vision_layers {
        let q = |s: &str| p(&format!("encoder.layers.{l}.{s}"));
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            out.push((
                q(&format!("self_attn.{proj}.weight")),
                vec![h, h],
                Init::Normal,
            ));
            out.push((q(&format!("self_attn.{proj}.bias")), vec![h], Init::Zeros));
        }
        for n in ["layer_norm1", "layer_norm2"] {
            out.push((q(&format!("{n}.weight")), vec![h], Init::Ones));
            out.push((q(&format!("{n}.bias")), vec![h], Init::Zeros));
        }
        out.push((q("mlp.fc1.weight"), vec![a.vision_mlp, h], Init::Normal));
        out.push((q("mlp.fc1.bias"), vec![a.vision_mlp], Init::Zeros));
        out.push((q("mlp.fc2.weight"), vec![h, a.vision_mlp], Init::Normal));
        out.push((q("mlp.fc2.bias"), vec![h], Init::Zeros));
    }
}

/// llava-hf's tokenizer adds `<image>` and `<pad>` and pads the vocabulary to 32064.
fn vocab(a: &Arch, layout: Layout) -> usize {
    match layout {
        Layout::Hf => a.vocab.max(32064),
        Layout::Original => a.vocab,
    }
}

/// MPT's tensors, under LLaVA-MPT's names (no biases, tied output, a linear projector).
fn mpt_tensors(a: &Arch, out: &mut Vec<(String, Vec<usize>, Init)>) {
    let h = a.hidden;
    let name = |s: String| crate::weights::KeyLayout::Mpt.llm_key(&s);
    out.push((
        name("model.embed_tokens.weight".into()),
        vec![a.vocab, h],
        Init::Normal,
    ));
    for l in 0..a.layers {
        let q = |s: &str| name(format!("model.layers.{l}.{s}"));
        out.push((q("input_layernorm.weight"), vec![h], Init::Ones));
        out.push((q("self_attn.qkv_proj.weight"), vec![3 * h, h], Init::Normal));
        out.push((q("self_attn.o_proj.weight"), vec![h, h], Init::Normal));
        out.push((q("post_attention_layernorm.weight"), vec![h], Init::Ones));
        out.push((q("mlp.up_proj.weight"), vec![a.mlp, h], Init::Normal));
        out.push((q("mlp.down_proj.weight"), vec![h, a.mlp], Init::Normal));
    }
    out.push((name("model.norm.weight".into()), vec![h], Init::Ones));
    let vh = a.vision_hidden;
    out.push((
        name("model.mm_projector.weight".into()),
        vec![h, vh],
        Init::Normal,
    ));
    out.push((name("model.mm_projector.bias".into()), vec![h], Init::Zeros));
}

fn llm_tensors(a: &Arch, layout: Layout, out: &mut Vec<(String, Vec<usize>, Init)>) {
    if a.kind == Kind::Mpt {
        return mpt_tensors(a, out);
    }
    let (h, d) = (a.hidden, a.hidden / a.heads);
    let vocab = vocab(a, layout);
    let m = |s: &str| match layout {
        Layout::Original => format!("model.{s}"),
        Layout::Hf => format!("language_model.model.{s}"),
    };
    out.push((m("embed_tokens.weight"), vec![vocab, h], Init::Normal));
    for l in 0..a.layers {
        let q = |s: &str| m(&format!("layers.{l}.{s}"));
        out.push((
            q("self_attn.q_proj.weight"),
            vec![a.heads * d, h],
            Init::Normal,
        ));
        out.push((
            q("self_attn.k_proj.weight"),
            vec![a.kv_heads * d, h],
            Init::Normal,
        ));
        out.push((
            q("self_attn.v_proj.weight"),
            vec![a.kv_heads * d, h],
            Init::Normal,
        ));
        out.push((
            q("self_attn.o_proj.weight"),
            vec![h, a.heads * d],
            Init::Normal,
        ));
        out.push((q("mlp.gate_proj.weight"), vec![a.mlp, h], Init::Normal));
        out.push((q("mlp.up_proj.weight"), vec![a.mlp, h], Init::Normal));
        out.push((q("mlp.down_proj.weight"), vec![h, a.mlp], Init::Normal));
        out.push((q("input_layernorm.weight"), vec![h], Init::Ones));
        out.push((q("post_attention_layernorm.weight"), vec![h], Init::Ones));
    }
    out.push((m("norm.weight"), vec![h], Init::Ones));
    let head = match layout {
        Layout::Original => "lm_head.weight".to_string(),
        Layout::Hf => "language_model.lm_head.weight".to_string(),
    };
    out.push((head, vec![vocab, h], Init::Normal));
    // Projector.
    let vh = a.vision_hidden;
    match (layout, a.kind) {
        (Layout::Hf, _) => {
            out.push((
                "multi_modal_projector.linear_1.weight".into(),
                vec![h, vh],
                Init::Normal,
            ));
            out.push((
                "multi_modal_projector.linear_1.bias".into(),
                vec![h],
                Init::Zeros,
            ));
            out.push((
                "multi_modal_projector.linear_2.weight".into(),
                vec![h, h],
                Init::Normal,
            ));
            out.push((
                "multi_modal_projector.linear_2.bias".into(),
                vec![h],
                Init::Zeros,
            ));
        }
        (Layout::Original, Kind::V0) => {
            out.push((
                "model.mm_projector.weight".into(),
                vec![h, vh],
                Init::Normal,
            ));
            out.push(("model.mm_projector.bias".into(), vec![h], Init::Zeros));
        }
        (Layout::Original, _) => {
            out.push((
                "model.mm_projector.0.weight".into(),
                vec![h, vh],
                Init::Normal,
            ));
            out.push(("model.mm_projector.0.bias".into(), vec![h], Init::Zeros));
            out.push((
                "model.mm_projector.2.weight".into(),
                vec![h, h],
                Init::Normal,
            ));
            out.push(("model.mm_projector.2.bias".into(), vec![h], Init::Zeros));
        }
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> CheckpointError + '_ {
    move |e| CheckpointError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), CheckpointError> {
    let text = serde_json::to_string_pretty(v).map_err(|e| CheckpointError::Json {
        file: path.display().to_string(),
        reason: e.to_string(),
    })?;
    std::fs::write(path, text).map_err(io_err(path))
}

/// A tensor's bytes, generated ahead of serialization.
struct Ready<'a> {
    lazy: &'a Lazy,
    bytes: Vec<u8>,
}

impl View for &Ready<'_> {
    fn dtype(&self) -> Dtype {
        self.lazy.dtype.safetensors()
    }
    fn shape(&self) -> &[usize] {
        &self.lazy.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes `tensors` as safetensors shards of at most `shard_bytes`, with an index when more
/// than one. `on_progress(bytes_done, bytes_total)` after each shard.
fn write_shards(
    dir: &Path,
    tensors: &[Lazy],
    shard_bytes: usize,
    on_progress: &mut dyn FnMut(u64, u64),
) -> Result<(), CheckpointError> {
    let mut shards: Vec<Vec<&Lazy>> = vec![Vec::new()];
    let mut size = 0;
    for t in tensors {
        if size > 0 && size + t.data_len() > shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += t.data_len();
        shards.last_mut().expect("at least one shard").push(t);
    }
    let total: u64 = tensors.iter().map(|t| t.data_len() as u64).sum();
    let mut done = 0u64;
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        let path = dir.join(&file);
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        // A shard's tensors are drawn on every core at once (each from its own seeded
        // stream, so the bytes are the same as one by one): drawing, not writing, is what
        // takes the time (a 7B model: minutes on one core). The price is one shard (at most
        // `shard_bytes`) held in memory while it is written.
        let ready: Vec<Ready> = {
            use rayon::prelude::*;
            shard
                .par_iter()
                .map(|t| Ready {
                    lazy: t,
                    bytes: t.data().into_owned(),
                })
                .collect()
        };
        safetensors::serialize_to_file(
            ready.iter().map(|r| (r.lazy.name.clone(), r)),
            Some(meta),
            &path,
        )
        .map_err(|e| CheckpointError::Weights {
            file: path.display().to_string(),
            reason: e.to_string(),
        })?;
        for t in shard {
            weight_map.insert(t.name.clone(), json!(file));
            done += t.data_len() as u64;
        }
        on_progress(done, total);
    }
    if n > 1 {
        write_json(
            &dir.join("model.safetensors.index.json"),
            &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
        )?;
    }
    Ok(())
}

fn clip_config(a: &Arch) -> serde_json::Value {
    json!({
        "hidden_size": a.vision_hidden, "intermediate_size": a.vision_mlp,
        "num_attention_heads": a.vision_heads, "num_hidden_layers": a.vision_layers,
        "image_size": a.image_size, "patch_size": a.patch, "num_channels": 3,
        "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu", "model_type": "clip_vision_model",
    })
}

fn preprocessor_config(a: &Arch) -> serde_json::Value {
    json!({
        "crop_size": {"height": a.image_size, "width": a.image_size}, "do_center_crop": true,
        "do_convert_rgb": true, "do_normalize": true, "do_rescale": true, "do_resize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "CLIPImageProcessor", "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": a.image_size},
    })
}

/// Bytes the checkpoint will take on disk (weights only).
pub fn weight_bytes(a: &Arch, layout: Layout, dtype: DiskDtype) -> u64 {
    let mut t = Vec::new();
    llm_tensors(a, layout, &mut t);
    vision_tensors(a, "", &mut t);
    t.iter()
        .map(|(_, s, _)| s.iter().product::<usize>() as u64 * dtype.size() as u64)
        .sum()
}

/// Writes a random checkpoint of `arch` to `out` (which must not exist or be empty).
/// `tokenizer`: a directory whose tokenizer files replace the bundled LLaMA ones (the
/// architecture's vocabulary must match it: see [`Arch::with_vocab`]).
pub fn init_random(
    a: &Arch,
    layout: Layout,
    dtype: DiskDtype,
    seed: u64,
    tokenizer: Option<&Path>,
    out: &Path,
    on_progress: &mut dyn FnMut(u64, u64),
) -> Result<PathBuf, CheckpointError> {
    if a.vocab == 0 {
        return Err(CheckpointError::Unsupported {
            file: a.name.into(),
            what: "this architecture without a tokenizer (give one; it sets the vocabulary)".into(),
        });
    }
    if layout == Layout::Hf && a.kind != Kind::V15 {
        return Err(CheckpointError::Unsupported {
            file: a.name.into(),
            what: "llava-hf layout for this architecture (only LLaVA-1.5-style models)".into(),
        });
    }
    crate::write_dir_atomically(out, |tmp| {
        write_all(a, layout, dtype, seed, tmp, on_progress, true)?;
        if let Some(src) = tokenizer {
            copy_tokenizer(src, tmp)?;
        }
        Ok(())
    })?;
    Ok(out.to_path_buf())
}

/// `a` as a checkpoint without weights, in LLaVA's own layout: its configuration resolved as
/// a downloaded one would be, for sizing a run on it (`train --plan --arch`). Nothing of it
/// stays on disk.
pub fn config_only(a: &Arch) -> Result<crate::Checkpoint, CheckpointError> {
    let a = if a.vocab == 0 {
        a.with_vocab(32000)
    } else {
        *a
    };
    let tmp = tempfile::tempdir().map_err(|e| CheckpointError::Io {
        path: std::env::temp_dir().display().to_string(),
        reason: e.to_string(),
    })?;
    write_all(
        &a,
        Layout::Original,
        DiskDtype::F16,
        0,
        tmp.path(),
        &mut |_, _| {},
        false,
    )?;
    crate::open(&tmp.path().display().to_string(), &Default::default())
}

/// Replaces the written tokenizer files with those in `src`.
fn copy_tokenizer(src: &Path, dir: &Path) -> Result<(), CheckpointError> {
    const FILES: [&str; 5] = [
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
    ];
    if !src.join("tokenizer.json").is_file() && !src.join("tokenizer.model").is_file() {
        return Err(CheckpointError::Io {
            path: src.display().to_string(),
            reason: "no tokenizer.json or tokenizer.model there".into(),
        });
    }
    for f in FILES {
        let _ = std::fs::remove_file(dir.join(f));
        if src.join(f).is_file() {
            std::fs::copy(src.join(f), dir.join(f)).map_err(io_err(&src.join(f)))?;
        }
    }
    Ok(())
}

fn write_all(
    a: &Arch,
    layout: Layout,
    dtype: DiskDtype,
    seed: u64,
    dir: &Path,
    on_progress: &mut dyn FnMut(u64, u64),
    weights: bool,
) -> Result<(), CheckpointError> {
    let lazy = |v: Vec<(String, Vec<usize>, Init)>| -> Vec<Lazy> {
        v.into_iter()
            .map(|(name, shape, init)| Lazy {
                name,
                shape,
                init,
                dtype,
                seed,
            })
            .collect()
    };
    let tower_name = if a.patch != 14 {
        "vision_tower".to_string()
    } else if a.image_size == 224 {
        "clip-vit-large-patch14".to_string()
    } else {
        format!("clip-vit-large-patch14-{}", a.image_size)
    };
    let mut llm = Vec::new();
    llm_tensors(a, layout, &mut llm);
    let shard = 4usize << 30;
    let common = json!({
        "hidden_size": a.hidden, "intermediate_size": a.mlp, "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads, "vocab_size": vocab(a, layout),
        "max_position_embeddings": a.max_positions, "rms_norm_eps": a.rms_eps, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    });
    match layout {
        Layout::Hf => {
            let mut all = llm;
            vision_tensors(a, "vision_tower.", &mut all);
            if weights {
                write_shards(dir, &lazy(all), shard, on_progress)?;
            }
            let mut vision = clip_config(a);
            vision["projection_dim"] = json!(768);
            let mut text = common.clone();
            text["model_type"] = json!("llama");
            write_json(
                &dir.join("config.json"),
                &json!({
                    "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
                    "ignore_index": -100, "image_token_index": 32000, "pad_token_id": 32001,
                    "projector_hidden_act": "gelu", "vision_feature_layer": -2,
                    "vision_feature_select_strategy": "default", "image_seq_length": (a.image_size / a.patch).pow(2),
                    "text_config": text, "vision_config": vision, "vocab_size": vocab(a, layout),
                    "torch_dtype": dtype.torch_name(), "kollava_init_random": {"arch": a.name, "seed": seed},
                }),
            )?;
            write_json(
                &dir.join("preprocessor_config.json"),
                &preprocessor_config(a),
            )?;
            for (name, text) in [
                ("tokenizer.json", HF_TOKENIZER),
                ("tokenizer_config.json", HF_CONFIG),
                ("special_tokens_map.json", HF_SPECIAL),
            ] {
                std::fs::write(dir.join(name), text).map_err(io_err(&dir.join(name)))?;
            }
        }
        Layout::Original => {
            let tower = dir.join(&tower_name);
            std::fs::create_dir_all(&tower).map_err(io_err(&tower))?;
            let mut vision = Vec::new();
            vision_tensors(a, "", &mut vision);
            if weights {
                write_shards(&tower, &lazy(vision), shard, &mut |_, _| {})?;
            }
            write_json(
                &tower.join("config.json"),
                &json!({"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "vision_config": clip_config(a)}),
            )?;
            write_json(
                &tower.join("preprocessor_config.json"),
                &preprocessor_config(a),
            )?;
            if weights {
                write_shards(dir, &lazy(llm), shard, on_progress)?;
            }
            let mut cfg = common;
            let extra = match a.kind {
                Kind::Mpt => {
                    // MPTConfig's keys replace LLaMA's.
                    cfg = json!({
                        "architectures": ["LlavaMPTForCausalLM"], "model_type": "llava_mpt",
                        "d_model": a.hidden, "n_heads": a.heads, "n_layers": a.layers,
                        "expansion_ratio": a.mlp / a.hidden, "max_seq_len": a.max_positions,
                        "vocab_size": a.vocab, "no_bias": true, "norm_type": "low_precision_layernorm",
                        "attn_config": {"alibi": true, "alibi_bias_max": 8, "attn_impl": "torch",
                            "attn_type": "multihead_attention", "clip_qkv": null, "qk_ln": false,
                            "softmax_scale": null, "prefix_lm": false, "attn_uses_sequence_id": false},
                        "learned_pos_emb": true, "logit_scale": null, "use_cache": true,
                    });
                    json!({"mm_use_im_start_end": true, "sep_image_conv_front": false, "use_mm_proj": true})
                }
                Kind::V0 => {
                    json!({"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "mm_use_im_start_end": true, "sep_image_conv_front": false, "use_mm_proj": true, "max_sequence_length": a.max_positions})
                }
                Kind::V15 => {
                    json!({"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "mm_projector_type": "mlp2x_gelu", "image_aspect_ratio": "pad", "mm_use_im_start_end": false, "mm_use_im_patch_token": false, "mm_vision_select_feature": "patch"})
                }
                Kind::Mistral => {
                    json!({"architectures": ["LlavaMistralForCausalLM"], "model_type": "llava_mistral", "mm_projector_type": "mlp2x_gelu", "image_aspect_ratio": "pad", "mm_use_im_start_end": false, "mm_use_im_patch_token": false, "mm_vision_select_feature": "patch", "sliding_window": 4096})
                }
            };
            for (k, v) in extra.as_object().expect("object literal") {
                cfg[k] = v.clone();
            }
            cfg["mm_vision_tower"] = json!(tower_name);
            cfg["mm_hidden_size"] = json!(a.vision_hidden);
            cfg["mm_vision_select_layer"] = json!(-2);
            cfg["torch_dtype"] = json!(dtype.torch_name());
            cfg["kollava_init_random"] = json!({"arch": a.name, "seed": seed});
            write_json(&dir.join("config.json"), &cfg)?;
            if a.kind == Kind::Mpt {
                for (name, text) in [
                    ("tokenizer.json", MPT_TOKENIZER),
                    ("tokenizer_config.json", MPT_CONFIG),
                    ("special_tokens_map.json", MPT_SPECIAL),
                ] {
                    std::fs::write(dir.join(name), text).map_err(io_err(&dir.join(name)))?;
                }
                // `<|endoftext|>` and `<|im_end|>` end answers, as upstream's since c770dd9.
                let end = serde_json::from_str::<serde_json::Value>(MPT_TOKENIZER)
                    .ok()
                    .and_then(|t| {
                        t["added_tokens"].as_array()?.iter().find_map(|a| {
                            (a["content"] == "<|im_end|>").then(|| a["id"].as_u64())?
                        })
                    });
                write_json(
                    &dir.join("generation_config.json"),
                    &json!({"eos_token_id": [0, end]}),
                )?;
                return Ok(());
            }
            let (config, special) = if a.kind == Kind::V0 {
                (V0_CONFIG, V0_SPECIAL)
            } else {
                (SP_CONFIG, SP_SPECIAL)
            };
            std::fs::write(dir.join("tokenizer.model"), SP_MODEL).map_err(io_err(dir))?;
            std::fs::write(dir.join("tokenizer_config.json"), config).map_err(io_err(dir))?;
            std::fs::write(dir.join("special_tokens_map.json"), special).map_err(io_err(dir))?;
            if a.kind == Kind::V0 {
                std::fs::write(dir.join("added_tokens.json"), V0_ADDED).map_err(io_err(dir))?;
            }
        }
    }
    write_json(
        &dir.join("generation_config.json"),
        &json!({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn tiny_checkpoints_load_in_both_layouts_and_are_deterministic() {
        let a = arch("tiny").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        for layout in [Layout::Original, Layout::Hf] {
            let dir = tmp.path().join(format!("{layout:?}"));
            init_random(a, layout, DiskDtype::F16, 7, None, &dir, &mut |_, _| {}).unwrap();
            let ckpt = crate::open(dir.to_str().unwrap(), &Default::default()).unwrap();
            assert_eq!(ckpt.config.decoder.hidden_size, 128);
            assert_eq!(ckpt.config.image_tokens(), 576);
            ckpt.load_model(DType::F32, &Device::Cpu).unwrap();
            let again = tmp.path().join(format!("{layout:?}-again"));
            init_random(a, layout, DiskDtype::F16, 7, None, &again, &mut |_, _| {}).unwrap();
            let bytes = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
            assert_eq!(bytes(&dir), bytes(&again), "same seed, same bytes");
        }
        let err = init_random(
            a,
            Layout::Hf,
            DiskDtype::F16,
            7,
            None,
            &tmp.path().join("Hf"),
            &mut |_, _| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("not empty"), "{err}");
    }

    /// A random LLaVA-MPT loads as the family, with MPT-7B's shapes, and answers.
    #[test]
    fn mpt_checkpoints_load_as_llava_mpt() {
        let a = arch("llava-mpt-7b")
            .unwrap()
            .with_vocab(1052)
            .shrunk_for_tests();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("llava-mpt");
        init_random(
            &a,
            Layout::Original,
            DiskDtype::F16,
            7,
            None,
            &dir,
            &mut |_, _| {},
        )
        .unwrap();
        let ckpt = crate::open(dir.to_str().unwrap(), &Default::default()).unwrap();
        assert_eq!(ckpt.family, crate::Family::LLAVA_MPT);
        let d = &ckpt.config.decoder;
        assert_eq!(
            (d.hidden_size, d.intermediate_size),
            (a.hidden, 4 * a.hidden)
        );
        assert_eq!(ckpt.config.image_tokens(), 256);
        assert!(ckpt.eos_ids.contains(&1048), "{:?}", ckpt.eos_ids);
        ckpt.load_model(DType::F32, &Device::Cpu).unwrap();
        let err = init_random(
            &a,
            Layout::Hf,
            DiskDtype::F16,
            7,
            None,
            &tmp.path().join("hf"),
            &mut |_, _| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("llava-hf"), "{err}");
    }

    #[test]
    fn bench_1b_has_the_peers_parameter_count() {
        // make_bench_model.py: 1.410 B parameters (ViT 303.5 M, projector 6.3 M, LLM 1100.3 M).
        let a = arch("bench-1b").unwrap();
        let params = weight_bytes(a, Layout::Hf, DiskDtype::F32) / 4;
        assert!((1_405_000_000..1_415_000_000).contains(&params), "{params}");
    }
}
