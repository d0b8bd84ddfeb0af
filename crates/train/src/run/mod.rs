//! A training run as one library call: [`execute`] takes a [`RunSpec`] (what the `train`
//! command's arguments say) and does what the reference's `train.py` does around the loop
//! ([`crate::trainer`]): opens the checkpoint, or resumes from the newest `checkpoint-STEP`
//! with its optimizer state; chooses which weights train, the default learning rate and
//! template; takes v0's `<im_start>`/`<im_end>` rows from a stage-1 file; adds adapters;
//! trains; records [`metrics`] and writes checkpoints and the result ([`outputs`]). Only
//! rank 0 of a data-parallel run records and writes. The caller hears of progress through
//! [`Event`]s and draws it as it likes.

pub mod metrics;
pub mod outputs;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use kollava_checkpoint::trainable::TrainableFilter;
use kollava_checkpoint::{CheckpointError, OpenOptions};
use kollava_inputs::image::{self, AspectMode};
use kollava_inputs::template::Template;

use crate::data::{DataError, Sample};
use crate::dist::Dist;
use crate::labels::label_rule;
use crate::lora::{self, LoraOptions};
use crate::optim::AdamW;
use crate::trainer::{train, StepLog, TrainInputs, TrainOptions};
pub use metrics::{Metrics, METRICS_FILE};
pub use outputs::{
    checkpoints, newest_checkpoint, projector_tensors, prune_checkpoints, save_checkpoint,
    save_final, save_projector, start_end_rows, Output, NON_LORA_BIN, OPTIMIZER_FILE,
    PROJECTOR_BIN, PROJECTOR_FILE, STATE_FILE,
};

/// What can fail in a run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The spec asks for something that cannot be done (named in the message).
    #[error("{0}")]
    Invalid(String),
    #[error("cannot write {path}: {reason}")]
    Write { path: String, reason: String },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Tokenizer(#[from] kollava_inputs::tokenizer::TokenizerError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// LLaVA's two training stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Stage {
    /// The projector only (and v0's image boundary rows).
    Pretrain,
    /// The language model and the projector (optionally the tower), or adapters.
    Finetune,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Pretrain => "pretrain",
            Stage::Finetune => "finetune",
        })
    }
}

/// How a data-parallel run splits its training state between the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Sharding {
    /// Every rank holds everything (plain data parallelism, gradients all-reduced).
    #[default]
    None,
    /// Each rank keeps AdamW's moments for 1/N of the parameters and updates only those;
    /// gradients are reduce-scattered and the updated parameters all-gathered (ZeRO-2,
    /// FSDP's `SHARD_GRAD_OP`).
    GradOpt,
    /// Each rank keeps 1/N of the decoder layers' parameters too, gathering a layer's for
    /// its forward and again for its recomputation in the backward (ZeRO-3, FSDP's
    /// `FULL_SHARD`; gradient checkpointing is implied). The embeddings, head, final norm,
    /// projector and tower stay whole on every rank, their gradients and optimizer state
    /// sharded as under `GradOpt`.
    Full,
}

/// Everything a run is asked to do.
pub struct RunSpec {
    /// Checkpoint directory (or a name the checkpoint crate resolves).
    pub model: String,
    /// Another vision tower (directory or name) than the checkpoint's.
    pub vision_tower: Option<String>,
    /// A stage-1 projector file to start from.
    pub projector: Option<PathBuf>,
    pub samples: Vec<Sample>,
    pub image_folder: PathBuf,
    /// Put before every image name (KoLLaVA's `COCO_train2014_`).
    pub image_prefix: String,
    /// Where checkpoints, metrics and the result go (created when missing).
    pub output_dir: PathBuf,
    pub stage: Stage,
    /// Stage 2 with adapters instead of full finetuning.
    pub lora: Option<LoraOptions>,
    pub freeze_llm: bool,
    pub freeze_projector: bool,
    pub tune_vision: bool,
    /// The data's template (default: `plain` in stage 1; `conv_mode`, else the
    /// checkpoint's own, in stage 2).
    pub version: Option<String>,
    pub conv_mode: Option<String>,
    /// How images are fitted (default: the checkpoint's).
    pub aspect: Option<AspectMode>,
    /// Default: [`default_lr`].
    pub lr: Option<f64>,
    /// The loop's options; `lr`, `train_vision`, `rank` and `world` are set by the run.
    pub train: TrainOptions,
    /// Write `checkpoint-STEP` this often.
    pub save_steps: Option<usize>,
    /// Keep only the newest this many checkpoints.
    pub save_total_limit: Option<usize>,
    /// The final checkpoint's weight type (stage 2 without adapters).
    pub save_dtype: DType,
    /// Also write TensorBoard events.
    pub tensorboard: bool,
    /// How the ranks split the training state.
    pub shard: Sharding,
    /// Every matrix product in bf16 with our kernels, as the reference's `--bf16 True`
    /// autocasts them: frozen matrices packed once (the language model in stage 1, the bases
    /// under LoRA, the tower), trained ones rounded for each product, forward and backward;
    /// the master weights, their gradients and the optimizer state stay f32.
    pub bf16: bool,
    /// `false`: write nothing at all (no metrics, checkpoints or result), as a benchmark
    /// runs; resuming is then off too.
    pub write_outputs: bool,
}

/// What a run tells its caller as it goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// Resuming from this checkpoint.
    Resumed { step: usize, dir: &'a Path },
    /// Something the user should know that does not stop the run.
    Notice(String),
    /// The weights are ready and the loop starts.
    Started {
        parameters: usize,
        tensors: usize,
        samples: usize,
        template: &'a str,
        /// The step it starts after (the resumed one, else 0) and the last.
        start: usize,
        total: usize,
    },
    /// One optimizer step, with the samples per second of all ranks since the start.
    Step {
        log: &'a StepLog,
        samples_per_s: f64,
    },
}

/// What a finished run wrote (rank 0; the other ranks' is the same description).
#[derive(Debug)]
pub struct Finished {
    /// The result: the projector file, the checkpoint directory or the adapter directory.
    pub result: PathBuf,
    pub adapter: bool,
    pub metrics: PathBuf,
    /// Samples masked whole because their tokenization did not match.
    pub masked: usize,
    /// Bytes this rank held between steps: AdamW's moments, and the trained decoder layers'
    /// weights (its range of them under `--shard full`).
    pub optimizer_bytes: usize,
    pub layer_weight_bytes: usize,
}

/// The learning rate the reference's scripts use when none is given: stage 1 2e-3, full
/// finetuning 2e-5, LoRA 2e-4.
pub fn default_lr(finetune: bool, lora: bool) -> f64 {
    match (finetune, lora) {
        (false, _) => 2e-3,
        (true, true) => 2e-4,
        (true, false) => 2e-5,
    }
}

/// Which weights train, by canonical name. Stage 1: the projector, and v0's
/// `<im_start>`/`<im_end>` embedding rows when it has them (`boundary_rows`). Stage 2: the
/// projector unless frozen, the language model unless frozen or under adapters, the tower
/// when asked.
pub fn trainable_filter(
    finetune: bool,
    lora: bool,
    (freeze_llm, freeze_projector, tune_vision): (bool, bool, bool),
    boundary_rows: bool,
) -> Arc<TrainableFilter> {
    if finetune {
        Arc::new(move |n: &str| {
            if n.starts_with("vision_model.") {
                tune_vision
            } else if n.starts_with("model.mm_projector.") {
                !freeze_projector
            } else {
                !freeze_llm && !lora
            }
        })
    } else {
        Arc::new(move |n: &str| {
            n.starts_with("model.mm_projector.")
                || (boundary_rows && n == "model.embed_tokens.weight")
        })
    }
}

impl RunSpec {
    /// The combinations no run can do.
    fn check(&self) -> Result<(), RunError> {
        let invalid = |m: &str| Err(RunError::Invalid(m.to_string()));
        if self.lora.is_some() && self.stage == Stage::Pretrain {
            return invalid("adapters train in stage 2 (finetune), not in stage 1");
        }
        if self.lora.is_some() && self.tune_vision {
            return invalid(
                "training the vision tower under LoRA is not supported; train it in full finetuning",
            );
        }
        if self.shard == Sharding::Full && self.lora.is_some() {
            return invalid(
                "--shard full shards trained decoder layers; under adapters the base is frozen: use --shard grad-opt",
            );
        }
        if self.samples.is_empty() {
            return invalid("no training samples");
        }
        if !self.image_folder.is_dir() {
            return Err(RunError::Invalid(format!(
                "--image-folder {} is not a directory",
                self.image_folder.display()
            )));
        }
        Ok(())
    }
}

/// Runs `spec` on `device` (with the other ranks of `dist`, if any) to the end.
pub fn execute(
    spec: &RunSpec,
    device: &Device,
    dist: Option<&Mutex<Dist>>,
    on_event: &mut dyn FnMut(Event),
) -> Result<Finished, RunError> {
    spec.check()?;
    let (rank, world) = dist.map_or((0, 1), |d| {
        let d = d.lock().unwrap_or_else(|e| e.into_inner());
        (d.rank, d.world)
    });
    let main_rank = rank == 0;
    let writes = main_rank && spec.write_outputs;
    let finetune = spec.stage == Stage::Finetune;
    let out = &spec.output_dir;
    if spec.write_outputs {
        std::fs::create_dir_all(out).map_err(outputs::write(out))?;
    }

    // Resume from the newest checkpoint when there is one.
    let resume = newest_checkpoint(out).filter(|_| spec.write_outputs);
    let mut open = OpenOptions {
        vision_tower: spec.vision_tower.clone(),
        projector: spec.projector.clone(),
        mmproj: None,
    };
    let mut model_path = spec.model.clone();
    let mut start = 0;
    let mut adapter_start = None;
    if let Some((step, dir)) = &resume {
        if main_rank {
            on_event(Event::Resumed { step: *step, dir });
        }
        start = *step;
        if spec.lora.is_some() {
            let (_, weights) = lora::read_adapter(dir).map_err(RunError::Invalid)?;
            adapter_start = Some(weights);
            if dir.join(lora::NON_LORA_FILE).is_file() {
                open.projector = Some(dir.join(lora::NON_LORA_FILE));
            }
        } else if finetune {
            model_path = dir.display().to_string();
            open.projector = None;
        } else {
            open.projector = Some(dir.join(PROJECTOR_FILE));
        }
    }
    let ckpt = kollava_checkpoint::open(&model_path, &open)?;
    let version = match (&spec.version, finetune) {
        (Some(v), _) => v.clone(),
        (None, false) => "plain".to_string(),
        (None, true) => spec
            .conv_mode
            .clone()
            .unwrap_or_else(|| ckpt.default_template().to_string()),
    };
    let template = Template::by_name(&version).ok_or_else(|| {
        RunError::Invalid(format!(
            "unknown template {version:?}; known: {}",
            Template::names().join(", ")
        ))
    })?;

    let boundary_rows = start_end_rows(&ckpt)?;
    let filter = trainable_filter(
        finetune,
        spec.lora.is_some(),
        (spec.freeze_llm, spec.freeze_projector, spec.tune_vision),
        boundary_rows.is_some(),
    );
    // QLoRA's base is quantized as it is read: it never exists whole in f32.
    let form = match &spec.lora {
        Some(lo) if lo.four_bit => kollava_model::form::Form::Q4Base,
        _ => kollava_model::form::Form::AsRead,
    };
    let mut tm = ckpt.load_trainable_as(DType::F32, device, filter, form)?;
    if let (Some(rows), Some(file), None) = (boundary_rows, &spec.projector, &resume) {
        if let Some(note) = take_boundary_rows(&tm.tensors, file, rows)? {
            on_event(Event::Notice(note));
        }
    }
    let mut params = tm.params.clone();
    if let Some(lo) = &spec.lora {
        params.extend(lora::add_adapters(
            &mut tm.model,
            lo,
            adapter_start.as_ref(),
        )?);
    }
    if params.is_empty() {
        return Err(RunError::Invalid(
            "nothing to train: every part is frozen".into(),
        ));
    }
    if spec.bf16 {
        tm.model
            .pack_frozen_bf16()
            .map_err(|e| RunError::Invalid(e.to_string()))?;
        use kollava_model::kernels::bf16::{kernels, Kernels};
        if main_rank && kernels() == Some(Kernels::Avx2Fma) {
            on_event(Event::Notice(
                "this CPU has no bf16 instructions (AVX512-BF16): --bf16 gives bf16 numerics here but runs slower than f32".into(),
            ));
        }
    }
    if spec.bf16 || spec.lora.as_ref().is_some_and(|lo| lo.four_bit) {
        // The frozen matrices' f32 copies are no longer used once packed in bf16 or 4 bits
        // (outputs take the trained weights, the projector and the embedding rows).
        tm.tensors.retain(|(n, t)| {
            t.is_variable()
                || n.starts_with("model.mm_projector.")
                || n == "model.embed_tokens.weight"
        });
    }
    let tok = ckpt.tokenizer()?;
    let scheme = ckpt.image_tokens(&tok)?;
    let folder = spec.image_folder.clone();
    let prefix = spec.image_prefix.clone();
    let load = move |name: &str| {
        image::open(&folder.join(format!("{prefix}{name}"))).map_err(|e| e.to_string())
    };
    // Stage 1 of v0 trains just the two boundary rows of the embedding matrix.
    let row_masks: Vec<(candle_core::Var, Tensor)> = match boundary_rows {
        Some((s, e)) if !finetune => {
            let vocab = ckpt.config.decoder.vocab_size;
            let mask: Vec<f32> = (0..vocab as u32)
                .map(|i| if i == s || i == e { 1.0 } else { 0.0 })
                .collect();
            let mask = Tensor::from_vec(mask, (vocab, 1), device)?;
            tm.params
                .iter()
                .filter(|(n, _)| n == "model.embed_tokens.weight")
                .map(|(_, v)| (v.clone(), mask.clone()))
                .collect()
        }
        _ => Vec::new(),
    };
    let mut opts = TrainOptions {
        lr: spec.lr.unwrap_or(default_lr(finetune, spec.lora.is_some())),
        train_vision: finetune && spec.tune_vision,
        world,
        rank,
        bf16: spec.bf16,
        ..spec.train.clone()
    };
    let parameters = params.iter().map(|(_, v)| v.elem_count()).sum();
    let tensors = params.len();
    let trainable_names: Vec<String> = tm.params.iter().map(|(n, _)| n.clone()).collect();
    let mut opt = AdamW::new(params.clone(), opts.lr, opts.weight_decay);
    match spec.shard {
        Sharding::None => {}
        Sharding::GradOpt => opt.shard(rank, world)?,
        Sharding::Full => {
            let in_layers = |names: &mut dyn Iterator<Item = &String>| {
                names.filter(|n| layer_of(n).is_some()).count()
            };
            let trained = in_layers(&mut tm.params.iter().map(|(n, _)| n));
            if trained == 0 {
                opt.shard(rank, world)?;
                if main_rank {
                    on_event(Event::Notice(
                        "no decoder layer trains: --shard full shards the gradients and optimizer state (as grad-opt)".into(),
                    ));
                }
            } else {
                if trained != in_layers(&mut tm.tensors.iter().map(|(n, _)| n)) {
                    return Err(RunError::Invalid(
                        "--shard full shards decoder layers that train whole; some of these layers' weights are frozen".into(),
                    ));
                }
                if !opts.gradient_checkpointing && main_rank {
                    on_event(Event::Notice(
                        "--shard full recomputes each layer in the backward: gradient checkpointing is on".into(),
                    ));
                }
                opts.gradient_checkpointing = true;
                // Only this rank's range of the layers' weights stays.
                opt.shard_layers(rank, world, &layer_of)?;
                tm.model.decoder.drop_layers();
                tm.tensors.retain(|(n, _)| layer_of(n).is_none());
                tm.params.retain(|(n, _)| layer_of(n).is_none());
                params.retain(|(n, _)| layer_of(n).is_none());
            }
        }
    }
    let inputs = TrainInputs {
        model: &tm.model,
        tokenizer: &tok,
        scheme: &scheme,
        template: &template,
        rule: label_rule(&template),
        preprocess: &ckpt.preprocess,
        aspect: spec.aspect.unwrap_or(ckpt.aspect),
        load_image: &load,
        row_masks: &row_masks,
        dist,
    };
    if let Some((step, dir)) = &resume {
        let path = dir.join(OPTIMIZER_FILE);
        let state = candle_core::safetensors::load(&path, device)
            .map_err(|e| RunError::Invalid(format!("cannot read {}: {e}", path.display())))?;
        opt.restore(&state, *step)?;
    }
    let mut metrics = if writes {
        Some(Metrics::open(
            out,
            resume.as_ref().map(|(s, _)| *s),
            spec.tensorboard,
        )?)
    } else {
        None
    };
    let total = opts.total_steps(spec.samples.len());
    if main_rank {
        on_event(Event::Started {
            parameters,
            tensors,
            samples: spec.samples.len(),
            template: &version,
            start,
            total,
        });
    }
    let kind = match &spec.lora {
        Some(lo) => Output::Lora {
            opts: lo,
            params: &params,
            base: &model_path,
        },
        None if finetune => Output::Full,
        None => Output::Projector,
    };
    let mut on_save = |step: usize, opt: &AdamW| -> candle_core::Result<()> {
        if !writes {
            return Ok(());
        }
        // Sharded layers' weights, put together by the optimizer for the save.
        let mut all = tm.tensors.clone();
        all.extend(opt.gathered_params().iter().cloned());
        let result = if step == total {
            save_final(
                &ckpt,
                &all,
                &trainable_names,
                out,
                &kind,
                &version,
                spec.save_dtype,
            )
        } else {
            save_checkpoint(
                &ckpt,
                &all,
                &trainable_names,
                out,
                &kind,
                &version,
                step,
                opt,
            )
            .and_then(|_| match spec.save_total_limit {
                Some(k) => prune_checkpoints(out, k.max(1)),
                None => Ok(()),
            })
        };
        result.map_err(|e| candle_core::Error::Msg(e.to_string()))
    };
    let started = std::time::Instant::now();
    let (mut seen, mut masked) = (0usize, 0usize);
    // A metrics write that fails does not stop the run; it is reported at the end.
    let mut record_err = None;
    train(
        &inputs,
        &mut opt,
        &spec.samples,
        &opts,
        start,
        spec.save_steps,
        &mut |log| {
            seen += log.samples * world;
            masked += log.masked;
            let samples_per_s = seen as f64 / started.elapsed().as_secs_f64();
            if let Some(m) = metrics.as_mut() {
                if let Err(e) = m.record(log, samples_per_s) {
                    record_err.get_or_insert(e);
                }
            }
            if main_rank {
                on_event(Event::Step { log, samples_per_s });
            }
        },
        &mut on_save,
    )?;
    if let Some(e) = record_err {
        return Err(e);
    }
    Ok(Finished {
        result: match kind {
            Output::Projector => out.join(PROJECTOR_FILE),
            _ => out.clone(),
        },
        adapter: spec.lora.is_some(),
        metrics: out.join(METRICS_FILE),
        masked,
        optimizer_bytes: opt.state_bytes(),
        layer_weight_bytes: opt.layer_param_bytes(&layer_of),
    })
}

/// The decoder layer a parameter belongs to (`model.layers.3.mlp.up_proj.weight` → 3).
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// A stage-1 file given to a checkpoint with `<im_start>`/`<im_end>` (v0) also carries those
/// rows of `embed_tokens` (stage 1 trained them): they replace the checkpoint's, as the
/// reference's `initialize_vision_tokenizer` does with `pretrain_mm_mlp_adapter`, taking
/// the file's last two rows when it holds the whole matrix, or its two rows. Returns what
/// the user should hear.
fn take_boundary_rows(
    tensors: &[(String, Tensor)],
    file: &Path,
    rows: (u32, u32),
) -> Result<Option<String>, RunError> {
    const NAME: &str = "model.embed_tokens.weight";
    let files = kollava_checkpoint::weights::WeightFiles::single(file)?;
    if !files.names.contains(NAME) {
        return Ok(Some(format!(
            "{} has no {NAME}: <im_start>/<im_end> keep the checkpoint's embeddings",
            file.display()
        )));
    }
    let vb = kollava_checkpoint::weights::var_builder_filtered(
        &files,
        DType::F32,
        &Device::Cpu,
        &|n: &str| (n == NAME).then_some(DType::F32),
    )?;
    let saved = vb.get_unchecked(NAME)?;
    let embed = tensors
        .iter()
        .find(|(n, _)| n == NAME)
        .map(|(_, t)| t)
        .ok_or_else(|| RunError::Invalid("the model has no embed_tokens".into()))?;
    let (vocab, hidden) = embed.dims2()?;
    let (n, width) = saved.dims2()?;
    let bad = |m: String| Err(RunError::Invalid(format!("{}: {m}", file.display())));
    if width != hidden {
        return bad(format!(
            "{NAME} is {n}x{width} but the model's embeddings are {hidden} wide"
        ));
    }
    let new_rows = if n == vocab {
        saved.narrow(0, vocab - 2, 2)?
    } else if n == 2 {
        saved
    } else {
        return bad(format!(
            "{NAME} has {n} rows; expected the model's {vocab} or the 2 new ones"
        ));
    };
    embed.slice_set(
        &new_rows.to_dtype(embed.dtype())?.contiguous()?,
        0,
        vocab - 2,
    )?;
    let (lo, hi) = (rows.0.min(rows.1) as usize, rows.0.max(rows.1) as usize);
    Ok(Some(if (lo, hi) != (vocab - 2, vocab - 1) {
        format!(
            "<im_start>/<im_end> are ids {}/{}, not the last two rows the reference replaces; \
             took the last two rows from {}",
            rows.0,
            rows.1,
            file.display()
        )
    } else {
        format!(
            "took the <im_start>/<im_end> embeddings from {}",
            file.display()
        )
    }))
}
