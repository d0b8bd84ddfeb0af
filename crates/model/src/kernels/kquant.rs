//! Our matrix-vector products for ggml's k-quant weights (`Q4_K`, `Q6_K`: what a Q4_K_M
//! GGUF stores), for decoding on x86-64 CPUs: with AVX512-VNNI, or with AVX2 (the same
//! arithmetic on 256-bit vectors; `kernels()` picks).
//!
//! Decoding is bound by memory bandwidth: each token streams every weight once. So the
//! kernels read the file's blocks as they are (144 bytes per 256 weights for `Q4_K`, 210 for
//! `Q6_K`), with no expanded copy, and keep the work per block small enough that two cores
//! keep up with memory. The activations are quantized once per product to ggml's `Q8_K`
//! (8-bit values with one f32 scale per 256 and sums per 16), as llama.cpp does, so that a
//! block's dot product is integer arithmetic: `vpdpbusd` multiplies 64 unsigned 4- or 6-bit
//! weights by 64 signed activations per instruction, a sub-block's scale is applied to its
//! integer sums, and the weights' offsets (`Q4_K`'s mins, `Q6_K`'s −32) are corrected once
//! per sub-block with the activations' precomputed sums.
//!
//! Chunks of weight rows are split between threads. Tiles of up to eight activation rows
//! (a batch of decoding sequences) share each decoded weight block, and each row is summed
//! in exactly the order it would be alone, so that a sequence's numbers never depend on
//! what it was batched with.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Result, Tensor};

/// Values per super-block.
const QK: usize = 256;
/// Bytes per `Q4_K` block: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 of nibbles.
const Q4K_BYTES: usize = 144;
/// Bytes per `Q6_K` block: 128 low nibbles, 64 of high bit pairs, 16 i8 scales, f16 d.
const Q6K_BYTES: usize = 210;
/// Activation rows the AVX512 kernels take (decoding, batched decoding). There, every
/// longer step goes to the tiled bf16 GEMM ([`crate::kernels::bf16::matmul_ggml`]), the kernel of
/// every prefill (see [`max_rows`]). With AVX2 the integer kernels run prefill too.
pub const MAX_ROWS: usize = 16;

/// A kernel set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernels {
    /// 512-bit vectors, `vpdpwssd` for the scaled sums.
    Avx512Vnni,
    /// 256-bit vectors.
    Avx2,
}

/// Every kernel set this CPU runs, fastest first.
fn supported() -> Vec<Kernels> {
    let c = crate::kernels::cpu::cpu();
    let mut all = Vec::new();
    if c.avx512bw && c.avx512vnni {
        all.push(Kernels::Avx512Vnni);
    }
    if c.avx2_fma {
        all.push(Kernels::Avx2);
    }
    all
}

/// The fastest kernel set this CPU runs (`KOLLAVA_KERNELS=avx2`: the AVX2 one where the
/// CPU also has AVX512, as [`crate::kernels::bf16::kernels`]).
fn kernels() -> Option<Kernels> {
    static KERNELS: std::sync::OnceLock<Option<Kernels>> = std::sync::OnceLock::new();
    *KERNELS.get_or_init(|| {
        let all = supported();
        if crate::kernels::cpu::cpu().request == crate::kernels::cpu::Request::Avx2 {
            return all.into_iter().find(|&k| k == Kernels::Avx2);
        }
        all.first().copied()
    })
}

/// Whether this CPU runs the kernels.
pub fn available() -> bool {
    kernels().is_some()
}

/// Activation rows up to which [`try_matmul`] multiplies on this CPU: [`MAX_ROWS`] with
/// AVX512; any number with AVX2, where `vpmaddubsw`'s 32 products per
/// instruction beat the f32 FMAs of a GEMM over dequantized panels (8 per instruction), as
/// llama.cpp's quantized prefill does; 0 without kernels.
///
/// With AVX512 every prefill step (at least `MAX_ROWS + 1` positions, see
/// [`crate::layers::Linear::steady_rows`]) goes to the bf16 GEMM, however short: a
/// conversation's follow-up prefilled after its cached history then gets the numbers a cold
/// prefill of the whole conversation computes, and so the same greedy answer. Through these
/// integer kernels a short step would be sooner (`vpdpbusd` sums twice the products of
/// `vdpbf16ps`, and the GEMM unpacks every weight first: a bench-1b `Q4_K_M` follow-up of
/// 31 positions took about 200 ms in groups of 16 rows, 420-460 ms through the GEMM; see
/// BENCHMARKS.md) but would round its activations otherwise (8-bit blocks against bf16).
pub fn max_rows() -> usize {
    kernels().map_or(0, rows_limit)
}

/// Activation rows above which a product with a ggml weight these kernels do not take
/// goes to the bf16 GEMM rather than candle's quantized kernels (and a `Q4_K`/`Q6_K` one
/// above [`max_rows`]): [`MAX_ROWS`] with the AVX512 kernels; never with AVX2, whose
/// integer kernels take prefill too.
pub fn gemm_above_rows() -> usize {
    match kernels() {
        Some(Kernels::Avx512Vnni) => MAX_ROWS,
        _ => usize::MAX,
    }
}

/// Whether these kernels multiply `w` (any row count up to [`max_rows`]).
pub fn takes(w: &QTensor) -> bool {
    kernels().is_some()
        && matches!(w.dtype(), GgmlDType::Q4K | GgmlDType::Q6K)
        && w.shape().dims2().is_ok_and(|(_, k)| k.is_multiple_of(QK))
}

fn rows_limit(kernels: Kernels) -> usize {
    match kernels {
        Kernels::Avx512Vnni => MAX_ROWS,
        Kernels::Avx2 => usize::MAX,
    }
}

/// `x Wᵀ` for `x: (…, k)` with at most [`max_rows`] rows, when this module has a kernel for
/// the weight (a `Q4_K` or `Q6_K` matrix whose width is a multiple of 256 on a CPU that runs
/// the kernels); `None` otherwise, for the caller's general path.
pub fn try_matmul(w: &QTensor, x: &Tensor) -> Result<Option<Tensor>> {
    Ok(try_matmul_many(&[w], x)?.and_then(|mut ys| ys.pop()))
}

/// [`try_matmul`] for several weights that multiply the same input (a layer's q/k/v, its
/// gate/up): the input is quantized once per weight type, and all the products go to the
/// worker threads in one dispatch. `None` unless every weight is for these kernels.
pub fn try_matmul_many(ws: &[&QTensor], x: &Tensor) -> Result<Option<Vec<Tensor>>> {
    match kernels() {
        Some(kernels) => try_matmul_many_with(kernels, ws, x),
        None => Ok(None),
    }
}

fn try_matmul_many_with(
    kernels: Kernels,
    ws: &[&QTensor],
    x: &Tensor,
) -> Result<Option<Vec<Tensor>>> {
    let mut dims = x.dims().to_vec();
    let k = dims.pop().unwrap_or(0);
    let m: usize = dims.iter().product();
    if !x.device().is_cpu() || !k.is_multiple_of(QK) || m == 0 || m > rows_limit(kernels) {
        return Ok(None);
    }
    let mut kinds = Vec::with_capacity(ws.len());
    for w in ws {
        let kind = match w.dtype() {
            GgmlDType::Q4K => Kind::Q4K,
            GgmlDType::Q6K => Kind::Q6K,
            _ => return Ok(None),
        };
        if w.shape().dims2()?.1 != k {
            return Ok(None);
        }
        kinds.push(kind);
    }
    let x = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let quantized = |kind| {
        kinds
            .contains(&kind)
            .then(|| Activations::quantize(&x, m, k, kind, tiled(kernels, m)))
    };
    let (q4k, q6k) = (quantized(Kind::Q4K), quantized(Kind::Q6K));
    let data = ws.iter().map(|w| w.data()).collect::<Result<Vec<_>>>()?;
    let mut outs = Vec::with_capacity(ws.len());
    for ((w, kind), data) in ws.iter().zip(&kinds).zip(&data) {
        let n = w.shape().dims2()?.0;
        if data.len() != n * (k / QK) * kind.block_bytes() {
            candle_core::bail!(
                "{:?} weight of {n}x{k} holds {} bytes",
                w.dtype(),
                data.len()
            );
        }
        outs.push(vec![0f32; m * n]);
    }
    let products: Vec<Product> = kinds
        .iter()
        .zip(&data)
        .zip(&mut outs)
        .map(|((&kind, data), out)| Product {
            kind,
            acts: match kind {
                Kind::Q4K => q4k.as_ref(),
                Kind::Q6K => q6k.as_ref(),
            }
            .expect("quantized for every kind present"),
            w: data,
            n: out.len() / m,
            out: out.as_mut_ptr() as usize,
        })
        .collect();
    matmul(kernels, &products, k, m);
    outs.into_iter()
        .map(|out| {
            let mut dims = dims.clone();
            dims.push(out.len() / m);
            Tensor::from_vec(out, dims, &candle_core::Device::Cpu)
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Q4K,
    Q6K,
}

impl Kind {
    fn block_bytes(self) -> usize {
        match self {
            Kind::Q4K => Q4K_BYTES,
            Kind::Q6K => Q6K_BYTES,
        }
    }
}

/// Activation rows in ggml's `Q8_K`: per block of 256, a scale `d` (value = `d · q`), the
/// 8-bit values and their sums per sub-block, already scaled by `d` (and by the −32 offset
/// for `Q6_K`), in f32. For `Q4_K` the 32-value sub-blocks of each block are
/// stored in the order its nibbles come out of two 64-byte loads: 0, 2, 1, 3, 4, 6, 5, 7.
struct Activations {
    blocks: usize,
    d: Vec<f32>,
    qs: Vec<i8>,
    /// Per block, 16 floats: `Q4_K`, `d · Σ` over each 32-value sub-block (8 used);
    /// `Q6_K`, `32 · d · Σ` over each 16-value sub-block.
    sums: Vec<f32>,
    /// The same sums as integers, unscaled: the AVX2 kernels correct the weights' offsets
    /// in integers, before scaling.
    isums: Vec<i16>,
    /// `d` by block, then by row, the rows padded to whole tiles: a tile's scales for one
    /// block in one load (the AVX2 kernels hold one row per lane).
    d_by_block: Vec<f32>,
    /// Rows rounded up to a whole [`TILE`].
    padded_rows: usize,
    /// For a prefill on AVX2 (see [`tiled`]), the values again, interleaved by tile: per
    /// tile of eight rows, per block, per run of four values, the eight rows' four bytes
    /// side by side (32 bytes, one row per 32-bit lane). Empty otherwise.
    qs_tiled: Vec<i8>,
    /// `isums` interleaved the same way: per tile and block, per pair of sub-blocks, the
    /// eight rows' two sums side by side.
    isums_tiled: Vec<i16>,
}

/// Whether a product of `m` rows runs the tiled kernels: AVX2 and at least a whole tile
/// (they compute the same numbers as the row kernels, a row per lane, with one scale
/// multiply per sub-block and tile instead of one per sub-block and row).
fn tiled(kernels: Kernels, m: usize) -> bool {
    kernels == Kernels::Avx2 && m >= TILE
}

impl Activations {
    fn is_tiled(&self) -> bool {
        !self.qs_tiled.is_empty()
    }

    fn quantize(x: &[f32], m: usize, k: usize, kind: Kind, tiled: bool) -> Self {
        let blocks = k / QK;
        let padded_rows = m.next_multiple_of(TILE);
        let mut a = Activations {
            blocks,
            d: vec![0.0; m * blocks],
            qs: vec![0; m * k],
            sums: vec![0.0; m * blocks * 16],
            isums: vec![0; m * blocks * 16],
            d_by_block: vec![0.0; blocks * padded_rows],
            padded_rows,
            qs_tiled: Vec::new(),
            isums_tiled: Vec::new(),
        };
        let (d, qs, sums, isums) = (
            a.d.as_mut_ptr() as usize,
            a.qs.as_mut_ptr() as usize,
            a.sums.as_mut_ptr() as usize,
            a.isums.as_mut_ptr() as usize,
        );
        let block = |b: usize| {
            // SAFETY: block `b` alone writes its scale, its 256 values and its 16 sums.
            unsafe {
                quantize_block(
                    &x[b * QK..(b + 1) * QK],
                    kind,
                    &mut *(d as *mut f32).add(b),
                    &mut *((qs as *mut [i8; QK]).add(b)),
                    &mut *((sums as *mut [f32; 16]).add(b)),
                    &mut *((isums as *mut [i16; 16]).add(b)),
                );
            }
        };
        // One row (a decoding step) is a few microseconds of work: no thread hand-off. A
        // batch of rows is split between the workers.
        if m == 1 {
            (0..blocks).for_each(block);
        } else {
            candle_core::utils::barrier_pool()
                .execute_chunked(m * blocks, |range| range.for_each(block));
        }
        for (i, &d) in a.d.iter().enumerate() {
            let (row, b) = (i / blocks, i % blocks);
            a.d_by_block[b * padded_rows + row] = d;
        }
        if tiled {
            a.tile(m);
        }
        a
    }

    /// Fills `qs_tiled` and `isums_tiled` (rows past `m` stay zero).
    fn tile(&mut self, m: usize) {
        let (blocks, k) = (self.blocks, self.blocks * QK);
        self.qs_tiled = vec![0; self.padded_rows * k];
        self.isums_tiled = vec![0; self.padded_rows * blocks * 16];
        for row in 0..m {
            let (t, r) = (row / TILE, row % TILE);
            for b in 0..blocks {
                let tile_block = t * blocks + b;
                for c in 0..QK / 4 {
                    let to = ((tile_block * (QK / 4) + c) * TILE + r) * 4;
                    let from = row * k + b * QK + 4 * c;
                    self.qs_tiled[to..to + 4].copy_from_slice(&self.qs[from..from + 4]);
                }
                for p in 0..8 {
                    let to = ((tile_block * 8 + p) * TILE + r) * 2;
                    let from = (row * blocks + b) * 16 + 2 * p;
                    self.isums_tiled[to..to + 2].copy_from_slice(&self.isums[from..from + 2]);
                }
            }
        }
    }
}

/// ggml's `quantize_row_q8_K` for one block, as candle writes it (the value of largest
/// magnitude maps to -127), the sub-blocks in `kind`'s order.
fn quantize_block(
    xs: &[f32],
    kind: Kind,
    d: &mut f32,
    dst: &mut [i8; QK],
    sums: &mut [f32; 16],
    isums: &mut [i16; 16],
) {
    let mut q = [0i8; QK];
    let max = signed_max(xs);
    *d = 0.0;
    if max != 0.0 {
        let iscale = -127.0 / max;
        for (q, &v) in q.iter_mut().zip(xs) {
            let r = round_half_away(iscale * v).clamp(-128.0, 127.0);
            let r = if r.is_nan() { 0.0 } else { r };
            // SAFETY: `r` is a whole number in -128..=127 (a plain `as` would compile to a
            // scalar saturating conversion and stop the loop vectorizing).
            *q = unsafe { r.to_int_unchecked::<i32>() } as i8;
        }
        *d = 1.0 / iscale;
    }
    // At most 32 · 128 in magnitude: an i16.
    let sum = |c: &[i8]| c.iter().map(|&v| v as i16).sum::<i16>();
    match kind {
        Kind::Q4K => {
            for ((s, i), c) in sums
                .iter_mut()
                .zip(isums.iter_mut())
                .zip(q.chunks_exact(32))
            {
                *i = sum(c);
                *s = *d * *i as f32;
            }
        }
        Kind::Q6K => {
            for ((s, i), c) in sums
                .iter_mut()
                .zip(isums.iter_mut())
                .zip(q.chunks_exact(16))
            {
                *i = sum(c);
                *s = 32.0 * *d * *i as f32;
            }
        }
    }
    match kind {
        Kind::Q6K => dst.copy_from_slice(&q),
        Kind::Q4K => {
            for (slot, sub) in [0, 2, 1, 3, 4, 6, 5, 7].into_iter().enumerate() {
                dst[slot * 32..(slot + 1) * 32].copy_from_slice(&q[sub * 32..(sub + 1) * 32]);
            }
        }
    }
}

/// The value of largest magnitude (the first of equals), in lanes that vectorize.
fn signed_max(xs: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = xs.chunks_exact(16);
    let tail = chunks.remainder().iter().fold(0f32, |m, v| m.max(v.abs()));
    for c in chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l = l.max(v.abs());
        }
    }
    let amax = lanes.iter().copied().fold(tail, f32::max);
    xs.iter().copied().find(|v| v.abs() == amax).unwrap_or(0.0)
}

/// `f32::round` (halves away from zero) without its library call, so the loop vectorizes.
#[inline]
fn round_half_away(v: f32) -> f32 {
    let t = v.trunc();
    if (v - t).abs() >= 0.5 {
        t + 1f32.copysign(v)
    } else {
        t
    }
}

/// One weight's share of [`matmul`]: its blocks, its `n` rows, and where its `m × n`
/// outputs go.
struct Product<'a> {
    kind: Kind,
    acts: &'a Activations,
    w: &'a [u8],
    n: usize,
    out: usize,
}

/// `out[r·n + i] = Σ x_r · w_i` for every activation row `r` and weight row `i` of every
/// product. Chunks of weight rows, all products' in a row, go to candle's persistent worker
/// threads (they spin between dispatches rather than sleep, which matters when a token is
/// ~100 dispatches of a millisecond or less); within a chunk, tiles of [`TILE`] activation
/// rows share each decoded weight block.
fn matmul(kernels: Kernels, products: &[Product], k: usize, m: usize) {
    const CHUNK: usize = 16;
    // Chunk `c` belongs to the product `p` with `first[p] <= c < first[p + 1]`.
    let mut first = vec![0];
    for p in products {
        first.push(first[first.len() - 1] + p.n.div_ceil(CHUNK));
    }
    let total = first[products.len()];
    candle_core::utils::barrier_pool().execute_chunked(total, |chunks| {
        // Chunk by chunk, so that a chunk's weight rows stay in L1 for every tile.
        for chunk in chunks {
            let at = first.partition_point(|&f| f <= chunk) - 1;
            let (p, chunk) = (&products[at], chunk - first[at]);
            let row_bytes = (k / QK) * p.kind.block_bytes();
            let weight_rows = chunk * CHUNK..((chunk + 1) * CHUNK).min(p.n);
            if p.acts.is_tiled() {
                // SAFETY: as below; tiled activations exist only where AVX2 was chosen.
                unsafe { tiled_rows(p, weight_rows, row_bytes, m) };
                continue;
            }
            let mut sums = [[0f32; TILE]; CHUNK];
            let sums = &mut sums[..weight_rows.len()];
            let w = &p.w[weight_rows.start * row_bytes..weight_rows.end * row_bytes];
            for r0 in (0..m).step_by(TILE) {
                let rows = TILE.min(m - r0);
                // SAFETY: the caller chose `kernels` from `supported()`; `w` holds the chunk's
                // rows of `k / 256` blocks and the activations `m` rows of `k / 256` blocks;
                // each output is written by the one thread that owns its weight row.
                unsafe {
                    dot_rows(
                        kernels,
                        p.kind,
                        w.as_ptr(),
                        row_bytes,
                        p.acts,
                        r0,
                        rows,
                        sums,
                    );
                    for (i, row) in weight_rows.clone().zip(sums.iter()) {
                        for (r, v) in row.iter().take(rows).enumerate() {
                            *(p.out as *mut f32).add((r0 + r) * p.n + i) = *v;
                        }
                    }
                }
            }
        }
    });
}

/// Activation rows per tile of the product.
const TILE: usize = 8;

/// The most tiles per call of the tiled kernels.
const TILES: usize = 4;

/// Tiles and blocks per call of the tiled kernels for weights of `kind`: each decoded weight
/// run serves every tile, and the tiles' activations for the blocks (16 KiB) stay in L1,
/// with sixteen weight rows' blocks, while every row of the chunk goes over them. `Q4_K`
/// takes two tiles: with four, its 16- and 32-bit sums do not fit the registers, and the
/// compiler spilled them (no faster on a Zen 3). `Q6_K` sums pairs of runs straight into
/// 32 bits and holds four: 10-25 % more GMAC/s there than two (`examples/kquant_gemm`).
fn tiled_call(kind: Kind) -> (usize, usize) {
    match kind {
        Kind::Q4K => (2, 4),
        Kind::Q6K => (4, 2),
    }
}

/// [`matmul`]'s work on one chunk of weight rows with tiled activations: per group of tiles,
/// per run of blocks (see [`tiled_call`]), every weight row, each carrying its rows' sums in
/// lanes from run to run (so each row's arithmetic is the row kernels', in their order).
///
/// # Safety
/// AVX2 and FMA are available, `p.acts` is tiled, and the caller owns these outputs.
#[cfg(target_arch = "x86_64")]
unsafe fn tiled_rows(p: &Product, weight_rows: std::ops::Range<usize>, row_bytes: usize, m: usize) {
    let (acts, blocks) = (p.acts, p.acts.blocks);
    let tiles = m.div_ceil(TILE);
    let mut sums = [[[0f32; TILE]; TILES]; 16];
    let (per, run_blocks) = tiled_call(p.kind);
    for t0 in (0..tiles).step_by(per) {
        let count = per.min(tiles - t0);
        let sums = &mut sums[..weight_rows.len()];
        sums.iter_mut().for_each(|s| *s = [[0.0; TILE]; TILES]);
        for b0 in (0..blocks).step_by(run_blocks) {
            let run = b0..(b0 + run_blocks).min(blocks);
            for (i, s) in weight_rows.clone().zip(sums.iter_mut()) {
                let w = p.w.as_ptr().add(i * row_bytes);
                match (p.kind, count) {
                    (Kind::Q4K, 1) => avx2::tiled_q4k::<1>(w, acts, t0, run.clone(), s),
                    (Kind::Q4K, _) => avx2::tiled_q4k::<2>(w, acts, t0, run.clone(), s),
                    (Kind::Q6K, 1) => avx2::tiled_q6k::<1>(w, acts, t0, run.clone(), s),
                    (Kind::Q6K, 2) => avx2::tiled_q6k::<2>(w, acts, t0, run.clone(), s),
                    (Kind::Q6K, 3) => avx2::tiled_q6k::<3>(w, acts, t0, run.clone(), s),
                    (Kind::Q6K, _) => avx2::tiled_q6k::<4>(w, acts, t0, run.clone(), s),
                }
            }
        }
        for (i, s) in weight_rows.clone().zip(sums.iter()) {
            for (t, lanes) in s.iter().enumerate().take(count) {
                for (r, v) in lanes.iter().enumerate() {
                    let row = (t0 + t) * TILE + r;
                    if row < m {
                        *(p.out as *mut f32).add(row * p.n + i) = *v;
                    }
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tiled_rows(_: &Product, _: std::ops::Range<usize>, _: usize, _: usize) {
    unreachable!("tiled activations are only built for the AVX2 kernels")
}

/// The `out.len()` consecutive weight rows from `w` (`row_bytes` each) against activation
/// rows `r0..r0 + rows` (`rows ≤ TILE`): `out[i][r]` is row `i`'s sum with row `r0 + r`.
/// The AVX2 kernels take the rows as one stream of blocks (see [`avx2::dot_q4k`]).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn dot_rows(
    kernels: Kernels,
    kind: Kind,
    w: *const u8,
    row_bytes: usize,
    acts: &Activations,
    r0: usize,
    rows: usize,
    out: &mut [[f32; TILE]],
) {
    let row = |i: usize| w.add(i * row_bytes);
    macro_rules! go {
        ($($r:literal)*) => {
            match (kernels, kind, rows) {
                $((Kernels::Avx512Vnni, Kind::Q4K, $r) => {
                    for (i, o) in out.iter_mut().enumerate() {
                        dot_q4k::<$r>(row(i), acts, r0, o);
                    }
                }
                (Kernels::Avx512Vnni, Kind::Q6K, $r) => {
                    for (i, o) in out.iter_mut().enumerate() {
                        dot_q6k::<$r>(row(i), acts, r0, o);
                    }
                }
                (Kernels::Avx2, Kind::Q4K, $r) => avx2::dot_q4k::<$r>(w, acts, r0, out),
                (Kernels::Avx2, Kind::Q6K, $r) => avx2::dot_q6k::<$r>(w, acts, r0, out),)*
                _ => unreachable!("at most TILE rows"),
            }
        };
    }
    go!(1 2 3 4 5 6 7 8)
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn dot_rows(
    _: Kernels,
    _: Kind,
    _: *const u8,
    _: usize,
    _: &Activations,
    _: usize,
    _: usize,
    _: &mut [[f32; TILE]],
) {
    unreachable!("the k-quant kernels are only chosen where available() holds")
}

fn f16_at(p: *const u8) -> f32 {
    // SAFETY: callers point at the two bytes of a block's f16 field.
    half::f16::from_bits(unsafe { (p as *const u16).read_unaligned() }).to_f32()
}

/// A `Q4_K` block's eight 6-bit scales and eight 6-bit mins (ggml's `get_scale_min_k4`, all
/// at once): bytes 0..8 scales, 8..16 mins.
fn q4k_scales_mins(packed: &[u8; 12]) -> [u8; 16] {
    let word = |i: usize| u32::from_le_bytes(packed[4 * i..4 * i + 4].try_into().unwrap());
    let (a, b, c) = (word(0), word(1), word(2));
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let scales_lo = a & LOW6;
    let scales_hi = (c & LOW4) | (((a >> 6) & LOW2) << 4);
    let mins_lo = b & LOW6;
    let mins_hi = ((c >> 4) & LOW4) | (((b >> 6) & LOW2) << 4);
    let mut out = [0u8; 16];
    for (i, w) in [scales_lo, scales_hi, mins_lo, mins_hi]
        .into_iter()
        .enumerate()
    {
        out[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
    }
    out
}

/// `Σ w · x` of one weight row of `Q4_K` blocks at `w` with each of the `R` activation rows
/// from `r0` (sub-blocks in the order [`Activations`] stores for `Q4_K`): each block is
/// decoded once for all rows, and each row's sums run in the same order whatever `R` is.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
unsafe fn dot_q4k<const R: usize>(
    w: *const u8,
    acts: &Activations,
    r0: usize,
    out: &mut [f32; TILE],
) {
    use std::arch::x86_64::*;
    let blocks = acts.blocks;
    let nibble = _mm512_set1_epi8(0x0f);
    // Words 0..16 of a product (pairs of values) hold one sub-block, 16..32 the other:
    // which scales they take.
    let pick = |a: i16, b: i16| {
        let mut idx = [a; 32];
        idx[16..].fill(b);
        _mm512_loadu_si512(idx.as_ptr() as *const _)
    };
    let (p02, p13, p46, p57) = (pick(0, 2), pick(1, 3), pick(4, 6), pick(5, 7));
    let mut acc = [_mm512_setzero_ps(); R];
    let mut acc_min = [_mm256_setzero_ps(); R];
    for b in 0..blocks {
        let blk = w.add(b * Q4K_BYTES);
        crate::kernels::prefetch::ahead::<3>(blk);
        let sm = q4k_scales_mins(&*(blk.add(4) as *const [u8; 12]));
        let sc = _mm512_cvtepu8_epi16(_mm256_castsi128_si256(_mm_loadl_epi64(
            sm.as_ptr() as *const __m128i
        )));
        let scales = [
            _mm512_permutexvar_epi16(p02, sc),
            _mm512_permutexvar_epi16(p13, sc),
            _mm512_permutexvar_epi16(p46, sc),
            _mm512_permutexvar_epi16(p57, sc),
        ];
        let mins = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
            sm.as_ptr().add(8) as *const __m128i
        )));
        let q0 = _mm512_loadu_si512(blk.add(16) as *const _);
        let q1 = _mm512_loadu_si512(blk.add(80) as *const _);
        let quants = [
            _mm512_and_si512(q0, nibble),
            _mm512_and_si512(_mm512_srli_epi16(q0, 4), nibble),
            _mm512_and_si512(q1, nibble),
            _mm512_and_si512(_mm512_srli_epi16(q1, 4), nibble),
        ];
        let d = f16_at(blk);
        let mins = _mm256_mul_ps(mins, _mm256_set1_ps(f16_at(blk.add(2))));
        for r in 0..R {
            let at = (r0 + r) * blocks + b;
            let dy = *acts.d.get_unchecked(at);
            let y = acts.qs.as_ptr().add(at * QK);
            let sumi = scaled_dots(&quants, &scales, y);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_set1_ps(d * dy), acc[r]);
            // The mins times the activations' sums per sub-block.
            let sums = _mm256_loadu_ps(acts.sums.as_ptr().add(at * 16));
            acc_min[r] = _mm256_fmadd_ps(mins, sums, acc_min[r]);
        }
    }
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(acc[r]) - hsum256(acc_min[r]);
    }
}

/// [`dot_q4k`] for `Q6_K` blocks (activations in natural order).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
unsafe fn dot_q6k<const R: usize>(
    w: *const u8,
    acts: &Activations,
    r0: usize,
    out: &mut [f32; TILE],
) {
    use std::arch::x86_64::*;
    let blocks = acts.blocks;
    let nibble = _mm512_set1_epi8(0x0f);
    let pair = _mm512_set1_epi8(0x03);
    // The high bit pairs of values 0..32 of a half are bits 0-1 of `qh[l]`, of 32..64 bits
    // 2-3, of 64..96 bits 4-5, of 96..128 bits 6-7.
    let shift_lo = _mm512_setr_epi64(0, 0, 0, 0, 2, 2, 2, 2);
    let shift_hi = _mm512_setr_epi64(4, 4, 4, 4, 6, 6, 6, 6);
    // Each 16-value sub-block is eight words of a product: its scale repeated eight times.
    let repeat = |s: i8| {
        let mut idx = [0i8; 32];
        for (i, v) in idx.iter_mut().enumerate() {
            // `vpshufb` picks within each 128-bit half (both hold the 16 scales).
            *v = s + (i / 8) as i8;
        }
        _mm256_loadu_si256(idx.as_ptr() as *const __m256i)
    };
    let picks = [repeat(0), repeat(4), repeat(8), repeat(12)];
    let mut acc = [_mm512_setzero_ps(); R];
    let mut acc_off = [_mm512_setzero_ps(); R];
    for b in 0..blocks {
        let blk = w.add(b * Q6K_BYTES);
        crate::kernels::prefetch::ahead::<4>(blk);
        let sc8 = _mm_loadu_si128(blk.add(192) as *const __m128i);
        let mut quants = [_mm512_setzero_si512(); 4];
        for half in 0..2 {
            let ql = _mm512_loadu_si512(blk.add(64 * half) as *const _);
            let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                blk.add(128 + 32 * half) as *const __m256i
            ));
            let h_lo =
                _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi64(qh, shift_lo), pair), 4);
            let h_hi =
                _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi64(qh, shift_hi), pair), 4);
            quants[2 * half] = _mm512_or_si512(_mm512_and_si512(ql, nibble), h_lo);
            quants[2 * half + 1] =
                _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), nibble), h_hi);
        }
        let sc16 = _mm256_broadcastsi128_si256(sc8);
        let scales = picks.map(|p| _mm512_cvtepi8_epi16(_mm256_shuffle_epi8(sc16, p)));
        let d = f16_at(blk.add(208));
        let offsets = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc8)),
            _mm512_set1_ps(d),
        );
        for r in 0..R {
            let at = (r0 + r) * blocks + b;
            let dd = d * *acts.d.get_unchecked(at);
            let y = acts.qs.as_ptr().add(at * QK);
            let sumi = scaled_dots(&quants, &scales, y);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_set1_ps(dd), acc[r]);
            // The stored values are offset by +32: subtract Σ d · scale · 32 · (sum of 16).
            let sums = _mm512_loadu_ps(acts.sums.as_ptr().add(at * 16));
            acc_off[r] = _mm512_fmadd_ps(offsets, sums, acc_off[r]);
        }
    }
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(acc[r]) - _mm512_reduce_add_ps(acc_off[r]);
    }
}

/// `Σ_j scale_j · (quants_j · y_j)` over a block's four groups of 64 weights (unsigned)
/// and activations (signed, at `y`), in 16 lanes of 32-bit sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn scaled_dots(
    quants: &[std::arch::x86_64::__m512i; 4],
    scales: &[std::arch::x86_64::__m512i; 4],
    y: *const i8,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    // `vpmaddubsw` sums pairs of products into words (at most 2 · 63 · 128, no saturation),
    // and `vpdpwssd` multiplies the words by their scales and adds them up in pairs: the
    // same integers as a 32-bit product and a multiply, in two instructions instead of three.
    let mut sumi = _mm512_setzero_si512();
    for (j, (q, s)) in quants.iter().zip(scales).enumerate() {
        let y = _mm512_loadu_si512(y.add(64 * j) as *const _);
        sumi = _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(*q, y), *s);
    }
    sumi
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn hsum256(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// The kernels on 256-bit vectors: eight groups of 32 values per block, each group's
/// `vpmaddubsw` words multiplied by their sub-block's scale (`vpmaddwd`) into 32-bit sums.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Activations, Q4K_BYTES, Q6K_BYTES, QK, TILE};
    use std::arch::x86_64::*;

    /// [`super::dot_q4k`] with AVX2. Group `g` of the activations (32 values) is sub-block
    /// `[0, 2, 1, 3, 4, 6, 5, 7][g]`, as [`Activations`] stores them: the low nibbles of
    /// bytes 0..32 and 32..64, then their high nibbles; the same for bytes 64..128.
    ///
    /// Groups are the outer loop and rows the inner one, so that a group's weights and scale
    /// and every row's 32-bit sums fit the sixteen registers. A block's integer sums, mins
    /// included, are exact; they are reduced to one lane per row and scaled once, so each
    /// row's float arithmetic is the same whatever `R` is.
    ///
    /// The `out.len()` weight rows from `w` are one stream of blocks: each block's scales
    /// are unpacked while the block before it is summed, and its sums reduced and scaled
    /// while the block after it is (a row's last block's, while the next row's first is).
    /// Those two chains are long, and the out-of-order window does not reach a block
    /// ahead: in line, they held each block up (10.1 → 9.3 ns a block on a Zen 3, weights
    /// in L1), and then the end of every row before the next could start.
    ///
    /// For one row the loop is then limited by how many instructions it issues (about 150
    /// a block at first, six a cycle at best), so it counts them: scales unpacked in vector
    /// registers ([`scales_mins`]), rows and blocks as nested loops rather than one counter
    /// split in two, the scales' buffer made opaque without a trip through the stack, one
    /// row's sums and mins reduced together, its d and dmin converted together. About
    /// 100-115 a block remain; one thread with the weights in L2 went from 11.2-11.8 to
    /// 12.8-13.9 GB/s, decoding end to end about 10 % faster (BENCHMARKS.md, session 15).
    /// Taking two weight rows at a time cut more, but read memory as two short streams a
    /// thread, which the prefetching handles worse: slower end to end (reverted).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_q4k<const R: usize>(
        w: *const u8,
        acts: &Activations,
        r0: usize,
        out: &mut [[f32; TILE]],
    ) {
        const SUB: [usize; 8] = [0, 2, 1, 3, 4, 6, 5, 7];
        let (blocks, total) = (acts.blocks, acts.blocks * out.len());
        if total == 0 {
            return;
        }
        let mut pairs = [Pairs([0; 8]), Pairs([0; 8])];
        let mut next_mins = q4k_scale_pairs(w, &mut pairs[0]);
        let mut acc = _mm256_setzero_ps();
        // The previous block's sums, mins and scales (at first nothing: 0 · 0 is added).
        // A few rows carry their sums as they are, reduced a block late too; more rows
        // carry them reduced (a lane a row), since twice their sums would not fit the
        // registers (seven rows: 8 % slower carried whole).
        let mut prev_sumi = [_mm256_setzero_si256(); R];
        let mut prev_mins = [_mm_setzero_si128(); R];
        let (mut prev_lanes, mut prev_min_lanes) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        let (mut prev_d, mut prev_dmin) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let whole = R <= 2;
        // acc += the previous block's sums · d − its mins · dmin.
        macro_rules! add_previous {
            () => {
                if R == 1 {
                    // One row: its sums and mins reduced together, (sum, min) in lanes 0, 1
                    // (integers: exact in any order).
                    let v = _mm_add_epi32(
                        _mm256_castsi256_si128(prev_sumi[0]),
                        _mm256_extracti128_si256(prev_sumi[0], 1),
                    );
                    let m = prev_mins[0];
                    let c = _mm_add_epi32(_mm_unpacklo_epi32(v, m), _mm_unpackhi_epi32(v, m));
                    let both = _mm_cvtepi32_ps(_mm_add_epi32(c, _mm_shuffle_epi32::<0xee>(c)));
                    let min = _mm_movehdup_ps(both);
                    acc = _mm256_fmadd_ps(_mm256_zextps128_ps256(both), prev_d, acc);
                    acc = _mm256_fnmadd_ps(_mm256_zextps128_ps256(min), prev_dmin, acc);
                } else {
                    if whole {
                        (prev_lanes, prev_min_lanes) =
                            (lane_per_row(&prev_sumi), lane_per_row_128(&prev_mins));
                    }
                    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(prev_lanes), prev_d, acc);
                    acc = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(prev_min_lanes), prev_dmin, acc);
                }
            };
        }
        // The scales of the block being summed and of the next, swapped each block.
        let (mut cur, mut next) = (&mut pairs[0] as *mut Pairs, &mut pairs[1] as *mut Pairs);
        let last = w.add((total - 1) * Q4K_BYTES);
        let mut blk = w;
        for row in 0..out.len() {
            for b in 0..blocks {
                crate::kernels::prefetch::ahead::<3>(blk);
                let m16 = next_mins;
                if blk != last {
                    next_mins = q4k_scale_pairs(blk.add(Q4K_BYTES), &mut *next);
                }
                // Read back from memory, not rebuilt from the scales with shuffles.
                let pairs = &*opaque(cur);
                let at: [usize; R] = std::array::from_fn(|r| (r0 + r) * blocks + b);
                let mut sumi = [_mm256_setzero_si256(); R];
                macro_rules! group {
                    ($($g:literal)*) => {$({
                        let s = _mm256_set1_epi32(pairs.0[SUB[$g]]);
                        add_group(q4k_values::<$g>(blk), s, acts, &at, $g, &mut sumi);
                    })*};
                }
                group!(0 1 2 3 4 5 6 7);
                // Σ min · (activations' sum) per sub-block, in 4 lanes per row.
                let mins: [__m128i; R] = std::array::from_fn(|r| {
                    let sums = _mm_loadu_si128(acts.isums.as_ptr().add(at[r] * 16) as *const _);
                    _mm_madd_epi16(m16, sums)
                });
                add_previous!();
                if b == 0 && row > 0 {
                    store_rows::<R>(acc, &mut out[row - 1]);
                    acc = _mm256_setzero_ps();
                }
                let dy = acts.d_by_block.as_ptr().add(b * acts.padded_rows + r0);
                if R == 1 {
                    // Lane 0 is all that is read: d and dmin converted together, scaled by
                    // the row's d, dmin's product then moved to lane 0.
                    let both = _mm_mul_ps(_mm_set1_ps(*dy), f16_pair(blk));
                    prev_d = _mm256_zextps128_ps256(both);
                    prev_dmin = _mm256_zextps128_ps256(_mm_movehdup_ps(both));
                } else {
                    let dy = _mm256_loadu_ps(dy);
                    prev_d = _mm256_mul_ps(dy, f16_splat(blk));
                    prev_dmin = _mm256_mul_ps(dy, f16_splat(blk.add(2)));
                }
                if whole {
                    (prev_sumi, prev_mins) = (sumi, mins);
                } else {
                    (prev_lanes, prev_min_lanes) = (lane_per_row(&sumi), lane_per_row_128(&mins));
                }
                (cur, next) = (next, cur);
                blk = blk.add(Q4K_BYTES);
            }
        }
        add_previous!();
        store_rows::<R>(acc, out.last_mut().expect("rows"));
    }

    /// [`super::dot_q6k`] with AVX2: group `g` is values `32g..32g + 32` (natural order),
    /// sub-blocks `2g` (its first 16) and `2g + 1`; loops and sums as [`dot_q4k`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_q6k<const R: usize>(
        w: *const u8,
        acts: &Activations,
        r0: usize,
        out: &mut [[f32; TILE]],
    ) {
        let blocks = acts.blocks;
        if blocks * out.len() == 0 {
            return;
        }
        // Group g's words take scale 2g (low 128 bits) and 2g + 1 (high): bytes picked
        // from the 16 scales, then widened.
        let picks: [__m128i; 8] = std::array::from_fn(|g| {
            let mut idx = [2 * g as i8; 16];
            idx[8..].fill(2 * g as i8 + 1);
            _mm_loadu_si128(idx.as_ptr() as *const __m128i)
        });
        let mut acc = _mm256_setzero_ps();
        // Reduced and scaled while the next block is summed, as in [`dot_q4k`].
        let (mut prev_sumi, mut prev_d) = ([_mm256_setzero_si256(); R], _mm256_setzero_ps());
        let mut blk = w;
        for row in 0..out.len() {
            for b in 0..blocks {
                crate::kernels::prefetch::ahead::<4>(blk);
                let sc8 = _mm_loadu_si128(blk.add(192) as *const __m128i);
                let at: [usize; R] = std::array::from_fn(|r| (r0 + r) * blocks + b);
                // The stored values are offset by +32: start from −32 · Σ scale · (sum of 16).
                let sc16 = _mm256_cvtepi8_epi16(sc8);
                let mut sumi: [__m256i; R] = std::array::from_fn(|r| {
                    let sums = _mm256_loadu_si256(acts.isums.as_ptr().add(at[r] * 16) as *const _);
                    _mm256_sub_epi32(
                        _mm256_setzero_si256(),
                        _mm256_slli_epi32(_mm256_madd_epi16(sc16, sums), 5),
                    )
                });
                macro_rules! group {
                    ($($g:literal)*) => {$({
                        let s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, picks[$g]));
                        add_group(q6k_values::<$g>(blk), s, acts, &at, $g, &mut sumi);
                    })*};
                }
                group!(0 1 2 3 4 5 6 7);
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lane_per_row(&prev_sumi)), prev_d, acc);
                if b == 0 && row > 0 {
                    store_rows::<R>(acc, &mut out[row - 1]);
                    acc = _mm256_setzero_ps();
                }
                let dy = _mm256_loadu_ps(acts.d_by_block.as_ptr().add(b * acts.padded_rows + r0));
                prev_d = _mm256_mul_ps(dy, f16_splat(blk.add(208)));
                prev_sumi = sumi;
                blk = blk.add(Q6K_BYTES);
            }
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lane_per_row(&prev_sumi)), prev_d, acc);
        store_rows::<R>(acc, out.last_mut().expect("rows"));
    }

    /// [`dot_q4k`] over tiled activations, for tiles `t0..t0 + T` and blocks `run`,
    /// adding to `sums` (lane `r` of tile `t`: its row `r`). Each 32-value group's weights
    /// are broadcast four at a time against the tile's eight rows, so that the products
    /// land a row per lane: the eight runs of a group share one scale and are summed in
    /// 16 bits (at most 8 · 2 · 15 · 127) before one `vpmaddwd` per group and tile.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tiled_q4k<const T: usize>(
        w: *const u8,
        acts: &Activations,
        t0: usize,
        run: std::ops::Range<usize>,
        sums: &mut [[f32; TILE]; super::TILES],
    ) {
        const SUB: [usize; 8] = [0, 2, 1, 3, 4, 6, 5, 7];
        let blocks = acts.blocks;
        let picks: [__m256i; 8] = std::array::from_fn(|g| {
            let s = 2 * SUB[g] as i8;
            let idx: [i8; 32] = std::array::from_fn(|i| s + (i % 2) as i8);
            _mm256_loadu_si256(idx.as_ptr() as *const __m256i)
        });
        let mut acc: [__m256; T] = std::array::from_fn(|t| _mm256_loadu_ps(sums[t].as_ptr()));
        for b in run {
            let blk = w.add(b * Q4K_BYTES);
            let sm = scales_mins(blk);
            let sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
            let tb: [usize; T] = std::array::from_fn(|t| (t0 + t) * blocks + b);
            let ys: [*const i8; T] =
                std::array::from_fn(|t| acts.qs_tiled.as_ptr().add(tb[t] * QK * TILE));
            let mut sumi = [_mm256_setzero_si256(); T];
            macro_rules! group {
                ($($g:literal)*) => {$({
                    let q = q4k_values::<$g>(blk);
                    let mut halves = [
                        _mm256_permute2x128_si256(q, q, 0x00),
                        _mm256_permute2x128_si256(q, q, 0x11),
                    ];
                    // Opaque, so that each run is one in-lane `vpshufd` of a half.
                    in_registers(&mut halves);
                    let mut words = [_mm256_setzero_si256(); T];
                    runs!($g, halves, words; 0 1 2 3 4 5 6 7);
                    let s = _mm256_shuffle_epi8(sc16, picks[$g]);
                    for t in 0..T {
                        sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(words[t], s));
                    }
                })*};
            }
            macro_rules! runs {
                ($g:literal, $halves:ident, $words:ident; $($c:literal)*) => {$({
                    let wq = _mm256_shuffle_epi32::<{ ($c % 4) * 0x55 }>($halves[$c / 4]);
                    for t in 0..T {
                        let y = _mm256_loadu_si256(ys[t].add((8 * $g + $c) * 32) as *const __m256i);
                        $words[t] = _mm256_add_epi16($words[t], _mm256_maddubs_epi16(wq, y));
                    }
                    in_registers(&mut $words);
                })*};
            }
            group!(0 1 2 3 4 5 6 7);
            let m16 = _mm256_castsi128_si256(_mm_cvtepu8_epi16(_mm_srli_si128::<8>(sm)));
            let d = f16_splat(blk);
            let dmin = f16_splat(blk.add(2));
            for t in 0..T {
                let isums = acts.isums_tiled.as_ptr().add(tb[t] * 8 * 2 * TILE);
                let mut mins = _mm256_setzero_si256();
                for p in 0..4 {
                    let pair = _mm256_permutevar8x32_epi32(m16, _mm256_set1_epi32(p as i32));
                    let s = _mm256_loadu_si256(isums.add(p * 2 * TILE) as *const __m256i);
                    mins = _mm256_add_epi32(mins, _mm256_madd_epi16(pair, s));
                }
                let dy = _mm256_loadu_ps(
                    acts.d_by_block
                        .as_ptr()
                        .add(b * acts.padded_rows + (t0 + t) * TILE),
                );
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[t]), _mm256_mul_ps(dy, d), acc[t]);
                acc[t] =
                    _mm256_fnmadd_ps(_mm256_cvtepi32_ps(mins), _mm256_mul_ps(dy, dmin), acc[t]);
            }
        }
        for t in 0..T {
            _mm256_storeu_ps(sums[t].as_mut_ptr(), acc[t]);
        }
    }

    /// [`tiled_q4k`] for `Q6_K` (values up to 63: two runs summed in 16 bits per scale).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tiled_q6k<const T: usize>(
        w: *const u8,
        acts: &Activations,
        t0: usize,
        run: std::ops::Range<usize>,
        sums: &mut [[f32; TILE]; super::TILES],
    ) {
        let blocks = acts.blocks;
        // Word j of either half, repeated: sub-block j's (or j + 8's) scale.
        let picks: [__m256i; 8] = std::array::from_fn(|j| {
            let idx: [i8; 32] = std::array::from_fn(|i| 2 * j as i8 + (i % 2) as i8);
            _mm256_loadu_si256(idx.as_ptr() as *const __m256i)
        });
        let mut acc: [__m256; T] = std::array::from_fn(|t| _mm256_loadu_ps(sums[t].as_ptr()));
        for b in run {
            let blk = w.add(b * Q6K_BYTES);
            let sc8 = _mm_loadu_si128(blk.add(192) as *const __m128i);
            let sc16 = _mm256_cvtepi8_epi16(sc8);
            let scales = [
                _mm256_permute2x128_si256(sc16, sc16, 0x00),
                _mm256_permute2x128_si256(sc16, sc16, 0x11),
            ];
            let tb: [usize; T] = std::array::from_fn(|t| (t0 + t) * blocks + b);
            let ys: [*const i8; T] =
                std::array::from_fn(|t| acts.qs_tiled.as_ptr().add(tb[t] * QK * TILE));
            // The stored values are offset by +32: start from −32 · Σ scale · (sum of 16).
            let mut sumi: [__m256i; T] = std::array::from_fn(|t| {
                let isums = acts.isums_tiled.as_ptr().add(tb[t] * 8 * 2 * TILE);
                let mut off = _mm256_setzero_si256();
                for p in 0..8 {
                    let pair = _mm256_permutevar8x32_epi32(sc16, _mm256_set1_epi32(p as i32));
                    let s = _mm256_loadu_si256(isums.add(p * 2 * TILE) as *const __m256i);
                    off = _mm256_add_epi32(off, _mm256_madd_epi16(pair, s));
                }
                _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(off, 5))
            });
            macro_rules! group {
                ($($g:literal)*) => {$({
                    let q = q6k_values::<$g>(blk);
                    let mut halves = [
                        _mm256_permute2x128_si256(q, q, 0x00),
                        _mm256_permute2x128_si256(q, q, 0x11),
                    ];
                    // Opaque, so that each run is one in-lane `vpshufd` of a half.
                    in_registers(&mut halves);
                    // Runs 0..4 are sub-block 2g, 4..8 sub-block 2g + 1.
                    pairs!($g, halves; 0 2 4 6);
                })*};
            }
            macro_rules! pairs {
                ($g:literal, $halves:ident; $($c:literal)*) => {$({
                    let sub = 2 * $g + $c / 4;
                    let s = _mm256_shuffle_epi8(scales[sub / 8], picks[sub % 8]);
                    let w0 = _mm256_shuffle_epi32::<{ ($c % 4) * 0x55 }>($halves[$c / 4]);
                    let w1 = _mm256_shuffle_epi32::<{ ($c % 4 + 1) * 0x55 }>($halves[$c / 4]);
                    for t in 0..T {
                        let y = ys[t].add((8 * $g + $c) * 32);
                        let words = _mm256_add_epi16(
                            _mm256_maddubs_epi16(w0, _mm256_loadu_si256(y as *const __m256i)),
                            _mm256_maddubs_epi16(w1, _mm256_loadu_si256(y.add(32) as *const __m256i)),
                        );
                        sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(words, s));
                    }
                    in_registers(&mut sumi);
                })*};
            }
            group!(0 1 2 3 4 5 6 7);
            let d = f16_splat(blk.add(208));
            for t in 0..T {
                let dy = _mm256_loadu_ps(
                    acts.d_by_block
                        .as_ptr()
                        .add(b * acts.padded_rows + (t0 + t) * TILE),
                );
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[t]), _mm256_mul_ps(dy, d), acc[t]);
            }
        }
        for t in 0..T {
            _mm256_storeu_ps(sums[t].as_mut_ptr(), acc[t]);
        }
    }

    /// The f16 at `p` in every lane. Converting eight copies leaves the compiler nothing to
    /// choose: for one value in lane 0 it inserted the halves into whatever register it
    /// liked, the accumulator, which chained each block to the previous block's sums.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn f16_splat(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_set1_epi16((p as *const i16).read_unaligned()))
    }

    /// The two f16 at `p` (a block's d and dmin) as `[d, dmin, d, dmin]`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn f16_pair(p: *const u8) -> __m128 {
        _mm_cvtph_ps(_mm_set1_epi32((p as *const i32).read_unaligned()))
    }

    /// `sumi[r] += Σ (q · y) · s` over group `g`'s 32 values of activation block `at[r]`, the
    /// products paired into words and the pairs scaled by the group's `s` (a row kernel's
    /// step, whatever the weights' type).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn add_group<const R: usize>(
        q: __m256i,
        s: __m256i,
        acts: &Activations,
        at: &[usize; R],
        g: usize,
        sumi: &mut [__m256i; R],
    ) {
        for r in 0..R {
            let y = acts.qs.as_ptr().add(at[r] * QK + 32 * g);
            let words = _mm256_maddubs_epi16(q, _mm256_loadu_si256(y as *const _));
            sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(words, s));
        }
        in_registers(sumi);
    }

    /// Group `G`'s 32 values (4 bits) of the `Q4_K` block at `blk`: groups 0, 1 are the low
    /// nibbles of bytes 0..32, 32..64 of the values; 2, 3 their high nibbles; 4..8 the same
    /// for bytes 64..128 (see [`dot_q4k`] for the sub-blocks they are).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn q4k_values<const G: usize>(blk: *const u8) -> __m256i {
        let bytes = _mm256_loadu_si256(blk.add(16 + 32 * (G % 2 + 2 * (G / 4))) as *const __m256i);
        let bytes = if G % 4 < 2 {
            bytes
        } else {
            _mm256_srli_epi16(bytes, 4)
        };
        _mm256_and_si256(bytes, _mm256_set1_epi8(0x0f))
    }

    /// Group `G`'s 32 values (6 bits, offset by +32) of the `Q6_K` block at `blk`: half
    /// `G / 4` of the block; within it, groups 0, 1 are the low nibbles of bytes 0..32,
    /// 32..64 and 2, 3 their high nibbles, with bit pair `G mod 4` of the 32 high bytes on
    /// top. The pair is shifted straight to bits 4 and 5 and masked there (what a 16-bit
    /// shift carries across from the neighbouring byte lands outside the mask), one shift a
    /// group fewer than down and back up; that measured no faster on a Zen 3. The row and
    /// the tiled kernels decode their values here, alike.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn q6k_values<const G: usize>(blk: *const u8) -> __m256i {
        let (half, j) = (G / 4, G % 4);
        let ql = _mm256_loadu_si256(blk.add(64 * half + 32 * (j % 2)) as *const _);
        let ql = if j < 2 { ql } else { _mm256_srli_epi16(ql, 4) };
        let qh = _mm256_loadu_si256(blk.add(128 + 32 * half) as *const _);
        let qh = match j {
            0 => _mm256_slli_epi16(qh, 4),
            1 => _mm256_slli_epi16(qh, 2),
            2 => qh,
            _ => _mm256_srli_epi16(qh, 2),
        };
        _mm256_or_si256(
            _mm256_and_si256(ql, _mm256_set1_epi8(0x0f)),
            _mm256_and_si256(qh, _mm256_set1_epi8(0x30)),
        )
    }

    /// A `Q4_K` block's eight scales, each as an i16 pair filling a 32-bit word, so that a
    /// group's sixteen words of one scale are a broadcast load, a load-port operation. (A
    /// byte shuffle per group, which the compiler made two, loaded the shuffle ports, the
    /// busiest in [`dot_q4k`] by llvm-mca's count.)
    #[repr(align(32))]
    struct Pairs([i32; 8]);

    /// Writes the scales of the `Q4_K` block at `blk` into `pairs`; returns its eight mins
    /// widened to i16.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn q4k_scale_pairs(blk: *const u8, pairs: &mut Pairs) -> __m128i {
        let sm = scales_mins(blk);
        let sc = _mm_cvtepu8_epi16(sm);
        let words = pairs.0.as_mut_ptr() as *mut __m128i;
        _mm_store_si128(words, _mm_unpacklo_epi16(sc, sc));
        _mm_store_si128(words.add(1), _mm_unpackhi_epi16(sc, sc));
        _mm_cvtepu8_epi16(_mm_srli_si128::<8>(sm))
    }

    /// [`q4k_scales_mins`] of the `Q4_K` block at `blk` in vector registers: eleven vector
    /// operations where the scalar bit juggling took some thirty instructions, which
    /// limited the decoding kernel (about 150 instructions a block, at six a cycle).
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn scales_mins(blk: *const u8) -> __m128i {
        // Bytes 4..20: the packed words a, b, c (and four bytes of values, unused).
        let x = _mm_loadu_si128(blk.add(4) as *const __m128i);
        let bytes = |v: u8| _mm_set1_epi8(v as i8);
        // Scales 0..4, mins 0..4: the low six bits of a and b.
        let low = _mm_and_si128(x, bytes(0x3f));
        // Scales 4..8 and mins 4..8: c's low and high nibbles, with the top two bits of a
        // and b above them.
        let c = _mm_shuffle_epi32::<0xaa>(x);
        let nibbles = _mm_unpacklo_epi32(
            _mm_and_si128(c, bytes(0x0f)),
            _mm_and_si128(_mm_srli_epi16::<4>(c), bytes(0x0f)),
        );
        let tops = _mm_and_si128(_mm_srli_epi16::<2>(x), bytes(0x30));
        let high = _mm_or_si128(nibbles, tops);
        // [scales lo, scales hi, mins lo, mins hi].
        _mm_unpacklo_epi32(low, high)
    }

    /// Lane `r` of the result: the sum of `v[r]`'s eight lanes (0 for `r ≥ R`).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn lane_per_row<const R: usize>(v: &[__m256i; R]) -> __m256i {
        if R == 1 {
            // Lane 0 is all that is read: no tree.
            return _mm256_castsi128_si256(hsum_lane0(_mm_add_epi32(
                _mm256_castsi256_si128(v[0]),
                _mm256_extracti128_si256(v[0], 1),
            )));
        }
        let at = |r: usize| if r < R { v[r] } else { _mm256_setzero_si256() };
        // Within each 128-bit half: the four rows' sums of that half.
        let lo = _mm256_hadd_epi32(
            _mm256_hadd_epi32(at(0), at(1)),
            _mm256_hadd_epi32(at(2), at(3)),
        );
        if R <= 4 {
            return _mm256_castsi128_si256(_mm_add_epi32(
                _mm256_castsi256_si128(lo),
                _mm256_extracti128_si256(lo, 1),
            ));
        }
        let hi = _mm256_hadd_epi32(
            _mm256_hadd_epi32(at(4), at(5)),
            _mm256_hadd_epi32(at(6), at(7)),
        );
        _mm256_add_epi32(
            _mm256_permute2x128_si256(lo, hi, 0x20),
            _mm256_permute2x128_si256(lo, hi, 0x31),
        )
    }

    /// [`lane_per_row`] for 128-bit rows.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn lane_per_row_128<const R: usize>(v: &[__m128i; R]) -> __m256i {
        if R == 1 {
            return _mm256_castsi128_si256(hsum_lane0(v[0]));
        }
        let at = |r: usize| if r < R { v[r] } else { _mm_setzero_si128() };
        let lo = _mm_hadd_epi32(_mm_hadd_epi32(at(0), at(1)), _mm_hadd_epi32(at(2), at(3)));
        if R <= 4 {
            return _mm256_castsi128_si256(lo);
        }
        let hi = _mm_hadd_epi32(_mm_hadd_epi32(at(4), at(5)), _mm_hadd_epi32(at(6), at(7)));
        _mm256_set_m128i(hi, lo)
    }

    /// Lane 0: the sum of `v`'s four lanes (the others are partial sums).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn hsum_lane0(v: __m128i) -> __m128i {
        let v = _mm_add_epi32(v, _mm_unpackhi_epi64(v, v));
        _mm_add_epi32(v, _mm_shuffle_epi32(v, 1))
    }

    /// Lanes `0..R` of `acc` into `out`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn store_rows<const R: usize>(acc: __m256, out: &mut [f32; TILE]) {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        out[..R].copy_from_slice(&lanes[..R]);
    }

    /// `p`, through an empty `asm!`: what it points at must be read from memory, though
    /// the compiler saw it written (unlike `black_box`, no trip of the pointer through the
    /// stack).
    #[inline(always)]
    fn opaque<T>(mut p: *mut T) -> *mut T {
        // SAFETY: the template is empty; it reads and writes `p` in place.
        unsafe {
            std::arch::asm!("/* {p} */", p = inout(reg) p, options(nostack, preserves_flags))
        };
        p
    }

    /// An empty `asm!` that takes and returns each row's sums in a register. It keeps the
    /// compiler from reassociating the integer sums across groups, which would let it
    /// evaluate a row's eight groups together, hoist every group's weights and scales out of
    /// the row loop and spill them (sixteen registers do not hold them).
    #[inline(always)]
    fn in_registers<const R: usize>(sumi: &mut [__m256i; R]) {
        for s in sumi {
            // SAFETY: the template is empty; it reads and writes `s` in place.
            unsafe {
                std::arch::asm!(
                    "/* {s} */",
                    s = inout(ymm_reg) * s,
                    options(nomem, nostack, preserves_flags)
                )
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// [`try_matmul`] through the given kernels.
    fn product(kernels: Kernels, w: &QTensor, x: &Tensor) -> Vec<Vec<f32>> {
        let mut ys = try_matmul_many_with(kernels, &[w], x).unwrap().unwrap();
        ys.pop().unwrap().to_vec2().unwrap()
    }

    /// Against `W · x` in f64 on the dequantized weight and the `Q8_K`-rounded activations
    /// (candle's own quantizer): only the kernels' f32 sums differ. Widths of one and of
    /// several blocks, row counts not a multiple of the threads, several activation rows.
    #[test]
    fn kernels_match_dequantized_products() {
        if !available() {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        let dev = Device::Cpu;
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
            for (m, k, n) in [
                (1, 256, 1),
                (1, 2048, 37),
                (3, 512, 64),
                (MAX_ROWS, 1280, 20),
                (11, 512, 33),
                (45, 512, 24), // a prefill, where the kernels take one (AVX2)
            ] {
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
                // Activations with an outlier column, as real hidden states have.
                let x = (Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap() * 0.5).unwrap();
                let x = x
                    .slice_assign(&[0..m, 5..6], &Tensor::full(9f32, (m, 1), &dev).unwrap())
                    .unwrap();
                let q = QTensor::quantize(&w, dtype).unwrap();
                let wd: Vec<Vec<f32>> = q.dequantize(&dev).unwrap().to_vec2().unwrap();
                let xq = QTensor::quantize(&x, GgmlDType::Q8K)
                    .unwrap()
                    .dequantize(&dev)
                    .unwrap();
                let xq: Vec<Vec<f32>> = xq.to_vec2().unwrap();
                for kernels in supported().into_iter().filter(|&k| m <= rows_limit(k)) {
                    let got = product(kernels, &q, &x);
                    for r in 0..m {
                        for i in 0..n {
                            let want: f64 = wd[i]
                                .iter()
                                .zip(&xq[r])
                                .map(|(&a, &b)| a as f64 * b as f64)
                                .sum();
                            let scale: f64 = wd[i]
                                .iter()
                                .zip(&xq[r])
                                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                                .sum();
                            let err = (got[r][i] as f64 - want).abs();
                            assert!(
                                err <= 1e-5 * scale,
                                "{kernels:?} {dtype:?} {m}x{k}x{n} [{r},{i}]: {} vs {want}",
                                got[r][i]
                            );
                        }
                    }
                }
            }
        }
    }

    /// A decoding row's result does not depend on the rows decoded with it.
    #[test]
    fn batched_rows_equal_rows_alone_bit_for_bit() {
        if !available() {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        let dev = Device::Cpu;
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
            // Five blocks: the tiled kernels' runs (of four or two) and a shorter one.
            let q = QTensor::quantize(&Tensor::randn(0f32, 1.0, (40, 1280), &dev).unwrap(), dtype)
                .unwrap();
            // With AVX2, 19 rows are three tiles, the last partial: `Q4_K` takes a pair and
            // one alone, `Q6_K` the three at once; 43 rows are six, `Q4_K` three pairs and
            // `Q6_K` four and two (see `tiled_call`). Each row alone takes the row kernel.
            // The AVX512 kernels take groups of at most `MAX_ROWS`.
            let x = Tensor::randn(0f32, 1.0, (43, 1280), &dev).unwrap();
            for kernels in supported() {
                for m in [19, 43] {
                    let x = x.narrow(0, 0, m.min(rows_limit(kernels))).unwrap();
                    let all = product(kernels, &q, &x);
                    for (r, row) in all.iter().enumerate() {
                        let alone = product(kernels, &q, &x.narrow(0, r, 1).unwrap());
                        assert_eq!(row, &alone[0], "{kernels:?} {dtype:?} {m} rows: row {r}");
                    }
                }
            }
        }
    }

    /// Products dispatched together (mixed types, as a Q4_K_M layer's q/k/v) give, bit for
    /// bit, what each gives alone.
    #[test]
    fn shared_input_products_equal_products_alone() {
        if !available() {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        let dev = Device::Cpu;
        let ws: Vec<QTensor> = [
            (GgmlDType::Q4K, 96),
            (GgmlDType::Q6K, 40),
            (GgmlDType::Q4K, 17),
        ]
        .into_iter()
        .map(|(t, n)| {
            QTensor::quantize(&Tensor::randn(0f32, 1.0, (n, 512), &dev).unwrap(), t).unwrap()
        })
        .collect();
        for m in [1, 3] {
            let x = Tensor::randn(0f32, 1.0, (m, 512), &dev).unwrap();
            let refs: Vec<&QTensor> = ws.iter().collect();
            for kernels in supported() {
                let together = try_matmul_many_with(kernels, &refs, &x).unwrap().unwrap();
                for (w, y) in ws.iter().zip(&together) {
                    let a: Vec<Vec<f32>> = y.to_vec2().unwrap();
                    let b = product(kernels, w, &x);
                    assert_eq!(a, b, "{kernels:?} {:?}, {m} rows", w.dtype());
                }
            }
        }
    }

    /// The vector unpacking of `Q4_K` scales and mins equals the scalar one, on random
    /// packed bytes (every bit pattern of each field occurs).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_scales_and_mins_match_scalar() {
        if !supported().contains(&Kernels::Avx2) {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let mut blk = [0u8; 20];
            for b in &mut blk {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = state as u8;
            }
            let want = q4k_scales_mins(blk[4..16].try_into().unwrap());
            let mut got = [0u8; 16];
            // SAFETY: AVX2 is available; `blk` holds the 20 bytes read.
            unsafe {
                let v = avx2::scales_mins(blk.as_ptr());
                std::arch::x86_64::_mm_storeu_si128(got.as_mut_ptr() as *mut _, v);
            }
            assert_eq!(got, want, "packed {:?}", &blk[4..16]);
        }
    }

    #[test]
    fn rounding_matches_the_library() {
        for v in [
            0.5f32,
            -0.5,
            1.5,
            2.5,
            -2.5,
            0.499_999_97,
            -0.499_999_97,
            126.5,
            3.2,
            -7.7,
            0.0,
        ] {
            assert_eq!(round_half_away(v), v.round(), "{v}");
        }
        assert_eq!(signed_max(&[1.0, -3.0, 3.0, 2.0]), -3.0);
    }

    #[test]
    fn other_types_and_shapes_are_left_to_the_caller() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (8, 256), &dev).unwrap();
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        assert!(
            try_matmul(&q8, &Tensor::ones((1, 256), DType::F32, &dev).unwrap())
                .unwrap()
                .is_none()
        );
        let q4 = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
        let narrow = Tensor::ones((3, 128), DType::F32, &dev).unwrap();
        assert!(try_matmul(&q4, &narrow).unwrap().is_none());
        // Prefill goes to the bf16 GEMM where the AVX512 kernels are chosen (the check comes
        // before any kernel runs, on any CPU).
        let prefill = Tensor::ones((MAX_ROWS + 1, 256), DType::F32, &dev).unwrap();
        assert!(try_matmul_many_with(Kernels::Avx512Vnni, &[&q4], &prefill)
            .unwrap()
            .is_none());
    }
}
