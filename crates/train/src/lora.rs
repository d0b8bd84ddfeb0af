//! LoRA and QLoRA (llava-spec §5.6): low-rank adapters on the language model's linear maps,
//! the base frozen (and with QLoRA stored in 4 bits), saved as PEFT saves them so that the
//! Python side can load them too, and merged back into plain weights for inference.
//!
//! PEFT's names: `base_model.model.<module>.lora_A.weight` (`r × in`, Kaiming-uniform) and
//! `…lora_B.weight` (`out × r`, zeros, so training starts from the base model exactly);
//! the update is `B A · lora_alpha / r`. `<module>` is the module's path in the model PEFT
//! wraps, which is the base's own class: `model.language_model.layers.N…` in transformers
//! 5.x's `LlavaForConditionalGeneration` (llava-hf), `model.layers.N…` in LLaVA's
//! `LlavaLlamaForCausalLM`. An adapter under other paths loads in PEFT without an error and
//! changes nothing, so the paths follow the base's family (the caller says where its
//! layers are: `kollava_checkpoint::Family::layers_module`).

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

    /// PEFT's `adapter_config.json` for a base whose language model's layers are at
    /// `layers` (`model.language_model.layers.`, say). `target_modules` is a regular
    /// expression PEFT matches against whole module paths: the language model's layers only
    /// (plain names such as `q_proj` would also match the CLIP tower's attention).
    pub fn peft_config(&self, base: &str, layers: &str) -> Value {
        let targets = format!(
            "{}\\d+\\.(self_attn|mlp)\\.({})",
            layers.replace('.', "\\."),
            self.targets.join("|")
        );
        json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.r,
            "lora_alpha": self.alpha, "lora_dropout": self.dropout,
            "target_modules": targets, "bias": "none", "fan_in_fan_out": false,
            "base_model_name_or_path": base, "inference_mode": true,
        })
    }
}

/// Our paths to the language model's layers (LLaVA's).
const OUR_LAYERS: &str = "model.layers.";

/// The layer paths adapters are found under (PEFT on transformers 5.x and 4.x llava-hf
/// models, LLaVA's classes, kollava before it followed the base), as our names.
fn our_module(name: &str) -> String {
    for theirs in [
        "model.language_model.layers.",
        "language_model.model.layers.",
    ] {
        if let Some(rest) = name.strip_prefix(theirs) {
            return format!("{OUR_LAYERS}{rest}");
        }
    }
    name.to_string()
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

/// Adapter parameters under PEFT's names, for a base whose layers are at `layers`.
pub fn peft_tensors(params: &[(String, Var)], layers: &str) -> HashMap<String, Tensor> {
    params
        .iter()
        .filter(|(n, _)| n.contains(".lora_"))
        .map(|(n, v)| {
            let path = match n.strip_prefix(OUR_LAYERS) {
                Some(rest) => format!("{layers}{rest}"),
                None => n.clone(),
            };
            (format!("{PEFT_PREFIX}{path}"), v.as_tensor().clone())
        })
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
    // A list of module names, or a regular expression over paths (as we write it).
    let targets = match &cfg["target_modules"] {
        Value::Array(a) => a
            .iter()
            .filter_map(|t| t.as_str().map(str::to_string))
            .collect(),
        Value::String(pattern) => ALL_TARGETS
            .iter()
            .filter(|t| pattern.contains(*t))
            .map(|t| t.to_string())
            .collect(),
        _ => Vec::new(),
    };
    let file = dir.join(ADAPTER_FILE);
    let raw = candle_core::safetensors::load(&file, &candle_core::Device::Cpu)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let weights = raw
        .into_iter()
        .map(|(k, t)| {
            // PEFT sometimes writes `lora_A.default.weight`.
            let k = our_module(k.strip_prefix(PEFT_PREFIX).unwrap_or(&k)).replace(".default.", ".");
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What we write for each family reads back under our names, and the targets pattern
    /// names the language model's layers only.
    #[test]
    fn peft_paths_follow_the_base_and_read_back() {
        let var =
            Var::from_tensor(&Tensor::zeros(2, DType::F32, &candle_core::Device::Cpu).unwrap())
                .unwrap();
        let params = vec![("model.layers.3.mlp.up_proj.lora_A.weight".to_string(), var)];
        for (layers, path) in [
            (
                "model.language_model.layers.",
                "model.language_model.layers.3.mlp.up_proj",
            ),
            ("model.layers.", "model.layers.3.mlp.up_proj"),
        ] {
            let written = peft_tensors(&params, layers);
            let key = written.keys().next().unwrap();
            assert_eq!(key, &format!("base_model.model.{path}.lora_A.weight"));
            assert_eq!(
                our_module(key.strip_prefix(PEFT_PREFIX).unwrap()),
                params[0].0
            );
            let opts = LoraOptions {
                r: 4,
                alpha: 8.0,
                dropout: 0.0,
                targets: vec!["up_proj".into(), "q_proj".into()],
                four_bit: false,
                seed: 0,
            };
            let pattern = opts.peft_config("base", layers)["target_modules"]
                .as_str()
                .unwrap()
                .to_string();
            assert_eq!(
                pattern,
                format!(
                    "{}\\d+\\.(self_attn|mlp)\\.(up_proj|q_proj)",
                    layers.replace('.', "\\.")
                )
            );
        }
        // transformers 4.x's llava-hf paths too.
        assert_eq!(
            our_module("language_model.model.layers.0.self_attn.q_proj.lora_B.weight"),
            "model.layers.0.self_attn.q_proj.lora_B.weight"
        );
    }
}
