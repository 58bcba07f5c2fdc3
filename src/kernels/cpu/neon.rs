//! NEON (aarch64) dot products of the quantized types.
//!
//! The integer work of every block (unpacking the weights, the byte products and their sums)
//! runs in NEON registers; the float steps that follow are the reference's, in the same order,
//! so every kernel here is bitwise equal to its `reference` counterpart (the tests check this
//! on random blocks). Products use `vmull_s8`/`vmlal_s8` and pairwise widening adds, which every
//! ARMv8 core has (no dot-product extension needed).
//!
//! The float types, the activation quantizers and attention use the scalar kernels, which the
//! compiler vectorizes for NEON on its own.

use std::arch::aarch64::*;

use super::blocks::{BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5K, BlockQ6K, BlockQ8_0};
use super::blocks::{BlockQ8_1, BlockQ8K, QK_K};
use super::reference::{
    LANES_Q, combine4, contrib_k4, contrib_q4_1, contrib_scaled, unpack_scales_mins_k4,
};

/// Adds Σ a·b of 16 signed byte pairs to the four lanes of `acc` (pairwise, widened to i32).
#[inline(always)]
unsafe fn dot16(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    unsafe {
        let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
        let hi = vmull_high_s8(a, b);
        vpadalq_s16(vpadalq_s16(acc, lo), hi)
    }
}

/// The two nibble halves of 16 packed bytes: elements 0..16 (low nibbles) and 16..32 (high).
#[inline(always)]
unsafe fn nibbles(qs: &[u8; 16]) -> (uint8x16_t, uint8x16_t) {
    unsafe {
        let v = vld1q_u8(qs.as_ptr());
        (vandq_u8(v, vdupq_n_u8(0x0F)), vshrq_n_u8::<4>(v))
    }
}

/// Σ x·y of a 32-element block whose weight levels are `lo` (elements 0..16) and `hi`.
#[inline(always)]
unsafe fn block_sum(lo: int8x16_t, hi: int8x16_t, y: &[i8; 32]) -> i32 {
    unsafe {
        let y0 = vld1q_s8(y.as_ptr());
        let y1 = vld1q_s8(y.as_ptr().add(16));
        vaddvq_s32(dot16(dot16(vdupq_n_s32(0), lo, y0), hi, y1))
    }
}

#[inline(always)]
unsafe fn isum_q4_0(bx: &BlockQ4_0, by: &BlockQ8_0) -> i32 {
    unsafe {
        let (lo, hi) = nibbles(&bx.qs);
        let eight = vdupq_n_s8(8);
        let lo = vsubq_s8(vreinterpretq_s8_u8(lo), eight);
        let hi = vsubq_s8(vreinterpretq_s8_u8(hi), eight);
        block_sum(lo, hi, &by.qs)
    }
}

#[inline(always)]
unsafe fn isum_q4_1(bx: &BlockQ4_1, by: &BlockQ8_1) -> i32 {
    unsafe {
        let (lo, hi) = nibbles(&bx.qs);
        block_sum(vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi), &by.qs)
    }
}

/// Bit masks that spread two bytes of high bits over 16 lanes (lane i tests bit i % 8).
const LANE_BITS: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];

/// 16 lanes holding `value` where bit i of `bits` (two bytes, little-endian) is set, else 0.
#[inline(always)]
unsafe fn spread_bits(bits: [u8; 2], value: u8) -> uint8x16_t {
    unsafe {
        let lanes = vcombine_u8(vdup_n_u8(bits[0]), vdup_n_u8(bits[1]));
        let set = vtstq_u8(lanes, vld1q_u8(LANE_BITS.as_ptr()));
        vandq_u8(set, vdupq_n_u8(value))
    }
}

#[inline(always)]
unsafe fn isum_q5_0(bx: &BlockQ5_0, by: &BlockQ8_0) -> i32 {
    unsafe {
        let (lo, hi) = nibbles(&bx.qs);
        let lo = vorrq_u8(lo, spread_bits([bx.qh[0], bx.qh[1]], 0x10));
        let hi = vorrq_u8(hi, spread_bits([bx.qh[2], bx.qh[3]], 0x10));
        let sixteen = vdupq_n_s8(16);
        let lo = vsubq_s8(vreinterpretq_s8_u8(lo), sixteen);
        let hi = vsubq_s8(vreinterpretq_s8_u8(hi), sixteen);
        block_sum(lo, hi, &by.qs)
    }
}

#[inline(always)]
unsafe fn isum_q8_0(bx: &BlockQ8_0, by: &BlockQ8_0) -> i32 {
    unsafe {
        let lo = vld1q_s8(bx.qs.as_ptr());
        let hi = vld1q_s8(bx.qs.as_ptr().add(16));
        block_sum(lo, hi, &by.qs)
    }
}

/// The reference's eight lane sums of a K-quant super-block:
/// `aux[l] = Σ_j scale_j · Σ_{e in group j, e % 8 == l} a_e · q8_e`, with groups of `GROUP`
/// elements (32 for Q4_K/Q5_K, 16 for Q6_K). Every partial fits i16: |a| ≤ 32, |q8| ≤ 128 and
/// at most four products share a lane before widening.
#[inline(always)]
unsafe fn lane_sums<const GROUP: usize>(
    a: &[i8; QK_K],
    q8: &[i8; QK_K],
    scale: impl Fn(usize) -> i16,
) -> [i32; 8] {
    unsafe {
        let (mut lo, mut hi) = (vdupq_n_s32(0), vdupq_n_s32(0));
        for j in 0..QK_K / GROUP {
            let o = GROUP * j;
            let mut p = vmull_s8(vld1_s8(a.as_ptr().add(o)), vld1_s8(q8.as_ptr().add(o)));
            let mut k = 8;
            while k < GROUP {
                p = vmlal_s8(
                    p,
                    vld1_s8(a.as_ptr().add(o + k)),
                    vld1_s8(q8.as_ptr().add(o + k)),
                );
                k += 8;
            }
            let s = scale(j);
            lo = vmlal_n_s16(lo, vget_low_s16(p), s);
            hi = vmlal_high_n_s16(hi, p, s);
        }
        let mut aux = [0i32; 8];
        vst1q_s32(aux.as_mut_ptr(), lo);
        vst1q_s32(aux.as_mut_ptr().add(4), hi);
        aux
    }
}

/// The 256 levels (0..15) of a Q4_K super-block, in element order.
#[inline(always)]
unsafe fn levels_q4_k(bx: &BlockQ4K, a: &mut [i8; QK_K]) {
    unsafe {
        for c in 0..4 {
            for l in [0, 16] {
                let v = vld1q_u8(bx.qs.as_ptr().add(32 * c + l));
                let out = a.as_mut_ptr().add(64 * c + l);
                vst1q_s8(out, vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F))));
                vst1q_s8(out.add(32), vreinterpretq_s8_u8(vshrq_n_u8::<4>(v)));
            }
        }
    }
}

/// The 256 levels (0..31) of a Q5_K super-block, in element order.
#[inline(always)]
unsafe fn levels_q5_k(bx: &BlockQ5K, a: &mut [i8; QK_K]) {
    unsafe {
        let sixteen = vdupq_n_u8(16);
        for l in [0, 16] {
            let qh = vld1q_u8(bx.qh.as_ptr().add(l));
            for c in 0..4 {
                let (m1, m2) = (vdupq_n_u8(1 << (2 * c)), vdupq_n_u8(2 << (2 * c)));
                let v = vld1q_u8(bx.qs.as_ptr().add(32 * c + l));
                let h1 = vandq_u8(vtstq_u8(qh, m1), sixteen);
                let h2 = vandq_u8(vtstq_u8(qh, m2), sixteen);
                let out = a.as_mut_ptr().add(64 * c + l);
                let low = vaddq_u8(vandq_u8(v, vdupq_n_u8(0x0F)), h1);
                vst1q_s8(out, vreinterpretq_s8_u8(low));
                vst1q_s8(
                    out.add(32),
                    vreinterpretq_s8_u8(vaddq_u8(vshrq_n_u8::<4>(v), h2)),
                );
            }
        }
    }
}

/// The 256 signed levels (-32..31) of a Q6_K super-block, in element order.
#[inline(always)]
unsafe fn levels_q6_k(bx: &BlockQ6K, a: &mut [i8; QK_K]) {
    unsafe {
        let (m4, m3) = (vdupq_n_u8(0x0F), vdupq_n_u8(3));
        let bias = vdupq_n_s8(32);
        let level = |v: uint8x16_t| vsubq_s8(vreinterpretq_s8_u8(v), bias);
        for h in 0..2 {
            for l in [0, 16] {
                let ql0 = vld1q_u8(bx.ql.as_ptr().add(64 * h + l));
                let ql32 = vld1q_u8(bx.ql.as_ptr().add(64 * h + 32 + l));
                let qh = vld1q_u8(bx.qh.as_ptr().add(32 * h + l));
                let out = a.as_mut_ptr().add(128 * h + l);
                let h0 = vshlq_n_u8::<4>(vandq_u8(qh, m3));
                let h1 = vshlq_n_u8::<4>(vandq_u8(vshrq_n_u8::<2>(qh), m3));
                let h2 = vshlq_n_u8::<4>(vandq_u8(vshrq_n_u8::<4>(qh), m3));
                let h3 = vshlq_n_u8::<4>(vshrq_n_u8::<6>(qh));
                vst1q_s8(out, level(vorrq_u8(vandq_u8(ql0, m4), h0)));
                vst1q_s8(out.add(32), level(vorrq_u8(vandq_u8(ql32, m4), h1)));
                vst1q_s8(out.add(64), level(vorrq_u8(vshrq_n_u8::<4>(ql0), h2)));
                vst1q_s8(out.add(96), level(vorrq_u8(vshrq_n_u8::<4>(ql32), h3)));
            }
        }
    }
}

/// Σ min·bsum of a Q4_K/Q5_K super-block.
#[inline(always)]
fn summins(mins: &[u8; 8], by: &BlockQ8K) -> i32 {
    (0..16)
        .map(|j| by.bsums[j] as i32 * mins[j / 2] as i32)
        .sum()
}

// ---------------------------------------------------------------------------------------------
// f32 kernels: the reference's float steps around the NEON integer sums

pub unsafe fn dot_q4_0_q8_0(x: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32 {
    let mut sumf = 0.0f32;
    for (bx, by) in x.iter().zip(y) {
        let s = unsafe { isum_q4_0(bx, by) };
        sumf += s as f32 * bx.d.to_f32() * by.d.to_f32();
    }
    sumf
}

pub unsafe fn dot_q4_1_q8_1(x: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
    let mut sumf = 0.0f32;
    for (bx, by) in x.iter().zip(y) {
        let s = unsafe { isum_q4_1(bx, by) };
        sumf += (bx.d.to_f32() * by.d.to_f32()) * s as f32 + bx.m.to_f32() * by.s.to_f32();
    }
    sumf
}

pub unsafe fn dot_q5_0_q8_0(x: &[BlockQ5_0], y: &[BlockQ8_0]) -> f32 {
    let mut sumf = 0.0f32;
    for (bx, by) in x.iter().zip(y) {
        let s = unsafe { isum_q5_0(bx, by) };
        sumf += (bx.d.to_f32() * by.d.to_f32()) * s as f32;
    }
    sumf
}

pub unsafe fn dot_q8_0_q8_0(x: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    let mut sumf = 0.0f32;
    for (bx, by) in x.iter().zip(y) {
        let s = unsafe { isum_q8_0(bx, by) };
        sumf += s as f32 * (bx.d.to_f32() * by.d.to_f32());
    }
    sumf
}

/// What the Q4_K/Q5_K kernels need of a super-block: its d, dmin and packed scales, and its
/// 256 levels unpacked into `a`. The two types differ only in how the levels unpack.
trait K4Block {
    fn head(&self) -> (f32, f32, &[u8; 12]);
    /// # Safety
    /// NEON (every aarch64 target has it).
    unsafe fn levels(&self, a: &mut [i8; QK_K]);
}

impl K4Block for BlockQ4K {
    fn head(&self) -> (f32, f32, &[u8; 12]) {
        (self.d.to_f32(), self.dmin.to_f32(), &self.scales)
    }
    unsafe fn levels(&self, a: &mut [i8; QK_K]) {
        unsafe { levels_q4_k(self, a) }
    }
}

impl K4Block for BlockQ5K {
    fn head(&self) -> (f32, f32, &[u8; 12]) {
        (self.d.to_f32(), self.dmin.to_f32(), &self.scales)
    }
    unsafe fn levels(&self, a: &mut [i8; QK_K]) {
        unsafe { levels_q5_k(self, a) }
    }
}

/// The eight lane sums and Σ min·bsum of one Q4_K/Q5_K super-block.
#[inline(always)]
fn k4_sums<B: K4Block>(bx: &B, by: &BlockQ8K, a: &mut [i8; QK_K]) -> ([i32; 8], i32) {
    let (scales, mins) = unpack_scales_mins_k4(bx.head().2);
    // SAFETY: NEON is part of every aarch64 target.
    let aux = unsafe {
        bx.levels(a);
        lane_sums::<32>(a, &by.qs, |j| scales[j] as i16)
    };
    (aux, summins(&mins, by))
}

/// The reference's f64 contribution of one Q4_K/Q5_K super-block.
#[inline(always)]
fn contrib_k4_block<B: K4Block>(bx: &B, by: &BlockQ8K) -> f64 {
    let mut a = [0i8; QK_K];
    let (aux, mins) = k4_sums(bx, by, &mut a);
    let (d, dmin, _) = bx.head();
    contrib_k4(d, dmin, by.d, aux.iter().sum(), mins)
}

// ---------------------------------------------------------------------------------------------
// f64 kernels: the reference's per-block contributions, summed in its lane order

macro_rules! dot64 {
    ($name:ident, $w:ty, $a:ty, |$bx:ident, $by:ident| $contribution:expr) => {
        pub unsafe fn $name(x: &[$w], y: &[$a]) -> f64 {
            let mut lanes = [0f64; LANES_Q];
            for (i, ($bx, $by)) in x.iter().zip(y).enumerate() {
                lanes[i % LANES_Q] += $contribution;
            }
            combine4(lanes)
        }
    };
}

dot64!(dot64_q4_0_q8_0, BlockQ4_0, BlockQ8_0, |bx, by| {
    contrib_scaled(bx.d.to_f32(), by.d.to_f32(), unsafe { isum_q4_0(bx, by) })
});
dot64!(dot64_q4_1_q8_1, BlockQ4_1, BlockQ8_1, |bx, by| {
    let isum = unsafe { isum_q4_1(bx, by) };
    contrib_q4_1(
        bx.d.to_f32(),
        by.d.to_f32(),
        isum,
        bx.m.to_f32(),
        by.s.to_f32(),
    )
});
dot64!(dot64_q5_0_q8_0, BlockQ5_0, BlockQ8_0, |bx, by| {
    contrib_scaled(bx.d.to_f32(), by.d.to_f32(), unsafe { isum_q5_0(bx, by) })
});
dot64!(dot64_q8_0_q8_0, BlockQ8_0, BlockQ8_0, |bx, by| {
    contrib_scaled(bx.d.to_f32(), by.d.to_f32(), unsafe { isum_q8_0(bx, by) })
});
dot64!(dot64_q4_k_q8_k, BlockQ4K, BlockQ8K, |bx, by| {
    contrib_k4_block(bx, by)
});
dot64!(dot64_q5_k_q8_k, BlockQ5K, BlockQ8K, |bx, by| {
    contrib_k4_block(bx, by)
});
dot64!(dot64_q6_k_q8_k, BlockQ6K, BlockQ8K, |bx, by| {
    let mut a = [0i8; QK_K];
    let aux = unsafe {
        levels_q6_k(bx, &mut a);
        lane_sums::<16>(&a, &by.qs, |j| bx.scales[j] as i16)
    };
    contrib_scaled(bx.d.to_f32(), by.d, aux.iter().sum())
});

// ---------------------------------------------------------------------------------------------
// four activation vectors: four single dots (bitwise equal to them by construction)

macro_rules! four {
    ($name:ident, $one:ident, $w:ty, $a:ty, $out:ty) => {
        pub unsafe fn $name(w: &[$w], a: *const $a, stride: usize, out: &mut [$out; 4]) {
            for (v, o) in out.iter_mut().enumerate() {
                // SAFETY: the caller guarantees four vectors of `w.len()` blocks at this stride.
                *o = unsafe { $one(w, std::slice::from_raw_parts(a.add(v * stride), w.len())) };
            }
        }
    };
}

four!(dot4_q4_0_q8_0, dot_q4_0_q8_0, BlockQ4_0, BlockQ8_0, f32);
four!(dot4_q4_1_q8_1, dot_q4_1_q8_1, BlockQ4_1, BlockQ8_1, f32);
four!(dot4_q5_0_q8_0, dot_q5_0_q8_0, BlockQ5_0, BlockQ8_0, f32);
four!(dot4_q8_0_q8_0, dot_q8_0_q8_0, BlockQ8_0, BlockQ8_0, f32);
four!(
    dot64x4_q4_0_q8_0,
    dot64_q4_0_q8_0,
    BlockQ4_0,
    BlockQ8_0,
    f64
);
four!(
    dot64x4_q4_1_q8_1,
    dot64_q4_1_q8_1,
    BlockQ4_1,
    BlockQ8_1,
    f64
);
four!(
    dot64x4_q5_0_q8_0,
    dot64_q5_0_q8_0,
    BlockQ5_0,
    BlockQ8_0,
    f64
);
four!(
    dot64x4_q8_0_q8_0,
    dot64_q8_0_q8_0,
    BlockQ8_0,
    BlockQ8_0,
    f64
);
four!(dot64x4_q4_k_q8_k, dot64_q4_k_q8_k, BlockQ4K, BlockQ8K, f64);
four!(dot64x4_q5_k_q8_k, dot64_q5_k_q8_k, BlockQ5K, BlockQ8K, f64);
four!(dot64x4_q6_k_q8_k, dot64_q6_k_q8_k, BlockQ6K, BlockQ8K, f64);
