//! `kollava train --stage pretrain`: projector pretraining with a progress bar,
//! `metrics.jsonl`, and the trained projector written atomically.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kollava_inputs::image;
use kollava_train::labels::label_rule;
use kollava_train::pretrain::{pretrain_projector, PretrainInputs, PretrainOptions};

use crate::args::TrainArgs;
use crate::pipeline;

/// Writes `bytes` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let template = crate::pipeline::template(&args.version, "--version")?;
    let samples = kollava_train::data::read_samples(&args.data)?;
    if !args.image_folder.is_dir() {
        bail!(
            "--image-folder {} is not a directory",
            args.image_folder.display()
        );
    }
    std::fs::create_dir_all(&args.output_dir)
        .with_context(|| format!("cannot create {}", args.output_dir.display()))?;
    let session = pipeline::load(&args.model)?;
    let folder = args.image_folder.clone();
    let prefix = args.image_prefix.clone();
    let load = move |name: &str| {
        image::open(&folder.join(format!("{prefix}{name}"))).map_err(|e| e.to_string())
    };
    let inputs = PretrainInputs {
        model: &session.model,
        tokenizer: &session.tok,
        scheme: &session.scheme,
        template: &template,
        rule: label_rule(&template),
        preprocess: &session.ckpt.preprocess,
        aspect: session.aspect,
        load_image: &load,
    };
    let opts = PretrainOptions {
        lr: args.lr,
        epochs: args.epochs,
        max_steps: args.max_steps,
        grad_accum: args.grad_accum as usize,
        warmup_ratio: args.warmup_ratio,
        weight_decay: args.weight_decay,
        seed: args.seed,
        ..PretrainOptions::default()
    };
    let metrics_path = args.output_dir.join("metrics.jsonl");
    let mut metrics = std::fs::File::create(&metrics_path)
        .with_context(|| format!("cannot write {}", metrics_path.display()))?;
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = std::time::Instant::now();
    let mut seen = 0usize;
    let mut write_err = None;
    let trained = pretrain_projector(&inputs, &samples, &opts, &mut |log| {
        seen += log.samples;
        bar.set_length(log.total_steps as u64);
        bar.set_position(log.step as u64);
        let rate = seen as f64 / started.elapsed().as_secs_f64();
        bar.set_message(format!(
            "loss {:.4}  lr {:.2e}  {rate:.1} samples/s",
            log.loss, log.lr
        ));
        let line = serde_json::json!({"step": log.step, "epoch": log.epoch, "loss": log.loss, "lr": log.lr, "grad_norm": log.grad_norm, "samples_per_s": rate});
        if let Err(e) = writeln!(metrics, "{line}") {
            write_err.get_or_insert(e);
        }
    })?;
    bar.finish();
    if let Some(e) = write_err {
        return Err(e).with_context(|| format!("cannot write {}", metrics_path.display()));
    }
    let tensors: HashMap<String, candle_core::Tensor> = trained
        .into_iter()
        .map(|(n, t)| (format!("model.mm_projector.{n}"), t))
        .collect();
    let out = args.output_dir.join("mm_projector.safetensors");
    let tmp = out.with_extension("tmp");
    candle_core::safetensors::save(&tensors, &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &out).with_context(|| format!("cannot write {}", out.display()))?;
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        session.ckpt.dir.join("config.json"),
    )?)?;
    config["tune_mm_mlp_adapter"] = serde_json::json!(true);
    write_atomic(
        &args.output_dir.join("config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    eprintln!("wrote {} and {}", out.display(), metrics_path.display());
    Ok(())
}
