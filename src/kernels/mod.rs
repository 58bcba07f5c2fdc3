//! Compute kernels. `cpu/` holds a scalar reference for every op and quant type.
pub mod cpu;
