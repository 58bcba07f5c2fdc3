//! Batch products (prompt chunks, decode steps of many sequences) as a tiled integer GEMM
//! (x86_64): with AVX-512 VNNI in the `avx512` kernel set, with AVX2's `vpmaddubsw` in the
//! `avx2` set. Two families of types go through it: the Q8_K-activated K-quants (Q2_K, Q3_K,
//! Q4_K, Q5_K, Q6_K, IQ4_XS; super-blocks of 256) and the 32-element types (Q4_0, Q4_1,
//! Q5_0, Q5_1, Q8_0; blocks of 32 with Q8_0 or Q8_1 activations). A `Format` says how each
//! family unpacks, interleaves and multiplies a block; `Product::run` drives both.
//!
//! A tile of 8 weight rows is unpacked once per product into unsigned 8-bit levels, one byte
//! per element, with its scales (K-quants: its sub-block scales and one correction vector,
//! below). Activations are interleaved once per product: for each group of 16 activation
//! vectors and each block, vectors of 16 x 4 bytes, the four consecutive quants of one group
//! of four elements for each of the 16 activations. The micro-kernel then broadcasts four
//! weight levels of one row and multiplies them into all 16 activations at once (`vpdpbusd`:
//! 64 multiply-adds per instruction), for 8 rows.
//!
//! K-quants: sub-block by sub-block, each sub-block's exact i32 sums are scaled by the row's
//! integer sub-block scale. What the levels leave out comes back through the activations'
//! 16-element sums (`bsums`, `vpdpwssd`): the level offset (Q6_K 32, Q3_K 4, IQ4_XS 128) as
//! `- offset * scale * bsum` inside the integer sum, the K-quant mins as the separate
//! `Σ min * bsum`. The 32-element types: the level offset (Q4_0 8, Q5_0 16, Q8_0 128) times
//! the activation block's quant sum, made once when interleaving, is subtracted from the
//! block's integer sum; Q4_1 and Q5_1 add `m_w * s_a`.
//!
//! The AVX2 forms compute the same integers 8 activations per register with `vpmaddubsw` +
//! `vpmaddwd` in place of `vpdpbusd` (exact while levels stay below 64: not IQ4_XS's offset
//! levels, up to 241, nor Q8_0's, up to 255).
//!
//! Every (row, activation) block thus gets the exact integers of `reference`'s
//! `for_each_contribution`, and the same f64 expression turns them into its contribution,
//! added to lane `i % 4` and combined as `reference::dot64` does: the results are bitwise
//! those of `matmul_f64_reference` (and, rounded, of `matmul_reference` for the types whose f32
//! product is the f64 one rounded). The f32 products of Q4_0, Q4_1, Q5_0 and Q8_0 keep
//! llama.cpp's order instead: `Product::run_f32_order` (`llama_pair`) reproduces their row
//! kernels.

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

/// Whether [`matmul`] handles weight type `ty` with instruction set `isa`. The AVX2 forms
/// multiply with `vpmaddubsw`, whose i16 pair sums hold levels up to 63 only.
pub(super) fn supports(ty: QuantType, isa: Tiled) -> bool {
    match ty {
        QuantType::Q2_K | QuantType::Q3_K | QuantType::Q4_K | QuantType::Q5_K | QuantType::Q6_K => {
            isa != Tiled::No
        }
        QuantType::IQ4_XS => isa == Tiled::Vnni,
        QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q5_0 | QuantType::Q5_1 => isa != Tiled::No,
        // Q8_0's levels reach 255: `vpmaddubsw`'s i16 pair sums would saturate.
        QuantType::Q8_0 => isa == Tiled::Vnni,
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

/// Per-group f64 lanes of one tile: `[group][row][lane][activation]`.
type TileLanes = [[[f64; COLS]; 4]; ROWS];

/// What the driver (`run`) needs from a family of block types: a tile's rows unpacked block by
/// block, a group of 16 activations interleaved block by block, and one block of 8 rows x 16
/// activations added to the f64 lanes (lane = block index % 4, as `reference::dot64`).
trait Format {
    /// An activation block.
    type Act: Sync;
    /// One row's block, unpacked.
    type Unpacked: Copy + Default;
    /// One block of a group of 16 activations, interleaved.
    type Codes: Copy + Default + Send + Sync;
    /// Blocks per pass over all groups of activations (see `run`): 2,048 elements.
    const CHUNK: usize;
    /// Unpacks weight block `b` (its raw bytes) into `u`.
    fn unpack(&self, b: &[u8], u: &mut Self::Unpacked);
    /// Writes activation block `a` as column `c` of `dst` (zeros for `None`, a padding column).
    fn code(&self, a: Option<&Self::Act>, c: usize, dst: &mut Self::Codes);
    /// Adds the contributions of one block of 8 rows x 16 activations to lane `lane` of `acc`.
    ///
    /// # Safety
    /// The CPU has the features of `isa`, which `supports` accepted for this format's type.
    unsafe fn block(
        &self,
        isa: Tiled,
        rows: &[Self::Unpacked; ROWS],
        codes: &Self::Codes,
        acc: &mut TileLanes,
        lane: usize,
    );
    /// Runs `f` on this thread's buffer of unpacked tiles.
    fn with_rows<R>(f: impl FnOnce(&mut Vec<[Self::Unpacked; ROWS]>) -> R) -> R;
    /// This format's interleaved activations in the batch's cache.
    fn codes(i: &Interleaved) -> &Vec<Self::Codes>;
    fn codes_mut(i: &mut Interleaved) -> &mut Vec<Self::Codes>;
}

/// The Q8_K-activated types: super-blocks of 256 elements.
struct KQuant {
    ty: QuantType,
    sub: usize,
    kind: Correction,
    avx2_unpack: bool,
}

impl KQuant {
    fn new(ty: QuantType) -> Self {
        let (sub, kind) = layout(ty);
        let avx2_unpack = matches!(ty, QuantType::Q2_K | QuantType::Q3_K);
        KQuant {
            ty,
            sub,
            kind,
            avx2_unpack,
        }
    }
}

impl Format for KQuant {
    type Act = BlockQ8K;
    type Unpacked = Unpacked;
    type Codes = Codes;
    const CHUNK: usize = 8;

    fn unpack(&self, b: &[u8], u: &mut Unpacked) {
        if self.avx2_unpack {
            // SAFETY: only the AVX2 and AVX-512 kernel sets call this module.
            unsafe { unpack_avx2(self.ty, b, u) }
        } else {
            unpack(self.ty, b, u)
        }
    }

    fn code(&self, a: Option<&BlockQ8K>, c: usize, dst: &mut Codes) {
        let Some(a) = a else {
            for kg in 0..QK_K / 4 {
                dst.q[kg][c] = 0;
            }
            for p in 0..8 {
                dst.bsums[p][c] = 0;
            }
            dst.d[c] = 0.0;
            return;
        };
        for kg in 0..QK_K / 4 {
            let q = &a.qs[4 * kg..4 * kg + 4];
            dst.q[kg][c] = u32::from_le_bytes([q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8]);
        }
        for p in 0..8 {
            dst.bsums[p][c] =
                (a.bsums[2 * p] as u16 as u32) | ((a.bsums[2 * p + 1] as u16 as u32) << 16);
        }
        dst.d[c] = a.d;
    }

    unsafe fn block(
        &self,
        isa: Tiled,
        u: &[Unpacked; ROWS],
        c: &Codes,
        acc: &mut TileLanes,
        lane: usize,
    ) {
        let kind = self.kind;
        // SAFETY: the caller checked the CPU features of `isa`.
        unsafe {
            if isa == Tiled::Avx2 {
                if self.sub == 16 {
                    block_avx2::<16>(u, c, kind, acc, lane)
                } else {
                    block_avx2::<32>(u, c, kind, acc, lane)
                }
                return;
            }
            let (isum, mins) = if self.sub == 16 {
                micro::<16>(u, c, kind)
            } else {
                micro::<32>(u, c, kind)
            };
            accumulate(u, c, &isum, &mins, kind, acc, lane);
        }
    }

    fn with_rows<R>(f: impl FnOnce(&mut Vec<[Unpacked; ROWS]>) -> R) -> R {
        thread_local! {
            static BUF: RefCell<Vec<[Unpacked; ROWS]>> = const { RefCell::new(Vec::new()) };
        }
        BUF.with_borrow_mut(f)
    }

    fn codes(i: &Interleaved) -> &Vec<Codes> {
        &i.codes
    }
    fn codes_mut(i: &mut Interleaved) -> &mut Vec<Codes> {
        &mut i.codes
    }
}

// ---- The 32-element types: Q4_0, Q4_1, Q5_0, Q5_1 (levels 0..=31) and Q8_0 (levels 0..=255)

/// One row's 32-element block, unpacked: unsigned levels (the quant plus the type's offset:
/// Q4_0 8, Q5_0 16, Q8_0 128, none for the types with a min), the scale and the min as f64.
#[derive(Clone, Copy, Default)]
#[repr(C, align(16))]
struct Unpacked32 {
    levels: [u8; 32],
    d: f64,
    m: f64,
}

/// One 32-element block of 16 activations, interleaved.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Codes32 {
    /// `q[kg][c]`: quants 4kg..4kg+4 of activation c, as one little-endian u32.
    q: [[u32; COLS]; 8],
    /// The weight type's level offset times the block's quant sum, per activation: what the
    /// offset levels add to the integer sum.
    corr: [i32; COLS],
    d: [f64; COLS],
    /// Q8_1's `s` (= d * Σ quants, as stored): the min's coefficient.
    s: [f64; COLS],
    /// For the f32 products (`llama_pair`): minus the offset times the sum of quants
    /// 4kg..4kg+4, per activation (the correction of llama.cpp's i32 lane kg), and `d`, `s`
    /// as f32.
    lanes: [[i32; COLS]; 8],
    df: [f32; COLS],
    sf: [f32; COLS],
}

/// An activation block of 32 quants.
trait Q8Block: Sync {
    fn d(&self) -> F16Bytes;
    fn s(&self) -> F16Bytes;
    fn qs(&self) -> &[i8; QK];
}

impl Q8Block for BlockQ8_0 {
    fn d(&self) -> F16Bytes {
        self.d
    }
    fn s(&self) -> F16Bytes {
        F16Bytes::default()
    }
    fn qs(&self) -> &[i8; QK] {
        &self.qs
    }
}

impl Q8Block for BlockQ8_1 {
    fn d(&self) -> F16Bytes {
        self.d
    }
    fn s(&self) -> F16Bytes {
        self.s
    }
    fn qs(&self) -> &[i8; QK] {
        &self.qs
    }
}

/// A 32-element type with activations of block type `A` (Q8_0, or Q8_1 for the min types).
struct Legacy<A> {
    ty: QuantType,
    /// What the levels add to each quant.
    offset: i32,
    _act: std::marker::PhantomData<A>,
}

impl<A> Legacy<A> {
    fn new(ty: QuantType) -> Self {
        let offset = match ty {
            QuantType::Q4_0 => 8,
            QuantType::Q5_0 => 16,
            QuantType::Q8_0 => 128,
            QuantType::Q4_1 | QuantType::Q5_1 => 0,
            _ => unreachable!("tiled: unsupported type {ty}"),
        };
        Legacy {
            ty,
            offset,
            _act: std::marker::PhantomData,
        }
    }

    fn has_min(&self) -> bool {
        matches!(self.ty, QuantType::Q4_1 | QuantType::Q5_1)
    }
}

/// 32 bits -> 32 bytes, 0x10 where the bit is set (Q5's fifth bit of each level).
#[target_feature(enable = "avx2")]
fn fifth_bits(bits: u32) -> __m256i {
    let shuf = _mm256_setr_epi64x(
        0,
        0x0101010101010101,
        0x0202020202020202,
        0x0303030303030303,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), shuf);
    let mask = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, mask), mask);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// The levels of a nibble block (low nibbles are elements 0..16, high nibbles 16..32), with
/// Q5's fifth bits from `qh`.
#[target_feature(enable = "avx2")]
unsafe fn nibble_levels(qs: &[u8; QK / 2], qh: Option<u32>, levels: &mut [u8; QK]) {
    unsafe {
        let raw = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
        let both = _mm256_set_m128i(_mm_srli_epi16::<4>(raw), raw);
        let mut lv = _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
        if let Some(bits) = qh {
            lv = _mm256_or_si256(lv, fifth_bits(bits));
        }
        _mm256_storeu_si256(levels.as_mut_ptr() as *mut __m256i, lv);
    }
}

/// Q8_0's levels: each quant plus 128, as a byte (its sign bit flipped).
#[target_feature(enable = "avx2")]
unsafe fn q8_levels(qs: &[i8; QK], levels: &mut [u8; QK]) {
    unsafe {
        let q = _mm256_loadu_si256(qs.as_ptr() as *const __m256i);
        let lv = _mm256_xor_si256(q, _mm256_set1_epi8(0x80u8 as i8));
        _mm256_storeu_si256(levels.as_mut_ptr() as *mut __m256i, lv);
    }
}

/// One block of 8 rows x 16 activations with AVX-512 VNNI: per row, 16 lanes of the exact
/// Σ level·q8 − offset·Σ q8 (`vpdpbusd`), then `reference`'s contribution `(d_w * d_a) *
/// isum` (the min types: `+ m_w * s_a`), unfused, added to lane `lane`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn legacy_vnni(
    rows: &[Unpacked32; ROWS],
    codes: &Codes32,
    min: bool,
    acc: &mut TileLanes,
    lane: usize,
) {
    unsafe {
        let mut isum = [_mm512_setzero_si512(); ROWS];
        for kg in 0..QK / 4 {
            let q = _mm512_load_si512(codes.q[kg].as_ptr() as *const __m512i);
            for t in 0..ROWS {
                let w = (rows[t].levels.as_ptr().add(4 * kg) as *const u32).read_unaligned();
                isum[t] = _mm512_dpbusd_epi32(isum[t], _mm512_set1_epi32(w as i32), q);
            }
        }
        let corr = _mm512_load_si512(codes.corr.as_ptr() as *const __m512i);
        let da = [
            _mm512_load_pd(codes.d.as_ptr()),
            _mm512_load_pd(codes.d.as_ptr().add(8)),
        ];
        let sa = [
            _mm512_load_pd(codes.s.as_ptr()),
            _mm512_load_pd(codes.s.as_ptr().add(8)),
        ];
        for t in 0..ROWS {
            let is = _mm512_sub_epi32(isum[t], corr);
            let is = [
                _mm512_cvtepi32_pd(_mm512_castsi512_si256(is)),
                _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64::<1>(is)),
            ];
            let dw = _mm512_set1_pd(rows[t].d);
            let mw = _mm512_set1_pd(rows[t].m);
            for h in 0..2 {
                let mut c = _mm512_mul_pd(_mm512_mul_pd(dw, da[h]), is[h]);
                if min {
                    c = _mm512_add_pd(c, _mm512_mul_pd(mw, sa[h]));
                }
                let p = acc[t][lane].as_mut_ptr().add(8 * h);
                _mm512_storeu_pd(p, _mm512_add_pd(_mm512_loadu_pd(p), c));
            }
        }
    }
}

/// `legacy_vnni` with AVX2 only, 8 activations at a time: `vpmaddubsw` pairs (at most
/// 2 · 31 · 127 for levels up to 31, four of them summed in i16 before `vpmaddwd`: exact),
/// then the same f64 expressions.
#[target_feature(enable = "avx2,fma")]
unsafe fn legacy_avx2(
    rows: &[Unpacked32; ROWS],
    codes: &Codes32,
    min: bool,
    acc: &mut TileLanes,
    lane: usize,
) {
    unsafe {
        let ones = _mm256_set1_epi16(1);
        for half in 0..2 {
            let q: [__m256i; QK / 4] = std::array::from_fn(|kg| {
                _mm256_load_si256(codes.q[kg].as_ptr().add(8 * half) as *const __m256i)
            });
            let corr = _mm256_load_si256(codes.corr.as_ptr().add(8 * half) as *const __m256i);
            let at = |v: &[f64; COLS], h: usize| _mm256_load_pd(v.as_ptr().add(8 * half + 4 * h));
            let (da, sa) = (
                [at(&codes.d, 0), at(&codes.d, 1)],
                [at(&codes.s, 0), at(&codes.s, 1)],
            );
            for t in 0..ROWS {
                let lv = rows[t].levels.as_ptr() as *const u32;
                let mut pairs = [_mm256_setzero_si256(); 2];
                for kg in 0..QK / 4 {
                    let w = _mm256_set1_epi32(lv.add(kg).read_unaligned() as i32);
                    pairs[kg / 4] = _mm256_add_epi16(pairs[kg / 4], _mm256_maddubs_epi16(w, q[kg]));
                }
                let isum = _mm256_add_epi32(
                    _mm256_madd_epi16(pairs[0], ones),
                    _mm256_madd_epi16(pairs[1], ones),
                );
                let is = _mm256_sub_epi32(isum, corr);
                let is = [
                    _mm256_cvtepi32_pd(_mm256_castsi256_si128(is)),
                    _mm256_cvtepi32_pd(_mm256_extracti128_si256::<1>(is)),
                ];
                let dw = _mm256_set1_pd(rows[t].d);
                let mw = _mm256_set1_pd(rows[t].m);
                for h in 0..2 {
                    let mut c = _mm256_mul_pd(_mm256_mul_pd(dw, da[h]), is[h]);
                    if min {
                        c = _mm256_add_pd(c, _mm256_mul_pd(mw, sa[h]));
                    }
                    let p = acc[t][lane].as_mut_ptr().add(8 * half + 4 * h);
                    _mm256_storeu_pd(p, _mm256_add_pd(_mm256_loadu_pd(p), c));
                }
            }
        }
    }
}

/// The f32 products of rows `t0` and `t0 + 1` of an unpacked tile (`rows[i]`: block i) with
/// one group of 16 activations (`codes[i]`: block i), in the order of the row kernels'
/// `legacy_kernel` (llama.cpp's AVX2 `ggml_vec_dot_*`): per block, its eight i32 lanes (lane
/// kg sums elements 4kg..4kg+4, which is what one `vpdpbusd` of levels kg gives, started from
/// minus the offset's share of that lane), each converted to f32 and `fma`'d with
/// `d_w * d_a` (f32) into its own accumulator; the min types add `m_w * s_a` (f32) into a
/// separate sum. At the end the eight lanes are summed as `hsum_ps` does: lanes l and l + 4,
/// then (0 + 2) + (1 + 3), then the mins' sum. Every (row, activation) gets the same f32
/// operations in the same order as a lone vector through the row kernel, hence the same bits.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::needless_range_loop)] // kg indexes four arrays alike
unsafe fn llama_pair(
    rows: &[[Unpacked32; ROWS]],
    t0: usize,
    codes: &[Codes32],
    min: bool,
) -> [[f32; COLS]; 2] {
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); QK / 4]; 2];
        let mut mins = [_mm512_setzero_ps(); 2];
        for (tile, c) in rows.iter().zip(codes) {
            let da = _mm512_load_ps(c.df.as_ptr());
            let sa = _mm512_load_ps(c.sf.as_ptr());
            for r in 0..2 {
                let u = &tile[t0 + r];
                let dd = _mm512_mul_ps(_mm512_set1_ps(u.d as f32), da);
                let levels = u.levels.as_ptr() as *const u32;
                for kg in 0..QK / 4 {
                    let w = _mm512_set1_epi32(levels.add(kg).read_unaligned() as i32);
                    let start = _mm512_load_si512(c.lanes[kg].as_ptr() as *const __m512i);
                    let q = _mm512_load_si512(c.q[kg].as_ptr() as *const __m512i);
                    let lane = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, w, q));
                    acc[r][kg] = _mm512_fmadd_ps(dd, lane, acc[r][kg]);
                }
                if min {
                    let ms = _mm512_mul_ps(_mm512_set1_ps(u.m as f32), sa);
                    mins[r] = _mm512_add_ps(mins[r], ms);
                }
            }
        }
        let mut out = [[0f32; COLS]; 2];
        for r in 0..2 {
            let a = &acc[r];
            let t: [__m512; 4] = std::array::from_fn(|l| _mm512_add_ps(a[l], a[l + 4]));
            let mut v = _mm512_add_ps(_mm512_add_ps(t[0], t[2]), _mm512_add_ps(t[1], t[3]));
            if min {
                v = _mm512_add_ps(v, mins[r]);
            }
            _mm512_storeu_ps(out[r].as_mut_ptr(), v);
        }
        out
    }
}

/// Unpacks 32-element block `b` of type `ty` (its raw bytes) into `u`.
#[target_feature(enable = "avx2,f16c")]
unsafe fn unpack32(ty: QuantType, b: &[u8], u: &mut Unpacked32) {
    debug_assert_eq!(b.len(), ty.block_bytes());
    unsafe {
        let (d, m) = match ty {
            QuantType::Q4_0 => {
                let x = &*(b.as_ptr() as *const BlockQ4_0);
                nibble_levels(&x.qs, None, &mut u.levels);
                (x.d, F16Bytes::default())
            }
            QuantType::Q4_1 => {
                let x = &*(b.as_ptr() as *const BlockQ4_1);
                nibble_levels(&x.qs, None, &mut u.levels);
                (x.d, x.m)
            }
            QuantType::Q5_0 => {
                let x = &*(b.as_ptr() as *const BlockQ5_0);
                nibble_levels(&x.qs, Some(u32::from_le_bytes(x.qh)), &mut u.levels);
                (x.d, F16Bytes::default())
            }
            QuantType::Q5_1 => {
                let x = &*(b.as_ptr() as *const BlockQ5_1);
                nibble_levels(&x.qs, Some(u32::from_le_bytes(x.qh)), &mut u.levels);
                (x.d, x.m)
            }
            QuantType::Q8_0 => {
                let x = &*(b.as_ptr() as *const BlockQ8_0);
                q8_levels(&x.qs, &mut u.levels);
                (x.d, F16Bytes::default())
            }
            _ => unreachable!(),
        };
        // Both halves in one conversion (exact).
        let bits = d.bits() as i32 | ((m.bits() as i32) << 16);
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
        u.d = _mm_cvtss_f32(dm) as f64;
        u.m = _mm_cvtss_f32(_mm_movehdup_ps(dm)) as f64;
    }
}

impl<A: Q8Block> Format for Legacy<A> {
    type Act = A;
    type Unpacked = Unpacked32;
    type Codes = Codes32;
    const CHUNK: usize = 64;

    fn unpack(&self, b: &[u8], u: &mut Unpacked32) {
        // SAFETY: only the AVX2 and AVX-512 kernel sets, which have F16C, call this module.
        unsafe { unpack32(self.ty, b, u) }
    }

    fn code(&self, a: Option<&A>, c: usize, dst: &mut Codes32) {
        let Some(a) = a else {
            for kg in 0..QK / 4 {
                dst.q[kg][c] = 0;
                dst.lanes[kg][c] = 0;
            }
            dst.corr[c] = 0;
            dst.d[c] = 0.0;
            dst.s[c] = 0.0;
            dst.df[c] = 0.0;
            dst.sf[c] = 0.0;
            return;
        };
        let qs = a.qs();
        for kg in 0..QK / 4 {
            let q = &qs[4 * kg..4 * kg + 4];
            dst.q[kg][c] = u32::from_le_bytes([q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8]);
            dst.lanes[kg][c] = -self.offset * q.iter().map(|&q| q as i32).sum::<i32>();
        }
        // The whole block's correction is its lanes' (negated).
        dst.corr[c] = -(0..QK / 4).map(|kg| dst.lanes[kg][c]).sum::<i32>();
        dst.df[c] = a.d().to_f32();
        dst.sf[c] = a.s().to_f32();
        dst.d[c] = dst.df[c] as f64;
        dst.s[c] = dst.sf[c] as f64;
    }

    unsafe fn block(
        &self,
        isa: Tiled,
        rows: &[Unpacked32; ROWS],
        codes: &Codes32,
        acc: &mut TileLanes,
        lane: usize,
    ) {
        // SAFETY: the caller checked the CPU features of `isa`.
        unsafe {
            if isa == Tiled::Avx2 {
                legacy_avx2(rows, codes, self.has_min(), acc, lane)
            } else {
                legacy_vnni(rows, codes, self.has_min(), acc, lane)
            }
        }
    }

    fn with_rows<R>(f: impl FnOnce(&mut Vec<[Unpacked32; ROWS]>) -> R) -> R {
        thread_local! {
            static BUF: RefCell<Vec<[Unpacked32; ROWS]>> = const { RefCell::new(Vec::new()) };
        }
        BUF.with_borrow_mut(f)
    }

    fn codes(i: &Interleaved) -> &Vec<Codes32> {
        &i.codes32
    }
    fn codes_mut(i: &mut Interleaved) -> &mut Vec<Codes32> {
        &mut i.codes32
    }
}

thread_local! {
    static ACC_BUF: RefCell<Vec<TileLanes>> = const { RefCell::new(Vec::new()) };
}

/// A prepared activation batch in the GEMM's interleaved form, made on the first product that
/// needs it and kept until the batch is prepared again (the Q, K and V projections, or the
/// gate and up projections, share one).
#[derive(Default)]
pub(super) struct Interleaved {
    /// Whether the vector of the batch's format holds the current batch.
    pub(super) valid: bool,
    codes: Vec<Codes>,
    codes32: Vec<Codes32>,
}

/// Interleaves `count` activation vectors of `nb` blocks each into groups of 16 (the last
/// group padded with zero activations): `codes[g * nb + i]`. Groups are spread over the pool.
fn interleave<F: Format + Sync>(
    f: &F,
    act: &[F::Act],
    nb: usize,
    count: usize,
    codes: &mut Vec<F::Codes>,
    parallel: bool,
) {
    let groups = count.div_ceil(COLS);
    if codes.len() < groups * nb {
        codes.resize(groups * nb, F::Codes::default());
    }
    let out = OutPtr(codes.as_mut_ptr());
    let fill = |g: usize| {
        // SAFETY: group g owns codes[g * nb..(g + 1) * nb], within the length ensured above.
        let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add(g * nb), nb) };
        let valid = COLS.min(count - g * COLS);
        for (i, dst) in dst.iter_mut().enumerate() {
            for c in 0..COLS {
                let a = (c < valid).then(|| &act[(g * COLS + c) * nb + i]);
                f.code(a, c, dst);
            }
        }
    };
    if parallel && groups > 1 && pool::threads() > 1 {
        pool::for_each(groups, fill);
    } else {
        (0..groups).for_each(fill);
    }
}

/// A batch's activations in the form its weight type's product takes.
pub(super) enum Acts<'a> {
    Q8K(&'a [BlockQ8K]),
    Q8_0(&'a [BlockQ8_0]),
    Q8_1(&'a [BlockQ8_1]),
}

/// Whether [`matmul`] handles weight type `ty` with instruction set `isa` for outputs of type
/// `T`. The f32 products of Q4_0, Q4_1, Q5_0 and Q8_0 keep llama.cpp's order (`llama_pair`),
/// whose tiled form needs AVX-512 VNNI.
pub(super) fn handles<T: FromF64>(ty: QuantType, isa: Tiled) -> bool {
    if f32_order::<T>(ty) {
        isa == Tiled::Vnni
    } else {
        supports(ty, isa)
    }
}

/// Whether a product of `ty` into `T` keeps the legacy types' f32 order.
fn f32_order<T: FromF64>(ty: QuantType) -> bool {
    !T::WIDE
        && matches!(
            ty,
            QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q5_0 | QuantType::Q8_0
        )
}

/// `y[b * rows + r] = dot(weight row r, activation b)` for weight type `ty` (see [`handles`]):
/// `dot64` (as T), or for the f32 products of Q4_0/Q4_1/Q5_0/Q8_0 their row kernels' f32 dot.
/// `act` holds `count` vectors of `cols` elements in the activation blocks of `ty`,
/// `interleaved` their interleaved form (made here when not valid). Splits the rows over the
/// calling thread's pool when `parallel`. The caller has checked the shapes and that this CPU
/// has the features of `isa` (AVX2, or AVX-512 F/BW/VL/VNNI).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul<T: FromF64>(
    isa: Tiled,
    ty: QuantType,
    weight: &[u8],
    rb: usize,
    rows: usize,
    cols: usize,
    act: Acts<'_>,
    count: usize,
    interleaved: &RwLock<Interleaved>,
    y: &mut [T],
    parallel: bool,
) {
    let p = Product {
        isa,
        weight,
        rb,
        rows,
        block: ty.block_bytes(),
        nb: cols / ty.block_elements(),
        count,
        parallel,
    };
    // SAFETY (both): passed on from the caller.
    let order = f32_order::<T>(ty);
    if let Some(y) = T::f32s(y).filter(|_| order) {
        unsafe {
            match act {
                Acts::Q8_0(a) => p.run_f32_order(&Legacy::<BlockQ8_0>::new(ty), a, interleaved, y),
                Acts::Q8_1(a) => p.run_f32_order(&Legacy::<BlockQ8_1>::new(ty), a, interleaved, y),
                Acts::Q8K(_) => unreachable!("tiled: {ty} is not a Q8_K-activated type"),
            }
        }
        return;
    }
    unsafe {
        match act {
            Acts::Q8K(a) => p.run(&KQuant::new(ty), a, interleaved, y),
            Acts::Q8_0(a) => p.run(&Legacy::<BlockQ8_0>::new(ty), a, interleaved, y),
            Acts::Q8_1(a) => p.run(&Legacy::<BlockQ8_1>::new(ty), a, interleaved, y),
        }
    }
}

/// One product's shape.
struct Product<'w> {
    isa: Tiled,
    weight: &'w [u8],
    /// Bytes per weight row, per block.
    rb: usize,
    block: usize,
    rows: usize,
    /// Blocks per row.
    nb: usize,
    count: usize,
    parallel: bool,
}

impl Product<'_> {
    /// The batch's interleaved activations, made under the write lock by the first product
    /// that needs them; read by any number at once.
    fn interleaved<'i, F: Format + Sync>(
        &self,
        f: &F,
        act: &[F::Act],
        interleaved: &'i RwLock<Interleaved>,
    ) -> std::sync::RwLockReadGuard<'i, Interleaved> {
        let (nb, count) = (self.nb, self.count);
        if !interleaved
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .valid
        {
            let mut w = interleaved.write().unwrap_or_else(PoisonError::into_inner);
            if !w.valid {
                let codes = F::codes_mut(&mut w);
                interleave(f, &act[..count * nb], nb, count, codes, self.parallel);
                w.valid = true;
            }
        }
        interleaved.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Unpacks tile `tile` (rows 8·tile.., `buf[i]`: block i) and zeroes the padding rows of a
    /// last, partial tile (every field a product reads is rewritten, so a buffer is reused as
    /// is); returns its first row and its number of rows.
    fn unpack_tile<F: Format>(
        &self,
        f: &F,
        tile: usize,
        buf: &mut [[F::Unpacked; ROWS]],
    ) -> (usize, usize) {
        let (rb, block) = (self.rb, self.block);
        let r0 = tile * ROWS;
        let n = ROWS.min(self.rows - r0);
        for u in buf.iter_mut() {
            for pad in &mut u[n..] {
                *pad = F::Unpacked::default();
            }
        }
        for t in 0..n {
            let row = &self.weight[(r0 + t) * rb..(r0 + t + 1) * rb];
            for (i, u) in buf.iter_mut().enumerate() {
                f.unpack(&row[i * block..(i + 1) * block], &mut u[t]);
            }
        }
        (r0, n)
    }

    /// f32 products of a 32-element type in the row kernels' order (`llama_pair`).
    ///
    /// # Safety
    /// As [`matmul`].
    unsafe fn run_f32_order<A: Q8Block>(
        &self,
        f: &Legacy<A>,
        act: &[A],
        interleaved: &RwLock<Interleaved>,
        y: &mut [f32],
    ) {
        let (nb, count, rows) = (self.nb, self.count, self.rows);
        let guard = self.interleaved(f, act, interleaved);
        let codes = &guard.codes32[..];
        let groups = count.div_ceil(COLS);
        let out = OutPtr(y.as_mut_ptr());
        let min = f.has_min();
        let run = |tile: usize| {
            Legacy::<A>::with_rows(|buf| {
                if buf.len() < nb {
                    buf.resize(nb, [Unpacked32::default(); ROWS]);
                }
                let buf = &mut buf[..nb];
                let (r0, n) = self.unpack_tile(f, tile, buf);
                for g in 0..groups {
                    let group = &codes[g * nb..(g + 1) * nb];
                    for t0 in (0..n).step_by(2) {
                        // SAFETY: the caller checked the CPU features (AVX-512 VNNI).
                        let pair = unsafe { llama_pair(buf, t0, group, min) };
                        for (r, sums) in pair.iter().enumerate().take(n - t0) {
                            for (c, &v) in sums.iter().enumerate().take(count - g * COLS) {
                                let b = g * COLS + c;
                                // SAFETY: b < count, r0 + t0 + r < rows; tiles own their rows.
                                unsafe { *out.get().add(b * rows + r0 + t0 + r) = v };
                            }
                        }
                    }
                }
            })
        };
        let tiles = rows.div_ceil(ROWS);
        if self.parallel && pool::threads() > 1 && tiles > 1 {
            pool::for_each(tiles, run);
        } else {
            (0..tiles).for_each(run);
        }
    }

    /// # Safety
    /// As [`matmul`].
    unsafe fn run<F: Format + Sync, T: FromF64>(
        &self,
        f: &F,
        act: &[F::Act],
        interleaved: &RwLock<Interleaved>,
        y: &mut [T],
    ) {
        let Product {
            isa,
            rows,
            nb,
            count,
            parallel,
            ..
        } = *self;
        let guard = self.interleaved(f, act, interleaved);
        let codes = &F::codes(&guard)[..];
        let groups = count.div_ceil(COLS);
        let out = OutPtr(y.as_mut_ptr());
        let tiles = rows.div_ceil(ROWS);
        let run = |tile: usize| {
            F::with_rows(|buf| {
                // Every field a product reads is rewritten by `unpack` (rows < n) or zeroed here
                // (the padding rows of a last, partial tile), so the buffer is reused as is.
                if buf.len() < nb {
                    buf.resize(nb, [F::Unpacked::default(); ROWS]);
                }
                let buf = &mut buf[..nb];
                let (r0, n) = self.unpack_tile(f, tile, buf);
                // The blocks go in chunks, each chunk through every group of activations, so
                // that the chunk's interleaved activations (all groups) stay in L2 while the
                // tile's rows use them; each (row, activation) still adds its blocks in order,
                // into the f64 lanes kept per group.
                ACC_BUF.with_borrow_mut(|acc| {
                    acc.clear();
                    acc.resize(groups, [[[0f64; COLS]; 4]; ROWS]);
                    let mut i0 = 0;
                    while i0 < nb {
                        let i1 = (i0 + F::CHUNK).min(nb);
                        for (g, acc) in acc.iter_mut().enumerate() {
                            for i in i0..i1 {
                                // SAFETY: the caller checked the CPU features of `isa`.
                                unsafe { f.block(isa, &buf[i], &codes[g * nb + i], acc, i % 4) };
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
