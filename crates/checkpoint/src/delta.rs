//! `apply-delta` / `make-delta` (llava-spec §9): LLaVA's early weights were published as
//! differences from LLaMA. For each tensor of the input (the delta, or the target):
//! - not in the base: must be the projector, kept as it is;
//! - same shape as the base's: base added (apply) or subtracted (make);
//! - a larger `embed_tokens`/`lm_head` (the added image tokens): only the base's top-left
//!   block changes; the new rows are stored as absolute values.
//!
//! Streams tensor by tensor like `convert`: each input tensor and its base counterpart are
//! read when the writer reaches them; the output is written atomically. Arithmetic is in
//! f32, the result stored in `dtype` (default: the input's).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::weights::{find_weights, SafetensorsFiles, WeightFormat};
use crate::{candle_reason, CheckpointError};

/// Reads the base's tensors by name, on demand.
enum BaseReader {
    Safetensors(SafetensorsFiles),
    /// One reader per shard, and which shard holds each name.
    Pickle(HashMap<String, Arc<candle_core::pickle::PthTensors>>),
}

impl BaseReader {
    fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let files = find_weights(dir)?;
        Ok(match files.format {
            WeightFormat::Safetensors => {
                BaseReader::Safetensors(SafetensorsFiles::open(&files.files)?)
            }
            WeightFormat::PytorchPickle => {
                let mut map = HashMap::new();
                for f in &files.files {
                    let p = Arc::new(crate::torch_pickle::open(f).map_err(|e| {
                        CheckpointError::Weights {
                            file: f.display().to_string(),
                            reason: candle_reason(&e),
                        }
                    })?);
                    for name in p.tensor_infos().keys() {
                        map.insert(name.clone(), p.clone());
                    }
                }
                BaseReader::Pickle(map)
            }
        })
    }

    fn read(&self, name: &str) -> candle_core::Result<Option<Tensor>> {
        match self {
            BaseReader::Safetensors(s) => {
                use candle_nn::var_builder::SimpleBackend;
                if s.contains_tensor(name) {
                    s.read(name).map(Some)
                } else {
                    Ok(None)
                }
            }
            BaseReader::Pickle(map) => match map.get(name) {
                Some(p) => crate::torch_pickle::get(p, name),
                None => Ok(None),
            },
        }
    }
}

/// `input ± base` by the rules above.
fn combine(name: &str, t: Tensor, base: Option<Tensor>, sign: f64) -> candle_core::Result<Tensor> {
    let Some(b) = base else {
        if name.starts_with("model.mm_projector.") {
            return Ok(t);
        }
        candle_core::bail!("{name} is not in the base model (only the projector may be new)");
    };
    let b = (b.to_dtype(DType::F32)? * sign)?;
    if t.dims() == b.dims() {
        return t + b;
    }
    let resizable = name.ends_with("embed_tokens.weight") || name == "lm_head.weight";
    let (rows, cols) = t.dims2()?;
    let (rb, cb) = b.dims2()?;
    if !resizable || rb > rows || cb > cols {
        candle_core::bail!(
            "{name}: shape {:?} does not match the base's {:?}",
            t.dims(),
            b.dims()
        );
    }
    let top = (t.narrow(0, 0, rb)?.narrow(1, 0, cb)? + b)?;
    let top = if cb < cols {
        Tensor::cat(&[&top, &t.narrow(0, 0, rb)?.narrow(1, cb, cols - cb)?], 1)?
    } else {
        top
    };
    if rb < rows {
        Tensor::cat(&[&top, &t.narrow(0, rb, rows - rb)?], 0)
    } else {
        Ok(top)
    }
}

fn run(
    base: &Path,
    input: &Path,
    output: &Path,
    dtype: Option<DType>,
    sign: f64,
) -> Result<usize, CheckpointError> {
    let reader = Arc::new(BaseReader::open(base)?);
    let transform: crate::convert::Transform =
        Arc::new(move |name: &str, t: Tensor| combine(name, t, reader.read(name)?, sign));
    crate::write_dir_atomically(output, |tmp| {
        crate::convert::write_converted(
            input,
            tmp,
            dtype,
            &HashMap::new(),
            Some(&transform),
            &mut |_, _| {},
        )
    })
}

/// `apply_delta`: the target model from a base and a delta. Returns the tensors written.
pub fn apply_delta(
    base: &Path,
    delta: &Path,
    target: &Path,
    dtype: Option<DType>,
) -> Result<usize, CheckpointError> {
    run(base, delta, target, dtype, 1.0)
}

/// `make_delta`: what `apply_delta` needs to rebuild `target` from `base`.
pub fn make_delta(
    base: &Path,
    target: &Path,
    delta: &Path,
    dtype: Option<DType>,
) -> Result<usize, CheckpointError> {
    run(base, target, delta, dtype, -1.0)
}
