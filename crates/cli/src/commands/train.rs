//! `kollava train`: stage 1 (projector) and stage 2 (LLM + projector, optionally the tower),
//! wired from the arguments to the library: the checks on them, the progress bar,
//! `metrics.jsonl` and TensorBoard. What trains, the default rates and what the run writes
//! where (checkpoints, resume, pruning, the final result) are `kollava_train::run`'s.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use kollava_checkpoint::OpenOptions;
use kollava_inputs::image::{self, AspectMode};
use kollava_train::labels::label_rule;
use kollava_train::lora;
use kollava_train::optim::AdamW;
use kollava_train::run::{
    default_lr, newest_checkpoint, projector_tensors, prune_checkpoints, save_checkpoint,
    save_final, start_end_rows, trainable_filter, Output, OPTIMIZER_FILE, PROJECTOR_FILE,
};
use kollava_train::trainer::{train, TrainInputs, TrainOptions};

use super::write_atomic;
use crate::args::TrainArgs;

/// `--nproc N`: runs this same command as N processes (ranks) and waits for them all.
fn launch(n: u32) -> Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let exe = std::env::current_exe()?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let mut children = Vec::new();
    for rank in 0..n {
        let child = std::process::Command::new(&exe)
            .args(&args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .spawn()
            .with_context(|| format!("cannot start rank {rank}"))?;
        children.push(child);
    }
    let mut failed = None;
    for (rank, mut c) in children.into_iter().enumerate() {
        let status = c.wait()?;
        if !status.success() && failed.is_none() {
            failed = Some((rank, status));
        }
    }
    match failed {
        Some((rank, status)) => bail!("rank {rank} of {n} failed ({status})"),
        None => Ok(()),
    }
}

/// Where a rank trains: in a CUDA build its GPU (`LOCAL_RANK`, else the rank, says which;
/// the CPU when there is none), otherwise the CPU.
fn train_device(rank: usize) -> Result<Device> {
    #[cfg(feature = "cuda")]
    {
        let local = std::env::var("LOCAL_RANK")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(rank);
        Ok(Device::cuda_if_available(local)?)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = rank;
        Ok(Device::Cpu)
    }
}

pub fn run(args: &TrainArgs) -> Result<()> {
    if args.nproc > 1 && std::env::var_os("RANK").is_none() {
        return launch(args.nproc);
    }
    let dist = kollava_train::dist::Dist::from_env().map_err(anyhow::Error::msg)?;
    let (rank, world) = dist.as_ref().map_or((0, 1), |d| (d.rank, d.world));
    let main_rank = rank == 0;
    let device = train_device(rank)?;
    #[cfg(feature = "nccl")]
    let dist = match dist {
        Some(mut d) if device.is_cuda() => {
            d.use_nccl(&device).map_err(anyhow::Error::msg)?;
            Some(d)
        }
        d => d,
    };
    let dist = dist.map(std::sync::Mutex::new);
    let finetune = args.stage == crate::args::Stage::Finetune;
    let lora = args.lora_r > 0;
    if lora && !finetune {
        bail!("--lora-r trains adapters in stage 2: add --stage finetune");
    }
    if args.bits != 4 && args.bits != 16 {
        bail!("--bits is 4 (QLoRA) or 16, not {}", args.bits);
    }
    if args.bits == 4 && !lora {
        bail!("--bits 4 (QLoRA) trains adapters over a 4-bit base: give --lora-r too");
    }
    if lora && args.tune_vision_tower {
        bail!("--tune-vision-tower with LoRA is not supported; train the tower in full finetuning");
    }
    let samples = kollava_train::data::read_samples(&args.data)?;
    if !args.image_folder.is_dir() {
        bail!(
            "--image-folder {} is not a directory",
            args.image_folder.display()
        );
    }
    std::fs::create_dir_all(&args.output_dir)
        .with_context(|| format!("cannot create {}", args.output_dir.display()))?;

    // Resume from the newest checkpoint when there is one.
    let resume = newest_checkpoint(&args.output_dir);
    let mut open = OpenOptions {
        vision_tower: args.model.vision_tower.clone(),
        projector: args.model.projector.clone(),
        mmproj: None,
    };
    let mut model_path = crate::pipeline::model_path(args.model.model.as_deref());
    let mut start = 0;
    let mut adapter_start = None;
    if let Some((step, dir)) = &resume {
        if main_rank {
            eprintln!("resuming from {} (step {step})", dir.display());
        }
        start = *step;
        if lora {
            let (_, weights) = lora::read_adapter(dir).map_err(anyhow::Error::msg)?;
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
    let version = match (&args.version, finetune) {
        (Some(v), _) => v.clone(),
        (None, false) => "plain".to_string(),
        (None, true) => args
            .model
            .conv_mode
            .clone()
            .unwrap_or_else(|| ckpt.default_template().to_string()),
    };
    let template = crate::pipeline::template(&version, "--version")?;

    let (freeze_llm, freeze_projector) = (args.freeze_backbone, args.freeze_mm_mlp_adapter);
    let tune_vision = args.tune_vision_tower;
    let boundary_rows = start_end_rows(&ckpt)?;
    let filter = trainable_filter(
        finetune,
        lora,
        (freeze_llm, freeze_projector, tune_vision),
        boundary_rows.is_some(),
    );
    let mut tm = ckpt.load_trainable(DType::F32, &device, filter)?;
    if let (Some(rows), Some(file), None) = (boundary_rows, &args.model.projector, &resume) {
        take_boundary_rows(&tm.tensors, file, rows)?;
    }
    let lora_opts = lora.then(|| lora::LoraOptions {
        r: args.lora_r,
        alpha: args.lora_alpha,
        dropout: args.lora_dropout,
        targets: args.lora_targets.clone(),
        four_bit: args.bits == 4,
        seed: args.seed,
    });
    let mut params = tm.params.clone();
    if let Some(lo) = &lora_opts {
        params.extend(lora::add_adapters(
            &mut tm.model,
            lo,
            adapter_start.as_ref(),
        )?);
    }
    if params.is_empty() {
        bail!("nothing to train: every part is frozen");
    }
    let n_params: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    if main_rank {
        eprintln!(
        "{} stage{}: training {n_params} parameters in {} tensors on {} samples ({version} format)",
        args.stage,
        match &lora_opts {
            Some(lo) if lo.four_bit => format!(" (QLoRA r={}, 4-bit base)", lo.r),
            Some(lo) => format!(" (LoRA r={})", lo.r),
            None => String::new(),
        },
        params.len(),
        samples.len()
    );
    }
    let tok = ckpt.tokenizer()?;
    let scheme = ckpt.image_tokens(&tok)?;
    let aspect = args
        .model
        .image_aspect
        .map_or(ckpt.aspect, AspectMode::from);
    let folder = args.image_folder.clone();
    let prefix = args.image_prefix.clone();
    let load = move |name: &str| {
        image::open(&folder.join(format!("{prefix}{name}"))).map_err(|e| e.to_string())
    };
    let row_masks: Vec<(candle_core::Var, Tensor)> = match boundary_rows {
        Some((s, e)) if !finetune => {
            let vocab = ckpt.config.decoder.vocab_size;
            let mask: Vec<f32> = (0..vocab as u32)
                .map(|i| if i == s || i == e { 1.0 } else { 0.0 })
                .collect();
            let mask = Tensor::from_vec(mask, (vocab, 1), &device)?;
            tm.params
                .iter()
                .filter(|(n, _)| n == "model.embed_tokens.weight")
                .map(|(_, v)| (v.clone(), mask.clone()))
                .collect()
        }
        _ => Vec::new(),
    };
    let inputs = TrainInputs {
        model: &tm.model,
        tokenizer: &tok,
        scheme: &scheme,
        template: &template,
        rule: label_rule(&template),
        preprocess: &ckpt.preprocess,
        aspect,
        load_image: &load,
        row_masks: &row_masks,
        dist: dist.as_ref(),
    };
    let opts = TrainOptions {
        lr: args.lr.unwrap_or(default_lr(finetune, lora)),
        epochs: args.epochs,
        max_steps: args.max_steps,
        batch_size: args.per_device_batch_size as usize,
        grad_accum: args.grad_accum as usize,
        warmup_ratio: args.warmup_ratio,
        weight_decay: args.weight_decay,
        seed: args.seed,
        model_max_length: args.model_max_length,
        train_vision: finetune && tune_vision,
        world,
        rank,
        gradient_checkpointing: args.gradient_checkpointing,
        ..TrainOptions::default()
    };
    let mut opt = AdamW::new(params.clone(), opts.lr, opts.weight_decay);
    if let Some((step, dir)) = &resume {
        let state = candle_core::safetensors::load(dir.join(OPTIMIZER_FILE), &device)
            .with_context(|| format!("cannot read {}", dir.join(OPTIMIZER_FILE).display()))?;
        opt.restore(&state, *step)?;
    }

    let metrics_path = args.output_dir.join("metrics.jsonl");
    if resume.is_some() && main_rank {
        // Keep the lines up to the checkpoint: the steps after it are about to be redone
        // (and a killed run may have left half a line).
        let kept: String = std::fs::read_to_string(&metrics_path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| (s as usize) <= start)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        write_atomic(&metrics_path, kept.as_bytes())?;
    }
    // Only rank 0 reports and saves; the other ranks just train.
    let mut metrics = if main_rank {
        Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(resume.is_some())
                .write(true)
                .truncate(resume.is_none())
                .open(&metrics_path)
                .with_context(|| format!("cannot write {}", metrics_path.display()))?,
        )
    } else {
        None
    };
    let mut board = match args.report_to {
        crate::args::ReportTo::Tensorboard if main_rank => {
            let dir = args.output_dir.join("runs");
            let w = kollava_train::tensorboard::EventWriter::create(&dir)
                .with_context(|| format!("cannot write TensorBoard events in {}", dir.display()))?;
            Some(w)
        }
        _ => None,
    };
    let total = opts.total_steps(samples.len());
    let bar = ProgressBar::new(total as u64).with_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  {elapsed_precise} ETA {eta_precise}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(start as u64);
    if !main_rank {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let started = std::time::Instant::now();
    let (mut seen, mut masked) = (0usize, 0usize);
    let mut write_err = None;
    let out = args.output_dir.clone();
    let save_dtype = args.save_dtype.dtype();
    let trainable_names: Vec<String> = tm.params.iter().map(|(n, _)| n.clone()).collect();
    let kind = match &lora_opts {
        Some(lo) => Output::Lora {
            opts: lo,
            params: &params,
            base: &model_path,
        },
        None if finetune => Output::Full,
        None => Output::Projector,
    };
    let mut on_save = |step: usize, opt: &AdamW| -> candle_core::Result<()> {
        if !main_rank {
            return Ok(());
        }
        let to_candle = |e: kollava_train::run::RunError| candle_core::Error::Msg(e.to_string());
        let result = if step == total {
            save_final(
                &ckpt,
                &tm.tensors,
                &trainable_names,
                &out,
                &kind,
                &version,
                save_dtype,
            )
        } else {
            save_checkpoint(
                &ckpt,
                &tm.tensors,
                &trainable_names,
                &out,
                &kind,
                &version,
                step,
                opt,
            )
            .and_then(|_| match args.save_total_limit {
                Some(k) => prune_checkpoints(&out, k.max(1)),
                None => Ok(()),
            })
        };
        result.map_err(to_candle)
    };
    train(
        &inputs,
        &mut opt,
        &samples,
        &opts,
        start,
        args.save_steps,
        &mut |log| {
            seen += log.samples * world;
            masked += log.masked;
            bar.set_position(log.step as u64);
            let rate = seen as f64 / started.elapsed().as_secs_f64();
            bar.set_message(format!(
                "loss {:.4}  lr {:.2e}  {rate:.1} samples/s",
                log.loss, log.lr
            ));
            let line = serde_json::json!({"step": log.step, "epoch": log.epoch, "loss": log.loss,
                "lr": log.lr, "grad_norm": log.grad_norm, "samples_per_s": rate});
            if let Some(b) = board.as_mut() {
                let r = b
                    .scalar("train/loss", log.loss, log.step)
                    .and_then(|_| b.scalar("train/learning_rate", log.lr, log.step))
                    .and_then(|_| b.scalar("train/grad_norm", log.grad_norm, log.step))
                    .and_then(|_| b.scalar("train/epoch", log.epoch, log.step));
                if let Err(e) = r {
                    write_err.get_or_insert(e);
                }
            }
            // One write per line, so that a killed run leaves whole lines.
            if let Some(m) = metrics.as_mut() {
                if let Err(e) = m.write_all(format!("{line}\n").as_bytes()) {
                    write_err.get_or_insert(e);
                }
            }
        },
        &mut on_save,
    )?;
    bar.finish();
    if let Some(e) = write_err {
        return Err(e).with_context(|| format!("cannot write {}", metrics_path.display()));
    }
    if !main_rank {
        return Ok(());
    }
    if masked > 0 {
        eprintln!("warning: {masked} samples were masked whole (tokenization mismatch)");
    }
    eprintln!(
        "wrote {} and {}",
        match kind {
            Output::Full => args.output_dir.display().to_string(),
            Output::Projector => args.output_dir.join(PROJECTOR_FILE).display().to_string(),
            Output::Lora { .. } => format!(
                "the adapter to {} (kollava merge-lora makes it a checkpoint)",
                args.output_dir.display()
            ),
        },
        metrics_path.display()
    );
    Ok(())
}

/// `kollava plot`.
pub fn plot(args: &crate::args::PlotArgs) -> Result<()> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.metrics.with_extension("png"));
    let n = kollava_train::plot::plot(&args.metrics, &out).map_err(anyhow::Error::msg)?;
    eprintln!("plotted {n} steps to {}", out.display());
    Ok(())
}

/// `kollava merge-lora`: base weights + `scale · B A`, written as a checkpoint of the
/// base's family (with the adapter run's projector and template).
pub fn merge_lora(args: &crate::args::MergeLoraArgs) -> Result<()> {
    let (opts, adapter) = lora::read_adapter(&args.adapter).map_err(anyhow::Error::msg)?;
    let non_lora = args.adapter.join(lora::NON_LORA_FILE);
    let ckpt = kollava_checkpoint::open(
        &args.model,
        &OpenOptions {
            vision_tower: None,
            projector: non_lora.is_file().then_some(non_lora.clone()),
            mmproj: None,
        },
    )?;
    let tm = ckpt.load_trainable(DType::F32, &Device::Cpu, Arc::new(|_: &str| false))?;
    let mut tensors = lora::merge(&tm.tensors, &adapter, opts.scale())?;
    let merged = tensors.len();
    if non_lora.is_file() {
        tensors.extend(projector_tensors(&tm.tensors));
    }
    let dtype = args.dtype.map(crate::args::FloatType::dtype);
    ckpt.save_with(&args.output, &tensors, dtype)?;
    let cfg: Option<serde_json::Value> = std::fs::read_to_string(args.adapter.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    if let Some(t) = cfg.as_ref().and_then(|c| c["kollava_template"].as_str()) {
        kollava_checkpoint::trainable::set_config_key(&args.output, "kollava_template", t)?;
    }
    eprintln!(
        "merged {merged} adapted weights (r={}, alpha={}) into {}",
        opts.r,
        opts.alpha,
        args.output.display()
    );
    Ok(())
}

/// A stage-1 file given to a checkpoint with `<im_start>`/`<im_end>` (v0) also carries those
/// rows of `embed_tokens` (stage 1 trained them): they replace the checkpoint's, as the
/// reference's `initialize_vision_tokenizer` does with `pretrain_mm_mlp_adapter`, taking
/// the file's last two rows when it holds the whole matrix, or its two rows.
fn take_boundary_rows(tensors: &[(String, Tensor)], file: &Path, rows: (u32, u32)) -> Result<()> {
    const NAME: &str = "model.embed_tokens.weight";
    let files = kollava_checkpoint::weights::WeightFiles::single(file)?;
    if !files.names.contains(NAME) {
        tracing::warn!(
            "{} has no {NAME}: <im_start>/<im_end> keep the checkpoint's embeddings",
            file.display()
        );
        return Ok(());
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
        .context("the model has no embed_tokens")?;
    let (vocab, hidden) = embed.dims2()?;
    let (n, width) = saved.dims2()?;
    if width != hidden {
        bail!(
            "{}: {NAME} is {n}x{width} but the model's embeddings are {hidden} wide",
            file.display()
        );
    }
    let new_rows = if n == vocab {
        saved.narrow(0, vocab - 2, 2)?
    } else if n == 2 {
        saved
    } else {
        bail!(
            "{}: {NAME} has {n} rows; expected the model's {vocab} or the 2 new ones",
            file.display()
        );
    };
    if (rows.0.min(rows.1) as usize, rows.0.max(rows.1) as usize) != (vocab - 2, vocab - 1) {
        tracing::warn!(
            "<im_start>/<im_end> are ids {}/{}, not the last two rows the reference replaces",
            rows.0,
            rows.1
        );
    }
    embed.slice_set(
        &new_rows.to_dtype(embed.dtype())?.contiguous()?,
        0,
        vocab - 2,
    )?;
    eprintln!(
        "took the <im_start>/<im_end> embeddings from {}",
        file.display()
    );
    Ok(())
}
