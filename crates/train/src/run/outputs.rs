//! What a run writes where: `OUTPUT/checkpoint-STEP/` every `save_steps` (the weights in
//! f32, `optimizer.safetensors`, `trainer_state.json`; each built under a temporary name and
//! renamed), found again to resume and pruned to a limit; the final result in `OUTPUT/`
//! itself, as the reference's trainer lays it out: stage 1's projector
//! (`mm_projector.safetensors`, and `mm_projector.bin` for LLaVA's code) with `config.json`,
//! stage 2's whole checkpoint in the input's layout, or a LoRA run's PEFT adapter with
//! `non_lora_trainables`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use kollava_checkpoint::{Checkpoint, CheckpointError, Family};

use super::RunError;
use crate::lora;
use crate::optim::AdamW;

/// Maps an error writing `path` into [`RunError::Write`].
pub(super) fn write<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> RunError + '_ {
    move |e| RunError::Write {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// `value` as pretty JSON in `path`, written beside it first and renamed.
fn write_atomic(path: &Path, value: &serde_json::Value) -> Result<(), RunError> {
    let text = serde_json::to_string_pretty(value).map_err(write(path))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(write(&tmp))?;
    std::fs::rename(&tmp, path).map_err(write(path))
}

/// The input checkpoint's `config.json`.
fn read_config(ckpt: &Checkpoint) -> Result<serde_json::Value, RunError> {
    let path = ckpt.dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(write(&path))?;
    serde_json::from_str(&text).map_err(|e| {
        RunError::Checkpoint(CheckpointError::Json {
            file: path.display().to_string(),
            reason: e.to_string(),
        })
    })
}

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const PROJECTOR_FILE: &str = "mm_projector.safetensors";
/// The same tensors as LLaVA's stage 1 saves them (`torch.save`, LLaVA's names).
pub const PROJECTOR_BIN: &str = "mm_projector.bin";
/// The projector of a LoRA run as LLaVA saves it: `torch.save` of the PEFT-wrapped model's
/// names (`base_model.model.model.mm_projector.*`), which LLaVA's `load_pretrained_model`
/// strips back.
pub const NON_LORA_BIN: &str = "non_lora_trainables.bin";

fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<(), RunError> {
    let tmp = path.with_extension("tmp");
    candle_core::safetensors::save(tensors, &tmp).map_err(write(&tmp))?;
    std::fs::rename(&tmp, path).map_err(write(path))
}

/// The `checkpoint-STEP` directories in `dir`, oldest first.
pub fn checkpoints(dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut all: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse::<usize>().ok()?;
            Some((step, e.path()))
        })
        .collect();
    all.sort();
    all
}

/// The newest complete checkpoint (one with its trainer state), with its step.
pub fn newest_checkpoint(dir: &Path) -> Option<(usize, PathBuf)> {
    checkpoints(dir)
        .into_iter()
        .rev()
        .find(|(_, p)| p.join(STATE_FILE).is_file())
}

pub fn prune_checkpoints(dir: &Path, keep: usize) -> Result<(), RunError> {
    let all = checkpoints(dir);
    let excess = all.len().saturating_sub(keep);
    for (_, p) in all.into_iter().take(excess) {
        std::fs::remove_dir_all(&p).map_err(write(&p))?;
    }
    Ok(())
}

/// What a run writes.
#[derive(Debug, Clone, Copy)]
pub enum Output<'a> {
    /// Stage 1: the projector.
    Projector,
    /// Stage 2: a whole checkpoint.
    Full,
    /// Stage 2 with adapters: PEFT files, plus the trained projector.
    Lora {
        opts: &'a lora::LoraOptions,
        params: &'a [(String, candle_core::Var)],
        base: &'a str,
    },
}

/// Adapter, its config, the projector (`non_lora_trainables`) and the base's config
/// (with the template) into the existing directory `dir`.
fn write_lora(
    ckpt: &Checkpoint,
    tensors: &[(String, Tensor)],
    dir: &Path,
    opts: &lora::LoraOptions,
    params: &[(String, candle_core::Var)],
    base: &str,
    template: &str,
) -> Result<(), RunError> {
    save_tensors(
        &dir.join(lora::ADAPTER_FILE),
        &lora::peft_tensors(params, ckpt.family),
    )?;
    let config = opts.peft_config(base, ckpt.family, params);
    write_atomic(&dir.join(lora::ADAPTER_CONFIG), &config)?;
    let projector = projector_tensors(tensors);
    save_tensors(&dir.join(lora::NON_LORA_FILE), &projector)?;
    if ckpt.family.layout != kollava_checkpoint::Layout::LlavaHf {
        // For LLaVA's own code (`load_pretrained_model` with a LoRA `model_path`).
        kollava_checkpoint::torch_pickle::save(
            &dir.join(NON_LORA_BIN),
            &sorted(projector, ckpt.family, "base_model.model."),
        )?;
    }
    let mut config = read_config(ckpt)?;
    config["kollava_template"] = serde_json::json!(template);
    write_atomic(&dir.join("config.json"), &config)
}

/// Stage 1's result in `dir`: the projector as safetensors (what kollava reads back) and as
/// LLaVA's `mm_projector.bin`, under the names of `family`'s Python class.
pub fn save_projector(
    dir: &Path,
    tensors: &[(String, Tensor)],
    family: Family,
) -> Result<(), RunError> {
    let projector = projector_tensors(tensors);
    save_tensors(&dir.join(PROJECTOR_FILE), &projector)?;
    kollava_checkpoint::torch_pickle::save(
        &dir.join(PROJECTOR_BIN),
        &sorted(projector, family, ""),
    )?;
    Ok(())
}

/// `tensors` by the names `family`'s Python class gives them, each after `prefix`.
fn sorted(tensors: HashMap<String, Tensor>, family: Family, prefix: &str) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(n, t)| (format!("{prefix}{}", family.original_name(&n)), t))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The projector's tensors under their checkpoint names (with v0's embedding matrix when
/// its `<im_start>`/`<im_end>` rows were trained, as June-2023 LLaVA saved it).
pub fn projector_tensors(tensors: &[(String, Tensor)]) -> HashMap<String, Tensor> {
    tensors
        .iter()
        .filter(|(n, t)| {
            n.starts_with("model.mm_projector.")
                || (n == "model.embed_tokens.weight" && t.is_variable())
        })
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect()
}

/// The ids of `<im_start>` and `<im_end>` when the checkpoint wraps images in them (v0).
pub fn start_end_rows(ckpt: &Checkpoint) -> Result<Option<(u32, u32)>, RunError> {
    if ckpt.config.decoder.tie_word_embeddings {
        // LLaVA-MPT: its `initialize_vision_tokenizer` sets the input embedding trainable,
        // then freezes the output embedding, which is the same tied matrix: in stage 1
        // only the projector learns (llava-spec §1d.6).
        return Ok(None);
    }
    let tok = ckpt.tokenizer()?;
    Ok(match ckpt.image_tokens(&tok)? {
        kollava_inputs::prompt::ImageTokens::PatchTokens { start_end, .. } => start_end,
        _ => None,
    })
}

fn trained_only(tensors: &[(String, Tensor)], names: &[String]) -> Vec<(String, Tensor)> {
    tensors
        .iter()
        .filter(|(n, _)| names.contains(n))
        .cloned()
        .collect()
}

#[allow(clippy::too_many_arguments)]
/// `OUTPUT/checkpoint-STEP`: weights in f32 (so a resumed run continues exactly), the
/// optimizer's moments and the step, built under a temporary name and renamed.
pub fn save_checkpoint(
    ckpt: &Checkpoint,
    tensors: &[(String, Tensor)],
    trainable: &[String],
    out: &Path,
    kind: &Output,
    template: &str,
    step: usize,
    opt: &AdamW,
) -> Result<(), RunError> {
    let dir = out.join(format!("checkpoint-{step}"));
    let tmp = out.join(format!(".checkpoint-{step}.partial"));
    let _ = std::fs::remove_dir_all(&tmp);
    match kind {
        Output::Full => {
            ckpt.save_with(&tmp, &trained_only(tensors, trainable), Some(DType::F32))?;
            kollava_checkpoint::trainable::set_config_key(&tmp, "kollava_template", template)?;
        }
        Output::Projector => {
            std::fs::create_dir_all(&tmp).map_err(write(&tmp))?;
            save_projector(&tmp, tensors, ckpt.family)?;
        }
        Output::Lora { opts, params, base } => {
            std::fs::create_dir_all(&tmp).map_err(write(&tmp))?;
            write_lora(ckpt, tensors, &tmp, opts, params, base, template)?;
        }
    }
    save_tensors(&tmp.join(OPTIMIZER_FILE), &opt.state())?;
    let state = serde_json::json!({"global_step": step, "optimizer_steps": opt.t});
    write_atomic(&tmp.join(STATE_FILE), &state)?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(write(&dir))?;
    Ok(())
}

/// The final result in `OUTPUT/` itself.
pub fn save_final(
    ckpt: &Checkpoint,
    tensors: &[(String, Tensor)],
    trainable: &[String],
    out: &Path,
    kind: &Output,
    template: &str,
    dtype: DType,
) -> Result<(), RunError> {
    if let Output::Lora { opts, params, base } = kind {
        return write_lora(ckpt, tensors, out, opts, params, base, template);
    }
    if matches!(kind, Output::Projector) {
        save_projector(out, tensors, ckpt.family)?;
        let mut config = read_config(ckpt)?;
        config["tune_mm_mlp_adapter"] = serde_json::json!(true);
        return write_atomic(&out.join("config.json"), &config);
    }
    // Written whole beside OUTPUT, then moved in entry by entry (each rename is atomic).
    let tmp = out.join(".final.partial");
    let _ = std::fs::remove_dir_all(&tmp);
    ckpt.save_with(&tmp, &trained_only(tensors, trainable), Some(dtype))?;
    kollava_checkpoint::trainable::set_config_key(&tmp, "kollava_template", template)?;
    for entry in std::fs::read_dir(&tmp).map_err(write(&tmp))? {
        let entry = entry.map_err(write(&tmp))?;
        if entry.file_name() == OPTIMIZER_FILE || entry.file_name() == STATE_FILE {
            continue; // copied from a resumed checkpoint; not part of the result
        }
        let target = out.join(entry.file_name());
        if target.is_dir() {
            std::fs::remove_dir_all(&target).map_err(write(&target))?;
        }
        std::fs::rename(entry.path(), &target).map_err(write(&target))?;
    }
    std::fs::remove_dir_all(&tmp).map_err(write(&tmp))?;
    Ok(())
}
