//! Choosing the next token from logits, as transformers' `generate` does: the repetition
//! penalty first (a logits processor), then temperature, top-k and top-p (warpers), then a
//! draw; `temperature == 0` is greedy (`do_sample=False`), ties going to the lowest id like
//! `torch.argmax`. OpenAI's `logit_bias` is added before everything, and its presence and
//! frequency penalties (over the tokens generated so far) follow the repetition penalty.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings. Validated by [`SamplingParams::validate`]; never clamped silently.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables it.
    pub top_p: f32,
    /// Keep the k most likely tokens; 0 disables it.
    pub top_k: usize,
    /// > 1 discourages tokens already in the context (CTRL-style, as transformers).
    pub repetition_penalty: f32,
    /// OpenAI's `presence_penalty`: subtracted once from the logit of every token generated
    /// so far (−2 to 2; 0 disables it).
    pub presence_penalty: f32,
    /// OpenAI's `frequency_penalty`: subtracted from a token's logit once per time it was
    /// generated so far (−2 to 2; 0 disables it).
    pub frequency_penalty: f32,
    /// OpenAI's `logit_bias`: added to these tokens' logits before anything else (−100 to
    /// 100; −100 bans a token, 100 all but forces it).
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: u64,
    /// OpenAI's `logprobs`/`top_logprobs`: with `Some(k)`, each pick's log-probability and
    /// the `k` likeliest tokens', from the log-softmax of the model's raw logits (before
    /// bias, penalties and temperature, as OpenAI reports them).
    pub logprobs: Option<usize>,
}

/// One pick's log-probability, and the likeliest tokens' (best first).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// `id`'s log-softmax over `logits`, with the `k` highest (log-sum-exp summed in f64).
pub fn token_logprob(logits: &[f32], id: u32, k: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    let lp = |x: f32| (x as f64 - lse) as f32;
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(order.len());
    if k > 0 {
        let by = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        order.select_nth_unstable_by(k - 1, by);
        order.truncate(k);
        order.sort_by(by);
    } else {
        order.clear();
    }
    TokenLogprob {
        id,
        logprob: lp(logits[id as usize]),
        top: order
            .into_iter()
            .map(|t| (t, lp(logits[t as usize])))
            .collect(),
    }
}

impl Default for SamplingParams {
    /// `run_llava`'s defaults: temperature 0.2 with HF's top_k 50, top_p 1.0.
    fn default() -> Self {
        Self {
            temperature: 0.2,
            top_p: 1.0,
            top_k: 50,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: 0,
            logprobs: None,
        }
    }
}

/// A sampling setting out of range.
#[derive(Debug, thiserror::Error)]
#[error("{name} = {value} is out of range: {expected}")]
pub struct InvalidParam {
    pub name: &'static str,
    pub value: String,
    pub expected: &'static str,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<(), InvalidParam> {
        let bad = |name, value: f32, expected| {
            Err(InvalidParam {
                name,
                value: value.to_string(),
                expected,
            })
        };
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature", self.temperature, "a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p, "in (0, 1]");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(
                "repetition_penalty",
                self.repetition_penalty,
                "a finite number > 0",
            );
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return bad("presence_penalty", self.presence_penalty, "in [-2, 2]");
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return bad("frequency_penalty", self.frequency_penalty, "in [-2, 2]");
        }
        if let Some(&(_, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return bad("logit_bias", b, "each bias in [-100, 100]");
        }
        Ok(())
    }
}

/// A sampler with its own seeded random stream (one per sequence, so results do not depend
/// on what else is being generated).
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// How often each token was picked so far (the presence and frequency penalties').
    generated: std::collections::HashMap<u32, u32>,
    /// The last pick's log-probabilities, when asked for.
    last: Option<TokenLogprob>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self {
            params,
            rng,
            generated: Default::default(),
            last: None,
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next id. `context` holds the prompt and generated ids so far (for the
    /// repetition penalty).
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> u32 {
        self.sample_where(logits, context, None)
    }

    /// [`Sampler::sample`] among the ids `allow` accepts (a grammar's mask, applied after
    /// the bias and penalties, before temperature, top-k and top-p; the log-probabilities
    /// stay the raw logits'). At least one id must be allowed.
    pub fn sample_where(
        &mut self,
        logits: &[f32],
        context: &[u32],
        allow: Option<&dyn Fn(u32) -> bool>,
    ) -> u32 {
        let id = self.pick(logits, context, allow);
        if self.params.presence_penalty != 0.0 || self.params.frequency_penalty != 0.0 {
            *self.generated.entry(id).or_default() += 1;
        }
        self.last = self.params.logprobs.map(|k| token_logprob(logits, id, k));
        id
    }

    /// The last pick's log-probabilities (with `logprobs` set), once.
    pub fn take_logprob(&mut self) -> Option<TokenLogprob> {
        self.last.take()
    }

    fn pick(
        &mut self,
        logits: &[f32],
        context: &[u32],
        allow: Option<&dyn Fn(u32) -> bool>,
    ) -> u32 {
        let mut scores = logits.to_vec();
        for &(id, bias) in &self.params.logit_bias {
            if let Some(s) = scores.get_mut(id as usize) {
                *s += bias;
            }
        }
        if self.params.repetition_penalty != 1.0 {
            let mut seen = std::collections::HashSet::new();
            for &id in context {
                if seen.insert(id) {
                    if let Some(s) = scores.get_mut(id as usize) {
                        *s = if *s < 0.0 {
                            *s * self.params.repetition_penalty
                        } else {
                            *s / self.params.repetition_penalty
                        };
                    }
                }
            }
        }
        for (&id, &n) in &self.generated {
            if let Some(s) = scores.get_mut(id as usize) {
                *s -= self.params.presence_penalty + self.params.frequency_penalty * n as f32;
            }
        }
        if let Some(allow) = allow {
            for (id, s) in scores.iter_mut().enumerate() {
                if !allow(id as u32) {
                    *s = f32::NEG_INFINITY;
                }
            }
        }
        if self.params.temperature == 0.0 {
            return argmax(&scores);
        }
        for s in &mut scores {
            *s /= self.params.temperature;
        }
        // Candidates sorted by score, highest first (stable: lower id first on ties).
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        if self.params.top_k > 0 && self.params.top_k < order.len() {
            // transformers keeps every token tied with the k-th score.
            let kth = scores[order[self.params.top_k - 1]];
            order.retain(|&i| scores[i] >= kth);
        }
        let max = scores[order[0]];
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((scores[i] - max) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        for p in &mut probs {
            *p /= total;
        }
        if self.params.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (n, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.params.top_p as f64 {
                    keep = n + 1;
                    break;
                }
            }
            order.truncate(keep);
            probs.truncate(keep);
            let total: f64 = probs.iter().sum();
            for p in &mut probs {
                *p /= total;
            }
        }
        let r: f64 = self.rng.random();
        let mut acc = 0.0;
        for (n, p) in probs.iter().enumerate() {
            acc += p;
            if r < acc {
                return order[n] as u32;
            }
        }
        order[probs.len() - 1] as u32
    }
}

/// Index of the first maximum, as `torch.argmax`.
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pick's log-probability is its log-softmax over the raw logits (whatever the bias
    /// and temperature did to the pick), and the alternatives are the `k` likeliest, best
    /// first; `k` past the vocabulary gives them all, 0 none.
    #[test]
    fn logprobs_are_the_raw_logits_log_softmax() {
        let logits = [0.5f32, -1.0, 3.0, 2.0, 3.0 - 1e-3];
        let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
        let want = |i: usize| ((logits[i] as f64).exp() / z).ln() as f32;
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            logit_bias: vec![(1, 100.0)],
            logprobs: Some(3),
            ..Default::default()
        });
        assert_eq!(s.sample(&logits, &[]), 1, "the bias forces token 1");
        let lp = s.take_logprob().unwrap();
        assert_eq!(lp.id, 1);
        assert!((lp.logprob - want(1)).abs() < 1e-6);
        let ids: Vec<u32> = lp.top.iter().map(|&(t, _)| t).collect();
        assert_eq!(ids, [2, 4, 3]);
        for &(t, l) in &lp.top {
            assert!((l - want(t as usize)).abs() < 1e-6);
        }
        assert!(s.take_logprob().is_none(), "taken once");
        assert_eq!(token_logprob(&logits, 0, 99).top.len(), 5);
        assert!(token_logprob(&logits, 0, 0).top.is_empty());
        let mut off = Sampler::new(SamplingParams::greedy());
        off.sample(&logits, &[]);
        assert!(off.take_logprob().is_none());
    }

    /// `logit_bias` moves the greedy pick both ways; the presence penalty is charged once per
    /// generated token and the frequency penalty once per time it was generated, so a
    /// repeating pick gives way exactly when its lead is used up; out-of-range values are
    /// refused.
    #[test]
    fn openai_biases_and_penalties_change_the_pick_as_specified() {
        let logits = [1.0f32, 3.0, 2.5, 0.0];
        let greedy = |p: SamplingParams| Sampler::new(p).sample(&logits, &[]);
        assert_eq!(greedy(SamplingParams::greedy()), 1);
        let biased = |b: Vec<(u32, f32)>| SamplingParams {
            logit_bias: b,
            ..SamplingParams::greedy()
        };
        assert_eq!(greedy(biased(vec![(1, -100.0)])), 2);
        assert_eq!(greedy(biased(vec![(3, 100.0)])), 3);
        assert_eq!(
            greedy(biased(vec![(99, 100.0)])),
            1,
            "an id past the vocabulary is ignored"
        );
        // Token 1 leads token 2 by 0.5. Presence 0.4 keeps 1 ahead after it is generated
        // once (3 − 0.4 > 2.5); frequency 0.3 makes it give way after two picks (3 − 0.6).
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.4,
            ..SamplingParams::greedy()
        });
        assert_eq!(
            [
                s.sample(&logits, &[]),
                s.sample(&logits, &[]),
                s.sample(&logits, &[])
            ],
            [1, 1, 1]
        );
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 0.3,
            ..SamplingParams::greedy()
        });
        let picks: Vec<u32> = (0..4).map(|_| s.sample(&logits, &[])).collect();
        assert_eq!(picks, [1, 1, 2, 1]);
        for bad in [
            SamplingParams {
                presence_penalty: 2.5,
                ..SamplingParams::greedy()
            },
            SamplingParams {
                frequency_penalty: -3.0,
                ..SamplingParams::greedy()
            },
            biased(vec![(0, 101.0)]),
        ] {
            assert!(bad.validate().is_err());
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_scores() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 4.0,
            ..SamplingParams::greedy()
        });
        // 2.0 / 4 = 0.5 < 1.0, so the unseen token wins.
        assert_eq!(s.sample(&[2.0, 1.0], &[0]), 1);
        // -1.0 * 4 = -4 < -2.
        assert_eq!(s.sample(&[-1.0, -2.0], &[0, 0]), 1);
    }

    #[test]
    fn out_of_range_parameters_are_rejected_not_clamped() {
        let p = SamplingParams {
            top_p: 1.5,
            ..SamplingParams::default()
        };
        assert!(p.validate().unwrap_err().to_string().contains("top_p"));
        let p = SamplingParams {
            temperature: -0.1,
            ..SamplingParams::default()
        };
        assert!(p.validate().is_err());
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            seed: 7,
            ..SamplingParams::default()
        };
        let (mut a, mut b) = (Sampler::new(p.clone()), Sampler::new(p));
        let xs: Vec<u32> = (0..20).map(|_| a.sample(&logits, &[])).collect();
        let ys: Vec<u32> = (0..20).map(|_| b.sample(&logits, &[])).collect();
        assert_eq!(xs, ys);
    }

    proptest::proptest! {
        #[test]
        fn samples_stay_in_the_top_k_and_top_p_set(seed in 0u64..1000, k in 1usize..8, p in 0.05f32..1.0) {
            let logits: Vec<f32> = (0..32).map(|i| ((i * 7919 % 32) as f32) * 0.3).collect();
            let mut order: Vec<usize> = (0..32).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: k, top_p: p, repetition_penalty: 1.0, seed, ..SamplingParams::default() });
            let id = s.sample(&logits, &[]) as usize;
            let rank = order.iter().position(|&i| i == id).unwrap();
            proptest::prop_assert!(rank < k);
        }

        #[test]
        fn tiny_temperature_equals_argmax(seed in 0u64..1000) {
            let logits: Vec<f32> = (0..50).map(|i| ((i * 31 % 50) as f32) * 0.5).collect();
            let mut s = Sampler::new(SamplingParams { temperature: 1e-4, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed, ..SamplingParams::default() });
            proptest::prop_assert_eq!(s.sample(&logits, &[]), argmax(&logits));
        }
    }
}
