//! Everything about a checkpoint on disk, resolved once: where its files are, which family
//! it is, its [`ModelConfig`], how images are preprocessed and enter the ids, which
//! conversation template the reference picks, and a loaded [`Llava`].
//!
//! Brief overview: [`open`] locates the directory ([`locate`]), reads `config.json` into
//! [`config::RawLlavaConfig`], detects the [`Family`] from `architectures`/`model_type`,
//! finds the vision tower, and resolves everything into a [`Checkpoint`]. Then
//! [`Checkpoint::load_model`] builds `VarBuilder`s over the weights ([`weights`]) with the
//! family's keys renamed to the canonical LLaVA names and hands them to the model crate.
//!
//! It owns files and JSON, and the tensor work of rewriting checkpoints (layout and dtype
//! conversion, GGUF quantization, PyTorch pickles, LoRA deltas); no tokenizing or HTTP.

pub mod config;
pub mod convert;
pub mod delta;
pub mod gguf;
pub mod locate;
pub mod mpt;
pub mod precision;
pub mod random;
pub mod torch_pickle;
pub mod trainable;
pub mod weights;

pub use kollava_inputs::untrusted;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use kollava_inputs::image::{AspectMode, ClipPreprocess};
use kollava_inputs::template::{template_for_model_name, NameRule};
use kollava_inputs::{ImageTokens, Tokenizer};
use kollava_model::form::{Form, Matrices};
use kollava_model::{Llava, ModelConfig};

pub use config::{Family, Layout, Llm};
pub use precision::Precision;

/// Errors opening or loading a checkpoint. Each names the file, key or value at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    #[error("model directory {path} does not exist")]
    MissingDir { path: String },
    #[error("{path} is a file; --model takes a checkpoint directory or a hub repo id")]
    NotADirectory { path: String },
    #[error("{repo} is not in the local Hugging Face cache ({cache}) and nothing can be downloaded here: download it first (`huggingface-cli download {repo}`) or pass its directory")]
    NotDownloaded { repo: String, cache: String },
    #[error("cannot read {path}: {reason}")]
    Io { path: String, reason: String },
    #[error("{file} is not valid JSON: {reason}")]
    Json { file: String, reason: String },
    #[error("{file} has no {key:?}")]
    MissingKey { file: String, key: String },
    #[error("{file}: unsupported {what}")]
    Unsupported { file: String, what: String },
    #[error("{file}: invalid {what}")]
    Invalid { file: String, what: String },
    #[error("{file} does not describe a LLaVA checkpoint (architectures {architectures:?}, model_type {model_type:?}); supported: LlavaLlamaForCausalLM (v0, 1.5), LlavaMistralForCausalLM, LlavaForConditionalGeneration")]
    UnknownFamily {
        file: String,
        architectures: Vec<String>,
        model_type: Option<String>,
    },
    #[error("shard {shard} listed in {index} is missing")]
    MissingShard { shard: String, index: String },
    #[error("{file} has no tensor {key}, which {index} places in it")]
    MissingTensor {
        key: String,
        file: String,
        index: String,
    },
    #[error("no weights in {dir}: expected model.safetensors[.index.json] or pytorch_model.bin[.index.json]")]
    NoWeights { dir: String },
    #[error("cannot read weights from {file}: {reason}")]
    Weights { file: String, reason: String },
    #[error("vision tower {name:?} (mm_vision_tower in {config}) is not on disk: download it (`huggingface-cli download {name}`) or pass --vision-tower PATH")]
    MissingVisionTower { name: String, config: String },
    #[error("loading {part} weights from {dir}: {reason}")]
    Load {
        part: &'static str,
        dir: String,
        reason: String,
    },
    #[error("the tokenizer of {dir} has no {token} token, which this {family} checkpoint needs")]
    MissingImageToken {
        dir: String,
        token: String,
        family: &'static str,
    },
    #[error(transparent)]
    Tokenizer(#[from] kollava_inputs::tokenizer::TokenizerError),
}

/// Options the user can give when opening a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// `--vision-tower`: a CLIP directory or repo id overriding `mm_vision_tower`.
    pub vision_tower: Option<String>,
    /// `--projector`: projector weights replacing the checkpoint's (a stage-1 result, or
    /// LLaVA's `mm_projector` file; the reference's `--model-base` projector-only case).
    pub projector: Option<PathBuf>,
    /// `--mmproj`: the image encoder of a GGUF language model (default: the one
    /// `mmproj*.gguf` beside it).
    pub mmproj: Option<PathBuf>,
}

/// A resolved checkpoint, ready to load.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub dir: PathBuf,
    /// The name the reference derives from the path (drives its template choice).
    pub name: String,
    pub family: Family,
    pub config: ModelConfig,
    /// Where the CLIP weights come from: a separate tower directory, or `None` when they
    /// are inside the checkpoint (llava-hf).
    pub vision_dir: Option<PathBuf>,
    pub preprocess: ClipPreprocess,
    pub aspect: AspectMode,
    /// Longest prompt + answer in tokens (LLaVA's `context_len`).
    pub context_len: usize,
    /// Ids that end generation besides the template's stop string.
    pub eos_ids: Vec<u32>,
    /// llava-hf's `image_token_index`; v0's `mm_use_im_start_end`.
    image_token_index: Option<u32>,
    use_im_start_end: bool,
    projector_file: Option<PathBuf>,
    /// `kollava_template` from config.json, when it names a known template.
    trained_template: Option<&'static str>,
    /// A llava-hf checkpoint converted from LLaVA's layout: prompts tokenized as LLaVA does.
    original_tokenization: bool,
    /// Set when the checkpoint is a GGUF pair rather than a directory of tensors.
    gguf: Option<std::sync::Arc<gguf::GgufPair>>,
}

/// A candle error as one line. With `RUST_BACKTRACE` set candle appends a backtrace to its
/// errors, and its `Context` puts the context on a line of its own; either would break the
/// CLI's one-line `error: …`.
pub(crate) fn candle_reason(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_reason(inner),
        candle_core::Error::Context { inner, context } => {
            format!("{context}: {}", candle_reason(inner))
        }
        other => other.to_string().lines().collect::<Vec<_>>().join(" "),
    }
}

/// Builds a new directory `out` atomically: `write` fills a temporary sibling, which is
/// renamed to `out` only when it succeeds (and removed when it fails), so a failed or
/// interrupted run never leaves a half-written checkpoint. `out` must not exist or be empty.
pub(crate) fn write_dir_atomically<T>(
    out: &Path,
    write: impl FnOnce(&Path) -> Result<T, CheckpointError>,
) -> Result<T, CheckpointError> {
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |e: std::io::Error| CheckpointError::Io {
            path: p.clone(),
            reason: e.to_string(),
        }
    };
    if out.exists() && std::fs::read_dir(out).map_err(io(out))?.next().is_some() {
        return Err(CheckpointError::Invalid {
            file: out.display().to_string(),
            what: "output directory: it exists and is not empty".into(),
        });
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let name = out.file_name().and_then(|s| s.to_str()).unwrap_or("out");
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let value = match write(&tmp) {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if out.exists() {
        std::fs::remove_dir(out).map_err(io(out))?;
    }
    std::fs::rename(&tmp, out).map_err(io(out))?;
    Ok(value)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, CheckpointError> {
    let text = std::fs::read_to_string(path).map_err(|e| CheckpointError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| CheckpointError::Json {
        file: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn eos_list(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|n| vec![n as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|n| n as u32))
            .collect(),
        _ => Vec::new(),
    }
}

/// Finds a tower named by `mm_vision_tower`: relative to the checkpoint, a path, or a repo
/// id in the hub cache.
fn find_vision_tower(
    name: &str,
    ckpt_dir: &Path,
    config_file: &Path,
) -> Result<PathBuf, CheckpointError> {
    let relative = ckpt_dir.join(name);
    if relative.join("config.json").is_file() {
        return Ok(relative);
    }
    let direct = PathBuf::from(name);
    if direct.join("config.json").is_file() {
        return Ok(direct);
    }
    if let Some(dir) = locate::hub_snapshot(name) {
        return Ok(dir);
    }
    Err(CheckpointError::MissingVisionTower {
        name: name.to_string(),
        config: config_file.display().to_string(),
    })
}

/// Opens a checkpoint directory or cached repo id and resolves its configuration.
pub fn open(model: &str, opts: &OpenOptions) -> Result<Checkpoint, CheckpointError> {
    match gguf::find_pair(Path::new(model), opts.mmproj.as_deref())? {
        Some((model, mmproj)) => return gguf::open_pair(model, mmproj),
        None => {
            if let Some(m) = &opts.mmproj {
                return Err(CheckpointError::Invalid {
                    file: m.display().to_string(),
                    what: format!("--mmproj: it goes with a GGUF --model, and {model} is not one"),
                });
            }
        }
    }
    let loc = locate::locate(model)?;
    let config_file = loc.dir.join("config.json");
    if !config_file.is_file() {
        return Err(CheckpointError::Io {
            path: config_file.display().to_string(),
            reason: "no such file (is this a checkpoint directory?)".into(),
        });
    }
    let raw: config::RawLlavaConfig = read_json(&config_file)?;
    let cfg_name = config_file.display().to_string();
    let family = config::detect_family(&raw, &cfg_name)?;

    let (vision_cfg, vision_dir, preprocessor_file) =
        if family.layout == Layout::LlavaHf && opts.vision_tower.is_none() {
            let v = raw
                .vision_config
                .clone()
                .ok_or_else(|| CheckpointError::MissingKey {
                    file: cfg_name.clone(),
                    key: "vision_config".into(),
                })?;
            (
                config::resolve_clip(&v, &cfg_name)?,
                None,
                loc.dir.join("preprocessor_config.json"),
            )
        } else {
            let name = opts
                .vision_tower
                .clone()
                .or_else(|| raw.mm_vision_tower.clone())
                .ok_or_else(|| CheckpointError::MissingKey {
                    file: cfg_name.clone(),
                    key: "mm_vision_tower".into(),
                })?;
            let dir = match &opts.vision_tower {
                Some(p) if Path::new(p).is_dir() => PathBuf::from(p),
                _ => find_vision_tower(&name, &loc.dir, &config_file)?,
            };
            let vcfg_file = dir.join("config.json");
            let v: config::RawClipConfig = read_json(&vcfg_file)?;
            (
                config::resolve_clip(&v, &vcfg_file.display().to_string())?,
                Some(dir.clone()),
                dir.join("preprocessor_config.json"),
            )
        };
    let raw_pre: Option<config::RawPreprocessorConfig> = if preprocessor_file.is_file() {
        Some(read_json(&preprocessor_file)?)
    } else {
        None
    };
    let preprocess = config::resolve_preprocess(raw_pre.as_ref(), vision_cfg.image_size);
    let model_config = config::resolve_model(&raw, family, vision_cfg, &cfg_name)?;

    let aspect = match family.layout {
        // llava-hf's CLIP processor center-crops whatever the original model was trained
        // with; its `LlavaImageProcessor` with `do_pad` pads as LLaVA's `pad` does.
        Layout::LlavaHf if raw_pre.as_ref().and_then(|p| p.do_pad) == Some(true) => AspectMode::Pad,
        Layout::LlavaHf | Layout::LlavaV0 => AspectMode::Crop,
        Layout::Llava15 => match raw.image_aspect_ratio.as_deref().unwrap_or("square") {
            "pad" => AspectMode::Pad,
            "square" => AspectMode::Crop,
            "resize" => AspectMode::Resize,
            other => {
                return Err(CheckpointError::Unsupported {
                    file: cfg_name,
                    what: format!(
                        "image_aspect_ratio {other:?} (LLaVA-1.6 anyres is out of scope)"
                    ),
                })
            }
        },
    };
    let text = raw.text_config.as_deref().unwrap_or(&raw);
    let context_len = raw
        .max_sequence_length
        .or(text.max_position_embeddings)
        .or(raw.max_seq_len)
        .unwrap_or(2048);
    let mut eos_ids = eos_list(text.eos_token_id.as_ref().or(raw.eos_token_id.as_ref()));
    let gen_file = loc.dir.join("generation_config.json");
    if gen_file.is_file() {
        let gen: serde_json::Value = read_json(&gen_file)?;
        for id in eos_list(gen.get("eos_token_id")) {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
    }
    Ok(Checkpoint {
        dir: loc.dir,
        name: loc.name,
        family,
        config: model_config,
        vision_dir,
        preprocess,
        aspect,
        context_len,
        eos_ids,
        image_token_index: raw.image_token_index,
        projector_file: opts.projector.clone(),
        trained_template: raw.kollava_template.as_deref().and_then(|t| {
            kollava_inputs::template::Template::names()
                .iter()
                .copied()
                .find(|n| *n == t)
        }),
        use_im_start_end: raw.mm_use_im_start_end.unwrap_or(false),
        original_tokenization: raw.kollava_original_tokenization.unwrap_or(false),
        gguf: None,
    })
}

impl Checkpoint {
    /// The checkpoint's tokenizer.
    pub fn tokenizer(&self) -> Result<Tokenizer, CheckpointError> {
        if let Some(pair) = &self.gguf {
            return pair.tokenizer();
        }
        if self.original_tokenization && self.dir.join("tokenizer.model").is_file() {
            // Converted from LLaVA's layout: the tokenizer the model was trained with, to the
            // letter (the repo's tokenizer.json is for transformers).
            return Ok(Tokenizer::from_dir_sentencepiece(&self.dir)?);
        }
        Ok(Tokenizer::from_dir(&self.dir)?)
    }

    /// How images enter this checkpoint's ids.
    pub fn image_tokens(&self, tok: &Tokenizer) -> Result<ImageTokens, CheckpointError> {
        let n = self.config.image_tokens();
        let need = |token: &str| {
            tok.token_to_id(token)
                .ok_or_else(|| CheckpointError::MissingImageToken {
                    dir: self.dir.display().to_string(),
                    token: token.to_string(),
                    family: self.family.name(),
                })
        };
        Ok(match self.family.layout {
            Layout::LlavaV0 => ImageTokens::PatchTokens {
                patch: need("<im_patch>")?,
                start_end: if self.use_im_start_end {
                    Some((need("<im_start>")?, need("<im_end>")?))
                } else {
                    None
                },
                n,
            },
            // Converted from LLaVA's layout: tokenized as it was trained (the `<image>` id
            // then never appears; the features go where the text splits).
            Layout::LlavaHf if self.original_tokenization => ImageTokens::Splice { n },
            Layout::LlavaHf => ImageTokens::Token {
                id: match self.image_token_index {
                    Some(id) => id,
                    None => need("<image>")?,
                },
                n,
            },
            Layout::Llava15 => ImageTokens::Splice { n },
        })
    }

    /// The conversation template the reference's CLI picks for this checkpoint (llava-spec
    /// §4.4): June-2023 `run_llava`'s rule for v0, fork-HEAD's for 1.5-style checkpoints.
    /// A model trained by kollava names its format in config.json, and that wins.
    pub fn default_template(&self) -> &'static str {
        if let Some(t) = self.trained_template {
            return t;
        }
        match (self.family.layout, self.family.llm) {
            // The reference loads MPT only when "mpt" is in the name and then picks this
            // (June `run_llava`); any other template would lack the ChatML roles.
            (_, Llm::Mpt) => "mpt_multimodal",
            (Layout::LlavaV0, _) => template_for_model_name(&self.name, NameRule::ForkJuneRunLlava),
            (Layout::Llava15, _) => template_for_model_name(&self.name, NameRule::ForkHeadCli),
            (Layout::LlavaHf, _) => "llava_hf",
        }
    }

    /// The top-k of the reference worker's sampler for this checkpoint (LLaVA's
    /// `/worker_generate_stream`): June-2023's worker (v0 checkpoints) draws from the whole
    /// softmax (0: off); v1.0 on go through HF `generate`, whose default is 50.
    pub fn worker_top_k(&self) -> usize {
        match self.family.layout {
            Layout::LlavaV0 => 0,
            Layout::Llava15 | Layout::LlavaHf => 50,
        }
    }

    /// Strings that end an answer with `template`: its own stop string, plus `###` for the
    /// 1.5-style families, whose reference CLI (KoLLaVA fork-HEAD `llava/serve/cli.py`)
    /// always stops there. KoLLaVA-v1.5-Synatra was trained in the `###` format and emits
    /// it whatever template it is prompted with (llava-spec §1c, §6.2).
    pub fn stop_strings(&self, template: &kollava_inputs::template::Template) -> Vec<String> {
        let mut stops = vec![template.stop_string().to_string()];
        if self.family.layout == Layout::Llava15 {
            stops.push("###".into());
        }
        stops.retain(|s| !s.is_empty());
        stops.dedup();
        stops
    }

    /// Loads the weights as read, for training and checks (inference builds its form with
    /// [`Checkpoint::load_for_inference`]): the language model and projector in `dtype`,
    /// the vision tower always in f32 (it is small and compute-bound, and f32 runs faster
    /// than f16 there on CPU). A GGUF pair loads as stored (quantized matrices stay
    /// quantized) whatever `dtype`.
    pub fn load_model(&self, dtype: DType, device: &Device) -> Result<Llava, CheckpointError> {
        match &self.gguf {
            Some(pair) => pair.load(self, device, Form::AsRead),
            None => self.load_with(dtype, device, Form::AsRead, &|vb, _| vb),
        }
    }

    /// `VarBuilder`s over the weights with canonical names: the language model (and
    /// projector) at the root, the tower at `vision_model`'s parent (the tower in f32).
    pub(crate) fn var_builders(
        &self,
        dtype: DType,
        device: &Device,
    ) -> Result<(VarBuilder<'static>, VarBuilder<'static>), CheckpointError> {
        if self.gguf.is_some() {
            return Err(CheckpointError::Unsupported {
                file: self.dir.display().to_string(),
                what: "operation on a GGUF model (convert, train and merge read safetensors or .bin checkpoints)".into(),
            });
        }
        let files = weights::find_weights(&self.dir)?;
        let layout = weights::KeyLayout::detect(&files.names);
        if let Some(what) = layout.mismatch(&files.names) {
            return Err(CheckpointError::Invalid {
                file: self.dir.display().to_string(),
                what,
            });
        }
        // LLaVA's trainer saves a copy of the tower under `model.vision_tower.`; upstream
        // ignores it and so do we (the tower comes from `mm_vision_tower`).
        let skip_tower_copy = layout == weights::KeyLayout::Llava;
        let tower = layout.vision_key("vision_model.");
        let vb = weights::var_builder_filtered(&files, dtype, device, &|name: &str| {
            if skip_tower_copy && name.starts_with("model.vision_tower.") {
                None
            } else if name.starts_with(&tower) {
                Some(DType::F32) // what the tower runs in
            } else {
                Some(dtype)
            }
        })?;
        let llm = vb.clone().rename_f(move |name| layout.llm_key(name));
        let vision = match &self.vision_dir {
            Some(dir) => {
                let vfiles = weights::find_weights(dir)?;
                weights::var_builder(&vfiles, DType::F32, device, "vision_model.")?
            }
            None => vb
                .rename_f(move |name| layout.vision_key(name))
                .set_dtype(DType::F32),
        };
        Ok((llm, vision))
    }

    /// [`Checkpoint::load_model`] with every `VarBuilder` passed through `wrap` first
    /// (rooted at canonical names: the language model at the root, the tower at
    /// `vision_model`'s parent, a `--projector` file at the root), so a caller can watch or
    /// replace the tensors the model takes.
    pub(crate) fn load_with(
        &self,
        dtype: DType,
        device: &Device,
        form: Form,
        wrap: &dyn Fn(VarBuilder<'static>, DType) -> VarBuilder<'static>,
    ) -> Result<Llava, CheckpointError> {
        let (llm, vision) = self.var_builders(dtype, device)?;
        let llm = wrap(llm, dtype);
        let vision = wrap(vision, DType::F32).pp("vision_model");
        let load_err = |part: &'static str, dir: &Path| {
            let dir = dir.display().to_string();
            move |e: candle_core::Error| CheckpointError::Load {
                part,
                dir,
                reason: candle_reason(&e),
            }
        };
        let vision_dir = self.vision_dir.clone().unwrap_or_else(|| self.dir.clone());
        let mut model = Llava::load(llm, vision, &self.config, form, None).map_err(|e| {
            let text = e.to_string();
            if text.contains("vision_model") {
                load_err("vision tower", &vision_dir)(e)
            } else {
                load_err("language model", &self.dir)(e)
            }
        })?;
        if let Some(file) = &self.projector_file {
            model.projector = self.load_projector_file(file, dtype, device, form, wrap)?;
        }
        Ok(model)
    }

    /// Projector weights from a separate file, with LLaVA's (`model.mm_projector.*`),
    /// LLaVA-MPT's (`transformer.mm_projector.*`) or llava-hf's
    /// (`multi_modal_projector.linear_N.*`) names.
    fn load_projector_file(
        &self,
        file: &Path,
        dtype: DType,
        device: &Device,
        form: Form,
        wrap: &dyn Fn(VarBuilder<'static>, DType) -> VarBuilder<'static>,
    ) -> Result<kollava_model::projector::Projector, CheckpointError> {
        let files = weights::WeightFiles::single(file)?;
        let has = |prefix: &str| files.names.iter().any(|n| n.starts_with(prefix));
        let vb = weights::var_builder(&files, dtype, device, "")?;
        let vb = if has("multi_modal_projector.") {
            vb.rename_f(|n| weights::HF_LEGACY.llm_key(n))
        } else if has("transformer.mm_projector.") {
            vb.rename_f(|n| weights::KeyLayout::Mpt.llm_key(n))
        } else {
            vb
        };
        let vb = wrap(vb, dtype);
        kollava_model::projector::Projector::load(
            vb.pp("model").pp("mm_projector"),
            self.config.projector,
            self.config.vision.hidden_size,
            self.config.decoder.hidden_size,
            Matrices {
                pack: form.vision(),
                stored: None,
            },
        )
        .map_err(|e| CheckpointError::Load {
            part: "projector",
            dir: file.display().to_string(),
            reason: candle_reason(&e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kollava_inputs::template::Template;

    fn fixture(name: &str) -> Checkpoint {
        open(
            kollava_testkit::checkpoint_dir(name).to_str().unwrap(),
            &OpenOptions::default(),
        )
        .unwrap()
    }

    #[test]
    fn reference_template_choice_per_fixture() {
        // June-2023 run_llava: no "v1" in "llava-v0" → multimodal; fork-HEAD CLI: "v1" → llava_v1.
        assert_eq!(fixture("llava-v0").default_template(), "multimodal");
        assert_eq!(fixture("llava-v1.5").default_template(), "llava_v1");
        assert_eq!(fixture("llava-hf").default_template(), "llava_hf");
        // LLaVA-MPT: June's rule gives `mpt_multimodal`, and so does a directory whose name
        // lacks "mpt" (the reference would not load it as MPT at all).
        let mpt = fixture("llava-mpt");
        assert_eq!(mpt.default_template(), "mpt_multimodal");
        let renamed = Checkpoint {
            name: "my-finetune-v1".into(),
            ..mpt
        };
        assert_eq!(renamed.default_template(), "mpt_multimodal");
    }

    /// Each family is a layout times a language model, and goes by one name.
    #[test]
    fn families_are_layouts_times_language_models() {
        for (family, name) in Family::KNOWN {
            assert_eq!(Family::from_name(name), Some(family));
            assert_eq!(family.name(), name);
        }
        let pairs: std::collections::HashSet<_> = Family::KNOWN
            .iter()
            .map(|(f, _)| (f.layout, f.llm))
            .collect();
        assert_eq!(pairs.len(), Family::KNOWN.len(), "one row per pair");
        assert_eq!(fixture("llava-mpt").family.layout, Layout::LlavaV0);
        assert_eq!(fixture("llava-mistral").family.llm, Llm::Mistral);
    }

    #[test]
    fn kollava_1_5_style_models_also_stop_on_hashes() {
        let v15 = fixture("llava-v1.5");
        let t = Template::by_name("llava_v1").unwrap();
        assert_eq!(
            v15.stop_strings(&t),
            vec!["</s>".to_string(), "###".to_string()]
        );
        let mistral = fixture("llava-mistral");
        let t = Template::by_name("mistral").unwrap();
        assert_eq!(
            mistral.stop_strings(&t),
            vec!["<|im_end|>".to_string(), "###".to_string()]
        );
        let v0 = fixture("llava-v0");
        let t = Template::by_name("multimodal").unwrap();
        assert_eq!(v0.stop_strings(&t), vec!["###".to_string()]);
    }

    #[test]
    fn symlinked_checkpoints_keep_the_name_the_user_typed() {
        let tmp = tempfile::tempdir().unwrap();
        let link = tmp.path().join("llava-v1.5-7b");
        std::os::unix::fs::symlink(kollava_testkit::checkpoint_dir("llava-v1.5"), &link).unwrap();
        let c = open(link.to_str().unwrap(), &OpenOptions::default()).unwrap();
        assert_eq!(c.name, "llava-v1.5-7b");
    }
}
