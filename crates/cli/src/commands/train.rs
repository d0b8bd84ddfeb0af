//! `kollava train`: stage 1 (projector) and stage 2 (LLM + projector, optionally the tower),
//! wired from the arguments to `kollava_train::run::execute`, which owns the run's policy
//! (resume, what trains, default rates, checkpoints, metrics, the result). Here: launching
//! `--nproc` ranks, the device, the flag combinations, and the progress bar.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};
use kollava_checkpoint::OpenOptions;
use kollava_train::lora;
use kollava_train::run::{execute, projector_tensors, Event, RunSpec};
use kollava_train::trainer::TrainOptions;

use crate::args::{ReportTo, Stage, TrainArgs, TrainSetup};

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
    if args.plan {
        return plan(args);
    }
    let Some(output_dir) = &args.output_dir else {
        bail!("--output-dir is required (where the results, checkpoints and metrics go)");
    };
    if args.nproc > 1 && std::env::var_os("RANK").is_none() {
        return launch(args.nproc);
    }
    let dist = kollava_train::dist::Dist::from_env().map_err(anyhow::Error::msg)?;
    let rank = dist.as_ref().map_or(0, |d| d.rank);
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
    let mut spec = spec(&args.setup)?;
    spec.output_dir = output_dir.clone();
    spec.save_steps = args.save_steps;
    spec.save_total_limit = args.save_total_limit;
    spec.save_dtype = args.save_dtype.dtype();
    spec.tensorboard = args.report_to == ReportTo::Tensorboard;
    spec.write_outputs = true;
    // Only rank 0 hears events; the bar is drawn there.
    let bar = ProgressBar::hidden();
    let four_bit = spec.lora.as_ref().map(|lo| (lo.r, lo.four_bit));
    let finished = execute(&spec, &device, dist.as_ref(), &mut |event| match event {
        Event::Resumed { step, dir } => {
            eprintln!("resuming from {} (step {step})", dir.display())
        }
        Event::Notice(n) => eprintln!("{n}"),
        Event::Started {
            parameters,
            tensors,
            samples,
            template,
            start,
            total,
        } => {
            eprintln!(
                "{} stage{}: training {parameters} parameters in {tensors} tensors on {samples} samples ({template} format)",
                args.setup.stage,
                match four_bit {
                    Some((r, true)) => format!(" (QLoRA r={r}, 4-bit base)"),
                    Some((r, false)) => format!(" (LoRA r={r})"),
                    None => String::new(),
                },
            );
            bar.set_length(total as u64);
            bar.set_position(start as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps  {msg}  {elapsed_precise} ETA {eta_precise}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
        Event::Step { log, samples_per_s } => {
            bar.set_position(log.step as u64);
            bar.set_message(format!(
                "loss {:.4}  lr {:.2e}  {samples_per_s:.1} samples/s",
                log.loss, log.lr
            ));
        }
    })?;
    bar.finish();
    if rank != 0 {
        return Ok(());
    }
    if finished.masked > 0 {
        eprintln!(
            "warning: {} samples were masked whole (tokenization mismatch)",
            finished.masked
        );
    }
    eprintln!(
        "wrote {} and {}",
        if finished.adapter {
            format!(
                "the adapter to {} (kollava merge-lora makes it a checkpoint)",
                finished.result.display()
            )
        } else {
            finished.result.display().to_string()
        },
        finished.metrics.display()
    );
    Ok(())
}

/// The adapters `setup` asks for (`None`: none), once its adapter flags are checked
/// against each other (a run and a plan refuse the same combinations).
fn adapters(args: &TrainSetup) -> Result<Option<lora::LoraOptions>> {
    let lora = args.lora_r > 0;
    if lora && args.stage != Stage::Finetune {
        bail!("--lora-r trains adapters in stage 2: add --stage finetune");
    }
    if args.bits == 4 && !lora {
        bail!("--bits 4 (QLoRA) trains adapters over a 4-bit base: give --lora-r too");
    }
    if lora && args.tune_vision_tower {
        bail!("--tune-vision-tower with LoRA is not supported; train the tower in full finetuning");
    }
    Ok(lora.then(|| lora::LoraOptions {
        r: args.lora_r,
        alpha: args.lora_alpha,
        dropout: args.lora_dropout,
        targets: args.lora_targets.clone(),
        four_bit: args.bits == 4,
        seed: args.seed,
    }))
}

/// The run `setup` describes, writing nothing (the caller sets where and what to write).
pub(crate) fn spec(args: &TrainSetup) -> Result<RunSpec> {
    let lora = adapters(args)?;
    Ok(RunSpec {
        model: crate::pipeline::model_path(args.model.model.as_deref()),
        vision_tower: args.model.vision_tower.clone(),
        projector: args.model.projector.clone(),
        samples: kollava_train::data::read_samples(
            args.data
                .as_deref()
                .context("--data is required (the training records)")?,
        )?,
        image_folder: args
            .image_folder
            .clone()
            .context("--image-folder is required (where the records' images are)")?,
        image_prefix: args.image_prefix.clone(),
        output_dir: std::path::PathBuf::new(),
        stage: args.stage,
        lora,
        freeze_llm: args.freeze_backbone,
        freeze_projector: args.freeze_mm_mlp_adapter,
        tune_vision: args.tune_vision_tower,
        version: args.version.clone(),
        conv_mode: args.model.conv_mode.clone(),
        aspect: args.model.image_aspect,
        lr: args.lr,
        train: TrainOptions {
            epochs: args.epochs,
            max_steps: args.max_steps,
            batch_size: args.per_device_batch_size as usize,
            grad_accum: args.grad_accum as usize,
            warmup_ratio: args.warmup_ratio,
            weight_decay: args.weight_decay,
            seed: args.seed,
            model_max_length: args.model_max_length,
            gradient_checkpointing: args.gradient_checkpointing,
            ..TrainOptions::default()
        },
        save_steps: None,
        save_total_limit: None,
        save_dtype: DType::F32,
        tensorboard: false,
        bf16: args.bf16,
        shard: args.shard,
        write_outputs: false,
    })
}

/// `kollava plot`.
pub fn plot(args: &crate::args::PlotArgs) -> Result<()> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.metrics.with_extension("png"));
    let n = crate::charts::plot(&args.metrics, &out).map_err(anyhow::Error::msg)?;
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

/// `train --plan`: the memory per rank of the run the other flags describe, on `--model`'s
/// configuration or a named `--arch` (no weights, no data).
fn plan(args: &TrainArgs) -> Result<()> {
    let setup = &args.setup;
    let lora_opts = adapters(setup)?;
    let (ckpt, name) = match &args.arch {
        Some(a) => {
            let arch = kollava_checkpoint::random::arch(a).context("unknown --arch")?;
            (kollava_checkpoint::random::config_only(arch)?, a.clone())
        }
        None => {
            let path = crate::pipeline::model_path(setup.model.model.as_deref());
            let opts = OpenOptions {
                vision_tower: setup.model.vision_tower.clone(),
                ..Default::default()
            };
            (kollava_checkpoint::open(&path, &opts)?, path)
        }
    };
    let world = std::env::var("WORLD_SIZE")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(args.nproc as usize);
    let p = kollava_train::plan::plan(&kollava_train::plan::PlanSpec {
        config: &ckpt.config,
        // v0's stage 1 trains the <im_start>/<im_end> rows (not LLaVA-MPT's: tied table).
        boundary_rows: ckpt.family.layout == kollava_checkpoint::Layout::LlavaV0
            && !ckpt.config.decoder.tie_word_embeddings,
        stage: setup.stage,
        lora: lora_opts.as_ref(),
        freeze_llm: setup.freeze_backbone,
        freeze_projector: setup.freeze_mm_mlp_adapter,
        tune_vision: setup.tune_vision_tower,
        bf16: setup.bf16,
        shard: setup.shard,
        world,
        batch: setup.per_device_batch_size as usize,
        seq_len: setup.model_max_length,
        grad_accum: setup.grad_accum as usize,
        checkpointing: setup.gradient_checkpointing,
    });
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let how = match (&lora_opts, setup.stage) {
        (Some(lo), _) if lo.four_bit => format!("QLoRA r={} over a 4-bit base", lo.r),
        (Some(lo), _) => format!("LoRA r={}", lo.r),
        (None, Stage::Finetune) => "full finetuning".into(),
        (None, Stage::Pretrain) => "projector pretraining".into(),
    };
    println!(
        "{name}: {how}, {:.2} B parameters, {:.2} B trained",
        p.parameters as f64 / 1e9,
        p.trained as f64 / 1e9
    );
    println!(
        "{world} rank{} ({}), {} sequence{} of {} tokens per rank and pass{}{}{}",
        if world == 1 { "" } else { "s" },
        match setup.shard {
            kollava_train::run::Sharding::None => "nothing sharded",
            kollava_train::run::Sharding::GradOpt => "gradients and optimizer state sharded",
            kollava_train::run::Sharding::Full =>
                "layer weights, gradients and optimizer state sharded",
        },
        setup.per_device_batch_size,
        if setup.per_device_batch_size == 1 {
            ""
        } else {
            "s"
        },
        setup.model_max_length,
        if setup.grad_accum > 1 {
            format!(", {} passes accumulated", setup.grad_accum)
        } else {
            String::new()
        },
        if setup.gradient_checkpointing {
            ", gradient checkpointing"
        } else {
            ""
        },
        if setup.bf16 { ", bf16 products" } else { "" },
    );
    println!("memory per rank (GiB)");
    for (what, b) in [
        ("weights", p.weights),
        ("gradients", p.gradients),
        ("optimizer state (AdamW)", p.optimizer),
        ("activations", p.activations),
        ("logits and loss", p.head),
        ("in flight at the peak", p.transient),
    ] {
        println!("  {what:<26}{:>9.2}", gib(b));
    }
    println!(
        "  {:<26}{:>9.2}",
        "training step, highest",
        gib(p.step_peak())
    );
    println!("  {:<26}{:>9.2}", "while loading", gib(p.load_peak));
    println!("  {:<26}{:>9.2}", "peak", gib(p.peak()));
    Ok(())
}
