//! `kollava convert`: weights to safetensors, streamed tensor by tensor.

use anyhow::Result;
use candle_core::DType;
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::{ConvertArgs, ExtractProjectorArgs};

/// `kollava apply-delta` (`apply`) and `make-delta`.
pub fn delta(args: &crate::args::DeltaArgs, apply: bool) -> Result<()> {
    let dtype = args.dtype.as_deref().map(|d| match d {
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        _ => DType::F32,
    });
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
    let dtype = args.dtype.as_deref().map(|d| match d {
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        _ => DType::F32,
    });
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} tensors")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let n = kollava_checkpoint::convert::convert(
        &args.input,
        &args.output,
        dtype,
        &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    eprintln!("wrote {n} tensors to {}", args.output.display());
    Ok(())
}

/// `kollava extract-projector`.
pub fn extract_projector(args: &ExtractProjectorArgs) -> Result<()> {
    if args.output.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        anyhow::bail!(
            "--output {} must end in .safetensors (PyTorch pickles are not written)",
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
