//! The x86-64 kernels (`x86.rs`) for AVX2 + FMA + F16C.

macro_rules! kernel_fn {
    ($f:item) => {
        #[target_feature(enable = "avx2,fma,f16c")]
        $f
    };
}

/// Integer block sums with `vpmaddubsw` + `vpmaddwd`.
const VNNI: bool = false;

#[path = "x86.rs"]
mod kernels;
pub(super) use kernels::*;
