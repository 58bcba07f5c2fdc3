//! Compute kernels. `cpu/` holds a scalar reference for every op and quant type; `pool` the
//! compute threads that kernels split their work over; `membw` the memory read bandwidth that
//! decoding is judged against.
pub mod cpu;
pub mod membw;
pub mod pool;
