//! Loading a checkpoint for training and writing the trained one back in its own family's
//! layout.
//!
//! Training runs the same model code as inference: the weights are loaded through the
//! usual `VarBuilder`s, except that each tensor whose canonical name the caller marks
//! trainable is handed out as a [`Var`]. Every tensor the model takes is also recorded, so
//! that saving writes the trained values under the names the input checkpoint used
//! (llava-hf stays llava-hf, a separate CLIP tower stays a separate directory).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use kollava_model::form::Form;
use kollava_model::Llava;

use crate::{Checkpoint, CheckpointError};

/// Decides, by canonical name (`model.layers.0.mlp.up_proj.weight`,
/// `model.mm_projector.0.bias`, `lm_head.weight`, `vision_model.encoder…`), which weights
/// train.
pub type TrainableFilter = dyn Fn(&str) -> bool + Send + Sync;

/// A model whose chosen weights are `Var`s.
pub struct TrainableModel {
    pub model: Llava,
    /// The trainable weights, by canonical name, in load order.
    pub params: Vec<(String, Var)>,
    /// Every weight the model took (trainable or not), by canonical name.
    pub tensors: Vec<(String, Tensor)>,
}

#[derive(Default)]
struct Record {
    params: Vec<(String, Var)>,
    tensors: Vec<(String, Tensor)>,
}

/// Hands out the inner builder's tensors, as `Var`s where the filter says so.
struct Recording {
    inner: VarBuilder<'static>,
    trainable: Arc<TrainableFilter>,
    record: Arc<Mutex<Record>>,
    /// The frozen decoder layers' matrices are quantized as read ([`Form::Q4Base`]): their
    /// f32 copies are not kept.
    four_bit_base: bool,
}

impl Recording {
    fn keep(&self, name: &str, t: Tensor) -> Result<Tensor> {
        let mut rec = self
            .record
            .lock()
            .map_err(|_| candle_core::Error::Msg("weight record poisoned".into()))?;
        // A name fetched again (a `--projector` file over the checkpoint's own projector)
        // replaces the first one: that is the weight the model ends up using.
        rec.params.retain(|(n, _)| n != name);
        rec.tensors.retain(|(n, _)| n != name);
        let t = if (self.trainable)(name) {
            let v = Var::from_tensor(&t)?;
            rec.params.push((name.to_string(), v.clone()));
            v.as_tensor().clone()
        } else if self.four_bit_base
            && name.starts_with("model.layers.")
            && name.ends_with("_proj.weight")
        {
            return Ok(t);
        } else {
            t
        };
        rec.tensors.push((name.to_string(), t.clone()));
        Ok(t)
    }
}

impl SimpleBackend for Recording {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, _dev: &Device) -> Result<Tensor> {
        let t = self.inner.get_with_hints_dtype(s, name, h, dtype)?;
        self.keep(name, t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _dev: &Device) -> Result<Tensor> {
        let t = self.inner.get_unchecked_dtype(name, dtype)?;
        self.keep(name, t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

impl Checkpoint {
    /// Loads the model with the weights `trainable` selects as `Var`s (in `dtype`; the
    /// vision tower in f32 as always).
    pub fn load_trainable(
        &self,
        dtype: DType,
        device: &Device,
        trainable: Arc<TrainableFilter>,
    ) -> std::result::Result<TrainableModel, CheckpointError> {
        self.load_trainable_as(dtype, device, trainable, Form::AsRead)
    }

    /// [`Checkpoint::load_trainable`] in `form`: [`Form::Q4Base`] for QLoRA, whose frozen
    /// decoder matrices are quantized one at a time as read and not kept in `tensors`.
    pub fn load_trainable_as(
        &self,
        dtype: DType,
        device: &Device,
        trainable: Arc<TrainableFilter>,
        form: Form,
    ) -> std::result::Result<TrainableModel, CheckpointError> {
        let record = Arc::new(Mutex::new(Record::default()));
        let wrap = |vb: VarBuilder<'static>, dt: DType| -> VarBuilder<'static> {
            let device = vb.device().clone();
            VarBuilder::from_backend(
                Box::new(Recording {
                    inner: vb,
                    trainable: trainable.clone(),
                    record: record.clone(),
                    four_bit_base: form == Form::Q4Base,
                }),
                dt,
                device,
            )
        };
        let model = self.load_with(dtype, device, form, &wrap)?;
        let rec = std::mem::take(&mut *record.lock().expect("not poisoned: load finished"));
        Ok(TrainableModel {
            model,
            params: rec.params,
            tensors: rec.tensors,
        })
    }

    /// Writes this checkpoint to `out` (which must not exist or be empty) with `tensors`
    /// (canonical names) replacing the stored ones: same files, names and layout as the
    /// input, weights as safetensors in `dtype` (`None` keeps each tensor's). A tower in a
    /// directory of its own is written beside the weights as well when it was trained, or
    /// when it lives inside the checkpoint.
    pub fn save_with(
        &self,
        out: &Path,
        tensors: &[(String, Tensor)],
        dtype: Option<DType>,
    ) -> std::result::Result<(), CheckpointError> {
        let files = crate::weights::find_weights(&self.dir)?;
        let layout = crate::weights::KeyLayout::detect(&files.names);
        let mut llm = HashMap::new();
        let mut vision = HashMap::new();
        for (name, t) in tensors {
            if name.starts_with("vision_model.") {
                if self.vision_dir.is_some() {
                    vision.insert(name.clone(), t.clone());
                } else {
                    llm.insert(layout.vision_key(name), t.clone());
                }
            } else {
                llm.insert(layout.llm_key(name), t.clone());
            }
        }
        crate::write_dir_atomically(out, |tmp| {
            crate::convert::write_converted(&self.dir, tmp, dtype, &llm, None, &mut |_, _| {})?;
            let Some(vdir) = &self.vision_dir else {
                return Ok(());
            };
            // Compared canonically: `llava/../clip` is not inside `llava`.
            let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
            let inside = canon(vdir)
                .strip_prefix(canon(&self.dir))
                .ok()
                .map(Path::to_path_buf);
            let target = match inside {
                Some(rel) => rel,
                None if vision.is_empty() => {
                    // An untrained tower found relative to the input (`../clip-…`) must
                    // still be found from the output's place.
                    let named = self.config_vision_tower();
                    if let Some(name) =
                        named.filter(|n| Path::new(n).is_relative() && self.dir.join(n).is_dir())
                    {
                        let abs = std::fs::canonicalize(self.dir.join(name))
                            .unwrap_or_else(|_| vdir.clone());
                        set_config_key(tmp, "mm_vision_tower", abs.display().to_string())?;
                    }
                    return Ok(());
                }
                // A trained tower from elsewhere: keep it beside the weights and point
                // `mm_vision_tower` there.
                None => {
                    let name = vdir
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| "vision_tower".into());
                    set_config_key(tmp, "mm_vision_tower", name.clone())?;
                    name.into()
                }
            };
            let tdir = tmp.join(target);
            std::fs::create_dir_all(&tdir).map_err(|e| CheckpointError::Io {
                path: tdir.display().to_string(),
                reason: e.to_string(),
            })?;
            crate::convert::write_converted(vdir, &tdir, dtype, &vision, None, &mut |_, _| {})?;
            Ok(())
        })
    }
}

impl Checkpoint {
    /// `mm_vision_tower` as written in config.json.
    fn config_vision_tower(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.dir.join("config.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v.get("mm_vision_tower")?.as_str().map(str::to_string)
    }
}

/// Sets one key of `dir/config.json`.
pub fn set_config_key(
    dir: &Path,
    key: &str,
    value: impl Into<serde_json::Value>,
) -> std::result::Result<(), CheckpointError> {
    let path = dir.join("config.json");
    let io = |e: std::io::Error| CheckpointError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let text = std::fs::read_to_string(&path).map_err(io)?;
    let mut cfg: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| CheckpointError::Json {
            file: path.display().to_string(),
            reason: e.to_string(),
        })?;
    cfg[key] = value.into();
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap_or(text)).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Checkpoint {
        crate::open(
            kollava_testkit::checkpoint_dir(name).to_str().unwrap(),
            &crate::OpenOptions::default(),
        )
        .unwrap()
    }

    #[test]
    fn only_the_selected_weights_are_vars_and_the_model_still_matches() {
        let ck = fixture("llava-v1.5");
        let t = ck
            .load_trainable(
                DType::F32,
                &Device::Cpu,
                Arc::new(|n: &str| n.starts_with("model.mm_projector.")),
            )
            .unwrap();
        let names: Vec<&str> = t.params.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "model.mm_projector.0.weight",
                "model.mm_projector.0.bias",
                "model.mm_projector.2.weight",
                "model.mm_projector.2.bias"
            ]
        );
        assert!(t.tensors.iter().any(|(n, _)| n == "lm_head.weight"));
        assert!(t
            .tensors
            .iter()
            .any(|(n, _)| n.starts_with("vision_model.encoder.layers.0.")));
    }

    /// Saving with changed weights and loading again gives those weights back, under the
    /// input family's names, for a separate tower (LLaVA) and an inline one (llava-hf).
    #[test]
    fn saved_checkpoints_round_trip_in_their_own_layout() {
        for fixture_name in ["llava-v1.5", "llava-hf"] {
            let ck = fixture(fixture_name);
            let t = ck
                .load_trainable(DType::F32, &Device::Cpu, Arc::new(|_: &str| false))
                .unwrap();
            let bumped: Vec<(String, Tensor)> = t
                .tensors
                .iter()
                .filter(|(n, _)| {
                    n == "model.norm.weight"
                        || n == "model.mm_projector.2.bias"
                        || n == "vision_model.pre_layrnorm.bias"
                })
                .map(|(n, t)| (n.clone(), (t + 1.0).unwrap()))
                .collect();
            assert_eq!(bumped.len(), 3, "{fixture_name}");
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("trained");
            ck.save_with(&out, &bumped, Some(DType::F32)).unwrap();
            let again = crate::open(out.to_str().unwrap(), &crate::OpenOptions::default())
                .unwrap()
                .load_trainable(DType::F32, &Device::Cpu, Arc::new(|_: &str| false))
                .unwrap();
            let get = |ts: &[(String, Tensor)], n: &str| {
                ts.iter()
                    .find(|(k, _)| k == n)
                    .unwrap()
                    .1
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            for (n, want) in &bumped {
                assert_eq!(
                    get(&again.tensors, n),
                    want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    "{fixture_name}: {n}"
                );
            }
            assert_eq!(
                get(&again.tensors, "model.layers.0.mlp.up_proj.weight"),
                get(&t.tensors, "model.layers.0.mlp.up_proj.weight")
            );
        }
    }
}
