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
        let names = candle_core::pickle::read_pth_tensor_info(&single, false, None)
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

fn safetensors_names(path: &Path) -> Result<BTreeSet<String>, CheckpointError> {
    let file = std::fs::File::open(path).map_err(|e| CheckpointError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    // SAFETY: the mapping is read-only and lives only for this function; a file truncated
    // underneath us is reported by safetensors' header checks, not read out of bounds.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| CheckpointError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| CheckpointError::Weights {
            file: path.display().to_string(),
            reason: e.to_string(),
        })?;
    Ok(meta.tensors().keys().cloned().collect())
}

/// A `VarBuilder` over the files, converting every tensor to `dtype` when it is fetched.
/// Safetensors stay memory-mapped; pickles are read into memory once, keeping only names
/// that start with `keep_prefix` (a CLIP repo's `text_model.*` is never needed) and
/// skipping the `rotary_emb.inv_freq` buffers old checkpoints carry.
pub fn var_builder(
    w: &WeightFiles,
    dtype: DType,
    device: &Device,
    keep_prefix: &str,
) -> Result<VarBuilder<'static>, CheckpointError> {
    match w.format {
        WeightFormat::Safetensors => {
            for f in &w.files {
                // Validate headers up front so a truncated shard names itself.
                safetensors_names(f)?;
            }
            // SAFETY: the files are opened read-only and must not be modified while the
            // model is loaded; this is the usual contract of memory-mapped checkpoints.
            unsafe { VarBuilder::from_mmaped_safetensors(&w.files, dtype, device) }.map_err(|e| {
                CheckpointError::Weights {
                    file: w
                        .files
                        .first()
                        .map(|f| f.display().to_string())
                        .unwrap_or_default(),
                    reason: candle_reason(&e),
                }
            })
        }
        WeightFormat::PytorchPickle => {
            let mut map: HashMap<String, Tensor> = HashMap::new();
            for f in &w.files {
                let tensors = candle_core::pickle::read_all_with_key(f, None).map_err(|e| {
                    CheckpointError::Weights {
                        file: f.display().to_string(),
                        reason: candle_reason(&e),
                    }
                })?;
                for (name, t) in tensors {
                    if name.starts_with(keep_prefix) && !name.ends_with("rotary_emb.inv_freq") {
                        // Convert shard by shard so that peak memory stays near the final
                        // size (one shard's raw tensors on top), not raw + converted.
                        let t = t.to_dtype(dtype).map_err(|e| CheckpointError::Weights {
                            file: f.display().to_string(),
                            reason: format!("{name}: {}", candle_reason(&e)),
                        })?;
                        map.insert(name, t);
                    }
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
    /// llava-hf before transformers 4.52: `language_model.model.*`, `language_model.lm_head`,
    /// `multi_modal_projector.linear_{1,2}`, `vision_tower.vision_model.*`.
    HfLegacy,
    /// llava-hf from transformers 4.52: `model.language_model.*`, `lm_head`,
    /// `model.multi_modal_projector.*`, `model.vision_tower.vision_model.*`.
    HfModern,
}

impl KeyLayout {
    pub fn detect(names: &BTreeSet<String>) -> KeyLayout {
        if names.iter().any(|n| n.starts_with("language_model.")) {
            KeyLayout::HfLegacy
        } else if names.iter().any(|n| n.starts_with("model.language_model.")) {
            KeyLayout::HfModern
        } else {
            KeyLayout::Llava
        }
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
            KeyLayout::HfLegacy => {
                if let Some(rest) = canonical.strip_prefix("model.mm_projector.") {
                    projector(rest, "")
                } else {
                    format!("language_model.{canonical}")
                }
            }
            KeyLayout::HfModern => {
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

    /// Canonical tower name (`vision_model.*`) → stored name.
    pub fn vision_key(self, canonical: &str) -> String {
        match self {
            KeyLayout::Llava => canonical.to_string(),
            KeyLayout::HfLegacy => format!("vision_tower.{canonical}"),
            KeyLayout::HfModern => format!("model.vision_tower.{canonical}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_projector_indices_map_to_linear_names() {
        assert_eq!(
            KeyLayout::HfLegacy.llm_key("model.mm_projector.0.weight"),
            "multi_modal_projector.linear_1.weight"
        );
        assert_eq!(
            KeyLayout::HfLegacy.llm_key("model.mm_projector.2.bias"),
            "multi_modal_projector.linear_2.bias"
        );
        assert_eq!(
            KeyLayout::HfLegacy.llm_key("model.layers.0.mlp.up_proj.weight"),
            "language_model.model.layers.0.mlp.up_proj.weight"
        );
        assert_eq!(
            KeyLayout::HfLegacy.llm_key("lm_head.weight"),
            "language_model.lm_head.weight"
        );
        assert_eq!(
            KeyLayout::HfModern.llm_key("model.norm.weight"),
            "model.language_model.norm.weight"
        );
        assert_eq!(
            KeyLayout::HfModern.llm_key("lm_head.weight"),
            "lm_head.weight"
        );
        assert_eq!(
            KeyLayout::HfModern.vision_key("vision_model.pre_layrnorm.weight"),
            "model.vision_tower.vision_model.pre_layrnorm.weight"
        );
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
