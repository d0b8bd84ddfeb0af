//! The training objective on the shared forward path: image features spliced into the
//! embeddings exactly as at inference, then the mean next-token cross-entropy over every
//! position whose label is not [`IGNORE_INDEX`] (`CrossEntropyLoss()` on shifted logits).

use std::ops::Range;

use candle_core::{DType, Result, Tensor};
use kollava_model::{KvCache, Llava};

use crate::labels::IGNORE_INDEX;

/// Labels for the spliced sequence: each `-200` entry becomes `n` ignored rows.
pub fn splice_labels(ids: &[i64], labels: &[i64], n: usize) -> Vec<i64> {
    let mut out = Vec::with_capacity(labels.len() + n);
    for (&id, &label) in ids.iter().zip(labels) {
        if id == kollava_inputs::prompt::IMAGE_TOKEN_INDEX {
            out.extend(std::iter::repeat_n(IGNORE_INDEX, n));
        } else {
            out.push(label);
        }
    }
    out
}

/// Mean cross-entropy of `logits: (L, vocab)` predicting `labels[1..]` from positions
/// `..L-1`, ignoring [`IGNORE_INDEX`]. Returns a scalar; NaN-free only if some label counts.
pub fn causal_lm_loss(logits: &Tensor, labels: &[i64]) -> Result<Tensor> {
    let device = logits.device();
    let (rows, targets): (Vec<u32>, Vec<u32>) = labels
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(_, &l)| l != IGNORE_INDEX)
        .map(|(i, &l)| ((i - 1) as u32, l as u32))
        .unzip();
    if rows.is_empty() {
        candle_core::bail!("no position has a label: nothing to learn from this sample");
    }
    let n = rows.len();
    let picked = logits
        .index_select(&Tensor::new(rows, device)?, 0)?
        .to_dtype(DType::F32)?;
    kollava_model::kernels::cross_entropy::nll_sum(&picked, &targets)? / n as f64
}

/// Result of one projector-only backward (stage 1: LLM and vision frozen).
#[derive(Debug, Clone)]
pub struct ProjectorStep {
    pub loss: f32,
    /// L2 norm over all projector gradients.
    pub grad_norm: f64,
    /// Per parameter, named as in the checkpoint (`0.weight`, …).
    pub per_param: Vec<(String, f64)>,
}

/// Forward and backward of one sample with only the projector trainable.
/// `pixels: (n_images, 3, S, S)`; `ids` without `-200`, `slots` the image slots (as at
/// inference); `labels` already spliced to the embedded length.
pub fn projector_step(
    model: &Llava,
    pixels: &Tensor,
    ids: &[u32],
    slots: &[Range<usize>],
    labels: &[i64],
) -> Result<ProjectorStep> {
    let features = model.vision_features(pixels)?.detach();
    let (projector, vars) = model.projector.to_trainable()?;
    let projected = projector.forward(&features)?;
    let embeds = model.embed_with_images(ids, slots, Some(&projected))?;
    let len = embeds.dim(1)?;
    if len != labels.len() {
        candle_core::bail!("{} labels for a spliced sequence of {len}", labels.len());
    }
    let mut cache = KvCache::new(model.config().decoder.num_hidden_layers, 1);
    let hidden = model.decoder.forward(&embeds, &[len], &mut cache)?;
    let logits = model.decoder.logits(&hidden.squeeze(0)?)?;
    let loss = causal_lm_loss(&logits, labels)?;
    let grads = loss.backward()?;
    let mut per_param = Vec::with_capacity(vars.len());
    let mut total = 0f64;
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .map(|g| g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>())
            .transpose()?
            .unwrap_or(0.0);
        total += g;
        per_param.push((name.clone(), g.sqrt()));
    }
    Ok(ProjectorStep {
        loss: loss.to_scalar::<f32>()?,
        grad_norm: total.sqrt(),
        per_param,
    })
}
