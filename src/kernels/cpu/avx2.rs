//! AVX2 + FMA + F16C dot products (x86_64 only).
//!
//! Every kernel produces the same per-block integer sums as the scalar reference in
//! `reference.rs`; only the order of the float accumulation differs.
//!
//! # Safety
//! All functions here require the `avx2`, `fma` and `f16c` CPU features (checked once in
//! `mod.rs` before the kernel table is built) and equal-length operands (checked by callers;
//! the loops use unchecked indexing).

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::blocks::*;

/// Scalar f16 -> f32 without touching vector registers (exact, including subnormals).
/// Going through `vcvtph2ps` for one lane lets LLVM merge into an arbitrary register
/// (`vpinsrw`), which created a false dependency on the loop accumulator.
#[inline(always)]
pub(super) fn f16_to_f32(h: F16Bytes) -> f32 {
    let h = h.bits() as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    if em >= 0x7c00 {
        return f32::from_bits(sign | 0x7f80_0000 | ((em & 0x3ff) << 13));
    }
    // Rebias the exponent by multiplying with 2^112; subnormal halves become normal floats.
    let v = f32::from_bits(em << 13) * f32::from_bits(0x7780_0000);
    f32::from_bits(v.to_bits() | sign)
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

#[inline(always)]
unsafe fn hsum_ps128(s: __m128) -> f32 {
    unsafe {
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
        let shuf = _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303);
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), shuf);
        let bit_mask = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe_u64 as i64);
        let bytes = _mm256_or_si256(bytes, bit_mask);
        _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
    }
}

/// Signed i8 x i8 dot of 32 lanes, as 8 float partial sums.
#[inline(always)]
unsafe fn mul_sum_i8_pairs_float(x: __m256i, y: __m256i) -> __m256 {
    unsafe {
        let ax = _mm256_sign_epi8(x, x);
        let sy = _mm256_sign_epi8(y, x);
        let dot = _mm256_maddubs_epi16(ax, sy);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(dot, _mm256_set1_epi16(1)))
    }
}

/// Unsigned (0..127) x signed i8 dot of 32 lanes, as 8 float partial sums.
#[inline(always)]
unsafe fn mul_sum_us8_pairs_float(ax: __m256i, sy: __m256i) -> __m256 {
    unsafe {
        let dot = _mm256_maddubs_epi16(ax, sy);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(dot, _mm256_set1_epi16(1)))
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn f32_dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for k in 0..4 {
                let x = _mm256_loadu_ps(pa.add(i + 8 * k));
                let y = _mm256_loadu_ps(pb.add(i + 8 * k));
                acc[k] = _mm256_fmadd_ps(x, y, acc[k]);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc[0]);
            i += 8;
        }
        let mut s = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
        while i < n {
            s += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        s
    }
}

/// F32 weights given as raw little-endian bytes (any alignment).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f32(w: &[u8], a: &[f32]) -> f32 {
    debug_assert_eq!(w.len(), a.len() * 4);
    let n = a.len();
    let (pw, pa) = (w.as_ptr() as *const f32, a.as_ptr());
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for k in 0..4 {
                let x = _mm256_loadu_ps(pw.add(i + 8 * k));
                let y = _mm256_loadu_ps(pa.add(i + 8 * k));
                acc[k] = _mm256_fmadd_ps(x, y, acc[k]);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pw.add(i)), _mm256_loadu_ps(pa.add(i)), acc[0]);
            i += 8;
        }
        let mut s = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
        while i < n {
            s += f32::from_le_bytes((pw.add(i) as *const [u8; 4]).read()) * *pa.add(i);
            i += 1;
        }
        s
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f16(w: &[u8], a: &[f16]) -> f32 {
    debug_assert_eq!(w.len(), a.len() * 2);
    let n = a.len();
    let (pw, pa) = (w.as_ptr(), a.as_ptr() as *const u8);
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for k in 0..4 {
                let x = _mm256_cvtph_ps(_mm_loadu_si128(pw.add(2 * (i + 8 * k)) as *const __m128i));
                let y = _mm256_cvtph_ps(_mm_loadu_si128(pa.add(2 * (i + 8 * k)) as *const __m128i));
                acc[k] = _mm256_fmadd_ps(x, y, acc[k]);
            }
            i += 32;
        }
        while i + 8 <= n {
            let x = _mm256_cvtph_ps(_mm_loadu_si128(pw.add(2 * i) as *const __m128i));
            let y = _mm256_cvtph_ps(_mm_loadu_si128(pa.add(2 * i) as *const __m128i));
            acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
            i += 8;
        }
        let mut s = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
        while i < n {
            let wh = F16Bytes([*pw.add(2 * i), *pw.add(2 * i + 1)]);
            s += f16_to_f32(wh) * a.get_unchecked(i).to_f32();
            i += 1;
        }
        s
    }
}

#[inline(always)]
unsafe fn load_bf16x8(p: *const u8) -> __m256 {
    unsafe {
        let v = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v))
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_bf16(w: &[u8], a: &[bf16]) -> f32 {
    debug_assert_eq!(w.len(), a.len() * 2);
    let n = a.len();
    let (pw, pa) = (w.as_ptr(), a.as_ptr() as *const u8);
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for k in 0..4 {
                let x = load_bf16x8(pw.add(2 * (i + 8 * k)));
                let y = load_bf16x8(pa.add(2 * (i + 8 * k)));
                acc[k] = _mm256_fmadd_ps(x, y, acc[k]);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(load_bf16x8(pw.add(2 * i)), load_bf16x8(pa.add(2 * i)), acc[0]);
            i += 8;
        }
        let mut s = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
        while i < n {
            let wv = bf16::from_bits(u16::from_le_bytes([*pw.add(2 * i), *pw.add(2 * i + 1)]));
            s += wv.to_f32() * a.get_unchecked(i).to_f32();
            i += 1;
        }
        s
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q4_0_q8_0(x: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32 {
    debug_assert_eq!(x.len(), y.len());
    unsafe {
        let mut acc = _mm256_setzero_ps();
        let off = _mm256_set1_epi8(8);
        for i in 0..x.len() {
            let (bx, by) = (x.get_unchecked(i), y.get_unchecked(i));
            let d = _mm256_mul_ps(f16_splat(bx.d), f16_splat(by.d));
            let qx = _mm256_sub_epi8(nibbles_32(bx.qs.as_ptr()), off);
            let qy = _mm256_loadu_si256(by.qs.as_ptr() as *const __m256i);
            acc = _mm256_fmadd_ps(d, mul_sum_i8_pairs_float(qx, qy), acc);
        }
        hsum_ps(acc)
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q4_1_q8_1(x: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
    debug_assert_eq!(x.len(), y.len());
    unsafe {
        let mut acc = _mm256_setzero_ps();
        let mut summs = 0.0f32;
        for i in 0..x.len() {
            let (bx, by) = (x.get_unchecked(i), y.get_unchecked(i));
            summs += f16_to_f32(bx.m) * f16_to_f32(by.s);
            let d = _mm256_mul_ps(f16_splat(bx.d), f16_splat(by.d));
            let qx = nibbles_32(bx.qs.as_ptr());
            let qy = _mm256_loadu_si256(by.qs.as_ptr() as *const __m256i);
            acc = _mm256_fmadd_ps(d, mul_sum_us8_pairs_float(qx, qy), acc);
        }
        hsum_ps(acc) + summs
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q5_0_q8_0(x: &[BlockQ5_0], y: &[BlockQ8_0]) -> f32 {
    debug_assert_eq!(x.len(), y.len());
    unsafe {
        let mut acc = _mm256_setzero_ps();
        let hi_clear = _mm256_set1_epi8(0xF0u8 as i8);
        for i in 0..x.len() {
            let (bx, by) = (x.get_unchecked(i), y.get_unchecked(i));
            let d = _mm256_mul_ps(f16_splat(bx.d), f16_splat(by.d));
            // (nibble | bit<<4) - 16 == nibble | (bit ? 0 : 0xF0) as i8
            let bxhi = _mm256_andnot_si256(bytes_from_bits_32(u32::from_le_bytes(bx.qh)), hi_clear);
            let qx = _mm256_or_si256(nibbles_32(bx.qs.as_ptr()), bxhi);
            let qy = _mm256_loadu_si256(by.qs.as_ptr() as *const __m256i);
            acc = _mm256_fmadd_ps(d, mul_sum_i8_pairs_float(qx, qy), acc);
        }
        hsum_ps(acc)
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q8_0_q8_0(x: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    debug_assert_eq!(x.len(), y.len());
    unsafe {
        let mut acc = _mm256_setzero_ps();
        for i in 0..x.len() {
            let (bx, by) = (x.get_unchecked(i), y.get_unchecked(i));
            let d = _mm256_mul_ps(f16_splat(bx.d), f16_splat(by.d));
            let qx = _mm256_loadu_si256(bx.qs.as_ptr() as *const __m256i);
            let qy = _mm256_loadu_si256(by.qs.as_ptr() as *const __m256i);
            acc = _mm256_fmadd_ps(d, mul_sum_i8_pairs_float(qx, qy), acc);
        }
        hsum_ps(acc)
    }
}

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
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    sc[..4].copy_from_slice(&sc_lo.to_le_bytes());
    sc[4..].copy_from_slice(&sc_hi.to_le_bytes());
    mn[..4].copy_from_slice(&mn_lo.to_le_bytes());
    mn[4..].copy_from_slice(&mn_hi.to_le_bytes());
    (sc, mn)
}

/// sum_j mins[j] * (bsums[2j] + bsums[2j+1]) as 4 i32 lanes.
#[inline(always)]
unsafe fn mins_dot_bsums(mins: &[u8; 8], bsums: &[i16; 16]) -> __m128i {
    unsafe {
        let m16 = _mm_cvtepu8_epi16(_mm_loadl_epi64(mins.as_ptr() as *const __m128i));
        let q8sums = _mm256_loadu_si256(bsums.as_ptr() as *const __m256i);
        let q8s = _mm_hadd_epi16(_mm256_castsi256_si128(q8sums), _mm256_extracti128_si256::<1>(q8sums));
        _mm_madd_epi16(m16, q8s)
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q4_k_q8_k(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
    debug_assert_eq!(x.len(), y.len());
    unsafe {
        let m4 = _mm256_set1_epi8(0x0F);
        let mut acc = _mm256_setzero_ps();
        let mut acc_m = _mm_setzero_ps();
        for i in 0..x.len() {
            let (bx, by) = (x.get_unchecked(i), y.get_unchecked(i));
            let d = by.d * f16_to_f32(bx.d);
            let dmin = -by.d * f16_to_f32(bx.dmin);
            let (sc, mn) = unpack_k4(&bx.scales);
            let prod = mins_dot_bsums(&mn, &by.bsums);
            acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m);

            let q4 = bx.qs.as_ptr();
            let q8 = by.qs.as_ptr();
            let mut sumi = _mm256_setzero_si256();
            for j in 0..4 {
                let q4bits = _mm256_loadu_si256(q4.add(32 * j) as *const __m256i);
                let q4l = _mm256_and_si256(q4bits, m4);
                let q4h = _mm256_and_si256(_mm256_srli_epi16::<4>(q4bits), m4);
                let q8l = _mm256_loadu_si256(q8.add(64 * j) as *const __m256i);
                let q8h = _mm256_loadu_si256(q8.add(64 * j + 32) as *const __m256i);
                let pl = _mm256_madd_epi16(_mm256_set1_epi16(*sc.get_unchecked(2 * j) as i16), _mm256_maddubs_epi16(q4l, q8l));
                let ph = _mm256_madd_epi16(_mm256_set1_epi16(*sc.get_unchecked(2 * j + 1) as i16), _mm256_maddubs_epi16(q4h, q8h));
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum_ps(acc) + hsum_ps128(acc_m)
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q5_k_q8_k(x: &[BlockQ5K], y: &[BlockQ8K]) -> f32 {
    debug_assert_eq!(x.len(), y.len());
    unsafe {
        let m4 = _mm256_set1_epi8(0x0F);
        let m16 = _mm256_set1_epi8(0x10);
        let mut acc = _mm256_setzero_ps();
        let mut acc_m = _mm_setzero_ps();
        for i in 0..x.len() {
            let (bx, by) = (x.get_unchecked(i), y.get_unchecked(i));
            let d = by.d * f16_to_f32(bx.d);
            let dmin = -by.d * f16_to_f32(bx.dmin);
            let (sc, mn) = unpack_k4(&bx.scales);
            let prod = mins_dot_bsums(&mn, &by.bsums);
            acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m);

            let q4 = bx.qs.as_ptr();
            let q8 = by.qs.as_ptr();
            let hbits = _mm256_loadu_si256(bx.qh.as_ptr() as *const __m256i);
            let mut sumi = _mm256_setzero_si256();
            for j in 0..4 {
                let ml = _mm256_set1_epi8((1u8 << (2 * j)) as i8);
                let mh = _mm256_set1_epi8((2u8 << (2 * j)) as i8);
                let hl = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hbits, ml), ml), m16);
                let hh = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hbits, mh), mh), m16);
                let q4bits = _mm256_loadu_si256(q4.add(32 * j) as *const __m256i);
                let q5l = _mm256_or_si256(_mm256_and_si256(q4bits, m4), hl);
                let q5h = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q4bits), m4), hh);
                let q8l = _mm256_loadu_si256(q8.add(64 * j) as *const __m256i);
                let q8h = _mm256_loadu_si256(q8.add(64 * j + 32) as *const __m256i);
                let pl = _mm256_madd_epi16(_mm256_set1_epi16(*sc.get_unchecked(2 * j) as i16), _mm256_maddubs_epi16(q5l, q8l));
                let ph = _mm256_madd_epi16(_mm256_set1_epi16(*sc.get_unchecked(2 * j + 1) as i16), _mm256_maddubs_epi16(q5h, q8h));
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum_ps(acc) + hsum_ps128(acc_m)
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q6_k_q8_k(x: &[BlockQ6K], y: &[BlockQ8K]) -> f32 {
    debug_assert_eq!(x.len(), y.len());
    unsafe {
        let m4 = _mm256_set1_epi8(0x0F);
        let m2 = _mm256_set1_epi8(0x03);
        let m32s = _mm256_set1_epi8(32);
        let mut acc = _mm256_setzero_ps();
        for i in 0..x.len() {
            let (bx, by) = (x.get_unchecked(i), y.get_unchecked(i));
            let d = by.d * f16_to_f32(bx.d);
            let sc = &bx.scales;
            let mut sumi = _mm256_setzero_si256();
            for h in 0..2 {
                let ql = bx.ql.as_ptr().add(64 * h);
                let q8 = by.qs.as_ptr().add(128 * h);
                let b1 = _mm256_loadu_si256(ql as *const __m256i);
                let b2 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
                let bh = _mm256_loadu_si256(bx.qh.as_ptr().add(32 * h) as *const __m256i);
                let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(bh, m2));
                let h1 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(bh), m2));
                let h2 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(bh), m2));
                let h3 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(bh), m2));
                let q = [
                    _mm256_or_si256(_mm256_and_si256(b1, m4), h0),
                    _mm256_or_si256(_mm256_and_si256(b2, m4), h1),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(b1), m4), h2),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(b2), m4), h3),
                ];
                for (k, &qk) in q.iter().enumerate() {
                    let q8k = _mm256_loadu_si256(q8.add(32 * k) as *const __m256i);
                    let p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(qk, q8k), _mm256_maddubs_epi16(m32s, q8k));
                    let s0 = *sc.get_unchecked(8 * h + 2 * k) as i16;
                    let s1 = *sc.get_unchecked(8 * h + 2 * k + 1) as i16;
                    let scv = _mm256_set_m128i(_mm_set1_epi16(s1), _mm_set1_epi16(s0));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(scv, p16));
                }
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum_ps(acc)
    }
}
