//! Mixture of experts: what an MoE layer sends. The weighted expert outputs are summed on each
//! worker before the layer's one AllReduce, so a token costs the dense model's traffic (one
//! f32 embedding sum and two f64 sums of d_model per layer), not n_expert_used times that.
//! (Agreement with llama.cpp is in tests/golden.rs, split invariance in tests/invariance.rs.)

mod common;

use common::*;
use tp::coordinator::cluster::{Cluster, ClusterLimits, TransportChoice};
use tp::coordinator::session::{Model, Session};

/// Bytes one worker contributes per token: the embedding's f32 sum plus two f64 sums per layer.
fn dense_formula(d: usize, layers: usize) -> u64 {
    (d * 4 + 2 * layers * d * 8) as u64
}

async fn moe_session(transport: TransportChoice, split: MoeSplit, ranks: usize) -> Option<Session> {
    let path = model(MOE)?;
    let model = Model::open(&path).unwrap();
    let mut cluster = Cluster::spawn_local(
        &worker_binary(),
        &vec![1.0; ranks],
        threads_for(ranks),
        ClusterLimits::default(),
    )
    .await
    .unwrap();
    cluster.transport = transport;
    cluster.moe_split = split;
    Some(Session::start(model, cluster, 256, 64).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moe_allreduce_traffic_per_token_is_the_dense_formula() {
    for split in [MoeSplit::Tensor, MoeSplit::Expert] {
        for ranks in [2, 3] {
            let Some(mut session) = moe_session(TransportChoice::Shm, split, ranks).await else {
                return;
            };
            let config = session.model.config.clone();
            let moe = config.moe.as_ref().expect("the synthetic model is MoE");
            let per_token = dense_formula(config.model_dim, config.layer_count);
            let prompt: Vec<u32> = (100..140).collect();
            session.process(&prompt, 0).await.unwrap();
            for i in 0..24 {
                session
                    .process(&[200 + i], prompt.len() + i as usize)
                    .await
                    .unwrap();
            }
            let tokens = (prompt.len() + 24) as u64;
            println!(
                "{} split, TP={ranks}: {:?} bytes per worker for {tokens} tokens = {} per token; dense formula {per_token}, {} experts used per token",
                split.name(),
                session.collective_bytes,
                session.collective_bytes[0] / tokens,
                moe.expert_used
            );
            for (rank, &bytes) in session.collective_bytes.iter().enumerate() {
                assert_eq!(
                    bytes,
                    tokens * per_token,
                    "rank {rank}, {split:?}, TP={ranks}"
                );
            }
            session.cluster.shutdown().await;
        }
    }
}

/// The same on the wire: gRPC workers send each peer their whole buffer, so the bytes sent per
/// token per peer are the formula plus framing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moe_bytes_on_the_wire_follow_the_dense_formula() {
    let Some(mut session) = moe_session(TransportChoice::Grpc, MoeSplit::Tensor, 2).await else {
        return;
    };
    let config = session.model.config.clone();
    let per_token = dense_formula(config.model_dim, config.layer_count);
    let sent = |stats: &[tp::proto::StatsReply]| -> Vec<u64> {
        stats
            .iter()
            .map(|s| s.data_plane_bytes_sent.iter().sum())
            .collect()
    };
    session.process(&[1, 2, 3], 0).await.unwrap();
    let before = sent(&session.cluster.stats().await.unwrap());
    let steps = 32u64;
    for i in 0..steps {
        session
            .process(&[300 + i as u32], 3 + i as usize)
            .await
            .unwrap();
    }
    let after = sent(&session.cluster.stats().await.unwrap());
    for (rank, (a, b)) in after.iter().zip(&before).enumerate() {
        let per = (a - b) as f64 / steps as f64;
        let ratio = per / per_token as f64;
        println!(
            "gRPC, TP=2: worker {rank} sent {per:.0} bytes per decoded token; dense formula {per_token} ({ratio:.3}x)"
        );
        assert!(
            (1.0..1.25).contains(&ratio),
            "worker {rank}: {per:.0} bytes per token vs the formula's {per_token}"
        );
    }
    session.cluster.shutdown().await;
}
