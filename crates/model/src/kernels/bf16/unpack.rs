//! `Q4_K` and `Q6_K` blocks decoded straight to the bf16 pairs of the GEMM's panels
//! ([`super::matmul_ggml`]), sixteen values at a time. A prefill through that GEMM unpacks
//! every weight of the model once per forward; with candle's scalar decoders, then a
//! rounding pass, that was most of what a short prefill cost (about 400 ms a forward on a
//! 1.1B `Q4_K_M` model, 2 threads). The values are the bits candle's `to_float` computes
//! (the same f32 products and differences in the same order, no fused multiply-add),
//! rounded to nearest even as [`super::round_pairs`] rounds them.

/// Values per k-quant block.
const QK: usize = 256;
const Q4K_BYTES: usize = 144;
const Q6K_BYTES: usize = 210;

/// Decodes whole blocks (bytes) into bf16 pairs (two values a `u32`, the first in the low
/// half).
pub(super) type PairDecoder = fn(&[u8], &mut [u32]);

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Our decoder for `dtype`, where this CPU runs it (AVX512-BF16 and -BW: the CPUs whose
/// bf16 kernels take the GEMM).
pub(super) fn decoder(dtype: candle_core::quantized::GgmlDType) -> Option<PairDecoder> {
    use candle_core::quantized::GgmlDType;
    if !available() {
        return None;
    }
    match dtype {
        GgmlDType::Q4K => Some(q4k),
        GgmlDType::Q6K => Some(q6k),
        _ => None,
    }
}

fn available() -> bool {
    let c = crate::kernels::cpu::cpu();
    c.avx512bf16 && c.avx512bw && c.avx512vl
}

/// Whole `Q4_K` blocks (`bytes`) into `out` (128 pairs a block).
fn q4k(bytes: &[u8], out: &mut [u32]) {
    for (blk, y) in bytes
        .chunks_exact(Q4K_BYTES)
        .zip(out.chunks_exact_mut(QK / 2))
    {
        let sm = scales_mins(blk[4..16].try_into().unwrap());
        let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
        // SAFETY: `decoder` checked the CPU; `blk` holds 144 bytes and `y` 128 pairs.
        unsafe { q4k_block(blk[16..].as_ptr(), &sm, d, dmin, y.as_mut_ptr()) };
    }
}

/// Whole `Q6_K` blocks (`bytes`) into `out`.
fn q6k(bytes: &[u8], out: &mut [u32]) {
    for (blk, y) in bytes
        .chunks_exact(Q6K_BYTES)
        .zip(out.chunks_exact_mut(QK / 2))
    {
        let d = f16_at(blk, 208);
        let mut scales = [0f32; 16];
        for (s, &b) in scales.iter_mut().zip(&blk[192..208]) {
            *s = d * b as i8 as f32;
        }
        // SAFETY: `decoder` checked the CPU; `blk` holds 210 bytes and `y` 128 pairs.
        unsafe { q6k_block(blk.as_ptr(), &scales, y.as_mut_ptr()) };
    }
}

/// A `Q4_K` block's eight 6-bit scales (bytes 0..8) and eight 6-bit mins (8..16), as
/// ggml's `get_scale_min_k4` reads them.
fn scales_mins(p: &[u8; 12]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for j in 0..4 {
        out[j] = p[j] & 63;
        out[8 + j] = p[j + 4] & 63;
        out[4 + j] = (p[j + 8] & 0xF) | ((p[j] >> 6) << 4);
        out[12 + j] = (p[j + 8] >> 4) | ((p[j + 4] >> 6) << 4);
    }
    out
}

/// `y[64j + l] = d·sc[2j]·(q[32j + l] & 15) − dmin·m[2j]` and, from the high nibbles, the
/// next 32 with `2j + 1` (`sm`: the eight scales, then the eight mins). A sub-block's
/// sixteen possible values are computed once, in f32 as candle computes each, rounded, and
/// looked up by nibble (`vpermw`), 32 values an instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vl")]
unsafe fn q4k_block(qs: *const u8, sm: &[u8; 16], d: f32, dmin: f32, y: *mut u32) {
    use std::arch::x86_64::*;
    // d·sc and dmin·m for the eight sub-blocks, as candle rounds them.
    let factors = _mm512_setr_ps(
        d, d, d, d, d, d, d, d, dmin, dmin, dmin, dmin, dmin, dmin, dmin, dmin,
    );
    let sm = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(sm.as_ptr().cast())));
    let mut scaled = [0f32; 16];
    _mm512_storeu_ps(scaled.as_mut_ptr(), _mm512_mul_ps(factors, sm));
    let iota = _mm512_setr_ps(
        0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.,
    );
    let low = _mm512_set1_epi16(0xF);
    for j in 0..4 {
        let q = _mm512_cvtepu8_epi16(_mm256_loadu_si256(qs.add(32 * j).cast()));
        let nibbles = [_mm512_and_si512(q, low), _mm512_srli_epi16(q, 4)];
        for (nib, idx) in nibbles.into_iter().enumerate() {
            let s = 2 * j + nib;
            let (dv, mv) = (_mm512_set1_ps(scaled[s]), _mm512_set1_ps(scaled[8 + s]));
            let values = _mm512_sub_ps(_mm512_mul_ps(dv, iota), mv);
            let lut: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(values));
            let out = _mm512_permutexvar_epi16(idx, _mm512_castsi256_si512(lut));
            _mm512_storeu_si512(y.add(32 * j + 16 * nib).cast(), out);
        }
    }
}

/// Each half block of 128 values: 64 low-bit bytes `ql`, 32 high-bit bytes `qh`, eight
/// scales; value `32c + l` (`c` < 4) takes a nibble of `ql[l + 32·(c & 1)]` (high for
/// `c` ≥ 2) and bits `2c..2c+2` of `qh[l]`, minus 32, times `d·scale[c·2 + l/16]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
unsafe fn q6k_block(blk: *const u8, scales: &[f32; 16], y: *mut u32) {
    use std::arch::x86_64::*;
    let (low, two, bias) = (
        _mm512_set1_epi32(0xF),
        _mm512_set1_epi32(3),
        _mm512_set1_epi32(32),
    );
    for half in 0..2 {
        let (ql, qh) = (blk.add(64 * half), blk.add(128 + 32 * half));
        for g in 0..2 {
            let a = _mm512_cvtepu8_epi32(_mm_loadu_si128(ql.add(16 * g).cast()));
            let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(ql.add(32 + 16 * g).cast()));
            let h = _mm512_cvtepu8_epi32(_mm_loadu_si128(qh.add(16 * g).cast()));
            let nibbles = [
                _mm512_and_si512(a, low),
                _mm512_and_si512(b, low),
                _mm512_srli_epi32(a, 4),
                _mm512_srli_epi32(b, 4),
            ];
            for (c, nib) in nibbles.into_iter().enumerate() {
                let hb =
                    _mm512_and_si512(_mm512_srl_epi32(h, _mm_cvtsi32_si128(2 * c as i32)), two);
                let q = _mm512_sub_epi32(_mm512_or_si512(nib, _mm512_slli_epi32(hb, 4)), bias);
                let s = _mm512_set1_ps(scales[8 * half + 2 * c + g]);
                let out = _mm512_mul_ps(s, _mm512_cvtepi32_ps(q));
                put(y, 128 * half + 32 * c + 16 * g, out);
            }
        }
    }
}

/// Sixteen values, value `at` on, as bf16 pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
unsafe fn put(y: *mut u32, at: usize, v: std::arch::x86_64::__m512) {
    use std::arch::x86_64::*;
    let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
    _mm256_storeu_si256(y.add(at / 2).cast(), b);
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn q4k_block(_: *const u8, _: &[u8; 16], _: f32, _: f32, _: *mut u32) {
    unreachable!("the decoders are only chosen where available() holds")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn q6k_block(_: *const u8, _: &[f32; 16], _: *mut u32) {
    unreachable!("the decoders are only chosen where available() holds")
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// The pairs candle's decoders and our rounding give, on blocks candle's quantizer
    /// wrote.
    #[test]
    fn decodes_as_candle_does() {
        let x = Tensor::randn(0f32, 1.0, (8, 1024), &Device::Cpu).unwrap();
        let x = (x.clone() + x.sqr().unwrap()).unwrap(); // skewed: nonzero mins
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let Some(ours) = super::decoder(dtype) else {
                return;
            };
            let q = QTensor::quantize(&x, dtype).unwrap();
            let values: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want: Vec<u32> = values
                .chunks_exact(2)
                .map(|v| crate::kernels::bf16::pair(v[0], v[1]))
                .collect();
            let mut got = vec![0u32; want.len()];
            ours(&q.data().unwrap(), &mut got);
            assert_eq!(got, want, "{dtype:?}");
        }
    }
}
