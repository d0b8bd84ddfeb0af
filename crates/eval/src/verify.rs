//! `kollava verify`: recompute every key of a reference dump and compare it within the
//! fixtures README's tolerances (ids exact, `pixel_u8.*`/`image.*` 0, `pixel.*` 1e-5,
//! `vision.*`/`logits.*` 1e-4).
//!
//! Everything is recomputed end to end from the user's files: pixels from the image files,
//! ids from the prompt texts, features and logits from our own pixels and ids. A key we
//! cannot compute yet (the training keys) is listed as skipped, never as passed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use kollava_checkpoint::{Checkpoint, CheckpointError, Llm};
use kollava_inputs::image::{self, AspectMode};
use kollava_inputs::prompt;
use kollava_inputs::template::Role;
use kollava_train::labels::{preprocess, preprocess_rendered, reference_template};
use kollava_train::loss::{projector_step, splice_labels};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    #[error("cannot read reference {path}: {reason}")]
    Reference { path: String, reason: String },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Tokenizer(#[from] kollava_inputs::tokenizer::TokenizerError),
    #[error("{context}")]
    Compute {
        context: String,
        source: candle_core::Error,
    },
}

/// Per-key-prefix tolerances (max abs diff); the longest matching prefix wins.
#[derive(Debug, Clone)]
pub struct Tolerances(Vec<(String, f64)>);

impl Default for Tolerances {
    fn default() -> Self {
        Self(
            [
                ("pixel_u8.", 0.0),
                ("image.", 0.0),
                ("pixel.", 1e-5),
                ("vision.", 1e-4),
                ("logits.", 1e-4),
                ("train.loss", 1e-4),
                ("train.projector_grad_norm", 1e-5),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        )
    }
}

impl Tolerances {
    /// Adds or replaces the tolerance of a prefix (`--tol image.=2`).
    pub fn set(&mut self, prefix: &str, value: f64) {
        self.0.retain(|(p, _)| p != prefix);
        self.0.push((prefix.to_string(), value));
    }

    /// Exact (0) for ids and anything unlisted.
    pub fn for_key(&self, key: &str) -> f64 {
        self.0
            .iter()
            .filter(|(p, _)| key.starts_with(p.as_str()))
            .max_by_key(|(p, _)| p.len())
            .map_or(0.0, |(_, v)| *v)
    }
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct KeyResult {
    pub key: String,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Compared: the largest difference (for ids: the number of differing positions).
    Compared { max_diff: f64, tol: f64 },
    /// Shapes or lengths differ.
    Mismatch(String),
    /// Not computed by this version (say why).
    Skipped(String),
}

impl KeyResult {
    pub fn passed(&self) -> bool {
        match self.outcome {
            Outcome::Compared { max_diff, tol } => max_diff <= tol,
            Outcome::Mismatch(_) => false,
            Outcome::Skipped(_) => true,
        }
    }
}

/// A loaded reference dump.
pub struct ReferenceDump {
    pub dir: PathBuf,
    pub json: Value,
    pub tensors: HashMap<String, Tensor>,
}

impl ReferenceDump {
    /// Reads `reference.json` and `reference.safetensors` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, VerifyError> {
        let jpath = dir.join("reference.json");
        let text = std::fs::read_to_string(&jpath).map_err(|e| VerifyError::Reference {
            path: jpath.display().to_string(),
            reason: e.to_string(),
        })?;
        let json = serde_json::from_str(&text).map_err(|e| VerifyError::Reference {
            path: jpath.display().to_string(),
            reason: e.to_string(),
        })?;
        let tpath = dir.join("reference.safetensors");
        let tensors = candle_core::safetensors::load(&tpath, &Device::Cpu).map_err(|e| {
            VerifyError::Reference {
                path: tpath.display().to_string(),
                reason: e.to_string(),
            }
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            json,
            tensors,
        })
    }

    fn get(&self, path: &str) -> &Value {
        path.split('.').fold(&self.json, |v, k| &v[k])
    }

    /// An image path as the dump names it: absolute, or relative to the dump's parent
    /// (the fixtures' layout) or to the dump itself.
    fn image_path(&self, rel: &str) -> PathBuf {
        let p = Path::new(rel);
        if p.is_absolute() {
            return p.to_path_buf();
        }
        let beside = self.dir.parent().map(|d| d.join(p));
        match beside {
            Some(b) if b.exists() => b,
            _ => self.dir.join(p),
        }
    }
}

fn f32s(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()
}

fn compare_f32(key: &str, got: &[f32], want: &[f32], tols: &Tolerances) -> KeyResult {
    let outcome = if got.len() != want.len() {
        Outcome::Mismatch(format!(
            "{} values, reference has {}",
            got.len(),
            want.len()
        ))
    } else {
        let d = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs() as f64)
            .fold(0.0, f64::max);
        let d = if got.iter().any(|x| x.is_nan()) {
            f64::INFINITY
        } else {
            d
        };
        Outcome::Compared {
            max_diff: d,
            tol: tols.for_key(key),
        }
    };
    KeyResult {
        key: key.to_string(),
        outcome,
    }
}

fn compare_ids(key: &str, got: &[i64], want: &[i64]) -> KeyResult {
    let outcome = if got.len() != want.len() {
        Outcome::Mismatch(format!("{} ids, reference has {}", got.len(), want.len()))
    } else {
        let n = got.iter().zip(want).filter(|(a, b)| a != b).count();
        Outcome::Compared {
            max_diff: n as f64,
            tol: 0.0,
        }
    };
    KeyResult {
        key: key.to_string(),
        outcome,
    }
}

fn json_ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_i64).collect())
        .unwrap_or_default()
}

fn parse_mode(s: &str) -> Option<AspectMode> {
    match s {
        "crop" => Some(AspectMode::Crop),
        "pad" => Some(AspectMode::Pad),
        "resize" => Some(AspectMode::Resize),
        _ => None,
    }
}

fn tensor_ids(t: &Tensor) -> candle_core::Result<Vec<i64>> {
    t.flatten_all()?.to_dtype(DType::I64)?.to_vec1()
}

/// Wraps a candle error with what was being computed.
fn compute(context: &str) -> impl Fn(candle_core::Error) -> VerifyError + '_ {
    move |source| VerifyError::Compute {
        context: context.to_string(),
        source,
    }
}

/// `train_labels.*` (ids and labels per template) and, for `train_sample`, the loss and
/// the projector gradient norm of one backward with the LLM and the tower frozen.
fn verify_training(
    ckpt: &Checkpoint,
    reference: &ReferenceDump,
    tok: &kollava_inputs::Tokenizer,
    scheme: &kollava_inputs::ImageTokens,
    decoded: &HashMap<String, kollava_inputs::image::RgbImage>,
    tols: &Tolerances,
    device: &Device,
) -> Result<Vec<KeyResult>, VerifyError> {
    let mut out = Vec::new();
    let mut examples = HashMap::new();
    let entries = reference
        .get("train_labels")
        .as_object()
        .cloned()
        .unwrap_or_default();
    for (name, entry) in &entries {
        let key = format!("train_labels.{name}");
        let Some((template, rule)) = reference_template(name, ckpt.family.llm == Llm::Mpt) else {
            out.push(KeyResult {
                key,
                outcome: Outcome::Skipped(format!("unknown template {name:?}")),
            });
            continue;
        };
        let turns: Option<Vec<(Role, String)>> = entry["turns"].as_array().map(|a| {
            a.iter()
                .filter_map(|t| {
                    let role = if t[0].as_i64()? == 0 {
                        Role::User
                    } else {
                        Role::Assistant
                    };
                    Some((role, t[1].as_str()?.to_string()))
                })
                .collect()
        });
        let bad = |e: kollava_train::labels::LabelError| VerifyError::Reference {
            path: key.clone(),
            reason: e.to_string(),
        };
        let ex = match (turns, entry["text"].as_str()) {
            (Some(turns), _) => preprocess(tok, scheme, &template, rule, &turns).map_err(bad)?,
            (None, Some(text)) => {
                preprocess_rendered(tok, scheme, &template, rule, text).map_err(bad)?
            }
            (None, None) => continue,
        };
        for (field, got) in [("ids", &ex.ids), ("labels", &ex.labels)] {
            let k = format!("{key}.{field}");
            let want = match reference.tensors.get(&k) {
                Some(t) => tensor_ids(t).map_err(compute(&k))?,
                None => json_ids(&entry[field]),
            };
            out.push(compare_ids(&k, got, &want));
        }
        examples.insert(name.clone(), ex);
    }

    let sample = reference.get("train_sample").as_str().unwrap_or_default();
    let sample = sample.strip_prefix("train_labels.").unwrap_or(sample);
    let wants_loss = reference.tensors.contains_key("train.loss")
        || reference.tensors.contains_key("train.projector_grad_norm");
    if let (Some(ex), true) = (examples.get(sample), wants_loss) {
        let model = ckpt.load_model(DType::F32, device)?;
        let forward_image = reference.get("forward_image").as_str().unwrap_or_default();
        let (stem, mode) = forward_image
            .split_once('/')
            .unwrap_or((forward_image, "crop"));
        let img = decoded.get(stem).ok_or_else(|| VerifyError::Reference {
            path: "forward_image".into(),
            reason: format!("image {stem:?} is not in `images`"),
        })?;
        let pixels = image::preprocess(
            img,
            parse_mode(mode).unwrap_or(ckpt.aspect),
            &ckpt.preprocess,
        );
        let (cw, ch) = ckpt.preprocess.crop;
        let pixels = Tensor::from_vec(pixels, (1, 3, ch as usize, cw as usize), device)
            .map_err(compute("pixels"))?;
        let slots: Vec<std::ops::Range<usize>> = ex
            .prompt
            .images
            .iter()
            .map(|s| s.at..s.at + s.replaces)
            .collect();
        let labels = splice_labels(&ex.ids, &ex.labels, scheme.n());
        let step = projector_step(&model, &pixels, &ex.prompt.ids, &slots, &labels)
            .map_err(compute("training step"))?;
        for (key, got) in [
            ("train.loss", step.loss as f64),
            ("train.projector_grad_norm", step.grad_norm),
        ] {
            if let Some(want) = reference.tensors.get(key) {
                let want = f32s(want).map_err(compute(key))?;
                let outcome = match want.first() {
                    Some(&w) => Outcome::Compared {
                        max_diff: (got - w as f64).abs(),
                        tol: tols.for_key(key),
                    },
                    None => Outcome::Mismatch("empty reference tensor".into()),
                };
                out.push(KeyResult {
                    key: key.to_string(),
                    outcome,
                });
            }
        }
    }
    Ok(out)
}

/// Recomputes every key of `reference` for `ckpt`, in a stable order, the model running on
/// `device` (the CPU, or a GPU to check the CUDA path against the same reference).
pub fn verify(
    ckpt: &Checkpoint,
    reference: &ReferenceDump,
    tols: &Tolerances,
    device: &Device,
) -> Result<Vec<KeyResult>, VerifyError> {
    let mut out = Vec::new();
    let mut keys: Vec<&String> = reference.tensors.keys().collect();
    keys.sort();

    // Images: decoded bytes, fitted u8 and normalised pixels.
    let images = reference
        .get("images")
        .as_object()
        .cloned()
        .unwrap_or_default();
    let mut decoded = HashMap::new();
    for (stem, path) in &images {
        let Some(rel) = path.as_str() else { continue };
        let p = reference.image_path(rel);
        let img = image::open(&p).map_err(|e| VerifyError::Reference {
            path: p.display().to_string(),
            reason: e.to_string(),
        })?;
        decoded.insert(stem.clone(), img);
    }
    for key in &keys {
        let want = &reference.tensors[*key];
        let parts: Vec<&str> = key.split('.').collect();
        match parts.as_slice() {
            ["image", stem, "decoded_rgb_u8"] => {
                if let Some(img) = decoded.get(*stem) {
                    let got: Vec<f32> = img.data.iter().map(|&v| v as f32).collect();
                    out.push(compare_f32(
                        key,
                        &got,
                        &f32s(want).map_err(compute(key))?,
                        tols,
                    ));
                }
            }
            [kind @ ("pixel" | "pixel_u8"), stem, mode] => {
                let (Some(img), Some(mode)) = (decoded.get(*stem), parse_mode(mode)) else {
                    out.push(KeyResult {
                        key: key.to_string(),
                        outcome: Outcome::Skipped("unknown image or mode".into()),
                    });
                    continue;
                };
                let fitted = image::fit(img, mode, &ckpt.preprocess);
                let got: Vec<f32> = if *kind == "pixel_u8" {
                    fitted.data.iter().map(|&v| v as f32).collect()
                } else {
                    image::normalize(&fitted, &ckpt.preprocess)
                };
                out.push(compare_f32(
                    key,
                    &got,
                    &f32s(want).map_err(compute(key))?,
                    tols,
                ));
            }
            _ => {}
        }
    }

    // Tokenizer and prompts.
    let tok = ckpt.tokenizer()?;
    let scheme = ckpt.image_tokens(&tok)?;
    if let Some(strings) = reference.get("tokenizer.strings").as_array() {
        for (i, s) in strings.iter().enumerate() {
            let text = s["text"].as_str().unwrap_or_default();
            let got: Vec<i64> = tok.encode(text)?.into_iter().map(i64::from).collect();
            out.push(compare_ids(
                &format!("tokenizer.{i}"),
                &got,
                &json_ids(&s["ids"]),
            ));
        }
    }
    if let Some(prompts) = reference.get("prompts").as_object() {
        for (tpl, turns) in prompts {
            for (turn, p) in turns.as_object().into_iter().flatten() {
                let text = p["text"].as_str().unwrap_or_default();
                let got =
                    prompt::build(&tok, text, &scheme).map_err(|e| VerifyError::Reference {
                        path: format!("prompts.{tpl}.{turn}"),
                        reason: e.to_string(),
                    })?;
                out.push(compare_ids(
                    &format!("prompt.{tpl}.{turn}"),
                    &got.reference_ids(),
                    &json_ids(&p["ids"]),
                ));
            }
        }
    }

    // The forward pass: our pixels, our ids.
    let forward_prompt = reference
        .get("forward_prompt")
        .as_str()
        .unwrap_or_default()
        .to_string();
    let forward_text = reference
        .get(&format!("{forward_prompt}.text"))
        .as_str()
        .map(str::to_string);
    let forward_image = reference
        .get("forward_image")
        .as_str()
        .unwrap_or_default()
        .to_string();
    let needs_model = keys.iter().any(|k| {
        k.starts_with("vision.") || k.starts_with("logits.") || k.starts_with("generate.")
    });
    if let (Some(text), true) = (forward_text, needs_model) {
        let model = ckpt.load_model(DType::F32, device)?;
        let (stem, mode) = forward_image
            .split_once('/')
            .unwrap_or((forward_image.as_str(), "crop"));
        let img = decoded.get(stem).ok_or_else(|| VerifyError::Reference {
            path: "forward_image".into(),
            reason: format!("image {stem:?} is not in `images`"),
        })?;
        let mode = parse_mode(mode).unwrap_or(ckpt.aspect);
        let pixels = image::preprocess(img, mode, &ckpt.preprocess);
        let (cw, ch) = ckpt.preprocess.crop;
        let pixels = Tensor::from_vec(pixels, (1, 3, ch as usize, cw as usize), device)
            .map_err(compute("pixels"))?;
        let feats = model
            .vision_features(&pixels)
            .map_err(compute("vision tower"))?;
        let projected = model
            .projector
            .forward(&feats)
            .map_err(compute("projector"))?;
        let p = prompt::build(&tok, &text, &scheme).map_err(|e| VerifyError::Reference {
            path: forward_prompt.clone(),
            reason: e.to_string(),
        })?;
        let slots: Vec<std::ops::Range<usize>> =
            p.images.iter().map(|s| s.at..s.at + s.replaces).collect();
        let embeds = model
            .embed_with_images(&p.ids, &slots, Some(&projected))
            .map_err(compute("splicing the image"))?;
        let len = embeds.dim(1).map_err(compute("embeddings"))?;
        let mut cache = kollava_model::KvCache::new(model.config().decoder.num_hidden_layers, 1);
        let hidden = model
            .decoder
            .forward(&embeds, &[len], &mut cache)
            .map_err(compute("decoder prefill"))?;
        for key in &keys {
            let want = &reference.tensors[*key];
            let got = match key.as_str() {
                "vision.select_layer_features" => Some(f32s(&feats)),
                "vision.projector_output" => Some(f32s(&projected)),
                "logits.last3" => {
                    let n = want.dim(0).unwrap_or(3).min(len);
                    Some(
                        hidden
                            .narrow(1, len - n, n)
                            .and_then(|h| model.decoder.logits(&h))
                            .and_then(|l| f32s(&l)),
                    )
                }
                "prompt.forward_ids" => {
                    let w: Vec<i64> = want
                        .flatten_all()
                        .and_then(|t| t.to_dtype(DType::I64))
                        .and_then(|t| t.to_vec1())
                        .map_err(compute(key))?;
                    out.push(compare_ids(key, &p.reference_ids(), &w));
                    None
                }
                _ => None,
            };
            if let Some(got) = got {
                out.push(compare_f32(
                    key,
                    &got.map_err(compute(key))?,
                    &f32s(want).map_err(compute(key))?,
                    tols,
                ));
            }
        }
        if let Some(want) = reference.tensors.get("generate.greedy_ids") {
            let want: Vec<i64> = want
                .flatten_all()
                .and_then(|t| t.to_dtype(DType::I64))
                .and_then(|t| t.to_vec1())
                .map_err(compute("generate"))?;
            let opts = kollava_generate::GenerateOptions {
                sampling: kollava_generate::SamplingParams::greedy(),
                max_new_tokens: want.len(),
                // The reference ignores EOS and stop strings for these tokens.
                eos_ids: Vec::new(),
                stop_strings: Vec::new(),
                context_len: usize::MAX,
                constraint: None,
            };
            let g = kollava_generate::generate(&model, &tok, &embeds, &p.ids, &opts, &mut |_| true)
                .map_err(compute("greedy generation"))?;
            let got: Vec<i64> = g.ids.iter().map(|&i| i as i64).collect();
            out.push(compare_ids("generate.greedy_ids", &got, &want));
        }
    }
    if reference.get("train_labels").is_object() {
        out.extend(verify_training(
            ckpt, reference, &tok, &scheme, &decoded, tols, device,
        )?);
    }
    Ok(out)
}
