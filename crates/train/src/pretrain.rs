//! Stage 1, feature alignment (llava-spec §5.5): the vision tower and the language model
//! are frozen and only the projector learns, on caption or instruction data. Each step runs
//! the shared forward path (features spliced into the embeddings exactly as at inference),
//! the masked loss, a backward into the projector, clipping and AdamW.

use std::ops::Range;

use candle_core::{Device, Result, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use kollava_inputs::image::{AspectMode, ClipPreprocess, RgbImage};
use kollava_inputs::prompt::ImageTokens;
use kollava_inputs::template::Template;
use kollava_inputs::Tokenizer;
use kollava_model::{KvCache, Llava};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::data::Sample;
use crate::labels::{preprocess, LabelRule};
use crate::loss::{causal_lm_loss, splice_labels};
use crate::optim::{clip_grad_norm, cosine_lr, warmup_steps};

/// Hyper-parameters, with the reference's defaults for projector pretraining.
#[derive(Debug, Clone)]
pub struct PretrainOptions {
    pub lr: f64,
    pub epochs: usize,
    /// Stop after this many optimizer steps (overrides `epochs`).
    pub max_steps: Option<usize>,
    /// Samples per optimizer step.
    pub grad_accum: usize,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
}

impl Default for PretrainOptions {
    fn default() -> Self {
        Self {
            lr: 2e-3,
            epochs: 1,
            max_steps: None,
            grad_accum: 1,
            warmup_ratio: 0.03,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: 42,
        }
    }
}

/// One optimizer step's figures.
#[derive(Debug, Clone)]
pub struct StepLog {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub samples: usize,
}

/// Everything a step needs besides the data.
pub struct PretrainInputs<'a> {
    pub model: &'a Llava,
    pub tokenizer: &'a Tokenizer,
    pub scheme: &'a ImageTokens,
    pub template: &'a Template,
    pub rule: LabelRule,
    pub preprocess: &'a ClipPreprocess,
    pub aspect: AspectMode,
    /// Loads a sample's image by its file name.
    pub load_image: &'a dyn Fn(&str) -> std::result::Result<RgbImage, String>,
}

/// Trains the projector; returns its trained weights named as in the checkpoint
/// (`0.weight`, … or `weight`, `bias`).
pub fn pretrain_projector(
    inp: &PretrainInputs,
    samples: &[Sample],
    opts: &PretrainOptions,
    on_step: &mut dyn FnMut(&StepLog),
) -> Result<Vec<(String, Tensor)>> {
    let model = inp.model;
    let (projector, named) = model.projector.to_trainable()?;
    let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let mut adamw = AdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr: opts.lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: opts.weight_decay,
        },
    )?;
    let accum = opts.grad_accum.max(1);
    let steps_per_epoch = samples.len().div_ceil(accum);
    let total = opts
        .max_steps
        .unwrap_or(steps_per_epoch * opts.epochs.max(1));
    let warmup = warmup_steps(opts.warmup_ratio, total);
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let (cw, ch) = inp.preprocess.crop;
    let device = Device::Cpu;
    let mut step = 0;
    let mut epoch = 0;
    'outer: loop {
        let mut order: Vec<usize> = (0..samples.len()).collect();
        order.shuffle(&mut rng);
        for chunk in order.chunks(accum) {
            if step >= total {
                break 'outer;
            }
            let mut loss_sum: Option<Tensor> = None;
            for &i in chunk {
                let s = &samples[i];
                let ex = preprocess(inp.tokenizer, inp.scheme, inp.template, inp.rule, &s.turns)
                    .map_err(|e| candle_core::Error::Msg(format!("sample {}: {e}", s.id)))?;
                let features = match &s.image {
                    Some(name) if !ex.prompt.images.is_empty() => {
                        let img = (inp.load_image)(name).map_err(|e| {
                            candle_core::Error::Msg(format!("sample {}: {e}", s.id))
                        })?;
                        let px =
                            kollava_inputs::image::preprocess(&img, inp.aspect, inp.preprocess);
                        let px = Tensor::from_vec(px, (1, 3, ch as usize, cw as usize), &device)?;
                        let f = model
                            .vision_features(&px)?
                            .detach()
                            .to_dtype(model.dtype())?;
                        Some(projector.forward(&f)?)
                    }
                    _ => None,
                };
                let slots: Vec<Range<usize>> = ex
                    .prompt
                    .images
                    .iter()
                    .map(|s| s.at..s.at + s.replaces)
                    .collect();
                let embeds = model.embed_with_images(&ex.prompt.ids, &slots, features.as_ref())?;
                let labels = splice_labels(&ex.ids, &ex.labels, inp.scheme.n());
                let len = embeds.dim(1)?;
                let mut cache = KvCache::new(model.config().decoder.num_hidden_layers, 1);
                let hidden = model.decoder.forward(&embeds, &[len], &mut cache)?;
                let loss = causal_lm_loss(&model.decoder.logits(&hidden.squeeze(0)?)?, &labels)?;
                loss_sum = Some(match loss_sum {
                    None => loss,
                    Some(acc) => (acc + loss)?,
                });
            }
            let Some(loss) = loss_sum else { continue };
            let loss = (loss / chunk.len() as f64)?;
            let mut grads = loss.backward()?;
            let grad_norm = clip_grad_norm(&mut grads, &vars, opts.max_grad_norm)?;
            let lr = cosine_lr(opts.lr, step, warmup, total);
            adamw.set_learning_rate(lr);
            adamw.step(&grads)?;
            step += 1;
            on_step(&StepLog {
                step,
                total_steps: total,
                epoch,
                loss: loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?,
                lr,
                grad_norm,
                samples: chunk.len(),
            });
        }
        epoch += 1;
        if opts.max_steps.is_none() && epoch >= opts.epochs.max(1) {
            break;
        }
    }
    Ok(named
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect())
}
