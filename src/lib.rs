//! tp: tensor-parallel inference of GGUF language models across worker processes.
//!
//! # Layout
//! - [`model`]: the GGUF reader, the architectures as data (`model::arch`, one file per
//!   family), tokenizer and chat template.
//! - [`kernels`]: compute kernels; `kernels::cpu` holds a scalar reference for every quant type
//!   and faster per-ISA versions chosen at start-up.
//! - [`shard`]: what both sides share: the split-state planner and shard programs, the tensor
//!   slices and byte ranges a shard reads, model and host identity.
//! - [`coordinator`]: cluster membership, sampling, generation and the `tp-coordinator`
//!   command line.
//! - [`worker`]: shard loading, the `Backend` trait and its CPU implementation (the shard-program
//!   executor), the mixture-of-experts layer and KV cache, the worker's gRPC service.
//! - [`auth`]: the control plane's shared token and one-coordinator-at-a-time rule.
//! - [`numa`]: NUMA nodes, binding and placement through hwloc (feature `numa`).
//! - [`tls`]: mutual TLS on the control plane (rustls).
//! - [`limits`]: every limit's default and the bounds on untrusted input.
//! - [`transport`]: the `Collective` trait and its shared-memory AllReduce.
//! - [`proto`]: the control-plane messages generated from `proto/tp.proto`.

pub mod auth;
pub mod coordinator;
#[doc(hidden)]
pub mod fuzzing;
pub mod kernels;
pub mod limits;
pub mod model;
pub mod numa;
pub mod progress;
pub mod shard;
pub mod tls;
pub mod transport;
pub mod worker;

/// The protocol coordinator and workers speak (`proto/tp.proto` and the data plane's frames).
/// Raised whenever a message changes meaning; a coordinator refuses a worker that differs.
pub const PROTOCOL_VERSION: u32 = 5;

#[allow(clippy::all)]
pub mod proto {
    tonic::include_proto!("tp");
}
