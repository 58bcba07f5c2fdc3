//! Oracle tests: tp against llama.cpp's outputs on the same models (tests/data/golden), by the
//! rules of the golden README: greedy tokens agree up to the first mismatch, a mismatch only at
//! a near-tie; log-probabilities within tolerance over the agreed prefix; perplexity within 1%.

mod common;

use common::*;
use tp::coordinator::sampler::SamplingParams;
use tp::coordinator::session::GenerateRequest;

const NEAR_TIE_NATS: f32 = 0.3;

/// Appends a finding to `target/tmp/golden-report.md`, so that a passing run still leaves the
/// agreement tables behind.
fn report(text: &str) {
    use std::io::Write;
    println!("{text}");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("golden-report.md");
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(file, "{text}");
    }
}

struct CaseResult {
    id: String,
    agreed: usize,
    golden_len: usize,
    verdict: String,
}

/// Runs every golden generation case at each rank count and checks the rules. Returns a table.
async fn check_generation(model_name: &str, golden: &str, rank_counts: &[usize]) -> String {
    check_generation_with(model_name, golden, rank_counts, MoeSplit::Tensor, 512).await
}

async fn check_generation_with(
    model_name: &str,
    golden: &str,
    rank_counts: &[usize],
    split: MoeSplit,
    context: usize,
) -> String {
    check_generation_against(model_name, golden, None, rank_counts, split, context).await
}

/// `check_generation` with mixture-of-experts layers split as `split` says, in a context of
/// `context` tokens. `alternative` names llama.cpp's generations through another of its own
/// code paths (flash attention off): a mismatch beyond a near-tie is accepted where that path
/// produced our tokens up to and including the mismatch, i.e. where llama.cpp disagrees with
/// itself (a routing near-tie in a mixture of experts flips a whole expert).
async fn check_generation_against(
    model_name: &str,
    golden: &str,
    alternative: Option<&str>,
    rank_counts: &[usize],
    split: MoeSplit,
    context: usize,
) -> String {
    let Some(path) = model(model_name) else {
        return String::new();
    };
    let data = read_json(&golden_dir().join(golden));
    let cases = data["cases"].as_array().unwrap();
    let alternative = alternative.map(|a| read_json(&golden_dir().join(a)));
    let alternative_ids = |id: &str| -> Option<Vec<u32>> {
        let alt = alternative.as_ref()?;
        let case = alt["cases"].as_array()?.iter().find(|c| c["id"] == id)?;
        Some(
            case["generated_ids"]
                .as_array()?
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect(),
        )
    };
    let mut table = format!(
        "| case | {} |\n|---|{}\n",
        rank_counts
            .iter()
            .map(|n| format!("TP={n}"))
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(rank_counts.len())
    );
    let mut rows: Vec<Vec<CaseResult>> = Vec::new();
    let mut failures = Vec::new();
    for &ranks in rank_counts {
        let mut session = session_with(&path, &vec![1.0; ranks], context, 128, split).await;
        let mut results = Vec::new();
        for case in cases {
            let id = case["id"].as_str().unwrap().to_string();
            let prompt = case["prompt"].as_str().unwrap();
            let expected_prompt: Vec<u32> = case["prompt_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let prompt_ids = session.model.tokenizer.encode_prompt(prompt, true).unwrap();
            assert_eq!(prompt_ids, expected_prompt, "{id}: prompt tokens differ");
            let golden_ids: Vec<u32> = case["generated_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let golden_top: Vec<Vec<(u32, f32)>> = case["top_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|step| {
                    step.as_array()
                        .unwrap()
                        .iter()
                        .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap() as f32))
                        .collect()
                })
                .collect();
            let generation = session
                .generate(GenerateRequest {
                    prompt_tokens: prompt_ids,
                    max_tokens: case["n_predict"].as_u64().unwrap() as usize,
                    params: SamplingParams::greedy(),
                    stop_strings: Vec::new(),
                    logprobs: 10,
                    on_text: None,
                    cancelled: None,
                })
                .await
                .unwrap();
            let mut agreed = 0;
            let mut verdict = String::from("all");
            let mut top1_deltas = Vec::new();
            for (step, (&ours, &theirs)) in generation.tokens.iter().zip(&golden_ids).enumerate() {
                let golden_step = &golden_top[step];
                let our_step = &generation.top_logprobs[step];
                if ours != theirs {
                    let gap = golden_step[0].1 - golden_step[1].1;
                    let in_top10 = golden_step.iter().any(|&(id, _)| id == ours);
                    let other_path = alternative_ids(&id).is_some_and(|alt| {
                        alt.len() > step && alt[..=step] == generation.tokens[..=step]
                    });
                    if gap < NEAR_TIE_NATS && in_top10 {
                        verdict = format!("near-tie at {step} (gap {gap:.3})");
                    } else if other_path && in_top10 {
                        verdict = format!("llama.cpp -fa off agrees at {step} (gap {gap:.3})");
                    } else {
                        verdict = format!("MISMATCH at {step} (gap {gap:.3})");
                        failures.push(format!("TP={ranks} {id}: token {ours} vs {theirs} at step {step}, golden gap {gap:.3}"));
                    }
                    break;
                }
                agreed += 1;
                // Probabilities over the agreed prefix.
                let ours_of = |id: u32| our_step.iter().find(|p| p.0 == id).map(|p| p.1);
                let top1 = ours_of(golden_step[0].0).expect("the agreed token is in our top list");
                top1_deltas.push((top1 - golden_step[0].1).abs());
                let shared: Vec<f32> = golden_step
                    .iter()
                    .filter_map(|&(id, lp)| ours_of(id).map(|o| (o - lp).abs()))
                    .collect();
                let shared_top5 = golden_step[..5]
                    .iter()
                    .filter(|p| our_step[..5].iter().any(|o| o.0 == p.0))
                    .count();
                let mean = shared.iter().sum::<f32>() / shared.len().max(1) as f32;
                if (top1 - golden_step[0].1).abs() > 0.25
                    || mean > 0.6
                    || shared.len() < 6
                    || shared_top5 < 3
                {
                    failures.push(format!(
                        "TP={ranks} {id} step {step}: top-1 delta {:.3}, mean delta {mean:.3}, shared {}/10, top-5 shared {shared_top5}\n  golden {:?}\n  ours   {:?}",
                        (top1 - golden_step[0].1).abs(),
                        shared.len(),
                        &golden_step[..5],
                        &our_step[..5]
                    ));
                }
            }
            if agreed == golden_ids.len() && generation.tokens.len() != golden_ids.len() {
                failures.push(format!(
                    "TP={ranks} {id}: generated {} tokens, golden {}",
                    generation.tokens.len(),
                    golden_ids.len()
                ));
            }
            if agreed == golden_ids.len() {
                let golden_stop = if case["stop"] == "eos" {
                    "eos"
                } else {
                    "limit"
                };
                assert_eq!(generation.stop, golden_stop, "TP={ranks} {id}: stop kind");
            }
            let max_delta = top1_deltas.iter().copied().fold(0f32, f32::max);
            results.push(CaseResult {
                id,
                agreed,
                golden_len: golden_ids.len(),
                verdict: format!("{verdict}, max top-1 Δ {max_delta:.3}"),
            });
        }
        session.cluster.shutdown().await;
        rows.push(results);
    }
    for (i, case) in rows[0].iter().enumerate() {
        table.push_str(&format!("| {} |", case.id));
        for results in &rows {
            let r = &results[i];
            table.push_str(&format!(" {}/{} ({}) |", r.agreed, r.golden_len, r.verdict));
        }
        table.push('\n');
    }
    report(&format!(
        "### {model_name} ({} split): greedy generation vs llama.cpp (agreed/golden tokens)\n\n{table}",
        split.name()
    ));
    assert!(
        failures.is_empty(),
        "{model_name}: disagreements with llama.cpp:\n{}\n{table}",
        failures.join("\n")
    );
    table
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_greedy_generation_matches_llama_cpp_at_tp_1_2_3() {
    check_generation(SMOLLM2, "generate.json", &[1, 2, 3]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen_greedy_generation_matches_llama_cpp_at_tp_1_2_3() {
    check_generation(QWEN05, "qwen2.5-0.5b/generate.json", &[1, 2, 3]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemma3_greedy_generation_matches_llama_cpp_at_tp_1_2_3() {
    check_generation(GEMMA3, "gemma3-270m/generate.json", &[1, 2, 3]).await;
}

/// Gemma 3 over the whole text at both context sizes (about 2 minutes here). Its window (512)
/// covers every position here; the window itself is checked against llama.cpp on the
/// synthetic gemma3 model, whose window is 32.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemma3_perplexity_within_1_percent_of_llama_cpp() {
    check_perplexity(GEMMA3, "gemma3-270m/ppl.json", 2, 128, None).await;
    check_perplexity(GEMMA3, "gemma3-270m/ppl.json", 2, 512, None).await;
}

async fn check_perplexity(
    model_name: &str,
    golden: &str,
    ranks: usize,
    context: usize,
    max_chunks: Option<usize>,
) {
    check_perplexity_of(
        model_name,
        golden,
        ranks,
        context,
        max_chunks,
        CacheTypes::default(),
        0.01,
    )
    .await
}

/// Perplexity with the KV cache in `cache_types`, within `bound` (relative) of llama.cpp's
/// with the same cache types. Golden results that name cache types are matched on them.
async fn check_perplexity_of(
    model_name: &str,
    golden: &str,
    ranks: usize,
    context: usize,
    max_chunks: Option<usize>,
    cache_types: CacheTypes,
    bound: f64,
) {
    let Some(path) = model(model_name) else {
        return;
    };
    let data = read_json(&golden_dir().join(golden));
    let names_types = |r: &serde_json::Value| {
        r.get("cache_type_k")
            .is_none_or(|k| k == cache_types.k.name())
            && r.get("cache_type_v")
                .is_none_or(|v| v == cache_types.v.name())
            && r.get("model").is_none_or(|m| m == model_name)
    };
    let result = data["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["n_ctx"] == context && names_types(r))
        .unwrap()
        .clone();
    let text = std::fs::read_to_string(golden_dir().join("ppl_text.txt")).unwrap();
    let text = text.strip_suffix('\n').unwrap();
    let weights = vec![1.0; ranks];
    let mut session = session_with_cache(
        &path,
        &weights,
        &[ranks],
        context,
        context,
        MoeSplit::Tensor,
        cache_types,
    )
    .await;
    let tokens = session.model.tokenizer.encode_prompt(text, false).unwrap();
    if let Some(count) = data["text_tokens"].as_u64() {
        assert_eq!(tokens.len() as u64, count, "token count of the text");
    }
    let ours = session
        .perplexity(&tokens, context, max_chunks, |_, _| {})
        .await
        .unwrap();
    session.cluster.shutdown().await;
    let golden_ppl = match max_chunks {
        Some(n) => result["running_ppl"][n - 1].as_f64().unwrap(),
        None => {
            if let Some(scored) = result["scored_tokens"].as_u64() {
                assert_eq!(ours.scored_tokens as u64, scored);
            }
            result["ppl"].as_f64().unwrap()
        }
    };
    let relative = (ours.ppl - golden_ppl).abs() / golden_ppl;
    report(&format!(
        "{model_name} c={context} TP={ranks} KV {}/{} chunks={}: tp {:.4} vs llama.cpp {golden_ppl:.4} ({:+.3}%), {:.1} s",
        cache_types.k,
        cache_types.v,
        ours.chunks,
        ours.ppl,
        100.0 * (ours.ppl - golden_ppl) / golden_ppl,
        ours.seconds
    ));
    assert!(
        relative < bound,
        "perplexity {:.4} vs llama.cpp {golden_ppl:.4} (KV {}/{})",
        ours.ppl,
        cache_types.k,
        cache_types.v
    );
}

/// Quantized and bf16 KV caches against llama.cpp with the same cache types (flash attention
/// on, which llama.cpp needs for them; it rotates queries, keys and values as tp does): within
/// 1% for q8_0 and bf16, 3% for q4_0. TP = 2, so each worker's cache holds some of the heads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quantized_kv_cache_perplexity_matches_llama_cpp_with_the_same_cache_types() {
    let golden = "kv-cache-types/ppl.json";
    for (ty, bound) in [
        (CacheType::Q8_0, 0.01),
        (CacheType::Q4_0, 0.03),
        (CacheType::Bf16, 0.01),
    ] {
        let types = CacheTypes { k: ty, v: ty };
        check_perplexity_of(SMOLLM2, golden, 2, 128, None, types, bound).await;
    }
    let q8 = CacheTypes {
        k: CacheType::Q8_0,
        v: CacheType::Q8_0,
    };
    check_perplexity_of(QWEN05, golden, 1, 128, Some(12), q8, 0.01).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_perplexity_within_1_percent_of_llama_cpp() {
    check_perplexity(SMOLLM2, "ppl.json", 2, 128, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen_perplexity_within_1_percent_of_llama_cpp_over_the_first_chunks() {
    // The whole text takes long on two cores; the running PPL after 12 chunks is the same method.
    check_perplexity(QWEN05, "qwen2.5-0.5b/ppl.json", 1, 128, Some(12)).await;
}

/// Teacher-forced comparison: llama.cpp's generated tokens are fed back, so every step of every
/// case is compared in the context llama.cpp saw, free of divergence. Returns per-step |Δ| of
/// the golden top-1 log-probability.
async fn teacher_forced_deltas(model_name: &str, golden: &str, ranks: usize) -> Option<Vec<f32>> {
    let path = model(model_name)?;
    let data = read_json(&golden_dir().join(golden));
    // The MoE set has a 688-token prompt.
    let mut session = session(&path, &vec![1.0; ranks], 1024, 128).await;
    let mut deltas = Vec::new();
    let mut mean_deltas = Vec::new();
    let mut worst = (0f32, String::new());
    for case in data["cases"].as_array().unwrap() {
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        let prompt = ids(&case["prompt_ids"]);
        let generated = ids(&case["generated_ids"]);
        let mut tokens = prompt.clone();
        tokens.extend(&generated[..generated.len() - 1]);
        let rows: Vec<usize> = (prompt.len() - 1..tokens.len()).collect();
        let ours = session.distributions(&tokens, &rows, 10).await.unwrap();
        for (step, distribution) in ours.iter().enumerate() {
            let golden_step = case["top_logprobs"][step].as_array().unwrap();
            let mut sum = 0.0;
            let mut shared = 0;
            for (i, pair) in golden_step.iter().enumerate() {
                let (id, lp) = (
                    pair[0].as_u64().unwrap() as u32,
                    pair[1].as_f64().unwrap() as f32,
                );
                if let Some(&(_, logit)) = distribution.candidates.iter().find(|c| c.0 == id) {
                    let delta = (distribution.logprob(logit) - lp).abs();
                    if i == 0 {
                        deltas.push(delta);
                        if delta > worst.0 {
                            let gap = golden_step[0][1].as_f64().unwrap()
                                - golden_step[1][1].as_f64().unwrap();
                            worst = (
                                delta,
                                format!(
                                    "{} step {step} (golden top-1 logprob {lp:.3}, top-2 gap {gap:.3})",
                                    case["id"].as_str().unwrap_or("?")
                                ),
                            );
                        }
                    }
                    sum += delta;
                    shared += 1;
                }
            }
            mean_deltas.push(sum / shared.max(1) as f32);
        }
    }
    session.cluster.shutdown().await;
    let mut sorted = deltas.clone();
    sorted.sort_by(f32::total_cmp);
    let mut sorted_mean = mean_deltas.clone();
    sorted_mean.sort_by(f32::total_cmp);
    report(&format!(
        "{model_name} TP={ranks} teacher-forced over {} steps: top-1 |Δ| median {:.4} p95 {:.4} max {:.4} at {}; top-10 mean |Δ| median {:.4} max {:.4}",
        sorted.len(),
        sorted[sorted.len() / 2],
        sorted[sorted.len() * 95 / 100],
        sorted[sorted.len() - 1],
        worst.1,
        sorted_mean[sorted_mean.len() / 2],
        sorted_mean[sorted_mean.len() - 1]
    ));
    Some(deltas)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teacher_forced_log_probabilities_match_llama_cpp() {
    for (model_name, golden) in [
        (SMOLLM2, "generate.json"),
        (QWEN05, "qwen2.5-0.5b/generate.json"),
    ] {
        for ranks in [1, 2] {
            let Some(deltas) = teacher_forced_deltas(model_name, golden, ranks).await else {
                continue;
            };
            let max = deltas.iter().copied().fold(0f32, f32::max);
            assert!(
                max <= 0.25,
                "{model_name} TP={ranks}: top-1 log-probability off by {max}"
            );
        }
    }
}

// Mixture of experts: the synthetic qwen3moe model against llama.cpp's outputs on it
// (tests/data/golden/moe-synthetic/README.md), by the same rules as the dense models.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moe_greedy_generation_matches_llama_cpp_at_tp_1_2_3_4() {
    check_generation_with(
        MOE,
        "moe-synthetic/generate.json",
        &[1, 2, 3, 4],
        MoeSplit::Tensor,
        1024,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moe_expert_parallel_generation_matches_llama_cpp_at_tp_2_3() {
    check_generation_with(
        MOE,
        "moe-synthetic/generate.json",
        &[2, 3],
        MoeSplit::Expert,
        1024,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moe_f16_experts_match_llama_cpp_at_tp_1_2() {
    check_generation_with(
        MOE_F16,
        "moe-synthetic/generate_f16exp.json",
        &[1, 2],
        MoeSplit::Tensor,
        1024,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moe_teacher_forced_log_probabilities_match_llama_cpp() {
    for ranks in [1, 2, 3, 4] {
        let Some(deltas) = teacher_forced_deltas(MOE, "moe-synthetic/generate.json", ranks).await
        else {
            return;
        };
        let max = deltas.iter().copied().fold(0f32, f32::max);
        assert!(
            max <= 0.25,
            "MoE TP={ranks}: top-1 log-probability off by {max}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moe_perplexity_within_1_percent_of_llama_cpp() {
    check_perplexity(MOE, "moe-synthetic/ppl.json", 1, 128, None).await;
    check_perplexity(MOE, "moe-synthetic/ppl.json", 2, 128, None).await;
    check_perplexity(MOE, "moe-synthetic/ppl.json", 3, 512, None).await;
    check_perplexity(MOE, "moe-synthetic/ppl.json", 4, 512, None).await;
}

/// The synthetic dense families (tests/data/golden/dense-synthetic): greedy generations at
/// TP = 1 to 4, with query-head splits where workers outnumber the 2 KV heads.
async fn check_synthetic(model_name: &str, variant: &str, split: MoeSplit, ranks: &[usize]) {
    let golden = format!("dense-synthetic/{variant}/generate.json");
    check_generation_with(model_name, &golden, ranks, split, 1024).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen3_dense_matches_llama_cpp_at_tp_1_2_3_4() {
    check_synthetic(QWEN3_SYNTH, "qwen3", MoeSplit::Tensor, &[1, 2, 3, 4]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama3_rope_frequency_factors_match_llama_cpp_at_tp_1_2_3_4() {
    check_synthetic(LLAMA3_SYNTH, "llama3", MoeSplit::Tensor, &[1, 2, 3, 4]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama_linear_and_yarn_scaling_match_llama_cpp_at_tp_1_2_3_4() {
    check_synthetic(
        LLAMA_LINEAR_SYNTH,
        "llama-linear",
        MoeSplit::Tensor,
        &[1, 2, 3, 4],
    )
    .await;
    check_synthetic(
        LLAMA_YARN_SYNTH,
        "llama-yarn",
        MoeSplit::Tensor,
        &[1, 2, 3, 4],
    )
    .await;
}

/// Mixtral routes each token to 2 of 8 experts, so a near-tie between the second and third
/// expert flips a whole expert's output: llama.cpp with flash attention off disagrees with
/// itself on 4 of the 8 cases (`generate_fa_off.json`), once at a golden gap of 0.53, beyond
/// the near-tie rule. Such a step is accepted where llama.cpp's other path chose our token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixtral_matches_llama_cpp_at_tp_1_2_3_4_under_both_splits() {
    for (split, ranks) in [
        (MoeSplit::Tensor, &[1, 2, 3, 4][..]),
        (MoeSplit::Expert, &[2, 3, 4][..]),
    ] {
        check_generation_against(
            MIXTRAL_SYNTH,
            "dense-synthetic/mixtral/generate.json",
            Some("dense-synthetic/mixtral/generate_fa_off.json"),
            ranks,
            split,
            1024,
        )
        .await;
    }
}

/// Prompts and perplexity chunks longer than the window of 32, so the local layers' window and
/// RoPE base are checked, not only the global layer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemma3_sliding_window_matches_llama_cpp_at_tp_1_2_3_4() {
    check_synthetic(GEMMA3_SYNTH, "gemma3", MoeSplit::Tensor, &[1, 2, 3, 4]).await;
}

/// gpt-oss (tests/data/golden/gptoss-synthetic): attention sinks, even layers through a window
/// of 32 and odd ones global, biases everywhere (the row-parallel ones added once, after the
/// AllReduce), YaRN, MXFP4 experts with the clamped SwiGLU, top-2-then-softmax routing; both
/// MoE splits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gptoss_matches_llama_cpp_at_tp_1_2_3_4_under_both_splits() {
    for (split, ranks) in [
        (MoeSplit::Tensor, &[1, 2, 3, 4][..]),
        (MoeSplit::Expert, &[2, 3, 4][..]),
    ] {
        check_generation_against(
            GPTOSS_SYNTH,
            "gptoss-synthetic/generate.json",
            Some("gptoss-synthetic/generate_fa_off.json"),
            ranks,
            split,
            1024,
        )
        .await;
    }
    let golden = "gptoss-synthetic/ppl.json";
    check_perplexity(GPTOSS_SYNTH, golden, 2, 128, None).await;
    check_perplexity(GPTOSS_SYNTH, golden, 3, 512, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthetic_families_perplexity_within_1_percent_of_llama_cpp() {
    for (name, variant) in [
        (QWEN3_SYNTH, "qwen3"),
        (LLAMA3_SYNTH, "llama3"),
        (LLAMA_LINEAR_SYNTH, "llama-linear"),
        (LLAMA_YARN_SYNTH, "llama-yarn"),
        (MIXTRAL_SYNTH, "mixtral"),
        (GEMMA3_SYNTH, "gemma3"),
    ] {
        let golden = format!("dense-synthetic/{variant}/ppl.json");
        check_perplexity(name, &golden, 2, 128, None).await;
        check_perplexity(name, &golden, 3, 512, None).await;
    }
}
