//! The prefill product on AMX tiles (Sapphire Rapids and later): one `tdpbf16ps` multiplies
//! a 16 × 32 bf16 tile of activations by a 32 × 16 tile of weights into 16 × 16 f32 sums,
//! sixteen times the work of a 512-bit `vdpbf16ps`.
//!
//! The packed panels are already in the layout a weight tile wants: for each input pair,
//! 32 output lanes of bf16 pairs, so the tile for lanes `0..16` (or `16..32`) and pairs
//! `q..q + 16` is 16 rows of 64 bytes at a stride of one pair's 128 bytes. The activations
//! are rounded into bf16 tiles of 1 KiB each ([`tiles_bf16`]). Each block of 32 rows × 32
//! outputs keeps its four sum tiles in tile registers over the whole width, the panel from
//! memory once per group of row blocks and from cache for the group's others, and stores
//! them once: passing blocks of pairs instead, reloading and storing the sums between them
//! (the 512-bit kernel's order), ran about 25 % slower, the 13 MB of sums of a 593 × 5632
//! output going through memory once per block.
//!
//! Stable Rust has no AMX intrinsics, so the instructions are inline assembly; the tile
//! registers are ours alone (the compiler never uses them), so their contents last from one
//! `asm!` to the next on the same thread.

use super::{Kernels, Panels, KC, NR};

/// Activation rows per block: two tiles of 16.
const MB: usize = 32;
/// Input pairs per tile step (a tile row holds 16 pairs, 64 bytes).
const KT: usize = 16;
/// Row blocks that every panel of a thread passes over in turn, their activations staying
/// in L2 (64-176 KiB a block at the widths of a 1B decoder and a tower): groups of 2 and 4
/// measured alike, 8 about 4 % slower (`examples/bf16_gemm`).
const BLOCK_GROUP: usize = 4;

/// Whether a product of `k` inputs (`pairs` pairs) goes in whole tile steps: every real
/// checkpoint's widths do (multiples of 32); the 512-bit kernel takes the rest.
pub(super) fn fits(k: usize, pairs: usize) -> bool {
    k == 2 * pairs && pairs > 0 && pairs.is_multiple_of(KT)
}

/// [`super::gemm`] on tiles; `fits(k, pairs)` must hold. Returns `c` with rows of
/// `panels · NR` (at least `m` rows).
pub(super) fn gemm(w: &impl Panels, xs: &[f32], m: usize, k: usize) -> Vec<f32> {
    let (panels, pairs) = w.dims();
    assert!(fits(k, pairs), "AMX product of width {k} ({pairs} pairs)");
    let ldc = panels * NR;
    let blocks = m.div_ceil(MB);
    let xt = tiles_bf16(xs, m, k, blocks * MB);
    // Not zeroed first: the first block of pairs stores every value (a 593 × 5632 output is
    // 13 MB, whose zeroing took 0.3-1.4 ms of a 20 ms product).
    let len = blocks * MB * ldc;
    let mut c: Vec<f32> = Vec::with_capacity(len);
    let c_addr = c.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(panels, |range| {
        let mut buf = Vec::new();
        // SAFETY: `usable()` held when these kernels were chosen; the configuration is this
        // thread's and released below.
        unsafe { configure() };
        // Each block of sums goes over a panel's whole width and never leaves the tiles until
        // it is done. A packed weight's panel is a view, passed over groups of row blocks; a
        // ggml weight's is unpacked once, a block of `KC` pairs at a time, into `whole`, and
        // every row block passes under it.
        let mut whole = Vec::new();
        let group = if w.blocks_are_views() {
            BLOCK_GROUP
        } else {
            whole.resize(pairs * NR, 0);
            blocks
        };
        for b0 in (0..blocks).step_by(group) {
            for p in range.clone() {
                let wb = if w.blocks_are_views() {
                    w.block(Kernels::Amx, p, 0, pairs, &mut buf)
                } else {
                    for q0 in (0..pairs).step_by(KC) {
                        let kc = KC.min(pairs - q0);
                        let part = w.block(Kernels::Amx, p, q0, kc, &mut buf);
                        whole[q0 * NR..(q0 + kc) * NR].copy_from_slice(&part[..kc * NR]);
                    }
                    &whole
                };
                assert!(wb.len() >= pairs * NR);
                for b in b0..blocks.min(b0 + group) {
                    // SAFETY: `xt` holds `blocks · MB` rows of `pairs` pairs in tiles, `wb`
                    // the panel's `pairs` pairs, `c` `blocks · MB` rows of `ldc`; each (block,
                    // panel) part of `c` is written by the one thread that took the panel.
                    unsafe {
                        let x = xt.as_ptr().add(b * MB * pairs);
                        let cp = (c_addr as *mut f32).add(b * MB * ldc + p * NR);
                        block(x, pairs, wb.as_ptr(), cp, ldc);
                    }
                }
            }
        }
        // SAFETY: as for `configure`.
        unsafe { release() };
    });
    // SAFETY: the threads took every panel and stored each (row block, panel) part: all
    // `len` values are written.
    unsafe { c.set_len(len) };
    c
}

/// `xs: (m, k)` rounded to bf16 pairs, padded with zero rows to `rows`, in the order the
/// tiles are loaded: `[16 rows][KT pairs][row][pair]`, so that each tile is 1 KiB in one
/// piece (rows a row's length apart would share L1 sets: 2 KiB apart for `k` = 1024).
fn tiles_bf16(xs: &[f32], m: usize, k: usize, rows: usize) -> Vec<u32> {
    let pairs = k / 2;
    let mut out = vec![0u32; rows * pairs];
    let out_addr = out.as_mut_ptr() as usize;
    // On candle's workers, which spin between products: rayon's threads would wait for them
    // to yield the two cores (this took 0.5-2 ms a product that way).
    candle_core::utils::barrier_pool().execute_chunked(m.div_ceil(16), |range| {
        for g in range {
            for r in 0..16.min(m - 16 * g) {
                let x = &xs[(16 * g + r) * k..][..k];
                for s in 0..pairs / KT {
                    // SAFETY: the 16 pairs lie within `out` (`rows` ≥ `m` rows of `pairs`),
                    // and each group of rows is written by the one thread that took it.
                    let o = unsafe {
                        let at = (out_addr as *mut u32).add(16 * g * pairs + (s * 16 + r) * KT);
                        std::slice::from_raw_parts_mut(at, KT)
                    };
                    // SAFETY: AMX-BF16 CPUs have AVX512-BF16 (checked with it in
                    // `supported()`).
                    unsafe { super::round_pairs(&x[2 * KT * s..][..2 * KT], o) };
                }
            }
        }
    });
    out
}

/// The tile shapes: tiles 0-3 hold 16 × 16 f32 sums, 4-5 activations (16 rows of 16 pairs),
/// 6-7 weights (16 pairs of 16 lanes); every row 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    /// Bytes per row of each tile.
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Whether the bf16 kernels in use are these (so that attention may run on tiles too).
pub(crate) fn chosen() -> bool {
    super::kernels() == Some(Kernels::Amx)
}

/// Sets this thread's tiles to the shapes every kernel here uses (all 16 rows of 64 bytes).
///
/// # Safety
/// [`chosen`] must hold; pair it with [`release`] on the same thread.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn configure() {
    let mut cfg = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    for t in 0..8 {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    std::arch::asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly));
}

/// # Safety
/// After [`configure`], on the same thread.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn release() {
    std::arch::asm!("tilerelease", options(nostack, nomem));
}

/// One `32 × 32` block of `c` (row stride `ldc` floats) = 32 rows of activations (`x`: two
/// groups of 16 rows, `16 · x_pairs` apart, in [`tiles_bf16`]'s order) times the panel `w`
/// (`[pair][32]`), over all `x_pairs` pairs.
#[cfg(target_arch = "x86_64")]
unsafe fn block(x: *const u32, x_pairs: usize, w: *const u32, c: *mut f32, ldc: usize) {
    use std::arch::asm;
    let (xs, ws, cs) = (KT * 4, NR * 4, ldc * 4);
    let (c0, c1) = (c, c.add(16));
    let (c2, c3) = (c.add(16 * ldc), c.add(16 * ldc + 16));
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        options(nostack, nomem)
    );
    for q in (0..x_pairs).step_by(KT) {
        let (x0, x1) = (x.add(16 * q), x.add(16 * x_pairs + 16 * q));
        let (w0, w1) = (w.add(q * NR), w.add(q * NR + 16));
        asm!(
            "tileloadd tmm4, [{x0} + {xs}*1]",
            "tileloadd tmm6, [{w0} + {ws}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{w1} + {ws}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{x1} + {xs}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            x0 = in(reg) x0, x1 = in(reg) x1, w0 = in(reg) w0, w1 = in(reg) w1,
            xs = in(reg) xs, ws = in(reg) ws,
            options(nostack, readonly),
        );
    }
    asm!(
        "tilestored [{c0} + {s}*1], tmm0",
        "tilestored [{c1} + {s}*1], tmm1",
        "tilestored [{c2} + {s}*1], tmm2",
        "tilestored [{c3} + {s}*1], tmm3",
        c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3,
        s = in(reg) cs,
        options(nostack),
    );
}

/// One 16 × 16 f32 tile of `c` (row stride `c_stride` bytes) = Σ over `steps` of an
/// activation tile (`a + s · a_step`, rows `a_stride` bytes apart) times a weight tile (`b +
/// s · b_step`, rows `b_stride` apart): the general, unblocked product attention uses.
///
/// # Safety
/// After [`configure`]; every tile read and the tile written lie within their buffers.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn dot_tile(
    (a, a_step, a_stride): (*const u32, usize, usize),
    (b, b_step, b_stride): (*const u32, usize, usize),
    steps: usize,
    c: *mut f32,
    c_stride: usize,
) {
    use std::arch::asm;
    asm!("tilezero tmm0", options(nostack, nomem));
    for s in 0..steps {
        asm!(
            "tileloadd tmm4, [{a} + {sa}*1]",
            "tileloadd tmm6, [{b} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            a = in(reg) a.add(s * a_step), sa = in(reg) a_stride,
            b = in(reg) b.add(s * b_step), sb = in(reg) b_stride,
            options(nostack, readonly),
        );
    }
    asm!(
        "tilestored [{c} + {s}*1], tmm0",
        c = in(reg) c, s = in(reg) c_stride,
        options(nostack),
    );
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn dot_tile(
    _: (*const u32, usize, usize),
    _: (*const u32, usize, usize),
    _: usize,
    _: *mut f32,
    _: usize,
) {
    unreachable!("AMX kernels are only chosen where cpu().amx holds")
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn configure() {
    unreachable!("AMX kernels are only chosen where cpu().amx holds")
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn release() {
    unreachable!("AMX kernels are only chosen where cpu().amx holds")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block(_: *const u32, _: usize, _: *const u32, _: *mut f32, _: usize) {
    unreachable!("AMX kernels are only chosen where cpu().amx holds")
}
