//! Compute kernels. `cpu/` holds a scalar reference for every op and quant type; `pool` the
//! compute threads that kernels split their work over.
pub mod cpu;
pub mod pool;
