//! ggml block layouts (ggml-common.h) and the quantization type table.
//!
//! Weight blocks use byte arrays for their fp16 fields so every weight block has alignment 1
//! and can be viewed in place inside an arbitrary (e.g. mmapped) byte slice.

use half::f16;

/// Elements per K-quant super-block.
pub const QK_K: usize = 256;
/// Elements per legacy block (Q4_0, Q4_1, Q5_0, Q8_0, Q8_1).
pub const QK: usize = 32;

/// Weight storage types supported by the CPU kernels (a subset of ggml_type).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
    Q5_1,
    Q2_K,
    Q3_K,
    IQ4_NL,
    IQ4_XS,
    MXFP4,
}

/// The form activations take for dot products with a weight type (ggml's `vec_dot_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActKind {
    F32,
    F16,
    BF16,
    Q8_0,
    Q8_1,
    Q8K,
}

impl QuantType {
    pub const ALL: [QuantType; 16] = [
        QuantType::F32,
        QuantType::F16,
        QuantType::BF16,
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q8_0,
        QuantType::Q4_K,
        QuantType::Q5_K,
        QuantType::Q6_K,
        QuantType::Q5_1,
        QuantType::Q2_K,
        QuantType::Q3_K,
        QuantType::IQ4_NL,
        QuantType::IQ4_XS,
        QuantType::MXFP4,
    ];

    /// Activation form of the dot products with this weight type.
    pub fn act_kind(self) -> ActKind {
        match self {
            QuantType::F32 => ActKind::F32,
            QuantType::F16 => ActKind::F16,
            QuantType::BF16 => ActKind::BF16,
            QuantType::Q4_0
            | QuantType::Q5_0
            | QuantType::Q8_0
            | QuantType::IQ4_NL
            | QuantType::MXFP4 => ActKind::Q8_0,
            QuantType::Q4_1 | QuantType::Q5_1 => ActKind::Q8_1,
            QuantType::Q4_K
            | QuantType::Q5_K
            | QuantType::Q6_K
            | QuantType::Q2_K
            | QuantType::Q3_K
            | QuantType::IQ4_XS => ActKind::Q8K,
        }
    }

    /// Whether the f32 product is the f64-accumulated one rounded once (the types added after
    /// v0.1: one kernel per type serves both `matmul` and `matmul_f64`). The others reproduce
    /// ggml's own f32 accumulation order.
    pub fn f32_via_f64(self) -> bool {
        matches!(
            self,
            QuantType::Q5_1
                | QuantType::Q4_K
                | QuantType::Q5_K
                | QuantType::Q6_K
                | QuantType::Q2_K
                | QuantType::Q3_K
                | QuantType::IQ4_NL
                | QuantType::IQ4_XS
                | QuantType::MXFP4
        )
    }

    /// Maps a ggml_type id (as stored in GGUF) to a supported type.
    pub fn from_ggml_id(id: u32) -> Option<QuantType> {
        Some(match id {
            0 => QuantType::F32,
            1 => QuantType::F16,
            2 => QuantType::Q4_0,
            3 => QuantType::Q4_1,
            6 => QuantType::Q5_0,
            8 => QuantType::Q8_0,
            12 => QuantType::Q4_K,
            13 => QuantType::Q5_K,
            14 => QuantType::Q6_K,
            7 => QuantType::Q5_1,
            10 => QuantType::Q2_K,
            11 => QuantType::Q3_K,
            20 => QuantType::IQ4_NL,
            23 => QuantType::IQ4_XS,
            39 => QuantType::MXFP4,
            30 => QuantType::BF16,
            _ => return None,
        })
    }

    pub fn ggml_id(self) -> u32 {
        match self {
            QuantType::F32 => 0,
            QuantType::F16 => 1,
            QuantType::Q4_0 => 2,
            QuantType::Q4_1 => 3,
            QuantType::Q5_0 => 6,
            QuantType::Q8_0 => 8,
            QuantType::Q4_K => 12,
            QuantType::Q5_K => 13,
            QuantType::Q6_K => 14,
            QuantType::Q5_1 => 7,
            QuantType::Q2_K => 10,
            QuantType::Q3_K => 11,
            QuantType::IQ4_NL => 20,
            QuantType::IQ4_XS => 23,
            QuantType::MXFP4 => 39,
            QuantType::BF16 => 30,
        }
    }

    /// Type name as in gguf-py / llama.cpp logs ("F32", "BF16", "Q4_0", "Q4_K", ...).
    pub fn name(self) -> &'static str {
        match self {
            QuantType::F32 => "F32",
            QuantType::F16 => "F16",
            QuantType::BF16 => "BF16",
            QuantType::Q4_0 => "Q4_0",
            QuantType::Q4_1 => "Q4_1",
            QuantType::Q5_0 => "Q5_0",
            QuantType::Q8_0 => "Q8_0",
            QuantType::Q4_K => "Q4_K",
            QuantType::Q5_K => "Q5_K",
            QuantType::Q6_K => "Q6_K",
            QuantType::Q5_1 => "Q5_1",
            QuantType::Q2_K => "Q2_K",
            QuantType::Q3_K => "Q3_K",
            QuantType::IQ4_NL => "IQ4_NL",
            QuantType::IQ4_XS => "IQ4_XS",
            QuantType::MXFP4 => "MXFP4",
        }
    }

    pub fn block_elements(self) -> usize {
        match self {
            QuantType::F32 | QuantType::F16 | QuantType::BF16 => 1,
            QuantType::Q4_0
            | QuantType::Q4_1
            | QuantType::Q5_0
            | QuantType::Q8_0
            | QuantType::Q5_1
            | QuantType::IQ4_NL
            | QuantType::MXFP4 => QK,
            QuantType::Q4_K
            | QuantType::Q5_K
            | QuantType::Q6_K
            | QuantType::Q2_K
            | QuantType::Q3_K
            | QuantType::IQ4_XS => QK_K,
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            QuantType::F32 => 4,
            QuantType::F16 | QuantType::BF16 => 2,
            QuantType::Q4_0 => size_of::<BlockQ4_0>(),
            QuantType::Q4_1 => size_of::<BlockQ4_1>(),
            QuantType::Q5_0 => size_of::<BlockQ5_0>(),
            QuantType::Q8_0 => size_of::<BlockQ8_0>(),
            QuantType::Q4_K => size_of::<BlockQ4K>(),
            QuantType::Q5_K => size_of::<BlockQ5K>(),
            QuantType::Q6_K => size_of::<BlockQ6K>(),
            QuantType::Q5_1 => size_of::<BlockQ5_1>(),
            QuantType::Q2_K => size_of::<BlockQ2K>(),
            QuantType::Q3_K => size_of::<BlockQ3K>(),
            QuantType::IQ4_NL => size_of::<BlockIQ4NL>(),
            QuantType::IQ4_XS => size_of::<BlockIQ4XS>(),
            QuantType::MXFP4 => size_of::<BlockMXFP4>(),
        }
    }

    /// Bytes of one row of `elements` values; None if `elements` is not a whole number of
    /// blocks or the size overflows.
    pub fn row_bytes(self, elements: usize) -> Option<usize> {
        let be = self.block_elements();
        if !elements.is_multiple_of(be) {
            return None;
        }
        (elements / be).checked_mul(self.block_bytes())
    }

    /// True for the block-quantized types (everything except F32/F16/BF16).
    pub fn is_quantized(self) -> bool {
        self.block_elements() > 1
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Little-endian IEEE half stored as raw bytes (alignment 1).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct F16Bytes(pub [u8; 2]);

impl F16Bytes {
    #[inline(always)]
    pub fn bits(self) -> u16 {
        u16::from_le_bytes(self.0)
    }
    #[inline(always)]
    pub fn to_f32(self) -> f32 {
        f16::from_bits(self.bits()).to_f32()
    }
    /// Round-to-nearest-even conversion, like GGML_FP32_TO_FP16.
    #[inline(always)]
    pub fn from_f32(x: f32) -> Self {
        F16Bytes(f16::from_f32(x).to_bits().to_le_bytes())
    }
}

/// ggml block_q4_0: d, 32 x 4-bit (low nibbles = elements 0..16, high = 16..32), value = (q-8)*d.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockQ4_0 {
    pub d: F16Bytes,
    pub qs: [u8; QK / 2],
}

/// ggml block_q4_1: value = q*d + m.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockQ4_1 {
    pub d: F16Bytes,
    pub m: F16Bytes,
    pub qs: [u8; QK / 2],
}

/// ggml block_q5_0: qh bit j is the 5th bit of element j; value = (q-16)*d.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockQ5_0 {
    pub d: F16Bytes,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// ggml block_q8_0 (weights and Q8_0 activations).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockQ8_0 {
    pub d: F16Bytes,
    pub qs: [i8; QK],
}

/// ggml block_q8_1: activations for Q4_1 weights; s = d * sum(qs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockQ8_1 {
    pub d: F16Bytes,
    pub s: F16Bytes,
    pub qs: [i8; QK],
}

/// ggml block_q4_K: 8 sub-blocks of 32 with 6-bit scales and mins packed in 12 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4K {
    pub d: F16Bytes,
    pub dmin: F16Bytes,
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}

/// ggml block_q5_K: as Q4_K plus one high bit per element in qh.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ5K {
    pub d: F16Bytes,
    pub dmin: F16Bytes,
    pub scales: [u8; 12],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

/// ggml block_q6_K: 16 sub-blocks of 16 with signed 8-bit scales; value = d*sc*(q-32).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: F16Bytes,
}

/// ggml block_q5_1: value = q*d + m with 5-bit q (the 5th bits in qh, as in Q5_0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockQ5_1 {
    pub d: F16Bytes,
    pub m: F16Bytes,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// ggml block_q2_K: 16 sub-blocks of 16; `scales[k]` holds sub-block k's 4-bit scale (low
/// nibble) and min (high nibble); value = d*scale*q - dmin*min with 2-bit q. Element
/// `128 n + 32 j + l` is bits `2j..2j+2` of `qs[32 n + l]`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ2K {
    pub scales: [u8; QK_K / 16],
    pub qs: [u8; QK_K / 4],
    pub d: F16Bytes,
    pub dmin: F16Bytes,
}

/// ggml block_q3_K: 16 sub-blocks of 16 with 6-bit scales (offset 32) packed in 12 bytes;
/// value = d*(scale-32)*(q - 4 unless the hmask bit is set), q the 2 low bits laid out as in
/// Q2_K; element `128 n + 32 j + l` takes bit `4 n + j` of `hmask[l]`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ3K {
    pub hmask: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 4],
    pub scales: [u8; 12],
    pub d: F16Bytes,
}

/// ggml block_iq4_nl: 32 4-bit indices into the non-linear table `KVALUES_IQ4NL`, times d.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockIQ4NL {
    pub d: F16Bytes,
    pub qs: [u8; QK / 2],
}

/// ggml block_iq4_xs: 8 sub-blocks of 32 IQ4_NL indices, each with a 6-bit scale (offset 32):
/// low 4 bits in `scales_l` nibbles, high 2 bits in the little-endian u16 `scales_h`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockIQ4XS {
    pub d: F16Bytes,
    pub scales_h: [u8; 2],
    pub scales_l: [u8; QK_K / 64],
    pub qs: [u8; QK_K / 2],
}

/// ggml block_mxfp4 (OCP microscaling FP4): a shared power-of-two scale `e` (E8M0) and 32 E2M1
/// values; value = `KVALUES_MXFP4[q]` * 2^(e - 128) (the table holds twice the E2M1 value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockMXFP4 {
    pub e: u8,
    pub qs: [u8; QK / 2],
}

/// IQ4_NL / IQ4_XS levels (ggml `kvalues_iq4nl`).
pub const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];
/// MXFP4 levels: twice the E2M1 values (ggml `kvalues_mxfp4`).
pub const KVALUES_MXFP4: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// An MXFP4 block scale, halved to match `KVALUES_MXFP4`: 2^(e - 128), exact in f32 (subnormal
/// for e < 2), like ggml's `GGML_E8M0_TO_FP32_HALF`.
#[inline(always)]
pub fn e8m0_half(e: u8) -> f32 {
    let bits = if e < 2 {
        0x0020_0000u32 << e
    } else {
        (e as u32 - 1) << 23
    };
    f32::from_bits(bits)
}

/// The E8M0 byte that encodes no scale: NaN in the OCP microscaling format (ggml's
/// `ggml_validate_row_data` refuses it too).
pub const E8M0_NAN: u8 = 0xFF;

/// The first block of `data` (whole blocks of `ty`) whose scale no kernel can use, and why.
/// Only MXFP4 has such a scale byte (E8M0 0xFF); the other types' f16 scales are taken as
/// they come, as llama.cpp does without `--check-tensors`.
pub fn first_invalid_block(ty: QuantType, data: &[u8]) -> Option<(usize, String)> {
    match ty {
        QuantType::MXFP4 => as_blocks::<BlockMXFP4>(data)
            .iter()
            .position(|b| b.e == E8M0_NAN)
            .map(|i| (i, format!("its E8M0 scale is 0x{E8M0_NAN:02X} (NaN)"))),
        _ => None,
    }
}

/// ggml block_q8_K: activations for K-quant weights. d is f32, bsums are sums of 16 quants.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

impl Default for BlockQ4K {
    fn default() -> Self {
        BlockQ4K {
            d: F16Bytes::default(),
            dmin: F16Bytes::default(),
            scales: [0; 12],
            qs: [0; QK_K / 2],
        }
    }
}
impl Default for BlockQ5K {
    fn default() -> Self {
        BlockQ5K {
            d: F16Bytes::default(),
            dmin: F16Bytes::default(),
            scales: [0; 12],
            qh: [0; QK_K / 8],
            qs: [0; QK_K / 2],
        }
    }
}
impl Default for BlockQ6K {
    fn default() -> Self {
        BlockQ6K {
            ql: [0; QK_K / 2],
            qh: [0; QK_K / 4],
            scales: [0; QK_K / 16],
            d: F16Bytes::default(),
        }
    }
}
impl Default for BlockQ2K {
    fn default() -> Self {
        BlockQ2K {
            scales: [0; QK_K / 16],
            qs: [0; QK_K / 4],
            d: F16Bytes::default(),
            dmin: F16Bytes::default(),
        }
    }
}
impl Default for BlockQ3K {
    fn default() -> Self {
        BlockQ3K {
            hmask: [0; QK_K / 8],
            qs: [0; QK_K / 4],
            scales: [0; 12],
            d: F16Bytes::default(),
        }
    }
}
impl Default for BlockIQ4XS {
    fn default() -> Self {
        BlockIQ4XS {
            d: F16Bytes::default(),
            scales_h: [0; 2],
            scales_l: [0; QK_K / 64],
            qs: [0; QK_K / 2],
        }
    }
}
impl Default for BlockQ8K {
    fn default() -> Self {
        BlockQ8K {
            d: 0.0,
            qs: [0; QK_K],
            bsums: [0; QK_K / 16],
        }
    }
}

const _: () = assert!(size_of::<BlockQ4_0>() == 18);
const _: () = assert!(size_of::<BlockQ4_1>() == 20);
const _: () = assert!(size_of::<BlockQ5_0>() == 22);
const _: () = assert!(size_of::<BlockQ8_0>() == 34);
const _: () = assert!(size_of::<BlockQ8_1>() == 36);
const _: () = assert!(size_of::<BlockQ4K>() == 144);
const _: () = assert!(size_of::<BlockQ5K>() == 176);
const _: () = assert!(size_of::<BlockQ6K>() == 210);
const _: () = assert!(size_of::<BlockQ8K>() == 292);
const _: () = assert!(size_of::<BlockQ5_1>() == 24);
const _: () = assert!(size_of::<BlockQ2K>() == 84);
const _: () = assert!(size_of::<BlockQ3K>() == 110);
const _: () = assert!(size_of::<BlockIQ4NL>() == 18);
const _: () = assert!(size_of::<BlockIQ4XS>() == 136);
const _: () = assert!(size_of::<BlockMXFP4>() == 17);
const _: () = assert!(align_of::<BlockQ5_1>() == 1);
const _: () = assert!(align_of::<BlockQ2K>() == 1);
const _: () = assert!(align_of::<BlockQ3K>() == 1);
const _: () = assert!(align_of::<BlockIQ4NL>() == 1);
const _: () = assert!(align_of::<BlockIQ4XS>() == 1);
const _: () = assert!(align_of::<BlockMXFP4>() == 1);
const _: () = assert!(align_of::<BlockQ4_0>() == 1);
const _: () = assert!(align_of::<BlockQ4_1>() == 1);
const _: () = assert!(align_of::<BlockQ5_0>() == 1);
const _: () = assert!(align_of::<BlockQ8_0>() == 1);
const _: () = assert!(align_of::<BlockQ8_1>() == 1);
const _: () = assert!(align_of::<BlockQ4K>() == 1);
const _: () = assert!(align_of::<BlockQ5K>() == 1);
const _: () = assert!(align_of::<BlockQ6K>() == 1);

/// Marker for plain-old-data block types made only of bytes (alignment 1, every bit pattern valid).
///
/// # Safety
/// Implementors must be `repr(C)`, have alignment 1, no padding and accept any bit pattern.
pub unsafe trait ByteBlock: Copy + 'static {}
unsafe impl ByteBlock for BlockQ4_0 {}
unsafe impl ByteBlock for BlockQ4_1 {}
unsafe impl ByteBlock for BlockQ5_0 {}
unsafe impl ByteBlock for BlockQ8_0 {}
unsafe impl ByteBlock for BlockQ8_1 {}
unsafe impl ByteBlock for BlockQ4K {}
unsafe impl ByteBlock for BlockQ5K {}
unsafe impl ByteBlock for BlockQ6K {}
unsafe impl ByteBlock for BlockQ5_1 {}
unsafe impl ByteBlock for BlockQ2K {}
unsafe impl ByteBlock for BlockQ3K {}
unsafe impl ByteBlock for BlockIQ4NL {}
unsafe impl ByteBlock for BlockIQ4XS {}
unsafe impl ByteBlock for BlockMXFP4 {}

/// Views a byte slice as whole blocks. Panics if the length is not a multiple of the block size.
#[inline]
pub fn as_blocks<T: ByteBlock>(bytes: &[u8]) -> &[T] {
    let sz = size_of::<T>();
    assert!(
        bytes.len().is_multiple_of(sz),
        "byte length {} is not a multiple of block size {sz}",
        bytes.len()
    );
    // SAFETY: T has alignment 1, no padding, any bit pattern is valid, and the length fits.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / sz) }
}

/// Mutable byte view of blocks.
#[inline]
pub fn as_blocks_mut<T: ByteBlock>(bytes: &mut [u8]) -> &mut [T] {
    let sz = size_of::<T>();
    assert!(
        bytes.len().is_multiple_of(sz),
        "byte length {} is not a multiple of block size {sz}",
        bytes.len()
    );
    // SAFETY: as in `as_blocks`; the borrow is exclusive.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut T, bytes.len() / sz) }
}

/// Views blocks as their bytes.
#[inline]
pub fn blocks_as_bytes<T: ByteBlock>(blocks: &[T]) -> &[u8] {
    // SAFETY: T has no padding, so all bytes are initialized.
    unsafe {
        std::slice::from_raw_parts(blocks.as_ptr() as *const u8, std::mem::size_of_val(blocks))
    }
}

#[cfg(target_endian = "big")]
compile_error!("the CPU kernels assume a little-endian target (ggml files are little-endian)");
