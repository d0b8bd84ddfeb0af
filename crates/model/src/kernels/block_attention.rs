//! Attention of many queries at once on CPU: the vision tower's 577 patches, a prompt's
//! prefill. One task per (sequence, head, block of query rows) computes the block's scores,
//! their softmax and their product with the values while the scores (about 100 KiB) stay
//! in L2, and writes its rows straight into the `(b, s, heads · d)` layout the output
//! projection reads.
//!
//! The tensor-op path this replaces (`layers::attention`) made two f32 GEMM calls per head
//! (candle's, which packs both operands each time for products only 64 deep), wrote a
//! 20 MiB score tensor per layer to memory and read it back twice, and copied the result
//! back from head-major order: about 40 ms of a tower layer's 170 on two AVX2 cores.
//!
//! A masked prompt's block attends only up to the last slot any of its rows sees, which
//! skips the upper triangle of a causal mask. The numbers are the tensor ops' up to
//! summation order (f32 throughout).

use candle_core::{DType, Result, Tensor};

use crate::kernels::softmax::softmax_in_place;
use crate::kernels::Dims;

/// Query rows per task: a multiple of the kernels' 6-row tile.
const ROWS: usize = 48;

/// `softmax(q kᵀ / √d + mask) v` with `q: (b, heads, s, d)`, `k, v: (b, kv_heads, t, d)`
/// (query head `h` reads key/value head `h / (heads / kv_heads)`), `mask: (b, 1, s, t)`
/// added to the scores, → `(b, heads, s, d)` (a transposed view of a `(b, s, heads, d)`
/// buffer). `None` where these kernels do not apply (gradients, not CPU f32, `d` not a
/// multiple of 8, no AVX2+FMA): the caller falls back to tensor ops.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    attention_with(q, k, v, mask, None, false)
}

/// [`attention`] with ALiBi (MPT): `dist: (b, 1, s, t)` key minus query positions, times
/// head `h`'s `slopes[h]`, added to the scores with the mask; scores scaled by `scale`.
/// `bf16` as [`attention_bf16`].
pub(crate) fn attention_alibi(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    (dist, slopes, scale): (&Tensor, &[f32], f64),
    bf16: bool,
) -> Result<Option<Tensor>> {
    attention_with(q, k, v, Some(mask), Some((dist, slopes, scale)), bf16)
}

/// [`attention`] for a model whose matrices run in bf16 anyway (`--dtype bf16`, a GGUF
/// model's tower): where the AMX kernels run ([`crate::kernels::bf16::amx`]), the queries, keys,
/// probabilities and values are rounded to bf16 and both products go on tiles (the sums and
/// the softmax stay f32), as PyTorch's bf16 attention rounds them.
pub(crate) fn attention_bf16(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    attention_with(q, k, v, mask, None, true)
}

fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    alibi: Option<(&Tensor, &[f32], f64)>,
    bf16: bool,
) -> Result<Option<Tensor>> {
    let tensors = [Some(q), Some(k), Some(v), mask, alibi.map(|a| a.0)];
    let plain = |t: &Tensor| !t.track_op() && t.device().is_cpu() && t.dtype() == DType::F32;
    if !kernels::available() || !tensors.iter().flatten().all(|t| plain(t)) {
        return Ok(None);
    }
    let (b, heads, s, d) = q.dims4()?;
    let (kb, kv_heads, t, kd) = k.dims4()?;
    let shapes_fit = kb == b
        && kd == d
        && v.dims4()? == (b, kv_heads, t, d)
        && kv_heads > 0
        && heads.is_multiple_of(kv_heads)
        && d.is_multiple_of(8)
        && s > 0
        && t > 0
        && mask.is_none_or(|m| m.dims4().ok() == Some((b, 1, s, t)))
        && alibi.is_none_or(|(dist, slopes, _)| {
            dist.dims4().ok() == Some((b, 1, s, t)) && slopes.len() == heads
        });
    if !shapes_fit {
        return Ok(None);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let mask = mask.map(Tensor::contiguous).transpose()?;
    let dist = alibi.map(|a| a.0.contiguous()).transpose()?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let guard = mask.as_ref().map(Tensor::storage_and_layout);
    let dist_guard = dist.as_ref().map(Tensor::storage_and_layout);
    let (
        candle_core::Storage::Cpu(qs),
        candle_core::Storage::Cpu(ks),
        candle_core::Storage::Cpu(vs),
    ) = (&*qs, &*ks, &*vs)
    else {
        return Ok(None);
    };
    let qv = at(qs, ql, b * heads * s * d)?;
    let kv = at(ks, kl, b * kv_heads * t * d)?;
    let vv = at(vs, vl, b * kv_heads * t * d)?;
    let mv = match &guard {
        Some((ms, ml)) => {
            let candle_core::Storage::Cpu(ms) = &**ms else {
                return Ok(None);
            };
            Some(at(ms, ml, b * s * t)?)
        }
        None => None,
    };
    let dv = match &dist_guard {
        Some((ds, dl)) => {
            let candle_core::Storage::Cpu(ds) = &**ds else {
                return Ok(None);
            };
            Some(at(ds, dl, b * s * t)?)
        }
        None => None,
    };
    let bias = Bias {
        mask: mv,
        alibi: dv.zip(alibi.map(|a| a.1)),
        scale: alibi.map_or((d as f32).powf(-0.5), |a| a.2 as f32),
    };
    // Columns per tile: 32 in two 512-bit vectors where the CPU has AVX-512 (and `d` fills
    // them), else 16 in two 256-bit ones. The sums are the same either way, lane by lane.
    let cols = if kernels::wide() && d.is_multiple_of(16) {
        32
    } else {
        16
    };
    let sh = Dims {
        b,
        heads,
        kv_heads,
        s,
        t,
        d,
    };
    let out = if bf16 && d.is_multiple_of(32) && crate::kernels::bf16::amx::chosen() {
        tiles::attend(sh, qv, kv, vv, bias)
    } else {
        attend(cols, sh, qv, kv, vv, bias)
    };
    let out = Tensor::from_vec(out, (b, s, heads, d), q.device())?;
    Ok(Some(out.transpose(1, 2)?))
}

/// What is added to the scores: the mask `(b, 1, s, t)` and, for ALiBi, the distances
/// `(b, 1, s, t)` with each head's slope; and the scale the products take first.
#[derive(Debug, Clone, Copy)]
struct Bias<'a> {
    mask: Option<&'a [f32]>,
    alibi: Option<(&'a [f32], &'a [f32])>,
    scale: f32,
}

impl Bias<'_> {
    /// Scales row `i` of sequence `bi`'s scores for head `h` (its first `row.len()` slots;
    /// a row is `t` long), adds the mask and ALiBi rows, and takes its softmax, in place.
    fn normalize(
        &self,
        row: &mut [f32],
        (bi, h, i): (usize, usize, usize),
        (s, t): (usize, usize),
    ) {
        let at = (bi * s + i) * t;
        let scale = self.scale;
        match (self.mask, self.alibi) {
            (Some(m), Some((dist, slopes))) => {
                let slope = slopes[h];
                row.iter_mut()
                    .zip(&m[at..])
                    .zip(&dist[at..])
                    .for_each(|((x, &m), &dd)| *x = *x * scale + (dd * slope + m));
            }
            (Some(m), None) => row
                .iter_mut()
                .zip(&m[at..])
                .for_each(|(x, &m)| *x = *x * scale + m),
            (None, Some((dist, slopes))) => {
                let slope = slopes[h];
                row.iter_mut()
                    .zip(&dist[at..])
                    .for_each(|(x, &dd)| *x = *x * scale + dd * slope);
            }
            (None, None) => row.iter_mut().for_each(|x| *x *= scale),
        }
        softmax_in_place(row);
    }
}

/// The `n` values of a contiguous f32 tensor's storage.
fn at<'a>(st: &'a candle_core::CpuStorage, l: &candle_core::Layout, n: usize) -> Result<&'a [f32]> {
    Ok(&st.as_slice::<f32>()?[l.start_offset()..l.start_offset() + n])
}

/// Per (sequence, block of query rows), the key slots any of its rows sees: up to its last
/// finite mask entry (all `t` without a mask). The same for every head, so found once.
fn extents(sh: Dims, blocks: usize, mask: Option<&[f32]>) -> Vec<usize> {
    use rayon::prelude::*;
    let Dims { b, s, t, .. } = sh;
    (0..b * blocks)
        .into_par_iter()
        .map(|sb| {
            let r0 = sb % blocks * ROWS;
            let rows = (r0..s.min(r0 + ROWS)).map(|i| (sb / blocks * s + i) * t);
            let seen = |at: usize| match mask {
                Some(m) => m[at..at + t]
                    .iter()
                    .rposition(|x| x.is_finite())
                    .map_or(0, |j| j + 1),
                None => t,
            };
            rows.map(seen).max().unwrap_or(t).max(1)
        })
        .collect()
}

/// [`attention_bf16`]'s products on AMX tiles: per (sequence, key/value head), the keys and
/// values are packed once as weight tiles; per task, its queries and then its probabilities
/// are rounded into activation tiles, and each 16 × 16 tile of scores or of output sums its
/// products in a tile register.
mod tiles {
    use super::{extents, Bias, Dims, ROWS};
    use crate::kernels::bf16::{amx, pair, round_pairs};

    pub(super) fn attend(sh: Dims, q: &[f32], k: &[f32], v: &[f32], bias: Bias) -> Vec<f32> {
        use rayon::prelude::*;
        let Dims {
            b,
            heads,
            kv_heads,
            s,
            t,
            d,
        } = sh;
        let (rep, dp) = (heads / kv_heads, d / 2);
        // Slots in groups of 16 (a score tile's columns) and pairs of 16 (an output
        // product's step), zeros beyond `t`.
        let (t16, t32) = (t.next_multiple_of(16), t.next_multiple_of(32));
        // Keys as weight tiles: `[slot group][pair of d][16 slots]`.
        let mut kt = vec![0u32; b * kv_heads * t16 * dp];
        kt.par_chunks_mut(t16 * dp).enumerate().for_each(|(g, kt)| {
            let k = &k[g * t * d..(g + 1) * t * d];
            let mut pairs = vec![0u32; dp];
            for (j, row) in k.chunks_exact(d).enumerate() {
                // SAFETY: AMX CPUs have AVX512-BF16 (`chosen()` implies it).
                unsafe { round_pairs(row, &mut pairs) };
                for (p, &x) in pairs.iter().enumerate() {
                    kt[(j / 16 * dp + p) * 16 + j % 16] = x;
                }
            }
        });
        // Values as weight tiles: `[pair of slots][d]`.
        let mut vt = vec![0u32; b * kv_heads * t32 / 2 * d];
        vt.par_chunks_mut(t32 / 2 * d)
            .enumerate()
            .for_each(|(g, vt)| {
                let v = &v[g * t * d..(g + 1) * t * d];
                let zeros = vec![0f32; d];
                for j in 0..t.div_ceil(2) {
                    let hi = if 2 * j + 1 < t {
                        &v[(2 * j + 1) * d..][..d]
                    } else {
                        &zeros
                    };
                    // SAFETY: as above; the rows hold `d` values, a multiple of 32.
                    unsafe { interleave(&v[2 * j * d..][..d], hi, &mut vt[j * d..][..d]) };
                }
            });
        let blocks = s.div_ceil(ROWS);
        let ext = extents(sh, blocks, bias.mask);
        let mut out = vec![0f32; b * s * heads * d];
        let out_addr = out.as_mut_ptr() as usize;
        (0..b * heads * blocks).into_par_iter().for_each_init(
            || {
                (
                    vec![0u32; ROWS * dp],
                    vec![0f32; ROWS * t32],
                    vec![0u32; ROWS * t32 / 2],
                    vec![0f32; 16 * d],
                )
            },
            |(qt, scores, pt, ob), task| {
                let (bi, h, blk) = (
                    task / (heads * blocks),
                    task / blocks % heads,
                    task % blocks,
                );
                let (r0, g) = (blk * ROWS, bi * kv_heads + h / rep);
                let rows = ROWS.min(s - r0);
                let extent = ext[bi * blocks + blk];
                let (e16, e32) = (extent.next_multiple_of(16), extent.next_multiple_of(32));
                let q = &q[((bi * heads + h) * s + r0) * d..];
                for i in 0..ROWS {
                    let row = &mut qt[i * dp..(i + 1) * dp];
                    if i < rows {
                        // SAFETY: as above.
                        unsafe { round_pairs(&q[i * d..(i + 1) * d], row) };
                    } else {
                        row.fill(0);
                    }
                }
                let (kt, vt) = (&kt[g * t16 * dp..], &vt[g * t32 / 2 * d..]);
                let groups = rows.div_ceil(16);
                // SAFETY: `chosen()` held (checked by the caller), so the tiles are ours to
                // configure; every tile lies within its buffer: `qt` has `ROWS` rows of `dp`
                // pairs, `kt` `t16 / 16` groups of `dp × 16` and `e16 ≤ t16`, `scores`
                // `ROWS` rows of `t32 ≥ e32`, `pt` `ROWS` rows of `t32 / 2` pairs, `vt`
                // `t32 / 2` rows of `d`, `ob` 16 rows of `d`.
                unsafe {
                    amx::configure();
                    for rg in 0..groups {
                        for j in 0..e16 / 16 {
                            amx::dot_tile(
                                (qt.as_ptr().add(rg * 16 * dp), 16, dp * 4),
                                (kt.as_ptr().add(j * dp * 16), 256, 64),
                                dp / 16,
                                scores.as_mut_ptr().add(rg * 16 * t32 + j * 16),
                                t32 * 4,
                            );
                        }
                    }
                    for i in 0..rows {
                        bias.normalize(
                            &mut scores[i * t32..i * t32 + extent],
                            (bi, h, r0 + i),
                            (s, t),
                        );
                        let (row, p) = (&scores[i * t32..], &mut pt[i * t32 / 2..][..e32 / 2]);
                        let whole = extent / 2;
                        round_pairs(&row[..2 * whole], &mut p[..whole]);
                        if extent % 2 == 1 {
                            p[whole] = pair(row[extent - 1], 0.0);
                        }
                        p[extent.div_ceil(2)..].fill(0);
                    }
                    for rg in 0..groups {
                        for c0 in (0..d).step_by(16) {
                            amx::dot_tile(
                                (pt.as_ptr().add(rg * 16 * t32 / 2), 16, t32 / 2 * 4),
                                (vt.as_ptr().add(c0), 16 * d, d * 4),
                                e32 / 32,
                                ob.as_mut_ptr().add(c0),
                                d * 4,
                            );
                        }
                        for i in 0..16.min(rows - rg * 16) {
                            let r = r0 + rg * 16 + i;
                            let o = (out_addr as *mut f32).add(((bi * s + r) * heads + h) * d);
                            std::ptr::copy_nonoverlapping(ob.as_ptr().add(i * d), o, d);
                        }
                    }
                    amx::release();
                }
            },
        );
        out
    }

    /// `out[c] = lo[c] | hi[c] << 16` in bf16: two rows of values as pairs, 16 at a time.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
    unsafe fn interleave(lo: &[f32], hi: &[f32], out: &mut [u32]) {
        use std::arch::x86_64::*;
        debug_assert!(
            lo.len() == out.len() && hi.len() == out.len() && out.len().is_multiple_of(16)
        );
        for c in (0..out.len()).step_by(16) {
            let bits = |row: &[f32]| -> __m512i {
                let b: __m256i =
                    std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(row.as_ptr().add(c))));
                _mm512_cvtepu16_epi32(b)
            };
            let v = _mm512_or_si512(bits(lo), _mm512_slli_epi32::<16>(bits(hi)));
            _mm512_storeu_si512(out.as_mut_ptr().add(c) as *mut _, v);
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn interleave(_: &[f32], _: &[f32], _: &mut [u32]) {
        unreachable!("AMX kernels are only chosen where cpu().amx holds")
    }
}

/// [`attention`] on the tensors' memory, in tiles `cols` wide (16, or 32 where
/// [`kernels::wide`]); returns the `(b, s, heads, d)` buffer.
fn attend(cols: usize, sh: Dims, q: &[f32], k: &[f32], v: &[f32], bias: Bias) -> Vec<f32> {
    use rayon::prelude::*;
    let Dims {
        b,
        heads,
        kv_heads,
        s,
        t,
        d,
    } = sh;
    let rep = heads / kv_heads;
    // Keys transposed, `[d][tp]` per (sequence, key/value head), zero beyond `t`, so that
    // a row of scores is 16-wide vector products against rows of this. Rows a multiple of
    // 4 KiB apart would share L1 sets; one more vector avoids that.
    let tp = match t.next_multiple_of(16) {
        w if w.is_multiple_of(1024) => w + 16,
        w => w,
    };
    let mut kt = vec![0f32; b * kv_heads * d * tp];
    kt.par_chunks_mut(d * tp).enumerate().for_each(|(g, kt)| {
        let k = &k[g * t * d..(g + 1) * t * d];
        for (j, row) in k.chunks_exact(d).enumerate() {
            for (i, &x) in row.iter().enumerate() {
                kt[i * tp + j] = x;
            }
        }
    });
    let blocks = s.div_ceil(ROWS);
    let mut out = vec![0f32; b * s * heads * d];
    let out_addr = out.as_mut_ptr() as usize;
    let extents = extents(sh, blocks, bias.mask);
    (0..b * heads * blocks).into_par_iter().for_each_init(
        || vec![0f32; ROWS * tp],
        |scores, task| {
            let (bi, h, blk) = (
                task / (heads * blocks),
                task / blocks % heads,
                task % blocks,
            );
            let (r0, g) = (blk * ROWS, bi * kv_heads + h / rep);
            let rows = ROWS.min(s - r0);
            let extent = extents[bi * blocks + blk];
            let q = &q[((bi * heads + h) * s + r0) * d..];
            let (kt, v) = (&kt[g * d * tp..], &v[g * t * d..]);
            // SAFETY: AVX2+FMA is available (checked by `attention`; AVX-512 where `cols`
            // is 32); every operand holds
            // the rows and columns the tiles read (`q`: `rows × d`; `kt`: `d × tp` with
            // `extent` rounded up to 16 ≤ `tp`; `v`: `extent × d`; `scores`: `ROWS × tp`),
            // and each task writes only its own rows of head `h` in `out`.
            unsafe {
                for i0 in (0..rows).step_by(6) {
                    let r = 6.min(rows - i0);
                    for j0 in (0..extent).step_by(cols) {
                        kernels::tile(
                            cols,
                            (r, if tp - j0 >= cols { 2 } else { 1 }),
                            (q.as_ptr().add(i0 * d), d),
                            (kt.as_ptr().add(j0), tp),
                            d,
                            (scores.as_mut_ptr().add(i0 * tp + j0), tp),
                        );
                    }
                }
                for i in 0..rows {
                    bias.normalize(
                        &mut scores[i * tp..i * tp + extent],
                        (bi, h, r0 + i),
                        (s, t),
                    );
                }
                let o = (out_addr as *mut f32).add(((bi * s + r0) * heads + h) * d);
                for i0 in (0..rows).step_by(6) {
                    let r = 6.min(rows - i0);
                    for c0 in (0..d).step_by(cols) {
                        kernels::tile(
                            cols,
                            (r, if d - c0 >= cols { 2 } else { 1 }),
                            (scores.as_ptr().add(i0 * tp), tp),
                            (v.as_ptr().add(c0), d),
                            extent,
                            (o.add(i0 * heads * d + c0), heads * d),
                        );
                    }
                }
            }
        },
    );
    out
}

mod kernels {
    pub(super) fn available() -> bool {
        crate::kernels::cpu::cpu().avx2_fma
    }

    /// Whether the 512-bit tiles run here (and `KOLLAVA_KERNELS=avx2` does not ask for the
    /// 256-bit ones).
    pub(super) fn wide() -> bool {
        crate::kernels::cpu::cpu().wide()
    }

    /// `c[j][·] = Σᵢ x[j][i] · w[i][·]` for `rows ≤ 6` rows and `vectors ∈ {1, 2}` × 8
    /// columns (× 16 with `cols` = 32: 512-bit vectors), `i < depth`; each operand
    /// `(pointer, row stride)`. The 12 sums of a full tile stay in registers; each `x` value
    /// is broadcast against the row of `w`.
    ///
    /// # Safety
    /// AVX2+FMA must be available (AVX-512 for `cols` = 32: [`wide`]) and the operands must
    /// hold what is read and written.
    pub(super) unsafe fn tile(
        cols: usize,
        (rows, vectors): (usize, usize),
        x: (*const f32, usize),
        w: (*const f32, usize),
        depth: usize,
        c: (*mut f32, usize),
    ) {
        macro_rules! dispatch {
            ($(($r:literal, $v:literal)),*) => {
                match (cols == 32, rows, vectors) {
                    $((false, $r, $v) => tile_n::<$r, $v>(x, w, depth, c),)*
                    $((true, $r, $v) => tile_wide::<$r, $v>(x, w, depth, c),)*
                    _ => unreachable!("tiles are 1-6 rows of 1 or 2 vectors"),
                }
            };
        }
        dispatch!(
            (6, 2),
            (5, 2),
            (4, 2),
            (3, 2),
            (2, 2),
            (1, 2),
            (6, 1),
            (5, 1),
            (4, 1),
            (3, 1),
            (2, 1),
            (1, 1)
        )
    }

    /// One tile kernel per vector width: `R` rows of `V` vectors of sums, each `x` value
    /// broadcast against a row of `w` (`$lanes` floats a vector).
    macro_rules! tile_kernel {
        ($name:ident, $features:literal, $lanes:literal, $zero:ident, $load:ident,
         $splat:ident, $fma:ident, $store:ident) => {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = $features)]
            unsafe fn $name<const R: usize, const V: usize>(
                (x, ldx): (*const f32, usize),
                (w, ldw): (*const f32, usize),
                depth: usize,
                (c, ldc): (*mut f32, usize),
            ) {
                use std::arch::x86_64::*;
                let mut acc = [[$zero(); V]; R];
                for i in 0..depth {
                    let mut wv = [$zero(); V];
                    for (n, wv) in wv.iter_mut().enumerate() {
                        *wv = $load(w.add(i * ldw + $lanes * n));
                    }
                    for (j, a) in acc.iter_mut().enumerate() {
                        let xb = $splat(*x.add(j * ldx + i));
                        for (a, &wv) in a.iter_mut().zip(&wv) {
                            *a = $fma(wv, xb, *a);
                        }
                    }
                }
                for (j, a) in acc.iter().enumerate() {
                    for (n, a) in a.iter().enumerate() {
                        $store(c.add(j * ldc + $lanes * n), *a);
                    }
                }
            }
        };
    }

    tile_kernel!(
        tile_n,
        "avx2,fma",
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_storeu_ps
    );
    // The same on 512-bit vectors.
    tile_kernel!(
        tile_wide,
        "avx512f",
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_storeu_ps
    );

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn tile_wide<const R: usize, const V: usize>(
        _: (*const f32, usize),
        _: (*const f32, usize),
        _: usize,
        _: (*mut f32, usize),
    ) {
        unreachable!("the attention kernels are only chosen where available() holds")
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn tile_n<const R: usize, const V: usize>(
        _: (*const f32, usize),
        _: (*const f32, usize),
        _: usize,
        _: (*mut f32, usize),
    ) {
        unreachable!("the attention kernels are only chosen where available() holds")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The tensor ops' attention, key/value heads repeated for grouped queries.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, heads, _, d) = q.dims4()?;
        let (_, kv_heads, t, _) = k.dims4()?;
        let rep = heads / kv_heads;
        let widen = |x: &Tensor| -> Result<Tensor> {
            x.unsqueeze(2)?
                .broadcast_as((b, kv_heads, rep, t, d))?
                .reshape((b, heads, t, d))
        };
        crate::layers::attention(q, &widen(k)?, &widen(v)?, mask, (d as f64).powf(-0.5))
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn matches_tensor_ops_unmasked_and_grouped() -> Result<()> {
        if !kernels::available() {
            return Ok(());
        }
        let dev = Device::Cpu;
        // (b, heads, kv_heads, s, t, d): rows not a multiple of 6 or of a block, slots not
        // of 16, a head size with an 8-wide remainder, grouped queries.
        for (b, heads, kv_heads, s, t, d) in [
            (1, 4, 4, 53, 53, 64),
            (2, 4, 2, 7, 37, 24),
            (1, 2, 1, 100, 3, 8),
        ] {
            let q = Tensor::randn(0f32, 1.0, (b, heads, s, d), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (b, kv_heads, t, d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (b, kv_heads, t, d), &dev)?;
            let ours = attention(&q, &k, &v, None)?.expect("the kernels apply");
            let want = reference(&q, &k, &v, None)?;
            assert_eq!(ours.dims(), want.dims());
            let diff = max_diff(&ours, &want);
            assert!(diff < 1e-5, "{b} {heads} {kv_heads} {s} {t} {d}: {diff}");
        }
        Ok(())
    }

    /// With ALiBi (MPT): the scores take `scale`, the mask and each head's slope times the
    /// key-minus-query distance, as the tensor ops compute them (llava-spec §1d.3), after
    /// cached slots; in f32 and, where AMX runs, with bf16 products.
    #[test]
    fn alibi_matches_tensor_ops_after_cached_slots() -> Result<()> {
        if !kernels::available() {
            return Ok(());
        }
        let dev = Device::Cpu;
        let (b, heads, s, d, past) = (1, 4, 70, 16, 30);
        let t = past + s;
        let mask: Vec<f32> = (0..s * t)
            .map(|e| {
                if e % t > past + e / t {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let dist: Vec<f32> = (0..s * t)
            .map(|e| (e % t) as f32 - (past + e / t) as f32)
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, s, t), &dev)?;
        let dist = Tensor::from_vec(dist, (b, 1, s, t), &dev)?;
        let slopes = [0.5f32, 0.25, 0.125, 0.0625];
        let scale = 0.3;
        let q = Tensor::randn(0f32, 1.0, (b, heads, s, d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (b, heads, t, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (b, heads, t, d), &dev)?;
        let bias = dist
            .broadcast_mul(&Tensor::from_slice(&slopes, (1, heads, 1, 1), &dev)?)?
            .broadcast_add(&mask)?;
        let want = crate::layers::attention(&q, &k, &v, Some(&bias), scale)?;
        let ours = attention_alibi(&q, &k, &v, &mask, (&dist, &slopes, scale), false)?
            .expect("the kernels apply");
        let diff = max_diff(&ours, &want);
        assert!(diff < 1e-5, "{diff}");
        let unbiased = attention(&q, &k, &v, Some(&mask))?.expect("the kernels apply");
        assert!(
            max_diff(&unbiased, &want) > 1e-2,
            "the bias changes the answer"
        );
        let rounded = attention_alibi(&q, &k, &v, &mask, (&dist, &slopes, scale), true)?
            .expect("the kernels apply");
        let diff = max_diff(&rounded, &want);
        assert!(diff < 0.05, "bf16: {diff}");
        Ok(())
    }

    #[test]
    fn matches_tensor_ops_under_a_causal_mask_with_padding() -> Result<()> {
        if !kernels::available() {
            return Ok(());
        }
        let dev = Device::Cpu;
        let (b, heads, kv_heads, s, d) = (2, 4, 2, 70, 16);
        // A prompt of 70 after 30 cached slots; the second sequence's first 5 slots are
        // left padding.
        let t = 30 + s;
        let mask: Vec<f32> = (0..b * s * t)
            .map(|e| {
                let (r, i, j) = (e / (s * t), e / t % s, e % t);
                if j > 30 + i || (r == 1 && j < 5) {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, s, t), &dev)?;
        let q = Tensor::randn(0f32, 1.0, (b, heads, s, d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (b, kv_heads, t, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (b, kv_heads, t, d), &dev)?;
        let ours = attention(&q, &k, &v, Some(&mask))?.expect("the kernels apply");
        let want = reference(&q, &k, &v, Some(&mask))?;
        let diff = max_diff(&ours, &want);
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    /// The 512-bit tiles give, bit for bit, what the 256-bit ones give (each output's sum
    /// runs in the same order), on a shape with partial tiles of both widths.
    #[test]
    fn wide_tiles_equal_narrow_ones() -> Result<()> {
        if !kernels::available() || !kernels::wide() {
            eprintln!("skipped: no AVX-512 on this CPU");
            return Ok(());
        }
        let dev = Device::Cpu;
        let (b, heads, kv_heads, s, t, d) = (1, 2, 1, 61, 61 + 19, 48);
        let sh = Dims {
            b,
            heads,
            kv_heads,
            s,
            t,
            d,
        };
        let data =
            |n: usize| -> Result<Vec<f32>> { Tensor::randn(0f32, 1.0, n, &dev)?.to_vec1::<f32>() };
        let (q, k, v) = (
            data(b * heads * s * d)?,
            data(b * kv_heads * t * d)?,
            data(b * kv_heads * t * d)?,
        );
        let mask: Vec<f32> = (0..b * s * t)
            .map(|e| {
                if e % t > 19 + e / t % s {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        for m in [None, Some(&mask[..])] {
            let bias = Bias {
                mask: m,
                alibi: None,
                scale: (d as f32).powf(-0.5),
            };
            let narrow = attend(16, sh, &q, &k, &v, bias);
            let wide = attend(32, sh, &q, &k, &v, bias);
            assert!(narrow == wide, "masked: {}", m.is_some());
        }
        Ok(())
    }

    /// On AMX tiles: against the tensor ops on bf16-rounded queries, keys and values, within
    /// what rounding the probabilities to bf16 adds; unmasked and under a causal mask with
    /// padding, rows and slots not a multiple of a tile, grouped queries.
    #[test]
    fn bf16_tiles_match_tensor_ops_on_rounded_operands() -> Result<()> {
        if !crate::kernels::bf16::amx::chosen() {
            eprintln!("skipped: no AMX on this CPU");
            return Ok(());
        }
        let dev = Device::Cpu;
        let round = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
        for (b, heads, kv_heads, s, t, d, masked) in [
            (1, 4, 4, 53, 53, 64, false),
            (2, 4, 2, 70, 100, 32, true),
            (1, 2, 1, 100, 100, 128, true),
        ] {
            let q = Tensor::randn(0f32, 1.0, (b, heads, s, d), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (b, kv_heads, t, d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (b, kv_heads, t, d), &dev)?;
            let mask = masked.then(|| {
                let past = t - s;
                let m: Vec<f32> = (0..b * s * t)
                    .map(|e| {
                        let (r, i, j) = (e / (s * t), e / t % s, e % t);
                        if j > past + i || (r == 1 && j < 5) {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                    .collect();
                Tensor::from_vec(m, (b, 1, s, t), &dev)
            });
            let mask = mask.transpose()?;
            let ours = attention_bf16(&q, &k, &v, mask.as_ref())?.expect("the kernels apply");
            let want = reference(&round(&q)?, &round(&k)?, &round(&v)?, mask.as_ref())?;
            let diff = max_diff(&ours, &want);
            assert!(diff < 1e-2, "{b} {heads} {kv_heads} {s} {t} {d}: {diff}");
            // And not the exact path's result by accident: that one is f32 throughout.
            let exact = attention(&q, &k, &v, mask.as_ref())?.expect("the kernels apply");
            assert!(max_diff(&ours, &exact) > 0.0);
        }
        Ok(())
    }

    #[test]
    fn declines_what_it_does_not_cover() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 5, 12), &dev)?; // d = 12: not a multiple of 8
        assert!(attention(&q, &q, &q, None)?.is_none());
        let q = q.to_dtype(DType::F16)?;
        assert!(attention(&q, &q, &q, None)?.is_none());
        Ok(())
    }
}
