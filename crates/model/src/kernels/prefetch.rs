//! Software prefetch for the decoding kernels, which stream each weight once per token.
//! On an AMX Xeon the hardware prefetchers alone left them reading at about 16 GB/s of the
//! 25 a copy reaches; asking for the lines [`AHEAD`] bytes in advance brought Q4_K_M decode
//! on bench-1b from 17.5 to 25.4 tok/s and bf16 decode from 85-91 % to 91-94 % of the roofline
//! (BENCHMARKS.md, session 13).

/// How far ahead of what a kernel reads now it asks for lines. Measured on Q4_K_M decode:
/// 1 KiB 23-24 tok/s, 2 KiB 24-25.4, 4 KiB 24-25, 8 KiB 23.5.
pub(crate) const AHEAD: usize = 2048;

/// Asks for the `LINES` cache lines starting [`AHEAD`] bytes past `at`. Past the end of a
/// weight the addresses are never dereferenced: a prefetch does not fault.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn ahead<const LINES: usize>(at: *const u8) {
    use std::arch::x86_64::*;
    for l in 0..LINES {
        let line = at.wrapping_add(AHEAD + 64 * l);
        // SAFETY: a prefetch reads nothing the program can observe and never faults.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line as *const i8) };
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
pub(crate) fn ahead<const LINES: usize>(_: *const u8) {}
