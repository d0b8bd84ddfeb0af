//! Measuring speed honestly (`kollava bench`): medians over repeats, the process's peak RSS,
//! the machine's memory bandwidth measured in the same run with a plain copy kernel, and the
//! bytes of weights a decode step must read, so decode speed can be put against its
//! roofline. Nothing here is asserted in tests: figures go to reports.

use std::time::Instant;

use kollava_model::config::{DecoderConfig, ModelConfig, ProjectorKind};

/// Median of `xs` (mean of the middle two for an even count); NaN for none.
pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Peak resident set size of this process (`VmHWM`), in bytes; `None` off Linux.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Bytes of decoder weights one decode step reads at `bytes_per_param` (every layer's
/// projections and norms plus `lm_head`; the embedding contributes one row).
pub fn decoder_bytes_per_token(cfg: &DecoderConfig, bytes_per_param: f64) -> f64 {
    let (h, d) = (cfg.hidden_size as f64, cfg.head_dim as f64);
    let attn =
        h * d * (2.0 * cfg.num_attention_heads as f64 + 2.0 * cfg.num_key_value_heads as f64);
    // LLaMA's MLP has gate, up and down; MPT's up and down.
    let matrices = if cfg.mpt().is_some() { 2.0 } else { 3.0 };
    let mlp = matrices * h * cfg.intermediate_size as f64;
    let per_layer = attn + mlp + 2.0 * h;
    let params = cfg.num_hidden_layers as f64 * per_layer + h + cfg.vocab_size as f64 * h + h;
    params * bytes_per_param
}

/// Parameters of the whole model (vision tower layers used + projector + decoder).
pub fn parameter_count(cfg: &ModelConfig) -> f64 {
    let v = &cfg.vision;
    let vh = v.hidden_size as f64;
    let vision_layer = 4.0 * vh * vh + 2.0 * vh * v.intermediate_size as f64;
    let vision = cfg.vision_layers_used as f64 * vision_layer;
    let h = cfg.decoder.hidden_size as f64;
    let projector = match cfg.projector {
        ProjectorKind::Linear => vh * h,
        ProjectorKind::Mlp { depth, .. } => vh * h + (depth - 1) as f64 * h * h,
        ProjectorKind::Identity => 0.0,
    };
    // The decoder's bytes per token count `lm_head` (the embedding itself when tied).
    let table = if cfg.decoder.tie_word_embeddings {
        0.0
    } else {
        cfg.decoder.vocab_size as f64 * h
    };
    vision + projector + decoder_bytes_per_token(&cfg.decoder, 1.0) + table
}

/// Memory bandwidth in bytes/s with `threads` threads: a 256 MiB f32 copy repeated, the
/// best of `reps`, counting read + write (as the peers' numpy/torch copy does).
pub fn memory_bandwidth(threads: usize, reps: usize) -> f64 {
    let n = 64 << 20; // f32 elements = 256 MiB per buffer
    let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut dst = vec![0f32; n];
    let threads = threads.max(1);
    let chunk = n.div_ceil(threads);
    let mut best = 0f64;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        std::thread::scope(|s| {
            for (d, sc) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
                s.spawn(move || d.copy_from_slice(sc));
            }
        });
        let secs = t.elapsed().as_secs_f64();
        best = best.max((2 * n * 4) as f64 / secs);
    }
    std::hint::black_box(&dst);
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn bytes_per_token_of_llama_7b_in_f16_is_13_2_gb() {
        let cfg = DecoderConfig {
            arch: kollava_model::config::Architecture::Llama,
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 32,
            head_dim: 128,
            rms_norm_eps: 1e-5,
            rope_theta: 1e4,
            max_position_embeddings: 4096,
            sliding_window: None,
            attention_bias: false,
            mlp_bias: false,
            hidden_act: kollava_model::config::Activation::Silu,
            tie_word_embeddings: false,
        };
        // LLaMA-7B has 6.74 B parameters; all but the 0.13 B embedding are read, 2 bytes each.
        let gb = decoder_bytes_per_token(&cfg, 2.0) / 1e9;
        assert!((13.1..13.3).contains(&gb), "{gb}");
    }
}
