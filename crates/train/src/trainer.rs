//! The training loop both stages share (llava-spec §5.5): whichever weights the caller made
//! trainable (the projector for stage 1; the language model and projector, optionally the
//! tower, for stage 2) learn through the inference forward path.
//!
//! A step takes `batch_size × grad_accum` samples. Samples are tokenized, masked and their
//! images decoded on a second thread, a few micro-batches ahead, so memory stays bounded.
//! A micro-batch is right-padded into one decoder call; its loss is the mean over its
//! labelled tokens, divided by `grad_accum` as HF's Trainer does. The data order of epoch
//! `e` depends only on `seed` and `e`, so a resumed run sees exactly the samples an
//! uninterrupted one would.

use std::ops::Range;
use std::sync::mpsc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor};
use kollava_inputs::image::{AspectMode, ClipPreprocess, RgbImage};
use kollava_inputs::prompt::ImageTokens;
use kollava_inputs::template::Template;
use kollava_inputs::Tokenizer;
use kollava_model::{KvCache, Llava};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::data::Sample;
use crate::labels::{preprocess, LabelRule, IGNORE_INDEX};
use crate::loss::splice_labels;
use crate::optim::{clip_grad_norm, cosine_lr, warmup_steps, AdamW};

/// Hyper-parameters. Defaults are the reference scripts' stage-1 values.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub lr: f64,
    pub epochs: usize,
    /// Stop after this many optimizer steps (overrides `epochs`).
    pub max_steps: Option<usize>,
    /// Samples per micro-batch (one decoder call).
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Sequences (after image features are spliced in) are cut to this many positions.
    pub model_max_length: usize,
    /// Whether gradients flow into the vision tower.
    pub train_vision: bool,
    /// Data-parallel processes, and this one's index: each step's samples are split
    /// between them.
    pub world: usize,
    pub rank: usize,
    /// Keep only each decoder layer's input during the forward and recompute the layer for
    /// its backward (`--gradient-checkpointing`): long sequences fit, for ~30 % more time.
    pub gradient_checkpointing: bool,
    /// Multiply trained weights in bf16 too (autocast; `train --bf16`, which also packs the
    /// frozen matrices for the bf16 kernels).
    pub bf16: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            lr: 2e-3,
            epochs: 1,
            max_steps: None,
            batch_size: 1,
            grad_accum: 1,
            warmup_ratio: 0.03,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: 42,
            model_max_length: 2048,
            train_vision: false,
            world: 1,
            rank: 0,
            gradient_checkpointing: false,
            bf16: false,
        }
    }
}

impl TrainOptions {
    /// Samples one process takes per step.
    fn samples_per_rank(&self) -> usize {
        self.batch_size.max(1) * self.grad_accum.max(1)
    }

    /// Samples per optimizer step over all processes (the global batch).
    fn samples_per_step(&self) -> usize {
        self.samples_per_rank() * self.world.max(1)
    }

    /// Optimizer steps in one epoch of `n` samples.
    pub fn steps_per_epoch(&self, n: usize) -> usize {
        n.div_ceil(self.samples_per_step()).max(1)
    }

    /// Total optimizer steps for `n` samples.
    pub fn total_steps(&self, n: usize) -> usize {
        self.max_steps
            .unwrap_or(self.steps_per_epoch(n) * self.epochs.max(1))
    }

    /// The sample indices this process trains on at step `step` (the same in a resumed
    /// run): its share of the step's global batch.
    pub fn step_samples(&self, n: usize, step: usize) -> Vec<usize> {
        let per_epoch = self.steps_per_epoch(n);
        let epoch = step / per_epoch;
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed.wrapping_add(epoch as u64));
        order.shuffle(&mut rng);
        let k = self.samples_per_step();
        let start = (step % per_epoch) * k;
        let mut global = order[start.min(n)..(start + k).min(n)].to_vec();
        if self.world > 1 {
            // Like torch's DistributedSampler: a short last step is filled from the start
            // of the epoch, so that every rank has its share.
            let missing = k - global.len();
            global.extend(order.iter().cycle().take(missing));
        }
        let share = self.samples_per_rank();
        let from = (self.rank * share).min(global.len());
        global[from..(from + share).min(global.len())].to_vec()
    }
}

/// One optimizer step's figures.
#[derive(Debug, Clone)]
pub struct StepLog {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub samples: usize,
    /// Samples of this step masked whole (tokenization mismatch).
    pub masked: usize,
    /// Positions this rank's sequences had (image features spliced in, after truncation).
    pub tokens: usize,
    /// Where this rank's step went.
    pub times: StepTimes,
}

/// Wall time of one optimizer step's phases, in seconds (the CPU computes synchronously,
/// so the clock splits them; on a GPU they are launch times unless it synchronises).
#[derive(Debug, Clone, Copy, Default)]
pub struct StepTimes {
    /// The tower and the projector.
    pub vision: f64,
    /// Embedding, the language model and the loss.
    pub forward: f64,
    pub backward: f64,
    /// Clipping and the AdamW update.
    pub optimizer: f64,
    /// Averaging gradients with the other ranks.
    pub communication: f64,
}

impl StepTimes {
    fn add(&mut self, o: &StepTimes) {
        self.vision += o.vision;
        self.forward += o.forward;
        self.backward += o.backward;
        self.optimizer += o.optimizer;
        self.communication += o.communication;
    }
}

/// Everything a step needs besides the weights and the data.
pub struct TrainInputs<'a> {
    pub model: &'a Llava,
    pub tokenizer: &'a Tokenizer,
    pub scheme: &'a ImageTokens,
    pub template: &'a Template,
    pub rule: LabelRule,
    pub preprocess: &'a ClipPreprocess,
    pub aspect: AspectMode,
    /// Loads a sample's image by its file name.
    pub load_image: &'a (dyn Fn(&str) -> std::result::Result<RgbImage, String> + Sync),
    /// Parameters of which only some rows learn: their gradient is multiplied by the mask
    /// (`(rows, 1)` of 0/1) before clipping. Stage 1 of v0 trains just the `<im_start>` and
    /// `<im_end>` rows of the embedding matrix this way (llava-spec §1a.6).
    pub row_masks: &'a [(candle_core::Var, Tensor)],
    /// The other processes of a data-parallel run: gradients and the loss are averaged
    /// with them before each optimizer step.
    pub dist: Option<&'a std::sync::Mutex<crate::dist::Dist>>,
}

/// The decoder layers under `train --shard full`: each is put together from the ranks'
/// ranges for its forward and again for its recomputation in the backward, and dropped
/// after; its gradients go back to be reduce-scattered.
struct GatheredLayers<'a> {
    opt: &'a mut AdamW,
    dist: Option<&'a std::sync::Mutex<crate::dist::Dist>>,
    cfg: &'a kollava_model::config::DecoderConfig,
    device: candle_core::Device,
    /// Whether a layer built now is differentiated (the backward's recomputation).
    differentiate: bool,
    /// The parameters of the layer built last, to read their gradients.
    current: Vec<candle_core::Var>,
    /// Seconds spent exchanging with the other ranks in the forward and in the backward.
    comm: [f64; 2],
}

impl kollava_model::decoder::LayerSource for GatheredLayers<'_> {
    fn layer(&mut self, i: usize) -> Result<std::borrow::Cow<'_, kollava_model::decoder::Layer>> {
        let clock = std::time::Instant::now();
        let named = self.opt.gather_layer(i, self.dist)?;
        self.comm[self.differentiate as usize] += clock.elapsed().as_secs_f64();
        self.current.clear();
        let mut map = std::collections::HashMap::with_capacity(named.len());
        for (name, t) in named {
            let t = match self.differentiate {
                true => {
                    let v = candle_core::Var::from_tensor(&t)?;
                    self.current.push(v.clone());
                    v.as_tensor().clone()
                }
                false => t,
            };
            map.insert(name, t);
        }
        let vb = candle_nn::VarBuilder::from_tensors(map, DType::F32, &self.device);
        Ok(std::borrow::Cow::Owned(
            kollava_model::decoder::Decoder::load_layer(vb, self.cfg, i)?,
        ))
    }

    fn layer_grads(&mut self, i: usize, grads: &GradStore) -> Result<()> {
        let grads: Vec<Option<Tensor>> = std::mem::take(&mut self.current)
            .iter()
            .map(|v| grads.get(v.as_tensor()).cloned())
            .collect();
        self.comm[1] += self.opt.add_layer_grads(i, &grads, self.dist)?;
        Ok(())
    }
}

/// A sample made ready on the loader thread.
struct Prepared {
    ids: Vec<u32>,
    slots: Vec<Range<usize>>,
    /// Spliced to the embedded length.
    labels: Vec<i64>,
    /// `3 × H × W` normalised pixels of its one image.
    pixels: Option<Vec<f32>>,
    mismatch: bool,
}

fn prepare(inp: &TrainInputs, s: &Sample) -> std::result::Result<Prepared, String> {
    let ex = preprocess(inp.tokenizer, inp.scheme, inp.template, inp.rule, &s.turns)
        .map_err(|e| format!("sample {}: {e}", s.id))?;
    let pixels = match &s.image {
        Some(name) if !ex.prompt.images.is_empty() => {
            let img = (inp.load_image)(name).map_err(|e| format!("sample {}: {e}", s.id))?;
            Some(kollava_inputs::image::preprocess(
                &img,
                inp.aspect,
                inp.preprocess,
            ))
        }
        _ => None,
    };
    let slots: Vec<Range<usize>> = ex
        .prompt
        .images
        .iter()
        .map(|s| s.at..s.at + s.replaces)
        .collect();
    if pixels.is_none() && !slots.is_empty() {
        return Err(format!(
            "sample {}: the {} format needs an image but the record has none",
            s.id, inp.template.name
        ));
    }
    let labels = splice_labels(&ex.ids, &ex.labels, inp.scheme.n());
    Ok(Prepared {
        ids: ex.prompt.ids,
        slots: slots.into_iter().take(1).collect(),
        labels,
        pixels,
        mismatch: ex.mismatch,
    })
}

/// One micro-batch's loss and gradients, with its size and timings.
struct MicroBatch {
    loss: f64,
    grads: GradStore,
    tokens: usize,
    times: StepTimes,
}

/// Loss of one micro-batch (the mean next-token cross-entropy over its labelled tokens)
/// times `weight`, and its gradients for `params`. `None` when nothing in it is labelled.
fn micro_batch_grads(
    inp: &TrainInputs,
    batch: &[Prepared],
    opts: &TrainOptions,
    weight: f64,
    params: &[candle_core::Var],
    mut gathered: Option<&mut GatheredLayers>,
) -> Result<Option<MicroBatch>> {
    let mut times = StepTimes::default();
    let clock = std::time::Instant::now();
    let model = inp.model;
    let device = model.decoder.device().clone();
    let (cw, ch) = inp.preprocess.crop;
    let pixels: Vec<f32> = batch
        .iter()
        .filter_map(|p| p.pixels.as_deref())
        .flatten()
        .copied()
        .collect();
    let n_images = batch.iter().filter(|p| p.pixels.is_some()).count();
    let features = if n_images > 0 {
        let px = Tensor::from_vec(pixels, (n_images, 3, ch as usize, cw as usize), &device)?;
        let f = model.vision_features(&px)?;
        let f = if opts.train_vision { f } else { f.detach() };
        Some(model.projector.forward(&f.to_dtype(model.dtype())?)?)
    } else {
        None
    };
    times.vision = clock.elapsed().as_secs_f64();
    let clock = std::time::Instant::now();
    let mut embeds = Vec::with_capacity(batch.len());
    let mut labels = Vec::with_capacity(batch.len());
    let mut image = 0;
    for p in batch {
        let f = match (&features, p.pixels.is_some()) {
            (Some(f), true) => {
                image += 1;
                Some(f.narrow(0, image - 1, 1)?)
            }
            _ => None,
        };
        let e = model.embed_with_images(&p.ids, &p.slots, f.as_ref())?;
        let len = e.dim(1)?.min(opts.model_max_length);
        embeds.push(e.narrow(1, 0, len)?);
        labels.push(&p.labels[..len.min(p.labels.len())]);
    }
    let lens: Vec<usize> = embeds.iter().map(|e| e.dim(1)).collect::<Result<_>>()?;
    let longest = lens.iter().copied().max().unwrap_or(0);
    let hidden_size = model.config().decoder.hidden_size;
    let padded = embeds
        .iter()
        .zip(&lens)
        .map(|(e, &len)| {
            if len == longest {
                Ok(e.clone())
            } else {
                let pad = Tensor::zeros((1, longest - len, hidden_size), e.dtype(), &device)?;
                Tensor::cat(&[e, &pad], 1)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let x = Tensor::cat(&padded, 0)?;
    // Positions whose next token is labelled, as rows of the flattened (b·L, hidden).
    let (rows, targets): (Vec<u32>, Vec<u32>) = labels
        .iter()
        .enumerate()
        .flat_map(|(b, l)| {
            l.iter()
                .enumerate()
                .skip(1)
                .filter(|(_, &t)| t != IGNORE_INDEX)
                .map(move |(i, &t)| ((b * longest + i - 1) as u32, t as u32))
        })
        .unzip();
    if rows.is_empty() && gathered.is_none() {
        return Ok(None);
    }
    let n = rows.len();
    let loss_of = |hidden: Tensor| -> Result<Tensor> {
        if rows.is_empty() {
            // Sharded layers: this rank still takes its part in every layer's exchanges,
            // with nothing to learn.
            // (Times a zero tensor: candle prunes a product with the constant 0 from the
            // backward, and the layers' exchanges would not happen.)
            let zero = Tensor::zeros((), DType::F32, &device)?;
            return hidden.sum_all()?.to_dtype(DType::F32)?.broadcast_mul(&zero);
        }
        let hidden = hidden.reshape((batch.len() * longest, hidden_size))?;
        let picked = hidden.index_select(&Tensor::new(rows.as_slice(), &device)?, 0)?;
        let logits = model.decoder.logits(&picked)?.to_dtype(DType::F32)?;
        let nll = kollava_model::kernels::cross_entropy::nll_sum(&logits, &targets)?;
        nll * (weight / n as f64)
    };
    let tokens = lens.iter().sum();
    let done = |loss: Tensor, grads, mut times: StepTimes, clock: std::time::Instant| {
        times.backward = clock.elapsed().as_secs_f64();
        Ok(Some(MicroBatch {
            loss: loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            grads,
            tokens,
            times,
        }))
    };
    if !opts.gradient_checkpointing && gathered.is_none() {
        let mut cache = KvCache::new(model.config().decoder.num_hidden_layers, batch.len());
        let loss = loss_of(model.decoder.forward(&x, &lens, &mut cache)?)?;
        times.forward = clock.elapsed().as_secs_f64();
        let clock = std::time::Instant::now();
        let grads = loss.backward()?;
        return done(loss, grads, times, clock);
    }
    // Gradient checkpointing (always, with sharded layers): the loss's gradients flow back
    // through the head, then layer by layer (each recomputed, the layers' own or gathered
    // from the ranks), then from the decoder's input into what produced it.
    let ck = match gathered.as_deref_mut() {
        Some(layers) => {
            layers.differentiate = false;
            model.decoder.forward_checkpointed_with(&x, &lens, layers)?
        }
        None => model.decoder.forward_checkpointed(&x, &lens)?,
    };
    let loss = loss_of(ck.hidden(&model.decoder)?)?;
    times.forward = clock.elapsed().as_secs_f64();
    let clock = std::time::Instant::now();
    let mut grads = loss.backward()?;
    let gx = match gathered {
        Some(layers) => {
            layers.differentiate = true;
            ck.backward_with(ck.output_grad(&grads)?, layers)?
        }
        None => ck.backward(&model.decoder, &mut grads, params)?,
    };
    if x.track_op() {
        let input_grads = (x * gx)?.sum_all()?.backward()?;
        kollava_model::decoder::accumulate(&mut grads, &input_grads, params)?;
    }
    done(loss, grads, times, clock)
}

/// Averages the gradients of `vars` and the loss over all ranks (a rank without gradients
/// counts as zeros). Returns the mean loss.
fn average_over_ranks(
    dist: &std::sync::Mutex<crate::dist::Dist>,
    grads: &mut Option<GradStore>,
    vars: &[candle_core::Var],
    loss: f64,
) -> Result<f64> {
    if vars.is_empty() {
        return Ok(loss);
    }
    let device = vars[0].device();
    let mut parts = Vec::with_capacity(vars.len() + 1);
    for v in vars {
        parts.push(match grads.as_ref().and_then(|g| g.get(v.as_tensor())) {
            Some(g) => g.to_dtype(DType::F32)?.flatten_all()?,
            None => Tensor::zeros(v.elem_count(), DType::F32, device)?,
        });
    }
    parts.push(Tensor::new(&[loss as f32], device)?);
    let flat = Tensor::cat(&parts, 0)?;
    let flat = dist
        .lock()
        .map_err(|_| candle_core::Error::Msg("the rank connection is poisoned".into()))?
        .all_reduce_mean_tensor(&flat)?;
    let store = match grads {
        Some(g) => g,
        None => {
            // Any backward gives a store to fill; this rank had nothing to learn from.
            let zero = (vars[0].as_tensor().sum_all()? * 0.0)?;
            grads.insert(zero.backward()?)
        }
    };
    let mut at = 0;
    for v in vars {
        let n = v.elem_count();
        let g = flat
            .narrow(0, at, n)?
            .reshape(v.dims())?
            .to_dtype(v.dtype())?;
        store.insert(v.as_tensor(), g);
        at += n;
    }
    Ok(flat.narrow(0, at, 1)?.to_vec1::<f32>()?[0] as f64)
}

/// Multiplies the gradients of row-masked parameters by their masks.
fn mask_rows(g: &mut GradStore, row_masks: &[(candle_core::Var, Tensor)]) -> Result<()> {
    for (var, mask) in row_masks {
        if let Some(grad) = g.remove(var.as_tensor()) {
            g.insert(var.as_tensor(), grad.broadcast_mul(mask)?);
        }
    }
    Ok(())
}

fn add_grads(acc: &mut Option<GradStore>, new: GradStore, vars: &[candle_core::Var]) -> Result<()> {
    match acc {
        Some(acc) => kollava_model::decoder::accumulate(acc, &new, vars),
        None => {
            *acc = Some(new);
            Ok(())
        }
    }
}

/// Trains `opt`'s parameters from optimizer step `start` (0, or where a checkpoint left
/// off) to the end. `on_step` sees every step; `on_save(step, opt)` is called when
/// `save_every` steps have passed and at the end.
#[allow(clippy::too_many_arguments)]
pub fn train(
    inp: &TrainInputs,
    opt: &mut AdamW,
    samples: &[Sample],
    opts: &TrainOptions,
    start: usize,
    save_every: Option<usize>,
    on_step: &mut dyn FnMut(&StepLog),
    on_save: &mut dyn FnMut(usize, &AdamW) -> Result<()>,
) -> Result<()> {
    let total = opts.total_steps(samples.len());
    let warmup = warmup_steps(opts.warmup_ratio, total);
    let per_epoch = opts.steps_per_epoch(samples.len());
    let vars = opt.vars();
    let micro = opts.batch_size.max(1);
    std::thread::scope(|scope| -> Result<()> {
        // The loader runs ahead by a few micro-batches; it stops when the receiver goes.
        let (tx, rx) = mpsc::sync_channel::<std::result::Result<Vec<Prepared>, String>>(4);
        scope.spawn(move || {
            for step in start..total {
                for chunk in opts.step_samples(samples.len(), step).chunks(micro) {
                    let batch: std::result::Result<Vec<Prepared>, String> =
                        chunk.iter().map(|&i| prepare(inp, &samples[i])).collect();
                    if tx.send(batch).is_err() {
                        return;
                    }
                }
            }
        });
        for step in start..total {
            let chunks = opts.step_samples(samples.len(), step).len().div_ceil(micro);
            let mut grads: Option<GradStore> = None;
            let (mut loss_sum, mut count, mut masked, mut tokens) = (0f64, 0usize, 0usize, 0usize);
            let mut times = StepTimes::default();
            for micro_index in 0..chunks {
                let batch = rx
                    .recv()
                    .map_err(|_| candle_core::Error::Msg("the data loader stopped".into()))?
                    .map_err(candle_core::Error::Msg)?;
                count += batch.len();
                masked += batch.iter().filter(|p| p.mismatch).count();
                // LoRA dropout masks from (seed, step, micro-batch): a resumed run draws
                // what the first one drew, and a recomputed layer what its forward drew.
                let dropout_seed = kollava_model::layers::splitmix64(
                    opts.seed
                        ^ ((step as u64) << 20 | (micro_index as u64) << 4 | opts.rank as u64),
                );
                let mut gathered = opt.shards_layers().then(|| GatheredLayers {
                    opt: &mut *opt,
                    dist: inp.dist,
                    cfg: &inp.model.config().decoder,
                    device: inp.model.decoder.device().clone(),
                    differentiate: false,
                    current: Vec::new(),
                    comm: [0.0; 2],
                });
                let micro = kollava_model::layers::with_dropout_seed(dropout_seed, || {
                    kollava_model::layers::with_bf16_autocast(opts.bf16, || {
                        let g = gathered.as_mut();
                        micro_batch_grads(inp, &batch, opts, 1.0 / chunks as f64, &vars, g)
                    })
                })?;
                if let Some(g) = &gathered {
                    // Exchanges inside the forward and the backward count as communication.
                    times.add(&StepTimes {
                        forward: -g.comm[0],
                        backward: -g.comm[1],
                        communication: g.comm[0] + g.comm[1],
                        ..Default::default()
                    });
                }
                let Some(mb) = micro else {
                    continue;
                };
                loss_sum += mb.loss;
                tokens += mb.tokens;
                times.add(&mb.times);
                add_grads(&mut grads, mb.grads, &vars)?;
            }
            let lr = cosine_lr(opts.lr, step, warmup, total);
            let clock = std::time::Instant::now();
            let layers_comm = times.communication;
            let grad_norm = if opt.is_sharded() {
                // Row masks are linear: applied to each rank's share before the averaging.
                if let Some(g) = grads.as_mut() {
                    mask_rows(g, inp.row_masks)?;
                }
                opt.lr = lr;
                let (loss, norm, comm) =
                    opt.sharded_step(grads.as_ref(), loss_sum, opts.max_grad_norm, inp.dist)?;
                loss_sum = loss;
                times.communication += comm;
                norm
            } else {
                if let Some(dist) = inp.dist {
                    let clock = std::time::Instant::now();
                    loss_sum = average_over_ranks(dist, &mut grads, &vars, loss_sum)?;
                    times.communication += clock.elapsed().as_secs_f64();
                }
                match grads.as_mut() {
                    Some(g) => {
                        mask_rows(g, inp.row_masks)?;
                        let norm = clip_grad_norm(g, &vars, opts.max_grad_norm)?;
                        opt.lr = lr;
                        opt.step(g)?;
                        norm
                    }
                    None => 0.0,
                }
            };
            times.optimizer = clock.elapsed().as_secs_f64() - (times.communication - layers_comm);
            let done = step + 1;
            on_step(&StepLog {
                step: done,
                total_steps: total,
                epoch: done as f64 / per_epoch as f64,
                loss: loss_sum,
                lr,
                grad_norm,
                samples: count,
                masked,
                tokens,
                times,
            });
            if save_every.is_some_and(|k| k > 0 && done % k == 0) && done < total {
                opt.gather_state(inp.dist, true)?;
                on_save(done, opt)?;
            }
        }
        drop(rx);
        // The result holds the weights only: no optimizer state to put together.
        opt.gather_state(inp.dist, false)?;
        on_save(total, opt)
    })
}
