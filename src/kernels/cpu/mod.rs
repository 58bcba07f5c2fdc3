//! CPU matmul kernels for ggml weight formats.
//!
//! * `blocks`: ggml block layouts and [`QuantType`].
//! * `reference`: scalar dequantize / quantize / dot products reproducing ggml's generic code.
//! * `avx2` (x86_64): AVX2+FMA+F16C dot products with the same integer arithmetic.
//! * `neon` (aarch64): NEON integer block sums around the reference's float steps (bitwise
//!   equal to the reference).
//!
//! * `avx512` (x86_64): the same kernels compiled for AVX-512 F/BW/VL/VNNI.
//!
//! A kernel table is chosen once (first use) by runtime CPU detection, the best the CPU runs,
//! unless `TP_KERNELS` (scalar, avx2, avx512, neon) names one; `use_scalar_kernels`, called
//! before the first kernel runs, forces the scalar reference kernels.
//!
//! Activations are prepared the way llama.cpp prepares `src1` for `ggml_mul_mat`: Q8_0 for
//! Q4_0/Q5_0/Q8_0 weights, Q8_1 for Q4_1, Q8_K for the K-quants, f16/bf16 for F16/BF16 and
//! plain f32 for F32.

mod blocks;
mod reference;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "x86_64")]
mod tiled;

#[cfg(test)]
mod tests;

use std::sync::OnceLock;

use crate::kernels::pool;
use half::{bf16, f16};

pub use blocks::{
    ActKind, BlockIQ4NL, BlockIQ4XS, BlockMXFP4, BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1,
    BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ8_1, BlockQ8K, ByteBlock,
    F16Bytes, KVALUES_IQ4NL, KVALUES_MXFP4, QK, QK_K, QuantType, as_blocks, as_blocks_mut,
    blocks_as_bytes, e8m0_half, first_invalid_block,
};
pub use reference::{
    ActRow, dequantize_row, get_scale_min_k4, nearest_int, quantize_row, quantize_row_q4_0,
    quantize_row_q4_1, quantize_row_q4_k, quantize_row_q5_0, quantize_row_q5_k, quantize_row_q6_k,
    quantize_row_q8_0, quantize_row_q8_1, quantize_row_q8_k,
};

// ---------------------------------------------------------------------------------------------
// kernel table

/// Dot-product kernels. Safety contract of every entry: operands have matching lengths
/// (weights: `n` elements worth of bytes/blocks, activations: `n` elements) and the CPU
/// supports the features the table was selected for. The `dot4_*` entries compute four dots
/// of one weight row with the activation vectors at `a`, `a + stride`, `a + 2 * stride`,
/// `a + 3 * stride` (stride in activation elements/blocks), bitwise equal to four single dots.
struct Kernels {
    name: &'static str,
    f32_dot: unsafe fn(&[f32], &[f32]) -> f32,
    sum_exp: unsafe fn(&[f32], f32) -> f64,
    #[allow(clippy::type_complexity)]
    attend:
        unsafe fn(&[f16], *const f16, *const f16, &Rows, usize, f32, f32, &mut [f32], &mut [f32]),
    dot_f32: unsafe fn(&[u8], &[f32]) -> f32,
    dot_f16: unsafe fn(&[u8], &[f16]) -> f32,
    dot_bf16: unsafe fn(&[u8], &[bf16]) -> f32,
    dot_q4_0: unsafe fn(&[BlockQ4_0], &[BlockQ8_0]) -> f32,
    dot_q4_1: unsafe fn(&[BlockQ4_1], &[BlockQ8_1]) -> f32,
    dot_q5_0: unsafe fn(&[BlockQ5_0], &[BlockQ8_0]) -> f32,
    dot_q8_0: unsafe fn(&[BlockQ8_0], &[BlockQ8_0]) -> f32,
    dot4_f32: unsafe fn(&[u8], *const f32, usize, &mut [f32; 4]),
    dot4_f16: unsafe fn(&[u8], *const f16, usize, &mut [f32; 4]),
    dot4_bf16: unsafe fn(&[u8], *const bf16, usize, &mut [f32; 4]),
    dot4_q4_0: unsafe fn(&[BlockQ4_0], *const BlockQ8_0, usize, &mut [f32; 4]),
    dot4_q4_1: unsafe fn(&[BlockQ4_1], *const BlockQ8_1, usize, &mut [f32; 4]),
    dot4_q5_0: unsafe fn(&[BlockQ5_0], *const BlockQ8_0, usize, &mut [f32; 4]),
    dot4_q8_0: unsafe fn(&[BlockQ8_0], *const BlockQ8_0, usize, &mut [f32; 4]),
    rows4_q4_0: Option<Rows4<BlockQ8_0, f32>>,
    rows4_q4_1: Option<Rows4<BlockQ8_1, f32>>,
    rows4_q5_0: Option<Rows4<BlockQ8_0, f32>>,
    rows4_q8_0: Option<Rows4<BlockQ8_0, f32>>,
    /// Activation quantizers, bitwise equal to the `reference` ones.
    quantize_q8_0: unsafe fn(&[f32], &mut [BlockQ8_0]),
    quantize_q8_1: unsafe fn(&[f32], &mut [BlockQ8_1]),
    quantize_q8_k: unsafe fn(&[f32], &mut [BlockQ8K]),
    /// The f64-accumulating kernels of the same CPU feature level.
    wide: &'static Kernels64,
}

/// Which tiled GEMM a kernel set has (`tiled`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tiled {
    No,
    /// 256-bit `vpmaddubsw` form (types with levels up to 63).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx2,
    /// 512-bit `vpdpbusd` form.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Vnni,
}

/// Batches of at least this many vectors (prompt chunks, decode steps of 8 or more sequences)
/// use the tiled GEMM (`tiled`) where the kernel set has it (AVX2, AVX-512 VNNI) and the type
/// is one it handles.
#[cfg(target_arch = "x86_64")]
const TILED_MIN_COUNT: usize = 8;

/// Grouping-independent dot products for [`matmul_f64`], same contract as [`Kernels`]: the
/// per-block contributions and their summation order are those of `reference::dot64`.
struct Kernels64 {
    dot_f32: unsafe fn(&[u8], &[f32]) -> f64,
    dot_f16: unsafe fn(&[u8], &[f16]) -> f64,
    dot_bf16: unsafe fn(&[u8], &[bf16]) -> f64,
    dot_q4_0: unsafe fn(&[BlockQ4_0], &[BlockQ8_0]) -> f64,
    dot_q4_1: unsafe fn(&[BlockQ4_1], &[BlockQ8_1]) -> f64,
    dot_q5_0: unsafe fn(&[BlockQ5_0], &[BlockQ8_0]) -> f64,
    dot_q8_0: unsafe fn(&[BlockQ8_0], &[BlockQ8_0]) -> f64,
    dot_q4_k: unsafe fn(&[BlockQ4K], &[BlockQ8K]) -> f64,
    dot_q5_k: unsafe fn(&[BlockQ5K], &[BlockQ8K]) -> f64,
    dot_q6_k: unsafe fn(&[BlockQ6K], &[BlockQ8K]) -> f64,
    dot4_f32: unsafe fn(&[u8], *const f32, usize, &mut [f64; 4]),
    dot4_f16: unsafe fn(&[u8], *const f16, usize, &mut [f64; 4]),
    dot4_bf16: unsafe fn(&[u8], *const bf16, usize, &mut [f64; 4]),
    dot4_q4_0: unsafe fn(&[BlockQ4_0], *const BlockQ8_0, usize, &mut [f64; 4]),
    dot4_q4_1: unsafe fn(&[BlockQ4_1], *const BlockQ8_1, usize, &mut [f64; 4]),
    dot4_q5_0: unsafe fn(&[BlockQ5_0], *const BlockQ8_0, usize, &mut [f64; 4]),
    dot4_q8_0: unsafe fn(&[BlockQ8_0], *const BlockQ8_0, usize, &mut [f64; 4]),
    dot4_q4_k: unsafe fn(&[BlockQ4K], *const BlockQ8K, usize, &mut [f64; 4]),
    dot4_q5_k: unsafe fn(&[BlockQ5K], *const BlockQ8K, usize, &mut [f64; 4]),
    dot4_q6_k: unsafe fn(&[BlockQ6K], *const BlockQ8K, usize, &mut [f64; 4]),
    dot_q5_1: unsafe fn(&[BlockQ5_1], &[BlockQ8_1]) -> f64,
    dot_q2_k: unsafe fn(&[BlockQ2K], &[BlockQ8K]) -> f64,
    dot_q3_k: unsafe fn(&[BlockQ3K], &[BlockQ8K]) -> f64,
    dot_iq4_nl: unsafe fn(&[BlockIQ4NL], &[BlockQ8_0]) -> f64,
    dot_iq4_xs: unsafe fn(&[BlockIQ4XS], &[BlockQ8K]) -> f64,
    dot_mxfp4: unsafe fn(&[BlockMXFP4], &[BlockQ8_0]) -> f64,
    dot4_q5_1: unsafe fn(&[BlockQ5_1], *const BlockQ8_1, usize, &mut [f64; 4]),
    dot4_q2_k: unsafe fn(&[BlockQ2K], *const BlockQ8K, usize, &mut [f64; 4]),
    dot4_q3_k: unsafe fn(&[BlockQ3K], *const BlockQ8K, usize, &mut [f64; 4]),
    dot4_iq4_nl: unsafe fn(&[BlockIQ4NL], *const BlockQ8_0, usize, &mut [f64; 4]),
    dot4_iq4_xs: unsafe fn(&[BlockIQ4XS], *const BlockQ8K, usize, &mut [f64; 4]),
    dot4_mxfp4: unsafe fn(&[BlockMXFP4], *const BlockQ8_0, usize, &mut [f64; 4]),
    rows4_q4_0: Option<Rows4<BlockQ8_0, f64>>,
    rows4_q4_1: Option<Rows4<BlockQ8_1, f64>>,
    rows4_q5_0: Option<Rows4<BlockQ8_0, f64>>,
    rows4_q8_0: Option<Rows4<BlockQ8_0, f64>>,
    rows4_q5_1: Option<Rows4<BlockQ8_1, f64>>,
    rows4_iq4_nl: Option<Rows4<BlockQ8_0, f64>>,
    rows4_mxfp4: Option<Rows4<BlockQ8_0, f64>>,
    /// Which form of `tiled` batches of the types it handles go through.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    tiled: Tiled,
}

/// Four weight rows at `w`, `w + rb`, ... (bytes, each a whole row) with one activation
/// vector, bitwise equal to four single dots. Without one, `matmul` makes four single dots.
type Rows4<A, T> = unsafe fn(*const u8, usize, &[A], &mut [T; 4]);

fn scalar_sum_exp(row: &[f32], max: f32) -> f64 {
    reference::sum_exp(row, max)
}

fn scalar_f32_dot(a: &[f32], b: &[f32]) -> f32 {
    reference::f32_dot_scalar(a, b)
}

/// Scalar 4-vector dot: four calls of the single-vector reference kernel.
macro_rules! scalar4 {
    ($name:ident, $one:path, $w:ty, $a:ty, $div:expr) => {
        scalar4!($name, $one, $w, $a, $div, f32);
    };
    ($name:ident, $one:path, $w:ty, $a:ty, $div:expr, $out:ty) => {
        unsafe fn $name(w: &[$w], a: *const $a, stride: usize, out: &mut [$out; 4]) {
            let n = w.len() / $div;
            for (v, o) in out.iter_mut().enumerate() {
                // SAFETY: the caller guarantees four vectors of `n` elements at this stride.
                *o = $one(w, unsafe {
                    std::slice::from_raw_parts(a.add(v * stride), n)
                });
            }
        }
    };
}
scalar4!(scalar4_f32, reference::vec_dot_f32, u8, f32, 4);
scalar4!(scalar4_f16, reference::vec_dot_f16, u8, f16, 2);
scalar4!(scalar4_bf16, reference::vec_dot_bf16, u8, bf16, 2);
scalar4!(
    scalar4_q4_0,
    reference::vec_dot_q4_0_q8_0,
    BlockQ4_0,
    BlockQ8_0,
    1
);
scalar4!(
    scalar4_q4_1,
    reference::vec_dot_q4_1_q8_1,
    BlockQ4_1,
    BlockQ8_1,
    1
);
scalar4!(
    scalar4_q5_0,
    reference::vec_dot_q5_0_q8_0,
    BlockQ5_0,
    BlockQ8_0,
    1
);
scalar4!(
    scalar4_q8_0,
    reference::vec_dot_q8_0_q8_0,
    BlockQ8_0,
    BlockQ8_0,
    1
);

/// Scalar f64 kernels: typed wrappers of `reference::dot64`.
macro_rules! scalar64 {
    ($one:ident, $four:ident, $ty:ident, $w:ty, $row:ident, $a:ty, $div:expr, $bytes:path) => {
        fn $one(w: &[$w], a: &[$a]) -> f64 {
            reference::dot64(QuantType::$ty, $bytes(w), ActRow::$row(a))
        }
        scalar4!($four, $one, $w, $a, $div, f64);
    };
}
fn raw_bytes(w: &[u8]) -> &[u8] {
    w
}
scalar64!(s64_f32, s64x4_f32, F32, u8, F32, f32, 4, raw_bytes);
scalar64!(s64_f16, s64x4_f16, F16, u8, F16, f16, 2, raw_bytes);
scalar64!(s64_bf16, s64x4_bf16, BF16, u8, BF16, bf16, 2, raw_bytes);
scalar64!(
    s64_q4_0,
    s64x4_q4_0,
    Q4_0,
    BlockQ4_0,
    Q8_0,
    BlockQ8_0,
    1,
    blocks_as_bytes
);
scalar64!(
    s64_q4_1,
    s64x4_q4_1,
    Q4_1,
    BlockQ4_1,
    Q8_1,
    BlockQ8_1,
    1,
    blocks_as_bytes
);
scalar64!(
    s64_q5_0,
    s64x4_q5_0,
    Q5_0,
    BlockQ5_0,
    Q8_0,
    BlockQ8_0,
    1,
    blocks_as_bytes
);
scalar64!(
    s64_q8_0,
    s64x4_q8_0,
    Q8_0,
    BlockQ8_0,
    Q8_0,
    BlockQ8_0,
    1,
    blocks_as_bytes
);
scalar64!(
    s64_q4_k,
    s64x4_q4_k,
    Q4_K,
    BlockQ4K,
    Q8K,
    BlockQ8K,
    1,
    blocks_as_bytes
);
scalar64!(
    s64_q5_k,
    s64x4_q5_k,
    Q5_K,
    BlockQ5K,
    Q8K,
    BlockQ8K,
    1,
    blocks_as_bytes
);
scalar64!(
    s64_q6_k,
    s64x4_q6_k,
    Q6_K,
    BlockQ6K,
    Q8K,
    BlockQ8K,
    1,
    blocks_as_bytes
);

scalar64!(
    s64_q5_1,
    s64x4_q5_1,
    Q5_1,
    BlockQ5_1,
    Q8_1,
    BlockQ8_1,
    1,
    blocks_as_bytes
);
scalar64!(
    s64_q2_k,
    s64x4_q2_k,
    Q2_K,
    BlockQ2K,
    Q8K,
    BlockQ8K,
    1,
    blocks_as_bytes
);
scalar64!(
    s64_q3_k,
    s64x4_q3_k,
    Q3_K,
    BlockQ3K,
    Q8K,
    BlockQ8K,
    1,
    blocks_as_bytes
);
scalar64!(
    s64_iq4_nl,
    s64x4_iq4_nl,
    IQ4_NL,
    BlockIQ4NL,
    Q8_0,
    BlockQ8_0,
    1,
    blocks_as_bytes
);
scalar64!(
    s64_iq4_xs,
    s64x4_iq4_xs,
    IQ4_XS,
    BlockIQ4XS,
    Q8K,
    BlockQ8K,
    1,
    blocks_as_bytes
);
scalar64!(
    s64_mxfp4,
    s64x4_mxfp4,
    MXFP4,
    BlockMXFP4,
    Q8_0,
    BlockQ8_0,
    1,
    blocks_as_bytes
);

static SCALAR64: Kernels64 = Kernels64 {
    dot_f32: s64_f32,
    dot_f16: s64_f16,
    dot_bf16: s64_bf16,
    dot_q4_0: s64_q4_0,
    dot_q4_1: s64_q4_1,
    dot_q5_0: s64_q5_0,
    dot_q8_0: s64_q8_0,
    dot_q4_k: s64_q4_k,
    dot_q5_k: s64_q5_k,
    dot_q6_k: s64_q6_k,
    dot4_f32: s64x4_f32,
    dot4_f16: s64x4_f16,
    dot4_bf16: s64x4_bf16,
    dot4_q4_0: s64x4_q4_0,
    dot4_q4_1: s64x4_q4_1,
    dot4_q5_0: s64x4_q5_0,
    dot4_q8_0: s64x4_q8_0,
    dot4_q4_k: s64x4_q4_k,
    dot4_q5_k: s64x4_q5_k,
    dot4_q6_k: s64x4_q6_k,
    dot_q5_1: s64_q5_1,
    dot_q2_k: s64_q2_k,
    dot_q3_k: s64_q3_k,
    dot_iq4_nl: s64_iq4_nl,
    dot_iq4_xs: s64_iq4_xs,
    dot_mxfp4: s64_mxfp4,
    dot4_q5_1: s64x4_q5_1,
    dot4_q2_k: s64x4_q2_k,
    dot4_q3_k: s64x4_q3_k,
    dot4_iq4_nl: s64x4_iq4_nl,
    dot4_iq4_xs: s64x4_iq4_xs,
    dot4_mxfp4: s64x4_mxfp4,
    rows4_q4_0: None,
    rows4_q4_1: None,
    rows4_q5_0: None,
    rows4_q8_0: None,
    rows4_q5_1: None,
    rows4_iq4_nl: None,
    rows4_mxfp4: None,
    tiled: Tiled::No,
};

#[cfg(target_arch = "x86_64")]
static AVX2_64: Kernels64 = Kernels64 {
    dot_f32: avx2::dot64_f32,
    dot_f16: avx2::dot64_f16,
    dot_bf16: avx2::dot64_bf16,
    dot_q4_0: avx2::dot64_q4_0_q8_0,
    dot_q4_1: avx2::dot64_q4_1_q8_1,
    dot_q5_0: avx2::dot64_q5_0_q8_0,
    dot_q8_0: avx2::dot64_q8_0_q8_0,
    dot_q4_k: avx2::dot64_q4_k_q8_k,
    dot_q5_k: avx2::dot64_q5_k_q8_k,
    dot_q6_k: avx2::dot64_q6_k_q8_k,
    dot4_f32: avx2::dot64x4_f32,
    dot4_f16: avx2::dot64x4_f16,
    dot4_bf16: avx2::dot64x4_bf16,
    dot4_q4_0: avx2::dot64x4_q4_0_q8_0,
    dot4_q4_1: avx2::dot64x4_q4_1_q8_1,
    dot4_q5_0: avx2::dot64x4_q5_0_q8_0,
    dot4_q8_0: avx2::dot64x4_q8_0_q8_0,
    dot4_q4_k: avx2::dot64x4_q4_k_q8_k,
    dot4_q5_k: avx2::dot64x4_q5_k_q8_k,
    dot4_q6_k: avx2::dot64x4_q6_k_q8_k,
    dot_q5_1: avx2::dot64_q5_1,
    dot_q2_k: avx2::dot64_q2_k,
    dot_q3_k: avx2::dot64_q3_k,
    dot_iq4_nl: avx2::dot64_iq4_nl,
    dot_iq4_xs: avx2::dot64_iq4_xs,
    dot_mxfp4: avx2::dot64_mxfp4,
    dot4_q5_1: avx2::dot64x4_q5_1,
    dot4_q2_k: avx2::dot64x4_q2_k,
    dot4_q3_k: avx2::dot64x4_q3_k,
    dot4_iq4_nl: avx2::dot64x4_iq4_nl,
    dot4_iq4_xs: avx2::dot64x4_iq4_xs,
    dot4_mxfp4: avx2::dot64x4_mxfp4,
    rows4_q4_0: Some(avx2::rows64_q4_0_q8_0),
    rows4_q4_1: Some(avx2::rows64_q4_1_q8_1),
    rows4_q5_0: Some(avx2::rows64_q5_0_q8_0),
    rows4_q8_0: Some(avx2::rows64_q8_0_q8_0),
    rows4_q5_1: Some(avx2::rows64_q5_1),
    rows4_iq4_nl: Some(avx2::rows64_iq4_nl),
    rows4_mxfp4: Some(avx2::rows64_mxfp4),
    tiled: Tiled::Avx2,
};

static SCALAR: Kernels = Kernels {
    name: "scalar",
    f32_dot: scalar_f32_dot,
    sum_exp: scalar_sum_exp,
    attend: reference::attend,
    dot_f32: reference::vec_dot_f32,
    dot_f16: reference::vec_dot_f16,
    dot_bf16: reference::vec_dot_bf16,
    dot_q4_0: reference::vec_dot_q4_0_q8_0,
    dot_q4_1: reference::vec_dot_q4_1_q8_1,
    dot_q5_0: reference::vec_dot_q5_0_q8_0,
    dot_q8_0: reference::vec_dot_q8_0_q8_0,
    dot4_f32: scalar4_f32,
    dot4_f16: scalar4_f16,
    dot4_bf16: scalar4_bf16,
    dot4_q4_0: scalar4_q4_0,
    dot4_q4_1: scalar4_q4_1,
    dot4_q5_0: scalar4_q5_0,
    dot4_q8_0: scalar4_q8_0,
    rows4_q4_0: None,
    rows4_q4_1: None,
    rows4_q5_0: None,
    rows4_q8_0: None,
    quantize_q8_0: quantize_row_q8_0,
    quantize_q8_1: quantize_row_q8_1,
    quantize_q8_k: quantize_row_q8_k,
    wide: &SCALAR64,
};

#[cfg(target_arch = "x86_64")]
static AVX2: Kernels = Kernels {
    name: "avx2",
    f32_dot: avx2::f32_dot,
    sum_exp: avx2::sum_exp,
    attend: avx2::attend,
    dot_f32: avx2::dot_f32,
    dot_f16: avx2::dot_f16,
    dot_bf16: avx2::dot_bf16,
    dot_q4_0: avx2::dot_q4_0_q8_0,
    dot_q4_1: avx2::dot_q4_1_q8_1,
    dot_q5_0: avx2::dot_q5_0_q8_0,
    dot_q8_0: avx2::dot_q8_0_q8_0,
    dot4_f32: avx2::dot4_f32,
    dot4_f16: avx2::dot4_f16,
    dot4_bf16: avx2::dot4_bf16,
    dot4_q4_0: avx2::dot4_q4_0_q8_0,
    dot4_q4_1: avx2::dot4_q4_1_q8_1,
    dot4_q5_0: avx2::dot4_q5_0_q8_0,
    dot4_q8_0: avx2::dot4_q8_0_q8_0,
    rows4_q4_0: Some(avx2::rows4_q4_0_q8_0),
    rows4_q4_1: Some(avx2::rows4_q4_1_q8_1),
    rows4_q5_0: Some(avx2::rows4_q5_0_q8_0),
    rows4_q8_0: Some(avx2::rows4_q8_0_q8_0),
    quantize_q8_0: avx2::quantize_row_q8_0,
    quantize_q8_1: avx2::quantize_row_q8_1,
    quantize_q8_k: avx2::quantize_row_q8_k,
    wide: &AVX2_64,
};

#[cfg(target_arch = "x86_64")]
static AVX512_64: Kernels64 = Kernels64 {
    dot_f32: avx512::dot64_f32,
    dot_f16: avx512::dot64_f16,
    dot_bf16: avx512::dot64_bf16,
    dot_q4_0: avx512::dot64_q4_0_q8_0,
    dot_q4_1: avx512::dot64_q4_1_q8_1,
    dot_q5_0: avx512::dot64_q5_0_q8_0,
    dot_q8_0: avx512::dot64_q8_0_q8_0,
    dot_q4_k: avx512::dot64_q4_k_q8_k,
    dot_q5_k: avx512::dot64_q5_k_q8_k,
    dot_q6_k: avx512::dot64_q6_k_q8_k,
    dot4_f32: avx512::dot64x4_f32,
    dot4_f16: avx512::dot64x4_f16,
    dot4_bf16: avx512::dot64x4_bf16,
    dot4_q4_0: avx512::dot64x4_q4_0_q8_0,
    dot4_q4_1: avx512::dot64x4_q4_1_q8_1,
    dot4_q5_0: avx512::dot64x4_q5_0_q8_0,
    dot4_q8_0: avx512::dot64x4_q8_0_q8_0,
    dot4_q4_k: avx512::dot64x4_q4_k_q8_k,
    dot4_q5_k: avx512::dot64x4_q5_k_q8_k,
    dot4_q6_k: avx512::dot64x4_q6_k_q8_k,
    dot_q5_1: avx512::dot64_q5_1,
    dot_q2_k: avx512::dot64_q2_k,
    dot_q3_k: avx512::dot64_q3_k,
    dot_iq4_nl: avx512::dot64_iq4_nl,
    dot_iq4_xs: avx512::dot64_iq4_xs,
    dot_mxfp4: avx512::dot64_mxfp4,
    dot4_q5_1: avx512::dot64x4_q5_1,
    dot4_q2_k: avx512::dot64x4_q2_k,
    dot4_q3_k: avx512::dot64x4_q3_k,
    dot4_iq4_nl: avx512::dot64x4_iq4_nl,
    dot4_iq4_xs: avx512::dot64x4_iq4_xs,
    dot4_mxfp4: avx512::dot64x4_mxfp4,
    rows4_q4_0: Some(avx512::rows64_q4_0_q8_0),
    rows4_q4_1: Some(avx512::rows64_q4_1_q8_1),
    rows4_q5_0: Some(avx512::rows64_q5_0_q8_0),
    rows4_q8_0: Some(avx512::rows64_q8_0_q8_0),
    rows4_q5_1: Some(avx512::rows64_q5_1),
    rows4_iq4_nl: Some(avx512::rows64_iq4_nl),
    rows4_mxfp4: Some(avx512::rows64_mxfp4),
    tiled: Tiled::Vnni,
};

#[cfg(target_arch = "x86_64")]
static AVX512: Kernels = Kernels {
    name: "avx512",
    f32_dot: avx512::f32_dot,
    sum_exp: avx512::sum_exp,
    attend: avx512::attend,
    dot_f32: avx512::dot_f32,
    dot_f16: avx512::dot_f16,
    dot_bf16: avx512::dot_bf16,
    dot_q4_0: avx512::dot_q4_0_q8_0,
    dot_q4_1: avx512::dot_q4_1_q8_1,
    dot_q5_0: avx512::dot_q5_0_q8_0,
    dot_q8_0: avx512::dot_q8_0_q8_0,
    dot4_f32: avx512::dot4_f32,
    dot4_f16: avx512::dot4_f16,
    dot4_bf16: avx512::dot4_bf16,
    dot4_q4_0: avx512::dot4_q4_0_q8_0,
    dot4_q4_1: avx512::dot4_q4_1_q8_1,
    dot4_q5_0: avx512::dot4_q5_0_q8_0,
    dot4_q8_0: avx512::dot4_q8_0_q8_0,
    rows4_q4_0: Some(avx512::rows4_q4_0_q8_0),
    rows4_q4_1: Some(avx512::rows4_q4_1_q8_1),
    rows4_q5_0: Some(avx512::rows4_q5_0_q8_0),
    rows4_q8_0: Some(avx512::rows4_q8_0_q8_0),
    quantize_q8_0: avx512::quantize_row_q8_0,
    quantize_q8_1: avx512::quantize_row_q8_1,
    quantize_q8_k: avx512::quantize_row_q8_k,
    wide: &AVX512_64,
};

#[cfg(target_arch = "aarch64")]
static NEON_64: Kernels64 = Kernels64 {
    dot_q4_0: neon::dot64_q4_0_q8_0,
    dot_q4_1: neon::dot64_q4_1_q8_1,
    dot_q5_0: neon::dot64_q5_0_q8_0,
    dot_q8_0: neon::dot64_q8_0_q8_0,
    dot_q4_k: neon::dot64_q4_k_q8_k,
    dot_q5_k: neon::dot64_q5_k_q8_k,
    dot_q6_k: neon::dot64_q6_k_q8_k,
    dot4_q4_0: neon::dot64x4_q4_0_q8_0,
    dot4_q4_1: neon::dot64x4_q4_1_q8_1,
    dot4_q5_0: neon::dot64x4_q5_0_q8_0,
    dot4_q8_0: neon::dot64x4_q8_0_q8_0,
    dot4_q4_k: neon::dot64x4_q4_k_q8_k,
    dot4_q5_k: neon::dot64x4_q5_k_q8_k,
    dot4_q6_k: neon::dot64x4_q6_k_q8_k,
    ..SCALAR64
};

#[cfg(target_arch = "aarch64")]
static NEON: Kernels = Kernels {
    name: "neon",
    dot_q4_0: neon::dot_q4_0_q8_0,
    dot_q4_1: neon::dot_q4_1_q8_1,
    dot_q5_0: neon::dot_q5_0_q8_0,
    dot_q8_0: neon::dot_q8_0_q8_0,
    dot4_q4_0: neon::dot4_q4_0_q8_0,
    dot4_q4_1: neon::dot4_q4_1_q8_1,
    dot4_q5_0: neon::dot4_q5_0_q8_0,
    dot4_q8_0: neon::dot4_q8_0_q8_0,
    wide: &NEON_64,
    ..SCALAR
};

static KERNELS: OnceLock<&'static Kernels> = OnceLock::new();

/// Names `TP_KERNELS` accepts.
pub const KERNEL_SETS: [&str; 4] = ["scalar", "avx2", "avx512", "neon"];

/// Forces the scalar reference kernels, for debugging a suspected SIMD fault. Returns false if
/// kernels were already chosen (the choice is made once per process).
pub fn use_scalar_kernels() -> bool {
    KERNELS.set(&SCALAR).is_ok()
}

/// The kernel set called `name`, if this build has it and this CPU runs it.
fn runnable(name: &str) -> Option<&'static Kernels> {
    match name {
        "scalar" => Some(&SCALAR),
        #[cfg(target_arch = "x86_64")]
        "avx2" | "avx512" => {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            let avx512 = avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni");
            match name {
                "avx2" if avx2 => Some(&AVX2),
                "avx512" if avx512 => Some(&AVX512),
                _ => None,
            }
        }
        #[cfg(target_arch = "aarch64")]
        "neon" if std::arch::is_aarch64_feature_detected!("neon") => Some(&NEON),
        _ => None,
    }
}

/// [`runnable`], or why not.
fn table(name: &str) -> Result<&'static Kernels, String> {
    if !KERNEL_SETS.contains(&name) {
        return Err(format!(
            "unknown kernel set {name:?}; expected one of {}",
            KERNEL_SETS.join(", ")
        ));
    }
    runnable(name).ok_or_else(|| {
        format!(
            "this CPU or build cannot run the {name} kernels (it can run: {})",
            kernel_sets_available().join(", ")
        )
    })
}

/// Kernel sets this CPU runs, best first (the first is the default).
pub fn kernel_sets_available() -> Vec<&'static str> {
    ["avx512", "avx2", "neon", "scalar"]
        .into_iter()
        .filter(|n| runnable(n).is_some())
        .collect()
}

/// The kernel set named by `TP_KERNELS` (scalar, avx2, avx512, neon), else the best this CPU
/// runs. Binaries call this at start-up so that a bad value is a clear error, not a panic on
/// the first product; the choice is made once per process.
pub fn select_kernels_from_env() -> Result<&'static str, String> {
    let wanted = match std::env::var("TP_KERNELS") {
        Ok(v) if !v.trim().is_empty() => Some(v.trim().to_ascii_lowercase()),
        _ => None,
    };
    let k = match &wanted {
        Some(n) => table(n).map_err(|e| format!("TP_KERNELS={n}: {e}"))?,
        None => best(),
    };
    let chosen = *KERNELS.get_or_init(|| k);
    if chosen.name != k.name {
        return Err(format!(
            "kernels were already chosen ({}) before TP_KERNELS was read",
            chosen.name
        ));
    }
    Ok(chosen.name)
}

fn best() -> &'static Kernels {
    table(kernel_sets_available()[0]).expect("an available kernel set")
}

fn detect() -> &'static Kernels {
    match std::env::var("TP_KERNELS") {
        Ok(n) if !n.trim().is_empty() => {
            let n = n.trim().to_ascii_lowercase();
            table(&n).unwrap_or_else(|e| panic!("TP_KERNELS={n}: {e}"))
        }
        _ => best(),
    }
}

#[inline]
fn kernels() -> &'static Kernels {
    KERNELS.get_or_init(detect)
}

/// The SIMD kernel sets this CPU runs (tests compare each with the scalar reference).
#[cfg(test)]
fn simd_tables() -> Vec<&'static Kernels> {
    kernel_sets_available()
        .into_iter()
        .filter(|n| *n != "scalar")
        .map(|n| table(n).unwrap())
        .collect()
}

/// Name of the kernel set in use ("avx512", "avx2", "neon" or "scalar"), for logs.
pub fn kernel_name() -> &'static str {
    kernels().name
}

/// Fast f32 dot product (attention scores etc.).
/// Σ e^(x - max) over `row`, whose values are all at most `max` (a log-sum-exp's sum).
pub fn sum_exp(row: &[f32], max: f32) -> f64 {
    sum_exp_with(kernels(), row, max)
}

fn sum_exp_with(k: &'static Kernels, row: &[f32], max: f32) -> f64 {
    // SAFETY: the table matches this CPU.
    unsafe { (k.sum_exp)(row, max) }
}

/// Where the rows of one KV head lie in a paged KV cache: the positions are cut into pages of
/// `1 << shift` positions, page `i` held by block `table[i]`; the row of position `p` starts
/// `table[p >> shift] * block + (p % page) * stride` units into the buffer (elements of an f16
/// cache, bytes of a typed one). Attention reads positions `first..first + n`. A contiguous
/// cache is one page of every position ([`Rows::contiguous`]).
#[derive(Clone, Copy, Debug)]
pub struct Rows<'a> {
    pub table: &'a [u32],
    pub shift: u32,
    pub block: usize,
    pub stride: usize,
    pub first: usize,
}

impl Rows<'_> {
    /// Rows `stride` apart from the start of the buffer.
    pub fn contiguous(stride: usize) -> Rows<'static> {
        Rows {
            table: &[0],
            shift: usize::BITS - 1,
            block: 0,
            stride,
            first: 0,
        }
    }

    /// Offset of the row of position `first + t`.
    ///
    /// # Safety
    /// `(first + t) >> shift` is within the table (see [`Rows::fits`]).
    #[inline(always)]
    pub unsafe fn at(&self, t: usize) -> usize {
        let p = self.first + t;
        let mask = (1usize << self.shift) - 1;
        // SAFETY: the caller keeps the page within the table.
        let block = unsafe { *self.table.get_unchecked(p >> self.shift) } as usize;
        block * self.block + (p & mask) * self.stride
    }

    /// Whether rows of `row` units at positions `first..first + n` lie within `len` units.
    pub fn fits(&self, n: usize, row: usize, len: usize) -> bool {
        if n == 0 || self.stride < row {
            return false;
        }
        let mask = (1usize << self.shift) - 1;
        let last = self.first + n - 1;
        let (first_page, last_page) = (self.first >> self.shift, last >> self.shift);
        if last_page >= self.table.len() {
            return false;
        }
        (first_page..=last_page).all(|i| {
            let hi = if i == last_page { last & mask } else { mask };
            (self.table[i] as usize)
                .checked_mul(self.block)
                .and_then(|start| start.checked_add(hi.checked_mul(self.stride)?))
                .and_then(|start| start.checked_add(row))
                .is_some_and(|end| end <= len)
        })
    }
}

/// Attention of one query row over `n` positions of one KV head of the F16 cache (their rows
/// in `keys`/`values` where `rows` says): softmax(q·k_t * scale) weighted sum of v_t, into
/// `out`; `scores` is scratch that grows to `n`. The query is f16 because llama.cpp rounds it
/// so before dotting it with the cache. A finite `sink` joins the softmax as a logit without a
/// value (gpt-oss); `f32::NEG_INFINITY` is none. Pages change where rows are read, never the
/// order of the arithmetic: any paging gives the same bits as a contiguous cache.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    query: &[f16],
    keys: &[f16],
    values: &[f16],
    rows: &Rows,
    n: usize,
    scale: f32,
    sink: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    attend_with(
        kernels(),
        query,
        keys,
        values,
        rows,
        n,
        scale,
        sink,
        scores,
        out,
    )
}

#[allow(clippy::too_many_arguments)]
fn attend_with(
    k: &'static Kernels,
    query: &[f16],
    keys: &[f16],
    values: &[f16],
    rows: &Rows,
    n: usize,
    scale: f32,
    sink: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = query.len();
    assert!(n >= 1 && out.len() == hd, "attend: bad shape");
    assert!(
        rows.fits(n, hd, keys.len()) && rows.fits(n, hd, values.len()),
        "attend: cache rows out of bounds"
    );
    if scores.len() < n {
        scores.resize(n, 0.0);
    }
    // SAFETY: bounds checked above; the table matches this CPU.
    unsafe {
        (k.attend)(
            query,
            keys.as_ptr(),
            values.as_ptr(),
            rows,
            n,
            scale,
            sink,
            scores,
            out,
        )
    }
}

/// Rotates each chunk of `n` values of `x` (n a power of two) by the orthonormal Walsh-Hadamard
/// matrix of size n in Sylvester's order (`H_2n = [[H, H], [H, -H]] / sqrt 2`), the matrix
/// llama.cpp multiplies queries, keys and values by before a quantized KV cache. The matrix is
/// symmetric and its own inverse.
pub fn hadamard_rotate(x: &mut [f32], n: usize) {
    assert!(
        n.is_power_of_two() && x.len().is_multiple_of(n),
        "hadamard_rotate: bad size"
    );
    let scale = 1.0 / (n as f32).sqrt();
    for chunk in x.chunks_exact_mut(n) {
        let mut h = 1;
        while h < n {
            for start in (0..n).step_by(2 * h) {
                for i in start..start + h {
                    let (a, b) = (chunk[i], chunk[i + h]);
                    chunk[i] = a + b;
                    chunk[i + h] = a - b;
                }
            }
            h *= 2;
        }
        for v in chunk.iter_mut() {
            *v *= scale;
        }
    }
}

/// Scratch of [`attend_typed`]: the query in the form the key type's dot products take, and
/// the scores.
#[derive(Default)]
pub struct AttendScratch {
    query_f16: Vec<f16>,
    /// The query rounded to bf16, held as f32.
    query_bf16: Vec<f32>,
    query_q8: Vec<BlockQ8_0>,
    scores: Vec<f32>,
}

/// Attention of one query row over positions `0..n` of one KV head whose key and value rows
/// are stored in `key_type` and `value_type` (f16, bf16, q8_0 or q4_0, the KV cache types):
/// as llama.cpp's flash attention does, the query takes the form of the key type's dot
/// products (f16, bf16, or q8_0 for the quantized types), each score is that dot product, and
/// each value row is converted to f32 and accumulated. Row `t` of the keys starts at byte
/// where `key_rows` says, of the values where `value_rows` says (bytes). A finite `sink` joins the softmax as
/// a logit without a value.
#[allow(clippy::too_many_arguments)]
pub fn attend_typed(
    key_type: QuantType,
    value_type: QuantType,
    query: &[f32],
    keys: &[u8],
    values: &[u8],
    key_rows: &Rows,
    value_rows: &Rows,
    n: usize,
    scale: f32,
    sink: f32,
    scratch: &mut AttendScratch,
    out: &mut [f32],
) {
    attend_typed_with(
        kernels(),
        key_type,
        value_type,
        query,
        keys,
        values,
        key_rows,
        value_rows,
        n,
        scale,
        sink,
        scratch,
        out,
    )
}

#[allow(clippy::too_many_arguments)]
fn attend_typed_with(
    k: &'static Kernels,
    key_type: QuantType,
    value_type: QuantType,
    query: &[f32],
    keys: &[u8],
    values: &[u8],
    key_rows: &Rows,
    value_rows: &Rows,
    n: usize,
    scale: f32,
    sink: f32,
    scratch: &mut AttendScratch,
    out: &mut [f32],
) {
    let hd = query.len();
    let row = |ty: QuantType| {
        assert!(
            matches!(
                ty,
                QuantType::F16 | QuantType::BF16 | QuantType::Q8_0 | QuantType::Q4_0
            ),
            "attend_typed: {ty} is not a KV cache type"
        );
        ty.row_bytes(hd)
            .expect("attend_typed: head size not in whole blocks")
    };
    let (key_row, value_row) = (row(key_type), row(value_type));
    assert!(n >= 1 && out.len() == hd, "attend_typed: bad shape");
    assert!(
        key_rows.fits(n, key_row, keys.len()) && value_rows.fits(n, value_row, values.len()),
        "attend_typed: cache rows out of bounds"
    );
    let t = TypedAttention {
        k,
        key_type,
        value_type,
        query,
        keys,
        values,
        key_rows: *key_rows,
        value_rows: *value_rows,
        key_row,
        value_row,
        n,
        scale,
        sink,
    };
    #[cfg(target_arch = "x86_64")]
    if k.name != "scalar" {
        // SAFETY: the AVX2 and AVX-512 tables are chosen only where AVX2, FMA and F16C run.
        unsafe { t.run_avx2(scratch, out) };
        return;
    }
    t.run(scratch, out);
}

/// One call of [`attend_typed`], bounds checked. Its loops are plain Rust, written so that
/// the compiler vectorizes them; on x86 they are compiled a second time for AVX2 and FMA.
struct TypedAttention<'a> {
    k: &'static Kernels,
    key_type: QuantType,
    value_type: QuantType,
    query: &'a [f32],
    keys: &'a [u8],
    values: &'a [u8],
    key_rows: Rows<'a>,
    value_rows: Rows<'a>,
    key_row: usize,
    value_row: usize,
    n: usize,
    scale: f32,
    sink: f32,
}

impl TypedAttention<'_> {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run_avx2(&self, scratch: &mut AttendScratch, out: &mut [f32]) {
        self.run(scratch, out)
    }

    #[inline(always)]
    fn run(&self, scratch: &mut AttendScratch, out: &mut [f32]) {
        let hd = self.query.len();
        let AttendScratch {
            query_f16,
            query_bf16,
            query_q8,
            scores,
        } = scratch;
        // The query in the key type's dot-product form.
        match self.key_type.act_kind() {
            ActKind::F16 => {
                query_f16.clear();
                query_f16.extend(self.query.iter().map(|&x| f16::from_f32(x)));
            }
            ActKind::BF16 => {
                query_bf16.clear();
                query_bf16.extend(self.query.iter().map(|&x| bf16::from_f32(x).to_f32()));
            }
            _ => {
                query_q8.resize(hd / QK, BlockQ8_0::default());
                // SAFETY: whole blocks; the table matches this CPU.
                unsafe { (self.k.quantize_q8_0)(self.query, query_q8) };
            }
        }
        scores.resize(self.n, 0.0);
        let mut max = self.sink;
        for (t, score) in scores.iter_mut().enumerate() {
            // SAFETY: `fits` checked every page of the n positions.
            let at = unsafe { self.key_rows.at(t) };
            let key = &self.keys[at..at + self.key_row];
            let dot = match self.key_type {
                // SAFETY: `hd` values each; the table matches this CPU.
                QuantType::Q8_0 => unsafe { (self.k.dot_q8_0)(as_blocks(key), query_q8) },
                QuantType::Q4_0 => unsafe { (self.k.dot_q4_0)(as_blocks(key), query_q8) },
                QuantType::BF16 => dot_bf16_row(key, query_bf16),
                // SAFETY: `hd` values each; the table matches this CPU.
                _ => unsafe { (self.k.dot_f16)(key, query_f16) },
            };
            *score = dot * self.scale;
            max = max.max(*score);
        }
        let sum = reference::softmax_weights(scores, max) + (self.sink - max).exp();
        out.fill(0.0);
        for (t, &p) in scores.iter().enumerate() {
            // SAFETY: as above.
            let at = unsafe { self.value_rows.at(t) };
            let row = &self.values[at..at + self.value_row];
            match self.value_type {
                // Fixed-size blocks, levels converted first: the form the compiler vectorizes.
                QuantType::Q8_0 => {
                    for (o, b) in out.chunks_exact_mut(QK).zip(as_blocks::<BlockQ8_0>(row)) {
                        let levels: [f32; QK] = std::array::from_fn(|j| b.qs[j] as f32);
                        axpy_block(o, p * b.d.to_f32(), &levels);
                    }
                }
                QuantType::Q4_0 => {
                    for (o, b) in out.chunks_exact_mut(QK).zip(as_blocks::<BlockQ4_0>(row)) {
                        let levels: [f32; QK] = std::array::from_fn(|j| {
                            let q = b.qs[j % (QK / 2)];
                            let level = if j < QK / 2 { q & 0xF } else { q >> 4 };
                            level as f32 - 8.0
                        });
                        axpy_block(o, p * b.d.to_f32(), &levels);
                    }
                }
                QuantType::BF16 => {
                    for (o, v) in out.iter_mut().zip(row.chunks_exact(2)) {
                        *o += p * f32::from_bits((u16::from_le_bytes([v[0], v[1]]) as u32) << 16);
                    }
                }
                _ => {
                    for (o, v) in out.iter_mut().zip(row.chunks_exact(2)) {
                        *o += p * f16::from_le_bytes([v[0], v[1]]).to_f32();
                    }
                }
            }
        }
        for o in out.iter_mut() {
            *o /= sum;
        }
    }
}

/// `out[j] += w * levels[j]` over one block.
#[inline(always)]
fn axpy_block(out: &mut [f32], w: f32, levels: &[f32; QK]) {
    let out: &mut [f32; QK] = out.try_into().expect("a whole block");
    for j in 0..QK {
        out[j] += w * levels[j];
    }
}

/// A bf16 row with a query already rounded to bf16 (held as f32).
#[inline(always)]
fn dot_bf16_row(k: &[u8], q: &[f32]) -> f32 {
    let value = |k: &[u8], i: usize| {
        f32::from_bits((u16::from_le_bytes([k[2 * i], k[2 * i + 1]]) as u32) << 16)
    };
    let mut acc = [0f32; 8];
    let whole = q.len() / 8 * 8;
    for (kc, qc) in k.chunks_exact(16).zip(q[..whole].chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += value(kc, i) * qc[i];
        }
    }
    let tail: f32 = (whole..q.len()).map(|i| value(k, i) * q[i]).sum();
    acc.iter().sum::<f32>() + tail
}

pub fn f32_dot(a: &[f32], b: &[f32]) -> f32 {
    f32_dot_with(kernels(), a, b)
}

fn f32_dot_with(k: &'static Kernels, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "f32_dot length mismatch");
    // SAFETY: equal lengths; the table matches this CPU.
    unsafe { (k.f32_dot)(a, b) }
}

// ---------------------------------------------------------------------------------------------
// activations

/// Activation vectors prepared for dot products with rows of a given weight type.
/// Buffers are kept between calls and only grow.
#[derive(Default)]
pub struct PreparedActivations {
    ty: Option<QuantType>,
    len: usize,
    count: usize,
    f32s: Vec<f32>,
    f16s: Vec<f16>,
    bf16s: Vec<bf16>,
    q8_0: Vec<BlockQ8_0>,
    q8_1: Vec<BlockQ8_1>,
    q8_k: Vec<BlockQ8K>,
    /// The Q8_K vectors as the tiled GEMM reads them, made once per prepared batch.
    #[cfg(target_arch = "x86_64")]
    interleaved: std::sync::RwLock<tiled::Interleaved>,
}

/// Below this many input values, `prepare` stays on the calling thread.
const PARALLEL_PREPARE_MIN: usize = 1 << 16;
/// `matmul` work unit: multiply-adds, float weights counted 4x (one core needs about 3 us for
/// 2^16 quantized multiply-adds). Below one unit a product stays on the calling thread, and
/// tasks hold at least about one unit each: handing work to another pool thread costs a
/// microsecond or so, and every extra task adds to that (`bench_pool_overhead`).
const PARALLEL_MATMUL_MIN: usize = 1 << 16;

/// Work of a product in the units of `PARALLEL_MATMUL_MIN`'s multiply-adds.
fn matmul_work(ty: QuantType, rows: usize, cols: usize, count: usize) -> usize {
    let macs = rows.saturating_mul(cols).saturating_mul(count);
    macs.saturating_mul(if ty.is_quantized() { 1 } else { 4 })
}

fn grow<T: Clone + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize(n, T::default());
    }
    &mut v[..n]
}

/// Quantizes `count` rows of `len` values with `f`, in parallel when large.
fn prepare_rows<T: Send>(
    x: &[f32],
    len: usize,
    dst: &mut [T],
    per_row: usize,
    f: impl Fn(&[f32], &mut [T]) + Sync,
) {
    if x.len() >= PARALLEL_PREPARE_MIN && pool::threads() > 1 {
        let out = OutPtr(dst.as_mut_ptr());
        pool::for_each(x.len() / len, |r| {
            // SAFETY: each task writes its own row `r` of `dst` (count rows of per_row).
            let dr = unsafe { std::slice::from_raw_parts_mut(out.get().add(r * per_row), per_row) };
            f(&x[r * len..(r + 1) * len], dr)
        });
    } else {
        for (xr, dr) in x.chunks(len).zip(dst.chunks_mut(per_row)) {
            f(xr, dr);
        }
    }
}

impl PreparedActivations {
    pub fn new() -> Self {
        Self::default()
    }

    /// Preallocates room for `count` vectors of `len` values for weight type `ty`.
    pub fn with_capacity(ty: QuantType, len: usize, count: usize) -> Self {
        let mut a = Self::new();
        a.reserve(ty, len, count);
        a
    }

    /// Grows the buffer used for `ty` to hold `count` vectors of `len` values.
    pub fn reserve(&mut self, ty: QuantType, len: usize, count: usize) {
        let n = len * count;
        match ty.act_kind() {
            ActKind::F32 => {
                grow(&mut self.f32s, n);
            }
            ActKind::F16 => {
                grow(&mut self.f16s, n);
            }
            ActKind::BF16 => {
                grow(&mut self.bf16s, n);
            }
            ActKind::Q8_0 => {
                grow(&mut self.q8_0, n.div_ceil(QK));
            }
            ActKind::Q8_1 => {
                grow(&mut self.q8_1, n.div_ceil(QK));
            }
            ActKind::Q8K => {
                grow(&mut self.q8_k, n.div_ceil(QK_K));
            }
        }
    }

    /// Weight type these activations were last prepared for.
    pub fn weight_type(&self) -> Option<QuantType> {
        self.ty
    }
    /// Elements per vector.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Number of vectors.
    pub fn count(&self) -> usize {
        self.count
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0 || self.len == 0
    }

    /// Prepares `count` row-major vectors of `len` values from `x` for weights of type `ty`.
    /// `len` must be a multiple of the weight block size (32 or 256 for quantized types).
    pub fn prepare(&mut self, ty: QuantType, x: &[f32], len: usize, count: usize) {
        assert_eq!(
            x.len(),
            len * count,
            "prepare: x has {} values, expected {len} x {count}",
            x.len()
        );
        assert!(
            len.is_multiple_of(ty.block_elements()),
            "prepare: vector length {len} is not a multiple of the {ty} block size {}",
            ty.block_elements()
        );
        self.ty = Some(ty);
        self.len = len;
        self.count = count;
        #[cfg(target_arch = "x86_64")]
        {
            let interleaved = self.interleaved.get_mut();
            interleaved
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .valid = false;
        }
        if len == 0 || count == 0 {
            return;
        }
        match ty.act_kind() {
            ActKind::F32 => grow(&mut self.f32s, x.len()).copy_from_slice(x),
            ActKind::F16 => {
                for (d, s) in grow(&mut self.f16s, x.len()).iter_mut().zip(x) {
                    *d = f16::from_f32(*s);
                }
            }
            ActKind::BF16 => {
                for (d, s) in grow(&mut self.bf16s, x.len()).iter_mut().zip(x) {
                    *d = bf16::from_f32(*s);
                }
            }
            // SAFETY (quantizers): `prepare_rows` passes whole rows and their blocks; the table
            // matches this CPU.
            ActKind::Q8_0 => {
                let dst = grow(&mut self.q8_0, x.len() / QK);
                let f = kernels().quantize_q8_0;
                prepare_rows(x, len, dst, len / QK, |x, y| unsafe { f(x, y) });
            }
            ActKind::Q8_1 => {
                let dst = grow(&mut self.q8_1, x.len() / QK);
                let f = kernels().quantize_q8_1;
                prepare_rows(x, len, dst, len / QK, |x, y| unsafe { f(x, y) });
            }
            ActKind::Q8K => {
                let dst = grow(&mut self.q8_k, x.len() / QK_K);
                let f = kernels().quantize_q8_k;
                prepare_rows(x, len, dst, len / QK_K, |x, y| unsafe { f(x, y) });
            }
        }
    }

    /// Q8_0 blocks of vector `b` (valid after preparing for a type whose `act_kind` is Q8_0).
    pub fn q8_0(&self, b: usize) -> &[BlockQ8_0] {
        let n = self.len / QK;
        &self.q8_0[b * n..(b + 1) * n]
    }
    /// Q8_1 blocks of vector `b` (valid after preparing for Q4_1 or Q5_1).
    pub fn q8_1(&self, b: usize) -> &[BlockQ8_1] {
        let n = self.len / QK;
        &self.q8_1[b * n..(b + 1) * n]
    }
    /// Q8_K blocks of vector `b` (valid after preparing for a K-quant).
    pub fn q8_k(&self, b: usize) -> &[BlockQ8K] {
        let n = self.len / QK_K;
        &self.q8_k[b * n..(b + 1) * n]
    }

    /// Vector `b` in its prepared form.
    pub fn row(&self, b: usize) -> ActRow<'_> {
        let ty = self.ty.expect("activations not prepared");
        assert!(b < self.count);
        let n = self.len;
        match ty.act_kind() {
            ActKind::F32 => ActRow::F32(&self.f32s[b * n..(b + 1) * n]),
            ActKind::F16 => ActRow::F16(&self.f16s[b * n..(b + 1) * n]),
            ActKind::BF16 => ActRow::BF16(&self.bf16s[b * n..(b + 1) * n]),
            ActKind::Q8_0 => ActRow::Q8_0(self.q8_0(b)),
            ActKind::Q8_1 => ActRow::Q8_1(self.q8_1(b)),
            ActKind::Q8K => ActRow::Q8K(self.q8_k(b)),
        }
    }

    /// Dequantized copy of vector `b` (tests and debugging).
    pub fn dequantize(&self, b: usize) -> Vec<f32> {
        let ty = self.ty.expect("activations not prepared");
        assert!(b < self.count);
        let n = self.len;
        let mut out = vec![0f32; n];
        match ty.act_kind() {
            ActKind::F32 => out.copy_from_slice(&self.f32s[b * n..(b + 1) * n]),
            ActKind::F16 => out
                .iter_mut()
                .zip(&self.f16s[b * n..])
                .for_each(|(o, v)| *o = v.to_f32()),
            ActKind::BF16 => out
                .iter_mut()
                .zip(&self.bf16s[b * n..])
                .for_each(|(o, v)| *o = v.to_f32()),
            ActKind::Q8_0 => {
                dequantize_row(QuantType::Q8_0, blocks_as_bytes(self.q8_0(b)), &mut out)
            }
            ActKind::Q8_1 => {
                for (blk, o) in self.q8_1(b).iter().zip(out.chunks_exact_mut(QK)) {
                    let d = blk.d.to_f32();
                    for (v, q) in o.iter_mut().zip(blk.qs) {
                        *v = q as f32 * d;
                    }
                }
            }
            ActKind::Q8K => {
                for (blk, o) in self.q8_k(b).iter().zip(out.chunks_exact_mut(QK_K)) {
                    for (v, q) in o.iter_mut().zip(blk.qs) {
                        *v = q as f32 * blk.d;
                    }
                }
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// matmul

struct OutPtr<T>(*mut T);
impl<T> Clone for OutPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for OutPtr<T> {}
// SAFETY: tasks write disjoint elements (distinct rows) of one output slice.
unsafe impl<T: Send> Send for OutPtr<T> {}
unsafe impl<T: Send> Sync for OutPtr<T> {}
impl<T> OutPtr<T> {
    #[inline(always)]
    fn get(self) -> *mut T {
        self.0
    }
}

/// Weight rows processed together so that each activation vector is streamed once per group
/// while the group's rows stay in L1.
const ROW_GROUP: usize = 4;

/// Batched products work on tiles: `TILE_ROWS` weight rows (a few KiB, kept in L1) against
/// as many activation vectors as fit in about `TILE_ACT_BYTES` (also kept in L1), so that each
/// activation is read from L2 once per tile of rows rather than once per row, and each weight
/// row once per tile of activations rather than once per four. Within a tile the products are
/// the same `dot4` calls as without tiling, so the results do not depend on the tile sizes.
const TILE_ROWS: usize = 16;
const TILE_ACT_BYTES: usize = 24 << 10;

/// Computes rows `r0..r1` for all `count` activations: `dot1(row, b)` gives one result,
/// `dot4(row, b, out)` the results for activations `b..b + 4`, `rows4(four rows, b, out)` (if
/// any) the results of four consecutive rows with activation `b`. `act_bytes` is the size of
/// one prepared activation vector (for the tiling).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn run_rows<T, F1, F4, FR>(
    dot1: &F1,
    dot4: &F4,
    rows4: Option<&FR>,
    weight: &[u8],
    rb: usize,
    rows: usize,
    count: usize,
    act_bytes: usize,
    r0: usize,
    r1: usize,
    out: OutPtr<T>,
) where
    T: Copy + Default,
    F1: Fn(&[u8], usize) -> T,
    F4: Fn(&[u8], usize, &mut [T; 4]),
    FR: Fn(&[u8], usize, &mut [T; 4]),
{
    // Activations b < count4 go four at a time, the rest one at a time.
    let count4 = count - count % 4;
    let act_tile = (TILE_ACT_BYTES / act_bytes.max(1)).max(4) / 4 * 4;
    let mut t = r0;
    while t < r1 {
        let te = (t + TILE_ROWS).min(r1);
        let mut b0 = 0;
        while b0 < count4 {
            let b1 = (b0 + act_tile).min(count4);
            for r in t..te {
                // SAFETY: r < rows and the weight length was checked (rows * rb bytes).
                let w = unsafe { weight.get_unchecked(r * rb..(r + 1) * rb) };
                let mut b = b0;
                while b < b1 {
                    let mut o = [T::default(); 4];
                    dot4(w, b, &mut o);
                    for (v, val) in o.into_iter().enumerate() {
                        // SAFETY: b + v < count, r < rows, y.len() == rows * count (checked);
                        // rows are partitioned between tasks so no element is written
                        // concurrently.
                        unsafe { *out.get().add((b + v) * rows + r) = val };
                    }
                    b += 4;
                }
            }
            b0 = b1;
        }
        let mut g = t;
        while g < te {
            let ge = (g + ROW_GROUP).min(te);
            for b in count4..count {
                let mut r1 = g;
                if let Some(f) = rows4
                    && ge - g == 4
                {
                    // SAFETY: rows g..g + 4 exist (ge <= rows).
                    let w = unsafe { weight.get_unchecked(g * rb..ge * rb) };
                    let mut o = [T::default(); 4];
                    f(w, b, &mut o);
                    for (i, val) in o.into_iter().enumerate() {
                        // SAFETY: as above.
                        unsafe { *out.get().add(b * rows + g + i) = val };
                    }
                    r1 = ge;
                }
                for r in r1..ge {
                    // SAFETY: as above.
                    let w = unsafe { weight.get_unchecked(r * rb..(r + 1) * rb) };
                    let val = dot1(w, b);
                    unsafe { *out.get().add(b * rows + r) = val };
                }
            }
            g = ge;
        }
        t = te;
    }
}

#[allow(clippy::too_many_arguments)]
fn drive<T, F1, F4, FR>(
    dot1: F1,
    dot4: F4,
    rows4: Option<FR>,
    weight: &[u8],
    rb: usize,
    rows: usize,
    count: usize,
    act_bytes: usize,
    y: &mut [T],
    work: usize,
) where
    T: Copy + Default + Send,
    F1: Fn(&[u8], usize) -> T + Sync,
    F4: Fn(&[u8], usize, &mut [T; 4]) + Sync,
    FR: Fn(&[u8], usize, &mut [T; 4]) + Sync,
{
    let rows4 = rows4.as_ref();
    let out = OutPtr(y.as_mut_ptr());
    let threads = pool::threads();
    if work < PARALLEL_MATMUL_MIN || threads <= 1 || rows <= 16 {
        run_rows(
            &dot1, &dot4, rows4, weight, rb, rows, count, act_bytes, 0, rows, out,
        );
        return;
    }
    // Between 1 and 8 tasks per thread, at least about one work unit and 16 rows each, whole
    // row groups.
    let tasks = (work / PARALLEL_MATMUL_MIN).clamp(threads, threads * 8);
    let chunk = rows.div_ceil(tasks).next_multiple_of(ROW_GROUP).max(16);
    let tasks = rows.div_ceil(chunk);
    pool::for_each(tasks, |t| {
        let r0 = t * chunk;
        let r1 = (r0 + chunk).min(rows);
        run_rows(
            &dot1, &dot4, rows4, weight, rb, rows, count, act_bytes, r0, r1, out,
        );
    });
}

/// Dispatches one weight type: `$one`/`$four` are the table entries, `$act` the activation
/// buffer, `$per` activation elements (or blocks) per vector, `$blocks` whether the weight row
/// is viewed as blocks.
macro_rules! dispatch {
    ($k:expr, $one:ident, $four:ident, $r4:tt, $act:expr, $per:expr, $blocks:tt, $weight:expr, $rb:expr, $rows:expr, $count:expr, $y:expr, $par:expr) => {{
        let k = $k;
        let per = $per;
        let rb = $rb;
        let a = &$act[..per * $count];
        // SAFETY (all closures): every weight row holds exactly `cols` elements (`rb` bytes),
        // rows4 gets four whole rows, every activation vector has `per` elements/blocks,
        // b + 3 < count for dot4; `k` matches this CPU.
        drive(
            |w, b| unsafe { (k.$one)(dispatch!(@w $blocks, w), a.get_unchecked(b * per..(b + 1) * per)) },
            |w, b, o| unsafe { (k.$four)(dispatch!(@w $blocks, w), a.as_ptr().add(b * per), per, o) },
            dispatch!(@r4 $r4, k, a, per, rb),
            $weight, rb, $rows, $count, std::mem::size_of_val(&a[..per]), $y, $par,
        )
    }};
    (@w blocks, $w:expr) => { as_blocks($w) };
    (@w bytes, $w:expr) => { $w };
    (@r4 none, $k:expr, $a:expr, $per:expr, $rb:expr) => {
        None::<fn(&[u8], usize, &mut [_; 4])>
    };
    (@r4 ($f:ident), $k:expr, $a:expr, $per:expr, $rb:expr) => {
        $k.$f.map(|f| {
            move |w: &[u8], b: usize, o: &mut [_; 4]| unsafe {
                debug_assert_eq!(w.len(), 4 * $rb);
                f(w.as_ptr(), $rb, $a.get_unchecked(b * $per..(b + 1) * $per), o)
            }
        })
    };
}

/// Output element of a product: f32 (`matmul`) or f64 (`matmul_f64`).
trait FromF64: Copy + Default + Send {
    /// Whether this is the f64 result itself (`matmul_f64`), not a rounding of it.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    const WIDE: bool;
    fn from_f64(v: f64) -> Self;
    /// `y` itself when this is f32.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn f32s(y: &mut [Self]) -> Option<&mut [f32]>;
}
impl FromF64 for f32 {
    const WIDE: bool = false;
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn f32s(y: &mut [f32]) -> Option<&mut [f32]> {
        Some(y)
    }
}
impl FromF64 for f64 {
    const WIDE: bool = true;
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
    fn f32s(_: &mut [f64]) -> Option<&mut [f32]> {
        None
    }
}

/// A kernel table's f64-accumulating kernels (itself for a `Kernels64`).
trait Wide {
    fn wide64(&'static self) -> &'static Kernels64;
}
impl Wide for Kernels {
    fn wide64(&'static self) -> &'static Kernels64 {
        self.wide
    }
}
impl Wide for Kernels64 {
    fn wide64(&'static self) -> &'static Kernels64 {
        self
    }
}

/// Dispatches a type whose f32 product is its f64 product rounded once
/// ([`QuantType::f32_via_f64`]): the kernels come from the table's `Kernels64`.
macro_rules! dispatch_wide {
    ($k:expr, $one:ident, $four:ident, $r4:tt, $act:expr, $per:expr, $weight:expr, $rb:expr, $rows:expr, $count:expr, $y:expr, $par:expr) => {{
        let k = $k.wide64();
        let per = $per;
        let rb = $rb;
        let a = &$act[..per * $count];
        // SAFETY (both closures): every weight row holds exactly `cols` elements (`rb` bytes),
        // every activation vector has `per` blocks, b + 3 < count for dot4; `k` matches this CPU.
        drive(
            |w, b| {
                FromF64::from_f64(unsafe {
                    (k.$one)(as_blocks(w), a.get_unchecked(b * per..(b + 1) * per))
                })
            },
            |w, b, o| {
                let mut t = [0f64; 4];
                unsafe { (k.$four)(as_blocks(w), a.as_ptr().add(b * per), per, &mut t) };
                *o = t.map(FromF64::from_f64);
            },
            dispatch_wide!(@r4 $r4, k, a, per, rb),
            $weight,
            rb,
            $rows,
            $count,
            std::mem::size_of_val(&a[..per]),
            $y,
            $par,
        )
    }};
    (@r4 none, $k:expr, $a:expr, $per:expr, $rb:expr) => {
        None::<fn(&[u8], usize, &mut [_; 4])>
    };
    (@r4 ($f:ident), $k:expr, $a:expr, $per:expr, $rb:expr) => {
        $k.$f.map(|f| {
            move |w: &[u8], b: usize, o: &mut [_; 4]| {
                debug_assert_eq!(w.len(), 4 * $rb);
                let mut t = [0f64; 4];
                // SAFETY: four whole rows and one activation vector of `per` blocks.
                unsafe { f(w.as_ptr(), $rb, $a.get_unchecked(b * $per..(b + 1) * $per), &mut t) };
                *o = t.map(FromF64::from_f64);
            }
        })
    };
}

/// Validates a matmul call; returns the row size in bytes and the weight bytes used.
fn check_matmul(
    ty: QuantType,
    weight: &[u8],
    rows: usize,
    cols: usize,
    act: &PreparedActivations,
    y_len: usize,
) -> (usize, usize) {
    assert_eq!(
        act.ty,
        Some(ty),
        "activations were prepared for {:?}, weights are {ty}",
        act.ty
    );
    assert_eq!(
        act.len, cols,
        "activation length {} != weight columns {cols}",
        act.len
    );
    let rb = ty
        .row_bytes(cols)
        .unwrap_or_else(|| panic!("{cols} columns is not a whole number of {ty} blocks"));
    let need = rows.checked_mul(rb).expect("weight size overflows");
    assert!(
        weight.len() >= need,
        "weight has {} bytes, {rows} rows of {ty} x {cols} need {need}",
        weight.len()
    );
    let count = act.count;
    assert_eq!(
        y_len,
        rows * count,
        "output length {y_len} != rows {rows} x count {count}"
    );
    (rb, need)
}

/// Runs the kernels of table `$k` (a `Kernels` or `Kernels64`) for weight type `$ty`.
macro_rules! dispatch_type {
    ($k:expr, $ty:expr, $w:expr, $rb:expr, $rows:expr, $cols:expr, $act:expr, $y:expr, $par:expr) => {{
        let (k, act, n, count) = ($k, $act, $cols, $act.count);
        let (w, rb, rows, y, par) = ($w, $rb, $rows, $y, $par);
        match $ty {
            QuantType::F32 => {
                dispatch!(
                    k, dot_f32, dot4_f32, none, act.f32s, n, bytes, w, rb, rows, count, y, par
                )
            }
            QuantType::F16 => {
                dispatch!(
                    k, dot_f16, dot4_f16, none, act.f16s, n, bytes, w, rb, rows, count, y, par
                )
            }
            QuantType::BF16 => dispatch!(
                k, dot_bf16, dot4_bf16, none, act.bf16s, n, bytes, w, rb, rows, count, y, par
            ),
            QuantType::Q4_0 => dispatch!(
                k,
                dot_q4_0,
                dot4_q4_0,
                (rows4_q4_0),
                act.q8_0,
                n / QK,
                blocks,
                w,
                rb,
                rows,
                count,
                y,
                par
            ),
            QuantType::Q4_1 => dispatch!(
                k,
                dot_q4_1,
                dot4_q4_1,
                (rows4_q4_1),
                act.q8_1,
                n / QK,
                blocks,
                w,
                rb,
                rows,
                count,
                y,
                par
            ),
            QuantType::Q5_0 => dispatch!(
                k,
                dot_q5_0,
                dot4_q5_0,
                (rows4_q5_0),
                act.q8_0,
                n / QK,
                blocks,
                w,
                rb,
                rows,
                count,
                y,
                par
            ),
            QuantType::Q8_0 => dispatch!(
                k,
                dot_q8_0,
                dot4_q8_0,
                (rows4_q8_0),
                act.q8_0,
                n / QK,
                blocks,
                w,
                rb,
                rows,
                count,
                y,
                par
            ),
            QuantType::Q4_K => dispatch_wide!(
                k,
                dot_q4_k,
                dot4_q4_k,
                none,
                act.q8_k,
                n / QK_K,
                w,
                rb,
                rows,
                count,
                y,
                par
            ),
            QuantType::Q5_K => dispatch_wide!(
                k,
                dot_q5_k,
                dot4_q5_k,
                none,
                act.q8_k,
                n / QK_K,
                w,
                rb,
                rows,
                count,
                y,
                par
            ),
            QuantType::Q6_K => dispatch_wide!(
                k,
                dot_q6_k,
                dot4_q6_k,
                none,
                act.q8_k,
                n / QK_K,
                w,
                rb,
                rows,
                count,
                y,
                par
            ),
            QuantType::Q5_1 => {
                dispatch_wide!(
                    k,
                    dot_q5_1,
                    dot4_q5_1,
                    (rows4_q5_1),
                    act.q8_1,
                    n / QK,
                    w,
                    rb,
                    rows,
                    count,
                    y,
                    par
                )
            }
            QuantType::IQ4_NL => dispatch_wide!(
                k,
                dot_iq4_nl,
                dot4_iq4_nl,
                (rows4_iq4_nl),
                act.q8_0,
                n / QK,
                w,
                rb,
                rows,
                count,
                y,
                par
            ),
            QuantType::MXFP4 => dispatch_wide!(
                k,
                dot_mxfp4,
                dot4_mxfp4,
                (rows4_mxfp4),
                act.q8_0,
                n / QK,
                w,
                rb,
                rows,
                count,
                y,
                par
            ),
            QuantType::Q2_K => dispatch_wide!(
                k,
                dot_q2_k,
                dot4_q2_k,
                none,
                act.q8_k,
                n / QK_K,
                w,
                rb,
                rows,
                count,
                y,
                par
            ),
            QuantType::Q3_K => dispatch_wide!(
                k,
                dot_q3_k,
                dot4_q3_k,
                none,
                act.q8_k,
                n / QK_K,
                w,
                rb,
                rows,
                count,
                y,
                par
            ),
            QuantType::IQ4_XS => dispatch_wide!(
                k,
                dot_iq4_xs,
                dot4_iq4_xs,
                none,
                act.q8_k,
                n / QK_K,
                w,
                rb,
                rows,
                count,
                y,
                par
            ),
        }
    }};
}

#[allow(clippy::too_many_arguments)]
fn matmul_with(
    k: &'static Kernels,
    ty: QuantType,
    weight: &[u8],
    rows: usize,
    cols: usize,
    act: &PreparedActivations,
    y: &mut [f32],
    parallel: bool,
) {
    let (rb, need) = check_matmul(ty, weight, rows, cols, act, y.len());
    if rows == 0 || act.count == 0 {
        return;
    }
    let work = if parallel {
        matmul_work(ty, rows, cols, act.count)
    } else {
        0
    };
    if tiled_matmul(k.wide, ty, &weight[..need], rb, rows, cols, act, y, work) {
        return;
    }
    dispatch_type!(k, ty, &weight[..need], rb, rows, cols, act, y, work)
}

/// Runs a batch product through `tiled` when `k` has it and it handles `ty` for `T` (Q4_0,
/// Q4_1, Q5_0 and Q8_0: f32 products in their row kernels' order, with AVX-512 VNNI only);
/// false when the caller must use the row kernels.
#[allow(clippy::too_many_arguments)]
fn tiled_matmul<T: FromF64>(
    k: &'static Kernels64,
    ty: QuantType,
    weight: &[u8],
    rb: usize,
    rows: usize,
    cols: usize,
    act: &PreparedActivations,
    y: &mut [T],
    work: usize,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if act.count >= TILED_MIN_COUNT && tiled::handles::<T>(ty, k.tiled) {
        let blocks = act.count * (cols / ty.block_elements());
        let acts = match ty.act_kind() {
            ActKind::Q8K => tiled::Acts::Q8K(&act.q8_k[..blocks]),
            ActKind::Q8_0 => tiled::Acts::Q8_0(&act.q8_0[..blocks]),
            ActKind::Q8_1 => tiled::Acts::Q8_1(&act.q8_1[..blocks]),
            _ => unreachable!("tiled: {ty} is not a quantized type"),
        };
        // SAFETY: shapes checked by `check_matmul`; `k.tiled` names the features of its table,
        // which is chosen only after detecting them.
        unsafe {
            tiled::matmul(
                k.tiled,
                ty,
                weight,
                rb,
                rows,
                cols,
                acts,
                act.count,
                &act.interleaved,
                y,
                work >= PARALLEL_MATMUL_MIN,
            )
        };
        return true;
    }
    let _ = (k, ty, weight, rb, rows, cols, act, y, work);
    false
}

#[allow(clippy::too_many_arguments)]
fn matmul_f64_with(
    k: &'static Kernels64,
    ty: QuantType,
    weight: &[u8],
    rows: usize,
    cols: usize,
    act: &PreparedActivations,
    y: &mut [f64],
    parallel: bool,
) {
    let (rb, need) = check_matmul(ty, weight, rows, cols, act, y.len());
    if rows == 0 || act.count == 0 {
        return;
    }
    let work = if parallel {
        matmul_work(ty, rows, cols, act.count)
    } else {
        0
    };
    if tiled_matmul(k, ty, &weight[..need], rb, rows, cols, act, y, work) {
        return;
    }
    dispatch_type!(k, ty, &weight[..need], rb, rows, cols, act, y, work)
}

/// `y[b * rows + r] = dot(weight row r, activation b)` for `r < rows`, `b < act.count()`.
///
/// `weight` holds `rows` rows of `ty.row_bytes(cols)` bytes (ggml layout, any alignment).
/// Rows are split across the calling thread's pool (`kernels::pool`); within a task each weight row is read once
/// per batch.
pub fn matmul(
    ty: QuantType,
    weight: &[u8],
    rows: usize,
    cols: usize,
    act: &PreparedActivations,
    y: &mut [f32],
) {
    matmul_with(kernels(), ty, weight, rows, cols, act, y, true)
}

/// Single-threaded scalar reference of [`matmul`] (test oracle).
pub fn matmul_reference(
    ty: QuantType,
    weight: &[u8],
    rows: usize,
    cols: usize,
    act: &PreparedActivations,
    y: &mut [f32],
) {
    matmul_with(&SCALAR, ty, weight, rows, cols, act, y, false)
}

/// Like [`matmul`], but each output is accumulated in f64 so that it does not depend on how the
/// row is grouped: `y[b * rows + r]` is the f64 sum over the blocks of row `r` of each block's
/// contribution, where a block is 32 elements for Q4_0/Q4_1/Q5_0/Q8_0, a 256-element
/// super-block for the K-quants and one element for F32/F16/BF16. A contribution depends only
/// on the block's own weights and activations: the exact integer block sum, then in f64
/// `(d_w * d_a) * isum` (Q4_1: `+ m_w * s_a`; Q4_K/Q5_K: `- (dmin_w * d_a) * Σ min·bsum`), or
/// the exact product `w * a` for the float types.
///
/// Splitting the columns at a block boundary, computing both parts with `matmul_f64` (each on
/// its own column slice of the weights and its own prepared activations) and adding the two
/// results therefore matches the full result up to f64 rounding (~1e-16 of Σ|contribution|),
/// so rounding to f32 after an f64 AllReduce is independent of the tensor-parallel split.
pub fn matmul_f64(
    ty: QuantType,
    weight: &[u8],
    rows: usize,
    cols: usize,
    act: &PreparedActivations,
    y: &mut [f64],
) {
    matmul_f64_with(kernels().wide, ty, weight, rows, cols, act, y, true)
}

/// Single-threaded scalar reference of [`matmul_f64`] (test oracle); bitwise equal to it.
pub fn matmul_f64_reference(
    ty: QuantType,
    weight: &[u8],
    rows: usize,
    cols: usize,
    act: &PreparedActivations,
    y: &mut [f64],
) {
    matmul_f64_with(&SCALAR64, ty, weight, rows, cols, act, y, false)
}
