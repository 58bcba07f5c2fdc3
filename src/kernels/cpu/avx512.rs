//! The x86-64 kernels (`x86.rs`) compiled for AVX-512 F/BW/VL/VNNI: the same code and
//! results as `avx2`, with 32 vector registers, EVEX encodings and `vpdpbusd` block sums.

macro_rules! kernel_fn {
    ($f:item) => {
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        $f
    };
}

/// Integer block sums with `vpdpbusd` (exact, no i16 intermediate).
const VNNI: bool = true;

#[path = "x86.rs"]
mod kernels;
pub(super) use kernels::*;
