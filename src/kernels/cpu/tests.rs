//! Tests for the CPU kernels. Random data comes from a seeded xorshift generator; the seed is
//! printed and can be overridden with `TP_TEST_SEED`.

#![allow(clippy::needless_range_loop)] // index loops mirror ggml's C code

use half::{bf16, f16};

use super::reference::{self, unpack_scales_mins_k4};
use super::*;

use std::cell::Cell;

thread_local! {
    /// The SIMD kernel set the test running on this thread exercises (None: the process's).
    static UNDER_TEST: Cell<Option<&'static Kernels>> = const { Cell::new(None) };
}

/// The kernel set under test on this thread.
fn current() -> &'static Kernels {
    UNDER_TEST.get().unwrap_or_else(kernels)
}

/// Runs `f` once for every SIMD kernel set this CPU runs (AVX-512 and AVX2 on an AVX-512
/// machine, NEON on aarch64), with this module's `matmul` and `matmul_f64` using that set.
/// Nothing is skipped quietly: `kernel_sets_tested` lists the sets in the test output.
fn for_each_simd_table(f: impl Fn()) {
    for k in simd_tables() {
        UNDER_TEST.set(Some(k));
        f();
        UNDER_TEST.set(None);
    }
}

/// [`super::matmul`] with the kernel set under test (shadows the glob import).
fn matmul(
    ty: QuantType,
    w: &[u8],
    rows: usize,
    cols: usize,
    a: &PreparedActivations,
    y: &mut [f32],
) {
    matmul_with(current(), ty, w, rows, cols, a, y, true)
}

/// [`super::matmul_f64`] with the kernel set under test (shadows the glob import).
fn matmul_f64(
    ty: QuantType,
    w: &[u8],
    rows: usize,
    cols: usize,
    a: &PreparedActivations,
    y: &mut [f64],
) {
    matmul_f64_with(current().wide, ty, w, rows, cols, a, y, true)
}

/// [`super::attend`] with the kernel set under test (shadows the glob import).
#[allow(clippy::too_many_arguments)]
fn attend(
    q: &[f16],
    k: &[f16],
    v: &[f16],
    stride: usize,
    n: usize,
    scale: f32,
    sink: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    attend_with(
        current(),
        q,
        k,
        v,
        &Rows::contiguous(stride),
        n,
        scale,
        sink,
        scores,
        out,
    )
}

/// [`super::sum_exp`] with the kernel set under test (shadows the glob import).
fn sum_exp(row: &[f32], max: f32) -> f64 {
    sum_exp_with(current(), row, max)
}

/// [`super::f32_dot`] with the kernel set under test (shadows the glob import).
fn f32_dot(a: &[f32], b: &[f32]) -> f32 {
    f32_dot_with(current(), a, b)
}

#[test]
fn kernel_sets_tested() {
    let tested: Vec<&str> = simd_tables().iter().map(|k| k.name).collect();
    #[cfg(target_arch = "x86_64")]
    {
        let has = |f: &[bool]| f.iter().all(|&b| b);
        let avx2 = has(&[
            is_x86_feature_detected!("avx2"),
            is_x86_feature_detected!("fma"),
            is_x86_feature_detected!("f16c"),
        ]);
        let avx512 = avx2
            && has(&[
                is_x86_feature_detected!("avx512f"),
                is_x86_feature_detected!("avx512bw"),
                is_x86_feature_detected!("avx512vl"),
                is_x86_feature_detected!("avx512vnni"),
            ]);
        assert_eq!(tested.contains(&"avx2"), avx2);
        assert_eq!(tested.contains(&"avx512"), avx512);
    }
    #[cfg(target_arch = "aarch64")]
    assert_eq!(
        tested.contains(&"neon"),
        std::arch::is_aarch64_feature_detected!("neon")
    );
    let missing: Vec<&str> = KERNEL_SETS
        .into_iter()
        .filter(|n| *n != "scalar" && !tested.contains(n))
        .collect();
    println!(
        "kernel sets tested against the scalar reference on this CPU: {}; not runnable here: {}",
        if tested.is_empty() {
            "none".to_string()
        } else {
            tested.join(", ")
        },
        if missing.is_empty() {
            "none".to_string()
        } else {
            missing.join(", ")
        }
    );
}

#[test]
fn tp_kernels_names_are_checked() {
    assert!(table("scalar").is_ok());
    let e = table("avx3").err().expect("avx3 is not a kernel set");
    assert!(
        e.contains("unknown kernel set") && e.contains("avx512"),
        "{e}"
    );
    for n in KERNEL_SETS {
        assert_eq!(
            table(n).is_ok(),
            kernel_sets_available().contains(&n),
            "{n}"
        );
    }
}

struct Rng(u64);

impl Rng {
    fn new(tag: u64) -> Rng {
        let seed = std::env::var("TP_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed_1234_u64);
        println!("rng seed {seed} (tag {tag}); override with TP_TEST_SEED");
        Rng((seed ^ tag.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    /// Roughly normal (sum of 4 uniforms), occasionally scaled up as an outlier.
    fn value(&mut self, scale: f32) -> f32 {
        let v = (self.unit() + self.unit() + self.unit() + self.unit()) * 0.5;
        if self.next_u64().is_multiple_of(64) {
            v * scale * 6.0
        } else {
            v * scale
        }
    }
    fn bytes(&mut self, out: &mut [u8]) {
        for b in out {
            *b = self.next_u64() as u8;
        }
    }
}

fn f16b(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_bits().to_le_bytes()
}

/// Overwrites the fp16 scale fields of random-byte blocks with finite values.
fn fix_scales(ty: QuantType, row: &mut [u8], rng: &mut Rng) {
    let mut small = || f16b(rng.unit().abs() * 0.01 + 0.001);
    match ty {
        QuantType::Q4_0 => as_blocks_mut::<BlockQ4_0>(row)
            .iter_mut()
            .for_each(|b| b.d.0 = small()),
        QuantType::Q4_1 => as_blocks_mut::<BlockQ4_1>(row).iter_mut().for_each(|b| {
            b.d.0 = small();
            b.m.0 = f16b(-0.1);
        }),
        QuantType::Q5_0 => as_blocks_mut::<BlockQ5_0>(row)
            .iter_mut()
            .for_each(|b| b.d.0 = small()),
        QuantType::Q8_0 => as_blocks_mut::<BlockQ8_0>(row)
            .iter_mut()
            .for_each(|b| b.d.0 = small()),
        QuantType::Q4_K => as_blocks_mut::<BlockQ4K>(row).iter_mut().for_each(|b| {
            b.d.0 = small();
            b.dmin.0 = small();
        }),
        QuantType::Q5_K => as_blocks_mut::<BlockQ5K>(row).iter_mut().for_each(|b| {
            b.d.0 = small();
            b.dmin.0 = small();
        }),
        QuantType::Q6_K => as_blocks_mut::<BlockQ6K>(row)
            .iter_mut()
            .for_each(|b| b.d.0 = small()),
        QuantType::Q5_1 => as_blocks_mut::<BlockQ5_1>(row).iter_mut().for_each(|b| {
            b.d.0 = small();
            b.m.0 = f16b(-0.1);
        }),
        QuantType::Q2_K => as_blocks_mut::<BlockQ2K>(row).iter_mut().for_each(|b| {
            b.d.0 = small();
            b.dmin.0 = small();
        }),
        QuantType::Q3_K => as_blocks_mut::<BlockQ3K>(row)
            .iter_mut()
            .for_each(|b| b.d.0 = small()),
        QuantType::IQ4_NL => as_blocks_mut::<BlockIQ4NL>(row)
            .iter_mut()
            .for_each(|b| b.d.0 = small()),
        QuantType::IQ4_XS => as_blocks_mut::<BlockIQ4XS>(row)
            .iter_mut()
            .for_each(|b| b.d.0 = small()),
        // Every E8M0 byte is a valid scale (2^-128 .. 2^127); keep products finite in f32.
        QuantType::MXFP4 => as_blocks_mut::<BlockMXFP4>(row)
            .iter_mut()
            .for_each(|b| b.e = 100 + (b.e % 40)),
        QuantType::F32 | QuantType::F16 | QuantType::BF16 => unreachable!(),
    }
}

/// `rows` weight rows of `cols` values: quantized from random floats, or (for quantized types
/// with `random_bytes`) random block bytes with finite scales, covering every bit pattern.
fn make_weights(
    ty: QuantType,
    rows: usize,
    cols: usize,
    rng: &mut Rng,
    random_bytes: bool,
) -> Vec<u8> {
    let rb = ty.row_bytes(cols).unwrap();
    let mut w = vec![0u8; rows * rb];
    let mut x = vec![0f32; cols];
    for row in w.chunks_exact_mut(rb) {
        if random_bytes && ty.is_quantized() {
            rng.bytes(row);
            fix_scales(ty, row, rng);
        } else {
            for v in x.iter_mut() {
                *v = rng.value(0.05);
            }
            quantize_row(ty, &x, row);
        }
    }
    w
}

/// Per-element additive offset `m` of a Q4_1 weight row (0 for other types).
fn weight_mins(ty: QuantType, row: &[u8], cols: usize) -> Vec<f32> {
    let mut m = vec![0f32; cols];
    if ty == QuantType::Q4_1 {
        for (b, o) in as_blocks::<BlockQ4_1>(row)
            .iter()
            .zip(m.chunks_exact_mut(QK))
        {
            o.fill(b.m.to_f32());
        }
    }
    if ty == QuantType::Q5_1 {
        for (b, o) in as_blocks::<BlockQ5_1>(row)
            .iter()
            .zip(m.chunks_exact_mut(QK))
        {
            o.fill(b.m.to_f32());
        }
    }
    m
}

/// Bound on |x̂_i - x_i| for activation quantization of `x` for weight type `ty`.
fn act_error_bound(ty: QuantType, x: &[f32]) -> Vec<f32> {
    match ty.act_kind() {
        ActKind::F32 => vec![0.0; x.len()],
        // RNE to f16: relative 2^-11, plus half the smallest subnormal.
        ActKind::F16 => x
            .iter()
            .map(|v| v.abs() * 2f32.powi(-11) + 2f32.powi(-25))
            .collect(),
        ActKind::BF16 => x.iter().map(|v| v.abs() * 2f32.powi(-8)).collect(),
        ActKind::Q8_0 | ActKind::Q8_1 => {
            // rounding (0.5 d) + f16 rounding of d seen through |q| <= 127 (127 * 2^-11 d).
            let mut e = vec![0f32; x.len()];
            for (xb, eb) in x.chunks(QK).zip(e.chunks_mut(QK)) {
                let d = xb.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                eb.fill(0.57 * d);
            }
            e
        }
        ActKind::Q8K => {
            let mut e = vec![0f32; x.len()];
            for (xb, eb) in x.chunks(QK_K).zip(e.chunks_mut(QK_K)) {
                let d = xb.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                eb.fill(0.51 * d);
            }
            e
        }
    }
}

fn random_acts(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.value(1.0)).collect()
}

// ---------------------------------------------------------------------------------------------
// 1. hand-built blocks

fn deq(ty: QuantType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; n];
    dequantize_row(ty, bytes, &mut out);
    out
}

#[test]
fn dequant_float_types() {
    let mut b = Vec::new();
    for v in [1.5f32, -2.0, 0.0, 3.25e-3] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    assert_eq!(deq(QuantType::F32, &b, 4), vec![1.5, -2.0, 0.0, 3.25e-3]);
    // f16: 0x3C00 = 1, 0xC000 = -2, 0x3800 = 0.5, 0x0001 = 2^-24
    let b: Vec<u8> = [0x3C00u16, 0xC000, 0x3800, 0x0001]
        .iter()
        .flat_map(|h| h.to_le_bytes())
        .collect();
    assert_eq!(
        deq(QuantType::F16, &b, 4),
        vec![1.0, -2.0, 0.5, 2f32.powi(-24)]
    );
    // bf16: 0x3F80 = 1, 0xC040 = -3, 0x4049 = 3.140625
    let b: Vec<u8> = [0x3F80u16, 0xC040, 0x4049]
        .iter()
        .flat_map(|h| h.to_le_bytes())
        .collect();
    assert_eq!(deq(QuantType::BF16, &b, 3), vec![1.0, -3.0, 3.140625]);
}

#[test]
fn dequant_q4_0_q4_1_q5_0_q8_0() {
    // Q4_0: d = 0.5, byte j = j | (15-j) << 4 -> y[j] = (j-8)/2, y[j+16] = (7-j)/2
    let mut b = vec![0u8; 18];
    b[..2].copy_from_slice(&0x3800u16.to_le_bytes());
    for j in 0..16 {
        b[2 + j] = j as u8 | ((15 - j as u8) << 4);
    }
    let y = deq(QuantType::Q4_0, &b, 32);
    assert_eq!(
        (y[0], y[8], y[15], y[16], y[31]),
        (-4.0, 0.0, 3.5, 3.5, -4.0)
    );
    for j in 0..16 {
        assert_eq!(y[j], (j as f32 - 8.0) * 0.5);
        assert_eq!(y[j + 16], (7.0 - j as f32) * 0.5);
    }

    // Q4_1: d = 0.25, m = -1
    let mut b = vec![0u8; 20];
    b[..2].copy_from_slice(&0x3400u16.to_le_bytes());
    b[2..4].copy_from_slice(&0xBC00u16.to_le_bytes());
    for j in 0..16 {
        b[4 + j] = j as u8 | ((15 - j as u8) << 4);
    }
    let y = deq(QuantType::Q4_1, &b, 32);
    assert_eq!((y[0], y[15], y[16], y[31]), (-1.0, 2.75, 2.75, -1.0));

    // Q5_0: d = 1, qh = 0x8000_0001 -> element 0 and element 31 get the 5th bit.
    let mut b = vec![0u8; 22];
    b[..2].copy_from_slice(&0x3C00u16.to_le_bytes());
    b[2..6].copy_from_slice(&0x8000_0001u32.to_le_bytes());
    for j in 0..16 {
        b[6 + j] = j as u8 | ((15 - j as u8) << 4);
    }
    let y = deq(QuantType::Q5_0, &b, 32);
    // y[0] = (0|16)-16 = 0; y[1] = 1-16 = -15; y[16] = 15-16 = -1; y[31] = (0|16)-16 = 0; y[30] = 1-16
    assert_eq!(
        (y[0], y[1], y[15], y[16], y[30], y[31]),
        (0.0, -15.0, -1.0, -1.0, -15.0, 0.0)
    );

    // Q8_0: d = 2, qs[j] = j - 16
    let mut b = vec![0u8; 34];
    b[..2].copy_from_slice(&0x4000u16.to_le_bytes());
    for j in 0..32 {
        b[2 + j] = (j as i8 - 16) as u8;
    }
    let y = deq(QuantType::Q8_0, &b, 32);
    for j in 0..32 {
        assert_eq!(y[j], (j as f32 - 16.0) * 2.0);
    }
}

/// Packs 6-bit scales/mins as documented in ggml-common.h (independent of the encoder).
fn pack_k4_by_hand(sc: [u8; 8], mn: [u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for k in 0..4 {
        s[k] = sc[k] | ((sc[k + 4] >> 4) << 6);
        s[k + 4] = mn[k] | ((mn[k + 4] >> 4) << 6);
        s[k + 8] = (sc[k + 4] & 0xF) | ((mn[k + 4] & 0xF) << 4);
    }
    s
}

#[test]
fn dequant_q4_k_q5_k() {
    let sc = [1u8, 5, 9, 13, 33, 40, 50, 63];
    let mn = [0u8, 2, 4, 6, 17, 20, 35, 62];
    let packed = pack_k4_by_hand(sc, mn);
    assert_eq!(unpack_scales_mins_k4(&packed), (sc, mn));
    for j in 0..8 {
        assert_eq!(get_scale_min_k4(j, &packed), (sc[j], mn[j]));
    }
    // Q4_K: d = 1, dmin = 0.5; qs[i] = i*7 mod 256
    let mut b = vec![0u8; 144];
    b[0..2].copy_from_slice(&0x3C00u16.to_le_bytes());
    b[2..4].copy_from_slice(&0x3800u16.to_le_bytes());
    b[4..16].copy_from_slice(&packed);
    for i in 0..128 {
        b[16 + i] = (i * 7) as u8;
    }
    let y = deq(QuantType::Q4_K, &b, 256);
    // element 0: sub-block 0, low nibble of qs[0]=0 -> 1*1*0 - 0.5*0 = 0
    // element 33: sub-block 1, high nibble of qs[1]=7 -> 0 -> 5*0 - 0.5*2 = -1
    // element 255: sub-block 7, high nibble of qs[127] = 889 mod 256 = 121 = 0x79 -> 7: 63*7 - 0.5*62 = 410
    assert_eq!((y[0], y[33], y[255]), (0.0, -1.0, 410.0));
    for e in 0..256 {
        let (c, t) = (e / 64, e % 64);
        let byte = b[16 + 32 * c + t % 32];
        let q = if t < 32 { byte & 0xF } else { byte >> 4 };
        let j = e / 32;
        assert_eq!(
            y[e],
            sc[j] as f32 * q as f32 - 0.5 * mn[j] as f32,
            "q4_K element {e}"
        );
    }

    // Q5_K: same plus qh[l] = l*37 mod 256 (bit 2c for low half of chunk c, 2c+1 for high).
    let mut b5 = vec![0u8; 176];
    b5[0..16].copy_from_slice(&b[0..16]);
    for l in 0..32 {
        b5[16 + l] = (l * 37) as u8;
    }
    b5[48..176].copy_from_slice(&b[16..144]);
    let y = deq(QuantType::Q5_K, &b5, 256);
    // element 255: c = 3, high half, l = 31: qh[31] = 1147 mod 256 = 123 = 0b0111_1011, bit 7 = 0
    //   -> q = 7 -> 410.  element 32+1=33: c=0 high, l=1: qh[1] = 37 = 0b100101, bit 1 = 0 -> -1.
    // element 2: c=0 low, l=2: qh[2]=74=0b1001010 bit0 = 0; qs[2]=14 low nibble 14 -> 1*14 = 14
    assert_eq!((y[2], y[33], y[255]), (14.0, -1.0, 410.0));
    for e in 0..256 {
        let (c, t) = (e / 64, e % 64);
        let l = t % 32;
        let byte = b5[48 + 32 * c + l];
        let lo = if t < 32 { byte & 0xF } else { byte >> 4 };
        let bit = 2 * c + (t / 32);
        let q = lo as u32 + (((b5[16 + l] >> bit) & 1) as u32) * 16;
        let j = e / 32;
        assert_eq!(
            y[e],
            sc[j] as f32 * q as f32 - 0.5 * mn[j] as f32,
            "q5_K element {e}"
        );
    }
}

#[test]
fn dequant_q6_k() {
    // ql[i] = i*3, qh[i] = i*5 (mod 256), scales[i] = i - 8, d = 0.5
    let mut b = vec![0u8; 210];
    for i in 0..128 {
        b[i] = (i * 3) as u8;
    }
    for i in 0..64 {
        b[128 + i] = (i * 5) as u8;
    }
    for i in 0..16 {
        b[192 + i] = (i as i8 - 8) as u8;
    }
    b[208..210].copy_from_slice(&0x3800u16.to_le_bytes());
    let y = deq(QuantType::Q6_K, &b, 256);
    // element 0: ql[0]=0 low=0, qh[0]=0 -> q=0-32=-32, scale[0]=-8: 0.5*-8*-32 = 128
    // element 255: half 1, t=127 -> group 3, l=31: ql[64+32+31]=ql[127]=381 mod 256=125=0x7D high=7;
    //   qh[32+31]=qh[63]=315 mod 256=59=0b00111011, bits 6-7 = 0 -> q = 7-32 = -25;
    //   scale index 8+6+1 = 15 -> 7: 0.5*7*-25 = -87.5
    assert_eq!((y[0], y[255]), (128.0, -87.5));
    for e in 0..256 {
        let (h, t) = (e / 128, e % 128);
        let (g, l) = (t / 32, t % 32);
        let qlb = b[64 * h + l + 32 * (g & 1)];
        let lo = if g < 2 { qlb & 0xF } else { qlb >> 4 };
        let hi = (b[128 + 32 * h + l] >> (2 * g)) & 3;
        let q = (lo | (hi << 4)) as i32 - 32;
        let s = b[192 + 8 * h + 2 * g + l / 16] as i8;
        assert_eq!(y[e], 0.5 * s as f32 * q as f32, "q6_K element {e}");
    }
}

// ---------------------------------------------------------------------------------------------
// helpers' exactness

#[test]
fn nearest_int_matches_ggml() {
    for (v, e) in [
        (0.5f32, 0),
        (1.5, 2),
        (2.5, 2),
        (-0.5, 0),
        (-1.5, -2),
        (-2.5, -2),
        (126.7, 127),
        (-126.2, -126),
    ] {
        assert_eq!(nearest_int(v), e, "nearest_int({v})");
    }
}

#[test]
fn activation_quantizers() {
    let mut rng = Rng::new(11);
    let x = random_acts(&mut rng, 512);
    let mut q0 = vec![BlockQ8_0::default(); 16];
    quantize_row_q8_0(&x, &mut q0);
    let mut q1 = vec![BlockQ8_1::default(); 16];
    quantize_row_q8_1(&x, &mut q1);
    for (b0, b1) in q0.iter().zip(&q1) {
        assert_eq!(b0.qs, b1.qs);
        assert_eq!(b0.d, b1.d);
        let sum: i32 = b1.qs.iter().map(|&q| q as i32).sum();
        let d = b1.d.to_f32();
        assert!((b1.s.to_f32() - sum as f32 * d).abs() <= (sum as f32 * d).abs() * 2e-3 + 1e-6);
        assert!(b0.qs.iter().any(|&q| q == 127 || q == -127));
    }
    let mut qk = vec![BlockQ8K::default(); 2];
    quantize_row_q8_k(&x, &mut qk);
    for (blk, xb) in qk.iter().zip(x.chunks(QK_K)) {
        for j in 0..16 {
            let s: i32 = blk.qs[16 * j..16 * j + 16].iter().map(|&q| q as i32).sum();
            assert_eq!(blk.bsums[j] as i32, s);
        }
        // the element of largest magnitude maps to -127 (ggml uses iscale = -127/max)
        let imax = (0..QK_K)
            .max_by(|&a, &b| xb[a].abs().total_cmp(&xb[b].abs()))
            .unwrap();
        assert_eq!(blk.qs[imax], -127);
        assert!(blk.d * -127.0 * xb[imax] > 0.0);
    }
    // all-zero block
    let mut z = [BlockQ8K::default()];
    quantize_row_q8_k(&[0.0; 256], &mut z);
    assert_eq!(z[0].d, 0.0);
    assert!(z[0].qs.iter().all(|&q| q == 0));
}

#[test]
fn weight_quantizers_roundtrip() {
    let mut rng = Rng::new(12);
    let n = 1024;
    let x: Vec<f32> = (0..n).map(|_| rng.value(0.05)).collect();
    let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
    // relative RMS error budgets: 4-bit ~ 1/(2*sqrt(3)*7.5) of range..., generous bounds.
    for (ty, budget) in [
        (QuantType::F32, 0.0),
        (QuantType::F16, 1e-3),
        (QuantType::BF16, 5e-3),
        (QuantType::Q8_0, 0.01),
        (QuantType::Q4_0, 0.15),
        (QuantType::Q4_1, 0.12),
        (QuantType::Q5_0, 0.08),
        (QuantType::Q4_K, 0.12),
        (QuantType::Q5_K, 0.06),
        (QuantType::Q6_K, 0.03),
        (QuantType::Q5_1, 0.06),
        (QuantType::Q2_K, 0.45),
        (QuantType::Q3_K, 0.25),
        (QuantType::IQ4_NL, 0.12),
        (QuantType::IQ4_XS, 0.12),
        (QuantType::MXFP4, 0.25),
    ] {
        let mut bytes = vec![0u8; ty.row_bytes(n).unwrap()];
        quantize_row(ty, &x, &mut bytes);
        let y = deq(ty, &bytes, n);
        let err = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            .sqrt()
            / norm;
        println!("{ty}: relative rms error {err:.5}");
        assert!(err <= budget, "{ty}: relative rms error {err} > {budget}");
    }
}

// ---------------------------------------------------------------------------------------------
// 2. fast vs reference, 3. reference vs unquantized f64

fn check_type(ty: QuantType, random_bytes: bool, tag: u64) {
    let mut rng = Rng::new(tag);
    let be = ty.block_elements().max(QK);
    // odd column counts for the float types exercise the SIMD tails
    let cols = if ty.is_quantized() {
        4 * be.max(256)
    } else {
        1003
    };
    let rows = 67;
    let w = make_weights(ty, rows, cols, &mut rng, random_bytes);
    let rb = ty.row_bytes(cols).unwrap();
    let wdeq: Vec<Vec<f32>> = w.chunks_exact(rb).map(|r| deq(ty, r, cols)).collect();
    let mut act = PreparedActivations::new();
    let mut worst_fast = 0f64;
    let mut worst_ref = 0f64;
    for count in [1usize, 3, 8] {
        let x = random_acts(&mut rng, cols * count);
        act.prepare(ty, &x, cols, count);
        let mut y_fast = vec![0f32; rows * count];
        let mut y_ref = vec![0f32; rows * count];
        matmul(ty, &w, rows, cols, &act, &mut y_fast);
        matmul_reference(ty, &w, rows, cols, &act, &mut y_ref);
        for b in 0..count {
            let xb = &x[b * cols..(b + 1) * cols];
            let xq = act.dequantize(b);
            let e = act_error_bound(ty, xb);
            for r in 0..rows {
                let wr = &wdeq[r];
                let mins = weight_mins(ty, &w[r * rb..(r + 1) * rb], cols);
                let (f, rf) = (y_fast[b * rows + r], y_ref[b * rows + r]);
                // 2. fast vs reference
                let mag_q: f64 = wr
                    .iter()
                    .zip(&xq)
                    .map(|(a, c)| (*a as f64 * *c as f64).abs())
                    .sum();
                if ty.f32_via_f64() {
                    // one kernel per type: the f32 product is the f64 one rounded once
                    assert_eq!(
                        f.to_bits(),
                        rf.to_bits(),
                        "{ty} rb={random_bytes} count={count} b={b} r={r}: fast {f} vs ref {rf}"
                    );
                }
                let d_fast = (f as f64 - rf as f64).abs();
                assert!(
                    d_fast <= 1e-5 * mag_q + 1e-30,
                    "{ty} rb={random_bytes} count={count} b={b} r={r}: fast {f} vs ref {rf} (|w.x| {mag_q})"
                );
                worst_fast = worst_fast.max(d_fast / mag_q.max(1e-30));
                // 3. reference vs exact dot with the unquantized activations
                let exact: f64 = wr.iter().zip(xb).map(|(a, c)| *a as f64 * *c as f64).sum();
                let mag: f64 = wr
                    .iter()
                    .zip(xb)
                    .map(|(a, c)| (*a as f64 * *c as f64).abs())
                    .sum();
                let mut bound: f64 = wr
                    .iter()
                    .zip(&mins)
                    .zip(&e)
                    .map(|((wv, m), ev)| (wv.abs() as f64 + 2.0 * m.abs() as f64) * *ev as f64)
                    .sum();
                if matches!(ty, QuantType::Q4_1 | QuantType::Q5_1) {
                    // m * s uses s = f16(d * sum q) instead of f16(d) * sum q.
                    for (blk, m) in act.q8_1(b).iter().zip(mins.chunks(QK)) {
                        let sq: i32 = blk.qs.iter().map(|&q| q as i32).sum();
                        bound += m[0].abs() as f64
                            * blk.d.to_f32() as f64
                            * sq.abs() as f64
                            * 2f64.powi(-10)
                            * 1.01;
                    }
                }
                bound += 2e-6 * mag + 1e-30;
                let err = (rf as f64 - exact).abs();
                assert!(
                    err <= bound,
                    "{ty} rb={random_bytes} count={count} b={b} r={r}: ref {rf} vs exact {exact}, err {err} > bound {bound}"
                );
                let rel_budget = match ty {
                    QuantType::F32 => 1e-6,
                    QuantType::F16 => 1e-3,
                    QuantType::BF16 => 8e-3,
                    _ => 0.02,
                };
                assert!(
                    err <= rel_budget * mag,
                    "{ty} rb={random_bytes}: err {err} > {rel_budget} * sum|w x| = {}",
                    rel_budget * mag
                );
                worst_ref = worst_ref.max(err / mag);
            }
        }
    }
    println!(
        "{ty} (random bytes: {random_bytes}, kernels {}): worst |fast-ref|/sum|w x| = {worst_fast:.2e}, worst |ref-exact|/sum|w x| = {worst_ref:.2e}",
        current().name
    );
}

#[test]
fn matmul_all_types_quantized_from_floats() {
    for_each_simd_table(|| {
        for (i, ty) in QuantType::ALL.into_iter().enumerate() {
            check_type(ty, false, 100 + i as u64);
        }
    });
}

#[test]
fn matmul_all_types_random_blocks() {
    for_each_simd_table(|| {
        for (i, ty) in QuantType::ALL
            .into_iter()
            .enumerate()
            .filter(|(_, t)| t.is_quantized())
        {
            check_type(ty, true, 200 + i as u64);
        }
    });
}

#[test]
fn f32_dot_matches_f64() {
    for_each_simd_table(|| {
        let mut rng = Rng::new(13);
        for n in [0usize, 1, 7, 8, 31, 32, 33, 100, 4096] {
            let a = random_acts(&mut rng, n);
            let b = random_acts(&mut rng, n);
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let mag: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (*x as f64 * *y as f64).abs())
                .sum();
            for (name, v) in [
                ("dispatch", f32_dot(&a, &b)),
                ("scalar", reference::f32_dot_scalar(&a, &b)),
            ] {
                assert!(
                    (v as f64 - exact).abs() <= 1e-6 * mag + 1e-12,
                    "{name} n={n}: {v} vs {exact}"
                );
            }
        }
    });
}

#[test]
fn prepare_reuses_buffers() {
    let mut rng = Rng::new(14);
    let mut act = PreparedActivations::with_capacity(QuantType::Q4_K, 1024, 4);
    let p0 = act.q8_k.as_ptr();
    let x = random_acts(&mut rng, 1024 * 4);
    act.prepare(QuantType::Q4_K, &x, 1024, 4);
    assert_eq!(act.q8_k.as_ptr(), p0);
    act.prepare(QuantType::Q6_K, &x[..512], 512, 1);
    assert_eq!(act.q8_k.as_ptr(), p0);
    assert_eq!(
        (act.len(), act.count(), act.weight_type()),
        (512, 1, Some(QuantType::Q6_K))
    );
    let mut act2 = PreparedActivations::new();
    act2.prepare(QuantType::F16, &x, 1024, 4);
    let p1 = act2.f16s.as_ptr();
    act2.prepare(QuantType::F16, &x[..1024], 1024, 1);
    assert_eq!(act2.f16s.as_ptr(), p1);
    // large prepare goes through the parallel path; compare with a sequential quantization
    let big = random_acts(&mut rng, 4096 * 20);
    let pool = crate::kernels::pool::ThreadPool::new(3, None).unwrap();
    pool.install(|| act.prepare(QuantType::Q8_0, &big, 4096, 20));
    let mut seq = vec![BlockQ8_0::default(); big.len() / QK];
    quantize_row_q8_0(&big, &mut seq);
    assert_eq!(
        blocks_as_bytes(&act.q8_0[..seq.len()]),
        blocks_as_bytes(&seq)
    );
}

#[test]
fn matmul_large_parallel_matches_reference() {
    for_each_simd_table(|| {
        // Enough rows for many pool tasks, uneven final chunk.
        let pool = crate::kernels::pool::ThreadPool::new(3, None).unwrap();
        pool.install(matmul_large_parallel_matches_reference_in_pool);
    });
}

fn matmul_large_parallel_matches_reference_in_pool() {
    let mut rng = Rng::new(15);
    for ty in [QuantType::Q4_0, QuantType::Q6_K, QuantType::F16] {
        let (rows, cols, count) = (1000, 512, 2);
        let w = make_weights(ty, rows, cols, &mut rng, false);
        let x = random_acts(&mut rng, cols * count);
        let mut act = PreparedActivations::new();
        act.prepare(ty, &x, cols, count);
        let mut y = vec![f32::NAN; rows * count];
        let mut yr = vec![f32::NAN; rows * count];
        matmul(ty, &w, rows, cols, &act, &mut y);
        matmul_reference(ty, &w, rows, cols, &act, &mut yr);
        for (i, (a, b)) in y.iter().zip(&yr).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "{ty} {i}: {a} vs {b}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. type table

#[test]
fn type_table() {
    let expect = [
        (QuantType::F32, 0, 1, 4, "F32"),
        (QuantType::F16, 1, 1, 2, "F16"),
        (QuantType::BF16, 30, 1, 2, "BF16"),
        (QuantType::Q4_0, 2, 32, 18, "Q4_0"),
        (QuantType::Q4_1, 3, 32, 20, "Q4_1"),
        (QuantType::Q5_0, 6, 32, 22, "Q5_0"),
        (QuantType::Q8_0, 8, 32, 34, "Q8_0"),
        (QuantType::Q4_K, 12, 256, 144, "Q4_K"),
        (QuantType::Q5_K, 13, 256, 176, "Q5_K"),
        (QuantType::Q6_K, 14, 256, 210, "Q6_K"),
        (QuantType::Q5_1, 7, 32, 24, "Q5_1"),
        (QuantType::Q2_K, 10, 256, 84, "Q2_K"),
        (QuantType::Q3_K, 11, 256, 110, "Q3_K"),
        (QuantType::IQ4_NL, 20, 32, 18, "IQ4_NL"),
        (QuantType::IQ4_XS, 23, 256, 136, "IQ4_XS"),
        (QuantType::MXFP4, 39, 32, 17, "MXFP4"),
    ];
    for (ty, id, be, bb, name) in expect {
        assert_eq!(QuantType::from_ggml_id(id), Some(ty));
        assert_eq!(ty.ggml_id(), id);
        assert_eq!(ty.block_elements(), be);
        assert_eq!(ty.block_bytes(), bb);
        assert_eq!(ty.name(), name);
        assert_eq!(ty.row_bytes(0), Some(0));
        assert_eq!(ty.row_bytes(be * 7), Some(bb * 7));
        assert_eq!(ty.row_bytes(4096), Some(4096 / be * bb));
        if be > 1 {
            assert_eq!(ty.row_bytes(be + 1), None);
            assert_eq!(ty.row_bytes(be / 2), None);
        }
        let huge = usize::MAX - usize::MAX % be;
        let expect_huge = if bb > be { None } else { Some(huge / be * bb) };
        assert_eq!(ty.row_bytes(huge), expect_huge, "{ty} overflow");
    }
    for id in [4u32, 5, 9, 15, 16, 17, 18, 19, 21, 22, 29, 31, 40, 1000] {
        assert_eq!(QuantType::from_ggml_id(id), None, "id {id}");
    }
    assert_eq!(QuantType::ALL.len(), 16);
}

#[test]
fn float_activation_conversions_are_rne() {
    let x = [
        1.0f32 + 2f32.powi(-11),
        1.0 + 3.0 * 2f32.powi(-11),
        1.0 + 2f32.powi(-8),
    ];
    let mut act = PreparedActivations::new();
    act.prepare(QuantType::F16, &x, 3, 1);
    assert_eq!(
        act.f16s[..3].iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
        vec![1.0, 1.0 + 2f32.powi(-9), 1.0 + 2f32.powi(-8)]
    );
    act.prepare(QuantType::BF16, &x, 3, 1);
    assert_eq!(act.bf16s[0], bf16::from_f32(1.0));
    assert_eq!(act.bf16s[2], bf16::from_bits(0x3F80)); // tie 1 + 2^-8 rounds to even (1.0)
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_scalar_f16_conversion_is_exact() {
    for h in 0..=u16::MAX {
        let a = super::avx2::f16_to_f32(F16Bytes(h.to_le_bytes()));
        let b = f16::from_bits(h).to_f32();
        assert!(
            a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
            "{h:#06x}: {a} vs {b}"
        );
    }
}

#[test]
fn simd_activation_quantizers_match_reference() {
    for_each_simd_table(simd_activation_quantizers_match_reference_with);
}

fn simd_activation_quantizers_match_reference_with() {
    let k = current();
    let mut rng = Rng::new(21);
    let n = 8 * QK_K;
    let mut x = random_acts(&mut rng, n);
    // an all-zero block of each size, subnormal and huge values
    x[..QK_K].fill(0.0);
    x[QK_K..QK_K + 8].copy_from_slice(&[1e-40, -3e-41, 1e30, -1e30, 5.0, 0.0, -0.0, 2.5]);
    // ties: multiples of amax / 127 / 2 (x * 127 / amax lands on .5 exactly when representable)
    for (i, v) in x[2 * QK_K..3 * QK_K].iter_mut().enumerate() {
        *v = ((i % 255) as f32 - 127.0) * 0.5;
    }
    // exact ties: amax = 127 gives scale 1 (Q8_0/Q8_1) and -1 (Q8_K)
    for (j, v) in x[5 * QK_K..6 * QK_K].iter_mut().enumerate() {
        *v = if j % 32 == 0 {
            127.0
        } else {
            (j % 32) as f32 - 16.5
        };
    }
    // largest magnitude with both signs: the first one sets the Q8_K sign
    x[3 * QK_K + 5] = -9.0;
    x[3 * QK_K + 77] = 9.0;
    x[4 * QK_K + 3] = 9.0;
    x[4 * QK_K + 200] = -9.0;
    let nb = n / QK;
    let (mut a0, mut r0) = (
        vec![BlockQ8_0::default(); nb],
        vec![BlockQ8_0::default(); nb],
    );
    let (mut a1, mut r1) = (
        vec![BlockQ8_1::default(); nb],
        vec![BlockQ8_1::default(); nb],
    );
    let nk = n / QK_K;
    let (mut ak, mut rk) = (vec![BlockQ8K::default(); nk], vec![BlockQ8K::default(); nk]);
    // SAFETY: the table is one this CPU runs; lengths match.
    unsafe {
        (k.quantize_q8_0)(&x, &mut a0);
        (k.quantize_q8_1)(&x, &mut a1);
        (k.quantize_q8_k)(&x, &mut ak);
    }
    quantize_row_q8_0(&x, &mut r0);
    quantize_row_q8_1(&x, &mut r1);
    quantize_row_q8_k(&x, &mut rk);
    assert_eq!(blocks_as_bytes(&a0), blocks_as_bytes(&r0), "{}", k.name);
    assert_eq!(blocks_as_bytes(&a1), blocks_as_bytes(&r1));
    for (i, (a, r)) in ak.iter().zip(&rk).enumerate() {
        assert_eq!(a.d.to_bits(), r.d.to_bits(), "q8_K block {i} d");
        assert_eq!(a.qs, r.qs, "q8_K block {i} qs");
        assert_eq!(a.bsums, r.bsums, "q8_K block {i} bsums");
    }
}

#[test]
fn row_grouped_matmul_is_bitwise_equal_to_single_rows() {
    for_each_simd_table(|| {
        // count = 1 uses four-row kernels for whole groups of four rows; compare with one row at a
        // time (single-row kernels), including random block bytes.
        let mut rng = Rng::new(22);
        for ty in QuantType::ALL {
            for random_bytes in [false, true] {
                let cols = if ty.is_quantized() { 768 } else { 133 };
                let rows = 11;
                let w = make_weights(ty, rows, cols, &mut rng, random_bytes);
                let rb = ty.row_bytes(cols).unwrap();
                let x = random_acts(&mut rng, cols);
                let mut act = PreparedActivations::new();
                act.prepare(ty, &x, cols, 1);
                let mut y = vec![0f32; rows];
                matmul(ty, &w, rows, cols, &act, &mut y);
                for r in 0..rows {
                    let mut y1 = [0f32];
                    matmul(ty, &w[r * rb..(r + 1) * rb], 1, cols, &act, &mut y1);
                    assert_eq!(
                        y[r].to_bits(),
                        y1[0].to_bits(),
                        "{ty} rb={random_bytes} r={r}"
                    );
                }
            }
        }
    });
}

#[test]
fn batched_matmul_is_bitwise_equal_to_single_vectors() {
    for_each_simd_table(|| {
        let mut rng = Rng::new(16);
        for ty in QuantType::ALL {
            let cols = if ty.is_quantized() { 512 } else { 517 };
            let (rows, count) = (41, 9);
            let w = make_weights(ty, rows, cols, &mut rng, false);
            let x = random_acts(&mut rng, cols * count);
            let mut act = PreparedActivations::new();
            act.prepare(ty, &x, cols, count);
            let mut y = vec![0f32; rows * count];
            matmul(ty, &w, rows, cols, &act, &mut y);
            let mut yr = vec![0f32; rows * count];
            matmul_reference(ty, &w, rows, cols, &act, &mut yr);
            let mut one = PreparedActivations::new();
            for b in 0..count {
                one.prepare(ty, &x[b * cols..(b + 1) * cols], cols, 1);
                let mut y1 = vec![0f32; rows];
                matmul(ty, &w, rows, cols, &one, &mut y1);
                let mut y1r = vec![0f32; rows];
                matmul_reference(ty, &w, rows, cols, &one, &mut y1r);
                for r in 0..rows {
                    assert_eq!(
                        y[b * rows + r].to_bits(),
                        y1[r].to_bits(),
                        "{ty} fast b={b} r={r}"
                    );
                    assert_eq!(
                        yr[b * rows + r].to_bits(),
                        y1r[r].to_bits(),
                        "{ty} reference b={b} r={r}"
                    );
                }
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 5. f64-accumulating matmul (grouping independence for tensor parallelism)

/// Σ|contribution| of weight row `w` with activation vector `b` (the scale of f64 rounding).
fn contribution_mag(ty: QuantType, w: &[u8], act: &PreparedActivations, b: usize) -> f64 {
    let mut m = 0f64;
    reference::for_each_contribution(ty, w, act.row(b), |_, c| m += c.abs());
    m
}

/// Exact byte image of a prepared activation vector (for equality checks).
fn act_image(row: ActRow) -> Vec<u8> {
    match row {
        ActRow::F32(a) => a.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        ActRow::F16(a) => a.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        ActRow::BF16(a) => a.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        ActRow::Q8_0(a) => blocks_as_bytes(a).to_vec(),
        ActRow::Q8_1(a) => blocks_as_bytes(a).to_vec(),
        ActRow::Q8K(a) => a
            .iter()
            .flat_map(|blk| {
                let mut v = blk.d.to_bits().to_le_bytes().to_vec();
                v.extend(blk.qs.iter().map(|&q| q as u8));
                v.extend(blk.bsums.iter().flat_map(|s| s.to_le_bytes()));
                v
            })
            .collect(),
    }
}

/// Elements `lo..hi` (block-aligned) of a prepared activation vector.
fn act_sub(row: ActRow<'_>, lo: usize, hi: usize) -> ActRow<'_> {
    match row {
        ActRow::F32(a) => ActRow::F32(&a[lo..hi]),
        ActRow::F16(a) => ActRow::F16(&a[lo..hi]),
        ActRow::BF16(a) => ActRow::BF16(&a[lo..hi]),
        ActRow::Q8_0(a) => ActRow::Q8_0(&a[lo / QK..hi / QK]),
        ActRow::Q8_1(a) => ActRow::Q8_1(&a[lo / QK..hi / QK]),
        ActRow::Q8K(a) => ActRow::Q8K(&a[lo / QK_K..hi / QK_K]),
    }
}

fn check_f64_type(ty: QuantType, random_bytes: bool, tag: u64) {
    // block counts that are not multiples of 4 exercise the tails of the 4-block loops, and
    // rows of 1 and 2 blocks (narrow expert slices) the packed groups
    let sizes: &[usize] = match ty.block_elements() {
        1 => &[1003],
        QK => &[35 * QK, QK, 2 * QK, 3 * QK],
        _ => &[5 * QK_K, QK_K, 2 * QK_K],
    };
    for (i, &cols) in sizes.iter().enumerate() {
        check_f64_shape(ty, random_bytes, tag + 1000 * i as u64, cols);
    }
}

fn check_f64_shape(ty: QuantType, random_bytes: bool, tag: u64, cols: usize) {
    let mut rng = Rng::new(tag);
    let rows = 67;
    let w = make_weights(ty, rows, cols, &mut rng, random_bytes);
    let rb = ty.row_bytes(cols).unwrap();
    let wdeq: Vec<Vec<f32>> = w.chunks_exact(rb).map(|r| deq(ty, r, cols)).collect();
    let mut act = PreparedActivations::new();
    let (mut worst_ref, mut worst_f32, mut bitwise, mut total) = (0f64, 0f64, 0usize, 0usize);
    for count in [1usize, 3, 8] {
        let x = random_acts(&mut rng, cols * count);
        act.prepare(ty, &x, cols, count);
        let mut y = vec![f64::NAN; rows * count];
        let mut yr = vec![f64::NAN; rows * count];
        let mut y32 = vec![f32::NAN; rows * count];
        matmul_f64(ty, &w, rows, cols, &act, &mut y);
        matmul_f64_reference(ty, &w, rows, cols, &act, &mut yr);
        matmul(ty, &w, rows, cols, &act, &mut y32);
        for b in 0..count {
            let xq = act.dequantize(b);
            for r in 0..rows {
                let i = b * rows + r;
                let mag = contribution_mag(ty, &w[r * rb..(r + 1) * rb], &act, b);
                let d = (y[i] - yr[i]).abs();
                assert_eq!(
                    y[i].to_bits(),
                    yr[i].to_bits(),
                    "{ty} rb={random_bytes} count={count} b={b} r={r}: f64 kernels {} not bitwise equal to the reference {}",
                    y[i],
                    yr[i]
                );
                assert!(
                    d <= 1e-12 * mag,
                    "{ty} rb={random_bytes} count={count} b={b} r={r}: fast {} vs ref {} (Σ|c| {mag})",
                    y[i],
                    yr[i]
                );
                worst_ref = worst_ref.max(d / mag.max(1e-300));
                bitwise += (y[i].to_bits() == yr[i].to_bits()) as usize;
                total += 1;
                // vs the f32 kernels: the budget of `check_type` (fast vs reference)
                let mag_q: f64 = wdeq[r]
                    .iter()
                    .zip(&xq)
                    .map(|(a, c)| (*a as f64 * *c as f64).abs())
                    .sum();
                let d32 = (y[i] - y32[i] as f64).abs();
                assert!(
                    d32 <= 1e-5 * mag_q + 1e-30,
                    "{ty} rb={random_bytes} count={count} b={b} r={r}: f64 {} vs f32 {} (|w.x| {mag_q})",
                    y[i],
                    y32[i]
                );
                worst_f32 = worst_f32.max(d32 / mag_q.max(1e-30));
            }
        }
    }
    println!(
        "{ty} {cols} columns (random bytes: {random_bytes}, kernels {}): f64 fast==ref bitwise {bitwise}/{total}, worst |fast-ref|/Σ|c| = {worst_ref:.2e}, worst |f64-f32|/Σ|w x| = {worst_f32:.2e}",
        current().name
    );
}

#[test]
fn matmul_f64_matches_reference_and_f32() {
    for_each_simd_table(|| {
        for (i, ty) in QuantType::ALL.into_iter().enumerate() {
            check_f64_type(ty, false, 300 + i as u64);
            if ty.is_quantized() {
                check_f64_type(ty, true, 320 + i as u64);
            }
        }
    });
}

/// Splits the columns into `parts` at block boundaries, computes each part on its own column
/// slice of the weights and its own prepared activations, and checks that the f64 sum of the
/// parts equals the full `matmul_f64` (same f32 after rounding, within 1e-12 of Σ|c|).
#[test]
fn matmul_f64_is_independent_of_column_split() {
    for_each_simd_table(|| {
        let mut rng = Rng::new(17);
        for ty in QuantType::ALL {
            // the split granularity is 32 elements for legacy and float types, 256 for K-quants
            let unit = ty.block_elements().max(QK);
            let nunits = if unit == QK_K { 14 } else { 100 };
            let cols = nunits * unit;
            let (rows, count) = (256, 4);
            let w = make_weights(ty, rows, cols, &mut rng, false);
            let rb = ty.row_bytes(cols).unwrap();
            let x = random_acts(&mut rng, cols * count);
            let mut full = PreparedActivations::new();
            full.prepare(ty, &x, cols, count);
            let mut y_full = vec![0f64; rows * count];
            matmul_f64(ty, &w, rows, cols, &full, &mut y_full);
            let mut y32_full = vec![0f32; rows * count];
            matmul(ty, &w, rows, cols, &full, &mut y32_full);
            let mags: Vec<f64> = (0..count)
                .flat_map(|b| {
                    let (w, full) = (&w, &full);
                    (0..rows).map(move |r| contribution_mag(ty, &w[r * rb..(r + 1) * rb], full, b))
                })
                .collect();

            // splits: 1/3 of the units (rounded), a 3-way uneven split, and one unit off each end
            let third = (nunits as f64 / 3.0).round() as usize;
            let splits: Vec<Vec<usize>> = vec![
                vec![0, third, nunits],
                vec![0, 1, nunits / 2 + 1, nunits],
                vec![0, nunits - 1, nunits],
            ];
            for cuts in splits {
                let mut y_sum = vec![0f64; rows * count];
                let mut y32_sum = vec![0f32; rows * count];
                for p in cuts.windows(2) {
                    let (lo, hi) = (p[0] * unit, p[1] * unit);
                    let pc = hi - lo;
                    let (blo, bhi) = (ty.row_bytes(lo).unwrap(), ty.row_bytes(hi).unwrap());
                    let wp: Vec<u8> = w
                        .chunks_exact(rb)
                        .flat_map(|row| row[blo..bhi].iter().copied())
                        .collect();
                    let xp: Vec<f32> = x
                        .chunks_exact(cols)
                        .flat_map(|v| v[lo..hi].iter().copied())
                        .collect();
                    let mut part = PreparedActivations::new();
                    part.prepare(ty, &xp, pc, count);
                    for b in 0..count {
                        assert_eq!(
                            act_image(part.row(b)),
                            act_image(act_sub(full.row(b), lo, hi)),
                            "{ty}: preparing columns {lo}..{hi} differs from the full vector's blocks"
                        );
                    }
                    let mut yp = vec![0f64; rows * count];
                    matmul_f64(ty, &wp, rows, pc, &part, &mut yp);
                    let mut ypr = vec![0f64; rows * count];
                    matmul_f64_reference(ty, &wp, rows, pc, &part, &mut ypr);
                    assert_eq!(yp, ypr, "{ty}: part {lo}..{hi} fast vs reference");
                    let mut y32p = vec![0f32; rows * count];
                    matmul(ty, &wp, rows, pc, &part, &mut y32p);
                    for i in 0..rows * count {
                        y_sum[i] += yp[i];
                        y32_sum[i] += y32p[i];
                    }
                }
                let mut same = 0usize;
                let mut same32 = 0usize;
                let mut worst = 0f64;
                for i in 0..rows * count {
                    let d = (y_sum[i] - y_full[i]).abs();
                    assert!(
                        d <= 1e-12 * mags[i],
                        "{ty} cuts {cuts:?} output {i}: split {} vs full {} (Σ|c| {})",
                        y_sum[i],
                        y_full[i],
                        mags[i]
                    );
                    worst = worst.max(d / mags[i].max(1e-300));
                    same += ((y_sum[i] as f32).to_bits() == (y_full[i] as f32).to_bits()) as usize;
                    same32 += (y32_sum[i].to_bits() == y32_full[i].to_bits()) as usize;
                }
                let n = rows * count;
                println!(
                    "{ty} cuts {cuts:?}: f64 split == full after f32 rounding {same}/{n}, worst |diff|/Σ|c| {worst:.1e} (f32 matmul: {same32}/{n} bitwise)"
                );
                assert!(
                    same * 1000 >= n * 999,
                    "{ty} cuts {cuts:?}: only {same}/{n} outputs round to the same f32"
                );
            }
        }
    });
}

#[test]
fn matmul_f64_large_parallel_is_bitwise_reference() {
    for_each_simd_table(|| {
        let pool = crate::kernels::pool::ThreadPool::new(3, None).unwrap();
        pool.install(matmul_f64_large_parallel_in_pool);
    });
}

fn matmul_f64_large_parallel_in_pool() {
    let mut rng = Rng::new(18);
    for ty in [
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q8_0,
        QuantType::Q4_K,
        QuantType::Q6_K,
        QuantType::F16,
    ] {
        let (rows, cols, count) = (1000, 512, 2);
        let w = make_weights(ty, rows, cols, &mut rng, false);
        let x = random_acts(&mut rng, cols * count);
        let mut act = PreparedActivations::new();
        act.prepare(ty, &x, cols, count);
        let mut y = vec![f64::NAN; rows * count];
        let mut yr = vec![f64::NAN; rows * count];
        matmul_f64(ty, &w, rows, cols, &act, &mut y);
        matmul_f64_reference(ty, &w, rows, cols, &act, &mut yr);
        for (i, (a, b)) in y.iter().zip(&yr).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{ty} {i}: {a} vs {b}");
        }
    }
}

/// Timing of `matmul` vs `matmul_f64` (run with `--ignored --nocapture`).
#[test]
#[ignore]
fn bench_matmul_f64() {
    let mut rng = Rng::new(19);
    for (ty, rows, cols) in [
        (QuantType::Q4_K, 4096, 4096),
        (QuantType::Q4_1, 1536, 576),
        (QuantType::Q4_1, 576, 1536),
        (QuantType::Q4_0, 4096, 4096),
        (QuantType::Q8_0, 4096, 4096),
        (QuantType::Q6_K, 4096, 4096),
        (QuantType::Q5_K, 4096, 4096),
        (QuantType::F16, 1024, 4096),
    ] {
        let w = make_weights(ty, rows, cols, &mut rng, false);
        for count in [1usize, 8] {
            let x = random_acts(&mut rng, cols * count);
            let mut act = PreparedActivations::new();
            act.prepare(ty, &x, cols, count);
            let mut y32 = vec![0f32; rows * count];
            let mut y64 = vec![0f64; rows * count];
            let iters = (2e9 / (rows * cols * count) as f64).clamp(20.0, 20000.0) as usize;
            let time = |f: &mut dyn FnMut()| {
                for _ in 0..iters / 10 + 1 {
                    f();
                }
                let mut best = f64::MAX;
                for _ in 0..5 {
                    let t = std::time::Instant::now();
                    for _ in 0..iters / 5 {
                        f();
                    }
                    best = best.min(t.elapsed().as_secs_f64() / (iters / 5) as f64);
                }
                best
            };
            let t32 = time(&mut || matmul(ty, &w, rows, cols, &act, &mut y32));
            let t64 = time(&mut || matmul_f64(ty, &w, rows, cols, &act, &mut y64));
            println!(
                "{ty} {rows}x{cols} count {count} ({} threads, {}): matmul {:.1} us, matmul_f64 {:.1} us, ratio {:.2}",
                crate::kernels::pool::threads(),
                current().name,
                t32 * 1e6,
                t64 * 1e6,
                t64 / t32
            );
        }
    }
}

/// Decode (count = 1) timing in ns per 32 weights (a legacy block; K-quants use 512 columns
/// where 576 is not a whole number of super-blocks) in a 1-thread pool, the same call in a
/// 2-thread pool, the 4-activation batch, and `prepare` for one vector
/// (run with `--release -- --ignored --nocapture bench_matmul_decode`).
#[test]
#[ignore]
fn bench_matmul_decode() {
    let mut rng = Rng::new(20);
    let pool1 = crate::kernels::pool::ThreadPool::new(1, None).unwrap();
    let pool2 = crate::kernels::pool::ThreadPool::new(2, None).unwrap();
    let time = |iters: usize, f: &mut dyn FnMut()| {
        for _ in 0..iters / 10 + 1 {
            f();
        }
        let mut best = f64::MAX;
        for _ in 0..7 {
            let t = std::time::Instant::now();
            for _ in 0..iters / 5 {
                f();
            }
            best = best.min(t.elapsed().as_secs_f64() / (iters / 5) as f64);
        }
        best
    };
    let types = [
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q8_0,
        QuantType::Q4_K,
        QuantType::Q6_K,
    ];
    let mut shapes = vec![
        (1536usize, 576usize),
        (576, 1536),
        (49152, 576),
        (576, 576),
        (192, 576),
    ];
    // TP_BENCH_L1=1 adds an L1-resident shape (pure compute)
    if std::env::var("TP_BENCH_L1").is_ok() {
        shapes.push((32, 1024));
    }
    // e.g. TP_BENCH_TYPES=Q8_0,Q4_1 to time only some types
    let only = std::env::var("TP_BENCH_TYPES").unwrap_or_default();
    for ty in types {
        if !only.is_empty() && !only.split(',').any(|t| t == ty.name()) {
            continue;
        }
        for &(rows, cols) in &shapes {
            // K-quants need whole 256-element super-blocks
            let cols = if cols % ty.block_elements() == 0 {
                cols
            } else {
                512
            };
            let w = make_weights(ty, rows, cols, &mut rng, false);
            let x = random_acts(&mut rng, cols);
            let mut act = PreparedActivations::new();
            act.prepare(ty, &x, cols, 1);
            let mut y = vec![0f32; rows];
            let iters = (3e8 / (rows * cols) as f64).clamp(10.0, 200000.0) as usize;
            let blocks = (rows * cols / QK) as f64;
            let t1 =
                pool1.install(|| time(iters, &mut || matmul(ty, &w, rows, cols, &act, &mut y)));
            let t2 =
                pool2.install(|| time(iters, &mut || matmul(ty, &w, rows, cols, &act, &mut y)));
            let mut y64 = vec![0f64; rows];
            let t64 = pool1.install(|| {
                time(iters, &mut || {
                    matmul_f64(ty, &w, rows, cols, &act, &mut y64)
                })
            });
            let mut act4 = PreparedActivations::new();
            let x4 = random_acts(&mut rng, cols * 4);
            act4.prepare(ty, &x4, cols, 4);
            let mut y4 = vec![0f32; rows * 4];
            let t4 = pool1.install(|| {
                time(iters / 4 + 5, &mut || {
                    matmul(ty, &w, rows, cols, &act4, &mut y4)
                })
            });
            println!(
                "{ty:>5} {rows:>5}x{cols:<5} ({}): count=1 1 thread {:6.2} ns/blk ({:7.1} us; f64 {:6.2} ns/blk), 2 threads {:7.1} us; count=4 {:6.2} ns/blk/vec",
                current().name,
                t1 * 1e9 / blocks,
                t1 * 1e6,
                t64 * 1e9 / blocks,
                t2 * 1e6,
                t4 * 1e9 / blocks / 4.0
            );
        }
    }
    for ty in [QuantType::Q8_0, QuantType::Q4_1, QuantType::Q4_K] {
        for len in [576usize, 1536] {
            let len = if len % ty.block_elements() == 0 {
                len
            } else {
                512
            };
            let x = random_acts(&mut rng, len);
            let mut act = PreparedActivations::new();
            let t = pool1.install(|| time(100000, &mut || act.prepare(ty, &x, len, 1)));
            println!("prepare {ty} len {len}: {:.2} us", t * 1e6);
        }
    }
}

/// Cost of splitting a given amount of work into pool tasks on a 2-thread pool (the basis of
/// `PARALLEL_MATMUL_MIN`).
#[test]
#[ignore]
fn bench_pool_overhead() {
    let pool2 = crate::kernels::pool::ThreadPool::new(2, None).unwrap();
    for spin_ns in [0u64, 3000, 10000, 30000] {
        for tasks in [1usize, 2, 4, 8, 16] {
            let t = pool2.install(|| {
                let n = (200_000_000 / (spin_ns + 2000)) as usize;
                let t0 = std::time::Instant::now();
                for _ in 0..n {
                    crate::kernels::pool::for_each(tasks, |_| {
                        let e = std::time::Instant::now();
                        while (e.elapsed().as_nanos() as u64) < spin_ns / tasks as u64 {}
                    });
                }
                t0.elapsed().as_secs_f64() / n as f64
            });
            println!(
                "work {spin_ns} ns in {tasks} tasks: {:.2} us per call",
                t * 1e6
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// attention

/// The selected attention kernel against the scalar reference, for head sizes with and without
/// a register form, context lengths around the 8-lane tail, a strided cache layout, and with
/// and without a sink logit (gpt-oss); a sink only rescales the output, by the share of the
/// softmax it takes.
#[test]
fn attend_matches_reference() {
    for_each_simd_table(|| {
        let mut rng = Rng::new(31);
        for hd in [32usize, 64, 72, 128, 192, 256] {
            for (n, sink) in [1usize, 7, 8, 9, 33, 300]
                .into_iter()
                .flat_map(|n| [(n, f32::NEG_INFINITY), (n, 0.7), (n, -3.0)])
            {
                let stride = 3 * hd; // three KV heads per position
                let cache = |rng: &mut Rng| -> Vec<f16> {
                    random_acts(rng, (n - 1) * stride + hd)
                        .iter()
                        .map(|&x| f16::from_f32(x))
                        .collect()
                };
                let (keys, values) = (cache(&mut rng), cache(&mut rng));
                let query: Vec<f16> = random_acts(&mut rng, hd)
                    .iter()
                    .map(|&x| f16::from_f32(2.0 * x))
                    .collect();
                let scale = 1.0 / (hd as f32).sqrt();
                let mut scores = Vec::new();
                let mut out = vec![f32::NAN; hd];
                attend(
                    &query,
                    &keys,
                    &values,
                    stride,
                    n,
                    scale,
                    sink,
                    &mut scores,
                    &mut out,
                );
                let mut ref_scores = vec![0f32; n];
                let mut ref_out = vec![f32::NAN; hd];
                // SAFETY: the cache holds (n - 1) * stride + hd elements.
                unsafe {
                    reference::attend(
                        &query,
                        keys.as_ptr(),
                        values.as_ptr(),
                        &Rows::contiguous(stride),
                        n,
                        scale,
                        sink,
                        &mut ref_scores,
                        &mut ref_out,
                    )
                };
                if sink.is_finite() {
                    // Against the output without a sink, scaled by 1 - p(sink) (in f64).
                    let mut plain = vec![f32::NAN; hd];
                    unsafe {
                        reference::attend(
                            &query,
                            keys.as_ptr(),
                            values.as_ptr(),
                            &Rows::contiguous(stride),
                            n,
                            scale,
                            f32::NEG_INFINITY,
                            &mut ref_scores,
                            &mut plain,
                        )
                    };
                    let logits: Vec<f64> = (0..n)
                        .map(|t| {
                            let key = &keys[t * stride..t * stride + hd];
                            let dot: f64 = query
                                .iter()
                                .zip(key)
                                .map(|(a, b)| a.to_f64() * b.to_f64())
                                .sum();
                            dot * scale as f64
                        })
                        .collect();
                    let sum: f64 = logits.iter().map(|l| l.exp()).sum();
                    let keep = sum / (sum + (sink as f64).exp());
                    for (a, b) in ref_out.iter().zip(&plain) {
                        let want = *b as f64 * keep;
                        assert!(
                            (*a as f64 - want).abs() <= 1e-4 * want.abs().max(0.01),
                            "hd {hd} n {n} sink {sink}: {a} vs {want}"
                        );
                    }
                }
                for (i, (a, b)) in out.iter().zip(&ref_out).enumerate() {
                    assert!(
                        (a - b).abs() <= 2e-5 * b.abs().max(0.1),
                        "hd {hd} n {n} [{i}]: {a} vs {b}"
                    );
                }
            }
        }
    });
}

#[test]
fn sum_exp_matches_reference() {
    for_each_simd_table(|| {
        let mut rng = Rng::new(32);
        for n in [1usize, 7, 8, 9, 1000, 49152] {
            let row: Vec<f32> = (0..n).map(|_| rng.value(8.0)).collect();
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let (fast, slow) = (sum_exp(&row, max), reference::sum_exp(&row, max));
            assert!(
                (fast - slow).abs() <= 1e-6 * slow,
                "n {n}: {fast} vs {slow}"
            );
            assert!(slow >= 1.0);
        }
    });
}

/// The NEON kernels keep the reference's float steps around exact integer sums, so they must
/// equal it bit for bit, f32 and f64 alike, on well-formed and on random blocks. On x86 hosts
/// `scripts/test-aarch64.sh` runs this under qemu-aarch64.
#[cfg(target_arch = "aarch64")]
#[test]
fn neon_kernels_are_bitwise_equal_to_the_reference() {
    assert_eq!(current().name, "neon");
    for (i, ty) in QuantType::ALL.into_iter().enumerate() {
        if !ty.is_quantized() {
            continue;
        }
        for random_bytes in [false, true] {
            let mut rng = Rng::new(700 + 2 * i as u64 + random_bytes as u64);
            let cols = 7 * ty.block_elements().max(QK);
            let rows = 9;
            let w = make_weights(ty, rows, cols, &mut rng, random_bytes);
            let mut act = PreparedActivations::new();
            for count in [1usize, 5] {
                let x = random_acts(&mut rng, cols * count);
                act.prepare(ty, &x, cols, count);
                let mut fast = vec![f32::NAN; rows * count];
                let mut slow = vec![f32::NAN; rows * count];
                matmul(ty, &w, rows, cols, &act, &mut fast);
                matmul_reference(ty, &w, rows, cols, &act, &mut slow);
                let mut fast64 = vec![f64::NAN; rows * count];
                let mut slow64 = vec![f64::NAN; rows * count];
                matmul_f64(ty, &w, rows, cols, &act, &mut fast64);
                matmul_f64_reference(ty, &w, rows, cols, &act, &mut slow64);
                for k in 0..rows * count {
                    assert_eq!(
                        fast[k].to_bits(),
                        slow[k].to_bits(),
                        "{ty} random={random_bytes} count={count} #{k}: {} vs {}",
                        fast[k],
                        slow[k]
                    );
                    assert_eq!(
                        fast64[k].to_bits(),
                        slow64[k].to_bits(),
                        "{ty} random={random_bytes} count={count} #{k} (f64): {} vs {}",
                        fast64[k],
                        slow64[k]
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 5. dequantization against an independent implementation (gguf-py)

/// Every quantized type's scalar dequantization equals gguf-py's bit for bit on random blocks
/// (fixture written by `tests/data/quants/make_quant_oracle.py`).
#[test]
fn dequantization_matches_gguf_py() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/quants");
    let mut checked = Vec::new();
    for ty in QuantType::ALL.into_iter().filter(|t| t.is_quantized()) {
        let read = |ext: &str| {
            let p = dir.join(format!("{ty}.{ext}"));
            std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        };
        let blocks = read("blocks");
        let expect: Vec<f32> = read("f32")
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let got = deq(ty, &blocks, expect.len());
        for (i, (g, e)) in got.iter().zip(&expect).enumerate() {
            assert_eq!(
                g.to_bits(),
                e.to_bits(),
                "{ty} element {i}: ours {g:e}, gguf-py {e:e}"
            );
        }
        println!("{ty}: {} values bitwise equal to gguf-py", got.len());
        checked.push(ty);
    }
    assert_eq!(checked.len(), 13, "every quantized type has an oracle file");
}

/// The AVX-512 instantiation runs the AVX2 kernels' float operations in the same order (only
/// the exact integer block sums are computed differently), so its f32 products equal AVX2's
/// bit for bit.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx512_products_equal_avx2_bitwise() {
    let (Some(a2), Some(a5)) = (runnable("avx2"), runnable("avx512")) else {
        println!(
            "avx512_products_equal_avx2_bitwise: this CPU lacks AVX-512 VNNI; compared nothing"
        );
        return;
    };
    let mut rng = Rng::new(41);
    for ty in QuantType::ALL {
        for random_bytes in [false, true] {
            let cols = if ty.is_quantized() { 1024 } else { 515 };
            let (rows, count) = (37, 5);
            let w = make_weights(ty, rows, cols, &mut rng, random_bytes && ty.is_quantized());
            let x = random_acts(&mut rng, cols * count);
            let mut act = PreparedActivations::new();
            act.prepare(ty, &x, cols, count);
            let (mut y2, mut y5) = (vec![0f32; rows * count], vec![0f32; rows * count]);
            matmul_with(a2, ty, &w, rows, cols, &act, &mut y2, false);
            matmul_with(a5, ty, &w, rows, cols, &act, &mut y5, false);
            let bits = |y: &[f32]| y.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&y2), bits(&y5), "{ty} random bytes {random_bytes}");
        }
    }
}

/// Prompt-batch products: multiply-adds per second of `matmul` and `matmul_f64` on one thread
/// for every SIMD kernel set, a 1536 x 1536 matrix of each type against 128 activations (a
/// prompt chunk) and 16 (a decode step of 16 sequences).
/// `cargo test --release --lib bench_matmul_batched -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_matmul_batched() {
    let mut rng = Rng::new(23);
    let (rows, cols) = (1536, 1536);
    // e.g. TP_BENCH_TYPES=Q8_0,Q4_1 to time only some types
    let only = std::env::var("TP_BENCH_TYPES").unwrap_or_default();
    for (ty, count) in QuantType::ALL
        .into_iter()
        .filter(|t| t.is_quantized())
        .filter(|t| only.is_empty() || only.split(',').any(|o| o == t.name()))
        .flat_map(|t| [(t, 16), (t, 128)])
    {
        let w = make_weights(ty, rows, cols, &mut rng, false);
        let x = random_acts(&mut rng, cols * count);
        let mut act = PreparedActivations::new();
        act.prepare(ty, &x, cols, count);
        let mut y32 = vec![0f32; rows * count];
        let mut y64 = vec![0f64; rows * count];
        for k in simd_tables() {
            let best = |f: &mut dyn FnMut()| {
                f();
                (0..3)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        f();
                        t.elapsed().as_secs_f64()
                    })
                    .fold(f64::MAX, f64::min)
            };
            let t32 = best(&mut || matmul_with(k, ty, &w, rows, cols, &act, &mut y32, false));
            let t64 =
                best(&mut || matmul_f64_with(k.wide, ty, &w, rows, cols, &act, &mut y64, false));
            let macs = (rows * cols * count) as f64;
            println!(
                "{ty:6} {:6} {rows}x{cols} x {count}: matmul {:6.1} GMAC/s, matmul_f64 {:6.1} GMAC/s",
                k.name,
                macs / t32 / 1e9,
                macs / t64 / 1e9
            );
        }
    }
}

/// The tiled GEMM's loops at sizes the other tests do not reach: rows longer than its chunk of
/// 2,048 elements, several groups of 16 activations with a padded last group, a partial last
/// tile of rows; bitwise equal to the reference in every kernel set (f64), and to each vector's
/// product alone (f32: the tiled form of the legacy types' llama.cpp order). Two batches prepared one
/// after the other into the same buffer, each multiplied twice, check that the interleaved
/// activations are made again for a new batch and reused for the same one.
#[test]
#[cfg(target_arch = "x86_64")]
fn tiled_products_of_long_rows_and_many_vectors_are_exact() {
    for_each_simd_table(|| {
        let mut rng = Rng::new(29);
        let mut act = PreparedActivations::new();
        let k = current().wide.tiled;
        for ty in QuantType::ALL
            .into_iter()
            .filter(|&t| tiled::supports(t, Tiled::Vnni))
        {
            // Every type the VNNI form takes; the AVX2 form takes all but IQ4_XS and Q8_0.
            let avx2 = !matches!(ty, QuantType::IQ4_XS | QuantType::Q8_0);
            assert_eq!(
                tiled::supports(ty, k),
                k == Tiled::Vnni || avx2,
                "{ty} {k:?}"
            );
            // The 32-element types: 155 blocks, not a whole number of super-blocks, two chunks
            // of 64 and a partial one.
            let cols = 19 * QK_K
                + if ty.act_kind() == ActKind::Q8K {
                    0
                } else {
                    3 * QK
                };
            let (rows, count) = (21, 37);
            let w = make_weights(ty, rows, cols, &mut rng, true);
            for _batch in 0..2 {
                let x = random_acts(&mut rng, cols * count);
                act.prepare(ty, &x, cols, count);
                let mut yr = vec![0f64; rows * count];
                matmul_f64_reference(ty, &w, rows, cols, &act, &mut yr);
                // f32: each vector's products equal a lone vector's (the row kernels', in
                // llama.cpp's order for the types that keep it, else the f64 ones rounded).
                let mut y32 = vec![0f32; rows * count];
                matmul(ty, &w, rows, cols, &act, &mut y32);
                let mut one = PreparedActivations::new();
                for b in [0, 15, 16, count - 1] {
                    one.prepare(ty, &x[b * cols..(b + 1) * cols], cols, 1);
                    let mut y1 = vec![0f32; rows];
                    matmul(ty, &w, rows, cols, &one, &mut y1);
                    for r in 0..rows {
                        let (a, c) = (y32[b * rows + r], y1[r]);
                        assert_eq!(a.to_bits(), c.to_bits(), "{ty} f32 b={b} r={r}: {a} vs {c}");
                    }
                }
                for _product in 0..2 {
                    let mut y = vec![0f64; rows * count];
                    matmul_f64(ty, &w, rows, cols, &act, &mut y);
                    for (i, (a, b)) in y.iter().zip(&yr).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{ty} {}: {i}: {a} vs {b}",
                            current().name
                        );
                    }
                }
            }
        }
    });
}

/// Attention over a cache stored in each KV cache type (every pair of key and value types),
/// with the scalar table and every SIMD set, against f64 arithmetic on the same stored rows:
/// the keys and values dequantized, the query in the key type's dot-product form (f16, bf16,
/// or q8_0 for the quantized key types), as llama.cpp's flash attention forms it.
#[test]
fn attend_typed_matches_f64_over_the_stored_rows() {
    let types = [
        QuantType::F16,
        QuantType::BF16,
        QuantType::Q8_0,
        QuantType::Q4_0,
    ];
    let mut tables: Vec<&'static Kernels> = vec![&SCALAR];
    tables.extend(simd_tables());
    for k in tables {
        let mut rng = Rng::new(47);
        for (kt, vt) in types
            .iter()
            .flat_map(|&a| types.iter().map(move |&b| (a, b)))
        {
            // 36: an f16/bf16 head whose size is not a multiple of 8 (nor of a block).
            let sizes = [36usize, 32, 64, 128, 256];
            let fits = |hd: usize| kt.row_bytes(hd).is_some() && vt.row_bytes(hd).is_some();
            for hd in sizes.into_iter().filter(|&hd| fits(hd)) {
                for (n, sink) in [
                    (1usize, f32::NEG_INFINITY),
                    (9, 0.5),
                    (70, f32::NEG_INFINITY),
                ] {
                    let heads = 2; // rows of another head lie between a head's positions
                    let stored = |rng: &mut Rng, ty: QuantType| -> (Vec<u8>, usize) {
                        let row = ty.row_bytes(hd).unwrap();
                        let mut bytes = vec![0u8; n * heads * row];
                        for r in bytes.chunks_exact_mut(row) {
                            quantize_row(ty, &random_acts(rng, hd), r);
                        }
                        (bytes, heads * row)
                    };
                    let (keys, key_stride) = stored(&mut rng, kt);
                    let (values, value_stride) = stored(&mut rng, vt);
                    let query: Vec<f32> =
                        random_acts(&mut rng, hd).iter().map(|x| 2.0 * x).collect();
                    let scale = 1.0 / (hd as f32).sqrt();
                    let mut out = vec![f32::NAN; hd];
                    attend_typed_with(
                        k,
                        kt,
                        vt,
                        &query,
                        &keys,
                        &values,
                        &Rows::contiguous(key_stride),
                        &Rows::contiguous(value_stride),
                        n,
                        scale,
                        sink,
                        &mut AttendScratch::default(),
                        &mut out,
                    );
                    // The query as the key type's dot products see it.
                    let q_form = kt.act_kind();
                    let mut q = vec![0f32; hd];
                    let act_type = match q_form {
                        ActKind::F16 => QuantType::F16,
                        ActKind::BF16 => QuantType::BF16,
                        _ => QuantType::Q8_0,
                    };
                    let mut q_bytes = vec![0u8; act_type.row_bytes(hd).unwrap()];
                    quantize_row(act_type, &query, &mut q_bytes);
                    dequantize_row(act_type, &q_bytes, &mut q);
                    let row = |bytes: &[u8], ty: QuantType, stride: usize, t: usize| {
                        let mut v = vec![0f32; hd];
                        let len = ty.row_bytes(hd).unwrap();
                        dequantize_row(ty, &bytes[t * stride..t * stride + len], &mut v);
                        v
                    };
                    let logits: Vec<f64> = (0..n)
                        .map(|t| {
                            let key = row(&keys, kt, key_stride, t);
                            let dot: f64 =
                                q.iter().zip(&key).map(|(a, b)| *a as f64 * *b as f64).sum();
                            dot * scale as f64
                        })
                        .collect();
                    let max = logits.iter().copied().fold(sink as f64, f64::max);
                    let weights: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                    let sum: f64 = weights.iter().sum::<f64>() + (sink as f64 - max).exp();
                    let mut want = vec![0f64; hd];
                    for (t, w) in weights.iter().enumerate() {
                        for (o, v) in want.iter_mut().zip(row(&values, vt, value_stride, t)) {
                            *o += w * v as f64 / sum;
                        }
                    }
                    for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (*a as f64 - b).abs() <= 1e-4 * b.abs().max(0.1),
                            "{} {kt}/{vt} hd {hd} n {n} [{i}]: {a} vs {b}",
                            k.name
                        );
                    }
                }
            }
        }
    }
}

/// The fast rotation equals the product with the matrix built as ggml_gen_hadamard builds it,
/// and applied twice gives the input back.
#[test]
fn hadamard_rotation_is_ggml_s_matrix_and_its_own_inverse() {
    let mut rng = Rng::new(5);
    for n in [64usize, 128, 256] {
        let mut h = vec![0f64; n * n];
        h[0] = 1.0 / (n as f64).sqrt();
        let mut s = 1;
        while s < n {
            for i in 0..s {
                for j in 0..s {
                    let v = h[i * n + j];
                    h[(i + s) * n + j] = v;
                    h[i * n + j + s] = v;
                    h[(i + s) * n + j + s] = -v;
                }
            }
            s *= 2;
        }
        let x = random_acts(&mut rng, 2 * n);
        let mut y = x.clone();
        hadamard_rotate(&mut y, n);
        for c in 0..2 {
            for i in 0..n {
                let want: f64 = (0..n).map(|j| h[i * n + j] * x[c * n + j] as f64).sum();
                assert!((y[c * n + i] as f64 - want).abs() < 1e-5, "n {n} [{i}]");
            }
        }
        hadamard_rotate(&mut y, n);
        for (a, b) in y.iter().zip(&x) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}

/// A paged cache gives the same bits as a contiguous one: pages change where rows are read,
/// not the order of the arithmetic. Rows of each position are scattered over shuffled blocks of
/// 1, 4 and 16 positions (another head's rows between them, spare blocks around them), read
/// from position 0 and from a sliding window's later first position, by every kernel set, for
/// the f16 kernel (register and scalar head sizes) and the typed one (q8_0 keys, q4_0 values).
#[test]
fn paged_rows_give_the_contiguous_bits() {
    let mut tables: Vec<&'static Kernels> = vec![&SCALAR];
    tables.extend(simd_tables());
    let mut rng = Rng::new(53);
    for k in tables {
        for hd in [64usize, 128, 96] {
            for page_shift in [0u32, 2, 4] {
                let page = 1usize << page_shift;
                for (first, n) in [(0usize, 1usize), (0, 37), (5, 20)] {
                    let total = first + n;
                    let heads = 2;
                    let pages = total.div_ceil(page);
                    // Block ids: a shuffle of a pool with spare blocks.
                    let mut ids: Vec<u32> = (0..(pages + 3) as u32).collect();
                    for i in (1..ids.len()).rev() {
                        ids.swap(i, rng.next_u64() as usize % (i + 1));
                    }
                    let table = &ids[..pages];
                    let blocks = ids.len();
                    let query_f32: Vec<f32> = random_acts(&mut rng, hd);
                    let query: Vec<f16> = query_f32.iter().map(|&x| f16::from_f32(x)).collect();
                    let scale = 1.0 / (hd as f32).sqrt();
                    for ty in [None, Some((QuantType::Q8_0, QuantType::Q4_0))] {
                        let (kt, vt) = ty.unwrap_or((QuantType::F16, QuantType::F16));
                        let (key_row, value_row) =
                            (kt.row_bytes(hd).unwrap(), vt.row_bytes(hd).unwrap());
                        // Contiguous rows of head 1, and the same rows placed in the pages.
                        let fill = |rng: &mut Rng, row: usize, ty: QuantType| {
                            let stride = heads * row;
                            let mut flat = vec![0u8; total * stride];
                            let mut paged = vec![0u8; blocks * page * stride];
                            for p in 0..total {
                                let mut bytes = vec![0u8; row];
                                quantize_row(ty, &random_acts(rng, hd), &mut bytes);
                                let at = p * stride + row;
                                flat[at..at + row].copy_from_slice(&bytes);
                                let at = table[p / page] as usize * page * stride
                                    + (p % page) * stride
                                    + row;
                                paged[at..at + row].copy_from_slice(&bytes);
                            }
                            (flat, paged, stride)
                        };
                        let (flat_k, paged_k, key_stride) = fill(&mut rng, key_row, kt);
                        let (flat_v, paged_v, value_stride) = fill(&mut rng, value_row, vt);
                        let contiguous = |stride: usize| Rows {
                            first,
                            ..Rows::contiguous(stride)
                        };
                        let paged = |stride: usize| Rows {
                            table,
                            shift: page_shift,
                            block: page * stride,
                            stride,
                            first,
                        };
                        let mut want = vec![0f32; hd];
                        let mut got = vec![0f32; hd];
                        if ty.is_none() {
                            let halves = |b: &[u8]| -> Vec<f16> {
                                b.chunks_exact(2)
                                    .map(|c| f16::from_le_bytes([c[0], c[1]]))
                                    .collect()
                            };
                            let (fk, fv) = (halves(&flat_k), halves(&flat_v));
                            let (pk, pv) = (halves(&paged_k), halves(&paged_v));
                            let s = key_stride / 2;
                            let mut scores = Vec::new();
                            // Head 1's rows start one row into the buffer.
                            attend_with(
                                k,
                                &query,
                                &fk[hd..],
                                &fv[hd..],
                                &contiguous(s),
                                n,
                                scale,
                                0.3,
                                &mut scores,
                                &mut want,
                            );
                            attend_with(
                                k,
                                &query,
                                &pk[hd..],
                                &pv[hd..],
                                &paged(s),
                                n,
                                scale,
                                0.3,
                                &mut scores,
                                &mut got,
                            );
                        } else {
                            let mut scratch = AttendScratch::default();
                            attend_typed_with(
                                k,
                                kt,
                                vt,
                                &query_f32,
                                &flat_k[key_row..],
                                &flat_v[value_row..],
                                &contiguous(key_stride),
                                &contiguous(value_stride),
                                n,
                                scale,
                                f32::NEG_INFINITY,
                                &mut scratch,
                                &mut want,
                            );
                            attend_typed_with(
                                k,
                                kt,
                                vt,
                                &query_f32,
                                &paged_k[key_row..],
                                &paged_v[value_row..],
                                &paged(key_stride),
                                &paged(value_stride),
                                n,
                                scale,
                                f32::NEG_INFINITY,
                                &mut scratch,
                                &mut got,
                            );
                        }
                        assert!(
                            want.iter().all(|x| x.is_finite()),
                            "{} hd {hd}: no output",
                            k.name
                        );
                        let same = want
                            .iter()
                            .zip(&got)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(
                            same,
                            "{} hd {hd} page {page} first {first} n {n} {kt}/{vt}: paged differs",
                            k.name
                        );
                    }
                }
            }
        }
    }
}

/// Rows that a table places outside the buffer are refused before anything is read.
#[test]
fn rows_outside_the_buffer_do_not_fit() {
    let table = [0u32, 3];
    let rows = Rows {
        table: &table,
        shift: 2,
        block: 4 * 64,
        stride: 64,
        first: 0,
    };
    // Block 3 ends at 4 blocks of 256 units.
    assert!(rows.fits(8, 64, 4 * 256));
    assert!(!rows.fits(8, 64, 4 * 256 - 1));
    // Position 8 would need a third page.
    assert!(!rows.fits(9, 64, 1 << 20));
    assert!(!rows.fits(0, 64, 1 << 20));
    assert!(Rows::contiguous(64).fits(3, 64, 3 * 64));
    assert!(!Rows::contiguous(64).fits(3, 64, 3 * 64 - 1));
}
