//! Weight files: sharded or single safetensors (memory-mapped) and PyTorch zip pickles
//! (`pytorch_model-*.bin`), with the index checked before anything is read. Every family's
//! key names are mapped onto one canonical set (the original LLaVA layout: `model.*`,
//! `lm_head.weight`, `model.mm_projector.*`, and `vision_model.*` for the tower) through
//! `VarBuilder::rename_f`, so the model code knows one layout.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::{candle_reason, CheckpointError};

/// Which container the tensors are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    Safetensors,
    PytorchPickle,
}

/// The weight files of one directory.
#[derive(Debug, Clone)]
pub struct WeightFiles {
    pub format: WeightFormat,
    pub files: Vec<PathBuf>,
    /// Every tensor name, from the index or the files' headers.
    pub names: BTreeSet<String>,
}

/// The shard files an index lists (each checked to exist) and its `weight_map`.
fn read_index(
    path: &Path,
    dir: &Path,
) -> Result<(Vec<PathBuf>, BTreeMap<String, String>), CheckpointError> {
    let text = std::fs::read_to_string(path).map_err(|e| CheckpointError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| CheckpointError::Json {
            file: path.display().to_string(),
            reason: e.to_string(),
        })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| CheckpointError::MissingKey {
            file: path.display().to_string(),
            key: "weight_map".into(),
        })?;
    let mut files = BTreeSet::new();
    let mut names = BTreeMap::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| CheckpointError::Invalid {
            file: path.display().to_string(),
            what: format!("weight_map entry {name:?} (not a file name)"),
        })?;
        names.insert(name.clone(), file.to_string());
        files.insert(file.to_string());
    }
    let mut out = Vec::new();
    for f in files {
        let p = dir.join(&f);
        if !p.is_file() {
            return Err(CheckpointError::MissingShard {
                shard: p.display().to_string(),
                index: path.display().to_string(),
            });
        }
        out.push(p);
    }
    Ok((out, names))
}

impl WeightFiles {
    /// One weight file (`.safetensors` or a PyTorch `.bin`).
    pub fn single(path: &Path) -> Result<WeightFiles, CheckpointError> {
        if !path.is_file() {
            return Err(CheckpointError::Io {
                path: path.display().to_string(),
                reason: "no such file".into(),
            });
        }
        if path.extension().and_then(|e| e.to_str()) == Some("safetensors") {
            let names = safetensors_names(path)?;
            return Ok(WeightFiles {
                format: WeightFormat::Safetensors,
                files: vec![path.to_path_buf()],
                names,
            });
        }
        let names = crate::torch_pickle::tensor_info(path)
            .map_err(|e| CheckpointError::Weights {
                file: path.display().to_string(),
                reason: candle_reason(&e),
            })?
            .into_iter()
            .map(|t| t.name)
            .collect();
        Ok(WeightFiles {
            format: WeightFormat::PytorchPickle,
            files: vec![path.to_path_buf()],
            names,
        })
    }
}

/// Finds the weights of `dir`: an index (safetensors preferred) or a single file.
pub fn find_weights(dir: &Path) -> Result<WeightFiles, CheckpointError> {
    let st_index = dir.join("model.safetensors.index.json");
    if st_index.is_file() {
        let (files, map) = read_index(&st_index, dir)?;
        // Headers are cheap to read; a tensor the index places in a shard that lacks it
        // would otherwise surface only as "cannot find tensor", without the shard's name.
        let mut headers = HashMap::new();
        for (name, shard) in &map {
            let path = dir.join(shard);
            let held = match headers.entry(shard) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => e.insert(safetensors_names(&path)?),
            };
            if !held.contains(name) {
                return Err(CheckpointError::MissingTensor {
                    key: name.clone(),
                    file: path.display().to_string(),
                    index: st_index.display().to_string(),
                });
            }
        }
        return Ok(WeightFiles {
            format: WeightFormat::Safetensors,
            files,
            names: map.into_keys().collect(),
        });
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        let names = safetensors_names(&single)?;
        return Ok(WeightFiles {
            format: WeightFormat::Safetensors,
            files: vec![single],
            names,
        });
    }
    let pt_index = dir.join("pytorch_model.bin.index.json");
    if pt_index.is_file() {
        let (files, map) = read_index(&pt_index, dir)?;
        return Ok(WeightFiles {
            format: WeightFormat::PytorchPickle,
            files,
            names: map.into_keys().collect(),
        });
    }
    let single = dir.join("pytorch_model.bin");
    if single.is_file() {
        let names = crate::torch_pickle::tensor_info(&single)
            .map_err(|e| CheckpointError::Weights {
                file: single.display().to_string(),
                reason: candle_reason(&e),
            })?
            .into_iter()
            .map(|t| t.name)
            .collect();
        return Ok(WeightFiles {
            format: WeightFormat::PytorchPickle,
            files: vec![single],
            names,
        });
    }
    Err(CheckpointError::NoWeights {
        dir: dir.display().to_string(),
    })
}

/// Where one tensor's bytes are in a safetensors file.
#[derive(Debug, Clone)]
struct TensorLoc {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

fn safetensors_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "U32" => DType::U32,
        "U8" => DType::U8,
        _ => return None,
    })
}

/// Reads a safetensors header (never the data) and checks every tensor lies in the file.
fn read_header(
    path: &Path,
    file_index: usize,
) -> Result<HashMap<String, TensorLoc>, CheckpointError> {
    use std::io::Read;
    let bad = |reason: String| CheckpointError::Weights {
        file: path.display().to_string(),
        reason,
    };
    let mut f = std::fs::File::open(path).map_err(|e| CheckpointError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let file_len = f.metadata().map_err(|e| bad(e.to_string()))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| bad("truncated: no safetensors header".into()))?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 || 8 + n > file_len {
        return Err(bad(format!(
            "header of {n} bytes does not fit in a file of {file_len} bytes"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("bad header: {e}")))?;
    let entries = json
        .as_object()
        .ok_or_else(|| bad("bad header: not an object".into()))?;
    let data_start = 8 + n;
    let mut out = HashMap::new();
    for (name, v) in entries {
        if name == "__metadata__" {
            continue;
        }
        let dtype_name = v["dtype"].as_str().unwrap_or("?");
        let dtype = safetensors_dtype(dtype_name)
            .ok_or_else(|| bad(format!("{name}: unsupported dtype {dtype_name}")))?;
        let shape: Vec<usize> = v["shape"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64().map(|x| x as usize))
                    .collect()
            })
            .unwrap_or_default();
        let offs: Vec<u64> = v["data_offsets"]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect())
            .unwrap_or_default();
        let [begin, end] = offs[..] else {
            return Err(bad(format!("{name}: bad data_offsets")));
        };
        let numel: usize = shape.iter().product();
        if end < begin
            || (end - begin) as usize != numel * dtype.size_in_bytes()
            || data_start + end > file_len
        {
            return Err(bad(format!("{name}: data {begin}..{end} does not match its shape {shape:?} or the file is truncated ({file_len} bytes)")));
        }
        out.insert(
            name.clone(),
            TensorLoc {
                file: file_index,
                dtype,
                shape,
                start: data_start + begin,
                end: data_start + end,
            },
        );
    }
    Ok(out)
}

fn safetensors_names(path: &Path) -> Result<BTreeSet<String>, CheckpointError> {
    Ok(read_header(path, 0)?.into_keys().collect())
}

/// A `VarBuilder` backend that reads each tensor with a positioned read and converts it
/// on the spot. Unlike a memory map, the raw bytes never stay resident: loading peaks at
/// the final model plus one tensor, which keeps f16 → f32 upcasts inside the memory budget.
pub(crate) struct SafetensorsFiles {
    files: Vec<(PathBuf, std::fs::File)>,
    index: HashMap<String, TensorLoc>,
}

impl SafetensorsFiles {
    /// `(name, shape, dtype)` of every tensor.
    pub(crate) fn tensor_list(&self) -> Vec<(String, Vec<usize>, DType)> {
        self.index
            .iter()
            .map(|(n, l)| (n.clone(), l.shape.clone(), l.dtype))
            .collect()
    }

    /// One tensor in its stored dtype, on the CPU.
    pub(crate) fn read(&self, name: &str) -> candle_core::Result<Tensor> {
        use candle_nn::var_builder::SimpleBackend;
        let dtype = self.index.get(name).map_or(DType::F32, |l| l.dtype);
        self.get_unchecked(name, dtype, &Device::Cpu)
    }

    pub(crate) fn open(paths: &[PathBuf]) -> Result<Self, CheckpointError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            index.extend(read_header(p, i)?);
            let f = std::fs::File::open(p).map_err(|e| CheckpointError::Io {
                path: p.display().to_string(),
                reason: e.to_string(),
            })?;
            files.push((p.clone(), f));
        }
        Ok(Self { files, index })
    }
}

impl candle_nn::var_builder::SimpleBackend for SafetensorsFiles {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            }
            .bt());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        use std::os::unix::fs::FileExt;
        let loc = self.index.get(name).ok_or_else(|| {
            candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }
            .bt()
        })?;
        let (path, file) = &self.files[loc.file];
        let mut buf = vec![0u8; (loc.end - loc.start) as usize];
        file.read_exact_at(&mut buf, loc.start).map_err(|e| {
            candle_core::Error::Msg(format!("reading {name} from {}: {e}", path.display()))
        })?;
        let t = Tensor::from_raw_buffer(&buf, loc.dtype, &loc.shape, &Device::Cpu)?;
        drop(buf);
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
}

/// A `VarBuilder` over the files, converting every tensor to `dtype` when it is fetched.
/// Safetensors are read tensor by tensor (positioned reads, no resident copy); pickles are
/// read tensor by tensor too, each converted as it comes (one copy in memory), keeping only
/// names that start with `keep_prefix` (a CLIP repo's `text_model.*` is never needed) and
/// skipping the `rotary_emb.inv_freq` buffers old checkpoints carry.
pub fn var_builder(
    w: &WeightFiles,
    dtype: DType,
    device: &Device,
    keep_prefix: &str,
) -> Result<VarBuilder<'static>, CheckpointError> {
    var_builder_filtered(w, dtype, device, &|name: &str| {
        name.starts_with(keep_prefix).then_some(dtype)
    })
}

/// [`var_builder`] keeping the pickled tensors for which `keep` gives a dtype, stored in it
/// (a tower inside the checkpoint goes straight to the f32 it runs in, rather than through
/// a second copy in `dtype`). Safetensors convert on fetch, to the dtype asked then.
pub fn var_builder_filtered(
    w: &WeightFiles,
    dtype: DType,
    device: &Device,
    keep: &dyn Fn(&str) -> Option<DType>,
) -> Result<VarBuilder<'static>, CheckpointError> {
    match w.format {
        WeightFormat::Safetensors => {
            let backend = SafetensorsFiles::open(&w.files)?;
            Ok(VarBuilder::from_backend(
                Box::new(backend),
                dtype,
                device.clone(),
            ))
        }
        WeightFormat::PytorchPickle => {
            let mut map: HashMap<String, Tensor> = HashMap::new();
            for f in &w.files {
                let failed = |name: &str| {
                    let file = f.display().to_string();
                    let name = name.to_string();
                    move |e: candle_core::Error| CheckpointError::Weights {
                        file,
                        reason: if name.is_empty() {
                            candle_reason(&e)
                        } else {
                            format!("{name}: {}", candle_reason(&e))
                        },
                    }
                };
                let pth = crate::torch_pickle::open(f).map_err(failed(""))?;
                let mut names: Vec<(&String, DType)> = pth
                    .tensor_infos()
                    .keys()
                    .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
                    .filter_map(|n| Some((n, keep(n)?)))
                    .collect();
                names.sort_by_key(|(n, _)| *n);
                for (name, dtype) in names {
                    // One tensor at a time, converted before the next is read: peak memory
                    // stays at the converted model's size plus one raw tensor (a 7B f32
                    // shard read whole would add 10 GB).
                    let Some(t) = crate::torch_pickle::get(&pth, name).map_err(failed(name))?
                    else {
                        continue;
                    };
                    let t = t.to_dtype(dtype).map_err(failed(name))?;
                    map.insert(name.clone(), t);
                }
            }
            Ok(VarBuilder::from_tensors(map, dtype, device))
        }
    }
}

/// How one family's stored names relate to the canonical ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLayout {
    /// LLaVA's own layout (v0, 1.5, Mistral): canonical names as stored.
    Llava,
    /// llava-hf as the 2023 hub repos and transformers' `save_pretrained` (4.x, and 5.x
    /// again) name it: `language_model.model.*`, `language_model.lm_head`,
    /// `multi_modal_projector.linear_{1,2}`, `vision_tower.vision_model.*` — or, as
    /// transformers 5.x writes the tower, `vision_tower.*` without the `vision_model` level
    /// (`flat_tower`).
    HfLegacy { flat_tower: bool },
    /// llava-hf with the loaded model's paths (transformers 4.52-4.57 wrote these):
    /// `model.language_model.*`, `lm_head`, `model.multi_modal_projector.*`,
    /// `model.vision_tower.vision_model.*` (or `model.vision_tower.*`, `flat_tower`).
    HfModern { flat_tower: bool },
    /// LLaVA-MPT (`LlavaMPTForCausalLM`): `transformer.wte`, `transformer.blocks.N.{norm_1,
    /// attn.Wqkv, attn.out_proj, norm_2, ffn.up_proj, ffn.down_proj}`, `transformer.norm_f`,
    /// `transformer.mm_projector`; no `lm_head` (tied).
    Mpt,
}

/// [`KeyLayout::HfLegacy`] with the tower under `vision_model`: what kollava writes.
pub const HF_LEGACY: KeyLayout = KeyLayout::HfLegacy { flat_tower: false };

impl KeyLayout {
    pub fn detect(names: &BTreeSet<String>) -> KeyLayout {
        // The tower's embeddings are stored right under the tower, with no `vision_model.`.
        let flat =
            |tower: &str| names.contains(&format!("{tower}embeddings.patch_embedding.weight"));
        if names.contains("transformer.wte.weight") {
            KeyLayout::Mpt
        } else if names.iter().any(|n| n.starts_with("language_model.")) {
            KeyLayout::HfLegacy {
                flat_tower: flat("vision_tower."),
            }
        } else if names.iter().any(|n| n.starts_with("model.language_model.")) {
            KeyLayout::HfModern {
                flat_tower: flat("model.vision_tower."),
            }
        } else {
            KeyLayout::Llava
        }
    }

    /// Why `names` fit no layout, or `None` when they fit this one (its token embedding
    /// table is where it puts it): the layouts tried, and the first name none of them
    /// places (`detect` falls back to LLaVA's own layout, so without this check an unknown
    /// layout surfaced as one missing LLaVA tensor).
    pub fn mismatch(self, names: &BTreeSet<String>) -> Option<String> {
        if names.contains(&self.llm_key("model.embed_tokens.weight")) {
            return None;
        }
        const KNOWN: [&str; 7] = [
            "transformer.",
            "model.",
            "lm_head.",
            "language_model.",
            "multi_modal_projector.",
            "vision_tower.",
            "vision_model.",
        ];
        let odd = names
            .iter()
            .find(|n| !KNOWN.iter().any(|p| n.starts_with(p)))
            .map_or_else(
                || "none: every name has a known prefix, but the embedding table is missing".into(),
                |n| format!("{n:?}"),
            );
        Some(format!(
            "tensor names: no layout fits (tried LLaVA's own, `model.embed_tokens.weight`; \
             llava-hf as the hub and transformers' save_pretrained write it, \
             `language_model.model.embed_tokens.weight`; llava-hf with the loaded model's \
             paths, `model.language_model.embed_tokens.weight`; LLaVA-MPT, \
             `transformer.wte.weight`); the first name none of them places: {odd}"
        ))
    }

    /// Canonical decoder/projector name → stored name.
    pub fn llm_key(self, canonical: &str) -> String {
        let projector = |rest: &str, prefix: &str| -> String {
            // `0.weight` → `linear_1.weight`: Sequential index 2k is linear_{k+1}.
            let (idx, tail) = rest.split_once('.').unwrap_or((rest, ""));
            match idx.parse::<usize>() {
                Ok(i) => format!("{prefix}multi_modal_projector.linear_{}.{tail}", i / 2 + 1),
                Err(_) => format!("{prefix}multi_modal_projector.{rest}"),
            }
        };
        match self {
            KeyLayout::Llava => canonical.to_string(),
            KeyLayout::Mpt => crate::mpt::stored_name(canonical),
            KeyLayout::HfLegacy { .. } => {
                if let Some(rest) = canonical.strip_prefix("model.mm_projector.") {
                    projector(rest, "")
                } else {
                    format!("language_model.{canonical}")
                }
            }
            KeyLayout::HfModern { .. } => {
                if let Some(rest) = canonical.strip_prefix("model.mm_projector.") {
                    projector(rest, "model.")
                } else if let Some(rest) = canonical.strip_prefix("model.") {
                    format!("model.language_model.{rest}")
                } else {
                    canonical.to_string()
                }
            }
        }
    }

    /// Canonical module path (`model.layers.3.self_attn.qkv_proj`, no `.weight`) → the
    /// path of that module in the stored layout.
    pub fn module_key(self, module: &str) -> String {
        let key = self.llm_key(&format!("{module}.weight"));
        key.strip_suffix(".weight").unwrap_or(&key).to_string()
    }

    /// Canonical tower name (`vision_model.*`) → stored name.
    pub fn vision_key(self, canonical: &str) -> String {
        let (tower, flat) = match self {
            KeyLayout::Llava | KeyLayout::Mpt => return canonical.to_string(),
            KeyLayout::HfLegacy { flat_tower } => ("vision_tower.", flat_tower),
            KeyLayout::HfModern { flat_tower } => ("model.vision_tower.", flat_tower),
        };
        match canonical.strip_prefix("vision_model.").filter(|_| flat) {
            Some(rest) => format!("{tower}{rest}"),
            None => format!("{tower}{canonical}"),
        }
    }
}

/// A name under a language model's layers as any layout stores it (llava-hf's
/// `model.language_model.layers.` or `language_model.model.layers.`, MPT's
/// `transformer.blocks.N.attn.Wqkv`, ours) → ours (`model.layers.N.self_attn.qkv_proj`).
/// Other names pass unchanged. For adapter files, which PEFT names after the base's tree.
pub fn canonical_layer_name(name: &str) -> String {
    for theirs in [
        "model.language_model.layers.",
        "language_model.model.layers.",
    ] {
        if let Some(rest) = name.strip_prefix(theirs) {
            return format!("model.layers.{rest}");
        }
    }
    crate::mpt::canonical_name(name).unwrap_or_else(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_projector_indices_map_to_linear_names() {
        assert_eq!(
            HF_LEGACY.llm_key("model.mm_projector.0.weight"),
            "multi_modal_projector.linear_1.weight"
        );
        assert_eq!(
            HF_LEGACY.llm_key("model.mm_projector.2.bias"),
            "multi_modal_projector.linear_2.bias"
        );
        assert_eq!(
            HF_LEGACY.llm_key("model.layers.0.mlp.up_proj.weight"),
            "language_model.model.layers.0.mlp.up_proj.weight"
        );
        assert_eq!(
            HF_LEGACY.llm_key("lm_head.weight"),
            "language_model.lm_head.weight"
        );
        assert_eq!(
            KeyLayout::HfModern { flat_tower: false }.llm_key("model.norm.weight"),
            "model.language_model.norm.weight"
        );
        assert_eq!(
            KeyLayout::HfModern { flat_tower: false }.llm_key("lm_head.weight"),
            "lm_head.weight"
        );
        assert_eq!(
            KeyLayout::HfModern { flat_tower: false }
                .vision_key("vision_model.pre_layrnorm.weight"),
            "model.vision_tower.vision_model.pre_layrnorm.weight"
        );
        // transformers 5.x's save_pretrained: no `vision_model` level.
        let names: BTreeSet<String> = [
            "language_model.model.norm.weight",
            "vision_tower.embeddings.patch_embedding.weight",
        ]
        .map(String::from)
        .into();
        let layout = KeyLayout::detect(&names);
        assert_eq!(layout, KeyLayout::HfLegacy { flat_tower: true });
        assert_eq!(
            layout.vision_key("vision_model.encoder.layers.0.mlp.fc1.weight"),
            "vision_tower.encoder.layers.0.mlp.fc1.weight"
        );
        assert_eq!(layout.vision_key("vision_model."), "vision_tower.");
    }

    /// LLaVA-MPT's names (llava-spec §1d.1) are found from the canonical ones, and a
    /// directory of them is detected as that layout.
    #[test]
    fn mpt_names_map_from_canonical_ones() {
        let l = KeyLayout::Mpt;
        for (canonical, stored) in [
            ("model.embed_tokens.weight", "transformer.wte.weight"),
            ("model.norm.weight", "transformer.norm_f.weight"),
            ("model.mm_projector.bias", "transformer.mm_projector.bias"),
            (
                "model.layers.31.input_layernorm.weight",
                "transformer.blocks.31.norm_1.weight",
            ),
            (
                "model.layers.0.post_attention_layernorm.weight",
                "transformer.blocks.0.norm_2.weight",
            ),
            (
                "model.layers.2.self_attn.qkv_proj.weight",
                "transformer.blocks.2.attn.Wqkv.weight",
            ),
            (
                "model.layers.2.self_attn.o_proj.weight",
                "transformer.blocks.2.attn.out_proj.weight",
            ),
            (
                "model.layers.5.mlp.up_proj.weight",
                "transformer.blocks.5.ffn.up_proj.weight",
            ),
            (
                "model.layers.5.mlp.down_proj.weight",
                "transformer.blocks.5.ffn.down_proj.weight",
            ),
        ] {
            assert_eq!(l.llm_key(canonical), stored);
        }
        let names: BTreeSet<String> = ["transformer.wte.weight", "transformer.norm_f.weight"]
            .map(String::from)
            .into();
        assert_eq!(KeyLayout::detect(&names), KeyLayout::Mpt);
        assert_eq!(KeyLayout::Mpt.mismatch(&names), None);
        // Adapter paths map back, module paths and weights alike.
        for ours in [
            "model.layers.2.self_attn.qkv_proj",
            "model.layers.2.self_attn.qkv_proj.lora_A.weight",
            "model.layers.0.mlp.down_proj.lora_B.weight",
        ] {
            let theirs = if ours.ends_with(".weight") {
                l.llm_key(ours)
            } else {
                l.module_key(ours)
            };
            assert_ne!(theirs, ours);
            assert_eq!(canonical_layer_name(&theirs), ours, "{theirs}");
        }
        assert_eq!(
            canonical_layer_name("model.language_model.layers.1.mlp.up_proj"),
            "model.layers.1.mlp.up_proj"
        );
    }

    #[test]
    fn names_that_fit_no_layout_are_named() {
        let names: BTreeSet<String> = [
            "gpt_neox.embed_in.weight",
            "gpt_neox.layers.0.attention.query_key_value.weight",
            "model.mm_projector.weight",
        ]
        .map(String::from)
        .into();
        let layout = KeyLayout::detect(&names);
        let why = layout.mismatch(&names).unwrap();
        assert!(
            why.contains("\"gpt_neox.embed_in.weight\"")
                && why.contains("language_model.model.embed_tokens.weight"),
            "{why}"
        );
        let fine: BTreeSet<String> = ["model.embed_tokens.weight".to_string()].into();
        assert_eq!(KeyLayout::detect(&fine).mismatch(&fine), None);
    }

    #[test]
    fn a_shard_missing_from_disk_is_named_with_its_index() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("model.safetensors.index.json"),
            r#"{"weight_map": {"a": "model-00001-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let err = find_weights(tmp.path()).unwrap_err().to_string();
        assert!(
            err.contains("model-00001-of-00002.safetensors") && err.contains("index"),
            "{err}"
        );
    }

    #[test]
    fn a_tensor_missing_from_its_shard_is_named_with_the_shard() {
        let tmp = tempfile::tempdir().unwrap();
        let shard = "model-00001-of-00001.safetensors";
        let a = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("a", a)]), tmp.path().join(shard)).unwrap();
        std::fs::write(
            tmp.path().join("model.safetensors.index.json"),
            format!(r#"{{"weight_map": {{"a": "{shard}", "b": "{shard}"}}}}"#),
        )
        .unwrap();
        let err = find_weights(tmp.path()).unwrap_err();
        assert!(
            matches!(&err, CheckpointError::MissingTensor { key, .. } if key == "b"),
            "{err}"
        );
        assert!(err.to_string().contains(shard), "{err}");
    }
}
