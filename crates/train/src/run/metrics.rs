//! A run's metrics: one JSON line per optimizer step in `OUTPUT/metrics.jsonl` (one write
//! per line, so a killed run leaves whole lines), and with TensorBoard the same scalars as
//! event files in `OUTPUT/runs`. A resumed run keeps the lines up to its checkpoint and
//! drops the rest: those steps are about to be redone.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::outputs::write;
use super::RunError;
use crate::tensorboard::EventWriter;
use crate::trainer::StepLog;

pub const METRICS_FILE: &str = "metrics.jsonl";

/// Where a run's metrics go.
pub struct Metrics {
    path: PathBuf,
    file: std::fs::File,
    board: Option<EventWriter>,
}

impl Metrics {
    /// Opens `dir/metrics.jsonl`: new, or cut back to the steps up to `resumed_at`.
    pub fn open(
        dir: &Path,
        resumed_at: Option<usize>,
        tensorboard: bool,
    ) -> Result<Self, RunError> {
        let path = dir.join(METRICS_FILE);
        if let Some(start) = resumed_at {
            let kept: String = std::fs::read_to_string(&path)
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
            let tmp = path.with_extension("jsonl.tmp");
            std::fs::write(&tmp, kept).map_err(write(&tmp))?;
            std::fs::rename(&tmp, &path).map_err(write(&path))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(write(&path))?;
        let board = if tensorboard {
            let runs = dir.join("runs");
            Some(EventWriter::create(&runs).map_err(write(&runs))?)
        } else {
            None
        };
        if resumed_at.is_none() {
            file.set_len(0).map_err(write(&path))?;
        }
        Ok(Self { path, file, board })
    }

    /// One step: its line, and its scalars when TensorBoard is on.
    pub fn record(&mut self, log: &StepLog, samples_per_s: f64) -> Result<(), RunError> {
        let line = serde_json::json!({"step": log.step, "epoch": log.epoch, "loss": log.loss,
            "lr": log.lr, "grad_norm": log.grad_norm, "samples_per_s": samples_per_s});
        self.file
            .write_all(format!("{line}\n").as_bytes())
            .map_err(write(&self.path))?;
        if let Some(b) = self.board.as_mut() {
            b.scalar("train/loss", log.loss, log.step)
                .and_then(|_| b.scalar("train/learning_rate", log.lr, log.step))
                .and_then(|_| b.scalar("train/grad_norm", log.grad_norm, log.step))
                .and_then(|_| b.scalar("train/epoch", log.epoch, log.step))
                .map_err(|e| RunError::Write {
                    path: self.path.with_file_name("runs").display().to_string(),
                    reason: e.to_string(),
                })?;
        }
        Ok(())
    }
}
