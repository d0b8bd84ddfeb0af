//! Attention of one decoding step on CPU: each sequence's single new query over its own
//! cached keys and values, in one pass per layer instead of a dozen tensor ops.
//!
//! One task per (sequence, key/value head): the `rep` query heads that share a key/value
//! head (grouped-query attention) read each cached key and value once, so the cache streams
//! from memory once per layer. Sums are in a fixed order that depends only on the sequence
//! itself, so that a sequence's result never depends on the rest of its batch. Inner loops
//! work on 16 floats at a time, which the compiler keeps in vector registers. The cache may
//! hold f16: each value is widened as it is loaded, so the cache streams at half the bytes.

use candle_core::{DType, Result, Tensor};
use half::f16;

use crate::kernels::softmax::softmax_in_place;

/// `q: (b, heads, 1, d)` f32, `k, v: (b, kv_heads, t, d)` f32 or f16 views, row `r`
/// attending to slots `spans[r] = (start, len)` → `(b, heads, 1, d)` f32. Scores are
/// scaled by `scale`; with ALiBi (MPT) head `h` adds `slopes[h] · (j − (len − 1))` to key
/// `j`'s (the query is the span's last position).
pub(crate) fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spans: &[(usize, usize)],
    kv_heads: usize,
    (scale, slopes): (f32, Option<&[f32]>),
) -> Result<Tensor> {
    let (ks, _) = k.storage_and_layout();
    let (vs, _) = v.storage_and_layout();
    let (candle_core::Storage::Cpu(ks), candle_core::Storage::Cpu(vs)) = (&*ks, &*vs) else {
        candle_core::bail!("decode attention runs on CPU tensors");
    };
    match (k.dtype(), v.dtype()) {
        (DType::F32, DType::F32) => {
            let (kd, vd) = (ks.as_slice::<f32>()?, vs.as_slice::<f32>()?);
            attend_all(q, (k, kd), (v, vd), spans, kv_heads, (scale, slopes))
        }
        (DType::F16, DType::F16) => {
            let (kd, vd) = (ks.as_slice::<f16>()?, vs.as_slice::<f16>()?);
            attend_all(q, (k, kd), (v, vd), spans, kv_heads, (scale, slopes))
        }
        (a, b) => candle_core::bail!("decode attention over a {a:?}/{b:?} cache"),
    }
}

/// [`decode_attention`] over caches whose storage is `ks`/`vs`.
fn attend_all<T: Elem>(
    q: &Tensor,
    (k, ks): (&Tensor, &[T]),
    (v, vs): (&Tensor, &[T]),
    spans: &[(usize, usize)],
    kv_heads: usize,
    (scale, slopes): (f32, Option<&[f32]>),
) -> Result<Tensor> {
    let (b, heads, _, d) = q.dims4()?;
    if slopes.is_some_and(|s| s.len() != heads) {
        candle_core::bail!("ALiBi slopes for {heads} heads");
    }
    let rep = heads / kv_heads;
    let q = q.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let (kl, vl) = (k.layout(), v.layout());
    let (kst, vst) = (kl.stride(), vl.stride());
    if kst[3] != 1 || vst[3] != 1 {
        candle_core::bail!("decode attention needs rows of keys and values in memory order");
    }
    let (k0, v0) = (kl.start_offset(), vl.start_offset());
    // A few tasks per thread (the query heads of a group split into `parts`), so that
    // threads finish together even when the batch has a single row.
    let mut parts = 1;
    while parts < rep && rep.is_multiple_of(2 * parts) && b * kv_heads * parts < 16 {
        parts *= 2;
    }
    let per = rep / parts;
    // Query heads `first..first + per` of row `r` (all of key/value head `g`) into `out`.
    let attend = |r: usize, first: usize, out: &mut [f32]| {
        let (start, len) = spans[r];
        let g = first / rep;
        let qs = &q[(r * heads + first) * d..(r * heads + first + per) * d];
        let at = |base: usize, st: &[usize], j: usize| {
            base + r * st[0] + g * st[1] + (start + j) * st[2]
        };
        if len == 0 {
            out.fill(0.0);
            return;
        }
        let (key0, value0) = (at(k0, kst, 0), at(v0, vst, 0));
        let keys = Rows {
            data: &ks[key0..at(k0, kst, len - 1) + d],
            stride: kst[2],
            d,
        };
        let values = Rows {
            data: &vs[value0..at(v0, vst, len - 1) + d],
            stride: vst[2],
            d,
        };
        // scores[h · len + j] = softmax_j(q_h · k_j · scale)
        let mut scores = vec![0f32; per * len];
        for (h, (qh, sh)) in qs
            .chunks_exact(d)
            .zip(scores.chunks_exact_mut(len))
            .enumerate()
        {
            keys.dots(qh, scale, sh);
            if let Some(slopes) = slopes {
                let slope = slopes[first + h];
                for (j, x) in sh.iter_mut().enumerate() {
                    *x += (j as f32 - (len - 1) as f32) * slope;
                }
            }
            softmax_in_place(sh);
        }
        for (sh, o) in scores.chunks_exact(len).zip(out.chunks_exact_mut(d)) {
            values.weighted_sum(sh, o);
        }
    };
    let mut out = vec![0f32; b * heads * d];
    let out_addr = out.as_mut_ptr() as usize;
    // candle's persistent workers spin between tasks rather than sleep: no wake-up per layer.
    candle_core::utils::barrier_pool().execute_chunked(b * heads / per, |items| {
        for i in items {
            let (r, first) = (i * per / heads, i * per % heads);
            // SAFETY: item `i` alone writes its heads' outputs `out[i·per·d..(i+1)·per·d]`.
            let o = unsafe {
                std::slice::from_raw_parts_mut((out_addr as *mut f32).add(i * per * d), per * d)
            };
            attend(r, first, o);
        }
    });
    Tensor::from_vec(out, (b, heads, 1, d), k.device())
}

/// A cached value: f32, or f16 widened to f32 as it is read (F16C, which every build
/// targets on x86-64 with AVX2).
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    fn get(self) -> f32;

    /// Eight values from `p` as f32.
    /// # Safety
    /// `p` must point at eight readable values.
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Elem for f32 {
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }

    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn get(self) -> f32 {
        self.to_f32()
    }

    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        not(target_feature = "f16c")
    ))]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        let mut x = [0f32; 8];
        for (i, v) in x.iter_mut().enumerate() {
            *v = (*p.add(i)).to_f32();
        }
        std::arch::x86_64::_mm256_loadu_ps(x.as_ptr())
    }
}

/// `Σ a·b`: eight-float vectors into two sums (AVX2/FMA, which every build targets on
/// x86-64), the tail past a multiple of 8 added last.
#[inline]
fn dot<T: Elem>(a: &[f32], b: &[T]) -> f32 {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        use std::arch::x86_64::*;
        let n = a.len().min(b.len());
        let body = n - n % 8;
        // SAFETY: every load reads 8 floats below `body ≤ len` of both slices; the features
        // are enabled for the whole build (cfg above).
        let mut s = unsafe {
            let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = 0;
            while i + 16 <= body {
                s0 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i)),
                    T::load8(b.as_ptr().add(i)),
                    s0,
                );
                s1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                    T::load8(b.as_ptr().add(i + 8)),
                    s1,
                );
                i += 16;
            }
            if i < body {
                s0 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i)),
                    T::load8(b.as_ptr().add(i)),
                    s0,
                );
            }
            let v = _mm256_add_ps(s0, s1);
            let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)))
        };
        for i in body..n {
            s += a[i] * b[i].get();
        }
        s
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    {
        let mut acc = [0f32; L];
        let (ac, bc) = (a.chunks_exact(L), b.chunks_exact(L));
        let tail: f32 = ac
            .remainder()
            .iter()
            .zip(bc.remainder())
            .map(|(x, y)| x * y.get())
            .sum();
        for (x, y) in ac.zip(bc) {
            for i in 0..L {
                acc[i] += x[i] * y[i].get();
            }
        }
        crate::kernels::softmax::fold(acc) + tail
    }
}

/// `len` rows of `d` floats, `stride` apart (a sequence's cached keys or values of one head).
struct Rows<'a, T> {
    data: &'a [T],
    stride: usize,
    d: usize,
}

impl<T: Elem> Rows<'_, T> {
    fn row(&self, j: usize) -> &[T] {
        &self.data[j * self.stride..j * self.stride + self.d]
    }

    fn len(&self) -> usize {
        (self.data.len() - self.d) / self.stride + 1
    }

    /// `out[j] = q · row_j · scale`.
    fn dots(&self, q: &[f32], scale: f32, out: &mut [f32]) {
        let mut j = 0;
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        if self.d.is_multiple_of(8) {
            while j + 8 <= self.len() {
                // SAFETY: rows j..j+8 lie in `data` (checked by `row`), `d` floats each, and
                // `q` holds `d`; the features are enabled for the whole build.
                unsafe {
                    let _ = self.row(j + 7);
                    dots8(
                        q.as_ptr(),
                        self.data.as_ptr().add(j * self.stride),
                        self.stride,
                        self.d,
                        scale,
                        out[j..j + 8].as_mut_ptr(),
                    );
                }
                j += 8;
            }
        }
        for (j, o) in out.iter_mut().enumerate().skip(j) {
            *o = dot(q, self.row(j)) * scale;
        }
    }

    /// `out = Σ_j p[j] · row_j`.
    fn weighted_sum(&self, p: &[f32], out: &mut [f32]) {
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        if self.d.is_multiple_of(8) {
            let _ = self.row(p.len() - 1);
            for c in (0..self.d).step_by(64) {
                let width = 64.min(self.d - c);
                // SAFETY: rows 0..p.len() lie in `data` (checked above), `out` holds `d`.
                unsafe {
                    weighted_sum_64(
                        p,
                        self.data.as_ptr().add(c),
                        self.stride,
                        width,
                        out[c..].as_mut_ptr(),
                    );
                }
            }
            return;
        }
        out.fill(0.0);
        for (j, &pj) in p.iter().enumerate() {
            for (o, x) in out.iter_mut().zip(self.row(j)) {
                *o += pj * x.get();
            }
        }
    }
}

/// Eight rows' dot products with `q` (`d` a multiple of 8), each in its own register, then
/// reduced together into one vector of eight scores.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
#[inline]
unsafe fn dots8<T: Elem>(
    q: *const f32,
    rows: *const T,
    stride: usize,
    d: usize,
    scale: f32,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); 8];
    for c in (0..d).step_by(8) {
        let qv = _mm256_loadu_ps(q.add(c));
        for (j, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(qv, T::load8(rows.add(j * stride + c)), *a);
        }
    }
    let t0 = _mm256_hadd_ps(acc[0], acc[1]);
    let t1 = _mm256_hadd_ps(acc[2], acc[3]);
    let t2 = _mm256_hadd_ps(acc[4], acc[5]);
    let t3 = _mm256_hadd_ps(acc[6], acc[7]);
    let u0 = _mm256_hadd_ps(t0, t1);
    let u1 = _mm256_hadd_ps(t2, t3);
    // u0 = rows 0-3 summed over each 128-bit half, u1 the same for rows 4-7.
    let s = _mm256_add_ps(
        _mm256_permute2f128_ps(u0, u1, 0x20),
        _mm256_permute2f128_ps(u0, u1, 0x31),
    );
    _mm256_storeu_ps(out, _mm256_mul_ps(s, _mm256_set1_ps(scale)));
}

/// `out[..8·V] = Σ_j p[j] · row_j[..8·V]`, the `V ≤ 8` vectors of sums held in registers
/// for the whole pass over the rows.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
#[inline]
unsafe fn weighted_sum_vecs<T: Elem, const V: usize>(
    p: &[f32],
    rows: *const T,
    stride: usize,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); V];
    for (j, &pj) in p.iter().enumerate() {
        let pv = _mm256_set1_ps(pj);
        let row = rows.add(j * stride);
        for (v, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(pv, T::load8(row.add(8 * v)), *a);
        }
    }
    for (v, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.add(8 * v), *a);
    }
}

/// [`weighted_sum_vecs`] for `width` (a multiple of 8, at most 64) floats.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
unsafe fn weighted_sum_64<T: Elem>(
    p: &[f32],
    rows: *const T,
    stride: usize,
    width: usize,
    out: *mut f32,
) {
    match width / 8 {
        8 => weighted_sum_vecs::<T, 8>(p, rows, stride, out),
        7 => weighted_sum_vecs::<T, 7>(p, rows, stride, out),
        6 => weighted_sum_vecs::<T, 6>(p, rows, stride, out),
        5 => weighted_sum_vecs::<T, 5>(p, rows, stride, out),
        4 => weighted_sum_vecs::<T, 4>(p, rows, stride, out),
        3 => weighted_sum_vecs::<T, 3>(p, rows, stride, out),
        2 => weighted_sum_vecs::<T, 2>(p, rows, stride, out),
        _ => weighted_sum_vecs::<T, 1>(p, rows, stride, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, D};

    /// Against softmax(q kᵀ/√d) v by tensor ops, with grouped heads, two rows with different
    /// spans of a shared cache, a head size that is not a multiple of the lanes, and a cache
    /// in f32 or f16 (the reference then uses the same rounded values, widened).
    #[test]
    fn matches_attention_by_tensor_ops() {
        let dev = Device::Cpu;
        for (heads, kv_heads, d, dtype) in [
            (8, 2, 64, DType::F32),
            (4, 4, 40, DType::F32),
            (8, 2, 128, DType::F16),
            (4, 4, 40, DType::F16),
        ] {
            let (b, t) = (2, 37);
            let q = Tensor::randn(0f32, 1.0, (b, heads, 1, d), &dev).unwrap();
            let cached = |t: Tensor| t.to_dtype(dtype).unwrap();
            let k = cached(Tensor::randn(0f32, 1.0, (b, kv_heads, t, d), &dev).unwrap());
            let v = cached(Tensor::randn(0f32, 1.0, (b, kv_heads, t, d), &dev).unwrap());
            let spans = [(0, t), (5, 20)];
            let scale = (d as f32).powf(-0.5);
            let got = decode_attention(&q, &k, &v, &spans, kv_heads, (scale, None)).unwrap();
            let (k, v) = (
                k.to_dtype(DType::F32).unwrap(),
                v.to_dtype(DType::F32).unwrap(),
            );
            let rep = heads / kv_heads;
            for (r, &(start, len)) in spans.iter().enumerate() {
                let pick = |x: &Tensor| {
                    x.narrow(0, r, 1)
                        .unwrap()
                        .narrow(2, start, len)
                        .unwrap()
                        .repeat_interleave_heads(rep)
                };
                let (kr, vr) = (pick(&k), pick(&v));
                let qr = q.narrow(0, r, 1).unwrap();
                let scores = (qr.matmul(&kr.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
                let probs = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
                let want = probs.matmul(&vr).unwrap();
                let err =
                    kollava_testkit::max_abs_diff_tensors(&got.narrow(0, r, 1).unwrap(), &want);
                assert!(
                    err < 1e-5,
                    "{heads}/{kv_heads} heads, d {d}, {dtype:?}, row {r}: {err}"
                );
            }
            assert_eq!(got.dtype(), DType::F32);
        }
    }

    trait RepeatHeads {
        fn repeat_interleave_heads(&self, rep: usize) -> Tensor;
    }
    impl RepeatHeads for Tensor {
        /// `(1, kv, t, d) → (1, kv·rep, t, d)`, each key/value head repeated `rep` times.
        fn repeat_interleave_heads(&self, rep: usize) -> Tensor {
            let (b, kv, t, d) = self.dims4().unwrap();
            self.unsqueeze(2)
                .unwrap()
                .broadcast_as((b, kv, rep, t, d))
                .unwrap()
                .reshape((b, kv * rep, t, d))
                .unwrap()
        }
    }

    /// With ALiBi (MPT, one key/value head per query head): each head's slope times the
    /// key's distance from the query (the span's last slot) joins the scaled scores, as the
    /// tensor ops add it.
    #[test]
    fn alibi_matches_attention_by_tensor_ops() {
        let dev = Device::Cpu;
        let (b, heads, d, t) = (2, 4, 32, 29);
        let slopes = [0.5f32, 0.25, 0.125, 0.0625];
        let q = Tensor::randn(0f32, 1.0, (b, heads, 1, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, heads, t, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, heads, t, d), &dev).unwrap();
        let spans = [(0, t), (9, 20)];
        let scale = 0.2f32;
        let got = decode_attention(&q, &k, &v, &spans, heads, (scale, Some(&slopes))).unwrap();
        for (r, &(start, len)) in spans.iter().enumerate() {
            let pick = |x: &Tensor| x.narrow(0, r, 1).unwrap().narrow(2, start, len).unwrap();
            let dist: Vec<f32> = (0..len).map(|j| j as f32 - (len - 1) as f32).collect();
            let bias = Tensor::from_vec(dist, (1, 1, 1, len), &dev)
                .unwrap()
                .broadcast_mul(&Tensor::from_slice(&slopes, (1, heads, 1, 1), &dev).unwrap())
                .unwrap();
            let want = crate::layers::attention(
                &q.narrow(0, r, 1).unwrap(),
                &pick(&k),
                &pick(&v),
                Some(&bias),
                scale as f64,
            )
            .unwrap();
            let err = kollava_testkit::max_abs_diff_tensors(&got.narrow(0, r, 1).unwrap(), &want);
            assert!(err < 1e-5, "row {r}: {err}");
        }
        let plain = decode_attention(&q, &k, &v, &spans, heads, (scale, None)).unwrap();
        assert!(kollava_testkit::max_abs_diff_tensors(&plain, &got) > 1e-3);
    }
}
