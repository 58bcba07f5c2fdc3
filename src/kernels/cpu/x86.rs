//! x86-64 SIMD dot products, compiled twice (see `mod.rs`): as the `avx2` kernels (AVX2 + FMA +
//! F16C) and as the `avx512` kernels (the same code with AVX-512 F/BW/VL/VNNI enabled: the
//! u8 x i8 block sums become `vpdpbusd`, and the compiler has 32 vector registers and EVEX
//! encodings). The including module supplies `kernel_fn!` (the `target_feature` attribute of
//! the public kernels) and `VNNI`.
//!
//! Every kernel produces the same per-block integer sums as the scalar reference in
//! `reference.rs`; only the order of the float accumulation differs.
//!
//! # Safety
//! All functions here require the CPU features of their instantiation (checked once in
//! `mod.rs` before the kernel table is built) and equal-length operands (checked by callers;
//! the loops use unchecked indexing).

#![allow(clippy::needless_range_loop)] // index loops mirror ggml's C code

use std::arch::x86_64::*;

use half::{bf16, f16};

use crate::kernels::cpu::blocks::*;

/// Scalar f16 -> f32 without `vcvtph2ps` (exact, including subnormals and inf/NaN).
/// Converting one lane with `vcvtph2ps` let LLVM merge into an arbitrary register
/// (`vpinsrw`), creating a false dependency on the loop accumulator. No float arithmetic on
/// subnormal inputs either: small K-quant scales are often f16 subnormals and a denormal
/// multiply costs a microcode assist.
#[inline(always)]
pub fn f16_to_f32(h: F16Bytes) -> f32 {
    let h = h.bits() as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    if em >= 0x7c00 {
        f32::from_bits(sign | 0x7f80_0000 | ((em & 0x3ff) << 13))
    } else if em >= 0x0400 {
        // normal: rebias the exponent by 127 - 15
        f32::from_bits(sign | ((em << 13) + (112 << 23)))
    } else {
        // zero or subnormal: m * 2^-24, exact
        f32::from_bits(sign | (em as f32 * (1.0 / 16_777_216.0)).to_bits())
    }
}

/// f16 broadcast to 8 f32 lanes (one `vpbroadcastw` + `vcvtph2ps`).
#[inline(always)]
unsafe fn f16_splat(h: F16Bytes) -> __m256 {
    unsafe { _mm256_cvtph_ps(_mm_set1_epi16(h.bits() as i16)) }
}

#[inline(always)]
unsafe fn hsum_ps(v: __m256) -> f32 {
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

/// 16 packed bytes -> 32 bytes: low nibbles first, then high nibbles.
#[inline(always)]
unsafe fn nibbles_32(p: *const u8) -> __m256i {
    unsafe {
        let tmp = _mm_loadu_si128(p as *const __m128i);
        let both = _mm256_set_m128i(_mm_srli_epi16::<4>(tmp), tmp);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }
}

/// 32 bits -> 32 bytes, byte j = 0xFF when bit j is set.
#[inline(always)]
unsafe fn bytes_from_bits_32(bits: u32) -> __m256i {
    unsafe {
        let shuf = _mm256_setr_epi64x(
            0,
            0x0101010101010101,
            0x0202020202020202,
            0x0303030303030303,
        );
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), shuf);
        let bit_mask = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe_u64 as i64);
        let bytes = _mm256_or_si256(bytes, bit_mask);
        _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
    }
}

/// Signed i8 x i8 dot of 32 lanes, as 8 i32 partial sums.
#[inline(always)]
unsafe fn mul_sum_i8_pairs(x: __m256i, y: __m256i) -> __m256i {
    unsafe {
        let ax = _mm256_sign_epi8(x, x);
        let sy = _mm256_sign_epi8(y, x);
        mul_sum_us8_pairs(ax, sy)
    }
}

/// Unsigned (0..127) x signed i8 dot of 32 lanes, as 8 i32 partial sums (exact: the i16 pair
/// sums of the AVX2 form stay within ±2 * 127 * 128).
#[inline(always)]
unsafe fn mul_sum_us8_pairs(ax: __m256i, sy: __m256i) -> __m256i {
    unsafe {
        if super::VNNI {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy)
        } else {
            let dot = _mm256_maddubs_epi16(ax, sy);
            _mm256_madd_epi16(dot, _mm256_set1_epi16(1))
        }
    }
}

/// Sum of 4 i32 lanes (exact, wrapping).
#[inline(always)]
unsafe fn hsum_epi32_128(s: __m128i) -> i32 {
    unsafe {
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }
}

/// Sum of 8 i32 lanes.
#[inline(always)]
unsafe fn hsum_epi32(v: __m256i) -> i32 {
    unsafe {
        hsum_epi32_128(_mm_add_epi32(
            _mm256_castsi256_si128(v),
            _mm256_extracti128_si256::<1>(v),
        ))
    }
}

/// Lane totals of four 8-lane i32 vectors: `[Σa, Σb, Σc, Σd]`.
#[inline(always)]
unsafe fn hsum4_epi32(a: __m256i, b: __m256i, c: __m256i, d: __m256i) -> __m128i {
    unsafe {
        // lo = [a01, a23, b01, b23], hi = [a45, a67, b45, b67] (likewise cd)
        let ab = _mm256_hadd_epi32(a, b);
        let cd = _mm256_hadd_epi32(c, d);
        // lo = [a0123, b0123, c0123, d0123], hi = [a4567, ...]
        let h = _mm256_hadd_epi32(ab, cd);
        _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h))
    }
}

// ---------------------------------------------------------------------------------------------
// Kernel bodies are generic over N, the number of activation vectors processed per pass over a
// weight row (1 or 4; 2 for the float types). Each activation keeps its own accumulators with
// the same operation order for every N, so batched results are bitwise identical to N = 1.

// ---- float types

/// Element formats of float rows, read from raw little-endian bytes (any alignment).
trait Lanes {
    const SIZE: usize;
    unsafe fn load8(p: *const u8, i: usize) -> __m256;
    unsafe fn get(p: *const u8, i: usize) -> f32;
}
struct LF32;
struct LF16;
struct LBF16;
impl Lanes for LF32 {
    const SIZE: usize = 4;
    #[inline(always)]
    unsafe fn load8(p: *const u8, i: usize) -> __m256 {
        unsafe { _mm256_loadu_ps(p.add(4 * i) as *const f32) }
    }
    #[inline(always)]
    unsafe fn get(p: *const u8, i: usize) -> f32 {
        unsafe { f32::from_le_bytes((p.add(4 * i) as *const [u8; 4]).read()) }
    }
}
impl Lanes for LF16 {
    const SIZE: usize = 2;
    #[inline(always)]
    unsafe fn load8(p: *const u8, i: usize) -> __m256 {
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * i) as *const __m128i)) }
    }
    #[inline(always)]
    unsafe fn get(p: *const u8, i: usize) -> f32 {
        unsafe { f16_to_f32(F16Bytes((p.add(2 * i) as *const [u8; 2]).read())) }
    }
}
impl Lanes for LBF16 {
    const SIZE: usize = 2;
    #[inline(always)]
    unsafe fn load8(p: *const u8, i: usize) -> __m256 {
        unsafe {
            let v = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(2 * i) as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v))
        }
    }
    #[inline(always)]
    unsafe fn get(p: *const u8, i: usize) -> f32 {
        unsafe {
            bf16::from_bits(u16::from_le_bytes((p.add(2 * i) as *const [u8; 2]).read())).to_f32()
        }
    }
}

/// Dot of `n` weights at `pw` with N activation vectors at `pa + v * stride` (bytes).
#[inline(always)]
unsafe fn float_body<W: Lanes, A: Lanes, const N: usize>(
    pw: *const u8,
    pa: *const u8,
    stride: usize,
    n: usize,
) -> [f32; N] {
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 4]; N];
        let mut i = 0;
        while i + 32 <= n {
            for k in 0..4 {
                let w = W::load8(pw, i + 8 * k);
                for v in 0..N {
                    acc[v][k] =
                        _mm256_fmadd_ps(w, A::load8(pa.add(v * stride), i + 8 * k), acc[v][k]);
                }
            }
            i += 32;
        }
        while i + 8 <= n {
            let w = W::load8(pw, i);
            for v in 0..N {
                acc[v][0] = _mm256_fmadd_ps(w, A::load8(pa.add(v * stride), i), acc[v][0]);
            }
            i += 8;
        }
        let mut out = [0f32; N];
        for v in 0..N {
            let a = &acc[v];
            let mut s = hsum_ps(_mm256_add_ps(
                _mm256_add_ps(a[0], a[1]),
                _mm256_add_ps(a[2], a[3]),
            ));
            for j in i..n {
                s += W::get(pw, j) * A::get(pa.add(v * stride), j);
            }
            out[v] = s;
        }
        out
    }
}

kernel_fn! {
    pub unsafe fn f32_dot(a: &[f32], b: &[f32]) -> f32 {
        debug_assert_eq!(a.len(), b.len());
        unsafe {
            float_body::<LF32, LF32, 1>(
                a.as_ptr() as *const u8,
                b.as_ptr() as *const u8,
                0,
                a.len().min(b.len()),
            )[0]
        }
    }
}

/// e^x for x <= 0 in 8 lanes (Cephes' expf scheme: x = n ln2 + r, a degree-6 polynomial in r,
/// times 2^n); about 1 ulp. Inputs below -87 give e^-87 (~1.6e-38) instead of smaller values.
#[inline(always)]
unsafe fn exp_nonpositive_ps(x: __m256) -> __m256 {
    unsafe {
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let e = _mm256_add_ps(
            _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r),
            _mm256_set1_ps(1.0),
        );
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(e, _mm256_castsi256_ps(pow2))
    }
}

kernel_fn! {
    /// Σ e^(x - max) over `row` (every x <= max), the exponentials in f32 8 lanes at a time, summed
    /// in f64: the log-sum-exp of a vocabulary slice.
    pub unsafe fn sum_exp(row: &[f32], max: f32) -> f64 {
        unsafe {
            let maxv = _mm256_set1_ps(max);
            let (mut lo, mut hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
            let mut chunks = row.chunks_exact(8);
            for c in &mut chunks {
                let e = exp_nonpositive_ps(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), maxv));
                lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
                hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(e)));
            }
            let mut lanes = [0f64; 4];
            _mm256_storeu_pd(lanes.as_mut_ptr(), _mm256_add_pd(lo, hi));
            let tail: f64 = chunks
                .remainder()
                .iter()
                .map(|&x| (x - max).exp() as f64)
                .sum();
            (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]) + tail
        }
    }
}

/// Attention of one query row with head_dim = 8 * C, the query and the output accumulator in
/// registers: scores, softmax, then the weighted sum of values. The softmax uses libm's expf,
/// as llama.cpp's attention does: an 8-lane exp differing by an ulp moved the golden
/// comparison's worst step by 0.03 (model outputs are that sensitive at high-entropy steps).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_body<const C: usize>(
    q: &[f16],
    k: *const f16,
    v: *const f16,
    rows: &crate::kernels::cpu::Rows,
    n: usize,
    scale: f32,
    sink: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    unsafe {
        let load = |p: *const f16| _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
        let mut qv = [_mm256_setzero_ps(); C];
        for (c, lane) in qv.iter_mut().enumerate() {
            *lane = load(q.as_ptr().add(8 * c));
        }
        let mut max = f32::NEG_INFINITY;
        for t in 0..n {
            let kp = k.add(rows.at(t));
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut c = 0;
            while c + 2 <= C {
                a0 = _mm256_fmadd_ps(qv[c], load(kp.add(8 * c)), a0);
                a1 = _mm256_fmadd_ps(qv[c + 1], load(kp.add(8 * c + 8)), a1);
                c += 2;
            }
            if c < C {
                a0 = _mm256_fmadd_ps(qv[c], load(kp.add(8 * c)), a0);
            }
            let score = hsum_ps(_mm256_add_ps(a0, a1)) * scale;
            *scores.get_unchecked_mut(t) = score;
            max = max.max(score);
        }
        // A sink joins the softmax's maximum and denominator (llama.cpp's soft_max with sinks).
        let max = max.max(sink);
        let sum = crate::kernels::cpu::reference::softmax_weights(&mut scores[..n], max)
            + (sink - max).exp();
        let mut acc = [_mm256_setzero_ps(); C];
        for t in 0..n {
            let p = _mm256_set1_ps(*scores.get_unchecked(t));
            let vp = v.add(rows.at(t));
            for (c, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(p, load(vp.add(8 * c)), *a);
            }
        }
        let sumv = _mm256_set1_ps(sum);
        for (c, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * c), _mm256_div_ps(*a, sumv));
        }
    }
}

kernel_fn! {
    /// Attention of one query row (see `reference::attend`); head sizes without a register form
    /// use the scalar kernel.
    ///
    /// # Safety
    /// As `reference::attend`, with `scores.len() >= n`, and the CPU has AVX2, FMA and F16C.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn attend(
        q: &[f16],
        k: *const f16,
        v: *const f16,
        rows: &crate::kernels::cpu::Rows,
        n: usize,
        scale: f32,
        sink: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        unsafe {
            match q.len() {
                32 => attend_body::<4>(q, k, v, rows, n, scale, sink, scores, out),
                64 => attend_body::<8>(q, k, v, rows, n, scale, sink, scores, out),
                80 => attend_body::<10>(q, k, v, rows, n, scale, sink, scores, out),
                96 => attend_body::<12>(q, k, v, rows, n, scale, sink, scores, out),
                128 => attend_body::<16>(q, k, v, rows, n, scale, sink, scores, out),
                // Wider than the register file: the query and accumulators spill to L1, still
                // far ahead of the scalar loop (Gemma 3's heads are 256).
                192 => attend_body::<24>(q, k, v, rows, n, scale, sink, scores, out),
                256 => attend_body::<32>(q, k, v, rows, n, scale, sink, scores, out),
                _ => crate::kernels::cpu::reference::attend(q, k, v, rows, n, scale, sink, scores, out),
            }
        }
    }
}

macro_rules! float_kernels {
    ($one:ident, $four:ident, $lw:ty, $la:ty, $at:ty) => {
        kernel_fn! {
            /// Weights as raw little-endian bytes (any alignment).
            pub unsafe fn $one(w: &[u8], a: &[$at]) -> f32 {
                debug_assert_eq!(w.len(), a.len() * <$lw>::SIZE);
                unsafe { float_body::<$lw, $la, 1>(w.as_ptr(), a.as_ptr() as *const u8, 0, a.len())[0] }
            }
        }
        kernel_fn! {
            /// Four activation vectors at `a`, `a + stride`, ... (elements).
            pub unsafe fn $four(w: &[u8], a: *const $at, stride: usize, out: &mut [f32; 4]) {
                let n = w.len() / <$lw>::SIZE;
                let sb = stride * size_of::<$at>();
                unsafe {
                    let lo = float_body::<$lw, $la, 2>(w.as_ptr(), a as *const u8, sb, n);
                    let hi = float_body::<$lw, $la, 2>(w.as_ptr(), (a as *const u8).add(2 * sb), sb, n);
                    *out = [lo[0], lo[1], hi[0], hi[1]];
                }
            }
        }
    };
}
float_kernels!(dot_f32, dot4_f32, LF32, LF32, f32);
float_kernels!(dot_f16, dot4_f16, LF16, LF16, f16);
float_kernels!(dot_bf16, dot4_bf16, LBF16, LBF16, bf16);

// ---- legacy 32-element blocks

/// Per-type parts of the f32 kernels for 32-element blocks. A kernel handles R weight rows
/// and N activation vectors at once (R x N in {1 x 1, 4 x 1, 1 x 4}); activation-side work
/// (`act`) is shared by the R rows and weight-side work (`weight`) by the N activations.
/// Every (row, activation) pair runs the same float operations in the same order in every
/// variant, so the variants are bitwise equal to one another. That order, and the i32 lanes,
/// are those of llama.cpp's AVX2 `ggml_vec_dot_{q4_0_q8_0,q4_1_q8_1,q5_0_q8_0,q8_0_q8_0}`
/// (one accumulator, `acc = fma(d_w * d_a, float(lanes), acc)`, Q4_1 `summs += m_w * s_a`,
/// `hsum(acc) + summs`): with the same activations the results should equal llama.cpp's bit
/// for bit (by construction; not tested against llama.cpp itself).
trait LegacyF32 {
    type A;
    /// Q4_1: scale vectors hold (d, m) / (d, s) pairs, and `m_w * s_a` is added per block.
    const MIN: bool;
    /// Activation block: scale vector, quants, auxiliary value for `isum`.
    unsafe fn act(a: *const Self::A) -> (__m256, __m256i, __m256i);
    /// Weight block at `p`: scale vector, quants.
    unsafe fn weight(p: *const u8) -> (__m256, __m256i);
    /// 8 i32 lanes summing to the block's integer dot (exact).
    unsafe fn isum(wq: __m256i, aq: __m256i, aux: __m256i) -> __m256i;
}

/// Activation quants and the i16 pair sums `k * (y[2j] + y[2j+1])` (for offset weights `q - k`).
#[inline(always)]
unsafe fn q8_act_offset(qs: *const i8, k: i8) -> (__m256i, __m256i) {
    unsafe {
        let y = _mm256_loadu_si256(qs as *const __m256i);
        (y, _mm256_maddubs_epi16(_mm256_set1_epi8(k), y))
    }
}

/// Σ (q - k) * y for unsigned q (0..=31) given `ky` from `q8_act_offset`: 8 i32 lanes.
/// The i16 pair sums stay within ±2 * 31 * 128, and their difference within ±2 * 16 * 128.
#[inline(always)]
unsafe fn offset_isum(q: __m256i, y: __m256i, ky: __m256i) -> __m256i {
    unsafe {
        let d = _mm256_sub_epi16(_mm256_maddubs_epi16(q, y), ky);
        _mm256_madd_epi16(d, _mm256_set1_epi16(1))
    }
}

/// Broadcast of the (d, m) or (d, s) f16 pair at `p`: lanes [d, m, d, m, ...] as f32.
#[inline(always)]
unsafe fn f16_pair_splat(p: *const u8) -> __m256 {
    unsafe {
        let v = u32::from_le_bytes((p as *const [u8; 4]).read());
        _mm256_cvtph_ps(_mm_set1_epi32(v as i32))
    }
}

impl LegacyF32 for BlockQ4_0 {
    type A = BlockQ8_0;
    const MIN: bool = false;
    #[inline(always)]
    unsafe fn act(a: *const BlockQ8_0) -> (__m256, __m256i, __m256i) {
        unsafe {
            let (y, ky) = q8_act_offset((*a).qs.as_ptr(), 8);
            (f16_splat((*a).d), y, ky)
        }
    }
    #[inline(always)]
    unsafe fn weight(p: *const u8) -> (__m256, __m256i) {
        unsafe {
            let b = &*(p as *const BlockQ4_0);
            (f16_splat(b.d), nibbles_32(b.qs.as_ptr()))
        }
    }
    #[inline(always)]
    unsafe fn isum(wq: __m256i, aq: __m256i, aux: __m256i) -> __m256i {
        unsafe { offset_isum(wq, aq, aux) }
    }
}

impl LegacyF32 for BlockQ4_1 {
    type A = BlockQ8_1;
    const MIN: bool = true;
    #[inline(always)]
    unsafe fn act(a: *const BlockQ8_1) -> (__m256, __m256i, __m256i) {
        unsafe {
            let y = _mm256_loadu_si256((*a).qs.as_ptr() as *const __m256i);
            (f16_pair_splat(a as *const u8), y, y)
        }
    }
    #[inline(always)]
    unsafe fn weight(p: *const u8) -> (__m256, __m256i) {
        unsafe {
            let b = &*(p as *const BlockQ4_1);
            (f16_pair_splat(p), nibbles_32(b.qs.as_ptr()))
        }
    }
    #[inline(always)]
    unsafe fn isum(wq: __m256i, aq: __m256i, _aux: __m256i) -> __m256i {
        unsafe { mul_sum_us8_pairs(wq, aq) }
    }
}

impl LegacyF32 for BlockQ5_0 {
    type A = BlockQ8_0;
    const MIN: bool = false;
    #[inline(always)]
    unsafe fn act(a: *const BlockQ8_0) -> (__m256, __m256i, __m256i) {
        unsafe {
            let (y, ky) = q8_act_offset((*a).qs.as_ptr(), 16);
            (f16_splat((*a).d), y, ky)
        }
    }
    #[inline(always)]
    unsafe fn weight(p: *const u8) -> (__m256, __m256i) {
        unsafe {
            let b = &*(p as *const BlockQ5_0);
            // nibble | bit << 4, unsigned 0..=31
            let hi = _mm256_and_si256(
                bytes_from_bits_32(u32::from_le_bytes(b.qh)),
                _mm256_set1_epi8(0x10),
            );
            (
                f16_splat(b.d),
                _mm256_or_si256(nibbles_32(b.qs.as_ptr()), hi),
            )
        }
    }
    #[inline(always)]
    unsafe fn isum(wq: __m256i, aq: __m256i, aux: __m256i) -> __m256i {
        unsafe { offset_isum(wq, aq, aux) }
    }
}

impl LegacyF32 for BlockQ8_0 {
    type A = BlockQ8_0;
    const MIN: bool = false;
    #[inline(always)]
    unsafe fn act(a: *const BlockQ8_0) -> (__m256, __m256i, __m256i) {
        unsafe {
            let y = _mm256_loadu_si256((*a).qs.as_ptr() as *const __m256i);
            (f16_splat((*a).d), y, y)
        }
    }
    #[inline(always)]
    unsafe fn weight(p: *const u8) -> (__m256, __m256i) {
        unsafe {
            let b = &*(p as *const BlockQ8_0);
            (
                f16_splat(b.d),
                _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i),
            )
        }
    }
    #[inline(always)]
    unsafe fn isum(wq: __m256i, aq: __m256i, _aux: __m256i) -> __m256i {
        unsafe { mul_sum_i8_pairs(wq, aq) }
    }
}

/// Dots of weight rows `x + r * rb` (bytes, r < R, `nb` blocks each) with activation vectors
/// `y + v * ystride` (blocks, v < N): `out[r][v]`. One accumulator per pair: per block
/// `acc = fma(d_w * d_a, float(isum), acc)` (Q4_1 also `accm += m_w * s_a` in odd lanes),
/// then `hsum(acc) (+ accm lane 1)`.
#[inline(always)]
unsafe fn legacy_kernel<W: LegacyF32, const R: usize, const N: usize>(
    x: *const u8,
    rb: usize,
    nb: usize,
    y: *const W::A,
    ystride: usize,
) -> [[f32; N]; R] {
    unsafe {
        let bsize = size_of::<W>();
        let mut acc = [[_mm256_setzero_ps(); N]; R];
        let mut accm = [[_mm256_setzero_ps(); N]; R];
        let mut xp = x;
        let mut yp = y;
        // R > 1: the rows are read as R interleaved streams, which the hardware prefetchers
        // follow poorly; prefetch the next R rows (contiguous, R * rb bytes) instead, R blocks'
        // worth per block step: points 64 bytes apart over 192 bytes >= R * size cover every line.
        let mut pf = x.wrapping_add(R * rb);
        for _ in 0..nb {
            if R > 1 {
                _mm_prefetch::<_MM_HINT_T0>(pf as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(64) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(128) as *const i8);
                pf = pf.wrapping_add(R * bsize);
            } else {
                _mm_prefetch::<_MM_HINT_T0>(xp.wrapping_add(PREFETCH_BYTES) as *const i8);
            }
            // (a loop rather than `array::from_fn`, whose closure call is not inlined in
            // unoptimized builds)
            let mut a = [(
                _mm256_setzero_ps(),
                _mm256_setzero_si256(),
                _mm256_setzero_si256(),
            ); N];
            for v in 0..N {
                a[v] = W::act(yp.add(v * ystride));
            }
            for r in 0..R {
                let (ws, wq) = W::weight(xp.add(r * rb));
                for v in 0..N {
                    let (asc, aq, aux) = a[v];
                    let p = _mm256_cvtepi32_ps(W::isum(wq, aq, aux));
                    let s = _mm256_mul_ps(ws, asc);
                    if W::MIN {
                        acc[r][v] = _mm256_fmadd_ps(_mm256_moveldup_ps(s), p, acc[r][v]);
                        accm[r][v] = _mm256_add_ps(accm[r][v], s);
                    } else {
                        acc[r][v] = _mm256_fmadd_ps(s, p, acc[r][v]);
                    }
                }
            }
            xp = xp.add(bsize);
            yp = yp.add(1);
        }
        let mut out = [[0f32; N]; R];
        for r in 0..R {
            for v in 0..N {
                let mut s = hsum_ps(acc[r][v]);
                if W::MIN {
                    s += _mm_cvtss_f32(_mm_movehdup_ps(_mm256_castps256_ps128(accm[r][v])));
                }
                out[r][v] = s;
            }
        }
        out
    }
}

macro_rules! legacy_kernels {
    ($one:ident, $four:ident, $rows4:ident, $wb:ty, $ab:ty) => {
        kernel_fn! {
            pub unsafe fn $one(x: &[$wb], y: &[$ab]) -> f32 {
                debug_assert_eq!(x.len(), y.len());
                unsafe {
                    legacy_kernel::<$wb, 1, 1>(x.as_ptr() as *const u8, 0, x.len(), y.as_ptr(), 0)[0][0]
                }
            }
        }
        kernel_fn! {
            /// Four activation vectors at `y`, `y + stride`, ... (blocks).
            pub unsafe fn $four(x: &[$wb], y: *const $ab, stride: usize, out: &mut [f32; 4]) {
                unsafe {
                    *out = legacy_kernel::<$wb, 1, 4>(x.as_ptr() as *const u8, 0, x.len(), y, stride)[0]
                }
            }
        }
        kernel_fn! {
            /// Four weight rows at `w`, `w + rb`, ... (bytes) with one activation vector.
            pub unsafe fn $rows4(w: *const u8, rb: usize, y: &[$ab], out: &mut [f32; 4]) {
                unsafe {
                    let r = legacy_kernel::<$wb, 4, 1>(w, rb, y.len(), y.as_ptr(), 0);
                    *out = [r[0][0], r[1][0], r[2][0], r[3][0]];
                }
            }
        }
    };
}
legacy_kernels!(
    dot_q4_0_q8_0,
    dot4_q4_0_q8_0,
    rows4_q4_0_q8_0,
    BlockQ4_0,
    BlockQ8_0
);
legacy_kernels!(
    dot_q4_1_q8_1,
    dot4_q4_1_q8_1,
    rows4_q4_1_q8_1,
    BlockQ4_1,
    BlockQ8_1
);
legacy_kernels!(
    dot_q5_0_q8_0,
    dot4_q5_0_q8_0,
    rows4_q5_0_q8_0,
    BlockQ5_0,
    BlockQ8_0
);
legacy_kernels!(
    dot_q8_0_q8_0,
    dot4_q8_0_q8_0,
    rows4_q8_0_q8_0,
    BlockQ8_0,
    BlockQ8_0
);

// ---- K-quants

/// Q4_K/Q5_K 12-byte scale block -> (8 scales, 8 mins), same as `get_scale_min_k4`.
#[inline(always)]
fn unpack_k4(s: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    const KMASK1: u32 = 0x3f3f3f3f;
    const KMASK2: u32 = 0x0f0f0f0f;
    const KMASK3: u32 = 0x03030303;
    let u0 = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    let u1 = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
    let u2 = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
    let sc_lo = u0 & KMASK1;
    let sc_hi = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
    let mn_lo = u1 & KMASK1;
    let mn_hi = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
    // (u64 packing rather than `copy_from_slice`, which is a call in unoptimized builds)
    let sc = (sc_lo as u64 | (sc_hi as u64) << 32).to_le_bytes();
    let mn = (mn_lo as u64 | (mn_hi as u64) << 32).to_le_bytes();
    (sc, mn)
}

/// sum_j mins[j] * (bsums[2j] + bsums[2j+1]) as 4 i32 lanes.
#[inline(always)]
unsafe fn mins_dot_bsums(m16: __m128i, bsums: &[i16; 16]) -> __m128i {
    unsafe {
        let q8sums = _mm256_loadu_si256(bsums.as_ptr() as *const __m256i);
        let q8s = _mm_hadd_epi16(
            _mm256_castsi256_si128(q8sums),
            _mm256_extracti128_si256::<1>(q8sums),
        );
        _mm_madd_epi16(m16, q8s)
    }
}

/// Integer part of a Q4_K/Q5_K super-block: per activation, 8 i32 lanes summing to
/// Σ scale·q·q8 (`sc` are the unpacked 6-bit scales).
#[inline(always)]
unsafe fn k4_int<const N: usize, const HIGH: bool>(
    sc: &[u8; 8],
    qs: *const u8,
    qh: *const u8,
    y: *const BlockQ8K,
    stride: usize,
) -> [__m256i; N] {
    unsafe {
        let m4 = _mm256_set1_epi8(0x0F);
        let m16 = _mm256_set1_epi8(0x10);
        let hbits = if HIGH {
            _mm256_loadu_si256(qh as *const __m256i)
        } else {
            _mm256_setzero_si256()
        };
        let mut sumi = [_mm256_setzero_si256(); N];
        for j in 0..4 {
            let q4bits = _mm256_loadu_si256(qs.add(32 * j) as *const __m256i);
            let mut ql = _mm256_and_si256(q4bits, m4);
            let mut qhi = _mm256_and_si256(_mm256_srli_epi16::<4>(q4bits), m4);
            if HIGH {
                let ml = _mm256_set1_epi8((1u8 << (2 * j)) as i8);
                let mh = _mm256_set1_epi8((2u8 << (2 * j)) as i8);
                ql = _mm256_or_si256(
                    ql,
                    _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hbits, ml), ml), m16),
                );
                qhi = _mm256_or_si256(
                    qhi,
                    _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hbits, mh), mh), m16),
                );
            }
            let sl = _mm256_set1_epi16(*sc.get_unchecked(2 * j) as i16);
            let sh = _mm256_set1_epi16(*sc.get_unchecked(2 * j + 1) as i16);
            for v in 0..N {
                let q8 = (*y.add(v * stride)).qs.as_ptr();
                let q8l = _mm256_loadu_si256(q8.add(64 * j) as *const __m256i);
                let q8h = _mm256_loadu_si256(q8.add(64 * j + 32) as *const __m256i);
                let pl = _mm256_madd_epi16(sl, _mm256_maddubs_epi16(ql, q8l));
                let ph = _mm256_madd_epi16(sh, _mm256_maddubs_epi16(qhi, q8h));
                sumi[v] = _mm256_add_epi32(sumi[v], _mm256_add_epi32(pl, ph));
            }
        }
        sumi
    }
}

/// pshufb masks selecting scale bytes a (x8) and a+1 (x8) for a = 2i.
static Q6K_SCALE_SHUF: [[u8; 16]; 8] = {
    let mut m = [[0u8; 16]; 8];
    let mut i = 0;
    while i < 8 {
        let mut j = 0;
        while j < 16 {
            m[i][j] = (2 * i + j / 8) as u8;
            j += 1;
        }
        i += 1;
    }
    m
};

/// Integer part of a Q6_K super-block: per activation (`y + v * stride`), 8 i32 lanes summing
/// to Σ scale·q·q8.
/// The lanes (not just their total) are those of llama.cpp's AVX2 `ggml_vec_dot_q6_K_q8_K`,
/// so the f32 kernel rounds as it does; keep the per-group `- 32 * q8` form.
#[inline(always)]
unsafe fn q6_k_int<const N: usize>(
    bx: &BlockQ6K,
    y: *const BlockQ8K,
    stride: usize,
) -> [__m256i; N] {
    unsafe {
        let m4 = _mm256_set1_epi8(0x0F);
        let m2 = _mm256_set1_epi8(0x03);
        let m32s = _mm256_set1_epi8(32);
        {
            let sc16 = _mm_loadu_si128(bx.scales.as_ptr() as *const __m128i);
            let mut sumi = [_mm256_setzero_si256(); N];
            for h in 0..2 {
                let ql = bx.ql.as_ptr().add(64 * h);
                let b1 = _mm256_loadu_si256(ql as *const __m256i);
                let b2 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
                let bh = _mm256_loadu_si256(bx.qh.as_ptr().add(32 * h) as *const __m256i);
                for k in 0..4 {
                    // element group k of this half: low/high nibble of b1/b2 plus 2 bits of bh
                    let lo = match k {
                        0 => _mm256_and_si256(b1, m4),
                        1 => _mm256_and_si256(b2, m4),
                        2 => _mm256_and_si256(_mm256_srli_epi16::<4>(b1), m4),
                        _ => _mm256_and_si256(_mm256_srli_epi16::<4>(b2), m4),
                    };
                    let hi = match k {
                        0 => _mm256_slli_epi16::<4>(_mm256_and_si256(bh, m2)),
                        1 => {
                            _mm256_slli_epi16::<2>(_mm256_and_si256(bh, _mm256_slli_epi16::<2>(m2)))
                        }
                        2 => _mm256_and_si256(bh, _mm256_slli_epi16::<4>(m2)),
                        _ => {
                            _mm256_and_si256(_mm256_srli_epi16::<2>(bh), _mm256_slli_epi16::<4>(m2))
                        }
                    };
                    let q = _mm256_or_si256(lo, hi);
                    // lanes 0..8 = scales[a], lanes 8..16 = scales[a + 1], a = 8h + 2k
                    let mask =
                        _mm_loadu_si128(Q6K_SCALE_SHUF[4 * h + k].as_ptr() as *const __m128i);
                    let scv = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc16, mask));
                    for v in 0..N {
                        let q8 = (*y.add(v * stride)).qs.as_ptr().add(128 * h + 32 * k);
                        let q8k = _mm256_loadu_si256(q8 as *const __m256i);
                        let p16 = _mm256_sub_epi16(
                            _mm256_maddubs_epi16(q, q8k),
                            _mm256_maddubs_epi16(m32s, q8k),
                        );
                        sumi[v] = _mm256_add_epi32(sumi[v], _mm256_madd_epi16(scv, p16));
                    }
                }
            }
            sumi
        }
    }
}

// ---------------------------------------------------------------------------------------------
// f64-accumulating kernels (`matmul_f64`). Per-block contributions and their summation order
// are exactly those of `reference::dot64` (block i -> lane i % 4 of one __m256d; float
// elements i -> lane i % 16 of four __m256d), with no FMA, so the results are bitwise equal.

use crate::kernels::cpu::reference::{combine4, combine16, iq4_xs_scales, q3_k_scales};

/// A 32-element activation block: Q8_0, or Q8_1 with its sum `s`.
trait Act64 {
    fn d(&self) -> F16Bytes;
    fn s(&self) -> F16Bytes {
        F16Bytes::default()
    }
    /// The 32 quants.
    unsafe fn quants(&self) -> __m256i;
}

impl Act64 for BlockQ8_0 {
    #[inline(always)]
    fn d(&self) -> F16Bytes {
        self.d
    }
    #[inline(always)]
    unsafe fn quants(&self) -> __m256i {
        unsafe { _mm256_loadu_si256(self.qs.as_ptr() as *const __m256i) }
    }
}

impl Act64 for BlockQ8_1 {
    #[inline(always)]
    fn d(&self) -> F16Bytes {
        self.d
    }
    #[inline(always)]
    fn s(&self) -> F16Bytes {
        self.s
    }
    #[inline(always)]
    unsafe fn quants(&self) -> __m256i {
        unsafe { _mm256_loadu_si256(self.qs.as_ptr() as *const __m256i) }
    }
}

/// A legacy 32-element weight block paired with its activation block type.
trait Legacy64 {
    type A: Act64;
    /// Whether the block has an additive min (Q4_1, Q5_1: `+ m_w * s_a`); those blocks' quants
    /// are unsigned, the others' signed.
    const MIN: bool;
    /// The 32 quants as bytes: unsigned (0..=31) with `MIN`, else signed.
    unsafe fn quants(&self) -> __m256i;
    fn d(&self) -> F16Bytes {
        F16Bytes::default()
    }
    fn m(&self) -> F16Bytes {
        F16Bytes::default()
    }
    /// (d, m) of four blocks as f64 (exact); f16 fields by default.
    #[inline(always)]
    unsafe fn scales4(b: [&Self; 4]) -> (__m256d, __m256d)
    where
        Self: Sized,
    {
        unsafe {
            f16x8_to_pd(
                [b[0].d(), b[1].d(), b[2].d(), b[3].d()],
                [b[0].m(), b[1].m(), b[2].m(), b[3].m()],
            )
        }
    }
}

/// 8 i32 lanes summing to the integer dot of weight quants `q` (from `W::quants`) with `a`.
#[inline(always)]
unsafe fn legacy64_isum8<W: Legacy64>(q: __m256i, a: &W::A) -> __m256i {
    unsafe {
        if W::MIN {
            mul_sum_us8_pairs(q, a.quants())
        } else {
            mul_sum_i8_pairs(q, a.quants())
        }
    }
}

impl Legacy64 for BlockQ4_0 {
    type A = BlockQ8_0;
    const MIN: bool = false;
    #[inline(always)]
    unsafe fn quants(&self) -> __m256i {
        unsafe { _mm256_sub_epi8(nibbles_32(self.qs.as_ptr()), _mm256_set1_epi8(8)) }
    }
    #[inline(always)]
    fn d(&self) -> F16Bytes {
        self.d
    }
}

impl Legacy64 for BlockQ4_1 {
    type A = BlockQ8_1;
    const MIN: bool = true;
    #[inline(always)]
    unsafe fn quants(&self) -> __m256i {
        unsafe { nibbles_32(self.qs.as_ptr()) }
    }
    #[inline(always)]
    fn d(&self) -> F16Bytes {
        self.d
    }
    #[inline(always)]
    fn m(&self) -> F16Bytes {
        self.m
    }
}

impl Legacy64 for BlockQ5_0 {
    type A = BlockQ8_0;
    const MIN: bool = false;
    #[inline(always)]
    unsafe fn quants(&self) -> __m256i {
        unsafe {
            // (nibble | bit << 4) - 16 == nibble | (bit ? 0 : 0xF0) as i8
            let hi = _mm256_andnot_si256(
                bytes_from_bits_32(u32::from_le_bytes(self.qh)),
                _mm256_set1_epi8(0xF0u8 as i8),
            );
            _mm256_or_si256(nibbles_32(self.qs.as_ptr()), hi)
        }
    }
    #[inline(always)]
    fn d(&self) -> F16Bytes {
        self.d
    }
}

impl Legacy64 for BlockQ8_0 {
    type A = BlockQ8_0;
    const MIN: bool = false;
    #[inline(always)]
    unsafe fn quants(&self) -> __m256i {
        unsafe { _mm256_loadu_si256(self.qs.as_ptr() as *const __m256i) }
    }
    #[inline(always)]
    fn d(&self) -> F16Bytes {
        self.d
    }
}

impl Legacy64 for BlockQ5_1 {
    type A = BlockQ8_1;
    const MIN: bool = true;
    #[inline(always)]
    unsafe fn quants(&self) -> __m256i {
        unsafe {
            let hi = _mm256_and_si256(
                bytes_from_bits_32(u32::from_le_bytes(self.qh)),
                _mm256_set1_epi8(0x10),
            );
            _mm256_or_si256(nibbles_32(self.qs.as_ptr()), hi)
        }
    }
    #[inline(always)]
    fn d(&self) -> F16Bytes {
        self.d
    }
    #[inline(always)]
    fn m(&self) -> F16Bytes {
        self.m
    }
}

/// 16 i8 table entries in both 128-bit lanes, for `_mm256_shuffle_epi8` lookups.
#[inline(always)]
unsafe fn table_vec(t: &[i8; 16]) -> __m256i {
    unsafe { _mm256_broadcastsi128_si256(_mm_loadu_si128(t.as_ptr() as *const __m128i)) }
}

/// 32 table levels of 16 bytes of nibble indices (element order).
#[inline(always)]
unsafe fn table_levels_32(p: *const u8, t: __m256i) -> __m256i {
    unsafe { _mm256_shuffle_epi8(t, nibbles_32(p)) }
}

impl Legacy64 for BlockIQ4NL {
    type A = BlockQ8_0;
    const MIN: bool = false;
    #[inline(always)]
    unsafe fn quants(&self) -> __m256i {
        unsafe { table_levels_32(self.qs.as_ptr(), table_vec(&KVALUES_IQ4NL)) }
    }
    #[inline(always)]
    fn d(&self) -> F16Bytes {
        self.d
    }
}

impl Legacy64 for BlockMXFP4 {
    type A = BlockQ8_0;
    const MIN: bool = false;
    #[inline(always)]
    unsafe fn quants(&self) -> __m256i {
        unsafe { table_levels_32(self.qs.as_ptr(), table_vec(&KVALUES_MXFP4)) }
    }
    #[inline(always)]
    unsafe fn scales4(b: [&Self; 4]) -> (__m256d, __m256d) {
        unsafe {
            let d = |i: usize| e8m0_half(b[i].e) as f64;
            (_mm256_setr_pd(d(0), d(1), d(2), d(3)), _mm256_setzero_pd())
        }
    }
}

/// Four f16 scales and four f16 mins -> (4 x f64 scales, 4 x f64 mins), exact.
#[inline(always)]
unsafe fn f16x8_to_pd(d: [F16Bytes; 4], m: [F16Bytes; 4]) -> (__m256d, __m256d) {
    unsafe {
        let h = _mm_setr_epi16(
            d[0].bits() as i16,
            d[1].bits() as i16,
            d[2].bits() as i16,
            d[3].bits() as i16,
            m[0].bits() as i16,
            m[1].bits() as i16,
            m[2].bits() as i16,
            m[3].bits() as i16,
        );
        let f = _mm256_cvtph_ps(h);
        (
            _mm256_cvtps_pd(_mm256_castps256_ps128(f)),
            _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(f)),
        )
    }
}

/// Weight side of a group of four blocks: their quants and (d, m) scales as f64.
struct Weights64 {
    q: [__m256i; 4],
    d: __m256d,
    m: __m256d,
}

#[inline(always)]
unsafe fn legacy64_weights<W: Legacy64>(b: [&W; 4]) -> Weights64 {
    unsafe {
        let (d, m) = W::scales4(b);
        Weights64 {
            q: [b[0].quants(), b[1].quants(), b[2].quants(), b[3].quants()],
            d,
            m,
        }
    }
}

/// Activation side of a group of four blocks: (d, s) scales as f64.
#[inline(always)]
unsafe fn legacy64_act_scales<W: Legacy64>(a: [&W::A; 4]) -> (__m256d, __m256d) {
    unsafe {
        f16x8_to_pd(
            [a[0].d(), a[1].d(), a[2].d(), a[3].d()],
            [a[0].s(), a[1].s(), a[2].s(), a[3].s()],
        )
    }
}

/// The four blocks' contributions, one per f64 lane: `(d_w * d_a) * isum` (Q4_1: `+ m_w * s_a`).
#[inline(always)]
unsafe fn legacy64_group<W: Legacy64>(
    w: &Weights64,
    a: [&W::A; 4],
    (ad, as_): (__m256d, __m256d),
) -> __m256d {
    unsafe {
        let isum = hsum4_epi32(
            legacy64_isum8::<W>(w.q[0], a[0]),
            legacy64_isum8::<W>(w.q[1], a[1]),
            legacy64_isum8::<W>(w.q[2], a[2]),
            legacy64_isum8::<W>(w.q[3], a[3]),
        );
        let c = _mm256_mul_pd(_mm256_mul_pd(w.d, ad), _mm256_cvtepi32_pd(isum));
        if W::MIN {
            _mm256_add_pd(c, _mm256_mul_pd(w.m, as_))
        } else {
            c
        }
    }
}

#[inline(always)]
unsafe fn legacy64_body<W: Legacy64, const N: usize>(
    x: &[W],
    y: *const W::A,
    stride: usize,
) -> [f64; N] {
    unsafe {
        let nb = x.len();
        let mut acc = [_mm256_setzero_pd(); N];
        let mut i = 0;
        while i + 4 <= nb {
            let b = [
                x.get_unchecked(i),
                x.get_unchecked(i + 1),
                x.get_unchecked(i + 2),
                x.get_unchecked(i + 3),
            ];
            let ahead = (x.as_ptr().wrapping_add(i) as *const i8).wrapping_add(PREFETCH_BYTES);
            _mm_prefetch::<_MM_HINT_T0>(ahead);
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(128));
            let w = legacy64_weights(b);
            for v in 0..N {
                let p = y.add(v * stride + i);
                let a = [&*p, &*p.add(1), &*p.add(2), &*p.add(3)];
                acc[v] = _mm256_add_pd(
                    acc[v],
                    legacy64_group::<W>(&w, a, legacy64_act_scales::<W>(a)),
                );
            }
            i += 4;
        }
        if i < nb {
            // The last 1-3 blocks as one group padded with zero blocks, whose contributions
            // are exactly zero: each real block still lands in lane j % 4, added once, so the
            // result equals the one-block-at-a-time tail bit for bit, at vector speed (rows
            // of 64 or 96 values, e.g. a narrow expert slice, are all tail).
            let zero_w: W = std::mem::zeroed();
            let zero_a: W::A = std::mem::zeroed();
            let pick_w = |j: usize| if j < nb { x.get_unchecked(j) } else { &zero_w };
            let w = legacy64_weights([pick_w(i), pick_w(i + 1), pick_w(i + 2), pick_w(i + 3)]);
            for v in 0..N {
                let pick_a = |j: usize| {
                    if j < nb {
                        &*y.add(v * stride + j)
                    } else {
                        &zero_a
                    }
                };
                let a = [pick_a(i), pick_a(i + 1), pick_a(i + 2), pick_a(i + 3)];
                acc[v] = _mm256_add_pd(
                    acc[v],
                    legacy64_group::<W>(&w, a, legacy64_act_scales::<W>(a)),
                );
            }
        }
        let mut out = [0f64; N];
        for v in 0..N {
            let mut l = [0f64; 4];
            _mm256_storeu_pd(l.as_mut_ptr(), acc[v]);
            out[v] = combine4(l);
        }
        out
    }
}

/// Q4_K or Q5_K super-block fields.
trait K4Block {
    fn parts(&self) -> (F16Bytes, F16Bytes, &[u8; 12], *const u8, *const u8);
}
impl K4Block for BlockQ4K {
    #[inline(always)]
    fn parts(&self) -> (F16Bytes, F16Bytes, &[u8; 12], *const u8, *const u8) {
        (
            self.d,
            self.dmin,
            &self.scales,
            self.qs.as_ptr(),
            std::ptr::null(),
        )
    }
}
impl K4Block for BlockQ5K {
    #[inline(always)]
    fn parts(&self) -> (F16Bytes, F16Bytes, &[u8; 12], *const u8, *const u8) {
        (
            self.d,
            self.dmin,
            &self.scales,
            self.qs.as_ptr(),
            self.qh.as_ptr(),
        )
    }
}

/// Super-blocks ahead of the one being summed that the K-quant row kernels prefetch: decoding
/// streams each weight row once, and the hardware prefetcher alone leaves the loads waiting
/// on memory (about 100 ns, several super-blocks' worth of work).
const PREFETCH_BLOCKS: usize = 8;

/// Bytes ahead that the 32-element-block row kernels prefetch (see `PREFETCH_BLOCKS`).
const PREFETCH_BYTES: usize = 1024;

/// Prefetches the (up to 256-byte) block at `p` into L1. Prefetching is a hint: an address past
/// the end of the row (the next row, or unmapped memory) does no harm.
#[inline(always)]
unsafe fn prefetch_ahead<B>(p: *const B) {
    unsafe {
        let p = p as *const i8;
        let mut off = 0;
        while off < size_of::<B>() {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off));
            off += 64;
        }
    }
}

/// The f64 lanes of a row's super-block contributions, four super-blocks at a time: `ints(i,
/// v)` gives super-block i's exact (8 lanes of Σ scale·q·q8, 4 lanes of Σ min·bsum) with
/// activation v, `scales(i)` the weight's (d, dmin). Per group, super-blocks i..i+4 land in
/// f64 lanes 0..4 (lane i % 4, as in `reference::dot64`), each contribution computed as
/// `contrib_k4` (or `contrib_scaled` without `mins`) does, without fused multiply-adds.
#[inline(always)]
unsafe fn superblock_lanes<const N: usize>(
    nb: usize,
    y: *const BlockQ8K,
    stride: usize,
    mins: bool,
    mut ints: impl FnMut(usize, &mut [(__m256i, __m128i); N]),
    scales: impl Fn(usize) -> (f32, f32),
) -> [f64; N] {
    unsafe {
        let mut acc = [_mm256_setzero_pd(); N];
        let zero = (_mm256_setzero_si256(), _mm_setzero_si128());
        let mut i = 0;
        while i < nb {
            // A last group of 1-3 super-blocks is padded with zero contributions, which leave
            // every lane's sum unchanged.
            let n = (nb - i).min(4);
            let mut s = [[zero; N]; 4];
            let mut dw = [0f64; 4];
            let mut dmin = [0f64; 4];
            for j in 0..n {
                ints(i + j, &mut s[j]);
                let (d, m) = scales(i + j);
                dw[j] = d as f64;
                dmin[j] = m as f64;
            }
            let dw = _mm256_loadu_pd(dw.as_ptr());
            let dmin = _mm256_loadu_pd(dmin.as_ptr());
            for v in 0..N {
                let isum = hsum4_epi32(s[0][v].0, s[1][v].0, s[2][v].0, s[3][v].0);
                let mut da = [0f64; 4];
                for j in 0..n {
                    da[j] = (*y.add(v * stride + i + j)).d as f64;
                }
                let da = _mm256_loadu_pd(da.as_ptr());
                let mut c = _mm256_mul_pd(_mm256_mul_pd(dw, da), _mm256_cvtepi32_pd(isum));
                if mins {
                    let m = |j: usize| _mm256_zextsi128_si256(s[j][v].1);
                    let summins = hsum4_epi32(m(0), m(1), m(2), m(3));
                    c = _mm256_sub_pd(
                        c,
                        _mm256_mul_pd(_mm256_mul_pd(dmin, da), _mm256_cvtepi32_pd(summins)),
                    );
                }
                acc[v] = _mm256_add_pd(acc[v], c);
            }
            i += 4;
        }
        let mut out = [0f64; N];
        for v in 0..N {
            let mut l = [0f64; 4];
            _mm256_storeu_pd(l.as_mut_ptr(), acc[v]);
            out[v] = combine4(l);
        }
        out
    }
}

#[inline(always)]
unsafe fn k4_64_body<B: K4Block, const HIGH: bool, const N: usize>(
    x: &[B],
    y: *const BlockQ8K,
    stride: usize,
) -> [f64; N] {
    unsafe {
        superblock_lanes::<N>(
            x.len(),
            y,
            stride,
            true,
            |i, out| {
                prefetch_ahead(x.as_ptr().wrapping_add(i + PREFETCH_BLOCKS));
                let (_, _, scales, qs, qh) = x.get_unchecked(i).parts();
                let (sc, mn) = unpack_k4(scales);
                let mins16 = _mm_cvtepu8_epi16(_mm_loadl_epi64(mn.as_ptr() as *const __m128i));
                let sumi = k4_int::<N, HIGH>(&sc, qs, qh, y.add(i), stride);
                for v in 0..N {
                    let by = &*y.add(v * stride + i);
                    out[v] = (sumi[v], mins_dot_bsums(mins16, &by.bsums));
                }
            },
            |i| {
                let (d, dmin, ..) = x.get_unchecked(i).parts();
                (f16_to_f32(d), f16_to_f32(dmin))
            },
        )
    }
}

#[inline(always)]
unsafe fn q6_k_64_body<const N: usize>(
    x: &[BlockQ6K],
    y: *const BlockQ8K,
    stride: usize,
) -> [f64; N] {
    unsafe {
        superblock_lanes::<N>(
            x.len(),
            y,
            stride,
            false,
            |i, out| {
                prefetch_ahead(x.as_ptr().wrapping_add(i + PREFETCH_BLOCKS));
                let sumi = q6_k_int::<N>(x.get_unchecked(i), y.add(i), stride);
                for v in 0..N {
                    out[v] = (sumi[v], _mm_setzero_si128());
                }
            },
            |i| (f16_to_f32(x.get_unchecked(i).d), 0.0),
        )
    }
}

/// `legacy64_body` for R weight rows (at `x + r * rb`, bytes) and one activation vector: the
/// activation's loads and scale conversions are shared by the rows, and every row gets the
/// same operations in the same order as `legacy64_body::<W, 1>`, so the results are bitwise
/// equal to R single-row calls.
#[inline(always)]
unsafe fn legacy64_rows<W: Legacy64, const R: usize>(
    x: *const u8,
    rb: usize,
    y: &[W::A],
) -> [f64; R] {
    unsafe {
        let nb = y.len();
        let row = |r: usize| x.add(r * rb) as *const W;
        let mut acc = [_mm256_setzero_pd(); R];
        // The R rows are R interleaved streams; prefetch the next R rows (contiguous) ahead.
        let mut pf = x.wrapping_add(R * rb);
        let step = 4 * R * size_of::<W>();
        let mut i = 0;
        while i + 4 <= nb {
            let mut p = 0;
            while p < step {
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(p) as *const i8);
                p += 64;
            }
            pf = pf.wrapping_add(step);
            let a = [
                y.get_unchecked(i),
                y.get_unchecked(i + 1),
                y.get_unchecked(i + 2),
                y.get_unchecked(i + 3),
            ];
            let scales = legacy64_act_scales::<W>(a);
            for (r, acc) in acc.iter_mut().enumerate() {
                let w = row(r);
                let b = [&*w.add(i), &*w.add(i + 1), &*w.add(i + 2), &*w.add(i + 3)];
                *acc = _mm256_add_pd(*acc, legacy64_group::<W>(&legacy64_weights(b), a, scales));
            }
            i += 4;
        }
        if i < nb {
            // The last 1-3 blocks as one zero-padded group, as in `legacy64_body`.
            let zero_w: W = std::mem::zeroed();
            let zero_a: W::A = std::mem::zeroed();
            let pick_a = |j: usize| if j < nb { y.get_unchecked(j) } else { &zero_a };
            let a = [pick_a(i), pick_a(i + 1), pick_a(i + 2), pick_a(i + 3)];
            let scales = legacy64_act_scales::<W>(a);
            for (r, acc) in acc.iter_mut().enumerate() {
                let pick_w = |j: usize| if j < nb { &*row(r).add(j) } else { &zero_w };
                let b = [pick_w(i), pick_w(i + 1), pick_w(i + 2), pick_w(i + 3)];
                *acc = _mm256_add_pd(*acc, legacy64_group::<W>(&legacy64_weights(b), a, scales));
            }
        }
        let mut out = [0f64; R];
        for r in 0..R {
            let mut l = [0f64; 4];
            _mm256_storeu_pd(l.as_mut_ptr(), acc[r]);
            out[r] = combine4(l);
        }
        out
    }
}

macro_rules! rows64_kernel {
    ($name:ident, $wb:ty, $ab:ty) => {
        kernel_fn! {
            /// Four weight rows at `w`, `w + rb`, ... (bytes) with one activation vector.
            pub unsafe fn $name(w: *const u8, rb: usize, y: &[$ab], out: &mut [f64; 4]) {
                unsafe { *out = legacy64_rows::<$wb, 4>(w, rb, y) }
            }
        }
    };
}
rows64_kernel!(rows64_q4_0_q8_0, BlockQ4_0, BlockQ8_0);
rows64_kernel!(rows64_q4_1_q8_1, BlockQ4_1, BlockQ8_1);
rows64_kernel!(rows64_q5_0_q8_0, BlockQ5_0, BlockQ8_0);
rows64_kernel!(rows64_q8_0_q8_0, BlockQ8_0, BlockQ8_0);

macro_rules! quant64_kernels {
    // `$body[$g, ...]`: the body generic over (the listed parameters, then) N activations.
    ($one:ident, $four:ident, $body:ident [$($g:tt),*], $wb:ty, $ab:ty) => {
        kernel_fn! {
            pub unsafe fn $one(x: &[$wb], y: &[$ab]) -> f64 {
                debug_assert_eq!(x.len(), y.len());
                unsafe { $body::<$($g,)* 1>(x, y.as_ptr(), 0)[0] }
            }
        }
        kernel_fn! {
            /// Four activation vectors at `y`, `y + stride`, ... (blocks).
            pub unsafe fn $four(x: &[$wb], y: *const $ab, stride: usize, out: &mut [f64; 4]) {
                unsafe { *out = $body::<$($g,)* 4>(x, y, stride) }
            }
        }
    };
}
quant64_kernels!(
    dot64_q4_0_q8_0,
    dot64x4_q4_0_q8_0,
    legacy64_body[BlockQ4_0],
    BlockQ4_0,
    BlockQ8_0
);
quant64_kernels!(
    dot64_q4_1_q8_1,
    dot64x4_q4_1_q8_1,
    legacy64_body[BlockQ4_1],
    BlockQ4_1,
    BlockQ8_1
);
quant64_kernels!(
    dot64_q5_0_q8_0,
    dot64x4_q5_0_q8_0,
    legacy64_body[BlockQ5_0],
    BlockQ5_0,
    BlockQ8_0
);
quant64_kernels!(
    dot64_q8_0_q8_0,
    dot64x4_q8_0_q8_0,
    legacy64_body[BlockQ8_0],
    BlockQ8_0,
    BlockQ8_0
);
quant64_kernels!(dot64_q4_k_q8_k, dot64x4_q4_k_q8_k, k4_64_body[BlockQ4K, false], BlockQ4K, BlockQ8K);
quant64_kernels!(dot64_q5_k_q8_k, dot64x4_q5_k_q8_k, k4_64_body[BlockQ5K, true], BlockQ5K, BlockQ8K);
quant64_kernels!(dot64_q6_k_q8_k, dot64x4_q6_k_q8_k, q6_k_64_body[], BlockQ6K, BlockQ8K);

// ---- Q2_K, Q3_K, IQ4_XS (f64 form only: their f32 product is this one rounded)

/// Per super-block work of the f64 kernels, summed into lanes by `superblock_lanes`: the
/// weight side is prepared once and shared by the N activation vectors; `isums` gives, with one
/// activation block, lanes summing to the exact Σ scale·q·q8 (8) and Σ min·bsum (4; zero
/// without `MINS`); `scales` the weight's (d, dmin).
trait SuperBlock64 {
    type Prep;
    const MINS: bool;
    unsafe fn prep(&self) -> Self::Prep;
    unsafe fn isums(p: &Self::Prep, a: &BlockQ8K) -> (__m256i, __m128i);
    fn scales(&self) -> (f32, f32);
}

/// 32 activation quants of chunk `c` (elements 32c..32c+32).
#[inline(always)]
unsafe fn q8k_chunk(a: &BlockQ8K, c: usize) -> __m256i {
    unsafe { _mm256_loadu_si256(a.qs.as_ptr().add(32 * c) as *const __m256i) }
}

struct Q2Prep {
    q: [__m256i; 8],
    /// The 16 4-bit scales as bytes.
    scales: __m128i,
    mins: __m256i,
}

impl SuperBlock64 for BlockQ2K {
    type Prep = Q2Prep;
    const MINS: bool = true;
    #[inline(always)]
    unsafe fn prep(&self) -> Q2Prep {
        unsafe {
            let mut q = [_mm256_setzero_si256(); 8];
            let m3 = _mm256_set1_epi8(3);
            for n in 0..2 {
                let raw = _mm256_loadu_si256(self.qs.as_ptr().add(32 * n) as *const __m256i);
                q[4 * n] = _mm256_and_si256(raw, m3);
                q[4 * n + 1] = _mm256_and_si256(_mm256_srli_epi16::<2>(raw), m3);
                q[4 * n + 2] = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), m3);
                q[4 * n + 3] = _mm256_and_si256(_mm256_srli_epi16::<6>(raw), m3);
            }
            let sc = _mm_loadu_si128(self.scales.as_ptr() as *const __m128i);
            let mins =
                _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(sc), _mm_set1_epi8(0x0F)));
            Q2Prep {
                q,
                scales: _mm_and_si128(sc, _mm_set1_epi8(0x0F)),
                mins,
            }
        }
    }
    #[inline(always)]
    unsafe fn isums(p: &Q2Prep, a: &BlockQ8K) -> (__m256i, __m128i) {
        unsafe {
            let mut acc = _mm256_setzero_si256();
            for c in 0..8 {
                let prod = _mm256_maddubs_epi16(p.q[c], q8k_chunk(a, c));
                let mask = _mm_loadu_si128(Q6K_SCALE_SHUF[c].as_ptr() as *const __m128i);
                let sc = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(p.scales, mask));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(prod, sc));
            }
            let bsums = _mm256_loadu_si256(a.bsums.as_ptr() as *const __m256i);
            let mins = _mm256_madd_epi16(p.mins, bsums);
            let mins = _mm_add_epi32(
                _mm256_castsi256_si128(mins),
                _mm256_extracti128_si256::<1>(mins),
            );
            (acc, mins)
        }
    }
    #[inline(always)]
    fn scales(&self) -> (f32, f32) {
        (f16_to_f32(self.d), f16_to_f32(self.dmin))
    }
}

struct Q3Prep {
    /// The 2-bit fields (0..=3).
    q: [__m256i; 8],
    /// 4 where the element's high bit is clear, else 0 (level = q - offset).
    offset: [__m256i; 8],
    /// The 16 scales as i8.
    scales: __m128i,
}

impl SuperBlock64 for BlockQ3K {
    type Prep = Q3Prep;
    const MINS: bool = false;
    #[inline(always)]
    unsafe fn prep(&self) -> Q3Prep {
        unsafe {
            let mut q = [_mm256_setzero_si256(); 8];
            let mut offset = [_mm256_setzero_si256(); 8];
            let m3 = _mm256_set1_epi8(3);
            let four = _mm256_set1_epi8(4);
            let hm = _mm256_loadu_si256(self.hmask.as_ptr() as *const __m256i);
            for n in 0..2 {
                let raw = _mm256_loadu_si256(self.qs.as_ptr().add(32 * n) as *const __m256i);
                q[4 * n] = _mm256_and_si256(raw, m3);
                q[4 * n + 1] = _mm256_and_si256(_mm256_srli_epi16::<2>(raw), m3);
                q[4 * n + 2] = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), m3);
                q[4 * n + 3] = _mm256_and_si256(_mm256_srli_epi16::<6>(raw), m3);
            }
            for c in 0..8 {
                let bit = _mm256_set1_epi8((1u8 << c) as i8);
                let clear = _mm256_cmpeq_epi8(_mm256_and_si256(hm, bit), _mm256_setzero_si256());
                offset[c] = _mm256_and_si256(clear, four);
            }
            let sc = q3_k_scales(&self.scales);
            Q3Prep {
                q,
                offset,
                scales: _mm_loadu_si128(sc.as_ptr() as *const __m128i),
            }
        }
    }
    #[inline(always)]
    unsafe fn isums(p: &Q3Prep, a: &BlockQ8K) -> (__m256i, __m128i) {
        unsafe {
            let mut acc = _mm256_setzero_si256();
            for c in 0..8 {
                let y = q8k_chunk(a, c);
                // (q - offset) * y in i16 pairs: both terms are within ±2 * 4 * 127.
                let prod = _mm256_sub_epi16(
                    _mm256_maddubs_epi16(p.q[c], y),
                    _mm256_maddubs_epi16(p.offset[c], y),
                );
                // lanes 0..8 = scale 2c, lanes 8..16 = scale 2c + 1
                let mask = _mm_loadu_si128(Q6K_SCALE_SHUF[c].as_ptr() as *const __m128i);
                let sc = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(p.scales, mask));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(prod, sc));
            }
            (acc, _mm_setzero_si128())
        }
    }
    #[inline(always)]
    fn scales(&self) -> (f32, f32) {
        (f16_to_f32(self.d), 0.0)
    }
}

struct IQ4XSPrep {
    /// |level| and the level itself, per 32-element sub-block.
    abs: [__m256i; 8],
    q: [__m256i; 8],
    scales: [i8; 8],
}

impl SuperBlock64 for BlockIQ4XS {
    type Prep = IQ4XSPrep;
    const MINS: bool = false;
    #[inline(always)]
    unsafe fn prep(&self) -> IQ4XSPrep {
        unsafe {
            let t = table_vec(&KVALUES_IQ4NL);
            let mut abs = [_mm256_setzero_si256(); 8];
            let mut q = [_mm256_setzero_si256(); 8];
            for c in 0..8 {
                q[c] = table_levels_32(self.qs.as_ptr().add(16 * c), t);
                abs[c] = _mm256_sign_epi8(q[c], q[c]);
            }
            IQ4XSPrep {
                abs,
                q,
                scales: iq4_xs_scales(self),
            }
        }
    }
    #[inline(always)]
    unsafe fn isums(p: &IQ4XSPrep, a: &BlockQ8K) -> (__m256i, __m128i) {
        unsafe {
            let mut acc = _mm256_setzero_si256();
            for c in 0..8 {
                let sy = _mm256_sign_epi8(q8k_chunk(a, c), p.q[c]);
                let prod = _mm256_maddubs_epi16(p.abs[c], sy);
                let sc = _mm256_set1_epi16(p.scales[c] as i16);
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(prod, sc));
            }
            (acc, _mm_setzero_si128())
        }
    }
    #[inline(always)]
    fn scales(&self) -> (f32, f32) {
        (f16_to_f32(self.d), 0.0)
    }
}

#[inline(always)]
unsafe fn superblock64_body<B: SuperBlock64, const N: usize>(
    x: &[B],
    y: *const BlockQ8K,
    stride: usize,
) -> [f64; N] {
    unsafe {
        superblock_lanes::<N>(
            x.len(),
            y,
            stride,
            B::MINS,
            |i, out| superblock64_ints(x, y, stride, i, out),
            |i| x.get_unchecked(i).scales(),
        )
    }
}

/// Super-block i's integer lanes with each of the N activations.
#[inline(always)]
unsafe fn superblock64_ints<B: SuperBlock64, const N: usize>(
    x: &[B],
    y: *const BlockQ8K,
    stride: usize,
    i: usize,
    out: &mut [(__m256i, __m128i); N],
) {
    unsafe {
        prefetch_ahead(x.as_ptr().wrapping_add(i + PREFETCH_BLOCKS));
        let p = x.get_unchecked(i).prep();
        for (v, o) in out.iter_mut().enumerate() {
            *o = B::isums(&p, &*y.add(v * stride + i));
        }
    }
}

quant64_kernels!(
    dot64_q5_1,
    dot64x4_q5_1,
    legacy64_body[BlockQ5_1],
    BlockQ5_1,
    BlockQ8_1
);
quant64_kernels!(
    dot64_q2_k,
    dot64x4_q2_k,
    superblock64_body[BlockQ2K],
    BlockQ2K,
    BlockQ8K
);
quant64_kernels!(
    dot64_q3_k,
    dot64x4_q3_k,
    superblock64_body[BlockQ3K],
    BlockQ3K,
    BlockQ8K
);
quant64_kernels!(
    dot64_iq4_nl,
    dot64x4_iq4_nl,
    legacy64_body[BlockIQ4NL],
    BlockIQ4NL,
    BlockQ8_0
);
quant64_kernels!(
    dot64_iq4_xs,
    dot64x4_iq4_xs,
    superblock64_body[BlockIQ4XS],
    BlockIQ4XS,
    BlockQ8K
);
quant64_kernels!(
    dot64_mxfp4,
    dot64x4_mxfp4,
    legacy64_body[BlockMXFP4],
    BlockMXFP4,
    BlockQ8_0
);
rows64_kernel!(rows64_q5_1, BlockQ5_1, BlockQ8_1);
rows64_kernel!(rows64_iq4_nl, BlockIQ4NL, BlockQ8_0);
rows64_kernel!(rows64_mxfp4, BlockMXFP4, BlockQ8_0);

/// f64 dot of `n` float weights at `pw` with N activation vectors at `pa + v * stride` (bytes):
/// exact f64 products, element i added to lane i % 16 (four __m256d accumulators).
#[inline(always)]
unsafe fn float64_body<W: Lanes, A: Lanes, const N: usize>(
    pw: *const u8,
    pa: *const u8,
    stride: usize,
    n: usize,
) -> [f64; N] {
    unsafe {
        // both operands f16 or bf16 (8 or 11 significant bits each)
        let half = W::SIZE == 2 && A::SIZE == 2;
        let mut acc = [[_mm256_setzero_pd(); 4]; N];
        let mut i = 0;
        while i + 16 <= n {
            for k in 0..2 {
                let w = W::load8(pw, i + 8 * k);
                if half {
                    // f16/bf16 products have at most 22 significant bits: exact in f32
                    for v in 0..N {
                        let p = _mm256_mul_ps(w, A::load8(pa.add(v * stride), i + 8 * k));
                        let pl = _mm256_cvtps_pd(_mm256_castps256_ps128(p));
                        let ph = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(p));
                        acc[v][2 * k] = _mm256_add_pd(acc[v][2 * k], pl);
                        acc[v][2 * k + 1] = _mm256_add_pd(acc[v][2 * k + 1], ph);
                    }
                    continue;
                }
                let wl = _mm256_cvtps_pd(_mm256_castps256_ps128(w));
                let wh = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(w));
                for v in 0..N {
                    let a = A::load8(pa.add(v * stride), i + 8 * k);
                    let al = _mm256_cvtps_pd(_mm256_castps256_ps128(a));
                    let ah = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(a));
                    acc[v][2 * k] = _mm256_add_pd(acc[v][2 * k], _mm256_mul_pd(wl, al));
                    acc[v][2 * k + 1] = _mm256_add_pd(acc[v][2 * k + 1], _mm256_mul_pd(wh, ah));
                }
            }
            i += 16;
        }
        let mut out = [0f64; N];
        for v in 0..N {
            let mut l = [0f64; 16];
            for k in 0..4 {
                _mm256_storeu_pd(l.as_mut_ptr().add(4 * k), acc[v][k]);
            }
            for j in i..n {
                l[j % 16] += W::get(pw, j) as f64 * A::get(pa.add(v * stride), j) as f64;
            }
            out[v] = combine16(l);
        }
        out
    }
}

macro_rules! float64_kernels {
    ($one:ident, $four:ident, $lw:ty, $la:ty, $at:ty) => {
        kernel_fn! {
            /// Weights as raw little-endian bytes (any alignment).
            pub unsafe fn $one(w: &[u8], a: &[$at]) -> f64 {
                debug_assert_eq!(w.len(), a.len() * <$lw>::SIZE);
                unsafe {
                    float64_body::<$lw, $la, 1>(w.as_ptr(), a.as_ptr() as *const u8, 0, a.len())[0]
                }
            }
        }
        kernel_fn! {
            /// Four activation vectors at `a`, `a + stride`, ... (elements).
            pub unsafe fn $four(w: &[u8], a: *const $at, stride: usize, out: &mut [f64; 4]) {
                let n = w.len() / <$lw>::SIZE;
                let sb = stride * size_of::<$at>();
                unsafe {
                    let lo = float64_body::<$lw, $la, 2>(w.as_ptr(), a as *const u8, sb, n);
                    let hi =
                        float64_body::<$lw, $la, 2>(w.as_ptr(), (a as *const u8).add(2 * sb), sb, n);
                    *out = [lo[0], lo[1], hi[0], hi[1]];
                }
            }
        }
    };
}
float64_kernels!(dot64_f32, dot64x4_f32, LF32, LF32, f32);
float64_kernels!(dot64_f16, dot64x4_f16, LF16, LF16, f16);
float64_kernels!(dot64_bf16, dot64x4_bf16, LBF16, LBF16, bf16);

// ---------------------------------------------------------------------------------------------
// Activation quantizers, bitwise equal to `reference::quantize_row_q8_{0,1,k}` for finite
// input: the same f32 scale arithmetic, `vcvtps2dq` rounding ties to even like
// `round_ties_even` / `nearest_int`, exact integer sums.

/// Horizontal max of 8 lanes.
#[inline(always)]
unsafe fn hmax_ps(v: __m256) -> f32 {
    unsafe {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_movehdup_ps(m));
        _mm_cvtss_f32(m)
    }
}

/// |v| of 8 lanes.
#[inline(always)]
unsafe fn abs_ps(v: __m256) -> __m256 {
    unsafe { _mm256_andnot_ps(_mm256_set1_ps(-0.0), v) }
}

/// Rounds 4 x 8 floats (ties to even) to i32; returns them and the 32 values as i8 in order.
#[inline(always)]
unsafe fn round_pack_32(v: [__m256; 4], scale: __m256) -> ([__m256i; 4], __m256i) {
    unsafe {
        let q = v.map(|x| _mm256_cvtps_epi32(_mm256_mul_ps(x, scale)));
        // packs interleave the 128-bit lanes; the permute restores element order
        let a = _mm256_packs_epi32(q[0], q[1]);
        let b = _mm256_packs_epi32(q[2], q[3]);
        let p = _mm256_packs_epi16(a, b);
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        (q, p)
    }
}

/// Shared Q8_0 / Q8_1 quantizer; returns nothing, writes `d`, `qs` and (Q8_1) `s`.
#[inline(always)]
unsafe fn quantize_q8_legacy(x: *const f32, d: *mut F16Bytes, qs: *mut i8, s: *mut F16Bytes) {
    unsafe {
        let v = [
            _mm256_loadu_ps(x),
            _mm256_loadu_ps(x.add(8)),
            _mm256_loadu_ps(x.add(16)),
            _mm256_loadu_ps(x.add(24)),
        ];
        let m = _mm256_max_ps(
            _mm256_max_ps(abs_ps(v[0]), abs_ps(v[1])),
            _mm256_max_ps(abs_ps(v[2]), abs_ps(v[3])),
        );
        let amax = hmax_ps(m);
        let dv = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        *d = F16Bytes::from_f32(dv);
        let (q, p) = round_pack_32(v, _mm256_set1_ps(id));
        _mm256_storeu_si256(qs as *mut __m256i, p);
        if !s.is_null() {
            let sum = hsum_epi32(_mm256_add_epi32(
                _mm256_add_epi32(q[0], q[1]),
                _mm256_add_epi32(q[2], q[3]),
            ));
            *s = F16Bytes::from_f32(sum as f32 * dv);
        }
    }
}

kernel_fn! {
    pub unsafe fn quantize_row_q8_0(x: &[f32], y: &mut [BlockQ8_0]) {
        assert_eq!(x.len(), y.len() * QK);
        for (i, b) in y.iter_mut().enumerate() {
            // SAFETY: block i has 32 values at x[32 i..].
            unsafe {
                quantize_q8_legacy(
                    x.as_ptr().add(i * QK),
                    &mut b.d,
                    b.qs.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            }
        }
    }
}

kernel_fn! {
    pub unsafe fn quantize_row_q8_1(x: &[f32], y: &mut [BlockQ8_1]) {
        assert_eq!(x.len(), y.len() * QK);
        for (i, b) in y.iter_mut().enumerate() {
            // SAFETY: as above.
            unsafe {
                quantize_q8_legacy(
                    x.as_ptr().add(i * QK),
                    &mut b.d,
                    b.qs.as_mut_ptr(),
                    &mut b.s,
                )
            }
        }
    }
}

kernel_fn! {
    pub unsafe fn quantize_row_q8_k(x: &[f32], y: &mut [BlockQ8K]) {
        assert_eq!(x.len(), y.len() * QK_K);
        for (bi, b) in y.iter_mut().enumerate() {
            // SAFETY: block bi has 256 values at x[256 bi..].
            unsafe {
                let xb = x.as_ptr().add(bi * QK_K);
                let mut m = _mm256_setzero_ps();
                for k in 0..QK_K / 8 {
                    m = _mm256_max_ps(m, abs_ps(_mm256_loadu_ps(xb.add(8 * k))));
                }
                let amax = hmax_ps(m);
                if amax == 0.0 {
                    b.d = 0.0;
                    b.qs = [0; QK_K];
                    b.bsums = [0; QK_K / 16];
                    continue;
                }
                // the first value of largest magnitude, with its sign
                let am = _mm256_set1_ps(amax);
                let mut max = 0.0f32;
                for k in 0..QK_K / 8 {
                    let eq = _mm256_cmp_ps::<_CMP_EQ_OQ>(abs_ps(_mm256_loadu_ps(xb.add(8 * k))), am);
                    let mask = _mm256_movemask_ps(eq);
                    if mask != 0 {
                        max = *xb.add(8 * k + mask.trailing_zeros() as usize);
                        break;
                    }
                }
                let iscale = -127.0 / max;
                let sv = _mm256_set1_ps(iscale);
                let ones8 = _mm256_set1_epi8(1);
                let ones16 = _mm256_set1_epi16(1);
                // 8 chunks of 32; bsums of 4 chunks (8 sums) at a time
                for h in 0..2 {
                    let mut s = [_mm256_setzero_si256(); 4];
                    for c in 0..4 {
                        let k = 4 * h + c;
                        let p0 = xb.add(32 * k);
                        let v = [
                            _mm256_loadu_ps(p0),
                            _mm256_loadu_ps(p0.add(8)),
                            _mm256_loadu_ps(p0.add(16)),
                            _mm256_loadu_ps(p0.add(24)),
                        ];
                        let (_, p) = round_pack_32(v, sv);
                        _mm256_storeu_si256(b.qs.as_mut_ptr().add(32 * k) as *mut __m256i, p);
                        // 8 lanes: sums of 4 consecutive quants
                        s[c] = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, p), ones16);
                    }
                    // lo lanes [bs0, bs2, bs4, bs6], hi lanes [bs1, bs3, bs5, bs7] (of this half)
                    let t =
                        _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]));
                    let (lo, hi) = (_mm256_castsi256_si128(t), _mm256_extracti128_si256::<1>(t));
                    let sums = _mm_packs_epi32(_mm_unpacklo_epi32(lo, hi), _mm_unpackhi_epi32(lo, hi));
                    _mm_storeu_si128(b.bsums.as_mut_ptr().add(8 * h) as *mut __m128i, sums);
                }
                b.d = 1.0 / iscale;
            }
        }
    }
}
