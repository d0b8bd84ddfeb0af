//! How far a quantized model drifts from its source: both decode the same greedy sequence
//! (the source's), and at each step we compare the next-token distributions: whether their
//! top-1 tokens agree, and the KL divergence `KL(source ‖ quantized)`.

use candle_core::{DType, Tensor, D};
use kollava_generate::session::Timings;
use kollava_generate::{Session, SessionError};
use kollava_inputs::image::RgbImage;
use kollava_model::KvCache;

#[derive(Debug, Clone)]
pub struct QuantReport {
    /// Positions compared.
    pub tokens: usize,
    /// Fraction of positions whose most likely token is the same.
    pub top1_agreement: f64,
    /// Mean over positions of `KL(source ‖ quantized)`, in nats.
    pub mean_kl: f64,
}

/// `log_softmax` of a `(vocab,)` row, in f32.
fn log_probs(logits: &Tensor) -> candle_core::Result<Tensor> {
    let l = logits.to_dtype(DType::F32)?;
    let max = l.max_keepdim(D::Minus1)?;
    let shifted = l.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Runs `prompt` (rendered, with `<image>` placeholders) with `images` through both sessions
/// for `tokens` steps.
pub fn compare(
    source: &Session,
    quantized: &Session,
    prompt: &str,
    images: &[RgbImage],
    tokens: usize,
) -> Result<QuantReport, SessionError> {
    let mut t = Timings::default();
    let a = source.embed_prompt(prompt, images, &mut t)?;
    let b = quantized.embed_prompt(prompt, images, &mut t)?;
    let (mut ca, mut cb) = (
        source.model.decoder.new_cache(1),
        quantized.model.decoder.new_cache(1),
    );
    let (mut xa, mut xb) = (a.embeds, b.embeds);
    let (mut agree, mut kl_sum) = (0usize, 0f64);
    let mut n = 0;
    while n < tokens {
        let last = |m: &kollava_model::Llava,
                    x: &Tensor,
                    c: &mut KvCache|
         -> candle_core::Result<Tensor> {
            let s = x.dim(1)?;
            let h = m.decoder.forward(x, &[s], c)?;
            m.decoder.logits(&h.narrow(1, s - 1, 1)?)?.flatten_all()
        };
        let la = log_probs(&last(&source.model, &xa, &mut ca)?)?;
        let lb = log_probs(&last(&quantized.model, &xb, &mut cb)?)?;
        let top_a = la.argmax(0)?.to_scalar::<u32>()?;
        let top_b = lb.argmax(0)?.to_scalar::<u32>()?;
        agree += usize::from(top_a == top_b);
        let kl = (la.exp()? * (&la - &lb)?)?.sum_all()?.to_scalar::<f32>()?;
        kl_sum += kl.max(0.0) as f64;
        n += 1;
        let next = Tensor::new(&[[top_a]], xa.device())?;
        xa = source.model.decoder.embed(&next)?;
        xb = quantized
            .model
            .decoder
            .embed(&next.to_device(xb.device())?)?;
    }
    Ok(QuantReport {
        tokens: n,
        top1_agreement: agree as f64 / n.max(1) as f64,
        mean_kl: kl_sum / n.max(1) as f64,
    })
}
