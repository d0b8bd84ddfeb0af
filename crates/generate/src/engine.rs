//! Prefill, then the decode loop: sample, stop on EOS / a stop string / the token budget /
//! the context limit, and stream text as soon as it is complete (never half a Hangul
//! syllable, never the beginning of a stop string that may still complete).

use std::time::Instant;

use candle_core::{DType, Result, Tensor};
use kollava_inputs::{StreamDecoder, Tokenizer};
use kollava_model::{KvCache, Llava};

use crate::sampler::{Sampler, SamplingParams};

/// What ends a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    StopString,
    MaxTokens,
    /// The sequence reached the model's context length.
    Context,
    /// The caller's `on_text` asked to stop (e.g. the client disconnected).
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    /// Ids that end the answer (not part of it).
    pub eos_ids: Vec<u32>,
    /// Strings that end the answer (cut from it), such as `###` or `</s>`.
    pub stop_strings: Vec<String>,
    /// Longest total sequence (prompt with images + answer).
    pub context_len: usize,
}

/// The result of one generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids, without the EOS that ended it.
    pub ids: Vec<u32>,
    /// The answer text, cut at the stop string.
    pub text: String,
    pub stop: StopReason,
    pub prefill_ms: f64,
    pub decode_ms: f64,
}

/// Holds back text while it might be the start of a stop string.
#[derive(Debug, Default)]
struct StopMatcher {
    stops: Vec<String>,
    pending: String,
    text: String,
}

impl StopMatcher {
    /// Adds `piece`; returns what can be shown, and whether a stop string appeared.
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.pending.push_str(piece);
        if let Some(pos) = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..pos].to_string();
            self.text.push_str(&out);
            self.pending.clear();
            return (out, true);
        }
        // Keep the longest suffix that is a proper prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in self.pending.char_indices() {
                let tail = &self.pending[i..];
                if tail.len() > keep && s.starts_with(tail) {
                    keep = tail.len();
                }
            }
        }
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        self.text.push_str(&out);
        (out, false)
    }

    fn finish(&mut self) -> String {
        let out = std::mem::take(&mut self.pending);
        self.text.push_str(&out);
        out
    }
}

/// Last-position logits of a decoder output, as f32. `hidden: (1, s, h)`.
fn last_logits(model: &Llava, hidden: &Tensor) -> Result<Vec<f32>> {
    let s = hidden.dim(1)?;
    let last = hidden.narrow(1, s - 1, 1)?;
    model
        .decoder
        .logits(&last)?
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1()
}

/// Generates an answer for one sequence. `embeds: (1, L, hidden)` is the prompt with image
/// features spliced in; `context_ids` feed the repetition penalty; `on_text` receives
/// each completed piece of text and returns `false` to stop early.
pub fn generate(
    model: &Llava,
    tokenizer: &Tokenizer,
    embeds: &Tensor,
    context_ids: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    let mut cache = KvCache::new(model.config().decoder.num_hidden_layers, 1);
    let mut sampler = Sampler::new(opts.sampling.clone());
    let prompt_len = embeds.dim(1)?;
    let t0 = Instant::now();
    let hidden = model.decoder.forward(embeds, &[prompt_len], &mut cache)?;
    let mut logits = last_logits(model, &hidden)?;
    let prefill_ms = t0.elapsed().as_secs_f64() * 1e3;

    let t1 = Instant::now();
    let mut context: Vec<u32> = context_ids.to_vec();
    let mut ids = Vec::new();
    let mut decoder = StreamDecoder::new();
    let mut matcher = StopMatcher {
        stops: opts.stop_strings.clone(),
        ..Default::default()
    };
    let stop = loop {
        if ids.len() >= opts.max_new_tokens {
            break StopReason::MaxTokens;
        }
        if prompt_len + ids.len() >= opts.context_len {
            break StopReason::Context;
        }
        let id = sampler.sample(&logits, &context);
        if opts.eos_ids.contains(&id) {
            break StopReason::Eos;
        }
        ids.push(id);
        context.push(id);
        if let Some(piece) = decoder.push(tokenizer, id) {
            let (shown, stopped) = matcher.push(&piece);
            if !shown.is_empty() && !on_text(&shown) {
                break StopReason::Cancelled;
            }
            if stopped {
                break StopReason::StopString;
            }
        }
        if ids.len() >= opts.max_new_tokens || prompt_len + ids.len() >= opts.context_len {
            continue;
        }
        let x = model
            .decoder
            .embed(&Tensor::new(&[id], embeds.device())?.unsqueeze(0)?)?;
        let hidden = model.decoder.forward(&x, &[1], &mut cache)?;
        logits = last_logits(model, &hidden)?;
    };
    if !matches!(stop, StopReason::StopString | StopReason::Cancelled) {
        if let Some(rest) = decoder.finish(tokenizer) {
            let (shown, _) = matcher.push(&rest);
            if !shown.is_empty() {
                on_text(&shown);
            }
        }
        let rest = matcher.finish();
        if !rest.is_empty() {
            on_text(&rest);
        }
    }
    Ok(Generation {
        ids,
        text: matcher.text.trim().to_string(),
        stop,
        prefill_ms,
        decode_ms: t1.elapsed().as_secs_f64() * 1e3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_string_split_across_pieces_is_never_shown() {
        let mut m = StopMatcher {
            stops: vec!["###".into()],
            ..Default::default()
        };
        assert_eq!(m.push("Hello #"), ("Hello ".to_string(), false));
        assert_eq!(m.push("#"), (String::new(), false));
        assert_eq!(m.push("# more"), (String::new(), true));
        assert_eq!(m.text, "Hello ");
    }

    #[test]
    fn a_false_start_is_released() {
        let mut m = StopMatcher {
            stops: vec!["</s>".into()],
            ..Default::default()
        };
        assert_eq!(m.push("a <"), ("a ".to_string(), false));
        assert_eq!(m.push("b"), ("<b".to_string(), false));
    }
}
