//! The straight path every command shares, top to bottom: checkpoint → tokenizer and model
//! → template → prompt ids + image pixels → features spliced into embeddings → generate.
//! Library crates do the work; this file only wires them, in the order the data flows.

use std::ops::Range;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use kollava_checkpoint::{Checkpoint, OpenOptions};
use kollava_generate::{GenerateOptions, Generation, SamplingParams};
use kollava_inputs::image::{self, AspectMode, RgbImage};
use kollava_inputs::template::{Conversation, Template};
use kollava_inputs::{prompt, ImageTokens, Tokenizer};
use kollava_model::Llava;

use crate::args::{ModelArgs, SamplingArgs};

/// A loaded checkpoint with everything needed to answer.
pub struct Loaded {
    pub ckpt: Checkpoint,
    pub tok: Tokenizer,
    pub model: Llava,
    pub scheme: ImageTokens,
    pub template: Template,
    pub aspect: AspectMode,
    pub device: Device,
    pub load_ms: f64,
}

/// Timings of one answer, in milliseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    pub load_ms: f64,
    pub preprocess_ms: f64,
    pub vision_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub decode_tokens_per_s: f64,
}

pub struct Answer {
    pub generation: Generation,
    pub prompt_tokens: usize,
    pub timings: Timings,
}

pub fn load(args: &ModelArgs) -> Result<Loaded> {
    let t0 = Instant::now();
    let ckpt = kollava_checkpoint::open(
        &args.model,
        &OpenOptions {
            vision_tower: args.vision_tower.clone(),
        },
    )?;
    let tok = ckpt.tokenizer()?;
    let scheme = ckpt.image_tokens(&tok)?;
    let template_name = args
        .conv_mode
        .clone()
        .unwrap_or_else(|| ckpt.default_template().to_string());
    let template = Template::by_name(&template_name).with_context(|| {
        format!(
            "unknown --conv-mode {template_name:?}; known: {}",
            Template::names().join(", ")
        )
    })?;
    if let Some(m) = &args.conv_mode {
        if m != ckpt.default_template() {
            tracing::warn!(
                "using template {m} instead of {} (the reference's choice for {})",
                ckpt.default_template(),
                ckpt.name
            );
        }
    }
    tracing::info!(
        family = ckpt.family.name(),
        template = template.name,
        "loading {}",
        ckpt.dir.display()
    );
    let aspect = match args.image_aspect.as_deref() {
        Some("crop") => AspectMode::Crop,
        Some("pad") => AspectMode::Pad,
        Some("resize") => AspectMode::Resize,
        _ => ckpt.aspect,
    };
    // CPU inference runs in f32: candle has no CPU bf16 matmul; f16/bf16 weights are upcast.
    // The CUDA build keeps f32 too until the performance work (issue 6) adds faster paths.
    #[cfg(feature = "cuda")]
    let device = Device::cuda_if_available(0)?;
    #[cfg(not(feature = "cuda"))]
    let device = Device::Cpu;
    let dtype = if args.dtype == "f16" {
        DType::F16
    } else {
        DType::F32
    };
    let model = ckpt.load_model(dtype, &device)?;
    Ok(Loaded {
        ckpt,
        tok,
        model,
        scheme,
        template,
        aspect,
        device,
        load_ms: t0.elapsed().as_secs_f64() * 1e3,
    })
}

/// Reads an image from a path or an http(s) URL.
pub fn read_image(spec: &str) -> Result<RgbImage> {
    if spec.starts_with("http://") || spec.starts_with("https://") {
        let mut resp = ureq::get(spec)
            .call()
            .with_context(|| format!("cannot fetch image {spec}"))?;
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(256 << 20)
            .read_to_vec()
            .with_context(|| format!("cannot read image {spec}"))?;
        return Ok(image::decode(&bytes, spec)?);
    }
    Ok(image::open(std::path::Path::new(spec))?)
}

pub fn sampling_params(s: &SamplingArgs) -> Result<SamplingParams> {
    let p = SamplingParams {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        repetition_penalty: s.repetition_penalty,
        seed: s.seed,
    };
    p.validate()?;
    Ok(p)
}

impl Loaded {
    /// The user text of a turn: the question with the image placeholder where this
    /// checkpoint's reference code puts it.
    pub fn user_text(&self, query: &str, with_image: bool) -> String {
        if with_image {
            self.scheme.user_text(query)
        } else {
            query.to_string()
        }
    }

    /// Generates the assistant's next message for `conv` (whose last message is the
    /// assistant's `None`), with one image per `<image>` in the conversation.
    pub fn answer(
        &self,
        conv: &Conversation,
        images: &[RgbImage],
        sampling: &SamplingArgs,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Answer> {
        let mut timings = Timings {
            load_ms: self.load_ms,
            ..Default::default()
        };
        let text = conv.prompt();
        let p = prompt::build(&self.tok, &text, &self.scheme)?;
        if p.images.len() != images.len() {
            bail!(
                "the prompt has {} image slots but {} images were given",
                p.images.len(),
                images.len()
            );
        }
        let n = self.scheme.n();
        let prompt_tokens = p.spliced_len(n);
        let context = self.ckpt.context_len;
        if prompt_tokens >= context {
            bail!(
                "the prompt is {prompt_tokens} tokens with its images, but the model's context of \
                 {context} tokens must also hold the answer: shorten it by at least {} tokens",
                prompt_tokens + 1 - context
            );
        }

        let t = Instant::now();
        let (cw, ch) = self.ckpt.preprocess.crop;
        let mut pixels = Vec::with_capacity(images.len() * 3 * (cw * ch) as usize);
        for img in images {
            pixels.extend(image::preprocess(img, self.aspect, &self.ckpt.preprocess));
        }
        timings.preprocess_ms = t.elapsed().as_secs_f64() * 1e3;

        let t = Instant::now();
        let features = if images.is_empty() {
            None
        } else {
            let px = Tensor::from_vec(
                pixels,
                (images.len(), 3, ch as usize, cw as usize),
                &self.device,
            )?;
            Some(self.model.encode_images(&px)?)
        };
        let slots: Vec<Range<usize>> = p.images.iter().map(|s| s.at..s.at + s.replaces).collect();
        let embeds = self
            .model
            .embed_with_images(&p.ids, &slots, features.as_ref())?;
        timings.vision_ms = t.elapsed().as_secs_f64() * 1e3;

        let mut eos_ids = if self.ckpt.eos_ids.is_empty() {
            vec![self.tok.eos_id]
        } else {
            self.ckpt.eos_ids.clone()
        };
        let mut stop_strings = Vec::new();
        for s in self.ckpt.stop_strings(&self.template) {
            // A stop string that is one special token (`</s>`, an added `<|im_end|>`) never
            // shows up in text decoded without special tokens: stop on its id instead.
            match self.tok.encode(&s).ok().as_deref() {
                Some([bos, id]) if *bos == self.tok.bos_id && self.tok.is_special(*id) => {
                    eos_ids.push(*id)
                }
                _ => stop_strings.push(s),
            }
        }
        let opts = GenerateOptions {
            sampling: sampling_params(sampling)?,
            max_new_tokens: sampling.max_new_tokens as usize,
            eos_ids,
            stop_strings,
            context_len: context,
        };
        let generation =
            kollava_generate::generate(&self.model, &self.tok, &embeds, &p.ids, &opts, on_text)?;
        timings.prefill_ms = generation.prefill_ms;
        timings.decode_ms = generation.decode_ms;
        timings.decode_tokens_per_s = if generation.decode_ms > 0.0 {
            generation.ids.len() as f64 / (generation.decode_ms / 1e3)
        } else {
            0.0
        };
        Ok(Answer {
            generation,
            prompt_tokens,
            timings,
        })
    }
}
