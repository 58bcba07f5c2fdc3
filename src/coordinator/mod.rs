//! The coordinator: owns the model's metadata, tokenizer and chat template, plans the
//! partition, drives the workers step by step and samples from what they return.

pub mod api_access;
pub mod bench;
pub mod blocks;
pub mod cli;
pub mod cluster;
pub mod engine;
pub mod metrics;
pub mod sampler;
pub mod sequence;
pub mod server;
pub mod session;
pub mod simulate;
