//! `kollava convert`: weights to safetensors, streamed tensor by tensor.

use anyhow::Result;
use candle_core::DType;
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::{ConvertArgs, ExtractProjectorArgs};

/// `kollava apply-delta` (`apply`) and `make-delta`.
pub fn delta(args: &crate::args::DeltaArgs, apply: bool) -> Result<()> {
    let dtype = args.dtype.map(crate::args::FloatType::dtype);
    use kollava_checkpoint::delta::{apply_delta, make_delta};
    let (n, out) = if apply {
        (
            apply_delta(&args.base, &args.delta, &args.target, dtype)?,
            &args.target,
        )
    } else {
        (
            make_delta(&args.base, &args.target, &args.delta, dtype)?,
            &args.delta,
        )
    };
    eprintln!("wrote {n} tensors to {}", out.display());
    Ok(())
}

pub fn run(args: &ConvertArgs) -> Result<()> {
    let dtype = args.dtype.map(crate::args::FloatType::dtype);
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} tensors")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let n = if let Some(layout) = &args.layout {
        let ckpt =
            kollava_checkpoint::open(&args.input.display().to_string(), &Default::default())?;
        if *layout == crate::args::Layout::Hf {
            kollava_checkpoint::convert::to_llava_hf(&ckpt, &args.output, &mut progress)?
        } else {
            kollava_checkpoint::convert::to_llava_original(&ckpt, &args.output, &mut progress)?
        }
    } else {
        kollava_checkpoint::convert::convert(&args.input, &args.output, dtype, &mut progress)?
    };
    bar.finish_and_clear();
    eprintln!("wrote {n} tensors to {}", args.output.display());
    Ok(())
}

/// `kollava extract-projector`.
pub fn extract_projector(args: &ExtractProjectorArgs) -> Result<()> {
    if !matches!(
        args.output.extension().and_then(|e| e.to_str()),
        Some("safetensors" | "bin")
    ) {
        anyhow::bail!(
            "--output {} must end in .safetensors or .bin (a PyTorch pickle, as LLaVA's \
             --pretrain_mm_mlp_adapter reads it)",
            args.output.display()
        );
    }
    let keys = kollava_checkpoint::convert::extract_projector(
        &args.model,
        &args.output,
        args.with_embeddings,
    )?;
    eprintln!(
        "wrote {} tensors ({}) to {}",
        keys.len(),
        keys.join(", "),
        args.output.display()
    );
    Ok(())
}

/// `kollava quantize`.
pub fn quantize(args: &crate::args::QuantizeArgs) -> Result<()> {
    use kollava_checkpoint::gguf;
    let q = args.qtype;
    let ckpt = kollava_checkpoint::open(&args.input, &Default::default())?;
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} tensors {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let written = gguf::quantize(&ckpt, &args.output, q, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {} tensors ({:.1} MiB) to {} and {}",
        written.tensors,
        written.bytes as f64 / (1 << 20) as f64,
        written.model.display(),
        written.mmproj.display()
    );
    if args.report {
        let load = |model: String| {
            kollava_generate::Session::load(&kollava_generate::SessionOptions {
                model,
                vision_tower: None,
                conv_mode: None,
                aspect: None,
                dtype: Some(DType::F32),
                projector: None,
                mmproj: None,
                ..Default::default()
            })
        };
        let source = load(args.input.clone())?;
        let quantized = load(args.output.display().to_string())?;
        let image = super::bench::test_pattern();
        use kollava_inputs::template::{Conversation, Role};
        let mut conv = Conversation::new(source.template.clone());
        conv.push(
            Role::User,
            Some(source.user_text("Describe the image in detail.", 1)),
        );
        conv.push(Role::Assistant, None);
        let r = kollava_eval::quant::compare(
            &source,
            &quantized,
            &conv.prompt(),
            &[image],
            args.report_tokens,
        )?;
        println!(
            "{}: top-1 agreement {:.3} over {} greedy tokens, mean KL {:.5} nats",
            q.name(),
            r.top1_agreement,
            r.tokens,
            r.mean_kl
        );
    }
    Ok(())
}
