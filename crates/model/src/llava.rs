//! LLaVA: vision tower → projector → features spliced into the decoder's input embeddings.
//!
//! Both splicing schemes reduce to one operation (llava-spec §1a.6, §1b): the caller passes,
//! per image, the range of ids its features replace. v0 replaces its `<im_patch>` run and
//! llava-hf its `<image>` run (same length); LLaVA-1.5 passes an empty range at the split
//! point, so the features are inserted and the sequence grows.

use std::ops::Range;

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::clip::ClipVision;
use crate::config::ModelConfig;
use crate::decoder::Decoder;
use crate::form::{Form, Matrices, StoredMatrices};
use crate::layers::Linear;
use crate::projector::Projector;

/// Weights of a whole LLaVA model. Immutable: per-sequence state lives in a `KvCache`.
#[derive(Debug, Clone)]
pub struct Llava {
    pub vision: ClipVision,
    pub projector: Projector,
    pub decoder: Decoder,
    cfg: ModelConfig,
}

impl Llava {
    /// `llm` is at the checkpoint root with canonical LLaVA key names (`model.*`,
    /// `lm_head`); `vision` is at the tower's `vision_model`. The model is built in `form`,
    /// with the matrices `stored` holds taken from there as stored.
    pub fn load(
        llm: VarBuilder,
        vision: VarBuilder,
        cfg: &ModelConfig,
        form: Form,
        stored: Option<&dyn StoredMatrices>,
    ) -> Result<Self> {
        let decoder = Decoder::load(
            llm.clone(),
            &cfg.decoder,
            Matrices {
                pack: form.decoder(),
                stored,
            },
        )?;
        let m = Matrices {
            pack: form.vision(),
            stored,
        };
        let projector = Projector::load(
            llm.pp("model").pp("mm_projector"),
            cfg.projector,
            cfg.vision.hidden_size,
            cfg.decoder.hidden_size,
            m,
        )?;
        let vision = ClipVision::load(
            vision,
            &cfg.vision,
            cfg.vision_layers_used,
            cfg.feature_select,
            m,
        )?;
        Ok(Self {
            vision,
            projector,
            decoder,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// `pixels: (n, 3, S, S) → (n, N, vision_hidden)`: the selected CLIP hidden state.
    pub fn vision_features(&self, pixels: &Tensor) -> Result<Tensor> {
        self.vision.forward(pixels)
    }

    /// `pixels: (n, 3, S, S) → (n, N, hidden)`: image features in embedding space.
    pub fn encode_images(&self, pixels: &Tensor) -> Result<Tensor> {
        let features = self.vision_features(pixels)?;
        self.projector.forward(&features.to_dtype(self.dtype())?)
    }

    /// Brings a model built as read (one made for training) into `form`, which
    /// [`Llava::load`] builds directly; the tests check that both give the same numbers.
    pub fn pack_for_inference(&mut self, form: Form) -> Result<()> {
        self.decoder.pack_for_inference(form.decoder())?;
        let pack = form.vision();
        self.projector.map_linears(|l| l.in_form(pack))?;
        self.vision.map_linears(|l| l.in_form(pack))?;
        Ok(())
    }

    /// For training in bf16 (`train --bf16`): every frozen matrix (the tower, the language
    /// model in stage 1, the bases under adapters, a frozen projector) packed for our bf16
    /// kernels both ways (see [`Linear::frozen_bf16`]); the trained ones stay as they are.
    pub fn pack_frozen_bf16(&mut self) -> Result<()> {
        if !self.decoder.device().is_cpu() || !crate::kernels::bf16::available() {
            candle_core::bail!(
                "training in bf16 needs a CPU with AVX512-BF16 or AVX2+FMA for our bf16 kernels"
            );
        }
        for (_, l) in self.decoder.linears_mut() {
            *l = l.frozen_bf16()?;
        }
        let head = self.decoder.lm_head_mut();
        *head = head.frozen_bf16()?;
        self.projector.map_linears(Linear::frozen_bf16)?;
        self.vision.map_linears(Linear::frozen_bf16)?;
        Ok(())
    }

    /// The language model's activation dtype.
    pub fn dtype(&self) -> candle_core::DType {
        self.decoder.dtype()
    }

    /// Input embeddings of one sequence with image features spliced in.
    /// `ids`: the prompt; `slots[k]`: the ids image `k` replaces (empty = insert there), in
    /// increasing order; `features: (n_images, N, hidden)` → `(1, len', hidden)`.
    pub fn embed_with_images(
        &self,
        ids: &[u32],
        slots: &[Range<usize>],
        features: Option<&Tensor>,
    ) -> Result<Tensor> {
        let vocab = self.cfg.decoder.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            candle_core::bail!("token id {bad} is outside the model's vocabulary of {vocab}: the tokenizer and the checkpoint disagree");
        }
        let device = self.decoder.device();
        let ids_t = Tensor::new(ids, device)?.unsqueeze(0)?;
        let text = self.decoder.embed(&ids_t)?; // (1, L, h)
        if slots.is_empty() {
            return Ok(text);
        }
        let Some(features) = features else {
            candle_core::bail!(
                "the prompt has {} image slots but no image was given",
                slots.len()
            );
        };
        let n_images = features.dim(0)?;
        if slots.len() > n_images {
            candle_core::bail!(
                "the prompt has {} image slots but only {n_images} images were given",
                slots.len()
            );
        }
        let mut parts = Vec::with_capacity(2 * slots.len() + 1);
        let mut cursor = 0;
        for (k, slot) in slots.iter().enumerate() {
            if slot.start < cursor || slot.end > ids.len() {
                candle_core::bail!(
                    "image slot {slot:?} is out of order or past the prompt's {} ids",
                    ids.len()
                );
            }
            if slot.start > cursor {
                parts.push(text.narrow(1, cursor, slot.start - cursor)?);
            }
            let f = features.narrow(0, k, 1)?;
            if !slot.is_empty() && slot.len() != f.dim(1)? {
                candle_core::bail!(
                    "image slot of {} ids cannot hold {} feature rows",
                    slot.len(),
                    f.dim(1)?
                );
            }
            parts.push(f);
            cursor = slot.end;
        }
        if cursor < ids.len() {
            parts.push(text.narrow(1, cursor, ids.len() - cursor)?);
        }
        Tensor::cat(&parts, 1)
    }
}
