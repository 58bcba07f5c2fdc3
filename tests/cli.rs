//! The command line end to end: local and listed workers, JSON output, tokenize, plan, perplexity.

mod common;

use std::process::{Child, Command, Stdio};

use common::*;

fn coordinator(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(coordinator_binary())
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn generate_json_reports_tokens_text_and_timings() {
    let Some(path) = model(SMOLLM2) else { return };
    let model = path.to_str().unwrap();
    let (ok, out, err) = coordinator(&[
        "generate",
        "--model",
        model,
        "--local",
        "2",
        "--chat",
        "--prompt",
        "What is the capital of Japan?",
        "--temperature",
        "0",
        "-n",
        "32",
        "--format",
        "json",
    ]);
    assert!(ok, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tokens = json["tokens"].as_array().unwrap();
    // The golden chat case: greedy ends with <|im_end|> (id 2), included as llama.cpp reports it.
    assert_eq!(json["stop"], "eos");
    assert_eq!(tokens.last().unwrap(), 2);
    assert!(json["text"].as_str().unwrap().contains("Tokyo"), "{out}");
    assert!(json["prompt_tokens"].as_array().unwrap().len() > 10);
    assert!(
        json["timings"]["generated_tokens_per_second"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}

#[test]
fn bench_reports_llama_bench_fields_per_tp_and_test() {
    let Some(path) = model(SMOLLM2) else { return };
    let model = path.to_str().unwrap();
    let (ok, out, err) = coordinator(&[
        "bench", "-m", model, "-p", "16", "-n", "4", "-d", "0,8", "--tp", "1,2", "-t", "1", "-r",
        "2", "--format", "json",
    ]);
    assert!(ok, "{err}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    // 2 TP sizes x 2 depths x (pp, tg)
    assert_eq!(rows.len(), 8, "{out}");
    for row in &rows {
        let samples = row["samples_ts"].as_array().unwrap();
        assert_eq!(samples.len(), 2);
        assert!(row["avg_ts"].as_f64().unwrap() > 0.0);
        assert_eq!(row["n_threads"], 1);
        let (p, n) = (
            row["n_prompt"].as_u64().unwrap(),
            row["n_gen"].as_u64().unwrap(),
        );
        assert!((p, n) == (16, 0) || (p, n) == (0, 4), "{row}");
    }
    assert!(rows.iter().any(|r| r["tp"] == 2 && r["test"] == "tg4 @ d8"));
    let (ok, out, err) = coordinator(&["bench", "-m", model, "-p", "8", "-n", "2", "-r", "1"]);
    assert!(ok, "{err}");
    assert!(out.contains("| pp8 |") && out.contains("| tg2 |"), "{out}");
}

#[test]
fn generate_text_streams_and_summarizes() {
    let Some(path) = model(SMOLLM2) else { return };
    let (ok, out, err) = coordinator(&[
        "generate",
        "--model",
        path.to_str().unwrap(),
        "--local",
        "3",
        "--prompt",
        "The capital of France is",
        "--temperature",
        "0",
        "-n",
        "8",
        "--stop",
        "United",
    ]);
    assert!(ok, "{err}");
    assert!(out.starts_with(" Paris."), "{out}");
    assert!(
        !out.contains("United"),
        "the stop string is not printed: {out}"
    );
    assert!(
        err.contains("[3 workers]") && err.contains("tokens/s") && err.contains("stop: stop"),
        "{err}"
    );
}

#[test]
fn tokenize_prints_llama_cpp_ids() {
    let Some(path) = model(SMOLLM2) else { return };
    let golden = read_json(&golden_dir().join("tokenize.json"));
    for case in golden.as_array().unwrap().iter().take(12) {
        let text = case["text"].as_str().unwrap();
        let (ok, out, err) = coordinator(&[
            "tokenize",
            "--model",
            path.to_str().unwrap(),
            "--format",
            "json",
            "--",
            text,
        ]);
        assert!(ok, "{err}");
        let ids: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(ids, case["ids"], "{text:?}");
    }
}

#[test]
fn plan_shows_the_split_without_loading() {
    let Some(path) = model(QWEN05) else { return };
    let (ok, out, err) = coordinator(&[
        "plan",
        "--model",
        path.to_str().unwrap(),
        "--local",
        "3",
        "--format",
        "json",
    ]);
    assert!(ok, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ranks = json["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 3);
    assert_eq!(json["attention_unit"], "query_head");
    let heads: u64 = ranks.iter().map(|r| r["q_heads"].as_u64().unwrap()).sum();
    assert_eq!(heads, 14 * 24);
    let ffn: u64 = ranks
        .iter()
        .map(|r| r["ffn_columns"].as_u64().unwrap())
        .sum();
    assert_eq!(ffn, 4864 * 24);
    let bytes: u64 = ranks
        .iter()
        .map(|r| r["weight_bytes"].as_u64().unwrap())
        .sum();
    // Every weight once, plus the replicated norms; within the file size.
    assert!(bytes > 400 << 20 && bytes < 491_400_064, "{bytes}");
    assert_eq!(json["links"].as_array().unwrap().len(), 3);
    let (ok, out, _) = coordinator(&["plan", "--model", path.to_str().unwrap(), "--local", "2"]);
    assert!(ok && out.contains("rank 0 <-> rank 1: shm"), "{out}");
}

/// `plan` sizes the KV cache for its types, written as llama.cpp writes them (-ctk, -ctv):
/// SmolLM2's 30 layers of 3 KV heads of 64 take 3 × 30 × (2 × 128) bytes per token in f16,
/// and 3 × 30 × (68 + 36) with q8_0 keys (34 bytes per 32) and q4_0 values (18 per 32).
#[test]
fn plan_sizes_the_kv_cache_for_its_types() {
    let Some(path) = model(SMOLLM2) else { return };
    let plan = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["plan", "--model", path.to_str().unwrap(), "--local", "3"];
        args.extend(["-c", "1000", "--parallel", "2", "--format", "json"]);
        args.extend(extra);
        let (ok, out, err) = coordinator(&args);
        assert!(ok, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let per_token = |types: &[&str]| -> (u64, u64) {
        let json = plan(types);
        let ranks = json["ranks"].as_array().unwrap();
        let sum = |key: &str| ranks.iter().map(|r| r[key].as_u64().unwrap()).sum::<u64>();
        (sum("kv_bytes_per_token"), sum("kv_cache_bytes"))
    };
    // Without a budget the pool holds both slots' contexts, in blocks of 16: 2 x 63 x 16.
    assert_eq!(per_token(&[]), (3 * 30 * 256, 3 * 30 * 256 * 2016));
    assert_eq!(
        per_token(&["-ctk", "q8_0", "-ctv", "q4_0"]),
        (3 * 30 * 104, 3 * 30 * 104 * 2016)
    );
    // 10 MiB per worker at 3,120 bytes per position: 210 blocks of 16.
    let budgeted = plan(&["-ctk", "q8_0", "-ctv", "q4_0", "--kv-budget", "10MiB"]);
    assert_eq!(budgeted["kv_pool"]["blocks"], 210);
    assert_eq!(budgeted["kv_pool"]["positions"], 3360);
    let (ok, _, err) = coordinator(&[
        "plan",
        "--model",
        path.to_str().unwrap(),
        "--local",
        "3",
        "-c",
        "1000",
        "--kv-budget",
        "1M",
    ]);
    assert!(
        !ok && err.contains("fewer than one request's context of 1000"),
        "{err}"
    );
    let (ok, out, _) = coordinator(&[
        "plan",
        "--model",
        path.to_str().unwrap(),
        "--local",
        "2",
        "--cache-type-k",
        "bf16",
    ]);
    assert!(
        ok && out.contains("KV cache: keys bf16, values f16"),
        "{out}"
    );
    let (ok, _, err) = coordinator(&["plan", "--model", path.to_str().unwrap(), "-ctk", "q5_1"]);
    assert!(
        !ok && err.contains("unknown KV cache type 'q5_1'") && err.contains("q4_0"),
        "{err}"
    );
}

/// A mixture-of-experts plan: every expert column lands on exactly one worker either way, so
/// the experts' bytes add up to the file's expert tensors (3 per layer of 557,056 bytes); whole
/// experts split 6/5/5 per layer, the extra one rotating across layers.
#[test]
fn plan_shows_experts_per_worker() {
    let Some(path) = model(MOE) else { return };
    for (split, experts_per_worker) in [("tensor", [64u64, 64, 64]), ("expert", [22, 21, 21])] {
        let (ok, out, err) = coordinator(&[
            "plan",
            "--model",
            path.to_str().unwrap(),
            "--local",
            "3",
            "--moe-split",
            split,
            "--format",
            "json",
        ]);
        assert!(ok, "{err}");
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(json["moe_split"], split);
        let ranks = json["ranks"].as_array().unwrap();
        let experts: Vec<u64> = ranks
            .iter()
            .map(|r| r["experts"].as_u64().unwrap())
            .collect();
        assert_eq!(experts, experts_per_worker, "{split}");
        let expert_bytes: u64 = ranks
            .iter()
            .map(|r| r["expert_bytes"].as_u64().unwrap())
            .sum();
        assert_eq!(expert_bytes, 3 * 4 * 557_056, "{split}");
    }
    let (ok, out, _) = coordinator(&["plan", "--model", path.to_str().unwrap(), "--local", "2"]);
    assert!(
        ok && out.contains("16 experts of 128 columns per layer, 4 used per token"),
        "{out}"
    );
}

struct Worker(Child, String);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_worker() -> Worker {
    let (child, address) = common::server::spawn_listening(Command::new(worker_binary()).args([
        "--listen",
        "127.0.0.1:0",
        "--threads",
        "1",
        "--log",
        "warn",
    ]));
    Worker(child, address)
}

#[test]
fn workers_listed_in_hosts_toml_serve_generation_and_perplexity() {
    let Some(path) = model(SMOLLM2) else { return };
    let (a, b) = (start_worker(), start_worker());
    let hosts = std::env::temp_dir().join(format!("tp-hosts-{}.toml", std::process::id()));
    std::fs::write(
        &hosts,
        format!(
            "[[worker]]\naddress = \"{}\"\nweight = 2.0\n\n[[worker]]\naddress = \"{}\"\n",
            a.1, b.1
        ),
    )
    .unwrap();
    let model = path.to_str().unwrap();
    let hosts_arg = hosts.to_str().unwrap();
    let (ok, out, err) = coordinator(&[
        "generate",
        "--model",
        model,
        "--workers",
        hosts_arg,
        "--prompt",
        "The capital of France is",
        "--temperature",
        "0",
        "-n",
        "4",
    ]);
    assert!(ok, "{err}");
    assert!(out.starts_with(" Paris"), "{out}");
    // The workers outlive a coordinator that did not start them, and serve the next one.
    let text = golden_dir().join("ppl_text.txt");
    let (ok, out, err) = coordinator(&[
        "perplexity",
        "--model",
        model,
        "--workers",
        hosts_arg,
        "--file",
        text.to_str().unwrap(),
        "-c",
        "128",
        "--chunks",
        "3",
        "--format",
        "json",
    ]);
    assert!(ok, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let golden = read_json(&golden_dir().join("ppl.json"));
    let expected = golden["results"][0]["running_ppl"][2].as_f64().unwrap();
    let ours = json["ppl"].as_f64().unwrap();
    assert!(
        (ours - expected).abs() / expected < 0.02,
        "{ours} vs {expected}"
    );
    let (ok, out, _) = coordinator(&["plan", "--model", model, "--workers", hosts_arg]);
    assert!(ok && out.contains("2.00"), "{out}");
    std::fs::remove_file(&hosts).ok();
}

/// Children of a process, from every thread's `children` list.
fn children_of(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        children.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    children
}

fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            !stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

fn local_workers_stop_when_the_coordinator(signal: i32) {
    let Some(path) = model(SMOLLM2) else { return };
    let mut child = Command::new(coordinator_binary())
        .args([
            "generate",
            "--model",
            path.to_str().unwrap(),
            "--local",
            "2",
            "--prompt",
            "Once upon a time",
        ])
        .args(["-n", "4000", "--temperature", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until text flows: the workers are loaded and generating.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    let workers = children_of(child.id());
    assert_eq!(workers.len(), 2, "{workers:?}");
    unsafe { libc::kill(child.id() as i32, signal) };
    let status = child.wait().unwrap();
    assert!(!status.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while workers.iter().any(|&w| is_running(w)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for w in workers {
        assert!(
            !is_running(w),
            "worker {w} outlived its coordinator (signal {signal})"
        );
    }
}

#[test]
fn local_workers_stop_on_ctrl_c() {
    local_workers_stop_when_the_coordinator(libc::SIGINT);
}

#[test]
fn local_workers_stop_when_the_coordinator_is_killed() {
    local_workers_stop_when_the_coordinator(libc::SIGKILL);
}
