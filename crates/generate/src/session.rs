//! A loaded checkpoint ready to answer: the straight path every front end (CLI, server)
//! shares, in the order the data flows: checkpoint → tokenizer and model → template →
//! prompt ids + image pixels → features spliced into embeddings → [`generate`].
//!
//! [`generate`]: crate::engine::generate

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use kollava_checkpoint::{Checkpoint, CheckpointError, OpenOptions};
use kollava_inputs::image::{self, AspectMode, RgbImage};
use kollava_inputs::prompt::{self, PromptError};
use kollava_inputs::template::{Conversation, Template};
use kollava_inputs::{ImageTokens, Tokenizer};
use kollava_model::Llava;

use crate::engine::{Batch, GenerateOptions, Generation, Prompt};
use crate::prefix_cache::{image_digest, FeatureCache, PosKey, PrefixCache};
use crate::sampler::{InvalidParam, SamplingParams};

/// Errors loading a session or answering. Each names what is at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Tokenizer(#[from] kollava_inputs::tokenizer::TokenizerError),
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error(transparent)]
    Sampling(#[from] InvalidParam),
    #[error("unknown conversation template {name:?}; known: {known}")]
    UnknownTemplate { name: String, known: String },
    #[error("the prompt has {slots} image slots but {images} images were given")]
    ImageCount { slots: usize, images: usize },
    #[error("the prompt is {prompt_tokens} tokens with its images; the model's context of {context} tokens must also hold the answer: shorten it by at least {over} tokens")]
    TooLong {
        prompt_tokens: usize,
        context: usize,
        over: usize,
    },
    #[error("model computation failed: {0}")]
    Model(#[from] candle_core::Error),
}

/// What to load.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    pub model: String,
    pub vision_tower: Option<String>,
    /// Template name; `None` = the reference's choice for the checkpoint.
    pub conv_mode: Option<String>,
    /// Image fitting; `None` = the checkpoint's.
    pub aspect: Option<AspectMode>,
    /// Language-model weight dtype (the tower is always f32); `None`: f32, except that a
    /// quantized GGUF model computes its float matrices (the tower's) in bf16 where the CPU
    /// has our bf16 kernels (AVX512-BF16 or AVX2+FMA), since its quantization error already dwarfs bf16 rounding. A GGUF
    /// model's matrices stay as stored; with `bf16` its float ones run in bf16 too.
    pub dtype: Option<DType>,
    /// Projector weights replacing the checkpoint's.
    pub projector: Option<std::path::PathBuf>,
    /// The image encoder of a GGUF model (default: the `mmproj*.gguf` beside it).
    pub mmproj: Option<std::path::PathBuf>,
    /// Bytes of keys and values kept for reuse by later prompts (0: off; `None`: an eighth
    /// of the memory free after loading, 64 MiB to 4 GiB). See [`PrefixCache`].
    pub prefix_cache_bytes: Option<usize>,
    /// Bytes of projected image features kept by image (0: off; `None`: a quarter of the
    /// prefix cache's default). See [`FeatureCache`].
    pub image_cache_bytes: Option<usize>,
}

/// Per-answer settings.
#[derive(Debug, Clone)]
pub struct AnswerOptions {
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    /// Stop strings on top of the template's (an API client's `stop`).
    pub stop: Vec<String>,
    /// How images are fitted to the tower for this answer (`None`: the session's).
    pub aspect: Option<AspectMode>,
    /// The grammar the answer must follow (structured output, compiled by
    /// [`Session::grammars`]). The template's text stop strings are then not used: the
    /// grammar ends the answer, and a separator such as `###` may be part of a JSON string.
    pub constraint: Option<crate::Constraint>,
}

/// Timings of one answer, in milliseconds.
#[derive(Debug, Clone, Default)]
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

/// A prompt ready for the decoder.
pub struct EmbeddedPrompt {
    /// `(1, tokens, hidden)`.
    pub embeds: Tensor,
    /// The prompt's ids before the images were spliced in.
    pub ids: Vec<u32>,
    /// Positions after splicing.
    pub tokens: usize,
    /// What each position holds, for the prefix cache.
    pub keys: Vec<PosKey>,
}

impl EmbeddedPrompt {
    pub fn prompt(&self) -> Prompt<'_> {
        Prompt {
            embeds: &self.embeds,
            context_ids: &self.ids,
            keys: &self.keys,
        }
    }
}

/// A loaded checkpoint with everything needed to answer.
pub struct Session {
    pub ckpt: Checkpoint,
    /// How the weights are held ([`kollava_checkpoint::Precision`]).
    pub precision: kollava_checkpoint::Precision,
    pub tok: Tokenizer,
    pub model: Llava,
    pub scheme: ImageTokens,
    pub template: Template,
    pub aspect: AspectMode,
    pub device: Device,
    pub load_ms: f64,
    /// Keys and values of earlier prompts and answers (shared with the batches that use it).
    pub prefix_cache: Arc<PrefixCache>,
    /// Projected features of images seen before.
    pub feature_cache: Arc<FeatureCache>,
    /// Whether [`Session::answer`] keeps each answer's keys and values for a follow-up turn
    /// (an extra prefill of the answer once it is delivered; see [`Batch::store_answers`]):
    /// on for an interactive chat, off (the default) where nothing follows an answer up.
    pub keep_answers: bool,
    /// The vocabulary prepared for structured output (built on the first request for it).
    pub grammars: Arc<crate::Grammars>,
}

impl Session {
    pub fn load(opts: &SessionOptions) -> Result<Session, SessionError> {
        let t0 = Instant::now();
        let ckpt = kollava_checkpoint::open(
            &opts.model,
            &OpenOptions {
                vision_tower: opts.vision_tower.clone(),
                projector: opts.projector.clone(),
                mmproj: opts.mmproj.clone(),
            },
        )?;
        let tok = ckpt.tokenizer()?;
        let scheme = ckpt.image_tokens(&tok)?;
        let name = opts
            .conv_mode
            .clone()
            .unwrap_or_else(|| ckpt.default_template().to_string());
        let template = Template::by_name(&name).ok_or_else(|| SessionError::UnknownTemplate {
            name: name.clone(),
            known: Template::names().join(", "),
        })?;
        if name != ckpt.default_template() {
            tracing::warn!(
                "using template {name} instead of {} (the reference's choice for {})",
                ckpt.default_template(),
                ckpt.name
            );
        }
        tracing::info!(
            family = ckpt.family.name(),
            template = template.name,
            "loading {}",
            ckpt.dir.display()
        );
        #[cfg(feature = "cuda")]
        let device = Device::cuda_if_available(0)?;
        #[cfg(not(feature = "cuda"))]
        let device = Device::Cpu;
        let precision = kollava_checkpoint::Precision::resolve(opts.dtype, &ckpt, &device);
        tracing::info!(precision = %precision.describe(), "weights");
        let model = ckpt.load_for_inference(precision, &device)?;
        release_free_memory();
        // Sized after loading, from what the model left free.
        let default = crate::prefix_cache::default_budget_bytes();
        let prefix_cache = Arc::new(PrefixCache::new(opts.prefix_cache_bytes.unwrap_or(default)));
        let feature_cache = Arc::new(FeatureCache::new(
            opts.image_cache_bytes.unwrap_or(default / 4),
        ));
        let grammars = Arc::new(crate::Grammars::new(
            tok.clone(),
            ckpt.config.decoder.vocab_size,
        ));
        Ok(Session {
            grammars,
            prefix_cache,
            feature_cache,
            aspect: opts.aspect.unwrap_or(ckpt.aspect),
            ckpt,
            tok,
            model,
            scheme,
            template,
            device,
            load_ms: t0.elapsed().as_secs_f64() * 1e3,
            keep_answers: false,
            precision,
        })
    }

    /// The user text of a turn: the question with one image placeholder per image, where
    /// this checkpoint's reference code puts it.
    pub fn user_text(&self, query: &str, images: usize) -> String {
        let mut text = query.to_string();
        for _ in 0..images {
            text = self.scheme.user_text(&text);
        }
        text
    }

    /// Generates the assistant's next message for `conv` (whose last message is the
    /// assistant's `None`), with one image per `<image>` in the conversation. `on_text`
    /// gets each completed piece and returns `false` to stop (a client went away).
    pub fn answer(
        &self,
        conv: &Conversation,
        images: &[RgbImage],
        opts: &AnswerOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Answer, SessionError> {
        self.answer_prompt(&conv.prompt(), images, opts, on_text)
    }

    /// The input embeddings of a rendered prompt, `(1, len, hidden)`, with the images'
    /// features spliced in, and the prompt's length in tokens. Fills the preprocessing and
    /// vision timings.
    pub fn embed_prompt(
        &self,
        prompt_text: &str,
        images: &[RgbImage],
        timings: &mut Timings,
    ) -> Result<EmbeddedPrompt, SessionError> {
        self.embed_prompt_as(prompt_text, images, self.aspect, timings)
    }

    /// [`Session::embed_prompt`] with the images fitted to the tower by `aspect`.
    pub fn embed_prompt_as(
        &self,
        prompt_text: &str,
        images: &[RgbImage],
        aspect: AspectMode,
        timings: &mut Timings,
    ) -> Result<EmbeddedPrompt, SessionError> {
        let p = prompt::build(&self.tok, prompt_text, &self.scheme)?;
        if p.images.len() != images.len() {
            return Err(SessionError::ImageCount {
                slots: p.images.len(),
                images: images.len(),
            });
        }
        let prompt_tokens = p.spliced_len(self.scheme.n());
        let context = self.ckpt.context_len;
        if prompt_tokens >= context {
            return Err(SessionError::TooLong {
                prompt_tokens,
                context,
                over: prompt_tokens + 1 - context,
            });
        }

        let t = Instant::now();
        let (cw, ch) = (
            self.ckpt.preprocess.crop.0 as usize,
            self.ckpt.preprocess.crop.1 as usize,
        );
        let pixels: Vec<Vec<f32>> = images
            .iter()
            .map(|img| image::preprocess(img, aspect, &self.ckpt.preprocess))
            .collect();
        let digests: Vec<[u8; 32]> = pixels.iter().map(|px| image_digest(px, (ch, cw))).collect();
        timings.preprocess_ms = t.elapsed().as_secs_f64() * 1e3;

        // One image at a time, so that an image's features are the same numbers whether
        // they come from the cache or from the tower, and whatever else the prompt holds.
        let t = Instant::now();
        let features = pixels
            .into_iter()
            .zip(&digests)
            .map(|(px, digest)| {
                self.feature_cache.get_or_encode(*digest, || {
                    let px = Tensor::from_vec(px, (1, 3, ch, cw), &self.device)?;
                    self.model.encode_images(&px)
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let features = match features.len() {
            0 => None,
            1 => features.into_iter().next(),
            _ => Some(Tensor::cat(&features, 0)?),
        };
        let slots: Vec<Range<usize>> = p.images.iter().map(|s| s.at..s.at + s.replaces).collect();
        let embeds = self
            .model
            .embed_with_images(&p.ids, &slots, features.as_ref())?;
        timings.vision_ms = t.elapsed().as_secs_f64() * 1e3;
        let keys = position_keys(&p.ids, &slots, &digests, self.scheme.n());
        debug_assert_eq!(keys.len(), prompt_tokens);
        Ok(EmbeddedPrompt {
            embeds,
            ids: p.ids,
            tokens: prompt_tokens,
            keys,
        })
    }

    /// How an answer ends with `opts`: the checkpoint's EOS ids and the template's stop
    /// strings (a stop string that is one special token becomes an id), the context limit.
    pub fn generate_options(&self, opts: &AnswerOptions) -> GenerateOptions {
        let context = self.ckpt.context_len;
        let mut eos_ids = if self.ckpt.eos_ids.is_empty() {
            vec![self.tok.eos_id]
        } else {
            self.ckpt.eos_ids.clone()
        };
        let mut stop_strings = Vec::new();
        let template_stops = self.ckpt.stop_strings(&self.template);
        let n_template = template_stops.len();
        for (i, s) in template_stops
            .into_iter()
            .chain(opts.stop.iter().cloned())
            .enumerate()
        {
            // A stop string that is one special token (`</s>`, an added `<|im_end|>`) never
            // shows up in text decoded without special tokens: stop on its id instead.
            match self.tok.encode(&s).ok().as_deref() {
                Some([bos, id]) if *bos == self.tok.bos_id && self.tok.is_special(*id) => {
                    eos_ids.push(*id)
                }
                _ if i < n_template && opts.constraint.is_some() => {}
                _ => stop_strings.push(s),
            }
        }
        GenerateOptions {
            sampling: opts.sampling.clone(),
            max_new_tokens: opts.max_new_tokens,
            eos_ids,
            stop_strings,
            context_len: context,
            constraint: opts.constraint.clone(),
        }
    }

    /// Answers several rendered prompts together (one image list each): each prompt is
    /// prefilled on its own (reusing what the prefix cache holds of it, such as a system
    /// prompt the others share) and joins one batch, which decodes a token for every
    /// unfinished answer per step, reading the weights once per step for all of them. The
    /// answers are not kept for follow-ups (an evaluation's questions have none).
    pub fn answer_batch(
        &self,
        prompts: &[(String, Vec<RgbImage>)],
        opts: &AnswerOptions,
    ) -> Result<Vec<crate::Generation>, SessionError> {
        opts.sampling.validate()?;
        let mut timings = Timings::default();
        let embedded = prompts
            .iter()
            .map(|(text, images)| {
                self.embed_prompt_as(
                    text,
                    images,
                    opts.aspect.unwrap_or(self.aspect),
                    &mut timings,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let gen_opts = self.generate_options(opts);
        let mut batch = self.batch();
        let mut out: Vec<Option<Generation>> = vec![None; prompts.len()];
        for (i, e) in embedded.iter().enumerate() {
            if let Some(f) =
                batch.join_prompt(&self.model, &self.tok, e.prompt(), &gen_opts, |_| true, i)?
            {
                out[f.tag] = Some(f.generation);
            }
        }
        while !batch.is_empty() {
            for f in batch.step(&self.model, &self.tok)? {
                out[f.tag] = Some(f.generation);
            }
        }
        Ok(out
            .into_iter()
            .map(|g| g.expect("every sequence leaves the batch"))
            .collect())
    }

    /// [`Batch::store_answers`]; a failure only costs the next turn its reuse of them.
    /// Returns how many it stored.
    pub fn store_answers<T>(&self, batch: &mut Batch<'_, T>) -> usize {
        let t = std::time::Instant::now();
        match batch.store_answers(&self.model) {
            Ok(n) => {
                if n > 0 {
                    tracing::debug!(
                        "stored {n} answers in {:.0} ms",
                        t.elapsed().as_secs_f64() * 1e3
                    );
                }
                n
            }
            Err(e) => {
                tracing::warn!("keeping the answers for the next turn failed: {e}");
                0
            }
        }
    }

    /// An empty batch that reuses and fills this session's prefix cache.
    pub fn batch<'a, T>(&self) -> Batch<'a, T> {
        Batch::new(&self.model).with_prefix_cache(self.prefix_cache.clone())
    }

    /// Everything a rendered prompt needs before decoding: the options checked, the
    /// embeddings with the images fitted by the answer's mode, and how the answer ends.
    /// A server hands the result to its [`Batch`](crate::Batch).
    pub fn prepare(
        &self,
        prompt_text: &str,
        images: &[RgbImage],
        opts: &AnswerOptions,
        timings: &mut Timings,
    ) -> Result<(EmbeddedPrompt, GenerateOptions), SessionError> {
        opts.sampling.validate()?;
        let embedded = self.embed_prompt_as(
            prompt_text,
            images,
            opts.aspect.unwrap_or(self.aspect),
            timings,
        )?;
        Ok((embedded, self.generate_options(opts)))
    }

    /// [`Session::answer`] for a prompt already rendered (LLaVA's worker protocol sends
    /// the text with its `<image>` placeholders).
    pub fn answer_prompt(
        &self,
        prompt_text: &str,
        images: &[RgbImage],
        opts: &AnswerOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Answer, SessionError> {
        let mut timings = Timings {
            load_ms: self.load_ms,
            ..Default::default()
        };
        let (embedded, gen_opts) = self.prepare(prompt_text, images, opts, &mut timings)?;
        let prompt_tokens = embedded.tokens;
        let mut batch = self.batch();
        let generation = crate::engine::generate_in(
            &mut batch,
            &self.model,
            &self.tok,
            embedded.prompt(),
            &gen_opts,
            on_text,
        )?;
        if self.keep_answers {
            self.store_answers(&mut batch);
        }
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

/// What each position of a spliced prompt holds: its token, or its image's digest and
/// feature row (`n` rows an image, in place of `slots[k]` of `ids`).
fn position_keys(
    ids: &[u32],
    slots: &[Range<usize>],
    digests: &[[u8; 32]],
    n: usize,
) -> Vec<PosKey> {
    let mut keys = Vec::with_capacity(ids.len() + slots.len() * n);
    let mut cursor = 0;
    for (slot, digest) in slots.iter().zip(digests) {
        keys.extend(ids[cursor..slot.start].iter().map(|&id| PosKey::Token(id)));
        keys.extend((0..n as u32).map(|row| PosKey::Image {
            image: *digest,
            row,
        }));
        cursor = slot.end;
    }
    keys.extend(ids[cursor..].iter().map(|&id| PosKey::Token(id)));
    keys
}

/// Hands the memory freed while loading (f32 copies replaced by packed weights) back to the
/// system: glibc keeps freed heap blocks resident, and on a 7B model that is a gigabyte of
/// peak RSS during the first answer.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only returns free pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}
