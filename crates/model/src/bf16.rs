//! Our bf16 matrix multiply for x86-64 CPUs with AVX512-BF16 (`vdpbf16ps`: 32 bf16 products
//! into 16 f32 sums per instruction, twice the rate of f32 FMAs), used for `--dtype bf16`.
//! Prefill and the vision tower are compute-bound; candle's GEMM has no bf16 path on CPU.
//!
//! The weight `W: (n, k)` is packed once into panels of 32 output rows; within a panel, for
//! each pair of inputs `(2q, 2q+1)`, two 512-bit vectors hold the 32 rows' bf16 pairs, the
//! operand layout `vdpbf16ps` multiplies against a broadcast pair of activations. The
//! activations `x: (m, k)` are rounded to bf16 and interleaved by tiles of `MR` rows.
//!
//! The product runs tile by tile: `MR × 32` outputs stay in 2·MR registers while a block of
//! `KC` input pairs streams by, the panel's block (32 KiB) staying in L1 for every tile and
//! the activations' block in L2 for every panel. Panels are split between threads.

use candle_core::{DType, Result, Tensor};

/// Output rows per panel (two vectors of 16 f32).
const NR: usize = 32;
/// Activation rows per tile: 2·MR accumulators + 3 operands fit the 32 vector registers.
const MR: usize = 12;
/// Input pairs per block.
const KC: usize = 256;
/// Up to this many rows (a batch of decoding sequences) each row is a matrix-vector product
/// summed in exactly the order of a single row's, so that an answer does not depend on what
/// it was batched with; the panel still streams from memory once for all rows.
const GEMV_ROWS: usize = 64;
/// Input pairs per block of the batched matrix-vector product (16 KiB of panel, in L1).
const GEMV_QB: usize = 128;

/// Whether this CPU runs the kernels.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `f32 → bf16`, round to nearest even (as PyTorch and llama.cpp convert).
fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    if x.is_nan() {
        return (b >> 16) | 0x40;
    }
    (b + 0x7fff + ((b >> 16) & 1)) >> 16
}

fn pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) | (bf16_bits(hi) << 16)
}

/// A weight matrix packed for the kernels.
#[derive(Debug)]
pub struct PackedBf16 {
    n: usize,
    k: usize,
    /// Input pairs (`k` rounded up to even, halved).
    pairs: usize,
    panels: usize,
    /// `panels × pairs × NR` bf16 pairs.
    data: Vec<u32>,
}

impl PackedBf16 {
    /// Packs `w: (n, k)` (any float dtype), rounding to bf16.
    pub fn pack(w: &Tensor) -> Result<Self> {
        let (n, k) = w.dims2()?;
        let w = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let pairs = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u32; panels * pairs * NR];
        let at = |r: usize, c: usize| if r < n && c < k { w[r * k + c] } else { 0.0 };
        for p in 0..panels {
            for q in 0..pairs {
                let dst = &mut data[(p * pairs + q) * NR..(p * pairs + q + 1) * NR];
                for (lane, d) in dst.iter_mut().enumerate() {
                    let r = p * NR + lane;
                    *d = pair(at(r, 2 * q), at(r, 2 * q + 1));
                }
            }
        }
        Ok(Self {
            n,
            k,
            pairs,
            panels,
            data,
        })
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    pub fn stored_bytes(&self) -> usize {
        self.data.len() * 4
    }

    /// `x: (…, k)` → `x Wᵀ: (…, n)` in f32.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let k = dims.pop().unwrap_or(0);
        if k != self.k {
            candle_core::bail!(
                "bf16 matmul: input of width {k} for a weight of width {}",
                self.k
            );
        }
        let m: usize = dims.iter().product();
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("bf16 matmul: the kernels run on CPU tensors");
        };
        let xs = &cpu.as_slice::<f32>()?[layout.start_offset()..layout.start_offset() + m * k];
        let ldc = self.panels * NR;
        // Decoding (a row or a batch of sequences): row by row, see `GEMV_ROWS`.
        let r = if m <= GEMV_ROWS { 1 } else { MR };
        let tiles = m.div_ceil(r);
        let mut c = vec![0f32; tiles * r * ldc];
        if r == 1 {
            self.run::<1>(&self.pack_rows::<1>(xs, m, k), tiles, &mut c, ldc);
        } else {
            self.run::<MR>(&self.pack_rows::<MR>(xs, m, k), tiles, &mut c, ldc);
        }
        drop(storage);
        let mut out = if ldc == self.n {
            c.truncate(m * ldc);
            c
        } else {
            (0..m)
                .flat_map(|r| c[r * ldc..r * ldc + self.n].iter().copied())
                .collect()
        };
        out.truncate(m * self.n);
        dims.push(self.n);
        Tensor::from_vec(out, dims, x.device())
    }

    /// Activations `(m, k)` as bf16 pairs, tile-interleaved: `[tile][pair][row in tile]`.
    fn pack_rows<const R: usize>(&self, xs: &[f32], m: usize, k: usize) -> Vec<u32> {
        use rayon::prelude::*;
        let pairs = self.pairs;
        let mut xp = vec![0u32; m.div_ceil(R) * pairs * R];
        // Tile by tile, in parallel: prefill rounds millions of activations per product.
        xp.par_chunks_mut(pairs * R)
            .enumerate()
            .for_each(|(t, tile)| {
                for j in 0..R.min(m - t * R) {
                    let v = &xs[(t * R + j) * k..(t * R + j + 1) * k];
                    for q in 0..pairs {
                        let hi = if 2 * q + 1 < k { v[2 * q + 1] } else { 0.0 };
                        tile[q * R + j] = pair(v[2 * q], hi);
                    }
                }
            });
        xp
    }

    /// All tiles against all panels, ranges of panels handed to candle's persistent worker
    /// threads (which spin between products instead of sleeping: a decoded token is ~150
    /// products of a millisecond or less).
    fn run<const R: usize>(&self, xp: &[u32], tiles: usize, c: &mut [f32], ldc: usize) {
        let c_addr = c.as_mut_ptr() as usize;
        let work = |panels: std::ops::Range<usize>| {
            if R == 1 {
                // Decoding: each panel streams once, start to end, with independent sums.
                for p in panels {
                    let w = &self.data[p * self.pairs * NR..(p + 1) * self.pairs * NR];
                    // SAFETY: as below; `w` holds the panel's `pairs` pairs, `xp` the
                    // `tiles` rows of `pairs` pairs each.
                    unsafe {
                        let cp = (c_addr as *mut f32).add(p * NR);
                        if tiles == 1 {
                            gemv_panel(xp.as_ptr(), w.as_ptr(), self.pairs, cp);
                        } else {
                            gemv_rows_panel(xp.as_ptr(), tiles, w.as_ptr(), self.pairs, cp, ldc);
                        }
                    }
                }
                return;
            }
            for q0 in (0..self.pairs).step_by(KC) {
                let kc = KC.min(self.pairs - q0);
                for p in panels.clone() {
                    let w = &self.data[(p * self.pairs + q0) * NR..];
                    for t in 0..tiles {
                        let x = &xp[(t * self.pairs + q0) * R..];
                        // SAFETY: `available()` was checked when the layer chose this kernel;
                        // the slices hold `kc` pairs from here; each (tile, panel) block of
                        // `c` is written by the one thread that took the panel.
                        unsafe {
                            let cp = (c_addr as *mut f32).add(t * R * ldc + p * NR);
                            tile::<R>(x.as_ptr(), w.as_ptr(), kc, cp, ldc, q0 > 0);
                        }
                    }
                }
            }
        };
        candle_core::utils::barrier_pool().execute_chunked(self.panels, work);
    }
}

/// One `R × 32` block of `c` (row stride `ldc`) += (or =) `kc` pairs of a tile times a
/// panel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile<const R: usize>(
    x: *const u32,
    w: *const u32,
    kc: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    if accumulate {
        for (j, a) in acc.iter_mut().enumerate() {
            a[0] = _mm512_loadu_ps(c.add(j * ldc));
            a[1] = _mm512_loadu_ps(c.add(j * ldc + 16));
        }
    }
    for q in 0..kc {
        let w0: __m512bh = std::mem::transmute(_mm512_loadu_epi32(w.add(q * NR) as *const i32));
        let w1: __m512bh =
            std::mem::transmute(_mm512_loadu_epi32(w.add(q * NR + 16) as *const i32));
        for (j, a) in acc.iter_mut().enumerate() {
            let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(*x.add(q * R + j) as i32));
            a[0] = _mm512_dpbf16_ps(a[0], w0, b);
            a[1] = _mm512_dpbf16_ps(a[1], w1, b);
        }
    }
    for (j, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(c.add(j * ldc), a[0]);
        _mm512_storeu_ps(c.add(j * ldc + 16), a[1]);
    }
}

/// One panel times one row of activations (`pairs` pairs) into 32 outputs: four pairs per
/// step into four independent sums per half, so loads and products overlap.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn gemv_panel(x: *const u32, w: *const u32, pairs: usize, c: *mut f32) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; 4];
    let load = |q: usize, half: usize| -> __m512bh {
        std::mem::transmute(_mm512_loadu_epi32(w.add(q * NR + 16 * half) as *const i32))
    };
    let bcast = |q: usize| -> __m512bh { std::mem::transmute(_mm512_set1_epi32(*x.add(q) as i32)) };
    let mut q = 0;
    while q + 4 <= pairs {
        for (u, a) in acc.iter_mut().enumerate() {
            let b = bcast(q + u);
            a[0] = _mm512_dpbf16_ps(a[0], load(q + u, 0), b);
            a[1] = _mm512_dpbf16_ps(a[1], load(q + u, 1), b);
        }
        q += 4;
    }
    while q < pairs {
        let b = bcast(q);
        acc[0][0] = _mm512_dpbf16_ps(acc[0][0], load(q, 0), b);
        acc[0][1] = _mm512_dpbf16_ps(acc[0][1], load(q, 1), b);
        q += 1;
    }
    let [a, b, c2, d] = acc;
    for (half, out) in [(0, c), (1, c.add(16))] {
        let s = _mm512_add_ps(
            _mm512_add_ps(a[half], b[half]),
            _mm512_add_ps(c2[half], d[half]),
        );
        _mm512_storeu_ps(out, s);
    }
}

/// [`gemv_panel`] for `rows` rows (row `j`'s pairs at `x + j·pairs`, its 32 outputs at
/// `c + j·ldc`), bit for bit the same sums: each row keeps its four pairs of accumulators
/// across blocks of [`GEMV_QB`] pairs, so the panel block is read from memory once and
/// from L1 for the other rows; rows go three at a time, sharing each loaded weight vector.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn gemv_rows_panel(
    x: *const u32,
    rows: usize,
    w: *const u32,
    pairs: usize,
    c: *mut f32,
    ldc: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(rows <= GEMV_ROWS);
    let mut state = [[[_mm512_setzero_ps(); 2]; 4]; GEMV_ROWS];
    for q0 in (0..pairs).step_by(GEMV_QB) {
        let end = (q0 + GEMV_QB).min(pairs);
        let mut j = 0;
        while j + 3 <= rows {
            gemv_rows_block::<3>(x, j, w, pairs, q0, end, &mut state);
            j += 3;
        }
        while j < rows {
            gemv_rows_block::<1>(x, j, w, pairs, q0, end, &mut state);
            j += 1;
        }
    }
    for (j, [a, b, c2, d]) in state.iter().enumerate().take(rows) {
        for half in 0..2 {
            let s = _mm512_add_ps(
                _mm512_add_ps(a[half], b[half]),
                _mm512_add_ps(c2[half], d[half]),
            );
            _mm512_storeu_ps(c.add(j * ldc + 16 * half), s);
        }
    }
}

/// Pairs `q0..end` of the panel into the accumulators of rows `j0..j0 + G`, each row in
/// [`gemv_panel`]'s order (groups of four pairs into four sums, the tail into the first).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn gemv_rows_block<const G: usize>(
    x: *const u32,
    j0: usize,
    w: *const u32,
    pairs: usize,
    q0: usize,
    end: usize,
    state: &mut [[[std::arch::x86_64::__m512; 2]; 4]; GEMV_ROWS],
) {
    use std::arch::x86_64::*;
    let load = |q: usize, half: usize| -> __m512bh {
        std::mem::transmute(_mm512_loadu_epi32(w.add(q * NR + 16 * half) as *const i32))
    };
    let bcast = |g: usize, q: usize| -> __m512bh {
        std::mem::transmute(_mm512_set1_epi32(*x.add((j0 + g) * pairs + q) as i32))
    };
    let mut acc = [[[_mm512_setzero_ps(); 2]; 4]; G];
    for (g, a) in acc.iter_mut().enumerate() {
        *a = state[j0 + g];
    }
    let mut q = q0;
    while q + 4 <= end {
        for u in 0..4 {
            let (w0, w1) = (load(q + u, 0), load(q + u, 1));
            for (g, a) in acc.iter_mut().enumerate() {
                let b = bcast(g, q + u);
                a[u][0] = _mm512_dpbf16_ps(a[u][0], w0, b);
                a[u][1] = _mm512_dpbf16_ps(a[u][1], w1, b);
            }
        }
        q += 4;
    }
    // Only the last block has a tail (blocks are multiples of four pairs).
    while q < end {
        let (w0, w1) = (load(q, 0), load(q, 1));
        for (g, a) in acc.iter_mut().enumerate() {
            let b = bcast(g, q);
            a[0][0] = _mm512_dpbf16_ps(a[0][0], w0, b);
            a[0][1] = _mm512_dpbf16_ps(a[0][1], w1, b);
        }
        q += 1;
    }
    for (g, a) in acc.iter().enumerate() {
        state[j0 + g] = *a;
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn gemv_rows_panel(_: *const u32, _: usize, _: *const u32, _: usize, _: *mut f32, _: usize) {
    unreachable!("the bf16 kernels are only chosen where available() holds")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn gemv_panel(_: *const u32, _: *const u32, _: usize, _: *mut f32) {
    unreachable!("the bf16 kernels are only chosen where available() holds")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile<const R: usize>(
    _: *const u32,
    _: *const u32,
    _: usize,
    _: *mut f32,
    _: usize,
    _: bool,
) {
    unreachable!("the bf16 kernels are only chosen where available() holds")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against an f32 product of the bf16-rounded operands, on shapes with every edge: rows
    /// not a multiple of the panel, odd widths, several blocks, a partial tile.
    #[test]
    fn matches_f32_on_rounded_operands() {
        if !available() {
            eprintln!("skipped: no AVX512-BF16 on this CPU");
            return;
        }
        let d = Device::Cpu;
        for (m, k, n) in [
            (1, 64, 32),
            (13, 1031, 45),
            (30, 600, 96),
            (1, 5, 3),
            (70, 600, 40),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &d).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &d).unwrap();
            let got = PackedBf16::pack(&w).unwrap().matmul(&x).unwrap();
            let round = |t: &Tensor| {
                t.to_dtype(DType::BF16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
            };
            let want = round(&x).matmul(&round(&w).t().unwrap()).unwrap();
            let err = kollava_testkit::max_abs_diff_tensors(&got, &want);
            let scale = kollava_testkit::max_abs_diff_tensors(&want, &want.zeros_like().unwrap());
            assert!(
                err <= 1e-4 * scale.max(1.0),
                "{m}x{k}x{n}: {err} (scale {scale})"
            );
        }
    }

    /// A batch of decoding rows gets, bit for bit, what each row gets alone (a server's
    /// greedy answer must not depend on its batch), and the prefill tiles stay close.
    #[test]
    fn batched_rows_equal_rows_alone_bit_for_bit() {
        if !available() {
            eprintln!("skipped: no AVX512-BF16 on this CPU");
            return;
        }
        let d = Device::Cpu;
        for (m, k, n) in [
            (2, 64, 32),
            (5, 1031, 45),
            (16, 600, 96),
            (GEMV_ROWS, 300, 64),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &d).unwrap();
            let w = PackedBf16::pack(&Tensor::randn(0f32, 1.0, (n, k), &d).unwrap()).unwrap();
            let batched: Vec<Vec<f32>> = w.matmul(&x).unwrap().to_vec2().unwrap();
            for (r, row) in batched.iter().enumerate() {
                let alone: Vec<Vec<f32>> = w
                    .matmul(&x.narrow(0, r, 1).unwrap())
                    .unwrap()
                    .to_vec2()
                    .unwrap();
                assert_eq!(row, &alone[0], "{m}x{k}x{n}: row {r}");
            }
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16_bits(-2.5), half::bf16::from_f32(-2.5).to_bits() as u32);
    }
}
