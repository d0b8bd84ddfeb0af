//! `kollava data …`: training data tools.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use kollava_train::check::{check as check_data, histogram, LengthCheck};
use kollava_train::labels::label_rule;

use crate::args::{DataCheckArgs, DataSynthArgs};

/// `kollava data synth`.
pub fn synth(args: &DataSynthArgs) -> Result<ExitCode> {
    use anyhow::Context;
    let opts = kollava_train::synth::SynthOptions {
        seed: args.seed,
        count: args.count,
        test_count: args.test_count,
    };
    let s = kollava_train::synth::generate(&args.out, &opts)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!(
        "wrote {} images, {} captions, {} conversations and {} held-out questions to {}",
        s.images,
        s.pretrain,
        s.finetune,
        s.test,
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `kollava data check`.
pub fn check(args: &DataCheckArgs) -> Result<ExitCode> {
    let template = crate::pipeline::template(&args.version, "--version")?;
    let tokenizer_parts = match &args.model {
        Some(m) => {
            let ckpt = kollava_checkpoint::open(m, &Default::default())?;
            let tok = ckpt.tokenizer()?;
            let scheme = ckpt.image_tokens(&tok)?;
            Some((tok, scheme))
        }
        None => None,
    };
    let lengths = tokenizer_parts
        .as_ref()
        .map(|(tokenizer, scheme)| LengthCheck {
            tokenizer,
            scheme,
            template: &template,
            rule: label_rule(&template),
            max_length: args.model_max_length,
        });
    let report = check_data(
        &args.data,
        &args.image_folder,
        &args.image_prefix,
        lengths.as_ref(),
    )?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} records, {} problems",
        report.records,
        report.problems.len()
    )?;
    if !report.lengths.is_empty() {
        writeln!(
            out,
            "token lengths ({} over {}):",
            report.too_long, args.model_max_length
        )?;
        let peak = histogram(&report.lengths, 10)
            .iter()
            .map(|b| b.2)
            .max()
            .unwrap_or(1)
            .max(1);
        for (lo, hi, n) in histogram(&report.lengths, 10) {
            writeln!(
                out,
                "  {lo:>6}-{hi:<6} {n:>7} {}",
                "#".repeat(n * 40 / peak)
            )?;
        }
        if let Some(png) = &args.histogram {
            let bars = histogram(&report.lengths, 10)
                .into_iter()
                .map(|(lo, hi, n)| (format!("{lo}-{hi}"), n as f64))
                .collect();
            let title = format!(
                "token lengths: {} samples, {} over {}",
                report.lengths.len(),
                report.too_long,
                args.model_max_length
            );
            crate::charts::bar_chart(&[(title, bars)], 0.0, png)
                .map_err(|e| anyhow::anyhow!("cannot draw the histogram: {e}"))?;
            writeln!(out, "histogram written to {}", png.display())?;
        }
    } else if args.histogram.is_some() {
        anyhow::bail!("--histogram needs --model (its tokenizer measures the lengths)");
    }
    for p in report.problems.iter().take(args.show) {
        writeln!(out, "  {}: {}", p.id, p.what)?;
    }
    if report.problems.len() > args.show {
        writeln!(out, "  … and {} more", report.problems.len() - args.show)?;
    }
    Ok(if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
