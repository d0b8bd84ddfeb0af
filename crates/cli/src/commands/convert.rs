//! `kollava convert`: weights to safetensors, streamed tensor by tensor.

use anyhow::Result;
use candle_core::DType;
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::ConvertArgs;

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
