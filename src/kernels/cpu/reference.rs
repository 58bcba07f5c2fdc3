//! Scalar reference kernels reproducing ggml's arithmetic:
//! dequantization (ggml-quants.c `dequantize_row_*`), activation quantization
//! (`quantize_row_q8_0_ref`, `quantize_row_q8_1_ref`, `quantize_row_q8_K_ref`),
//! weight quantization (the `quantize_row_*_ref` encoders, no importance matrix) and the
//! generic `ggml_vec_dot_*` dot products (integer sums per block, then float scaling).

#![allow(clippy::needless_range_loop)] // index loops mirror ggml's C code

use half::{bf16, f16};

use super::blocks::*;

// ---------------------------------------------------------------------------------------------
// helpers

/// ggml's `nearest_int`: round to nearest, ties to even, via the 1.5*2^23 trick (|x| <= 2^22).
#[inline(always)]
pub fn nearest_int(fval: f32) -> i32 {
    debug_assert!(fval.abs() <= 4194303.0);
    let val = fval + 12582912.0;
    (val.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// ggml `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block.
#[inline(always)]
pub fn get_scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// All 8 scales and 8 mins of a Q4_K/Q5_K block.
#[inline(always)]
pub fn unpack_scales_mins_k4(q: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..8 {
        let (s, m) = get_scale_min_k4(j, q);
        sc[j] = s;
        mn[j] = m;
    }
    (sc, mn)
}

#[inline(always)]
fn f16_at(bytes: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32()
}
#[inline(always)]
fn bf16_at(bytes: &[u8], i: usize) -> f32 {
    bf16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32()
}
#[inline(always)]
fn f32_at(bytes: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([
        bytes[4 * i],
        bytes[4 * i + 1],
        bytes[4 * i + 2],
        bytes[4 * i + 3],
    ])
}

/// Packs 6-bit scales/mins of 8 sub-blocks the way Q4_K/Q5_K store them.
fn pack_scales_mins_k4(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        let (l, m) = (ls[j].min(63), lm[j].min(63));
        if j < 4 {
            s[j] = l;
            s[j + 4] = m;
        } else {
            s[j + 4] = (l & 0xF) | ((m & 0xF) << 4);
            s[j - 4] |= (l >> 4) << 6;
            s[j] |= (m >> 4) << 6;
        }
    }
    s
}

// ---------------------------------------------------------------------------------------------
// levels and scales of the types added after v0.1 (shared by dequantization and the dots)

/// The 256 2-bit fields of a Q2_K/Q3_K `qs` array in element order: element `128 n + 32 j + l`
/// is bits `2j..2j+2` of `qs[32 n + l]`.
#[inline(always)]
pub fn levels_2bit(qs: &[u8; QK_K / 4]) -> [u8; QK_K] {
    let mut out = [0u8; QK_K];
    for e in 0..QK_K {
        let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
        out[e] = (qs[32 * n + l] >> (2 * j)) & 3;
    }
    out
}

/// Q3_K levels -4..=3: the 2-bit field minus 4 unless the element's `hmask` bit is set.
#[inline(always)]
pub fn q3_k_levels(b: &BlockQ3K) -> [i8; QK_K] {
    let lo = levels_2bit(&b.qs);
    let mut out = [0i8; QK_K];
    for e in 0..QK_K {
        let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
        let high = (b.hmask[l] >> (4 * n + j)) & 1;
        out[e] = lo[e] as i8 - if high != 0 { 0 } else { 4 };
    }
    out
}

/// The 16 Q3_K sub-block scales (6-bit, minus 32): low nibbles of bytes 0..8 are scales 0..8
/// and their high nibbles 8..16; byte 8 + (k % 4) holds the top 2 bits of scale k at bit 2(k / 4).
/// (Four bytes at a time, as ggml's `dequantize_row_q3_K` unpacks them.)
#[inline(always)]
pub fn q3_k_scales(s: &[u8; 12]) -> [i8; 16] {
    const LOW: u32 = 0x0f0f_0f0f;
    const HIGH: u32 = 0x0303_0303;
    let word = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (a0, a1, tmp) = (word(0), word(1), word(2));
    let packed = [
        (a0 & LOW) | ((tmp & HIGH) << 4),
        (a1 & LOW) | (((tmp >> 2) & HIGH) << 4),
        ((a0 >> 4) & LOW) | (((tmp >> 4) & HIGH) << 4),
        ((a1 >> 4) & LOW) | (((tmp >> 6) & HIGH) << 4),
    ];
    let mut out = [0i8; 16];
    for (k, o) in out.iter_mut().enumerate() {
        *o = (packed[k / 4] >> (8 * (k % 4))) as u8 as i8 - 32;
    }
    out
}

/// The 8 IQ4_XS sub-block scales (6-bit, minus 32).
#[inline(always)]
pub fn iq4_xs_scales(b: &BlockIQ4XS) -> [i8; 8] {
    let h = u16::from_le_bytes(b.scales_h);
    let mut out = [0i8; 8];
    for ib in 0..8 {
        let low = (b.scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF;
        let high = ((h >> (2 * ib)) & 3) as u8;
        out[ib] = (low | (high << 4)) as i8 - 32;
    }
    out
}

/// 32 table levels from 16 bytes of nibble indices (low nibbles first, then high).
#[inline(always)]
pub fn table_levels(qs: &[u8], table: &[i8; 16]) -> [i8; QK] {
    let mut out = [0i8; QK];
    for j in 0..QK / 2 {
        out[j] = table[(qs[j] & 0xF) as usize];
        out[j + QK / 2] = table[(qs[j] >> 4) as usize];
    }
    out
}

/// Q5_0/Q5_1 unsigned 5-bit levels 0..=31: nibble plus bit j of `qh` (elements 0..16) or
/// bit j + 16 (elements 16..32) as bit 4.
#[inline(always)]
pub fn q5_levels(qs: &[u8; QK / 2], qh: [u8; 4]) -> [u8; QK] {
    let qh = u32::from_le_bytes(qh);
    let mut out = [0u8; QK];
    for j in 0..QK / 2 {
        out[j] = (qs[j] & 0xF) | ((((qh >> j) & 1) << 4) as u8);
        out[j + QK / 2] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) << 4) as u8);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// dequantization

/// Scalar dequantization of `dst.len()` elements of type `ty` from `src`.
///
/// Panics if `dst.len()` is not a whole number of blocks or `src` is too short.
pub fn dequantize_row(ty: QuantType, src: &[u8], dst: &mut [f32]) {
    let n = dst.len();
    let bytes = ty
        .row_bytes(n)
        .unwrap_or_else(|| panic!("{n} elements is not a whole number of {ty} blocks"));
    assert!(
        src.len() >= bytes,
        "source has {} bytes, {bytes} needed for {n} {ty} elements",
        src.len()
    );
    let src = &src[..bytes];
    match ty {
        QuantType::F32 => {
            for (i, y) in dst.iter_mut().enumerate() {
                *y = f32_at(src, i);
            }
        }
        QuantType::F16 => {
            for (i, y) in dst.iter_mut().enumerate() {
                *y = f16_at(src, i);
            }
        }
        QuantType::BF16 => {
            for (i, y) in dst.iter_mut().enumerate() {
                *y = bf16_at(src, i);
            }
        }
        QuantType::Q4_0 => {
            for (b, y) in as_blocks::<BlockQ4_0>(src)
                .iter()
                .zip(dst.chunks_exact_mut(QK))
            {
                let d = b.d.to_f32();
                for j in 0..QK / 2 {
                    y[j] = ((b.qs[j] & 0xF) as i32 - 8) as f32 * d;
                    y[j + QK / 2] = ((b.qs[j] >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        QuantType::Q4_1 => {
            for (b, y) in as_blocks::<BlockQ4_1>(src)
                .iter()
                .zip(dst.chunks_exact_mut(QK))
            {
                let d = b.d.to_f32();
                let m = b.m.to_f32();
                for j in 0..QK / 2 {
                    y[j] = (b.qs[j] & 0xF) as f32 * d + m;
                    y[j + QK / 2] = (b.qs[j] >> 4) as f32 * d + m;
                }
            }
        }
        QuantType::Q5_0 => {
            for (b, y) in as_blocks::<BlockQ5_0>(src)
                .iter()
                .zip(dst.chunks_exact_mut(QK))
            {
                let d = b.d.to_f32();
                let qh = u32::from_le_bytes(b.qh);
                for j in 0..QK / 2 {
                    let h0 = ((qh >> j) & 1) << 4;
                    let h1 = ((qh >> (j + 16)) & 1) << 4;
                    y[j] = (((b.qs[j] & 0xF) as u32 | h0) as i32 - 16) as f32 * d;
                    y[j + QK / 2] = (((b.qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
                }
            }
        }
        QuantType::Q8_0 => {
            for (b, y) in as_blocks::<BlockQ8_0>(src)
                .iter()
                .zip(dst.chunks_exact_mut(QK))
            {
                let d = b.d.to_f32();
                for j in 0..QK {
                    y[j] = b.qs[j] as f32 * d;
                }
            }
        }
        QuantType::Q4_K => {
            for (b, y) in as_blocks::<BlockQ4K>(src)
                .iter()
                .zip(dst.chunks_exact_mut(QK_K))
            {
                let d = b.d.to_f32();
                let min = b.dmin.to_f32();
                for c in 0..4 {
                    let (sc1, m1) = get_scale_min_k4(2 * c, &b.scales);
                    let (sc2, m2) = get_scale_min_k4(2 * c + 1, &b.scales);
                    let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
                    let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
                    let q = &b.qs[32 * c..32 * c + 32];
                    let y = &mut y[64 * c..64 * c + 64];
                    for l in 0..32 {
                        y[l] = d1 * (q[l] & 0xF) as f32 - m1;
                        y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
                    }
                }
            }
        }
        QuantType::Q5_K => {
            for (b, y) in as_blocks::<BlockQ5K>(src)
                .iter()
                .zip(dst.chunks_exact_mut(QK_K))
            {
                let d = b.d.to_f32();
                let min = b.dmin.to_f32();
                for c in 0..4 {
                    let (sc1, m1) = get_scale_min_k4(2 * c, &b.scales);
                    let (sc2, m2) = get_scale_min_k4(2 * c + 1, &b.scales);
                    let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
                    let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
                    let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
                    let q = &b.qs[32 * c..32 * c + 32];
                    let y = &mut y[64 * c..64 * c + 64];
                    for l in 0..32 {
                        let h1 = if b.qh[l] & u1 != 0 { 16 } else { 0 };
                        let h2 = if b.qh[l] & u2 != 0 { 16 } else { 0 };
                        y[l] = d1 * ((q[l] & 0xF) + h1) as f32 - m1;
                        y[l + 32] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
                    }
                }
            }
        }
        QuantType::Q6_K => {
            for (b, y) in as_blocks::<BlockQ6K>(src)
                .iter()
                .zip(dst.chunks_exact_mut(QK_K))
            {
                let d = b.d.to_f32();
                for h in 0..2 {
                    let ql = &b.ql[64 * h..64 * h + 64];
                    let qh = &b.qh[32 * h..32 * h + 32];
                    let sc = &b.scales[8 * h..8 * h + 8];
                    let y = &mut y[128 * h..128 * h + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * sc[is] as f32 * q1 as f32;
                        y[l + 32] = d * sc[is + 2] as f32 * q2 as f32;
                        y[l + 64] = d * sc[is + 4] as f32 * q3 as f32;
                        y[l + 96] = d * sc[is + 6] as f32 * q4 as f32;
                    }
                }
            }
        }
        QuantType::Q5_1 => {
            for (b, y) in as_blocks::<BlockQ5_1>(src)
                .iter()
                .zip(dst.chunks_exact_mut(QK))
            {
                let (d, m) = (b.d.to_f32(), b.m.to_f32());
                for (v, q) in y.iter_mut().zip(q5_levels(&b.qs, b.qh)) {
                    *v = q as f32 * d + m;
                }
            }
        }
        QuantType::Q2_K => {
            for (b, y) in as_blocks::<BlockQ2K>(src)
                .iter()
                .zip(dst.chunks_exact_mut(QK_K))
            {
                let (d, min) = (b.d.to_f32(), b.dmin.to_f32());
                let q = levels_2bit(&b.qs);
                for (e, v) in y.iter_mut().enumerate() {
                    let sc = b.scales[e / 16];
                    let (dl, ml) = (d * (sc & 0xF) as f32, min * (sc >> 4) as f32);
                    *v = dl * q[e] as f32 - ml;
                }
            }
        }
        QuantType::Q3_K => {
            for (b, y) in as_blocks::<BlockQ3K>(src)
                .iter()
                .zip(dst.chunks_exact_mut(QK_K))
            {
                let d = b.d.to_f32();
                let (q, sc) = (q3_k_levels(b), q3_k_scales(&b.scales));
                for (e, v) in y.iter_mut().enumerate() {
                    *v = d * sc[e / 16] as f32 * q[e] as f32;
                }
            }
        }
        QuantType::IQ4_NL => {
            for (b, y) in as_blocks::<BlockIQ4NL>(src)
                .iter()
                .zip(dst.chunks_exact_mut(QK))
            {
                let d = b.d.to_f32();
                for (v, q) in y.iter_mut().zip(table_levels(&b.qs, &KVALUES_IQ4NL)) {
                    *v = d * q as f32;
                }
            }
        }
        QuantType::IQ4_XS => {
            for (b, y) in as_blocks::<BlockIQ4XS>(src)
                .iter()
                .zip(dst.chunks_exact_mut(QK_K))
            {
                let d = b.d.to_f32();
                let sc = iq4_xs_scales(b);
                for (ib, y) in y.chunks_exact_mut(QK).enumerate() {
                    let dl = d * sc[ib] as f32;
                    let q = table_levels(&b.qs[16 * ib..16 * ib + 16], &KVALUES_IQ4NL);
                    for (v, q) in y.iter_mut().zip(q) {
                        *v = dl * q as f32;
                    }
                }
            }
        }
        QuantType::MXFP4 => {
            for (b, y) in as_blocks::<BlockMXFP4>(src)
                .iter()
                .zip(dst.chunks_exact_mut(QK))
            {
                let d = e8m0_half(b.e);
                for (v, q) in y.iter_mut().zip(table_levels(&b.qs, &KVALUES_MXFP4)) {
                    *v = q as f32 * d;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// activation quantization (ggml *_ref rounding)

/// `quantize_row_q8_0_ref`: d = amax/127, q = roundf(x/d) (half away from zero).
pub fn quantize_row_q8_0(x: &[f32], y: &mut [BlockQ8_0]) {
    assert_eq!(
        x.len(),
        y.len() * QK,
        "q8_0: {} values for {} blocks",
        x.len(),
        y.len()
    );
    for (xb, b) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        // As llama.cpp's x86 quantizer: 127/amax and ties to even (the `_ref` code uses 1/d and
        // rounds ties away), so the activations match the golden runs bit for bit.
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        b.d = F16Bytes::from_f32(d);
        for (q, &v) in b.qs.iter_mut().zip(xb) {
            *q = (v * id).round_ties_even() as i8;
        }
    }
}

/// `quantize_row_q8_1_ref`: as Q8_0, plus s = f16(d * sum(q)).
pub fn quantize_row_q8_1(x: &[f32], y: &mut [BlockQ8_1]) {
    assert_eq!(
        x.len(),
        y.len() * QK,
        "q8_1: {} values for {} blocks",
        x.len(),
        y.len()
    );
    for (xb, b) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        // As llama.cpp's x86 quantizer: 127/amax and ties to even (the `_ref` code uses 1/d and
        // rounds ties away), so the activations match the golden runs bit for bit.
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        b.d = F16Bytes::from_f32(d);
        let mut sum = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(xb) {
            *q = (v * id).round_ties_even() as i8;
            sum += *q as i32;
        }
        b.s = F16Bytes::from_f32(sum as f32 * d);
    }
}

/// `quantize_row_q8_K_ref`: per 256 values, iscale = -127/max where max is the signed value of
/// largest magnitude, q = min(127, nearest_int(iscale*x)), d = 1/iscale, bsums per 16.
pub fn quantize_row_q8_k(x: &[f32], y: &mut [BlockQ8K]) {
    assert_eq!(
        x.len(),
        y.len() * QK_K,
        "q8_K: {} values for {} blocks",
        x.len(),
        y.len()
    );
    for (xb, b) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        let mut max = 0.0f32;
        let mut amax = 0.0f32;
        for &v in xb {
            let av = v.abs();
            if av > amax {
                amax = av;
                max = v;
            }
        }
        if amax == 0.0 {
            b.d = 0.0;
            b.qs = [0; QK_K];
            b.bsums = [0; QK_K / 16];
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in b.qs.iter_mut().zip(xb) {
            *q = nearest_int(iscale * v).min(127) as i8;
        }
        for (j, s) in b.bsums.iter_mut().enumerate() {
            *s = b.qs[16 * j..16 * j + 16]
                .iter()
                .map(|&q| q as i32)
                .sum::<i32>() as i16;
        }
        b.d = 1.0 / iscale;
    }
}

// ---------------------------------------------------------------------------------------------
// weight quantization (ggml quantize_row_*_ref, no importance matrix)

/// `quantize_row_q4_0_ref`.
pub fn quantize_row_q4_0(x: &[f32], y: &mut [BlockQ4_0]) {
    assert_eq!(x.len(), y.len() * QK);
    for (xb, b) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in xb {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = F16Bytes::from_f32(d);
        for j in 0..QK / 2 {
            let x0 = ((xb[j] * id + 8.5) as i8).min(15) as u8;
            let x1 = ((xb[j + QK / 2] * id + 8.5) as i8).min(15) as u8;
            b.qs[j] = x0 | (x1 << 4);
        }
    }
}

/// `quantize_row_q4_1_ref`.
pub fn quantize_row_q4_1(x: &[f32], y: &mut [BlockQ4_1]) {
    assert_eq!(x.len(), y.len() * QK);
    for (xb, b) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let (min, max) = min_max(xb);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = F16Bytes::from_f32(d);
        b.m = F16Bytes::from_f32(min);
        for j in 0..QK / 2 {
            let x0 = (((xb[j] - min) * id + 0.5) as i8).min(15) as u8;
            let x1 = (((xb[j + QK / 2] - min) * id + 0.5) as i8).min(15) as u8;
            b.qs[j] = x0 | (x1 << 4);
        }
    }
}

/// `quantize_row_q5_0_ref`.
pub fn quantize_row_q5_0(x: &[f32], y: &mut [BlockQ5_0]) {
    assert_eq!(x.len(), y.len() * QK);
    for (xb, b) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in xb {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = F16Bytes::from_f32(d);
        let levels = std::array::from_fn(|j| ((xb[j] * id + 16.5) as i8).min(31) as u8);
        (b.qs, b.qh) = pack_q5(&levels);
    }
}

/// Q5_0/Q5_1 storage of 32 levels 0..=31: the low nibbles in `qs` (elements 0..16 low, 16..32
/// high) and the fifth bits in `qh` (bit j for element j); the inverse of [`q5_levels`].
fn pack_q5(levels: &[u8; QK]) -> ([u8; QK / 2], [u8; 4]) {
    let mut qs = [0u8; QK / 2];
    let mut qh = 0u32;
    for j in 0..QK / 2 {
        let (x0, x1) = (levels[j], levels[j + QK / 2]);
        qs[j] = (x0 & 0xF) | ((x1 & 0xF) << 4);
        qh |= ((x0 as u32 & 0x10) >> 4) << j;
        qh |= ((x1 as u32 & 0x10) >> 4) << (j + QK / 2);
    }
    (qs, qh.to_le_bytes())
}

/// Smallest and largest value, as ggml's `quantize_row_q4_1_ref` / `q5_1_ref` find them.
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        min = if v < min { v } else { min };
        max = if v > max { v } else { max };
    }
    (min, max)
}

/// ggml `make_qkx2_quants`: asymmetric (scale, min) fit of `x` to levels 0..=nmax.
/// Returns (scale, -min) and the levels in `l`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..n].fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let li = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = li as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        let diff = if use_mad { diff.abs() } else { diff * diff };
        best_error += weights[i] * diff;
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let li = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = li as u8;
            let lf = li as f32;
            let w = weights[i];
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let dd = sum_w * sum_l2 - sum_l * sum_l;
        if dd > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / dd;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / dd;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                let diff = if use_mad { diff.abs() } else { diff * diff };
                cur_error += weights[i] * diff;
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Shared body of `quantize_row_q4_K_ref` / `quantize_row_q5_K_ref`: returns d, dmin, packed
/// scales and the per-element levels (0..=nmax).
fn quantize_k4_common(
    x: &[f32],
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (F16Bytes, F16Bytes, [u8; 12], [u8; QK_K]) {
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 32];
    let mut weights = [0f32; 32];
    let mut mins = [0f32; 8];
    let mut scales = [0f32; 8];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let sum_x2: f32 = xs.iter().fold(0.0, |a, v| a + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(
            nmax,
            xs,
            &weights,
            &mut l[32 * j..32 * j + 32],
            &mut laux,
            rmin,
            rdelta,
            nstep,
            false,
        );
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        // C assigns the int to uint8_t (wraps) before MIN(63, .); values are small and >= 0 here.
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    let packed = pack_scales_mins_k4(&ls, &lm);
    let d = F16Bytes::from_f32(max_scale / 63.0);
    let dmin = F16Bytes::from_f32(max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = get_scale_min_k4(j, &packed);
        let dj = d.to_f32() * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    (d, dmin, packed, l)
}

/// `quantize_row_q4_K_ref`.
pub fn quantize_row_q4_k(x: &[f32], y: &mut [BlockQ4K]) {
    assert_eq!(x.len(), y.len() * QK_K);
    for (xb, b) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        let (d, dmin, scales, l) = quantize_k4_common(xb, 15, -1.0, 0.1, 20);
        b.d = d;
        b.dmin = dmin;
        b.scales = scales;
        for c in 0..4 {
            for i in 0..32 {
                b.qs[32 * c + i] = l[64 * c + i] | (l[64 * c + i + 32] << 4);
            }
        }
    }
}

/// `quantize_row_q5_K_ref`.
pub fn quantize_row_q5_k(x: &[f32], y: &mut [BlockQ5K]) {
    assert_eq!(x.len(), y.len() * QK_K);
    for (xb, b) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        let (d, dmin, scales, l) = quantize_k4_common(xb, 31, -0.5, 0.1, 15);
        b.d = d;
        b.dmin = dmin;
        b.scales = scales;
        b.qh = [0; QK_K / 8];
        for c in 0..4 {
            let (m1, m2) = (1u8 << (2 * c), 2u8 << (2 * c));
            for i in 0..32 {
                let mut l1 = l[64 * c + i];
                if l1 > 15 {
                    l1 -= 16;
                    b.qh[i] |= m1;
                }
                let mut l2 = l[64 * c + i + 32];
                if l2 > 15 {
                    l2 -= 16;
                    b.qh[i] |= m2;
                }
                b.qs[32 * c + i] = l1 | (l2 << 4);
            }
        }
    }
}

/// ggml `make_qx_quants` with rmse_type = 1 and no importance weights: symmetric fit to
/// levels -nmax..nmax-1 stored as l + nmax. Returns the scale.
fn make_qx_quants_rmse1(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let n = x.len();
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < 1e-15 {
        l[..n].fill(0);
        return 0.0;
    }
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for i in 0..n {
        let li = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        l[i] = (li + nmax) as i8;
        let w = x[i] * x[i];
        sumlx += w * x[i] * li as f32;
        suml2 += w * li as f32 * li as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for i in 0..n {
            let li = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
            let w = x[i] * x[i];
            sumlx += w * x[i] * li as f32;
            suml2 += w * li as f32 * li as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for i in 0..n {
                let li = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
                l[i] = (li + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// `quantize_row_q6_K_ref`.
pub fn quantize_row_q6_k(x: &[f32], y: &mut [BlockQ6K]) {
    assert_eq!(x.len(), y.len() * QK_K);
    for (xb, b) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        let mut l = [0i8; QK_K];
        let mut scales = [0f32; 16];
        let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
        for ib in 0..16 {
            let s = make_qx_quants_rmse1(
                32,
                &xb[16 * ib..16 * ib + 16],
                &mut l[16 * ib..16 * ib + 16],
            );
            scales[ib] = s;
            if s.abs() > max_abs_scale {
                max_abs_scale = s.abs();
                max_scale = s;
            }
        }
        *b = BlockQ6K::default();
        if max_abs_scale < 1e-15 {
            continue;
        }
        let iscale = -128.0 / max_scale;
        b.d = F16Bytes::from_f32(1.0 / iscale);
        for ib in 0..16 {
            b.scales[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
        }
        for j in 0..16 {
            let d = b.d.to_f32() * b.scales[j] as f32;
            if d == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let li = nearest_int(xb[16 * j + ii] / d).clamp(-32, 31);
                l[16 * j + ii] = (li + 32) as i8;
            }
        }
        for h in 0..2 {
            let lh = &l[128 * h..128 * h + 128];
            for i in 0..32 {
                let q1 = lh[i] as u8;
                let q2 = lh[i + 32] as u8;
                let q3 = lh[i + 64] as u8;
                let q4 = lh[i + 96] as u8;
                b.ql[64 * h + i] = (q1 & 0xF) | ((q3 & 0xF) << 4);
                b.ql[64 * h + i + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
                b.qh[32 * h + i] =
                    (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
            }
        }
    }
}

/// `quantize_row_q5_1_ref`.
pub fn quantize_row_q5_1(x: &[f32], y: &mut [BlockQ5_1]) {
    assert_eq!(x.len(), y.len() * QK);
    for (xb, b) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let (min, max) = min_max(xb);
        let d = (max - min) / 31.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = F16Bytes::from_f32(d);
        b.m = F16Bytes::from_f32(min);
        let levels = std::array::from_fn(|j| ((xb[j] - min) * id + 0.5) as u8);
        (b.qs, b.qh) = pack_q5(&levels);
    }
}

/// Index of the table entry nearest to `v` (first of equals).
fn nearest_level(table: &[i8; 16], v: f32) -> u8 {
    let mut best = 0;
    for (i, &t) in table.iter().enumerate() {
        if (t as f32 - v).abs() < (table[best] as f32 - v).abs() {
            best = i;
        }
    }
    best as u8
}

/// Signed value of largest magnitude.
fn signed_max(x: &[f32]) -> f32 {
    x.iter()
        .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m })
}

/// Packs 32 table indices (elements 0..16 in the low nibbles).
fn pack_nibbles(idx: &[u8; QK], qs: &mut [u8]) {
    for j in 0..QK / 2 {
        qs[j] = idx[j] | (idx[j + QK / 2] << 4);
    }
}

/// Round-to-nearest IQ4_NL encoder: d maps the block's largest magnitude to level -127.
/// (llama.cpp's encoder also searches nearby scales; this one is for tests and synthetic files.)
pub fn quantize_row_iq4_nl(x: &[f32], y: &mut [BlockIQ4NL]) {
    assert_eq!(x.len(), y.len() * QK);
    for (xb, b) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let d = signed_max(xb) / -127.0;
        b.d = F16Bytes::from_f32(d);
        let id = if d != 0.0 { 1.0 / b.d.to_f32() } else { 0.0 };
        let idx: [u8; QK] = std::array::from_fn(|j| nearest_level(&KVALUES_IQ4NL, xb[j] * id));
        pack_nibbles(&idx, &mut b.qs);
    }
}

/// Round-to-nearest MXFP4 encoder: the shared exponent puts the largest magnitude in the top
/// binade of E2M1 (as ggml's `quantize_row_mxfp4_ref`), then each value takes the nearest level.
pub fn quantize_row_mxfp4(x: &[f32], y: &mut [BlockMXFP4]) {
    assert_eq!(x.len(), y.len() * QK);
    for (xb, b) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let e = if amax > 0.0 {
            (amax.log2().floor() as i32 - 2 + 127).clamp(0, 254) as u8
        } else {
            0
        };
        b.e = e;
        let id = 1.0 / e8m0_half(e);
        let idx: [u8; QK] = std::array::from_fn(|j| nearest_level(&KVALUES_MXFP4, xb[j] * id));
        pack_nibbles(&idx, &mut b.qs);
    }
}

/// Round-to-nearest Q2_K encoder: per 16 values an asymmetric (scale, min) fit, both quantized
/// to 4 bits against the super-block's d and dmin. (For tests and synthetic files.)
pub fn quantize_row_q2_k(x: &[f32], y: &mut [BlockQ2K]) {
    assert_eq!(x.len(), y.len() * QK_K);
    for (xb, b) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        let mut scale = [0f32; 16];
        let mut min = [0f32; 16];
        for k in 0..16 {
            let sub = &xb[16 * k..16 * k + 16];
            let lo = sub.iter().fold(0.0f32, |m, &v| m.min(v));
            let hi = sub.iter().fold(lo, |m, &v| m.max(v));
            scale[k] = (hi - lo) / 3.0;
            min[k] = -lo;
        }
        let d = scale.iter().fold(0.0f32, |m, &v| m.max(v)) / 15.0;
        let dmin = min.iter().fold(0.0f32, |m, &v| m.max(v)) / 15.0;
        b.d = F16Bytes::from_f32(d);
        b.dmin = F16Bytes::from_f32(dmin);
        let (d, dmin) = (b.d.to_f32(), b.dmin.to_f32());
        let mut q = [0u8; QK_K];
        for k in 0..16 {
            let ls = if d > 0.0 {
                nearest_int(scale[k] / d).clamp(0, 15)
            } else {
                0
            };
            let lm = if dmin > 0.0 {
                nearest_int(min[k] / dmin).clamp(0, 15)
            } else {
                0
            };
            b.scales[k] = ls as u8 | ((lm as u8) << 4);
            let (dl, ml) = (d * ls as f32, dmin * lm as f32);
            for e in 16 * k..16 * k + 16 {
                q[e] = if dl > 0.0 {
                    nearest_int((xb[e] + ml) / dl).clamp(0, 3) as u8
                } else {
                    0
                };
            }
        }
        b.qs = [0; QK_K / 4];
        for e in 0..QK_K {
            let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
            b.qs[32 * n + l] |= q[e] << (2 * j);
        }
    }
}

/// Round-to-nearest Q3_K encoder: per 16 values a symmetric scale, quantized to 6 bits
/// against the super-block's d. (For tests and synthetic files.)
pub fn quantize_row_q3_k(x: &[f32], y: &mut [BlockQ3K]) {
    assert_eq!(x.len(), y.len() * QK_K);
    for (xb, b) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        let scale: [f32; 16] = std::array::from_fn(|k| signed_max(&xb[16 * k..16 * k + 16]) / -4.0);
        let smax = signed_max(&scale);
        let d = smax / -32.0;
        b.d = F16Bytes::from_f32(d);
        let d = b.d.to_f32();
        b.scales = [0; 12];
        b.hmask = [0; QK_K / 8];
        b.qs = [0; QK_K / 4];
        for k in 0..16 {
            let ls = if d != 0.0 {
                nearest_int(scale[k] / d).clamp(-32, 31)
            } else {
                0
            };
            let u = (ls + 32) as u8;
            if k < 8 {
                b.scales[k] |= u & 0xF;
            } else {
                b.scales[k - 8] |= (u & 0xF) << 4;
            }
            b.scales[8 + k % 4] |= (u >> 4) << (2 * (k / 4));
            let dl = d * ls as f32;
            for e in 16 * k..16 * k + 16 {
                let q = if dl != 0.0 {
                    nearest_int(xb[e] / dl).clamp(-4, 3)
                } else {
                    0
                } + 4;
                let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
                b.qs[32 * n + l] |= ((q & 3) as u8) << (2 * j);
                b.hmask[l] |= (((q >> 2) & 1) as u8) << (4 * n + j);
            }
        }
    }
}

/// Round-to-nearest IQ4_XS encoder: per 32 values a scale mapping the largest magnitude to
/// level -127, quantized to 6 bits against the super-block's d. (For tests and synthetic files.)
pub fn quantize_row_iq4_xs(x: &[f32], y: &mut [BlockIQ4XS]) {
    assert_eq!(x.len(), y.len() * QK_K);
    for (xb, b) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        let scale: [f32; 8] =
            std::array::from_fn(|k| signed_max(&xb[32 * k..32 * k + 32]) / -127.0);
        let d = signed_max(&scale) / -32.0;
        b.d = F16Bytes::from_f32(d);
        let d = b.d.to_f32();
        b.scales_l = [0; QK_K / 64];
        let mut h = 0u16;
        for ib in 0..8 {
            let ls = if d != 0.0 {
                nearest_int(scale[ib] / d).clamp(-32, 31)
            } else {
                0
            };
            let u = (ls + 32) as u8;
            b.scales_l[ib / 2] |= (u & 0xF) << (4 * (ib % 2));
            h |= ((u >> 4) as u16) << (2 * ib);
            let dl = d * ls as f32;
            let id = if dl != 0.0 { 1.0 / dl } else { 0.0 };
            let sub = &xb[32 * ib..32 * ib + 32];
            let idx: [u8; QK] = std::array::from_fn(|j| nearest_level(&KVALUES_IQ4NL, sub[j] * id));
            pack_nibbles(&idx, &mut b.qs[16 * ib..16 * ib + 16]);
        }
        b.scales_h = h.to_le_bytes();
    }
}

/// Quantizes `x` (a whole number of blocks) into `dst` in the storage format of `ty`, using
/// ggml's reference encoders (what `llama-quantize` does without an importance matrix) for the
/// v0.1 types and Q5_1, and simple round-to-nearest encoders for Q2_K, Q3_K, IQ4_NL, IQ4_XS
/// and MXFP4 (valid blocks of those formats, less accurate than llama.cpp's searches).
/// F16/BF16 round to nearest even.
pub fn quantize_row(ty: QuantType, x: &[f32], dst: &mut [u8]) {
    let bytes = ty
        .row_bytes(x.len())
        .unwrap_or_else(|| panic!("{} elements is not a whole number of {ty} blocks", x.len()));
    assert_eq!(
        dst.len(),
        bytes,
        "destination must be exactly {bytes} bytes"
    );
    match ty {
        QuantType::F32 => {
            for (d, v) in dst.chunks_exact_mut(4).zip(x) {
                d.copy_from_slice(&v.to_le_bytes());
            }
        }
        QuantType::F16 => {
            for (d, v) in dst.chunks_exact_mut(2).zip(x) {
                d.copy_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        QuantType::BF16 => {
            for (d, v) in dst.chunks_exact_mut(2).zip(x) {
                d.copy_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        QuantType::Q4_0 => quantize_row_q4_0(x, as_blocks_mut(dst)),
        QuantType::Q4_1 => quantize_row_q4_1(x, as_blocks_mut(dst)),
        QuantType::Q5_0 => quantize_row_q5_0(x, as_blocks_mut(dst)),
        QuantType::Q8_0 => quantize_row_q8_0(x, as_blocks_mut(dst)),
        QuantType::Q4_K => quantize_row_q4_k(x, as_blocks_mut(dst)),
        QuantType::Q5_K => quantize_row_q5_k(x, as_blocks_mut(dst)),
        QuantType::Q6_K => quantize_row_q6_k(x, as_blocks_mut(dst)),
        QuantType::Q5_1 => quantize_row_q5_1(x, as_blocks_mut(dst)),
        QuantType::Q2_K => quantize_row_q2_k(x, as_blocks_mut(dst)),
        QuantType::Q3_K => quantize_row_q3_k(x, as_blocks_mut(dst)),
        QuantType::IQ4_NL => quantize_row_iq4_nl(x, as_blocks_mut(dst)),
        QuantType::IQ4_XS => quantize_row_iq4_xs(x, as_blocks_mut(dst)),
        QuantType::MXFP4 => quantize_row_mxfp4(x, as_blocks_mut(dst)),
    }
}

// ---------------------------------------------------------------------------------------------
// scalar dot products (ggml_vec_dot_*_generic)

/// `ggml_vec_dot_f32` generic: f32 products accumulated in f64.
pub fn vec_dot_f32(w: &[u8], a: &[f32]) -> f32 {
    assert_eq!(w.len(), a.len() * 4);
    let mut s = 0.0f64;
    for (i, &x) in a.iter().enumerate() {
        s += (f32_at(w, i) * x) as f64;
    }
    s as f32
}

/// `ggml_vec_dot_f16` generic.
pub fn vec_dot_f16(w: &[u8], a: &[f16]) -> f32 {
    assert_eq!(w.len(), a.len() * 2);
    let mut s = 0.0f64;
    for (i, x) in a.iter().enumerate() {
        s += (f16_at(w, i) * x.to_f32()) as f64;
    }
    s as f32
}

/// `ggml_vec_dot_bf16` generic.
pub fn vec_dot_bf16(w: &[u8], a: &[bf16]) -> f32 {
    assert_eq!(w.len(), a.len() * 2);
    let mut s = 0.0f64;
    for (i, x) in a.iter().enumerate() {
        s += (bf16_at(w, i) * x.to_f32()) as f64;
    }
    s as f32
}

pub fn vec_dot_q4_0_q8_0(x: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32 {
    assert_eq!(x.len(), y.len());
    let mut sumf = 0.0f32;
    for (bx, by) in x.iter().zip(y) {
        let (mut s0, mut s1) = (0i32, 0i32);
        for j in 0..QK / 2 {
            s0 += ((bx.qs[j] & 0xF) as i32 - 8) * by.qs[j] as i32;
            s1 += ((bx.qs[j] >> 4) as i32 - 8) * by.qs[j + QK / 2] as i32;
        }
        sumf += (s0 + s1) as f32 * bx.d.to_f32() * by.d.to_f32();
    }
    sumf
}

pub fn vec_dot_q4_1_q8_1(x: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
    assert_eq!(x.len(), y.len());
    let mut sumf = 0.0f32;
    for (bx, by) in x.iter().zip(y) {
        let (mut s0, mut s1) = (0i32, 0i32);
        for j in 0..QK / 2 {
            s0 += (bx.qs[j] & 0xF) as i32 * by.qs[j] as i32;
            s1 += (bx.qs[j] >> 4) as i32 * by.qs[j + QK / 2] as i32;
        }
        sumf += (bx.d.to_f32() * by.d.to_f32()) * (s0 + s1) as f32 + bx.m.to_f32() * by.s.to_f32();
    }
    sumf
}

pub fn vec_dot_q5_0_q8_0(x: &[BlockQ5_0], y: &[BlockQ8_0]) -> f32 {
    assert_eq!(x.len(), y.len());
    let mut sumf = 0.0f32;
    for (bx, by) in x.iter().zip(y) {
        let qh = u32::from_le_bytes(bx.qh);
        let (mut s0, mut s1) = (0i32, 0i32);
        for j in 0..QK / 2 {
            let h0 = (((qh >> j) & 1) << 4) as i32;
            let h1 = (((qh >> (j + 16)) & 1) << 4) as i32;
            s0 += (((bx.qs[j] & 0xF) as i32 | h0) - 16) * by.qs[j] as i32;
            s1 += (((bx.qs[j] >> 4) as i32 | h1) - 16) * by.qs[j + QK / 2] as i32;
        }
        sumf += (bx.d.to_f32() * by.d.to_f32()) * (s0 + s1) as f32;
    }
    sumf
}

pub fn vec_dot_q8_0_q8_0(x: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    assert_eq!(x.len(), y.len());
    let mut sumf = 0.0f32;
    for (bx, by) in x.iter().zip(y) {
        let mut s = 0i32;
        for j in 0..QK {
            s += bx.qs[j] as i32 * by.qs[j] as i32;
        }
        sumf += s as f32 * (bx.d.to_f32() * by.d.to_f32());
    }
    sumf
}

/// Shared tail of the Q4_K/Q5_K generic dot: `a` holds the 256 unsigned levels.
#[inline(always)]
fn k4_block_sums(a: &[i8; QK_K], q8: &[i8; QK_K], scales: &[u8; 8], aux32: &mut [i32; 8]) {
    *aux32 = [0; 8];
    for j in 0..8 {
        let scale = scales[j] as i32;
        for k in 0..4 {
            let o = 32 * j + 8 * k;
            for l in 0..8 {
                aux32[l] += scale * (q8[o + l] as i32 * a[o + l] as i32);
            }
        }
    }
}

/// Scalar f32 dot with 8 independent accumulators (vectorizes without FMA contraction).
#[inline(always)]
/// Σ e^(x - max) over `row`, each exponential in f32, summed in f64.
pub fn sum_exp(row: &[f32], max: f32) -> f64 {
    row.iter().map(|&x| (x - max).exp() as f64).sum()
}

/// Turns attention scores into unnormalized weights `e^(s - max)` in place, with libm's expf
/// as llama.cpp's attention uses, and returns their sum (in order).
pub fn softmax_weights(scores: &mut [f32], max: f32) -> f32 {
    let mut sum = 0f32;
    for score in scores {
        *score = (*score - max).exp();
        sum += *score;
    }
    sum
}

/// One query row's attention over `n` positions of one KV head: `scores[t] = q·k_t *
/// scale`, a softmax over them, `out = Σ_t p_t v_t`. Row `t` of the keys and values starts at
/// `rows.at(t)`; `scores` holds at least `n` values of scratch. A finite `sink` is a logit with
/// no value that joins the softmax (gpt-oss's attention sinks); `-inf` is none.
///
/// # Safety
/// `k` and `v` hold every row `rows` places (`rows.fits(n, q.len(), ..)`), `out.len() ==
/// q.len()`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn attend(
    q: &[f16],
    k: *const f16,
    v: *const f16,
    rows: &super::Rows,
    n: usize,
    scale: f32,
    sink: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = q.len();
    let mut max = f32::NEG_INFINITY;
    for (t, score) in scores[..n].iter_mut().enumerate() {
        // SAFETY: within the bounds the caller guarantees.
        let key = unsafe { std::slice::from_raw_parts(k.add(rows.at(t)), hd) };
        let mut dot = 0f32;
        for (a, b) in q.iter().zip(key) {
            dot = a.to_f32().mul_add(b.to_f32(), dot);
        }
        *score = dot * scale;
        max = max.max(*score);
    }
    let max = max.max(sink);
    let sum = softmax_weights(&mut scores[..n], max) + (sink - max).exp();
    out.fill(0.0);
    for (t, &p) in scores[..n].iter().enumerate() {
        // SAFETY: as above.
        let value = unsafe { std::slice::from_raw_parts(v.add(rows.at(t)), hd) };
        axpy_f16(out, p, value);
    }
    for o in out.iter_mut() {
        *o /= sum;
    }
}

/// `acc[i] += w * v[i]` with one rounding (fused multiply-add), as the vector kernels do.
pub fn axpy_f16(acc: &mut [f32], w: f32, v: &[f16]) {
    for (a, x) in acc.iter_mut().zip(v) {
        *a = w.mul_add(x.to_f32(), *a);
    }
}

pub fn f32_dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

// ---------------------------------------------------------------------------------------------
// f64-accumulating dot products (grouping-independent; see `matmul_f64`)
//
// Each block (32 elements for the legacy types, a 256-element super-block for the K-quants,
// one element for the float types) contributes a value that depends only on that block's
// weights and activations: exact integer sums, then a few f64 multiplies. Contributions are
// summed in f64 in a fixed lane pattern that the AVX2 kernels reproduce bit for bit.

/// Lanes of the canonical block accumulation: contribution `i` is added to lane `i % 4`, in
/// order; the lanes are combined by [`combine4`].
pub const LANES_Q: usize = 4;
/// Lanes of the canonical element accumulation of the float types: element `i` is added to
/// lane `i % 16`, in order; the lanes are combined by [`combine16`].
pub const LANES_F: usize = 16;

#[inline(always)]
pub fn combine4(l: [f64; 4]) -> f64 {
    (l[0] + l[1]) + (l[2] + l[3])
}

#[inline(always)]
pub fn combine16(l: [f64; 16]) -> f64 {
    let mut s = [0f64; 4];
    for k in 0..4 {
        s[k] = (l[k] + l[4 + k]) + (l[8 + k] + l[12 + k]);
    }
    combine4(s)
}

/// Legacy block (and Q6_K) contribution: `(d_w * d_a) * isum` in f64.
#[inline(always)]
pub fn contrib_scaled(dw: f32, da: f32, isum: i32) -> f64 {
    (dw as f64 * da as f64) * isum as f64
}

/// Q4_1 block contribution: `(d_w * d_a) * isum + m_w * s_a` in f64.
#[inline(always)]
pub fn contrib_q4_1(dw: f32, da: f32, isum: i32, m: f32, s: f32) -> f64 {
    contrib_scaled(dw, da, isum) + m as f64 * s as f64
}

/// Q4_K/Q5_K super-block contribution:
/// `(d_w * d_a) * Σ scale·q·q8 - (dmin_w * d_a) * Σ min·bsum` in f64.
#[inline(always)]
pub fn contrib_k4(dw: f32, dmin: f32, da: f32, isum: i32, summins: i32) -> f64 {
    (dw as f64 * da as f64) * isum as f64 - (dmin as f64 * da as f64) * summins as f64
}

fn isum_q4_0(bx: &BlockQ4_0, by: &BlockQ8_0) -> i32 {
    let mut s = 0i32;
    for j in 0..QK / 2 {
        s += ((bx.qs[j] & 0xF) as i32 - 8) * by.qs[j] as i32;
        s += ((bx.qs[j] >> 4) as i32 - 8) * by.qs[j + QK / 2] as i32;
    }
    s
}

fn isum_q4_1(bx: &BlockQ4_1, by: &BlockQ8_1) -> i32 {
    let mut s = 0i32;
    for j in 0..QK / 2 {
        s += (bx.qs[j] & 0xF) as i32 * by.qs[j] as i32;
        s += (bx.qs[j] >> 4) as i32 * by.qs[j + QK / 2] as i32;
    }
    s
}

fn isum_q5_0(bx: &BlockQ5_0, by: &BlockQ8_0) -> i32 {
    let qh = u32::from_le_bytes(bx.qh);
    let mut s = 0i32;
    for j in 0..QK / 2 {
        let h0 = (((qh >> j) & 1) << 4) as i32;
        let h1 = (((qh >> (j + 16)) & 1) << 4) as i32;
        s += (((bx.qs[j] & 0xF) as i32 | h0) - 16) * by.qs[j] as i32;
        s += (((bx.qs[j] >> 4) as i32 | h1) - 16) * by.qs[j + QK / 2] as i32;
    }
    s
}

fn isum_q8_0(bx: &BlockQ8_0, by: &BlockQ8_0) -> i32 {
    bx.qs
        .iter()
        .zip(&by.qs)
        .map(|(&a, &b)| a as i32 * b as i32)
        .sum()
}

/// (Σ scale·q·q8, Σ min·bsum) of a Q4_K/Q5_K super-block whose 256 levels are in `a`.
fn isums_k4(a: &[i8; QK_K], scales12: &[u8; 12], by: &BlockQ8K) -> (i32, i32) {
    let (scales, mins) = unpack_scales_mins_k4(scales12);
    let mut aux32 = [0i32; 8];
    k4_block_sums(a, &by.qs, &scales, &mut aux32);
    let summins = (0..16)
        .map(|j| by.bsums[j] as i32 * mins[j / 2] as i32)
        .sum();
    (aux32.iter().sum(), summins)
}

fn isums_q4_k(bx: &BlockQ4K, by: &BlockQ8K) -> (i32, i32) {
    let mut a = [0i8; QK_K];
    for c in 0..4 {
        for l in 0..32 {
            a[64 * c + l] = (bx.qs[32 * c + l] & 0xF) as i8;
            a[64 * c + 32 + l] = (bx.qs[32 * c + l] >> 4) as i8;
        }
    }
    isums_k4(&a, &bx.scales, by)
}

fn isums_q5_k(bx: &BlockQ5K, by: &BlockQ8K) -> (i32, i32) {
    let mut a = [0i8; QK_K];
    for c in 0..4 {
        let (m1, m2) = (1u8 << (2 * c), 2u8 << (2 * c));
        for l in 0..32 {
            let h1 = if bx.qh[l] & m1 != 0 { 16 } else { 0 };
            let h2 = if bx.qh[l] & m2 != 0 { 16 } else { 0 };
            a[64 * c + l] = ((bx.qs[32 * c + l] & 0xF) + h1) as i8;
            a[64 * c + 32 + l] = ((bx.qs[32 * c + l] >> 4) + h2) as i8;
        }
    }
    isums_k4(&a, &bx.scales, by)
}

fn isum_q6_k(bx: &BlockQ6K, by: &BlockQ8K) -> i32 {
    let mut s = 0i32;
    for h in 0..2 {
        let ql = &bx.ql[64 * h..64 * h + 64];
        let qh = &bx.qh[32 * h..32 * h + 32];
        for l in 0..32 {
            let q = [
                ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32,
                ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32,
                ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32,
                ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32,
            ];
            for (g, qv) in q.into_iter().enumerate() {
                let e = 128 * h + 32 * g + l;
                s += bx.scales[e / 16] as i32 * qv * by.qs[e] as i32;
            }
        }
    }
    s
}

fn isum_q5_1(bx: &BlockQ5_1, by: &BlockQ8_1) -> i32 {
    q5_levels(&bx.qs, bx.qh)
        .iter()
        .zip(&by.qs)
        .map(|(&q, &a)| q as i32 * a as i32)
        .sum()
}

/// Σ table[q] * a over a 32-element block of nibble indices.
fn isum_table(qs: &[u8], table: &[i8; 16], a: &[i8]) -> i32 {
    table_levels(qs, table)
        .iter()
        .zip(a)
        .map(|(&q, &a)| q as i32 * a as i32)
        .sum()
}

/// (Σ scale·q·q8, Σ min·bsum) of a Q2_K super-block.
fn isums_q2_k(bx: &BlockQ2K, by: &BlockQ8K) -> (i32, i32) {
    let q = levels_2bit(&bx.qs);
    let mut isum = 0i32;
    for e in 0..QK_K {
        isum += (bx.scales[e / 16] & 0xF) as i32 * q[e] as i32 * by.qs[e] as i32;
    }
    let summins = (0..16)
        .map(|k| (bx.scales[k] >> 4) as i32 * by.bsums[k] as i32)
        .sum();
    (isum, summins)
}

fn isum_q3_k(bx: &BlockQ3K, by: &BlockQ8K) -> i32 {
    let (q, sc) = (q3_k_levels(bx), q3_k_scales(&bx.scales));
    (0..QK_K)
        .map(|e| sc[e / 16] as i32 * q[e] as i32 * by.qs[e] as i32)
        .sum()
}

fn isum_iq4_xs(bx: &BlockIQ4XS, by: &BlockQ8K) -> i32 {
    let sc = iq4_xs_scales(bx);
    (0..8)
        .map(|ib| {
            let qs = &bx.qs[16 * ib..16 * ib + 16];
            sc[ib] as i32 * isum_table(qs, &KVALUES_IQ4NL, &by.qs[32 * ib..32 * ib + 32])
        })
        .sum()
}

/// One prepared activation vector, in the form that matches its weight type.
#[derive(Clone, Copy)]
pub enum ActRow<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    Q8_0(&'a [BlockQ8_0]),
    Q8_1(&'a [BlockQ8_1]),
    Q8K(&'a [BlockQ8K]),
}

/// Calls `f(i, contribution)` for every block `i` of a weight row of type `ty` and a matching
/// activation vector (elements are the blocks of the float types). Panics on a length or
/// activation-form mismatch.
pub fn for_each_contribution(ty: QuantType, w: &[u8], a: ActRow, mut f: impl FnMut(usize, f64)) {
    macro_rules! blocks {
        ($wb:ty, $y:expr, |$bx:ident, $by:ident| $c:expr) => {{
            let x = as_blocks::<$wb>(w);
            let y = $y;
            assert_eq!(
                x.len(),
                y.len(),
                "{ty}: weight and activation block counts differ"
            );
            for (i, ($bx, $by)) in x.iter().zip(y).enumerate() {
                f(i, $c);
            }
        }};
    }
    match (ty, a) {
        (QuantType::F32, ActRow::F32(a)) => {
            assert_eq!(w.len(), a.len() * 4);
            for (i, &v) in a.iter().enumerate() {
                f(i, f32_at(w, i) as f64 * v as f64);
            }
        }
        (QuantType::F16, ActRow::F16(a)) => {
            assert_eq!(w.len(), a.len() * 2);
            for (i, v) in a.iter().enumerate() {
                f(i, f16_at(w, i) as f64 * v.to_f32() as f64);
            }
        }
        (QuantType::BF16, ActRow::BF16(a)) => {
            assert_eq!(w.len(), a.len() * 2);
            for (i, v) in a.iter().enumerate() {
                f(i, bf16_at(w, i) as f64 * v.to_f32() as f64);
            }
        }
        (QuantType::Q4_0, ActRow::Q8_0(y)) => blocks!(BlockQ4_0, y, |bx, by| contrib_scaled(
            bx.d.to_f32(),
            by.d.to_f32(),
            isum_q4_0(bx, by)
        )),
        (QuantType::Q4_1, ActRow::Q8_1(y)) => blocks!(BlockQ4_1, y, |bx, by| contrib_q4_1(
            bx.d.to_f32(),
            by.d.to_f32(),
            isum_q4_1(bx, by),
            bx.m.to_f32(),
            by.s.to_f32()
        )),
        (QuantType::Q5_0, ActRow::Q8_0(y)) => blocks!(BlockQ5_0, y, |bx, by| contrib_scaled(
            bx.d.to_f32(),
            by.d.to_f32(),
            isum_q5_0(bx, by)
        )),
        (QuantType::Q8_0, ActRow::Q8_0(y)) => blocks!(BlockQ8_0, y, |bx, by| contrib_scaled(
            bx.d.to_f32(),
            by.d.to_f32(),
            isum_q8_0(bx, by)
        )),
        (QuantType::Q4_K, ActRow::Q8K(y)) => blocks!(BlockQ4K, y, |bx, by| {
            let (isum, summins) = isums_q4_k(bx, by);
            contrib_k4(bx.d.to_f32(), bx.dmin.to_f32(), by.d, isum, summins)
        }),
        (QuantType::Q5_K, ActRow::Q8K(y)) => blocks!(BlockQ5K, y, |bx, by| {
            let (isum, summins) = isums_q5_k(bx, by);
            contrib_k4(bx.d.to_f32(), bx.dmin.to_f32(), by.d, isum, summins)
        }),
        (QuantType::Q6_K, ActRow::Q8K(y)) => blocks!(BlockQ6K, y, |bx, by| contrib_scaled(
            bx.d.to_f32(),
            by.d,
            isum_q6_k(bx, by)
        )),
        (QuantType::Q5_1, ActRow::Q8_1(y)) => blocks!(BlockQ5_1, y, |bx, by| contrib_q4_1(
            bx.d.to_f32(),
            by.d.to_f32(),
            isum_q5_1(bx, by),
            bx.m.to_f32(),
            by.s.to_f32()
        )),
        (QuantType::IQ4_NL, ActRow::Q8_0(y)) => blocks!(BlockIQ4NL, y, |bx, by| contrib_scaled(
            bx.d.to_f32(),
            by.d.to_f32(),
            isum_table(&bx.qs, &KVALUES_IQ4NL, &by.qs)
        )),
        (QuantType::MXFP4, ActRow::Q8_0(y)) => blocks!(BlockMXFP4, y, |bx, by| contrib_scaled(
            e8m0_half(bx.e),
            by.d.to_f32(),
            isum_table(&bx.qs, &KVALUES_MXFP4, &by.qs)
        )),
        (QuantType::Q2_K, ActRow::Q8K(y)) => blocks!(BlockQ2K, y, |bx, by| {
            let (isum, summins) = isums_q2_k(bx, by);
            contrib_k4(bx.d.to_f32(), bx.dmin.to_f32(), by.d, isum, summins)
        }),
        (QuantType::Q3_K, ActRow::Q8K(y)) => blocks!(BlockQ3K, y, |bx, by| contrib_scaled(
            bx.d.to_f32(),
            by.d,
            isum_q3_k(bx, by)
        )),
        (QuantType::IQ4_XS, ActRow::Q8K(y)) => blocks!(BlockIQ4XS, y, |bx, by| contrib_scaled(
            bx.d.to_f32(),
            by.d,
            isum_iq4_xs(bx, by)
        )),
        _ => panic!("{ty} weights with activations prepared for another type"),
    }
}

/// Reference f64 dot of one weight row with one prepared activation vector: the
/// contributions of [`for_each_contribution`] summed in the canonical lane order.
pub fn dot64(ty: QuantType, w: &[u8], a: ActRow) -> f64 {
    if ty.is_quantized() {
        let mut l = [0f64; LANES_Q];
        for_each_contribution(ty, w, a, |i, c| l[i % LANES_Q] += c);
        combine4(l)
    } else {
        let mut l = [0f64; LANES_F];
        for_each_contribution(ty, w, a, |i, c| l[i % LANES_F] += c);
        combine16(l)
    }
}
