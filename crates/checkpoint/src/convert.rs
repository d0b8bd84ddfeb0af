//! `kollava convert`: a checkpoint's weights rewritten as safetensors (optionally in another
//! dtype), everything else copied as is. Streams tensor by tensor: each is read from its
//! source shard only when the writer reaches it, so a 27 GB fp32 `.bin` checkpoint converts
//! in about one tensor of memory. The output is written under a temporary name and renamed
//! when complete.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Tensor};
use safetensors::{Dtype, View};
use serde_json::json;

use crate::weights::{find_weights, WeightFormat};
use crate::{candle_reason, CheckpointError};

/// Where to read one tensor from.
#[derive(Clone)]
enum Source {
    Pickle(std::sync::Arc<candle_core::pickle::PthTensors>),
    Safetensors(std::sync::Arc<crate::weights::SafetensorsFiles>),
    /// A tensor given by the caller (trained weights replacing the stored ones).
    Memory(Tensor),
}

/// A change applied to each tensor as it is written (name, value in f32 → new value).
pub(crate) type Transform =
    std::sync::Arc<dyn Fn(&str, Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

struct Lazy {
    transform: Option<Transform>,
    /// The stored name (read from the source).
    name: String,
    /// The name written (the stored one unless the layout changes).
    out_name: String,
    shape: Vec<usize>,
    /// Output dtype.
    dtype: DType,
    source: Source,
    /// Set when the tensor could not be read while being written: safetensors' writer has
    /// no way to fail from `View::data`, so the failure is recorded and reported after.
    error: std::sync::Mutex<Option<String>>,
}

fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F64 => Dtype::F64,
        DType::I64 => Dtype::I64,
        DType::U32 => Dtype::U32,
        DType::U8 => Dtype::U8,
        _ => Dtype::F32,
    }
}

impl Lazy {
    fn load(&self) -> candle_core::Result<Tensor> {
        let t = match &self.source {
            Source::Pickle(p) => crate::torch_pickle::get(p, &self.name)?.ok_or_else(|| {
                candle_core::Error::CannotFindTensor {
                    path: self.name.clone(),
                }
            })?,
            Source::Safetensors(s) => s.read(&self.name)?,
            Source::Memory(t) => t.clone(),
        };
        let t = match &self.transform {
            Some(f) if t.dtype().is_float() => f(&self.name, t.to_dtype(DType::F32)?)?,
            _ => t,
        };
        // Only floating-point weights change dtype; integer buffers keep theirs.
        if t.dtype().is_float() {
            t.to_dtype(self.dtype)
        } else {
            Ok(t)
        }
    }
}

impl View for &Lazy {
    fn dtype(&self) -> Dtype {
        st_dtype(self.dtype)
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let t = self.load().and_then(|t| t.flatten_all());
        let bytes = t.and_then(|t| match t.dtype() {
            DType::F32 => Ok(t
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()),
            DType::F16 => Ok(t
                .to_vec1::<half::f16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()),
            DType::BF16 => Ok(t
                .to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()),
            DType::F64 => Ok(t
                .to_vec1::<f64>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()),
            DType::I64 => Ok(t
                .to_vec1::<i64>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()),
            DType::U32 => Ok(t
                .to_vec1::<u32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()),
            DType::U8 => t.to_vec1::<u8>(),
            other => candle_core::bail!("unsupported dtype {other:?}"),
        });
        match bytes {
            Ok(b) => Cow::Owned(b),
            Err(e) => {
                if let Ok(mut slot) = self.error.lock() {
                    *slot = Some(candle_reason(&e));
                }
                // Placeholder bytes of the right length; the file is discarded.
                Cow::Owned(vec![0; self.data_len()])
            }
        }
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()
    }
}

/// Converts the checkpoint in `input` to safetensors in `output` (which must not exist or
/// be empty). `dtype`: `None` keeps each tensor's dtype. Non-weight files are copied.
/// Returns the number of tensors written.
pub fn convert(
    input: &Path,
    output: &Path,
    dtype: Option<DType>,
    on_progress: &mut dyn FnMut(usize, usize),
) -> Result<usize, CheckpointError> {
    crate::write_dir_atomically(output, |tmp| {
        write_converted(input, tmp, dtype, &HashMap::new(), None, on_progress)
    })
}

fn io(p: &Path) -> impl Fn(std::io::Error) -> CheckpointError {
    let p = p.display().to_string();
    move |e| CheckpointError::Io {
        path: p.clone(),
        reason: e.to_string(),
    }
}

/// Every tensor of the weights in `input`, by source shard, read lazily.
fn index(
    input: &Path,
    dtype: Option<DType>,
    transform: Option<&Transform>,
) -> Result<(crate::weights::WeightFiles, Vec<Vec<Lazy>>), CheckpointError> {
    let files = find_weights(input)?;
    let weight_err = |f: &Path| {
        let f = f.display().to_string();
        move |e: candle_core::Error| CheckpointError::Weights {
            file: f.clone(),
            reason: candle_reason(&e),
        }
    };
    // Index every tensor by source shard, keeping the source's shard grouping.
    let mut shards: Vec<Vec<Lazy>> = Vec::new();
    for f in &files.files {
        let (mut names, source): (Vec<(String, Vec<usize>, DType)>, Source) = match files.format {
            WeightFormat::PytorchPickle => {
                let p = std::sync::Arc::new(crate::torch_pickle::open(f).map_err(weight_err(f))?);
                let names = p
                    .tensor_infos()
                    .iter()
                    .filter(|(n, _)| !n.ends_with("rotary_emb.inv_freq"))
                    .map(|(n, i)| (n.clone(), i.layout.shape().dims().to_vec(), i.dtype))
                    .collect();
                (names, Source::Pickle(p))
            }
            WeightFormat::Safetensors => {
                let st = std::sync::Arc::new(crate::weights::SafetensorsFiles::open(
                    std::slice::from_ref(f),
                )?);
                (st.tensor_list(), Source::Safetensors(st))
            }
        };
        names.sort_by(|a, b| a.0.cmp(&b.0));
        let lazies: Vec<Lazy> = names
            .into_iter()
            .map(|(name, shape, src)| Lazy {
                out_name: name.clone(),
                name,
                shape,
                // Only floating-point weights change dtype; integer buffers keep theirs.
                dtype: if src.is_float() {
                    dtype.unwrap_or(src)
                } else {
                    src
                },
                source: source.clone(),
                transform: transform.cloned(),
                error: Default::default(),
            })
            .collect();
        shards.push(lazies);
    }
    Ok((files, shards))
}

/// Writes `shards` as `model[-i-of-n].safetensors` (+ index) in `tmp`, reading each tensor
/// when the writer reaches it. `input` names the source in errors.
fn write_shards(
    input: &Path,
    tmp: &Path,
    shards: &[Vec<Lazy>],
    on_progress: &mut dyn FnMut(usize, usize),
) -> Result<usize, CheckpointError> {
    let n = shards.len();
    let total: usize = shards.iter().map(Vec::len).sum();
    let mut done = 0;
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        let path = tmp.join(&file);
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(
            shard.iter().map(|t| (t.out_name.clone(), t)),
            Some(meta),
            &path,
        )
        .map_err(|e| CheckpointError::Weights {
            file: path.display().to_string(),
            reason: e.to_string(),
        })?;
        for t in shard {
            if let Some(reason) = t.error.lock().ok().and_then(|mut e| e.take()) {
                return Err(CheckpointError::Weights {
                    file: format!("{} (tensor {})", input.display(), t.name),
                    reason,
                });
            }
            weight_map.insert(t.out_name.clone(), json!(file));
        }
        done += shard.len();
        on_progress(done, total);
    }
    if n > 1 {
        let index = json!({"metadata": {}, "weight_map": weight_map});
        let p = tmp.join("model.safetensors.index.json");
        std::fs::write(&p, serde_json::to_string_pretty(&index).unwrap_or_default())
            .map_err(io(&p))?;
    }
    Ok(total)
}

/// [`convert`] into an existing directory `tmp`, with `replace` (stored name → tensor)
/// taking the place of the stored tensors of those names.
pub(crate) fn write_converted(
    input: &Path,
    tmp: &Path,
    dtype: Option<DType>,
    replace: &HashMap<String, Tensor>,
    transform: Option<&Transform>,
    on_progress: &mut dyn FnMut(usize, usize),
) -> Result<usize, CheckpointError> {
    let (files, mut shards) = index(input, dtype, transform)?;
    for (f, lazies) in files.files.iter().zip(shards.iter_mut()) {
        for l in lazies.iter_mut() {
            if let Some(t) = replace.get(&l.name) {
                if t.dims() != l.shape.as_slice() {
                    return Err(CheckpointError::Weights {
                        file: f.display().to_string(),
                        reason: format!(
                            "{}: new shape {:?} does not match the stored {:?}",
                            l.name,
                            t.dims(),
                            l.shape
                        ),
                    });
                }
                l.source = Source::Memory(t.clone());
            }
        }
    }
    let stored: std::collections::HashSet<&str> =
        shards.iter().flatten().map(|l| l.name.as_str()).collect();
    if let Some(missing) = replace.keys().find(|n| !stored.contains(n.as_str())) {
        return Err(CheckpointError::Weights {
            file: input.display().to_string(),
            reason: format!("{missing}: no such tensor to replace"),
        });
    }
    {
        // Copy everything that is not a weight file or index.
        for entry in std::fs::read_dir(input).map_err(io(input))? {
            let entry = entry.map_err(io(input))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_weights = files
                .files
                .iter()
                .any(|f| f.file_name() == Some(entry.file_name().as_os_str()))
                || name.ends_with(".bin.index.json")
                || name == "model.safetensors.index.json";
            if entry.file_type().map_err(io(input))?.is_file() && !is_weights {
                std::fs::copy(entry.path(), tmp.join(&name)).map_err(io(&entry.path()))?;
            }
        }
        let total = write_shards(input, tmp, &shards, on_progress)?;
        if let Some(d) = dtype {
            // Keep config.json's torch_dtype truthful.
            let cfg_path = tmp.join("config.json");
            if let Ok(text) = std::fs::read_to_string(&cfg_path) {
                if let Ok(mut cfg) = serde_json::from_str::<serde_json::Value>(&text) {
                    let name = match d {
                        DType::F16 => "float16",
                        DType::BF16 => "bfloat16",
                        _ => "float32",
                    };
                    cfg["torch_dtype"] = json!(name);
                    std::fs::write(
                        &cfg_path,
                        serde_json::to_string_pretty(&cfg).unwrap_or(text),
                    )
                    .map_err(io(&cfg_path))?;
                }
            }
        }
        Ok(total)
    }
}

/// `extract_mm_projector` (llava-spec §9): the projector's tensors (and, with
/// `with_embeddings`, June-2023's `embed_tokens` rows that stage 1 also trained) written to
/// a safetensors file under their full names. Reads only those tensors.
pub fn extract_projector(
    input: &Path,
    output: &Path,
    with_embeddings: bool,
) -> Result<Vec<String>, CheckpointError> {
    let files = find_weights(input)?;
    let wanted = |n: &str| {
        n.contains("mm_projector")
            || n.contains("multi_modal_projector")
            || (with_embeddings && (n.contains("embed_tokens") || n.contains("transformer.wte")))
    };
    let names: Vec<&String> = files.names.iter().filter(|n| wanted(n)).collect();
    if names.is_empty() {
        return Err(CheckpointError::Invalid {
            file: input.display().to_string(),
            what: "checkpoint: it has no projector (mm_projector) tensors".into(),
        });
    }
    let mut tensors = std::collections::HashMap::new();
    for f in &files.files {
        let err = |e: candle_core::Error| CheckpointError::Weights {
            file: f.display().to_string(),
            reason: candle_reason(&e),
        };
        match files.format {
            WeightFormat::PytorchPickle => {
                let p = crate::torch_pickle::open(f).map_err(err)?;
                for n in &names {
                    if let Some(t) = crate::torch_pickle::get(&p, n).map_err(err)? {
                        tensors.insert((*n).clone(), t);
                    }
                }
            }
            WeightFormat::Safetensors => {
                let st = crate::weights::SafetensorsFiles::open(std::slice::from_ref(f))?;
                let present: std::collections::HashSet<String> =
                    st.tensor_list().into_iter().map(|t| t.0).collect();
                for n in names.iter().filter(|n| present.contains(n.as_str())) {
                    tensors.insert((*n).clone(), st.read(n).map_err(err)?);
                }
            }
        }
    }
    if output.extension().is_some_and(|e| e == "bin") {
        // A PyTorch pickle, as LLaVA's `extract_mm_projector.py` writes it.
        let mut sorted: Vec<(String, Tensor)> = tensors.into_iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        crate::torch_pickle::save(output, &sorted)?;
        return Ok(sorted.into_iter().map(|(n, _)| n).collect());
    }
    let tmp = output.with_extension("tmp");
    candle_core::safetensors::save(&tensors, &tmp).map_err(|e| CheckpointError::Weights {
        file: tmp.display().to_string(),
        reason: candle_reason(&e),
    })?;
    std::fs::rename(&tmp, output).map_err(|e| CheckpointError::Io {
        path: output.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut keys: Vec<String> = tensors.into_keys().collect();
    keys.sort();
    Ok(keys)
}

/// A LLaVA-1.5 checkpoint in its original layout (language model + projector, the CLIP tower
/// in its own directory) rewritten in transformers' llava-hf layout
/// (`LlavaForConditionalGeneration`), as transformers' `convert_llava_weights_to_hf` does:
/// the tower moves inside under `vision_tower.`, the projector becomes
/// `multi_modal_projector.linear_{1,2}`, the tokenizer gains `<image>` and `<pad>`, and the
/// embedding and output rows grow to a multiple of 64, the new rows set to the mean of the
/// old ones (the reference adds a little random noise; the mean keeps this deterministic).
/// config.json keeps the source's conversation template, so kollava answers as before; the
/// repo also gets what transformers' `AutoProcessor` reads (`processor_config.json`, an
/// image processor that fits images as the source did, the template as `chat_template`).
pub fn to_llava_hf(
    ckpt: &crate::Checkpoint,
    output: &Path,
    on_progress: &mut dyn FnMut(usize, usize),
) -> Result<usize, CheckpointError> {
    use kollava_model::config::{FeatureSelect, ProjectorKind};
    let unsupported = |what: String| CheckpointError::Unsupported {
        file: ckpt.dir.display().to_string(),
        what,
    };
    if ckpt.family.layout != crate::Layout::Llava15 {
        return Err(unsupported(format!(
            "conversion of a {} checkpoint to llava-hf (LLaVA-1.5-style original checkpoints convert)",
            ckpt.family.name()
        )));
    }
    if !matches!(ckpt.config.projector, ProjectorKind::Mlp { depth: 2, .. }) {
        return Err(unsupported(
            "projector for llava-hf, which has only the two-layer MLP (mlp2x_gelu)".into(),
        ));
    }
    let Some(tower_dir) = &ckpt.vision_dir else {
        return Err(unsupported("checkpoint without a separate tower".into()));
    };
    let tok = ckpt.tokenizer()?;
    if !ckpt.dir.join("tokenizer.model").is_file() {
        return Err(unsupported("checkpoint without tokenizer.model".into()));
    }
    if tok.token_to_id("<image>").is_some() {
        return Err(unsupported(
            "tokenizer: it already has an <image> token".into(),
        ));
    }
    let d = &ckpt.config.decoder;
    let image_id = tok.vocab_size().max(d.vocab_size) as u32;
    let new_vocab = (image_id as usize + 2).next_multiple_of(64);
    let grow: Transform = std::sync::Arc::new(move |name: &str, t: Tensor| {
        if name != "model.embed_tokens.weight" && name != "lm_head.weight" {
            return Ok(t);
        }
        let (rows, h) = t.dims2()?;
        let mean = t.mean_keepdim(0)?;
        Tensor::cat(
            &[t, mean.broadcast_as((new_vocab - rows, h))?.contiguous()?],
            0,
        )
    });
    let read_json = |p: &Path| -> Result<serde_json::Value, CheckpointError> {
        let text = std::fs::read_to_string(p).map_err(|e| CheckpointError::Io {
            path: p.display().to_string(),
            reason: e.to_string(),
        })?;
        serde_json::from_str(&text).map_err(|e| CheckpointError::Json {
            file: p.display().to_string(),
            reason: e.to_string(),
        })
    };
    let tower_cfg = read_json(&tower_dir.join("config.json"))?;
    let vision_config = tower_cfg.get("vision_config").cloned().unwrap_or(tower_cfg);
    let write_json = |p: &Path, v: &serde_json::Value| {
        std::fs::write(p, serde_json::to_string_pretty(v).unwrap_or_default()).map_err(|e| {
            CheckpointError::Io {
                path: p.display().to_string(),
                reason: e.to_string(),
            }
        })
    };
    crate::write_dir_atomically(output, |tmp| {
        let (_, llm) = index(&ckpt.dir, None, Some(&grow))?;
        let (_, tower) = index(tower_dir, None, None)?;
        let mut shards = Vec::new();
        for shard in llm {
            let mut kept = Vec::new();
            for mut l in shard {
                if l.name.starts_with("model.vision_tower.") {
                    continue;
                }
                if l.name == "model.embed_tokens.weight" || l.name == "lm_head.weight" {
                    l.shape[0] = new_vocab;
                }
                l.out_name = crate::weights::HF_LEGACY.llm_key(&l.name);
                kept.push(l);
            }
            shards.push(kept);
        }
        for shard in tower {
            let kept: Vec<Lazy> = shard
                .into_iter()
                .filter(|l| l.name.starts_with("vision_model."))
                .map(|mut l| {
                    l.out_name = format!("vision_tower.{}", l.name);
                    l
                })
                .collect();
            shards.push(kept);
        }
        let n = write_shards(&ckpt.dir, tmp, &shards, on_progress)?;

        let src = read_json(&ckpt.dir.join("config.json"))?;
        let mut text = json!({
            "model_type": if ckpt.family.llm == crate::Llm::Mistral { "mistral" } else { "llama" },
            "hidden_size": d.hidden_size, "intermediate_size": d.intermediate_size,
            "num_hidden_layers": d.num_hidden_layers, "num_attention_heads": d.num_attention_heads,
            "num_key_value_heads": d.num_key_value_heads, "vocab_size": new_vocab,
            "max_position_embeddings": d.max_position_embeddings, "rms_norm_eps": d.rms_norm_eps,
            "rope_theta": d.rope_theta, "hidden_act": "silu", "tie_word_embeddings": d.tie_word_embeddings,
        });
        if let Some(w) = d.sliding_window {
            text["sliding_window"] = json!(w);
        }
        let layers = ckpt.config.vision.num_hidden_layers as i64;
        let cfg = json!({
            "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "ignore_index": -100, "image_token_index": image_id, "pad_token_id": image_id + 1,
            "projector_hidden_act": "gelu",
            "vision_feature_layer": ckpt.config.vision_layers_used as i64 - layers - 1,
            "vision_feature_select_strategy": match ckpt.config.feature_select {
                FeatureSelect::Patch => "default",
                FeatureSelect::ClsPatch => "full",
            },
            "text_config": text, "vision_config": vision_config, "vocab_size": new_vocab,
            "torch_dtype": src.get("torch_dtype").cloned().unwrap_or(json!("float16")),
            "kollava_template": ckpt.default_template(),
            "kollava_original_tokenization": true,
        });
        write_json(&tmp.join("config.json"), &cfg)?;
        // The tokenizer: the source's files, with <image> and <pad> added: the slow tokenizer
        // (tokenizer.model) with the added tokens in tokenizer_config.json, and the fast one.
        for f in ["tokenizer.model", "generation_config.json"] {
            let p = ckpt.dir.join(f);
            if p.is_file() {
                std::fs::copy(&p, tmp.join(f)).map_err(|e| CheckpointError::Io {
                    path: p.display().to_string(),
                    reason: e.to_string(),
                })?;
            }
        }
        // The processor: the tower's CLIP image processor, or for `pad` transformers'
        // `LlavaImageProcessor` with `do_pad` (pads to a square with the mean colour as
        // LLaVA's `expand2square` does, then the same resize and crop); and the
        // `LlavaProcessor` settings `AutoProcessor` needs.
        let pre = tower_dir.join("preprocessor_config.json");
        let mut image_processor = if pre.is_file() {
            read_json(&pre)?
        } else {
            json!({"image_processor_type": "CLIPImageProcessor"})
        };
        if ckpt.aspect == kollava_inputs::image::AspectMode::Pad {
            image_processor["image_processor_type"] = json!("LlavaImageProcessor");
            image_processor["do_pad"] = json!(true);
        }
        image_processor["processor_class"] = json!("LlavaProcessor");
        write_json(&tmp.join("preprocessor_config.json"), &image_processor)?;
        write_json(
            &tmp.join("processor_config.json"),
            &json!({
                "processor_class": "LlavaProcessor", "image_token": "<image>",
                "patch_size": ckpt.config.vision.patch_size,
                "vision_feature_select_strategy": cfg["vision_feature_select_strategy"],
                "num_additional_image_tokens": 1,
            }),
        )?;
        // The conversation template, for `apply_chat_template`. The model was trained on
        // LLaVA's tokenization: the text after an image tokenized on its own, which puts a
        // `▁` before its `\n`; tokenized as one string (as transformers' processor does),
        // `<image> \n` gives that `▁`, and so the source's very tokens.
        let chat_template = kollava_inputs::template::Template::by_name(ckpt.default_template())
            .and_then(|t| t.jinja("<image> \n"));
        if let Some(jinja) = &chat_template {
            let p = tmp.join("chat_template.jinja");
            std::fs::write(&p, jinja).map_err(|e| CheckpointError::Io {
                path: p.display().to_string(),
                reason: e.to_string(),
            })?;
        }
        let tc_path = ckpt.dir.join("tokenizer_config.json");
        let mut tc = if tc_path.is_file() {
            read_json(&tc_path)?
        } else {
            json!({})
        };
        let entry = |content: &str| {
            json!({"content": content, "lstrip": false, "normalized": false, "rstrip": false,
                   "single_word": false, "special": true})
        };
        if !tc["added_tokens_decoder"].is_object() {
            tc["added_tokens_decoder"] = json!({});
        }
        tc["added_tokens_decoder"][image_id.to_string()] = entry("<image>");
        tc["added_tokens_decoder"][(image_id + 1).to_string()] = entry("<pad>");
        tc["pad_token"] = json!("<pad>");
        if let Some(jinja) = chat_template {
            // Where transformers 4.x reads it (5.x reads chat_template.jinja).
            tc["chat_template"] = json!(jinja);
        }
        write_json(&tmp.join("tokenizer_config.json"), &tc)?;
        // The fast tokenizer as transformers would build it from tokenizer.model, so that
        // loading needs neither sentencepiece nor protobuf.
        let spm_path = ckpt.dir.join("tokenizer.model");
        let spm = std::fs::read(&spm_path).map_err(|e| CheckpointError::Io {
            path: spm_path.display().to_string(),
            reason: e.to_string(),
        })?;
        let vocab = kollava_inputs::tokenizer::sentencepiece::SentencePiece::from_bytes(
            &spm,
            &spm_path.display().to_string(),
        )?
        .vocab();
        write_json(
            &tmp.join("tokenizer.json"),
            &kollava_inputs::tokenizer::hf_json::llama_tokenizer_json(
                &vocab,
                &[(image_id, "<image>"), (image_id + 1, "<pad>")],
            ),
        )?;
        let sm_path = ckpt.dir.join("special_tokens_map.json");
        let mut sm = if sm_path.is_file() {
            read_json(&sm_path)?
        } else {
            json!({})
        };
        sm["pad_token"] = json!("<pad>");
        write_json(&tmp.join("special_tokens_map.json"), &sm)?;
        Ok(n)
    })
}

/// The canonical name of a tensor stored in either llava-hf layout, and whether it belongs
/// to the tower (`vision_model.*`).
fn hf_canonical(stored: &str) -> Option<(bool, String)> {
    let s = stored.strip_prefix("model.").filter(|r| {
        r.starts_with("language_model.")
            || r.starts_with("multi_modal_projector.")
            || r.starts_with("vision_tower.")
    });
    let s = s.unwrap_or(stored);
    if let Some(rest) = s.strip_prefix("vision_tower.") {
        // transformers 5.x writes the tower without its `vision_model.` level.
        return Some((
            true,
            match rest.starts_with("vision_model.") {
                true => rest.to_string(),
                false => format!("vision_model.{rest}"),
            },
        ));
    }
    if let Some(rest) = s.strip_prefix("multi_modal_projector.linear_") {
        let (k, tail) = rest.split_once('.')?;
        let k: usize = k.parse().ok()?;
        return Some((false, format!("model.mm_projector.{}.{tail}", 2 * (k - 1))));
    }
    if let Some(rest) = s.strip_prefix("language_model.") {
        // Legacy: `language_model.model.*`; modern: `model.language_model.*` (the prefix
        // stripped above leaves the layer names bare).
        return Some((
            false,
            if rest.starts_with("model.") || rest.starts_with("lm_head.") {
                rest.to_string()
            } else {
                format!("model.{rest}")
            },
        ));
    }
    (stored == "lm_head.weight").then(|| (false, stored.to_string()))
}

/// The inverse of [`to_llava_hf`]: a llava-hf checkpoint rewritten in LLaVA's original
/// layout (`LlavaLlamaForCausalLM`/`LlavaMistralForCausalLM` with `mm_*` keys), the tower
/// in its own `vision_tower/` directory. The vocabulary keeps its rows (`<image>` and
/// `<pad>` stay in the tokenizer; the original code splices features at the placeholder
/// whatever its id), the image processor's fitting is kept (`do_pad`: `image_aspect_ratio:
/// pad`; llava-hf's centre crop: `square`), and so is the conversation template.
pub fn to_llava_original(
    ckpt: &crate::Checkpoint,
    output: &Path,
    on_progress: &mut dyn FnMut(usize, usize),
) -> Result<usize, CheckpointError> {
    use kollava_model::config::FeatureSelect;
    if ckpt.family.layout != crate::Layout::LlavaHf {
        return Err(CheckpointError::Unsupported {
            file: ckpt.dir.display().to_string(),
            what: format!(
                "conversion of a {} checkpoint to the original layout (llava-hf checkpoints convert)",
                ckpt.family.name()
            ),
        });
    }
    let cfg_path = ckpt.dir.join("config.json");
    let raw: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&cfg_path).map_err(io(&cfg_path))?,
    )
    .map_err(|e| CheckpointError::Json {
        file: cfg_path.display().to_string(),
        reason: e.to_string(),
    })?;
    let write_json = |p: &Path, v: &serde_json::Value| {
        std::fs::write(p, serde_json::to_string_pretty(v).unwrap_or_default()).map_err(io(p))
    };
    crate::write_dir_atomically(output, |tmp| {
        let (_, shards) = index(&ckpt.dir, None, None)?;
        let (mut llm, mut tower) = (Vec::new(), Vec::new());
        for shard in shards {
            let (mut l, mut t) = (Vec::new(), Vec::new());
            for mut lazy in shard {
                match hf_canonical(&lazy.name) {
                    Some((true, name)) => {
                        lazy.out_name = name;
                        t.push(lazy);
                    }
                    Some((false, name)) => {
                        lazy.out_name = name;
                        l.push(lazy);
                    }
                    None => {}
                }
            }
            llm.push(l);
            tower.push(t);
        }
        let tower_dir = tmp.join("vision_tower");
        std::fs::create_dir_all(&tower_dir).map_err(io(&tower_dir))?;
        let tower: Vec<Vec<Lazy>> = vec![tower.into_iter().flatten().collect()];
        let n = write_shards(&ckpt.dir, tmp, &llm, on_progress)?
            + write_shards(&ckpt.dir, &tower_dir, &tower, &mut |_, _| {})?;

        let vision = raw["vision_config"].clone();
        write_json(
            &tower_dir.join("config.json"),
            &json!({"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "vision_config": vision}),
        )?;
        let mut cfg = raw["text_config"].clone();
        if !cfg.is_object() {
            cfg = json!({});
        }
        let mistral = cfg["model_type"] == "mistral";
        let v = &ckpt.config.vision;
        let extra = json!({
            "architectures": [if mistral { "LlavaMistralForCausalLM" } else { "LlavaLlamaForCausalLM" }],
            "model_type": if mistral { "llava_mistral" } else { "llava" },
            "vocab_size": ckpt.config.decoder.vocab_size,
            "mm_vision_tower": "vision_tower",
            "mm_hidden_size": v.hidden_size,
            "mm_projector_type": format!("mlp{}x_gelu", match ckpt.config.projector {
                kollava_model::config::ProjectorKind::Mlp { depth, .. } => depth,
                _ => 1,
            }),
            "mm_vision_select_layer": ckpt.config.vision_layers_used as i64 - v.num_hidden_layers as i64 - 1,
            "mm_vision_select_feature": match ckpt.config.feature_select {
                FeatureSelect::Patch => "patch",
                FeatureSelect::ClsPatch => "cls_patch",
            },
            // LlavaImageProcessor's `do_pad` is LLaVA's `pad`; llava-hf's CLIP processor
            // center-crops (`square`).
            "image_aspect_ratio": match ckpt.aspect {
                kollava_inputs::image::AspectMode::Pad => "pad",
                _ => "square",
            },
            "mm_use_im_start_end": false,
            "mm_use_im_patch_token": false,
            "torch_dtype": raw.get("torch_dtype").cloned().unwrap_or(json!("float16")),
            "kollava_template": ckpt.default_template(),
        });
        for (k, val) in extra.as_object().into_iter().flatten() {
            cfg[k] = val.clone();
        }
        write_json(&tmp.join("config.json"), &cfg)?;
        for f in [
            "tokenizer.json",
            "tokenizer.model",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "added_tokens.json",
            "generation_config.json",
        ] {
            let p = ckpt.dir.join(f);
            if p.is_file() {
                std::fs::copy(&p, tmp.join(f)).map_err(io(&p))?;
            }
        }
        // The tower's processor as LLaVA's code loads it (`CLIPImageProcessor`; the padding
        // is `image_aspect_ratio`'s).
        let pre = ckpt.dir.join("preprocessor_config.json");
        if pre.is_file() {
            let text = std::fs::read_to_string(&pre).map_err(io(&pre))?;
            let mut p: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| CheckpointError::Json {
                    file: pre.display().to_string(),
                    reason: e.to_string(),
                })?;
            if let Some(fields) = p.as_object_mut() {
                fields.remove("do_pad");
                fields.remove("processor_class");
                fields.insert("image_processor_type".into(), json!("CLIPImageProcessor"));
            }
            write_json(&tower_dir.join("preprocessor_config.json"), &p)?;
        }
        Ok(n)
    })
}
