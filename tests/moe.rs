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

/// The best (id, log-probability) pairs at one position, best first.
type Candidates = Vec<(u32, f64)>;

/// Runs `tests/moe/reference.py` (float64, from the architecture's description) on `model`:
/// per sequence, per position, the `top` best (id, log-probability) pairs. None (with a notice)
/// where Python's gguf and numpy are missing outside CI.
fn reference_distributions(
    model: &std::path::Path,
    sequences: &[Vec<u32>],
    top: usize,
) -> Option<Vec<Vec<Candidates>>> {
    use std::io::Write;
    let python_path = std::env::var_os("TP_PYTHONPATH").map_or_else(
        || std::path::PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/tp/python"),
        std::path::PathBuf::from,
    );
    let has_deps = std::process::Command::new("python3")
        .args(["-c", "import gguf, numpy"])
        .env("PYTHONPATH", &python_path)
        .status()
        .is_ok_and(|s| s.success());
    if !has_deps {
        if std::env::var_os("CI").is_some() {
            panic!("Python's gguf and numpy are missing; run scripts/python-deps.sh");
        }
        eprintln!("skipping: Python's gguf and numpy are missing (run scripts/python-deps.sh)");
        return None;
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/moe/reference.py");
    let mut child = std::process::Command::new("python3")
        .arg(&script)
        .arg(model)
        .env("PYTHONPATH", &python_path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let request = serde_json::json!({ "sequences": sequences, "top": top });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "reference.py failed");
    let reply: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    Some(
        reply["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|rows| {
                rows.as_array()
                    .unwrap()
                    .iter()
                    .map(|row| {
                        row.as_array()
                            .unwrap()
                            .iter()
                            .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap()))
                            .collect()
                    })
                    .collect()
            })
            .collect(),
    )
}

/// The golden cases' token sequences (prompt, then llama.cpp's generation but its last token),
/// without the 688-token one, and the first position each case's golden steps score.
fn golden_sequences() -> Vec<(String, Vec<u32>, usize)> {
    let data = read_json(&golden_dir().join("moe-synthetic/generate_exact.json"));
    data["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["id"] != "raw_long_gpl")
        .map(|c| {
            let ids = |v: &serde_json::Value| -> Vec<u32> {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect()
            };
            let prompt = ids(&c["prompt_ids"]);
            let generated = ids(&c["generated_ids"]);
            let first = prompt.len() - 1;
            let mut tokens = prompt;
            tokens.extend(&generated[..generated.len() - 1]);
            (c["id"].as_str().unwrap().to_string(), tokens, first)
        })
        .collect()
}

/// qwen2moe, and qwen3moe with query heads wider than d_model, have no llama.cpp golden data
/// here, so their oracle is an independent float64 evaluation (tests/moe/reference.py). That
/// oracle is first checked on qwen3moe against llama.cpp's exact (F32) outputs; then tp's
/// log-probabilities, teacher-forced, must agree with it within the golden README's rules: at
/// TP = 1 and 2 for qwen2moe, and at TP = 1 and 3 (query heads split, KV heads replicated)
/// for the wide heads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen2moe_and_wide_heads_match_a_float64_reference() {
    let (Some(qwen3), Some(qwen2), Some(wide)) = (model(MOE), model(MOE_QWEN2), model(MOE_HD64))
    else {
        return;
    };
    let cases = golden_sequences();
    let sequences: Vec<Vec<u32>> = cases.iter().map(|c| c.1.clone()).collect();
    // 1. The oracle against llama.cpp's exact path on qwen3moe.
    let Some(reference) = reference_distributions(&qwen3, &sequences, 10) else {
        return;
    };
    let golden = read_json(&golden_dir().join("moe-synthetic/generate_exact.json"));
    let mut oracle_worst = 0f64;
    for (id, _, first) in &cases {
        let case = golden["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id.as_str())
            .unwrap();
        let index = cases.iter().position(|c| &c.0 == id).unwrap();
        for (step, golden_step) in case["top_logprobs"].as_array().unwrap().iter().enumerate() {
            let (gid, glp) = (
                golden_step[0][0].as_u64().unwrap() as u32,
                golden_step[0][1].as_f64().unwrap(),
            );
            let ours = &reference[index][first + step];
            assert_eq!(ours[0].0, gid, "oracle argmax at {id} step {step}");
            oracle_worst = oracle_worst.max((ours[0].1 - glp).abs());
        }
    }
    println!("oracle vs llama.cpp exact (qwen3moe): max |Δ top-1| {oracle_worst:.2e}");
    assert!(oracle_worst < 0.01, "the oracle is off by {oracle_worst}");

    // 2. tp against the oracle.
    for (path, rank_counts) in [(&qwen2, [1, 2]), (&wide, [1, 3])] {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let reference = reference_distributions(path, &sequences, 10).unwrap();
        for ranks in rank_counts {
            check_against_reference(path, &name, ranks, &cases, &reference).await;
        }
    }
}

async fn check_against_reference(
    path: &std::path::Path,
    name: &str,
    ranks: usize,
    cases: &[(String, Vec<u32>, usize)],
    reference: &[Vec<Candidates>],
) {
    {
        let mut session = session(path, &vec![1.0; ranks], 256, 128).await;
        let mut deltas = Vec::new();
        for (index, (id, tokens, first)) in cases.iter().enumerate() {
            let rows: Vec<usize> = (*first..tokens.len()).collect();
            let ours = session.distributions(tokens, &rows, 10).await.unwrap();
            for (step, distribution) in ours.iter().enumerate() {
                let expected = &reference[index][first + step];
                let gap = expected[0].1 - expected[1].1;
                let best = distribution.candidates[0].0;
                assert!(
                    best == expected[0].0 || gap < 0.3,
                    "TP={ranks} {id} step {step}: argmax {best} vs {} (gap {gap:.3})",
                    expected[0].0
                );
                let logit = distribution
                    .candidates
                    .iter()
                    .find(|c| c.0 == expected[0].0)
                    .map(|c| c.1)
                    .unwrap_or_else(|| panic!("TP={ranks} {id} step {step}: top-1 not in ours"));
                deltas.push((distribution.logprob(logit) as f64 - expected[0].1).abs());
            }
        }
        session.cluster.shutdown().await;
        deltas.sort_by(f64::total_cmp);
        let (median, max) = (deltas[deltas.len() / 2], deltas[deltas.len() - 1]);
        println!(
            "{name} TP={ranks} vs float64 over {} steps: |Δ top-1| median {median:.4}, max {max:.4}",
            deltas.len()
        );
        assert!(
            max <= 0.25 && median <= 0.05,
            "{name} TP={ranks}: median {median}, max {max}"
        );
    }
}
