//! Invariance: the same model split across N ranks gives the logits of one rank (NMSE below
//! 1e-4), with even and uneven splits; and the same command gives the same tokens twice.

mod common;

use common::*;

const PROMPTS: [&str; 2] = [
    "The quick brown fox jumps over the lazy dog because",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
];

async fn check_invariance(model_name: &str) {
    let splits: [&[f64]; 5] = [
        &[1.0],
        &[1.0, 1.0],
        &[1.0, 1.0, 1.0],
        &[1.0, 1.0, 1.0, 1.0],
        &[2.0, 1.0],
    ];
    let runs: Vec<(&[f64], MoeSplit)> = splits.iter().map(|w| (*w, MoeSplit::Tensor)).collect();
    check_invariance_of(model_name, &runs).await;
}

/// The first run must be one rank: every other run's logits are compared with its.
async fn check_invariance_of(model_name: &str, runs: &[(&[f64], MoeSplit)]) {
    check_runs(model_name, runs, Bound::Nmse).await;
}

/// How close a split's logits must be to one rank's.
#[derive(Clone, Copy, PartialEq)]
enum Bound {
    /// NMSE below 1e-4 and the same argmax.
    Nmse,
    /// Every logit equal, bit for bit.
    Bitwise,
}

async fn check_runs(model_name: &str, runs: &[(&[f64], MoeSplit)], bound: Bound) {
    let Some(path) = model(model_name) else {
        return;
    };
    check_runs_at(&path, model_name, runs, bound, CacheTypes::default()).await;
}

/// Runs every split and compares its final logits with the first run's (one rank); returns
/// one rank's logits per prompt.
async fn check_runs_at(
    path: &std::path::Path,
    model_name: &str,
    runs: &[(&[f64], MoeSplit)],
    bound: Bound,
    cache_types: CacheTypes,
) -> Vec<Vec<f32>> {
    let mut reference: Vec<Vec<f32>> = Vec::new();
    for &(weights, split) in runs {
        let mut session =
            session_with_cache(path, weights, &[weights.len()], 128, 64, split, cache_types).await;
        for (i, prompt) in PROMPTS.iter().enumerate() {
            let tokens = session.model.tokenizer.encode(prompt, true).unwrap();
            let logits = session
                .final_logits(&tokens)
                .await
                .unwrap_or_else(|e| panic!("{weights:?}: {e:#}"));
            assert_eq!(logits.len(), session.model.config.vocab_size);
            assert!(logits.iter().all(|v| v.is_finite()));
            if weights.len() == 1 {
                reference.push(logits);
            } else {
                let e = nmse(&reference[i], &logits);
                println!(
                    "{model_name} weights {weights:?} ({} split, KV {}/{}) prompt {i}: NMSE {e:.3e}",
                    split.name(),
                    cache_types.k,
                    cache_types.v
                );
                if bound == Bound::Bitwise {
                    let differing = reference[i]
                        .iter()
                        .zip(&logits)
                        .filter(|(a, b)| a.to_bits() != b.to_bits())
                        .count();
                    assert_eq!(
                        differing, 0,
                        "{model_name} weights {weights:?} ({split:?}) prompt {i}: {differing} logits differ from one rank's (NMSE {e:.3e})"
                    );
                    continue;
                }
                assert!(
                    e < 1e-4,
                    "{model_name} weights {weights:?} ({split:?}) prompt {i}: NMSE {e:.3e}"
                );
                // The bound is 1e-4; f64 partial sums make the split exact in practice.
                let argmax = |v: &[f32]| {
                    v.iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .unwrap()
                        .0
                };
                assert_eq!(argmax(&reference[i]), argmax(&logits));
            }
        }
        session.cluster.shutdown().await;
    }
    reference
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_logits_are_invariant_to_the_split() {
    check_invariance(SMOLLM2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen_logits_are_invariant_to_the_split() {
    check_invariance(QWEN05).await;
}

/// Mixture of experts: experts split by columns (tensor) or whole (expert), even and uneven,
/// against one rank.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moe_logits_are_invariant_to_the_split_and_to_expert_parallelism() {
    let tensor = MoeSplit::Tensor;
    let expert = MoeSplit::Expert;
    check_invariance_of(
        MOE,
        &[
            (&[1.0], tensor),
            (&[1.0, 1.0], tensor),
            (&[1.0, 1.0, 1.0], tensor),
            (&[1.0, 1.0, 1.0, 1.0], tensor),
            (&[3.0, 1.0], tensor),
            (&[1.0, 1.0], expert),
            (&[1.0, 1.0, 1.0], expert),
            (&[1.0, 1.0, 1.0, 1.0], expert),
            (&[3.0, 1.0], expert),
        ],
    )
    .await;
}

/// qwen2moe (biases, a shared expert behind a sigmoid gate, no renormalization): the shared
/// expert splits by columns under both plans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen2moe_logits_are_invariant_to_the_split() {
    let tensor = MoeSplit::Tensor;
    let expert = MoeSplit::Expert;
    check_invariance_of(
        MOE_QWEN2,
        &[
            (&[1.0], tensor),
            (&[1.0, 1.0], tensor),
            (&[1.0, 1.0, 1.0], tensor),
            (&[1.0, 2.0], expert),
            (&[1.0, 1.0, 1.0], expert),
        ],
    )
    .await;
}

/// The new families must be exact: N ranks give one rank's logits bit for bit (f64 partial
/// sums), including query-head splits with fewer KV heads than ranks.
async fn check_exact(model_name: &str, runs: &[(&[f64], MoeSplit)]) {
    check_runs(model_name, runs, Bound::Bitwise).await;
}

const DENSE_RUNS: [(&[f64], MoeSplit); 5] = [
    (&[1.0], MoeSplit::Tensor),
    (&[1.0, 1.0], MoeSplit::Tensor),
    (&[1.0, 1.0, 1.0], MoeSplit::Tensor),
    (&[1.0, 1.0, 1.0, 1.0], MoeSplit::Tensor),
    (&[2.0, 1.0], MoeSplit::Tensor),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen3_dense_is_bit_identical_across_splits() {
    check_exact(QWEN3_SYNTH, &DENSE_RUNS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama_rope_scalings_are_bit_identical_across_splits() {
    for name in [LLAMA3_SYNTH, LLAMA_LINEAR_SYNTH, LLAMA_YARN_SYNTH] {
        check_exact(name, &DENSE_RUNS[..3]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixtral_is_bit_identical_across_both_moe_splits() {
    check_exact(
        MIXTRAL_SYNTH,
        &[
            (&[1.0], MoeSplit::Tensor),
            (&[1.0, 1.0], MoeSplit::Tensor),
            (&[1.0, 1.0, 1.0], MoeSplit::Tensor),
            (&[1.0, 1.0], MoeSplit::Expert),
            (&[1.0, 1.0, 1.0], MoeSplit::Expert),
        ],
    )
    .await;
}

/// gpt-oss: sinks split with their query heads (4 ranks split the 2 KV heads by query head),
/// biases added once after each AllReduce, experts by columns and whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gptoss_is_bit_identical_across_both_moe_splits() {
    check_exact(
        GPTOSS_SYNTH,
        &[
            (&[1.0], MoeSplit::Tensor),
            (&[1.0, 1.0], MoeSplit::Tensor),
            (&[1.0, 1.0, 1.0], MoeSplit::Tensor),
            (&[1.0, 1.0, 1.0, 1.0], MoeSplit::Tensor),
            (&[2.0, 1.0], MoeSplit::Tensor),
            (&[1.0, 1.0], MoeSplit::Expert),
            (&[1.0, 1.0, 1.0], MoeSplit::Expert),
        ],
    )
    .await;
}

/// Gemma 3: one KV head, so every split above one rank is by query head with the KV head
/// replicated; sliding-window and global layers, post-norms after each AllReduce.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemma3_is_bit_identical_across_query_head_splits() {
    check_exact(GEMMA3, &DENSE_RUNS).await;
    check_exact(GEMMA3_SYNTH, &DENSE_RUNS).await;
}

/// The quant types added after v0.1 keep N ranks bit-identical to one: the synthetic qwen3
/// model with every matrix stored as Q5_1, Q2_K, Q3_K, IQ4_NL, IQ4_XS or MXFP4 (requantized
/// with our encoders), split by columns and by rows over 1-4 ranks (1-2 for the 256-element
/// types, whose blocks the 3- and 4-way splits of this small model would cut); and Mixtral's experts as
/// MXFP4 (gpt-oss's layout: MXFP4 experts, Q8_0 elsewhere) under both MoE splits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_quant_types_are_bit_identical_across_splits() {
    use tp::kernels::cpu::QuantType;
    let (Some(dense), Some(moe)) = (model(QWEN3_SYNTH), model(MIXTRAL_SYNTH)) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("tp-quant-types-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for ty in [
        QuantType::Q5_1,
        QuantType::Q2_K,
        QuantType::Q3_K,
        QuantType::IQ4_NL,
        QuantType::IQ4_XS,
        QuantType::MXFP4,
    ] {
        let path = dir.join(format!("qwen3-{ty}.gguf"));
        common::split::requantize(&dense, &path, |name, dims, _| {
            (dims.len() >= 2
                && name != "token_embd.weight"
                && dims[0] as usize % ty.block_elements() == 0)
                .then_some(ty)
        });
        let model = tp::model::gguf::GgufFile::open(&path).unwrap();
        let count = model.tensors.iter().filter(|t| t.quant_type == ty).count();
        assert!(count >= 8, "{ty}: only {count} tensors");
        // A rank's column slice that cuts a block is dequantized to F32 at load (and is then
        // no longer bit-identical): the 256-element types split this model (8 heads of 64,
        // FFN 512) on block boundaries over 2 ranks only.
        let runs = if ty.block_elements() == 256 {
            &DENSE_RUNS[..2]
        } else {
            &DENSE_RUNS[..4]
        };
        check_runs_at(
            &path,
            &format!("qwen3 {ty}"),
            runs,
            Bound::Bitwise,
            CacheTypes::default(),
        )
        .await;
    }
    let path = dir.join("mixtral-mxfp4-experts.gguf");
    common::split::requantize(&moe, &path, |name, _, _| {
        name.contains("_exps.").then_some(QuantType::MXFP4)
    });
    check_runs_at(
        &path,
        "mixtral MXFP4 experts",
        &[
            (&[1.0], MoeSplit::Tensor),
            (&[1.0, 1.0], MoeSplit::Tensor),
            (&[1.0, 1.0, 1.0], MoeSplit::Tensor),
            (&[1.0, 1.0], MoeSplit::Expert),
        ],
        Bound::Bitwise,
        CacheTypes::default(),
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_same_command_twice_gives_the_same_tokens() {
    let Some(path) = model(SMOLLM2) else { return };
    let run = || {
        let output = std::process::Command::new(coordinator_binary())
            .args(["generate", "--model"])
            .arg(&path)
            .args([
                "--local",
                "2",
                "--prompt",
                "Once upon a time",
                "-n",
                "24",
                "--temperature",
                "0.9",
            ])
            .args(["--seed", "42", "--format", "json"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        json["tokens"].clone()
    };
    let first = run();
    assert_eq!(first.as_array().unwrap().len(), 24);
    assert_eq!(first, run());
}

/// Every KV cache type gives one rank's logits bit for bit at 2, 3 and 2:1 ranks (a head's
/// rows are quantized alike whichever worker holds them), and each type changes the logits a
/// little from f16's: the option reaches the workers, and its rounding stays small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kv_cache_type_is_bit_identical_across_splits() {
    let Some(path) = model(QWEN3_SYNTH) else {
        return;
    };
    let runs: [(&[f64], MoeSplit); 4] = [
        (&[1.0], MoeSplit::Tensor),
        (&[1.0, 1.0], MoeSplit::Tensor),
        (&[1.0, 1.0, 1.0], MoeSplit::Tensor),
        (&[2.0, 1.0], MoeSplit::Tensor),
    ];
    let f16 = check_runs_at(
        &path,
        QWEN3_SYNTH,
        &runs[..1],
        Bound::Bitwise,
        CacheTypes::default(),
    )
    .await;
    for (k, v) in [
        (CacheType::Bf16, CacheType::Bf16),
        (CacheType::Q8_0, CacheType::Q8_0),
        (CacheType::Q4_0, CacheType::Q4_0),
        (CacheType::Q8_0, CacheType::F16),
    ] {
        let types = CacheTypes { k, v };
        let ours = check_runs_at(&path, QWEN3_SYNTH, &runs, Bound::Bitwise, types).await;
        for (i, (a, b)) in f16.iter().zip(&ours).enumerate() {
            let differing = a
                .iter()
                .zip(b)
                .filter(|(x, y)| x.to_bits() != y.to_bits())
                .count();
            let e = nmse(a, b);
            println!("KV {k}/{v} vs f16, prompt {i}: {differing} logits differ, NMSE {e:.3e}");
            assert!(
                differing > 0,
                "KV {k}/{v} gave f16's logits: the type was not used"
            );
            assert!(e < 1e-2, "KV {k}/{v} prompt {i}: NMSE {e:.3e} against f16");
        }
    }
}

/// Paged KV is bit-identical to contiguous KV: SmolLM2 on two workers with blocks of 1 and 16
/// positions against one block per context (128), for f16 and q8_0 caches. Each prompt runs
/// twice; the second run finds the first's blocks released in reverse, so its table runs
/// backwards through the pool, and greedy generation takes a new block every block's worth of
/// tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_kv_is_bit_identical_to_contiguous() {
    let Some(path) = model(SMOLLM2) else {
        return;
    };
    let context = 128;
    for types in [
        CacheTypes::default(),
        CacheTypes {
            k: CacheType::Q8_0,
            v: CacheType::Q8_0,
        },
    ] {
        let mut outputs: Vec<(usize, Vec<Vec<f32>>, Vec<u32>)> = Vec::new();
        for block_size in [context, 16, 1] {
            let kv = KvOptions {
                block_size,
                budget: None,
            };
            let mut session = session_with_kv(
                &path,
                &[1.0, 1.0],
                &[2],
                context,
                64,
                MoeSplit::Tensor,
                types,
                kv,
            )
            .await;
            let mut logits = Vec::new();
            for prompt in PROMPTS {
                // Several blocks of 16 long.
                let prompt = prompt.repeat(5);
                let tokens = session.model.tokenizer.encode(&prompt, true).unwrap();
                for run in 0..2 {
                    logits.push(session.final_logits(&tokens).await.unwrap());
                    let table = session.kv.table(0).to_vec();
                    if run == 1 && block_size < context {
                        assert!(
                            table.len() > 1 && table.windows(2).all(|w| w[0] > w[1]),
                            "blocks {table:?} do not run backwards"
                        );
                    }
                }
            }
            let generated = greedy_tokens(&mut session, PROMPTS[0], 40).await.unwrap();
            session.cluster.shutdown().await;
            outputs.push((block_size, logits, generated));
        }
        let (_, contiguous, tokens) = &outputs[0];
        for (block_size, logits, generated) in &outputs[1..] {
            for (i, (a, b)) in contiguous.iter().zip(logits).enumerate() {
                let differing = a
                    .iter()
                    .zip(b)
                    .filter(|(x, y)| x.to_bits() != y.to_bits())
                    .count();
                assert_eq!(
                    differing, 0,
                    "KV {}/{} blocks of {block_size}, run {i}: {differing} logits differ from contiguous",
                    types.k, types.v
                );
            }
            assert_eq!(
                generated, tokens,
                "blocks of {block_size}: another generation"
            );
            println!(
                "KV {}/{} in blocks of {block_size}: {} logit rows and {} generated tokens equal contiguous",
                types.k,
                types.v,
                logits.len(),
                generated.len()
            );
        }
    }
}
