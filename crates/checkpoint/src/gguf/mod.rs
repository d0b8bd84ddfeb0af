//! GGUF, llama.cpp's format: `kollava quantize` writes a checkpoint as a pair of files, the
//! language model (llama.cpp's `llama` architecture) and the image encoder (`mmproj`, the
//! tower and projector as llama.cpp's LLaVA encoder), and [`open_pair`] reads such a pair,
//! ours or llama.cpp's, into the same [`Checkpoint`] every other format becomes.
//!
//! Quantized matrices stay quantized: the decoder's linear maps (as [`kollava_model::layers::Linear::Quantized`])
//! and its token embedding table are views of the memory-mapped file (see [`mapped`]),
//! multiplied through our kernels or candle's. Norms and biases are dequantized to f32.
//!
//! Our files carry `kollava.*` keys (family, template, image handling, the tokenizer's own
//! files) so that a quantized checkpoint answers as its source does; a file without them is
//! read as a LLaVA-1.5 model, as llama.cpp reads it.

pub mod format;
mod mapped;
pub mod names;

use std::borrow::Cow;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use kollava_inputs::image::{AspectMode, ClipPreprocess};
use kollava_inputs::tokenizer::SpmVocab;
use kollava_inputs::Tokenizer;
use kollava_model::config::{
    Activation, ClipVisionConfig, DecoderConfig, FeatureSelect, ProjectorKind,
};
use kollava_model::form::{Form, StoredMatrices};
use kollava_model::{Llava, ModelConfig};

use self::format::{GgufWriter, Meta, TensorEntry};
use self::names::{canonical_names, pair_order_row, to_gguf, Mapped, Part};
use crate::{candle_reason, Checkpoint, CheckpointError, Family};

/// What `kollava quantize --type` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum QuantType {
    /// Unquantized, 32-bit floats.
    F32,
    /// Unquantized, 16-bit floats.
    F16,
    /// Unquantized, bfloat16.
    Bf16,
    /// 8-bit blocks of 32 with one scale.
    #[cfg_attr(feature = "clap", value(name = "q8_0"))]
    Q8_0,
    /// 4-bit blocks of 32 with one scale.
    #[cfg_attr(feature = "clap", value(name = "q4_0"))]
    Q4_0,
    /// Q4_K for every matrix, Q6_K for `output` (llama.cpp's `Q4_K_S` recipe).
    #[cfg_attr(feature = "clap", value(name = "q4_k", alias = "q4_k_s"))]
    Q4K,
}

impl QuantType {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "bf16" => Self::Bf16,
            "q8_0" => Self::Q8_0,
            "q4_0" => Self::Q4_0,
            "q4_k" | "q4_k_s" => Self::Q4K,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Bf16 => "BF16",
            Self::Q8_0 => "Q8_0",
            Self::Q4_0 => "Q4_0",
            Self::Q4K => "Q4_K",
        }
    }

    fn ggml(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::Bf16 => GgmlDType::BF16,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4K => GgmlDType::Q4K,
        }
    }

    /// llama.cpp's `llama_ftype`.
    pub(crate) fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q8_0 => 7,
            Self::Q4K => 14,
            Self::Bf16 => 32,
        }
    }
}

/// The type a tensor is stored in. Vectors stay f32; a matrix whose rows do not split into
/// whole blocks falls back to f16 (as llama.cpp's quantizer falls back).
fn storage_type(m: &Mapped, shape: &[usize], q: QuantType) -> GgmlDType {
    if shape.len() < 2 {
        return GgmlDType::F32;
    }
    let want = match m.part {
        // llama.cpp's LLaVA encoder is f16, whatever the language model is.
        Part::Mmproj => GgmlDType::F16,
        Part::Llm if q == QuantType::Q4K && m.name == "output.weight" => GgmlDType::Q6K,
        Part::Llm => q.ggml(),
    };
    let row = *shape.last().unwrap_or(&0);
    if row.is_multiple_of(want.block_size()) {
        want
    } else {
        GgmlDType::F16
    }
}

/// The shape a canonical tensor must have (row-major), from the configuration alone, so that
/// the header can be written before any data is read.
fn canonical_shape(name: &str, cfg: &ModelConfig) -> Vec<usize> {
    let d = &cfg.decoder;
    let v = &cfg.vision;
    let (h, vh) = (d.hidden_size, v.hidden_size);
    let (q_rows, kv_rows) = (
        d.num_attention_heads * d.head_dim,
        d.num_key_value_heads * d.head_dim,
    );
    let bias = name.ends_with(".bias");
    let rows_cols = |r: usize, c: usize| if bias { vec![r] } else { vec![r, c] };
    let part = name.trim_end_matches(".weight").trim_end_matches(".bias");
    match part {
        "model.embed_tokens" | "lm_head" => vec![d.vocab_size, h],
        "model.norm" => vec![h],
        "vision_model.embeddings.class_embedding" => vec![vh],
        "vision_model.embeddings.patch_embedding" => {
            vec![vh, v.num_channels, v.patch_size, v.patch_size]
        }
        "vision_model.embeddings.position_embedding" => vec![v.grid() * v.grid() + 1, vh],
        "vision_model.pre_layrnorm" => vec![vh],
        "model.mm_projector" => rows_cols(h, vh),
        _ => {
            let leaf = part.rsplit('.').next().unwrap_or("");
            if let Some(k) = part.strip_prefix("model.mm_projector.") {
                return rows_cols(h, if k == "0" { vh } else { h });
            }
            if part.starts_with("model.layers.") {
                return match leaf {
                    "input_layernorm" | "post_attention_layernorm" | "q_ln" | "k_ln" => vec![h],
                    "q_proj" => rows_cols(q_rows, h),
                    "qkv_proj" => rows_cols(q_rows + 2 * kv_rows, h),
                    "k_proj" | "v_proj" => rows_cols(kv_rows, h),
                    "o_proj" => rows_cols(h, q_rows),
                    "gate_proj" | "up_proj" => rows_cols(d.intermediate_size, h),
                    _ => rows_cols(h, d.intermediate_size),
                };
            }
            match leaf {
                "layer_norm1" | "layer_norm2" => vec![vh],
                "fc1" => rows_cols(v.intermediate_size, vh),
                "fc2" => rows_cols(vh, v.intermediate_size),
                _ => rows_cols(vh, vh),
            }
        }
    }
}

/// Reorders whole rows of a stored tensor: row `r` of the result is row `from(r)` of `q`.
/// Works on the stored bytes, so quantized rows move without loss.
fn reorder_rows(q: &QTensor, from: impl Fn(usize) -> usize) -> candle_core::Result<QTensor> {
    let dims = q.shape().dims().to_vec();
    let rows = dims[0];
    let data = q.data()?;
    let row_bytes = data.len() / rows;
    let mut out = Vec::with_capacity(data.len());
    for r in 0..rows {
        let s = from(r) * row_bytes;
        out.extend_from_slice(&data[s..s + row_bytes]);
    }
    let storage = QStorage::from_data(Cow::Owned(out), &q.device(), q.dtype())?;
    QTensor::new(storage, dims)
}

/// One tensor of the checkpoint in its GGUF type and row order, as bytes.
fn convert_tensor(
    vb: &VarBuilder,
    name: &str,
    m: &Mapped,
    entry: &TensorEntry,
) -> candle_core::Result<Vec<u8>> {
    let t = vb.get(entry.shape.clone(), name)?;
    let qt = QTensor::quantize(&t, entry.dtype)?;
    let qt = match m.heads {
        // Inverse of the reader's: llama.cpp row `pair_order_row(r)` is HF row r.
        Some(heads) => {
            let rows = entry.shape[0];
            let mut inv = vec![0; rows];
            for r in 0..rows {
                inv[pair_order_row(r, rows, heads)] = r;
            }
            reorder_rows(&qt, |r| inv[r])?
        }
        None => qt,
    };
    Ok(qt.data()?.into_owned())
}

/// Output of [`quantize`].
#[derive(Debug, Clone)]
pub struct Written {
    pub model: PathBuf,
    pub mmproj: PathBuf,
    pub tensors: usize,
    pub bytes: u64,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> CheckpointError + '_ {
    move |e| CheckpointError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Writes `ckpt` as a GGUF pair in the new directory `out` (atomically): the language model
/// in `q`, the image encoder in f16. Tensors are read, converted and written one at a time.
pub fn quantize(
    ckpt: &Checkpoint,
    out: &Path,
    q: QuantType,
    on_progress: &mut dyn FnMut(usize, usize),
) -> Result<Written, CheckpointError> {
    if ckpt.gguf.is_some() {
        return Err(CheckpointError::Unsupported {
            file: ckpt.dir.display().to_string(),
            what: "input: it is already GGUF; quantize a safetensors or .bin checkpoint".into(),
        });
    }
    let cfg = &ckpt.config;
    if cfg.projector == ProjectorKind::Identity {
        return Err(CheckpointError::Unsupported {
            file: ckpt.dir.display().to_string(),
            what: "projector type identity in GGUF".into(),
        });
    }
    let (llm_vb, vision_vb) = ckpt.var_builders(DType::F32, &Device::Cpu)?;
    let mut plan: [Vec<(String, Mapped, TensorEntry)>; 2] = [Vec::new(), Vec::new()];
    for name in canonical_names(cfg) {
        let Some(m) = to_gguf(&name, cfg) else {
            continue;
        };
        let shape = canonical_shape(&name, cfg);
        let dtype = storage_type(&m, &shape, q);
        let entry = TensorEntry {
            name: m.name.clone(),
            shape,
            dtype,
        };
        plan[usize::from(m.part == Part::Mmproj)].push((name, m, entry));
    }
    let total = plan[0].len() + plan[1].len();
    let stem = ckpt.name.rsplit('/').next().unwrap_or("model").to_string();
    let model_file = format!("{stem}-{}.gguf", q.name());
    let mmproj_file = format!("mmproj-{stem}-F16.gguf");
    let metas = [llm_metadata(ckpt, q)?, mmproj_metadata(ckpt)];
    let mut done = 0;
    let mut bytes = 0;
    crate::write_dir_atomically(out, |tmp| {
        for (k, file) in [&model_file, &mmproj_file].into_iter().enumerate() {
            let path = tmp.join(file);
            let f = std::fs::File::create(&path).map_err(io_err(&path))?;
            let entries = plan[k].iter().map(|p| p.2.clone()).collect();
            let mut w = GgufWriter::new(std::io::BufWriter::new(f), &metas[k], entries)
                .map_err(io_err(&path))?;
            // Tensors are converted a batch at a time, one per core, and written in order:
            // candle quantizes a tensor on one thread, and a 7B model took minutes on one.
            let batch = rayon::current_num_threads().max(1);
            for group in plan[k].chunks(batch) {
                use rayon::prelude::*;
                let datas: Vec<Result<Vec<u8>, CheckpointError>> = group
                    .par_iter()
                    .map(|(name, m, entry)| {
                        let vb = if name.starts_with("vision_model.") {
                            &vision_vb
                        } else {
                            &llm_vb
                        };
                        convert_tensor(vb, name, m, entry).map_err(|e| CheckpointError::Weights {
                            file: ckpt.dir.display().to_string(),
                            reason: format!("{name}: {}", candle_reason(&e)),
                        })
                    })
                    .collect();
                for data in datas {
                    let data = data?;
                    bytes += data.len() as u64;
                    w.tensor(&data).map_err(io_err(&path))?;
                    done += 1;
                    on_progress(done, total);
                }
            }
            w.finish().map_err(io_err(&path))?;
        }
        Ok(())
    })?;
    Ok(Written {
        model: out.join(model_file),
        mmproj: out.join(mmproj_file),
        tensors: total,
        bytes,
    })
}

fn read_text(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn llm_metadata(ckpt: &Checkpoint, q: QuantType) -> Result<Vec<(String, Meta)>, CheckpointError> {
    let d = &ckpt.config.decoder;
    if let Some(o) = d.mpt() {
        return crate::mpt::gguf_metadata(ckpt, q, o);
    }
    let tok = ckpt.tokenizer()?;
    let vocab = tok.export_vocab(d.vocab_size)?;
    let add_bos = tok.encode("")?.first() == Some(&tok.bos_id);
    let mut m: Vec<(String, Meta)> = vec![
        ("general.architecture".into(), Meta::Str("llama".into())),
        ("general.name".into(), Meta::Str(ckpt.name.clone())),
        ("general.file_type".into(), Meta::U32(q.file_type())),
        (
            "general.alignment".into(),
            Meta::U32(format::ALIGNMENT as u32),
        ),
        ("llama.vocab_size".into(), Meta::U32(d.vocab_size as u32)),
        (
            "llama.context_length".into(),
            Meta::U32(d.max_position_embeddings as u32),
        ),
        (
            "llama.embedding_length".into(),
            Meta::U32(d.hidden_size as u32),
        ),
        (
            "llama.block_count".into(),
            Meta::U32(d.num_hidden_layers as u32),
        ),
        (
            "llama.feed_forward_length".into(),
            Meta::U32(d.intermediate_size as u32),
        ),
        (
            "llama.attention.head_count".into(),
            Meta::U32(d.num_attention_heads as u32),
        ),
        (
            "llama.attention.head_count_kv".into(),
            Meta::U32(d.num_key_value_heads as u32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Meta::F32(d.rms_norm_eps as f32),
        ),
        (
            "llama.rope.dimension_count".into(),
            Meta::U32(d.head_dim as u32),
        ),
        (
            "llama.rope.freq_base".into(),
            Meta::F32(d.rope_theta as f32),
        ),
        ("tokenizer.ggml.model".into(), Meta::Str("llama".into())),
        ("tokenizer.ggml.tokens".into(), Meta::ArrStr(vocab.pieces)),
        ("tokenizer.ggml.scores".into(), Meta::ArrF32(vocab.scores)),
        (
            "tokenizer.ggml.token_type".into(),
            Meta::ArrI32(vocab.kinds),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Meta::U32(tok.bos_id)),
        ("tokenizer.ggml.eos_token_id".into(), Meta::U32(tok.eos_id)),
        (
            "tokenizer.ggml.unknown_token_id".into(),
            Meta::U32(tok.unk_id),
        ),
        ("tokenizer.ggml.add_bos_token".into(), Meta::Bool(add_bos)),
        ("tokenizer.ggml.add_eos_token".into(), Meta::Bool(false)),
        (
            "tokenizer.ggml.add_space_prefix".into(),
            Meta::Bool(vocab.add_dummy_prefix),
        ),
    ];
    if let Some(pad) = tok.token_to_id("<pad>") {
        m.push(("tokenizer.ggml.padding_token_id".into(), Meta::U32(pad)));
    }
    if let Some(w) = d.sliding_window {
        m.push(("kollava.sliding_window".into(), Meta::U32(w as u32)));
    }
    m.extend(kollava_metadata(ckpt));
    Ok(m)
}

/// What kollava needs beyond llama.cpp's keys to answer as on the source: the family,
/// template, context, stop ids, image-token scheme and the tokenizer's own files (so that
/// ours reads back exactly as the source tokenizes).
pub(crate) fn kollava_metadata(ckpt: &Checkpoint) -> Vec<(String, Meta)> {
    let mut m: Vec<(String, Meta)> = vec![
        (
            "kollava.family".into(),
            Meta::Str(ckpt.family.name().into()),
        ),
        (
            "kollava.template".into(),
            Meta::Str(ckpt.default_template().into()),
        ),
        (
            "kollava.context_length".into(),
            Meta::U32(ckpt.context_len as u32),
        ),
        ("kollava.eos_ids".into(), Meta::ArrU32(ckpt.eos_ids.clone())),
        (
            "kollava.mm_use_im_start_end".into(),
            Meta::Bool(ckpt.use_im_start_end),
        ),
    ];
    if let Some(i) = ckpt.image_token_index {
        m.push(("kollava.image_token_index".into(), Meta::U32(i)));
    }
    for (file, key) in [
        ("tokenizer.json", "tokenizer.huggingface.json"),
        ("tokenizer_config.json", "kollava.tokenizer_config"),
        ("special_tokens_map.json", "kollava.special_tokens_map"),
        ("added_tokens.json", "kollava.added_tokens"),
    ] {
        if let Some(text) = read_text(&ckpt.dir.join(file)) {
            m.push((key.into(), Meta::Str(text)));
        }
    }
    m
}

fn mmproj_metadata(ckpt: &Checkpoint) -> Vec<(String, Meta)> {
    let cfg = &ckpt.config;
    let v = &cfg.vision;
    let p = &ckpt.preprocess;
    let aspect = match ckpt.aspect {
        AspectMode::Pad => "pad",
        AspectMode::Crop => "square",
        AspectMode::Resize => "resize",
    };
    let projector = match cfg.projector {
        ProjectorKind::Linear => "linear",
        _ => "mlp",
    };
    vec![
        ("general.architecture".into(), Meta::Str("clip".into())),
        (
            "general.name".into(),
            Meta::Str(format!("{} image encoder", ckpt.name)),
        ),
        (
            "general.description".into(),
            Meta::Str("image encoder for LLaVA".into()),
        ),
        ("general.file_type".into(), Meta::U32(1)),
        (
            "general.alignment".into(),
            Meta::U32(format::ALIGNMENT as u32),
        ),
        ("clip.has_text_encoder".into(), Meta::Bool(false)),
        ("clip.has_vision_encoder".into(), Meta::Bool(true)),
        ("clip.has_llava_projector".into(), Meta::Bool(true)),
        ("clip.projector_type".into(), Meta::Str(projector.into())),
        (
            "clip.use_gelu".into(),
            Meta::Bool(v.hidden_act == Activation::Gelu),
        ),
        (
            "clip.vision.image_size".into(),
            Meta::U32(v.image_size as u32),
        ),
        (
            "clip.vision.patch_size".into(),
            Meta::U32(v.patch_size as u32),
        ),
        (
            "clip.vision.embedding_length".into(),
            Meta::U32(v.hidden_size as u32),
        ),
        (
            "clip.vision.feed_forward_length".into(),
            Meta::U32(v.intermediate_size as u32),
        ),
        (
            "clip.vision.projection_dim".into(),
            Meta::U32(cfg.decoder.hidden_size as u32),
        ),
        (
            "clip.vision.attention.head_count".into(),
            Meta::U32(v.num_attention_heads as u32),
        ),
        (
            "clip.vision.attention.layer_norm_epsilon".into(),
            Meta::F32(v.layer_norm_eps as f32),
        ),
        (
            "clip.vision.block_count".into(),
            Meta::U32(cfg.vision_layers_used as u32),
        ),
        (
            "kollava.vision.layers_total".into(),
            Meta::U32(v.num_hidden_layers as u32),
        ),
        (
            "clip.vision.image_mean".into(),
            Meta::ArrF32(p.mean.to_vec()),
        ),
        ("clip.vision.image_std".into(), Meta::ArrF32(p.std.to_vec())),
        (
            "kollava.image_aspect_ratio".into(),
            Meta::Str(aspect.into()),
        ),
        (
            "kollava.feature_select".into(),
            Meta::Str(
                match cfg.feature_select {
                    FeatureSelect::Patch => "patch",
                    FeatureSelect::ClsPatch => "cls_patch",
                }
                .into(),
            ),
        ),
        (
            "kollava.preprocess.shortest_edge".into(),
            Meta::U32(p.shortest_edge),
        ),
        (
            "kollava.preprocess.crop".into(),
            Meta::ArrU32(vec![p.crop.0, p.crop.1]),
        ),
    ]
}

/// A GGUF language model and its image encoder, headers parsed, files memory-mapped (the
/// quantized matrices are read in place: see [`mapped`]).
pub struct GgufPair {
    pub model: PathBuf,
    pub mmproj: PathBuf,
    llm: Content,
    mm: Content,
    /// The language model file, mapped: its quantized matrices are read in place.
    llm_map: Arc<memmap2::Mmap>,
    /// The image encoder file's length (its tensors are read into memory).
    mm_len: usize,
}

impl std::fmt::Debug for GgufPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufPair")
            .field("model", &self.model)
            .field("mmproj", &self.mmproj)
            .finish_non_exhaustive()
    }
}

/// `path` mapped read-only. Pages are not read ahead: the kernel maps a file's pages 64 KiB
/// at a time on first touch, and pages never touched (the q/k matrices, which are read
/// and reordered) never count against the process.
fn map_file(path: &Path) -> Result<Arc<memmap2::Mmap>, CheckpointError> {
    let f = std::fs::File::open(path).map_err(io_err(path))?;
    // SAFETY: the map is read-only; as with every memory-mapped checkpoint (safetensors
    // too), a file changed on disk while the model runs is the user's to avoid.
    let map = unsafe { memmap2::Mmap::map(&f) };
    Ok(Arc::new(map.map_err(io_err(path))?))
}

fn file_len(path: &Path) -> Result<usize, CheckpointError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    Ok(usize::try_from(meta.len()).unwrap_or(usize::MAX))
}

/// A GGUF file's header, checked against the file's length: a file cut short (a download
/// that stopped) is reported here, under its own name, before anything is loaded.
fn read_content(path: &Path) -> Result<Content, CheckpointError> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let read = crate::untrusted::guard(|| Content::read(&mut f).map_err(|e| candle_reason(&e)));
    let content = read
        .unwrap_or_else(|panic| Err(format!("malformed header ({panic})")))
        .map_err(|reason| CheckpointError::Weights {
            file: path.display().to_string(),
            reason: format!("not a readable GGUF file: {reason}"),
        })?;
    let len = file_len(path)? as u64;
    let past_end = content.tensor_infos.iter().find_map(|(name, info)| {
        // A header may declare any dims: their product and the byte count are checked.
        let elems = (info.shape.dims().iter()).try_fold(1u64, |n, &d| n.checked_mul(d as u64));
        let bytes = elems.and_then(|e| {
            let (block, size) = (info.ggml_dtype.block_size(), info.ggml_dtype.type_size());
            (e / block as u64).checked_mul(size as u64)
        });
        let end = content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|o| o.checked_add(bytes?));
        end.is_none_or(|end| end > len).then_some((name, end))
    });
    if let Some((name, end)) = past_end {
        return Err(CheckpointError::Weights {
            file: path.display().to_string(),
            reason: format!(
                "the file is truncated: tensor {name} ends at byte {} but the file has {len}",
                end.map_or("(overflow)".to_string(), |e| e.to_string())
            ),
        });
    }
    Ok(content)
}

fn is_gguf(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()) == Some("gguf")
}

fn is_mmproj(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.to_ascii_lowercase().contains("mmproj"))
}

/// The GGUF pair `--model` (and `--mmproj`) name, or `None` when `model` is not GGUF: a
/// `.gguf` file, or a directory without `config.json` holding one language-model `.gguf`
/// and one `mmproj*.gguf`.
pub fn find_pair(
    model: &Path,
    mmproj: Option<&Path>,
) -> Result<Option<(PathBuf, PathBuf)>, CheckpointError> {
    let (dir, file) = if model.is_file() && is_gguf(model) {
        (
            model.parent().unwrap_or(Path::new(".")).to_path_buf(),
            Some(model.to_path_buf()),
        )
    } else if model.is_dir() && !model.join("config.json").exists() {
        (model.to_path_buf(), None)
    } else {
        return Ok(None);
    };
    let mut ggufs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(io_err(&dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_gguf(p))
        .collect();
    ggufs.sort();
    let (encoders, models): (Vec<_>, Vec<_>) = ggufs.into_iter().partition(|p| is_mmproj(p));
    let model =
        match file {
            Some(f) => f,
            None => match models.as_slice() {
                [] => return Ok(None),
                [one] => one.clone(),
                many => {
                    return Err(CheckpointError::Invalid {
                        file: dir.display().to_string(),
                        what: format!(
                        "GGUF directory: {} language-model files ({}); pass one of them as --model",
                        many.len(),
                        many.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                    ),
                    })
                }
            },
        };
    let mmproj = match mmproj {
        Some(p) => p.to_path_buf(),
        None => match encoders.as_slice() {
            [one] => one.clone(),
            [] => {
                return Err(CheckpointError::Invalid {
                    file: model.display().to_string(),
                    what: "GGUF model: no mmproj*.gguf image encoder beside it; pass --mmproj FILE"
                        .into(),
                })
            }
            _ => {
                return Err(CheckpointError::Invalid {
                    file: dir.display().to_string(),
                    what: "GGUF directory: several mmproj*.gguf files; pass --mmproj FILE".into(),
                })
            }
        },
    };
    Ok(Some((model, mmproj)))
}

/// Metadata lookups with errors that name the file and key.
pub(crate) struct Keys<'a> {
    pub(crate) c: &'a Content,
    pub(crate) file: &'a Path,
}

impl Keys<'_> {
    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        self.c.metadata.get(key)
    }

    pub(crate) fn missing(&self, key: &str) -> CheckpointError {
        CheckpointError::MissingKey {
            file: self.file.display().to_string(),
            key: key.into(),
        }
    }

    pub(crate) fn uint(&self, key: &str) -> Option<usize> {
        match self.get(key)? {
            Value::U8(v) => Some(*v as usize),
            Value::U16(v) => Some(*v as usize),
            Value::U32(v) => Some(*v as usize),
            Value::U64(v) => Some(*v as usize),
            Value::I32(v) if *v >= 0 => Some(*v as usize),
            Value::I64(v) if *v >= 0 => Some(*v as usize),
            _ => None,
        }
    }

    pub(crate) fn need_uint(&self, key: &str) -> Result<usize, CheckpointError> {
        self.uint(key).ok_or_else(|| self.missing(key))
    }

    pub(crate) fn float(&self, key: &str) -> Option<f64> {
        match self.get(key)? {
            // Through the shortest decimal that reads back as this f32, so that the 1e-5 of
            // a config.json comes back as the f64 1e-5.
            Value::F32(v) => v.to_string().parse().ok(),
            Value::F64(v) => Some(*v),
            _ => None,
        }
    }

    pub(crate) fn string(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn boolean(&self, key: &str) -> Option<bool> {
        match self.get(key)? {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub(crate) fn array(&self, key: &str) -> Option<&Vec<Value>> {
        match self.get(key)? {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    pub(crate) fn floats(&self, key: &str) -> Option<Vec<f32>> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                Value::F32(x) => Some(*x),
                Value::F64(x) => Some(*x as f32),
                _ => None,
            })
            .collect()
    }

    pub(crate) fn uints(&self, key: &str) -> Option<Vec<u32>> {
        self.array(key)?.iter().map(|v| v.to_u32().ok()).collect()
    }
}

/// Resolves a GGUF pair into a [`Checkpoint`].
/// Rows of a tensor of `c`, from its header.
pub(crate) fn rows(c: &Content, name: &str) -> Option<usize> {
    c.tensor_infos.get(name).map(|t| t.shape.dims()[0])
}

/// The decoder of a GGUF `llama` model.
fn llama_decoder(k: &Keys, llm: &Content) -> Result<DecoderConfig, CheckpointError> {
    let hidden = k.need_uint("llama.embedding_length")?;
    let heads = k.need_uint("llama.attention.head_count")?;
    Ok(DecoderConfig {
        arch: kollava_model::config::Architecture::Llama,
        vocab_size: rows(llm, "token_embd.weight").ok_or_else(|| k.missing("token_embd.weight"))?,
        hidden_size: hidden,
        intermediate_size: k.need_uint("llama.feed_forward_length")?,
        num_hidden_layers: k.need_uint("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: k.uint("llama.attention.head_count_kv").unwrap_or(heads),
        head_dim: k
            .uint("llama.rope.dimension_count")
            .unwrap_or(hidden / heads),
        rms_norm_eps: k
            .float("llama.attention.layer_norm_rms_epsilon")
            .unwrap_or(1e-5),
        rope_theta: k.float("llama.rope.freq_base").unwrap_or(10000.0),
        max_position_embeddings: k.uint("llama.context_length").unwrap_or(4096),
        sliding_window: k.uint("kollava.sliding_window"),
        attention_bias: llm.tensor_infos.contains_key("blk.0.attn_q.bias"),
        mlp_bias: llm.tensor_infos.contains_key("blk.0.ffn_up.bias"),
        hidden_act: Activation::Silu,
        tie_word_embeddings: !llm.tensor_infos.contains_key("output.weight"),
    })
}

pub fn open_pair(model: PathBuf, mmproj: PathBuf) -> Result<Checkpoint, CheckpointError> {
    let llm = read_content(&model)?;
    let mm = read_content(&mmproj)?;
    let k = Keys {
        c: &llm,
        file: &model,
    };
    let arch = k.string("general.architecture").unwrap_or("");
    if arch != "llama" && arch != "mpt" {
        return Err(CheckpointError::Unsupported {
            file: model.display().to_string(),
            what: format!(
                "GGUF architecture {arch:?} (LLaVA language models are \"llama\" or \"mpt\")"
            ),
        });
    }
    let v = Keys {
        c: &mm,
        file: &mmproj,
    };
    if v.boolean("clip.has_vision_encoder") == Some(false)
        || !mm.tensor_infos.contains_key("v.patch_embd.weight")
    {
        return Err(CheckpointError::Invalid {
            file: mmproj.display().to_string(),
            what: "image encoder: it has no CLIP vision tower (v.patch_embd.weight)".into(),
        });
    }
    let decoder = match arch {
        "mpt" => crate::mpt::gguf_decoder(&k, &llm)?,
        _ => llama_decoder(&k, &llm)?,
    };
    let vision_layers = v.need_uint("clip.vision.block_count")?;
    let image_size = v.need_uint("clip.vision.image_size")?;
    let vision = ClipVisionConfig {
        hidden_size: v.need_uint("clip.vision.embedding_length")?,
        intermediate_size: v.need_uint("clip.vision.feed_forward_length")?,
        num_attention_heads: v.need_uint("clip.vision.attention.head_count")?,
        num_hidden_layers: v
            .uint("kollava.vision.layers_total")
            .unwrap_or(vision_layers),
        image_size,
        patch_size: v.need_uint("clip.vision.patch_size")?,
        num_channels: 3,
        layer_norm_eps: v
            .float("clip.vision.attention.layer_norm_epsilon")
            .unwrap_or(1e-5),
        hidden_act: if v.boolean("clip.use_gelu") == Some(true) {
            Activation::Gelu
        } else {
            Activation::QuickGelu
        },
    };
    let mm_depth = (0..8)
        .step_by(2)
        .take_while(|i| mm.tensor_infos.contains_key(&format!("mm.{i}.weight")))
        .count();
    let projector = match (v.string("clip.projector_type").unwrap_or("mlp"), mm_depth) {
        ("linear", 1) => ProjectorKind::Linear,
        ("mlp", d) if d >= 1 => ProjectorKind::Mlp {
            depth: d,
            activation: Activation::Gelu,
        },
        (other, _) => {
            return Err(CheckpointError::Unsupported {
                file: mmproj.display().to_string(),
                what: format!("projector type {other:?} (LLaVA's are mlp and linear)"),
            })
        }
    };
    let config = ModelConfig {
        vision,
        vision_layers_used: vision_layers,
        feature_select: if v.string("kollava.feature_select") == Some("cls_patch") {
            FeatureSelect::ClsPatch
        } else {
            FeatureSelect::Patch
        },
        projector,
        decoder,
    };
    // llama.cpp's own files say nothing of the family: LLaVA-1.5's is the one it converts.
    let family = k
        .string("kollava.family")
        .and_then(Family::from_name)
        .unwrap_or(if arch == "mpt" {
            Family::LLAVA_MPT
        } else {
            Family::LLAVA_15
        });
    let mut preprocess = ClipPreprocess::square(image_size as u32);
    if let Some(m) = v.floats("clip.vision.image_mean").filter(|m| m.len() == 3) {
        preprocess.mean = [m[0], m[1], m[2]];
    }
    if let Some(s) = v.floats("clip.vision.image_std").filter(|s| s.len() == 3) {
        preprocess.std = [s[0], s[1], s[2]];
    }
    if let Some(e) = v.uint("kollava.preprocess.shortest_edge") {
        preprocess.shortest_edge = e as u32;
    }
    if let Some(c) = v.uints("kollava.preprocess.crop").filter(|c| c.len() == 2) {
        preprocess.crop = (c[0], c[1]);
    }
    let aspect = match v.string("kollava.image_aspect_ratio") {
        Some("square") => AspectMode::Crop,
        Some("resize") => AspectMode::Resize,
        // llama.cpp pads LLaVA-1.5 images to a square, as the reference does.
        _ => AspectMode::Pad,
    };
    let mut eos_ids = k.uints("kollava.eos_ids").unwrap_or_default();
    if let Some(e) = k.uint("tokenizer.ggml.eos_token_id") {
        if !eos_ids.contains(&(e as u32)) {
            eos_ids.push(e as u32);
        }
    }
    let name = model
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("model")
        .to_string();
    let trained_template = k.string("kollava.template").and_then(|t| {
        kollava_inputs::template::Template::names()
            .iter()
            .copied()
            .find(|n| *n == t)
    });
    Ok(Checkpoint {
        dir: model.parent().unwrap_or(Path::new(".")).to_path_buf(),
        name,
        family,
        context_len: k
            .uint("kollava.context_length")
            .unwrap_or(config.decoder.max_position_embeddings),
        config,
        vision_dir: None,
        preprocess,
        aspect,
        eos_ids,
        image_token_index: k.uint("kollava.image_token_index").map(|i| i as u32),
        use_im_start_end: k.boolean("kollava.mm_use_im_start_end").unwrap_or(false),
        projector_file: None,
        trained_template,
        original_tokenization: false,
        gguf: Some(Arc::new(GgufPair {
            llm_map: map_file(&model)?,
            mm_len: file_len(&mmproj)?,
            model,
            mmproj,
            llm,
            mm,
        })),
    })
}

impl GgufPair {
    /// Whether the language model's matrices are quantized (layer 0's query or fused
    /// projection is not a float type).
    pub fn is_quantized(&self) -> bool {
        ["blk.0.attn_q.weight", "blk.0.attn_qkv.weight"]
            .iter()
            .find_map(|n| self.llm.tensor_infos.get(*n))
            .is_some_and(|t| {
                !matches!(
                    t.ggml_dtype,
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
                )
            })
    }

    /// The tokenizer: the source's own `tokenizer.json` when the file carries it, otherwise
    /// the sentencepiece vocabulary of `tokenizer.ggml.*`.
    pub fn tokenizer(&self) -> Result<Tokenizer, CheckpointError> {
        let k = Keys {
            c: &self.llm,
            file: &self.model,
        };
        let what = self.model.display().to_string();
        let json = |key: &str| -> Result<serde_json::Value, CheckpointError> {
            match k.string(key) {
                Some(text) => serde_json::from_str(text).map_err(|e| CheckpointError::Json {
                    file: format!("{what} ({key})"),
                    reason: e.to_string(),
                }),
                None => Ok(serde_json::Value::Null),
            }
        };
        let mut config = json("kollava.tokenizer_config")?;
        if let Some(hf) = k.string("tokenizer.huggingface.json") {
            return Ok(Tokenizer::from_tokenizer_json_bytes(
                hf.as_bytes(),
                &config,
                &what,
            )?);
        }
        let strings = |key: &str| -> Result<Vec<String>, CheckpointError> {
            k.array(key)
                .ok_or_else(|| k.missing(key))?
                .iter()
                .map(|v| v.to_string().cloned().map_err(|_| k.missing(key)))
                .collect()
        };
        let pieces = strings("tokenizer.ggml.tokens")?;
        let n = pieces.len();
        let scores = k
            .floats("tokenizer.ggml.scores")
            .unwrap_or_else(|| vec![0.0; n]);
        let kinds: Vec<i32> = match k.array("tokenizer.ggml.token_type") {
            Some(a) => a.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
            None => vec![1; n],
        };
        let piece = |key: &str| k.uint(key).and_then(|i| pieces.get(i).cloned());
        if config.is_null() {
            // llama.cpp's file: the flags its keys give, LLaMA's defaults for the rest.
            let mut c = serde_json::Map::new();
            c.insert("legacy".into(), true.into());
            c.insert(
                "add_bos_token".into(),
                k.boolean("tokenizer.ggml.add_bos_token")
                    .unwrap_or(true)
                    .into(),
            );
            c.insert(
                "add_eos_token".into(),
                k.boolean("tokenizer.ggml.add_eos_token")
                    .unwrap_or(false)
                    .into(),
            );
            for (name, key) in [
                ("bos_token", "tokenizer.ggml.bos_token_id"),
                ("eos_token", "tokenizer.ggml.eos_token_id"),
                ("unk_token", "tokenizer.ggml.unknown_token_id"),
            ] {
                if let Some(p) = piece(key) {
                    c.insert(name.into(), p.into());
                }
            }
            config = serde_json::Value::Object(c);
        }
        let special_map = json("kollava.special_tokens_map")?;
        // Added tokens: ours name them; in llama.cpp's, they are the user-defined pieces.
        let added = match k.string("kollava.added_tokens") {
            Some(_) => json("kollava.added_tokens")?,
            None => serde_json::Value::Object(
                kinds
                    .iter()
                    .enumerate()
                    .filter(|(_, &t)| t == 4)
                    .map(|(i, _)| (pieces[i].clone(), serde_json::Value::from(i)))
                    .collect(),
            ),
        };
        let vocab = SpmVocab {
            pieces,
            scores,
            kinds,
            add_dummy_prefix: k.boolean("tokenizer.ggml.add_space_prefix").unwrap_or(true),
            remove_extra_whitespaces: false,
            escape_whitespaces: true,
        };
        Ok(Tokenizer::from_spm_vocab(
            vocab,
            &config,
            &special_map,
            Some(&added).filter(|a| a.as_object().is_some_and(|o| !o.is_empty())),
            &what,
        )?)
    }

    /// Where a canonical tensor is, with CLIP's `fc1`/`fc2` told apart by shape.
    fn locate(&self, canonical: &str, cfg: &ModelConfig) -> Option<(&Content, &Path, Mapped)> {
        let mut m = to_gguf(canonical, cfg)?;
        let (c, path) = match m.part {
            Part::Llm => (&self.llm, self.model.as_path()),
            Part::Mmproj => (&self.mm, self.mmproj.as_path()),
        };
        let is_fc1 = canonical.contains(".mlp.fc1.");
        if m.part == Part::Mmproj && (is_fc1 || canonical.contains(".mlp.fc2.")) {
            let rows_of = |n: &str| c.tensor_infos.get(n).map(|t| t.shape.dims()[0]);
            let fc1_rows = cfg.vision.intermediate_size;
            let (down, up) = (
                m.name.replace("ffn_up", "ffn_down"),
                m.name.replace("ffn_down", "ffn_up"),
            );
            let down_w = format!("{}.weight", down.rsplit_once('.')?.0);
            // Converters disagree on which of the two they call fc1; its output is wider.
            let down_is_fc1 = rows_of(&down_w) == Some(fc1_rows);
            m.name = if is_fc1 == down_is_fc1 { down } else { up };
        }
        c.tensor_infos.contains_key(&m.name).then_some((c, path, m))
    }

    /// A stored tensor, with its rows in HF order. On the CPU the language model's matrices
    /// are views of the mapped file (they are multiplied as stored); everything else is
    /// read into memory: the tower's matrices, which are re-laid out for the kernels
    /// anyway (a view would leave the file's pages resident beside the packed copy), q/k
    /// rows, which are reordered, and anything bound for a GPU.
    fn qtensor(
        &self,
        canonical: &str,
        cfg: &ModelConfig,
        device: &Device,
    ) -> candle_core::Result<QTensor> {
        let Some((c, path, m)) = self.locate(canonical, cfg) else {
            candle_core::bail!("no tensor for {canonical} in the GGUF pair");
        };
        let info = &c.tensor_infos[&m.name];
        let file_len = match m.part {
            Part::Llm => self.llm_map.len(),
            Part::Mmproj => self.mm_len,
        };
        let offset = usize::try_from(c.tensor_data_offset + info.offset).unwrap_or(usize::MAX);
        let bytes = format::byte_size(info.ggml_dtype, info.shape.elem_count()) as usize;
        if offset.checked_add(bytes).is_none_or(|end| end > file_len) {
            candle_core::bail!(
                "{}: its {bytes} bytes at offset {offset} run past the end of {} ({file_len} \
                 bytes): the file is truncated",
                m.name,
                path.display()
            );
        }
        let q = if m.part == Part::Llm && m.heads.is_none() && device.is_cpu() {
            mapped::tensor(&self.llm_map, offset, info.ggml_dtype, info.shape.clone())?
        } else {
            let mut f = std::fs::File::open(path)?;
            c.tensor(&mut f, &m.name, &Device::Cpu)?
        };
        let q = match m.heads {
            Some(heads) => {
                let rows = q.shape().dims()[0];
                reorder_rows(&q, |r| pair_order_row(r, rows, heads))?
            }
            None => q,
        };
        if device.is_cpu() {
            return Ok(q);
        }
        let storage = QStorage::from_data(q.data()?, device, q.dtype())?;
        QTensor::new(storage, q.shape().clone())
    }

    /// Loads the model in `form`: the decoder's quantized matrices, its token embedding
    /// table and (on the CPU) the tower's 16-bit matrices are taken as stored, in their
    /// blocks; everything else is read as f32.
    pub fn load(
        &self,
        ckpt: &Checkpoint,
        device: &Device,
        form: Form,
    ) -> Result<Llava, CheckpointError> {
        let cfg = &ckpt.config;
        let mut kept = HashSet::new();
        for name in canonical_names(cfg) {
            let linear = name.starts_with("model.layers.") && name.ends_with("_proj.weight")
                || name == "lm_head.weight";
            // The tower's matrices too, when they are 16-bit (as mmproj files store them):
            // packing then goes straight from the file's halves, one matrix at a time,
            // instead of through an f32 copy of the whole tower.
            let tower = device.is_cpu()
                && name.starts_with("vision_model.encoder.layers.")
                && (name.contains("_proj.weight") || name.contains(".fc"))
                && name.ends_with(".weight");
            if !linear && !tower && name != EMBEDDINGS {
                continue;
            }
            if let Some((c, _, m)) = self.locate(&name, cfg) {
                let keep = match c.tensor_infos[&m.name].ggml_dtype {
                    GgmlDType::F32 => false,
                    GgmlDType::F16 | GgmlDType::BF16 => true,
                    _ => !tower,
                };
                if keep {
                    kept.insert(name);
                }
            }
        }
        let stored = Stored {
            pair: self,
            cfg,
            device,
            kept,
            taken: Default::default(),
        };
        let backend = Backend {
            pair: self,
            cfg: cfg.clone(),
        };
        let boxed: Box<dyn candle_nn::var_builder::SimpleBackend + '_> = Box::new(backend);
        let vb = VarBuilder::from_backend(boxed, DType::F32, device.clone());
        let model = Llava::load(vb.clone(), vb.pp("vision_model"), cfg, form, Some(&stored))
            .map_err(|e| CheckpointError::Load {
                part: "GGUF",
                dir: self.model.display().to_string(),
                reason: candle_reason(&e),
            })?;
        let taken = stored.taken.into_inner().len();
        if taken != stored.kept.len() {
            return Err(CheckpointError::Invalid {
                file: self.model.display().to_string(),
                what: format!(
                    "model: {taken} of {} quantized matrices placed",
                    stored.kept.len()
                ),
            });
        }
        Ok(model)
    }
}

/// The token embedding table's canonical name.
const EMBEDDINGS: &str = "model.embed_tokens.weight";

/// The matrices a GGUF model keeps in their blocks, handed to the model as it is built
/// (the embedding table on the CPU, where its lookups run, whatever the device).
struct Stored<'a> {
    pair: &'a GgufPair,
    cfg: &'a ModelConfig,
    device: &'a Device,
    kept: HashSet<String>,
    /// The names handed out, to check that the model took every one.
    taken: std::cell::RefCell<HashSet<String>>,
}

impl StoredMatrices for Stored<'_> {
    fn matrix(&self, name: &str) -> candle_core::Result<Option<Arc<QTensor>>> {
        if !self.kept.contains(name) {
            return Ok(None);
        }
        let device = if name == EMBEDDINGS {
            &Device::Cpu
        } else {
            self.device
        };
        let q = self.pair.qtensor(name, self.cfg, device)?;
        self.taken.borrow_mut().insert(name.to_string());
        Ok(Some(Arc::new(q)))
    }
}

/// Canonical names → GGUF tensors, read as dense tensors, for what the model does not take
/// from [`Stored`].
struct Backend<'a> {
    pair: &'a GgufPair,
    cfg: ModelConfig,
}

impl candle_nn::var_builder::SimpleBackend for Backend<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "{name} has shape {:?} in the GGUF file, the config implies {s:?}",
                t.shape()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let q = self.pair.qtensor(name, &self.cfg, &Device::Cpu)?;
        q.dequantize(&Device::Cpu)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.pair.locate(name, &self.cfg).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kollava_model::layers::Linear;

    fn fixture(name: &str) -> Checkpoint {
        let dir = kollava_testkit::checkpoint_dir(name);
        crate::open(dir.to_str().unwrap(), &Default::default()).unwrap()
    }

    /// Every tensor read back from our file equals the source stored in that type: in f32
    /// exactly the source, rows of q/k back in HF order, CLIP's fc1/fc2 where they were.
    #[test]
    fn written_tensors_read_back_identical() {
        for (family, q) in [
            ("llava-v1.5", QuantType::F32),
            ("llava-hf", QuantType::Q8_0),
            ("llava-mistral", QuantType::F32),
            ("llava-v0", QuantType::Q4_0),
            ("llava-mpt", QuantType::Q8_0),
        ] {
            let src = fixture(family);
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path().join("q");
            let w = quantize(&src, &out, q, &mut |_, _| {}).unwrap();
            let back = crate::open(out.to_str().unwrap(), &Default::default()).unwrap();
            assert_eq!(back.config, src.config, "{family}");
            assert_eq!(back.family, src.family);
            assert_eq!(back.default_template(), src.default_template());
            let pair = back.gguf.as_ref().unwrap();
            assert_eq!(pair.model, w.model);
            let (llm, vision) = src.var_builders(DType::F32, &Device::Cpu).unwrap();
            for name in canonical_names(&src.config) {
                let vb = if name.starts_with("vision_model.") {
                    &vision
                } else {
                    &llm
                };
                let shape = canonical_shape(&name, &src.config);
                let source = vb.get(shape.clone(), &name).unwrap();
                let m = to_gguf(&name, &src.config).unwrap();
                let stored = QTensor::quantize(&source, storage_type(&m, &shape, q))
                    .unwrap()
                    .dequantize(&Device::Cpu)
                    .unwrap();
                let read = pair
                    .qtensor(&name, &src.config, &Device::Cpu)
                    .unwrap()
                    .dequantize(&Device::Cpu)
                    .unwrap();
                let diff = kollava_testkit::max_abs_diff_tensors(&stored, &read);
                assert_eq!(diff, 0.0, "{family} {name}");
            }
        }
    }

    /// The loaded model looks tokens up in the file's own table and holds the tower's
    /// 16-bit matrices as stored, in their blocks: the same numbers as the dequantized file.
    #[test]
    fn the_loaded_model_reads_the_files_blocks() {
        for q in [QuantType::Q8_0, QuantType::F16] {
            let src = fixture("llava-v1.5");
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path().join("q");
            quantize(&src, &out, q, &mut |_, _| {}).unwrap();
            let back = crate::open(out.to_str().unwrap(), &Default::default()).unwrap();
            let (pair, cfg, cpu) = (back.gguf.as_ref().unwrap(), &back.config, &Device::Cpu);
            let mut model = pair.load(&back, cpu, Form::AsRead).unwrap();
            let file = |name: &str| pair.qtensor(name, cfg, cpu).unwrap();
            let ids = [0u32, 1, 7, cfg.decoder.vocab_size as u32 - 1];
            let ids = Tensor::new(ids.as_slice(), cpu).unwrap();
            let want = file(EMBEDDINGS)
                .dequantize(cpu)
                .unwrap()
                .index_select(&ids, 0)
                .unwrap();
            let got = model.decoder.embed(&ids.unsqueeze(0).unwrap()).unwrap();
            let got = got.squeeze(0).unwrap();
            assert_eq!(
                kollava_testkit::max_abs_diff_tensors(&got, &want),
                0.0,
                "{q:?} embeddings"
            );
            let mut kept = 0;
            for (name, lin) in model.vision.linears_mut() {
                let stored = file(&format!("vision_model.{name}.weight"));
                let held = match lin {
                    Linear::Quantized { weight, .. } => {
                        assert_eq!(weight.dtype(), stored.dtype(), "{q:?} {name}");
                        kept += 1;
                        weight.dequantize(cpu).unwrap()
                    }
                    Linear::Dense(l) => {
                        assert_eq!(stored.dtype(), GgmlDType::F32, "{q:?} {name} widened");
                        l.weight().clone()
                    }
                    other => panic!("{q:?} {name}: {other:?}"),
                };
                let want = stored.dequantize(cpu).unwrap();
                assert_eq!(kollava_testkit::max_abs_diff_tensors(&held, &want), 0.0);
            }
            assert!(kept > 0, "{q:?}: no tower matrix kept in the file's halves");
            // The decoder's matrices are read in place from the mapped file, not copied.
            let inside = |data: &[u8], map: &memmap2::Mmap| {
                let (p, m) = (data.as_ptr() as usize, map.as_ptr() as usize);
                p >= m && p + data.len() <= m + map.len()
            };
            let mut mapped = 0;
            for (name, lin) in model.decoder.linears_mut() {
                let Linear::Quantized { weight, .. } = lin else {
                    continue;
                };
                // q/k rows are put back in HF order, which takes a copy; the rest is mapped.
                if !(name.ends_with("q_proj") || name.ends_with("k_proj")) {
                    assert!(
                        inside(&weight.data().unwrap(), &pair.llm_map),
                        "{q:?} {name}"
                    );
                    mapped += 1;
                }
            }
            assert!(mapped > 0, "{q:?}: no decoder matrix read in place");
        }
    }

    #[test]
    fn the_tokenizer_survives_the_round_trip() {
        let text = "USER: <image>\n이 그림을 설명해 주세요. Describe it!\nASSISTANT:";
        for family in [
            "llava-v1.5",
            "llava-hf",
            "llava-v0",
            "llava-mistral",
            "llava-mpt",
        ] {
            let src = fixture(family);
            let tmp = tempfile::tempdir().unwrap();
            quantize(&src, &tmp.path().join("q"), QuantType::Q8_0, &mut |_, _| {}).unwrap();
            let back =
                crate::open(tmp.path().join("q").to_str().unwrap(), &Default::default()).unwrap();
            let (a, b) = (src.tokenizer().unwrap(), back.tokenizer().unwrap());
            assert_eq!(a.encode(text).unwrap(), b.encode(text).unwrap(), "{family}");
            assert_eq!(a.eos_id, b.eos_id);
            // Without our extra keys (as llama.cpp writes it), the pieces alone still
            // tokenize a sentencepiece vocabulary the same way.
            if family == "llava-v1.5" {
                let mut pair_llm = read_content(&back.gguf.as_ref().unwrap().model).unwrap();
                pair_llm.metadata.retain(|k, _| !k.starts_with("kollava."));
                let pair = back.gguf.as_ref().unwrap();
                let bare = GgufPair {
                    model: pair.model.clone(),
                    mmproj: pair.mmproj.clone(),
                    llm: pair_llm,
                    mm: read_content(&pair.mmproj).unwrap(),
                    llm_map: pair.llm_map.clone(),
                    mm_len: pair.mm_len,
                };
                let c = bare.tokenizer().unwrap();
                assert_eq!(
                    a.encode("Describe it in detail.").unwrap(),
                    c.encode("Describe it in detail.").unwrap()
                );
                assert_eq!(a.encode("이 그림").unwrap(), c.encode("이 그림").unwrap());
            }
        }
    }

    #[test]
    fn bad_pairs_get_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("q");
        quantize(
            &fixture("llava-v1.5"),
            &out,
            QuantType::Q8_0,
            &mut |_, _| {},
        )
        .unwrap();
        // Quantizing a GGUF model again is refused.
        let back = crate::open(out.to_str().unwrap(), &Default::default()).unwrap();
        let e = quantize(
            &back,
            &tmp.path().join("again"),
            QuantType::Q4_0,
            &mut |_, _| {},
        );
        assert!(e.unwrap_err().to_string().contains("already GGUF"));
        // The output directory must be new.
        let e = quantize(
            &fixture("llava-v1.5"),
            &out,
            QuantType::Q8_0,
            &mut |_, _| {},
        );
        assert!(e.unwrap_err().to_string().contains("not empty"));
        // A model file without its image encoder.
        let lonely = tmp.path().join("lonely");
        std::fs::create_dir(&lonely).unwrap();
        std::fs::copy(out.join("llava-v1.5-Q8_0.gguf"), lonely.join("m.gguf")).unwrap();
        let e = crate::open(lonely.to_str().unwrap(), &Default::default()).unwrap_err();
        assert!(e.to_string().contains("--mmproj"), "{e}");
        // A truncated file.
        let bytes = std::fs::read(out.join("llava-v1.5-Q8_0.gguf")).unwrap();
        std::fs::write(lonely.join("m.gguf"), &bytes[..100]).unwrap();
        std::fs::copy(
            out.join("mmproj-llava-v1.5-F16.gguf"),
            lonely.join("mmproj.gguf"),
        )
        .unwrap();
        let e = crate::open(lonely.to_str().unwrap(), &Default::default()).unwrap_err();
        assert!(e.to_string().contains("m.gguf"), "{e}");
        // A file cut inside its tensor data: the header reads, opening says which file is
        // truncated (the image encoder's too, under its own name).
        std::fs::write(lonely.join("m.gguf"), &bytes[..bytes.len() - 4096]).unwrap();
        let e = crate::open(lonely.to_str().unwrap(), &Default::default()).unwrap_err();
        let e = e.to_string();
        assert!(e.contains("truncated") && e.contains("m.gguf"), "{e}");
        std::fs::write(lonely.join("m.gguf"), &bytes).unwrap();
        let mm = std::fs::read(out.join("mmproj-llava-v1.5-F16.gguf")).unwrap();
        std::fs::write(lonely.join("mmproj.gguf"), &mm[..mm.len() - 64]).unwrap();
        let e = crate::open(lonely.to_str().unwrap(), &Default::default()).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("truncated") && e.contains("mmproj.gguf") && !e.contains("m.gguf:"),
            "{e}"
        );
        std::fs::write(lonely.join("mmproj.gguf"), &mm).unwrap();
        // --mmproj with a non-GGUF model.
        let opts = crate::OpenOptions {
            mmproj: Some(out.join("mmproj-llava-v1.5-F16.gguf")),
            ..Default::default()
        };
        let dir = kollava_testkit::checkpoint_dir("llava-v1.5");
        let e = crate::open(dir.to_str().unwrap(), &opts).unwrap_err();
        assert!(e.to_string().contains("--mmproj"), "{e}");
    }
}
