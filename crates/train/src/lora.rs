//! LoRA and QLoRA (llava-spec §5.6): low-rank adapters on the language model's linear maps,
//! the base frozen (and with QLoRA stored in 4 bits), saved as PEFT saves them so that the
//! Python side can load them too, and merged back into plain weights for inference.
//!
//! PEFT's names: `base_model.model.<module>.lora_A.weight` (`r × in`, Kaiming-uniform) and
//! `…lora_B.weight` (`out × r`, zeros, so training starts from the base model exactly);
//! the update is `B A · lora_alpha / r`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Result, Tensor, Var};
use kollava_model::layers::{Linear, Lora};
use kollava_model::Llava;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// The modules KoLLaVA's LoRA recipe adapts: every linear map of the LLM but `lm_head`.
pub const ALL_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

const PEFT_PREFIX: &str = "base_model.model.";
pub const ADAPTER_FILE: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The trained weights that are not adapters (the projector), as the reference names them.
pub const NON_LORA_FILE: &str = "non_lora_trainables.safetensors";

#[derive(Debug, Clone)]
pub struct LoraOptions {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    /// Module names (`q_proj`, …) to adapt.
    pub targets: Vec<String>,
    /// QLoRA: store the frozen base of every linear map in 4 bits.
    pub four_bit: bool,
    pub seed: u64,
}

impl LoraOptions {
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// PEFT's `adapter_config.json`.
    pub fn peft_config(&self, base: &str) -> Value {
        json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.r,
            "lora_alpha": self.alpha, "lora_dropout": self.dropout,
            "target_modules": self.targets, "bias": "none", "fan_in_fan_out": false,
            "base_model_name_or_path": base, "inference_mode": true,
        })
    }
}

/// Adds adapters to `model`'s language model (quantizing the bases first with
/// `four_bit`) and returns them as trainable parameters named `<module>.lora_A.weight`.
/// `start`: adapter weights to begin from (a checkpoint being resumed), same names.
pub fn add_adapters(
    model: &mut Llava,
    opts: &LoraOptions,
    start: Option<&HashMap<String, Tensor>>,
) -> Result<Vec<(String, Var)>> {
    if opts.r == 0 {
        candle_core::bail!("--lora-r must be at least 1");
    }
    let dtype = model.dtype();
    let device = model.decoder.device().clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut params = Vec::new();
    let mut adapted = 0;
    for (name, lin) in model.decoder.linears_mut() {
        let base = if opts.four_bit {
            lin.quantize_4bit()?
        } else {
            lin.clone()
        };
        let module = name.rsplit('.').next().unwrap_or_default();
        if !opts.targets.iter().any(|t| t == module) {
            *lin = base;
            continue;
        }
        let (out_dim, in_dim) = lin.dims()?;
        let (a_name, b_name) = (
            format!("{name}.lora_A.weight"),
            format!("{name}.lora_B.weight"),
        );
        let (a, b) = match start.and_then(|s| Some((s.get(&a_name)?, s.get(&b_name)?))) {
            Some((a, b)) => (a.to_dtype(dtype)?, b.to_dtype(dtype)?),
            None => {
                // kaiming_uniform_(a=√5): U(−1/√in, 1/√in).
                let bound = 1.0 / (in_dim as f32).sqrt();
                let a: Vec<f32> = (0..opts.r * in_dim)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                (
                    Tensor::from_vec(a, (opts.r, in_dim), &device)?.to_dtype(dtype)?,
                    Tensor::zeros((out_dim, opts.r), dtype, &device)?,
                )
            }
        };
        if a.dims() != [opts.r, in_dim] || b.dims() != [out_dim, opts.r] {
            candle_core::bail!("{name}: adapter shapes do not match rank {}", opts.r);
        }
        let (a, b) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
        *lin = Linear::Lora(Box::new(Lora {
            base,
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: opts.scale(),
            dropout: opts.dropout,
            dropout_key: params.len() as u64,
        }));
        params.push((a_name, a));
        params.push((b_name, b));
        adapted += 1;
    }
    if adapted == 0 {
        candle_core::bail!(
            "no linear map matches --lora-targets {:?} (known: {})",
            opts.targets,
            ALL_TARGETS.join(", ")
        );
    }
    Ok(params)
}

/// Adapter parameters under PEFT's names.
pub fn peft_tensors(params: &[(String, Var)]) -> HashMap<String, Tensor> {
    params
        .iter()
        .filter(|(n, _)| n.contains(".lora_"))
        .map(|(n, v)| (format!("{PEFT_PREFIX}{n}"), v.as_tensor().clone()))
        .collect()
}

/// An adapter directory: its options (rank, alpha, targets) and weights by our names.
pub fn read_adapter(
    dir: &Path,
) -> std::result::Result<(LoraOptions, HashMap<String, Tensor>), String> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let text =
        std::fs::read_to_string(&cfg_path).map_err(|e| format!("{}: {e}", cfg_path.display()))?;
    let cfg: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", cfg_path.display()))?;
    let r = cfg["r"]
        .as_u64()
        .ok_or_else(|| format!("{}: no \"r\"", cfg_path.display()))? as usize;
    let alpha = cfg["lora_alpha"].as_f64().unwrap_or(r as f64);
    let targets = cfg["target_modules"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let file = dir.join(ADAPTER_FILE);
    let raw = candle_core::safetensors::load(&file, &candle_core::Device::Cpu)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let weights = raw
        .into_iter()
        .map(|(k, t)| {
            // PEFT sometimes writes `lora_A.default.weight`.
            let k = k
                .strip_prefix(PEFT_PREFIX)
                .unwrap_or(&k)
                .replace(".default.", ".");
            (k, t)
        })
        .collect();
    Ok((
        LoraOptions {
            r,
            alpha,
            dropout: 0.0,
            targets,
            four_bit: false,
            seed: 0,
        },
        weights,
    ))
}

/// `W + scale · B A` for every adapted weight of `base` (canonical names), f32.
pub fn merge(
    base: &[(String, Tensor)],
    adapter: &HashMap<String, Tensor>,
    scale: f64,
) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for (name, w) in base {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        let (Some(a), Some(b)) = (
            adapter.get(&format!("{module}.lora_A.weight")),
            adapter.get(&format!("{module}.lora_B.weight")),
        ) else {
            continue;
        };
        let delta = b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)?;
        out.push((name.clone(), (w.to_dtype(DType::F32)? + (delta * scale)?)?));
    }
    let pairs = adapter
        .keys()
        .filter(|k| k.ends_with(".lora_A.weight"))
        .count();
    if out.len() != pairs {
        candle_core::bail!(
            "the adapter has {pairs} adapted weights but {} match the base model",
            out.len()
        );
    }
    Ok(out)
}
