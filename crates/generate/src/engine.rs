//! Prefill, then the decode loop: sample, stop on EOS / a stop string / the token budget /
//! the context limit, and stream text as soon as it is complete (never half a Hangul
//! syllable, never the beginning of a stop string that may still complete).

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Result, Tensor};
use kollava_inputs::{StreamDecoder, Tokenizer};
use kollava_model::{KvCache, Llava};

use crate::prefix_cache::{PosKey, PrefixCache};
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
    /// The grammar engine of a constrained answer failed (logged; the text is incomplete).
    Grammar,
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
    /// The grammar the answer must follow (structured output); it ends the answer when it
    /// is complete, and allows the end-of-sequence ids only where it may end.
    pub constraint: Option<crate::Constraint>,
}

impl GenerateOptions {
    /// Cache slots a prompt of `prompt_len` may fill: it and the longest answer allowed.
    fn slots_for(&self, prompt_len: usize) -> usize {
        prompt_len
            .saturating_add(self.max_new_tokens)
            .min(self.context_len.max(prompt_len))
    }
}

/// The result of one generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids, without the EOS that ended it.
    pub ids: Vec<u32>,
    /// The answer text, cut at the stop string.
    pub text: String,
    pub stop: StopReason,
    /// Prompt positions taken from the prefix cache instead of prefilled.
    pub cached_tokens: usize,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    /// Per generated id, with `SamplingParams::logprobs` set (else empty).
    pub logprobs: Vec<crate::TokenLogprob>,
}

/// Positions of a prompt always prefilled, however much of it is cached: at least the
/// model's [`Decoder::steady_rows`](kollava_model::decoder::Decoder::steady_rows), so that
/// every position's numbers are the ones a cold prefill of the whole prompt computes (a
/// shorter step may take kernels that sum in another order), and the first token is
/// sampled from fresh logits (sampling settings never matter to reuse).
pub fn fresh_positions(model: &Llava) -> usize {
    model.decoder.steady_rows()
}

/// Answers kept for [`Batch::store_answers`] at most (the oldest go first): a server busy
/// without pause stores none, and the next turn of each conversation prefills its answer.
const MAX_ANSWERS_WAITING: usize = 64;

/// A prompt ready to prefill.
#[derive(Clone, Copy)]
pub struct Prompt<'p> {
    /// `(1, L, hidden)`: the embeddings, image features spliced in.
    pub embeds: &'p Tensor,
    /// The ids the repetition penalty looks back on.
    pub context_ids: &'p [u32],
    /// What each of the `L` positions holds (see [`PosKey`]); empty: nothing is reused or
    /// stored.
    pub keys: &'p [PosKey],
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

/// One answer being generated: sampling, stopping and streaming for one sequence.
struct Row {
    sampler: Sampler,
    prompt_len: usize,
    context: Vec<u32>,
    ids: Vec<u32>,
    decoder: StreamDecoder,
    matcher: StopMatcher,
    stop: Option<StopReason>,
    logprobs: Vec<crate::TokenLogprob>,
    constraint: Option<crate::Constraint>,
}

impl Row {
    fn new(opts: &GenerateOptions, prompt_len: usize, context_ids: &[u32]) -> Self {
        Self {
            sampler: Sampler::new(opts.sampling.clone()),
            prompt_len,
            context: context_ids.to_vec(),
            ids: Vec::new(),
            decoder: StreamDecoder::new(),
            matcher: StopMatcher {
                stops: opts.stop_strings.clone(),
                ..Default::default()
            },
            stop: None,
            logprobs: Vec::new(),
            constraint: opts.constraint.clone(),
        }
    }

    /// Samples the next id, among what the grammar allows when there is one (`None`: the
    /// grammar failed, and the row has stopped).
    fn sample(&mut self, logits: &[f32], eos_ids: &[u32]) -> Option<u32> {
        let Some(c) = self.constraint.as_mut() else {
            return Some(self.sampler.sample(logits, &self.context));
        };
        let allowed = match c.allowed() {
            Ok(a) => a,
            Err(e) => {
                tracing::error!("{e}");
                self.stop = Some(StopReason::Grammar);
                return None;
            }
        };
        let allow = |id: u32| {
            if eos_ids.contains(&id) {
                allowed.may_end
            } else {
                allowed.contains(id)
            }
        };
        let id = self
            .sampler
            .sample_where(logits, &self.context, Some(&allow));
        if !eos_ids.contains(&id) {
            if let Err(e) = c.commit(id) {
                tracing::error!("{e}");
                self.stop = Some(StopReason::Grammar);
                return None;
            }
        }
        Some(id)
    }

    /// Takes the next token from `logits` (or stops). Returns the token when the sequence
    /// goes on and needs the decoder to run on it.
    fn step(
        &mut self,
        logits: &[f32],
        tokenizer: &Tokenizer,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Option<u32> {
        let prompt_len = self.prompt_len;
        let room = |ids: usize| ids < opts.max_new_tokens && prompt_len + ids < opts.context_len;
        if self.ids.len() >= opts.max_new_tokens {
            self.stop = Some(StopReason::MaxTokens);
            return None;
        }
        if self.prompt_len + self.ids.len() >= opts.context_len {
            self.stop = Some(StopReason::Context);
            return None;
        }
        let id = self.sample(logits, &opts.eos_ids)?;
        if opts.eos_ids.contains(&id) {
            self.stop = Some(StopReason::Eos);
            return None;
        }
        self.ids.push(id);
        self.logprobs.extend(self.sampler.take_logprob());
        self.context.push(id);
        if let Some(piece) = self.decoder.push(tokenizer, id) {
            let (shown, stopped) = self.matcher.push(&piece);
            if !shown.is_empty() && !on_text(&shown) {
                self.stop = Some(StopReason::Cancelled);
                return None;
            }
            if stopped {
                self.stop = Some(StopReason::StopString);
                return None;
            }
        }
        if self.constraint.as_ref().is_some_and(|c| c.is_finished()) {
            // The grammar is complete and nothing may follow: the answer ends as at EOS.
            self.stop = Some(StopReason::Eos);
            return None;
        }
        if room(self.ids.len()) {
            Some(id)
        } else {
            // The next call records why it ends; no decoder step is needed for it.
            None
        }
    }

    /// Flushes held-back text and returns the result.
    fn finish(
        mut self,
        tokenizer: &Tokenizer,
        on_text: &mut dyn FnMut(&str) -> bool,
        (cached_tokens, prefill_ms, decode_ms): (usize, f64, f64),
    ) -> Generation {
        let stop = self.stop.unwrap_or(StopReason::MaxTokens);
        if !matches!(stop, StopReason::StopString | StopReason::Cancelled) {
            if let Some(rest) = self.decoder.finish(tokenizer) {
                let (shown, _) = self.matcher.push(&rest);
                if !shown.is_empty() {
                    on_text(&shown);
                }
            }
            let rest = self.matcher.finish();
            if !rest.is_empty() {
                on_text(&rest);
            }
        }
        Generation {
            ids: self.ids,
            text: self.matcher.text.trim().to_string(),
            stop,
            cached_tokens,
            prefill_ms,
            decode_ms,
            logprobs: self.logprobs,
        }
    }
}

/// Generates an answer for one sequence. `embeds: (1, L, hidden)` is the prompt with image
/// features spliced in; `context_ids` feed the repetition penalty; `on_text` receives
/// each completed piece of text and returns `false` to stop early.
///
/// This is a [`Batch`] of one, so an answer is computed the same way alone as in a server's
/// batch.
pub fn generate(
    model: &Llava,
    tokenizer: &Tokenizer,
    embeds: &Tensor,
    context_ids: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    let prompt = Prompt {
        embeds,
        context_ids,
        keys: &[],
    };
    generate_in(
        &mut Batch::new(model),
        model,
        tokenizer,
        prompt,
        opts,
        on_text,
    )
}

/// [`generate`] in `batch` (empty, and maybe with a prefix cache): the prompt reuses what
/// the cache holds of it, and the batch keeps the answer for [`Batch::store_answers`].
pub fn generate_in<'a>(
    batch: &mut Batch<'a, ()>,
    model: &Llava,
    tokenizer: &Tokenizer,
    prompt: Prompt<'_>,
    opts: &GenerateOptions,
    on_text: impl FnMut(&str) -> bool + 'a,
) -> Result<Generation> {
    let mut finished = batch.join_prompt(model, tokenizer, prompt, opts, on_text, ())?;
    while finished.is_none() {
        finished = batch.step(model, tokenizer)?.pop();
    }
    Ok(finished.expect("loop ends with a result").generation)
}

/// A sequence that left a [`Batch`], with the tag its caller gave it.
pub struct Finished<T> {
    pub tag: T,
    pub generation: Generation,
}

struct Sequence<'a, T> {
    tag: T,
    row: Row,
    opts: GenerateOptions,
    on_text: Box<dyn FnMut(&str) -> bool + 'a>,
    /// The token the next step feeds to the decoder.
    next: u32,
    /// The prompt's position keys (empty: the sequence is not stored).
    keys: Vec<PosKey>,
    cached_tokens: usize,
    prefill_ms: f64,
    decode_start: Instant,
}

impl<T> Sequence<'_, T> {
    /// Samples from `logits`; `false` when the sequence has ended.
    fn advance(&mut self, logits: &[f32], tokenizer: &Tokenizer) -> bool {
        while self.row.stop.is_none() {
            // `None` without a stop reason means there is no room for another token: the
            // next call records which limit was hit.
            if let Some(id) = self
                .row
                .step(logits, tokenizer, &self.opts, &mut *self.on_text)
            {
                self.next = id;
                return true;
            }
        }
        false
    }

    fn finish(mut self, tokenizer: &Tokenizer) -> Finished<T> {
        let decode_ms = self.decode_start.elapsed().as_secs_f64() * 1e3;
        let generation = self.row.finish(
            tokenizer,
            &mut *self.on_text,
            (self.cached_tokens, self.prefill_ms, decode_ms),
        );
        Finished {
            tag: self.tag,
            generation,
        }
    }
}

/// Sequences decoded together, one token each per step (continuous batching): a sequence
/// joins after its own prefill, whenever the caller likes, and leaves as soon as it ends, so
/// every step reads the weights once for all of them. Each sequence keeps its own sampling
/// options, stop rules and streaming callback; `T` tags it for the caller.
///
/// With a [`PrefixCache`], a prompt given with its position keys prefills only what follows
/// its longest stored prefix, its prompt is stored after its prefill (so requests running
/// beside it share it), and [`Batch::store_answers`] stores the answers of the sequences
/// that ended (the next turn of their conversations).
pub struct Batch<'a, T> {
    cache: KvCache,
    seqs: Vec<Sequence<'a, T>>,
    store: Option<Arc<PrefixCache>>,
    /// Sequences that ended since [`Batch::store_answers`]: prompt keys and answer ids.
    answered: Vec<(Vec<PosKey>, Vec<u32>)>,
}

impl<'a, T> Batch<'a, T> {
    pub fn new(model: &Llava) -> Self {
        Self {
            cache: model.decoder.new_cache(0),
            seqs: Vec::new(),
            store: None,
            answered: Vec::new(),
        }
    }

    /// Reuses and stores keys and values through `store` (see [`Batch`]).
    pub fn with_prefix_cache(mut self, store: Arc<PrefixCache>) -> Self {
        self.store = Some(store).filter(|s| s.enabled());
        self
    }

    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Prefills one prompt (`embeds: (1, L, hidden)`) and samples its first token; the
    /// sequence then joins the batch, or comes straight back if it already ended.
    #[allow(clippy::too_many_arguments)]
    pub fn join(
        &mut self,
        model: &Llava,
        tokenizer: &Tokenizer,
        embeds: &Tensor,
        context_ids: &[u32],
        opts: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool + 'a,
        tag: T,
    ) -> Result<Option<Finished<T>>> {
        let prompt = Prompt {
            embeds,
            context_ids,
            keys: &[],
        };
        self.join_prompt(model, tokenizer, prompt, opts, on_text, tag)
    }

    /// [`Batch::join`] for a prompt with its position keys: with a prefix cache, only what
    /// follows its longest stored prefix is prefilled (always its last
    /// [`fresh_positions`] at least).
    pub fn join_prompt(
        &mut self,
        model: &Llava,
        tokenizer: &Tokenizer,
        prompt: Prompt<'_>,
        opts: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool + 'a,
        tag: T,
    ) -> Result<Option<Finished<T>>> {
        let prompt_len = prompt.embeds.dim(1)?;
        if !prompt.keys.is_empty() && prompt.keys.len() != prompt_len {
            candle_core::bail!(
                "{} position keys for a prompt of {prompt_len} positions",
                prompt.keys.len()
            );
        }
        let store = self.store.as_ref().filter(|_| !prompt.keys.is_empty());
        let mut cache = model.decoder.new_cache(1);
        cache.reserve(opts.slots_for(prompt_len));
        let t0 = Instant::now();
        let mut cached_tokens = 0;
        if let Some(store) = store {
            let limit = prompt_len.saturating_sub(fresh_positions(model));
            let reuse = store.lookup(prompt.keys, limit);
            if reuse.tokens > 0 {
                cache.load_prefix(&reuse.layers()?)?;
                cached_tokens = reuse.tokens;
            }
        }
        let rest = prompt_len - cached_tokens;
        let hidden = model.decoder.forward(
            &prompt.embeds.narrow(1, cached_tokens, rest)?,
            &[rest],
            &mut cache,
        )?;
        // A step shorter than `fresh_positions` (a whole prompt that short) may have taken
        // other kernels than a longer prefill of the same positions: not stored.
        if let Some(store) = store.filter(|_| rest >= fresh_positions(model)) {
            store.insert(prompt.keys, |r| cache.row_positions(0, r))?;
        }
        let logits = last_logits(model, &hidden)?;
        let mut seq = Sequence {
            tag,
            row: Row::new(opts, prompt_len, prompt.context_ids),
            opts: opts.clone(),
            on_text: Box::new(on_text),
            next: 0,
            keys: match store {
                Some(_) => prompt.keys.to_vec(),
                None => Vec::new(),
            },
            cached_tokens,
            prefill_ms: t0.elapsed().as_secs_f64() * 1e3,
            decode_start: Instant::now(),
        };
        if !seq.advance(&logits, tokenizer) {
            return Ok(Some(seq.finish(tokenizer)));
        }
        self.cache.extend(cache)?;
        self.seqs.push(seq);
        Ok(None)
    }

    /// Decodes one token for every sequence; returns those that ended.
    pub fn step(&mut self, model: &Llava, tokenizer: &Tokenizer) -> Result<Vec<Finished<T>>> {
        if self.seqs.is_empty() {
            return Ok(Vec::new());
        }
        let b = self.seqs.len();
        let next: Vec<u32> = self.seqs.iter().map(|s| s.next).collect();
        let device = model.decoder.device().clone();
        let x = model
            .decoder
            .embed(&Tensor::new(next.as_slice(), &device)?.unsqueeze(1)?)?;
        let hidden = model.decoder.forward(&x, &vec![1; b], &mut self.cache)?;
        // One product for every row's logits: lm_head is read once per step.
        let logits: Vec<Vec<f32>> = model
            .decoder
            .logits(&hidden)?
            .squeeze(1)?
            .to_dtype(DType::F32)?
            .to_vec2()?;
        let mut keep = Vec::with_capacity(b);
        for (seq, logits) in self.seqs.iter_mut().zip(&logits) {
            keep.push(seq.advance(logits, tokenizer));
        }
        self.remove(&keep, tokenizer)
    }

    /// Takes out the sequences `drop` picks (their clients went away, say), as cancelled.
    pub fn cancel(
        &mut self,
        tokenizer: &Tokenizer,
        drop: impl Fn(&T) -> bool,
    ) -> Result<Vec<Finished<T>>> {
        let keep: Vec<bool> = self.seqs.iter().map(|s| !drop(&s.tag)).collect();
        for (seq, &k) in self.seqs.iter_mut().zip(&keep) {
            if !k {
                seq.row.stop = Some(StopReason::Cancelled);
            }
        }
        self.remove(&keep, tokenizer)
    }

    /// Stores the answers of the sequences that ended since the last call, each after its
    /// prompt, for its conversation's next turn. An answer is prefilled once more for this
    /// (after the stored prompt; about what prefilling its length takes, a fraction of the
    /// time decoding it took): the rows its decoding steps computed came from the decoding
    /// kernels, and the next turn must get the numbers a cold prefill computes. The step is
    /// at least [`fresh_positions`] long, as every prefill step is: an answer shorter than
    /// that is prefilled with the last prompt positions before it (template text). Answers
    /// whose prompt left the store meanwhile, or that follow too few text positions, are left
    /// to the next turn's prefill, and those a later turn stored already are skipped.
    /// Callers run this once the answers are delivered (the server once it is idle), so no
    /// client waits for it. Returns how many it stored.
    pub fn store_answers(&mut self, model: &Llava) -> Result<usize> {
        let Some(store) = self.store.clone().filter(|_| !self.answered.is_empty()) else {
            return Ok(0);
        };
        let mut stored = 0;
        let fresh = fresh_positions(model);
        for (prompt, ids) in std::mem::take(&mut self.answered) {
            let mut keys = prompt;
            keys.extend(ids.iter().map(|&id| PosKey::Token(id)));
            let Some(limit) = keys.len().checked_sub(fresh) else {
                continue;
            };
            let reuse = store.find(&keys, keys.len());
            if reuse.tokens == keys.len() {
                continue; // a later turn of the conversation stored it already
            }
            let reuse = store.find(&keys, limit);
            let rest: Option<Vec<u32>> = keys[reuse.tokens..]
                .iter()
                .map(|k| match k {
                    PosKey::Token(id) => Some(*id),
                    PosKey::Image { .. } => None,
                })
                .collect();
            let Some(rest) = rest.filter(|_| reuse.tokens > 0) else {
                continue;
            };
            let mut cache = model.decoder.new_cache(1);
            cache.reserve(keys.len());
            cache.load_prefix(&reuse.layers()?)?;
            let device = model.decoder.device().clone();
            let x = model
                .decoder
                .embed(&Tensor::new(rest.as_slice(), &device)?.unsqueeze(0)?)?;
            model.decoder.forward(&x, &[rest.len()], &mut cache)?;
            store.insert(&keys, |r| cache.row_positions(0, r))?;
            stored += 1;
        }
        Ok(stored)
    }

    /// Whether answers wait for [`Batch::store_answers`].
    pub fn has_answers(&self) -> bool {
        !self.answered.is_empty()
    }

    fn remove(&mut self, keep: &[bool], tokenizer: &Tokenizer) -> Result<Vec<Finished<T>>> {
        if keep.iter().all(|&k| k) {
            return Ok(Vec::new());
        }
        if self.store.is_some() {
            for (seq, _) in self.seqs.iter_mut().zip(keep).filter(|(_, &k)| !k) {
                if !seq.keys.is_empty() && seq.row.stop != Some(StopReason::Cancelled) {
                    let keys = std::mem::take(&mut seq.keys);
                    if self.answered.len() == MAX_ANSWERS_WAITING {
                        self.answered.remove(0);
                    }
                    self.answered.push((keys, seq.row.ids.clone()));
                }
            }
        }
        self.cache.retain_rows(keep)?;
        let mut finished = Vec::new();
        let mut kept = Vec::with_capacity(self.seqs.len());
        for (seq, &k) in std::mem::take(&mut self.seqs).into_iter().zip(keep) {
            if k {
                kept.push(seq);
            } else {
                finished.push(seq.finish(tokenizer));
            }
        }
        self.seqs = kept;
        Ok(finished)
    }
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
