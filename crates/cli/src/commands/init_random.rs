//! `kollava init-random`: write a random-weight checkpoint with real shapes.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kollava_checkpoint::random::{self, DiskDtype, Layout};

use crate::args::{FloatType, InitRandomArgs};

pub fn run(args: &InitRandomArgs) -> Result<()> {
    let mut arch = *random::arch(&args.arch)
        .with_context(|| format!("unknown architecture {:?}", args.arch))?;
    if let Some(dir) = &args.tokenizer {
        let tok = kollava_inputs::Tokenizer::from_dir(dir)
            .with_context(|| format!("cannot load the tokenizer in {}", dir.display()))?;
        arch = arch.with_vocab(tok.vocab_size());
    }
    let arch = &arch;
    let dtype = match args.dtype {
        FloatType::F32 => DiskDtype::F32,
        FloatType::F16 => DiskDtype::F16,
        FloatType::Bf16 => DiskDtype::Bf16,
    };
    let layout = match args.layout {
        Some(crate::args::Layout::Hf) => Layout::Hf,
        Some(crate::args::Layout::Original) => Layout::Original,
        None => arch.default_layout,
    };
    let total = random::weight_bytes(arch, layout, dtype);
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(format!("writing {} ({})", arch.name, arch.about));
    let dir = random::init_random(
        arch,
        layout,
        dtype,
        args.seed,
        args.tokenizer.as_deref(),
        &args.out,
        &mut |done, _| bar.set_position(done),
    )?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {} ({:.2} GB of weights) to {}",
        arch.name,
        total as f64 / 1e9,
        dir.display()
    );
    Ok(())
}
