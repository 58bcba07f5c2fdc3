//! Prompt-batch products of the Q8_K-activated types (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS) as
//! a tiled integer GEMM (x86_64): with AVX-512 VNNI in the `avx512` kernel set, with AVX2's
//! `vpmaddubsw` (all but IQ4_XS) in the `avx2` set.
//!
//! A tile of 8 weight rows is unpacked once per product into unsigned 8-bit levels, one byte
//! per element, with its sub-block scales and one correction vector (below). Activations are
//! interleaved once per product: for each group of 16 activation vectors and each super-block,
//! 64 vectors of 16 x 4 bytes, the four consecutive quants of one group of four elements for
//! each of the 16 activations. The micro-kernel then broadcasts four weight levels of one row
//! and multiplies them into all 16 activations at once (`vpdpbusd`: 64 multiply-adds per
//! instruction), for 8 rows, sub-block by sub-block, and scales each sub-block's exact i32
//! sums by the row's integer sub-block scale. What the levels leave out comes back through
//! the activations' 16-element sums (`bsums`, `vpdpwssd`): the level offset (Q6_K 32, Q3_K 4,
//! IQ4_XS 128) as `- offset * scale * bsum` inside the integer sum, the K-quant mins as the
//! separate `Σ min * bsum`.
//!
//! The AVX2 form (`block_avx2`) computes the same integers 8 activations per register with
//! `vpmaddubsw` + `vpmaddwd` in place of `vpdpbusd` (exact while levels stay below 64).
//!
//! Every (row, activation) super-block thus gets the exact integers of `reference`'s
//! `for_each_contribution`, and the same f64 expression turns them into its contribution,
//! added to lane `i % 4` and combined as `reference::dot64` does: the results are bitwise
//! those of `matmul_f64_reference` (and, rounded, of `matmul_reference`).

use std::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::{PoisonError, RwLock};

use super::blocks::*;
use super::reference::{iq4_xs_scales, levels_2bit, q3_k_scales, unpack_scales_mins_k4};
use super::{FromF64, OutPtr, Tiled};
use crate::kernels::pool;

/// Weight rows per micro-kernel call.
const ROWS: usize = 8;
/// Activation vectors per micro-kernel call (one 512-bit vector of i32).
const COLS: usize = 16;

/// Whether [`matmul`] handles weight type `ty` with instruction set `isa`. The AVX2 form
/// multiplies with `vpmaddubsw`, whose i16 pair sums hold levels up to 63 only: not IQ4_XS's
/// offset levels (up to 241).
pub(super) fn supports(ty: QuantType, isa: Tiled) -> bool {
    match ty {
        QuantType::Q2_K | QuantType::Q3_K | QuantType::Q4_K | QuantType::Q5_K | QuantType::Q6_K => {
            isa != Tiled::No
        }
        QuantType::IQ4_XS => isa == Tiled::Vnni,
        _ => false,
    }
}

/// What a type's correction vector holds.
#[derive(Clone, Copy, PartialEq)]
enum Correction {
    /// Σ corr·bsum is subtracted from the integer sum (level offset times sub-block scale).
    Offset,
    /// Σ corr·bsum is the K-quant mins sum, scaled by dmin.
    Mins,
}

/// One row's super-block, unpacked.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Unpacked {
    /// Unsigned levels, element order.
    levels: [u8; QK_K],
    /// Integer scale of each sub-block (16 of 16 elements or 8 of 32).
    scales: [i32; 16],
    /// Per 16-element group: the coefficient of that group's activation sum.
    corr: [i16; 16],
    d: f32,
    dmin: f32,
}

impl Default for Unpacked {
    fn default() -> Self {
        Unpacked {
            levels: [0; QK_K],
            scales: [0; 16],
            corr: [0; 16],
            d: 0.0,
            dmin: 0.0,
        }
    }
}

/// Sub-block size and correction kind of a type.
fn layout(ty: QuantType) -> (usize, Correction) {
    match ty {
        QuantType::Q4_K | QuantType::Q5_K => (32, Correction::Mins),
        QuantType::Q2_K => (16, Correction::Mins),
        QuantType::Q6_K | QuantType::Q3_K => (16, Correction::Offset),
        QuantType::IQ4_XS => (32, Correction::Offset),
        _ => unreachable!("tiled: unsupported type {ty}"),
    }
}

/// Q3_K's levels with AVX2: the 2-bit field of each 32-element chunk, plus 4 where the
/// chunk's bit of `hmask` is set (the level plus its offset 4).
#[target_feature(enable = "avx2")]
unsafe fn unpack_q3_k_levels(x: &BlockQ3K, levels: &mut [u8; QK_K]) {
    unsafe {
        let (m3, one) = (_mm256_set1_epi8(3), _mm256_set1_epi8(1));
        let hm = _mm256_loadu_si256(x.hmask.as_ptr() as *const __m256i);
        for n in 0..2 {
            let raw = _mm256_loadu_si256(x.qs.as_ptr().add(32 * n) as *const __m256i);
            let lo = [
                _mm256_and_si256(raw, m3),
                _mm256_and_si256(_mm256_srli_epi16::<2>(raw), m3),
                _mm256_and_si256(_mm256_srli_epi16::<4>(raw), m3),
                _mm256_and_si256(_mm256_srli_epi16::<6>(raw), m3),
            ];
            for (j, lo) in lo.into_iter().enumerate() {
                let c = 4 * n + j;
                // bit c of every byte to bit 0 (shifting 16-bit lanes by c < 8 keeps each
                // byte's own bit c at its bit 0), then to bit 2
                let h = _mm256_and_si256(_mm256_srl_epi16(hm, _mm_cvtsi32_si128(c as i32)), one);
                let lv = _mm256_or_si256(lo, _mm256_slli_epi16::<2>(h));
                _mm256_storeu_si256(levels.as_mut_ptr().add(32 * c) as *mut __m256i, lv);
            }
        }
    }
}

/// Q4_K/Q5_K levels with AVX2: each 32-byte chunk of `qs` gives two 32-element chunks (low
/// then high nibbles), with Q5_K's fifth bit from `qh` (bit 2c for the low, 2c + 1 for the
/// high chunk c).
#[target_feature(enable = "avx2")]
unsafe fn unpack_k4_levels(
    qs: &[u8; QK_K / 2],
    qh: Option<&[u8; QK_K / 8]>,
    levels: &mut [u8; QK_K],
) {
    unsafe {
        let (m4, one) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(1));
        let hbits = qh.map(|qh| _mm256_loadu_si256(qh.as_ptr() as *const __m256i));
        for c in 0..4 {
            let raw = _mm256_loadu_si256(qs.as_ptr().add(32 * c) as *const __m256i);
            let mut lo = _mm256_and_si256(raw, m4);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), m4);
            if let Some(hb) = hbits {
                let bit = |k: i32| {
                    let b = _mm256_and_si256(_mm256_srl_epi16(hb, _mm_cvtsi32_si128(k)), one);
                    _mm256_slli_epi16::<4>(b)
                };
                lo = _mm256_or_si256(lo, bit(2 * c as i32));
                hi = _mm256_or_si256(hi, bit(2 * c as i32 + 1));
            }
            _mm256_storeu_si256(levels.as_mut_ptr().add(64 * c) as *mut __m256i, lo);
            _mm256_storeu_si256(levels.as_mut_ptr().add(64 * c + 32) as *mut __m256i, hi);
        }
    }
}

/// Q6_K levels (0..=63, the level plus its offset 32) with AVX2: per half of the block, the
/// four 32-element chunks are the low and high nibbles of `ql`'s two 32-byte runs with two
/// bits of `qh` each.
#[target_feature(enable = "avx2")]
unsafe fn unpack_q6_k_levels(x: &BlockQ6K, levels: &mut [u8; QK_K]) {
    unsafe {
        let (m4, m3) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3));
        for h in 0..2 {
            let b1 = _mm256_loadu_si256(x.ql.as_ptr().add(64 * h) as *const __m256i);
            let b2 = _mm256_loadu_si256(x.ql.as_ptr().add(64 * h + 32) as *const __m256i);
            let bh = _mm256_loadu_si256(x.qh.as_ptr().add(32 * h) as *const __m256i);
            let lo = [
                _mm256_and_si256(b1, m4),
                _mm256_and_si256(b2, m4),
                _mm256_and_si256(_mm256_srli_epi16::<4>(b1), m4),
                _mm256_and_si256(_mm256_srli_epi16::<4>(b2), m4),
            ];
            let hi = [
                _mm256_and_si256(bh, m3),
                _mm256_and_si256(_mm256_srli_epi16::<2>(bh), m3),
                _mm256_and_si256(_mm256_srli_epi16::<4>(bh), m3),
                _mm256_and_si256(_mm256_srli_epi16::<6>(bh), m3),
            ];
            for k in 0..4 {
                let lv = _mm256_or_si256(lo[k], _mm256_slli_epi16::<4>(hi[k]));
                _mm256_storeu_si256(
                    levels.as_mut_ptr().add(128 * h + 32 * k) as *mut __m256i,
                    lv,
                );
            }
        }
    }
}

/// IQ4_XS levels plus their offset 128 (1..=241) with one table shuffle per 16 elements.
#[target_feature(enable = "avx2")]
unsafe fn unpack_iq4_xs_levels(x: &BlockIQ4XS, levels: &mut [u8; QK_K]) {
    unsafe {
        let biased: [u8; 16] = std::array::from_fn(|i| (KVALUES_IQ4NL[i] as i16 + 128) as u8);
        let table = _mm_loadu_si128(biased.as_ptr() as *const __m128i);
        let m4 = _mm_set1_epi8(0x0F);
        for ib in 0..8 {
            let q = _mm_loadu_si128(x.qs.as_ptr().add(16 * ib) as *const __m128i);
            let lo = _mm_shuffle_epi8(table, _mm_and_si128(q, m4));
            let hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16::<4>(q), m4));
            _mm_storeu_si128(levels.as_mut_ptr().add(32 * ib) as *mut __m128i, lo);
            _mm_storeu_si128(levels.as_mut_ptr().add(32 * ib + 16) as *mut __m128i, hi);
        }
    }
}

/// [`unpack`] compiled for AVX2, where its byte loops vectorize well (Q2_K and Q3_K: about
/// 1.5x faster products than the baseline build; the other types' loops come out slower).
#[target_feature(enable = "avx2")]
unsafe fn unpack_avx2(ty: QuantType, b: &[u8], u: &mut Unpacked) {
    unpack(ty, b, u)
}

/// Unpacks super-block `b` (raw bytes of one block of type `ty`) into `u`.
#[inline(always)]
fn unpack(ty: QuantType, b: &[u8], u: &mut Unpacked) {
    match ty {
        QuantType::Q4_K | QuantType::Q5_K => {
            let (d, dmin, scales12, qs, qh) = if ty == QuantType::Q4_K {
                let x = &as_blocks::<BlockQ4K>(b)[0];
                (x.d, x.dmin, &x.scales, &x.qs, None)
            } else {
                let x = &as_blocks::<BlockQ5K>(b)[0];
                (x.d, x.dmin, &x.scales, &x.qs, Some(&x.qh))
            };
            // SAFETY: only the AVX2 and AVX-512 kernel sets call this module.
            unsafe { unpack_k4_levels(qs, qh, &mut u.levels) };
            let (sc, mn) = unpack_scales_mins_k4(scales12);
            for j in 0..8 {
                u.scales[j] = sc[j] as i32;
                u.corr[2 * j] = mn[j] as i16;
                u.corr[2 * j + 1] = mn[j] as i16;
            }
            u.d = d.to_f32();
            u.dmin = dmin.to_f32();
        }
        QuantType::Q6_K => {
            let x = &as_blocks::<BlockQ6K>(b)[0];
            // SAFETY: only the AVX2 and AVX-512 kernel sets call this module.
            unsafe { unpack_q6_k_levels(x, &mut u.levels) };
            for k in 0..16 {
                u.scales[k] = x.scales[k] as i32;
                u.corr[k] = 32 * x.scales[k] as i16;
            }
            u.d = x.d.to_f32();
        }
        QuantType::Q2_K => {
            let x = &as_blocks::<BlockQ2K>(b)[0];
            u.levels = levels_2bit(&x.qs);
            for k in 0..16 {
                u.scales[k] = (x.scales[k] & 0xF) as i32;
                u.corr[k] = (x.scales[k] >> 4) as i16;
            }
            u.d = x.d.to_f32();
            u.dmin = x.dmin.to_f32();
        }
        QuantType::Q3_K => {
            let x = &as_blocks::<BlockQ3K>(b)[0];
            // SAFETY: only the AVX2 and AVX-512 kernel sets call this module.
            unsafe { unpack_q3_k_levels(x, &mut u.levels) };
            let sc = q3_k_scales(&x.scales);
            for k in 0..16 {
                u.scales[k] = sc[k] as i32;
                u.corr[k] = 4 * sc[k] as i16;
            }
            u.d = x.d.to_f32();
        }
        QuantType::IQ4_XS => {
            let x = &as_blocks::<BlockIQ4XS>(b)[0];
            let sc = iq4_xs_scales(x);
            // SAFETY: only the AVX2 and AVX-512 kernel sets call this module.
            unsafe { unpack_iq4_xs_levels(x, &mut u.levels) };
            for ib in 0..8 {
                u.scales[ib] = sc[ib] as i32;
                u.corr[2 * ib] = 128 * sc[ib] as i16;
                u.corr[2 * ib + 1] = 128 * sc[ib] as i16;
            }
            u.d = x.d.to_f32();
        }
        _ => unreachable!(),
    }
}

/// Activations of one group of 16 vectors for one super-block, interleaved.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Codes {
    /// `q[kg][c]`: quants 4kg..4kg+4 of activation c, as one little-endian u32.
    q: [[u32; COLS]; QK_K / 4],
    /// `bsums[p][c]`: the 16-element sums 2p and 2p+1 of activation c as an i16 pair.
    bsums: [[u32; COLS]; 8],
    d: [f32; COLS],
}

impl Default for Codes {
    fn default() -> Self {
        Codes {
            q: [[0; COLS]; QK_K / 4],
            bsums: [[0; COLS]; 8],
            d: [0.0; COLS],
        }
    }
}

/// Interleaves `count` activation vectors of `nb` super-blocks each into groups of 16 (the last
/// group padded with zero activations): `codes[g * nb + i]`. Groups are spread over the pool.
fn interleave(act: &[BlockQ8K], nb: usize, count: usize, codes: &mut Vec<Codes>, parallel: bool) {
    let groups = count.div_ceil(COLS);
    if codes.len() < groups * nb {
        codes.resize(groups * nb, Codes::default());
    }
    let out = OutPtr(codes.as_mut_ptr());
    let fill = |g: usize| {
        // SAFETY: group g owns codes[g * nb..(g + 1) * nb], within the length ensured above.
        let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add(g * nb), nb) };
        let valid = COLS.min(count - g * COLS);
        for (i, dst) in dst.iter_mut().enumerate() {
            for c in 0..COLS {
                if c >= valid {
                    for kg in 0..QK_K / 4 {
                        dst.q[kg][c] = 0;
                    }
                    for p in 0..8 {
                        dst.bsums[p][c] = 0;
                    }
                    dst.d[c] = 0.0;
                    continue;
                }
                let a = &act[(g * COLS + c) * nb + i];
                for kg in 0..QK_K / 4 {
                    let q = &a.qs[4 * kg..4 * kg + 4];
                    dst.q[kg][c] =
                        u32::from_le_bytes([q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8]);
                }
                for p in 0..8 {
                    dst.bsums[p][c] =
                        (a.bsums[2 * p] as u16 as u32) | ((a.bsums[2 * p + 1] as u16 as u32) << 16);
                }
                dst.d[c] = a.d;
            }
        }
    };
    if parallel && groups > 1 && pool::threads() > 1 {
        pool::for_each(groups, fill);
    } else {
        (0..groups).for_each(fill);
    }
}

/// The integer sums of 8 unpacked rows with 16 interleaved activations: per row, 16 lanes of
/// Σ scale·level·q8 − [offset types] Σ corr·bsum, and Σ corr·bsum (the mins sum; zero for the
/// offset types).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn micro<const SUB: usize>(
    rows: &[Unpacked; ROWS],
    codes: &Codes,
    kind: Correction,
) -> ([__m512i; ROWS], [__m512i; ROWS]) {
    unsafe {
        let mut isum = [_mm512_setzero_si512(); ROWS];
        let groups = SUB / 4;
        for s in 0..QK_K / SUB {
            let mut acc = [_mm512_setzero_si512(); ROWS];
            for g in 0..groups {
                let kg = s * groups + g;
                let q = _mm512_load_si512(codes.q[kg].as_ptr() as *const __m512i);
                for t in 0..ROWS {
                    let w = (rows[t].levels.as_ptr().add(4 * kg) as *const u32).read_unaligned();
                    acc[t] = _mm512_dpbusd_epi32(acc[t], _mm512_set1_epi32(w as i32), q);
                }
            }
            for t in 0..ROWS {
                let sc = _mm512_set1_epi32(rows[t].scales[s]);
                isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(acc[t], sc));
            }
        }
        let mut corr = [_mm512_setzero_si512(); ROWS];
        for p in 0..8 {
            let b = _mm512_load_si512(codes.bsums[p].as_ptr() as *const __m512i);
            for t in 0..ROWS {
                let c = (rows[t].corr.as_ptr().add(2 * p) as *const u32).read_unaligned();
                corr[t] = _mm512_dpwssd_epi32(corr[t], _mm512_set1_epi32(c as i32), b);
            }
        }
        if kind == Correction::Offset {
            for t in 0..ROWS {
                isum[t] = _mm512_sub_epi32(isum[t], corr[t]);
                corr[t] = _mm512_setzero_si512();
            }
        }
        (isum, corr)
    }
}

/// Adds the contributions of one super-block (8 rows x 16 activations) to the f64 lanes
/// `acc[t][c]` (lane `lane`), with `reference`'s expressions: `(d_w * d_a) * isum` and, for the
/// mins types, `- (dmin_w * d_a) * summins`, in that order, without fused multiply-adds.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn accumulate(
    rows: &[Unpacked; ROWS],
    codes: &Codes,
    isum: &[__m512i; ROWS],
    mins: &[__m512i; ROWS],
    kind: Correction,
    acc: &mut TileLanes,
    lane: usize,
) {
    unsafe {
        let da = _mm512_load_ps(codes.d.as_ptr());
        let da = [
            _mm512_cvtps_pd(_mm512_castps512_ps256(da)),
            _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                _mm512_castps_pd(da),
            ))),
        ];
        for t in 0..ROWS {
            let dw = _mm512_set1_pd(rows[t].d as f64);
            let dmin = _mm512_set1_pd(rows[t].dmin as f64);
            let is = [
                _mm512_cvtepi32_pd(_mm512_castsi512_si256(isum[t])),
                _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64::<1>(isum[t])),
            ];
            let mn = [
                _mm512_cvtepi32_pd(_mm512_castsi512_si256(mins[t])),
                _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64::<1>(mins[t])),
            ];
            for h in 0..2 {
                let mut c = _mm512_mul_pd(_mm512_mul_pd(dw, da[h]), is[h]);
                if kind == Correction::Mins {
                    c = _mm512_sub_pd(c, _mm512_mul_pd(_mm512_mul_pd(dmin, da[h]), mn[h]));
                }
                let p = acc[t][lane].as_mut_ptr().add(8 * h);
                _mm512_storeu_pd(p, _mm512_add_pd(_mm512_loadu_pd(p), c));
            }
        }
    }
}

/// One super-block of 8 rows x 16 activations with AVX2 only: the same exact integers as
/// `micro` (`vpmaddubsw` pairs, exact for levels up to 63, then `vpmaddwd`), 4 rows x 8
/// activations at a time, and the same f64 expressions as `accumulate`.
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2<const SUB: usize>(
    rows: &[Unpacked; ROWS],
    codes: &Codes,
    kind: Correction,
    acc: &mut TileLanes,
    lane: usize,
) {
    unsafe {
        let ones = _mm256_set1_epi16(1);
        for half in 0..2 {
            for r0 in [0, 4] {
                let mut isum = [_mm256_setzero_si256(); 4];
                for s in 0..QK_K / SUB {
                    let mut a = [_mm256_setzero_si256(); 4];
                    for g in 0..SUB / 4 {
                        let kg = s * (SUB / 4) + g;
                        let q =
                            _mm256_load_si256(codes.q[kg].as_ptr().add(8 * half) as *const __m256i);
                        for t in 0..4 {
                            let w = (rows[r0 + t].levels.as_ptr().add(4 * kg) as *const u32)
                                .read_unaligned();
                            let p16 = _mm256_maddubs_epi16(_mm256_set1_epi32(w as i32), q);
                            a[t] = _mm256_add_epi32(a[t], _mm256_madd_epi16(p16, ones));
                        }
                    }
                    for t in 0..4 {
                        let sc = _mm256_set1_epi32(rows[r0 + t].scales[s]);
                        isum[t] = _mm256_add_epi32(isum[t], _mm256_mullo_epi32(a[t], sc));
                    }
                }
                let mut corr = [_mm256_setzero_si256(); 4];
                for p in 0..8 {
                    let b =
                        _mm256_load_si256(codes.bsums[p].as_ptr().add(8 * half) as *const __m256i);
                    for t in 0..4 {
                        let c =
                            (rows[r0 + t].corr.as_ptr().add(2 * p) as *const u32).read_unaligned();
                        corr[t] = _mm256_add_epi32(
                            corr[t],
                            _mm256_madd_epi16(_mm256_set1_epi32(c as i32), b),
                        );
                    }
                }
                if kind == Correction::Offset {
                    for t in 0..4 {
                        isum[t] = _mm256_sub_epi32(isum[t], corr[t]);
                        corr[t] = _mm256_setzero_si256();
                    }
                }
                let da = _mm256_load_ps(codes.d.as_ptr().add(8 * half));
                let da = [
                    _mm256_cvtps_pd(_mm256_castps256_ps128(da)),
                    _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(da)),
                ];
                for t in 0..4 {
                    let row = &rows[r0 + t];
                    let dw = _mm256_set1_pd(row.d as f64);
                    let dmin = _mm256_set1_pd(row.dmin as f64);
                    let is = [
                        _mm256_cvtepi32_pd(_mm256_castsi256_si128(isum[t])),
                        _mm256_cvtepi32_pd(_mm256_extracti128_si256::<1>(isum[t])),
                    ];
                    let mn = [
                        _mm256_cvtepi32_pd(_mm256_castsi256_si128(corr[t])),
                        _mm256_cvtepi32_pd(_mm256_extracti128_si256::<1>(corr[t])),
                    ];
                    for h in 0..2 {
                        let mut c = _mm256_mul_pd(_mm256_mul_pd(dw, da[h]), is[h]);
                        if kind == Correction::Mins {
                            c = _mm256_sub_pd(c, _mm256_mul_pd(_mm256_mul_pd(dmin, da[h]), mn[h]));
                        }
                        let p = acc[r0 + t][lane].as_mut_ptr().add(8 * half + 4 * h);
                        _mm256_storeu_pd(p, _mm256_add_pd(_mm256_loadu_pd(p), c));
                    }
                }
            }
        }
    }
}

/// Super-blocks per pass over all groups of activations (see `matmul`).
const SB_CHUNK: usize = 8;

/// Per-group f64 lanes of one tile: `[group][row][lane][activation]`.
type TileLanes = [[[f64; COLS]; 4]; ROWS];

thread_local! {
    static ROWS_BUF: RefCell<Vec<[Unpacked; ROWS]>> = const { RefCell::new(Vec::new()) };
    static ACC_BUF: RefCell<Vec<TileLanes>> = const { RefCell::new(Vec::new()) };
}

/// A prepared activation batch in the GEMM's interleaved form, made on the first product that
/// needs it and kept until the batch is prepared again (the Q, K and V projections, or the
/// gate and up projections, share one).
#[derive(Default)]
pub(super) struct Interleaved {
    /// Whether `codes` holds the current batch.
    pub(super) valid: bool,
    codes: Vec<Codes>,
}

/// `y[b * rows + r] = dot64(weight row r, activation b)` (as T) for weight type `ty` (see
/// [`supports`]), `act` holding `count` Q8_K vectors of `cols / 256` blocks each, `interleaved`
/// their interleaved form (made here when not valid). Splits the
/// rows over the calling thread's pool when `parallel`. The caller has checked the shapes and
/// that this CPU has the features of `isa` (AVX2, or AVX-512 F/BW/VL/VNNI).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul<T: FromF64>(
    isa: Tiled,
    ty: QuantType,
    weight: &[u8],
    rb: usize,
    rows: usize,
    cols: usize,
    act: &[BlockQ8K],
    count: usize,
    interleaved: &RwLock<Interleaved>,
    y: &mut [T],
    parallel: bool,
) {
    let nb = cols / QK_K;
    let block = ty.block_bytes();
    let (sub, kind) = layout(ty);
    let avx2_unpack = matches!(ty, QuantType::Q2_K | QuantType::Q3_K);
    {
        // Made under the write lock by the first product; read by any number at once.
        if !interleaved
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .valid
        {
            let mut w = interleaved.write().unwrap_or_else(PoisonError::into_inner);
            if !w.valid {
                interleave(act, nb, count, &mut w.codes, parallel);
                w.valid = true;
            }
        }
        let guard = interleaved.read().unwrap_or_else(PoisonError::into_inner);
        let codes = &guard.codes[..];
        let groups = count.div_ceil(COLS);
        let out = OutPtr(y.as_mut_ptr());
        let tiles = rows.div_ceil(ROWS);
        let run = |tile: usize| {
            ROWS_BUF.with_borrow_mut(|buf| {
                // Every field a product reads is rewritten by `unpack` (rows < n) or zeroed here
                // (the padding rows of a last, partial tile), so the buffer is reused as is.
                if buf.len() < nb {
                    buf.resize(nb, [Unpacked::default(); ROWS]);
                }
                let buf = &mut buf[..nb];
                let r0 = tile * ROWS;
                let n = ROWS.min(rows - r0);
                for u in buf.iter_mut() {
                    for pad in &mut u[n..] {
                        *pad = Unpacked::default();
                    }
                }
                for t in 0..n {
                    let row = &weight[(r0 + t) * rb..(r0 + t + 1) * rb];
                    for (i, u) in buf.iter_mut().enumerate() {
                        let b = &row[i * block..(i + 1) * block];
                        if avx2_unpack {
                            // SAFETY: the caller checked the CPU features (AVX-512 implies AVX2).
                            unsafe { unpack_avx2(ty, b, &mut u[t]) }
                        } else {
                            unpack(ty, b, &mut u[t])
                        }
                    }
                }
                // The super-blocks go in chunks, each chunk through every group of
                // activations, so that the chunk's interleaved activations (all groups) stay
                // in L2 while the tile's rows use them; each (row, activation) still adds its
                // super-blocks in order, into the f64 lanes kept per group.
                ACC_BUF.with_borrow_mut(|acc| {
                    acc.clear();
                    acc.resize(groups, [[[0f64; COLS]; 4]; ROWS]);
                    let mut i0 = 0;
                    while i0 < nb {
                        let i1 = (i0 + SB_CHUNK).min(nb);
                        for (g, acc) in acc.iter_mut().enumerate() {
                            for i in i0..i1 {
                                let (u, c) = (&buf[i], &codes[g * nb + i]);
                                // SAFETY: the caller checked the CPU features of `isa`.
                                unsafe {
                                    if isa == Tiled::Avx2 {
                                        if sub == 16 {
                                            block_avx2::<16>(u, c, kind, acc, i % 4)
                                        } else {
                                            block_avx2::<32>(u, c, kind, acc, i % 4)
                                        }
                                        continue;
                                    }
                                    let (isum, mins) = if sub == 16 {
                                        micro::<16>(u, c, kind)
                                    } else {
                                        micro::<32>(u, c, kind)
                                    };
                                    accumulate(u, c, &isum, &mins, kind, acc, i % 4);
                                }
                            }
                        }
                        i0 = i1;
                    }
                    for (g, acc) in acc.iter().enumerate() {
                        for t in 0..n {
                            for c in 0..COLS.min(count - g * COLS) {
                                let l = &acc[t];
                                let v = (l[0][c] + l[1][c]) + (l[2][c] + l[3][c]);
                                let b = g * COLS + c;
                                // SAFETY: b < count, r0 + t < rows; tiles own disjoint rows.
                                unsafe { *out.get().add(b * rows + r0 + t) = T::from_f64(v) };
                            }
                        }
                    }
                });
            })
        };
        if parallel && pool::threads() > 1 && tiles > 1 {
            pool::for_each(tiles, run);
        } else {
            (0..tiles).for_each(run);
        }
    }
}
