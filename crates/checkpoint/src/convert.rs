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
    name: String,
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
            Source::Pickle(p) => {
                p.get(&self.name)?
                    .ok_or_else(|| candle_core::Error::CannotFindTensor {
                        path: self.name.clone(),
                    })?
            }
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
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |e: std::io::Error| CheckpointError::Io {
            path: p.clone(),
            reason: e.to_string(),
        }
    };
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
                let p = std::sync::Arc::new(
                    candle_core::pickle::PthTensors::new(f, None).map_err(weight_err(f))?,
                );
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
        let mut lazies: Vec<Lazy> = names
            .into_iter()
            .map(|(name, shape, src)| Lazy {
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
        shards.push(lazies);
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
                shard.iter().map(|t| (t.name.clone(), t)),
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
                weight_map.insert(t.name.clone(), json!(file));
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
                let p = candle_core::pickle::PthTensors::new(f, None).map_err(err)?;
                for n in &names {
                    if let Some(t) = p.get(n).map_err(err)? {
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
