//! Pipeline stages (pipeline x tensor parallel): stages of local workers give the logits of
//! the same tensor-parallel group without stages, bit for bit (one rank for the exact
//! synthetic models; the matching tensor-parallel size for SmolLM2, whose in-stage splits are
//! the same); the server's batches, several in flight, give the tokens of one worker; bad
//! stage layouts are clear errors.

mod common;

use common::server::*;
use common::*;
use serde_json::{Value, json};

const PROMPTS: [&str; 2] = [
    "The quick brown fox jumps over the lazy dog because",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
];

/// One run: worker weights, pipeline stage sizes, MoE split.
type Run<'a> = (&'a [f64], &'a [usize], MoeSplit);

/// Every run's final logits (two prompts, the second long enough to cross several batches of
/// 16) equal the first run's, bit for bit.
async fn check_bitwise(model_name: &str, runs: &[Run<'_>]) {
    let Some(path) = model(model_name) else {
        return;
    };
    let mut reference: Vec<Vec<f32>> = Vec::new();
    for &(weights, stages, split) in runs {
        let mut session = session_with_stages(&path, weights, stages, 128, 16, split).await;
        assert_eq!(session.plan.stages.len(), stages.len());
        for (i, prompt) in PROMPTS.iter().enumerate() {
            let tokens = session.model.tokenizer.encode(prompt, true).unwrap();
            let logits = session
                .final_logits(&tokens)
                .await
                .unwrap_or_else(|e| panic!("{weights:?} stages {stages:?}: {e:#}"));
            if reference.len() < PROMPTS.len() {
                reference.push(logits);
                continue;
            }
            let differing = reference[i]
                .iter()
                .zip(&logits)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            println!(
                "{model_name} weights {weights:?} stages {stages:?} ({}) prompt {i}: {differing} logits differ",
                split.name()
            );
            assert_eq!(
                differing, 0,
                "{model_name} weights {weights:?} stages {stages:?} ({split:?}) prompt {i}"
            );
        }
        session.cluster.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_of_one_rank_give_one_ranks_logits() {
    // PP = 3 x TP = 1 and PP = 2 (uneven layers by weight) against one rank.
    check_bitwise(
        SMOLLM2,
        &[
            (&[1.0], &[1], MoeSplit::Tensor),
            (&[1.0, 1.0, 1.0], &[1, 1, 1], MoeSplit::Tensor),
            (&[2.0, 1.0], &[1, 1], MoeSplit::Tensor),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stages_of_two_give_the_logits_of_two_ranks() {
    // PP = 2 x TP = 2: each stage splits its layers as two ranks without stages do.
    check_bitwise(
        SMOLLM2,
        &[
            (&[1.0, 1.0], &[2], MoeSplit::Tensor),
            (&[1.0, 1.0, 1.0, 1.0], &[2, 2], MoeSplit::Tensor),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_models_are_bit_identical_with_stages() {
    check_bitwise(
        QWEN3_SYNTH,
        &[
            (&[1.0], &[1], MoeSplit::Tensor),
            (&[1.0, 1.0, 1.0, 1.0], &[2, 2], MoeSplit::Tensor),
            (&[1.0, 1.0, 1.0], &[1, 1, 1], MoeSplit::Tensor),
            (&[1.0, 1.0, 1.0], &[1, 2], MoeSplit::Tensor),
        ],
    )
    .await;
    // Mixture of experts: experts split inside a stage, both ways.
    check_bitwise(
        GPTOSS_SYNTH,
        &[
            (&[1.0], &[1], MoeSplit::Tensor),
            (&[1.0, 1.0, 1.0, 1.0], &[2, 2], MoeSplit::Tensor),
            (&[1.0, 1.0, 1.0, 1.0], &[2, 2], MoeSplit::Expert),
            (&[1.0, 1.0], &[1, 1], MoeSplit::Tensor),
        ],
    )
    .await;
}

fn post(server: &Server, path: &str, body: Value) -> (u16, Value) {
    let (status, text) = http(server, "POST", path, &body.to_string());
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Greedy completions of eight prompts, sent at once.
fn completions(server: &Server) -> Vec<String> {
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("Item {i}: the capital of country number {i} is"))
        .collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|prompt| {
                scope.spawn(move || {
                    let (status, body) = post(
                        server,
                        "/v1/completions",
                        json!({"prompt": prompt, "max_tokens": 16, "temperature": 0}),
                    );
                    assert_eq!(status, 200, "{body}");
                    body["choices"][0]["text"].as_str().unwrap().to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The server with two stages of two workers runs batches of its eight streams in both stages
/// at once, and every stream gets the tokens one worker gives it.
#[test]
fn pipelined_server_streams_match_one_worker() {
    let Some(path) = model(SMOLLM2) else { return };
    let single = start_with(&[
        "--model",
        path.to_str().unwrap(),
        "--local",
        "1",
        "--parallel",
        "8",
        "-c",
        "256",
    ]);
    let expected = completions(&single);
    drop(single);
    let piped = start_with(&[
        "--model",
        path.to_str().unwrap(),
        "--local",
        "4",
        "--pp",
        "2",
        "--parallel",
        "8",
        "-c",
        "256",
    ]);
    assert_eq!(completions(&piped), expected);
    // Both stages had a batch at once.
    let (_, metrics) = http(&piped, "GET", "/metrics", "");
    let launches: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tp_pipelined_launches_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no tp_pipelined_launches_total in {metrics}"));
    assert!(launches > 0, "no batch was launched behind another");
    assert!(metrics.contains("tp_pipeline_stages 2"), "{metrics}");
    assert!(
        metrics.contains("tp_worker_step_seconds_count{rank=\"3\",stage=\"1\"}"),
        "{metrics}"
    );
    // And one stream alone: the stages take turns.
    let (status, body) = post(
        &piped,
        "/v1/completions",
        json!({"prompt": "Item 3: the capital of country number 3 is", "max_tokens": 16, "temperature": 0}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["text"], json!(expected[3]));
}

/// More stages than workers, or than layers; stage weights that leave a stage no layer; an
/// empty or out-of-order stage in hosts.toml: each a clear error before anything loads.
#[test]
fn bad_stage_layouts_are_clear_errors() {
    let Some(path) = model(SMOLLM2) else { return };
    let model = path.to_str().unwrap();
    let run = |args: &[&str]| {
        let output = std::process::Command::new(coordinator_binary())
            .args(args)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        stderr
    };
    let stderr = run(&["plan", "-m", model, "--local", "2", "--pp", "3"]);
    assert!(
        stderr.contains("3 pipeline stages need between 1 and 2 (the workers)"),
        "{stderr}"
    );
    let stderr = run(&[
        "generate", "-m", model, "--local", "2", "--pp", "3", "-p", "hi",
    ]);
    assert!(
        stderr.contains("3 pipeline stages need between 1 and 2 (the workers)"),
        "{stderr}"
    );
    let dir = std::env::temp_dir().join(format!("tp-pipeline-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hosts = |name: &str, text: &str| {
        let file = dir.join(name);
        std::fs::write(&file, text).unwrap();
        file
    };
    // 30 layers by weight 1000 : 1 leave stage 1 nothing.
    let heavy = hosts(
        "heavy.toml",
        "[[worker]]\naddress = \"127.0.0.1:1\"\nweight = 1000\nstage = 0\n\n[[worker]]\naddress = \"127.0.0.1:2\"\nweight = 1\nstage = 1\n",
    );
    let stderr = run(&["plan", "-m", model, "--workers", heavy.to_str().unwrap()]);
    assert!(
        stderr.contains("pipeline stage 1 (weight 1.000 of 1001.000) gets no layer of the 30"),
        "{stderr}"
    );
    let gap = hosts(
        "gap.toml",
        "[[worker]]\naddress = \"127.0.0.1:1\"\nstage = 0\n\n[[worker]]\naddress = \"127.0.0.1:2\"\nstage = 2\n",
    );
    let stderr = run(&["plan", "-m", model, "--workers", gap.to_str().unwrap()]);
    assert!(
        stderr.contains("stage 2 after stage 0: list workers stage by stage"),
        "{stderr}"
    );
    let partial = hosts(
        "partial.toml",
        "[[worker]]\naddress = \"127.0.0.1:1\"\nstage = 0\n\n[[worker]]\naddress = \"127.0.0.1:2\"\n",
    );
    let stderr = run(&["plan", "-m", model, "--workers", partial.to_str().unwrap()]);
    assert!(stderr.contains("has no stage, but others do"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A worker of a pipeline dies in a step (the second stage's first rank, which holds the
/// handoff link): the step fails naming it, every other worker stops waiting, and once it is
/// back the cluster re-forms (the others keep their shards) and generates what it did before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_stage_worker_fails_the_step_and_the_pipeline_re_forms() {
    use tp::coordinator::cluster::{Cluster, ClusterLimits, Pipeline};
    use tp::coordinator::session::{Model, Session};
    let Some(path) = model(SMOLLM2) else { return };
    let dir = std::env::temp_dir().join(format!("tp-pipeline-fault-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "pipeline-fault-token-0123456789\n").unwrap();
    let logs: Vec<_> = (0..3).map(|i| dir.join(format!("w{i}.log"))).collect();
    let first = start_worker("127.0.0.1:0", &token, &logs[0]);
    // 16 tokens are 16 steps; the victim panics in the 20th, inside the second generation.
    let mut victim = start_worker_env(
        "127.0.0.1:0",
        &token,
        &logs[1],
        &[("TP_TEST_PANIC_AT_STEP", "20")],
    );
    let third = start_worker("127.0.0.1:0", &token, &logs[2]);
    let addresses = vec![
        first.address.clone(),
        victim.address.clone(),
        third.address.clone(),
    ];
    let limits = ClusterLimits {
        auth_token: Some(tp::auth::Token::read(&token).unwrap()),
        ..ClusterLimits::default()
    };
    let mut cluster = Cluster::connect(&worker_entries(&addresses), limits)
        .await
        .unwrap();
    cluster.pipeline = Pipeline::Sizes(vec![1, 2]);
    let mut session = Session::start(Model::open(&path).unwrap(), cluster, 256, 64)
        .await
        .unwrap();
    let reference = greedy_tokens(&mut session, "Once upon a time", 16)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let error = greedy_tokens(&mut session, "Once upon a time", 16)
        .await
        .expect_err("a generation across a dying worker fails");
    let detection = started.elapsed();
    println!("pipeline worker died: generation failed after {detection:?}: {error:#}");
    assert!(format!("{error:#}").contains("worker 1"), "{error:#}");
    assert!(
        detection < std::time::Duration::from_secs(3),
        "{detection:?}"
    );
    let _ = victim.child.wait();
    let _restarted = start_worker(&addresses[1], &token, &logs[1]);
    let started = std::time::Instant::now();
    while let Err(e) = session.recover().await {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "{e:#}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let stats = session.cluster.stats().await.unwrap();
    assert_eq!(
        (stats[0].shard_kept, stats[2].shard_kept),
        (1, 1),
        "the other stages' workers keep their shards"
    );
    assert_eq!(
        greedy_tokens(&mut session, "Once upon a time", 16)
            .await
            .unwrap(),
        reference
    );
    session.cluster.shutdown().await;
    std::fs::remove_dir_all(&dir).ok();
}

/// Pipeline stages on one host (no slow link), through the server: two workers of one thread
/// as TP = 2 and as PP = 2; one stream and eight at once. A
/// benchmark; by hand: `cargo test --test pipeline pipeline_speed -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark (minutes): run by hand with --ignored --nocapture"]
fn pipeline_speed_on_one_host() {
    let mut table = Vec::new();
    for name in [SMOLLM2, QWEN05] {
        let Some(path) = model(name) else { return };
        let model_path = path.display().to_string();
        for (workers, pp) in [("2", None), ("2", Some("2"))] {
            let mut args = vec![
                "--model",
                model_path.as_str(),
                "--local",
                workers,
                "--threads",
                "1",
                "--parallel",
                "8",
                "-c",
                "512",
            ];
            if let Some(pp) = pp {
                args.extend(["--pp", pp]);
            }
            let server = start_with(&args);
            let (one, eight, _) = load_speed(&server);
            table.push((name, workers, pp.unwrap_or("1"), one, eight));
        }
    }
    println!("| model | workers | stages | 1 stream t/s | 8 streams t/s (aggregate) |");
    println!("|---|--:|--:|--:|--:|");
    for (name, workers, pp, one, eight) in table {
        println!("| {name} | {workers} | {pp} | {one:.1} | {eight:.1} |");
    }
}

/// `plan --probe` measures each worker's round trip and settles `parallelism = "auto"` with
/// it (loopback: well under the threshold, so one stage); `plan` shows stages and handoffs.
#[test]
fn plan_probes_round_trips_and_shows_stages() {
    let Some(path) = model(SMOLLM2) else { return };
    let dir = std::env::temp_dir().join(format!("tp-pipeline-plan-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "pipeline-plan-token-0123456789\n").unwrap();
    let workers: Vec<_> = (0..2)
        .map(|i| start_worker("127.0.0.1:0", &token, &dir.join(format!("w{i}.log"))))
        .collect();
    let mut toml = "parallelism = \"auto\"\n".to_string();
    for w in &workers {
        toml.push_str(&format!("\n[[worker]]\naddress = \"{}\"\n", w.address));
    }
    let hosts = dir.join("hosts.toml");
    std::fs::write(&hosts, toml).unwrap();
    let run = |extra: &[&str]| {
        let output = std::process::Command::new(coordinator_binary())
            .args(["plan", "-m", path.to_str().unwrap(), "--workers"])
            .arg(&hosts)
            .args(extra)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).to_string();
        assert!(
            output.status.success(),
            "{extra:?}: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        text
    };
    let probed = run(&["--probe", "--auth-token-file", token.to_str().unwrap()]);
    assert!(probed.contains("measured round trips"), "{probed}");
    assert!(probed.contains("rank 1 ("), "{probed}");
    assert!(
        !probed.contains("pipeline: "),
        "loopback is fast: one stage\n{probed}"
    );
    let staged = run(&["--pp", "2"]);
    assert!(staged.contains("pipeline: 2 stages"), "{staged}");
    assert!(
        staged.contains("layers 0..15 (15 of 30), embeds the tokens"),
        "{staged}"
    );
    assert!(
        staged.contains("pipeline handoff, stage 0 -> 1"),
        "{staged}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
