//! The row softmax the attention kernels share, and its vectorizable `exp`.

/// Lanes of the vectorized loops below.
const L: usize = 16;

/// Sum of 16 lanes as a tree (vector shuffles, not a chain of 15 dependent additions).
#[inline]
pub(crate) fn fold(acc: [f32; L]) -> f32 {
    let mut h = [0f32; 8];
    for i in 0..8 {
        h[i] = acc[i] + acc[i + 8];
    }
    let q = [h[0] + h[4], h[1] + h[5], h[2] + h[6], h[3] + h[7]];
    (q[0] + q[2]) + (q[1] + q[3])
}

/// `s ← softmax(s)`. Entry `j` is summed in lane `j % 16` whatever the length, so zeros
/// appended (masked slots past a row's last visible one, which a block of query rows may
/// carry) leave every sum unchanged, bit for bit: a row's attention then does not depend on
/// which rows share its block, and a prompt's rows are the same numbers however it was cut
/// into steps (what reusing a cached prefix relies on).
pub(crate) fn softmax_in_place(s: &mut [f32]) {
    let mut lanes = [f32::NEG_INFINITY; L];
    let chunks = s.chunks_exact(L);
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for i in 0..L {
            lanes[i] = lanes[i].max(c[i]);
        }
    }
    let max = lanes.into_iter().fold(tail, f32::max);
    for x in s.iter_mut() {
        *x = exp_nonpositive(*x - max);
    }
    let mut acc = [0f32; L];
    let chunks = s.chunks_exact(L);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..L {
            acc[i] += c[i];
        }
    }
    for (a, &x) in acc.iter_mut().zip(tail) {
        *a += x;
    }
    let inv = 1.0 / fold(acc);
    for x in s.iter_mut() {
        *x *= inv;
    }
}

/// `eˣ` for `x ≤ 0` without a library call or a float-to-int conversion, so that a loop
/// over it vectorizes: `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2` (`n` rounded by adding
/// 1.5·2²³, which leaves it in the low bits of the mantissa), `eʳ` by its degree-6 Taylor
/// polynomial (relative error < 2e-7 there), `2ⁿ` by building the float's exponent. Below
/// −87 the result is 0.
#[inline]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let n_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    let y = p * f32::from_bits(n_bits.wrapping_add(127) << 23);
    if x <= -87.0 {
        0.0
    } else {
        y
    }
}
