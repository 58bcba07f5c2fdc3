//! What the coordinator and the workers share about a shard: the plan (each rank's extents
//! and its shard program), the tensor slices and byte ranges the program reads, and the
//! identity of the model files and hosts. Neither side's module imports the other's.

pub mod cache;
pub mod host;
pub mod plan;
pub mod tensors;
