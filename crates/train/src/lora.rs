//! LoRA and QLoRA (llava-spec §5.6): low-rank adapters on the language model's linear maps,
//! the base frozen (and with QLoRA stored in 4 bits), saved as PEFT saves them so that the
//! Python side can load them too, and merged back into plain weights for inference.
//!
//! PEFT's names: `base_model.model.<module>.lora_A.weight` (`r × in`, Kaiming-uniform) and
//! `…lora_B.weight` (`out × r`, zeros, so training starts from the base model exactly);
//! the update is `B A · lora_alpha / r`. `<module>` is the module's path in the model PEFT
//! wraps, which is the base's own class: `model.language_model.layers.N…` in transformers
//! 5.x's `LlavaForConditionalGeneration` (llava-hf), `model.layers.N…` in LLaVA's
//! `LlavaLlamaForCausalLM`, `transformer.blocks.N.attn.Wqkv` in `LlavaMPTForCausalLM`. An
//! adapter under other paths loads in PEFT without an error and changes nothing, so the
//! paths follow the base's family ([`Family::peft_module`]).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Result, Tensor, Var};
use kollava_checkpoint::weights::canonical_layer_name;
use kollava_checkpoint::Family;
use kollava_model::layers::{Linear, Lora};
use kollava_model::Llava;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// The modules KoLLaVA's LoRA recipe adapts: every linear map of the LLM but `lm_head`.
/// MPT's fused `qkv_proj` (`Wqkv`) is adapted for any of `q_proj`, `k_proj`, `v_proj`
/// (see [`targets`]).
pub const ALL_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Whether `--lora-targets` names the module whose canonical name ends in `module`: by our
/// name, by MPT's (`Wqkv`, `out_proj`), or, for MPT's fused `qkv_proj`, by any of the
/// three projections it holds (so the default targets mean the same on every family).
pub fn targets(requested: &[String], module: &str) -> bool {
    requested.iter().any(|t| {
        t == module
            || matches!(
                (t.as_str(), module),
                ("q_proj" | "k_proj" | "v_proj" | "Wqkv", "qkv_proj") | ("out_proj", "o_proj")
            )
    })
}

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

    /// PEFT's `adapter_config.json` for adapters `params` (our names) on a base of
    /// `family`. `target_modules` is a regular expression PEFT matches against whole module
    /// paths: the adapted modules of the language model's layers, any layer (plain names
    /// such as `q_proj` would also match the CLIP tower's attention).
    pub fn peft_config(&self, base: &str, family: Family, params: &[(String, Var)]) -> Value {
        let modules: std::collections::BTreeSet<String> = params
            .iter()
            .filter_map(|(n, _)| n.strip_suffix(".lora_A.weight"))
            .map(|m| any_layer(&family.peft_module(m)))
            .collect();
        let targets = modules.into_iter().collect::<Vec<_>>().join("|");
        json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.r,
            "lora_alpha": self.alpha, "lora_dropout": self.dropout,
            "target_modules": targets, "bias": "none", "fan_in_fan_out": false,
            "base_model_name_or_path": base, "inference_mode": true,
        })
    }
}

/// A module path as a regular expression matching it in any layer: the dots escaped, the
/// first number (the layer's index) any number.
fn any_layer(path: &str) -> String {
    let mut parts: Vec<String> = path.split('.').map(str::to_string).collect();
    if let Some(p) = parts.iter_mut().find(|p| p.parse::<usize>().is_ok()) {
        *p = "\\d+".into();
    }
    parts.join("\\.")
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
        if !targets(&opts.targets, module) {
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
            "no linear map matches --lora-targets {:?} (known: {}; MPT's fused qkv_proj is \
             also Wqkv, its o_proj out_proj)",
            opts.targets,
            ALL_TARGETS.join(", ")
        );
    }
    Ok(params)
}

/// Adapter parameters under PEFT's names, for a base of `family`.
pub fn peft_tensors(params: &[(String, Var)], family: Family) -> HashMap<String, Tensor> {
    params
        .iter()
        .filter_map(|(n, v)| {
            let (module, tail) = n.split_once(".lora_")?;
            let path = format!("{}.lora_{tail}", family.peft_module(module));
            Some((format!("{PEFT_PREFIX}{path}"), v.as_tensor().clone()))
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
    let file = dir.join(ADAPTER_FILE);
    let raw = candle_core::safetensors::load(&file, &candle_core::Device::Cpu)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let weights: HashMap<String, Tensor> = raw
        .into_iter()
        .map(|(k, t)| {
            // PEFT sometimes writes `lora_A.default.weight`.
            let k = k
                .strip_prefix(PEFT_PREFIX)
                .unwrap_or(&k)
                .replace(".default.", ".");
            (canonical_layer_name(&k), t)
        })
        .collect();
    // The modules adapted, by our names (`target_modules` may be a pattern over paths).
    let mut targets: Vec<String> = weights
        .keys()
        .filter_map(|k| k.strip_suffix(".lora_A.weight")?.rsplit('.').next())
        .map(str::to_string)
        .collect();
    targets.sort();
    targets.dedup();
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
    /// names the adapted modules of the language model's layers only, in any layer.
    #[test]
    fn peft_paths_follow_the_base_and_read_back() {
        let var =
            Var::from_tensor(&Tensor::zeros(2, DType::F32, &candle_core::Device::Cpu).unwrap())
                .unwrap();
        for (ours, family, path, pattern) in [
            (
                "model.layers.3.mlp.up_proj",
                Family::LLAVA_HF,
                "model.language_model.layers.3.mlp.up_proj",
                r"model\.language_model\.layers\.\d+\.mlp\.up_proj",
            ),
            (
                "model.layers.3.mlp.up_proj",
                Family::LLAVA_15,
                "model.layers.3.mlp.up_proj",
                r"model\.layers\.\d+\.mlp\.up_proj",
            ),
            (
                "model.layers.3.self_attn.qkv_proj",
                Family::LLAVA_MPT,
                "transformer.blocks.3.attn.Wqkv",
                r"transformer\.blocks\.\d+\.attn\.Wqkv",
            ),
        ] {
            let params = vec![(format!("{ours}.lora_A.weight"), var.clone())];
            let written = peft_tensors(&params, family);
            let key = written.keys().next().unwrap();
            assert_eq!(key, &format!("base_model.model.{path}.lora_A.weight"));
            assert_eq!(
                canonical_layer_name(key.strip_prefix(PEFT_PREFIX).unwrap()),
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
            assert_eq!(
                opts.peft_config("base", family, &params)["target_modules"],
                pattern
            );
        }
        // The default targets adapt MPT's fused projection; its own names work too.
        let default: Vec<String> = ALL_TARGETS.iter().map(|s| s.to_string()).collect();
        assert!(targets(&default, "qkv_proj") && targets(&["Wqkv".into()], "qkv_proj"));
        assert!(targets(&["out_proj".into()], "o_proj") && !targets(&default, "lm_head"));
    }
}
