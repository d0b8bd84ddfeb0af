//! Attention for training on the CPU without keeping its score matrices. candle's ops keep
//! every `(b, heads, s, t)` intermediate of `softmax(QKᵀ·scale + mask)·V` for the backward
//! (scores, scaled, masked, probabilities: a third of a LLaVA step's activation memory at
//! 430 tokens). This op keeps only the output and each row's log-sum-exp; its backward
//! recomputes one head's probabilities at a time, a block of query rows at a time in a
//! buffer of its own, and takes the gradients of Q, K and V from them:
//! `dV = Pᵀ dO`, `dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O))`, `dQ = dS K·scale`, `dK = dSᵀ Q·scale`.
//! Heads sharing a key/value head (grouped-query attention) are one task, so that their
//! `dK`/`dV` add up without locks. The products are `gemm`'s (candle's own matrix
//! kernels), one head per task on rayon's threads. Each block of query rows multiplies only
//! the leading keys some row of it sees, so a causal mask's upper triangle is skipped, both
//! ways.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::softmax::exp_nonpositive;
use super::{sgemm, Dims};

/// `softmax(q kᵀ · scale + mask [+ slope_h · dist]) v` with gradients for `q`, `k` and `v`.
/// `q: (b, heads, s, d)`, `k, v: (b, kv_heads, t, d)`, `mask: (b, 1, s, t)` (0 or −∞; every
/// row has a finite entry), `alibi`: MPT's key-minus-query distances `(b, 1, s, t)` and one
/// slope per head → `(b, heads, s, d)`. f32 CPU tensors.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    alibi: Option<(&Tensor, &[f32])>,
    scale: f64,
) -> Result<Tensor> {
    let (b, heads, s, d) = q.dims4()?;
    let (kb, kv_heads, t, kd) = k.dims4()?;
    if kb != b || kd != d || v.dims4()? != (b, kv_heads, t, d) || heads % kv_heads != 0 {
        candle_core::bail!(
            "train attention: q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if mask.dims4()? != (b, 1, s, t) {
        candle_core::bail!(
            "train attention: mask {:?} for q {:?}, k {:?}",
            mask.dims(),
            q.dims(),
            k.dims()
        );
    }
    let alibi = match alibi {
        Some((dist, slopes)) if dist.dims4()? == (b, 1, s, t) && slopes.len() == heads => Some((
            dist.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
            slopes.to_vec(),
        )),
        Some((dist, slopes)) => candle_core::bail!(
            "train attention: ALiBi distances {:?} and {} slopes for q {:?}",
            dist.dims(),
            slopes.len(),
            q.dims()
        ),
        None => None,
    };
    let mask: Vec<f32> = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let extents = key_extents(&mask, b, s, t);
    let op = Attention {
        alibi,
        extents,
        dims: Dims {
            b,
            heads,
            kv_heads,
            s,
            t,
            d,
        },
        mask,
        scale: scale as f32,
        lse: Mutex::new(None),
    };
    q.contiguous()?.apply_op3_arc(
        &k.contiguous()?,
        &v.contiguous()?,
        std::sync::Arc::new(Box::new(op)),
    )
}

/// Query rows per block: each block's products reach only the keys some row of it sees.
const QUERY_BLOCK: usize = 64;

/// Per batch row and block of [`QUERY_BLOCK`] query rows, how many leading keys cover every
/// key a row of the block sees (a finite mask entry): under a causal mask, the later blocks
/// reach further, and the products skip the rest (about half of them).
fn key_extents(mask: &[f32], b: usize, s: usize, t: usize) -> Vec<usize> {
    let blocks = s.div_ceil(QUERY_BLOCK);
    let mut out = Vec::with_capacity(b * blocks);
    for bi in 0..b {
        for blk in 0..blocks {
            let rows = blk * QUERY_BLOCK..((blk + 1) * QUERY_BLOCK).min(s);
            let extent = rows
                .map(|i| {
                    let row = &mask[(bi * s + i) * t..][..t];
                    row.iter().rposition(|m| m.is_finite()).map_or(0, |j| j + 1)
                })
                .max()
                .unwrap_or(0);
            out.push(extent.max(1));
        }
    }
    out
}

struct Attention {
    dims: Dims,
    /// [`key_extents`] of the mask.
    extents: Vec<usize>,
    /// `(b, s, t)`.
    mask: Vec<f32>,
    /// ALiBi: distances `(b, s, t)` and a slope per head.
    alibi: Option<(Vec<f32>, Vec<f32>)>,
    scale: f32,
    /// Each query row's `log Σ exp(score)`, `(b, heads, s)`, from the forward.
    lse: Mutex<Option<Vec<f32>>>,
}

/// Query rows `rows` of a head and the leading `extent` keys they see.
struct Block {
    rows: std::ops::Range<usize>,
    extent: usize,
}

impl Attention {
    /// Batch row `bi`'s query blocks.
    fn blocks(&self, bi: usize) -> impl Iterator<Item = Block> + '_ {
        let s = self.dims.s;
        let n = s.div_ceil(QUERY_BLOCK);
        (0..n).map(move |blk| Block {
            rows: blk * QUERY_BLOCK..((blk + 1) * QUERY_BLOCK).min(s),
            extent: self.extents[bi * n + blk],
        })
    }

    /// Head `h`'s `scores · scale + mask` (and ALiBi's bias) over a block's rows and keys
    /// (`rows × extent`, that row stride) into `p`; `q` the head's whole `s × d`.
    fn scores(&self, p: &mut [f32], q: &[f32], k: &[f32], bi: usize, h: usize, blk: &Block) {
        let Dims { s, t, d, .. } = self.dims;
        let (n, e) = (blk.rows.len(), blk.extent);
        let q = &q[blk.rows.start * d..];
        sgemm((n, e, d), p, false, q, (d, 1), k, (1, d), self.scale, false);
        for (r, row) in blk.rows.clone().zip(p.chunks_exact_mut(e)) {
            let at = (bi * s + r) * t;
            row.iter_mut()
                .zip(&self.mask[at..at + e])
                .for_each(|(x, m)| *x += m);
            if let Some((dist, slopes)) = &self.alibi {
                let slope = slopes[h];
                row.iter_mut()
                    .zip(&dist[at..at + e])
                    .for_each(|(x, dd)| *x += slope * dd);
            }
        }
    }
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("train attention: a non-contiguous input");
    };
    Ok(&s.as_slice::<f32>()?[start..end])
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "train-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (slice(qs, ql)?, slice(ks, kl)?, slice(vs, vl)?);
        let dims = self.dims;
        let Dims {
            b,
            heads,
            kv_heads,
            s,
            t,
            d,
        } = dims;
        let rep = dims.rep();
        let mut out = vec![0f32; b * heads * s * d];
        let mut lse = vec![0f32; b * heads * s];
        // One task per (batch row, key/value head): its `rep` query heads are contiguous.
        out.par_chunks_mut(rep * s * d)
            .zip(lse.par_chunks_mut(rep * s))
            .enumerate()
            .for_each(|(task, (out, lse))| {
                let (bi, g) = (task / kv_heads, task % kv_heads);
                let kv = (bi * kv_heads + g) * t * d;
                let (k, v) = (&k[kv..kv + t * d], &v[kv..kv + t * d]);
                let mut p = vec![0f32; QUERY_BLOCK.min(s) * t];
                for r in 0..rep {
                    let h = g * rep + r;
                    let qh = &q[(bi * heads + h) * s * d..][..s * d];
                    for blk in self.blocks(bi) {
                        let (n, e) = (blk.rows.len(), blk.extent);
                        let p = &mut p[..n * e];
                        self.scores(p, qh, k, bi, h, &blk);
                        let lse = &mut lse[r * s + blk.rows.start..r * s + blk.rows.end];
                        for (row, l) in p.chunks_exact_mut(e).zip(lse) {
                            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                            let mut sum = 0f32;
                            for x in row.iter_mut() {
                                *x = exp_nonpositive(*x - max);
                                sum += *x;
                            }
                            row.iter_mut().for_each(|x| *x /= sum);
                            *l = max + sum.ln();
                        }
                        let o = &mut out[(r * s + blk.rows.start) * d..(r * s + blk.rows.end) * d];
                        sgemm((n, d, e), o, false, p, (e, 1), v, (d, 1), 1.0, false);
                    }
                }
            });
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))? = Some(lse);
        Ok((CpuStorage::F32(out), Shape::from((b, heads, s, d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?
            .clone();
        let Some(lse) = lse else {
            candle_core::bail!("train attention: backward before forward");
        };
        let flat =
            |x: &Tensor| -> Result<Vec<f32>> { x.to_dtype(DType::F32)?.flatten_all()?.to_vec1() };
        let (q, k, v, o, go) = (flat(q)?, flat(k)?, flat(v)?, flat(o)?, flat(grad)?);
        let dims = self.dims;
        let Dims {
            b,
            heads,
            kv_heads,
            s,
            t,
            d,
        } = dims;
        let rep = dims.rep();
        let mut dq = vec![0f32; b * heads * s * d];
        let mut dk = vec![0f32; b * kv_heads * t * d];
        let mut dv = vec![0f32; b * kv_heads * t * d];
        dq.par_chunks_mut(rep * s * d)
            .zip(dk.par_chunks_mut(t * d))
            .zip(dv.par_chunks_mut(t * d))
            .enumerate()
            .for_each(|(task, ((dq, dk), dv))| {
                let (bi, g) = (task / kv_heads, task % kv_heads);
                let kv = (bi * kv_heads + g) * t * d;
                let (kh, vh) = (&k[kv..kv + t * d], &v[kv..kv + t * d]);
                let mut p = vec![0f32; QUERY_BLOCK.min(s) * t];
                let mut ds = vec![0f32; QUERY_BLOCK.min(s) * t];
                for r in 0..rep {
                    let h = g * rep + r;
                    let at = (bi * heads + h) * s * d;
                    let (qh, oh, gh) =
                        (&q[at..at + s * d], &o[at..at + s * d], &go[at..at + s * d]);
                    for blk in self.blocks(bi) {
                        let (n, e) = (blk.rows.len(), blk.extent);
                        let (p, ds) = (&mut p[..n * e], &mut ds[..n * e]);
                        self.scores(p, qh, kh, bi, h, &blk);
                        let lse = &lse[(bi * heads + h) * s + blk.rows.start..][..n];
                        for (row, l) in p.chunks_exact_mut(e).zip(lse) {
                            row.iter_mut().for_each(|x| *x = exp_nonpositive(*x - l));
                        }
                        let rows = blk.rows.start * d..blk.rows.end * d;
                        let (qb, ob, gb) = (&qh[rows.clone()], &oh[rows.clone()], &gh[rows]);
                        // dV += Pᵀ dO (the keys the block sees; `dv` starts at zero).
                        sgemm((e, d, n), dv, true, p, (1, e), gb, (d, 1), 1.0, false);
                        // dP = dO Vᵀ, then dS = P ⊙ (dP − rowsum(dO ⊙ O)) · scale.
                        sgemm((n, e, d), ds, false, gb, (d, 1), vh, (1, d), 1.0, false);
                        for i in 0..n {
                            let di: f32 = gb[i * d..(i + 1) * d]
                                .iter()
                                .zip(&ob[i * d..(i + 1) * d])
                                .map(|(a, b)| a * b)
                                .sum();
                            let (prow, drow) =
                                (&p[i * e..(i + 1) * e], &mut ds[i * e..(i + 1) * e]);
                            for (x, &pv) in drow.iter_mut().zip(prow) {
                                *x = pv * (*x - di) * self.scale;
                            }
                        }
                        // dQ = dS K, dK += dSᵀ Q.
                        let dqb = &mut dq[(r * s + blk.rows.start) * d..(r * s + blk.rows.end) * d];
                        sgemm((n, d, e), dqb, false, ds, (e, 1), kh, (d, 1), 1.0, false);
                        sgemm((e, d, n), dk, true, ds, (1, e), qb, (d, 1), 1.0, false);
                    }
                }
            });
        let dev = candle_core::Device::Cpu;
        Ok((
            Some(Tensor::from_vec(dq, (b, heads, s, d), &dev)?),
            Some(Tensor::from_vec(dk, (b, kv_heads, t, d), &dev)?),
            Some(Tensor::from_vec(dv, (b, kv_heads, t, d), &dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use kollava_testkit::assert_values_and_grads;

    /// candle's tensor-op attention (the decoder's training path before this op), with the
    /// key/value heads repeated for grouped-query attention.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Tensor {
        reference_biased(q, k, v, mask, scale)
    }

    /// [`reference`] with a per-head additive `bias: (b, heads, s, t)` (or the mask).
    fn reference_biased(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Tensor {
        let (_, heads, _, _) = q.dims4().unwrap();
        let (b, kvh, t, d) = k.dims4().unwrap();
        let rep = heads / kvh;
        let expand = |x: &Tensor| {
            x.unsqueeze(2)
                .unwrap()
                .broadcast_as((b, kvh, rep, t, d))
                .unwrap()
                .reshape((b, heads, t, d))
                .unwrap()
        };
        if mask.dim(1).unwrap() == heads && heads > 1 {
            // A per-head bias: candle's ops, step by step.
            let s = (q.matmul(&expand(k).t().unwrap()).unwrap() * scale).unwrap();
            let p = candle_nn::ops::softmax(&(s + mask).unwrap(), candle_core::D::Minus1).unwrap();
            return p.matmul(&expand(v)).unwrap();
        }
        crate::layers::attention(q, &expand(k), &expand(v), Some(mask), scale).unwrap()
    }

    /// Causal with the first `pad[b]` key slots of row `b` padding (visible only to
    /// themselves), as the cache builds a left-padded batch.
    fn mask(b: usize, s: usize, pad: &[usize]) -> Tensor {
        let mut m = vec![0f32; b * s * s];
        for r in 0..b {
            for i in 0..s {
                for j in 0..s {
                    let allowed = if i < pad[r] {
                        j == i // a padding query sees itself
                    } else {
                        j >= pad[r] && j <= i
                    };
                    if !allowed {
                        m[(r * s + i) * s + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Tensor::from_vec(m, (b, 1, s, s), &Device::Cpu).unwrap()
    }

    /// Values and the gradients of q, k and v against candle's ops, on odd sizes, with
    /// padding and with grouped-query heads.
    #[test]
    fn train_attention_matches_candles_values_and_gradients() {
        let dev = Device::Cpu;
        for (b, heads, kvh, s, d, pad) in [
            (1, 1, 1, 1, 1, vec![0]),
            (2, 4, 2, 7, 5, vec![0, 3]),
            (1, 3, 3, 33, 16, vec![0]),
            (3, 6, 2, 20, 8, vec![5, 0, 19]),
            // Several query blocks, padding across a block's edge.
            (2, 4, 2, 150, 8, vec![0, 70]),
            (1, 2, 1, 129, 4, vec![0]),
        ] {
            let var = |shape: (usize, usize, usize, usize)| {
                Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap()
            };
            let (q, k, v) = (
                var((b, heads, s, d)),
                var((b, kvh, s, d)),
                var((b, kvh, s, d)),
            );
            let m = mask(b, s, &pad);
            let scale = (d as f64).powf(-0.5);
            let ours =
                attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &m, None, scale).unwrap();
            let theirs = reference(q.as_tensor(), k.as_tensor(), v.as_tensor(), &m, scale);
            let what = format!("{b}x{heads}x{s}x{d}");
            let vars = [("q", &q), ("k", &k), ("v", &v)];
            assert_values_and_grads(&what, &ours, &theirs, &vars, (1e-5, 1e-4));
        }
    }

    /// With ALiBi (MPT): slopes per head times key-minus-query distances, added to the
    /// masked scores, against candle's ops on the same bias.
    #[test]
    fn train_attention_with_alibi_matches_candles_values_and_gradients() {
        let dev = Device::Cpu;
        for s in [9, 100] {
            alibi_case(&dev, s);
        }
    }

    fn alibi_case(dev: &Device, s: usize) {
        let (b, heads, d) = (2, 4, 8);
        let dev = dev.clone();
        let var = |shape: (usize, usize, usize, usize)| {
            Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap()
        };
        let (q, k, v) = (
            var((b, heads, s, d)),
            var((b, heads, s, d)),
            var((b, heads, s, d)),
        );
        let m = mask(b, s, &[0, 2]);
        let dist: Vec<f32> = (0..b * s * s)
            .map(|x| ((x % s) as f32) - ((x / s) % s) as f32)
            .collect();
        let dist = Tensor::from_vec(dist, (b, 1, s, s), &dev).unwrap();
        let slopes = [0.5f32, 0.25, 0.125, 0.0625];
        let bias = dist
            .broadcast_mul(
                &Tensor::new(&slopes[..], &dev)
                    .unwrap()
                    .reshape((1, heads, 1, 1))
                    .unwrap(),
            )
            .unwrap()
            .broadcast_add(&m)
            .unwrap();
        let scale = (d as f64).powf(-0.5);
        let ours = attention(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            &m,
            Some((&dist, &slopes[..])),
            scale,
        )
        .unwrap();
        let theirs = reference_biased(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias, scale);
        let vars = [("q", &q), ("k", &k), ("v", &v)];
        assert_values_and_grads(
            &format!("ALiBi, {s} rows"),
            &ours,
            &theirs,
            &vars,
            (1e-5, 1e-4),
        );
    }
}
