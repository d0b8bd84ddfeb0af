//! `kollava verify`: recompute a reference dump and print one line per key.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use kollava_checkpoint::OpenOptions;
use kollava_eval::verify::{verify, Outcome, ReferenceDump, Tolerances};

use crate::args::VerifyArgs;

pub fn run(args: &VerifyArgs) -> Result<ExitCode> {
    let device = super::device(args.device)?;
    let ckpt = kollava_checkpoint::open(
        &args.model,
        &OpenOptions {
            vision_tower: args.vision_tower.clone(),
            projector: None,
            mmproj: None,
        },
    )?;
    let reference = ReferenceDump::load(&args.reference)?;
    let mut tols = Tolerances::default();
    for (prefix, value) in &args.tolerances {
        tols.set(prefix, *value);
    }
    let results = verify(&ckpt, &reference, &tols, &device)?;
    let mut out = std::io::stdout().lock();
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for r in &results {
        let line = match &r.outcome {
            Outcome::Compared { max_diff, tol } if r.passed() => {
                passed += 1;
                format!("ok    {}  max|diff| {max_diff:.3e} (tol {tol:.0e})", r.key)
            }
            Outcome::Compared { max_diff, tol } => {
                failed += 1;
                format!("FAIL  {}  max|diff| {max_diff:.3e} > tol {tol:.0e}", r.key)
            }
            Outcome::Mismatch(why) => {
                failed += 1;
                format!("FAIL  {}  {why}", r.key)
            }
            Outcome::Skipped(why) => {
                skipped += 1;
                format!("skip  {}  {why}", r.key)
            }
        };
        writeln!(out, "{line}")?;
    }
    writeln!(out, "{passed} passed, {failed} failed, {skipped} skipped")?;
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
