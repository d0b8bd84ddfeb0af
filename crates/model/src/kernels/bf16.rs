//! Our bf16 matrix multiply for x86-64 CPUs, used for `--dtype bf16`. Prefill and the vision
//! tower are compute-bound; candle's GEMM has no bf16 path on CPU.
//!
//! Three kernel sets, chosen at run time ([`kernels`]): with AMX-BF16, prefill products on
//! tiles ([`amx`]: 16 × 16 sums of 32 products per instruction) and the 512-bit kernels for
//! the rest; with AVX512-BF16, `vdpbf16ps` (32 bf16 products into 16 f32 sums per
//! instruction, twice the rate of f32 FMAs); on any CPU with AVX2 and FMA (x86-64 since
//! 2013), the bf16 values widened to f32 (a shift or a mask) and multiplied by 256-bit FMAs.
//! All compute the same thing: the f32 sum of exact products of bf16-rounded operands; only
//! the order of the sums differs.
//!
//! The weight `W: (n, k)` is packed once into panels of 32 output rows; within a panel, for
//! each pair of inputs `(2q, 2q+1)`, 32 bf16 pairs (two 512-bit vectors), the operand
//! layout `vdpbf16ps` multiplies against a broadcast pair of activations. The activations
//! `x: (m, k)` are rounded to bf16 and interleaved by tiles of rows.
//!
//! The product runs tile by tile: `MR × 32` outputs stay in 2·MR registers while a block of
//! `KC` input pairs streams by, the panel's block staying in L1 for every tile and the
//! activations' block in L2 for every panel. Panels are split between threads. (With AVX2,
//! the panel's block is first widened to f32, a sixteenth of it at a time, and tiles are
//! 6 × 16: sixteen 256-bit registers hold 12 sums, two weight vectors and a broadcast.)

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Result, Tensor};

pub(crate) mod amx;
mod unpack;

/// Output rows per panel (two vectors of 16 f32).
const NR: usize = 32;
/// Activation rows per tile: 2·MR accumulators + 3 operands fit the 32 vector registers.
const MR: usize = 12;
/// Input pairs per block.
const KC: usize = 256;
/// Bytes of packed activations (the rows of a short prefill) that stay in L2 while every
/// panel passes over them.
const XP_IN_L2: usize = 256 << 10;
/// Up to this many rows (a batch of decoding sequences) each row is a matrix-vector product
/// summed in exactly the order of a single row's, so that an answer does not depend on what
/// it was batched with; the panel still streams from memory once for all rows.
pub(crate) const GEMV_ROWS: usize = 64;
/// Input pairs per block of the batched matrix-vector product (16 KiB of panel, in L1).
const GEMV_QB: usize = 128;

/// A kernel set (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    /// AMX tiles for prefill, `vdpbf16ps` for decoding.
    Amx,
    /// `vdpbf16ps` on 512-bit vectors.
    Avx512Bf16,
    /// bf16 widened to f32, then 256-bit FMAs.
    Avx2Fma,
}

impl std::fmt::Display for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kernels::Amx => "AMX-BF16",
            Kernels::Avx512Bf16 => "AVX512-BF16",
            Kernels::Avx2Fma => "AVX2+FMA",
        })
    }
}

/// The fastest kernel set this CPU runs; `None` where none does (another architecture, or
/// an x86-64 without AVX2). `KOLLAVA_KERNELS=avx2` (or `avx512`) picks that set on a CPU with
/// faster ones (to measure or test it there; see [`crate::kernels::cpu`]).
pub fn kernels() -> Option<Kernels> {
    use crate::kernels::cpu::{cpu, Request};
    static KERNELS: std::sync::OnceLock<Option<Kernels>> = std::sync::OnceLock::new();
    *KERNELS.get_or_init(|| {
        let all = supported();
        match cpu().request {
            Request::Avx2 => all.into_iter().find(|&k| k == Kernels::Avx2Fma),
            Request::Avx512 => all.into_iter().find(|&k| k != Kernels::Amx),
            Request::Fastest => all.first().copied(),
        }
    })
}

/// Every kernel set this CPU runs, fastest first.
pub fn supported() -> Vec<Kernels> {
    let c = crate::kernels::cpu::cpu();
    let mut all = Vec::new();
    if c.avx512bf16 && c.avx512vl {
        if c.amx {
            all.push(Kernels::Amx);
        }
        all.push(Kernels::Avx512Bf16);
    }
    if c.avx2_fma {
        all.push(Kernels::Avx2Fma);
    }
    all
}

/// Whether this CPU runs the kernels.
pub fn available() -> bool {
    kernels().is_some()
}

/// `f32 → bf16`, round to nearest even (as PyTorch and llama.cpp convert).
fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    if x.is_nan() {
        return (b >> 16) | 0x40;
    }
    (b + 0x7fff + ((b >> 16) & 1)) >> 16
}

pub(crate) fn pair(lo: f32, hi: f32) -> u32 {
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
    /// Packs `w: (n, k)` (f32, f16 or bf16), rounding to bf16, straight from its storage
    /// (no widened copy: a 7B model's `lm_head` would take 0.5 GB in f32).
    pub fn pack(w: &Tensor) -> Result<Self> {
        let (n, k) = w.dims2()?;
        let w = w.contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("bf16 packing of a non-CPU tensor");
        };
        let o = layout.start_offset();
        match cpu {
            candle_core::CpuStorage::F32(v) => Ok(Self::pack_with(n, k, |i| v[o + i])),
            candle_core::CpuStorage::BF16(v) => Ok(Self::pack_with(n, k, |i| v[o + i].to_f32())),
            candle_core::CpuStorage::F16(v) => Ok(Self::pack_with(n, k, |i| v[o + i].to_f32())),
            _ => candle_core::bail!("bf16 packing of a {:?} tensor", w.dtype()),
        }
    }

    /// Packs the `(n, k)` row-major matrix whose element `i` is `at(i)`.
    fn pack_with(n: usize, k: usize, at: impl Fn(usize) -> f32 + Sync) -> Self {
        use rayon::prelude::*;
        let pairs = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u32; panels * pairs * NR];
        let get = |r: usize, c: usize| if r < n && c < k { at(r * k + c) } else { 0.0 };
        let fill = |(p, panel): (usize, &mut [u32])| {
            for (q, dst) in panel.chunks_exact_mut(NR).enumerate() {
                for (lane, d) in dst.iter_mut().enumerate() {
                    let r = p * NR + lane;
                    *d = pair(get(r, 2 * q), get(r, 2 * q + 1));
                }
            }
        };
        data.par_chunks_mut(pairs * NR).enumerate().for_each(fill);
        Self {
            n,
            k,
            pairs,
            panels,
            data,
        }
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
        let Some(kernels) = kernels() else {
            candle_core::bail!("bf16 matmul: this CPU has neither AVX512-BF16 nor AVX2+FMA");
        };
        self.matmul_with(kernels, x)
    }

    /// [`Self::matmul`] through the given kernels (one of [`supported`]).
    fn matmul_with(&self, kernels: Kernels, x: &Tensor) -> Result<Tensor> {
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
        let c = if m <= GEMV_ROWS {
            let mut c = vec![0f32; m * ldc];
            match kernels {
                Kernels::Amx | Kernels::Avx512Bf16 => {
                    self.gemv(&pack_rows::<1>(xs, m, k, self.pairs), m, &mut c, ldc)
                }
                Kernels::Avx2Fma => self.gemv_avx2(xs, m, &mut c, ldc),
            }
            c
        } else {
            gemm(kernels, self, xs, m, k)
        };
        drop(storage);
        output(c, m, self.n, ldc, dims, x.device())
    }

    /// Rows of activations (at most `GEMV_ROWS`) against all panels, ranges of panels handed
    /// to candle's persistent worker threads (which spin between products instead of
    /// sleeping: a decoded token is ~150 products of a millisecond or less). Each panel
    /// streams once, start to end, with independent sums.
    fn gemv(&self, xp: &[u32], rows: usize, c: &mut [f32], ldc: usize) {
        let c_addr = c.as_mut_ptr() as usize;
        candle_core::utils::barrier_pool().execute_chunked(self.panels, |panels| {
            for p in panels {
                let w = &self.data[p * self.pairs * NR..(p + 1) * self.pairs * NR];
                // SAFETY: `available()` was checked when the layer chose this kernel; `w`
                // holds the panel's `pairs` pairs, `xp` the `rows` rows of `pairs` pairs
                // each; each panel's columns of `c` are written by the one thread that
                // took the panel.
                unsafe {
                    let cp = (c_addr as *mut f32).add(p * NR);
                    if rows == 1 {
                        gemv_panel(xp.as_ptr(), w.as_ptr(), self.pairs, cp);
                    } else {
                        gemv_rows_panel(xp.as_ptr(), rows, w.as_ptr(), self.pairs, cp, ldc);
                    }
                }
            }
        });
    }

    /// [`Self::gemv`] with AVX2: each row alone against each panel (so a batch's rows get
    /// what they would alone), the panel in L2 for the batch's other rows.
    fn gemv_avx2(&self, xs: &[f32], rows: usize, c: &mut [f32], ldc: usize) {
        let xr = avx2::rounded_rows(xs, rows, self.k, 2 * self.pairs);
        let c_addr = c.as_mut_ptr() as usize;
        candle_core::utils::barrier_pool().execute_chunked(self.panels, |panels| {
            for p in panels {
                let w = &self.data[p * self.pairs * NR..(p + 1) * self.pairs * NR];
                for (j, x) in xr.chunks_exact(2 * self.pairs).enumerate() {
                    // SAFETY: the caller chose these kernels from `supported()`; `w` holds
                    // the panel's pairs, `x` twice as many values; each panel's columns of
                    // `c` are written by the one thread that took the panel.
                    unsafe {
                        let cp = (c_addr as *mut f32).add(j * ldc + p * NR);
                        avx2::gemv_panel(x.as_ptr(), w.as_ptr(), self.pairs, cp);
                    }
                }
            }
        });
    }
}

impl Panels for PackedBf16 {
    fn dims(&self) -> (usize, usize) {
        (self.panels, self.pairs)
    }

    fn block<'a>(
        &'a self,
        _: Kernels,
        p: usize,
        q0: usize,
        _kc: usize,
        _buf: &'a mut Vec<u32>,
    ) -> &'a [u32] {
        &self.data[(p * self.pairs + q0) * NR..]
    }

    fn blocks_are_views(&self) -> bool {
        true
    }
}

/// Where the tiled product gets a weight's panels: a [`PackedBf16`] hands out its own
/// memory; a ggml weight ([`matmul_ggml`]) is unpacked block by block into the worker's
/// buffer just before use, so that no widened copy of it is ever kept.
trait Panels: Sync {
    /// `(panels, pairs)`.
    fn dims(&self) -> (usize, usize);
    /// Pairs `q0..q0 + kc` of panel `p`: `kc × NR` bf16 pairs (the slice may run on),
    /// unpacked (if it must be) with `kernels`.
    fn block<'a>(
        &'a self,
        kernels: Kernels,
        p: usize,
        q0: usize,
        kc: usize,
        buf: &'a mut Vec<u32>,
    ) -> &'a [u32];
    /// Whether [`Panels::block`] costs nothing (a view), so that a block may be asked for
    /// again rather than kept.
    fn blocks_are_views(&self) -> bool {
        false
    }
}

/// `xs: (m, k)` times the panels, in tiles of `MR` rows: `MR × 32` outputs stay in
/// registers while a block of `KC` pairs streams by, the panel's block (32 KiB) staying in
/// L1 for every tile. The activations' block stays in L2 for every panel only while the
/// rows are few: a 577-row tower input's is about 1 MB and streams from L3. The AVX2 path
/// groups its tiles to keep it in L2; whether this path would gain as well is unmeasured
/// (the one AVX-512 CPU at hand since had AMX, whose `amx::gemm` takes these products).
/// Ranges of panels go to candle's worker threads.
/// Returns `c` with rows of `panels · NR` (at least `m` rows).
fn gemm(kernels: Kernels, w: &impl Panels, xs: &[f32], m: usize, k: usize) -> Vec<f32> {
    let (panels, pairs) = w.dims();
    match kernels {
        Kernels::Avx2Fma => return avx2::gemm(w, xs, m, k),
        Kernels::Amx if amx::fits(k, pairs) => return amx::gemm(w, xs, m, k),
        Kernels::Amx | Kernels::Avx512Bf16 => {}
    }
    let ldc = panels * NR;
    let tiles = m.div_ceil(MR);
    let xp = pack_rows::<MR>(xs, m, k, pairs);
    let mut c = vec![0f32; tiles * MR * ldc];
    let c_addr = c.as_mut_ptr() as usize;
    // Few rows (a short prefill): all of them stay in L2, and each panel's blocks are taken
    // one after another, so that its weight rows stream from memory in order (a ggml
    // weight's are unpacked on the way). Each sum runs in the same order either way.
    let panel_by_panel = xp.len() * 4 <= XP_IN_L2;
    candle_core::utils::barrier_pool().execute_chunked(panels, |range| {
        let mut buf = Vec::new();
        let blocks = (0..pairs).step_by(KC);
        let steps: Box<dyn Iterator<Item = (usize, usize)>> = if panel_by_panel {
            Box::new(range.flat_map(|p| blocks.clone().map(move |q0| (q0, p))))
        } else {
            Box::new(blocks.flat_map(|q0| range.clone().map(move |p| (q0, p))))
        };
        for (q0, p) in steps {
            let kc = KC.min(pairs - q0);
            let wb = w.block(kernels, p, q0, kc, &mut buf);
            assert!(wb.len() >= kc * NR);
            for t in 0..tiles {
                let x = &xp[(t * pairs + q0) * MR..];
                // SAFETY: the caller chose these kernels from `supported()`; the slices hold
                // `kc` pairs from here; each (tile, panel) block of `c` is written by the one
                // thread that took the panel.
                unsafe {
                    let cp = (c_addr as *mut f32).add(t * MR * ldc + p * NR);
                    let live = MR.min(m - t * MR);
                    tile_rows(live, x.as_ptr(), wb.as_ptr(), kc, cp, ldc, q0 > 0);
                }
            }
        }
    });
    c
}

/// The first `m` rows of `c` (row stride `ldc`), `n` wide, as a tensor of `dims` + `n`.
fn output(
    mut c: Vec<f32>,
    m: usize,
    n: usize,
    ldc: usize,
    mut dims: Vec<usize>,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let out = if ldc == n {
        c.truncate(m * n);
        c
    } else {
        (0..m)
            .flat_map(|r| c[r * ldc..r * ldc + n].iter().copied())
            .collect()
    };
    dims.push(n);
    Tensor::from_vec(out, dims, device)
}

/// Activations `(m, k)` as bf16 pairs, tile-interleaved: `[tile][pair][row in tile]`.
fn pack_rows<const R: usize>(xs: &[f32], m: usize, k: usize, pairs: usize) -> Vec<u32> {
    use rayon::prelude::*;
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

/// `x: (…, k)` times a ggml weight `w: (n, k)` (any of the quantized types; not the float
/// ones, whose exact product is the f32 GEMM's), through the tiled kernel: each panel block
/// is dequantized and rounded to bf16 just before use. This is how prefill multiplies a
/// quantized model: the dequantization is amortized over every row of the prompt, and the
/// weight stays in its file's blocks (no repacked copy). `None`: not for these kernels.
pub fn matmul_ggml(w: &QTensor, x: &Tensor) -> Result<Option<Tensor>> {
    match kernels() {
        Some(kernels) => matmul_ggml_with(kernels, w, x),
        None => Ok(None),
    }
}

fn matmul_ggml_with(kernels: Kernels, w: &QTensor, x: &Tensor) -> Result<Option<Tensor>> {
    let Some(to_f32) = block_decoder(w.dtype()) else {
        return Ok(None);
    };
    let (n, k) = w.shape().dims2()?;
    let mut dims = x.dims().to_vec();
    let block = w.dtype().block_size();
    if !x.device().is_cpu() || dims.pop() != Some(k) || k % block != 0 {
        return Ok(None);
    }
    let m: usize = dims.iter().product();
    let data = w.data()?;
    let row_bytes = k / block * w.dtype().type_size();
    if data.len() != n * row_bytes {
        candle_core::bail!(
            "{:?} weight of {n}x{k} holds {} bytes",
            w.dtype(),
            data.len()
        );
    }
    if !(data.as_ptr() as usize).is_multiple_of(4) {
        // The blocks are read in place (their f16 fields need 2-byte alignment).
        return Ok(None);
    }
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let xs = &cpu.as_slice::<f32>()?[layout.start_offset()..layout.start_offset() + m * k];
    let src = GgmlPanels {
        data: &data,
        n,
        k,
        row_bytes,
        block,
        block_bytes: w.dtype().type_size(),
        to_f32,
        to_pairs: unpack::decoder(w.dtype()).filter(|_| kernels != Kernels::Avx2Fma),
    };
    let c = gemm(kernels, &src, xs, m, k);
    drop(storage);
    Ok(Some(output(
        c,
        m,
        n,
        n.div_ceil(NR) * NR,
        dims,
        &candle_core::Device::Cpu,
    )?))
}

/// Rows `ids` of a ggml matrix `(n, k)` as f32, `(ids.len(), k)` row-major: a lookup in a
/// quantized embedding table that unpacks only the rows it needs.
pub fn ggml_rows(w: &QTensor, ids: &[u32]) -> Result<Vec<f32>> {
    let (n, k) = w.shape().dims2()?;
    let (block, block_bytes) = (w.dtype().block_size(), w.dtype().type_size());
    let data = w.data()?;
    let row_bytes = k / block * block_bytes;
    if !k.is_multiple_of(block) || data.len() != n * row_bytes {
        candle_core::bail!(
            "{:?} table of {n}x{k} holds {} bytes",
            w.dtype(),
            data.len()
        );
    }
    let decode: BlockDecoder = match w.dtype() {
        GgmlDType::F32 => |b, out| {
            for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        },
        GgmlDType::F16 => |b, out| {
            for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        },
        GgmlDType::BF16 => |b, out| {
            for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        },
        t => match block_decoder(t) {
            Some(d) if (data.as_ptr() as usize).is_multiple_of(4) => d,
            _ => candle_core::bail!("cannot read rows of a {t:?} table"),
        },
    };
    let mut out = vec![0f32; ids.len() * k];
    for (&id, o) in ids.iter().zip(out.chunks_exact_mut(k)) {
        let r = id as usize;
        if r >= n {
            candle_core::bail!("token id {id} is beyond the table's {n} rows");
        }
        decode(&data[r * row_bytes..(r + 1) * row_bytes], o);
    }
    Ok(out)
}

/// Decodes whole ggml blocks (bytes) into f32.
type BlockDecoder = fn(&[u8], &mut [f32]);

fn block_decoder(dtype: GgmlDType) -> Option<BlockDecoder> {
    use candle_core::quantized::k_quants::*;
    /// Blocks of `T` read in place; the caller checked the alignment.
    fn decode<T: GgmlType>(bytes: &[u8], out: &mut [f32]) {
        let count = bytes.len() / std::mem::size_of::<T>();
        assert!((bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()));
        // SAFETY: ggml blocks are plain bytes and f16s, valid for any bit pattern; the
        // pointer is aligned (asserted) and `count` blocks lie within `bytes`.
        let blocks = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), count) };
        T::to_float(blocks, &mut out[..count * T::BLCK_SIZE]);
    }
    Some(match dtype {
        GgmlDType::Q4_0 => decode::<BlockQ4_0>,
        GgmlDType::Q4_1 => decode::<BlockQ4_1>,
        GgmlDType::Q5_0 => decode::<BlockQ5_0>,
        GgmlDType::Q5_1 => decode::<BlockQ5_1>,
        GgmlDType::Q8_0 => decode::<BlockQ8_0>,
        GgmlDType::Q2K => decode::<BlockQ2K>,
        GgmlDType::Q3K => decode::<BlockQ3K>,
        GgmlDType::Q4K => decode::<BlockQ4K>,
        GgmlDType::Q5K => decode::<BlockQ5K>,
        GgmlDType::Q6K => decode::<BlockQ6K>,
        _ => return None,
    })
}

/// A ggml weight's rows, unpacked into panels on demand.
struct GgmlPanels<'a> {
    data: &'a [u8],
    n: usize,
    k: usize,
    row_bytes: usize,
    /// Values and bytes per ggml block.
    block: usize,
    block_bytes: usize,
    to_f32: BlockDecoder,
    /// Straight to bf16 pairs, where [`unpack`] has a decoder for the type on this CPU.
    to_pairs: Option<unpack::PairDecoder>,
}

impl Panels for GgmlPanels<'_> {
    fn dims(&self) -> (usize, usize) {
        (self.n.div_ceil(NR), self.k.div_ceil(2))
    }

    fn block<'a>(
        &'a self,
        kernels: Kernels,
        p: usize,
        q0: usize,
        kc: usize,
        buf: &'a mut Vec<u32>,
    ) -> &'a [u32] {
        let simd = kernels != Kernels::Avx2Fma;
        // A block of `KC` pairs is 512 values: whole ggml blocks (32 or 256 values).
        let (e0, e1) = (2 * q0, (2 * (q0 + kc)).min(self.k));
        let bytes = e0 / self.block * self.block_bytes..e1 / self.block * self.block_bytes;
        // Row by row into `rows` (bf16 pairs, row-major), then transposed into the panel.
        buf.resize(2 * kc * NR, 0);
        let (panel, rows) = buf.split_at_mut(kc * NR);
        let mut values = [0f32; 2 * KC];
        let live = NR.min(self.n - p * NR);
        for lane in 0..live {
            let start = (p * NR + lane) * self.row_bytes;
            let out = &mut rows[lane * kc..(lane + 1) * kc];
            if let Some(to_pairs) = self.to_pairs {
                to_pairs(&self.data[start + bytes.start..start + bytes.end], out);
                continue;
            }
            (self.to_f32)(
                &self.data[start + bytes.start..start + bytes.end],
                &mut values[..e1 - e0],
            );
            if simd {
                // SAFETY: the caller chose AMX or AVX512-BF16 from `supported()`.
                unsafe { round_pairs(&values[..2 * kc], out) };
            } else {
                for (o, v) in out.iter_mut().zip(values.chunks_exact(2)) {
                    *o = pair(v[0], v[1]);
                }
            }
        }
        rows[live * kc..].fill(0);
        // Quantized rows hold whole blocks of 32 or more values: `kc` is a multiple of 16.
        debug_assert!(kc.is_multiple_of(16));
        for lane in (0..NR).step_by(16) {
            for q in (0..kc).step_by(16) {
                let (src, dst) = (&rows[lane * kc + q..], &mut panel[q * NR + lane..]);
                if simd {
                    // SAFETY: the caller chose AMX or AVX512-BF16 from `supported()`; the 16 × 16
                    // blocks lie within `rows` and `panel`.
                    unsafe { transpose16(src.as_ptr(), kc, dst.as_mut_ptr(), NR) };
                } else {
                    for i in 0..16 {
                        for j in 0..16 {
                            dst[j * NR + i] = src[i * kc + j];
                        }
                    }
                }
            }
        }
        panel
    }
}

/// `dst[j·dst_stride + i] = src[i·src_stride + j]` for `i, j < 16`: interleaves of 32- and
/// 64-bit elements, then two rounds of 128-bit lane shuffles.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(src: *const u32, src_stride: usize, dst: *mut u32, dst_stride: usize) {
    use std::arch::x86_64::*;
    let r: [__m512i; 16] =
        std::array::from_fn(|i| _mm512_loadu_si512(src.add(i * src_stride) as *const _));
    // Per 128-bit lane: rows (2k, 2k+1) interleaved by 32 bits.
    let t: [__m512i; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_epi32(a, b)
        } else {
            _mm512_unpackhi_epi32(a, b)
        }
    });
    // u[4g + c], lane L: rows 4g..4g+4 of column 4L + c.
    let u: [__m512i; 16] = std::array::from_fn(|i| {
        let (g, c) = (i / 4, i % 4);
        let (a, b) = (t[4 * g + c / 2], t[4 * g + 2 + c / 2]);
        if c % 2 == 0 {
            _mm512_unpacklo_epi64(a, b)
        } else {
            _mm512_unpackhi_epi64(a, b)
        }
    });
    for c in 0..4 {
        let v0 = _mm512_shuffle_i32x4::<0x44>(u[c], u[4 + c]);
        let v1 = _mm512_shuffle_i32x4::<0xEE>(u[c], u[4 + c]);
        let w0 = _mm512_shuffle_i32x4::<0x44>(u[8 + c], u[12 + c]);
        let w1 = _mm512_shuffle_i32x4::<0xEE>(u[8 + c], u[12 + c]);
        let cols = [
            _mm512_shuffle_i32x4::<0x88>(v0, w0),
            _mm512_shuffle_i32x4::<0xDD>(v0, w0),
            _mm512_shuffle_i32x4::<0x88>(v1, w1),
            _mm512_shuffle_i32x4::<0xDD>(v1, w1),
        ];
        for (l, col) in cols.into_iter().enumerate() {
            _mm512_storeu_si512(dst.add((4 * l + c) * dst_stride) as *mut _, col);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn transpose16(_: *const u32, _: usize, _: *mut u32, _: usize) {
    unreachable!("the bf16 kernels are only chosen where available() holds")
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn round_pairs(_: &[f32], _: &mut [u32]) {
    unreachable!("the bf16 kernels are only chosen where available() holds")
}

/// `values` (an even count) → bf16 pairs, as [`pair`] rounds them, sixteen values at a
/// time: `vcvtneps2bf16` rounds to nearest even, as [`bf16_bits`] does, and the two halves
/// of a pair are adjacent in memory.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
pub(crate) unsafe fn round_pairs(values: &[f32], out: &mut [u32]) {
    use std::arch::x86_64::*;
    let pairs = out.len().min(values.len() / 2);
    let mut q = 0;
    while q + 8 <= pairs {
        let v = _mm512_loadu_ps(values.as_ptr().add(2 * q));
        let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
        _mm256_storeu_si256(out.as_mut_ptr().add(q) as *mut __m256i, b);
        q += 8;
    }
    for (o, v) in out[q..pairs]
        .iter_mut()
        .zip(values[2 * q..].chunks_exact(2))
    {
        *o = pair(v[0], v[1]);
    }
}

/// [`tile`] for the first `live` rows of a tile: a prompt's last tile (or a short step's
/// only one) computes only its rows. Each row's sums run in the same order whatever `live`
/// is.
unsafe fn tile_rows(
    live: usize,
    x: *const u32,
    w: *const u32,
    kc: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    macro_rules! rows {
        ($($r:literal)*) => {
            match live {
                $($r => tile::<$r>(x, w, kc, c, ldc, accumulate),)*
                _ => tile::<MR>(x, w, kc, c, ldc, accumulate),
            }
        };
    }
    const _: () = assert!(MR == 12);
    rows!(1 2 3 4 5 6 7 8 9 10 11)
}

/// One `R × 32` block of `c` (row stride `ldc`) += (or =) `kc` pairs of a tile (rows
/// [`MR`] apart) times a panel.
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
            let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(*x.add(q * MR + j) as i32));
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
        // Four pairs are 512 bytes of the panel: eight lines.
        crate::kernels::prefetch::ahead::<8>(w.wrapping_add(q * NR) as *const u8);
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

/// The AVX2+FMA kernels: the same packed weights, widened to f32 in registers (decode) or a
/// sixteenth of a block at a time into L1 (prefill).
mod avx2 {
    use super::{Panels, KC, NR};

    /// Activation rows per prefill tile.
    const MR: usize = 6;
    /// Tiles whose activations (one block of `KC` pairs: 12 KiB a tile) stay in L2 while
    /// every panel of a thread passes over them.
    const TILE_GROUP: usize = 16;
    /// Input pairs widened at a time: 64 pairs × 2 inputs × 32 f32 = 16 KiB, in L1.
    const SUB: usize = 64;

    fn round(x: f32) -> f32 {
        f32::from_bits(super::bf16_bits(x) << 16)
    }

    /// Rows of `xs: (m, k)` rounded to bf16 (kept as f32), each padded to `width`.
    pub(super) fn rounded_rows(xs: &[f32], m: usize, k: usize, width: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * width];
        for (o, x) in out.chunks_exact_mut(width).zip(xs.chunks_exact(k)) {
            for (o, &x) in o.iter_mut().zip(x) {
                *o = round(x);
            }
        }
        out
    }

    /// Rows of `xs: (m, k)` rounded, tile-interleaved: `[tile][input][row in tile]`, each
    /// tile `width` inputs long (zeros beyond `k` and beyond `m`).
    fn pack_tiles(xs: &[f32], m: usize, k: usize, width: usize) -> Vec<f32> {
        use rayon::prelude::*;
        let mut xp = vec![0f32; m.div_ceil(MR) * width * MR];
        xp.par_chunks_mut(width * MR)
            .enumerate()
            .for_each(|(t, tile)| {
                for j in 0..MR.min(m - t * MR) {
                    let row = &xs[(t * MR + j) * k..(t * MR + j + 1) * k];
                    for (i, &x) in row.iter().enumerate() {
                        tile[i * MR + j] = round(x);
                    }
                }
            });
        xp
    }

    /// [`super::gemm`] with these kernels, over [`TILE_GROUP`] tiles at a time where the
    /// weight's blocks are views (a ggml weight's are unpacked once per block instead, and
    /// its activations stream from L3): about 8 % more GFLOP/s on the tower's and a 1B
    /// decoder's shapes than every tile per panel (`examples/bf16_gemm`).
    pub(super) fn gemm(w: &impl Panels, xs: &[f32], m: usize, k: usize) -> Vec<f32> {
        let (panels, pairs) = w.dims();
        let (ldc, width, tiles) = (panels * NR, 2 * pairs, m.div_ceil(MR));
        let xp = pack_tiles(xs, m, k, width);
        let mut c = vec![0f32; tiles * MR * ldc];
        let c_addr = c.as_mut_ptr() as usize;
        candle_core::utils::barrier_pool().execute_chunked(panels, |range| {
            // Cache-line aligned, so that no weight vector load straddles two lines.
            #[derive(Clone, Copy)]
            #[repr(align(64))]
            struct Line(#[allow(dead_code)] [f32; 16]); // written and read through `wide`
            let (mut buf, mut lines) = (Vec::new(), vec![Line([0.0; 16]); 2 * SUB * NR / 16]);
            let wide = lines.as_mut_ptr() as *mut f32;
            let group = if w.blocks_are_views() {
                TILE_GROUP
            } else {
                tiles
            };
            for q0 in (0..pairs).step_by(KC) {
                let kc = KC.min(pairs - q0);
                for t0 in (0..tiles).step_by(group) {
                    let t1 = tiles.min(t0 + group);
                    for p in range.clone() {
                        let wb = w.block(super::Kernels::Avx2Fma, p, q0, kc, &mut buf);
                        assert!(wb.len() >= kc * NR);
                        for s0 in (0..kc).step_by(SUB) {
                            let sc = SUB.min(kc - s0);
                            // SAFETY: the caller chose these kernels from `supported()`; `wb`
                            // holds `kc` pairs, `wide` room for `SUB`; the tiles hold `width`
                            // inputs; each (tile, panel) block of `c` is written by the one
                            // thread that took the panel.
                            unsafe {
                                widen(wb.as_ptr().add(s0 * NR), sc, wide);
                                let i0 = 2 * (q0 + s0);
                                for t in t0..t1 {
                                    let x = xp.as_ptr().add((t * width + i0) * MR);
                                    for half in 0..2 {
                                        let cp = (c_addr as *mut f32)
                                            .add(t * MR * ldc + p * NR + 16 * half);
                                        tile(x, wide.add(16 * half), 2 * sc, cp, ldc, i0 > 0);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        });
        c
    }

    /// `pairs` pairs of a panel (32 bf16 pairs each) → `[input][32]` f32, both inputs of a
    /// pair in turn.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn widen(src: *const u32, pairs: usize, dst: *mut f32) {
        use std::arch::x86_64::*;
        let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
        for q in 0..pairs {
            for v in 0..NR / 8 {
                let u = _mm256_loadu_si256(src.add(q * NR + 8 * v) as *const __m256i);
                _mm256_storeu_si256(
                    dst.add(2 * q * NR + 8 * v) as *mut __m256i,
                    _mm256_slli_epi32::<16>(u),
                );
                _mm256_storeu_si256(
                    dst.add((2 * q + 1) * NR + 8 * v) as *mut __m256i,
                    _mm256_and_si256(u, high),
                );
            }
        }
    }

    /// One `6 × 16` block of `c` (row stride `ldc`) += (or =) `inputs` inputs of a tile
    /// (`[input][6]`) times 16 columns of widened weights (`[input][32]`, from `w`).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile(
        x: *const f32,
        w: *const f32,
        inputs: usize,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        if accumulate {
            for (j, a) in acc.iter_mut().enumerate() {
                a[0] = _mm256_loadu_ps(c.add(j * ldc));
                a[1] = _mm256_loadu_ps(c.add(j * ldc + 8));
            }
        }
        for i in 0..inputs {
            let w0 = _mm256_loadu_ps(w.add(i * NR));
            let w1 = _mm256_loadu_ps(w.add(i * NR + 8));
            for (j, a) in acc.iter_mut().enumerate() {
                let b = _mm256_broadcast_ss(&*x.add(i * MR + j));
                a[0] = _mm256_fmadd_ps(w0, b, a[0]);
                a[1] = _mm256_fmadd_ps(w1, b, a[1]);
            }
        }
        for (j, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(c.add(j * ldc), a[0]);
            _mm256_storeu_ps(c.add(j * ldc + 8), a[1]);
        }
    }

    /// One panel times one row of rounded activations (`2 · pairs` values) into 32 outputs,
    /// the weights widened in registers; each pair's two inputs into their own sums.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemv_panel(x: *const f32, w: *const u32, pairs: usize, c: *mut f32) {
        use std::arch::x86_64::*;
        let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
        let mut lo = [_mm256_setzero_ps(); NR / 8];
        let mut hi = [_mm256_setzero_ps(); NR / 8];
        for q in 0..pairs {
            // A pair is 128 bytes of the panel: two lines.
            crate::kernels::prefetch::ahead::<2>(w.wrapping_add(q * NR) as *const u8);
            let x0 = _mm256_broadcast_ss(&*x.add(2 * q));
            let x1 = _mm256_broadcast_ss(&*x.add(2 * q + 1));
            for v in 0..NR / 8 {
                let u = _mm256_loadu_si256(w.add(q * NR + 8 * v) as *const __m256i);
                let (wl, wh) = (
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(u)),
                    _mm256_castsi256_ps(_mm256_and_si256(u, high)),
                );
                lo[v] = _mm256_fmadd_ps(wl, x0, lo[v]);
                hi[v] = _mm256_fmadd_ps(wh, x1, hi[v]);
            }
        }
        for v in 0..NR / 8 {
            _mm256_storeu_ps(c.add(8 * v), _mm256_add_ps(lo[v], hi[v]));
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn widen(_: *const u32, _: usize, _: *mut f32) {
        unreachable!("the bf16 kernels are only chosen where available() holds")
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn tile(_: *const f32, _: *const f32, _: usize, _: *mut f32, _: usize, _: bool) {
        unreachable!("the bf16 kernels are only chosen where available() holds")
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub(super) unsafe fn gemv_panel(_: *const f32, _: *const u32, _: usize, _: *mut f32) {
        unreachable!("the bf16 kernels are only chosen where available() holds")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against an f32 product of the bf16-rounded operands, on shapes with every edge: rows
    /// not a multiple of the panel, odd widths, several blocks, a partial tile; with every
    /// kernel set this CPU runs.
    #[test]
    fn matches_f32_on_rounded_operands() {
        if !available() {
            eprintln!("skipped: this CPU runs none of the bf16 kernels");
            return;
        }
        let d = Device::Cpu;
        for (m, k, n) in [
            (1, 64, 32),
            (13, 1031, 45),
            (30, 600, 96),
            (1, 5, 3),
            (70, 600, 40),
            (100, 600, 40), // two groups of tiles, the second partial
            (70, 640, 40),  // AMX: two blocks of pairs, the second short; a partial row block
            (97, 1024, 96), // AMX: three panels, four row blocks
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &d).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &d).unwrap();
            let round = |t: &Tensor| {
                t.to_dtype(DType::BF16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
            };
            let want = round(&x).matmul(&round(&w).t().unwrap()).unwrap();
            let scale = kollava_testkit::max_abs_diff_tensors(&want, &want.zeros_like().unwrap());
            let packed = PackedBf16::pack(&w).unwrap();
            for kernels in supported() {
                let got = packed.matmul_with(kernels, &x).unwrap();
                let err = kollava_testkit::max_abs_diff_tensors(&got, &want);
                assert!(
                    err <= 1e-4 * scale.max(1.0),
                    "{kernels} {m}x{k}x{n}: {err} (scale {scale})"
                );
            }
        }
    }

    /// A batch of decoding rows gets, bit for bit, what each row gets alone (a server's
    /// greedy answer must not depend on its batch), and the prefill tiles stay close.
    #[test]
    fn batched_rows_equal_rows_alone_bit_for_bit() {
        if !available() {
            eprintln!("skipped: this CPU runs none of the bf16 kernels");
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
            for kernels in supported() {
                let batched: Vec<Vec<f32>> = w.matmul_with(kernels, &x).unwrap().to_vec2().unwrap();
                for (r, row) in batched.iter().enumerate() {
                    let alone: Vec<Vec<f32>> = w
                        .matmul_with(kernels, &x.narrow(0, r, 1).unwrap())
                        .unwrap()
                        .to_vec2()
                        .unwrap();
                    assert_eq!(row, &alone[0], "{kernels} {m}x{k}x{n}: row {r}");
                }
            }
        }
    }

    /// Through the tiled kernel over a ggml weight, a row's numbers do not depend on how many
    /// rows share the product, nor where in its tile the row falls (a prompt cut after a
    /// reused prefix is prefilled with the bits a cold prefill computes).
    #[test]
    fn ggml_rows_equal_rows_alone_bit_for_bit() {
        use candle_core::quantized::{GgmlDType, QTensor};
        if !available() {
            eprintln!("skipped: this CPU runs none of the bf16 kernels");
            return;
        }
        let d = Device::Cpu;
        let (k, n) = (1024, 80);
        let x = Tensor::randn(0f32, 1.0, (31, k), &d).unwrap();
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q8_0] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &d).unwrap();
            let w = QTensor::quantize(&w, dtype).unwrap();
            for kernels in supported() {
                let product = |x: &Tensor| -> Vec<Vec<f32>> {
                    matmul_ggml_with(kernels, &w, x)
                        .unwrap()
                        .unwrap()
                        .to_vec2()
                        .unwrap()
                };
                let all = product(&x);
                for (start, len) in [(0, 1), (3, 5), (7, 17), (30, 1)] {
                    let part = product(&x.narrow(0, start, len).unwrap());
                    assert_eq!(
                        &all[start..start + len],
                        &part[..],
                        "{kernels} {dtype:?}: rows {start}..{}",
                        start + len
                    );
                }
            }
        }
    }

    /// A quantized weight through the tiled kernel equals the f32 product of the bf16-rounded
    /// operands (the weight dequantized first), for every ggml type prefill may meet, on
    /// shapes with a partial panel, several `KC` blocks and a partial tile.
    #[test]
    fn ggml_weights_match_f32_on_rounded_operands() {
        if !available() {
            eprintln!("skipped: this CPU runs none of the bf16 kernels");
            return;
        }
        let d = Device::Cpu;
        let round = |t: &Tensor| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        for dtype in [
            GgmlDType::Q4K,
            GgmlDType::Q6K,
            GgmlDType::Q5K,
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
        ] {
            for (m, k, n) in [(17, 256, 32), (40, 1536, 45), (13, 768, 70)] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &d).unwrap();
                let w = Tensor::randn(0f32, 1.0, (n, k), &d).unwrap();
                let q = QTensor::quantize(&w, dtype).unwrap();
                let wd = q.dequantize(&d).unwrap();
                let want = round(&x).matmul(&round(&wd).t().unwrap()).unwrap();
                let scale =
                    kollava_testkit::max_abs_diff_tensors(&want, &want.zeros_like().unwrap());
                for kernels in supported() {
                    let got = matmul_ggml_with(kernels, &q, &x)
                        .unwrap()
                        .expect("a quantized weight");
                    let err = kollava_testkit::max_abs_diff_tensors(&got, &want);
                    assert!(
                        err <= 1e-4 * scale.max(1.0),
                        "{kernels} {dtype:?} {m}x{k}x{n}: {err} (scale {scale})"
                    );
                }
            }
        }
        // Float weights keep their exact product elsewhere.
        let f = QTensor::quantize(
            &Tensor::ones((32, 64), DType::F32, &d).unwrap(),
            GgmlDType::F16,
        )
        .unwrap();
        let x = Tensor::ones((20, 64), DType::F32, &d).unwrap();
        assert!(matmul_ggml(&f, &x).unwrap().is_none());
    }

    /// Packing reads 16-bit weights in place: the same panels as from their f32 widening,
    /// on a shape with a partial panel and an odd width.
    #[test]
    fn sixteen_bit_weights_pack_as_their_widening() {
        let w = Tensor::randn(0f32, 1.0, (45, 37), &Device::Cpu).unwrap();
        for dtype in [DType::BF16, DType::F16] {
            let narrow = w.to_dtype(dtype).unwrap();
            let wide = narrow.to_dtype(DType::F32).unwrap();
            let (a, b) = (
                PackedBf16::pack(&narrow).unwrap(),
                PackedBf16::pack(&wide).unwrap(),
            );
            assert_eq!((a.n, a.k, a.panels, a.pairs), (b.n, b.k, b.panels, b.pairs));
            assert!(a.data == b.data, "{dtype:?}");
        }
        // And the f32 path itself against the rounding rule, element by element.
        let p = PackedBf16::pack(&w).unwrap();
        let v = w.to_vec2::<f32>().unwrap();
        let (r, c) = (33, 36); // panel 1, lane 1, pair 18 (its low half)
        assert_eq!(
            p.data[(p.pairs + c / 2) * NR + r - NR] & 0xffff,
            bf16_bits(v[r][c])
        );
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
